"""How cost grows with work: batch size x prompt length, for sizing workers (issue 11).

Owns one in-process measurement: modelpool's `Engine`, loaded as a worker loads
it, unchunked (whole prompts in one step, so that all C requests then decode
together), is given C requests at once,
each a prompt of P random token ids asking for N tokens (greedy, ignore_eos),
and stepped to completion. Per (C, P):

- prefill: seconds from adding the requests until the last one has its first
  token, and prompt tokens per second over that time;
- decode: the median time of a decode-only step (the ITL every stream sees at
  that batch size and context) and C / that time (decode tokens per second).

Cells whose prompt tokens (C x P) exceed `--max-batch-prompt-tokens` are
skipped (said in the table): on a small CPU a batch of 64 prompts of 4k tokens
takes many minutes to prefill.

    python -m bench.sweep                                   # builtin, C 1,4,16,64 x P 128,1024,4096
    python -m bench.sweep --concurrency 1,8 --prompt-tokens 128 --max-new-tokens 8
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

from bench.inprocess import add_requests, load_worker_engine
from bench.run import render_table

_LOGGER = logging.getLogger(__name__)


def measure(engine, concurrency: int, prompt_tokens: int, max_new_tokens: int, first_id: int) -> dict:
    import torch

    from workers.messages import FinishReason

    generator = torch.Generator().manual_seed(first_id)
    vocab = len(engine.tokenizer)
    started = time.perf_counter()
    prompts = [torch.randint(10, vocab, (prompt_tokens,), generator=generator).tolist() for _ in range(concurrency)]
    add_requests(engine, prompts, max_new_tokens, first_id)
    waiting_first = set(range(first_id, first_id + concurrency))
    prefill_s = 0.0
    decode_steps: list[float] = []
    for _ in range(concurrency * (prompt_tokens + max_new_tokens) + 100):
        if not engine.has_work:
            break
        step_started = time.perf_counter()
        kind, events = engine.step()
        now = time.perf_counter()
        for event in events:
            if event.finish_reason is FinishReason.ERROR:
                raise RuntimeError(event.error)
            if event.request_id in waiting_first and event.token_ids:
                waiting_first.discard(event.request_id)
                if not waiting_first:
                    prefill_s = now - started
        if kind == "decode" and len(engine.running) == concurrency:
            decode_steps.append(now - step_started)
    itl = statistics.median(decode_steps) if decode_steps else None
    return {
        "concurrency": concurrency,
        "prompt_tokens": prompt_tokens,
        "prefill_s": prefill_s,
        "prefill_tok_s": concurrency * prompt_tokens / prefill_s if prefill_s else None,
        "itl_ms": itl * 1000 if itl else None,
        "decode_tok_s": concurrency / itl if itl else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--prompt-tokens", default="128,1024,4096")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-batch-prompt-tokens", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    levels = [int(c) for c in args.concurrency.split(",")]
    lengths = [int(p) for p in args.prompt_tokens.split(",")]
    # Room for every cell that runs (the worker's default, 16384, would hold back the larger ones).
    room = max(
        16384,
        max(c * (p + args.max_new_tokens) for c in levels for p in lengths if c * p <= args.max_batch_prompt_tokens),
    )
    # Whole prompts in one step (max_step_tokens 0): every cell's C prompts are prefilled together, so that all C
    # decode together afterwards (chunked, the first could finish before the last joins).
    engine = load_worker_engine(
        args.model, args.threads, max(levels), args.dtype, max_batch_tokens=room, max_step_tokens=0
    )
    measure(engine, 2, 16, 4, first_id=1)  # warm-up
    rows = []
    request_id = 1000
    for length in lengths:
        for concurrency in levels:
            if concurrency * length > args.max_batch_prompt_tokens:
                rows.append([concurrency, length, "skipped: over --max-batch-prompt-tokens", "", "", ""])
                continue
            request_id += 1000
            r = measure(engine, concurrency, length, args.max_new_tokens, request_id)
            _LOGGER.info("%s", r)
            rows.append(
                [
                    concurrency,
                    length,
                    f"{r['prefill_s']:.2f}",
                    f"{r['prefill_tok_s']:.0f}" if r["prefill_tok_s"] else "-",
                    f"{r['itl_ms']:.1f}" if r["itl_ms"] else "-",
                    f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "-",
                ]
            )
    print(f"{args.model}, {args.dtype}, {args.threads} threads, N = {args.max_new_tokens}, in-process engine\n")
    print(
        render_table(
            ["C", "prompt tokens", "prefill s (all C)", "prefill tok/s", "decode ITL p50 ms", "decode tok/s"], rows
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
