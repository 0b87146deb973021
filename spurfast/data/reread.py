"""A folder pool read image by image through the loader that decoded its embedding store.

``ImageFolderSource.get_batch`` decodes with PIL, as the torch loader does.  In a run whose
store the DALI loader decoded, the steps that read pool images one batch at a time (the
findings' pictures and masks, the exemplar grids, confirmation's clean images) read other
pixels than the store's (up to 1/255 apart): a finding's mask differed in 25 of 299 pixels
at 28x28 and its control flip rate moved from 0.08 to 0.10, and that mask then ranked
DALI-decoded images.  This wrapper gives them the store's pixels."""
from __future__ import annotations

import numpy as np
import torch

from .sources import ImageSource, pool_indices


class BaseReads(ImageSource):
    """``base`` read otherwise: a subclass gives ``get_batch``; everything else is ``base``'s."""

    def __init__(self, base: ImageSource):
        self.base = base
        self.image_shape, self.class_names, self.name = base.image_shape, base.class_names, base.name

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.get_batch([int(i)])
        return x[0], int(y[0])

    def item_id(self, i):
        return self.base.item_id(i)

    def labels(self):
        return self.base.labels()

    @property
    def bad_files(self) -> dict[int, str]:   # a loader records them in the base's
        return getattr(self.base, "bad_files", {})


class StoreLoaderReads(BaseReads):
    """``base`` (a folder pool) whose ``get_batch`` decodes through ``loader_backend`` on
    ``device`` (`loader_torch.iter_batches`); everything else is ``base``'s."""

    def __init__(self, base: ImageSource, loader_backend: str, device: str | None, batch_size: int = 256):
        super().__init__(base)
        self.loader_backend, self.device, self.batch_size = loader_backend, device, batch_size

    def get_batch(self, indices):
        from .loader_torch import iter_batches

        idx = pool_indices(indices, len(self.base), f"indices into {self.base.name}")
        if not len(idx):
            return self.base.get_batch(idx)
        # each file once (the loaders refuse a repeat: one read per pool item and pass)
        once, back = np.unique(idx, return_inverse=True)
        images = [b.images.float().cpu() for b in iter_batches(self.base, self.batch_size, indices=once,
                                                                backend=self.loader_backend, device=self.device)]
        return torch.cat(images)[torch.as_tensor(back)], torch.as_tensor(self.base.labels()[idx], dtype=torch.int64)


def read_as_stored(pool: ImageSource, loader_backend: str | None, device: str | None, batch_size: int = 256,
                   store=None):
    """``pool`` read as its embedding ``store`` saw it: the store's own pixel rows where it
    kept them (`spurfast.pixel_cache`: no decoding at all); else ``pool``, or, where its
    images are files that DALI decoded into the store, the pool read through DALI
    (`StoreLoaderReads`): the torch loader and ``get_batch`` both decode with PIL."""
    from .. import backends
    from ..pixel_cache import StorePixelReads, usable

    if getattr(pool, "paths", None) is not None and usable(store):
        return StorePixelReads(pool, store)
    if getattr(pool, "paths", None) is None or backends.resolve("loader", loader_backend)[0] != "dali":
        return pool
    return StoreLoaderReads(pool, "dali", device, batch_size)
