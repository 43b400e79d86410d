"""Edge cases of workers/ or service/ detokenizer code that the mutation run (tests/MUTATION.md) showed no other test
caught; each kills surviving mutants named there."""

from __future__ import annotations

from tests.test_detokenizer import feed, tokenizer  # noqa: F401  (fixture)
from workers.detokenizer import IncrementalDetokenizer


def test_stop_at_the_very_start_of_the_text(tokenizer):  # noqa: F811
    deltas, stopped = feed(tokenizer, "STOP and more", stops=["STOP"])
    assert stopped and deltas == [""]


def test_first_occurrence_of_a_stop_inside_one_token_wins(tokenizer):  # noqa: F811
    deltas, stopped = feed(tokenizer, "Hello there", stops=["l"])  # "Hello" is one token
    assert stopped and deltas == ["He"]


def test_flush_releases_pending_bytes_once(tokenizer):  # noqa: F811
    ids = tokenizer("x 🫠", add_special_tokens=False)["input_ids"]  # the emoji takes three tokens
    detok = IncrementalDetokenizer(tokenizer, tokenizer("Prompt:")["input_ids"], ())
    deltas = [detok.add_token(t)[0] for t in ids[:-1]]  # the last byte never comes
    assert deltas == ["x", "", ""]
    assert detok.flush() == " \ufffd"  # the incomplete character, as the tokenizer decodes it
    assert detok.flush() == ""
    assert detok.text == "x \ufffd"


def test_special_tokens_are_not_text(tokenizer):  # noqa: F811
    detok = IncrementalDetokenizer(tokenizer, tokenizer("Prompt:")["input_ids"], ())
    ids = tokenizer("Hi", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    text = "".join(detok.add_token(t)[0] for t in ids) + detok.flush()
    assert text == "Hi"


def test_a_single_character_that_may_start_a_stop_is_held_back(tokenizer):  # noqa: F811
    deltas, stopped = feed(tokenizer, "cats and dogs", stops=["s!"])
    assert not stopped and deltas == ["cat", "s and", " dog", "s"]


def test_the_longest_proper_prefix_of_a_stop_is_held_back(tokenizer):  # noqa: F811
    deltas, stopped = feed(tokenizer, "cats and dogs", stops=[" and."])  # " and" is one character short of it
    assert not stopped and deltas == ["cats", "", " and dogs", ""]


def test_stop_that_ends_with_the_first_character_of_a_token(tokenizer):  # noqa: F811
    deltas, stopped = feed(tokenizer, "cats and dogs", stops=["cats and "])
    assert stopped and "".join(deltas) == ""


def test_text_ends_where_the_stop_began(tokenizer):  # noqa: F811
    detok = IncrementalDetokenizer(tokenizer, tokenizer("Prompt:")["input_ids"], ["STOP"])
    for token in tokenizer("Hello STOP here", add_special_tokens=False)["input_ids"]:
        if detok.add_token(token)[1]:
            break
    assert detok.text == "Hello "
