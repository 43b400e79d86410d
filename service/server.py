"""The server process: gRPC (generation, health, reflection), /metrics, workers, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service import metrics, model_source, tracing
from service.auth import AuthInterceptor, load_tokens
from service.config import LimitsConfig, ServerConfig
from service.convert import RequestLimits
from service.dispatcher import Dispatcher
from service.served_model import ServedModel
from service.servicer import SERVICE_NAME, GenerationServicer, rpc_handlers
from service.tls import CertificateFiles, metrics_ssl_context

_LOGGER = logging.getLogger(__name__)
T = TypeVar("T")


async def serve(config: ServerConfig) -> None:
    loop = asyncio.get_running_loop()
    # Before anything slow: a broken tokens file should fail the start at once.
    tokens = load_tokens(config.auth)
    health_servicer = health.aio.HealthServicer()

    async def set_health(serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, status)

    health_updates: set[asyncio.Task] = set()

    def on_readiness(ready: bool) -> None:
        _LOGGER.info("health: %s", "SERVING" if ready else "NOT_SERVING")
        task = loop.create_task(set_health(ready))
        health_updates.add(task)  # the loop keeps only weak references to its tasks
        task.add_done_callback(health_updates.discard)

    await set_health(False)
    # Fetching or converting a model can take a while: keep the loop free for nothing else yet, but off it.
    paths = {}
    for model_config in config.models:
        paths[model_config.name] = await _in_daemon_thread(
            model_source.resolve, model_config.source, model_config.revision
        )
    # Workers start as soon as every model's folder is known, so that their start (importing torch, loading the
    # weights: most of the time to SERVING) overlaps the frontend's own reading of each model's config and tokenizer.
    dispatcher = Dispatcher(config, loop, on_readiness)
    dispatcher.start({name: str(path) for name, path in paths.items()})
    models = {}
    try:
        for model_config in config.models:
            models[model_config.name] = await _in_daemon_thread(
                ServedModel.load, model_config, paths[model_config.name]
            )
    except BaseException:
        # A model the frontend cannot serve fails the start; its workers (already loading) go with it.
        await dispatcher.stop_workers(timeout=2.0)
        raise

    limits = config.limits
    interceptors = []
    if tokens:
        interceptors.append(AuthInterceptor(tokens, config.default_model_name, config.auth.max_in_flight_per_token))
    server = grpc.aio.server(interceptors=interceptors, options=_grpc_options(limits))
    request_limits = RequestLimits(limits.max_chat_messages, limits.max_stop_sequences, limits.max_stop_sequence_chars)
    servicer = GenerationServicer(models, dispatcher, config.default_model_name, request_limits)
    server.add_generic_rpc_handlers((rpc_handlers(servicer, limits.max_receive_message_bytes),))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
        )
    certificates = CertificateFiles(config.tls) if config.tls.enabled else None
    listen = f"{config.host}:{config.port}"
    if certificates is None:
        port = server.add_insecure_port(listen)
    else:
        port = server.add_secure_port(listen, certificates.server_credentials())
        loop.add_signal_handler(signal.SIGHUP, certificates.request_reload)
    if port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port}")
    address = f"{config.host}:{port}"  # the bound port, when 0 asked for any
    metrics_tls = metrics_ssl_context(certificates) if certificates is not None and config.tls.metrics else None
    metrics.record_build_info()
    if config.metrics_port:
        metrics.serve(config.metrics_host, config.metrics_port, metrics_tls)
    tracing.configure()
    await server.start()
    _LOGGER.info(
        "serving %s on %s (%s%s%s; metrics on %s)",
        ", ".join(models),
        address,
        "mutual TLS" if config.tls.client_ca else "TLS" if certificates else "plaintext",
        f", token auth ({len(tokens)} tokens)" if tokens else "",
        "" if config.reflection else ", no reflection",
        f"{'https' if metrics_tls is not None else 'http'}://{config.metrics_host}:{config.metrics_port}/metrics"
        if config.metrics_port
        else "off",
    )

    # The first SIGTERM (or SIGINT) drains; a second one stops at once.
    stop, stop_now = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            _LOGGER.warning("second signal: stopping now")
            stop_now.set()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()

    _LOGGER.info(
        "shutting down: %d requests in flight, draining up to %.0f s", dispatcher.in_flight, config.drain_timeout_s
    )
    started = loop.time()
    # The listener stays open while draining, so that new calls get a clear UNAVAILABLE from us rather
    # than whatever a closing transport says; accepted ones finish.
    dispatcher.begin_shutdown()
    await health_servicer.enter_graceful_shutdown()
    drained = await _first(dispatcher.wait_drained(config.drain_timeout_s), stop_now.wait())
    if not drained:
        why = "told to stop now" if stop_now.is_set() else f"drain timeout ({config.drain_timeout_s:g} s)"
        _LOGGER.warning("%s: ending %d requests with UNAVAILABLE", why, dispatcher.in_flight)
        dispatcher.fail_in_flight(f"the server is shutting down: {why}")
    # A little grace for handlers still writing their last message.
    grace = 1.0 if stop_now.is_set() else max(1.0, config.drain_timeout_s - (loop.time() - started))
    await server.stop(grace)
    await dispatcher.stop_workers(timeout=2.0 if stop_now.is_set() else 10.0)
    tracing.shutdown()
    _LOGGER.info("stopped")


def _grpc_options(limits: LimitsConfig) -> list[tuple[str, int]]:
    # gRPC's own size check answers with a message that does not name our limit; ours (in the request
    # deserializers) does, so gRPC's is set above it and only guards memory against a far larger message.
    options = [("grpc.max_receive_message_length", 2 * limits.max_receive_message_bytes + 1024 * 1024)]
    if limits.max_concurrent_streams:
        # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: a client's calls beyond it wait for a free stream.
        options.append(("grpc.max_concurrent_streams", limits.max_concurrent_streams))
    return options


async def _in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a daemon thread. Not asyncio.to_thread: the interpreter waits for the default executor's
    threads at exit, so Ctrl-C during a long model download would wait for the whole download; a daemon thread is
    simply dropped (a partial download is resumed by the next start or `modelpool pull`)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # the awaiting task was cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        result, error = None, None
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 (re-raised in the awaiting task)
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for it any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=f"load-{getattr(fn, '__qualname__', 'model')}", daemon=True).start()
    return await future


async def _first(drain, interrupt) -> bool:
    """The result of `drain`, or False when `interrupt` finishes first."""
    tasks = [asyncio.ensure_future(drain), asyncio.ensure_future(interrupt)]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return tasks[0] in done and bool(tasks[0].result())
