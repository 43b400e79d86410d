"""Unit tests of service.convert: protobuf <-> plain Python at the gRPC edge, no server and no model.

parse_request is checked for both request messages: every field, the defaults (0 means default), each
float bound exactly and one float32 step beyond it (the code compares the float32 wire value against
the float32 of the bound), the errors naming the field, and the stop-sequence limits. The response
builders are checked field by field, with every finish reason.
"""

from __future__ import annotations

import math
import struct
from types import SimpleNamespace

import grpc
import pytest

from modelpool.v1 import generation_pb2 as pb
from service import convert
from service.convert import RequestLimits, parse_request

MAX_STOP_SEQUENCES = RequestLimits().max_stop_sequences
MAX_STOP_SEQUENCE_CHARS = RequestLimits().max_stop_sequence_chars
from service.errors import InvalidArgument
from service.worker_handle import WorkerState
from workers.messages import FinishReason, SamplingParams, SequenceEvent, StoppingParams

REQUESTS = [pb.GenerateRequest, pb.StreamGenerateRequest]


def f32(value: float) -> float:
    """`value` rounded to float32, as the wire carries it."""
    return struct.unpack("f", struct.pack("f", value))[0]


def f32_step(value: float, direction: int) -> float:
    """The float32 next to f32(value), one step up (+1) or down (-1); for positive values only."""
    bits = struct.unpack("I", struct.pack("f", value))[0]
    return struct.unpack("f", struct.pack("I", bits + direction))[0]


def invalid(request, field: str) -> InvalidArgument:
    """parse_request must refuse `request` naming `field`; returns the error."""
    with pytest.raises(InvalidArgument) as err:
        parse_request(request)
    assert err.value.field == field
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.message.startswith(field + ": ")
    assert str(err.value) == err.value.message
    return err.value


def sampling_request(request_type, **sampling):
    return request_type(prompt="x", sampling=pb.SamplingParameters(**sampling))


# ---------------------------------------------------------------- parse_request: inputs


@pytest.mark.parametrize("request_type", REQUESTS)
def test_prompt_request_with_every_field(request_type):
    request = request_type(
        model="tiny",
        prompt="Once upon",
        sampling=pb.SamplingParameters(
            do_sample=True, temperature=0.5, top_p=0.25, top_k=7, repetition_penalty=1.5, seed=42
        ),
        stopping=pb.StoppingCriteria(max_new_tokens=9, min_new_tokens=3, stop_sequences=["\n", "END"], ignore_eos=True),
        priority=-7,
    )
    parsed = parse_request(request)
    assert parsed == convert.ParsedRequest(
        model="tiny",
        prompt="Once upon",
        messages=None,
        sampling=SamplingParams(do_sample=True, temperature=0.5, top_p=0.25, top_k=7, repetition_penalty=1.5, seed=42),
        stopping=StoppingParams(max_new_tokens=9, min_new_tokens=3, stop_sequences=("\n", "END"), ignore_eos=True),
        explicit_max_new_tokens=True,
        priority=-7,
    )
    assert type(parsed.sampling.temperature) is float
    assert type(parsed.stopping.stop_sequences) is tuple


@pytest.mark.parametrize("request_type", REQUESTS)
def test_defaults_when_everything_is_zero(request_type):
    parsed = parse_request(request_type(prompt="hi"))
    assert parsed == convert.ParsedRequest(
        model="",
        prompt="hi",
        messages=None,
        sampling=SamplingParams(
            do_sample=False, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=None
        ),
        stopping=StoppingParams(max_new_tokens=0, min_new_tokens=0, stop_sequences=(), ignore_eos=False),
        explicit_max_new_tokens=False,
        priority=0,
    )


@pytest.mark.parametrize("request_type", REQUESTS)
def test_priority_bounds(request_type):
    for inside in (-100, 100):
        assert parse_request(request_type(prompt="x", priority=inside)).priority == inside
    for outside in (-101, 101):
        error = invalid(request_type(prompt="x", priority=outside), "priority")
        assert error.message == f"priority: {outside} is outside [-100, 100]"


@pytest.mark.parametrize("request_type", REQUESTS)
def test_explicit_zeros_are_defaults_but_seed_zero_is_a_seed(request_type):
    request = request_type(
        prompt="hi",
        sampling=pb.SamplingParameters(temperature=0.0, top_p=0.0, repetition_penalty=0.0, seed=0),
        stopping=pb.StoppingCriteria(max_new_tokens=0),
    )
    parsed = parse_request(request)
    assert (parsed.sampling.temperature, parsed.sampling.top_p, parsed.sampling.repetition_penalty) == (1.0, 1.0, 1.0)
    assert parsed.sampling.seed == 0
    assert parsed.sampling.seed is not None
    assert parsed.explicit_max_new_tokens is False


@pytest.mark.parametrize("request_type", REQUESTS)
def test_max_new_tokens_of_one_is_explicit(request_type):
    parsed = parse_request(request_type(prompt="hi", stopping=pb.StoppingCriteria(max_new_tokens=1)))
    assert parsed.stopping.max_new_tokens == 1
    assert parsed.explicit_max_new_tokens is True


@pytest.mark.parametrize("request_type", REQUESTS)
def test_chat_request_keeps_every_role_and_content_in_order(request_type):
    chat = pb.ChatMessages(
        messages=[
            pb.ChatMessage(role=pb.ROLE_SYSTEM, content="be brief"),
            pb.ChatMessage(role=pb.ROLE_USER, content="hi"),
            pb.ChatMessage(role=pb.ROLE_ASSISTANT, content="hello"),
            pb.ChatMessage(role=pb.ROLE_USER, content=""),
        ]
    )
    parsed = parse_request(request_type(model="m", chat=chat))
    assert parsed.prompt is None
    assert parsed.model == "m"
    assert parsed.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": ""},
    ]


@pytest.mark.parametrize("request_type", REQUESTS)
def test_missing_input_is_refused(request_type):
    error = invalid(request_type(model="m"), "input")
    assert error.message == "input: set either prompt or chat"


@pytest.mark.parametrize("request_type", REQUESTS)
def test_empty_prompt_is_refused(request_type):
    error = invalid(request_type(prompt=""), "prompt")
    assert error.message == "prompt: must not be empty"


@pytest.mark.parametrize("request_type", REQUESTS)
def test_empty_chat_is_refused(request_type):
    error = invalid(request_type(chat=pb.ChatMessages()), "chat.messages")
    assert error.message == "chat.messages: must not be empty"


@pytest.mark.parametrize("request_type", REQUESTS)
@pytest.mark.parametrize("role", [pb.ROLE_UNSPECIFIED, 7])
def test_unknown_role_is_refused_with_its_index(request_type, role):
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="a"), pb.ChatMessage(role=role)])
    error = invalid(request_type(chat=chat), "chat.messages[1].role")
    assert error.message == "chat.messages[1].role: must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT"


# ---------------------------------------------------------------- parse_request: float fields and their bounds

# field, low, high: the documented limits, in the order _number takes them.
FLOAT_FIELDS = [
    ("temperature", 1e-4, 100.0),
    ("top_p", 1e-6, 1.0),
    ("repetition_penalty", 1e-3, 100.0),
]


@pytest.mark.parametrize("request_type", REQUESTS)
@pytest.mark.parametrize("name, low, high", FLOAT_FIELDS)
def test_each_bound_itself_is_accepted(request_type, name, low, high):
    for bound in (low, high):
        parsed = parse_request(sampling_request(request_type, **{name: bound}))
        # The wire value is the float32 of the bound (1e-4 arrives as 9.99999974e-05), kept as it came.
        assert getattr(parsed.sampling, name) == f32(bound)


@pytest.mark.parametrize("request_type", REQUESTS)
@pytest.mark.parametrize("name, low, high", FLOAT_FIELDS)
def test_one_float32_step_beyond_a_bound_is_refused(request_type, name, low, high):
    below, above = f32_step(low, -1), f32_step(high, +1)
    assert below < f32(low) and above > f32(high)
    error = invalid(sampling_request(request_type, **{name: below}), f"sampling.{name}")
    assert error.message == f"sampling.{name}: {below:g} is outside [{low:g}, {high:g}]"
    error = invalid(sampling_request(request_type, **{name: above}), f"sampling.{name}")
    assert error.message == f"sampling.{name}: {above:g} is outside [{low:g}, {high:g}]"


@pytest.mark.parametrize("request_type", REQUESTS)
@pytest.mark.parametrize("name, low, high", FLOAT_FIELDS)
def test_one_float32_step_inside_a_bound_is_accepted(request_type, name, low, high):
    for inside in (f32_step(low, +1), f32_step(high, -1)):
        assert getattr(parse_request(sampling_request(request_type, **{name: inside})).sampling, name) == inside


@pytest.mark.parametrize("request_type", REQUESTS)
@pytest.mark.parametrize("name", ["temperature", "top_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused(request_type, name, value):
    error = invalid(sampling_request(request_type, **{name: value}), f"sampling.{name}")
    assert error.message == f"sampling.{name}: must be a finite number"


@pytest.mark.parametrize("request_type", REQUESTS)
def test_negative_numbers_are_refused(request_type):
    error = invalid(sampling_request(request_type, temperature=-1.0), "sampling.temperature")
    assert error.message == "sampling.temperature: -1 is outside [0.0001, 100]"


def test_number_defaults_and_checks_directly():
    # Also the default upper limit (none), which no field uses.
    assert convert._number(0.0, "f", 7.5, 1.0) == 7.5
    assert convert._number(1e300, "f", 7.5, 1.0) == 1e300
    assert convert._number(1.0, "f", 7.5, 1.0) == 1.0
    with pytest.raises(InvalidArgument, match=r"^f: 0.5 is outside \[1, inf\]$"):
        convert._number(0.5, "f", 7.5, 1.0)
    assert convert._float32(0.1) == f32(0.1) != 0.1


# ---------------------------------------------------------------- parse_request: stop sequences


@pytest.mark.parametrize("request_type", REQUESTS)
def test_stop_sequence_limits_are_inclusive(request_type):
    assert (MAX_STOP_SEQUENCES, MAX_STOP_SEQUENCE_CHARS) == (16, 256)
    stops = [f"s{i}" for i in range(MAX_STOP_SEQUENCES - 1)] + ["é" * MAX_STOP_SEQUENCE_CHARS]
    parsed = parse_request(request_type(prompt="x", stopping=pb.StoppingCriteria(stop_sequences=stops)))
    assert parsed.stopping.stop_sequences == tuple(stops)


@pytest.mark.parametrize("request_type", REQUESTS)
def test_too_many_stop_sequences_are_refused(request_type):
    stops = [f"s{i}" for i in range(MAX_STOP_SEQUENCES + 1)]
    error = invalid(
        request_type(prompt="x", stopping=pb.StoppingCriteria(stop_sequences=stops)), "stopping.stop_sequences"
    )
    assert error.message == "stopping.stop_sequences: at most 16 are allowed (max_stop_sequences)"


@pytest.mark.parametrize("request_type", REQUESTS)
def test_too_long_stop_sequence_is_refused_with_its_index(request_type):
    stops = ["a", "b" * (MAX_STOP_SEQUENCE_CHARS + 1)]
    error = invalid(
        request_type(prompt="x", stopping=pb.StoppingCriteria(stop_sequences=stops)), "stopping.stop_sequences[1]"
    )
    assert error.message == "stopping.stop_sequences[1]: longer than 256 characters (max_stop_sequence_chars)"


@pytest.mark.parametrize("request_type", REQUESTS)
def test_empty_stop_sequence_is_refused_with_its_index(request_type):
    stops = ["a", "b", ""]
    error = invalid(
        request_type(prompt="x", stopping=pb.StoppingCriteria(stop_sequences=stops)), "stopping.stop_sequences[2]"
    )
    assert error.message == "stopping.stop_sequences[2]: must not be empty"


# ---------------------------------------------------------------- responses

TIMINGS = SimpleNamespace(queue_seconds=0.25, time_to_first_token_seconds=0.5, total_seconds=1.75)
FINISH_REASONS = [
    (FinishReason.LENGTH, pb.FINISH_REASON_LENGTH),
    (FinishReason.END_OF_SEQUENCE, pb.FINISH_REASON_END_OF_SEQUENCE),
    (FinishReason.STOP_SEQUENCE, pb.FINISH_REASON_STOP_SEQUENCE),
    # Not in the protobuf enum.
    (FinishReason.ABORTED, pb.FINISH_REASON_UNSPECIFIED),
    (FinishReason.ERROR, pb.FINISH_REASON_UNSPECIFIED),
]


def events(finish: FinishReason = FinishReason.UNSPECIFIED) -> list[SequenceEvent]:
    return [
        SequenceEvent(1, token_ids=[5, 6], text="ab", prompt_tokens=99, completion_tokens=98),
        SequenceEvent(1, token_ids=[], text=""),
        SequenceEvent(1, token_ids=[7], text="c", finish_reason=finish, prompt_tokens=4, completion_tokens=3),
    ]


def test_unfinished_stream_response_has_text_and_tokens_only():
    response = convert.stream_response(events(), TIMINGS)
    assert response == pb.StreamGenerateResponse(text_delta="abc", token_ids=[5, 6, 7])
    assert not response.HasField("usage")
    assert not response.HasField("timings")
    assert response.finish_reason == pb.FINISH_REASON_UNSPECIFIED


@pytest.mark.parametrize("finish, expected", FINISH_REASONS)
def test_finished_stream_response_has_reason_usage_and_timings(finish, expected):
    response = convert.stream_response(events(finish), TIMINGS)
    assert response == pb.StreamGenerateResponse(
        text_delta="abc",
        token_ids=[5, 6, 7],
        finish_reason=expected,
        usage=pb.Usage(prompt_tokens=4, completion_tokens=3),
        timings=pb.Timings(queue_seconds=0.25, time_to_first_token_seconds=0.5, total_seconds=1.75),
    )
    assert response.HasField("usage") and response.HasField("timings")


def test_single_event_stream_response():
    response = convert.stream_response([SequenceEvent(2, token_ids=[1], text="z")], TIMINGS)
    assert response == pb.StreamGenerateResponse(text_delta="z", token_ids=[1])


@pytest.mark.parametrize(
    "finish, expected", [*FINISH_REASONS, (FinishReason.UNSPECIFIED, pb.FINISH_REASON_UNSPECIFIED)]
)
def test_generate_response_takes_every_field(finish, expected):
    response = convert.generate_response("tiny", events(finish), TIMINGS)
    assert response == pb.GenerateResponse(
        text="abc",
        finish_reason=expected,
        usage=pb.Usage(prompt_tokens=4, completion_tokens=3),
        timings=pb.Timings(queue_seconds=0.25, time_to_first_token_seconds=0.5, total_seconds=1.75),
        model="tiny",
        token_ids=[5, 6, 7],
    )


def test_finish_reason_values_match_the_protobuf_enum():
    for finish, expected in FINISH_REASONS[:3]:
        assert convert._finish_reason(finish) == expected == int(finish)
    assert convert._finish_reason(FinishReason.UNSPECIFIED) == pb.FINISH_REASON_UNSPECIFIED


# ---------------------------------------------------------------- list_models_response


def ready(dtype: str, cuda: str = "0", devices=("cuda:0",), summary=None):
    return SimpleNamespace(
        dtype=dtype, cuda_visible_devices=cuda, devices=devices, device_map_summary=summary or {"cuda:0": 3}
    )


def worker(
    index,
    state,
    ready_message=None,
    spec_cuda="",
    pid=1000,
    outstanding=(),
    running=0,
    restarts=0,
    last_error="",
    completed=0,
):
    return SimpleNamespace(
        index=index,
        pid=pid,
        state=state,
        ready=ready_message,
        spec=SimpleNamespace(cuda_visible_devices=spec_cuda),
        outstanding=set(outstanding),
        running=running,
        restarts=restarts,
        last_error=last_error,
        completed=completed,
    )


def served(source: str, context_length: int, has_chat_template: bool):
    return SimpleNamespace(
        config=SimpleNamespace(source=source), context_length=context_length, has_chat_template=has_chat_template
    )


def test_list_models_response_field_by_field():
    models = {
        "tiny": served("/models/tiny", 512, True),
        "other": served("builtin", 2048, False),
    }
    pools = {
        "tiny": SimpleNamespace(
            workers=[
                worker(0, WorkerState.STARTING, None, spec_cuda="5", pid=11),
                worker(
                    1,
                    WorkerState.READY,
                    ready("bfloat16", "1", ("cuda:0", "cuda:1"), {"cuda:0": 2, "cuda:1": 1}),
                    spec_cuda="1",
                    pid=12,
                    outstanding=(3, 4, 5),
                    running=2,
                    restarts=1,
                    last_error="old",
                    completed=7,
                ),
                worker(2, WorkerState.RESTARTING, ready("float32", "2"), spec_cuda="9", pid=13, last_error="died"),
                worker(3, WorkerState.STOPPED, None, spec_cuda="3", pid=14, restarts=4, completed=2**40),
            ]
        ),
        "other": SimpleNamespace(workers=[worker(0, WorkerState.STARTING, None, spec_cuda="", pid=21)]),
    }
    response = convert.list_models_response(models, pools, "tiny")
    expected = pb.ListModelsResponse(
        models=[
            pb.ModelInfo(
                name="tiny",
                source="/models/tiny",
                # The first worker that reported ready decides the dtype.
                dtype="bfloat16",
                context_length=512,
                has_chat_template=True,
                is_default=True,
                workers=[
                    pb.WorkerInfo(index=0, pid=11, state=pb.WORKER_STATE_STARTING, cuda_visible_devices="5"),
                    pb.WorkerInfo(
                        index=1,
                        pid=12,
                        state=pb.WORKER_STATE_READY,
                        cuda_visible_devices="1",
                        devices=["cuda:0", "cuda:1"],
                        device_map_summary={"cuda:0": 2, "cuda:1": 1},
                        outstanding_requests=3,
                        running_sequences=2,
                        restarts=1,
                        last_error="old",
                        completed_requests=7,
                    ),
                    # A worker that is not running has no pid.
                    pb.WorkerInfo(
                        index=2,
                        pid=0,
                        state=pb.WORKER_STATE_RESTARTING,
                        cuda_visible_devices="2",
                        devices=["cuda:0"],
                        device_map_summary={"cuda:0": 3},
                        last_error="died",
                    ),
                    pb.WorkerInfo(
                        index=3,
                        pid=0,
                        state=pb.WORKER_STATE_STOPPED,
                        cuda_visible_devices="3",
                        restarts=4,
                        completed_requests=2**40,
                    ),
                ],
            ),
            pb.ModelInfo(
                name="other",
                source="builtin",
                dtype="",
                context_length=2048,
                has_chat_template=False,
                is_default=False,
                workers=[pb.WorkerInfo(index=0, pid=21, state=pb.WORKER_STATE_STARTING, cuda_visible_devices="")],
            ),
        ]
    )
    assert response == expected, response


def test_list_models_response_without_models_is_empty():
    assert convert.list_models_response({}, {}, "tiny") == pb.ListModelsResponse()


@pytest.mark.parametrize("request_type", REQUESTS)
def test_configured_limits_apply(request_type):
    limits = RequestLimits(max_chat_messages=2, max_stop_sequences=1, max_stop_sequence_chars=3)
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hi")] * 3)
    with pytest.raises(InvalidArgument) as err:
        parse_request(request_type(chat=chat), limits)
    assert err.value.message == "chat.messages: 3 messages is more than max_chat_messages (2)"
    del chat.messages[2]
    assert len(parse_request(request_type(chat=chat), limits).messages) == 2
    with pytest.raises(InvalidArgument, match=r"at most 1 are allowed \(max_stop_sequences\)"):
        parse_request(request_type(prompt="x", stopping=pb.StoppingCriteria(stop_sequences=["a", "b"])), limits)
    with pytest.raises(InvalidArgument, match=r"longer than 3 characters \(max_stop_sequence_chars\)"):
        parse_request(request_type(prompt="x", stopping=pb.StoppingCriteria(stop_sequences=["abcd"])), limits)
    assert parse_request(request_type(prompt="x", stopping=pb.StoppingCriteria(stop_sequences=["abc"])), limits)

