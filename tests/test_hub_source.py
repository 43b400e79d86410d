"""Hub models and `modelpool pull`, against a fake hub (tests/fake_hub.py) reached through HF_ENDPOINT.

Pulls and servers run as subprocesses with HF_* set in their environment, as a user runs them: huggingface_hub
reads some of those variables once, at import time. Nothing here reaches beyond 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from modelpool import Client
from service import model_source
from service import pull as pull_command
from service.sources import hub as hub_source
from service.sources.errors import ModelSourceError
from tests.fake_hub import FakeHub, sha256
from tests.helpers import wait_until
from tests.server_process import REPO, ServerProcess, free_port

READER = "hf_reader"  # may read org/private and org/gated
OTHER = "hf_other"  # a valid token of an account without that access
# In the listing, never to be fetched: other formats' weights, a subfolder, a README.
DECOYS = {
    "pytorch_model.bin": b"not the weights this repo is served from" * 100,
    "tf_model.h5": b"HDF5 decoy",
    "flax_model.msgpack": b"msgpack decoy",
    "onnx/model.onnx": b"onnx decoy",
    "README.md": b"# tiny\n",
}
TINY_FILES = {
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def tiny_files(tiny_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in tiny_dir.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def hub(tiny_dir, tiny_files):
    """org/tiny (main, and an older commit tagged v1 with another config and one more file), org/tiny-bin (PyTorch
    .bin weights only), org/private (READER only) and org/gated (READER accepted its licence)."""
    import torch
    from safetensors.torch import load_file

    fake = FakeHub(tokens=[READER, OTHER])
    v1_config = {**json.loads(tiny_files["config.json"]), "modelpool_test_revision": "v1"}
    fake.v1 = fake.add_commit(
        "org/tiny",
        {**tiny_files, "config.json": json.dumps(v1_config).encode(), "v1-notes.txt": b"only in v1\n"},
        refs=["v1"],
    )
    fake.main = fake.add_commit("org/tiny", {**tiny_files, **DECOYS}, refs=["main"])
    weights = io.BytesIO()
    torch.save(load_file(str(tiny_dir / "model.safetensors")), weights)
    fake.add_commit(
        "org/tiny-bin",
        {
            **{k: v for k, v in tiny_files.items() if k != "model.safetensors"},
            "pytorch_model.bin": weights.getvalue(),
            "tf_model.h5": b"HDF5 decoy",
        },
    )
    fake.add_commit("org/private", tiny_files, private=True, readers=[READER])
    fake.add_commit("org/gated", tiny_files, gated=True, readers=[READER])
    with fake:
        yield fake


@pytest.fixture
def cache(tmp_path, hub) -> Path:
    hub.restore()
    hub.clear()
    return tmp_path / "hub-cache"


def hub_env(hub: FakeHub, cache: Path, **extra: str) -> dict[str, str]:
    """The environment of a user pointed at the fake hub: no proxy, no token or hub setting from this machine."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not k.startswith("HF_") and k != "TRANSFORMERS_OFFLINE"
    }
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HUB_CACHE=str(cache),
        HF_HOME=str(cache.parent / "hf-home"),  # no stored token
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1",
    )
    env.update(extra)
    return env


def pull(hub: FakeHub, cache: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelpool.cli", "pull", *args],
        cwd=REPO,
        env=hub_env(hub, cache, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def snapshot(cache: Path, repo: str, commit: str) -> Path:
    return cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit


def requested_files(hub: FakeHub) -> set[str]:
    """Files the hub was asked about (HEAD or GET of /resolve/)."""
    return {s.path.split("/resolve/", 1)[1].split("/", 1)[1] for s in hub.seen() if "/resolve/" in s.path}


@pytest.mark.slow
def test_pull_then_serve_offline(hub, cache, tmp_path):
    """A pull fetches only what the model needs into the hub cache, in its layout, showing progress; a server then
    starts from that cache with HF_HUB_OFFLINE=1, asking the hub nothing, and generates."""
    result = pull(hub, cache, "hf:org/tiny")
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path == snapshot(cache, "org/tiny", hub.main)
    assert {p.name for p in path.iterdir()} == TINY_FILES
    # The hub cache's layout, used in place: links into blobs/, and refs/main naming the commit.
    assert all(p.is_symlink() and p.resolve().parent.name == "blobs" for p in path.iterdir())
    assert (cache / "models--org--tiny" / "refs" / "main").read_text() == hub.main
    assert requested_files(hub) == TINY_FILES, "decoys (other formats, subfolders) must not be fetched"
    # stderr is not a terminal here: plain lines, one per file, then the summary.
    assert "hf:org/tiny: fetching 6 files, 16.4 MB" in result.stderr
    assert "hf:org/tiny: model.safetensors (12.9 MB) done" in result.stderr
    assert "\r" not in result.stderr
    assert "hf:org/tiny: 6 files, 16.4 MB" in result.stderr

    hub.clear()
    again = pull(hub, cache, "org/tiny")  # the bare id is the same model
    assert again.returncode == 0 and Path(again.stdout.strip()) == path
    assert "all 6 files already in the cache" in again.stderr
    assert hub.downloads() == []

    hub.clear()
    server = ServerProcess(
        ["--model", "hf:org/tiny", "--name", "tiny", "--threads", "1"],
        tmp_path / "server.log",
        env=hub_env(hub, cache, HF_HUB_OFFLINE="1"),
        metrics_port=0,
    )
    try:
        server.wait_serving()
        with Client(server.target, timeout=60) as client:
            reply = client.generate("Hello", model="tiny", max_new_tokens=4)
        assert reply.usage.completion_tokens > 0
    finally:
        server.stop()
    assert hub.seen() == [], "an offline server asked the hub"


def test_revision_pins_commit_and_files(hub, cache):
    """--revision (or @REVISION in the id) fetches that tag's commit and its own files; offline it is found by the
    ref the pull wrote."""
    result = pull(hub, cache, "hf:org/tiny", "--revision", "v1")
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path == snapshot(cache, "org/tiny", hub.v1)
    assert json.loads((path / "config.json").read_text())["modelpool_test_revision"] == "v1"
    assert (path / "v1-notes.txt").read_text() == "only in v1\n"
    assert (cache / "models--org--tiny" / "refs" / "v1").read_text() == hub.v1
    assert not (cache / "models--org--tiny" / "refs" / "main").exists()
    assert {s.path.split("/")[4] for s in hub.seen() if "/resolve/" in s.path} == {hub.v1}

    pinned = pull(hub, cache, "hf:org/tiny@v1", HF_HUB_OFFLINE="1")
    assert pinned.returncode == 0, pinned.stderr
    assert Path(pinned.stdout.strip()) == path

    by_commit = pull(hub, cache, f"hf:org/tiny@{hub.v1}")
    assert by_commit.returncode == 0 and Path(by_commit.stdout.strip()) == path

    both = pull(hub, cache, "hf:org/tiny@v1", "--revision", "main")
    assert both.returncode == 1
    assert "pins revision 'v1'" in both.stderr and "give one" in both.stderr


def test_interrupted_pull_resumes_with_a_range_request(hub, cache, tiny_files):
    weights = tiny_files["model.safetensors"]
    hub.cut_off(weights)  # half the bytes, then the connection drops and the network stays down
    first = pull(hub, cache, "hf:org/tiny")
    assert first.returncode == 1
    message = first.stderr.splitlines()[-1]
    assert message.startswith("modelpool pull: hf:org/tiny: downloading model.safetensors stopped at"), first.stderr
    assert message.endswith("run `modelpool pull hf:org/tiny` again to resume")
    partial = cache / "models--org--tiny" / "blobs" / f"{sha256(weights)}.incomplete"
    kept = partial.stat().st_size
    assert 0 < kept < len(weights)

    hub.restore()
    hub.clear()
    second = pull(hub, cache, "hf:org/tiny")
    assert second.returncode == 0, second.stderr
    assert f"resuming from {pull_command.size_text(kept)}" in second.stderr
    blob_gets = [s for s in hub.downloads() if s.server == "cdn"]
    assert [s.range for s in blob_gets] == [f"bytes={kept}-"], "the second pull must ask only for the rest"
    assert (Path(second.stdout.strip()) / "model.safetensors").read_bytes() == weights
    assert not partial.exists()


def test_ctrl_c_keeps_the_partial_download(hub, cache, tiny_files):
    """Ctrl-C while a download hangs on a silent connection ends the pull at once (it does not wait for the
    connection to time out), keeping what arrived for the next pull."""
    weights = tiny_files["model.safetensors"]
    hub.stall(weights)
    partial = cache / "models--org--tiny" / "blobs" / f"{sha256(weights)}.incomplete"
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelpool.cli", "pull", "hf:org/tiny"],
        cwd=REPO,
        env=hub_env(hub, cache, HF_HUB_DOWNLOAD_TIMEOUT="120"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Until the pull has written all it got (but for what its file buffer holds): it now waits on a silent
        # connection, which only a Ctrl-C that does not wait for it ends early.
        half = len(weights) // 2
        wait_until(lambda: partial.exists() and partial.stat().st_size >= half - 8192, 60, "half the weights written")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)  # far below the 120 s the stalled connection would take
    finally:
        hub.restore()
        proc.kill()
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == "modelpool pull: interrupted; the same command resumes the download"
    kept = partial.stat().st_size
    assert 0 < kept <= len(weights) // 2
    hub.clear()
    again = pull(hub, cache, "hf:org/tiny")
    assert again.returncode == 0, again.stderr
    assert [s.range for s in hub.seen(server="cdn")] == [f"bytes={kept}-"]
    assert (Path(again.stdout.strip()) / "model.safetensors").read_bytes() == weights


def test_a_corrupt_partial_download_is_not_kept(hub, cache, tiny_files):
    """A resumed file is checked against its SHA-256 (an LFS file's ETag): a partial file damaged on disk fails the
    pull and is dropped, and the next pull downloads it whole."""
    weights = tiny_files["model.safetensors"]
    hub.cut_off(weights)
    assert pull(hub, cache, "hf:org/tiny").returncode == 1
    partial = cache / "models--org--tiny" / "blobs" / f"{sha256(weights)}.incomplete"
    data = bytearray(partial.read_bytes())
    data[100] ^= 0xFF
    partial.write_bytes(bytes(data))
    hub.restore()
    second = pull(hub, cache, "hf:org/tiny")
    assert second.returncode == 1
    assert "model.safetensors does not match its checksum" in second.stderr
    assert not partial.exists()
    third = pull(hub, cache, "hf:org/tiny")
    assert third.returncode == 0, third.stderr
    assert (Path(third.stdout.strip()) / "model.safetensors").read_bytes() == weights


def test_token_reaches_the_hub_and_not_the_cdn(hub, cache):
    result = pull(hub, cache, "hf:org/private", HF_TOKEN=READER)
    assert result.returncode == 0, result.stderr
    assert {p.name for p in Path(result.stdout.strip()).iterdir()} == TINY_FILES
    hub_requests = hub.seen(server="hub")
    assert hub_requests and all(s.authorization == f"Bearer {READER}" for s in hub_requests)
    cdn_requests = hub.seen(server="cdn")
    assert cdn_requests and all(s.authorization is None for s in cdn_requests)


@pytest.mark.parametrize(
    "source, env, expected",
    [
        ("hf:org/missing", {}, ["no such model on", "check the id and HF_ENDPOINT"]),
        ("org/missing", {}, ["hf:org/missing: no such model on"]),
        ("hf:org/private", {}, ["or it is private", "set HF_TOKEN"]),
        ("hf:org/private", {"HF_TOKEN": "hf_wrong"}, ["rejected HF_TOKEN", "set HF_TOKEN"]),
        ("hf:org/private", {"HF_TOKEN": OTHER}, ["the account of HF_TOKEN cannot read it"]),
        ("hf:org/gated", {}, ["is a gated model", "accept its licence at http://127.0.0.1:", "set HF_TOKEN"]),
        ("hf:org/gated", {"HF_TOKEN": OTHER}, ["is a gated model", "has no access yet"]),
        ("hf:org/tiny@v9", {}, ["has no revision 'v9' of org/tiny"]),
        ("hf:org/tiny", {"HF_HUB_OFFLINE": "1"}, ["HF_HUB_OFFLINE is set", "run `modelpool pull hf:org/tiny` first"]),
    ],
)
def test_failures_say_what_to_do(hub, cache, source, env, expected):
    result = pull(hub, cache, source, **env)
    assert result.returncode == 1, result.stderr
    model = "hf:" + source.removeprefix("hf:")
    assert result.stderr.startswith(f"modelpool pull: {model}"), result.stderr
    for text in expected:
        assert text in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_hub(hub, cache):
    """Not cached: a clear failure. Cached: the copy serves, with a warning, as huggingface_hub does it."""
    nowhere = f"http://127.0.0.1:{free_port()}"
    result = pull(hub, cache, "hf:org/tiny", HF_ENDPOINT=nowhere)
    assert result.returncode == 1
    assert f"modelpool pull: hf:org/tiny: cannot reach the hub at {nowhere}" in result.stderr
    assert "check the network" in result.stderr

    assert pull(hub, cache, "hf:org/tiny").returncode == 0
    cached = pull(hub, cache, "hf:org/tiny", HF_ENDPOINT=nowhere)
    assert cached.returncode == 0, cached.stderr
    assert Path(cached.stdout.strip()) == snapshot(cache, "org/tiny", hub.main)
    assert "hf:org/tiny: the hub failed (ConnectError" in cached.stderr and "using the cached copy" in cached.stderr


def test_offline_cache_of_another_revision_is_not_enough(hub, cache):
    assert pull(hub, cache, "hf:org/tiny", "--revision", "v1").returncode == 0
    result = pull(hub, cache, "hf:org/tiny", HF_HUB_OFFLINE="1")
    assert result.returncode == 1 and "HF_HUB_OFFLINE is set" in result.stderr


def test_serve_reports_a_missing_model_before_serving(hub, cache):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "--model",
            "hf:org/missing",
            *("--port", str(free_port())),
            *("--metrics-port", "0", "--threads", "1"),
        ],
        cwd=REPO,
        env=hub_env(hub, cache),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "modelpool serve: hf:org/missing: no such model on" in result.stderr
    assert "SERVING" not in result.stderr


def test_bin_weights_when_the_repo_has_no_safetensors(hub, cache, tiny_dir):
    result = pull(hub, cache, "hf:org/tiny-bin")
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert {p.name for p in path.iterdir()} == TINY_FILES - {"model.safetensors"} | {"pytorch_model.bin"}
    assert "tf_model.h5" not in requested_files(hub)
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    expected = load_file(str(tiny_dir / "model.safetensors"))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())


# --- in-process: the file choice, the revision rule and the progress display ------------------------------------


@pytest.mark.parametrize(
    "listing, chosen",
    [
        (
            ["model.safetensors", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "config.json", "README.md"],
            ["config.json", "model.safetensors"],
        ),
        (
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json",
                "pytorch_model.bin.index.json",
                "pytorch_model-00001-of-00002.bin",
                "consolidated.safetensors",
                "original/consolidated.00.pth",
                "original/params.json",
                "tokenizer.model",
                "merges.txt",
                "vocab.json",
                "chat_template.jinja",
                "additional_chat_templates/tool_use.jinja",
                "tiktoken.tiktoken",
                "modeling_custom.py",
            ],
            [
                "additional_chat_templates/tool_use.jinja",
                "chat_template.jinja",
                "merges.txt",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json",
                "tiktoken.tiktoken",
                "tokenizer.model",
                "vocab.json",
            ],
        ),
        (
            ["pytorch_model.bin", "training_args.bin", "tf_model.h5", "onnx/model.onnx", "config.json"],
            ["config.json", "pytorch_model.bin"],
        ),
        (
            ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json"],
            ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json"],
        ),
        (["model.gguf", "tf_model.h5", "config.json"], ["config.json"]),
        # A listing whose names climb out of the repo folder: never fetched.
        (
            ["model.safetensors", "additional_chat_templates/../../x.jinja", "/etc/x.json", "config.json"],
            ["config.json", "model.safetensors"],
        ),
    ],
)
def test_select_files(listing, chosen):
    assert hub_source.select_files(listing) == chosen


def test_split_revision():
    assert hub_source.split_revision("org/name", None) == ("org/name", None)
    assert hub_source.split_revision("org/name", "dev") == ("org/name", "dev")
    assert hub_source.split_revision("org/name@v1", None) == ("org/name", "v1")
    assert hub_source.split_revision("org/name@v1", "v1") == ("org/name", "v1")
    with pytest.raises(ModelSourceError, match="give one"):
        hub_source.split_revision("org/name@v1", "v2")
    with pytest.raises(ModelSourceError, match="nothing after '@'"):
        hub_source.split_revision("org/name@", None)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_lines():
    out, clock = io.StringIO(), Clock()
    display = pull_command.Display(out, live=False, interval=5, clock=clock)
    display.start("hf:o/m", files=2, total=10_000_000, done=0, cached=1)
    clock.now = 1
    display.advance(1_000_000)  # not yet a line: one comes every 5 s
    clock.now = 5
    display.advance(1_000_000)
    display.file_done("config.json", 700)
    display.finish()
    assert out.getvalue().splitlines() == [
        "hf:o/m: fetching 2 files, 10.0 MB; 1 files already in the cache",
        "hf:o/m: 2.0 MB / 10.0 MB (20%), 400.0 kB/s, 20 s left",
        "hf:o/m: config.json (700 B) done",
    ]


def test_live_progress_line_changes_in_place():
    out, clock = io.StringIO(), Clock()
    display = pull_command.Display(out, live=True, clock=clock, width=120)
    display.start("hf:o/m", files=1, total=4_000_000, done=1_000_000, cached=0)
    clock.now = 1
    display.advance(1_000_000)
    clock.now = 2
    display.advance(2_000_000)
    display.file_done("model.safetensors", 4_000_000)
    display.finish()
    text = out.getvalue()
    first, rest = text.split("\n", 1)
    assert first == "hf:o/m: fetching 1 files, 4.0 MB, resuming from 1.0 MB"
    frames = rest.rstrip("\n").split("\r")[1:]
    assert frames[0].startswith("hf:o/m [##########..........] 2.0 MB / 4.0 MB (50%), 1.0 MB/s, 2 s left")
    assert frames[-1].startswith("hf:o/m [####################] 4.0 MB / 4.0 MB (100%)")
    assert rest.endswith("\n") and rest.count("\n") == 1


def test_sizes_and_durations():
    assert [pull_command.size_text(n) for n in (999, 12_300, 4_500_000, 1_200_000_000)] == [
        "999 B",
        "12.3 kB",
        "4.5 MB",
        "1.2 GB",
    ]
    assert [pull_command.duration_text(s) for s in (4.4, 185, 3720)] == ["4 s", "3 min 05 s", "1 h 02 min"]


def test_which_sources_are_hub_models(tiny_dir):
    for hub_id in ("hf:org/name", "org/name", "o/n@v1", "o/n@refs/pr/3"):
        assert model_source.is_hub(hub_id), hub_id
    for other in ("builtin", "modelscope:org/name", str(tiny_dir), "./org/name", "/abs/path", "~/models/m", "a/b/c"):
        assert not model_source.is_hub(other), other


def test_pull_of_a_local_folder_checks_it(tiny_dir, tmp_path, capsys):
    assert pull_command.main([str(tiny_dir)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(tiny_dir.resolve()) and "6 files" in err
    assert pull_command.main([str(tmp_path)]) == 1
    assert "config.json" in capsys.readouterr().err
    assert pull_command.main([str(tiny_dir), "--revision", "v1"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        pull_command.main([])
    assert exit_info.value.code == 2
