"""torch DataLoader-based streaming of any ImageSource, in pool order.

Yields ``Batch(indices, images, labels, ok)``; ``ok`` is False for files that failed to
decode (their image is zeros).  In-memory sources are sliced directly (no per-item
collate); folders go through a DataLoader with worker processes.
"""
from __future__ import annotations

import inspect
import logging
import numbers
from dataclasses import dataclass
from typing import Iterator

import torch

from ..checks import check_whole
from .folder import refuse_repeats, select_indices, warn_unreadable
from .preprocess import PreprocessSpec, checked_load_uint8, output_dtype, uint8_to
from .sources import ImageSource

log = logging.getLogger("spurfast.data")


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
        image, reason = checked_load_uint8(self.paths[i], self.spec)
        if image is None:
            return i, torch.zeros(self.spec.channels, self.spec.size, self.spec.size, dtype=torch.uint8), False, reason
        return i, image, True, ""


def iter_folder_batches(paths, *, size: int, channels: int = 3, batch_size: int = 256,
                        start: int = 0, shard_id: int = 0, num_shards: int = 1,
                        num_threads: int = 2, indices=None, dtype=torch.float32,
                        bad_files: dict | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Loader-op signature shared with the DALI loader: yields (indices, images, ok).

    Streams ``select_indices(len(paths), start=, shard_id=, num_shards=, indices=)`` in
    order, ``batch_size`` per batch (the last one may be smaller); an index given twice is
    refused, as the DALI loader refuses it.  ``num_threads`` DataLoader worker processes (0
    or 1: decode in this process).  ``dtype``: uint8 (0..255) or float32/float16/bfloat16 in
    [0, 1].  A bad file (see ``preprocess.validate_image_file``; anything PIL cannot decode)
    yields a zero image with ok=False, and its reason goes into ``bad_files`` (pool index ->
    reason) when given."""
    spec = PreprocessSpec(size, channels)
    dtype = output_dtype(dtype)
    check_whole(batch_size, "batch_size", not_integer=TypeError)
    sel = select_indices(len(paths), start=start, shard_id=shard_id, num_shards=num_shards, indices=indices)
    if len(sel) == 0:
        return
    refuse_repeats(sel)
    ds = _FolderItems(paths, spec, sel)
    workers = num_threads if num_threads > 1 else 0
    # int(): the DataLoader refuses a numpy integer, which run_discovery accepts as a batch size
    dl = torch.utils.data.DataLoader(ds, batch_size=int(batch_size), shuffle=False, num_workers=workers,
                                     persistent_workers=False,
                                     prefetch_factor=4 if workers else None)
    for idx, images, ok, reasons in dl:
        ok = ok.bool()
        if not bool(ok.all()):
            for j in (~ok).nonzero().flatten().tolist():
                i = int(idx[j])
                if bad_files is None or i not in bad_files:   # said once a run (a trial read may have)
                    warn_unreadable(paths[i], reasons[j])
                if bad_files is not None:
                    bad_files[i] = reasons[j]
        yield idx.long(), uint8_to(images, dtype), ok


def iter_batches(source: ImageSource, batch_size: int = 256, start: int = 0,
                 indices=None, num_workers: int = 0, backend: str | None = None,
                 dtype: torch.dtype | None = None, device: str | None = None) -> Iterator[Batch]:
    """Stream ``source`` (from pool index ``start``, or the given ``indices``) in order.

    ``dtype=torch.uint8`` asks folder pools for raw 0..255 images (a quarter of the bytes
    to move; the caller converts, e.g. on its GPU); in-memory sources yield their own
    floats whatever ``dtype`` says.  ``device``: where a loader that can decode on a GPU
    (DALI) decodes, e.g. the run's device ("cpu": never on the GPU; None: its own choice)."""
    # 2.5 was cut to batches of 2 by the torch folder loader, and failed the DALI loader and in-memory
    # sources naming nothing ("'float' object cannot be interpreted as an integer"); True ran batches of 1
    check_whole(batch_size, "batch_size", not_integer=TypeError)
    if not isinstance(num_workers, numbers.Integral):   # 2.5 failed in the loader, naming nothing
        raise TypeError(f"num_workers must be an integer, got {num_workers!r}")
    # checked as the folder loaders check them: a negative start or index would otherwise
    # count from the end of an in-memory source (pool index -2 yielded as such)
    idx_all = select_indices(len(source), start=start, indices=indices)
    paths = getattr(source, "paths", None)
    if paths is not None:
        from .. import backends
        _, fn = backends.resolve("loader", backend)
        labels = source.labels()
        extra = {} if dtype is None else {"dtype": dtype}
        params = inspect.signature(fn).parameters
        if "bad_files" in params:
            extra["bad_files"] = source.bad_files
        if device is not None and "device" in params:
            extra["device"] = str(device)
        for idx, images, ok in fn(paths, size=source.spec.size, channels=source.spec.channels,
                                  batch_size=batch_size, indices=idx_all, num_threads=max(1, num_workers),
                                  **extra):
            for i in idx[~ok].tolist():
                source.bad_files.setdefault(int(i), "could not be decoded")
            yield Batch(idx, images, torch.as_tensor(labels[idx.numpy()]), ok)
        return
    for s in range(0, len(idx_all), batch_size):
        sel = idx_all[s:s + batch_size]
        images, labels = _checked_batch(source, sel, *source.get_batch(sel))
        # a wrapper of folder sources (ConcatSource, SubsetSource) decodes lazily and
        # records what failed: those images are zeros, not pool images
        bad = getattr(source, "bad_files", None) or {}
        ok = torch.as_tensor([int(i) not in bad for i in sel], dtype=torch.bool) if bad else \
            torch.ones(len(sel), dtype=torch.bool)
        yield Batch(torch.as_tensor(sel), images, labels, ok)


def _checked_batch(source: ImageSource, sel: torch.Tensor, images, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """``source.get_batch(sel)``'s result as the pass needs it, or an error naming the source
    and the batch.  A source of one's own is not checked otherwise: normalised pixels
    (range -0.4..2.8) or 0..255 floats ran a whole discovery to "0 findings" without a word,
    and numpy arrays, list labels or a short batch failed deep in the pass."""
    where = f"source {source.name}: get_batch of images {int(sel[0])}..{int(sel[-1])}" if len(sel) else \
        f"source {source.name}: get_batch"
    images, labels = torch.as_tensor(images), torch.as_tensor(labels)
    want = (len(sel),) + tuple(source.image_shape)
    if tuple(images.shape) != want:
        raise ValueError(f"{where} returned images of shape {tuple(images.shape)}, expected {want} "
                         f"(one (C, H, W) image of the source's image_shape per index)")
    if not images.is_floating_point():
        raise ValueError(f"{where} returned {images.dtype} images; expected floats in [0, 1] "
                         f"(divide 0..255 pixels by 255)")
    if images.numel():
        lo, hi = (float(v) for v in torch.aminmax(images.float()))
        if not (0.0 <= lo and hi <= 1.0):   # NaN fails both
            raise ValueError(f"{where} returned pixel values in [{lo:.4g}, {hi:.4g}]; expected floats in [0, 1], "
                             f"as every spurfast source gives them (a classifier that wants normalised input "
                             f"normalises in its forward)")
    if tuple(labels.shape) != (len(sel),) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{where} returned labels of shape {tuple(labels.shape)} and dtype {labels.dtype}; "
                         f"expected {len(sel)} integer labels (-1 where unknown)")
    return images, labels.long()
