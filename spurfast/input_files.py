"""The files a run is given besides its models: the pool (an image folder or an .npz
`spurfast plant` writes), the classifier's class names, the suspect samples' indices, and a
clean set labelled as the pool is.  Light (numpy only; the sources are imported when used):
the CLI reads them before any heavy import."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np


def _npz_class_names(arr: np.ndarray) -> list[str]:
    """An .npz's 'class_names': one name per entry of a 1-D array.  str() of a bytes name
    (an 'S' array) was "b'cat'", a 2-D array became one name, a 0-d one a TypeError."""
    if arr.ndim != 1:
        raise ValueError(f"its 'class_names' array has shape {arr.shape}; expected one name per class (1-D)")
    return [s.decode("utf-8", "surrogateescape") if isinstance(s, bytes) else str(s) for s in arr.tolist()]


def _repeated(names: list[str]) -> list[str]:
    """The names that occur more than once, sorted.  Counted once each: names.count(n) per
    name took 29 s for ImageNet-21k's 21,841 classes, and discover reads the file thrice."""
    from collections import Counter
    return sorted(n for n, c in Counter(names).items() if c > 1)


def need_file(p: Path, what: str) -> None:
    """``p`` must be a regular file: a folder (or a pipe, e.g. <(...)) was said not to exist."""
    if p.is_file():
        return
    if p.is_dir():
        raise IsADirectoryError(f"{what} {p} is a folder; expected a file")
    if p.exists():
        raise ValueError(f"{what} {p} is not a regular file (a pipe or a device); expected a file")
    raise FileNotFoundError(f"{what} {p} does not exist")


def load_npz_source(path):
    """A pool/training .npz written by `spurfast plant` (images, labels, optional suspect/carries)."""
    import tokenize
    import zipfile
    import zlib

    from .data.sources import ArraySource
    p = Path(path)
    need_file(p, "data file")
    expected = "expected an .npz archive (numpy.savez) with an 'images' array, as `spurfast plant` writes"
    with open(p, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":  # an .npz is a zip file; numpy's own error talks about pickles
            raise ValueError(f"{p} is not an .npz file (no zip header); {expected}")
    try:
        d = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{p} is not a readable .npz file ({exc.__class__.__name__}: {str(exc)[:120]}); "
                         f"{expected}") from None
    if "images" not in d:
        keys = list(d.keys())   # a zip of images is a "readable .npz" of one key per file: name a few
        raise ValueError(f"{p} has no 'images' array (keys: {keys[:10]}"
                         + (f" and {len(keys) - 10} more" if len(keys) > 10 else "") + f"); {expected}")
    try:
        names = _npz_class_names(d["class_names"]) if "class_names" in d and d["class_names"].size else None
        dup = _repeated(names or [])
        if dup:   # as in a --class-names file: a clean folder matched by name got one of two labels
            raise ValueError(f"its class_names name {dup[0]!r} more than once ({len(dup)} duplicate name(s)); "
                             f"each class needs a different name")
        # ArraySource's own errors (layout, value range, label count) do not know the file
        src = ArraySource(d["images"], d["labels"] if "labels" in d else None, class_names=names, name=p.stem)
        extra = {k: d[k] for k in ("suspect", "carries") if k in d}
    except (ValueError, OSError, zipfile.BadZipFile, zlib.error) as exc:   # zlib: a damaged member, else
        msg = str(exc).removeprefix(f"{p.stem}: ")                         # a traceback naming no file
        raise ValueError(f"{p}: {msg}") from None
    except (tokenize.TokenError, SyntaxError) as exc:   # numpy parses a member's header as Python: a damaged
        raise ValueError(f"{p} is not a readable .npz file (a damaged array header: "   # one was a traceback
                         f"{exc.__class__.__name__}: {str(exc)[:120]}); {expected}") from None
    src.path = str(p)  # lets --overwrite refuse to delete a directory holding it
    return src, extra


def read_class_names(path) -> list[str]:
    """--class-names: one class name a line, in the classifier's label order."""
    p = Path(path)
    need_file(p, "class-names file")
    # utf-8-sig: a byte-order mark (Windows editors) stuck to the first name, which then matched no folder
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:   # its message names no file
        raise ValueError(f"class-names file {p} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                         f"save it as UTF-8") from None
    # line breaks only: str.splitlines also splits at a form feed, \x1c-\x1e, \x85 and U+2028 inside a
    # name, which then counted as two classes and shifted every later class's name
    names = [line.strip() for line in re.split(r"\r\n|\r|\n", text) if line.strip()]
    if not names:
        raise ValueError(f"class-names file {p} is empty; expected one class name a line, in the classifier's "
                         f"label order")
    dup = _repeated(names)
    if dup:
        raise ValueError(f"class-names file {p} names {dup[0]!r} more than once ({len(dup)} duplicate name(s)); "
                         f"each line must name a different class")
    return names


def load_pool(path, size: int, channels: int, class_names=None):
    """An image folder or an .npz.  ``class_names``: a --class-names file; a labelled folder
    takes each class folder's label from its name's place in it (not from sorted order),
    an .npz (numeric labels already) takes the names only when it holds none."""
    names = read_class_names(class_names) if class_names else None
    p = Path(path)
    if p.is_dir():
        from .data.folder import ImageFolderSource
        return ImageFolderSource(p, size=size, channels=channels, class_names=names), {}
    src, extra = load_npz_source(p)
    if names is not None and src.class_names is None:
        top = int(src.labels().max(initial=-1))
        if top >= len(names):
            raise ValueError(f"{p} has label {top}, but class-names file {class_names} names {len(names)} classes")
        src.class_names = names
    return src, extra


def same_classes(clean, pool, clean_path, pool_path):
    """``clean`` labelled as ``pool`` is: each side named its classes alone (folders in
    sorted order), so pool folders cat/dog/fish and clean folders bird/cat/dog both read
    0, 1, 2 and confirmation compared the wrong classes without a word.  A clean folder is
    relabelled by the pool's names (matched by name); an .npz with other names is refused."""
    if not (pool.class_names and clean.class_names) or list(clean.class_names) == list(pool.class_names):
        return clean
    if Path(clean_path).is_dir():
        from .data.folder import ImageFolderSource
        try:
            return ImageFolderSource(clean_path, size=clean.spec.size, channels=clean.spec.channels,
                                     class_names=list(pool.class_names))
        except ValueError as exc:   # "... not among the N class names given": none were, they are the pool's
            if "class names given" not in str(exc):
                raise
            why = str(exc).replace("class names given", f"class names of pool {pool_path}")
            raise ValueError(f"clean set {clean_path}: {why}; a clean folder is labelled by the pool's class "
                             f"names") from None
    raise ValueError(f"clean set {clean_path} names its classes {list(clean.class_names)[:5]}, pool {pool_path} "
                     f"{list(pool.class_names)[:5]}: their labels would not mean the same classes; give both the "
                     f"classifier's class names in label order")


def load_suspect(path, n: int, pool_name) -> np.ndarray:
    """Boolean (n,) mask from a text file of pool indices; refuses indices outside [0, n)
    and repeated ones."""
    p = Path(path)
    need_file(p, "suspect file")
    try:
        with warnings.catch_warnings():   # numpy's "input contained no data": refused below, by name
            warnings.filterwarnings("ignore", "loadtxt: input contained no data", UserWarning)
            # utf-8-sig: a byte-order mark (Windows editors) made the first index "\ufeff1", refused
            idx = np.loadtxt(p, dtype=np.int64, ndmin=2, encoding="utf-8-sig")
    except ValueError as exc:
        raise ValueError(f"suspect file {p} must hold integer pool indices, one per line: {exc}") from None
    if idx.shape[1] > 1:   # "index label" lines: flattened, the labels became suspect indices
        raise ValueError(f"suspect file {p} has {idx.shape[1]} columns; expected one pool index a line")
    idx = idx.reshape(-1)
    if idx.size == 0:
        # an empty (or all-comment) file ran as "no image is suspect": it replaced a pool .npz's own
        # suspect array, and the training-support test then ran with no suspects, all said only in a
        # numpy warning; a file given on purpose almost certainly lost its contents
        raise ValueError(f"suspect file {p} lists no pool indices; expected the suspect samples' pool indices, one "
                         f"per line (leave out --suspect to run without suspect samples)")
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.size:  # a negative index would silently count from the end
        raise ValueError(f"suspect file {p} holds index {int(bad[0])} ({bad.size} out of range in all); "
                         f"pool {pool_name} has {n} images, so indices must lie in [0, {n - 1}]")
    uniq, counts = np.unique(idx, return_counts=True)
    if (counts > 1).any():
        # a 0/1 mask saved one value a line read as the indices {0, 1}: two suspects, silently
        rep = int(np.argmax(counts > 1))
        mask = " (a 0/1 mask, one value per image? list the pool indices of its 1s instead)" \
            if set(uniq.tolist()) <= {0, 1} else ""
        raise ValueError(f"suspect file {p} lists pool index {int(uniq[rep])} {int(counts[rep])} times "
                         f"({int((counts > 1).sum())} index(es) repeated in all); it lists each suspect sample's "
                         f"pool index once, one per line{mask}")
    suspect = np.zeros(n, bool)
    suspect[idx] = True
    return suspect
