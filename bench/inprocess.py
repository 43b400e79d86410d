"""In-process references, no serving at all: a padded static batch through `model.generate`, and the bare `Engine`.

Owns the two measurements the served numbers are compared against, and where
the benchmark's models come from (`resolve_model`):
- `static`: the throughput upper bound. C requests (the load generator's first
  C prompts) as one left-padded batch through `model.generate`, greedy,
  min_new_tokens = max_new_tokens = N, timed `repeats` times after a warm-up.
- `engine`: the serving-overhead reference. modelpool's continuous-batching
  `Engine`, loaded as a worker loads it, fed C requests at once and stepped to
  completion, `rounds` times after a warm-up.
Both report tokens/s and run in the process that calls them; bench/run.py runs
them in a subprocess of their own (`python -m bench.inprocess static|engine ...
--json-out FILE`) so that no server is busy meanwhile and the orchestrator never
loads torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.load import prompt_messages

_LOGGER = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL_DIR = REPO_ROOT / ".cache" / "bench-tiny"
_WARM_UP_TOKENS = 4


def resolve_model(spec: str) -> Path:
    """`builtin` (SmolLM2-135M-Instruct, converted once), `tiny` (the random test model, built once) or a folder."""
    if spec == "builtin":
        from workers import builtin_model

        return builtin_model.ensure_cached()
    if spec == "tiny":
        from tests import tiny_model

        return tiny_model.build(TINY_MODEL_DIR)
    path = Path(spec)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{spec!r} is not builtin, tiny or a model folder")
    return path


def chat_token_ids(tokenizer, index: int) -> list[int]:
    """Prompt ids of load-generator request `index`, made the way modelpool's frontend makes them."""
    messages = [{"role": role, "content": content} for role, content in prompt_messages(index)]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------- static batch


def _padded_batch(tokenizer, concurrency: int):
    """The first `concurrency` prompts as one left-padded batch (input_ids, attention_mask)."""
    tokenizer.padding_side = "left"
    rows = [chat_token_ids(tokenizer, i) for i in range(concurrency)]
    return tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")


def _generate_static(model, batch, max_new_tokens: int, pad_id: int) -> tuple[int, float]:
    """One greedy `generate` of the batch; returns (generated tokens, seconds). On a GPU the clock waits for the
    device, before and after."""
    import torch

    cuda = batch["input_ids"].is_cuda
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    new_tokens = output.shape[1] - batch["input_ids"].shape[1]
    if new_tokens != max_new_tokens:
        raise RuntimeError(f"static batch generated {new_tokens} tokens per row, not {max_new_tokens}")
    return output.shape[0] * new_tokens, seconds


def static_batch(
    model_spec: str, concurrencies: Sequence[int], max_new_tokens: int, repeats: int, threads: int
) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    path = resolve_model(model_spec)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = []
    for concurrency in concurrencies:
        batch = _padded_batch(tokenizer, concurrency)
        _generate_static(model, batch, _WARM_UP_TOKENS, pad_id)
        runs = [_generate_static(model, batch, max_new_tokens, pad_id) for _ in range(repeats)]
        rates = [tokens / seconds for tokens, seconds in runs]
        results.append(
            {
                "concurrency": concurrency,
                "max_new_tokens": max_new_tokens,
                "tokens_per_run": runs[0][0],
                "seconds": [seconds for _, seconds in runs],
                "tokens_per_s_runs": rates,
                "tokens_per_s": statistics.median(rates),
            }
        )
        _LOGGER.info("static batch C=%d: %.1f tok/s (runs %s)", concurrency, results[-1]["tokens_per_s"], rates)
    return {"kind": "static", "model_path": str(path), "threads": threads, "results": results}


# ---------------------------------------------------------------- engine


def _step_limit(concurrency: int, max_new_tokens: int) -> int:
    """Far more steps than C requests of N tokens need (one prefill and N decodes each, even one at a time)."""
    return 2 * concurrency * (max_new_tokens + 2) + 100


def add_requests(engine, prompts: Sequence[Sequence[int]], max_new_tokens: int, first_id: int) -> None:
    """Each prompt (token ids) as a request, ids from `first_id`, asking for exactly `max_new_tokens` greedy tokens
    (ignore_eos), added to the engine at once. RuntimeError if the engine refuses one."""
    from workers.messages import GenerateCall, SamplingParams, StoppingParams

    stopping = StoppingParams(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        call = GenerateCall(
            request_id=first_id + i,
            prompt_token_ids=tuple(prompt),
            sampling=SamplingParams(),
            stopping=stopping,
            arrival_time=time.time(),
        )
        error = engine.add(call)
        if error is not None:
            raise RuntimeError(f"engine refused request {i}: {error.error}")


def add_chat_requests(engine, concurrency: int, max_new_tokens: int, first_id: int) -> None:
    """The load generator's first `concurrency` chat prompts as `add_requests`."""
    prompts = [chat_token_ids(engine.tokenizer, i) for i in range(concurrency)]
    add_requests(engine, prompts, max_new_tokens, first_id)


def engine_round(
    engine, concurrency: int, max_new_tokens: int, first_id: int, decode_steps: list[float] | None = None
) -> tuple[list[list[int]], float]:
    """Add `concurrency` chat requests at once and step until all are done; returns (each request's tokens,
    seconds); `decode_steps`, when given, gets the seconds of every decode step. RuntimeError on a failed request,
    a wrong length, or far more steps than the work needs."""
    from workers.messages import FinishReason

    started = time.perf_counter()
    add_chat_requests(engine, concurrency, max_new_tokens, first_id)
    tokens: dict[int, list[int]] = {first_id + i: [] for i in range(concurrency)}
    steps, max_steps = 0, _step_limit(concurrency, max_new_tokens)
    while engine.has_work:
        steps += 1
        if steps > max_steps:
            raise RuntimeError(f"engine still busy after {max_steps} steps ({concurrency} x {max_new_tokens} tokens)")
        step_started = time.perf_counter()
        kind, events = engine.step()
        if decode_steps is not None and kind == "decode":
            decode_steps.append(time.perf_counter() - step_started)
        for event in events:
            if event.finish_reason is FinishReason.ERROR:
                raise RuntimeError(f"engine failed request {event.request_id}: {event.error}")
            tokens[event.request_id].extend(event.token_ids)
    seconds = time.perf_counter() - started
    rows = [tokens[first_id + i] for i in range(concurrency)]
    generated = sum(len(row) for row in rows)
    if any(len(row) != max_new_tokens for row in rows):
        raise RuntimeError(f"engine generated {generated} tokens, not {concurrency} x {max_new_tokens}")
    return rows, seconds


def load_worker_engine(model_spec: str, threads: int, max_batch_size: int, dtype: str = "auto", **spec):
    """The Engine as a worker loads it, in a worker's environment (on the CPU); `spec`: more WorkerSpec fields
    (max_batch_tokens, max_step_tokens, ...)."""
    import torch

    from workers.messages import WorkerSpec
    from workers.worker_main import apply_default_environment, load_engine

    torch.set_num_threads(threads)
    worker_spec = WorkerSpec(
        worker_key="bench/0",
        model_name="bench",
        model_path=str(resolve_model(model_spec)),
        cuda_visible_devices="",
        threads=threads,
        max_batch_size=max_batch_size,
        dtype=dtype,
        **spec,
    )
    apply_default_environment(worker_spec)  # its thread count is set above, in this process already running
    engine, _ = load_engine(worker_spec)
    return engine


def engine_throughput(
    model_spec: str, concurrency: int, max_new_tokens: int, rounds: int, max_batch_size: int, threads: int
) -> dict:
    path = resolve_model(model_spec)
    engine = load_worker_engine(str(path), threads, max_batch_size)
    engine_round(engine, concurrency, _WARM_UP_TOKENS, first_id=1)
    runs = [engine_round(engine, concurrency, max_new_tokens, first_id=(r + 1) * 10_000) for r in range(rounds)]
    tokens = concurrency * max_new_tokens * rounds
    seconds = sum(s for _, s in runs)
    result = {
        "kind": "engine",
        "model_path": str(path),
        "threads": threads,
        "concurrency": concurrency,
        "max_new_tokens": max_new_tokens,
        "rounds": rounds,
        "tokens": tokens,
        "seconds": [s for _, s in runs],
        "tokens_per_s": tokens / seconds,
    }
    _LOGGER.info("engine C=%d: %.1f tok/s over %d rounds", concurrency, result["tokens_per_s"], rounds)
    return result


# ---------------------------------------------------------------- CLI


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="In-process references: static batch and bare engine.")
    sub = parser.add_subparsers(dest="kind", required=True)
    static = sub.add_parser("static", help="padded static batch through model.generate")
    static.add_argument("--concurrency", type=_int_list, default=[1, 8, 32], help="batch sizes, e.g. 1,8,32")
    static.add_argument("--repeats", type=int, default=2)
    engine = sub.add_parser("engine", help="modelpool's Engine, C requests at once")
    engine.add_argument("--concurrency", type=int, default=64)
    engine.add_argument("--rounds", type=int, default=2)
    engine.add_argument("--max-batch-size", type=int, default=64)
    for p in (static, engine):
        p.add_argument("--model", default="builtin", help="builtin, tiny or a local folder")
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
        p.add_argument("--json-out", help="write the result here (default: stdout)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.kind == "static":
        result = static_batch(args.model, args.concurrency, args.max_new_tokens, args.repeats, args.threads)
    else:
        result = engine_throughput(
            args.model, args.concurrency, args.max_new_tokens, args.rounds, args.max_batch_size, args.threads
        )
    text = json.dumps(result, indent=2)
    if args.json_out:
        Path(args.json_out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
