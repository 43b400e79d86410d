"""Incremental detokenization with exact stop-sequence cutting, one instance per sequence.

Text is released only when it is final: a token that ends inside a multi-byte
UTF-8 character (the tokenizer decodes it to U+FFFD) waits for the next one, and
text that could be the start of a stop sequence is held back until it is known
not to be one. The deltas concatenate to the whole text.
"""

from __future__ import annotations

from collections.abc import Sequence

# How many prompt tokens give the first generated tokens their context when decoded
# (some tokenizers drop a leading space when a token is decoded alone).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], stop_sequences: Sequence[str]):
        self._tokenizer = tokenizer
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._ids: list[int] = context
        # vLLM's scheme: text of ids[prefix:read] is already released; ids[read:] is pending.
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._stops = tuple(s for s in stop_sequences if s)
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self._text = ""  # every character decoded so far
        self._sent = 0  # how many characters of _text were released

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add_token(self, token_id: int) -> tuple[str, bool]:
        """Feed one generated token; returns (text to release now, whether a stop sequence matched)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT_CHAR):
            before = len(self._text)
            self._text += new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            if self._stops:
                stop_at = self._find_stop(max(0, before - self._max_stop + 1))
                if stop_at is not None:
                    delta = self._text[self._sent : stop_at]
                    self._text = self._text[:stop_at]
                    self._sent = stop_at
                    return delta, True
        releasable = len(self._text) - self._held_back()
        delta = self._text[self._sent : releasable]
        self._sent = max(self._sent, releasable)
        return delta, False

    def flush(self) -> str:
        """At the end of the sequence: release whatever is left, pending bytes included."""
        tail = self._decode(self._ids[self._prefix_offset :])
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        if len(tail) > len(prefix_text):
            self._text += tail[len(prefix_text) :]
            self._prefix_offset = self._read_offset = len(self._ids)
        delta = self._text[self._sent :]
        self._sent = len(self._text)
        return delta

    def _find_stop(self, start: int) -> int | None:
        hits = [i for i in (self._text.find(s, start) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop sequence."""
        text = self._text
        for n in range(min(self._max_stop - 1, len(text) - self._sent), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0

    @property
    def text(self) -> str:
        return self._text
