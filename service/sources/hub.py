"""Models from the Hugging Face hub (or a mirror of it): `hf:ORG/NAME[@REVISION]`, or a bare `ORG/NAME`.

A model resolves to a snapshot folder of huggingface_hub's own cache (HF_HUB_CACHE, `models--ORG--NAME/` with its
`blobs/`, `refs/` and `snapshots/<commit>/`), used in place, never copied. HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE
behave as users know them: huggingface_hub reads them (some at import time).

Revision: `@REVISION` in the id (a branch, tag or commit) pins it; a separate `revision` (the config's `revision`,
`modelpool pull --revision`) naming another one is an error rather than a silent choice between the two.

What is fetched is decided from the repo's file list at that revision (`select_files`): the weights in one format
(safetensors when the repo has any, else PyTorch `.bin`), config, tokenizer and generation files, chat templates;
never other frameworks' weights, nor subfolders. Offline (HF_HUB_OFFLINE), or when the hub cannot be reached or
refuses, a complete cached snapshot still serves, as huggingface_hub itself does it.

Files are downloaded here, not by `snapshot_download`: huggingface_hub 2.x drops a partial download when it fails,
while here a file grows in `blobs/<etag>.incomplete` and the next attempt (another `modelpool pull`, or a server
start) resumes it with a Range request. Every file, Xet-backed ones included, comes over plain HTTP for that reason
(the hub serves those through its HTTP bridge; hf_xet is not used). `snapshot_download` then only links the snapshot,
writes the refs and its tree listing: the layout stays huggingface_hub's.

Every failure is a ModelSourceError that names the model and says what to do.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import importlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import urlsplit

from service.sources.errors import ModelSourceError

_LOGGER = logging.getLogger(__name__)

# Besides the weights: config, tokenizer and generation json, sentencepiece models, merges/vocab text, chat templates,
# tiktoken vocabularies. No *.py: workers never load remote code.
_SUPPORT_PATTERNS = ("*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken")
# Weights of other frameworks or formats, only named in the error for a repo without transformers weights.
_OTHER_WEIGHTS = (".h5", ".msgpack", ".onnx", ".gguf", ".pth", ".pt", ".ckpt", ".tflite", ".mlmodel")
# What a Trainer leaves next to a checkpoint: `.bin` files that are not weights.
_TRAINING_STATE = ("training_args.bin", "optimizer.bin", "scheduler.bin", "rng_state.bin", "scaler.bin")
# Files downloaded at once: a model of many shards fills the link better with a few connections, like
# snapshot_download; more only splits the same bandwidth.
_PARALLEL_DOWNLOADS = 4
_SHA256 = re.compile(r"[0-9a-f]{64}")
# What an ETag or a commit id may look like before it becomes a file name in the cache.
_SAFE_NAME = re.compile(r"(?!\.\.?$)[0-9A-Za-z._-]{1,200}")
# Attempts in a row that bring no new byte before a download gives up (the next run resumes it).
_RETRIES = 3


class DownloadProgress(Protocol):
    """What `resolve` reports while it downloads; calls come one at a time, from several threads."""

    def start(self, model: str, files: int, total: int, done: int, cached: int) -> None:
        """`files` to fetch, of `total` bytes, `done` of them already here (partial downloads that resume);
        `cached` files need nothing."""

    def advance(self, n: int) -> None:
        """`n` more bytes arrived (negative when a server ignored a Range request and a file starts over)."""

    def file_done(self, name: str, size: int) -> None: ...

    def finish(self) -> None: ...


class _LogProgress:
    """The default report (a server start): a log line per file, nothing per byte."""

    def __init__(self) -> None:
        self._model = ""

    def start(self, model: str, files: int, total: int, done: int, cached: int) -> None:
        self._model = model
        if files:
            _LOGGER.info("%s: fetching %d files, %d bytes (%d cached files)", model, files, total - done, cached)

    def advance(self, n: int) -> None:
        pass

    def file_done(self, name: str, size: int) -> None:
        _LOGGER.info("%s: %s fetched (%d bytes)", self._model, name, size)

    def finish(self) -> None:
        pass


def split_revision(repo_id: str, revision: str | None) -> tuple[str, str | None]:
    """`ORG/NAME@REV` -> (`ORG/NAME`, `REV`); a `revision` that names another one is an error."""
    name, at, pinned = repo_id.partition("@")
    if not at:
        return repo_id, revision
    if not pinned:
        raise ModelSourceError(f"hf:{repo_id}: nothing after '@': give a branch, tag or commit")
    if revision and revision != pinned:
        raise ModelSourceError(
            f"hf:{repo_id}: the id pins revision {pinned!r} and revision {revision!r} was given too: give one of them"
        )
    return name, pinned


def select_files(names: Iterable[str]) -> list[str]:
    """The files of a repo listing that transformers loads a causal LM from, in one weights format."""
    # A name that climbs out of the repo folder (a broken or hostile listing) is never fetched.
    names = [n for n in names if not n.startswith("/") and ".." not in n.split("/")]
    # Subfolders hold other things (original/ checkpoints, onnx/ exports); transformers loads from the top.
    top = [n for n in names if "/" not in n]
    safetensors = [n for n in top if n.endswith(".safetensors")]
    # Mistral-style repos hold the same weights twice: transformers' shards and their own consolidated.safetensors.
    weights = [n for n in safetensors if not n.startswith("consolidated")] or safetensors
    index = ".safetensors.index.json"
    if not weights:
        bins = [n for n in top if n.endswith(".bin")]
        weights = [n for n in bins if n.startswith("pytorch_model")] or [n for n in bins if n not in _TRAINING_STATE]
        index = ".bin.index.json"
    support = [
        n
        for n in top
        if any(fnmatch.fnmatchcase(n, p) for p in _SUPPORT_PATTERNS)
        # The shard index of the chosen format only (not tf_model.h5.index.json and the like).
        and (not n.endswith(".index.json") or n.endswith(index))
    ]
    # transformers reads named chat templates from this folder too.
    templates = [n for n in names if n.startswith("additional_chat_templates/") and n.endswith(".jinja")]
    return sorted({*weights, *support, *templates})


def resolve(repo_id: str, revision: str | None = None, progress: DownloadProgress | None = None) -> Path:
    """The snapshot folder of `repo_id` at `revision` (default: main), downloaded (or resumed) when needed."""
    repo_id, revision = split_revision(repo_id, revision)
    model = f"hf:{repo_id}" + (f"@{revision}" if revision else "")
    from huggingface_hub import HfApi, constants, is_offline_mode, snapshot_download
    from huggingface_hub.errors import RevisionNotFoundError

    if is_offline_mode():
        return _cached(repo_id, revision, model, None)
    try:
        info = HfApi().model_info(repo_id, revision=revision)
    except RevisionNotFoundError as exc:
        raise _explain(exc, model, revision) from exc
    except _request_errors() as exc:
        # Refused, or unreachable: like huggingface_hub itself, a complete cached copy still serves.
        return _cached(repo_id, revision, model, exc)
    except ValueError as exc:  # huggingface_hub's HFValidationError: not a repo id at all
        raise ModelSourceError(f"{model}: not a hub model id ({exc})") from exc
    files = select_files(s.rfilename for s in info.siblings or [])
    if not any(f.endswith((".safetensors", ".bin")) for f in files):
        others = [s.rfilename for s in info.siblings or [] if s.rfilename.endswith(_OTHER_WEIGHTS)]
        only = f" (it has {', '.join(others[:3])})" if others else ""
        raise ModelSourceError(
            f"{model}: no transformers weights (*.safetensors or pytorch_model*.bin) at the top of the repo{only}: "
            "modelpool serves transformers checkpoints"
        )
    if "config.json" not in files:
        raise ModelSourceError(
            f"{model}: the repo has no config.json at the top: not a transformers model (an adapter, or another "
            "framework's repo?)"
        )
    if info.sha is not None and not _SAFE_NAME.fullmatch(info.sha):
        raise ModelSourceError(f"{model}: {constants.ENDPOINT} answered a commit id that is not a file name")
    commit = info.sha or revision or "main"
    try:
        _fetch(repo_id, commit, files, model, progress or _LogProgress())
        # The blobs are all here now: this only links the snapshot, writes refs/<revision> and the tree listing.
        path = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=[_literal(f) for f in files],
                tqdm_class=_quiet_tqdm(),
            )
        )
    except _request_errors() as exc:
        raise _explain(exc, model, revision) from exc
    problem = _incomplete(path)
    if problem:
        raise ModelSourceError(f"{model}: {path} is incomplete ({problem}): run `modelpool pull {model}` again")
    return path


@dataclass
class _Download:
    name: str
    # The hub's URL of the file; where its bytes are (a CDN's signed URL, which expires) is asked just before
    # the download starts, as huggingface_hub does, not when the plan is made.
    hub_url: str
    size: int | None
    blob: Path
    partial: Path
    lock: Path
    resumed: int


def _fetch(repo_id: str, commit: str, files: list[str], model: str, progress: DownloadProgress) -> None:
    """Download into the cache's blobs/ every file of `files` at `commit` that is not there yet, resuming partial
    ones; the snapshot links are left to snapshot_download."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import repo_folder_name

    cache = Path(constants.HF_HUB_CACHE).expanduser().resolve()
    folder = repo_folder_name(repo_id=repo_id, repo_type="model")
    storage = cache / folder
    todo: list[_Download] = []
    cached = 0
    for name in files:
        if (storage / "snapshots" / commit / name).exists():
            cached += 1
            continue
        hub_url = hf_hub_url(repo_id, name, revision=commit)
        meta = get_hf_file_metadata(hub_url)
        if not meta.etag:
            raise ModelSourceError(
                f"{model}: {name}: {constants.ENDPOINT} sent no ETag: is HF_ENDPOINT a hub (or a mirror of it)?"
            )
        if not _SAFE_NAME.fullmatch(meta.etag):
            raise ModelSourceError(f"{model}: {name}: {constants.ENDPOINT} sent an ETag that is not a file name")
        blob = storage / "blobs" / meta.etag
        if blob.exists():
            cached += 1
            continue
        partial = blob.with_name(blob.name + ".incomplete")
        resumed = partial.stat().st_size if partial.exists() else 0
        # The lock huggingface_hub takes for this blob, so that it and this code never write it at once.
        lock = cache / ".locks" / folder / f"{meta.etag}.lock"
        todo.append(_Download(name, hub_url, meta.size, blob, partial, lock, resumed))
    report = _Report(progress)
    report.start(model, len(todo), sum(d.size or 0 for d in todo), sum(d.resumed for d in todo), cached)
    if not todo:
        report.finish()
        return
    # Daemon threads, not a ThreadPoolExecutor (whose threads the interpreter waits for at exit): after a Ctrl-C
    # a download stuck on a silent connection must not keep the process alive.
    queue = list(todo)
    errors: list[BaseException] = []

    def work() -> None:
        while True:
            try:
                d = queue.pop(0)
            except IndexError:
                return
            try:
                _download(d, model, report)
            except BaseException as exc:  # noqa: BLE001 (re-raised in the calling thread)
                errors.append(exc)

    threads = [
        threading.Thread(target=work, name=f"hub-download-{i}", daemon=True)
        for i in range(min(_PARALLEL_DOWNLOADS, len(todo)))
    ]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException:
        # Ctrl-C: the downloads stop at their next piece, each keeping what it wrote for the next attempt; a short
        # wait lets most of them close their files.
        report.cancelled.set()
        for thread in threads:
            thread.join(timeout=1)
        raise
    finally:
        report.finish()
    real = [e for e in errors if not isinstance(e, _Cancelled)]
    if real:
        raise real[0]


def _download(d: _Download, model: str, report: _Report) -> None:
    from filelock import FileLock, Timeout

    d.lock.parent.mkdir(parents=True, exist_ok=True)
    d.blob.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(d.lock))
    while True:  # waits for another process on this blob, but not past a Ctrl-C
        try:
            lock.acquire(timeout=1)
            break
        except Timeout:
            if report.cancelled.is_set():
                raise _Cancelled() from None
    try:
        if d.blob.exists():  # another process finished it while this one waited
            report.advance((d.size or 0) - d.resumed)
        else:
            _download_locked(d, model, report)
    finally:
        lock.release()
    report.file_done(d.name, d.blob.stat().st_size)


def _download_locked(d: _Download, model: str, report: _Report) -> None:
    from huggingface_hub import constants, get_hf_file_metadata
    from huggingface_hub.utils import build_hf_headers

    url = get_hf_file_metadata(d.hub_url).location
    headers = build_hf_headers()
    if _origin(url) != _origin(constants.ENDPOINT):
        # A CDN or storage host (the hub redirects LFS files there): the token stays with the hub.
        headers.pop("authorization", None)
    with open(d.partial, "ab") as f:
        if d.size is not None and f.tell() > d.size:
            # In append mode tell() stays where it was after a truncate: seek first.
            f.seek(0)
            f.truncate()
            report.advance(-d.resumed)
        elif f.tell() != d.resumed:  # another process added to it since the plan was made
            report.advance(f.tell() - d.resumed)
        resumed = f.tell()
        try:
            _get(d, url, f, headers, report)
        except _request_errors() as exc:
            raise ModelSourceError(
                f"{model}: downloading {d.name} stopped at {f.tell()} of {d.size or '?'} bytes "
                f"({_short(exc)}): run `modelpool pull {model}` again to resume"
            ) from exc
    if resumed and _SHA256.fullmatch(d.blob.name) and _sha256(d.partial) != d.blob.name:
        # The ETag of an LFS file is its SHA-256: a resumed file that does not match it is not kept.
        d.partial.unlink()
        raise ModelSourceError(
            f"{model}: {d.name} does not match its checksum after resuming: run `modelpool pull {model}` "
            "again to download it from the start"
        )
    os.replace(d.partial, d.blob)


def _get(d: _Download, url: str, f: BinaryIO, headers: dict[str, str], report: _Report) -> None:
    """Append the rest of the file to `f` from its current size (a Range request), writing every piece as it
    arrives so that a cut loses nothing; a dropped connection is retried a few times while it makes progress."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session, hf_raise_for_status

    failures = 0
    while d.size is None or f.tell() < d.size:
        if report.cancelled.is_set():
            raise _Cancelled()
        have = f.tell()
        # Ranges count the bytes as stored: no compression.
        request = {**headers, "Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
        try:
            with get_session().stream(
                "GET", url, headers=request, follow_redirects=True, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT
            ) as response:
                hf_raise_for_status(response)
                if have and response.status_code != 206:  # the server ignored the Range: start over
                    f.seek(0)
                    f.truncate()
                    report.advance(-have)
                for chunk in response.iter_bytes():
                    f.write(chunk)
                    report.advance(len(chunk))
        except _transport_errors():
            failures = 0 if f.tell() > have else failures + 1
            if failures >= _RETRIES:
                raise
            time.sleep(1)
            continue
        if d.size is None:
            return
        if f.tell() == have:  # a response that ended cleanly with nothing in it: not forever
            failures += 1
            if failures >= _RETRIES:
                raise OSError(f"{url} sent no bytes past {have} of {d.size}")
            time.sleep(1)
    f.flush()
    if d.size is not None and f.tell() != d.size:
        raise OSError(f"received {f.tell()} bytes, expected {d.size}")


class _Cancelled(Exception):
    """Raised inside a download thread to stop it (Ctrl-C in the main thread)."""


class _Report:
    """Serialises the download threads' calls to the progress report and carries the cancel flag."""

    def __init__(self, progress: DownloadProgress) -> None:
        self._progress = progress
        self._lock = threading.Lock()
        self.cancelled = threading.Event()

    def start(self, model: str, files: int, total: int, done: int, cached: int) -> None:
        with self._lock:
            self._progress.start(model, files, total, done, cached)

    def advance(self, n: int) -> None:
        if self.cancelled.is_set():
            raise _Cancelled()
        with self._lock:
            self._progress.advance(n)

    def file_done(self, name: str, size: int) -> None:
        with self._lock:
            self._progress.file_done(name, size)

    def finish(self) -> None:
        with self._lock:
            self._progress.finish()


def _cached(repo_id: str, revision: str | None, model: str, error: BaseException | None) -> Path:
    """The cached snapshot, when offline (`error` None) or when the hub failed with `error`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        # Only config.json is named: what a complete download left is checked below, whatever the weights format.
        path = Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=["config.json"], local_files_only=True)
        )
    except IncompleteSnapshotError as exc:
        raise ModelSourceError(f"{model}: the cached copy has no config.json: run `modelpool pull {model}`") from exc
    except LocalEntryNotFoundError as exc:
        raise _explain(error, model, revision) from (error or exc)
    except ValueError as exc:
        raise ModelSourceError(f"{model}: not a hub model id ({exc})") from exc
    problem = _incomplete(path)
    if problem:
        raise ModelSourceError(
            f"{model}: the cached copy in {path} is incomplete ({problem}): run `modelpool pull {model}`"
            + (" with the hub reachable (HF_HUB_OFFLINE unset)" if error is None else "")
        )
    if error is not None:
        _LOGGER.warning("%s: the hub failed (%s); using the cached copy in %s", model, _short(error), path)
    return path


def _incomplete(path: Path) -> str | None:
    """Why a snapshot folder cannot load (no config, no weights, shards missing), or None."""
    if not (path / "config.json").is_file():
        return "no config.json"
    for pattern, index in (
        ("*.safetensors", "model.safetensors.index.json"),
        ("*.bin", "pytorch_model.bin.index.json"),
    ):
        # exists() follows the snapshot's links: a link to a blob that is gone counts as missing.
        if not [p for p in path.glob(pattern) if p.exists()]:
            continue
        if (path / index).exists():
            shards = set(json.loads((path / index).read_text()).get("weight_map", {}).values())
            missing = sorted(s for s in shards if not (path / s).exists())
            if missing:
                return f"missing {', '.join(missing[:3])}"
        return None
    return "no *.safetensors or *.bin weights"


def _explain(error: BaseException | None, model: str, revision: str | None) -> ModelSourceError:
    """The message for a model the hub did not give: what went wrong and what to do."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    endpoint = constants.ENDPOINT
    repo_id = model.removeprefix("hf:").partition("@")[0]
    pull = f"`modelpool pull {model}`"
    token = get_token() is not None
    if error is None:
        return ModelSourceError(
            f"{model}: not in the hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: run {pull} first "
            f"with {endpoint} reachable, or unset HF_HUB_OFFLINE"
        )
    if isinstance(error, GatedRepoError):
        return ModelSourceError(
            f"{model} is a gated model: accept its licence at {endpoint}/{repo_id} (logged in), then set HF_TOKEN to "
            "an access token of that account"
            + (" (HF_TOKEN is set, but its account has no access yet)" if token else "")
        )
    if isinstance(error, RevisionNotFoundError):
        return ModelSourceError(
            f"{model}: {endpoint} has no revision {revision!r} of {repo_id}: check the branch, tag or commit"
        )
    if isinstance(error, RepositoryNotFoundError):
        if token:
            return ModelSourceError(
                f"{model}: no such model on {endpoint}, or the account of HF_TOKEN cannot read it: check the id, "
                "HF_ENDPOINT and the token's access"
            )
        return ModelSourceError(
            f"{model}: no such model on {endpoint}, or it is private: check the id and HF_ENDPOINT; for a private "
            "model set HF_TOKEN to an access token that can read it"
        )
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            what = "rejected HF_TOKEN" if token else "asks for a token"
            return ModelSourceError(
                f"{model}: {endpoint} {what} (401 Unauthorized): set HF_TOKEN to a valid access token"
            )
        if status == 403:
            return ModelSourceError(
                f"{model}: {endpoint} refused access (403 Forbidden): set HF_TOKEN to a token allowed to read it"
            )
        return ModelSourceError(f"{model}: {endpoint} failed ({_short(error)}): try again later, or check HF_ENDPOINT")
    if isinstance(error, _transport_errors()):
        return ModelSourceError(
            f"{model}: cannot reach the hub at {endpoint} ({_short(error)}) and it is not in the hub cache "
            f"({constants.HF_HUB_CACHE}): check the network, the proxy settings and HF_ENDPOINT, or run {pull} "
            "where the hub is reachable"
        )
    return ModelSourceError(f"{model}: {_short(error)}")


def _request_errors() -> tuple[type[BaseException], ...]:
    """What a failed request to the hub raises: huggingface_hub's HfHubHTTPError (an OSError) for an answer,
    a transport error for no answer."""
    return (OSError, *_transport_errors())


@functools.cache
def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures: huggingface_hub 2.x sends its requests with httpx2, 1.x with httpx."""
    errors = []
    for name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            errors.append(importlib.import_module(name).TransportError)
    return tuple(errors)


def _quiet_tqdm() -> Any:
    """A huggingface_hub progress bar that never shows: snapshot_download only links files here, and `pull`
    draws its own progress."""
    from huggingface_hub.utils import tqdm

    class Quiet(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


def _literal(name: str) -> str:
    """`name` as an fnmatch pattern that matches only itself (allow_patterns are patterns)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(parts.scheme)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _short(error: BaseException) -> str:
    """An exception in one line: huggingface_hub's messages run over several."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__
