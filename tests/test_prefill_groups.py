"""Whole prompts of one step prefilled in padded batches of similar lengths: the split, and the engine using it."""

from __future__ import annotations

import pytest

from tests.test_engine import make_call, run_all
from workers.messages import WorkerSpec
from workers.prefill_groups import forward_cost_tokens, split_by_length
from workers.worker_main import load_engine


def _padded(lengths, groups) -> int:
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)


def test_a_long_prompt_among_short_ones_gets_a_batch_of_its_own():
    lengths = [37, 38, 40, 27, 77, 44, 45, 36]
    groups = split_by_length(lengths, forward_cost=32)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [4] in groups
    assert _padded(lengths, groups) + 32 * len(groups) < _padded(lengths, [list(range(len(lengths)))]) + 32


def test_the_split_weighs_padding_against_forwards():
    lengths = [10, 10, 11, 12, 50]
    # Padding the 50 costs 4 x 40 tokens: worth a forward of 32, not one of 1000.
    assert split_by_length(lengths, forward_cost=32) == [[0, 1, 2, 3], [4]]
    assert split_by_length(lengths, forward_cost=1000) == [[0, 1, 2, 3, 4]]
    # Free forwards: every distinct length alone; equal lengths always share one.
    assert split_by_length(lengths, forward_cost=0) == [[0, 1], [2], [3], [4]]
    assert split_by_length([7, 7, 7], forward_cost=0) == [[0, 1, 2]]
    assert split_by_length([], forward_cost=32) == []


def test_the_split_is_the_cheapest_one():
    """Against every contiguous split of the sorted lengths (brute force, small cases)."""
    import itertools
    import random

    rng = random.Random(5)
    for _ in range(60):
        lengths = [rng.randint(1, 90) for _ in range(rng.randint(1, 7))]
        cost = rng.choice([0, 8, 32, 200])
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        best = None
        for cuts in itertools.product([False, True], repeat=len(order) - 1):
            groups, current = [], [order[0]]
            for index, cut in zip(order[1:], cuts, strict=True):
                if cut:
                    groups.append(current)
                    current = []
                current.append(index)
            groups.append(current)
            total = _padded(lengths, groups) + cost * len(groups)
            best = total if best is None else min(best, total)
        found = split_by_length(lengths, cost)
        assert _padded(lengths, found) + cost * len(found) == best


def test_cpus_split_more_readily_than_other_devices():
    assert forward_cost_tokens("cpu") < forward_cost_tokens("cuda")


class _RecordPrefills:
    """The model, recording the [rows, width] of every prefill forward."""

    def __init__(self, model):
        self.model = model
        self.prefills: list[tuple[int, int]] = []

    def __call__(self, input_ids, **kwargs):
        if input_ids.shape[1] > 1:
            self.prefills.append(tuple(input_ids.shape))
        return self.model(input_ids=input_ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    import torch

    torch.set_num_threads(1)
    spec = WorkerSpec(worker_key="t/0", model_name="t", model_path=str(tiny_dir), cuda_visible_devices="",
                      max_batch_size=8, max_batch_tokens=2000, max_step_tokens=1000)
    engine, _ = load_engine(spec)
    return engine


def test_short_prompts_are_not_padded_to_a_long_one_and_tokens_do_not_change(engine):
    prompts = ["a", "1 2 3", "Hello!", "The weather", "many words " * 30]
    calls = [make_call(i, engine, p, max_new=9) for i, p in enumerate(prompts)]
    lengths = [len(c.prompt_token_ids) for c in calls]
    alone = {}
    for call in calls:
        alone.update(run_all(engine, [call]))
    real_model = engine.model
    engine.model = recorder = _RecordPrefills(real_model)
    try:
        together = run_all(engine, [make_call(i, engine, p, max_new=9) for i, p in enumerate(prompts)])
    finally:
        engine.model = real_model
    assert together == alone
    # One step prefills all five: the four short prompts together, the long one alone.
    assert sorted(recorder.prefills) == sorted([(4, max(lengths[:4])), (1, lengths[4])])
