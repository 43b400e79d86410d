"""Protobuf <-> plain Python at the gRPC edge, with the checks that need no model.

Parsing raises InvalidArgument naming the offending field; everything after
this module works on plain dataclasses.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from modelpool.v1 import generation_pb2 as pb
from service.errors import InvalidArgument
from workers.messages import (
    FinishReason,
    SamplingParams,
    SequenceEvent,
    StoppingParams,
    WorkerMemory,
    WorkerReady,
)


@dataclass(frozen=True)
class RequestLimits:
    """The per-request limits that need no model ([limits] of the configuration)."""

    max_chat_messages: int = 256
    max_stop_sequences: int = 16
    max_stop_sequence_chars: int = 256


_ROLES = {pb.ROLE_SYSTEM: "system", pb.ROLE_USER: "user", pb.ROLE_ASSISTANT: "assistant"}


@dataclass
class ParsedRequest:
    model: str
    prompt: str | None
    messages: list[dict[str, str]] | None
    sampling: SamplingParams
    stopping: StoppingParams
    # False when max_new_tokens was 0: the server's default applies.
    explicit_max_new_tokens: bool
    # Scheduling priority in the worker's queue (higher first).
    priority: int = 0


# The range of GenerateRequest.priority (see the proto).
PRIORITY_MIN, PRIORITY_MAX = -100, 100


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def _number(value: float, field: str, default: float, low: float, high: float = math.inf) -> float:
    """A float field: 0 means `default`; otherwise in [low, high], compared as float32 like the wire value
    (1e-4 on the wire is 9.99999974e-05, which must still pass a limit documented as 1e-4)."""
    if math.isnan(value) or math.isinf(value):
        raise InvalidArgument(field, "must be a finite number")
    if value == 0:
        return default
    if not _float32(low) <= value <= _float32(high):
        raise InvalidArgument(field, f"{value:g} is outside [{low:g}, {high:g}]")
    return float(value)


def parse_request(
    request: pb.GenerateRequest | pb.StreamGenerateRequest, limits: RequestLimits = RequestLimits()
) -> ParsedRequest:
    """Both request messages share their fields, so one parser serves both RPCs."""
    kind = request.WhichOneof("input")
    prompt, messages = None, None
    if kind is None:
        raise InvalidArgument("input", "set either prompt or chat")
    if kind == "prompt":
        if not request.prompt:
            raise InvalidArgument("prompt", "must not be empty")
        prompt = request.prompt
    else:
        if not request.chat.messages:
            raise InvalidArgument("chat.messages", "must not be empty")
        if len(request.chat.messages) > limits.max_chat_messages:
            raise InvalidArgument(
                "chat.messages",
                f"{len(request.chat.messages)} messages is more than max_chat_messages ({limits.max_chat_messages})",
            )
        messages = []
        for i, message in enumerate(request.chat.messages):
            role = _ROLES.get(message.role)
            if role is None:
                raise InvalidArgument(f"chat.messages[{i}].role", "must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT")
            messages.append({"role": role, "content": message.content})

    s = request.sampling
    sampling = SamplingParams(
        do_sample=s.do_sample,
        temperature=_number(s.temperature, "sampling.temperature", 1.0, 1e-4, 100.0),
        top_p=_number(s.top_p, "sampling.top_p", 1.0, 1e-6, 1.0),
        top_k=s.top_k,
        repetition_penalty=_number(s.repetition_penalty, "sampling.repetition_penalty", 1.0, 1e-3, 100.0),
        seed=s.seed if s.HasField("seed") else None,
    )

    st = request.stopping
    stops = tuple(st.stop_sequences)
    if len(stops) > limits.max_stop_sequences:
        raise InvalidArgument(
            "stopping.stop_sequences", f"at most {limits.max_stop_sequences} are allowed (max_stop_sequences)"
        )
    for i, stop in enumerate(stops):
        if not stop:
            raise InvalidArgument(f"stopping.stop_sequences[{i}]", "must not be empty")
        if len(stop) > limits.max_stop_sequence_chars:
            raise InvalidArgument(
                f"stopping.stop_sequences[{i}]",
                f"longer than {limits.max_stop_sequence_chars} characters (max_stop_sequence_chars)",
            )
    stopping = StoppingParams(
        max_new_tokens=st.max_new_tokens,
        min_new_tokens=st.min_new_tokens,
        stop_sequences=stops,
        ignore_eos=st.ignore_eos,
    )
    if not PRIORITY_MIN <= request.priority <= PRIORITY_MAX:
        raise InvalidArgument("priority", f"{request.priority} is outside [{PRIORITY_MIN}, {PRIORITY_MAX}]")
    return ParsedRequest(
        model=request.model,
        prompt=prompt,
        messages=messages,
        sampling=sampling,
        stopping=stopping,
        explicit_max_new_tokens=st.max_new_tokens > 0,
        priority=request.priority,
    )


_FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.END_OF_SEQUENCE: pb.FINISH_REASON_END_OF_SEQUENCE,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
}


def _finish_reason(reason: FinishReason) -> pb.FinishReason.ValueType:
    return _FINISH_REASONS.get(reason, pb.FINISH_REASON_UNSPECIFIED)


def _timings(timings) -> pb.Timings:
    return pb.Timings(
        queue_seconds=timings.queue_seconds,
        time_to_first_token_seconds=timings.time_to_first_token_seconds,
        total_seconds=timings.total_seconds,
    )


def stream_response(events: list[SequenceEvent], timings) -> pb.StreamGenerateResponse:
    """Events of one request that arrived together become one stream message."""
    last = events[-1]
    response = pb.StreamGenerateResponse(
        text_delta="".join(e.text for e in events),
        token_ids=[t for e in events for t in e.token_ids],
    )
    if last.finished:
        response.finish_reason = _finish_reason(last.finish_reason)
        response.usage.CopyFrom(pb.Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens))
        response.timings.CopyFrom(_timings(timings))
    return response


def generate_response(model: str, events: list[SequenceEvent], timings) -> pb.GenerateResponse:
    last = events[-1]
    return pb.GenerateResponse(
        text="".join(e.text for e in events),
        finish_reason=_finish_reason(last.finish_reason),
        usage=pb.Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens),
        timings=_timings(timings),
        model=model,
        token_ids=[t for e in events for t in e.token_ids],
    )


_WORKER_STATES = {
    "STARTING": pb.WORKER_STATE_STARTING,
    "READY": pb.WORKER_STATE_READY,
    "RESTARTING": pb.WORKER_STATE_RESTARTING,
    "STOPPED": pb.WORKER_STATE_STOPPED,
}


def placement_message(ready: WorkerReady, memory: WorkerMemory | None) -> pb.Placement | None:
    """A ready worker's placement with the numbers of its latest memory report; None when it sent none."""
    placement = ready.placement
    if placement is None:
        return None
    return pb.Placement(
        dtype=ready.dtype,
        module_groups=[
            pb.ModuleGroup(module=g.module, device=g.device, size_bytes=g.size_bytes) for g in placement.module_groups
        ],
        device_memory=[
            pb.DeviceMemory(
                device=d.device, allocated_bytes=d.allocated, reserved_bytes=d.reserved, total_bytes=d.total
            )
            for d in placement.device_memory(memory)
        ],
        offload_folder=placement.offload_folder,
    )


def list_models_response(
    served: dict, pools: dict, default_model: str, include_placement: bool = False
) -> pb.ListModelsResponse:
    response = pb.ListModelsResponse()
    for name, model in served.items():
        workers = pools[name].workers
        dtype = next((w.ready.dtype for w in workers if w.ready is not None), "")
        info = response.models.add(
            name=name,
            source=model.config.source,
            dtype=dtype,
            context_length=model.context_length,
            has_chat_template=model.has_chat_template,
            is_default=name == default_model,
        )
        for w in workers:
            worker_info = info.workers.add(
                index=w.index,
                pid=w.pid if w.state.name in ("STARTING", "READY") else 0,
                state=_WORKER_STATES[w.state.name],
                cuda_visible_devices=w.ready.cuda_visible_devices if w.ready else w.spec.cuda_visible_devices,
                devices=list(w.ready.devices) if w.ready else [],
                device_map_summary=dict(w.ready.device_map_summary) if w.ready else {},
                outstanding_requests=len(w.outstanding),
                running_sequences=w.running,
                restarts=w.restarts,
                last_error=w.last_error,
                completed_requests=w.completed,
            )
            placement = placement_message(w.ready, w.memory) if include_placement and w.ready else None
            if placement is not None:
                worker_info.placement.CopyFrom(placement)
    return response
