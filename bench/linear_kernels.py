"""The matrix products of one decode step on their own: torch's `nn.Linear` against the worker's oneDNN layers.

Owns one micro-measurement behind `cpu_linear` (workers/packed_linear.py): the
linear layers of the model's decoder (read from its config: q, k, v, o, gate,
up, down in every layer, and the output projection) run in a chain on an input
of M rows, as a step of M tokens runs them, in three forms: `nn.Linear` (MKL's
sgemm on x86), `PackedLinear` (oneDNN on weights packed once) and oneDNN with
q/k/v and gate/up as one `SharedProduct` each. Weights are random (only their
shapes matter); each form is timed `--repeats` times, alternating, best kept.
Printed: ms per chain and the weights' read rate at M = 1, where a step is a
matrix-vector product and reading the weights is all it does.

    python -m bench.linear_kernels                     # builtin's shapes, M = 1, 8, 32, 128, 512
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn
from transformers import AutoConfig

from bench.inprocess import resolve_model
from workers.packed_linear import pack_linears


class _Layer(nn.Module):
    """The linear layers of a Llama-style decoder layer, called on one input as the layer calls them."""

    def __init__(self, hidden: int, q: int, kv: int, mlp: int):
        super().__init__()
        self.q_proj = nn.Linear(hidden, q, False)
        self.k_proj = nn.Linear(hidden, kv, False)
        self.v_proj = nn.Linear(hidden, kv, False)
        self.o_proj = nn.Linear(q, hidden, False)
        self.gate_proj, self.up_proj = nn.Linear(hidden, mlp, False), nn.Linear(hidden, mlp, False)
        self.down_proj = nn.Linear(mlp, hidden, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(x)
        self.k_proj(x), self.v_proj(x)
        x = self.o_proj(q)
        return self.down_proj(self.gate_proj(x) * self.up_proj(x))


def _chain(config) -> nn.Module:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = config.num_key_value_heads * head_dim
    layers = [
        _Layer(config.hidden_size, heads * head_dim, kv, config.intermediate_size)
        for _ in range(config.num_hidden_layers)
    ]
    return nn.Sequential(*layers, nn.Linear(config.hidden_size, config.vocab_size, False)).eval()


def _time(chain: nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        started = time.perf_counter()
        chain(x)
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin", help="builtin, tiny or a folder: only its config is read")
    parser.add_argument("--rows", default="1,8,32,128,512", help="M: tokens in the step")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(resolve_model(args.model))
    aten = _chain(config)
    weight_bytes = sum(p.numel() * p.element_size() for p in aten.parameters())
    forms = {"nn.Linear (aten)": aten}
    packed = _chain(config)
    packed.load_state_dict(aten.state_dict())
    pack_linears(packed, share_siblings=False)
    forms["oneDNN packed"] = packed
    shared = _chain(config)
    shared.load_state_dict(aten.state_dict())
    pack_linears(shared)
    forms["oneDNN packed, q/k/v and gate/up shared"] = shared
    layers = config.num_hidden_layers
    print(f"{args.model}: {layers} layers + output projection, {weight_bytes / 1e6:.0f} MB of float32 weights")
    print(f"{args.threads} threads, best of {args.repeats}\n")
    rows = [int(m) for m in args.rows.split(",")]
    print("| form | " + " | ".join(f"M={m} ms" for m in rows) + " | M=1 GB/s |")
    print("|---|" + "--:|" * (len(rows) + 1))
    best: dict[tuple[str, int], float] = {}
    for m in rows:
        x = torch.randn(1, m, config.hidden_size)
        for chain in forms.values():
            _time(chain, x)  # warm-up: oneDNN makes its kernels for a shape on first use
        for _ in range(args.repeats):
            for name, chain in forms.items():
                seconds = _time(chain, x)
                best[(name, m)] = min(best.get((name, m), seconds), seconds)
    for name in forms:
        cells = [f"{best[(name, m)] * 1e3:.1f}" for m in rows]
        rate = f"{weight_bytes / best[(name, 1)] / 1e9:.1f}" if 1 in rows else "-"
        print(f"| {name} | " + " | ".join(cells) + f" | {rate} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
