"""The prefix-cache benchmark: a multi-turn chat that resends a long system prompt and its history every turn.

Owns one scenario, run against a modelpool server with the prefix cache on
(`--prefix-cache-mib`) and off, each alone on 127.0.0.1: one conversation of
`--turns` turns, each a StreamGenerate with the system prompt (about
`--system-tokens` tokens), every earlier question and answer, and a new
question; greedy, `--max-new-tokens` per answer. Measured on the client: the
TTFT of each turn. Target (issue 10): the TTFT of later turns <= 0.3 x the
cold one (the first turn, which no cache can help).

    python -m bench.prefix_chat                     # builtin, 1000-token system prompt, 4 turns
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

import grpc

from bench.run import DEFAULT_OUT_DIR, ServerProcess, free_port, modelpool_command, render_table, running
from modelpool.request import build_request
from modelpool.v1 import generation_pb2 as pb
from modelpool.v1 import generation_pb2_grpc as pb_grpc

_LOGGER = logging.getLogger(__name__)

TARGET_LATER_VS_COLD = 0.3
QUESTIONS = [
    "What is the capital of France?",
    "And of Italy?",
    "Which of the two is larger?",
    "Name a river in each.",
    "Summarize our conversation.",
    "Thank you. One more: the capital of Spain?",
]


def system_prompt(tokens: int) -> str:
    # About one token per word for this vocabulary; the server's usage count is printed.
    words = ("You are a helpful assistant who answers questions about geography briefly and precisely. " * 200).split()
    return " ".join(words[:tokens])


async def converse(target: str, turns: int, system_tokens: int, max_new_tokens: int, timeout_s: float) -> list[dict]:
    messages = [("system", system_prompt(system_tokens))]
    results = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        # Warm-up on another prompt, so that the first turn is cold for the cache but not for the model.
        await stub.Generate(build_request(pb.GenerateRequest, prompt="Hello", max_new_tokens=4), timeout=timeout_s)
        for turn in range(turns):
            messages.append(("user", QUESTIONS[turn % len(QUESTIONS)]))
            request = build_request(pb.StreamGenerateRequest, messages=messages, max_new_tokens=max_new_tokens)
            sent = time.perf_counter()
            ttft, text, prompt_tokens = None, "", 0
            async for message in stub.StreamGenerate(request, timeout=timeout_s):
                if ttft is None and (message.token_ids or message.text_delta):
                    ttft = time.perf_counter() - sent
                text += message.text_delta
                if message.HasField("usage"):
                    prompt_tokens = message.usage.prompt_tokens
            messages.append(("assistant", text))
            results.append({"turn": turn + 1, "prompt_tokens": prompt_tokens, "ttft_s": ttft, "text": text})
    return results


def report(runs: dict[str, list[dict]]) -> str:
    rows = []
    for label, turns in runs.items():
        cold = turns[0]["ttft_s"]
        for t in turns:
            rows.append(
                [
                    label,
                    t["turn"],
                    t["prompt_tokens"],
                    f"{t['ttft_s'] * 1000:.0f}",
                    "cold" if t["turn"] == 1 else f"{t['ttft_s'] / cold:.2f}x (<= {TARGET_LATER_VS_COLD}x)",
                ]
            )
    return render_table(["prefix cache", "turn", "prompt tokens", "TTFT ms", "TTFT / turn 1"], rows, align="lrrrr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin", help="builtin, or a model folder")
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--turns", type=int, default=4, choices=range(2, 13), metavar="2..12")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prefix-cache-mib", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the worker")
    parser.add_argument("--run-timeout", type=float, default=300.0, help="seconds one call may take")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    DEFAULT_OUT_DIR.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {}
    for mib in (0, args.prefix_cache_mib):
        port = free_port()
        command = modelpool_command(args.model, port, max_batch_size=4, threads=args.threads)
        command += ["--prefix-cache-mib", str(mib)]
        server = ServerProcess(f"modelpool-prefix{mib}", command, port, DEFAULT_OUT_DIR / f"prefix_chat_{mib}.log")
        with running(server, start_timeout_s=300):
            label = "off" if mib == 0 else f"{mib} MiB"
            runs[label] = asyncio.run(
                converse(server.target, args.turns, args.system_tokens, args.max_new_tokens, args.run_timeout)
            )
        _LOGGER.info("%s: %s", label, [(t["prompt_tokens"], round(t["ttft_s"], 3)) for t in runs[label]])
    answers = {label: [t["text"] for t in turns] for label, turns in runs.items()}
    same = len({tuple(a) for a in answers.values()}) == 1
    print(f"\nA {args.turns}-turn chat with a ~{args.system_tokens}-token system prompt ({args.model} model)\n")
    print(report(runs))
    print(f"\nanswers identical with and without the prefix cache: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
