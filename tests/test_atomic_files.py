"""atomic_files: which leftovers of killed writers may be removed."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spurfast.atomic_files import abandoned, replace_atomically, writer_pid


def _ended_pid() -> str:
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()


def test_writer_pid_reads_the_temporary_names_replace_atomically_makes(tmp_path, monkeypatch):
    seen = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (seen.append(os.path.basename(src)), real(src, dst)))
    replace_atomically(tmp_path / "a.npz", lambda fh: fh.write("x"))
    assert seen == [f"a.npz.{os.getpid()}.tmp"] and writer_pid(seen[0]) == str(os.getpid())
    assert writer_pid("pool.json.123.tmp") == "123"
    for other in ("pool.json", "a.tmp", "tmp", "a.123.txt", ""):
        assert writer_pid(other) == "", other


def test_a_leftover_is_abandoned_once_its_process_is_gone_and_it_is_quiet(tmp_path):
    gone = _ended_pid()
    f = tmp_path / f"a.npz.{gone}.tmp"
    f.write_text("x")
    assert not abandoned(f, gone)                      # written just now: maybe another namespace's writer
    old = time.time() - 120
    os.utime(f, (old, old))
    assert abandoned(f, gone)
    assert not abandoned(f, str(os.getpid()))          # this process: alive
    assert not abandoned(f, "")                        # no pid to judge
    assert not abandoned(tmp_path / "missing", gone)   # removed meanwhile by another sweep


def test_killed_writers_files_are_named_by_the_file_they_were_to_replace(tmp_path):
    from spurfast.atomic_files import killed_writer_target, remove_killed_writers_files
    gone = _ended_pid()
    names = {f"run.json.{gone}.tmp": "run.json", f"vae.pt.ckpt.{gone}.b2130d31.tmp": "vae.pt.ckpt",
             f"finding1.npy.{gone}.tmp": "finding1.npy", f"x.{os.getpid()}.tmp": None,   # alive: this process
             "a.tmp": None, f"a.{gone}.zz.tmp": None}
    for name in names:
        (tmp_path / name).write_text("x")
    assert {n: killed_writer_target(tmp_path / n) for n in names} == names
    remove_killed_writers_files(tmp_path, lambda n: n.endswith(".npy") or n == "run.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"vae.pt.ckpt.{gone}.b2130d31.tmp", f"x.{os.getpid()}.tmp", "a.tmp", f"a.{gone}.zz.tmp"])
    remove_killed_writers_files(tmp_path / "missing", lambda n: True)   # no folder: nothing to do


def test_a_save_killed_mid_write_leaves_no_temporary_file_after_the_next_save(tmp_path):
    """A kill inside torch.save left vae.pt.ckpt.PID.HEX.tmp (weights and Adam state) for good:
    every killed epoch one more."""
    import torch

    from spurfast.models.files import save_atomic
    gone = _ended_pid()
    (tmp_path / f"vae.pt.ckpt.{gone}.b2130d31.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / f"other.pt.{gone}.b2130d31.tmp").write_bytes(b"another file's: not this save's to remove")
    save_atomic({"epoch": 1}, tmp_path / "vae.pt.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"other.pt.{gone}.b2130d31.tmp", "vae.pt.ckpt"]
    assert torch.load(tmp_path / "vae.pt.ckpt", weights_only=True) == {"epoch": 1}
    # a HEX of digits alone (one save in 40) also reads as NAME.PID.PID.tmp: that leftover was kept
    (tmp_path / f"vae.pt.ckpt.{gone}.12345678.tmp").write_bytes(b"half a checkpoint")
    save_atomic({"epoch": 2}, tmp_path / "vae.pt.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"other.pt.{gone}.b2130d31.tmp", "vae.pt.ckpt"]


def test_a_save_into_a_missing_folder_names_the_path_not_the_temporary_file(tmp_path):
    from spurfast.models.files import save_atomic
    target = tmp_path / "missing" / "vae.pt"
    want = f"cannot save to {target}: its folder {target.parent} does not exist"
    with pytest.raises(FileNotFoundError, match=re.escape(want)):
        save_atomic({"epoch": 1}, target)


def test_a_failed_write_on_a_read_only_file_system_raises_its_own_error_once(tmp_path, monkeypatch):
    # the clean-up's unlink raised a second EROFS over the first: two chained tracebacks
    import errno

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(OSError, match="Read-only file system") as info:
        replace_atomically(tmp_path / "a.json", lambda fh: fh.write("{}"))
    assert info.value.__context__ is None, info.value.__context__


@pytest.mark.parametrize("writer", ["replace_atomically", "save_atomic"])
def test_a_file_is_on_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch, writer):
    """The temporary file's bytes are fsynced before the rename: a machine crash (not a killed
    process) could otherwise keep the rename and lose the bytes, an empty store manifest or
    checkpoint under the final name."""
    from spurfast.models.files import save_atomic

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_size)), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", None)), real_replace(src, dst)))
    monkeypatch.setattr(Path, "replace", lambda self, dst: os.replace(self, dst))
    if writer == "replace_atomically":
        replace_atomically(tmp_path / "a.json", lambda fh: fh.write("{}"))
    else:
        save_atomic({"epoch": 1}, tmp_path / "a.pt")
    assert [e for e, _ in events] == ["fsync", "replace"] and events[0][1] > 0, events
