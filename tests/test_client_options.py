"""The Python client's connection options against an in-process stand-in server that records what reaches it:
gRPC's own retries (unary only, on UNAVAILABLE), metadata and the bearer token, TLS and mutual TLS,
wait_for_ready, deadlines, and the one exception type. The real server is covered in test_clients.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest

from modelpool import TLS, AsyncClient, Client, ModelpoolError
from modelpool.v1 import generation_pb2 as pb
from modelpool.v1 import generation_pb2_grpc as pb_grpc
from tests.certs import CertificateAuthority
from tests.server_process import free_port


class StandIn(pb_grpc.GenerationServiceServicer):
    """Fails the first `fail_first` calls of each method with UNAVAILABLE, then answers; records metadata."""

    def __init__(self, fail_first: int = 0, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE):
        self.fail_first = fail_first
        self.code = code
        self.attempts = {"Generate": 0, "StreamGenerate": 0, "ListModels": 0}
        self.metadata: list[dict[str, str]] = []
        self.stream_cancelled = threading.Event()
        self.lock = threading.Lock()

    def _attempt(self, method, context):
        with self.lock:
            self.attempts[method] += 1
            self.metadata.append(dict(context.invocation_metadata()))
            failing = self.attempts[method] <= self.fail_first
        if failing:
            context.abort(self.code, f"{method}: not yet")

    def Generate(self, request, context):
        self._attempt("Generate", context)
        if request.prompt == "slow":
            time.sleep(5)
        return pb.GenerateResponse(text=f"echo {request.prompt}", model="stand-in")

    def StreamGenerate(self, request, context):
        self._attempt("StreamGenerate", context)
        context.add_callback(self.stream_cancelled.set)
        for i in range(3 if request.prompt == "short" else 1000):
            if not context.is_active():
                return
            yield pb.StreamGenerateResponse(text_delta=f"{i} ")
            time.sleep(0.01)

    def ListModels(self, request, context):
        self._attempt("ListModels", context)
        return pb.ListModelsResponse(models=[pb.ModelInfo(name="stand-in")])


def start(servicer, port=None, credentials=None):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    port = port or free_port()
    address = f"127.0.0.1:{port}"
    if credentials is None:
        server.add_insecure_port(address)
    else:
        server.add_secure_port(address, credentials)
    server.start()
    return server, address


@pytest.fixture
def stand_in():
    servicer = StandIn(fail_first=2)
    server, address = start(servicer)
    yield servicer, address
    server.stop(None)


def test_unary_calls_are_retried_on_unavailable_by_grpc(stand_in):
    servicer, address = stand_in
    with Client(address, timeout=30, retries=3) as client:
        assert client.generate("hi").text == "echo hi"
        assert client.models()[0].name == "stand-in"
    assert servicer.attempts["Generate"] == 3 and servicer.attempts["ListModels"] == 3


@pytest.mark.parametrize(
    ("code", "attempts"),
    [
        (grpc.StatusCode.CANCELLED, 3),  # what a stopping server answers for calls it had not handed out yet
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 1),
        (grpc.StatusCode.INVALID_ARGUMENT, 1),
    ],
)
def test_which_codes_are_retried(code, attempts):
    servicer = StandIn(fail_first=2, code=code)
    server, address = start(servicer)
    try:
        with Client(address, timeout=30, retries=3) as client:
            try:
                client.generate("hi")
            except ModelpoolError as error:
                assert error.code == code
    finally:
        server.stop(None)
    assert servicer.attempts["Generate"] == attempts


def test_no_retries_when_asked_and_one_exception_type(stand_in):
    servicer, address = stand_in
    with Client(address, timeout=30, retries=1) as client, pytest.raises(ModelpoolError) as err:
        client.generate("hi")
    assert servicer.attempts["Generate"] == 1
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.message == "Generate: not yet"
    assert str(err.value) == "UNAVAILABLE: Generate: not yet"


def test_streams_are_never_retried(stand_in):
    servicer, address = stand_in
    with Client(address, timeout=30, retries=5) as client, pytest.raises(ModelpoolError) as err:
        list(client.stream("hi"))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert servicer.attempts["StreamGenerate"] == 1


def test_async_client_retries_unary_only(stand_in):
    servicer, address = stand_in

    async def scenario():
        async with AsyncClient(address, timeout=30, retries=3) as client:
            reply = await client.generate("hi")
            with pytest.raises(ModelpoolError):
                async for _ in client.stream("hi"):
                    pass
            return reply

    assert asyncio.run(scenario()).text == "echo hi"
    assert servicer.attempts == {"Generate": 3, "StreamGenerate": 1, "ListModels": 0}


def test_token_and_metadata_reach_the_server():
    servicer = StandIn()
    server, address = start(servicer)
    try:
        with Client(address, token="s3cret", metadata=[("x-team", "search")]) as client:
            client.generate("hi", metadata=[("x-request-id", "r-1")])
        seen = servicer.metadata[-1]
        assert seen["authorization"] == "Bearer s3cret"
        assert seen["x-team"] == "search" and seen["x-request-id"] == "r-1"
    finally:
        server.stop(None)


def test_deadline_per_call_and_default():
    servicer = StandIn()
    server, address = start(servicer)
    try:
        with Client(address, timeout=0.2) as client:
            with pytest.raises(ModelpoolError) as err:
                client.generate("slow")
            assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            with pytest.raises(ModelpoolError) as err:
                client.generate("slow", timeout=0.1)
            assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert client.generate("fast", timeout=30).text == "echo fast"
    finally:
        server.stop(None)


def test_breaking_out_of_a_stream_cancels_the_call():
    servicer = StandIn()
    server, address = start(servicer)
    try:
        with Client(address, timeout=30) as client:
            for piece in client.stream("hi"):
                assert piece.text_delta == "0 "
                break
            assert servicer.stream_cancelled.wait(10)
    finally:
        server.stop(None)


def test_wait_for_ready_waits_for_the_server_to_come_up():
    port = free_port()
    address = f"127.0.0.1:{port}"
    with Client(address, timeout=30, retries=1) as client, pytest.raises(ModelpoolError) as err:
        client.generate("early")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE

    servicer = StandIn()
    holder = {}
    timer = threading.Timer(1.0, lambda: holder.update(server=start(servicer, port=port)[0]))
    timer.start()
    try:
        with Client(address, timeout=30, wait_for_ready=True, retries=1) as client:
            assert client.generate("late").text == "echo late"
    finally:
        timer.join()
        holder["server"].stop(None)


def make_certificates(directory):
    """A CA, a server certificate for 127.0.0.1 / localhost and a client certificate."""
    ca = CertificateAuthority(directory, "ca")
    for name, server in (("server", True), ("client", False)):
        ca.issue(name, server=server)
    return directory


def test_tls_and_mutual_tls(tmp_path):
    certs = make_certificates(tmp_path)
    read = lambda name: (certs / name).read_bytes()  # noqa: E731
    credentials = grpc.ssl_server_credentials(
        [(read("server.key"), read("server.pem"))], root_certificates=read("ca.pem"), require_client_auth=True
    )
    servicer = StandIn()
    server, address = start(servicer, credentials=credentials)
    try:
        mutual = TLS.from_files(ca=certs / "ca.pem", cert=certs / "client.pem", key=certs / "client.key")
        with Client(address, timeout=30, tls=mutual) as client:
            assert client.generate("secure").text == "echo secure"
        # Without a client certificate the handshake fails.
        with Client(address, timeout=30, retries=1, tls=TLS.from_files(ca=certs / "ca.pem")) as client:
            with pytest.raises(ModelpoolError) as err:
                client.generate("anonymous")
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
        # Plaintext to a TLS port fails too.
        with Client(address, timeout=30, retries=1) as client, pytest.raises(ModelpoolError):
            client.generate("plain")
    finally:
        server.stop(None)
    with pytest.raises(ValueError, match="both"):
        TLS.from_files(ca=certs / "ca.pem", cert=certs / "client.pem")


def test_cli_connection_flags_tls_and_token(tmp_path):
    """`modelpool generate` with --ca/--cert/--key (mutual TLS) and --token reaches a TLS server."""
    certs = make_certificates(tmp_path)
    credentials = grpc.ssl_server_credentials(
        [((certs / "server.key").read_bytes(), (certs / "server.pem").read_bytes())],
        root_certificates=(certs / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    servicer = StandIn()
    server, address = start(servicer, credentials=credentials)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "modelpool.cli", "generate", "short", "--raw", "--target", address,
             "--ca", str(certs / "ca.pem"), "--cert", str(certs / "client.pem"), "--key", str(certs / "client.key"),
             "--token", "cli-token"],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "0 1 2"
        assert servicer.metadata[-1]["authorization"] == "Bearer cli-token"
        plaintext = subprocess.run(
            [sys.executable, "-m", "modelpool.cli", "generate", "short", "--raw", "--target", address, "--timeout", "5"],
            capture_output=True, text=True, timeout=60,
        )
        assert plaintext.returncode == 1 and "modelpool: UNAVAILABLE" in plaintext.stderr
    finally:
        server.stop(None)
