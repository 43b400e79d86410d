"""oneDNN linear layers on packed weights (CPU workers, float32): the same greedy tokens as torch's own, and only
where a model qualifies."""

from __future__ import annotations

import pytest

from tests.test_engine import PROMPTS, make_call, run_all
from workers.messages import WorkerSpec
from workers.packed_linear import PackedLinear, pack_linears, why_not_packable
from workers.worker_main import load_engine


def _engine(tiny_dir, cpu_linear: str, dtype: str = "auto"):
    import torch

    torch.set_num_threads(1)
    spec = WorkerSpec(worker_key="t/0", model_name="t", model_path=str(tiny_dir), cuda_visible_devices="",
                      max_batch_size=4, max_batch_tokens=400, cpu_linear=cpu_linear, dtype=dtype)
    engine, ready = load_engine(spec)
    return engine, ready


def _kinds(model) -> tuple[int, int]:
    import torch

    modules = list(model.modules())
    return (sum(type(m) is PackedLinear for m in modules), sum(type(m) is torch.nn.Linear for m in modules))


@pytest.fixture(scope="module")
def engines(tiny_dir):
    return {kind: _engine(tiny_dir, kind) for kind in ("onednn", "aten")}


def test_cpu_workers_pack_every_linear_layer_unless_told_not_to(engines):
    packed, plain = _kinds(engines["onednn"][0].model)
    assert packed > 0 and plain == 0
    assert _kinds(engines["aten"][0].model) == (0, packed)


def test_greedy_tokens_are_those_of_torchs_own_linear_layers_alone_and_batched(engines):
    lengths = [30, 7, 22, 15, 40]
    results = {}
    for kind, (engine, _) in engines.items():
        calls = [(2 * i, make_call(i, engine, p, max_new=n)) for i, (p, n) in enumerate(zip(PROMPTS, lengths, strict=True))]
        staggered = run_all(engine, calls)
        alone = run_all(engine, [make_call(100, engine, PROMPTS[2], max_new=25)])
        results[kind] = ({i: tokens for i, (tokens, _) in staggered.items()}, alone[100][0])
    assert results["onednn"] == results["aten"]
    assert [len(t) for t in results["onednn"][0].values()] == lengths


def test_the_placement_report_counts_the_packed_weights(engines):
    """The packed copies are buffers: a tied output layer's copy shows as more bytes than the plain model."""
    sizes = {kind: sum(g.size_bytes for g in ready.placement.module_groups) for kind, (_, ready) in engines.items()}
    assert sizes["onednn"] > sizes["aten"]


def test_models_that_do_not_qualify_keep_their_layers(tiny_dir):
    import torch

    engine, ready = _engine(tiny_dir, "onednn", dtype="bfloat16")
    assert ready.dtype == "bfloat16" and _kinds(engine.model)[0] == 0
    assert "bfloat16" in why_not_packable(engine.model)
    hooked = torch.nn.Sequential(torch.nn.Linear(4, 4))
    hooked[0]._hf_hook = object()  # what accelerate leaves on a dispatched or offloaded module
    assert pack_linears(hooked) == 0 and type(hooked[0]) is torch.nn.Linear
    assert "hooks" in why_not_packable(hooked)
