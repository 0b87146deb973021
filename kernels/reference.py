"""Pure-PyTorch references for every spurfast kernel.

These are the CPU fallback *and* the ground truth that every kernel test compares
against; tests, benchmarks and the fallback import them from here, never a copy.
Each kernel module (``encoder_triton``, ``kmeans_cupy``) exposes the same signatures.

Memory-traffic notes (per call, fp32, B images / N points) say what a fused kernel saves.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Sequence

import torch
import torch.nn.functional as F

from .group_layout import (check_count, check_generator, check_integers, check_offsets, check_points, check_real,
                           check_seed_counts, wide_points)

ACTIVATIONS = ("relu", "leaky_relu", "silu")
LEAKY_SLOPE = 0.2


# --------------------------------------------------------------------------- encoder
def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "relu":
        return F.relu(x)
    if name == "leaky_relu":
        return F.leaky_relu(x, LEAKY_SLOPE)
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def flat_floats(v) -> list[float]:
    """mean/std as plain floats: a number, a tensor or array of any shape, or nested sequences,
    flattened.  Plain Python for lists: the fused kernel's warm forward makes no host-side tensor op."""
    if isinstance(v, torch.Tensor):
        return [float(t) for t in v.detach().reshape(-1).tolist()]
    if isinstance(v, numbers.Real) or getattr(v, "ndim", None) == 0:
        return [float(v)]
    if isinstance(v, (str, bytes)):   # iterating "0.5" gave "0", ".", ... and one character recursed forever
        raise ValueError(f"mean/std must be numbers, got {v!r}")
    return [f for t in v for f in flat_floats(t)]


def normalise_input(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [0,255] or float [0,1] images -> fp32 (x - mean) / std per channel."""
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif x.is_floating_point() or x.dtype == torch.bool:
        x = x.float()
    else:   # int64 pixels 0..255 were taken as [0, 1] floats (255x too bright), silently
        raise TypeError(f"encoder input dtype {x.dtype} is unsupported; expected uint8 images in [0, 255] or "
                        f"floating point ones in [0, 1]")
    c = x.shape[1]
    m = torch.tensor(flat_floats(mean), dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
    s = torch.tensor(flat_floats(std), dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
    if m.shape[1] not in (1, c) or s.shape[1] not in (1, c):
        raise ValueError(f"mean/std have {m.shape[1]}/{s.shape[1]} entries for {c} channels")
    if bool((s == 0).any()):   # inf pixels, where the fused encoder refuses it
        raise ValueError(f"std must be non-zero, got {tuple(s.flatten().tolist())}")
    return (x - m) / s


def encoder_forward(
    x: torch.Tensor,
    conv_weights: Sequence[torch.Tensor],
    conv_biases: Sequence[torch.Tensor],
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    *,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    stride: int = 2,
    padding: int = 1,
    activation_name: str = "relu",
    eps: torch.Tensor | None = None,
):
    """VAE encoder forward: normalise -> [conv(stride, padding) + act]* -> flatten -> heads.

    x: (B, C, H, W) uint8 or float (values in [0, 1] before normalisation).
    head_weight: (2L, F) = [W_mu; W_logvar] so both heads are one GEMM; head_bias (2L,).
    Returns fp32 (mu, logvar), plus z = mu + exp(logvar / 2) * eps when eps (B, L) is given.
    Always computes in fp32 (the ground truth for fp16/bf16 kernels).

    Traffic of this eager version: every layer's activation is written to and re-read
    from memory (B * sum_l C_l*H_l*W_l * 4 bytes, twice) plus, on GPU, cuDNN workspace;
    a fused kernel reads the input once and writes only (B, 2L).
    """
    if x.dim() != 4:
        raise ValueError(f"encoder input must be (B, C, H, W), got shape {tuple(x.shape)}")
    stds = flat_floats(std)
    if 0.0 in stds:   # the latents came out inf / NaN, silently, where the Triton kernel refuses it
        raise ValueError(f"std must be non-zero, got {tuple(stds)}")
    # as the Triton kernel refuses them: zip dropped the layers past the shorter list, and an
    # odd head split into mu (B, L) and logvar (B, L + 1), silently
    if len(conv_weights) != len(conv_biases):
        raise ValueError(f"need one bias per conv weight; got {len(conv_weights)} weights and "
                         f"{len(conv_biases)} biases")
    if head_weight.dim() != 2 or head_weight.shape[0] % 2:
        raise ValueError(f"head_weight must be (2L, F) = [W_mu; W_logvar], got shape {tuple(head_weight.shape)}")
    if tuple(head_bias.shape) != (head_weight.shape[0],):
        raise ValueError(f"head_bias must have shape ({head_weight.shape[0]},), got {tuple(head_bias.shape)}")
    h = normalise_input(x, mean, std)
    # on a CPU, oneDNN's convolutions run 1.35-1.45x faster on channels-last activations
    # (measured: RGB 64x64, batch 256, 2 cores); the math and the flatten order (C, H, W)
    # are the same either way
    fmt = torch.channels_last if h.device.type == "cpu" else torch.contiguous_format
    h = h.contiguous(memory_format=fmt)
    for w, b in zip(conv_weights, conv_biases):
        h = activation(F.conv2d(h, w.float().contiguous(memory_format=fmt), b.float(), stride=stride, padding=padding),
                       activation_name)
    flat = h.flatten(1)
    if flat.shape[1] != head_weight.shape[1]:
        raise ValueError(f"flattened features {flat.shape[1]} != head input width {head_weight.shape[1]}")
    out = F.linear(flat, head_weight.float(), head_bias.float())
    latent = out.shape[1] // 2
    mu, logvar = out[:, :latent].contiguous(), out[:, latent:].contiguous()
    if eps is None:
        return mu, logvar
    if tuple(eps.shape) != tuple(mu.shape):   # (L,) or (B, 1) broadcast: one noise for every image, silently
        raise ValueError(f"eps must have shape (B, L) = {tuple(mu.shape)}, got {tuple(eps.shape)}")
    return mu, logvar, mu + torch.exp(0.5 * logvar) * eps.float()


# --------------------------------------------------------------------------- k-means
# Points are sorted by group (group = predicted class); ``offsets`` (G+1,) int64 is the
# CSR row pointer: group g owns points offsets[g]:offsets[g+1].  Centroids are padded to
# (G, kmax, d); group g uses its first k_per_group[g] rows.
_BUDGET = 1 << 24  # floats per temporary distance block (64 MiB fp32)


def group_ids(offsets: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Each point's group; ``n``: the number of points, for checked offsets (saves the two
    host reads repeat_interleave makes on a GPU without it)."""
    if offsets.dtype.is_floating_point or offsets.dtype.is_complex or offsets.dtype == torch.bool:
        # .long() truncated 1.5 to 1: groups silently lost points (a dtype test: no host read)
        raise TypeError(f"group_ids: offsets are {offsets.dtype}, expected an integer tensor (CSR offsets)")
    sizes = (offsets[1:] - offsets[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(sizes), device=offsets.device), sizes, output_size=n)


def _group_blocks(offsets: torch.Tensor, kmax: int, d: int):
    """Chunks of groups of similar size, so padded batched GEMMs waste little and stay
    within the memory budget.  Yields (group index tensor on the CPU, padded size)."""
    import numpy as np

    sizes = (offsets[1:] - offsets[:-1]).cpu().numpy()
    order = np.argsort(-sizes, kind="stable")
    desc = sizes[order]                      # non-increasing
    neg = -desc                              # non-decreasing, for searchsorted
    i, G = 0, len(sizes)
    while i < G:
        nmax = int(desc[i])
        if nmax == 0:
            break
        rows = max(1, _BUDGET // max(1, nmax * max(kmax, d)))
        # pad at most 2x: the block ends where groups get less than half the largest
        half = int(np.searchsorted(neg, -((nmax + 1) // 2), side="right"))
        j = max(i + 1, min(i + rows, half))
        yield torch.from_numpy(order[i:j].copy()), nmax
        i = j


def _padded_index(offsets: torch.Tensor, groups: torch.Tensor, nmax: int):
    start = offsets[groups].unsqueeze(1)
    ar = torch.arange(nmax, device=offsets.device).unsqueeze(0)
    idx = start + ar
    valid = idx < offsets[groups + 1].unsqueeze(1)
    return torch.where(valid, idx, torch.zeros_like(idx)), valid


_CHUNK_CPU = 1 << 19  # floats per distance chunk on the CPU (2 MiB: stays in cache for the argmin)
_BIG_GROUP = 2048     # groups at least this large run unpadded, chunk by chunk
_CPU_SPLIT = 2        # large groups on the CPU: row halves in two threads (see kmeans_assign)
_UPDATE_SPLIT_ROWS = 1 << 14  # kmeans_update on the CPU splits above twice this many rows
_cpu_pool, _cpu_pool_size = None, 0


def _cpu_threads(n: int):
    """Worker threads shared by the CPU kernels (created on first use, grown to n)."""
    global _cpu_pool, _cpu_pool_size
    if _cpu_pool_size < n:
        from concurrent.futures import ThreadPoolExecutor

        _cpu_pool, _cpu_pool_size = ThreadPoolExecutor(n, thread_name_prefix="spurfast-cpu"), n
    return _cpu_pool


def _split_rows(fn, lo: int, hi: int, min_rows: int, parts: int = _CPU_SPLIT):
    """Run fn(lo_i, hi_i) over up to ``parts`` fixed contiguous parts of [lo, hi) of at
    least ``min_rows`` rows each, the first in this thread and the others in worker
    threads; returns the results in order.  Fixed parts: same result every run."""
    parts = max(1, min(parts, (hi - lo) // max(1, min_rows)))
    if parts == 1:
        return [fn(lo, hi)]
    cuts = [lo + (hi - lo) * i // parts for i in range(parts + 1)]
    futures = [_cpu_threads(parts - 1).submit(fn, a, b) for a, b in zip(cuts[1:-1], cuts[2:])]
    first = fn(cuts[0], cuts[1])
    return [first] + [f.result() for f in futures]


def _argmin_lastdim(D: torch.Tensor):
    """(values, indices) of the minimum over the last dim; ties -> lowest index.

    On the CPU numpy's SIMD argmin (first occurrence, documented) is ~2.5x faster than
    torch.min with indices; elsewhere the lowest index is forced explicitly, because
    torch does not document which index a tie returns on CUDA."""
    if D.device.type == "cpu" and D.dtype == torch.float32 and D.is_contiguous():
        import numpy as np

        idx = torch.from_numpy(np.argmin(D.numpy(), axis=-1))
        return D.gather(-1, idx.unsqueeze(-1)).squeeze(-1), idx
    best = D.amin(dim=-1, keepdim=True)
    ar = torch.arange(D.shape[-1], device=D.device)
    # a row with NaN: amin is NaN, which equals nothing, and the index came out as D.shape[-1]
    # (past the centroids: an out-of-range gather on a GPU); its first NaN wins, as numpy's does
    # (amin propagates NaN, so a NaN entry only sits in a row whose best is NaN)
    hit = (D == best) | D.isnan()
    idx = torch.where(hit, ar, D.shape[-1]).amin(dim=-1)
    return best.squeeze(-1), idx


_PRONE = 1.0 / 16  # expansion trusted when dist >= _PRONE * (|x|^2 + |c|^2)


def _winner_sqdist(xc: torch.Tensor, c: torch.Tensor, arg: torch.Tensor, score: torch.Tensor,
                   cn: torch.Tensor, xn: torch.Tensor | None = None) -> torch.Tensor:
    """Squared distance of each row to its winning centroid c[arg].

    GPU: computed directly, sum (x - c)^2.  CPU (numpy, single-threaded: no thread
    barriers when the cores are shared): from the argmin score s = |c|^2 - 2 x.c as
    s + |x|^2, which costs one pass over x, and recomputed directly only for rows where
    the distance is small against |x|^2 + |c|^2 (there the expansion cancels digits; in
    the kept rows its fp32 error stays below ~1e-5 relative)."""
    if xc.device.type != "cpu":
        diff = xc - c[arg]
        return torch.linalg.vecdot(diff, diff)
    import numpy as np

    X = xc.detach().numpy()
    C = c.detach().numpy()
    A = arg.numpy()
    # |x|^2 from the caller when it has them (the Lloyd loop computes them once per fit)
    xn = np.einsum("ij,ij->i", X, X) if xn is None else xn.numpy()
    out = score.numpy() + xn
    prone = np.flatnonzero(out < _PRONE * (xn + cn.numpy()[A]))
    if prone.size:
        diff = X[prone] - C[A[prone]]
        out[prone] = np.einsum("ij,ij->i", diff, diff)
    return torch.from_numpy(np.maximum(out, 0.0, out=out))


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_assign_args(x, offsets, centroids, metric: str) -> tuple[int, int]:
    """The shape and metric checks every kmeans_assign provider makes first; (G, kmax)."""
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    if not (isinstance(x, torch.Tensor) and isinstance(centroids, torch.Tensor)) or x.dim() != 2 \
            or centroids.dim() != 3 or centroids.shape[2] != x.shape[1]:
        raise ValueError(f"expected x (N, d) and centroids (G, kmax, d) tensors, got {_shape(x)} and "
                         f"{_shape(centroids)}")
    check_real(x, "x")
    check_real(centroids, "centroids")
    G, kmax, _ = centroids.shape
    if isinstance(offsets, torch.Tensor) and offsets.dim() != 1:   # len() of a 0-d one named nothing
        raise ValueError(f"offsets must be a 1-D tensor (G + 1,), got {_shape(offsets)}")
    if len(offsets) != G + 1:
        raise ValueError(f"offsets has {len(offsets)} entries; expected G + 1 = {G + 1}")
    if kmax == 0 and x.shape[0] > 0:   # the kernels would read centroid row 0 of an empty tensor
        raise ValueError(f"centroids {_shape(centroids)} hold no centroid (kmax = 0) for {x.shape[0]} points")
    return G, kmax


def check_prepared_args(x, offsets, k_per_group, kmax, metric: str) -> tuple[int, int]:
    """`check_assign_args` for a step prepared before its centroids exist (kmax given): the
    points, offsets and metric against (G, kmax, d) centroids of any values; (G, kmax)."""
    from .group_layout import check_count

    kmax = check_count(kmax, "kmax")
    G = torch.as_tensor(k_per_group).numel()   # its shape is checked later, with the message for it
    d = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 2 else 0
    check_assign_args(x, offsets, torch.empty((G, kmax, d), device="meta"), metric)
    return G, kmax


def check_x_sqnorm(x_sqnorm, n: int) -> None:
    """x_sqnorm, when given, must hold one |x|^2 per row of x: the fused CPU kernel reads
    one value per row (a short tensor: reads past its end)."""
    if x_sqnorm is not None and tuple(getattr(x_sqnorm, "shape", ())) != (n,):
        raise ValueError(f"x_sqnorm has shape {_shape(x_sqnorm)}; expected ({n},), |x|^2 of each row of x")


def check_k_per_group(k_per_group, G: int, kmax: int) -> torch.Tensor:
    """k_per_group as a CPU int64 tensor, after checking it holds G integers in [0, kmax]
    (a negative k masked every centroid, yet its points got finite distances; 2.7 ran as 2)."""
    k = torch.as_tensor(k_per_group).detach().cpu()
    if k.dim() != 1 or len(k) != G:
        raise ValueError(f"k_per_group has shape {tuple(k.shape)}; expected ({G},), one k per group")
    if k.is_complex():
        raise ValueError(f"k_per_group has dtype {k.dtype}; expected integers in [0, kmax={kmax}]")
    if k.is_floating_point():
        # NaN too; and the range before the int64 cast, which made inf (or 1e30) -2**63 in the message
        bad = ((k != k.round()) | (k < 0) | (k > kmax)).nonzero().flatten()
        if len(bad):
            g = int(bad[0])
            raise ValueError(f"k_per_group[{g}] = {k[g].item():g}: expected an integer in [0, kmax={kmax}]")
    k = k.long()
    bad = ((k < 0) | (k > kmax)).nonzero().flatten()
    if len(bad):
        g = int(bad[0])
        raise ValueError(f"k_per_group[{g}] = {int(k[g])}: expected an integer in [0, kmax={kmax}]")
    return k


def check_within_k(gid: torch.Tensor, assign: torch.Tensor, k: torch.Tensor) -> None:
    """Refuse a point assigned to a cluster its group does not have (``assign`` >= ``k`` of
    its group): its statistics and exemplars came out for a cluster no k-means run made.
    ``gid`` and ``assign`` (each point's group and cluster, checked within [0, kmax)) on one
    device, as the caller has them; ``k``: `check_k_per_group`'s tensor.  One host read."""
    bad = (assign >= k.to(assign.device)[gid]).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        g = int(gid[i])
        raise ValueError(f"assign[{i}] = {int(assign[i])}, but its group {g} has k_per_group[{g}] = {int(k[g])} "
                         f"clusters ({len(bad)} point(s) so)")


# Rows with |x|^2 above this are refused: with |x|^2 and |c|^2 at most FLT_MAX / 4, every
# fp32 score |c|^2 - 2 x.c and distance |x - c|^2 <= 4 max(|x|^2, |c|^2) stays finite (beyond
# it the scores overflowed: every point went to cluster 0, the CPU kNN gave index -1).
MAX_SQNORM = float(torch.finfo(torch.float32).max) / 4


def check_rows(x: torch.Tensor, sq: torch.Tensor, nonfinite: str, name: str) -> None:
    """Refuse rows of ``x`` with NaN or inf (message ``nonfinite`` with ``{bad}`` for their
    count), then rows whose fp32 |x|^2 (``sq``, one per row) exceeds MAX_SQNORM (``name``
    in the message).  One test on the common path: such rows fail ``sq <= MAX_SQNORM``."""
    if bool((sq <= MAX_SQNORM).all()):
        return
    bad = int((~torch.isfinite(x)).any(1).sum())
    if bad:
        raise ValueError(nonfinite.format(bad=bad))
    big = int((~(sq <= MAX_SQNORM)).sum())
    raise ValueError(f"{name} has {big} rows too large for fp32 distances (|x|^2 > {MAX_SQNORM:.3g}, "
                     f"i.e. |x| > {MAX_SQNORM ** 0.5:.2g}); rescale them")


def centred_latents(z: torch.Tensor) -> torch.Tensor:
    """z (n, d) in fp32, centred (distances are shift-invariant; centring shrinks
    cancellation), as every latent_knn provider ranks it, after refusing rows with NaN or
    inf and rows too large for fp32 distances once centred."""
    zt = torch.as_tensor(z).detach()
    if zt.dim() != 2 or (zt.shape[1] == 0 and zt.shape[0] > 0):   # d = 0 failed in torch.unique, naming nothing
        raise ValueError(f"z must be (n, d) with d >= 1, got shape {tuple(zt.shape)}")
    check_points(zt, "z")
    # float64 (and integers, as float64) is centred before the fp32 cast: cast first, z = 1e8 +
    # noise lost its spread (fp32's step is 8 there) and every row's neighbours came out as the
    # lowest indices
    zt = wide_points(zt)
    zt = zt if zt.dtype == torch.float64 else zt.float()
    zc = (zt - zt.mean(0)).float()
    check_rows(zt, torch.linalg.vecdot(zc, zc), "z has {bad} rows with NaN or inf; neighbours need finite latents",
               "z (centred)")
    return zc


def kmeans_assign(
    x: torch.Tensor,
    offsets: torch.Tensor,
    centroids: torch.Tensor,
    k_per_group: torch.Tensor,
    metric: str = "l2",
    x_sqnorm: torch.Tensor | None = None,
):
    """Nearest centroid of each point's own group.

    Returns (assign (N,) int64 in [0, k_g), dist (N,) fp32): squared L2 distance, or
    1 - cosine similarity for metric="cosine".  Ties go to the lower centroid index.  A
    point of a group with no centroid (k_g = 0) gets assign 0 and dist +inf.
    The argmin runs on the score s = |c|^2 - 2 x.c (L2) or -x_hat.c_hat (cosine); the
    winner's L2 distance is then made accurate (computed directly as sum (x - c)^2 wherever
    s + |x|^2 would cancel digits: tight clusters far from the origin), or 1 + s, at least 0
    (a point on its centroid rounded to -2e-7).  In fp32 the cosine argmin cannot tell
    centroids apart that are closer in angle than about 1e-3 rad to the point (1 - cos
    under fp32's resolution near 1).
    x_sqnorm: optional (N,) fp32 |x|^2 of the rows, which a caller that assigns the same
    points many times passes to save one pass over x per call (L2 only; never required).
    Rows of x or centroids whose fp32 |.|^2 exceeds MAX_SQNORM (|x| > 9.2e18), or that hold
    NaN or inf, are not refused here (that would cost every call a pass over x and, on a
    GPU, a sync): their distances overflow and the providers' answers differ (a NaN centroid
    takes every point of its group here and none in the kernels, whose strict < skips it);
    `batched_kmeans` refuses them.
    Traffic: reads x once and writes (chunk x k_g) distance blocks that stay in cache
    (large groups) or one padded block per batch of small groups; the CUDA kernel keeps
    every block on chip.
    """
    G, kmax = check_assign_args(x, offsets, centroids, metric)
    N, d = x.shape
    check_x_sqnorm(x_sqnorm, N)
    kpg_cpu = check_k_per_group(k_per_group, G, kmax)
    x, centroids = x.detach(), centroids.detach()   # numpy views below need plain tensors
    if x_sqnorm is not None:   # |x|^2 of features that require grad (or a numpy array) failed in .numpy()
        x_sqnorm = torch.as_tensor(x_sqnorm).detach()
    # offsets that stop short of N left the rows past them at assign 0, dist 0, silently
    off_cpu = check_offsets(offsets, N, "cpu")
    sizes = off_cpu.diff()
    # on x's device for the gathers below (CPU offsets with CUDA points failed there, where
    # the GPU providers take them); group bounds read from the host copy, no sync per group
    offsets = off_cpu.to(x.device)
    assign = torch.zeros(N, dtype=torch.int64, device=x.device)
    dist = torch.zeros(N, dtype=torch.float32, device=x.device)
    if N == 0:
        return assign, dist
    cosine = metric == "cosine"
    c = centroids.to(device=x.device, dtype=torch.float32)   # as the GPU providers take CPU centroids
    if cosine:
        c = F.normalize(c, dim=-1)
    cn = (c * c).sum(-1)  # (G, kmax)
    kpg = kpg_cpu.to(x.device)
    budget = _CHUNK_CPU if x.device.type == "cpu" else _BUDGET
    # Large groups: contiguous slices, no padding, no gather, chunks that fit in cache.
    for g in (sizes >= _BIG_GROUP).nonzero().flatten().tolist():
        lo, hi, k = int(off_cpu[g]), int(off_cpu[g + 1]), int(kpg_cpu[g])
        if k == 0:
            dist[lo:hi] = float("inf")
            continue
        cg, cng = c[g, :k], cn[g, :k]
        ct = cg.t().contiguous()
        step = max(256, budget // max(1, k))

        def rows(a: int, b: int):
            # one distance buffer per caller, reused chunk to chunk: a fresh 2 MiB block
            # per chunk costs more in page faults than its GEMM
            buf = torch.empty(min(step, b - a), k, device=x.device)
            for s in range(a, b, step):
                xc = x[s:min(s + step, b)].float()
                S = buf[:len(xc)]
                if cosine:
                    xc = F.normalize(xc, dim=-1)
                    best, arg = _argmin_lastdim(torch.mm(xc, ct, out=S).neg_())
                    dist[s:s + len(xc)] = (best + 1.0).clamp_min_(0.0)   # 1 - cos rounds below 0 (NaN kept)
                else:
                    best, arg = _argmin_lastdim(torch.addmm(cng, xc, ct, alpha=-2.0, out=S))
                    # accurate distance of the winner (no cancellation for tight clusters)
                    xn = None if x_sqnorm is None else x_sqnorm[s:s + len(xc)]
                    dist[s:s + len(xc)] = _winner_sqdist(xc, cg, arg, best, cng, xn)
                assign[s:s + len(xc)] = arg

        if x.device.type == "cpu":
            # Two threads on row halves: numpy's argmin and the winner distances are
            # single-threaded, so alone they leave a core idle between GEMMs; with two
            # callers one half's argmin runs while the other's GEMM does (measured at
            # N=1e5, d=k=64 on 2 cores: 20-23 -> 13-14 ms per assign).
            _split_rows(rows, lo, hi, step)
        else:
            rows(lo, hi)
    # Small groups: padded batched GEMMs over groups of similar size.
    small = sizes.clone()
    small[sizes >= _BIG_GROUP] = 0
    small_off = torch.zeros(G + 1, dtype=torch.int64)
    small_off[1:] = torch.cumsum(small, 0)
    for groups_cpu, nmax in _group_blocks(small_off, kmax, d):
        groups = groups_cpu.to(x.device)
        idx, valid = _padded_index(offsets, groups, nmax)
        xp = x[idx].float()  # (g, nmax, d)
        cb = c[groups]
        if cosine:
            xp = F.normalize(xp, dim=-1)
            S = torch.bmm(xp, cb.transpose(1, 2)).neg_()
        else:
            S = torch.baddbmm(cn[groups].unsqueeze(1), xp, cb.transpose(1, 2), alpha=-2.0)
        kmask = torch.arange(kmax, device=x.device).unsqueeze(0) >= kpg[groups].unsqueeze(1)
        S.masked_fill_(kmask.unsqueeze(1), float("inf"))
        best, arg = _argmin_lastdim(S)
        sel = idx[valid]
        arg = arg[valid]
        if cosine:
            best = (best[valid] + 1.0).clamp_min_(0.0)
        else:
            rows = (groups.unsqueeze(1) * kmax).expand_as(valid)[valid] + arg
            diff = x[sel].float() - c.reshape(G * kmax, d).index_select(0, rows)   # a slice: view failed
            no_centroid = (kpg[groups] == 0).unsqueeze(1).expand_as(valid)[valid]
            best = torch.linalg.vecdot(diff, diff).masked_fill_(no_centroid, float("inf"))
        assign[sel] = arg
        dist[sel] = best
    return assign, dist


def check_members(x: torch.Tensor, offsets: torch.Tensor, assign: torch.Tensor, kmax: int) -> torch.Tensor:
    """offsets as int64 on x's device, after checking that ``assign`` holds one cluster index
    in [0, kmax) per row of x and that offsets run 0..N without decreasing (a size mismatch
    deep in torch named neither).  Each index on its own: a check of the flat index only
    lets assign = kmax in group g land in group g + 1's cluster 0 (and -1 in group g's
    predecessor).  On every device (the reference is the GPU fallback too): the two host
    reads here replace the two repeat_interleave makes without group_ids' ``n``."""
    N = x.shape[0]
    check_integers(assign, "assign")   # 1.5 raised a numpy cast error naming nothing
    if assign.numel():
        lo, hi = (int(v) for v in torch.aminmax(assign))
        if lo < 0 or hi >= kmax:
            raise ValueError(f"assign has values in [{lo}, {hi}]; expected cluster indices in [0, {kmax})")
    if tuple(assign.shape) != (N,):
        raise ValueError(f"assign must be (N,) = ({N},), got shape {tuple(assign.shape)}")
    return check_offsets(offsets, N, x.device)


def sorted_sums(flat: torch.Tensor, v: torch.Tensor, S: int) -> torch.Tensor:
    """(S, *v.shape[1:]) sums of the rows of ``v`` by their index in ``flat`` (in [0, S)),
    each in row order, from a stable sort and a segment sum: the same bits every run on a
    GPU, where index_add_ adds with float atomics in a varying order."""
    out = torch.zeros((S,) + tuple(v.shape[1:]), dtype=v.dtype, device=v.device)
    if len(flat):
        order = torch.argsort(flat, stable=True)
        uniq, lengths = torch.unique_consecutive(flat[order], return_counts=True)
        out[uniq] = torch.segment_reduce(v[order], "sum", lengths=lengths)
    return out


def kmeans_update(
    x: torch.Tensor,
    offsets: torch.Tensor,
    assign: torch.Tensor,
    kmax: int,
    deterministic: bool = True,
):
    """Per-(group, cluster) sums and counts: returns (sums (G, kmax, d) fp32, counts (G, kmax) int64).

    The caller divides and re-seeds clusters whose count is 0 (reported, not hidden).
    Traffic: reads x and assign once, writes G*kmax*(d+1) values.
    """
    check_points(x)   # "not enough values to unpack" named nothing
    N, d = x.shape
    kmax = check_count(kmax, "kmax")   # -1 failed in zeros() naming nothing, 2.5 in a TypeError
    # sums, not a graph: with points that require grad the GPU path (and the CPU one at N = 0)
    # returned sums that required grad, as no other provider does
    x = x.detach()
    offsets = check_members(x, offsets, assign, kmax)
    G = len(offsets) - 1   # after the check: len() of 0-d offsets failed naming nothing
    # on x's device, as the CuPy and CPU kernels take it: a CPU assign with CUDA points (or a
    # CUDA one with CPU points) failed in a device mismatch
    flat = group_ids(offsets, N) * kmax + assign.to(x.device).long()
    if x.device.type == "cpu" and N:
        # One sparse (G*kmax x N) 0/1 matrix times x.  Built column-wise (CSC: point i is
        # column i, its one entry in row flat[i]) it needs no sort, and scipy's product
        # streams x once in index order, adding row i into sums[flat[i]]: deterministic
        # (fixed row halves), fp32 like index_add_, no OpenMP barriers, and 2-5x faster than
        # index_add_ on this machine (4.5 -> 2.3 ms at N=1e5, d=k=64 with the halves).
        import numpy as np
        import scipy.sparse as sp

        fl = flat.numpy()
        S = G * kmax
        xf = np.ascontiguousarray(x.detach().float().numpy())

        def part_sums(a: int, b: int):
            onehot = sp.csc_matrix((np.ones(b - a, dtype=np.float32), fl[a:b], np.arange(b - a + 1)),
                                   shape=(S, b - a))
            return np.asarray(onehot @ xf[a:b], dtype=np.float32)

        # scipy's product releases the GIL: two fixed row halves in two threads, then added
        parts = _split_rows(part_sums, 0, N, _UPDATE_SPLIT_ROWS)
        sums = torch.from_numpy(sum(parts[1:], parts[0]).reshape(S, d))
        counts = torch.from_numpy(np.bincount(fl, minlength=S).astype(np.int64))
        return sums.view(G, kmax, d), counts.view(G, kmax)
    sums = torch.zeros(G * kmax, d, dtype=torch.float32, device=x.device)
    if deterministic and x.is_cuda:
        # index_add_ on CUDA uses float atomics (order varies); sort + segment-sum does not.
        order = torch.argsort(flat, stable=True)
        xs = x[order].float()
        fs = flat[order]
        uniq, counts_u = torch.unique_consecutive(fs, return_counts=True)
        seg = torch.segment_reduce(xs, "sum", lengths=counts_u) if N else xs
        sums[uniq] = seg
    else:
        sums.index_add_(0, flat, x.float())
    counts = torch.bincount(flat, minlength=G * kmax)
    return sums.view(G, kmax, d), counts.view(G, kmax)


def kmeans_assign_update(
    x: torch.Tensor,
    offsets: torch.Tensor,
    centroids: torch.Tensor,
    k_per_group: torch.Tensor,
    metric: str = "l2",
    x_sqnorm: torch.Tensor | None = None,
):
    """One Lloyd step's two halves at once: (assign, dist, sums, counts) =
    :func:`kmeans_assign` then :func:`kmeans_update` on that assignment.  A fused kernel
    reads x once instead of twice (the second read costs about as much as the first's
    argmin bookkeeping at small k).  Traffic here: x read twice, as the two calls."""
    assign, dist = kmeans_assign(x, offsets, centroids, k_per_group, metric, x_sqnorm=x_sqnorm)
    sums, counts = kmeans_update(x, offsets, assign, centroids.shape[1])
    return assign, dist, sums, counts


KNN_BLOCK_FLOATS = 1 << 24  # one distance block: 64 MiB fp32, whatever the pool size
KNN_COLUMN_BLOCK = 128      # columns per block in the pruned top-k


def latent_knn(z: torch.Tensor, k: int, chunk: int | None = None,
               column_block: int = KNN_COLUMN_BLOCK) -> torch.Tensor:
    """(n, k) int64 indices of each row's k nearest other rows (squared L2), sorted
    nearest first, exact (k is capped at n - 1); on z's device, returned on the CPU.
    Equal distances (duplicated latents) go to the lower index, as in the fused kernels.
    Rows with NaN or inf, or too large for fp32 distances once centred, are refused.

    Rows go in chunks of at most KNN_BLOCK_FLOATS distances, so peak memory does not grow
    with the pool beyond the O(n k) result.  A full top-k over n columns per row costs
    ~10 ns a distance on a CPU; instead each row's columns are cut into blocks of
    ``column_block``, one vectorised pass takes every block's minimum, and the top-k runs
    over the k blocks with the smallest minima only: they hold the k nearest points (a
    block outside them has a minimum no smaller than k points from distinct blocks).  The
    best 2k candidates are then re-ranked by directly computed distances.

    The scores round by up to about (d + 2) 2^-24 (|zi| + |zj|)^2: a tight group whose
    distances are below that (a blob of spread 1e-3 far from the mean) is screened at
    random, and the 2k candidates can miss true neighbours.  A row whose screen cannot
    have missed one (:func:`knn_screen_certain`: every column left out scores, less the
    rounding bound, past the k-th direct distance) keeps its re-ranked candidates; any
    other row is measured again directly against every column (:func:`knn_remeasure`)."""
    k = check_count(k, "k")   # as the CPU kernel: 1.5 failed in empty() there, ran as 1 here
    # 0 is "choose"; -1 and 1.5 failed inside torch, and column_block 0 divided by zero
    chunk = None if chunk is None else check_count(chunk, "chunk")
    # a bool is an Integral: column_block=True ran blocks of one column
    if isinstance(column_block, bool) or not isinstance(column_block, numbers.Integral) \
            or column_block < 1:
        raise ValueError(f"column_block must be an integer >= 1, got {column_block!r}")
    zt = centred_latents(z)   # distances are shift-invariant; centring shrinks cancellation
    n = len(zt)
    k = min(k, n - 1)
    out = torch.empty((n, max(k, 0)), dtype=torch.int64)
    if k <= 0:
        return out
    chunk = min(n, chunk or max(1, KNN_BLOCK_FLOATS // max(1, n)))
    # One GEMM gives |zj|^2 - 2 zi.zj (|zi|^2 is constant along a row, so ranking does not
    # need it): rows [zi, 1] times columns [-2 zj, |zj|^2].
    ones = torch.ones(n, 1, device=zt.device)
    rows_aug = torch.cat([zt, ones], 1)
    cols_aug = torch.cat([-2.0 * zt, (zt * zt).sum(1, keepdim=True)], 1).T.contiguous()
    B = int(column_block)
    nb = -(-n // B)
    prune = nb > 2 * k
    # k + 1 blocks: the last block may be short (its padding columns are inf), so k blocks
    # could hold fewer than m real columns
    nbest = k + 1
    m = min(2 * k, n - 1, nbest * B if prune else n)   # candidates re-ranked by exact distances
    # one buffer for every chunk: a fresh large allocation per chunk costs more in page
    # faults than the GEMM that fills it
    buf = torch.full((chunk, nb * B if prune else n), float("inf"), device=zt.device)
    ar_b = torch.arange(B if prune else 0, device=zt.device)
    sq = cols_aug[-1]        # fp32 |zj|^2, as the screen adds it: for the certainty test
    R = knn_screen_bound(sq, zt.shape[1])
    # per row: the smallest score any column left out of its candidates can have, and its
    # k-th candidate's direct distance
    left = torch.empty(n, dtype=torch.float32, device=zt.device)
    kth = torch.empty(n, dtype=torch.float32, device=zt.device)
    for s in range(0, n, chunk):
        r = min(chunk, n - s)
        d = buf[:r]
        with _ieee_fp32_products(zt.device):
            torch.mm(rows_aug[s:s + r], cols_aug, out=d[:, :n])
        d[torch.arange(r, device=zt.device), torch.arange(s, s + r, device=zt.device)] = float("inf")
        if prune:
            # the last block's padding columns stay inf (never written)
            # blocks and candidates both chosen with ties to the lower index (see
            # _smallest_first): then the pruning keeps the lowest-index tied columns too
            # (r, k + 1), ascending; next: the smallest minimum of a block left out
            _, blocks, next_block = _smallest_first(d.view(r, nb, B).amin(2), nbest, with_next=True)
            cols = (blocks.unsqueeze(2) * B + ar_b).view(r, nbest * B)       # ascending columns
            vals, pick, next_col = _smallest_first(d.gather(1, cols), m, with_next=True)
            cand = cols.gather(1, pick)
            # a column left out scores at least the (m+1)-th smallest in the kept blocks, or
            # its block's minimum outside them
            torch.minimum(next_col, next_block, out=left[s:s + r])
        else:
            vals, cand, left[s:s + r] = _smallest_first(d, m, with_next=True)
        # an inf candidate is the row itself or padding (a tiny column_block): never a neighbour
        cand, invalid = cand.clamp_max(n - 1), vals.isinf()
        # the re-ranking gathers (rows, m, d) coordinates, plus two temporaries that size: in
        # slices of at most KNN_BLOCK_FLOATS (a whole chunk grew with k and d: 0.9 GB at
        # n = 4096, d = 512, k = 25, for 8 MB of latents; GBs more for wider ones)
        step = max(1, KNN_BLOCK_FLOATS // max(1, cand.shape[1] * zt.shape[1]))
        for a in range(0, r, step):
            b = s + min(a + step, r)
            nearest, kth[s + a:b] = _exact_nearest(zt, s + a, cand[a:a + step], k, invalid[a:a + step],
                                                   with_kth=True)
            out[s + a:b] = nearest.cpu()
    # rows whose screen may have left out a true neighbour: measured again over all columns
    unsure = torch.nonzero(~knn_screen_certain(left, sq, kth, R, zt.shape[1])).flatten()
    if len(unsure):
        out[unsure.cpu()] = knn_remeasure(zt, unsure, k).cpu()
    return out


# unit roundoff of fp32 (2^-24): the GEMM scores' rounding is bounded by a multiple of it
_FP32_U = 2.0 ** -24


def knn_screen_bound(sq, d: int) -> float:
    """R, an upper bound on the largest row norm, from the rows' fp32 squared norms ``sq``
    (a tensor or an array; each within gamma_d of the true one): shared by every
    latent_knn provider for :func:`knn_screen_certain`."""
    top = float(sq.max()) if len(sq) else 0.0
    return math.sqrt(top * (1.0 + 2.0 * (d + 2) * _FP32_U))


@contextlib.contextmanager
def _ieee_fp32_products(device: torch.device):
    """Float32 matmuls on ``device`` at IEEE precision inside, the caller's setting restored
    after.  The screen's rounding bound is IEEE fp32's: a TF32 or bfloat16 product (the
    common ``set_float32_matmul_precision("high")`` of GPU training) errs some 2^13 times
    more and would leave nearly every row to be measured again, O(n^2 d).  Through the
    per-backend setting (torch >= 2.9): the global getter raises once a caller has used it."""
    backend = getattr(torch.backends.cuda if device.type == "cuda" else torch.backends.mkldnn, "matmul", None)
    old = getattr(backend, "fp32_precision", None)   # "none": follow the global setting, which may be lowered
    if old is None or old == "ieee":
        yield
        return
    backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        backend.fp32_precision = old


def knn_screen_certain(left: torch.Tensor, sq: torch.Tensor, kth: torch.Tensor, R: float, d: int,
                       u: float | None = None) -> torch.Tensor:
    """(rows,) bool: True where no column left out of a row's candidates can be among its k
    nearest.  ``left``: the smallest screen score |zj|^2 - 2 zi.zj any left-out column
    can have (+inf: none is left out); ``sq``: the rows' fp32 |zi|^2 (within gamma_d);
    ``kth``: the k-th directly computed fp32 distance among the candidates; R from
    :func:`knn_screen_bound`; u: the screen's unit roundoff (default 2^-24: IEEE fp32, as
    every provider's screen runs).

    The bound (in float64, u the unit roundoff, gamma_n = n u / (1 - n u)):
    - the score of column j, fl(sum_t zi_t (-2 zj_t) + c_j) with c_j = fl(|zj|^2), errs by
      at most gamma_{d+1} (2 |zi| |zj| + c_j) + gamma_d |zj|^2 in any summation order, FMA
      or not: below (2d + 3)(1 + 1e-3) u (|zi| + |zj|)^2 for d u < 1e-3; eps takes
      4 (d + 2) u (|zi| + R)^2, R the largest row norm (at least 2x that bound), so every
      left-out column's true distance is at least D_lo = left + |zi|^2 - eps;
    - a directly computed fp32 distance sum (zi_t - zj_t)^2 of nonnegative terms is at least
      (1 - gamma_{d+3}) times the true one, so every left-out column's is at least
      D_lo (1 - 2 (d + 3) u) (or D_lo itself, when D_lo < 0: never past kth >= 0).
    A row is certain when that exceeds the k-th candidate's distance strictly: then no
    left-out column could be picked, not even by the tie to the lower index.  Any other
    row is measured again (rows of duplicated latents, whose k-th distance is 0, among
    them when they have more than ~2k copies).  The fp32 |zi|^2 (off by at most
    gamma_d |zi|^2) and the float64 steps here use a sliver of eps's 2x margin."""
    u = _FP32_U if u is None else u
    zn = sq.to(device=left.device, dtype=torch.float64)
    eps = 4.0 * (d + 2) * u * (zn.sqrt() + R) ** 2
    lo = left.double() + zn - eps
    lo = torch.where(lo > 0, lo * (1.0 - 2.0 * (d + 3) * u), lo)
    return lo > kth.to(left.device).double()


def knn_remeasure(zt: torch.Tensor, rows: torch.Tensor, k: int, measure=None) -> torch.Tensor:
    """(len(rows), k) int64 on zt's device: each row's k nearest other rows of zt by
    directly computed distances sum (zi - zj)^2 over every column (as :func:`_exact_nearest`
    computes them), nearest first, equal distances to the lower index, the row itself
    excluded.

    Rows with the same latent (duplicated images: a pool's placeholder image, copied
    thousands of times, is every copy's nearest and never certain) have the same distances
    to every column, so each distinct latent is measured once, for its k + 1 nearest with
    itself included; each row then drops itself, or the last when it is not among them.
    Each copy used to cost n x d: 10,000 copies in a pool of 10^6, 1.6 x 10^11 flops at
    d = 16.  ``measure(zt, points, kk)``: (len(points), kk) int64 columns of each point's kk
    nearest rows of zt, no row excluded (default :func:`knn_measure`; the CPU kernel passes
    its own)."""
    rows = rows.to(zt.device)
    if len(rows) == 0:
        return torch.empty((0, k), dtype=torch.int64, device=zt.device)
    # equal floats group together (-0.0 with 0.0: their distances to every column are equal)
    points, which = torch.unique(zt[rows], dim=0, return_inverse=True)
    near = (measure or knn_measure)(zt, points, k + 1).to(zt.device)[which]    # (len(rows), k + 1)
    keep = near != rows.unsqueeze(1)
    keep[:, k] &= ~keep[:, :k].all(1)   # itself not among the first k: drop the (k + 1)-th
    return near[keep].view(len(rows), k)


def knn_measure(zt: torch.Tensor, points: torch.Tensor, kk: int) -> torch.Tensor:
    """(len(points), kk) int64: each point's kk nearest rows of zt (n x d) by directly
    computed distances sum (p - zj)^2, nearest first, equal distances to the lower index,
    no row excluded.  Distances go in slices of at most KNN_BLOCK_FLOATS (points x n), each
    built from column blocks whose (points, columns, d) temporaries stay within the bound
    too."""
    n, d = zt.shape
    res = torch.empty((len(points), kk), dtype=torch.int64, device=zt.device)
    step = max(1, KNN_BLOCK_FLOATS // max(1, n))
    for a in range(0, len(points), step):
        pi = points[a:a + step].to(zt.device).unsqueeze(1)
        dist = torch.empty((len(pi), n), dtype=torch.float32, device=zt.device)
        cb = max(1, KNN_BLOCK_FLOATS // max(1, len(pi) * d))
        for c in range(0, n, cb):
            dist[:, c:c + cb] = ((zt[c:c + cb].unsqueeze(0) - pi) ** 2).sum(-1)
        vals, idx = _smallest_first(dist, kk)   # columns ascending, ties at the cut to the lower
        order = torch.sort(vals, dim=1, stable=True).indices   # equal distances: lower index first
        res[a:a + step] = idx.gather(1, order)
    return res


def _smallest_first(v: torch.Tensor, m: int, with_next: bool = False):
    """(values, columns) of the m smallest entries of each row of v, columns ascending, ties
    at the cut going to the lower column.  topk alone picks any of the tied columns (and
    which depends on the row length, so pruned and unpruned runs disagreed): discovery's
    scores must not change between the CPU kernel (lower index) and this reference.

    One topk of m + 1: a row whose (m+1)-th smallest equals its m-th has a run of equal
    values (duplicated latents) cut by the selection, and only those rows are redone, in
    slices of at most a quarter of KNN_BLOCK_FLOATS: clean rows pay almost nothing (a full
    compare pass per row cost more than the topk) and peak memory stays bounded.
    With ``with_next``, also each row's (m+1)-th smallest value (inf when nothing is left
    out): no entry left out is smaller."""
    if m >= v.shape[1]:                       # everything selected: no cut, no ties at it
        idx = torch.arange(v.shape[1], device=v.device).expand(len(v), -1).contiguous()
        if with_next:
            return v.clone(), idx, torch.full((len(v),), float("inf"), dtype=v.dtype, device=v.device)
        return v.clone(), idx
    vals, idx = v.topk(m + 1, largest=False)  # sorted: vals[:, m - 1] is the cut
    nxt = vals[:, m].clone() if with_next else None
    t = vals[:, m - 1:m]                      # NaN compares unequal: never redone
    tied = (vals[:, m:] == t).squeeze(1).nonzero().squeeze(1)
    idx = idx[:, :m].contiguous()
    if len(tied):
        # the tied entries sit at the end of each sorted top m; swap them for the lowest
        # columns equal to the cut, found by a topk over their column numbers
        ar = torch.arange(v.shape[1], dtype=torch.int32, device=v.device)
        pos = torch.arange(m, device=v.device)
        step = max(1, KNN_BLOCK_FLOATS // (4 * v.shape[1]))
        for a in range(0, len(tied), step):
            rows = tied[a:a + step]
            ts = t[rows]
            need = (vals[rows, :m] == ts).sum(1, keepdim=True)          # (r, 1), >= 1
            key = torch.where(v[rows] == ts, ar, v.shape[1])
            first = key.topk(int(need.max()), largest=False).values.long()  # ascending
            j = pos - (m - need)                                          # slot among the tied
            sub = idx[rows]
            idx[rows] = torch.where(j >= 0, first.gather(1, j.clamp(0, first.shape[1] - 1)), sub)
    idx = idx.sort(1).values
    if with_next:
        return v.gather(1, idx), idx, nxt
    return v.gather(1, idx), idx


def _exact_nearest(zt: torch.Tensor, start: int, cand: torch.Tensor, k: int,
                   invalid: torch.Tensor | None = None, with_kth: bool = False):
    """The k nearest of each row's candidates by distances computed directly, sum (zi - zj)^2:
    the GEMM form |zj|^2 - 2 zi.zj cancels digits for tight groups away from the origin,
    which is where shortcut clusters live.  ``invalid`` candidates rank last.  With
    ``with_kth``: (those, each row's k-th distance (inf where invalid))."""
    # candidates in ascending index first, so the stable sort below breaks equal distances
    # (duplicated latents) by the lower index, as the fused kernels do
    cand, perm = cand.sort(1)
    zi = zt[start:start + len(cand)].unsqueeze(1)
    dist = ((zt[cand] - zi) ** 2).sum(-1)
    if invalid is not None:
        dist = dist.masked_fill(invalid.gather(1, perm), float("inf"))
    srt, order = torch.sort(dist, dim=1, stable=True)
    order = order[:, :k]
    if with_kth:
        return cand.gather(1, order), srt[:, k - 1]
    return cand.gather(1, order)


def cluster_similarity(
    x: torch.Tensor,
    offsets: torch.Tensor,
    assign: torch.Tensor,
    centroids: torch.Tensor,
    k_per_group: torch.Tensor,
    m: int = 8,
):
    """Per-cluster statistics used by discovery scoring.

    Returns (cos (N,) fp32: cosine similarity of each point to its own centroid,
             exemplars (G, kmax, m) int64: indices into x of the m members nearest the
               centroid in squared L2 (ties by index), -1 where a cluster has fewer,
             mean_cos (G, kmax) fp32, mean_sqdist (G, kmax) fp32; 0 for empty clusters).
    """
    check_points(x)   # a 1-D x failed in an IndexError naming nothing
    if centroids.dim() != 3 or centroids.shape[2] != x.shape[1]:
        raise ValueError(f"centroids must be (G, kmax, d={x.shape[1]}), got shape {tuple(centroids.shape)}")
    G, kmax, d = centroids.shape
    N = x.shape[0]
    # statistics, not a graph: with points that require grad, cos and the means did too (the
    # CuPy kernel returns plain tensors)
    x, centroids = x.detach(), centroids.detach()
    # torch.full's "negative dimension" (or a float size) named neither m nor its value
    m = check_count(m, "m (exemplars per cluster)")
    # as the CuPy launcher checks them: assign = -1 counted the point in the previous
    # group's last cluster (an exemplar of another class), silently
    offsets = check_members(x, offsets, assign, kmax)
    if len(offsets) != G + 1:
        raise ValueError(f"offsets has {len(offsets)} entries; expected G + 1 = {G + 1}")
    kpg = check_k_per_group(k_per_group, G, kmax)
    gid = group_ids(offsets, N)
    # checked integral above (float indices fail to index); on x's device, as the CuPy
    # launcher moves them before it hands m > 32 here: CPU assign or centroids with CUDA
    # points failed in a device mismatch
    assign = assign.to(x.device).long()
    check_within_k(gid, assign, kpg)
    c = (centroids.to(device=x.device, dtype=torch.float32)[gid, assign] if N
         else torch.zeros(0, d, device=x.device, dtype=torch.float32))
    xf = x.float()
    cos = F.cosine_similarity(xf, c, dim=1, eps=1e-12) if N else torch.zeros(0, device=x.device, dtype=torch.float32)
    sq = ((xf - c) ** 2).sum(1)
    flat = gid * kmax + assign
    counts = torch.bincount(flat, minlength=G * kmax).float()
    if x.device.type == "cpu":
        tot_cos = torch.zeros(G * kmax, dtype=torch.float32).index_add_(0, flat, cos)
        tot_sq = torch.zeros(G * kmax, dtype=torch.float32).index_add_(0, flat, sq)
    else:   # index_add_ adds with float atomics on CUDA: the means' bits varied run to run
        tot_cos, tot_sq = sorted_sums(flat, torch.stack([cos, sq], 1), G * kmax).unbind(1)
    mean_cos = tot_cos / counts.clamp_min(1)
    mean_sq = tot_sq / counts.clamp_min(1)
    exemplars = torch.full((G * kmax, m), -1, dtype=torch.int64, device=x.device)
    if N and m > 0:
        # sort by (cluster, distance, index): lexsort via two stable sorts
        order = torch.argsort(sq, stable=True)
        order = order[torch.argsort(flat[order], stable=True)]
        fs = flat[order]
        starts = torch.searchsorted(fs, torch.arange(G * kmax, device=x.device))
        rank = torch.arange(N, device=x.device) - starts[fs]
        keep = rank < m
        exemplars[fs[keep], rank[keep]] = order[keep]
    return (cos, exemplars.view(G, kmax, m), mean_cos.view(G, kmax), mean_sq.view(G, kmax))


def kmeans_plusplus(
    x: torch.Tensor,
    offsets: torch.Tensor,
    k_per_group: torch.Tensor,
    kmax: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Batched k-means++ seeding: every group draws its next seed in the same step.

    Sampling proportional to D^2 within each group is one cumulative sum plus a
    searchsorted per group, with no Python loop over groups (each group's D^2 scaled by a
    power of two to its own range first: no draw loses precision to the groups before
    it).  Each step touches only the points of groups that still draw seeds (k_g > step):
    when one large class needs far more seeds than the rest, later steps read that class
    alone, so the cost is O(sum_g k_g * N_g * d) rather than O(kmax * N * d).
    Groups with k_g < kmax leave the extra rows as zeros (masked everywhere).
    """
    check_points(x)
    check_generator(generator)
    N, d = x.shape
    kmax = check_count(kmax, "kmax")   # -1 failed in zeros() naming nothing
    # as the CPU kernel checks them (torch's size mismatches and IndexErrors named neither)
    offsets = check_offsets(offsets, N, x.device)
    G = len(offsets) - 1
    kpg_h = check_seed_counts(k_per_group, G)
    dev = x.device
    xf = x.detach().float()   # points that require grad failed in the out= ops below (the CPU kernel took them)
    cent = torch.zeros(G, kmax, d, dtype=torch.float32, device=dev)
    if N == 0 or kmax == 0:   # kmax = 0: no seed to draw (writing seed 0 raised IndexError)
        return cent
    sizes = (offsets[1:] - offsets[:-1]).long()
    gid = group_ids(offsets)
    # the step schedule (which groups still draw) and every draw, on the host and up
    # front, in the order the steps use them: no device sync per step on a GPU
    sizes_h = sizes.cpu()
    nonempty_h = sizes_h > 0
    steps = min(kmax, int(kpg_h[nonempty_h].max())) if bool(nonempty_h.any()) else 1
    u = torch.rand(G, generator=generator, device="cpu").to(dev)
    u_steps = [torch.rand(G, generator=generator, device="cpu") for _ in range(1, steps)]
    u_steps = torch.stack(u_steps).double().to(dev) if u_steps else None
    # first seed: uniform within each group
    first = offsets[:-1] + (u * sizes).long().clamp_max((sizes - 1).clamp_min(0))
    # groups given k = 0 draw (the draws stay aligned) but keep zeros, as documented and
    # as the CPU kernel leaves them
    filled = (nonempty_h & (kpg_h > 0)).nonzero().flatten().to(dev)
    cent[filled, 0] = xf[first[filled]]
    d2 = ((xf - cent[gid, 0]) ** 2).sum(1)
    # the points of the groups still drawing seeds (a shrinking subset, sorted by group)
    on = None
    xa, ga_pt, d2a = xf, gid, d2
    for j in range(1, steps):
        active_h = nonempty_h & (kpg_h > j)
        u = u_steps[j - 1]   # one draw per group per step
        if on is None or not torch.equal(active_h, on):
            keep = active_h.to(dev)[ga_pt]
            xa, ga_pt, d2a = xa[keep], ga_pt[keep], d2a[keep]
            on = active_h
            ga = active_h.nonzero().flatten().to(dev)
            sz = sizes[ga]
            lo = torch.zeros(len(ga), dtype=torch.int64, device=dev)
            lo[1:] = torch.cumsum(sz, 0)[:-1]
            hi = lo + sz - 1
            local = torch.repeat_interleave(torch.arange(len(ga), device=dev), sz)
            # buffers reused step to step (fresh (N_active, d) blocks per step cost page faults)
            diff, new_d2 = torch.empty_like(xa), torch.empty_like(d2a)
            sc, cs = (torch.empty(len(xa), dtype=torch.float64, device=dev) for _ in range(2))
        # each group's D^2 scaled by the power of two that brings its largest into [0.5, 1)
        # (exact) before the shared float64 sum: unscaled, a group whose D^2 was ~1e16 times
        # smaller than an earlier group's rounded away below the running sum's last bit, and
        # drew uniformly (total 0) instead of by D^2; the first group's draws are unchanged
        mx = torch.segment_reduce(d2a, "max", lengths=sz)
        scale = torch.where((mx > 0) & torch.isfinite(mx), torch.frexp(mx)[0].double() / mx.double(), 1.0)
        torch.index_select(scale, 0, local, out=sc)
        torch.cumsum(sc.mul_(d2a), 0, out=cs)
        before = torch.where(lo > 0, cs[(lo - 1).clamp_min(0)], torch.zeros_like(cs[:1]).expand(len(ga)))
        total = cs[hi] - before
        ug = u[ga]
        pick = torch.searchsorted(cs, before + ug * total, right=True)
        # all-zero D^2 (duplicates): fall back to a uniform draw in the group
        uni = lo + (ug * sz).long().clamp_max(sz - 1)
        pick = torch.where(total > 0, torch.minimum(torch.maximum(pick, lo), hi), uni)
        seeds = xa[pick]
        cent[ga, j] = seeds
        torch.sub(xa, seeds[0] if len(ga) == 1 else seeds[local], out=diff)
        torch.sum(diff.square_(), 1, out=new_d2)
        torch.minimum(d2a, new_d2, out=d2a)
    return cent
