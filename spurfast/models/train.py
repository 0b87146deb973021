"""Training loops for the classifier and the VAE: seeded, with progress bars and
per-epoch checkpoints that a rerun resumes from."""
from __future__ import annotations

import glob
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checks import SOURCE_HINT, check_arguments, check_compute_device, check_default_dtype, check_file_target, \
    check_whole, real_number, whole_number
from ..data.sources import ImageSource, content_digest
from .classifier import ResNet18, build_classifier
from .files import load_vae, save_atomic, save_classifier, save_vae, torch_error_gist  # noqa: F401 (re-exported)
from .vae import VAE, VAEConfig, vae_loss

log = logging.getLogger("spurfast.train")

MAX_SEED = (2 ** 64 - 1000) // 1000   # seed * 1000 + epoch (< 1000) fits a 64-bit generator seed


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of epoch ``epoch``'s batch order: seed * 1000 + epoch for the first
    1000 epochs (every model trained so far keeps its order), then one drawn from (seed,
    epoch).  seed * 1000 + epoch went on past them: epoch 1000 of seed s took epoch 0 of seed
    s + 1's order, and near MAX_SEED it overflowed 64 bits after a thousand epochs of work."""
    if epoch < 1000:
        return seed * 1000 + epoch
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0])


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))
    return torch.Generator().manual_seed(seed)


def _batches(source: ImageSource, batch_size: int, gen: torch.Generator, shuffle: bool = True, min_batch: int = 1):
    """Batches in a seeded order, less the images the source found unreadable (``bad_files``,
    filled as it loads): those come back as black images and must not be trained on.  The
    order and the batch boundaries do not depend on them, so clean data trains as before.
    ``min_batch``: the fewest images a model can train on at once (ResNet-18's batch norm at
    <= 8 px needs two); a shorter last batch joins the one before, and a batch that unreadable
    images leave too short joins the next."""
    n = len(source)
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    starts = _batch_starts(n, batch_size, min_batch)
    held = None  # readable images of a batch too short to train on, for the next one
    for s, e in zip(starts, starts[1:] + [n]):
        idx = order[s:e].numpy()
        x, y = source.get_batch(idx)
        bad = getattr(source, "bad_files", None)
        if bad:
            keep = [j for j, i in enumerate(idx) if int(i) not in bad]
            if len(keep) < len(idx):
                if not keep:
                    continue
                keep = torch.as_tensor(keep)
                x, y = x[keep], y[keep]
        if held is not None:
            x, y, held = torch.cat([held[0], x]), (None if y is None else torch.cat([held[1], y])), None
        if len(x) < min_batch:
            held = (x, y)
            continue
        yield x, y
    if held is not None:
        log.warning("%s: %d readable image(s) of the last batch left out of this epoch: fewer than the %d "
                    "the model trains on at once", source.name, len(held[0]), min_batch)


def _batch_starts(n: int, batch_size: int, min_batch: int = 1) -> list[int]:
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < min_batch:
        starts.pop()  # too short a last batch: it joins the one before
    return starts


def _skipped(source: ImageSource, n: int = 5) -> list[str]:
    """The first ``n`` unreadable images as "id (reason)"."""
    bad = getattr(source, "bad_files", None) or {}
    item_id = getattr(source, "item_id", None)
    return [f"{item_id(i) if callable(item_id) else i} ({reason})" for i, reason in sorted(bad.items())[:n]]


def _log_skipped(source: ImageSource, name: str) -> None:
    """One summary of the unreadable images left out of training (the loader logs each load)."""
    bad = getattr(source, "bad_files", None)
    if not bad:
        return
    shown = _skipped(source)
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    log.warning("%s training on %s left out %d unreadable image(s): %s%s",
                name, source.name, len(bad), "; ".join(shown), more)


def _compute(device) -> str:
    """Where the arithmetic runs, as far as it decides the weights: the device type, and on the
    CPU the thread count (another count sums in another order: weights about 1e-5 apart)."""
    kind = torch.device(device).type
    return f"{kind} with {torch.get_num_threads()} thread(s)" if kind == "cpu" else kind


def _rng_state(device) -> dict:
    """The RNG states a checkpoint needs: the CPU one, and on CUDA the CUDA generators too (the
    VAE's reparameterisation noise is drawn there), else a resumed run would diverge."""
    state = {"rng": torch.get_rng_state(), "compute": _compute(device)}
    if torch.device(device).type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["rng"])
    cuda = state.get("cuda_rng")  # absent in CPU runs' and older checkpoints
    if cuda is not None and torch.device(device).type == "cuda":
        for i in range(min(len(cuda), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda[i], i)


def _checkpoint(path: Path | None, state: dict) -> None:
    if path is not None:
        save_atomic(state, path)  # a crash never leaves a half-written checkpoint


def _read_checkpoint(path: Path) -> tuple[dict, dict | None, str | None]:
    """(state, the identity it records or None, why it cannot be read or None)."""
    try:
        state, unreadable = torch.load(path, map_location="cpu", weights_only=True), None
        if not isinstance(state, dict):
            state, unreadable = {}, f"it holds a {type(state).__name__}, not a checkpoint"
    except Exception as exc:  # junk, or emptied by a crash: train afresh, as for a foreign one
        state, unreadable = {}, f"it cannot be read ({torch_error_gist(exc)})"
    saved = json.loads(state["identity"]) if isinstance(state.get("identity"), str) else None
    return state, saved, unreadable


def _epoch_of(state: dict) -> int | None:
    try:
        return int(state["epoch"])
    except (KeyError, TypeError, ValueError):
        return None


def _not_this_run(state: dict, saved: dict | None, unreadable: str | None, identity: dict, epochs: int) -> str | None:
    """Why a checkpoint is not this run's to resume, or None when it is."""
    differ = sorted(k for k in identity.keys() | (saved or {}).keys() if identity.get(k) != (saved or {}).get(k))
    if unreadable:
        return unreadable
    if saved is None:
        return "it does not record what it was trained on (older spurfast)"
    if differ:
        return f"it was written for different {', '.join(differ)}"
    if int(state["epoch"]) > epochs:
        return f"it has {int(state['epoch'])} epochs done, more than the {epochs} asked for"
    return None


def _tag(identity: dict | None) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12] if identity else "unknown"


def _aside(path: Path, saved: dict | None, epoch: int | None) -> Path:
    """Where a checkpoint of another run (or of more epochs) is kept: one file per run and
    epoch count (``NAME.old-<identity's hash>-e<epoch>``), so a second mismatch does not
    overwrite the first one's work (a 3-epoch checkpoint set aside for a 2-epoch rerun was
    overwritten by that rerun's, set aside for a 1-epoch one), and that run finds it again."""
    return path.with_name(f"{path.name}.old-{_tag(saved)}" + (f"-e{epoch}" if saved and epoch is not None else ""))


def _asides_of(path: Path, identity: dict, epochs: int, done: int) -> list[Path]:
    """This run's checkpoints set aside beside ``path`` that may hold more than ``done`` and at
    most ``epochs`` epochs, the most first (by name; one without its epoch in the name, as
    spurfast wrote them before, last)."""
    stem = f"{path.name}.old-{_tag(identity)}"
    found = []
    for f in path.parent.glob(f"{glob.escape(stem)}*") if identity else ():
        rest = f.name[len(stem):]
        if rest == "":
            found.append((-1, f))   # its epoch is read, not named
        elif rest.startswith("-e") and rest[2:].isdigit() and done < int(rest[2:]) <= epochs:
            found.append((int(rest[2:]), f))
    return [f for _, f in sorted(found, key=lambda t: -t[0])]


def _resume(path: Path | None, model, opt, identity: dict, epochs: int, device="cpu") -> int:
    """Load the checkpoint at ``path`` if it belongs to this training run (same data, seed,
    model and optimiser settings, at most ``epochs`` done) and return its epoch; else 0.
    Another run's checkpoint there is moved aside (`_aside`), and this run's own set aside by
    an earlier mismatch, where it holds more epochs (at most ``epochs``), is moved back and
    resumed instead."""
    if path is None:
        return 0
    identity = json.loads(json.dumps(identity, sort_keys=True))  # compare as stored (tuples -> lists)
    state = None
    if path.exists():
        state, saved, unreadable = _read_checkpoint(path)
        why = _not_this_run(state, saved, unreadable, identity, epochs)
        if why is not None:
            # this run overwrites the checkpoint after its first epoch: keep the old one's work
            # (a rerun with a mistyped seed took a finished run's place, and the next one's too)
            old = _aside(path, saved, _epoch_of(state))   # None (unreadable, or older spurfast): "unknown"
            path.replace(old)
            log.warning("ignoring checkpoint %s and training afresh: %s; moved it to %s", path, why, old)
            state = None
    done = -1 if state is None else int(state["epoch"])
    for own in _asides_of(path, identity, epochs, done):   # perhaps set aside by an earlier mismatch
        got, saved, unreadable = _read_checkpoint(own)
        if _not_this_run(got, saved, unreadable, identity, epochs) is not None or int(got["epoch"]) <= done:
            continue
        if state is not None:   # fewer epochs of this run: kept aside in turn
            path.replace(_aside(path, identity, done))
        own.replace(path)
        state = got
        log.info("%s holds this run's checkpoint (%d epochs), set aside by an earlier run: resuming it",
                 own, int(got["epoch"]))
        break
    if state is None:
        return 0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    _set_rng_state(state, device)
    log.info("resumed %s at epoch %d", path, state["epoch"])
    written, now = state.get("compute"), _compute(device)   # absent in older checkpoints
    if written is not None and written != now:
        # not refused (the epochs done are sound), but the result is neither count's straight run
        log.warning("%s was written on %s and resumes on %s: the weights will differ slightly from a run "
                    "on either alone", path, written, now)
    return int(state["epoch"])


def train_classifier(source: ImageSource, num_classes: int, *, arch: str = "small_cnn", epochs: int = 3,
                     batch_size: int = 128, lr: float = 2e-3, seed: int = 0, device: str = "cpu",
                     checkpoint: str | Path | None = None, progress: bool = True):
    """Train a classifier on ``source`` (labels required).  Returns the model in eval mode."""
    check_arguments("train_classifier", ("source", source, ImageSource, "an ImageSource", SOURCE_HINT))
    _check_trainable(source, batch_size)
    # numpy ints (labels.max() + 1) went into the JSON identity; 2.5 failed naming nothing
    num_classes = whole_number(num_classes, "train_classifier: num_classes")
    c, h, w = source.image_shape
    if h != w:
        # the architectures record one image_size: a 28xW model fails on its first batch, any
        # other would be saved as HxH and refuse its own training images at `discover`
        raise ValueError(f"{source.name}: the classifier needs square images, got {h}x{w}")
    labels = source.labels()
    if (labels < 0).any():
        raise ValueError(f"{source.name}: {int((labels < 0).sum())} training images have no label")
    if labels.max() >= num_classes:
        raise ValueError(f"{source.name}: label {int(labels.max())} >= num_classes={num_classes}")

    def step(model, x, y):
        y = y.to(x.device)
        logits = model(x)
        return F.cross_entropy(logits, y), {"acc": (logits.argmax(1) == y).float().mean()}

    min_batch = ResNet18.min_train_batch(h) if arch == "resnet18" else 1
    if len(source) < min_batch:
        raise ValueError(f"{source.name}: {arch} at image_size={h} trains on at least {min_batch} images at once "
                         f"(batch norm over a 1x1 map), got {len(source)}")
    model_id = {"arch": arch, "in_channels": c, "num_classes": num_classes, "image_size": h,
                "labels": hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()[:16]}
    return _fit(lambda: build_classifier(arch, c, num_classes, h), source, step, "classifier", epochs=epochs,
                batch_size=batch_size, lr=lr, seed=seed, device=device, checkpoint=checkpoint, progress=progress,
                model_id=model_id, min_batch=min_batch)


def _check_trainable(source: ImageSource, batch_size: int) -> None:
    """Fail before any work on what would train nothing (an empty source) or crash later."""
    if len(source) == 0:
        raise ValueError(f"{source.name}: no images to train on")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def _fit(build, source: ImageSource, step, name: str, *, device: str, **kw):
    """`_train` inside a fork of torch's global random state.  Training seeds that generator
    (the initial weights and the VAE's noise draw from it); outside a fork this reset the
    caller's to spurfast's seed (what ``torch.rand`` gave after a training call no longer
    followed the caller's own seed)."""
    check_default_dtype(name)
    dev = torch.device(device)
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    # gradients on whatever the caller's mode: inside torch.no_grad() or inference_mode() the
    # first backward failed with torch's "element 0 of tensors does not require grad"
    with torch.random.fork_rng(devices=cuda), torch.inference_mode(False), torch.enable_grad():
        return _train(build, source, step, name, device=device, **kw)


def _train(build, source: ImageSource, step, name: str, *, epochs: int, batch_size: int, lr: float, seed: int,
           device: str, checkpoint, progress: bool, model_id: dict, min_batch: int = 1):
    """The one training loop: seeded init and epoch order, progress bar with running means of the
    loss and the step's metrics, an atomic checkpoint per epoch, resume from it.  The checkpoint
    records what it belongs to (``model_id``, data, seed, batch size, lr); a rerun resumes
    only a matching one (epochs may grow: there is no schedule, so epoch k is the same)."""
    check_compute_device(device, f"{name}: device {device!r}")   # "meta" failed after seconds of work
    # plain Python numbers (numpy ones failed the JSON identity after the first epoch's work),
    # each named: operator.index's "'float' object cannot be interpreted as an integer" said
    # neither which argument nor that 3.0 would have done
    seed, batch_size = whole_number(seed, f"{name}: seed"), whole_number(batch_size, f"{name}: batch_size")
    lr = real_number(lr, f"{name}: lr")
    if not 0 <= seed <= MAX_SEED:   # 2**62 failed as "Overflow when unpacking long long"
        raise ValueError(f"{name}: seed must be an integer from 0 to {MAX_SEED} (epoch e < 1000 is seeded "
                         f"with seed * 1000 + e, below 2**64), got {seed!r}")
    if not (np.isfinite(lr) and lr > 0):   # inf or NaN trained to NaN weights without a word
        raise ValueError(f"{name}: lr must be a finite number > 0, got {lr!r}")
    # 0 returned the random initial weights as a trained model; 2.0 failed in range() unnamed
    check_whole(epochs, f"{name}: epochs")
    epochs = int(epochs)
    # before any work: a folder given here was moved aside as an unreadable checkpoint, and a
    # missing folder failed after the first epoch naming a temporary file
    ck = check_file_target(checkpoint, f"{name}: checkpoint", "the checkpoint file") if checkpoint else None
    identity = {"model": model_id, "data": content_digest(source) if ck else None, "seed": seed,
                "batch_size": batch_size, "lr": lr, "trainer": name}
    # before build(): initial weights follow the seed (torch's generator alone: numpy's global
    # one, which seed_everything seeds too, is not spurfast's to reset)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = _resume(ck, model, opt, identity, epochs, device)
    for epoch in range(start, epochs):
        model.train()
        gen.manual_seed(epoch_seed(seed, epoch))
        bar = tqdm(_batches(source, batch_size, gen, min_batch=min_batch),
                   total=len(_batch_starts(len(source), batch_size, min_batch)),
                   desc=f"{name} epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        sums: dict[str, float] = {}
        seen = 0
        for x, y in bar:
            loss, metrics = step(model, x.to(device), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(x)
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(x)
            bar.set_postfix({k: f"{v / seen:.3f}" for k, v in sums.items()})
        if seen == 0:  # every image unreadable: the "trained" model would be its random init
            readable = len(source) - len(getattr(source, "bad_files", None) or {})
            if readable > 0:   # it said "none could be read" beside a warning that some were
                raise ValueError(f"{name} training on {source.name}: only {readable} of its {len(source)} images "
                                 f"could be read, fewer than the {min_batch} it trains on at once (e.g. "
                                 f"{next(iter(_skipped(source)), '?')})")
            raise ValueError(f"{name} training on {source.name}: none of its {len(source)} images could be read "
                             f"(e.g. {next(iter(_skipped(source)), '?')})")
        log.info("%s epoch %d: %s", name, epoch + 1, " ".join(f"{k} {v / max(seen, 1):.4f}" for k, v in sums.items()))
        _checkpoint(ck, {"model": model.state_dict(), "optim": opt.state_dict(), "epoch": epoch + 1,
                         **_rng_state(device), "identity": json.dumps(identity, sort_keys=True)})
    _log_skipped(source, name)
    model.eval()
    return model


def train_vae(source: ImageSource, config: VAEConfig | None = None, *, epochs: int = 8, batch_size: int = 128,
              lr: float = 1e-3, beta: float = 1.0, seed: int = 0, device: str = "cpu",
              checkpoint: str | Path | None = None, progress: bool = True) -> VAE:
    """Train the VAE on ``source`` (the pool).  Returns the model in eval mode."""
    check_arguments("train_vae", ("source", source, ImageSource, "an ImageSource", SOURCE_HINT),
                    ("config", config, (VAEConfig, type(None)), "a VAEConfig or None", "spurfast.VAEConfig(...)"))
    _check_trainable(source, batch_size)
    c, h, w = source.image_shape
    if h != w:
        raise ValueError(f"{source.name}: the VAE needs square images, got {h}x{w}")
    beta = real_number(beta, "VAE: beta")
    if not (np.isfinite(beta) and beta >= 0):
        raise ValueError(f"VAE: beta must be a finite number >= 0, got {beta!r}")
    config = config or VAEConfig.for_images(c, h)
    if (config.in_channels, config.image_size) != (c, h):
        raise ValueError(f"VAE config expects {config.in_channels}x{config.image_size}^2 images, "
                         f"{source.name} has {c}x{h}x{w}")
    def step(model, x, _):
        recon, mu, logvar = model(x)
        loss, rec, kl = vae_loss(recon, x, mu, logvar, beta)
        return loss, {"kl": kl}

    return _fit(lambda: VAE(config), source, step, "VAE", epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                device=device, checkpoint=checkpoint, progress=progress,
                model_id={"config": config.to_dict(), "beta": float(beta)})


__all__ = ["train_classifier", "train_vae", "save_vae", "load_vae", "save_classifier", "seed_everything"]
