"""Pixel probe: a diffuse finding ranks the pool by its pixels as well as by its latent probe.

A diffuse pattern (additive noise, a background colour) keeps the latent ranking in
`spurfast.pattern_rank`: matching its extracted pattern follows the content, since its mask
covers about half the image.  But the VAE's 16 latent dimensions carry such a pattern only
in part, and the latent probe ranked natural look-alikes among the carriers (noise among three
patterns at n = 100: AP 0.91 where the pixel ablation had 1.00; a background colour 0.995 where
it had 1.000; docs/results/full/RESULTS.md, twenty-seventh session).  A linear probe on the images'
thumbnails (the pixel ablation's 2x2-pooled pixels, at most 14 px a side) separates a fixed
additive pattern from content, if it is fitted on carriers:

- *Positives*: the finding's members unrelated to its class (labelled otherwise, or an unlabelled
  non-suspect whose runner-up class is another: the score's own definition, `scoring`).  The
  members of a mixed cluster include genuine images of the class; fitted on all members, the
  probe learned their content too (AP 0.70 where the latent probe had 0.88).
- *Negatives*: a shared sample of images predicted as another class.
- A ridge of 1e-2 of the mean variance (the latent probe's is 1e-3 over 16 dimensions; here
  196 or more correlated pixels meet a few dozen positives).

Neither ranking is right everywhere (the latent one was better for a few mixed clusters: 0.88
against 0.80), so a finding is ranked by the sum of the two scores, each centred on its median
and scaled by its interquartile range over the images it ranks (0.90 there).  On the full
preset this raised the best finding's AP in 51 of the 56 pattern-seed pairs it moved, and
spurfast's AP against the baselines went from 25 wins, 6 ties and 11 losses to 28, 9 and 5
(docs/results/full/RESULTS.md, twenty-seventh session).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .characterise import linear_probe, sorted_sample

MAX_SIDE = 14        # thumbnails: 2x2 average pooling until a side is at most this (28 -> 14)
RIDGE = 1e-2         # of the mean variance, added to the thumbnails' covariance
NEGATIVES = 8192     # images predicted as another class, shared by every finding
POSITIVES = 1024     # unrelated members per finding at most (a sample beyond)


def _pooled(x: torch.Tensor) -> torch.Tensor:
    while x.shape[-1] > MAX_SIDE and x.shape[-2] > MAX_SIDE:
        x = F.avg_pool2d(x, 2, ceil_mode=True)
    return x


def thumbnails(x: torch.Tensor) -> torch.Tensor:
    """(B, C*h*w) images (B, C, H, W) 2x2 average-pooled until a side is at most `MAX_SIDE`
    (the pixel ablation's features: a 3x3 patch stays visible, 28x28 becomes 196 values)."""
    return _pooled(x).reshape(len(x), -1)


def thumbnail_shape(image_shape) -> tuple[int, int, int]:
    """(C, h, w) of the thumbnails of images of ``image_shape`` (C, H, W), before flattening."""
    return tuple(_pooled(torch.zeros((1, *image_shape))).shape[1:])


def full_size_pattern(w: np.ndarray, image_shape) -> torch.Tensor:
    """(C, H, W) float64 pattern p with <x, p> = <thumbnails(x), w> for every image x: the
    pooling's adjoint, so a thumbnail probe ranks through the same projection pass (and the
    same decoder) as an extracted pattern."""
    # autograd whatever the caller's mode: a run inside torch.no_grad() (or inference_mode) failed here
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.zeros((1, *image_shape), dtype=torch.float64, requires_grad=True)
        thumbnails(x)[0].backward(torch.as_tensor(np.asarray(w), dtype=torch.float64))
    return x.grad[0].detach()


def robust_z(v: np.ndarray) -> np.ndarray:
    """``v`` centred on its median and scaled by its interquartile range (its standard
    deviation, or 1, where that is 0): two scores of different units added with equal say."""
    v = np.asarray(v, np.float64)
    if len(v) == 0:
        return v
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    scale = q3 - q1
    if not scale > 0:
        scale = float(v.std()) or 1.0
    return (v - med) / scale


def negative_sample(pred: np.ndarray, cap: int = NEGATIVES, seed: int = 0) -> np.ndarray:
    """Sorted pool indices of at most ``cap`` images with a prediction (drawn from ``seed``, the run's)."""
    return sorted_sample(np.nonzero(np.asarray(pred) >= 0)[0], cap, np.random.default_rng(seed))


def positive_sample(unrelated: np.ndarray, cap: int = POSITIVES, seed: int = 0) -> np.ndarray:
    """Sorted pool indices of at most ``cap`` of a finding's unrelated members (drawn from ``seed``)."""
    return sorted_sample(np.unique(np.asarray(unrelated, np.int64)), cap, np.random.default_rng(seed))


def fit_probe(positives: np.ndarray, negatives: np.ndarray, centre: np.ndarray, spread: np.ndarray) -> np.ndarray | None:
    """Fisher direction (in thumbnail units) of thumbnails ``positives`` (P, D) against
    ``negatives`` (N, D), fitted on thumbnails standardised by ``centre`` and ``spread`` (the
    shared negatives' mean and standard deviation: the ridge is relative to the variances);
    None with fewer than 2 of either."""
    if len(positives) < 2 or len(negatives) < 2:
        return None
    z = (np.concatenate([positives, negatives]).astype(np.float64) - centre) / spread
    w, _ = linear_probe(z, np.arange(len(positives)), np.arange(len(positives), len(z)), ridge=RIDGE)
    return w / spread
