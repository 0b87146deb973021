"""Triton grouped k-means assignment against exact float64 distances (and the reference).

On the CPU the kernel runs under TRITON_INTERPRET=1 (set by conftest.py) with small tiles
(32 centroids by 32 dimensions), so the cases below cross centroid-tile and d-chunk
boundaries; a subprocess without the interpreter compiles it for sm_90 and sm_80 and
checks the register use.  The interpreter runs fp32 and fp16 correctly (bf16 dots do not:
bf16 runs on a GPU only).  GPU tests are marked ``gpu`` and skip cleanly without CUDA.
"""
from __future__ import annotations

import pytest
import torch

from spurfast import backends
from spurfast.kernels import kmeans_triton as kt
from spurfast.kernels import reference as ref
from tests.helpers import (CASES, assert_equal_int, check_assign_near_optimal, check_groups_without_centroids,
                           compile_without_gpu, exact_dists, make_case)

HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.on_gpu   # `bench/gpu_check.sh` runs them all on the GPU (`-m gpu` alone left 20 of 22)
RUNS_HERE = kt.is_available()[0]
needs_kernel = pytest.mark.skipif(not RUNS_HERE, reason=kt.is_available()[1])

# The interpreter pays per program: the two big CASES shrink (same shapes of the problem:
# k over several 32-wide tiles with d chunked; many small groups with empties).
CPU_CASES = [c for c in CASES if sum(c[0]) <= 2000] + [([700], 130, 128), ([0, 5, 17, 0, 40, 3, 9] * 9, 16, 24)]


def test_an_interpreter_that_cannot_run_the_loops_makes_the_kernels_unavailable_saying_why(monkeypatch):
    """triton 3.6's interpreter with numpy 2.4 (torch 2.11 on a CPU) failed every Triton test on
    the kernels' first loop: the kernels say so up front, and the registry does not take them."""
    from spurfast.kernels import triton_env

    if triton_env.triton is None:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def fails(*args, **kwargs):
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")

    monkeypatch.setattr(triton_env, "_loop_probe", {(1,): fails})
    monkeypatch.setattr(triton_env, "_LOOPS", None)
    ok, why = triton_env.availability("spurfast.kernels.kmeans_triton", True)
    assert not ok and "cannot run spurfast.kernels.kmeans_triton's loops" in why and "0-dimensional" in why
    monkeypatch.setattr(triton_env, "_loop_probe", {(1,): lambda n, out: out.fill_(2)})
    monkeypatch.setattr(triton_env, "_LOOPS", None)
    ok, why = triton_env.availability("m", True)
    assert not ok and "a loop of 3 steps ran 2" in why
    monkeypatch.setattr(triton_env, "_LOOPS", None)
    monkeypatch.setattr(triton_env, "_loop_probe", {(1,): lambda n, out: out.fill_(3)})
    assert triton_env.availability("m", True) == (True, "")
    assert triton_env.availability("m", False)[0] is False   # no interpreter, no GPU


def _device():
    return "cuda" if HAS_CUDA else "cpu"


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"G{len(c[0])}-k{c[1]}-d{c[2]}")
def test_assign_is_a_nearest_centroid(case, metric, dtype):
    sizes, kmax, d = case
    x, off, cent, kpg = make_case(sizes, kmax, d, seed=kmax + d, device=_device())
    xq = x.to(dtype)
    assign, dist = kt.kmeans_assign(xq, off, cent, kpg, metric)
    assert assign.dtype == torch.int64 and dist.dtype == torch.float32 and assign.device == x.device
    D = exact_dists(xq.float(), off, cent, kpg, metric)   # the rounded points are the truth
    check_assign_near_optimal(assign, dist, D, dtype, f"triton assign[{metric}, {dtype}]")


@needs_kernel
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_groups_without_centroids_get_infinite_distances(metric):
    check_groups_without_centroids(kt.kmeans_assign, metric, device=_device(), name="triton assign")


@needs_kernel
def test_ties_go_to_the_lower_index_across_tiles():
    """Centroids 5 and 40 are equal (40 sits in the second 32-wide tile), and so are 41
    and 44 (same tile): every point must take the lower index, as the reference does.
    Small integers keep every L2 score exact, so the ties are exact in any summation order
    (cosine scores divide by norms: no exact ties to test there)."""
    metric = "l2"
    d = 24
    g = torch.Generator().manual_seed(3)
    cent = torch.randint(-4, 5, (1, 48, d), generator=g).float()
    cent[0, 40] = cent[0, 5]
    cent[0, 44] = cent[0, 41]
    x = torch.cat([cent[0, 5] + torch.randint(-1, 2, (30, d), generator=g), cent[0, 41].expand(20, d)])
    off = torch.tensor([0, len(x)])
    kpg = torch.tensor([48])
    want, _ = ref.kmeans_assign(x, off, cent, kpg, metric)
    assign, _ = kt.kmeans_assign(x.to(_device()), off, cent.to(_device()), kpg, metric)
    assert_equal_int(assign.cpu(), want, f"tied winners [{metric}]")
    assert not bool(((assign == 40) | (assign == 44)).any())


@needs_kernel
def test_tight_cluster_far_from_the_origin_keeps_its_distance():
    """|x|^2 + |c|^2 - 2 x.c cancels for points 1e-3 from a centroid at |c| ~ 300; the
    kernel's direct winner distance does not."""
    d = 40
    g = torch.Generator().manual_seed(5)
    cent = 300 + torch.randn(1, 6, d, generator=g)
    x = (cent[0, 2] + 1e-3 * torch.randn(50, d, generator=g)).to(_device())
    assign, dist = kt.kmeans_assign(x, torch.tensor([0, 50]), cent.to(x.device), torch.tensor([6]))
    exact = ((x.double().cpu() - cent[0, 2].double()) ** 2).sum(1)
    assert bool((assign == 2).all())
    rel = ((dist.cpu().double() - exact).abs() / exact).max().item()
    assert rel < 1e-3, f"winner distance off by {rel:.2e} relative"


@needs_kernel
@pytest.mark.parametrize("d", [24, 100], ids=["one-d-chunk", "four-d-chunks"])
def test_half_points_far_from_the_origin_keep_their_winners(d):
    """Latents far from the origin: centroids rounded to fp16 would move every score by
    ~|x| |c| 2^-11, more than the gaps between centroids here; the hi + lo split keeps
    the winners exact (those clear of the runner-up equal the float64 argmin)."""
    g = torch.Generator().manual_seed(d)
    cent = 50 + 0.2 * torch.randn(1, 20, d, generator=g)
    x = (cent[0, torch.arange(400) % 20] + 0.1 * torch.randn(400, d, generator=g)).half().to(_device())
    off, kpg = torch.tensor([0, 400]), torch.tensor([20])
    assign, dist = kt.kmeans_assign(x, off, cent.to(x.device), kpg)
    check_assign_near_optimal(assign, dist, exact_dists(x.float(), off.to(x.device), cent.to(x.device), kpg, "l2"),
                              torch.float16, f"fp16 far from the origin, d={d}")


@needs_kernel
def test_empty_inputs_and_groups_without_points():
    dev = _device()
    x = torch.zeros(0, 8, device=dev)
    a, dd = kt.kmeans_assign(x, torch.tensor([0, 0, 0]), torch.zeros(2, 3, 8), torch.tensor([0, 0]))
    assert a.shape == (0,) and dd.shape == (0,)
    # one point in the middle of empty groups
    x = torch.ones(1, 8, device=dev)
    cent = torch.zeros(3, 2, 8)
    cent[1, 1] = 1.0
    a, dd = kt.kmeans_assign(x, torch.tensor([0, 0, 1, 1]), cent, torch.tensor([0, 2, 0]))
    assert a.tolist() == [1] and dd.tolist() == [0.0]


def test_bad_arguments_get_clear_errors():
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="metric must be 'l2' or 'cosine', got 'dot'"):
        kt.kmeans_assign(x, torch.tensor([0, 4]), torch.zeros(1, 2, 3), torch.tensor([2]), "dot")
    # unread by this kernel, but refused as the reference and CPU kernel refuse it (it was taken)
    with pytest.raises(ValueError, match=r"x_sqnorm has shape \(3,\); expected \(4,\)"):
        kt.kmeans_assign(x, torch.tensor([0, 4]), torch.zeros(1, 2, 3), torch.tensor([2]), x_sqnorm=torch.ones(3))
    if not RUNS_HERE:
        pytest.skip("the remaining checks run after the availability check")
    with pytest.raises(ValueError, match="dtype torch.float64"):
        kt.kmeans_assign(x.double(), torch.tensor([0, 4]), torch.zeros(1, 2, 3), torch.tensor([2]))
    with pytest.raises(ValueError, match="offsets must run from 0 to N=4"):
        kt.kmeans_assign(x.to(_device()), torch.tensor([0, 3]), torch.zeros(1, 2, 3), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"k_per_group has values in \[5, 5\]; expected \[0, kmax=2\]"):
        kt.kmeans_assign(x.to(_device()), torch.tensor([0, 4]), torch.zeros(1, 2, 3), torch.tensor([5]))


def test_fp32_precision_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("SPURFAST_TRITON_FP32_PRECISION", raising=False)
    assert kt.fp32_precision() == "tf32x3"
    monkeypatch.setenv("SPURFAST_TRITON_FP32_PRECISION", "ieee")
    assert kt.fp32_precision() == "ieee"
    monkeypatch.setenv("SPURFAST_TRITON_FP32_PRECISION", "tf32")
    assert kt.arithmetic(torch.float32) == (False, "tf32")
    monkeypatch.setenv("SPURFAST_TRITON_FP32_PRECISION", "bf16x3")
    with pytest.raises(ValueError, match="must be 'tf32x3', 'ieee' or 'tf32', got 'bf16x3'"):
        kt.fp32_precision()


def test_centroid_split_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("SPURFAST_TRITON_CENTROID_SPLIT", raising=False)
    assert kt.arithmetic(torch.float16) == (True, "tf32") and kt.arithmetic(torch.bfloat16)[0]
    monkeypatch.setenv("SPURFAST_TRITON_CENTROID_SPLIT", "0")
    assert kt.arithmetic(torch.float16) == (False, "tf32")
    assert kt.arithmetic(torch.float32, "tf32x3") == (False, "tf32x3")   # fp32 points never split
    monkeypatch.setenv("SPURFAST_TRITON_CENTROID_SPLIT", "no")
    with pytest.raises(ValueError, match="must be '0' or '1', got 'no'"):
        kt.centroid_split()


# flash-kmeans' arithmetic: the operands rounded once (unit roundoff u of both together),
# so centroid j's score is off by at most e_j = 2 u sum_i |x_i| |c_ji| (L2: the 2 of 2 x.c;
# cosine: u sum_i |x_i| |c_hat_ji| / |x| in distance), and the chosen centroid's exact
# distance exceeds the nearest one's by at most e_chosen + e_nearest
FAST_MODES = [("fp32-tf32", torch.float32, {"SPURFAST_TRITON_FP32_PRECISION": "tf32"}, 2 * 2.0 ** -11),
              ("fp16-single", torch.float16, {"SPURFAST_TRITON_CENTROID_SPLIT": "0"}, 2.0 ** -11),
              ("bf16-single", torch.bfloat16, {"SPURFAST_TRITON_CENTROID_SPLIT": "0"}, 2.0 ** -8)]


@needs_kernel
@pytest.mark.parametrize("mode", FAST_MODES, ids=lambda m: m[0])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_flash_kmeans_arithmetic_is_nearest_up_to_operand_rounding(mode, metric, monkeypatch):
    name, dtype, env, u = mode
    if dtype == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("bf16 dots are wrong in the interpreter")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    x, off, cent, kpg = make_case([37, 0, 300, 64], 70, 40, seed=11, device=_device())
    xq = x.to(dtype)
    assign, dist = kt.kmeans_assign(xq, off, cent, kpg, metric)
    D = exact_dists(xq.float(), off, cent, kpg, metric)
    best, nearest = D.min(1)
    chosen = D.gather(1, assign.unsqueeze(1)).squeeze(1)
    xa = xq.double().abs()
    c = torch.nn.functional.normalize(cent.double(), dim=-1) if metric == "cosine" else cent.double()
    err = torch.zeros_like(D)
    for g in range(len(off) - 1):
        rows = slice(int(off[g]), int(off[g + 1]))
        err[rows] = xa[rows] @ c[g].abs().T
    err = err * (u / xq.double().norm(dim=1, keepdim=True).clamp_min(1e-12) if metric == "cosine" else 2 * u)
    pick = lambda idx: err.gather(1, idx.unsqueeze(1)).squeeze(1)   # noqa: E731
    slack = pick(assign) + pick(nearest) + 1e-5 * (1 + best.abs())
    bad = (chosen > best + slack).nonzero().flatten()
    assert len(bad) == 0, f"{name} {metric}: {len(bad)} of {len(x)} points beyond the rounding bound, first {bad[:5].tolist()}"
    torch.testing.assert_close(dist, chosen.float(), rtol=1e-4, atol=1e-4)   # the epilogue uses fp32 centroids


_COMPILE_SCRIPT = r"""
from spurfast.kernels import kmeans_triton as kt
out = []
for cap, dtype, d, kmax, metric, precision, split, which in jobs:
    dt = getattr(torch, dtype)
    shapes = kt.candidate_shapes(dt, d, kmax, precision, split) if which == "candidates" else [None]
    for shape in shapes:
        ck = kt.compile_for(cap, dt, d, kmax, metric, precision, shape=shape, split=split)
        out.append([cap, dtype, d, kmax, metric, precision, split, shape, "wgmma" in ck.asm["ptx"], usage(ck)])
print(json.dumps(out))
"""


def _compile_without_gpu(jobs):
    """Per job (capability, dtype name, d, kmax, metric, precision, split, "default" or
    "candidates"), one row per compiled shape: [*job[:7], shape (None: launch_shape's),
    wgmma in the PTX, cuobjdump's resource usage]."""
    return compile_without_gpu(_COMPILE_SCRIPT, jobs)


def test_compiles_for_hopper_and_ampere_without_register_spills():
    """What a GPU would compile, checked without one: every dtype and metric for sm_90
    (wgmma, also for fp32 as 3xTF32) and sm_80, fp32 as plain FMA too, at the benchmark's
    shape and small ones, with no stack use (spills) in the cubin.  Runs in a subprocess
    without the interpreter."""
    jobs = [[90, dt, 128, 1024, m, "tf32x3", True] for dt in ("float32", "float16", "bfloat16") for m in ("l2", "cosine")]
    jobs += [[90, "float32", 128, 1024, m, "ieee", True] for m in ("l2", "cosine")]
    jobs += [[90, "float16", 16, 8, "l2", "tf32x3", True], [90, "float32", 300, 10, "l2", "tf32x3", True],
             [80, "float16", 128, 1024, "l2", "tf32x3", True], [80, "bfloat16", 64, 16, "cosine", "tf32x3", True],
             [80, "float32", 64, 16, "l2", "tf32x3", True]]
    # the x-resident defaults (kmax > 64, d <= 128) at other widths, odd ones among them
    jobs += [[90, "float32", 16, 256, "l2", "tf32x3", True], [90, "float32", 100, 65, "cosine", "tf32", True],
             [90, "float16", 64, 128, "l2", "tf32x3", True], [90, "bfloat16", 100, 100, "cosine", "tf32x3", False],
             [80, "float16", 128, 1024, "l2", "tf32x3", False]]
    # flash-kmeans' arithmetic: one TF32 product, 16-bit centroids
    jobs += [[90, "float32", 128, 1024, "l2", "tf32", True], [90, "float16", 128, 1024, "l2", "tf32x3", False],
             [90, "bfloat16", 128, 1024, "cosine", "tf32x3", False]]
    rows = _compile_without_gpu([job + ["default"] for job in jobs])
    for cap, dtype, d, kmax, metric, precision, split, _, wgmma, usage in rows:
        name = f"sm_{cap} {dtype} ({precision}, split {split}) d={d} k={kmax} {metric}"
        assert "STACK:0" in usage, f"{name}: register spills: {usage.strip()}"
        if cap == 90:
            assert wgmma == (dtype != "float32" or precision != "ieee"), f"{name}: wgmma in the PTX: {wgmma}"


def test_candidate_launch_shapes_compile_without_spills():
    """The shapes `bench triton-shapes` times by default (`candidate_shapes`), compiled for
    sm_90 at its two problems: none spills registers, and the first is `launch_shape`'s."""
    import triton
    if not triton.__version__.startswith("3.8"):
        # the list was chosen with triton 3.8's register allocation; on other versions the
        # GPU benchmark records each candidate's spills instead
        pytest.skip(f"candidates checked for triton 3.8, this is {triton.__version__}")
    jobs = [["float16", "tf32x3", True, 128, 1024], ["float16", "tf32x3", False, 128, 1024],
            ["float32", "tf32x3", True, 128, 1024], ["float32", "tf32", True, 128, 1024],
            ["float16", "tf32x3", True, 64, 16]]
    rows = _compile_without_gpu([[90, dt, d, kmax, "l2", prec, split, "candidates"] for dt, prec, split, d, kmax in jobs])
    assert len(rows) >= 3 * len(jobs)
    spills = [r[:8] for r in rows if "STACK:0" not in r[-1]]
    assert not spills, f"candidate shapes that spill: {spills}"


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_a_prepared_step_assigns_as_a_checked_call(dtype):
    """The Lloyd loop's prepared step (fixed arguments checked once) gives what a checked
    call gives, bit for bit, for every centroid set it is called with; empty pools too."""
    x, off, cent, kpg = make_case([150, 0, 77, 3], 40, 40, seed=7, device=_device())
    x = x.to(dtype)
    step = kt.prepare_assign(x, off, kpg, 40, "l2")
    for shift in (0.0, 0.5, -2.0):
        c = cent + shift
        want, got = kt.kmeans_assign(x, off, c, kpg), step(c)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match=r"centroids must be a \(4, 40, 40\) tensor"):
        step(cent[:, :10])
    none = kt.prepare_assign(x[:0], torch.zeros(5, dtype=torch.int64, device=x.device), kpg, 40)(cent)
    assert none[0].shape == (0,) and none[1].shape == (0,)
    with pytest.raises(ValueError, match="offsets must run from 0 to N"):
        kt.prepare_assign(x, off + 1, kpg, 40)


@needs_kernel
def test_the_lloyd_loop_checks_the_points_once_with_a_named_triton(monkeypatch):
    """backend="triton": the loop prepares the assignment once (its layout check, a host
    synchronisation, left the iterations) and ends where the reference does."""
    from spurfast.cluster import batched_kmeans as kmeans
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(2, 4, 12, generator=g) * 10
    groups = torch.arange(2).repeat_interleave(150)
    x = centres[groups, torch.arange(300) % 4] + 0.1 * torch.randn(300, 12, generator=g)
    want = kmeans(x, groups, torch.tensor([4, 4]), n_iter=10, seed=0, backend="torch")
    calls = []
    real = kt.prepare_assign
    monkeypatch.setattr(kt.kmeans_assign, "prepare", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = kmeans(x.to(_device()), groups.to(_device()), torch.tensor([4, 4]), n_iter=10, seed=0, backend="triton")
    assert calls == [1] and got.n_iter > 1, (calls, got.n_iter)
    assert_equal_int(got.assign.cpu(), want.assign, "prepared triton Lloyd loop")


def test_explicit_launch_shape_is_checked():
    x, off, cent, kpg = make_case([40], 8, 16, seed=0, device=_device())
    with pytest.raises(ValueError, match="exactly the keys"):
        kt.assign_with_shape(x, off, cent, kpg, "l2", {"BLOCK_M": 64})
    bad = dict(kt.launch_shape(torch.float32, 16, 8), BLOCK_N=24)
    with pytest.raises(ValueError, match="BLOCK_N=24: expected a power of two >= 16"):
        kt.assign_with_shape(x, off, cent, kpg, "l2", bad)


@needs_kernel
def test_explicit_launch_shape_gives_the_same_assignment():
    """Another tile shape walks the centroids and d in other chunks: same winners."""
    x, off, cent, kpg = make_case([150, 0, 77], 40, 40, seed=5, device=_device())
    a0, d0 = kt.kmeans_assign(x, off, cent, kpg)
    shape = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_D=16, num_warps=4, num_stages=1)
    a1, d1 = kt.assign_with_shape(x, off, cent, kpg, "l2", shape)
    D = exact_dists(x, off, cent, kpg, "l2")
    check_assign_near_optimal(a1, d1, D, torch.float32, "triton assign, explicit shape")
    assert (a1 == a0).float().mean() > 0.99
    # x resident: BLOCK_D >= d reads the x tile once and multiplies each centroid tile in one
    # product (a different code path in the kernel), fp32 and 16-bit split centroids alike
    for dtype in (torch.float32, torch.float16):
        xq = x.to(dtype)
        want = exact_dists(xq.float(), off, cent, kpg, "l2")
        for metric in ("l2", "cosine"):
            shape = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_D=64, num_warps=4, num_stages=1)
            a2, d2 = kt.assign_with_shape(xq, off, cent, kpg, metric, shape)
            D = want if metric == "l2" else exact_dists(xq.float(), off, cent, kpg, metric)
            check_assign_near_optimal(a2, d2, D, dtype, f"triton assign, x resident, {dtype}, {metric}")


def test_registered_for_cuda_tensors_only_and_first_there():
    """Measured faster than the CuPy kernel on an H200 (or level with it): auto takes it
    first for CUDA tensors; CPU tensors never reach the interpreter under auto."""
    names = [p.name for p in backends.providers("kmeans_assign")]
    assert names.index("triton") < names.index("cupy")
    prov = next(p for p in backends.providers("kmeans_assign") if p.name == "triton")
    assert prov.devices == ("cuda",)
    backends.clear_cache()
    assert backends.resolve("kmeans_assign", "auto", device="cpu")[0] != "triton"
    backends.clear_cache()


# ----------------------------------------------------------------------------- GPU tests
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_gpu_assign_matches_exact_distances(case, metric, dtype):
    sizes, kmax, d = CASES[case]
    x, off, cent, kpg = make_case(sizes, kmax, d, seed=case)
    xq = x.to(dtype).contiguous()
    assign, dist = kt.kmeans_assign(xq, off, cent, kpg, metric)
    check_assign_near_optimal(assign, dist, exact_dists(xq.float(), off, cent, kpg, metric), dtype,
                              f"triton assign[{metric}, {dtype}]")


@pytest.mark.gpu
def test_gpu_large_case_agrees_with_the_cupy_kernel():
    """The benchmark's shape class (one big group, k > 128, d = 128) on both GPU kernels."""
    from spurfast.kernels import kmeans_cupy as kc
    x, off, cent, kpg = make_case([200_000], 300, 128, seed=7)
    xh = x.half()
    a1, d1 = kt.kmeans_assign(xh, off, cent, kpg)
    D = exact_dists(xh[:4096].float(), torch.tensor([0, 4096], device="cuda"), cent, kpg, "l2")
    check_assign_near_optimal(a1[:4096], d1[:4096], D, torch.float16, "triton large (first rows)")
    if kc.is_available()[0]:
        a2, _ = kc.kmeans_assign(xh, off, cent, kpg)
        assert (a1 == a2).float().mean().item() > 0.999


@needs_kernel
def test_lloyd_loop_runs_on_it_through_the_per_op_variable(monkeypatch):
    """SPURFAST_BACKEND_KMEANS_ASSIGN=triton swaps the assignment alone; the loop keeps
    the other steps' providers and ends where the reference does on separated data."""
    from spurfast.cluster import batched_kmeans as kmeans
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(2, 4, 12, generator=g) * 10
    groups = torch.arange(2).repeat_interleave(150)
    x = centres[groups, torch.arange(300) % 4] + 0.1 * torch.randn(300, 12, generator=g)
    want = kmeans(x, groups, torch.tensor([4, 4]), n_iter=10, seed=0, backend="torch")
    backends.clear_cache()
    monkeypatch.setenv("SPURFAST_BACKEND_KMEANS_ASSIGN", "triton")
    assert backends.resolve("kmeans_assign", None, "cpu")[0] == "triton"
    got = kmeans(x.to(_device()), groups.to(_device()), torch.tensor([4, 4]), n_iter=10, seed=0)
    backends.clear_cache()
    assert_equal_int(got.assign.cpu(), want.assign, "triton-assigned Lloyd loop")


@needs_kernel
def test_fp16_points_with_a_starting_centroid_past_fp16s_range_match_the_reference():
    # the kernel meets the centroids rounded to the points' dtype: 66000 became inf, scored NaN
    # and never won, so every point went to the other centroid (inertia 100x the reference's)
    from spurfast.cluster import batched_kmeans

    x = torch.tensor([[60000.0]] * 3 + [[100.0]] * 3).half()
    groups = torch.zeros(6, dtype=torch.long)
    init = torch.tensor([[[0.0], [66000.0]]])
    want = batched_kmeans(x, groups, [2], init=init, backend="torch", n_iter=0)
    # on the GPU where there is one: the kernel refuses CPU tensors without the interpreter
    got = batched_kmeans(x.to(_device()), groups.to(_device()), [2], init=init.to(_device()), backend="triton",
                         n_iter=0)
    assert got.assign.tolist() == want.assign.tolist() == [1, 1, 1, 0, 0, 0]
    assert got.inertia == pytest.approx(want.inertia, rel=1e-6)
