"""Edge cases of workers/ or service/ engine code that the mutation run (tests/MUTATION.md) showed no other test
caught; each kills surviving mutants named there."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from tests.test_engine import PROMPTS, engine, make_call, run_all  # noqa: F401  (fixture)
from workers.batch import _cache_layers
from workers.engine import Engine
from workers.messages import ErrorKind, FinishReason, GenerateCall, SamplingParams, StoppingParams


def test_cache_layers_skips_layers_without_tensors():
    full = SimpleNamespace(keys=torch.zeros(1, 1, 1, 1))
    cache = SimpleNamespace(
        layers=[SimpleNamespace(), SimpleNamespace(keys=None), SimpleNamespace(keys=torch.zeros(0)), full]
    )
    assert _cache_layers(cache) == [full]


@pytest.mark.parametrize("pad, eos, expected", [(7, [5, 3], 7), (0, [5, 3], 0), (None, [5, 3], 3), (None, [], 0)])
def test_pad_token_falls_back_to_the_smallest_eos_then_zero(pad, eos, expected):
    e = Engine(
        None,
        SimpleNamespace(pad_token_id=pad),
        device=torch.device("cpu"),
        eos_token_ids=eos,
        max_batch_size=1,
        max_batch_tokens=10,
    )
    assert e.pad_token_id == expected


class _EosFirst:
    """Wraps the model: end-of-sequence is always the most likely next token."""

    def __init__(self, model, eos):
        self._model, self._eos = model, eos

    def __call__(self, **kwargs):
        out = self._model(**kwargs)
        out.logits[..., self._eos] = 1e4
        return out


def _call(engine, request_id, ignore_eos=False, min_new=0, max_new=6):  # noqa: F811
    ids = tuple(engine.tokenizer("a")["input_ids"])
    return GenerateCall(
        request_id=request_id,
        prompt_token_ids=ids,
        sampling=SamplingParams(),
        stopping=StoppingParams(max_new_tokens=max_new, min_new_tokens=min_new, ignore_eos=ignore_eos),
        arrival_time=time.time(),
    )


def test_end_of_sequence_unless_ignored_or_before_min_new_tokens(engine):  # noqa: F811
    [eos] = engine.eos_token_ids
    real_model = engine.model
    engine.model = _EosFirst(real_model, eos)
    try:
        finals = {}
        for call in (_call(engine, 500), _call(engine, 501, min_new=3), _call(engine, 502, ignore_eos=True)):
            assert engine.add(call) is None
        while engine.has_work:
            for event in engine.step()[1]:
                if event.finished:
                    finals[event.request_id] = (
                        event.finish_reason,
                        event.completion_tokens,
                        event.token_ids[-1] == eos,
                    )
    finally:
        engine.model = real_model
    assert finals == {
        500: (FinishReason.END_OF_SEQUENCE, 1, True),
        501: (FinishReason.END_OF_SEQUENCE, 4, True),
        502: (FinishReason.LENGTH, 6, False),
    }


def test_abort_of_waiting_and_running_requests_reports_their_usage(engine):  # noqa: F811
    calls = [make_call(600 + i, engine, PROMPTS[i % 5], max_new=20) for i in range(6)]  # max_batch_size is 4
    for call in calls:
        engine.add(call)
    engine.step()  # prefill: 600..603 run, 604 and 605 wait
    engine.step()  # decode: every running one has 2 tokens
    events = engine.abort({601, 604})
    assert [(e.request_id, e.finish_reason, e.prompt_tokens, e.completion_tokens) for e in events] == [
        (604, FinishReason.ABORTED, len(calls[4].prompt_token_ids), 0),
        (601, FinishReason.ABORTED, len(calls[1].prompt_token_ids), 2),
    ]
    assert [s.request_id for s in engine.waiting] == [605]
    seen = set()
    while engine.has_work:
        seen |= {e.request_id for e in engine.step()[1]}
    assert seen == {600, 602, 603, 605}


def test_request_that_can_never_fit_reports_its_usage(engine):  # noqa: F811
    call = make_call(99, engine, "x y", max_new=400)
    event = engine.add(call)
    assert (event.prompt_tokens, event.completion_tokens) == (len(call.prompt_token_ids), 0)
    assert event.error_kind is ErrorKind.INVALID_ARGUMENT
    assert event.error == (
        f"prompt tokens + max_new_tokens = {len(call.prompt_token_ids) + 400} exceeds the "
        f"worker's batch limit of 400 tokens"
    )


def test_out_of_memory_while_filtering_after_an_abort_fails_the_rest(engine):  # noqa: F811
    for i in range(3):
        engine.add(make_call(700 + i, engine, PROMPTS[i], max_new=10))
    engine.step()

    def out_of_memory(keep):
        raise torch.OutOfMemoryError("simulated: CUDA out of memory")

    engine.batch.filter = out_of_memory
    events = engine.abort({701})
    assert [(e.request_id, e.finish_reason, e.error_kind, e.error) for e in events] == [
        (701, FinishReason.ABORTED, None, ""),
        (700, FinishReason.ERROR, ErrorKind.RESOURCE_EXHAUSTED, "out of memory on the device"),
        (702, FinishReason.ERROR, ErrorKind.RESOURCE_EXHAUSTED, "out of memory on the device"),
    ]
    assert engine.running == [] and engine.batch is None and not engine.has_work


def test_abort_all_fails_running_and_waiting_requests(engine):  # noqa: F811
    calls = [make_call(800 + i, engine, PROMPTS[i % 5], max_new=20) for i in range(6)]  # max_batch_size is 4
    for call in calls:
        engine.add(call)
    engine.step()  # prefill: 800..803 run with one token each, 804 and 805 wait
    events = engine.abort_all(ErrorKind.INTERNAL, "the worker failed")
    assert [
        (e.request_id, e.finish_reason, e.error_kind, e.error, e.prompt_tokens, e.completion_tokens) for e in events
    ] == [
        (800 + i, FinishReason.ERROR, ErrorKind.INTERNAL, "the worker failed", len(c.prompt_token_ids), int(i < 4))
        for i, c in enumerate(calls)
    ]
    assert not engine.has_work and engine.running == [] and engine.batch is None and len(engine.waiting) == 0


def test_kv_batch_filter_keeps_rows_in_order_and_drops_padding_no_row_needs(engine):  # noqa: F811
    from workers.batch import KVBatch

    short, long = [1, 2], [3, 4, 5, 6, 7]
    batch, _ = KVBatch.prefill(engine.model, [short, long], torch.device("cpu"), engine.pad_token_id)
    batch.set_next_tokens([11, 12])
    assert batch.attention_mask.tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
    keys = [layer.keys.clone() for layer in _cache_layers(batch.cache)]
    assert batch.filter([0, 1]) is batch and batch.cache_length == 5  # unchanged
    batch.filter([1, 0])  # the same rows, swapped
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert batch.next_tokens.tolist() == [12, 11] and batch.next_positions.tolist() == [5, 2]
    for before, layer in zip(keys, _cache_layers(batch.cache), strict=True):
        assert torch.equal(layer.keys, before[[1, 0]])
    batch.filter([1])  # only the short row: its 3 padding columns go
    assert batch.size == 1 and batch.cache_length == 2 and batch.attention_mask.tolist() == [[1, 1]]
    assert batch.next_tokens.tolist() == [11] and batch.next_positions.tolist() == [2]
    for before, layer in zip(keys, _cache_layers(batch.cache), strict=True):
        assert torch.equal(layer.keys, before[[0], :, 3:, :])


def _plain_call(request_id, prompt_len, max_new, **sampling_and_stopping):
    stopping = {k: v for k, v in sampling_and_stopping.items() if k in ("min_new_tokens", "ignore_eos")}
    sampling = {k: v for k, v in sampling_and_stopping.items() if k not in stopping}
    return GenerateCall(
        request_id=request_id,
        prompt_token_ids=tuple(range(10, 10 + prompt_len)),
        sampling=SamplingParams(**sampling),
        stopping=StoppingParams(max_new_tokens=max_new, **stopping),
        arrival_time=0.0,
    )


def _modelless_engine(max_batch_size=8, max_batch_tokens=400):
    return Engine(
        None,
        SimpleNamespace(pad_token_id=0),
        device=torch.device("cpu"),
        eos_token_ids=[2],
        max_batch_size=max_batch_size,
        max_batch_tokens=max_batch_tokens,
    )


def test_admission_fills_the_token_budget_exactly_in_arrival_order():
    # The policy lives in workers/scheduler.py now; the engine's scheduler sees what `add` queued.
    e = _modelless_engine()
    for rid, reserved in enumerate([200, 150, 50, 10]):
        assert e.add(_plain_call(rid, reserved - 10, 10)) is None
    assert e.scheduler.schedule().admitted == [0, 1, 2]  # exactly 400 tokens
    assert e.scheduler.schedule().admitted == [] and [s.request_id for s in e.waiting] == [3]
    e = _modelless_engine()
    for rid, reserved in enumerate([300, 150, 50]):
        e.add(_plain_call(rid, reserved - 10, 10))
    assert e.scheduler.schedule().admitted == [0]  # 150 does not fit, and 50 must not overtake it
    assert [s.request_id for s in e.waiting] == [1, 2]
    e = _modelless_engine(max_batch_size=2)
    for rid in range(3):
        e.add(_plain_call(rid, 5, 5))
    assert e.scheduler.schedule().admitted == [0, 1]


def test_row_sampling_of_a_sequence():
    e = _modelless_engine()
    e.add(_plain_call(1, 3, 10, repetition_penalty=1.3, min_new_tokens=2))
    e.add(_plain_call(2, 3, 10, ignore_eos=True))
    penalized, plain = e.waiting
    penalized.generated, plain.generated = [7], [7, 8, 9]
    r = penalized.row_sampling()
    assert r.params is penalized.call.sampling and r.generator is None
    assert tuple(r.seen_token_ids) == (10, 11, 12, 7) and r.suppress_eos is True  # 1 token < min_new_tokens 2
    penalized.generated = [7, 8]
    assert penalized.row_sampling().suppress_eos is False
    r = plain.row_sampling()
    assert tuple(r.seen_token_ids) == () and r.suppress_eos is True  # no penalty: nothing to track; ignore_eos
    plain.call = _plain_call(2, 3, 10, repetition_penalty=2.0)
    assert tuple(plain.row_sampling().seen_token_ids) == (10, 11, 12, 7, 8, 9)
    assert plain.row_sampling().suppress_eos is False


def test_out_of_memory_prefilling_newcomers_together_retries_them_one_by_one(engine):  # noqa: F811
    from tests.test_engine import _OutOfMemoryOnLongPrompts

    alone = run_all(engine, [make_call(950, engine, PROMPTS[0], max_new=6)])
    real_model = engine.model
    engine.model = _OutOfMemoryOnLongPrompts(real_model, limit=40)
    try:
        engine.add(make_call(950, engine, PROMPTS[0], max_new=6))
        engine.add(make_call(951, engine, "many words " * 30, max_new=5))  # padded together: both too long
        out, errors = {}, []
        while engine.has_work:
            for event in engine.step()[1]:
                if event.error_kind is not None:
                    errors.append((event.request_id, event.error_kind, event.error))
                else:
                    out[event.request_id] = out.get(event.request_id, []) + event.token_ids
    finally:
        engine.model = real_model
    assert errors == [(951, ErrorKind.RESOURCE_EXHAUSTED, "out of memory on the device")]
    assert out == {950: alone[950][0]}


def test_out_of_memory_joining_the_running_batch_fails_it_all(engine):  # noqa: F811
    from workers.batch import KVBatch

    engine.add(make_call(960, engine, PROMPTS[0], max_new=10))
    engine.step()  # 960 runs
    engine.step()  # decode
    engine.add(make_call(961, engine, PROMPTS[1], max_new=10))

    def out_of_memory(batches):
        raise torch.OutOfMemoryError("simulated: CUDA out of memory")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(KVBatch, "concatenate", staticmethod(out_of_memory))
        kind, events = engine.step()
    # A step decodes the running batch first (960 gets its token), then the newcomer's join fails them both.
    assert kind == "mixed"
    assert [(e.request_id, len(e.token_ids), e.error_kind) for e in events] == [
        (960, 1, None),
        (961, 0, ErrorKind.RESOURCE_EXHAUSTED),
        (960, 0, ErrorKind.RESOURCE_EXHAUSTED),
    ]
    assert engine.running == [] and engine.batch is None and not engine.has_work and engine._joining == []


def test_events_carry_text_usage_and_the_start_time_once(engine):  # noqa: F811
    call = make_call(970, engine, PROMPTS[2], max_new=6)
    before = time.time()
    engine.add(call)
    events = []
    while engine.has_work:
        events += engine.step()[1]
    assert [e.request_id for e in events] == [970] * 6
    assert [e.finish_reason for e in events] == [FinishReason.UNSPECIFIED] * 5 + [FinishReason.LENGTH]
    assert [(e.prompt_tokens, e.completion_tokens) for e in events] == [
        (len(call.prompt_token_ids), n) for n in range(1, 7)
    ]
    assert before <= events[0].start_time <= time.time() and [e.start_time for e in events[1:]] == [None] * 5
    tokens = [t for e in events for t in e.token_ids]
    assert "".join(e.text for e in events) == engine.tokenizer.decode(tokens, skip_special_tokens=True)


def test_stop_sequence_ends_the_request_and_is_cut(engine):  # noqa: F811
    free = run_all(engine, [make_call(980, engine, PROMPTS[2], max_new=12)])[980][1]
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    assert stop.strip()
    engine.add(
        GenerateCall(
            request_id=981,
            prompt_token_ids=tuple(engine.tokenizer(PROMPTS[2])["input_ids"]),
            sampling=SamplingParams(),
            arrival_time=time.time(),
            stopping=StoppingParams(max_new_tokens=12, ignore_eos=True, stop_sequences=(stop,)),
        )
    )
    events = []
    while engine.has_work:
        events += engine.step()[1]
    assert events[-1].finish_reason is FinishReason.STOP_SEQUENCE
    assert "".join(e.text for e in events) == free[: free.find(stop)]


def test_request_exactly_at_the_batch_token_limit_is_accepted():
    e = _modelless_engine(max_batch_tokens=400)
    assert e.add(_plain_call(1, 390, 10)) is None
    assert e.add(_plain_call(2, 391, 10)).error_kind is ErrorKind.INVALID_ARGUMENT
