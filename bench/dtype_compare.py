"""float32 against bfloat16 weights on this CPU: speed, and how often greedy tokens differ (issue 11).

Owns one in-process measurement: modelpool's `Engine`, loaded as a worker
loads it, once per dtype; each is fed C requests of N tokens (greedy,
ignore_eos, the load generator's chat prompts) and stepped to completion,
`--rounds` times per C, alternating the dtypes so that drift in the machine's
speed hits both. Printed: tok/s per dtype and C, and for the greedy tokens of
the C=largest round, the share of requests whose N tokens are identical under
both dtypes and the mean position of the first difference.

    python -m bench.dtype_compare                     # builtin, C = 1 and 32, N = 64
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
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    levels = [int(c) for c in args.concurrency.split(",")]
    dtypes = args.dtypes.split(",")
    engines = {dtype: load_worker_engine(args.model, args.threads, max(levels), dtype) for dtype in dtypes}
    for engine in engines.values():
        engine_round(engine, max(levels), 4, first_id=1)  # warm-up
    speed: dict[tuple[str, int], list[float]] = {}
    outputs: dict[str, list[list[int]]] = {}
    request_id = 1000
    for concurrency in levels:
        for _ in range(args.rounds):
            for dtype, engine in engines.items():
                request_id += 1000
                rows, seconds = engine_round(engine, concurrency, args.max_new_tokens, request_id)
                rate = concurrency * args.max_new_tokens / seconds
                speed.setdefault((dtype, concurrency), []).append(rate)
                if concurrency == max(levels):
                    outputs[dtype] = rows
    print(f"{args.model}, N = {args.max_new_tokens}, {args.threads} threads, median of {args.rounds} rounds\n")
    print("| dtype | " + " | ".join(f"C={c} tok/s" for c in levels) + " |")
    print("|---|" + "--:|" * len(levels))
    for dtype in dtypes:
        cells = [f"{statistics.median(speed[(dtype, c)]):.1f}" for c in levels]
        print(f"| {dtype} | " + " | ".join(cells) + " |")
    base, *others = dtypes
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
