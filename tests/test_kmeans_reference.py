"""The reference batched k-means (torch backend) against scikit-learn, brute force and a
per-group loop; edge cases and bad input.  CPU only, well under a minute."""
from __future__ import annotations
import re

import numpy as np
import pytest
import torch

from spurfast import backends
from spurfast.cluster import batched_kmeans, sort_by_group
from spurfast.kernels import reference as ref
from tests.helpers import EMPTY_CASES, assert_bitwise, assert_close, assert_equal_int, assert_same_outputs, empty_case


# ----------------------------------------------------------------------------- helpers
def blobs(n_per, k, d, seed, spread=0.05, scale=1.0):
    """k well-separated blobs (centres on a scaled simplex-like random draw)."""
    g = np.random.default_rng(seed)
    centres = g.normal(size=(k, d)) * scale
    # push centres apart so every blob is far from every other one
    centres += 4.0 * np.eye(k, d) * scale if k <= d else 0.0
    x = np.concatenate([centres[j] + spread * g.normal(size=(n_per, d)) for j in range(k)])
    perm = g.permutation(len(x))
    return x[perm].astype(np.float32), centres


def csr(sizes):
    off = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(torch.as_tensor(sizes, dtype=torch.int64), 0)
    return off


def brute_assign(x, offsets, cent, kpg, metric="l2"):
    """float64 distances of each point to each valid centroid of its group (list per point)."""
    x = x.double().numpy()
    c = cent.double().numpy()
    out = []
    for g in range(len(offsets) - 1):
        k = int(kpg[g])
        for i in range(int(offsets[g]), int(offsets[g + 1])):
            if metric == "l2":
                D = ((x[i] - c[g, :k]) ** 2).sum(1)
            else:
                xn = x[i] / max(np.linalg.norm(x[i]), 1e-12)
                cn = c[g, :k] / np.maximum(np.linalg.norm(c[g, :k], axis=1, keepdims=True), 1e-12)
                D = 1.0 - cn @ xn
            out.append(D)
    return out


def check_assign(assign, dist, D_list, tol=1e-4):
    """Each point's chosen centroid is a nearest one (up to fp32 rounding) and the reported
    distance matches; where the nearest is clear by more than tol the index must agree."""
    a = assign.numpy()
    dv = dist.double().numpy()
    bad_choice, bad_dist = [], []
    for i, D in enumerate(D_list):
        best = D.min()
        scale = 1.0 + abs(best)
        if D[a[i]] > best + tol * scale:
            bad_choice.append(i)
        if abs(dv[i] - D[a[i]]) > tol * (1.0 + abs(D[a[i]])) * 10:
            bad_dist.append(i)
    assert not bad_choice, f"{len(bad_choice)} points not assigned to a nearest centroid, first {bad_choice[:5]}"
    assert not bad_dist, f"{len(bad_dist)} distances off, first {bad_dist[:5]}"


def random_groups(sizes, kmax, d, seed, k_rule=None):
    g = torch.Generator().manual_seed(seed)
    N = int(sum(sizes))
    x = torch.randn(N, d, generator=g)
    off = csr(sizes)
    kpg = torch.tensor([min(kmax, s) if k_rule is None else k_rule(s) for s in sizes], dtype=torch.int64)
    cent = torch.randn(len(sizes), kmax, d, generator=g)
    return x, off, cent, kpg


# ----------------------------------------------------------------------------- assign
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("sizes,kmax,d", [
    ([3000], 17, 33),                 # one large group (chunked, unpadded path), odd d
    ([2500, 1, 0, 40, 7, 2049], 9, 67),  # large + small + empty + one-point groups
    ([5, 3, 0, 11], 4, 16),
])
def test_assign_matches_brute_force(metric, sizes, kmax, d):
    x, off, cent, kpg = random_groups(sizes, kmax, d, seed=len(sizes) + d)
    assign, dist = ref.kmeans_assign(x, off, cent, kpg, metric)
    assert assign.dtype == torch.int64 and dist.dtype == torch.float32
    assert assign.shape == (x.shape[0],) and dist.shape == (x.shape[0],)
    gid = ref.group_ids(off)
    assert bool((assign < kpg[gid]).all()) and bool((assign >= 0).all())
    check_assign(assign, dist, brute_assign(x, off, cent, kpg, metric))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_assign_row_halves_in_threads_match_brute_force(metric, monkeypatch):
    """Small CPU chunks so that large groups split into thread halves of several chunks,
    each ending in a partial chunk (odd sizes)."""
    monkeypatch.setattr(ref, "_CHUNK_CPU", 256 * 17)
    parts = []
    split = ref._split_rows

    def counting(fn, lo, hi, min_rows):
        out = split(fn, lo, hi, min_rows)
        parts.append(len(out))
        return out

    monkeypatch.setattr(ref, "_split_rows", counting)
    x, off, cent, kpg = random_groups([3001, 2049, 5, 0], 17, 23, seed=11)
    assign, dist = ref.kmeans_assign(x, off, cent, kpg, metric)
    check_assign(assign, dist, brute_assign(x, off, cent, kpg, metric))
    assert parts == [2, 2]   # both large groups ran as two thread halves
    a2, d2 = ref.kmeans_assign(x, off, cent, kpg, metric)
    assert_equal_int(a2, assign, "assign on a second run")
    assert_bitwise(d2, dist, "dist on a second run")


def test_assign_thousand_groups_and_padding_masks_unused_centroids():
    sizes = np.random.default_rng(3).integers(0, 25, size=1000)
    sizes[:5] = [1, 0, 2, 24, 0]
    x, off, cent, kpg = random_groups(sizes.tolist(), 6, 19, seed=5)
    # unused padded rows sit on top of the points: a kernel that reads them would pick them
    for g in range(len(sizes)):
        k = int(kpg[g])
        if k < 6 and sizes[g] > 0:
            cent[g, k:] = x[int(off[g])]
    assign, dist = ref.kmeans_assign(x, off, cent, kpg)
    check_assign(assign, dist, brute_assign(x, off, cent, kpg))


def test_assign_ties_go_to_lower_index():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]] * 700)   # 2100 points: the large-group path
    cent = torch.tensor([[[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]])
    for sizes in ([2100], [2100 - 6, 6]):
        off = csr(sizes)
        kpg = torch.tensor([4] * len(sizes))
        c = cent.expand(len(sizes), 4, 2).contiguous()
        assign, dist = ref.kmeans_assign(x, off, c, kpg)
        exp = torch.tensor([2, 0, 0] * 700)
        assert_equal_int(assign, exp, "assign with exact ties")
        assert_close(dist, torch.tensor([0.0, 1.0, 1.0] * 700), name="dist with ties")


def test_assign_empty_input_and_bad_metric():
    off = torch.zeros(4, dtype=torch.int64)
    a, d = ref.kmeans_assign(torch.zeros(0, 5), off, torch.zeros(3, 2, 5), torch.zeros(3, dtype=torch.int64))
    assert a.shape == (0,) and d.shape == (0,)
    with pytest.raises(ValueError, match="metric must be 'l2' or 'cosine', got 'manhattan'"):
        ref.kmeans_assign(torch.zeros(3, 2), csr([3]), torch.zeros(1, 1, 2), torch.ones(1, dtype=torch.int64),
                          "manhattan")
    with pytest.raises(ValueError, match="offsets has 2 entries; expected G \\+ 1 = 3"):
        ref.kmeans_assign(torch.zeros(3, 2), csr([3]), torch.zeros(2, 1, 2), torch.ones(2, dtype=torch.int64))


# ----------------------------------------------------------------------------- update
@pytest.mark.parametrize("split_rows", [None, 16])   # 16: rows split into two thread halves
def test_update_matches_per_cluster_sums_and_reports_empty(split_rows, monkeypatch):
    if split_rows:
        monkeypatch.setattr(ref, "_UPDATE_SPLIT_ROWS", split_rows)
    sizes = [5, 0, 130, 1]
    x, off, _, _ = random_groups(sizes, 4, 21, seed=2)
    assign = torch.tensor([0, 0, 2, 2, 2] + [i % 3 for i in range(130)] + [0])   # cluster 3 empty everywhere
    for det in (True, False):
        sums, counts = ref.kmeans_update(x, off, assign, 4, deterministic=det)
        assert sums.shape == (4, 4, 21) and counts.shape == (4, 4) and counts.dtype == torch.int64
        exp_s = torch.zeros(4, 4, 21, dtype=torch.float64)
        exp_c = torch.zeros(4, 4, dtype=torch.int64)
        gid = ref.group_ids(off)
        for i in range(len(x)):
            exp_s[gid[i], assign[i]] += x[i].double()
            exp_c[gid[i], assign[i]] += 1
        assert_equal_int(counts, exp_c, "counts")
        assert_close(sums, exp_s, name="sums")
        assert int(counts[:, 3].sum()) == 0 and int(counts[1].sum()) == 0


def test_update_empty_input():
    sums, counts = ref.kmeans_update(torch.zeros(0, 3), torch.zeros(3, dtype=torch.int64),
                                     torch.zeros(0, dtype=torch.int64), 2)
    assert sums.shape == (2, 2, 3) and counts.shape == (2, 2)
    assert float(sums.abs().sum()) == 0 and int(counts.sum()) == 0


# ----------------------------------------------------------------------------- similarity
def brute_similarity(x, off, assign, cent, m):
    G, kmax, d = cent.shape
    xd, cd = x.double(), cent.double()
    gid = ref.group_ids(off)
    N = len(x)
    cos = torch.zeros(N, dtype=torch.float64)
    sq = torch.zeros(N, dtype=torch.float64)
    members = {}
    for i in range(N):
        c = cd[gid[i], assign[i]]
        cos[i] = float(xd[i] @ c) / (max(float(xd[i].norm()), 1e-12) * max(float(c.norm()), 1e-12))
        sq[i] = float(((xd[i] - c) ** 2).sum())
        members.setdefault((int(gid[i]), int(assign[i])), []).append(i)
    ex = torch.full((G, kmax, m), -1, dtype=torch.int64)
    mc = torch.zeros(G, kmax, dtype=torch.float64)
    ms = torch.zeros(G, kmax, dtype=torch.float64)
    for (g, j), idx in members.items():
        ranked = sorted(idx, key=lambda i: (float(sq[i]), i))[:m]
        ex[g, j, :len(ranked)] = torch.tensor(ranked)
        mc[g, j] = cos[idx].mean()
        ms[g, j] = sq[idx].mean()
    return cos, ex, mc, ms


@pytest.mark.parametrize("m", [1, 3, 8])
def test_cluster_similarity_matches_brute_force(m):
    sizes = [40, 0, 1, 17]
    x, off, cent, kpg = random_groups(sizes, 5, 13, seed=7 + m)
    assign, _ = ref.kmeans_assign(x, off, cent, kpg)
    # duplicated points make equal distances: ties must go to the lower index
    x[5] = x[3]
    x[20] = x[3]
    assign[5] = assign[3]
    assign[20] = assign[3]
    cos, ex, mc, ms = ref.cluster_similarity(x, off, assign, cent, kpg, m)
    bc, bex, bmc, bms = brute_similarity(x, off, assign, cent, m)
    assert_close(cos, bc, name="cos")
    assert_equal_int(ex, bex, "exemplars")
    assert_close(mc, bmc, name="mean_cos")
    assert_close(ms, bms, name="mean_sqdist")
    assert ex.dtype == torch.int64 and ex.shape == (4, 5, m)


def test_cluster_similarity_refuses_a_point_in_a_cluster_its_group_does_not_have():
    # k_per_group was taken and ignored: group 0 of k = 2 got statistics for clusters 2..4
    x, off, cent, kpg = random_groups([6, 4], 5, 3, seed=1)
    assign = torch.tensor([0, 1, 0, 1, 0, 1, 0, 4, 1, 2])
    kpg = torch.tensor([2, 3])
    with pytest.raises(ValueError, match=r"assign\[7\] = 4, but its group 1 has k_per_group\[1\] = 3 clusters "
                                         r"\(1 point\(s\) so\)"):
        ref.cluster_similarity(x, off, assign, cent, kpg, 2)
    with pytest.raises(ValueError, match=r"k_per_group has shape \(3,\); expected \(2,\)"):
        ref.cluster_similarity(x, off, assign, cent, torch.tensor([2, 3, 3]), 2)
    assign[7] = 2
    cos, ex, mc, ms = ref.cluster_similarity(x, off, assign, cent, kpg, 2)
    assert bool((ex[0, 2:] == -1).all()) and float(mc[0, 2:].abs().sum()) == 0


def test_cluster_similarity_empty_input():
    cos, ex, mc, ms = ref.cluster_similarity(torch.zeros(0, 4), torch.zeros(3, dtype=torch.int64),
                                             torch.zeros(0, dtype=torch.int64), torch.zeros(2, 3, 4),
                                             torch.zeros(2, dtype=torch.int64), 4)
    assert cos.shape == (0,) and ex.shape == (2, 3, 4) and bool((ex == -1).all())
    assert float(mc.abs().sum()) == 0 and float(ms.abs().sum()) == 0


@pytest.mark.parametrize("k", ["k0", "kmax"])
@pytest.mark.parametrize("G,kmax,d", EMPTY_CASES, ids=lambda v: str(v))
def test_every_op_on_empty_input(G, kmax, d, k):
    """The N = 0 contract the kernels' empty-input tests compare against: zero sums and
    counts, empty assignments, all-zero seeds drawn without touching the generator, -1
    exemplars and zero means, (0, 0) neighbours; for G = 0 too."""
    x, off, assign, cent, kpg = empty_case(G, kmax, d, 0 if k == "k0" else kmax)
    zero_sums = (torch.zeros(G, kmax, d), torch.zeros(G, kmax, dtype=torch.int64))
    assign_out = (torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    for det in (True, False):
        assert_same_outputs(ref.kmeans_update(x, off, assign, kmax, deterministic=det), zero_sums, "update")
    for metric in ("l2", "cosine"):
        assert_same_outputs(ref.kmeans_assign(x, off, cent, kpg, metric), assign_out, f"assign[{metric}]")
        assert_same_outputs(ref.kmeans_assign_update(x, off, cent, kpg, metric), assign_out + zero_sums,
                            f"assign_update[{metric}]")
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    assert_same_outputs(ref.kmeans_plusplus(x, off, kpg, kmax, gen), torch.zeros(G, kmax, d), "plusplus")
    assert_bitwise(gen.get_state(), state, "plusplus drew from the generator with no points")
    for m in (0, 3):
        assert_same_outputs(ref.cluster_similarity(x, off, assign, cent, kpg, m),
                            (torch.zeros(0), torch.full((G, kmax, m), -1, dtype=torch.int64),
                             torch.zeros(G, kmax), torch.zeros(G, kmax)), f"cluster_similarity m={m}")
    for kk in (0, 4):
        assert_same_outputs(ref.latent_knn(x, kk), torch.zeros(0, 0, dtype=torch.int64), f"latent_knn k={kk}")


# ----------------------------------------------------------------------------- Lloyd loop
@pytest.mark.parametrize("k,d", [(5, 8), (12, 33)])
def test_batched_kmeans_matches_sklearn_from_same_init(k, d):
    from sklearn.cluster import KMeans

    x_np, centres = blobs(60, k, d, seed=k)
    # same initial centroids for both: a perturbed point of every blob
    g = np.random.default_rng(1)
    init = (centres + 0.3 * g.normal(size=centres.shape)).astype(np.float32)
    km = KMeans(n_clusters=k, init=init, n_init=1, max_iter=100, tol=0.0, algorithm="lloyd").fit(x_np)
    x = torch.from_numpy(x_np)
    res = batched_kmeans(x, torch.zeros(len(x), dtype=torch.int64), [k], init=torch.from_numpy(init)[None],
                         n_iter=100, tol=0.0, backend="torch")
    assert_equal_int(res.assign, torch.from_numpy(km.labels_.astype(np.int64)), "assign vs sklearn")
    assert abs(res.inertia - km.inertia_) <= 1e-5 * km.inertia_, (res.inertia, km.inertia_)
    assert_close(res.centroids[0], torch.from_numpy(km.cluster_centers_), name="centroids vs sklearn")


def test_batched_equals_per_group_loop():
    rng = np.random.default_rng(11)
    xs, gs, inits, ks = [], [], [], []
    for g, (n, k) in enumerate([(150, 3), (1, 1), (0, 0), (90, 4), (2300, 5)]):
        if n:
            xg, cg = blobs(-(-n // max(k, 1)), max(k, 1), 10, seed=g, spread=0.1)
            xg = xg[:n]
            xs.append(xg)
        gs.append(np.full(n, g))
        ks.append(k)
        ini = np.zeros((5, 10), np.float32)
        if k:
            ini[:k] = xg[rng.choice(len(xg), size=k, replace=False)]
        inits.append(ini)
    x = torch.from_numpy(np.concatenate(xs))
    groups = torch.from_numpy(np.concatenate(gs)).long()
    init = torch.from_numpy(np.stack(inits))
    res = batched_kmeans(x, groups, ks, n_groups=5, init=init, n_iter=60, tol=0.0, backend="torch")
    for g, k in enumerate(ks):
        sel = (groups == g).nonzero().flatten()
        if not k:
            assert len(sel) == 0
            continue
        one = batched_kmeans(x[sel], torch.zeros(len(sel), dtype=torch.int64), [k], init=init[g:g + 1, :k],
                             n_iter=60, tol=0.0, backend="torch")
        assert_equal_int(res.assign[sel], one.assign, f"group {g} assign")
        assert_close(res.centroids[g, :k], one.centroids[0], name=f"group {g} centroids")
        assert_equal_int(res.counts[g, :k], one.counts[0], f"group {g} counts")


def test_movers_only_update_equals_full_update(monkeypatch):
    """The Lloyd loop corrects the sums by the points that changed cluster; on overlapping
    data (many movers, several groups, an empty group) it must follow the same path as
    recomputing every sum each iteration."""
    import spurfast.cluster as cl

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3001, 7, generator=g)
    groups = torch.randint(0, 4, (3001,), generator=g)
    groups[groups == 2] = 3                                   # group 2 empty
    ks = [9, 13, 0, 6]
    runs = {}
    for name, frac in (("full", -1.0), ("movers", 1.0)):
        monkeypatch.setattr(cl, "_MOVED_FRACTION", frac)
        runs[name] = batched_kmeans(x, groups, ks, n_groups=4, n_iter=40, tol=0.0, seed=3, backend="torch")
    full, movers = runs["full"], runs["movers"]
    assert full.n_iter > 3, "data should need several iterations"
    assert_equal_int(movers.assign, full.assign, "assign (movers-only vs full update)")
    assert_equal_int(movers.counts, full.counts, "counts (movers-only vs full update)")
    assert_close(movers.centroids, full.centroids, name="centroids (movers-only vs full update)")
    assert movers.n_iter == full.n_iter


def test_kmeans_plusplus_deterministic_by_seed():
    x, off, _, kpg = random_groups([50, 0, 3, 200], 6, 7, seed=1, k_rule=lambda s: min(6, s))
    a = ref.kmeans_plusplus(x, off, kpg, 6, torch.Generator().manual_seed(4))
    b = ref.kmeans_plusplus(x, off, kpg, 6, torch.Generator().manual_seed(4))
    c = ref.kmeans_plusplus(x, off, kpg, 6, torch.Generator().manual_seed(5))
    assert_bitwise(a, b, "plusplus seeds, same seed twice")
    assert not torch.equal(a, c)
    # seeds are members of their own group, distinct, and unused rows stay zero
    for g in range(4):
        rows = x[int(off[g]):int(off[g + 1])]
        for j in range(int(kpg[g])):
            assert bool((rows == a[g, j]).all(1).any()), f"seed {j} of group {g} is not a member"
        assert len({tuple(r.tolist()) for r in a[g, :int(kpg[g])]}) == int(kpg[g])
        assert float(a[g, int(kpg[g]):].abs().sum()) == 0
    r1 = batched_kmeans(x, ref.group_ids(off), kpg, seed=9, backend="torch")
    r2 = batched_kmeans(x, ref.group_ids(off), kpg, seed=9, backend="torch")
    assert_bitwise(r1.centroids, r2.centroids, "centroids of the second run")
    assert_bitwise(r1.assign, r2.assign, "assign of the second run")


def _plusplus_every_point_every_step(x, offsets, kpg, kmax, generator):
    """The plain form of batched k-means++: every step reads all N points (one global
    cumulative sum).  The reference skips finished groups' points; the draws must agree."""
    N, d = x.shape
    G = len(offsets) - 1
    cent = torch.zeros(G, kmax, d)
    sizes = offsets[1:] - offsets[:-1]
    gid = ref.group_ids(offsets)
    nonempty = sizes > 0
    u = torch.rand(G, generator=generator)
    first = offsets[:-1] + (u * sizes).long().clamp_max((sizes - 1).clamp_min(0))
    cent[nonempty, 0] = x[first[nonempty]]
    d2 = ((x - cent[gid, 0]) ** 2).sum(1)
    for j in range(1, kmax):
        active = nonempty & (kpg > j)
        if not bool(active.any()):
            break
        cs = torch.cumsum(d2.double(), 0)
        before = torch.where(offsets[:-1] > 0, cs[(offsets[:-1] - 1).clamp_min(0)], torch.zeros(G, dtype=torch.float64))
        total = cs[(offsets[1:] - 1).clamp_min(0)] - before
        u = torch.rand(G, generator=generator).double()
        pick = torch.searchsorted(cs, before + u * total, right=True)
        uni = offsets[:-1] + (u * sizes).long().clamp_max((sizes - 1).clamp_min(0))
        pick = torch.where(total > 0, pick.clamp(offsets[:-1], (offsets[1:] - 1).clamp_min(0)), uni)
        cent[active, j] = x[pick[active]]
        d2 = torch.where(active[gid], torch.minimum(d2, ((x - cent[gid, j]) ** 2).sum(1)), d2)
    return cent


def test_kmeans_plusplus_skipping_finished_groups_draws_the_same_seeds():
    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        G = int(torch.randint(1, 9, (1,), generator=g))
        sizes = torch.randint(0, 120, (G,), generator=g)
        if trial % 3 == 0:
            sizes[0] = 700                                  # one class far larger than the rest
        kpg = torch.minimum(torch.randint(1, 25, (G,), generator=g), sizes)
        if trial % 3 == 0:
            kpg[0] = 60
        kmax = max(1, int(kpg.max()))
        x = torch.randn(int(sizes.sum()), 5, generator=g)
        if trial % 4 == 1 and len(x):
            x[: len(x) // 2] = 0.0                          # duplicates: all-zero D^2 in some groups
        off = csr(sizes.tolist())
        got = ref.kmeans_plusplus(x, off, kpg, kmax, torch.Generator().manual_seed(trial))
        want = _plusplus_every_point_every_step(x, off, kpg, kmax, torch.Generator().manual_seed(trial))
        assert_bitwise(got, want, f"trial {trial}: seeds")


def test_empty_cluster_is_reseeded():
    x_np, centres = blobs(40, 3, 6, seed=2)
    init = centres.astype(np.float32).copy()
    init = np.concatenate([init, np.full((1, 6), 1e3, np.float32)])   # a centroid nobody is near
    res = batched_kmeans(torch.from_numpy(x_np), torch.zeros(len(x_np), dtype=torch.int64), [4],
                         init=torch.from_numpy(init)[None], n_iter=30, backend="torch")
    assert res.reseeded >= 1
    assert int(res.counts.min()) >= 1, res.counts
    assert float(res.centroids.abs().max()) < 100


def test_an_empty_cluster_is_reseeded_from_its_own_groups_points():
    # re-seeding picks the farthest point *of the cluster's group*: a mutant that searched
    # every group put class 0's second centroid on a point of class 1 (the single-group test
    # above cannot tell)
    g = np.random.default_rng(0)
    x0 = np.concatenate([g.normal(0, .1, (20, 2)), g.normal(3, .1, (20, 2))])   # two blobs
    x1 = g.normal(50, 6, (30, 2))                                                 # far off, spread
    x = torch.tensor(np.concatenate([x0, x1]), dtype=torch.float32)
    init = torch.tensor([[[1.5, 1.5], [-100.0, -100.0]], [[50.0, 50.0], [49.0, 49.0]]])   # group 0's 2nd: empty
    res = batched_kmeans(x, torch.tensor([0] * 40 + [1] * 30), [2, 2], init=init, n_iter=30, backend="torch")
    assert res.reseeded >= 1
    assert res.counts[0].tolist() == [20, 20], res.counts
    assert float(res.centroids[0].abs().max()) < 4, res.centroids[0]


def test_two_empty_clusters_of_one_group_are_reseeded_in_one_iteration():
    # each re-seed takes its point out of the running: without that, the second empty cluster
    # picked the same farthest point, found a centroid already on it and waited an iteration
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [0.0, 7.0]])
    init = torch.tensor([[[0.05, 0.0], [-900.0, 0.0], [900.0, 0.0]]])   # two centroids nobody is near
    res = batched_kmeans(x, torch.zeros(4, dtype=torch.int64), [3], init=init, n_iter=1, backend="torch")
    assert res.reseeded == 2
    assert sorted(res.counts[0].tolist()) == [1, 1, 2], res.counts


@pytest.mark.parametrize("kw, want", [
    # -1 ran as 0 iterations without a word; the others failed in range() or a comparison
    (dict(n_iter=-1), "n_iter must be >= 0, got -1"), (dict(n_iter=2.5), "n_iter must be an integer, got 2.5"),
    (dict(n_iter=None), "n_iter must be an integer, got None"), (dict(tol="0.1"), "tol must be a number, got '0.1'"),
    (dict(tol=float("nan")), "tol must be a number, got nan"),
])
def test_bad_iteration_settings_are_named(kw, want):
    with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
        batched_kmeans(torch.rand(10, 2), torch.zeros(10, dtype=torch.int64), [2], **kw)


def test_cosine_metric_groups_by_direction():
    g = np.random.default_rng(0)
    dirs = np.eye(3, 8)
    x = np.concatenate([dirs[j] * g.uniform(0.5, 20, size=(50, 1)) + 0.01 * g.normal(size=(50, 8))
                        for j in range(3)]).astype(np.float32)
    truth = np.repeat(np.arange(3), 50)
    res = batched_kmeans(torch.from_numpy(x), torch.zeros(150, dtype=torch.int64), [3], metric="cosine",
                         init=torch.from_numpy(dirs.astype(np.float32))[None], backend="torch")
    assert_equal_int(res.assign, torch.from_numpy(truth), "cosine assign")
    assert float(res.dist.max()) < 1e-2 and float(res.dist.min()) >= 0
    xd = torch.from_numpy(x).double()
    cos = torch.nn.functional.cosine_similarity(xd, res.centroids[0].double()[res.assign], dim=1)
    assert_close(res.dist, 1 - cos, name="cosine dist")
    # lengths do not matter for cosine, they dominate L2
    l2 = batched_kmeans(torch.from_numpy(x), torch.zeros(150, dtype=torch.int64), [3],
                        init=torch.from_numpy(dirs.astype(np.float32))[None], backend="torch")
    assert not torch.equal(l2.assign, torch.from_numpy(truth))


def test_thousand_groups_reaches_fixed_point():
    rng = np.random.default_rng(4)
    sizes = rng.integers(0, 30, size=1000)
    groups = torch.from_numpy(np.repeat(np.arange(1000), sizes)).long()
    x = torch.randn(int(sizes.sum()), 37, generator=torch.Generator().manual_seed(0))
    kpg = np.minimum(4, sizes)
    res = batched_kmeans(x, groups, kpg, n_groups=1000, n_iter=100, tol=0.0, backend="torch")
    assert res.centroids.shape == (1000, 4, 37)
    assert_equal_int(res.counts.sum(1), torch.from_numpy(sizes).long(), "members per group")
    # fixed point: every point is at a nearest centroid of its group, centroids are member means
    order, off = sort_by_group(groups, 1000)
    check_assign(res.assign[order], res.dist[order], brute_assign(x[order], off, res.centroids, res.k_per_group))
    sums, counts = ref.kmeans_update(x[order], off, res.assign[order], 4)
    nz = counts > 0
    assert_close((sums / counts.clamp_min(1).unsqueeze(-1))[nz], res.centroids[nz], name="centroid = mean")


def test_one_point_group_and_bad_inputs():
    x = torch.randn(5, 3)
    res = batched_kmeans(x, torch.tensor([0, 1, 1, 1, 1]), [1, 2], backend="torch")
    assert int(res.assign[0]) == 0 and float(res.dist[0]) == 0.0
    assert_close(res.centroids[0, 0], x[0], name="one-point centroid")
    with pytest.raises(ValueError, match="k=3 is larger than group 0's 1 members"):
        batched_kmeans(x, torch.tensor([0, 1, 1, 1, 1]), [3, 2], backend="torch")
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        batched_kmeans(bad, torch.zeros(5, dtype=torch.int64), [2], backend="torch")
    with pytest.raises(ValueError, match="k_per_group has 1 entries for 2 groups"):
        batched_kmeans(x, torch.tensor([0, 1, 1, 1, 1]), [1], backend="torch")


def test_registry_names_torch_reference_for_kmeans_ops():
    for op in ("kmeans_assign", "kmeans_update", "cluster_similarity"):
        name, fn = backends.resolve(op, "torch")
        assert name == "torch" and fn is getattr(ref, op)


def test_batched_kmeans_without_points():
    for G, ks in ((0, []), (2, [0, 0])):
        res = batched_kmeans(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), ks, n_groups=G, backend="torch")
        assert res.assign.shape == (0,) and res.dist.shape == (0,) and res.inertia == 0.0
        assert res.centroids.shape == (G, 1, 4) and int(res.counts.sum()) == 0


def test_update_rejects_cluster_index_out_of_range():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"assign has values in \[0, 2\]; expected cluster indices in \[0, 2\)"):
        ref.kmeans_update(x, csr([4]), torch.tensor([0, 1, 2, 0]), 2)
    with pytest.raises(ValueError, match=r"assign has values in \[-1, 1\]"):
        ref.kmeans_update(x, csr([4]), torch.tensor([0, 1, -1, 0]), 2)


def test_update_rejects_cluster_index_past_kmax_in_an_earlier_group():
    # group 0's assign = kmax has the flat index of group 1's cluster 0: still out of range
    x = torch.arange(8.0).reshape(4, 2)
    with pytest.raises(ValueError, match=r"assign has values in \[0, 2\]; expected cluster indices in \[0, 2\)"):
        ref.kmeans_update(x, csr([2, 2]), torch.tensor([0, 2, 1, 1]), 2)
    with pytest.raises(ValueError, match="expected cluster indices"):   # and -1 in group 1
        ref.kmeans_update(x, csr([2, 2]), torch.tensor([0, 1, -1, 1]), 2)


def test_choose_k_grows_for_large_classes_and_shrinks_for_small_ones():
    from spurfast.cluster import choose_k

    sizes = np.array([0, 3, 40, 1000, 250, 1001])
    assert choose_k(sizes, 8, 5).tolist() == [0, 1, 8, 8, 8, 8]
    assert choose_k(sizes, 8, 5, max_mean_size=100).tolist() == [0, 1, 8, 10, 8, 11]
    assert choose_k(sizes, 8, 200, max_mean_size=100).tolist() == [0, 1, 1, 5, 1, 5]
    # the cap stops the growth, never lowers k itself
    assert choose_k(sizes, 8, 5, max_mean_size=100, max_k=9).tolist() == [0, 1, 8, 9, 8, 9]
    assert choose_k(sizes, 8, 5, max_mean_size=100, max_k=3).tolist() == [0, 1, 8, 8, 8, 8]
    big = np.array([100_000])
    assert choose_k(big, 8, 5, max_mean_size=100).tolist() == [1000]
    assert choose_k(big, 8, 5, max_mean_size=100, max_k=256).tolist() == [256]


def test_assign_with_precomputed_sqnorm_matches_without():
    """x_sqnorm only saves a pass over x: same assignment and distances (large group: the
    chunked CPU path that uses it, with a tight cluster far from the origin)."""
    g = torch.Generator().manual_seed(9)
    x = torch.cat([torch.randn(3000, 7, generator=g), 50 + 1e-3 * torch.randn(97, 7, generator=g)])
    off = csr([len(x)])
    cent = torch.cat([x[:5], x[-2:]]).unsqueeze(0).contiguous()
    kpg = torch.tensor([7])
    a0, d0 = ref.kmeans_assign(x, off, cent, kpg)
    a1, d1 = ref.kmeans_assign(x, off, cent, kpg, x_sqnorm=torch.linalg.vecdot(x, x))
    assert_equal_int(a1, a0, "assign with x_sqnorm")
    assert_close(d1, d0, name="distances with x_sqnorm")


def _cpu_kernel():
    from spurfast.kernels import kmeans_cpu
    return pytest.param("cpu", marks=pytest.mark.skipif(not kmeans_cpu.is_available()[0],
                                                        reason="fused CPU kernels unavailable"))


@pytest.mark.parametrize("backend", ["torch", _cpu_kernel()])
def test_a_group_with_fewer_distinct_points_than_k_does_not_hold_the_loop(backend):
    # group 1: six identical points (blank images), k = 2.  Its second cluster can never
    # be filled: re-seeding it onto a point at distance 0 left it empty on every
    # iteration, which kept the whole batch running to n_iter and counted it again each time
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 16, generator=g)
    grp = torch.cat([torch.zeros(2000), torch.ones(6)]).long()
    distinct = batched_kmeans(torch.cat([a, torch.randn(6, 16, generator=g)]), grp, [8, 2], backend=backend)
    same = batched_kmeans(torch.cat([a, torch.full((6, 16), 3.0)]), grp, [8, 2], backend=backend)
    assert distinct.n_iter < 50
    assert same.n_iter < 50, f"ran all {same.n_iter} iterations ({distinct.n_iter} with distinct points)"
    assert same.reseeded == 0, f"reseeded {same.reseeded}: the unfillable cluster was counted"
    assert same.counts[1, :2].tolist() == [6, 0]
    assert_equal_int(same.assign[:2000], distinct.assign[:2000], "group 0's assignment")


@pytest.mark.parametrize("backend", ["torch", _cpu_kernel()])
def test_k_per_group_must_hold_non_negative_integers(backend):
    # k = -1 ran on the torch backend (finite distances to masked centroids); 2.7 ran as 2
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(1))
    g = torch.cat([torch.zeros(20), torch.ones(10)]).long()
    for k, shown in (([3, -1], "-1"), ([3, 2.7], "2.7"), ([3, float("nan")], "nan")):
        with pytest.raises(ValueError, match=rf"k_per_group\[1\] = {shown}: expected a non-negative integer"):
            batched_kmeans(x, g, k, backend=backend)
    with pytest.raises(ValueError, match="k_per_group has shape"):
        batched_kmeans(x, g, 3, backend=backend)
    res = batched_kmeans(x, g, np.array([3.0, 2.0]), backend=backend)   # integer-valued floats are fine
    assert res.k_per_group.tolist() == [3, 2]


@pytest.mark.parametrize("backend", ["torch", _cpu_kernel()])
def test_rows_too_large_for_fp32_distances_are_refused(backend):
    # beyond |x| ~ 1.8e19 the fp32 scores overflow: the CPU kernel put every point in
    # cluster 0, the reference reported inertia inf
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(50, 8, generator=g) + 5, torch.randn(50, 8, generator=g) - 5])
    zeros = torch.zeros(100, dtype=torch.int64)
    with pytest.raises(ValueError, match="k-means input has 100 rows too large for fp32 distances"):
        batched_kmeans(x * 1e19, zeros, [2], backend=backend)
    with pytest.raises(ValueError, match="k-means input has 1 rows too large"):   # fp64 beyond fp32's range
        batched_kmeans(torch.cat([x[:99].double(), torch.full((1, 8), 1e300, dtype=torch.float64)]), zeros, [2],
                       backend=backend)
    res = batched_kmeans(x * 1e15, zeros, [2], backend=backend)
    truth = (torch.arange(100) >= 50).long()
    assert torch.equal(res.assign, truth) or torch.equal(res.assign, 1 - truth)
    assert np.isfinite(res.inertia)


@pytest.mark.parametrize("backend", ["torch", _cpu_kernel()])
def test_init_of_the_wrong_shape_is_refused(backend):
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(2))
    g = torch.cat([torch.zeros(20), torch.ones(10)]).long()
    for shape in ((2, 2, 4), (2, 5, 4), (2, 3, 5), (3, 3, 4), (3, 4)):
        with pytest.raises(ValueError, match=rf"init has shape \({', '.join(map(str, shape))}\); "
                                             r"expected \(G, kmax, d\) = \(2, 3, 4\)"):
            batched_kmeans(x, g, [3, 2], init=torch.randn(*shape), backend=backend)
    with pytest.raises(ValueError, match="init has 1 NaN/inf centroids"):
        init = torch.randn(2, 3, 4)
        init[1, 2, 0] = float("nan")
        batched_kmeans(x, g, [3, 2], init=init, backend=backend)
    res = batched_kmeans(x, g, [3, 2], init=x[[0, 1, 2, 20, 21, 22]].view(2, 3, 4), backend=backend)
    assert res.centroids.shape == (2, 3, 4)
    # a centroid too large for fp32 distances: inf to every point (l2) or a zero vector
    # once normalised (cosine), and its points went to another centroid without a word
    for metric in ("l2", "cosine"):
        init = x[[0, 1, 2, 20, 21, 22]].view(2, 3, 4).clone()
        init[0, 1] *= 3e19
        with pytest.raises(ValueError, match=r"init has 1 rows too large for fp32 distances .*rescale them"):
            batched_kmeans(x, g, [3, 2], init=init, metric=metric, backend=backend)


@pytest.mark.parametrize("off", [[0, 3], [1, 5], [0, 4, 2, 5]])
def test_assign_refuses_offsets_that_do_not_run_0_to_n(off):
    # offsets stopping short of N left rows 3 and 4 at assign 0, dist 0 without a word
    x = torch.randn(5, 3)
    G = len(off) - 1
    with pytest.raises(ValueError, match="offsets must"):
        ref.kmeans_assign(x, torch.tensor(off), torch.randn(G, 2, 3), torch.full((G,), 2))


def test_plusplus_with_kmax_zero_returns_no_seeds():
    # kmax = 0 (every k_g = 0): the reference raised IndexError where the CPU kernel returns (G, 0, d)
    x = torch.randn(5, 3)
    cent = ref.kmeans_plusplus(x, torch.tensor([0, 2, 5]), torch.tensor([0, 0]), 0, torch.Generator().manual_seed(0))
    assert cent.shape == (2, 0, 3)


def test_cluster_similarity_refuses_negative_m_naming_it():
    # as the CuPy launcher does (torch.full's "negative dimension" named neither)
    with pytest.raises(ValueError, match=r"m \(exemplars per cluster\) must be >= 0, got -1"):
        ref.cluster_similarity(torch.randn(4, 3), torch.tensor([0, 4]), torch.zeros(4, dtype=torch.int64),
                               torch.randn(1, 2, 3), torch.tensor([2]), m=-1)


def test_update_names_assign_or_offsets_that_do_not_fit_x():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"assign must be \(N,\) = \(5,\), got shape \(3,\)"):
        ref.kmeans_update(x, torch.tensor([0, 5]), torch.zeros(3, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="offsets must run from 0 to N=5, got 0..3"):
        ref.kmeans_update(x, torch.tensor([0, 3]), torch.zeros(5, dtype=torch.int64), 2)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_assign_takes_sliced_centroids(metric):
    # centroids[:, :k] of a larger buffer is not contiguous: L2 raised "view size is not compatible"
    g = torch.Generator().manual_seed(0)
    x, off = torch.randn(9, 7, generator=g), csr([4, 5])
    full = torch.randn(2, 5, 7, generator=g)
    kpg = torch.tensor([3, 2])
    got = ref.kmeans_assign(x, off, full[:, :3], kpg, metric)
    want = ref.kmeans_assign(x, off, full[:, :3].contiguous(), kpg, metric)
    assert_equal_int(got[0], want[0], "assign")
    assert_bitwise(got[1], want[1], "dist with sliced centroids")


def test_a_group_given_no_cluster_does_not_stop_the_others():
    # its points have no centroid (distance +inf): the inertia was +inf, the convergence test
    # passed at once and every group stopped after two iterations, far from a fixed point
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g)
    groups = torch.tensor([0] * 300 + [1] * 100)
    res = batched_kmeans(x, groups, [6, 0], n_groups=2, n_iter=100, seed=3)
    assert torch.isinf(res.dist[300:]).all()   # group 1's points stay without a centroid, and out of the inertia
    assert res.n_iter > 2 and res.inertia == pytest.approx(float(res.dist[:300].double().sum()))
    for j in range(6):   # converged: each centroid is the mean of its points
        members = x[:300][res.assign[:300] == j]
        torch.testing.assert_close(res.centroids[0, j], members.mean(0), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_update_checks_offsets_and_assign_on_cuda_too():
    # the reference is the GPU fallback: its checks ran for CPU tensors only, so offsets
    # 1..6 for 5 points summed wrong groups silently, and assign = kmax in group 0 landed
    # in group 1's cluster 0
    x = torch.randn(5, 3, device="cuda")
    zeros = torch.zeros(5, dtype=torch.int64, device="cuda")
    with pytest.raises(ValueError, match="offsets must run from 0 to N=5, got 1..6"):
        ref.kmeans_update(x, torch.tensor([1, 3, 6], device="cuda"), zeros, 2)
    with pytest.raises(ValueError, match="offsets must not decrease"):
        ref.kmeans_update(x, torch.tensor([0, 4, 3, 5], device="cuda"), zeros, 2)
    with pytest.raises(ValueError, match=r"assign has values in \[0, 2\]; expected cluster indices in \[0, 2\)"):
        ref.kmeans_update(x, torch.tensor([0, 2, 5], device="cuda"), torch.tensor([2, 0, 0, 0, 0], device="cuda"), 2)
    sums, counts = ref.kmeans_update(x, torch.tensor([0, 2, 5], device="cuda"), torch.tensor([1, 0, 0, 1, 1],
                                                                                              device="cuda"), 2)
    assert counts.tolist() == [[1, 1], [1, 2]]
    torch.testing.assert_close(sums[1, 1], x[3:].sum(0))


def test_cluster_similarity_refuses_assign_or_offsets_that_do_not_fit():
    # the reference serves the similarity on the CPU: assign = -1 in group 1 counted the point
    # in group 0's last cluster (an exemplar of another class), with no error; the CuPy
    # launcher refuses it, and the other misfits raised IndexErrors that named neither input
    x, off, c, k = torch.randn(5, 3), torch.tensor([0, 2, 5]), torch.randn(2, 2, 3), torch.tensor([2, 2])
    with pytest.raises(ValueError, match=r"assign has values in \[-1, 1\]; expected cluster indices in \[0, 2\)"):
        ref.cluster_similarity(x, off, torch.tensor([0, 1, -1, 0, 1]), c, k, m=2)
    with pytest.raises(ValueError, match=r"assign has values in \[0, 2\]"):
        ref.cluster_similarity(x, off, torch.tensor([0, 2, 0, 0, 1]), c, k, m=2)
    with pytest.raises(ValueError, match="offsets must run from 0 to N=5, got 0..4"):
        ref.cluster_similarity(x, torch.tensor([0, 2, 4]), torch.zeros(5, dtype=torch.int64), c, k, m=2)
    with pytest.raises(ValueError, match=r"offsets has 4 entries; expected G \+ 1 = 3"):
        ref.cluster_similarity(x, torch.tensor([0, 2, 3, 5]), torch.zeros(5, dtype=torch.int64), c, k, m=2)
    with pytest.raises(ValueError, match=r"centroids must be \(G, kmax, d=3\), got shape \(2, 2, 4\)"):
        ref.cluster_similarity(x, off, torch.zeros(5, dtype=torch.int64), torch.randn(2, 2, 4), k, m=2)


@pytest.mark.parametrize("off, kpg, pattern", [
    ([0, 2, 4], [1, 1], "offsets must run from 0 to N=5, got 0..4"),
    ([0, 4, 3, 5], [1, 1, 1], "offsets must not decrease"),
    ([1, 3, 6], [1, 1], "offsets must run from 0 to N=5, got 1..6"),
    ([0, 2, 5], [1, 1, 1], "k_per_group has 3 entries for 2 groups"),
])
def test_plusplus_names_offsets_or_k_that_do_not_fit(off, kpg, pattern):
    # as the CPU kernel does; the reference (the GPU's seeding) raised torch's size
    # mismatches, "repeats can not be negative" and IndexErrors that named neither input
    with pytest.raises(ValueError, match=pattern):
        ref.kmeans_plusplus(torch.randn(5, 3), torch.tensor(off), torch.tensor(kpg), 2, torch.Generator().manual_seed(0))


def test_plusplus_names_a_seed_given_for_its_generator():
    # it failed inside torch with its list of signatures (the CPU kernel's test: test_kmeans_cpu)
    with pytest.raises(TypeError, match="generator must be a torch.Generator .*got int"):
        ref.kmeans_plusplus(torch.randn(5, 3), torch.tensor([0, 5]), torch.tensor([2]), 2, 0)


def test_plusplus_leaves_zeros_for_a_group_given_no_cluster():
    # "groups with k_g < kmax leave the extra rows as zeros": a nonempty group given k = 0
    # got a point as its seed 0, where the CPU kernel leaves zeros (the backends' centroids
    # differed); the draws stay as they were, so the other groups' seeds do not change
    x, off = torch.arange(15.0).reshape(5, 3), torch.tensor([0, 2, 5])
    cent = ref.kmeans_plusplus(x, off, torch.tensor([0, 2]), 2, torch.Generator().manual_seed(0))
    assert not cent[0].any()
    both = ref.kmeans_plusplus(x, off, torch.tensor([1, 2]), 2, torch.Generator().manual_seed(0))
    assert_bitwise(cent[1], both[1], "the other group's seeds")


@pytest.mark.gpu
def test_assign_takes_cpu_offsets_with_cuda_points():
    # as the CuPy and Triton launchers do: the small groups' gather indexed the CPU offsets
    # with CUDA group indices and raised
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2100 + 7 + 5, 4, generator=g).cuda()   # one large group, two small ones
    off, cent, kpg = csr([2100, 7, 5]), torch.randn(3, 3, 4, generator=g).cuda(), torch.tensor([3, 2, 1])
    want = ref.kmeans_assign(x, off.cuda(), cent, kpg)
    got = ref.kmeans_assign(x, off, cent, kpg)
    assert_equal_int(got[0], want[0], "assign")
    assert_bitwise(got[1], want[1], "counts")
    assert got[0].is_cuda
    got = ref.kmeans_assign(x, off, cent.cpu(), kpg)   # CPU centroids too, as the GPU providers take them
    assert_equal_int(got[0], want[0], "assign with CPU centroids")
    assert_bitwise(got[1], want[1], "dist with CPU centroids")


def test_update_and_similarity_refuse_fractional_assign():
    """assign 1.5 raised a numpy cast error (update) or an indexing error (similarity) that
    named nothing; whole floats are cluster indices like any other."""
    x = torch.arange(15.0).reshape(5, 3)
    off = torch.tensor([0, 2, 5])
    cent, kpg = torch.zeros(2, 2, 3), torch.tensor([2, 2])
    bad = torch.tensor([0, 1.5, 0, 1, 1])
    with pytest.raises(ValueError, match=r"assign holds 1.5 \(entry 1\); expected integers"):
        ref.kmeans_update(x, off, bad, 2)
    with pytest.raises(ValueError, match=r"assign holds 1.5 \(entry 1\); expected integers"):
        ref.cluster_similarity(x, off, bad, cent, kpg, m=2)
    whole = torch.tensor([0, 1, 0, 1, 1])
    sums, counts = ref.kmeans_update(x, off, whole.float(), 2)
    want_sums, want_counts = ref.kmeans_update(x, off, whole, 2)
    assert_bitwise(sums, want_sums, "sums")
    assert_bitwise(counts, want_counts, "counts")
    for got, want in zip(ref.cluster_similarity(x, off, whole.float(), cent, kpg, m=2),
                         ref.cluster_similarity(x, off, whole, cent, kpg, m=2)):
        assert_bitwise(got, want, "output with whole-float assign")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_plusplus_draws_by_d2_in_a_group_far_smaller_than_an_earlier_one(device):
    # every group shared one float64 cumulative sum of D^2: group 1's D^2 (total 1) fell below
    # the last bit of group 0's (~1e22), its total came out 0 and it drew uniformly, so its
    # second seed was one of the 99 points at the origin instead of the one point away from
    # them (the CPU kernel, which sums each group alone, picks it every time)
    g = torch.Generator().manual_seed(0)
    g1 = torch.zeros(100, 2)
    g1[57, 0] = 1.0
    x = torch.cat([torch.randn(200, 2, generator=g) * 1e10, g1, torch.randn(30, 2, generator=g)]).to(device)
    off, kpg = csr([200, 100, 30]), torch.tensor([2, 2, 3])
    for seed in range(20):
        cent = ref.kmeans_plusplus(x, off.to(device), kpg, 3, torch.Generator().manual_seed(seed)).cpu()
        assert cent[1, 1].tolist() == [1.0, 0.0] or cent[1, 0].tolist() == [1.0, 0.0], f"seed {seed}: {cent[1]}"
        assert cent[1, :2].abs().sum() == 1.0, f"seed {seed}: group 1's seeds {cent[1, :2].tolist()}"


def test_argmin_of_a_row_with_nan_stays_a_column_on_every_path():
    """The torch path (every device but the CPU's contiguous fp32 blocks: the reference's
    assign on a GPU) gave a row with NaN the index D.shape[-1], past the centroids; the
    assign then gathered centroid rows out of range (or the next group's).  Its first NaN
    wins, as numpy's argmin does on the CPU path."""
    D = torch.tensor([[3.0, float("nan"), 1.0], [2.0, 1.0, 1.0], [float("nan")] * 3, [float("inf")] * 3])
    want = ref._argmin_lastdim(D)[1]                       # the numpy path
    assert want.tolist() == [1, 1, 0, 0]
    for other in (D.t().contiguous().t(), D.double()):     # not contiguous fp32: the torch path
        assert ref._argmin_lastdim(other)[1].tolist() == want.tolist()


def test_sorted_sums_equal_index_add_in_row_order():
    """The reference's similarity means on a GPU come from these sums (index_add_ adds with
    float atomics there, so the means' bits varied run to run): each index's rows summed in
    row order, as index_add_ sums them on the CPU, with zeros for indices no row has."""
    g = torch.Generator().manual_seed(0)
    for n, S in ((0, 3), (1, 1), (500, 7), (2000, 40)):
        flat = torch.randint(0, max(1, S - 2), (n,), generator=g)   # the last indices stay empty
        v = torch.randn(n, 2, generator=g) * 1e3
        want = torch.zeros(S, 2).index_add_(0, flat, v)
        got = ref.sorted_sums(flat, v, S)
        assert_bitwise(got, want, f"n={n} S={S}")
        assert_bitwise(ref.sorted_sums(flat, v[:, 0], S), want[:, 0], "sorted_sums of one column")


@pytest.mark.gpu
def test_similarity_on_cuda_is_reproducible_and_takes_cpu_assign():
    """The CuPy launcher hands m > 32 to the reference: its means came from index_add_
    (float atomics: other bits each run), and a CPU assign or CPU centroids, which the
    launcher takes for m <= 32, failed in a device mismatch."""
    g = torch.Generator().manual_seed(1)
    x_cpu = torch.randn(60000, 8, generator=g) * 10
    off = torch.tensor([0, 30000, 60000])
    cent = torch.randn(2, 3, 8, generator=g)
    assign = torch.randint(0, 3, (60000,), generator=g)
    x = x_cpu.cuda()
    runs = [ref.cluster_similarity(x, off.cuda(), assign.cuda(), cent.cuda(), torch.tensor([3, 3]).cuda(), m=40)
            for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert_bitwise(a, b, "similarity on CUDA, run twice")
    mixed = ref.cluster_similarity(x, off, assign, cent, torch.tensor([3, 3]), m=40)
    for a, b in zip(runs[0], mixed):
        assert_bitwise(a, b, "similarity with a CPU assign")
    want = ref.cluster_similarity(x_cpu, off, assign, cent, torch.tensor([3, 3]), m=40)
    assert_equal_int(runs[0][1].cpu(), want[1], "exemplars")
    torch.testing.assert_close(runs[0][2].cpu(), want[2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(runs[0][3].cpu(), want[3], rtol=1e-4, atol=1e-5)
    sums, counts = ref.kmeans_update(x, off.cuda(), assign, 3)     # a CPU assign with CUDA points
    want_sums, want_counts = ref.kmeans_update(x, off.cuda(), assign.cuda(), 3)
    assert_bitwise(sums, want_sums, "sums")
    assert_bitwise(counts, want_counts, "counts")


@pytest.mark.parametrize("backend", ["torch", _cpu_kernel()])
def test_assign_takes_sqnorm_that_requires_grad_or_is_numpy(backend):
    """|x|^2 of features straight from a model (requires_grad) failed in .numpy() in both CPU
    providers; a numpy array, which the fused kernel took, failed in the reference."""
    _, assign_fn = backends.resolve("kmeans_assign", backend, "cpu")
    _, update_fn = backends.resolve("kmeans_assign_update", backend, "cpu")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2100 + 9, 5, generator=g).requires_grad_()   # one large group, one small
    off, cent, kpg = csr([2100, 9]), torch.randn(2, 3, 5, generator=g), torch.tensor([3, 2])
    want = assign_fn(x.detach(), off, cent, kpg)
    for xn in ((x * x).sum(1), (x * x).sum(1).detach().numpy()):
        for fn in (assign_fn, update_fn):
            got = fn(x, off, cent, kpg, x_sqnorm=xn)
            assert_equal_int(got[0], want[0], "assign")
            assert_close(got[1], want[1], name="distances")


@pytest.mark.parametrize("backend", ["torch", _cpu_kernel()])
def test_plusplus_and_similarity_take_points_that_require_grad(backend):
    """Features straight from a model require grad: the reference's k-means++ failed in its
    out= ops ("functions with out=... arguments don't support automatic differentiation"),
    where the CPU kernel took them; the similarity returned cos and means that required
    grad (the CuPy kernel returns plain tensors)."""
    _, plusplus = backends.resolve("kmeans_plusplus", backend, "cpu")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 3, generator=g)
    off, kpg = csr([20, 30]), torch.tensor([3, 4])
    want = plusplus(x, off, kpg, 4, torch.Generator().manual_seed(0))
    got = plusplus(x.clone().requires_grad_(), off, kpg, 4, torch.Generator().manual_seed(0))
    assert_bitwise(got, want, f"{backend} plusplus of points that require grad")
    assert not got.requires_grad
    assign = torch.randint(0, 4, (50,), generator=g)
    cent = torch.randn(2, 4, 3, generator=g)
    kpg = torch.tensor([4, 4])   # assign draws from all 4 clusters in both groups
    plain = ref.cluster_similarity(x, off, assign, cent, kpg, 3)
    out = ref.cluster_similarity(x.clone().requires_grad_(), off, assign, cent.clone().requires_grad_(), kpg, 3)
    for a, b in zip(out, plain):
        assert_bitwise(a, b, "similarity of points that require grad")
        assert not a.requires_grad


@pytest.mark.parametrize("backend", ["torch", _cpu_kernel()])
@pytest.mark.parametrize("n", [0, 50])
def test_update_of_points_that_require_grad_returns_plain_sums(backend, n):
    """The reference's update summed x itself off the scipy path (N = 0 on the CPU, every
    call on a GPU): its sums required grad, where the other providers return plain tensors."""
    _, update = backends.resolve("kmeans_update", backend, "cpu")
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(3))
    off, assign = csr([n // 2, n - n // 2]), torch.arange(n) % 4
    want = update(x, off, assign, 4)
    got = update(x.clone().requires_grad_(), off, assign, 4)
    assert_same_outputs(got, want, f"N={n}")
    assert not any(t.requires_grad for t in got)


@pytest.mark.parametrize("backend", ["torch", _cpu_kernel()])
def test_zero_dimensional_offsets_are_refused_naming_offsets(backend):
    """len() of 0-d offsets raised "TypeError: len() of a 0-d tensor" in the reference's
    update and in every provider's assign (the shared check), naming no argument."""
    x, assign, cent, kpg = torch.randn(5, 2), torch.zeros(5, dtype=torch.int64), torch.randn(1, 2, 2), torch.tensor([2])
    _, update = backends.resolve("kmeans_update", backend, "cpu")
    _, assign_fn = backends.resolve("kmeans_assign", backend, "cpu")
    with pytest.raises(ValueError, match=r"offsets must be"):   # the CPU kernel: "... from 0 to N=5, got [5]"
        update(x, torch.tensor(5), assign, 2)
    with pytest.raises(ValueError, match=r"offsets must be a 1-D tensor \(G \+ 1,\), got \(\)"):
        assign_fn(x, torch.tensor(5), cent, kpg)


def test_latent_knn_reranks_in_slices_of_at_most_a_block(monkeypatch):
    """The exact re-ranking gathered (chunk rows, 2k, d) coordinates at once (plus two
    temporaries that size): 0.9 GB at n = 4096, d = 512, k = 25, growing with k and d past
    the KNN_BLOCK_FLOATS bound.  Here with the bound shrunk: every gather stays within it,
    and the neighbours are those of one unsliced pass."""
    z = torch.randn(300, 40, generator=torch.Generator().manual_seed(4))
    z[::9] = z[5]   # duplicates: ties broken by index in every slice
    want = ref.latent_knn(z, 12, chunk=300)
    gathered, exact = [], ref._exact_nearest

    def spy(zt, start, cand, k, invalid=None, **kw):
        gathered.append(cand.numel() * zt.shape[1])
        return exact(zt, start, cand, k, invalid, **kw)

    monkeypatch.setattr(ref, "_exact_nearest", spy)
    monkeypatch.setattr(ref, "KNN_BLOCK_FLOATS", 1 << 14)
    got = ref.latent_knn(z, 12, chunk=300)
    assert_bitwise(got, want, "kNN reranked in slices")
    assert max(gathered) <= 1 << 14, f"a re-ranking gathered {max(gathered)} floats"


def tight_blob(n_wide: int, n_blob: int, d: int, spread: float, seed: int = 0) -> np.ndarray:
    """n_wide N(0, 1) latents and a blob of n_blob at 3 + spread N(0, 1), standardised as
    discovery standardises them (fp32): the blob's distances fall below the GEMM scores'
    rounding for spreads of about 3e-3 and less."""
    rng = np.random.default_rng(seed)
    z = np.concatenate([rng.normal(size=(n_wide, d)), 3 + spread * rng.normal(size=(n_blob, d))])
    return ((z - z.mean(0)) / z.std(0)).astype(np.float32)


def check_exact_rows(nn: np.ndarray, z: np.ndarray, rows: np.ndarray, k: int, name: str) -> None:
    """Rows ``rows`` of nn hold their k nearest others, nearest first, by float64 distances
    between the centred fp32 latents the providers rank (ties within fp32 rounding, 1e-5
    relative, may swap)."""
    zc = ref.centred_latents(torch.from_numpy(z)).double().numpy()
    # in blocks of rows, a dimension at a time: (rows x n x d) float64 at once took 1.6 GB and
    # ~20 s on two cores for 3,797 rows
    want, got = np.empty((len(rows), k)), np.empty((len(rows), k))
    zt = np.ascontiguousarray(zc.T)
    for s in range(0, len(rows), 256):
        r = rows[s:s + 256]
        D = np.zeros((len(r), len(zc)))
        for j in range(zc.shape[1]):
            D += (zc[r, j, None] - zt[j]) ** 2
        D[np.arange(len(r)), r] = np.inf
        want[s:s + 256] = np.sort(np.partition(D, k - 1, 1)[:, :k], 1)
        got[s:s + 256] = np.take_along_axis(D, nn[r], 1)
    assert (nn[rows] != rows[:, None]).all(), f"{name}: a row lists itself"
    bad = np.flatnonzero(~np.isclose(got, want, rtol=1e-5, atol=0).all(1))
    assert bad.size == 0, (f"{name}: {bad.size} of {len(rows)} rows miss a true neighbour, first row {rows[bad[0]]}: "
                           f"k-th distance {got[bad[0]].max():.3g} vs {want[bad[0]].max():.3g}")


@pytest.mark.parametrize("spread", [3e-3, 1e-3, 1e-4])
def test_latent_knn_is_exact_for_a_tight_blob_far_from_the_mean(spread):
    """The GEMM screen |zj|^2 - 2 zi.zj rounds by ~(d + 2) 2^-24 (|zi| + |zj|)^2, more than
    the blob's distances: it picked the 2k candidates at random inside the blob, and every
    blob row missed true neighbours at spread 1e-3 (k-th distance up to 2.15x the true
    one).  Such rows are measured again directly."""
    z = tight_blob(4000, 1000, 16, spread)
    nn = ref.latent_knn(torch.from_numpy(z), 10).numpy()
    check_exact_rows(nn, z, np.arange(4000, 5000), 10, f"reference knn, spread {spread:g}")
    check_exact_rows(nn, z, np.arange(0, 4000, 37), 10, f"reference knn, spread {spread:g}, wide rows")


@pytest.mark.parametrize("column_block", [16, 1 << 30], ids=["pruned", "unpruned"])
def test_latent_knn_is_exact_for_a_tight_blob_in_odd_shapes_and_small_blocks(monkeypatch, column_block):
    """Odd n, d and k, the block bound shrunk (chunks of 13 rows; re-measures in slices of
    13 rows and column blocks), pruned and unpruned screens."""
    monkeypatch.setattr(ref, "KNN_BLOCK_FLOATS", 1 << 14)
    measured, remeasure = [], getattr(ref, "knn_remeasure", None)

    def spy(zt, rows, k):
        measured.append(len(rows))
        return remeasure(zt, rows, k)

    monkeypatch.setattr(ref, "knn_remeasure", spy, raising=False)
    z = tight_blob(1026, 211, 13, 1e-4, seed=3)
    nn = ref.latent_knn(torch.from_numpy(z), 7, column_block=column_block).numpy()
    check_exact_rows(nn, z, np.arange(len(z)), 7, f"reference knn, column block {column_block}")
    assert sum(measured) >= 211, f"only {sum(measured)} rows measured again"


def test_latent_knn_measures_ordinary_latents_once(monkeypatch):
    """Rows of ordinary latents are certain after the screen: none is measured again (the
    re-measure costs n d per row)."""
    measured = []
    monkeypatch.setattr(ref, "knn_remeasure", lambda zt, rows, k: measured.append(len(rows)))
    z = torch.randn(3000, 16, generator=torch.Generator().manual_seed(2))
    ref.latent_knn(z, 10)
    assert sum(measured) == 0, f"{sum(measured)} ordinary rows measured again"


@pytest.mark.parametrize("lowered", ["legacy_high", "cuda_tf32", "mkldnn_bf16"])
def test_latent_knn_screens_at_ieee_precision_whatever_the_callers_setting(monkeypatch, lowered):
    """A caller's lowered float32 matmul precision (set_float32_matmul_precision("high"), as GPU
    training often sets it, or the per-backend API) made every row's screen "uncertain" and
    measured again directly, O(n^2 d), or raised outright: torch's global getter refuses once
    the per-backend API was used.  The screen now runs at IEEE fp32 and the setting is restored."""
    cuda_mm, mkl_mm = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    saved = (torch.get_float32_matmul_precision(), cuda_mm.fp32_precision, mkl_mm.fp32_precision)
    z = torch.randn(600, 16, generator=torch.Generator().manual_seed(3))
    want = ref.latent_knn(z, 10)
    remeasured, real = [], ref.knn_remeasure
    monkeypatch.setattr(ref, "knn_remeasure", lambda zt, rows, k: remeasured.append(len(rows)) or real(zt, rows, k))
    try:
        if lowered == "legacy_high":
            torch.set_float32_matmul_precision("high")
        elif lowered == "cuda_tf32":
            cuda_mm.fp32_precision = "tf32"
        else:
            mkl_mm.fp32_precision = "bf16"
        before = (cuda_mm.fp32_precision, mkl_mm.fp32_precision)
        got = ref.latent_knn(z, 10)
        assert (cuda_mm.fp32_precision, mkl_mm.fp32_precision) == before   # the caller's setting kept
    finally:
        torch.set_float32_matmul_precision(saved[0])
        cuda_mm.fp32_precision, mkl_mm.fp32_precision = saved[1], saved[2]
    assert_bitwise(got, want, "kNN at the lowered precision setting")
    assert sum(remeasured) == 0, f"{sum(remeasured)} of 600 ordinary rows measured again"


def duplicated_latents(seed: int = 0) -> np.ndarray:
    """400 ordinary latents and three duplicated ones (700, 150 and 5 copies, a pool's
    placeholder image among them), shuffled: the copies of the first two have more than
    2k others at distance 0 and are never certain after the screen."""
    rng = np.random.default_rng(seed)
    copies = [np.repeat(rng.normal(size=(1, 16)), c, 0) for c in (700, 150, 5)]
    z = np.concatenate([rng.normal(size=(400, 16))] + copies).astype(np.float32)
    return z[rng.permutation(len(z))]


def lower_index_knn(z: np.ndarray, k: int) -> np.ndarray:
    """Brute force over the centred fp32 latents the providers rank: each row's k nearest
    others by float64 distance, equal distances (the copies) to the lower index."""
    zc = ref.centred_latents(torch.from_numpy(z)).double().numpy()
    D = ((zc[:, None] - zc[None]) ** 2).sum(-1)
    np.fill_diagonal(D, np.inf)
    return np.stack([np.lexsort((np.arange(len(z)), D[i]))[:k] for i in range(len(z))])


def spy_on_remeasure(monkeypatch, measure_owner, measure_name: str) -> tuple[list, list]:
    """(rows, points): the numbers of rows ``knn_remeasure`` is asked to measure again and of
    distinct latents the provider's measure function (``measure_owner.measure_name``) measures."""
    rows, points = [], []
    remeasure, measure = ref.knn_remeasure, getattr(measure_owner, measure_name)

    def spy_remeasure(zt, r, k, measure=None):
        rows.append(len(r))
        return remeasure(zt, r, k, measure)

    monkeypatch.setattr(ref, "knn_remeasure", spy_remeasure)
    monkeypatch.setattr(measure_owner, measure_name, lambda zt, p, kk: points.append(len(p)) or measure(zt, p, kk))
    return rows, points


def test_latent_knn_measures_each_duplicated_latent_once(monkeypatch):
    """Every copy of a duplicated latent was measured again against every column, n d each:
    10,000 copies in a pool of 10^6 cost 1.6 x 10^11 flops at d = 16.  Copies share their
    distances, so each distinct latent is measured once; each copy drops itself after."""
    z = duplicated_latents()
    rows, points = spy_on_remeasure(monkeypatch, ref, "knn_measure")
    nn = ref.latent_knn(torch.from_numpy(z), 10).numpy()
    want = lower_index_knn(z, 10)
    bad = np.flatnonzero((nn != want).any(1))
    assert bad.size == 0, (f"{bad.size} of {len(z)} rows differ from brute force, first row {bad[0]}: "
                           f"{nn[bad[0]].tolist()} vs {want[bad[0]].tolist()}")
    assert sum(rows) >= 850, f"only {sum(rows)} rows measured again (the copies are not certain)"
    assert sum(points) <= sum(rows) - 848, f"{sum(points)} latents measured for {sum(rows)} rows"


@pytest.mark.parametrize("k", [1, 4, 7])
def test_knn_remeasure_drops_each_copy_itself_or_the_last(k):
    """Rows of one latent share one measure of k + 1 neighbours: the lowest-index copies
    keep the others (each drops itself), a copy past them drops the (k + 1)-th; rows of
    distinct latents in the same call keep their own neighbours."""
    z = torch.tensor([[0.0, 0.0]] * 6 + [[5.0, 5.0]] + [[1.0, 0.0]] * 3 + [[9.0, 9.0]])
    rows = torch.arange(len(z))
    got = ref.knn_remeasure(ref.centred_latents(z), rows, k).numpy()
    want = lower_index_knn(z.numpy(), k)
    bad = np.flatnonzero((got != want).any(1))
    assert bad.size == 0, f"k={k}: rows {bad.tolist()} differ: {got[bad].tolist()} vs {want[bad].tolist()}"
    assert ref.knn_remeasure(z, rows[:0], k).shape == (0, k)


@pytest.mark.gpu
def test_latent_knn_on_cuda_is_exact_for_tight_blobs_and_duplicated_latents():
    """The CUDA path of the reference (screen at IEEE fp32, re-measure per distinct latent):
    the rows the screen cannot rank are as exact as on the CPU."""
    z = tight_blob(4000, 1000, 16, 1e-3)
    nn = ref.latent_knn(torch.from_numpy(z).cuda(), 10).numpy()
    check_exact_rows(nn, z, np.arange(4000, 5000), 10, "cuda reference knn, tight blob")
    z = duplicated_latents(seed=2)
    nn = ref.latent_knn(torch.from_numpy(z).cuda(), 10).numpy()
    want = lower_index_knn(z, 10)
    bad = np.flatnonzero((nn != want).any(1))
    assert bad.size == 0, (f"cuda reference knn of duplicated latents: {bad.size} of {len(z)} rows differ, first row "
                           f"{bad[0]}: {nn[bad[0]].tolist()} vs {want[bad[0]].tolist()}")


@pytest.mark.parametrize("backend", ["torch", _cpu_kernel()])
def test_a_small_group_is_not_stopped_by_a_large_settled_one(backend):
    """The stopping test compared the shift of every group with tol x the total inertia: a
    group of 20,000 points that settled at once stopped a group of 300 still moving after 7
    iterations (14 points assigned otherwise than alone).  Each group now meets tol against
    its own inertia, with the default tol."""
    rng = np.random.default_rng(0)
    d, na = 8, 20000
    centres = rng.normal(scale=20, size=(8, d))
    a = centres[rng.integers(0, 8, na)] + rng.normal(size=(na, d))
    b = rng.normal(size=(300, d))
    init_b = b[rng.choice(300, 8, replace=False)]
    alone = batched_kmeans(torch.tensor(b, dtype=torch.float32), torch.zeros(300, dtype=torch.long), [8],
                           init=torch.tensor(init_b[None], dtype=torch.float32), backend=backend)
    both = batched_kmeans(torch.tensor(np.concatenate([a, b]), dtype=torch.float32),
                          torch.tensor([0] * na + [1] * 300), [8, 8],
                          init=torch.tensor(np.stack([centres, init_b]), dtype=torch.float32), backend=backend)
    assert alone.n_iter > 7
    assert_equal_int(both.assign[na:], alone.assign, "the small group's assignment")
    assert_close(both.centroids[1], alone.centroids[0], name="the small group's centroids")


@pytest.mark.parametrize("backend", ["torch", _cpu_kernel()])
def test_cosine_distances_are_never_negative(backend):
    """1 - cos of a point on its own centroid rounded below zero (to -2.4e-7: 86 of 200
    distances negative, and so was the inertia); a NaN row still gives NaN."""
    rng = np.random.default_rng(3)
    x = torch.tensor(rng.normal(size=(200, 7)) * rng.uniform(0.1, 50, (200, 1)), dtype=torch.float32)
    res = batched_kmeans(x, torch.zeros(200, dtype=torch.long), [200], init=x[None].clone(), metric="cosine",
                         n_iter=1, backend=backend)
    assert float(res.dist.min()) >= 0.0 and res.inertia >= 0.0
    off = torch.tensor([0, 3])
    pts = torch.tensor([[1.0, 2.0], [float("nan"), 1.0], [3.0, -1.0]])
    dist = backends.call("kmeans_assign", pts, off, pts[None, [0, 2]].clone(), torch.tensor([2]), "cosine",
                         backend=backend)[1]
    assert 0.0 <= float(dist[0]) < 1e-6 and 0.0 <= float(dist[2]) < 1e-6 and bool(torch.isnan(dist[1]))


def test_batched_kmeans_takes_numpy_points_and_starting_centroids():
    """groups and k were taken as numpy arrays or lists, but a numpy x failed on x.dim()
    with an AttributeError that did not say x must be a tensor."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3)).astype(np.float32)
    groups = np.repeat([0, 1], 15)
    want = batched_kmeans(torch.from_numpy(x), torch.from_numpy(groups), [2, 3], seed=4)
    got = batched_kmeans(x, groups, [2, 3], seed=4)
    assert_bitwise(got.assign, want.assign, "assign")
    assert_bitwise(got.centroids, want.centroids, "centroids")
    init = want.centroids.numpy()
    again = batched_kmeans(x, groups, [2, 3], init=init)
    assert_bitwise(again.assign, want.assign, "assign from numpy inputs, again")


@pytest.mark.parametrize("n", [5, 40])
def test_latent_knn_refuses_latents_without_dimensions(n):
    """z of shape (n, 0): n = 40 failed inside torch.unique ("There are 0 sized dimensions..."),
    naming neither z nor its shape; n = 5 returned arbitrary neighbours."""
    with pytest.raises(ValueError, match=rf"z must be \(n, d\) with d >= 1, got shape \({n}, 0\)"):
        ref.latent_knn(torch.zeros(n, 0), 3)


@pytest.mark.parametrize("kw, want", [
    # torch's own errors named neither argument; column_block 0 divided by zero
    (dict(chunk=-1), (ValueError, "chunk must be >= 0, got -1")),
    (dict(chunk=1.5), (TypeError, "chunk must be an integer")),
    (dict(column_block=0), (ValueError, "column_block must be an integer >= 1, got 0")),
    (dict(column_block=-1), (ValueError, "column_block must be an integer >= 1, got -1")),
    (dict(column_block=True), (ValueError, "column_block must be an integer >= 1, got True")),   # ran as 1
    (dict(column_block=np.True_), (ValueError, "column_block must be an integer >= 1, got ")),
    (dict(column_block=2.0), (ValueError, "column_block must be an integer >= 1, got 2.0")),
])
def test_latent_knn_names_bad_block_sizes(kw, want):
    with pytest.raises(want[0], match=re.escape(want[1])):
        ref.latent_knn(torch.rand(10, 3), 2, **kw)


@pytest.mark.parametrize("seed", [2 ** 64, -1, 1.7, "3", True])
def test_batched_kmeans_names_a_bad_seed(seed):
    """2**64 failed with "Overflow when unpacking long long", naming nothing; 1.7 ran as seed 1."""
    x = torch.randn(30, 2)
    with pytest.raises(ValueError, match=r"seed must be (an integer|in \[0, 2\*\*64\)), got"):
        batched_kmeans(x, torch.zeros(30, dtype=torch.long), [3], n_groups=1, seed=seed)


def test_batched_kmeans_takes_any_integer_seed_below_2_64():
    x = torch.randn(30, 2)
    g = torch.zeros(30, dtype=torch.long)
    a = batched_kmeans(x, g, [3], n_groups=1, seed=np.int64(7))
    b = batched_kmeans(x, g, [3], n_groups=1, seed=7)
    assert_bitwise(a.assign, b.assign, "assign at seed np.int64(7) against 7")
    batched_kmeans(x, g, [3], n_groups=1, seed=2 ** 64 - 1)
    assert_bitwise(batched_kmeans(x, g, [3], n_groups=1, seed=7.0).assign, b.assign, "seed 7.0")   # as DiscoverConfig takes it


# ----------------------------------------------------------------------------- points of other kinds
def _knn_providers():
    from spurfast.kernels import kmeans_cpu as kcpu
    return [ref.latent_knn] + ([kcpu.latent_knn] if kcpu.is_available()[0] else [])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("outlier_at", [0, -1], ids=["outlier-first", "outlier-last"])
def test_a_far_outlier_does_not_stop_a_tight_group_far_from_the_origin_being_recentred(backend, outlier_at):
    """The test for recentring a group compared |x0|^2 with its *mean* spread: one point
    3000 away raised that mean past it, fp32 |c|^2 - 2 x.c cancelled for the two blobs at
    300 (0.05 apart, spread 1e-3) and their points were split at random.  1000 points: more than
    the test reads (cluster.SPREAD_SAMPLE), so its sample is read too."""
    from spurfast.kernels import kmeans_cpu as kcpu
    if backend == "cpu" and not kcpu.is_available()[0]:
        pytest.skip("no fused CPU kernels")
    from spurfast.cluster import SPREAD_SAMPLE
    assert 1000 > SPREAD_SAMPLE
    g = torch.Generator().manual_seed(0)
    blob = torch.arange(1000) % 2
    x = 300.0 + 0.05 * blob[:, None].float() + 1e-3 * torch.randn(1000, 8, generator=g)
    pos = 0 if outlier_at == 0 else 1000
    x = torch.cat([x[:pos], torch.full((1, 8), 3300.0), x[pos:]])
    got = batched_kmeans(x, torch.zeros(1001, dtype=torch.long), [3], backend=backend, seed=0)
    a = torch.cat([got.assign[:pos], got.assign[pos + 1:]])
    assert got.assign[pos] not in a.tolist(), "the outlier shares a cluster with a blob"
    assert [len(set(a[blob == b].tolist())) for b in (0, 1)] == [1, 1], got.counts.tolist()
    assert a[0] != a[1] and sorted(got.counts[0].tolist()) == [1, 500, 500]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_integer_points_far_from_the_origin_keep_their_spread(backend):
    """Integers were cast to fp32 before the shift near each group that float64 gets: 1e9 +
    {0, 1} and 1e9 + {6, 7} became one point (counts [12, 0], inertia 0)."""
    from spurfast.kernels import kmeans_cpu as kcpu
    if backend == "cpu" and not kcpu.is_available()[0]:
        pytest.skip("no fused CPU kernels")
    v = torch.tensor([0, 0, 0, 1, 1, 1, 6, 6, 6, 7, 7, 7]) + 10 ** 9
    groups = torch.zeros(len(v), dtype=torch.long)
    want = batched_kmeans(v.double()[:, None], groups, [2], backend=backend, seed=0)
    for dt in (torch.int64, torch.int32):
        got = batched_kmeans(v.to(dt)[:, None], groups, [2], backend=backend, seed=0)
        assert got.counts.tolist() == [[6, 6]] and got.assign.tolist() == want.assign.tolist()
        assert got.inertia == pytest.approx(3.0)
    z = (torch.tensor([0, 6, 1, 7]) + 10 ** 9)[:, None]
    for knn in _knn_providers():
        assert knn(z, 1).flatten().tolist() == [2, 3, 0, 1]


def test_complex_points_are_refused_not_cut_to_their_real_part():
    """Every provider casts points to fp32: complex ones lost their imaginary part (with a
    warning at most), and points that differ only there became one."""
    x = torch.tensor([[1 + 0j], [1 + 0j], [1 + 50j], [1 + 50j]], dtype=torch.complex64)
    with pytest.raises(ValueError, match="x has dtype torch.complex64; expected real numbers"):
        batched_kmeans(x, torch.zeros(4, dtype=torch.long), [2])
    for knn in _knn_providers():
        with pytest.raises(ValueError, match="z has dtype torch.complex64"):
            knn(x, 1)
    with pytest.raises(ValueError, match="x has dtype torch.complex64"):
        ref.kmeans_assign(x, csr([4]), torch.zeros(1, 2, 1), torch.tensor([2]))
    with pytest.raises(ValueError, match="centroids has dtype torch.complex64"):
        ref.kmeans_assign(x.real.contiguous(), csr([4]), torch.zeros(1, 2, 1, dtype=torch.complex64), torch.tensor([2]))


@pytest.mark.parametrize("provider", ["torch", "cpu"])
def test_points_of_the_wrong_shape_and_a_list_of_assignments_are_named(provider):
    """The reference unpacked x.shape first ("not enough values to unpack", an IndexError)
    and read assign.is_complex() / assign.dim() of a list (AttributeErrors)."""
    if provider == "cpu":
        from spurfast.kernels import kmeans_cpu as mod
        if not mod.is_available()[0]:
            pytest.skip("no fused CPU kernels")
    else:
        mod = ref
    off, x1 = csr([4]), torch.zeros(4)
    with pytest.raises(ValueError, match=r"x must be a 2-D tensor \(N, d\), got \(4,\)"):
        mod.kmeans_update(x1, off, torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"x must be a 2-D tensor \(N, d\), got \(4, 3, 1\)"):
        mod.kmeans_update(torch.zeros(4, 3, 1), off, torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"x must be a 2-D tensor \(N, d\), got \(4,\)"):
        mod.kmeans_plusplus(x1, off, torch.tensor([2]), 2, torch.Generator().manual_seed(0))
    for assign in ([0, 0, 1, 1], np.zeros(4, np.int64)):
        with pytest.raises(ValueError, match="assign must be a tensor, got (list|ndarray)"):
            mod.kmeans_update(torch.zeros(4, 2), off, assign, 2)
    if provider == "torch":
        with pytest.raises(ValueError, match=r"x must be a 2-D tensor \(N, d\), got \(4,\)"):
            ref.cluster_similarity(x1, off, torch.zeros(4, dtype=torch.long), torch.zeros(1, 2, 1), torch.tensor([2]))


@pytest.mark.parametrize("op", ["kmeans_assign", "kmeans_update", "latent_knn"])
def test_meta_tensors_are_refused_by_the_registry_by_name(op):
    """`auto` handed them to the torch reference, which failed deep inside torch naming nothing."""
    x = torch.zeros(6, 3, device="meta")
    args = {"kmeans_assign": (x, csr([6]), torch.zeros(1, 2, 3, device="meta"), torch.tensor([2])),
            "kmeans_update": (x, csr([6]), torch.zeros(6, dtype=torch.long), 2), "latent_knn": (x, 2)}[op]
    with pytest.raises(ValueError, match=f"{op}: tensors on the meta device hold no data"):
        backends.call(op, *args)


@pytest.mark.parametrize("backend", ["torch", _cpu_kernel()])
def test_inertia_leaves_out_a_group_given_no_cluster(backend):
    # its points' distances are +inf (no centroid): the loop left them out of its inertia,
    # the result's inertia took them in and was inf
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0], [6.0, 5.0], [7.0, 5.0]])
    res = batched_kmeans(x, torch.tensor([0, 0, 1, 1, 1]), [1, 0], backend=backend)
    assert torch.isinf(res.dist[2:]).all()
    assert res.inertia == pytest.approx(0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_group_ids_refuses_offsets_that_are_not_integers(dtype):
    # .long() truncated [0, 1.5, 3] to sizes [1, 1]: the third point lost its group silently
    with pytest.raises(TypeError, match=f"group_ids: offsets are {dtype}, expected an integer tensor"):
        ref.group_ids(torch.tensor([0, 1.5, 3]).to(dtype))
    assert ref.group_ids(torch.tensor([0, 1, 3], dtype=torch.int32)).tolist() == [0, 1, 1]


@pytest.mark.parametrize("n_groups,msg", [(2.9, "n_groups must be an integer, got 2.9"),
                                          (-1, "n_groups must be an integer >= 0, got -1")])
def test_a_fractional_or_negative_n_groups_is_refused_by_name(n_groups, msg):
    # int(2.9) ran the two groups as 2: a third group of points would be named an id out of range
    x = torch.randn(6, 3)
    with pytest.raises(ValueError, match=re.escape(msg)):
        batched_kmeans(x, torch.tensor([0, 0, 1, 1, 1, 0]), [1, 1, 1], n_groups=n_groups, backend="torch")


def test_choose_k_with_a_min_cluster_size_of_one_or_zero_lowers_k_only_to_the_group_size():
    from spurfast.cluster import choose_k

    # sizes // max(2, min_cluster_size) halved k for small classes that the user allowed singletons in
    sizes = np.array([0, 1, 3, 5, 40])
    assert choose_k(sizes, 8, 1).tolist() == [0, 1, 3, 5, 8]
    assert choose_k(sizes, 8, 0).tolist() == [0, 1, 3, 5, 8]


def test_a_group_id_equal_to_n_groups_is_named():
    # groups.max() > G let id G through, and numpy failed later with "operands could not be broadcast"
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    groups = torch.tensor([0] * 5 + [1] * 4 + [2])
    with pytest.raises(ValueError, match=r"group ids must lie in \[0, 2\); 1 do not, e.g. groups\[9\] = 2"):
        batched_kmeans(x, groups, [2, 2], n_groups=2, backend="torch")


def test_an_iteration_that_reseeds_an_empty_cluster_does_not_end_the_loop():
    # stopping in the iteration that re-seeded left cluster 0 at 9.5 with 9 alone as its member
    # (inertia 0.25, not a fixed point); the loop must run on until the re-seeded cluster settles
    x = torch.tensor([[10.0], [3.0], [3.0], [9.0]])
    init = torch.tensor([[[8.0], [7.0], [14.0]]])
    res = batched_kmeans(x, torch.zeros(4, dtype=torch.long), [3], init=init, backend="torch")
    assert res.reseeded >= 1
    assert sorted(res.centroids[0, :, 0].tolist()) == [3.0, 9.0, 10.0]
    assert res.inertia == 0.0
    for j in range(3):   # a fixed point: every centroid is the mean of its members
        assert torch.equal(res.centroids[0, j], x[res.assign == j].mean(0))


def test_starting_centroids_of_a_far_group_are_shifted_with_its_points():
    # the init was not moved with the points recentred about one of them: centroids about 100
    # met points about 0, every point went to one cluster and the blobs were not recovered
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(3), 50)
    centres = np.array([[0.0, 0.0], [0.05, 0.0], [0.0, 0.05]])
    x = torch.as_tensor(centres[truth] + rng.normal(size=(150, 2)) * 1e-3 + 100.0, dtype=torch.float32)
    init = torch.as_tensor(centres + 100.0, dtype=torch.float32)[None]
    res = batched_kmeans(x, torch.zeros(150, dtype=torch.long), [3], init=init, n_iter=20, backend="torch")
    assert res.assign.tolist() == truth.tolist()   # init j is blob j, so the numbering is kept
    np.testing.assert_allclose(res.centroids[0].numpy(), centres + 100.0, atol=1e-3)


def test_the_far_group_test_reads_points_from_the_whole_group_not_its_first_ones():
    # reading the first 255 points (150 wide ones first) took the group as near the origin for
    # its spread: fp32 scores cancelled and the two tight blobs 0.1 apart at (1000, 1000) mixed
    rng = np.random.default_rng(0)
    spots = np.array([[0.0, 0.0], [2000.0, 0.0], [0.0, 2000.0], [999.95, 1000.0], [1000.05, 1000.0]])
    truth = np.repeat(np.arange(5), [50, 50, 50, 225, 225])
    x = torch.as_tensor(spots[truth] + rng.normal(size=(600, 2)) * 5e-3, dtype=torch.float32)
    init = torch.as_tensor(spots, dtype=torch.float32)[None]
    res = batched_kmeans(x, torch.zeros(600, dtype=torch.long), [5], init=init, n_iter=30, backend="torch")
    assert res.assign.tolist() == truth.tolist()
