import numpy as np
import pytest
import torch

from spurfast.data import ArraySource
from spurfast.models import VAE, VAEConfig, SmallCNN, build_classifier, load_classifier
from spurfast.models.classifier import check_output_width, classifier_outputs, save_classifier
from spurfast.models.train import load_vae, save_vae, train_classifier, train_vae


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


def test_classifier_training_is_seeded_and_learns(tmp_path):
    src = _toy()
    a = train_classifier(src, 3, epochs=3, batch_size=16, seed=1, progress=False)
    b = train_classifier(src, 3, epochs=3, batch_size=16, seed=1, progress=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    x, y = src.get_batch(np.arange(len(src)))
    assert float((a(x).argmax(1) == y).float().mean()) > 0.9


def test_checkpoint_resume_equals_straight_run(tmp_path):
    src = _toy()
    ck = tmp_path / "c.ckpt"
    train_classifier(src, 3, epochs=1, batch_size=16, seed=2, checkpoint=ck, progress=False)
    resumed = train_classifier(src, 3, epochs=2, batch_size=16, seed=2, checkpoint=ck, progress=False)
    straight = train_classifier(src, 3, epochs=2, batch_size=16, seed=2, progress=False)
    for pa, pb in zip(resumed.parameters(), straight.parameters()):
        torch.testing.assert_close(pa, pb)


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
    with pytest.raises(ValueError, match="neither TorchScript"):
        load_classifier(tmp_path / "junk.pt")


def test_output_width_mismatch_is_caught():
    with pytest.raises(ValueError, match="expected \\(1, 10\\)"):
        check_output_width(SmallCNN(1, 4, 28), (1, 28, 28), 10)


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
