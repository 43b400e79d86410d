"""The contract cannot change silently: buf lint, buf breaking against the released contract (proto/baseline/),
which a deliberately broken copy fails, and committed generated code (Python and Go) that matches proto/."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys

import pytest

from tests.server_process import REPO
from tests.tools import require

PROTO = "modelpool/v1/generation.proto"
PYTHON_STUBS = ("generation_pb2.py", "generation_pb2.pyi", "generation_pb2_grpc.py", "generation_pb2_grpc.pyi")
GO_STUBS = ("generation.pb.go", "generation_grpc.pb.go")


def buf(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([require("buf"), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_buf_lint_is_clean():
    result = buf("lint", "proto")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_passes_against_the_released_contract():
    result = buf("breaking", "proto", "--against", "proto/baseline")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("change", "old", "new", "complaint"),
    [
        ("field number", "uint32 max_new_tokens = 1;", "uint32 max_new_tokens = 7;", "max_new_tokens"),
        ("removed rpc", "  rpc ListModels(ListModelsRequest) returns (ListModelsResponse);\n", "", "ListModels"),
        ("field type", "string text_delta = 1;", "bytes text_delta = 1;", "text_delta"),
    ],
)
def test_buf_breaking_fails_on_a_broken_copy(tmp_path, change, old, new, complaint):
    copy = tmp_path / "proto"
    shutil.copytree(REPO / "proto", copy, ignore=shutil.ignore_patterns("baseline"))
    source = copy / PROTO
    text = source.read_text()
    assert old in text, change
    source.write_text(text.replace(old, new, 1))
    result = buf("breaking", str(copy), "--against", str(REPO / "proto" / "baseline"))
    assert result.returncode != 0, f"buf breaking accepted a {change} change"
    assert complaint in result.stdout + result.stderr


def assert_same_as_committed(generated_root, client: str, names) -> None:
    """Each freshly generated stub under `generated_root` equals the one committed under `client`."""
    for name in names:
        committed = REPO / client / "modelpool" / "v1" / name
        assert filecmp.cmp(generated_root / "modelpool" / "v1" / name, committed, shallow=False), (
            f"{client}/modelpool/v1/{name} is stale: run `make proto`"
        )


def test_python_stubs_are_fresh(tmp_path):
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", "-I", "proto",
            f"--plugin=protoc-gen-mypy={require('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={require('protoc-gen-mypy_grpc')}",
            f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
            f"--mypy_out={tmp_path}", f"--mypy_grpc_out={tmp_path}", PROTO,
        ],
        cwd=REPO,
        check=True,
    )
    assert_same_as_committed(tmp_path, "clients/python", PYTHON_STUBS)


def test_go_stubs_are_fresh(tmp_path):
    subprocess.run(
        [
            require("protoc"), "-I", "proto",
            f"--plugin=protoc-gen-go={require('protoc-gen-go')}",
            f"--plugin=protoc-gen-go-grpc={require('protoc-gen-go-grpc')}",
            f"--go_out=paths=source_relative:{tmp_path}", f"--go-grpc_out=paths=source_relative:{tmp_path}", PROTO,
        ],
        cwd=REPO,
        check=True,
    )
    assert_same_as_committed(tmp_path, "clients/go", GO_STUBS)
