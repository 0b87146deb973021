"""Loader throughput: decode + resize + crop + normalise of an image folder, images/s.

Providers at equal thread count (``threads``, default the machine's CPU count, at most 8):
``dali-cpu`` (spurfast.data.loader_dali, CPU decoding, ``num_threads=threads``) and
``torch-dataloader`` (spurfast.data.loader_torch, ``num_workers=threads`` processes);
``dali-mixed`` (GPU decoding) where a GPU and DALI are both present.  Both loaders
produce the same float32 (B, 3, size, size) batches in [0, 1] (the one preprocessing
definition), and every pass goes over the whole folder, pipeline/worker start-up included.

The folder: ImageNet-like JPEGs (around 500x375, some portrait, varied smooth shapes,
gradients and texture, quality 90, 4:2:0) generated once and cached under
``$SPURFAST_BENCH_DIR/loader-images/`` (default /tmp/spurfast-bench); 2,000 images, 300 with ``--quick``.
"""
from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

from .harness import bench_dir, device_name, env_ints, measure

ROOT = Path(__file__).resolve().parent.parent


def _image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A natural-ish picture: a gradient sky, a few blurred ellipses and rectangles,
    fine noise texture (so JPEG files have realistic entropy, ~60-120 KB)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (y / h)[..., None]
    img = c0 * (1 - t) + c1 * t
    for _ in range(rng.integers(3, 8)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(h * 0.05, h * 0.4), rng.uniform(w * 0.05, w * 0.4)
        m = (((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2) < 1.0
        img[m] = img[m] * 0.3 + rng.uniform(0, 255, 3) * 0.7
    freq = rng.uniform(0.02, 0.2)
    img += 20 * np.sin(x * freq + rng.uniform(0, 6))[..., None] * np.cos(y * freq * 0.7)[..., None]
    img += rng.normal(0, rng.uniform(4, 16), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def image_folder(n: int, seed: int = 0) -> list[str]:
    """Paths of ``n`` generated JPEGs (cached; regenerated if missing)."""
    from PIL import Image

    folder = bench_dir() / "loader-images" / f"n{n}_s{seed}"
    done = folder / ".complete"
    paths = [str(folder / f"{i:05d}.jpg") for i in range(n)]
    if done.exists():
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for i, p in enumerate(paths):
        h, w = (375, 500) if rng.random() < 0.75 else (500, 375)
        h, w = int(h * rng.uniform(0.85, 1.15)), int(w * rng.uniform(0.85, 1.15))
        Image.fromarray(_image(rng, h, w)).save(p, quality=90)
        if (i + 1) % 500 == 0:
            print(f"[bench loader] generated {i + 1}/{n} images", flush=True)
    done.write_text("ok\n")
    print(f"[bench loader] {n} JPEGs in {folder} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return paths


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (DataLoader workers)."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _timed(writer, provider, fn, cfg, dev, n, reps, device="cpu"):
    """measure() plus CPU-seconds per image over all passes (robust to other load on a
    shared machine, where wall-clock images/s is not)."""
    c0 = _cpu_seconds()
    st = measure(fn, device=device, warmup=1, reps=reps)
    cpu_per_img = (_cpu_seconds() - c0) / (n * (st["reps"] + 1))
    writer.add_timing("loader", provider, cfg, st, dev, items=n)
    writer.add("loader", provider, cfg, "cpu_s_per_item", cpu_per_img, "s", dev)
    return n / st["median_s"], cpu_per_img


def _drain(it) -> int:
    n = 0
    for idx, images, ok in it:
        n += len(idx)
    return n


def check_env() -> int:
    """SPURFAST_BENCH_THREADS, or the default thread count; `python -m bench` calls it before
    any suite runs (in `all`, a bad value failed after the suites sorted before this one)."""
    threads = env_ints("SPURFAST_BENCH_THREADS") or [min(8, os.cpu_count() or 1)]
    if len(threads) > 1:   # "4,8" measured at 4 threads alone, without a word
        raise ValueError(f"SPURFAST_BENCH_THREADS={os.environ['SPURFAST_BENCH_THREADS']!r}: expected one integer "
                         f">= 1 (threads and workers of every loader), not a list")
    return threads[0]


def run(writer, quick: bool = False, device=None):
    from spurfast.data import loader_dali, loader_torch

    n = 300 if quick else 2000
    threads = check_env()
    reps = 3 if quick else 5
    paths = image_folder(n)
    sizes = [64] if quick else [64, 224]
    batch = 64
    mbytes = sum(os.path.getsize(p) for p in paths) / 1e6
    print(f"[bench loader] {n} JPEGs ({mbytes:.1f} MB), {threads} threads/workers, batch {batch}", flush=True)
    dali_ok, why = loader_dali.is_available()
    if not dali_ok:
        print(f"[bench loader] DALI unavailable ({why}); torch only", flush=True)
    cpu_dev = device_name("cpu")
    for size in sizes:
        cfg = dict(n=n, size=size, batch=batch, threads=threads, dtype="float32")
        results = {}

        def torch_pass():
            assert _drain(loader_torch.iter_folder_batches(paths, size=size, batch_size=batch,
                                                           num_threads=threads)) == n

        results["torch"] = _timed(writer, "torch-dataloader", torch_pass, cfg, cpu_dev, n, reps)
        if dali_ok:
            def dali_pass():
                assert _drain(loader_dali.iter_folder_batches(paths, size=size, batch_size=batch,
                                                              num_threads=threads, device="cpu")) == n

            results["dali"] = _timed(writer, "dali-cpu", dali_pass, cfg, cpu_dev, n, reps)
            ratio = results["dali"][0] / results["torch"][0]
            cpu_ratio = results["torch"][1] / results["dali"][1]
            writer.add("loader", "dali-cpu/torch-dataloader", cfg, "speedup", ratio, "x", cpu_dev)
            writer.add("loader", "dali-cpu/torch-dataloader", cfg, "cpu_efficiency_ratio", cpu_ratio, "x", cpu_dev)
            print(f"[bench loader] size {size}: DALI CPU {results['dali'][0]:.0f} img/s vs torch DataLoader "
                  f"{results['torch'][0]:.0f} img/s at {threads} threads: {ratio:.2f}x (target >= 1.5x); "
                  f"CPU ms per image {results['dali'][1] * 1e3:.2f} vs {results['torch'][1] * 1e3:.2f} "
                  f"({cpu_ratio:.2f}x)", flush=True)
        want_gpu = device in (None, "cuda", "gpu") and torch.cuda.is_available()
        if dali_ok and want_gpu:
            gpu_dev = device_name("cuda")

            def mixed_pass():
                assert _drain(loader_dali.iter_folder_batches(paths, size=size, batch_size=batch,
                                                              num_threads=threads, device="gpu")) == n

            ips, _ = _timed(writer, "dali-mixed", mixed_pass, cfg, gpu_dev, n, reps, device="cuda")
            ratio = ips / results["torch"][0]
            writer.add("loader", "dali-mixed/torch-dataloader", cfg, "speedup", ratio, "x", gpu_dev)
            print(f"[bench loader] size {size}: DALI mixed {ips:.0f} img/s: "
                  f"{ratio:.2f}x torch DataLoader (target >= 2x)", flush=True)
        elif device in ("cuda", "gpu"):
            print("[bench loader] GPU requested but no GPU with DALI here; GPU figures not measured", flush=True)
