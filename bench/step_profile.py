"""Where one engine step's time goes: the step profile of issue 11.

Owns one measurement, in-process (no server, so nothing else competes for the
cores): modelpool's `Engine`, loaded as a worker loads it, is fed C requests of
N tokens (greedy, ignore_eos) and stepped to completion, with timers around
each part of a step:

- forward (decode): the model's forward pass of a decode step;
- forward (prefill): the forward passes of prompts and prompt chunks;
- cache: what the batch does around them (the attention mask and next-token
  tensors of a decode, filtering finished rows, concatenating newcomers);
- sampling: choosing the next tokens (`sample_next_tokens`);
- detokenize: the incremental detokenizer of every row;
- schedule: the scheduler's plan;
- engine other: the rest of `Engine.step` (events, bookkeeping);
- message: what the worker pays per step to send its events (pickling the
  `StepOutput`) and what the frontend pays per step to read them back and turn
  each event into a serialized stream message (unpickling, `convert` and
  `SerializeToString`), measured here on the very events of each step.

Printed as a Markdown table, milliseconds per step and share of the step, for
each C; the decode-only rows (steps that prefilled nothing) give the ITL a
stream sees at that C with no serving around it.

    python -m bench.step_profile                              # builtin, C = 1 and 32, N = 64
    python -m bench.step_profile --model tiny --concurrency 1,64 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import pickle
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

from bench.inprocess import add_chat_requests, load_worker_engine

_LOGGER = logging.getLogger(__name__)

PHASES = (
    "forward (decode)",
    "forward (prefill)",
    "cache",
    "sampling",
    "detokenize",
    "schedule",
    "engine other",
    "message (worker)",
    "message (frontend)",
)


class Clock:
    """Seconds spent per phase; a phase entered inside another is taken out of the outer one."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        frame = [name, time.perf_counter(), 0.0]  # name, start, time of nested phases
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            spent = time.perf_counter() - frame[1]
            self.seconds[name] += spent - frame[2]
            if self._stack:
                self._stack[-1][2] += spent

    def wrap(self, name: str | Callable[..., str], fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            with self.phase(name(*args, **kwargs) if callable(name) else name):
                return fn(*args, **kwargs)

        return timed


class TimedModel:
    """The model, with its forward passes timed as decode (one new token per row) or prefill."""

    def __init__(self, model, clock: Clock) -> None:
        self._model = model
        self._clock = clock

    def __call__(self, *args, **kwargs):
        decode = kwargs["input_ids"].shape[1] == 1
        with self._clock.phase("forward (decode)" if decode else "forward (prefill)"):
            return self._model(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def instrument(engine, clock: Clock) -> list[Callable[[], None]]:
    """Put timers around the parts of a step; returns the undo callables."""
    import workers.engine as engine_module
    from workers.batch import KVBatch
    from workers.detokenizer import IncrementalDetokenizer

    undo: list[Callable[[], None]] = []

    def patch(owner, attribute: str, name: str, static: bool = False) -> None:
        original = owner.__dict__[attribute] if isinstance(owner, type) else getattr(owner, attribute)
        fn = original.__func__ if isinstance(original, staticmethod | classmethod) else original
        timed = clock.wrap(name, fn)
        if isinstance(original, staticmethod):
            timed = staticmethod(timed)
        elif isinstance(original, classmethod):
            timed = classmethod(timed)
        setattr(owner, attribute, timed)
        undo.append(lambda: setattr(owner, attribute, original))

    patch(KVBatch, "decode", "cache")  # its forward is taken out by TimedModel
    patch(KVBatch, "filter", "cache")
    patch(KVBatch, "concatenate", "cache")
    patch(KVBatch, "set_next_tokens", "cache")
    patch(KVBatch, "prefill", "cache")
    patch(KVBatch, "prefill_chunk", "cache")
    patch(engine_module, "sample_next_tokens", "sampling")
    patch(IncrementalDetokenizer, "add_token", "detokenize")
    patch(IncrementalDetokenizer, "flush", "detokenize")
    patch(engine.scheduler, "schedule", "schedule")
    model = engine.model
    engine.model = TimedModel(model, clock)
    undo.append(lambda: setattr(engine, "model", model))
    return undo


def frontend_cost(events, clock: Clock) -> None:
    """What a step's events cost to send (worker) and to turn into stream messages (frontend)."""
    from service.convert import stream_response
    from service.dispatcher import Timings
    from workers.messages import StepOutput

    with clock.phase("message (worker)"):
        payload = pickle.dumps(StepOutput(worker_key="bench/0", events=events), protocol=pickle.HIGHEST_PROTOCOL)
    with clock.phase("message (frontend)"):
        output = pickle.loads(payload)
        timings = Timings(arrival=time.time())
        for event in output.events:
            stream_response([event], timings).SerializeToString()


def profile(engine, concurrency: int, max_new_tokens: int, first_id: int) -> dict:
    """One round of C requests, stepped to completion with the timers on; per-step figures."""
    from workers.messages import FinishReason

    add_chat_requests(engine, concurrency, max_new_tokens, first_id)
    totals: dict[str, float] = defaultdict(float)
    decode_steps: list[float] = []
    steps = tokens = 0
    limit = 4 * concurrency * (max_new_tokens + 2) + 100
    while engine.has_work:
        steps += 1
        if steps > limit:
            raise RuntimeError(f"engine still busy after {limit} steps")
        clock = Clock()
        undo = instrument(engine, clock)
        try:
            started = time.perf_counter()
            with clock.phase("engine other"):
                kind, events = engine.step()
            step_seconds = time.perf_counter() - started
            frontend_cost(events, clock)
        finally:
            for fn in reversed(undo):
                fn()
        for event in events:
            if event.finish_reason is FinishReason.ERROR:
                raise RuntimeError(f"engine failed request {event.request_id}: {event.error}")
            tokens += len(event.token_ids)
        for name, seconds in clock.seconds.items():
            totals[name] += seconds
        if kind == "decode":
            decode_steps.append(step_seconds + clock.seconds["message (worker)"] + clock.seconds["message (frontend)"])
    if tokens != concurrency * max_new_tokens:
        raise RuntimeError(f"engine generated {tokens} tokens, not {concurrency} x {max_new_tokens}")
    return {
        "concurrency": concurrency,
        "steps": steps,
        "tokens": tokens,
        "ms_per_step": {name: 1000 * totals[name] / steps for name in PHASES},
        "decode_step_ms_p50": 1000 * statistics.median(decode_steps) if decode_steps else 0.0,
    }


def render(results: list[dict]) -> str:
    levels = [r["concurrency"] for r in results]
    header = ["phase"] + [f"C={c} ms/step" for c in levels] + [f"C={c} %" for c in levels]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "--:|" * (len(header) - 1)]
    for name in PHASES:
        cells = [f"{r['ms_per_step'][name]:.2f}" for r in results]
        shares = [f"{100 * r['ms_per_step'][name] / sum(r['ms_per_step'].values()):.0f}%" for r in results]
        lines.append(f"| {name} | " + " | ".join(cells + shares) + " |")
    totals = [f"{sum(r['ms_per_step'].values()):.2f}" for r in results]
    lines.append("| **step** | " + " | ".join(totals + ["100%"] * len(results)) + " |")
    p50 = [f"{r['decode_step_ms_p50']:.2f}" for r in results]
    lines.append("| decode step p50 (ITL, no serving) | " + " | ".join(p50 + [""] * len(results)) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin", help="builtin, tiny or a local folder")
    parser.add_argument("--concurrency", default="1,32", help="batch sizes, e.g. 1,32")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    engine = load_worker_engine(args.model, args.threads, max(levels), args.dtype)
    profile(engine, max(levels), 4, first_id=1)  # warm-up
    results = [profile(engine, c, args.max_new_tokens, first_id=(i + 1) * 10_000) for i, c in enumerate(levels)]
    print(f"Step profile: {args.model}, {args.dtype}, N = {args.max_new_tokens}, {args.threads} threads\n")
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
