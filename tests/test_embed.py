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


def test_nan_classifier_outputs_are_refused(tmp_path):
    # argmax of NaN probabilities is class 0: every such image would be "called" class 0
    src, clf, vae = _setup(10)
    with torch.no_grad():
        clf.fc2.bias[1] = float("nan")
    with pytest.raises(ValueError, match=r"classifier produced NaN/inf outputs for pool indices \[0, 1, 2"):
        embed_pool(src, clf, vae, tmp_path / "n", num_classes=4, progress=False)


def test_partial_in_place_edits_are_told_apart(tmp_path):
    """The content digest covers the whole pool: every array byte, every file's size (a
    replaced file almost always changes size), not only a sample of 8 items."""
    import os

    from PIL import Image

    from spurfast.data.folder import ImageFolderSource
    from spurfast.data.sources import content_digest

    src, _, _ = _setup(50)
    images = src.images.clone()
    images[17, 0, 3, 3] += 0.25   # not one of the 8 sampled items
    assert content_digest(ArraySource(images, np.arange(50) % 4)) != content_digest(src)
    rng = np.random.default_rng(0)
    (tmp_path / "p" / "a").mkdir(parents=True)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(tmp_path / "p" / "a" / f"{i:02d}.png")
    before = content_digest(ImageFolderSource(tmp_path / "p", size=8))
    f = tmp_path / "p" / "a" / "05.png"
    stat = f.stat()
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(f)   # a replaced file, same name and mtime
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert content_digest(ImageFolderSource(tmp_path / "p", size=8)) != before


def test_store_with_the_earlier_sampled_digest_resumes(tmp_path):
    import json

    from spurfast.data.sources import content_digest, sampled_digest
    from spurfast.embed import MANIFEST

    src, clf, vae = _setup()
    embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=16, progress=False, stop_after=1)
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    manifest["content"] = sampled_digest(src)    # as the tenth session wrote it
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(manifest))
    assert embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, progress=False).complete
    assert json.loads((tmp_path / "s" / MANIFEST).read_text())["content"] == content_digest(src)


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
