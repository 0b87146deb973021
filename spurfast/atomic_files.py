"""Files written whole or not at all, and the leftovers of writers killed mid-write.

Light on purpose (no torch): `spurfast make-pool`'s worker processes write through it too.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path


def replace_atomically(path: Path, write, mode: str = "w", *, durable: bool = True, **open_kw) -> None:
    """``write(fh)`` into a temporary file beside ``path`` (``NAME.PID.tmp``, opened with
    ``mode``, ``open_kw``), then renamed over it: an interruption leaves the old file or none,
    never a truncated one.  ``durable``: on the disk before the rename (`synced`); False for
    files written by the thousand that a rerun makes again (a pool's images, a report's
    pictures), where an fsync each cost make-pool 30% on this machine's disk."""
    # a temporary file of this process's own: ranks sharing a store may replace one
    # manifest at once, and a shared name is renamed away under the other writer
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **open_kw) as fh:
            write(fh)
            if durable:
                synced(fh)
        os.replace(tmp, path)
    except BaseException:   # Ctrl-C mid-write: a run directory holding only it read as not spurfast's
        try:
            tmp.unlink(missing_ok=True)
        except OSError:   # a read-only file system raised a second EROFS over the first
            pass
        raise


def synced(fh) -> None:
    """Flush ``fh`` and its file's data to the disk before it is renamed into place: after a
    crash of the machine (power, kernel; a killed process loses nothing) a rename the disk
    holds may otherwise name a file whose bytes it never got, an empty or partial file."""
    fh.flush()
    os.fsync(fh.fileno())


def process_gone(pid: str) -> bool:
    """Whether ``pid`` (as found in a leftover's name) names no running process, so what it
    left may be removed.  False for this process, for a name that is not a pid, for a process
    of another user, and off POSIX (``os.kill(pid, 0)`` asks about a process there only;
    elsewhere it ends it)."""
    if os.name != "posix" or not (pid.isascii() and pid.isdigit()) or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, OSError):   # alive under another user, or no such pid number
        return False
    return False                                        # alive (a concurrent run writing it)


QUIET_S = 60.0     # a leftover written to more recently than this is never swept


# the temporary names of `replace_atomically` (NAME.PID.tmp) and of
# `spurfast.models.files.save_atomic` (NAME.PID.HEX.tmp).  NAME as short as the rest allows: a
# greedy one read an all-digit HEX (one save_atomic name in 40) as the pid, and NAME.PID as the
# file it was to replace, which no caller accepts (that leftover was kept for good)
_TEMPORARY = re.compile(r"(.+?)\.([0-9]+)(?:\.[0-9a-f]{8})?\.tmp")


def writer_pid(name: str) -> str:
    """The pid in a temporary file's name (``NAME.PID.tmp``, ``NAME.PID.HEX.tmp``); '' for
    another name."""
    m = _TEMPORARY.fullmatch(name)
    return m.group(2) if m else ""


def killed_writer_target(entry: Path, targets=lambda name: True) -> str | None:
    """The name of the file that ``entry`` was to replace, if it is the temporary file of a
    writer killed mid-write (its process gone) and ``targets(name)`` accepts that name; None
    for any other entry (the name is read first: no file or process is asked about others)."""
    m = _TEMPORARY.fullmatch(entry.name)
    ok = (m is not None and targets(m.group(1)) and entry.is_file() and not entry.is_symlink()
          and process_gone(m.group(2)))
    return m.group(1) if ok else None


def remove_killed_writers_files(folder: Path, targets) -> None:
    """Remove the temporary files in ``folder`` of writers killed while replacing a file whose
    name ``targets(name)`` accepts: each kill left one for good (a model-sized one for a
    checkpoint), and one in a new run folder made it read as a folder spurfast did not write."""
    folder = Path(folder)
    for entry in folder.glob("*.tmp") if folder.is_dir() else ():
        if killed_writer_target(entry, targets) is not None:
            entry.unlink(missing_ok=True)


def abandoned(path: Path, pid: str, quiet_s: float = QUIET_S) -> bool:
    """Whether the leftover ``path`` (a temporary file or folder named by the ``pid`` that
    made it) may be removed: its process is gone (`process_gone`) and nothing was written to
    it for ``quiet_s``.  The quiet time covers a writer of another PID namespace sharing the
    folder (its pid means nothing here) and a folder between its creation and its lock."""
    if not process_gone(pid):
        return False
    try:
        return time.time() - path.stat().st_mtime > quiet_s
    except OSError:   # removed meanwhile (another sweep), or not ours to look at
        return False


OWNER = ".owner"   # in a private folder: locked (flock) by its process while it lives
_held: dict[str, int] = {}   # this process's private folders -> their lock's descriptor


def _hold(folder: Path) -> None:
    try:
        import fcntl
    except ImportError:   # not POSIX: nothing is swept there either (process_gone)
        return
    # locked under another name, then renamed: an OWNER file is always one a process locked,
    # so a free lock on it says its owner has ended (`_owner_state`)
    staged = folder / f"{OWNER}.{os.getpid()}"
    fd = os.open(staged, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:   # a file system without flock (NFS without lockd, Lustre noflock): the pid alone
        os.close(fd)
        staged.unlink(missing_ok=True)
        return
    os.replace(staged, folder / OWNER)
    _held[str(folder)] = fd


def _owner_state(folder: Path) -> str:
    """"held" while a process holds ``folder``'s lock (one whose pid means nothing here,
    another PID namespace such as a container sharing this /tmp, looks gone to
    `process_gone`), "ended" where the lock its owner took is free, "unknown" where there is
    none to ask (made before its lock, or on a file system without flock)."""
    try:
        import fcntl
    except ImportError:
        return "held"
    try:
        fd = os.open(folder / OWNER, os.O_RDWR)
    except FileNotFoundError:
        return "unknown"
    except OSError:
        return "held"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return "ended"
    except OSError:
        return "held"
    finally:
        os.close(fd)


def release_folder(folder: str | Path) -> None:
    """Remove a `private_folder` of this process and let go of its lock."""
    shutil.rmtree(folder, ignore_errors=True)
    fd = _held.pop(str(folder), None)
    if fd is not None:
        os.close(fd)


def private_folder(prefix: str, root: str | Path | None = None) -> Path:
    """A new temporary folder ``PREFIX<pid>-<random>`` under ``root`` (default: the system's
    temporary folder, ``TMPDIR``), once the folders of the same prefix whose process is gone are
    removed: a process killed before its clean-up ran (a rank killed mid-run, a worker ended
    with ``os._exit``) left its folder there for good.  The folder holds a lock (`OWNER`) for as
    long as this process (or a child it forked) lives; `release_folder` removes it."""
    base = Path(root) if root is not None else Path(tempfile.gettempdir())
    for d in base.glob(f"{prefix}*-*") if base.is_dir() else ():
        # this process's own live folders are skipped: where flock is emulated with per-process
        # POSIX locks (NFS), their lock reads free to this process
        if not d.is_dir() or any(os.path.exists(k) and d.samefile(k) for k in _held):
            continue
        # a free lock ends it at once (a rerun within a minute of a kill left the killed pass's
        # rankings beside its own finished run); without a lock, the pid and a quiet minute
        state = _owner_state(d)
        if state == "ended" or (state == "unknown" and abandoned(d, d.name[len(prefix):].split("-", 1)[0])):
            shutil.rmtree(d, ignore_errors=True)
    base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=base))
    _hold(folder)
    return folder
