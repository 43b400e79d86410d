"""Incremental detokenization with the real SmolLM2 tokenizer: no broken characters, exact stop sequences."""

from __future__ import annotations

import pytest

from workers.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def feed(tokenizer, text, stops=()):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, tokenizer("Prompt:")["input_ids"], stops)
    deltas = []
    for token in ids:
        delta, stopped = detok.add_token(token)
        deltas.append(delta)
        if stopped:
            return deltas, True
    deltas.append(detok.flush())
    return deltas, False


@pytest.mark.parametrize("text", ["北京是中国的首都。你好，世界！", "emoji 🙂👍🏽 and café", " leading space", "日本語とEnglish混在"])
def test_multibyte_text_is_never_split(tokenizer, text):
    deltas, _ = feed(tokenizer, text)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_sequence_is_cut_and_not_returned(tokenizer):
    deltas, stopped = feed(tokenizer, "Hello world. STOP here and more", stops=["STOP"])
    assert stopped and "".join(deltas) == "Hello world. "


def test_text_that_may_start_a_stop_is_held_back(tokenizer):
    # "ST" could begin "STOP": it must not be released before the detokenizer knows.
    deltas, stopped = feed(tokenizer, "a STAR is born", stops=["STOP"])
    assert not stopped and "".join(deltas) == "a STAR is born"


def test_earliest_of_several_stops_wins(tokenizer):
    deltas, stopped = feed(tokenizer, "one two three four", stops=["four", "two"])
    assert stopped and "".join(deltas) == "one "
