"""The client package installed alone in a fresh venv: no torch, no server code, and its CLI works against a
live server (and says what to install for `serve`)."""

from __future__ import annotations

import os
import subprocess
import sys
import venv

import pytest

from tests.server_process import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("client-venv")
    venv.EnvBuilder(with_pip=True).create(root)
    python = root / "bin" / "python"
    # A real (not editable) install from the package's folder, with its declared dependencies only.
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(REPO / "clients" / "python")],
        capture_output=True, text=True, timeout=600,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return root


def run(root, *args, **kwargs) -> subprocess.CompletedProcess:
    # Run from outside the repository, with a clean environment, so nothing of the checkout can be imported.
    env = {"PATH": f"{root / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, cwd=root, env=env, **kwargs)


def test_installs_without_torch_or_the_server(client_venv):
    probe = (
        "import importlib.util as u, modelpool, modelpool.cli, modelpool.client, sys; "
        "print([m for m in ('torch', 'transformers', 'service', 'workers') if u.find_spec(m)]); "
        "print(modelpool.__file__)"
    )
    result = run(client_venv, str(client_venv / "bin" / "python"), "-c", probe)
    assert result.returncode == 0, result.stderr
    found, location = result.stdout.splitlines()
    assert found == "[]"
    assert str(client_venv) in location and str(REPO) not in location
    freeze = run(client_venv, str(client_venv / "bin" / "python"), "-m", "pip", "freeze").stdout.lower()
    assert "modelpool-client" in freeze and "modelpool-server" not in freeze and "torch" not in freeze


def test_generate_and_models_against_a_live_server(client_venv, edge_server):
    modelpool = str(client_venv / "bin" / "modelpool")
    generated = run(client_venv, modelpool, "generate", "Hello", "--target", edge_server.target,
                    "--max-new-tokens", "6", "--usage")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.strip()
    assert "completion_tokens=" in generated.stderr
    models = run(client_venv, modelpool, "models", "--target", edge_server.target)
    assert models.returncode == 0, models.stderr
    assert "tiny (default)" in models.stdout and "slow" in models.stdout
    missing = run(client_venv, modelpool, "generate", "x", "--target", edge_server.target, "--model", "nope")
    assert missing.returncode == 1
    assert "NOT_FOUND: model 'nope'" in missing.stderr


def test_serve_without_the_server_package_says_what_to_install(client_venv):
    result = run(client_venv, str(client_venv / "bin" / "modelpool"), "serve", "--model", "builtin")
    assert result.returncode == 2
    assert "pip install modelpool-server" in result.stderr
    help_text = run(client_venv, str(client_venv / "bin" / "modelpool"), "--help").stdout
    assert "needs the modelpool-server package" in help_text


def test_the_server_adds_serve_through_the_entry_point_group():
    """In the full install, `modelpool serve` is the server's command, found through `modelpool.commands`."""
    result = subprocess.run(
        [sys.executable, "-m", "modelpool.cli", "serve", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "usage: modelpool serve" in result.stdout and "--device-map" in result.stdout
