"""The streaming embedding pass: pool -> classifier + VAE encoder -> on-disk store.

The store is a directory of memory-mapped ``.npy`` arrays plus ``manifest.json`` (and
``bad_files.jsonl``, the unreadable files, where there are any).
Batches are written in pool order; after each flush the manifest's ``done`` counter is
replaced atomically, so an interrupted pass resumes at the first unfinished batch and
never redoes (or loses) finished work.  A store made with other models or another pool
is refused (fingerprint mismatch) rather than silently mixed.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import backends
from .atomic_files import replace_atomically
from .checks import check_compute_device, check_default_dtype, check_whole, folder_blocker, json_document, not_a_folder
from .cores import usable_cores
from .data.loader_torch import iter_batches
from .data.preprocess import uint8_to
from .data.sources import ImageSource, content_digest, sampled_digest, utf8_name
from .identity import fingerprint, weights_fingerprint
from .models.as_given import restores_models
from .models.outputs import check_floating, classifier_outputs, non_float32_weights, shape_text, trial

log = logging.getLogger("spurfast.embed")
FEATS_MAX = float(np.finfo(np.float16).max)   # 65504: the store keeps penultimate features as float16
MANIFEST = "manifest.json"
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
            raise OSError(exc.errno, f"no space for the embedding store's column {path} "
                                     f"({os.fstat(fd).st_size} bytes): {os.strerror(exc.errno)}") from None
    finally:
        os.close(fd)


class EmbeddingStore:
    """Columns: pred (int32), conf (fp32), probs (n x C fp32), mu (n x L fp32),
    feats (n x F fp16), labels (int64), ok (bool: the image decoded)."""

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
            if name not in self.manifest["columns"]:
                raise KeyError(f"store {self.root} has no column {name!r}; columns: {sorted(self.manifest['columns'])}")
            path = self.root / f"{name}.npy"
            try:
                self._arrays[key] = np.load(path, mmap_mode="r+" if writable else "r")
            except ValueError as exc:   # cut short: "mmap length is greater than file size", naming no file
                raise ValueError(f"{path} (a column of store {self.root}) cannot be read ({exc}): damaged or cut "
                                 f"short; remove {self.root} to embed the pool again") from None
        return self._arrays[key]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.array(name)

    def write(self, start: int, values: dict[str, np.ndarray], bad: dict[str, str] | None = None) -> None:
        """Rows ``start``.. of the columns in ``values``, then marked done; ``bad``: the
        unreadable files among them (pool index -> reason)."""
        stop = start + len(next(iter(values.values()))) if values else start
        for name, v in values.items():
            self.array(name, writable=True)[start:stop] = v
        for (name, w), arr in self._arrays.items():
            if w:
                arr.flush()
        if bad:   # appended, not kept in the manifest: rewriting them all every batch was quadratic
            with open(self.root / BAD_LOG, "a", encoding="utf-8") as fh:   # (35 min at a million)
                fh.write(json.dumps({"done": stop, "bad": bad}) + "\n")
        self.manifest["done"] = max(self.done, stop)
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


def check_vae_input(source: ImageSource, vae) -> None:
    """Raise unless ``vae`` is a spurfast VAE (its ``config``, ``encode`` and ``decode``) that
    encodes images of ``source``'s shape, with float32 weights."""
    cfg = getattr(vae, "config", None)
    lacks = [n for n, ok in (("config", all(hasattr(cfg, a) for a in ("in_channels", "image_size", "latent_dim"))),
                             ("encode", callable(getattr(vae, "encode", None))),
                             ("decode", callable(getattr(vae, "decode", None)))) if not ok]
    if lacks:   # a VAE of one's own failed as "no attribute 'config'" in the embedding pass, after
        # --overwrite had emptied the run's folder
        raise TypeError(f"the VAE ({type(vae).__name__}) is not a spurfast VAE: it lacks "
                        f"{' and '.join(lacks)}{' (in_channels, image_size, latent_dim)' if 'config' in lacks else ''}; "
                        f"load one with spurfast.load_vae(path) or train one with spurfast.train_vae")
    if tuple(source.image_shape) != (cfg.in_channels, cfg.image_size, cfg.image_size):
        raise ValueError(f"the VAE expects {cfg.in_channels}x{cfg.image_size}x{cfg.image_size} images (CxHxW), "
                         f"the pool ({source.name}) has {shape_text(source.image_shape)}")
    # the encoder takes any (it casts the batch to its weights), but decoding float32 latents
    # failed in characterisation, after the whole embedding pass and discovery
    other = non_float32_weights(vae)
    if other:
        raise ValueError(f"the VAE has {', '.join(other)} weights; spurfast runs it in float32: pass vae.float()")


def check_outputs(source: ImageSource, classifier, num_classes: int, device: str) -> int:
    """The width of the classifier's features on ``source``'s first image; raises unless
    it gives ``num_classes`` logits."""
    with torch.no_grad():
        x0, _ = source.get_batch([0])
        model, x = classifier.to(device).eval(), x0.to(device)   # outside: "no NVIDIA driver" is no shape error
        # torch's "mat1 and mat2 shapes cannot be multiplied" named neither
        logits, feats = trial(lambda: classifier_outputs(model, x), f"classifier cannot run on images of shape "
                              f"{shape_text(x0.shape[1:])} (CxHxW) from {source.name}", model)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:   # logits.shape[1]: a bare IndexError
        got = f"shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else f"a {type(logits).__name__}"
        raise ValueError(f"classifier outputs {got} for one image of {source.name}; expected logits of shape "
                         f"(1, classes)")
    check_floating(logits, "classifier", f" for {source.name}")
    if logits.shape[1] != num_classes:
        raise ValueError(f"classifier outputs {logits.shape[1]} logits; expected {num_classes} classes")
    return int(feats.shape[1])


def _columns(source: ImageSource, classifier, vae, num_classes: int, device: str, n: int) -> dict:
    F = check_outputs(source, classifier, num_classes, device)
    L = vae.config.latent_dim
    return {"pred": ((n,), "int32"), "conf": ((n,), "float32"), "probs": ((n, num_classes), "float32"),
            "mu": ((n, L), "float32"), "feats": ((n, F), "float16"),
            "labels": ((n,), "int64"), "ok": ((n,), "bool")}


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
    return [(fingerprint(source, *models, attributes=False), content),
            (weights_fingerprint(source, *models), content),
            (weights_fingerprint(old, *models), sampled_digest(old))]


def _open_checked(store_dir: Path, fp: str, content: str, legacy=lambda: []) -> EmbeddingStore | None:
    """The store in ``store_dir`` if it was made from this pool and these models, None if
    there is none; raises for another pool's.  ``legacy()``: the pairs of
    :func:`legacy_identities`; a store made under one of them is relabelled and resumed."""
    if not (store_dir / MANIFEST).is_file():
        return None
    store = EmbeddingStore(store_dir)
    m = store.manifest
    if not _same_identity(m, [(fp, content)]) and _same_identity(m, legacy()):
        log.info("embedding store %s was made by an earlier spurfast version; resuming it", store_dir)
        m["fingerprint"], m["content"] = fp, content
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
    old = legacy() if manifests else []
    return any(_same_identity(m, old) for m in manifests)


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


def decode_device(device) -> str:
    """Where a loader that can decode on a GPU (DALI) decodes for a run computing on
    ``device``: that CUDA device, else the CPU (DALI decoded on the GPU whenever torch saw
    one, --device cpu included, and refused "cpu:1", which torch computes on as "cpu")."""
    return str(device) if torch.device(device).type == "cuda" else "cpu"


def shard_dir(store_dir, shard_id: int, num_shards: int) -> Path:
    """Where rank ``shard_id`` of ``num_shards`` keeps its part of the store."""
    return Path(store_dir) / "shards" / f"{shard_id}-of-{num_shards}"


def _sync_labels(store: EmbeddingStore, want: np.ndarray, chunk: int = 65536) -> int:
    """Make the store's first ``len(want)`` labels ``want`` (the pool's labels of those
    rows); returns how many changed.  Labels are no model output and so not part of the
    store's identity: a pool whose labels were corrected keeps its store (and its run),
    and only this column is rewritten, a chunk at a time."""
    if "labels" not in store.manifest["columns"]:
        return 0
    want = np.asarray(want, dtype=np.int64)
    changed = 0
    for lo in range(0, len(want), chunk):
        w = want[lo:lo + chunk]
        diff = int(np.count_nonzero(np.asarray(store["labels"][lo:lo + len(w)]) != w))
        if diff:
            store.array("labels", writable=True)[lo:lo + len(w)] = w
            changed += diff
    if changed:
        store.array("labels", writable=True).flush()
        log.warning("%s: the pool's labels differ from the stored ones in %d of %d rows; the store now holds the "
                    "pool's (labels are no model output: nothing is embedded again)", store.root, changed, len(want))
    return changed


def _settle_shards(store_dir: Path, main: EmbeddingStore | None, fp: str, content: str, num_shards: int,
                   progress: bool) -> EmbeddingStore | None:
    """Deal with shard stores a run with another number of processes left in ``store_dir``:
    merged when they finish exactly what ``main`` lacks (their work is kept), else the rows
    they finished without a gap from ``main``'s next row on are kept (written into it) and
    the shards removed, with a warning for the rows lost (no run of ``num_shards`` processes
    could resume them).  A complete main store needs no shards at all.  Returns the main
    store (new when a merge, or keeping rows, created it)."""
    root = store_dir / "shards"
    if not root.is_dir() or root.is_symlink():   # a link is no folder a run made: nothing in it is ours to delete
        return main
    if main is not None and main.complete:  # e.g. a merge that died after marking it complete
        shutil.rmtree(root, ignore_errors=True)
        return main
    worlds: dict[int, list[Path]] = {}
    for d in root.iterdir():
        m = re.fullmatch(r"\d+-of-(\d+)", d.name)
        if m and int(m[1]) != num_shards and not d.is_symlink():
            worlds.setdefault(int(m[1]), []).append(d)
    for w in sorted(worlds):
        start = main.done if main is not None else 0
        dirs = [shard_dir(store_dir, r, w) for r in range(w)]
        parts = [EmbeddingStore(d) if (d / MANIFEST).is_file() else None for d in dirs]
        ours = (fp, content, start)
        # finished shards decoded otherwise than the store's rows: discarded below, not merged
        # (merge_shards refuses them, and these are a run of another size nobody resumes)
        if all(s is not None and s.complete and _continues(s, ours) for s in parts) and _decoding_fits(main, parts):
            log.info("merging the finished shards of an earlier %d-process run in %s", w, store_dir)
            main = merge_shards(store_dir, w, progress=progress)
            shutil.rmtree(root, ignore_errors=True)  # the store is complete: any other shards are leftovers
            return main
        main, kept = _keep_finished_prefix(store_dir, main, w, parts, ours)
        rows = sum(s.done for s in parts if s is not None) - kept
        if rows:
            also = f" (the {kept} rows they finished from pool index {start} on are kept)" if kept else ""
            log.warning("discarding %d embedded rows of an earlier %d-process run in %s: its shards are unfinished, "
                        "not this store's next rows or decoded otherwise than it, and only a run of %d processes "
                        "could resume them%s", rows, w, root, w, also)
        elif kept:
            log.info("kept pool rows %d to %d that an earlier %d-process run in %s had finished", start,
                     start + kept, w, root)
        for d in worlds[w]:
            unmark_stores(d)
            shutil.rmtree(d, ignore_errors=True)
    if worlds:   # not on a call that removed nothing: every rank calls this, and one rank's rmdir
        try:     # of a "shards" folder another had just made (before its shard folder) failed that rank
            root.rmdir()  # only when nothing is left in it
        except OSError:
            pass
    return main


def _keep_finished_prefix(store_dir: Path, main: EmbeddingStore | None, w: int, parts: list,
                          ours: tuple) -> tuple[EmbeddingStore | None, int]:
    """Write into the main store the rows that unfinished shards of a ``w``-process run
    finished without a gap from the main store's next row on, and mark them done; returns
    (main store, rows kept).  Shard r holds pool indices start + j w + r in row j, so every
    index below start + min_r(done_r w + r) is finished: a run restarted with another number
    of processes (a requeue on fewer GPUs, a 1-process resume) threw all of it away.
    ``ours``: (fingerprint, content, start) the shards must record; ``parts``: their stores
    (None: absent)."""
    from .data.folder import select_indices

    start = ours[2]
    if not all(s is not None and _continues(s, ours) for s in parts):
        return main, 0
    n = parts[0].manifest.get("pool_n")
    if not isinstance(n, int) or any(s.manifest.get("pool_n") != n for s in parts) or n <= start:
        return main, 0
    sels = [select_indices(n, start=start, shard_id=r, num_shards=w) for r in range(w)]
    if any(s.n != len(sel) for s, sel in zip(parts, sels)):
        return main, 0
    P = min(min(s.done * w + r for r, s in enumerate(parts)), n - start)
    if P <= 0:
        return main, 0
    counts = [max(0, -(-(P - r) // w)) for r in range(w)]   # rows j of shard r with j w + r < P
    # each kept row must hold the pool index its rank's selection puts there (as merge_shards checks)
    if not all(np.array_equal(np.asarray(s["index"][:c]), sel[:c]) for s, sel, c in zip(parts, sels, counts)):
        return main, 0
    # ranks whose loaders resolved differently, or a main store of another loader: kept, their
    # rows would sit in one store under one loader's name (merge_shards refuses such shards)
    if not _decoding_fits(main, parts):
        return main, 0
    if main is None:
        main = _create_main(store_dir, parts[0].manifest, n)
    _adopt_decoding(main, parts[0])
    _copy_shard_rows(main, parts, counts, start + P)
    main.write(start + P, {})   # flushes every column, then marks the rows done
    return main, P


DECODING = ("loader", "decode")   # how a store's pixels were made: rows of two must not mix


def _decoding(store: EmbeddingStore) -> tuple:
    return tuple(store.manifest.get(k) for k in DECODING)


def _decoding_fits(main: EmbeddingStore | None, shards: list) -> bool:
    """Whether ``main`` may take rows of ``shards``: they record one loader and decode device,
    and main's own rows (if any) record the same (a store with no row yet takes any)."""
    recs = {_decoding(s) for s in shards}
    if len(recs) > 1:
        return False
    rec = recs.pop()
    return main is None or not main.done or all(a is None or b is None or a == b
                                                for a, b in zip(_decoding(main), rec))


def _adopt_decoding(main: EmbeddingStore, shard: EmbeddingStore) -> None:
    """A main store with no row yet takes the record of the shards whose rows it takes (it
    kept the one its first, interrupted pass had made)."""
    if not main.done:
        for k, v in zip(DECODING, _decoding(shard)):
            if v is None:
                main.manifest.pop(k, None)
            else:
                main.manifest[k] = v


def _continues(shard: EmbeddingStore, ours: tuple) -> bool:
    """Whether a shard store records these inputs and this start: (fingerprint, content, start)."""
    m = shard.manifest
    return (m.get("fingerprint"), m.get("content"), m.get("start")) == ours


def _copy_shard_rows(main: EmbeddingStore, shards: list, counts: list, stop: int, *, chunk: int = 65536,
                     bar=None) -> None:
    """Write the first ``counts[r]`` rows of each shard store into ``main`` at their pool
    indices, ``chunk`` rows at a time (bounded memory), with their unreadable files below pool
    index ``stop``; marks nothing done.  A merge copies every row, a restart its kept prefix."""
    cols = [k for k in shards[0].manifest["columns"] if k != "index"]
    # a line of a batch the main store's pass was interrupted in (the shards did those rows
    # again) would count once the rows are marked done: a repaired file stayed unreadable
    main.drop_unfinished_bad_files()
    bad = main.bad_files()
    for s, c in zip(shards, counts):
        index = s["index"]
        for lo in range(0, c, chunk):
            rows = np.asarray(index[lo:min(c, lo + chunk)])
            for k in cols:
                main.array(k, writable=True)[rows] = s[k][lo:lo + len(rows)]
            if bar is not None:
                bar.update(len(rows))
        bad.update({i: why for i, why in s.bad_files().items() if int(i) < stop})
    if bad:
        main.manifest["bad_files"] = bad


def _create_main(store_dir: Path, shard_manifest: dict, n: int) -> EmbeddingStore:
    """An empty main store of ``n`` rows with the columns and identity of a shard store."""
    m0 = shard_manifest
    cols = {k: ((n,) + tuple(v[0][1:]), v[1]) for k, v in m0["columns"].items() if k != "index"}
    kept = ("fingerprint", "content", "pool", "num_classes", "latent_dim", "loader", "decode", "compute")
    meta = {k: m0[k] for k in kept if k in m0}
    return EmbeddingStore.create(store_dir, n, cols, meta)


def open_main(source: ImageSource, classifier: torch.nn.Module, vae, store_dir, identity: tuple[str, str], *,
              num_shards: int = 1, progress: bool = True) -> EmbeddingStore | None:
    """The main store in ``store_dir`` made from this pool and these models (None if
    there is none), brought up to date: an earlier version's store relabelled, shards of
    another number of processes merged or removed, and its labels the pool's.  It
    writes to the shared store: under several ranks only rank 0 calls it first
    (`spurfast.distributed.embed_pool_sharded`); it changes nothing when called again."""
    fp, content = identity
    store_dir = Path(store_dir)
    main = _open_checked(store_dir, fp, content, lambda: legacy_identities(source, classifier, vae, content=content))
    main = _settle_shards(store_dir, main, fp, content, num_shards, progress)
    if main is not None and main.done:
        _sync_labels(main, np.asarray(source.labels())[:main.done])
    return main


def how_rows_are_made(source: ImageSource, device: str = "cpu", encoder_backend: str | None = None,
                      loader_backend: str | None = None) -> tuple[str | None, str | None, str]:
    """(loader, decode, compute) that a store records and a resume (or another rank) must
    share: the loader that decodes a folder pool (None for arrays; the torch and DALI loaders'
    resized pixels differ by a few levels, and mixed rows matched neither run's findings),
    where DALI decodes ("cpu" or "gpu": nvJPEG's pixels differ a little), and where and by
    which encoder the latents are computed (e.g. "cuda:triton"; rows of two differ in their
    last digits)."""
    loader = decode = None
    if getattr(source, "paths", None) is not None:
        loader = backends.resolve("loader", loader_backend)[0]
        if loader == "dali":
            from .data.loader_dali import resolve_device
            decode = resolve_device(decode_device(device))
    dev_type = torch.device(device).type
    return loader, decode, f"{dev_type}:{backends.resolve('encoder', encoder_backend, dev_type)[0]}"


@restores_models("classifier", "vae", device=False)
def embed_pool(source: ImageSource, classifier: torch.nn.Module, vae, store_dir, *, num_classes: int,
               batch_size: int = 256, device: str = "cpu", encoder_backend: str | None = None,
               loader_backend: str | None = None, progress: bool = True, stop_after: int | None = None,
               num_workers: int | None = None, shard_id: int = 0, num_shards: int = 1,
               timings: dict | None = None, identity: tuple[str, str] | None = None,
               restart_stale_shards: bool = False) -> EmbeddingStore:
    """Stream ``source`` once through the classifier and the encoder into ``store_dir``.

    Resumes when ``store_dir`` holds an unfinished store of the same fingerprint.
    ``stop_after`` (batches) simulates an interruption for tests.  ``num_workers``: decode
    threads/processes for folder pools (default: every core this process may use).

    ``num_shards > 1`` (one call per rank, see `spurfast.distributed`): embeds only shard
    ``shard_id`` of the pool indices not yet in ``store_dir`` (every ``num_shards``-th,
    as the loaders shard) into its own store ``shard_dir(store_dir, shard_id, num_shards)``
    (an extra column ``index`` holds each row's pool index), resumable per shard at batch
    granularity, and returns that shard store, or the main store if it is already
    complete.  :func:`merge_shards` then writes the shards into the main store.

    ``identity``: (fingerprint, content digest) of this source and these models when the
    caller has them already (a 100k-image folder pool's digest stats every file: ~0.5 s).

    The labels of rows already in a store are checked against ``source.labels()`` and
    rewritten where they differ (corrected labels need no new embedding).  Shard stores of
    another number of processes are merged first when complete, else removed.
    ``restart_stale_shards``: a shard store made from other inputs is a leftover to start
    again rather than a reason to refuse (the caller has checked that ``store_dir`` is this
    run's and that every rank loaded these inputs).

    ``timings`` (a dict, optional) accumulates where the pass spends its time: seconds
    waiting for the loader (``load_wait_s``), in the models up to the results on the host
    (``compute_s``), and writing the store (``write_s``), so the slow stage shows.
    """
    check_default_dtype("embed_pool")
    check_compute_device(device, f"embed_pool: device {device!r}")
    blocker = folder_blocker(store_dir)   # mkdir's bare "File exists" named neither
    if blocker is not None:
        raise NotADirectoryError(f"{not_a_folder('embed_pool: store_dir', Path(store_dir), blocker)}; expected the "
                                 f"folder of the embedding store")
    if num_workers is None:
        num_workers = usable_cores()
    n = len(source)
    if n == 0:
        raise ValueError(f"pool {source.name} is empty")
    # whole numbers: int() below made shard_id=1.5 shard 1 without a word
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in (shard_id, num_shards)) \
            or num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"need integers 0 <= shard_id < num_shards, got shard_id={shard_id!r}, "
                         f"num_shards={num_shards!r}")
    check_whole(num_classes, "num_classes")
    # the loader refused it only after the store was created (2.5: a TypeError naming nothing)
    check_whole(batch_size, "batch_size")
    # the encoder refused it at the first batch, after the store was made, naming neither shape
    # ("flattened features 1024 != head input width 3136")
    check_vae_input(source, vae)
    # the manifest is JSON: a numpy integer (labels.max() + 1) failed its write, naming nothing
    num_classes, shard_id, num_shards = int(num_classes), int(shard_id), int(num_shards)
    fp, content = identity or (fingerprint(source, classifier, vae), content_digest(source))
    store_dir = Path(store_dir)

    def legacy():
        return legacy_identities(source, classifier, vae, content=content)
    main = open_main(source, classifier, vae, store_dir, (fp, content), num_shards=num_shards, progress=progress)
    if main is not None and main.complete:
        return main
    loader, decode, compute = how_rows_are_made(source, device, encoder_backend, loader_backend)
    sel = None
    if num_shards == 1:
        store = main
        if store is not None:
            log.info("resuming embedding pass at pool index %d of %d", store.done, n)
        else:
            store = EmbeddingStore.create(store_dir, n, _columns(source, classifier, vae, num_classes, device, n),
                                          {"fingerprint": fp, "content": content, "pool": source.name,
                                           "num_classes": num_classes, "latent_dim": vae.config.latent_dim,
                                           "loader": loader, "decode": decode, "compute": compute})
        desc = "embedding pool"
    else:
        from .data.folder import select_indices
        start = sel_start = main.done if main is not None else 0
        sel = select_indices(n, start=start, shard_id=shard_id, num_shards=num_shards)
        sdir = shard_dir(store_dir, shard_id, num_shards)
        try:
            store = _open_checked(sdir, fp, content, legacy)
        except ValueError as exc:
            if not restart_stale_shards:
                raise
            log.warning("shard store %s is a leftover of a run with other inputs (%s); starting it again", sdir, exc)
            store = None
        if store is not None and (store.manifest.get("start") != start or store.n != len(sel)):
            log.warning("shard store %s covers another selection (start %s, not %d); starting it again",
                        sdir, store.manifest.get("start"), start)
            store = None
        if store is None:
            cols = _columns(source, classifier, vae, num_classes, device, len(sel))
            cols["index"] = ((len(sel),), "int64")
            store = EmbeddingStore.create(sdir, len(sel), cols, {
                "fingerprint": fp, "content": content, "pool": source.name, "num_classes": num_classes,
                "latent_dim": vae.config.latent_dim, "start": start, "pool_n": n,
                "shard_id": shard_id, "num_shards": num_shards, "loader": loader, "decode": decode,
                "compute": compute},
                initial={"index": sel})
        elif store.done:
            _sync_labels(store, np.asarray(source.labels())[sel[:store.done]])
            log.info("resuming shard %d/%d at row %d of %d", shard_id, num_shards, store.done, store.n)
        desc = f"embedding shard {shard_id}/{num_shards}"
    if store.complete:
        return store
    if loader is not None and store.done == 0 and (store.manifest.get("loader"), store.manifest.get("decode")) != (
            loader, decode):
        # no rows yet: this run's loader decodes all of them (a stale record let a later
        # resume with the first loader mix both)
        store.manifest["loader"], store.manifest["decode"] = loader, decode
        _write_json(store.root / MANIFEST, store.manifest)
    # a shard store continues the main store's rows: those were decoded too (by a run of
    # another number of processes, perhaps with another loader); and its sibling shards'
    # rows join it in the merge (a rank that finished its shard with one loader, and one
    # resumed with another)
    parts = [main, store] if store is not main else [store]
    if sel is not None and loader is not None:
        for r in range(num_shards):
            d = shard_dir(store_dir, r, num_shards)
            if r == shard_id or not (d / MANIFEST).is_file():
                continue
            try:
                sib = EmbeddingStore(d)
            except (OSError, ValueError):   # another rank is creating it
                continue
            if _same_identity(sib.manifest, [(fp, content)]) and sib.manifest.get("start") == sel_start:
                parts.append(sib)
    for part in parts:
        began = None if part is None else part.manifest.get("loader")  # None: no folder pool, or an earlier version
        if part is not None and part.done and loader is not None and began is not None and began != loader:
            raise ValueError(f"embedding store {part.root} was begun with the {began!r} loader, and this run would "
                             f"resume it with {loader!r}: their pixels differ a little on resized images, so the "
                             f"store would mix both; resume with --loader-backend {began} (or start afresh: remove "
                             f"{part.root}, or choose another output directory)")
        was = None if part is None or began != loader else part.manifest.get("decode")  # None: recorded by none
        if part is not None and part.done and decode is not None and was is not None and was != decode:
            raise ValueError(f"embedding store {part.root} was begun decoding on the {was.upper()} and this run "
                             f"would resume it decoding on the {decode.upper()} (the {loader!r} loader decodes where "
                             f"--device computes): their pixels differ a little, so the store would mix both; "
                             f"resume with --device {'cuda' if was == 'gpu' else 'cpu'} (or start afresh: remove "
                             f"{part.root}, or choose another output directory)")
    began = store.manifest.get("compute")   # None: a store of an earlier version, or no row yet
    if store.done and began is not None and began != compute:
        def shown(c):   # "cuda:triton" -> "cuda with the triton encoder"
            return c.replace(":", " with the ", 1) + " encoder"
        log.warning("embedding store %s was begun computing on %s and this run resumes it on %s: the rows of "
                    "the two differ a little (their last digits), so the store mixes both; resume with the first "
                    "--device and --encoder-backend to keep it uniform (or start afresh: remove %s)", store.root,
                    shown(began), shown(compute), store.root)
    if began != compute and not store.done:
        store.manifest["compute"] = compute   # no rows yet: this run computes all of them
        _write_json(store.root / MANIFEST, store.manifest)
    classifier.to(device).eval()
    vae.to(device).eval()
    start = store.done
    clipped = False   # penultimate features clipped to float16's range (warned once)
    todo = None if sel is None else sel[start:]
    bar = tqdm(total=store.n, initial=start, desc=desc, unit="img", disable=not progress,
               position=shard_id if num_shards > 1 else None)
    clock = _Clock(timings)
    # to a GPU, folder images travel as uint8 and become floats there: a quarter of the
    # bytes, and no float conversion on host cores that the decoding workers keep busy
    raw = torch.uint8 if torch.device(device).type == "cuda" else None
    store.drop_unfinished_bad_files()
    for b, batch in enumerate(iter_batches(source, batch_size, start=start, indices=todo, num_workers=num_workers,
                                           backend=loader or loader_backend, dtype=raw,   # the one recorded
                                           device=decode_device(device))):
        clock.lap("load_wait_s")
        if stop_after is not None and b >= stop_after:
            break
        idx = batch.indices.numpy()
        # every index, not the first: a file skipped inside a batch shifted its later rows
        # onto other images' rows, and the last batch's went unnoticed
        expect = np.arange(store.done, store.done + len(idx)) if sel is None else sel[store.done:store.done + len(idx)]
        if len(idx) != len(expect) or not np.array_equal(idx, expect):
            j = next((j for j in range(len(idx)) if j >= len(expect) or int(idx[j]) != int(expect[j])), 0)
            raise RuntimeError(f"loader yielded pool index {int(idx[j])} in row {store.done + j} of the store, "
                               f"expected {int(expect[j]) if j < len(expect) else 'none (past the end)'}")
        x = batch.images.to(device)
        if x.dtype == torch.uint8:
            x = uint8_to(x, torch.float32)
        with torch.no_grad():
            logits, feats = classifier_outputs(classifier, x)
            probs = torch.softmax(logits.float(), 1)
            mu, _ = vae.encode(x, backend=encoder_backend)
        ok = batch.ok.numpy()
        conf, pred = probs.max(1)
        # one device-to-host copy (one sync on a GPU) for every result of the batch;
        # class indices travel exactly as floats
        L, C = mu.shape[1], probs.shape[1]
        host = torch.cat([pred.float()[:, None], conf[:, None], probs, mu.float(), feats.float()], 1).cpu().numpy()
        if not ok.all():
            # an unreadable file's stand-in (a zero image) is no image of the pool: a classifier
            # that standardises each image gave NaN for it, and the run stopped, blaming the
            # classifier for the file the loader had skipped (its row is marked, pred -1, below)
            host[~ok] = np.nan_to_num(host[~ok], nan=0.0, posinf=0.0, neginf=0.0)
        pred, conf, probs, mu, feats = (host[:, 0].astype(np.int32), host[:, 1], host[:, 2:2 + C],
                                        host[:, 2 + C:2 + C + L], host[:, 2 + C + L:])
        if not np.isfinite(mu).all():
            bad = np.flatnonzero(~np.isfinite(mu).all(1))
            raise ValueError(f"encoder produced NaN/inf latents for pool indices {idx[bad][:10].tolist()}")
        if not np.isfinite(probs).all():   # argmax would call every such image class 0
            bad = np.flatnonzero(~np.isfinite(probs).all(1))
            raise ValueError(f"classifier produced NaN/inf outputs for pool indices {idx[bad][:10].tolist()} "
                             f"({len(bad)} of this batch of {len(idx)})")
        big = np.abs(feats) > FEATS_MAX
        if big.any():
            # float16 would store them as inf, and the baselines' standardised features as NaN
            if not clipped:
                log.warning("penultimate features beyond float16's range (|x| > %g) from pool index %d on: stored "
                            "clipped to +-%g in the store's feats column (used by the GEORGE and activation-"
                            "clustering baselines only)", FEATS_MAX, int(idx[np.nonzero(big.any(1))[0][0]]), FEATS_MAX)
            clipped = True
            feats = np.clip(feats, -FEATS_MAX, FEATS_MAX)
        pred[~ok] = -1  # unreadable files take no part in clustering
        bad = None
        if not ok.all():  # kept in the store so a resumed or sharded run still reports them
            bad_files = getattr(source, "bad_files", {})
            bad = {str(int(i)): bad_files.get(int(i), "could not be decoded") for i in idx[~ok]}
        values = {"pred": pred, "conf": conf, "probs": probs, "mu": mu, "feats": feats.astype(np.float16),
                  "labels": batch.labels.numpy(), "ok": ok}
        clock.lap("compute_s")
        store.write(store.done, values, bad)
        bar.update(len(idx))
        clock.lap("write_s")
    bar.close()
    return store


class _Clock:
    """Adds the seconds since the previous lap to ``sink[name]``; no-op without a sink."""

    def __init__(self, sink: dict | None):
        self.sink, self.t = sink, time.perf_counter()

    def lap(self, name: str) -> None:
        if self.sink is not None:
            now = time.perf_counter()
            self.sink[name] = self.sink.get(name, 0.0) + now - self.t
            self.t = now


def merge_shards(store_dir, num_shards: int, *, chunk: int = 65536, progress: bool = True,
                 keep_shards: bool = False, labels: np.ndarray | None = None) -> EmbeddingStore:
    """Write the complete shard stores of ``num_shards`` ranks into the main store at
    ``store_dir`` (created if absent) and mark it complete.  Streams ``chunk`` rows at a
    time (bounded memory); idempotent, so an interrupted merge is simply run again.
    The shard stores are removed afterwards unless ``keep_shards``.  ``labels``: the
    pool's labels, when known; the merged store takes them where its rows differ."""
    from .data.folder import select_indices

    store_dir = Path(store_dir)
    if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)) or num_shards < 1:
        raise ValueError(f"{store_dir}: num_shards must be an integer >= 1 (the ranks that embedded the shards), "
                         f"got {num_shards!r}")   # 0 failed with a bare IndexError

    def remove_shards():
        if not keep_shards:
            for r in range(num_shards):
                shutil.rmtree(shard_dir(store_dir, r, num_shards), ignore_errors=True)
            try:
                (store_dir / "shards").rmdir()  # only when no other run's shards are left
            except OSError:
                pass
    present = [d for d in (shard_dir(store_dir, r, num_shards) for r in range(num_shards)) if (d / MANIFEST).is_file()]
    if (store_dir / MANIFEST).is_file():
        main = EmbeddingStore(store_dir)
        # merged already (keep_shards, or interrupted while removing the shards): run again, it
        # said the store did not match its shards, or that the removed ones were missing; content
        # compared where both recorded it (shards of a pool regenerated in place are no merge's)
        fp, content = main.manifest.get("fingerprint"), main.manifest.get("content")
        if main.complete and all(m.get("fingerprint") == fp and content in (None, m.get("content", content))
                                 for m in (EmbeddingStore(d).manifest for d in present)):
            if labels is not None:
                _sync_labels(main, np.asarray(labels)[:main.n])
            remove_shards()
            return main
    missing = [r for r in range(num_shards) if shard_dir(store_dir, r, num_shards) not in present]
    if missing:
        raise ValueError(f"{store_dir}: the shard stores of ranks {missing} (of {num_shards}) are missing; "
                         f"run every rank's embedding pass first")
    shards = [EmbeddingStore(shard_dir(store_dir, r, num_shards)) for r in range(num_shards)]
    m0 = shards[0].manifest
    for r, s in enumerate(shards):
        if not s.complete:
            raise ValueError(f"shard store {s.root} is unfinished ({s.done}/{s.n}); finish rank {r} first")
        for key in ("fingerprint", "content", "start", "pool_n"):
            if s.manifest.get(key) != m0.get(key):
                raise ValueError(f"shard stores disagree on {key}: {s.root} has {s.manifest.get(key)!r}, "
                                 f"{shards[0].root} has {m0.get(key)!r}")
    # rows of two loaders, or of DALI on two devices (their pixels differ a little on resized
    # images), would be mixed in one store
    for key, by, flag in (("loader", "by different loaders", "--loader-backend"),
                          ("decode", "on different devices", "--device")):
        began = {s.manifest[key]: s.root for s in shards if s.n and s.manifest.get(key)}
        if len(began) > 1:
            (a, ra), (b, rb) = sorted(began.items())[:2]
            raise ValueError(f"shard stores were decoded {by} ({ra}: {a!r}, {rb}: {b!r}): their pixels differ a "
                             f"little, so the merged store would mix both; remove the shard stores of one and run "
                             f"those ranks again with the other's {flag}")
    n, start = int(m0["pool_n"]), int(m0["start"])
    if sum(s.n for s in shards) != n - start:
        raise ValueError(f"shards hold {sum(s.n for s in shards)} rows for {n - start} pool indices")
    # every row must go where its rank's selection puts it; checked before anything is
    # written (a zeroed index would scatter a whole shard onto pool row 0)
    for r, s in enumerate(shards):
        want = select_indices(n, start=start, shard_id=r, num_shards=num_shards)
        if s.n != len(want):
            raise ValueError(f"shard store {s.root} holds {s.n} rows; rank {r} of {num_shards} has {len(want)}")
        for lo in range(0, s.n, chunk):
            got = np.asarray(s["index"][lo:lo + chunk])
            bad = np.flatnonzero(got != want[lo:lo + chunk])
            if len(bad):
                i = lo + int(bad[0])
                raise ValueError(f"shard store {s.root} holds pool index {int(got[bad[0]])} in row {i} where "
                                 f"{int(want[i])} belongs; remove {s.root} and run rank {r} again")
    if (store_dir / MANIFEST).is_file():
        main = EmbeddingStore(store_dir)
        if main.manifest.get("fingerprint") != m0["fingerprint"] or main.done != start:
            raise ValueError(f"store {store_dir} (fingerprint {main.manifest.get('fingerprint')}, done {main.done}) "
                             f"does not match its shards (fingerprint {m0['fingerprint']}, start {start})")
        if not _decoding_fits(main, shards):   # the shards agree (checked above): main's rows do not
            raise ValueError(f"store {store_dir} was decoded as {dict(zip(DECODING, _decoding(main)))} and its "
                             f"shards as {dict(zip(DECODING, _decoding(shards[0])))}: their pixels differ a little, "
                             f"so the merged store would mix both; remove the shard stores and run the ranks again "
                             f"with the store's --loader-backend and --device")
        _adopt_decoding(main, shards[0])
    else:
        main = _create_main(store_dir, m0, n)
    # rows computed by two encoders or devices differ in their last digits: said, as a resume in one process says it
    made = {s.manifest.get("compute"): s.root for s in shards if s.n}
    if main.done:
        made.setdefault(main.manifest.get("compute"), main.root)
    made.pop(None, None)   # a store of an earlier version, which kept no record
    if len(made) > 1:
        log.warning("the merged store %s mixes rows computed %s: they differ a little (their last digits); to keep "
                    "it uniform, remove it and its shards and run again with one --device and --encoder-backend",
                    store_dir, ", ".join(f"on {c} ({root})" for c, root in sorted(made.items())))
    with tqdm(total=n - start, desc="merging shards", unit="img", disable=not progress) as bar:
        _copy_shard_rows(main, shards, [s.n for s in shards], n, chunk=chunk, bar=bar)
    if labels is not None:
        _sync_labels(main, np.asarray(labels)[:n])
    main.write(n, {})  # flushes every column, then marks [0, n) done
    remove_shards()
    return main
