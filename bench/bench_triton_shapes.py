"""Launch shapes of the Triton k-means assign, timed on a GPU: which tile sizes, warps and
pipeline stages are fastest for the problems the targets name.

python -m bench triton-shapes [--device cuda]

For each problem and arithmetic variant (`bench.bench_kmeans.TRITON_VARIANTS`) every
`kmeans_triton.candidate_shapes` entry is timed (median of >= 10 launches), its TFLOP/s
(2 N k d, not counting the hi/lo or 3xTF32 extra products) written, its assignment
compared with the default shape's (the fraction of points that agree: near-ties may
differ between summation orders), and its register use and spills read from the compiled
kernel where this triton exposes them.  A ``best_shape_speedup`` row per (problem, variant) holds
the speed-up of the fastest shape over `launch_shape`'s choice; if one wins clearly, make
it `launch_shape`'s choice (the candidates compile spill-free for sm_90 with triton 3.8).

Problems: the issue's assignment target (N = 1e6, d = 128, k = 1024, one group) and the
batched case (1000 groups x 1300 points, d = 64, k = 16).  GPU only: on a CPU it says so
and writes nothing.  ``SPURFAST_BENCH_SHAPE_VARIANTS`` (comma-separated names) narrows the
variants (default: fp16, fp16-single, fp32, fp32-tf32, and fp16 and fp32 for the batched case).
For one group (the target) flash-kmeans' assign (pip flash-kmeans, where installed) is timed
on the same points in the variant's dtype, and a ``best_vs_flash`` row holds the best
shape's time over its (below 1: faster).
"""
from __future__ import annotations

import math
import os
import sys

import torch

from .bench_kmeans import TRITON_VARIANTS, _env, flash_assign_call, make_data
from .harness import device_name, measure

OP = "kmeans_assign"
PROBLEMS = (  # name, N, d, k, groups, default variants
    ("target", 1_000_000, 128, 1024, 1, ("fp16", "fp16-single", "fp32", "fp32-tf32")),
    ("batched", 1_300_000, 64, 16, 1000, ("fp16", "fp32")),
)


def _log(msg: str) -> None:
    print(f"[bench triton-shapes] {msg}", file=sys.stderr, flush=True)


def shape_name(shape: dict) -> str:
    return (f"m{shape['BLOCK_M']}n{shape['BLOCK_N']}d{shape['BLOCK_D']}"
            f"w{shape['num_warps']}s{shape['num_stages']}")


def _resources(kt) -> tuple[float, float]:
    """(registers per thread, spilled bytes) of the kernel launched last (the shape just
    timed), or NaNs where this triton does not expose them (or under the interpreter).
    Triton's ``n_spills`` is CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES / 4 (32-bit words): the rows,
    labelled bytes, said a quarter of it."""
    ck = kt.last_kernel
    try:
        return float(ck.n_regs), 4.0 * float(ck.n_spills)
    except Exception as exc:  # an internal API: keep the timing rows
        _log(f"register use unavailable: {exc.__class__.__name__}: {exc}")
        return math.nan, math.nan


def check_env() -> list[str] | None:
    """SPURFAST_BENCH_SHAPE_VARIANTS as a list (None: every variant); `python -m bench` calls
    it before any suite runs (in `all`, a misspelt one failed after every other suite)."""
    wanted = os.environ.get("SPURFAST_BENCH_SHAPE_VARIANTS")
    wanted = [v.strip() for v in wanted.split(",") if v.strip()] if wanted else None
    # checked before any sweep: a misspelt one raised in `sweep` after the variants before it
    # (a minute or more of GPU time each), losing the rest of the run
    unknown = [v for v in wanted or () if v not in TRITON_VARIANTS]
    if unknown:
        raise ValueError(f"SPURFAST_BENCH_SHAPE_VARIANTS={os.environ['SPURFAST_BENCH_SHAPE_VARIANTS']!r}: unknown "
                         f"variant {unknown[0]!r}; expected comma-separated names from {sorted(TRITON_VARIANTS)}")
    return wanted


def run(writer, quick: bool = False, device: str | None = None) -> None:
    wanted = check_env()
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev != "cuda" or not torch.cuda.is_available():
        _log("skipped: launch shapes are timed on a GPU only")
        return
    from spurfast.kernels import kmeans_triton as kt

    ok, why = kt.is_available()
    if not ok:
        _log(f"skipped: {why}")
        return
    for problem in PROBLEMS:
        sweep(writer, kt, problem, wanted or problem[-1], dev, device_name(dev),
              reps=10 if quick else 20)
        torch.cuda.empty_cache()


def _flash_time(x, cent, dev, reps: int) -> float | None:
    """flash-kmeans' assignment of one group's points in x's dtype (|x|^2 given, as its fit
    loop does), median seconds; None where it is not installed or fails."""
    try:
        from flash_kmeans.assign_euclid_triton import euclid_assign_triton
    except ImportError as exc:
        _log(f"flash-kmeans not installed ({exc}): no best_vs_flash rows")
        return None
    call, _ = flash_assign_call(euclid_assign_triton, x, cent)
    try:
        return measure(call, device=dev, reps=reps)["median_s"]
    except Exception as exc:  # API drift: keep the sweep's rows
        _log(f"flash-kmeans assign failed: {exc.__class__.__name__}: {exc}")
        return None


def sweep(writer, kt, problem, variants, dev, devname, reps: int) -> dict:
    """Time every candidate shape of one problem for each variant; returns
    {variant: {shape name: median seconds}}."""
    name, N, d, k, G, _ = problem
    x, off, cent, kpg = make_data(N, d, k, G, dev)
    out = {}
    flash = {}   # dtype -> flash-kmeans' median seconds (one group only)
    for variant in variants:
        if variant not in TRITON_VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(TRITON_VARIANTS)}")
        dtype, env = TRITON_VARIANTS[variant]
        xt = x.to(dtype)
        times = out[variant] = {}
        with _env(**env):
            split, precision = kt.arithmetic(dtype)
            shapes = kt.candidate_shapes(dtype, d, k, precision, split)
            base_assign = kt.assign_with_shape(xt, off, cent, kpg, "l2", shapes[0])[0]
            for shape in shapes:
                cfg = dict(problem=name, N=N, d=d, k=k, groups=G, variant=variant, shape=shape_name(shape))
                try:
                    st = measure(lambda: kt.assign_with_shape(xt, off, cent, kpg, "l2", shape), device=dev, reps=reps)
                except Exception as exc:   # e.g. out of shared memory on this GPU
                    _log(f"{name} {variant} {shape_name(shape)} failed: {exc.__class__.__name__}: {exc}")
                    continue
                agree = float((kt.assign_with_shape(xt, off, cent, kpg, "l2", shape)[0] == base_assign).float().mean())
                regs, spills = _resources(kt)
                writer.add_timing(OP, "triton", cfg, st, devname, items=N, flops=2.0 * N * k * d)
                writer.add(OP, "triton", cfg, "same_assignment", agree, "1", devname)
                writer.add(OP, "triton", cfg, "n_regs", regs, "1", devname)
                writer.add(OP, "triton", cfg, "n_spills", spills, "bytes", devname)
                times[shape_name(shape)] = st["median_s"]
                _log(f"{name} {variant} {shape_name(shape)}: {st['median_s'] * 1e3:.3f} ms "
                     f"({2.0 * N * k * d / st['median_s'] / 1e12:.1f} TFLOP/s), regs {regs:g}, spills {spills:g}, "
                     f"same assignment {agree:.4f}")
        default = shape_name(shapes[0])
        if default in times:
            best = min(times, key=times.get)
            cfg = dict(problem=name, N=N, d=d, k=k, groups=G, variant=variant, best=best)
            writer.add(OP, "triton", cfg, "best_shape_speedup", times[default] / times[best], "x", devname)
            _log(f"{name} {variant}: best {best}, {times[default] / times[best]:.2f}x the default")
            if G == 1 and dtype not in flash:
                flash[dtype] = _flash_time(xt, cent, dev, reps)
            if flash.get(dtype):
                writer.add(OP, "triton", cfg, "best_vs_flash", times[best] / flash[dtype], "x", devname)
                _log(f"{name} {variant}: best shape {times[best] * 1e3:.3f} ms, flash-kmeans "
                     f"{flash[dtype] * 1e3:.3f} ms ({times[best] / flash[dtype]:.2f}x its time)")
    return out
