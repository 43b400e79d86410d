"""The GPU benchmark in one command (`make bench-gpu`): a Qwen2-0.5B-shaped bf16 model, served and in-process.

Owns the GPU run of issue 11. Nothing can be downloaded on the GPU machine, so
the model is built here from a config with random weights: Qwen2-0.5B's body
(24 layers, hidden 896, 14 query / 2 key-value heads, MLP 4864, tied
embeddings) with the built-in model's tokenizer, whose vocabulary (49,152)
replaces Qwen2's 151,936 (Qwen2's tokenizer cannot be fetched there): 0.40 B
parameters. Random weights give meaningless text but the real cost per token.
Then, one thing at a time on the same GPU:

1. modelpool serves it (`--devices 0 --dtype bfloat16`), loaded by
   bench/load.py at each C (default 1, 32, 128; N = 64 tokens, ignore_eos):
   tok/s, TTFT and ITL percentiles; GPU memory from modelpool's /metrics and
   from `nvidia-smi` while it is loaded;
2. the in-process static batch (`model.generate`, C rows left-padded, greedy)
   on the same GPU and dtype: the reference the served numbers are divided by;
3. the C = 1 memory-bandwidth bound: weight bytes ÷ the card's bandwidth
   (looked up by the name nvidia-smi gives, or `--bandwidth-gbs`), the most
   tokens/s one stream can get when every step reads every weight once.

The results (a Markdown section) are printed and appended to `--results`
(bench/RESULTS.md by default).

`--dry-run` runs all of it but the GPU on the CPU, on a Qwen2-shaped model
scaled down to 2 layers of width 64, at small C and N, and writes to
bench/out/gpu_dry_run.md unless told otherwise: the CI runs it
(tests/test_bench_gpu.py) so that a session lent a GPU only has to run
`make bench-gpu`.

    make bench-gpu                              # = python -m bench.gpu
    python -m bench.gpu --dry-run               # the CPU rehearsal, ~1 min
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.load import run_load, warm_up
from bench.run import DEFAULT_OUT_DIR, HOST, REPO_ROOT, ServerProcess, free_port, render_table, running

_LOGGER = logging.getLogger(__name__)

# Qwen2-0.5B's shape (its config.json), but the vocabulary, which is the built-in tokenizer's.
QWEN2_05B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
# The same architecture, scaled down for the CPU rehearsal.
QWEN2_DRY_RUN = dict(
    QWEN2_05B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)

# Memory bandwidth in GB/s by the name nvidia-smi reports (vendors' data sheets); --bandwidth-gbs overrides.
BANDWIDTH_GBS = {
    "H200": 4800,
    "H100 NVL": 3900,
    "H100 80GB HBM3": 3350,
    "H100 PCIe": 2000,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "A100-SXM4-40GB": 1555,
    "A100-PCIE-40GB": 1555,
    "L40S": 864,
    "A10": 600,
    "L4": 300,
    "RTX 4090": 1008,
}


@dataclass
class Plan:
    concurrency: list[int]
    max_new_tokens: int
    requests_per_level: int
    device: str
    dtype: str
    shape: dict
    model_dir: Path
    results: Path


def build_model(shape: dict, dtype: str, out_dir: Path) -> tuple[Path, int]:
    """A Qwen2ForCausalLM with random weights of `shape`, the built-in tokenizer beside it; (folder, weight
    bytes). Built once per shape and dtype."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from workers import builtin_model

    tokenizer = AutoTokenizer.from_pretrained(builtin_model.ensure_cached())
    config = Qwen2Config(**shape, vocab_size=len(tokenizer), torch_dtype=dtype)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    stamp = out_dir / "built.json"
    wanted = {"shape": shape, "dtype": dtype, "vocab": len(tokenizer)}
    if not (stamp.exists() and json.loads(stamp.read_text()) == wanted):
        shutil.rmtree(out_dir, ignore_errors=True)
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        stamp.write_text(json.dumps(wanted))
        del model
    weight_bytes = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    return out_dir, weight_bytes


def static_batch(model_dir: Path, plan: Plan) -> dict[int, float]:
    """tok/s of `model.generate` over C left-padded rows, greedy, N tokens, on the plan's device and dtype."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.inprocess import _generate_static, _padded_batch

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, plan.dtype)).to(plan.device).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rates = {}
    for concurrency in plan.concurrency:
        batch = {k: v.to(plan.device) for k, v in _padded_batch(tokenizer, concurrency).items()}
        _generate_static(model, batch, 4, pad_id)  # warm-up
        tokens, seconds = _generate_static(model, batch, plan.max_new_tokens, pad_id)
        rates[concurrency] = tokens / seconds
        _LOGGER.info("static batch C=%d: %.1f tok/s", concurrency, rates[concurrency])
    del model
    if plan.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rates


def nvidia_smi() -> dict | None:
    """Name, memory used and total (MiB) of GPU 0, or None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.used,memory.total", "--format=csv,noheader,nounits", "-i", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    name, used, total = (part.strip() for part in out.split(","))
    return {"name": name, "used_mib": float(used), "total_mib": float(total)}


def bandwidth_for(name: str) -> float | None:
    """The longest table key found in the GPU's name (so that "H100 NVL" wins over a shorter match)."""
    found = [key for key in BANDWIDTH_GBS if key in name]
    return BANDWIDTH_GBS[max(found, key=len)] if found else None


def scrape_gpu_memory(metrics_port: int) -> dict[str, float]:
    """modelpool's GPU memory gauges (bytes), summed over workers and devices, by metric name."""
    with urllib.request.urlopen(f"http://{HOST}:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("modelpool_gpu_memory_"):
            name, value = line.split("{", 1)[0], float(line.rsplit(" ", 1)[1])
            sums[name] = sums.get(name, 0.0) + value
    return sums


def serve_and_load(model_dir: Path, plan: Plan, out_dir: Path) -> tuple[list, dict[str, float], dict | None]:
    port, metrics_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "service.cli",
        "--model", str(model_dir),
        "--workers", "1",
        "--host", HOST,
        "--port", str(port),
        "--metrics-port", str(metrics_port),
        "--dtype", plan.dtype,
        "--max-batch-size", str(max(plan.concurrency)),
        "--drain-timeout", "5",
    ]  # fmt: skip
    if plan.device.startswith("cuda"):
        command += ["--devices", "0"]
    server = ServerProcess("modelpool-gpu", command, port, out_dir / "gpu_modelpool.log")
    reports = []
    with running(server, start_timeout_s=600):
        asyncio.run(warm_up(server.target, max_new_tokens=4))
        for concurrency in plan.concurrency:
            requests = max(plan.requests_per_level, concurrency)
            report = asyncio.run(run_load(server.target, concurrency, requests, plan.max_new_tokens, timeout_s=900))
            _LOGGER.info("%s", report.summary())
            reports.append(report)
        gpu_metrics = scrape_gpu_memory(metrics_port)
        smi = nvidia_smi()
    return reports, gpu_metrics, smi


def render(plan: Plan, weight_bytes: int, reports: list, static: dict[int, float], gpu_metrics, smi, bandwidth) -> str:
    def ms(stats: dict, key: str) -> str:
        value = stats.get(key)
        return "-" if value is None else f"{value * 1000:.1f}"

    rows = []
    for report in reports:
        reference = static.get(report.concurrency)
        rows.append(
            [
                report.concurrency,
                f"{report.good}/{report.requests}",
                f"{report.tokens_per_s:.1f}",
                f"{reference:.1f}" if reference else "-",
                f"{report.tokens_per_s / reference:.2f}x" if reference else "-",
                ms(report.ttft_s, "p50"),
                ms(report.ttft_s, "p95"),
                ms(report.itl_s, "p50"),
                ms(report.itl_s, "p95"),
            ]
        )
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    device = smi["name"] if smi else plan.device
    lines = [
        f"### {'Dry run (CPU)' if plan.device == 'cpu' else 'GPU run'}: {device}, {when}",
        "",
        f"`python -m bench.gpu{' --dry-run' if plan.device == 'cpu' else ''}`: Qwen2-shaped {plan.dtype} model "
        f"({plan.shape['num_hidden_layers']} layers, hidden {plan.shape['hidden_size']}), "
        f"{weight_bytes / 1e9:.3f} GB of weights, N = {plan.max_new_tokens}, greedy, ignore_eos.",
        "",
        render_table(
            [
                "C",
                "good",
                "modelpool tok/s",
                "static batch tok/s",
                "modelpool / static",
                "TTFT p50 ms",
                "TTFT p95 ms",
                "ITL p50 ms",
                "ITL p95 ms",
            ],
            rows,
        ),
        "",
    ]
    if gpu_metrics:
        gib = {name.removeprefix("modelpool_gpu_memory_"): value / 2**30 for name, value in gpu_metrics.items()}
        lines.append("GPU memory from /metrics (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(gib.items())))
    else:
        lines.append("GPU memory from /metrics: no GPU series (no GPU in this run).")
    if smi:
        lines.append(f"nvidia-smi: {smi['used_mib']:.0f} MiB used of {smi['total_mib']:.0f} MiB (while serving).")
    else:
        lines.append("nvidia-smi: not found (no GPU in this run).")
    if bandwidth:
        bound = bandwidth * 1e9 / weight_bytes
        one = next((r for r in reports if r.concurrency == 1), None)
        share = f", modelpool at C = 1 reached {one.tokens_per_s / bound:.0%} of it" if one and one.good else ""
        lines.append(
            f"C = 1 bandwidth bound: {weight_bytes / 1e9:.3f} GB of weights ÷ {bandwidth:.0f} GB/s = "
            f"{bound:.0f} tok/s{share}."
        )
    else:
        lines.append("C = 1 bandwidth bound: the card's bandwidth is unknown (pass --bandwidth-gbs).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="everything but the GPU, on the CPU, scaled down")
    parser.add_argument("--concurrency", help="levels, e.g. 1,32,128 (dry run: 1,4)")
    parser.add_argument("--max-new-tokens", type=int, help="tokens per request (default 64; dry run 8)")
    parser.add_argument("--requests", type=int, help="requests per level, at least C (default 64; dry run 4)")
    parser.add_argument("--bandwidth-gbs", type=float, help="the card's memory bandwidth (default: by its name)")
    parser.add_argument("--results", type=Path, help="append the section here (default bench/RESULTS.md)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    dry = args.dry_run
    if not dry:
        import torch

        if not torch.cuda.is_available():
            print("bench.gpu: no CUDA device here; `python -m bench.gpu --dry-run` rehearses it on the CPU")
            return 2
    plan = Plan(
        concurrency=[int(c) for c in (args.concurrency or ("1,4" if dry else "1,32,128")).split(",")],
        max_new_tokens=args.max_new_tokens or (8 if dry else 64),
        requests_per_level=args.requests or (4 if dry else 64),
        device="cpu" if dry else "cuda:0",
        dtype="float32" if dry else "bfloat16",
        shape=QWEN2_DRY_RUN if dry else QWEN2_05B,
        model_dir=REPO_ROOT / ".cache" / ("bench-qwen2-dry-run" if dry else "bench-qwen2-0.5b-bf16"),
        results=args.results or (args.out_dir / "gpu_dry_run.md" if dry else REPO_ROOT / "bench" / "RESULTS.md"),
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_dir, weight_bytes = build_model(plan.shape, plan.dtype, plan.model_dir)
    reports, gpu_metrics, smi = serve_and_load(model_dir, plan, args.out_dir)
    static = static_batch(model_dir, plan)
    bandwidth = args.bandwidth_gbs or (bandwidth_for(smi["name"]) if smi else None)
    section = render(plan, weight_bytes, reports, static, gpu_metrics, smi, bandwidth)
    print(section)
    with open(plan.results, "a") as results:
        results.write("\n" + section)
    bad = [r for r in reports if r.good < r.requests]
    if bad:
        print(f"bench.gpu: some requests failed: {', '.join(r.summary() for r in bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
