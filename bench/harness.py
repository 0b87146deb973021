"""Shared benchmark harness: timing, peak memory, and one long-format results CSV.

Columns: date, op, provider, config (k=v;... string), metric, value, unit, device,
versions.  Timing rows carry metric = median_s / p20_s / p80_s; derived rows carry
throughput (items_per_s), achieved GB/s and TFLOP/s from bytes and FLOPs the caller
counts explicitly, and peak memory in bytes.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import resource
import statistics
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
    return f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()} threads={torch.get_num_threads()}"


def versions() -> str:
    parts = [f"torch={torch.__version__}", f"python={platform.python_version()}"]
    for mod in ("triton", "cupy", "nvidia.dali", "faiss", "sklearn"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            parts.append(f"{mod.split('.')[-1]}={getattr(m, '__version__', '?')}")
        except Exception:
            pass
    return " ".join(parts)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], *, device="cpu", warmup: int = 2, reps: int = 10,
            min_time: float = 0.0) -> dict:
    """Run ``fn`` warmup + reps times; return median/p20/p80 seconds and peak memory.

    Peak memory: CUDA max_memory_allocated on GPUs; on the CPU the process's max RSS
    (ru_maxrss, a high-water mark over the whole process, so compare within one run)."""
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    t_start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - t_start) < min_time:
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"median_s": statistics.median(times), "p20_s": q[0], "p80_s": q[3], "peak_bytes": peak, "reps": len(times)}


class ResultWriter:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path or os.environ.get("SPURFAST_BENCH_CSV", DEFAULT_CSV))
        self.date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.versions = versions()
        self.rows: list[dict] = []

    def add(self, op: str, provider: str, config: dict, metric: str, value: float, unit: str, device: str):
        cfg = ";".join(f"{k}={v}" for k, v in config.items())
        row = dict(date=self.date, op=op, provider=provider, config=cfg, metric=metric,
                   value=f"{value:.6g}", unit=unit, device=device, versions=self.versions)
        self.rows.append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with open(self.path, "a", newline="") as fh:
            w = csv.DictWriter(fh, FIELDS)
            if new:
                w.writeheader()
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
        self.add(op, provider, config, "peak_memory", stats["peak_bytes"], "bytes", device)
        print(f"{op:14s} {provider:22s} {';'.join(f'{k}={v}' for k, v in config.items()):50s} "
              f"median {t * 1e3:9.3f} ms" + (f"  {items / t:12.1f} items/s" if items else ""), flush=True)
