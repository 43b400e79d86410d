"""One worker process seen from the frontend: start, watch, stop, restart with back-off.

Each handle owns its process's inbox (a pipe with a sender thread), the pipe
its step outputs come back on, and two daemon threads: one relays that pipe
into the event loop, one waits for the process to exit. They are per process,
so a worker dying mid-write can tear only its own pipes, which are thrown away
with it. A worker that does not report ready within the load timeout is killed
and restarted with back-off like one that died.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import multiprocessing
import threading
from collections.abc import Callable

from service.worker_inbox import InboxClosed, WorkerInbox
from workers.messages import StepOutput, StopWorker, WorkerFailed, WorkerMemory, WorkerReady, WorkerSpec
from workers.worker_main import run_worker

_LOGGER = logging.getLogger(__name__)
_MP = multiprocessing.get_context("spawn")


class WorkerState(enum.Enum):
    STARTING = 1
    READY = 2
    RESTARTING = 3
    STOPPED = 4


class WorkerHandle:
    def __init__(
        self,
        spec: WorkerSpec,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[WorkerHandle, object], None],
        on_exit: Callable[[WorkerHandle], None],
        load_timeout_s: float = 600.0,
    ):
        self.spec = spec
        self.load_timeout_s = load_timeout_s
        self._loop = loop
        self._on_message = on_message
        self._on_exit = on_exit
        self.state = WorkerState.STOPPED
        self.process: multiprocessing.process.BaseProcess | None = None
        self._exited = threading.Event()
        self.inbox: WorkerInbox | None = None
        self.ready: WorkerReady | None = None
        # The process's latest memory report (every memory_interval_s): what ListModels shows, never asked for.
        self.memory: WorkerMemory | None = None
        self.outstanding: set[int] = set()
        self.running = 0
        self.waiting = 0
        self.restarts = 0
        self.completed = 0
        self.consecutive_failures = 0
        self.last_error = ""
        self._failure = ""  # why the current process failed, when it said so (or was killed for it)
        self._generation = 0  # which process a thread's message belongs to

    @property
    def key(self) -> str:
        return self.spec.worker_key

    @property
    def index(self) -> int:
        return int(self.key.rsplit("/", 1)[1])

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None and self.process.pid else 0

    def start(self) -> None:
        self._generation += 1
        generation = self._generation
        # Both pipes are one-way, and each end lives in one process only: when the worker dies, even in the
        # middle of a message, the reader here sees EOF and the inbox's writes fail instead of blocking.
        inbox_reader, inbox_writer = _MP.Pipe(duplex=False)
        reader, writer = _MP.Pipe(duplex=False)
        self.ready, self.memory, self.running, self.waiting, self._failure = None, None, 0, 0, ""
        self.process = _MP.Process(
            target=run_worker,
            args=(self.spec, inbox_reader, writer),
            name=f"modelpool-worker-{self.key}",
            daemon=True,
        )
        self.state = WorkerState.STARTING
        self._exited = threading.Event()
        try:
            self.process.start()
        except BaseException:
            inbox_writer.close()
            reader.close()
            raise
        finally:
            writer.close()
            inbox_reader.close()
        self.inbox = WorkerInbox(inbox_writer, name=f"inbox-{self.key}")
        _LOGGER.info(
            "started worker %s (pid %d, CUDA_VISIBLE_DEVICES=%r)", self.key, self.pid, self.spec.cuda_visible_devices
        )
        process = self.process
        threading.Thread(
            target=self._relay, args=(process, reader, generation, self._exited), daemon=True, name=f"relay-{self.key}"
        ).start()
        threading.Thread(
            target=self._watch, args=(process, self._exited), daemon=True, name=f"watch-{self.key}"
        ).start()
        self._loop.call_later(self.load_timeout_s, self._if_current, generation, self._check_loaded)

    def _check_loaded(self) -> None:
        if self.state is WorkerState.STARTING and self.process is not None:
            self._failure = f"did not load its model within {self.load_timeout_s:g} s (load timeout)"
            _LOGGER.error("worker %s (pid %s) %s; killing it", self.key, self.pid, self._failure)
            self.process.kill()

    def _relay(self, process, reader, generation: int, exited: threading.Event) -> None:
        """Relay messages in order until EOF; report the exit only after everything the process wrote."""
        while True:
            try:
                message = reader.recv()
            except EOFError:
                break
            except Exception as exc:  # noqa: BLE001  (a torn message from a dying process: stop reading)
                _LOGGER.warning("worker %s: unreadable message, waiting for its exit: %s", self.key, exc)
                break
            self._post(generation, self._handle_message, message)
        reader.close()
        exited.wait()
        self._post(generation, self._handle_exit, process.exitcode)

    @staticmethod
    def _watch(process, exited: threading.Event) -> None:
        # The only thread that joins (reaps) the process; others wait for `exited`.
        process.join()
        exited.set()

    def _post(self, generation: int, fn, *args) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone
            self._loop.call_soon_threadsafe(self._if_current, generation, fn, *args)

    def _if_current(self, generation: int, fn, *args) -> None:
        if generation == self._generation:
            fn(*args)

    def _handle_message(self, message) -> None:
        if isinstance(message, StepOutput):
            if message.memory is not None:
                self.memory = message.memory
        elif isinstance(message, WorkerReady):
            self.ready, self.memory = message, message.memory
            self.state = WorkerState.READY
            self.consecutive_failures = 0
        elif isinstance(message, WorkerFailed):
            self._failure = message.error
        self._on_message(self, message)

    def _handle_exit(self, exitcode: int | None) -> None:
        if self.inbox is not None:
            self.inbox.close()
        if self.state is WorkerState.STOPPED:
            return
        self.last_error = self._failure or f"worker process exited with code {exitcode}"
        _LOGGER.error("worker %s (pid %s) died: %s", self.key, self.pid, self.last_error)
        self.state = WorkerState.RESTARTING
        self.ready = self.memory = None
        self._on_exit(self)

    def send(self, message) -> None:
        """Queue a message for the worker process; raises InboxClosed when it is gone."""
        if self.inbox is None:
            raise InboxClosed(f"worker {self.key} was never started")
        self.inbox.put(message)

    def next_backoff(self, initial: float, maximum: float) -> float:
        delay = min(maximum, initial * (2**self.consecutive_failures))
        self.consecutive_failures += 1
        return delay

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the worker to exit, then make sure it did (blocking; call from a thread)."""
        self.state = WorkerState.STOPPED
        self._generation += 1  # late messages of this process are ignored
        process, exited = self.process, self._exited
        if process is None or exited.is_set():
            return
        with contextlib.suppress(InboxClosed):
            self.send(StopWorker())
        if not exited.wait(timeout):
            _LOGGER.warning("worker %s did not stop in %.0f s; terminating", self.key, timeout)
            process.terminate()
            if not exited.wait(5):
                process.kill()
                exited.wait()
        if self.inbox is not None:
            self.inbox.close()
