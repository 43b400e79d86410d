"""Channels to a modelpool server: TLS or plaintext, gRPC's own retry policy for unary calls, channel options."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

SERVICE = "modelpool.v1.GenerationService"
# Calls that gRPC may send again when the server answers UNAVAILABLE (draining, no worker ready, a worker died).
# StreamGenerate is left out: a stream may already have delivered text that a retry would repeat.
RETRIED_METHODS = ("Generate", "ListModels")
# The server sends its response headers only with the first response, so a refusal is trailers-only and gRPC
# may retry it. CANCELLED too: a server that is stopping answers calls it had queued but not yet handed to a
# handler with CANCELLED instead of UNAVAILABLE (grpc/grpc#41785); a call the caller cancelled, or whose
# deadline passed, is never retried.
RETRYABLE_CODES = ("UNAVAILABLE", "CANCELLED")
# gRPC itself caps maxAttempts at 5.
MAX_ATTEMPTS_CAP = 5

ChannelOptions = Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class TLS:
    """Transport security. No root certificates means the system's roots; a certificate chain and private key
    make it mutual TLS; `server_name` overrides the name checked against the server's certificate."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_files(
        cls,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
    ) -> TLS:
        """PEM files: `ca` to trust, `cert` and `key` to present (mutual TLS)."""
        if (cert is None) != (key is None):
            raise ValueError("mutual TLS needs both a certificate and its private key")

        def read(path: str | Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return cls(read(ca), read(cert), read(key), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def retry_service_config(max_attempts: int, load_balancing: str | None = None) -> str:
    """A service config that retries the unary calls on UNAVAILABLE with exponential back-off, and only them;
    with `load_balancing` ("round_robin", "pick_first") as the channel's policy over the target's addresses,
    and gRPC's client-side health checking (grpc.health.v1 Watch), which round_robin honours (pick_first does
    not): a replica that is draining or has no worker ready (NOT_SERVING) gets no new calls while others are
    up; when none is SERVING, calls fail UNAVAILABLE at once, ListModels too (to look at a replica that is
    still loading, use a client without `load_balancing`)."""
    config: dict[str, Any] = {"methodConfig": []}
    if load_balancing:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
        config["healthCheckConfig"] = {"serviceName": ""}
    if max_attempts > 1:
        config["methodConfig"].append(
            {
                "name": [{"service": SERVICE, "method": method} for method in RETRIED_METHODS],
                "retryPolicy": {
                    "maxAttempts": min(max_attempts, MAX_ATTEMPTS_CAP),
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": list(RETRYABLE_CODES),
                },
            }
        )
    return json.dumps(config)


def channel_options(
    attempts: int, tls: TLS | None, extra: ChannelOptions, load_balancing: str | None = None
) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.enable_retries", 1 if attempts > 1 else 0),
        ("grpc.service_config", retry_service_config(attempts, load_balancing)),
        # Long prompts and replies: the server accepts requests larger than gRPC's 4 MiB default.
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ]
    if tls is not None:
        options += tls.options()
    # The caller's options come last, so they win.
    return options + list(extra)


def as_tls(tls: TLS | bool | None) -> TLS | None:
    if tls is True:
        return TLS()
    return tls or None


def sync_channel(target: str, tls: TLS | None, options: list[tuple[str, Any]]) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, tls.credentials(), options=options)


def aio_channel(target: str, tls: TLS | None, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, tls.credentials(), options=options)
