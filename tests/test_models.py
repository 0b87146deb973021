import io
import json
import logging

import numpy as np
import pytest
import torch

from spurfast.data import ArraySource
from spurfast.models import VAE, VAEConfig, SmallCNN, build_classifier, load_classifier
from spurfast.models.files import load_vae, save_classifier, save_vae
from spurfast.models.outputs import check_output_width, classifier_outputs
from spurfast.models.train import train_classifier, train_vae
from tests.helpers import assert_bitwise


def _toy(n=64, size=28, c=1, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.rand(n, c, size, size, generator=g) * 0.2
    for k in range(classes):  # class = a bright stripe at a class-specific row
        x[y == k, :, 4 + 6 * k:6 + 6 * k, :] = 1.0
    return ArraySource(x, y.numpy())


@pytest.mark.parametrize("c,size,widths", [(1, 28, (32, 64)), (3, 64, (32, 64, 128, 256)), (3, 32, (5, 12))])
def test_vae_shapes_and_encoder_params(c, size, widths):
    vae = VAE(VAEConfig(c, size, widths, latent_dim=8, mean=(0.5,) * c, std=(0.5,) * c))
    x = torch.rand(3, c, size, size)
    recon, mu, logvar = vae(x)
    assert recon.shape == x.shape and mu.shape == (3, 8)
    m2, lv2 = vae.encode(x, backend="torch")
    vae.eval()
    torch.testing.assert_close(m2, vae._encode_train(x)[0])
    assert vae.encoder_params()["head_weight"].shape == (16, vae.config.flat_dim)


def test_vae_config_errors():
    with pytest.raises(ValueError, match="divisible"):
        VAEConfig(1, 30, (32, 64))
    with pytest.raises(ValueError, match="activation"):
        VAEConfig(activation="gelu")


@pytest.mark.parametrize("size, c", [(28, 1), (16, 3)], ids=["grey", "rgb-channels-last"])
def test_classifier_training_is_seeded_and_learns(size, c):
    src = _toy(n=64 if c == 1 else 48, size=size, c=c)
    a = train_classifier(src, 3, epochs=3, batch_size=16, seed=1, progress=False)
    b = train_classifier(src, 3, epochs=3, batch_size=16, seed=1, progress=False)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert_bitwise(pa, pb, f"classifier parameter {name}")
    x, y = src.get_batch(np.arange(len(src)))
    assert float((a(x).argmax(1) == y).float().mean()) > 0.9


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_training_inside_a_no_grad_block_trains_as_outside(mode):
    # a notebook cell or a request handler under torch.no_grad(): the first backward failed with
    # torch's "element 0 of tensors does not require grad", naming neither spurfast nor the cause
    src = _toy()
    outside = train_classifier(src, 3, epochs=1, batch_size=16, seed=1, progress=False)
    vae_outside = train_vae(src, VAEConfig.for_images(1, 28, 2), epochs=1, batch_size=16, seed=1, progress=False)
    with mode():
        inside = train_classifier(src, 3, epochs=1, batch_size=16, seed=1, progress=False)
        vae_inside = train_vae(src, VAEConfig.for_images(1, 28, 2), epochs=1, batch_size=16, seed=1, progress=False)
    for pa, pb in zip([*inside.parameters(), *vae_inside.parameters()],
                      [*outside.parameters(), *vae_outside.parameters()]):
        assert torch.equal(pa, pb)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_checkpoint_resume_equals_straight_run(tmp_path):
    src = _toy()
    ck = tmp_path / "c.ckpt"
    train_classifier(src, 3, epochs=1, batch_size=16, seed=2, checkpoint=ck, progress=False)
    resumed = train_classifier(src, 3, epochs=2, batch_size=16, seed=2, checkpoint=ck, progress=False)
    straight = train_classifier(src, 3, epochs=2, batch_size=16, seed=2, progress=False)
    for pa, pb in zip(resumed.parameters(), straight.parameters()):
        torch.testing.assert_close(pa, pb)


def test_a_checkpoint_resumed_at_another_thread_count_says_so(tmp_path, caplog):
    """Another thread count sums in another order (weights about 1e-5 apart): a resume at
    another count was silent, and its model was neither count's straight run."""
    src, ck, threads = _toy(), tmp_path / "c.ckpt", torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        train_classifier(src, 3, epochs=1, batch_size=16, seed=2, checkpoint=ck, progress=False)
        with caplog.at_level(logging.WARNING, logger="spurfast"):
            train_classifier(src, 3, epochs=2, batch_size=16, seed=2, checkpoint=ck, progress=False)
        assert "written on" not in caplog.text   # the same count: resumed quietly
        torch.set_num_threads(1)
        with caplog.at_level(logging.WARNING, logger="spurfast"):
            train_classifier(src, 3, epochs=3, batch_size=16, seed=2, checkpoint=ck, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert f"{ck} was written on cpu with 2 thread(s) and resumes on cpu with 1 thread(s)" in caplog.text


def test_classifier_loading_paths(tmp_path):
    model = SmallCNN(1, 4, 28).eval()
    x = torch.rand(2, 1, 28, 28)
    save_classifier(model, tmp_path / "ck.pt")
    torch.testing.assert_close(load_classifier(tmp_path / "ck.pt")(x), model(x))
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="bare state_dict"):
        load_classifier(tmp_path / "sd.pt")
    m2 = load_classifier(tmp_path / "sd.pt", arch="small_cnn", in_channels=1, num_classes=4, image_size=28)
    torch.testing.assert_close(m2(x), model(x))
    torch.jit.trace(model, x).save(str(tmp_path / "ts.pt"))
    ts = load_classifier(tmp_path / "ts.pt")
    torch.testing.assert_close(ts(x), model(x))
    logits, feats = classifier_outputs(ts, x)
    assert logits.shape == (2, 4)
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"neither TorchScript.*pass --unsafe-load \(from Python: weights_only=False\)"):
        load_classifier(tmp_path / "junk.pt")


def test_a_users_model_with_features_and_fc2_gives_its_own_logits():
    # any model with features() and fc2 was read as SmallCNN, logits = fc2(features(x)): a head
    # fc2(relu(fc1(features))) gave other classes than the model's own (0 of 120 agreed), and a
    # LeNet's conv features into fc2 failed as "cannot run on images of shape ..."
    import torch.nn.functional as F

    class MLPHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(128, 64))
            self.fc1, self.fc2 = torch.nn.Linear(64, 64), torch.nn.Linear(64, 10)

        def features(self, x):
            return self.body(x)

        def forward(self, x):
            return self.fc2(F.relu(self.fc1(self.features(x))))

    class LeNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                                torch.nn.Conv2d(6, 16, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
            self.fc1, self.fc2, self.fc3 = torch.nn.Linear(256, 120), torch.nn.Linear(120, 84), torch.nn.Linear(84, 10)

        def forward(self, x):
            return self.fc3(F.relu(self.fc2(F.relu(self.fc1(self.features(x).flatten(1))))))

    torch.manual_seed(0)
    x = torch.rand(16, 1, 28, 28)
    for model in (MLPHead().eval(), LeNet().eval()):
        for _ in range(2):   # the first batch decides; the next ones must agree
            logits, feats = classifier_outputs(model, x)
            torch.testing.assert_close(logits, model(x))
            assert torch.equal(feats, logits)
    # a scripted SmallCNN keeps its penultimate features: its logits are fc2(features(x))
    small = SmallCNN(1, 4, 28).eval()
    scripted = torch.jit.script(small)
    for _ in range(2):
        logits, feats = classifier_outputs(scripted, x)
        torch.testing.assert_close(logits, small(x))
        torch.testing.assert_close(feats, small.features(x))


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18"])
def test_numpy_sizes_give_a_file_the_safe_load_reads(tmp_path, arch):
    # labels.max() + 1 is a numpy integer: it went into model.arch as one, and the weights-only
    # load refused spurfast's own file ("Unsupported global ... pass --unsafe-load")
    model = build_classifier(arch, np.int64(1), np.int64(3), np.int64(16))
    assert all(type(v) in (str, int) for v in model.arch.values()), model.arch
    save_classifier(model, tmp_path / "m.pt")
    assert load_classifier(tmp_path / "m.pt").arch == model.arch


@pytest.mark.parametrize("width", [0, 2.5, True])
def test_a_bad_small_cnn_width_is_refused_by_name(width):
    # 0 built a model that failed at its first forward, 2.5 was blamed on the options
    with pytest.raises(ValueError, match=f"small_cnn: width must be an integer >= 1, got {width!r}"):
        build_classifier("small_cnn", 1, 3, 16, width=width)


def test_a_nan_row_in_the_first_batch_does_not_swap_features_for_logits():
    # the first batch decides whether features() is the penultimate layer; a classifier that
    # standardises each image gives NaN for the blank stand-in of an unreadable file, and its
    # check failed: logits stood in for the features for the rest of the run, without a word
    class PerImageStandardised(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 12))
            self.fc2 = torch.nn.Linear(12, 5)

        def features(self, x):
            return self.body((x - x.mean((1, 2, 3), keepdim=True)) / x.std((1, 2, 3), keepdim=True))

        def forward(self, x):
            return self.fc2(self.features(x))

    torch.manual_seed(0)
    x = torch.rand(4, 1, 28, 28)
    x[0] = 0   # an unreadable file's stand-in: std 0, a NaN row
    model = PerImageStandardised().eval()
    for batch in (x, x[1:]):
        logits, feats = classifier_outputs(model, batch)
        assert feats.shape == (len(batch), 12), feats.shape
    # a batch with no finite row decides nothing: the next one still can
    other = PerImageStandardised().eval()
    assert classifier_outputs(other, x[:1])[1].shape == (1, 12)
    assert classifier_outputs(other, x[1:])[1].shape == (3, 12)


def test_an_arch_given_for_a_checkpoint_or_torchscript_says_it_is_not_used(tmp_path, caplog):
    # discover --arch resnet18 with a small_cnn checkpoint loaded the small_cnn without a word
    model = SmallCNN(1, 4, 28).eval()
    save_classifier(model, tmp_path / "ck.pt")
    torch.jit.trace(model, torch.rand(1, 1, 28, 28)).save(str(tmp_path / "ts.pt"))
    with caplog.at_level("WARNING", logger="spurfast.models"):
        load_classifier(tmp_path / "ck.pt", arch="small_cnn")
        assert "not used" not in caplog.text   # its own architecture: nothing to say
        load_classifier(tmp_path / "ck.pt", arch="resnet18")
        load_classifier(tmp_path / "ts.pt", arch="resnet18")
    assert "ck.pt is a spurfast checkpoint of a 'small_cnn' classifier: the architecture given ('resnet18')" in caplog.text
    assert "ts.pt is a TorchScript model: the architecture given ('resnet18') is for bare state_dicts" in caplog.text


def test_output_width_mismatch_is_caught():
    with pytest.raises(ValueError, match="expected \\(1, 10\\)"):
        check_output_width(SmallCNN(1, 4, 28), (1, 28, 28), 10)


@pytest.mark.parametrize("arch, options", [("small_cnn", {}), ("small_cnn", {"width": 8}), ("resnet18", {})],
                         ids=["small_cnn", "small_cnn-w8", "resnet18"])
def test_cpu_convolutions_run_channels_last_with_the_callers_layouts_values(arch, options):
    """On a CPU the convolutions read channels-last images (oneDNN's faster layout), with
    autograd (training) and without; a trace is fed the caller's layout.  The values agree
    with the caller's layout to the convolutions' summation order, and grey images (one
    layout either way) give the same bits."""
    torch.manual_seed(0)
    m = build_classifier(arch, 3, 5, 32, **options).eval()
    layouts = []
    first = m.conv1 if arch == "small_cnn" else m.net.conv1
    def channels_last_input(_, args):
        layouts.append(not args[0].is_contiguous() and args[0].is_contiguous(memory_format=torch.channels_last))
    hook = first.register_forward_pre_hook(channels_last_input)
    x = torch.rand(6, 3, 32, 32)
    logits, _ = classifier_outputs(m, x)
    with torch.enable_grad():
        m(x)
    assert layouts == [True, True]
    hook.remove()
    with torch.no_grad():
        callers_layout = torch.jit.trace(m, x)(x)
    torch.testing.assert_close(logits, callers_layout, rtol=1e-5, atol=1e-5)
    grey = build_classifier("small_cnn", 1, 5, 28, **options).eval()
    g = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        fast = grey(g)
    assert_bitwise(fast, grey(g).detach(), "grey images, without and with autograd")


@pytest.mark.parametrize("shape", [(5, 1, 7, 9), (5, 3, 7, 9), (0, 3, 4, 4), (2, 3, 1, 1)])
def test_channels_last_keeps_the_values_and_leaves_one_channel_as_it_is(shape):
    from spurfast.models.layout import channels_last
    x = torch.rand(shape)
    y = channels_last(x)
    n, c, h, w = shape
    assert_bitwise(y, x, "channels_last(x)")
    if c == 1:
        assert y.data_ptr() == x.data_ptr()
    elif h * w > 1:   # a 1x1 map has one layout
        assert y.stride()[1] == 1 and y.stride()[3] == c and y.stride()[2] == w * c
    assert channels_last(y).data_ptr() == y.data_ptr()   # already laid out: no copy


class _ViewsItsMaps(torch.nn.Module):
    """A user's model that .view()s a convolution's output: fails on channels-last images."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        h = self.conv(x)
        return self.fc(h.view(h.shape[0], -1))


class _ReadsRawMemory(torch.nn.Module):
    """Logits read from the input's memory as laid out: other values on channels-last images."""

    def forward(self, x):
        return torch.as_strided(x, (x.shape[0], 5), (x.stride(0), 1)).float() * 1.0


def test_other_models_get_channels_last_images_only_where_their_first_batch_gives_the_same_logits():
    from spurfast.models.outputs import _CHANNELS_LAST_OK
    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8)
    traced = torch.jit.trace(SmallCNN(3, 5, 8, width=4).eval(), x[:2])
    views, raw = _ViewsItsMaps().eval(), _ReadsRawMemory()
    for model in (traced, views, raw):
        with torch.no_grad():
            want = model(x)
        for _ in range(2):   # the first batch decides, the second uses the decision
            logits, _ = classifier_outputs(model, x)
            torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-6)
    assert _CHANNELS_LAST_OK[traced] is True
    assert _CHANNELS_LAST_OK[views] is False and _CHANNELS_LAST_OK[raw] is False
    assert_bitwise(classifier_outputs(views, x)[0], views(x).detach(), "a model left in the caller's layout")


class _CountsCalls(torch.nn.Module):
    """``inner`` with its forward calls counted."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.mark.parametrize("inner", ["conv", "views"])
def test_the_layout_check_s_forwards_serve_the_first_batch(inner):
    """The first batch runs both layouts once each, and one of them is its output: no third
    forward (a batch's time again for a user's ResNet-18 on a CPU); later batches one each."""
    torch.manual_seed(0)
    body = SmallCNN(3, 5, 8, width=4).eval() if inner == "conv" else _ViewsItsMaps().eval()
    model = _CountsCalls(body)
    x = torch.rand(6, 3, 8, 8)
    with torch.no_grad():
        want = body(x)
    logits, feats = classifier_outputs(model, x)
    assert model.calls == 2
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-6)
    assert feats is logits
    classifier_outputs(model, x)
    assert model.calls == 3


def test_resnet18_option():
    m = build_classifier("resnet18", 3, 5, 32).eval()
    logits, feats = classifier_outputs(m, torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 5) and feats.shape == (2, 512)


def test_vae_save_load_roundtrip(tmp_path):
    src = _toy(32)
    vae = train_vae(src, VAEConfig(1, 28, (8, 16), 4), epochs=1, batch_size=16, progress=False)
    save_vae(vae, tmp_path / "v.pt")
    v2 = load_vae(tmp_path / "v.pt")
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(v2.encode(x, backend="torch")[0], vae.encode(x, backend="torch")[0])
    torch.save({"x": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a spurfast VAE"):
        load_vae(tmp_path / "bad.pt")


def test_vae_loss_reads_uint8_images_as_the_vae_does():
    # the forward divides uint8 by 255; the loss took 0..255 as BCE targets and raised
    from spurfast.models.vae import vae_loss
    torch.manual_seed(0)
    vae = VAE(VAEConfig(1, 8, (4, 8), 3)).eval()
    x8 = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        recon, mu, logvar = vae(x8)
        got = vae_loss(recon, x8, mu, logvar)
        want = vae_loss(recon, x8.float() / 255, mu, logvar)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_a_compiled_model_saves_a_file_that_loads(tmp_path):
    # torch.compile's wrapper passed the checks (arch and config reach through it), but its
    # state_dict prefixed every key with _orig_mod.: the loaders refused the file just written
    torch.manual_seed(0)
    clf, vae = build_classifier("small_cnn", 1, 3, 8), VAE(VAEConfig(1, 8, (4, 8), 3))
    save_classifier(torch.compile(clf), tmp_path / "c.pt")
    save_vae(torch.compile(vae), tmp_path / "v.pt")
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(load_classifier(tmp_path / "c.pt")(x), clf.eval()(x))
    torch.testing.assert_close(load_vae(tmp_path / "v.pt").encode(x, backend="torch")[0],
                               vae.encode(x, backend="torch")[0])


@pytest.mark.parametrize("c,size,widths", [(3, 64, (32, 64, 128, 256)), (1, 28, (5, 12))])
def test_inference_encoder_matches_the_training_modules(c, size, widths):
    """vae.encode (the registry's encoder: channels-last convolutions on a CPU) gives the
    training path's NCHW modules' (mu, logvar): same math, same (C, H, W) flatten order."""
    torch.manual_seed(0)
    vae = VAE(VAEConfig(c, size, widths, 8)).eval()
    x = torch.randint(0, 256, (5, c, size, size), dtype=torch.uint8)
    with torch.no_grad():
        mu, logvar = vae.encode(x, backend="torch")
        want_mu, want_logvar = vae._encode_train(x)
    torch.testing.assert_close(mu, want_mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logvar, want_logvar, rtol=1e-5, atol=1e-5)


def test_stale_checkpoint_is_not_resumed(tmp_path, caplog):
    """A checkpoint left by another training run (other data, seed or model) is ignored,
    with a warning; the result equals a straight run of the new one."""
    a, b = _toy(seed=0), _toy(seed=1)   # same name, length, shape and labels: only the pixels differ
    ck = tmp_path / "m.ckpt"

    def same(m1, m2):
        return all(torch.equal(p, q) for p, q in zip(m1.state_dict().values(), m2.state_dict().values()))

    train_classifier(a, 3, epochs=1, batch_size=16, seed=0, checkpoint=ck, progress=False)
    for kw, src, what in (({"seed": 0}, b, "data"), ({"seed": 5}, b, "seed"), ({"seed": 5, "lr": 1e-3}, b, "lr")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="spurfast.train"):
            got = train_classifier(src, 3, epochs=1, batch_size=16, checkpoint=ck, progress=False, **kw)
        assert same(got, train_classifier(src, 3, epochs=1, batch_size=16, progress=False, **kw)), what
        assert f"ignoring checkpoint {ck}" in caplog.text and what in caplog.text
    # more epochs done than asked for: start afresh too
    train_classifier(b, 3, epochs=2, batch_size=16, seed=0, checkpoint=ck, progress=False)
    got = train_classifier(b, 3, epochs=1, batch_size=16, seed=0, checkpoint=ck, progress=False)
    assert same(got, train_classifier(b, 3, epochs=1, batch_size=16, seed=0, progress=False))
    # the VAE's checkpoint too: another config is another model
    train_vae(a, VAEConfig(1, 28, (8, 16), 4), epochs=1, batch_size=16, checkpoint=tmp_path / "v.ckpt", progress=False)
    got = train_vae(a, VAEConfig(1, 28, (8, 16), 6), epochs=1, batch_size=16, checkpoint=tmp_path / "v.ckpt",
                    progress=False)
    assert got.config.latent_dim == 6


def test_small_cnn_width_survives_save_and_load(tmp_path):
    model = SmallCNN(1, 10, 28, width=16).eval()
    save_classifier(model, tmp_path / "w16.pt")
    loaded = load_classifier(tmp_path / "w16.pt")
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x))
    assert loaded.arch["width"] == 16


def test_input_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="expects images of shape 1x28x28.*has 3x64x64"):
        check_output_width(SmallCNN(1, 10, 28), (3, 64, 64), 10)
    scripted = torch.jit.trace(SmallCNN(1, 10, 28).eval(), torch.rand(1, 1, 28, 28))  # no arch: a trial run
    with pytest.raises(ValueError, match="cannot run on images of shape 3x64x64"):
        check_output_width(scripted, (3, 64, 64), 10)


# ------------------------------------------------------------------ review fixes
def test_unsafe_load_accepts_torchscript_and_pickled_modules(tmp_path):
    """weights_only=False (--unsafe-load): torch.load returns the module itself (a ScriptModule
    for TorchScript, the nn.Module for a pickled one); it used to be rejected."""
    model = SmallCNN(1, 4, 28).eval()
    x = torch.rand(2, 1, 28, 28)
    torch.jit.trace(model, x).save(str(tmp_path / "ts.pt"))
    torch.save(model.train(), tmp_path / "full.pt")   # pickled while in train mode
    model.eval()
    for name in ("ts.pt", "full.pt"):
        got = load_classifier(tmp_path / name, weights_only=False)
        assert not got.training, name
        torch.testing.assert_close(got(x), model(x))


def test_state_dict_that_does_not_fit_is_named(tmp_path):
    torch.save(SmallCNN(1, 4, 28, width=16).state_dict(), tmp_path / "sd16.pt")
    for arch in ("small_cnn", "resnet18"):
        with pytest.raises(ValueError, match=rf"sd16\.pt.*{arch}.*in_channels=1, num_classes=4, image_size=28: "
                                             r"(size mismatch|Missing key)"):
            load_classifier(tmp_path / "sd16.pt", arch=arch, in_channels=1, num_classes=4, image_size=28)
    # a spurfast checkpoint whose arch record does not match its weights
    torch.save({"arch": SmallCNN(1, 4, 28).arch, "state_dict": SmallCNN(1, 4, 28, width=16).state_dict()},
               tmp_path / "ck.pt")
    with pytest.raises(ValueError, match=r"ck\.pt.*'small_cnn'.*size mismatch for conv1.weight"):
        load_classifier(tmp_path / "ck.pt")


def test_load_vae_rejects_foreign_files_naming_them(tmp_path):
    model = SmallCNN(1, 4, 28).eval()
    torch.jit.trace(model, torch.rand(1, 1, 28, 28)).save(str(tmp_path / "ts.pt"))
    torch.save(model, tmp_path / "module.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    vae = VAE(VAEConfig(1, 28, (8, 16), 4))
    save_vae(vae, tmp_path / "v.pt")
    data = (tmp_path / "v.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[:len(data) // 2])
    import warnings
    for name in ("junk.pt", "ts.pt", "module.pt", "trunc.pt"):
        with pytest.raises(ValueError, match=rf"{name}.*`spurfast train-vae`") as info, \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_vae(tmp_path / name)
        assert "weights_only` set to `False`" not in str(info.value)   # no advice to load unsafely
        # torch's "looks like a TorchScript archive" came before spurfast's own message
        assert not [w for w in caught if "TorchScript archive" in str(w.message)], name
    # weights that do not fit the recorded config
    torch.save({"config": json.dumps(VAEConfig(1, 28, (8, 16), 6).to_dict()), "state_dict": vae.state_dict()},
               tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match=r"mismatch\.pt.*size mismatch"):
        load_vae(tmp_path / "mismatch.pt")


def test_unreadable_images_are_left_out_of_training(caplog):
    """Rows the source found unreadable (bad_files) are dropped from each batch; the order of
    the others is the seeded one, exactly as without the bad file."""
    from spurfast.models.train import _batches

    n = 10
    x = (torch.arange(n, dtype=torch.float32) / 16).view(n, 1, 1, 1).expand(n, 1, 28, 28).contiguous()
    src = ArraySource(x, np.zeros(n, dtype=np.int64))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(7)).tolist()
    clean = [(b[0][:, 0, 0, 0] * 16).round().long().tolist() for b in _batches(src, 3, torch.Generator().manual_seed(7))]
    assert sum(clean, []) == order
    src.bad_files = {order[0]: "broken", order[4]: "broken", order[5]: "broken"}   # batch 2 keeps 1 row
    got = [(b[0][:, 0, 0, 0] * 16).round().long().tolist() for b in _batches(src, 3, torch.Generator().manual_seed(7))]
    assert got == [order[1:3], order[3:4], order[6:9], order[9:]]
    src.bad_files = {i: "broken" for i in order[:3]}   # a batch with nothing left is skipped
    got = [(b[0][:, 0, 0, 0] * 16).round().long().tolist() for b in _batches(src, 3, torch.Generator().manual_seed(7))]
    assert got == [order[3:6], order[6:9], order[9:]]


def test_unreadable_folder_image_is_not_trained_on(tmp_path, caplog):
    from PIL import Image
    from spurfast.data.folder import ImageFolderSource
    import spurfast.models.train as train

    rng = np.random.default_rng(0)
    for k in range(2):
        (tmp_path / f"c{k}").mkdir()
        for i in range(3):
            Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).save(tmp_path / f"c{k}/{i}.png")
    (tmp_path / "c1/broken.png").write_bytes(b"junk")
    src = ImageFolderSource(tmp_path, size=8, channels=1)
    seen = []
    real = train._batches

    def spy(*a, **k):
        for xb, yb in real(*a, **k):
            seen.append(xb)
            yield xb, yb
    with caplog.at_level("WARNING", logger="spurfast.train"):
        import unittest.mock as mock
        with mock.patch.object(train, "_batches", spy):
            train_classifier(src, 2, epochs=2, batch_size=4, seed=0, progress=False)
    assert src.bad_files and sum(len(b) for b in seen) == 2 * 6          # 7 files, 6 readable, 2 epochs
    assert all(float(im.abs().sum()) > 0 for b in seen for im in b)      # no black stand-in image
    summary = [r for r in caplog.records if r.name == "spurfast.train" and "unreadable" in r.getMessage()]
    assert len(summary) == 1 and "broken.png" in summary[0].getMessage()


def test_checkpoint_records_and_restores_cuda_rng(tmp_path, monkeypatch):
    """On CUDA the VAE's noise comes from the CUDA generator: the checkpoint keeps its state and
    a resume restores it (torch.cuda is faked here; a checkpoint without it still resumes)."""
    import spurfast.models.train as train

    cuda_state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [cuda_state.clone()])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i=0: restored.append((s.clone(), i)))
    state = train._rng_state("cuda")
    assert "cuda_rng" in state and "cuda_rng" not in train._rng_state("cpu")
    torch.save(state, tmp_path / "s.pt")
    train._set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True), "cuda")
    assert len(restored) == 1 and torch.equal(restored[0][0], cuda_state) and restored[0][1] == 0
    restored.clear()
    train._set_rng_state({"rng": torch.get_rng_state()}, "cuda")   # an older checkpoint: CPU state only
    assert not restored
    # the training loop writes these states and a resume hands them back (CPU run, CUDA faked in)
    seen = []
    monkeypatch.setattr(train, "_rng_state", lambda device: {**state, "rng": torch.get_rng_state()})
    real_set = train._set_rng_state
    monkeypatch.setattr(train, "_set_rng_state", lambda s, device: (seen.append(s), real_set(s, "cpu")))
    src = _toy(32)
    ck = tmp_path / "v.ckpt"
    train_vae(src, VAEConfig(1, 28, (8, 16), 4), epochs=1, batch_size=16, seed=3, checkpoint=ck, progress=False)
    resumed = train_vae(src, VAEConfig(1, 28, (8, 16), 4), epochs=2, batch_size=16, seed=3, checkpoint=ck,
                        progress=False)
    assert len(seen) == 1 and torch.equal(seen[0]["cuda_rng"][0], cuda_state)
    straight = train_vae(src, VAEConfig(1, 28, (8, 16), 4), epochs=2, batch_size=16, seed=3, progress=False)
    for pa, pb in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.gpu
def test_vae_resume_on_cuda_equals_straight_run(tmp_path):
    src = _toy(32)
    cfg = VAEConfig(1, 28, (8, 16), 4)
    kw = dict(batch_size=16, seed=3, device="cuda", progress=False)
    train_vae(src, cfg, epochs=1, checkpoint=tmp_path / "v.ckpt", **kw)
    resumed = train_vae(src, cfg, epochs=2, checkpoint=tmp_path / "v.ckpt", **kw)
    straight = train_vae(src, cfg, epochs=2, **kw)
    for pa, pb in zip(resumed.parameters(), straight.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


def test_ignored_checkpoint_is_moved_aside(tmp_path, caplog):
    src = _toy(32)
    ck = tmp_path / "m.ckpt"
    train_classifier(src, 3, epochs=3, batch_size=16, seed=0, checkpoint=ck, progress=False)
    with caplog.at_level("WARNING", logger="spurfast.train"):
        train_classifier(src, 3, epochs=1, batch_size=16, seed=0, checkpoint=ck, progress=False)
    (old,) = tmp_path.glob("m.ckpt.old-*")
    assert f"moved it to {old}" in caplog.text
    assert torch.load(old, weights_only=True)["epoch"] == 3      # the finished work survives
    assert torch.load(ck, weights_only=True)["epoch"] == 1


def test_a_checkpoint_set_aside_survives_a_second_mismatch_and_is_resumed(tmp_path, caplog):
    # a rerun with a mistyped seed moved the real run's checkpoint to .old, and the corrected rerun
    # moved the mistyped one's over it and trained every epoch again from scratch
    src = _toy(32)
    ck = tmp_path / "m.ckpt"
    straight = train_classifier(src, 3, epochs=3, batch_size=16, seed=0, progress=False)
    train_classifier(src, 3, epochs=2, batch_size=16, seed=0, checkpoint=ck, progress=False)
    train_classifier(src, 3, epochs=1, batch_size=16, seed=1, checkpoint=ck, progress=False)   # the typo
    with caplog.at_level("INFO", logger="spurfast.train"):
        model = train_classifier(src, 3, epochs=3, batch_size=16, seed=0, checkpoint=ck, progress=False)
    assert f"resumed {ck} at epoch 2" in caplog.text, caplog.text
    assert len(list(tmp_path.glob("m.ckpt.old-*"))) == 1   # the typo's, kept in turn
    for a, b in zip(model.state_dict().values(), straight.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoints_of_fewer_epochs_set_aside_in_turn_keep_the_longer_ones(tmp_path, caplog):
    # epochs 3, then 2, then 1 of one run: each shorter rerun set its predecessor aside under one
    # name, so the 1-epoch rerun overwrote the 3-epoch file; and asked for 3 again, the run
    # resumed its own 1-epoch checkpoint, never looking at the longer one set aside
    src = _toy(32)
    ck = tmp_path / "m.ckpt"
    kw = dict(batch_size=16, seed=0, checkpoint=ck, progress=False)
    for epochs in (3, 2, 1):
        train_classifier(src, 3, epochs=epochs, **kw)
    kept = sorted(torch.load(f, weights_only=True)["epoch"] for f in tmp_path.glob("m.ckpt.old-*"))
    assert kept == [2, 3], kept
    straight = train_classifier(src, 3, epochs=3, batch_size=16, seed=0, progress=False)
    with caplog.at_level("INFO", logger="spurfast.train"):
        model = train_classifier(src, 3, epochs=3, **kw)
    assert "holds this run's checkpoint (3 epochs)" in caplog.text, caplog.text
    assert "resumed" in caplog.text and "at epoch 3" in caplog.text, caplog.text
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), straight.state_dict().values()))
    # the 1-epoch one it held is kept aside in its place, and the 2-epoch one beside it
    kept = sorted(torch.load(f, weights_only=True)["epoch"] for f in tmp_path.glob("m.ckpt.old-*"))
    assert kept == [1, 2], kept


def test_vae_config_reads_one_number_for_every_channel_and_names_a_lone_width():
    # channels=32 raised a bare "'int' object is not iterable" from inside the check's own message,
    # and mean=0.5 / std=0.5 the same for a float
    cfg = VAEConfig(3, 32, (8, 16), 4, mean=0.5, std=np.float32(0.25))
    assert cfg.mean == (0.5,) and cfg.std == (0.25,)
    assert VAEConfig(1, 28, (8, 16), 4, mean=np.array([0.3])).mean == (0.3,)
    with pytest.raises(TypeError, match=r"channels must be a sequence of integer conv widths, e\.g\. \(32, 64\), got 32"):
        VAEConfig(1, 28, 32, 4)


def test_vae_config_reads_a_0d_tensor_and_names_a_string_mean_or_std():
    # a 0-d tensor failed iterating ("iteration over a 0-d tensor") and std="0.5" split into characters,
    # each naming neither field
    assert VAEConfig(1, 28, (8, 16), 4, mean=torch.tensor(0.25)).mean == (0.25,)
    assert VAEConfig(2, 28, (8, 16), 4, std=torch.tensor([0.5, 0.25])).std == (0.5, 0.25)
    for bad in ("0.5", [0.5, "0.5"], None):
        with pytest.raises(TypeError, match=r"VAEConfig std must be a number or a sequence of numbers"):
            VAEConfig(1, 28, (8, 16), 4, std=bad)


@pytest.mark.parametrize("kw,pattern", [
    ({"std": (0.0,)}, "std must be > 0"),
    ({"std": (0.5, -1.0, 0.5), "in_channels": 3, "mean": (0.5,)}, "std must be > 0"),
    ({"mean": (0.5, 0.5)}, "mean has 2 entries for in_channels=1"),
    ({"std": (0.5, 0.5), "in_channels": 3}, r"std has 2 entries for in_channels=3; expected 1 or 3"),
    ({"channels": ()}, "channels must list at least one"),
    ({"channels": (8, 0)}, "channels must list"),
])
def test_vae_config_rejects_bad_normalisation_and_channels(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        VAEConfig(**{"image_size": 28, "channels": (8, 16), **kw})


def test_save_classifier_needs_an_arch(tmp_path):
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    with pytest.raises(ValueError, match="no 'arch' record.*TorchScript"):
        save_classifier(plain, tmp_path / "p.pt")
    assert not (tmp_path / "p.pt").exists()
    torch.save({"arch": None, "state_dict": plain.state_dict()}, tmp_path / "old.pt")   # older spurfast wrote these
    with pytest.raises(ValueError, match="without its architecture record"):
        load_classifier(tmp_path / "old.pt")


# ------------------------------------------------------------------ review fixes (fifth round)
def test_training_on_nothing_fails_early(tmp_path):
    """An empty source, or one whose every image is unreadable, used to give a random-init VAE
    (saved by `spurfast train-vae`, exit 0) and a numpy error for the classifier."""
    from spurfast.data.folder import ImageFolderSource

    empty = ArraySource(np.zeros((0, 1, 28, 28), np.float32), np.zeros(0, np.int64), name="nothing")
    with pytest.raises(ValueError, match="nothing: no images to train on"):
        train_classifier(empty, 3, epochs=1, progress=False)
    with pytest.raises(ValueError, match="nothing: no images to train on"):
        train_vae(empty, epochs=1, progress=False)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        train_classifier(_toy(8), 3, epochs=1, batch_size=0, progress=False)
    (tmp_path / "pool/a").mkdir(parents=True)
    for i in range(3):
        (tmp_path / f"pool/a/{i}.png").write_bytes(b"junk")
    broken = ImageFolderSource(tmp_path / "pool", size=8, channels=1)
    ck = tmp_path / "v.ckpt"
    with pytest.raises(ValueError, match=r"VAE training on pool: none of its 3 images could be read \(e\.g\. .*0\.png"):
        train_vae(broken, VAEConfig(1, 8, (4, 8), 2), epochs=1, checkpoint=ck, progress=False)
    assert not ck.exists()   # nothing trained, nothing to resume


def test_too_few_readable_images_for_one_batch_are_counted_not_called_none(tmp_path):
    # ResNet-18 at 8 px trains on two images at once: one readable image left no batch, and the
    # error said "none of its 3 images could be read" beside the warning that one was
    from PIL import Image

    from spurfast.data.folder import ImageFolderSource
    for c in "ab":
        (tmp_path / "pool" / c).mkdir(parents=True)
    (tmp_path / "pool/a/0.png").write_bytes(b"junk")
    (tmp_path / "pool/a/1.png").write_bytes(b"junk")
    Image.new("L", (8, 8), 90).save(tmp_path / "pool/b/2.png")
    src = ImageFolderSource(tmp_path / "pool", size=8, channels=1)
    with pytest.raises(ValueError, match=r"classifier training on pool: only 1 of its 3 images could be read, "
                                         r"fewer than the 2 it trains on at once"):
        train_classifier(src, 2, arch="resnet18", epochs=1, progress=False)


def test_classifier_training_needs_square_images(tmp_path):
    """28xW images failed on the first batch (fc1 shape); others trained a model recorded as
    HxH, which then refused its own training images."""
    src = ArraySource(np.random.default_rng(0).random((4, 1, 28, 32), dtype=np.float32), np.array([0, 1, 0, 1]),
                      name="wide")
    for arch in ("small_cnn", "resnet18"):
        with pytest.raises(ValueError, match="wide: the classifier needs square images, got 28x32"):
            train_classifier(src, 2, arch=arch, epochs=1, progress=False)


def test_small_cnn_refuses_images_below_4x4():
    with pytest.raises(ValueError, match="small_cnn needs images of at least 4x4, got image_size=3"):
        build_classifier("small_cnn", 1, 2, 3)
    assert build_classifier("small_cnn", 1, 2, 4).eval()(torch.rand(1, 1, 4, 4)).shape == (1, 2)


def test_output_width_names_a_model_that_returns_a_tuple():
    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(784, 4)

        def forward(self, x):
            y = self.fc(x.flatten(1))
            return y, y

    with pytest.raises(ValueError, match="classifier outputs a tuple for one image; expected a tensor of logits"):
        check_output_width(torch.jit.script(Pair()), (1, 28, 28), 4)


@pytest.mark.parametrize("which", ["classifier", "vae"])
def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch, which):
    """A save cut short (Ctrl-C, disk full) left a truncated model file, which a later run
    (the evaluation's model cache) then failed to load every time."""
    import spurfast.models.files as files_mod

    path = tmp_path / "m.pt"
    if which == "classifier":
        model, save, load = SmallCNN(1, 4, 28).eval(), save_classifier, load_classifier
    else:
        model, save, load = VAE(VAEConfig(1, 28, (8, 16), 4)).eval(), save_vae, load_vae
    save(model, path)
    real_save = torch.save

    def dies_halfway(obj, f, *a, **k):   # f: the temporary file, open for writing
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(files_mod.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save(model, path)
    monkeypatch.setattr(files_mod.torch, "save", real_save)
    load(path)   # the previous file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_unreadable_checkpoint_is_moved_aside_not_a_crash(tmp_path, caplog):
    """A junk or emptied checkpoint crashed training with torch's own error (struct.error:
    'unpack requires a buffer of 4 bytes', naming no file); it is now set aside like a
    foreign one and the run equals a straight one."""
    src = _toy(32)
    ck = tmp_path / "m.ckpt"
    straight = train_classifier(src, 3, epochs=1, batch_size=16, seed=0, progress=False)
    for content in (b"junk", b""):
        ck.write_bytes(content)
        with caplog.at_level("WARNING", logger="spurfast.train"):
            got = train_classifier(src, 3, epochs=1, batch_size=16, seed=0, checkpoint=ck, progress=False)
        assert f"ignoring checkpoint {ck} and training afresh: it cannot be read" in caplog.text
        assert (tmp_path / "m.ckpt.old-unknown").read_bytes() == content
        assert all(torch.equal(p, q) for p, q in zip(got.parameters(), straight.parameters()))


def test_torchvision_resnet18_state_dict_loads_with_arch(tmp_path):
    """`--arch resnet18` with a state_dict of torchvision's ResNet-18 itself (keys conv1.weight,
    ...) was refused for missing keys net.conv1.weight, ...: only spurfast's wrapper's loaded."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    tv = resnet18(weights=None, num_classes=5).eval()
    torch.save(tv.state_dict(), tmp_path / "tv.pt")
    m = load_classifier(tmp_path / "tv.pt", arch="resnet18", in_channels=3, num_classes=5, image_size=128)
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(m(x), tv(x))
    # spurfast's own ResNet18 state_dict (keys net.*) still loads
    own = build_classifier("resnet18", 3, 5, 32).eval()
    torch.save(own.state_dict(), tmp_path / "own.pt")
    m2 = load_classifier(tmp_path / "own.pt", arch="resnet18", in_channels=3, num_classes=5, image_size=32)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m2(x), own(x))
    # below 128 px spurfast's resnet18 has a 3x3 stem: torch's size mismatch alone did not say why
    with pytest.raises(ValueError, match=r"size mismatch for net\.conv1\.weight.*its 7x7 stem is torchvision's; "
                                         r"spurfast's resnet18 has a 3x3 stem below 128 px"):
        load_classifier(tmp_path / "tv.pt", arch="resnet18", in_channels=3, num_classes=5, image_size=64)


def test_a_torchscript_classifier_loads_without_torchs_dispatch_warning(tmp_path, recwarn):
    # torch.load, tried first, warned "received a zip file that looks like a TorchScript archive" on
    # every TorchScript classifier: the file type this loader takes
    torch.jit.trace(SmallCNN(1, 3, 28).eval(), torch.rand(1, 1, 28, 28)).save(str(tmp_path / "ts.pt"))
    recwarn.clear()
    load_classifier(tmp_path / "ts.pt")
    assert not [w for w in recwarn if "TorchScript archive" in str(w.message)], [str(w.message) for w in recwarn]


def test_numpy_numbers_train_and_save(tmp_path):
    """num_classes = labels.max() + 1 (a numpy int) crashed the checkpoint's JSON after the first
    epoch; a numpy seed crashed the epoch generator; numpy VAEConfig ints crashed save_vae."""
    src = _toy(32)
    ck = tmp_path / "c.ckpt"
    got = train_classifier(src, src.labels().max() + 1, epochs=1, batch_size=np.int64(16), seed=np.int64(1),
                           lr=np.float32(2e-3), checkpoint=ck, progress=False)
    want = train_classifier(src, 3, epochs=1, batch_size=16, seed=1, lr=float(np.float32(2e-3)), progress=False)
    assert all(torch.equal(p, q) for p, q in zip(got.parameters(), want.parameters()))
    assert torch.load(ck, weights_only=True)["epoch"] == 1
    cfg = VAEConfig(np.int64(1), np.int64(28), (8, 16), np.int64(4))
    vae = train_vae(src, cfg, epochs=1, batch_size=16, beta=np.float32(1.0), checkpoint=tmp_path / "v.ckpt",
                    progress=False)
    save_vae(vae, tmp_path / "v.pt")
    assert load_vae(tmp_path / "v.pt").config == cfg
    with pytest.raises(TypeError, match="must be integers, got 1, 28.0 and 16"):
        VAEConfig(1, 28.0)


def test_output_width_mismatch_names_the_classifier():
    with pytest.raises(ValueError, match=r"classifier clf\.pt outputs shape \(1, 4\) for one image; expected \(1, 10\)"):
        check_output_width(SmallCNN(1, 4, 28), (1, 28, 28), 10, name="classifier clf.pt")


def test_a_directory_given_as_a_model_is_named_as_one(tmp_path):
    (tmp_path / "models").mkdir()
    with pytest.raises(IsADirectoryError, match="classifier file .*models is a directory"):
        load_classifier(tmp_path / "models")
    with pytest.raises(IsADirectoryError, match="VAE file .*models is a directory"):
        load_vae(tmp_path / "models")


def test_a_pipe_or_device_given_as_a_model_is_named_as_one(tmp_path):
    # /dev/null or <(cat clf.pt) was said not to exist (the CLI's --pool already said what it is)
    import os

    fifo = tmp_path / "clf.pipe"
    os.mkfifo(fifo)
    for path in ("/dev/null", fifo):
        with pytest.raises(ValueError, match=f"classifier file {path} is not a regular file \\(a pipe or a device\\)"):
            load_classifier(path)
        with pytest.raises(ValueError, match=f"VAE file {path} is not a regular file"):
            load_vae(path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int16])
def test_vae_refuses_integer_images_other_than_uint8(dtype):
    # uint8 is read as [0, 255] and floats as [0, 1]; int64 pixels 0..255 (torch.randint's
    # default dtype) were taken as [0, 1] floats (255x too bright): wrong latents, silently
    # (the Triton encoder refuses them)
    torch.manual_seed(0)
    vae = VAE(VAEConfig(1, 28, (8, 16), 4)).eval()
    x8 = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    vae.encode(x8, backend="torch")
    with pytest.raises(TypeError, match=f"encoder input dtype {dtype} is unsupported; expected uint8"):
        vae.encode(x8.to(dtype), backend="torch")
    with pytest.raises(TypeError, match=f"encoder input dtype {dtype} is unsupported"):
        vae(x8.to(dtype))
    vae.encode(x8 > 127, backend="torch")   # bool images are 0/1, in [0, 1] like floats


def test_resnet18_at_8px_trains_with_a_last_batch_of_one():
    """At <= 8 px layer4's map is 1x1, so batch norm cannot train on one image: 17 images in
    batches of 16 left a last batch of one, which crashed; it now joins the batch before."""
    g = torch.Generator().manual_seed(0)
    src = ArraySource(torch.rand(17, 3, 8, 8, generator=g), (torch.arange(17) % 2).numpy())
    model = train_classifier(src, 2, arch="resnet18", batch_size=16, epochs=1, progress=False)
    assert model(torch.rand(2, 3, 8, 8)).shape == (2, 2)
    one = ArraySource(torch.rand(1, 3, 8, 8, generator=g), np.zeros(1, dtype=np.int64), name="lone")
    with pytest.raises(ValueError, match=r"lone: resnet18 at image_size=8 trains on at least 2 images.*got 1"):
        train_classifier(one, 2, arch="resnet18", epochs=1, progress=False)


def test_batches_too_short_to_train_on_join_a_neighbour(caplog):
    """min_batch > 1: a short last batch joins the one before; a batch left short by unreadable
    images joins the next; what is left at the end is logged.  min_batch=1 batches as before."""
    from spurfast.models.train import _batches

    n = 10
    x = (torch.arange(n, dtype=torch.float32) / 16).view(n, 1, 1, 1)
    src = ArraySource(x, np.zeros(n, dtype=np.int64), name="ten")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(7)).tolist()

    def ids(**kw):
        return [(b[0].flatten() * 16).round().long().tolist()
                for b in _batches(src, 3, torch.Generator().manual_seed(7), **kw)]

    assert ids() == ids(min_batch=1) == [order[0:3], order[3:6], order[6:9], order[9:]]
    assert ids(min_batch=2) == [order[0:3], order[3:6], order[6:10]]
    src.bad_files = {order[3]: "broken", order[4]: "broken"}   # the second batch keeps one image
    assert ids(min_batch=2) == [order[0:3], [order[5]] + order[6:10]]
    src.bad_files = {i: "broken" for i in order[7:10]}          # the last batch keeps one image
    with caplog.at_level("WARNING", logger="spurfast.train"):
        assert ids(min_batch=2) == [order[0:3], order[3:6]]
    assert "ten: 1 readable image(s) of the last batch left out of this epoch" in caplog.text


def _save_many(target, path, kind, rounds):
    from spurfast.models.files import save_atomic
    from spurfast.models.train import _checkpoint

    errors = []
    for i in range(rounds):
        try:
            if kind == "save_atomic":
                save_atomic({"w": target}, path)
            else:
                _checkpoint(path, {"w": target})
        except Exception as exc:
            errors.append(repr(exc))
    return errors


def test_the_same_model_saved_twice_is_the_same_file(tmp_path):
    """torch.save(obj, path) names the archive's records after the file: the temporary name
    (pid, random hex) made every save of equal weights a file of other bytes."""
    model = SmallCNN(1, 4, 28)
    save_classifier(model, tmp_path / "a.pt")
    first = (tmp_path / "a.pt").read_bytes()
    save_classifier(model, tmp_path / "a.pt")
    assert (tmp_path / "a.pt").read_bytes() == first
    save_classifier(model, tmp_path / "b.pt")
    assert (tmp_path / "b.pt").read_bytes() == first


@pytest.mark.parametrize("kind", ["save_atomic", "checkpoint"])
def test_concurrent_saves_of_one_path_do_not_collide(tmp_path, kind):
    """Two processes saving one model file (or checkpoint): with one fixed '<name>.tmp' a
    writer's rename moved the other's temporary file away (16 of 80 saves failed)."""
    import multiprocessing as mp
    from pathlib import Path

    path = Path(tmp_path / "model.pt")
    big = torch.arange(1 << 20, dtype=torch.float32)   # 4 MB: the writes overlap
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        results = pool.starmap(_save_many, [(big, path, kind, 25)] * 2)
    assert results == [[], []]
    torch.testing.assert_close(torch.load(path, weights_only=True)["w"], big)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]   # no temporary file left behind


def test_vae_and_classifier_that_cannot_be_allocated_name_their_settings():
    with pytest.raises(TypeError, match=r"channels must be a sequence of integer conv widths, .*got \(8\.7,\)"):
        VAEConfig(channels=(8.7,))
    with pytest.raises(ValueError, match=r"cannot build a VAE for 1x100000x100000 images .*allocate"):
        VAE(VAEConfig.for_images(1, 100000))
    with pytest.raises(ValueError, match=r"cannot build classifier 'small_cnn' .*num_classes=1099511627777.*allocate"):
        build_classifier("small_cnn", 1, 2 ** 40 + 1, 28)
    # 4.5 classes was blamed on the options ("does not take options []"); 0 built a model of no logit
    for args, want in (((1, 4.5, 28), "num_classes must be an integer >= 1, got 4.5"),
                       ((1, 0, 28), "num_classes must be an integer >= 1, got 0"),
                       ((0, 3, 28), "in_channels must be an integer >= 1, got 0"),
                       ((1, 3, 0), "image_size must be an integer >= 1, got 0")):
        with pytest.raises(ValueError, match=f"^build_classifier: {want}$"):
            build_classifier("small_cnn", *args)


def test_saving_and_loading_live_in_models_files_and_stay_importable_from_their_old_homes():
    import spurfast.models.classifier as classifier
    import spurfast.models.files as files
    import spurfast.models.outputs as outputs
    import spurfast.models.train as train

    for name in ("load_classifier", "save_atomic", "save_classifier", "torch_error_gist"):
        assert getattr(classifier, name) is getattr(files, name)
    for name in ("save_vae", "load_vae", "save_classifier"):
        assert getattr(train, name) is getattr(files, name)
    for name in ("classifier_outputs", "output_width", "check_output_width"):
        assert getattr(classifier, name) is getattr(outputs, name)


@pytest.mark.parametrize("epochs", [0, 2.0, -1, True])
def test_a_count_of_epochs_that_is_not_one_or_more_is_refused(epochs):
    # 0 returned the random initial weights as a trained model; 2.0 failed in range() unnamed
    with pytest.raises(ValueError, match=rf"epochs must be an integer >= 1, got {epochs!r}"):
        train_classifier(_toy(), 3, epochs=epochs, batch_size=16, seed=1, progress=False)
    with pytest.raises(ValueError, match=rf"epochs must be an integer >= 1, got {epochs!r}"):
        train_vae(_toy(), VAEConfig(1, 28, (4,), 2), epochs=epochs, batch_size=16, seed=1, progress=False)


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), 0.0, -1e-3, "0.01"])
def test_a_learning_rate_that_cannot_train_is_refused(lr):
    # inf and NaN trained to NaN weights, returned as a model without a word
    with pytest.raises(ValueError, match=r"classifier: lr must be a (finite number > 0|number), got"):
        train_classifier(_toy(), 3, epochs=1, batch_size=16, lr=lr, seed=1, progress=False)
    with pytest.raises(ValueError, match=r"VAE: lr must be a (finite number > 0|number), got"):
        train_vae(_toy(), VAEConfig(1, 28, (4,), 2), epochs=1, batch_size=16, lr=lr, seed=1, progress=False)
    for beta in (float("nan"), -1.0, float("inf")):
        with pytest.raises(ValueError, match=r"VAE: beta must be a finite number >= 0"):
            train_vae(_toy(), VAEConfig(1, 28, (4,), 2), epochs=1, batch_size=16, beta=beta, seed=1, progress=False)


def test_a_malformed_checkpoint_or_junk_file_is_named_not_a_traceback(tmp_path):
    """An arch record without its keys was a KeyError, a state_dict that is a list a TypeError, an
    unknown architecture a ValueError naming no file; a text file's error read only "101"."""
    good = SmallCNN(1, 4, 28)
    save_classifier(good, tmp_path / "c.pt")
    ck = torch.load(tmp_path / "c.pt", weights_only=True)
    arch = ck["arch"]
    for change, says in ((dict(arch={k: v for k, v in arch.items() if k != "in_channels"}), "arch record lacks in_channels"),
                         (dict(state_dict=[1, 2]), "its state_dict is a list"),
                         (dict(arch={**arch, "name": "vgg"}), "arch record cannot be rebuilt: unknown classifier")):
        torch.save({**ck, **change}, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match=rf"bad\.pt.*{says}"):
            load_classifier(tmp_path / "bad.pt")
    (tmp_path / "text.pt").write_text("hello")   # torch: KeyError(101), "101" alone
    with pytest.raises(ValueError, match=r"neither TorchScript .*: [A-Za-z]"):
        load_classifier(tmp_path / "text.pt")


def test_training_and_loading_leave_the_callers_random_state_alone(tmp_path):
    """Training reset torch's and numpy's global generators to spurfast's seed (what the caller
    drew next no longer followed its own seed), and loading a model drew its random initial
    weights from torch's.  The trained weights are as before: the seed still makes them."""
    src = _toy()

    def after(fn, caller_seed):
        torch.manual_seed(caller_seed)
        np.random.seed(caller_seed)
        out = fn()
        return torch.rand(3).tolist(), np.random.rand(2).tolist(), out

    def untouched(caller_seed):
        return list(after(lambda: None, caller_seed)[:2])

    clf = None
    for seed in (1, 2):
        *drawn, clf = after(lambda: train_classifier(src, 3, epochs=1, seed=7, progress=False), seed)
        assert drawn == untouched(seed)
        *drawn, vae = after(lambda: train_vae(src, VAEConfig(1, 28, (4, 8), 2), epochs=1, seed=7, progress=False),
                            seed)
        assert drawn == untouched(seed)
    again = train_classifier(src, 3, epochs=1, seed=7, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(clf.state_dict().values(), again.state_dict().values()))
    save_classifier(clf, tmp_path / "c.pt")
    save_vae(vae, tmp_path / "v.pt")
    assert list(after(lambda: load_classifier(tmp_path / "c.pt"), 3)[:2]) == untouched(3)
    assert list(after(lambda: load_vae(tmp_path / "v.pt"), 3)[:2]) == untouched(3)


@pytest.mark.parametrize("train", [train_classifier, train_vae])
def test_a_training_seed_past_the_generators_range_is_refused_naming_it(train):
    """2**62 failed as torch's "Overflow when unpacking long long" (epoch e is seeded with
    seed * 1000 + e), after the model was built; the CLI checked it, the API did not."""
    src = ArraySource(torch.rand(8, 1, 28, 28), np.arange(8) % 2)
    args = (src, 2) if train is train_classifier else (src,)
    with pytest.raises(ValueError, match=r"seed must be an integer from 0 to 18446744073709550 .*got 4611686018427387904"):
        train(*args, epochs=1, seed=2 ** 62, progress=False)


def test_training_counts_and_seeds_are_named_when_not_whole_numbers():
    # operator.index's "'float' object cannot be interpreted as an integer" named no argument
    src = ArraySource(torch.rand(8, 1, 8, 8), np.arange(8) % 2)
    with pytest.raises(ValueError, match=r"train_classifier: num_classes must be an integer, got 2\.5"):
        train_classifier(src, 2.5, epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"classifier: seed must be an integer, got 1\.5"):
        train_classifier(src, 2, epochs=1, seed=1.5, progress=False)
    with pytest.raises(ValueError, match=r"VAE: seed must be an integer, got '1'"):
        train_vae(src, VAEConfig(1, 8, (4, 8), 3), epochs=1, seed="1", progress=False)
    a = train_classifier(src, 2.0, epochs=1, seed=3.0, progress=False)   # whole floats are those integers
    b = train_classifier(src, torch.tensor(1) + 1, epochs=1, seed=3, progress=False)   # labels.max() + 1 of torch
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_epoch_seeds_keep_the_first_thousand_and_past_them_overlap_no_other_seed_nor_overflow():
    """seed * 1000 + epoch went on past epoch 999: epoch 1000 of seed 0 shuffled as epoch 0 of
    seed 1, and the largest seed overflowed 64 bits at epoch 1000 (after that much work)."""
    from spurfast.models.train import MAX_SEED, epoch_seed
    assert [epoch_seed(7, e) for e in (0, 1, 999)] == [7000, 7001, 7999]   # every trained model's order
    assert epoch_seed(0, 1000) != epoch_seed(1, 0) and epoch_seed(0, 1001) != epoch_seed(0, 1000)
    for seed in (0, MAX_SEED):
        for e in (1000, 5000):
            torch.Generator().manual_seed(epoch_seed(seed, e))   # raised "Overflow" for MAX_SEED
    assert epoch_seed(3, 1234) == epoch_seed(3, 1234)


@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (4, 3, 2, 2), (1, 8, 28, 28), (2, 2, 5, 4)])
def test_the_cpu_relu_pool_is_max_pool2d_of_relu_value_for_value(shape):
    # SmallCNN's inference pooling: strided maxima, then the ReLU (2.6x the forward at 28x28)
    from torch.nn import functional as F

    from spurfast.models.classifier import _relu_pool

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0, 0] = float("nan")   # NaN propagates as max_pool2d's does
    x[-1, -1, 0, 1] = -0.0
    with torch.no_grad():
        got, want = _relu_pool(x), F.max_pool2d(F.relu(x), 2)
    assert got.shape == want.shape and torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))


def test_small_cnn_gives_the_same_outputs_with_and_without_autograd_scripted_and_traced():
    torch.manual_seed(0)
    for c, size in ((1, 28), (3, 17)):
        model = SmallCNN(c, 5, size).eval()
        x = torch.rand(33, c, size, size)
        with torch.no_grad():
            fast = model(x)
        slow = model(x)
        assert slow.requires_grad
        if c == 1:   # one layout either way
            assert_bitwise(fast, slow.detach(), "grey images without and with autograd")
        else:        # oneDNN's training and inference convolutions: the same values up to summation order
            torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-6)
        slow.sum().backward()   # the training path keeps max_pool2d's gradient
        assert model.conv1.weight.grad is not None
        with torch.no_grad():
            assert_bitwise(torch.jit.script(model)(x), fast, "scripted")
            # a trace is fed the caller's layout (tracing skips the switch): RGB up to summation order
            torch.testing.assert_close(torch.jit.trace(model, x[:4])(x), fast, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("trainer", ["classifier", "vae"])
def test_a_checkpoint_path_that_cannot_be_one_is_refused_before_training(tmp_path, trainer):
    # a folder given as the checkpoint was moved aside as an "unreadable checkpoint" and a file
    # written in its place; a path under a file failed after the first epoch, naming a .tmp file
    src = _toy()

    def train(ck, device="cpu"):
        if trainer == "vae":
            return train_vae(src, VAEConfig.for_images(1, 28, 2), epochs=1, batch_size=16, checkpoint=ck,
                             device=device, progress=False)
        return train_classifier(src, 3, epochs=1, batch_size=16, checkpoint=ck, device=device, progress=False)

    folder = tmp_path / "ckpts"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep")
    with pytest.raises(IsADirectoryError, match=f"checkpoint {folder} names a folder"):
        train(folder)
    assert (folder / "mine.txt").read_text() == "keep" and not list(tmp_path.glob("ckpts.old-*"))
    (tmp_path / "afile").write_text("")
    with pytest.raises(NotADirectoryError, match="afile is a file, not a folder"):
        train(tmp_path / "afile" / "c.ckpt")
    with pytest.raises(ValueError, match="device 'meta'.*torch cannot compute there"):
        train(tmp_path / "c.ckpt", device="meta")
    train(tmp_path / "new" / "c.ckpt")   # a folder not made yet is made
    assert (tmp_path / "new" / "c.ckpt").is_file()


def test_saving_a_model_over_a_folder_or_of_the_wrong_kind_names_it(tmp_path):
    with pytest.raises(IsADirectoryError, match=f"cannot save to {tmp_path}: it is a folder"):
        save_classifier(build_classifier("small_cnn", 1, 3, 28), tmp_path)
    with pytest.raises(TypeError, match="save_vae takes a spurfast VAE, got a SmallCNN"):   # AttributeError 'config'
        save_vae(build_classifier("small_cnn", 1, 3, 28), tmp_path / "v.pt")


def test_in_cpu_blocks_splits_a_cpu_batch_and_joins_the_outputs():
    from spurfast.models.layout import in_cpu_blocks

    seen = []

    def forward(x):
        seen.append(len(x))
        return x.sum(1), x * 2

    x = torch.arange(150 * 3, dtype=torch.float32).view(150, 3)
    total, doubled = in_cpu_blocks(forward, x, block=64)
    assert seen == [64, 64, 22]
    assert_bitwise(total, x.sum(1), "tuple output, first")
    assert_bitwise(doubled, x * 2, "tuple output, second")
    seen.clear()
    assert_bitwise(in_cpu_blocks(lambda z: forward(z)[0], x, block=64), x.sum(1), "tensor output")
    seen.clear()
    in_cpu_blocks(forward, x[:64], block=64)
    in_cpu_blocks(forward, torch.empty(150, 3, device="meta"), block=64)   # not a CPU: the whole batch
    assert seen == [64, 150]


@pytest.mark.parametrize("read", ["classifier_outputs", "model_logits"])
def test_a_cpu_batch_is_classified_in_blocks_with_the_values_of_one_call(read, monkeypatch):
    """On a CPU a batch of 256 runs through the classifier 64 images at a time (a traced
    SmallCNN-8 at RGB 64x64 classified 2.3x faster: `layout.CPU_BLOCK`), and each image gets
    the values one call over the whole batch gives it."""
    from spurfast.models import layout, outputs

    torch.manual_seed(0)
    m = build_classifier("small_cnn", 3, 5, 32, width=8).eval()
    sizes = []
    m.conv1.register_forward_pre_hook(lambda _, args: sizes.append(len(args[0])))
    x = torch.rand(150, 3, 32, 32)
    run = getattr(outputs, read)
    run(m, x[:1])   # model_logits's first call checks the layout on its images: one more forward
    sizes.clear()
    blocked = run(m, x)
    assert sizes == [64, 64, 22]
    monkeypatch.setattr(layout, "CPU_BLOCK", 10 ** 6)
    whole = run(m, x)
    assert sizes[3:] == [150]
    for a, b in zip(blocked if isinstance(blocked, tuple) else (blocked,), whole if isinstance(whole, tuple) else (whole,)):
        assert_bitwise(a, b, f"{read}: blocks of 64 against one call")
