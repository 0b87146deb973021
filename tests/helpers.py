"""Comparison helpers shared by every kernel test: one tolerance table, and failure
messages that say how many elements mismatch, where, and the max error."""
from __future__ import annotations

import numpy as np
import torch

from spurfast.kernels import reference as ref

# (atol, rtol, scale) per compute dtype; kernels accumulate in fp32 in every case.  An element
# passes when |actual - expected| <= atol + rtol * |expected| + scale * max|expected|
# (max over the finite expected values of the one tensor compared).
# - fp32: elementwise only (scale 0).
# - fp16/bf16: the kernels round their inputs, weights and stored intermediates to the dtype
#   (unit roundoff u = 2^-11 / 2^-8) and accumulate in fp32, so the error is a few u of the
#   output's overall magnitude: not of each element (near-zero outputs are sums that cancel)
#   and not a fixed size (the Triton encoder's outputs are |mu|, |logvar| <= 0.07, so a fixed
#   atol of 2e-2 let a 30 % wrong fp16 path pass).  Rounding every stage as the kernels do
#   gives at most 1.33 u * max|expected| over the GPU test architectures (batch 300; 0.44 u
#   measured under the interpreter); the table allows 8 u of the magnitude plus 2 u of each
#   element, i.e. 0.5 % (fp16) / 3.9 % (bf16) of the largest output.  atol is only a floor
#   for an all-zero reference.
_U_FP16, _U_BF16 = 2.0 ** -11, 2.0 ** -8
TOLERANCES = {
    torch.float32: (1e-4, 1e-4, 0.0),
    torch.float16: (1e-5, 2 * _U_FP16, 8 * _U_FP16),
    torch.bfloat16: (1e-4, 2 * _U_BF16, 8 * _U_BF16),
}
# fp64 inputs: every kernel reads them into fp32 (a KeyError had met a float64 case)
TOLERANCES[torch.float64] = TOLERANCES[torch.float32]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32,
                 name: str = "output", atol: float | None = None, rtol: float | None = None,
                 scale: float | None = None) -> None:
    """|actual - expected| <= atol + rtol * |expected| + scale * max|expected| elementwise
    (defaults from TOLERANCES[dtype]); NaN only where expected is NaN, and an infinity only
    where expected holds the same infinity.  The failure message says how many elements
    mismatch, where, and the largest error among them."""
    a_tol, r_tol, s_tol = TOLERANCES[dtype]
    atol = a_tol if atol is None else atol
    rtol = r_tol if rtol is None else rtol
    scale = s_tol if scale is None else scale
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.numel() == 0:
        return
    fin_e = e[torch.isfinite(e)]
    magnitude = float(fin_e.abs().max()) if fin_e.numel() else 0.0
    bound = atol + rtol * e.abs() + scale * magnitude
    err = (a - e).abs()
    bad = err > bound
    # inf - inf is NaN and x > inf never holds: an infinity must be matched exactly
    bad = torch.where(torch.isinf(a) | torch.isinf(e), a != e, bad)
    bad |= torch.isnan(a) != torch.isnan(e)
    n_bad = int(bad.sum())
    if n_bad:
        pos = bad.nonzero()[:5].tolist()
        fin_bad = bad & torch.isfinite(err)
        n_nonfinite = n_bad - int(fin_bad.sum())
        if bool(fin_bad.any()):
            worst = int(torch.where(fin_bad, err, torch.full_like(err, -1.0)).flatten().argmax())
            where = [int(i) for i in np.unravel_index(worst, tuple(a.shape))]
            worst_txt = (f"max abs error {float(err.flatten()[worst]):.3g} at {where} "
                         f"(actual {float(a.flatten()[worst]):.6g}, expected {float(e.flatten()[worst]):.6g}, "
                         f"allowed {float(bound.flatten()[worst]):.3g})")
        else:
            worst_txt = "max abs error n/a (every mismatch is a NaN or an infinity)"
        nonfinite_txt = f"; {n_nonfinite} of them NaN/inf mismatches" if n_nonfinite else ""
        raise AssertionError(
            f"{name} ({dtype}): {n_bad} of {a.numel()} elements mismatch "
            f"(atol={atol:.3g}, rtol={rtol:.3g}, scale={scale:.3g} x max|expected| {magnitude:.3g}); "
            f"{worst_txt}{nonfinite_txt}; first positions {pos}")


def assert_equal_int(actual: torch.Tensor, expected: torch.Tensor, name: str = "output") -> None:
    a, e = actual.cpu(), expected.cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    bad = a != e
    if bool(bad.any()):
        pos = bad.nonzero()[:5]
        got = [a[tuple(p)].item() for p in pos]
        want = [e[tuple(p)].item() for p in pos]
        raise AssertionError(f"{name}: {int(bad.sum())} of {a.numel()} entries differ; first positions "
                             f"{pos.tolist()} (actual {got}, expected {want})")


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, name: str = "output") -> None:
    """The same values bit for bit (NaN where expected has NaN; a deterministic kernel's
    repeat, a fused path against its parts): a bare torch.equal said only "differs".  The
    message gives the count, the first positions with their values and the largest
    difference."""
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.shape != e.shape or a.dtype != e.dtype:
        raise AssertionError(f"{name}: {a.dtype} {tuple(a.shape)} != expected {e.dtype} {tuple(e.shape)}")
    bad = a != e
    if a.is_floating_point():
        bad &= ~(torch.isnan(a) & torch.isnan(e))
    if bool(bad.any()):
        pos = bad.nonzero()[:5]
        got = [a[tuple(p)].item() for p in pos]
        want = [e[tuple(p)].item() for p in pos]
        diff = (a.double() - e.double()).abs()[bad]
        raise AssertionError(f"{name}: {int(bad.sum())} of {a.numel()} entries differ; first positions {pos.tolist()} "
                             f"(actual {got}, expected {want}); largest difference {float(diff.max()):.3g}")


# ----------------------------------------------------------------------------- k-means kernels
# (sizes per group, kmax, d): fewer points than k, empty groups, one group, many groups,
# d not a multiple of the 32-wide tile, every assign tile shape (kmax <= 16, <= 32, > 32)
CASES = [
    ([37], 5, 16),
    ([3, 0, 200, 1, 0, 65], 7, 33),                  # group with fewer points than kmax, empties
    ([1000], 40, 67),                                 # one group, k > 32, odd d
    ([257, 31, 500], 29, 100),
    ([5000], 130, 128),                               # k > one 64-wide centroid tile
    (np.random.default_rng(0).integers(0, 30, 1000).tolist(), 16, 24),   # 1000 groups
    ([700, 300], 20, 200),                            # tensor-core v2 with one m tile per warp
    ([300], 10, 300),                                 # d too wide for v2's x tile: v1 runs
]


# empty input (N = 0) as (G, kmax, d): empty groups, no groups at all (G = 0), one cluster
# per group, points without coordinates (d = 0); each is run with k_g = 0 and k_g = kmax
EMPTY_CASES = [(2, 4, 3), (0, 4, 3), (2, 1, 5), (3, 2, 0)]


def empty_case(G, kmax, d, k, device="cpu", dtype=torch.float32):
    """N = 0 points in G groups: x (0, d), offsets (G + 1,) of zeros, assign (0,), centroids
    (G, kmax, d) (random, so a kernel that reads them still gets finite values) and
    k_per_group = k for every group."""
    i64 = dict(dtype=torch.int64, device=device)
    cent = torch.randn(G, kmax, d, generator=torch.Generator().manual_seed(G + kmax + d)).to(device)
    return (torch.zeros(0, d, device=device, dtype=dtype), torch.zeros(G + 1, **i64), torch.zeros(0, **i64),
            cent, torch.full((G,), k, **i64))


def assert_same_outputs(got, want, name: str) -> None:
    """Each output of a kernel equals the reference's: same dtype and shape; integer outputs
    equal, float ones within the fp32 tolerance."""
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want), f"{name}: {len(got)} outputs, the reference returns {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype, f"{name} output {i}: dtype {g.dtype}, the reference's is {w.dtype}"
        if g.dtype.is_floating_point:
            assert_close(g, w, torch.float32, name=f"{name} output {i}")
        else:
            assert_equal_int(g, w, f"{name} output {i}")


def make_case(sizes, kmax, d, seed, device="cuda"):
    """Points (sorted by group), offsets, random centroids and k per group for a CASES entry."""
    g = torch.Generator().manual_seed(seed)
    N = int(sum(sizes))
    x = torch.randn(N, d, generator=g) * 2 + 0.5
    off = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(torch.tensor(sizes, dtype=torch.int64), 0)
    kpg = torch.tensor([min(kmax, s) for s in sizes], dtype=torch.int64)
    cent = torch.randn(len(sizes), kmax, d, generator=g) * 2
    return x.to(device), off.to(device), cent.to(device), kpg.to(device)


def exact_dists(x, off, cent, kpg, metric):
    """float64 (N, kmax) distances to the point's own group's centroids, inf where unused."""
    xd, cd = x.double(), cent.double()
    gid = ref.group_ids(off)
    c = cd[gid]                                   # (N, kmax, d)
    if metric == "l2":
        D = ((xd.unsqueeze(1) - c) ** 2).sum(-1)
    else:
        xn = torch.nn.functional.normalize(xd, dim=-1)
        cn = torch.nn.functional.normalize(c, dim=-1)
        D = 1 - (cn @ xn.unsqueeze(-1)).squeeze(-1)
    kmask = torch.arange(cent.shape[1], device=x.device).unsqueeze(0) >= kpg[gid].unsqueeze(1)
    return D.masked_fill(kmask, float("inf"))


def exact_sums(x, off, assign, kmax):
    """float64 per-(group, cluster) sums and int64 counts."""
    G = len(off) - 1
    flat = ref.group_ids(off) * kmax + assign
    sums = torch.zeros(G * kmax, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, flat, x.double())
    counts = torch.bincount(flat, minlength=G * kmax)
    return sums.view(G, kmax, -1), counts.view(G, kmax)


def check_assign_near_optimal(assign, dist, D, dtype, name):
    """The chosen centroid is a nearest one up to fp32's tolerance (exact ties and
    rounding-level near-ties may pick either), the distance matches, and where the
    nearest is clear of the runner-up the index equals the exact argmin.  ``D``: exact
    distances of the points as the kernel read them (``dtype``-rounded), so the kernel's
    fp32 accumulation sets the tolerance whatever ``dtype`` was."""
    atol, rtol, _ = TOLERANCES[torch.float32]
    N = len(assign)
    if N == 0:
        return
    best, arg = D.min(1)
    chosen = D.gather(1, assign.unsqueeze(1)).squeeze(1)
    slack = atol + rtol * best.abs() + 1e-5 * (1 + best.abs())
    excess = chosen - best - slack
    bad = (excess > 0).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        w = int(excess.argmax())
        raise AssertionError(f"{name}: {len(bad)} of {N} points not at a nearest centroid, first {bad[:5].tolist()}; "
                             f"point {i} chose {int(assign[i])} at {float(chosen[i]):.6g}, nearest {int(arg[i])} at "
                             f"{float(best[i]):.6g}; worst excess {float(chosen[w] - best[w]):.3g} at point {w} "
                             f"(allowed {float(slack[w]):.3g})")
    top2 = D.topk(min(2, D.shape[1]), dim=1, largest=False).values
    clear = (top2[:, -1] - top2[:, 0] > 10 * slack) if D.shape[1] > 1 else torch.ones_like(best, dtype=torch.bool)
    assert_equal_int(assign[clear], arg[clear], f"{name} (clear winners)")
    assert_close(dist, chosen, torch.float32, name=f"{name} dist")


def check_groups_without_centroids(assign_fn, metric, dtype=torch.float32, device="cpu",
                                   sizes=(5, 12, 9, 0, 4), kpg=(2, 0, 3, 0, 0), name="assign"):
    """The contract for a non-empty group with k = 0 (no centroid): assign 0, dist +inf;
    the other groups' points are assigned as usual."""
    kmax = max(max(kpg), 1)
    x, off, cent, _ = make_case(list(sizes), kmax, 24, seed=11, device=device)
    x, kpg_t = x.to(dtype), torch.tensor(kpg, dtype=torch.int64, device=device)
    assign, dist = assign_fn(x, off, cent, kpg_t, metric)
    none = (kpg_t == 0).repeat_interleave(torch.tensor(sizes, device=device))
    assert torch.isinf(dist[none]).all() and (dist[none] > 0).all(), \
        f"{name}[{metric}]: {int((~torch.isinf(dist[none])).sum())} of {int(none.sum())} points without a centroid " \
        f"got finite distances, e.g. {dist[none][:4].tolist()}"
    assert (assign[none] == 0).all(), f"{name}[{metric}]: assign {assign[none].tolist()} for points without a centroid"
    D = exact_dists(x.float(), off, cent, kpg_t, metric)
    check_assign_near_optimal(assign[~none], dist[~none], D[~none], dtype, f"{name}[{metric}]")


# Prepended to a compile script run by `compile_without_gpu`: the jobs, and `usage`, the
# resource usage cuobjdump reads from a compiled kernel's cubin ("STACK:0": no spills).
_COMPILE_PRELUDE = r"""
import json, os, subprocess, sys, tempfile
import torch, triton
_TOOL = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
def usage(kernel):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"]); f.flush()
        return subprocess.run([_TOOL, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
jobs = json.loads(sys.argv[1])
"""


def compile_without_gpu(script: str, jobs: list) -> list:
    """Run ``script`` (which compiles Triton kernels for a GPU target with `usage` and `jobs`
    at hand, and prints one JSON list last) in a subprocess without the interpreter, which
    the test process runs under; its JSON.  Skips where triton's bundled CUDA tools are
    missing."""
    import json
    import os
    import subprocess
    import sys

    import pytest
    import triton
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("triton's bundled CUDA tools are missing")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_PRELUDE + script, json.dumps(jobs)], capture_output=True,
                          text=True, env=dict(os.environ, TRITON_INTERPRET="0"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


class AtOnce:
    """Wraps a function so that its first ``parties`` calls wait for each other (a barrier):
    they pass only when they run at the same time on threads of their own, and otherwise the
    barrier times out and the call raises.  Every call's thread name is recorded in
    ``threads``.  Proof that work runs at once, where timing (a fast task done before the next
    is handed out, so one pool thread runs them all) proves nothing."""

    def __init__(self, fn, parties: int = 2, timeout: float = 20.0):
        import threading

        self.fn, self.parties, self.calls, self.threads = fn, parties, 0, set()
        self._barrier, self._lock, self._current = threading.Barrier(parties, timeout=timeout), threading.Lock(), \
            threading.current_thread

    def __call__(self, *args, **kwargs):
        with self._lock:
            self.calls += 1
            wait = self.calls <= self.parties
            self.threads.add(self._current().name)
        if wait:
            self._barrier.wait()
        return self.fn(*args, **kwargs)
