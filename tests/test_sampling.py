"""Per-row sampling parameters inside one batch."""

from __future__ import annotations

import torch

from workers.messages import SamplingParams
from workers.sampling import RowSampling, make_generator, sample_next_tokens


def row(params, seen=(), suppress_eos=False):
    return RowSampling(params=params, generator=make_generator(params, torch.device("cpu")),
                       seen_token_ids=seen, suppress_eos=suppress_eos)


def test_greedy_rows_take_the_argmax_and_eos_can_be_suppressed():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0]])
    assert sample_next_tokens(logits.clone(), [row(SamplingParams()), row(SamplingParams())], [1]) == [1, 0]
    assert sample_next_tokens(logits.clone(), [row(SamplingParams(), suppress_eos=True), row(SamplingParams())], [1]) == [2, 0]


def test_top_k_one_is_greedy_and_seeds_repeat():
    logits = torch.randn(4, 100)
    top1 = SamplingParams(do_sample=True, top_k=1, seed=3)
    assert sample_next_tokens(logits.clone(), [row(top1)] * 4, []) == logits.argmax(-1).tolist()
    seeded = SamplingParams(do_sample=True, temperature=2.0, seed=11)
    first = [sample_next_tokens(logits[:1].clone(), [row(seeded)], []) for _ in range(3)]
    assert first[0] == first[1] == first[2]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    params = SamplingParams(do_sample=True, top_p=0.5, seed=0)
    picks = {sample_next_tokens(logits.clone(), [row(params)], [])[0] for _ in range(20)}
    assert picks == {0}


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    assert sample_next_tokens(logits.clone(), [row(SamplingParams(repetition_penalty=1.5), seen=[0])], []) == [1]
    assert sample_next_tokens(logits.clone(), [row(SamplingParams(), seen=[0])], []) == [0]
