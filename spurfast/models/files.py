"""Saving and loading models: spurfast's classifier and VAE files, user classifiers
(TorchScript, state_dicts), and the atomic ``torch.save`` every model and checkpoint goes
through.

Kept apart from the architectures and the training loop on purpose: the evaluation's model
cache records a hash of those files (``evaluate.model_provenance``), and fixing how a file is
written or read must not mark every cached model as trained by other code.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..atomic_files import remove_killed_writers_files, synced
from ..checks import check_default_dtype
from .vae import VAE, VAEConfig


def save_classifier(model: nn.Module, path) -> None:
    """Write a classifier made by `build_classifier` (its ``arch`` record and weights) to
    ``path`` atomically, for `load_classifier`; other models: save them as TorchScript."""
    arch = getattr(model, "arch", None)
    if not isinstance(arch, dict) or "name" not in arch:
        # without its architecture the file could not be rebuilt by load_classifier
        raise ValueError(f"cannot save a {type(model).__name__} to {path} as a spurfast classifier: it has no "
                         f"'arch' record (only models from build_classifier do); save it as TorchScript "
                         f"(torch.jit.script/trace + .save) or as a state_dict instead")
    save_atomic({"arch": arch, "state_dict": _unwrapped(model).state_dict()}, path)


def _unseeded(build, *args, **kwargs):
    """``build(...)`` of a model whose weights are loaded next: its random initial weights drew
    from torch's global generator and moved the caller's random state (a load changed what
    ``torch.rand`` gave after it)."""
    with torch.random.fork_rng(devices=[]):
        return build(*args, **kwargs)


def save_atomic(obj, path) -> None:
    """``torch.save`` through a temporary file: an interrupted save leaves the old file (or
    none), never a truncated one that every later load of ``path`` fails on.  The temporary
    name is the writer's own: with one fixed name, two processes saving one path moved each
    other's file away (FileNotFoundError) or renamed a half-written one into place."""
    if not isinstance(path, (str, os.PathLike)):  # a file object, as torch.save takes
        torch.save(obj, path)
        return
    p = Path(path)
    p = p.resolve() if p.is_symlink() else p  # write through a link, as torch.save did, not over it
    if p.is_dir():   # the rename failed naming the temporary file
        raise IsADirectoryError(f"cannot save to {path}: it is a folder; expected the path of a file")
    if not p.parent.is_dir():   # the open failed naming the temporary file
        raise FileNotFoundError(f"cannot save to {path}: its folder {p.parent} does not exist")
    # a save killed mid-write left its temporary file (weights and optimiser state) for good
    remove_killed_writers_files(p.parent, lambda name: name == p.name)
    tmp = p.with_name(f"{p.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as fh:   # a path names the archive's records after the (random) file name
            torch.save(obj, fh)
            synced(fh)
        tmp.replace(p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def torch_error_gist(exc: Exception) -> str:
    """The gist of torch's message, without its advice to turn weights_only off: the unpickler's
    own complaint, else the first line (for load_state_dict the first mismatch) and sentence."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # junk or a pickled object: the reason follows this
        text = text.split("WeightsUnpickler error:", 1)[1]
    elif "TorchScript archive" in text:
        return "it is a TorchScript archive"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    gist = lines[0].split(". ")[0].rstrip(".")[:300] if lines else ""
    # a bare "101" (a KeyError on a text file) said nothing: name the kind of error too
    return gist if any(ch.isalpha() for ch in gist) else f"{type(exc).__name__}: {gist}".rstrip(": ")


def _load_weights(model: nn.Module, state_dict, p: Path, arch: str, in_channels, num_classes, image_size) -> None:
    """``model.load_state_dict`` whose mismatch error names the file and the architecture."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        # torch's message: a header line, then one tab-indented line per mismatch
        lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
        shown = "; ".join(ln[:200] for ln in lines[:3]) + (f"; ... ({len(lines) - 3} more)" if len(lines) > 3 else "")
        stem = state_dict.get("net.conv1.weight") if isinstance(state_dict, dict) else None
        hint = ""
        if arch == "resnet18" and image_size < 128 and getattr(stem, "ndim", 0) == 4 and tuple(stem.shape[2:]) == (7, 7):
            # a torchvision ResNet-18 state_dict: it only fits at 128 px and above
            hint = (" (its 7x7 stem is torchvision's; spurfast's resnet18 has a 3x3 stem below 128 px: load it at "
                    "--size 128 or more, or save the model with torch.jit.script / torch.jit.trace and pass that file)")
        raise ValueError(f"{p}: the state_dict does not fit architecture {arch!r} with in_channels={in_channels}, "
                         f"num_classes={num_classes}, image_size={image_size}: {shown or str(exc).strip()}{hint}") from None


def _arch_unused(p: Path, arch: str | None, what: str) -> None:
    """``arch`` names the architecture of a bare state_dict only: said where it went unused
    (a checkpoint of another architecture loaded as its own, without a word)."""
    if arch is not None:
        logging.getLogger("spurfast.models").warning("%s is %s: the architecture given (%r) is for bare "
                                                     "state_dicts and is not used", p, what, arch)


def load_classifier(path, arch: str | None = None, in_channels: int | None = None,
                    num_classes: int | None = None, image_size: int | None = None,
                    weights_only: bool = True) -> nn.Module:
    """Load a TorchScript file, a spurfast checkpoint, or a raw state_dict + ``arch``."""
    from .classifier import ARCHITECTURES, build_classifier  # here: classifier.py re-exports this module
    check_default_dtype("load_classifier")
    p = Path(path)
    _need_model_file(p, "classifier")
    try:
        with warnings.catch_warnings():   # a TorchScript file is expected here: torch.jit.load below takes it
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            obj = torch.load(p, map_location="cpu", weights_only=weights_only)
    except Exception as exc:
        try:
            m = torch.jit.load(str(p), map_location="cpu")
            m.eval()
            _arch_unused(p, arch, "a TorchScript model")
            return m
        except Exception:
            hint = ("; if you trust this file (a pickled model), pass --unsafe-load (from Python: "
                    "weights_only=False)") if weights_only else ""
            raise ValueError(f"{p} is neither TorchScript nor a loadable state_dict "
                             f"(weights_only={weights_only}): {torch_error_gist(exc)}{hint}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj.get("arch"), dict):
        a = dict(obj["arch"])
        lack = [k for k in ("name", "in_channels", "num_classes", "image_size") if k not in a]
        if lack or not isinstance(obj["state_dict"], dict):   # a KeyError / TypeError traceback
            why = f"its arch record lacks {', '.join(lack)}" if lack else \
                f"its state_dict is a {type(obj['state_dict']).__name__}, not a dict of tensors"
            raise ValueError(f"{p} is not a loadable spurfast classifier checkpoint: {why}")
        name = a.pop("name")
        if arch != name:
            _arch_unused(p, arch, f"a spurfast checkpoint of a {name!r} classifier")
        # every saved key (width, ...) goes back to the constructor, else the shapes differ
        ic, nc, size = a.pop("in_channels"), a.pop("num_classes"), a.pop("image_size")
        try:
            model = _unseeded(build_classifier, name, ic, nc, size, **a)
        except (TypeError, ValueError) as exc:   # an unknown architecture or option named no file
            raise ValueError(f"{p}: its arch record cannot be rebuilt: {exc}") from None
        _load_weights(model, obj["state_dict"], p, name, ic, nc, size)
    elif isinstance(obj, dict) and "state_dict" in obj and "config" in obj:
        raise ValueError(f"{p} is a spurfast VAE checkpoint (from `spurfast train-vae`), not a classifier; "
                         f"pass it as --vae")
    elif isinstance(obj, dict) and "state_dict" in obj and "arch" in obj:
        raise ValueError(f"{p} is a spurfast classifier checkpoint without its architecture record "
                         f"(arch={obj['arch']!r}); it cannot be rebuilt: save the model as TorchScript instead")
    elif isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{p} holds a dict with keys {sorted(map(str, obj))[:8]}, which is neither a spurfast "
                         f"classifier checkpoint (keys 'arch', 'state_dict') nor a state_dict of tensors")
    elif isinstance(obj, dict):
        if arch is None or in_channels is None or num_classes is None or image_size is None:
            raise ValueError(f"{p} is a bare state_dict: it needs its architecture (--arch, one of {ARCHITECTURES}) "
                             f"and number of classes (--num-classes, or a pool with class names); got arch={arch}, "
                             f"num_classes={num_classes}")
        model = _unseeded(build_classifier, arch, in_channels, num_classes, image_size)
        if arch == "resnet18" and obj and not any(str(k).startswith("net.") for k in obj):
            obj = {f"net.{k}": v for k, v in obj.items()}  # torchvision's own keys: ResNet18 wraps it as .net
        _load_weights(model, obj, p, arch, in_channels, num_classes, image_size)
    elif isinstance(obj, nn.Module):
        # weights_only=False: torch.load gives a ScriptModule for a TorchScript archive, or
        # the module itself for a pickled one; both are ready to use
        model = obj
    else:
        raise ValueError(f"{p} holds a {type(obj).__name__}, expected a state_dict, TorchScript or an nn.Module")
    model.eval()
    return model


def save_vae(model: VAE, path) -> None:
    """Write a `VAE` (its config and weights) to ``path`` atomically, for `load_vae`."""
    if not hasattr(getattr(model, "config", None), "to_dict"):   # a classifier failed with AttributeError 'config'
        raise TypeError(f"save_vae takes a spurfast VAE, got a {type(model).__name__}; save a classifier with "
                        f"save_classifier")
    save_atomic({"config": json.dumps(model.config.to_dict()), "state_dict": _unwrapped(model).state_dict()}, path)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model a ``torch.compile`` wrapper holds: its state_dict prefixes every key with
    ``_orig_mod.``, and the file saved from it was refused by the loader."""
    return getattr(model, "_orig_mod", model)


def _need_model_file(p: Path, what: str) -> None:
    """``p`` must be a regular file: "does not exist" for a folder, a pipe (<(...)) or a
    device (/dev/null) would send the user looking for the wrong problem."""
    if p.is_dir():
        raise IsADirectoryError(f"{what} file {p} is a directory; expected the model file in it")
    if p.exists() and not p.is_file():
        raise ValueError(f"{what} file {p} is not a regular file (a pipe or a device); expected the model file")
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {p} does not exist")


def load_vae(path, weights_only: bool = True) -> VAE:
    """The `VAE` that `save_vae` (or `spurfast train-vae`) wrote to ``path``, in eval mode
    on the CPU; read with ``torch.load(weights_only=True)`` unless ``weights_only=False``."""
    check_default_dtype("load_vae")
    p = Path(path)
    _need_model_file(p, "VAE")
    what = "a VAE checkpoint written by `spurfast train-vae`"
    try:
        with warnings.catch_warnings():   # a TorchScript file gets spurfast's error below, not torch's warning first
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            obj = torch.load(p, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # junk, truncated, TorchScript or a pickled module: name the file
        raise ValueError(f"{p} is not {what} (weights_only={weights_only}): {torch_error_gist(exc)}") from None
    if not isinstance(obj, dict) or "config" not in obj or "state_dict" not in obj:
        raise ValueError(f"{p} is not a spurfast VAE checkpoint (expected keys 'config' and 'state_dict')")
    try:
        model = _unseeded(VAE, VAEConfig(**json.loads(obj["config"])))
        model.load_state_dict(obj["state_dict"])
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"{p} is not a loadable spurfast VAE checkpoint ({what}): {torch_error_gist(exc)}") from None
    model.eval()
    return model


__all__ = ["save_atomic", "torch_error_gist", "save_classifier", "load_classifier", "save_vae", "load_vae"]
