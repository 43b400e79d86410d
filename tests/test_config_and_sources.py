"""Configuration parsing and model sources (built-in, local folder, Hugging Face cache offline)."""

from __future__ import annotations

import shutil

import pytest

from service import config, model_source
from workers import builtin_model


def test_toml_config_and_worker_specs(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        """
[server]
port = 6000
[[models]]
name = "m"
source = "builtin"
max_batch_size = 4
[[models.workers]]
devices = [0, 1]
dtype = "bfloat16"
device_map = "balanced"
max_memory = { 0 = "10GiB", 1 = "10GiB" }
[[models.workers]]
devices = [2]
replicas = 2
device_map = { "model" = 0, "lm_head" = 0 }
cpu_linear = "aten"
"""
    )
    cfg = config.load(str(path))
    specs = cfg.worker_specs(cfg.models[0], "/models/m")
    assert [s.cuda_visible_devices for s in specs] == ["0,1", "2", "2"]
    assert [s.worker_key for s in specs] == ["m/0", "m/1", "m/2"]
    assert specs[0].dtype == "bfloat16" and specs[0].device_map == "balanced"
    assert specs[0].max_memory == {"0": "10GiB", "1": "10GiB"}
    assert specs[1].device_map == {"model": 0, "lm_head": 0}
    assert [s.cpu_linear for s in specs] == ["onednn", "aten", "aten"]
    assert cfg.port == 6000 and cfg.default_model_name == "m"


@pytest.mark.parametrize(
    "text, key",
    [
        ("[[models]]\nname='m'\nbogus=1", "bogus"),
        ("[[models]]\nname='m'\n[[models.workers]]\ndtype='int3'", "dtype"),
        ("[[models]]\nname='m'\n[[models.workers]]\ndevice_map='everywhere'", "device_map"),
        ("[server]\ndefault_model='x'\n[[models]]\nname='m'", "default_model"),
        ("[server]\nport=1", "models"),
        ("[[models]]\nname='m'\nmax_batch_size=32\nmax_step_tokens=32", "max_step_tokens"),
        ("[[models]]\nname='m'\nmax_step_tokens=-1", "max_step_tokens"),
        ("[[models]]\nname='m'\nprefix_cache_mib=-1", "prefix_cache_mib"),
        ("[[models]]\nname='m'\nmax_overtakes=0", "max_overtakes"),
        ("[[models]]\nname='m'\nstream_interval=0", "stream_interval"),
        ("[[models]]\nname='m'\n[[models.workers]]\ncpu_linear='mkl'", "cpu_linear"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, key):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=key):
        config.load(str(path))


def test_step_token_budget_by_device_unless_set():
    cfg = config.from_flags("builtin", workers=2, devices=[0, 1])
    cfg.models[0].workers.append(config.WorkerGroupConfig())  # and a CPU worker
    assert [s.max_step_tokens for s in cfg.worker_specs(cfg.models[0], "/x")] == [2048, 2048, 512]
    cfg.models[0].max_batch_size = 300  # a full batch of decodes must leave tokens for prompts
    assert [s.max_step_tokens for s in cfg.worker_specs(cfg.models[0], "/x")] == [2048, 2048, 600]
    assert {s.prefix_cache_bytes for s in cfg.worker_specs(cfg.models[0], "/x")} == {0}  # off unless set
    cfg.models[0].prefix_cache_mib = 3
    assert {s.prefix_cache_bytes for s in cfg.worker_specs(cfg.models[0], "/x")} == {3 << 20}
    for chosen in (0, 301, 4096):
        cfg.models[0].max_step_tokens = chosen
        assert {s.max_step_tokens for s in cfg.validate().worker_specs(cfg.models[0], "/x")} == {chosen}
    assert {s.max_overtakes for s in cfg.worker_specs(cfg.models[0], "/x")} == {32}
    cfg.models[0].max_overtakes = 5
    assert {s.max_overtakes for s in cfg.validate().worker_specs(cfg.models[0], "/x")} == {5}


def test_flags_split_devices_among_workers():
    cfg = config.from_flags("builtin", workers=2, devices=[0, 1, 2, 3])
    specs = cfg.worker_specs(cfg.models[0], "/x")
    assert [s.cuda_visible_devices for s in specs] == ["0,1", "2,3"]
    assert cfg.models[0].name == "smollm2"
    cpu = config.from_flags("builtin", workers=2)
    assert [s.cuda_visible_devices for s in cpu.worker_specs(cpu.models[0], "/x")] == ["", ""]


def test_builtin_and_local_sources(tiny_dir, tmp_path):
    assert model_source.resolve("builtin") == builtin_model.cache_dir()
    assert (builtin_model.cache_dir() / "model.safetensors").exists()
    assert model_source.resolve(str(tiny_dir)) == tiny_dir.resolve()
    with pytest.raises(model_source.ModelSourceError, match="config.json"):
        model_source.resolve(str(tmp_path))
    with pytest.raises(model_source.ModelSourceError, match="no such folder"):
        model_source.resolve("./not/here/either")


def test_hub_source_comes_from_hf_hub_cache_offline(tiny_dir, tmp_path, monkeypatch):
    """A repo id resolves through huggingface_hub's own cache layout, honouring HF_HUB_CACHE and HF_HUB_OFFLINE."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--test-org--tiny"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    try:
        for source in ("hf:test-org/tiny", "test-org/tiny"):
            path = model_source.resolve(source)
            assert path == repo / "snapshots" / commit
            assert (path / "config.json").exists()
        with pytest.raises(model_source.ModelSourceError, match="HF_HUB_OFFLINE"):
            model_source.resolve("hf:test-org/missing")
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)


def test_default_max_new_tokens_fits_the_context_and_the_batch_limit():
    from pathlib import Path

    from service.errors import InvalidArgument
    from service.served_model import ServedModel
    from workers.messages import StoppingParams

    model = ServedModel(
        config=config.ModelConfig(name="m", max_batch_tokens=1000, default_max_new_tokens=256),
        path=Path("/nowhere"),
        tokenizer=None,
        context_length=4096,
    )
    assert model.check_limits(900, StoppingParams(max_new_tokens=0), explicit_max=False).max_new_tokens == 100
    assert model.check_limits(10, StoppingParams(max_new_tokens=0), explicit_max=False).max_new_tokens == 256
    with pytest.raises(InvalidArgument, match="^prompt:"):
        model.check_limits(1000, StoppingParams(max_new_tokens=0), explicit_max=False)
    with pytest.raises(InvalidArgument, match="^stopping.max_new_tokens:"):
        model.check_limits(900, StoppingParams(max_new_tokens=101), explicit_max=True)


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("builtin", "smollm2"),
        ("hf:org/tiny@v1", "tiny"),
        ("hf:org/tiny@refs/pr/3", "tiny"),
        ("org/tiny", "tiny"),
        ("modelscope:Qwen/Qwen1.5-0.5B-Chat", "Qwen1.5-0.5B-Chat"),
        ("/models/SmolLM2-135M.Q4_K_M.gguf", "SmolLM2-135M.Q4_K_M"),
        ("/models/tiny/", "tiny"),
    ],
)
def test_the_model_name_from_a_source(source, name):
    assert config.from_flags(source).models[0].name == name
