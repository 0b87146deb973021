import numpy as np
import pytest
import torch
from scipy.stats import binom

from spurfast.kernels import reference as ref
from spurfast.scoring import SURPRISE_CAP, agreement, bh_qvalues, cluster_scores, confusion_rates, \
    content_classes, latent_neighbours, look_alike_strata, permutation_pvalues, permuted_predictions, \
    shuffled_share, size_matched_pvalues, top_two


def reference_knn(z, k, **kw):
    return ref.latent_knn(torch.from_numpy(z), k, **kw).numpy()


def test_bh_matches_hand_computation():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5])
    # sorted: .005 .01 .03 .04 .5 -> *m/rank: .025 .025 .05 .05 .5 -> cummin from the top
    np.testing.assert_allclose(bh_qvalues(p), [0.025, 0.05, 0.05, 0.025, 0.5])
    assert bh_qvalues(np.array([])).size == 0
    np.testing.assert_allclose(bh_qvalues(np.array([0.9, 0.9])), [0.9, 0.9])



def test_bh_refuses_p_values_outside_0_1_and_clips_a_rounding_hair():
    """A score or a log p passed as p-values got q-values as if it were one (-3 gave a
    q-value of -6, below every real p)."""
    with pytest.raises(ValueError, match=r"p-values must lie in \[0, 1\]; 1 do not, first p\[1\] = -3.0"):
        bh_qvalues(np.array([0.2, -3.0, 0.5]))
    with pytest.raises(ValueError, match=r"first p\[0\] = inf"):
        bh_qvalues(np.array([np.inf, 2.0]))
    q = bh_qvalues(np.array([1 + 1e-12, -1e-13, np.nan]))
    assert q[:2].tolist() == [1.0, 0.0] and np.isnan(q[2])


def test_nonfinite_rows_reads_in_chunks_and_only_the_rows_asked():
    def nonfinite_rows(v, rows, chunk=1 << 16):   # top_two's check of the rows asked, in its one pass
        return top_two(v, chunk, rows)[1]
    v = np.ones((10, 3), np.float32)
    v[[1, 4, 9], [0, 2, 1]] = [np.nan, np.inf, -np.inf]
    rows = np.ones(10, bool)
    rows[4] = False
    for chunk in (1, 3, 4, 1 << 16):
        assert nonfinite_rows(v, rows, chunk=chunk).tolist() == [1, 9]
    assert nonfinite_rows(v[:0], rows[:0]).tolist() == []


def test_permutation_pvalues_count_a_tie_added_in_another_order():
    real = 0.1 + 0.2 + 0.3          # 0.6000000000000001
    null = np.array([0.3 + 0.2 + 0.1, 0.0, 1.0])   # the same shares: 0.6
    assert real > null[0]
    np.testing.assert_allclose(permutation_pvalues(np.array([real]), null), [3 / 4])
    np.testing.assert_allclose(permutation_pvalues(np.array([0.6 + 1e-6]), null), [2 / 4])   # not a tie


def test_permutation_pvalues():
    null = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(permutation_pvalues(np.array([0.0, 2.0, 4.0, 5.0]), null), [1.0, 0.8, 0.4, 0.2])


def test_content_classes_label_else_runner_up():
    probs = np.array([[0.7, 0.2, 0.1], [0.6, 0.1, 0.3], [0.1, 0.8, 0.1]])
    labels = np.array([-1, 2, -1])
    cls = np.array([0, 0, 1])
    assert content_classes(top_two(probs), labels, cls).tolist() == [1, 2, 0]


@pytest.mark.parametrize("n_classes", [1, 2, 3, 10])
def test_top_two_gives_the_runner_up_of_the_full_probabilities(n_classes):
    # content_classes once masked class cls[i] in a copy of all (n, C) probabilities (5 GB at
    # ImageNet scale, per permutation); the top two per row give the same runner-up, ties
    # (first index) and NaN included, read a chunk at a time
    rng = np.random.default_rng(n_classes)
    probs = np.round(rng.random((997, n_classes)), 1).astype(np.float32)   # many ties
    probs[::97, 0] = np.nan
    cls = rng.integers(0, n_classes, 997)
    full = probs.copy()
    full[np.arange(997), cls] = -np.inf
    labels = np.where(rng.random(997) < 0.3, rng.integers(0, n_classes, 997), -1)
    want = np.where(labels >= 0, labels, full.argmax(1))
    for chunk in (1, 7, 1 << 16):
        assert content_classes(top_two(probs, chunk=chunk), labels, cls).tolist() == want.tolist()
    assert top_two(np.zeros((0, n_classes), np.float32)).shape == (0, 2)


def test_latent_neighbours_bruteforce():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(37, 3)).astype(np.float32)
    nn = reference_knn(z, k=4, chunk=5)
    assert np.array_equal(nn, latent_neighbours(z, k=4)), "the registry's provider gives the same neighbours"
    d = ((z[:, None] - z[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert np.array_equal(np.sort(nn, 1), np.sort(np.argsort(d, 1)[:, :4], 1))


@pytest.mark.parametrize("n,block,chunk", [(203, 4, 17), (130, 7, 130), (64, 3, 1), (50, 1, 9)])
def test_latent_neighbours_pruned_blocks_are_exact(n, block, chunk):
    """The block-pruned top-k (blocks of `block` columns, a padded last block, row chunks
    of `chunk`) returns the brute-force neighbours in nearest-first order."""
    rng = np.random.default_rng(n)
    z = np.concatenate([rng.normal(size=(n // 2, 5)), 0.05 * rng.normal(size=(n - n // 2, 5)) + 3]).astype(np.float32)
    nn = reference_knn(z, k=6, chunk=chunk, column_block=block)
    d = ((z[:, None].astype(np.float64) - z[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    expect = np.argsort(d, 1, kind="stable")[:, :6]
    assert nn.shape == (n, 6)
    mismatch = np.flatnonzero((nn != expect).any(1))
    assert mismatch.size == 0, f"{mismatch.size} rows differ, first row {mismatch[:1]}: {nn[mismatch[:1]]} vs {expect[mismatch[:1]]}"


def test_latent_neighbours_tiny_pools():
    z = np.zeros((1, 2), np.float32)
    assert latent_neighbours(z, k=3).shape == (1, 0) and reference_knn(z, k=3).shape == (1, 0)
    z = np.array([[0.0], [1.0], [3.0]], np.float32)
    assert reference_knn(z, k=5, column_block=1).tolist() == [[1, 2], [0, 2], [1, 0]]
    assert latent_neighbours(z, k=5).tolist() == [[1, 2], [0, 2], [1, 0]]


def test_agreement_is_the_share_of_unrelated_neighbours_predicted_alike():
    groups = np.array([1, 1, 1, 0, 0])
    labels = np.array([0, 2, 1, 0, -1])
    nbrs = np.array([[1, 2], [0, 3], [0, 1], [4, 0], [3, 2]])
    unknown_ok = np.ones(5, bool)
    # point 0 (pred 1): neighbours 1 (label 2, pred 1 -> agree) and 2 (label 1 == c: not counted) -> 1/1
    # point 1: neighbours 0 (label 0, pred 1 agree), 3 (label 0, pred 0) -> 1/2
    # point 2: neighbours 0 (label 0, pred 1 agree), 1 (label 2, pred 1 agree) -> 2/2
    # point 3 (pred 0): neighbour 4 unlabelled pred 0 agree; 0 has label 0 == c -> 1/1
    # point 4 (pred 0, unlabelled): 3 has label 0 == c; 2 (label 1, pred 1) -> 0/1
    assert agreement(groups, labels, nbrs, unknown_ok, "share").tolist() == [1.0, 0.5, 1.0, 1.0, 0.0]
    unknown_ok[4] = False  # a suspect sample of unknown label never counts
    assert agreement(groups, labels, nbrs, unknown_ok, "share")[3] == 0.0  # no neighbour left to count


def test_surprise_is_the_binomial_tail_of_agreement_given_confusion_rates():
    labels = np.array([0, 0, 0, 0, 2, 2])
    groups = np.array([1, 1, 0, 0, 0, 2])
    # rates: label 0 -> class 1 in 2 of 4, -> class 0 in 2 of 4; label 2 -> 0 and -> 2 in 1 of 2
    rates = confusion_rates(groups, labels)
    assert rates[0, 1] == 0.5 and rates[2, 0] == 0.5 and rates[2, 1] == 0.0
    nbrs = np.array([[1, 4], [0, 2], [3, 4], [2, 1], [5, 0], [4, 0]])
    got = agreement(groups, labels, nbrs, np.ones(6, bool), "surprise")
    # point 0 (pred 1): 1 agrees (rate .5), 4 does not (rate 0): P(Bin(2, .25) >= 1) = 1 - .75^2
    # point 1 (pred 1): 0 agrees, 2 does not, both rate .5: P(Bin(2, .5) >= 1) = .75
    # point 2 (pred 0): 3 has label 0 == c (not counted); 4 agrees (rate .5): P = .5
    # point 3 (pred 0): both neighbours have label 0 == c -> nothing to count -> 0
    # points 4, 5: no neighbour agrees -> 0
    want = [-np.log10(1 - 0.75 ** 2), -np.log10(0.75), -np.log10(0.5), 0.0, 0.0, 0.0]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_surprise_matches_scipy_and_is_capped():
    rng = np.random.default_rng(3)
    n = 400
    labels = np.where(rng.random(n) < 0.2, -1, rng.integers(0, 4, n))   # some unlabelled (pooled)
    groups = rng.integers(0, 4, n)
    nbrs = np.stack([rng.permutation(n)[:12] for _ in range(n)])
    unknown_ok = rng.random(n) < 0.7
    got = agreement(groups, labels, nbrs, unknown_ok, "surprise")
    rates = confusion_rates(groups, labels)
    for i in range(n):
        c, nl = groups[i], labels[nbrs[i]]
        valid = np.where(nl >= 0, nl != c, unknown_ok[nbrs[i]])
        a = int(((groups[nbrs[i]] == c) & valid).sum())
        r = rates[np.where(nl >= 0, nl, -1)[valid], c].mean() if valid.any() else 0.0
        want = 0.0 if a == 0 else min(-np.log10(binom.sf(a - 1, int(valid.sum()), r)), SURPRISE_CAP)
        assert got[i] == pytest.approx(want, rel=1e-9, abs=1e-12), i
    # 20 neighbours of a label the model calls class 1 in 2% of cases, all called 1: p = .02^20
    labels = np.zeros(1000, np.int64)
    groups = np.zeros(1000, np.int64)
    groups[:21] = 1
    nbrs = np.tile(np.arange(1, 21), (1000, 1))
    assert agreement(groups, labels, nbrs, np.ones(1000, bool), "surprise")[0] == SURPRISE_CAP
    with pytest.raises(ValueError, match="statistic"):
        agreement(groups, labels, nbrs, np.ones(1000, bool), "vote")


def test_size_matched_pvalues_compare_with_null_clusters_of_about_the_same_size():
    # null: small clusters (4 unrelated members) score up to 2, large ones (40) up to 20
    small = np.linspace(0, 2, 150)
    large = np.linspace(0, 20, 150)
    null = np.concatenate([small, large])
    sizes = np.concatenate([np.full(150, 4), np.full(150, 40)])
    p, n_ref, beat = size_matched_pvalues(np.array([3.0, 3.0]), np.array([4, 40]), null, sizes)
    assert n_ref.tolist() == [150, 150] and beat.tolist() == [True, False]
    # 3.0 beats every small null cluster (p = 1/151), but 3/4 of the large ones reach it
    np.testing.assert_allclose(p, [1 / 151, (1 + (large >= 3.0).sum()) / 151])
    # pooling would give both the same p
    assert p[0] < permutation_pvalues(np.array([3.0]), null)[0] < p[1]
    # a size with too few null clusters near it takes the min_reference nearest: the 150
    # large ones and then 50 small ones
    p_far, n_ref, beat = size_matched_pvalues(np.array([1.0]), np.array([400]), null, sizes, min_reference=200)
    assert n_ref.tolist() == [200]
    # no null cluster of its size: "beat every one of them" would hold for any score, so it
    # is asked of the reference it was compared with, scaled up to 400 members (its best: 20 x 10
    # and 2 x 100; 1.0 and 200 do not beat it, 201 does)
    assert beat.tolist() == [False]
    for score, beaten in ((200.0, False), (201.0, True)):
        assert size_matched_pvalues(np.array([score]), np.array([400]), null, sizes,
                                    min_reference=200)[2].tolist() == [beaten]
    # a sparse window widened with larger clusters: not beaten in p, but beaten in its window
    mixed, mixed_sizes = np.concatenate([small, np.linspace(10, 20, 10)]), np.concatenate([sizes[:150], np.full(10, 40)])
    p_mid, n_ref, beat = size_matched_pvalues(np.array([2.5]), np.array([4]), mixed, mixed_sizes, min_reference=155)
    assert n_ref.tolist() == [155] and beat.tolist() == [True]
    np.testing.assert_allclose(p_mid, 6 / 156)  # the 5 large clusters added all score higher
    ref = np.concatenate([large * 10, small[:50] * 100])   # smaller null clusters scaled up to 400 members
    np.testing.assert_allclose(p_far, (1 + (ref >= 1.0).sum()) / 201)
    # a reference as large as the null is the pooled p-value
    np.testing.assert_allclose(size_matched_pvalues(np.array([3.0]), np.array([4]), null, sizes, min_reference=300)[0],
                               permutation_pvalues(np.array([3.0]), null))
    p, n_ref, beat = size_matched_pvalues(np.array([1.0]), np.array([3]), np.zeros(0), np.zeros(0))
    assert p.tolist() == [1.0] and n_ref.tolist() == [0] and beat.tolist() == [True]



def test_a_tie_with_the_best_null_cluster_is_not_beating_it():
    """The p-value counts a null score within TIE_TOLERANCE as a tie (>=); "beat every null
    cluster" must agree, or discovery adds permutations for a cluster that only ties."""
    real, tie = 0.1 + 0.2 + 0.3, 0.3 + 0.2 + 0.1   # the same shares summed in two orders
    assert real > tie
    null = np.r_[np.linspace(0.0, 0.5, 199), tie]
    p, _, beat = size_matched_pvalues(np.array([real, real + 1e-6]), np.array([3, 3]), null, np.full(200, 3))
    np.testing.assert_allclose(p, [2 / 201, 1 / 201])   # the tie counts as >= in p
    assert beat.tolist() == [False, True]


def test_cluster_scores_counts():
    groups = np.array([0, 0, 1, 1, 1])
    assign = np.array([0, 1, 0, 0, 1])
    unrelated = np.array([True, True, True, False, True])
    agree = np.array([1.0, 0.0, 0.5, 1.0, 0.25])
    score, n_u, size = cluster_scores(groups, assign, 2, unrelated, agree, 2)
    # point 3 is not unrelated: its agreement does not count
    assert score.tolist() == [1.0, 0.0, 0.5, 0.25] and n_u.tolist() == [1, 1, 1, 1] and size.tolist() == [1, 1, 2, 1]


def test_permuted_predictions_keep_per_label_counts():
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 4, 500)
    groups = rng.integers(0, 5, 500)
    g = permuted_predictions(groups, labels, rng)
    for lab in np.unique(labels):
        m = labels == lab
        assert np.array_equal(np.bincount(g[m], minlength=5), np.bincount(groups[m], minlength=5))
    assert not np.array_equal(g, groups)


def test_permuted_predictions_draw_as_a_scan_per_label_does():
    # one sort instead of a scan of the pool per label: the same blocks in the same order, so
    # the same permutation for a seed (the null of a rerun, and every committed figure, unchanged)
    def per_label(groups, labels, rng):
        out = groups.copy()
        for lab in np.unique(labels):
            idx = np.nonzero(labels == lab)[0]
            out[idx] = groups[rng.permutation(idx)]
        return out

    for seed, n in [(0, 1000), (1, 37), (2, 1), (3, 0)]:
        r = np.random.default_rng(seed)
        labels, groups = r.integers(-1, 7, n), r.integers(0, 9, n)
        got = permuted_predictions(groups, labels, np.random.default_rng((seed, 5)))
        np.testing.assert_array_equal(got, per_label(groups, labels, np.random.default_rng((seed, 5))))


def test_cluster_and_score_grows_k_for_a_large_class_up_to_the_cap():
    from spurfast.scoring import cluster_and_score, latent_neighbours

    rng = np.random.default_rng(0)
    z = rng.normal(size=(600, 4)).astype(np.float32)
    groups = np.r_[np.zeros(500, np.int64), np.ones(100, np.int64)]
    probs = np.full((600, 2), 0.5, np.float32)
    labels = np.full(600, -1)
    args = (z, groups, top_two(probs), labels, 2, latent_neighbours(z, 5), np.ones(600, bool))
    kw = dict(k=2, min_cluster_size=5, seed=0, n_iter=5)
    assert cluster_and_score(*args, **kw).k_per_group.tolist() == [2, 2]
    assert cluster_and_score(*args, max_mean_cluster_size=50, **kw).k_per_group.tolist() == [10, 2]
    assert cluster_and_score(*args, max_mean_cluster_size=50, max_k=6, **kw).k_per_group.tolist() == [6, 2]


@pytest.mark.parametrize("backend", [None, "torch"])
def test_cosine_kmeans_on_all_zero_rows_stops(backend):
    """Under cosine an all-zero latent row is at distance 1 from every centroid, itself
    included: empty clusters were re-seeded onto such rows every iteration, stayed empty,
    and the loop ran all n_iter iterations (for the real clustering and every null one)."""
    from spurfast.cluster import batched_kmeans

    x = torch.zeros(40, 3)
    x[20:] = torch.tensor([1.0, 2.0, 0.5])   # group 1: one direction, fewer than k
    groups = torch.repeat_interleave(torch.arange(2), 20)
    res = batched_kmeans(x, groups, [3, 3], n_iter=50, metric="cosine", backend=backend)
    assert res.reseeded == 0 and res.n_iter < 50, (res.reseeded, res.n_iter)
    assert res.counts.tolist() == [[20, 0, 0], [20, 0, 0]] and torch.isfinite(res.centroids).all()


def test_a_group_given_no_cluster_counts_no_members():
    """counts[g, j] is the size of cluster j of group g: a group given k = 0 has none, but
    its points (assign 0, distance +inf) were counted as a cluster 0 of 100 members."""
    from spurfast.cluster import batched_kmeans

    x = torch.randn(400, 5, generator=torch.Generator().manual_seed(0))
    groups = torch.tensor([0] * 300 + [1] * 100)
    res = batched_kmeans(x, groups, [6, 0], n_groups=2, n_iter=20, seed=3)
    assert res.counts[1].tolist() == [0] * 6
    assert res.counts[0].tolist() == torch.bincount(res.assign[:300], minlength=6).tolist()


def test_a_size_with_no_reference_at_min_reference_0_is_priced_as_an_empty_null():
    # min_reference=0 and no null cluster of its size: nothing to compare with, as with an
    # empty null (p = 1, beaten), not numpy's "zero-size array to reduction" error
    p, n_ref, beat = size_matched_pvalues(np.array([1.0, 2.0]), np.array([3, 500]), np.array([0.5, 1.5]),
                                          np.array([3, 3]), min_reference=0)
    assert p.tolist() == [2 / 3, 1.0] and n_ref.tolist() == [2, 0] and beat.tolist() == [False, True]


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_kmeans_of_features_that_require_grad(backend, metric):
    # features straight from a model crashed the L2 paths ("Can't call numpy() on Tensor
    # that requires grad") and the torch provider's cumsum(out=); k-means never differentiates
    from spurfast.cluster import batched_kmeans

    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    groups = torch.arange(300) % 3
    want = batched_kmeans(x, groups, [3, 20, 5], seed=0, metric=metric, backend=backend)
    got = batched_kmeans(x.clone().requires_grad_(), groups, [3, 20, 5], seed=0, metric=metric, backend=backend)
    assert torch.equal(got.assign, want.assign) and torch.equal(got.centroids, want.centroids)
    assert not got.centroids.requires_grad
    # starting centroids that require grad gave centroids that did too: their .numpy() raised
    init = want.centroids.clone()
    want = batched_kmeans(x, groups, [3, 20, 5], metric=metric, init=init, backend=backend)
    got = batched_kmeans(x, groups, [3, 20, 5], metric=metric, init=init.clone().requires_grad_(), backend=backend)
    assert torch.equal(got.assign, want.assign) and torch.equal(got.centroids, want.centroids)
    assert not got.centroids.requires_grad
    got.centroids.numpy()


@pytest.mark.parametrize("backend", [None, "torch"])
def test_kmeans_of_a_group_far_from_the_origin_for_its_spread(backend):
    """L2 k-means does not depend on where a group lies, but fp32 scores |c|^2 - 2 x.c
    do: four tight blobs shifted by 100 (spread 0.01) cancelled them, points went to
    arbitrary centroids (adjusted Rand 0.001) and the loop ran all its iterations."""
    from spurfast.cluster import batched_kmeans

    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(4), 200)
    blobs = rng.normal(size=(4, 8)) * 0.01
    base = blobs[truth] + rng.normal(size=(800, 8)) * 1e-3
    x = torch.as_tensor(np.r_[base + 100.0, base], dtype=torch.float32)   # group 0 far, group 1 at the origin
    groups = torch.repeat_interleave(torch.arange(2), 800)
    res = batched_kmeans(x, groups, [4, 4], n_iter=50, seed=0, backend=backend)
    assert res.n_iter < 50
    for g in range(2):
        a = res.assign[groups == g].numpy()
        # the blobs recovered: one cluster per blob, up to the clusters' numbering
        assert len(set(zip(truth, a))) == 4 and len(set(a)) == 4, (g, sorted(set(zip(truth, a))))
        xd = x[groups == g].double()
        d = ((xd[:, None] - res.centroids[g].double()[None]) ** 2).sum(-1)
        assert torch.equal(d.argmin(1), res.assign[groups == g])
        for j in range(4):   # the centroids are where the points are, not about the origin
            mean = xd[res.assign[groups == g] == j].mean(0)
            torch.testing.assert_close(res.centroids[g, j].double(), mean, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", [None, "torch"])
def test_float64_kmeans_far_from_the_origin_is_shifted_before_fp32(backend):
    """Two float64 blobs at 1e8 and 1e8 + 1 (sd 0.01): cast to fp32 first (step 8 there),
    every point became 1e8, both centroids were one point and every label 0; shifted in
    float64 first, the blobs split exactly."""
    from spurfast.cluster import batched_kmeans

    rng = np.random.default_rng(0)
    truth = np.repeat([0, 1], 200)
    x = torch.as_tensor(1e8 + np.c_[truth, np.zeros(400)] + rng.normal(size=(400, 2)) * 0.01, dtype=torch.float64)
    res = batched_kmeans(x, torch.zeros(400, dtype=torch.int64), [2], n_iter=30, seed=0, backend=backend)
    a = res.assign.numpy()
    assert len(set(zip(truth, a))) == 2 and len(set(a)) == 2, sorted(set(zip(truth, a)))
    assert res.centroids.dtype == torch.float32   # as documented: the centroids are fp32
    # fp32 init of a float64 run is shifted alike
    again = batched_kmeans(x, torch.zeros(400, dtype=torch.int64), [2], n_iter=30, init=res.centroids.clone(),
                           backend=backend)
    assert len(set(zip(truth, again.assign.numpy()))) == 2


def test_latent_neighbours_of_float64_far_from_the_origin():
    """scoring.latent_neighbours cast float64 to fp32 before the providers could centre it:
    at 1e8 + noise every row's neighbours were the lowest indices."""
    from spurfast.scoring import latent_neighbours

    rng = np.random.default_rng(1)
    z = 1e8 + rng.normal(size=(60, 3))
    want = np.argsort(((z[:, None] - z[None]) ** 2).sum(-1) + np.diag(np.full(60, np.inf)), axis=1)[:, :4]
    for backend in ("torch", None):
        assert np.array_equal(latent_neighbours(z, 4, backend=backend), want)


def test_kmeans_huge_float_group_id_is_refused_as_given():
    from spurfast.cluster import batched_kmeans

    g = torch.zeros(10, dtype=torch.float64)
    g[3] = 1e30
    with pytest.raises(ValueError, match=r"groups\[3\] = 1e\+30"):
        batched_kmeans(torch.randn(10, 2), g, [1, 1])


def test_kmeans_huge_float_k_is_refused_as_given():
    """k = 1e30 became -2**63 in the int64 cast, passed the group-size check, and the kernel
    refused it naming -9223372036854775808."""
    from spurfast.cluster import batched_kmeans

    with pytest.raises(ValueError, match=r"k=1e\+30 is larger than group 0's 10 members"):
        batched_kmeans(torch.randn(10, 2), torch.zeros(10, dtype=torch.int64), [1e30])


def test_kmeans_group_ids_that_are_not_whole_numbers_or_one_per_point_are_refused():
    # the int64 cast truncated group ids of 0.5 into group 0 (two groups clustered as one,
    # silently); an (N, 1) column failed in torch.bincount naming nothing
    from spurfast.cluster import batched_kmeans

    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"group ids must be integers; 6 are not, e.g. groups\[6\] = 0.5"):
        batched_kmeans(x, np.r_[np.zeros(6), np.full(6, 0.5)], [2])
    with pytest.raises(ValueError, match=r"groups\[0\] = nan"):
        batched_kmeans(x, np.full(12, np.nan), [2])
    with pytest.raises(ValueError, match=r"groups has shape \(12, 1\); expected one group id per point, \(12,\)"):
        batched_kmeans(x, torch.zeros(12, 1, dtype=torch.long), [2])
    whole = batched_kmeans(x, np.r_[np.zeros(6), np.ones(6)], [2, 2], seed=0)   # whole-number floats still work
    ints = batched_kmeans(x, np.r_[np.zeros(6, int), np.ones(6, int)], [2, 2], seed=0)
    assert torch.equal(whole.assign, ints.assign)


def _size_matched_by_cluster(scores, n_unrelated, null, null_n_unrelated, min_reference=100):
    """size_matched_pvalues as first written: every distinct size masks and sorts the whole
    null (O(#sizes x #null)), the window by (n + 1) products as now; the grouped version must
    give the same arrays."""
    from spurfast.scoring import SIZE_FACTOR, _tie_floor

    scores, null = np.asarray(scores, np.float64), np.asarray(null, np.float64)
    kept = np.asarray(null_n_unrelated) > 0   # no unrelated member: a score of 0, no one's reference
    null, null_n_unrelated = null[kept], np.asarray(null_n_unrelated)[kept]
    size_null = np.asarray(null_n_unrelated, np.float64) + 1
    log_null = np.log1p(np.asarray(null_n_unrelated, np.float64))
    # and such a real cluster is not tested: p 1, no reference, not beaten
    out, n_ref, beat = np.ones(len(scores)), np.zeros(len(scores), np.int64), np.zeros(len(scores), bool)
    if len(null) == 0:
        return out, n_ref, np.asarray(n_unrelated) > 0
    for n in np.unique(n_unrelated[n_unrelated > 0]):
        dist = np.abs(log_null - np.log1p(float(n)))
        window = (size_null <= SIZE_FACTOR * (n + 1)) & (n + 1 <= SIZE_FACTOR * size_null)
        here = n_unrelated == n
        ref = window
        if ref.sum() < min_reference:
            ref = np.zeros(len(null), bool)
            ref[np.argsort(dist, kind="stable")[:min_reference]] = True
        # a smaller null cluster counts scaled up to n unrelated members
        scaled = np.where(null_n_unrelated < n, null * n / np.maximum(null_n_unrelated, 1), null)
        beat[here] = scaled[window if window.any() else ref].max(initial=-np.inf) < _tie_floor(scores[here])
        out[here] = permutation_pvalues(scores[here], scaled[ref])
        n_ref[here] = ref.sum()
    return out, n_ref, beat


def test_a_cluster_larger_than_the_null_makes_is_not_significant_for_its_size_alone():
    """A score is a sum over members.  The reference of a size the null seldom makes was
    mostly smaller null clusters, compared as raw sums: a cluster of 80 unrelated members
    agreeing at the null's own rate got p = 0.08 against clusters of 10-39 (0.55 scaled), and
    clusters drawn as the null's were, at its largest sizes, significant at 0.05 in 11% of
    draws (2% scaled)."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(10, 40, 3000)
    null = 0.2 * sizes + rng.normal(0.0, 1.0, len(sizes)) * np.sqrt(sizes)
    p, n_ref, beat = size_matched_pvalues(np.array([0.2 * 80, 0.2 * 80 + 40.0]), np.array([80, 80]), null, sizes)
    assert n_ref.tolist() == [100, 100]
    assert p[0] > 0.3 and not beat[0]      # its rate is the null's: about half the scaled references reach it
    assert p[1] == pytest.approx(1 / 101) and beat[1]   # twice the rate beats every one
    # a null of many permutations drawn alike: the largest sizes are as often significant as the rest
    real_sizes = rng.integers(10, 40, 20000)
    real = 0.2 * real_sizes + rng.normal(0.0, 1.0, len(real_sizes)) * np.sqrt(real_sizes)
    p, _, _ = size_matched_pvalues(real, real_sizes, null, sizes)
    top = real_sizes >= 37
    assert (p[top] <= 0.05).mean() < 0.06 and (p <= 0.05).mean() < 0.06


def test_null_clusters_of_no_unrelated_member_are_no_ones_reference():
    """A one-member cluster's window (0 to 3 unrelated) held 533 null clusters of none, all
    scoring 0 by construction, and 24 comparable ones: one member's chance agreement passed
    as p = 1/558 = 0.002, a false finding; against the 24 it is p = 1/25."""
    rng = np.random.default_rng(0)
    sizes = np.r_[np.zeros(533, int), np.ones(17, int), np.full(4, 2), np.full(3, 3)]
    null = np.r_[np.zeros(533), rng.uniform(0.0, 0.9, 24)]
    p, n_ref, beat = size_matched_pvalues(np.array([0.954, 0.0]), np.array([1, 0]), null, sizes)
    assert p[0] == pytest.approx(1 / 25) and n_ref[0] == 24 and beat[0]
    assert p[1] == 1.0 and n_ref[1] == 0 and not beat[1]   # no unrelated member: untested
    # every null cluster of none: a tested cluster beats the empty reference, as before
    p, n_ref, beat = size_matched_pvalues(np.array([0.5, 0.0]), np.array([3, 0]), np.zeros(5), np.zeros(5, int))
    assert p.tolist() == [1.0, 1.0] and beat.tolist() == [True, False]


@pytest.mark.parametrize("seed", range(6))
def test_size_matched_pvalues_equal_the_per_cluster_masks(seed):
    # (a reference of its own: null clusters of no unrelated member left out, such real ones untested)
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 300))
    top = int(rng.choice([5, 60, 400]))           # few sizes (dense windows) or many (sparse ones)
    nu = rng.integers(0, top, m)
    nnu = rng.integers(0, top, int(rng.integers(1, 5000)))
    ns = np.round(rng.random(len(nnu)) * nnu, 1)   # rounded: ties between null and real scores
    sc = np.r_[ns[:m // 2], np.round(rng.random(m - m // 2) * nu[m // 2:], 1)]
    far = nnu + 10 * top                          # no null cluster near any real one's size
    for min_ref in (0, 1, 100, 700):
        for null_sizes in (nnu, far):
            got = size_matched_pvalues(sc, nu, ns, null_sizes, min_reference=min_ref)
            want = _size_matched_by_cluster(sc, nu, ns, null_sizes, min_reference=min_ref)
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kmeans_of_a_group_with_fewer_distinct_points_than_k_stops(backend, dtype):
    """A point on its centroid cannot fill an empty cluster (it ties with the centroid), but
    fp32's |x|^2 - 2 x.c + |c|^2 left such points about 1e-13 away: 40 copies of 3 latents
    with k = 8 re-seeded every iteration and ran all n_iter."""
    from spurfast.cluster import batched_kmeans

    torch.manual_seed(0)
    x = torch.randn(3, 16, dtype=dtype)[torch.arange(40) % 3]
    res = batched_kmeans(x, torch.zeros(40, dtype=torch.long), [8], n_iter=20, backend=backend)
    assert res.reseeded == 0 and res.n_iter < 20, (res.reseeded, res.n_iter)
    assert sorted(res.counts[0].tolist()) == [0] * 5 + [13, 13, 14]


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_kmeans_refills_an_empty_cluster_from_an_all_zero_point_beside_a_group_of_larger_k(offset):
    """Rows past a group's k hold zeros: an all-zero point (or a shifted far group's first
    point, which the shift makes zero) counted as on a centroid and never filled an empty
    cluster, which stayed empty to the end (two clusters asked, one made)."""
    from spurfast.cluster import batched_kmeans

    torch.manual_seed(0)
    a = torch.cat([torch.zeros(1, 2), torch.randn(20, 2) + 10]) + offset   # the first point: the outlier
    b = torch.randn(30, 2) - 5
    init = torch.zeros(2, 4, 2)
    init[0, 0], init[0, 1], init[1] = 10 + offset, 1000 + offset, b[:4]   # group 0's second centroid is far off
    res = batched_kmeans(torch.cat([a, b]), torch.tensor([0] * 21 + [1] * 30), [2, 4], n_iter=20, init=init)
    assert res.counts[0].tolist() == [20, 1, 0, 0] and res.reseeded == 1, (res.counts[0].tolist(), res.reseeded)


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("metric,seed,d,n", [("l2", 79, 64, 1000), ("cosine", 29, 33, 40)])
def test_kmeans_of_many_copies_of_fewer_points_than_k_stops(backend, metric, seed, d, n):
    """fp32 sums of many copies of a point leave its centroid an ulp off it, so neither its
    distance (> 0) nor the bitwise test said the copies were on their centroid: they
    re-seeded every iteration and ran all n_iter."""
    from spurfast.cluster import batched_kmeans

    torch.manual_seed(seed)
    x = (torch.randn(3, d) * float(torch.rand(1)) * 100)[torch.arange(n) % 3]
    res = batched_kmeans(x, torch.zeros(n, dtype=torch.long), [8], n_iter=20, backend=backend, metric=metric)
    assert res.reseeded == 0 and res.n_iter < 20, (res.reseeded, res.n_iter)
    assert sorted(res.counts[0].tolist())[:5] == [0] * 5


@pytest.mark.parametrize("backend", [None, "torch"])
def test_cosine_kmeans_of_copies_beside_an_all_zero_row_stops(backend):
    """Under cosine an all-zero row fills no cluster, yet the count of distinct points that
    stops futile re-seeding counted it: one zero row beside 1,000 copies of 3 latents, k = 8,
    re-seeded an ulp-off copy every iteration and ran all n_iter.  A cluster of zero rows
    alone still leaves room for a point that can fill an empty one."""
    from spurfast.cluster import batched_kmeans

    torch.manual_seed(23)
    x = (torch.randn(3, 64) * float(torch.rand(1)) * 100)[torch.arange(1000) % 3]
    x = torch.cat([x, torch.zeros(1, 64)])
    res = batched_kmeans(x, torch.zeros(len(x), dtype=torch.long), [8], n_iter=20, backend=backend, metric="cosine")
    assert res.reseeded == 0 and res.n_iter < 20, (res.reseeded, res.n_iter)
    # zero rows alone in cluster 0, both directions in cluster 1: one of them fills cluster 2
    a, b = torch.tensor([1.0, 0.2, 0.0]), torch.tensor([0.2, 1.0, 0.0])
    x = torch.cat([torch.zeros(2, 3), a.repeat(30, 1), b.repeat(30, 1)])
    init = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [-1.0, -1.0, 0.0], [-1.0, -1.0, 0.1]]])
    res = batched_kmeans(x, torch.zeros(len(x), dtype=torch.long), [4], n_iter=20, backend=backend, metric="cosine",
                         init=init)
    assert res.counts[0].tolist() == [2, 30, 30, 0] and res.reseeded == 1, (res.counts[0].tolist(), res.reseeded)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_kmeans_of_points_of_no_dimension_is_one_cluster(metric):
    """Round 12's count of distinct points (torch.unique) crashed on (N, 0) points with
    torch's "There are 0 sized dimensions, and they aren't selected"; before it they were
    one cluster, as points that are all the same are."""
    from spurfast.cluster import batched_kmeans

    res = batched_kmeans(torch.zeros(5, 0), torch.zeros(5, dtype=torch.long), [2], metric=metric)
    assert res.counts.tolist() == [[5, 0]] and res.assign.tolist() == [0] * 5 and res.reseeded == 0


@pytest.mark.parametrize("backend", [None, "torch"])
def test_kmeans_of_points_scaled_down_runs_as_the_unscaled_do(backend):
    """L2 k-means is scale-free, but the stopping rule took tol absolutely below an inertia
    of 1 (max(1, inertia)): the same points times 1e-3 stopped after 3 iterations,
    unconverged, with other clusters than the unscaled points got."""
    from spurfast.cluster import batched_kmeans

    torch.manual_seed(0)
    x, g = torch.randn(2000, 8), torch.zeros(2000, dtype=torch.long)
    want = batched_kmeans(x, g, [16], n_iter=50, seed=0, backend=backend)
    got = batched_kmeans(x * 1e-3, g, [16], n_iter=50, seed=0, backend=backend)
    assert got.n_iter == want.n_iter and torch.equal(got.assign, want.assign), (got.n_iter, want.n_iter)


def test_bh_leaves_an_untested_nan_out_of_the_other_q_values():
    # one NaN made every q-value NaN; R's p.adjust: NaN stays NaN, the others are adjusted
    # among the m = 3 p-values there are (sorted .005 .01 .04 -> .015 .015 .04)
    q = bh_qvalues(np.array([0.01, np.nan, 0.04, 0.005]))
    assert np.isnan(q[1])
    np.testing.assert_allclose(q[[0, 2, 3]], [0.015, 0.04, 0.015])
    assert np.isnan(bh_qvalues(np.array([np.nan, np.nan]))).all()
    with pytest.raises(ValueError, match="1-D"):
        bh_qvalues(np.zeros((2, 2)))


def test_an_infinite_score_ties_infinite_null_scores():
    # inf - 1e-9 * inf is NaN: +inf tied no null score and got p = 1 / (1 + #null)
    null = np.array([1.0, 2.0, np.inf, np.inf])
    np.testing.assert_allclose(permutation_pvalues(np.array([np.inf, -np.inf, 3.0]), null), [3 / 5, 1.0, 3 / 5])
    p, _, beat = size_matched_pvalues(np.array([np.inf]), np.array([3]), null, np.full(4, 3))
    np.testing.assert_allclose(p, [3 / 5])
    assert not beat[0]


def test_a_nan_score_is_refused_not_the_most_significant():
    # searchsorted put NaN above every null score: p = 1 / (1 + #null), a finding of nothing
    null = np.arange(200.0)
    with pytest.raises(ValueError, match=r"scores has 1 NaN value\(s\), e.g. scores\[0\]"):
        size_matched_pvalues(np.array([np.nan, 1.0]), np.array([3, 3]), null, np.full(200, 3))
    with pytest.raises(ValueError, match=r"null has 200 NaN"):
        size_matched_pvalues(np.array([1.0]), np.array([3]), np.full(200, np.nan), np.full(200, 3))
    with pytest.raises(ValueError, match="scores has 1 NaN"):
        permutation_pvalues(np.array([np.nan]), np.array([1.0, 2.0]))


def test_size_window_includes_clusters_at_exactly_the_size_factor():
    """Sizes were compared as a difference of logarithms: at exactly the factor ((n + 1) twice
    the other's) rounding kept 4 and 9 unrelated apart but put 3 and 7 together."""
    for small, large in ((4, 9), (3, 7), (10, 21)):
        null_sizes = np.r_[np.full(50, small), np.full(50, large)]
        null = np.r_[np.zeros(50), np.full(50, 10.0)]          # the larger null clusters all score higher
        p, n_ref, _ = size_matched_pvalues(np.array([5.0]), np.array([small]), null, null_sizes, min_reference=10)
        assert n_ref.tolist() == [100] and p[0] == pytest.approx(51 / 101), (small, large)
        p, n_ref, _ = size_matched_pvalues(np.array([5.0]), np.array([small]), null, np.r_[null_sizes[:50],
                                           np.full(50, large + 1)], min_reference=10)   # past the factor: out
        assert n_ref.tolist() == [50] and p[0] == pytest.approx(1 / 51), (small, large)


def test_the_shuffled_share_is_the_share_of_predictions_the_null_changes():
    # label 0: classes [1, 1, 2, 2] -> each keeps its class with chance 1/2: 4 x 1/2;
    # label 5: [3, 3, 3] -> none changes; unlabelled: [0, 1] -> each changes with chance 1/2
    g = np.array([1, 1, 2, 2, 3, 3, 3, 0, 1])
    lab = np.array([0, 0, 0, 0, 5, 5, 5, -1, -1])
    assert shuffled_share(g, lab) == pytest.approx((4 * 0.5 + 0 + 2 * 0.5) / 9)
    assert shuffled_share(np.full(7, 4), np.zeros(7, int)) == 0.0
    assert shuffled_share(np.zeros(0, int), np.zeros(0, int)) == 0.0
    rng = np.random.default_rng(0)
    g, lab = rng.integers(0, 5, 2000), rng.integers(-1, 3, 2000)
    seen = np.mean([(permuted_predictions(g, lab, rng) != g).mean() for _ in range(200)])
    assert shuffled_share(g, lab) == pytest.approx(seen, abs=0.005)


def test_look_alike_strata_split_labels_by_the_class_their_images_look_like():
    # labels 0 and 1; images 0-59 of label 0 have label-1 neighbours, 60-119 none (another label
    # 2 instead); the 10 unlabelled all look like label 0
    labels = np.r_[np.zeros(120, np.int64), np.ones(100, np.int64), np.full(100, 2), np.full(10, -1)]
    n = len(labels)
    wide = np.zeros((n, 10), np.int64)
    wide[:60] = np.arange(120, 130)          # label 1 everywhere: look-alike 1, share 1.0
    wide[60:120, :3] = np.arange(220, 223)   # label 2 on 3 of 10: look-alike 2, share 0.3
    wide[60:120, 3:] = np.arange(7)          # the rest their own label
    wide[120:] = np.arange(10)               # the others: label-0 neighbours
    st = look_alike_strata(labels, wide, min_size=50)
    assert len(np.unique(st[:60])) == 1 and len(np.unique(st[60:120])) == 1 and st[0] != st[60]
    for s in np.unique(st):   # every stratum within one label (the unlabelled count as one)
        assert len(np.unique(labels[st == s])) == 1, s
    # a look-alike group under min_size has no stratum of its own: it pools with its label
    few = look_alike_strata(labels, wide, min_size=61)
    assert len(np.unique(few[:120])) == 1
    # every stratum holds min_size images or a whole label
    for m in (1, 20, 50, 61, 500):
        got = look_alike_strata(labels, wide, min_size=m)
        for s in np.unique(got):
            size, lab = int((got == s).sum()), labels[got == s][0]
            assert size >= m or size == int((labels == lab).sum()), (m, s, size)


def test_look_alike_strata_pool_a_small_rest_into_the_largest_stratum():
    # 30 images of a label look like label 1, 70 like label 2, min_size 50: the 30 pool into the
    # label's rest, which is still under 50, so they join the 70 (one stratum, the whole label)
    labels = np.r_[np.zeros(100, np.int64), np.ones(20, np.int64), np.full(20, 2)]
    wide = np.zeros((len(labels), 4), np.int64)
    wide[:30] = np.arange(100, 104)
    wide[30:100] = np.arange(120, 124)
    wide[100:] = np.arange(4)
    st = look_alike_strata(labels, wide, min_size=50)
    assert len(np.unique(st[:100])) == 1
    assert len(np.unique(look_alike_strata(labels, wide, min_size=30)[:100])) == 2   # both big enough


# ---- scoring.size_matched_pvalues: infinite scores in the (non-widened) window branch ----
def test_an_infinite_score_ties_infinite_null_scores_in_a_full_window():
    # min_reference=4 and 4 null clusters of the same size: the window branch, not the widened one
    null = np.array([1.0, 2.0, np.inf, np.inf])
    p, n_ref, beat = size_matched_pvalues(np.array([np.inf]), np.array([3]), null, np.full(4, 3), min_reference=4)
    assert n_ref.tolist() == [4]
    np.testing.assert_allclose(p, [3 / 5])        # the two +inf null clusters tie: (1 + 2) / (1 + 4)
    assert not beat[0]                            # a tie with the best null cluster is not beating it


# ---- scoring.bh_qvalues: a p-value well above 1 is a wrong input ----
def test_bh_refuses_a_p_value_between_1_and_2():
    for bad in (1.5, 1 + 1e-6):   # e.g. a Bonferroni-doubled p left unclipped
        with pytest.raises(ValueError, match=r"p-values must lie in \[0, 1\]"):
            bh_qvalues(np.array([0.01, bad]))


# ---- scoring.look_alike_strata: look-alike choice, band edges, pooling thresholds ----
def _strata_pool(groups, m=20, min_size=1):
    """Label-0 images in ``groups`` [(count, j)], each with j of its m neighbours of label 1
    (the rest label 0); then m images of label 1.  Returns (strata, slices of the groups)."""
    n0 = sum(c for c, _ in groups)
    labels = np.r_[np.zeros(n0, np.int64), np.ones(m, np.int64)]
    ones = n0 + np.arange(m)
    wide = np.zeros((len(labels), m), np.int64)
    at, sl = 0, []
    for c, j in groups:
        wide[at:at + c, :j] = ones[:j]
        wide[at:at + c, j:] = np.arange(m - j)          # label-0 neighbours
        sl.append(slice(at, at + c))
        at += c
    wide[n0:] = ones
    return look_alike_strata(labels, wide, min_size), sl


def _same(st, a, b):
    return len(np.unique(np.r_[st[a], st[b]])) == 1


def test_look_alike_is_the_most_common_other_label_and_the_nearer_on_a_tie():
    # label 0 images 0-4; label 1 images 10-13; label 2 images 20-23; m = 4 neighbours
    labels = np.full(24, -2, np.int64)
    labels[:10], labels[10:20], labels[20:] = 0, 1, 2
    wide = np.zeros((24, 4), np.int64)
    wide[:] = [5, 6, 7, 8]                    # label 0: no look-alike
    wide[10:20], wide[20:] = [10, 11, 12, 13], [20, 21, 22, 23]
    wide[0] = [20, 10, 11, 12]                # label 1 x3, label 2 x1 (nearest): look-alike 1, share 0.75
    wide[1] = [10, 11, 12, 5]                 # label 1 x3: look-alike 1, share 0.75
    wide[2] = [20, 10, 5, 6]                  # label 2 and label 1 once each: the nearer, 2, share 0.25
    wide[3] = [21, 5, 6, 7]                   # label 2 once: look-alike 2, share 0.25
    labels[labels == -2] = 0
    st = look_alike_strata(labels, wide, min_size=1)
    assert st[0] == st[1]                     # most common, not least common
    assert st[2] == st[3]                     # nearer on a tie
    assert st[0] != st[2] and st[0] != st[4]


def test_a_share_exactly_on_a_band_edge_falls_in_the_band_above():
    # share 0.5 (10 of 20) lies in the band [0.5, 1], with share 0.75; 0.45 in the band below
    st, (a, b, c) = _strata_pool([(5, 10), (5, 15), (5, 9)])
    assert _same(st, a, b) and not _same(st, a, c)


def test_a_stratum_of_exactly_min_size_is_kept():
    # two bands of one (label, look-alike), 40 each, min_size 40: neither is pooled
    st, (a, b) = _strata_pool([(40, 20), (40, 6)], min_size=40)
    assert not _same(st, a, b)


def test_a_pool_of_exactly_min_size_stays_a_stratum_of_its_own():
    # band 3: 60; bands 2 and 1: 20 each, pooled into 40 = min_size: kept apart from the 60
    st, (a, b, c) = _strata_pool([(60, 20), (20, 6), (20, 3)], min_size=40)
    assert _same(st, b, c) and not _same(st, a, b)


def test_a_small_pool_joins_the_parents_largest_stratum():
    # bands 3 (70) and 2 (50) kept; band 1 (10) still under 40 after pooling: it joins the 70
    st, (a, b, c) = _strata_pool([(70, 20), (50, 6), (10, 3)], min_size=40)
    assert _same(st, a, c) and not _same(st, b, c)


def test_unrelated_to_class_by_label_and_for_unlabelled_images_by_permission():
    from spurfast.scoring import unrelated_to_class

    top2 = np.array([[3, 1], [3, 1], [3, 1], [3, 1], [3, 1]])
    labels = np.array([1, 3, -1, -1, 3])
    cls = np.array([3, 3, 3, 3, 1])
    unknown_ok = np.array([False, True, True, False, False])
    # labelled: its label decides, whatever it may; unlabelled: only where allowed (a suspect is not)
    np.testing.assert_array_equal(unrelated_to_class(top2, labels, cls, unknown_ok),
                                  [True, False, True, False, True])
