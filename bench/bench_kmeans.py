"""Batched k-means: per-iteration time of one Lloyd step (assign + update + divide), op
``kmeans_iter``; and each step alone under its registry name, ``kmeans_assign`` (torch,
cpu, cupy, triton; one group on the CPU: faiss-cpu's exact IndexFlatL2 search as the peer)
and ``kmeans_update`` (torch, cpu, cupy).

python -m bench kmeans [--quick] [--device cpu|cuda]

Providers
  cupy            the CUDA kernels (spurfast.kernels.kmeans_cupy), GPU only
  triton-fit      the Lloyd loop with the Triton assign and the CuPy update (auto's choice on
                  a GPU), whole iterations, GPU only
  triton          the Triton assign (spurfast.kernels.kmeans_triton), GPU only; assign rows,
                  one per arithmetic variant (TRITON_VARIANTS); vs flash-kmeans also as
                  triton-fast (flash-kmeans' own arithmetic: one TF32 product, fp16 centroids)
                  and triton-prepared (fixed arguments checked once: the Lloyd loop's call)
  cpu             the fused CPU kernels (spurfast.kernels.kmeans_cpu: AVX-512 where the CPU
                  has it, else AVX2), CPU only; one pass per step (kmeans_assign_update: x
                  read once)
  cpu-avx2        the same kernels' AVX2 tiles on an AVX-512 CPU (kmeans_assign, latent_knn)
  torch           the reference (spurfast.kernels.reference), CPU and GPU
  torch-loop      the reference called once per group from Python (what batching replaces)
  faiss-cpu       faiss.Kmeans on all points (one group only), CPU
  sklearn         sklearn KMeans(algorithm="lloyd") on all points (one group only), CPU
  flash-kmeans    flash_kmeans.batch_kmeans_Euclid (pip flash-kmeans), GPU, equal-size groups
  numpy-loop      cluster_similarity's rows only: numpy once per cluster from Python

faiss, sklearn and flash-kmeans run whole fits; their per-iteration time is
(t(1 + R iterations) - t(1 iteration)) / R, which cancels set-up and initialisation.  Ours
is timed directly as one step, and (for the side-by-side rows) by the same differencing of
spurfast.cluster.batched_kmeans, so loop overhead is included in the comparison.  All CPU
providers use the same thread count (torch.get_num_threads()).

Counted per iteration: FLOPs = 2 N k d (distances) + N d (sums); bytes (see step_bytes)
only where the provider's traffic is known: x read twice (torch, torch-loop, cupy: assign,
then update) or once (cpu: fused), + centroids read + assign/dist written (int64 + fp32).
The *-fit providers re-read only the points that moved and the peers' traffic is their
own, so their rows carry no GB/s.
"""
from __future__ import annotations

import contextlib
import os
import sys

import numpy as np
import torch

from .harness import device_name, measure, read_peak, reset_peak, spread

OP = "kmeans_iter"
DIFF_ITERS = 5   # R in the differencing above
MIN_TIME_S = 1e-9   # floor of a differenced time (load can make the difference negative)


@contextlib.contextmanager
def _env(**values: str):
    """Environment variables set inside the block (kernel-variant switches the launchers
    read per call), restored after it."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


# the Triton assign's arithmetic variants (`kmeans_triton.arithmetic`): name -> (dtype, the
# environment that selects it; every switch set, so the caller's environment cannot leak in)
_TRITON_DEFAULTS = {"SPURFAST_TRITON_FP32_PRECISION": "tf32x3", "SPURFAST_TRITON_CENTROID_SPLIT": "1"}
TRITON_VARIANTS = {name: (dt, {**_TRITON_DEFAULTS, **env}) for name, (dt, env) in {
    "fp32": (torch.float32, {}),                                             # 3xTF32, about fp32
    "fp32-ieee": (torch.float32, {"SPURFAST_TRITON_FP32_PRECISION": "ieee"}),  # FMA
    "fp32-tf32": (torch.float32, {"SPURFAST_TRITON_FP32_PRECISION": "tf32"}),  # flash-kmeans' arithmetic
    "fp16": (torch.float16, {}),                                             # hi + lo centroids
    "fp16-single": (torch.float16, {"SPURFAST_TRITON_CENTROID_SPLIT": "0"}),  # flash-kmeans' arithmetic
    "bf16": (torch.bfloat16, {}),
    "bf16-single": (torch.bfloat16, {"SPURFAST_TRITON_CENTROID_SPLIT": "0"}),
}.items()}


def _log(msg: str) -> None:
    print(f"[bench kmeans] {msg}", file=sys.stderr, flush=True)


def make_data(N: int, d: int, k: int, G: int, device, seed: int = 0, dtype=torch.float32):
    """Random points (no early convergence), equal-ish groups, k per group <= group size."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g)
    sizes = torch.full((G,), N // G, dtype=torch.int64)
    sizes[: N - int(sizes.sum())] += 1
    off = torch.zeros(G + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(sizes, 0)
    kpg = torch.clamp(sizes, max=k)
    cent = torch.zeros(G, k, d)
    for gi in range(G):   # initial centroids: the first k_g points of each group
        cent[gi, : int(kpg[gi])] = x[int(off[gi]): int(off[gi]) + int(kpg[gi])]
    return (x.to(device=device, dtype=dtype), off.to(device), cent.to(device), kpg.to(device))


def counts(N, d, k, G, elt=4):
    """(FLOPs, bytes) of one step that reads x twice (assign, then update)."""
    return 2.0 * N * k * d + N * d, step_bytes("torch", N, d, k, G, elt)


# passes over x per Lloyd step, where known: the reference and the CuPy kernels assign and
# update in two calls; the fused CPU kernel reads x once
_X_READS = {"torch": 2, "torch-loop": 2, "cupy": 2, "cpu": 1}


def step_bytes(provider, N, d, k, G, elt=4):
    """Bytes one step moves: reads * N d elt (x) + G k d 4 (centroids) + N 12 (assign int64
    and dist fp32 written); None where unknown (*-fit: only moved points are re-read; the
    peers' own traffic), so no GB/s row is written rather than an overstated one."""
    reads = _X_READS.get(provider)
    if reads is None:
        return None
    return reads * N * d * elt + G * k * d * 4 + N * 12


# ----------------------------------------------------------------------------- steps
def _step_fn(mod, x, off, cent, kpg):
    """One Lloyd step: the module's assign + update in one call where it has one (one pass
    in the fused CPU kernels; the reference's composes the two), else assign then update."""
    kmax = cent.shape[1]
    fused = getattr(mod, "kmeans_assign_update", None)

    def step():
        if fused is not None:
            _, _, s, c = fused(x, off, cent, kpg, "l2")
        else:
            a, _ = mod.kmeans_assign(x, off, cent, kpg, "l2")
            s, c = mod.kmeans_update(x, off, a, kmax)
        return s / c.clamp_min(1).unsqueeze(-1)

    return step


def _loop_fn(ref, x, off, cent, kpg):
    """The reference once per group from Python."""
    G = len(off) - 1
    bounds = [(int(off[g]), int(off[g + 1]), int(kpg[g])) for g in range(G)]

    def step():
        out = []
        for g, (lo, hi, k) in enumerate(bounds):
            xg = x[lo:hi]
            o = torch.tensor([0, hi - lo], device=x.device)
            a, _ = ref.kmeans_assign(xg, o, cent[g: g + 1, :k], kpg[g: g + 1], "l2")
            s, c = ref.kmeans_update(xg, o, a, k)
            out.append(s / c.clamp_min(1).unsqueeze(-1))
        return out

    return step


@contextlib.contextmanager
def _threads(n):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=n):
        yield


def _diff_time(fit, device, reps):
    """Per-iteration seconds of a whole-fit callable fit(n_iter) by differencing: the median
    and spread of the rounds' paired differences (`_interleaved`).  It took the difference of
    two medians and a band around it from the longer fit's spread alone, a p20/p80 of no
    measured quantity."""
    return _interleaved({"fit": ("fit", fit)}, device, reps)["fit"]


def _interleaved(entries: dict, device, reps: int) -> dict:
    """Round-robin timing for a side-by-side comparison: every repetition runs each
    provider once in turn, so load that comes and goes on a shared machine hits all of
    them alike.  entries: name -> ("step", fn) timed directly, or ("fit", fit) timed as
    the median over rounds of (t(fit(1 + R)) - t(fit(1))) / R, each round's pair timed together."""
    import statistics
    import time

    cuda = torch.device(device).type == "cuda"
    peaks = {name: 0 for name in entries}
    source = None

    def timed(name, fn):
        nonlocal source
        source = reset_peak(device)   # per call, outside the timed span: this provider's own peak
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peaks[name] = max(peaks[name], read_peak(device, source))
        return dt

    samples = {name: ([], []) for name in entries}
    for name, (kind, fn) in entries.items():            # warm-up
        (fn() if kind == "step" else (fn(1), fn(1 + DIFF_ITERS)))
    if cuda:   # the warm-up's queued kernels must not land in the first timed sample
        torch.cuda.synchronize()
    for _ in range(reps):
        for name, (kind, fn) in entries.items():
            if kind == "step":
                samples[name][0].append(timed(name, fn))
            else:
                samples[name][0].append(timed(name, lambda: fn(1)))
                samples[name][1].append(timed(name, lambda: fn(1 + DIFF_ITERS)))
    out = {}
    for name, (kind, _) in entries.items():
        a, b = samples[name]
        if kind == "step":
            p20, p80 = spread(a)
            out[name] = {"median_s": statistics.median(a), "p20_s": p20, "p80_s": p80}
        else:
            # median and spread of one statistic, the round's paired differences: the difference
            # of the two medians could fall outside the differences' p20-p80 (a committed row did)
            diffs = [(bb - aa) / DIFF_ITERS for aa, bb in zip(a, b)]
            noisy = sum(dd <= 0 for dd in diffs)
            if noisy:   # the longer fit timed no slower: load swamped the R extra iterations
                _log(f"{name}: {noisy} of {len(diffs)} rounds timed the longer fit no slower than the shorter "
                     f"(a shared machine's load); their differences count as {MIN_TIME_S:g} s")
            # a time below zero is no time: a committed row had p20_s -0.06 (median already clamped)
            diffs = [max(dd, MIN_TIME_S) for dd in diffs]
            p20, p80 = spread(diffs)
            out[name] = {"median_s": statistics.median(diffs), "p20_s": p20, "p80_s": p80}
        out[name].update(peak_bytes=peaks[name], peak_source=source, reps=reps)
    return out


def _ours_fit(x, off, cent, kpg, backend):
    from spurfast.cluster import batched_kmeans

    gid = torch.repeat_interleave(torch.arange(len(off) - 1, device=x.device), off[1:] - off[:-1])

    def fit(n):
        return batched_kmeans(x, gid, kpg.cpu().numpy(), n_groups=len(off) - 1, init=cent, n_iter=n,
                              tol=-1.0, backend=backend)

    return fit


def _faiss_fit(x, cent, threads):
    import faiss

    faiss.omp_set_num_threads(threads)
    xn = np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)
    c0 = np.ascontiguousarray(cent[0].cpu().numpy(), dtype=np.float32)
    k, d = c0.shape

    def fit(n):
        km = faiss.Kmeans(d, k, niter=n, verbose=False, max_points_per_centroid=1 << 30, seed=1)
        km.train(xn, init_centroids=c0)
        return km

    return fit


def _sklearn_fit(x, cent, threads):
    from sklearn.cluster import KMeans

    xn = np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)
    c0 = np.ascontiguousarray(cent[0].cpu().numpy(), dtype=np.float32)

    def fit(n):
        with _threads(threads):
            return KMeans(n_clusters=len(c0), init=c0, n_init=1, max_iter=n, tol=0.0, algorithm="lloyd").fit(xn)

    return fit


def _flash_fit(x, off, k):
    from flash_kmeans import batch_kmeans_Euclid

    G = len(off) - 1
    N = x.shape[0]
    if N % G:
        raise ValueError("flash-kmeans needs equal group sizes")
    xb = x.view(G, N // G, x.shape[1])

    def fit(n):
        return batch_kmeans_Euclid(xb, n_clusters=k, max_iters=n, tol=-1.0, verbose=False)

    return fit


def flash_assign_call(euclid_assign_triton, x, cent):
    """(call, labels): flash-kmeans' assignment of one group's points x (N, d) to cent (1, k, d)
    in x's dtype, given |x|^2 as its own fit loop does; the call writes labels (1, N) int32."""
    N, d = x.shape
    xb, cb = x.view(1, N, d), cent.to(x.dtype).reshape(1, -1, d)
    xsq = (x.float() ** 2).sum(-1).view(1, N)
    labels = torch.empty(1, N, dtype=torch.int32, device=x.device)
    return (lambda: euclid_assign_triton(xb, cb, xsq, labels)), labels


def _assign_vs_flash(writer, kc, kt, x, off, cent, kpg, config, devname, reps):
    """The assignment step alone, ours vs flash-kmeans' Triton assign, fp32 and fp16 (the
    issue's GPU target is stated on assignment).  Ours: the CuPy kernel (``kc``) and the
    Triton one (``kt``; either may be None), the Triton one both in its accurate default
    and in flash-kmeans' own arithmetic (``triton-fast``: one TF32 product for fp32,
    centroids rounded to fp16), which does a third / half of the tensor-core work.  Ours
    also writes each point's distance (N*4 more bytes); flash-kmeans gets |x|^2
    precomputed, as in its own fit loop."""
    try:
        from flash_kmeans.assign_euclid_triton import euclid_assign_triton
    except ImportError as exc:
        _log(f"flash-kmeans assign skipped: not installed ({exc})")
        return
    N, d = x.shape
    k = cent.shape[1]
    for dt, name in ((torch.float32, "fp32"), (torch.float16, "fp16")):
        xs, cs = x.to(dt), cent.to(dt)
        flash, out = flash_assign_call(euclid_assign_triton, xs, cs)
        try:
            theirs = measure(flash, device=x.device.type, reps=max(reps, 10))
        except Exception as exc:  # API drift: say so, keep our rows
            _log(f"flash-kmeans assign skipped: {exc.__class__.__name__}: {exc}")
            return
        cfg = dict(config, dtype=name)
        # x, the centroids, the fp32 |x|^2 it is given, and the int32 labels
        flops, nbytes = 2.0 * N * k * d, N * d * xs.element_size() + k * d * xs.element_size() + N * 4 + N * 4
        writer.add_timing("kmeans_assign", "flash-kmeans", cfg, theirs, devname, items=N, bytes_moved=nbytes, flops=flops)
        fast = TRITON_VARIANTS["fp32-tf32" if dt == torch.float32 else "fp16-single"][1]
        ours_by_name = {"cupy": (kc, {}), "triton": (kt, _TRITON_DEFAULTS), "triton-fast": (kt, fast),
                        "triton-prepared": (kt, _TRITON_DEFAULTS)}
        for provider, (mod, env) in ours_by_name.items():
            if mod is None:
                continue
            with _env(**env):
                # prepared: the fixed arguments checked once, as the Lloyd loop calls it
                call = mod.prepare_assign(xs, off, kpg, k) if provider == "triton-prepared" else \
                    (lambda c: mod.kmeans_assign(xs, off, c, kpg))
                ours = measure(lambda: call(cs), device=x.device.type, reps=max(reps, 10))
                agree = float((call(cs)[0].view(-1) == out.view(-1).long()).float().mean())
            writer.add_timing("kmeans_assign", provider, dict(cfg, vs="flash-kmeans"), ours, devname, items=N,
                              bytes_moved=nbytes + N * 8, flops=flops)
            ratio = ours["median_s"] / theirs["median_s"]
            writer.add("kmeans_assign", provider, dict(cfg, vs="flash-kmeans"), "time_ratio", ratio, "x", devname)
            writer.add("kmeans_assign", provider, dict(cfg, vs="flash-kmeans"), "same_assignment", agree, "1", devname)
            _log(f"assign {name} N={N} d={d} k={k}: {provider} {ours['median_s'] * 1e3:.3f} ms, flash-kmeans "
                 f"{theirs['median_s'] * 1e3:.3f} ms ({ratio:.2f}x), same assignment for {agree:.4f} of points")
            if provider == "cupy" and dt == torch.float16:   # the first tensor-core kernel, for the record
                with _env(SPURFAST_KMEANS_TC2="0"):
                    v1 = measure(lambda: mod.kmeans_assign(xs, off, cs, kpg), device=x.device.type, reps=max(reps, 10))
                writer.add_timing("kmeans_assign", "cupy-tc-v1", cfg, v1, devname, items=N,
                                  bytes_moved=nbytes + N * 8, flops=flops)
                _log(f"assign fp16 N={N} d={d} k={k}: tensor-core v1 {v1['median_s'] * 1e3:.3f} ms, "
                     f"v2 {ours['median_s'] * 1e3:.3f} ms")


# ----------------------------------------------------------------------------- runner
def _configs(quick: bool, device: str):
    if quick:
        # the target comparison first: N=1e5, d=64, k=64, one group
        yield dict(N=100_000, d=64, k=64, G=1, side_by_side=True)
        yield dict(N=10_000, d=16, k=8, G=10)
        yield dict(N=10_000, d=16, k=8, G=100)
        if device == "cuda":
            yield dict(N=1_000_000, d=128, k=1024, G=1, side_by_side=True)
            yield dict(N=1_300_000, d=64, k=16, G=1000)
        return
    for N in (10_000, 100_000, 1_000_000):
        for d in (16, 64, 128, 512):
            for k in (8, 64, 256, 1024):
                for G in (1, 10, 100, 1000):
                    if k * G > N:            # fewer points than centroids per group
                        continue
                    if device == "cpu" and 2.0 * N * k * d > 2e10:   # > ~1 min per config on 2 cores
                        continue
                    yield dict(N=N, d=d, k=k, G=G, side_by_side=(G == 1 and N == 100_000 and d == 64 and k == 64))
    if device == "cuda":
        yield dict(N=1_300_000, d=64, k=16, G=1000)


def run(writer, quick: bool = False, device: str | None = None) -> None:
    from spurfast.kernels import reference as ref

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        _log("--device cuda asked for but torch sees no GPU; skipping")
        return
    devname = device_name(dev)
    threads = torch.get_num_threads()
    reps = 3 if quick else 7
    kc = kt = None
    kcpu = None
    if dev == "cpu":
        from spurfast.kernels import kmeans_cpu

        ok, why = kmeans_cpu.is_available()
        kcpu = kmeans_cpu if ok else None
        if not ok:
            _log(f"fused cpu kernels skipped: {why}")
    if dev == "cuda":
        from spurfast.kernels import kmeans_cupy

        ok, why = kmeans_cupy.is_available()
        kc = kmeans_cupy if ok else None
        if not ok:
            _log(f"cupy kernels skipped: {why}")
        from spurfast.kernels import kmeans_triton

        ok, why = kmeans_triton.is_available()
        kt = kmeans_triton if ok else None
        if not ok:
            _log(f"triton assign skipped: {why}")
    for cfg in _configs(quick, dev):
        N, d, k, G = cfg["N"], cfg["d"], cfg["k"], cfg["G"]
        config = dict(N=N, d=d, k=k, groups=G, dtype="fp32", threads=threads)
        flops = counts(N, d, k, G)[0]
        x, off, cent, kpg = make_data(N, d, k, G, dev)
        results = {}

        def record(provider, stats, dn=devname):
            results[provider] = stats["median_s"]
            writer.add_timing(OP, provider, config, stats, dn, items=N,
                              bytes_moved=step_bytes(provider, N, d, k, G), flops=flops)

        if cfg.get("side_by_side"):
            # ours and its peers timed round-robin in one run (see _interleaved)
            entries = {"torch": ("step", _step_fn(ref, x, off, cent, kpg)),
                       "torch-fit": ("fit", _ours_fit(x, off, cent, kpg, "torch"))}
            if kc is not None:
                entries["cupy"] = ("step", _step_fn(kc, x, off, cent, kpg))
                entries["cupy-fit"] = ("fit", _ours_fit(x, off, cent, kpg, "cupy"))
            if kt is not None:   # the Lloyd loop with the Triton assign (and the CuPy update)
                entries["triton-fit"] = ("fit", _ours_fit(x, off, cent, kpg, "triton"))
            if kcpu is not None:
                entries["cpu"] = ("step", _step_fn(kcpu, x, off, cent, kpg))
                entries["cpu-fit"] = ("fit", _ours_fit(x, off, cent, kpg, "cpu"))
            if G == 1 and dev == "cpu":
                for name, maker in (("faiss-cpu", lambda: _faiss_fit(x, cent, threads)),
                                    ("sklearn", lambda: _sklearn_fit(x, cent, threads))):
                    try:
                        entries[name] = ("fit", maker())
                    except ImportError as exc:
                        _log(f"{name} skipped: not installed ({exc})")
            for name, st in _interleaved(entries, dev, max(reps, 11)).items():   # the target rows: more rounds
                record(name, st)
        else:
            record("torch", measure(_step_fn(ref, x, off, cent, kpg), device=dev, reps=reps))
            if kcpu is not None:
                record("cpu", measure(_step_fn(kcpu, x, off, cent, kpg), device=dev, reps=reps))
                if N <= 100_000:   # a Lloyd iteration whole, at discovery's sizes: the step plus the loop's own work
                    record("cpu-fit", _diff_time(_ours_fit(x, off, cent, kpg, "cpu"), dev, reps))
                    _log(f"cpu Lloyd iteration at N={N} d={d} k={k} G={G}: {results['cpu-fit'] * 1e3:.3f} ms, "
                         f"the fused step alone {results['cpu'] * 1e3:.3f} ms")
        if kc is not None:
            if "cupy" not in results:
                record("cupy", measure(_step_fn(kc, x, off, cent, kpg), device=dev, reps=reps))
            for dt, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):   # tensor-core assign
                xh = x.to(dt)
                st = measure(_step_fn(kc, xh, off, cent, kpg), device=dev, reps=reps)
                results[f"cupy-{name}"] = st["median_s"]
                writer.add_timing(OP, "cupy", dict(config, dtype=name), st, devname, items=N,
                                  bytes_moved=step_bytes("cupy", N, d, k, G, elt=2), flops=flops)
                ast = measure(lambda: kc.kmeans_assign(xh, off, cent, kpg), device=dev, reps=reps)
                writer.add_timing("kmeans_assign", "cupy", dict(config, dtype=name), ast, devname, items=N,
                                  bytes_moved=N * d * 2 + G * k * d * 4 + N * 12, flops=2.0 * N * k * d)
            ast = measure(lambda: kc.kmeans_assign(x, off, cent, kpg), device=dev, reps=reps)
            writer.add_timing("kmeans_assign", "cupy", config, ast, devname, items=N,
                              bytes_moved=N * d * 4 + G * k * d * 4 + N * 12, flops=2.0 * N * k * d)
        _step_rows(writer, ref, kcpu, kc, x, off, cent, kpg, config, dev, devname, threads, reps)
        if G > 1 and (G <= 100 or not quick or dev == "cuda"):
            record("torch-loop", measure(_loop_fn(ref, x, off, cent, kpg), device=dev, reps=max(2, reps // 2)))
        if G == 1 and dev == "cpu" and not cfg.get("side_by_side") and not quick:
            for name, maker in (("faiss-cpu", lambda: _faiss_fit(x, cent, threads)),
                                ("sklearn", lambda: _sklearn_fit(x, cent, threads))):
                try:
                    fit = maker()
                except ImportError as exc:
                    _log(f"{name} skipped: not installed ({exc})")
                    continue
                record(name, _diff_time(fit, "cpu", reps))
        if kt is not None:   # the Triton assign: every variant, or (quick: each compiles anew) one per dtype
            for name, (dt, env) in TRITON_VARIANTS.items():
                if quick and name not in ("fp32", "fp16", "bf16"):
                    continue
                xt = x.to(dt)
                with _env(**env):
                    ast = measure(lambda: kt.kmeans_assign(xt, off, cent, kpg), device=dev, reps=reps)
                writer.add_timing("kmeans_assign", "triton", dict(config, dtype=name), ast, devname, items=N,
                                  bytes_moved=N * d * xt.element_size() + G * k * d * 4 + N * 12,
                                  flops=2.0 * N * k * d)
        if (kc is not None or kt is not None) and G == 1 and cfg.get("side_by_side"):
            _assign_vs_flash(writer, kc, kt, x, off, cent, kpg, config, devname, reps)
        if dev == "cuda" and N % G == 0:
            try:
                fit = _flash_fit(x, off, k)
                record("flash-kmeans", _diff_time(fit, dev, reps))
            except ImportError as exc:
                _log(f"flash-kmeans skipped: not installed ({exc})")
            except Exception as exc:  # API drift: say so, keep the other rows
                _log(f"flash-kmeans skipped: {exc.__class__.__name__}: {exc}")
        for ours_name in [n for n in ("triton-fit", "cupy-fit", "cpu-fit", "torch-fit") if n in results]:
            for peer in ("faiss-cpu", "sklearn", "flash-kmeans"):
                if peer in results:
                    ratio = results[ours_name] / results[peer]
                    writer.add(OP, ours_name, dict(config, vs=peer), "time_ratio", ratio, "x", devname)
                    _log(f"{ours_name} / {peer} per-iteration time at N={N} d={d} k={k} G={G}: {ratio:.2f}x")
        if "torch-loop" in results:
            # each batched provider named: the loop calls the torch reference, so "torch" is the
            # batching gain alone, and a kernel's line has its own speed over the reference in it
            # (one unnamed "batched" line took the fastest: 1298.8x where batching gave 13x)
            for batched in [n for n in ("torch", "cpu", "cupy") if n in results]:
                _log(f"{batched} batched / per-group loop of the torch reference at N={N} d={d} k={k} G={G}: "
                     f"{results['torch-loop'] / results[batched]:.1f}x faster")
        del x, off, cent, kpg
        if dev == "cuda":
            torch.cuda.empty_cache()
    _plusplus_rows(writer, dev, devname, kcpu, reps)
    _knn_rows(writer, dev, devname, kcpu, quick)
    _similarity_rows(writer, dev, devname, kc, quick, reps)


def _step_rows(writer, ref, kcpu, kc, x, off, cent, kpg, config, dev, devname, threads, reps):
    """The iteration's two steps under their registry names, each provider against the
    reference: ``kmeans_assign`` (reads x and the centroids, writes assign and dist; the
    CuPy rows are written above, per dtype) and ``kmeans_update`` (reads x and assign,
    writes sums and counts), plus, for one group on the CPU, faiss' exact nearest-centroid
    search (IndexFlatL2, same thread count) as the assignment's peer."""
    N, d = x.shape
    G, k = cent.shape[0], cent.shape[1]
    assign_bytes, assign_flops = N * d * 4 + G * k * d * 4 + N * 12, 2.0 * N * k * d
    update_bytes = N * d * 4 + N * 8 + G * k * (d * 4 + 8)
    assign = ref.kmeans_assign(x, off, cent, kpg)[0]
    for name, mod in (("torch", ref), ("cpu", kcpu), ("cupy", kc)):
        if mod is None:
            continue
        if name != "cupy":
            st = measure(lambda m=mod: m.kmeans_assign(x, off, cent, kpg), device=dev, reps=reps)
            writer.add_timing("kmeans_assign", name, config, st, devname, items=N, bytes_moved=assign_bytes,
                              flops=assign_flops)
        st = measure(lambda m=mod: m.kmeans_update(x, off, assign, k), device=dev, reps=reps)
        writer.add_timing("kmeans_update", name, config, st, devname, items=N, bytes_moved=update_bytes,
                          flops=float(N * d))
    if kcpu is not None and kcpu.isa() == "avx512":   # the AVX2 tile beside it: what AVX-512 gains
        with kcpu.using_isa("avx2"):
            st = measure(lambda: kcpu.kmeans_assign(x, off, cent, kpg), device=dev, reps=reps)
        writer.add_timing("kmeans_assign", "cpu-avx2", config, st, devname, items=N, bytes_moved=assign_bytes,
                          flops=assign_flops)
    if G != 1 or dev != "cpu":
        return
    try:
        import faiss
    except ImportError as exc:
        _log(f"faiss-cpu assign skipped: not installed ({exc})")
        return
    faiss.omp_set_num_threads(threads)
    xn = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    index = faiss.IndexFlatL2(d)
    index.add(np.ascontiguousarray(cent[0].numpy(), dtype=np.float32))
    st = measure(lambda: index.search(xn, 1), device=dev, reps=reps)
    writer.add_timing("kmeans_assign", "faiss-cpu", config, st, devname, items=N, bytes_moved=assign_bytes,
                      flops=assign_flops)


def _knn_rows(writer, dev, devname, kcpu, quick):
    """Exact latent kNN (op ``latent_knn``, k=10, the discovery's neighbour votes): the
    reference (blocked GEMM + pruned top-k), the fused CPU kernel, and faiss' exact
    IndexFlatL2 search (CPU, same thread count), on normal latents, on a tight blob
    whose rows the fp32 screen cannot rank (measured again directly: the slow path), and
    on duplicated latents (a quarter of the rows one image's copies: never certain, each
    distinct latent measured again once).  Counted: 2 n^2 d FLOPs (every pair)."""
    from spurfast.kernels import reference as ref

    cases = [(n, "normal") for n in ((20_000,) if quick else (20_000, 100_000))]
    cases += [(20_000, "tight-blob"), (20_000, "duplicates")]
    for n, data in cases:
        d, k = 16, 10
        gen = torch.Generator().manual_seed(0)
        z = torch.randn(n, d, generator=gen)
        if data == "tight-blob":   # 1,000 rows of spread 1e-3 at distance 3: the screen cannot rank
            z[:1000] = 3.0 + 1e-3 * torch.randn(1000, d, generator=gen)   # them, each is measured again
        if data == "duplicates":   # 5,000 copies of one latent, spread over the pool
            z[torch.randperm(n, generator=gen)[:n // 4]] = torch.randn(d, generator=gen)
        z = z.to(dev)
        config = dict(N=n, d=d, k=k, dtype="fp32", data=data, threads=torch.get_num_threads())
        provs = {"torch": lambda: ref.latent_knn(z, k)}
        if kcpu is not None and dev == "cpu":
            provs["cpu"] = lambda: kcpu.latent_knn(z, k)
            if kcpu.isa() == "avx512":   # the AVX2 tile beside it
                def knn_avx2():
                    with kcpu.using_isa("avx2"):
                        return kcpu.latent_knn(z, k)

                provs["cpu-avx2"] = knn_avx2
        if dev == "cpu":
            try:
                import faiss

                zn = np.ascontiguousarray(z.numpy())

                def faiss_knn():
                    faiss.omp_set_num_threads(torch.get_num_threads())
                    index = faiss.IndexFlatL2(d)
                    index.add(zn)
                    return index.search(zn, k + 1)   # +1: each row finds itself

                provs["faiss-cpu"] = faiss_knn
            except ImportError as exc:
                _log(f"faiss knn skipped: not installed ({exc})")
        times = {}
        for name, fn in provs.items():
            st = measure(fn, device=dev, warmup=1, reps=2 if n > 50_000 else 3)
            writer.add_timing("latent_knn", name, config, st, devname, items=n, bytes_moved=n * d * 4 + n * k * 8,
                              flops=2.0 * n * n * d)
            times[name] = st["median_s"]
        _log(f"latent_knn n={n} d={d} k={k} {data}: " + ", ".join(f"{p} {t:.2f} s" for p, t in times.items()))


def _plusplus_rows(writer, dev, devname, kcpu, reps):
    """k-means++ seeding (op ``kmeans_plusplus``): the reference, the fused CPU kernel and
    scikit-learn's ``kmeans_plusplus`` once per group (its greedy variant draws 2 + ln k
    candidates per seed, so it does that much more work for a better seed set).
    Counted: FLOPs 3 N_g k_g d per group (one D^2 pass per seed)."""
    from spurfast.kernels import reference as ref

    for N, d, G, k in ((100_000, 16, 10, 100), (100_000, 16, 1, 256)):
        x, off, _, kpg = make_data(N, d, k, G, dev)
        config = dict(N=N, d=d, k=k, groups=G, dtype="fp32", threads=torch.get_num_threads())
        flops = 3.0 * float(((off[1:] - off[:-1]).cpu() * kpg.cpu()).sum()) * d
        provs = {"torch": ref.kmeans_plusplus}
        if kcpu is not None and dev == "cpu":
            provs["cpu"] = kcpu.kmeans_plusplus
        times = {}
        for name, fn in provs.items():
            st = measure(lambda: fn(x, off, kpg, k, torch.Generator().manual_seed(0)), device=dev, reps=reps)
            writer.add_timing("kmeans_plusplus", name, config, st, devname, items=N, bytes_moved=k * N * d * 4,
                              flops=flops)
            times[name] = st["median_s"]
        if dev == "cpu":
            try:
                from sklearn.cluster import kmeans_plusplus as sk_pp

                xn = x.numpy()
                bounds = [(int(off[g]), int(off[g + 1]), int(kpg[g])) for g in range(G)]

                def sk():
                    with _threads(torch.get_num_threads()):
                        for lo, hi, kg in bounds:
                            sk_pp(xn[lo:hi], kg, random_state=0)

                st = measure(sk, device=dev, reps=max(2, reps // 2))
                writer.add_timing("kmeans_plusplus", "sklearn", config, st, devname, items=N, flops=flops)
                times["sklearn"] = st["median_s"]
            except ImportError as exc:
                _log(f"sklearn kmeans_plusplus skipped: not installed ({exc})")
        _log(f"kmeans_plusplus N={N} d={d} G={G} k={k}: " + ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in times.items()))


def _similarity_rows(writer, dev, devname, kc, quick, reps, m: int = 16):
    """Per-cluster similarity (op ``cluster_similarity``: each point's cosine to its centroid,
    the m members nearest it, mean cosine and squared distance per cluster) after one
    assignment: the reference, the CuPy kernel (GPU), and the obvious peer, a Python loop
    over clusters in numpy (what picking a finding's exemplars one by one does).  Counted:
    x read once (N d 4) + assign (N 8) + cos and distance written (N 8); FLOPs 6 N d (x.c,
    |x|^2 and |x - c|^2 per point)."""
    from spurfast.kernels import reference as ref

    cases = [(100_000, 16, 10, 16)] + ([] if quick else [(1_300_000, 16, 1000, 16)])
    for N, d, G, k in cases:
        x, off, cent, kpg = make_data(N, d, k, G, dev)
        assign, _ = ref.kmeans_assign(x, off, cent, kpg, "l2")
        config = dict(N=N, d=d, k=k, groups=G, m=m, dtype="fp32", threads=torch.get_num_threads())
        provs = {"torch": lambda: ref.cluster_similarity(x, off, assign, cent, kpg, m)}
        if kc is not None:
            provs["cupy"] = lambda: kc.cluster_similarity(x, off, assign, cent, kpg, m)
        if dev == "cpu":
            xn, an, cn = x.numpy(), assign.numpy(), cent.numpy()
            gid = np.repeat(np.arange(G), np.diff(off.numpy()))
            slot = gid * k + an
            order = np.argsort(slot, kind="stable")
            bounds = np.searchsorted(slot[order], np.arange(G * k + 1))

            def numpy_loop():
                out = {}
                for s_ in range(G * k):
                    rows = order[bounds[s_]:bounds[s_ + 1]]
                    if len(rows) == 0:
                        continue
                    c = cn[s_ // k, s_ % k]
                    xs = xn[rows]
                    sq = ((xs - c) ** 2).sum(1)
                    cos = xs @ c / np.maximum(np.linalg.norm(xs, axis=1) * np.linalg.norm(c), 1e-12)
                    out[s_] = (rows[np.lexsort((rows, sq))[:m]], cos.mean(), sq.mean())
                return out

            provs["numpy-loop"] = numpy_loop
        # in turn, as the side-by-side k-means rows: load on a shared machine hits each alike
        stats = _interleaved({name: ("step", fn) for name, fn in provs.items()}, dev, reps)
        for name, st in stats.items():
            writer.add_timing("cluster_similarity", name, config, st, devname, items=N,
                              bytes_moved=N * d * 4 + N * 16, flops=6.0 * N * d)
        _log(f"cluster_similarity N={N} d={d} G={G} k={k} m={m}: "
             + ", ".join(f"{p} {st['median_s'] * 1e3:.1f} ms" for p, st in stats.items()))
        if "numpy-loop" in provs:   # the peer must pick what the op picks, or its time compares nothing
            want = provs["torch"]()[1].reshape(G * k, m).numpy()
            same = all(np.array_equal(want[s_][:len(rows)], rows) and (want[s_][len(rows):] == -1).all()
                       for s_, (rows, _, _) in provs["numpy-loop"]().items())
            writer.add("cluster_similarity", "numpy-loop", config, "same_exemplars", float(same), "1", devname)
