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
would not be the pattern the model learned.  Inside the stamp, the finding's contrast becomes
the carriers' mean minus the others' and its pattern the carriers' mean: the members' contrast
there is the stamp times their share of carriers, and pasting it faintly (the 3x3 patch at
n = 3: 0.2-0.3 of the stamp's value) moved the model no more than the random control, where the
garment-sized mask had been confirmed.  Confirmation then pastes the stamp (mask x contrast,
`spurfast.support.extracted_patterns`), training support tests it, and the report draws it.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy.stats import rankdata

from .characterise import sorted_sample
from .data.sources import ImageSource
from .support import image_pass

SHIFTED = 0.75     # a stamp pixel's AUROC (or 1 - it), carriers against the other ranked images
SAMPLE = 512       # images read of each side, per finding
PASS_BYTES = 256 << 20   # images held at once, as 8-bit values (at least one finding's a pass)
COLUMNS = 1 << 14        # pixel values ranked at once: float64 ranks of 1,024 images x 16,384 = 128 MiB


def separating_pixels(carriers: np.ndarray, others: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose value (any channel) tells ``carriers`` (Nc, C, H, W) from
    ``others`` (No, C, H, W) with an AUROC of at least `SHIFTED` or at most 1 - `SHIFTED`
    (ties count half, as in the Mann-Whitney statistic)."""
    nc, no = len(carriers), len(others)
    shape = carriers.shape[1:]
    if nc == 0 or no == 0:
        return np.zeros(shape[-2:], bool)
    both = np.concatenate([carriers, others]).reshape(nc + no, -1)
    auroc = np.empty(both.shape[1])
    for s in range(0, both.shape[1], COLUMNS):   # average ranks: ties count half
        ranks = rankdata(both[:, s:s + COLUMNS], axis=0)
        auroc[s:s + COLUMNS] = (ranks[:nc].sum(0) - nc * (nc + 1) / 2) / (nc * no)
    auroc = auroc.reshape(shape)
    return (np.maximum(auroc, 1 - auroc) >= SHIFTED).any(0)


class Stamp(NamedTuple):
    mask: np.ndarray           # (H, W) bool: the pixels that tell the carriers from the others
    carriers_mean: np.ndarray  # (C, H, W) in [0, 1]: the carriers' mean image
    others_mean: np.ndarray    # (C, H, W): the other ranked images' mean image


def stamp_masks(sides: list[tuple[np.ndarray, np.ndarray]], source: ImageSource, *, localised: float,
                batch_size: int, progress: bool, num_workers: int, loader_backend: str | None,
                device: str | None, seed: int = 0) -> list[Stamp | None]:
    """Per (carriers, others) pair of pool indices, its `Stamp`, or None where no pixel or more
    than ``localised`` of the image separates them.  A sample of at most
    `SAMPLE` images of each side (``seed``'s draw; unreadable ones are left out), read in as few
    passes as `PASS_BYTES` of 8-bit images allow."""
    rng = np.random.default_rng(seed)
    drawn = [(sorted_sample(np.asarray(c, np.int64), SAMPLE, rng), sorted_sample(np.asarray(o, np.int64), SAMPLE, rng))
             for c, o in sides]
    per_pass = max(1, PASS_BYTES // int(np.prod(source.image_shape)))   # images
    out, group, held = [], [], 0
    for d in drawn:
        n = len(d[0]) + len(d[1])
        if group and held + n > per_pass:
            out += _masks(group, source, localised, batch_size, progress, num_workers, loader_backend, device)
            group, held = [], 0
        group.append(d)
        held += n
    return out + _masks(group, source, localised, batch_size, progress, num_workers, loader_backend, device)


def _masks(drawn: list[tuple[np.ndarray, np.ndarray]], source: ImageSource, localised: float, batch_size: int,
           progress: bool, num_workers: int, loader_backend: str | None, device: str | None) -> list:
    """`stamp_masks` of the findings whose samples are ``drawn``: one pass over their union."""
    union = np.unique(np.concatenate([np.concatenate(d) for d in drawn]))
    if len(union) == 0:
        return [None] * len(drawn)
    images = np.zeros((len(union), *source.image_shape), np.uint8)   # 8-bit: the files' own depth
    readable = np.zeros(len(union), bool)

    def take(got, x, ok):
        at = np.searchsorted(union, np.asarray(got))
        images[at] = np.rint(x.numpy() * 255)
        readable[at] = np.asarray(ok, bool)

    image_pass(source, union, take, batch_size, progress, "stamp masks", num_workers, loader_backend, device)
    out = []
    for c, o in drawn:
        rows_c, rows_o = np.searchsorted(union, c), np.searchsorted(union, o)
        xc, xo = images[rows_c[readable[rows_c]]], images[rows_o[readable[rows_o]]]
        mask = separating_pixels(xc, xo)
        out.append(Stamp(mask, xc.mean(0) / 255, xo.mean(0) / 255)
                   if mask.any() and float(mask.mean()) <= localised else None)
    return out


def take_stamp(finding: dict, stamp: Stamp) -> None:
    """Make ``stamp`` the finding's pattern: its ``_mask``, and inside it the ``_contrast``
    (carriers' mean minus the others') and ``_pattern`` (carriers' mean) that confirmation
    pastes; outside the mask both stay the cluster's (`spurfast.discover.extract_pattern`)."""
    m = torch.as_tensor(stamp.mask)
    contrast = torch.as_tensor(finding["_contrast"], dtype=torch.float32)
    finding["_contrast"] = torch.where(m, torch.as_tensor(stamp.carriers_mean - stamp.others_mean,
                                                          dtype=torch.float32), contrast)
    if finding.get("_pattern") is not None:
        pattern = torch.as_tensor(finding["_pattern"], dtype=torch.float32)
        finding["_pattern"] = torch.where(m, torch.as_tensor(stamp.carriers_mean, dtype=torch.float32), pattern)
    finding["_mask"] = stamp.mask
