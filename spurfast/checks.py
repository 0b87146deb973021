"""Argument checks shared across the package's layers, so that one rule reads the same
wherever it is applied.  It imports nothing of spurfast's: the data loaders (lowest) and the
embedding pass, pipeline and config dataclasses (above them) all import it."""
from __future__ import annotations

import json
import numbers
import operator
import os
from pathlib import Path

import numpy as np


SOURCE_HINT = "wrap arrays in spurfast.ArraySource(images, labels), a folder in spurfast.ImageFolderSource(path)"
CLASSIFIER_HINT = "load a file with spurfast.load_classifier(path)"
VAE_HINT = "load a file with spurfast.load_vae(path), or train one with spurfast.train_vae"
STORE_HINT = "open a folder with spurfast.EmbeddingStore(path)"


def check_arguments(where: str, *specs) -> None:
    """Refuse, by argument, an object of the wrong kind: each spec is (name, value, types,
    what is expected, how to get one).  A path where a model is expected, an array where a
    source is, a dict where a config is failed as a bare AttributeError deep in the step."""
    for name, value, want, kind, hint in specs:
        if not isinstance(value, want):
            raise TypeError(f"{where}: {name} must be {kind}, got {type(value).__name__} ({hint})")


def check_not_a_path(where: str, name: str, value, hint: str) -> None:
    """Refuse a path (str or PathLike) given for an object that is opened from one."""
    if isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{where}: {name} must be an open object, got the path {value!r} ({hint})")


def check_default_dtype(where: str) -> None:
    """Refuse to run while torch's default dtype is not float32: spurfast's models and tensors
    are float32, and under ``torch.set_default_dtype(torch.float64)`` models were built in
    float64 and a run failed late (after the whole embedding pass) with torch's "self (Double)
    and source (Float) must have the same scalar type"."""
    import torch

    if torch.get_default_dtype() != torch.float32:
        raise TypeError(f"{where}: torch's default dtype is {torch.get_default_dtype()} (torch.set_default_dtype); "
                        f"spurfast computes in float32: call torch.set_default_dtype(torch.float32) before it, "
                        f"and set yours again after")


def check_whole(value, name: str, *, not_integer: type[Exception] = ValueError) -> None:
    """Raise unless ``value`` is an integer >= 1 (a numpy one too; not a bool, not 2.0), saying
    "``name`` must be an integer >= 1, got ``value``".

    A value below 1 raises ValueError.  One that is no integer raises ``not_integer``: the
    loaders raise TypeError there, the embedding pass and the pipeline ValueError, as each did
    before they shared this check (callers may catch either)."""
    # bool is an Integral: batch_size=True ran batches of 1 in the loaders
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise not_integer(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def whole_number(value, name: str) -> int:
    """``value`` as a Python int where it is a whole number (an int, a numpy integer, or a
    float such as 8.0), else ValueError "``name`` must be an integer, got ``value``" (a bool
    too).  The config dataclasses take their counts through it: numpy numbers failed the JSON
    of findings.json after the run, and a fractional count ran as another (k=4.5 as 4)."""
    whole = isinstance(value, (int, np.integer)) or (isinstance(value, (float, np.floating))
                                                      and float(value).is_integer())
    # a 0-d integer tensor too (labels.max() + 1 of torch labels), as operator.index takes it
    tensor = type(value).__name__ == "Tensor" and getattr(value, "ndim", None) == 0 \
        and "int" in str(getattr(value, "dtype", ""))
    if isinstance(value, (bool, np.bool_)) or not (whole or tensor):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return operator.index(value) if tensor else int(value)


def real_number(value, name: str) -> float:
    """``value`` as a Python float where it is a number (not a bool, not a string), else
    ValueError "``name`` must be a number, got ``value``"."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def check_compute_device(device, name: str, advice: str = "use 'cpu' or a CUDA device torch sees") -> None:
    """Raise ValueError ("``name``: torch cannot compute there (why); ``advice``") unless torch
    can compute on ``device`` and copy a result out: a GPU that is not here failed at
    training, and 'meta' (no data) failed after the models moved there, both after
    --overwrite had deleted the old run."""
    import torch   # here, not at the top: the loaders import this module without needing torch's start-up

    try:
        torch.zeros(1, device=device).cpu()
    except Exception as exc:   # RuntimeError (no driver, meta), AssertionError (torch without CUDA), ...
        raise ValueError(f"{name}: torch cannot compute there ({exc.__class__.__name__}: {str(exc)[:120]}); "
                         f"{advice}") from None


def folder_blocker(path) -> Path | None:
    """The first of ``path`` and its parents that is a file, or a link to nothing, where a
    folder must be: mkdir failed there as "[Errno 17] File exists" or "[Errno 20] Not a
    directory", which say neither."""
    path = Path(path)
    return next((q for q in (path, *path.parents) if (q.is_symlink() and not q.exists())
                 or (q.exists() and not q.is_dir())), None)


def not_a_folder(name: str, out: Path, blocker: Path) -> str:
    """What `folder_blocker` found in the way of ``name`` (a flag or argument) ``out``."""
    if blocker.is_symlink() and not blocker.exists():
        return f"{name} {out}: {blocker} is a link to {os.readlink(blocker)!r}, which does not exist"
    return f"{name} {out}: {blocker} is a file, not a folder"


def check_file_target(out, name: str, what: str) -> Path:
    """``out`` as a file to write (``what``) later in a long run: refused now if it is a folder,
    and its folder created and tried with a temporary file.  An unwritable folder failed at
    the first checkpoint, after an epoch, naming a temporary file; a folder given as the
    checkpoint was moved aside as an "unreadable checkpoint" and a file put in its place."""
    import tempfile

    spelled = os.fspath(out)   # Path("ckpt/") drops the "/" that says a folder is meant
    out = Path(out)
    if out.is_dir() or os.path.basename(spelled) in ("", ".", ".."):
        raise IsADirectoryError(f"{name} {spelled} names a folder; expected the path of {what}")
    blocker = folder_blocker(out.parent)
    if blocker is not None:
        raise NotADirectoryError(not_a_folder(name, out, blocker))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as exc:
        raise PermissionError(f"{name} {out}: cannot write in folder {out.parent} ({exc.strerror or exc}); "
                              f"choose a writable place for {what}") from None
    return out


def suspect_mask(suspect, n: int, pool_name: str) -> np.ndarray:
    """``suspect`` (one entry per pool image, True/False or 0/1; None: no image) as a bool
    array.  A plain cast counted NaN and 0.5 as suspect, and pool indices as a mask."""
    if suspect is None:
        return np.zeros(n, bool)
    values = np.asarray(suspect)
    if values.shape != (n,):   # an (n, 1) column broadcast into (n, K, 1) neighbour masks
        raise ValueError(f"suspect mask has shape {values.shape}, expected ({n},): one entry per image of the "
                         f"pool ({pool_name})")
    if values.dtype != bool:
        bad = np.nonzero(~np.isin(values, (0, 1)))[0] if values.dtype.kind in "iuf" else np.arange(n)
        if len(bad):
            raise ValueError(f"suspect mask must hold True/False (or 0/1); {len(bad)} entries do not, e.g. "
                             f"suspect[{int(bad[0])}] = {values[bad[0]]!r} (pool {pool_name})")
    return values.astype(bool)


def check_extra_config(extra_config) -> None:
    """Entries recorded in findings.json's ``config`` must be strict JSON: an np.int64 failed
    at the end of a run naming nothing, and NaN made the file one strict parsers refuse."""
    for key, value in (extra_config or {}).items():
        try:
            json.dumps({key: value}, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"extra_config[{key!r}]: {exc}; it is recorded in findings.json, so it must be JSON "
                             f"(str, int, float but not NaN or inf, bool, None, and lists and dicts of them)") from None


def json_document(text: str):
    """``json.loads(text)``, with a document nested deeper than Python's parser goes (a
    crafted file; spurfast writes nothing that deep) raised as the ValueError every reader of
    spurfast's own files already turns into a message naming the file, not a RecursionError
    traceback."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested deeper than the JSON reader goes") from None
