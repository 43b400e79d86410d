"""Choosing the next token for every row of a batch, each row with its own parameters.

Rows are processed so that a row's result depends only on its own logits and its
own random generator: a seeded request gives the same tokens alone or beside others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workers.messages import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class RowSampling:
    """What the sampler needs to know about one row for this step."""

    params: SamplingParams
    generator: torch.Generator | None
    # Token ids seen so far (prompt + generated), for the repetition penalty.
    seen_token_ids: Sequence[int]
    # End-of-sequence ids must not be chosen (ignore_eos, or min_new_tokens not reached).
    suppress_eos: bool


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if not params.do_sample:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def _apply_repetition_penalty(row: torch.Tensor, seen: Sequence[int], penalty: float) -> None:
    ids = torch.tensor(sorted(set(seen)), dtype=torch.long, device=row.device)
    if ids.numel() == 0:
        return
    scores = row[ids]
    row[ids] = torch.where(scores < 0, scores * penalty, scores / penalty)


def _filter_top_k_top_p(row: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < row.numel():
        kth = torch.topk(row, top_k).values[-1]
        row = row.masked_fill(row < kth, _NEG_INF)
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the mass before it already reaches top_p (the first token always stays).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        row = row.masked_fill(drop, _NEG_INF)
    return row


def sample_next_tokens(logits: torch.Tensor, rows: Sequence[RowSampling], eos_token_ids: Sequence[int]) -> list[int]:
    """Pick one token per row of `logits` ([batch, vocab]); returns plain ints."""
    logits = logits.float()
    if eos_token_ids:
        suppress = [i for i, r in enumerate(rows) if r.suppress_eos]
        if suppress:
            row_idx = torch.tensor(suppress, device=logits.device).unsqueeze(1)
            eos_idx = torch.tensor(list(eos_token_ids), device=logits.device).unsqueeze(0)
            logits[row_idx, eos_idx] = _NEG_INF
    for i, r in enumerate(rows):
        if r.params.repetition_penalty != 1.0:
            _apply_repetition_penalty(logits[i], r.seen_token_ids, r.params.repetition_penalty)

    # Greedy rows share one argmax; sampled rows each use their own generator.
    chosen = logits.argmax(dim=-1).tolist()
    for i, r in enumerate(rows):
        if not r.params.do_sample:
            continue
        row = logits[i] / r.params.temperature
        row = _filter_top_k_top_p(row, r.params.top_k, r.params.top_p)
        probs = row.softmax(dim=-1)
        chosen[i] = int(torch.multinomial(probs, 1, generator=r.generator).item())
    return chosen
