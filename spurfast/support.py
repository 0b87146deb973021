"""Training support: is a finding's pattern in the suspect data of its own class?

A shortcut the model *learned* was in its training data: suspect images labelled with the
finding's class carry the extracted pattern more often than suspect images of other classes.
A model can also react to a pattern it never saw in training (a clean model moves
long-sleeved garments towards "Shirt" when a corner patch is added: docs/RESULTS.md), and
confirmation (`spurfast.confirm`) cannot tell the two apart, since both move the model.
This test can, where the suspect data holds the carriers.

Per finding: every labelled suspect image gets the projection of its pixels onto the
pattern (mask x contrast, as confirmation pastes it); the threshold is the (1 - ``tail``)
quantile of the other classes' suspects; a one-sided Fisher exact test asks whether the
class's suspects exceed it more often than the others' (where several of the others score
exactly the threshold, ties are counted both as below and as above, the better p doubled).
Benjamini-Hochberg over the run's findings gives each a q-value; ``supported`` is
q <= ``level``.  Natural confusions are supported too (the class's own content is "in its
training data"): this test is a necessary condition for a learned shortcut, not a
sufficient one; confirmation's content control is the other half.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from .checks import SOURCE_HINT, check_arguments, check_default_dtype, suspect_mask
from .data.sources import ImageSource
from .scoring import TIE_TOLERANCE

log = logging.getLogger("spurfast.support")

TAIL = 0.01    # the other classes' suspects above the threshold: their top 1%


def require_patterns(findings: list[dict]) -> None:
    """Refuse findings without the extracted pattern `spurfast.discover.characterise` leaves."""
    for f in findings:
        if "_mask" not in f or "_contrast" not in f:
            raise ValueError(f"finding {f.get('rank')} has no extracted pattern; run characterise() first")


def extracted_patterns(findings: list[dict], masks: list | None = None) -> torch.Tensor:
    """(F, C, H, W) mask x contrast of each of (at least one) finding: what confirmation pastes;
    ``masks``: (H, W) masks to use instead of the findings' own (`pattern_rank`'s cores)."""
    require_patterns(findings)
    masks = [f["_mask"] for f in findings] if masks is None else masks
    return torch.stack([torch.as_tensor(f["_contrast"], dtype=torch.float32) * torch.as_tensor(np.asarray(m, bool))
                        for f, m in zip(findings, masks, strict=True)])


def image_pass(source: ImageSource, idx: np.ndarray, take, batch_size: int, progress: bool, desc: str,
               num_workers: int, loader_backend: str | None, device: str | None) -> None:
    """One pass over images ``idx`` (distinct pool indices, non-empty) of ``source``:
    ``take(pool indices, images, ok)`` per batch in the loader's order, the images (B, C, H, W)
    float64 on the CPU, ``ok`` (B,) bool (an unreadable image is all zeros).  A folder pool is
    decoded by its loader (``loader_backend``, ``num_workers`` processes), as the embedding
    pass decoded it: get_batch decoded one file at a time in this process, minutes for 100k
    suspects.  ``device``: the run's; a loader that can decode on a GPU (DALI) decodes there
    if it is a CUDA device, else on the CPU, as the embedding pass does (None: the loader's
    own choice, a GPU whenever torch sees one)."""
    from tqdm.auto import tqdm

    from .data.loader_torch import iter_batches
    from .embed import decode_device

    # where the embedding pass decodes (without it DALI decoded on a GPU whenever torch saw one)
    decode = None if device is None else decode_device(device)
    with tqdm(total=len(idx), desc=desc, unit="img", disable=not progress) as bar:
        for b in iter_batches(source, batch_size, indices=idx, num_workers=num_workers, backend=loader_backend,
                              device=decode):
            # the DALI loader yields images on the GPU where one is visible: the patterns and
            # the result live on the CPU (the product failed there before findings.json)
            ok = b.ok.cpu().numpy().astype(bool)
            x = b.images.to("cpu", torch.float64)
            if not ok.all():   # a new tensor, only then: multiplying every batch by ok took a pass over its pixels
                x = torch.where(torch.as_tensor(ok).view(-1, 1, 1, 1), x, 0.0)
            take(b.indices.numpy(), x, ok)
            bar.update(len(b.indices))


def _projection_pass(source: ImageSource, idx: np.ndarray, patterns: torch.Tensor, take, batch_size: int,
                     progress: bool, desc: str, num_workers: int, loader_backend: str | None,
                     device: str | None) -> None:
    """`image_pass` that hands ``take(pool indices, projections)`` the (B, F) float64
    projections of each batch onto ``patterns`` (F, C, H, W); an unreadable image projects to 0."""
    flat = patterns.reshape(len(patterns), -1).double().T          # (D, F)
    image_pass(source, idx, lambda got, x, ok: take(got, (x.reshape(len(x), -1) @ flat).numpy()),
               batch_size, progress, desc, num_workers, loader_backend, device)


def pattern_projections(source: ImageSource, idx: np.ndarray, patterns: torch.Tensor,
                        batch_size: int = 256, progress: bool = False, desc: str = "training support", *,
                        num_workers: int = 0, loader_backend: str | None = None,
                        device: str | None = None) -> np.ndarray:
    """(len(idx), F) projections of images ``idx`` (distinct pool indices) of ``source`` onto
    ``patterns`` (F, C, H, W), row i for ``idx[i]``: one pass over the images, float64 sums
    (reads n*C*H*W pixels once; `_projection_pass` says how they are decoded).  An unreadable
    image projects to 0."""
    idx = np.asarray(idx, dtype=np.int64)
    out = np.zeros((len(idx), len(patterns)))
    if len(idx) == 0:
        return out
    order = np.argsort(idx, kind="stable")
    idx_sorted = idx[order]   # once: gathered per batch, a copy of idx each time (12.8 s vs 0.2 s at 1M)

    def take(got, proj):   # a loader may yield in its own order
        out[order[np.searchsorted(idx_sorted, got)]] = proj

    _projection_pass(source, idx, patterns, take, batch_size, progress, desc, num_workers, loader_backend, device)
    return out


def wanted_projections(source: ImageSource, idx: np.ndarray, patterns: torch.Tensor, wanted: list[np.ndarray],
                       batch_size: int = 256, progress: bool = False, desc: str = "pattern ranking", *,
                       num_workers: int = 0, loader_backend: str | None = None,
                       device: str | None = None) -> list[np.ndarray]:
    """The projections `pattern_projections` computes, of each pattern's own images only:
    ``wanted[j]`` the sorted pool indices (a subset of ``idx``) whose projection onto pattern
    j is needed; returns F arrays, ``[j][k]`` the projection of ``wanted[j][k]`` (the same
    values as the matrix's).  Memory sum(len(w)) instead of len(idx) x F, which for many
    patterns with disjoint image sets grows with the square of their number."""
    idx = np.asarray(idx, dtype=np.int64)
    wanted = [np.asarray(w, dtype=np.int64) for w in wanted]
    if len(wanted) != len(patterns):
        raise ValueError(f"wanted lists {len(wanted)} index sets for {len(patterns)} patterns")
    if any(len(w) and (np.any(np.diff(w) <= 0) or not np.isin(w, idx).all()) for w in wanted):
        raise ValueError("each wanted index set must be sorted, distinct and drawn from idx")
    # every (pattern, image) wanted, sorted by pool index: a batch finds its entries in one
    # search, not one per pattern (12.3 s against 1.0 s of bookkeeping for 300 patterns of
    # 20,000 images each over 1.28M, measured on this CPU)
    lens = [len(w) for w in wanted]
    every = np.concatenate(wanted) if wanted else np.zeros(0, np.int64)
    pattern_of = np.repeat(np.arange(len(wanted)), lens)
    by_index = np.argsort(every, kind="stable")
    every_sorted = every[by_index]
    values = np.zeros(len(every))

    def take(got, proj):
        lo = np.searchsorted(every_sorted, got, "left")
        count = np.searchsorted(every_sorted, got, "right") - lo
        if count.any():
            at = by_index[np.repeat(lo - (np.cumsum(count) - count), count) + np.arange(int(count.sum()))]
            values[at] = proj[np.repeat(np.arange(len(got)), count), pattern_of[at]]

    if len(idx):
        _projection_pass(source, idx, patterns, take, batch_size, progress, desc, num_workers, loader_backend,
                         device)
    ends = np.cumsum(lens, dtype=np.int64)
    return [values[e - n:e] for e, n in zip(ends, lens)]


def support_test(scores: np.ndarray, in_class: np.ndarray, other: np.ndarray, tail: float = TAIL) -> dict:
    """The test of one finding: ``scores`` of every image, boolean masks of its class's
    suspects and of the other classes' suspects."""
    from scipy.stats import fisher_exact

    n_in, n_other = int(in_class.sum()), int(other.sum())
    if n_in == 0 or n_other * tail < 1:
        why = ("no labelled suspect image of the class" if n_in == 0 else
               f"{n_other} labelled suspect image(s) of other classes; at least {int(np.ceil(1 / tail))} needed")
        return {"p_value": None, "skipped": why, "n_class": n_in, "n_other": n_other}
    t = float(np.quantile(scores[other], 1.0 - tail))
    # a tie is a band, not equality: carriers of one identical stamp project an ulp or two
    # apart (the float64 GEMM rounds a row by its place in the batch), and the counts, the
    # p-value and the verdict changed with the batch size
    tol = TIE_TOLERANCE * max(1.0, abs(t))

    def test(above):
        a, b = int(above(scores[in_class]).sum()), int(above(scores[other]).sum())
        return float(fisher_exact([[a, n_in - a], [b, n_other - b]], alternative="greater")[1]), a, b

    p, a, b = test(lambda s: s > t + tol)               # ties at t count as below
    at_t, ties_above = bool(int((np.abs(scores[other] - t) <= tol).sum()) >= 2), False
    if at_t:
        # Several other-class suspects score exactly t: an identical stamp (every carrier
        # projects alike) on more than the tail's share of them puts t on the stamp's value,
        # and "> t" would leave every carrier of the class below it; "an all-black corner"
        # (most images project to 0) needs "> t".  Both counts are tested, the better kept
        # and its p doubled (Bonferroni over the two), so no constant picks between them.
        p_ge, a_ge, b_ge = test(lambda s: s >= t - tol)
        if p_ge < p:
            p, a, b, ties_above = p_ge, a_ge, b_ge, True
        p = min(1.0, 2.0 * p)
    return {"p_value": p, "n_class": n_in, "class_above": a, "n_other": n_other, "other_above": b, "tail": tail,
            "ties_at_threshold": at_t, "ties_counted_above": ties_above}


def training_support(findings: list[dict], source: ImageSource, suspect: np.ndarray, labels: np.ndarray, *,
                     tail: float = TAIL, level: float = 0.05, batch_size: int = 256, progress: bool = False,
                     num_workers: int = 0, loader_backend: str | None = None, device: str | None = None) -> None:
    """Fill ``support`` of every finding (needs ``_mask`` and ``_contrast`` from
    `spurfast.discover.characterise`): the suspect images (``suspect``, a pool mask) with a
    known label (``labels`` >= 0) and readable are the training data tested.  ``device``:
    the run's, where a folder pool is decoded (`pattern_projections`)."""
    check_default_dtype("training_support")   # the steps one by one too: float64 gave other findings
    check_arguments("training_support", ("source", source, ImageSource, "an ImageSource", SOURCE_HINT))
    from .confirm import _known_readable
    from .families import finding_family
    from .scoring import bh_qvalues

    if not 0.0 < tail < 1.0:
        raise ValueError(f"support tail must be in (0, 1), got {tail}")
    if not 0.0 < level < 1.0:   # 1.5 called every finding supported
        raise ValueError(f"support level must be in (0, 1), got {level}")
    if batch_size < 1:   # 0 failed naming no setting; a negative one read no image: every score 0, none supported
        raise ValueError(f"support batch_size must be >= 1, got {batch_size}")
    suspect = suspect_mask(suspect, len(source), source.name)
    labels = np.asarray(labels)
    if labels.shape != (len(source),):
        raise ValueError(f"labels {labels.shape} must have one entry per image of {source.name} ({len(source)})")
    if not findings:
        return
    idx = _known_readable(source, np.nonzero(suspect & (labels >= 0))[0])
    patterns = extracted_patterns(findings)
    scores = pattern_projections(source, idx, patterns, batch_size, progress, num_workers=num_workers,
                                 loader_backend=loader_backend, device=device) if len(idx) else \
        np.zeros((0, len(findings)))
    keep = np.isin(idx, _known_readable(source, idx))   # unreadable ones found in the pass: zero images
    scores, lab = scores[keep], labels[idx[keep]]
    tests = [support_test(scores[:, j], lab == int(f["class"]), lab != int(f["class"]), tail)
             for j, f in enumerate(findings)]
    for j, t in enumerate(tests):
        # an empty mask leaves nothing to carry: not tested, as confirmation skips it (its p of 1
        # in Benjamini-Hochberg raised every other finding's q-value)
        if not bool(patterns[j].any()):
            tests[j] = {"p_value": None, "skipped": "empty pattern mask", "n_class": t["n_class"], "n_other": t["n_other"]}
    # adjusted within each search's family, as discovery and confirmation are: a view switched on
    # leaves the clusters' support as it was
    families: dict[str, list[int]] = {}
    for j, t in enumerate(tests):
        if t["p_value"] is not None:
            families.setdefault(finding_family(findings[j]), []).append(j)
    for tested in families.values():
        for j, qj in zip(tested, bh_qvalues(np.array([tests[j]["p_value"] for j in tested]))):
            tests[j]["q_value"] = float(qj)
            tests[j]["supported"] = bool(qj <= level)
    for f, t in zip(findings, tests):
        f["support"] = t
    skipped = sum(t["p_value"] is None for t in tests)
    if skipped:
        log.info("training support not tested for %d finding(s): %s", skipped,
                 next(t["skipped"] for t in tests if t["p_value"] is None))
