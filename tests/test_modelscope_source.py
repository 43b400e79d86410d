"""`modelscope:ORG/NAME` models (service/sources/modelscope.py), with no internet: the real `modelscope` package
(1.40) talks to a fake ModelScope on 127.0.0.1 (tests/fake_modelscope.py) through MODELSCOPE_ENDPOINT, or to a
closed port, or only to a cache laid out the way modelscope writes it.

modelscope reads its environment once per process (constants at import, a default config on first use), so every
resolution runs in a child process with its own MODELSCOPE_* environment; the fake runs in the test process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from service import model_source
from service.sources import modelscope as ms_source
from tests.fake_modelscope import FakeModelScope, Repo, folder_files
from tests.server_process import REPO, ServerProcess, free_port

pytest.importorskip("modelscope", reason="the optional modelscope extra is not installed")

MODEL = "test-org/tiny-0.5B"  # a dot in the name: modelscope <= 1.37 wrote it as tiny-0___5B
BIN_ONLY = "test-org/bin-only"
PRIVATE = "test-org/private"
GGUF_ONLY = "test-org/gguf-only"
TOKEN = "good-token"

# Files a repo often has besides what a causal LM needs: none of them may be fetched.
NOT_NEEDED = {
    "pytorch_model.bin": b"torch weights: the safetensors are preferred",
    "tf_model.h5": b"tensorflow weights",
    "flax_model.msgpack": b"flax weights",
    "onnx/model.onnx": b"onnx export",
    "onnx/config.json": b"{}",
    "consolidated.safetensors": b"original-format weights",
    "README.md": b"# tiny",
    "configuration.json": b'{"framework": "pytorch"}',  # modelscope's own metadata: small, harmless, fetched
}

_RESOLVE = textwrap.dedent(
    """
    import json, sys
    from service import model_source
    out = []
    for model_id, revision in json.loads(sys.argv[1]):
        try:
            out.append({"path": str(model_source.resolve("modelscope:" + model_id, revision))})
        except model_source.ModelSourceError as exc:
            out.append({"error": str(exc)})
    print("RESULT " + json.dumps(out))
    """
)


def resolve_in_child(env: dict[str, str], *calls: tuple[str, str | None]) -> list[dict[str, str]]:
    """service.model_source.resolve("modelscope:" + id, revision) for each call, in one child process."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MODELSCOPE_")}
    result = subprocess.run(
        [sys.executable, "-c", _RESOLVE, json.dumps(calls)],
        cwd=REPO,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def env_for(tmp: Path, endpoint: str, **extra: str) -> dict[str, str]:
    # MODELSCOPE_HOME: where modelscope keeps a saved login; an empty one keeps the user's own out of the tests.
    return {
        "MODELSCOPE_ENDPOINT": endpoint,
        "MODELSCOPE_CACHE": str(tmp / "cache"),
        "MODELSCOPE_HOME": str(tmp / "home"),
        **extra,
    }


def closed_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: ModelScope unreachable


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_dir):
    """A fake ModelScope, and the results of resolving its repos into an empty MODELSCOPE_CACHE."""
    tmp = tmp_path_factory.mktemp("modelscope")
    tiny = folder_files(tiny_dir)
    v1 = {**tiny, "generation_config.json": b'{"marker": "v1.0"}'}
    repos = {
        MODEL: Repo({"master": {**tiny, **NOT_NEEDED}, "v1.0": v1}),
        BIN_ONLY: Repo(
            {
                "master": {
                    **{k: v for k, v in tiny.items() if k != "model.safetensors"},
                    "pytorch_model.bin": b"torch weights",
                    "training_args.bin": b"not weights",
                    "tf_model.h5": b"tensorflow weights",
                }
            }
        ),
        PRIVATE: Repo({"master": tiny}, token=TOKEN),
        GGUF_ONLY: Repo({"master": {"config.json": tiny["config.json"], "model-q4.gguf": b"GGUF"}}),
    }
    with FakeModelScope(repos) as fake:
        env = env_for(tmp, fake.endpoint)
        calls = [
            (MODEL, None),
            (MODEL, "v1.0"),
            (MODEL, "v9"),
            (BIN_ONLY, None),
            ("test-org/missing", None),
            (PRIVATE, None),
            (GGUF_ONLY, None),
            ("no-org", None),
        ]
        results = dict(zip(calls, resolve_in_child(env, *calls), strict=True))
        wrong = resolve_in_child({**env, "MODELSCOPE_API_TOKEN": "wrong-token"}, (PRIVATE, None))[0]
        right = resolve_in_child({**env, "MODELSCOPE_API_TOKEN": TOKEN}, (PRIVATE, None))[0]
        yield {"tmp": tmp, "fake": fake, "results": results, "wrong_token": wrong, "right_token": right, "tiny": tiny}


def test_download_goes_through_the_endpoint_into_modelscope_cache_in_its_layout(hub):
    path = Path(hub["results"][(MODEL, None)]["path"])
    # modelscope 1.40's layout: ORG--NAME/snapshots/REVISION, the dotted name as it is.
    assert path == hub["tmp"] / "cache" / "models" / "test-org--tiny-0.5B" / "snapshots" / "master"
    for name, data in hub["tiny"].items():
        assert (path / name).read_bytes() == data, name


def test_only_the_files_a_causal_lm_needs_are_fetched(hub):
    fake = hub["fake"]
    # configuration.json is modelscope's own metadata (a small .json); everything else beyond tiny is not needed.
    assert fake.downloaded(MODEL, "master") == set(hub["tiny"]) | {"configuration.json"}
    # No safetensors in the repo: its torch weights, and only those .bin files.
    assert fake.downloaded(BIN_ONLY) == (set(hub["tiny"]) - {"model.safetensors"}) | {"pytorch_model.bin"}
    assert Path(hub["results"][(BIN_ONLY, None)]["path"], "pytorch_model.bin").is_file()


def test_a_revision_is_honoured(hub):
    path = Path(hub["results"][(MODEL, "v1.0")]["path"])
    assert path.name == "v1.0"
    assert json.loads((path / "generation_config.json").read_text()) == {"marker": "v1.0"}
    assert hub["fake"].downloaded(MODEL, "v1.0") == set(hub["tiny"])
    error = hub["results"][(MODEL, "v9")]["error"]
    assert "modelscope:test-org/tiny-0.5B (revision v9)" in error and "no such model or revision" in error


def test_not_found_says_which_model_and_what_to_do(hub):
    error = hub["results"][("test-org/missing", None)]["error"]
    assert error.startswith("modelscope:test-org/missing: no such model on ")
    assert "check the id" in error and "MODELSCOPE_API_TOKEN" in error  # a private model looks missing
    assert "expected modelscope:ORG/NAME" in hub["results"][("no-org", None)]["error"]


def test_unauthorised_says_to_set_a_token_or_log_in(hub):
    for error in (hub["results"][(PRIVATE, None)]["error"], hub["wrong_token"]["error"]):  # 401, then 403
        assert error.startswith(f"modelscope:{PRIVATE}: not authorised by ")
        assert "MODELSCOPE_API_TOKEN" in error and "modelscope login" in error
    assert Path(hub["right_token"]["path"], "model.safetensors").is_file()


def test_a_repo_without_loadable_weights_is_refused_before_serving(hub):
    error = hub["results"][(GGUF_ONLY, None)]["error"]
    assert error.startswith(f"modelscope:{GGUF_ONLY}: ") and "no weights" in error


def test_unreachable_modelscope_falls_back_to_the_cache(hub):
    # One listing attempt instead of modelscope's four (1 + 2 + 4 s of back-off): the fallback doesn't depend on it.
    env = env_for(hub["tmp"], closed_endpoint(), MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS="1")
    cached, missing = resolve_in_child(env, (MODEL, None), ("test-org/never-downloaded", None))
    assert cached["path"] == hub["results"][(MODEL, None)]["path"]
    assert missing["error"].startswith("modelscope:test-org/never-downloaded: ")
    assert "unreachable" in missing["error"] and "not in the ModelScope cache" in missing["error"]
    assert str(hub["tmp"] / "cache") in missing["error"]


def test_modelscope_offline_uses_only_the_cache(hub):
    env = env_for(hub["tmp"], closed_endpoint(), MODELSCOPE_OFFLINE="1")
    master, v1, other = resolve_in_child(env, (MODEL, None), (MODEL, "v1.0"), (MODEL, "v2"))
    assert master["path"] == hub["results"][(MODEL, None)]["path"]
    assert v1["path"] == hub["results"][(MODEL, "v1.0")]["path"]
    assert other["error"].startswith("modelscope:test-org/tiny-0.5B (revision v2): MODELSCOPE_OFFLINE is set")
    assert "not in the ModelScope cache" in other["error"]


def legacy_copy(tiny_dir: Path, root: Path) -> Path:
    """The tiny model where modelscope <= 1.37 put MODEL: ORG/NAME with each dot in NAME written as `___`."""
    folder = root / "models" / "test-org" / "tiny-0___5B"
    shutil.copytree(tiny_dir, folder)
    return folder


@pytest.mark.parametrize("where", ["MODELSCOPE_CACHE", "default cache"])
def test_a_cache_in_modelscopes_dotless_layout_is_found_without_network(tmp_path, tiny_dir, where):
    env = env_for(tmp_path, closed_endpoint(), MODELSCOPE_OFFLINE="1")
    if where == "MODELSCOPE_CACHE":
        folder = legacy_copy(tiny_dir, tmp_path / "cache")
    else:
        # Without MODELSCOPE_CACHE, old modelscope wrote under ~/.cache/modelscope/hub.
        del env["MODELSCOPE_CACHE"]
        env["HOME"] = str(tmp_path)
        folder = legacy_copy(tiny_dir, tmp_path / ".cache" / "modelscope" / "hub")
    [result] = resolve_in_child(env, (MODEL, None))
    assert result["path"] == str(folder)


def test_a_cache_in_modelscopes_dotless_layout_is_reused_not_downloaded_again(tmp_path, tiny_dir):
    folder = legacy_copy(tiny_dir, tmp_path / "cache")
    with FakeModelScope({MODEL: Repo({"master": folder_files(tiny_dir)})}) as fake:
        [result] = resolve_in_child(env_for(tmp_path, fake.endpoint), (MODEL, None))
        assert fake.requests, "modelscope did not ask the endpoint for the file list"
        assert fake.downloaded(MODEL) == set()  # every cached file matched the listed sha256
    assert result["path"] == str(folder)


def test_modelscope_named_folders_load_as_plain_checkpoints(hub, tiny_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A ModelScope cache folder copied elsewhere keeps its name: ORG/NAME with dots written as `___`.
    shutil.copytree(tiny_dir, tmp_path / "Qwen" / "Qwen1___5-0___5B-Chat")
    monkeypatch.chdir(tmp_path)
    local = model_source.resolve("Qwen/Qwen1___5-0___5B-Chat")  # an existing folder, not a hub id
    assert local == tmp_path / "Qwen" / "Qwen1___5-0___5B-Chat"
    assert model_source.resolve(str(local)) == local
    downloaded = Path(hub["results"][(MODEL, None)]["path"])  # .../test-org--tiny-0.5B/snapshots/master
    for folder in (local, downloaded):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.model_type == "llama"
        assert tokenizer.decode(tokenizer("Paris")["input_ids"], skip_special_tokens=True) == "Paris"


def test_without_the_modelscope_package_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # what `import modelscope` meets when it isn't installed
    with pytest.raises(model_source.ModelSourceError) as caught:
        ms_source.resolve(MODEL, None)
    assert str(caught.value).startswith(f"modelscope:{MODEL}: needs the modelscope package")
    assert "pip install 'modelpool[modelscope]'" in str(caught.value) and "pip install modelscope" in str(caught.value)


@pytest.mark.slow
def test_the_server_serves_a_model_it_fetched_into_modelscope_cache(tmp_path, tiny_dir):
    from modelpool import Client

    config = tmp_path / "modelpool.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [server]
            default_model = "ms"

            [[models]]
            name = "ms"
            source = "modelscope:{MODEL}"
            [[models.workers]]
            threads = 1
            """
        )
    )
    with FakeModelScope({MODEL: Repo({"master": {**folder_files(tiny_dir), **NOT_NEEDED}})}) as fake:
        server = ServerProcess(["--config", str(config)], tmp_path / "server.log", env=env_for(tmp_path, fake.endpoint))
        try:
            server.wait_serving()
            with Client(server.target, timeout=120) as client:
                reply = client.generate("Hello", max_new_tokens=4, ignore_eos=True)
        finally:
            server.stop()
    assert reply.model == "ms" and reply.usage.completion_tokens == 4
    # The server's own MODELSCOPE_CACHE got the snapshot, in modelscope's layout.
    snapshot = tmp_path / "cache" / "models" / "test-org--tiny-0.5B" / "snapshots" / "master"
    assert (snapshot / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    assert fake.downloaded(MODEL) == set(folder_files(tiny_dir)) | {"configuration.json"}
