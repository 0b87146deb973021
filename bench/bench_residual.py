"""Residual scan (`spurfast.residual`): time of the scan proper, residuals given.

What grows with the pool: the null.  Each of ``n_null`` resamplings sums the unrelated
images' residual energy per predicted class twice (value and square: `ClassSums.tmaps`),
reading 2 x n x P float64 values (16 bytes each) and writing (C + 1) x P per sum; the
t-maps and peak windows are O(C x P).  So the scan is about
n_null x 2 x n x P x 8 bytes of memory traffic, the figure `gbytes_per_s` puts it against.
Synthetic pool: Gaussian residuals, content latents and predictions by content, 10% of images
carrying a one-pixel residual mostly called one class (whether the scan finds it is the tests'
business; with 100 classes and 100 nulls no class can pass Benjamini-Hochberg).  Provider
``torch-cpu`` (the scan runs in torch on the CPU); no peer implements this test.
"""
from __future__ import annotations

import numpy as np
import torch

from .harness import device_name, measure


def synthetic(n: int, shape: tuple, n_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 8)).astype(np.float32)
    labels = rng.integers(0, n_classes, n)
    pred = np.where(rng.random(n) < 0.8, labels, rng.integers(0, n_classes, n))
    res = torch.as_tensor(rng.normal(scale=0.1, size=(n, int(np.prod(shape)))), dtype=torch.float32)
    carries = rng.random(n) < 0.1
    res[torch.as_tensor(carries), 0] += 1.0
    pred = np.where(carries & (rng.random(n) < 0.8), n_classes - 1, pred)
    return res, z, pred, labels


def run(writer, quick: bool = False, device=None):
    from spurfast.residual import ResidualConfig, residual_scan

    cases = ([(5_000, (1, 28, 28), 10)] if quick else
             [(10_000, (1, 28, 28), 10), (50_000, (1, 28, 28), 10), (10_000, (3, 32, 32), 10),
              (10_000, (1, 28, 28), 100)])
    n_null = 50 if quick else 100
    if device not in (None, "cpu"):   # said, not silently timed on the CPU under a GPU run's flag
        print(f"bench residual: the scan runs on the CPU only; timed there (--device {device} does not apply)")
    dev = device_name("cpu")
    for n, shape, classes in cases:
        res, z, pred, labels = synthetic(n, shape, classes)
        cfg = ResidualConfig(n_null=n_null, max_values=max(ResidualConfig.max_values, res.numel()))
        st = measure(lambda: residual_scan(res, z, pred, labels, np.zeros(n, bool), shape, cfg), device="cpu",
                     warmup=0, reps=2 if quick else 1)
        config = {"n": n, "shape": "x".join(map(str, shape)), "classes": classes, "n_null": n_null}
        p = res.shape[1]
        writer.add_timing("residual_scan", "torch-cpu", config, st, dev, items=n,
                          bytes_moved=n_null * 2 * n * p * 8)
        writer.add("residual_scan", "torch-cpu", config, "s_per_null", st["median_s"] / n_null, "s", dev)
