"""The streaming embedding pass: pool -> classifier + VAE encoder -> on-disk store.

The store is a directory of memory-mapped ``.npy`` arrays plus ``manifest.json``.
Batches are written in pool order; after each flush the manifest's ``done`` counter is
replaced atomically, so an interrupted pass resumes at the first unfinished batch and
never redoes (or loses) finished work.  A store made with other models or another pool
is refused (fingerprint mismatch) rather than silently mixed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.loader_torch import iter_batches
from .data.sources import ImageSource
from .models.classifier import classifier_outputs

log = logging.getLogger("spurfast.embed")
MANIFEST = "manifest.json"


def fingerprint(source: ImageSource, *models: torch.nn.Module) -> str:
    h = hashlib.sha256()
    h.update(f"{source.name}:{len(source)}:{source.image_shape}".encode())
    for i in sorted({0, len(source) // 2, len(source) - 1}):
        if 0 <= i < len(source):
            h.update(source.item_id(i).encode())
    for m in models:
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class EmbeddingStore:
    """Columns: pred (int32), conf (fp32), probs (n x C fp32), mu (n x L fp32),
    feats (n x F fp16), labels (int64), ok (bool: the image decoded)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.root} is not an embedding store (no {MANIFEST})")
        self.manifest = json.loads(path.read_text())
        self._arrays: dict[str, np.memmap] = {}

    @classmethod
    def create(cls, root, n: int, columns: dict[str, tuple[tuple[int, ...], str]], meta: dict) -> "EmbeddingStore":
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        for name, (shape, dtype) in columns.items():
            np.lib.format.open_memmap(root / f"{name}.npy", mode="w+", dtype=dtype, shape=(n,) + tuple(shape[1:]))
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
            self._arrays[key] = np.load(self.root / f"{name}.npy", mmap_mode="r+" if writable else "r")
        return self._arrays[key]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.array(name)

    def write(self, start: int, values: dict[str, np.ndarray]) -> None:
        stop = start + len(next(iter(values.values())))
        for name, v in values.items():
            self.array(name, writable=True)[start:stop] = v
        for (name, w), arr in self._arrays.items():
            if w:
                arr.flush()
        self.manifest["done"] = max(self.done, stop)
        _write_json(self.root / MANIFEST, self.manifest)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def embed_pool(source: ImageSource, classifier: torch.nn.Module, vae, store_dir, *, num_classes: int,
               batch_size: int = 256, device: str = "cpu", encoder_backend: str | None = None,
               loader_backend: str | None = None, progress: bool = True, stop_after: int | None = None,
               num_workers: int | None = None) -> EmbeddingStore:
    """Stream ``source`` once through the classifier and the encoder into ``store_dir``.

    Resumes when ``store_dir`` holds an unfinished store of the same fingerprint.
    ``stop_after`` (batches) simulates an interruption for tests.  ``num_workers``: decode
    threads/processes for folder pools (default: all cores).
    """
    if num_workers is None:
        num_workers = os.cpu_count() or 1
    n = len(source)
    if n == 0:
        raise ValueError(f"pool {source.name} is empty")
    fp = fingerprint(source, classifier, vae)
    store_dir = Path(store_dir)
    if (store_dir / MANIFEST).is_file():
        store = EmbeddingStore(store_dir)
        if store.manifest.get("fingerprint") != fp:
            raise ValueError(f"embedding store {store_dir} was made with other models or another pool "
                             f"(fingerprint {store.manifest.get('fingerprint')} != {fp}); use a new directory")
        if store.complete:
            return store
        log.info("resuming embedding pass at pool index %d of %d", store.done, n)
    else:
        with torch.no_grad():
            x0, _ = source.get_batch([0])
            logits, feats = classifier_outputs(classifier, x0.to(device))
        if logits.shape[1] != num_classes:
            raise ValueError(f"classifier outputs {logits.shape[1]} logits; expected {num_classes} classes")
        L = vae.config.latent_dim
        cols = {"pred": ((n,), "int32"), "conf": ((n,), "float32"), "probs": ((n, num_classes), "float32"),
                "mu": ((n, L), "float32"), "feats": ((n, feats.shape[1]), "float16"),
                "labels": ((n,), "int64"), "ok": ((n,), "bool")}
        store = EmbeddingStore.create(store_dir, n, cols, {"fingerprint": fp, "pool": source.name,
                                                           "num_classes": num_classes, "latent_dim": L})
    classifier.to(device).eval()
    vae.to(device).eval()
    start = store.done
    bar = tqdm(total=n, initial=start, desc="embedding pool", unit="img", disable=not progress)
    for b, batch in enumerate(iter_batches(source, batch_size, start=start, num_workers=num_workers,
                                           backend=loader_backend)):
        if stop_after is not None and b >= stop_after:
            break
        idx = batch.indices.numpy()
        if len(idx) and int(idx[0]) != store.done:
            raise RuntimeError(f"loader yielded pool index {int(idx[0])}, expected {store.done}")
        x = batch.images.to(device)
        with torch.no_grad():
            logits, feats = classifier_outputs(classifier, x)
            probs = torch.softmax(logits.float(), 1)
            mu, _ = vae.encode(x, backend=encoder_backend)
        ok = batch.ok.numpy()
        if not torch.isfinite(mu).all():
            bad = (~torch.isfinite(mu).all(1)).nonzero().flatten()
            raise ValueError(f"encoder produced NaN/inf latents for pool indices {idx[bad.numpy()][:10].tolist()}")
        conf, pred = probs.max(1)
        pred = pred.cpu().numpy().astype(np.int32)
        pred[~ok] = -1  # unreadable files take no part in clustering
        store.write(int(idx[0]), {"pred": pred, "conf": conf.cpu().numpy(), "probs": probs.cpu().numpy(),
                                  "mu": mu.cpu().numpy(), "feats": feats.float().cpu().numpy().astype(np.float16),
                                  "labels": batch.labels.numpy(), "ok": ok})
        bar.update(len(idx))
    bar.close()
    return store
