"""Bearer-token auth on the gRPC port, in one server interceptor: who may call, which models each token may
use, and how many requests one token may have in flight.

Tokens come from a TOML file or an environment variable, never from the command line (where `ps` shows them),
and never appear in a log line or a metric: a token is known there by its name.

    # tokens file
    [[tokens]]
    name = "search-team"           # how logs and errors refer to this token
    token = "…"                    # the secret itself
    models = ["smollm2"]           # optional: the models it may use (default: all)
    max_in_flight = 16             # optional: overrides auth.max_in_flight_per_token

    # or, in the environment: MODELPOOL_AUTH_TOKENS="search-team=…,batch-jobs=…"
"""

from __future__ import annotations

import hmac
import os
import tomllib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from service.config import AuthConfig, ConfigError
from service.errors import quoted

# Probes must reach health without a token.
_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
# Methods whose request names a model (so a token's model list applies) and that take a worker slot.
_MODEL_METHODS = ("/modelpool.v1.GenerationService/Generate", "/modelpool.v1.GenerationService/StreamGenerate")


@dataclass(frozen=True)
class Token:
    name: str
    secret: bytes = field(repr=False)
    models: frozenset[str] | None = None  # None: every model
    max_in_flight: int = 0


def load_tokens(config: AuthConfig, environ: Mapping[str, str] | None = None) -> list[Token]:
    """Every configured token; none means auth is off."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    tokens: list[Token] = []
    if config.tokens_file:
        try:
            with open(config.tokens_file, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"auth.tokens_file: {exc}") from exc
        for i, entry in enumerate(data.get("tokens", [])):
            where = f"auth.tokens_file: tokens[{i}]"
            unknown = set(entry) - {"name", "token", "models", "max_in_flight"}
            if unknown:
                raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
            if not entry.get("name") or not entry.get("token"):
                raise ConfigError(f"{where}: name and token are needed")
            models = entry.get("models")
            tokens.append(
                Token(
                    entry["name"],
                    entry["token"].encode(),
                    frozenset(models) if models is not None else None,
                    int(entry.get("max_in_flight", 0)),
                )
            )
        if not tokens:
            raise ConfigError(f"auth.tokens_file: {config.tokens_file} has no [[tokens]]")
    if config.tokens_env and env.get(config.tokens_env):
        for i, item in enumerate(env[config.tokens_env].split(",")):
            name, sep, secret = item.strip().partition("=")
            if not sep or not name or not secret:
                raise ConfigError(f"{config.tokens_env}: entry {i + 1} is not name=token")
            tokens.append(Token(name, secret.encode()))
    names = [t.name for t in tokens]
    if len(set(names)) != len(names):
        raise ConfigError(f"auth: duplicate token names {sorted(n for n, c in Counter(names).items() if c > 1)}")
    return tokens


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks `authorization: Bearer <token>` on every call but health; a missing or wrong token is
    UNAUTHENTICATED, a model outside the token's list PERMISSION_DENIED, one request too many in flight for the
    token RESOURCE_EXHAUSTED."""

    def __init__(self, tokens: list[Token], default_model: str, max_in_flight_per_token: int = 0):
        self._tokens = tokens
        self._default_model = default_model
        self._default_limit = max_in_flight_per_token
        self.in_flight: Counter[str] = Counter()

    def identify(self, presented: str) -> Token | None:
        """The token whose secret an `authorization` header value carries, or None."""
        if not presented.startswith("Bearer "):
            return None
        secret = presented[len("Bearer ") :].encode()
        found = None
        # Compare with every token, in constant time each, so timing tells nothing about which one nearly matched.
        for token in self._tokens:
            if hmac.compare_digest(secret, token.secret):
                found = token
        return found

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_OPEN_PREFIXES):
            return handler
        metadata = handler_call_details.invocation_metadata or ()
        presented = next((value for key, value in metadata if key == "authorization"), None)
        if presented is None:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, "authorization: a Bearer token is required")
        token = self.identify(presented) if isinstance(presented, str) else None
        if token is None:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, "authorization: the token is not valid")
        if method in _MODEL_METHODS:
            return self._guarded(handler, token)
        return handler

    def _guarded(self, handler: grpc.RpcMethodHandler, token: Token) -> grpc.RpcMethodHandler:
        # The service's handlers are coroutines (StreamGenerate writes with context.write), so one wrapper fits both.
        inner: Any = handler.unary_unary or handler.unary_stream
        limit = token.max_in_flight or self._default_limit

        async def behavior(request, context):
            model = getattr(request, "model", None)
            if model is not None and token.models is not None and (model or self._default_model) not in token.models:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"model: token {quoted(token.name)} may not use model {quoted(model or self._default_model)}",
                )
            if limit and self.in_flight[token.name] >= limit:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"token {quoted(token.name)} has {self.in_flight[token.name]} requests in flight "
                    f"(max_in_flight_per_token = {limit})",
                )
            self.in_flight[token.name] += 1
            try:
                return await inner(request, context)
            finally:
                self.in_flight[token.name] -= 1

        make = _HANDLER_KINDS[(False, bool(handler.response_streaming))]
        return make(behavior, handler.request_deserializer, handler.response_serializer)


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call with `code`."""

    async def refuse(request_or_iterator, context):
        await context.abort(code, message)

    make = _HANDLER_KINDS[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(refuse, handler.request_deserializer, handler.response_serializer)


# A method handler's constructor by (request streaming, response streaming).
_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
