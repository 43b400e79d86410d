"""The in-place growing key/value cache (workers/kv_cache.py): same contents as concatenation, fewer copies."""

from __future__ import annotations

import torch

from workers.kv_cache import MIN_ROOM, GrowableCache, GrowableLayer


def _states(rows: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, tokens, 4, generator=generator), torch.randn(rows, 2, tokens, 4, generator=generator)


def test_a_layer_holds_what_concatenation_would_and_reuses_its_buffer_between_steps():
    layer = GrowableLayer()
    expected_keys, expected_values = _states(3, 10, seed=0)
    keys, values = layer.update(expected_keys, expected_values)
    buffer = layer._key_buffer
    assert buffer is not None and buffer.shape[2] == 10 + MIN_ROOM
    for step in range(MIN_ROOM):
        new_keys, new_values = _states(3, 1, seed=step + 1)
        keys, values = layer.update(new_keys, new_values)
        expected_keys = torch.cat([expected_keys, new_keys], dim=2)
        expected_values = torch.cat([expected_values, new_values], dim=2)
        assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
    # All those steps wrote into the first buffer: no copy of the cache per token.
    assert layer._key_buffer is buffer
    assert layer.get_seq_length() == 10 + MIN_ROOM
    # The room is used up: the next token moves the cache to a larger buffer, with the same contents.
    new_keys, new_values = _states(3, 1, seed=999)
    keys, _ = layer.update(new_keys, new_values)
    assert layer._key_buffer is not buffer
    assert torch.equal(keys, torch.cat([expected_keys, new_keys], dim=2))


def test_tensors_replaced_from_outside_are_adopted_at_the_next_update():
    """workers/batch.py filters rows and concatenates batches by assigning new tensors to a layer."""
    layer = GrowableLayer()
    keys, values = _states(4, 6, seed=1)
    layer.update(keys, values)
    old_buffer = layer._key_buffer
    # Keep rows 3 and 1, drop the first two columns: what KVBatch.filter does.
    kept_keys = layer.keys.index_select(0, torch.tensor([3, 1]))[:, :, 2:]
    kept_values = layer.values.index_select(0, torch.tensor([3, 1]))[:, :, 2:]
    layer.keys, layer.values = kept_keys, kept_values
    new_keys, new_values = _states(2, 1, seed=2)
    got_keys, got_values = layer.update(new_keys, new_values)
    assert layer._key_buffer is not old_buffer
    assert torch.equal(got_keys, torch.cat([kept_keys, new_keys], dim=2))
    assert torch.equal(got_values, torch.cat([kept_values, new_values], dim=2))


def test_a_cache_seeded_from_stored_tensors_leaves_them_unchanged():
    """The prefix cache hands its stored tensors to a new cache; later updates must not write into them."""
    stored_keys, stored_values = _states(1, 8, seed=3)
    before = stored_keys.clone()
    cache = GrowableCache()
    cache.update(stored_keys, stored_values, 0)
    more_keys, more_values = _states(1, 5, seed=4)
    keys, _ = cache.update(more_keys, more_values, 0)
    assert torch.equal(stored_keys, before)
    assert torch.equal(keys, torch.cat([before, more_keys], dim=2))
    assert cache.get_seq_length(0) == 13
