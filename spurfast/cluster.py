"""Batched per-class k-means: one Lloyd loop for all classes at once.

The algorithm lives here and is backend-agnostic; only the hot steps (assign, update,
similarity) go through `spurfast.backends`, whose providers share the signatures of
`spurfast.kernels.reference`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from . import backends
from .checks import real_number, whole_number
from .kernels import reference as ref
from .kernels.group_layout import check_points, non_integer_entries, wide_points

log = logging.getLogger("spurfast.cluster")


@dataclass
class KMeansResult:
    centroids: torch.Tensor      # (G, kmax, d) fp32, rows >= k_g unused
    assign: torch.Tensor         # (N,) int64 cluster index within the point's group (original order)
    dist: torch.Tensor           # (N,) fp32 to own centroid: squared L2 (cosine: 1 - cos); +inf in a k = 0 group
    k_per_group: torch.Tensor    # (G,) int64
    counts: torch.Tensor         # (G, kmax) int64
    n_iter: int
    inertia: float               # sum of ``dist`` over the groups with k >= 1
    reseeded: int                # empty clusters re-seeded over the run


def choose_k(sizes: np.ndarray, k: int, min_cluster_size: int, max_mean_size: int = 0, max_k: int = 0) -> np.ndarray:
    """k per group: k, raised so clusters hold at most ``max_mean_size`` points on average
    (0: never raised) but not above ``max_k`` (0: no cap; never below k), and lowered so
    they hold at least ``min_cluster_size``.  The cap keeps clustering linear in the class
    size: without it k grows with the class, and seeding plus Lloyd cost N_g * k_g."""
    sizes = np.asarray(sizes)
    # a setting past int64 (--k 1e20) overflowed numpy after the neighbour search; any value
    # above every group's size acts as that size does, so int64's largest is the same setting
    top = np.iinfo(np.int64).max
    k, min_cluster_size, max_mean_size, max_k = (min(int(v), top) for v in (k, min_cluster_size, max_mean_size, max_k))
    want = np.maximum(k, -(-sizes // max_mean_size)) if max_mean_size > 0 else np.full(sizes.shape, k)
    if max_k > 0:
        want = np.minimum(want, max(k, max_k))
    return np.clip(np.minimum(want, sizes // max(1, min_cluster_size)), np.minimum(sizes, 1), None).astype(np.int64)


def sort_by_group(groups: torch.Tensor, n_groups: int):
    """Stable order that sorts points by group, and the CSR offsets."""
    order = torch.argsort(groups, stable=True)
    counts = torch.bincount(groups, minlength=n_groups)
    offsets = torch.zeros(n_groups + 1, dtype=torch.int64, device=groups.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return order, offsets


# Set by `spurfast.distributed.kmeans_across_ranks`: a function with batched_kmeans's
# signature that runs the Lloyd loop over every rank of a torch.distributed group
# (all-reduced centroid sums and counts).  None: this process clusters alone.
kmeans_hook = None


class Solo:
    """Who shares one Lloyd loop: this process alone, so every operation is the identity.
    `spurfast.distributed.RankTeam` has the same methods over the ranks of a process group
    (each assigns every W-th point; partial sums all-reduced; rank 0's decisions broadcast)."""

    rank = 0

    def local_positions(self, n: int):
        """Rows of the n group-sorted points this process assigns (None: all of them)."""
        return None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over the team (``t`` itself is left as it is)."""
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``t`` on every member."""
        return t

    def agree(self, flag: bool) -> bool:
        """Rank 0's decision on every member."""
        return flag

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """The full (n, ...) tensor from every member's rows."""
        return local


SOLO = Solo()


def check_seed(seed) -> int:
    """``seed`` as an int in [0, 2**64) (`whole_number`: 8.0 too): torch's generator refused
    2**64 with "Overflow when unpacking long long", naming nothing, and ran 1.7 as 1."""
    value = whole_number(seed, "seed")
    if not 0 <= value < 2 ** 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed!r}")
    return value


def check_input(x: torch.Tensor, groups, k_per_group, n_groups: int | None = None, init=None):
    """Validate a k-means problem before any work (or any message to other ranks).
    Returns (groups int64 tensor, k_per_group int64 tensor, G)."""
    if x.dim() != 2:
        raise ValueError(f"x must be (N, d), got {tuple(x.shape)}")
    # one pass: |x|^2 in fp32 is finite and small enough exactly where the distances are
    xf = x.float()
    ref.check_rows(x, torch.linalg.vecdot(xf, xf), "k-means input has {bad} rows with NaN/inf; clean the latents first",
                   "k-means input")
    # a list through numpy: torch would hold Python floats in fp32, rounding ids past 2**24
    groups = torch.as_tensor(groups if isinstance(groups, torch.Tensor) else np.asarray(groups), device=x.device)
    if groups.dim() != 1:   # an (N, 1) column failed in torch.bincount, naming nothing
        raise ValueError(f"groups has shape {tuple(groups.shape)}; expected one group id per point, ({len(x)},)")
    bad = non_integer_entries(groups)   # the int64 cast truncated 0.5 to group 0, showed 1e30 as -2**63
    if len(bad):
        raise ValueError(f"group ids must be integers; {len(bad)} are not, e.g. groups[{int(bad[0])}] = "
                         f"{groups[bad[0]].item()}")
    groups = groups.to(torch.int64)
    if len(groups) != len(x):
        raise ValueError(f"{len(groups)} group ids for {len(x)} points")
    if n_groups is not None:   # int() ran n_groups=2.9 as 2 groups, and a negative one fell to the id check
        n_groups = whole_number(n_groups, "n_groups")
        if n_groups < 0:
            raise ValueError(f"n_groups must be an integer >= 0, got {n_groups}")
    G = n_groups if n_groups is not None else (int(groups.max()) + 1 if len(groups) else 0)
    if len(groups) and (int(groups.min()) < 0 or int(groups.max()) >= G):
        bad = ((groups < 0) | (groups >= G)).nonzero().flatten()
        raise ValueError(f"group ids must lie in [0, {G}); {len(bad)} do not, e.g. groups[{int(bad[0])}] = "
                         f"{int(groups[bad[0]])}")
    k = np.asarray(k_per_group.detach().cpu() if isinstance(k_per_group, torch.Tensor) else k_per_group)
    if k.ndim != 1:
        raise ValueError(f"k_per_group has shape {k.shape}; expected one k per group")
    if k.dtype.kind not in "biuf":
        raise ValueError(f"k_per_group has dtype {k.dtype}; expected non-negative integers")
    kf = k.astype(np.float64)
    wrong = np.flatnonzero(~np.isfinite(kf) | (kf != np.round(kf)) | (kf < 0))
    if wrong.size:
        g = int(wrong[0])
        raise ValueError(f"k_per_group[{g}] = {k[g]}: expected a non-negative integer")
    if len(k) != G:
        raise ValueError(f"k_per_group has {len(k)} entries for {G} groups")
    sizes = torch.bincount(groups.cpu(), minlength=G)
    # compared before the int64 cast, which turned 1e30 into -2**63 and let it past
    too_big = np.flatnonzero(kf > sizes.numpy())
    if too_big.size:
        g = int(too_big[0])
        raise ValueError(f"k={k[g]} is larger than group {g}'s {int(sizes[g])} members")
    kpg = torch.as_tensor(k.astype(np.int64), dtype=torch.int64, device=x.device)
    if init is not None:
        check_init(init, G, kpg, x.shape[1])
    return groups, kpg, G


def check_init(init, G: int, kpg: torch.Tensor, d: int) -> None:
    """``init`` must hold finite (G, kmax, d) starting centroids, kmax = max k_g (at least 1)."""
    kmax = max(1, int(kpg.max())) if G else 1
    if not isinstance(init, torch.Tensor) or tuple(init.shape) != (G, kmax, d):
        got = tuple(init.shape) if isinstance(init, torch.Tensor) else type(init).__name__
        raise ValueError(f"init has shape {got}; expected (G, kmax, d) = ({G}, {kmax}, {d}), kmax = max(k_per_group)")
    if init.numel():
        # NaN/inf, and as x's rows: a centroid past fp32's |c|^2 made every distance to it inf (l2)
        # or, normalised by an inf norm, a zero vector (cosine), and its points went elsewhere without a word
        flat = init.detach().reshape(-1, d).float()
        ref.check_rows(flat, torch.linalg.vecdot(flat, flat), "init has {bad} NaN/inf centroids", "init")


def batched_kmeans(
    x: torch.Tensor,
    groups: torch.Tensor,
    k_per_group,
    *,
    n_groups: int | None = None,
    n_iter: int = 50,
    tol: float = 1e-6,
    seed: int = 0,
    metric: str = "l2",
    init: torch.Tensor | None = None,
    backend: str | None = None,
) -> KMeansResult:
    """Lloyd's k-means within every group at once.

    x: (N, d); groups: (N,) int64 in [0, G); k_per_group: (G,) ints (k_g <= group size).
    init: optional (G, kmax, d) starting centroids (else batched k-means++ from ``seed``).
    Empty clusters are re-seeded with the point of their group farthest from its centroid.
    Deterministic for a given seed and backend.
    """
    # k-means is not differentiable: features straight from a model (requires_grad) crashed
    # the L2 paths ("Can't call numpy() on Tensor that requires grad"; torch: cumsum's out=);
    # a numpy x (taken for groups and k) failed on x.dim() with an AttributeError naming nothing
    x = torch.as_tensor(x).detach()
    check_points(x)   # complex points lost their imaginary part in the fp32 cast
    # integers as float64, which lloyd shifts near each group before the fp32 cast (cast
    # first, 1e9 + {0, 1} and 1e9 + {6, 7} were one point)
    x = wide_points(x)
    # nor are starting centroids: an init that requires grad gave centroids that did too
    # (their .numpy() raised, and every iteration's torch.where joined an autograd graph)
    init = None if init is None else torch.as_tensor(init).detach()
    seed = check_seed(seed)
    # n_iter -1 ran as 0 (the seeds as centroids) without a word; 2.5, None and tol "0.1"
    # failed in range() or a comparison, naming nothing (a negative tol never stops early)
    n_iter = whole_number(n_iter, "n_iter")
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    tol = real_number(tol, "tol")
    if tol != tol:
        raise ValueError("tol must be a number, got nan")
    if kmeans_hook is not None:
        return kmeans_hook(x, groups, k_per_group, n_groups=n_groups, n_iter=n_iter, tol=tol, seed=seed,
                           metric=metric, init=init, backend=backend)
    groups, kpg, G = check_input(x, groups, k_per_group, n_groups, init=init)
    return lloyd(x, groups, kpg, G, n_iter=n_iter, tol=tol, seed=seed, metric=metric, init=init, backend=backend)


def lloyd(x, groups, kpg, G, *, n_iter, tol, seed, metric, init, backend, team=SOLO) -> KMeansResult:
    """The Lloyd loop over checked input (see `check_input`).  ``team`` says which points
    this process assigns and combines the partial sums, counts and inertia; every member
    ends with the same centroids and the full assignment."""
    dev = x.device
    provider = backends.resolve("kmeans_assign", backend, dev.type)[0]
    # a backend named for the run that serves the assignment alone (triton) leaves the
    # update to its usual choice, as SPURFAST_BACKEND_KMEANS_ASSIGN=triton does; an explicit
    # "auto" is a choice too: it beats SPURFAST_BACKEND_KMEANS_UPDATE as it does for the assignment
    upd_backend = backend if backend == "auto" or backend in {p.name for p in backends.providers("kmeans_update")} \
        else None
    order, offsets = sort_by_group(groups, G)
    kmax = max(1, int(kpg.max())) if G else 1
    xs = x[order].contiguous()
    if metric == "cosine":
        xs = torch.nn.functional.normalize(xs.float(), dim=1)
    N, d = xs.shape
    gid = ref.group_ids(offsets)
    # L2 k-means is shift-invariant within a group, fp32 scores |c|^2 - 2 x.c are not: a
    # group far from the origin for its spread (offset 100, spread 0.01) had them cancel,
    # its points went to arbitrary centroids and the loop never settled.  Such groups are
    # clustered about one of their points; every other group keeps its bits.  float64
    # points are shifted before they become fp32 (cast first, 1e8 and 1e8 + 1 were one point).
    origin = _far_offsets(xs, offsets, gid, team) if metric == "l2" else None
    if origin is not None:
        xs = (xs - origin[gid]).float() if xs.dtype == torch.float64 else xs.float() - origin[gid]
    if xs.is_cuda and xs.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        xs = xs.float()   # the CUDA kernels take these only (the CPU paths compute in fp32 anyway)
    if team.rank == 0:
        gen = torch.Generator().manual_seed(int(seed))
        if init is not None:
            cent = init.to(dev)
            cent = (cent.to(origin.dtype) - origin.unsqueeze(1)).float() if origin is not None else cent.float().clone()
        else:
            cent = _seeding(provider, backend, dev.type)(xs, offsets, kpg, kmax, gen)
        cent = cent.contiguous()
    else:
        cent = torch.empty(G, kmax, d, dtype=torch.float32, device=dev)
    cent = team.broadcast(cent)  # identical initial centroids on every member
    if xs.dtype in (torch.float16, torch.bfloat16) and cent.numel() and \
            float(cent.abs().max()) > torch.finfo(xs.dtype).max:
        # a 16-bit kernel meets the centroids rounded to the points' dtype: one past its range
        # (a user's init) became inf, scored NaN and could never win
        xs = xs.float()
    loc = team.local_positions(N)
    if loc is None:
        xl, gid_l, off_l = xs, gid, offsets
    else:
        loc = loc.to(dev)
        xl, gid_l = xs[loc].contiguous(), gid[loc]
        off_l = torch.zeros(G + 1, dtype=torch.int64, device=dev)
        off_l[1:] = torch.cumsum(torch.bincount(gid_l, minlength=G), 0)
    valid_k = torch.arange(kmax, device=dev).unsqueeze(0) < kpg.unsqueeze(1)
    # |x|^2 once per fit: the CPU reference needs it for each winner's distance
    xn = torch.linalg.vecdot(xl.float(), xl.float()) if metric == "l2" else None
    fused = _fused_step(provider, backend, dev.type)
    if fused is not None:
        # a provider whose step can check and convert the fixed arguments once says so
        prepare = getattr(fused, "prepare", None)
        step = prepare(xl, off_l, kpg, kmax, metric, x_sqnorm=xn) if prepare is not None else \
            (lambda c: fused(xl, off_l, c, kpg, metric, x_sqnorm=xn))
    else:   # the assignment alone; its fixed arguments checked once where the provider can (triton)
        prepare = getattr(backends.resolve("kmeans_assign", backend, dev.type)[1], "prepare", None)
        assign_step = prepare(xl, off_l, kpg, kmax, metric, x_sqnorm=xn) if prepare is not None else \
            (lambda c: backends.call("kmeans_assign", xl, off_l, c, kpg, metric, x_sqnorm=xn, backend=backend))
    reseeded, prev, it = 0, None, 0
    sums_l = counts_l = prev_assign = None   # the first update is a full one
    for it in range(1, n_iter + 1):
        if fused is not None:
            assign_l, dist_l, sums_l, counts_l = step(cent)
            sums_l = sums_l.double()
        else:
            assign_l, dist_l = assign_step(cent)
            sums_l, counts_l = _update(xl, off_l, gid_l, assign_l, prev_assign, sums_l, counts_l, kmax,
                                       upd_backend)
        prev_assign = assign_l
        sums, counts = team.all_reduce(sums_l), team.all_reduce(counts_l)
        d_l = _counted(dist_l)
        inertia_t = team.all_reduce(d_l.sum().reshape(1))
        # and per group, for the stopping test: from one float64 prefix sum (deterministic on
        # every device, no atomics)
        cum = torch.zeros(len(d_l) + 1, dtype=torch.float64, device=dev)
        cum[1:] = d_l.cumsum(0)
        inertia_g = team.all_reduce(cum[off_l[1:]] - cum[off_l[:-1]])
        new = (sums / counts.clamp_min(1).unsqueeze(-1)).float()
        if metric == "cosine":
            new = torch.nn.functional.normalize(new, dim=-1)
        empty = (counts == 0) & valid_k
        new = torch.where(empty.unsqueeze(-1), cent, new)   # empty clusters stay put until re-seeded
        # the three numbers the loop decides on, brought to the host together: one device
        # sync per iteration on a GPU, not three (the shift before any re-seeding: an
        # iteration that re-seeds never stops the loop; one whose empty clusters no point
        # can fill, a group with fewer distinct points than k, may)
        # tol relative to each group's own inertia: one test over the sums let a large group
        # that settled at once stop a small one still moving (a class of 300 points beside one
        # of 100,000: 3 iterations instead of 15, 45 points assigned otherwise than alone)
        shift_g = ((new - cent) ** 2).sum(-1).double().masked_fill(~valid_k, 0.0).sum(1)
        inertia, any_empty, moving = torch.stack(
            [inertia_t[0], empty.any().double(), (shift_g > tol * inertia_g.abs()).any().double()]).tolist()
        filled = _reseed(xs, gid, team.gather_rows(dist_l, N), empty, new, metric, valid_k,
                         team.gather_rows(assign_l, N) if metric == "cosine" else None) if any_empty else 0
        reseeded += filled
        cent = team.broadcast(new.contiguous())  # bitwise-identical centroids everywhere
        # tol relative to the inertia, with no floor: max(1, inertia) made it absolute below an
        # inertia of 1, and points merely scaled by 1e-3 stopped after 3 iterations, unconverged
        # (inertia 4% above the unscaled run's).  Stable assignments leave the shift exactly 0.
        if team.agree(not filled and prev is not None and (not moving or prev == inertia)):
            break
        prev = inertia
    assign_l, dist_l = backends.call("kmeans_assign", xl, off_l, cent, kpg, metric, x_sqnorm=xn, backend=backend)
    _, counts_l = backends.call("kmeans_update", xl, off_l, assign_l, kmax, backend=upd_backend)
    # a group given k = 0 has no cluster: its points (assign 0, distance +inf) were counted
    # as members of a cluster 0 it does not have
    counts = team.all_reduce(counts_l).masked_fill(~valid_k, 0)
    inertia = float(team.all_reduce(_counted(dist_l).sum().reshape(1)))
    assign, dist = team.gather_rows(assign_l, N), team.gather_rows(dist_l, N)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(N, device=dev)
    if origin is not None:
        cent = cent + origin.float().unsqueeze(1)
    return KMeansResult(cent, assign[inv], dist[inv], kpg, counts, it, inertia, reseeded)


FAR = 1e4   # |x1|^2 over the median |x - x1|^2 of a group beyond which its fp32 scores lose digits


def _counted(dist: torch.Tensor) -> torch.Tensor:
    """float64 distances as the inertia counts them: points of a group given k = 0 have no
    centroid (distance +inf) and are no one's (counted, the inertia was +inf and every group
    stopped after two iterations)."""
    return dist.double().nan_to_num(posinf=0.0)


SPREAD_SAMPLE = 255   # points of a group (evenly strided) that its spread test reads


def _median_sq_dist(pts, anchor, gid, offsets):
    """Per group of ``pts`` (contiguous groups): the median |x - x_anchor|^2 and the row of
    the point that has it.  Two stable sorts: by distance, then by group."""
    r = pts - pts[anchor][gid]   # x - x0 is exact-ish: no cancellation to fear here
    r2 = torch.linalg.vecdot(r, r)
    by_dist = torch.argsort(r2, stable=True)
    by_group = by_dist[torch.argsort(gid[by_dist], stable=True)]   # each group's run, nearest first
    mid = by_group[(offsets[:-1] + offsets.diff() // 2).clamp_max(max(len(pts) - 1, 0))]
    return r2[mid], mid


def _far_offsets(xs, offsets, gid, team=SOLO):
    """(G, d) fp32 (float64 for float64 points): a typical point x1 of each group (of two
    points or more) far from the origin for its spread (|x1|^2 > FAR x the group's median
    |x - x1|^2), zero rows for the other groups; None when no group is far.  Medians, not
    means: one far outlier raised a group's mean spread past the test, and the fp32
    cancellation it guards against then clustered the rest at random.  x1 is the point at
    the median distance from the group's first point, so an outlier first is not the
    anchor.  Read on at most SPREAD_SAMPLE evenly strided points a group (a threshold test:
    an estimate will do; all N points took half the time of a fit); rank 0's answer on
    every member."""
    N, d = xs.shape
    if N == 0:
        return None
    n = offsets.diff()
    wide = torch.float64 if xs.dtype == torch.float64 else torch.float32
    m = n.clamp_max(SPREAD_SAMPLE)
    s_off = torch.zeros_like(offsets)
    torch.cumsum(m, 0, out=s_off[1:])
    s_gid = ref.group_ids(s_off)
    step = torch.arange(len(s_gid), device=xs.device) - s_off[:-1][s_gid]
    pts = xs[offsets[:-1][s_gid] + step * n[s_gid] // m[s_gid]].to(wide)
    _, x1_row = _median_sq_dist(pts, s_off[:-1].clamp_max(max(len(pts) - 1, 0)), s_gid, s_off)
    spread, _ = _median_sq_dist(pts, x1_row, s_gid, s_off)
    x1 = pts[x1_row]
    far = (n > 1) & (torch.linalg.vecdot(x1, x1) > FAR * spread)   # one point: nothing to split
    if not team.agree(bool(far.any())):
        return None
    return team.broadcast(torch.where(far.unsqueeze(1), x1, torch.zeros_like(x1)).contiguous())


def _seeding(provider: str, backend: str | None = None, device: str | None = None):
    """k-means++ from the assignment's provider where it has one, else the reference.
    Without a ``backend`` named for the whole run, a SPURFAST_BACKEND_KMEANS_PLUSPLUS (or
    SPURFAST_BACKEND) choice decides, as for every op (a bad one raises)."""
    if not backend and backends.requested("kmeans_plusplus") != "auto":
        return backends.resolve("kmeans_plusplus", None, device)[1]
    return backends.companion("kmeans_plusplus", provider) or ref.kmeans_plusplus


def _fused_step(provider: str, backend: str | None = None, device: str | None = None):
    """The one-pass assign + update of the provider the assignment resolved to, if it has
    one.  Not the reference's: it only composes the two ops, and run separately they let
    `_update` add the points that moved alone.  Without a ``backend`` named for the whole
    run, the variables decide: SPURFAST_BACKEND_KMEANS_ASSIGN_UPDATE naming another
    provider runs that one's step; SPURFAST_BACKEND_KMEANS_UPDATE naming another runs the
    two ops apart (the update on it).  The global SPURFAST_BACKEND alone does not pick the
    fused step: the assignment's provider already follows it unless the assignment's own
    variable overrides it (SPURFAST_BACKEND=cpu with SPURFAST_BACKEND_KMEANS_ASSIGN=torch
    ran every iteration's assignment on the cpu kernel's fused step)."""
    if not backend:
        want = backends.requested_for_op("kmeans_assign_update") or "auto"
        if want not in ("auto", provider):
            return backends.resolve("kmeans_assign_update", None, device)[1]
        if backends.requested("kmeans_update") not in ("auto", provider):
            return None
    return None if provider == "torch" else backends.companion("kmeans_assign_update", provider)


_MOVED_FRACTION = 0.25  # above this share of moved points a full update is cheaper


def _update(xs, offsets, gid, assign, prev_assign, sums, counts, kmax, backend):
    """Per-cluster sums (fp64) and counts for ``assign``.

    After the first iterations few points change cluster, so the previous sums are
    corrected by the movers only: the backend's update on the movers under their new
    cluster minus the same under their old one.  Same Lloyd step, a fraction of the reads;
    the fp64 accumulator keeps the corrections exact to fp32 rounding of each delta."""
    if prev_assign is not None:
        moved = (assign != prev_assign).nonzero().flatten()
        if len(moved) <= _MOVED_FRACTION * len(assign):
            if len(moved) == 0:
                return sums, counts
            G = len(offsets) - 1
            sub_off = torch.zeros(G + 1, dtype=torch.int64, device=xs.device)
            sub_off[1:] = torch.cumsum(torch.bincount(gid[moved], minlength=G), 0)
            xm = xs[moved]
            add, n_add = backends.call("kmeans_update", xm, sub_off, assign[moved], kmax, backend=backend)
            sub, n_sub = backends.call("kmeans_update", xm, sub_off, prev_assign[moved], kmax, backend=backend)
            return sums + (add.double() - sub.double()), counts + (n_add - n_sub)
    full, counts = backends.call("kmeans_update", xs, offsets, assign, kmax, backend=backend)
    return full.double(), counts


def _reseed(xs, gid, dist, empty, cent, metric: str = "l2", valid_k=None, assign=None) -> int:
    """Move each empty cluster onto the farthest point of its group (one per cluster);
    returns how many it moved.  Only points away from their centroid (distance > 0) can
    fill one: a point on its centroid would tie with it and leave the cluster empty (a
    group with fewer distinct points than k), so such clusters stay where they are.
    Under cosine an all-zero row cannot either: it is at distance 1 from every centroid,
    itself included (re-seeded onto it every iteration, the cluster stayed empty and the
    loop never stopped before n_iter).  ``valid_k``: (G, kmax) bool, the centroid rows in
    use (the others hold zeros, which are no centroid to be on); ``assign``: (N,) each
    point's cluster (given under cosine: which clusters hold a point that can fill one)."""
    n = 0
    d = dist.clone()
    can_fill = xs.ne(0).any(1) if metric == "cosine" else torch.ones(len(xs), dtype=torch.bool, device=xs.device)
    d[~can_fill] = -1.0
    room = {}
    for g, j in empty.nonzero().tolist():
        if valid_k is not None:
            if g not in room:
                # as many clusters as distinct points: each point is on its centroid and no
                # re-seeding can fill one, though fp32 sums of many copies of a point leave
                # its centroid an ulp off it, beyond the bitwise test below (1,000 copies of
                # 3 points, k = 8, d = 64 re-seeded every iteration and ran all n_iter).
                # Under cosine only non-zero points count, on both sides: an all-zero row fills
                # nothing, and a cluster of zero rows alone holds no point that could (one zero
                # row beside 3 points' copies, k = 8, still ran all n_iter)
                if assign is not None:
                    mine = (gid == g) & can_fill
                    used = torch.zeros_like(valid_k[g])
                    used[assign[mine]] = True
                else:
                    mine, used = gid == g, valid_k[g] & ~empty[g]
                pts = xs[mine]
                # points of no dimension are one point (torch.unique refuses a 0-wide tensor)
                room[g] = (len(torch.unique(pts, dim=0)) if pts.shape[1] else min(len(pts), 1)) - int(used.sum())
            if room[g] <= 0:
                continue
        cand = torch.where((gid == g) & (d > 0), d, torch.full_like(d, -1.0))
        i = int(torch.argmax(cand)) if len(cand) else 0
        # a point equal to a centroid of its group is on it, whatever its fp32 distance says
        # (|x|^2 - 2 x.c + |c|^2 left about 1e-13: 3 distinct points and k = 8 re-seeded
        # every iteration and never stopped before n_iter)
        if not len(cand) or not float(cand[i]) > 0:
            continue
        # (rows past the group's k hold zeros, no centroid: an all-zero point, such as the
        # first point of a shifted far group, could never fill an empty cluster)
        on = (cent[g] == xs[i].float()).all(1)
        if bool((on if valid_k is None else on & valid_k[g]).any()):
            continue
        cent[g, j] = xs[i].float()
        d[i] = -1.0
        n += 1
        if valid_k is not None:
            room[g] -= 1
    return n
