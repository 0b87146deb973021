"""The HTML report: a folder with report.html and the PNGs it shows.

Everything the report did not write itself (class names, paths, file names, config
values) is HTML-escaped.  The PNGs are written next to the page (findings.json names them)
and embedded in it as data URIs, so report.html alone is the whole report (DESIGN.md: a
self-contained report; a copied or mailed page keeps its pictures).
"""
from __future__ import annotations

import base64
import html
import json
import numbers
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .atomic_files import replace_atomically
from .data.sources import utf8_name
from .families import CLUSTERS, FEATURE_VIEW, RESIDUAL, finding_family

UPSCALE_TO = 112  # small images are enlarged (nearest) so a pixel pattern stays visible


def digits_on_side(v: float, side, spec: str = "g", digits: int = 3) -> str:
    """``v`` formatted with ``digits`` (``spec`` "g": significant digits, "f": decimals), more
    where fewer would change ``side(value)``, the verdict printed beside it."""
    text = f"{v:.{digits}{spec}}"
    while side(float(text)) != side(v) and digits < 17:
        digits += 1
        text = f"{v:.{digits}{spec}}"
    return text


def beside_level(v, level: float = 0.05) -> str:
    """A p- or q-value to 3 significant digits, more where fewer would put it on the other side
    of ``level`` (a q of 0.0500004, not significant at 0.05, printed "q = 0.05" beside "not
    supported")."""
    return digits_on_side(float(v), lambda t: t <= level)


def _data_uri(path: Path) -> str:
    """The PNG at ``path`` as a data URI (base64 text holds no quote or angle bracket)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _text(v) -> str:
    """``v`` as text the UTF-8 page can hold: a name read from a folder whose bytes are not
    UTF-8 (a class folder, a file; surrogate escapes) has them spelled \\xNN, as the run's
    bad_files.json does (writing the page raised UnicodeEncodeError on them)."""
    return utf8_name(str(v))


def _to_pil(img: torch.Tensor):
    from PIL import Image

    x = img.detach().float().clamp(0, 1)
    if x.dim() == 2:
        x = x.unsqueeze(0)
    arr = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    if arr.shape[2] == 2:   # drawn as red and green: PIL read two channels as grey + alpha (invisible)
        arr = np.concatenate([arr, np.zeros_like(arr[:, :, :1])], axis=2)
    im = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr[:, :, :3])
    if im.width < UPSCALE_TO:
        s = max(1, UPSCALE_TO // im.width)
        im = im.resize((im.width * s, im.height * s), Image.NEAREST)
    return im


def _make_folder(d: Path) -> None:
    """mkdir -p ``d``, naming what is in the way: a file (or a dangling link) there made
    mkdir say only "[Errno 17] File exists"."""
    if (d.is_symlink() or d.exists()) and not d.is_dir():
        raise NotADirectoryError(f"{_text(d)} is not a folder; the report writes its pictures there: move or "
                                 f"remove it")
    if d.is_symlink():   # the pictures replaced files of the folder it points to, outside the run
        raise NotADirectoryError(f"{_text(d)} is a link to {_text(d.resolve())}; the report writes its pictures "
                                 f"into the run's own folder: remove the link")
    d.mkdir(parents=True, exist_ok=True)


def _write_png(path: Path, save) -> str:
    """``save(fh)`` writes a PNG into an open file: into a temporary file beside ``path``, then
    renamed over it, as every other output (saved in place, a link planted at ``path`` had the
    picture written into the file it pointed to)."""
    replace_atomically(path, save, "wb", durable=False)   # each run draws its pictures again
    return str(path)


def save_image(img: torch.Tensor, path) -> str:
    path = Path(path)
    _make_folder(path.parent)
    picture = _to_pil(img)
    # zlib level 1: the 100k bench's 336 pictures of 84 findings encode in 0.45 s instead of 1.5 s
    # (level 6, Pillow's default), 6% larger (9.6 vs 9.0 MiB)
    return _write_png(path, lambda fh: picture.save(fh, "PNG", compress_level=1))


def save_map(contrast: torch.Tensor, path) -> str:
    """Signed contrast as a diverging colour map (red = members brighter; of several channels,
    in the one that differs most at each pixel, as `pattern_mask` measures it)."""
    c = contrast.detach().float()
    if c.dim() == 3:
        # not the channels' mean: a change of hue (magenta on grey, +0.33/-0.66/+0.33) averaged
        # to 0 and the map was blank where the mask found the patch
        c = c.gather(0, c.abs().argmax(0, keepdim=True))[0]
    m = float(c.abs().max()) or 1.0
    v = (c / m).clamp(-1, 1)
    rgb = torch.stack([1 - (-v).clamp(min=0), 1 - v.abs(), 1 - v.clamp(min=0)])  # white at 0
    return save_image(rgb, path)


def _run_png(out_dir: Path, name) -> bool:
    """Is ``name`` (a findings.json image path) a PNG inside the run folder?  The report inlines
    the bytes, so a findings.json naming ../../ anything pulled that file into a shared page."""
    path = out_dir / str(name)   # an absolute name replaces out_dir: refused below
    try:   # is_file() first: open() of a FIFO waited for a writer forever
        # inside the run once ".." and links are followed: a link in a received run folder
        # pulled any PNG its reader could open into the page
        if not path.is_file() or not path.resolve().is_relative_to(out_dir.resolve()):
            return False
        with open(path, "rb") as fh:
            return fh.read(8) == b"\x89PNG\r\n\x1a\n"
    except (OSError, ValueError):   # ValueError: a name holding a NUL byte (open() raised it, naming no file)
        return False


def save_grid(images: torch.Tensor, path, ncol: int = 8) -> str:
    from torchvision.utils import make_grid

    if len(images) == 0:
        images = torch.zeros(1, 1, 8, 8)
    grid = make_grid(images.float().clamp(0, 1), nrow=ncol, padding=2, pad_value=0.5)
    return save_image(grid, path)


MAX_BARS = 1000   # more clusters than this are drawn as lines (a bar would be under a pixel wide)


def plot_scores(clusters: list[dict], fdr_line: float, path) -> str:
    # a Figure of its own, not pyplot: matplotlib.use("Agg") switched the caller's backend
    # (a notebook's inline plots stopped showing after a run)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.2), dpi=100)
    ax = fig.subplots()
    cl = sorted(clusters, key=lambda c: -c["score"])
    sig = np.array([c["q_value"] <= fdr_line for c in cl], dtype=bool)
    xs = np.arange(len(cl))
    ys = np.array([c["score"] for c in cl], dtype=np.float64)
    for keep, color, label in ((~sig, "#aaaaaa", "not significant"), (sig, "#d62728", f"q <= {fdr_line:g}")):
        if len(cl) <= MAX_BARS:
            ax.bar(xs[keep], ys[keep], color=color, label=label)
        else:   # one line collection: a patch per cluster took minutes at 13k clusters (1.2M images)
            ax.vlines(xs[keep], 0.0, ys[keep], colors=color, label=label, linewidth=0.8)
    ax.set_xlabel("clusters (all classes), by score")
    ax.set_ylabel("score")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return _write_png(Path(path), lambda fh: fig.savefig(fh, format="png"))


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:14px}
.finding{border:1px solid #ddd;border-radius:6px;padding:1em;margin:1.5em 0}
.imgs{display:flex;gap:1em;align-items:flex-start;flex-wrap:wrap}.imgs figure{margin:0}
figcaption{font-size:12px;color:#555;text-align:center}img{image-rendering:pixelated}
.muted{color:#777}code{background:#f4f4f4;padding:1px 4px}"""


STATISTIC_WORDS = {
    "share": "the share of the member's unrelated latent neighbours predicted the same class",
    "surprise": "-log10 of the chance that so many of the member's unrelated latent neighbours are predicted "
                "the same class, given how often the model calls their labels so",
}


_DOC_KEYS = ("schema", "spurfast_version", "config", "pool", "findings")
_FINDING_KEYS = ("rank", "class", "cluster", "size", "score", "p_value", "q_value")   # what the page reads


def _check_document(doc, out_dir: Path) -> None:
    """Refuse a document that is not a findings.json spurfast wrote (another tool's, a
    hand-edited one) by what it lacks: `spurfast report` ended in a KeyError traceback."""
    what = f"the findings document of {_text(out_dir)} (findings.json)"
    if not isinstance(doc, dict):
        raise ValueError(f"{what} is a JSON {type(doc).__name__}, expected an object with keys {', '.join(_DOC_KEYS)} "
                         f"(spurfast's findings.json, schema 1)")
    missing = [k for k in _DOC_KEYS if k not in doc]
    if missing or not (isinstance(doc["config"], dict) and isinstance(doc["pool"], dict)
                       and isinstance(doc["findings"], list)):
        raise ValueError(f"{what} is not spurfast's findings.json (schema 1): "
                         + (f"it lacks {', '.join(missing)}" if missing else "its config or pool is no object, or "
                                                                             "its findings no list"))
    disc = doc["config"].get("discover") or {}   # null: the defaults, as a document without it
    if not isinstance(disc, dict):
        raise ValueError(f"{what}: config.discover is a JSON {type(disc).__name__}, expected an object")
    _need_number(disc.get("fdr", 0.05), f"{what}: config.discover.fdr")
    if not isinstance(disc.get("statistic", "share"), str):
        raise ValueError(f"{what}: config.discover.statistic is {disc['statistic']!r}, expected a name (share, surprise)")
    for i, f in enumerate(doc["findings"]):
        lack = [k for k in _FINDING_KEYS if not isinstance(f, dict) or k not in f]
        if lack:
            raise ValueError(f"{what}: finding {i + 1} lacks {', '.join(lack)}")
        # what the page formats as numbers or reads as objects: a hand-edited value ended in a
        # TypeError, KeyError or AttributeError traceback naming no field
        at = f"{what}: finding {i + 1}'s"
        for k in ("score", "p_value", "q_value"):
            _need_number(f[k], f"{at} {k}")
        for k in ("confirm", "support", "images"):
            if f.get(k) and not isinstance(f[k], dict):   # null (or empty) shows nothing, as before
                raise ValueError(f"{at} {k} is a JSON {type(f[k]).__name__}, expected an object or null")
        cf, sp = f.get("confirm"), f.get("support")
        if cf and cf.get("flip_rate") is not None:
            for k, given in (("flip_rate", True), ("control_flip_rate", True), ("p_value", True),
                             ("content_flip_rate", cf.get("content_p_value") is not None),
                             ("content_p_value", cf.get("content_p_value") is not None),
                             ("q_value", cf.get("q_value") is not None),
                             # the verdict compares the dose rates wherever they are, with or without a dose
                             ("dose", "dose" in cf), ("dose_flip_rate", "dose" in cf or "dose_flip_rate" in cf),
                             ("dose_control_flip_rate", "dose" in cf or "dose_control_flip_rate" in cf),
                             ("smooth_flip_rate", cf.get("smooth_flip_rate") is not None),
                             ("smooth_p_value", cf.get("smooth_flip_rate") is not None)):
                if given:
                    _need_number(cf.get(k), f"{at} confirm.{k}", text=False)   # compared: "0.5" > 0.1 raised
        if sp and sp.get("p_value") is not None:
            lack = [k for k in ("n_class", "class_above", "n_other", "other_above", "q_value") if k not in sp]
            if lack:
                raise ValueError(f"{at} support has a p_value but lacks {', '.join(lack)}")
            for k in ("p_value", "q_value", "tail"):
                if k in sp:
                    _need_number(sp[k], f"{at} support.{k}")
        for k, name in (f.get("images") or {}).items():
            if not isinstance(name, str):
                raise ValueError(f"{at} images.{k} is {name!r}, expected a file name")
        if finding_family(f) == RESIDUAL:   # the residual scan's paragraph reads these two
            if "peak_t" in f:
                _need_number(f["peak_t"], f"{at} peak_t")
            pk = f.get("peak")
            if pk and not (isinstance(pk, list) and len(pk) == 2):
                raise ValueError(f"{at} peak is {json.dumps(pk)}, expected [y, x]")


def _check_clusters(clusters) -> None:
    """Refuse ``clusters`` (write_report's plot of every cluster) unless each is a mapping
    with a numeric score and q-value: a list of findings without them ended in a bare
    KeyError from the plot, after the page's checks had passed."""
    if clusters is None:
        return
    if not isinstance(clusters, (list, tuple)):
        raise ValueError(f"write_report: clusters is a {type(clusters).__name__}, expected a list of dicts "
                         f"with score and q_value (DiscoveryResult.clusters)")
    for i, c in enumerate(clusters):
        lack = [k for k in ("score", "q_value") if not isinstance(c, Mapping) or k not in c]
        if lack:
            raise ValueError(f"write_report: clusters[{i}] lacks {', '.join(lack)} (expected a dict with score and "
                             f"q_value, as DiscoveryResult.clusters has)")
        for k in ("score", "q_value"):
            _need_number(c[k], f"write_report: clusters[{i}]['{k}']", text=False)


def _need_number(v, what: str, text: bool = True) -> None:
    """Refuse ``v`` (a findings.json value the page formats as a number) unless float() reads
    it; ``text``: a string that spells a number will do."""
    try:
        if isinstance(v, (numbers.Real, str) if text else numbers.Real) and not isinstance(v, bool):   # numpy's too
            float(v)
            return
    except ValueError:
        pass
    except OverflowError:   # an integer of 309+ digits (JSON reads it as int): the page's float() raised
        raise ValueError(f"{what} is {json.dumps(v, default=repr)[:40]}..., expected a number within a float's "
                         f"range (1.8e308)") from None
    raise ValueError(f"{what} is {json.dumps(v, default=repr)}, expected a number")


def _escaped(v) -> str:
    """``v`` as text (`_text`), escaped for the page: quotes too, since values land in attributes."""
    return html.escape(_text(v), quote=True)


def _membership(f: dict) -> str:
    """A finding's members as the score counts them, escaped.  "Unrelated" is labelled
    another class, or unlabelled and not a suspect (`spurfast.scoring.unrelated_to_class`):
    "of another class" said that of unlabelled members nobody had labelled, mostly the class
    itself in an unlabelled folder pool."""
    e = _escaped
    # the two counts overlap (a suspect labelled another class is in both): "95 members (61
    # unrelated ...; 39 suspect samples)" read as a split that added up to 100
    return (f"{e(f.get('n_unrelated', '?'))} unrelated to class {e(f['class'])}: labelled another class, or "
            f"unlabelled and not suspect; {e(f.get('n_suspect', '?'))} suspect samples, those labelled another "
            f"class counted in both")


_SEARCH = {CLUSTERS: "latent-cluster", FEATURE_VIEW: "feature-view", RESIDUAL: "residual-scan"}


def write_report(doc: dict, out_dir, clusters: list[dict] | None = None, bad_files: dict | None = None,
                 summary: dict | None = None) -> Path:
    """Write ``out_dir``/report.html from a findings document ``doc`` (findings.json's
    content; its images are read from ``out_dir``): self-contained, images inlined.
    ``clusters``: every cluster's score and q-value (a plot of them), ``bad_files``:
    {name: reason} of unreadable images (listed), ``summary``: {label: value} shown first.
    Returns the report's path."""
    out_dir = Path(out_dir)
    _check_document(doc, out_dir)
    _check_clusters(clusters)
    out_dir.mkdir(parents=True, exist_ok=True)   # a new folder: without clusters (no plot) nothing made it
    e = _escaped
    disc = doc["config"].get("discover") or {}
    fdr = float(disc.get("fdr", 0.05))   # "0.05" too (plot_scores compares it)
    # what a score sums (runs before the statistic was recorded used the share)
    statistic = disc.get("statistic", "share")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>spurfast report</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>spurfast report</h1><p class='muted'>spurfast {e(doc['spurfast_version'])}, "
             f"schema {e(doc['schema'])}</p>"]
    pool = doc["pool"]
    parts.append("<h2>Pool</h2><table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in pool.items()) + "</table>")
    if summary:
        parts.append("<h2>Summary</h2><table>" + "".join(
            f"<tr><th>{e(k)}</th><td>{e('n/a' if v is None else v)}</td></tr>" for k, v in summary.items()) + "</table>")
    if clusters:
        _make_folder(out_dir / "images")  # a run copied without its images
        plot_scores(clusters, fdr, out_dir / "images" / "scores.png")
        parts.append(f"<h2>Cluster scores</h2><img src='{_data_uri(out_dir / 'images' / 'scores.png')}' "
                     f"alt='cluster scores' title='images/scores.png'>")
    families = {finding_family(f) for f in doc["findings"]}
    # the residual scan keeps its findings at its own level (an API run may set another)
    scan_fdr = ((doc["config"].get("inputs") or {}).get("residual_scan") or {}).get("fdr")
    n_scan = sum(finding_family(f) == RESIDUAL for f in doc["findings"])
    level = (f"{len(doc['findings']) - n_scan} at q &le; {e(fdr)}, {n_scan} of the residual scan at q &le; "
             f"{e(scan_fdr)}" if n_scan and scan_fdr is not None and float(scan_fdr) != fdr
             else f"{len(doc['findings'])} at q &le; {e(fdr)}")
    parts.append(f"<h2>Findings ({level})</h2>")
    parts.append(f"<p class='muted'>A score sums, over the unrelated members, "
                 f"{e(STATISTIC_WORDS.get(statistic, statistic))}; p against permuted predictions, "
                 f"q by Benjamini-Hochberg"
                 # the feature view's neighbours and family are its own (spurfast.feature_view)
                 + ("; for the feature view's findings the neighbours are in the classifier's feature space and "
                    "q runs over the view's clusters" if FEATURE_VIEW in families else "")
                 # and the residual scan's score, null and family (spurfast.residual)
                 + ("; the residual scan's findings have a test of their own, described with each"
                    if RESIDUAL in families else "") + ".</p>")
    if not doc["findings"]:
        parts.append("<p>No cluster is significant at this false-discovery rate.</p>")
    for f in doc["findings"]:
        name = f" ({e(f['class_name'])})" if f.get("class_name") else ""
        parts.append(f"<div class='finding'><h3>#{e(f['rank'])}: class {e(f['class'])}{name}</h3>")
        # n_unrelated: members whose content is another class (suspects with labels may be among them)
        if finding_family(f) == RESIDUAL:   # spurfast.residual: no cluster, a test of its own
            from .residual import SCORE_CAP

            peak = f.get("peak") or ["?", "?"]
            # the score is written capped where no other t is positive (an unbounded ratio)
            ratio = ("no other t is positive" if float(f["score"]) >= SCORE_CAP else
                     f"{float(f['score']):.3g}x the largest t elsewhere")
            parts.append(f"<p><b>Residual scan:</b> images called this class carry a localised reconstruction "
                         f"residual (a pattern the VAE latent does not hold) peaking at pixel (y {e(peak[0])}, "
                         f"x {e(peak[1])}), t = {float(f.get('peak_t', float('nan'))):.3g}, "
                         f"{ratio}; p = {float(f['p_value']):.3g} against "
                         f"predictions resampled among same-label latent neighbours, q = {float(f['q_value']):.3g} "
                         f"over classes. {e(f['size'])} members ({_membership(f)}): the class's images "
                         f"of most residual energy there.</p>")
        else:
            # the feature view's clusters are of the classifier's penultimate features (spurfast.feature_view)
            view = " in the classifier's feature space" if finding_family(f) == FEATURE_VIEW else ""
            parts.append(f"<p>{e(f['size'])} members{view} ({_membership(f)}), score "
                         f"{float(f['score']):.3g}, p = {float(f['p_value']):.3g}, q = {float(f['q_value']):.3g}; "
                         f"clusters merged: {e(f.get('merged_clusters', [f['cluster']]))}</p>")
        cf = f.get("confirm")
        if cf and cf.get("flip_rate") is not None:
            from .confirm import VERDICTS, confirm_verdict, reacts_to_texture
            verdict = confirm_verdict(cf)
            more = (f" and {float(cf['content_flip_rate']):.1%} for genuine class content in the same place "
                    f"(p = {beside_level(cf['content_p_value'])})" if cf.get("content_p_value") is not None else "")
            if cf.get("q_value") is not None:
                # adjusted within the finding's own search, as `confirm_findings` does
                more += f"; q = {beside_level(cf['q_value'])} over this run's {_SEARCH[finding_family(f)]} findings"
            head = "<b>confirmed shortcut</b>" if verdict == "confirmed" else "not confirmed"
            why = e(VERDICTS[verdict])
            if cf.get("content_skipped") and verdict in ("confirmed", "weak"):
                # "both controls" would claim a test that did not run
                why = e("the pattern moves the model more than random patterns"
                        + ("" if verdict == "confirmed" else ", but not once the number of the run's findings of "
                                                              "its search is accounted for")
                        + f"; genuine class content was not tested: {cf['content_skipped']}")
            elif cf.get("content_skipped") and verdict == "no_effect":   # "... or genuine class content" likewise
                why = e("the pattern does not move the model significantly more than random patterns; genuine class "
                        f"content was not tested: {cf['content_skipped']}")
            elif cf.get("content_skipped") and verdict == "not_specific":   # its rank says it beat class content
                why += e(f"; genuine class content was not tested: {cf['content_skipped']}")
            texture = reacts_to_texture(cf) if verdict == "not_specific" else None
            if texture is not None:
                why += (f"; smooth random fields of the same size there flip {float(cf['smooth_flip_rate']):.1%} "
                        f"(p = {beside_level(cf['smooth_p_value'])}): "
                        + ("the model reacts to the pattern's texture, not its exact values" if texture else
                           "it reacts to any change of this size there"))
            dose = cf.get("dose")
            weaker = (f"; at {float(dose):.0%} strength, pattern and random ones alike, "
                      f"{float(cf['dose_flip_rate']):.1%} vs {float(cf['dose_control_flip_rate']):.1%}"
                      if dose is not None and float(dose) < 1 else "")
            parts.append(f"<p><b>Confirmation:</b> pasting the pattern flips {float(cf['flip_rate']):.1%} of clean images "
                         f"towards this class vs {float(cf['control_flip_rate']):.1%} for random patterns{weaker} "
                         f"(p = {beside_level(cf['p_value'])}){more}: {head} ({why}).</p>")
        elif f.get("confirm_skipped"):   # null: the page said nothing where only the log said why
            parts.append(f"<p class='muted'>Confirmation not run: {e(f['confirm_skipped'])}.</p>")
        sp = f.get("support")
        if sp and sp.get("p_value") is not None:
            # "no more often" contradicted the counts beside it where the class carries it more
            # often, but not significantly (few suspects of the class: 2 of 24 vs 3 of 223)
            said = ("supported: the pattern is in this class's training data" if sp.get("supported") else
                    "not supported: this class's training data does not carry it significantly more often than "
                    "other classes' (as when a model reacts to a pattern it was never trained on)")
            # the tail as given (:.0% made a tail of 0.005 "the top 0%")
            # ties counted above: the threshold is a value many suspects share (an identical stamp)
            where = ("at or beyond the value that bounds" if sp.get("ties_counted_above") else "beyond")
            # ties counted below: "0 of 895 beyond the top 1%" read as impossible without it
            tied = ("; several tie at that bound, counted below it" if sp.get("ties_at_threshold")
                    and not sp.get("ties_counted_above") else "")
            parts.append(f"<p><b>Training support:</b> {e(sp['class_above'])} of {e(sp['n_class'])} suspect images "
                         f"of this class carry the pattern {where} the top {100 * float(sp.get('tail', 0.01)):g}% "
                         f"of the other classes' suspects "
                         f"({e(sp['other_above'])} of {e(sp['n_other'])}{tied}); p = {float(sp['p_value']):.3g}, "
                         f"q = {beside_level(sp['q_value'])}: {e(said)}.</p>")
        elif sp:
            parts.append(f"<p class='muted'>Training support not tested: {e(sp.get('skipped', ''))}.</p>")
        imgs = f.get("images") or {}
        caps = {"centroid": "decoded centroid", "contrast": "contrast (members vs. matched others)",
                "mask": "extracted mask", "grid": "exemplars"}
        if finding_family(f) == RESIDUAL:   # no latent centroid: the latent does not hold the pattern
            caps.update(centroid="members' mean image", contrast="residual contrast (members vs. other classes)")
        parts.append("<div class='imgs'>" + "".join(
            (f"<figure><img src='{_data_uri(out_dir / imgs[k])}' alt='{e(caps[k])}' title='{e(imgs[k])}'>"
             if _run_png(out_dir, imgs[k]) else
             f"<figure><p class='muted'>{e(imgs[k])} is missing (or not a PNG of this run)</p>")  # not a broken link
            + f"<figcaption>{e(caps[k])}</figcaption></figure>"
            for k in ("centroid", "contrast", "mask", "grid") if k in imgs) + "</div></div>")
    if bad_files:
        parts.append(f"<h2>Unreadable files ({len(bad_files)}, skipped)</h2><ul>"
                     + "".join(f"<li><code>{e(p)}</code>: {e(r)}</li>" for p, r in sorted(bad_files.items())) + "</ul>")
    parts.append("<h2>Configuration</h2><pre>" + e(json.dumps(doc["config"], indent=1)) + "</pre></body></html>")

    path = out_dir / "report.html"
    page = "\n".join(parts)
    # atomic, as the run's other outputs: an interrupted `spurfast report` truncated the page it replaced
    replace_atomically(path, lambda fh: fh.write(page), encoding="utf-8")
    return path
