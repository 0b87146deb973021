"""The grouped (CSR) layout every GPU k-means launcher starts from.

Points sorted by group with offsets (G + 1,), centroids (G, kmax, d) and k per group: the
checks (one host synchronisation for all of them) and the derived tensors the CuPy
(`kmeans_cupy`) and Triton (`kmeans_triton`) assign kernels share: the score terms of
the centroids, the per-group tile prefix a block searches to find its group, and the
hi/lo split of fp32 centroids for 16-bit tensor-core products.  Torch only: importing it
needs neither cupy nor triton.
"""
from __future__ import annotations

import operator

import numpy as np
import torch


def check_points(x, name: str = "x") -> None:
    """Refuse anything but a real (N, d) tensor: every provider casts points to fp32, and a
    complex one lost its imaginary part there (points that differ only in it merged), while a
    1-D or 3-D one failed in an unpacking error naming nothing."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor (N, d), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    check_real(x, name)


def check_real(t: torch.Tensor, name: str) -> None:
    """Refuse a complex tensor (any shape): its imaginary part would be lost in the fp32 cast."""
    if t.is_complex():
        raise ValueError(f"{name} has dtype {t.dtype}; expected real numbers")


def wide_points(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float64 where it holds integers (or bools), else as given: callers shift
    float64 points near their group's origin before the fp32 cast, and integers cast first
    lost their spread (1e9 + {0, 1} and 1e9 + {6, 7} became one point)."""
    return x if x.is_floating_point() else x.to(torch.float64)


def check_integers(t: torch.Tensor, name: str) -> None:
    """Refuse a complex tensor, or a float one holding a fractional or non-finite value or
    one past int64: the int64 conversion after it truncated them silently (offsets 0, 2.5,
    5 split the rows at 2; assign 1.5 counted the point in cluster 1) or wrapped them (1e30
    became -2**63: a k_per_group of 1e30 drew no seeds).  Integer tensors pass at no cost;
    a float one costs a host read (a rare path)."""
    if not isinstance(t, torch.Tensor):   # a list or numpy array failed in .is_complex(), naming nothing
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.is_complex():
        raise ValueError(f"{name} has dtype {t.dtype}; expected integers")
    bad = non_integer_entries(t)
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{name} holds {t.flatten()[i].item():g} (entry {i}); expected integers within int64")


def non_integer_entries(t: torch.Tensor) -> torch.Tensor:
    """Flat indices of the entries of a float tensor that are no int64 integer: fractional,
    non-finite, or past int64, where the cast wraps (none for an integer tensor, at no cost)."""
    if not t.is_floating_point():
        return torch.zeros(0, dtype=torch.int64, device=t.device)
    return (~torch.isfinite(t) | (t != t.round()) | (t >= 2.0 ** 63) | (t < -2.0 ** 63)).flatten().nonzero().flatten()


def check_generator(generator) -> None:
    """k-means++ draws from a ``torch.Generator``: a seed given in its place failed inside
    torch with its list of signatures (the reference) or with an AttributeError (CPU)."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), got "
                        f"{type(generator).__name__}")


def check_count(v, name: str) -> int:
    """A size argument (kmax, k, m) as a Python int, refused by name unless it is a
    non-negative integer (numpy and 0-d tensor integers pass): 2.5 ran as 2 in one
    provider and failed inside torch in another, and -1 failed deep in zeros() or numpy
    ("negative dimensions") naming neither the argument nor its value."""
    # a bool passes operator.index: latent_knn(z, k=True) ran with k = 1
    if isinstance(v, (bool, np.bool_)) or (isinstance(v, torch.Tensor) and v.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer, got {v!r}")
    try:
        n = operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {v!r}") from None
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return n


def check_seed_counts(k_per_group, G: int) -> torch.Tensor:
    """k-means++'s ``k_per_group`` as a CPU int64 tensor, after checking it holds G
    non-negative integers (a k above kmax draws kmax seeds).  Both providers check it so: a
    (1, 2) k for one group ran as k = 1 in one and failed in an IndexError in the other, and
    a negative k silently drew no seeds."""
    k = torch.as_tensor(k_per_group)   # a list, as the other providers take it
    check_integers(k, "k_per_group")   # the int64 cast below truncated 2.7 to 2 seeds silently
    if k.dim() != 1:
        raise ValueError(f"k_per_group has shape {tuple(k.shape)}; expected ({G},), one k per group")
    if len(k) != G:
        raise ValueError(f"k_per_group has {len(k)} entries for {G} groups")
    k = k.long().cpu()
    neg = (k < 0).nonzero().flatten()
    if len(neg):   # as the assign refuses it
        g = int(neg[0])
        raise ValueError(f"k_per_group[{g}] = {int(k[g])}: expected a non-negative integer")
    return k


def check_offsets(offsets: torch.Tensor, N: int, device, k_per_group=None, kmax: int = 0):
    """offsets on ``device`` as int64, checked to run 0..N without decreasing; k_per_group
    (if given) checked to lie in [0, kmax].  One host synchronisation for all checks."""
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or len(offsets) < 1:
        raise ValueError(f"offsets must be a 1-D tensor (G + 1,), got "
                         f"{tuple(offsets.shape) if isinstance(offsets, torch.Tensor) else type(offsets).__name__}")
    check_integers(offsets, "offsets")
    offsets = offsets.to(device=device, dtype=torch.int64).contiguous()
    # the smallest group size too: decreasing offsets passed the end checks, and the assign
    # kernels then read and wrote rows past N
    smallest = (offsets[1:] - offsets[:-1]).min() if len(offsets) > 1 else offsets[0]
    probe = [offsets[0], offsets[-1], smallest]
    if k_per_group is not None and len(k_per_group):
        probe += [k_per_group.min(), k_per_group.max()]
    vals = [int(v) for v in torch.stack(probe).tolist()]
    if vals[0] != 0 or vals[1] != N:
        raise ValueError(f"offsets must run from 0 to N={N}, got {vals[0]}..{vals[1]}")
    if vals[2] < 0:   # where: the first offsets alone hid a decrease further in
        g = int(torch.nonzero(offsets[1:] < offsets[:-1])[0])
        a, b = offsets[g:g + 2].tolist()
        raise ValueError(f"offsets must not decrease (group sizes >= 0), got offsets[{g}] = {a} > "
                         f"offsets[{g + 1}] = {b} (group {g} of size {b - a})")
    if len(vals) == 5 and (vals[3] < 0 or vals[4] > kmax):
        raise ValueError(f"k_per_group has values in [{vals[3]}, {vals[4]}]; expected [0, kmax={kmax}]")
    return offsets


def assign_args(x: torch.Tensor, offsets, k_per_group, G: int, kmax: int):
    """(offsets, k_per_group, assign, dist) every GPU assign launcher starts from: the
    group layout checked and on x's device, and zeroed outputs."""
    kpg = torch.as_tensor(k_per_group)
    if kpg.dim() != 1:   # (1, 2) for one group ran as k = 1 (a 0-d k failed in len()), as the reference refuses it
        raise ValueError(f"k_per_group has shape {tuple(kpg.shape)}; expected ({G},), one k per group")
    if len(kpg) != G:
        raise ValueError(f"k_per_group has {len(kpg)} entries for {G} groups")
    if kpg.is_floating_point() or kpg.is_complex():   # 2.7 ran as 2: the reference's refusals
        from .reference import check_k_per_group   # (a host read, on this rare path only)

        kpg = check_k_per_group(kpg, G, kmax)
    kpg = kpg.to(device=x.device, dtype=torch.int64).contiguous()
    offsets = check_offsets(offsets, x.shape[0], x.device, kpg, kmax)
    assign = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    dist = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    return offsets, kpg, assign, dist


def centroid_terms(centroids: torch.Tensor, metric: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, cterm), contiguous fp32 on ``device``: the centroids (unit rows for cosine) and
    each one's score term (|c|^2 for L2, 0 for cosine), as every GPU assign kernel scores
    s = cterm - 2 x.c (L2) or -x.c (cosine)."""
    c = centroids.to(device=device, dtype=torch.float32)
    if metric == "cosine":
        c = torch.nn.functional.normalize(c, dim=-1)
        cterm = torch.zeros(c.shape[:2], dtype=torch.float32, device=device)
    else:
        cterm = (c * c).sum(-1)
    return c.contiguous(), cterm.contiguous()


def tile_prefix(offsets: torch.Tensor, rows_per_tile: int) -> torch.Tensor:
    """(G + 1,) first tile of each group when every group's rows are cut into tiles of
    ``rows_per_tile`` (the last entry: the number of tiles); a GPU assign block or program
    finds its group by searching it, so no host-built tile table is needed."""
    sizes = offsets[1:] - offsets[:-1]
    return exclusive_prefix(torch.div(sizes + (rows_per_tile - 1), rows_per_tile, rounding_mode="floor"))


def exclusive_prefix(counts: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sum with the total appended: (len + 1,) int64 on the same device."""
    out = torch.zeros(len(counts) + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=out[1:])
    return out


def split_centroids(c: torch.Tensor, dtype: torch.dtype, dp: int) -> torch.Tensor:
    """fp32 rows (R, d) -> (2, R, dp) in ``dtype``, zero-padded: hi = [0] and lo = [1] with
    c ~= hi + lo, so two 16-bit tensor-core products keep the scores near fp32 accuracy.
    One buffer: a kernel that reads both reaches lo at a fixed offset, with no stacking copy."""
    R, d = c.shape
    out = torch.zeros(2, R, dp, dtype=dtype, device=c.device)
    out[0, :, :d] = c.to(dtype)
    out[1, :, :d] = (c - out[0, :, :d].float()).to(dtype)
    return out
