"""What operators use: health, reflection, /metrics, graceful shutdown on SIGTERM, and the committed stubs."""

from __future__ import annotations

import filecmp
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from modelpool import Client
from tests.helpers import samples, scrape
from tests.server_process import REPO, ServerProcess


def test_health_serving_for_server_and_service(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "modelpool.v1.GenerationService"):
            assert stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == (
                health_pb2.HealthCheckResponse.SERVING
            )


def test_reflection_lists_and_describes_the_service(server):
    with grpc.insecure_channel(server.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"modelpool.v1.GenerationService", "grpc.health.v1.Health"} <= services
        from google.protobuf.descriptor_pool import DescriptorPool

        pool = DescriptorPool(db)
        service = pool.FindServiceByName("modelpool.v1.GenerationService")
        assert [m.name for m in service.methods] == ["Generate", "StreamGenerate", "ListModels"]
        assert service.methods_by_name["StreamGenerate"].server_streaming


def test_metrics_are_scraped_and_parsed(server, client):
    client.generate("metrics", max_new_tokens=5, ignore_eos=True)
    list(client.stream(prompt="metrics", max_new_tokens=5, ignore_eos=True))
    with pytest.raises(Exception):
        client.generate("x", model="missing")
    families = scrape(server)
    requests = families["modelpool_requests"]
    assert samples(requests, model="tiny", method="Generate", code="OK")[0].value >= 1
    assert samples(requests, model="tiny", method="StreamGenerate", code="OK")[0].value >= 1
    assert samples(requests, method="Generate", code="NOT_FOUND")[0].value >= 1
    for histogram in (
        "modelpool_e2e_request_latency_seconds",
        "modelpool_time_to_first_token_seconds",
        "modelpool_inter_token_latency_seconds",
        "modelpool_request_queue_seconds",
    ):
        count = [s for s in families[histogram].samples if s.name.endswith("_count") and s.labels["model"] == "tiny"]
        assert count and count[0].value >= 2, histogram
    assert samples(families["modelpool_generation_tokens"], model="tiny")[0].value >= 10
    assert samples(families["modelpool_prompt_tokens"], model="tiny")[0].value > 0
    assert "modelpool_requests_in_flight" in families
    rss = samples(families["modelpool_worker_resident_memory_bytes"], model="tiny")
    assert len(rss) == 2 and all(s.value > 10_000_000 for s in rss)
    up = samples(families["modelpool_worker_up"], model="tiny")
    assert [s.value for s in up] == [1.0, 1.0]


def test_sigterm_drains_in_flight_and_exits_zero(tmp_path, tiny_dir):
    proc = ServerProcess(["--model", str(tiny_dir), "--drain-timeout", "60"], tmp_path / "server.log")
    try:
        proc.wait_serving()
        with Client(proc.target, timeout=120) as client:
            stream = client.stream(prompt="drain", max_new_tokens=300, ignore_eos=True)
            first = next(stream)
            proc.proc.send_signal(signal.SIGTERM)
            # New calls are refused ...
            with pytest.raises(grpc.RpcError) as err:
                for _ in range(200):  # the listener closes right after the signal is handled
                    client.generate("late", max_new_tokens=2, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            # ... while the accepted one finishes.
            rest = list(stream)
            assert len(first.token_ids) + sum(len(p.token_ids) for p in rest) == 300
            assert rest[-1].finish_reason == 1
        assert proc.proc.wait(120) == 0
        assert "stopped" in proc.log()
    finally:
        proc.stop()


def test_generated_stubs_are_fresh(tmp_path):
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", "-I", "proto",
            f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
            "proto/modelpool/v1/generation.proto",
        ],
        cwd=REPO,
        check=True,
    )
    committed = REPO / "clients" / "python" / "modelpool" / "v1"
    for name in ("generation_pb2.py", "generation_pb2.pyi", "generation_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / "modelpool" / "v1" / name, committed / name, shallow=False), (
            f"{name} is stale: run `make proto`"
        )


def test_client_package_needs_no_torch():
    code = (
        "import sys, modelpool, modelpool.cli, modelpool.client; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path("/"))
