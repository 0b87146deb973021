"""`spurfast demo`: plant a shortcut, train a classifier on it, train a VAE on the pool,
discover, and check the result against the ground truth."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from .checks import check_compute_device, check_default_dtype, check_whole
from .data.builtin import fashion_mnist_files
from .data.sources import content_digest
from .discover import DiscoverConfig
from .store import _write_json, shown_path
from .metrics import auroc
from .models.files import save_classifier, save_vae
from .models.train import train_classifier, train_vae
from .pipeline import SUMMARY, check_discovery_ops, make_planted_data, report_summary, run_discovery
from .plant import PatternSpec, apply_pattern
from .report import write_report
from .run_folder import hold_output, holds_output, prepare_output, read_bad_files, release_output, run_marker

log = logging.getLogger("spurfast")


def flip_rates_text(cf: dict) -> str:
    """A confirmation's flip rate (control), and where its p-value came from a weaker dose,
    the rates there: "1.000 (1.000)" alone beside "confirmed" read as no effect."""
    text = f"{cf['flip_rate']:.3f} ({cf['control_flip_rate']:.3f})"
    if cf.get("dose", 1.0) != 1.0:
        text += (f"; at {cf['dose']:.0%} strength, where its p-value comes from: "
                 f"{cf['dose_flip_rate']:.3f} ({cf['dose_control_flip_rate']:.3f})")
    return text


def same_device(a, b) -> bool:
    """Whether two device names are one device: "cuda" is the current CUDA device ("cuda" and
    "cuda:0" were refused as disagreeing), and "cpu" and "cpu:0" are the CPU."""
    da, db = torch.device(a), torch.device(b)
    if da.type != db.type:
        return False
    if da.type != "cuda":
        return da.type == "cpu" or da.index == db.index
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (current if da.index is None else da.index) == (current if db.index is None else db.index)


@torch.no_grad()
def spurious_score(model, clean, target_class: int, spec: PatternSpec, device="cpu", limit: int = 2000,
                   class_balanced: bool = False) -> float:
    """Yang, Chou & Chaudhuri's (2022) spurious score: the fraction of held-out images (of
    every class) whose probability of ``target_class`` rises by more than 0.1 once the
    pattern is stamped on them (their reference code: p_stamped - p_clean > 0.1, over the
    whole test set).  ``limit``: at most this many images, the first in the source's order.
    ``class_balanced``: the mean of the per-class fractions, i.e. the score over a test set
    with every class equally often, whatever this set's mix (the demo's held-out set keeps
    every test image of the target class: about 31% of it (1,000 of 3,250), not a tenth)."""
    x, y = clean.get_batch(np.arange(min(len(clean), limit)))
    if not len(x):
        return float("nan")
    xs, _ = apply_pattern(x, spec, seed=spec.seed + 99)
    p0 = torch.softmax(model(x.to(device)).float(), 1)[:, target_class]
    p1 = torch.softmax(model(xs.to(device)).float(), 1)[:, target_class]
    rises = ((p1 - p0) > 0.1).float().cpu()
    if not class_balanced:
        return float(rises.mean())
    y = torch.as_tensor(np.asarray(y))
    return float(torch.stack([rises[y == c].mean() for c in torch.unique(y)]).mean())


@torch.no_grad()
def flip_to_target_rate(model, clean, target_class: int, spec: PatternSpec, device="cpu", limit: int = 2000) -> float:
    """Of held-out images of other classes that the model classifies correctly, the fraction
    it *calls* ``target_class`` once the pattern is stamped on them (a stricter reading than
    the spurious score: the argmax must move; reported as "spurious score" before the
    eleventh session)."""
    y = clean.labels()
    idx = np.nonzero(y != target_class)[0][:limit]
    x, yy = clean.get_batch(idx)
    right = model(x.to(device)).argmax(1).cpu() == yy
    if not bool(right.any()):
        return float("nan")
    xs, _ = apply_pattern(x[right], spec, seed=spec.seed + 99)
    return float((model(xs.to(device)).argmax(1).cpu() == target_class).float().mean())


def mask_iou(pred: np.ndarray, truth: np.ndarray | None) -> float:
    if truth is None or pred is None:
        return float("nan")
    inter = np.logical_and(pred, truth).sum()
    union = np.logical_or(pred, truth).sum()
    return float(inter / union) if union else float("nan")


DEMO_MARKER = "demo.json"   # the demo run's models id (`run_demo`)


def _holds_models(out: Path, models_id: str) -> bool:
    """Does ``out`` hold a spurfast demo run (run.json and its demo.json) whose pool and
    models were made with these training settings?"""
    try:
        run, marker = (json.loads((out / n).read_text()) for n in ("run.json", DEMO_MARKER))
    except (OSError, ValueError):
        return False
    return isinstance(run, dict) and "run_id" in run and isinstance(marker, dict) and marker.get("models") == models_id


def run_demo(out_dir="out/demo", *, dataset: str = "auto", seed: int = 0, target_class: int = 3,
             family: str = "patch3", strength: float = 1.0, position: str = "bottom_right", n_poisoned="600",
             pool_fraction: float = 0.1, classifier_epochs: int = 3,
             vae_epochs: int = 8, latent_dim: int = 16, overwrite: bool = False, progress: bool = True,
             config: DiscoverConfig | None = None, device: str | None = None, confirm: bool = True) -> dict:
    """Plant, train, discover and report into ``out_dir``; returns the summary.  ``device``:
    where the models train and discovery runs (``config.device``): given both, they must
    agree (the classifier trained on one while discovery sent it tensors on the other); given
    neither, the CPU.  ``overwrite``: replace another demo run in ``out_dir``; one that differs
    only in its discovery settings (or ``confirm``) keeps its trained models and embedding store (as
    `spurfast discover --overwrite` keeps a store of the same pool and models)."""
    # checked before any work, as the CLI does: 0 epochs ran a whole demo on an untrained
    # model without a word, and 2.5 failed at training, with overwrite after the old run was deleted
    for name, value in (("classifier_epochs", classifier_epochs), ("vae_epochs", vae_epochs)):
        check_whole(value, f"run_demo: {name}")
    from .evaluate import check_seeds   # the CLI's rule: 2**62 failed in training, after overwrite emptied the run
    check_seeds([seed])
    check_default_dtype("run_demo")   # here: training's own check came after overwrite emptied the run
    # None reached training (torch.device(None) raised); run_discovery reads it as the CPU
    if config is None:
        config = DiscoverConfig(seed=seed, device=device or "cpu")
    elif config.device is None:
        import dataclasses
        config = dataclasses.replace(config, device=device or "cpu")
    if device is None:
        device = config.device
    elif not same_device(device, config.device):
        raise ValueError(f"run_demo: device {device!r} and config.device {config.device!r} disagree; pass one "
                         f"device for training and discovery (or only one of them)")
    check_compute_device(device, f"run_demo: device {device!r}")   # before training, and before --overwrite deletes the old run
    spec = PatternSpec(family, strength=strength, position=position, seed=seed)  # in the run id via spec.to_dict()
    data = make_planted_data(dataset, target_class=target_class, n_poisoned=n_poisoned, spec=spec,
                             pool_fraction=pool_fraction, seed=seed)
    # what run_discovery and the VAE refuse, checked before any work: they refused only after
    # the classifier trained (with overwrite, after the old run was deleted)
    from . import backends
    from .models.vae import VAEConfig
    vae_config = VAEConfig.for_images(*data.pool.image_shape[:2], latent_dim=latent_dim)
    backends.resolve("encoder", None, torch.device(device).type)
    check_discovery_ops(config.backend, torch.device(device).type)   # as run_discovery does
    # the images themselves: the same command over another copy of the dataset
    # ($SPURFAST_FASHION_MNIST) read as this run, retrained its models over the old ones and
    # then failed at the store, leaving the old findings beside the new models
    images = hashlib.sha256("".join(content_digest(s) for s in (data.train, data.pool, data.test_clean)
                                    if s is not None).encode()).hexdigest()[:16]
    settings = dict(dataset=data.dataset, images=images, seed=seed, target_class=target_class, pattern=spec.to_dict(),
                    n_poisoned=str(n_poisoned), pool_fraction=pool_fraction, classifier_epochs=classifier_epochs,
                    vae_epochs=vae_epochs, latent_dim=latent_dim, discover=config.__dict__)
    if not confirm:   # another run (a confirmed one was resumed and its findings rewritten unconfirmed); only
        settings["confirm"] = False   # when off, so the CLI demo's (always confirmed) run ids stay
    run_id = "demo-" + hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    # what the pool and the models depend on: --overwrite of a run that differs only in its
    # discovery settings retrained both models and embedded the pool again (minutes to hours)
    trained = {**{k: v for k, v in settings.items() if k not in ("discover", "confirm")}, "device": device}
    models_id = hashlib.sha256(json.dumps(trained, sort_keys=True, default=str).encode()).hexdigest()[:12]
    held = holds_output(out_dir)   # a caller's own hold stays theirs
    # released however the demo ends: the folder stayed locked for as long as the process
    # lived (a notebook's second demo into it, or another process's, was refused)
    try:
        if overwrite and _holds_models(Path(out_dir), models_id):
            # taken over as this run: its checkpoints resume (finished: the same models), its store
            # is of this pool and these models, its discovery work is keyed on its own inputs.  Held
            # first: a folder in use was refused after its run.json had been rewritten
            hold_output(Path(out_dir))
            _write_json(Path(out_dir) / "run.json", run_marker(run_id), indent=None)
        # the dataset's files where they lie inside out_dir: --overwrite deleted them (read already)
        protect = fashion_mnist_files() if data.dataset == "fashion-mnist" else []
        out = prepare_output(out_dir, run_id, overwrite, protect=protect)
        _write_json(out / DEMO_MARKER, {"models": models_id}, indent=None)
        print(f"[demo] dataset {data.dataset}: {len(data.train)} training images "
              f"({len(data.truth.train_indices)} of class {target_class} stamped with {spec.label}); "
              f"pool {len(data.pool)} images "
              f"({int(data.suspect.sum())} suspect, {int(data.carries.sum())} carry the pattern)", flush=True)
        clf = train_classifier(data.train, 10, epochs=classifier_epochs, seed=seed, device=device,
                               checkpoint=out / "classifier.ckpt", progress=progress)
        save_classifier(clf, out / "classifier.pt")
        vae = train_vae(data.pool, vae_config,
                        epochs=vae_epochs, seed=seed, device=device, checkpoint=out / "vae.ckpt", progress=progress)
        save_vae(vae, out / "vae.pt")
        ss = spurious_score(clf, data.test_clean, target_class, spec, device, class_balanced=True)
        print(f"[demo] spurious score of the trained classifier: {ss:.3f}", flush=True)
        plant_cfg = dict(data.truth.to_dict(), pool_fraction=float(pool_fraction))
        doc, result, store = run_discovery(data.pool, clf, vae, out, num_classes=10, suspect=data.suspect, config=config,
                                           extra_config={"plant": plant_cfg, "dataset": data.dataset},
                                           progress=progress, run_id=run_id, clean=data.test_clean, confirm=confirm)
        np.save(out / "ground_truth_carries.npy", data.carries)
        planted = len(data.truth.train_indices) > 0
        summary = {"dataset": data.dataset,
                   "planted": f"{spec.label} in class {target_class}" if planted else "nothing (n_poisoned 0)",
                   "spurious score": round(ss, 3), "findings": len(doc["findings"])}
        if doc["findings"]:
            top = doc["findings"][0]
            member = np.zeros(len(data.pool), bool)
            member[top["members"]] = True
            au_m = auroc(member.astype(float), data.carries)
            au_r = auroc(result.rankings[1], data.carries)
            iou = mask_iou(result.findings[0].get("_mask"), data.truth.mask)
            summary.update({"top finding class": top["class"],
                            "top finding is planted class": top["class"] == target_class if planted else None,
                            "AUROC (membership)": round(au_m, 3), "AUROC (ranking)": round(au_r, 3),
                            # the latent probe's, or for a localised pattern its pixel match (`pattern_rank`)
                            "ranked by": top.get("ranked_by"),
                            "pattern IoU": round(iou, 3) if planted else None})
            if top.get("confirm"):
                summary["top finding flip rate (control)"] = flip_rates_text(top["confirm"])
                summary["top finding confirmation"] = top["confirm"].get("verdict")
        # NaN (e.g. an AUROC with no pattern-bearing pool image) is not JSON: null instead, which
        # the report shows as n/a, as `spurfast report` does when it redraws the run
        finite = report_summary(summary)
        # the summary first (atomic; `spurfast report` reads it): a demo stopped between the two
        # left a page showing a summary that the run folder did not hold
        _write_json(out / SUMMARY, finite, allow_nan=False)
        write_report(doc, out, clusters=result.clusters, bad_files=read_bad_files(out), summary=finite)
        # as the report shows them: NaN (no pattern-bearing image to rank) printed "nan" there
        print("[demo] " + "; ".join(f"{k}: {'n/a' if v is None else v}" for k, v in finite.items()), flush=True)
        # a folder name that is not UTF-8 spelled \xNN: a strict stdout raised after the whole run
        print(f"[demo] report: {shown_path(out / 'report.html')}", flush=True)
        return summary
    finally:
        if not held:
            release_output(Path(out_dir))
