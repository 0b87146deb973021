"""Tasks run a few at a time on threads, their results taken in the tasks' order.

Confirmation on a GPU host is host work: each finding's random controls are drawn with numpy
and built with torch, ~20 ms per 256 images, beside forwards of well under a millisecond, so
confirming one finding at a time left the GPU and all host cores but one idle.  Findings are
independent (each draws from generators seeded by the run's seed alone), so several can run at
once and give exactly the results of one at a time.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def run_in_order(tasks: Iterable[Callable[[], T]], at_once: int) -> Iterator[T]:
    """Each of ``tasks``' callables called, up to ``at_once`` at a time on threads of their own
    (in the caller's thread when ``at_once`` is 1), and its result yielded in the tasks' order.
    ``tasks`` is advanced in the caller's thread, at most ``at_once + 1`` tasks past the result
    yielded last: what making a task reads stays in that thread, and what the tasks hold stays
    bounded.  A task's error is raised in its place, and so is an error making one: the tasks
    made before it yield their results first (their work is done, and a caller keeps it);
    closing the iterator early drops the tasks not started and waits for those running."""
    if at_once <= 1:
        for task in tasks:
            yield task()
        return
    pool = ThreadPoolExecutor(at_once, thread_name_prefix="spurfast-in-order")
    running: deque = deque()
    tasks = iter(tasks)
    try:
        while True:
            try:
                task = next(tasks)
            except StopIteration:
                break
            except BaseException:   # those made before it are running or done: theirs first
                while running:
                    yield running.popleft().result()
                raise
            running.append(pool.submit(task))
            if len(running) > at_once:   # one made ahead while ``at_once`` run
                yield running.popleft().result()
        while running:
            yield running.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
