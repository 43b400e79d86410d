"""Python client for the modelpool gRPC service: generated stubs (`modelpool.v1`), clients and a CLI."""

from modelpool.channel import TLS
from modelpool.client import AsyncClient, AsyncStream, Client, Stream
from modelpool.errors import ModelpoolError
from modelpool.request import Options, build_request

__all__ = ["TLS", "AsyncClient", "AsyncStream", "Client", "ModelpoolError", "Options", "Stream", "build_request"]
