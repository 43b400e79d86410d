"""Every Prometheus metric of the service. Workers only report numbers; the frontend owns the series.

Names follow Prometheus conventions and vLLM's vocabulary: prefix `modelpool_`,
seconds and bytes, counters end in `_total`.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app

from workers.messages import StepOutput, WorkerMemory

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter(
    "modelpool_requests_total", "Finished RPCs by model, method and gRPC status code.", ["model", "method", "code"]
)
QUEUE_TIME = Histogram(
    "modelpool_request_queue_seconds",
    "From arrival until a worker took the request into its batch.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "modelpool_time_to_first_token_seconds", "From arrival until the first token.", ["model"], buckets=_LATENCY_BUCKETS
)
INTER_TOKEN_LATENCY = Histogram(
    "modelpool_inter_token_latency_seconds",
    "Between consecutive tokens of one request.",
    ["model"],
    buckets=_TOKEN_LATENCY_BUCKETS,
)
E2E_LATENCY = Histogram(
    "modelpool_e2e_request_latency_seconds",
    "From arrival until the request finished.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
PROMPT_TOKENS = Counter("modelpool_prompt_tokens_total", "Prompt tokens of accepted requests.", ["model"])
GENERATION_TOKENS = Counter("modelpool_generation_tokens_total", "Generated tokens.", ["model"])
IN_FLIGHT = Gauge("modelpool_requests_in_flight", "Accepted requests not yet finished.", ["model"])
QUEUED = Gauge("modelpool_requests_queued", "Requests waiting in workers for a place in the running batch.", ["model"])
RUNNING = Gauge("modelpool_requests_running", "Sequences in running batches.", ["model"])
BATCH_SIZE = Histogram(
    "modelpool_batch_size", "Sequences in the batch of each decode step.", ["model"], buckets=_BATCH_BUCKETS
)
STEP_TIME = Histogram(
    "modelpool_step_seconds", "Duration of engine steps.", ["model", "kind"], buckets=_TOKEN_LATENCY_BUCKETS
)
WORKER_UP = Gauge(
    "modelpool_worker_up", "1 when the worker has its model loaded and takes requests.", ["model", "worker"]
)
WORKER_RESTARTS = Counter(
    "modelpool_worker_restarts_total", "Restarts after the worker process died.", ["model", "worker"]
)
WORKER_RUNNING = Gauge("modelpool_worker_running_sequences", "Sequences in this worker's batch.", ["model", "worker"])
WORKER_RSS = Gauge(
    "modelpool_worker_resident_memory_bytes", "Resident memory of the worker process.", ["model", "worker"]
)
_GPU_LABELS = ["model", "worker", "device"]
GPU_ALLOCATED = Gauge("modelpool_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated.", _GPU_LABELS)
GPU_RESERVED = Gauge("modelpool_gpu_memory_reserved_bytes", "torch.cuda.memory_reserved.", _GPU_LABELS)
GPU_MAX_ALLOCATED = Gauge("modelpool_gpu_memory_max_allocated_bytes", "torch.cuda.max_memory_allocated.", _GPU_LABELS)
GPU_TOTAL = Gauge("modelpool_gpu_memory_total_bytes", "Total memory of the device.", _GPU_LABELS)


class ModelSeries:
    """The per-request series of one model, bound once: `labels()` on every token costs more than it should."""

    def __init__(self, model: str):
        self.queue_time = QUEUE_TIME.labels(model)
        self.time_to_first_token = TIME_TO_FIRST_TOKEN.labels(model)
        self.inter_token_latency = INTER_TOKEN_LATENCY.labels(model)
        self.e2e_latency = E2E_LATENCY.labels(model)
        self.prompt_tokens = PROMPT_TOKENS.labels(model)
        self.generation_tokens = GENERATION_TOKENS.labels(model)
        self.in_flight = IN_FLIGHT.labels(model)


class _MetricsServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    # socketserver's default backlog of 5 drops connections when many scrapers (or probes) arrive at once.
    request_queue_size = 128
    ssl_context: ssl.SSLContext | None = None

    def finish_request(self, request, client_address):
        # The TLS handshake runs here, on the connection's own thread, so a slow client cannot stall accepting.
        if self.ssl_context is not None:
            request.settimeout(10)
            try:
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                return  # not TLS, or a failed handshake: nothing to answer
        super().finish_request(request, client_address)


class _MetricsServer6(_MetricsServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002  (one line per scrape is noise)
        pass


def serve(host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
    """Expose /metrics over HTTP (HTTPS with `ssl_context`) on its own port (a daemon thread)."""
    server_class: type[_MetricsServer] = _MetricsServer6 if ":" in host else _MetricsServer
    server = make_server(host, port, make_wsgi_app(), server_class=server_class, handler_class=_QuietHandler)
    server.ssl_context = ssl_context
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics-http").start()


def record_memory(model: str, worker: str, memory: WorkerMemory) -> None:
    WORKER_RSS.labels(model, worker).set(memory.resident_bytes)
    for dev in memory.devices:
        GPU_ALLOCATED.labels(model, worker, dev.device).set(dev.allocated)
        GPU_RESERVED.labels(model, worker, dev.device).set(dev.reserved)
        GPU_MAX_ALLOCATED.labels(model, worker, dev.device).set(dev.max_allocated)
        GPU_TOTAL.labels(model, worker, dev.device).set(dev.total)


def record_step(model: str, worker: str, output: StepOutput) -> None:
    WORKER_RUNNING.labels(model, worker).set(output.running)
    if output.step_kind:
        STEP_TIME.labels(model, output.step_kind).observe(output.step_seconds)
    if output.step_kind == "decode":
        BATCH_SIZE.labels(model).observe(len(output.events))
    if output.memory is not None:
        record_memory(model, worker, output.memory)
