"""Shared benchmark harness: timing, peak memory, and one long-format results CSV.

Columns: date, op, provider, config (k=v;... string), metric, value, unit, device,
versions.  Timing rows carry metric = median_s / p20_s / p80_s; derived rows carry
throughput (items_per_s), achieved GB/s and TFLOP/s from bytes and FLOPs the caller
counts explicitly, and peak memory in bytes.

Peak memory covers the timed repetitions only: on a GPU max_memory_allocated after
reset_peak_memory_stats; on a CPU the process's peak RSS (VmHWM) after resetting it to the
current RSS (Linux: "5" into /proc/self/clear_refs), so it includes what the process held
before.  Where that reset is unavailable the row falls back to ru_maxrss, the high-water
mark of the whole process (never lowered: later rows inherit earlier peaks); such rows
are written as metric ``peak_memory_process_max`` instead of ``peak_memory``.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

DEFAULT_CSV = Path(__file__).resolve().parent / "results.csv"
FIELDS = ["date", "op", "provider", "config", "metric", "value", "unit", "device", "versions"]


def device_name(device: str | torch.device = "cpu") -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    # the processor model, not platform.processor() ("x86_64"): rows of two x86 machines read
    # as one device, and `bench plot` kept the later as the figure of both
    from spurfast.cores import cpu_model
    return f"cpu:{cpu_model()} x{os.cpu_count()} threads={torch.get_num_threads()}"


def bench_dir() -> Path:
    """Where benchmarks keep generated pools and runs: $SPURFAST_BENCH_DIR (default
    /tmp/spurfast-bench).  Absolute: the e2e runs start in the repository root, so a relative
    folder given from elsewhere named another place there ("image folder bench/pool-600 does
    not exist"); an empty variable is the default, as SPURFAST_BENCH_CSV's is."""
    return Path(os.environ.get("SPURFAST_BENCH_DIR") or Path(tempfile.gettempdir()) / "spurfast-bench").absolute()


def spurfast_revision() -> str:
    """The commit the rows were measured at (``+dirty`` with uncommitted changes), or the
    package version where there is no git checkout: rows only accumulate, and rows of
    superseded code (a byte count since corrected) could not be told from current ones."""
    import subprocess
    from spurfast import __version__

    try:
        r = subprocess.run(["git", "describe", "--always", "--dirty=+dirty"], cwd=Path(__file__).resolve().parent,
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return __version__
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else __version__


def versions() -> str:
    parts = [f"spurfast={spurfast_revision()}", f"torch={torch.__version__}", f"python={platform.python_version()}"]
    for mod in ("triton", "cupy", "nvidia.dali", "faiss", "sklearn"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            parts.append(f"{mod.split('.')[-1]}={getattr(m, '__version__', '?')}")
        except Exception:
            pass
    try:   # the GPU peer of the k-means rows (no __version__ of its own to rely on)
        from importlib.metadata import version
        parts.append(f"flash-kmeans={version('flash-kmeans')}")
    except Exception:
        pass
    return " ".join(parts)


def env_ints(name: str) -> list[int] | None:
    """Environment variable ``name`` as comma-separated integers >= 1 (empty parts, as a
    trailing comma leaves, skipped); None when it is unset or empty.  int()'s own error
    ("invalid literal for int() with base 10: '1e5'") named no variable."""
    raw = os.environ.get(name, "")
    parts = [s.strip() for s in raw.split(",") if s.strip()]
    if not parts:
        return None
    try:
        values = [int(s) for s in parts]
    except ValueError:
        values = []
    if len(values) != len(parts) or min(values) < 1:
        raise ValueError(f"{name}={raw!r}: expected comma-separated integers >= 1 (e.g. 10000,100000)")
    return values


def check_header(path: Path) -> None:
    """A non-empty ``path`` must be a results CSV of ``FIELDS``: rows were appended under
    another file's header (an evaluation's results.csv, say) without a word, and `bench plot`
    failed on such a file with KeyError: 'metric'."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, newline="", errors="replace") as fh:
        header = next(csv.reader(fh), [])
    if header != FIELDS:
        raise ValueError(f"results CSV {path} has the columns {header[:10]}, not a benchmark's "
                         f"({','.join(FIELDS)}); choose another --csv (or SPURFAST_BENCH_CSV)")


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _vmhwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak(device) -> str:
    """Start a peak-memory window; returns the source ``read_peak`` will use: "cuda",
    "vmhwm" (CPU, Linux) or "ru_maxrss" (CPU fallback: the process's lifetime peak)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return "cuda"
    try:  # Linux: resets VmHWM to the current RSS (ru_maxrss cannot be reset)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return "ru_maxrss"
    return "vmhwm" if _vmhwm_bytes() is not None else "ru_maxrss"


def read_peak(device, source: str) -> int:
    """Peak bytes since ``reset_peak`` returned ``source``."""
    if source == "cuda":
        return torch.cuda.max_memory_allocated(torch.device(device))
    peak = _vmhwm_bytes() if source == "vmhwm" else None
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def spread(times) -> tuple[float, float]:
    """(p20, p80) of the samples, interpolated between them: the default "exclusive"
    method extrapolates beyond the smallest/largest of a few samples."""
    if len(times) < 2:
        return times[0], times[0]
    q = statistics.quantiles(times, n=5, method="inclusive")
    return q[0], q[3]


def measure(fn: Callable[[], object], *, device="cpu", warmup: int = 2, reps: int = 10,
            min_time: float = 0.0) -> dict:
    """Run ``fn`` warmup + reps times; return median/p20/p80 seconds and the peak memory
    of the timed repetitions (see the module docstring; ``peak_source`` says how)."""
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(dev)
    source = reset_peak(dev)
    times = []
    t_start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - t_start) < min_time:
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    peak = read_peak(dev, source)
    p20, p80 = spread(times)
    return {"median_s": statistics.median(times), "p20_s": p20, "p80_s": p80, "peak_bytes": peak,
            "peak_source": source, "reps": len(times)}


class ResultWriter:
    def __init__(self, path: str | Path | None = None):
        # an empty SPURFAST_BENCH_CSV (set to nothing to unset it) is the default, as `bench plot` reads it:
        # Path("") was ".", and the first row failed with IsADirectoryError after its measurement
        given = path or os.environ.get("SPURFAST_BENCH_CSV") or DEFAULT_CSV
        self.path = Path(given)
        if self.path.is_dir():   # the first row raised IsADirectoryError, after its measurement
            raise IsADirectoryError(f"results CSV {self.path} is a folder; expected a CSV file, e.g. "
                                    f"{self.path / 'results.csv'}")
        # "out/" (no such folder yet): Path drops the "/", and the rows went to a file "out"
        if os.path.basename(given) in ("", ".", ".."):
            raise IsADirectoryError(f"results CSV {given} names a folder; expected a CSV file, e.g. "
                                    f"{self.path / 'results.csv'}")
        # a file above it: the first row failed in mkdir ("[Errno 17] File exists"), after its measurement
        blocker = next((q for q in self.path.parents if q.exists() and not q.is_dir()), None)
        if blocker is not None:
            raise NotADirectoryError(f"results CSV {self.path}: {blocker} is a file, not a folder")
        check_header(self.path)   # before any measurement
        # a row cut short (a run killed mid-write) has no line end: the next row was appended to it,
        # and both were lost to `bench plot`
        self._cut_line = False
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                self._cut_line = fh.read(1) not in (b"\n", b"\r")
        self.date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.versions = versions()
        self.rows: list[dict] = []

    def add(self, op: str, provider: str, config: dict, metric: str, value: float, unit: str, device: str):
        cfg = ";".join(f"{k}={v}" for k, v in config.items())
        row = dict(date=self.date, op=op, provider=provider, config=cfg, metric=metric,
                   value=f"{value:.6g}", unit=unit, device=device, versions=self.versions)
        self.rows.append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0   # an emptied file needs its header too
        with open(self.path, "a", newline="") as fh:
            w = csv.DictWriter(fh, FIELDS)
            if new:
                w.writeheader()
            elif self._cut_line:
                fh.write("\r\n")   # csv's line end
            self._cut_line = False
            w.writerow(row)

    def add_timing(self, op: str, provider: str, config: dict, stats: dict, device: str, *,
                   items: int | None = None, bytes_moved: float | None = None, flops: float | None = None):
        """Timing rows plus derived throughput (items/s, GB/s, TFLOP/s) and peak memory."""
        for m in ("median_s", "p20_s", "p80_s"):
            self.add(op, provider, config, m, stats[m], "s", device)
        t = stats["median_s"]
        if items:
            self.add(op, provider, config, "items_per_s", items / t, "1/s", device)
        if bytes_moved:
            self.add(op, provider, config, "gbytes_per_s", bytes_moved / t / 1e9, "GB/s", device)
        if flops:
            self.add(op, provider, config, "tflops", flops / t / 1e12, "TFLOP/s", device)
        # a lifetime high-water mark is not this op's peak: keep it apart from peak_memory
        metric = "peak_memory_process_max" if stats.get("peak_source") == "ru_maxrss" else "peak_memory"
        self.add(op, provider, config, metric, stats["peak_bytes"], "bytes", device)
        print(f"{op:14s} {provider:22s} {';'.join(f'{k}={v}' for k, v in config.items()):50s} "
              f"median {t * 1e3:9.3f} ms" + (f"  {items / t:12.1f} items/s" if items else ""), flush=True)
