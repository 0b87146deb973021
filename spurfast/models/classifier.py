"""Classifiers: a small CNN for 28x28 images, torchvision's ResNet-18 for larger RGB.

Every classifier spurfast uses gives logits and penultimate features
(`classifier_outputs`).  User models load from TorchScript or from a state_dict plus a
named architecture, always with ``weights_only=True`` unless the caller opts out.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHITECTURES = ("small_cnn", "resnet18")


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 32):
        super().__init__()
        if image_size < 4:  # two 2x2 max-pools: smaller images fail on their first batch
            raise ValueError(f"small_cnn needs images of at least 4x4, got image_size={image_size}")
        self.arch = dict(name="small_cnn", in_channels=in_channels, num_classes=num_classes,
                         image_size=image_size, width=width)
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4) if image_size != 28 else nn.Identity()
        hw = 7 if image_size == 28 else 4
        self.fc1 = nn.Linear(2 * width * hw * hw, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def features(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = self.pool(x).flatten(1)
        return F.relu(self.fc1(x))

    def forward(self, x):
        return self.fc2(self.features(x))


class ResNet18(nn.Module):
    """torchvision ResNet-18 (random init: no weights are downloaded), with a 3x3 stem
    for small images."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 64):
        super().__init__()
        from torchvision.models import resnet18

        self.arch = dict(name="resnet18", in_channels=in_channels, num_classes=num_classes, image_size=image_size)
        net = resnet18(weights=None, num_classes=num_classes)
        if image_size < 128:
            net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.net = net

    def features(self, x):
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return torch.flatten(n.avgpool(x), 1)

    def forward(self, x):
        return self.net.fc(self.features(x))


def build_classifier(arch: str, in_channels: int, num_classes: int, image_size: int, **options) -> nn.Module:
    """``options``: the architecture's other keyword arguments (SmallCNN's ``width``)."""
    classes = {"small_cnn": SmallCNN, "resnet18": ResNet18}
    if arch not in classes:
        raise ValueError(f"unknown classifier architecture {arch!r}; expected one of {ARCHITECTURES}")
    try:
        return classes[arch](in_channels, num_classes, image_size, **options)
    except TypeError as exc:
        raise ValueError(f"architecture {arch!r} does not take options {sorted(options)}: {exc}") from None


def save_classifier(model: nn.Module, path) -> None:
    arch = getattr(model, "arch", None)
    if not isinstance(arch, dict) or "name" not in arch:
        # without its architecture the file could not be rebuilt by load_classifier
        raise ValueError(f"cannot save a {type(model).__name__} to {path} as a spurfast classifier: it has no "
                         f"'arch' record (only models from build_classifier do); save it as TorchScript "
                         f"(torch.jit.script/trace + .save) or as a state_dict instead")
    save_atomic({"arch": arch, "state_dict": model.state_dict()}, path)


def save_atomic(obj, path) -> None:
    """``torch.save`` through a temporary file: an interrupted save leaves the old file (or
    none), never a truncated one that every later load of ``path`` fails on."""
    if not isinstance(path, (str, os.PathLike)):  # a file object, as torch.save takes
        torch.save(obj, path)
        return
    p = Path(path)
    p = p.resolve() if p.is_symlink() else p  # write through a link, as torch.save did, not over it
    tmp = p.with_name(p.name + ".tmp")
    try:
        torch.save(obj, tmp)
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
    return lines[0].split(". ")[0].rstrip(".")[:300] if lines else type(exc).__name__


def _load_weights(model: nn.Module, state_dict, p: Path, arch: str, in_channels, num_classes, image_size) -> None:
    """``model.load_state_dict`` whose mismatch error names the file and the architecture."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        # torch's message: a header line, then one tab-indented line per mismatch
        lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
        shown = "; ".join(ln[:200] for ln in lines[:3]) + (f"; ... ({len(lines) - 3} more)" if len(lines) > 3 else "")
        raise ValueError(f"{p}: the state_dict does not fit architecture {arch!r} with in_channels={in_channels}, "
                         f"num_classes={num_classes}, image_size={image_size}: {shown or str(exc).strip()}") from None


def load_classifier(path, arch: str | None = None, in_channels: int | None = None,
                    num_classes: int | None = None, image_size: int | None = None,
                    weights_only: bool = True) -> nn.Module:
    """Load a TorchScript file, a spurfast checkpoint, or a raw state_dict + ``arch``."""
    p = Path(path)
    if p.is_dir():  # "does not exist" would send the user looking for the wrong problem
        raise IsADirectoryError(f"classifier file {p} is a directory; expected the model file in it")
    if not p.is_file():
        raise FileNotFoundError(f"classifier file {p} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=weights_only)
    except Exception as exc:
        try:
            m = torch.jit.load(str(p), map_location="cpu")
            m.eval()
            return m
        except Exception:
            hint = "; if you trust this file (a pickled model), pass --unsafe-load" if weights_only else ""
            raise ValueError(f"{p} is neither TorchScript nor a loadable state_dict "
                             f"(weights_only={weights_only}): {torch_error_gist(exc)}{hint}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj.get("arch"), dict):
        a = dict(obj["arch"])
        name = a.pop("name")
        # every saved key (width, ...) goes back to the constructor, else the shapes differ
        ic, nc, size = a.pop("in_channels"), a.pop("num_classes"), a.pop("image_size")
        model = build_classifier(name, ic, nc, size, **a)
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
        model = build_classifier(arch, in_channels, num_classes, image_size)
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


@torch.no_grad()
def classifier_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, penultimate features).  Models without ``features`` give logits as features."""
    feats_fn = getattr(model, "features", None)
    if feats_fn is not None and callable(feats_fn) and hasattr(model, "fc2"):
        f = feats_fn(x)
        return model.fc2(f), f
    if isinstance(model, ResNet18):
        f = model.features(x)
        return model.net.fc(f), f
    logits = model(x)
    return logits, logits


def output_width(model: nn.Module, image_shape, *, name: str = "classifier", pool: str = "the pool") -> int:
    """The model's number of outputs for one image of ``image_shape``; fails early, naming
    both shapes, when the model was built for other images or cannot run on them."""
    shape = tuple(int(s) for s in image_shape)
    arch = getattr(model, "arch", None)
    if isinstance(arch, dict) and {"in_channels", "image_size"} <= set(arch):
        want = (int(arch["in_channels"]), int(arch["image_size"]), int(arch["image_size"]))
        if want != shape:
            raise ValueError(f"{name} expects images of shape {_fmt(want)} (CxHxW), {pool} has {_fmt(shape)}; "
                             f"use a classifier trained on such images (for folders: --size/--channels)")
    with torch.no_grad():
        try:
            out = model(torch.zeros((1,) + shape))
        except RuntimeError as exc:  # TorchScript / foreign models: only a trial run tells
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{name} cannot run on images of shape {_fmt(shape)} (CxHxW) from {pool}: "
                             f"{first}") from None
    if not isinstance(out, torch.Tensor):  # a tuple or dict (logits, extras): not a classifier's logits
        raise ValueError(f"{name} outputs a {type(out).__name__} for one image; expected a tensor of logits "
                         f"of shape (1, classes)")
    if out.dim() != 2:
        raise ValueError(f"{name} outputs shape {tuple(out.shape)} for one image; expected (1, classes)")
    return int(out.shape[1])


def check_output_width(model: nn.Module, image_shape, num_classes: int, *, name: str = "classifier",
                       pool: str = "the pool") -> None:
    """:func:`output_width`, which must match the number of classes."""
    width = output_width(model, image_shape, name=name, pool=pool)
    if width != num_classes:
        raise ValueError(f"{name} outputs shape (1, {width}) for one image; expected (1, {num_classes}) "
                         f"to match {num_classes} classes")


def _fmt(shape) -> str:
    return "x".join(str(s) for s in shape)
