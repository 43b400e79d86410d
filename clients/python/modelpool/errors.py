"""The one exception the client raises for a failed call: the gRPC status code and the server's message."""

from __future__ import annotations

import grpc


class ModelpoolError(Exception):
    """A call ended with a status other than OK. `code` is the `grpc.StatusCode`, `message` the server's
    details (INVALID_ARGUMENT messages start with the field name)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ModelpoolError:
        # Every RpcError raised by a call is also a grpc.Call; the base class itself has no code().
        call: grpc.Call = error  # type: ignore[assignment]
        return cls(call.code(), call.details() or "")
