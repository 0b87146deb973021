"""Plant known shortcut patterns (Yang, Chou & Chaudhuri 2022; SpuCoMNIST-style colour).

Families: ``pixel``, ``patch3``, ``patch5``, ``noise`` (one fixed uniform-noise image
added at a strength and clipped), ``bar`` (vertical bar) and ``background`` (background
pixels recoloured).  Works for any image size and channel count; deterministic by seed;
returns the ground truth (which items carry the pattern, and where it sits).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .checks import real_number, whole_number

log = logging.getLogger("spurfast.plant")

FAMILIES = ("pixel", "patch3", "patch5", "noise", "bar", "background")
POSITIONS = ("bottom_right", "bottom_left", "top_right", "top_left", "center", "random")
_PATCH = {"pixel": 1, "patch3": 3, "patch5": 5}


@dataclass
class PatternSpec:
    """A shortcut pattern to stamp (`apply_pattern`): ``family`` one of `FAMILIES` (a pixel,
    3x3 or 5x5 patch, fixed noise, a vertical bar, a background colour), ``strength`` (the
    noise amplitude, or the painted value), ``position`` and ``margin`` (where a corner
    pattern sits), ``color`` (the background colour per channel), ``seed`` (the noise)."""
    family: str = "patch3"
    strength: float = 1.0            # noise amplitude; painted value for pixel/patch/bar
    position: str = "bottom_right"   # pixel/patch/bar placement
    margin: int = 1                  # pixels between a corner pattern and the border
    color: tuple[float, ...] | None = None  # background colour per channel
    seed: int = 0

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown pattern family {self.family!r}; expected one of {FAMILIES}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; expected one of {POSITIONS}")
        # a number, stored as one: "0.5" passed here and failed in the label and the stamping
        if isinstance(self.strength, (bool, np.bool_)) or not isinstance(self.strength, (int, float, np.number)) \
                or not 0.0 < float(self.strength) <= 1.0:
            raise ValueError(f"pattern strength must be a number in (0, 1], got {self.strength!r}")
        self.strength = float(self.strength)
        if self.family == "background" and self.strength != 1.0:   # taken, recorded in plant.json, unused
            raise ValueError(f"the background family paints its colour (color=...); strength does not apply to it: "
                             f"leave it at 1, got {self.strength:g}")
        # a negative margin slices an empty (top/left) or clipped (bottom/right) patch
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, np.integer)) or self.margin < 0:
            raise ValueError(f"pattern margin must be an integer >= 0, got {self.margin!r}")
        # taken and recorded in plant.json, as if the pattern sat there: --family noise --position
        # center planted the same whole-image noise as the default
        if self.family in ("noise", "background") and (self.position != "bottom_right" or self.margin != 1):
            raise ValueError(f"the {self.family} family covers the whole image; position and margin do not apply "
                             f"to it: leave them at bottom_right and 1, got {self.position!r} and {self.margin!r}")
        # "1" and -1 passed here and failed in numpy's generator, naming nothing; the noise's
        # generator takes seed + 7919, below 2**64
        seed = whole_number(self.seed, "pattern seed")
        if not 0 <= seed < 2 ** 64 - 7919:
            raise ValueError(f"pattern seed must be in [0, 2**64 - 7919), got {self.seed!r}")
        self.seed = seed
        if self.color is not None and self.family != "background":
            raise ValueError(f"color is the background family's colour; the {self.family} family does not use it")
        if self.color is not None:
            self.color = tuple(float(c) for c in self.color)
            if not all(0.0 <= c <= 1.0 for c in self.color):
                raise ValueError(f"background color components must be in [0, 1], got {self.color}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def label(self) -> str:
        """The family, with its strength where it is not 1 (always for noise) and its place
        where it is not the default: a patch painted at 0.5 at the centre read "patch3"."""
        text = f"{self.family}@{self.strength:g}" if self.family == "noise" or self.strength != 1.0 else self.family
        return text if self.position == "bottom_right" else f"{text} at {self.position.replace('_', ' ')}"


def _anchor(position: str, h: int, w: int, ph: int, pw: int, margin: int, rng: np.random.Generator):
    m = margin
    if position == "random":
        return int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    top = {"top": m, "bottom": h - ph - m, "center": (h - ph) // 2}
    left = {"left": m, "right": w - pw - m, "center": (w - pw) // 2}
    if position == "center":
        return top["center"], left["center"]
    v, hpos = position.split("_")
    return top[v], left[hpos]


def fixed_mask(spec: PatternSpec, shape, rng=None) -> torch.Tensor:
    """(H, W) bool mask of where the pattern is written (image-independent families)."""
    c, h, w = shape
    rng = rng or np.random.default_rng(spec.seed)
    mask = torch.zeros(h, w, dtype=torch.bool)
    if spec.family == "noise":
        mask[:] = True
        return mask
    if spec.family == "background":
        raise ValueError("the background family's mask depends on each image")
    if spec.family == "bar":
        ph, pw = max(3, h // 2), max(1, w // 14)
    else:
        ph = pw = _PATCH[spec.family]
    if ph + 2 * spec.margin > h or pw + 2 * spec.margin > w:
        raise ValueError(f"a {spec.family} pattern ({ph}x{pw}, margin {spec.margin}) does not fit a {h}x{w} image")
    t, l = _anchor(spec.position, h, w, ph, pw, spec.margin, rng)
    mask[t:t + ph, l:l + pw] = True
    return mask


def noise_image(spec: PatternSpec, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(spec.seed) + 7919)
    return torch.rand(tuple(shape), generator=g)


def apply_pattern(images: torch.Tensor, spec: PatternSpec, seed: int | None = None):
    """Stamp ``spec`` onto float images (N, C, H, W) in [0, 1].

    Returns (stamped copy, masks (N, H, W) bool of the pixels the pattern changed or owns).
    ``seed`` drives per-image randomness (random positions); default spec.seed.
    """
    if seed is not None:   # -1 and 1.5 failed in numpy's SeedSequence, naming no argument
        seed = whole_number(seed, "apply_pattern: seed")
        if seed < 0:
            raise ValueError(f"apply_pattern: seed must be >= 0, got {seed}")
    images = torch.as_tensor(images)   # a numpy array failed as "'numpy.ndarray' object has no attribute 'dim'"
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():  # the pattern's values are on the [0, 1] scale
        raise ValueError(f"images must be floats in [0, 1], got dtype {images.dtype}")
    lo, hi = torch.stack(torch.aminmax(images)).tolist() if images.numel() else (0.0, 1.0)   # one pass, one sync
    if not 0.0 <= lo <= hi <= 1.0:   # 0-255 floats took a stamp of 1.0 that nothing could see, marked as carried
        raise ValueError(f"images must be floats in [0, 1], got values in [{lo:g}, {hi:g}]")
    x = images.clone().float()
    n, c, h, w = x.shape
    rng = np.random.default_rng(spec.seed if seed is None else seed)
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    if n == 0:
        return x, masks
    if spec.family == "noise":
        x = (x + spec.strength * noise_image(spec, (c, h, w)).unsqueeze(0)).clamp_(0.0, 1.0)
        masks[:] = True
    elif spec.family == "background":
        # grey where the image is not RGB(+extra channels): two channels got RGB's three
        color = spec.color or ((0.9, 0.2, 0.2) + (0.5,) * (c - 3) if c >= 3 else (0.5,) * c)
        if len(color) != c:
            raise ValueError(f"background colour has {len(color)} channels, images have {c}")
        bg = x.amax(1) < 0.1
        col = torch.tensor(color).view(1, c, 1, 1).expand_as(x)
        x = torch.where(bg.unsqueeze(1), col, x)
        masks = bg
    else:
        if spec.position == "random":
            for i in range(n):
                m = fixed_mask(spec, (c, h, w), rng)
                x[i][:, m] = spec.strength
                masks[i] = m
        else:
            m = fixed_mask(spec, (c, h, w), rng)
            x[:, :, m] = spec.strength
            masks[:] = m
    return x, masks


@dataclass
class PlantTruth:
    spec: PatternSpec
    target_class: int
    train_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pool_carries: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    mask: np.ndarray | None = None  # (H, W) for fixed-position families

    def to_dict(self) -> dict:
        return {"pattern": self.spec.to_dict(), "target_class": int(self.target_class),
                "n_poisoned": int(len(self.train_indices)),
                # carriers over the whole pool, suspects included (it was named "pool_fraction",
                # the name of the share of *unrelated* images asked to be stamped)
                "pool_carrier_share": float(self.pool_carries.mean()) if len(self.pool_carries) else 0.0,
                "n_pool_carrying": int(self.pool_carries.sum())}


def changed_by_stamp(before: torch.Tensor, after: torch.Tensor, what: str) -> np.ndarray:
    """(N,) bool: the images a stamp changed.  A pixel, patch or bar overwrites pixels with
    its value, and an image that already held it there (a saturated pixel of the object, 17
    of Fashion-MNIST's 10,000 test images for the corner pixel) carries nothing new; counted
    as a carrier, it was ground truth that no method could find."""
    changed = (before != after).flatten(1).any(1).cpu().numpy()
    if not changed.all():
        log.info("%d of %d %s already held the pattern's values where it goes: not counted as carrying it",
                 int((~changed).sum()), len(changed), what)
    return changed


def on_levels(x: torch.Tensor, levels: int | None) -> torch.Tensor:
    """``x`` rounded to the nearest of ``levels`` + 1 values in [0, 1] (255: what a uint8 file
    holds), or as it is for None."""
    return x if levels is None else x.mul(levels).round_().div_(levels)


def stamp_at(images: torch.Tensor, chosen: np.ndarray, spec: PatternSpec, seed: int, what: str,
             levels: int | None = None) -> np.ndarray:
    """Stamp ``images[chosen]`` in place with ``spec``; returns which of them the stamp
    changed (`changed_by_stamp`; ``what`` names them in its log line).  ``levels``: the
    stamped images are rounded to them first (`on_levels`), so that the answer is about the
    pixels as a file of that depth holds them."""
    pick = torch.as_tensor(chosen)
    before = images[pick]
    images[pick] = stamped = on_levels(apply_pattern(before, spec, seed=seed)[0], levels)
    return changed_by_stamp(before, stamped, what)


def _as_images(images) -> torch.Tensor:
    """A new tensor of ``images`` (the caller stamps it); floating ones (a numpy array too) as
    the float32 tensor `apply_pattern` returns:
    written back into a float64 or float16 tensor, its result raised "Index put requires the
    source and destination dtypes match", and a numpy array had no clone.  Others are left
    for `apply_pattern` to refuse by name."""
    images = torch.as_tensor(images)
    # a copy either way, made once (float() then clone() copied float64 images twice)
    return images.to(torch.float32, copy=True) if images.is_floating_point() else images.clone()


def _seed(seed, who: str) -> int:
    seed = whole_number(seed, f"{who}: seed")
    if seed < 0:   # numpy refused it naming no argument
        raise ValueError(f"{who}: seed must be >= 0, got {seed}")
    return seed


def plant_training(images: torch.Tensor, labels, target_class: int, n: int | str,
                   spec: PatternSpec, seed: int = 0, levels: int | None = None):
    """Stamp ``n`` (or "all") training images of ``target_class``.  Labels are unchanged.
    Returns (images, planted indices: those the stamp changed, `changed_by_stamp`);
    ``levels``: as `stamp_at`'s."""
    seed = _seed(seed, "plant_training")
    if n != "all":   # int() stamped 2 of n=2.7, and 1 of n=True
        n = whole_number(n, 'plant_training: n (or "all")')
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images):   # a short list would stamp only its part
        raise ValueError(f"plant_training: labels must be one per image ({len(images)}), "
                         f"got shape {labels.shape}")
    cand = np.nonzero(labels == target_class)[0]
    if len(cand) == 0:
        raise ValueError(f"no training images of target class {target_class}")
    n = len(cand) if n == "all" else n
    if not 0 <= n <= len(cand):
        raise ValueError(f"cannot poison n={n} images: class {target_class} has {len(cand)}")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(cand, size=n, replace=False))
    out = _as_images(images)
    return out, chosen[stamp_at(out, chosen, spec, seed, "poisoned training images", levels)]


def checked_pool_fraction(fraction) -> float:
    """``fraction`` as a float in [0, 1], else a ValueError naming it."""
    fraction = real_number(fraction, "pool fraction")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"pool fraction must be in [0, 1], got {fraction}")
    return fraction


def plant_pool(images: torch.Tensor, fraction: float, spec: PatternSpec, seed: int = 0,
               levels: int | None = None):
    """Stamp a ``fraction`` of the pool.  Returns (images, carries bool (N,): the images the
    stamp changed, `changed_by_stamp`); ``levels``: as `stamp_at`'s."""
    seed = _seed(seed, "plant_pool")   # -1 drew as seed 0 (its generator takes seed + 1)
    fraction = checked_pool_fraction(fraction)
    n = len(images)
    rng = np.random.default_rng(seed + 1)
    chosen = np.sort(rng.choice(n, size=int(round(fraction * n)), replace=False))
    carries = np.zeros(n, dtype=bool)
    out = _as_images(images)
    if len(chosen):
        carries[chosen] = stamp_at(out, chosen, spec, seed + 1, "stamped pool images", levels)
    return out, carries
