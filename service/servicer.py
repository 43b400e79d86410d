"""The GenerationService handlers: parse, tokenize, admit, relay. Statuses come from service/errors.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from modelpool.v1 import generation_pb2_grpc as pb_grpc

from service import convert, metrics
from service.dispatcher import Dispatcher, RequestStream
from service.errors import NotFound, code_of, status_mapped
from service.served_model import ServedModel

_LOGGER = logging.getLogger(__name__)


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self, models: dict[str, ServedModel], dispatcher: Dispatcher, default_model: str):
        self._models = models
        self._dispatcher = dispatcher
        self._default = default_model

    def _start(self, request) -> tuple[ServedModel, RequestStream]:
        parsed = convert.parse_request(request)
        name = parsed.model or self._default
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"model {name!r} is not served; ListModels shows {sorted(self._models)}")
        if parsed.prompt is not None:
            prompt_ids = model.encode_prompt(parsed.prompt)
        else:
            prompt_ids = model.encode_chat(parsed.messages)
        stopping = model.check_limits(len(prompt_ids), parsed.stopping, parsed.explicit_max_new_tokens)
        stream = self._dispatcher.submit(
            model.name,
            {"prompt_token_ids": tuple(prompt_ids), "sampling": parsed.sampling, "stopping": stopping},
        )
        return model, stream

    @contextlib.contextmanager
    def _call(self, method: str, request, context):
        """Counts the call by its final status and, however it ended, takes an unfinished request out of its worker."""
        name = request.model or self._default
        call = _Call()
        code = grpc.StatusCode.OK
        try:
            yield call
        except (asyncio.CancelledError, GeneratorExit):
            code = _cancel_code(context)
            raise
        except Exception as exc:
            code = code_of(exc)
            raise
        finally:
            if call.stream is not None:
                call.stream.close()
            metrics.REQUESTS.labels(name if name in self._models else "", method, code.name).inc()

    @status_mapped
    async def Generate(self, request, context):
        with self._call("Generate", request, context) as call:
            model, call.stream = self._start(request)
            events = await call.stream.next_events()
            while not events[-1].finished:
                events.extend(await call.stream.next_events())
            return convert.generate_response(model.name, events, call.stream.timings)

    @status_mapped
    async def StreamGenerate(self, request, context):
        with self._call("StreamGenerate", request, context) as call:
            _, call.stream = self._start(request)
            finished = False
            while not finished:
                events = await call.stream.next_events()
                finished = events[-1].finished
                yield convert.stream_response(events, call.stream.timings)

    @status_mapped
    async def ListModels(self, request, context):
        response = convert.list_models_response(self._models, self._dispatcher.pools, self._default)
        metrics.REQUESTS.labels("", "ListModels", "OK").inc()
        return response


class _Call:
    stream: RequestStream | None = None


def _cancel_code(context) -> grpc.StatusCode:
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
