import numpy as np
import pytest
import torch

from spurfast.data import ArraySource
from spurfast.embed import EmbeddingStore, embed_pool
from spurfast.models import VAE, VAEConfig, SmallCNN


def _setup(n=50):
    torch.manual_seed(0)
    src = ArraySource(torch.rand(n, 1, 28, 28), np.arange(n) % 4)
    return src, SmallCNN(1, 4, 28).eval(), VAE(VAEConfig(1, 28, (8, 16), 6)).eval()


def test_interrupted_pass_resumes_to_the_same_store(tmp_path):
    src, clf, vae = _setup()
    full = embed_pool(src, clf, vae, tmp_path / "a", num_classes=4, batch_size=8, progress=False)
    part = embed_pool(src, clf, vae, tmp_path / "b", num_classes=4, batch_size=8, progress=False, stop_after=3)
    assert part.done == 24 and not part.complete
    # finished work survives: the first 24 rows are on disk before resuming
    np.testing.assert_array_equal(EmbeddingStore(tmp_path / "b")["pred"][:24], full["pred"][:24])
    resumed = embed_pool(src, clf, vae, tmp_path / "b", num_classes=4, batch_size=8, progress=False)
    assert resumed.complete
    for col in ("pred", "conf", "probs", "mu", "feats", "labels", "ok"):
        np.testing.assert_array_equal(np.asarray(resumed[col]), np.asarray(full[col]), err_msg=col)


def test_store_from_other_models_is_refused(tmp_path):
    src, clf, vae = _setup()
    embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=16, progress=False, stop_after=1)
    other = SmallCNN(1, 4, 28).eval()
    with pytest.raises(ValueError, match="other models or another pool"):
        embed_pool(src, other, vae, tmp_path / "s", num_classes=4, progress=False)


def test_store_of_a_pool_regenerated_in_place_is_refused(tmp_path):
    # same name, length, shape and ids, other images: resuming would mix the two pools
    src, clf, vae = _setup()
    embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=16, progress=False, stop_after=1)
    torch.manual_seed(1)
    other = ArraySource(torch.rand(50, 1, 28, 28), np.arange(50) % 4)
    with pytest.raises(ValueError, match="other images under the same names"):
        embed_pool(other, clf, vae, tmp_path / "s", num_classes=4, progress=False)


def test_folder_pool_regenerated_in_place_is_refused(tmp_path):
    from spurfast.data.folder import ImageFolderSource
    from spurfast.make_pool import PoolSpec, make_pool

    torch.manual_seed(0)
    clf, vae = SmallCNN(3, 10, 32).eval(), VAE(VAEConfig.for_images(3, 32, 6)).eval()
    make_pool(tmp_path / "pool", PoolSpec(n=24, seed=0), workers=1, progress=False)
    embed_pool(ImageFolderSource(tmp_path / "pool", size=32), clf, vae, tmp_path / "s", num_classes=10, batch_size=8,
               progress=False, num_workers=1, stop_after=1)
    make_pool(tmp_path / "pool", PoolSpec(n=24, seed=1), workers=1, progress=False, overwrite=True)
    with pytest.raises(ValueError, match="other images under the same names"):
        embed_pool(ImageFolderSource(tmp_path / "pool", size=32), clf, vae, tmp_path / "s", num_classes=10,
                   progress=False, num_workers=1)


def test_output_width_and_nan_latents(tmp_path):
    src, clf, vae = _setup(10)
    with pytest.raises(ValueError, match="expected 7 classes"):
        embed_pool(src, clf, vae, tmp_path / "w", num_classes=7, progress=False)
    with torch.no_grad():
        vae.fc_mu.bias[0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf latents"):
        embed_pool(src, clf, vae, tmp_path / "n", num_classes=4, progress=False)


def test_not_a_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an embedding store"):
        EmbeddingStore(tmp_path)


def test_pass_reports_where_its_time_went(tmp_path):
    import time

    src, clf, vae = _setup()
    split = {}
    t0 = time.perf_counter()
    embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=8, progress=False, timings=split)
    wall = time.perf_counter() - t0
    assert set(split) == {"load_wait_s", "compute_s", "write_s"}
    assert all(v > 0 for v in split.values()), split
    assert sum(split.values()) <= wall, (split, wall)
