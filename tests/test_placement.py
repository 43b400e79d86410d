"""Placement you can see: device maps and max_memory on a CPU-only machine (cpu and disk), and ListModels /
`modelpool models --placement` showing module groups, dtype, CUDA_VISIBLE_DEVICES and memory per device."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import pytest
import torch

from modelpool import Client
from modelpool.cli import _module_rows
from modelpool.v1 import generation_pb2 as pb
from service import config, convert
from service.worker_handle import WorkerHandle, WorkerState
from tests.conftest import write_config
from tests.server_process import REPO, ServerProcess
from workers import placement
from workers.messages import (
    DeviceMemory,
    ModuleGroup,
    Placement,
    StepOutput,
    WorkerMemory,
    WorkerReady,
    WorkerSpec,
)

# The tiny model: embed_tokens (tied to lm_head) 12.58 MB, two layers of 0.15 MB, 12.88 MB in all.
# Embeddings and the first layer on cpu; the second layer and the final norm on disk. lm_head shares the
# embedding's weight, so it goes where embed_tokens is (test_a_tied_weight_split_across_devices_is_refused).
TABLE = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "disk",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}
# accelerate keeps room for one layer beside what it places on a device: 12.8 MB of cpu holds the embedding (and
# lm_head, tied to it) and nothing more, so the layers and the norm go to disk.
CPU_CAP = "12.8MB"


@pytest.fixture
def no_gpu(monkeypatch):
    """What from_pretrained_kwargs sees on a CPU-only machine, also where a GPU is present."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


# ---------------------------------------------------------------- from_pretrained arguments, configuration


def test_from_pretrained_kwargs_without_a_gpu(no_gpu):
    cfg = SimpleNamespace(dtype="bfloat16")
    # No cap: a strategy has only the CPU to spread over, so the model stays there whole (no device map).
    assert placement.from_pretrained_kwargs(cfg, "auto", "auto", None) == {"dtype": torch.float32}
    # A cap on the CPU makes a strategy mean something: the rest goes to disk. GPU limits are dropped (left in,
    # accelerate would count them and send everything to disk).
    for strategy in ("auto", "sequential"):
        kwargs = placement.from_pretrained_kwargs(cfg, "auto", strategy, {"cpu": "300KB", "0": "20GiB"})
        assert kwargs == {"dtype": torch.float32, "device_map": strategy, "max_memory": {"cpu": "300KB"}}
    # GPU limits alone do not cap anything this worker has.
    assert placement.from_pretrained_kwargs(cfg, "float16", "auto", {"0": "20GiB"}) == {"dtype": torch.float16}
    # A table applies as it is; TOML's "0" is GPU 0.
    kwargs = placement.from_pretrained_kwargs(cfg, "fp32", {"model.layers": "disk", "lm_head": "cpu", "x": "0"}, None)
    assert kwargs == {"dtype": torch.float32, "device_map": {"model.layers": "disk", "lm_head": "cpu", "x": 0}}


def test_from_pretrained_kwargs_with_gpus_keeps_strategies_and_gpu_limits(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    kwargs = placement.from_pretrained_kwargs(
        SimpleNamespace(dtype="bfloat16"), "auto", "balanced", {"0": "10GiB", "1": "12GiB", "cpu": "30GiB"}
    )
    assert kwargs == {
        "dtype": torch.bfloat16,
        "device_map": "balanced",
        "max_memory": {0: "10GiB", 1: "12GiB", "cpu": "30GiB"},
    }


def worker_config(body: str) -> str:
    return f"[[models]]\nname = 'm'\nsource = 'builtin'\n[[models.workers]]\n{body}\n"


def test_config_accepts_cpu_disk_and_gpu_indices(tmp_path):
    cfg = config.load(
        str(
            write_config(
                tmp_path / "c.toml",
                worker_config(
                    f'device_map = {{ "model.embed_tokens" = "cpu", "model.layers" = "disk", "lm_head" = 1 }}\n'
                    f"devices = [3, 4]\noffload_folder = '{tmp_path}'\n"
                    "[[models.workers]]\ndevice_map = 'sequential'\nmax_memory = { cpu = '300KB', disk = 10000000 }\n"
                    "[[models.workers]]\ndevices = [0]\nmax_memory = { 0 = '20GiB', cpu = '1.5GB' }",
                ),
            )
        )
    )
    specs = cfg.worker_specs(cfg.models[0], "/m")
    assert specs[0].device_map == {"model.embed_tokens": "cpu", "model.layers": "disk", "lm_head": 1}
    assert specs[0].offload_folder == str(tmp_path)
    assert (specs[1].device_map, specs[1].max_memory) == ("sequential", {"cpu": "300KB", "disk": 10000000})
    assert specs[2].max_memory == {"0": "20GiB", "cpu": "1.5GB"}


@pytest.mark.parametrize(
    "body, message",
    [
        ('device_map = { "model" = "gpu" }', "device_map.model: 'gpu' is not a device"),
        ('device_map = { "model" = 0 }', r"device_map.model: GPU 0, but this worker sees no GPU \(devices = \[\]\)"),
        (
            'devices = [4, 5]\ndevice_map = { "model" = 2 }',
            r"GPU 2, but this worker sees GPUs 0-1 \(devices = \[4, 5\]\)",
        ),
        ("max_memory = { 0 = '1GiB' }", r"max_memory: GPU 0, but this worker sees no GPU"),
        ("max_memory = { ram = '1GiB' }", "max_memory: 'ram' is not a device"),
        ("max_memory = { cpu = '20G' }", "max_memory.cpu: '20G' is not a size"),
        ("max_memory = { cpu = '20gb' }", "max_memory.cpu: '20gb' is not a size"),
        ("max_memory = { cpu = -1 }", "max_memory.cpu: -1 is not a size"),
        (
            'device_map = { "model" = "cpu" }\nmax_memory = { cpu = "1GB" }',
            "max_memory: applies to a device_map strategy",
        ),
        ("device_map = {}", "device_map: an empty table places nothing"),
        ("offload_folder = '/no/such/folder'", "offload_folder: no such folder"),
    ],
)
def test_config_placement_errors_say_what_is_wrong(tmp_path, body, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(str(write_config(tmp_path / "c.toml", worker_config(body))))


# ---------------------------------------------------------------- the worker's side, in this process


def load(tiny_dir, device_map, max_memory=None):
    from workers.worker_main import load_engine

    offload = placement.OffloadFolder("test/0")
    spec = WorkerSpec("test/0", "test", str(tiny_dir), "", device_map=device_map, max_memory=max_memory)
    try:
        return load_engine(spec, offload)
    finally:
        offload.remove()


def test_explicit_table_is_described_group_by_group(tiny_dir, no_gpu):
    _, ready = load(tiny_dir, TABLE)
    groups = ready.placement.module_groups
    assert [(g.module, g.device) for g in groups] == list(TABLE.items())
    sizes = {g.module: g.size_bytes for g in groups}
    # The tied lm_head counts nothing of its own: its weight is the embedding's.
    assert sizes["model.layers.0"] == sizes["model.layers.1"] > 0 and sizes["lm_head"] == 0
    # Offloaded weights sit on "meta" between forward passes: the devices come from the map, not the parameters.
    assert ready.devices == ("cpu", "disk") and ready.device_map_summary == {"cpu": 4, "disk": 2}
    assert ready.placement.offload_folder.startswith(tempfile.gettempdir())


def test_sequential_under_a_cpu_cap_spills_to_disk(tiny_dir, no_gpu):
    engine, ready = load(tiny_dir, "sequential", {"cpu": CPU_CAP})
    devices = {g.module: g.device for g in ready.placement.module_groups}
    assert devices["model.embed_tokens"] == devices["lm_head"] == "cpu" and devices["model.layers"] == "disk"
    assert engine.device == torch.device("cpu")


def test_everything_on_disk_still_takes_its_input_on_the_cpu(tiny_dir, no_gpu):
    engine, ready = load(tiny_dir, "auto", {"cpu": "300KB"})
    assert [(g.module, g.device) for g in ready.placement.module_groups] == [("", "disk")]
    # The embedding's weight is on "meta"; input ids go where accelerate runs it.
    assert engine.device == torch.device("cpu")


def test_a_tied_weight_split_across_devices_is_refused(tiny_dir, no_gpu):
    with pytest.raises(ValueError, match=r"'lm_head' on disk and 'model.embed_tokens' on cpu, but they share"):
        load(tiny_dir, {**TABLE, "lm_head": "disk"})


def test_device_memory_puts_the_latest_report_and_the_placement_together():
    groups = (ModuleGroup("model.embed_tokens", "cuda:0", 100), ModuleGroup("model.layers", "disk", 70))
    p = Placement(
        groups, host_memory_total=1000, offload_folder="/tmp/x", offload_folder_bytes=30, offload_filesystem_total=5000
    )
    gpu = DeviceMemory("cuda:0", allocated=10, reserved=20, max_allocated=15, total=80)
    assert p.device_memory(WorkerMemory(resident_bytes=400, devices=(gpu,))) == (
        gpu,
        DeviceMemory("cpu", allocated=400, reserved=400, max_allocated=400, total=1000),
        DeviceMemory("disk", allocated=70, reserved=30, max_allocated=70, total=5000),
    )
    # No disk in the map: no disk line.
    assert [d.device for d in Placement(groups[:1], 1000).device_memory(None)] == ["cpu"]


def test_list_models_shows_placement_only_when_asked():
    p = Placement((ModuleGroup("", "cpu", 64),), host_memory_total=1000)
    ready = WorkerReady("m/0", 1, "", "float32", ("cpu",), {"cpu": 1}, 512, WorkerMemory(1), placement=p)
    worker = SimpleNamespace(
        index=0,
        pid=1,
        state=WorkerState.READY,
        ready=ready,
        memory=WorkerMemory(resident_bytes=300),
        spec=SimpleNamespace(cuda_visible_devices=""),
        outstanding=set(),
        running=0,
        restarts=0,
        last_error="",
        completed=0,
    )
    starting = SimpleNamespace(**{**vars(worker), "index": 1, "state": WorkerState.STARTING, "ready": None})
    served = {"m": SimpleNamespace(config=SimpleNamespace(source="s"), context_length=512, has_chat_template=True)}
    pools = {"m": SimpleNamespace(workers=[worker, starting])}
    plain = convert.list_models_response(served, pools, "m")
    assert not any(w.HasField("placement") for w in plain.models[0].workers)
    shown = convert.list_models_response(served, pools, "m", include_placement=True).models[0].workers
    # The memory numbers are the latest report's (300), not the ready message's (1).
    assert shown[0].placement == pb.Placement(
        dtype="float32",
        module_groups=[pb.ModuleGroup(module="", device="cpu", size_bytes=64)],
        device_memory=[pb.DeviceMemory(device="cpu", allocated_bytes=300, reserved_bytes=300, total_bytes=1000)],
    )
    assert not shown[1].HasField("placement")


def test_the_worker_handle_keeps_the_latest_memory_report():
    """ListModels reads the memory a worker last reported (every memory_interval_s), never asks a busy worker."""
    handle = WorkerHandle(WorkerSpec("m/0", "m", "/m", ""), loop=None, on_message=lambda h, m: None, on_exit=None)
    p = Placement((ModuleGroup("", "cpu", 64),), host_memory_total=1000)
    handle._handle_message(WorkerReady("m/0", 1, "", "float32", ("cpu",), {}, 512, WorkerMemory(10), placement=p))
    assert handle.memory == WorkerMemory(10)
    handle._handle_message(StepOutput("m/0", [], memory=WorkerMemory(20)))
    handle._handle_message(StepOutput("m/0", []))  # a step without a report keeps the last one
    assert handle.memory == WorkerMemory(20) and handle.ready.placement is p


def test_cli_puts_runs_of_layers_on_one_device_on_one_line():
    groups = [
        pb.ModuleGroup(module=m, device=d, size_bytes=1)
        for m, d in [
            ("model.embed_tokens", "cuda:0"),
            ("model.layers.0", "cuda:0"),
            ("model.layers.1", "cuda:0"),
            ("model.layers.2", "cuda:1"),
            ("model.layers.3", "cuda:1"),
            ("model.layers.5", "cuda:1"),
            ("model.norm", "disk"),
            ("lm_head", "disk"),
            ("", "cpu"),
        ]
    ]
    assert _module_rows(groups) == [
        ("model.embed_tokens", "cuda:0", 1),
        ("model.layers.0-1", "cuda:0", 2),
        ("model.layers.2-3", "cuda:1", 2),
        ("model.layers.5", "cuda:1", 1),
        ("model.norm", "disk", 1),
        ("lm_head", "disk", 1),
        ("(whole model)", "cpu", 1),
    ]


# ---------------------------------------------------------------- a real server, seen as a client


@pytest.fixture(scope="module")
def placed_server(tmp_path_factory, tiny_dir):
    """One server, the tiny model three times: `whole` on the CPU in one piece, `table` with an explicit cpu/disk
    map, `capped` with device_map auto under a cpu max_memory that sends the layers to disk."""
    tmp = tmp_path_factory.mktemp("placement")
    table = ", ".join(f'"{module}" = "{device}"' for module, device in TABLE.items())
    cfg = write_config(
        tmp / "modelpool.toml",
        f"""
        [server]
        default_model = "whole"
        memory_interval_s = 0.5

        [[models]]
        name = "whole"
        source = "{tiny_dir}"
        [[models.workers]]
        threads = 1

        [[models]]
        name = "table"
        source = "{tiny_dir}"
        [[models.workers]]
        threads = 1
        device_map = {{ {table} }}

        [[models]]
        name = "capped"
        source = "{tiny_dir}"
        [[models.workers]]
        threads = 1
        device_map = "auto"
        max_memory = {{ cpu = "{CPU_CAP}" }}
        """,
    )
    proc = ServerProcess(["--config", str(cfg)], tmp / "server.log")
    folders: list[str] = []
    try:
        proc.wait_serving()
        with Client(proc.target, timeout=60) as client:
            folders = [w.placement.offload_folder for m in client.models(include_placement=True) for w in m.workers]
        assert all(os.path.isdir(f) for f in folders if f), folders
        yield proc
    finally:
        proc.stop()
    # Each worker with a device map had a folder of its own, and removed it when it stopped.
    assert len(set(filter(None, folders))) == 2 and not any(os.path.exists(f) for f in folders if f), folders


PROMPTS = ("The placement of layers", "Once upon a time, in a land far away,")


@pytest.mark.slow
def test_models_split_over_cpu_and_disk_generate_the_same_greedy_tokens(placed_server):
    with Client(placed_server.target, timeout=120) as client:
        for prompt in PROMPTS:
            tokens = {
                name: list(client.generate(prompt, model=name, max_new_tokens=12, ignore_eos=True).token_ids)
                for name in ("whole", "table", "capped")
            }
            assert len(tokens["whole"]) == 12
            assert tokens["table"] == tokens["whole"] and tokens["capped"] == tokens["whole"], tokens


def worker_of(models, name: str) -> pb.WorkerInfo:
    (worker,) = next(m for m in models if m.name == name).workers
    return worker


@pytest.mark.slow
def test_list_models_shows_each_workers_placement(placed_server):
    with Client(placed_server.target, timeout=60) as client:
        plain = client.models()
        models = client.models(include_placement=True)
    assert not any(w.HasField("placement") for m in plain for w in m.workers)

    for name in ("whole", "table", "capped"):
        worker = worker_of(models, name)
        assert worker.cuda_visible_devices == "" and worker.placement.dtype == "float32"
        memory = {d.device: d for d in worker.placement.device_memory}
        assert memory["cpu"].allocated_bytes > 0 and memory["cpu"].total_bytes > memory["cpu"].allocated_bytes
        disk_groups = [g for g in worker.placement.module_groups if g.device == "disk"]
        if disk_groups:
            # Offloaded bytes are the disk groups' sizes; the filesystem's size is the total.
            assert memory["disk"].allocated_bytes == sum(g.size_bytes for g in disk_groups) > 0
            assert memory["disk"].total_bytes > 0 and worker.placement.offload_folder
        else:
            assert "disk" not in memory

    whole = worker_of(models, "whole").placement
    assert [(g.module, g.device) for g in whole.module_groups] == [("", "cpu")]
    assert whole.module_groups[0].size_bytes > 12_000_000

    table = worker_of(models, "table")
    assert [(g.module, g.device) for g in table.placement.module_groups] == list(TABLE.items())
    assert list(table.devices) == ["cpu", "disk"]

    capped = {g.module: g.device for g in worker_of(models, "capped").placement.module_groups}
    assert capped["model.embed_tokens"] == "cpu" and capped["model.layers"] == "disk"


@pytest.mark.slow
def test_models_placement_command_prints_groups_devices_and_memory(placed_server):
    def run(*extra: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "modelpool.cli", "models", "--target", placed_server.target, *extra],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    plain, shown = run(), run("--placement")
    assert "placement:" not in plain and "model.embed_tokens" not in plain
    table = shown.split("table:", 1)[1].split("\ncapped:", 1)[0]
    assert "CUDA_VISIBLE_DEVICES=(none)" in table and "placement: dtype=float32 offload_folder=" in table
    lines = [line.split() for line in table.splitlines()]
    for module, device in TABLE.items():
        assert [module, device] in [line[:2] for line in lines], (module, table)
    memory = {line[0]: line[1:] for line in lines if line and line[0] in ("cpu", "disk") and len(line) == 7}
    # device, then allocated, reserved and total as "<number> <unit>"; totals are never zero.
    assert set(memory) == {"cpu", "disk"}, table
    assert all(float(values[4]) > 0 for values in memory.values()), table
