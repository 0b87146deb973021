"""Image folders: one subfolder per class (JPEG/PNG), or a flat unlabelled folder."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .preprocess import IMAGE_EXTENSIONS, PreprocessSpec, load_image
from .sources import ImageSource

log = logging.getLogger("spurfast.data")


def list_folder(root: str | Path) -> tuple[list[str], list[int], list[str] | None]:
    """(paths, labels, class_names) in a stable order; raises early on bad layouts."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    top_files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if subdirs and not top_files:
        paths, labels = [], []
        for c, d in enumerate(subdirs):
            files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise ValueError(f"class folder {d} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            paths += [str(p) for p in files]
            labels += [c] * len(files)
        return paths, labels, [d.name for d in subdirs]
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [str(p) for p in files], [-1] * len(files), None


class ImageFolderSource(ImageSource):
    """Lazily decoded image folder.  A file that fails to decode yields a zero image and
    is recorded in ``bad_files`` (index -> reason); loaders report it, runs go on."""

    def __init__(self, root, size: int = 64, channels: int = 3):
        self.root = str(root)
        self.paths, self._labels, self.class_names = list_folder(root)
        self.spec = PreprocessSpec(size, channels)
        self.image_shape = (channels, size, size)
        self.name = Path(root).name
        self.bad_files: dict[int, str] = {}

    def __len__(self):
        return len(self.paths)

    def load(self, i: int) -> tuple[torch.Tensor, bool]:
        try:
            return load_image(self.paths[i], self.spec), True
        except Exception as exc:  # PIL raises many types for corrupt files
            self.bad_files[i] = f"{exc.__class__.__name__}: {exc}"
            log.warning("skipping unreadable image %s (%s)", self.paths[i], exc)
            return torch.zeros(self.image_shape), False

    def __getitem__(self, i):
        return self.load(int(i))[0], int(self._labels[i])

    def item_id(self, i):
        return self.paths[i]

    def labels(self):
        import numpy as np
        return np.asarray(self._labels, dtype=np.int64)
