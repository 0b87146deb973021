"""Image folders: one subfolder per class (JPEG/PNG), or a flat unlabelled folder."""
from __future__ import annotations

import logging
import numbers
import os
import unicodedata
from pathlib import Path

import numpy as np
import torch

from .preprocess import IMAGE_EXTENSIONS, PreprocessSpec, checked_load_uint8
from .sources import ImageSource, pool_indices, utf8_name

log = logging.getLogger("spurfast.data")


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


# images the loaders do not decode (torchvision's ImageFolder reads them): left out, and said so
UNREAD_IMAGE_EXTENSIONS = (".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


def _warn_unread(root, skipped: list[str]) -> None:
    if skipped:
        log.warning("left out %d image file(s) of %s in a format spurfast does not read (it reads %s; convert them "
                    "to include them): %s", len(skipped), root, ", ".join(IMAGE_EXTENSIONS), _some(sorted(skipped)))


def _hidden(name: str) -> bool:
    """Hidden entries are not pool content: macOS's "._x.jpg" metadata twins (not images),
    thumbnail caches such as ".@__thumb/" (copies of the images), ".git"."""
    return name.startswith(".")


def _image_files(d: Path, exclude=(), skipped: list[str] | None = None, elsewhere=()) -> list[Path]:
    """Image files under ``d``, sorted, hidden files and folders left out.  Follows
    symlinked folders (Path.rglob does not), visiting each real folder once so a link back
    up cannot loop, and none of ``exclude`` (real paths: the pool's root and its other class
    folders, whose images a link back up listed again under this class's label); broken
    symlinks with an image name are kept, so the loaders report them as unreadable instead
    of dropping them.  Files of `UNREAD_IMAGE_EXTENSIONS` go to ``skipped``.  No folder inside
    one of ``elsewhere`` (real paths: the other class folders) is visited: a link to a subfolder
    of another class listed its images under both labels."""
    seen = {os.path.realpath(d), *exclude}
    inside = tuple(os.path.join(e, "") for e in elsewhere)
    files = []

    def unlisted(exc: OSError):  # os.walk skips a folder it cannot list without a word
        log.warning("cannot list folder %s (%s); the images in it are not in the pool",
                    exc.filename, exc.strerror or exc)

    for top, dirs, names in os.walk(d, followlinks=True, onerror=unlisted):
        keep = []
        for sub in sorted(dirs):  # sorted: which of two paths to one folder is kept is stable
            if _hidden(sub):
                continue
            real = os.path.realpath(os.path.join(top, sub))
            if real not in seen and not real.startswith(inside):
                seen.add(real)
                keep.append(sub)
        dirs[:] = keep
        _warn_dead_links(top, names)
        for n in names:
            full = os.path.join(top, n)
            if _is_image_name(n) and not _hidden(n) and (os.path.isfile(full) or not os.path.exists(full)):  # file or broken link
                files.append(Path(full))
            elif skipped is not None and os.path.splitext(n)[1].lower() in UNREAD_IMAGE_EXTENSIONS \
                    and not _hidden(n):
                skipped.append(full)
    return sorted(files)


def _warn_dead_links(folder, names) -> None:
    """Name the links in ``folder`` whose targets are gone, other than image-named ones
    (those are listed as unreadable pool images): a linked folder on an unmounted disk is no
    folder, and its images (in a class-folder pool, its whole class) were left out without
    a word."""
    dead = sorted(n for n in names if not _is_image_name(n) and not _hidden(n)
                  and os.path.islink(os.path.join(folder, n)) and not os.path.exists(os.path.join(folder, n)))
    if dead:
        log.warning("ignoring %d broken link(s) in %s (their targets are gone; a linked folder's images are not in "
                    "the pool): %s", len(dead), folder, ", ".join(dead))


def _some(names, k: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


def list_folder(root: str | Path, class_names: list[str] | None = None) -> tuple[list[str], list[int], list[str] | None]:
    """(paths, labels, class_names) in a stable order; raises early on bad layouts.

    Class folders are labelled in sorted name order (as torchvision's ImageFolder does),
    or, given ``class_names`` (the classifier's classes in label order), by their name's
    place in it: a pool that lacks some classes keeps the classifier's labels.  A flat
    folder is unlabelled (labels -1); ``class_names`` then only name the classes the
    classifier predicts.  Hidden files and folders (names starting with ".") are not
    part of the pool."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p.name))
    # the layout follows real files: one stale link at the top must not turn a class-folder
    # pool into a flat unlabelled one (a flat pool's broken links are still listed below)
    top_files = sorted(p for p in root.iterdir() if _is_image_name(p.name) and not _hidden(p.name) and p.is_file())
    if subdirs and not top_files:
        broken = sorted(p.name for p in root.iterdir()
                        if _is_image_name(p.name) and not _hidden(p.name) and not p.exists())
        if broken:
            log.warning("ignoring %d broken link(s) at the top of class-folder pool %s (in no class folder, so "
                        "not pool images): %s", len(broken), root, ", ".join(broken))
        _warn_dead_links(root, [p.name for p in root.iterdir()])
        names = list(class_names) if class_names is not None else [d.name for d in subdirs]
        # a folder name matches its class name exactly or else in one Unicode form: a folder
        # written on macOS spells "café" decomposed (NFD), a class-names file usually composed
        # (NFC), and the two look identical (first occurrence wins, as names.index would)
        exact = {n: k for k, n in reversed(list(enumerate(names)))}
        nfc = {unicodedata.normalize("NFC", n): k for k, n in reversed(list(enumerate(names)))}

        def label_of(name: str) -> int | None:
            k = exact.get(name, nfc.get(unicodedata.normalize("NFC", name)))
            if k is None:   # under a non-UTF-8 locale "zéro/" reads as "z\udcc3\udca9ro"; the names file is UTF-8
                try:
                    alt = os.fsencode(name).decode("utf-8")
                except (UnicodeDecodeError, UnicodeEncodeError):
                    return None
                k = exact.get(alt, nfc.get(unicodedata.normalize("NFC", alt)))
            return k

        if class_names is not None:
            unknown = [d.name for d in subdirs if label_of(d.name) is None]
            if unknown:
                raise ValueError(f"class folders {unknown[:5]} of {root} are not among the {len(class_names)} class "
                                 f"names given ({list(class_names)[:5]}{', ...' if len(class_names) > 5 else ''})")
        paths, labels = [], []
        real = [os.path.realpath(d) for d in subdirs]
        seen: dict[str, Path] = {}
        for d, r in zip(subdirs, real):   # a link to another class folder listed its images under both labels
            if r in seen:
                raise ValueError(f"class folders {seen[r].name!r} and {d.name!r} of {root} are one folder ({r}): "
                                 f"each image would be in the pool twice, under two labels; remove the link")
            seen[r] = d
        others, skipped = {os.path.realpath(root), *real}, []
        for d, r in zip(subdirs, real):
            files = _image_files(d, others, skipped, elsewhere=[o for o in real if o != r])
            if not files:
                raise ValueError(f"class folder {d} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            paths += [str(p) for p in files]
            labels += [label_of(d.name)] * len(files)
        _warn_unread(root, skipped)
        return paths, labels, names
    if subdirs:
        # images at the top make the whole pool flat: likely a stray file in a class-folder pool
        mixed = (f"{root} has subfolders ({_some(d.name for d in subdirs)}) and {len(top_files)} image(s) "
                 f"at its top ({_some(p.name for p in top_files)}), so it is read as one flat, unlabelled pool")
        if class_names is not None:
            raise ValueError(f"class names were given, but {mixed}: move those images into class folders")
        log.warning("%s; to label it by class folder, move those images into class folders", mixed)
    skipped: list[str] = []
    files = _image_files(root, skipped=skipped)
    if not files:
        raise ValueError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    _warn_unread(root, skipped)
    # unlabelled, but the classifier's class names still name its predictions (as an
    # unlabelled .npz takes them); refusing them left the report with bare class numbers
    return [str(p) for p in files], [-1] * len(files), list(class_names) if class_names is not None else None


def select_indices(n: int, *, start: int = 0, shard_id: int = 0, num_shards: int = 1,
                   indices=None) -> np.ndarray:
    """Pool indices one loader call streams, in order: ``indices`` if given, else
    ``start..n-1``; then this shard's share, every ``num_shards``-th from ``shard_id``
    (shards are disjoint and together cover the selection exactly once).  Both loaders
    use this, so a torch and a DALI run shard identically."""
    # whole numbers only: a start of 2.5 was truncated to 2 without a word, a float
    # shard_id / num_shards failed as a "slice indices must be integers" naming neither
    for what, v in (("start", start), ("shard_id", shard_id), ("num_shards", num_shards)):
        if not isinstance(v, numbers.Integral):
            raise TypeError(f"{what} must be an integer, got {v!r}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id}")
    if indices is None:
        if not 0 <= start <= n:
            raise ValueError(f"start must be in [0, {n}], got {start}")
        sel = np.arange(start, n, dtype=np.int64)
    else:
        sel = pool_indices(indices, n)
    return sel[shard_id::num_shards]


# control characters in a name as escapes: a newline in a file name broke the warning into
# lines that read as more log lines
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(32), 127)}


def warn_unreadable(path: str | os.PathLike, reason: str) -> None:
    """The loaders' one line for a file they skip, its name as bad_files.json and the report
    spell it (a non-UTF-8 name showed its surrogate escapes, ``q\\udcff.png`` for q\\xff.png),
    control characters escaped."""
    # fspath: the torch loader takes pathlib paths too, and died here on the first bad one
    log.warning("skipping unreadable image %s (%s)", utf8_name(os.fspath(path)).translate(_CONTROL), reason)


def refuse_repeats(sel: np.ndarray) -> None:
    """Raise if pool indices ``sel`` repeat one: each pool item is loaded once per pass (both
    loaders refuse, naming it; the torch loader decoded it twice)."""
    srt = np.sort(sel)
    if (srt[1:] == srt[:-1]).any():
        uniq, first, counts = np.unique(sel, return_index=True, return_counts=True)
        rep = int(uniq[np.argmin(np.where(counts > 1, first, len(sel)))])   # the first repeated, in the given order
        at = np.flatnonzero(sel == rep)
        raise ValueError(f"indices must not repeat (each pool item is loaded once per pass): pool index {rep} is "
                         f"given {len(at)} times (at positions {_some(map(str, at.tolist()), 3)})")


class ImageFolderSource(ImageSource):
    """Lazily decoded image folder.  A file that fails to decode yields a zero image and
    is recorded in ``bad_files`` (index -> reason); loaders report it, runs go on."""
    reads_in_threads = True   # each image its own file, opened and decoded (PIL) by the reading thread

    def __init__(self, root, size: int = 64, channels: int = 3, class_names: list[str] | None = None):
        self.root = str(root)
        # a make-pool cut short holds some classes' images and not others': discover and
        # train ran on it as if it were the whole pool (lazy: make_pool imports this module)
        from ..make_pool import refuse_changed, refuse_unfinished
        made = refuse_unfinished(root)
        self.paths, labels, self.class_names = list_folder(root, class_names)
        refuse_changed(root, made, len(self.paths))
        # an array once: labels() made one from the list on every call, and the store's pixel
        # reads call it per batch (2.3 ms at 100k images: 0.7 s of the 100k bench's pattern rankings)
        self._labels = np.asarray(labels, dtype=np.int64)
        self.spec = PreprocessSpec(size, channels)
        # Python ints: a numpy size (accepted by PreprocessSpec) printed as "np.int64(64)" in the
        # digests, so the same pool got another run id and store fingerprint than with size=64
        self.image_shape = (int(channels), int(size), int(size))
        # the folder's own name (a link to it, or ".", names the same pool): item ids and so
        # the pool's identity start with it; a name that is not UTF-8 as \xNN escapes, as
        # in item_id (its surrogates failed every digest and fingerprint that encodes it)
        self.name = utf8_name(Path(root).resolve().name)
        self.bad_files: dict[int, str] = {}

    def __len__(self):
        return len(self.paths)

    def load(self, i: int) -> tuple[torch.Tensor, bool]:
        image, reason = checked_load_uint8(self.paths[i], self.spec)
        if image is None:
            if i not in self.bad_files:   # once, however often a step re-reads it
                warn_unreadable(self.paths[i], reason)
            self.bad_files[i] = reason
            return torch.zeros(self.image_shape), False
        return image.float().div_(255.0), True

    def __getitem__(self, i):
        # checked as ArraySource's: int() read 1.7 as image 1 and -1 as the last
        i = int(pool_indices([i], len(self), f"index into {self.name}")[0])
        return self.load(i)[0], int(self._labels[i])

    def get_batch(self, indices):
        # checked once for the batch (the base class's int() read a boolean mask as images 0 and 1)
        idx = pool_indices(indices, len(self), f"indices into {self.name}")
        if not len(idx):
            return torch.zeros((0,) + self.image_shape), torch.zeros(0, dtype=torch.int64)
        return torch.stack([self.load(i)[0] for i in idx.tolist()]), torch.as_tensor(self._labels[idx])

    def item_id(self, i):
        # relative to the root, so the pool's identity (run id, store fingerprint) does not
        # depend on how its path is spelled or where it is mounted (nodes may differ)
        return utf8_name(f"{self.name}/{Path(self.paths[i]).relative_to(self.root).as_posix()}")

    def labels(self):
        return self._labels.copy()
