"""Start the real server as a subprocess on free loopback ports and wait until it serves, as a user would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(
        self,
        args: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        metrics_port: int | None = None,
        tls: Path | None = None,
        tls_client=None,
        stdout_path: Path | None = None,
    ):
        """`tls`: the CA that signed a TLS server's certificate; `tls_client`: a client certificate (.cert, .key)
        for a server that asks for one."""
        self._credentials = None
        if tls is not None:
            self._credentials = grpc.ssl_channel_credentials(
                tls.read_bytes(),
                tls_client.key.read_bytes() if tls_client else None,
                tls_client.cert.read_bytes() if tls_client else None,
            )
        self.port = free_port()
        self.metrics_port = free_port() if metrics_port is None else metrics_port
        self.target = f"127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        command = [
            sys.executable, "-m", "service.cli", *args,
            "--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", str(self.metrics_port),
        ]
        # stdout_path: stdout apart from the log (stderr), for what a server prints there (trace spans).
        self._stdout = open(stdout_path, "wb") if stdout_path else None
        self.proc = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=self._stdout or self._log,
            stderr=self._log if self._stdout else subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        channel = (
            grpc.insecure_channel(self.target)
            if self._credentials is None
            else grpc.secure_channel(self.target, self._credentials)
        )
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"server not SERVING after {timeout} s:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if self._stdout:
            self._stdout.close()
        return self.proc.returncode
