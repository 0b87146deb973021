"""A stamp's own pixels: the mask of a finding whose ranking found a stamp.

A finding ranked with a stamp's carriers first (`spurfast.pattern_rank`: a two-valued peak,
``ranked_by`` ending "+stamp") keeps the mask its contrast gave, and that mask holds the
members' shared content too: the single planted pixel at n = 1000 had a garment-sized mask
(IoU with the pixel <= 0.01), so confirmation pasted the garment's shadow and the report drew
it.  The carriers the peak split off share the stamp and nothing else, so the stamp is the
pixels whose value tells those carriers from the other ranked images: an AUROC of at least
`SHIFTED` in either direction (a dark stamp on a bright background too; a content pixel between
two unrelated samples of 512 images sits at 0.5 +- 0.02), on a sample of each side read once.
Where no pixel does, or more than the localised share of the image, the finding keeps its mask:
a fixed noise pattern's peak is a stamp too (one background pixel the noise always sets to the
same value), but the noise shifts hundreds of content pixels as well, and pasting the one pixel
would not be the pattern the model learned.  Confirmation then pastes the stamp (mask x
contrast, `spurfast.support.extracted_patterns`), training support tests it, and the report
draws it.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from .characterise import sorted_sample
from .data.sources import ImageSource
from .support import image_pass

SHIFTED = 0.75     # a stamp pixel's AUROC (or 1 - it), carriers against the other ranked images
SAMPLE = 512       # images read of each side, per finding


def separating_pixels(carriers: np.ndarray, others: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose value (any channel) tells ``carriers`` (Nc, C, H, W) from
    ``others`` (No, C, H, W) with an AUROC of at least `SHIFTED` or at most 1 - `SHIFTED`
    (ties count half, as in the Mann-Whitney statistic)."""
    nc, no = len(carriers), len(others)
    if nc == 0 or no == 0:
        return np.zeros(carriers.shape[-2:], bool)
    ranks = rankdata(np.concatenate([carriers, others]), axis=0)   # average ranks: ties count half
    auroc = (ranks[:nc].sum(0) - nc * (nc + 1) / 2) / (nc * no)     # (C, H, W)
    return (np.maximum(auroc, 1 - auroc) >= SHIFTED).any(0)


def stamp_masks(sides: list[tuple[np.ndarray, np.ndarray]], source: ImageSource, *, localised: float,
                batch_size: int, progress: bool, num_workers: int, loader_backend: str | None,
                device: str | None, seed: int = 0) -> list[np.ndarray | None]:
    """Per (carriers, others) pair of pool indices, the stamp's (H, W) bool mask, or None where
    no pixel or more than ``localised`` of the image separates them.  One pass over a sample of
    at most `SAMPLE` images of each side (``seed``'s draw; unreadable ones are left out)."""
    rng = np.random.default_rng(seed)
    drawn = [(sorted_sample(np.asarray(c, np.int64), SAMPLE, rng), sorted_sample(np.asarray(o, np.int64), SAMPLE, rng))
             for c, o in sides]
    union = np.unique(np.concatenate([np.concatenate(d) for d in drawn]))
    if len(union) == 0:
        return [None] * len(sides)
    images, readable = None, np.zeros(len(union), bool)

    def take(got, x, ok):
        nonlocal images
        if images is None:
            images = np.zeros((len(union), *x.shape[1:]), np.float32)
        at = np.searchsorted(union, np.asarray(got))
        images[at], readable[at] = x.numpy(), np.asarray(ok, bool)

    image_pass(source, union, take, batch_size, progress, "stamp masks", num_workers, loader_backend, device)
    out = []
    for c, o in drawn:
        rows_c, rows_o = np.searchsorted(union, c), np.searchsorted(union, o)
        mask = separating_pixels(images[rows_c[readable[rows_c]]], images[rows_o[readable[rows_o]]])
        out.append(mask if mask.any() and float(mask.mean()) <= localised else None)
    return out
