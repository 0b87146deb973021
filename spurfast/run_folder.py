"""A run's output folder: claimed for one run (run.json), locked while a run writes it,
emptied by ``--overwrite`` only where spurfast wrote it and the run reads nothing from it,
and the list of the pool's unreadable files it keeps (bad_files.json)."""
from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

from .atomic_files import remove_killed_writers_files
from .checks import json_document
from .data.sources import ImageSource
from .identity import IDENTITY_SCHEME
from .store import _write_json, unmark_stores

log = logging.getLogger("spurfast")

BAD_FILES = "bad_files.json"
WORK_DIR = "discovery-work"   # discovery's finished pieces (`spurfast.discovery_work`)
CONFIRM_WORK = "confirm"      # WORK_DIR's folder of finished confirmations (`spurfast.confirm_work`)

_HELD: dict[str, tuple[int, int]] = {}   # output directories this process holds: path -> (descriptor, thread)


def _drop_in_child() -> None:
    """In a forked child (a DataLoader worker), close its copies of the locks: they held them
    too, so a run killed with SIGKILL left its folder locked while its orphaned workers lived
    (torch's parent check: 5 s), and an immediate rerun was refused as "in use".  The parent's
    own descriptors keep the locks."""
    for fd, _ in _HELD.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_in_child)


def hold_output(out: Path) -> None:
    """Lock the output directory ``out`` for this thread until `release_output` (an exclusive
    ``flock`` on the directory, nothing where ``fcntl`` is missing), or raise FileExistsError
    if another process, or another thread of this one, holds it.  Two runs on one folder, both
    exiting 0, left every finding with another's pictures: each applied the confirmed-first
    renaming to the same files (two threads of a service did it too: the process's lock let
    both in)."""
    key = str(out.resolve())
    if key in _HELD:
        if _HELD[key][1] == threading.get_ident():   # this call's caller (the demo's run_discovery)
            return
        raise FileExistsError(f"output directory {out} is in use by another thread of this process; wait for its "
                              f"run to finish, or choose another output directory")
    try:
        import fcntl
    except ImportError:   # not POSIX
        return
    fd = os.open(key, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:   # EWOULDBLOCK: another descriptor holds it
        os.close(fd)
        raise FileExistsError(f"output directory {out} is in use by another spurfast process; wait for it to "
                              f"finish (or stop it), or choose another output directory") from None
    except OSError as exc:
        # a file system without locks (NFS without lockd: ENOLCK; Lustre noflock): every run
        # was refused as "in use", where the README asks for a folder every rank sees
        log.warning("cannot lock output directory %s (%s): two runs given this folder at once are not kept "
                    "apart", out, exc)
    # two threads past the check above at once: flock on two descriptors of one process
    # excludes the second too, so only one gets here
    _HELD[key] = (fd, threading.get_ident())


def holds_output(out) -> bool:
    """Whether this thread holds the output directory ``out`` (`hold_output`)."""
    held = _HELD.get(str(Path(out).resolve()))
    return held is not None and held[1] == threading.get_ident()


def release_output(out: Path) -> None:
    """Give up this thread's lock on ``out`` (`hold_output`)."""
    key = str(Path(out).resolve())
    if holds_output(out):
        os.close(_HELD.pop(key)[0])   # closing the descriptor releases its flock


def run_marker(run_id: str) -> dict:
    """run.json's contents: the run's id and the fingerprint scheme it was made under (a
    folder that records one is never matched by `prepare_output`'s ``earlier_ids``)."""
    return {"run_id": run_id, "identity": IDENTITY_SCHEME}


def prepare_output(out_dir, run_id: str, overwrite: bool, protect=(), earlier_ids=(), keep_store=None) -> Path:
    """Create ``out_dir`` for run ``run_id``; refuse a directory holding another run.

    ``overwrite`` replaces only another spurfast run (a directory with run.json), and
    never one that holds a path in ``protect`` (the pool, models, ... this run reads):
    a directory spurfast did not write is never deleted.  ``earlier_ids``: the ids
    earlier spurfast versions gave this same run; a directory holding one is resumed.
    ``keep_store``: called with the run's embedding store directory (``out_dir/store``),
    True when that store is this run's (same pool and models: a run that differs only in
    its discovery settings); ``overwrite`` then keeps it, and the pass resumes or reuses
    it instead of embedding the whole pool again (and keeps ``out_dir/discovery-work``,
    whose pieces are keyed by their inputs: another fdr reuses the neighbour search and
    the null)."""
    out = Path(out_dir)
    marker = out / "run.json"
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output directory {out} is a file")
    # a symlink to nowhere (an unmounted disk) in its place: mkdir said a bare "[Errno 17] File exists"
    dangling = next((q for q in (out, *out.parents) if q.is_symlink() and not q.exists()), None)
    if dangling is not None:
        raise FileNotFoundError(f"output directory {out}: {dangling} is a symlink to {os.readlink(dangling)}, which "
                                f"does not exist; create that folder, or choose another output directory")
    # a file above it failed at mkdir with a bare "[Errno 20] Not a directory: 'FILE/x'"
    blocker = next((q for q in out.parents if q.exists() and not q.is_dir()), None)
    if blocker is not None:
        raise NotADirectoryError(f"output directory {out}: {blocker} is a file, not a folder")
    # a run killed while writing its first run.json left only run.json.PID.tmp: the folder then
    # read as one spurfast did not write, refused even with --overwrite
    remove_killed_writers_files(out, lambda name: name == marker.name)
    out.mkdir(parents=True, exist_ok=True)
    was_held = holds_output(out)
    hold_output(out)
    try:
        return _claim(out, marker, run_id, overwrite, protect, earlier_ids, keep_store)
    except BaseException:   # refused (or interrupted): the folder is not this process's to keep
        if not was_held:
            release_output(out)
        raise


def _claim(out: Path, marker: Path, run_id: str, overwrite: bool, protect, earlier_ids, keep_store) -> Path:
    """`prepare_output`'s checks and clearing of the folder ``out``, which this process holds."""
    if any(out.iterdir()):
        try:
            held = json_document(marker.read_text()) if marker.is_file() else {}
            prev, scheme = held.get("run_id"), held.get("identity")
        except (ValueError, AttributeError):  # an unreadable marker proves nothing: keep the folder
            prev = scheme = None
        if prev is None:
            raise FileExistsError(f"output directory {out} holds files spurfast did not write (no readable run.json); "
                                  f"spurfast never deletes such a directory, even with --overwrite: "
                                  f"choose a new or empty directory")
        if prev in earlier_ids and scheme is None:   # earlier versions' ids: for their runs alone
            log.info("%s holds this run under the id an earlier spurfast version gave it (%s); resuming it", out, prev)
        elif prev != run_id:
            store = out / "store"
            reuse = keep_store is not None and store.is_dir() and keep_store(store)
            if not overwrite:
                raise FileExistsError(f"output directory {out} already holds run {prev}; choose another directory "
                                      f"or pass --overwrite" + (" (its embedding store, of this pool and these "
                                                                 "models, is kept and reused)" if reuse else ""))
            inside = _inside(out, protect)
            if inside:
                raise FileExistsError(f"--overwrite would delete output directory {out}, which holds {inside} "
                                      f"that this run reads; choose another output directory")
            if reuse:
                log.info("--overwrite: keeping the embedding store %s (made from this pool and these models)", store)
            # and with it the discovery work, kept under a hash of its inputs: another --fdr or --n-null
            # reuses the neighbour search and the null, another --k the search (deleted, both were redone)
            kept = {marker.name}
            if reuse:
                kept |= {store.name} | ({WORK_DIR} if (out / WORK_DIR).is_dir() else set())
            # empty it rather than rmtree(out): rmtree refuses a symlinked --out (the link stays);
            # run.json stays until the new one replaces it, so an interrupted --overwrite leaves a
            # run that one can overwrite (deleted, a kept store alone read as files not spurfast's)
            gone = sorted(c.name for c in out.iterdir() if c.name not in kept)
            if gone:   # files of the user's own in a run's folder go too: said, not silent
                log.warning("--overwrite: deleting %d entries of %s: %s%s", len(gone), out, ", ".join(gone[:12]),
                            f", ... ({len(gone) - 12} more)" if len(gone) > 12 else "")
            for child in out.resolve().iterdir():
                if child.name in kept:
                    continue
                if child.is_dir() and not child.is_symlink():
                    unmark_stores(child)   # the old store's manifest first (see unmark_stores)
                    shutil.rmtree(child)
                else:
                    child.unlink()
    # a file (or a dangling link) where a run keeps a folder failed at that folder's mkdir with a
    # bare "[Errno 17] File exists", after the embedding pass and discovery (images, rankings)
    for sub in ("store", WORK_DIR, "images", "rankings"):
        d = out / sub
        if (d.is_symlink() or d.exists()) and not d.is_dir():
            raise NotADirectoryError(f"output directory {out}: {d} is not a folder; the run keeps its {sub} there: "
                                     f"move or remove it")
        # a rerun deletes the per-finding files it finds in images/ and rankings/: through a link those
        # would be files outside the run (the page's writer already refuses a linked images/)
        if sub in ("images", "rankings") and d.is_symlink():
            raise ValueError(f"output directory {out}: {d} is a symbolic link; the run writes and deletes its "
                             f"per-finding files there, so it must be a real folder: remove the link")
    _write_json(marker, run_marker(run_id), indent=None)   # atomic: a torn run.json locks the user out
    return out


def _inside(out: Path, paths) -> str | None:
    """The first of ``paths`` that is ``out`` or lies under it, else None: resolved (a link
    from the pool into ``out``) or as spelled (a pool read through a link inside ``out``,
    which --overwrite deletes: its files resolve elsewhere and were called safe)."""
    roots = {str(out.resolve()), os.path.abspath(out)}
    unders = tuple(r.rstrip(os.sep) + os.sep for r in roots)
    dirs = {}   # each folder resolved once: resolving each of a million pool files took minutes
    for p in paths:
        if p is None:
            continue
        head, name = os.path.split(os.fspath(p))
        if name in ("", ".", "..") or os.path.islink(p):
            seen = (str(Path(p).resolve()), os.path.abspath(p))
        else:   # a file that is no symlink lies where its folder does, resolved or as spelled
            if head not in dirs:
                dirs[head] = (str(Path(head or ".").resolve()), os.path.abspath(head or "."))
            seen = (os.path.join(dirs[head][0], name), os.path.join(dirs[head][1], name))
        if any(c in roots or c.startswith(unders) for c in seen):
            return str(p)
    return None


def _sources(source):
    """``source`` and, recursively, the sources it wraps (ConcatSource parts, SubsetSource base)."""
    yield source
    for part in list(getattr(source, "parts", None) or []) + [getattr(source, "base", None)]:
        if isinstance(part, ImageSource):
            yield from _sources(part)


def _folder_inside(out_dir, source) -> str | None:
    """The image folder of ``source`` (or of one of its parts) that ``out_dir`` lies in."""
    roots = [getattr(s, "root", None) for s in _sources(source)] if source is not None else []
    return next((str(r) for r in roots if isinstance(r, (str, Path)) and _inside(Path(r), [out_dir])), None)


def source_paths(source) -> list[str]:
    """Files and folders an ImageSource reads from (folder root, .npz path, of every part),
    then its class folders and image files: a symlinked class folder or image may live
    elsewhere (inside an old run's output directory, say) than its root."""
    parts = list(_sources(source))
    found = [getattr(s, a) for s in parts for a in ("root", "path") if isinstance(getattr(s, a, None), (str, Path))]
    files = [f for s in parts for f in (getattr(s, "paths", None) or [])]
    found += dict.fromkeys(os.path.dirname(f) for f in files)   # few, and resolved first
    return [str(p) for p in found] + [str(f) for f in files]


def read_bad_files(run_dir) -> dict:
    """A run's unreadable files (item id -> reason), for rewriting its report: RUN/bad_files.json,
    or for runs from before it was written, RUN/store's record of them (pool indices only)."""
    run = Path(run_dir)
    if (run / BAD_FILES).is_file():
        return json_document((run / BAD_FILES).read_text())
    manifest = run / "store" / "manifest.json"
    if manifest.is_file():
        from .store import EmbeddingStore
        bad = EmbeddingStore(manifest.parent).bad_files()
        return {f"pool index {int(i)}": r for i, r in sorted(bad.items(), key=lambda kv: int(kv[0]))}
    return {}
