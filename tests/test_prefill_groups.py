"""Whole prompts of one step prefilled in padded batches of similar lengths: the split, and the engine using it."""

from __future__ import annotations

import pytest

from tests.test_engine import make_call, run_all
from workers.messages import WorkerSpec
from workers.prefill_groups import MAX_FORWARD_COST_TOKENS, ForwardCost, split_by_length
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
    for _ in range(200):
        # Small ranges too, so that prompts of equal length are common.
        top = rng.choice([4, 90])
        lengths = [rng.randint(1, top) for _ in range(rng.randint(1, 8))]
        cost = rng.choice([0, 1, 8, 32, 200])
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
    assert ForwardCost.for_device("cpu").tokens() < ForwardCost.for_device("cuda").tokens()


def test_the_cost_of_a_forward_is_learnt_from_observed_forwards():
    cost = ForwardCost(default_tokens=32)
    # 2 ms a padded token and 60 ms a forward: a forward is worth 30 tokens.
    for tokens in (40, 400, 64, 512, 100, 300, 50, 200):
        assert cost.tokens() == 32
        cost.observe(tokens, 0.002 * tokens + 0.060)
    assert cost.tokens() == pytest.approx(30)
    # Forwards whose time does not grow with their size: padding is free, nothing is split.
    flat = ForwardCost(default_tokens=32, min_observations=2)
    flat.observe(10, 0.05)
    flat.observe(500, 0.05)
    assert flat.tokens() == MAX_FORWARD_COST_TOKENS


def test_forwards_all_of_one_size_teach_nothing():
    cost = ForwardCost(default_tokens=32, min_observations=2)
    for _ in range(10):
        cost.observe(100, 0.3)
    assert cost.tokens() == 32


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
    spec = WorkerSpec(
        worker_key="t/0",
        model_name="t",
        model_path=str(tiny_dir),
        cuda_visible_devices="",
        max_batch_size=8,
        max_batch_tokens=2000,
        max_step_tokens=1000,
    )
    engine, _ = load_engine(spec)
    return engine


def test_short_prompts_are_not_padded_to_a_long_one_and_tokens_do_not_change(engine):
    prompts = ["a", "1 2 3", "Hello!", "The weather", "many words " * 30]
    # Rows leave at different steps, so the joined batch is filtered too.
    max_new = [9, 4, 12, 6, 8]

    def fresh_calls():
        return [make_call(i, engine, p, max_new=n) for i, (p, n) in enumerate(zip(prompts, max_new, strict=True))]

    calls = fresh_calls()
    lengths = [len(c.prompt_token_ids) for c in calls]
    alone = {}
    for call in calls:
        alone.update(run_all(engine, [call]))
    real_model, learnt = engine.model, engine.prefill_cost
    # A forward worth 32 tokens, whatever this machine measures.
    engine.model, engine.prefill_cost = (recorder := _RecordPrefills(real_model)), ForwardCost(32, min_observations=99)
    try:
        together = run_all(engine, fresh_calls())
        first_step = list(recorder.prefills)
        # Two batches joining a running one in the same step (one concatenation of three).
        joining = run_all(engine, [(0 if i < 2 else 2, call) for i, call in enumerate(fresh_calls())])
    finally:
        engine.model, engine.prefill_cost = real_model, learnt
    assert together == alone
    assert joining == alone
    # One step prefills all five: the four short prompts together, the long one alone.
    assert sorted(first_step) == sorted([(4, max(lengths[:4])), (1, lengths[4])])
    assert sorted(recorder.prefills[len(first_step) :]) == sorted(
        [(2, max(lengths[:2])), (2, max(lengths[2:4])), (1, lengths[4])]
    )


def test_a_cpu_engine_times_its_prefill_forwards(engine):
    before = engine.prefill_cost.observations
    run_all(engine, [make_call(20 + i, engine, p, max_new=2) for i, p in enumerate(["a", "b c d e f g", "1 2"])])
    assert engine.prefill_cost.observations > before


def _batch(lengths: list[int], first_value: int):
    """A left-padded KVBatch of rows of these lengths, 2 layers; key/value entries hold (row number + first_value),
    padding holds 0."""
    import torch

    from workers.batch import KVBatch
    from workers.kv_cache import GrowableCache

    width = max(lengths)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    keys = torch.zeros((len(lengths), 2, width, 4))
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
        keys[row, :, width - length :] = row + first_value
    cache = GrowableCache()
    for layer in range(2):
        cache.update(keys.clone(), -keys.clone(), layer)
    rows = torch.arange(first_value, first_value + len(lengths))
    return KVBatch(cache=cache, attention_mask=mask, next_tokens=rows, next_positions=torch.tensor(lengths))


def test_batches_join_left_padded_in_one_concatenation_and_keep_their_rows():
    from workers.batch import KVBatch, _cache_layers

    lengths = [3, 5, 2, 9, 4]
    joined = KVBatch.concatenate([_batch([3, 5], 1), _batch([2], 3), _batch([9, 4], 4)])
    assert joined.attention_mask.tolist() == [[0] * (9 - n) + [1] * n for n in lengths]
    assert joined.next_tokens.tolist() == [1, 2, 3, 4, 5]
    assert joined.next_positions.tolist() == lengths
    for layer in _cache_layers(joined.cache):
        for row, n in enumerate(lengths):
            assert layer.keys[row, :, : 9 - n].abs().sum() == 0
            assert (layer.keys[row, :, 9 - n :] == row + 1).all()
            assert (layer.values[row, :, 9 - n :] == -(row + 1)).all()
    # Without the long row, the padding no row needs goes; every row keeps its own entries.
    kept = joined.filter([0, 1, 2, 4])
    assert kept.attention_mask.tolist() == [[0] * (5 - n) + [1] * n for n in (3, 5, 2, 4)]
    for layer in _cache_layers(kept.cache):
        for row, (n, value) in enumerate(zip((3, 5, 2, 4), (1, 2, 3, 5), strict=True)):
            assert (layer.keys[row, :, 5 - n :] == value).all()


def test_out_of_memory_in_a_later_batch_of_prompts_fails_only_the_prompt_that_cannot_fit(engine):
    """Every batch's forward runs before any newcomer takes a token: when the long prompt's batch runs out of
    memory after the short ones' ran, each prompt is tried alone once, and the short ones' tokens are as alone."""
    from tests.test_engine import _OutOfMemoryOnLongPrompts
    from workers.messages import ErrorKind

    prompts = ["a", "1 2 3", "many words " * 30]
    alone = {}
    for i, p in enumerate(prompts[:2]):
        alone.update(run_all(engine, [make_call(40 + i, engine, p, max_new=6)]))
    real_model, learnt = engine.model, engine.prefill_cost
    engine.model, engine.prefill_cost = _OutOfMemoryOnLongPrompts(real_model, limit=40), ForwardCost(32, 99)
    try:
        for i, p in enumerate(prompts):
            engine.add(make_call(40 + i, engine, p, max_new=6))
        out, errors = {}, []
        while engine.has_work:
            for event in engine.step()[1]:
                if event.error_kind is not None:
                    errors.append((event.request_id, event.error_kind))
                else:
                    out[event.request_id] = out.get(event.request_id, []) + event.token_ids
    finally:
        engine.model, engine.prefill_cost = real_model, learnt
    assert errors == [(42, ErrorKind.RESOURCE_EXHAUSTED)]
    assert out == {i: tokens for i, (tokens, _) in alone.items()}
