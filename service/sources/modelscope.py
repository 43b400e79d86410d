"""Models from ModelScope (`modelscope:ORG/NAME`) through the `modelscope` package, the optional `modelscope` extra.

What this module owns: which files of a repo are fetched (what `from_pretrained(folder)` reads, safetensors
preferred over `pytorch_model*.bin`, nothing of other frameworks), using the cache when ModelScope cannot be
reached, and turning modelscope's failures into a ModelSourceError that names the model and says what to do.

modelscope itself honours, unchanged: MODELSCOPE_CACHE (cache root, default ~/.cache/modelscope),
MODELSCOPE_API_TOKEN (or the token `modelscope login` saved), and MODELSCOPE_ENDPOINT (a mirror, or any
`http://host:port` that speaks ModelScope's API). Cache layouts, as modelscope 1.40 reads and writes them:

- what it downloads: `$MODELSCOPE_CACHE/models/ORG--NAME/snapshots/REVISION/` (the name as it is, dots and all);
- what modelscope <= 1.37 wrote, still reused in place: `$MODELSCOPE_CACHE/models/ORG/NAME___`, or without
  MODELSCOPE_CACHE `~/.cache/modelscope/hub/models/ORG/NAME___`, where NAME___ is the name with each dot
  written as `___` (Qwen/Qwen1.5-0.5B-Chat → Qwen/Qwen1___5-0___5B-Chat).

modelscope 1.40 has no offline switch (nothing like HF_HUB_OFFLINE), and when ModelScope is unreachable it gives
up only after its retries. So: MODELSCOPE_OFFLINE=1 (read here, not by modelscope) skips the network and
uses the cache alone; without it, a connection failure or a 5xx falls back to the cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from service.sources.errors import ModelSourceError

OFFLINE_ENV = "MODELSCOPE_OFFLINE"

_INSTALL = "pip install 'modelpool[modelscope]' (or pip install modelscope)"
_LOGIN = (
    "set MODELSCOPE_API_TOKEN to an access token (https://modelscope.cn/my/myaccesstoken) or run `modelscope login`"
)

# Config, tokenizer, chat template and remote code: what from_pretrained(folder) reads besides the weights.
_BASE_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"]
_SAFETENSORS = ["*.safetensors"]
# transformers' own name for torch weights (and their shards); other .bin files are not weights it loads.
_TORCH_BIN = ["pytorch_model*.bin"]
# from_pretrained(folder) reads only the top level: sub-folders hold other variants (onnx/, original/, gguf/).
# consolidated*.safetensors is the original-format copy some repos (Mistral) keep next to the HF weights.
_IGNORE_PATTERNS = ["*/*", "consolidated*.safetensors"]


def resolve(model_id: str, revision: str | None) -> Path:
    """The local folder of `model_id` (ORG/NAME) at `revision` (modelscope's default: master), fetched if needed."""
    label = f"modelscope:{model_id}" + (f" (revision {revision})" if revision else "")
    try:
        from modelscope import snapshot_download
    except ImportError as exc:
        raise ModelSourceError(f"{label}: needs the modelscope package: {_INSTALL}") from exc
    owner, _, name = model_id.partition("/")
    if not owner or not name or "/" in name:
        raise ModelSourceError(f"{label}: expected modelscope:ORG/NAME, as in https://modelscope.cn/models/ORG/NAME")

    def fetch(allow: list[str]) -> Path:
        return Path(
            snapshot_download(model_id, revision=revision, allow_patterns=allow, ignore_patterns=_IGNORE_PATTERNS)
        )

    if _offline():
        folder = _cached(snapshot_download, model_id, revision, label, f"{OFFLINE_ENV} is set")
    else:
        try:
            folder = fetch(_BASE_PATTERNS + _SAFETENSORS)
            if not _weights(folder):
                # No safetensors in the repo: only now take its torch .bin weights.
                folder = fetch(_BASE_PATTERNS + _TORCH_BIN)
        except Exception as exc:  # modelscope raises requests', modelscope_hub's and builtin errors
            status, unreachable = _classify(exc)
            why = _first_line(exc)
            if unreachable:
                folder = _cached(snapshot_download, model_id, revision, label, f"{_endpoint()} unreachable ({why})")
            elif status == 404:
                what = "no such model or revision" if revision else "no such model"
                raise ModelSourceError(
                    f"{label}: {what} on {_endpoint()} ({why}); check the id (ORG/NAME as in "
                    f"https://modelscope.cn/models/ORG/NAME){' and the revision' if revision else ''}. "
                    f"A private model also answers 'not found' without a token: {_LOGIN}"
                ) from exc
            elif status in (401, 403):
                raise ModelSourceError(
                    f"{label}: not authorised by {_endpoint()} ({why}); {_LOGIN}, with access to this model"
                ) from exc
            else:
                raise ModelSourceError(
                    f"{label}: download from {_endpoint()} failed ({type(exc).__name__}: {why}); run again "
                    f"(finished files are kept), or set {OFFLINE_ENV}=1 to use only the cache"
                ) from exc
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"{label}: {folder} has no config.json: not a transformers model")
    if not _weights(folder):
        raise ModelSourceError(
            f"{label}: {folder} has no weights transformers can load (*.safetensors or pytorch_model*.bin)"
        )
    return folder


def _cached(download: Callable[..., str], model_id: str, revision: str | None, label: str, why: str) -> Path:
    try:
        return Path(download(model_id, revision=revision, local_files_only=True))
    except Exception as exc:  # modelscope's CacheNotFound, or whatever an older modelscope raises
        raise ModelSourceError(
            f"{label}: {why}, and not in the ModelScope cache {_cache_root()} ({_first_line(exc)}); download it "
            f"once while {_endpoint()} is reachable (or set MODELSCOPE_ENDPOINT to a mirror), or point "
            "MODELSCOPE_CACHE at a cache that has it"
        ) from exc


def _weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _classify(exc: BaseException) -> tuple[int | None, bool]:
    """(HTTP status if any, whether ModelScope was unreachable), from modelscope_hub's errors (which carry
    status_code), requests' HTTPError (which carries response) or connection errors, anywhere in the chain:
    modelscope's compat layer re-raises 404/401/403 as requests.HTTPError from the modelscope_hub error."""
    import requests

    status: int | None = None
    for error in _chain(exc):
        code = getattr(error, "status_code", None)
        if code is None:
            code = getattr(getattr(error, "response", None), "status_code", None)
        if isinstance(code, int):
            status = status or code
        if isinstance(error, ConnectionError | TimeoutError | requests.ConnectionError | requests.Timeout):
            return status, True
    return status, status is not None and status >= 500


def _first_line(exc: BaseException) -> str:
    # modelscope_hub's messages go on with the request and response bodies on further lines.
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _endpoint() -> str:
    return (
        os.environ.get("MODELSCOPE_ENDPOINT")
        or os.environ.get("MODELSCOPE_DOMAIN")
        or "ModelScope (modelscope.cn, then modelscope.ai)"
    )


def _cache_root() -> str:
    return os.environ.get("MODELSCOPE_CACHE") or str(Path.home() / ".cache" / "modelscope")
