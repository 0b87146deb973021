"""run_in_order: tasks a few at a time on threads, results in the tasks' order."""
import threading
import time

import pytest

from spurfast.in_order import run_in_order
from tests.helpers import AtOnce


def _sleeper(i, log):
    def task():
        log.append(("start", i))
        time.sleep(0.02 * (5 - i % 5))   # later tasks finish first
        log.append(("end", i))
        return i * i
    return task


@pytest.mark.parametrize("at_once", [1, 2, 4])
def test_results_come_in_the_tasks_order(at_once):
    log = []
    assert list(run_in_order((_sleeper(i, log) for i in range(9)), at_once)) == [i * i for i in range(9)]
    assert sorted(e for e in log if e[0] == "end") == [("end", i) for i in range(9)]


def test_one_at_a_time_runs_in_the_callers_thread_and_several_on_others():
    alone = AtOnce(lambda: None, parties=1)
    list(run_in_order((alone for _ in range(3)), 1))
    assert alone.threads == {threading.current_thread().name}
    together = AtOnce(lambda: None, parties=3)   # the first three wait for each other: they run at once
    list(run_in_order((together for _ in range(6)), 3))
    assert threading.current_thread().name not in together.threads and together.calls == 6


def test_tasks_run_together_and_are_made_at_most_one_ahead():
    running, most, made, state = [0], [0], [0], threading.Lock()
    yielded = [0]

    def task():
        with state:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.03)
        with state:
            running[0] -= 1

    def tasks():
        for _ in range(10):
            made[0] += 1
            assert made[0] - yielded[0] <= 3 + 1, (made[0], yielded[0])   # at_once running, one made ahead
            yield task
    for _ in run_in_order(tasks(), 3):
        yielded[0] += 1
    assert most[0] == 3 and yielded[0] == 10


def test_an_error_is_raised_in_its_place_and_leaving_early_drops_the_rest():
    started = []

    def ok(i):
        def task():
            started.append(i)
            time.sleep(0.01)
            return i
        return task

    def bad():
        raise ValueError("task 2")
    got = []
    with pytest.raises(ValueError, match="task 2"):
        for r in run_in_order(iter([ok(0), ok(1), bad, ok(3)] + [ok(i) for i in range(4, 50)]), 2):
            got.append(r)
    assert got == [0, 1]
    assert len(started) < 10   # the tasks not started when it was raised were dropped


@pytest.mark.parametrize("at_once", [1, 2, 3, 5])
def test_an_error_making_a_task_comes_after_the_results_of_those_made_before_it(at_once):
    # making a task reads its inputs (confirmation: the finding's images, a model forward): a read
    # error there must not drop the results of findings already confirmed, which the caller keeps
    def tasks():
        for i in range(6):
            if i == 3:
                raise OSError("reading the images of task 3")
            yield _sleeper(i, [])
    got = []
    with pytest.raises(OSError, match="task 3"):
        for r in run_in_order(tasks(), at_once):
            got.append(r)
    assert got == [0, 1, 4]
