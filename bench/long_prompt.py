"""The long-prompt benchmark of chunked prefill: do running streams keep moving while a long prompt is prefilled?

Owns one scenario, run against a modelpool server per step-token budget
(`--max-step-tokens`, 0 = unchunked), each server alone on 127.0.0.1: S streams
(`--streams`, default 32) decode; after `--settle-s` seconds of decoding and
`--before-s` seconds more (the steady window) a prompt of about P tokens (`--prompt-tokens`, default 6000; the
server's usage count is printed) arrives. Measured on the client, per budget:

- the streams' gaps between messages (one message per token here) before the
  long prompt arrives (steady state): p50 / p95 / max;
- their gaps that overlap its prefill (from sending it to its first token):
  p50 / p95 / max; the max is the stall a user sees;
- the long prompt's TTFT.

The long prompt asks for one token, so it ends at its first token and never
joins the left-padded running batch: what is measured is the prefill alone
(a long row that joins makes every later decode step of the batch pay for its
length; see bench/RESULTS.md).

Targets (issue 10): max gap during the prefill <= 3 x the steady ITL p50, and
TTFT within 1.5 x that of the unchunked server. The streams are cancelled once
the long prompt has its first token. Tables print as Markdown for
bench/RESULTS.md.

    python -m bench.long_prompt                                   # builtin, 6000 tokens, budgets 0,512
    python -m bench.long_prompt --prompt-tokens 1500 --step-tokens 0,512,96   # a quicker run
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from bench.load import percentiles
from bench.run import DEFAULT_OUT_DIR, ServerProcess, free_port, modelpool_command, render_table, running
from modelpool.request import build_request
from modelpool.v1 import generation_pb2 as pb
from modelpool.v1 import generation_pb2_grpc as pb_grpc

_LOGGER = logging.getLogger(__name__)

TARGET_GAP_VS_ITL = 3.0
TARGET_TTFT_VS_UNCHUNKED = 1.5
# Each stream may generate this many tokens; the run cancels them well before (bounded by --run-timeout).
STREAM_MAX_NEW = 1500


@dataclass
class Stream:
    index: int
    # time.perf_counter() of every message that carried tokens.
    arrivals: list[float] = field(default_factory=list)
    status: str = ""


async def _read_stream(stub, stream: Stream, timeout_s: float) -> None:
    request = build_request(
        pb.StreamGenerateRequest,
        prompt=f"Count with me, number {stream.index}: one, two, three,",
        max_new_tokens=STREAM_MAX_NEW,
        ignore_eos=True,
    )
    call = stub.StreamGenerate(request, timeout=timeout_s)
    try:
        async for message in call:
            if message.token_ids:
                stream.arrivals.append(time.perf_counter())
        stream.status = "OK"
    except grpc.aio.AioRpcError as exc:
        stream.status = exc.code().name
    except asyncio.CancelledError:
        stream.status = "CANCELLED"
        raise
    finally:
        call.cancel()


async def measure(
    target: str, streams: int, prompt_tokens: int, before_s: float, timeout_s: float, settle_s: float = 10.0
) -> dict:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        # Warm-up: one short request, so that the first compute is not part of any number.
        await stub.Generate(build_request(pb.GenerateRequest, prompt="Hello", max_new_tokens=4), timeout=timeout_s)
        state = [Stream(i) for i in range(streams)]
        tasks = [asyncio.create_task(_read_stream(stub, s, timeout_s)) for s in state]
        try:
            deadline = time.monotonic() + timeout_s
            while any(len(s.arrivals) < 3 for s in state):
                if time.monotonic() > deadline or any(s.status for s in state):
                    raise RuntimeError(f"streams did not start: {[s.status for s in state if s.status]}")
                await asyncio.sleep(0.05)
            # The first decode steps after the streams' prefill run slow here (seconds each) before they settle;
            # the steady window starts after them.
            await asyncio.sleep(settle_s)
            steady_from = time.perf_counter()
            await asyncio.sleep(before_s)
            long_request = build_request(
                pb.StreamGenerateRequest, prompt="the" + " the" * (prompt_tokens - 1), max_new_tokens=1, ignore_eos=True
            )
            sent = time.perf_counter()
            first = None
            usage_prompt = 0
            async for message in stub.StreamGenerate(long_request, timeout=timeout_s):
                if message.token_ids and first is None:
                    first = time.perf_counter()
                if message.HasField("usage"):
                    usage_prompt = message.usage.prompt_tokens
            if first is None:
                raise RuntimeError("the long prompt got no token")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    before, during = [], []
    for s in state:
        for a, b in zip(s.arrivals, s.arrivals[1:], strict=False):
            if a >= steady_from and b <= sent:
                before.append(b - a)
            elif b > sent and a < first:
                during.append(b - a)
    return {
        "prompt_tokens": usage_prompt,
        "ttft_s": first - sent,
        "before": {**percentiles(before), "max": max(before, default=None), "n": len(before)},
        "during": {**percentiles(during), "max": max(during, default=None), "n": len(during)},
    }


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:.0f}"


def report(results: dict[int, dict]) -> str:
    unchunked = results.get(0, {}).get("ttft_s")
    rows = []
    for budget, r in results.items():
        if "failed" in r:
            rows.append([str(budget), "failed: " + r["failed"], *["—"] * 9])
            continue
        b, d = r["before"], r["during"]
        gap_ratio = d["max"] / b["p50"] if d["max"] and b["p50"] else None
        ttft_ratio = r["ttft_s"] / unchunked if unchunked else None
        rows.append(
            [
                "off (0)" if budget == 0 else str(budget),
                r["prompt_tokens"],
                _ms(b["p50"]),
                _ms(b["p95"]),
                _ms(b["max"]),
                _ms(d["p50"]),
                _ms(d["p95"]),
                _ms(d["max"]),
                "—" if gap_ratio is None else f"{gap_ratio:.1f}x (<= {TARGET_GAP_VS_ITL:.0f}x)",
                f"{r['ttft_s']:.2f}",
                "—" if ttft_ratio is None else f"{ttft_ratio:.2f}x (<= {TARGET_TTFT_VS_UNCHUNKED}x)",
            ]
        )
    headers = [
        "max_step_tokens",
        "long prompt tokens",
        "ITL before p50 ms",
        "p95",
        "max",
        "ITL during prefill p50 ms",
        "p95",
        "max",
        "max gap / steady p50",
        "long TTFT s",
        "TTFT / unchunked",
    ]
    return render_table(headers, rows, align="lrrrrrrrrrr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin", help="builtin, or a model folder")
    parser.add_argument("--prompt-tokens", type=int, default=6000)
    parser.add_argument("--streams", type=int, default=32, choices=range(1, 65), metavar="1..64")
    parser.add_argument("--step-tokens", default="0,512", help="budgets to compare, one server each; 0 = unchunked")
    parser.add_argument("--before-s", type=float, default=5.0, help="seconds of steady decoding measured first")
    parser.add_argument("--settle-s", type=float, default=10.0, help="seconds of decoding before that window")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the worker")
    parser.add_argument("--run-timeout", type=float, default=300.0, help="seconds one budget's run may take")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    budgets = [int(b) for b in args.step_tokens.split(",")]
    DEFAULT_OUT_DIR.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict] = {}
    for budget in budgets:
        port = free_port()
        command = modelpool_command(args.model, port, max_batch_size=args.streams + 1, threads=args.threads)
        # Room for every stream's reservation and the long prompt's.
        batch_tokens = args.streams * (STREAM_MAX_NEW + 64) + args.prompt_tokens + 512
        command += ["--max-step-tokens", str(budget), "--max-batch-tokens", str(batch_tokens)]
        server = ServerProcess(f"modelpool-step{budget}", command, port, DEFAULT_OUT_DIR / f"long_prompt_{budget}.log")
        with running(server, start_timeout_s=300):
            try:
                results[budget] = asyncio.run(
                    measure(
                        server.target, args.streams, args.prompt_tokens, args.before_s, args.run_timeout, args.settle_s
                    )
                )
            except (grpc.RpcError, RuntimeError) as exc:
                # A budget that fails (e.g. its run timed out) is shown as failed; the others are still reported.
                _LOGGER.error("max_step_tokens %d failed: %s", budget, exc)
                results[budget] = {"failed": f"{type(exc).__name__}"}
                continue
        _LOGGER.info("max_step_tokens %d: %s", budget, results[budget])
    print(f"\n{args.streams} streams decoding, then a ~{args.prompt_tokens}-token prompt ({args.model} model)\n")
    print(report(results))
    return 1 if any("failed" in r for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
