"""The GenerationService handlers: decode, check, admit, tokenize, relay. Statuses come from service/errors.py.

A request is refused as early and as cheaply as possible: bytes that do not
decode, bad fields, an unknown model and input too large for the context are
INVALID_ARGUMENT / NOT_FOUND before anything is spent on them; admission
(RESOURCE_EXHAUSTED, UNAVAILABLE) comes before tokenizing, which runs off the
event loop. Nothing a caller sends can hold the loop for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from modelpool.v1 import generation_pb2 as pb
from service import convert, logs, metrics, tracing
from service.dispatcher import Dispatcher, RequestStream
from service.errors import InvalidArgument, NotFound, ResourceExhausted, code_of, quoted, status_mapped
from service.served_model import ServedModel

_LOGGER = logging.getLogger(__name__)
REQUEST_ID_KEY = "x-request-id"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
# How long a stream whose write failed (its client went away) waits for gRPC to cancel it.
_CANCEL_WAIT_S = 5.0
# A deadline this close counts as passed: the core's timer and time_remaining() use different clocks.
_DEADLINE_SLACK_S = 0.05


@dataclass(frozen=True)
class Undecodable:
    """What a request deserializer returns for bytes that are no valid message, so that the handler (not
    gRPC's generic error path, which answers UNKNOWN and logs a traceback) refuses it."""

    message_type: str
    reason: str


@dataclass(frozen=True)
class TooLarge:
    """What a request deserializer returns for a message over `max_receive_message_bytes`."""

    size: int
    limit: int


def _tolerant(message_class, max_bytes: int):
    def deserialize(data: bytes):
        if len(data) > max_bytes:
            return TooLarge(len(data), max_bytes)
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return Undecodable(message_class.DESCRIPTOR.full_name, str(exc).split(": ")[-1])

    return deserialize


def rpc_handlers(servicer: GenerationServicer, max_bytes: int) -> grpc.GenericRpcHandler:
    """The service's method handlers, registered like generated code would but with tolerant deserializers that
    also refuse messages over `max_bytes` (with a message naming the limit, which gRPC's own check lacks)."""
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Generate": grpc.unary_unary_rpc_method_handler(
                servicer.Generate, _tolerant(pb.GenerateRequest, max_bytes), pb.GenerateResponse.SerializeToString
            ),
            "StreamGenerate": grpc.unary_stream_rpc_method_handler(
                servicer.StreamGenerate,
                _tolerant(pb.StreamGenerateRequest, max_bytes),
                pb.StreamGenerateResponse.SerializeToString,
            ),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                servicer.ListModels, _tolerant(pb.ListModelsRequest, max_bytes), pb.ListModelsResponse.SerializeToString
            ),
        },
    )


class GenerationServicer:
    def __init__(
        self,
        models: dict[str, ServedModel],
        dispatcher: Dispatcher,
        default_model: str,
        limits: convert.RequestLimits | None = None,
    ):
        self._models = models
        self._dispatcher = dispatcher
        self._default = default_model
        self._limits = limits or convert.RequestLimits()

    async def _start(self, request, request_id: str) -> tuple[ServedModel, RequestStream]:
        parsed = convert.parse_request(request, self._limits)
        name = parsed.model or self._default
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"model {quoted(name)} is not served; ListModels shows {sorted(self._models)}")
        model.check_input_size(parsed)
        ticket = self._dispatcher.admit(model.name)
        try:
            prompt_ids = await model.encode(parsed)
            stopping = model.check_limits(len(prompt_ids), parsed.stopping, parsed.explicit_max_new_tokens)
            stream = self._dispatcher.submit(
                ticket,
                {
                    "prompt_token_ids": tuple(prompt_ids),
                    "sampling": parsed.sampling,
                    "stopping": stopping,
                    "request_label": request_id,
                    "priority": parsed.priority,
                },
            )
        finally:
            ticket.release()
        return model, stream

    @contextlib.asynccontextmanager
    async def _call(self, method: str, request, context):
        """Everything around one call: its request id (sent back in the initial and trailing metadata), its
        span, its count by final status and its access-log line; and, however it ended, an unfinished request
        taken out of its worker."""
        metadata = context.invocation_metadata()
        call = _Call(request_id_of(metadata), context)
        context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id),))
        span = tracing.CallSpan(method, metadata, call.request_id)
        name = ""
        code = grpc.StatusCode.OK
        try:
            _refuse_undecodable(method, request, context)
            name = getattr(request, "model", "") or (self._default if method != "ListModels" else "")
            yield call
        except (asyncio.CancelledError, GeneratorExit):
            code = _cancel_code(context)
            raise
        except Exception as exc:
            code = code_of(exc)
            raise
        finally:
            stream = call.stream
            if stream is not None:
                stream.close()
            model = name if name in self._models else ""
            metrics.REQUESTS.labels(model, method, code.name).inc()
            fields = {
                "request_id": call.request_id,
                "method": method,
                "model": model,
                "code": code.name,
                "prompt_tokens": stream.prompt_tokens if stream else 0,
                "completion_tokens": stream.completion_tokens if stream else 0,
                "queue_seconds": stream.timings.queue_seconds if stream else 0.0,
                "ttft_seconds": stream.timings.time_to_first_token_seconds if stream else 0.0,
                "total_seconds": time.time() - call.started,
                "worker": stream.worker.key if stream else "",
                "peer": context.peer(),
            }
            logs.access(fields)
            span.finish(code.name, fields, stream.timings if stream else None)

    @status_mapped
    async def Generate(self, request, context):
        async with self._call("Generate", request, context) as call:
            model, call.stream = await self._start(request, call.request_id)
            events = await call.stream.all_events()
            await call.send_headers()
            return convert.generate_response(model.name, events, call.stream.timings)

    @status_mapped
    async def StreamGenerate(self, request, context):
        # The writer API rather than an async generator: a failed write (the client went away) surfaces here,
        # where it ends the request quietly, instead of inside gRPC, which logs it as an error; and the
        # request's cleanup runs when the handler returns, not when a suspended generator is collected.
        async with self._call("StreamGenerate", request, context) as call:
            _, call.stream = await self._start(request, call.request_id)
            finished = False
            while not finished:
                events = await call.stream.next_events()
                finished = events[-1].finished
                await call.send_headers()
                try:
                    await context.write(convert.stream_response(events, call.stream.timings))
                except Exception:  # noqa: BLE001  (the call is over on the client's side)
                    await _wait_for_cancellation(context)
                    return

    @status_mapped
    async def ListModels(self, request, context):
        async with self._call("ListModels", request, context) as call:
            await call.send_headers()
            return convert.list_models_response(
                self._models, self._dispatcher.pools, self._default, request.include_placement
            )


def _refuse_undecodable(method: str, request, context) -> None:
    if isinstance(request, TooLarge):
        raise ResourceExhausted(
            f"request: {request.size} bytes is more than max_receive_message_bytes ({request.limit})"
        )
    if isinstance(request, Undecodable):
        _LOGGER.info("refused an undecodable %s from %s: %s", request.message_type, context.peer(), request.reason)
        raise InvalidArgument("request", f"not a valid {request.message_type}: {request.reason}")


class _Call:
    def __init__(self, request_id: str, context):
        self.request_id = request_id
        self.started = time.time()
        self.stream: RequestStream | None = None
        self._context = context
        self._headers_sent = False

    async def send_headers(self) -> None:
        """The response headers (with the request id) go out with the first response message, never before:
        a call refused or failed before any output then ends trailers-only, which is what lets gRPC's retry
        policy send it again (a client commits a call once it has seen headers, gRFC A6)."""
        if self._headers_sent:
            return
        self._headers_sent = True
        with contextlib.suppress(Exception):  # the client may be gone already; the call then ends as CANCELLED
            await self._context.send_initial_metadata(((REQUEST_ID_KEY, self.request_id),))


def request_id_of(metadata) -> str:
    """The caller's x-request-id when it is a sane one (1-128 visible ASCII characters), else a new one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and 0 < len(value) <= 128 and _visible_ascii(value):
            return value
    return uuid.uuid4().hex


def _visible_ascii(text: str) -> bool:
    return text.isascii() and text.isprintable() and " " not in text


def _cancel_code(context) -> grpc.StatusCode:
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= _DEADLINE_SLACK_S
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


async def _wait_for_cancellation(context) -> None:
    """A write failed because the client cancelled or its deadline passed; gRPC cancels this task as soon as it
    has seen that, and the caller's cleanup then runs with the right status code."""
    _LOGGER.debug("write to %s failed; waiting for gRPC to cancel the call", context.peer())
    await asyncio.sleep(_CANCEL_WAIT_S)
