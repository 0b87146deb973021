"""The pool's pixels as the embedding pass saw them, kept in the store for the steps that re-read them.

After discovery, the steps that look at pixels read pool images again: each finding's
contrast and mask (`spurfast.characterise`: about 1,400 images a finding), its pattern
ranking and pixel probe, training support, confirmation's clean and class images.  For a
folder pool every read decodes a JPEG again: on this project's 2-core machine a 20k-image
pool's 21 findings took 16.5 s to characterise and 8.5 s to rank, beside 18 s for the whole
embedding pass (`python -m bench e2e`).  The embedding pass has each image decoded and
resized already, so it keeps it: one uint8 row of C x H x W bytes per image, a column
``pixels`` of the store (64x64 RGB: 12 KiB an image, 1.2 GB at 100k images), and the later
steps read rows of it (`StorePixelReads`).

Bit for bit what the loader gives: its float images are uint8 values scaled to [0, 1], by
``/ 255`` (PIL, and any uint8 batch made float by `uint8_to`) or ``* (1 / 255)`` (DALI's
normalisation), which differ in the last bit for some values.  The pass records which one
reproduced its batches exactly (``pixels_mode``); where none did, or rows of two were mixed
(a resume on another device), the column is not read and the steps decode the files again.

Kept for folder pools (in-memory ones are pixels already) up to `max_bytes` in all
(``SPURFAST_PIXEL_CACHE_GB``, default 4; 0 keeps none).  Its rows are written and read with
pwrite/pread (`EmbeddingStore.read_rows`), never through a memory map: the store's small
columns stay mapped for the run, but a map counts the file pages a read touches as resident
memory, and 1,365 scattered rows of a 1.2 GB column raised a process's peak by 860 MiB.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from .data.reread import BaseReads
from .data.sources import ImageSource, pool_indices

PIXELS = "pixels"
MODE_KEY = "pixels_mode"
MIXED = "mixed"   # batches of two conversions in one store: not read
MODES = ("div255", "mul_inv255")
# batches every conversion gives back (130 of the 256 values convert alike: black and white
# frames, an all-unreadable batch): they decide nothing.  Taken as div255, a first such batch
# made the store "mixed" at the first DALI batch, and its pixel column went unread
EITHER = "either"
_INV255 = np.float32(1.0 / 255.0)


def max_bytes() -> int:
    """The largest pixel column a pass keeps, from ``SPURFAST_PIXEL_CACHE_GB`` (default 4)."""
    raw = os.environ.get("SPURFAST_PIXEL_CACHE_GB", "4")
    try:
        gb = float(raw)
    except ValueError:
        raise ValueError(f"SPURFAST_PIXEL_CACHE_GB must be a number of gigabytes (0: keep no pixels), got "
                         f"{raw!r}") from None
    if not gb >= 0:   # NaN too
        raise ValueError(f"SPURFAST_PIXEL_CACHE_GB must be >= 0, got {raw!r}")
    limit = gb * (1 << 30)
    if not math.isfinite(limit):   # inf, 1e400 (read as inf), 1e300 (inf in bytes): int() raised OverflowError
        raise ValueError(f"SPURFAST_PIXEL_CACHE_GB must be a finite number of gigabytes, got {raw!r}")
    return int(limit)


def keeps_pixels(source: ImageSource, n: int) -> bool:
    """Whether an embedding pass over ``n`` images of ``source`` keeps their pixels: a folder
    pool (one whose images are files to decode) whose column fits `max_bytes`."""
    if getattr(source, "paths", None) is None:
        return False
    return 0 < n * int(np.prod(source.image_shape)) <= max_bytes()


def to_float(pixels: torch.Tensor, mode: str) -> torch.Tensor:
    """uint8 rows as the loader's float32 images."""
    x = pixels.to(torch.float32)
    return x.div_(255.0) if mode in ("div255", EITHER) else x.mul_(float(_INV255))


def batch_pixels(images: torch.Tensor, expect: str | None = None) -> tuple[np.ndarray, str | None]:
    """(uint8 rows (B, C, H, W), the conversion that gives ``images`` back exactly, or None):
    the loader's batch as the store keeps it.  ``expect``: the conversion earlier batches
    used, tried first (DALI's, tried second, cost every batch a conversion more)."""
    if images.dtype == torch.uint8:
        return images.cpu().numpy(), "div255"   # made float by uint8_to, as embed_pool does
    x = images.detach().to("cpu", torch.float32)
    u = x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    if expect in MODES and torch.equal(to_float(u, expect), x):
        return u.numpy(), expect
    fits = [mode for mode in MODES if torch.equal(to_float(u, mode), x)]
    return u.numpy(), EITHER if len(fits) > 1 else (fits[0] if fits else None)


def merged_mode(*modes) -> str | None:
    """The mode of a store holding rows of stores (or batches) of ``modes`` (None: no row yet;
    `EITHER` rows join any mode)."""
    seen = {m for m in modes if m not in (None, EITHER)}
    return seen.pop() if len(seen) == 1 else MIXED if seen else EITHER if EITHER in modes else None


class StorePixelReads(BaseReads):
    """``base`` (the folder pool a complete store was embedded from) whose ``get_batch``
    reads the store's pixel rows instead of decoding files; everything else is ``base``'s.
    Unreadable files are zero rows, and in ``bad_files`` as the store recorded them."""
    reads_in_threads = True   # each read opens the column's file for positional reads of its own

    def __init__(self, base: ImageSource, store):
        super().__init__(base)
        self.store, self.mode = store, store.manifest[MODE_KEY]
        # the store's unreadable files, and any a later read of the base found
        self._stored_bad = {int(i): why for i, why in store.bad_files().items()}

    @property
    def bad_files(self) -> dict[int, str]:
        return {**self._stored_bad, **getattr(self.base, "bad_files", {})}

    def get_batch(self, indices):
        idx = pool_indices(indices, len(self.base), f"indices into {self.base.name}")
        rows = torch.as_tensor(self.store.read_rows(PIXELS, idx))
        return to_float(rows, self.mode), torch.as_tensor(self.base.labels()[idx], dtype=torch.int64)


def pool_passes(pool: ImageSource, reads: ImageSource) -> ImageSource:
    """What the steps that pass over many pool images (pattern rankings, residual scan,
    training support) read: the store's pixel rows where `read_as_stored` gave them (``reads``),
    else ``pool`` itself, which their loader decodes on every core."""
    return reads if isinstance(reads, StorePixelReads) else pool


def usable(store) -> bool:
    """Whether ``store`` (complete) holds pixel rows that `StorePixelReads` may read."""
    return store is not None and store.complete and PIXELS in store.manifest.get("columns", {}) \
        and store.manifest.get(MODE_KEY) in (*MODES, EITHER)
