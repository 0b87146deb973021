"""Sharded stores: one per rank of a distributed embedding pass, merged into the main store.

Rank r of w embeds the pool items r, r + w, ... into `shard_dir` (r, w).  `open_main`
brings the main store up to date (an earlier version's store relabelled; shards that a run of
another number of processes left merged, or the rows they finished without a gap kept), and
`merge_shards` writes every shard's rows into the main store in pool order, refusing shards of
other pools, models or decoders.
"""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.sources import ImageSource
from .pixel_cache import MIXED, MODE_KEY, PIXELS, merged_mode
from .store import MANIFEST, EmbeddingStore, _open_checked, legacy_identities, unmark_stores

CHUNK_BYTES = 1 << 26   # the rows of one column a merge holds at once (64 MiB)

log = logging.getLogger("spurfast.embed")   # the pass's: its messages read as before the split


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
    # main's columns: a pixel column is kept by a pass only below a size set at run time, and a
    # store made without one takes the others' rows
    cols = [k for k in shards[0].manifest["columns"] if k != "index" and k in main.manifest["columns"]]
    if PIXELS in main.manifest["columns"]:
        # rows of stores without pixels, or of another conversion, leave the column unread
        modes = [s.manifest.get(MODE_KEY) if PIXELS in s.manifest["columns"] else MIXED
                 for s, c in zip(shards, counts) if c]
        main.manifest[MODE_KEY] = merged_mode(main.manifest.get(MODE_KEY) if main.done else None, *modes)
    # a line of a batch the main store's pass was interrupted in (the shards did those rows
    # again) would count once the rows are marked done: a repaired file stayed unreadable
    main.drop_unfinished_bad_files()
    bad = main.bad_files()
    # a chunk of pixel rows (12 KiB each at 64x64 RGB) held 800 MB at 65,536 rows
    row_bytes = max(shards[0].row_bytes(k) for k in cols) if cols else 1
    chunk = max(1, min(chunk, CHUNK_BYTES // max(1, row_bytes)))
    for s, c in zip(shards, counts):
        index = s["index"]
        for lo in range(0, c, chunk):
            rows = np.asarray(index[lo:min(c, lo + chunk)])
            for k in cols:
                if k != PIXELS or PIXELS in s.manifest["columns"]:   # a pass that kept none: MIXED above
                    main.write_rows(k, rows, s.read_rows(k, slice(lo, lo + len(rows))))
            if bar is not None:
                bar.update(len(rows))
        bad.update({i: why for i, why in s.bad_files().items() if int(i) < stop})
    if bad:
        main.manifest["bad_files"] = bad


def _create_main(store_dir: Path, shard_manifest: dict, n: int) -> EmbeddingStore:
    """An empty main store of ``n`` rows with the columns and identity of a shard store."""
    m0 = shard_manifest
    cols = {k: ((n,) + tuple(v[0][1:]), v[1]) for k, v in m0["columns"].items() if k != "index"}
    kept = ("fingerprint", "content", "identity", "pool", "num_classes", "latent_dim", "loader", "decode", "compute")
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
