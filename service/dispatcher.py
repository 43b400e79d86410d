"""Admission, routing and fan-out: requests go to the least-loaded ready worker, step outputs come back.

MLServer's shape: futures (here, per-request streams) keyed by request id and a
worker -> in-flight map, so a dead worker's requests fail at once with
UNAVAILABLE and the pool restarts it with back-off. vLLM's shape for the way
back: every step output is fanned out, from the event loop, to per-request
streams that never block the fan-out; a slow reader gets several steps' events
merged into one read.

Admission comes first and costs nothing: a caller takes a `Ticket` (or gets
RESOURCE_EXHAUSTED / UNAVAILABLE at once) before its prompt is tokenized, and
the ticket counts against the model's capacity until the request is submitted
to a worker or given up.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from service import metrics
from service.config import ModelConfig, ServerConfig
from service.errors import ResourceExhausted, ServiceError, Unavailable, from_worker
from service.worker_handle import WorkerHandle, WorkerState
from service.worker_inbox import InboxClosed
from workers.messages import (
    AbortCall,
    FinishReason,
    GenerateCall,
    SequenceEvent,
    StepOutput,
    WorkerReady,
)

_LOGGER = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """How a request left the dispatcher; decides what it counts towards."""

    FINISHED = "finished"  # its last event arrived: end-to-end latency, the worker's completed count
    ABORTED = "aborted"  # the caller went away (cancelled, deadline, write failed)
    FAILED = "failed"  # its worker died, or the server stopped under it


@dataclass
class Timings:
    arrival: float
    start: float | None = None
    first_token: float | None = None
    last_token: float | None = None

    @property
    def queue_seconds(self) -> float:
        return (self.start - self.arrival) if self.start else 0.0

    @property
    def time_to_first_token_seconds(self) -> float:
        return (self.first_token - self.arrival) if self.first_token else 0.0

    @property
    def total_seconds(self) -> float:
        return (self.last_token or time.time()) - self.arrival


class RequestStream:
    """The events of one request, read by its RPC handler; filled by the dispatcher.

    A stream's reader is woken only when what it waits for is there: its first token at once, then
    `stream_interval` tokens at a time (vLLM's stream interval: fewer messages, and fewer wake-ups of the
    handler, per token), or the request's end, whichever comes first. A reader that falls behind gets all that
    arrived meanwhile in one read."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        request_id: int,
        series: metrics.ModelSeries,
        worker: WorkerHandle,
        arrival: float,
        stream_interval: int = 1,
    ):
        self._dispatcher = dispatcher
        self.request_id = request_id
        self.series = series
        self.worker = worker
        self.timings = Timings(arrival=arrival)
        self.finished = False
        # Usage for the access log and the trace: set at submit and by each event.
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._interval = stream_interval
        self._events: list[SequenceEvent] = []
        self._event_tokens = 0  # tokens in `_events`
        self._delivered_tokens = 0
        self._want = 1  # tokens the reader waits for
        self._failure: ServiceError | None = None
        self._wakeup = asyncio.Event()

    def _put(self, event: SequenceEvent) -> None:
        self._events.append(event)
        self._event_tokens += len(event.token_ids)
        if event.finished or self._event_tokens >= self._want:
            self._wakeup.set()

    def _fail(self, error: ServiceError) -> None:
        self._failure = error
        self._wakeup.set()

    async def next_events(self) -> list[SequenceEvent]:
        """What one stream message carries: the events that arrived since the last call, once they hold the first
        token, then at least `stream_interval` tokens, or the finishing event (which then ends the list). Raises
        the request's failure (a worker error, a dead worker) once the events before it are read."""
        return await self._take(self._message_tokens())

    def _message_tokens(self) -> int:
        """Tokens the next stream message waits for: the first alone, then `stream_interval`."""
        return self._interval if self._delivered_tokens else 1

    async def all_events(self) -> list[SequenceEvent]:
        """Every event of the request, once its last has arrived (the reader is not woken before); raises the
        request's failure rather than return part of it."""
        events = await self._take(sys.maxsize)
        while not events[-1].finished:  # a failure handed over the events before it: the next take raises it
            events.extend(await self._take(sys.maxsize))
        return events

    async def _take(self, tokens: int) -> list[SequenceEvent]:
        self._want = tokens
        while not (self._events and (self._events[-1].finished or self._event_tokens >= tokens or self._failure)):
            if self._failure is not None:
                raise self._failure
            self._wakeup.clear()
            await self._wakeup.wait()
        events, self._events = self._events, []
        self._delivered_tokens += self._event_tokens
        self._event_tokens = 0
        # What the next read will wait for, already known to the events that arrive before it starts.
        self._want = self._message_tokens()
        for event in events:
            if event.finish_reason is FinishReason.ERROR:
                raise from_worker(event.error_kind, event.error)
        return events

    def close(self) -> None:
        """Called when the handler is done, however it ended: an unfinished request is aborted in its worker."""
        if not self.finished:
            self._dispatcher.abort(self.request_id)


class Ticket:
    """A place in a model's capacity, taken before the request is tokenized; `submit` or `release` ends it."""

    def __init__(self, pool: ModelPool):
        self.pool = pool
        self.active = True
        pool.admitting += 1

    def release(self) -> None:
        if self.active:
            self.active = False
            self.pool.admitting -= 1


class ModelPool:
    """The workers of one model."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.workers: list[WorkerHandle] = []
        self.series = metrics.ModelSeries(config.name)
        # Admitted requests still being tokenized: they count against the capacity like outstanding ones.
        self.admitting = 0

    @property
    def ready_workers(self) -> list[WorkerHandle]:
        return [w for w in self.workers if w.state is WorkerState.READY]

    @property
    def outstanding(self) -> int:
        return sum(len(w.outstanding) for w in self.workers)

    def pick(self) -> WorkerHandle | None:
        ready = self.ready_workers
        # Least outstanding work first; ties go to the emptier running batch.
        return min(ready, key=lambda w: (len(w.outstanding), w.running)) if ready else None

    def admits_more(self) -> bool:
        capacity = len(self.ready_workers) * self.config.max_batch_size + self.config.max_queue
        return self.outstanding + self.admitting < capacity


class Dispatcher:
    def __init__(
        self,
        config: ServerConfig,
        loop: asyncio.AbstractEventLoop,
        on_readiness: Callable[[bool], None] = lambda ready: None,
    ):
        self.config = config
        self._loop = loop
        self._on_readiness = on_readiness
        self.pools = {m.name: ModelPool(m) for m in config.models}
        self._streams: dict[int, RequestStream] = {}
        self._ids = itertools.count(1)
        self._closing = False
        self._drained = asyncio.Event()
        self._all_ready = False

    # ------------------------------------------------------------ workers

    def start(self, model_paths: dict[str, str]) -> None:
        for name, pool in self.pools.items():
            for spec in self.config.worker_specs(pool.config, model_paths[name]):
                handle = WorkerHandle(
                    spec, self._loop, self._on_message, self._on_exit, load_timeout_s=self.config.worker_load_timeout_s
                )
                pool.workers.append(handle)
                # Series that read 0 from the start, so that "restarts" and "up" have data before anything happens.
                metrics.WORKER_RESTARTS.labels(name, handle.key)
                metrics.WORKER_UP.labels(name, handle.key).set(0)
                handle.start()

    @property
    def all_models_ready(self) -> bool:
        return all(pool.ready_workers for pool in self.pools.values())

    def _readiness_changed(self) -> None:
        ready = self.all_models_ready and not self._closing
        if ready != self._all_ready:
            self._all_ready = ready
            self._on_readiness(ready)

    def _on_message(self, handle: WorkerHandle, message) -> None:
        model = handle.spec.model_name
        if isinstance(message, StepOutput):
            self._on_step(handle, message)
        elif isinstance(message, WorkerReady):
            _LOGGER.info(
                "worker %s ready (pid %d, dtype %s, devices %s)",
                handle.key,
                message.pid,
                message.dtype,
                message.devices,
            )
            metrics.WORKER_UP.labels(model, handle.key).set(1)
            metrics.WORKER_LOAD_SECONDS.labels(model, handle.key).set(message.load_seconds)
            metrics.record_memory(model, handle.key, message.memory, handle.spec.cuda_visible_devices)
            self._readiness_changed()

    def _on_exit(self, handle: WorkerHandle) -> None:
        model = handle.spec.model_name
        metrics.WORKER_UP.labels(model, handle.key).set(0)
        metrics.WORKER_RUNNING.labels(model, handle.key).set(0)
        handle.running = handle.waiting = 0
        self._update_model_gauges(self.pools[model])
        error = Unavailable(f"worker {handle.key} of model {model!r} died: {handle.last_error}")
        for request_id in list(handle.outstanding):
            self._retire(request_id, Outcome.FAILED)._fail(error)
        self._readiness_changed()
        if self._closing:
            return
        delay = handle.next_backoff(self.config.restart_backoff_s, self.config.restart_backoff_max_s)
        _LOGGER.warning("restarting worker %s in %.1f s", handle.key, delay)
        self._loop.call_later(delay, self._restart, handle)

    def _restart(self, handle: WorkerHandle) -> None:
        if self._closing or handle.state is not WorkerState.RESTARTING:
            return
        handle.restarts += 1
        metrics.WORKER_RESTARTS.labels(handle.spec.model_name, handle.key).inc()
        try:
            handle.start()
        except Exception as exc:  # noqa: BLE001  (spawn can fail: out of memory, too many open files)
            handle.state, handle.last_error = WorkerState.RESTARTING, f"restart failed: {exc}"
            delay = handle.next_backoff(self.config.restart_backoff_s, self.config.restart_backoff_max_s)
            _LOGGER.error("restarting worker %s failed (%s); next try in %.1f s", handle.key, exc, delay)
            self._loop.call_later(delay, self._restart, handle)

    # ------------------------------------------------------------ requests

    def admit(self, model: str) -> Ticket:
        """A place for one request of `model`, before any work is spent on it; raises RESOURCE_EXHAUSTED or
        UNAVAILABLE at once when there is none."""
        pool = self.pools[model]
        self._check_available(pool)
        if not pool.admits_more():
            raise ResourceExhausted(
                f"model {model!r} has {pool.outstanding + pool.admitting} requests outstanding, its limit "
                f"(max_batch_size x ready workers + max_queue); retry later"
            )
        return Ticket(pool)

    def _check_available(self, pool: ModelPool) -> WorkerHandle:
        if self._closing:
            raise Unavailable("the server is shutting down")
        worker = pool.pick()
        if worker is None:
            raise Unavailable(f"no worker of model {pool.config.name!r} is ready")
        return worker

    def submit(self, ticket: Ticket, call_args: dict) -> RequestStream:
        """Send an admitted request to the least-loaded ready worker; the ticket ends here, whatever happens."""
        if not ticket.active:
            raise RuntimeError("a ticket admits one request")
        pool = ticket.pool
        ticket.release()
        worker = self._check_available(pool)  # workers may have died or the server begun to stop meanwhile
        request_id = next(self._ids)
        call = GenerateCall(request_id=request_id, arrival_time=time.time(), **call_args)
        stream = RequestStream(self, request_id, pool.series, worker, call.arrival_time, pool.config.stream_interval)
        stream.prompt_tokens = prompt_tokens = len(call.prompt_token_ids)
        self._streams[request_id] = stream
        worker.outstanding.add(request_id)
        pool.series.in_flight.inc()
        try:
            worker.send(call)
        except InboxClosed as exc:
            self._retire(request_id, Outcome.FAILED)
            raise Unavailable(f"worker {worker.key} of model {pool.config.name!r} is gone; retry") from exc
        pool.series.prompt_tokens.inc(prompt_tokens)
        pool.series.prompt_length.observe(prompt_tokens)
        return stream

    def abort(self, request_id: int) -> None:
        if request_id not in self._streams:
            return
        self._abort_in_worker(self._retire(request_id, Outcome.ABORTED))

    @staticmethod
    def _abort_in_worker(stream: RequestStream) -> None:
        if stream.worker.state is not WorkerState.STOPPED:
            with contextlib.suppress(InboxClosed):  # the worker is gone with the request
                stream.worker.send(AbortCall(stream.request_id))

    def _on_step(self, handle: WorkerHandle, output: StepOutput) -> None:
        model = handle.spec.model_name
        handle.running, handle.waiting = output.running, output.waiting
        metrics.record_step(model, handle.key, output, handle.spec.cuda_visible_devices)
        self._update_model_gauges(self.pools[model])
        now = time.time()
        for event in output.events:
            stream = self._streams.get(event.request_id)
            if stream is None:
                continue  # aborted meanwhile
            self._record_progress(stream, event, now)
            stream.completion_tokens = max(stream.completion_tokens, event.completion_tokens)
            if event.finished:
                stream.finished = True
                failed = event.finish_reason is FinishReason.ERROR
                if not failed:
                    stream.series.generation_length.observe(event.completion_tokens)
                self._retire(event.request_id, Outcome.FAILED if failed else Outcome.FINISHED)
            stream._put(event)

    @staticmethod
    def _update_model_gauges(pool: ModelPool) -> None:
        metrics.RUNNING.labels(pool.config.name).set(sum(w.running for w in pool.workers))
        metrics.QUEUED.labels(pool.config.name).set(sum(w.waiting for w in pool.workers))

    def _record_progress(self, stream: RequestStream, event: SequenceEvent, now: float) -> None:
        t, series = stream.timings, stream.series
        if event.start_time is not None and t.start is None:
            t.start = event.start_time
            series.queue_time.observe(max(0.0, t.start - t.arrival))
        if not event.token_ids:
            return
        if t.first_token is None:
            t.first_token = now
            series.time_to_first_token.observe(now - t.arrival)
        elif t.last_token is not None:
            series.inter_token_latency.observe(now - t.last_token)
        t.last_token = now
        series.generation_tokens.inc(len(event.token_ids))

    def _retire(self, request_id: int, outcome: Outcome) -> RequestStream:
        """The one way a request leaves the dispatcher: its stream, its worker's in-flight set, the gauges.
        Only finished requests count as completed and in the end-to-end latency."""
        stream = self._streams.pop(request_id)
        if self._closing and not self._streams:
            self._drained.set()
        stream.worker.outstanding.discard(request_id)
        stream.series.in_flight.dec()
        if outcome is Outcome.FINISHED:
            stream.worker.completed += 1
            stream.series.e2e_latency.observe(time.time() - stream.timings.arrival)
        return stream

    # ------------------------------------------------------------ shutdown

    def begin_shutdown(self) -> None:
        """From now on new requests are UNAVAILABLE; accepted ones go on."""
        self._closing = True
        if not self._streams:
            self._drained.set()
        self._readiness_changed()

    async def wait_drained(self, timeout: float) -> bool:
        """Wait until every accepted request has finished; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
            return True
        except TimeoutError:
            return False

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    def fail_in_flight(self, reason: str) -> None:
        """Every request still in flight ends now with UNAVAILABLE (drain timeout, or told to stop at once)."""
        for request_id in list(self._streams):
            stream = self._retire(request_id, Outcome.FAILED)
            stream._fail(Unavailable(reason))
            self._abort_in_worker(stream)

    async def stop_workers(self, timeout: float = 10.0) -> None:
        """Stop every worker, terminating those that do not exit within `timeout` seconds."""
        self._closing = True
        self.fail_in_flight("the server stopped")
        handles = [w for pool in self.pools.values() for w in pool.workers]
        await asyncio.gather(*(asyncio.to_thread(w.stop, timeout) for w in handles))
