"""What a hostile client found, each reproduced through gRPC: oversized and undecodable input, echoed values,
float32 edges, metric labels, clients that stop reading. Each test failed before its fix."""

from __future__ import annotations

import concurrent.futures

import grpc
import numpy as np
import pytest

from modelpool import build_request
from modelpool.v1 import generation_pb2 as pb
from modelpool.v1 import generation_pb2_grpc as pb_grpc
from tests.helpers import as_stream_request, load, metric, model_info, wait_idle, wait_until

METHODS = {
    "Generate": (pb.GenerateRequest, pb.GenerateResponse),
    "StreamGenerate": (pb.StreamGenerateRequest, pb.StreamGenerateResponse),
    "ListModels": (pb.ListModelsRequest, pb.ListModelsResponse),
}


@pytest.fixture
def channel(chaos_server):
    with grpc.insecure_channel(chaos_server.target) as channel:
        yield channel


def raw_call(channel, method: str, data: bytes):
    """Send bytes as the request of `method`, as a broken or hostile client would; returns the reply or error."""
    path = f"/modelpool.v1.GenerationService/{method}"
    try:
        if method == "StreamGenerate":
            return list(channel.unary_stream(path)(data, timeout=30))
        return channel.unary_unary(path)(data, timeout=30)
    except grpc.RpcError as error:
        return error


def call(stub, request, method="Generate", **kwargs):
    try:
        if method == "Generate":
            return stub.Generate(request, timeout=60, **kwargs)
        return list(stub.StreamGenerate(as_stream_request(request), timeout=60, **kwargs))
    except grpc.RpcError as error:
        return error


GOOD = pb.GenerateRequest(prompt="hi", stopping=pb.StoppingCriteria(max_new_tokens=2)).SerializeToString()
UNDECODABLE = {
    "bad utf-8": GOOD.replace(b"hi", b"\xff\xfe"),
    "truncated": GOOD[:-1],
    "corrupt": b"\x0a\xff\xff\xff\xff\xff",
}


@pytest.mark.parametrize(
    "method, kind",
    # ListModelsRequest has no string field: bad UTF-8 in an unknown field is a valid message there.
    [(m, k) for m in METHODS for k in UNDECODABLE if (m, k) != ("ListModels", "bad utf-8")],
)
def test_undecodable_request_is_invalid_argument_with_one_log_line(chaos_server, channel, method, kind):
    data = UNDECODABLE[kind]
    before = chaos_server.log().count("\n")
    error = raw_call(channel, method, data)
    assert isinstance(error, grpc.RpcError), error
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith("request: not a valid modelpool.v1."), error.details()
    wait_until(lambda: "refused an undecodable" in chaos_server.log().split("\n", before)[-1], 10, "the log line")
    new_log = "\n".join(chaos_server.log().splitlines()[before:])
    assert "Traceback" not in new_log and "ERROR" not in new_log, new_log


def test_huge_model_name_gets_not_found_with_the_name_shortened(channel):
    stub = pb_grpc.GenerationServiceStub(channel)
    error = call(stub, pb.GenerateRequest(prompt="hi", model="m" * 100_000))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "(100000 characters)" in error.details() and len(error.details()) < 1024


def test_huge_stop_sequence_is_refused_with_a_short_message(channel):
    stub = pb_grpc.GenerationServiceStub(channel)
    request = pb.GenerateRequest(prompt="hi", stopping=pb.StoppingCriteria(stop_sequences=["s" * 200_000]))
    error = call(stub, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("stopping.stop_sequences[0]:") and len(error.details()) < 1024


@pytest.mark.parametrize("method", ["Generate", "StreamGenerate"])
@pytest.mark.parametrize("kind", ["prompt", "chat"])
def test_input_too_large_for_the_context_is_refused_by_its_size(channel, method, kind):
    stub = pb_grpc.GenerationServiceStub(channel)
    text = "word " * 600_000  # 3 MB
    if kind == "prompt":
        request = pb.GenerateRequest(prompt=text)
    else:
        request = build_request(messages=[("system", "be brief"), ("user", text)])
    error = call(stub, request, method)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    expected = "prompt: 3000000 bytes" if kind == "prompt" else "chat.messages: 3000008 bytes"  # + "be brief"
    assert error.details().startswith(f"{expected} is more than model 'tiny' takes"), error.details()


def test_a_full_model_refuses_before_tokenizing(chaos_server, channel):
    """Admission comes first: while `slow` is full, even a prompt that tokenizing would refuse (too many
    tokens for the context, under the byte limit) gets RESOURCE_EXHAUSTED, so nothing was spent on it."""
    stub = pb_grpc.GenerationServiceStub(channel)
    long = build_request(pb.StreamGenerateRequest, prompt="go", model="slow", max_new_tokens=400, ignore_eos=True)
    capacity = 2 * 16 + 8  # max_batch_size x workers + max_queue
    held = [stub.StreamGenerate(long, timeout=120) for _ in range(capacity)]
    try:
        wait_until(lambda: load(chaos_server.target, "slow")[1] == capacity, what="slow full")
        too_long = pb.GenerateRequest(prompt="word " * 1000, model="slow")  # 1000 tokens, context 512
        assert call(stub, too_long).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for stream in held:
            stream.cancel()
    wait_idle(chaos_server.target, "slow")
    assert call(stub, too_long).code() == grpc.StatusCode.INVALID_ARGUMENT  # and tokenized once there is room


def _float32_beyond(value: float, direction: float) -> float:
    return float(np.nextafter(np.float32(value), np.float32(direction)))


EDGES = [  # field, documented lowest, documented highest
    ("temperature", 1e-4, 100.0),
    ("top_p", 1e-6, 1.0),
    ("repetition_penalty", 1e-3, 100.0),
]


@pytest.mark.parametrize("field, low, high", EDGES)
def test_documented_edges_are_accepted_and_one_step_beyond_refused(channel, field, low, high):
    stub = pb_grpc.GenerationServiceStub(channel)

    def request(value):
        sampling = pb.SamplingParameters(do_sample=True, seed=1, **{field: value})
        return pb.GenerateRequest(prompt="edge", sampling=sampling, stopping=pb.StoppingCriteria(max_new_tokens=2))

    for value in (low, high):
        reply = call(stub, request(value))
        assert not isinstance(reply, grpc.RpcError), (field, value, reply.details())
        assert reply.usage.completion_tokens >= 1
    for value in (_float32_beyond(low, 0.0), _float32_beyond(high, 1e9)):
        error = call(stub, request(value))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith(f"sampling.{field}:")


def test_deadline_cancel_and_abort_are_counted_right(chaos_server, channel):
    """An expired deadline counts as DEADLINE_EXCEEDED, a cancel as CANCELLED, and neither enters the end-to-end
    latency histogram, which only finished requests do."""
    stub = pb_grpc.GenerationServiceStub(channel)

    def count(code, method="Generate"):
        return metric(chaos_server, "modelpool_requests_total", model="slow", method=method, code=code)

    def e2e():
        return metric(chaos_server, "modelpool_e2e_request_latency_seconds_count", model="slow")

    before = {code: count(code) for code in ("DEADLINE_EXCEEDED", "CANCELLED", "OK")}
    cancelled_before = count("CANCELLED", "StreamGenerate")
    e2e_before = e2e()
    long = build_request(prompt="go", model="slow", max_new_tokens=400, ignore_eos=True)
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(long, timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stream = stub.StreamGenerate(build_request(pb.StreamGenerateRequest, prompt="go", model="slow", max_new_tokens=400, ignore_eos=True), timeout=60)
    next(stream)
    stream.cancel()
    stub.Generate(build_request(prompt="go", model="slow", max_new_tokens=3, ignore_eos=True), timeout=60)
    wait_idle(chaos_server.target, "slow")
    wait_until(lambda: count("DEADLINE_EXCEEDED") - before["DEADLINE_EXCEEDED"] == 3, 10, "3 deadlines counted")
    wait_until(lambda: count("CANCELLED", "StreamGenerate") - cancelled_before == 1, 10, "1 cancel counted")
    assert count("CANCELLED") == before["CANCELLED"]  # no deadline was counted as a cancel
    assert count("OK") - before["OK"] == 1
    assert e2e() - e2e_before == 1  # only the finished request


def test_clients_that_stop_reading_hold_no_slot_and_block_no_one(chaos_server):
    """Streams whose clients never read (a tiny receive window) still finish in their worker at max_new_tokens
    and free their slots, other requests complete meanwhile, and cancelling them later logs no error."""
    log_start = len(chaos_server.log())
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    channels = [grpc.insecure_channel(chaos_server.target, options=options) for _ in range(16)]
    request = build_request(pb.StreamGenerateRequest, prompt="stall " * 20, model="tiny", max_new_tokens=300, ignore_eos=True)
    try:
        stalled = [pb_grpc.GenerationServiceStub(c).StreamGenerate(request, timeout=120) for c in channels]
        # 16 unread streams fill both workers' batches; yet every sequence finishes and leaves its worker ...
        wait_until(lambda: load(chaos_server.target, "tiny") == (0, 0), 60, "unread streams finished in the workers")
        # ... and a reader on its own connection is served at once.
        with grpc.insecure_channel(chaos_server.target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                replies = list(pool.map(lambda i: stub.Generate(build_request(prompt=f"{i}", max_new_tokens=20, ignore_eos=True), timeout=60), range(8)))
        assert [r.usage.completion_tokens for r in replies] == [20] * 8
        # The unread streams still deliver everything once read.
        first = stalled.pop()
        assert sum(len(p.token_ids) for p in first) == 300
        for stream in stalled:
            stream.cancel()
    finally:
        for c in channels:
            c.close()
    wait_until(lambda: metric(chaos_server, "modelpool_requests_in_flight", model="tiny") == 0, 10, "in-flight 0")
    new_log = chaos_server.log()[log_start:]
    assert "ExecuteBatchError" not in new_log and "Traceback" not in new_log, new_log[-3000:]
    assert all(w.state == pb.WORKER_STATE_READY for w in model_info(chaos_server.target, "tiny").workers)
