"""Unit tests of service.errors: the error classes, from_worker, code_of, quoted and capped, and the
status_mapped decorator against a fake servicer context whose `abort` raises like grpc.aio's does."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from service import errors
from service.errors import (
    MAX_DETAILS_CHARS,
    MAX_QUOTED_CHARS,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    capped,
    code_of,
    from_worker,
    quoted,
    status_mapped,
)
from workers.messages import ErrorKind

# ---------------------------------------------------------------- error classes


@pytest.mark.parametrize(
    "error, code",
    [
        (ServiceError("m"), grpc.StatusCode.INTERNAL),
        (InvalidArgument("field.name", "m"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("m"), grpc.StatusCode.NOT_FOUND),
        (ResourceExhausted("m"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (Unavailable("m"), grpc.StatusCode.UNAVAILABLE),
        (Internal("m"), grpc.StatusCode.INTERNAL),
    ],
)
def test_each_error_class_has_its_code(error, code):
    assert error.code == code
    assert code_of(error) == code


def test_error_message_is_kept_and_invalid_argument_names_its_field():
    error = NotFound("no such model")
    assert error.message == "no such model" == str(error)
    assert error.args == ("no such model",)
    error = InvalidArgument("sampling.top_p", "is wrong")
    assert error.field == "sampling.top_p"
    assert error.message == "sampling.top_p: is wrong" == str(error)
    assert isinstance(error, ServiceError)


@pytest.mark.parametrize("exc", [ValueError("x"), RuntimeError(), KeyboardInterrupt(), grpc.aio.AbortError()])
def test_code_of_anything_else_is_internal(exc):
    assert code_of(exc) == grpc.StatusCode.INTERNAL


# ---------------------------------------------------------------- from_worker


def test_from_worker_invalid_argument_blames_max_new_tokens():
    error = from_worker(ErrorKind.INVALID_ARGUMENT, "needs 900 tokens, the batch holds 400")
    assert type(error) is InvalidArgument
    assert error.field == "stopping.max_new_tokens"
    assert error.message == "stopping.max_new_tokens: needs 900 tokens, the batch holds 400"
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT


def test_from_worker_resource_exhausted():
    error = from_worker(ErrorKind.RESOURCE_EXHAUSTED, "out of memory")
    assert type(error) is ResourceExhausted
    assert error.message == "out of memory"
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("kind", [ErrorKind.INTERNAL, None])
def test_from_worker_internal_and_unknown(kind):
    error = from_worker(kind, "boom")
    assert type(error) is Internal
    assert error.message == "boom"
    assert error.code == grpc.StatusCode.INTERNAL


@pytest.mark.parametrize("kind", [ErrorKind.INTERNAL, None])
def test_from_worker_internal_without_message_says_so(kind):
    error = from_worker(kind, "")
    assert type(error) is Internal
    assert error.message == "the worker failed this request"


def test_from_worker_keeps_an_empty_message_of_the_other_kinds():
    assert from_worker(ErrorKind.RESOURCE_EXHAUSTED, "").message == ""
    assert from_worker(ErrorKind.INVALID_ARGUMENT, "").message == "stopping.max_new_tokens: "


# ---------------------------------------------------------------- quoted and capped


def test_limits():
    assert (MAX_DETAILS_CHARS, MAX_QUOTED_CHARS) == (1024, 64)


def test_quoted_short_values_are_their_repr():
    assert quoted("tiny") == "'tiny'"
    assert quoted(42) == "42"
    assert quoted(None) == "None"


def test_quoted_at_the_limit_is_whole():
    value = "a" * (MAX_QUOTED_CHARS - 2)  # repr adds the two quotes
    assert quoted(value) == repr(value)
    assert len(quoted(value)) == MAX_QUOTED_CHARS


def test_quoted_string_over_the_limit_is_cut_and_says_its_length():
    value = "a" * (MAX_QUOTED_CHARS - 1)  # repr is one over the limit
    assert quoted(value) == "'" + "a" * (MAX_QUOTED_CHARS - 2) + f"… ({MAX_QUOTED_CHARS - 1} characters)"
    assert quoted("x" * 10_000) == "'" + "x" * 62 + "… (10000 characters)"


def test_quoted_other_values_over_the_limit_are_cut_without_a_length():
    value = list(range(100))
    assert quoted(value) == repr(value)[:63] + "…"


def test_quoted_with_its_own_limit():
    assert quoted("abcdef", limit=8) == "'abcdef'"
    assert quoted("abcdefg", limit=8) == "'abcdef… (7 characters)"
    assert quoted(123456789, limit=5) == "1234…"


def test_capped():
    assert capped("") == ""
    assert capped("a" * MAX_DETAILS_CHARS) == "a" * MAX_DETAILS_CHARS
    assert capped("a" * (MAX_DETAILS_CHARS + 1)) == "a" * (MAX_DETAILS_CHARS - 1) + "…"
    assert len(capped("b" * 100_000)) == MAX_DETAILS_CHARS
    assert capped("abcd", limit=4) == "abcd"
    assert capped("abcde", limit=4) == "abc…"


# ---------------------------------------------------------------- status_mapped


class FakeContext:
    """What status_mapped touches of a grpc.aio.ServicerContext: `abort`, which records and raises AbortError."""

    def __init__(self):
        self.aborts: list[tuple[grpc.StatusCode, str]] = []

    async def abort(self, code, details=""):
        self.aborts.append((code, details))
        raise grpc.aio.AbortError()


class Servicer:
    def __init__(self, outcome):
        self.outcome = outcome
        self.calls: list = []

    @status_mapped
    async def Handle(self, request, context):
        """The handler's docstring."""
        self.calls.append((request, context))
        await asyncio.sleep(0)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


def call(outcome):
    """Run Servicer(outcome).Handle once; returns (result or raised exception, context, servicer)."""
    servicer, context = Servicer(outcome), FakeContext()
    request = object()

    async def run():
        try:
            return await servicer.Handle(request, context)
        except BaseException as exc:  # noqa: BLE001
            return exc

    result = asyncio.run(run())
    assert servicer.calls == [(request, context)]
    return result, context


def test_status_mapped_keeps_the_handler_name_and_doc():
    assert Servicer.Handle.__name__ == "Handle"
    assert Servicer.Handle.__doc__ == "The handler's docstring."
    assert Servicer.Handle.__wrapped__.__name__ == "Handle"


def test_success_passes_the_response_through_without_abort():
    response = object()
    result, context = call(response)
    assert result is response
    assert context.aborts == []


@pytest.mark.parametrize(
    "error, code",
    [
        (InvalidArgument("prompt", "must not be empty"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("model 'x' is not served"), grpc.StatusCode.NOT_FOUND),
        (ResourceExhausted("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (Unavailable("shutting down"), grpc.StatusCode.UNAVAILABLE),
        (Internal("worker died"), grpc.StatusCode.INTERNAL),
    ],
)
def test_service_error_aborts_with_its_code_and_message(error, code, caplog):
    with caplog.at_level(logging.DEBUG, logger=errors.__name__):
        result, context = call(error)
    assert isinstance(result, grpc.aio.AbortError)
    assert context.aborts == [(code, error.message)]
    assert caplog.records == []  # an expected failure is not logged as unexpected


def test_service_error_message_is_capped():
    error = NotFound("x" * 5000)
    result, context = call(error)
    assert isinstance(result, grpc.aio.AbortError)
    assert context.aborts == [(grpc.StatusCode.NOT_FOUND, "x" * (MAX_DETAILS_CHARS - 1) + "…")]


def test_other_exception_is_internal_and_logged(caplog):
    error = ValueError("bad thing")
    with caplog.at_level(logging.DEBUG, logger=errors.__name__):
        result, context = call(error)
    assert isinstance(result, grpc.aio.AbortError)
    assert context.aborts == [(grpc.StatusCode.INTERNAL, "internal error: ValueError: bad thing")]
    [record] = caplog.records
    assert record.name == "service.errors"
    assert record.levelno == logging.ERROR
    assert record.getMessage() == "unexpected error in a handler"
    assert record.exc_info[1] is error


def test_other_exception_message_is_capped():
    _result, context = call(KeyError("k" * 5000))
    [(code, details)] = context.aborts
    assert code == grpc.StatusCode.INTERNAL
    assert len(details) == MAX_DETAILS_CHARS
    assert details.startswith("internal error: KeyError: 'kkk")
    assert details.endswith("k…")


def test_abort_error_from_the_handler_is_re_raised_untouched():
    error = grpc.aio.AbortError()
    result, context = call(error)
    assert result is error
    assert context.aborts == []


def test_base_exceptions_are_not_mapped():
    result, context = call(asyncio.CancelledError())
    assert isinstance(result, asyncio.CancelledError)
    assert context.aborts == []
