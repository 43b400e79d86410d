"""Requests built from plain Python values: a prompt or (role, content) messages, and generation options."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TypedDict, TypeVar

from modelpool.v1 import generation_pb2 as pb

Message = Mapping[str, str] | Sequence[str]
RequestT = TypeVar("RequestT", pb.GenerateRequest, pb.StreamGenerateRequest)

_ROLES = {"system": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT}
_SAMPLING = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed")
_STOPPING = ("max_new_tokens", "min_new_tokens", "stop_sequences", "ignore_eos")


class Options(TypedDict, total=False):
    """Generation options; None (or leaving one out) takes the server's default."""

    do_sample: bool | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    repetition_penalty: float | None
    seed: int | None
    max_new_tokens: int | None
    min_new_tokens: int | None
    stop_sequences: Sequence[str] | None
    ignore_eos: bool | None
    # Scheduling priority, -100 to 100: higher is admitted first in the worker's queue (see build_request).
    priority: int | None


def chat_messages(messages: Iterable[Message]) -> pb.ChatMessages:
    chat = pb.ChatMessages()
    for message in messages:
        if isinstance(message, Mapping):
            role, content = message["role"], message["content"]
        else:
            role, content = message
        if role not in _ROLES:
            raise ValueError(f"unknown role {role!r}: use one of {sorted(_ROLES)}")
        chat.messages.add(role=_ROLES[role], content=content)
    return chat


def build_request(
    cls: type[RequestT] = pb.GenerateRequest,  # type: ignore[assignment]
    prompt: str | None = None,
    *,
    messages: Iterable[Message] | None = None,
    model: str = "",
    priority: int | None = None,
    **options: object,
) -> RequestT:
    """A GenerateRequest or StreamGenerateRequest from a prompt or (role, content) messages and the keyword
    options of `Options`. `priority` (-100 to 100, default 0): higher is scheduled first in the worker's queue."""
    unknown = set(options) - set(_SAMPLING) - set(_STOPPING)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}")
    if (prompt is None) == (messages is None):
        raise ValueError("give either a prompt or messages")
    request = cls(model=model, priority=priority or 0)
    if prompt is not None:
        request.prompt = prompt
    else:
        request.chat.CopyFrom(chat_messages(messages or ()))
    sampling = {k: v for k, v in options.items() if k in _SAMPLING and v is not None}
    # A temperature above 0 asks for sampling; 0 keeps greedy decoding (the server reads 0 as "unset").
    temperature = sampling.get("temperature", 0)
    if isinstance(temperature, int | float) and temperature > 0 and "do_sample" not in sampling:
        sampling["do_sample"] = True
    request.sampling.CopyFrom(pb.SamplingParameters(**sampling))  # type: ignore[arg-type]
    stopping = {k: v for k, v in options.items() if k in _STOPPING and v is not None}
    request.stopping.CopyFrom(pb.StoppingCriteria(**stopping))  # type: ignore[arg-type]
    return request
