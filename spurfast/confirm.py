"""Confirmation: does a finding's extracted pattern move the classifier?

For a finding of class c with pattern mask M (H, W) and content-matched contrast D
(C, H, W) (see `spurfast.characterise`), every clean image x of another class gets the
pattern added inside the mask,

    x' = clip(x + M * D, 0, 1)            (mode "add", the default), or
    x' = x * (1 - M) + M * P              (mode "paste": P = the members' mean image),

and *flips* when p(c | x') - p(c | x) > 0.1 (the rise the design fixes).  The control
gives each clean image its own random pattern of the same area and intensity: the same
number of pixels, scattered uniformly at random over the image, carrying a random
permutation of the pattern's own in-mask values.  Real and control flips are paired on
the same images, so the p-value is McNemar's exact one-sided test: among images where
exactly one of the two flips, is the real pattern the one that flips more often than a
fair coin says?  The pair is also compared at half and a quarter of the strength (pattern
and control scaled alike, `DOSES`), and the smallest of the three p-values, times three,
is the result (``p_value``; ``dose`` says which strength gave it, ``dose_flip_rate`` and
``dose_control_flip_rate`` its rates): a pattern far stronger than the model needs flips
every image, and so does every random pattern of its area, a tie at full strength that a
weaker dose undoes.  No thresholds are tuned beyond the design's 0.1.  Two limits, measured:
- The test holds the pattern fixed: it asks whether this pattern moves the model more than
  random patterns do on average, not whether it is rare among them.  Where random patterns'
  flip rates differ much from one to the next (a linear model of random pixel weights on
  8 x 8 images, 200 clean images), a pattern drawn like a control beats them in about a
  third of simulated runs.
- Added values are clipped to [0, 1], and scattered pixels land on bright objects where a
  corner pattern lands on background: the control carries less intensity than the pattern
  (25% less for a bright 3 x 3 patch on 16 x 16 images with a bright object), and a model
  that reads total brightness alone is confirmed.  A control kept to the positions where
  its values fit was measured on the full preset and dropped: it gathered on the pattern's
  own region (the background colour) or on mid-tones (noise of strength 1), flipped as
  often as the pattern there, and cost 9 of 10 confirmed background findings and 9 of 12
  noise ones (docs/results/full/RESULTS.md, thirtieth session).

A second, *content* control asks whether genuine class-c content in the same place moves
the model as much: each clean image gets the difference between a class-c image and the
clean images' mean, inside the mask (not rescaled: rescaling would amplify mere noise where
class-c images do not differ from the rest).  The class-c images are drawn from the quarter
of them that carry most of the pattern (largest projection onto it inside the mask): a
natural confusion is often one mode of the class (shirts with a T-shirt's outline), which
random class images dilute, and which the class's own nearest images reproduce; a shortcut
(a corner patch) is carried by no genuine class image, however they are chosen.  Its flip
rate and McNemar p-value are reported as ``content_flip_rate`` and ``content_p_value``
(additive keys of the ``confirm`` object; with no image of class c to draw from, the
control is skipped, ``content_skipped`` says why, and the verdict rests on the random
control alone); a finding is *confirmed* when it beats both controls, and its Benjamini-Hochberg
``q_value`` over the run's findings of its search (`spurfast.families`; from the larger of its
two p-values: it must beat both) is within the level too: a run with 40 findings
would otherwise confirm about two natural confusions by chance.  The ``verdict`` key says
which control it failed (`confirm_verdict`): a finding that beats genuine class content
but not random patterns is ``not_specific``: a model that reacts to any comparable
corruption there.  (The noise@1.0 model trained on the whole class looked so at full strength,
where its pattern, random noise and smooth random fields all flip about 100% of clean images;
at half strength its pattern flips 0.71 against random patterns' 0.21.)  For a ``not_specific``
finding (additive mode) that smooth control runs too (`smooth_controls`;
``smooth_flip_rate`` / ``smooth_p_value``; `reacts_to_texture`): a model that reacts to a
texture (noise) is not moved by smooth fields, one that reacts to any change is.

Clean images: a held-out set the caller supplies (``spurfast discover --clean``), or
else pool images predicted as another class that belong to no finding and are not suspect
samples.  Images whose label (or, unlabelled, prediction) is the finding's class are never
used.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import binom
from tqdm.auto import tqdm

from .checks import (CLASSIFIER_HINT, SOURCE_HINT, check_arguments, check_compute_device, check_default_dtype,
                     real_number, suspect_mask, whole_number)
from .confirm_work import KeptConfirmations
from .cores import usable_cores
from .data.sources import ImageSource
from .families import FEATURE_VIEW, RESIDUAL, finding_family
from .in_order import run_in_order
from .made_ahead import made_ahead
from .models.as_given import restores_models
from .models.outputs import model_logits
from .scoring import bh_qvalues
from .support import require_patterns

log = logging.getLogger("spurfast.confirm")

RISE = 0.1  # the design's "p(class) rises by more than 0.1"
# the strengths the pattern and its random control are compared at (module docstring); the
# smallest p-value counts, times len(DOSES) (Bonferroni: valid whatever the data)
DOSES = (1.0, 0.5, 0.25)
AHEAD = 2   # random-control batches made ahead of the model (`made_ahead`)
AT_ONCE_BYTES = 1 << 31   # clean, class and control images that findings confirmed at once may hold


@dataclass
class ConfirmConfig:
    """Settings of `confirm_findings`: up to ``max_images`` clean images per finding, the
    pattern added (``mode`` "add": mask x contrast) or pasted ("paste": mask x the members'
    mean image), ``batch_size`` images per classifier call, ``seed`` for the controls' random
    patterns and the images drawn, ``device`` where the classifier runs, and
    ``content_match``, the share of the class's images most like the pattern from which the
    class-content control draws (see the module docstring), and ``at_once``, how many findings
    are confirmed at once (0: `findings_at_once` chooses; the results are the same)."""
    max_images: int = 500       # clean images per finding
    mode: str = "add"           # "add" (mask x contrast) or "paste" (mask x members' mean)
    batch_size: int = 256
    seed: int = 0
    device: str = "cpu"
    content_match: float = 0.25  # content control draws from this fraction of class images most like the pattern
    at_once: int = 0            # findings confirmed at once, on threads; 0: automatic

    def __post_init__(self):
        # whole numbers, as DiscoverConfig takes them (numpy's too, stored as Python ints): a
        # fractional one (or a bool) passed here and failed only when confirmation ran, after the
        # embedding pass and discovery, naming no setting ("'float' object cannot be interpreted as
        # an integer", numpy's "SeedSequence expects int")
        for name in ("max_images", "batch_size", "seed", "at_once"):
            setattr(self, name, whole_number(getattr(self, name), f"confirm {name}"))
        if self.max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {self.max_images}")
        if self.batch_size < 1:   # range(0, n, 0) would fail with no word of the setting
            raise ValueError(f"confirm batch_size must be >= 1, got {self.batch_size}")
        if self.seed < 0:   # numpy's "expected non-negative integer", at the first finding
            raise ValueError(f"confirm seed must be >= 0, got {self.seed}")
        if self.at_once < 0:
            raise ValueError(f"confirm at_once must be >= 0 (0: automatic), got {self.at_once}")
        # "0.5" failed the range check below with a bare TypeError; True passed as 1.0
        self.content_match = real_number(self.content_match, "content_match")
        if not 0.0 < self.content_match <= 1.0:
            raise ValueError(f"content_match must be in (0, 1], got {self.content_match}")
        if self.mode not in ("add", "paste"):
            raise ValueError(f"confirm mode must be 'add' or 'paste', got {self.mode!r}")


def pattern_delta(mask: np.ndarray, contrast: torch.Tensor, pattern: torch.Tensor | None, mode: str):
    """(values (C, H, W), mask (H, W) bool) to apply; see the module docstring."""
    m = torch.as_tensor(np.asarray(mask, bool))
    if mode == "add":
        vals = torch.as_tensor(contrast, dtype=torch.float32)
    else:
        if pattern is None:
            raise ValueError("mode 'paste' needs the members' mean image")
        vals = torch.as_tensor(pattern, dtype=torch.float32)
    what = "contrast" if mode == "add" else "pattern"
    if vals.dim() != 3:   # a grayscale (H, W) one read "(16, 16) does not match mask (16, 16)"
        raise ValueError(f"{what} of shape {tuple(vals.shape)} has {vals.dim()} dimensions; expected (C, H, W) "
                         f"(a grayscale one as (1, H, W))")
    if tuple(vals.shape[1:]) != tuple(m.shape):
        raise ValueError(f"{what} of shape {tuple(vals.shape)} does not match mask {tuple(m.shape)}: expected (C, "
                         f"{', '.join(map(str, m.shape))})")
    return vals, m


def apply_delta(x: torch.Tensor, vals: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Apply one pattern (vals (C,H,W), mask (H,W) or per-image (N,H,W)) to images x (N,C,H,W)."""
    m = mask.to(x.dtype)
    m = m.unsqueeze(0).unsqueeze(0) if m.dim() == 2 else m.unsqueeze(1)
    v = vals.unsqueeze(0) if vals.dim() == 3 else vals
    if mode == "add":
        return (x + m * v).clamp(0.0, 1.0)
    return x * (1 - m) + m * v.clamp(0.0, 1.0)


def random_controls(vals: torch.Tensor, mask: torch.Tensor, n: int, rng: np.random.Generator):
    """n random patterns: ``mask.sum()`` uniformly scattered pixels, each carrying a
    random permutation of the pattern's in-mask values.  Returns (vals (n,C,H,W), masks (n,H,W))."""
    c, h, w = vals.shape
    inside = vals[:, mask]                                   # (C, area)
    pos, perm = _control_draws(h * w, int(mask.sum()), n, rng)
    area = pos.shape[1]
    # one scatter into (n, C * H * W) in the returned layout (through (n, H * W, C) and a
    # transposing copy it took 16 of 29 ms for 256 RGB 64x64 images of 2,000 pixels)
    where = (pos.unsqueeze(1) + torch.arange(c).view(1, c, 1) * (h * w)).view(n, c * area)
    picked = inside.to(torch.float32)[:, perm].transpose(0, 1).reshape(n, c * area)   # (n, C, area) flat
    out_v = torch.zeros(n, c * h * w).scatter_(1, where, picked)
    out_m = torch.zeros(n, h * w, dtype=torch.bool).scatter_(1, pos, True)
    return out_v.view(n, c, h, w), out_m.view(n, h, w)


def _control_draws(pixels: int, area: int, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos, perm), each (n, area) int64: per image, ``area`` distinct pixels of ``pixels`` and
    a permutation of the pattern's values, drawn one image at a time in the rng order they
    always had; the callers scatter them in one go (a torch indexing pair per image took a
    third of the confirmation's time outside the model)."""
    pos = np.empty((n, area), np.int64)
    perm = np.empty((n, area), np.int64)
    for i in range(n):
        pos[i] = rng.choice(pixels, area, replace=False)
        perm[i] = rng.permutation(area)
    return torch.from_numpy(pos), torch.from_numpy(perm)


def random_controls_added(x: torch.Tensor, vals: torch.Tensor, mask: torch.Tensor, rng: np.random.Generator,
                          strength: float = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """``apply_delta(x, cv, cm * strength, "add")`` of ``cv, cm = random_controls(vals, mask,
    len(x), rng)``, bit for bit, built in one copy of ``x`` (float32; into ``out`` where given):
    each drawn value times ``strength`` added at its drawn pixel, then clipped.  The full-size
    control, its mask and three more image-sized tensors of `apply_delta` were ~75 MB of
    short-lived memory per 256 RGB 64x64 images."""
    n, (c, h, w) = len(x), vals.shape
    inside = vals[:, mask].to(torch.float32)                 # (C, area)
    pos, perm = _control_draws(h * w, int(mask.sum()), n, rng)
    out = x.to(torch.float32, copy=True) if out is None else out.copy_(x)   # ``out``: float32, x's shape
    flat = out.view(n, c, h * w)
    for ch in range(c):   # x + 1.0 * v or x + strength * v, as apply_delta's m * v gives them
        picked = inside[ch][perm]
        flat[:, ch].scatter_add_(1, pos, picked if strength == 1.0 else picked * strength)
    return out.clamp_(0.0, 1.0)


def _prob(model, x: torch.Tensor, cls: int, device: str, batch_size: int) -> np.ndarray:
    """p(``cls``) of images ``x`` (N,)."""
    return _softmax(model, x, device, batch_size, cls)


@torch.no_grad()
def _softmax(model, x: torch.Tensor, device: str, batch_size: int, cls: int | None = None) -> np.ndarray:
    """The class probabilities of images ``x`` (N, classes), or p(``cls``) alone (N,)."""
    out = []
    for s in range(0, len(x), batch_size):
        p = torch.softmax(model_logits(model, x[s:s + batch_size].to(device)).float(), 1)
        out.append((p if cls is None else p[:, cls]).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0,) if cls is not None else (0, 0), np.float32)


VERDICTS = {
    "confirmed": "the pattern moves the model more than both controls: a confirmed shortcut",
    "weak": "the pattern beats both controls, but not once the number of the run's findings of its search "
            "is accounted for (Benjamini-Hochberg over their confirmations)",
    "not_specific": "random patterns of the same area and intensity move the model about as often: it reacts "
                    "to any perturbation of this size here (e.g. a noise texture), which this test cannot tell "
                    "from the pattern",
    "class_content": "genuine class content in the same place moves the model as much: natural class "
                     "content, not a shortcut",
    # "no more than" contradicted the rates beside it where the pattern flips more, but not
    # significantly (4 of 4 clean images vs none: p = 0.0625)
    "no_effect": "the pattern does not move the model significantly more than random patterns or genuine class "
                 "content",
}


def _more_flips(cf: dict) -> tuple[bool, bool]:
    """(more flips than the random control, more than the content control or it was not run).
    Against the random control: at the dose its p-value comes from (`DOSES`; results without
    one are at full strength), and at least as many at full strength (a weakened copy is there
    to get both off the ceiling, not to overturn a full pattern that random ones beat)."""
    real, ctrl = cf.get("dose_flip_rate", cf["flip_rate"]), cf.get("dose_control_flip_rate", cf["control_flip_rate"])
    return (real > ctrl and cf["flip_rate"] >= cf["control_flip_rate"],
            cf.get("content_p_value") is None or cf["flip_rate"] > cf["content_flip_rate"])


def _beats(cf: dict, level: float) -> tuple[bool, bool]:
    """(beats the random control, beats the content control or it was not run): more
    flips, significantly (McNemar p <= level)."""
    more_random, more_content = _more_flips(cf)
    return (more_random and cf["p_value"] <= level,
            more_content and (cf.get("content_p_value") is None or cf["content_p_value"] <= level))


def joint_p_value(cf: dict | None) -> float:
    """One p-value for "beats both controls" (an intersection-union test: the larger of
    the two McNemar p-values), 1 where the flip rate does not exceed both controls' or
    confirmation did not run."""
    if not cf or cf.get("flip_rate") is None:
        return 1.0
    return max(cf["p_value"], cf.get("content_p_value") or 0.0) if all(_more_flips(cf)) else 1.0


def reacts_to_texture(cf: dict, level: float = 0.05) -> bool | None:
    """For a ``not_specific`` finding whose smooth control ran: does the pattern flip
    significantly more images than smooth random fields of the same place and size (the
    model reacts to a texture, e.g. noise), or not (it reacts to any change there)?
    None where the smooth control did not run."""
    if cf.get("smooth_flip_rate") is None:
        return None
    return cf["smooth_p_value"] <= level and cf["flip_rate"] > cf["smooth_flip_rate"]


def confirm_verdict(cf: dict | None, level: float = 0.05) -> str | None:
    """Why a finding is or is not confirmed: a key of `VERDICTS`, or None when confirmation
    did not run.  "Beats" a control = significantly more flips (McNemar p <= level) and a
    higher flip rate; the content control counts only where it was run.  Where the run
    adjusted its confirmations for multiplicity (``q_value``, `confirm_findings`), beating
    both also needs q_value <= level."""
    if not cf or cf.get("flip_rate") is None:
        return None
    random_ok, content_ok = _beats(cf, level)
    if random_ok and content_ok:
        return "confirmed" if cf.get("q_value") is None or cf["q_value"] <= level else "weak"
    if random_ok:
        return "class_content"
    # "random patterns move it as often" needs both to move it: 0 vs 0 is no effect (and
    # without a content control, content_ok alone says nothing)
    moved = cf["flip_rate"] > 0 and cf["control_flip_rate"] > 0
    return "not_specific" if content_ok and moved else "no_effect"


def is_confirmed(cf: dict | None, level: float = 0.05) -> bool:
    """A finding is confirmed when its pattern flips significantly (p <= level) more clean
    images than the random control and, where it was run, the content control, and (where
    the run computed it) its Benjamini-Hochberg q-value over the run's confirmations is
    <= level too."""
    return confirm_verdict(cf, level) == "confirmed"


def finding_label(f: dict) -> str:
    """A finding named by what findings.json keeps for it (class, cluster, size), not by its
    rank: `spurfast.pipeline.rank_confirmed_first` renumbers the findings after confirmation,
    and a log line's "finding 1 (class 7)" was finding 2 of the report."""
    family = finding_family(f)
    where = "residual scan" if family == RESIDUAL else f"cluster {f.get('cluster')}" + (
        " of the feature view" if family == FEATURE_VIEW else "")
    return f"finding of class {int(f['class'])} ({where}, {f.get('size')} images)"


def mcnemar_one_sided(real: np.ndarray, control: np.ndarray) -> float:
    """Exact one-sided McNemar p-value that ``real`` flips more often than ``control``
    (paired boolean arrays)."""
    real, control = np.asarray(real, bool), np.asarray(control, bool)
    b = int((real & ~control).sum())
    c = int((~real & control).sum())
    if b + c == 0:
        return 1.0
    # an exact p is never 0: beyond ~1,074 discordant pairs all one way the tail underflows
    return max(float(binom.sf(b - 1, b + c, 0.5)), math.ulp(0.0))


def most_like_pattern(class_images: torch.Tensor, base_mean: torch.Tensor, direction: torch.Tensor,
                      mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """The ``fraction`` of ``class_images`` (at least one) that carry most of the pattern:
    largest projection of (image - base_mean) onto ``direction`` inside ``mask``."""
    if fraction >= 1.0:
        return class_images
    m = mask.to(class_images.dtype)
    d = ((class_images - base_mean.unsqueeze(0)) * m).flatten(1)
    proj = d @ (direction * m).flatten()
    keep = max(1, int(round(fraction * len(class_images))))
    return class_images[torch.topk(proj, keep).indices]


def content_controls(mask: torch.Tensor, class_images: torch.Tensor, base_mean: torch.Tensor,
                     n: int, rng: np.random.Generator) -> torch.Tensor:
    """n additive deltas: (a random class image - base_mean) inside ``mask``.  Returns (n, C, H, W)."""
    pick = torch.as_tensor(rng.integers(0, len(class_images), n))
    return (class_images[pick] - base_mean.unsqueeze(0)) * mask.to(class_images.dtype)


@torch.no_grad()   # on a thread of `run_in_order` too, where the caller's no_grad does not reach
def confirm_pattern(model, images: torch.Tensor, cls: int, mask: np.ndarray, contrast, pattern=None,
                    config: ConfirmConfig | None = None, class_images: torch.Tensor | None = None,
                    p0: np.ndarray | None = None) -> dict:
    """Flip rate of one pattern on ``images`` (clean, other classes) against the random
    control, and against the content control when ``class_images`` (images of ``cls``) are given.
    ``p0``: the model's p(cls) for ``images`` where the caller has them (`CleanProbs`), else
    they are computed."""
    config = config or ConfirmConfig()
    if images.dim() != 4:
        raise ValueError(f"clean images must be (N, C, H, W), got {tuple(images.shape)}")
    # float32, as the loaders give them: float64 ones (torch.from_numpy's) or float16 failed in
    # the model with a dtype mismatch that named neither
    images = images.float()
    vals, m = pattern_delta(mask, contrast, pattern, config.mode)
    if tuple(images.shape[1:]) != tuple(vals.shape):
        raise ValueError(f"clean images of shape {tuple(images.shape[1:])} do not match the pattern {tuple(vals.shape)}")
    n = len(images)
    if n == 0 or int(m.sum()) == 0:
        why = "no clean images of other classes" if n == 0 else "empty pattern mask"
        log.warning("confirmation of class %d skipped: %s", cls, why)
        return {"flip_rate": None, "control_flip_rate": None, "p_value": None, "n_images": int(n),
                "mask_area": int(m.sum()), "skipped": why}
    rng = np.random.default_rng(config.seed)
    model.eval()
    if p0 is None:
        p0 = _prob(model, images, cls, config.device, config.batch_size)
    elif np.shape(p0) != (n,):
        raise ValueError(f"p0 of shape {np.shape(p0)} for {n} clean images")
    p1 = _prob(model, apply_delta(images, vals, m, config.mode), cls, config.device, config.batch_size)
    finite = np.isfinite(p0) & np.isfinite(p1)
    if not finite.all():
        # NaN > RISE is False: each such image counted as one the pattern did not move, and a
        # model that gives NaN for 90% of the clean set read as "no effect", without a word
        log.warning("confirmation of class %d leaves out %d of %d clean images: the classifier gives NaN/inf "
                    "outputs for them (with or without the pattern)", cls, int((~finite).sum()), n)
        keep = torch.as_tensor(finite)
        images, p0, p1, n = images[keep], p0[finite], p1[finite], int(finite.sum())
        if n == 0:
            why = "the classifier gives NaN/inf outputs for every clean image"
            return {"flip_rate": None, "control_flip_rate": None, "p_value": None, "n_images": 0,
                    "mask_area": int(m.sum()), "skipped": why}
    real = p1 - p0 > RISE
    unsure = [0]   # control images the classifier gave NaN/inf for

    def flips(perturb) -> np.ndarray:
        """Which images a control lifts by more than RISE; ``perturb(batch)`` draws a fresh
        control per image (batch by batch, so the draws follow one rng order).  A control the
        classifier gives NaN/inf for counts as lifted: counted as not (NaN > RISE is False),
        every such pair went to the pattern, and a model that any bright pixel flips, and
        that saturated controls sent to NaN, confirmed a pattern of no specificity at p 3e-90."""
        out = np.zeros(n, bool)
        for s in range(0, n, config.batch_size):
            xb = images[s:s + config.batch_size]
            rise = _prob(model, perturb(xb), cls, config.device, config.batch_size) - p0[s:s + len(xb)]
            out[s:s + len(xb)] = ~(rise <= RISE)
            unsure[0] += int(np.count_nonzero(~np.isfinite(rise)))
        return out

    dose_rng = np.random.default_rng([config.seed, 1])   # its own draws: the later controls keep theirs

    # the "add" controls go into a ring of buffers allocated here, not on the thread (whose
    # allocator arena kept what it allocated).  A buffer is filled again AHEAD + 2 items later:
    # by then the passes below have classified it (at most AHEAD wait made, one is being made,
    # one is in the model)
    ring = [torch.empty((min(n, config.batch_size),) + tuple(images.shape[1:])) for _ in range(AHEAD + 2)] \
        if config.mode == "add" else []

    def random_batches():
        """The random controls of every batch at full strength (``rng``), then at each
        weaker dose (``dose_rng``): the order the passes below take them in."""
        made = 0
        for a in DOSES:
            for s in range(0, n, config.batch_size):
                xb, draws = images[s:s + config.batch_size], rng if a == DOSES[0] else dose_rng
                if config.mode == "add":
                    made += 1
                    yield random_controls_added(xb, vals, m, draws, a, out=ring[made % len(ring)][:len(xb)])
                else:
                    cv, cm = random_controls(vals, m, len(xb), draws)
                    yield apply_delta(xb, cv, cm if a == DOSES[0] else cm.float() * a, config.mode)

    # made on a thread while the model classifies the batches before them (`made_ahead`); the
    # content and smooth controls draw from ``rng`` after the full-strength ones, once it is closed
    controls = made_ahead(random_batches(), depth=AHEAD)
    try:
        ctrl = flips(lambda xb: next(controls))
        best = (mcnemar_one_sided(real, ctrl), DOSES[0], real, ctrl)
        for a in DOSES[1:]:
            weak = _prob(model, apply_delta(images, vals, m.float() * a, config.mode), cls, config.device,
                         config.batch_size) - p0 > RISE
            weak_ctrl = flips(lambda xb: next(controls))
            p = mcnemar_one_sided(weak, weak_ctrl)
            if p < best[0]:
                best = (p, a, weak, weak_ctrl)
    finally:
        controls.close()
    out = {"flip_rate": float(real.mean()), "control_flip_rate": float(ctrl.mean()),
           "p_value": min(1.0, len(DOSES) * best[0]), "dose": best[1], "dose_flip_rate": float(best[2].mean()),
           "dose_control_flip_rate": float(best[3].mean()), "n_images": int(n), "mask_area": int(m.sum()),
           "mean_rise": float((p1 - p0).mean())}
    if class_images is not None and len(class_images):
        if tuple(class_images.shape[1:]) != tuple(vals.shape):
            raise ValueError(f"class images of shape {tuple(class_images.shape[1:])} do not match the pattern")
        # float64 ones (torch.from_numpy's) failed in the model, after the other two passes
        class_images = class_images.to(images.dtype)
        base = images.mean(0)
        direction = vals if config.mode == "add" else vals - base
        class_images = most_like_pattern(class_images, base, direction, m, config.content_match)
        cont = flips(lambda xb: (xb + content_controls(m, class_images, base, len(xb), rng)).clamp(0.0, 1.0))
        out["content_flip_rate"] = float(cont.mean())
        out["content_p_value"] = mcnemar_one_sided(real, cont)
    if confirm_verdict(out) == "not_specific" and config.mode == "add":
        # random patterns move the model as much: do smooth ones (no texture) too?
        sm = flips(lambda xb: (xb + smooth_controls(vals, m, len(xb), rng)).clamp(0.0, 1.0))
        out["smooth_flip_rate"] = float(sm.mean())
        out["smooth_p_value"] = mcnemar_one_sided(real, sm)
    if unsure[0]:
        log.warning("confirmation of class %d: the classifier gives NaN/inf outputs for %d control images; each "
                    "counts as one the control moved (the cautious reading)", cls, unsure[0])
    return out


def smooth_controls(vals: torch.Tensor, mask: torch.Tensor, n: int, rng: np.random.Generator) -> torch.Tensor:
    """n smooth random patterns in ``mask``: white noise blurred by a Gaussian of sigma =
    1/14 of the image side (2 px at 28 px), then given the pattern's in-mask mean and
    spread per channel.  Same place and size as the pattern, no texture: if these move the
    model as often as the pattern, it reacts to any corruption there, not to a texture.
    Returns (n, C, H, W), zero outside the mask."""
    c, h, w = vals.shape
    sigma = max(1.0, min(h, w) / 14)
    r = int(3 * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    g = torch.as_tensor(rng.standard_normal((n * c, 1, h, w)), dtype=torch.float32)
    g = F.conv2d(F.pad(g, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    g = F.conv2d(F.pad(g, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1)).view(n, c, h, w)
    inside = g[:, :, mask]                                                      # (n, C, area)
    z = (inside - inside.mean(-1, keepdim=True)) / inside.std(-1, keepdim=True, unbiased=False).clamp_min(1e-8)
    target = vals[:, mask]                                                      # (C, area)
    out = torch.zeros(n, c, h, w)
    out[:, :, mask] = z * target.std(-1, keepdim=True, unbiased=False) + target.mean(-1, keepdim=True)
    return out


def _known_readable(source: ImageSource, idx: np.ndarray) -> np.ndarray:
    """``idx`` less the images ``source`` has found unreadable so far (its ``bad_files``)."""
    bad = getattr(source, "bad_files", None) or {}
    return idx[~np.isin(idx, np.fromiter(bad, np.int64, len(bad)))] if bad else idx


def load_readable(source: ImageSource, idx: np.ndarray) -> torch.Tensor:
    """Images ``idx`` of ``source``, less those that loading finds unreadable: the source
    gives them a zero (black) image and records them in ``bad_files`` as it loads, and a
    black image is neither a clean image nor class content."""
    return _load_readable(source, idx)[0]


def _load_readable(source: ImageSource, idx: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """(`load_readable`'s images, their indices)."""
    idx = np.asarray(idx, dtype=np.int64)
    x = source.get_batch(idx)[0].float()
    keep = np.isin(idx, _known_readable(source, idx))
    if not keep.all():
        log.warning("confirmation leaves out %d unreadable image(s) of %s", int((~keep).sum()), source.name)
        x, idx = x[torch.as_tensor(keep)], idx[keep]
    return x, idx


def _other_class(labels: np.ndarray, pred: np.ndarray | None, cls: int, candidates: np.ndarray) -> np.ndarray:
    """``candidates`` whose content is not ``cls`` (label where known, else prediction)."""
    lab = labels[candidates]
    return candidates[np.where(lab >= 0, lab != cls, True if pred is None else pred[candidates] != cls)]


def clean_indices_for(source: ImageSource, labels: np.ndarray, pred: np.ndarray | None, cls: int,
                      candidates: np.ndarray, max_images: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``max_images`` of ``candidates`` (sorted) whose content is not ``cls`` (label where
    known, else prediction).  The draw does not look at which files ``source`` has found
    unreadable so far: that grows as images load, and a resumed run, which loads none for the
    findings it kept, drew other images for the next finding than the run it resumes
    (`_clean_images` replaces an unreadable one)."""
    return _draw(_other_class(labels, pred, cls, np.asarray(candidates, dtype=np.int64)), max_images, rng)


def _draw(idx: np.ndarray, max_images: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``max_images`` of ``idx``, sorted: all of them where there are no more."""
    return np.sort(rng.choice(idx, max_images, replace=False)) if len(idx) > max_images else idx


def clean_images_for(source: ImageSource, labels: np.ndarray, pred: np.ndarray | None, cls: int,
                     candidates: np.ndarray, max_images: int, rng: np.random.Generator) -> torch.Tensor:
    """The readable images of `clean_indices_for`'s draw, an unreadable one replaced."""
    candidates = np.asarray(candidates, dtype=np.int64)
    idx = clean_indices_for(source, labels, pred, cls, candidates, max_images, rng)
    return _clean_images(source, idx, _other_class(labels, pred, cls, candidates))[0]


def _clean_images(source: ImageSource, idx: np.ndarray, candidates: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """(images ``idx`` of ``source``, each unreadable one replaced by the next readable image of
    the other ``candidates`` in an order fixed by ``idx`` alone (so a rerun reads the same set
    whatever it has found unreadable before), their indices); for none, (0, C, H, W) in the
    shape of a readable one of ``candidates`` (or the source's)."""
    if len(idx) == 0:
        candidates = _known_readable(source, np.asarray(candidates, dtype=np.int64))
        x0, _ = source.get_batch([int(candidates[0])]) if len(candidates) else (None, None)
        shape = tuple(x0.shape[1:]) if x0 is not None else tuple(source.image_shape)
        return torch.zeros((0,) + shape), np.zeros(0, np.int64)
    x, got = _load_readable(source, idx)
    spare = np.setdiff1d(candidates, idx) if len(x) < len(idx) else ()
    if len(spare):
        order = np.random.default_rng(np.asarray(idx, dtype=np.uint64)).permutation(spare)
        pieces, kept, have, at = [x], [got], len(x), 0
        while have < len(idx) and at < len(order):
            take = np.sort(order[at:at + len(idx) - have])
            at += len(take)
            xt, gt = _load_readable(source, take)
            pieces.append(xt)
            kept.append(gt)
            have += len(xt)
        x, got = torch.cat(pieces), np.concatenate(kept)
    return x, got


class CleanProbs:
    """The model's class probabilities for the clean images, each image classified once a run:
    confirmation classified a finding's 500 clean images again for every finding (a clean set's
    draws overlap from one finding to the next), and a pool's clean images had been classified
    by the embedding pass already (an unlabelled clean set by the pass that predicts it).
    ``stored``: those probabilities (the store's ``probs``), used once the first images looked
    up get those values from ``model`` here (to 1e-6: the same model, the same images; a store
    of other images or models, or images its loader decoded otherwise, are classified again)."""
    TOLERANCE = 1e-6

    def __init__(self, model, config: ConfirmConfig, stored: np.ndarray | None = None):
        self.model, self.config, self.stored = model, config, stored
        self.seen: dict[int, np.ndarray] = {}
        self.use_stored: bool | None = None if stored is not None else False

    def p(self, images: torch.Tensor, idx: np.ndarray, cls: int) -> np.ndarray:
        """p(``cls``) for ``images`` (those of indices ``idx``)."""
        if self.use_stored:
            return np.asarray(self.stored[idx, cls], np.float32)
        todo = [j for j, i in enumerate(idx) if int(i) not in self.seen]
        if todo:
            self.model.eval()
            got = _softmax(self.model, images[torch.as_tensor(todo, dtype=torch.long)], self.config.device,
                           self.config.batch_size)
            self.seen.update(zip(idx[todo].tolist(), got))
            if self.use_stored is None:
                stored = np.asarray(self.stored[idx[todo]], np.float32)
                # another class count (another model's store) is another model: it raised numpy's
                # broadcast error, naming neither
                same = stored.shape == got.shape and bool(np.allclose(got, stored, rtol=0.0, atol=self.TOLERANCE,
                                                                      equal_nan=True))
                self.use_stored = same
                log.info("confirmation %s the stored class probabilities of the clean images (the model gives "
                         "them %s)", "uses" if same else "does not use",
                         "the same values" if same else "other values: another model or other images")
        return np.array([self.seen[int(i)][cls] for i in idx], np.float32)


def findings_at_once(config: ConfirmConfig, image_shape) -> int:
    """How many findings `confirm_findings` confirms at once: ``config.at_once`` where set;
    else one on a CPU, whose model forwards use every core already; on a GPU, where drawing and
    building the random controls on the host is most of the work, one per two host cores (a
    finding keeps a second thread making its controls), at most 8, and as many as fit
    `AT_ONCE_BYTES` with one more read ahead."""
    if config.at_once:
        return config.at_once
    if torch.device(config.device).type == "cpu":
        return 1
    # float32 images a finding holds: its clean and class images, a pass's perturbed copy and
    # clamp of the clean ones, the ring of controls (measured on a CPU: ~200 MB a finding at RGB 64x64)
    per_finding = 4 * int(np.prod(image_shape)) * (4 * config.max_images + (AHEAD + 2) * config.batch_size)
    return max(1, min(8, usable_cores() // 2, AT_ONCE_BYTES // per_finding - 1))


@restores_models("model")
@torch.no_grad()
def confirm_findings(findings: list[dict], model, *, clean: ImageSource | None = None,
                     pool: ImageSource | None = None, pool_pred: np.ndarray | None = None,
                     pool_probs: np.ndarray | None = None,
                     suspect: np.ndarray | None = None, config: ConfirmConfig | None = None,
                     num_workers: int = 0, loader_backend: str | None = None, work_dir=None,
                     progress: bool = False, content: str | None = None) -> list[dict]:
    """Fill ``confirm`` of every finding (needs ``_mask`` and ``_contrast`` from
    `spurfast.discover.characterise`).

    Clean images: ``clean`` when given (predicted with ``model`` to exclude the finding's
    class where labels are unknown); otherwise ``pool`` images predicted as another class
    that belong to no finding (``pool_pred`` = the store's predictions) and are not
    ``suspect`` samples (pool provenance mask): the suspect data is what may carry the
    shortcut, so neither the clean images nor the content control's class images may come
    from it (the class's poisoned suspects, most like the pattern by construction, would
    replay the shortcut as "class content").  For the same reason the pool's class images are
    its images *labelled* ``c``: an unlabelled one predicted ``c`` may be a carrier of the
    shortcut that no finding took in.  Images the source could not read (its
    ``bad_files``, which loading fills; pool images the store marked unreadable have
    prediction -1) are left out of both: a loader gives them a zero image; so are clean
    images the classifier gives NaN/inf outputs for (with a warning).  ``pool_probs``: the
    store's class probabilities of the pool, used for its clean images where the model gives
    them those values (`CleanProbs`), as are an unlabelled clean set's from the pass that
    predicts it; each clean image is classified once a run.  A finding that
    cannot be confirmed (an empty mask, no clean image of another class) keeps ``confirm``
    null (schema 1) and says why in ``confirm_skipped``.  An unlabelled clean folder is
    predicted through its loader (``loader_backend``, ``num_workers`` processes, decoded
    where ``config.device`` computes), as the pool's embedding pass reads it.  ``work_dir``:
    each finding's result is kept there as it finishes (`spurfast.confirm_work`), and a
    rerun with the same inputs reads it instead of computing it again (``content``: the
    confirmed source's `content_digest`, where the caller has made it).  ``progress``: a bar
    over the findings.  Several findings are confirmed at once where `findings_at_once` says
    so (their images read here, their passes on threads), with the results of one at a time."""
    check_default_dtype("confirm_findings")   # the steps one by one too: float64 gave other findings
    check_arguments("confirm_findings", ("model", model, torch.nn.Module, "a torch.nn.Module", CLASSIFIER_HINT),
                    ("clean", clean, (ImageSource, type(None)), "an ImageSource or None", SOURCE_HINT),
                    ("pool", pool, (ImageSource, type(None)), "an ImageSource or None", SOURCE_HINT),
                    ("config", config, (ConfirmConfig, type(None)), "a ConfirmConfig or None",
                     "spurfast.ConfirmConfig(...)"))
    # checked again: a field set after construction (config.seed = -1) skipped __post_init__
    config = replace(config) if config is not None else ConfirmConfig()
    check_compute_device(config.device, f"confirm_findings: config.device {config.device!r}")
    model.to(config.device)   # its batches go there (given back where it was, `restores_models`)
    require_patterns(findings)   # before an unlabelled clean set is classified (minutes at scale)
    if clean is not None:
        if len(clean) == 0:
            raise ValueError(f"clean set {clean.name} is empty")
        src, labels, cand = clean, clean.labels(), np.arange(len(clean))
        pred = stored = None
        if (labels < 0).any():
            pred, stored = _predicted(clean, model, config, num_workers, loader_backend)
    else:
        if pool is None or pool_pred is None:
            raise ValueError("confirmation needs a clean set, or the pool and its predictions")
        src, (labels, pred, cand, stored) = pool, _pool_candidates(findings, pool, pool_pred, pool_probs, suspect)
    # drawn from every candidate, as `clean_indices_for` says: one found unreadable is replaced
    # when read (`_clean_images`).  Left out here, those the source had found so far, the same
    # call drew other images on a source read before (a clean set confirmed twice in a process)
    kept = KeptConfirmations(work_dir, model, src, config, content) if work_dir is not None else None
    clean_probs = CleanProbs(model, config, stored=stored)
    drawn = _drawn_by_family(findings, cand, labels, pred, pool if clean is None else None, suspect, config)

    def tasks():
        """Per finding, (its kept result, False) or (its `confirm_pattern`, True) with its images
        read here, in this thread (a source need not be read from threads, nor `CleanProbs` used
        from them)."""
        for at, (f, c, idx, own, others) in enumerate(drawn):
            got = kept.lookup(f, idx, own) if kept is not None else None
            if got is not None:
                yield lambda got=got: (got, False)
                continue
            # whether the stored probabilities are used is decided on the first images classified:
            # a resumed run decided on its first computed finding's, and could read other values
            # than the run it resumes; the earlier findings' images decide, as they did there
            for _, pc, pidx, _, pothers in drawn[:at]:
                if clean_probs.use_stored is not None:
                    break
                clean_probs.p(*_clean_images(src, pidx, pothers), pc)
            x, x_idx = _clean_images(src, idx, others)
            xc = load_readable(src, own) if len(own) else None
            p0 = clean_probs.p(x, x_idx, c)
            yield lambda f=f, c=c, x=x, xc=xc, p0=p0: (confirm_pattern(
                model, x, c, f["_mask"], f["_contrast"], f.get("_pattern"), config, class_images=xc, p0=p0), True)

    at_once = findings_at_once(config, src.image_shape) if drawn else 1
    if at_once > 1:
        log.info("confirming %d findings at once", at_once)
    results = run_in_order(tasks(), at_once)
    for (f, c, idx, own, _), (cf, computed) in zip(drawn, tqdm(results, total=len(drawn), desc="confirmation",
                                                              unit="finding", disable=not progress, leave=False)):
        if computed and kept is not None:   # kept as it finishes: an interrupted run resumes after it
            kept.keep(f, idx, own, cf)
        _record(f, cf, c, clean_set=clean is not None)
    _adjust_over_the_run(findings)
    return findings


def _predicted(clean: ImageSource, model, config: ConfirmConfig, num_workers: int,
               loader_backend: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(an unlabelled clean set's predicted classes, -1 where the model's logits are not
    finite; their class probabilities, `CleanProbs`' stored ones), through its loader."""
    from .data.loader_torch import iter_batches
    from .embed import decode_device

    pred, stored = np.full(len(clean), -1, np.int64), None
    model.eval()
    # through the loader: get_batch decoded a folder one file at a time in this process
    for b in iter_batches(clean, config.batch_size, num_workers=num_workers, backend=loader_backend,
                          device=decode_device(config.device)):
        logits = model_logits(model, b.images.to(config.device)).float()
        # argmax calls a row of NaN class 0; -1: no class (confirm_pattern leaves it out)
        guess = torch.where(torch.isfinite(logits).all(1), logits.argmax(1), -1)
        pred[b.indices.numpy()] = guess.cpu().numpy()
        if stored is None:
            stored = np.full((len(clean), logits.shape[1]), np.nan, np.float32)
        # the clean images' own probabilities (`CleanProbs`), where get_batch reads them alike
        stored[b.indices.numpy()] = torch.softmax(logits, 1).cpu().numpy()
    return pred, stored


def _pool_candidates(findings: list[dict], pool: ImageSource, pool_pred, pool_probs, suspect):
    """(labels, predictions, candidate clean images, stored probabilities) of a pool that
    stands in for a clean set: its images in no finding, not suspect, not unreadable."""
    labels, pred = pool.labels(), np.asarray(pool_pred)
    if pred.shape != (len(pool),):   # numpy's broadcast error named neither
        raise ValueError(f"pool predictions of shape {pred.shape} do not match the pool {pool.name} of "
                         f"{len(pool)} images")
    cand = _outside_findings(findings, pool, pred, suspect)
    if pool_probs is not None and np.shape(pool_probs)[:1] != (len(pool),):
        raise ValueError(f"pool probabilities of shape {np.shape(pool_probs)} do not match the pool {pool.name} of "
                         f"{len(pool)} images")
    return labels, pred, cand, pool_probs


def _outside_findings(findings: list[dict], pool: ImageSource, pred: np.ndarray, suspect) -> np.ndarray:
    """The pool images in none of ``findings``, not suspect, with a prediction (the store's
    pred is -1 where it found a file unreadable)."""
    used = np.zeros(len(pool), bool)
    for f in findings:
        members = np.asarray(f["members"], dtype=np.int64)
        if len(members) and (members.min() < 0 or members.max() >= len(pool)):   # -1 wrapped, n: IndexError
            raise ValueError(f"finding {f.get('rank', '?')} has members outside the pool {pool.name} "
                             f"({len(pool)} images; members {members.min()}..{members.max()}): the findings "
                             f"of another pool?")
        used[members] = True
    if suspect is not None:
        used |= suspect_mask(suspect, len(pool), pool.name)
    return np.nonzero(~used & (pred >= 0))[0]


def _drawn_by_family(findings: list[dict], cand: np.ndarray, labels: np.ndarray, pred: np.ndarray | None,
                     pool: ImageSource | None, suspect, config: ConfirmConfig) -> list[tuple]:
    """`_drawn` for each family of findings (`spurfast.families`) on its own, in the findings'
    order: the draws from a seed of the family's own, and a pool standing in for the clean set
    less that family's members alone.  Every family's findings were one sequence: the feature
    view's (confirmed or later dropped) took pool images from the clusters' clean candidates (a
    class left with none) and shifted their draws, so switching a search on changed the
    clusters' verdicts, where each family is to be tested as if alone."""
    from .families import finding_family

    families: dict[str, list[dict]] = {}
    for f in findings:
        families.setdefault(finding_family(f), []).append(f)
    entries = {}
    for group in families.values():
        # ``cand``, less every family's members, serves one family as it is
        own_cand = cand if pool is None or len(families) == 1 else _outside_findings(group, pool, pred, suspect)
        for entry in _drawn(group, own_cand, labels, pred, pool is not None, config.max_images,
                            np.random.default_rng(config.seed)):
            entries[id(entry[0])] = entry
    return [entries[id(f)] for f in findings]


def _drawn(findings: list[dict], cand: np.ndarray, labels: np.ndarray, pred: np.ndarray | None, from_pool: bool,
           max_images: int, rng: np.random.Generator) -> list[tuple]:
    """Per finding, in order: (finding, class, its clean images, its class-content images,
    the clean candidates they were drawn from), drawn from ``rng`` in the findings' order."""
    drawn = []
    for f in findings:
        c = int(f["class"])
        ok = cand[pred[cand] != c] if from_pool else cand       # a pool's: predicted as another class
        others = _other_class(labels, pred, c, ok)   # as clean_indices_for draws them
        idx = _draw(others, max_images, rng)
        if from_pool:
            # labelled ones only: an unlabelled pool image predicted c may carry the shortcut itself
            # (its carriers outside the finding: one shortcut splits over clusters), which the
            # control then replays as "class content", as it would the suspects
            own = cand[labels[cand] == c]
        else:   # a clean set holds no shortcut: its images predicted c are class content
            own = cand[np.where(labels[cand] >= 0, labels[cand] == c, (pred[cand] == c) if pred is not None else False)]
        if len(own) > max_images:
            own = np.sort(rng.choice(own, max_images, replace=False))
        drawn.append((f, c, idx, own, others))
    return drawn


def _record(f: dict, cf: dict, c: int, clean_set: bool) -> None:
    """Fill finding ``f``'s ``confirm`` (or ``confirm_skipped``) from its result ``cf``."""
    f["_confirm_detail"] = cf
    f.pop("confirm_skipped", None)
    if cf["flip_rate"] is None:   # schema 1: confirm is null when it could not run
        # ... and the finding says why (it was only logged: the report showed nothing)
        f["confirm"], f["confirm_skipped"] = None, cf["skipped"]
        return
    if "content_p_value" not in cf:
        # a verdict then rests on the random control alone: say so (e.g. a pool whose every
        # image of the class is a suspect sample, as `spurfast plant` writes, and no --clean)
        cf["content_skipped"] = (f"no image of class {c} to compare with" + (
            "" if clean_set else " outside the findings and the suspect samples (pool images count "
                                 "only where labelled: an unlabelled one may carry the shortcut); pass "
                                 "a clean set (clean=, or --clean) with images of every class"))
        log.warning("%s: no class-content control, %s", finding_label(f), cf["content_skipped"])
    f["confirm"] = {k: cf[k] for k in ("flip_rate", "control_flip_rate", "p_value", "dose", "dose_flip_rate",
                                       "dose_control_flip_rate", "content_flip_rate",
                                       "content_p_value", "content_skipped", "smooth_flip_rate", "smooth_p_value")
                    if k in cf}


def _adjust_over_the_run(findings: list[dict]) -> None:
    """Each confirmed finding's ``q_value`` and ``verdict``: one test per finding,
    Benjamini-Hochberg over the run's findings, as discovery does over clusters, so a run with
    many findings does not confirm some by chance; within each search's family, as
    discovery's q-values are (an added view leaves the clusters' verdicts)."""
    families: dict[str, list[dict]] = {}
    for f in findings:
        if f.get("confirm"):
            families.setdefault(finding_family(f), []).append(f)
    for tested in families.values():
        for f, q in zip(tested, bh_qvalues(np.array([joint_p_value(f["confirm"]) for f in tested]))):
            f["confirm"]["q_value"] = float(q)
            f["confirm"]["verdict"] = confirm_verdict(f["confirm"])
            cf = f["confirm"]
            log.info("%s: flip %.3f vs control %.3f, p=%.3g, q=%.3g: %s", finding_label(f),
                     cf["flip_rate"], cf["control_flip_rate"], cf["p_value"], cf["q_value"], cf["verdict"])
