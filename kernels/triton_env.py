"""The optional Triton import and the interpreter switch, shared by the Triton kernels.

triton is optional: the registry asks each kernel module's ``is_available()`` before
using it.  Under ``TRITON_INTERPRET=1`` (set before the first kernel module is
imported: ``@triton.jit`` decides at decoration time) the kernels run on CPU tensors,
which the tests use on machines without a GPU.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    TRITON_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    TRITON_ERROR = exc


def _interpret_mode() -> bool:
    try:
        return bool(triton.knobs.runtime.interpret)  # triton >= 3.4 parses TRITON_INTERPRET here
    except Exception:
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


INTERPRET = _interpret_mode() if triton is not None else False


def availability(module: str, interpret: bool) -> tuple[bool, str]:
    """(True, "") when a Triton kernel module can run here: a CUDA device, or the
    interpreter; else (False, why)."""
    if TRITON_ERROR is not None:
        return False, f"cannot import triton: {TRITON_ERROR.__class__.__name__}: {TRITON_ERROR}"
    if interpret or torch.cuda.is_available():
        return True, ""
    return False, f"no CUDA device and TRITON_INTERPRET=1 was not set before {module} was imported"
