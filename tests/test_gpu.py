"""GPU checks: run where CUDA is visible (the lent H200), skipped elsewhere."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_gpu
def test_auto_dtype_is_bf16_on_cuda_and_placed_on_the_gpu(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from workers.messages import WorkerSpec
    from workers.worker_main import load_engine

    bf16_dir = tmp_path / "bf16"
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    model.save_pretrained(bf16_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (bf16_dir / name).write_bytes((tiny_dir / name).read_bytes())
    engine, ready = load_engine(WorkerSpec("g/0", "g", str(bf16_dir), cuda_visible_devices="0"))
    assert ready.dtype == "bfloat16"
    assert all(d.startswith("cuda") for d in ready.devices)
    assert ready.memory.devices and ready.memory.devices[0].allocated > 0
    assert ready.memory.devices[0].total > ready.memory.devices[0].reserved > 0


@needs_gpu
def test_a_table_over_gpu_cpu_and_disk_is_described_with_memory_per_device(tiny_dir):
    from transformers import AutoModelForCausalLM

    from workers.messages import WorkerSpec
    from workers.placement import OffloadFolder
    from workers.worker_main import load_engine

    # lm_head is tied to embed_tokens: both on GPU 0.
    table = {
        "model.embed_tokens": 0,
        "lm_head": 0,
        "model.rotary_emb": 0,
        "model.layers.0": 0,
        "model.layers.1": "cpu",
        "model.norm": "disk",
    }
    offload = OffloadFolder("g/0")
    try:
        spec = WorkerSpec("g/0", "g", str(tiny_dir), "0", dtype="float32", device_map=table)
        engine, ready = load_engine(spec, offload)
        groups = {g.module: g.device for g in ready.placement.module_groups}
        assert groups == {m: f"cuda:{d}" if isinstance(d, int) else d for m, d in table.items()}
        memory = {d.device: d for d in ready.placement.device_memory(ready.memory)}
        assert memory["cuda:0"].allocated > 0 and memory["cuda:0"].total > memory["cuda:0"].reserved > 0
        assert memory["cpu"].total > memory["cpu"].allocated > 0
        assert memory["disk"].allocated == 256 and memory["disk"].total > 0  # the final norm: 64 float32s
        assert engine.device == torch.device("cuda:0")
        # The split model answers as the model whole on the CPU does.
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        split = engine.model.generate(ids.to(engine.device), max_new_tokens=8, do_sample=False)
        whole = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
        assert split.cpu().tolist() == whole.generate(ids, max_new_tokens=8, do_sample=False).tolist()
    finally:
        offload.remove()


@needs_gpu
def test_server_on_gpu_reports_placement_and_memory(tiny_dir, tmp_path):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from modelpool import Client
    from tests.server_process import ServerProcess

    proc = ServerProcess(["--model", str(tiny_dir), "--devices", "0"], tmp_path / "server.log")
    try:
        proc.wait_serving()
        with Client(proc.target, timeout=60) as client:
            assert client.generate("gpu", max_new_tokens=4, ignore_eos=True).usage.completion_tokens == 4
            worker = client.models()[0].workers[0]
            assert worker.cuda_visible_devices == "0" and worker.devices == ["cuda:0"]
            placement = client.models(include_placement=True)[0].workers[0].placement
            # dtype auto on a GPU keeps the checkpoint's (float32 for the tiny model); one group, the whole model.
            assert placement.dtype == "float32"
            assert [(g.module, g.device) for g in placement.module_groups] == [("", "cuda:0")]
            memory = {d.device: d for d in placement.device_memory}
            assert set(memory) == {"cuda:0", "cpu"}
            assert (
                memory["cuda:0"].total_bytes > memory["cuda:0"].reserved_bytes >= memory["cuda:0"].allocated_bytes > 0
            )
        text = urllib.request.urlopen(proc.metrics_url, timeout=10).read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        for name in ("modelpool_gpu_memory_allocated_bytes", "modelpool_gpu_memory_total_bytes"):
            assert any(s.value > 0 for s in families[name].samples), name
            # cuda:0 of a worker given CUDA_VISIBLE_DEVICES=0 is physical GPU 0.
            assert {(s.labels["device"], s.labels["gpu"]) for s in families[name].samples} == {("cuda:0", "0")}
    finally:
        proc.stop()
