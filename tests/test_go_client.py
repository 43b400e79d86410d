"""The Go client (clients/go) against a live server: its own `go test ./...`, and the example command.

Go builds in GOPATH mode against Debian's golang-*-dev packages (see tests/tools.py); .ci/run installs them."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.tools import go_env, go_workdir, require

pytestmark = pytest.mark.slow

GO_TESTS = (
    "TestGenerate",
    "TestStreamDeltasConcatenateToTheUnaryText",
    "TestCancellingTheContextFreesTheWorkerSlot",
    "TestClosingAStreamFreesTheWorkerSlot",
    "TestErrorsAreStatuses",
    "TestDeadlineOption",
    "TestMetadataReachesTheServer",
    "TestListModels",
    "TestEachStopsOnTheCallbacksError",
)


def go(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [require("go"), *args], cwd=go_workdir(), env=go_env(**env), capture_output=True, text=True, timeout=900
    )


def test_go_vet_and_gofmt_are_clean():
    result = go("vet", "./...")
    assert result.returncode == 0, result.stdout + result.stderr
    unformatted = subprocess.run([require("gofmt"), "-l", "."], cwd=go_workdir(), capture_output=True, text=True)
    assert unformatted.returncode == 0 and not unformatted.stdout.strip(), f"gofmt -w: {unformatted.stdout}"


def test_go_tests_pass_against_a_live_server(edge_server):
    result = go("test", "-count=1", "-v", "./...", MODELPOOL_TARGET=edge_server.target)
    print(result.stdout[-6000:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    passed = set(re.findall(r"^--- PASS: (\w+)", result.stdout, re.M))
    assert passed >= set(GO_TESTS), f"did not pass: {set(GO_TESTS) - passed}"


def test_go_tests_fail_without_a_server():
    """The Go tests need a server; without one they say so rather than pass."""
    result = go("test", "-count=1", "./modelpool/", MODELPOOL_TARGET="")
    assert result.returncode != 0
    assert "MODELPOOL_TARGET is not set" in result.stdout + result.stderr


def test_example_command_streams_a_chat_answer(edge_server, tmp_path):
    binary = tmp_path / "modelpool-chat"
    built = go("build", "-o", str(binary), "./cmd/modelpool-chat")
    assert built.returncode == 0, built.stderr
    result = subprocess.run(
        [str(binary), "-target", edge_server.target, "-max-new-tokens", "12", "-usage", "Hello", "there"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "completion_tokens=12" in result.stderr or "finish=FINISH_REASON_END_OF_SEQUENCE" in result.stderr

    missing = subprocess.run(
        [str(binary), "-target", edge_server.target, "-model", "nope", "hi"], capture_output=True, text=True,
        timeout=120,
    )
    assert missing.returncode == 1
    assert "NotFound" in missing.stderr and "'nope'" in missing.stderr
