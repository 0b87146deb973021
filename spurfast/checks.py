"""Argument checks shared across the package's layers, so that one rule reads the same
wherever it is applied.  It imports nothing of spurfast's: the data loaders (lowest) and the
embedding pass and pipeline (above them) all import it."""
from __future__ import annotations

import numbers


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
