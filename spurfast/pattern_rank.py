"""Pattern ranking: a localised finding ranks the pool by its extracted pattern.

Every finding ranks the whole pool (which images carry this shortcut?) by its latent probe
(`spurfast.discover`): a direction in VAE latent space, which mixes the class's content with
the pattern.  Where several patterns share a pool, natural look-alikes of the class then rank
above the carriers (three patterns at n = 1000: AP 0.47-0.53 for the corner patch, where the
pixel ablation has 0.99; docs/RESULTS.md, sixteenth session).  A small extracted pattern (a
patch, a bar) is found better by matching it in pixels: each image's projection onto
mask x contrast, the pattern that confirmation pastes and training support tests.  A diffuse
one is not (additive noise, a background colour: its mask holds about half the image and the
projection follows the content): given the pool's predictions, those findings are ranked by
their latent probe and a probe on the images' thumbnails together (`spurfast.pixel_probe`),
else they keep the latent ranking.

A cluster's contrast is its pattern plus what is left of its content (members of a mixed cluster
differ from their content-matched others by a faint garment-sized shadow too): one Otsu cut
keeps both and the mask is not localised (the patch among three patterns at n = 1000: 42% of the
image, AP 0.71 by the probe).  A second Otsu cut among the mask's pixels isolates the strong part;
where that core is localised, the finding is ranked by the pattern inside the core and its latent
probe together, each in its spread's units (``latent+pattern``).  The core may be the whole
pattern (a patch: its carriers stand out of the pool's projections so far that the probe moves
none of them, AP 1.00; twenty-third session, docs/RESULTS.md), or only the strongest pixels of a
diffuse one, where content varies as much as the pattern adds: the noise at 0.5 among three
patterns at n = 1000 (seed 0; its core 5% of the image) ranked its carriers at AP 0.57 by the
core alone, 0.93 by the probe, 0.94 by both (forty-fifth session).  A diffuse pattern's second
cut mostly halves it, and on Fashion-MNIST pools noise and backgrounds mostly stay above the bar
(the digits pool's noise core, 7-9% of the image, ranks its carriers at AP 1.00 where the probe
had 0.96-1.00).

Both combined rankings add a third term where it marks a stamp: the pattern on the mask's
*peak*, its strongest pixels (Otsu cuts repeated among the pixels each keeps, until one keeps
them all), where that peak is localised, differs from the core, and its projection over the
ranked images is two-valued (Otsu's separability at least `TWO_VALUED`: a stamp's carriers at
one value, every other image at another).  A single planted pixel is the strongest pixel of its
cluster's contrast (0.75 where content's shadow reaches 0.39), yet one pixel among a core of
48-74 or a thumbnail's 2x2 average is lost in content: the pixel at n = 1000 ranked its
carriers at AP 0.16-0.49, and at 0.77-0.92 with the peak's term; its peak's separability is
1.000.  A noise pattern's or content's peak is one pixel whose value varies with the content
(separability 0.80-0.88 on the full preset): added, it cost the noise at 0.25, n = 100, 0.045
of AP (fifty-seventh session).
A two-valued peak's high side (the images like the finding's members) holding at most
`STAMP_SHARE` of the ranked images is a stamp's carriers: they rank above every other image,
and the three terms' sum orders each side (``ranked_by`` gains "+stamp").  With the sum alone,
look-alikes of the class stayed above some carriers: the pixel at n = 1000 ranked them at AP
0.77-0.92, and at 1.00 in each seed with its carriers first; no other setting's best AP changed
(fifty-ninth session).  A high side holding most images is the members' *lack* of a mark the
others carry (the pixel's peak in the classes it pulls carriers from: 90% of the images), not a
stamp: that peak stays a term of the sum.  The peak carries no content at all, so it never
orders the images alone.  A stamped finding's mask becomes the stamp's own pixels, those that
tell its carriers from the rest (`spurfast.stamp`), where they are localised.

Only the latent ranking's first ``top`` images of each re-ranked finding are read (one pass
over their union, whatever the pool size; the pixel probes' fit reads a sample of at most
8,192 negatives and 1,024 positives a finding before it); they are ordered by the projection,
or the two probes' sum (ties by the latent order: score, then index), above every other image,
which keep the latent order.
"""
from __future__ import annotations

import numpy as np
import torch

from .characterise import contrast_magnitude, otsu_threshold
from .checks import SOURCE_HINT, check_arguments, check_default_dtype
from .cores import usable_cores
from .data.sources import ImageSource
from .in_order import run_in_order
from .pixel_probe import fit_probe, full_size_pattern, negative_sample, positive_sample, robust_z, thumbnails
from .support import extracted_patterns, image_pass, require_patterns, wanted_projections

LOCALISED = 0.1    # an extracted mask on at most this fraction of the image's pixels
TOP = 20_000       # images of each finding's latent ranking re-ranked by the pattern
TWO_VALUED = 0.95  # Otsu separability of a peak's projection that marks a stamp (content's: <= 0.88)
STAMP_SHARE = 0.5  # a stamp's carriers are at most this share of the ranked images (more: an absence)


def _latent_order(ranking: np.ndarray, head: int | None = None) -> np.ndarray:
    """Pool indices with a finite latent score, best first (ties by index); the first ``head``
    of them alone where given, exactly those: the scores at least the ``head``-th best are
    sorted, not the pool's (a pool-sized lexsort per finding took 0.8 s of the 100k bench's
    rankings for 20,000 indices)."""
    finite = np.nonzero(np.isfinite(ranking))[0]
    if head is not None and head < len(finite):
        neg = -ranking[finite]
        cut = np.partition(neg, head - 1)[head - 1]   # the head-th best score: ties at it all stay
        finite = finite[neg <= cut]
    order = finite[np.lexsort((finite, -ranking[finite]))]
    return order if head is None else order[:head]


def ranking_mask(mask: np.ndarray, contrast, localised: float = LOCALISED) -> np.ndarray | None:
    """(H, W) bool pixels whose pattern ranks the pool, or None (keep the latent ranking): the
    extracted mask where it is localised, else its Otsu core (the mask's pixels above a second
    Otsu cut of |contrast| among them) where that is localised."""
    return _ranking_choice(mask, contrast, localised)[0]


def _ranking_choice(mask: np.ndarray, contrast, localised: float) -> tuple[np.ndarray | None, str]:
    """(`ranking_mask`'s pixels, the ``ranked_by`` they give): "pattern" for a localised mask,
    "latent+pattern" for the core of a diffuse one, "latent" for none."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return None, "latent"
    if float(mask.mean()) <= localised:
        return mask, "pattern"
    mag = contrast_magnitude(contrast)
    core = mask & (mag > otsu_threshold(mag[mask]))   # no second level among equal values: empty
    return (core, "latent+pattern") if core.any() and float(core.mean()) <= localised else (None, "latent")


def peak_mask(mask: np.ndarray, contrast) -> np.ndarray:
    """(H, W) bool: the strongest pixels of ``mask`` by |contrast|, an Otsu cut among the pixels
    the previous cut kept, repeated until a cut keeps all of them or none (equal values)."""
    mag = contrast_magnitude(contrast)
    peak = np.asarray(mask, bool)
    while peak.any():
        strong = peak & (mag > otsu_threshold(mag[peak]))
        if not strong.any() or strong.sum() == peak.sum():
            break
        peak = strong
    return peak


def separability(values: np.ndarray) -> float:
    """Otsu's criterion at `otsu_threshold`'s cut: the share of the values' variance between the
    two groups it makes; 1 for two values, 0 for one."""
    v = np.asarray(values, np.float64).ravel()
    total = float(v.var()) if v.size else 0.0
    if v.size < 2 or not total > 0:
        return 0.0
    high = v > otsu_threshold(v)
    w = float(high.mean())
    if w in (0.0, 1.0):
        return 0.0
    return w * (1 - w) * float(v[high].mean() - v[~high].mean()) ** 2 / total


def _peak_choice(f: dict, core: np.ndarray | None, localised: float) -> np.ndarray | None:
    """The peak whose pattern ranks a combined finding as a third term, or None: none where it is
    not localised (equal values over a large part: no stamp) or is the ``core`` itself."""
    peak = peak_mask(f["_mask"], f["_contrast"])
    if not peak.any() or float(peak.mean()) > localised or (core is not None and np.array_equal(peak, core)):
        return None
    return peak


def pattern_rankings(findings: list[dict], rankings: dict[int, np.ndarray], source: ImageSource, *,
                     pred: np.ndarray | None = None, localised: float = LOCALISED, top: int = TOP,
                     batch_size: int = 256, progress: bool = False, num_workers: int = 0,
                     loader_backend: str | None = None, device: str | None = None, seed: int = 0) -> None:
    """Set every finding's ``ranked_by`` ("pattern", "latent+pattern", "latent+pixels" or
    "latent"; the two combined ones with "+stamp" where a stamp's carriers rank first, and
    their pattern the stamp's, `spurfast.stamp.take_stamp`) and replace ``rankings[rank]`` of the
    localised ones (or with a localised core) and of the diffuse ones with a pixel probe
    (float64: the latent order below, then the re-ranked images; unreadable images, the
    latent ranking's and any this read finds, are -inf).  Needs ``_mask`` and ``_contrast``
    (`characterise`).  ``pred``: the pool's predicted classes (-1 where none); with it, a
    diffuse finding that lists its unrelated members (``_unrelated``, `discover`) is ranked
    by its latent and pixel probes together (`spurfast.pixel_probe`), else it keeps the latent
    ranking.  ``device``: the run's, where a folder pool is decoded
    (`spurfast.support.image_pass`).  ``seed``: the run's, for the pixel probe's samples of
    large pools."""
    check_default_dtype("pattern_rankings")   # the steps one by one too: float64 gave other findings
    check_arguments("pattern_rankings", ("source", source, ImageSource, "an ImageSource", SOURCE_HINT))
    from .confirm import _known_readable

    if not 0.0 < localised <= 1.0:
        raise ValueError(f"localised must be a fraction of the image in (0, 1], got {localised}")
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise ValueError(f"top must be an integer >= 1, got {top!r}")
    if batch_size < 1:
        raise ValueError(f"pattern ranking batch_size must be >= 1, got {batch_size}")
    if pred is not None and np.shape(pred) != (len(source),):
        raise ValueError(f"pred has shape {np.shape(pred)}, expected ({len(source)},): one prediction per image "
                         f"of {source.name}")
    require_patterns(findings)   # before any finding is changed
    missing = [f["rank"] for f in findings if f["rank"] not in rankings]
    if missing:   # checked in the loop below, it left the findings before it marked "pattern"
        raise ValueError(f"finding {missing[0]} has no latent ranking (rankings hold {sorted(rankings)})")
    chosen, masks, diffuse = [], [], []
    for f in findings:
        m, f["ranked_by"] = _ranking_choice(f["_mask"], f["_contrast"], localised)
        if m is not None:
            chosen.append(f)
            masks.append(m)
        elif pred is not None and f.get("_unrelated") is not None:
            diffuse.append(f)
    patterns = [extracted_patterns(chosen, masks).double()] if chosen else []
    probed, read = [], np.zeros(0, np.int64)
    if diffuse:
        probes, read = _pixel_probes(diffuse, source, np.asarray(pred), batch_size, progress, num_workers,
                                     loader_backend, device, seed)
        for f, w in zip(diffuse, probes):
            if w is not None:
                f["ranked_by"] = "latent+pixels"
                probed.append(f)
                patterns.append(full_size_pattern(w, source.image_shape)[None])
    chosen = chosen + probed
    if not chosen:
        return
    peaks = [None if f["ranked_by"] == "pattern" else   # the probed ones have no core: masks ends first
             _peak_choice(f, masks[i] if i < len(masks) else None, localised) for i, f in enumerate(chosen)]
    peaked = [i for i, m in enumerate(peaks) if m is not None]
    if peaked:
        patterns.append(extracted_patterns([chosen[i] for i in peaked], [peaks[i] for i in peaked]).double())
    peak_at = {i: len(chosen) + n for n, i in enumerate(peaked)}   # its pattern's row, after the chosen
    # the heads only: a pool-sized order per finding, kept through the pass over the images,
    # was what `SpilledRankings` keeps out of memory (each is sorted again below)
    # per finding, on every core (numpy's sorts leave the GIL); the rankings are read and
    # written here, in this thread (`SpilledRankings` keeps them on disk)
    at_once = usable_cores()
    heads = list(run_in_order((lambda r=np.asarray(rankings[f["rank"]]): _latent_order(r, top) for f in chosen),
                              at_once))
    union = np.unique(np.concatenate(heads))
    # each finding's own head only: a (union x findings) matrix grew with the square of the
    # number of localised findings (heads of different classes barely overlap)
    sorted_heads = [np.sort(h) for h in heads]
    sorted_heads += [sorted_heads[i] for i in peaked]
    proj = wanted_projections(source, union, torch.cat(patterns), sorted_heads, batch_size, progress,
                              num_workers=num_workers, loader_backend=loader_backend, device=device)
    # a file unreadable now (changed since it was embedded) projects to 0, which ranked it among
    # the carriers of a dark pattern (theirs project near 0 too): unranked, as the store's are;
    # so is one the probes' read found, outside every head (it kept its latent place)
    read = np.union1d(union, read)
    unreadable = np.setdiff1d(read, _known_readable(source, read))

    def ranked(f: dict, j: int, head: np.ndarray, latent: np.ndarray) -> np.ndarray:
        order = _latent_order(latent)
        out = np.full(len(latent), -np.inf)
        out[order[::-1]] = np.arange(len(order), dtype=np.float64)          # the latent order, best highest
        at = np.searchsorted(sorted_heads[j], head)   # the peak's projections share the finding's head
        p = proj[j][at]
        stamped = np.zeros(len(head), bool)
        if f["ranked_by"] in ("latent+pixels", "latent+pattern"):   # both, each in its spread's units
            p = robust_z(latent[head]) + robust_z(p)
            if j in peak_at:   # and the peak's pattern, where it is a stamp's
                peak_p = proj[peak_at[j]][at]
                if separability(peak_p) >= TWO_VALUED:
                    p = p + robust_z(peak_p)
                    # its carriers first: the sum alone left look-alikes of the class above them
                    carriers = peak_p > otsu_threshold(peak_p)
                    if carriers.mean() <= STAMP_SHARE:
                        stamped = carriers
        # ascending, best last; ties by the head's own (latent) order, so an exact double tie
        # keeps the smaller index first as the latent order does (latent[head] reversed those)
        by_pattern = head[np.lexsort((-np.arange(len(head)), p, stamped))]
        out[by_pattern] = len(order) + np.arange(len(head), dtype=np.float64)
        out[unreadable] = -np.inf
        return out, (head[stamped], head[~stamped]) if stamped.any() else None

    tasks = (lambda f=f, j=j, head=head, latent=np.asarray(rankings[f["rank"]]): ranked(f, j, head, latent)
             for j, (f, head) in enumerate(zip(chosen, heads)))
    stamped = []
    for f, (out, sides) in zip(chosen, run_in_order(tasks, at_once)):
        rankings[f["rank"]] = out
        if sides is not None:
            f["ranked_by"] += "+stamp"
            stamped.append((f, sides))
    if stamped:   # their patterns become the stamps' own (`spurfast.stamp`)
        from .stamp import stamp_masks, take_stamp

        stamps = stamp_masks([sides for _, sides in stamped], source, localised=localised, batch_size=batch_size,
                             progress=progress, num_workers=num_workers, loader_backend=loader_backend, device=device,
                             seed=seed)
        for (f, _), st in zip(stamped, stamps):
            if st is not None:
                take_stamp(f, st)


def _pixel_probes(findings: list[dict], source: ImageSource, pred: np.ndarray, batch_size: int, progress: bool,
                  num_workers: int, loader_backend: str | None,
                  device: str | None, seed: int = 0) -> tuple[list[np.ndarray | None], np.ndarray]:
    """(each diffuse finding's thumbnail probe (`spurfast.pixel_probe`), None where it has fewer
    than 2 readable unrelated members or negatives; the pool indices read): one pass over the
    negatives' shared sample and every finding's positives."""
    neg = negative_sample(pred, seed=seed)
    pos = [positive_sample(f["_unrelated"], seed=seed) for f in findings]
    union = np.unique(np.concatenate([neg, *pos]))
    if len(neg) < 2:   # no image predicted at all, or one: nothing to fit against (and nothing read)
        return [None] * len(findings), np.zeros(0, np.int64)
    thumbs, readable = None, np.zeros(len(union), bool)

    def take(got, x, ok):
        nonlocal thumbs
        t = thumbnails(x).numpy().astype(np.float32)
        if thumbs is None:
            thumbs = np.zeros((len(union), t.shape[1]), np.float32)
        at = np.searchsorted(union, got)
        thumbs[at], readable[at] = t, ok

    image_pass(source, union, take, batch_size, progress, "pixel probes", num_workers, loader_backend, device)
    neg_rows = np.searchsorted(union, neg)
    neg_rows = neg_rows[readable[neg_rows]]
    if thumbs is None or len(neg_rows) < 2:
        return [None] * len(findings), union
    negatives = thumbs[neg_rows]
    centre, spread = negatives.mean(0, dtype=np.float64), negatives.std(0, dtype=np.float64)
    spread = np.where(spread > 0, spread, 1.0)
    out = []
    for f, p in zip(findings, pos):
        rows_pos = np.searchsorted(union, p)
        rows_pos = rows_pos[readable[rows_pos]]
        rows_neg = neg_rows[(pred[union[neg_rows]] != int(f["class"])) & ~np.isin(union[neg_rows], p)]
        out.append(fit_probe(thumbs[rows_pos], thumbs[rows_neg], centre, spread))
    return out, union
