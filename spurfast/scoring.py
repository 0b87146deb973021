"""Cluster scores, permutation p-values and Benjamini-Hochberg q-values.

A shortcut makes the classifier call *unrelated* images by one class c, and the images
that carry it share a latent feature.  So around a pattern-bearing image the latent
neighbours that are unrelated to c are *also* called c: the region is purely c although
its content is not.  A natural confusion (a shirt called T-shirt) sits on a decision
boundary instead, where similar images are called either way.  The score of a cluster of
predicted class c sums its unrelated members' *agreement*:

    score = sum over i in U of (share of i's latent neighbours unrelated to c that are predicted c)

with U the members unrelated to c (content != c: the true label where known, else the
classifier's best class other than c; suspect samples of unknown label never count), over
the K nearest neighbours in the standardised latent space.  (A majority vote instead of the
share ignores how pure a region is; with the size-matched null below, the share gave fewer
false findings at about the same recall on 7 settings x 3 seeds: docs/RESULTS.md, eighth
session.)  The *surprise* statistic, the default since the twenty-fourth session, weighs
each member's agreement by how rarely the model confuses its neighbours' labels with c
(`agreement`); it is more sensitive to weak shortcuts and to coherent rare confusions alike
(docs/RESULTS.md, ninth and twenty-fourth sessions), so it leans on confirmation more.

The null keeps everything but the link between latent features and predictions:
predicted classes are permuted among images of the same true label (among all images
when labels are unknown), so each class keeps its size and each content class its
confusion rates.  The *whole* clustering is rerun on each permutation, which prices in
the selection k-means itself does.  A score grows with the number of unrelated members,
so each cluster is compared with the null clusters of about its size (`SIZE_FACTOR`), the
smaller of them scaled up to its size: p = (1 + #null >= s) / (1 + #null) over those.
Nothing is tuned to the evaluation: the size factor (2) and the smallest reference (100 null
clusters) were chosen beforehand.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import betainc

from . import backends
from .cluster import batched_kmeans, choose_k


def top_two(probs, chunk: int = 1 << 16, rows: np.ndarray | None = None):
    """(n, 2): each row's most and second most probable class (the first index on ties),
    read ``chunk`` rows at a time (``probs`` may be the store's memmap).  It is all that
    :func:`content_classes` needs, in O(n) memory: a copy of the (n, C) probabilities
    was 5 GB at ImageNet scale (1.28M x 1000), made for the real clustering and again for
    every null permutation.  ``rows`` (a bool mask): also, in the same pass, the indices
    among them whose row holds a NaN or an inf (argmax calls its first NaN the top class):
    returns (top two, those indices)."""
    out = np.zeros((len(probs), 2), np.int64)
    bad = []
    for s in range(0, len(probs), chunk):
        p = np.array(probs[s:s + chunk])
        if rows is not None:
            bad.append(s + np.flatnonzero(~np.isfinite(p.reshape(len(p), -1)).all(1) & rows[s:s + len(p)]))
        at = np.arange(len(p))
        out[s:s + len(p), 0] = p.argmax(1)
        p[at, out[s:s + len(p), 0]] = -np.inf
        out[s:s + len(p), 1] = p.argmax(1)
    if rows is None:
        return out
    return out, np.concatenate(bad) if bad else np.zeros(0, np.int64)


def content_classes(top2: np.ndarray, labels: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """Content of each image relative to class ``cls[i]``: its label if known, else the
    best class other than cls[i] (from ``top2`` = :func:`top_two` of the probabilities)."""
    runner = np.where(top2[:, 0] != cls, top2[:, 0], top2[:, 1])
    return np.where(labels >= 0, labels, runner)


def unrelated_to_class(top2: np.ndarray, labels: np.ndarray, cls: np.ndarray, unknown_ok: np.ndarray) -> np.ndarray:
    """Images whose content is not class ``cls[i]``: labelled otherwise, or unlabelled and
    allowed (``unknown_ok``: an unlabelled suspect sample may be genuine class c)."""
    return (content_classes(top2, labels, cls) != cls) & np.where(labels >= 0, True, unknown_ok)


def latent_neighbours(z: np.ndarray, k: int = 10, device: str = "cpu", backend: str | None = None) -> np.ndarray:
    """(n, k) indices of each point's k nearest other points (squared L2), nearest first,
    exact: the ``latent_knn`` op (fused CPU kernel, or the reference's blocked GEMM)."""
    zt = torch.as_tensor(np.asarray(z), device=device)
    # float64 as given: the providers centre it before their fp32 cast (cast here, 1e8 + noise lost its spread)
    zt = zt if zt.dtype == torch.float64 else zt.float()
    return backends.call("latent_knn", zt, k, backend=backend).cpu().numpy()


STATISTICS = ("share", "surprise")
# the default since the twenty-fourth session: on the full preset it alone met the single-strong and
# three-pattern targets (the share did not), and again on three seeds the choice never saw
# (docs/RESULTS.md, twenty-fourth session)
DEFAULT_STATISTIC = "surprise"
# -log10 p per member at most: rarer than that only says the rate is about zero, and one
# member must not outweigh a whole cluster
SURPRISE_CAP = 10.0
# what the permutation null keeps (`discover --null`): "label" shuffles predictions among the
# images of each true label, so any coherent natural confusion (the coats that look like shirts,
# called Shirt) beats it; "look-alike" shuffles them among images of the same label that look
# like the same other class about as much (`look_alike_strata`), so such a confusion is the
# null's too, unless the stratum is the shortcut's own (`look_alike_strata`'s smallest size).
# Opt-in: on the full preset it halves the false findings but loses a strong cross-dataset
# shortcut at the top in every seed (docs/results/look-alike/, thirty-ninth session)
NULLS = ("label", "look-alike")
DEFAULT_NULL = "label"
# x n_neighbours: the wider neighbourhood an image's look-alike class is read from, and the
# smallest stratum (a smaller one is one latent blob, not a class of look-alikes)
LOOK_ALIKE_NEIGHBOURS = 5
LOOK_ALIKE_BANDS = (0.1, 0.25, 0.5)   # that class's share of it, cut into 4 bands (fixed beforehand)


def look_alike_strata(labels: np.ndarray, wide: np.ndarray, min_size: int, bands=LOOK_ALIKE_BANDS) -> np.ndarray:
    """(n,) dense stratum ids for the look-alike null.  An image's finest stratum is (its label,
    all unlabelled images one; the other label most common among its latent neighbours
    ``wide`` (n, m), the nearer one on a tie, none where no neighbour has another label; that
    label's share of the m in ``bands``).  From labels alone: the classifier's output stays out
    (it would explain a shortcut away).

    Every stratum holds at least ``min_size`` images or a whole label: finest level first,
    the strata under ``min_size`` of each parent (the band's parent is (label, look-alike),
    whose parent is the label) pool into the parent, and a pool still under ``min_size`` joins
    the parent's largest stratum.  Without it, a shortcut that makes its images unlike
    everything else gave them a stratum of their own, whose shuffle changes no prediction:
    the group was its own null (the tests' hand-made store was not found at all)."""
    labels = np.asarray(labels)
    wide = np.asarray(wide)
    n, m = wide.shape
    lab = np.where(labels >= 0, labels, -1).astype(np.int64)
    L = int(max(lab.max(initial=-1), 0)) + 1
    look, share = np.full(n, -1, np.int64), np.zeros(n)
    nl = lab[wide] if n else np.zeros((0, m), np.int64)
    rows, cols = np.nonzero((nl >= 0) & (nl != lab[:, None]))
    if len(rows):
        key = rows * L + nl[rows, cols]
        uk, first, count = np.unique(key, return_index=True, return_counts=True)   # first: the nearest (rows sorted)
        r, other = uk // L, uk % L
        order = np.lexsort((cols[first], -count, r))         # per image: most common, then nearest
        top = order[np.r_[True, r[order][1:] != r[order][:-1]]]
        look[r[top]], share[r[top]] = other[top], count[top] / m
    band = np.where(look >= 0, np.digitize(share, bands), 0)
    # one id space, the levels disjoint: label < (label, look) < (label, look, band)
    nb = len(bands) + 1
    by_label = lab + 1
    by_look = (L + 1) + by_label * (L + 1) + (look + 1)
    by_band = (L + 1) * (L + 2) + by_look * nb + band
    levels = [by_label, by_look, by_band]
    out = by_band.copy()
    for depth in (2, 1):
        parent = levels[depth - 1]
        _, inv, count = np.unique(out, return_inverse=True, return_counts=True)
        small = (out == levels[depth]) & (count[inv.reshape(-1)] < min_size)
        out = np.where(small, parent, out)
        for p in np.unique(parent[small]):
            pooled = out == p
            if pooled.sum() >= min_size:
                continue
            kept = out[(parent == p) & ~pooled]
            if len(kept):
                kid, kc = np.unique(kept, return_counts=True)
                out[pooled] = kid[np.argmax(kc)]
    return np.unique(out, return_inverse=True)[1].reshape(-1).astype(np.int64)


def confusion_rates(groups: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(L + 1, C) share of the images of each true label predicted as each class; the last
    row pools the unlabelled images.  The permutation null keeps it (it permutes within labels)."""
    lab = np.where(labels >= 0, labels, -1)
    n_labels = int(lab.max()) + 2 if len(lab) else 1
    n_classes = int(groups.max()) + 1 if len(groups) else 1
    table = np.zeros((n_labels, n_classes))
    np.add.at(table, (lab, groups), 1.0)     # -1 indexes the last row
    return table / np.maximum(table.sum(1, keepdims=True), 1.0)


def agreement(groups: np.ndarray, labels: np.ndarray, neighbours: np.ndarray, unknown_ok: np.ndarray,
              statistic: str = DEFAULT_STATISTIC, strata: np.ndarray | None = None) -> np.ndarray:
    """Per point i (predicted class c = groups[i]), over its neighbours unrelated to c
    (label != c, or unlabelled and allowed):

    - ``share``: the share also predicted c (0 when it has no such neighbour);
    - ``surprise``: -log10 P(Binomial(n, r) >= a), a of those n neighbours predicted c, r
      their mean rate of being predicted c given their labels (`confusion_rates`; one
      binomial stands in for the Poisson-binomial of unequal rates), capped at
      `SURPRISE_CAP`.  Agreement where the model hardly ever confuses those labels with c
      weighs more, so a weak shortcut that moves few images of unlikely labels can reach
      significance; it also makes coherent rare confusions significant (docs/RESULTS.md,
      ninth session).  ``strata`` (`look_alike_strata`): r is the rate of each neighbour's
      stratum instead of its label's."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    c = groups[:, None]
    nl = labels[neighbours]
    valid = np.where(nl >= 0, nl != c, unknown_ok[neighbours])
    agree = (groups[neighbours] == c) & valid
    n, a = valid.sum(1), agree.sum(1)
    if statistic == "share":
        return a / np.maximum(n, 1)
    if strata is None:
        rate = confusion_rates(groups, labels)[np.where(nl >= 0, nl, -1), c]
    else:
        rate = confusion_rates(groups, strata)[strata[neighbours], c]
    r = np.clip(np.where(valid, rate, 0.0).sum(1) / np.maximum(n, 1), 1e-12, 1.0 - 1e-12)
    # P(X >= a) = I_r(a, n - a + 1), the regularised incomplete beta function (a >= 1)
    tail = np.where(a > 0, betainc(np.maximum(a, 1), np.maximum(n - a + 1, 1), r), 1.0)
    return np.minimum(-np.log10(np.maximum(tail, 1e-300)), SURPRISE_CAP)


def cluster_scores(groups: np.ndarray, assign: np.ndarray, kmax: int, unrelated: np.ndarray,
                   agree: np.ndarray, n_classes: int):
    """Per (group, cluster) flat index: (score = summed agreement of the unrelated members,
    n_unrelated, size)."""
    flat = groups.astype(np.int64) * kmax + assign
    m = n_classes * kmax
    size = np.bincount(flat, minlength=m)
    n_u = np.bincount(flat[unrelated], minlength=m)
    score = np.bincount(flat[unrelated], weights=np.asarray(agree, np.float64)[unrelated], minlength=m)
    return score, n_u, size


@dataclass
class Clustering:
    groups: np.ndarray      # (n,) predicted class of each valid point
    assign: np.ndarray      # (n,) cluster within class
    centroids: np.ndarray   # (C, kmax, d)
    k_per_group: np.ndarray
    kmax: int
    score: np.ndarray       # (C*kmax,)
    n_unrelated: np.ndarray
    size: np.ndarray


def cluster_and_score(z: np.ndarray, groups: np.ndarray, top2: np.ndarray, labels: np.ndarray,
                      n_classes: int, neighbours: np.ndarray, unknown_ok: np.ndarray, *, k: int, min_cluster_size: int, seed: int, n_iter: int,
                      max_mean_cluster_size: int = 0, max_k: int = 0, statistic: str = DEFAULT_STATISTIC,
                      metric: str = "l2", backend: str | None = None, device: str = "cpu",
                      strata: np.ndarray | None = None) -> Clustering:
    sizes = np.bincount(groups, minlength=n_classes)
    kpg = choose_k(sizes, k, min_cluster_size, max_mean_cluster_size, max_k)
    res = batched_kmeans(torch.as_tensor(z, device=device), torch.as_tensor(groups, device=device), kpg,
                         n_groups=n_classes, n_iter=n_iter, seed=seed, metric=metric, backend=backend)
    assign = res.assign.cpu().numpy()
    kmax = res.centroids.shape[1]
    unrelated = unrelated_to_class(top2, labels, groups, unknown_ok)
    agree = agreement(groups, labels, neighbours, unknown_ok, statistic, strata)
    score, n_u, size = cluster_scores(groups, assign, kmax, unrelated, agree, n_classes)
    return Clustering(groups, assign, res.centroids.cpu().numpy(), kpg, kmax, score, n_u, size)


def permuted_predictions(groups: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Permute predicted classes among images that share a true label (or among all
    unlabelled images)."""
    out = groups.copy()
    # one stable sort, not a scan of the pool per label (3.1 s a permutation at 1.28M images x
    # 1,000 labels): the same blocks in the same (ascending label) order, so the same draws
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    bounds = np.r_[np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]]), len(order)] if len(order) else []
    for a, b in zip(bounds[:-1], bounds[1:]):
        idx = order[a:b]
        out[idx] = groups[rng.permutation(idx)]
    return out


def shuffled_share(groups: np.ndarray, labels: np.ndarray) -> float:
    """The expected share of images whose predicted class `permuted_predictions` changes:
    per label, sum over classes of n_c (n - n_c) / n, over all images.  Near 0 the null
    is the real predictions again (a classifier that calls nearly every image of each label
    by one class), and no cluster can beat it."""
    if len(groups) == 0:
        return 0.0
    _, label_of = np.unique(labels, return_inverse=True)
    n_label = np.bincount(label_of)
    pair = label_of * (int(groups.max()) + 1) + groups
    n_pair = np.bincount(pair)[pair]
    return float(((n_label[label_of] - n_pair) / n_label[label_of]).sum() / len(groups))


def null_scores(z, groups, top2, labels, n_classes, neighbours, unknown_ok, *, n_null: int, seed: int,
                start: int = 0, progress=None, work=None, **kw) -> tuple[np.ndarray, np.ndarray]:
    """(scores, n_unrelated) of every nonempty cluster over permutations ``start`` ..
    ``start + n_null - 1``, pooled.  Permutation b depends on (seed, b) only, so a later
    call with ``start`` extends the same null.  ``work`` (`spurfast.discovery_work.DiscoveryWork`
    of these inputs): permutations already finished are read back, new ones saved.  ``strata``
    in ``kw`` (the look-alike null): predictions are shuffled within them, not within labels."""
    out, sizes = [], []
    for b in range(start, start + n_null):
        done = work.get_null(b) if work is not None else None
        if done is None:
            # within the strata where given (the look-alike null), else within labels
            within = labels if kw.get("strata") is None else kw["strata"]
            g = permuted_predictions(groups, within, np.random.default_rng((seed, 104729, b)))
            cl = cluster_and_score(z, g, top2, labels, n_classes, neighbours, unknown_ok, seed=seed + 1 + b, **kw)
            done = cl.score[cl.size > 0], cl.n_unrelated[cl.size > 0]
            if work is not None:
                work.put_null(b, *done)
        out.append(done[0])
        sizes.append(done[1])
        if progress is not None:
            progress.update(1)
    if not out:
        return np.zeros(0), np.zeros(0, np.int64)
    return np.concatenate(out), np.concatenate(sizes)


TIE_TOLERANCE = 1e-9   # relative: scores this close are the same sum added in another order


def _tie_floor(scores) -> np.ndarray:
    """The lowest null score that ties (counts as >=) each score.  The p-value and "beat
    every null cluster" both compare with it, so they cannot disagree on a tie."""
    scores = np.asarray(scores, np.float64)
    # an infinite score is its own floor: inf - 1e-9 * inf is NaN, which no null score ties
    # (+inf got p = 1 / (1 + #null) against a null of +inf scores)
    with np.errstate(invalid="ignore"):
        return np.where(np.isinf(scores), scores, scores - TIE_TOLERANCE * np.maximum(1.0, np.abs(scores)))


def _no_nan(name: str, a: np.ndarray) -> None:
    """A NaN score has no order: searchsorted put it above every null score (the smallest
    p-value there is) and a NaN null score above every real one."""
    bad = np.flatnonzero(np.isnan(a))
    if bad.size:
        raise ValueError(f"{name} has {bad.size} NaN value(s), e.g. {name}[{int(bad[0])}]; expected numbers "
                         f"(+-inf allowed)")


def permutation_pvalues(scores: np.ndarray, null: np.ndarray) -> np.ndarray:
    """p = (1 + #null >= s) / (1 + #null) for each score s.  Ties count as >=, also where
    summation order left the null score an ulp below (0.3 + 0.2 + 0.1 < 0.1 + 0.2 + 0.3)."""
    scores, null = np.asarray(scores, np.float64), np.asarray(null, np.float64)
    _no_nan("scores", scores)
    _no_nan("null", null)
    null = np.sort(null)
    ge = len(null) - np.searchsorted(null, _tie_floor(scores), side="left")
    return (1.0 + ge) / (1.0 + len(null))


SIZE_FACTOR = 2.0     # a cluster's null: the null clusters within this factor of its size


def size_matched_pvalues(scores: np.ndarray, n_unrelated: np.ndarray, null: np.ndarray,
                         null_n_unrelated: np.ndarray, min_reference: int = 100
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Permutation p-values, each score against the null clusters of about its size; the
    number of null clusters each was compared with; and whether it beat every null cluster
    within ``SIZE_FACTOR`` of its size (then more permutations can only lower its p), or,
    with none that close, every one it was compared with.

    Size is the number of unrelated members (what a score sums over), compared on a log
    scale as (n + 1): within ``SIZE_FACTOR``, widened to the ``min_reference`` nearest in
    size when fewer are.  Pooling every size would let a large cluster's diffuse agreement
    pass for a small cluster's pure one, and hide small pure groups among large null
    clusters.  The price is resolution: p >= 1 / (1 + #reference), and a sparse window
    is widened with clusters of other sizes, so `discover` adds permutations while a cluster
    that beat every null cluster of its size still misses the FDR.
    A reference null cluster smaller than the cluster (u < n unrelated members) counts with
    its score scaled up to n members (x n / u): as raw sums, a cluster of a size the null
    seldom makes was compared mostly with smaller clusters, which score lower.  Treating each
    permutation of a real store's null in turn as the clusters tested, against 30 others, the
    largest 1% of sizes had P(p <= 0.05) = 0.29 as raw sums and 0.048 scaled (all sizes 0.020
    and 0.014).  Scaling assumes a score is a sum of nonnegative per-member values: a
    smaller cluster's total, scaled, then has the mean per member it had and more spread, and
    a larger cluster's total is not scaled down.
    (Widening the reference instead, to #clusters / fdr null clusters so that a lone
    finding could always pass Benjamini-Hochberg, lost all three planted patterns of one
    three-pattern run: the wider reference is no longer matched in size.)
    A cluster with no unrelated member scores 0 by construction: it is not tested (p 1, not
    beaten; `spurfast.discover` leaves it out of Benjamini-Hochberg's m and gives it q 1),
    and null clusters of none are no cluster's reference.  In a one-member
    cluster's window they were 533 of 557 null clusters, all scoring 0, and one member's
    chance agreement (about 1 in 9) passed as p = 0.002, a false finding."""
    scores, null = np.asarray(scores, np.float64), np.asarray(null, np.float64)
    _no_nan("scores", scores)
    _no_nan("null", null)
    null_n_unrelated = np.asarray(null_n_unrelated)
    if len(null_n_unrelated) != len(null):
        raise ValueError(f"null has {len(null)} scores but {len(null_n_unrelated)} sizes (null_n_unrelated)")
    kept = null_n_unrelated > 0
    null, null_n_unrelated = null[kept], null_n_unrelated[kept]
    n_unrelated = np.asarray(n_unrelated)
    tested = n_unrelated > 0
    if len(null) == 0:   # an empty null is beaten by every tested cluster
        return np.ones(len(scores)), np.zeros(len(scores), np.int64), tested
    log_null = np.log1p(np.asarray(null_n_unrelated, np.float64))
    size_null = np.asarray(null_n_unrelated, np.float64) + 1.0
    out, n_ref, beat = np.ones(len(scores)), np.zeros(len(scores), np.int64), np.zeros(len(scores), bool)
    # The null grouped by size once, each size's scores sorted: a window is a set of whole
    # sizes, so its counts are per-size binary searches.  Masking and sorting the whole null
    # per distinct size instead cost O(#sizes x #null): 22 s a call at 13,000 clusters x 120
    # permutations.  Distances are taken per size value exactly as per null cluster, so the
    # windows (and every output) are the same.
    sizes, size_of = np.unique(size_null, return_inverse=True)
    by_size = np.lexsort((null, size_of))
    sorted_null = null[by_size]
    counts = np.bincount(size_of, minlength=len(sizes))
    starts = np.r_[0, np.cumsum(counts)]
    size_max = np.maximum.reduceat(sorted_null, starts[:-1])
    for n in np.unique(n_unrelated[tested]):  # clusters of one size share their reference
        ln = np.log1p(float(n))
        here = n_unrelated == n
        floor = _tie_floor(scores[here])   # ties do not beat, and count as >=
        # a smaller null cluster's score counts scaled up to n members (compared: its raw score with floor * u / n)
        shrink = np.minimum(1.0, (sizes - 1.0) / float(n))
        # (n + 1) sizes within the factor by products, not a difference of logarithms: at
        # exactly the factor log rounding let in 3 and 7 unrelated but kept out 4 and 9
        in_window = (sizes <= SIZE_FACTOR * (n + 1.0)) & (n + 1.0 <= SIZE_FACTOR * sizes)
        n_window = int(counts[in_window].sum())
        if n_window < min_reference:   # widened to the nearest null clusters: by cluster, as before
            dist = np.abs(log_null - ln)
            ref = np.zeros(len(null), bool)
            ref[np.argsort(dist, kind="stable")[:min_reference]] = True
            window = in_window[size_of]   # the same sizes, per null cluster
            # with no null cluster of its size, "beat them all" would hold for any score: ask
            # it of the clusters it was compared with instead (none, with min_reference=0: beaten
            # as an empty null is; max() of nothing raised numpy's "zero-size array" error)
            asked = window if window.any() else ref
            beat[here] = (null[asked][None, :] < floor[:, None] * shrink[size_of[asked]][None, :]).all(1)
            ge = (null[ref][None, :] >= floor[:, None] * shrink[size_of[ref]][None, :]).sum(1)
            out[here] = (1.0 + ge) / (1.0 + ref.sum())
            n_ref[here] = ref.sum()
            continue
        ge = np.zeros(len(floor), np.int64)
        beat_here = np.ones(len(floor), bool)   # none with min_reference=0: beaten
        for g in np.nonzero(in_window)[0]:
            ge += counts[g] - np.searchsorted(sorted_null[starts[g]:starts[g + 1]], floor * shrink[g], side="left")
            beat_here &= size_max[g] < floor * shrink[g]
        beat[here] = beat_here
        out[here] = (1.0 + ge) / (1.0 + n_window)
        n_ref[here] = n_window
    return out, n_ref, beat


P_ROUNDING = 1e-9   # how far outside [0, 1] a p-value may round


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), in the input order.  A NaN p-value
    (no test) gets a NaN q-value and does not count among the m tests, as R's p.adjust
    does: before, one NaN made every q-value NaN (np.minimum carries NaN down the ranks)."""
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p-values must be a 1-D array, got shape {p.shape}")
    # a p-value summed from float parts may round a hair outside [0, 1]: that much is clipped;
    # more is a wrong input (a score, a log p), whose q-values would have been wrong in silence
    bad = np.flatnonzero((p < -P_ROUNDING) | (p > 1 + P_ROUNDING))
    if bad.size:
        raise ValueError(f"p-values must lie in [0, 1]; {bad.size} do not, first p[{bad[0]}] = {float(p[bad[0]])}")
    p = np.clip(p, 0.0, 1.0)
    out = np.full(len(p), np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    m = len(tested)
    if m == 0:
        return out
    order = tested[np.argsort(p[tested], kind="stable")]
    ranked = p[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1]
    out[order] = np.minimum(q, 1.0)
    return out
