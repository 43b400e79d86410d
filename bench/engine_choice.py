"""Why the workers manage the KV cache themselves: our engine vs transformers' continuous batching, in-process.

Issue 3 allowed either transformers' own continuous batching (`generate_batch`,
backed by `ContinuousBatchingManager`) or a TGI-style padded batch that is
filtered and concatenated between steps. This script measures both on the same
model and prompts (and `model.generate` as one padded static batch) so the choice
can be checked again on other hardware:

    python -m bench.engine_choice --concurrency 32 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import logging
import time

_LOGGER = logging.getLogger(__name__)

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity to a child.",
    "List three uses of a paperclip.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "What is a prime number?",
    "Describe a cat in two sentences.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch
    from transformers import GenerationConfig

    from workers import builtin_model
    from workers.messages import GenerateCall, SamplingParams, StoppingParams, WorkerSpec
    from workers.worker_main import load_engine

    torch.set_num_threads(args.threads)
    path = builtin_model.ensure_cached()
    engine, _ = load_engine(WorkerSpec("b/0", "b", str(path), "", max_batch_size=args.concurrency))
    model, tokenizer = engine.model, engine.tokenizer
    n, c = args.max_new_tokens, args.concurrency
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], add_generation_prompt=True, tokenize=True,
            return_dict=False,
        )
        for i in range(c)
    ]
    results = {}

    started = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add(GenerateCall(i, tuple(ids), SamplingParams(), StoppingParams(max_new_tokens=n, min_new_tokens=n),
                                time.time()))
    tokens, steps = 0, 0
    while engine.has_work:
        steps += 1
        if steps > 2 * c * (n + 2) + 100:  # far more than C requests of N tokens need: a stuck engine
            raise RuntimeError(f"engine still busy after {steps - 1} steps")
        tokens += sum(len(e.token_ids) for e in engine.step()[1])
    results["modelpool Engine (padded KV batch, filter/concatenate)"] = tokens / (time.perf_counter() - started)

    config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    started = time.perf_counter()
    outputs = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
    tokens = sum(len(o.generated_tokens) for o in outputs.values())
    results["transformers generate_batch (ContinuousBatchingManager)"] = tokens / (time.perf_counter() - started)

    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, generation_config=config)
    tokens = (out.shape[1] - batch["input_ids"].shape[1]) * c
    results["model.generate, one static padded batch"] = tokens / (time.perf_counter() - started)

    print(f"C = {c}, N = {n}, {args.threads} threads, {path.name}")
    for name, rate in results.items():
        print(f"  {rate:8.1f} tok/s  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
