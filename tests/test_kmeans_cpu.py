"""The fused CPU k-means kernels (kernels/kmeans_cpu.py) against exact distances and the
torch reference, over the same odd shapes as the CuPy kernels.  Skipped where they cannot
be built (no AVX2/FMA or no C++ compiler); the fallback itself is tested here too."""
from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spurfast import backends
from spurfast.cluster import batched_kmeans
from spurfast.kernels import kmeans_cpu as kcpu
from spurfast.kernels import reference as ref
from tests.helpers import (CASES, EMPTY_CASES, assert_bitwise, assert_close, assert_equal_int, assert_same_outputs,
                           check_assign_near_optimal, check_groups_without_centroids, empty_case, exact_dists,
                           exact_sums, make_case)
from tests.test_kmeans_reference import (check_exact_rows, duplicated_latents, lower_index_knn, spy_on_remeasure,
                                         tight_blob)

AVAILABLE, WHY = kcpu.is_available()
needs_kernel = pytest.mark.skipif(not AVAILABLE, reason=f"fused CPU kernels unavailable: {WHY}")
# cases large enough to run in several fixed row ranges (threads): one group, and many
# groups, some whole inside a range and some cut by one
CPU_CASES = CASES + [([3 * kcpu._MIN_ROWS + 5], 37, 64),
                     (np.random.default_rng(1).integers(0, 40, 400).tolist(), 16, 24)]


@pytest.fixture(params=kcpu.ISAS)
def isa(request):
    """Both tiles of the assignment and the kNN search (AVX2, AVX-512), the CPU's choice
    restored after."""
    with kcpu.using_isa(request.param) as got:
        if got != request.param:
            pytest.skip(f"this CPU has no {request.param}")
        yield got


@needs_kernel
@pytest.mark.parametrize("with_xn", [False, True], ids=["no-xn", "xn"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("case", range(len(CPU_CASES)))
def test_assign_matches_exact_distances_and_reference(case, metric, with_xn, isa):
    sizes, kmax, d = CPU_CASES[case]
    x, off, cent, kpg = make_case(sizes, kmax, d, seed=case, device="cpu")
    xn = (x * x).sum(1) if with_xn else None
    assign, dist = kcpu.kmeans_assign(x, off, cent, kpg, metric, x_sqnorm=xn)
    assert assign.dtype == torch.int64 and dist.dtype == torch.float32 and assign.shape == dist.shape == (len(x),)
    check_assign_near_optimal(assign, dist, exact_dists(x, off, cent, kpg, metric), torch.float32,
                              f"cpu assign[{metric}]")
    _, rd = ref.kmeans_assign(x, off, cent, kpg, metric)
    assert_close(dist, rd, torch.float32, name="dist vs reference")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", [1, len(CPU_CASES) - 1])
def test_other_dtypes_are_the_reference_on_their_fp32_values(case, dtype):
    """The kernels take fp16, bf16 and float64 points (as fp32, which batched_kmeans passes on
    for L2 data near the origin); only fp32 was tested: a wrong cast of the others slipped by."""
    sizes, kmax, d = CPU_CASES[case]
    x, off, cent, kpg = make_case(sizes, kmax, d, seed=30 + case, device="cpu")
    xd = x.to(dtype)
    assign, dist = kcpu.kmeans_assign(xd, off, cent, kpg)
    check_assign_near_optimal(assign, dist, exact_dists(xd.float(), off, cent, kpg, "l2"), torch.float32,
                              f"cpu assign[{dtype}]")
    _, rd = ref.kmeans_assign(xd.float(), off, cent, kpg)
    assert_close(dist, rd, torch.float32, name=f"dist vs reference [{dtype}]")
    sums, counts = kcpu.kmeans_update(xd, off, assign, kmax)
    es, ec = exact_sums(xd.float(), off, assign, kmax)
    assert_equal_int(counts, ec, f"counts [{dtype}]")
    n = max(1, int(ec.max()))
    assert_close(sums, es.float(), torch.float32, name=f"sums [{dtype}]", atol=1e-4 * n ** 0.5 * 4, rtol=1e-4)
    fa, fd, fs, fc = kcpu.kmeans_assign_update(xd, off, cent, kpg)
    for part, got, want in (("assign", fa, assign), ("sums", fs, sums), ("counts", fc, counts)):
        assert_bitwise(got, want, f"fused {part} [{dtype}]")


@needs_kernel
def test_assign_ties_go_to_the_lower_index_and_empty_input(isa):
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]] * 50)
    cent = torch.tensor([[[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]] + [[9.0, 9.0]] * 15])  # kmax 19 > 16
    a, _ = kcpu.kmeans_assign(x, torch.tensor([0, 150]), cent, torch.tensor([19]))
    assert_equal_int(a, torch.tensor([2, 0, 0] * 50), "ties -> lower index")
    # centroids 0 and 16 share a vector lane: the earlier one must keep a tie; so must 16
    # and 32, 0 and 64 (one AVX-512 tile holds 64: across tiles, and in the tail's tiles)
    for first, second, kmax in ((0, 16, 20), (16, 32, 40), (0, 64, 70), (64, 80, 83), (0, 96, 100)):
        cent2 = torch.full((1, kmax, 2), 50.0)
        cent2[0, first] = cent2[0, second] = torch.tensor([5.0, 5.0])
        a, _ = kcpu.kmeans_assign(torch.tensor([[5.0, 5.0]] * 7), torch.tensor([0, 7]), cent2, torch.tensor([kmax]))
        assert_equal_int(a, torch.full((7,), first, dtype=torch.int64),
                         f"tie of {first} and {second} (kmax {kmax}) -> lower index")
    a, dist = kcpu.kmeans_assign(torch.zeros(0, 3), torch.zeros(3, dtype=torch.int64), torch.zeros(2, 4, 3),
                                 torch.zeros(2, dtype=torch.int64))
    assert a.shape == (0,) and dist.shape == (0,)


def _on_both_tiles(fn):
    """(fn() on the AVX-512 tiles, fn() on the AVX2 tiles), the CPU's choice restored after;
    skipped on a CPU without AVX-512."""
    with kcpu.using_isa("avx512") as got:
        if got != "avx512":
            pytest.skip("this CPU has no AVX-512")
        wide = fn()
    with kcpu.using_isa("avx2"):
        return wide, fn()


@needs_kernel
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("kmax", [1, 15, 16, 17, 31, 33, 48, 63, 64, 65, 97, 130])
def test_the_avx512_tile_gives_the_avx2_tiles_bits(kmax, metric):
    """The AVX-512 tile (6 points x 64 centroids, tails of 32 and 16) does each lane's
    arithmetic in the AVX2 tile's order: same assignment, distances and sums, bit for bit,
    whatever kmax leaves for the tails and however many rows the last tile gets."""
    x, off, cent, kpg = make_case([kmax + 5, 0, 3 * kmax + 1, 7], kmax, 19 + kmax % 7, seed=kmax, device="cpu")
    wide, narrow = _on_both_tiles(lambda: kcpu.kmeans_assign_update(x, off, cent, kpg, metric))
    for name, a, b in zip(["assign", "dist", "sums", "counts"], wide, narrow):
        assert_bitwise(a, b, f"{name}: AVX-512 against AVX2 (kmax {kmax}, {metric})")


@needs_kernel
@pytest.mark.parametrize("n,d,k", [(1, 3, 2), (7, 5, 3), (97, 16, 10), (1001, 16, 50), (2051, 33, 10)])
def test_the_avx512_knn_tile_gives_the_avx2_tiles_neighbours(n, d, k):
    """The knn's AVX-512 tile (more columns per tile, tails of fewer) scores each pair as the
    AVX2 tile does and offers a row its columns in the same order: the same neighbours, copies
    of one latent included."""
    rng = np.random.default_rng(n)
    z = rng.normal(size=(n, d)).astype(np.float32)
    z[: n // 4] = z[0]   # a quarter copies of one latent: ties the lower index must win
    wide, narrow = _on_both_tiles(lambda: kcpu.latent_knn(torch.from_numpy(z), k))
    assert_bitwise(wide, narrow, f"knn AVX-512 against AVX2 (n {n}, d {d}, k {k})")


@needs_kernel
def test_isa_switch_refuses_unknown_names_and_reads_its_variable():
    with pytest.raises(ValueError, match="avx2.*avx512.*'sse'"):
        kcpu.isa("sse")
    before = kcpu.isa()
    with kcpu.using_isa("avx2") as got:
        assert got == kcpu.isa() == "avx2"
    assert kcpu.isa() == before   # restored
    probe = "from spurfast.kernels import kmeans_cpu as k; print(k.isa())"
    for value, want in (("avx2", "avx2"), ("bogus", kcpu.isa())):
        run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                             env={**os.environ, "SPURFAST_KMEANS_CPU_ISA": value})
        assert run.stdout.strip().splitlines()[-1] == want, (value, run.stdout, run.stderr)
    assert "SPURFAST_KMEANS_CPU_ISA must be one of avx2, avx512, got 'bogus'" in run.stderr


@needs_kernel
@pytest.mark.parametrize("op", ["update", "assign_update", "plusplus"])
@pytest.mark.parametrize("k", ["k0", "kmax"])
@pytest.mark.parametrize("G,kmax,d", EMPTY_CASES, ids=lambda v: str(v))
def test_empty_input_matches_the_reference(G, kmax, d, k, op):
    """N = 0 through the entry points that take points (kmeans_assign's is above): the
    reference's zero sums and counts, empty assignments, all-zero seeds, and no draws."""
    x, off, assign, cent, kpg = empty_case(G, kmax, d, 0 if k == "k0" else kmax)
    tag = f"{op} N=0, G={G}, kmax={kmax}, d={d}, {k}"
    if op == "update":
        assert_same_outputs(kcpu.kmeans_update(x, off, assign, kmax), ref.kmeans_update(x, off, assign, kmax), tag)
    elif op == "assign_update":
        for metric, xn in (("l2", None), ("l2", torch.zeros(0)), ("cosine", None)):
            assert_same_outputs(kcpu.kmeans_assign_update(x, off, cent, kpg, metric, x_sqnorm=xn),
                                ref.kmeans_assign_update(x, off, cent, kpg, metric, x_sqnorm=xn),
                                f"{tag} [{metric}{'' if xn is None else ', xn'}]")
    else:
        gen, ref_gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        assert_same_outputs(kcpu.kmeans_plusplus(x, off, kpg, kmax, gen),
                            ref.kmeans_plusplus(x, off, kpg, kmax, ref_gen), tag)
        assert torch.equal(gen.get_state(), ref_gen.get_state()), f"{tag}: the generator must advance as the " \
            "reference's does"


@needs_kernel
def test_plusplus_with_kmax_zero_draws_nothing_as_the_reference():
    # points but no centroid rows: the reference returns before drawing; the kernel drew G
    # numbers, so every later draw from a shared generator differed between the backends
    x, off, kpg = torch.randn(5, 3), torch.tensor([0, 2, 5]), torch.tensor([0, 0])
    gen, ref_gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert_same_outputs(kcpu.kmeans_plusplus(x, off, kpg, 0, gen), ref.kmeans_plusplus(x, off, kpg, 0, ref_gen),
                        "kmax = 0")
    assert torch.equal(gen.get_state(), ref_gen.get_state()), "the generator must advance as the reference's does"


@needs_kernel
@pytest.mark.parametrize("case", range(len(CPU_CASES)))
def test_update_matches_exact_sums_and_repeats_bitwise(case):
    sizes, kmax, d = CPU_CASES[case]
    x, off, cent, kpg = make_case(sizes, kmax, d, seed=10 + case, device="cpu")
    assign, _ = ref.kmeans_assign(x, off, cent, kpg)
    sums, counts = kcpu.kmeans_update(x, off, assign, kmax)
    rs, rc = exact_sums(x, off, assign, kmax)
    assert_equal_int(counts, rc, "counts")
    n = max(1, int(rc.max()))
    assert_close(sums, rs.float(), torch.float32, name="sums", atol=1e-4 * n ** 0.5 * 4, rtol=1e-4)
    again, _ = kcpu.kmeans_update(x, off, assign, kmax)
    assert_bitwise(sums, again, "fixed row ranges: the same sums every run")


@pytest.fixture(params=["openmp", "python-threads"])
def threading_mode(request, monkeypatch):
    """Both ways the library's rows are split: OpenMP inside it, or (a compiler without
    OpenMP) Python threads over the same fixed ranges."""
    if request.param == "python-threads":
        monkeypatch.setattr(kcpu._load(), "openmp", False)
    elif not kcpu._load().openmp:
        pytest.skip("the library was built without OpenMP")
    return request.param


@needs_kernel
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("case", range(len(CPU_CASES)))
def test_fused_step_equals_assign_then_update_bitwise(case, metric, threading_mode, isa):
    sizes, kmax, d = CPU_CASES[case]
    x, off, cent, kpg = make_case(sizes, kmax, d, seed=20 + case, device="cpu")
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    xn = (x * x).sum(1)
    assign, dist, sums, counts = kcpu.kmeans_assign_update(x, off, cent, kpg, metric, x_sqnorm=xn)
    a2, d2 = kcpu.kmeans_assign(x, off, cent, kpg, metric, x_sqnorm=xn)
    s2, c2 = kcpu.kmeans_update(x, off, a2, kmax)
    assert_bitwise(assign, a2, f"{threading_mode}: fused assign")
    assert_bitwise(dist, d2, f"{threading_mode}: fused dist")
    assert_bitwise(s2, sums, f"{threading_mode}: fused sums against update's")
    assert_bitwise(c2, counts, f"{threading_mode}: fused counts against update's")
    ra, rd, rs, rc = ref.kmeans_assign_update(x, off, cent, kpg, metric, x_sqnorm=xn)
    check_assign_near_optimal(assign, dist, exact_dists(x, off, cent, kpg, metric), torch.float32, "fused assign")
    es, ec = exact_sums(x, off, assign, kmax)
    assert_equal_int(counts, ec, "fused counts")
    n = max(1, int(ec.max()))
    assert_close(sums, es.float(), torch.float32, name="fused sums", atol=1e-4 * n ** 0.5 * 4, rtol=1e-4)
    assert_close(dist, rd, torch.float32, name="fused dist vs reference")


@needs_kernel
@pytest.mark.parametrize("case", [len(CPU_CASES) - 2, len(CPU_CASES) - 1])   # the multi-range cases
def test_python_thread_fallback_gives_the_openmp_results_bitwise(case, monkeypatch):
    if not kcpu._load().openmp:
        pytest.skip("the library was built without OpenMP")
    sizes, kmax, d = CPU_CASES[case]
    x, off, cent, kpg = make_case(sizes, kmax, d, seed=3, device="cpu")
    assert kcpu._parts(len(x)) == min(kcpu._MAX_PARTS, len(x) // kcpu._MIN_ROWS) > 1
    omp = kcpu.kmeans_assign_update(x, off, cent, kpg) + kcpu.kmeans_update(x, off, torch.arange(len(x)) % kmax, kmax)
    monkeypatch.setattr(kcpu._load(), "openmp", False)
    py = kcpu.kmeans_assign_update(x, off, cent, kpg) + kcpu.kmeans_update(x, off, torch.arange(len(x)) % kmax, kmax)
    for name, a, b in zip(["assign", "dist", "sums", "counts", "update sums", "update counts"], omp, py):
        assert_bitwise(a, b, f"{name}: OpenMP against Python threads")


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@needs_kernel
@pytest.mark.parametrize("sizes", [[9000], [4000, 0, 5000, 3], [30, 0, 7] * 300],
                         ids=["one-group", "groups", "many-groups"])
def test_sums_do_not_depend_on_the_thread_count(sizes, threading_mode, restore_threads, monkeypatch):
    """Each row range keeps its own partial sums, so the float sums depend on the cut: it
    must be a function of N alone (it was one range per thread, and the sums moved with
    torch.get_num_threads()).  Far from the origin so that a different cut rounds differently."""
    monkeypatch.setattr(kcpu, "_threads", torch.get_num_threads)   # 4 threads even on fewer cores
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(sizes), 13, generator=g) * 100 + 1000
    off = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(torch.tensor(sizes), 0)
    cent = torch.randn(len(sizes), 7, 13, generator=g) * 100 + 1000
    kpg = torch.tensor([min(7, n) for n in sizes])
    got = {}
    for t in (1, 2, 4):
        torch.set_num_threads(t)
        fused = kcpu.kmeans_assign_update(x, off, cent, kpg)
        got[t] = fused + kcpu.kmeans_update(x, off, fused[0], 7)
    for t in (2, 4):
        for name, a, b in zip(["assign", "dist", "sums", "counts", "update sums", "update counts"], got[1], got[t]):
            assert_bitwise(a, b, f"{threading_mode}: {name} at {t} threads against 1 thread's")
    assert_bitwise(got[1][2], got[1][4], "fused sums against update's")
    es, ec = exact_sums(x, off, got[1][0], 7)
    assert_equal_int(got[1][3], ec, "counts")
    assert_close(got[1][2], es.float(), torch.float32, name="sums", rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("with_xn", [False, True], ids=["no-xn", "xn"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nan_rows_get_nan_distances_as_in_the_reference(metric, with_xn, isa):
    # the L2 clamp (dv > 0 ? dv : 0) made a NaN distance 0; cosine's fmax(|x|, 1e-12)
    # made it s / 1e-12 = inf
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 5, generator=g)
    x[3, 0] = float("nan")
    x[17] = float("nan")
    off, cent, kpg = torch.tensor([0, 25, 40]), torch.randn(2, 3, 5, generator=g), torch.tensor([3, 3])
    xn = (x * x).sum(1) if with_xn else None
    ra, rd = ref.kmeans_assign(x, off, cent, kpg, metric, x_sqnorm=xn)
    for name, (a, dist) in (("assign", kcpu.kmeans_assign(x, off, cent, kpg, metric, x_sqnorm=xn)),
                            ("fused", kcpu.kmeans_assign_update(x, off, cent, kpg, metric, x_sqnorm=xn)[:2])):
        assert torch.isnan(dist[[3, 17]]).all(), f"{name}: NaN rows gave {dist[[3, 17]].tolist()}"
        assert_close(dist, rd, torch.float32, name=f"{name} dist vs reference")   # NaN exactly where it is
        ok = ~torch.isnan(rd)
        assert_equal_int(a[ok], ra[ok], f"{name} assign (finite rows)")


@needs_kernel
def test_the_library_shares_torchs_openmp_runtime():
    """Two OpenMP runtimes in one process oversubscribe the cores (each keeps spinning
    workers): the library must bind to the libgomp torch loaded, not a second copy.
    Checked in a fresh process (other tests' imports, e.g. scikit-learn, bring their own)."""
    if not Path("/proc/self/maps").exists() or not kcpu._load().openmp:
        pytest.skip("needs /proc and an OpenMP build")
    probe = ("import torch\nfrom spurfast.kernels import kmeans_cpu as k\nassert k._load() is not None\n"
             "maps = open('/proc/self/maps').read().splitlines()\n"
             "print(sorted({l.split()[-1] for l in maps if 'libgomp' in l.split()[-1]}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    gomp = ast.literal_eval(out.strip().splitlines()[-1])
    assert len(gomp) == 1, f"expected one OpenMP runtime (torch's), found {gomp}"


@needs_kernel
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("case", range(len(CPU_CASES)))
def test_the_prepared_step_gives_the_fused_steps_bits(case, metric, isa):
    """The fixed arguments checked once (``prepare``), then any centroids: the same four
    results as ``kmeans_assign_update`` each time, and the arrays fresh per call."""
    sizes, kmax, d = CPU_CASES[case]
    x, off, cent, kpg = make_case(sizes, kmax, d, seed=40 + case, device="cpu")
    xn = (x * x).sum(1) if metric == "l2" else None
    step = kcpu.kmeans_assign_update.prepare(x, off, kpg, kmax, metric, x_sqnorm=xn)
    first = None
    for shift in (0.0, 0.5):
        c = cent + shift
        got = step(c)
        want = kcpu.kmeans_assign_update(x, off, c, kpg, metric, x_sqnorm=xn)
        for name, a, b in zip(("assign", "dist", "sums", "counts"), got, want):
            assert_bitwise(a, b, f"prepared {name}, centroids shifted by {shift}")
        first = got if first is None else first
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(first, got) if a.numel())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_the_prepared_step_takes_other_dtypes_as_the_fused_step_does(dtype):
    """Points of another dtype are converted once, as each checked call converts them: the same bits."""
    sizes, kmax, d = CPU_CASES[1]
    x, off, cent, kpg = make_case(sizes, kmax, d, seed=7, device="cpu")
    x = x.to(dtype)
    step = kcpu.kmeans_assign_update.prepare(x, off, kpg, kmax, "l2")
    for name, a, b in zip(("assign", "dist", "sums", "counts"), step(cent),
                          kcpu.kmeans_assign_update(x, off, cent, kpg, "l2")):
        assert_bitwise(a, b, f"prepared {name} on {dtype}")


@needs_kernel
def test_the_prepared_step_refuses_what_the_fused_step_refuses():
    x, off, cent, kpg = make_case([5, 0, 7], 3, 4, seed=3, device="cpu")
    prepare = kcpu.kmeans_assign_update.prepare
    with pytest.raises(ValueError, match="metric"):
        prepare(x, off, kpg, 3, "dot")
    with pytest.raises(ValueError, match=r"offsets has 3 entries; expected G \+ 1 = 4"):
        prepare(x, off[:-1], torch.tensor([1, 1, 1]), 3)
    with pytest.raises(ValueError, match=r"k_per_group\[1\] = 4"):
        prepare(x, off, torch.tensor([1, 4, 1]), 3)
    with pytest.raises(ValueError, match="x_sqnorm has shape"):
        prepare(x, off, kpg, 3, x_sqnorm=torch.ones(5))
    with pytest.raises(ValueError, match="kmax"):
        prepare(x, off, kpg, -1)
    step = prepare(x, off, kpg, 3)
    with pytest.raises(ValueError, match=r"centroids have shape \(3, 2, 4\); expected \(G, kmax, d\) = \(3, 3, 4\)"):
        step(cent[:, :2])
    with pytest.raises(ValueError, match="centroids has dtype"):
        step(cent.to(torch.complex64))


@needs_kernel
def test_lloyd_prepares_the_fused_step_once_per_fit(monkeypatch):
    """The Lloyd loop checks its fixed arguments once, not in every iteration."""
    calls = {"prepare": 0, "step": 0}
    real = kcpu.kmeans_assign_update.prepare

    def counting(*a, **k):
        calls["prepare"] += 1
        step = real(*a, **k)

        def counted(c):
            calls["step"] += 1
            return step(c)
        return counted

    monkeypatch.setattr(kcpu.kmeans_assign_update, "prepare", counting)
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(0))
    groups = torch.arange(500) % 3
    res = batched_kmeans(x, groups, [4, 4, 4], seed=1, tol=0.0, n_iter=7, backend="cpu")
    assert calls == {"prepare": 1, "step": res.n_iter}


def test_lloyd_takes_fused_steps_and_seeding_from_the_assignments_provider():
    from spurfast import cluster

    assert cluster._seeding("cupy") is ref.kmeans_plusplus and cluster._seeding("torch") is ref.kmeans_plusplus
    assert cluster._fused_step("torch") is None   # the reference composes the two ops
    assert cluster._fused_step("cupy") is None    # no fused CUDA kernel
    if AVAILABLE:
        assert cluster._fused_step("cpu") is kcpu.kmeans_assign_update
        assert cluster._seeding("cpu") is kcpu.kmeans_plusplus


def _integer_groups(sizes, kpg, d, seed, duplicates=False):
    """Integer coordinates: every D^2 and running sum is exact, so any summation order
    gives the same k-means++ draws."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-5, 6, (int(sum(sizes)), d), generator=g).float()
    if duplicates:   # the whole first group one point: all-zero D^2 after its first seed
        x[: sizes[0]] = 0.0
    off = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(torch.tensor(sizes), 0)
    return x, off, torch.tensor(kpg)


@needs_kernel
@pytest.mark.parametrize("sizes,kpg,d,dup", [
    ([700, 0, 37, 119, 5], [60, 0, 12, 24, 5], 7, False),
    ([300, 80], [25, 3], 9, True),                 # all-zero D^2 in a group: uniform picks
    ([1], [1], 3, False),
    ([40000, 300], [20, 7], 3, False),             # over the large-group threshold: every thread per step
])
def test_plusplus_draws_the_references_seeds(sizes, kpg, d, dup):
    x, off, k = _integer_groups(sizes, kpg, d, seed=len(sizes), duplicates=dup)
    kmax = max(1, max(kpg))
    want = ref.kmeans_plusplus(x, off, k, kmax, torch.Generator().manual_seed(7))
    got = kcpu.kmeans_plusplus(x, off, k, kmax, torch.Generator().manual_seed(7))
    assert_bitwise(got, want, f"plusplus seeds ({int(k.sum())} drawn)")
    gen = torch.Generator().manual_seed(7)
    kcpu.kmeans_plusplus(x, off, k, kmax, gen)
    ref_gen = torch.Generator().manual_seed(7)
    ref.kmeans_plusplus(x, off, k, kmax, ref_gen)
    assert torch.equal(gen.get_state(), ref_gen.get_state()), "the generator must advance as the reference's does"


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_plusplus_takes_other_dtypes_as_the_reference_does(dtype):
    # fp16, bf16 and float64 points reach the seeding too (batched_kmeans passes them on): only
    # fp32 was tested.  Integer coordinates are exact in every dtype, so the draws must equal
    # the reference's on the same points, and both must draw fp32 members of the fp32 points
    x, off, k = _integer_groups([203, 0, 57, 9], [11, 0, 6, 9], 5, seed=3)
    xd = x.to(dtype)
    want = ref.kmeans_plusplus(xd, off, k, 11, torch.Generator().manual_seed(2))
    got = kcpu.kmeans_plusplus(xd, off, k, 11, torch.Generator().manual_seed(2))
    assert got.dtype == want.dtype == torch.float32, (got.dtype, want.dtype)
    assert_bitwise(got, want, f"cpu plusplus [{dtype}] vs reference")
    assert_bitwise(got, kcpu.kmeans_plusplus(x, off, k, 11, torch.Generator().manual_seed(2)),
                   f"cpu plusplus [{dtype}] vs fp32 input")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_knn_takes_other_dtypes_as_the_reference_does(dtype):
    # the latent store is float16: its latents reach latent_knn in that dtype; the kernel was
    # tested on fp32 only.  Distinct half-integer points, exact in bf16 too: no ties to round
    rng = np.random.default_rng(5)
    z = torch.from_numpy(rng.permutation(np.arange(-150, 150))[:223].reshape(-1, 1) * 0.5
                         + rng.integers(-3, 4, (223, 3)) * 0.25).to(dtype)
    got, want = kcpu.latent_knn(z, 4), ref.latent_knn(z, 4)
    assert_equal_int(got, want, f"cpu latent_knn [{dtype}] vs reference")
    _check_knn(got.numpy(), z.double().numpy(), 4, f"cpu latent_knn [{dtype}]")


@needs_kernel
def test_plusplus_names_a_seed_given_for_its_generator():
    with pytest.raises(TypeError, match="generator must be a torch.Generator .*got int"):
        kcpu.kmeans_plusplus(torch.randn(5, 3), torch.tensor([0, 5]), torch.tensor([2]), 2, 0)


@needs_kernel
def test_plusplus_on_real_valued_data_gives_distinct_members_and_repeats():
    x, off, _, kpg = make_case([500, 3, 0, 260], 12, 10, seed=4, device="cpu")
    a = kcpu.kmeans_plusplus(x, off, kpg, 12, torch.Generator().manual_seed(1))
    b = kcpu.kmeans_plusplus(x, off, kpg, 12, torch.Generator().manual_seed(1))
    assert_bitwise(a, b, "plusplus, the same generator seed twice")
    for g in range(len(off) - 1):
        rows, k = x[int(off[g]):int(off[g + 1])], int(kpg[g])
        for j in range(k):
            assert bool((rows == a[g, j]).all(1).any()), f"seed {j} of group {g} is not a member"
        assert len({tuple(r.tolist()) for r in a[g, :k]}) == k, f"group {g}: repeated seeds"
        assert float(a[g, k:].abs().sum()) == 0, f"group {g}: rows past k_g must stay zero"


def _check_knn(nn: np.ndarray, z: np.ndarray, k: int, name: str) -> None:
    """Every row's neighbours are the k nearest by float64 distances, nearest first;
    neighbours may swap only where their distances tie to fp32 rounding (1e-6 relative)."""
    n = len(z)
    # float64 |a|^2 + |b|^2 - 2ab of centred points (rounding ~1e-13 relative here, against the
    # 1e-6 below): the broadcast (n, n, d) difference took 4.8 GB and 100 s at n = 6,149
    z64 = z.astype(np.float64) - z.astype(np.float64).mean(0)
    sq = (z64 * z64).sum(1)
    D = np.maximum(sq[:, None] + sq[None] - 2.0 * (z64 @ z64.T), 0.0)
    np.fill_diagonal(D, np.inf)
    want = np.sort(np.partition(D, k - 1, 1)[:, :k], 1) if k < n else np.sort(D, 1)[:, :k]
    got = np.take_along_axis(D, nn, 1)
    assert nn.shape == (n, k), f"{name}: shape {nn.shape}, expected {(n, k)}"
    assert (nn != np.arange(n)[:, None]).all(), f"{name}: a row lists itself"
    bad = np.flatnonzero(~np.isclose(got, want, rtol=1e-6, atol=1e-9).all(1))
    assert bad.size == 0, f"{name}: {bad.size} rows not the k nearest, first {bad[0]}: {got[bad[0]]} vs {want[bad[0]]}"


@needs_kernel
@pytest.mark.parametrize("n,d,k", [(1, 2, 3), (2, 4, 1), (3, 1, 5), (17, 3, 16), (203, 5, 6), (1000, 33, 10),
                                   (3 * kcpu._MIN_ROWS + 5, 16, 10)])   # the last: several threads, column chunks
def test_knn_matches_float64_brute_force_and_the_reference(n, d, k, isa):
    rng = np.random.default_rng(n)
    z = np.concatenate([rng.normal(size=(n // 2, d)), 0.05 * rng.normal(size=(n - n // 2, d)) + 3]).astype(np.float32)
    nn = kcpu.latent_knn(torch.from_numpy(z), k).numpy()
    kk = min(k, n - 1)
    if kk <= 0:
        assert nn.shape == (n, 0)
        return
    _check_knn(nn, z, kk, "cpu knn")
    if n <= 1000:   # larger tight clusters: the reference's GEMM scores (the |zj|^2 column summed
        # inside the product) miss a true neighbour at the k-th place in a few rows
        _check_knn(ref.latent_knn(torch.from_numpy(z), k).numpy(), z, kk, "reference knn")
    assert np.array_equal(nn, kcpu.latent_knn(torch.from_numpy(z), k).numpy()), "same neighbours every run"


@needs_kernel
@pytest.mark.parametrize("n,k", [(0, 4), (0, 0), (1, 0), (5, 0)])
def test_knn_empty_pool_or_no_neighbours_matches_the_reference(n, k):
    z = torch.randn(n, 3, generator=torch.Generator().manual_seed(n))
    got = kcpu.latent_knn(z, k)
    assert got.shape == (n, 0), f"latent_knn n={n} k={k}: shape {tuple(got.shape)}, expected {(n, 0)}"
    assert_same_outputs(got, ref.latent_knn(z, k), f"latent_knn n={n} k={k}")


@pytest.mark.parametrize("n,k,block", [(257, 1, 128), (385, 1, 128), (1025, 1, 128), (258, 2, 128), (40, 1, 3),
                                       (41, 2, 2)])
def test_reference_knn_when_the_nearest_point_is_alone_in_a_short_last_block(n, k, block):
    # the pruned top-k keeps the best blocks; a short last block is mostly padding (inf),
    # which must never become a candidate (it indexed past the pool: IndexError)
    rng = np.random.default_rng(n)
    z = rng.normal(size=(n, 4)).astype(np.float32)
    z[n - 1] = z[0] + 1e-3    # row 0's nearest neighbour is the last row
    nn = ref.latent_knn(torch.from_numpy(z), k, column_block=block).numpy()
    _check_knn(nn, z, k, f"reference knn, column block {block}")
    assert nn[0, 0] == n - 1


@needs_kernel
def test_knn_rejects_non_finite_latents():
    z = torch.zeros(10, 3)
    z[4, 1] = float("nan")
    with pytest.raises(ValueError, match="1 rows with NaN or inf"):
        kcpu.latent_knn(z, 3)


@needs_kernel
def test_knn_ties_go_to_the_lower_index(threading_mode, isa):
    # duplicates: rows 0..4 identical, so each one's neighbours tie exactly
    z = np.zeros((3000, 4), np.float32)
    z[5:] = np.random.default_rng(0).normal(size=(2995, 4)) + 10
    nn = kcpu.latent_knn(torch.from_numpy(z), 4).numpy()
    for i in range(5):
        assert nn[i].tolist() == [j for j in range(5) if j != i], f"row {i}: {nn[i]}"


@needs_kernel
def test_knn_row_blocks_cover_every_row_once_in_whole_panels():
    for n, d, parts in [(1, 1, 1), (95, 3, 1), (97, 3, 2), (90_000, 16, 2), (1_280_000, 16, 16), (5, 10**9, 3)]:
        blocks = kcpu._knn_blocks(n, d, parts)
        assert [b[0] for b in blocks] == [0] + [b[1] for b in blocks[:-1]] and blocks[-1][1] == n, blocks[:3]
        assert all((b - a) % (parts * kcpu._KNN_PANEL) == 0 for a, b in blocks[:-1]), (n, d, parts)


@needs_kernel
def test_knn_in_many_row_blocks_equals_one_block(threading_mode, monkeypatch):
    z = torch.from_numpy(np.random.default_rng(3).normal(size=(3 * kcpu._MIN_ROWS + 5, 7)).astype(np.float32))
    whole = kcpu.latent_knn(z, 6)
    monkeypatch.setattr(kcpu, "_KNN_BLOCK_WORK", 1)   # one panel per thread and block
    assert len(kcpu._knn_blocks(len(z), 7, kcpu._knn_parts(len(z)))) > 10
    _check_same_rows(kcpu.latent_knn(z, 6).numpy(), whole.numpy(), "knn in one-panel blocks")


@needs_kernel
def test_ctrl_c_stops_the_knn_search_between_row_blocks(monkeypatch):
    # a signal that arrives during a ctypes call is handled when the call returns: one call
    # over every row held Ctrl-C off for the whole search (18 s at 90,000 x 16 on one core)
    import signal
    lib = kcpu._load()
    if not lib.openmp:
        pytest.skip("the library was built without OpenMP")
    calls = []
    search = lib.spurfast_cpu_knn_parts

    def counted(*args):
        calls.append(1)
        return search(*args)

    def interrupt(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(lib, "spurfast_cpu_knn_parts", counted)
    monkeypatch.setattr(kcpu, "_KNN_BLOCK_WORK", 1 << 24, raising=False)
    z = torch.from_numpy(np.random.default_rng(4).normal(size=(12_000, 16)).astype(np.float32))
    kcpu.latent_knn(z, 5)
    n_calls, calls[:] = len(calls), []
    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.02)
        with pytest.raises(KeyboardInterrupt):
            kcpu.latent_knn(z, 5)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert len(calls) < n_calls, f"the search made all its {n_calls} calls before the interrupt was seen"


def _check_same_rows(got: np.ndarray, want: np.ndarray, name: str) -> None:
    bad = np.flatnonzero((got != want).any(1))
    assert bad.size == 0, (f"{name}: {bad.size} of {len(want)} rows differ, first row {bad[0]}: "
                           f"{got[bad[0]].tolist()} vs {want[bad[0]].tolist()}")


@needs_kernel
def test_knn_equal_distances_with_unequal_scores_go_to_the_lower_index(threading_mode, isa):
    # rows 0 and 1 are both exactly 13 from row 3 (also in fp32, centred), but the scores
    # |zj|^2 - 2 zi.zj the candidates are picked by round apart: the re-rank kept the score
    # order and gave row 1 (the reference, and the rule, give row 0)
    z = torch.tensor([[-1.0, 3.0], [4.0, -2.0], [0.0, -3.0], [2.0, 1.0], [3.0, 3.0], [4.0, 4.0], [4.0, -3.0]])
    assert kcpu.latent_knn(z, 2)[3].tolist() == [4, 0], kcpu.latent_knn(z, 2)[3].tolist()
    assert ref.latent_knn(z, 2)[3].tolist() == [4, 0]
    # many equal distances (quantised latents): small integers and their negatives, so the
    # mean is exactly 0, centring rounds nothing and every distance is exact
    rng = np.random.default_rng(3)
    for h, d, k in [(40, 2, 5), (150, 3, 10), (61, 1, 4), (300, 7, 12), (2100, 4, 10)]:   # last: 2 row ranges
        half = rng.integers(-3, 4, (h, d)).astype(np.float32)
        z = np.concatenate([half, -half])
        want = lower_index_knn(z, k)
        _check_same_rows(kcpu.latent_knn(torch.from_numpy(z), k).numpy(), want, f"cpu knn n={2 * h} d={d}")
        _check_same_rows(ref.latent_knn(torch.from_numpy(z), k).numpy(), want, f"reference knn n={2 * h} d={d}")


@pytest.mark.parametrize("fn", [ref.latent_knn, pytest.param(kcpu.latent_knn, marks=needs_kernel)],
                         ids=["reference", "cpu"])
def test_knn_refuses_rows_too_large_for_fp32_distances(fn):
    # |z|^2 overflows fp32 above ~1.8e19: the kernel's scores went inf and it gave index -1
    g = torch.Generator().manual_seed(0)
    base = torch.cat([torch.randn(50, 8, generator=g) + 5, torch.randn(50, 8, generator=g) - 5])
    with pytest.raises(ValueError, match="100 rows too large for fp32 distances"):
        fn(base * 1e19, 3)
    nn = fn(base * 1e15, 3)   # large but within range: the two blobs stay apart
    assert (nn >= 0).all() and ((nn < 50) == (torch.arange(100) < 50).unsqueeze(1)).all()
    nan = base.clone()
    nan[7, 2] = float("nan")
    with pytest.raises(ValueError, match="1 rows with NaN or inf"):
        fn(nan, 3)


@pytest.mark.parametrize("fn", [ref.latent_knn, pytest.param(kcpu.latent_knn, marks=needs_kernel)],
                         ids=["reference", "cpu"])
def test_knn_centres_float64_latents_before_rounding_them_to_fp32(fn):
    # 1e8 + noise: fp32's step there is 8, so a cast before the centring left every row
    # equal, and each row's neighbours came out as the lowest indices
    z = torch.randn(60, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = lower_index_knn(z.numpy(), 4)
    _check_same_rows(fn(z + 1e8, 4).numpy(), want, "knn of z + 1e8 (float64)")


@pytest.mark.parametrize("fn", [ref.kmeans_assign, pytest.param(kcpu.kmeans_assign, marks=needs_kernel),
                                pytest.param(kcpu.kmeans_assign_update, marks=needs_kernel)],
                         ids=["reference", "cpu", "cpu-fused"])
def test_x_sqnorm_of_the_wrong_shape_is_refused(fn):
    # the kernel read one |x|^2 per row past the end of a short tensor (garbage distances)
    x, off, cent, kpg = make_case([5000], 4, 8, seed=1, device="cpu")
    for bad in (torch.ones(3), torch.ones(5001), torch.ones(5000, 1)):
        with pytest.raises(ValueError, match=r"x_sqnorm has shape \(\d+(, 1)?,?\); expected \(5000,\)"):
            fn(x, off, cent, kpg, "l2", x_sqnorm=bad)
    fn(x, off, cent, kpg, "l2", x_sqnorm=(x * x).sum(1))


@pytest.mark.parametrize("fn", [ref.kmeans_assign, pytest.param(kcpu.kmeans_assign, marks=needs_kernel)],
                         ids=["reference", "cpu"])
def test_k_per_group_outside_0_to_kmax_is_refused_naming_the_group(fn):
    # the reference ran k = -1 (every centroid masked, yet finite distances) and 2.7 (as 2)
    x, off, cent, _ = make_case([20, 10], 3, 4, seed=2, device="cpu")
    for k, shown in (([3, -1], "-1"), ([3, 4], "4"), ([3.0, 2.7], "2.7")):
        with pytest.raises(ValueError, match=rf"k_per_group\[1\] = {shown}: expected an integer in \[0, kmax=3\]"):
            fn(x, off, cent, torch.tensor(k))
    fn(x, off, cent, torch.tensor([3.0, 2.0]))   # integer-valued floats are fine


@pytest.mark.parametrize("fn", [ref.kmeans_assign, pytest.param(kcpu.kmeans_assign, marks=needs_kernel)],
                         ids=["reference", "cpu"])
def test_infinite_or_huge_float_k_per_group_is_refused_showing_its_value(fn):
    # inf (and 1e30, past int64) went through the int64 cast first: the message said -9223372036854775808
    x, off, cent, _ = make_case([20, 10], 3, 4, seed=2, device="cpu")
    for v, shown in ((float("inf"), "inf"), (-float("inf"), "-inf"), (1e30, r"1e\+30")):
        with pytest.raises(ValueError, match=rf"k_per_group\[1\] = {shown}: expected an integer in \[0, kmax=3\]"):
            fn(x, off, cent, torch.tensor([3.0, v]))


def _duplicated_latents(n: int = 1531, d: int = 5, seed: int = 0):
    """Unique rows plus two large groups of identical rows (blank images), scattered over
    the pool: (z, [each group's row indices, ascending])."""
    rng = np.random.default_rng(seed)
    z = (3 * rng.normal(size=(n, d))).astype(np.float32)
    grp = rng.choice(3, n, p=[0.6, 0.3, 0.1])
    for g in (1, 2):
        z[grp == g] = rng.normal(size=d).astype(np.float32)
    return z, [np.flatnonzero(grp == g) for g in (1, 2)]


@pytest.mark.parametrize("column_block,chunk", [(ref.KNN_COLUMN_BLOCK, None), (7, 37), (1 << 30, None)],
                         ids=["pruned", "pruned-small-blocks", "unpruned"])
def test_reference_knn_ties_go_to_the_lower_index(column_block, chunk):
    # the reference runs on CUDA and under SPURFAST_BACKEND_LATENT_KNN=torch; with
    # duplicated latents its topk took arbitrary tied columns (different ones pruned and
    # unpruned), so discovery's scores changed between CPU and GPU runs of the same seed
    z, groups = _duplicated_latents()
    k = 10
    nn = ref.latent_knn(torch.from_numpy(z), k, chunk=chunk, column_block=column_block).numpy()
    _check_knn(nn, z, k, f"reference knn, column block {column_block}")
    bad = []
    for members in groups:
        picked = np.isin(nn, members)
        for i in np.flatnonzero(picked.any(1)):
            # a row's picks from a group of identical rows: the group's lowest indices, ascending
            want = members[members != i][:int(picked[i].sum())]
            if nn[i][picked[i]].tolist() != want.tolist():
                bad.append(i)
    assert not bad, (f"{len(bad)} rows break the lower-index rule, first row {bad[0]}: "
                     f"{nn[bad[0]].tolist()}")


@pytest.mark.parametrize("fn", [ref.latent_knn, pytest.param(kcpu.latent_knn, marks=needs_kernel)],
                         ids=["reference", "cpu"])
def test_a_wider_knn_search_begins_with_the_narrower_one(fn):
    """Discovery's look-alike null searches 5 x n_neighbours once and keeps the first
    n_neighbours columns as the neighbours: exactly the narrower search, ties (copies of one
    latent) included."""
    z = torch.from_numpy(duplicated_latents(3))
    wide = fn(z, 50).numpy()
    for k in (1, 10, 17):
        narrow = fn(z, k).numpy()
        bad = np.flatnonzero((wide[:, :k] != narrow).any(1))
        assert bad.size == 0, (f"k={k}: {bad.size} rows differ, first row {bad[0]}: "
                               f"wide {wide[bad[0], :k].tolist()} vs narrow {narrow[bad[0]].tolist()}")


@needs_kernel
def test_knn_kernel_matches_the_reference_on_duplicated_latents(threading_mode, isa):
    z, _ = _duplicated_latents(2999, 16, seed=1)
    nn = kcpu.latent_knn(torch.from_numpy(z), 10).numpy()
    for block in (ref.KNN_COLUMN_BLOCK, 1 << 30):
        r = ref.latent_knn(torch.from_numpy(z), 10, column_block=block).numpy()
        bad = np.flatnonzero((nn != r).any(1))
        assert bad.size == 0, (f"column block {block}: {bad.size} rows differ, first row {bad[0]}: "
                               f"kernel {nn[bad[0]].tolist()} vs reference {r[bad[0]].tolist()}")


@needs_kernel
def test_tight_clusters_far_from_the_origin_keep_accurate_distances():
    # |x|^2 + |c|^2 - 2 x.c cancels every digit here: the kernel must recompute directly
    g = torch.Generator().manual_seed(5)
    cent = 300.0 + torch.randn(1, 4, 32, generator=g)
    x = cent[0, torch.arange(400) % 4] + 1e-3 * torch.randn(400, 32, generator=g)
    off, kpg = torch.tensor([0, 400]), torch.tensor([4])
    assign, dist = kcpu.kmeans_assign(x, off, cent, kpg, x_sqnorm=(x * x).sum(1))
    exact = exact_dists(x, off, cent, kpg, "l2").gather(1, assign.unsqueeze(1)).squeeze(1)
    assert_equal_int(assign, torch.arange(400) % 4, "assignments")
    assert_close(dist, exact.float(), torch.float32, name="tight-cluster distances", atol=1e-7, rtol=1e-3)


@needs_kernel
def test_bad_input_gets_clear_errors():
    x, off, cent, kpg = make_case([40, 10], 4, 8, seed=0, device="cpu")
    with pytest.raises(ValueError, match="cluster indices"):
        kcpu.kmeans_update(x, off, torch.full((50,), 4), 4)
    with pytest.raises(ValueError, match="offsets must not decrease"):
        kcpu.kmeans_assign(x, torch.tensor([0, 30, 20, 50]), cent[[0, 1, 1]], kpg[[0, 1, 1]])
    with pytest.raises(ValueError, match="offsets must run from 0 to N=50, got 0..20"):
        kcpu.kmeans_assign(x, torch.tensor([0, 30, 20]), cent, kpg)
    with pytest.raises(ValueError, match="k_per_group"):
        kcpu.kmeans_assign(x, off, cent, torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="metric"):
        kcpu.kmeans_assign(x, off, cent, kpg, "dot")
    with pytest.raises(ValueError, match="kmax = 0"):   # the fused sums were written out of bounds
        kcpu.kmeans_assign_update(x, off, cent[:, :0], torch.zeros(2, dtype=torch.int64))


@needs_kernel
@pytest.mark.parametrize("provider", ["cpu", "torch"])
@pytest.mark.parametrize("as_", [list, np.array], ids=["list", "ndarray"])
def test_offsets_that_are_not_a_tensor_are_refused_by_every_provider(provider, as_):
    # the cpu provider ran them and the reference refused them: code that worked on an AVX2
    # machine failed on the fallback
    x, kpg = torch.randn(10, 3), torch.tensor([2, 1])
    calls = {"kmeans_assign": (x, as_([0, 4, 10]), torch.randn(2, 2, 3), kpg),
             "kmeans_update": (x, as_([0, 4, 10]), torch.zeros(10, dtype=torch.int64), 2),
             "kmeans_plusplus": (x, as_([0, 4, 10]), kpg, 2, torch.Generator().manual_seed(0))}
    for op, args in calls.items():
        with pytest.raises(ValueError, match=r"offsets must be a 1-D tensor \(G \+ 1,\), got "):
            backends.call(op, *args, backend=provider)


@needs_kernel
def test_registry_sends_cpu_tensors_to_the_fused_kernel_and_kmeans_agrees():
    backends.clear_cache()
    assert backends.resolve("kmeans_assign", None, "cpu")[0] == "cpu"
    assert backends.resolve("kmeans_update", None, "cpu")[0] == "cpu"
    for op in ("kmeans_assign_update", "kmeans_plusplus", "latent_knn"):
        assert backends.resolve(op, None, "cpu")[0] == "cpu", op
        assert backends.resolve(op, None, "cuda")[0] == "torch", f"{op}: CUDA tensors must not reach the CPU kernel"
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(3, 5, 16, generator=g) * 10
    groups = torch.arange(3).repeat_interleave(400)
    x = centres[groups, torch.randint(0, 5, (1200,), generator=g)] + 0.1 * torch.randn(1200, 16, generator=g)
    fused = batched_kmeans(x, groups, [5, 5, 5], seed=1)
    torch_ = batched_kmeans(x, groups, [5, 5, 5], seed=1, backend="torch")
    assert_equal_int(fused.assign, torch_.assign, "assignments, well-separated data")
    assert_close(fused.centroids, torch_.centroids, torch.float32, name="centroids")
    backends.clear_cache()


def test_unavailable_says_why_and_the_registry_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(kcpu, "_lib", None)
    monkeypatch.setattr(kcpu, "_why_not", None)
    monkeypatch.setenv("SPURFAST_KMEANS_CPU", "0")
    ok, why = kcpu.is_available()
    assert not ok and "SPURFAST_KMEANS_CPU=0" in why
    backends.clear_cache()
    assert backends.resolve("kmeans_assign", None, "cpu")[0] == "torch"
    with pytest.raises(RuntimeError, match="unavailable"):
        kcpu.kmeans_assign(torch.zeros(2, 2), torch.tensor([0, 2]), torch.zeros(1, 1, 2), torch.tensor([1]))
    backends.clear_cache()
    # "false" or "off" left the kernels on without a word: a value other than 0 or 1 is named
    for value in ("false", "off"):
        monkeypatch.setattr(kcpu, "_why_not", None)
        monkeypatch.setenv("SPURFAST_KMEANS_CPU", value)
        with caplog.at_level(logging.WARNING, logger="spurfast.kernels"):
            caplog.clear()
            ok, why = kcpu.is_available()
            kcpu.is_available()
        assert not ok and f"SPURFAST_KMEANS_CPU must be 0 or 1, got {value!r}" in why, why
        # at the default log level, once: the fallback alone was logged at INFO, so a run was slower without a word
        assert [r.getMessage() for r in caplog.records] == [why]
    backends.clear_cache()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("provider", ["reference", pytest.param("cpu", marks=needs_kernel)])
@pytest.mark.parametrize("sizes,kpg", [((5, 12, 9, 0, 4), (2, 0, 3, 0, 0)),
                                       ((2100, 30), (0, 4))],      # a large group runs unpadded in the reference
                         ids=["small-groups", "large-group"])
def test_groups_without_centroids_get_infinite_distances(provider, metric, sizes, kpg):
    fn = ref.kmeans_assign if provider == "reference" else kcpu.kmeans_assign
    check_groups_without_centroids(fn, metric, sizes=sizes, kpg=kpg, name=provider)


@pytest.mark.parametrize("fn", [ref.kmeans_assign, pytest.param(kcpu.kmeans_assign, marks=needs_kernel)],
                         ids=["reference", "cpu"])
def test_centroids_with_kmax_zero_are_refused(fn):
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="hold no centroid"):
        fn(x, torch.tensor([0, 4]), torch.zeros(1, 0, 3), torch.tensor([0]))
    fn(x[:0], torch.tensor([0, 0]), torch.zeros(1, 0, 3), torch.tensor([0]))   # no points: nothing to assign


@needs_kernel
def test_fractional_offsets_or_assign_are_refused_not_truncated():
    """The int64 casts truncated offsets 2.5 to 2 and assign 1.5 to 1: rows went to another
    group or cluster, silently."""
    x = torch.arange(15.0).reshape(5, 3)
    cent, kpg = torch.zeros(2, 2, 3), torch.tensor([2, 2])
    off_bad = torch.tensor([0, 2.5, 5])
    with pytest.raises(ValueError, match=r"offsets holds 2.5 \(entry 1\); expected integers"):
        kcpu.kmeans_assign(x, off_bad, cent, kpg)
    with pytest.raises(ValueError, match=r"offsets holds 2.5 \(entry 1\); expected integers"):
        kcpu.kmeans_update(x, off_bad, torch.zeros(5, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match=r"offsets holds 2.5 \(entry 1\); expected integers"):
        kcpu.kmeans_plusplus(x, off_bad, kpg, 2, torch.Generator().manual_seed(0))
    off = torch.tensor([0, 2, 5])
    with pytest.raises(ValueError, match=r"assign holds 1.5 \(entry 1\); expected integers"):
        kcpu.kmeans_update(x, off, torch.tensor([0, 1.5, 0, 1, 1]), 2)
    # whole floats are indices like any other
    whole = torch.tensor([0, 1, 0, 1, 1])
    for got, want in zip(kcpu.kmeans_update(x, off.float(), whole.float(), 2), kcpu.kmeans_update(x, off, whole, 2)):
        assert_bitwise(got, want, "update with whole-float offsets and assign")


@needs_kernel
def test_plusplus_refuses_fractional_k_and_takes_a_list_as_the_reference():
    """k_per_group 1.5 seeded one centroid (the int64 cast truncated it), silently, in both
    k-means++ providers, where the assign refuses it; the reference also failed on a list
    ('list' object has no attribute 'long'), which this kernel takes."""
    x, off = torch.arange(30.0).reshape(10, 3), torch.tensor([0, 5, 10])
    for fn in (kcpu.kmeans_plusplus, ref.kmeans_plusplus):
        with pytest.raises(ValueError, match=r"k_per_group holds 1.5 \(entry 0\); expected integers"):
            fn(x, off, torch.tensor([1.5, 2.0]), 3, torch.Generator().manual_seed(0))
    want = ref.kmeans_plusplus(x, off, torch.tensor([1, 2]), 3, torch.Generator().manual_seed(0))
    for fn in (kcpu.kmeans_plusplus, ref.kmeans_plusplus):
        for k in ([1, 2], torch.tensor([1.0, 2.0])):
            assert_bitwise(fn(x, off, k, 3, torch.Generator().manual_seed(0)), want, f"plusplus {fn.__module__} k={k}")


@needs_kernel
@pytest.mark.parametrize("k", [1e30, 2.0 ** 63])
def test_plusplus_refuses_a_float_k_past_int64_instead_of_drawing_no_seeds(k):
    """A float k_per_group of 1e30 passed the integer check, the int64 cast wrapped it to
    -2**63, and that group silently got no seeds in both k-means++ providers (an int64 k
    above kmax gets kmax seeds)."""
    x, off = torch.randn(20, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 10, 20])
    for fn in (kcpu.kmeans_plusplus, ref.kmeans_plusplus):
        with pytest.raises(ValueError, match=r"k_per_group holds (9.22337e\+18|1e\+30) \(entry 1\); "
                                             r"expected integers within int64"):
            fn(x, off, torch.tensor([2.0, k], dtype=torch.float64), 3, torch.Generator().manual_seed(0))


@needs_kernel
@pytest.mark.parametrize("k, pattern", [
    (torch.tensor([2, -1]), r"k_per_group\[1\] = -1: expected a non-negative integer"),
    (torch.tensor([-3.0, 1.0]), r"k_per_group\[0\] = -3: expected a non-negative integer"),
    (torch.tensor([[1, 2]]), r"k_per_group has shape \(1, 2\); expected \(1,\), one k per group"),
])
def test_plusplus_refuses_a_negative_or_two_dimensional_k_as_the_assign_does(k, pattern):
    """A negative k gave its group no seeds, silently, in both k-means++ providers (the
    assign refuses it); a (1, 2) k_per_group for one group ran as k = 1 in the CPU kernel
    and failed in an IndexError in the reference."""
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    off = torch.tensor([0, 10, 20]) if k.dim() == 1 else torch.tensor([0, 20])
    for fn in (kcpu.kmeans_plusplus, ref.kmeans_plusplus):
        with pytest.raises(ValueError, match=pattern):
            fn(x, off, k, 3, torch.Generator().manual_seed(0))


@needs_kernel
@pytest.mark.parametrize("value", [".", "cache"])
def test_a_relative_cache_dir_builds_a_library_that_loads(value, tmp_path, monkeypatch):
    """dlopen takes a name without a slash as a library to search for: with
    SPURFAST_CACHE_DIR=. the kernels were built into the working directory and then never
    loaded (unavailable: 'cannot open shared object file'), so every call fell back to the
    reference."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPURFAST_CACHE_DIR", value)
    monkeypatch.setattr(kcpu, "_lib", None)
    monkeypatch.setattr(kcpu, "_why_not", None)
    assert kcpu.is_available() == (True, "")
    assert list((tmp_path / value).glob("kmeans_cpu-*.so"))


@needs_kernel
def test_the_built_library_is_readable_by_all_and_killed_builds_are_swept(tmp_path, monkeypatch):
    """mkstemp's 0600 left the library 0711 after the compiler: another user sharing the cache
    could not load it and ran the reference kernels without a word.  A build killed with
    kill -9 left its temporary library for good."""
    import os
    import stat
    import subprocess
    import sys
    import time
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    tmp_path.mkdir(exist_ok=True)
    killed = tmp_path / f"kmeans_cpu-0123456789abcdef.{dead}.abcd1234.so.tmp"
    legacy = tmp_path / "tmpq1w2e3r4.so"               # an older version's mkstemp name
    foreign = tmp_path / "tmpk2j4_plugin.so"           # another program's, in a shared cache folder
    recent = tmp_path / f"kmeans_cpu-0123456789abcdef.{dead}.ffff0000.so.tmp"
    for f in (killed, legacy, recent, foreign):
        f.write_bytes(b"half a library")
    legacy.write_bytes(b"ELF ... spurfast_cpu_assign ...")
    for f in (killed, legacy, foreign):
        os.utime(f, (time.time() - 3600,) * 2)
    monkeypatch.setenv("SPURFAST_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kcpu, "_lib", None)
    monkeypatch.setattr(kcpu, "_why_not", None)
    assert kcpu.is_available() == (True, "")
    (lib,) = tmp_path.glob("kmeans_cpu-*.so")
    assert stat.S_IMODE(lib.stat().st_mode) & 0o444 == 0o444, oct(lib.stat().st_mode)
    assert not killed.exists() and not legacy.exists() and recent.exists()   # a minute: maybe another's live build
    assert foreign.exists(), "another program's tmp*.so in the cache folder was deleted"


def test_an_empty_cache_dir_means_the_default(monkeypatch, tmp_path):
    # an empty value built the library into the working directory (and then failed to load it)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SPURFAST_CACHE_DIR", "")
    assert kcpu._cache_dir() == tmp_path / ".cache" / "spurfast"


@pytest.mark.parametrize("mod", [ref, pytest.param(kcpu, marks=needs_kernel)], ids=["reference", "cpu"])
def test_odd_size_arguments_are_refused_by_name_and_integer_ones_taken(mod):
    """kmax / k that are not non-negative integers: -1 failed deep in zeros() or numpy
    ("negative dimensions are not allowed", naming neither), the CPU kernel's latent_knn ran
    k = 1.5 as 1 neighbour where the reference refused it, and its kmeans_update failed on
    a 0-d tensor kmax the reference takes."""
    x, off, assign = torch.randn(20, 3), torch.tensor([0, 12, 20]), torch.zeros(20, dtype=torch.int64)
    kpg, gen = torch.tensor([2, 2]), lambda: torch.Generator().manual_seed(0)
    for n in (20, 0):   # with points and without
        o = off if n else torch.tensor([0, 0, 0])
        with pytest.raises(ValueError, match=r"kmax must be >= 0, got -1"):
            mod.kmeans_update(x[:n], o, assign[:n], -1)
        with pytest.raises(ValueError, match=r"kmax must be >= 0, got -1"):
            mod.kmeans_plusplus(x[:n], o, kpg, -1, gen())
    with pytest.raises(TypeError, match=r"kmax must be an integer, got 2.5"):
        mod.kmeans_update(x, off, assign, 2.5)
    with pytest.raises(TypeError, match=r"kmax must be an integer, got 2.5"):
        mod.kmeans_plusplus(x, off, kpg, 2.5, gen())
    with pytest.raises(TypeError, match=r"k must be an integer, got 1.5"):
        mod.latent_knn(x, 1.5)
    with pytest.raises(ValueError, match=r"k must be >= 0, got -1"):
        mod.latent_knn(x, -1)
    want = ref.kmeans_update(x, off, assign, 2)
    for kmax in (np.int64(2), torch.tensor(2)):
        assert_same_outputs(mod.kmeans_update(x, off, assign, kmax), want, f"kmax={kmax!r}")
        assert_bitwise(mod.kmeans_plusplus(x, off, kpg, kmax, gen()), mod.kmeans_plusplus(x, off, kpg, 2, gen()),
                       f"{mod.__name__} plusplus, kmax {kmax!r} vs 2")
        assert_bitwise(mod.latent_knn(x, kmax), mod.latent_knn(x, 2), f"{mod.__name__} latent_knn, k {kmax!r} vs 2")


@needs_kernel
@pytest.mark.parametrize("spread", [3e-3, 1e-3, 1e-4])
def test_knn_is_exact_for_a_tight_blob_far_from_the_mean_as_the_reference(spread, threading_mode):
    """The kernel's screen (the GEMM score |zj|^2 - 2 zi.zj) picked the 2k candidates at
    random inside a blob tighter than its rounding: every blob row missed true neighbours
    at spread 1e-3, and the kernel and the reference disagreed on 994 of 1000.  Such rows
    are measured again directly, with the reference's test: exact, and equal to it."""
    z = tight_blob(4000, 1000, 16, spread)   # 5000 rows: two row ranges (threads)
    nn = kcpu.latent_knn(torch.from_numpy(z), 10).numpy()
    check_exact_rows(nn, z, np.arange(4000, 5000), 10, f"cpu knn, spread {spread:g}")
    check_exact_rows(nn, z, np.arange(0, 4000, 37), 10, f"cpu knn, spread {spread:g}, wide rows")
    r = ref.latent_knn(torch.from_numpy(z), 10).numpy()
    bad = np.flatnonzero((nn != r).any(1))
    assert bad.size == 0, (f"{bad.size} rows differ from the reference, first row {bad[0]}: "
                           f"kernel {nn[bad[0]].tolist()} vs reference {r[bad[0]].tolist()}")


@needs_kernel
def test_knn_is_exact_for_a_tight_blob_in_odd_shapes(threading_mode, isa):
    """n not a multiple of the 96-row panels or 16-column tiles, d = 13 (a tail after the
    8-wide vectors), k = 7, two row ranges; the reference agrees."""
    z = tight_blob(3797, 302, 13, 3e-4, seed=5)
    nn = kcpu.latent_knn(torch.from_numpy(z), 7).numpy()
    check_exact_rows(nn, z, np.arange(len(z)), 7, "cpu knn, odd shapes")
    r = ref.latent_knn(torch.from_numpy(z), 7).numpy()
    assert np.array_equal(nn, r), f"{int((nn != r).any(1).sum())} rows differ from the reference"


@needs_kernel
def test_knn_measures_each_duplicated_latent_once_as_the_reference(threading_mode, monkeypatch):
    """Copies of a latent with more than 2k others at distance 0 are never certain: the
    kernel measured each one again against every column (n d each); now each distinct
    latent once, through the reference's knn_remeasure, with the kernel's distances."""
    z = duplicated_latents(seed=1)
    rows, points = spy_on_remeasure(monkeypatch, kcpu, "_knn_measure")
    nn = kcpu.latent_knn(torch.from_numpy(z), 10).numpy()
    _check_same_rows(nn, lower_index_knn(z, 10), "cpu knn of duplicated latents")
    _check_same_rows(nn, ref.latent_knn(torch.from_numpy(z), 10).numpy(), "cpu knn vs the reference")
    # the copies of the two large groups count once each (ordinary rows nearest to a copy
    # are uncertain too: their k-th candidate ties with copies left out)
    assert sum(rows) >= 850, f"only {sum(rows)} rows measured again (the copies are not certain)"
    assert sum(points) <= sum(rows) - 848, f"{sum(points)} latents measured for {sum(rows)} rows"


@needs_kernel
def test_the_cpu_kernels_name_a_decrease_inside_the_offsets():
    """The message showed the offsets' first and last three entries: a decrease in the middle
    was invisible in it."""
    x = torch.zeros(20, 4)
    off = torch.tensor([0, 2, 4, 6, 9, 8, 12, 14, 16, 18, 20])
    with pytest.raises(ValueError, match=r"offsets\[4\] = 9 > offsets\[5\] = 8 \(group 4 of size -1\)"):
        kcpu.kmeans_assign(x, off, torch.zeros(10, 2, 4), torch.full((10,), 2))


@needs_kernel
def test_the_cpu_knn_refuses_latents_without_dimensions():
    with pytest.raises(ValueError, match=r"z must be \(n, d\) with d >= 1, got shape \(40, 0\)"):
        kcpu.latent_knn(torch.zeros(40, 0), 3)


@needs_kernel
def test_a_compiler_without_openmp_builds_once_and_later_loads_go_straight_to_the_serial_library(
        tmp_path, monkeypatch):
    """A compiler that cannot link -fopenmp (no libgomp): every new process compiled the whole
    file again (about 3 s) before it loaded the serial library cached by the first."""
    import shutil

    calls = tmp_path / "calls.log"
    fake = tmp_path / "g++-no-gomp"
    real = shutil.which("g++") or shutil.which("c++")
    fake.write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\n"
                    f"for a in \"$@\"; do [ \"$a\" = -fopenmp ] && exit 1; done\nexec {real} \"$@\"\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv("SPURFAST_CACHE_DIR", str(tmp_path / "cache"))
    for _ in range(2):   # two processes' first loads
        monkeypatch.setattr(kcpu, "_lib", None)
        monkeypatch.setattr(kcpu, "_why_not", None)
        assert kcpu.is_available() == (True, "") and not kcpu._lib.openmp
    built = [c for c in calls.read_text().splitlines() if "-print-file-name" not in c]
    assert len(built) == 2 and "-fopenmp" in built[0] and "-fopenmp" not in built[1], built


@needs_kernel
def test_a_no_openmp_mark_made_before_the_runtime_was_installed_is_tried_again(tmp_path, monkeypatch):
    """The mark stayed after libgomp was installed: the serial library for good, until the
    user found and removed the file the log had named."""
    monkeypatch.setenv("SPURFAST_CACHE_DIR", str(tmp_path))
    cxx = kcpu._cxx()
    if not kcpu._openmp_runtime(cxx).split()[2].startswith("/"):
        pytest.skip("this compiler finds no libgomp")
    mark = kcpu._library_path(cxx, (*kcpu.FLAGS, kcpu.OPENMP)).with_suffix(".no-openmp")
    mark.parent.mkdir(parents=True, exist_ok=True)
    for text, openmp in (("openmp runtimes: libgomp.so libomp.so\nno libgomp\n", True),
                         (kcpu._openmp_runtime(cxx) + "\nstill none\n", False)):
        mark.write_text(text)
        for f in tmp_path.glob("*.so"):
            f.unlink()
        monkeypatch.setattr(kcpu, "_lib", None)
        monkeypatch.setattr(kcpu, "_why_not", None)
        assert kcpu.is_available() == (True, "") and kcpu._lib.openmp == openmp
        assert mark.exists() != openmp   # a stale mark goes


@needs_kernel
def test_a_file_at_the_librarys_name_without_its_functions_is_reported_not_raised(tmp_path, monkeypatch):
    """A library at the cached name that lacks the kernels' functions (another version's, a
    damaged copy) raised AttributeError out of is_available(), which promises (False, why)."""
    monkeypatch.setenv("SPURFAST_CACHE_DIR", str(tmp_path))
    cxx = kcpu._cxx()
    other = tmp_path / "other.cpp"
    other.write_text("extern \"C\" int something_else() { return 1; }\n")
    target = kcpu._library_path(cxx, (*kcpu.FLAGS, kcpu.OPENMP))
    subprocess.run([cxx, "-shared", "-fPIC", str(other), "-o", str(target)], check=True)
    monkeypatch.setattr(kcpu, "_lib", None)
    monkeypatch.setattr(kcpu, "_why_not", None)
    ok, why = kcpu.is_available()
    assert not ok and "is not this version's library" in why and str(target) in why, why


@needs_kernel
def test_an_unwritable_cache_folder_is_named_with_the_variable_that_moves_it(tmp_path, monkeypatch):
    """The reason given was a bare FileNotFoundError/NotADirectoryError naming a path."""
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("SPURFAST_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    monkeypatch.setattr(kcpu, "_lib", None)
    monkeypatch.setattr(kcpu, "_why_not", None)
    ok, why = kcpu.is_available()
    assert not ok and "cannot write the CPU kernels' cache folder" in why and "SPURFAST_CACHE_DIR" in why, why
