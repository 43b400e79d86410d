"""A running batch of sequences and its key/value cache, as a value that can be filtered and concatenated.

The approach of TGI's `CausalLM`: every row is left-padded to the batch's cache
length T, the attention mask marks real positions, and position ids count only
real tokens. Between engine steps finished rows leave (`filter`, which also
drops left padding no remaining row needs) and prefilled newcomers join
(`concatenate`, which left-pads the shorter caches). Tensors only: the engine owns
what each row means.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from workers.kv_cache import GrowableCache


def _cache_layers(cache: DynamicCache):
    """The layers of a cache that hold tensors (KV-sharing layers may hold none)."""
    layers: list = cache.layers
    return [layer for layer in layers if getattr(layer, "keys", None) is not None and layer.keys.numel()]


def _last_logits(model, input_ids, mask, positions, cache: DynamicCache) -> torch.Tensor:
    """One forward pass that fills `cache`; the logits after each row's last position, [rows, vocab]."""
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1, :]


@dataclass
class KVBatch:
    cache: DynamicCache
    # [rows, T]: 1 where the cache holds a real token of that row.
    attention_mask: torch.Tensor
    # [rows]: the token each row feeds next (sampled, not yet in the cache).
    next_tokens: torch.Tensor
    # [rows]: the position id of that next token.
    next_positions: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.attention_mask.shape[0])

    @property
    def cache_length(self) -> int:
        return int(self.attention_mask.shape[1])

    @classmethod
    @torch.inference_mode()
    def prefill(cls, model, prompts: Sequence[Sequence[int]], device: torch.device, pad_id: int):
        """Run the prompts as one left-padded batch; returns (batch without next tokens, last logits)."""
        longest = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, longest - len(prompt) :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        # Plain full-length layers for every model: filter/concatenate assume one cache length T. They grow in
        # place (workers/kv_cache.py) instead of being concatenated at every step.
        cache = GrowableCache()
        logits = _last_logits(model, input_ids, mask, positions, cache)
        lengths = mask.sum(dim=1)
        batch = cls(
            cache=cache,
            attention_mask=mask,
            next_tokens=torch.zeros(len(prompts), dtype=torch.long, device=device),
            next_positions=lengths,
        )
        return batch, logits

    @staticmethod
    @torch.inference_mode()
    def prefill_chunk(
        model, cache: DynamicCache | None, tokens: Sequence[int], start: int, device: torch.device
    ) -> tuple[DynamicCache, torch.Tensor]:
        """Feed prompt tokens [start, start + len(tokens)) of one sequence after the `start` already in `cache`
        (None when start is 0); returns (the cache, updated in place, the logits [1, vocab] after the last token).

        A batch of one has no padding: the mask covers the cache and the chunk, and the position ids go on from
        `start`, so the result is that of prefilling the whole prompt at once."""
        if cache is None:
            cache = GrowableCache()
        length = len(tokens)
        input_ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
        mask = torch.ones((1, start + length), dtype=torch.long, device=device)
        positions = torch.arange(start, start + length, dtype=torch.long, device=device).unsqueeze(0)
        return cache, _last_logits(model, input_ids, mask, positions, cache)

    @staticmethod
    def cache_from(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
        """A cache of one row holding these keys and values per layer (a stored prompt prefix); they are not
        changed: the cache's updates make new tensors."""
        cache = GrowableCache()
        for index, (keys, values) in enumerate(layers):
            cache.update(keys, values, index)
        return cache

    def row_layers(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Views of one row's keys and values per layer ([1, kv heads, T, head dim]); None when some layer holds no
        tensors (a model whose layers share them), which `cache_from` could not rebuild."""
        layers = _cache_layers(self.cache)
        if len(layers) != len(self.cache.layers):
            return None
        return [(layer.keys[row : row + 1], layer.values[row : row + 1]) for layer in layers]

    @classmethod
    def single(cls, cache: DynamicCache, length: int, device: torch.device) -> KVBatch:
        """A batch of one row whose cache holds `length` real tokens (a prompt prefilled in chunks)."""
        return cls(
            cache=cache,
            attention_mask=torch.ones((1, length), dtype=torch.long, device=device),
            next_tokens=torch.zeros(1, dtype=torch.long, device=device),
            next_positions=torch.tensor([length], dtype=torch.long, device=device),
        )

    @torch.inference_mode()
    def decode(self, model) -> torch.Tensor:
        """Feed every row's next token; returns the logits [rows, vocab] for the token after it."""
        mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((self.size, 1))], dim=1)
        out = model(
            input_ids=self.next_tokens.unsqueeze(1),
            attention_mask=mask,
            position_ids=self.next_positions.unsqueeze(1),
            cache=self.cache,  # updated in place
            use_cache=True,
        )
        self.attention_mask = mask
        self.next_positions = self.next_positions + 1
        return out.logits[:, -1, :]

    def set_next_tokens(self, tokens: Sequence[int]) -> None:
        self.next_tokens = torch.tensor(tokens, dtype=torch.long, device=self.attention_mask.device)

    def filter(self, keep: Sequence[int]) -> KVBatch:
        """Keep only the rows `keep` (in that order) and drop padding columns no row needs any more."""
        if len(keep) == self.size and list(keep) == list(range(self.size)):
            return self
        index = torch.tensor(keep, dtype=torch.long, device=self.attention_mask.device)
        mask = self.attention_mask.index_select(0, index)
        needed = int(mask.sum(dim=1).max().item())
        start = self.cache_length - needed
        for layer in _cache_layers(self.cache):
            layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))[:, :, start:, :]
            layer.values = layer.values.index_select(0, index.to(layer.values.device))[:, :, start:, :]
        self.attention_mask = mask[:, start:]
        self.next_tokens = self.next_tokens.index_select(0, index)
        self.next_positions = self.next_positions.index_select(0, index)
        return self

    @staticmethod
    def concatenate(batches: Sequence[KVBatch]) -> KVBatch:
        """The rows of every batch in order, left-padded to the longest cache, in one copy of each layer's tensors
        (however many batches join). Reuses the first batch's cache object."""
        first = batches[0]
        if len(batches) == 1:
            return first
        length = max(batch.cache_length for batch in batches)

        def padded(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
            shape = list(tensors[0].shape)
            shape[0], shape[dim] = sum(t.shape[0] for t in tensors), length
            out = tensors[0].new_empty(shape)
            row = 0
            for t in tensors:
                rows, missing = t.shape[0], length - t.shape[dim]
                block = out.narrow(0, row, rows)
                block.narrow(dim, 0, missing).zero_()
                block.narrow(dim, missing, t.shape[dim]).copy_(t)
                row += rows
            return out

        for layers in zip(*(_cache_layers(batch.cache) for batch in batches), strict=True):
            keys = padded([layer.keys for layer in layers], 2)
            values = padded([layer.values for layer in layers], 2)
            layers[0].keys, layers[0].values = keys, values
        first.attention_mask = padded([batch.attention_mask for batch in batches], 1)
        first.next_tokens = torch.cat([batch.next_tokens for batch in batches])
        first.next_positions = torch.cat([batch.next_positions for batch in batches])
        return first
