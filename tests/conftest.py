"""Session fixtures: the tiny models, and real servers started as subprocesses."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from modelpool import Client
from tests import figures, tiny_model
from tests.helpers import SLOW_FAULT, tiny_and_slow_models
from tests.server_process import REPO, ServerProcess
from workers.faults import ENV as FAULTS_ENV

MODELS_DIR = REPO / ".cache" / "test-models"


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return tiny_model.build(MODELS_DIR / "tiny")


@pytest.fixture(scope="session")
def tiny_nochat_dir() -> Path:
    return tiny_model.build(MODELS_DIR / "tiny-nochat", chat_template=False)


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=200, help="requests the gRPC fuzz test sends (full: 1000)")
    parser.addoption("--soak-seconds", type=float, default=20.0, help="how long the soak test loads the server")


def write_config(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_dir, tiny_nochat_dir):
    """One server for most tests, with several models:
    - tiny: two workers, given CUDA_VISIBLE_DEVICES 0 and 1 (on a CPU-only machine they still run on the CPU);
    - nochat: a tokenizer without a chat template;
    - limited: one sequence at a time and a queue of one, to reach RESOURCE_EXHAUSTED;
    - fragile: one worker that a test kills;
    - interval: four tokens per stream message after the first;
    - builtin: SmolLM2-135M-Instruct, for real text."""
    tmp = tmp_path_factory.mktemp("server")
    config = write_config(
        tmp / "modelpool.toml",
        f"""
        [server]
        default_model = "tiny"
        restart_backoff_s = 0.5
        memory_interval_s = 0.5

        [[models]]
        name = "tiny"
        source = "{tiny_dir}"
        max_batch_size = 8
        [[models.workers]]
        devices = [0]
        threads = 1
        [[models.workers]]
        devices = [1]
        threads = 1

        [[models]]
        name = "nochat"
        source = "{tiny_nochat_dir}"
        [[models.workers]]
        threads = 1

        [[models]]
        name = "limited"
        source = "{tiny_dir}"
        max_batch_size = 1
        max_queue = 1
        [[models.workers]]
        threads = 1

        [[models]]
        name = "fragile"
        source = "{tiny_dir}"
        [[models.workers]]
        threads = 1

        [[models]]
        name = "interval"
        source = "{tiny_dir}"
        stream_interval = 4
        [[models.workers]]
        threads = 1

        [[models]]
        name = "builtin"
        source = "builtin"
        [[models.workers]]
        threads = 2
        """,
    )
    proc = ServerProcess(["--config", str(config)], tmp / "server.log")
    try:
        proc.wait_serving()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def chaos_server(tmp_path_factory, tiny_dir):
    """A server for the reliability tests, whose workers tests may kill, slow down or run out of memory:
    - tiny: two workers, eight sequences each, a queue of 64;
    - slow: two workers whose every forward pass takes 10 ms longer (injected), so requests stay in flight;
    - oom: one worker that runs out of memory (injected) on prompts longer than 64 tokens."""
    tmp = tmp_path_factory.mktemp("chaos")
    config = write_config(
        tmp / "modelpool.toml",
        f"""
        [server]
        default_model = "tiny"
        restart_backoff_s = 0.2
        memory_interval_s = 0.5

        [[models]]
        name = "tiny"
        source = "{tiny_dir}"
        max_batch_size = 8
        max_queue = 64
        [[models.workers]]
        replicas = 2
        threads = 1

        [[models]]
        name = "slow"
        source = "{tiny_dir}"
        max_batch_size = 16
        max_queue = 8
        [[models.workers]]
        replicas = 2
        threads = 1

        [[models]]
        name = "oom"
        source = "{tiny_dir}"
        [[models.workers]]
        threads = 1
        """,
    )
    proc = ServerProcess(
        ["--config", str(config)], tmp / "server.log", env={FAULTS_ENV: "slow:slow_step_ms=10,oom:oom_prompt_tokens=64"}
    )
    try:
        proc.wait_serving()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def edge_server(tmp_path_factory, tiny_dir):
    """A server for the client tests (Go, grpcurl, the Python client installed alone), one worker each:
    - tiny: the default model;
    - slow: every forward pass takes 200 ms longer (injected), so a 400-token stream runs for minutes and a test
      can see that cancelling it is what frees its slot."""
    tmp = tmp_path_factory.mktemp("edge")
    config = write_config(
        tmp / "modelpool.toml",
        """
        [server]
        default_model = "tiny"
        """
        + tiny_and_slow_models(tiny_dir),
    )
    proc = ServerProcess(["--config", str(config)], tmp / "server.log", env={FAULTS_ENV: SLOW_FAULT})
    try:
        proc.wait_serving()
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def client(server):
    with Client(server.target, timeout=120) as c:
        yield c


def pytest_terminal_summary(terminalreporter):
    lines = figures.table()
    if lines:
        terminalreporter.section("reliability figures")
        for line in lines:
            terminalreporter.write_line(line)
