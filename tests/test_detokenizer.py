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


def test_text_that_may_start_a_stop_is_held_back_until_the_next_token_decides(tokenizer):
    # "cats| and| dogs": the token " and" is the start of the stop sequence " and then", so it must not be
    # released with its own token; " dogs" shows it is not the stop, and releases both.
    deltas, stopped = feed(tokenizer, "cats and dogs", stops=[" and then"])
    assert not stopped
    assert deltas == ["cats", "", " and dogs", ""]


def test_held_back_prefix_that_becomes_the_stop_is_never_released(tokenizer):
    deltas, stopped = feed(tokenizer, "cats and then dogs", stops=[" and then"])
    assert stopped and deltas == ["cats", "", ""]


def test_earliest_of_several_stops_wins(tokenizer):
    deltas, stopped = feed(tokenizer, "one two three four", stops=["four", "two"])
    assert stopped and "".join(deltas) == "one "
