"""Baselines on hand-made stores (the evaluation's tiny sweep runs them end to end)."""
import numpy as np

from spurfast import baselines as B


class _Store:
    """The columns and manifest a baseline reads from an embedding store."""

    def __init__(self, pred, feats, labels, probs):
        self.n = len(pred)
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
