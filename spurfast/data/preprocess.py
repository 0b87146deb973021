"""The one definition of image preprocessing, shared by the torch and DALI loaders.

decode -> RGB (or L for channels=1) -> resize the shorter side to ``size`` (bilinear,
antialiased) -> centre crop size x size -> CHW float32 in [0, 1].  Mean/std
normalisation is *not* done here: the VAE encoder fuses it into its first layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class PreprocessSpec:
    size: int = 64
    channels: int = 3

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"image size must be positive, got {self.size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")


def resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """Shape after resizing the shorter side to ``size`` (rounded like torchvision)."""
    if h <= w:
        return size, max(size, int(round(w * size / h)))
    return max(size, int(round(h * size / w))), size


def load_image(path: str, spec: PreprocessSpec) -> torch.Tensor:
    """Decode and preprocess one file; raises (OSError/ValueError) on a bad file."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        im = im.convert("L" if spec.channels == 1 else "RGB")
        h, w = im.height, im.width
        nh, nw = resized_shape(h, w, spec.size)
        im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
        top, left = (nh - spec.size) // 2, (nw - spec.size) // 2
        im = im.crop((left, top, left + spec.size, top + spec.size))
        arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
