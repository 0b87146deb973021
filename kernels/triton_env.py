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
    """(True, "") when a Triton kernel module can run here: a CUDA device, or an
    interpreter that runs the kernels' loops (`interpreter_loops`); else (False, why)."""
    if TRITON_ERROR is not None:
        return False, f"cannot import triton: {TRITON_ERROR.__class__.__name__}: {TRITON_ERROR}"
    if torch.cuda.is_available():
        return True, ""
    if interpret:
        ok, why = interpreter_loops()
        return ok, "" if ok else (f"triton {triton.__version__}'s interpreter cannot run {module}'s loops, whose "
                                  f"bounds are computed in the kernel ({why}); triton 3.8's can, and a GPU compiles "
                                  f"them with either")
    return False, f"no CUDA device and TRITON_INTERPRET=1 was not set before {module} was imported"


_LOOPS: tuple[bool, str] | None = None   # interpreter_loops()'s answer, asked once

if triton is not None:

    @triton.jit
    def _loop_probe(n_ptr, out_ptr):
        n = tl.load(n_ptr)
        total = n * 0
        for _ in range(0, n):   # a bound the kernel computed, as the kernels' loops have
            total += 1
        tl.store(out_ptr, total)


def interpreter_loops() -> tuple[bool, str]:
    """(True, "") when the interpreter runs a loop to a bound the kernel computed; else (False,
    why).  triton 3.6's takes such a bound with int() of a one-element array, which numpy 2.4
    refuses ("only 0-dimensional arrays can be converted to Python scalars"): with torch 2.11
    every Triton test failed so on a CPU, where triton 3.8 squeezes the array first."""
    global _LOOPS
    if _LOOPS is None:
        n, out = torch.tensor([3], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
        try:
            _loop_probe[(1,)](n, out)
            _LOOPS = (True, "") if int(out[0]) == 3 else (False, f"a loop of 3 steps ran {int(out[0])}")
        except Exception as exc:   # the interpreter's own error, whatever its type
            _LOOPS = False, (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
    return _LOOPS


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
