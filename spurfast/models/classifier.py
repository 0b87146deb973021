"""Classifiers: a small CNN for 28x28 images, torchvision's ResNet-18 for larger RGB.

Every classifier spurfast uses gives logits and penultimate features
(`outputs.classifier_outputs`).  Saving and loading live in `files.py` (user models load from
TorchScript or from a state_dict plus a named architecture, always with ``weights_only=True``
unless the caller opts out); both are re-exported here, where they lived before.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checks import check_whole
from .layout import channels_last

# re-exported where they lived before; files.py and outputs.py import this module inside their functions
from .files import load_classifier, save_atomic, save_classifier, torch_error_gist  # noqa: F401
from .outputs import check_output_width, classifier_outputs, output_width  # noqa: F401

__all__ = ["ARCHITECTURES", "SmallCNN", "ResNet18", "build_classifier", "load_classifier", "save_atomic",
           "save_classifier", "torch_error_gist", "check_output_width", "classifier_outputs", "output_width"]

ARCHITECTURES = ("small_cnn", "resnet18")


def _relu_pool(x: torch.Tensor) -> torch.Tensor:
    """max_pool2d(relu(x), 2).  On a CPU without autograd: two elementwise maxima of strided
    views, then the ReLU of the quarter-size result (ReLU and max commute exactly, NaN
    included): torch's max_pool2d CPU kernel on NCHW maps took 40 of 131 ms of a batch of
    256 at 28x28 on one core, these 7 ms, the same values.  Else max_pool2d itself: under
    autograd (its gradient picks one element of a tie), under torch.jit.trace (whose check
    reruns the model without autograd and refuses another graph), and on a GPU (not measured)."""
    if x.requires_grad or torch.jit.is_tracing() or x.device.type != "cpu":
        return F.max_pool2d(F.relu(x), 2)
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2   # max_pool2d drops an odd last row/column
    rows = torch.maximum(x[..., 0:h:2, 0:w], x[..., 1:h:2, 0:w])
    return F.relu(torch.maximum(rows[..., 0::2], rows[..., 1::2]))


def _channels_last_on_cpu(x: torch.Tensor) -> torch.Tensor:
    """``x`` channels-last on a CPU, where oneDNN's convolutions run faster on it, in
    inference and training alike (measured on 2 cores at RGB 64x64 through
    `classifier_outputs`: SmallCNN 1.6x at width 32, 1.35-1.8x at width 8, ResNet-18
    1.26-1.28x; a training step 1.26-1.29x; the same values to 1e-6, the convolutions'
    summation order).  Grey images keep their layout and bits (`channels_last`).  Under
    torch.jit.trace ``x`` as given: a trace keeps the layout it is fed."""
    if x.device.type != "cpu" or x.dim() != 4 or torch.jit.is_tracing():
        return x
    return channels_last(x)


def _whole_sizes(arch: str, **sizes) -> list[int]:
    """``sizes``' values as Python ints, each checked as an integer >= 1: a numpy integer went
    into ``arch`` as it was, and the saved file was then refused by the weights-only load
    (its own file, "--unsafe-load"); width 0 failed at the first forward, naming no setting."""
    for name, value in sizes.items():
        check_whole(value, f"{arch}: {name}")
    return [int(v) for v in sizes.values()]


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 32):
        super().__init__()
        in_channels, num_classes, image_size, width = _whole_sizes(
            "small_cnn", in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width)
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
        x = _relu_pool(self.conv1(_channels_last_on_cpu(x)))
        x = _relu_pool(self.conv2(x))
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

        in_channels, num_classes, image_size = _whole_sizes(
            "resnet18", in_channels=in_channels, num_classes=num_classes, image_size=image_size)
        self.arch = dict(name="resnet18", in_channels=in_channels, num_classes=num_classes, image_size=image_size)
        net = resnet18(weights=None, num_classes=num_classes)
        if image_size < 128:
            net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.net = net

    @staticmethod
    def min_train_batch(image_size: int) -> int:
        """Images a training batch needs: batch norm needs two values per channel, and below
        128 px (3x3 stem, then three stride-2 stages) layer4's map is 1x1 at <= 8 px."""
        return 2 if image_size <= 8 else 1

    def features(self, x):
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(_channels_last_on_cpu(x)))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return torch.flatten(n.avgpool(x), 1)

    def forward(self, x):
        return self.net.fc(self.features(x))


def build_classifier(arch: str, in_channels: int, num_classes: int, image_size: int, **options) -> nn.Module:
    """``options``: the architecture's other keyword arguments (SmallCNN's ``width``)."""
    classes = {"small_cnn": SmallCNN, "resnet18": ResNet18}
    if arch not in classes:
        raise ValueError(f"unknown classifier architecture {arch!r}; expected one of {ARCHITECTURES}")
    # 4.5 was blamed on the options ("does not take options []"); 0 built a model of no logit
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("image_size", image_size)):
        check_whole(value, f"build_classifier: {name}")
    try:
        return classes[arch](in_channels, num_classes, image_size, **options)
    except TypeError as exc:
        raise ValueError(f"architecture {arch!r} does not take options {sorted(options)}: {exc}") from None
    except RuntimeError as exc:  # the layers cannot be allocated (a label of 2**40 read as 2**40 + 1 classes)
        raise ValueError(f"cannot build classifier {arch!r} with in_channels={in_channels}, "
                         f"num_classes={num_classes}, image_size={image_size}: "
                         f"{str(exc).strip().splitlines()[-1][:300]}") from None

