"""The lean decoder-layer forward of CPU workers: bitwise transformers' own layer, and only where a layer qualifies."""

from __future__ import annotations

import pytest

from workers.lean_layers import lean_layers, restore_layers, why_not_lean
from workers.packed_linear import pack_linears

FAMILIES = ("llama", "qwen2", "mistral")


def _model(family: str, attn_implementation: str = "sdpa"):
    """A small random decoder of `family` (Qwen2: biased q/k/v; Mistral: a sliding window shorter than the test's
    sequences), in float32 on the CPU."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    shape = {
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 112,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "attn_implementation": attn_implementation,
    }
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape, use_sliding_window=False))
    else:
        model = MistralForCausalLM(MistralConfig(**shape, sliding_window=8))
    return model.eval()


def _logits(model, prompts: list[list[int]], steps: int) -> list:
    """Logits of a left-padded prefill of `prompts` and of `steps` greedy decode steps after it, as a worker runs
    them (its growable cache, a padding mask, position ids counting real tokens)."""
    import torch

    from workers.kv_cache import GrowableCache

    length = max(map(len, prompts))
    ids = torch.tensor([[0] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = GrowableCache()
    found = []
    with torch.inference_mode():
        for _ in range(steps + 1):
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
            ).logits
            found.append(logits)
            ids = logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            positions = positions[:, -1:] + 1
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_the_lean_forward_gives_bitwise_the_logits_of_transformers_layers(family):
    import torch

    torch.set_num_threads(1)
    model = _model(family)
    pack_linears(model)
    prompts = [[5, 9, 14, 3, 77, 20, 41, 8, 60, 2, 33, 11], [7, 81, 4], [50, 51, 52, 53, 54, 55, 56]]
    theirs = _logits(model, prompts, steps=6)
    assert lean_layers(model) == model.config.num_hidden_layers
    ours = _logits(model, prompts, steps=6)
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.equal(a, b), f"step {step}: max difference {(a - b).abs().max().item()}"
    # and back: the measurement alternates the two forwards on one model
    assert restore_layers(model) == model.config.num_hidden_layers
    assert all(torch.equal(a, b) for a, b in zip(_logits(model, prompts, steps=6), theirs, strict=True))


def test_layers_that_do_not_qualify_keep_transformers_forward():
    unpacked = _model("llama")
    assert "q/k/v are not one shared oneDNN product" in why_not_lean(unpacked.model.layers[0])
    assert lean_layers(unpacked) == 0
    eager = _model("llama", attn_implementation="eager")
    pack_linears(eager)
    assert "'eager'" in why_not_lean(eager.model.layers[0])
    assert lean_layers(eager) == 0
    swapped = _model("mistral")
    pack_linears(swapped)
    attn = swapped.model.layers[1].self_attn
    attn.k_proj, attn.v_proj = attn.v_proj, attn.k_proj  # the columns no longer in q, k, v order
    assert "q/k/v are not one shared oneDNN product" in why_not_lean(swapped.model.layers[1])
    assert lean_layers(swapped) == 0
    siblings_apart = _model("qwen2")
    pack_linears(siblings_apart, share_siblings=False)
    assert lean_layers(siblings_apart) == 0
    assert not any("forward" in vars(layer) for model in (unpacked, eager, swapped, siblings_apart)
                   for layer in model.model.layers)  # fmt: skip


def test_a_transformers_layer_that_computes_something_else_keeps_its_forward(monkeypatch):
    from transformers.models.llama import modeling_llama

    model = _model("llama")
    pack_linears(model)
    assert why_not_lean(model.model.layers[0]) == ""
    original = modeling_llama.LlamaRMSNorm.forward
    # as another transformers version might: an RMSNorm that differs in the last bits
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", lambda self, x: original(self, x) * (1 + 2**-20))
    assert lean_layers(model) == 0
    assert not any("forward" in vars(layer) for layer in model.model.layers)
    monkeypatch.undo()
    assert lean_layers(model) == model.config.num_hidden_layers


def test_a_cpu_worker_runs_the_lean_forward_only_with_onednn_layers(tiny_dir):
    from tests.test_packed_linear import _engine

    onednn, _ = _engine(tiny_dir, "onednn")
    aten, _ = _engine(tiny_dir, "aten")
    assert all("forward" in vars(layer) for layer in onednn.model.model.layers)
    assert not any("forward" in vars(layer) for layer in aten.model.model.layers)
