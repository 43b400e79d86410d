"""transformers' decoder layers against the lean forward (workers/lean_layers.py), on one loaded worker engine.

Owns one A/B measurement, in-process (nothing else competes for the cores): the
engine is loaded as a CPU worker loads it (oneDNN layers, lean forward), then
for each C the two forwards alternate `--rounds` times, each round C chat
requests of N greedy tokens stepped to completion. This machine's speed drifts
from minute to minute, so the rounds interleave and the medians are compared.
Printed per C: tok/s of whole rounds (prefill included) and the median decode
step, each form, and whether every round gave the same tokens (it must).

    python -m bench.lean_layers                                # builtin, C = 1, 8, 32, N = 64, 4 rounds
    python -m bench.lean_layers --model tiny --concurrency 1,64 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys

from bench.inprocess import engine_round, load_worker_engine
from workers.lean_layers import lean_layers, restore_layers

FORMS = ("transformers", "lean")


def measure(engine, concurrency: int, max_new_tokens: int, rounds: int, first_id: int) -> dict:
    """Both forms alternated `rounds` times at one C; medians per form."""
    runs: dict[str, dict[str, list[float]]] = {form: {"tok_s": [], "step_ms": []} for form in FORMS}
    reference: list[list[int]] | None = None
    same = True
    for r in range(rounds):
        for form in FORMS if r % 2 == 0 else reversed(FORMS):
            restore_layers(engine.model)
            if form == "lean" and not lean_layers(engine.model):
                raise RuntimeError("the model's layers do not qualify for the lean forward (see the log)")
            steps: list[float] = []
            rows, seconds = engine_round(engine, concurrency, max_new_tokens, first_id, decode_steps=steps)
            first_id += concurrency
            reference = reference or rows
            same = same and rows == reference
            runs[form]["tok_s"].append(concurrency * max_new_tokens / seconds)
            runs[form]["step_ms"].append(1000 * statistics.median(steps))
    lean_layers(engine.model)  # as a worker runs
    result: dict = {"concurrency": concurrency, "same_tokens": same}
    for form in FORMS:
        result[form] = {name: statistics.median(values) for name, values in runs[form].items()}
        result[form]["runs_tok_s"] = [round(v, 1) for v in runs[form]["tok_s"]]
    return result


def render(results: list[dict]) -> str:
    lines = [
        "| C | transformers tok/s | lean tok/s | lean / transformers | transformers decode step ms "
        "| lean decode step ms | same tokens |",
        "|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in results:
        hf, lean = r["transformers"], r["lean"]
        lines.append(
            f"| {r['concurrency']} | {hf['tok_s']:.1f} | {lean['tok_s']:.1f} | {lean['tok_s'] / hf['tok_s']:.2f}x "
            f"| {hf['step_ms']:.1f} | {lean['step_ms']:.1f} | {'yes' if r['same_tokens'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin", help="builtin, tiny or a model folder")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated C values")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each form per C, alternating")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    engine = load_worker_engine(args.model, args.threads, max(levels))
    engine_round(engine, 1, 4, first_id=0)  # warm-up
    results = []
    for i, concurrency in enumerate(levels):
        results.append(measure(engine, concurrency, args.max_new_tokens, args.rounds, first_id=(i + 1) * 100_000))
        print(f"C={concurrency}: {results[-1]}", flush=True)
    print(render(results))
    return 0 if all(r["same_tokens"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
