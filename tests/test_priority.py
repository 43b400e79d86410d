"""Request priorities through the engine on the tiny model: the worker's queue admits higher priorities first,
and a low-priority request is overtaken at most max_overtakes times."""

from __future__ import annotations

import dataclasses
import os
import signal

import grpc

from modelpool import build_request
from modelpool.v1 import generation_pb2_grpc as pb_grpc
from tests.helpers import load, model_info, wait_until
from tests.server_process import ServerProcess
from tests.test_chunked_prefill import call_of_length, engine_like
from tests.test_engine import engine  # noqa: F401  (fixture)


def one_slot_engine(engine, max_overtakes=32):  # noqa: F811
    return engine_like(engine, 16, max_batch_size=1, max_batch_tokens=400, max_overtakes=max_overtakes)


def start_order(e, arrivals=()):
    """Step until idle, adding `arrivals[i]` before step i; returns request ids in the order of their first token."""
    order, step = [], 0
    while e.has_work or step < len(arrivals):
        if step < len(arrivals):
            for call in arrivals[step]:
                assert e.add(call) is None
        for event in e.step()[1]:
            if event.completion_tokens == 1:
                order.append(event.request_id)
        step += 1
    return order


def prioritized(call, priority):
    return dataclasses.replace(call, priority=priority)


def test_a_high_priority_request_behind_a_full_queue_starts_first(engine):  # noqa: F811
    e = one_slot_engine(engine)
    e.add(call_of_length(0, engine, 5, max_new=4))
    e.step()  # 0 holds the only slot
    for request_id in (1, 2, 3):
        e.add(call_of_length(request_id, engine, 5, max_new=2))
    e.add(prioritized(call_of_length(4, engine, 5, max_new=2), 50))
    assert [s.request_id for s in e.waiting] == [4, 1, 2, 3]
    assert start_order(e) == [4, 1, 2, 3]


def test_a_low_priority_request_is_overtaken_at_most_max_overtakes_times(engine):  # noqa: F811
    e = one_slot_engine(engine, max_overtakes=3)
    low = prioritized(call_of_length(1, engine, 5, max_new=1), -100)
    # Request 0 holds the slot; then a high-priority request arrives at every step.
    arrivals = [[call_of_length(0, engine, 5, max_new=1), low]]
    arrivals += [[prioritized(call_of_length(100 + i, engine, 5, max_new=1), 100)] for i in range(10)]
    order = start_order(e, arrivals)
    assert order[:5] == [0, 100, 101, 102, 1]
    assert sorted(order) == [0, 1, *range(100, 110)]


def test_server_runs_a_high_priority_request_before_the_queue_ahead_of_it(tmp_path, tiny_dir):
    """Through gRPC: with one batch slot and the worker paused (SIGSTOP) while four requests queue up, three of
    priority 0 then one of priority 50, the worker gets them all at once when resumed; each runs alone, so the
    order in which they complete is the order the scheduler admitted them."""
    proc = ServerProcess(
        ["--model", str(tiny_dir), "--name", "tiny", "--max-batch-size", "1", "--max-queue", "8"],
        tmp_path / "server.log",
    )
    try:
        proc.wait_serving()
        pid = model_info(proc.target, "tiny").workers[0].pid
        done: list[int] = []
        with grpc.insecure_channel(proc.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            os.kill(pid, signal.SIGSTOP)
            try:
                calls = []
                for i, priority in enumerate([0, 0, 0, 50]):
                    request = build_request(prompt=f"request {i}", max_new_tokens=6, ignore_eos=True, priority=priority)
                    call = stub.Generate.future(request, timeout=120)
                    call.add_done_callback(lambda _, i=i: done.append(i))
                    calls.append(call)
                    wait_until(lambda n=i + 1: load(proc.target, "tiny")[1] == n, 30, f"{i + 1} outstanding")
            finally:
                os.kill(pid, signal.SIGCONT)
            assert [call.result(timeout=120).usage.completion_tokens for call in calls] == [6] * 4
    finally:
        proc.stop()
    assert done == [3, 0, 1, 2]
