"""OpenTelemetry tracing of calls, off unless configured.

It is on when the standard environment asks for it (OTEL_TRACES_EXPORTER = otlp or console, or an
OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT) and the optional packages are installed (`pip install
modelpool-server[tracing]`). Each call gets a SERVER span that continues the caller's trace when its metadata
carries a W3C `traceparent`, with events at the moments the server measured: queued (arrival), started (a
worker took it into its batch, prefill), first_token and finished.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

_LOGGER = logging.getLogger(__name__)
_tracer: Any = None


def wanted(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none" or env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return exporter in ("otlp", "console") or bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure(provider: Any = None) -> bool:
    """Set up tracing from the environment (or with `provider`, for tests); True when it is on."""
    global _tracer
    if provider is None and not wanted():
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        _LOGGER.warning(
            "OTEL_* asks for traces but opentelemetry is not installed: pip install modelpool-server[tracing]"
        )
        return False
    if provider is None:
        provider = TracerProvider(
            resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "modelpool")})
        )
        if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "console":
            exporter: Any = ConsoleSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()  # endpoint, headers and TLS from OTEL_EXPORTER_OTLP_*
        provider.add_span_processor(BatchSpanProcessor(exporter))
        _LOGGER.info("tracing on: %s exporter", type(exporter).__name__)
    _tracer = provider.get_tracer("modelpool")
    return True


def shutdown() -> None:
    """Flush the spans still buffered (at exit)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    getattr(provider, "shutdown", lambda: None)()


class CallSpan:
    """The span of one call; a no-op when tracing is off."""

    def __init__(self, method: str, metadata: Sequence[tuple[str, Any]] | None, request_id: str):
        self._span = None
        if _tracer is None:
            return
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
        parent = TraceContextTextMapPropagator().extract(carrier)
        self._span = _tracer.start_span(
            f"modelpool.v1.GenerationService/{method}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": "modelpool.v1.GenerationService",
                "rpc.method": method,
                "modelpool.request_id": request_id,
            },
        )

    def finish(self, code: str, fields: dict[str, Any], timings: Any = None) -> None:
        """End the span with the call's status, usage and the measured moments as events."""
        if self._span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        span = self._span
        span.set_attribute("rpc.grpc.status_code_name", code)
        for key in ("model", "worker", "prompt_tokens", "completion_tokens"):
            if fields.get(key) not in (None, ""):
                span.set_attribute(f"modelpool.{key}", fields[key])
        if timings is not None:
            moments = (("queued", timings.arrival), ("started", timings.start), ("first_token", timings.first_token))
            for name, at in moments:
                if at:
                    span.add_event(name, timestamp=int(at * 1e9))
            end = timings.last_token or None
            span.add_event("finished", {"code": code}, timestamp=int(end * 1e9) if end else None)
        if code != "OK":
            span.set_status(Status(StatusCode.ERROR, code))
        span.end()
