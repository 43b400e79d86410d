"""Many replicas behind one name: three servers on loopback, one client with gRPC's own round_robin policy over an
`ipv4:` address list (what a headless Service's DNS answer looks like). Requests spread over all three; one is
stopped with SIGTERM mid-load: its calls finish during the drain, unary ones it refuses are retried on the others,
streams fail with UNAVAILABLE at worst, new calls go to the others, and nothing hangs."""

from __future__ import annotations

import concurrent.futures
import re
import signal
import time
import urllib.request

import grpc
import pytest

from modelpool import Client, ModelpoolError
from tests.helpers import wait_until
from tests.server_process import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, tiny_dir):
    tmp = tmp_path_factory.mktemp("replicas")
    procs = [
        ServerProcess(["--model", str(tiny_dir), "--name", "tiny", "--threads", "1", "--drain-timeout", "30"],
                      tmp / f"server{i}.log")
        for i in range(3)
    ]
    try:
        for proc in procs:
            proc.wait_serving()
        yield procs
    finally:
        for proc in procs:
            proc.stop()


def ok_generates(proc) -> float:
    try:
        text = urllib.request.urlopen(proc.metrics_url, timeout=10).read().decode()
    except OSError:
        return -1.0
    pattern = r'modelpool_requests_total\{code="OK",method="(?:Generate|StreamGenerate)",model="tiny"\} (\S+)'
    return sum(float(v) for v in re.findall(pattern, text))


def test_round_robin_spreads_calls_and_survives_a_replica_stopping(replicas):
    target = "ipv4:" + ",".join(proc.target for proc in replicas)
    before = [ok_generates(proc) for proc in replicas]
    with Client(target, timeout=60, load_balancing="round_robin", wait_for_ready=True) as client:
        for _ in range(30):
            assert client.generate("spread", max_new_tokens=2, ignore_eos=True).usage.completion_tokens == 2
        spread = [ok_generates(proc) - b for proc, b in zip(replicas, before, strict=True)]
        assert sum(spread) == 30 and min(spread) >= 5, spread

        # Load from 8 threads, bounded in count and time; the first replica gets SIGTERM in the middle.
        deadline = time.monotonic() + 60
        outcomes: list[str] = []
        stopped = replicas[0]

        def one(i: int) -> str:
            if time.monotonic() > deadline:
                return "NOT_SENT"
            try:
                if i % 2:
                    pieces = list(client.stream("load", max_new_tokens=64, ignore_eos=True, timeout=60))
                    assert sum(len(p.token_ids) for p in pieces) == 64
                else:
                    assert client.generate("load", max_new_tokens=16, ignore_eos=True, timeout=60).usage
                return "OK"
            except ModelpoolError as error:
                return error.code.name

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, i) for i in range(120)]
            wait_until(lambda: sum(f.done() for f in futures) >= 30, 60, "load under way")
            stopped.proc.send_signal(signal.SIGTERM)
            outcomes = [f.result(timeout=120) for f in futures]
        assert stopped.proc.wait(60) == 0
        assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes
        assert outcomes.count("OK") >= 100, outcomes
        # Unary calls refused by the draining replica (before any response headers) were retried by gRPC on
        # the others, and its NOT_SERVING health took it out of the client's round robin.
        assert set(outcomes[0::2]) == {"OK"}, outcomes

        # New calls go to the two left.
        survivors = replicas[1:]
        after_stop = [ok_generates(proc) for proc in survivors]
        for _ in range(20):
            assert client.generate("after", max_new_tokens=2, ignore_eos=True).usage.completion_tokens == 2
        moved = [ok_generates(proc) - b for proc, b in zip(survivors, after_stop, strict=True)]
        assert sum(moved) == 20 and min(moved) >= 5, moved
        assert ok_generates(stopped) == -1.0  # gone
    assert "in flight, draining" in stopped.log() and "stopped" in stopped.log()


def test_a_plain_target_still_picks_one_replica(replicas):
    """Without a policy, gRPC's default (pick_first) sends everything to one address: the policy is what spreads."""
    live = [proc for proc in replicas if proc.proc.poll() is None]
    target = "ipv4:" + ",".join(proc.target for proc in live)
    before = [ok_generates(proc) for proc in live]
    with grpc.insecure_channel(target):
        pass
    with Client(target, timeout=60) as client:
        for _ in range(10):
            client.generate("pick", max_new_tokens=1, ignore_eos=True)
    moved = sorted(ok_generates(proc) - b for proc, b in zip(live, before, strict=True))
    assert moved[-1] == 10 and sum(moved) == 10, moved
