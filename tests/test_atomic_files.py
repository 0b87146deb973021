"""atomic_files: which leftovers of killed writers may be removed."""
import os
import subprocess
import sys
import time

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
