"""The one exception the client raises for a failed call: the gRPC status code and the server's message."""

from __future__ import annotations

import grpc


class ModelpoolError(Exception):
    """A call ended with a status other than OK. `code` is the `grpc.StatusCode`, `message` the server's
    details (INVALID_ARGUMENT messages start with the field name); `request_id` the server's id of the call
    (its `x-request-id`, as in its access log), when the call reached it."""

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ModelpoolError:
        # Every RpcError raised by a call is also a grpc.Call; the base class itself has no code().
        call: grpc.Call = error  # type: ignore[assignment]
        trailers = call.trailing_metadata() or ()
        request_id = next((str(value) for key, value in trailers if key == "x-request-id"), None)
        return cls(call.code(), call.details() or "", request_id)
