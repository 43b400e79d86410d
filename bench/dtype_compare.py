"""Worker settings that change the arithmetic, side by side on this CPU: dtype (float32, bfloat16) and the linear
layers' kernels (`cpu_linear`: oneDNN on packed weights, or torch's own). Speed, and how often greedy tokens
differ (issue 11).

Owns one in-process measurement: modelpool's `Engine`, loaded as a worker
loads it, once per variant; each is fed C requests of N tokens (greedy,
ignore_eos, the load generator's chat prompts) and stepped to completion,
`--rounds` times per C, alternating the variants so that drift in the machine's
speed hits all. Printed: tok/s per variant and C (prefill included), and for
the greedy tokens of the C=largest round, the share of requests whose N tokens
are identical to the first variant's and the mean position of the first
difference.

    python -m bench.dtype_compare                     # float32 against bfloat16, C = 1 and 32, N = 64
    python -m bench.dtype_compare --variants float32:onednn,float32:aten --concurrency 1,8,32 --rounds 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys

from bench.inprocess import engine_round, load_worker_engine

_LOGGER = logging.getLogger(__name__)


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--variants",
        default="float32,bfloat16",
        help="DTYPE or DTYPE:CPU_LINEAR (onednn, the default, or aten), comma-separated; the first is the reference",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    levels = [int(c) for c in args.concurrency.split(",")]
    variants = args.variants.split(",")
    engines = {}
    for variant in variants:
        dtype, _, cpu_linear = variant.partition(":")
        engines[variant] = load_worker_engine(
            args.model, args.threads, max(levels), dtype, cpu_linear=cpu_linear or "onednn"
        )
    for engine in engines.values():
        engine_round(engine, max(levels), 4, first_id=1)  # warm-up
    speed: dict[tuple[str, int], list[float]] = {}
    outputs: dict[str, list[list[int]]] = {}
    request_id = 1000
    for concurrency in levels:
        for _ in range(args.rounds):
            for variant, engine in engines.items():
                request_id += 1000
                rows, seconds = engine_round(engine, concurrency, args.max_new_tokens, request_id)
                rate = concurrency * args.max_new_tokens / seconds
                speed.setdefault((variant, concurrency), []).append(rate)
                if concurrency == max(levels):
                    outputs[variant] = rows
    print(f"{args.model}, N = {args.max_new_tokens}, {args.threads} threads, median of {args.rounds} rounds\n")
    print("| variant | " + " | ".join(f"C={c} tok/s (runs)" for c in levels) + " |")
    print("|---|" + "--:|" * len(levels))
    for variant in variants:
        cells = [
            f"{statistics.median(speed[(variant, c)]):.1f} ({', '.join(f'{r:.1f}' for r in speed[(variant, c)])})"
            for c in levels
        ]
        print(f"| {variant} | " + " | ".join(cells) + " |")
    base, *others = variants
    for other in others:
        diffs = [first_difference(a, b) for a, b in zip(outputs[base], outputs[other], strict=True)]
        same = sum(d is None for d in diffs)
        where = [d for d in diffs if d is not None]
        mean = f"{statistics.mean(where):.1f}" if where else "-"
        print(
            f"\n{other} vs {base}, greedy, {len(diffs)} requests x {args.max_new_tokens} tokens: {same} identical; "
            f"first difference at token {mean} on average in the others"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
