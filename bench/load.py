"""Asyncio gRPC load generator for StreamGenerate, with every latency measured on the client.

Owns the benchmark's fixed prompt set (shared with bench/inprocess.py, so every
measurement sees the same prompts), the measurement of one streamed request,
and the aggregation of a whole load run into a `LoadReport`. It talks to any
server implementing modelpool.v1.GenerationService: modelpool itself or
bench/naive_server.py.

A run keeps `concurrency` streams open until `requests` requests are done, or
until its time limit (`timeout_s`, the whole run; it is also every request's
deadline) has passed: bounded in count and in time. Request i sends prompt
i mod len(PROMPTS) with greedy decoding, ignore_eos and
min_new_tokens = max_new_tokens = N, so every request should generate exactly N tokens.

Every request is classified (`RequestResult.status`, `LoadReport.failed_by_status`):
- OK: the stream ended with gRPC status OK. It is *good* when it also generated
  exactly N tokens; an OK request with fewer or more is *wrong-length*.
- a gRPC status code name (RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...): the call failed;
- RUN_TIMEOUT: still running when the run's time limit cancelled it;
- NOT_SENT: never sent, because the run's time limit came first;
- CLIENT_ERROR: the load generator itself raised while reading the stream.
Failed = every request that is not OK. Only good requests count: their tokens
make the throughput and their timings make the latency percentiles; failed and
wrong-length requests are reported as counts beside every row.

Definitions (all client-side, `time.perf_counter`):
- TTFT: from sending the request to the first message with token ids or text.
- Inter-token latency: the gap between a message and the previous one, divided
  by the k tokens of the later message and counted k times (a server may merge
  several tokens into one message). Tokens of the first message have none.
- End-to-end latency: from sending the request to the end of the stream.
- Throughput: the tokens of the good requests / wall time of the whole run
  (failed and wrong-length requests add nothing, but their time stays in the wall time).
Tokens are counted with len(token_ids); a stream that sends no token ids at all
falls back to usage.completion_tokens of its last message. A request whose
usage.completion_tokens disagrees with the ids it streamed is wrong-length too.

    python -m bench.load --target 127.0.0.1:50051 --concurrency 8 --requests 16 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import grpc
import numpy

from modelpool.client import build_request
from modelpool.v1 import generation_pb2 as pb
from modelpool.v1 import generation_pb2_grpc as pb_grpc

_LOGGER = logging.getLogger(__name__)

# Request statuses besides the gRPC status code names (see the module docstring).
STATUS_OK = "OK"
STATUS_RUN_TIMEOUT = "RUN_TIMEOUT"
STATUS_NOT_SENT = "NOT_SENT"
STATUS_CLIENT_ERROR = "CLIENT_ERROR"
# How long cancelled requests get to finish once the run's time limit has passed.
_CANCEL_GRACE_S = 10.0

# (role, content) turns. Varied in topic, length and shape (with and without a system turn, one multi-turn chat).
PROMPTS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("user", "What is the capital of France?"),),
    (("user", "Write a haiku about the sea."),),
    (("user", "Explain in simple words why the sky is blue."),),
    (("user", "Give me three tips for writing clean Python code."),),
    (("system", "You are a patient math tutor."), ("user", "How do I add the fractions 1/3 and 1/4?")),
    (("user", "Tell me a short story about a robot who learns to paint."),),
    (("user", "What are the main differences between a cat and a dog as pets?"),),
    (("user", "Translate 'good morning, how are you?' into Spanish and French."),),
    (("system", "You answer in one paragraph."), ("user", "What causes the seasons on Earth?")),
    (("user", "List five healthy breakfast ideas."),),
    (("user", "Summarize the plot of Romeo and Juliet."),),
    (
        ("user", "I want to learn to cook."),
        ("assistant", "Great idea! Start with simple dishes like pasta or omelettes."),
        ("user", "What should I cook first, and what do I need to buy?"),
    ),
    (("user", "How does a rainbow form?"),),
    (("user", "Write a polite email asking my manager for a day off next Friday."),),
    (("user", "What is photosynthesis? Explain it to a ten-year-old."),),
    (("user", "Describe the water cycle step by step."),),
)


def prompt_messages(index: int) -> tuple[tuple[str, str], ...]:
    """The chat of request `index`: the prompts are used round robin."""
    return PROMPTS[index % len(PROMPTS)]


@dataclass
class RequestResult:
    """What the client saw of one streamed request."""

    index: int
    tokens: int = 0
    messages: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    # One entry per token that has an inter-token latency (see the module docstring).
    itl_s: list[float] = field(default_factory=list)
    # "OK", a gRPC status code name, RUN_TIMEOUT or CLIENT_ERROR; "" while the request runs.
    status: str = ""
    # usage.completion_tokens of the last message that had usage, if any.
    usage_tokens: int | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        """The stream ended with gRPC status OK."""
        return self.status == STATUS_OK and self.e2e_s is not None

    def right_length(self, max_new_tokens: int) -> bool:
        """Exactly the tokens asked for, in the ids streamed and (when sent) in the usage."""
        return self.tokens == max_new_tokens and self.usage_tokens in (None, max_new_tokens)

    def good(self, max_new_tokens: int) -> bool:
        return self.ok and self.right_length(max_new_tokens)


@dataclass
class LoadReport:
    """One load run against one server: aggregate throughput and latency percentiles (seconds).

    Throughput and latencies come from the good requests only (OK and exactly
    max_new_tokens tokens); the others are counted in `failed` (by status in
    `failed_by_status`) and `wrong_length`. requests = good + wrong_length + failed.
    """

    target: str
    concurrency: int
    requests: int
    max_new_tokens: int
    # Requests that ended with gRPC status OK (good + wrong_length).
    completed: int
    # Requests that did not end OK (failed, cut by the run's time limit, or never sent).
    failed: int
    timed_out: bool
    # OK requests whose token count was not max_new_tokens: they count nowhere but here.
    wrong_length: int
    wall_s: float
    # Tokens of the good requests: the only tokens throughput counts.
    tokens: int
    tokens_per_s: float
    ttft_s: dict[str, float | None]
    itl_s: dict[str, float | None]
    e2e_s: dict[str, float | None]
    # OK, with the right length: the requests behind `tokens` and the percentiles.
    good: int = 0
    # Status name -> count, for the failed requests only.
    failed_by_status: dict[str, int] = field(default_factory=dict)
    # Every token received, failed and wrong-length requests included (for information only).
    tokens_received: int = 0
    errors: list[str] = field(default_factory=list)
    # CPU seconds the load generator itself used (it shares the machine with the server).
    client_cpu_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        def ms(stats: dict, key: str) -> str:
            value = stats.get(key)
            return "-" if value is None else f"{value * 1000:.0f}ms"

        return (
            f"C={self.concurrency} good={self.good}/{self.requests} "
            f"failed={describe_failed(self.failed, self.failed_by_status)} wrong_length={self.wrong_length} "
            f"tokens={self.tokens} wall={self.wall_s:.1f}s {self.tokens_per_s:.1f} tok/s | "
            f"TTFT p50 {ms(self.ttft_s, 'p50')} p95 {ms(self.ttft_s, 'p95')} | "
            f"ITL p50 {ms(self.itl_s, 'p50')} p95 {ms(self.itl_s, 'p95')} | "
            f"E2E p50 {ms(self.e2e_s, 'p50')} p95 {ms(self.e2e_s, 'p95')} | client CPU {self.client_cpu_s:.1f}s"
            + (" | TIMED OUT" if self.timed_out else "")
        )


def describe_failed(failed: int, by_status: dict[str, int] | None) -> str:
    """`0`, or `3 (DEADLINE_EXCEEDED 2, RUN_TIMEOUT 1)`."""
    if not failed or not by_status:
        return str(failed)
    return f"{failed} (" + ", ".join(f"{name} {count}" for name, count in sorted(by_status.items())) + ")"


def percentiles(values: Sequence[float], quantiles: Sequence[int] = (50, 95)) -> dict[str, float | None]:
    """p50/p95 (linear interpolation between closest ranks) and the mean; None when there are no values."""
    if not values:
        return {**{f"p{q}": None for q in quantiles}, "mean": None}
    data = numpy.asarray(values, dtype=float)
    stats = {f"p{q}": float(numpy.percentile(data, q)) for q in quantiles}
    stats["mean"] = float(data.mean())
    return stats


def make_request(index: int, max_new_tokens: int, model: str = "") -> pb.StreamGenerateRequest:
    """Greedy (do_sample unset), ignore_eos, exactly max_new_tokens tokens."""
    return build_request(
        pb.StreamGenerateRequest,
        messages=prompt_messages(index),
        model=model,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        ignore_eos=True,
    )


async def measure_request(
    stub: pb_grpc.GenerationServiceStub,
    result: RequestResult,
    max_new_tokens: int,
    timeout_s: float,
    model: str = "",
) -> None:
    """Send request `result.index` as a StreamGenerate and fill `result` as its messages arrive.

    Filled in place, so that a request cancelled by the run's timeout still shows what it got.
    `result.status` says how it ended (see the module docstring).
    """
    request = make_request(result.index, max_new_tokens, model)
    sent = time.perf_counter()
    previous: float | None = None
    call = stub.StreamGenerate(request, timeout=timeout_s)
    try:
        async for message in call:
            now = time.perf_counter()
            result.messages += 1
            count = len(message.token_ids)
            if message.HasField("usage"):
                result.usage_tokens = message.usage.completion_tokens
            if not count and not message.text_delta:
                continue
            if result.ttft_s is None:
                result.ttft_s = now - sent
            elif count and previous is not None:
                result.itl_s.extend([(now - previous) / count] * count)
            result.tokens += count
            if count:
                previous = now
        result.e2e_s = time.perf_counter() - sent
        result.status = STATUS_OK
    except grpc.aio.AioRpcError as exc:
        result.status = exc.code().name
        result.error = f"{exc.code().name}: {exc.details()}"
    except asyncio.CancelledError:
        result.status = STATUS_RUN_TIMEOUT
        result.error = f"{STATUS_RUN_TIMEOUT}: cancelled by the run's time limit"
        raise
    except Exception as exc:  # a client-side fault fails this request, not the run
        _LOGGER.exception("request %d: the load generator failed", result.index)
        result.status = STATUS_CLIENT_ERROR
        result.error = f"{STATUS_CLIENT_ERROR}: {exc!r}"
    finally:
        call.cancel()
        if result.tokens == 0 and result.usage_tokens:
            result.tokens = result.usage_tokens


async def _worker(
    stub: pb_grpc.GenerationServiceStub,
    next_index,
    requests: int,
    max_new_tokens: int,
    timeout_s: float,
    model: str,
    results: list[RequestResult],
) -> None:
    while True:
        index = next(next_index)
        if index >= requests:
            return
        result = RequestResult(index=index)
        results.append(result)
        await measure_request(stub, result, max_new_tokens, timeout_s, model)


def summarize(
    target: str,
    concurrency: int,
    requests: int,
    max_new_tokens: int,
    results: list[RequestResult],
    wall_s: float,
    timed_out: bool,
    client_cpu_s: float = 0.0,
) -> LoadReport:
    """Aggregate a run: only good requests (OK, exactly max_new_tokens tokens) count towards tokens and latencies."""
    completed = [r for r in results if r.ok]
    good = [r for r in completed if r.right_length(max_new_tokens)]
    failed_by_status: dict[str, int] = {}
    for r in results:
        if not r.ok:
            status = r.status or STATUS_RUN_TIMEOUT  # never reached an end: cut by the run's time limit
            failed_by_status[status] = failed_by_status.get(status, 0) + 1
    if requests > len(results):
        failed_by_status[STATUS_NOT_SENT] = requests - len(results)
    tokens = sum(r.tokens for r in good)
    errors = sorted({r.error for r in results if r.error})
    wrong = [r for r in completed if not r.right_length(max_new_tokens)]
    errors += sorted({f"wrong length: {r.tokens} tokens streamed, usage {r.usage_tokens}" for r in wrong})
    return LoadReport(
        target=target,
        concurrency=concurrency,
        requests=requests,
        max_new_tokens=max_new_tokens,
        completed=len(completed),
        failed=sum(failed_by_status.values()),
        timed_out=timed_out,
        wrong_length=len(wrong),
        wall_s=wall_s,
        tokens=tokens,
        tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        ttft_s=percentiles([r.ttft_s for r in good if r.ttft_s is not None]),
        itl_s=percentiles([gap for r in good for gap in r.itl_s]),
        e2e_s=percentiles([r.e2e_s for r in good if r.e2e_s is not None]),
        good=len(good),
        failed_by_status=dict(sorted(failed_by_status.items())),
        tokens_received=sum(r.tokens for r in results),
        errors=errors[:5],
        client_cpu_s=client_cpu_s,
    )


async def run_load(
    target: str,
    concurrency: int,
    requests: int,
    max_new_tokens: int,
    *,
    timeout_s: float = 600.0,
    model: str = "",
) -> LoadReport:
    """Keep `concurrency` streams busy until `requests` are done or `timeout_s` (whole run) has passed.

    Requests still running at the timeout are cancelled (the server then aborts
    them) and count as failed (RUN_TIMEOUT), those not yet sent as failed
    (NOT_SENT); the report says timed_out. `timeout_s` is also each request's deadline.
    """
    if concurrency < 1 or requests < 1 or max_new_tokens < 1:
        raise ValueError("concurrency, requests and max_new_tokens must be at least 1")
    results: list[RequestResult] = []
    counter = itertools.count()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        started, cpu_started = time.perf_counter(), time.process_time()
        workers = [
            asyncio.ensure_future(_worker(stub, counter, requests, max_new_tokens, timeout_s, model, results))
            for _ in range(min(concurrency, requests))
        ]
        done, pending = await asyncio.wait(workers, timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=_CANCEL_GRACE_S)
        wall_s = time.perf_counter() - started
        client_cpu_s = time.process_time() - cpu_started
        for task in done:
            if task.exception() is not None:
                raise task.exception()
    if pending:
        _LOGGER.warning("load run against %s timed out after %.0f s", target, timeout_s)
    return summarize(
        target, concurrency, requests, max_new_tokens, results, wall_s, bool(pending), client_cpu_s=client_cpu_s
    )


async def warm_up(target: str, *, requests: int = 2, max_new_tokens: int = 8, timeout_s: float = 120.0) -> None:
    """A few short requests so that first-call costs (allocations, lazy imports) stay out of the numbers."""
    report = await run_load(target, requests, requests, max_new_tokens, timeout_s=timeout_s)
    if report.failed or report.timed_out:
        raise RuntimeError(f"warm-up against {target} failed: {report.errors or 'timed out'}")
    if report.wrong_length:
        _LOGGER.warning("warm-up against %s: %d requests of the wrong length", target, report.wrong_length)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="StreamGenerate load generator (client-side latencies).")
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--model", default="", help="model name (default: the server's default model)")
    parser.add_argument("--concurrency", "-c", type=int, default=8)
    parser.add_argument("--requests", "-n", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="limit of the whole run (and of each request), in seconds"
    )
    parser.add_argument("--no-warm-up", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


async def _main(args: argparse.Namespace) -> LoadReport:
    if not args.no_warm_up:
        await warm_up(args.target)
    return await run_load(
        args.target, args.concurrency, args.requests, args.max_new_tokens, timeout_s=args.timeout, model=args.model
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = asyncio.run(_main(args))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 1 if report.failed or report.wrong_length or report.timed_out else 0


if __name__ == "__main__":
    sys.exit(main())
