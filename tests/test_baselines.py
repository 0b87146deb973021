"""Baselines on hand-made stores (the evaluation's tiny sweep runs them end to end)."""
import numpy as np
import pytest
import torch

from spurfast import baselines as B


class _Store:
    """The columns and manifest a baseline reads from an embedding store."""

    def __init__(self, pred, feats, labels, probs):
        self.n, self.complete, self.root = len(pred), True, "hand-made-store"
        self.done = self.n
        self.manifest = {"num_classes": probs.shape[1]}
        self._cols = {"pred": pred, "ok": np.ones(self.n, bool), "feats": feats, "labels": labels, "probs": probs}

    def __getitem__(self, name):
        return self._cols[name]


def test_george_raises_k_for_large_classes_as_spurfast_does():
    # one class of 1,200 predicted images and one of 300: spurfast clusters the first into
    # ceil(1200 / 100) = 12 (DiscoverConfig.max_mean_cluster_size); GEORGE got 8 in both
    rng = np.random.default_rng(0)
    pred = np.repeat([0, 1], [1200, 300])
    feats = rng.normal(size=(1500, 6)).astype(np.float32)
    probs = np.eye(2, dtype=np.float32)[pred]
    cands = B.george(_Store(pred, feats, pred.copy(), probs), k=8, seed=0)
    per_class = np.bincount([c["class"] for c in cands], minlength=2)
    assert per_class.tolist() == [12, 8]
    assert sorted(np.concatenate([c["members"] for c in cands]).tolist()) == list(range(1500))
    fixed = B.george(_Store(pred, feats, pred.copy(), probs), k=8, seed=0, max_mean_cluster_size=0)
    assert np.bincount([c["class"] for c in fixed], minlength=2).tolist() == [8, 8]


def test_the_pixel_ablation_ranks_by_its_findings_pattern_as_spurfast_does(monkeypatch):
    # its findings kept the thumbnail probe's ranking, where spurfast's are re-ranked by their
    # extracted pattern: the ablation lacked a step of the pipeline it stands in for
    import torch

    from spurfast.data.sources import ArraySource
    from spurfast.discover import DiscoveryResult
    from spurfast.metrics import average_precision

    n, carriers = 300, np.arange(0, 300, 10)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 0.5, (n, 1, 10, 10)).astype(np.float32)
    x[carriers, :, :2, :2] = 1.0                      # a 2x2 stamp: 4% of the image
    labels = np.ones(n, np.int64)                      # every image is of class 1 ...
    pred = labels.copy()
    pred[carriers] = 0                                 # ... and the stamp makes the model call it 0
    store = _Store(pred, np.zeros((n, 2), np.float32), labels, np.eye(2, dtype=np.float32)[pred])
    probe = rng.normal(size=n)                         # a probe ranking that knows nothing
    finding = {"rank": 1, "class": 0, "cluster": 0, "size": len(carriers), "members": carriers.tolist(),
               "exemplars": carriers[:4].tolist(), "q_value": 0.01, "score": 1.0}
    monkeypatch.setattr(B, "discover", lambda *a, **k: DiscoveryResult([dict(finding)], [], {1: probe.copy()}, {}, {}))
    (cand,) = B.pixels(store, ArraySource(torch.from_numpy(x), labels, name="stamped"), B.DiscoverConfig(seed=0))
    carries = np.zeros(n, bool)
    carries[carriers] = True
    assert average_precision(probe, carries) < 0.3
    assert average_precision(cand["ranking"], carries) == pytest.approx(1.0)
    assert cand["mask"] is not None and cand["mask"][:2, :2].all() and cand["mask"].sum() == 4



def test_the_pixel_ablation_names_another_pool_before_reading_it_and_an_unfinished_store(tmp_path):
    # another pool failed after the whole pass with numpy's boolean-index error; an unfinished
    # store with an AttributeError ('done')
    import torch

    from spurfast.data.sources import ArraySource
    from spurfast.store import EmbeddingStore
    n = 20
    pred = np.arange(n) % 2
    store = _Store(pred, np.zeros((n, 2), np.float32), pred.copy(), np.eye(2, dtype=np.float32)[pred])
    pool = ArraySource(torch.rand(n + 5, 1, 8, 8), np.zeros(n + 5, np.int64), name="other")

    def unread(*a, **k):
        raise AssertionError("the pool was read before the check")
    pool.get_batch = unread
    with pytest.raises(ValueError, match=f"reads pool other of {n + 5} images, but store hand-made-store holds {n}"):
        B.pixels(store, pool, B.DiscoverConfig(seed=0))
    half = EmbeddingStore.create(tmp_path / "s", n, {"pred": ((n,), "int32"), "probs": ((n, 2), "float32"),
                                                     "mu": ((n, 2), "float32"), "labels": ((n,), "int64"),
                                                     "ok": ((n,), "bool")}, {"num_classes": 2})
    half.write(0, {"pred": pred[:10], "probs": np.eye(2, dtype=np.float32)[pred[:10]],
                   "mu": np.zeros((10, 2), np.float32), "labels": pred[:10], "ok": np.ones(10, bool)})
    with pytest.raises(ValueError, match=r"is unfinished \(10/20\)"):
        B.pixels(half, ArraySource(torch.rand(n, 1, 8, 8), pred.copy(), name="pool"), B.DiscoverConfig(seed=0))


def test_non_finite_features_are_named_by_pool_index_in_every_feature_space():
    # standardised, one NaN spread to every row: "latents contain NaN/inf for 600 images", and
    # activation clustering's SVD did not converge
    from spurfast.feature_view import feature_space
    rng = np.random.default_rng(0)
    pred = np.repeat([0, 1], 30)
    feats = rng.normal(size=(60, 4)).astype(np.float32)
    feats[45, 2] = np.nan
    store = _Store(pred, feats, pred.copy(), np.eye(2, dtype=np.float32)[pred])
    store._cols["ok"][3] = False
    feats[3, 0] = np.inf                        # unreadable: its row is not read
    msg = r"the classifier's features \(its feats column\) contain NaN/inf for 1 image\(s\) with a prediction, " \
          r"first pool index 45"
    for run in (feature_space, lambda s: B.george(s, k=2, seed=0), B.activation_clustering):
        with pytest.raises(ValueError, match=msg):
            run(store)


def test_pattern_ranked_gives_a_baselines_candidates_spurfasts_ranking_step():
    # GEORGE ranked the pool by closeness to its cluster's centroid in feature space and
    # activation clustering by its 2-means margin: neither had the pattern ranking spurfast's
    # findings get, so spurfast's AP wins over them were partly that step's
    import torch

    from spurfast.data.sources import ArraySource
    from spurfast.metrics import average_precision

    n, carriers = 300, np.arange(0, 300, 10)
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 0.5, (n, 1, 10, 10)).astype(np.float32)
    x[carriers, :, :2, :2] = 1.0                      # a 2x2 stamp: 4% of the image
    labels = np.ones(n, np.int64)
    pred = labels.copy()
    pred[carriers] = 0                                 # the stamp makes the model call them 0
    feats = rng.normal(size=(n, 4)).astype(np.float32)   # features that know nothing of the stamp
    store = _Store(pred, feats, labels, np.eye(2, dtype=np.float32)[pred])
    carries = np.zeros(n, bool)
    carries[carriers] = True
    own = rng.normal(size=n)
    cands = [{"class": 0, "members": carriers[:20], "ranking": own, "q_value": None, "score": 2.0},
             {"class": 1, "members": np.arange(1, 40, 2), "ranking": rng.normal(size=n), "q_value": None, "score": 1.0},
             {"class": 1, "members": np.arange(41, 60), "ranking": rng.normal(size=n), "q_value": None, "score": 0.5}]
    valid, space = B.standardised_features(store)
    assert valid.tolist() == list(range(n)) and space.shape == (n, 4)
    got = B.pattern_ranked(cands, store, ArraySource(torch.from_numpy(x), labels, name="stamped"), space, top=2)
    assert len(got) == 2                                         # the first `top` only
    for g, c in zip(got, cands):                                 # members, class, score kept
        assert g["class"] == c["class"] and g["score"] == c["score"]
        assert np.array_equal(g["members"], c["members"])
    assert average_precision(own, carries) < 0.3
    assert average_precision(got[0]["ranking"], carries) == pytest.approx(1.0)
    assert got[0]["mask"][:2, :2].all() and got[0]["mask"].sum() == 4
    assert average_precision(cands[0]["ranking"], carries) < 0.3   # the input candidates are left as they were
    with pytest.raises(ValueError, match="space has 299 rows, expected one per valid pool item \\(300\\)"):
        B.pattern_ranked(cands, store, ArraySource(torch.from_numpy(x), labels, name="stamped"), space[1:])


def _george_store():
    """Class 0: blob A (0-39, labelled 0) and blob B (40-49: 40-44 labelled 1, 45-49 unlabelled);
    class 1: one blob (50-99, labelled 1)."""
    rng = np.random.default_rng(0)
    pred = np.repeat([0, 0, 1], [40, 10, 50])
    centres = np.array([[0.0, 0.0, 0.0], [8.0, 8.0, 8.0], [-8.0, 0.0, 0.0]])
    feats = (centres[np.repeat([0, 1, 2], [40, 10, 50])] + 0.1 * rng.normal(size=(100, 3))).astype(np.float32)
    labels = pred.copy()
    labels[40:45] = 1
    labels[45:50] = -1
    return _Store(pred, feats, labels, np.eye(2, dtype=np.float32)[pred])


def test_george_ranks_first_the_cluster_with_most_members_unrelated_to_its_class():
    # ranked by cluster size, ascending, or with the pool ranked by distance instead of closeness,
    # the planted blob B was not the first candidate nor its members the top of its ranking

    cands = B.george(_george_store(), k=2, seed=0)
    assert len(cands) == 4 and [c["score"] for c in cands] == [10.0, 0.0, 0.0, 0.0]
    best = cands[0]
    assert best["class"] == 0 and sorted(best["members"].tolist()) == list(range(40, 50))
    assert sorted(np.argsort(-best["ranking"], kind="stable")[:10].tolist()) == list(range(40, 50))


def test_george_counts_unlabelled_members_unless_they_are_suspects():
    # the unknown_ok mask inverted dropped every unlabelled member from the score (and counted suspects)

    store = _george_store()
    assert B.george(store, k=2, seed=0)[0]["score"] == 10.0
    suspect = np.zeros(store.n, bool)
    suspect[45:50] = True
    assert B.george(store, k=2, seed=0, suspect=suspect)[0]["score"] == 5.0


def test_george_lists_no_empty_cluster():
    # a class with fewer distinct features than k kept its empty clusters as member-less candidates

    pred = np.repeat([0, 1], 30)
    feats = np.repeat(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0], [5.0, 5.0], [9.0, 1.0]], np.float32),
                      [15, 15, 10, 10, 10], axis=0)
    store = _Store(pred, feats, pred.copy(), np.eye(2, dtype=np.float32)[pred])
    cands = B.george(store, k=4, seed=0)
    assert all(len(c["members"]) for c in cands)
    assert sorted(np.concatenate([c["members"] for c in cands]).tolist()) == list(range(60))
    assert len(cands) == 5


def _activation_store():
    """Class 0: 45 points at the origin (0-44) and 15 at 10 along axis 0 (45-59); class 1: one
    round blob at 20 along axis 1 (60-119); class 2: 6 + 2 points (126, 127 the pair); class 3: 3 points."""
    rng = np.random.default_rng(0)
    c0 = np.r_[0.3 * rng.normal(size=(45, 4)), [10.0, 0, 0, 0] + 0.3 * rng.normal(size=(15, 4))]
    c1 = [0, 20.0, 0, 0] + rng.normal(size=(60, 4))
    c2 = np.r_[[0, 0, 20.0, 0] + 0.1 * rng.normal(size=(6, 4)), [5.0, 0, 20.0, 0] + 0.1 * rng.normal(size=(2, 4))]
    c3 = [0, 0, 0, 20.0] + rng.normal(size=(3, 4))
    feats = np.concatenate([c0, c1, c2, c3]).astype(np.float32)
    pred = np.repeat([0, 1, 2, 3], [60, 60, 8, 3])
    return _Store(pred, feats, pred.copy(), np.eye(4, dtype=np.float32)[pred])


def test_activation_clustering_flags_the_smaller_cluster_and_ranks_by_its_split():
    # swapping the smaller and the larger cluster, the margin's sign, the 2-means argmin, the
    # class-size floor of 4 or the descending silhouette order each broke one of these

    cands = B.activation_clustering(_activation_store(), seed=0)
    assert sorted(c["class"] for c in cands) == [0, 1, 2]            # class 3 has fewer than 4 points
    scores = [c["score"] for c in cands]
    assert scores == sorted(scores, reverse=True) and cands[-1]["class"] == 1   # the round blob splits worst
    (c0,) = [c for c in cands if c["class"] == 0]
    assert sorted(c0["members"].tolist()) == list(range(45, 60))
    assert c0["relative_size"] == pytest.approx(0.25)
    assert sorted(np.argsort(-c0["ranking"], kind="stable")[:15].tolist()) == list(range(45, 60))
    (c2,) = [c for c in cands if c["class"] == 2]
    assert sorted(c2["members"].tolist()) == [126, 127]


def test_activation_clustering_with_one_dimension_keeps_the_first_principal_component():
    # dims - 1 components: with dims=1 none were left and the split of class 0 was not found

    cands = B.activation_clustering(_activation_store(), dims=1, seed=0)
    (c0,) = [c for c in cands if c["class"] == 0]
    assert sorted(c0["members"].tolist()) == list(range(45, 60))


def test_the_pixel_ablation_reads_every_image_of_a_pool_larger_than_one_batch():
    # batches that fell short of the 1024-step dropped rows: the space no longer matched the store
    from spurfast.data.sources import ArraySource
    from spurfast.pixel_probe import thumbnails

    n = 1100
    x = torch.rand(n, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    pred = np.arange(n) % 2
    store = _Store(pred, np.zeros((n, 2), np.float32), pred.copy(), np.eye(2, dtype=np.float32)[pred])
    px = B.pixel_store(store, ArraySource(x, pred.copy(), name="big"))
    np.testing.assert_array_equal(px["mu"], thumbnails(x).numpy())


def test_pattern_ranked_probes_members_by_their_rows_and_passes_on_the_unrelated_non_suspects(monkeypatch):
    # with unreadable images first, members' pool indices read as rows of `space` fitted the probe on
    # other images; an inverted suspect mask gave the pixel probe suspects and not unlabelled carriers
    import spurfast.pattern_rank as PR

    n = 40
    rng = np.random.default_rng(0)
    pred = np.repeat([0, 1], 20)
    pred[:4] = -1                                              # unreadable at embedding (ok False)
    labels = pred.copy()
    labels[[10, 11]] = 1                                       # labelled otherwise: unrelated
    labels[[14, 15]] = -1                                      # unlabelled: unrelated unless a suspect
    store = _Store(pred, rng.normal(size=(n, 3)).astype(np.float32), labels,
                   np.eye(2, dtype=np.float32)[np.maximum(pred, 0)])
    store._cols["ok"][:4] = False
    suspect = np.zeros(n, bool)
    suspect[15] = True
    valid, space = B.standardised_features(store)
    probed, passed = [], []
    real_probe = B._probe
    monkeypatch.setattr(B, "_probe", lambda z, g, rows, cls, seed: probed.append(np.asarray(rows)) or
                        real_probe(z, g, rows, cls, seed))
    monkeypatch.setattr(B, "extract_pattern", lambda f, *a, **k: f.update(_mask=None))
    monkeypatch.setattr(PR, "pattern_rankings", lambda findings, *a, **k: passed.extend(findings))
    members = np.arange(10, 16)
    B.pattern_ranked([{"class": 0, "members": members, "ranking": None, "q_value": None, "score": 1.0}],
                     store, pool=None, space=space, suspect=suspect)
    np.testing.assert_array_equal(valid[probed[0]], members)
    assert passed[0]["_unrelated"].tolist() == [10, 11, 14]
