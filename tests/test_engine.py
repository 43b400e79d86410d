"""The continuous-batching engine in-process on the tiny model: batching must not change results or leak slots."""

from __future__ import annotations

import random
import time

import pytest

from workers.messages import FinishReason, GenerateCall, SamplingParams, StoppingParams, WorkerSpec
from workers.worker_main import load_engine


@pytest.fixture(scope="module")
def engine(tiny_dir):
    import torch

    torch.set_num_threads(1)
    spec = WorkerSpec(worker_key="t/0", model_name="t", model_path=str(tiny_dir), cuda_visible_devices="",
                      max_batch_size=4, max_batch_tokens=400, max_overtakes=7)
    engine, _ = load_engine(spec)
    return engine


def test_the_worker_spec_sets_the_engine_budgets(engine):
    assert (engine.max_batch_size, engine.max_batch_tokens, engine.scheduler.budgets.max_overtakes) == (4, 400, 7)


def make_call(request_id, engine, prompt, max_new=12, **sampling):
    ids = tuple(engine.tokenizer(prompt)["input_ids"])
    return GenerateCall(
        request_id=request_id,
        prompt_token_ids=ids,
        sampling=SamplingParams(**sampling),
        stopping=StoppingParams(max_new_tokens=max_new, ignore_eos=True),
        arrival_time=time.time(),
    )


def run_all(engine, calls, on_step=None):
    """Add calls (a list, or (step, call) pairs to add later) and step until idle; returns id -> (tokens, text)."""
    pending = sorted(calls, key=lambda c: c[0]) if calls and isinstance(calls[0], tuple) else [(0, c) for c in calls]
    out, step = {}, 0
    while pending or engine.has_work:
        while pending and pending[0][0] <= step:
            assert engine.add(pending.pop(0)[1]) is None
        _, events = engine.step()
        for event in events:
            tokens, text = out.get(event.request_id, ([], ""))
            out[event.request_id] = (tokens + event.token_ids, text + event.text)
        if on_step:
            on_step(engine)
        step += 1
    return out


PROMPTS = ["a", "The weather today is", "Once upon a time in a land far away, there lived", "1 2 3", "Hello!"]


def test_batched_results_equal_results_alone(engine):
    params = [
        {"max_new": 5 + 7 * i, **({"do_sample": True, "seed": i, "temperature": 0.8, "top_p": 0.9} if i % 2 else {})}
        for i in range(len(PROMPTS))
    ]
    calls = [make_call(i, engine, p, **kw) for i, (p, kw) in enumerate(zip(PROMPTS, params))]
    alone = {}
    for call in calls:
        alone.update(run_all(engine, [call]))
    # Staggered arrivals, so sequences join a batch that is already decoding and leave at different steps.
    together = run_all(engine, [(3 * i, make_call(i, engine, p, **kw)) for i, (p, kw) in enumerate(zip(PROMPTS, params))])
    assert together == alone
    assert [len(alone[i][0]) for i in range(len(PROMPTS))] == [kw["max_new"] for kw in params]


def test_batch_never_exceeds_its_limits(engine):
    seen = []

    def check(e):
        seen.append(len(e.running))
        assert len(e.running) <= e.max_batch_size
        assert e.batch_tokens <= e.max_batch_tokens
        if e.batch is not None:
            assert e.batch.size == len(e.running)

    calls = [make_call(i, engine, PROMPTS[i % 5], max_new=random.Random(i).randint(3, 60)) for i in range(12)]
    out = run_all(engine, calls, check)
    assert len(out) == 12 and max(seen) == engine.max_batch_size


def test_request_that_can_never_fit_is_refused(engine):
    event = engine.add(make_call(99, engine, "x y", max_new=400))
    assert event is not None and event.finish_reason is FinishReason.ERROR and "max_new_tokens" in event.error
    assert not engine.has_work


def test_abort_leaves_the_others_intact(engine):
    calls = [make_call(i, engine, PROMPTS[i], max_new=20) for i in range(4)]
    alone = run_all(engine, [make_call(i, engine, PROMPTS[i], max_new=20) for i in range(4)])
    for call in calls:
        engine.add(call)
    out = {}
    for step in range(30):
        if step == 5:
            events = engine.abort({1, 2})
            assert sorted(e.request_id for e in events) == [1, 2]
            assert all(e.finish_reason is FinishReason.ABORTED for e in events)
        if not engine.has_work:
            break
        for event in engine.step()[1]:
            tokens = out.get(event.request_id, [])
            out[event.request_id] = tokens + event.token_ids
    assert out[0] == alone[0][0] and out[3] == alone[3][0]
    assert not engine.has_work and engine.batch is None


def test_burst_with_aborts_leaves_no_sequence(engine):
    rng = random.Random(7)
    for i in range(20):
        engine.add(make_call(100 + i, engine, PROMPTS[i % 5], max_new=rng.randint(5, 40)))
    for step in range(400):
        if not engine.has_work:
            break
        if step % 3 == 0:
            engine.abort({100 + rng.randrange(20)})
        engine.step()
    assert not engine.has_work
    assert engine.running == [] and len(engine.waiting) == 0 and engine.batch is None


class _OutOfMemoryOnLongPrompts:
    """Wraps the model: a prefill longer than `limit` tokens runs out of (simulated) device memory."""

    def __init__(self, model, limit):
        self._model, self._limit = model, limit

    def __call__(self, input_ids, **kwargs):
        import torch

        if input_ids.shape[1] > self._limit:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return self._model(input_ids=input_ids, **kwargs)


def test_out_of_memory_fails_only_the_request_that_caused_it(engine):
    from workers.messages import ErrorKind

    alone = run_all(engine, [make_call(i, engine, PROMPTS[i], max_new=15) for i in range(2)])
    real_model = engine.model
    engine.model = _OutOfMemoryOnLongPrompts(real_model, limit=40)
    try:
        calls = [(0, make_call(0, engine, PROMPTS[0], max_new=15)), (0, make_call(1, engine, PROMPTS[1], max_new=15))]
        huge = make_call(2, engine, "many words " * 30, max_new=5)
        errors = []
        out = {}
        for step in range(100):
            if step == 3:
                engine.add(huge)
            while calls and calls[0][0] <= step:
                engine.add(calls.pop(0)[1])
            if not engine.has_work and not calls and step > 3:
                break
            for event in engine.step()[1]:
                if event.error_kind is not None:
                    errors.append(event)
                else:
                    out[event.request_id] = out.get(event.request_id, []) + event.token_ids
    finally:
        engine.model = real_model
    assert [(e.request_id, e.error_kind) for e in errors] == [(2, ErrorKind.RESOURCE_EXHAUSTED)]
    assert out == {0: alone[0][0], 1: alone[1][0]}


def test_out_of_memory_in_a_decode_fails_the_batch_and_the_worker_goes_on(engine):
    from workers.messages import ErrorKind

    class OutOfMemoryOnce:
        def __init__(self, model):
            self.model, self.armed = model, True

        def __call__(self, input_ids, **kwargs):
            import torch

            if self.armed and input_ids.shape[1] == 1:  # the first decode step
                self.armed = False
                raise torch.OutOfMemoryError("simulated: CUDA out of memory")
            return self.model(input_ids=input_ids, **kwargs)

    real_model = engine.model
    engine.model = OutOfMemoryOnce(real_model)
    try:
        for i in range(3):
            engine.add(make_call(300 + i, engine, PROMPTS[i], max_new=10))
        errors = []
        while engine.has_work:
            errors += [e for e in engine.step()[1] if e.error_kind is not None]
        assert sorted(e.request_id for e in errors) == [300, 301, 302]
        assert {e.error_kind for e in errors} == {ErrorKind.RESOURCE_EXHAUSTED}
        assert engine.batch is None and engine.running == []
        after = run_all(engine, [make_call(310, engine, PROMPTS[0], max_new=10)])
        assert len(after[310][0]) == 10
    finally:
        engine.model = real_model


def _reference(engine, prompt: str, max_new: int) -> list[int]:
    """transformers' own greedy generate, one prompt alone, end of sequence suppressed like ignore_eos."""
    import torch

    ids = torch.tensor([engine.tokenizer(prompt)["input_ids"]])
    out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                                min_new_tokens=max_new, pad_token_id=engine.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_tokens_equal_transformers_generate_alone_and_batched(engine):
    """The engine's cache, positions and padding against a reference: a wrong position or a stale cache row changes
    the tokens of a fast test, not only of the slow built-in ones."""
    lengths = [30, 7, 22, 15, 40]
    reference = {i: _reference(engine, p, n) for i, (p, n) in enumerate(zip(PROMPTS, lengths, strict=True))}
    alone = {}
    for i, (p, n) in enumerate(zip(PROMPTS, lengths, strict=True)):
        alone.update(run_all(engine, [make_call(i, engine, p, max_new=n)]))
    staggered = run_all(engine, [(2 * i, make_call(i, engine, p, max_new=n))
                                 for i, (p, n) in enumerate(zip(PROMPTS, lengths, strict=True))])
    assert {i: tokens for i, (tokens, _) in alone.items()} == reference
    assert {i: tokens for i, (tokens, _) in staggered.items()} == reference
