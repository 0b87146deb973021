"""Fused CPU k-means kernels (``kernels/cpu/kmeans_cpu.cpp``, AVX2 + FMA; the assignment's
and the kNN search's tiles in AVX-512 where the CPU has it, see :func:`isa`) through ctypes.

Same signatures and semantics as ``kmeans_assign``, ``kmeans_update``,
``kmeans_assign_update`` (one pass), ``kmeans_plusplus`` and ``latent_knn`` in
``spurfast.kernels.reference``, for CPU tensors.  The reference forms each distance block
with a GEMM, writes it to memory and runs numpy's argmin over it, then a third pass for
the winner's distance; here one pass keeps a 6-point x 16-centroid tile of scores in
registers and reduces it on the spot.

The shared library is compiled on first use with the system C++ compiler (``$CXX``, else
g++ or c++; about 2 s) into ``$SPURFAST_CACHE_DIR`` (default ``~/.cache/spurfast``), named
by a hash of the source and flags, and loaded from there afterwards.  ``is_available()``
says why it cannot run (no x86-64 AVX2/FMA, no compiler, a failed build), and the
registry then falls back to the reference.  Threads: fixed contiguous row ranges, their
number a function of N alone (``_parts``) and cut as the reference's row split
(``reference._split_rows``) cuts them, run by up to ``torch.get_num_threads()`` threads:
the sums do not depend on scheduling or on the thread count.  They run
on OpenMP inside the library, which resolves to the libgomp torch already loaded (one
runtime, one pool; Python threads raced torch's spinning OpenMP workers); a compiler
without OpenMP gives a serial library (a `.no-openmp` mark beside it keeps later processes from
trying again until the compiler finds an OpenMP runtime), and then Python threads split the rows.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from ..cores import usable_cores
from . import reference as ref
from .group_layout import (check_count, check_generator, check_integers, check_offsets, check_points, check_real,
                           check_seed_counts)

SOURCE = Path(__file__).resolve().parent / "cpu" / "kmeans_cpu.cpp"
FLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC")
OPENMP = "-fopenmp"   # tried first; dropped (Python threads instead) when the compiler lacks it
NR = 16            # centroids per micro-tile (kernel constant): centroids are padded to it
_MIN_ROWS = 2048   # rows per part below which one part covers the whole range
_MAX_PARTS = 16    # most row ranges (and threads) a call uses: fixed, so sums match at any thread count
ISAS = ("avx2", "avx512")   # the assign and knn micro-kernels, by the library's code for them (0, 1)

_lock = threading.Lock()
_lib = None
_why_not: str | None = None


def _cxx() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_has_avx2_fma() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def _cache_dir() -> Path:
    # absolute: dlopen takes a name without a slash ("." or "" made "kmeans_cpu-<tag>.so") as a
    # library to search for, not a file here, so the kernels built and then never loaded; an
    # empty value means unset (it built into the working directory)
    return Path(os.environ.get("SPURFAST_CACHE_DIR") or Path.home() / ".cache" / "spurfast").absolute()


def _build(cxx: str) -> Path:
    serial = (*FLAGS, "-Wno-unknown-pragmas")
    # a compiler that failed the OpenMP build once fails it again (no libgomp): without the
    # mark every process compiled the whole file again before it loaded the serial library
    failed = _library_path(cxx, (*FLAGS, OPENMP)).with_suffix(".no-openmp")
    if failed.is_file() and failed.read_text(errors="replace").split("\n", 1)[0] == _openmp_runtime(cxx):
        return _build_with(cxx, serial)
    try:
        library = _build_with(cxx, (*FLAGS, OPENMP))
        with contextlib.suppress(OSError):   # stale: the runtime it lacked has been found
            failed.unlink(missing_ok=True)
        return library
    except RuntimeError as exc:
        library = _build_with(cxx, serial)   # first: a compiler that builds nothing leaves no mark
        from ..atomic_files import replace_atomically

        runtime = _openmp_runtime(cxx)
        replace_atomically(failed, lambda fh: fh.write(f"{runtime}\n{exc}\n"))
        logging.getLogger("spurfast.kernels").info(
            "the CPU kernels are built without OpenMP (%s cannot build with %s; remove %s to try again)",
            cxx, OPENMP, failed)
        return library


def _openmp_runtime(cxx: str) -> str:
    """Where ``cxx`` finds the OpenMP runtimes (the bare name where it finds none).  The
    `.no-openmp` mark records it, so a mark made before libgomp was installed is tried again."""
    found = []
    for name in ("libgomp.so", "libomp.so"):
        try:
            r = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True, timeout=60)
            found.append(r.stdout.strip() if r.returncode == 0 else "?")
        except (OSError, subprocess.SubprocessError):
            found.append("?")
    return "openmp runtimes: " + " ".join(found)


def _library_path(cxx: str, flags: tuple[str, ...]) -> Path:
    tag = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode() + cxx.encode()).hexdigest()[:16]
    return _cache_dir() / f"kmeans_cpu-{tag}.so"


def _remove_killed_builds(folder: Path) -> None:
    """The temporary libraries of builds killed mid-compile (kill -9 left them for good; the
    orphaned compiler even finished writing them): ``kmeans_cpu-TAG.PID.*.so.tmp`` of a
    process that is gone, and, of older versions, ``tmp*.so`` (mkstemp's names) untouched for
    ten minutes (a build takes seconds) that hold this library's symbols: SPURFAST_CACHE_DIR
    may be a shared folder (/tmp, the working folder), where other programs' tmp*.so went too."""
    from ..atomic_files import abandoned

    now = time.time()
    for f in folder.glob("*.so*"):
        parts = f.name.split(".")
        try:
            if (f.name.endswith(".so.tmp") and len(parts) > 3 and abandoned(f, parts[1])) or (
                    f.name.startswith("tmp") and f.suffix == ".so" and now - f.stat().st_mtime > 600
                    and f.is_file() and not f.is_symlink() and b"spurfast_cpu_assign" in f.read_bytes()):
                f.unlink()
        except OSError:   # removed meanwhile, or not ours to remove
            pass


def _build_with(cxx: str, flags: tuple[str, ...]) -> Path:
    out = _library_path(cxx, flags)
    tag = out.name[len("kmeans_cpu-"):-len(".so")]
    if out.parent.is_dir():
        _remove_killed_builds(out.parent)
    if out.is_file():
        return out
    # build under a temporary name (this process's), then rename: ranks compiling at once never
    # load half a file
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"kmeans_cpu-{tag}.{os.getpid()}.", suffix=".so.tmp", dir=out.parent)
    except OSError as exc:   # the bare error named a path, not what it was for
        raise OSError(f"cannot write the CPU kernels' cache folder {out.parent} ({exc.strerror or exc}); "
                      f"set SPURFAST_CACHE_DIR to a writable folder") from exc
    os.close(fd)
    try:
        r = subprocess.run([cxx, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{cxx} could not build {SOURCE}:\n{r.stderr[-2000:]}")
        # readable by all (mkstemp's 0600 left 0711 after the compiler: another user sharing
        # SPURFAST_CACHE_DIR could not load it and ran the reference kernels without a word)
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load():
    global _lib, _why_not
    if _lib is not None or _why_not is not None:
        return _lib
    with _lock:
        if _lib is not None or _why_not is not None:
            return _lib
        switch = os.environ.get("SPURFAST_KMEANS_CPU", "")
        if switch == "0":
            _why_not = "disabled by SPURFAST_KMEANS_CPU=0"
            return None
        if switch not in ("", "1"):   # "false" or "off" left the kernels on without a word
            _why_not = f"SPURFAST_KMEANS_CPU must be 0 or 1, got {switch!r} (the kernels stay off until it is)"
            # a warning, once (the registry's fallback note is at INFO): a run was slower without a word
            logging.getLogger("spurfast.kernels").warning("%s", _why_not)
            return None
        if not _cpu_has_avx2_fma():
            _why_not = f"needs an x86-64 CPU with AVX2 and FMA (this is {platform.machine()})"
            return None
        cxx = _cxx()
        if cxx is None:
            _why_not = "no C++ compiler ($CXX, g++ or c++) to build kernels/cpu/kmeans_cpu.cpp"
            return None
        try:
            path = _build(cxx)
            lib = _declared(ctypes.CDLL(str(path)))
        except AttributeError as exc:   # a file at the library's name without its symbols
            _why_not = f"{path} is not this version's library ({exc}); remove it to build it again"
            return None
        except Exception as exc:
            _why_not = f"{exc.__class__.__name__}: {exc}"
            return None
        wanted = os.environ.get("SPURFAST_KMEANS_CPU_ISA", "")
        if wanted not in ("", *ISAS):
            logging.getLogger("spurfast.kernels").warning(
                "SPURFAST_KMEANS_CPU_ISA must be one of %s, got %r: the CPU decides", ", ".join(ISAS), wanted)
        elif wanted:
            lib.spurfast_cpu_isa(ISAS.index(wanted))
        lib.openmp = bool(lib.spurfast_cpu_openmp())
        _lib = lib
        return _lib


def _declared(lib):
    """``lib`` with its functions' argument and result types set (AttributeError where it
    lacks one)."""
    P, I = ctypes.c_void_p, ctypes.c_int64
    lib.spurfast_cpu_assign.argtypes = [P, I, P, I, P, P, I, P, I, P, ctypes.c_int, I, I, P, P, P, P, I]
    lib.spurfast_cpu_assign.restype = None
    lib.spurfast_cpu_update.argtypes = [P, I, P, I, I, I, I, P, P]
    lib.spurfast_cpu_update.restype = I
    lib.spurfast_cpu_plan.argtypes = [P, I, I, I, I, P, P, P]
    lib.spurfast_cpu_plan.restype = None
    lib.spurfast_cpu_assign_part.argtypes = [P, I, P, I, P, P, I, P, I, P, ctypes.c_int, I, I, I, P, P,
                                             P, P, P, P, P, P]
    lib.spurfast_cpu_assign_part.restype = None
    lib.spurfast_cpu_update_part.argtypes = [P, I, P, P, I, I, I, I, I, P, P, P, P, P, P, P]
    lib.spurfast_cpu_update_part.restype = I
    lib.spurfast_cpu_add_parts.argtypes = [I, P, P, P, P, P, I, I, P, P]
    lib.spurfast_cpu_add_parts.restype = None
    lib.spurfast_cpu_assign_parts.argtypes = [P, I, P, I, P, P, I, P, I, P, ctypes.c_int, I, I, I, P, P, P, P]
    lib.spurfast_cpu_assign_parts.restype = None
    lib.spurfast_cpu_update_parts.argtypes = [P, I, P, P, I, I, I, I, I, P, P]
    lib.spurfast_cpu_update_parts.restype = I
    lib.spurfast_cpu_plusplus.argtypes = [P, I, P, I, P, I, P, P, I, P, P]
    lib.spurfast_cpu_plusplus.restype = None
    D = ctypes.c_double
    lib.spurfast_cpu_knn.argtypes = [P, I, I, P, P, I, I, I, D, D, I, I, P, P]
    lib.spurfast_cpu_knn.restype = None
    lib.spurfast_cpu_knn_parts.argtypes = [P, I, I, P, P, I, I, I, D, D, I, I, I, P, P]
    lib.spurfast_cpu_knn_parts.restype = None
    lib.spurfast_cpu_knn_measure.argtypes = [P, I, I, P, I, I, I, P]
    lib.spurfast_cpu_knn_measure.restype = None
    lib.spurfast_cpu_knn_measure_parts.argtypes = [P, I, I, P, I, I, I, P]
    lib.spurfast_cpu_knn_measure_parts.restype = None
    lib.spurfast_cpu_openmp.restype = ctypes.c_int
    lib.spurfast_cpu_isa.argtypes = [ctypes.c_int]
    lib.spurfast_cpu_isa.restype = ctypes.c_int
    return lib


def isa(name: str | None = None) -> str:
    """The instruction set of the assignment's and the kNN search's micro-kernels, "avx512"
    (assign: 6 points x 64 centroids per tile; knn: 12 rows x 32 columns) or "avx2" (6 x 16);
    ``name`` switches it first (between calls), and "avx512" falls back to "avx2" on a CPU
    without it.  Both give the same bits.  The CPU decides at load unless
    SPURFAST_KMEANS_CPU_ISA names one."""
    if name is not None and name not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {name!r}")
    lib = _library()
    return ISAS[lib.spurfast_cpu_isa(-1 if name is None else ISAS.index(name))]


@contextlib.contextmanager
def using_isa(name: str):
    """The ``name`` tiles inside the block (see :func:`isa`); yields the one in effect
    ("avx2" where "avx512" was asked of a CPU without it), the previous choice restored after."""
    before = isa()
    try:
        yield isa(name)
    finally:
        isa(before)


def _library():
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the fused CPU k-means kernels are unavailable: {_why_not}")
    return lib


def is_available() -> tuple[bool, str]:
    """(True, "") when the fused CPU kernels are built and loadable here, else (False, why)."""
    return (True, "") if _load() is not None else (False, _why_not or "unknown")


def _threads() -> int:
    # the cores this process may run on (taskset, cpusets), not the machine's
    return max(1, min(torch.get_num_threads(), usable_cores()))


def _parts(n_rows: int) -> int:
    """How many fixed row ranges a k-means call cuts: a function of N only (not of the
    thread count), since each range keeps its own partial sums and their float sum
    depends on the cut.  Up to ``_threads()`` threads share them out."""
    return max(1, min(_MAX_PARTS, n_rows // _MIN_ROWS))


def _knn_parts(n_rows: int) -> int:
    """latent_knn's rows are independent: one range per thread."""
    return max(1, min(_threads(), n_rows // _MIN_ROWS))


_KNN_BLOCK_WORK = 1 << 31   # row x column x dimension products per thread and block (about 0.3 s)
_KNN_PANEL = 96            # rows the kernel screens together (16 x MR): blocks are cut in these


def _knn_blocks(n: int, d: int, parts: int) -> list[tuple[int, int]]:
    """latent_knn's row blocks [r0, r1): each gives every one of ``parts`` threads about
    ``_KNN_BLOCK_WORK`` (a row costs n x d), in whole panels."""
    panels = max(1, -(-_KNN_BLOCK_WORK // max(1, n * d * _KNN_PANEL)))
    step = parts * panels * _KNN_PANEL
    return [(r0, min(n, r0 + step)) for r0 in range(0, n, step)]


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _check_cpu(x: torch.Tensor) -> np.ndarray:
    check_points(x)
    if x.device.type != "cpu":
        raise ValueError(f"x is on {x.device}; the fused CPU kernels take CPU tensors (use backend='cupy' or 'torch')")
    return np.ascontiguousarray(x.detach().float().numpy())


def _offsets(offsets, N: int) -> np.ndarray:
    # the reference's own checks (a list or an array of offsets ran here and failed on the
    # reference, the fallback of machines without AVX2)
    return np.ascontiguousarray(check_offsets(offsets, N, "cpu").numpy())


def pack_centroids(c: np.ndarray, kpg: np.ndarray, cosine: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """(G, kmax, d) fp32 centroids -> (cT (G, kp/16, d, 16), cterm (G, kp), kp): padded to
    kp = kmax rounded up to 16 and cut into 16-centroid panels, each stored transposed
    (d x 16, contiguous: what one micro-tile reads); cterm holds |c|^2 (L2) or 0 (cosine)
    for the group's first k_g centroids and +inf for the rest, so they never win."""
    G, kmax, d = c.shape
    kp = -(-max(kmax, 1) // NR) * NR
    padded = np.zeros((G, kp, d), dtype=np.float32)
    padded[:, :kmax] = c
    cT = np.ascontiguousarray(padded.reshape(G, kp // NR, NR, d).transpose(0, 1, 3, 2))
    cterm = np.full((G, kp), np.inf, dtype=np.float32)
    used = np.arange(kmax)[None, :] < kpg[:, None]
    term = np.zeros((G, kmax), dtype=np.float32) if cosine else np.einsum("gkd,gkd->gk", c, c)
    cterm[:, :kmax] = np.where(used, term, np.inf)
    return cT, cterm, kp


def kmeans_assign(x, offsets, centroids, k_per_group, metric: str = "l2", x_sqnorm=None):
    """See :func:`spurfast.kernels.reference.kmeans_assign` (CPU tensors)."""
    G, kmax = ref.check_assign_args(x, offsets, centroids, metric)
    return _FixedPoints(x, offsets, k_per_group, G, kmax, metric, x_sqnorm, with_sums=False)(centroids)


def kmeans_assign_update(x, offsets, centroids, k_per_group, metric: str = "l2", x_sqnorm=None):
    """See :func:`spurfast.kernels.reference.kmeans_assign_update` (CPU tensors): one pass
    over x; each row joins its winner's sum while it is still in L1.  The sums and counts
    equal :func:`kmeans_update` on the returned assignment bit for bit (same row ranges,
    same adds, partials added in the same order)."""
    G, kmax = ref.check_assign_args(x, offsets, centroids, metric)
    return _FixedPoints(x, offsets, k_per_group, G, kmax, metric, x_sqnorm, with_sums=True)(centroids)


def prepare_assign_update(x, offsets, k_per_group, kmax: int, metric: str = "l2", x_sqnorm=None):
    """``step(centroids)`` = ``kmeans_assign_update(x, offsets, centroids, k_per_group, metric,
    x_sqnorm)`` for any (G, kmax, d) centroids, with everything but the centroids checked and
    converted once: the Lloyd loop's iterations spent more on that than in the kernel on small
    pools (7,000 points, 10 groups, k = 8: 0.24 ms a call, 0.09 ms of it in the kernel)."""
    G, kmax = ref.check_prepared_args(x, offsets, k_per_group, kmax, metric)
    return _FixedPoints(x, offsets, k_per_group, G, kmax, metric, x_sqnorm, with_sums=True)


kmeans_assign_update.prepare = prepare_assign_update   # found by `spurfast.cluster.lloyd`


class _FixedPoints:
    """The assignment (and with ``with_sums`` the fused update) over fixed points: the points,
    offsets, k per group and |x|^2 checked and converted at construction; calling it with
    (G, kmax, d) centroids runs the kernel."""

    def __init__(self, x, offsets, k_per_group, G: int, kmax: int, metric: str, x_sqnorm, with_sums: bool):
        self.lib = _library()
        self.X = _check_cpu(x)
        self.N, self.d = self.X.shape
        ref.check_x_sqnorm(x_sqnorm, self.N)   # the kernel reads one per row
        self.off = _offsets(offsets, self.N)
        self.kpg = np.ascontiguousarray(ref.check_k_per_group(k_per_group, G, kmax).numpy(), dtype=np.int64)
        self.G, self.kmax, self.with_sums = G, kmax, with_sums
        self.cosine = metric == "cosine"
        self.xn = None
        if x_sqnorm is not None and not self.cosine:
            # detached: |x|^2 of features that require grad failed in .numpy()
            self.xn = np.ascontiguousarray(torch.as_tensor(x_sqnorm).detach().cpu().numpy(), dtype=np.float32)
        if self.cosine:   # |x| for 1 + s / |x|, from the rows themselves
            self.xn = np.einsum("ij,ij->i", self.X, self.X).astype(np.float32)
        self.parts = _parts(self.N)

    def __call__(self, centroids):
        G, kmax, d, N = self.G, self.kmax, self.d, self.N
        if not isinstance(centroids, torch.Tensor) or tuple(centroids.shape) != (G, kmax, d):
            got = tuple(centroids.shape) if isinstance(centroids, torch.Tensor) else type(centroids).__name__
            raise ValueError(f"centroids have shape {got}; expected (G, kmax, d) = ({G}, {kmax}, {d})")
        check_real(centroids, "centroids")
        lib, with_sums = self.lib, self.with_sums
        assign = np.zeros(N, dtype=np.int64)
        dist = np.zeros(N, dtype=np.float32)
        S = G * kmax
        sums = np.zeros((S, d), dtype=np.float32) if with_sums else None
        counts = np.zeros(S, dtype=np.int64) if with_sums else None

        def result():
            out = (torch.from_numpy(assign), torch.from_numpy(dist))
            if with_sums:
                out += (torch.from_numpy(sums).view(G, kmax, d), torch.from_numpy(counts).view(G, kmax))
            return out

        if N == 0 or G == 0:
            return result()
        c = centroids.detach().float().cpu()
        if self.cosine:
            c = torch.nn.functional.normalize(c, dim=-1)
        C = np.ascontiguousarray(c.numpy())
        cT, cterm, kp = pack_centroids(C, self.kpg, self.cosine)
        X, off, xn, parts = self.X, self.off, self.xn, self.parts
        args = (_ptr(X), d, _ptr(off), G, _ptr(cT), _ptr(cterm), kp, _ptr(C), kmax,
                None if xn is None else _ptr(xn), int(self.cosine))
        if lib.openmp:
            lib.spurfast_cpu_assign_parts(*args, N, parts, _threads(), _ptr(assign), _ptr(dist),
                                          _ptr(sums) if with_sums else None, _ptr(counts) if with_sums else None)
            return result()
        # without sums the part entry point ignores the plan (null pointers)
        held, (w0, w1, pbase, psums, pcounts) = _python_plan(lib, off, N, parts, kmax, d) if with_sums else \
            ((), (None,) * 5)
        _python_parts(N, parts, lambda p, lo, hi: lib.spurfast_cpu_assign_part(
            *args, N, parts, p, _ptr(assign), _ptr(dist), w0, pbase, psums, pcounts,
            _ptr(sums) if with_sums else None, _ptr(counts) if with_sums else None))
        if with_sums:
            lib.spurfast_cpu_add_parts(2 * parts, w0, w1, pbase, psums, pcounts, S, d, _ptr(sums), _ptr(counts))
        return result()


def _python_plan(lib, off: np.ndarray, N: int, parts: int, kmax: int, d: int):
    """The partial sums the library's *_parts entry points plan for themselves
    (``spurfast_cpu_plan``: 2 windows per part), as pointers for its *_part calls."""
    w0, w1, pbase = np.empty(2 * parts, np.int64), np.empty(2 * parts, np.int64), np.empty(2 * parts + 1, np.int64)
    lib.spurfast_cpu_plan(_ptr(off), len(off) - 1, kmax, N, parts, _ptr(w0), _ptr(w1), _ptr(pbase))
    psums, pcounts = np.empty((pbase[-1], d), dtype=np.float32), np.empty(pbase[-1], dtype=np.int64)   # zeroed per part
    held = (w0, w1, pbase, psums, pcounts)   # the caller keeps these alive while the pointers are in use
    return held, tuple(_ptr(a) for a in held)


def _python_parts(n: int, parts: int, run) -> list:
    """Without OpenMP: run(p, lo, hi) over the ``parts`` fixed row ranges (the reference's
    cut) in up to ``_threads()`` Python threads (ctypes releases the GIL); results in order."""
    cuts = [n * p // parts for p in range(parts + 1)]
    out = [None] * parts
    threads = min(_threads(), parts)

    def worker(t: int) -> None:
        for p in range(t * parts // threads, (t + 1) * parts // threads):
            out[p] = run(p, cuts[p], cuts[p + 1])

    futures = [ref._cpu_threads(threads - 1).submit(worker, t) for t in range(1, threads)]
    worker(0)
    for f in futures:
        f.result()
    return out


def kmeans_update(x, offsets, assign, kmax: int, deterministic: bool = True):
    """See :func:`spurfast.kernels.reference.kmeans_update` (CPU tensors; always
    deterministic: fixed row ranges whose partial sums are added in order)."""
    lib = _library()
    kmax = check_count(kmax, "kmax")   # -1 failed in numpy naming nothing; a 0-d tensor in a TypeError
    X = _check_cpu(x)
    N, d = X.shape
    off = _offsets(offsets, N)
    G = len(off) - 1
    S = G * kmax
    # first: a list failed in .dim() naming nothing, and the int64 cast below truncated 1.5 to 1
    check_integers(assign, "assign")
    if assign.dim() != 1 or assign.shape[0] != N:
        raise ValueError(f"assign must be (N,) = ({N},), got shape {tuple(assign.shape)}")
    flat = ref.group_ids(torch.from_numpy(off)).numpy() * kmax + assign.cpu().numpy().astype(np.int64)
    if N and ((assign.min() < 0) or (assign.max() >= kmax)):
        raise ValueError(f"assign has values in [{int(assign.min())}, {int(assign.max())}]; "
                         f"expected cluster indices in [0, {kmax})")
    sums, counts = np.zeros((S, d), dtype=np.float32), np.zeros(S, dtype=np.int64)
    if N == 0:
        return torch.from_numpy(sums).view(G, kmax, d), torch.from_numpy(counts).view(G, kmax)
    parts = _parts(N)
    if lib.openmp:   # per-part partial sums, added in part order by the library
        bad = lib.spurfast_cpu_update_parts(_ptr(X), d, _ptr(flat), _ptr(off), G, kmax, N, parts, _threads(),
                                            _ptr(sums), _ptr(counts))
    else:
        held, plan = _python_plan(lib, off, N, parts, kmax, d)
        bads = _python_parts(N, parts, lambda p, lo, hi: lib.spurfast_cpu_update_part(
            _ptr(X), d, _ptr(flat), _ptr(off), G, kmax, N, parts, p, *plan, _ptr(sums), _ptr(counts)))
        bad = next((b for b in bads if b >= 0), -1)
        lib.spurfast_cpu_add_parts(2 * parts, *plan, S, d, _ptr(sums), _ptr(counts))
    if bad >= 0:
        raise ValueError(f"row {bad} has group-cluster index {flat[bad]} outside [0, {S})")
    return torch.from_numpy(sums).view(G, kmax, d), torch.from_numpy(counts).view(G, kmax)


def kmeans_plusplus(x, offsets, k_per_group, kmax: int, generator: torch.Generator) -> torch.Tensor:
    """See :func:`spurfast.kernels.reference.kmeans_plusplus` (CPU tensors): the same
    draws from ``generator`` in the same order, one thread per group, each group's D^2
    updated in one fused pass per seed (the reference makes four N x d passes per seed
    and synchronises every group at every step).  Seeds equal the reference's wherever
    D^2 sums are exact (e.g. integer data); elsewhere a draw can fall on the other side of
    a boundary the two round differently."""
    lib = _library()
    kmax = check_count(kmax, "kmax")   # -1 failed in numpy naming nothing
    check_generator(generator)
    X = _check_cpu(x)
    N, d = X.shape
    off = _offsets(offsets, N)
    G = len(off) - 1
    kpg = np.ascontiguousarray(check_seed_counts(k_per_group, G).numpy(), dtype=np.int64)
    cent = np.zeros((G, kmax, d), dtype=np.float32)
    if N == 0 or kmax == 0:   # no seed to draw: the generator stays where the reference leaves it
        return torch.from_numpy(cent)
    # the reference's draws, in its order: G for the first seeds, then G per step while
    # any nonempty group still needs seeds
    u_first = np.ascontiguousarray(torch.rand(G, generator=generator, device="cpu").numpy(), dtype=np.float32)
    need = kpg[np.diff(off) > 0]
    n_steps = max(0, min(kmax, int(need.max()) if len(need) else 0) - 1)
    u_steps = np.ascontiguousarray(
        np.stack([torch.rand(G, generator=generator, device="cpu").double().numpy() for _ in range(n_steps)])
        if n_steps else np.zeros((0, G)), dtype=np.float64)
    d2 = np.empty(N, dtype=np.float32)
    lib.spurfast_cpu_plusplus(_ptr(X), d, _ptr(off), G, _ptr(kpg), kmax, _ptr(u_first), _ptr(u_steps), n_steps,
                              _ptr(cent), _ptr(d2))
    return torch.from_numpy(cent)


def latent_knn(z, k: int) -> torch.Tensor:
    """See :func:`spurfast.kernels.reference.latent_knn` (CPU tensors): the distance
    matrix is never written; each row keeps its best 2k candidates by score in registers
    and a short list, and those are re-ranked by direct distances as the reference does.
    Equal distances go to the lower index (equal scores too, where the candidates are
    picked).  Traffic: z read once per 96-row panel (from cache).  A row whose screen may
    have missed a true neighbour (the reference's ``knn_screen_certain`` test, same bound)
    is measured again directly against every column by the reference's ``knn_remeasure``
    (once per distinct latent) with this kernel's direct distances."""
    lib = _library()
    k = check_count(k, "k")   # int(k) ran 1.5 as 1 neighbour, where the reference refuses it
    # centred as the reference (less cancellation); rows too large for fp32 scores refused
    zt = ref.centred_latents(torch.as_tensor(z).cpu())
    n, d = zt.shape
    k = min(k, n - 1)
    out = np.empty((n, max(k, 0)), dtype=np.int64)
    if k <= 0:
        return torch.from_numpy(out)
    Z = np.ascontiguousarray(zt.numpy())
    panels, cterm, npad = pack_centroids(Z[None], np.array([n]), False)
    m = min(2 * k, n - 1)
    R = ref.knn_screen_bound(cterm[0, :n], d)   # cterm: the fp32 |zj|^2 the scores add
    args = (_ptr(Z), d, n, _ptr(panels), _ptr(cterm), npad, k, m, R, ref._FP32_U)   # the kernel's product: IEEE fp32
    unsure = np.zeros(n, dtype=np.uint8)
    parts = _knn_parts(n)
    # blocks of rows, each about a second of work: one call over every row held off Ctrl-C
    # for the whole search (18 s at 90,000 x 16 on one core; minutes at ImageNet scale).
    # Rows are independent, so the blocks do not change any result.
    for r0, r1 in _knn_blocks(n, d, parts):
        if lib.openmp:
            lib.spurfast_cpu_knn_parts(*args, r0, r1, parts, _ptr(out), _ptr(unsure))
        else:
            _python_parts(r1 - r0, parts, lambda p, lo, hi: lib.spurfast_cpu_knn(*args, r0 + lo, r0 + hi, _ptr(out),
                                                                                 _ptr(unsure)))
    rows = np.nonzero(unsure)[0]
    if len(rows):
        out[rows] = ref.knn_remeasure(zt, torch.from_numpy(rows), k, measure=_knn_measure).numpy()
    return torch.from_numpy(out)


def _knn_measure(zt: torch.Tensor, points: torch.Tensor, kk: int) -> torch.Tensor:
    """The reference's ``knn_measure`` for ``knn_remeasure`` (same signature): each point's kk
    nearest rows of zt (fp32, CPU) by direct fp32 distances over every column, equal distances
    to the lower index; one point per thread at a time (each costs n x d)."""
    lib = _library()
    Z = np.ascontiguousarray(zt.numpy(), dtype=np.float32)   # latent_knn's own array: no copy
    n, d = Z.shape
    P = np.ascontiguousarray(points.numpy(), dtype=np.float32)
    res = np.empty((len(P), kk), dtype=np.int64)
    parts = max(1, min(_threads(), len(P)))
    if lib.openmp:
        lib.spurfast_cpu_knn_measure_parts(_ptr(Z), d, n, _ptr(P), len(P), kk, parts, _ptr(res))
    else:
        _python_parts(len(P), parts, lambda p, lo, hi: lib.spurfast_cpu_knn_measure(
            _ptr(Z), d, n, _ptr(P), kk, lo, hi, _ptr(res)))
    return torch.from_numpy(res)
