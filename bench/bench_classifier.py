"""Classifier inference (and one training step) of spurfast's own architectures
(`classifier_outputs`, as the embedding pass and confirmation call them): the product's
layout against the caller's.

On a CPU the models convert their input to channels-last, in training too
(`spurfast.models.classifier._channels_last_on_cpu`), where oneDNN's convolutions run
faster; one channel keeps its layout, so the grey case is the control (about 1x).  A
TorchScript model (here a traced SmallCNN, as `python -m bench e2e` classifies with) gets
channels-last images where its first batch shows the same logits
(`spurfast.models.outputs._cpu_layout`).  Providers: ``torch-channels-last`` (the product)
and ``torch-nchw`` (both switches bypassed), timed in turn, one repetition each, so a shared
machine's drift falls on both.  On a GPU the switch does nothing: one ``torch`` provider.
FLOPs are counted from the layers (2 x multiply-adds of every convolution and linear layer),
so ``tflops`` can be put against the processor's peak; the layers read each input map once
and write each output map once, which ``gbytes_per_s`` counts (fp32 activations, weights
excluded).
"""
from __future__ import annotations

import statistics
import time

import torch

from .harness import device_name, read_peak, reset_peak, spread

CASES_FULL = [("small_cnn", 1, 28, 256, {}), ("small_cnn", 3, 64, 256, {}), ("small_cnn", 3, 64, 256, {"width": 8}),
              ("small_cnn-traced", 3, 64, 256, {"width": 8}), ("resnet18", 3, 64, 64, {})]
CASES_QUICK = [("small_cnn", 1, 28, 64, {}), ("small_cnn", 3, 32, 64, {"width": 8})]


def layer_costs(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(FLOPs, activation bytes read + written) of one forward over ``x``, from its
    convolution and linear layers (an eager model's: a traced one's layers are not seen)."""
    flops, nbytes, hooks = 0.0, 0.0, []

    def conv(m, args, out):
        nonlocal flops, nbytes
        flops += 2.0 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        nbytes += 4.0 * (args[0].numel() + out.numel())

    def linear(m, args, out):
        nonlocal flops, nbytes
        flops += 2.0 * out.numel() * m.in_features
        nbytes += 4.0 * (args[0].numel() + out.numel())

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return flops, nbytes


def _stats(times: list[float], peak: int, source: str) -> dict:
    p20, p80 = spread(times)
    return {"median_s": statistics.median(times), "p20_s": p20, "p80_s": p80, "peak_bytes": peak,
            "peak_source": source, "reps": len(times)}


def _in_turn(providers: dict, call, reps: int, device: str) -> tuple[dict, dict, str]:
    """Each provider's switches set (`arch._channels_last_on_cpu`, `outputs._cpu_layout`),
    ``call()`` timed, one provider after the other for ``reps`` rounds after an untimed one;
    the product's switches given back.  Returns ({provider: times}, {provider: peak bytes of
    its timed calls}, peak source): one window over every call gave each provider the same
    peak, the warm-up round's (a GPU's one-time workspaces) included."""
    import spurfast.models.classifier as arch
    import spurfast.models.outputs as outputs

    product = arch._channels_last_on_cpu, outputs._cpu_layout
    times, peaks = {p: [] for p in providers}, {p: 0 for p in providers}
    source = reset_peak(device)
    try:
        for r in range(reps + 1):   # the first round warms every provider up, untimed
            for p, (inside, outside) in providers.items():
                arch._channels_last_on_cpu, outputs._cpu_layout = inside, outside
                if r:   # a window per timed call, opened and read outside the timed span
                    reset_peak(device)
                t0 = time.perf_counter()
                call()
                if device != "cpu":
                    torch.cuda.synchronize()
                if r:
                    times[p].append(time.perf_counter() - t0)
                    peaks[p] = max(peaks[p], read_peak(device, source))
    finally:
        arch._channels_last_on_cpu, outputs._cpu_layout = product
    return times, peaks, source


def _rows(writer, op: str, cfg: dict, dev: str, timed: tuple, items: int, **counts) -> None:
    """Timing rows of each provider, and the NCHW / channels-last ratio where both ran."""
    times, peaks, source = timed
    for p, ts in times.items():
        writer.add_timing(op, p, cfg, _stats(ts, peaks[p], source), dev, items=items, **counts)
    if len(times) == 2:
        writer.add("ratio", f"{'' if op == 'classify' else op + '_'}channels_last_vs_nchw", cfg, "ratio",
                   statistics.median(times["torch-nchw"]) / statistics.median(times["torch-channels-last"]), "x", dev)


def run(writer, quick: bool = False, device=None):
    import spurfast.models.classifier as arch
    import spurfast.models.outputs as outputs

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = device_name(device)
    product = (arch._channels_last_on_cpu, outputs._cpu_layout)
    nchw = (lambda x: x, lambda model, x: (x, None))
    providers = {"torch-channels-last": product, "torch-nchw": nchw} if device == "cpu" else {"torch": product}
    for name, c, size, batch, options in CASES_QUICK if quick else CASES_FULL:
        torch.manual_seed(0)
        model = arch.build_classifier(name.removesuffix("-traced"), c, 10, size, **options).to(device).eval()
        x = torch.rand(batch, c, size, size, device=device)
        # counted on the eager model: a traced one's layers are script modules, which the hooks
        # do not see (0 FLOPs, and its tflops and gbytes_per_s rows went unwritten)
        flops, nbytes = layer_costs(model, x)
        if name.endswith("-traced"):
            with torch.no_grad():
                model = torch.jit.trace(model, x[:2])
        cfg = {"arch": name, "image": f"{c}x{size}x{size}", "batch": batch, "threads": torch.get_num_threads(),
               **options}
        with torch.no_grad():
            timed = _in_turn(providers, lambda: outputs.classifier_outputs(model, x), 7 if quick else 21, device)
        _rows(writer, "classify", cfg, dev, timed, batch, bytes_moved=nbytes, flops=flops)
    if device == "cpu":
        _training_steps(writer, quick, dev, providers)


def _training_steps(writer, quick: bool, dev: str, providers: dict) -> None:
    """One training step (forward, cross-entropy, backward) of an RGB SmallCNN, both layouts in turn."""
    import torch.nn.functional as F

    import spurfast.models.classifier as arch

    size, batch = (32, 16) if quick else (64, 64)
    torch.manual_seed(0)
    model = arch.build_classifier("small_cnn", 3, 10, size).train()
    x, y = torch.rand(batch, 3, size, size), torch.randint(0, 10, (batch,))
    cfg = {"arch": "small_cnn", "image": f"3x{size}x{size}", "batch": batch, "threads": torch.get_num_threads()}

    def step():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
    _rows(writer, "train_step", cfg, dev, _in_turn(providers, step, 7 if quick else 15, "cpu"), batch)
