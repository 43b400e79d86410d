"""The external tools that client and contract tests run (Go, protoc, grpcurl, buf), found where `make tools`
(.ci/install-tools) puts them. A missing tool fails the test with the command that installs it: these tests
have no skip."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.server_process import REPO

TOOLS_DIR = REPO / ".cache" / "tools"
# Debian's golang-*-dev packages put their sources here; GOPATH mode builds against them offline.
DEBIAN_GOPATH = Path("/usr/share/gocode")
GO_IMPORT_PATH = "github.com/modelpool/modelpool/clients/go"
GOPATH = REPO / ".cache" / "gopath"


def require(name: str) -> str:
    """The path of a tool, looked up in the venv, .cache/tools and PATH; fails the test when it is missing."""
    search = os.pathsep.join([str(Path(sys.executable).parent), str(TOOLS_DIR / "node_modules" / ".bin"),
                              os.environ.get("PATH", "")])
    found = shutil.which(name, path=search)
    if found is None:
        pytest.fail(f"{name} is missing: run `make tools` (.ci/install-tools installs it)", pytrace=False)
    return found


def go_workdir() -> Path:
    """clients/go as seen from a GOPATH: `.cache/gopath/src/<import path>` is a link to it."""
    link = GOPATH / "src" / GO_IMPORT_PATH
    if not link.is_symlink():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(REPO / "clients" / "go")
    return link


def go_env(**extra: str) -> dict[str, str]:
    """GOPATH mode: this tree first, then Debian's sources; no module proxy is needed (or reachable)."""
    return {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": f"{GOPATH}{os.pathsep}{DEBIAN_GOPATH}",
        "GOFLAGS": "",
        "GOCACHE": str(REPO / ".cache" / "go-build"),
        "PWD": str(go_workdir()),
        **extra,
    }
