"""The streaming embedding pass: pool -> classifier + VAE encoder -> on-disk store.

The store (`spurfast.store`) is a directory of memory-mapped ``.npy`` arrays plus
``manifest.json``.  Batches are written in pool order; after each flush the manifest's
``done`` counter is replaced atomically, so an interrupted pass resumes at the first
unfinished batch and never redoes (or loses) finished work.  A store made with other models
or another pool is refused (fingerprint mismatch, `spurfast.identity`) rather than silently
mixed.  A rank of a distributed pass embeds its shard into a store of its own
(`spurfast.store_shards`).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import backends
from .checks import (CLASSIFIER_HINT, SOURCE_HINT, VAE_HINT, check_arguments, check_compute_device, check_default_dtype,
                     check_whole, folder_blocker, not_a_folder)
from .cores import usable_cores
from .data.loader_torch import iter_batches
from .data.preprocess import uint8_to
from .data.sources import ImageSource, content_digest
from .identity import fingerprint
from .models.as_given import restores_models
from .models.outputs import (check_floating, classifier_outputs, forget_checks, non_float32_weights, shape_text,
                             trial)
from .models.layout import in_cpu_blocks
from .pixel_cache import MIXED, MODE_KEY, PIXELS, batch_pixels, keeps_pixels, merged_mode
from .store_writer import BackgroundWriter
from .store import MANIFEST, EmbeddingStore, _open_checked, _same_identity, identity_fields, legacy_identities
from .store_shards import _sync_labels, open_main, shard_dir

log = logging.getLogger("spurfast.embed")
FEATS_MAX = float(np.finfo(np.float16).max)   # 65504: the store keeps penultimate features as float16


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
        forget_checks(model)   # decided again on this pass's first image: the model may have changed since
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
    cols = {"pred": ((n,), "int32"), "conf": ((n,), "float32"), "probs": ((n, num_classes), "float32"),
            "mu": ((n, L), "float32"), "feats": ((n, F), "float16"),
            "labels": ((n,), "int64"), "ok": ((n,), "bool")}
    if keeps_pixels(source, len(source)):   # the whole pool's size decides, alike on every rank
        cols[PIXELS] = ((n,) + tuple(source.image_shape), "uint8")
    return cols


def decode_device(device) -> str:
    """Where a loader that can decode on a GPU (DALI) decodes for a run computing on
    ``device``: that CUDA device, else the CPU (DALI decoded on the GPU whenever torch saw
    one, --device cpu included, and refused "cpu:1", which torch computes on as "cpu")."""
    return str(device) if torch.device(device).type == "cuda" else "cpu"


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
    (``compute_s``), and waiting for the store (``write_s``: a batch is written on a thread of
    its own while the next one computes, `spurfast.store_writer`; ``write_busy_s`` is that
    thread's writing time), so the slow stage shows.
    """
    check_default_dtype("embed_pool")
    check_arguments("embed_pool", ("source", source, ImageSource, "an ImageSource", SOURCE_HINT),
                    ("classifier", classifier, torch.nn.Module, "a torch.nn.Module", CLASSIFIER_HINT),
                    ("vae", vae, torch.nn.Module, "a torch.nn.Module", VAE_HINT))
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
    # on the run's device whatever the store holds: a finished store returned before the move,
    # and a later step given the models (confirmation) fed its batches to one left on the CPU
    classifier.to(device)
    vae.to(device)
    main = open_main(source, classifier, vae, store_dir, (fp, content), num_shards=num_shards, progress=progress)
    if main is not None and main.complete:
        _note_reading_errors(main)
        return main
    loader, decode, compute = how_rows_are_made(source, device, encoder_backend, loader_backend)
    sel = None
    if num_shards == 1:
        store = main
        if store is not None:
            log.info("resuming embedding pass at pool index %d of %d", store.done, n)
        else:
            store = EmbeddingStore.create(store_dir, n, _columns(source, classifier, vae, num_classes, device, n),
                                          {**identity_fields(fp, content), "pool": source.name,
                                           "num_classes": num_classes, "latent_dim": vae.config.latent_dim,
                                           "loader": loader, "decode": decode, "compute": compute})
        desc = "embedding pool"
    else:
        store, sel = _open_shard_store(source, classifier, vae, store_dir, main, (fp, content),
                                       num_classes=num_classes, device=device, how=(loader, decode, compute),
                                       shard_id=shard_id, num_shards=num_shards,
                                       restart_stale_shards=restart_stale_shards)
        desc = f"embedding shard {shard_id}/{num_shards}"
    if store.complete:
        return store
    _settle_how_rows_are_made(store, main, (loader, decode, compute), (fp, content), store_dir,
                              shard_id=shard_id, num_shards=num_shards)
    classifier.eval()   # on the device since the store was opened
    vae.eval()
    start = store.done
    warned = {}   # what `_batch_values` has warned of (once a pass)
    todo = None if sel is None else sel[start:]
    bar = tqdm(total=store.n, initial=start, desc=desc, unit="img", disable=not progress,
               position=shard_id if num_shards > 1 else None)
    clock = _Clock(timings)
    # to a GPU, folder images travel as uint8 and become floats there: a quarter of the
    # bytes, and no float conversion on host cores that the decoding workers keep busy
    raw = torch.uint8 if torch.device(device).type == "cuda" else None
    store.drop_unfinished_bad_files()
    keep_pixels = PIXELS in store.manifest["columns"]   # for the steps that read the images again (pixel_cache)
    mode = store.manifest.get(MODE_KEY) if start else None   # how the pixel rows so far convert back
    row = start   # the next row to fill: the writer thread owns the store (and its manifest) till the pass ends
    with BackgroundWriter(store, timings=timings) as writer:
        for b, batch in enumerate(iter_batches(source, batch_size, start=start, indices=todo,
                                               num_workers=num_workers, backend=loader or loader_backend,
                                               dtype=raw, device=decode_device(device))):   # the loader recorded
            clock.lap("load_wait_s")
            if stop_after is not None and b >= stop_after:
                break
            idx = batch.indices.numpy()
            _check_rows(idx, row, sel)
            values, bad = _batch_values(batch, idx, classifier, vae, device, encoder_backend, source, warned)
            saved = {}
            if keep_pixels:
                values[PIXELS], got = batch_pixels(batch.images, mode)
                saved[MODE_KEY] = mode = merged_mode(mode, got or MIXED)
            clock.lap("compute_s")
            writer.put(row, values, bad, saved)   # written while the next batch computes
            row += len(idx)
            bar.update(len(idx))
            clock.lap("write_s")
    bar.close()
    return store


def _note_reading_errors(store: EmbeddingStore) -> None:
    """A finished store is reused as it is: a file its pass could not open (permissions, a
    network mount gone a moment) stays unreadable in it, though its content never counted
    (its size, in the store's identity, is unchanged).  Said, with the way out."""
    errors = {i: r for i, r in store.bad_files().items() if str(r).startswith("cannot read file")}
    if errors:
        i, reason = next(iter(sorted(errors.items(), key=lambda kv: int(kv[0]))))
        log.warning("the embedding store %s is reused as it is, and marks %d pool image(s) unreadable for an error "
                    "reading the file, not for its content (first pool index %s: %s); if they can be read now, "
                    "remove %s to embed the pool again", store.root, len(errors), i, reason, store.root)


def _settle_how_rows_are_made(store: EmbeddingStore, main: EmbeddingStore | None, how: tuple,
                              identity: tuple[str, str], store_dir: Path, *, shard_id: int,
                              num_shards: int) -> None:
    """Refuse to resume a store (or the main store a shard store continues, or a sibling shard
    store joining it in the merge) whose rows another loader or decoder made; warn where they
    were computed elsewhere; record ``how`` (`how_rows_are_made`) in a store with no row yet."""
    (loader, decode, compute), (fp, content) = how, identity
    if loader is not None and store.done == 0 and (store.manifest.get("loader"), store.manifest.get("decode")) != (
            loader, decode):
        # no rows yet: this run's loader decodes all of them (a stale record let a later
        # resume with the first loader mix both)
        store.manifest["loader"], store.manifest["decode"] = loader, decode
        store.save_manifest()
    # a shard store continues the main store's rows: those were decoded too (by a run of
    # another number of processes, perhaps with another loader); and its sibling shards'
    # rows join it in the merge (a rank that finished its shard with one loader, and one
    # resumed with another)
    parts = [main, store] if store is not main else [store]
    if num_shards > 1 and loader is not None:
        for r in range(num_shards):
            d = shard_dir(store_dir, r, num_shards)
            if r == shard_id or not (d / MANIFEST).is_file():
                continue
            try:
                sib = EmbeddingStore(d)
            except (OSError, ValueError):   # another rank is creating it
                continue
            same_start = sib.manifest.get("start") == store.manifest.get("start")
            if _same_identity(sib.manifest, [(fp, content)]) and same_start:
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
        store.save_manifest()


def _open_shard_store(source: ImageSource, classifier, vae, store_dir: Path, main: EmbeddingStore | None,
                      identity: tuple[str, str], *, num_classes: int, device: str, how: tuple, shard_id: int,
                      num_shards: int, restart_stale_shards: bool) -> tuple[EmbeddingStore, np.ndarray]:
    """(rank ``shard_id``'s store, resumed or made, and the pool indices of its rows): its
    share of the pool indices past the main store's ``done``, every ``num_shards``-th.
    ``how``: `how_rows_are_made`'s (loader, decode, compute), recorded in a new store."""
    from .data.folder import select_indices
    (fp, content), (loader, decode, compute), n = identity, how, len(source)
    start = main.done if main is not None else 0
    sel = select_indices(n, start=start, shard_id=shard_id, num_shards=num_shards)
    sdir = shard_dir(store_dir, shard_id, num_shards)
    try:
        store = _open_checked(sdir, fp, content, lambda: legacy_identities(source, classifier, vae, content=content))
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
            **identity_fields(fp, content), "pool": source.name, "num_classes": num_classes,
            "latent_dim": vae.config.latent_dim, "start": start, "pool_n": n,
            "shard_id": shard_id, "num_shards": num_shards, "loader": loader, "decode": decode,
            "compute": compute},
            initial={"index": sel})
    elif store.done:
        _sync_labels(store, np.asarray(source.labels())[sel[:store.done]])
        log.info("resuming shard %d/%d at row %d of %d", shard_id, num_shards, store.done, store.n)
    return store, sel


def _check_rows(idx: np.ndarray, row: int, sel: np.ndarray | None) -> None:
    """Raise unless a batch of pool indices ``idx`` fills the store's rows from ``row`` on
    (``sel``: a shard's pool indices, else row = pool index)."""
    # every index, not the first: a file skipped inside a batch shifted its later rows
    # onto other images' rows, and the last batch's went unnoticed
    expect = np.arange(row, row + len(idx)) if sel is None else sel[row:row + len(idx)]
    if len(idx) != len(expect) or not np.array_equal(idx, expect):
        j = next((j for j in range(len(idx)) if j >= len(expect) or int(idx[j]) != int(expect[j])), 0)
        raise RuntimeError(f"loader yielded pool index {int(idx[j])} in row {row + j} of the store, "
                           f"expected {int(expect[j]) if j < len(expect) else 'none (past the end)'}")


def _batch_values(batch, idx: np.ndarray, classifier, vae, device: str, encoder_backend: str | None,
                  source: ImageSource, warned: dict) -> tuple[dict, dict | None]:
    """(the store columns of one loaded batch (pool indices ``idx``) but its pixels, its
    unreadable files as the store keeps them or None); ``warned`` keeps what was warned of
    once a pass."""
    x = batch.images.to(device)
    if x.dtype == torch.uint8:
        x = uint8_to(x, torch.float32)
    with torch.no_grad():
        logits, feats, mu = in_cpu_blocks(lambda xb: classifier_outputs(classifier, xb) + (
            vae.encode(xb, backend=encoder_backend)[0],), x)   # both models on a block while it is in cache
        probs = torch.softmax(logits.float(), 1)
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
        if not warned.get("clipped"):
            log.warning("penultimate features beyond float16's range (|x| > %g) from pool index %d on: stored "
                        "clipped to +-%g in the store's feats column (used by the GEORGE and activation-"
                        "clustering baselines only)", FEATS_MAX, int(idx[np.nonzero(big.any(1))[0][0]]),
                        FEATS_MAX)
        warned["clipped"] = True
        feats = np.clip(feats, -FEATS_MAX, FEATS_MAX)
    pred[~ok] = -1  # unreadable files take no part in clustering
    bad = None
    if not ok.all():  # kept in the store so a resumed or sharded run still reports them
        bad_files = getattr(source, "bad_files", {})
        bad = {str(int(i)): bad_files.get(int(i), "could not be decoded") for i in idx[~ok]}
    return {"pred": pred, "conf": conf, "probs": probs, "mu": mu, "feats": feats.astype(np.float16),
            "labels": batch.labels.numpy(), "ok": ok}, bad


class _Clock:
    """Adds the seconds since the previous lap to ``sink[name]``; no-op without a sink."""

    def __init__(self, sink: dict | None):
        self.sink, self.t = sink, time.perf_counter()

    def lap(self, name: str) -> None:
        if self.sink is not None:
            now = time.perf_counter()
            self.sink[name] = self.sink.get(name, 0.0) + now - self.t
            self.t = now
