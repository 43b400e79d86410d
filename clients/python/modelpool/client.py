"""Thin sync and asyncio clients over the generated stubs; no torch needed.

from modelpool import Client
with Client("127.0.0.1:50051") as client:
    print(client.chat([("user", "What is the capital of France?")]).text)
    for piece in client.stream("Once upon a time", max_new_tokens=32):
        print(piece.text_delta, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence

import grpc

from modelpool.v1 import generation_pb2 as pb
from modelpool.v1 import generation_pb2_grpc as pb_grpc

Message = Mapping[str, str] | Sequence[str]
_ROLES = {"system": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT}
_SAMPLING = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed")
_STOPPING = ("max_new_tokens", "min_new_tokens", "stop_sequences", "ignore_eos")


def _chat(messages: Iterable[Message]) -> pb.ChatMessages:
    chat = pb.ChatMessages()
    for message in messages:
        role, content = (message["role"], message["content"]) if isinstance(message, Mapping) else message
        if role not in _ROLES:
            raise ValueError(f"unknown role {role!r}: use one of {sorted(_ROLES)}")
        chat.messages.add(role=_ROLES[role], content=content)
    return chat


def build_request(
    cls=pb.GenerateRequest,
    prompt: str | None = None,
    *,
    messages: Iterable[Message] | None = None,
    model: str = "",
    **options,
):
    """A GenerateRequest or StreamGenerateRequest from a prompt or (role, content) messages and keyword options:
    do_sample, temperature, top_p, top_k, repetition_penalty, seed, max_new_tokens, min_new_tokens,
    stop_sequences, ignore_eos."""
    unknown = set(options) - set(_SAMPLING) - set(_STOPPING)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}")
    if (prompt is None) == (messages is None):
        raise ValueError("give either a prompt or messages")
    request = cls(model=model)
    if prompt is not None:
        request.prompt = prompt
    else:
        request.chat.CopyFrom(_chat(messages or ()))
    sampling = {k: v for k, v in options.items() if k in _SAMPLING and v is not None}
    # A temperature above 0 asks for sampling; 0 keeps greedy decoding (the server reads 0 as "unset").
    if sampling.get("temperature", 0) > 0 and "do_sample" not in sampling:
        sampling["do_sample"] = True
    request.sampling.CopyFrom(pb.SamplingParameters(**sampling))
    stopping = {k: v for k, v in options.items() if k in _STOPPING and v is not None}
    request.stopping.CopyFrom(pb.StoppingCriteria(**stopping))
    return request


class Client:
    """Blocking client. `timeout` is the default deadline of each call, in seconds."""

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float | None = None, channel=None):
        self._channel = channel or grpc.insecure_channel(target)
        self._stub = pb_grpc.GenerationServiceStub(self._channel)
        self.timeout = timeout

    def generate(self, prompt: str, *, model: str = "", timeout: float | None = None, **options) -> pb.GenerateResponse:
        request = build_request(pb.GenerateRequest, prompt, model=model, **options)
        return self._stub.Generate(request, timeout=timeout or self.timeout)

    def chat(self, messages: Iterable[Message], *, model: str = "", timeout: float | None = None, **options):
        request = build_request(pb.GenerateRequest, messages=messages, model=model, **options)
        return self._stub.Generate(request, timeout=timeout or self.timeout)

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[Message] | None = None,
        model: str = "",
        timeout: float | None = None,
        **options,
    ) -> Iterator[pb.StreamGenerateResponse]:
        """Yields stream messages; breaking out of the loop cancels the call on the server."""
        request = build_request(pb.StreamGenerateRequest, prompt, messages=messages, model=model, **options)
        call = self._stub.StreamGenerate(request, timeout=timeout or self.timeout)
        try:
            yield from call
        finally:
            call.cancel()

    def models(self, timeout: float | None = None) -> list[pb.ModelInfo]:
        return list(self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout or self.timeout).models)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """asyncio client (grpc.aio). `timeout` is the default deadline of each call, in seconds."""

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout: float | None = None, channel=None):
        self._channel = channel or grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.GenerationServiceStub(self._channel)
        self.timeout = timeout

    async def generate(self, prompt: str, *, model: str = "", timeout: float | None = None, **options):
        request = build_request(pb.GenerateRequest, prompt, model=model, **options)
        return await self._stub.Generate(request, timeout=timeout or self.timeout)

    async def chat(self, messages: Iterable[Message], *, model: str = "", timeout: float | None = None, **options):
        request = build_request(pb.GenerateRequest, messages=messages, model=model, **options)
        return await self._stub.Generate(request, timeout=timeout or self.timeout)

    async def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[Message] | None = None,
        model: str = "",
        timeout: float | None = None,
        **options,
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        request = build_request(pb.StreamGenerateRequest, prompt, messages=messages, model=model, **options)
        call = self._stub.StreamGenerate(request, timeout=timeout or self.timeout)
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()

    async def models(self, timeout: float | None = None) -> list[pb.ModelInfo]:
        response = await self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout or self.timeout)
        return list(response.models)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
