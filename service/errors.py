"""The one place where failures become gRPC status codes, for unary and streaming handlers alike.

Messages never echo a caller's value whole: `quoted` shortens it, and every
status message is capped, so an abusive value cannot overflow the status
metadata (which would turn the status into something else) or flood the logs.
"""

from __future__ import annotations

import functools
import logging

import grpc

from workers.messages import ErrorKind

_LOGGER = logging.getLogger(__name__)
# gRPC refuses metadata over 16 KiB (and some proxies 8 KiB); status details travel as metadata.
MAX_DETAILS_CHARS = 1024
MAX_QUOTED_CHARS = 64


def quoted(value: object, limit: int = MAX_QUOTED_CHARS) -> str:
    """repr() of a caller's value, shortened to `limit` characters and saying so."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return f"{text[: limit - 1]}…{size}"


def capped(message: str, limit: int = MAX_DETAILS_CHARS) -> str:
    return message if len(message) <= limit else message[: limit - 1] + "…"


class ServiceError(Exception):
    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Internal(ServiceError):
    code = grpc.StatusCode.INTERNAL


def from_worker(kind: ErrorKind | None, message: str) -> ServiceError:
    """A failure a worker reported for one request."""
    if kind is ErrorKind.INVALID_ARGUMENT:
        # The only such check in a worker is the batch-token limit, which max_new_tokens decides.
        return InvalidArgument("stopping.max_new_tokens", message)
    if kind is ErrorKind.RESOURCE_EXHAUSTED:
        return ResourceExhausted(message)
    return Internal(message or "the worker failed this request")


def code_of(exc: BaseException) -> grpc.StatusCode:
    return exc.code if isinstance(exc, ServiceError) else grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, exc: Exception):
    if isinstance(exc, ServiceError):
        await context.abort(exc.code, capped(exc.message))
    _LOGGER.exception("unexpected error in a handler", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, capped(f"internal error: {type(exc).__name__}: {exc}"))


def status_mapped(handler):
    """Decorate a grpc.aio coroutine handler so that errors abort the call with their status."""

    @functools.wraps(handler)
    async def wrapper(self, request, context):
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001  (mapped, never swallowed)
            await _abort(context, exc)

    return wrapper
