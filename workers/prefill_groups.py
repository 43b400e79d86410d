"""How the whole prompts of one step are split into left-padded prefill batches, and what a forward costs.

A padded batch computes every row at the length of its longest prompt, so one
long prompt among short ones multiplies the work: the 32 chat prompts of the
bench (27-77 tokens, 1,332 tokens in all) cost 2,464 padded tokens as one
batch. Each extra batch costs a forward pass of its own instead (the weights
read again, every operator's fixed cost paid again). `split_by_length` weighs
the two: prompts sorted by length are cut into contiguous groups minimising
the padded tokens plus the cost of a forward per group: an exact dynamic
programme over the distinct lengths, whose inner loop stops at the first
length that is shorter than the group's longest by more than a forward's cost
(under 1 ms for 512 prompts at a CPU's cost, ~16 ms at a GPU's).

What a forward costs, in padded tokens, depends on the model and the machine
(on 2 CPU cores: ~35 tokens for the 135M built-in model, 400-600 for the tiny
test model, whose forwards are nearly all fixed cost). `ForwardCost` learns it from
the worker's own prefill forwards: seconds = per token x padded tokens + fixed,
fitted by least squares over the recent ones. Until enough forwards of
different sizes have been seen, and on devices whose forwards are not timed
(a GPU runs them asynchronously), it answers a default: a few dozen tokens on a
CPU; on a GPU, where padded tokens are nearly free until a batch is large,
enough that only a great deal of padding is split off (an estimate: not yet
measured on a GPU). Plain numbers only: no torch.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

# Before anything is learnt. CPU: the built-in model on 2 cores costs ~1.9 ms per padded prompt token plus ~40 ms
# per forward whatever its size, i.e. 20-25 tokens; 32 leans towards fewer forwards.
DEFAULT_FORWARD_COST_TOKENS = {"cpu": 32}
OTHER_DEVICES_FORWARD_COST_TOKENS = 2048
# What a learnt cost is kept within.
MAX_FORWARD_COST_TOKENS = 4096


def split_by_length(lengths: Sequence[int], forward_cost: float) -> list[list[int]]:
    """Indices into `lengths`, grouped: each group is one padded batch (indices ascending within a group, groups
    from the shortest prompts to the longest). Minimises sum(rows x longest) + forward_cost x groups, for a
    forward_cost of at least 0."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    # Prompts of one length always share a batch, so the programme runs over the distinct lengths, values[k]
    # ascending; upto[k]: how many prompts of `order` are shorter than values[k] (upto[n]: all of them), so that a
    # group of the lengths i..j-1 is order[upto[i]:upto[j]].
    values: list[int] = []
    upto: list[int] = [0]
    for count, index in enumerate(order, start=1):
        if values and values[-1] == lengths[index]:
            upto[-1] = count
        else:
            values.append(lengths[index])
            upto.append(count)
    n = len(values)
    # best[j]: the least cost of the j shortest lengths; cut[j]: where the last of its groups starts.
    best: list[float] = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = values[j - 1]
        for i in range(j - 1, -1, -1):
            # Taking length i into the group costs at least (longest - values[i]) - forward_cost more than leaving
            # it to a batch of its own, and shorter lengths cost more still: no start before i can be cheaper.
            if longest - values[i] > forward_cost:
                break
            cost = best[i] + (upto[j] - upto[i]) * longest + forward_cost
            if cost <= best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        i = cut[j]
        groups.append(sorted(order[upto[i] : upto[j]]))
        j = i
    groups.reverse()
    return groups


class ForwardCost:
    """The cost of one more prefill forward, in padded tokens, fitted to the last `window` forwards observed."""

    def __init__(self, default_tokens: float, window: int = 64, min_observations: int = 8):
        self.min_observations = min_observations
        self._seen: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)
        self._tokens = float(default_tokens)

    @classmethod
    def for_device(cls, device_type: str) -> ForwardCost:
        return cls(DEFAULT_FORWARD_COST_TOKENS.get(device_type, OTHER_DEVICES_FORWARD_COST_TOKENS))

    def observe(self, padded_tokens: int, seconds: float) -> None:
        self._seen.append((padded_tokens, seconds))
        fitted = self._fit()
        if fitted is not None:
            self._tokens = fitted

    def tokens(self) -> float:
        return self._tokens

    @property
    def observations(self) -> int:
        return len(self._seen)

    def _fit(self) -> float | None:
        """fixed / per token from a least-squares line through the observations; None while they are too few or
        too alike in size to tell the two apart."""
        if len(self._seen) < self.min_observations:
            return None
        sizes = [x for x, _ in self._seen]
        if max(sizes) < 2 * min(sizes):
            return None
        n = len(self._seen)
        mean_x = sum(sizes) / n
        mean_y = sum(y for _, y in self._seen) / n
        var_x = sum((x - mean_x) ** 2 for x in sizes)
        cov = sum((x - mean_x) * (y - mean_y) for x, y in self._seen)
        per_token = cov / var_x
        fixed = mean_y - per_token * mean_x
        if per_token <= 0:
            return float(MAX_FORWARD_COST_TOKENS)  # time does not grow with tokens: padding is free
        return min(max(fixed / per_token, 0.0), float(MAX_FORWARD_COST_TOKENS))
