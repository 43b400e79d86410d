"""The container image, built and run for real with podman (deploy/podman/build-image.sh): it serves the built-in
model on published loopback ports, answers a chat, exports /metrics, and drains on SIGTERM with a stream in
flight, exiting 0. Skipped, with the reason printed, where podman cannot run containers."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelpool import Client
from tests import figures
from tests.server_process import REPO, free_port

pytestmark = [pytest.mark.slow, pytest.mark.image]
TAG = "localhost/modelpool:test"
CONF = {"CONTAINERS_CONF": str(REPO / "deploy" / "podman" / "containers.conf")}


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **CONF}
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {result.stderr[-3000:]}")
    return result


def usable() -> str:
    """Why podman cannot run containers here, or ""."""
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (.ci/install-tools installs podman, runc and debootstrap)"
    info = subprocess.run(["podman", "info"], capture_output=True, text=True, env={**os.environ, **CONF})
    return "" if info.returncode == 0 else f"podman info failed: {info.stderr.strip()[-300:]}"


@pytest.fixture(scope="module")
def image():
    reason = usable()
    if reason:
        print(f"\nSKIPPED the image test: {reason}")
        pytest.skip(reason)
    started = time.monotonic()
    build = subprocess.run(
        [str(REPO / "deploy" / "podman" / "build-image.sh"), TAG], capture_output=True, text=True, timeout=1800,
        env={**os.environ, **CONF},
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    size = int(podman("image", "inspect", "--format", "{{.Size}}", TAG).stdout.strip())
    figures.record("image", build_s=round(time.monotonic() - started), size_mb=round(size / 1e6))
    return TAG


def wait_serving(target: str, container: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            state = podman("inspect", "--format", "{{.State.Status}}", container, check=False).stdout.strip()
            assert state == "running", podman("logs", container, check=False).stderr[-3000:]
            time.sleep(0.5)
    raise AssertionError("the container is not SERVING: " + podman("logs", container, check=False).stderr[-3000:])


def test_image_serves_drains_and_exits_zero(image):
    port, metrics_port = free_port(), free_port()
    name = f"modelpool-test-{port}"
    podman("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:50051", "-p", f"127.0.0.1:{metrics_port}:8002", image)
    try:
        target = f"127.0.0.1:{port}"
        wait_serving(target, name)
        # The image's own HEALTHCHECK (the gRPC health service) passes once it serves.
        assert podman("healthcheck", "run", name, check=False).returncode == 0
        user = podman("exec", name, "id", "-u").stdout.strip()
        assert user == "10001", "the server runs as root"
        with Client(target, timeout=120) as client:
            reply = client.chat([("user", "What is the capital of France?")], max_new_tokens=24)
            assert "Paris" in reply.text, reply.text
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
            assert 'modelpool_requests_total{code="OK",method="Generate",model="smollm2"} 1.0' in metrics
            stream = client.stream("Count to a hundred:", max_new_tokens=48, ignore_eos=True)
            first = next(stream)
            podman("kill", "--signal", "TERM", name)
            rest = list(stream)
        assert len(first.token_ids) + sum(len(p.token_ids) for p in rest) == 48
        assert rest[-1].finish_reason == 1
        assert podman("wait", name, timeout=120).stdout.strip() == "0"
        assert "shutting down" in podman("logs", name).stderr
        health = podman("image", "inspect", "--format", "{{json .HealthCheck}}", image).stdout
        assert "grpc_health" in health
    finally:
        podman("rm", "-f", name, check=False)
