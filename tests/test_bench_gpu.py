"""`make bench-gpu` rehearsed on the CPU: everything the GPU run does but the GPU itself (issue 11).

The dry run builds the Qwen2-shaped checkpoint (scaled down), serves it with a
real modelpool server, loads it at two concurrencies, runs the in-process
static batch, and writes the results section; a session lent a GPU then only
runs `make bench-gpu`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.builtin]


def test_the_dry_run_serves_loads_and_writes_every_figure(tmp_path):
    results = tmp_path / "results.md"
    run = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--dry-run", "--bandwidth-gbs", "100", "--results", str(results),
         "--out-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    text = results.read_text()
    assert text.startswith("\n### Dry run (CPU)")
    row = r"^\|\s+(\d+) \|\s+(\d+)/(\d+) \|\s+([\d.]+) \|\s+([\d.]+) \|"
    rows = {int(m[0]): m[1:] for m in re.findall(row, text, re.M)}
    assert sorted(rows) == [1, 4]
    for good, requests, served, static in rows.values():
        assert good == requests == "4"
        assert float(served) > 0 and float(static) > 0
    # The bound is the weights' bytes over the bandwidth given, as printed.
    weights = float(re.search(r"([\d.]+) GB of weights ÷ 100 GB/s = (\d+) tok/s", text)[1])
    bound = int(re.search(r"([\d.]+) GB of weights ÷ 100 GB/s = (\d+) tok/s", text)[2])
    assert bound == pytest.approx(100 / weights, rel=0.02)
    assert "no GPU series" in text and "nvidia-smi: not found" in text
    # The checkpoint is a Qwen2 of the dry run's shape, with the built-in tokenizer.
    config = (REPO / ".cache" / "bench-qwen2-dry-run" / "config.json").read_text()
    assert '"model_type": "qwen2"' in config and '"num_hidden_layers": 2' in config


def test_without_a_gpu_the_real_run_refuses_and_says_how_to_rehearse():
    run = subprocess.run([sys.executable, "-m", "bench.gpu"], cwd=REPO, capture_output=True, text=True, timeout=300)
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_gpu = False
    if has_gpu:
        pytest.skip("a GPU is here: the real run is `make bench-gpu`, not a test")
    assert run.returncode == 2
    assert "--dry-run" in run.stdout


def test_bandwidth_is_looked_up_by_the_longest_name_match():
    assert gpu.bandwidth_for("NVIDIA H200") == 4800
    assert gpu.bandwidth_for("NVIDIA H100 NVL") == 3900
    assert gpu.bandwidth_for("NVIDIA H100 80GB HBM3") == 3350
    assert gpu.bandwidth_for("NVIDIA L4") == 300
    assert gpu.bandwidth_for("Some Future GPU") is None
