"""`modelpool pull SOURCE [--revision R]`: fetch a model into its cache ahead of time, so that a server starts
from the cache (a hub model then with HF_HUB_OFFLINE=1, no network).

SOURCE is what `modelpool serve --model` takes: `hf:ORG/NAME[@REVISION]` or a bare `ORG/NAME` (into the hub cache,
resuming what an interrupted pull left, with a progress display), `builtin` (the built-in model, converted once),
`modelscope:ID`, a local `.gguf` file (converted once) or a local folder (only checked). The model's folder goes to
stdout, progress and the summary to stderr. Exit status: 0 done, 1 the model could not be fetched (the message says
why and what to do), 2 usage, 130 interrupted (the same command resumes).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from service import model_source
from service.sources import hub
from service.sources.errors import ModelSourceError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelpool pull",
        description="Fetch a model into its cache ahead of time (hub models: resumable, with progress).",
    )
    parser.add_argument(
        "source",
        help="as serve --model: hf:ORG/NAME[@REVISION], ORG/NAME, builtin, modelscope:ID, a folder or a .gguf file",
    )
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a hub or ModelScope model")
    return parser


class Display:
    """A hub download's progress on a stream: one live line on a terminal; plain lines otherwise (one per file
    fetched and one every `interval` seconds), which a log file keeps readable."""

    def __init__(
        self,
        stream: TextIO,
        live: bool,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        width: int | None = None,
    ) -> None:
        self._stream = stream
        self._live = live
        # A live line is redrawn at most this often; plain lines come every `interval`.
        self._interval = 0.1 if live else interval
        self._clock = clock
        self._width = width or shutil.get_terminal_size((100, 24)).columns
        self._model = ""
        self._total = 0
        self._done = 0
        self._files = 0
        self._shown_at = 0.0
        self._drawn = 0
        # (time, bytes done) over the last few seconds: the rate follows the link, not the average since the start.
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def start(self, model: str, files: int, total: int, done: int, cached: int) -> None:
        self._model, self._files, self._total, self._done = model, files, total, done
        now = self._clock()
        self._samples.append((now, done))
        self._shown_at = now
        if not files:
            self._say(f"{model}: all {cached} files already in the cache")
            return
        resuming = f", resuming from {size_text(done)}" if done else ""
        here = f"; {cached} files already in the cache" if cached else ""
        self._say(f"{model}: fetching {files} files, {size_text(total)}{resuming}{here}")

    def advance(self, n: int) -> None:
        self._done += n
        now = self._clock()
        if now - self._shown_at >= self._interval:
            self._shown_at = now
            self._show(now)

    def file_done(self, name: str, size: int) -> None:
        if self._live:
            self._show(self._clock())
        else:
            self._say(f"{self._model}: {name} ({size_text(size)}) done")

    def finish(self) -> None:
        if self._files and self._live:
            self._show(self._clock())
            self._stream.write("\n")
            self._stream.flush()

    def status(self, now: float) -> str:
        """`12.3 MB / 27.0 MB (45%), 3.4 MB/s, 4 s left`."""
        while len(self._samples) > 1 and now - self._samples[0][0] > 10:
            self._samples.popleft()
        self._samples.append((now, self._done))
        then, done_then = self._samples[0]
        rate = (self._done - done_then) / (now - then) if now > then else 0.0
        percent = 100 * self._done // self._total if self._total else 100
        left = self._total - self._done
        eta = f"{duration_text(left / rate)} left" if rate > 0 and left > 0 else ("done" if left <= 0 else "? left")
        return f"{size_text(self._done)} / {size_text(self._total)} ({percent}%), {size_text(rate)}/s, {eta}"

    def _show(self, now: float) -> None:
        status = self.status(now)
        if not self._live:
            self._say(f"{self._model}: {status}")
            return
        filled = 20 * self._done // self._total if self._total else 20
        line = f"{self._model} [{'#' * filled}{'.' * (20 - filled)}] {status}"[: self._width - 1]
        # \r and spaces over what a longer line left: one line that changes in place.
        self._stream.write("\r" + line + " " * max(0, self._drawn - len(line)))
        self._stream.flush()
        self._drawn = len(line)

    def _say(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()


def size_text(n: float) -> str:
    """Bytes in decimal units, as the hub shows sizes: 999 B, 12.3 kB, 4.5 MB, 1.2 GB."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def duration_text(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def pull(source: str, revision: str | None, stderr: TextIO) -> Path:
    if model_source.is_hub(source):
        path = hub.resolve(source.removeprefix("hf:"), revision, progress=Display(stderr, live=stderr.isatty()))
        model_source.check_folder(path, source)  # the same rule as a server start
        return path
    from workers import builtin_model

    if source == "builtin" and not builtin_model.is_cached():
        print("builtin: converting the built-in model once (about 20 s)", file=stderr, flush=True)
    return model_source.resolve(source, revision)


def _folder_size(path: Path) -> tuple[int, int]:
    """(files, bytes) of a model folder; a hub snapshot's links count as the blobs they point to."""
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.revision and not (model_source.is_hub(args.source) or args.source.startswith("modelscope:")):
        print("modelpool pull: --revision applies to hub and ModelScope models only", file=sys.stderr)
        return 2
    try:
        path = pull(args.source, args.revision, sys.stderr)
    except ModelSourceError as exc:
        print(f"modelpool pull: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("modelpool pull: interrupted; the same command resumes the download", file=sys.stderr)
        return 130
    files, size = _folder_size(path)
    print(f"{args.source}: {files} files, {size_text(size)}", file=sys.stderr, flush=True)
    print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
