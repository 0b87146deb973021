"""CuPy launchers for the batched k-means / similarity CUDA kernels (``kernels/cuda``).

Same signatures and semantics as the k-means section of ``spurfast.kernels.reference``:
``kmeans_assign``, ``kmeans_update`` and ``cluster_similarity`` take and return torch CUDA
tensors.  Inputs reach the kernels as raw device pointers of the torch tensors (no copies;
``SPURFAST_KMEANS_DLPACK=1`` passes them through DLPack instead, bf16 as an int16 view since
CuPy has no bfloat16) and every launch goes to torch's current stream, so the calls order
correctly with the surrounding torch code and need no synchronisation.

Modules: a prebuilt fatbin ``kernels/prebuilt/<source>_sm<cc>.fatbin`` (built by
CMakeLists.txt, ``make kernels``) is loaded when one exists for this GPU's architecture
(or a lower one of the same major version, which the driver runs binary-compatibly);
otherwise the same source is compiled with NVRTC through ``cupy.RawModule``.  The
variable ``SPURFAST_KMEANS_NVRTC=1`` forces NVRTC, ``SPURFAST_KMEANS_FATBIN_DIR`` adds a
directory to search first, ``SPURFAST_KMEANS_TC=0`` keeps fp16/bf16 assignment off the
tensor cores (see ``use_tensor_cores``).  cupy is imported lazily: importing this module never touches
CUDA, and ``is_available()`` reports why the backend cannot run.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from pathlib import Path

import numpy as np
import torch

from . import reference as ref
from .group_layout import (assign_args, centroid_terms, check_count, check_integers, check_offsets, exclusive_prefix,
                           split_centroids, tile_prefix)

log = logging.getLogger("spurfast.kernels.kmeans_cupy")

CUDA_DIR = Path(__file__).resolve().parent / "cuda"
PREBUILT_DIR = Path(__file__).resolve().parent / "prebuilt"
SOURCES = ("kmeans_assign", "kmeans_update", "kmeans_similarity")
DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}

# Constants mirrored from the .cu files (launch shapes must match them).
ASSIGN_THREADS = 256
ASSIGN_SHAPES = ((16, 256), (32, 128), (64, 64))   # (TK, TP), the smallest TK >= kmax wins
TC_THREADS, TC_TP = 128, 64                       # tensor-core assign (fp16/bf16, sm_80+)
TC2_TK, TC2_CLD = 64, 40                          # tensor-core assign v2: centroid tile, padded slice
TC2_SMEM_MAX = 48 * 1024                          # dynamic shared memory without an opt-in
UPDATE_ROWS, UPDATE_BLOCK = 64, (32, 8, 1)
SIM_WARPS, SIM_THREADS, SIM_MAXM = 8, 128, 32

# one entry point per module, fetched right after loading so that a bad file or a
# compile error shows up where the module is made, not at the first launch
_PROBE = {"kmeans_assign": "spurfast_assign_f32_64x64", "kmeans_update": "spurfast_update_finalize",
          "kmeans_similarity": "spurfast_sim_cluster"}

_lock = threading.Lock()
_modules: dict[tuple[str, int], object] = {}   # (source, device index) -> cupy.RawModule
_origin: dict[tuple[str, int], str] = {}


def _cupy():
    import cupy  # lazy: heavy, and absent on CPU-only installs

    return cupy


def is_available() -> tuple[bool, str]:
    """(True, "") when CuPy is installed and sees a CUDA device, else (False, why)."""
    try:
        cupy = _cupy()
    except Exception as exc:
        return False, f"cupy is not installed or broken ({exc.__class__.__name__}: {exc})"
    try:
        if not cupy.cuda.is_available():
            return False, "cupy is installed but sees no CUDA device (cupy.cuda.is_available() is False)"
    except Exception as exc:
        return False, f"cupy cannot query CUDA ({exc.__class__.__name__}: {exc})"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device; the CuPy kernels take torch CUDA tensors"
    return True, ""


# ----------------------------------------------------------------------------- modules
def source_text(name: str) -> str:
    """The .cu source with its local #include pasted in (NVRTC gets no include path)."""
    text = (CUDA_DIR / f"{name}.cu").read_text()

    def paste(match):
        return (CUDA_DIR / match.group(1)).read_text()

    return re.sub(r'^#include "([^"]+)"\s*$', paste, text, flags=re.M)


def source_hashes(name: str) -> str:
    """What ``kernels/cuda/source_hashes.cmake`` writes beside a fatbin built from
    ``name``.cu: one "<file> <sha256>" line for the .cu and each header, sorted."""
    files = [CUDA_DIR / f"{name}.cu", *CUDA_DIR.glob("*.cuh")]
    lines = sorted(f"{f.name} {hashlib.sha256(f.read_bytes()).hexdigest()}" for f in files)
    return "\n".join(lines) + "\n"


def fatbin_is_current(path: Path, name: str) -> bool:
    """True when the fatbin was built from the sources as they are now (its ``.sources``
    file matches); a fatbin built before an edit lacks kernels the launcher calls."""
    stamp = Path(f"{path}.sources")
    return stamp.is_file() and stamp.read_text() == source_hashes(name)


def _fatbin_dirs() -> list[Path]:
    dirs = []
    extra = os.environ.get("SPURFAST_KMEANS_FATBIN_DIR")
    if extra:
        dirs.append(Path(extra))
    dirs.append(PREBUILT_DIR)
    return dirs


def find_fatbin(name: str, cc: int) -> Path | None:
    """Prebuilt fatbin for compute capability ``cc`` (e.g. 90): exact, else the highest
    lower minor of the same major (cubins are binary-compatible within a major).  An
    arch-specific build (``_sm90a``, which CMake accepts) runs on exactly that capability, a
    family build (``_sm100f``) on its major from that minor up."""
    best = None
    for d in _fatbin_dirs():
        for p in d.glob(f"{name}_sm*.fatbin"):
            m = re.fullmatch(rf"{re.escape(name)}_sm(\d+)([af]?)\.fatbin", p.name)
            if not m:
                continue
            arch, suffix = int(m.group(1)), m.group(2)
            runs = arch == cc if suffix == "a" else (arch // 10 == cc // 10 and arch <= cc)
            # the highest arch wins; at the same arch the plain build (SASS + PTX) over a suffixed one
            rank = (arch, suffix == "")
            if runs and (best is None or rank > best[0]):
                best = (rank, p)
        if best is not None:
            return best[1]
    return None


def _module(name: str, device_index: int):
    key = (name, device_index)
    mod = _modules.get(key)
    if mod is not None:
        return mod
    with _lock:
        if key in _modules:
            return _modules[key]
        cupy = _cupy()
        with cupy.cuda.Device(device_index):
            major, minor = torch.cuda.get_device_capability(device_index)
            cc = 10 * major + minor
            path = None if os.environ.get("SPURFAST_KMEANS_NVRTC") == "1" else find_fatbin(name, cc)
            if path is not None and not fatbin_is_current(path, name):
                log.warning("%s was built from other sources than %s.cu now holds (or has no .sources "
                            "file): compiling with NVRTC; `make kernels` rebuilds it", path, name)
                path = None
            if path is not None:
                try:
                    mod = cupy.RawModule(path=str(path))
                    mod.get_function(_PROBE[name])      # RawModule loads lazily: load now
                    _origin[key] = f"fatbin {path}"
                except Exception as exc:  # a stale or foreign file: say so, compile instead
                    log.warning("cannot load %s (%s); compiling %s.cu with NVRTC", path, exc, name)
                    mod = None
            if mod is None:
                mod = cupy.RawModule(code=source_text(name), options=("-std=c++17",))
                try:
                    mod.get_function(_PROBE[name])      # compiles now, so errors surface here
                except Exception as exc:
                    raise RuntimeError(f"NVRTC could not build {CUDA_DIR / (name + '.cu')} for sm_{cc}: "
                                       f"{exc}") from exc
                _origin[key] = "nvrtc"
            log.info("k-means kernels %s on device %d: %s", name, device_index, _origin[key])
            _modules[key] = mod
        return mod


def module_origin() -> dict[tuple[str, int], str]:
    """Where each loaded module came from ("fatbin <path>" or "nvrtc")."""
    return dict(_origin)


_functions: dict[tuple[str, str, int], object] = {}


def _fn(source: str, entry: str, device_index: int):
    key = (source, entry, device_index)
    fn = _functions.get(key)
    if fn is None:
        fn = _functions[key] = _module(source, device_index).get_function(entry)
    return fn


# ----------------------------------------------------------------------------- helpers
class _Launch:
    """Context: the tensors' device and torch's current stream as CuPy's current stream."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        cupy = _cupy()
        self.index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self._dev = cupy.cuda.Device(self.index)
        self._dev.__enter__()
        stream = torch.cuda.current_stream(self.index)
        self._stream = cupy.cuda.ExternalStream(stream.cuda_stream, self.index)
        self._stream.__enter__()
        return self

    def __exit__(self, *exc):
        self._stream.__exit__(*exc)
        self._dev.__exit__(*exc)
        return False


def _cp(t: torch.Tensor):
    """A contiguous torch CUDA tensor as a kernel argument: its device pointer (a uint64
    has a pointer's size; the caller keeps ``t`` alive until the launch is queued).
    ``SPURFAST_KMEANS_DLPACK=1`` passes a zero-copy CuPy view instead (bf16 as int16),
    the slower path kept for comparison: building DLPack views cost ~10 us per tensor."""
    if os.environ.get("SPURFAST_KMEANS_DLPACK") != "1":
        return np.uint64(t.data_ptr())
    cupy = _cupy()
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    if t.numel() == 0:   # nothing is read or written through it; keep DLPack away from size 0
        t = torch.zeros(1, dtype=t.dtype, device=t.device)
    return cupy.from_dlpack(t)


def _i64(v) -> "object":
    return np.int64(int(v))


def _check_x(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D torch tensor (N, d), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_cuda:
        raise ValueError(f"{name} is on {x.device}; the CuPy kernels need CUDA tensors (use backend='torch')")
    if x.dtype not in DTYPES:
        raise ValueError(f"{name} has dtype {x.dtype}; expected one of {sorted(str(d) for d in DTYPES)}")
    if x.shape[0] >= 2**31:
        raise ValueError(f"{name} has {x.shape[0]} rows; the kernels index points with 32 bits (< 2**31)")
    return x.contiguous()


def _segment_sort(offsets: torch.Tensor, assign: torch.Tensor, kmax: int, N: int):
    """(gid, perm, seg_first, counts) for segments s = group * kmax + cluster, stable order
    (``gid``: each point's group)."""
    G = len(offsets) - 1
    gid = ref.group_ids(offsets, N)
    flat = gid * kmax + assign
    _, perm = torch.sort(flat, stable=True)
    counts = torch.bincount(flat, minlength=G * kmax)
    return gid, perm.contiguous(), exclusive_prefix(counts), counts


def _check_assign(assign: torch.Tensor, N: int, kmax: int, device) -> torch.Tensor:
    if assign.dim() != 1 or assign.shape[0] != N:
        raise ValueError(f"assign must be (N,) = ({N},), got shape {tuple(assign.shape)}")
    check_integers(assign, "assign")   # the int64 cast below truncated 1.5 to 1 silently
    assign = assign.to(device=device, dtype=torch.int64).contiguous()
    if N:
        lo, hi = (int(v) for v in torch.aminmax(assign))
        if lo < 0 or hi >= kmax:
            raise ValueError(f"assign has values in [{lo}, {hi}]; expected cluster indices in [0, {kmax})")
    return assign


def use_tensor_cores(x: torch.Tensor) -> bool:
    """fp16/bf16 assignment runs on tensor cores (mma.sync, sm_80+) unless
    SPURFAST_KMEANS_TC=0; fp32 inputs always take the exact fp32 SIMT kernel."""
    if x.dtype not in (torch.float16, torch.bfloat16) or os.environ.get("SPURFAST_KMEANS_TC", "1") == "0":
        return False
    return torch.cuda.get_device_capability(x.device)[0] >= 8


# ----------------------------------------------------------------------------- ops
def kmeans_assign(x, offsets, centroids, k_per_group, metric: str = "l2", x_sqnorm=None):
    """See :func:`spurfast.kernels.reference.kmeans_assign` (x_sqnorm is accepted and not
    needed: the kernel computes each winner's distance on chip)."""
    G, kmax = ref.check_assign_args(x, offsets, centroids, metric)
    ref.check_x_sqnorm(x_sqnorm, x.shape[0])   # unread here, yet a wrong one is the caller's bug: refused alike
    x = _check_x(x)
    N, d = x.shape
    offsets, kpg, assign, dist = assign_args(x, offsets, k_per_group, G, kmax)
    if N == 0 or G == 0:
        return assign, dist
    c, cterm = centroid_terms(centroids, metric, x.device)
    dt = DTYPES[x.dtype]
    cosine = _i64(metric == "cosine")
    tc = use_tensor_cores(x)
    mt, dp = tc2_shape(x) if tc else (0, d)
    if mt:
        entry, tp, threads = f"spurfast_assign_tc2_{dt}_m{mt}", 64 * mt, TC_THREADS
        hi, lo = split_centroids(c.view(G * kmax, d), x.dtype, dp)
        xvec = d % 8 == 0 and x.data_ptr() % 16 == 0
        extra_args = (_cp(hi), _cp(lo))
        tail_args = (_i64(G), _i64(kmax), _i64(d), _i64(dp), cosine, _i64(xvec))
        smem = (tp * (dp + 8) + 2 * TC2_TK * TC2_CLD) * 2
    elif tc:
        entry, tp, threads = f"spurfast_assign_tc_{dt}", TC_TP, TC_THREADS
        extra_args, tail_args, smem = (), (_i64(G), _i64(kmax), _i64(d), cosine), 0
    else:
        tk, tp = next(((tk, tp) for tk, tp in ASSIGN_SHAPES if tk >= kmax), ASSIGN_SHAPES[-1])
        entry, threads = f"spurfast_assign_{dt}_{tp}x{tk}", ASSIGN_THREADS
        extra_args, tail_args, smem = (), (_i64(G), _i64(kmax), _i64(d), cosine), 0
    tile_first = tile_prefix(offsets, tp)
    grid = (N + tp - 1) // tp + G   # >= number of tiles; extra blocks return at once
    with _Launch(x.device) as L:
        fn = _fn("kmeans_assign", entry, L.index)
        fn((grid,), (threads,),
           (_cp(x),) + extra_args + (_cp(c), _cp(cterm), _cp(offsets), _cp(kpg), _cp(tile_first), _cp(assign),
                                     _cp(dist)) + tail_args, shared_mem=smem)
    return assign, dist


def tc2_shape(x: torch.Tensor) -> tuple[int, int]:
    """(m tiles per warp, padded d) of the v2 tensor-core assign for these points, or
    (0, d) when its x tile would not fit the shared memory (then the v1 kernel runs).
    ``SPURFAST_KMEANS_TC2=0`` keeps v1."""
    d = x.shape[1]
    dp = (d + 31) // 32 * 32
    if os.environ.get("SPURFAST_KMEANS_TC2", "1") == "0":
        return 0, d
    for mt in (2, 1):
        if (64 * mt * (dp + 8) + 2 * TC2_TK * TC2_CLD) * 2 <= TC2_SMEM_MAX:
            return mt, dp
    return 0, d


def kmeans_update(x, offsets, assign, kmax: int, deterministic: bool = True):
    """See :func:`spurfast.kernels.reference.kmeans_update`."""
    # int(kmax) ran 2.5 as 2, where the reference refuses it; kmax = 0 with points:
    # _check_assign names it; without, (G, 0, d) as the reference
    kmax = check_count(kmax, "kmax")
    x = _check_x(x)
    N, d = x.shape
    offsets = check_offsets(offsets, N, x.device)
    G = len(offsets) - 1
    S = G * kmax
    assign = _check_assign(assign, N, kmax, x.device)
    sums = torch.zeros(G, kmax, d, dtype=torch.float32, device=x.device)
    if N == 0:
        return sums, torch.zeros(G, kmax, dtype=torch.int64, device=x.device)
    _, perm, seg_first, counts = _segment_sort(offsets, assign, kmax, N)
    if d == 0:   # no coordinates to sum, but the points still count (the loop reads 0 as empty)
        return sums, counts.view(G, kmax)
    chunk_first = exclusive_prefix(torch.div(counts + (UPDATE_ROWS - 1), UPDATE_ROWS, rounding_mode="floor"))
    # an upper bound on the chunks without a host read; at most N (every chunk holds a row),
    # so the grid stays below 2**31 blocks as _check_x keeps N (N / 64 + N did not)
    nchunk_max = min(N, (N + UPDATE_ROWS - 1) // UPDATE_ROWS + min(S, N))
    partial = torch.empty((nchunk_max if deterministic else 1), d, dtype=torch.float32, device=x.device)
    with _Launch(x.device) as L:
        fn = _fn("kmeans_update", f"spurfast_update_partial_{DTYPES[x.dtype]}", L.index)
        fn((nchunk_max,), UPDATE_BLOCK,
           (_cp(x), _cp(perm), _cp(seg_first), _cp(chunk_first), _cp(partial), _cp(sums),
            _i64(S), _i64(d), _i64(bool(deterministic))))
        if deterministic:
            fin = _fn("kmeans_update", "spurfast_update_finalize", L.index)
            total = S * d
            fin(((total + 255) // 256,), (256,), (_cp(chunk_first), _cp(partial), _cp(sums), _i64(S), _i64(d)))
    return sums, counts.view(G, kmax)


def cluster_similarity(x, offsets, assign, centroids, k_per_group, m: int = 8):
    """See :func:`spurfast.kernels.reference.cluster_similarity`."""
    m = check_count(m, "m (exemplars per cluster)")   # int(m) ran 1.5 as 1, where the reference refuses it
    x = _check_x(x)
    N, d = x.shape
    if centroids.dim() != 3 or centroids.shape[2] != d:
        raise ValueError(f"centroids must be (G, kmax, d={d}), got shape {tuple(centroids.shape)}")
    G, kmax, _ = centroids.shape
    if m > SIM_MAXM:
        log.info("cluster_similarity: m=%d > %d exemplars; using the torch reference", m, SIM_MAXM)
        return ref.cluster_similarity(x, offsets, assign, centroids, k_per_group, m)
    offsets = check_offsets(offsets, N, x.device)
    if len(offsets) != G + 1:
        raise ValueError(f"offsets has {len(offsets)} entries; expected G + 1 = {G + 1}")
    assign = _check_assign(assign, N, kmax, x.device)
    kpg = ref.check_k_per_group(k_per_group, G, kmax)
    S = G * kmax
    cos = torch.zeros(N, dtype=torch.float32, device=x.device)
    sq = torch.zeros(N, dtype=torch.float32, device=x.device)
    exemplars = torch.full((G, kmax, m), -1, dtype=torch.int64, device=x.device)
    mean_cos = torch.zeros(G, kmax, dtype=torch.float32, device=x.device)
    mean_sq = torch.zeros(G, kmax, dtype=torch.float32, device=x.device)
    if N == 0 or S == 0:
        return cos, exemplars, mean_cos, mean_sq
    c = centroids.to(device=x.device, dtype=torch.float32).contiguous()
    gid, perm, seg_first, _ = _segment_sort(offsets, assign, kmax, N)
    ref.check_within_k(gid, assign, kpg)   # with the sort's group ids: none made twice
    gid = gid.contiguous()   # _cp passes pointers: every argument must outlive the launch
    with _Launch(x.device) as L:
        pt = _fn("kmeans_similarity", f"spurfast_sim_point_{DTYPES[x.dtype]}", L.index)
        pt(((N + SIM_WARPS - 1) // SIM_WARPS,), (SIM_WARPS * 32,),
           (_cp(x), _cp(c), _cp(gid), _cp(assign), _cp(cos), _cp(sq), _i64(N), _i64(kmax), _i64(d)))
        cl = _fn("kmeans_similarity", "spurfast_sim_cluster", L.index)
        cl((S,), (SIM_THREADS,),
           (_cp(perm), _cp(seg_first), _cp(cos), _cp(sq), _cp(exemplars), _cp(mean_cos), _cp(mean_sq), _i64(m)))
    return cos, exemplars, mean_cos, mean_sq
