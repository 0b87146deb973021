"""The memory layout CPU convolutions read fastest: channels-last (oneDNN's)."""
from __future__ import annotations

import torch


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) ``x`` in channels-last memory order, oneDNN's faster layout for CPU
    convolutions of several input channels.  One channel keeps its strides (both layouts
    count as contiguous): forcing its channel stride to 1 sends oneDNN down the channels-last
    path there too, which timed 0.74-1.57x the NCHW one for the grey 28x28 classifier over
    ten runs on 2 cores (1.04x for the VAE encoder): no reliable gain, and other bits."""
    return x.contiguous(memory_format=torch.channels_last)


# images per forward on a CPU.  A layer's output for 256 images (the default batch) outgrows
# the caches (SmallCNN-8, RGB 64x64: 32 MiB after the first conv), so every layer reads its input
# back from memory; in blocks of 64 it stays in cache.  Measured on 2 cores (images/s, 64 vs
# 256 a forward): SmallCNN-8 RGB 64x64 17.9k vs 12.0k (traced: 14.4k vs 6.2k), SmallCNN-32 grey
# 28x28 13.2k vs 7.6k, VAE encoder RGB 64x64 5.7k vs 4.3k (three convs; the benchmark's four: 3.6k
# vs 2.8k), grey 28x28 41k vs 40k, ResNet-18 RGB 64x64 40 vs 38; 32-128 were within 6% of the
# best of 8-512 for each but ResNet-18 (8 best, 47).
CPU_BLOCK = 64


def in_cpu_blocks(forward, x: torch.Tensor, block: int | None = None):
    """``forward(x)`` computed over blocks of ``block`` images (default `CPU_BLOCK`) where ``x``
    is on a CPU, the outputs (a tensor, or a tuple of them) concatenated; one call elsewhere
    (a GPU wants the whole batch).  An inference forward treats images apart: each image's
    outputs are those of one call."""
    block = block or CPU_BLOCK
    if x.device.type != "cpu" or len(x) <= block:
        return forward(x)
    parts = [forward(x[s:s + block]) for s in range(0, len(x), block)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)
