"""torch DataLoader-based streaming of any ImageSource, in pool order.

Yields ``Batch(indices, images, labels, ok)``; ``ok`` is False for files that failed to
decode (their image is zeros).  In-memory sources are sliced directly (no per-item
collate); folders go through a DataLoader with worker processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .preprocess import PreprocessSpec, load_image
from .sources import ArraySource, ImageSource


@dataclass
class Batch:
    indices: torch.Tensor  # (B,) int64 pool indices
    images: torch.Tensor   # (B, C, H, W) float32 in [0, 1]
    labels: torch.Tensor   # (B,) int64, -1 unknown
    ok: torch.Tensor       # (B,) bool


class _FolderItems(torch.utils.data.Dataset):
    def __init__(self, paths, spec, indices):
        self.paths, self.spec, self.indices = paths, spec, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        i = int(self.indices[j])
        try:
            return i, load_image(self.paths[i], self.spec), True
        except Exception:
            return i, torch.zeros(self.spec.channels, self.spec.size, self.spec.size), False


def iter_folder_batches(paths, *, size: int, channels: int = 3, batch_size: int = 256,
                        start: int = 0, shard_id: int = 0, num_shards: int = 1,
                        num_threads: int = 2, indices=None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Loader-op signature shared with the DALI loader: yields (indices, images, ok)."""
    spec = PreprocessSpec(size, channels)
    if indices is None:
        indices = np.arange(start, len(paths))[shard_id::num_shards]
    ds = _FolderItems(paths, spec, np.asarray(indices, dtype=np.int64))
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False,
                                     num_workers=num_threads if num_threads > 1 else 0,
                                     persistent_workers=False)
    for idx, images, ok in dl:
        yield idx.long(), images, ok.bool()


def iter_batches(source: ImageSource, batch_size: int = 256, start: int = 0,
                 indices=None, num_workers: int = 0, backend: str | None = None) -> Iterator[Batch]:
    """Stream ``source`` (from pool index ``start``, or the given ``indices``) in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    idx_all = np.arange(start, len(source)) if indices is None else np.asarray(indices, dtype=np.int64)
    paths = getattr(source, "paths", None)
    if paths is not None:
        from .. import backends
        _, fn = backends.resolve("loader", backend)
        labels = source.labels()
        for idx, images, ok in fn(paths, size=source.spec.size, channels=source.spec.channels,
                                  batch_size=batch_size, indices=idx_all, num_threads=max(1, num_workers)):
            for i in idx[~ok].tolist():
                source.bad_files.setdefault(int(i), "could not be decoded")
            yield Batch(idx, images, torch.as_tensor(labels[idx.numpy()]), ok)
        return
    for s in range(0, len(idx_all), batch_size):
        sel = idx_all[s:s + batch_size]
        images, labels = source.get_batch(sel)
        yield Batch(torch.as_tensor(sel), images, labels, torch.ones(len(sel), dtype=torch.bool))
