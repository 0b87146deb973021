"""Evaluation metrics for planted shortcuts (slice-discovery definitions after dcbench).

A *candidate* is what a method returns, best first: ``{"class": c, "members": pool
indices, "ranking": pool-wide score (higher = more likely to carry the feature),
"q_value": float | None}``.  A *planted feature* is ``(target class t, carries: bool per
pool item)``.

- ``enriched``: a candidate's members carry the feature at least twice as often as the
  pool does (and at least one member carries it).
- ``hit@1``: the top candidate is of class t and enriched.
- per feature, the *best* candidate is the one whose ranking has the highest average
  precision; its AUROC, AP, precision@10/@25 are reported.  ``ap_in_class``: the same
  best AP among the candidates of class t only.  dcbench's best slice may lie in any class,
  and a candidate of another class whose members carry the pool's stamp (the model's reaction
  to it there) can rank every carrier in the pool while the method's class-t candidates rank
  at chance; this one asks whether the method found the shortcut where it was planted (none
  of class t: the carrier rate, as for no candidate).  A method with no candidate
  scores AUROC 0.5 and AP and precision@k = the carrier rate: a random ranking's
  expectation, but for AP, whose expectation is a little higher, by about
  (1 - rate) (H_n - 1) / n for n pool items (H_n the n-th harmonic number; 0.001 on the
  full preset's pools), so nothing found scores a hair below chance, never above.  A
  feature that no pool item carries has nothing to find: every one of
  its metrics is undefined (NaN), not a random ranking's or a miss.
- rankings may hold -inf or NaN (an item the method did not rank: last) and +inf (first);
  only their order counts.
- ``recall@q``: fraction of planted features with a candidate of class t, q <= level,
  that is enriched.
- ``false findings@q``: candidates with q <= level that match no planted feature.
- ``false findings on pool patterns@q``: those of them whose members mostly (more than
  half) carry one of the patterns stamped into the pool.  Such a finding is a real reaction
  of the model to that pattern in another class than it was planted in (or, for a model
  trained with nothing planted, at all), not a cluster of natural look-alikes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from .checks import whole_number


def _check(scores, truth):
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(truth, dtype=bool)
    if s.shape != t.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and truth {t.shape} must be 1-D arrays of one length")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return s, t


def auroc(scores, truth) -> float:
    """Area under the ROC curve; ties count half; NaN without both classes."""
    s, t = _check(scores, truth)
    npos, nneg = int(t.sum()), int((~t).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[t].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def average_precision(scores, truth) -> float:
    """Step-wise average precision, sum_k (R_k - R_{k-1}) P_k over distinct score
    thresholds (tied scores enter together, as in scikit-learn); NaN without positives."""
    s, t = _check(scores, truth)
    npos = int(t.sum())
    if npos == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, t = s[order], t[order]
    # end of each tie group (not np.diff: inf - inf is NaN, which split tied infinite scores)
    last = np.r_[np.nonzero(s[1:] != s[:-1])[0], len(s) - 1]
    tp = np.cumsum(t)[last]
    prec = tp / (last + 1)
    rec = tp / npos
    return float(np.sum(np.diff(np.r_[0.0, rec]) * prec))


def precision_at_k(scores, truth, k: int) -> float:
    """Fraction of carriers among the k top-scored items (ties broken by pool index)."""
    s, t = _check(scores, truth)
    k = whole_number(k, "precision_at_k's k")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, len(s))
    if k == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    return float(t[order[:k]].mean())


def mask_iou(pred, truth) -> float:
    """Intersection over union of two boolean masks; NaN if either is missing or both empty."""
    if pred is None or truth is None:
        return float("nan")
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    if p.shape != t.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {t.shape}")
    union = np.logical_or(p, t).sum()
    return float(np.logical_and(p, t).sum() / union) if union else float("nan")


def _members(members, n: int) -> np.ndarray:
    """A candidate's members as pool indices in [0, n).  A boolean mask read as indices
    (0 and 1) and a negative index (read from the end) gave a silently wrong carrier rate."""
    m = np.asarray(members)
    if m.dtype == bool:
        raise ValueError(f"members must be pool indices, got a boolean mask of shape {m.shape}; "
                         f"pass np.flatnonzero(mask)")
    if m.dtype.kind == "f":   # the cast read 1.9 as image 1
        frac = np.flatnonzero(~np.isfinite(m) | (m != np.round(m)))
        if frac.size:
            raise ValueError(f"members must be pool indices, whole numbers; {frac.size} are not, e.g. "
                             f"members[{int(frac[0])}] = {m.reshape(-1)[frac[0]]}")
    m = m.astype(np.int64).reshape(-1) if m.size else np.zeros(0, np.int64)
    bad = np.flatnonzero((m < 0) | (m >= n))
    if bad.size:
        raise ValueError(f"members must be pool indices in [0, {n}); {bad.size} are not, e.g. members[{int(bad[0])}] = "
                         f"{int(m[bad[0]])}")
    return m


def enriched(members, carries) -> bool:
    """The members carry the feature at least twice as often as the pool, or, where the pool
    carries it too often for that (above a third of it), at least halfway from the pool's rate
    to all of them: a pool of 60% carriers made every candidate "not enriched", even one of
    carriers alone."""
    carries = np.asarray(carries, bool)
    members = _members(members, len(carries))
    if len(members) == 0 or not carries.any():
        return False
    # in integers: j/m >= 2k/n, or j/m >= (1 + k/n)/2.  (1 + prev)/2 in floats rounded above a
    # rate exactly on it (6 of 7 members in a pool of 10 carriers out of 14: "not enriched")
    j, m, k, n = int(carries[members].sum()), len(members), int(carries.sum()), len(carries)
    return j > 0 and (j * n >= 2 * k * m or 2 * j * n >= m * (n + k))


@dataclass
class Feature:
    target_class: int
    carries: np.ndarray            # (pool n,) bool
    mask: np.ndarray | None = None  # (H, W) planted mask where fixed
    name: str = ""


def matches(cand: dict, feat: Feature) -> bool:
    return int(cand["class"]) == int(feat.target_class) and enriched(cand["members"], feat.carries)


def hit_at_1(cands: list[dict], feat: Feature) -> float:
    return float(bool(cands) and matches(cands[0], feat))


def best_candidate(cands: list[dict], feat: Feature, *, in_class: bool = False):
    """(index, AP) of the candidate whose ranking has the highest AP, the earlier one on a
    tie (the method's own order decides); (None, nan) if none.  ``in_class``: among the
    candidates of the feature's class only."""
    return _best_of(_aps(cands, feat), cands, feat, in_class)


def _aps(cands: list[dict], feat: Feature) -> list[float]:
    return [average_precision(_finite(c["ranking"]), feat.carries) for c in cands]


def _best_of(aps: list[float], cands: list[dict], feat: Feature, in_class: bool):
    best, best_ap = None, -1.0
    for i, (c, ap) in enumerate(zip(cands, aps)):
        if in_class and int(c["class"]) != int(feat.target_class):
            continue
        if ap > best_ap:
            best, best_ap = i, ap
    return best, (best_ap if best is not None else float("nan"))


def _finite(r):
    """A ranking with the same order and ties in finite numbers: NaN and -inf (unranked)
    last, +inf first.  Where it holds a non-finite value, its dense ranks: "min - 1" put
    +inf last, and tied unranked items with the lowest score once |scores| >= 2**53."""
    r = np.asarray(r, dtype=np.float64)
    if not np.isfinite(r).all():
        r = rankdata(np.where(np.isnan(r), -np.inf, r), method="dense").astype(np.float64)
    return r


def feature_metrics(cands: list[dict], feat: Feature, ks=(10, 25), masks: bool = True) -> dict:
    """hit@1 and the best candidate's AUROC, AP, precision@k, mask IoU for one feature, and
    the best AP among the candidates of its class (``ap_in_class``).
    Without a candidate, the scores of a random ranking and, for a method that extracts
    masks (``masks``), IoU 0 where a planted mask exists: averaging over seeds must not
    drop the seeds where nothing was found.  A feature no pool item carries: every metric
    NaN (nothing to find; a random ranking's AUROC 0.5 and AP 0 would enter the means)."""
    names = ["hit@1", "auroc", "ap", *(f"precision@{k}" for k in ks), "mask_iou", "best_is_target_class",
             "ap_in_class"]
    if not np.asarray(feat.carries, bool).any():
        return dict.fromkeys(names, float("nan"))
    out = {"hit@1": hit_at_1(cands, feat)}
    prev = float(np.mean(feat.carries))
    aps = _aps(cands, feat)   # each ranking scored once for both picks
    i, ap = _best_of(aps, cands, feat, in_class=False)
    j, ap_in = _best_of(aps, cands, feat, in_class=True)
    ap_in_class = ap_in if j is not None else prev
    if i is None:
        iou = 0.0 if masks and feat.mask is not None and np.asarray(feat.mask).any() else float("nan")
        # every item a carrier: no negative, so AUROC is undefined, as `auroc` says for a candidate's ranking
        out.update({"auroc": 0.5 if prev < 1.0 else float("nan"), "ap": prev,
                    **{f"precision@{k}": prev for k in ks}, "mask_iou": iou,
                    "best_is_target_class": 0.0, "ap_in_class": ap_in_class})
        return out
    r = _finite(cands[i]["ranking"])
    out.update({"auroc": auroc(r, feat.carries), "ap": ap,
                **{f"precision@{k}": precision_at_k(r, feat.carries, k) for k in ks},
                "mask_iou": mask_iou(cands[i].get("mask"), feat.mask),
                "best_is_target_class": float(int(cands[i]["class"]) == int(feat.target_class)),
                "ap_in_class": ap_in_class})
    return out


def significant(cands: list[dict], q: float) -> list[dict]:
    """Candidates with a q-value at most ``q`` (methods without a test have none)."""
    return [c for c in cands if c.get("q_value") is not None and c["q_value"] <= q]


def recall_at_q(cands: list[dict], feats: list[Feature], q: float) -> float:
    """Share of the features (those some pool item carries: the others are undefined, as in
    `feature_metrics`) that a candidate with q <= ``q`` matches; NaN without one."""
    feats = [f for f in feats if np.asarray(f.carries, bool).any()]
    if not feats:
        return float("nan")
    sig = significant(cands, q)
    return float(np.mean([any(matches(c, f) for c in sig) for f in feats]))


def false_findings(cands: list[dict], feats: list[Feature], q: float) -> int:
    sig = significant(cands, q)
    return int(sum(not any(matches(c, f) for f in feats) for c in sig))


def carried_by(cand: dict, feats: list[Feature], share: float = 0.5) -> bool:
    """More than ``share`` of the candidate's members carry one of ``feats``."""
    if not feats:
        return False
    m = _members(cand["members"], len(feats[0].carries))
    return bool(len(m)) and any(float(np.asarray(f.carries, bool)[m].mean()) > share for f in feats)


def false_findings_on_pool_patterns(cands: list[dict], feats: list[Feature], pool_feats: list[Feature],
                                    q: float, share: float = 0.5) -> int:
    """False findings at ``q`` (match none of ``feats``, the learned features) whose members
    mostly carry one of ``pool_feats`` (every pattern stamped into the pool)."""
    sig = significant(cands, q)
    return int(sum(not any(matches(c, f) for f in feats) and carried_by(c, pool_feats, share) for c in sig))
