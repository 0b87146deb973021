"""Pictures and patterns of a finding: exemplars, decoded centroid, contrast map, mask.

The contrast compares members with *content-matched* non-members in pixel space: for
each content class among the members, the mean of members of that content minus the
mean of pool images of the same content predicted as another class.  Content cancels,
the shared feature stays.  The mask is the Otsu threshold of |contrast| (no tuned
constant), so its area follows the pattern's.
"""
from __future__ import annotations

import numpy as np
import torch

from .checks import check_whole
from .cluster import FAR
from .data.sources import ImageSource


def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    v = values.ravel()
    if v.size == 0 or float(v.max()) == float(v.min()):
        return float(v.max()) if v.size else 0.0
    try:
        hist, edges = np.histogram(v, bins=bins)
    except ValueError:  # a range of a few fp32 ulps has no `bins` finite-width fp32 bins
        hist, edges = np.histogram(v.astype(np.float64), bins=bins)
    mids = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * mids) / np.maximum(w0, 1)
    m1 = (np.sum(hist * mids) - np.cumsum(hist * mids)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    # class 0 = bins 0..i, so the cut is bin i's upper edge (its midpoint would split the
    # bin: with a 1-pixel pattern all the background falls in bin 0 and half of it passed)
    return float(edges[1 + int(np.argmax(between[:-1]))]) if len(between) > 1 else float(mids[0])


def sorted_sample(indices: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``cap`` of ``indices`` (all of them, as given, when there are no more), drawn
    without replacement and sorted (reads stay in pool order)."""
    return np.sort(rng.choice(indices, cap, replace=False)) if len(indices) > cap else indices


def mean_images(source: ImageSource, indices: np.ndarray, cap: int, rng: np.random.Generator) -> torch.Tensor | None:
    if len(indices) == 0:
        return None
    return group_means(source, [sorted_sample(indices, cap, rng)])[0]


READ_BYTES = 1 << 26   # float32 image bytes one read of `group_means` holds (64 MiB)


def group_means(source: ImageSource, groups: list[np.ndarray]) -> list[torch.Tensor]:
    """The mean image of each (non-empty) array of pool indices in ``groups``, bit for bit
    ``source.get_batch(group)[0]``'s float64 mean in float32, from one read of the groups' union where
    it fits `READ_BYTES` (consecutive groups share reads while their union does).  A folder
    pool read through DALI (`spurfast.data.reread`) builds a pipeline per read, about 80 ms on
    a CPU, and a contrast map that read each sample as it drew it built two per content class
    of the finding's members (1.3-1.6 s a finding over 10 classes; 0.5 s read together)."""
    per_image = 4 * int(np.prod(source.image_shape))
    at_once = max(1, READ_BYTES // max(1, per_image))
    out: list[torch.Tensor] = []
    i = 0
    while i < len(groups):
        union, j = np.unique(np.asarray(groups[i], np.int64)), i + 1
        while j < len(groups):
            wider = np.union1d(union, np.asarray(groups[j], np.int64))
            if len(wider) > at_once:
                break
            union, j = wider, j + 1
        x, _ = source.get_batch(union)
        for g in groups[i:j]:
            rows = torch.as_tensor(np.searchsorted(union, g))
            out.append((image_sum(x, rows) / len(rows)).float())
        i = j
    return out


def image_sum(x: torch.Tensor, rows: torch.Tensor | None = None, chunk: int = 64) -> torch.Tensor:
    """float64 sum of the images ``x[rows]`` (all of them for None), ``chunk`` at a time.

    Summed in float32, a mean of 3 identical images and one of 7 came out a few ulps apart:
    a contrast of rounding residue everywhere, which `pattern_mask` took for a pattern (all of
    a constant image).  In float64 equal images give equal means, and the chunks keep the
    float64 copy small (a whole group of 1,024 images at 3 x 224 x 224 is 1.2 GB)."""
    n = len(x) if rows is None else len(rows)
    total = torch.zeros(x.shape[1:], dtype=torch.float64)
    for s in range(0, n, chunk):
        part = x[s:s + chunk] if rows is None else x[rows[s:s + chunk]]
        total += part.sum(0, dtype=torch.float64)
    return total


def contrast_map(source: ImageSource, members: np.ndarray, member_content: np.ndarray,
                 others: np.ndarray, other_content: np.ndarray, *, cap: int = 256, seed: int = 0,
                 budget: int | None = None):
    """(contrast (C,H,W) tensor, members' mean image) — members minus content-matched others.

    Up to ``cap`` others of each content class are read, and at most ``budget`` (default 16
    ``cap``) in all, plus one for each class whose share rounds to none: past the budget each
    class gets a share in proportion to its members (its weight in the contrast), at least one
    image.  Members of 1,000 content classes (an ImageNet pool)
    read 256,000 others per finding, 258 per member: longer than the pool pass itself over a
    hundred findings.  Pools of few classes (Fashion-MNIST: at most 9 x 256) read as before.
    Every sample is drawn first, then read together (`group_means`)."""
    check_whole(cap, "contrast_map: cap (images read per content class)")   # 0 drew nothing: a NaN contrast
    # no members subtracted the others' mean from None: a TypeError naming neither
    if len(members) == 0:
        raise ValueError("contrast_map: members is empty; a contrast needs at least one member image")
    for name, idx, content in (("members", members, member_content), ("others", others, other_content)):
        if len(idx) != len(content):
            raise ValueError(f"contrast_map: {len(idx)} {name} but {len(content)} content classes for them; "
                             f"expected one each")
    rng = np.random.default_rng(seed)
    classes, m_count = np.unique(member_content, return_counts=True)
    o_classes, o_count = np.unique(other_content, return_counts=True)   # one pass, not one per class
    per_class = np.zeros(len(classes), np.int64)
    if len(o_classes):
        at = np.minimum(np.searchsorted(o_classes, classes), len(o_classes) - 1)
        per_class = np.minimum(cap, np.where(o_classes[at] == classes, o_count[at], 0))
    budget = 16 * cap if budget is None else budget
    if per_class.sum() > budget:
        per_class = np.minimum(per_class, np.maximum(1, budget * m_count // m_count.sum()))
    # the draws in the order they were made when each sample was read as it was drawn
    pairs, weights = [], []
    for k, take in zip(classes, per_class):
        mk = members[member_content == k]
        ok = others[other_content == k]
        a = sorted_sample(mk, cap, rng) if len(mk) else None
        b = sorted_sample(ok, int(take), rng) if len(ok) else None
        if a is not None and b is not None:
            pairs += [a, b]
            weights.append(len(mk))
    mem = sorted_sample(members, 4 * cap, rng)
    if not weights:  # no content match possible: compare with all other-class images
        rest = sorted_sample(others, 4 * cap, rng) if len(others) else None
        means = group_means(source, [g for g in (mem, rest) if g is not None])
        if rest is None:
            return torch.zeros(source.image_shape), means[0]
        return means[0] - means[-1], means[0]
    means = group_means(source, pairs + [mem])
    total = torch.zeros(source.image_shape)
    for w, (a, b) in zip(weights, zip(means[0::2], means[1::2])):
        total += (a - b) * w
    return total / sum(weights), means[-1]


def neighbour_contrast(source: ImageSource, z: np.ndarray, members: np.ndarray, others: np.ndarray,
                       *, k: int = 3, cap: int = 256, seed: int = 0):
    """(contrast, members' mean image) for members without labels: members minus their k
    nearest other-class images in latent space.

    Unlabelled pools give no content to match on (the classifier's runner-up class says
    little about what an unrelated image shows); the latent neighbours of a member that
    the classifier puts elsewhere share its content and lack what pulled it into the class."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        # k = 0 matched nothing and divided by it: a contrast of NaN, and a mask of nothing
        raise ValueError(f"k must be a positive integer (neighbours per member), got {k!r}")
    check_whole(cap, "neighbour_contrast: cap (members read)")   # 0 read none: a bare torch.cat error
    rng = np.random.default_rng(seed)
    if len(members) == 0 or len(others) == 0:
        return torch.zeros(source.image_shape), mean_images(source, members, cap, rng)
    mem = sorted_sample(members, cap, rng)
    zo, zm = torch.as_tensor(z[others]), torch.as_tensor(z[mem])
    wide = torch.float64 if zo.dtype == torch.float64 else torch.float32
    zo, zm = zo.to(wide), zm.to(wide)
    # distances are shift-invariant, cdist's fp32 |a|^2 + |b|^2 - 2 a.b is not: latents far
    # from the origin for their spread (offset 1000, spread 0.1) had the terms cancel and
    # every member got arbitrary "nearest" others.  Such latents are measured about the
    # others' mean (an exact fp32 subtraction of nearby values); ordinary ones keep their bits.
    # float64 is shifted before it becomes fp32 (cast first, 1e8 + noise lost its digits).
    origin = zo.mean(0, dtype=torch.float64)
    spread = sum(float(((zo[s:s + 65536].double() - origin) ** 2).sum()) for s in range(0, len(zo), 65536)) / len(zo)
    if float(origin @ origin) > FAR * spread:
        zo, zm = zo - origin.to(wide), zm - origin.to(wide)
    zo_w, zm_w = zo, zm   # float64 latents keep their digits for the re-measure below
    zo, zm = zo.float(), zm.float()
    k = min(k, len(others))
    # the GEMM form errs by up to about (dim + 2) u (|a| + |b|)^2 in a squared distance, and
    # no one shift helps others made of a wide group and a tight one far from it: members in
    # the tight one got arbitrary "nearest" others.  A row whose k-th squared distance is not
    # 4096 x that error (beyond it a wrong pick is a near-tie, within 0.05%) is measured again
    # in float64 (from float64 latents as given: 1e8 + 0.01 noise were one fp32 point); fp32's
    # picks stay where they are as near (duplicated latents keep theirs).
    big = max(float(zo[s:s + 65536].double().norm(dim=1).max()) for s in range(0, len(zo), 65536))
    slack = 4 * (zo.shape[1] + 2) * 2.0 ** -24 * 1024
    nbr, zo64 = [], None
    for s in range(0, len(zm), 64):   # 64 x len(others) distances at a time
        d = torch.cdist(zm[s:s + 64], zo)
        if not bool(torch.isfinite(d).all()):   # latents of about 1e19 and up: fp32 squares overflowed
            d = torch.cdist(zm_w[s:s + 64].double(), zo_w.double())   # and the neighbours were ties of inf
        top = d.topk(k, largest=False)
        pick = top.indices
        near = torch.nonzero(top.values[:, -1].double() ** 2
                             <= slack * (zm[s:s + 64].double().norm(dim=1) + big) ** 2).flatten()
        for t in range(0, len(near), 16):   # float64: 16 rows at a time, no more memory than d's
            rows = near[t:t + 16]
            zo64 = zo_w.double() if zo64 is None else zo64
            exact = torch.cdist(zm_w[s + rows].double(), zo64, compute_mode="donot_use_mm_for_euclid_dist")
            best = exact.topk(k, largest=False)
            kept = (exact.gather(1, pick[rows]).sort(1).values == best.values).all(1)
            pick[rows[~kept]] = best.indices[~kept]
        nbr.append(pick.flatten())
    matched = others[torch.cat(nbr).numpy()]
    mem_mean = mean_images(source, mem, cap, rng)   # mem is already at most cap: no new draw
    b = torch.zeros(source.image_shape, dtype=torch.float64)
    for s in range(0, len(matched), 1024):   # repeats allowed: each member weighs the same
        x, _ = source.get_batch(matched[s:s + 1024])
        b += image_sum(x)
    return mem_mean - (b / len(matched)).float(), mem_mean


def contrast_magnitude(contrast) -> np.ndarray:
    """(H, W) how far the members differ from their others at each pixel (largest over channels)."""
    return torch.as_tensor(contrast).abs().amax(0).numpy()


def pattern_mask(contrast: torch.Tensor) -> np.ndarray:
    """(H, W) bool: pixels where the members differ most from their content-matched others."""
    mag = contrast_magnitude(contrast)
    if mag.size and float(mag.max()) == float(mag.min()):
        # the same difference everywhere (a 1-pixel image): all of it, where "above the
        # threshold" (the maximum) kept none and confirmation skipped an "empty" pattern
        return mag > 0
    return mag > otsu_threshold(mag)


def exemplars(z: np.ndarray, member_lists: list[np.ndarray], m: int, *, device: str = "cpu",
              backend: str | None = None) -> list[np.ndarray]:
    """Per finding (an ascending array of pool indices into ``z``), the ``m`` members nearest
    the members' mean latent in squared L2 (ties by index).

    One ``cluster_similarity`` call for every finding at once, each finding a group of one
    cluster: the op that picks a cluster's exemplars on the GPU (the CuPy kernel) or the
    CPU (the reference), whichever ``backend`` (None: the registry's choice) resolves to."""
    from . import backends

    sizes = [len(ms) for ms in member_lists]
    if sum(sizes) == 0 or m == 0:
        return [np.zeros(0, np.int64) for _ in member_lists]
    flat = np.concatenate([np.asarray(ms, np.int64) for ms in member_lists])
    x = torch.as_tensor(np.asarray(z[flat], np.float32), device=device)
    bounds = np.concatenate([[0], np.cumsum(sizes)])   # on the host: no copy back from the device
    offsets = torch.as_tensor(bounds, device=device)
    # each centroid in float64: the float32 mean of a large finding drifts by a few ulps,
    # enough to reorder members about equally near it
    centroids = torch.stack([x[a:b].double().mean(0) if b > a else x.new_zeros(x.shape[1], dtype=torch.float64)
                             for a, b in zip(bounds[:-1], bounds[1:])]).float()[:, None, :]
    ones = torch.ones(len(sizes), dtype=torch.int64, device=device)
    assign = torch.zeros(len(flat), dtype=torch.int64, device=device)
    _, picked, _, _ = backends.call("cluster_similarity", x, offsets, assign, centroids, ones, m, backend=backend)
    picked = picked[:, 0, :].cpu().numpy()
    return [flat[row[row >= 0]] for row in picked]


def linear_probe(z: np.ndarray, pos: np.ndarray, neg: np.ndarray, ridge: float = 1e-3):
    """Fisher discriminant (ridge-regularised) of pos vs neg latents.
    Returns (w, threshold): score = z @ w, positive side above the midpoint."""
    zp, zn = z[pos].astype(np.float64), z[neg].astype(np.float64)
    if not len(zp) or not len(zn):
        raise ValueError(f"linear_probe needs images on both sides, got {len(zp)} positive and {len(zn)} negative")
    mp, mn = zp.mean(0), zn.mean(0)

    def scatter(x):   # a single image scatters nowhere (np.cov of one row is NaN)
        return np.cov(x, rowvar=False) * (len(x) - 1) if len(x) > 1 else np.zeros((x.shape[1], x.shape[1]))
    cov = (scatter(zp) + scatter(zn)) / max(1, len(zp) + len(zn) - 2)
    cov = np.atleast_2d(cov)
    cov += ridge * (np.trace(cov) / len(cov) + 1e-12) * np.eye(len(cov))
    w = np.linalg.solve(cov, mp - mn)
    thr = 0.5 * (mp @ w + mn @ w)
    return w, float(thr)
