"""Unit tests of service.dispatcher (Dispatcher, Ticket, RequestStream) against fake worker handles.

No model, no subprocess, no gRPC server: fake handles go straight into `dispatcher.pools[...].workers`
instead of `Dispatcher.start`, and the tests call the callbacks a real WorkerHandle calls (`_on_message`
with StepOutputs, `_on_exit` after a death). What they pin down: admission counts tickets against
capacity; a request leaves the dispatcher exactly once whichever way it ends (finished, aborted, failed
by its worker, by a dead worker, by shutdown), restoring the in-flight gauge and the worker's outstanding
set, and only finished requests count as completed and in the end-to-end latency histogram; late events
are ignored; a slow reader gets its events merged without holding up anyone else.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import REGISTRY

from service import metrics
from service.config import ModelConfig, ServerConfig
from service.dispatcher import Dispatcher
from service.errors import ResourceExhausted, Unavailable
from service.worker_handle import WorkerState
from service.worker_inbox import InboxClosed
from workers.messages import AbortCall, ErrorKind, FinishReason, GenerateCall, SamplingParams, SequenceEvent
from workers.messages import StepOutput, StoppingParams, WorkerSpec

MODEL, OTHER = "unit-a", "unit-b"  # names no other test module uses: the Prometheus series are process-wide
LENGTH, ERROR = FinishReason.LENGTH, FinishReason.ERROR


class FakeWorker:
    """What the dispatcher touches of a WorkerHandle; records what is sent to it."""

    def __init__(self, model: str = MODEL, index: int = 0):
        self.spec = WorkerSpec(worker_key=f"{model}/{index}", model_name=model, model_path="", cuda_visible_devices="")
        self.state = WorkerState.READY
        self.outstanding: set[int] = set()
        self.running = self.waiting = self.completed = self.restarts = self.consecutive_failures = 0
        self.last_error = ""
        self.sent: list = []
        self.closed = False  # send raises InboxClosed, like a dead worker's inbox
        self.starts = 0

    @property
    def key(self) -> str:
        return self.spec.worker_key

    def send(self, message) -> None:
        if self.closed:
            raise InboxClosed("the worker's inbox is closed")
        self.sent.append(message)

    def next_backoff(self, initial: float, maximum: float) -> float:
        delay = min(maximum, initial * 2**self.consecutive_failures)
        self.consecutive_failures += 1
        return delay

    def start(self) -> None:
        self.starts += 1
        self.state, self.closed = WorkerState.STARTING, False

    def die(self, error: str) -> None:
        """What WorkerHandle._handle_exit does before it calls the dispatcher's on_exit."""
        self.closed, self.last_error, self.state = True, error, WorkerState.RESTARTING


def in_loop(test):
    """Run an `async def` test in a fresh event loop (pytest-asyncio is not installed); a hang fails it."""

    def run():
        asyncio.run(asyncio.wait_for(test(), 5))

    run.__name__ = test.__name__
    return run


def make(workers: int = 1, max_batch_size: int = 2, max_queue: int = 1, stream_interval: int = 1):
    """A dispatcher with `workers` ready fakes for MODEL and one for OTHER; call it inside the loop."""
    models = [
        ModelConfig(m, max_batch_size=max_batch_size, max_queue=max_queue, stream_interval=stream_interval)
        for m in (MODEL, OTHER)
    ]
    config = ServerConfig(restart_backoff_s=0.01, restart_backoff_max_s=0.01, models=models)
    dispatcher = Dispatcher(config, asyncio.get_running_loop())
    fakes = [FakeWorker(MODEL, i) for i in range(workers)]
    dispatcher.pools[MODEL].workers.extend(fakes)
    dispatcher.pools[OTHER].workers.append(FakeWorker(OTHER))
    return dispatcher, fakes


def args() -> dict:
    return {"prompt_token_ids": (1, 2, 3), "sampling": SamplingParams(), "stopping": StoppingParams(max_new_tokens=4)}


def submit(dispatcher: Dispatcher, model: str = MODEL):
    return dispatcher.submit(dispatcher.admit(model), args())


def step(dispatcher: Dispatcher, worker: FakeWorker, *events: SequenceEvent) -> None:
    dispatcher._on_message(worker, StepOutput(worker_key=worker.key, events=list(events)))


def token(request_id: int, token_id: int, finish: FinishReason = FinishReason.UNSPECIFIED) -> SequenceEvent:
    return SequenceEvent(request_id, token_ids=[token_id], finish_reason=finish, start_time=time.time())


def gauge(model: str = MODEL) -> float:
    return metrics.IN_FLIGHT.labels(model)._value.get()


def e2e_count(model: str = MODEL) -> float:
    return REGISTRY.get_sample_value("modelpool_e2e_request_latency_seconds_count", {"model": model}) or 0.0


@in_loop
async def test_finished_request_is_retired_and_counted():
    d, (w,) = make()
    in_flight, e2e = gauge(), e2e_count()
    stream = submit(d)
    rid = stream.request_id
    assert [type(m) for m in w.sent] == [GenerateCall] and w.sent[0].request_id == rid
    assert w.sent[0].prompt_token_ids == (1, 2, 3) and w.outstanding == {rid} and gauge() == in_flight + 1
    events = [token(rid, 7), token(rid, 8, LENGTH)]
    step(d, w, events[0])
    step(d, w, events[1])
    assert await stream.next_events() == events
    assert stream.finished and d.in_flight == 0 and w.outstanding == set() and gauge() == in_flight
    assert w.completed == 1 and e2e_count() == e2e + 1
    stream.close()  # a finished request is not aborted
    assert len(w.sent) == 1 and gauge() == in_flight and e2e_count() == e2e + 1


@in_loop
async def test_aborted_request_is_retired_but_not_counted():
    d, (w,) = make()
    in_flight, e2e = gauge(), e2e_count()
    stream = submit(d)
    step(d, w, token(stream.request_id, 7))
    stream.close()
    assert w.sent[1:] == [AbortCall(stream.request_id)]
    assert d.in_flight == 0 and w.outstanding == set() and gauge() == in_flight
    assert w.completed == 0 and e2e_count() == e2e
    stream.close()  # twice: nothing more
    assert len(w.sent) == 2 and gauge() == in_flight


@in_loop
async def test_worker_error_fails_the_request_without_counting_it():
    d, (w,) = make()
    in_flight, e2e = gauge(), e2e_count()
    stream = submit(d)
    kind = ErrorKind.RESOURCE_EXHAUSTED
    step(d, w, SequenceEvent(stream.request_id, finish_reason=ERROR, error_kind=kind, error="OOM"))
    with pytest.raises(ResourceExhausted, match="^OOM$"):
        await stream.next_events()
    assert d.in_flight == 0 and w.outstanding == set() and gauge() == in_flight
    assert w.completed == 0 and e2e_count() == e2e
    stream.close()  # the worker already dropped it: no AbortCall
    assert len(w.sent) == 1


@in_loop
async def test_admission_counts_tickets_against_capacity():
    d, (w, spare) = make(workers=2)  # 2 ready workers x 2 + 1 queued = 5 places
    pool = d.pools[MODEL]
    tickets = [d.admit(MODEL) for _ in range(5)]
    assert pool.admitting == 5 and pool.outstanding == 0
    with pytest.raises(ResourceExhausted, match=repr(MODEL)):
        d.admit(MODEL)
    d.admit(OTHER).release()  # another model's capacity is its own
    tickets[0].release()
    tickets[0].release()  # a second release gives nothing back
    assert pool.admitting == 4
    tickets[0] = d.admit(MODEL)  # the freed place
    with pytest.raises(ResourceExhausted):
        d.admit(MODEL)
    stream = d.submit(tickets.pop(), args())  # submitted: now outstanding instead of admitting
    assert pool.admitting == 4 and pool.outstanding == 1
    with pytest.raises(ResourceExhausted):
        d.admit(MODEL)
    step(d, stream.worker, token(stream.request_id, 1, LENGTH))
    tickets.append(d.admit(MODEL))  # the finished request's place
    spare.state = WorkerState.STARTING  # capacity follows the ready workers: now 3 places, 5 taken
    for t in tickets[:2]:
        t.release()
    with pytest.raises(ResourceExhausted):  # 3 still taken
        d.admit(MODEL)
    for t in tickets + tickets:
        t.release()
    assert pool.admitting == 0
    w.state = WorkerState.RESTARTING
    with pytest.raises(Unavailable, match=f"no worker of model {MODEL!r} is ready"):
        d.admit(MODEL)


@in_loop
async def test_requests_go_to_the_least_loaded_worker():
    d, (w0, w1) = make(workers=2)
    w0.running = 1  # equal outstanding: the emptier running batch wins
    first, second, third = submit(d), submit(d), submit(d)
    assert (first.worker, second.worker, third.worker) == (w1, w0, w1)
    assert w0.outstanding == {second.request_id} and w1.outstanding == {first.request_id, third.request_id}


@in_loop
async def test_submit_whose_send_fails_leaves_nothing_behind():
    d, (w,) = make()
    in_flight, pool = gauge(), d.pools[MODEL]
    ticket = d.admit(MODEL)
    w.closed = True
    with pytest.raises(Unavailable, match="is gone"):
        d.submit(ticket, args())
    assert d.in_flight == 0 and w.outstanding == set() and gauge() == in_flight
    assert not ticket.active and pool.admitting == 0 and w.sent == []
    w.closed = False
    for _ in range(3):  # all 3 places are free again
        submit(d)
    assert d.in_flight == 3


@in_loop
async def test_dead_worker_fails_its_requests_and_is_restarted():
    d, (w,) = make()
    in_flight, e2e = gauge(), e2e_count()
    streams = [submit(d), submit(d)]
    w.die("exit code -9")
    d._on_exit(w)
    for stream in streams:
        with pytest.raises(Unavailable, match="died: exit code -9"):
            await stream.next_events()
    assert d.in_flight == 0 and w.outstanding == set() and gauge() == in_flight
    assert w.completed == 0 and e2e_count() == e2e
    for stream in streams:
        stream.close()  # nothing more is sent to the dead worker, and nothing raises
    assert [type(m) for m in w.sent] == [GenerateCall, GenerateCall]
    with pytest.raises(Unavailable):
        d.admit(MODEL)
    assert w.starts == 0
    await asyncio.sleep(0.1)  # restart_backoff_s is 0.01
    assert w.starts == 1 and w.restarts == 1 and w.state is WorkerState.STARTING


@in_loop
async def test_late_events_of_a_retired_request_are_ignored():
    d, (w,) = make()
    a, b = submit(d), submit(d)
    a.close()
    in_flight, e2e = gauge(), e2e_count()
    b_event = token(b.request_id, 6)
    aborted = SequenceEvent(a.request_id, finish_reason=FinishReason.ABORTED)
    step(d, w, token(a.request_id, 5), b_event, aborted, token(999, 1, LENGTH))
    assert await b.next_events() == [b_event]
    with pytest.raises(asyncio.TimeoutError):  # nothing was delivered to the aborted stream
        await asyncio.wait_for(a.next_events(), 0.05)
    assert d.in_flight == 1 and w.outstanding == {b.request_id} and gauge() == in_flight
    assert w.completed == 0 and e2e_count() == e2e
    assert w.sent[2:] == [AbortCall(a.request_id)]


@in_loop
async def test_shutdown_refuses_new_requests():
    d, (w,) = make()
    ticket = d.admit(MODEL)
    d.begin_shutdown()
    with pytest.raises(Unavailable, match="shutting down"):
        d.admit(MODEL)
    with pytest.raises(Unavailable, match="shutting down"):  # admitted before, submitted after
        d.submit(ticket, args())
    assert not ticket.active and d.pools[MODEL].admitting == 0 and w.sent == [] and d.in_flight == 0
    assert await d.wait_drained(0.05) is True


@in_loop
async def test_wait_drained_follows_the_last_request():
    d, (w,) = make()
    a, b = submit(d), submit(d)
    d.begin_shutdown()
    assert await d.wait_drained(0.05) is False
    waiter = asyncio.ensure_future(d.wait_drained(5))
    step(d, w, token(a.request_id, 1, LENGTH))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    step(d, w, token(b.request_id, 2, LENGTH))
    assert await waiter is True
    assert [e.token_ids for e in await b.next_events()] == [[2]]  # accepted requests still get their events


@in_loop
async def test_fail_in_flight_ends_every_stream():
    d, (w,) = make()
    other = d.pools[OTHER].workers[0]
    in_flight, in_flight_other = gauge(), gauge(OTHER)
    done, a, b = submit(d), submit(d), submit(d, OTHER)
    step(d, w, token(done.request_id, 1, LENGTH))
    d.begin_shutdown()
    d.fail_in_flight("drain timeout (30 s)")
    for stream in (a, b):
        with pytest.raises(Unavailable, match=r"drain timeout \(30 s\)"):
            await stream.next_events()
    assert w.sent[2:] == [AbortCall(a.request_id)] and other.sent[1:] == [AbortCall(b.request_id)]
    assert d.in_flight == 0 and w.outstanding == set() and other.outstanding == set()
    assert gauge() == in_flight and gauge(OTHER) == in_flight_other and w.completed == 1
    assert await done.next_events() and await d.wait_drained(0.05) is True
    a.close(), b.close()
    assert len(w.sent) == 3 and len(other.sent) == 2


@in_loop
async def test_slow_reader_gets_merged_events_and_holds_up_no_one():
    d, (w,) = make()
    a, b = submit(d), submit(d)
    waiting = asyncio.ensure_future(b.next_events())
    await asyncio.sleep(0)
    a_events = [token(a.request_id, 1), token(a.request_id, 2), token(a.request_id, 3, LENGTH)]
    b_event = token(b.request_id, 9)
    step(d, w, a_events[0], b_event)  # nobody reads `a`: every step returns at once all the same
    step(d, w, a_events[1])
    step(d, w, a_events[2])
    assert await waiting == [b_event]
    assert await a.next_events() == a_events
    assert a.finished and not b.finished and d.in_flight == 1 and w.completed == 1
    b_last = token(b.request_id, 10, LENGTH)
    step(d, w, b_last)
    assert await b.next_events() == [b_last] and d.in_flight == 0


@in_loop
async def test_model_gauges_forget_a_dead_worker():
    dispatcher, (worker, other) = make(workers=2)
    dispatcher._on_message(worker, StepOutput(worker_key=worker.key, events=[], running=3, waiting=2))
    dispatcher._on_message(other, StepOutput(worker_key=other.key, events=[], running=1, waiting=0))
    assert metrics.RUNNING.labels(MODEL)._value.get() == 4 and metrics.QUEUED.labels(MODEL)._value.get() == 2
    worker.die("exit code -9")
    dispatcher._on_exit(worker)
    assert metrics.RUNNING.labels(MODEL)._value.get() == 1 and metrics.QUEUED.labels(MODEL)._value.get() == 0


@in_loop
async def test_a_ticket_admits_one_request():
    dispatcher, _ = make()
    ticket = dispatcher.admit(MODEL)
    dispatcher.submit(ticket, args())
    with pytest.raises(RuntimeError):
        dispatcher.submit(ticket, args())
    assert dispatcher.in_flight == 1


class CountingEvent(asyncio.Event):
    """A stream's wake-up that counts how often it was set: a reader woken for nothing costs the frontend CPU."""

    sets = 0

    def set(self) -> None:
        self.sets += 1
        super().set()


async def woken(read) -> bool:
    """Whether a pending read has returned once the loop has run what is ready."""
    for _ in range(3):
        await asyncio.sleep(0)
    return read.done()


@in_loop
async def test_stream_interval_wakes_the_reader_for_the_first_token_then_every_interval_tokens():
    d, (w,) = make(stream_interval=3)
    stream = submit(d)
    rid = stream.request_id
    read = asyncio.ensure_future(stream.next_events())
    first = token(rid, 1)
    step(d, w, first)
    assert await woken(read) and read.result() == [first]  # the first token does not wait for company
    stream._wakeup = wakeup = CountingEvent()
    read = asyncio.ensure_future(stream.next_events())
    middle = [token(rid, 2), token(rid, 3), token(rid, 4)]
    step(d, w, middle[0])
    step(d, w, middle[1])
    assert not await woken(read) and wakeup.sets == 0  # nor was it woken for nothing
    step(d, w, middle[2])
    assert await woken(read) and read.result() == middle and wakeup.sets == 1
    read = asyncio.ensure_future(stream.next_events())
    last = [token(rid, 5), token(rid, 6, LENGTH)]
    step(d, w, last[0])
    assert not await woken(read)
    step(d, w, last[1])  # the end goes out with fewer
    assert await woken(read) and read.result() == last and d.in_flight == 0


@in_loop
async def test_stream_interval_of_one_sends_every_token_and_a_late_reader_gets_them_merged():
    d, (w,) = make()
    stream = submit(d)
    rid = stream.request_id
    events = [token(rid, 1), token(rid, 2), token(rid, 3)]
    for event in events:
        read = asyncio.ensure_future(stream.next_events())
        step(d, w, event)
        assert await woken(read) and read.result() == [event]
    step(d, w, token(rid, 4))
    step(d, w, token(rid, 5, LENGTH))
    assert [e.token_ids[0] for e in await stream.next_events()] == [4, 5]


async def past_first_token(stream_interval: int):
    """A dispatcher, its worker and a stream whose first token has been read."""
    d, (w,) = make(stream_interval=stream_interval)
    stream = submit(d)
    step(d, w, token(stream.request_id, 1))
    await stream.next_events()
    return d, w, stream, stream.request_id


@in_loop
async def test_a_worker_error_wakes_a_reader_waiting_for_more_tokens():
    d, w, stream, rid = await past_first_token(4)
    read = asyncio.ensure_future(stream.next_events())
    step(d, w, token(rid, 2))
    error = SequenceEvent(rid, finish_reason=ERROR, error_kind=ErrorKind.INTERNAL, error="boom")
    step(d, w, error)
    assert await woken(read)
    with pytest.raises(Exception, match="boom"):
        read.result()


@in_loop
async def test_stream_interval_hands_over_held_tokens_before_a_dead_worker_fails_the_stream():
    d, w, stream, rid = await past_first_token(4)
    held = token(rid, 2)
    step(d, w, held)
    read = asyncio.ensure_future(stream.next_events())
    assert not await woken(read)
    w.die("killed")
    d._on_exit(w)
    assert await woken(read) and read.result() == [held]
    with pytest.raises(Unavailable):
        await stream.next_events()


@in_loop
async def test_all_events_wakes_only_when_the_request_ends():
    d, (w,) = make()
    stream = submit(d)
    rid = stream.request_id
    stream._wakeup = wakeup = CountingEvent()
    read = asyncio.ensure_future(stream.all_events())
    await asyncio.sleep(0)  # a handler awaits it at once, before any event can arrive
    events = [token(rid, i) for i in range(1, 5)] + [token(rid, 5, LENGTH)]
    for event in events[:-1]:
        step(d, w, event)
        assert not await woken(read)
    assert wakeup.sets == 0
    step(d, w, events[-1])
    assert await woken(read) and read.result() == events and wakeup.sets == 1


@in_loop
async def test_all_events_raises_when_the_worker_dies_midway_never_returns_part():
    d, (w,) = make()
    stream = submit(d)
    read = asyncio.ensure_future(stream.all_events())
    await asyncio.sleep(0)
    step(d, w, token(stream.request_id, 1))
    w.die("killed")
    d._on_exit(w)
    with pytest.raises(Unavailable):
        await read
