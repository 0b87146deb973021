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


# triton's names of the torch dtypes the kernels take, for ahead-of-time signatures
TYPE_NAMES = {torch.uint8: "u8", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_for_target(fn, signature: dict, constants: dict, capability: int, num_warps: int, num_stages: int):
    """triton's CompiledKernel of ``fn`` for a CUDA GPU of this compute capability (e.g. 90),
    compiled ahead of time with neither a GPU nor the interpreter: ``signature`` gives the
    runtime arguments' triton types, ``constants`` the constexpr arguments' values.  Its
    ``.asm["cubin"]`` holds the machine code (tests read its register use and spills)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature, **{name: "constexpr" for name in constants})
    return triton.compile(ASTSource(fn, sig, constants), target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})
