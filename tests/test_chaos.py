"""The chaos suite: fuzzed requests, head-of-line load, killed and hung processes, out of memory, shutdown, a soak.

Every test talks to real server processes as a client would and records its
figures (tests/figures.py): requests sent, completed, failed by status, hung,
time to recover. Bounds on hangs are generous; timings are reported, and only
the head-of-line test holds them to a bound (see its docstring).
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import random
import re
import signal
import threading
import time

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelpool import build_request
from modelpool.v1 import generation_pb2 as pb
from modelpool.v1 import generation_pb2_grpc as pb_grpc
from tests import figures
from tests.conftest import write_config
from tests.helpers import as_stream_request, load, metric, model_info, wait_idle, wait_until
from tests.server_process import ServerProcess
from workers.faults import ENV as FAULTS_ENV

pytestmark = pytest.mark.slow

# ------------------------------------------------------------------ fuzz

_F32 = np.float32


def _around(value: float) -> list[float]:
    """A documented edge, and the float32 values on either side of it."""
    v = _F32(value)
    return [float(v), float(np.nextafter(v, _F32(-np.inf))), float(np.nextafter(v, _F32(np.inf)))]


# A pause longer than this means the event loop stalled (see the head-of-line test).
STALL_S = 3.0

_BAD_FLOATS = [-1.0, math.nan, math.inf, -math.inf, 3.4e38, 1e-45]


def _float_field(low: float, high: float, hostile: bool):
    """0 (the default) or a value in range, each documented limit exactly; when hostile, also the float32 values
    just beyond the limits and values that are no number at all."""
    in_range = st.one_of(st.just(0.0), st.just(-0.0), st.floats(float(_F32(low)), float(_F32(high)), width=32),
                         st.sampled_from([float(_F32(low)), float(_F32(high))]))
    return st.one_of(in_range, st.sampled_from(_BAD_FLOATS + _around(low) + _around(high))) if hostile else in_range


_SMALL_COUNTS = st.integers(0, 8)
_COUNTS = st.one_of(_SMALL_COUNTS, st.sampled_from([16, 255, 256, 511, 512, 513, 2**31, 2**32 - 1]))
_SHORT_TEXT = st.text(min_size=1, max_size=40)
_TEXT = st.one_of(_SHORT_TEXT, st.sampled_from(["", " ", "\x00", "🙂" * 10, "word " * 3000, "x" * 20_000]))
_STOP = st.one_of(st.text(max_size=8), st.sampled_from(["", "s" * 256, "s" * 257, "\n"]))
_MODEL = st.sampled_from(["nope", "m" * 5000, "\x00", "TINY", "tiny ", "", "tiny"])


@st.composite
def _requests(draw):
    """Half the requests are well-formed (every value within its documented range, edges included), half
    hostile (any field may be missing, out of range, oversized or not a number)."""
    hostile = draw(st.booleans())
    request = pb.GenerateRequest(model=draw(_MODEL if hostile else st.sampled_from(["", "tiny"])))
    kind = draw(st.sampled_from(["prompt", "chat", "none"] if hostile else ["prompt", "chat"]))
    text = _TEXT if hostile else _SHORT_TEXT
    if kind == "prompt":
        request.prompt = draw(text)
    elif kind == "chat":
        request.chat.SetInParent()
        for _ in range(draw(st.integers(0 if hostile else 1, 4))):
            role = draw(st.integers(0, 5) if hostile else st.integers(1, 3))
            request.chat.messages.add(role=role, content=draw(text))
    s = request.sampling
    s.do_sample = draw(st.booleans())
    s.temperature = draw(_float_field(1e-4, 100.0, hostile))
    s.top_p = draw(_float_field(1e-6, 1.0, hostile))
    s.repetition_penalty = draw(_float_field(1e-3, 100.0, hostile))
    s.top_k = draw(st.one_of(st.integers(0, 100), st.just(2**32 - 1)))
    seed = draw(st.one_of(st.none(), st.integers(0, 2**64 - 1)))
    if seed is not None:
        s.seed = seed
    t = request.stopping
    t.max_new_tokens = draw(_COUNTS if hostile else st.one_of(_SMALL_COUNTS, st.just(64)))
    t.min_new_tokens = draw(_COUNTS if hostile else st.integers(0, t.max_new_tokens or 8))
    stops = st.lists(_STOP, max_size=18) if hostile else st.lists(st.text(min_size=1, max_size=8), max_size=3)
    t.stop_sequences.extend(draw(stops))
    t.ignore_eos = draw(st.booleans())
    return request


_FIELD = re.compile(
    r"^(request|input|prompt|chat|chat\.messages(\[\d+\]\.role)?|sampling\.(temperature|top_p|top_k|repetition_penalty|seed)"
    r"|stopping\.(max_new_tokens|min_new_tokens|stop_sequences(\[\d+\])?)): \S"
)
_ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND}


def _check_outcome(outcome) -> str:
    if not isinstance(outcome, grpc.RpcError):
        return "OK"
    code, details = outcome.code(), outcome.details() or ""
    assert code in _ALLOWED, (code, details[:300])
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert _FIELD.match(details), details[:300]
    if code == grpc.StatusCode.NOT_FOUND:
        assert details.startswith("model ") and len(details) < 1024, details[:300]
    return code.name


def _restarts(target) -> int:
    with grpc.insecure_channel(target) as channel:
        reply = pb_grpc.GenerationServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
    return sum(w.restarts for m in reply.models for w in m.workers)


def test_fuzzed_requests_get_ok_or_a_precise_status(chaos_server, request):
    """Generated requests through both RPCs, and raw bytes: OK or INVALID_ARGUMENT naming the field,
    RESOURCE_EXHAUSTED, NOT_FOUND; never UNKNOWN or INTERNAL, no worker restart, and the server still serves.
    `pytest --fuzz-examples 1000` runs the full count."""
    examples = request.config.getoption("--fuzz-examples")
    restarts_before = _restarts(chaos_server.target)
    log_start = len(chaos_server.log())
    codes, invalid_fields = [], []
    with grpc.insecure_channel(chaos_server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        raw = {m: channel.unary_unary(f"/modelpool.v1.GenerationService/{m}") for m in ("Generate", "ListModels")}
        raw_stream = channel.unary_stream("/modelpool.v1.GenerationService/StreamGenerate")

        typed = st.tuples(st.sampled_from(["Generate", "StreamGenerate"]), _requests())
        raw_bytes = st.tuples(st.sampled_from(["raw Generate", "raw StreamGenerate", "raw ListModels"]), st.binary(max_size=64))

        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(st.one_of(typed, typed, typed, raw_bytes))
        def one(case):
            method, payload = case
            try:
                if method == "Generate":
                    reply = stub.Generate(payload, timeout=60)
                    assert reply.usage.completion_tokens == len(reply.token_ids) >= 1
                elif method == "StreamGenerate":
                    pieces = list(stub.StreamGenerate(as_stream_request(payload), timeout=60))
                    assert pieces[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
                elif method == "raw StreamGenerate":
                    list(raw_stream(payload, timeout=60))
                else:
                    raw[method.split()[1]](payload, timeout=60)
                codes.append("OK")
            except grpc.RpcError as error:
                codes.append(_check_outcome(error))
                if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    invalid_fields.append(error.details().split(":")[0].split("[")[0])

        one()
        assert stub.Generate(build_request(prompt="after", max_new_tokens=3, ignore_eos=True), timeout=60).usage.completion_tokens == 3
    assert _restarts(chaos_server.target) == restarts_before
    log = chaos_server.log()[log_start:]
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    figures.record("fuzz", sent=len(codes), by_status=figures.count_codes(codes), worker_restarts=0, hung=0,
                   invalid_by_field=figures.count_codes(invalid_fields))


# ------------------------------------------------------------------ head of line


def _percentile(values, q):
    return float(np.percentile(values, q)) if values else 0.0


def test_large_prompts_and_bursts_do_not_stall_other_streams(chaos_server):
    """While one client sends 3 MB prompts in a loop and another 200-request bursts (beyond `tiny`'s capacity,
    half of them near the byte limit, so tokenizing is busy), a steady stream keeps moving, health answers, and a
    request to a full model (`slow`, held full by 40 streams) is refused quickly.

    The bounds: here a steady stream's step takes ~20-40 ms, a health check or a refusal ~1 ms alone. Before the
    fix, this load stretched gaps to 3.2 s and health checks to 8.6 s. STALL_S (3 s) for the largest gap, the
    slowest health check and the p99 of refusals is no speed target: a 2-core machine busy with other jobs
    stretched a healthy run's largest gap to 1.4 s, and 750 ms bounds failed there; 3 s still fails the old
    behaviour (its health checks by far). A refusal that arrives during
    a 200-request burst waits behind the burst: each request costs the frontend about 1 ms of gRPC's own work
    here, which is what sets the p99 (see the figures printed at the end of the run)."""
    target = chaos_server.target
    stop = threading.Event()
    gaps, tokens, health_latency, refusal_latency, burst_latency, big_latency, codes = [], [], [], [], [], [], []
    hold_request = build_request(pb.StreamGenerateRequest, prompt="hold", model="slow", max_new_tokens=400, ignore_eos=True)

    def steady():
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            last = None
            for piece in stub.StreamGenerate(hold_request, timeout=120):
                now = time.monotonic()
                if last is not None:
                    gaps.append(now - last)
                last = now
                tokens.append(len(piece.token_ids))
        stop.set()

    def refusals():
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            request = build_request(prompt="refuse me", model="slow", max_new_tokens=4)
            while not stop.is_set():
                started = time.monotonic()
                try:
                    stub.Generate(request, timeout=30)
                    codes.append("OK")
                except grpc.RpcError as error:
                    codes.append(error.code().name)
                    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        refusal_latency.append(time.monotonic() - started)
                time.sleep(0.02)

    def big_prompts():
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            request = pb.GenerateRequest(prompt="word " * 600_000)
            for _ in range(200):
                if stop.is_set():
                    return
                started = time.monotonic()
                try:
                    stub.Generate(request, timeout=30)
                except grpc.RpcError as error:
                    codes.append(error.code().name)
                    big_latency.append(time.monotonic() - started)

    def bursts():
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            near_limit = build_request(messages=[("user", "word " * 3200)], max_new_tokens=8)  # 16,000 bytes
            short = build_request(prompt="burst", max_new_tokens=16, ignore_eos=True)
            for _ in range(3):
                if stop.is_set():
                    return
                started = time.monotonic()
                calls = [stub.Generate.future(near_limit if i % 2 else short, timeout=60) for i in range(200)]
                codes.extend(_code(call) for call in calls)
                burst_latency.append(time.monotonic() - started)
                time.sleep(0.5)

    def health():
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                started = time.monotonic()
                stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
                health_latency.append(time.monotonic() - started)
                time.sleep(0.05)

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            jobs = [pool.submit(steady)]
            wait_until(lambda: load(target, "slow")[0] == 1, 30, "steady stream running")
            held = [stub.StreamGenerate(hold_request, timeout=120) for _ in range(39)]  # 2 x 16 running + 8 queued
            wait_until(lambda: load(target, "slow")[1] == 40, 30, "slow full")
            jobs += [pool.submit(f) for f in (refusals, big_prompts, bursts, health)]
            try:
                for job in jobs:
                    job.result(timeout=300)
            finally:
                for stream in held:
                    stream.cancel()
    wait_idle(target, "tiny")
    wait_idle(target, "slow")
    by_status = figures.count_codes(codes)
    figures.record(
        "head-of-line",
        steady_gap_p50_s=_percentile(gaps, 50), steady_gap_max_s=max(gaps),
        health_p50_s=_percentile(health_latency, 50), health_max_s=max(health_latency),
        refusal_p50_s=_percentile(refusal_latency, 50), refusal_p99_s=_percentile(refusal_latency, 99),
        big_prompt_refusal_p50_s=_percentile(big_latency, 50), burst_of_200_s=_percentile(burst_latency, 50),
        by_status=by_status,
    )
    assert sum(tokens) == 400
    assert set(by_status) <= {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}, by_status
    assert len(refusal_latency) > 10 and len(big_latency) > 3 and len(burst_latency) >= 1
    # Bounds that only a stalled event loop breaks (the code before the fix: 6.6 s gaps and health checks), not a
    # speed target: a busy 2-core machine (CI beside other jobs) stretched a healthy run's largest gap to 1.4 s.
    # The figures above report the real numbers.
    assert max(gaps) < STALL_S, sorted(gaps)[-5:]
    assert max(health_latency) < STALL_S, sorted(health_latency)[-5:]
    assert _percentile(refusal_latency, 99) < STALL_S, sorted(refusal_latency)[-5:]


# ------------------------------------------------------------------ faults


def _code(call: grpc.Future) -> str:
    """The status code name a unary call (a future) ended with."""
    try:
        call.result()
        return "OK"
    except grpc.RpcError as error:
        return error.code().name


def _stream_outcome(stub, request) -> tuple[str, int]:
    tokens = 0
    try:
        for piece in stub.StreamGenerate(request, timeout=120):
            tokens += len(piece.token_ids)
        return "OK", tokens
    except grpc.RpcError as error:
        return error.code().name, tokens


def test_worker_killed_under_32_streams(chaos_server):
    """SIGKILL one of two workers while 32 streams run across both: its streams get UNAVAILABLE at once, the
    others finish whole, nothing hangs, and the worker is back and serving."""
    target = chaos_server.target
    request = build_request(pb.StreamGenerateRequest, prompt="kill", model="slow", max_new_tokens=200, ignore_eos=True)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            jobs = [pool.submit(_stream_outcome, stub, request) for _ in range(32)]
            wait_until(lambda: load(target, "slow")[0] == 32, 60, "32 running")
            victim = model_info(target, "slow").workers[0]
            os.kill(victim.pid, signal.SIGKILL)
            killed = time.monotonic()
            done, hung = concurrent.futures.wait(jobs, timeout=120)
        outcomes = [job.result() for job in done]
        wait_until(lambda: model_info(target, "slow").workers[0].state == pb.WORKER_STATE_READY, 120, "worker back")
        reply = stub.Generate(build_request(prompt="back", model="slow", max_new_tokens=4, ignore_eos=True), timeout=60)
        recovered = time.monotonic() - killed
    codes = [code for code, _ in outcomes]
    figures.record("worker SIGKILL, 32 streams", sent=32, by_status=figures.count_codes(codes), hung=len(hung),
                   recover_s=recovered)
    assert not hung
    assert set(codes) == {"OK", "UNAVAILABLE"} and codes.count("UNAVAILABLE") == 16, codes
    assert all(tokens == 200 for code, tokens in outcomes if code == "OK")
    assert reply.usage.completion_tokens == 4
    assert model_info(target, "slow").workers[0].restarts == victim.restarts + 1


def test_out_of_memory_fails_only_its_request(chaos_server):
    """A prefill that runs out of device memory (injected) is RESOURCE_EXHAUSTED for its request only; the
    requests beside it finish and the worker is not restarted."""
    target = chaos_server.target
    restarts = model_info(target, "oom").workers[0].restarts
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        short = build_request(pb.StreamGenerateRequest, prompt="fits", model="oom", max_new_tokens=100, ignore_eos=True)
        long = build_request(pb.StreamGenerateRequest, prompt="word " * 100, model="oom", max_new_tokens=5)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(lambda r: _stream_outcome(stub, r), [short, long] * 4))
        try:
            list(stub.StreamGenerate(long, timeout=60, metadata=[("x-request-id", "oom-request-7")]))
            raise AssertionError("no out of memory")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "out of memory" in error.details()
        # The request id reached the worker: its log line about the failure names it.
        wait_until(
            lambda: any("worker[oom/0]" in line and "oom-request-7" in line for line in chaos_server.log().splitlines()),
            30,
            "the worker's log line naming the request",
        )
    codes = [code for code, _ in outcomes]
    figures.record("out of memory in a step", sent=8, by_status=figures.count_codes(codes), hung=0, worker_restarts=0)
    assert codes == ["OK", "RESOURCE_EXHAUSTED"] * 4
    assert all(tokens == 100 for code, tokens in outcomes if code == "OK")
    info = model_info(target, "oom").workers[0]
    assert info.restarts == restarts and info.state == pb.WORKER_STATE_READY


def _own_server(tmp_path, tiny_dir, *args, faults="", config=None) -> ServerProcess:
    command = ["--config", str(config)] if config else ["--model", str(tiny_dir), "--name", "tiny", *args]
    proc = ServerProcess(command, tmp_path / "server.log", env={FAULTS_ENV: faults})
    return proc


def _worker_pids(target) -> list[int]:
    with grpc.insecure_channel(target) as channel:
        reply = pb_grpc.GenerationServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
    return [w.pid for m in reply.models for w in m.workers]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_frontend_killed_leaves_no_process(tmp_path, tiny_dir):
    proc = _own_server(tmp_path, tiny_dir, "--workers", "2")
    try:
        proc.wait_serving()
        pids = _worker_pids(proc.target)
        with grpc.insecure_channel(proc.target) as channel:
            stream = pb_grpc.GenerationServiceStub(channel).StreamGenerate(
                build_request(pb.StreamGenerateRequest, prompt="x", max_new_tokens=400, ignore_eos=True), timeout=60
            )
            next(stream)
            proc.proc.kill()
            killed = time.monotonic()
            proc.proc.wait(30)
            wait_until(lambda: not any(_alive(p) for p in pids), 30, "workers gone")
        gone = time.monotonic() - killed
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.stop()
    figures.record("frontend SIGKILL", workers=len(pids), workers_gone_s=gone, left=0)
    assert gone < 5  # the bound: a worker reads EOF on its inbox and exits (about 1 s here)


def test_exit_after_a_worker_died_with_a_backlog(tmp_path, tiny_dir):
    """A worker killed while more than a pipe's worth of requests waited for it: they fail with UNAVAILABLE, and
    the server still exits, cleanly, within its drain timeout (a multiprocessing.Queue's feeder thread used to
    block the exit forever) and without leaking semaphores."""
    proc = _own_server(tmp_path, tiny_dir, "--max-queue", "1000", "--drain-timeout", "10")
    try:
        proc.wait_serving()
        pid = _worker_pids(proc.target)[0]
        os.kill(pid, signal.SIGSTOP)  # reads nothing from now on
        with grpc.insecure_channel(proc.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            request = build_request(prompt="word " * 390, max_new_tokens=8)  # ~1.5 kB per pickled call
            calls = [stub.Generate.future(request, timeout=120) for _ in range(300)]
            wait_until(lambda: load(proc.target, "tiny")[1] == 300, 60, "300 outstanding")
            os.kill(pid, signal.SIGKILL)
            codes = [_code(call) for call in calls]
        proc.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        returncode = proc.proc.wait(60)
        exit_s = time.monotonic() - started
    finally:
        proc.stop()
    figures.record("worker SIGKILL with a backlog, then SIGTERM", sent=300, by_status=figures.count_codes(codes),
                   exit_s=exit_s, returncode=returncode)
    assert codes == ["UNAVAILABLE"] * 300
    assert returncode == 0
    assert "leaked semaphore" not in proc.log() and "Traceback" not in proc.log(), proc.log()[-3000:]


def test_sigterm_drains_then_a_second_sigterm_stops_at_once(tmp_path, tiny_dir):
    """The first SIGTERM drains (new calls UNAVAILABLE, accepted ones go on); a second one ends the accepted ones
    with UNAVAILABLE and exits 0 long before the drain timeout."""
    proc = _own_server(tmp_path, tiny_dir, "--drain-timeout", "300", faults="tiny:slow_step_ms=50")
    try:
        proc.wait_serving()
        with grpc.insecure_channel(proc.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            request = build_request(pb.StreamGenerateRequest, prompt="drain", max_new_tokens=400, ignore_eos=True)
            streams = [stub.StreamGenerate(request, timeout=300) for _ in range(4)]
            for stream in streams:
                next(stream)
            proc.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: "shutting down" in proc.log(), 30, "drain started")
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(build_request(prompt="late", max_new_tokens=2), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert load(proc.target, "tiny")[1] == 4  # still going
            proc.proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            outcomes = [_rest(stream) for stream in streams]
            returncode = proc.proc.wait(60)
            exit_s = time.monotonic() - started
    finally:
        proc.stop()
    figures.record("SIGTERM, then a second SIGTERM", in_flight=4,
                   by_status=figures.count_codes(code for code, _ in outcomes), exit_s=exit_s)
    assert returncode == 0
    assert all(code == "UNAVAILABLE" and "stop now" in details for code, details in outcomes), outcomes


def test_drain_timeout_ends_what_is_left_with_unavailable(tmp_path, tiny_dir):
    proc = _own_server(tmp_path, tiny_dir, "--drain-timeout", "2", faults="tiny:slow_step_ms=50")
    try:
        proc.wait_serving()
        with grpc.insecure_channel(proc.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            quick = build_request(pb.StreamGenerateRequest, prompt="quick", max_new_tokens=3, ignore_eos=True)
            long = build_request(pb.StreamGenerateRequest, prompt="long", max_new_tokens=400, ignore_eos=True)
            streams = [stub.StreamGenerate(r, timeout=300) for r in (quick, long)]
            for stream in streams:
                next(stream)
            proc.proc.send_signal(signal.SIGTERM)
            outcomes = [_rest(stream) for stream in streams]
            returncode = proc.proc.wait(60)
    finally:
        proc.stop()
    assert outcomes[0] == ("OK", "")
    assert outcomes[1][0] == "UNAVAILABLE" and "drain timeout" in outcomes[1][1], outcomes
    assert returncode == 0


def _rest(stream) -> tuple[str, str]:
    try:
        list(stream)
        return "OK", ""
    except grpc.RpcError as error:
        return error.code().name, error.details()


def test_worker_that_hangs_while_loading_is_killed_and_retried(tmp_path, tiny_dir):
    config = write_config(
        tmp_path / "modelpool.toml",
        f"""
        [server]
        worker_load_timeout_s = 2
        restart_backoff_s = 0.2
        [[models]]
        name = "stuck"
        source = "{tiny_dir}"
        [[models.workers]]
        threads = 1
        """,
    )
    proc = _own_server(tmp_path, tiny_dir, config=config, faults="stuck:load_hang")
    try:
        wait_until(lambda: _listening(proc.target), 120, "server listening")
        wait_until(lambda: model_info(proc.target, "stuck").workers[0].restarts >= 2, 60, "two retries")
        worker = model_info(proc.target, "stuck").workers[0]
        assert "load timeout" in worker.last_error
        assert worker.state in (pb.WORKER_STATE_STARTING, pb.WORKER_STATE_RESTARTING)
        with grpc.insecure_channel(proc.target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.GenerationServiceStub(channel).Generate(build_request(prompt="x"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no worker" in err.value.details()
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(60) == 0
    finally:
        proc.stop()
    assert "did not load its model within 2 s" in proc.log()


def _listening(target) -> bool:
    try:
        model_info(target, "stuck")
        return True
    except grpc.RpcError:
        return False


# ------------------------------------------------------------------ soak


def _rss(pids) -> int:
    return sum(psutil.Process(p).memory_info().rss for p in pids)


def test_soak_with_cancellations_and_slow_readers(chaos_server, request):
    """Bounded load with random cancellations, deadlines and slow readers (`--soak-seconds`): at the end nothing is
    in flight, no sequence is left in any worker, and resident memory is within 10% of where it settled."""
    seconds = request.config.getoption("--soak-seconds")
    target = chaos_server.target
    frontend = chaos_server.proc.pid
    codes: list[str] = []
    lock = threading.Lock()

    def client(seed: int, until: float, limit: int = 5000):
        rng = random.Random(seed)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            for _ in range(limit):
                if time.monotonic() >= until:
                    return
                action = rng.choice(["read", "cancel", "slow", "deadline", "unary"])
                new = rng.randint(4, 120)
                stream_request = build_request(pb.StreamGenerateRequest, prompt=f"soak {rng.random()}", max_new_tokens=new, ignore_eos=True)
                try:
                    if action == "unary":
                        stub.Generate(build_request(prompt="soak", max_new_tokens=new, ignore_eos=True), timeout=60)
                    elif action == "deadline":
                        stub.Generate(build_request(prompt="soak", max_new_tokens=400, ignore_eos=True), timeout=rng.uniform(0.01, 0.3))
                    else:
                        stream = stub.StreamGenerate(stream_request, timeout=60)
                        for i, _ in enumerate(stream):
                            if action == "cancel" and i == rng.randint(0, 5):
                                stream.cancel()
                                break
                            if action == "slow":
                                time.sleep(0.01)
                    code = "OK"
                except grpc.RpcError as error:
                    code = error.code().name
                with lock:
                    codes.append(code)

    def phase(duration: float):
        until = time.monotonic() + duration
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for job in [pool.submit(client, random.randrange(1 << 30), until) for _ in range(8)]:
                job.result(timeout=duration + 120)
        wait_idle(target, "tiny")

    phase(seconds / 4)  # warm-up: caches, allocator pools and batches of every size
    pids = [frontend] + [w.pid for w in model_info(target, "tiny").workers]
    settled = _rss(pids)
    phase(seconds * 3 / 4)
    wait_until(lambda: metric(chaos_server, "modelpool_requests_in_flight", model="tiny") == 0, 30, "in-flight 0")
    after = _rss(pids)
    by_status = figures.count_codes(codes)
    figures.record("soak", seconds=seconds, sent=len(codes), by_status=by_status, hung=0,
                   rss_settled_mb=settled / 2**20, rss_after_mb=after / 2**20)
    assert load(target, "tiny") == (0, 0)
    assert set(by_status) <= {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}, by_status
    assert abs(after - settled) <= 0.10 * settled, (settled, after)
