"""The prefix cache: block-aligned prompt prefixes reused, bounded by bytes with LRU eviction, and output
token-identical to a cold prefill on the tiny model."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from tests.test_chunked_prefill import BUDGET, call_of_length, engine_like
from tests.test_engine import engine, run_all  # noqa: F401  (fixture)
from workers.prefix_cache import PrefixCache


def layers_of(length, fill=0.0, n_layers=2):
    """Fake per-layer keys and values [1, 2 heads, length, 4] whose value at position p is fill + p."""
    ramp = torch.arange(length, dtype=torch.float32).view(1, 1, length, 1).expand(1, 2, length, 4) + fill
    return [(ramp.clone(), -ramp.clone()) for _ in range(n_layers)]


def test_only_block_aligned_prefixes_that_leave_a_token_to_compute():
    cache = PrefixCache(max_bytes=1 << 20, block_tokens=4)
    assert [cache.cacheable_length(n) for n in (1, 4, 5, 8, 9, 12)] == [0, 0, 4, 4, 8, 8]
    cache.store(tuple(range(4)), layers_of(4), start=0)
    assert len(cache) == 0 and cache.bytes == 0  # nothing to keep: its only block holds the last token
    cache.store(tuple(range(10)), layers_of(12), start=2)  # left-padded by 2 in its batch
    [(keys, values), _] = cache.lookup(tuple(range(9))).layers
    assert keys.shape == (1, 2, 8, 4) and keys[0, 0, :, 0].tolist() == [2, 3, 4, 5, 6, 7, 8, 9]
    assert torch.equal(values, -keys)


def test_lookup_finds_the_longest_stored_prefix_and_counts_hits():
    cache = PrefixCache(max_bytes=1 << 20, block_tokens=4)
    prompt = tuple(range(100, 120))
    cache.store(prompt[:9], layers_of(9), start=0)  # keeps 8 tokens
    cache.store(prompt[:13], layers_of(13), start=0)  # keeps 12
    assert cache.lookup(prompt[:12]) is not None and len(cache.lookup(prompt[:12]).tokens) == 8  # 12 leaves none
    assert len(cache.lookup(prompt).tokens) == 12
    assert cache.lookup((1, 2, 3, 4, 5, 6)) is None
    assert cache.lookup(prompt[:8] + (0,) * 8).tokens == prompt[:8]  # differs after 8: the shorter one
    assert cache.take_counts() == (4, 8 + 8 + 12 + 8) and cache.take_counts() == (0, 0)


def test_stored_prefixes_are_copies():
    cache = PrefixCache(max_bytes=1 << 20, block_tokens=4)
    layers = layers_of(5)
    cache.store(tuple(range(5)), layers, start=0)
    layers[0][0].zero_()
    assert cache.lookup(tuple(range(5))).layers[0][0][0, 0, :, 0].tolist() == [0, 1, 2, 3]


def test_the_size_is_bounded_least_recently_used_out_first():
    one = sum(k.numel() * 4 + v.numel() * 4 for k, v in layers_of(4))  # one 4-token entry
    cache = PrefixCache(max_bytes=3 * one, block_tokens=4)
    for first in range(3):
        cache.store((first, 1, 2, 3, 4), layers_of(5), start=0)
    assert len(cache) == 3 and cache.bytes == 3 * one
    cache.lookup((0, 1, 2, 3, 9))  # 0 is used again: 1 is now the least recently used
    cache.store((3, 1, 2, 3, 4), layers_of(5), start=0)
    assert cache.bytes == 3 * one and cache.lookup((1, 1, 2, 3, 9)) is None
    assert all(cache.lookup((f, 1, 2, 3, 9)) is not None for f in (0, 2, 3))
    cache.store(tuple(range(50)), layers_of(50), start=0)  # larger than the whole budget: not kept
    assert len(cache) == 3 and cache.bytes == 3 * one


def with_prefix_cache(engine, max_step_tokens):  # noqa: F811
    return engine_like(engine, max_step_tokens, max_batch_tokens=1000, prefix_cache_bytes=64 << 20)


def turns(engine, n_turns=3, system_len=150, seed=0):  # noqa: F811
    """Prompts of a chat that resends its history: each is the last one plus new tokens."""
    rng = random.Random(seed)
    vocab = engine.model.config.vocab_size
    prompt = [rng.randrange(3, vocab) for _ in range(system_len)]
    prompts = []
    for _ in range(n_turns):
        prompts.append(tuple(prompt))
        prompt += [rng.randrange(3, vocab) for _ in range(rng.randrange(20, 50))]
    return prompts


@pytest.mark.parametrize("max_step_tokens", [0, BUDGET])
def test_prompts_that_start_with_a_cached_prefix_give_the_tokens_of_a_cold_prefill(engine, max_step_tokens):  # noqa: F811
    template = call_of_length(0, engine, 1, max_new=6)
    calls = [dataclasses.replace(template, request_id=i, prompt_token_ids=p) for i, p in enumerate(turns(engine))]
    sampled = dataclasses.replace(
        calls[2], request_id=3, sampling=dataclasses.replace(template.sampling, do_sample=True, seed=3)
    )
    cold = run_all(engine_like(engine, 0, max_batch_tokens=1000), [*calls, sampled])
    warm = with_prefix_cache(engine, max_step_tokens)
    got = {}
    for call in [*calls, sampled]:  # one after another: each turn finds the one before it
        got.update(run_all(warm, [call]))
    assert got == cold
    hits, hit_tokens, size = warm.take_prefix_counts()
    # Turn 0 finds nothing, turn 1 finds turn 0's stored prefix, turn 2 turn 1's, the sampled request turn 2's.
    expected = [warm.prefix_cache.cacheable_length(len(c.prompt_token_ids)) for c in calls]
    assert (hits, hit_tokens) == (3, expected[0] + expected[1] + expected[2]) and size == warm.prefix_cache.bytes > 0


def test_a_prefix_cached_from_a_padded_batch_row_gives_the_same_tokens(engine):  # noqa: F811
    """Prompts prefilled together are left-padded: the stored prefix must start after the row's padding."""
    prompts = turns(engine, n_turns=2, system_len=130, seed=4)
    longer = call_of_length(10, engine, 200, max_new=5)
    template = call_of_length(0, engine, 1, max_new=5)
    first = dataclasses.replace(template, request_id=0, prompt_token_ids=prompts[0])
    second = dataclasses.replace(template, request_id=1, prompt_token_ids=prompts[1])
    cold = run_all(engine_like(engine, 0, max_batch_tokens=1000), [second])
    warm = with_prefix_cache(engine, 0)
    run_all(warm, [longer, first])  # one padded batch: `first` (130 tokens) has 70 padding columns
    assert run_all(warm, [second]) == cold
    assert warm.take_prefix_counts()[:2] == (1, 128)
