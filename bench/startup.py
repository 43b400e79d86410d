"""Start-up time: from launching a server to SERVING and to its first answer (issue 11).

Owns one measurement, repeated `--repeats` times per server, one server at a
time on a free 127.0.0.1 port:

- modelpool (`python -m service.cli --model M`): launch → the standard health
  service says SERVING (polled every 50 ms), and launch → the first unary
  `Generate` of one token has its answer;
- `transformers serve M` (M given as its FORCE_MODEL, which it loads at
  start, as modelpool does before SERVING), when transformers' serving extras
  (fastapi, uvicorn, openai) are installed, else the reason is printed:
  launch → its HTTP port answers `/v1/models`, and launch → the first chat
  completion of one token has its answer.

The first answer is the fair comparison (a server that reports ready before its
model is loaded only moves the wait). Medians are printed as a Markdown table.

    python -m bench.startup                      # builtin, 3 repeats
    python -m bench.startup --model tiny --repeats 1
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.run import DEFAULT_OUT_DIR, HOST, ServerProcess, free_port, modelpool_command, render_table

_LOGGER = logging.getLogger(__name__)
_POLL_S = 0.05


def _wait(until: Callable[[], bool], server: ServerProcess, timeout_s: float) -> float:
    """Seconds from now until `until()` is true; fails if the server exits or the time runs out."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        assert server.process is not None
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}; see {server.log_path}")
        if until():
            return time.monotonic() - started
        time.sleep(_POLL_S)
    raise TimeoutError(f"{server.name}: not ready after {timeout_s:.0f} s; see {server.log_path}")


def measure_modelpool(model: str, out_dir: Path, timeout_s: float) -> tuple[float, float]:
    from modelpool.request import build_request
    from modelpool.v1 import generation_pb2 as pb
    from modelpool.v1 import generation_pb2_grpc as pb_grpc

    port = free_port()
    server = ServerProcess("modelpool", modelpool_command(model, port, 8, 2), port, out_dir / "startup_modelpool.log")
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)

    def serving() -> bool:
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    try:
        launched = time.monotonic()
        server.start()
        _wait(serving, server, timeout_s)
        to_serving = time.monotonic() - launched
        request = build_request(pb.GenerateRequest, prompt="Hello", max_new_tokens=1)
        pb_grpc.GenerationServiceStub(channel).Generate(request, timeout=timeout_s)
        return to_serving, time.monotonic() - launched
    finally:
        channel.close()
        server.stop()


def transformers_serve_missing() -> str | None:
    """Why `transformers serve` cannot be measured here, or None."""
    try:
        from transformers.utils.import_utils import is_serve_available
    except ImportError as exc:
        return f"transformers has no serve command ({exc})"
    if not is_serve_available():
        return "transformers' serving extras are not installed (pip install 'transformers[serving]')"
    if _transformers_command() is None:
        return "the transformers command is not beside this Python nor on PATH"
    return None


def _transformers_command() -> str | None:
    beside = Path(sys.executable).parent / "transformers"
    return str(beside) if beside.exists() else shutil.which("transformers")


def measure_transformers_serve(model_path: Path, out_dir: Path, timeout_s: float) -> tuple[float, float]:
    port = free_port()
    command = [
        str(_transformers_command()),
        "serve",
        str(model_path),
        "--host",
        HOST,
        "--port",
        str(port),
    ]
    server = ServerProcess("transformers-serve", command, port, out_dir / "startup_transformers_serve.log")
    base = f"http://{HOST}:{port}"

    def listening() -> bool:
        try:
            with urllib.request.urlopen(f"{base}/v1/models", timeout=1):
                return True
        except (urllib.error.URLError, OSError):
            return False

    try:
        launched = time.monotonic()
        server.start()
        _wait(listening, server, timeout_s)
        to_ready = time.monotonic() - launched
        body = {
            "model": str(model_path),
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 1,
            "stream": False,
        }
        request = urllib.request.Request(
            f"{base}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            reply.read()
        return to_ready, time.monotonic() - launched
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin", help="builtin, tiny or a model folder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds one start may take")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    from bench.inprocess import resolve_model

    model_path = resolve_model(args.model)  # built or converted once, before any timing
    server_model = args.model if args.model == "builtin" else str(model_path)
    missing = transformers_serve_missing()
    results: dict[str, list[tuple[float, float]]] = {"modelpool": [], "transformers serve": []}
    for _ in range(args.repeats):
        results["modelpool"].append(measure_modelpool(server_model, args.out_dir, args.timeout))
        if missing is None:
            results["transformers serve"].append(measure_transformers_serve(model_path, args.out_dir, args.timeout))
    rows = []
    for name, runs in results.items():
        if not runs:
            continue
        rows.append(
            [
                name,
                f"{statistics.median(r[0] for r in runs):.2f}",
                f"{statistics.median(r[1] for r in runs):.2f}",
                ", ".join(f"{r[1]:.2f}" for r in runs),
            ]
        )
    print(f"Start-up, {args.model}, median of {args.repeats}\n")
    print(render_table(["server", "launch → ready s", "launch → first answer s", "first answer, each run s"], rows))
    if missing is not None:
        print(f"\ntransformers serve not measured: {missing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
