"""What an operator sees, against a live server: request ids, the access log in JSON, trace spans, the new metric
series, and a real Prometheus (Debian's package) scraping it, whose numbers must agree with what the clients saw
and which evaluates every expression of the shipped dashboard and alert rules."""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
import time
import urllib.parse
import urllib.request

import grpc
import pytest
import yaml

from modelpool import build_request
from modelpool.v1 import generation_pb2 as pb
from modelpool.v1 import generation_pb2_grpc as pb_grpc
from tests.helpers import SLOW_FAULT, tiny_and_slow_models, wait_until
from tests.server_process import REPO, ServerProcess, free_port
from tests.tools import require
from workers.faults import ENV as FAULTS_ENV

pytestmark = pytest.mark.slow

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def obs_server(tmp_path_factory, tiny_dir):
    tmp = tmp_path_factory.mktemp("observability")
    config = tmp / "modelpool.toml"
    config.write_text(
        textwrap.dedent(f"""
        [server]
        default_model = "tiny"
        memory_interval_s = 0.5
        """)
        + tiny_and_slow_models(tiny_dir)
    )
    proc = ServerProcess(
        ["--config", str(config), "--log-format", "json"],
        tmp / "server.log",
        env={
            FAULTS_ENV: SLOW_FAULT,
            "OTEL_TRACES_EXPORTER": "console",
            "OTEL_SERVICE_NAME": "modelpool-test",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        },
        stdout_path=tmp / "spans.out",
    )
    proc.spans_path = tmp / "spans.out"
    try:
        proc.wait_serving()
        yield proc
    finally:
        proc.stop()


def stub(server):
    return pb_grpc.GenerationServiceStub(grpc.insecure_channel(server.target))


def scrape(server) -> str:
    return urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def access_lines(server) -> list[dict]:
    return [line for line in json_lines(server.log()) if line["logger"] == "modelpool.access"]


# ------------------------------------------------------------------ request ids and the access log


def test_request_id_comes_back_in_initial_and_trailing_metadata(obs_server):
    s = stub(obs_server)
    request = build_request(prompt="ids", max_new_tokens=3, ignore_eos=True)
    _, call = s.Generate.with_call(request, metadata=[("x-request-id", "caller-id-1")], timeout=60)
    assert ("x-request-id", "caller-id-1") in call.initial_metadata()
    assert ("x-request-id", "caller-id-1") in call.trailing_metadata()

    stream = s.StreamGenerate(
        build_request(pb.StreamGenerateRequest, prompt="ids", max_new_tokens=3, ignore_eos=True),
        metadata=[("x-request-id", "caller-id-2")],
        timeout=60,
    )
    assert ("x-request-id", "caller-id-2") in stream.initial_metadata()
    list(stream)
    assert ("x-request-id", "caller-id-2") in stream.trailing_metadata()

    generated = set()
    for bad in (None, "has spaces in it", "x" * 200):
        metadata = [] if bad is None else [("x-request-id", bad)]
        _, call = s.Generate.with_call(request, metadata=metadata, timeout=60)
        (rid,) = [v for k, v in call.initial_metadata() if k == "x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", rid), rid
        generated.add(rid)
    assert len(generated) == 3


def test_one_json_access_line_per_call_with_its_numbers(obs_server):
    s = stub(obs_server)
    reply = s.Generate(
        build_request(prompt="access", max_new_tokens=5, ignore_eos=True),
        metadata=[("x-request-id", "acc-ok")],
        timeout=60,
    )
    with pytest.raises(grpc.RpcError):
        s.Generate(build_request(prompt="x", model="nope"), metadata=[("x-request-id", "acc-missing")], timeout=60)
    with pytest.raises(grpc.RpcError):
        s.Generate(build_request(prompt="x", top_p=2.0), metadata=[("x-request-id", "acc-bad")], timeout=60)

    def lines(rid):
        return [line for line in access_lines(obs_server) if line["request_id"] == rid]

    wait_until(lambda: all(lines(rid) for rid in ("acc-ok", "acc-missing", "acc-bad")), 30, "the access lines")
    (ok,) = lines("acc-ok")
    assert ok["method"] == "Generate" and ok["model"] == "tiny" and ok["code"] == "OK"
    assert ok["prompt_tokens"] == reply.usage.prompt_tokens and ok["completion_tokens"] == 5
    assert ok["worker"] == "tiny/0" and ok["peer"].startswith("ipv") and ok["level"] == "INFO"
    assert 0 <= ok["queue_seconds"] <= ok["ttft_seconds"] <= ok["total_seconds"]
    assert ok["message"].startswith("request_id=acc-ok method=Generate model=tiny code=OK")
    assert [line["code"] for line in lines("acc-missing")] == ["NOT_FOUND"]
    assert [line["code"] for line in lines("acc-bad")] == ["INVALID_ARGUMENT"]
    # Every line of the log, the workers' included, is one JSON object.
    records = json_lines(obs_server.log())
    assert {r.get("worker") for r in records if r["logger"] == "workers.worker_main"} == {"tiny/0", "slow/0"}


# ------------------------------------------------------------------ traces


def spans(server) -> list[dict]:
    text = server.spans_path.read_text()
    decoder, found, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) != -1:
        span, i = decoder.raw_decode(text, i)
        found.append(span)
    return found


def test_a_call_continues_the_callers_trace_with_its_moments(obs_server):
    traceparent = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
    s = stub(obs_server)
    list(
        s.StreamGenerate(
            build_request(pb.StreamGenerateRequest, prompt="trace", max_new_tokens=4, ignore_eos=True),
            metadata=[("traceparent", traceparent), ("x-request-id", "traced-1")],
            timeout=60,
        )
    )
    with pytest.raises(grpc.RpcError):
        s.Generate(build_request(prompt="x", model="nope"), metadata=[("x-request-id", "traced-2")], timeout=60)

    def span_of(rid):
        return next((sp for sp in spans(obs_server) if sp["attributes"].get("modelpool.request_id") == rid), None)

    wait_until(lambda: span_of("traced-1") and span_of("traced-2"), 30, "the spans exported")
    span = span_of("traced-1")
    assert span["name"] == "modelpool.v1.GenerationService/StreamGenerate" and span["kind"] == "SpanKind.SERVER"
    assert span["context"]["trace_id"] == f"0x{TRACE_ID}" and span["parent_id"] == f"0x{PARENT_SPAN_ID}"
    assert [e["name"] for e in span["events"]] == ["queued", "started", "first_token", "finished"]
    assert span["attributes"]["modelpool.completion_tokens"] == 4 and span["attributes"]["modelpool.model"] == "tiny"
    assert span["resource"]["attributes"]["service.name"] == "modelpool-test"
    failed = span_of("traced-2")
    assert failed["status"]["status_code"] == "ERROR" and failed["parent_id"] is None
    assert failed["attributes"]["rpc.grpc.status_code_name"] == "NOT_FOUND"


def test_tracing_module_with_the_sdks_in_memory_exporter():
    """service/tracing.py on its own: spans go to the provider it is given, with the caller as parent."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from service import tracing
    from service.dispatcher import Timings

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert tracing.configure(provider)
    try:
        now = time.time()
        span = tracing.CallSpan("Generate", [("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01")], "rid-1")
        timings = Timings(arrival=now, start=now + 0.1, first_token=now + 0.2, last_token=now + 0.3)
        span.finish("OK", {"model": "m", "prompt_tokens": 3, "completion_tokens": 2}, timings)
        (finished,) = exporter.get_finished_spans()
        assert format(finished.context.trace_id, "032x") == TRACE_ID
        assert format(finished.parent.span_id, "016x") == PARENT_SPAN_ID
        assert [(e.name, e.timestamp) for e in finished.events][:3] == [
            ("queued", int(now * 1e9)),
            ("started", int((now + 0.1) * 1e9)),
            ("first_token", int((now + 0.2) * 1e9)),
        ]
        assert finished.attributes["modelpool.prompt_tokens"] == 3
    finally:
        tracing._tracer = None
    assert not tracing.wanted({}) and tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"})
    assert not tracing.wanted({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"})


# ------------------------------------------------------------------ metric series


def test_new_series_and_no_created_series(obs_server):
    s = stub(obs_server)
    before = scrape(obs_server)
    s.Generate(build_request(prompt="one two three", max_new_tokens=7, ignore_eos=True), timeout=60)
    wait_until(lambda: "modelpool_request_generation_tokens_count" in scrape(obs_server), 30, "the histogram")
    after = scrape(obs_server)

    def value(text, name, **labels):
        pattern = name + r"\{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + r"\} (\S+)"
        match = re.search(pattern, text)
        return float(match.group(1)) if match else 0.0

    assert (
        value(after, "modelpool_request_generation_tokens_sum", model="tiny")
        - value(before, "modelpool_request_generation_tokens_sum", model="tiny")
        == 7
    )
    assert (
        value(after, "modelpool_request_prompt_tokens_count", model="tiny")
        - value(before, "modelpool_request_prompt_tokens_count", model="tiny")
        == 1
    )
    assert value(after, "modelpool_worker_load_seconds", model="tiny", worker="tiny/0") > 0
    assert value(after, "modelpool_worker_restarts_total", model="slow", worker="slow/0") == 0
    build = re.search(r"modelpool_build_info\{(.*)\} 1\.0", after)
    assert build and 'torch="2.' in build.group(1) and 'version="0.1.0"' in build.group(1)
    assert "_created" not in after


def test_promtool_accepts_a_scrape_and_the_shipped_files(obs_server):
    promtool = require("promtool")
    checked = subprocess.run([promtool, "check", "metrics"], input=scrape(obs_server), capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for args in (
        ("check", "rules", "deploy/prometheus/alerts.yml"),
        ("check", "config", "deploy/prometheus/prometheus.yml"),
    ):
        checked = subprocess.run([promtool, *args], cwd=REPO, capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr


# ------------------------------------------------------------------ a real Prometheus


@pytest.fixture(scope="module")
def prometheus(obs_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = tmp / "prometheus.yml"
    # The shipped config, with a short interval and this server as the target.
    shipped = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    shipped["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    shipped["rule_files"] = [str(REPO / "deploy/prometheus/alerts.yml")]
    shipped["scrape_configs"][0]["static_configs"] = [{"targets": [obs_server.metrics_url.split("/")[2]]}]
    config.write_text(yaml.safe_dump(shipped))
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [
            require("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"

    def query(expr: str) -> list[dict]:
        url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        reply = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    try:
        wait_until(lambda: _up(query), 60, "prometheus scraping modelpool")
        yield query
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _up(query) -> bool:
    try:
        return any(r["value"][1] == "1" for r in query('up{job="modelpool"}'))
    except OSError:
        return False


def _total(query, expr: str) -> float:
    return sum(float(r["value"][1]) for r in query(expr))


def test_prometheus_numbers_agree_with_what_the_clients_saw(obs_server, prometheus):
    query = prometheus
    s = stub(obs_server)
    tokens_before = _total(query, 'modelpool_generation_tokens_total{model="tiny"}')

    def codes():
        return {
            r["metric"]["code"]: float(r["value"][1])
            for r in query('sum by (code) (modelpool_requests_total{model=~"tiny|slow|",method!="ListModels"})')
        }

    codes_before = codes()
    completion, ttfts = 0, []
    for i in range(6):
        sent = time.monotonic()
        stream = s.StreamGenerate(
            build_request(pb.StreamGenerateRequest, prompt=f"prom {i}", max_new_tokens=4 + i, ignore_eos=True),
            timeout=60,
        )
        first = next(stream)
        ttfts.append(time.monotonic() - sent)
        completion += len(first.token_ids) + sum(len(p.token_ids) for p in stream)
    for bad in (build_request(prompt="x", top_p=2.0), build_request(prompt="x", model="nope")):
        with pytest.raises(grpc.RpcError):
            s.Generate(bad, timeout=60)
    cancelled = s.StreamGenerate(
        build_request(pb.StreamGenerateRequest, prompt="go", model="slow", max_new_tokens=400, ignore_eos=True),
        timeout=60,
    )
    completion += len(next(cancelled).token_ids)
    cancelled.cancel()
    expected = {"OK": 6, "INVALID_ARGUMENT": 1, "NOT_FOUND": 1, "CANCELLED": 1}

    def seen() -> bool:
        moved = {code: codes().get(code, 0) - codes_before.get(code, 0) for code in expected}
        return moved == expected

    wait_until(seen, 60, "prometheus to see the calls by status")
    # The generated-tokens counter of tiny moved by exactly the completion tokens the clients received.
    tiny_completion = completion - 1  # the one token read from the cancelled slow stream
    wait_until(
        lambda: _total(query, 'modelpool_generation_tokens_total{model="tiny"}') - tokens_before == tiny_completion,
        60,
        "the generated-tokens counter",
    )
    assert tiny_completion == sum(4 + i for i in range(6))
    # slow generated at least the token the client read before cancelling (maybe one more, in flight).
    assert _total(query, 'modelpool_generation_tokens_total{model="slow"}') >= 1
    p50 = _total(
        query, 'histogram_quantile(0.5, sum by (le) (modelpool_time_to_first_token_seconds_bucket{model="tiny"}))'
    )
    buckets = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
    bound = next(b for b in buckets if b >= max(ttfts))
    assert 0 < p50 <= bound, (p50, ttfts)


def _expressions_of_the_dashboard() -> list[tuple[str, str]]:
    dashboard = json.loads((REPO / "deploy/grafana/modelpool.json").read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = (
                target["expr"]
                .replace("$__rate_interval", "1m")
                .replace('"$model"', '".*"')
                .replace('"$worker"', '".*"')
            )
            found.append((panel["title"], expr))
    return found


def test_every_dashboard_expression_returns_data(obs_server, prometheus):
    query = prometheus
    stub(obs_server).Generate(build_request(prompt="dash", max_new_tokens=3, ignore_eos=True), timeout=60)
    with pytest.raises(grpc.RpcError):
        stub(obs_server).Generate(build_request(prompt="x", model="nope"), timeout=60)
    has_gpu = bool(query("modelpool_gpu_memory_total_bytes"))
    empty = []

    def all_have_data() -> bool:
        empty[:] = [
            (title, expr)
            for title, expr in _expressions_of_the_dashboard()
            if not query(expr) and (has_gpu or "modelpool_gpu_" not in expr)
        ]
        return not empty

    wait_until(all_have_data, 60, "data behind every panel")
    if not has_gpu:
        print("GPU panel expressions were checked as valid queries only: this machine has no GPU")


def test_every_alert_rule_evaluates_and_reads_live_series(prometheus):
    query = prometheus
    rules = yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text())
    for rule in (r for group in rules["groups"] for r in group["rules"]):
        query(rule["expr"])  # a valid query (it may well select nothing: nothing is wrong)
        metric_names = set(re.findall(r"\b(modelpool_[a-z_]+)", rule["expr"]))
        for name in metric_names:
            base = re.sub(r"_bucket$", "", name)
            if base.startswith("modelpool_gpu_") and not query("modelpool_gpu_memory_total_bytes"):
                continue  # no GPU here
            assert query(f'count({{__name__=~"{base}(_bucket)?"}})'), f"{rule['alert']}: {name} has no data"
