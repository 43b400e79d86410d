"""The key/value cache of recently seen prompt prefixes, so that a prompt starting with one is prefilled from there.

An entry holds the cache of a prompt's first L tokens, L a multiple of the block
size (64 tokens) and below the prompt's length (the last token is always
computed: its logits give the first generated token). Entries are keyed by the
token ids themselves, so a hit is exact. A prompt looks for the longest stored
prefix it starts with, block by block from the longest; a multi-turn chat that
resends its history finds the previous turn's prompt. The total size is bounded
(`max_bytes`); the least recently used entries go first. Tensors are kept on
the device the model computes on; nothing here runs the model.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

import torch

BLOCK_TOKENS = 64


@dataclass
class PrefixEntry:
    tokens: tuple[int, ...]
    # Per cache layer (those with tensors, in order): keys and values [1, kv heads, len(tokens), head dim].
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    nbytes: int


class PrefixCache:
    def __init__(self, max_bytes: int, block_tokens: int = BLOCK_TOKENS):
        self.max_bytes = max_bytes
        self.block_tokens = block_tokens
        self._entries: collections.OrderedDict[tuple[int, ...], PrefixEntry] = collections.OrderedDict()
        self.bytes = 0
        # Counted since the last `take_counts`: lookups that found a prefix, and the prompt tokens it covered.
        self._hits = 0
        self._hit_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def cacheable_length(self, prompt_len: int) -> int:
        """The longest block-aligned prefix that still leaves a prompt token to compute."""
        return (prompt_len - 1) // self.block_tokens * self.block_tokens

    def lookup(self, prompt: Sequence[int]) -> PrefixEntry | None:
        for length in range(self.cacheable_length(len(prompt)), 0, -self.block_tokens):
            entry = self._entries.get(tuple(prompt[:length]))
            if entry is not None:
                self._entries.move_to_end(entry.tokens)
                self._hits += 1
                self._hit_tokens += length
                return entry
        return None

    def store(self, prompt: Sequence[int], layers: list[tuple[torch.Tensor, torch.Tensor]], start: int) -> None:
        """Keep the prefix of `prompt` whose keys and values are `layers[i][*][:, :, start : start + L]` (L the
        cacheable length); copied, so the batch they come from can change."""
        length = self.cacheable_length(len(prompt))
        key = tuple(prompt[:length])
        if length <= 0 or key in self._entries:
            if length > 0:
                self._entries.move_to_end(key)
            return
        kept = [(k[:, :, start : start + length].clone(), v[:, :, start : start + length].clone()) for k, v in layers]
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kept)
        if nbytes > self.max_bytes:
            return
        self._entries[key] = PrefixEntry(key, kept, nbytes)
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.nbytes

    def take_counts(self) -> tuple[int, int]:
        """(hits, hit tokens) since the last call."""
        counts = (self._hits, self._hit_tokens)
        self._hits = self._hit_tokens = 0
        return counts
