"""A CPU worker's linear layers on oneDNN with weights packed once at load.

Owns the choice of matrix-product kernel for a float32 model that sits whole on
the CPU. `torch.nn.Linear` calls MKL's sgemm, which on this project's machines
(AMD EPYC, AVX2) reads weights at ~13 GB/s in the matrix-vector products of a
single stream. oneDNN, given each weight reordered into its own blocked layout
once, runs the built-in model's products of a step 1.3-1.7x faster at 1 to 32
rows (decode steps) and as fast at 128-512 (prompt chunks); a worker's tok/s
rose 1.15x at C = 1 and 1.2x at C = 32, greedy tokens identical
(bench/RESULTS.md, `python -m bench.linear_kernels`). Sibling projections
that read one input (q/k/v, gate/up) share one wider product: 7-12% less time
in the products at 1 to 32 rows.

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


class SharedProduct(nn.Module):
    """One packed product for sibling projections that read the same input (a layer's q/k/v, an MLP's gate/up):
    the first sibling called computes all their columns at once, each takes its own, and the result is dropped
    when all have (fewer, wider products: 4 instead of 7 per layer of the built-in model). An input other than the
    one computed from (held, so never a recycled object) is computed anew, so a sibling called on its own is
    still right."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        weight = torch.cat([m.weight.detach() for m in linears])
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, None), persistent=False)
        has_bias = [m.bias is not None for m in linears]
        self.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), False) if all(has_bias) else None
        self.readers = len(linears)
        # The input computed from, its product, and how many siblings took their columns; kept in a list that is
        # changed in place, since nn.Module's attribute setter costs ~2% of a single stream's step.
        self._pending: list = [None, None, 0]

    def columns(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        pending = self._pending
        if x is not pending[0]:
            pending[:] = [x, torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], ""), 0]
        columns = pending[1][..., start:stop]
        pending[2] += 1
        if pending[2] == self.readers:
            pending[:] = [None, None, 0]
        return columns


class SharedProductColumns(nn.Module):
    """A sibling projection's columns of a `SharedProduct` (which its parent module holds)."""

    def __init__(self, product: SharedProduct, start: int, stop: int):
        super().__init__()
        self.start, self.stop = start, stop
        # A plain attribute, not a submodule: the product is the parent's, counted once.
        self.__dict__["_product"] = product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        product: SharedProduct = self.__dict__["_product"]
        return product.columns(x, self.start, self.stop)

    def extra_repr(self) -> str:
        return f"columns {self.start}:{self.stop} of a shared product"


# Sibling projections that the model families with these names (Llama, Qwen2, Mistral, Gemma, SmolLM...) apply to
# one and the same input.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def why_not_packable(model: nn.Module) -> str:
    """ "" when every linear layer of `model` can be packed, else the reason it is left as it is."""
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


def pack_linears(model: nn.Module, share_siblings: bool = True) -> int:
    """Replace every `nn.Linear` of a model that sits whole on the CPU in float32 by a `PackedLinear`; returns how
    many were replaced (0, with the reason logged, when the model does not qualify); `share_siblings`: q/k/v and
    gate/up as one `SharedProduct` each (a measurement turns it off to see what it adds). A weight tied to another
    module (an output layer sharing the embeddings) stays there too: the packed copy costs its bytes once more."""
    reason = why_not_packable(model)
    if reason:
        _LOGGER.info("linear layers stay on aten: %s", reason)
        return 0
    replaced = 0
    for parent in list(model.modules()):
        if share_siblings:
            replaced += _share_siblings(parent)
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child))
                replaced += 1
    _LOGGER.info("packed %d linear layers for oneDNN", replaced)
    return replaced


def _share_siblings(parent: nn.Module) -> int:
    """Replace each group of `SIBLINGS` that `parent` holds as plain linear layers of one input width by columns
    of one `SharedProduct`; returns the layers replaced."""
    replaced = 0
    for group in SIBLINGS:
        found = [getattr(parent, name, None) for name in group]
        linears = [m for m in found if type(m) is nn.Linear]
        if len(linears) != len(group):
            continue
        if len({m.in_features for m in linears}) != 1 or len({m.bias is None for m in linears}) != 1:
            continue
        product = SharedProduct(linears)
        parent.add_module("_".join(n.removesuffix("_proj") for n in group) + "_shared", product)
        start = 0
        for name, m in zip(group, linears, strict=True):
            setattr(parent, name, SharedProductColumns(product, start, start + m.out_features))
            start += m.out_features
        replaced += len(group)
    return replaced
