"""A CPU worker's linear layers on oneDNN with weights packed once at load.

Owns the choice of matrix-product kernel for a float32 model that sits whole on
the CPU. `torch.nn.Linear` calls MKL's sgemm, which on this project's machines
(AMD EPYC, AVX2) reads weights at ~12 GB/s in the matrix-vector products of a
single stream and reaches ~60 GFLOP/s in a 32-row batch. oneDNN, given the
weight reordered into its own blocked layout once, is faster at every batch
size measured (the built-in model's 211 products: 1.2x at 1 row, 1.8x at 8,
1.3x at 32; in a served engine 1.2-1.25x tok/s at C = 1 and 32; greedy tokens
identical, bench/RESULTS.md). The same op is what torch.compile's freezing pass
emits for linear layers on CPU; here it is applied without compiling anything.

Only float32 weights are packed: oneDNN's bfloat16 path needs AVX-512 or
AVX-NE-CONVERT, which not every CPU has, and is unmeasured here. A model with
offloaded or dispatched modules (accelerate hooks, weights on "meta") keeps its
layers, since a hook moves weights in and out of the module it wraps.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

_LOGGER = logging.getLogger(__name__)

class PackedLinear(nn.Module):
    """`nn.Linear`'s forward on a weight reordered once for oneDNN. The packed weight is a buffer, so the
    worker's placement report counts its bytes."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.register_buffer(
            "packed_weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None), persistent=False
        )
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def why_not_packable(model: nn.Module) -> str:
    """"" when every linear layer of `model` can be packed, else the reason it is left as it is."""
    if not torch.backends.mkldnn.is_available():
        return "this torch has no oneDNN"
    if any(getattr(m, "_hf_hook", None) is not None for m in model.modules()):
        return "modules are dispatched or offloaded (accelerate hooks)"
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    if not linears:
        return "no linear layers"
    for m in linears:
        if m.weight.device.type != "cpu":
            return f"a linear layer's weight is on {m.weight.device}"
        if m.weight.dtype != torch.float32:
            return f"weights are {str(m.weight.dtype).removeprefix('torch.')}, only float32 is packed"
    return ""


def pack_linears(model: nn.Module) -> int:
    """Replace every `nn.Linear` of a model that sits whole on the CPU in float32 by a `PackedLinear`; returns how
    many were replaced (0, with the reason logged, when the model does not qualify). A weight tied to another
    module (an output layer sharing the embeddings) stays there too: the packed copy costs its bytes once more."""
    reason = why_not_packable(model)
    if reason:
        _LOGGER.info("linear layers stay on aten: %s", reason)
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child))
                replaced += 1
    _LOGGER.info("packed %d linear layers for oneDNN", replaced)
    return replaced
