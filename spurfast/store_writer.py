"""The embedding pass's store writes on a thread of their own, one batch behind the models.

Writing a batch (its pixel rows through the page cache and their fdatasync, the small
columns' msync, the manifest's atomic replace) took 2.8-3.6 s of a 100k-image pass on two
CPU cores, time the models waited for; on a GPU host, whose whole pass takes seconds, it is
a large share.  The syscalls release the GIL, so the next batch computes meanwhile.  Batches
are still written in order, each marked done only once its rows are on disk, so an
interrupted run resumes as before; at most ``depth`` batches wait in memory.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

log = logging.getLogger(__name__)


class BackgroundWriter:
    """``store.write`` of each ``put`` batch, in order, on one thread.  Use as a context
    manager: leaving it waits for every batch put so far (an interrupted pass keeps them)
    and raises a failed write's error, unless another exception is already on its way."""

    def __init__(self, store, depth: int = 1, timings: dict | None = None):
        self.store, self._timings = store, timings
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="spurfast-store-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:   # nothing after a failed batch: its rows are not done
                continue
            start, values, bad, manifest = item
            t = time.perf_counter()
            try:
                self.store.manifest.update(manifest)   # saved with the batch's "done"
                self.store.write(start, values, bad)
            except BaseException as exc:   # handed to the pass at its next put, or on leaving
                self._error = exc
            if self._timings is not None:
                self._timings["write_busy_s"] = self._timings.get("write_busy_s", 0.0) + time.perf_counter() - t

    def put(self, start: int, values: dict, bad: dict | None = None, manifest: dict | None = None) -> None:
        """Queue rows ``start``.. (``store.write``'s arguments; the arrays must not change
        afterwards) and ``manifest`` entries saved with them; waits while ``depth`` batches
        are queued.  Raises the error of a write that failed."""
        self._raise()
        self._queue.put((start, values, bad, dict(manifest or {})))

    def close(self) -> None:
        """Wait until every batch put so far is written (or skipped after a failure)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        if exc_type is None:
            self._raise()
        elif self._error is not None and exc is not self._error:   # the pass's own error goes on
            log.error("writing the embedding store failed too: %s", self._error)
