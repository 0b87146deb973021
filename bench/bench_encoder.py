"""VAE-encoder forward: images/s, achieved GB/s and TFLOP/s, peak memory; roofline on GPUs.

Providers
- ``triton``: spurfast.kernels.encoder_triton (GPU only: the interpreter is not a speed path).
- ``torch-eager``: spurfast.kernels.reference.encoder_forward as is (it computes in fp32
  whatever the input dtype: it is the ground truth).
- ``torch-eager-autocast`` (GPU, bf16 rows): the same reference under
  ``torch.autocast(dtype=bfloat16)``, i.e. cuDNN bf16 convs: eager at the kernel's precision.
- ``torch-compile``: ``torch.compile`` of the reference (mode ``max-autotune`` on a GPU, the
  default mode on the CPU); skipped with a note if compilation fails on the CPU, and for
  every batch but 256 with ``--quick`` on a GPU (each max-autotune graph takes minutes);
  ``SPURFAST_BENCH_COMPILE=0`` skips it entirely.

Shapes: the shipped encoders (1x28x28 with channels (32, 64); RGB 64x64 with (32, 64, 128,
256)), latent 16; fp32 and bf16 float images in [0, 1]; batch 64..4096 on a GPU, 64..1024 on
the CPU (64 and 256 with ``--quick``).  On the CPU only the reference paths are measured.

Bytes and FLOPs are counted explicitly (``encoder_flops``, ``encoder_min_bytes``,
``encoder_kernel_bytes``): achieved GB/s uses the *minimum* traffic (input read once, weights
once, (B, 2L) outputs written once), so it is comparable across providers.  On a GPU each row
also gets ``roofline_bound_s`` = max(FLOPs / peak FLOP/s, kernel bytes / peak bandwidth) with the
bytes the L+1-launch Triton design moves (intermediates written and read once), and
``roofline_frac`` = bound / measured median.
"""
from __future__ import annotations

import os
import sys

import torch

from .harness import device_name, measure

def _peak(hbm_bytes_per_s: float, tensor_flops: float, fp32_flops: float) -> dict:
    return {"hbm_bytes_per_s": hbm_bytes_per_s,
            "flops_per_s": {torch.bfloat16: tensor_flops, torch.float16: tensor_flops,   # tensor cores, dense
                            torch.float32: fp32_flops}}   # CUDA cores (the kernel uses IEEE fp32, no TF32)


# Hardware peaks used for the roofline (dense), by a part of the device's name, the more
# specific first.  One place for all of them.  The H200's alone judged every GPU: an H100's
# bandwidth-bound bf16 rows read 30% below their true share of its roofline
PEAKS = {
    "H200": _peak(4.8e12, 990e12, 67e12),
    "H100 PCIe": _peak(2.0e12, 756e12, 51e12),
    "H100 NVL": _peak(3.9e12, 835e12, 60e12),
    "H100": _peak(3.35e12, 989e12, 67e12),   # SXM ("NVIDIA H100 80GB HBM3")
}
H200_PEAK = PEAKS["H200"]


def device_peak(name: str) -> dict | None:
    """The roofline peaks of the GPU named ``name`` (torch.cuda.get_device_name), None for one
    not in `PEAKS` (no roofline rows then, rather than another GPU's)."""
    return next((p for part, p in PEAKS.items() if part in name), None)

ARCHS = {
    # name: (in_channels, image_size, conv channels)
    "mnist28": (1, 28, (32, 64)),
    "rgb64": (3, 64, (32, 64, 128, 256)),
}
LATENT = 16
KERNEL, STRIDE, PADDING = 4, 2, 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _layers(in_ch: int, size: int, channels) -> list[tuple[int, int, int]]:
    """(C_in, C_out, output H*W) per conv layer."""
    out, c, s = [], in_ch, size
    for w in channels:
        s = (s + 2 * PADDING - KERNEL) // STRIDE + 1
        out.append((c, w, s * s))
        c = w
    return out


def _flat_dim(in_ch: int, size: int, channels) -> int:
    c_in, c_out, hw = _layers(in_ch, size, channels)[-1]
    return c_out * hw


def encoder_flops(arch: str, batch: int, latent: int = LATENT) -> float:
    """Multiply-adds x 2 of every conv (as a GEMM: M = H_o*W_o, N = C_out, K = C_in*16)
    and of the two heads; bias/activation/normalisation element-wise work is not counted."""
    in_ch, size, channels = ARCHS[arch]
    per_image = sum(2.0 * hw * c_out * c_in * KERNEL * KERNEL for c_in, c_out, hw in _layers(in_ch, size, channels))
    per_image += 2.0 * _flat_dim(in_ch, size, channels) * 2 * latent
    return per_image * batch


def _n_weights(arch: str, latent: int = LATENT) -> tuple[int, int]:
    in_ch, size, channels = ARCHS[arch]
    conv = sum(c_out * c_in * KERNEL * KERNEL + c_out for c_in, c_out, _ in _layers(in_ch, size, channels))
    head = 2 * latent * _flat_dim(in_ch, size, channels) + 2 * latent
    return conv, head


def encoder_min_bytes(arch: str, batch: int, in_dtype: torch.dtype, latent: int = LATENT) -> float:
    """Minimum DRAM traffic of one forward: the images read once, the weights read once (in
    the compute dtype; the head in fp32 as stored), (B, 2L) fp32 outputs written once."""
    in_ch, size, _ = ARCHS[arch]
    item = torch.tensor([], dtype=in_dtype).element_size()
    conv_w, head_w = _n_weights(arch, latent)
    return batch * in_ch * size * size * item + conv_w * item + head_w * 4 + batch * 2 * latent * 4


def encoder_kernel_bytes(arch: str, batch: int, in_dtype: torch.dtype, latent: int = LATENT) -> float:
    """Traffic of the L+1-launch Triton design: the minimum plus every intermediate
    activation written once and read once in the compute dtype (no L2 reuse assumed)."""
    in_ch, size, channels = ARCHS[arch]
    item = torch.tensor([], dtype=in_dtype).element_size()
    inter = sum(c_out * hw for _, c_out, hw in _layers(in_ch, size, channels))
    return encoder_min_bytes(arch, batch, in_dtype, latent) + 2.0 * batch * inter * item


def roofline_bound_s(arch: str, batch: int, dtype: torch.dtype, latent: int = LATENT, peak: dict = H200_PEAK) -> float:
    return max(encoder_flops(arch, batch, latent) / peak["flops_per_s"][dtype],
               encoder_kernel_bytes(arch, batch, dtype, latent) / peak["hbm_bytes_per_s"])


def _model(arch: str, device):
    from spurfast.models.vae import VAE, VAEConfig

    in_ch, size, _ = ARCHS[arch]
    torch.manual_seed(0)
    cfg = VAEConfig.for_images(in_ch, size, LATENT)
    assert cfg.channels == ARCHS[arch][2], (cfg.channels, ARCHS[arch][2])
    return VAE(cfg).to(device).eval()


def _providers(device: torch.device, dtype: torch.dtype):
    from spurfast.kernels import reference as ref

    provs = []
    if device.type == "cuda":
        try:
            from spurfast.kernels import encoder_triton as et

            ok, why = et.is_available()
            if ok:
                provs.append(("triton", et.encoder_forward))
            else:
                print(f"[bench encoder] triton skipped: {why}", file=sys.stderr)
        except Exception as exc:  # a broken triton install must not stop the reference rows
            print(f"[bench encoder] triton skipped: {exc!r}", file=sys.stderr)
    provs.append(("torch-eager", ref.encoder_forward))
    if device.type == "cuda" and dtype == torch.bfloat16:
        def autocast_ref(x, **p):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return ref.encoder_forward(x, **p)
        provs.append(("torch-eager-autocast", autocast_ref))
    mode = "max-autotune" if device.type == "cuda" else "default"
    if os.environ.get("SPURFAST_BENCH_COMPILE", "1") == "0":
        print("[bench encoder] torch.compile rows skipped (SPURFAST_BENCH_COMPILE=0)", file=sys.stderr)
        return provs
    try:
        compiled = torch.compile(ref.encoder_forward, mode=None if mode == "default" else mode, dynamic=False)
        provs.append((f"torch-compile-{mode}", compiled))
    except Exception as exc:
        print(f"[bench encoder] torch.compile unavailable: {exc!r}", file=sys.stderr)
    return provs


def run(writer, quick: bool = False, device=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    if gpu:
        batches = [64, 256] if quick else [64, 256, 1024, 4096]
        warmup, reps = 3, (10 if quick else 30)
    else:
        batches = [64, 256] if quick else [64, 256, 1024]
        warmup, reps = 2, (5 if quick else 10)
    # max-autotune compiles take minutes per graph: --quick on a GPU compiles for batch 256
    # only (the batch the targets are stated at).
    compile_batches = [256] if (gpu and quick) else batches
    dev_name = device_name(device)
    peak = device_peak(torch.cuda.get_device_name(device)) if gpu else None
    if gpu and peak is None:
        print(f"[encoder] no roofline peaks for {torch.cuda.get_device_name(device)}: no roofline rows",
              file=sys.stderr)
    # dynamic=False compiles once per (arch, dtype, batch): 16 graphs of one function.  Past
    # dynamo's recompile limit it would silently run eager under the "compile" label.
    import torch._dynamo as dynamo
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, knob):
            setattr(dynamo.config, knob, max(64, getattr(dynamo.config, knob)))
    broken: set[str] = set()  # providers that failed once (e.g. torch.compile without a toolchain)
    for arch in ARCHS:
        model = _model(arch, device)
        with torch.no_grad():
            params = model.encoder_params()
            params["conv_weights"] = [w.detach() for w in params["conv_weights"]]
            params["conv_biases"] = [b.detach() for b in params["conv_biases"]]
            params["head_weight"] = params["head_weight"].detach()
            params["head_bias"] = params["head_bias"].detach()
        in_ch, size, channels = ARCHS[arch]
        for dname, dtype in DTYPES.items():
            provs = _providers(device, dtype)
            for batch in batches:
                x = torch.rand(batch, in_ch, size, size, device=device).to(dtype)
                cfg = {"arch": arch, "channels": "x".join(map(str, channels)), "latent": LATENT,
                       "batch": batch, "dtype": dname}
                flops = encoder_flops(arch, batch)
                min_bytes = encoder_min_bytes(arch, batch, dtype)
                for name, fn in provs:
                    if name in broken:
                        continue
                    if name.startswith("torch-compile") and batch not in compile_batches:
                        continue
                    call = (lambda fn=fn, x=x: fn(x, **params))
                    try:
                        with torch.no_grad():
                            stats = measure(call, device=device, warmup=warmup, reps=reps,
                                            min_time=0.0 if gpu else 1.0)
                    except Exception as exc:
                        if name.startswith("torch-compile") and not gpu:
                            print(f"[bench encoder] {name} failed on the CPU, skipped: "
                                  f"{exc.__class__.__name__}: {str(exc)[:200]}", file=sys.stderr)
                            broken.add(name)
                            continue
                        raise
                    writer.add_timing("encoder", name, cfg, stats, dev_name,
                                      items=batch, bytes_moved=min_bytes, flops=flops)
                    if not gpu:
                        # CPU figures are only as good as the machine is idle: record its load.
                        writer.add("encoder", name, cfg, "load_avg_1min", os.getloadavg()[0], "1", dev_name)
                    if peak is not None:
                        bound = roofline_bound_s(arch, batch, dtype, peak=peak)
                        writer.add("encoder", name, cfg, "roofline_bound_s", bound, "s", dev_name)
                        writer.add("encoder", name, cfg, "roofline_frac", bound / stats["median_s"], "1", dev_name)
                del x
                if gpu:
                    torch.cuda.empty_cache()
