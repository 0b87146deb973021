"""CuPy k-means kernels against the torch reference.

GPU tests are marked ``gpu`` and skip cleanly without CUDA.  CPU tests check what can be
checked without a device: the backend reports itself unavailable with a reason, the
registry falls back to torch, and every .cu source compiles with NVRTC (the launcher's
fallback path) for sm_80 and sm_90.
"""
from __future__ import annotations

import pytest
import torch

from spurfast import backends
from spurfast.kernels import kmeans_cupy as kc
from spurfast.kernels.group_layout import split_centroids
from spurfast.kernels import reference as ref
from tests.helpers import (CASES, EMPTY_CASES, assert_close, assert_equal_int, assert_same_outputs,
                           check_assign_near_optimal, check_groups_without_centroids, empty_case, exact_dists,
                           exact_sums, make_case)

HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------- CPU tests
@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only behaviour")
def test_is_available_false_with_reason_and_registry_falls_back():
    ok, why = kc.is_available()
    assert ok is False
    assert "cupy" in why or "CUDA" in why, why
    backends.clear_cache()
    for op in ("kmeans_assign", "kmeans_update", "cluster_similarity"):
        name, fn = backends.resolve(op, "auto")
        assert name != "cupy"
        with pytest.raises(backends.BackendUnavailable, match="unavailable here"):
            backends.resolve(op, "cupy")
    # no fused CPU kernel for the similarity step: the reference serves it
    assert backends.resolve("cluster_similarity", "auto") == ("torch", ref.cluster_similarity)
    backends.clear_cache()


def test_cpu_tensors_get_a_clear_error():
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        kc.kmeans_assign(x, torch.tensor([0, 4]), torch.zeros(1, 2, 3), torch.tensor([2]))
    with pytest.raises(ValueError, match="metric must be 'l2' or 'cosine', got 'dot'"):
        kc.kmeans_assign(x, torch.tensor([0, 4]), torch.zeros(1, 2, 3), torch.tensor([2]), "dot")


@pytest.mark.parametrize("source", kc.SOURCES)
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_sources_compile_with_nvrtc(source, arch):
    """The launcher's fallback: the same text (include pasted) through NVRTC, no device needed."""
    try:
        from cupy_backends.cuda.libs import nvrtc
    except Exception as exc:  # cupy missing or laid out differently
        pytest.skip(f"NVRTC bindings unavailable: {exc}")
    try:
        nvrtc.getVersion()
    except Exception as exc:
        pytest.skip(f"libnvrtc not loadable: {exc}")
    src = kc.source_text(source)
    assert not [ln for ln in src.splitlines() if ln.lstrip().startswith("#include")], "include left unpasted"
    prog = nvrtc.createProgram(src, f"{source}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, ["-std=c++17", f"-arch={arch}"])
        except Exception as exc:
            raise AssertionError(f"NVRTC failed on {source}.cu: {exc}\n{nvrtc.getProgramLog(prog)}") from None
        ptx = nvrtc.getPTX(prog)
        text = ptx.decode() if isinstance(ptx, bytes) else ptx
        expected = {
            "kmeans_assign": [f"spurfast_assign_{dt}_{tp}x{tk}" for dt in ("f32", "f16", "bf16")
                              for tk, tp in kc.ASSIGN_SHAPES] + ["spurfast_assign_tc_f16", "spurfast_assign_tc_bf16"]
                             # the launcher's two-pass tensor-core kernels (tc2_shape: 1 or 2 tiles per warp)
                             + [f"spurfast_assign_tc2_{dt}_m{mt}" for dt in ("f16", "bf16") for mt in (1, 2)],
            "kmeans_update": [f"spurfast_update_partial_{dt}" for dt in ("f32", "f16", "bf16")]
                             + ["spurfast_update_finalize"],
            "kmeans_similarity": [f"spurfast_sim_point_{dt}" for dt in ("f32", "f16", "bf16")]
                                 + ["spurfast_sim_cluster"],
        }[source]
        missing = [e for e in expected if f".entry {e}(" not in text]
        assert not missing, f"entry points missing from {source}: {missing}"
    finally:
        nvrtc.destroyProgram(prog)


def test_find_fatbin_prefers_exact_then_same_major(tmp_path, monkeypatch):
    for arch in (80, 86, 90):
        (tmp_path / f"kmeans_update_sm{arch}.fatbin").write_bytes(b"x")
    monkeypatch.setattr(kc, "PREBUILT_DIR", tmp_path)
    monkeypatch.delenv("SPURFAST_KMEANS_FATBIN_DIR", raising=False)
    assert kc.find_fatbin("kmeans_update", 90).name == "kmeans_update_sm90.fatbin"
    assert kc.find_fatbin("kmeans_update", 89).name == "kmeans_update_sm86.fatbin"
    assert kc.find_fatbin("kmeans_update", 100) is None       # other major: NVRTC
    assert kc.find_fatbin("kmeans_assign", 90) is None


def test_find_fatbin_reads_arch_specific_and_family_builds(tmp_path, monkeypatch):
    # CMake accepts "90a" and "100f"; their fatbins were built and then never loaded
    for tag in ("90a", "100f"):
        (tmp_path / f"kmeans_assign_sm{tag}.fatbin").write_bytes(b"x")
    monkeypatch.setattr(kc, "PREBUILT_DIR", tmp_path)
    monkeypatch.delenv("SPURFAST_KMEANS_FATBIN_DIR", raising=False)
    assert kc.find_fatbin("kmeans_assign", 90).name == "kmeans_assign_sm90a.fatbin"
    assert kc.find_fatbin("kmeans_assign", 89) is None        # sm_90a runs on 9.0 only
    assert kc.find_fatbin("kmeans_assign", 103).name == "kmeans_assign_sm100f.fatbin"
    assert kc.find_fatbin("kmeans_assign", 120) is None
    (tmp_path / "kmeans_assign_sm90.fatbin").write_bytes(b"x")
    assert kc.find_fatbin("kmeans_assign", 90).name == "kmeans_assign_sm90.fatbin"   # plain first


def test_update_counts_points_without_coordinates(monkeypatch):
    # d == 0: nothing to sum, but the counts are real (all zeros read as empty clusters);
    # the path up to that return is torch only, so it runs on CPU tensors
    monkeypatch.setattr(kc, "_check_x", lambda x, name="x": x.contiguous())
    x, off, assign = torch.zeros(5, 0), torch.tensor([0, 3, 5]), torch.tensor([0, 1, 1, 2, 2])
    sums, counts = kc.kmeans_update(x, off, assign, 3)
    ref_sums, ref_counts = ref.kmeans_update(x, off, assign, 3)
    assert counts.tolist() == ref_counts.tolist() == [[1, 2, 0], [0, 0, 2]]
    assert sums.shape == ref_sums.shape == (2, 3, 0)


def test_update_without_points_or_clusters_matches_the_reference(monkeypatch):
    # kmax = 0 and N = 0: the reference and the CPU kernel return (G, 0, d) sums; this refused
    # "kmax must be >= 1".  With points, kmax = 0 is refused naming assign.  Torch only up to there.
    monkeypatch.setattr(kc, "_check_x", lambda x, name="x": x.contiguous())
    x, off, assign = torch.zeros(0, 3), torch.tensor([0, 0, 0]), torch.zeros(0, dtype=torch.int64)
    assert_same_outputs(kc.kmeans_update(x, off, assign, 0), ref.kmeans_update(x, off, assign, 0), "kmax=0, N=0")
    with pytest.raises(ValueError, match=r"assign has values in \[0, 0\]; expected cluster indices in \[0, 0\)"):
        kc.kmeans_update(torch.zeros(2, 3), torch.tensor([0, 2]), torch.zeros(2, dtype=torch.int64), 0)


def test_update_grid_never_exceeds_the_point_count(monkeypatch):
    # the chunk bound N / 64 + min(S, N) passed 2**31 blocks (CUDA's grid limit) for N just
    # under the 2**31 rows _check_x allows; every chunk holds a row, so N bounds it.  The
    # launch is recorded, not run: the path up to it is torch only
    monkeypatch.setattr(kc, "_check_x", lambda x, name="x": x.contiguous())
    grids = []

    class Launch:
        def __init__(self, device):
            self.index = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(kc, "_Launch", Launch)
    monkeypatch.setattr(kc, "_fn", lambda source, entry, index: lambda grid, block, args: grids.append(grid[0]))
    # 5 points in 2 groups of kmax = 8: S = 16 segments, 3 chunks of one row or more
    kc.kmeans_update(torch.zeros(5, 3), torch.tensor([0, 2, 5]), torch.tensor([0, 1, 0, 0, 7]), 8)
    assert 3 <= grids[0] <= 5, grids


def _check_empty_input(op, device, dtype=torch.float32):
    """N = 0 (with G = 0 too, and kmax = 0 for the similarity) against the reference on the
    CPU: zero sums and counts, -1 exemplars, zero means, outputs on x's device."""
    for G, kmax, d in EMPTY_CASES:
        x, off, assign, cent, kpg = empty_case(G, kmax, d, kmax, device, dtype)
        rx, roff, rassign, rcent, rkpg = (t.cpu() for t in (x, off, assign, cent, kpg))
        tag = f"{op} N=0, G={G}, kmax={kmax}, d={d}, {dtype}"
        if op == "update":
            for deterministic in (True, False):
                got = kc.kmeans_update(x, off, assign, kmax, deterministic=deterministic)
                assert all(t.device == x.device for t in got), f"{tag}: outputs not on {x.device}"
                assert_same_outputs(got, ref.kmeans_update(rx.float(), roff, rassign, kmax),
                                    f"{tag} deterministic={deterministic}")
            continue
        for m in (0, 1, 8):
            for k in (kmax, 0):   # k = 0: centroids (G, 0, d), no clusters at all
                got = kc.cluster_similarity(x, off, assign, cent[:, :k], kpg.clamp_max(k), m)
                assert all(t.device == x.device for t in got), f"{tag}: outputs not on {x.device}"
                assert_same_outputs(got, ref.cluster_similarity(rx.float(), roff, rassign, rcent[:, :k],
                                                                rkpg.clamp_max(k), m), f"{tag} kmax={k} m={m}")


@pytest.mark.parametrize("op", ["update", "similarity"])
def test_empty_input_matches_the_reference(op, monkeypatch):
    # N = 0 returns before any launch: the path up to there is torch only, so it runs on CPU
    # tensors here (test_empty_input_on_the_gpu runs it on the device)
    monkeypatch.setattr(kc, "_check_x", lambda x, name="x": x.contiguous())
    _check_empty_input(op, "cpu")


# ----------------------------------------------------------------------------- GPU tests
def _cast(x, dtype):
    return x.to(dtype).contiguous()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tc", [(torch.float32, "0"), (torch.float16, "1"), (torch.float16, "0"),
                                      (torch.bfloat16, "1"), (torch.bfloat16, "0"), (torch.float16, "v1"),
                                      (torch.bfloat16, "v1")],
                         ids=["fp32", "fp16-tensorcore", "fp16-simt", "bf16-tensorcore", "bf16-simt",
                              "fp16-tensorcore-v1", "bf16-tensorcore-v1"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_assign_matches_reference(case, metric, dtype, tc, monkeypatch):
    monkeypatch.setenv("SPURFAST_KMEANS_TC", "0" if tc == "0" else "1")
    monkeypatch.setenv("SPURFAST_KMEANS_TC2", "0" if tc == "v1" else "1")
    assert kc.use_tensor_cores(torch.empty(0, dtype=dtype, device="cuda")) == (
        tc != "0" and torch.cuda.get_device_capability()[0] >= 8)
    sizes, kmax, d = CASES[case]
    x, off, cent, kpg = make_case(sizes, kmax, d, seed=case)
    xq = _cast(x, dtype)
    assign, dist = kc.kmeans_assign(xq, off, cent, kpg, metric)
    assert assign.dtype == torch.int64 and dist.dtype == torch.float32 and assign.is_cuda
    D = exact_dists(xq.float(), off, cent, kpg, metric)   # the rounded inputs are the truth
    check_assign_near_optimal(assign, dist, D, dtype, f"assign[{metric}, {dtype}]")
    ra, rd = ref.kmeans_assign(xq, off, cent, kpg, metric)
    assert_close(dist, rd, torch.float32, name="dist vs reference")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tc", [(torch.float32, "0"), (torch.float16, "1"), (torch.bfloat16, "1"),
                                      (torch.bfloat16, "v1")],
                         ids=["fp32", "fp16-tensorcore", "bf16-tensorcore", "bf16-tensorcore-v1"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_groups_without_centroids_get_infinite_distances(metric, dtype, tc, monkeypatch):
    # a 130-point group with k = 0 fills whole tensor-core tiles: the v2 kernel's epilogue
    # reads x rows other warps staged, with no centroid loop (and its barriers) in between
    monkeypatch.setenv("SPURFAST_KMEANS_TC", "0" if tc == "0" else "1")
    monkeypatch.setenv("SPURFAST_KMEANS_TC2", "0" if tc == "v1" else "1")
    check_groups_without_centroids(kc.kmeans_assign, metric, dtype, "cuda", sizes=(5, 130, 9, 0, 4),
                                   kpg=(2, 0, 3, 0, 0), name=f"cupy assign {dtype} tc={tc}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tensor_core_assign_misaligned_rows(dtype):
    x, off, cent, kpg = make_case([300, 129], 70, 64, seed=7)
    flat = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")
    flat[1:] = x.to(dtype).flatten()
    xq = flat[1:].view(x.shape)          # 2 bytes off: the kernel must not use 16-byte row loads
    assert xq.data_ptr() % 16 != 0 and kc.tc2_shape(xq)[0] == 2
    assign, dist = kc.kmeans_assign(xq, off, cent, kpg)
    check_assign_near_optimal(assign, dist, exact_dists(xq.float(), off, cent, kpg, "l2"), dtype, "misaligned")
    a2, d2 = kc.kmeans_assign(xq.clone(), off, cent, kpg)      # aligned copy: 16-byte loads
    assert_equal_int(assign, a2, "misaligned vs aligned rows")
    assert_close(dist, d2, torch.float32, name="misaligned vs aligned distances")


def test_tensor_core_v2_shape_and_centroid_split(monkeypatch):
    # CPU: which kernel a width gets, and the hi + lo split it multiplies
    monkeypatch.delenv("SPURFAST_KMEANS_TC2", raising=False)
    shapes = {d: kc.tc2_shape(torch.empty(1, d)) for d in (16, 33, 128, 129, 200, 288, 289)}
    assert shapes == {16: (2, 32), 33: (2, 64), 128: (2, 128), 129: (1, 160), 200: (1, 224),
                      288: (1, 288), 289: (0, 289)}
    monkeypatch.setenv("SPURFAST_KMEANS_TC2", "0")
    assert kc.tc2_shape(torch.empty(1, 64)) == (0, 64)
    c = torch.randn(37, 50, generator=torch.Generator().manual_seed(0)) * 3
    for dtype, rel in ((torch.float16, 2.0 ** -21), (torch.bfloat16, 2.0 ** -15)):
        hi, lo = split_centroids(c, dtype, 64)
        assert hi.shape == lo.shape == (37, 64) and hi.dtype == lo.dtype == dtype
        assert not hi[:, 50:].any() and not lo[:, 50:].any(), "padding must be zero"
        err = (hi[:, :50].float() + lo[:, :50].float() - c).abs()
        excess = err - (rel * c.abs() + 2.0 ** -24)    # + fp16's subnormal step for tiny lo parts
        assert float(excess.max()) <= 0, f"{dtype}: hi + lo off by up to {float(err.max()):.3g}"
        assert float((hi[:, :50].float() - c).abs().max()) > 0, "the test needs centroids that round"


@pytest.mark.gpu
def test_assign_ties_and_empty_input():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]] * 50, device="cuda")
    cent = torch.tensor([[[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]], device="cuda")
    off = torch.tensor([0, 150], device="cuda")
    a, dist = kc.kmeans_assign(x, off, cent, torch.tensor([4], device="cuda"))
    assert_equal_int(a, torch.tensor([2, 0, 0] * 50), "ties -> lower index")
    a, dist = kc.kmeans_assign(torch.zeros(0, 3, device="cuda"), torch.zeros(3, dtype=torch.int64, device="cuda"),
                               torch.zeros(2, 4, 3, device="cuda"), torch.zeros(2, dtype=torch.int64, device="cuda"))
    assert a.shape == (0,) and dist.shape == (0,)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["update", "similarity"])
def test_empty_input_on_the_gpu(op, dtype):
    _check_empty_input(op, "cuda", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_update_matches_reference(case, deterministic, dtype):
    sizes, kmax, d = CASES[case]
    x, off, cent, kpg = make_case(sizes, kmax, d, seed=10 + case)
    xq = _cast(x, dtype)
    assign, _ = ref.kmeans_assign(xq, off, cent, kpg)
    sums, counts = kc.kmeans_update(xq, off, assign, kmax, deterministic=deterministic)
    rs, rc = exact_sums(xq, off, assign, kmax)
    assert sums.dtype == torch.float32 and counts.dtype == torch.int64
    assert_equal_int(counts, rc, "counts")
    # fp32 accumulation of n rows: error grows with the members per cluster
    n = float(rc.max().clamp_min(1))
    assert_close(sums, rs, torch.float32, name=f"sums ({dtype})", atol=1e-4 * n ** 0.5 * 4, rtol=1e-4)
    if deterministic:
        again, _ = kc.kmeans_update(xq, off, assign, kmax, deterministic=True)
        assert torch.equal(sums, again), "deterministic mode gave different bits on a second run"


@pytest.mark.gpu
def test_update_large_cluster_many_chunks_and_empty_clusters():
    x = torch.randn(100_003, 48, device="cuda")
    off = torch.tensor([0, 100_003], device="cuda")
    assign = torch.zeros(100_003, dtype=torch.int64, device="cuda")
    assign[::3] = 2                                   # clusters 1 and 3 stay empty
    sums, counts = kc.kmeans_update(x, off, assign, 4)
    rs, rc = exact_sums(x, off, assign, 4)
    assert_equal_int(counts, rc, "counts")
    assert int(counts[0, 1]) == 0 and int(counts[0, 3]) == 0
    assert float(sums[0, 1].abs().sum()) == 0.0
    assert_close(sums, rs, torch.float32, name="sums", atol=5e-3, rtol=1e-4)


@pytest.mark.gpu
def test_bad_assign_values_raise():
    x = torch.randn(10, 4, device="cuda")
    off = torch.tensor([0, 10], device="cuda")
    with pytest.raises(ValueError, match=r"assign has values in \[0, 5\]; expected cluster indices in \[0, 3\)"):
        kc.kmeans_update(x, off, torch.tensor([0] * 9 + [5], device="cuda"), 3)
    with pytest.raises(ValueError, match="offsets must run from 0 to N=10"):
        kc.kmeans_update(x, torch.tensor([0, 9], device="cuda"), torch.zeros(10, dtype=torch.int64, device="cuda"), 3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 8, 32])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_similarity_matches_reference(case, m, dtype):
    sizes, kmax, d = CASES[case]
    x, off, cent, kpg = make_case(sizes, kmax, d, seed=20 + case)
    xq = _cast(x, dtype)
    assign, _ = ref.kmeans_assign(xq, off, cent, kpg)
    cos, ex, mc, ms = kc.cluster_similarity(xq, off, assign, cent, kpg, m)
    rcos, rex, rmc, rms = ref.cluster_similarity(xq.float(), off, assign, cent, kpg, m)
    assert ex.shape == rex.shape and ex.dtype == torch.int64
    assert_close(cos, rcos, torch.float32, name="cos")
    assert_close(mc, rmc, torch.float32, name="mean_cos")
    assert_close(ms, rms, torch.float32, name="mean_sqdist", rtol=1e-4, atol=1e-4)
    # exemplars: same count per cluster; every exemplar is within rounding of the m-th
    # nearest member (equal distances may order either way in fp32)
    assert_equal_int((ex >= 0).sum(-1), (rex >= 0).sum(-1), "exemplars per cluster")
    gid = ref.group_ids(off)
    sq = ((xq.double() - cent.double()[gid, assign]) ** 2).sum(1)
    valid = ex >= 0
    got = torch.where(valid, sq[ex.clamp_min(0)], torch.zeros((), dtype=torch.float64, device="cuda"))
    exp = torch.where(rex >= 0, sq[rex.clamp_min(0)], torch.zeros((), dtype=torch.float64, device="cuda"))
    assert_close(got, exp, torch.float32, name="exemplar distances (sorted)")
    assert bool((assign[ex[valid]] == torch.nonzero(valid)[:, 1]).all()), "exemplar not a member of its cluster"
    assert bool((gid[ex[valid]] == torch.nonzero(valid)[:, 0]).all()), "exemplar not in its group"


@pytest.mark.gpu
def test_similarity_refuses_a_point_in_a_cluster_its_group_does_not_have_as_the_reference_does():
    x = torch.ones(10, 5, device="cuda")
    off = torch.tensor([0, 6, 10], device="cuda")
    assign = torch.tensor([0, 1, 0, 1, 0, 1, 0, 4, 1, 2], device="cuda")
    cent = torch.zeros(2, 5, 5, device="cuda")
    kpg = torch.tensor([2, 3], device="cuda")
    for m in (2, 40):   # the kernel, and the reference it hands m > SIM_MAXM
        with pytest.raises(ValueError, match=r"assign\[7\] = 4, but its group 1 has k_per_group\[1\] = 3"):
            kc.cluster_similarity(x, off, assign, cent, kpg, m)


@pytest.mark.gpu
def test_similarity_tied_exemplars_by_index_and_big_m_falls_back():
    x = torch.ones(40, 5, device="cuda")          # all members at the same distance
    off = torch.tensor([0, 40], device="cuda")
    assign = torch.zeros(40, dtype=torch.int64, device="cuda")
    cent = torch.zeros(1, 1, 5, device="cuda")
    kpg = torch.tensor([1], device="cuda")
    _, ex, _, _ = kc.cluster_similarity(x, off, assign, cent, kpg, 8)
    assert_equal_int(ex[0, 0], torch.arange(8), "ties by index")
    _, ex, _, _ = kc.cluster_similarity(x, off, assign, cent, kpg, 40)   # > SIM_MAXM: reference
    assert_equal_int(ex[0, 0], torch.arange(40), "m > SIM_MAXM")


@pytest.mark.gpu
def test_runs_on_torch_current_stream_without_copies():
    x = torch.randn(5000, 64, device="cuda")
    off = torch.tensor([0, 2000, 5000], device="cuda")
    cent = torch.randn(2, 16, 64, device="cuda")
    kpg = torch.tensor([16, 9], device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())   # inputs were made on the default stream
    with torch.cuda.stream(s):
        assign, dist = kc.kmeans_assign(x, off, cent, kpg)
        sums, counts = kc.kmeans_update(x, off, assign, 16)
        total = counts.sum()        # queued behind the kernels on the same stream
    s.synchronize()
    assert int(total) == 5000
    ra, _ = ref.kmeans_assign(x, off, cent, kpg)
    assert float((assign == ra).float().mean()) > 0.999


@pytest.mark.gpu
def test_batched_kmeans_cupy_backend_matches_torch():
    from spurfast.cluster import batched_kmeans

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 16, generator=g) * 10
    lab = torch.randint(0, 8, (6000,), generator=g)
    x = (centres[lab] + 0.1 * torch.randn(6000, 16, generator=g)).cuda()
    groups = (lab % 3).cuda()
    a = batched_kmeans(x, groups, [3, 3, 2], backend="cupy", seed=1)
    b = batched_kmeans(x, groups, [3, 3, 2], backend="torch", seed=1)
    assert_equal_int(a.assign, b.assign, "assign cupy vs torch")
    assert_close(a.centroids, b.centroids, name="centroids cupy vs torch")


@pytest.mark.gpu
def test_batched_kmeans_takes_float64_points_on_the_gpu():
    # the CUDA kernels take fp32/fp16/bf16 only: float64 points failed under auto, while the
    # CPU paths computed them in fp32 (unrun on a GPU when written)
    from spurfast.cluster import batched_kmeans

    g = torch.Generator().manual_seed(0)
    x = torch.randn(900, 8, generator=g, dtype=torch.float64).cuda()
    groups = (torch.arange(900) % 3).cuda()
    a = batched_kmeans(x, groups, [3, 3, 2], seed=1)
    b = batched_kmeans(x.float(), groups, [3, 3, 2], seed=1)
    assert_equal_int(a.assign, b.assign, "assign float64 vs float32 points")


@pytest.mark.gpu
def test_fatbin_and_nvrtc_modules_agree(monkeypatch):
    x, off, cent, kpg = make_case([300, 0, 41], 9, 37, seed=3)
    major, minor = torch.cuda.get_device_capability()

    def fresh():
        kc._modules.clear()
        kc._functions.clear()
        kc._origin.clear()

    monkeypatch.setenv("SPURFAST_KMEANS_NVRTC", "1")
    fresh()
    a1, d1 = kc.kmeans_assign(x, off, cent, kpg)
    assert kc.module_origin()[("kmeans_assign", torch.cuda.current_device())] == "nvrtc"
    monkeypatch.delenv("SPURFAST_KMEANS_NVRTC")
    fresh()
    a2, d2 = kc.kmeans_assign(x, off, cent, kpg)
    origin = kc.module_origin()[("kmeans_assign", torch.cuda.current_device())]
    if kc.find_fatbin("kmeans_assign", 10 * major + minor) is not None:
        assert origin.startswith("fatbin"), origin
    assert_equal_int(a1, a2, "assign: nvrtc vs fatbin")
    assert torch.equal(d1, d2)
    fresh()


def test_check_assign_refuses_fractional_assign():
    """The launchers' assign check (torch only: runs on CPU tensors) cast 1.5 to 1 silently."""
    with pytest.raises(ValueError, match=r"assign holds 1.5 \(entry 1\); expected integers"):
        kc._check_assign(torch.tensor([0, 1.5, 0]), 3, 2, "cpu")
    assert kc._check_assign(torch.tensor([0.0, 1.0, 0.0]), 3, 2, "cpu").tolist() == [0, 1, 0]


def test_fractional_or_negative_kmax_and_m_are_refused_as_the_reference_does():
    """int(kmax) ran 2.5 as 2 and int(m) ran 1.5 as 1 exemplar, where the reference refuses
    both (the scalar checks come first: they run on CPU tensors here)."""
    x, off, assign = torch.zeros(4, 3), torch.tensor([0, 4]), torch.zeros(4, dtype=torch.int64)
    cent, kpg = torch.zeros(1, 2, 3), torch.tensor([2])
    with pytest.raises(TypeError, match=r"kmax must be an integer, got 2.5"):
        kc.kmeans_update(x, off, assign, 2.5)
    with pytest.raises(ValueError, match=r"kmax must be >= 0, got -1"):
        kc.kmeans_update(x, off, assign, -1)
    with pytest.raises(ValueError, match=r"x_sqnorm has shape \(3,\); expected \(4,\)"):   # was taken unread
        kc.kmeans_assign(x, off, cent, kpg, "l2", x_sqnorm=torch.ones(3))
    with pytest.raises(TypeError, match=r"m \(exemplars per cluster\) must be an integer, got 1.5"):
        kc.cluster_similarity(x, off, assign, cent, kpg, 1.5)
    with pytest.raises(ValueError, match=r"m \(exemplars per cluster\) must be >= 0, got -1"):
        kc.cluster_similarity(x, off, assign, cent, kpg, -1)
    with pytest.raises(TypeError, match=r"m \(exemplars per cluster\) must be an integer, got 1.5"):
        ref.cluster_similarity(x, off, assign, cent, kpg, 1.5)
