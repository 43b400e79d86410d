"""How the whole prompts of one step are split into left-padded prefill batches.

A padded batch computes every row at the length of its longest prompt, so one
long prompt among short ones multiplies the work: the 32 chat prompts of the
bench (27-77 tokens, 1,332 tokens in all) cost 2,464 padded tokens as one
batch. Each extra batch costs a forward pass of its own instead (its weights
read again, every operator's fixed cost paid again). `split_by_length` weighs
the two: prompts sorted by length are cut into contiguous groups minimising
the padded tokens plus `forward_cost_tokens` per group (an exact dynamic
programme over the sorted lengths; a step admits at most `max_batch_size`
prompts, so it is small).

The cost of a forward in tokens depends on the device: on a CPU prefill is
compute-bound from a few rows on, and a forward's fixed part is worth a few
dozen tokens; on a GPU padded tokens are nearly free until the batch is large,
so it splits only around very long prompts. Plain numbers only: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

# What one more forward pass costs, in padded prompt tokens. CPU: measured on the built-in model on 2 cores, a
# prefill costs ~1.9 ms per padded token plus ~40 ms per forward whatever its size (weights read again, every
# operator's fixed cost), i.e. 20-25 tokens; 32 leans towards fewer forwards.
# Other devices: an estimate (no GPU measurement yet); large, so that only a great deal of padding is split off.
FORWARD_COST_TOKENS = {"cpu": 32}
DEFAULT_FORWARD_COST_TOKENS = 2048


def forward_cost_tokens(device_type: str) -> int:
    return FORWARD_COST_TOKENS.get(device_type, DEFAULT_FORWARD_COST_TOKENS)


def split_by_length(lengths: Sequence[int], forward_cost: int) -> list[list[int]]:
    """Indices into `lengths`, grouped: each group is one padded batch (indices ascending within a group, groups
    from the shortest prompts to the longest). Minimises sum(rows x longest) + forward_cost x groups."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    n = len(order)
    # best[j]: the least cost of the first j sorted prompts; cut[j]: where the last of its groups starts.
    best = [0] + [0] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        best[j], cut[j] = min((best[i] + (j - i) * longest + forward_cost, i) for i in range(j))
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(sorted(order[cut[j] : j]))
        j = cut[j]
    groups.reverse()
    return groups
