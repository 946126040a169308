"""A background thread for a run's file writes (label PNGs, contingency parts, per-image records,
qualitative pictures), so that the main thread can score the next batch meanwhile.

Jobs run one at a time in the order they were submitted. A batch's records are submitted after
the files they name, so they reach ``per_image.jsonl`` only once those files are written (each
atomically and fsynced): the resume guarantee holds as with writes on the main thread. The first
job that fails stops every later one (no record is appended after a failed write) and its
exception is raised on the main thread, at the next :meth:`Writer.submit` or at
:meth:`Writer.close`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = object()


class Writer:
    """Runs ``fn(*args)`` jobs on one daemon thread, in submission order. ``max_pending`` jobs at
    most wait in the queue (a slower disk then holds the main thread back instead of memory
    filling with predictions: 64 jobs are ~6 batches of 8 at 512 px, ~4 MiB a prediction and its
    label)."""

    def __init__(self, max_pending: int = 64) -> None:
        self._jobs: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._reported = False
        self._thread = threading.Thread(target=self._work, name="eval-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            if self._error is None:  # after a failure the rest is dropped, never half done
                fn, args = job
                try:
                    fn(*args)
                except BaseException as e:  # re-raised on the main thread
                    self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            self._reported = True
            raise self._error

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)``; raises the error of a job that failed earlier instead."""
        self._raise()
        if not self._thread.is_alive():
            raise RuntimeError("the writer is closed")
        self._jobs.put((fn, args))

    def close(self) -> None:
        """Wait for every queued job, stop the thread; raises the first failed job's error.
        An error already raised by :meth:`submit` is not raised again (closing in the cleanup
        of that error stays quiet)."""
        if self._thread.is_alive():
            self._jobs.put(_STOP)
            self._thread.join()
        if not self._reported:
            self._raise()
