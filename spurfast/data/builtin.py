"""Built-in offline datasets: Fashion-MNIST from IDX files, scikit-learn's digits."""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .sources import ArraySource

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
_PREFIX = {"train": "train", "test": "t10k"}


def _candidates(root: str | os.PathLike | None) -> list[Path]:
    """Folders to look in: those of ``root`` (the one named, then a torchvision FashionMNIST
    root's FashionMNIST/raw and raw), else of $SPURFAST_FASHION_MNIST, else Debian's.  A root
    the user named is the only place looked: a mistyped one fell back to Debian's copy unsaid."""
    if root is None:
        root = os.environ.get("SPURFAST_FASHION_MNIST") or None
    if root is None:
        return [Path(DEBIAN_DIR)]
    r = Path(root)
    return [r, r / "FashionMNIST" / "raw", r / "raw"]


def _split_files(dirs: list[Path], split: str) -> tuple[Path, Path] | None:
    """(images, labels) of ``split`` from the first folder holding both (plain or .gz): each
    file was looked up on its own, so images of one folder could meet labels of another."""
    def one(d: Path, stem: str) -> Path | None:
        return next((d / n for n in (stem, stem + ".gz") if (d / n).is_file()), None)

    for d in dirs:
        img, lab = one(d, f"{_PREFIX[split]}-images-idx3-ubyte"), one(d, f"{_PREFIX[split]}-labels-idx1-ubyte")
        if img is not None and lab is not None:
            return img, lab
    return None


def find_fashion_mnist(root=None) -> Path | None:
    """Directory holding the Fashion-MNIST training IDX files (images and labels), or None."""
    found = _split_files(_candidates(root), "train")
    return found[0].parent if found else None


def fashion_mnist_files(root=None) -> list[Path]:
    """The IDX files `load_fashion_mnist` reads for either split (those found): what a run over
    them must not delete (`spurfast demo --overwrite` with the data inside its folder)."""
    dirs = _candidates(root)
    return [f for split in _PREFIX for f in (_split_files(dirs, split) or ())]


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:  # truncated or corrupt .gz
        raise ValueError(f"{path}: not a complete gzipped IDX file ({exc.__class__.__name__}: {exc})") from None
    if len(data) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(data)} bytes)")
    zero, dtype_code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: not a complete IDX file ({len(data)} bytes, too few for a {ndim}-D header)")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values for shape {dims}, found {arr.size}")
    return arr.reshape(dims)


def load_fashion_mnist(split: str = "train", root=None) -> ArraySource:
    """Fashion-MNIST as an ArraySource (1x28x28).  ``root``: a directory of IDX files
    (plain or .gz) or a torchvision FashionMNIST root; default: $SPURFAST_FASHION_MNIST,
    else Debian's dataset-fashion-mnist package (not both: see `_candidates`)."""
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    dirs = _candidates(root)
    found = _split_files(dirs, split)
    if found is None:
        where = ", ".join(str(d) for d in dirs)
        named = "" if root is not None or not os.environ.get("SPURFAST_FASHION_MNIST") else \
            " ($SPURFAST_FASHION_MNIST names that folder; unset it to use Debian's package)"
        raise FileNotFoundError(
            f"Fashion-MNIST {split} IDX files (images and labels) not found together in {where}{named}; install "
            f"Debian's dataset-fashion-mnist or pass the directory holding them")
    img, lab = found
    images, labels = read_idx(img), read_idx(lab)
    if len(images) != len(labels):
        raise ValueError(f"{img}: {len(images)} images but {lab}: {len(labels)} labels")
    return ArraySource(images, labels, class_names=FASHION_CLASSES, name=f"fashion-mnist-{split}")


def load_digits(size: int = 28) -> ArraySource:
    """scikit-learn's 8x8 digits (1,797 images), upsampled to size x size in [0, 1]."""
    from sklearn.datasets import load_digits as _sk

    d = _sk()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp_(0.0, 1.0)
    return ArraySource(x, d.target, class_names=[str(i) for i in range(10)], name="digits")
