"""Prefill in batches of similar lengths against one padded batch (workers/prefill_groups.py), in-process.

Owns one comparison on modelpool's `Engine`, loaded as a worker loads it, with
whole prompts (`max_step_tokens = 0`, so that one step prefills them all):

- prefill: the prompts of a scenario added at once, one token each, stepped
  until done; seconds, the two ways alternated `--rounds` times (medians);
- decode: C chat requests of N tokens (prefill included), tok/s, alternated
  the same way, with the worker's default step budget;
- the tokens of both ways, compared (greedy: they must be identical).

"one batch" pads every prompt of the step to the longest (a forward worth
more tokens than any padding, the engine before this change); "grouped" is the
engine as it is, with the forward cost it learnt from its own prefills (shown).

    python -m bench.prefill_batches                     # builtin, 2 threads, ~5 min
    python -m bench.prefill_batches --model tiny --threads 1
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

from bench.inprocess import add_requests, chat_token_ids, engine_round, load_worker_engine
from bench.run import render_table


def _prefill_seconds(engine, prompts: list[list[int]], first_id: int) -> float:
    add_requests(engine, prompts, 1, first_id)
    started = time.perf_counter()
    while engine.has_work:
        engine.step()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin", help="builtin, tiny or a folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32, help="chat requests of the decode comparison")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--long-tokens", type=int, default=1000, help="the long prompt among the chat prompts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from workers.prefill_groups import ForwardCost

    whole = load_worker_engine(args.model, args.threads, 64, max_step_tokens=0)
    chat = [chat_token_ids(whole.tokenizer, i) for i in range(args.concurrency)]
    long_prompt = [token for i in range(len(chat)) for token in chat[i]][: args.long_tokens]
    scenarios = {
        f"{len(chat)} chat prompts": chat,
        f"{len(chat) - 1} chat prompts + one of {len(long_prompt)} tokens": [*chat[:-1], long_prompt],
    }
    one_batch = ForwardCost(default_tokens=10**9, min_observations=10**9)
    _prefill_seconds(whole, chat[:4], 1)  # warm-up; the engine's first observations
    learnt = whole.prefill_cost
    ways = {"one batch": one_batch, "grouped": learnt}
    rows, next_id = [], 1000
    for name, prompts in scenarios.items():
        seconds: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(args.rounds):
            for way, cost in ways.items():
                whole.prefill_cost = cost
                seconds[way].append(_prefill_seconds(whole, prompts, next_id))
                next_id += 1000
        single, grouped = (statistics.median(seconds[way]) for way in ways)
        rows.append([f"prefill, {name} ({sum(map(len, prompts))} tokens), s", f"{single:.2f}", f"{grouped:.2f}",
                     f"{single / grouped:.2f}x", f"{learnt.tokens():.0f}"])  # fmt: skip
        print(f"  {name}: {single:.2f} s in one batch, {grouped:.2f} s grouped", flush=True)
    del whole
    engine = load_worker_engine(args.model, args.threads, 64)
    engine_round(engine, 4, 4, 1)
    learnt = ways["grouped"] = engine.prefill_cost
    rates: dict[str, list[float]] = {way: [] for way in ways}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(args.rounds):
        for way, cost in ways.items():
            engine.prefill_cost = cost
            tokens[way], seconds_taken = engine_round(engine, args.concurrency, args.max_new_tokens, next_id)
            rates[way].append(args.concurrency * args.max_new_tokens / seconds_taken)
            next_id += 1000
    single, grouped = (statistics.median(rates[way]) for way in ways)
    rows.append([f"C = {args.concurrency} chat requests x {args.max_new_tokens} tokens, tok/s", f"{single:.1f}",
                 f"{grouped:.1f}", f"{grouped / single:.2f}x", f"{learnt.tokens():.0f}"])  # fmt: skip
    same = sum(a == b for a, b in zip(tokens["one batch"], tokens["grouped"], strict=True))
    print(f"\nPrefill batches: {args.model}, {args.threads} threads, medians of {args.rounds} alternating rounds\n")
    print(render_table(["workload", "one batch", "grouped", "grouped gain", "learnt forward cost, tokens"], rows))
    print(f"\nGreedy tokens of the decode comparison identical in {same} of {args.concurrency} requests.")
    return 0 if same == args.concurrency else 1


if __name__ == "__main__":
    sys.exit(main())
