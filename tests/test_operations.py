"""What operators use: health, reflection, /metrics, graceful shutdown on SIGTERM, and the committed stubs."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from modelpool import Client, ModelpoolError
from tests.helpers import samples, scrape
from tests.server_process import ServerProcess


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


def _counts(server) -> dict[str, float]:
    """The series the request test below moves, read in one scrape."""
    families = scrape(server)

    def value(family, name=None, **labels):
        found = [s.value for s in samples(families[family], **labels) if name is None or s.name == name]
        return found[0] if found else 0.0

    counts = {
        "ok_generate": value("modelpool_requests", model="tiny", method="Generate", code="OK"),
        "ok_stream": value("modelpool_requests", model="tiny", method="StreamGenerate", code="OK"),
        "not_found": value("modelpool_requests", model="", method="Generate", code="NOT_FOUND"),
        "prompt_tokens": value("modelpool_prompt_tokens", model="tiny"),
        "generation_tokens": value("modelpool_generation_tokens", model="tiny"),
        "in_flight": value("modelpool_requests_in_flight", model="tiny"),
        "running": value("modelpool_requests_running", model="tiny"),
        "queued": value("modelpool_requests_queued", model="tiny"),
    }
    for histogram in ("e2e_request_latency", "time_to_first_token", "inter_token_latency", "request_queue"):
        family = f"modelpool_{histogram}_seconds"
        counts[histogram] = value(family, f"{family}_count", model="tiny")
    counts["batch_size"] = value("modelpool_batch_size", "modelpool_batch_size_count", model="tiny")
    for kind in ("prefill", "decode"):
        counts[kind] = value("modelpool_step_seconds", "modelpool_step_seconds_count", model="tiny", kind=kind)
    return counts


def test_every_request_metric_moves_by_what_the_requests_caused(server, client):
    before = _counts(server)
    unary = client.generate("metrics", max_new_tokens=5, ignore_eos=True)
    pieces = list(client.stream(prompt="metrics", max_new_tokens=5, ignore_eos=True))
    with pytest.raises(ModelpoolError) as err:
        client.generate("x", model="missing")
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    after = _counts(server)
    delta = {key: after[key] - before[key] for key in before}
    prompt = unary.usage.prompt_tokens + pieces[-1].usage.prompt_tokens
    assert delta == {
        "ok_generate": 1, "ok_stream": 1, "not_found": 1,
        "prompt_tokens": prompt, "generation_tokens": 10,
        "in_flight": 0, "running": 0, "queued": 0,
        # Two requests, one after the other: each is queued once, gets a first token from its prefill, then four
        # decode steps of a batch of one, each a gap between two tokens.
        "e2e_request_latency": 2, "time_to_first_token": 2, "inter_token_latency": 8, "request_queue": 2,
        "batch_size": 8, "prefill": 2, "decode": 8,
    }
    assert after["in_flight"] == after["running"] == after["queued"] == 0  # idle


def test_worker_metrics(server):
    families = scrape(server)
    rss = samples(families["modelpool_worker_resident_memory_bytes"], model="tiny")
    assert sorted(s.labels["worker"] for s in rss) == ["tiny/0", "tiny/1"]
    assert all(s.value > 50 * 2**20 for s in rss)  # a process with torch loaded
    assert [s.value for s in samples(families["modelpool_worker_up"], model="tiny")] == [1.0, 1.0]
    assert all(s.value == 0 for s in samples(families["modelpool_worker_running_sequences"], model="tiny"))
    # Without a GPU, no GPU series exist (tests/test_gpu.py checks them where CUDA is visible).
    assert not samples(families["modelpool_gpu_memory_total_bytes"])


@pytest.mark.slow
def test_sigterm_drains_in_flight_and_exits_zero(tmp_path, tiny_dir):
    proc = ServerProcess(["--model", str(tiny_dir), "--drain-timeout", "60"], tmp_path / "server.log")
    try:
        proc.wait_serving()
        with Client(proc.target, timeout=120) as client:
            stream = client.stream(prompt="drain", max_new_tokens=300, ignore_eos=True)
            first = next(stream)
            proc.proc.send_signal(signal.SIGTERM)
            # New calls are refused ...
            with pytest.raises(ModelpoolError) as err:
                for _ in range(200):  # the listener closes right after the signal is handled
                    client.generate("late", max_new_tokens=2, timeout=10)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            # ... while the accepted one finishes.
            rest = list(stream)
            assert len(first.token_ids) + sum(len(p.token_ids) for p in rest) == 300
            assert rest[-1].finish_reason == 1
        assert proc.proc.wait(120) == 0
        assert "stopped" in proc.log()
    finally:
        proc.stop()


def test_client_package_needs_no_torch():
    code = (
        "import sys, modelpool, modelpool.cli, modelpool.client; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path("/"))


def test_load_gauges_follow_running_and_queued_requests(chaos_server):
    """`slow` runs 16 sequences per worker on two workers: 33 held streams are 32 running and 1 queued, and the
    gauges say so; once they are cancelled, everything reads 0 again."""
    from tests.helpers import metric, wait_idle, wait_until

    def gauges():
        return (
            metric(chaos_server, "modelpool_requests_in_flight", model="slow"),
            metric(chaos_server, "modelpool_requests_running", model="slow"),
            metric(chaos_server, "modelpool_requests_queued", model="slow"),
            metric(chaos_server, "modelpool_worker_running_sequences", model="slow", worker="slow/0"),
            metric(chaos_server, "modelpool_worker_running_sequences", model="slow", worker="slow/1"),
        )

    from modelpool import build_request
    from modelpool.v1 import generation_pb2 as pb
    from modelpool.v1 import generation_pb2_grpc as pb_grpc

    request = build_request(pb.StreamGenerateRequest, prompt="hold", model="slow", max_new_tokens=400, ignore_eos=True)
    with grpc.insecure_channel(chaos_server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        streams = [stub.StreamGenerate(request, timeout=120) for _ in range(33)]
        try:
            wait_until(lambda: gauges() == (33, 32, 1, 16, 16), 30, "33 in flight: 32 running, 1 queued")
        finally:
            for stream in streams:
                stream.cancel()
        wait_idle(chaos_server.target, "slow")
    wait_until(lambda: gauges() == (0, 0, 0, 0, 0), 30, "gauges back to 0")
