"""End-to-end runs: planted demo data, and discovery over a pool with given models.

`run_discovery` is what `spurfast discover` does; `run_demo` adds data preparation,
planting and training.  An output directory remembers its run (run.json): rerunning the
same run resumes (the embedding store and training checkpoints pick up where they
stopped); a different run there is refused unless ``overwrite``, which in `run_discovery`
keeps its embedding store when that was made from the same pool and models (a run that
differs only in its discovery settings, clean set or suspect mask embeds nothing again).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist
from . import pixel_cache
from .atomic_files import remove_killed_writers_files
from .checks import (CLASSIFIER_HINT, SOURCE_HINT, VAE_HINT, check_arguments, check_compute_device, check_default_dtype,
                     check_extra_config, check_whole, suspect_mask)
from .cores import usable_cores
from .data.builtin import load_digits, load_fashion_mnist
from .data.reread import read_as_stored
from .data.sources import ArraySource, ImageSource, content_digest
from .discover import DiscoverConfig, characterise, discover, identity_settings, redraw_stamp_masks, write_outputs
from .embed import check_outputs, check_vae_input
from .identity import fingerprint
from .models.as_given import restores_models
from .models.outputs import shape_text
from .pattern_rank import pattern_rankings
from .plant import PatternSpec, PlantTruth, checked_pool_fraction, plant_pool, plant_training
from .report import write_report
from .run_folder import (BAD_FILES, CONFIRM_WORK, WORK_DIR, _folder_inside, holds_output, prepare_output, release_output,
                         source_paths)
from .store import _write_json, legacy_identities, made_from, shown_path

log = logging.getLogger("spurfast")


def run_inputs(clean: ImageSource | None, suspect, confirm: bool) -> dict:
    """What a run reads besides the pool, the models and the discovery settings, as
    recorded in findings.json's config and hashed into the run id."""
    sus = None if suspect is None else np.asarray(suspect, dtype=bool)
    return {"confirm": bool(confirm),
            "clean": None if clean is None or not confirm else {"name": clean.name, "n": len(clean),
                                                                  "content": content_digest(clean)},
            "suspect": None if sus is None else {"n": int(sus.sum()),
                                                 "digest": hashlib.sha256(np.packbits(sus).tobytes()
                                                                          + str(len(sus)).encode()).hexdigest()[:16]}}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class PlantedData:
    train: ArraySource
    pool: ArraySource
    suspect: np.ndarray          # (pool n,) provenance: True = suspect sample
    carries: np.ndarray          # (pool n,) ground truth: carries the planted pattern
    truth: PlantTruth
    dataset: str
    class_names: list[str] | None
    test_clean: ArraySource | None = None  # held-out clean images (for confirmation)


def make_planted_data(dataset: str = "auto", *, target_class: int = 3, n_poisoned="600", spec: PatternSpec | None = None,
                      pool_fraction: float = 0.1, n_train_per_class: int = 1200, n_suspect: int = 1000,
                      seed: int = 0, fashion_root=None, levels: int | None = None) -> PlantedData:
    """Poison ``n_poisoned`` training images of ``target_class``; the pool is held-out images
    of the *other* classes (a ``pool_fraction`` of them stamped) plus ``n_suspect`` training
    images (the suspect data, with whatever was planted in them).  ``levels``: every image
    rounded to that many steps (255 for the uint8 files `spurfast plant` writes), stamped ones
    too, before the ground truth is taken: a stamp off that grid (a pixel of 0.5, noise of
    0.001) rounded back to the image's own bytes, and such images were listed as carriers."""
    if not (str(n_poisoned) == "all" or re.fullmatch(r"[0-9]+", str(n_poisoned))):
        raise ValueError(f"n_poisoned: expected an integer >= 0 or 'all', got {n_poisoned!r}")
    for name, value in (("n_suspect", n_suspect), ("n_train_per_class", n_train_per_class), ("seed", seed)):
        # numpy said "negative dimensions are not allowed" (or "expected non-negative integer"), naming nothing
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
    checked_pool_fraction(pool_fraction)   # before any work (and warnings) on the training set
    spec = spec or PatternSpec("patch3", seed=seed)
    splits = None
    if dataset == "auto":
        # both splits, not the training images alone: a folder without the test files was
        # taken for the dataset and the demo failed on them instead of using digits
        try:
            splits = load_fashion_mnist("train", fashion_root), load_fashion_mnist("test", fashion_root)
        except FileNotFoundError as exc:   # said where it looked: a mistyped $SPURFAST_FASHION_MNIST
            # silently turned the demo into the digits one
            log.warning("using scikit-learn's digits instead of Fashion-MNIST: %s", exc)
        dataset = "fashion-mnist" if splits else "digits"
    rng = np.random.default_rng(seed)
    if dataset == "fashion-mnist":
        tr, te = splits or (load_fashion_mnist("train", fashion_root), load_fashion_mnist("test", fashion_root))
        ytr = tr.labels()
        keep = np.concatenate([rng.choice(np.nonzero(ytr == c)[0], min(n_train_per_class, int((ytr == c).sum())), replace=False)
                               for c in range(10)])
        xtr, ytr = tr.images[np.sort(keep)], ytr[np.sort(keep)]
        xte, yte = te.images, te.labels()
        names = tr.class_names
    elif dataset == "digits":
        d = load_digits(28)
        y = d.labels()
        perm = rng.permutation(len(y))
        cut = int(0.55 * len(y))
        xtr, ytr = d.images[np.sort(perm[:cut])], y[np.sort(perm[:cut])]
        xte, yte = d.images[np.sort(perm[cut:])], y[np.sort(perm[cut:])]
        names = d.class_names
        n_suspect = min(n_suspect, len(ytr) // 4)
    else:
        raise ValueError(f"unknown dataset {dataset!r}; expected 'fashion-mnist', 'digits' or 'auto'")
    classes = len(names) if names else int(max(ytr.max(), yte.max())) + 1
    if isinstance(target_class, (bool, np.bool_)) or not isinstance(target_class, (int, np.integer)) \
            or not 0 <= target_class < classes:   # 10 warned "class 10 has 0 training images" first
        raise ValueError(f"target class {target_class!r} is not a class of {dataset}: expected 0 to {classes - 1}")
    n_cls = int((ytr == target_class).sum())
    n_p = n_cls if str(n_poisoned) == "all" else min(int(n_poisoned), n_cls)
    if str(n_poisoned) != "all" and int(n_poisoned) > n_cls:   # cut without a word (plant.json said so)
        log.warning("n_poisoned=%s: class %d has %d training images; all of them are poisoned", n_poisoned,
                    target_class, n_cls)
    if levels is not None:
        from .plant import on_levels
        xtr, xte = on_levels(xtr, levels), on_levels(xte, levels)
    xtr_p, planted = plant_training(xtr, ytr, target_class, n_p, spec, seed=seed, levels=levels)
    # held-out split: 3/4 of the other-class test images form the pool, the rest stay clean for confirmation
    other = np.nonzero(yte != target_class)[0]
    perm = rng.permutation(other)
    pool_idx = np.sort(perm[: int(0.75 * len(perm))])
    clean_idx = np.setdiff1d(np.arange(len(yte)), pool_idx)
    x_unrel, carries_u = plant_pool(xte[pool_idx], pool_fraction, spec, seed=seed, levels=levels)
    if n_suspect > len(ytr):   # few training images per class: numpy's "larger sample than population" named nothing
        log.warning("n_suspect=%d: the training split holds %d images; all of them are suspects", n_suspect, len(ytr))
        n_suspect = len(ytr)
    sus = np.sort(rng.choice(len(ytr), n_suspect, replace=False))
    x_pool = torch.cat([x_unrel, xtr_p[sus]])
    y_pool = np.concatenate([yte[pool_idx], ytr[sus]])
    suspect = np.concatenate([np.zeros(len(pool_idx), bool), np.ones(len(sus), bool)])
    carries = np.concatenate([carries_u, np.isin(sus, planted)])
    ids = [f"{dataset}-test:{i}" for i in pool_idx] + [f"{dataset}-train:{i}" for i in sus]
    truth = PlantTruth(spec, target_class, planted, carries)
    from .plant import fixed_mask
    if spec.family not in ("background",):
        truth.mask = fixed_mask(spec, xtr.shape[1:]).numpy() if spec.position != "random" else None
    return PlantedData(
        train=ArraySource(xtr_p, ytr, class_names=names, name=f"{dataset}-train-planted"),
        pool=ArraySource(x_pool, y_pool, ids=ids, class_names=names, name=f"{dataset}-pool"),
        suspect=suspect, carries=carries, truth=truth, dataset=dataset, class_names=names,
        test_clean=ArraySource(xte[clean_idx], yte[clean_idx], class_names=names, name=f"{dataset}-clean"))


def check_run_inputs(pool, classifier, vae, config, clean) -> None:
    """Refuse, by argument, objects `run_discovery` cannot use: a path where a model is
    expected, an array where a pool is, a dict of settings where a config is (each failed as
    a bare AttributeError deep in the embedding pass); and a float64 default dtype."""
    check_default_dtype("run_discovery")
    check_arguments("run_discovery", ("pool", pool, ImageSource, "an ImageSource", SOURCE_HINT),
                    ("classifier", classifier, torch.nn.Module, "a torch.nn.Module", CLASSIFIER_HINT),
                    ("vae", vae, torch.nn.Module, "a torch.nn.Module", VAE_HINT),
                    ("config", config, (DiscoverConfig, type(None)), "a DiscoverConfig or None",
                     "spurfast.DiscoverConfig(k=..., ...)"),
                    ("clean", clean, (ImageSource, type(None)), "an ImageSource or None", SOURCE_HINT))


def _checked_inputs(pool, classifier, vae, out_dir, *, num_classes, suspect, config, extra_config, batch_size,
                    encoder_backend, loader_backend, summary, run_id, clean, confirm, residual, feature_view=False):
    """`run_discovery`'s checks of everything before any work (each rank's own), and what they
    settle: (config, summary, identity, run id, earlier run ids, extra_config)."""
    check_run_inputs(pool, classifier, vae, config, clean)
    # checked again (a field set after construction, config.fdr = 2.0, skipped __post_init__)
    config = replace(config) if config is not None else DiscoverConfig()
    # None (discover's "torch's default, the CPU") or a torch.device, as text: torch.device(None) and the
    # run id's json.dumps ("Object of type device is not JSON serializable") raised bare TypeErrors
    if config.device is None or isinstance(config.device, torch.device):
        config = replace(config, device=str(config.device or "cpu"))
    # checked here, not by the loader: --overwrite would have deleted the old run first
    check_whole(batch_size, "batch_size")
    # embed_pool's own check came after --overwrite had deleted the old run's findings (2.0 == 2 logits)
    check_whole(num_classes, "num_classes")
    # json.dumps of findings.json refused it after all the work, naming nothing ("Object of type
    # int64 is not JSON serializable"); NaN passed and made findings.json strict parsers refuse
    check_extra_config(extra_config)
    if summary is not None:
        summary = report_summary(summary)
    if suspect is not None:
        suspect_mask(suspect, len(pool), pool.name)
    # under torchrun each rank computes on its own GPU (distributed.init): no explicit cuda:N
    dist.check_rank_device(config.device)
    check_compute_device(config.device, f"run_discovery: device {config.device!r}")   # 'meta' got through to after --overwrite's deletion
    identity = (fingerprint(pool, classifier, vae), content_digest(pool))   # the store's too
    earlier_ids = []
    inputs = run_inputs(clean, suspect, confirm)
    if residual is not None:   # a scan changes the findings: another run (and no key at all without one)
        from .residual import ResidualConfig, check_size
        if not isinstance(residual, ResidualConfig):
            raise ValueError(f"residual must be a spurfast.residual.ResidualConfig or None, got {residual!r}")
        # it holds every residual: refused now, not after the embedding pass
        check_size(len(pool), int(np.prod(pool.image_shape)), residual.max_values)
        inputs["residual_scan"] = asdict(residual)
    if not isinstance(feature_view, (bool, np.bool_)):   # "no" or 0.5 would have switched it on
        raise ValueError(f"feature_view must be True or False, got {feature_view!r}")
    if feature_view:   # its findings join the clusters': another run (named only when on: old ids hold)
        if not confirm:
            raise ValueError("feature_view needs confirmation (confirm=True; no --no-confirm): the feature view's "
                             "findings ship only once confirmed, since natural confusions cluster in feature space "
                             "too (a clean model's false findings rise from 69 to 153 unconfirmed: "
                             "docs/results/full-features)")
        inputs["feature_view"] = True
    if run_id is None:
        fp, settings = identity[0], json.dumps(identity_settings(config), sort_keys=True)
        # the clean set, the suspect mask and confirmation change the findings too: a rerun
        # with others is another run, not one to resume and silently rewrite
        run_id = _digest(fp + identity[1] + settings + json.dumps(inputs, sort_keys=True))
        # this run's ids under earlier versions: without those inputs; with a sampled content
        # digest or none; folder pools' item ids spelled as paths
        earlier = legacy_identities(pool, classifier, vae, content=identity[1])
        inputs_text = json.dumps(inputs, sort_keys=True)
        earlier_ids = ([_digest(fp + identity[1] + settings)] + [_digest(f + c + settings + inputs_text)
                                                                  for f, c in earlier]
                       + [_digest(f + c + settings) for f, c in earlier] + [_digest(f + settings) for f, _ in earlier])
        # and with backend "auto" spelled out, as it was read before `identity_settings`
        earlier_ids.append(_digest(fp + identity[1] + json.dumps(asdict(config), sort_keys=True) + inputs_text))
    extra_config = {**(extra_config or {}), "inputs": inputs}
    check_vae_input(pool, vae)
    # the embedding pass's own checks, made before --overwrite deletes the old run
    if len(pool) == 0:
        raise ValueError(f"pool {pool.name} is empty")
    if len(pool) == 1:   # discovery refused it after the embedding pass, with --overwrite after deleting the old run
        raise ValueError(f"pool {pool.name} holds 1 image; discovery needs at least 2 (each image's latent neighbours "
                         f"are others)")
    check_outputs(pool, classifier, num_classes, config.device)
    # the CLI refuses such a list (an .npz's, a folder's); from the API, findings of the classes
    # past a short list went unnamed, and a list of other classes named them wrongly
    if pool.class_names and len(pool.class_names) != num_classes:
        raise ValueError(f"pool {pool.name} names {len(pool.class_names)} classes (its class_names), but the "
                         f"classifier has {num_classes}; give one name per class of the classifier, in label "
                         f"order, or none")
    # a label past the classifier's classes (another dataset's label space): a clean set's left
    # the content control without class images (natural content then read as confirmed), a
    # pool's counted as unrelated to every class; train-classifier refuses both
    for src, what in ((pool, "pool"), (clean if confirm else None, "clean set")):
        lab = src.labels() if src is not None and len(src) else np.zeros(0, np.int64)
        top, low = int(lab.max(initial=-1)), int(lab.min(initial=-1))
        if top >= num_classes:
            raise ValueError(f"{what} {src.name} has label {top}, but the classifier has {num_classes} classes "
                             f"(labels 0..{num_classes - 1}; -1 = unlabelled)")
        # -2 read as unlabelled everywhere but the null, which shuffles predictions within
        # each label value: -1 and -2 became two groups, and the p-values changed with them
        if low < -1:
            raise ValueError(f"{what} {src.name} has label {low}; labels are 0..{num_classes - 1}, or -1 for "
                             f"an unlabelled image")
    from . import backends   # a misspelt or unavailable backend failed at the first batch
    backends.resolve("encoder", encoder_backend, torch.device(config.device).type)
    # and the k-means one (config.backend, else $SPURFAST_BACKEND_KMEANS_ASSIGN): one that cannot run
    # here failed at the first clustering, after the embedding pass (the CLI checks it itself)
    check_discovery_ops(config.backend, torch.device(config.device).type)
    # only folder pools go through a loader, and an unlabelled clean folder (confirmation predicts it through one)
    if getattr(pool, "paths", None) is not None or (clean is not None and confirm and len(clean) > 0
                                                    and getattr(clean, "paths", None) is not None
                                                    and (clean.labels() < 0).any()):
        backends.resolve("loader", loader_backend)
    if clean is not None and confirm:   # confirmation comes last: refuse a bad clean set before any work
        if len(clean) == 0:
            raise ValueError(f"clean set {clean.name} is empty; pass clean images of other classes, "
                             f"or none (confirmation then uses pool images)")
        if tuple(clean.image_shape) != tuple(pool.image_shape):
            raise ValueError(f"clean set {clean.name} has images of shape {shape_text(clean.image_shape)} "
                             f"(CxHxW), the pool ({pool.name}) has {shape_text(pool.image_shape)}")
    for src in (pool, clean):
        root = _folder_inside(out_dir, src)
        if root is not None:   # its report images would be pool images the next time round
            raise ValueError(f"output directory {out_dir} lies inside image folder {root} that this run reads; "
                             f"choose an output directory outside it")
    return config, summary, identity, run_id, earlier_ids, extra_config


@restores_models("classifier", "vae")
def run_discovery(pool: ImageSource, classifier, vae, out_dir, *, num_classes: int, suspect=None,
                  config: DiscoverConfig | None = None, extra_config: dict | None = None,
                  overwrite: bool = False, batch_size: int = 256, encoder_backend=None, loader_backend=None,
                  progress: bool = True, summary: dict | None = None, run_id: str | None = None,
                  clean: ImageSource | None = None, confirm: bool = True, protect=(), residual=None,
                  feature_view: bool = False, timings: dict | None = None, on_step=None):
    """Embed the pool, discover, characterise, confirm, write findings.json/csv and report.html.

    Confirmation (`spurfast.confirm`) pastes each finding's pattern onto ``clean`` images of
    other classes, or, without ``clean``, onto pool images predicted as another class that
    belong to no finding and are not ``suspect``.  ``confirm=False`` leaves every finding's
    ``confirm`` null.
    ``overwrite``: replace another run in ``out_dir``, keeping its embedding store when
    that was made from this pool and these models (see :func:`prepare_output`).
    ``protect``: more paths this run reads (model files, ...) that ``overwrite`` must not
    delete; the pool's and the clean set's own files are always protected.
    ``residual``: a `spurfast.residual.ResidualConfig` adds the residual scan's findings
    (patterns the VAE latent does not hold, such as one pixel) after the clusters'.
    ``feature_view``: discovery again in the classifier's penultimate features
    (`spurfast.feature_view`), its findings merged with the clusters' by q-value.
    ``summary``: {label: value} shown as a table at the top of the report and kept in
    ``summary.json``, from which `spurfast report` shows it again (NaN and inf as n/a).
    ``extra_config``: more keys for findings.json's ``config`` (JSON values).
    ``timings``: the embedding pass's split (`embed_pool`'s); ``on_step(name)``: called as each
    step ends ("embedded", "discovered", "characterised", "ranked", "confirmed", "reported"; on
    a rank other than the main one "embedded" alone), so a benchmark times the run users get.
    The classifier and the VAE come back in the mode and on the device they came in."""
    # every rank checks before the first collective and hears there of another rank's refusal: a
    # file missing on one node failed that rank alone, and the others printed a gloo traceback
    config, summary, identity, run_id, earlier_ids, extra_config = dist.all_succeed(
        _checked_inputs, pool, classifier, vae, out_dir, num_classes=num_classes, suspect=suspect, config=config,
        extra_config=extra_config, batch_size=batch_size, encoder_backend=encoder_backend,
        loader_backend=loader_backend, summary=summary, run_id=run_id, clean=clean, confirm=confirm,
        residual=residual, feature_view=feature_view)
    # under torchrun (spurfast.distributed): rank 0 owns the output directory, every rank
    # embeds its shard, rank 0 scores and reports with k-means across all ranks
    protect = [*protect, *source_paths(pool), *(source_paths(clean) if clean is not None else [])]
    # --overwrite of a run that differs only in its discovery settings keeps the store: it
    # embedded this same pool with these same models (hours for a large pool)
    def keep_store(store_dir):
        return made_from(store_dir, *identity, lambda: legacy_identities(pool, classifier, vae, content=identity[1]))
    held = dist.is_main() and holds_output(out_dir)   # a caller's own hold (the demo's) stays
    out = dist.run_on_main(prepare_output, out_dir, run_id, overwrite, protect, earlier_ids, keep_store)
    try:
        store = dist.embed_pool_sharded(pool, classifier, vae, out / "store", num_classes=num_classes,
                                        batch_size=batch_size, device=config.device, encoder_backend=encoder_backend,
                                        loader_backend=loader_backend, progress=progress, identity=identity,
                                        timings=timings)
        step = on_step if on_step is not None else (lambda name: None)
        step("embedded")
        if not dist.is_main():
            dist.serve_main_section()
            return None, None, store
        with dist.main_section():
            _enough_readable(store, pool)
            # work: an interrupted discovery resumes its neighbour search and null on the rerun
            result = discover(store, config, suspect=suspect, class_names=pool.class_names, progress=progress,
                              work_dir=out / WORK_DIR)
            features = None
            if feature_view:
                from .feature_view import discover_features, feature_space, join_views
                features = feature_space(store)
                join_views(result, discover_features(store, config, suspect=suspect, class_names=pool.class_names,
                                                     progress=progress, work_dir=out / WORK_DIR, space=features))
            step("discovered")
            # how the store's pixels were made: the two loaders decode a JPEG up to 1/255 apart, enough
            # to move a finding of a large pool, and the run id does not hold the loader
            made = {k: store.manifest[k] for k in ("loader", "decode") if store.manifest.get(k) is not None}
            if made:
                result.config["embedding"] = made
            _remove_finding_files(out)
            # the images a step re-reads go through the store's loader (_reread_loader), on every core (the other ranks
            # wait), decoded where the run computes (DALI took a GPU whenever torch saw one, --device
            # cpu included); a localised pattern ranks the pool by its pixel match, a diffuse one by its
            # latent and pixel probes together
            reread = dict(batch_size=batch_size, num_workers=usable_cores(),
                          **_reread_loader(pool, store, loader_backend, config.device))
            # and those read a batch at a time (pictures, masks, confirmation's clean images) too;
            # where the store kept the pixels (spurfast.pixel_cache), every step reads those rows instead
            as_stored = read_as_stored(pool, reread["loader_backend"], reread["device"], batch_size, store=store)
            passes = pixel_cache.pool_passes(pool, as_stored)
            characterise(result, store, as_stored, vae, out, seed=config.seed, device=config.device,
                         feature_space=features)
            step("characterised")
            pattern_rankings(result.findings, result.rankings, passes, pred=np.asarray(store["pred"]),
                             seed=config.seed, progress=progress, **reread)
            redraw_stamp_masks(result.findings, out)
            step("ranked")
            if residual is not None:
                from .residual import add_residual_findings
                add_residual_findings(result, store, passes, vae, out, residual, suspect=suspect,
                                      n_exemplars=config.n_exemplars, device=config.device, progress=progress,
                                      num_workers=reread["num_workers"], loader_backend=reread["loader_backend"],
                                      decode_on=reread["device"], reads=as_stored)
            if confirm and result.findings:
                from .confirm import ConfirmConfig, confirm_findings
                confirm_findings(result.findings, classifier, clean=clean, pool=as_stored,
                                 pool_pred=np.asarray(store["pred"]), pool_probs=store["probs"], suspect=suspect,
                                 config=ConfirmConfig(seed=config.seed, device=config.device),
                                 # an unlabelled clean folder is predicted through the run's own loader
                                 num_workers=usable_cores(), loader_backend=loader_backend,
                                 work_dir=out / WORK_DIR / CONFIRM_WORK, progress=progress,
                                 # what the confirmed source holds, as the run's start digested it
                                 content=identity[1] if clean is None else extra_config["inputs"]["clean"]["content"])
                # the feature view's findings ship only once confirmed (its docstring's figures); a run
                # without the view has none of them, so nothing drops there
                from .feature_view import unconfirmed
                rank_confirmed_first(result, out, drop=unconfirmed)
            if suspect is not None and result.findings:   # is the pattern in its class's suspect data?
                from .support import training_support
                training_support(result.findings, passes, suspect, pool.labels(), progress=progress, **reread)
            step("confirmed")
            bad_files = {int(i): r for i, r in store.bad_files().items()}  # all ranks, all runs
            bad_files.update(getattr(pool, "bad_files", {}))
            bad = _named(pool, bad_files)
            if clean is not None:   # confirmation skipped these: listed, not only logged
                bad.update(_named(clean, getattr(clean, "bad_files", {}), "clean set: "))
            # before findings.json (which a rerun deleted first): a run stopped between them left
            # the new findings beside the earlier pass's summary, and `spurfast report` showed both
            _write_json(out / BAD_FILES, bad)  # atomic; `spurfast report` has no pool to name them
            # as bad_files: `spurfast report` redrew the page without the summary the run showed
            if summary is not None:
                _write_json(out / SUMMARY, summary, allow_nan=False)   # report_summary made it JSON
            else:   # a rerun of the same run without one: the old one would come back in `spurfast report`
                (out / SUMMARY).unlink(missing_ok=True)
            doc = write_outputs(result, out, extra_config)
            write_report(doc, out, clusters=result.clusters, bad_files=bad, summary=summary)
            step("reported")
        return doc, result, store
    finally:   # this call's hold: an API caller's process runs on (a test run held hundreds of folders)
        if dist.is_main() and not held:
            release_output(out)


SUMMARY = "summary.json"   # a run's summary table, which `spurfast report` shows again


def report_summary(summary: dict) -> dict:
    """``summary`` ({label: value}) as the report and summary.json hold it: a NaN or inf
    value as None (shown as n/a; they are not JSON), another value JSON cannot hold as its
    text (a report table shows text); refused by label where NaN sits deeper (in a list)."""
    if not isinstance(summary, dict):
        raise ValueError(f"summary must be a dict of label -> value, got {type(summary).__name__}")
    out = {}
    for key, value in summary.items():
        value = None if isinstance(value, float) and not np.isfinite(value) else value
        try:
            value = json.loads(json.dumps(value, default=str, allow_nan=False))
        except ValueError as exc:
            raise ValueError(f"summary[{key!r}]: {exc}; it is written to summary.json for `spurfast report`, "
                             f"which holds no NaN or inf") from None
        out[str(key)] = value
    return out


def check_discovery_ops(backend, device_type: str) -> None:
    """Resolve now the k-means backend the run names and the providers that SPURFAST_BACKEND*
    variables name for discovery's ops, as `scoring.latent_neighbours` and `cluster.lloyd`
    will (``backend``: the config's k-means backend, which decides some of them): a misspelt
    or unavailable one failed after the embedding pass (the CLI checks them itself), and a
    variable that names no op was ignored (`backends.check_op_variables`)."""
    from . import backends

    backends.check_op_variables()
    if backends.requested("kmeans_assign", backend) != "auto":   # auto always has the torch one
        backends.resolve("kmeans_assign", backend, device_type)
    upd = backend if backend == "auto" or backend in {p.name for p in backends.providers("kmeans_update")} else None
    ops = {"latent_knn": None, "kmeans_update": upd, "cluster_similarity": None}   # the last: exemplars
    if not backend:   # lloyd reads these two variables only when the run names no k-means backend
        ops.update(kmeans_plusplus=None, kmeans_assign_update=None)
    for op, given in ops.items():
        want = backends.requested(op, given)
        if want == "auto" or (op == "kmeans_assign_update"   # the assignment's own fused step: no resolve
                              and want == backends.resolve("kmeans_assign", None, device_type)[0]):
            continue
        backends.resolve(op, given, device_type)


def _reread_loader(pool, store, loader_backend, device) -> dict:
    """The loader (and device) through which the steps that re-read images read them: the
    one that decoded the store's rows where it recorded one (a store kept by --overwrite,
    or a finished run rerun, may have been made with the other --loader-backend: its
    findings' pattern rankings then changed with the flag of the rerun), else the run's."""
    from . import backends

    chosen = dict(loader_backend=loader_backend, device=device)
    began, decode = store.manifest.get("loader"), store.manifest.get("decode")
    if getattr(pool, "paths", None) is None or began is None:
        return chosen
    if backends.resolve("loader", loader_backend)[0] != began:
        try:
            backends.resolve("loader", began)
        except backends.BackendUnavailable as exc:
            log.warning("the embedding store was decoded by the %r loader, which is unavailable here (%s): the "
                        "images re-read for pattern ranking and training support go through %r", began, exc,
                        loader_backend or "auto")
            return chosen
        asked = backends.requested("loader", loader_backend)
        if asked != "auto":   # named (flag or variable), and not what this run's findings come from
            how = (f"--loader-backend {loader_backend}" if loader_backend else
                   f"SPURFAST_BACKEND_LOADER={asked}" if backends.requested_for_op("loader")
                   else f"SPURFAST_BACKEND={asked}")
            log.warning("%s: the embedding store kept from an earlier pass of this run was decoded by the %r loader, "
                        "and its findings and re-read images stay that loader's (the two decode JPEGs up to 1/255 "
                        "apart); to decode with %s, run into another --out", how, began, asked)
        else:
            log.info("re-reading images through the %r loader, which decoded the embedding store", began)
        chosen["loader_backend"] = began
    if began == "dali" and decode == "cpu" and torch.device(device).type == "cuda":
        chosen["device"] = "cpu"   # where the store's rows were decoded
    elif began == "dali" and decode == "gpu" and torch.device(device).type != "cuda":
        log.warning("the embedding store was decoded on a GPU: the images re-read for pattern ranking and training "
                    "support are decoded on the CPU (--device %s); their pixels differ a little", device)
    return chosen


def _enough_readable(store, pool) -> None:
    """Discovery needs two readable images: a folder of bad files was refused by discovery
    naming the store ("store RUN/store: only 0 readable image(s)"), not the pool or its files."""
    n_ok = int(np.asarray(store["ok"]).sum())
    if n_ok >= 2:
        return
    bad = store.bad_files()   # one named: a pool of a million bad files named them all first
    example = ""
    if bad:
        first = min(bad, key=int)
        (name, reason), = _named(pool, {int(first): bad[first]}).items()
        example = f" (e.g. {name}: {reason})"
    raise ValueError(f"pool {pool.name}: only {n_ok} of its {store.n} images could be read{example}; discovery "
                     f"needs at least 2 (each image's latent neighbours are others)")


def _named(source, bad_files: dict, prefix: str = "") -> dict:
    """``bad_files`` ({index: reason}) keyed by the path the user can open (bytes of a name
    that is not UTF-8 as \\xNN: the report could not be written with them), else the item id."""
    paths = getattr(source, "paths", None)
    return {prefix + (shown_path(paths[i]) if paths is not None else source.item_id(i)): r
            for i, r in sorted(bad_files.items())}


DOCUMENTS = ("findings.json", "findings.csv", "clusters.csv")   # `discover.write_outputs`'
_FINDING_FILE = re.compile(r"(\.rerank\d+_)?finding\d+(_(centroid|contrast|mask|grid)\.png|\.npy)")


def _remove_finding_files(out: Path) -> None:
    """Remove the per-finding images and rankings an earlier pass of this run wrote: a
    rerun (corrected labels, say) may find fewer findings, and an interrupted re-ranking
    leaves staged names; their files would outlive them beside the new ones.  The documents
    that name those files go first: a rerun stopped before it wrote its own left the old
    findings.json beside the new pass's pictures (other findings' under the same ranks), and
    `spurfast report` showed them without a word; and the page made from them, which showed the
    old findings as this run's until the new one replaced it."""
    for name in (*DOCUMENTS, "report.html"):
        (out / name).unlink(missing_ok=True)
    for sub in ("images", "rankings"):
        d = out / sub
        # a linked folder is refused when the run claims its folder (`run_folder`); a link
        # made since must not lead this outside the run all the same
        if d.is_dir() and not d.is_symlink():
            for f in d.iterdir():
                if _FINDING_FILE.fullmatch(f.name) and not f.is_dir():
                    f.unlink()
            # and those a pass killed mid-write left (finding1.npy.PID.tmp: a whole ranking, linked)
            remove_killed_writers_files(d, _FINDING_FILE.fullmatch)


def rank_confirmed_first(result, out, drop=None) -> None:
    """Re-rank findings: confirmed ones (the pasted pattern moves the model beyond both
    controls, `spurfast.confirm.confirm_verdict`) first, then ``not_specific`` ones (they
    beat genuine class content but not random patterns: a model that reacts to any
    corruption of that size, as one that learned "noise means class c" does), then the
    rest; each group in discovery order (the clusters' findings by score, the feature view's
    placed among them by q-value, then the residual scan's, whose score is another statistic).  Natural confusions can out-score a shortcut;
    they do not survive the content control.  Image files and probe rankings follow their
    finding's new rank.  ``drop(finding, verdict)``: true for a finding to leave out (its
    files removed; the feature view's unconfirmed ones, `spurfast.feature_view.unconfirmed`)."""
    from .confirm import confirm_verdict

    out = Path(out)   # a str, as every other step takes, failed only where the order changed
    tier = {"confirmed": 0, "not_specific": 1}
    verdicts = [confirm_verdict(f.get("confirm")) for f in result.findings]
    for f, v in zip(result.findings, verdicts):
        f["confirmed"] = v == "confirmed"
    old = [f["rank"] for f in result.findings]
    order = sorted(range(len(old)), key=lambda i: (tier.get(verdicts[i], 2), old[i]))
    if drop is not None:
        dropped = {i for i in order if drop(result.findings[i], verdicts[i])}
        for i in dropped:
            for rel in (result.findings[i].get("images") or {}).values():
                (out / rel).unlink(missing_ok=True)
        order = [i for i in order if i not in dropped]
    if order == list(range(len(old))):
        return
    findings = [result.findings[i] for i in order]
    rankings = {}
    staged = []
    for new, f in enumerate(findings, 1):
        rankings[new] = result.rankings[f["rank"]]
        for key, rel in (f.get("images") or {}).items():
            src = out / rel
            tmp = src.with_name(f".rerank{new}_{src.name}")
            if src.is_file():
                src.rename(tmp)
                staged.append((tmp, src.with_name(src.name.replace(f"finding{f['rank']}_", f"finding{new}_", 1))))
                f["images"][key] = str(staged[-1][1].relative_to(out))
        f["rank"] = new
    for tmp, dst in staged:
        tmp.rename(dst)
    result.findings[:] = findings
    result.rankings.clear()
    result.rankings.update(rankings)
