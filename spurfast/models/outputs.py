"""What a classifier outputs: logits and penultimate features for the store, and the
up-front check that a model runs on the pool's images and gives one logit per class.

Kept apart from the architectures for the same reason as ``files.py``: the evaluation's model
cache hashes classifier.py.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from .layout import channels_last, in_cpu_blocks

# other models with ``features`` and ``fc2`` (a scripted SmallCNN, or a user's own) -> whether
# their logits are fc2(features(x)), as checked on the first batch they classify
_HEAD_IS_FC2: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# other models on a CPU -> whether they give channels-last images the logits they give NCHW
# ones, as checked on the first batch they classify (a model that .view()s a convolution's
# output fails on them: it keeps the caller's layout)
_CHANNELS_LAST_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def forget_checks(model: nn.Module) -> None:
    """Drop what the first batches decided about ``model`` (`_HEAD_IS_FC2`, `_CHANNELS_LAST_OK`),
    so its next batch decides again: each pass starts so (`spurfast.embed.check_outputs`).  A
    model changed in place between two passes (a temperature, a logit shift) kept the first
    pass's "logits are fc2(features)", and the second stored fc2(features) as its logits."""
    for cache in (_HEAD_IS_FC2, _CHANNELS_LAST_OK):
        try:
            cache.pop(model, None)
        except TypeError:   # not weakly referable: never kept
            pass


def _cpu_layout(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(``x`` channels-last (`spurfast.models.layout.channels_last`: oneDNN's faster layout)
    for a model on a CPU that gives such images the same logits, else ``x``; ``model``'s
    output for the images returned where the check computed it, else None).  spurfast's own
    architectures switch inside; this serves the others (a TorchScript file: a traced SmallCNN
    of width 8 at RGB 64x64 classified 1.35x faster).  The first batch runs both layouts, and
    its output is kept: a third forward cost a user's ResNet-18 a batch's time again."""
    if x.device.type != "cpu" or x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last):
        return x, None   # one layout either way (grey images): nothing to check
    try:
        known = _CHANNELS_LAST_OK.get(model)
    except TypeError:   # not weakly referable: the caller's layout, unchecked
        return x, None
    if known is not None:
        return (channels_last(x) if known else x), None
    plain = None
    try:
        plain = model(x)
        fast = model(channels_last(x))
        same = (isinstance(plain, torch.Tensor) and isinstance(fast, torch.Tensor) and plain.shape == fast.shape
                and plain.is_floating_point() and bool(torch.allclose(fast, plain, rtol=1e-4, atol=1e-5,
                                                                          equal_nan=True)))
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception:   # the model's own error (a .view of a channels-last map): it keeps the caller's layout
        same = False
    _CHANNELS_LAST_OK[model] = same
    if same:
        return channels_last(x), fast
    # plain: model(x) itself, or None where that raised (the caller's own call then says why)
    return x, plain if isinstance(plain, torch.Tensor) else None


@torch.no_grad()
def model_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``, on a CPU in the layout `classifier_outputs` gives it (channels-last where the
    model gives such images the same logits) and in blocks of `layout.CPU_BLOCK` images:
    confirmation's 4,000 forwards a finding ran a traced SmallCNN-8 in NCHW at half the
    embedding pass's rate."""
    return in_cpu_blocks(lambda xb: _logits(model, xb), x)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x, first = _cpu_layout(model, x)
    return model(x) if first is None else first


@torch.no_grad()
def classifier_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, penultimate features): spurfast's SmallCNN and ResNet18 give their
    penultimate layer, another model with ``features`` and an ``fc2`` layer (a scripted
    SmallCNN) gives fc2(features(x)) where its first batch shows that to be its logits
    (``model(x)``), and every other model gives its logits as its features.  On a CPU in
    blocks of `layout.CPU_BLOCK` images."""
    return in_cpu_blocks(lambda xb: _outputs(model, xb), x)


def _outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .classifier import ResNet18, SmallCNN  # here: classifier.py re-exports this module
    if isinstance(model, SmallCNN):
        f = model.features(x)
        return model.fc2(f), f
    if isinstance(model, ResNet18):
        f = model.features(x)
        return model.net.fc(f), f
    x, first = _cpu_layout(model, x)
    feats_fn = getattr(model, "features", None)
    if callable(feats_fn) and hasattr(model, "fc2"):
        # a user's model may have both and another head (fc2(relu(fc1(features)))): its logits
        # were taken as fc2(features(x)), other classes than the model's own, without a word
        try:
            known = _HEAD_IS_FC2.get(model)
        except TypeError:   # not weakly referable: checked on every batch
            known = None
        if known:
            f = feats_fn(x)
            return model.fc2(f), f
        if known is None:
            logits = model(x) if first is None else first
            try:
                f = feats_fn(x)
                # NaN rows alike: a model standardising each image gives NaN for an unreadable
                # file's blank stand-in, and one such row made logits stand in for the features
                same = bool(torch.allclose(model.fc2(f), logits, rtol=1e-4, atol=1e-5, equal_nan=True))
            except (RuntimeError, TypeError, ValueError):   # conv maps into a Linear, say: not its head
                same = False
            try:
                if bool(torch.isfinite(logits).any()):   # no finite value tells nothing
                    _HEAD_IS_FC2[model] = same
            except TypeError:
                pass
            return logits, (f if same else logits)
    logits = model(x) if first is None else first
    return logits, logits


def trial_error_gist(exc: BaseException) -> str:
    """What a model's failed trial forward says, in one line.  TorchScript's message opens with
    "The following operation failed in the TorchScript interpreter." and a traceback, and ends
    with the cause ("RuntimeError: mat1 and mat2 must have the same dtype ..."): its first line,
    all that was shown, named no cause."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].startswith("The following operation failed in the TorchScript interpreter") and len(lines) > 1:
        last = lines[-1]
        for prefix in ("RuntimeError: ", "torch.jit.Error: "):
            last = last[len(prefix):] if last.startswith(prefix) else last
        return last
    return lines[0] if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {lines[0]}"


def trial(call, cannot: str, model=None):
    """``call()``, a model's trial forward; any error but running out of memory becomes
    ``ValueError(f"{cannot}: {gist}")`` (`trial_error_gist`).  A TorchScript ``assert``
    raises ``torch.jit.Error`` (not a RuntimeError), a pickled model's own check an
    AssertionError or TypeError: those ended in a traceback.  Where ``model`` has weights
    other than float32, the message says to pass ``model.float()``."""
    try:
        return call()
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:
        # torch's "Input type (float) and bias type (double) should be the same" said what
        # clashed, not what to do (spurfast's images are float32)
        other = non_float32_weights(model)
        hint = f" (its weights are {', '.join(other)}, spurfast's images float32: pass model.float())" if other else ""
        raise ValueError(f"{cannot}: {trial_error_gist(exc)}{hint}") from None


def non_float32_weights(model) -> list[str]:
    """The floating-point dtypes other than float32 among ``model``'s parameters, sorted
    ("float64", "bfloat16"); empty for a float32 model or one without parameters."""
    return sorted({str(p.dtype).replace("torch.", "") for p in getattr(model, "parameters", lambda: ())()
                   if p.is_floating_point() and p.dtype != torch.float32})


def check_floating(out: torch.Tensor, name: str, where: str = "") -> None:
    """Integer or bool "logits" (a class index one-hot): accepted, their softmax tied every
    class and nothing was found without a word."""
    if not out.is_floating_point():
        raise ValueError(f"{name} outputs {str(out.dtype).replace('torch.', '')} values{where}; expected "
                         f"floating-point logits or probabilities")


def output_width(model: nn.Module, image_shape, *, name: str = "classifier", pool: str = "the pool") -> int:
    """The model's number of outputs for one image of ``image_shape``; fails early, naming
    both shapes, when the model was built for other images or cannot run on them."""
    shape = tuple(int(s) for s in image_shape)
    arch = getattr(model, "arch", None)
    if isinstance(arch, dict) and {"in_channels", "image_size"} <= set(arch):
        want = (int(arch["in_channels"]), int(arch["image_size"]), int(arch["image_size"]))
        if want != shape:
            raise ValueError(f"{name} expects images of shape {shape_text(want)} (CxHxW), {pool} has {shape_text(shape)}; "
                             f"use a classifier trained on such images (for folders: --size/--channels)")
    with torch.no_grad():   # TorchScript / foreign models: only a trial run tells
        out = trial(lambda: model(torch.zeros((1,) + shape)),
                    f"{name} cannot run on images of shape {shape_text(shape)} (CxHxW) from {pool}", model)
    if not isinstance(out, torch.Tensor):  # a tuple or dict (logits, extras): not a classifier's logits
        raise ValueError(f"{name} outputs a {type(out).__name__} for one image; expected a tensor of logits "
                         f"of shape (1, classes)")
    if out.dim() != 2:
        raise ValueError(f"{name} outputs shape {tuple(out.shape)} for one image; expected (1, classes)")
    check_floating(out, name)
    return int(out.shape[1])


def check_output_width(model: nn.Module, image_shape, num_classes: int, *, name: str = "classifier",
                       pool: str = "the pool", classes_from: str | None = None) -> None:
    """:func:`output_width`, which must match the number of classes (``classes_from``: where
    that number came from, for the message)."""
    check_width(output_width(model, image_shape, name=name, pool=pool), num_classes, name=name,
                classes_from=classes_from)


def check_width(width: int, num_classes: int, *, name: str = "classifier", classes_from: str | None = None) -> None:
    """Raise unless a classifier's output ``width`` (`output_width`) is ``num_classes``."""
    if width != num_classes:
        raise ValueError(f"{name} outputs shape (1, {width}) for one image; expected (1, {num_classes}) "
                         f"to match {num_classes} classes" + (f" ({classes_from})" if classes_from else ""))


def shape_text(shape) -> str:
    """``(1, 28, 28)`` as ``1x28x28``."""
    return "x".join(str(s) for s in shape)
