"""How the server is started and configured, and what a model that cannot load looks like from outside."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelpool import Client, ModelpoolError, build_request
from modelpool.v1 import generation_pb2 as pb
from modelpool.v1 import generation_pb2_grpc as pb_grpc
from service import cli as serve_cli
from tests.conftest import write_config
from tests.helpers import metric, model_info, wait_until
from tests.server_process import REPO, ServerProcess
from workers import builtin_model
from workers.faults import ENV


def parse(*argv: str):
    return serve_cli.config_from_args(serve_cli.build_parser().parse_args(list(argv)))


def test_serve_flags_reach_the_configuration():
    cfg = parse(
        "--model", "/models/m", "--name", "m", "--workers", "2", "--devices", "0,1", "--dtype", "bf16",
        "--device-map", "balanced", "--threads", "3", "--max-batch-size", "5", "--max-batch-tokens", "999",
        "--max-step-tokens", "64", "--max-queue", "7", "--host", "0.0.0.0", "--port", "6000", "--metrics-host", "::1", "--metrics-port", "0",
        "--drain-timeout", "4.5", "--max-overtakes", "9", "--cpu-linear", "aten", "--stream-interval", "4",
    )
    (model,) = cfg.models
    assert (model.name, model.source, model.max_batch_size, model.max_batch_tokens, model.max_queue) == (
        "m", "/models/m", 5, 999, 7,
    )
    assert [(w.devices, w.dtype, w.device_map, w.threads) for w in model.workers] == [
        ([0], "bf16", "balanced", 3), ([1], "bf16", "balanced", 3),
    ]
    assert (cfg.host, cfg.port, cfg.metrics_host, cfg.metrics_port, cfg.drain_timeout_s) == (
        "0.0.0.0", 6000, "::1", 0, 4.5,
    )
    specs = cfg.worker_specs(model, "/models/m")
    assert [s.cuda_visible_devices for s in specs] == ["0", "1"] and specs[0].max_batch_size == 5
    assert model.max_step_tokens == 64 and [s.max_step_tokens for s in specs] == [64, 64]
    assert [s.max_overtakes for s in specs] == [9, 9]
    assert [s.cpu_linear for s in specs] == ["aten", "aten"]
    assert model.stream_interval == 4 and parse().models[0].stream_interval == 1
    assert {s.cpu_linear for s in parse().worker_specs(parse().models[0], "/m")} == {"onednn"}


def test_defaults_and_model_names():
    cfg = parse()
    assert (cfg.models[0].name, cfg.models[0].source, cfg.host, cfg.port) == ("smollm2", "builtin", "127.0.0.1", 50051)
    assert parse("--model", "hf:Org/Some-Model").models[0].name == "Some-Model"
    assert parse("--model", "/data/models/qwen/").models[0].name == "qwen"


def test_flags_override_the_config_file(tmp_path):
    config = write_config(
        tmp_path / "c.toml",
        """
        [server]
        port = 7000
        metrics_port = 7001
        drain_timeout_s = 9
        [[models]]
        name = "a"
        source = "builtin"
        """,
    )
    cfg = parse("--config", str(config), "--port", "7100", "--drain-timeout", "2")
    assert (cfg.port, cfg.metrics_port, cfg.drain_timeout_s) == (7100, 7001, 2.0)
    assert [m.name for m in cfg.models] == ["a"]


@pytest.mark.slow
def test_bad_flags_exit_with_a_configuration_error():
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "--workers", "3", "--devices", "0,1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "configuration error: --workers" in result.stderr


@pytest.mark.slow
def test_modelpool_cache_moves_the_builtin_cache(tmp_path):
    """MODELPOOL_CACHE is where the converted built-in model lives (here a link to the one already converted, so
    nothing is converted again)."""
    converted = builtin_model.ensure_cached()
    (tmp_path / converted.name).symlink_to(converted)
    result = subprocess.run(
        [sys.executable, "-m", "workers.builtin_model", "--print-path"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "MODELPOOL_CACHE": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / converted.name)
    assert "converting" not in result.stderr


@pytest.mark.slow
def test_metrics_port_zero_serves_no_metrics(tmp_path, tiny_dir):
    proc = ServerProcess(["--model", str(tiny_dir)], tmp_path / "server.log", metrics_port=0)
    try:
        proc.wait_serving()
        assert "metrics on off" in proc.log()
        with grpc.insecure_channel(proc.target) as channel:
            reply = pb_grpc.GenerationServiceStub(channel).Generate(
                build_request(prompt="x", max_new_tokens=2, ignore_eos=True), timeout=60
            )
        assert reply.usage.completion_tokens == 2
    finally:
        proc.stop()


@pytest.mark.slow
def test_a_model_that_fails_to_load_is_retried_with_back_off(tmp_path, tiny_dir):
    """A folder whose weights file is cut in half (the frontend's checks see a config and weights; only loading
    them fails): the frontend starts, the worker fails to load (WorkerFailed), and is retried with a doubling
    back-off; meanwhile the model is UNAVAILABLE and the server NOT_SERVING, ListModels shows the error,
    STARTING with a pid and RESTARTING without one."""
    broken = tmp_path / "cut-weights"
    shutil.copytree(tiny_dir, broken)
    weights = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    config = write_config(
        tmp_path / "c.toml",
        f"""
        [server]
        restart_backoff_s = 0.5
        restart_backoff_max_s = 2
        [[models]]
        name = "broken"
        source = "{broken}"
        [[models.workers]]
        threads = 1
        """,
    )
    proc = ServerProcess(["--config", str(config)], tmp_path / "server.log")
    seen: dict[int, set[bool]] = {}
    try:

        def look() -> bool:
            try:
                worker = model_info(proc.target, "broken").workers[0]
            except grpc.RpcError:
                return False
            seen.setdefault(worker.state, set()).add(worker.pid > 0)
            return worker.restarts >= 3 and pb.WORKER_STATE_RESTARTING in seen and pb.WORKER_STATE_STARTING in seen

        wait_until(look, 180, "three failed loads")
        worker = model_info(proc.target, "broken").workers[0]
        assert worker.last_error.startswith("SafetensorError:") and "incomplete" in worker.last_error, worker.last_error
        assert seen[pb.WORKER_STATE_STARTING] == {True} and seen[pb.WORKER_STATE_RESTARTING] == {False}
        assert pb.WORKER_STATE_READY not in seen
        with grpc.insecure_channel(proc.target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.GenerationServiceStub(channel).Generate(build_request(prompt="x"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no worker of model 'broken'" in err.value.details()
        # The refusal is trailers-only (no response headers yet), so gRPC's retry policy in the client does
        # send it again: three attempts reach the server, and the request id still comes back, in the trailers.
        refused = {"model": "broken", "method": "Generate", "code": "UNAVAILABLE"}
        before = metric(proc, "modelpool_requests_total", **refused)
        with Client(proc.target, timeout=30, retries=3) as client, pytest.raises(ModelpoolError) as err:
            client.generate("x", metadata=[("x-request-id", "refused-1")])
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert metric(proc, "modelpool_requests_total", **refused) == before + 3
        assert err.value.request_id == "refused-1"
        delays = [line.rsplit(" in ", 1)[1] for line in proc.log().splitlines() if "restarting worker broken/0 in" in line]
        assert delays[:3] == ["0.5 s", "1.0 s", "2.0 s"], delays
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(60) == 0
    finally:
        proc.stop()


@pytest.mark.slow
def test_startup_is_unavailable_until_a_worker_is_ready(tmp_path, tiny_dir):
    """From the moment the server listens until its worker has loaded, calls get UNAVAILABLE naming the model.

    Workers start loading before the frontend listens (start-up is faster so), so the tiny model could be ready
    before the first call: its worker waits for a gate file (an injected fault) until the refusal was seen."""
    gate = tmp_path / "load-gate"
    proc = ServerProcess(
        ["--model", str(tiny_dir), "--name", "tiny"], tmp_path / "server.log", env={ENV: f"tiny:load_gate={gate}"}
    )
    codes = set()
    try:
        deadline = time.monotonic() + 180
        with grpc.insecure_channel(proc.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            while time.monotonic() < deadline and "OK" not in codes:
                try:
                    stub.Generate(build_request(prompt="x", max_new_tokens=2, ignore_eos=True), timeout=10)
                    codes.add("OK")
                except grpc.RpcError as error:
                    if "no worker of model 'tiny' is ready" in (error.details() or ""):
                        codes.add(error.code().name)
                        gate.touch()
                    else:  # not listening yet: the connection itself fails
                        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), error
                    time.sleep(0.05)
    finally:
        proc.stop()
    assert codes == {"UNAVAILABLE", "OK"}, codes


def test_models_load_in_a_daemon_thread_that_ctrl_c_does_not_wait_for():
    """asyncio.to_thread's threads are joined at exit, so Ctrl-C during a long download waited for all of it."""
    import asyncio
    import threading

    from service.server import _in_daemon_thread

    def where(x: int) -> tuple[int, bool]:
        return x + 1, threading.current_thread().daemon

    def fails() -> None:
        raise ValueError("no such model")

    async def scenario():
        assert await _in_daemon_thread(where, 1) == (2, True)
        with pytest.raises(ValueError, match="no such model"):
            await _in_daemon_thread(fails)

    asyncio.run(scenario())
