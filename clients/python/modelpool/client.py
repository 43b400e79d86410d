"""Sync and asyncio clients over the generated stubs; no torch needed.

    from modelpool import Client
    with Client("127.0.0.1:50051", timeout=30) as client:
        print(client.chat([("user", "What is the capital of France?")]).text)
        for piece in client.stream("Once upon a time", max_new_tokens=32):
            print(piece.text_delta, end="", flush=True)

Every failed call raises `ModelpoolError` (status code, message, request id). Unary calls are retried on
UNAVAILABLE (and CANCELLED, see `channel.RETRYABLE_CODES`) by gRPC's own retry policy (`retries` attempts in all);
streams never are. Breaking out of a stream, or dropping
it, cancels the call, which frees its slot on the server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from modelpool.channel import TLS, ChannelOptions, aio_channel, as_tls, channel_options, sync_channel
from modelpool.errors import ModelpoolError
from modelpool.request import Message, build_request
from modelpool.v1 import generation_pb2 as pb
from modelpool.v1 import generation_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from modelpool.request import Options

Metadata = Sequence[tuple[str, str]]
DEFAULT_ATTEMPTS = 3


class _CallSettings:
    """What every call of one client shares: default deadline, wait-for-ready and metadata (token included)."""

    def __init__(self, timeout: float | None, wait_for_ready: bool | None, token: str | None, metadata: Metadata):
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        self.metadata = list(metadata) + ([("authorization", f"Bearer {token}")] if token else [])

    def kwargs(self, timeout: float | None, wait_for_ready: bool | None, metadata: Metadata) -> dict[str, Any]:
        return {
            "timeout": self.timeout if timeout is None else timeout,
            "wait_for_ready": self.wait_for_ready if wait_for_ready is None else wait_for_ready,
            "metadata": tuple(self.metadata) + tuple(metadata),
        }


class Stream(Iterator[pb.StreamGenerateResponse]):
    """The messages of one StreamGenerate call. Dropping it (as breaking out of a `for` loop does) or `cancel()`
    cancels the call; a failure raises `ModelpoolError`."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> pb.StreamGenerateResponse:
        try:
            response: pb.StreamGenerateResponse = next(self._call)
        except grpc.RpcError as exc:
            raise ModelpoolError.from_rpc_error(exc) from None
        return response

    def cancel(self) -> None:
        self._call.cancel()

    def close(self) -> None:
        """The same as `cancel()`, as for a generator."""
        self.cancel()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        call = getattr(self, "_call", None)
        if call is not None:
            call.cancel()


class AsyncStream(AsyncIterator[pb.StreamGenerateResponse]):
    """The messages of one StreamGenerate call, for `async for`. Dropping it, `cancel()` or leaving
    `async with` cancels the call; a failure raises `ModelpoolError`."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> pb.StreamGenerateResponse:
        try:
            response = await self._call.read()
        except grpc.RpcError as exc:
            raise ModelpoolError.from_rpc_error(exc) from None
        if response is grpc.aio.EOF:
            raise StopAsyncIteration
        result: pb.StreamGenerateResponse = response
        return result

    def cancel(self) -> None:
        self._call.cancel()

    async def aclose(self) -> None:
        """The same as `cancel()`, as for an async generator."""
        self.cancel()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        call = getattr(self, "_call", None)
        if call is not None and not call.done():
            call.cancel()


class Client:
    """Blocking client.

    `timeout`: default deadline of each call in seconds; `wait_for_ready`: queue calls while the channel is not
    yet connected instead of failing at once; `tls`: True (system roots) or a `TLS`; `token`: sent as
    `authorization: Bearer <token>`; `metadata`: sent with every call; `retries`: attempts in all for unary
    calls answered UNAVAILABLE (1 = none, gRPC caps it at 5); `load_balancing`: gRPC's policy over the target's
    addresses, e.g. "round_robin" with `dns:///modelpool.ns.svc:50051` (a headless Service) or
    `ipv4:10.0.0.1:50051,10.0.0.2:50051`; `options`: extra gRPC channel options."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
        tls: TLS | bool | None = None,
        token: str | None = None,
        metadata: Metadata = (),
        retries: int = DEFAULT_ATTEMPTS,
        load_balancing: str | None = None,
        options: ChannelOptions = (),
        channel: grpc.Channel | None = None,
    ) -> None:
        security = as_tls(tls)
        options = channel_options(retries, security, options, load_balancing)
        self._channel = channel or sync_channel(target, security, options)
        self._stub = pb_grpc.GenerationServiceStub(self._channel)
        self._settings = _CallSettings(timeout, wait_for_ready, token, metadata)

    def _unary(self, method: Any, request: Any, timeout: float | None, ready: bool | None, metadata: Metadata) -> Any:
        try:
            return method(request, **self._settings.kwargs(timeout, ready, metadata))
        except grpc.RpcError as exc:
            raise ModelpoolError.from_rpc_error(exc) from None

    def generate(
        self,
        prompt: str,
        *,
        model: str = "",
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
        metadata: Metadata = (),
        **options: Unpack[Options],
    ) -> pb.GenerateResponse:
        request = build_request(pb.GenerateRequest, prompt, model=model, **options)
        response: pb.GenerateResponse = self._unary(self._stub.Generate, request, timeout, wait_for_ready, metadata)
        return response

    def chat(
        self,
        messages: Iterable[Message],
        *,
        model: str = "",
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
        metadata: Metadata = (),
        **options: Unpack[Options],
    ) -> pb.GenerateResponse:
        request = build_request(pb.GenerateRequest, messages=messages, model=model, **options)
        response: pb.GenerateResponse = self._unary(self._stub.Generate, request, timeout, wait_for_ready, metadata)
        return response

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[Message] | None = None,
        model: str = "",
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
        metadata: Metadata = (),
        **options: Unpack[Options],
    ) -> Stream:
        """The stream of one generation, from a prompt or chat messages."""
        request = build_request(pb.StreamGenerateRequest, prompt, messages=messages, model=model, **options)
        return Stream(self._stub.StreamGenerate(request, **self._settings.kwargs(timeout, wait_for_ready, metadata)))

    def models(
        self,
        *,
        include_placement: bool = False,
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
        metadata: Metadata = (),
    ) -> list[pb.ModelInfo]:
        """The served models and their workers; `include_placement` adds each ready worker's placement (module
        groups, devices, memory per device) as `WorkerInfo.placement`."""
        request = pb.ListModelsRequest(include_placement=include_placement)
        response: pb.ListModelsResponse = self._unary(self._stub.ListModels, request, timeout, wait_for_ready, metadata)
        return list(response.models)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient:
    """asyncio client (grpc.aio); the same arguments as `Client`."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
        tls: TLS | bool | None = None,
        token: str | None = None,
        metadata: Metadata = (),
        retries: int = DEFAULT_ATTEMPTS,
        load_balancing: str | None = None,
        options: ChannelOptions = (),
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        security = as_tls(tls)
        options = channel_options(retries, security, options, load_balancing)
        self._channel = channel or aio_channel(target, security, options)
        self._stub = pb_grpc.GenerationServiceStub(self._channel)
        self._settings = _CallSettings(timeout, wait_for_ready, token, metadata)

    async def _unary(
        self, method: Any, request: Any, timeout: float | None, ready: bool | None, metadata: Metadata
    ) -> Any:
        try:
            return await method(request, **self._settings.kwargs(timeout, ready, metadata))
        except grpc.RpcError as exc:
            raise ModelpoolError.from_rpc_error(exc) from None

    async def generate(
        self,
        prompt: str,
        *,
        model: str = "",
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
        metadata: Metadata = (),
        **options: Unpack[Options],
    ) -> pb.GenerateResponse:
        request = build_request(pb.GenerateRequest, prompt, model=model, **options)
        response: pb.GenerateResponse = await self._unary(
            self._stub.Generate, request, timeout, wait_for_ready, metadata
        )
        return response

    async def chat(
        self,
        messages: Iterable[Message],
        *,
        model: str = "",
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
        metadata: Metadata = (),
        **options: Unpack[Options],
    ) -> pb.GenerateResponse:
        request = build_request(pb.GenerateRequest, messages=messages, model=model, **options)
        response: pb.GenerateResponse = await self._unary(
            self._stub.Generate, request, timeout, wait_for_ready, metadata
        )
        return response

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[Message] | None = None,
        model: str = "",
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
        metadata: Metadata = (),
        **options: Unpack[Options],
    ) -> AsyncStream:
        """The stream of one generation (`async for piece in client.stream(...)`)."""
        request = build_request(pb.StreamGenerateRequest, prompt, messages=messages, model=model, **options)
        call = self._stub.StreamGenerate(request, **self._settings.kwargs(timeout, wait_for_ready, metadata))
        return AsyncStream(call)

    async def models(
        self,
        *,
        include_placement: bool = False,
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
        metadata: Metadata = (),
    ) -> list[pb.ModelInfo]:
        """The served models and their workers; `include_placement` adds each ready worker's placement (module
        groups, devices, memory per device) as `WorkerInfo.placement`."""
        request = pb.ListModelsRequest(include_placement=include_placement)
        response: pb.ListModelsResponse = await self._unary(
            self._stub.ListModels, request, timeout, wait_for_ready, metadata
        )
        return list(response.models)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
