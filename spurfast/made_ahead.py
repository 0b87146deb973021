"""An iterator's items made on a thread of their own, a few ahead of the caller.

Confirmation draws its random controls with numpy (one image at a time, in a fixed rng order)
and builds them with torch: 22 ms of host work per 256 images, beside 18 ms of model forward
on this CPU and far less on a GPU, where the host work was most of the run.  Made on a thread,
they are ready when the model wants them; numpy's draws and torch's ops release the GIL for
most of that time.  The items, and every draw from a generator they use, are the same as
those of a plain loop: one thread makes them, in order.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

_END = object()


def made_ahead(items: Iterable, depth: int = 2) -> Iterator:
    """Yield ``items``' elements in order, each made on one worker thread up to ``depth``
    items ahead.  An error making one is raised here, in its place.  Closing the iterator
    (or leaving a loop over it early) stops the thread and waits for it, so the caller may
    use whatever the items' maker shares with it (an rng) once this returns."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(entry) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def make() -> None:
        try:
            for item in items:
                if not offer((True, item)):
                    return
        except BaseException as exc:   # raised in the caller, where the item was wanted
            offer((False, exc))
            return
        offer((True, _END))

    worker = threading.Thread(target=make, name="spurfast-made-ahead", daemon=True)
    worker.start()
    try:
        while True:
            made, item = slots.get()
            if not made:
                raise item
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        worker.join()
