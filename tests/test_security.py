"""Security on the gRPC port against live servers: TLS, mutual TLS, certificate rotation without dropping
connections, bearer tokens (missing, wrong, right, limited to models, in-flight per token), every request
limit, reflection off, and no secret in a log line or in /metrics."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import textwrap
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from modelpool import TLS, Client, ModelpoolError
from tests.certs import CertificateAuthority
from tests.helpers import SLOW_FAULT, tiny_and_slow_models, wait_until
from tests.server_process import ServerProcess
from tests.tools import go_env, go_workdir, require
from workers.faults import ENV as FAULTS_ENV

pytestmark = pytest.mark.slow

TOKENS = {"full": "tok-full-3f9a1c", "tiny-only": "tok-tiny-77b2e0", "one-at-a-time": "tok-one-5d41aa"}
ENV_TOKEN = "tok-env-c0ffee"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory, "ca")
    other = CertificateAuthority(directory, "other-ca")
    return {
        "dir": directory,
        "ca": ca,
        "other": other,
        "server": ca.issue("server", server=True),
        "client": ca.issue("client", server=False),
        "stranger": other.issue("stranger", server=False),
    }


@pytest.fixture(scope="module")
def secure_server(tmp_path_factory, tiny_dir, pki):
    """Mutual TLS, tokens from a file and from the environment, every limit set low, reflection off."""
    tmp = tmp_path_factory.mktemp("secure")
    tokens = tmp / "tokens.toml"
    tokens.write_text(
        textwrap.dedent(f"""
        [[tokens]]
        name = "full"
        token = "{TOKENS['full']}"

        [[tokens]]
        name = "tiny-only"
        token = "{TOKENS['tiny-only']}"
        models = ["tiny"]

        [[tokens]]
        name = "one-at-a-time"
        token = "{TOKENS['one-at-a-time']}"
        max_in_flight = 1
        """)
    )
    config = tmp / "modelpool.toml"
    config.write_text(
        textwrap.dedent(f"""
        [server]
        default_model = "tiny"
        reflection = false

        [tls]
        cert = "{pki['server'].cert}"
        key = "{pki['server'].key}"
        client_ca = "{pki['ca'].pem}"

        [auth]
        tokens_file = "{tokens}"
        max_in_flight_per_token = 8

        [limits]
        max_receive_message_bytes = 65536
        max_chat_messages = 4
        max_stop_sequences = 2
        max_stop_sequence_chars = 8
        max_concurrent_streams = 2
        """)
        + tiny_and_slow_models(tiny_dir, "max_prompt_tokens = 32\nmax_new_tokens = 16")
    )
    proc = ServerProcess(
        ["--config", str(config)],
        tmp / "server.log",
        env={FAULTS_ENV: SLOW_FAULT, "MODELPOOL_AUTH_TOKENS": f"env-token={ENV_TOKEN}"},
        tls=pki["ca"].pem,
        tls_client=pki["client"],
    )
    try:
        proc.wait_serving()
        yield proc
    finally:
        proc.stop()


def mtls(pki, *, client="client") -> TLS:
    return TLS.from_files(ca=pki["ca"].pem, cert=pki[client].cert, key=pki[client].key)


def client(server, pki, token="full", **kwargs) -> Client:
    options = {"timeout": 60, "tls": mtls(pki), "retries": 1, **kwargs}
    if token is not None:
        options["token"] = TOKENS.get(token, token)
    return Client(server.target, **options)


def error_of(call) -> ModelpoolError:
    with pytest.raises(ModelpoolError) as err:
        call()
    return err.value


# ------------------------------------------------------------------ TLS and mutual TLS


def test_mutual_tls_with_a_valid_client_certificate(secure_server, pki):
    with client(secure_server, pki) as c:
        assert c.generate("hello", max_new_tokens=4, ignore_eos=True).usage.completion_tokens == 4


def test_handshake_refuses_plaintext_no_certificate_and_a_foreign_one(secure_server, pki):
    refused = {
        "plaintext": Client(secure_server.target, timeout=10, retries=1, token=TOKENS["full"]),
        "no client certificate": Client(
            secure_server.target, timeout=10, retries=1, token=TOKENS["full"], tls=TLS.from_files(ca=pki["ca"].pem)
        ),
        "certificate of another CA": Client(
            secure_server.target, timeout=10, retries=1, token=TOKENS["full"], tls=mtls(pki, client="stranger")
        ),
    }
    for what, c in refused.items():
        with c:
            assert error_of(lambda c=c: c.generate("x", max_new_tokens=1)).code == grpc.StatusCode.UNAVAILABLE, what


def test_server_certificate_rotation_keeps_connections(secure_server, pki):
    """New certificate files (another CA's) are served to new connections without a restart, while a stream on
    an old connection goes on; SIGHUP re-reads them too."""
    original = (pki["server"].cert.read_bytes(), pki["server"].key.read_bytes())
    rotated = pki["other"].issue("server-rotated", server=True)
    trusts_other = TLS.from_files(ca=pki["other"].pem, cert=pki["client"].cert, key=pki["client"].key)

    def rotate(cert: bytes, key: bytes) -> None:
        # As a deployment tool would: new files renamed into place, the key first.
        for path, data in ((pki["server"].key, key), (pki["server"].cert, cert)):
            staged = path.with_suffix(".new")
            staged.write_bytes(data)
            os.replace(staged, path)

    def works(tls: TLS) -> bool:
        with Client(secure_server.target, timeout=10, retries=1, token=TOKENS["full"], tls=tls) as c:
            try:
                return c.generate("x", max_new_tokens=1, ignore_eos=True).usage.completion_tokens == 1
            except ModelpoolError:
                return False

    with client(secure_server, pki) as old:
        stream = old.stream("go", model="slow", max_new_tokens=400, ignore_eos=True)
        assert next(stream).token_ids
        try:
            rotate(rotated.cert.read_bytes(), rotated.key.read_bytes())
            wait_until(lambda: works(trusts_other), 30, "the rotated certificate served")
            assert not works(mtls(pki)), "a new connection still got the old certificate"
            # The stream that started before the rotation is still delivering.
            assert next(stream).token_ids and next(stream).token_ids
        finally:
            stream.cancel()
            rotate(*original)
            secure_server.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: works(mtls(pki)), 30, "the original certificate back")
    assert secure_server.proc.poll() is None
    assert "TLS: certificate reloaded" in secure_server.log()


# ------------------------------------------------------------------ tokens


def test_missing_and_wrong_tokens_are_unauthenticated(secure_server, pki):
    with client(secure_server, pki, token=None) as c:
        error = error_of(lambda: c.generate("x", max_new_tokens=1))
        assert error.code == grpc.StatusCode.UNAUTHENTICATED and "Bearer token is required" in error.message
        assert error_of(c.models).code == grpc.StatusCode.UNAUTHENTICATED
    with client(secure_server, pki, token="tok-full-3f9a1d") as c:  # one character off
        error = error_of(lambda: c.generate("x", max_new_tokens=1))
        assert error.code == grpc.StatusCode.UNAUTHENTICATED and "not valid" in error.message
        assert error_of(lambda: list(c.stream("x", max_new_tokens=1))).code == grpc.StatusCode.UNAUTHENTICATED


def test_right_tokens_from_the_file_and_the_environment(secure_server, pki):
    for token in (TOKENS["full"], ENV_TOKEN):
        with client(secure_server, pki, token=token) as c:
            assert c.generate("x", max_new_tokens=2, ignore_eos=True).usage.completion_tokens == 2
            assert {m.name for m in c.models()} == {"tiny", "slow"}


def test_health_needs_no_token(secure_server, pki):
    credentials = mtls(pki).credentials()
    with grpc.secure_channel(secure_server.target, credentials) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_token_limited_to_some_models(secure_server, pki):
    with client(secure_server, pki, token="tiny-only") as c:
        assert c.generate("x", model="tiny", max_new_tokens=1, ignore_eos=True).usage.completion_tokens == 1
        assert c.generate("x", max_new_tokens=1, ignore_eos=True).model == "tiny"  # the default model is tiny
        error = error_of(lambda: c.generate("x", model="slow", max_new_tokens=1))
        assert error.code == grpc.StatusCode.PERMISSION_DENIED
        assert error.message == "model: token 'tiny-only' may not use model 'slow'"


def test_requests_in_flight_per_token(secure_server, pki):
    with client(secure_server, pki, token="one-at-a-time") as c, client(secure_server, pki) as other:
        stream = c.stream("go", model="slow", max_new_tokens=400, ignore_eos=True)
        assert next(stream).token_ids
        error = error_of(lambda: c.generate("x", max_new_tokens=1))
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "token 'one-at-a-time' has 1 requests in flight (max_in_flight_per_token = 1)" in error.message
        # Another token is not held back by it.
        assert other.generate("x", max_new_tokens=1, ignore_eos=True).usage.completion_tokens == 1
        stream.cancel()
        wait_until(lambda: _accepted(c), 30, "the token's slot back")


def _accepted(c) -> bool:
    try:
        c.generate("x", max_new_tokens=1, ignore_eos=True)
        return True
    except ModelpoolError as error:
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        return False


# ------------------------------------------------------------------ limits


@pytest.mark.parametrize(
    ("call", "code", "message"),
    [
        (
            lambda c: c.generate("x" * 70_000, max_new_tokens=1),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "bytes is more than max_receive_message_bytes (65536)",
        ),
        (
            lambda c: c.chat([("user", "hi")] * 5, max_new_tokens=1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "chat.messages: 5 messages is more than max_chat_messages (4)",
        ),
        (
            lambda c: c.generate("x", max_new_tokens=1, stop_sequences=["a", "b", "c"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "stopping.stop_sequences: at most 2 are allowed (max_stop_sequences)",
        ),
        (
            lambda c: c.generate("x", max_new_tokens=1, stop_sequences=["123456789"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "stopping.stop_sequences[0]: longer than 8 characters (max_stop_sequence_chars)",
        ),
        (
            lambda c: c.generate("one two three " * 20, max_new_tokens=1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "is more than max_prompt_tokens (32) of model 'tiny'",
        ),
        (
            lambda c: c.generate("x", max_new_tokens=17),
            grpc.StatusCode.INVALID_ARGUMENT,
            "stopping.max_new_tokens: 17 is more than max_new_tokens (16) of model 'tiny'",
        ),
    ],
    ids=["message size", "chat messages", "stop sequences", "stop sequence length", "prompt tokens", "max_new_tokens"],
)
def test_each_limit_is_refused_naming_it(secure_server, pki, call, code, message):
    with client(secure_server, pki) as c:
        error = error_of(lambda: call(c))
        assert error.code == code
        assert message in error.message, error.message
        # At the limit it passes, and the server keeps serving.
        assert c.generate("x", max_new_tokens=16, ignore_eos=True).usage.completion_tokens == 16


def test_concurrent_streams_per_connection(secure_server, pki):
    """With max_concurrent_streams = 2, a third call on one connection waits for a free stream."""
    with client(secure_server, pki) as c, client(secure_server, pki) as observer:
        streams = []
        try:
            # One after the other, so that the first two hold the connection's two streams when the third comes.
            for _ in range(2):
                streams.append(c.stream("go", model="slow", max_new_tokens=400, ignore_eos=True))
                assert next(streams[-1]).token_ids
            streams.append(c.stream("go", model="slow", max_new_tokens=400, ignore_eos=True))
            time.sleep(1.0)  # room for the third to (wrongly) start; the assertion does not depend on its length
            assert _slow_outstanding(observer) == 2
            streams[0].cancel()
            assert next(streams[2]).token_ids  # it starts once a stream is free
            assert _slow_outstanding(observer) == 2
        finally:
            for stream in streams:
                stream.cancel()
        wait_until(lambda: _slow_outstanding(observer) == 0, 30, "slow idle")


def _slow_outstanding(c) -> int:
    (slow,) = [m for m in c.models() if m.name == "slow"]
    return sum(w.outstanding_requests for w in slow.workers)


def test_reflection_can_be_turned_off(secure_server, pki):
    with grpc.secure_channel(secure_server.target, mtls(pki).credentials()) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            metadata=[("authorization", f"Bearer {TOKENS['full']}")],
            timeout=10,
        )
        with pytest.raises(grpc.RpcError) as err:
            list(replies)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_go_client_with_mutual_tls_and_a_token(secure_server, pki, tmp_path):
    binary = tmp_path / "modelpool-chat"
    built = subprocess.run(
        [require("go"), "build", "-o", str(binary), "./cmd/modelpool-chat"],
        cwd=go_workdir(), env=go_env(), capture_output=True, text=True, timeout=900,
    )
    assert built.returncode == 0, built.stderr
    common = [str(binary), "-target", secure_server.target, "-ca", str(pki["ca"].pem), "-max-new-tokens", "4"]
    ok = subprocess.run(
        [*common, "-cert", str(pki["client"].cert), "-key", str(pki["client"].key), "-usage", "hi"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "MODELPOOL_TOKEN": TOKENS["full"]},
    )
    assert ok.returncode == 0, ok.stderr
    assert "completion_tokens=" in ok.stderr
    no_token = subprocess.run(
        [*common, "-cert", str(pki["client"].cert), "-key", str(pki["client"].key), "hi"],
        capture_output=True, text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "MODELPOOL_TOKEN"},
    )
    assert no_token.returncode == 1 and "Unauthenticated" in no_token.stderr


def test_no_secret_in_logs_or_metrics(secure_server, pki):
    with client(secure_server, pki, token="tok-wrong-000000") as c:
        error_of(lambda: c.generate("x", max_new_tokens=1))
    metrics = urllib.request.urlopen(secure_server.metrics_url, timeout=10).read().decode()
    assert "modelpool_requests_total" in metrics
    log = secure_server.log()
    key_material = pki["server"].key.read_text().splitlines()[1]
    for secret in (*TOKENS.values(), ENV_TOKEN, "tok-wrong-000000", key_material, "PRIVATE KEY"):
        assert secret not in log, secret
        assert secret not in metrics, secret
    assert "token auth (4 tokens)" in log and "mutual TLS" in log


@pytest.fixture(scope="module")
def tls_only_server(tmp_path_factory, tiny_dir, pki):
    """TLS without client certificates, and /metrics over TLS too."""
    tmp = tmp_path_factory.mktemp("tls-only")
    proc = ServerProcess(
        ["--model", str(tiny_dir), "--name", "tiny", "--threads", "1", "--tls-cert", str(pki["server"].cert),
         "--tls-key", str(pki["server"].key), "--metrics-tls"],
        tmp / "server.log",
        tls=pki["ca"].pem,
    )
    try:
        proc.wait_serving()
        yield proc
    finally:
        proc.stop()


def test_tls_without_client_certificates_and_metrics_over_tls(tls_only_server, pki):
    with Client(tls_only_server.target, timeout=60, tls=TLS.from_files(ca=pki["ca"].pem)) as c:
        assert c.generate("x", max_new_tokens=2, ignore_eos=True).usage.completion_tokens == 2
    with Client(tls_only_server.target, timeout=10, retries=1) as plain:
        assert error_of(lambda: plain.generate("x", max_new_tokens=1)).code == grpc.StatusCode.UNAVAILABLE
    https = tls_only_server.metrics_url.replace("http://", "https://")
    context = ssl.create_default_context(cafile=str(pki["ca"].pem))
    assert "modelpool_requests_total" in urllib.request.urlopen(https, timeout=10, context=context).read().decode()
    with pytest.raises(OSError):
        urllib.request.urlopen(tls_only_server.metrics_url, timeout=10).read()
