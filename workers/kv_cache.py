"""A key/value cache that grows in place: each layer writes new tokens into spare room of a preallocated buffer.

transformers' `DynamicCache` concatenates every layer's keys and values with
each step's new ones, so a decode step copies the whole cache (rows x T x
layers) to add one column. Here a layer keeps a buffer with room for more
tokens than it holds, writes the step's keys and values into the next free
columns and hands the model views of the filled part; only when the room runs
out is a buffer allocated (with a quarter more room, at least `MIN_ROOM`
columns) and the filled part copied. The copy per token is then a constant
fraction of the cache instead of all of it.

`layer.keys` / `layer.values` stay plain tensors of the filled part, so code
that replaces them (workers/batch.py filters rows and concatenates batches that
way) keeps working: a layer whose tensors were replaced from outside adopts them
into a new buffer at its next update.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

# Columns of room a buffer gets beyond what it must hold, at least (a decode step adds one).
MIN_ROOM = 64


def _capacity(needed: int) -> int:
    return needed + max(MIN_ROOM, needed // 4)


class GrowableLayer(DynamicLayer):
    """One layer's keys and values, [rows, heads, T, head dim], in buffers with room to grow along T."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def _owns_tensors(self) -> bool:
        """Whether `keys`/`values` are still the views this layer handed out (not replaced from outside)."""
        buffer = self._key_buffer
        keys = self.keys
        return (
            buffer is not None
            and keys is not None
            and keys.numel() > 0
            and keys.data_ptr() == buffer.data_ptr()
            and keys.shape[0] == buffer.shape[0]
            and self.values is not None
            and self._value_buffer is not None
            and self.values.data_ptr() == self._value_buffer.data_ptr()
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None
        held = self.keys.shape[-2] if self.keys.numel() else 0
        needed = held + key_states.shape[-2]
        owned = self._owns_tensors()
        if not owned or self._key_buffer is None or needed > self._key_buffer.shape[-2]:
            self._reallocate(key_states, value_states, held, _capacity(needed))
        assert self._key_buffer is not None and self._value_buffer is not None
        self._key_buffer[:, :, held:needed] = key_states
        self._value_buffer[:, :, held:needed] = value_states
        self.keys = self._key_buffer[:, :, :needed]
        self.values = self._value_buffer[:, :, :needed]
        return self.keys, self.values

    def _reallocate(self, key_states: torch.Tensor, value_states: torch.Tensor, held: int, capacity: int) -> None:
        rows, heads, _, key_dim = key_states.shape
        keys = key_states.new_empty((rows, heads, capacity, key_dim))
        values = value_states.new_empty((rows, heads, capacity, value_states.shape[-1]))
        if held:
            assert self.keys is not None and self.values is not None
            keys[:, :, :held] = self.keys
            values[:, :, :held] = self.values
        self._key_buffer, self._value_buffer = keys, values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


class GrowableCache(DynamicCache):
    """A `DynamicCache` whose layers grow in place (see the module docstring)."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=GrowableLayer)
