"""The output directory's lock (`spurfast.run_folder.hold_output`) and forked children."""
import multiprocessing as mp
import os
import time

import pytest

from spurfast.run_folder import hold_output, release_output

fcntl = pytest.importorskip("fcntl")


def _linger(started):
    started.set()   # after the fork's hooks ran
    time.sleep(5)


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_a_forked_child_does_not_keep_the_runs_folder_locked(tmp_path):
    """DataLoader workers are forked and shared the lock's descriptor: after a SIGKILL of the
    run they kept the folder locked for about 5 s, and an immediate rerun was refused as "in
    use by another spurfast process"."""
    hold_output(tmp_path)
    ctx = mp.get_context("fork")
    started = ctx.Event()
    child = ctx.Process(target=_linger, args=(started,))
    child.start()
    try:
        assert started.wait(30)
        release_output(tmp_path)   # as the parent's death does
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # BlockingIOError while the child held it
        finally:
            os.close(fd)
    finally:
        child.terminate()
        child.join()
