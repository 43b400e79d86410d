"""Edge cases of workers/ or service/ dispatcher code that the mutation run (tests/MUTATION.md) showed no other test
caught; each kills surviving mutants named there."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from service import dispatcher as dispatcher_module
from service.config import ModelConfig, ServerConfig, WorkerGroupConfig
from service.dispatcher import Dispatcher
from service.errors import ResourceExhausted, Unavailable
from service.worker_handle import WorkerState
from tests.test_dispatcher import LENGTH, MODEL, OTHER, FakeWorker, args, in_loop, make, step, submit, token
from workers.messages import AbortCall, SequenceEvent, StepOutput, WorkerMemory, WorkerReady


def ready(worker: FakeWorker, rss: int = 4096) -> WorkerReady:
    return WorkerReady(
        worker_key=worker.key,
        pid=1,
        cuda_visible_devices="",
        dtype="float32",
        devices=("cpu",),
        device_map_summary={},
        context_length=512,
        memory=WorkerMemory(resident_bytes=rss),
    )


def worker_sample(name: str, worker: FakeWorker) -> float | None:
    return REGISTRY.get_sample_value(name, {"model": MODEL, "worker": worker.key})


def model_sample(name: str) -> float:
    return REGISTRY.get_sample_value(name, {"model": MODEL}) or 0.0


@in_loop
async def test_readiness_is_reported_once_per_change():
    seen: list[bool] = []
    models = [ModelConfig(m, max_batch_size=2, max_queue=1) for m in (MODEL, OTHER)]
    config = ServerConfig(restart_backoff_s=0.01, restart_backoff_max_s=0.01, models=models)
    d = Dispatcher(config, asyncio.get_running_loop(), seen.append)
    w, o = FakeWorker(MODEL), FakeWorker(OTHER)
    d.pools[MODEL].workers.append(w)
    d.pools[OTHER].workers.append(o)
    o.state = WorkerState.STARTING
    d._on_message(w, ready(w))
    assert seen == []  # OTHER has no ready worker yet
    o.state = WorkerState.READY
    d._on_message(o, ready(o))
    assert seen == [True]
    d._on_message(o, ready(o))
    assert seen == [True]  # no change, no call
    w.die("exit code -9")
    d._on_exit(w)
    assert seen == [True, False]
    w.state = WorkerState.READY
    d._on_message(w, ready(w))
    assert seen == [True, False, True]
    d.begin_shutdown()
    assert seen == [True, False, True, False]


@in_loop
async def test_worker_series_follow_ready_steps_and_death():
    d, (w,) = make()
    d._on_message(w, ready(w, rss=4096))
    assert worker_sample("modelpool_worker_up", w) == 1
    assert worker_sample("modelpool_worker_resident_memory_bytes", w) == 4096
    d._on_message(
        w, StepOutput(worker_key=w.key, events=[], running=3, waiting=1, step_kind="decode", step_seconds=0.5)
    )
    assert worker_sample("modelpool_worker_running_sequences", w) == 3
    w.die("exit code -9")
    d._on_exit(w)
    assert worker_sample("modelpool_worker_up", w) == 0
    assert worker_sample("modelpool_worker_running_sequences", w) == 0
    assert (w.running, w.waiting) == (0, 0)


@in_loop
async def test_failed_restart_is_retried_with_back_off_and_counted():
    d, (w,) = make()
    before = worker_sample("modelpool_worker_restarts_total", w) or 0.0
    failures = [OSError("too many open files")]
    real_start = w.start

    def start():
        if failures:
            raise failures.pop()
        real_start()

    w.start = start
    w.die("exit code -9")
    d._on_exit(w)
    await asyncio.sleep(0.2)  # restart_backoff_s is 0.01
    assert w.starts == 1 and w.restarts == 2 and w.state is WorkerState.STARTING
    assert w.last_error == "restart failed: too many open files" and w.consecutive_failures == 2
    assert worker_sample("modelpool_worker_restarts_total", w) == before + 2


@in_loop
async def test_restart_only_restarts_a_restarting_worker_of_a_running_server():
    d, (w,) = make()
    d._restart(w)  # READY: started by someone else meanwhile
    assert w.starts == 0 and w.restarts == 0
    w.state = WorkerState.RESTARTING
    d.begin_shutdown()
    d._restart(w)
    assert w.starts == 0 and w.restarts == 0


@in_loop
async def test_timings_and_latency_series_of_a_request():
    names = [
        "request_queue_seconds",
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
    ]
    count = {n: model_sample(f"modelpool_{n}_count") for n in names}
    total = {n: model_sample(f"modelpool_{n}_sum") for n in names}
    generated = model_sample("modelpool_generation_tokens_total")
    d, (w,) = make()
    stream = submit(d)
    rid, t = stream.request_id, stream.timings
    first = SequenceEvent(rid, token_ids=[7], start_time=t.arrival + 0.25)
    step(d, w, first)
    assert t.start == t.arrival + 0.25 and t.first_token is not None and t.last_token == t.first_token
    step(d, w, SequenceEvent(rid, token_ids=[8, 9], start_time=t.arrival + 5))  # a later start_time is ignored
    step(d, w, token(rid, 10, LENGTH))
    assert t.start == t.arrival + 0.25 and t.first_token < t.last_token
    assert t.queue_seconds == pytest.approx(0.25)
    delta = {n: model_sample(f"modelpool_{n}_count") - count[n] for n in names}
    assert delta == {names[0]: 1, names[1]: 1, names[2]: 2, names[3]: 1}
    assert model_sample(f"modelpool_{names[0]}_sum") - total[names[0]] == pytest.approx(0.25)
    for n in names[1:]:
        assert 0 <= model_sample(f"modelpool_{n}_sum") - total[n] < 1
    assert model_sample("modelpool_generation_tokens_total") - generated == 4
    assert w.completed == 1
    step(d, w, token(submit(d).request_id, 1, LENGTH))
    assert w.completed == 2


@in_loop
async def test_queue_time_is_never_negative():
    total = model_sample("modelpool_request_queue_seconds_sum")
    d, (w,) = make()
    stream = submit(d)
    step(d, w, SequenceEvent(stream.request_id, token_ids=[1], start_time=stream.timings.arrival - 3))
    assert model_sample("modelpool_request_queue_seconds_sum") == total


@in_loop
async def test_abort_to_a_worker_whose_inbox_closed_is_dropped_quietly():
    d, (w,) = make()
    stream = submit(d)
    w.closed = True  # the worker died, and the dispatcher does not know yet
    stream.close()
    assert d.in_flight == 0 and w.outstanding == set() and len(w.sent) == 1


@in_loop
async def test_error_messages_are_exact():
    d, _ = make(workers=1, max_batch_size=2, max_queue=1)  # 3 places
    submit(d)
    tickets = [d.admit(MODEL), d.admit(MODEL)]
    with pytest.raises(ResourceExhausted, match=r"^model 'unit-a' has 3 requests outstanding, its limit "):
        d.admit(MODEL)
    d.submit(tickets[0], args())
    with pytest.raises(RuntimeError, match=r"^a ticket admits one request$"):
        d.submit(tickets[0], args())
    d.begin_shutdown()
    with pytest.raises(Unavailable, match=r"^the server is shutting down$"):
        d.admit(MODEL)


@in_loop
async def test_stop_workers_fails_in_flight_requests_and_stops_every_worker():
    d, (w,) = make()
    stopped = []
    for pool in d.pools.values():
        for fake in pool.workers:
            fake.stop = lambda timeout, fake=fake: stopped.append((fake.key, timeout))
    stream = submit(d)
    await d.stop_workers()  # the default timeout: 10 s
    with pytest.raises(Unavailable, match=r"^the server stopped$"):
        await stream.next_events()
    assert sorted(stopped) == [(f"{MODEL}/0", 10.0), (f"{OTHER}/0", 10.0)]
    assert d.in_flight == 0 and w.sent[1:] == [AbortCall(stream.request_id)]
    with pytest.raises(Unavailable, match="shutting down"):
        d.admit(MODEL)


@in_loop
async def test_start_makes_one_started_handle_per_worker_spec():
    made = []

    class Handle(FakeWorker):
        def __init__(self, spec, loop, on_message, on_exit, load_timeout_s):
            super().__init__(spec.model_name, int(spec.worker_key.rsplit("/", 1)[1]))
            self.spec, self.state = spec, WorkerState.STARTING
            made.append((spec, loop, on_message, on_exit, load_timeout_s))

    group = WorkerGroupConfig(replicas=2, threads=1)
    models = [ModelConfig(MODEL, workers=[group]), ModelConfig(OTHER)]
    config = ServerConfig(worker_load_timeout_s=7.0, models=models)
    loop = asyncio.get_running_loop()
    d = Dispatcher(config, loop)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dispatcher_module, "WorkerHandle", Handle)
        d.start({MODEL: "/models/a", OTHER: "/models/b"})
    workers = d.pools[MODEL].workers
    assert [w.key for w in workers] == [f"{MODEL}/0", f"{MODEL}/1"] and len(d.pools[OTHER].workers) == 1
    assert all(w.starts == 1 for p in d.pools.values() for w in p.workers)
    assert [(s.model_path, lp, om, oe, t) for s, lp, om, oe, t in made] == [
        ("/models/a", loop, d._on_message, d._on_exit, 7.0),
        ("/models/a", loop, d._on_message, d._on_exit, 7.0),
        ("/models/b", loop, d._on_message, d._on_exit, 7.0),
    ]
    assert worker_sample("modelpool_worker_up", workers[1]) == 0
