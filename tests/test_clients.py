"""The Python client package (sync and asyncio) and the `modelpool` CLI against the real server."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from modelpool import AsyncClient, build_request
from modelpool.v1 import generation_pb2 as pb


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


def test_cli_generate_streams_text(server):
    result = cli("generate", "Hello", "--target", server.target, "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_cli_chat_session_answers_each_turn(server):
    result = cli("chat", "--target", server.target, "--max-new-tokens", "4", stdin="first\nsecond\n/quit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("> ") >= 2


def test_cli_models_and_errors(server):
    result = cli("models", "--target", server.target)
    assert result.returncode == 0 and "tiny (default)" in result.stdout and "CUDA_VISIBLE_DEVICES=0" in result.stdout
    bad = cli("generate", "x", "--target", server.target, "--model", "nope")
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr


@pytest.mark.builtin
def test_cli_generate_names_paris(server):
    result = cli("generate", "What is the capital of France?", "--target", server.target, "--model", "builtin")
    assert result.returncode == 0 and "Paris" in result.stdout
