"""The Python client package (sync and asyncio) and the `modelpool` CLI against the real server."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import pytest

from modelpool import AsyncClient, Client, build_request
from modelpool.v1 import generation_pb2 as pb
from tests.helpers import wait_until


def cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modelpool.cli", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def test_async_client_generate_stream_chat_models(server):
    async def scenario():
        async with AsyncClient(server.target, timeout=60) as client:
            unary = await client.generate("async", max_new_tokens=8, ignore_eos=True)
            pieces = [p async for p in client.stream("async", max_new_tokens=8, ignore_eos=True)]
            chat = await client.chat([{"role": "user", "content": "hi"}], max_new_tokens=4, ignore_eos=True)
            models = await client.models()
            return unary, pieces, chat, models

    unary, pieces, chat, models = asyncio.run(scenario())
    with Client(server.target, timeout=60) as client:
        assert client.generate("async", max_new_tokens=8, ignore_eos=True, priority=100).text == unary.text
    assert "".join(p.text_delta for p in pieces) == unary.text
    assert chat.usage.completion_tokens == 4
    assert "tiny" in {m.name for m in models}


def test_build_request_rejects_mistakes():
    with pytest.raises(ValueError):
        build_request(pb.GenerateRequest)
    with pytest.raises(ValueError, match="role"):
        build_request(messages=[("robot", "hi")])
    with pytest.raises(TypeError):
        build_request(prompt="x", max_tokens=3)
    request = build_request(prompt="x", temperature=0.7, seed=5, stop_sequences=["\n"])
    assert request.sampling.do_sample and request.sampling.seed == 5
    assert not build_request(prompt="x", temperature=0).sampling.do_sample
    assert build_request(pb.StreamGenerateRequest, prompt="x", priority=7).priority == 7
    assert build_request(prompt="x").priority == 0 and build_request(prompt="x", priority=None).priority == 0


def test_cli_generate_streams_text(server):
    result = cli("generate", "Hello", "--target", server.target, "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def usage_lines(stderr: str) -> list[dict[str, str]]:
    """The `--usage` lines the CLI prints after each reply, as dicts."""
    return [dict(field.split("=", 1) for field in m.split()) for m in re.findall(r"^\[(.*)\]$", stderr, re.M)]


def test_cli_chat_sends_the_history_and_reset_forgets_it(server):
    stdin = "same words\nsecond turn\n/reset\nsame words\n/quit\n"
    result = cli("chat", "--target", server.target, "--max-new-tokens", "4", "--usage", stdin=stdin)
    assert result.returncode == 0, result.stderr
    first, second, after_reset = usage_lines(result.stderr)
    prompt = [int(u["prompt_tokens"]) for u in (first, second, after_reset)]
    # The second turn's prompt holds the first turn, its 4-token answer and the new message ...
    assert prompt[1] > prompt[0] + int(first["completion_tokens"]) + 2, prompt
    # ... and after /reset the same words make the same prompt as the first turn.
    assert prompt[2] == prompt[0], prompt
    assert result.stdout.count("> ") == 5


def test_cli_generate_raw_system_and_stop(server, tiny_dir):
    target = ["--target", server.target, "--max-new-tokens", "24", "--usage"]
    templated = cli("generate", "Stop test:", *target)
    raw = cli("generate", "Stop test:", "--raw", *target)
    system = cli("generate", "Stop test:", "--system", "Answer in French. " * 20, *target)
    for result in (templated, raw, system):
        assert result.returncode == 0, result.stderr
    tokens = {name: int(usage_lines(r.stderr)[0]["prompt_tokens"]) for name, r in
              (("templated", templated), ("raw", raw), ("system", system))}
    # The raw prompt skips the chat template; a long system message replaces the template's short default one.
    assert tokens["raw"] < tokens["templated"] < tokens["system"], tokens
    text = raw.stdout.rstrip("\n")
    start = next(i for i in range(len(text) // 3, len(text) - 3) if text[i : i + 3].strip() == text[i : i + 3])
    stop = text[start : start + 3]
    stopped = cli("generate", "Stop test:", "--raw", "--stop", stop, *target)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.rstrip("\n") == text[: text.index(stop)]
    assert usage_lines(stopped.stderr)[0]["finish"] == "stop_sequence"


def test_cli_models_and_errors(server):
    result = cli("models", "--target", server.target)
    assert result.returncode == 0 and "tiny (default)" in result.stdout and "CUDA_VISIBLE_DEVICES=0" in result.stdout
    bad = cli("generate", "x", "--target", server.target, "--model", "nope")
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr


@pytest.mark.builtin
def test_cli_generate_names_paris(server):
    result = cli("generate", "What is the capital of France?", "--target", server.target, "--model", "builtin")
    assert result.returncode == 0 and "Paris" in result.stdout


def _slow_in_flight(client) -> int:
    """Requests the worker of `slow` holds (running or waiting)."""
    (slow,) = [m for m in client.models() if m.name == "slow"]
    return sum(w.outstanding_requests for w in slow.workers)


def test_breaking_out_of_a_stream_frees_the_worker_slot(edge_server):
    """`slow` needs minutes for 400 tokens; the slot frees at once only because the break cancels the call."""
    with Client(edge_server.target, timeout=120) as client:
        wait_until(lambda: _slow_in_flight(client) == 0, 30, "slow idle")
        for piece in client.stream("go", model="slow", max_new_tokens=400, ignore_eos=True):
            assert piece.token_ids
            assert _slow_in_flight(client) == 1
            break
        wait_until(lambda: _slow_in_flight(client) == 0, 30, "the slot freed by the break")


def test_breaking_out_of_an_async_stream_frees_the_worker_slot(edge_server):
    async def in_flight(client) -> int:
        (slow,) = [m for m in await client.models() if m.name == "slow"]
        return sum(w.outstanding_requests for w in slow.workers)

    async def scenario():
        async with AsyncClient(edge_server.target, timeout=120) as client:
            async for piece in client.stream("go", model="slow", max_new_tokens=400, ignore_eos=True):
                assert piece.token_ids
                assert await in_flight(client) == 1
                break
            for _ in range(600):  # 30 s at most
                if await in_flight(client) == 0:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("the async break did not free the slot")

    asyncio.run(scenario())
