"""Finished discovery work kept on disk, so an interrupted `discover` resumes.

At ImageNet scale on a CPU the exact latent neighbour search and the permutation null are
most of discovery (measured at 200k images x 1,000 classes: 34 s and 20 s of 60 s for ten
permutations; the search grows with the square of the pool), and an interruption lost both.
Each piece is saved as it finishes, under a key that hashes everything it depends on: the
standardised latents, the predictions, labels, runner-up classes, which images count as
unrelated, the settings and the providers (with k-means across ranks, their number).  A
rerun with any of them changed finds no file of its key and computes afresh; files of other
keys are left alone (another setting's run may want them), temporary files of a killed
writer are removed.
The neighbour search, which reads the latents alone, has a key of its own (the latents, the
number of neighbours and what picks its provider): a rerun with another k reuses it.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np

from .atomic_files import QUIET_S, abandoned, replace_atomically, writer_pid

VERSION = 3   # bump when what a piece holds, or how it is computed, changes (2: latent_knn exact for tight
              # blobs; 3: k-means stops when every class has settled)


def work_key(arrays: dict, settings: dict) -> str:
    """sha256 (first 20 hex digits) of ``arrays`` (name -> ndarray: dtype, shape and bytes)
    and ``settings`` (JSON-able)."""
    h = hashlib.sha256(json.dumps({"v": VERSION, **settings}, sort_keys=True, default=str).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:20]


def sweep_killed_writers(root: Path, pattern: str = "*/*.npz.*.tmp", quiet_s: float = QUIET_S) -> None:
    """Remove the temporary files (``NAME.PID.tmp``, `replace_atomically`) matching ``pattern``
    that a killed writer left under ``root`` (default: its key folders' pieces): a SIGKILL
    mid-write left each behind for good (the neighbour lists' one is n x K int64, about 100 MB
    at 1.2M images).  A file is left alone while its process lives here or while it was
    written to within ``quiet_s``."""
    for tmp in Path(root).glob(pattern):
        if abandoned(tmp, writer_pid(tmp.name), quiet_s):
            tmp.unlink(missing_ok=True)


class DiscoveryWork:
    """Each null permutation's (scores, n_unrelated) of one key, in ``root / key``, and the
    neighbour lists in ``root / neighbour_key`` (default: ``key``); each written
    atomically when it is finished."""

    def __init__(self, root, key: str, neighbour_key: str | None = None):
        self.dir = Path(root) / key
        self.neighbour_dir = Path(root) / (neighbour_key or key)
        sweep_killed_writers(Path(root))

    def _save(self, name: str, folder: Path | None = None, **arrays) -> None:
        folder = self.dir if folder is None else folder
        folder.mkdir(parents=True, exist_ok=True)
        sweep_killed_writers(folder.parent)   # again: a writer killed less than quiet_s before this run began
        replace_atomically(folder / name, lambda fh: np.savez(fh, **arrays), mode="wb")

    def _load(self, name: str, folder: Path | None = None):
        try:
            with np.load((self.dir if folder is None else folder) / name, allow_pickle=False) as d:
                got = {k: d[k] for k in d.files}
        # none yet, or damaged: made again (zipfile raises NotImplementedError for a damaged
        # compression method, version or flag field; numpy returns a member that is not an
        # array as its bytes)
        except (OSError, ValueError, KeyError, EOFError, NotImplementedError, zipfile.BadZipFile):
            return None
        return got if all(isinstance(v, np.ndarray) for v in got.values()) else None

    def neighbours(self, compute):
        # lists kept with the nulls (neighbour_key None, as before neighbour keys) are read there too
        for folder in dict.fromkeys([self.neighbour_dir, self.dir]):
            got = self._load("neighbours.npz", folder)
            if got is not None and "idx" in got:
                return got["idx"]
        idx = compute()
        self._save("neighbours.npz", self.neighbour_dir, idx=idx)
        return idx

    def get_null(self, b: int):
        got = self._load(f"null-{b}.npz")
        return (got["score"], got["n_unrelated"]) if got is not None and {"score", "n_unrelated"} <= got.keys() else None

    def put_null(self, b: int, score: np.ndarray, n_unrelated: np.ndarray) -> None:
        self._save(f"null-{b}.npz", score=score, n_unrelated=n_unrelated)
