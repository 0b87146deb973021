"""Residual scan: shortcuts the VAE latent does not hold.

A VAE of the pool's size does not spend a latent dimension on one pixel, so a single-pixel
shortcut never forms a latent cluster (docs/RESULTS.md: spurfast's AP 0.10-0.15 on
pixel-n1000, where activation clustering reaches 0.42-0.62).  The reconstruction residual
x - decode(mu) keeps what the latent misses; its energy r^2 is large where an image carries a
pattern the VAE cannot draw, bright or dark.  Per predicted class c, a per-pixel Welch t
compares the residual energy of unrelated images called c (label not c) with that of unrelated
images called another class (label not c either).

What the latent misses is not only shortcuts: fine content (a collar, a strap) drives
predictions and is drawn poorly too, and left peaks of t = 5-11 at collars and edges in three
clean Fashion-MNIST models, against 27-37 at the planted pixel of pixel-n1000.  So the class's statistic is how far its
peak t stands above the largest t outside the 3 x 3 window around the peak: a localised
pattern stands alone.  Its null keeps content: every unrelated image takes the prediction of a
random one of its ``n_neighbours`` nearest latent neighbours of the same label (itself
included).  Look-alikes to the VAE keep content-driven residuals; a pattern the latent does not
hold is spread over neighbours that do and do not carry it.  It keeps content in part: where
content drives both the errors and the residual along one of several latent directions, the
neighbours share it only partly, and p comes out too small (a simulation with no shortcut: 24% of
classes at p <= 0.05 with 400 images per label); confirmation checks the findings.  p = (1 +
#nulls at least as large) / (1 + #nulls), Benjamini-Hochberg over classes: a family of its own,
beside the clusters'.

A significant class becomes a finding: its mask is the peak window's pixels above the best t
outside it; every pool image is ranked by its residual energy inside the mask; members are the
class's images above the Otsu cut of that ranking.  Holds every image's residual in memory
(n x C x H x W float32 and two float64 copies of the unrelated images', refused past
``max_values``): meant for pools up to about 10^5 small images.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .characterise import otsu_threshold
from .checks import check_default_dtype, real_number, whole_number
from .data.sources import ImageSource, utf8_name
from .families import RESIDUAL
from .models.as_given import restores_models
from .scoring import bh_qvalues, latent_neighbours, permutation_pvalues, top_two, unrelated_to_class

SCORE_CAP = 1e6   # a finding's score where its statistic is infinite (see residual_scan)
log = logging.getLogger("spurfast.residual")


MAX_NULL = 100_000   # null resamplings at most: hours of work already, where 400 is the default


@dataclass
class ResidualConfig:
    n_neighbours: int = 10       # latent neighbours (same label) a null prediction is drawn from
    # null resamplings: p-values down to 1 / (1 + n_null), which BH over m classes must bring
    # under fdr / m for any finding (10 classes at q = 0.05: at least 200)
    n_null: int = 400
    fdr: float = 0.05            # Benjamini-Hochberg level over classes
    min_images: int = 5          # a class needs this many unrelated images called it
    max_values: int = 2 ** 26    # residual values held (n x C x H x W): about 20 bytes each
    batch_size: int = 512
    seed: int = 0

    def __post_init__(self):
        for name in ("n_neighbours", "n_null", "min_images", "max_values", "batch_size", "seed"):
            setattr(self, name, whole_number(getattr(self, name), name))
        self.fdr = real_number(self.fdr, "fdr")
        for name, low in (("n_neighbours", 1), ("n_null", 1), ("min_images", 2), ("max_values", 1),
                          ("batch_size", 1), ("seed", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not 0 < self.fdr < 1:
            raise ValueError(f"fdr must be in (0, 1), got {self.fdr}")
        if self.n_null > MAX_NULL:   # 1e9 failed allocating its 74.5 GiB table after the whole pass
            raise ValueError(f"n_null must be at most {MAX_NULL} (p-values down to 1/{MAX_NULL + 1}; each "
                             f"resampling scores every image again), got {self.n_null}")


def check_size(n: int, values_per_image: int, max_values: int) -> None:
    if n * values_per_image > max_values:
        raise ValueError(f"the residual scan holds every image's residual: {n} images x {values_per_image} values "
                         f"= {n * values_per_image} > max_values={max_values}; raise max_values (`spurfast discover "
                         f"--residual-max-values`; about 20 bytes each) or leave the scan out")


@restores_models("vae")
def reconstruction_residuals(source: ImageSource, mu: np.ndarray, vae, batch_size: int = 512,
                             progress: bool = False, device: str = "cpu", readable: np.ndarray | None = None,
                             max_values: int = ResidualConfig.max_values, *, num_workers: int = 0,
                             loader_backend: str | None = None, decode_on: str | None = None) -> torch.Tensor:
    """(n, C*H*W) float32: every pool image minus the VAE's decoding of its latent mean, one
    pass over the pool through its loader (a folder pool: ``loader_backend`` in
    ``num_workers`` processes, decoded on ``decode_on`` as the embedding pass did), the VAE
    on ``device``.  ``readable`` (n,) bool: only those images are read; the others' rows,
    and those of images unreadable now, stay 0."""
    from .data.loader_torch import iter_batches
    from .embed import decode_device

    n = len(source)
    if len(mu) != n:
        raise ValueError(f"mu has {len(mu)} rows for a pool of {n} images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    values = int(np.prod(source.image_shape)) if n else 0
    check_size(n, values, max_values)
    out = torch.zeros((n, values), dtype=torch.float32)
    idx_all = np.arange(n) if readable is None else np.nonzero(np.asarray(readable, bool))[0]
    if not len(idx_all):
        return out
    vae = vae.to(device).eval()   # as the store's pass encoded (the callers give the caller's mode back)
    decode = None if decode_on is None else decode_device(decode_on)
    with tqdm(total=len(idx_all), desc="residuals", unit="img", disable=not progress) as bar:
        for b in iter_batches(source, batch_size, indices=idx_all, num_workers=num_workers, backend=loader_backend,
                              device=decode):
            idx = b.indices.cpu().numpy()
            with torch.no_grad():
                rec = vae.decode(torch.as_tensor(np.asarray(mu[idx]), dtype=torch.float32, device=device))
                r = (b.images.to(device, torch.float32) - rec).reshape(len(idx), -1)
            out[torch.as_tensor(idx)] = (r * b.ok.to(r.device, r.dtype)[:, None]).cpu()
            bar.update(len(idx))
    return out


class ClassSums:
    """Per-class sums for the Welch t-maps of every class at once, in O((2C + L) x P) memory
    (a (label, class) table would take L x C x P: 10^12 values at ImageNet's 1,000 x 1,000).
    The rows' values ``r`` (n, P) and labels are fixed; an assignment of predicted classes
    (the observed one, or a null's) adds two passes over ``r``."""

    def __init__(self, r: torch.Tensor, labels: np.ndarray, n_classes: int):
        self.r, self.r2, self.n_classes = r, r * r, n_classes
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        labelled = self.labels >= 0
        lab = self.labels[labelled]
        # images of label c (the groups' complement): unlabelled ones belong to no class
        self.lab_n = torch.bincount(lab, minlength=n_classes)[:n_classes].double()
        self.lab_s1 = self._sum(lab, self.r[labelled])
        self.lab_s2 = self._sum(lab, self.r2[labelled])
        self.n, self.s1, self.s2 = float(len(r)), self.r.sum(0), self.r2.sum(0)

    def _sum(self, index: torch.Tensor, values: torch.Tensor, spare: bool = False) -> torch.Tensor:
        out = torch.zeros((self.n_classes + spare, values.shape[1]), dtype=values.dtype).index_add_(0, index, values)
        return out[:self.n_classes]

    def tmaps(self, pred: np.ndarray, min_images: int) -> torch.Tensor:
        """(n_classes, P) Welch t per pixel: images called c against images called another
        class, both of a label other than c (unlabelled images count for every class).  A class
        with fewer than ``min_images`` (or fewer than 2 others) is NaN."""
        p = torch.as_tensor(pred, dtype=torch.long)
        # called c, label not c; an image called its own label goes to a spare row, dropped
        key = torch.where(p == self.labels, self.n_classes, p)
        na = torch.bincount(key, minlength=self.n_classes + 1)[:self.n_classes].double()
        sa = self._sum(key, self.r, spare=True)
        qa = self._sum(key, self.r2, spare=True)
        nb = self.n - self.lab_n - na                          # label not c, called another class
        sb = self.s1 - self.lab_s1 - sa
        qb = self.s2 - self.lab_s2 - qa
        ok = (na >= min_images) & (nb >= 2)
        na, nb = na.clamp_min(2)[:, None], nb.clamp_min(2)[:, None]
        ma, mb = sa / na, sb / nb
        va = (qa - sa * ma).clamp_min(0) / (na - 1)
        vb = (qb - sb * mb).clamp_min(0) / (nb - 1)
        se = torch.sqrt(va / na + vb / nb)
        # a pixel constant in both groups (a border the VAE reproduces exactly) says nothing
        t = torch.where(se > 0, (ma - mb) / torch.where(se > 0, se, 1.0), torch.zeros_like(ma))
        return torch.where(ok[:, None], t, torch.full_like(t, float("nan")))


def _pixel_maps(tmaps: torch.Tensor, image_shape: tuple) -> torch.Tensor:
    """(n_classes, H, W): each class's t per pixel, its strongest channel."""
    t = tmaps.view(len(tmaps), *image_shape)
    return t.amax(1) if len(image_shape) == 3 else t


def peak_windows(tmaps: torch.Tensor, image_shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(statistics (n_classes,), masks (n_classes, H, W)) of the classes' t-maps: how far each
    peak stands above the largest t outside the 3 x 3 window around it (+inf where nothing
    outside is positive, 0 where no t is; NaN for a NaN map, whose mask is empty), and the
    window's pixels above that largest t (the peak among them)."""
    t = _pixel_maps(tmaps, image_shape)
    n, h, w = t.shape
    finite = torch.isfinite(t).flatten(1).all(1)
    t = torch.where(finite[:, None, None], t, torch.zeros_like(t))
    peak, at = t.flatten(1).max(1)   # the first maximum's index, as argmax
    y, x = (at // w)[:, None, None], (at % w)[:, None, None]
    yy, xx = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    inside = ((yy - y).abs() <= 1) & ((xx - x).abs() <= 1)
    second = torch.where(inside, torch.full_like(t, float("-inf")), t).flatten(1).amax(1)
    masks = inside & (t > second[:, None, None])
    masks.view(n, -1)[torch.arange(n), at] = True
    stat = torch.where(second > 0, peak / torch.where(second > 0, second, 1.0),
                       torch.where(peak > 0, float("inf"), 0.0))
    stat = torch.where(finite, stat, float("nan"))
    masks &= finite[:, None, None]
    return stat.numpy(), masks.numpy()


def same_label_neighbours(z: np.ndarray, lab_index: np.ndarray, k: int, device: str = "cpu") -> np.ndarray:
    """(n, k + 1) pool rows: each row itself, then its k nearest latent neighbours of the same
    label (fewer images in a label: the row itself fills the rest), searched on ``device``."""
    n = len(z)
    out = np.repeat(np.arange(n)[:, None], k + 1, axis=1)
    for lab in np.unique(lab_index):
        rows = np.nonzero(lab_index == lab)[0]
        kk = min(k, len(rows) - 1)
        if kk < 1:
            continue
        out[rows, 1:kk + 1] = rows[latent_neighbours(z[rows], kk, device=device)]
    return out


def residual_scan(residuals: torch.Tensor, z: np.ndarray, pred: np.ndarray, labels: np.ndarray,
                  suspect: np.ndarray, image_shape: tuple, config: ResidualConfig | None = None,
                  progress: bool = False, device: str = "cpu") -> list[dict]:
    """Findings of classes whose unrelated images carry a localised residual peak that the
    same-label latent-neighbour null does not (module docstring).  ``residuals`` (n, P) from
    `reconstruction_residuals`, ``z`` (n, d) standardised latents, ``pred`` (n,) predicted
    classes (-1: no prediction), ``labels`` (n,) true labels (-1 unknown), ``suspect`` (n,)
    bool, ``image_shape`` (C, H, W) or (H, W) with P values, ``device`` where the latent
    neighbours are searched (the sums stay on the CPU).  Each finding: class, kind
    "residual", score (the peak's ratio), peak_t, p_value, q_value, members, ranking
    (pool-wide) and the extracted pattern (``_mask`` (H, W), ``_contrast``) that confirmation
    adds; sorted by q, then score."""
    check_default_dtype("residual_scan")   # the steps one by one too: float64 gave other findings
    cfg = config or ResidualConfig()
    n = len(pred)
    if residuals.dim() != 2 or residuals.shape[0] != n or len(z) != n or len(labels) != n or len(suspect) != n:
        raise ValueError(f"residuals {tuple(residuals.shape)}, z ({len(z)}), pred ({n}), labels ({len(labels)}) "
                         f"and suspect ({len(suspect)}) must have one row per pool image")
    if len(image_shape) not in (2, 3) or int(np.prod(image_shape)) != residuals.shape[1]:
        raise ValueError(f"image_shape {tuple(image_shape)} is not (C, H, W) or (H, W) of "
                         f"{residuals.shape[1]} residual values")
    check_size(n, residuals.shape[1], cfg.max_values)
    # float32 as the windows' masks below: a float64 input failed there, after the whole null
    residuals = residuals.float()
    pred = np.asarray(pred, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    rows = np.nonzero(~np.asarray(suspect, bool) & (pred >= 0))[0]       # the unrelated, classified
    if len(rows) < 2:
        return []
    n_classes = int(max(pred.max(), labels.max(initial=-1))) + 1
    lab = labels[rows]
    label_values = np.unique(lab)                  # -1 (unlabelled) among them: of no class
    lab_index = np.searchsorted(label_values, lab)
    # the residual's energy: a pattern the VAE cannot draw leaves a large residual of either
    # sign.  One-sided below: a shortcut adds energy to the images called c; a class its
    # carriers avoid (taken by the shortcut's class) has less than the rest, no finding
    sums = ClassSums(residuals[rows].double().square(), lab, n_classes)
    p_obs = pred[rows]
    obs = sums.tmaps(p_obs, cfg.min_images)
    stat_obs, masks = peak_windows(obs, image_shape)
    # on the run's device, as discovery's neighbour search (it searched the CPU whatever the run's)
    nbr = same_label_neighbours(np.asarray(z)[rows], lab_index, cfg.n_neighbours, device)
    rng = np.random.default_rng(cfg.seed)
    null = np.full((cfg.n_null, n_classes), np.nan)
    for b in tqdm(range(cfg.n_null), desc="residual null", disable=not progress):
        pick = nbr[np.arange(len(rows)), rng.integers(0, nbr.shape[1], len(rows))]
        null[b] = peak_windows(sums.tmaps(p_obs[pick], cfg.min_images), image_shape)[0]
    tested = np.nonzero(~np.isnan(stat_obs))[0]
    n_ref = np.array([np.sum(~np.isnan(null[:, c])) for c in tested], dtype=np.int64)   # resamplings with a statistic
    # discovery's permutation p-value (its tie floor: a null an ulp below counts as a tie)
    pvals = np.array([permutation_pvalues(stat_obs[c:c + 1], null[:, c][~np.isnan(null[:, c])])[0]
                      for c in tested])
    qvals = bh_qvalues(pvals) if len(tested) else pvals
    # above every resampling that gave the class a statistic, yet no finding (a class with none
    # has p = 1: no resampling to beat, and nothing more of them would change)
    starved = (n_ref > 0) & (pvals <= 1 / (1 + n_ref)) & (qvals > cfg.fdr)
    if starved.any():   # said nowhere: 30 classes could never give a lone finding at 400 resamplings
        log.warning("residual scan: %d classes scored above every one of their null resamplings but miss q <= %g: "
                    "their p-values are limited by the resamplings (>= 1/%d), not by the data; rerun with more "
                    "(discover's --residual-null, now %d; %d classes need about %d)", int(starved.sum()), cfg.fdr,
                    int(n_ref[starved].max()) + 1, cfg.n_null, len(tested), int(np.ceil(len(tested) / cfg.fdr)))
    findings = []
    energy = residuals.view(n, -1, *image_shape[-2:]).square().sum(1).view(n, -1)   # (n, H*W)
    for c, p, q in zip(tested, pvals, qvals):
        if q > cfg.fdr:
            continue
        mask = masks[c]
        ranking = (energy @ torch.as_tensor(mask.ravel(), dtype=torch.float32)).double().numpy()
        called = np.nonzero(pred == c)[0]
        members = called[ranking[called] > otsu_threshold(ranking[called])] if len(called) > 1 else called
        members = members if len(members) else called       # every ranking equal: no cut to make
        # the pattern the members carry: their mean residual against the t-map's second group
        # (unrelated images called another class), what confirmation adds onto clean images
        others = rows[(p_obs != c) & (lab != c)]
        contrast = _mean_rows(residuals, members) - _mean_rows(residuals, others)
        tmap = _pixel_maps(obs[c:c + 1], image_shape)[0]
        peak = np.unravel_index(int(torch.argmax(tmap)), tmap.shape)
        findings.append({
            # the statistic is unbounded where no t-value outside the peak's window is positive:
            # findings.json holds it capped (JSON has no Infinity: the file was not JSON then)
            "class": int(c), "kind": RESIDUAL, "score": float(min(stat_obs[c], SCORE_CAP)),
            "peak_t": float(tmap.max()), "peak": [int(v) for v in peak],
            "p_value": float(p), "q_value": float(q), "members": members.astype(np.int64), "ranking": ranking,
            "_mask": mask, "_contrast": contrast.view(*image_shape).float()
            if len(image_shape) == 3 else contrast.view(1, *image_shape).float(),
        })
    findings.sort(key=lambda f: (f["q_value"], -f["score"]))
    return findings


def _mean_rows(values: torch.Tensor, rows: np.ndarray, chunk: int = 4096) -> torch.Tensor:
    """float64 mean of ``values[rows]``, ``chunk`` rows at a time: a float64 copy of every other
    class's residuals was n x P x 8 bytes (512 MB at the scan's largest pool) per finding."""
    total = torch.zeros(values.shape[1:], dtype=torch.float64)
    for s in range(0, len(rows), chunk):
        total += values[torch.as_tensor(rows[s:s + chunk])].double().sum(0)
    return total / len(rows)


def scan_store(store, source: ImageSource, vae, config: ResidualConfig, *, suspect: np.ndarray | None = None,
               device: str = "cpu", progress: bool = False, num_workers: int = 0,
               loader_backend: str | None = None, decode_on: str | None = None) -> tuple[list[dict], np.ndarray]:
    """(`residual_scan`'s findings, the rows it could use) of an embedding store's pool: its
    residuals (`reconstruction_residuals`, read as ``num_workers``, ``loader_backend``,
    ``decode_on`` say), latents, predictions and labels; images the store could not read or
    classify take no part."""
    from .discover import _standardise

    n = store.n
    suspect = np.zeros(n, bool) if suspect is None else np.asarray(suspect, bool)
    pred = np.asarray(store["pred"]).astype(np.int64)
    ok = np.asarray(store["ok"]).astype(bool) & (pred >= 0)
    mu = np.asarray(store["mu"])
    res = reconstruction_residuals(source, mu, vae, config.batch_size, progress, device, readable=ok,
                                   max_values=config.max_values, num_workers=num_workers,
                                   loader_backend=loader_backend, decode_on=decode_on)
    # standardised over the rows discovery uses: every row's (unreadable ones' included)
    # moved the latents with the number of failed files, and the null's neighbours with them
    z = np.zeros(mu.shape, np.float32)
    if ok.any():
        z[ok] = _standardise(mu[ok])
    found = residual_scan(res, z, np.where(ok, pred, -1), np.asarray(store["labels"]), suspect,
                          tuple(source.image_shape), config, progress, device)
    return found, ok


@restores_models("vae")
def add_residual_findings(result, store, source: ImageSource, vae, out_dir, config: ResidualConfig, *,
                          suspect: np.ndarray | None = None, n_exemplars: int = 16, device: str = "cpu",
                          progress: bool = False, num_workers: int = 0, loader_backend: str | None = None,
                          decode_on: str | None = None, reads: ImageSource | None = None) -> list[dict]:
    """Run the scan on a discovery's store and append its findings to ``result`` (after the
    clusters', ranks following theirs), in the findings.json schema: cluster -1, kind
    "residual", peak (y, x), exemplars (the members of most residual energy in the mask),
    pictures (the members' mean image, the contrast, the mask, the exemplars) under
    ``out_dir``/images, the extracted pattern confirmation pastes, and the pool ranking.
    ``num_workers``, ``loader_backend``, ``decode_on``: how the pool is re-read
    (`reconstruction_residuals`); ``reads``: the pool as its pictures read it a batch at a
    time (`spurfast.data.reread`; default ``source``).  Returns the new findings."""
    from .discover import save_finding_images

    found, ok = scan_store(store, source, vae, config, suspect=suspect, device=device, progress=progress,
                           num_workers=num_workers, loader_backend=loader_backend, decode_on=decode_on)
    suspect = np.zeros(store.n, bool) if suspect is None else np.asarray(suspect, bool)
    labels = np.asarray(store["labels"]).astype(np.int64)
    pictures = reads or source
    for rank, f in enumerate(found, len(result.findings) + 1):
        members = f["members"]
        ranking = np.where(ok, f["ranking"], -np.inf).astype(np.float32)
        by_energy = members[np.lexsort((members, -ranking[members]))]
        top = by_energy[:n_exemplars]
        # a picture, not a statistic: the mean of the 256 members of most residual energy
        mean_image = pictures.get_batch(by_energy[:256])[0].float().mean(0)
        f.update({
            "rank": rank, "cluster": -1, "size": int(len(members)), "exemplars": top.tolist(),
            "members": members.tolist(), "confirm": None, "ranked_by": "residual",
            "class_name": (utf8_name(str(source.class_names[f["class"]]))
                           if getattr(source, "class_names", None) is not None
                           and f["class"] < len(source.class_names) else None),
            # the clusters' count (`scoring.unrelated_to_class`), which the report words: an unlabelled
            # suspect sample (label -1, "another class" here) may be genuine class content
            "n_unrelated": int(unrelated_to_class(top_two(store["probs"][members]), labels[members],
                                                  np.full(len(members), f["class"]), ~suspect[members]).sum()),
            "n_suspect": int(suspect[members].sum()),
            "_pattern": mean_image,
        })
        f["images"] = save_finding_images(out_dir, rank, mean_image, f["_contrast"], f["_mask"],
                                          pictures.get_batch(top)[0])
        result.rankings[rank] = ranking
        del f["ranking"]
        result.findings.append(f)
    return found
