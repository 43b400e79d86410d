"""Chunked prefill on the tiny model: a prompt prefilled over several steps gives exactly the tokens of one prefill,
the running sequences get a token every step meanwhile, and abort / out of memory of a half-prefilled prompt free
only it."""

from __future__ import annotations

import random
import time

import pytest
import torch

from tests.test_engine import engine, run_all  # noqa: F401  (fixture)
from workers.engine import Engine
from workers.messages import ErrorKind, FinishReason, GenerateCall, SamplingParams, StoppingParams

BUDGET = 16


def engine_like(engine, max_step_tokens, max_batch_size=4, max_batch_tokens=400, **options):  # noqa: F811
    """The fixture's model and tokenizer in an engine with other budgets (and `options`: max_overtakes,
    prefix_cache_bytes)."""
    return Engine(
        engine.model,
        engine.tokenizer,
        device=engine.device,
        eos_token_ids=engine.eos_token_ids,
        max_batch_size=max_batch_size,
        max_batch_tokens=max_batch_tokens,
        max_step_tokens=max_step_tokens,
        **options,
    )


def call_of_length(request_id, engine, length, max_new=8, **sampling):  # noqa: F811
    rng = random.Random(request_id)  # the prompt: random token ids, a different prompt per request id
    vocab = engine.model.config.vocab_size
    return GenerateCall(
        request_id=request_id,
        prompt_token_ids=tuple(rng.randrange(3, vocab) for _ in range(length)),
        sampling=SamplingParams(**sampling),
        stopping=StoppingParams(max_new_tokens=max_new, ignore_eos=True),
        arrival_time=time.time(),
    )


LENGTHS = [BUDGET - 1, BUDGET, BUDGET + 1, 2 * BUDGET + 3, 5 * BUDGET + 7]


def test_chunked_prompts_give_the_tokens_of_an_unchunked_prefill(engine):  # noqa: F811
    unchunked = engine_like(engine, 0)
    chunked = engine_like(engine, BUDGET)
    for i, length in enumerate(LENGTHS):
        assert run_all(chunked, [call_of_length(i, engine, length)]) == run_all(
            unchunked, [call_of_length(i, engine, length)]
        ), f"prompt of {length} tokens"


def test_chunked_prompts_joining_a_decoding_batch_give_the_tokens_they_get_alone(engine):  # noqa: F811
    """Staggered arrivals: chunks start at other offsets (the decodes take part of each step's budget), short
    prompts are prefilled whole together, sampled rows keep their own generator."""
    unchunked = engine_like(engine, 0)
    params = [{"do_sample": True, "seed": 5, "temperature": 0.9} if i % 2 else {} for i in range(len(LENGTHS))]

    def calls():
        pairs = enumerate(zip(LENGTHS, params, strict=True))
        return [call_of_length(i, engine, n, max_new=10, **kw) for i, (n, kw) in pairs]

    alone = {}
    for call in calls():
        alone.update(run_all(unchunked, [call]))
    chunked = engine_like(engine, BUDGET)
    together = run_all(chunked, [(2 * i, c) for i, c in enumerate(calls())])
    assert together == alone


def test_running_sequences_get_a_token_every_step_while_a_long_prompt_is_prefilled(engine):  # noqa: F811
    e = engine_like(engine, BUDGET)
    for i in range(3):
        e.add(call_of_length(i, engine, 4, max_new=30))
    e.step()
    e.add(call_of_length(9, engine, 6 * BUDGET, max_new=4))
    kinds, prefilling_steps = [], 0
    while any(s.request_id == 9 for s in (*e.waiting, *e.prefilling)):
        kind, events = e.step()
        kinds.append(kind)
        assert sorted(ev.request_id for ev in events if ev.request_id != 9) == [0, 1, 2]
        assert len(e.running) + len(e.prefilling) <= e.max_batch_size
        prefilling_steps += 1
    # 6 x 16 prompt tokens at 16 - 3 a step: 8 steps, every one a decode too.
    assert prefilling_steps == 8 and set(kinds) == {"mixed"}
    assert [s.request_id for s in e.running] == [0, 1, 2, 9]
    while e.has_work:
        e.step()


def test_abort_of_a_half_prefilled_prompt_frees_it(engine):  # noqa: F811
    e = engine_like(engine, BUDGET)
    e.add(call_of_length(1, engine, 4, max_new=20))
    e.add(call_of_length(2, engine, 3 * BUDGET, max_new=5))
    e.step()
    e.step()
    [half] = e.prefilling
    assert half.request_id == 2 and half.partial_cache is not None
    events = e.abort({2})
    assert [(ev.request_id, ev.finish_reason) for ev in events] == [(2, FinishReason.ABORTED)]
    assert e.prefilling == [] and e.batch_tokens == e.running[0].reserved_tokens
    out = run_all(e, [])
    alone = run_all(engine_like(engine, 0), [call_of_length(1, engine, 4, max_new=20)])
    assert out[1][0] == alone[1][0][2:]  # its two first tokens came in the steps before the abort
    assert not e.has_work and e.batch is None


class _OutOfMemoryOnLaterChunks:
    """Wraps the model: a prompt chunk that continues a cache (position > 0, several tokens) runs out of memory."""

    def __init__(self, model):
        self._model = model

    def __call__(self, input_ids, position_ids, **kwargs):
        if input_ids.shape[1] > 1 and int(position_ids[0, 0]) > 0:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return self._model(input_ids=input_ids, position_ids=position_ids, **kwargs)


def test_out_of_memory_in_a_chunk_fails_only_its_sequence(engine):  # noqa: F811
    alone = run_all(engine_like(engine, 0), [call_of_length(i, engine, 5, max_new=12) for i in range(2)])
    e = engine_like(engine, BUDGET)
    e.model = _OutOfMemoryOnLaterChunks(engine.model)
    out, errors = {}, []
    for i in range(2):
        e.add(call_of_length(i, engine, 5, max_new=12))
    for step in range(100):
        if step == 1:
            e.add(call_of_length(7, engine, 3 * BUDGET, max_new=4))
        if not e.has_work:
            break
        for ev in e.step()[1]:
            if ev.error_kind is not None:
                errors.append((ev.request_id, ev.error_kind))
            else:
                out[ev.request_id] = out.get(ev.request_id, []) + ev.token_ids
    assert errors == [(7, ErrorKind.RESOURCE_EXHAUSTED)]
    assert out == {i: alone[i][0] for i in range(2)}
    assert e.batch is None and e.batch_tokens == 0


@pytest.mark.parametrize("max_step_tokens", [0, BUDGET])
def test_first_event_carries_the_start_time_once(engine, max_step_tokens):  # noqa: F811
    e = engine_like(engine, max_step_tokens)
    before = time.time()
    e.add(call_of_length(1, engine, 3 * BUDGET, max_new=3))
    events = []
    while e.has_work:
        events += e.step()[1]
    assert [ev.completion_tokens for ev in events] == [1, 2, 3]
    assert before <= events[0].start_time <= time.time() and [ev.start_time for ev in events[1:]] == [None, None]


def test_grouped_query_attention_read_in_place_gives_the_same_tokens(engine, monkeypatch):  # noqa: F811
    """CPU workers set TRANSFORMERS_SDPA_FORCE_GQA (workers/worker_main.py): the tiny model has 4 query heads over 2
    key/value heads, and reading them in place must not change a token, whole or chunked, alone or batched."""
    from workers.messages import WorkerSpec
    from workers.worker_main import default_environment

    assert default_environment(WorkerSpec("m/0", "m", "/m", cuda_visible_devices=""))["TRANSFORMERS_SDPA_FORCE_GQA"]
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in default_environment(WorkerSpec("m/0", "m", "/m", "0"))
    assert engine.model.config.num_key_value_heads < engine.model.config.num_attention_heads

    def tokens(force: str, budget: int):
        monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", force)
        calls = [call_of_length(i, engine, length, max_new=12) for i, length in enumerate(LENGTHS)]
        return run_all(engine_like(engine, budget, max_batch_tokens=1000), calls)

    for budget in (0, BUDGET):
        assert tokens("1", budget) == tokens("0", budget), f"max_step_tokens {budget}"
