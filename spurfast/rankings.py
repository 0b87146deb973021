"""Each finding's pool-wide ranking, kept on disk rather than in memory.

A ranking holds one score per pool image (float32 from the latent probe, float64 once
`spurfast.pattern_rank` re-ranks a localised finding), and a run keeps one per finding
until it writes them: at ImageNet scale (1.28M images) 5-10 MB each, gigabytes for the
hundreds of findings of a thousand classes.  `SpilledRankings` is the ``{rank: ranking}``
mapping the pipeline passes around, with every value in its own ``.npy`` file of a
temporary folder (discovery puts it in the run's work folder: ``TMPDIR`` is often a tmpfs,
memory again) and read back memory-mapped (read-only), so memory holds about one ranking
at a time whatever the number of findings.  The folder goes when the mapping is garbage
collected or closed; values read before stay valid on POSIX (an unlinked file's mapping
lives on).  A run killed before that leaves its folder behind; the next mapping made in the
same place removes the folders of processes that no longer run (their names carry the pid)
and that nothing has written to for `spurfast.atomic_files.QUIET_S` (a minute: a writer in
another PID namespace sharing the folder looks gone by its pid), so a rerun within that
minute leaves the killed run's folder for a later one.
"""
from __future__ import annotations

import os
import shutil
import weakref
from collections.abc import MutableMapping
from pathlib import Path

import numpy as np

from .atomic_files import private_folder, release_folder, replace_atomically


PREFIX = "spurfast-rankings-"   # then the writer's pid, "-", and mkdtemp's random part


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:   # still mapped where that forbids it (Windows): goes with the folder
        pass


class SpilledRankings(MutableMapping):
    """``{finding rank: ranking array}`` with the arrays in ``.npy`` files under ``folder``
    (default: the system's temporary folder, ``TMPDIR``).  ``mapping[key] = arr`` saves a copy
    of ``arr``; ``mapping[key]`` is a read-only memory map of it."""

    def __init__(self, items=(), folder: str | Path | None = None):
        self._dir = private_folder(PREFIX, folder)
        self._files: dict = {}
        self._written = 0
        self._finalizer = weakref.finalize(self, release_folder, str(self._dir))
        self.update(items)

    @property
    def folder(self) -> Path:
        return self._dir

    def __setitem__(self, key, value) -> None:
        # a new file per write: a memory map handed out earlier for this key keeps its values
        path = self._dir / f"{self._written}.npy"
        self._written += 1
        np.save(path, np.asarray(value))
        old = self._files.get(key)
        self._files[key] = path
        if old is not None:
            _remove(old)

    def __getitem__(self, key) -> np.ndarray:
        return np.load(self._files[key], mmap_mode="r")

    def __delitem__(self, key) -> None:
        _remove(self._files.pop(key))

    def __iter__(self):
        return iter(list(self._files))   # a snapshot: callers replace values while iterating

    def __len__(self) -> int:
        return len(self._files)

    def __repr__(self) -> str:
        return f"SpilledRankings({sorted(self._files)}, folder={str(self._dir)!r})"

    def export(self, key, path: str | Path) -> None:
        """Put ``key``'s ranking at ``path`` (an ``.npy`` file, replaced whole): a hard link to
        its file where the file system allows one (no copy of gigabytes of rankings at
        ImageNet scale), else a copy.  Values are never written in place, so the link keeps
        its values whatever the mapping does next."""
        src, path = self._files[key], Path(path)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            tmp.unlink(missing_ok=True)
            os.link(src, tmp)
            os.replace(tmp, path)
            # where path already named this very file (exported before), the rename did nothing
            # and left the temporary name
            tmp.unlink(missing_ok=True)
        except OSError:   # another file system, or one without links
            tmp.unlink(missing_ok=True)
            def copy(fh):
                with open(src, "rb") as fin:
                    shutil.copyfileobj(fin, fh)
            replace_atomically(path, copy, "wb")

    def close(self) -> None:
        """Remove the folder now (also done when the mapping is garbage collected)."""
        self._files.clear()
        self._finalizer()


def save_ranking(rankings: MutableMapping, key, path: str | Path) -> None:
    """Write ``rankings[key]`` to the ``.npy`` file ``path`` (replaced whole): a
    `SpilledRankings` links its file there (`SpilledRankings.export`), any other mapping's
    array is saved."""
    if isinstance(rankings, SpilledRankings):
        rankings.export(key, path)
    else:
        arr = np.asarray(rankings[key])
        replace_atomically(Path(path), lambda fh: np.save(fh, arr), "wb")
