"""The frontend's end of a worker's request pipe: `put` never blocks the event loop, and nothing outlives the worker.

A worker reads its pipe only between engine steps, so a burst of requests can
fill it; one sender thread per worker process does the blocking writes. The
read end lives only in the worker process, so when the worker dies every write,
even one already blocked on a full pipe, fails with a broken pipe and the
thread ends: no feeder thread left blocked at exit, no semaphore to leak (what
a `multiprocessing.Queue` per worker start left behind).
"""

from __future__ import annotations

import logging
import queue
import threading

_LOGGER = logging.getLogger(__name__)
_CLOSE = object()


class InboxClosed(Exception):
    """The worker behind this inbox is gone or being replaced."""


class WorkerInbox:
    def __init__(self, connection, name: str):
        self._connection = connection
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._send_all, daemon=True, name=name)
        self._thread.start()

    def put(self, message) -> None:
        """Queue `message` for the worker; raises InboxClosed once the worker is gone."""
        if self._closed:
            raise InboxClosed("the worker's inbox is closed")
        self._pending.put(message)

    def close(self) -> None:
        """Send nothing more; what is queued behind a blocked write is dropped with the worker."""
        self._closed = True
        self._pending.put(_CLOSE)

    @property
    def closed(self) -> bool:
        return self._closed

    def _send_all(self) -> None:
        try:
            while (message := self._pending.get()) is not _CLOSE:
                self._connection.send(message)
        except (OSError, ValueError) as exc:  # broken pipe: the worker is gone (its exit is reported elsewhere)
            _LOGGER.debug("inbox %s: %s", self._thread.name, exc)
        finally:
            self._closed = True
            self._connection.close()
