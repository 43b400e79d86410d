"""What several test modules need to look at a running server the way a user can: ListModels, /metrics, polling."""

from __future__ import annotations

import time
import urllib.request

import grpc
from prometheus_client.parser import text_string_to_metric_families

from modelpool.v1 import generation_pb2 as pb
from modelpool.v1 import generation_pb2_grpc as pb_grpc


def as_stream_request(request: pb.GenerateRequest) -> pb.StreamGenerateRequest:
    """The same request for StreamGenerate (both messages share their fields)."""
    return pb.StreamGenerateRequest(**{f.name: v for f, v in request.ListFields()})


def wait_until(condition, timeout=60, what="condition"):
    """Poll a client-visible condition; the bound only keeps a broken server from hanging the suite."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached in {timeout} s")


def model_info(target_or_client, model: str) -> pb.ModelInfo:
    if isinstance(target_or_client, str):
        with grpc.insecure_channel(target_or_client) as channel:
            reply = pb_grpc.GenerationServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
        models = reply.models
    else:
        models = target_or_client.models()
    return next(m for m in models if m.name == model)


def load(target_or_client, model: str) -> tuple[int, int]:
    """(running sequences, outstanding requests) over the model's workers."""
    info = model_info(target_or_client, model)
    return sum(w.running_sequences for w in info.workers), sum(w.outstanding_requests for w in info.workers)


def wait_idle(target_or_client, model: str, timeout: float = 60) -> None:
    wait_until(
        lambda: load(target_or_client, model) == (0, 0), timeout, f"{model} idle (running, outstanding = 0, 0)"
    )


def scrape(server) -> dict:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(family, **labels):
    return [s for s in family.samples if all(s.labels.get(k) == v for k, v in labels.items())]


def metric(server, name: str, **labels) -> float:
    """The value of one sample (0 when the series does not exist yet), e.g.
    metric(server, "modelpool_requests_total", model="tiny", method="Generate", code="OK")."""
    families = scrape(server)
    for family in families.values():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


# The `slow` model of the client, security and observability servers: every forward pass 200 ms longer, so that a
# 400-token stream would run for minutes and a test sees that cancelling it is what frees its slot.
SLOW_FAULT = "slow:slow_step_ms=200"


def tiny_and_slow_models(tiny_dir, tiny_extra: str = "") -> str:
    """TOML of two one-worker models on the tiny checkpoint: `tiny` (with `tiny_extra` keys) and `slow`."""
    extra = "".join(f"\n{line.strip()}" for line in tiny_extra.strip().splitlines())
    return f"""
[[models]]
name = "tiny"
source = "{tiny_dir}"{extra}
[[models.workers]]
threads = 1

[[models]]
name = "slow"
source = "{tiny_dir}"
[[models.workers]]
threads = 1
"""
