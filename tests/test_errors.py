"""Every error row of DESIGN.md this service covers, through gRPC: the status, the field, and that it keeps serving."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest

from modelpool import Client, ModelpoolError, build_request
from modelpool.v1 import generation_pb2 as pb
from modelpool.v1 import generation_pb2_grpc as pb_grpc
from tests.helpers import as_stream_request, load, metric, wait_idle, wait_until


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def call_error(stub, request, method="Generate") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        if method == "Generate":
            stub.Generate(request, timeout=60)
        else:
            list(stub.StreamGenerate(as_stream_request(request), timeout=60))
    return err.value


@pytest.mark.parametrize("method", ["Generate", "StreamGenerate"])
@pytest.mark.parametrize(
    "request_kwargs, field",
    [
        ({}, "input"),
        ({"prompt": ""}, "prompt"),
        ({"chat": pb.ChatMessages()}, "chat.messages"),
        ({"chat": pb.ChatMessages(messages=[pb.ChatMessage(content="hi")])}, "chat.messages[0].role"),
        ({"prompt": "x", "sampling": pb.SamplingParameters(do_sample=True, temperature=-1)}, "sampling.temperature"),
        ({"prompt": "x", "sampling": pb.SamplingParameters(top_p=1.5)}, "sampling.top_p"),
        ({"prompt": "x", "sampling": pb.SamplingParameters(repetition_penalty=float("nan"))}, "sampling.repetition_penalty"),
        ({"prompt": "x", "stopping": pb.StoppingCriteria(max_new_tokens=600)}, "stopping.max_new_tokens"),
        ({"prompt": "x", "stopping": pb.StoppingCriteria(max_new_tokens=5, min_new_tokens=6)}, "stopping.min_new_tokens"),
        ({"prompt": "x", "stopping": pb.StoppingCriteria(stop_sequences=[""])}, "stopping.stop_sequences[0]"),
        ({"prompt": "word " * 600}, "prompt"),
        ({"prompt": "x", "priority": 101}, "priority"),
        ({"prompt": "x", "priority": -101}, "priority"),
    ],
)
def test_invalid_argument_names_the_field(stub, method, request_kwargs, field):
    error = call_error(stub, pb.GenerateRequest(**request_kwargs), method)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(field + ":"), error.details()


def test_chat_without_template_is_invalid_argument(stub):
    request = build_request(pb.GenerateRequest, messages=[("user", "hi")], model="nochat")
    error = call_error(stub, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("chat:") and "chat template" in error.details()
    # A raw prompt to the same model works.
    reply = stub.Generate(build_request(prompt="hi", model="nochat", max_new_tokens=3, ignore_eos=True), timeout=60)
    assert reply.usage.completion_tokens == 3 and reply.usage.prompt_tokens >= 1


def test_unknown_model_is_not_found(stub):
    error = call_error(stub, build_request(prompt="hi", model="no-such-model"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in error.details()


def test_full_queue_is_resource_exhausted_and_accepted_requests_finish(server):
    """`limited` runs one sequence and queues one more: a third concurrent request is refused at once."""
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        long = build_request(pb.StreamGenerateRequest, prompt="go", model="limited", max_new_tokens=200, ignore_eos=True)
        first, second = stub.StreamGenerate(long, timeout=120), stub.StreamGenerate(long, timeout=120)
        with Client(server.target) as client:
            wait_until(lambda: load(client, "limited")[1] == 2)  # both accepted
        error = call_error(stub, build_request(prompt="x", model="limited", max_new_tokens=2))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limited" in error.details()
        for call in (first, second):
            pieces = list(call)
            assert pieces[-1].finish_reason == pb.FINISH_REASON_LENGTH
            assert sum(len(p.token_ids) for p in pieces) == 200
        # And the model serves again once they are done.
        assert stub.Generate(build_request(prompt="x", model="limited", max_new_tokens=2), timeout=60).usage.completion_tokens == 2


def test_cancelled_stream_is_dropped_by_its_worker(chaos_server):
    """A `slow` step takes 10 ms more: this request needs 400 decode steps. Its worker's step count shows that it
    dropped the sequence soon after the cancel instead of generating the rest for no one."""
    steps_before = metric(chaos_server, "modelpool_step_seconds_count", model="slow", kind="decode")
    with Client(chaos_server.target, timeout=120) as client:
        stream = client.stream(prompt="go", model="slow", max_new_tokens=400, ignore_eos=True)
        assert next(stream).token_ids
        assert next(stream).token_ids
        stream.close()  # cancels the RPC
        wait_idle(client, "slow")
        reply = client.generate("x", model="slow", max_new_tokens=3, ignore_eos=True)
    assert reply.usage.completion_tokens == 3
    steps = metric(chaos_server, "modelpool_step_seconds_count", model="slow", kind="decode") - steps_before
    assert steps < 100, steps  # 2 to reach the cancel, a few while the abort travels, 2 for the last request


def test_deadline_frees_the_slot(client):
    with pytest.raises(ModelpoolError) as err:
        client.generate("go", model="builtin", max_new_tokens=2000, ignore_eos=True, timeout=1.0)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(client, "builtin")


def test_burst_with_cancellations_leaves_nothing_behind(client):
    def run(i):
        stream = client.stream(prompt=f"burst {i}", max_new_tokens=60 if i % 2 else 400, ignore_eos=True)
        if i % 2:
            return sum(len(p.token_ids) for p in stream)
        next(stream)
        stream.close()
        return None

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, range(16)))
    assert [r for r in results if r is not None] == [60] * 8
    wait_idle(client, "tiny")


def test_worker_death_fails_in_flight_with_unavailable_then_restarts(server, client):
    import os
    import signal

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=180)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        fragile = next(m for m in client.models() if m.name == "fragile").workers[0]
        restarts_metric = metric(server, "modelpool_worker_restarts_total", model="fragile", worker="fragile/0")
        stream = client.stream(prompt="go", model="fragile", max_new_tokens=500, ignore_eos=True)
        assert next(stream).token_ids
        os.kill(fragile.pid, signal.SIGKILL)
        with pytest.raises(ModelpoolError) as err:
            list(stream)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert "died" in err.value.message
        # Health: NOT_SERVING while the model has no ready worker, SERVING once it is back.
        statuses = []
        for reply in watch:
            statuses.append(reply.status)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                break
        watch.cancel()
    assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING]
    worker = next(m for m in client.models() if m.name == "fragile").workers[0]
    assert worker.state == pb.WORKER_STATE_READY and worker.restarts == 1 and worker.pid != fragile.pid
    assert "exited" in worker.last_error
    assert metric(server, "modelpool_worker_restarts_total", model="fragile", worker="fragile/0") == restarts_metric + 1
    assert metric(server, "modelpool_worker_up", model="fragile", worker="fragile/0") == 1
    assert client.generate("x", model="fragile", max_new_tokens=3, ignore_eos=True).usage.completion_tokens == 3
