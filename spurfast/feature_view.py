"""The feature view: discovery run a second time, in the classifier's own feature space.

A VAE of the pool's size does not spend a latent dimension on one pixel, so a single-pixel
shortcut never forms a latent cluster; the classifier that learned it must see the pixel, so
its penultimate features do.  The view clusters the standardised penultimate features (the
store's ``feats``: GEORGE's space) within each predicted class and scores and tests them as
the latent clusters are (`spurfast.discover.discover` on a store whose "latent" is the
features).  Its findings are a family of their own (Benjamini-Hochberg within the view, as
the residual scan's are) and join the latent ones by q-value (`merge_by_q`); each carries
``"view": "features"``.  Pictures still decode the members' mean latent; content matching
for unlabelled pools (`spurfast.discover.extract_pattern`) reads the features.

Measured on the full preset (docs/results/full-features, 3 seeds): on pixel-n1000 AP 0.996
where the latent alone reached 0.16-0.21.  Natural confusions cluster in feature space too:
joined unconfirmed, the view's findings took a clean model's false findings at q = 0.05 from
69 to 153 and lost the first ten places to them (AP against the best baseline, 42 pairs: 4
wins, 20 losses); its confirmed ones alone joined kept 69 and won 13, lost 5 (spurfast alone:
12 and 6).  So a run ships the view's findings only once confirmed (`unconfirmed`), and the
view needs confirmation; it is opt-in (``--feature-view``).
"""
from __future__ import annotations

import numpy as np

from .checks import check_default_dtype
from .discover import DiscoverConfig, DiscoveryResult, _standardise, discover
from .families import FEATURE_VIEW as VIEW


def feature_space(store) -> np.ndarray:
    """(n, F) float32: the store's penultimate features standardised over the readable,
    predicted rows (zeros elsewhere: discovery never reads those)."""
    pred = np.asarray(store["pred"]).astype(np.int64)
    valid = np.nonzero(np.asarray(store["ok"]).astype(bool) & (pred >= 0))[0]
    full = np.zeros(np.shape(store["feats"]), np.float32)   # the column's shape: read once, below
    if len(valid):   # none: nothing to standardise (the mean of no rows is NaN)
        full[valid] = _standardise(valid_features(store, valid))
    return full


def valid_features(store, valid: np.ndarray, dtype=np.float32) -> np.ndarray:
    """The store's penultimate features of the rows ``valid`` (pool indices), NaN/inf refused
    by pool index: standardised, one NaN spread to its whole column, and the error then blamed
    the latents of every image (or the SVD of activation clustering failed to converge)."""
    feats = np.asarray(store["feats"])[valid].astype(dtype, copy=False)   # the rows first, then their dtype
    # per row over every other axis: reshape(0, -1) of no rows raised a bare numpy error
    bad = np.flatnonzero(~np.isfinite(feats).all(axis=tuple(range(1, feats.ndim))))
    if len(bad):
        raise ValueError(f"store {store.root}: the classifier's features (its feats column) contain NaN/inf for "
                         f"{len(bad)} image(s) with a prediction, first pool index {valid[bad[0]]}")
    return feats


class SpaceView:
    """A store whose ``mu`` column is another space (read-only; every other column, the
    manifest and the counts are the store's)."""

    def __init__(self, store, space: np.ndarray):
        if len(space) != store.n:
            raise ValueError(f"space has {len(space)} rows; store {store.root} has {store.n} images")
        self._store, self._space = store, space
        self.n, self.complete, self.manifest, self.root = store.n, store.complete, store.manifest, store.root
        self.done = store.done   # an unfinished store's error says how far it got

    def __getitem__(self, name):
        return self._space if name == "mu" else self._store[name]


def discover_features(store, config: DiscoverConfig, *, suspect=None, class_names=None, progress: bool = False,
                      work_dir=None, space: np.ndarray | None = None) -> DiscoveryResult:
    """`discover` in the classifier's feature space (``space``: `feature_space` of the store,
    computed when not given); every finding gains ``"view": "features"``."""
    check_default_dtype("discover_features")   # the steps one by one too: float64 gave other findings
    space = feature_space(store) if space is None else space
    res = discover(SpaceView(store, space), config, suspect=suspect, class_names=class_names, progress=progress,
                   work_dir=work_dir)
    for f in res.findings:
        f["view"] = VIEW
    return res


def unconfirmed(finding: dict, verdict: str | None) -> bool:
    """Whether ``finding`` is one of the view's that confirmation did not confirm (``verdict``:
    `spurfast.confirm.confirm_verdict` of it): `rank_confirmed_first`'s ``drop``."""
    return finding.get("view") == VIEW and verdict != "confirmed"


def merge_by_q(first: list, second: list, q=lambda f: f["q_value"]) -> list:
    """One list of two families' findings: ``first``'s order kept, each of ``second``'s
    (taken in its order) placed before the first of ``first``'s with a larger q-value."""
    out, i = [], 0
    for f in first:
        while i < len(second) and q(second[i]) < q(f):
            out.append(second[i])
            i += 1
        out.append(f)
    return out + second[i:]


def join_views(result: DiscoveryResult, extra: DiscoveryResult) -> None:
    """Merge ``extra``'s findings into ``result`` by q-value (`merge_by_q`), renumbering the
    ranks (and their pool rankings) in the merged order; ``extra``'s scored clusters join
    ``result.clusters`` with their view named.  Before any picture is written: the files
    are named by rank."""
    merged = merge_by_q(result.findings, extra.findings)
    rankings = {}
    for rank, f in enumerate(merged, 1):
        source = extra.rankings if f.get("view") == VIEW else result.rankings
        rankings[rank] = source[f["rank"]]
        f["_new_rank"] = rank
    for f in merged:
        f["rank"] = f.pop("_new_rank")
    result.findings[:] = merged
    result.rankings.clear()
    result.rankings.update(rankings)
    result.clusters.extend(dict(c, view=VIEW) for c in extra.clusters)
