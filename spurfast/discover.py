"""Discovery: per-class clustering of latents -> scores, p-values, q-values -> findings.

Reads the embedding store (never the images, except to picture findings), so it scales
with the store rather than the pool.  See `spurfast.scoring` for the statistics and
`spurfast.characterise` for the pictures.
"""
from __future__ import annotations

import csv
import logging
import os
from collections.abc import MutableMapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__, backends
from .atomic_files import replace_atomically
from .characterise import contrast_map, exemplars, linear_probe, neighbour_contrast, pattern_mask
from .checks import (SOURCE_HINT, STORE_HINT, VAE_HINT, check_arguments, check_compute_device, check_default_dtype,
                     check_extra_config, check_not_a_path, real_number, suspect_mask, whole_number)
from .cores import usable_cores
from .data.sources import ImageSource, utf8_name
from .families import FEATURE_VIEW, finding_family
from .in_order import run_in_order
from .models.as_given import restores_models
from .rankings import SpilledRankings, save_ranking
from .scoring import (DEFAULT_NULL, DEFAULT_STATISTIC, LOOK_ALIKE_NEIGHBOURS, NULLS, STATISTICS, bh_qvalues,
                      cluster_and_score, content_classes, latent_neighbours, look_alike_strata, null_scores,
                      shuffled_share, size_matched_pvalues, top_two, unrelated_to_class)
from .store import EmbeddingStore, _write_json

log = logging.getLogger("spurfast.discover")
# below this share of predictions changed by the null's shuffle (1 in 20), a run says its test
# has little power: a warning's threshold only, no part of the test
LOW_POWER_SHARE = 0.05


@dataclass
class DiscoverConfig:
    """Settings of `discover`.  Most are the CLI `discover` flags of the same names
    (``backend`` is ``--kmeans-backend``); ``resolve_fdr``, ``n_neighbours``, ``n_iter``,
    ``n_exemplars`` and ``metric`` are set from Python only.

    Clustering: ``k`` clusters per predicted class, more for a class whose clusters would
    average over ``max_mean_cluster_size`` members, up to ``max_k``, fewer where a cluster
    would average under ``min_cluster_size``; ``n_iter`` Lloyd iterations, ``metric`` "l2"
    or "cosine", ``backend`` the k-means provider (None: auto).  Scoring: each image's
    agreement with its ``n_neighbours`` latent neighbours (``statistic``: "surprise" or
    "share"); ``n_null`` permutations of the predicted classes (within labels, or within
    look-alike strata: ``null``) give the null, extended up
    to ``max_null`` while a cluster beats every null cluster of its size but misses q <=
    ``resolve_fdr`` (None: ``fdr``); findings are the clusters at Benjamini-Hochberg q <=
    ``fdr``.  ``n_exemplars`` members nearest the centroid per finding; ``seed`` makes a
    run reproducible; ``device`` where it computes.  Every value is checked on creation."""
    k: int = 8                   # clusters per class (fewer for small classes)
    min_cluster_size: int = 5    # at least this many members per cluster on average
    # at most this many members per cluster on average (k grows for large classes; 0: off):
    # a class that absorbs many unrelated images hides a small shortcut group among
    # natural confusions unless its clusters are small enough to isolate it
    max_mean_cluster_size: int = 100
    max_k: int = 256             # ... but never above this many clusters per class (0: no cap), nor below k
    n_null: int = 30             # permutations for the null distribution ...
    # ... extended n_null at a time up to max_null while a cluster scores above every null
    # cluster of its size yet misses q <= fdr: its p-value is then limited by the number of
    # permutations (1 / (1 + #null clusters of its size)), not by the data
    max_null: int = 120
    resolve_fdr: float | None = None  # ... until such a cluster could reach this q (None: fdr)
    n_neighbours: int = 10       # latent neighbours each image's agreement is measured over
    # how an image's agreement is measured (`spurfast.scoring.agreement`): "surprise" (more
    # sensitive to weak shortcuts, more findings for confirmation to judge) or "share"
    statistic: str = DEFAULT_STATISTIC
    # what the permutation null keeps (`spurfast.scoring.NULLS`): "label", or "look-alike" (fewer
    # false findings of natural confusions: docs/results/look-alike/)
    null: str = DEFAULT_NULL
    fdr: float = 0.05            # Benjamini-Hochberg level for findings
    n_iter: int = 20             # Lloyd iterations
    n_exemplars: int = 16
    metric: str = "l2"
    seed: int = 0
    backend: str | None = None   # k-means backend (auto/torch/cpu/cupy/triton; triton: the assignment)
    device: str = "cpu"

    def __post_init__(self):
        # numpy numbers (a sweep over np.arange) are taken as Python ones: they crashed the
        # writing of findings.json after the whole run ("int64 is not JSON serializable");
        # a fractional count silently ran as another (k=4.5 as 4) or crashed mid-run
        for name in ("k", "min_cluster_size", "max_mean_cluster_size", "max_k", "n_null", "max_null",
                     "n_neighbours", "n_iter", "n_exemplars", "seed"):
            setattr(self, name, whole_number(getattr(self, name), name))
        # a torch.device, as torch's own calls take, recorded by its name: findings.json could
        # not hold it ("Object of type device is not JSON serializable", after the whole run)
        if isinstance(self.device, torch.device):
            self.device = str(self.device)
        for name in ("fdr", "resolve_fdr"):
            if getattr(self, name) is not None:
                setattr(self, name, real_number(getattr(self, name), name))
        # refused here, before any work: a negative seed crashed only after the clustering
        # (numpy's SeedSequence), and the others ran on, silently finding nothing
        # (n_neighbours <= 0: no agreement to measure) or dropping members (n_exemplars < 0
        # slices from the end)
        for name, low in (("k", 1), ("n_null", 1), ("n_neighbours", 1), ("seed", 0), ("n_exemplars", 0),
                          ("n_iter", 0), ("min_cluster_size", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.max_k < 0:
            raise ValueError(f"max_k must be >= 0 (0: no cap), got {self.max_k}")
        if self.max_mean_cluster_size < 0:
            raise ValueError(f"max_mean_cluster_size must be >= 0 (0: fixed k), got {self.max_mean_cluster_size}")
        if not 0 < self.fdr < 1:
            raise ValueError(f"fdr must be in (0, 1), got {self.fdr}")
        if self.max_null < self.n_null:
            raise ValueError(f"max_null must be >= n_null={self.n_null}, got {self.max_null}")
        # null permutation b clusters from seed + 1 + b, and torch's generator takes 64 bits:
        # a larger seed crashed in the clustering ("Overflow when unpacking long long")
        if int(self.seed) + 1 + int(self.max_null) > 2 ** 64 - 1:
            raise ValueError(f"seed + max_null must be <= 2**64 - 2 (a 64-bit generator seed), got seed={self.seed}, "
                             f"max_null={self.max_null}")
        if self.statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {self.statistic!r}")
        if self.null not in NULLS:
            raise ValueError(f"null must be one of {NULLS}, got {self.null!r}")
        if self.resolve_fdr is not None and not 0 < self.resolve_fdr < 1:
            raise ValueError(f"resolve_fdr must be in (0, 1) or None, got {self.resolve_fdr}")
        if self.metric not in ("l2", "cosine"):
            raise ValueError(f"metric must be 'l2' or 'cosine', got {self.metric!r}")
        # a misspelt backend failed only at the first clustering: after the neighbour search,
        # and from run_discovery after the whole embedding pass (whose run then blocked the
        # corrected rerun).  Whether it runs on this machine is still asked where it runs.
        if self.backend:
            from . import backends
            names = [p.name for p in backends.providers("kmeans_assign")] + ["auto"]
            if self.backend not in names:
                raise ValueError(f"backend must be one of {names} or None, got {self.backend!r}")


@dataclass
class DiscoveryResult:
    """What `discover` returns: ``findings`` (findings.json's entries, best first, with
    private ``_``-keys the later steps fill), every scored cluster of every class
    (``clusters``: class, cluster, size, score, p and q, members), each finding's pool-wide
    ranking by its rank, and the ``config`` and ``pool`` records of findings.json."""
    findings: list[dict]
    clusters: list[dict]
    rankings: MutableMapping[int, np.ndarray]  # finding rank -> pool-wide score (`SpilledRankings`: on disk)
    config: dict
    pool: dict


def _standardise(mu: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        m, s = mu.mean(0), mu.std(0)
        z = ((mu - m) / np.where(s > 0, s, 1.0)).astype(np.float32)
        # squared deviations near fp32's smallest normal (1.2e-38) lose digits or vanish: at
        # latents of 1e-25 the std was 0, every latent "constant", and clustering ran on ties
        tiny = s < 1e-15   # the columns' extremes read only where one is that small (two more passes)
        faint = bool(tiny.any()) and bool((mu[:, tiny].max(0) > mu[:, tiny].min(0)).any())
    if np.isfinite(s).all() and np.isfinite(z).all() and not faint:
        return z
    # fp32 sums overflowed (squared deviations past 3.4e38: latents of about 1e18 and up):
    # the std was inf and every latent standardised to 0, so nothing was ever found
    mu = np.asarray(mu, np.float64)
    m, s = mu.mean(0), mu.std(0)
    return ((mu - m) / np.where(s > 0, s, 1.0)).astype(np.float32)


_OPS = ("latent_knn", "kmeans_assign", "kmeans_update", "kmeans_assign_update", "kmeans_plusplus")


def identity_settings(config: DiscoverConfig) -> dict:
    """``config`` as a run's id reads it: backend "auto" given is the default (None) where no
    SPURFAST_BACKEND* variable asks the k-means ops for another (the help calls them one
    choice, yet a rerun spelling it out was refused as another run)."""
    d = asdict(config)
    if d.get("backend") == "auto" and all(backends.requested(op) == "auto" for op in _OPS if op != "latent_knn"):
        d["backend"] = None
    return d


def _provider_choices(device, ops=_OPS) -> dict:
    """Besides the config's backend, what picks the implementations of the neighbour search
    and the clustering: the SPURFAST_BACKEND* variables (and the Triton kernel's fp32
    precision) and what ``auto`` takes here.  Kept work is keyed on them: a rerun under
    another provider (rounding of its own) resumed the null of the first, a null no
    uninterrupted run computes."""
    dev = torch.device(device or "cpu").type   # None: torch's default, the CPU
    auto = {}
    for op in ops:
        try:
            auto[op] = backends.resolve(op, "auto", dev)[0]
        except backends.BackendUnavailable:
            auto[op] = None
    env = {v: os.environ.get(v) for v in ["SPURFAST_BACKEND", *(f"SPURFAST_BACKEND_{op.upper()}" for op in ops),
                                          "SPURFAST_TRITON_FP32_PRECISION"]}
    return {"env": {k: v for k, v in env.items() if v}, "auto": auto}


def _warn_if_the_null_is_the_data(g: np.ndarray, within: np.ndarray, what: str) -> None:
    """Warn where the null's shuffle of the predictions ``g`` within ``within`` (labels, or the
    look-alike null's finer strata) changes few of them while one class takes most of the pool."""
    counts = np.bincount(g)
    moved, top, top_share = shuffled_share(g, within), counts.argmax(), counts.max() / len(g)
    if moved < LOW_POWER_SHARE and top_share > 0.5:
        # a classifier that calls (nearly) every image one class, or a shortcut carried by
        # nearly the whole pool: "no cluster is significant" read as a clean bill of health.
        # (An accurate classifier on a labelled pool changes little under the shuffle too, but
        # there its finding nothing means no image is called another class: no warning.)
        log.warning("the null shuffles the predictions within each %s, and here that changes only %.1f%% of "
                    "them (the classifier calls %.1f%% of the pool class %d): no cluster can score far above "
                    "its shuffles, so few or no findings mean little; a pool of more varied images gives the "
                    "test power", what, 100 * moved, 100 * top_share, top)


def discover(store: EmbeddingStore, config: DiscoverConfig, *, suspect: np.ndarray | None = None,
             class_names: list[str] | None = None, progress: bool = True, work_dir=None) -> DiscoveryResult:
    """Cluster, score and test; return findings (q <= fdr, merged and ranked) and all clusters.
    ``work_dir``: where the neighbour search and each null permutation are kept when they
    finish, so that an interrupted call resumes (`spurfast.discovery_work`), and where the
    findings' rankings wait on disk (`SpilledRankings`; without it, in ``TMPDIR``)."""
    check_default_dtype("discover")   # the steps one by one too: float64 gave other findings
    check_not_a_path("discover", "store", store, STORE_HINT)
    check_arguments("discover", ("config", config, DiscoverConfig, "a DiscoverConfig",
                                 "spurfast.DiscoverConfig(k=..., ...)"))
    if not store.complete:
        raise ValueError(f"embedding store {store.root} is unfinished ({store.done}/{store.n}); resume the pass first")
    # checked again: a field set after construction (config.fdr = 2.0) skipped __post_init__
    config = replace(config)
    if config.device is not None:
        check_compute_device(config.device, f"discover: config.device {config.device!r}")
    n_classes = int(store.manifest["num_classes"])
    pred = np.asarray(store["pred"]).astype(np.int64)
    labels = np.asarray(store["labels"])
    mu = np.asarray(store["mu"])
    ok = np.asarray(store["ok"]).astype(bool) & (pred >= 0)
    beyond = np.nonzero(ok & (pred >= n_classes))[0]
    if len(beyond):   # refused before the neighbour search (minutes at scale), by pool index
        raise ValueError(f"store {store.root}: pred[{beyond[0]}] = {pred[beyond[0]]} is not below the manifest's "
                         f"num_classes = {n_classes} ({len(beyond)} image(s) so); embed the pool again with the "
                         f"classifier's number of classes")
    if not np.isfinite(mu[ok]).all():
        raise ValueError(f"store {store.root}: latents contain NaN/inf for "
                         f"{int((~np.isfinite(mu[ok])).any(1).sum())} images")
    # a NaN row's "top class" was its first NaN's column (numpy's argmax): the content and
    # look-alike classes of a user-made store were read from it without a word
    top2_all, bad = top_two(store["probs"], rows=ok)   # one pass over the (n, C) column
    if len(bad):
        raise ValueError(f"store {store.root}: class probabilities contain NaN/inf for {len(bad)} image(s) with a "
                         f"prediction, first pool index {bad[0]}; embed the pool again")
    suspect = suspect_mask(suspect, store.n, f"store {store.root}")
    valid = np.nonzero(ok)[0]
    if len(valid) < 2:
        raise ValueError(f"store {store.root}: only {len(valid)} readable image(s) with a prediction; discovery "
                         f"needs at least 2 (each image's latent neighbours are others)")
    z = _standardise(mu[valid])
    g = pred[valid]
    labels_valid = labels[valid]
    kw = dict(k=config.k, min_cluster_size=config.min_cluster_size, max_mean_cluster_size=config.max_mean_cluster_size,
              max_k=config.max_k, statistic=config.statistic,
              n_iter=config.n_iter,
              metric=config.metric, backend=config.backend, device=config.device)
    unknown_ok = ~suspect[valid]  # an unlabelled suspect sample may be genuine class c
    top2 = top2_all[valid]
    # the look-alike null reads a wider neighbourhood: one search, whose first columns (nearest
    # first, ties to the lower index) are the narrower one's
    n_search = config.n_neighbours * (LOOK_ALIKE_NEIGHBOURS if config.null == "look-alike" else 1)
    work = None
    if work_dir is not None:
        from .discovery_work import DiscoveryWork, work_key
        from . import cluster
        # the search reads z alone (not config.backend: it is the k-means backend), so another k
        # or statistic reuses it; device type and providers: their rounding may break ties otherwise
        searched = {"piece": "neighbours", "n_neighbours": n_search,
                    "device": torch.device(config.device or "cpu").type,
                    "providers": _provider_choices(config.device, ("latent_knn",))}
        nkey = work_key(dict(z=z), searched)
        # z by its hash in the neighbour key: hashed once (0.1 s at 1.28M x 16, per key)
        settings = {**kw, "n_neighbours": config.n_neighbours, "seed": config.seed, "n_classes": n_classes,
                    "providers": _provider_choices(config.device), "z": nkey,
                    # named unless it is the label null (work saved before it keeps its key)
                    **({} if config.null == DEFAULT_NULL else {"null": config.null})}
        if cluster.kmeans_hook is not None:
            # k-means across W ranks (torchrun) all-reduces partial sums of every W-th point:
            # rounding of its own, so a null is not resumed under another number of ranks
            from .distributed import world_size
            settings["kmeans_ranks"] = world_size()
        work = DiscoveryWork(work_dir, work_key(dict(g=g, labels=labels_valid, top2=top2, unknown_ok=unknown_ok),
                                                settings), nkey)
    # one call each, minutes at ImageNet scale on a CPU: a bar per step says which is running
    with tqdm(total=len(z), desc="latent neighbours", unit="img", disable=not progress, leave=False) as step:
        def search():
            return latent_neighbours(z, n_search, device=config.device)
        found = work.neighbours(search) if work is not None else search()
        nbrs = np.ascontiguousarray(found[:, :config.n_neighbours])
        step.update(len(z))
    if config.null == "look-alike":
        kw["strata"] = look_alike_strata(labels_valid, found, n_search)
        _warn_if_the_null_is_the_data(g, kw["strata"], "look-alike stratum")
    else:
        _warn_if_the_null_is_the_data(g, labels_valid, "label")
    args = (top2, labels_valid, n_classes, nbrs, unknown_ok)
    with tqdm(total=len(z), desc="clustering", unit="img", disable=not progress, leave=False) as step:
        real = cluster_and_score(z, g, *args, seed=config.seed, **kw)
        step.update(len(z))
    nonempty = np.nonzero(real.size > 0)[0]
    bar = tqdm(total=config.n_null, desc="permutation null", disable=not progress, leave=False)
    null_score, null_n_unrelated = null_scores(z, g, *args, n_null=config.n_null, seed=config.seed, progress=bar,
                                               work=work, **kw)
    done = config.n_null
    resolve_fdr = config.fdr if config.resolve_fdr is None else config.resolve_fdr
    while True:
        pvals, n_reference, beat_all = size_matched_pvalues(real.score[nonempty], real.n_unrelated[nonempty],
                                                            null_score, null_n_unrelated)
        # a cluster of no unrelated member is not tested (score 0, p 1 whatever the data): it
        # counted among Benjamini-Hochberg's m tests, and a planted group's q of 0.04 read 0.16
        # where 60 of 80 clusters were such; its q is 1
        qvals = np.nan_to_num(bh_qvalues(np.where(real.n_unrelated[nonempty] > 0, pvals, np.nan)), nan=1.0)
        starved = beat_all & (qvals > resolve_fdr)
        if not starved.any() or done >= config.max_null:
            break
        more = min(config.n_null, config.max_null - done)
        bar.total += more
        bar.refresh()
        s, u = null_scores(z, g, *args, n_null=more, seed=config.seed, start=done, progress=bar, work=work, **kw)
        null_score, null_n_unrelated = np.concatenate([null_score, s]), np.concatenate([null_n_unrelated, u])
        done += more
    bar.close()
    if starved.any():
        log.warning("%d clusters scored above every null cluster of their size (or, with none of their size, every "
                    "one they were compared with) after %d permutations but miss "
                    "q <= %g: their p-values are limited by the permutations (>= 1/%d), not by the data; rerun "
                    "with a larger max_null (discover's --max-null)", int(starved.sum()), done, resolve_fdr,
                    int(n_reference[starved].max()) + 1)

    clusters = []
    # each cluster's members in one sort, not a scan of the pool per cluster (27 s at 1.2M
    # images x 13k clusters); stable, so members stay in pool order
    flat = np.where(real.assign >= 0, g * real.kmax + real.assign, -1)   # -1: in no cluster
    order = np.argsort(flat, kind="stable")
    starts = np.searchsorted(flat[order], nonempty, "left")
    stops = np.searchsorted(flat[order], nonempty, "right")
    for f, p, q, lo, hi in zip(nonempty, pvals, qvals, starts, stops):
        c, j = divmod(int(f), real.kmax)
        members = valid[order[lo:hi]]
        clusters.append(dict(cls=c, cluster=j, size=int(real.size[f]), n_unrelated=int(real.n_unrelated[f]),
                             score=float(real.score[f]), p_value=float(p), q_value=float(q),
                             members=members, n_suspect=int(suspect[members].sum())))
    sig = sorted((cl for cl in clusters if cl["q_value"] <= config.fdr), key=lambda cl: (-cl["score"], cl["p_value"]))
    findings, rankings = _merge_and_expand(sig, z, valid, g, store.n, spill_dir=work_dir, seed=config.seed)
    member_lists = [np.asarray(f["members"], dtype=np.int64) for f in findings]
    # the members' rows of z (valid is sorted, so rows keep the pool's order and its ties): a
    # pool-sized copy of z, zero for the unreadable, served the exemplars alone
    local_lists = [np.searchsorted(valid, members) for members in member_lists]
    picked = exemplars(z, local_lists, config.n_exemplars, device=config.device)
    for f, members, local, chosen in zip(findings, member_lists, local_lists, picked):
        f["exemplars"] = valid[chosen].tolist()
        # the members the score counted (the suspect-free, other-content ones): a diffuse
        # finding's pixel probe is fitted on them (`spurfast.pattern_rank`)
        f["_unrelated"] = members[unrelated_to_class(top2[local], labels_valid[local],
                                                     np.full(len(local), f["class"]), unknown_ok[local])]
        # a class folder whose name is not UTF-8 as \xNN: findings.csv (UTF-8) could not hold it;
        # str: API callers may name classes by numbers; a numpy array of names has no truth
        # value (it crashed here, after the whole run)
        f["class_name"] = utf8_name(str(class_names[f["class"]])) \
            if class_names is not None and f["class"] < len(class_names) else None
    pool = {"n": int(store.n), "n_unrelated": int((~suspect).sum()), "n_suspect": int(suspect.sum()),
            "n_unreadable": int((~ok).sum())}
    cfg = {"discover": asdict(config), "n_classes": n_classes, "n_clusters": len(clusters),
           "n_null_permutations": done, "n_null_clusters": int(len(null_score))}
    return DiscoveryResult(findings, clusters, rankings, cfg, pool)


def _merge_and_expand(sig: list[dict], z: np.ndarray, valid: np.ndarray, g: np.ndarray, n: int, spill_dir=None,
                      seed: int = 0):
    """Merge significant clusters of one class that share a feature; expand each finding
    with a linear probe in latent space.

    A cluster joins an earlier (stronger) finding of its class when they agree both ways:
    most of its members fall on the side of the finding's probe, and most of the finding's
    first cluster on the side of its own (pattern-bearing images split over several
    clusters).  One way only, a small pure cluster of a pattern joined a large cluster of
    the class's ordinary images: a probe fit against the other classes marks how
    class-like an image is as much as its feature, so the large cluster's side held the
    pattern's images too, and the finding came out mostly without the pattern.  Each
    finding's probe also ranks the whole pool (its ``ranking``)."""
    findings: list[dict] = []
    for cl in sig:
        local = np.searchsorted(valid, cl["members"])  # members are a subset of the sorted valid indices
        own = _probe(z, g, local, cl["cls"], seed)
        home = next((f for f in findings if f["class"] == cl["cls"]
                     and np.mean(z[local] @ f["probe"][0] > f["probe"][1]) > 0.5
                     and np.mean(z[f["local"]] @ own[0] > own[1]) > 0.5), None)
        if home is not None:
            home["clusters"].append(cl)  # judged against the first cluster (its probe and members)
        else:
            findings.append({"class": cl["cls"], "clusters": [cl], "probe": own, "local": local})
    # merging changes scores: rank by the merged score (ties: smaller p)
    findings.sort(key=lambda f: (-sum(c["score"] for c in f["clusters"]), min(c["p_value"] for c in f["clusters"])))
    # one pool-sized array per finding: on disk, not in memory; beside the run when it has a
    # folder (TMPDIR is often a tmpfs, i.e. memory again, or small)
    rankings = SpilledRankings(folder=spill_dir)
    out = []
    for rank, f in enumerate(findings, 1):
        cls = f["clusters"]
        members = np.unique(np.concatenate([c["members"] for c in cls]))
        # a lone cluster keeps its probe; a merged finding refits on all its members
        w, thr = f["probe"] if len(cls) == 1 else _probe(z, g, np.searchsorted(valid, members), f["class"], seed)
        side = z @ w - thr
        ranking = np.full(n, -np.inf, dtype=np.float32)
        ranking[valid] = side
        rankings[rank] = ranking
        out.append({
            "rank": rank, "class": int(f["class"]), "class_name": None, "cluster": int(cls[0]["cluster"]),
            "size": int(len(members)), "score": float(sum(c["score"] for c in cls)),
            "p_value": float(min(c["p_value"] for c in cls)), "q_value": float(min(c["q_value"] for c in cls)),
            "members": members.tolist(), "exemplars": [], "confirm": None, "images": {},
            "merged_clusters": [int(c["cluster"]) for c in cls],
            "n_unrelated": int(sum(c["n_unrelated"] for c in cls)),
            "n_suspect": int(sum(c["n_suspect"] for c in cls)),
            "n_expanded": int((side > 0).sum()),
        })
    return out, rankings


def _probe(z, g, local, cls, seed: int = 0):
    """The Fisher probe of a cluster's members against the other classes' images (`linear_probe`
    takes one image a side: a one-member cluster got w = 0, ranked the pool flat and could
    neither join nor be joined by its own shortcut's finding); zero with no image a side."""
    neg = np.nonzero(g != cls)[0]
    if len(local) < 1 or len(neg) < 1:
        return np.zeros(z.shape[1]), 0.0
    rng = np.random.default_rng(seed)   # the run's: the sample of other classes above 20,000
    if len(neg) > 20000:
        neg = rng.choice(neg, 20000, replace=False)
    return linear_probe(z, local, neg)


@restores_models("vae")
def characterise(result: DiscoveryResult, store: EmbeddingStore, source: ImageSource, vae, out_dir: Path,
                 *, seed: int = 0, device: str = "cpu", feature_space: np.ndarray | None = None) -> None:
    """Decoded centroid, contrast, mask and exemplar grid for every finding (PNGs in out_dir).
    ``feature_space``: the rows the feature view clustered (`spurfast.feature_view`, computed
    from the store when its findings are here and it is not given), where its findings match
    content in an unlabelled pool; the others match it in the latent."""
    check_default_dtype("characterise")   # the steps one by one too: float64 gave other findings
    check_not_a_path("characterise", "store", store, STORE_HINT)
    check_arguments("characterise", ("source", source, ImageSource, "an ImageSource", SOURCE_HINT),
                    ("vae", vae, torch.nn.Module, "a torch.nn.Module", VAE_HINT))
    check_compute_device(device, f"characterise: device {device!r}")
    if len(source) != store.n:   # another pool's: wrong images pictured silently, or a bare IndexError
        raise ValueError(f"characterise: the pool {source.name} has {len(source)} images, but store {store.root} "
                         f"was made from {store.n}; give the pool the store was embedded from")
    out_dir = Path(out_dir)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    pred = np.asarray(store["pred"]).astype(np.int64)
    probs = np.asarray(store["probs"])
    labels = np.asarray(store["labels"])
    mu = np.asarray(store["mu"])
    ok = np.asarray(store["ok"]).astype(bool) & (pred >= 0)
    vae = vae.to(device).eval()   # decoded as the store was encoded (the decorator gives its mode back)
    if feature_space is None and any(finding_family(f) == FEATURE_VIEW for f in result.findings):
        from .feature_view import feature_space as features_of
        feature_space = features_of(store)

    def one(f):
        members = np.asarray(f["members"], dtype=np.int64)
        with torch.no_grad():
            centroid = torch.as_tensor(mu[members].mean(0, keepdims=True), device=device)
            decoded = vae.decode(centroid)[0].cpu()
        space = feature_space if finding_family(f) == FEATURE_VIEW else mu
        extract_pattern(f, source, space, pred=pred, probs=probs, labels=labels, ok=ok, seed=seed)
        x, _ = source.get_batch(np.asarray(f["exemplars"], dtype=np.int64))
        f["images"] = save_finding_images(out_dir, f["rank"], decoded, f["_contrast"], f["_mask"], x)

    # each finding on its own, mostly on one core (reads, means, masks, pictures): several at
    # once where the source may be read from threads, each with the results of one at a time
    at_once = usable_cores() if getattr(source, "reads_in_threads", False) else 1
    for _ in run_in_order((lambda f=f: one(f) for f in result.findings), at_once):
        pass


def extract_pattern(finding: dict, source: ImageSource, space: np.ndarray, *, pred: np.ndarray, probs: np.ndarray,
                    labels: np.ndarray, ok: np.ndarray, seed: int = 0) -> None:
    """Set a finding's ``_contrast`` (its members against content-matched images of other
    classes), ``_mask`` (the contrast's pattern) and ``_pattern`` (the members' mean image).
    Content is matched by label where most members have one, else by nearest neighbours in
    ``space`` (pool-sized rows: the VAE latent, or a baseline's features)."""
    c = finding["class"]
    members = np.asarray(finding["members"], dtype=np.int64)
    others = np.nonzero(ok & (pred != c))[0]
    if np.mean(labels[members] < 0) > 0.5:   # mostly unlabelled: match content in latent space
        contrast, mem_mean = neighbour_contrast(source, space, members, others, seed=seed)
    else:
        m_content = content_classes(top_two(probs[members]), labels[members], np.full(len(members), c))
        o_content = np.where(labels[others] >= 0, labels[others], pred[others])
        contrast, mem_mean = contrast_map(source, members, m_content, others, o_content, seed=seed)
    finding["_mask"] = pattern_mask(contrast)
    finding["_contrast"] = contrast
    finding["_pattern"] = mem_mean


def save_finding_images(out_dir: Path, rank: int, centroid: torch.Tensor, contrast: torch.Tensor,
                        mask: np.ndarray, exemplars: torch.Tensor) -> dict:
    """A finding's four pictures under ``out_dir``/images, by their paths relative to
    ``out_dir`` (the keys of findings.json's ``images``)."""
    from .report import save_grid, save_image, save_map

    img_dir = Path(out_dir) / "images"
    paths = {
        "centroid": save_image(centroid, img_dir / f"finding{rank}_centroid.png"),
        "contrast": save_map(contrast, img_dir / f"finding{rank}_contrast.png"),
        "mask": save_mask_image(out_dir, rank, mask),
        "grid": save_grid(exemplars, img_dir / f"finding{rank}_grid.png"),
    }
    return {k: str(Path(v).relative_to(out_dir)) for k, v in paths.items()}


def save_mask_image(out_dir: Path, rank: int, mask: np.ndarray) -> str:
    """A finding's mask as ``out_dir``/images/finding{rank}_mask.png."""
    from .report import save_image

    path = Path(out_dir) / "images" / f"finding{rank}_mask.png"
    return save_image(torch.as_tensor(np.asarray(mask), dtype=torch.float32).unsqueeze(0), path)


def redraw_stamp_masks(findings: list[dict], out_dir: Path) -> None:
    """Draw again the mask of every finding whose pattern ranking found a stamp (``ranked_by``
    ending "+stamp"): its mask became the stamp's own pixels (`spurfast.stamp`) after
    `characterise` drew the old one."""
    for f in findings:
        if f.get("ranked_by", "").endswith("+stamp"):
            save_mask_image(out_dir, f["rank"], f["_mask"])


def findings_document(result: DiscoveryResult, extra_config: dict | None = None) -> dict:
    check_extra_config(extra_config)
    cfg = dict(result.config)
    if extra_config:
        cfg.update(extra_config)
    keys = ["rank", "class", "class_name", "cluster", "size", "score", "p_value", "q_value", "members",
            "exemplars", "confirm", "confirmed", "confirm_skipped", "support", "images", "merged_clusters",
            "n_unrelated", "n_suspect", "n_expanded", "ranked_by", "kind", "view", "peak", "peak_t"]
    return {"schema": 1, "spurfast_version": __version__, "config": cfg, "pool": result.pool,
            "findings": [{k: f[k] for k in keys if k in f} for f in result.findings]}


def _write_csv(path: Path, rows) -> None:
    # UTF-8 whatever the locale: class names may be any text (a cp1252 or ASCII locale
    # raised on them after the whole run)
    replace_atomically(path, lambda fh: csv.writer(fh).writerows(rows), "w", newline="", encoding="utf-8")


def _support_cells(sp: dict | None) -> list:
    """findings.csv's support columns: p, q, supported (blank where not tested)."""
    if not sp or sp.get("p_value") is None:
        return ["", "", ""]
    # as they are (shortest round trip), as clusters.csv's: 4 digits made q = 0.0500004 (not
    # supported at 0.05) "0.05" beside supported 0
    return [repr(float(sp["p_value"])), repr(float(sp["q_value"])), int(sp["supported"])]


def write_outputs(result: DiscoveryResult, out_dir: Path, extra_config: dict | None = None) -> dict:
    """Write findings.json (``extra_config`` joins its ``config``), findings.csv, clusters.csv
    and each finding's pool ranking (``rankings/findingR.npy``) into ``out_dir``, each file
    atomically; return the findings document (findings.json's content)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = findings_document(result, extra_config)
    # every file atomically: a run interrupted while writing them left a truncated
    # findings.json (or CSV) that `spurfast report` then failed on
    # NaN is refused where the caller brings it (extra_config, run_discovery); here a non-finite value
    # of the pipeline's own (none is known) would stop a finished run at its last step
    _write_json(out_dir / "findings.json", doc)
    rows = [["rank", "class", "class_name", "cluster", "size", "score", "p_value", "q_value",
             "n_unrelated", "n_suspect", "flip_rate", "control_flip_rate", "confirm_p_value", "confirm_dose",
             "dose_flip_rate", "dose_control_flip_rate", "confirm_q_value", "confirm_verdict", "support_p_value",
             "support_q_value", "supported", "family"]]
    for f in doc["findings"]:
        cf = f.get("confirm") or {}
        # score, p and q as findings.json holds them (4 digits: q = 0.03601 beside 0.036013858 there)
        rows.append([f["rank"], f["class"], f["class_name"] or "", f["cluster"], f["size"], repr(float(f["score"])),
                     repr(float(f["p_value"])), repr(float(f["q_value"])), f.get("n_unrelated", ""), f.get("n_suspect", ""),
                     cf.get("flip_rate", ""), cf.get("control_flip_rate", ""), cf.get("p_value", ""),
                     # the strength its p-value came from, and the two rates there: at full strength
                     # both can be 1.0 beside a confirming p
                     cf.get("dose", ""), cf.get("dose_flip_rate", ""), cf.get("dose_control_flip_rate", ""),
                     cf.get("q_value", ""), cf.get("verdict", ""), *_support_cells(f.get("support")),
                     finding_family(f)])
    _write_csv(out_dir / "findings.csv", rows)
    # family: the latent clusters' or the feature view's, each its own Benjamini-Hochberg family
    # (a joined run's two tables read as one, their (class, cluster) keys repeated)
    rows = [["class", "cluster", "size", "n_unrelated", "n_suspect", "score", "p_value", "q_value", "family"]]
    for cl in sorted(result.clusters, key=lambda c: -c["score"]):
        # p and q as they are (shortest round trip): `spurfast report` reads q back against the
        # FDR level, and 4 digits turned q = 0.10004 into 0.1, significant in its plot
        # the score too: `spurfast report` redraws the scores plot from it (4 digits moved its points)
        rows.append([cl["cls"], cl["cluster"], cl["size"], cl["n_unrelated"], cl["n_suspect"],
                     repr(float(cl["score"])), repr(float(cl["p_value"])), repr(float(cl["q_value"])),
                     finding_family(cl)])
    _write_csv(out_dir / "clusters.csv", rows)
    rk = out_dir / "rankings"
    rk.mkdir(exist_ok=True)
    for r in result.rankings:
        save_ranking(result.rankings, r, rk / f"finding{r}.npy")   # a link where it can: no second copy
    return doc
