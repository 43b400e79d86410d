"""oneDNN linear layers on packed weights (CPU workers, float32): the same greedy tokens as torch's own, and only
where a model qualifies."""

from __future__ import annotations

import pytest

from tests.test_engine import PROMPTS, make_call, run_all
from workers.messages import WorkerSpec
from workers.packed_linear import PackedLinear, SharedProduct, SharedProductColumns, pack_linears, why_not_packable
from workers.worker_main import load_engine


def _engine(tiny_dir, cpu_linear: str, dtype: str = "auto"):
    import torch

    torch.set_num_threads(1)
    spec = WorkerSpec(worker_key="t/0", model_name="t", model_path=str(tiny_dir), cuda_visible_devices="",
                      max_batch_size=4, max_batch_tokens=400, cpu_linear=cpu_linear, dtype=dtype)
    engine, ready = load_engine(spec)
    return engine, ready


def _kinds(model) -> tuple[int, int]:
    """(layers computed by oneDNN, plain linear layers)."""
    import torch

    modules = list(model.modules())
    packed = sum(type(m) in (PackedLinear, SharedProductColumns) for m in modules)
    return packed, sum(type(m) is torch.nn.Linear for m in modules)


@pytest.fixture(scope="module")
def engines(tiny_dir):
    return {kind: _engine(tiny_dir, kind) for kind in ("onednn", "aten")}


def test_cpu_workers_pack_every_linear_layer_unless_told_not_to(engines):
    model = engines["onednn"][0].model
    packed, plain = _kinds(model)
    assert packed > 0 and plain == 0
    assert _kinds(engines["aten"][0].model) == (0, packed)
    # q/k/v and gate/up of every layer as one product each
    layers = model.config.num_hidden_layers
    assert sum(type(m) is SharedProduct for m in model.modules()) == 2 * layers
    assert sum(type(m) is SharedProductColumns for m in model.modules()) == 5 * layers


def test_a_shared_product_gives_each_sibling_its_own_columns_and_keeps_nothing():
    import torch

    torch.manual_seed(0)
    parent = torch.nn.Module()
    for name, width in (("q_proj", 6), ("k_proj", 2), ("v_proj", 2)):
        setattr(parent, name, torch.nn.Linear(8, width))
    plain = {name: getattr(parent, name) for name in ("q_proj", "k_proj", "v_proj")}
    assert pack_linears(parent) == 3
    x, other = torch.randn(3, 8), torch.randn(3, 8)
    with torch.inference_mode():
        for name in ("k_proj", "q_proj", "v_proj"):
            torch.testing.assert_close(getattr(parent, name)(x), plain[name](x))
        assert parent.q_k_v_shared._pending == [None, None, 0]  # dropped once every sibling took its columns
        parent.q_proj(x)
        torch.testing.assert_close(parent.k_proj(other), plain["k_proj"](other))  # another input: computed anew


def test_greedy_tokens_are_those_of_torchs_own_linear_layers_alone_and_batched(engines):
    lengths = [30, 7, 22, 15, 40]
    results = {}
    for kind, (engine, _) in engines.items():
        pairs = enumerate(zip(PROMPTS, lengths, strict=True))
        calls = [(2 * i, make_call(i, engine, p, max_new=n)) for i, (p, n) in pairs]
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
