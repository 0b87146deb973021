"""The one interface every pool or training set implements.

An ImageSource has a length, ``source[i] -> (image, label)`` with image a float32
(C, H, W) tensor in [0, 1] and label an int (-1 when unknown), ``item_id(i)`` a stable
string id, and ``get_batch(indices)`` (override for speed).  Pool indices elsewhere in
spurfast are positions in a source's enumeration order.
"""
from __future__ import annotations

import hashlib
import numbers
import os
from typing import Sequence

import numpy as np
import torch


class ImageSource:
    """What spurfast reads images from: ``len(source)`` images of ``image_shape`` (C, H, W),
    ``source[i]`` -> (image tensor, label; -1 where unknown), ``get_batch(indices)`` ->
    (float images (B, C, H, W) in [0, 1], int64 labels), ``labels()`` all at once,
    ``item_id(i)`` a stable name of image i, ``class_names`` (or None) and ``name``;
    ``reads_in_threads``: whether ``get_batch`` may run in several threads at once.
    Subclass it for a source of your own;
    `ArraySource` (tensors in memory), `ImageFolderSource` (a folder of JPEG/PNG files),
    `SubsetSource` and `ConcatSource` are spurfast's."""
    image_shape: tuple[int, int, int]
    class_names: list[str] | None = None
    name: str = "source"
    # get_batch may be called from several threads at once (steps that work per finding then
    # read several findings' images in parallel); a source of your own says so by setting it
    reads_in_threads: bool = False

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def item_id(self, i: int) -> str:
        return f"{self.name}:{i}"

    def labels(self) -> np.ndarray:
        return np.array([self[i][1] for i in range(len(self))], dtype=np.int64)

    def get_batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self[int(i)] for i in indices]
        if not items:
            return torch.zeros((0,) + tuple(self.image_shape)), torch.zeros(0, dtype=torch.int64)
        return torch.stack([im for im, _ in items]), torch.tensor([lb for _, lb in items], dtype=torch.int64)


def content_digest(source: ImageSource) -> str:
    """An identity of what a source holds, so a pool regenerated or edited in place (same
    names, other images) is told apart: :func:`sampled_digest`, plus every image's bytes
    for sources held in memory, or every file's size for sources read from files (a
    replaced file almost always changes size; one stat per file, and the same on every
    machine, as mtimes are not)."""
    h = hashlib.sha256(sampled_digest(source).encode())
    paths, images = getattr(source, "paths", None), getattr(source, "images", None)
    if paths is not None:
        h.update(np.fromiter((_file_size(p) for p in paths), np.int64, len(paths)).tobytes())
    elif isinstance(images, torch.Tensor):
        h.update(images.detach().cpu().contiguous().numpy())   # hashed in place, no copy
    for part in getattr(source, "parts", None) or []:
        h.update(content_digest(part).encode())
    base = getattr(source, "base", None)
    if base is not None:
        h.update(content_digest(base).encode())
    if getattr(source, "indices", None) is not None:   # a subset; a re-reading wrapper has none
        h.update(np.asarray(source.indices, np.int64).tobytes())
    return h.hexdigest()[:16]


def _file_size(path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def sampled_digest(source: ImageSource, n_samples: int = 8) -> str:
    """Name, length, image shape, and the ids and contents of ``n_samples`` items spread
    evenly over the source (the whole content digest before the eleventh session: stores
    and runs made then carry it).  Sources read from files (``paths``) hash the sampled
    files' bytes, the same on every machine whatever decodes them; others hash the
    sampled images."""
    n = len(source)
    # surrogateescape: names and ids of any source read from non-UTF-8 file names hash as bytes
    h = hashlib.sha256(f"{source.name}:{n}:{tuple(source.image_shape)}".encode("utf-8", "surrogateescape"))
    idx = np.unique(np.linspace(0, n - 1, min(n, n_samples)).round().astype(np.int64)) if n else np.zeros(0, np.int64)
    paths = getattr(source, "paths", None)
    for i in idx:
        h.update(source.item_id(int(i)).encode("utf-8", "surrogateescape"))
        if paths is not None:
            try:
                with open(paths[int(i)], "rb") as fh:   # in pieces: a 2 GB file was read whole
                    for piece in iter(lambda: fh.read(1 << 20), b""):
                        h.update(piece)
            except OSError as exc:   # an unreadable file is part of what the pool holds
                h.update(f"unreadable: {exc.__class__.__name__}".encode())
    if len(idx) and paths is None:
        h.update(source.get_batch(idx)[0].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def utf8_name(name: str) -> str:
    """``name``, or, if it is not UTF-8 (a file name decoded with surrogate escapes), the
    same with each undecodable byte written as a \\xNN escape: names are hashed and
    written as text."""
    try:
        name.encode()
        return name
    except UnicodeEncodeError:
        try:
            return os.fsencode(name).decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:   # a lone surrogate no file name decodes to
            return name.encode("utf-8", "backslashreplace").decode()


def to_float_images(images, name: str | None = None) -> torch.Tensor:
    """(N,H,W) or (N,C,H,W) uint8/float array -> float32 (N,C,H,W) in [0, 1].  ``name``
    (the source) prefixes error messages."""
    where = f"{name}: " if name else ""
    expected = "expected uint8 (0..255) or floats in [0, 1]"
    if not isinstance(images, torch.Tensor):
        arr = np.asarray(images)
        if arr.dtype.kind not in "buif":  # strings, objects, complex: torch's errors name neither
            raise ValueError(f"{where}images have dtype {arr.dtype}; {expected}")
        if not arr.dtype.isnative:  # big-endian (an .npz from FITS data, say): torch refuses the byte order
            arr = arr.astype(arr.dtype.newbyteorder("="))
        if arr.dtype.kind == "f" and arr.dtype.itemsize > 8:  # long double: torch has no such type
            arr = arr.astype(np.float64)
        # torch takes neither read-only arrays nor negative strides (a flipped view such as
        # images[:, ::-1], BGR -> RGB): copy those
        t = torch.from_numpy(arr if arr.flags.writeable and min(arr.strides, default=0) >= 0 else arr.copy())
    else:
        t = images.detach()   # pool images are data: a tensor that requires grad is still one
    if t.is_complex():  # .float() would keep the real part with only a warning
        raise ValueError(f"{where}images have dtype {t.dtype}; {expected}")
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if t.dim() != 4:
        raise ValueError(f"{where}images must be (N,H,W) or (N,C,H,W), got shape {tuple(t.shape)}")
    if t.shape[1] not in (1, 3) and t.shape[-1] in (1, 2, 3, 4):
        # channels-last (N,H,W,C), grey + alpha (PIL's "LA") and RGBA included, would otherwise be
        # read as H channels of W x C images
        raise ValueError(f"{where}images have shape {tuple(t.shape)}, which looks like (N,H,W,C); expected "
                         f"(N,C,H,W) or (N,H,W): transpose them, e.g. images.transpose(0, 3, 1, 2)")
    if 0 in t.shape[1:]:
        raise ValueError(f"{where}images have shape {tuple(t.shape)}; channels, height and width must be >= 1")
    if t.dtype == torch.uint8:
        return t.float().div_(255.0)
    kind = "float" if t.is_floating_point() else str(t.dtype).removeprefix("torch.")
    t = t.float()
    if t.numel() and (float(t.min()) < 0.0 or float(t.max()) > 1.0):
        # .9g: every float32 digit (.3g named a max of 1.0000001 "1": "must lie in [0, 1]; got [0.5, 1]")
        raise ValueError(f"{where}{kind} images must lie in [0, 1]; got range [{float(t.min()):.9g}, "
                         f"{float(t.max()):.9g}] (uint8 images may span 0..255)")
    return t


def _int_labels(labels, name: str) -> np.ndarray:
    """Labels as int64; floats only when they are whole numbers (a cast would truncate
    soft or fractional labels into ones nobody wrote)."""
    lab = np.asarray(labels).reshape(-1)
    given = lab.dtype
    if lab.dtype.kind == "O" and lab.size and all(isinstance(x, numbers.Integral) and not isinstance(x, bool)
                                                  for x in lab):
        lo, hi = min(lab), max(lab)   # Python ints past int64: as floats they passed, cast to -2**63
        if lo < -2**63 or hi >= 2**63:
            raise ValueError(f"{name}: labels must fit in int64, got range [{lo}, {hi}]")
        lab = lab.astype(np.int64)
    if lab.dtype.kind == "O":  # Python objects (a pandas column): numbers are checked as floats below
        try:
            lab = lab.astype(np.float64)   # None -> nan, refused below
        except (TypeError, ValueError):
            pass
    whole = lab.dtype.kind in "iub" or (lab.dtype.kind == "f" and bool(np.all(np.isfinite(lab)))
                                        and np.array_equal(lab, np.round(lab)))
    if not whole:
        odd = lab[~np.isfinite(lab) | (lab != np.round(lab))] if lab.dtype.kind == "f" else lab
        eg = f" (e.g. {odd.tolist()[0]!r})" if odd.size else ""   # tolist: objects have no .item()
        raise ValueError(f"{name}: labels must be integers, got dtype {given}{eg}")
    # the cast wrapped uint64 2**64-1 to -1 (read as unlabelled) and a float 1e30 to -2**63
    if lab.size and lab.dtype.kind in "uf" and (lab.max() >= 2**63 or lab.min() < -2**63):
        raise ValueError(f"{name}: labels must fit in int64, got range [{lab.min()}, {lab.max()}]")
    return lab.astype(np.int64)


def pool_indices(indices, n: int, what: str = "indices") -> np.ndarray:
    """``indices`` as a flat int64 array of positions in a source of ``n`` items; raises
    on anything else (a cast would read a boolean mask as indices 0 and 1, truncate 2.7
    to 2, and count a negative index from the end)."""
    try:
        raw = np.asarray(indices)
    except (TypeError, ValueError) as e:   # ragged nesting: numpy's message named no input
        raise ValueError(f"{what} must be a flat sequence of integer pool indices: {e}") from None
    if raw.dtype.kind == "O" and all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in raw.flat):
        # Python ints past int64 (numpy keeps them as objects): range-checked as given,
        # where the cast raised numpy's bare "Python int too large to convert to C long"
        if raw.size and (min(raw.flat) < 0 or max(raw.flat) >= n):
            raise IndexError(f"{what} must lie in [0, {n}); got range [{min(raw.flat)}, {max(raw.flat)}]")
        raw = raw.astype(np.int64)
    if raw.size and raw.dtype.kind not in "biuf":   # a cast would read "1" as index 1
        raise ValueError(f"{what} must be integer pool indices, got dtype {raw.dtype}")
    if raw.size and (raw.dtype.kind == "b" or (raw.dtype.kind == "f" and not np.array_equal(raw, np.round(raw)))):
        hint = ": a boolean mask, pass np.flatnonzero(mask)" if raw.dtype.kind == "b" else ""
        raise ValueError(f"{what} must be integer pool indices, got dtype {raw.dtype}{hint}")
    # the range as given: an inf, 1e30 or uint64 2**63 was named as -2**63, its int64 cast
    if raw.size and raw.dtype.kind in "iuf" and (raw.min() < 0 or raw.max() >= n):
        raise IndexError(f"{what} must lie in [0, {n}); got range [{raw.min()}, {raw.max()}]")
    sel = raw.astype(np.int64).reshape(-1)
    if sel.size and (sel.min() < 0 or sel.max() >= n):
        raise IndexError(f"{what} must lie in [0, {n}); got range [{sel.min()}, {sel.max()}]")
    return sel


def _text(x) -> str:
    """``x`` as text: bytes decoded as UTF-8 (a byte that is not UTF-8 as a \\xNN escape, as
    :func:`utf8_name` writes file names), anything else through ``str``."""
    return utf8_name(bytes(x).decode("utf-8", "surrogateescape")) if isinstance(x, bytes) else str(x)


class ArraySource(ImageSource):
    """In-memory images (numpy array or tensor) with optional labels and ids."""

    def __init__(self, images, labels=None, ids: Sequence[str] | None = None,
                 class_names: Sequence[str] | None = None, name: str = "array"):
        self.images = to_float_images(images, name).contiguous()
        n = len(self.images)
        if labels is None:
            self._labels = np.full(n, -1, dtype=np.int64)
        else:
            self._labels = _int_labels(labels, name)
            if len(self._labels) != n:
                raise ValueError(f"{name}: {len(self._labels)} labels for {n} images")
        if ids is not None and len(ids) != n:
            raise ValueError(f"{name}: {len(ids)} ids for {n} images")
        if not bool(torch.isfinite(self.images).all()):
            raise ValueError(f"{name}: images contain NaN or inf")
        # str: ids are hashed and written as text (integer ids, e.g. dataset positions,
        # crashed every fingerprint: "'numpy.int64' object has no attribute 'encode'");
        # bytes (an .npz's S-dtype array) decoded, not written as "b'img1.jpg'"
        self.ids = [_text(x) for x in ids] if ids is not None else None
        self.class_names = [_text(c) if isinstance(c, bytes) else c for c in class_names] \
            if class_names is not None else None
        self.name = utf8_name(name)   # an .npz's file name (`spurfast discover --pool`) may not be UTF-8
        self.image_shape = tuple(self.images.shape[1:])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self._labels[i])

    def item_id(self, i):
        return self.ids[i] if self.ids is not None else f"{self.name}:{i}"

    def labels(self):
        return self._labels.copy()

    reads_in_threads = True   # indexing tensors it never changes

    def get_batch(self, indices):
        # checked: a cast read 1.5 as image 1 and -1 as the last
        idx = pool_indices(indices, len(self), f"indices into {self.name}")
        return self.images[torch.as_tensor(idx)], torch.as_tensor(self._labels[idx])


class SubsetSource(ImageSource):
    """The images of ``base`` at ``indices`` (pool indices into it), in that order, under
    ``base``'s item ids, labels and class names."""

    def __init__(self, base: ImageSource, indices: Sequence[int], name: str | None = None):
        if not isinstance(base, ImageSource):   # an array failed later with AttributeError 'name'
            raise TypeError(f"SubsetSource takes an ImageSource (e.g. ArraySource(images, labels)), got a "
                            f"{type(base).__name__}")
        self.base = base
        # checked: a boolean mask, fractional or negative indices were cast or wrapped round
        # into other images (a negative one with the id of no pool item)
        self.indices = pool_indices(indices, len(base), f"SubsetSource indices into {base.name}")
        self.image_shape = base.image_shape
        self.class_names = base.class_names
        self.name = name or base.name

    def __len__(self):
        return len(self.indices)

    @property
    def reads_in_threads(self) -> bool:   # its reads are its base's
        return self.base.reads_in_threads

    def __getitem__(self, i):
        return self.base[int(self.indices[i])]

    def item_id(self, i):
        return self.base.item_id(int(self.indices[i]))

    def labels(self):
        return self.base.labels()[self.indices]

    def get_batch(self, indices):
        return self.base.get_batch(self.indices[pool_indices(indices, len(self), f"indices into {self.name}")])

    @property
    def bad_files(self) -> dict[int, str]:
        """The base's unreadable images so far, by position in this subset (a wrapper
        must pass them on, or a broken file would count as a black image)."""
        base = getattr(self.base, "bad_files", None)
        if not base:
            return {}
        hit = np.isin(self.indices, np.fromiter(base, np.int64, len(base)))
        return {int(i): base[int(self.indices[i])] for i in np.flatnonzero(hit)}


class ConcatSource(ImageSource):
    """``parts`` one after another (one image shape): image i of the whole is image
    i - offset of the part that holds it, under that part's item id."""

    def __init__(self, parts: Sequence[ImageSource], name: str = "concat"):
        if isinstance(parts, ImageSource) or not all(isinstance(p, ImageSource) for p in parts):
            # one source given bare, or arrays: AttributeError 'image_shape' named neither
            raise TypeError("ConcatSource takes a list of ImageSources, e.g. ConcatSource([pool_a, pool_b])")
        if not parts:
            raise ValueError("ConcatSource needs at least one part")
        shapes = {tuple(p.image_shape) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"cannot concatenate sources of different image shapes {sorted(shapes)}")
        # labels are concatenated as they are: parts that name their classes differently (two
        # folders, one lacking a class, each labelled in its own sorted order) would mislabel
        named = [(p.name, list(p.class_names)) for p in parts if p.class_names is not None]
        other = next((pn for pn in named if pn[1] != named[0][1]), None)
        if other is not None:
            raise ValueError(f"cannot concatenate sources whose labels mean different classes: {named[0][0]} names "
                             f"{named[0][1][:5]}, {other[0]} {other[1][:5]}; give every part the same class_names "
                             f"(for folders: class_names=, matched by folder name)")
        self.parts = list(parts)
        self.image_shape = parts[0].image_shape
        self.class_names = named[0][1] if named else None
        self.name = name
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self):
        return int(self.starts[-1])

    @property
    def reads_in_threads(self) -> bool:   # its reads are its parts'
        return all(p.reads_in_threads for p in self.parts)

    def _locate(self, i):
        p = int(np.searchsorted(self.starts, i, side="right") - 1)
        return p, i - int(self.starts[p])

    def __getitem__(self, i):
        p, j = self._locate(int(pool_indices([i], len(self), f"index into {self.name}")[0]))   # -1 named -11
        return self.parts[p][j]

    def item_id(self, i):
        p, j = self._locate(int(i))
        return self.parts[p].item_id(j)

    def labels(self):
        return np.concatenate([p.labels() for p in self.parts])

    def get_batch(self, indices):
        indices = pool_indices(indices, len(self), f"indices into {self.name}")
        parts = np.searchsorted(self.starts, indices, side="right") - 1
        images = torch.zeros((len(indices),) + tuple(self.image_shape))
        labels = torch.zeros(len(indices), dtype=torch.int64)
        for p in np.unique(parts):
            sel = np.nonzero(parts == p)[0]
            im, lb = self.parts[p].get_batch(indices[sel] - self.starts[p])
            images[torch.as_tensor(sel)] = im
            labels[torch.as_tensor(sel)] = lb
        return images, labels

    @property
    def bad_files(self) -> dict[int, str]:
        """The parts' unreadable images so far, by position in the concatenation."""
        return {int(start) + int(i): r for p, start in zip(self.parts, self.starts)
                for i, r in (getattr(p, "bad_files", None) or {}).items()}
