"""run_discovery's early refusals, for API users as for the CLI."""
import numpy as np
import pytest
import torch
from PIL import Image

from spurfast.data import ArraySource
from spurfast.data.folder import ImageFolderSource
from spurfast.models import VAE, VAEConfig, SmallCNN
from spurfast.pipeline import run_discovery


def _folder(root, n=12):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return ImageFolderSource(root, size=16)


@pytest.mark.parametrize("where", ["pool", "clean"])
def test_output_inside_a_folder_the_run_reads_is_refused(tmp_path, where):
    # its report images would become pool images the next time round
    torch.manual_seed(0)
    pool, clean = _folder(tmp_path / "pool"), _folder(tmp_path / "clean")
    out = (tmp_path / where / "run") if where == "pool" else (tmp_path / "clean" / "deeper" / "run")
    with pytest.raises(ValueError, match=f"inside image folder {tmp_path / where}"):
        run_discovery(pool, SmallCNN(3, 2, 16), VAE(VAEConfig.for_images(3, 16, 4)), out, num_classes=2,
                      clean=clean, progress=False)
    assert not out.exists()


def test_a_vae_for_other_images_is_refused_before_any_work(tmp_path):
    pool = ArraySource(torch.rand(8, 1, 28, 32), np.zeros(8, dtype=np.int64), name="wide")
    with pytest.raises(ValueError, match=r"VAE expects 1x28x28 images.*the pool \(wide\) has 1x28x32"):
        run_discovery(pool, SmallCNN(1, 2, 28), VAE(VAEConfig.for_images(1, 28, 4)), tmp_path / "o", num_classes=2,
                      progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["abc", "-3", "1.5", True, ""])
def test_make_planted_data_refuses_a_bad_n_poisoned_before_loading(value, monkeypatch):
    # API users (run_demo, make_planted_data) get the CLI's message, not int()'s
    import spurfast.pipeline as P
    monkeypatch.setattr(P, "load_digits", lambda *a, **k: pytest.fail("data loaded before the check"))
    with pytest.raises(ValueError, match="n_poisoned: expected an integer >= 0 or 'all'"):
        P.make_planted_data("digits", n_poisoned=value)


@pytest.mark.parametrize("case", ["empty", "shape"])
def test_a_bad_clean_set_is_refused_before_any_work(tmp_path, case):
    # it was refused by confirmation, after the embedding pass and discovery, with no findings.json
    torch.manual_seed(0)
    pool = ArraySource(torch.rand(12, 1, 16, 16), np.arange(12) % 2, name="pool")
    clean = ArraySource(torch.rand(0 if case == "empty" else 5, 1, 16 if case == "empty" else 20, 16),
                        np.zeros(0 if case == "empty" else 5, int), name="clean-set")
    want = "clean set clean-set is empty" if case == "empty" else r"clean set clean-set has images of shape 1x20x16"
    with pytest.raises(ValueError, match=want):
        run_discovery(pool, SmallCNN(1, 2, 16), VAE(VAEConfig.for_images(1, 16, 4)), tmp_path / "run", num_classes=2,
                      clean=clean, progress=False)
    assert not (tmp_path / "run").exists()
