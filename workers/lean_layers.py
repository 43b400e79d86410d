"""A CPU worker's decoder layers run without transformers' per-layer Python, on the same tensor operations.

Owns the decoder-layer forward of the Llama family (Llama and SmolLM, Qwen2,
Mistral) once `workers/packed_linear.py` has put its linear layers on oneDNN.
transformers' layer calls a dozen modules, a deprecation wrapper and the
attention registry per layer and step: about 100 us of Python per layer, 3 ms
of a single stream's 34 ms step on the built-in model's 30 layers. The lean
forward makes the same torch calls in the same order (RMSNorm, one q/k/v
product, rotary embedding, the cache update, transformers' SDPA attention, the
output projection, RMSNorm, one gate/up product, activation, down projection;
only the rotary embedding's element-wise operations run on queries and keys at
once), so its outputs are bitwise those of transformers' layer
(`tests/test_lean_layers.py`), with the Python between them cut.

A layer qualifies only when it is one of those classes (no hub kernels), runs
SDPA, and its q/k/v and gate/up are columns of one `SharedProduct` each and its
output and down projections `PackedLinear`: float32 weights on the CPU. And
since transformers is not pinned to one version, whose layer could compute
something else, the first layer is run both ways on a random input at load:
unless the outputs are bitwise equal, every layer keeps transformers' forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from workers.packed_linear import PackedLinear, SharedProduct, SharedProductColumns

_LOGGER = logging.getLogger(__name__)

# Decoder layers whose forward (and whose attention, MLP and RMSNorm forwards) are the Llama layer's (the Qwen2 and
# Mistral ones add only a sliding window, which reaches SDPA through the mask) in transformers 5.24; `_agrees`
# checks the installed version's.
LAYERS = {
    "LlamaDecoderLayer": "LlamaRMSNorm",
    "Qwen2DecoderLayer": "Qwen2RMSNorm",
    "MistralDecoderLayer": "MistralRMSNorm",
}


def _product_columns(module: nn.Module, names: tuple[str, ...]) -> SharedProduct | None:
    """The `SharedProduct` whose columns are, in order, exactly the projections `names` of `module`."""
    columns: list[Any] = [getattr(module, name, None) for name in names]
    if not all(type(c) is SharedProductColumns for c in columns):
        return None
    product = columns[0].__dict__["_product"]
    if product.readers != len(columns) or any(c.__dict__["_product"] is not product for c in columns):
        return None
    starts = [0] + [c.stop for c in columns[:-1]]
    return product if [c.start for c in columns] == starts else None


def why_not_lean(layer: nn.Module) -> str:
    """ "" when `layer` can run the lean forward, else why it keeps transformers' own."""
    norm_class = LAYERS.get(type(layer).__name__)
    if norm_class is None:
        return f"{type(layer).__name__} is not a Llama-family decoder layer"
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return "no self_attn or mlp"
    for name in ("input_layernorm", "post_attention_layernorm"):
        norm = getattr(layer, name, None)
        if type(norm).__name__ != norm_class or "forward" in vars(norm):
            return f"{name} is not transformers' {norm_class}"
    if "forward" in vars(layer) or "forward" in vars(attn) or "forward" in vars(mlp):
        return "a forward was replaced already"
    if getattr(attn.config, "_attn_implementation", None) != "sdpa":
        return f"attention is {getattr(attn.config, '_attn_implementation', None)!r}, not 'sdpa'"
    if attn.training:
        return "in training mode"
    if _product_columns(attn, ("q_proj", "k_proj", "v_proj")) is None:
        return "q/k/v are not one shared oneDNN product"
    if _product_columns(mlp, ("gate_proj", "up_proj")) is None:
        return "gate/up are not one shared oneDNN product"
    if type(attn.o_proj) is not PackedLinear or type(mlp.down_proj) is not PackedLinear:
        return "the output or down projection is not on oneDNN"
    return ""


def _rms_norm(x: torch.Tensor, norm: Any) -> torch.Tensor:
    # LlamaRMSNorm on float32 (its casts to and from float32 are no-ops there).
    variance = x.pow(2).mean(-1, keepdim=True)
    return norm.weight * (x * torch.rsqrt(variance + norm.variance_epsilon))


def lean_forward(layer: Any) -> Callable[..., torch.Tensor]:
    """The forward of a qualifying `layer` (see `why_not_lean`): transformers' decoder layer, attention, MLP and
    RMSNorm forwards inlined, the same arithmetic on every value."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import rotate_half  # the Qwen2 and Mistral modules' is the same

    attn, mlp = layer.self_attn, layer.mlp
    qkv, gate_up = attn.q_proj.__dict__["_product"], mlp.gate_proj.__dict__["_product"]
    q_end, k_end, gate_end = attn.q_proj.stop, attn.k_proj.stop, mlp.gate_proj.stop
    o_proj, down_proj = attn.o_proj, mlp.down_proj
    norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
    head_dim, layer_idx, scaling, act = attn.head_dim, attn.layer_idx, attn.scaling, mlp.act_fn
    query_heads = q_end // head_dim
    linear = torch.ops.mkldnn._linear_pointwise

    def forward(hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):  # fmt: skip
        residual = hidden_states
        hidden = _rms_norm(hidden_states, norm1)
        shape = (*hidden.shape[:-1], -1, head_dim)
        projected = linear(hidden, qkv.packed_weight, qkv.bias, "none", [], "")
        # The rotary embedding of queries and keys at once, before the heads move to dimension 1: element-wise,
        # so every value is computed as transformers computes it, in half the operations.
        query_key = projected[..., :k_end].view(shape)
        value = projected[..., k_end:].view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        query_key = (query_key * cos) + (rotate_half(query_key) * sin)
        query = query_key[:, :, :query_heads].transpose(1, 2)
        key = query_key[:, :, query_heads:].transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, layer_idx)
        attended, _ = sdpa_attention_forward(attn, query, key, value, attention_mask, dropout=0.0, scaling=scaling)
        attended = attended.reshape(*shape[:-2], -1).contiguous()
        hidden = residual + linear(attended, o_proj.packed_weight, o_proj.bias, "none", [], "")
        residual = hidden
        hidden = _rms_norm(hidden, norm2)
        gate_and_up = linear(hidden, gate_up.packed_weight, gate_up.bias, "none", [], "")
        hidden = act(gate_and_up[..., :gate_end]) * gate_and_up[..., gate_end:]
        return residual + linear(hidden, down_proj.packed_weight, down_proj.bias, "none", [], "")

    return forward


def _agrees(layer: Any) -> bool:
    """Whether the lean forward gives bitwise what transformers' forward of `layer` gives, on a random input of
    three positions (causal attention, no cache; the rotary cos/sin are random too: the layer only multiplies by
    them)."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 3, layer.input_layernorm.weight.numel(), generator=generator)
    head_dim = layer.self_attn.head_dim
    rotary = (torch.randn(1, 3, head_dim, generator=generator), torch.randn(1, 3, head_dim, generator=generator))
    with torch.inference_mode():
        theirs = layer(hidden, attention_mask=None, position_embeddings=rotary)
        ours = lean_forward(layer)(hidden, attention_mask=None, position_embeddings=rotary)
    return isinstance(theirs, torch.Tensor) and theirs.shape == ours.shape and torch.equal(theirs, ours)


def lean_layers(model: nn.Module) -> int:
    """Give every decoder layer of `model` the lean forward when all qualify and the first computes bitwise what
    transformers' does; returns how many (0, with the reason logged, otherwise)."""
    layers = [module for module in model.modules() if type(module).__name__ in LAYERS]
    reason = next(filter(None, map(why_not_lean, layers)), "") if layers else "no Llama-family decoder layers"
    if not reason and not _agrees(layers[0]):
        reason = f"this transformers' {type(layers[0]).__name__} computes something else than the lean forward"
    if reason:
        _LOGGER.info("decoder layers stay transformers': %s", reason)
        return 0
    for layer in layers:
        layer.forward = lean_forward(layer)
    _LOGGER.info("%d decoder layers run the lean forward", len(layers))
    return len(layers)


def restore_layers(model: nn.Module) -> int:
    """Undo `lean_layers` (a measurement alternates the two forwards); returns the layers restored."""
    restored = 0
    for module in model.modules():
        if type(module).__name__ in LAYERS and "forward" in vars(module):
            del module.forward
            restored += 1
    return restored
