"""Which test family a finding belongs to.

A run's findings come from up to three searches, each with its own Benjamini-Hochberg
family: the latent clusters (`spurfast.discover`), the feature view's clusters
(`spurfast.feature_view`, ``"view": "features"``) and the residual scan
(`spurfast.residual`, ``"kind": "residual"``).  Confirmation adjusts within the same
families, so switching a view on leaves the clusters' verdicts as they were, and the
evaluation, which confirms each search on its own, measures what a run ships.
"""
from __future__ import annotations

CLUSTERS = "clusters"
FEATURE_VIEW = "features"   # a finding's "view"
RESIDUAL = "residual"       # a finding's "kind"


def finding_family(f: dict) -> str:
    """``f``'s family: `RESIDUAL`, `FEATURE_VIEW` or `CLUSTERS` (the latent clusters')."""
    if f.get("kind") == RESIDUAL:
        return RESIDUAL
    return FEATURE_VIEW if f.get("view") == FEATURE_VIEW else CLUSTERS
