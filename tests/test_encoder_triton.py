"""The fused Triton VAE encoder against the PyTorch reference (kernels/reference.py).

On the CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py) in fp32 only:
the interpreter's tl.dot is not trustworthy for bf16.  fp16/bf16 are checked on a GPU
(tests marked ``gpu``).  Shapes are kept small (non-power-of-two channel counts) so the
whole file stays quick on two cores; the shipped widths run once per architecture.
"""
from __future__ import annotations

import re

import pytest
import torch

from helpers import assert_close, compile_without_gpu
from spurfast import backends
from spurfast.kernels import reference as ref
from spurfast.models.vae import VAE, VAEConfig, vae_loss

et = pytest.importorskip("spurfast.kernels.encoder_triton")
# triton 3.6's interpreter (torch 2.11's) cannot run the kernels' loops with numpy 2.4: skipped, saying so
pytestmark = [pytest.mark.skipif(not et.is_available()[0], reason=et.is_available()[1]), pytest.mark.on_gpu]

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _model(in_ch, size, channels, latent, activation="relu", mean=None, std=None, seed=0):
    torch.manual_seed(seed)
    cfg = VAEConfig(in_ch, size, tuple(channels), latent, activation=activation,
                    mean=mean or (0.5,) * in_ch, std=std or (0.5,) * in_ch)
    return VAE(cfg).to(DEV).eval()


def _images(b, c, size, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, (b, c, size, size), generator=g, dtype=torch.uint8).to(DEV)
    return torch.rand(b, c, size, size, generator=g).to(DEV).to(dtype)


def _compare(model, x, eps=None, dtype=torch.float32, tag=""):
    p = model.encoder_params()
    with torch.no_grad():
        want = ref.encoder_forward(x, **p, eps=eps)
        got = et.encoder_forward(x, **p, eps=eps)
    assert len(got) == len(want)
    for name, g, w in zip(("mu", "logvar", "z"), got, want):
        assert g.dtype == torch.float32, f"{name} must be fp32, got {g.dtype}"
        # half dtypes: within a few units of roundoff of the output's magnitude (see
        # helpers.TOLERANCES), so a scaled or otherwise wrong half path fails
        assert_close(g, w, dtype, name=f"{tag}{name}")
    if eps is not None:
        # z is computed in fp32 from the fp32 mu/logvar accumulators: it must match them to
        # fp32 rounding whatever the compute dtype (z's magnitude, ~|eps|, is far larger
        # than mu's, so the half tolerance against the reference's z is loose for z itself)
        mu, logvar, z = got
        assert_close(z, mu + torch.exp(0.5 * logvar) * eps.float(), torch.float32,
                     name=f"{tag}z from the kernel's own mu/logvar")
    return got


# ------------------------------------------------------------------ fp32 vs reference
ARCHS = {
    # name: (in_channels, size, channels, latent, activation)
    "mnist-shipped": (1, 28, (32, 64), 16, "relu"),
    "mnist-odd": (1, 28, (5, 12), 8, "leaky_relu"),
    "rgb64-odd": (3, 64, (5, 12, 9, 7), 24, "silu"),
}


@pytest.mark.parametrize("batch", [1, 7, 33])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fp32_matches_reference(arch, batch):
    c, s, ch, lat, act = ARCHS[arch]
    m = _model(c, s, ch, lat, act, mean=(0.4, 0.5, 0.6)[:c], std=(0.2, 0.3, 0.25)[:c])
    x = _images(batch, c, s)
    mu, logvar = _compare(m, x, tag=f"{arch} B={batch} ")
    assert mu.shape == (batch, lat) and logvar.shape == (batch, lat)
    # the outputs are not degenerate (a kernel writing zeros would fail assert_close too,
    # but make the point explicit: the reference output varies over the batch)
    if batch > 1:
        assert float(mu.std(0).mean()) > 1e-4


def test_rgb64_shipped_widths():
    cfg = VAEConfig.for_images(3, 64, 16)
    assert cfg.channels == (32, 64, 128, 256)
    torch.manual_seed(0)
    m = VAE(cfg).to(DEV).eval()
    _compare(m, _images(3, 3, 64), tag="rgb64-shipped ")


@pytest.mark.parametrize("latent", [8, 512])
def test_latent_sizes(latent):
    m = _model(1, 28, (5, 12), latent)
    x = _images(7, 1, 28)
    eps = torch.randn(7, latent, generator=torch.Generator().manual_seed(3)).to(DEV)
    mu, logvar, z = _compare(m, x, eps=eps, tag=f"L={latent} ")
    assert mu.shape == (7, latent)


def test_uint8_input():
    m = _model(3, 64, (5, 12, 9, 7), 8, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    _compare(m, _images(7, 3, 64, torch.uint8), tag="uint8 ")


def test_uint8_input_with_float64_weights_computes_in_fp32():
    """As the reference does: fp64 weights on uint8 images were refused as an fp64 compute dtype."""
    m = _model(1, 16, (5, 7), 4).double()
    _compare(m, _images(3, 1, 16, torch.uint8), tag="uint8/fp64-weights ")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bool])
def test_float64_and_bool_input_are_read_as_the_reference_reads_them(dtype):
    # the reference takes them (as fp32) and the kernel refused them: VAE.encode on numpy's
    # img / 255.0 worked on the CPU and failed under `auto` on a GPU
    m = _model(1, 28, (5, 12), 8)
    x = _images(5, 1, 28, torch.float64)
    _compare(m, x > 0.5 if dtype == torch.bool else x, tag=f"{dtype} ")


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "silu"])
def test_nan_and_inf_propagate_as_in_the_reference(activation):
    # relu's tl.maximum(NaN, 0) gave 0: a diverged VAE encoded every image to finite latents
    # on the Triton path (the GPU default), so embed's NaN-latent check never fired
    m = _model(1, 28, (5, 12), 8, activation=activation)
    x = _images(4, 1, 28)
    x[1, 0, 5, 5], x[2, 0, 9, 3] = float("nan"), float("inf")
    p = m.encoder_params()
    with torch.no_grad():
        cases = {"pixel": (x, p)}
        w = [t.clone() for t in p["conv_weights"]]
        w[0][0, 0, 0, 0] = float("nan")
        cases["weight"] = (_images(3, 1, 28), dict(p, conv_weights=w))
        for case, (xi, pi) in cases.items():
            for name, g, want in zip(("mu", "logvar"), et.encoder_forward(xi, **pi), ref.encoder_forward(xi, **pi)):
                bad = ~torch.isfinite(want)
                assert bad.any(), f"{case} {name}: the case makes no non-finite output"
                assert torch.equal(~torch.isfinite(g), bad), \
                    f"{case} {name}: {int((~torch.isfinite(g)).sum())} non-finite outputs, the reference {int(bad.sum())}"
                assert torch.equal(torch.isnan(g), torch.isnan(want)), f"{case} {name}: NaN where the reference has none"
                assert_close(g[~bad], want[~bad], torch.float32, name=f"{case} {name} (finite rows)")


def test_eps_gives_reparameterised_z():
    m = _model(1, 28, (5, 12), 8)
    x = _images(7, 1, 28)
    eps = torch.randn(7, 8, generator=torch.Generator().manual_seed(5)).to(DEV)
    mu, logvar, z = _compare(m, x, eps=eps, tag="eps ")
    assert_close(z, mu + torch.exp(0.5 * logvar) * eps, name="z from the kernel's own mu/logvar")
    # eps as a strided view and in another float dtype is read correctly
    big = torch.randn(7, 16, generator=torch.Generator().manual_seed(6)).to(DEV)
    _compare(m, x, eps=big[:, ::2], tag="strided eps ")


def test_strided_and_channels_last_input():
    m = _model(3, 64, (5, 12, 9, 7), 8)
    base = _images(14, 3, 64)
    _compare(m, base[::2], tag="batch-strided ")
    _compare(m, base[:5].contiguous(memory_format=torch.channels_last), tag="channels_last ")


@pytest.mark.skipif(DEV != "cpu", reason="a 4 GiB buffer left untouched: the CPU's lazily mapped pages")
def test_channel_planes_2_gib_apart_are_read_where_they_are():
    # the first layer's in-image offset was 32-bit: channel 2 at 2 x (2^30 + 2^20) wrapped to an
    # address 4 GiB lower and encoded the bytes found there (0.8 off the reference).  Pages that
    # are never written are never mapped, so the buffer costs a few pages of memory
    sxc = 2 ** 30 + 2 ** 20
    buf = torch.empty(2 ** 31 + 2 * sxc + 2 ** 20, dtype=torch.uint8)
    x = buf.as_strided((1, 3, 8, 8), (3 * sxc, sxc, 8, 1), storage_offset=2 ** 31)
    x.copy_(_images(1, 3, 8, torch.uint8))
    wrapped = 2 ** 31 + 2 * sxc - 2 ** 32
    buf[wrapped:wrapped + 64] = 255   # what the wrapped reads would find
    _compare(_model(3, 8, (4,), 3), x, tag="planes 2 GiB apart ")
    # the heads' eps and head_weight views are copied the same way (offsets in elements: no
    # memory for an fp32 one here, so the decision is checked on meta tensors)
    meta = torch.empty(2 ** 33, device="meta")
    eps = meta.as_strided((2, 3), (1, 2 ** 30))
    assert not eps.is_contiguous() and et._offsets_in_32_bits(eps, first_dim=1).is_contiguous()
    assert et._offsets_in_32_bits(meta.as_strided((2 ** 31, 2), (2, 1)), first_dim=1).stride() == (2, 1)
    small = meta.as_strided((2, 3), (1, 2 ** 29))   # 2 x 2^29 < 2^31: read in place
    assert et._offsets_in_32_bits(small, first_dim=1) is small
    head_weight = meta.as_strided((6, 4), (2 ** 29, 1))   # rows 5 x 2^29 apart: copied
    assert et._offsets_in_32_bits(head_weight, first_dim=0).is_contiguous()


def test_three_conv_rgb_and_general_kernel_geometry():
    # a 3-conv encoder on 32x32 and a non-default stride/padding (3x3 kernel, stride 1, pad 1)
    m = _model(3, 32, (6, 10, 20), 8)
    _compare(m, _images(5, 3, 32), tag="rgb32 ")
    torch.manual_seed(0)
    w = [torch.randn(7, 2, 3, 3, device=DEV) * 0.3, torch.randn(5, 7, 3, 3, device=DEV) * 0.3]
    b = [torch.randn(7, device=DEV) * 0.1, torch.randn(5, device=DEV) * 0.1]
    hw = torch.randn(6, 5 * 9 * 9, device=DEV) * 0.05
    hb = torch.randn(6, device=DEV) * 0.1
    x = _images(4, 2, 9)
    kw = dict(mean=(0.5, 0.4), std=(0.25, 0.5), stride=1, padding=1, activation_name="silu")
    want = ref.encoder_forward(x, w, b, hw, hb, **kw)
    got = et.encoder_forward(x, w, b, hw, hb, **kw)
    for name, g, e in zip(("mu", "logvar"), got, want):
        assert_close(g, e, name=f"stride-1 {name}")


@pytest.mark.skipif(DEV == "cuda", reason="covered by the GPU half-precision tests")
def test_fp16_compute_path_under_interpreter():
    """fp16 inputs (and uint8 images with fp16 weights) run the half-precision path: weights
    cast, fp16 intermediates, head weight cast in registers.  The interpreter's fp16 dot is
    sound (unlike its bf16 dot), so this path is checked on the CPU too."""
    m = _model(3, 32, (6, 10, 20), 8, "silu")
    _compare(m, _images(5, 3, 32, torch.float16), dtype=torch.float16, tag="fp16 ")
    _compare(m.half(), _images(5, 3, 32, torch.uint8), dtype=torch.float16, tag="uint8/fp16-weights ")


def test_launch_count_and_no_host_side_tensor_work(monkeypatch):
    """The module docstring's promise: a forward is len(conv_weights) conv launches + 1 head
    launch, one copy per conv weight (its preparation) and no other tensor work (only output,
    intermediate and prepared-weight allocations; `detach`, `permute` and `view` are views)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    class CountLaunches:
        def __init__(self):
            self.n = 0

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                self.n += 1
            return launch

    m = _model(3, 64, (5, 12, 9, 7), 8)
    x = _images(2, 3, 64, torch.uint8)
    p = m.encoder_params()
    eps = torch.zeros(2, 8, device=DEV)
    et.encoder_forward(x, **p, eps=eps)  # a first call (compiles where a GPU is used)
    conv, heads = CountLaunches(), CountLaunches()
    monkeypatch.setattr(et, "_conv_launch", conv)
    monkeypatch.setattr(et, "_heads_launch", heads)
    with Recorder() as rec:
        et.encoder_forward(x, **p, eps=eps)
    assert (conv.n, heads.n) == (4, 1)
    views = ("aten.detach.default", "aten.permute.default", "aten.view.default")
    extra = [op for op in rec.ops if op not in ("aten.empty.memory_format", "aten.copy_.default") + views]
    assert not extra, f"unexpected tensor ops in a warm forward: {extra}"
    assert rec.ops.count("aten.copy_.default") == 4                  # one per conv weight
    # mu, logvar, z; 3 intermediates; feats; 4 prepared weights
    assert rec.ops.count("aten.empty.memory_format") == 3 + 3 + 1 + 4


def test_empty_batch():
    m = _model(1, 28, (5, 12), 8)
    x = _images(0, 1, 28)
    mu, logvar = et.encoder_forward(x, **m.encoder_params())
    assert mu.shape == (0, 8) and logvar.shape == (0, 8) and mu.dtype == torch.float32


# ------------------------------------------------------------------ trained weights
def test_trained_checkpoint_roundtrip(tmp_path):
    """Train a tiny VAE for a few steps, save the state_dict, reload it into a fresh model and
    compare; also checks that the kernel sees in-place updates of the weights."""
    torch.manual_seed(0)
    cfg = VAEConfig(1, 28, (5, 12), 8)
    model = VAE(cfg).to(DEV)
    data = _images(32, 1, 28)
    x_probe = _images(7, 1, 28, seed=9)
    # a first call with the untrained weights
    before = et.encoder_forward(x_probe, **model.encoder_params())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(5):
        recon, mu, logvar = model(data)
        loss, _, _ = vae_loss(recon, data, mu, logvar)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    # the optimiser updated the weights in place: the kernel must not use stale ones
    _compare(model, x_probe, tag="after training ")
    path = tmp_path / "vae.pt"
    torch.save(model.state_dict(), path)

    fresh = VAE(cfg).to(DEV).eval()
    fresh.load_state_dict(torch.load(path, weights_only=True, map_location=DEV))
    got = _compare(fresh, x_probe, tag="checkpoint ")
    # training moved the encoder: the checkpoint output differs from the untrained one
    assert float((got[0] - before[0]).abs().max()) > 1e-3
    # and load_state_dict into an already-used model (in-place copy_) is also seen
    model2 = VAE(cfg).to(DEV).eval()
    et.encoder_forward(x_probe, **model2.encoder_params())
    model2.load_state_dict(torch.load(path, weights_only=True, map_location=DEV))
    assert_close(et.encoder_forward(x_probe, **model2.encoder_params())[0], got[0], name="reloaded mu")


def test_weight_cache_sees_data_replacement():
    """`w.data = t` swaps the weight's storage without bumping its version: the prepared
    kernel must not use the old values (a cache keyed on id and version once did)."""
    m = _model(1, 28, (5, 12), 8)
    x = _images(3, 1, 28)
    _compare(m, x, tag="warm ")
    g = torch.Generator().manual_seed(4)
    for conv in m.convs:
        conv.weight.data = torch.randn(conv.weight.shape, generator=g).to(DEV)
    _compare(m, x, tag="after .data = new ")
    m.convs[1].weight.data = m.convs[1].weight.data.clone() * -2   # same shape, new storage
    _compare(m, x, tag="after a second swap ")


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD])
def test_fused_optimiser_updates_are_seen(opt_cls):
    """Fused optimisers write the parameters without bumping their version counter: a weight
    cache keyed on _version served the pre-step weights (max |triton - ref| ~ 200)."""
    torch.manual_seed(0)
    m = VAE(VAEConfig(1, 8, (4, 8), 2)).to(DEV)
    x = _images(3, 1, 8)
    m.eval()
    _compare(m, x, tag="before ")
    opt = opt_cls(m.parameters(), lr=0.5, fused=True)
    for step in range(2):
        m.train()
        recon, mu, logvar = m(x)
        recon.sum().backward()
        opt.step()
        opt.zero_grad()
        m.eval()
        _compare(m, x, tag=f"after fused {opt_cls.__name__} step {step} ")


def test_weights_written_through_data_are_seen():
    """``w.data.mul_`` bumps no counter of w's: the kernel must still use the new values."""
    m = _model(1, 28, (5, 12), 8)
    x = _images(3, 1, 28)
    _compare(m, x, tag="warm ")
    for conv in m.convs:
        conv.weight.data.mul_(-3.0)
    _compare(m, x, tag="after .data.mul_ ")


def test_vae_made_under_inference_mode():
    """Inference-mode tensors have no version counter: reading w._version crashed."""
    with torch.inference_mode():
        m = _model(1, 28, (5, 12), 8)
    x = _images(3, 1, 28)
    with torch.no_grad():
        got = m.encode(x, backend="triton")
        want = m.encode(x, backend="torch")
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32, name="inference-mode VAE")


# ------------------------------------------------------------------ registry / VAE.encode
def test_vae_encode_backend_triton_matches_torch():
    backends.clear_cache()
    name, fn = backends.resolve("encoder", "triton")
    assert name == "triton" and fn is et.encoder_forward
    m = _model(1, 28, (5, 12), 8)
    x = _images(7, 1, 28, torch.uint8)
    got = m.encode(x, backend="triton")
    want = m.encode(x, backend="torch")
    for name, g, w in zip(("mu", "logvar"), got, want):
        assert_close(g, w, name=f"VAE.encode {name}")


def test_is_available(monkeypatch):
    ok, why = et.is_available()
    assert ok, why
    monkeypatch.setattr(et, "_INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, why = et.is_available()
    assert not ok and "TRITON_INTERPRET" in why


# ------------------------------------------------------------------ bad input
def _params():
    return _model(1, 28, (5, 12), 8).encoder_params()


@pytest.mark.parametrize("x, exc, pattern", [
    (torch.rand(1, 28, 28), ValueError, r"\(B, C, H, W\).*\(1, 28, 28\)"),
    (torch.rand(2, 3, 28, 28), ValueError, r"channel mismatch at conv layer 0.*C_in=1.*3"),
    (torch.rand(2, 1, 32, 32), ValueError, r"flattened features 768"),
    (torch.rand(2, 1, 27, 27), ValueError, r"flattened features 432 \(= 12x6x6\)"),
    (torch.zeros(2, 1, 28, 28, dtype=torch.int32), TypeError, r"int32 is unsupported"),
])
def test_bad_input_errors(x, exc, pattern):
    with pytest.raises(exc, match=pattern):
        et.encoder_forward(x.to(DEV), **_params())


@pytest.mark.parametrize("size, kernel, stride, padding, layers", [
    (16, 3, 2, 0, 1),    # 16 -> 7: the old divisibility check refused it ("16x16 ... must be divisible by 2^1")
    (13, 4, 2, 1, 2),    # 13 -> 6 -> 3
    (28, 4, 2, 1, 3),    # 28 -> 14 -> 7 -> 3
    (9, 2, 3, 1, 1),     # 9 -> 4
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])   # bf16: GPU only
def test_conv_output_sizes_round_down_as_the_reference(size, kernel, stride, padding, layers, dtype):
    g = torch.Generator().manual_seed(size)
    chans = [2] + [3] * layers
    ws = [(0.3 * torch.randn(chans[i + 1], chans[i], kernel, kernel, generator=g)).to(DEV) for i in range(layers)]
    bs = [(0.1 * torch.randn(chans[i + 1], generator=g)).to(DEV) for i in range(layers)]
    out = size
    for _ in range(layers):
        out = (out + 2 * padding - kernel) // stride + 1
    hw = (0.1 * torch.randn(4, chans[-1] * out * out, generator=g)).to(DEV)
    hb = torch.zeros(4, device=DEV)
    x = torch.rand(3, 2, size, size, generator=g).to(DEV).to(dtype)
    kw = dict(stride=stride, padding=padding, mean=(0.5,), std=(0.5,))
    want = ref.encoder_forward(x, ws, bs, hw, hb, **kw)
    got = et.encoder_forward(x, ws, bs, hw, hb, **kw)
    for name, a, b in zip(("mu", "logvar"), got, want):
        assert_close(a, b, dtype, name=f"{size}x{size} k{kernel} s{stride} p{padding} {dtype} {name}")


def test_a_batch_beyond_the_32_bit_row_index_is_refused_before_any_work():
    # B x Ho x Wo >= 2^31 wrapped the kernel's int32 row index: reads and writes before the
    # tensors.  An expanded input holds no memory; the check comes before any allocation.
    p = _model(1, 32, (1,), 1).encoder_params()
    x = torch.zeros(1, 1, 32, 32, device=DEV).expand(2 ** 23, 1, 32, 32)
    with pytest.raises(ValueError, match=r"2147483648 output positions at conv layer 0 \(16x16 each\).*"
                                         r"at most 8388607 images per call"):
        et.encoder_forward(x, **p)


def test_bad_parameters_errors():
    p = _params()
    x = _images(2, 1, 28)
    with pytest.raises(ValueError, match=r"eps must have shape \(B, L\) = \(2, 8\), got \(2, 9\)"):
        et.encoder_forward(x, **p, eps=torch.zeros(2, 9, device=DEV))
    with pytest.raises(ValueError, match=r"mean/std have 2/1 entries for an input with 1 channels"):
        et.encoder_forward(x, **{**p, "mean": (0.1, 0.2)})
    with pytest.raises(ValueError, match=r"unknown activation 'gelu'"):
        et.encoder_forward(x, **{**p, "activation_name": "gelu"})
    with pytest.raises(ValueError, match=r"head_weight must be \(2L, F\)"):
        et.encoder_forward(x, **{**p, "head_weight": p["head_weight"][:15]})
    with pytest.raises(ValueError, match=r"channel mismatch at conv layer 1"):
        et.encoder_forward(x, **{**p, "conv_weights": [p["conv_weights"][0], p["conv_weights"][1][:, :4]]})


def test_mean_and_std_in_any_nesting_are_read_as_the_reference_reads_them():
    """[[0.5, 0.5, 0.5]] ran in the reference (as_tensor + reshape) and failed in the kernel
    with a TypeError naming nothing."""
    model = _model(3, 8, (4,), 2, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))
    x = _images(2, 3, 8)
    p = model.encoder_params()
    for mean, std in (([[0.5, 0.4, 0.3]], [[0.25, 0.2, 0.3]]), (torch.tensor([[0.5], [0.4], [0.3]]), (0.25, 0.2, 0.3))):
        with torch.no_grad():
            want = ref.encoder_forward(x, **{**p, "mean": mean, "std": std})
            got = et.encoder_forward(x, **{**p, "mean": mean, "std": std})
        for name, g, w in zip(("mu", "logvar"), got, want):
            assert_close(g, w, torch.float32, name=name)


# ------------------------------------------------------------------ GPU: fp16 / bf16
GPU_ARCHS = [(1, 28, (32, 64), 16), (3, 64, (32, 64, 128, 256), 128), (3, 64, (24, 40, 72, 100), 512)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("arch", GPU_ARCHS, ids=lambda a: f"{a[0]}x{a[1]}-{'-'.join(map(str, a[2]))}-L{a[3]}")
@pytest.mark.parametrize("batch", [1, 33, 300])
def test_gpu_half_precision(arch, dtype, batch, monkeypatch):
    # one fixed block configuration: autotuning would compile every config for every layer
    # shape and dtype here (minutes); the autotuned path is covered by the tests below
    monkeypatch.setenv("SPURFAST_TRITON_AUTOTUNE", "0")
    c, s, ch, lat = arch
    m = _model(c, s, ch, lat)
    x = _images(batch, c, s, dtype)
    eps = torch.randn(batch, lat, device=DEV)
    # the reference computes in fp32 from the same (already rounded) half input
    _compare(m, x, eps=eps, dtype=dtype, tag=f"{dtype} ")
    # uint8 images with half weights compute in the weights' dtype
    _compare(m.to(dtype), _images(batch, c, s, torch.uint8), dtype=dtype, tag=f"uint8/{dtype} ")


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 257, 1024])
def test_gpu_fp32_autotuned(batch, monkeypatch):
    monkeypatch.setenv("SPURFAST_TRITON_AUTOTUNE", "1")
    m = _model(3, 64, (32, 64, 128, 256), 64, "silu")
    _compare(m, _images(batch, 3, 64), tag="gpu fp32 ")
    _compare(m, _images(batch, 3, 64, torch.uint8), tag="gpu uint8 ")


@pytest.mark.gpu
def test_gpu_bf16_autotuned(monkeypatch):
    monkeypatch.setenv("SPURFAST_TRITON_AUTOTUNE", "1")
    m = _model(3, 64, (32, 64, 128, 256), 16)
    _compare(m, _images(256, 3, 64, torch.bfloat16), dtype=torch.bfloat16, tag="gpu bf16 autotuned ")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_gpu_encodes_on_a_device_that_is_not_the_current_one():
    # Triton launches on the current device (triton-lang/triton#2441): `--device cuda:1` in
    # one process failed with "cannot be accessed from Triton" until the launch set it
    m = _model(1, 28, (5, 12), 8).to("cuda:1")
    x = _images(7, 1, 28).to("cuda:1")
    assert torch.cuda.current_device() == 0
    with torch.no_grad():
        got = et.encoder_forward(x, **m.encoder_params())
        want = ref.encoder_forward(x, **m.encoder_params())
    assert got[0].device == x.device and torch.cuda.current_device() == 0
    assert_close(got[0], want[0], torch.float32, name="mu on cuda:1")


def test_auto_sends_cpu_tensors_to_the_reference_even_under_the_interpreter():
    backends.clear_cache()
    assert backends.resolve("encoder", None, "cpu")[0] == "torch"
    if torch.cuda.is_available():
        assert backends.resolve("encoder", None, "cuda")[0] == "triton"
    backends.clear_cache()


@pytest.mark.parametrize("shape", [(8,), (2, 1), (1, 8)])
def test_reference_refuses_eps_that_would_broadcast_as_the_kernel_does(shape):
    # the reference broadcast eps (L,), (B, 1) or (1, L) over the batch: one noise draw
    # shared by every image, silently, where the Triton kernel refuses it
    with pytest.raises(ValueError, match=rf"eps must have shape \(B, L\) = \(2, 8\), got {re.escape(str(shape))}"):
        ref.encoder_forward(torch.rand(2, 1, 28, 28), **_model(1, 28, (5, 12), 8).encoder_params(),
                            eps=torch.zeros(shape))


@pytest.mark.parametrize("std", [(0.0,), torch.tensor([0.0])], ids=["tuple", "tensor"])
def test_reference_refuses_a_zero_std_as_the_kernel_does(std):
    # the reference divided by it: inf / NaN latents, silently, where the Triton kernel refuses it
    p = {**_model(1, 28, (5, 12), 8).encoder_params(), "std": std}
    for fn in (ref.encoder_forward, et.encoder_forward):
        with pytest.raises(ValueError, match=re.escape("std must be non-zero, got (0.0,)")):
            fn(_images(2, 1, 28), **p)
    with pytest.raises(ValueError, match=re.escape("std must be non-zero, got (0.0,)")):   # it gave inf pixels
        ref.normalise_input(_images(2, 1, 28), (0.5,), std)


@pytest.mark.parametrize("key", ["mean", "std"])
def test_reference_names_a_string_mean_or_std_as_the_kernel_does(key):
    # the reference's torch.as_tensor("0.5") raised "new(): invalid data type 'str'", naming neither
    p = {**_model(1, 28, (5, 12), 8).encoder_params(), key: "0.5"}
    for fn in (ref.encoder_forward, et.encoder_forward):
        with pytest.raises(ValueError, match=re.escape("mean/std must be numbers, got '0.5'")):
            fn(_images(2, 1, 28), **p)


def test_reference_refuses_odd_heads_and_unpaired_layers_as_the_kernel_does():
    # the reference split an odd head into mu (B, L) and logvar (B, L + 1), and zip ran only
    # the layers both lists had, silently, where the Triton kernel refuses them
    p, x = _model(1, 28, (5, 12), 8).encoder_params(), torch.rand(2, 1, 28, 28)
    for fn in (ref.encoder_forward, et.encoder_forward):
        with pytest.raises(ValueError, match=r"head_weight must be \(2L, F\) = \[W_mu; W_logvar\], got shape \(15, "):
            fn(x.to(DEV), **{**p, "head_weight": p["head_weight"][:15], "head_bias": p["head_bias"][:15]})
        with pytest.raises(ValueError, match=r"head_bias must have shape \(16,\), got \(15,\)"):
            fn(x.to(DEV), **{**p, "head_bias": p["head_bias"][:15]})
        with pytest.raises(ValueError, match=r"need one bias per conv weight.*2 weights and 1 biases"):
            fn(x.to(DEV), **{**p, "conv_biases": p["conv_biases"][:1]})


def test_kernel_refuses_a_fractional_stride_as_the_reference_does():
    # int(stride) ran 2.5 as stride 2, silently, where the reference's conv2d refuses it
    p = _model(1, 28, (5, 12), 8).encoder_params()
    with pytest.raises(TypeError, match=r"stride and padding must be integers, got stride=2.5, padding=1"):
        et.encoder_forward(_images(2, 1, 28), **{**p, "stride": 2.5})
    with pytest.raises(TypeError):
        ref.encoder_forward(_images(2, 1, 28), **{**p, "stride": 2.5})


_COMPILE_SCRIPT = r"""
from spurfast.kernels import encoder_triton as et
out = []
for cap, shape, channels, input_dtype, compute_dtype, autotune in jobs:
    for name, cfg, kernel in et.compile_for(cap, tuple(shape), tuple(channels), 16, input_dtype=getattr(torch, input_dtype),
                                            compute_dtype=getattr(torch, compute_dtype), autotune=autotune):
        out.append([cap, shape, input_dtype, compute_dtype, name, cfg, usage(kernel)])
print(json.dumps(out))
"""
# the shipped encoders: Fashion-MNIST's and the RGB 64x64 one of folder pools
_ARCHS = [((1, 28, 28), (32, 64)), ((3, 64, 64), (32, 64, 128, 256))]


def test_compiles_for_hopper_and_ampere_without_spills():
    """What a GPU compiles in the configuration without autotuning (SPURFAST_TRITON_AUTOTUNE=0:
    the GPU tests), checked without one: every kernel of a forward, for sm_90 in each input and
    compute dtype and for sm_80, without register spills (its 128 x 128 x 64 tile spilled up to
    10 KiB a thread on fp32 layers).  Runs in a subprocess without the interpreter."""
    dtypes = [("uint8", "float32"), ("uint8", "bfloat16"), ("float16", "float16"), ("float32", "float32")]
    jobs = [[90, shape, ch, i, c, False] for shape, ch in _ARCHS for i, c in dtypes]
    jobs += [[80, _ARCHS[1][0], _ARCHS[1][1], i, c, False] for i, c in dtypes[:2]]
    rows = compile_without_gpu(_COMPILE_SCRIPT, jobs)
    want = sum(len(ch) + 1 for _, _, ch, *_ in jobs)   # each conv layer, then the heads
    assert len(rows) == want, f"{len(rows)} kernels compiled, expected {want}"
    spills = [row[:6] + re.findall(r"REG:\d+ STACK:\d+", row[6]) for row in rows if "STACK:0" not in row[6]]
    import triton
    if not triton.__version__.startswith("3.8"):
        # chosen with triton 3.8's register allocation; 3.6 (the H200's) keeps an 8-byte stack frame
        # at 96 registers in one fp32 kernel: every kernel compiles, which is what is checked there
        pytest.skip(f"spills checked for triton 3.8, this is {triton.__version__} ({len(spills)} kernels use stack)")
    assert not spills, f"{len(spills)} of {len(rows)} kernels spill registers: {spills[:3]}"


def test_every_autotune_configuration_compiles_for_hopper():
    """Autotuning compiles each configuration the prune keeps, per layer: none may fail to
    compile for the GPU (some spill on the wider layers and are slower, which autotuning
    weighs by timing them)."""
    rows = compile_without_gpu(_COMPILE_SCRIPT, [[90, _ARCHS[1][0], _ARCHS[1][1], "uint8", "bfloat16", True]])
    per_kernel = {name: sum(r[4] == name for r in rows) for name in ("conv0", "conv1", "conv2", "conv3", "heads")}
    assert min(per_kernel.values()) >= 1 and per_kernel["conv3"] > 1, per_kernel
