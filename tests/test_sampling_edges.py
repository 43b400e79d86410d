"""Edge cases of workers/ or service/ sampling code that the mutation run (tests/MUTATION.md) showed no other test
caught; each kills surviving mutants named there."""

from __future__ import annotations

import torch

from tests.test_sampling import row
from workers.messages import SamplingParams
from workers.sampling import sample_next_tokens


def test_repetition_penalty_divides_positive_and_multiplies_negative_scores():
    penalized = SamplingParams(repetition_penalty=2.0)
    # 0.5 -> 0.25, below 0.4 (multiplying would give 1.0)
    assert sample_next_tokens(torch.tensor([[0.5, 0.4]]), [row(penalized, seen=[0])], []) == [1]
    # -1.0 -> -2.0, below -1.5 (dividing would give -0.5)
    assert sample_next_tokens(torch.tensor([[-1.0, -1.5]]), [row(penalized, seen=[0])], []) == [1]


def test_top_p_drops_a_token_once_the_mass_before_it_reaches_top_p_exactly():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))  # exact in float32: the mass before token 1 is 0.5
    params = SamplingParams(do_sample=True, top_p=0.5, seed=0)
    r = row(params)
    assert {sample_next_tokens(logits.clone(), [r], [])[0] for _ in range(30)} == {0}


def test_every_eos_id_is_suppressed_in_every_suppressed_row():
    logits = torch.tensor([[5.0, 4.0, 1.0], [4.0, 5.0, 1.0]])
    rows = [row(SamplingParams(), suppress_eos=True), row(SamplingParams(), suppress_eos=True)]
    assert sample_next_tokens(logits.clone(), rows, [0, 1]) == [2, 2]


def test_low_temperature_sharpens():
    logits = torch.tensor([[1.0, 0.0]])
    params = SamplingParams(do_sample=True, temperature=0.01, seed=0)
    r = row(params)
    assert {sample_next_tokens(logits.clone(), [r], [])[0] for _ in range(30)} == {0}
