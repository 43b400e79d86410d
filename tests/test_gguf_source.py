"""GGUF files as a model source, and the checks every source passes before the server reports SERVING.

A `.gguf` file is converted once to a safetensors folder whose name carries the file's SHA-256: the same
content is never converted twice (not even when the file is touched), a changed file is converted again. The
tiny GGUF file (tests/tiny_gguf.py) holds the tiny model's weights in llama.cpp's layout, so the conversion must
give those weights back exactly, and a server must answer with the same greedy tokens from both.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from modelpool import Client
from service import model_source
from service.config import ModelConfig
from service.served_model import ServedModel
from service.sources.errors import ModelSourceError
from tests import tiny_gguf
from tests.conftest import write_config
from tests.server_process import REPO, ServerProcess, free_port
from workers import gguf_cache


@pytest.fixture(scope="module")
def gguf_cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("modelpool-cache")


@pytest.fixture(scope="module")
def tiny_gguf_file(tmp_path_factory, tiny_dir):
    return tiny_gguf.write(tiny_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def cache_env(gguf_cache_root, monkeypatch):
    monkeypatch.setenv("MODELPOOL_CACHE", str(gguf_cache_root))
    return gguf_cache_root


def test_a_gguf_file_is_converted_once_per_content(tiny_gguf_file, tiny_dir, cache_env, monkeypatch, tmp_path):
    folder = model_source.resolve(str(tiny_gguf_file))
    assert folder.parent == cache_env and folder.name.startswith("tiny-")
    assert gguf_cache.digest(tiny_gguf_file)[:16] in folder.name
    # The tiny model's own weights, tensor by tensor (llama.cpp's q/k permutation undone).
    converted, original = load_file(folder / "model.safetensors"), load_file(tiny_dir / "model.safetensors")
    assert sorted(converted) == sorted(original)
    assert all((converted[name] == original[name]).all() for name in original)

    def no_conversion(*args, **kwargs):
        raise AssertionError(f"converted again: {args}")

    monkeypatch.setattr(model_source.subprocess, "run", no_conversion)
    # The same content: the same folder, nothing converted, even with a new modification time.
    os.utime(tiny_gguf_file, ns=(1, 1))
    assert model_source.resolve(str(tiny_gguf_file)) == folder
    # A copy elsewhere: keyed by content, not by path.
    copy = tmp_path / "tiny.gguf"
    shutil.copy(tiny_gguf_file, copy)
    assert model_source.resolve(str(copy)) == folder
    monkeypatch.undo()
    monkeypatch.setenv("MODELPOOL_CACHE", str(cache_env))

    # Other content under the same name (another model's weights, e.g. a new download): converted again.
    changed = tmp_path / "changed"
    changed.mkdir()
    state = load_file(tiny_dir / "model.safetensors")
    for item in tiny_dir.iterdir():
        shutil.copy(item, changed / item.name)
    from safetensors.torch import save_file

    state["model.norm.weight"] = state["model.norm.weight"] * 2
    save_file(state, changed / "model.safetensors", metadata={"format": "pt"})
    tiny_gguf.write(changed, copy)
    again = model_source.resolve(str(copy))
    assert again != folder and again.name.startswith("tiny-")
    assert (load_file(again / "model.safetensors")["model.norm.weight"] == state["model.norm.weight"]).all()
    assert json.loads((cache_env / ".gguf-digests.json").read_text())


@pytest.mark.slow
def test_a_server_serves_a_gguf_file_with_the_same_tokens_as_its_folder(tiny_gguf_file, tiny_dir, cache_env, tmp_path):
    config = write_config(
        tmp_path / "c.toml",
        f"""
        [[models]]
        name = "folder"
        source = "{tiny_dir}"
        [[models.workers]]
        threads = 1
        [[models]]
        name = "gguf"
        source = "{tiny_gguf_file}"
        [[models.workers]]
        threads = 1
        """,
    )
    proc = ServerProcess(["--config", str(config)], tmp_path / "server.log", env={"MODELPOOL_CACHE": str(cache_env)})
    try:
        proc.wait_serving()
        with Client(proc.target, timeout=60) as client:
            for prompt in ("The capital of France is", "1, 2, 3,"):
                a = client.generate(prompt, model="folder", max_new_tokens=12, ignore_eos=True)
                b = client.generate(prompt, model="gguf", max_new_tokens=12, ignore_eos=True)
                assert a.token_ids == b.token_ids and len(a.token_ids) == 12
            (info,) = [m for m in client.models() if m.name == "gguf"]
            assert info.source == str(tiny_gguf_file) and info.has_chat_template
    finally:
        proc.stop()


def test_folders_without_weights_or_config_are_refused_with_what_to_do(tiny_dir, tiny_gguf_file, tmp_path):
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ModelSourceError, match=r"no weights \(\*\.safetensors or \*\.bin\).*modelpool pull"):
        model_source.resolve(str(no_weights))
    shutil.copy(tiny_gguf_file, no_weights / "tiny.gguf")
    with pytest.raises(ModelSourceError, match=re.escape("GGUF files (tiny.gguf): give one of them as the source")):
        model_source.resolve(str(no_weights))
    with pytest.raises(ModelSourceError, match=re.escape("has no config.json")):
        model_source.resolve(str(tmp_path))
    with pytest.raises(ModelSourceError, match=re.escape("must be a .gguf file")):
        model_source.resolve(str(tiny_dir / "config.json"))
    with pytest.raises(ModelSourceError, match="no such folder or file"):
        model_source.resolve("./not/here/either")


@pytest.mark.parametrize(
    ("model_type", "message"),
    [
        ("not-an-architecture", "transformers cannot read its config"),
        ("t5", "is not a causal language model"),
    ],
)
def test_an_architecture_transformers_cannot_generate_with_is_refused(tiny_dir, tmp_path, model_type, message):
    folder = tmp_path / model_type
    shutil.copytree(tiny_dir, folder)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ModelSourceError, match=f"model 'odd' \\({folder}\\): .*{message}"):
        ServedModel.load(ModelConfig(name="odd", source=str(folder)), model_source.resolve(str(folder)))


def test_serve_exits_non_zero_before_serving_half_a_config(tiny_dir, tmp_path):
    """One good model and one without weights: the process says which and exits 1; it never serves the good one."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    config = write_config(
        tmp_path / "c.toml",
        f"""
        [[models]]
        name = "good"
        source = "{tiny_dir}"
        [[models]]
        name = "broken"
        source = "{broken}"
        """,
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--metrics-port",
            "0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert f"modelpool serve: {broken}: {broken} has no weights" in result.stderr
    assert "serving good" not in result.stderr
