"""The on-disk embedding store and how a store is recognised.

A store is a directory of memory-mapped ``.npy`` columns (latent mean, predictions,
probabilities, penultimate features, labels, ...) plus ``manifest.json`` (and
``bad_files.jsonl``, the unreadable files, where there are any).  Rows are written in pool
order; the manifest's ``done`` counter is replaced atomically after each flush, so an
interrupted pass resumes at the first unfinished row.  A store is recognised by the
fingerprint of its pool and models (`spurfast.identity`) and its pool's content digest;
`legacy_identities` recognises the ones earlier versions wrote.  The pass that fills it is
`spurfast.embed`; one store per rank, and their merge, `spurfast.store_shards`.
"""
from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from .atomic_files import replace_atomically
from .checks import json_document
from .data.sources import ImageSource, sampled_digest, utf8_name
from .identity import IDENTITY_SCHEME, fingerprint, weights_fingerprint

log = logging.getLogger("spurfast.embed")   # the pass's: its messages read as before the split

MANIFEST = "manifest.json"
WIDE_ROW_BYTES = 4096   # a column whose rows are larger is read and written unmapped (EmbeddingStore.read_rows)
BAD_LOG = "bad_files.jsonl"   # unreadable files, appended a batch at a time (EmbeddingStore.bad_files)


def _reserve(path: Path) -> None:
    """Give the sparse column file ``path`` its disk blocks now: a row written into a page of a
    full disk through the memory map ended the run with SIGBUS ("Bus error", no message; the
    store resumed afterwards).  Reserved, a full disk is an OSError here, before any work.  A
    file system without fallocate keeps the file sparse."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # the pool's pixels are the one column a run can do without (spurfast.pixel_cache)
            pixels = "; the pool's pixels are kept only to save decoding them again: SPURFAST_PIXEL_CACHE_GB=0 " \
                     "keeps none" if path.name == "pixels.npy" else ""
            raise OSError(exc.errno, f"no space for the embedding store's column {path} "
                                     f"({os.fstat(fd).st_size} bytes): {os.strerror(exc.errno)}{pixels}") from None
    finally:
        os.close(fd)


class EmbeddingStore:
    """Columns: pred (int32), conf (fp32), probs (n x C fp32), mu (n x L fp32),
    feats (n x F fp16), labels (int64), ok (bool: the image decoded); and for a folder pool
    pixels (n x C x H x W uint8, `spurfast.pixel_cache`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.root} is not an embedding store (no {MANIFEST})")
        try:
            self.manifest = json_document(path.read_text())
        except ValueError as exc:   # json's "Expecting value: line 1 column 1 (char 0)" named no file
            raise ValueError(f"{path} is not readable JSON ({exc}), not a manifest as spurfast writes it; "
                             f"remove {self.root} to embed the pool again") from None
        if not isinstance(self.manifest, dict):   # a hand edit: every use failed with an AttributeError
            raise ValueError(f"{path} holds a JSON {type(self.manifest).__name__}, expected an object (as spurfast "
                             f"writes it)")
        self._arrays: dict[str, np.memmap] = {}
        self._layouts: dict[str, tuple] = {}   # the wide columns' .npy headers, read once (`_layout`)

    @classmethod
    def create(cls, root, n: int, columns: dict[str, tuple[tuple[int, ...], str]], meta: dict,
               initial: dict[str, np.ndarray] | None = None) -> "EmbeddingStore":
        """A new store of ``n`` rows; ``initial``: columns' values to write now.  The
        manifest comes last: a store interrupted while being created is no store (a shard's
        ``index`` read as zeros would merge every row onto pool row 0)."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        (root / MANIFEST).unlink(missing_ok=True)  # an older store here is gone from now on
        (root / BAD_LOG).unlink(missing_ok=True)
        for name, (shape, dtype) in columns.items():
            arr = np.lib.format.open_memmap(root / f"{name}.npy", mode="w+", dtype=dtype, shape=(n,) + tuple(shape[1:]))
            _reserve(root / f"{name}.npy")
            if initial is not None and name in initial:
                arr[:] = initial[name]
            arr.flush()
            del arr
        manifest = {"n": n, "done": 0, "columns": {k: [list(s), d] for k, (s, d) in columns.items()}, **meta}
        _write_json(root / MANIFEST, manifest)
        return cls(root)

    @property
    def n(self) -> int:
        return int(self.manifest["n"])

    @property
    def done(self) -> int:
        return int(self.manifest["done"])

    @property
    def complete(self) -> bool:
        return self.done >= self.n

    def array(self, name: str, writable: bool = False) -> np.ndarray:
        key = (name, writable)
        if key not in self._arrays:
            self._require_column(name)
            path = self.root / f"{name}.npy"
            try:
                self._arrays[key] = np.load(path, mmap_mode="r+" if writable else "r")
            except ValueError as exc:   # cut short: "mmap length is greater than file size", naming no file
                raise ValueError(f"{path} (a column of store {self.root}) cannot be read ({exc}): damaged or cut "
                                 f"short; remove {self.root} to embed the pool again") from None
        return self._arrays[key]

    def _require_column(self, name: str) -> None:
        if name not in self.manifest["columns"]:   # not kept (pixels): no file to call damaged
            raise KeyError(f"store {self.root} has no column {name!r}; columns: {sorted(self.manifest['columns'])}")

    def __getitem__(self, name: str) -> np.ndarray:
        return self.array(name)

    def row_bytes(self, name: str) -> int:
        """Bytes a row of column ``name`` holds."""
        shape, dtype = self.manifest["columns"][name]
        return int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize

    def wide(self, name: str) -> bool:
        """Whether column ``name`` is the pool's pixels, or its rows are larger than
        `WIDE_ROW_BYTES`: read and written with pread/pwrite, never mapped (see `read_rows`)."""
        return name == "pixels" or self.row_bytes(name) > WIDE_ROW_BYTES

    def _layout(self, name: str) -> tuple[Path, int, tuple, np.dtype]:
        """(path, byte offset of row 0, shape, dtype) of column ``name``'s .npy file, its header
        read once per store object (as `array` maps a column once: only `create` writes them)."""
        if name in self._layouts:
            return self._layouts[name]
        self._require_column(name)   # pixels not kept were called "damaged, remove the store"
        path = self.root / f"{name}.npy"
        try:
            with open(path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(fh)
                offset = fh.tell()
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} (a column of store {self.root}) cannot be read ({exc}): damaged or cut "
                             f"short; remove {self.root} to embed the pool again") from None
        if fortran:
            raise ValueError(f"{path} is in Fortran order; spurfast writes C order: remove {self.root}")
        self._layouts[name] = path, offset, tuple(shape), dtype
        return self._layouts[name]

    def _runs(self, name: str, rows) -> tuple[np.ndarray, np.ndarray | None, list[tuple[int, int]]]:
        """(sorted distinct row indices, where each requested row is among them or None where
        the request is those rows in that order, (first, end) positions among them of each run
        of consecutive rows) for ``rows``, a slice or indices of column ``name``."""
        n = int(self.manifest["columns"][name][0][0])
        if isinstance(rows, slice):
            idx = np.arange(n)[rows]
        else:
            idx = np.asarray(rows)
            if idx.dtype == bool:   # a mask, as numpy takes it for the small columns (cast, it read rows 0 and 1)
                if idx.shape != (n,):
                    raise IndexError(f"a row mask of shape {idx.shape} for column {name!r} of store {self.root}, "
                                     f"which has {n} rows")
                idx = np.flatnonzero(idx)
            elif idx.size and not np.issubdtype(idx.dtype, np.integer):   # cast, 2.7 read row 2
                raise IndexError(f"rows of column {name!r} of store {self.root} must be integers or a mask, "
                                 f"got {idx.dtype}")
            idx = idx.astype(np.int64).reshape(-1)
        outside = idx[(idx < 0) | (idx >= n)]
        if len(outside):
            raise IndexError(f"row {int(outside[0])} is outside column {name!r} of store {self.root} ({n} rows; "
                             f"{len(outside)} such)")
        uniq, back = np.unique(idx, return_inverse=True)
        back = back.reshape(-1)
        in_order = len(back) == len(uniq) and np.array_equal(back, np.arange(len(uniq)))
        starts = np.r_[0, np.flatnonzero(np.diff(uniq) != 1) + 1] if len(uniq) else np.zeros(0, np.int64)
        return uniq, None if in_order else back, list(zip(starts.tolist(), np.r_[starts[1:], len(uniq)].tolist()))

    def read_rows(self, name: str, rows) -> np.ndarray:
        """A copy of rows ``rows`` (a slice or indices) of column ``name``.  A wide column is
        read with pread, not through a map: mapped, the file's pages a read touched counted as
        the process's resident memory (reading 1,365 scattered pixel rows, 16 MiB, raised its
        peak by 860 MiB where a merge had just written the file)."""
        if not self.wide(name):
            return np.array(self.array(name)[rows])
        (path, offset, shape, dtype), row = self._layout(name), self.row_bytes(name)
        uniq, back, spans = self._runs(name, rows)
        buf = np.empty((len(uniq),) + shape[1:], dtype)
        flat = buf.reshape(-1).view(np.uint8)
        fd = os.open(path, os.O_RDONLY)
        try:
            if len(spans) > 1 and hasattr(os, "posix_fadvise"):
                # every span asked of the kernel first, so a cold file's reads queue together instead
                # of one disk wait per row (5,000 scattered pixel rows of the 100k bench store, page
                # cache dropped: 0.50 -> 0.12 s; cached: 0.028 vs 0.031 s)
                for a, b in spans:
                    os.posix_fadvise(fd, offset + int(uniq[a]) * row, (b - a) * row, os.POSIX_FADV_WILLNEED)
            for a, b in spans:
                want, got = (b - a) * row, 0
                # a call moves at most 0x7ffff000 bytes on Linux: a span over 2 GiB takes several;
                # only the end of the file (0 bytes) means the column is cut short
                while got < want:
                    n = os.preadv(fd, [flat[a * row + got:b * row]], offset + int(uniq[a]) * row + got)
                    if not n:
                        raise ValueError(f"{path} (a column of store {self.root}) is cut short: rows {int(uniq[a])}.."
                                         f"{int(uniq[b - 1])} read {got} of {want} bytes; remove {self.root} to "
                                         f"embed the pool again")
                    got += n
        finally:
            os.close(fd)
        return buf if back is None else buf[back]

    def write_rows(self, name: str, rows, values: np.ndarray) -> None:
        """Rows ``rows`` of column ``name``; a wide column's are written with pwrite and
        synced (the small columns are flushed by `write`)."""
        if not self.wide(name):
            self.array(name, writable=True)[rows] = values
            return
        (path, offset, shape, dtype), row = self._layout(name), self.row_bytes(name)
        uniq, back, spans = self._runs(name, rows)
        asked = len(uniq) if back is None else len(back)
        vals = np.ascontiguousarray(np.broadcast_to(np.asarray(values, dtype), (asked,) + shape[1:]))
        if back is not None:
            order = np.empty(len(uniq), np.int64)
            order[back] = np.arange(len(back))   # the last value of a repeated row wins, as assignment does
            vals = vals[order]
        flat = vals.reshape(-1).view(np.uint8)
        fd = os.open(path, os.O_WRONLY)
        try:
            for a, b in spans:
                self._write_span(fd, path, flat[a * row:b * row], offset + int(uniq[a]) * row,
                                 f"{int(uniq[a])}..{int(uniq[b - 1])}")
            os.fdatasync(fd)   # as the maps' flush: the rows are on disk before the manifest says done
        finally:
            os.close(fd)

    def _write_span(self, fd: int, path, data: np.ndarray, pos: int, rows: str) -> None:
        """``data`` written whole at ``pos`` of ``fd`` (the column file ``path``, rows ``rows``).
        A short write was taken as done and the rows marked finished: a call moves at most
        0x7ffff000 bytes on Linux, and a full disk without fallocate, or a file size limit,
        stops one part way; the rest is written again until a call writes nothing or fails."""
        done = 0
        while done < len(data):
            try:
                n = os.pwritev(fd, [data[done:]], pos + done)
            except OSError as e:
                raise OSError(e.errno, f"{e.strerror}: writing {path} (a column of store {self.root}), rows {rows} "
                                       f"stopped at {done} of {len(data)} bytes") from e
            if not n:
                raise OSError(f"writing {path} (a column of store {self.root}): rows {rows} wrote {done} of "
                              f"{len(data)} bytes (is the disk full?)")
            done += n

    def write(self, start: int, values: dict[str, np.ndarray], bad: dict[str, str] | None = None) -> None:
        """Rows ``start``.. of the columns in ``values``, then marked done; ``bad``: the
        unreadable files among them (pool index -> reason)."""
        stop = start + len(next(iter(values.values()))) if values else start
        for name, v in values.items():
            self.write_rows(name, slice(start, stop), v)
        for (name, w), arr in self._arrays.items():
            if w:
                arr.flush()
        if bad:   # appended, not kept in the manifest: rewriting them all every batch was quadratic
            with open(self.root / BAD_LOG, "a", encoding="utf-8") as fh:   # (35 min at a million)
                fh.write(json.dumps({"done": stop, "bad": bad}) + "\n")
        self.manifest["done"] = max(self.done, stop)
        self.save_manifest()

    def save_manifest(self) -> None:
        """Replace manifest.json with ``self.manifest``, atomically."""
        _write_json(self.root / MANIFEST, self.manifest)

    def bad_files(self) -> dict[str, str]:
        """The unreadable files among the finished rows: pool index (as text) -> reason."""
        bad = self.manifest.get("bad_files", {})   # where a merge (or an earlier version) put them
        try:   # spurfast wrote an object; a hand-edited list failed in dict() naming nothing
            bad = dict(bad)
        except (TypeError, ValueError):
            raise ValueError(f"{self.root / MANIFEST}: its bad_files is a JSON {type(bad).__name__} {bad!r:.60}, "
                             f"expected an object (pool index: reason)") from None
        for rec in self._bad_records():
            bad.update(rec["bad"])
        return bad

    def _bad_records(self) -> list[dict]:
        """The lines of the bad-file log whose rows are done (an interrupted batch's line, or
        the half of one an interruption cut short, belongs to rows a resume does again)."""
        try:
            lines = (self.root / BAD_LOG).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("done"), int) and rec["done"] <= self.done \
                    and isinstance(rec.get("bad"), dict):
                out.append(rec)
        return out

    def drop_unfinished_bad_files(self) -> None:
        """Before a pass resumes: the log keeps the lines of finished rows only (what comes
        after a cut-short line would join it, and the rows past ``done`` are done again)."""
        path = self.root / BAD_LOG
        if path.is_file():
            keep = "".join(json.dumps(rec) + "\n" for rec in self._bad_records())
            replace_atomically(path, lambda fh: fh.write(keep), encoding="utf-8")


def _write_json(path: Path, obj, **dumps) -> None:
    """``obj`` as JSON (``json.dumps`` options ``dumps``; indent 1 by default), atomically."""
    text = json.dumps(obj, **{"indent": 1, **dumps})
    replace_atomically(path, lambda fh: fh.write(text))


class _PathIds:
    """A folder source as identified before its item ids became relative to its root (its
    paths as spelled), so that stores and runs made then are still recognised."""

    def __init__(self, source: ImageSource):
        self._source = source

    def __getattr__(self, name):
        return getattr(self._source, name)

    def __len__(self):
        return len(self._source)

    def item_id(self, i):
        # a name that is not UTF-8 (surrogate escapes) as \xNN escapes, as the source's own ids:
        # it crashed the hash, and no earlier version could have made a store of it
        return shown_path(self._source.paths[i])


def shown_path(path) -> str:
    """``path`` as text that can be written anywhere: bytes of a name that is not UTF-8
    (read with surrogate escapes) spelled \\xNN; any other path unchanged."""
    return utf8_name(str(path))


def legacy_identities(source: ImageSource, *models: torch.nn.Module, content: str) -> list[tuple[str, str]]:
    """(fingerprint, content digest) pairs earlier spurfast versions gave this source and
    these models: the fingerprint of their weights alone; the digest sampled 8 items, and
    folder ids were paths as spelled.  ``content``: the source's `content_digest`, which every
    caller has already made (one stat per file of a folder pool, or a hash of every image held
    in memory: not to be made twice at a run's start)."""
    old = _PathIds(source) if getattr(source, "paths", None) is not None else source
    # before the models' attributes joined the fingerprint, and before their code and
    # configuration did (those stores and runs cannot tell a model re-exported with the same
    # weights from the old one)
    # before numpy and partial attributes counted (a model holding one, as torchvision's ViT holds
    # partial(LayerNorm), was refused its own store as "made with other models")
    # before a TorchScript module's train/eval mode was left out
    return [(fingerprint(source, *models, mode=True), content),
            (fingerprint(source, *models, extras=False, mode=True), content),
            (fingerprint(source, *models, attributes=False), content),
            (weights_fingerprint(source, *models), content),
            (weights_fingerprint(old, *models), sampled_digest(old))]


def identity_fields(fp: str, content: str) -> dict:
    """What a store's manifest records of where it came from: the pool's and models'
    fingerprint, the pool's content digest, and the fingerprint scheme (`IDENTITY_SCHEME`)."""
    return {"fingerprint": fp, "content": content, "identity": IDENTITY_SCHEME}


def _open_checked(store_dir: Path, fp: str, content: str, legacy=lambda: []) -> EmbeddingStore | None:
    """The store in ``store_dir`` if it was made from this pool and these models, None if
    there is none; raises for another pool's.  ``legacy()``: the pairs of
    :func:`legacy_identities`; a store that records no scheme (`IDENTITY_SCHEME`, made by an
    earlier version) made under one of them is relabelled and resumed."""
    if not (store_dir / MANIFEST).is_file():
        return None
    store = EmbeddingStore(store_dir)
    m = store.manifest
    if not _same_identity(m, [(fp, content)]) and "identity" not in m and _same_identity(m, legacy()):
        log.info("embedding store %s was made by an earlier spurfast version; resuming it", store_dir)
        m.update(identity_fields(fp, content))
        _write_json(store_dir / MANIFEST, m)
    if store.manifest.get("fingerprint") != fp:
        raise ValueError(f"embedding store {store_dir} was made with other models or another pool "
                         f"(fingerprint {store.manifest.get('fingerprint')} != {fp}); use a new directory")
    # stores written before the content digest was recorded have none to compare
    if store.manifest.get("content", content) != content:
        raise ValueError(f"embedding store {store_dir} was made from other images under the same names (pool "
                         f"content {store.manifest['content']} != {content}: regenerated in place?); "
                         f"use a new directory")
    return store


def _same_identity(manifest: dict, identities) -> bool:
    """Whether a store's manifest records one of the (fingerprint, content digest) pairs
    (stores written before the content digest was recorded have none to compare)."""
    return any(manifest.get("fingerprint") == f and manifest.get("content", c) == c for f, c in identities)


def made_from(store_dir, fp: str, content: str, legacy=lambda: []) -> bool:
    """Whether ``store_dir`` holds embedding work of this pool and these models that
    :func:`embed_pool` would resume: its main store, or when it has none yet (a sharded
    pass stopped before the merge) a shard store.  ``legacy()`` as for ``_open_checked``,
    called at most once (it hashes the models' weights again)."""
    store_dir = Path(store_dir)
    main = store_dir / MANIFEST
    manifests = []
    for path in [main] if main.is_file() else sorted((store_dir / "shards").glob(f"*/{MANIFEST}")):
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(m, dict):
            manifests.append(m)
    if any(_same_identity(m, [(fp, content)]) for m in manifests):
        return True
    unversioned = [m for m in manifests if "identity" not in m]   # only those may be of an earlier scheme
    old = legacy() if unversioned else []
    return any(_same_identity(m, old) for m in unversioned)


def unmark_stores(path) -> None:
    """Remove the manifest of the store at ``path`` and of the shard stores under it, before
    the directory itself is removed: an interrupted removal then leaves no store, not a
    manifest whose columns are gone (rmtree takes the listing's order, on many filesystems
    the order of creation, manifest last), which a later run resumed and crashed on.  Links
    are not followed: a "shards" link in an old run's folder had the manifests of the folders
    it pointed to deleted (outside the run)."""
    base, shards = Path(path), Path(path) / "shards"
    if base.is_symlink():
        return
    parts = [d for d in shards.iterdir() if d.is_dir() and not d.is_symlink()] \
        if shards.is_dir() and not shards.is_symlink() else []
    for m in (base / MANIFEST, *(d / MANIFEST for d in parts)):
        try:
            m.unlink()
        except OSError:   # none there (or not a directory): nothing to unmark
            pass
