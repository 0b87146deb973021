"""Triton grouped k-means assignment; same signature as
``spurfast.kernels.reference.kmeans_assign``, which is its ground truth.

Why a Triton version next to the CUDA C one: ``tl.dot`` lowers to the Hopper warpgroup
MMA (wgmma) with a software-pipelined shared-memory ring, which the hand-written CUDA v2
kernel (``mma.sync``) does not use; on an H200 that kernel reached 74 TFLOP/s at
N=1e6, d=128, k=1024 in fp16, 3.5x slower than flash-kmeans (a Triton kernel).  Measured
there on 2026-12-04 this one took 1.97 ms against the CUDA kernel's 3.54 ms (fp16) and 5.16
against 14.8 ms (fp32), and was level with it at the small and batched problems, so
``auto`` picks it first for CUDA tensors.

Work split
----------
Points are sorted by group (CSR ``offsets``).  One program owns ``BLOCK_M`` rows of one
group; it finds its group by a binary search in the per-group tile prefix, so there is no
host-built tile table and no host sync beyond the argument check.  It walks its group's
``k_g`` centroids ``BLOCK_N`` at a time, each score tile a small GEMM over ``BLOCK_D``-wide
chunks of d (the x chunk re-read from L1/L2 per centroid tile, as a GEMM re-reads A), or,
where ``BLOCK_D >= d``, one product with the x tile loaded once and kept (``X_RESIDENT``):
score = |c|^2 - 2 x.c (L2) or -x.c_hat (cosine: the argmin over c does not depend on |x|,
so x is never normalised), with a running (min, argmin) per row and ties to the lower
index.  The N x k score matrix never leaves registers.  The epilogue computes the
winner's distance directly, sum (x - c)^2 or 1 - x_hat.c_hat in fp32 from the fp32
centroid, so tight clusters far from the origin lose no digits to cancellation.

Precision: fp32 points use three TF32 tensor-core products per tile (``"tf32x3"``, about
fp32 accuracy; ``SPURFAST_TRITON_FP32_PRECISION=ieee`` asks for plain FMA).  fp16/bf16 points use
the tensor cores with the fp32 centroids split into hi + lo parts in the points' dtype
(c ~= hi + lo, the CUDA kernel's scheme): two products per tile, fp32 accumulation, so
the scores stay near fp32 accuracy for the rounded points.  Both accurate modes do 2-3x
the tensor-core work of flash-kmeans, which rounds centroids to fp16 and multiplies fp32
in one TF32 product; ``SPURFAST_TRITON_FP32_PRECISION=tf32`` and
``SPURFAST_TRITON_CENTROID_SPLIT=0`` select that arithmetic (an argmin exact only up to the
rounding of the operands), so the benchmark compares equal work too.

Memory traffic per call (B = bytes per input element): x read from DRAM once (N d B;
again per centroid tile and in the epilogue, from L1/L2), assign + dist written (12 bytes
per point); each program reads its group's centroids (hi and lo: 2 k_g d B, from L2 after
the first program of the group) and k_g |c|^2 floats, and gathers one fp32 centroid row
per point in the epilogue (N d 4 bytes, mostly L2 hits).  FLOPs: 2 N k d (x2 for the
hi/lo split).

Checked without a GPU: it compiles for sm_90 (wgmma for every dtype; FMA for fp32 with
"ieee") and sm_80 with no register spills (test).  On the H200 (triton 3.6) its GPU tests
pass and ``bench kmeans`` / ``bench triton-shapes`` time it against flash-kmeans.
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from .triton_env import INTERPRET as _INTERPRET
from .triton_env import TYPE_NAMES, availability, compile_for_target, tl, triton
from . import reference as ref
from .group_layout import assign_args, centroid_terms, check_real, split_centroids, tile_prefix


def is_available() -> tuple[bool, str]:
    """(True, "") when the kernels can run here: a CUDA device, or the interpreter."""
    return availability(__name__, _INTERPRET)


if triton is not None:

    @triton.jit
    def _assign_kernel(x_ptr, c_ptr, c32_ptr, cterm_ptr, off_ptr, kpg_ptr, tile_first_ptr,
                       assign_ptr, dist_ptr, G, kmax, d, lo_off, search_steps,
                       COSINE: tl.constexpr, SPLIT: tl.constexpr, FP32_PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       X_RESIDENT: tl.constexpr, EPI_D: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        # the group: the largest g with tile_first[g] <= pid (empty groups repeat a value
        # and lose to the next group, which owns the tile).  A spare program (pid past the
        # last tile) lands past the last group's rows: every row masked, no centroid walked.
        lo = pid * 0
        hi = lo + G
        for _ in range(0, search_steps):
            mid = (lo + hi) // 2
            right = tl.load(tile_first_ptr + mid) <= pid
            lo = tl.where(right, mid, lo)
            hi = tl.where(right, hi, mid)
        g = lo
        row0 = tl.load(off_ptr + g) + (pid - tl.load(tile_first_ptr + g)) * BLOCK_M
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < tl.load(off_ptr + g + 1)
        k = tl.where(pid < tl.load(tile_first_ptr + G), tl.load(kpg_ptr + g), 0)
        dcols = tl.arange(0, BLOCK_D)
        # pointer tiles built once and offset by d0 (index math per load spilled registers)
        x_ptrs = x_ptr + rows[:, None] * d + dcols[None, :]
        cbase = g * kmax
        if X_RESIDENT:   # BLOCK_D >= d: the x tile is read once and every centroid tile is one K = d product
            xres = tl.load(x_ptrs, mask=rmask[:, None] & (dcols < d)[None, :], other=0.0)
        best = tl.full((BLOCK_M,), float("inf"), tl.float32)
        barg = tl.zeros((BLOCK_M,), tl.int32)
        for n0 in range(0, k, BLOCK_N):
            cidx = n0 + tl.arange(0, BLOCK_N)
            nmask = cidx < k
            c_ptrs = c_ptr + (cbase + cidx)[:, None] * d + dcols[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            if X_RESIDENT:
                cm = nmask[:, None] & (dcols < d)[None, :]
                ch = tl.load(c_ptrs, mask=cm, other=0.0)
                if SPLIT:   # 16-bit points: hi, then lo (lo_off elements after hi)
                    acc = tl.dot(xres, tl.trans(ch), acc)
                    cl = tl.load(c_ptrs + lo_off, mask=cm, other=0.0)
                    acc = tl.dot(xres, tl.trans(cl), acc)
                else:
                    acc = tl.dot(xres, tl.trans(ch), acc, input_precision=FP32_PRECISION)
            else:
                for d0 in range(0, d, BLOCK_D):
                    dm = (d0 + dcols) < d
                    xc = tl.load(x_ptrs + d0, mask=rmask[:, None] & dm[None, :], other=0.0)
                    cm = nmask[:, None] & dm[None, :]
                    ch = tl.load(c_ptrs + d0, mask=cm, other=0.0)
                    if SPLIT:
                        acc = tl.dot(xc, tl.trans(ch), acc)
                        cl = tl.load(c_ptrs + (lo_off + d0), mask=cm, other=0.0)
                        acc = tl.dot(xc, tl.trans(cl), acc)
                    else:
                        acc = tl.dot(xc, tl.trans(ch), acc, input_precision=FP32_PRECISION)
            if COSINE:
                score = -acc
            else:
                cn = tl.load(cterm_ptr + cbase + cidx, mask=nmask, other=0.0)
                score = cn[None, :] - 2.0 * acc
            score = tl.where(nmask[None, :], score, float("inf"))
            tmin, targ = tl.min(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
            better = tmin < best            # strict: an equal score in a later tile keeps the lower index
            best = tl.where(better, tmin, best)
            barg = tl.where(better, (targ + n0).to(tl.int32), barg)
        # the winner's distance, directly from x and the fp32 centroid, EPI_D columns at a
        # time re-read from L1/L2 (the resident tile in fp32 beside the gathered centroid
        # rows spilled registers at every resident shape)
        ecols = tl.arange(0, EPI_D)
        xe_ptrs = x_ptr + rows[:, None] * d + ecols[None, :]
        w_ptrs = c32_ptr + (cbase + barg)[:, None] * d + ecols[None, :]
        sq = tl.zeros((BLOCK_M,), tl.float32)
        xx = tl.zeros((BLOCK_M,), tl.float32)
        for d0 in range(0, d, EPI_D):
            m = rmask[:, None] & ((d0 + ecols) < d)[None, :]
            xf = tl.load(xe_ptrs + d0, mask=m, other=0.0).to(tl.float32)
            cw = tl.load(w_ptrs + d0, mask=m, other=0.0)
            if COSINE:
                sq += tl.sum(xf * cw, axis=1)
                xx += tl.sum(xf * xf, axis=1)
            else:
                diff = xf - cw
                sq += tl.sum(diff * diff, axis=1)
        if COSINE:
            dist = 1.0 - sq / tl.maximum(tl.sqrt(xx), 1e-12)   # F.normalize's eps
            dist = tl.where(dist < 0.0, 0.0, dist)             # rounds below 0; NaN stays NaN
        else:
            dist = sq
        dist = tl.where(k > 0, dist, float("inf"))
        tl.store(assign_ptr + rows, barg.to(tl.int64), mask=rmask)
        tl.store(dist_ptr + rows, dist, mask=rmask)


def launch_shape(dtype: torch.dtype, d: int, kmax: int, precision: str = "tf32x3", split: bool = True,
                 capability: int = 90) -> dict:
    """Tile sizes, warps and pipeline stages; fixed rather than autotuned, because the
    tile prefix the grid is built from depends on BLOCK_M.  Each compiles for sm_90
    (triton 3.8) without register spills, which a test checks: a 128 x 128 score tile over
    64-wide d chunks spilled 264-1400 bytes per thread.

    Where a group has more centroids than one tile (kmax > 64) and d <= 128, the x tile is
    resident (BLOCK_D >= d: read once, one K = d product per centroid tile).  Measured on an
    H200 (triton 3.6, `bench triton-shapes`, 2026-12-04) at N = 1e6, d = 128, k = 1024 against
    the d-chunked shapes that were the defaults: fp16 with split centroids 3.63 -> 2.04 ms,
    fp16 single 2.27 -> 1.50 ms, fp32 3xTF32 6.24 -> 4.78 ms, fp32 TF32 2.76 -> 2.00 ms
    (flash-kmeans 0.93 ms in fp16, 1.58 ms in fp32).  At the batched problem (1000 groups
    x 1300 points, d = 64, k = 16) the resident shapes were no faster (0.88-0.93 against
    0.60-0.80 ms): few centroids re-read little of x.  Hopper only (``capability`` >= 90):
    for sm_80 (mma.sync, no wgmma) the split 16-bit resident shape spilled registers."""
    np2 = triton.next_power_of_2
    if _INTERPRET:   # cost per program and op: few programs, tiles that still cross boundaries
        return dict(BLOCK_M=64, BLOCK_N=min(32, max(16, np2(kmax))), BLOCK_D=min(32, max(16, np2(d))),
                    num_warps=4, num_stages=1)
    if dtype == torch.float32 and precision == "ieee":   # FMA, register-bound
        return dict(BLOCK_M=64, BLOCK_N=min(64, max(16, np2(kmax))), BLOCK_D=16, num_warps=4, num_stages=2)
    full = max(16, np2(d))
    if kmax > 64 and full <= 128 and capability >= 90:   # x resident (see above)
        if dtype == torch.float32:   # one stage for one TF32 product, two for three
            return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=full, num_warps=8, num_stages=1 if precision == "tf32" else 2)
        if split:
            return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=full, num_warps=8, num_stages=2)
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=full, num_warps=4, num_stages=2)
    if dtype == torch.float32:   # 3xTF32 on the tensor cores
        return dict(BLOCK_M=128, BLOCK_N=min(128, max(16, np2(kmax))), BLOCK_D=16, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=min(128, max(16, np2(kmax))), BLOCK_D=min(32, max(16, np2(d))),
                num_warps=8, num_stages=3)


def fp32_precision() -> str:
    """How fp32 points are multiplied, from SPURFAST_TRITON_FP32_PRECISION: "tf32x3"
    (default: three TF32 tensor-core products, a_hi b_hi + a_hi b_lo + a_lo b_hi, about
    fp32 accuracy), "ieee" (plain FMA) or "tf32" (one TF32 product, both operands rounded
    to 10 mantissa bits: flash-kmeans' arithmetic, a third of the tensor-core work)."""
    value = os.environ.get("SPURFAST_TRITON_FP32_PRECISION", "tf32x3")
    if value not in ("tf32x3", "ieee", "tf32"):
        raise ValueError(f"SPURFAST_TRITON_FP32_PRECISION must be 'tf32x3', 'ieee' or 'tf32', got {value!r}")
    return value


def centroid_split() -> bool:
    """Whether 16-bit points meet fp32 centroids split into hi + lo (two products, scores
    near fp32 accuracy; the default) or centroids rounded to the points' dtype (one
    product: flash-kmeans' arithmetic, half the tensor-core work), from
    SPURFAST_TRITON_CENTROID_SPLIT ("1" or "0")."""
    value = os.environ.get("SPURFAST_TRITON_CENTROID_SPLIT", "1")
    if value not in ("0", "1"):
        raise ValueError(f"SPURFAST_TRITON_CENTROID_SPLIT must be '0' or '1', got {value!r}")
    return value == "1"


def arithmetic(dtype: torch.dtype, precision: str | None = None, split: bool | None = None) -> tuple[bool, str]:
    """(split, dot input precision) for points of ``dtype``; None: from the environment
    (`fp32_precision`, `centroid_split`).  16-bit operands take the default dot ("tf32"
    only names it: the attribute applies to fp32 operands)."""
    if dtype == torch.float32:
        return False, fp32_precision() if precision is None else precision
    return (centroid_split() if split is None else split), "tf32"


_TRITON_TYPES = {t: TYPE_NAMES[t] for t in (torch.float32, torch.float16, torch.bfloat16)}   # the points it takes


def compile_for(capability: int, dtype: torch.dtype, d: int, kmax: int, metric: str = "l2",
                precision: str = "tf32x3", shape: dict | None = None, split: bool = True):
    """Compile the kernel ahead of time for a GPU of this compute capability (e.g. 90),
    with ``shape`` or the launch shape ``kmeans_assign`` would use (``precision``: fp32
    points; ``split``: 16-bit points, see `arithmetic`); needs no GPU (and not the
    interpreter).  Returns triton's CompiledKernel (``.asm["cubin"]``, ``.metadata``)."""
    elt = _TRITON_TYPES[dtype]
    split, precision = arithmetic(dtype, precision, split)
    shape = _checked_shape(shape) if shape is not None else launch_shape(dtype, d, kmax, precision, split, capability)
    sig = {"x_ptr": f"*{elt}", "c_ptr": f"*{elt}", "c32_ptr": "*fp32", "cterm_ptr": "*fp32", "off_ptr": "*i64",
           "kpg_ptr": "*i64", "tile_first_ptr": "*i64", "assign_ptr": "*i64", "dist_ptr": "*fp32", "G": "i32",
           "kmax": "i32", "d": "i32", "lo_off": "i64", "search_steps": "i32"}
    const = dict(COSINE=metric == "cosine", SPLIT=split, FP32_PRECISION=precision,
                 BLOCK_M=shape["BLOCK_M"], BLOCK_N=shape["BLOCK_N"], BLOCK_D=shape["BLOCK_D"],
                 X_RESIDENT=shape["BLOCK_D"] >= d, EPI_D=min(shape["BLOCK_D"], 32))
    return compile_for_target(_assign_kernel, sig, const, capability, shape["num_warps"], shape["num_stages"])


def kmeans_assign(x, offsets, centroids, k_per_group, metric: str = "l2", x_sqnorm=None):
    """See :func:`spurfast.kernels.reference.kmeans_assign` (x_sqnorm is accepted and not
    needed: each winner's distance is computed directly on chip)."""
    return assign_with_shape(x, offsets, centroids, k_per_group, metric, x_sqnorm=x_sqnorm)


def assign_with_shape(x, offsets, centroids, k_per_group, metric: str = "l2", shape: dict | None = None,
                      x_sqnorm=None):
    """`kmeans_assign` with an explicit launch shape (a `launch_shape`-style dict; None:
    `launch_shape`'s choice).  For tuning: ``bench/bench_triton_shapes.py`` times the
    `candidate_shapes` with it."""
    G, kmax = ref.check_assign_args(x, offsets, centroids, metric)
    return _FixedPoints(x, offsets, k_per_group, G, kmax, metric, x_sqnorm, shape)(centroids)


def prepare_assign(x, offsets, k_per_group, kmax: int, metric: str = "l2", x_sqnorm=None):
    """``step(centroids)`` = ``kmeans_assign(x, offsets, centroids, k_per_group, metric)`` for
    any (G, kmax, d) centroids, with the points, offsets and k per group checked and converted
    once (the Lloyd loop's fixed arguments): the layout check's host synchronisation, its
    dozen small launches and the tile prefix leave the iterations.  On the H200 every provider
    took 0.5-0.6 ms a call at N = 1e5, d = 64, k = 64, where flash-kmeans took 0.15-0.17 ms:
    the launcher's host work, not the kernel (what a prepared step saves there is unmeasured)."""
    G, kmax = ref.check_prepared_args(x, offsets, k_per_group, kmax, metric)
    return _FixedPoints(x, offsets, k_per_group, G, kmax, metric, x_sqnorm)


kmeans_assign.prepare = prepare_assign   # found by `spurfast.cluster.lloyd`


class _FixedPoints:
    """The assignment over fixed points: everything but the centroids checked, converted and
    laid out at construction; calling it with (G, kmax, d) centroids launches the kernel."""

    def __init__(self, x, offsets, k_per_group, G: int, kmax: int, metric: str, x_sqnorm, shape=None):
        ref.check_x_sqnorm(x_sqnorm, x.shape[0])   # unread here, yet a wrong one is the caller's bug: refused alike
        shape = _checked_shape(shape) if shape is not None else None
        ok, why = is_available()
        if not ok:
            raise RuntimeError(f"the Triton k-means kernel cannot run here: {why}")
        if x.dtype not in _TRITON_TYPES:
            raise ValueError(f"x has dtype {x.dtype}; expected one of {sorted(str(t) for t in _TRITON_TYPES)}")
        if not x.is_cuda and not _INTERPRET:
            raise ValueError(f"x is on {x.device}; the Triton kernel needs CUDA tensors (use backend='torch')")
        self.x = x.contiguous()
        N, d = self.x.shape
        self.offsets, self.kpg, self.empty_assign, self.empty_dist = assign_args(self.x, offsets, k_per_group, G, kmax)
        self.G, self.kmax, self.metric = G, kmax, metric
        self.split, self.precision = arithmetic(x.dtype)
        self.shape = shape or launch_shape(x.dtype, d, kmax, self.precision, self.split, _capability(x))
        self.tile_first = tile_prefix(self.offsets, self.shape["BLOCK_M"])

    def __call__(self, centroids):
        x, G, kmax = self.x, self.G, self.kmax
        N, d = x.shape
        if not isinstance(centroids, torch.Tensor) or tuple(centroids.shape) != (G, kmax, d):
            raise ValueError(f"centroids must be a ({G}, {kmax}, {d}) tensor, got "
                             f"{tuple(getattr(centroids, 'shape', ())) or type(centroids).__name__}")
        check_real(centroids, "centroids")
        if N == 0 or G == 0:
            return self.empty_assign.clone(), self.empty_dist.clone()
        # every row is written: each group's rows are covered by its tiles
        assign = torch.empty(N, dtype=torch.int64, device=x.device)
        dist = torch.empty(N, dtype=torch.float32, device=x.device)
        c32, cterm = centroid_terms(centroids, self.metric, x.device)
        c32 = c32.view(G * kmax, d)
        if self.split:   # hi and lo halves in one (2, G*kmax, d) tensor: the kernel reaches lo at a fixed offset
            c_in = split_centroids(c32, x.dtype, d)
        else:       # fp32 points meet the fp32 centroids; 16-bit points meet them rounded to their dtype
            c_in = c32 if x.dtype == torch.float32 else c32.to(x.dtype)
        shape = self.shape
        grid = (triton.cdiv(N, shape["BLOCK_M"]) + G,)   # >= number of tiles; the spare ones do nothing
        global last_kernel
        with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
            last_kernel = _assign_kernel[grid](x, c_in, c32, cterm, self.offsets, self.kpg, self.tile_first, assign,
                                               dist, G, kmax, d, G * kmax * d if self.split else 0,
                                               max(1, G.bit_length()), COSINE=self.metric == "cosine",
                                               SPLIT=self.split, FP32_PRECISION=self.precision,
                                               X_RESIDENT=shape["BLOCK_D"] >= d, EPI_D=min(shape["BLOCK_D"], 32),
                                               **shape)
        return assign, dist


def _capability(x: torch.Tensor) -> int:
    """x's GPU as major * 10 + minor (90 on Hopper); 90 under the interpreter (unread there)."""
    if not x.is_cuda:
        return 90
    major, minor = torch.cuda.get_device_capability(x.device)
    return 10 * major + minor


# The compiled kernel of the most recent launch in this process (triton's CompiledKernel on a
# GPU: ``n_regs``, ``n_spills``; None before any launch or under the interpreter), so a
# benchmark reads the resources of what it timed instead of compiling it a second time.
last_kernel = None


_SHAPE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps", "num_stages")


def _checked_shape(shape: dict) -> dict:
    if set(shape) != set(_SHAPE_KEYS):
        raise ValueError(f"launch shape needs exactly the keys {_SHAPE_KEYS}, got {sorted(shape)}")
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_D"):
        v = shape[key]
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            raise ValueError(f"launch shape {key}={v!r}: expected a power of two >= 16 (tl.dot tiles)")
    return dict(shape)


def candidate_shapes(dtype: torch.dtype, d: int, kmax: int, precision: str = "tf32x3",
                     split: bool = True) -> list[dict]:
    """Launch shapes worth timing on a GPU for this problem (`arithmetic` names the
    variant), `launch_shape`'s choice first; the rest the same whether the centroids are
    split (hi + lo) or not.  At the benchmark's problems (d = 128,
    k = 1024; d = 64, k = 16) every one compiled for sm_90 with triton 3.8 without register
    spills, for every dtype and variant (a test repeats it for the variants the benchmark
    sweeps by default); wider tiles, 4-warp 128-row tiles and 16 warps (128 registers a
    thread) spilled.  The GPU benchmark records spills again for the triton it runs on."""
    base = launch_shape(dtype, d, kmax, precision, split)
    if _INTERPRET:
        return [base]
    np2 = triton.next_power_of_2
    bn = lambda n: min(n, max(16, np2(kmax)))   # noqa: E731  (no wider than the centroids)
    bd = lambda n: min(n, max(16, np2(d)))      # noqa: E731
    # the d-chunked shapes first (the defaults before x-resident ones were measured lead each list)
    if dtype == torch.float32 and precision == "ieee":
        alts = [(64, bn(32), 16, 4, 2), (32, bn(64), 16, 4, 2)]
    elif dtype == torch.float32 and precision == "tf32":
        alts = [(128, bn(128), 16, 8, 3), (128, bn(128), 32, 8, 3), (128, bn(128), 32, 8, 4), (128, bn(64), 16, 8, 3)]
    elif dtype == torch.float32:
        alts = [(128, bn(128), 16, 8, 3), (128, bn(128), 16, 8, 4), (128, bn(64), 16, 8, 3)]
    else:
        alts = [(128, bn(128), bd(32), 8, 3), (128, bn(128), bd(32), 8, 4), (128, bn(128), bd(16), 8, 4),
                (128, bn(128), bd(16), 8, 3), (128, bn(64), bd(32), 8, 3), (64, bn(64), bd(32), 4, 3),
                (64, bn(128), bd(16), 4, 3)]
    # x resident (BLOCK_D >= d: the tile read once, one K = d product per centroid tile, as
    # flash-kmeans does).  Its H200 choice at d = 128, 128 rows on 4 warps, spilled here
    # (triton 3.8, sm_90), as did 128 x 128 on 8 warps with split centroids
    full = np2(d)
    if dtype != torch.float32 and full <= 256:
        alts += [(64, bn(64), full, 4, 1), (64, bn(64), full, 4, 2), (128, bn(64), full, 8, 1),
                 (128, bn(64), full, 8, 2)]
    elif dtype == torch.float32 and precision == "tf32" and full <= 128:
        alts += [(64, bn(64), full, 4, 2), (128, bn(64), full, 8, 1), (128, bn(64), full, 8, 2)]
    elif dtype == torch.float32 and precision == "tf32x3" and full <= 128:
        alts += [(128, bn(64), full, 8, 2), (128, bn(32), full, 8, 2)]
    out = [base]
    for m, n, dd, w, st in alts:
        shape = dict(BLOCK_M=m, BLOCK_N=n, BLOCK_D=dd, num_warps=w, num_stages=st)
        if shape not in out:
            out.append(shape)
    return out
