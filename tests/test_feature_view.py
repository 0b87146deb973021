"""The feature view (spurfast.feature_view): discovery in the classifier's penultimate features,
its findings joined to the latent ones by q-value."""
import json
import warnings

import numpy as np
import pytest
import torch

from spurfast.data import ArraySource
from spurfast.discover import DiscoverConfig, DiscoveryResult
from spurfast.feature_view import SpaceView, feature_space, join_views, merge_by_q
from spurfast.metrics import average_precision
from tests.test_residual import _PixelShortcutModel, _blob_pool


def _result(findings, rankings):
    return DiscoveryResult(findings=findings, clusters=[{"cls": 0, "cluster": 0}], rankings=rankings, config={},
                           pool={})


def test_join_views_merges_by_q_and_renumbers_ranks_with_their_rankings():
    latent = _result([{"rank": 1, "id": "a", "q_value": 0.01}, {"rank": 2, "id": "b", "q_value": 0.04}],
                     {1: np.array([1.0]), 2: np.array([2.0])})
    features = _result([{"rank": 1, "id": "x", "q_value": 0.001, "view": "features"},
                        {"rank": 2, "id": "y", "q_value": 0.02, "view": "features"},
                        {"rank": 3, "id": "z", "q_value": 0.09, "view": "features"}],
                       {1: np.array([10.0]), 2: np.array([20.0]), 3: np.array([30.0])})
    join_views(latent, features)
    assert [(f["rank"], f["id"]) for f in latent.findings] == [(1, "x"), (2, "a"), (3, "y"), (4, "b"), (5, "z")]
    assert {r: float(v[0]) for r, v in latent.rankings.items()} == {1: 10.0, 2: 1.0, 3: 20.0, 4: 2.0, 5: 30.0}
    assert latent.clusters == [{"cls": 0, "cluster": 0}, {"cls": 0, "cluster": 0, "view": "features"}]
    assert merge_by_q([], []) == []
    # at an equal q-value the first family's finding stays ahead (placed before a *larger* q only)
    tied = merge_by_q([{"id": "a", "q_value": 0.02}], [{"id": "x", "q_value": 0.02}, {"id": "y", "q_value": 0.01}])
    assert [f["id"] for f in tied] == ["a", "x", "y"]


class _Store:
    def __init__(self, cols):
        self.cols, self.n, self.complete, self.manifest, self.root = cols, len(cols["pred"]), True, {}, "mem"
        self.done = self.n

    def __getitem__(self, name):
        return self.cols[name]


def test_feature_space_standardises_the_readable_predicted_rows_only():
    feats = np.array([[1, 10], [3, 10], [100, -5], [5, 10]], np.float16)
    store = _Store({"feats": feats, "pred": np.array([0, 1, 1, -1]), "ok": np.array([1, 1, 0, 1], bool),
                    "mu": np.zeros((4, 2), np.float32)})
    space = feature_space(store)
    assert space.dtype == np.float32 and space.shape == (4, 2)
    np.testing.assert_allclose(space[:2], [[-1, 0], [1, 0]])     # rows 2 (unreadable) and 3 (no class) left out
    assert not space[2:].any()
    view = SpaceView(store, space)
    assert view["mu"] is space and view["pred"] is store.cols["pred"] and view.n == 4
    with pytest.raises(ValueError, match="space has 3 rows; store mem has 4"):
        SpaceView(store, space[:3])
    # no row both readable and predicted: zeros, not a bare numpy reshape error
    none = _Store({"feats": feats, "pred": np.full(4, -1), "ok": np.ones(4, bool), "mu": np.zeros((4, 2), np.float32)})
    with warnings.catch_warnings():   # not standardised at all: the mean of no rows warned, then was NaN
        warnings.simplefilter("error")
        assert feature_space(none).shape == (4, 2) and not feature_space(none).any()
    # an unfinished store: discovery's own error, which says how far the pass got
    from spurfast.feature_view import discover_features
    store.complete, store.done = False, 3
    with pytest.raises(ValueError, match=r"embedding store mem is unfinished \(3/4\); resume the pass first"):
        discover_features(store, DiscoverConfig(k=2), space=space)


def test_discover_run_with_the_feature_view_reports_its_findings(tmp_path):
    from spurfast.models import VAEConfig
    from spurfast.models.train import train_vae
    from spurfast.pipeline import run_discovery

    x, labels, carries = _blob_pool()
    pool = ArraySource(x, labels, name="blobs")
    vae = train_vae(pool, VAEConfig.for_images(1, 16, 4), epochs=6, seed=0, progress=False)
    cfg = DiscoverConfig(k=4, n_null=10, max_null=10)
    plain, _, _ = run_discovery(pool, _PixelShortcutModel(), vae, tmp_path / "plain", num_classes=3, config=cfg,
                                progress=False)
    doc, result, _ = run_discovery(pool, _PixelShortcutModel(), vae, tmp_path / "run", num_classes=3, config=cfg,
                                   progress=False, feature_view=True)
    viewed = [f for f in doc["findings"] if f.get("view") == "features"]
    assert viewed and all(f["class"] == 2 for f in viewed)       # the model's logits hold the pixel
    assert all(carries[f["members"]].all() for f in viewed)
    assert all(f["confirmed"] for f in viewed)                   # the view ships its confirmed findings only
    # the latent findings are the plain run's, the ranks one run of 1..n over both families
    assert len(doc["findings"]) == len(plain["findings"]) + len(viewed)
    assert sorted(f["rank"] for f in doc["findings"]) == list(range(1, len(doc["findings"]) + 1))
    assert not any("view" in f for f in plain["findings"])
    best = max(average_precision(np.load(tmp_path / "run" / "rankings" / f"finding{f['rank']}.npy"), carries)
               for f in viewed)
    assert best > 0.99
    for f in viewed:
        assert f["confirm"] is not None and all((tmp_path / "run" / p).is_file() for p in f["images"].values())
    on_disk = json.loads((tmp_path / "run" / "findings.json").read_text())
    assert on_disk["config"]["inputs"]["feature_view"] is True and "feature_view" not in plain["config"]["inputs"]
    assert [f.get("view") for f in on_disk["findings"]] == [f.get("view") for f in doc["findings"]]
    page = (tmp_path / "run" / "report.html").read_text()
    assert "members in the classifier's feature space" in page
    assert "for the feature view's findings the neighbours are in the classifier's feature space" in page
    assert "feature view" not in (tmp_path / "plain" / "report.html").read_text()


def test_feature_view_must_be_a_bool_before_any_work(tmp_path):
    from spurfast.models import VAE, SmallCNN, VAEConfig
    from spurfast.pipeline import run_discovery

    pool = ArraySource(torch.rand(20, 1, 16, 16), np.zeros(20, dtype=np.int64))
    with pytest.raises(ValueError, match="feature_view must be True or False, got 'yes'"):
        run_discovery(pool, SmallCNN(1, 2, 16), VAE(VAEConfig.for_images(1, 16, 4)), tmp_path / "o", num_classes=2,
                      progress=False, feature_view="yes")
    with pytest.raises(ValueError, match="feature_view needs confirmation"):
        run_discovery(pool, SmallCNN(1, 2, 16), VAE(VAEConfig.for_images(1, 16, 4)), tmp_path / "o", num_classes=2,
                      progress=False, feature_view=True, confirm=False)
    assert not (tmp_path / "o").exists()


def test_the_views_unconfirmed_findings_leave_with_their_files(tmp_path):
    from spurfast.pipeline import rank_confirmed_first
    from spurfast.feature_view import unconfirmed
    from tests.test_rerank import _finding

    fs = [_finding(1, False, tmp_path), _finding(2, False, tmp_path), _finding(3, True, tmp_path),
          _finding(4, True, tmp_path)]
    fs[1]["view"] = fs[2]["view"] = "features"   # the view's: 2 unconfirmed, 3 confirmed
    res = _result(fs, {r: np.array([float(r)]) for r in (1, 2, 3, 4)})
    rank_confirmed_first(res, tmp_path, drop=unconfirmed)
    assert [float(res.rankings[f["rank"]][0]) for f in res.findings] == [3.0, 4.0, 1.0]
    assert [f["rank"] for f in res.findings] == [1, 2, 3] and sorted(res.rankings) == [1, 2, 3]
    masks = [(tmp_path / f["images"]["mask"]).read_text() for f in res.findings]
    assert masks == ["mask of 3", "mask of 4", "mask of 1"]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"finding{r}_mask.png" for r in (1, 2, 3)]
    assert not unconfirmed({"rank": 1}, None) and unconfirmed({"view": "features"}, "not_specific")


def test_discover_features_uses_the_space_it_is_given(monkeypatch):
    """The pipeline computes the feature space once for discovery and pictures: a given one is
    not computed again from the store (nor replaced by it)."""
    import spurfast.feature_view as FV

    n = 6
    space = np.arange(2 * n, dtype=np.float32).reshape(n, 2)
    store = _Store({"feats": np.zeros((n, 2), np.float16), "pred": np.zeros(n, np.int64), "ok": np.ones(n, bool),
                    "mu": np.zeros((n, 2), np.float32)})
    seen = {}

    def discover(view, config, **kw):
        seen["mu"] = view["mu"]
        return _result([], {})

    monkeypatch.setattr(FV, "feature_space", lambda store: pytest.fail("the given space was computed again"))
    monkeypatch.setattr(FV, "discover", discover)
    FV.discover_features(store, DiscoverConfig(k=2), space=space)
    assert seen["mu"] is space
