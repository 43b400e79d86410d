"""Python client for the modelpool gRPC service: generated stubs (`modelpool.v1`), clients and a CLI."""

from modelpool.client import AsyncClient, Client, build_request

__all__ = ["AsyncClient", "Client", "build_request"]
