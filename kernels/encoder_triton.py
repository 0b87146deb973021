"""Fused Triton VAE-encoder forward (inference only); same signature as
``spurfast.kernels.reference.encoder_forward``, which is its ground truth.

What is fused
-------------
* Every conv is an *implicit GEMM*: M = B*Ho*Wo output pixels, N = C_out, K = C_in*KH*KW.
  The A tile (BLOCK_M x BLOCK_K) is gathered straight from the previous activation with
  padding handled by the load mask; no im2col buffer ever exists in global memory.
  Layers after the first walk K one filter tap at a time over contiguous channels of the
  channels-last activation, so A loads vectorise and Triton software-pipelines the loop
  (checked with triton 3.8 by compiling for sm_90 without a GPU, `compile_for`: 3-4
  shared-memory stages, vs. 1 for a flat (kh, kw, c_in) K loop whose gathers do not
  vectorise; every kernel also compiles with triton 3.6, the H200's); the first
  layer (1 or 3 channels) packs all taps x channels densely into one K loop instead.
  Bias + activation (relu / leaky_relu 0.2 / silu) run in the epilogue on the fp32
  accumulator, and the result is stored once in the compute dtype.
* The first conv reads the raw images (uint8, or fp32/fp16/bf16 in [0, 1], any strides;
  float64 and bool images are cast to fp32 first, as the reference reads them)
  and does /255, (x - mean[c]) / std[c] and the zero padding of the *normalised* image in
  registers while loading its A tile: no normalised copy of the input is ever written.
* The mu and log-variance heads are one GEMM over the flattened features: each program
  loads one feature tile and multiplies it with the matching rows of W_mu and W_logvar
  (head_weight = [W_mu; W_logvar], read in place with its own strides and cast in
  registers), so bias, the mu/logvar split and z = mu + exp(logvar / 2) * eps all happen
  in the epilogue.  Only (B, L) fp32 outputs are written.

Launches per forward: one per conv layer plus one for the heads, i.e. ``len(conv_weights)
+ 1``: 3 for the 1x28x28 encoder, 5 for the RGB 64x64 one, plus one small copy per conv
weight to prepare it (see below).  Nothing else runs: no normalisation pass, no im2col, no
flatten/permute copy of activations, no separate bias/activation/reparameterisation
kernels, no output split.
Why not one launch: layer l+1 gathers a 4x4 window with stride 2 from layer l's output,
i.e. from pixels computed by *other* programs.  Triton has no indexable on-chip scratch
(block tensors live in registers and cannot be gathered from), so a layer boundary is
where the data has to round-trip through global memory; with the layer-major order used
here those round-trips are mostly L2 hits on an H200 (50 MB L2) for moderate batches.
Keeping a whole image on chip would need 64 KiB (bf16) for the first 32x32x32 activation
of one RGB 64x64 image, per program, plus halo recomputation across tiles.

Weight preparation: each conv weight (C_out, C_in, KH, KW) is permuted once into a
K-major (KH*KW*C_in, C_out) matrix in the compute dtype so that B-tile loads are
contiguous along C_out and the K order (kh, kw, c_in) matches the channels-last
activations.  This is done afresh in every call (one copy kernel per conv weight): a
cache across calls cannot tell reliably when a weight changed (fused optimisers and writes
through ``w.data`` bump no version counter, and inference-mode tensors have none), and the
copy is small next to a batch (the 0.69 M conv parameters of the RGB 64x64 encoder, vs.
the activations of every image).  Biases, mean/std and the head weight need no
preparation (read in place, cast in registers; mean/std are cached, keyed by their values,
as tiny device tensors).

Memory traffic (per image, minimal = read the input once, write (B, 2L) fp32):
RGB 64x64, channels (32, 64, 128, 256), bf16 compute: input 12 KiB (uint8) or
24/48 KiB (bf16/fp32); intermediates written once and read once: 32x32x32 + 16x16x64 +
8x8x128 (channels-last) + 4x4x256 (NCHW-flat, read by the head) elements = 60 Ki
elements, i.e. 120 KiB written + 120 KiB read in bf16.  The eager reference keeps them
in fp32 and runs the activation as its own pass (conv writes, activation reads and
writes, next conv reads: 16 bytes per element vs. 4 here), plus three passes over an
fp32 copy of the input for the normalisation.  Weights (0.69 M conv + 2L x 4096 head
parameters) come from L2 after the first program touches them.

Precision: fp32 inputs compute in fp32 with ``input_precision="ieee"`` (no TF32, so
results match the reference to ~1e-5); fp16/bf16 inputs compute in that dtype with
fp32 accumulation; uint8 images compute in the dtype of the conv weights.  Outputs are
always fp32.  Intermediate activations are stored in the compute dtype.

Block sizes are autotuned on a GPU (keyed on a power-of-two bucket of M and on the layer
shape; ``SPURFAST_TRITON_AUTOTUNE=0`` uses one fixed configuration instead, which saves the
per-config compiles in short runs such as tests); under ``TRITON_INTERPRET=1`` a fixed rule picks wide blocks instead (the
interpreter's cost is per program and per op, not per element), so tests stay fast.
"""
from __future__ import annotations

import contextlib
import functools
import operator
import os
from typing import Sequence

import torch

from .triton_env import INTERPRET as _INTERPRET
from .triton_env import TYPE_NAMES, availability, compile_for_target, tl, triton
from . import reference as _ref

_ACT_CODE = {"relu": 0, "leaky_relu": 1, "silu": 2}
_SUPPORTED = (torch.uint8, torch.float32, torch.float16, torch.bfloat16)
_COMPUTE = (torch.float32, torch.float16, torch.bfloat16)


def is_available() -> tuple[bool, str]:
    """(True, "") when the kernels can run here: a CUDA device, or the interpreter."""
    return availability(__name__, _INTERPRET)


# --------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _conv_kernel(
        x_ptr, w_ptr, bias_ptr, mean_ptr, std_ptr, out_ptr,
        M, sxb, sxc, sxh, sxw,
        sob, soc, soh, sow,
        in_div, M_BUCKET,
        # Layer geometry is compile-time: only L distinct layers exist per encoder, and
        # constant divisors turn the per-element // and % of the gather into mul/shift.
        H: tl.constexpr, W: tl.constexpr, CIN: tl.constexpr, HO: tl.constexpr, WO: tl.constexpr,
        N: tl.constexpr, K: tl.constexpr,
        STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        FIRST: tl.constexpr, ACT: tl.constexpr, SLOPE: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """out[b, n, oh, ow] = act(bias[n] + sum_k A[(b,oh,ow), k] * Wk[k, n]) with
        k = (kh*KW + kw)*CIN + ci and A gathered from x (implicit GEMM)."""
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        # n-tiles of one m-tile run next to each other: they share the gathered A rows in L2.
        pid_m = pid // num_n
        pid_n = pid % num_n

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        hw = HO * WO
        b = offs_m // hw
        r = offs_m % hw
        oh = r // WO
        ow = r % WO
        b64 = b.to(tl.int64)  # batch offsets can pass 2^31 elements for large batches
        ih0 = oh * STRIDE - PAD
        iw0 = ow * STRIDE - PAD
        x_row = x_ptr + b64 * sxb  # (BLOCK_M,) pointers to each output pixel's image

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if FIRST:
            # Flat K loop: C_in is 1 or 3 here, so K = 16 or 48 taps*channels are packed
            # densely into BLOCK_K columns (a per-tap loop would waste most of each MMA).
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                tap = offs_k // CIN
                ci = offs_k % CIN
                kh = tap // KW
                kw = tap % KW
                ih = ih0[:, None] + kh[None, :]
                iw = iw0[:, None] + kw[None, :]
                valid = (m_mask[:, None] & k_mask[None, :]
                         & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
                a = tl.load(x_row[:, None] + ci[None, :] * sxc + ih * sxh + iw * sxw,
                            mask=valid, other=0)
                # Input conversion fused into the loads: uint8 /255 (in_div) or float as is,
                # then per-channel (x - mean) / std; padding is zero *after* normalisation.
                mean = tl.load(mean_ptr + ci, mask=k_mask, other=0.0)
                std = tl.load(std_ptr + ci, mask=k_mask, other=1.0)
                af = a.to(tl.float32) / in_div
                af = (af - mean[None, :]) / std[None, :]
                a = tl.where(valid, af, 0.0).to(w_ptr.dtype.element_ty)
                wt = tl.load(w_ptr + offs_k[:, None] * N + offs_n[None, :],
                             mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                if IEEE:
                    acc = tl.dot(a, wt, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, wt, acc)
        else:
            # Tap-major K loop over (tap, channel chunk): within one step the spatial offset is
            # a per-row scalar and the channels are contiguous in the channels-last activation
            # (sxc == 1), so A loads vectorise and the loop can be software-pipelined.
            # Each input pixel is read by up to (KH/STRIDE)^2 = 4 output windows; those
            # repeats hit L1/L2, so DRAM sees an activation about once per n-tile column.
            CB = (CIN + BLOCK_K - 1) // BLOCK_K  # channel chunks per tap (constexpr)
            for kk in range(0, KH * KW * CB):
                tap = kk // CB
                c0 = (kk % CB) * BLOCK_K
                kh = tap // KW
                kw = tap % KW
                ih = ih0 + kh
                iw = iw0 + kw
                row_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                ci = c0 + tl.arange(0, BLOCK_K)
                c_mask = ci < CIN
                a = tl.load((x_row + ih * sxh + iw * sxw)[:, None] + ci[None, :] * sxc,
                            mask=row_ok[:, None] & c_mask[None, :], other=0.0)
                a = a.to(w_ptr.dtype.element_ty)
                wt = tl.load(w_ptr + (tap * CIN + ci)[:, None] * N + offs_n[None, :],
                             mask=c_mask[:, None] & n_mask[None, :], other=0.0)
                if IEEE:
                    acc = tl.dot(a, wt, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, wt, acc)

        # Epilogue on the fp32 accumulator: bias + activation, one store in compute dtype.
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
        if ACT == 0:
            # not tl.maximum: its default returns the other operand for NaN, so a diverged
            # VAE encoded every image to finite latents where torch's relu keeps NaN
            acc = tl.where(acc < 0.0, 0.0, acc)
        elif ACT == 1:
            acc = tl.where(acc >= 0.0, acc, acc * SLOPE)
        else:
            acc = acc / (1.0 + tl.exp(-acc))
        o_ptrs = (out_ptr + b64[:, None] * sob + offs_n[None, :] * soc
                  + oh[:, None] * soh + ow[:, None] * sow)
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _heads_kernel(
        f_ptr, hw_ptr, hb_ptr, eps_ptr, mu_ptr, lv_ptr, z_ptr,
        B, F, L,
        shw0, shw1, seps0, seps1, M_BUCKET,
        HAS_EPS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """[mu | logvar] = feats @ head_weight^T + head_bias, both halves from one A tile;
        z = mu + exp(logvar / 2) * eps in the epilogue."""
        pid = tl.program_id(0)
        num_n = tl.cdiv(L, BLOCK_N)
        pid_m = pid // num_n
        pid_n = pid % num_n
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < B
        n_mask = offs_n < L
        f_row = f_ptr + offs_m.to(tl.int64)[:, None] * F
        w_mu = hw_ptr + offs_n[None, :] * shw0          # rows 0..L-1 of head_weight
        w_lv = hw_ptr + (offs_n[None, :] + L) * shw0    # rows L..2L-1
        acc_mu = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_lv = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, F, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < F
            a = tl.load(f_row + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            wmask = k_mask[:, None] & n_mask[None, :]
            # head_weight is read in place (any float dtype, any strides), cast in registers.
            wm = tl.load(w_mu + offs_k[:, None] * shw1, mask=wmask, other=0.0).to(f_ptr.dtype.element_ty)
            wl = tl.load(w_lv + offs_k[:, None] * shw1, mask=wmask, other=0.0).to(f_ptr.dtype.element_ty)
            if IEEE:
                acc_mu = tl.dot(a, wm, acc_mu, input_precision="ieee")
                acc_lv = tl.dot(a, wl, acc_lv, input_precision="ieee")
            else:
                acc_mu = tl.dot(a, wm, acc_mu)
                acc_lv = tl.dot(a, wl, acc_lv)
        b_mu = tl.load(hb_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        b_lv = tl.load(hb_ptr + L + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        mu = acc_mu + b_mu[None, :]
        lv = acc_lv + b_lv[None, :]
        omask = m_mask[:, None] & n_mask[None, :]
        o_off = offs_m.to(tl.int64)[:, None] * L + offs_n[None, :]
        tl.store(mu_ptr + o_off, mu, mask=omask)
        tl.store(lv_ptr + o_off, lv, mask=omask)
        if HAS_EPS:
            e = tl.load(eps_ptr + offs_m.to(tl.int64)[:, None] * seps0 + offs_n[None, :] * seps1,
                        mask=omask, other=0.0).to(tl.float32)
            tl.store(z_ptr + o_off, mu + tl.exp(0.5 * lv) * e, mask=omask)

    # ---------------------------------------------------------------- autotuning (GPU)
    def _prune_conv(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        n_cap = max(16, triton.next_power_of_2(int(args["N"])))
        # later layers step through K one tap (C_in channels) at a time
        k_cap = max(16, triton.next_power_of_2(int(args["K"] if args["FIRST"] else args["CIN"])))
        m_cap = max(16, triton.next_power_of_2(int(args["M"])))
        kept = [c for c in configs
                if c.kwargs["BLOCK_N"] <= n_cap and c.kwargs["BLOCK_K"] <= k_cap
                and c.kwargs["BLOCK_M"] <= max(32, m_cap)]
        return kept or configs[:1]

    def _prune_heads(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        n_cap = max(16, triton.next_power_of_2(int(args["L"])))
        m_cap = max(16, triton.next_power_of_2(int(args["B"])))
        kept = [c for c in configs
                if c.kwargs["BLOCK_N"] <= n_cap and c.kwargs["BLOCK_M"] <= max(32, m_cap)]
        return kept or configs[:1]

    # Kept short on purpose: every config is compiled once per layer shape and dtype, and the
    # early prune drops tiles wider than the layer (BLOCK_N > C_out, BLOCK_K > one tap's C_in).
    _CONV_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)
        for bm, bn, bk, nw, ns in [
            (64, 32, 32, 4, 4), (128, 32, 64, 4, 3), (64, 64, 32, 4, 4), (128, 64, 64, 8, 3),
            (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (256, 128, 32, 8, 3), (32, 64, 64, 4, 4),
            (128, 256, 32, 8, 3),
        ]
    ]
    _HEAD_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)
        for bm, bn, bk, nw, ns in [
            (16, 16, 128, 4, 4), (32, 32, 64, 4, 4), (64, 32, 64, 4, 4), (64, 64, 64, 4, 3),
            (128, 64, 64, 8, 3), (16, 64, 128, 4, 3),
        ]
    ]
    if not _INTERPRET:
        _conv_launch = triton.autotune(_CONV_CONFIGS, key=["M_BUCKET", "N", "K", "CIN", "FIRST"],
                                       prune_configs_by={"early_config_prune": _prune_conv})(_conv_kernel)
        _heads_launch = triton.autotune(_HEAD_CONFIGS, key=["M_BUCKET", "F", "L", "HAS_EPS"],
                                        prune_configs_by={"early_config_prune": _prune_heads})(_heads_kernel)
    else:
        _conv_launch = _conv_kernel
        _heads_launch = _heads_kernel


def _interp_blocks(m: int, n: int, k: int) -> dict:
    """The fixed configuration used under the interpreter.  It runs each program as numpy
    ops with a large per-op Python overhead, so few, wide programs are fastest there."""
    return {"BLOCK_M": min(4096, max(16, triton.next_power_of_2(m))),
            "BLOCK_N": min(512, max(16, triton.next_power_of_2(n))),
            "BLOCK_K": min(512, max(16, triton.next_power_of_2(k)))}


def _fixed_gpu_blocks(n: int, k_step: int, compute: torch.dtype) -> dict:
    """One GPU configuration without autotuning (SPURFAST_TRITON_AUTOTUNE=0): each config
    costs a compile per layer shape and dtype, which dominates short runs such as the GPU
    tests; speed measurements keep autotuning on.  Sized to spill no register on sm_80 and
    sm_90 (`compile_for`; tests/test_encoder_triton.py): fp32 multiplies on the FMA units
    with both tiles and the accumulator in registers, so its tiles are smaller (the earlier
    128 x 128 x 64 tile spilled up to 10 KiB a thread on fp32 layers)."""
    if compute == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_N": min(32, max(16, triton.next_power_of_2(n))), "BLOCK_K": 16,
                "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": min(64, max(16, triton.next_power_of_2(n))),
            "BLOCK_K": min(32, max(16, triton.next_power_of_2(k_step))), "num_warps": 4, "num_stages": 3}


def _fixed_head_blocks(b: int, latent: int) -> dict:
    """The heads' configuration without autotuning (see `_fixed_gpu_blocks`)."""
    return {"BLOCK_M": 32 if b <= 1024 else 64, "BLOCK_N": min(64, max(16, triton.next_power_of_2(latent))),
            "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}


def _bucket(m: int) -> int:
    return triton.next_power_of_2(max(1, m))


# --------------------------------------------------------------------------- host side
_NORM_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _prepared_conv_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(C_out, C_in, KH, KW) -> contiguous (KH*KW*C_in, C_out) in ``dtype``: one copy kernel.
    Not cached across calls: nothing reliable says when w changed (see the module docstring)."""
    cout, cin, kh, kw = w.shape
    wk = torch.empty((kh * kw * cin, cout), dtype=dtype, device=w.device)
    with torch.no_grad():  # permute + cast in one copy (.to(...).contiguous() may copy twice)
        wk.view(kh, kw, cin, cout).copy_(w.detach().permute(2, 3, 1, 0))
    return wk


def _norm_tensors(mean: Sequence[float], std: Sequence[float], c: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    m, s = _ref.flat_floats(mean), _ref.flat_floats(std)
    if len(m) not in (1, c) or len(s) not in (1, c):
        raise ValueError(f"mean/std have {len(m)}/{len(s)} entries for an input with {c} channels; "
                         f"expected 1 or {c} each")
    if any(v == 0.0 for v in s):
        raise ValueError(f"std must be non-zero, got {tuple(s)}")
    m = m * c if len(m) == 1 else m
    s = s * c if len(s) == 1 else s
    key = (tuple(m), tuple(s), str(device))
    hit = _NORM_CACHE.get(key)
    if hit is None:
        if len(_NORM_CACHE) > 64:
            _NORM_CACHE.clear()
        hit = (torch.tensor(m, dtype=torch.float32, device=device),
               torch.tensor(s, dtype=torch.float32, device=device))
        _NORM_CACHE[key] = hit
    return hit


def _check_device(t: torch.Tensor, device: torch.device, name: str) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the input is on {device}; move all tensors to one device")


def _offsets_in_32_bits(t: torch.Tensor, first_dim: int) -> torch.Tensor:
    """``t``, or a contiguous copy of it where its element offsets along the dims from
    ``first_dim`` on reach 2^31: the kernels compute those offsets in 32 bits (only the batch
    row's is 64-bit), so a view with planes 1 GiB or more apart (a planar (C, B, H, W) pool
    viewed as (B, C, H, W)) wrapped and read bytes 4 GiB away."""
    span = sum(max(n - 1, 0) * abs(st) for n, st in zip(t.shape[first_dim:], t.stride()[first_dim:]))
    return t.contiguous() if span >= 2 ** 31 else t


def _encoder_forward(
    x: torch.Tensor,
    conv_weights: Sequence[torch.Tensor],
    conv_biases: Sequence[torch.Tensor],
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    *,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    stride: int = 2,
    padding: int = 1,
    activation_name: str = "relu",
    eps: torch.Tensor | None = None,
):
    """Fused VAE encoder forward; see the module docstring.  Returns fp32 (mu, logvar),
    plus z = mu + exp(logvar / 2) * eps when eps (B, L) is given."""
    ok, why = is_available()
    if not ok:
        raise RuntimeError(f"triton encoder unavailable: {why}")
    # ---- validation: every bad input names the value and what was expected
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"encoder input must be a (B, C, H, W) tensor, got shape {shape}")
    if x.dtype in (torch.float64, torch.bool):   # as the reference reads them: fp32 (numpy's x / 255.0 is float64)
        x = x.float()
    if x.dtype not in _SUPPORTED:
        raise TypeError(f"encoder input dtype {x.dtype} is unsupported; expected one of "
                        f"{[str(d) for d in _SUPPORTED]}")
    if activation_name not in _ACT_CODE:
        raise ValueError(f"unknown activation {activation_name!r}; expected one of {_ref.ACTIVATIONS}")
    if len(conv_weights) == 0 or len(conv_weights) != len(conv_biases):
        raise ValueError(f"need one bias per conv weight and at least one conv; got "
                         f"{len(conv_weights)} weights and {len(conv_biases)} biases")
    try:   # int() ran stride 2.5 as 2, silently, where the reference's conv2d refuses it
        stride, padding = operator.index(stride), operator.index(padding)
    except TypeError:
        raise TypeError(f"stride and padding must be integers, got stride={stride!r}, padding={padding!r}") from None
    if stride < 1 or padding < 0:
        raise ValueError(f"stride must be >= 1 and padding >= 0, got stride={stride}, padding={padding}")
    device = x.device
    if device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"the triton encoder needs CUDA tensors (input is on {device}); "
                         "use backend='torch' on the CPU")
    weight0 = conv_weights[0]
    compute = x.dtype if x.dtype != torch.uint8 else weight0.dtype
    if compute == torch.float64:   # fp64 weights on uint8 images: fp32, as the reference computes
        compute = torch.float32
    if compute not in _COMPUTE:
        raise TypeError(f"compute dtype {compute} (from the conv weights, for uint8 input) is unsupported; "
                        f"expected one of {[str(d) for d in _COMPUTE]}")
    ieee = compute == torch.float32

    B, C, H, W = x.shape
    shapes = []  # (weight, bias, cin, h, w, cout, ho, wo)
    cin, h, w_ = C, H, W
    for i, (wt, bs) in enumerate(zip(conv_weights, conv_biases)):
        _check_device(wt, device, f"conv_weights[{i}]")
        _check_device(bs, device, f"conv_biases[{i}]")
        if wt.dim() != 4:
            raise ValueError(f"conv_weights[{i}] must be (C_out, C_in, KH, KW), got shape {tuple(wt.shape)}")
        if not wt.dtype.is_floating_point or not bs.dtype.is_floating_point:
            raise TypeError(f"conv layer {i}: weight/bias dtypes {wt.dtype}/{bs.dtype} must be floating point")
        cout, wcin, kh, kw = wt.shape
        if wcin != cin:
            what = "input channels" if i == 0 else f"output channels of conv layer {i - 1}"
            raise ValueError(f"channel mismatch at conv layer {i}: weight expects C_in={wcin}, "
                             f"but the {what} number {cin}")
        if tuple(bs.shape) != (cout,):
            raise ValueError(f"conv_biases[{i}] must have shape ({cout},), got {tuple(bs.shape)}")
        if h + 2 * padding < kh or w_ + 2 * padding < kw:
            raise ValueError(f"spatial size {h}x{w_} at conv layer {i} is smaller than the {kh}x{kw} kernel")
        # output sizes round down as F.conv2d's (a divisibility check here refused geometry
        # the reference runs, with a hint right only for kernel - 2 x padding = stride)
        ho = (h + 2 * padding - kh) // stride + 1
        wo = (w_ + 2 * padding - kw) // stride + 1
        if B * ho * wo >= 2 ** 31:   # the conv kernel's row index (b, oh, ow) is 32-bit
            raise ValueError(f"a batch of {B} images gives {B * ho * wo} output positions at conv layer {i} "
                             f"({ho}x{wo} each), beyond the fused encoder's 32-bit row index (< 2^31); "
                             f"encode at most {(2 ** 31 - 1) // (ho * wo)} images per call")
        shapes.append((wt, bs, cin, h, w_, cout, ho, wo, kh, kw))
        cin, h, w_ = cout, ho, wo
    feat = cin * h * w_
    _check_device(head_weight, device, "head_weight")
    _check_device(head_bias, device, "head_bias")
    if head_weight.dim() != 2 or head_weight.shape[0] % 2:
        raise ValueError(f"head_weight must be (2L, F) = [W_mu; W_logvar], got shape {tuple(head_weight.shape)}")
    if head_weight.shape[1] != feat:
        raise ValueError(f"flattened features {feat} (= {cin}x{h}x{w_}) != head input width "
                         f"{head_weight.shape[1]} of head_weight {tuple(head_weight.shape)}")
    L = head_weight.shape[0] // 2
    if tuple(head_bias.shape) != (2 * L,):
        raise ValueError(f"head_bias must have shape ({2 * L},), got {tuple(head_bias.shape)}")
    if eps is not None:
        _check_device(eps, device, "eps")
        if tuple(eps.shape) != (B, L):
            raise ValueError(f"eps must have shape (B, L) = ({B}, {L}), got {tuple(eps.shape)}")
        if not eps.dtype.is_floating_point:
            raise TypeError(f"eps must be floating point, got {eps.dtype}")
    mean_t, std_t = _norm_tensors(mean, std, C, device)

    mu = torch.empty(B, L, dtype=torch.float32, device=device)
    logvar = torch.empty(B, L, dtype=torch.float32, device=device)
    z = torch.empty(B, L, dtype=torch.float32, device=device) if eps is not None else None
    if B == 0:
        return (mu, logvar) if eps is None else (mu, logvar, z)

    act = _ACT_CODE[activation_name]
    autotune = os.environ.get("SPURFAST_TRITON_AUTOTUNE", "1") != "0"
    x = _offsets_in_32_bits(x, first_dim=1)
    src = x
    sx = x.stride()  # NCHW strides of the raw input, any layout
    n_layers = len(shapes)
    for i, (wt, bs, cin, h, w_, cout, ho, wo, kh, kw) in enumerate(shapes):
        wk = _prepared_conv_weight(wt, compute)
        bs = bs.detach().contiguous()  # read in place, cast to fp32 in the epilogue
        last = i == n_layers - 1
        if last:
            # NCHW-flat, exactly the reference's flatten order: the head reads it as (B, F).
            out = torch.empty(B, cout * ho * wo, dtype=compute, device=device)
            so = (cout * ho * wo, ho * wo, wo, 1)
        else:
            # channels-last: the next layer's K order (kh, kw, ci) reads contiguous ci runs.
            out = torch.empty(B, ho, wo, cout, dtype=compute, device=device)
            so = (ho * wo * cout, 1, wo * cout, cout)
        M, N, K = B * ho * wo, cout, cin * kh * kw
        args = (src, wk, bs, mean_t, std_t, out,
                M, sx[0], sx[1], sx[2], sx[3],
                so[0], so[1], so[2], so[3],
                255.0 if (i == 0 and x.dtype == torch.uint8) else 1.0, _bucket(M))
        consts = dict(H=h, W=w_, CIN=cin, HO=ho, WO=wo, N=N, K=K, STRIDE=stride, PAD=padding, KH=kh, KW=kw, FIRST=(i == 0), ACT=act,
                      SLOPE=_ref.LEAKY_SLOPE, IEEE=ieee)
        if _INTERPRET:
            blk = _interp_blocks(M, N, K if i == 0 else cin)
            grid = (triton.cdiv(M, blk["BLOCK_M"]) * triton.cdiv(N, blk["BLOCK_N"]),)
            _conv_launch[grid](*args, **consts, **blk)
        elif not autotune:
            blk = _fixed_gpu_blocks(N, K if i == 0 else cin, compute)
            grid = (triton.cdiv(M, blk["BLOCK_M"]) * triton.cdiv(N, blk["BLOCK_N"]),)
            _conv_kernel[grid](*args, **consts, **blk)
        else:
            grid = lambda meta, M=M, N=N: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
            _conv_launch[grid](*args, **consts)
        src = out
        # strides of this activation as (b, c, h, w) for the next layer's gather
        sx = so

    feats = src  # (B, F) in NCHW-flat order
    head_bias = head_bias.detach().contiguous()
    head_weight = _offsets_in_32_bits(head_weight, first_dim=0)
    eps = None if eps is None else _offsets_in_32_bits(eps, first_dim=1)
    e = eps if eps is not None else mu  # dummy pointer when HAS_EPS is False
    hargs = (feats, head_weight, head_bias, e, mu, logvar, z if z is not None else mu,
             B, feat, L, head_weight.stride(0), head_weight.stride(1), e.stride(0), e.stride(1), _bucket(B))
    hconsts = dict(HAS_EPS=eps is not None, IEEE=ieee)
    if _INTERPRET:
        blk = _interp_blocks(B, L, feat)
        grid = (triton.cdiv(B, blk["BLOCK_M"]) * triton.cdiv(L, blk["BLOCK_N"]),)
        _heads_launch[grid](*hargs, **hconsts, **blk)
    elif not autotune:
        blk = _fixed_head_blocks(B, L)
        grid = (triton.cdiv(B, blk["BLOCK_M"]) * triton.cdiv(L, blk["BLOCK_N"]),)
        _heads_kernel[grid](*hargs, **hconsts, **blk)
    else:
        grid = lambda meta: (triton.cdiv(B, meta["BLOCK_M"]) * triton.cdiv(L, meta["BLOCK_N"]),)
        _heads_launch[grid](*hargs, **hconsts)
    return (mu, logvar) if eps is None else (mu, logvar, z)


@functools.wraps(_encoder_forward)
def encoder_forward(x, *args, **kwargs):
    # Triton launches on the *current* CUDA device, not the input's (triton-lang/triton#2441):
    # `--device cuda:1` in one process failed with "cannot be accessed from Triton"
    on_gpu = isinstance(x, torch.Tensor) and x.is_cuda
    with torch.cuda.device(x.device) if on_gpu else contextlib.nullcontext():
        return _encoder_forward(x, *args, **kwargs)


def compile_for(capability: int, image_shape=(3, 64, 64), channels=(32, 64, 128, 256), latent_dim: int = 16, *,
                input_dtype: torch.dtype = torch.uint8, compute_dtype: torch.dtype = torch.bfloat16,
                param_dtype: torch.dtype | None = None, batch: int = 256, eps: bool = False,
                activation_name: str = "relu", kernel: int = 4, stride: int = 2, padding: int = 1,
                autotune: bool = False) -> list[tuple[str, dict, object]]:
    """Compile ahead of time, for a GPU of this compute capability (e.g. 90) and needing
    neither one nor the interpreter, every kernel a forward of this encoder launches: one
    per conv layer, then the heads, with the geometry and constants `_encoder_forward`
    gives them, in the configuration it would use without autotuning
    (SPURFAST_TRITON_AUTOTUNE=0) or, with ``autotune``, in each configuration the prune
    keeps.  ``param_dtype``: the conv/head weights' dtype (default: ``compute_dtype`` for
    uint8 input, which computes in it, else fp32).  Returns [(name, config, triton's
    CompiledKernel)]: its ``.asm["cubin"]`` holds the machine code."""
    if input_dtype not in (torch.uint8, compute_dtype):
        raise ValueError(f"input dtype {input_dtype} computes in itself, not {compute_dtype}")
    params = TYPE_NAMES[param_dtype or (compute_dtype if input_dtype == torch.uint8 else torch.float32)]
    elt = TYPE_NAMES[compute_dtype]

    def build(fn, sig, const, cfg):
        blocks = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
        return compile_for_target(fn, sig, {**const, **blocks}, capability, cfg["num_warps"], cfg["num_stages"])

    def configs(pruned):
        return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in pruned]

    out = []
    c, h, w = image_shape
    ieee = compute_dtype == torch.float32
    for i, cout in enumerate(channels):
        ho, wo = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
        m, k = batch * ho * wo, c * kernel * kernel
        sig = {"x_ptr": f"*{TYPE_NAMES[input_dtype] if i == 0 else elt}", "w_ptr": f"*{elt}",
               "bias_ptr": f"*{params}", "mean_ptr": "*fp32", "std_ptr": "*fp32", "out_ptr": f"*{elt}",
               **{name: "i32" for name in ("M", "sxb", "sxc", "sxh", "sxw", "sob", "soc", "soh", "sow")},
               "in_div": "fp32", "M_BUCKET": "i32"}
        const = dict(H=h, W=w, CIN=c, HO=ho, WO=wo, N=cout, K=k, STRIDE=stride, PAD=padding, KH=kernel, KW=kernel,
                     FIRST=i == 0, ACT=_ACT_CODE[activation_name], SLOPE=_ref.LEAKY_SLOPE, IEEE=ieee)
        cfgs = (configs(_prune_conv(_CONV_CONFIGS, dict(M=m, N=cout, K=k, CIN=c, FIRST=i == 0))) if autotune
                else [_fixed_gpu_blocks(cout, k if i == 0 else c, compute_dtype)])
        out += [(f"conv{i}", cfg, build(_conv_kernel, sig, const, cfg)) for cfg in cfgs]
        c, h, w = cout, ho, wo
    sig = {"f_ptr": f"*{elt}", "hw_ptr": f"*{params}", "hb_ptr": f"*{params}", "eps_ptr": "*fp32", "mu_ptr": "*fp32",
           "lv_ptr": "*fp32", "z_ptr": "*fp32",
           **{name: "i32" for name in ("B", "F", "L", "shw0", "shw1", "seps0", "seps1", "M_BUCKET")}}
    const = dict(HAS_EPS=eps, IEEE=ieee)
    cfgs = (configs(_prune_heads(_HEAD_CONFIGS, dict(B=batch, L=latent_dim))) if autotune
            else [_fixed_head_blocks(batch, latent_dim)])
    out += [("heads", cfg, build(_heads_kernel, sig, const, cfg)) for cfg in cfgs]
    return out
