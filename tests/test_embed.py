import json

import numpy as np
import pytest
import torch

from spurfast.data import ArraySource
from spurfast.store import EmbeddingStore
from spurfast.embed import embed_pool
from spurfast.models import VAE, VAEConfig, SmallCNN
from spurfast.models.outputs import check_output_width


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


def test_a_store_folder_that_is_a_file_or_a_device_not_here_is_refused_first(tmp_path):
    # a file as store_dir failed in mkdir with a bare "File exists"; "meta" in torch, naming nothing
    src, clf, vae = _setup(8)
    (tmp_path / "f").write_text("")
    with pytest.raises(NotADirectoryError, match=r"embed_pool: store_dir .*f is a file, not a folder"):
        embed_pool(src, clf, vae, tmp_path / "f", num_classes=4, progress=False)
    with pytest.raises(ValueError, match=r"embed_pool: device 'meta'.*torch cannot compute there"):
        embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, device="meta", progress=False)
    assert not (tmp_path / "s").exists()


def test_a_store_resumed_on_another_device_says_it_mixes_two_computes(tmp_path, caplog):
    """The store recorded neither device nor encoder: one begun on a GPU (Triton) and resumed
    on the CPU (the torch reference) mixed rows that differ a little, without a word."""
    import logging

    from spurfast.store import MANIFEST
    src, clf, vae = _setup()
    part = embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=16, progress=False, stop_after=1)
    assert part.manifest["compute"] == "cpu:torch"
    with caplog.at_level(logging.WARNING, logger="spurfast.embed"):
        embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=16, progress=False, stop_after=2)
    assert "computing on" not in caplog.text   # the same compute: nothing to say
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(dict(manifest, compute="cuda:triton")))
    with caplog.at_level(logging.WARNING, logger="spurfast.embed"):
        done = embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=16, progress=False)
    assert done.complete
    assert ("was begun computing on cuda with the triton encoder and this run resumes it on cpu with the torch "
            "encoder") in caplog.text


def test_penultimate_features_past_float16_are_clipped_not_infinite(tmp_path, caplog):
    """The store keeps penultimate features as float16: a model's features past 65504 were
    stored as inf, and the baselines standardised them into NaN."""
    import logging

    src, clf, vae = _setup()
    plain = embed_pool(src, clf, vae, tmp_path / "a", num_classes=4, batch_size=16, progress=False)
    real = clf.features
    clf.features = lambda x: real(x) * 1e6
    with caplog.at_level(logging.WARNING, logger="spurfast.embed"):
        big = embed_pool(src, clf, vae, tmp_path / "b", num_classes=4, batch_size=16, progress=False)
    feats = np.asarray(big["feats"])
    assert np.isfinite(feats).all() and np.abs(feats).max() == 65504.0
    assert (np.sign(feats) == np.sign(np.asarray(plain["feats"]))).all()
    assert sum("beyond float16's range" in r.getMessage() for r in caplog.records) == 1, caplog.text


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
    from spurfast.store import MANIFEST
    from spurfast.identity import weights_fingerprint

    src, clf, vae = _setup()
    embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=16, progress=False, stop_after=1)
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    manifest["content"] = sampled_digest(src)    # as the tenth session wrote it, and its fingerprint
    manifest["fingerprint"] = weights_fingerprint(src, clf, vae)
    manifest.pop("identity")                     # no fingerprint scheme recorded then
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
    assert set(split) == {"load_wait_s", "compute_s", "write_s", "write_busy_s"}
    assert all(v > 0 for v in split.values()), split
    # the pass's own three parts add up to at most its time; the writer thread's runs beside them
    assert split["load_wait_s"] + split["compute_s"] + split["write_s"] <= wall, (split, wall)
    assert split["write_busy_s"] <= wall, (split, wall)


def test_corrected_labels_replace_the_stored_ones(tmp_path, caplog):
    """Labels are no model output and take no part in the store's identity: a rerun over
    the same images with corrected labels rewrites the labels column (complete and
    resumed stores alike) instead of handing discovery the old ones."""
    import json

    from spurfast.store import MANIFEST

    src, clf, vae = _setup()
    kw = dict(num_classes=4, batch_size=8, progress=False)
    embed_pool(src, clf, vae, tmp_path / "s", **kw)
    embed_pool(src, clf, vae, tmp_path / "p", stop_after=2, **kw)
    before = json.loads((tmp_path / "s" / MANIFEST).read_text())["fingerprint"]
    fixed = ArraySource(src.images, (np.arange(50) + 1) % 4)
    with caplog.at_level("WARNING", logger="spurfast.embed"):
        done = embed_pool(fixed, clf, vae, tmp_path / "s", **kw)
    assert "labels" in caplog.text
    np.testing.assert_array_equal(np.asarray(done["labels"]), fixed.labels())
    np.testing.assert_array_equal(np.asarray(EmbeddingStore(tmp_path / "s")["labels"]), fixed.labels())
    assert json.loads((tmp_path / "s" / MANIFEST).read_text())["fingerprint"] == before  # same identity
    resumed = embed_pool(fixed, clf, vae, tmp_path / "p", **kw)
    assert resumed.complete
    np.testing.assert_array_equal(np.asarray(resumed["labels"]), fixed.labels())


def test_corrected_labels_reach_the_shards_and_their_merge(tmp_path):
    from spurfast.store_shards import merge_shards

    src, clf, vae = _setup(21)
    kw = dict(num_classes=4, batch_size=4, progress=False)
    for r in range(2):
        embed_pool(src, clf, vae, tmp_path / "s", shard_id=r, num_shards=2, **kw)
    fixed = ArraySource(src.images, (np.arange(21) + 2) % 4)
    for r in range(2):  # the finished shard stores are opened again, with the new labels
        embed_pool(fixed, clf, vae, tmp_path / "s", shard_id=r, num_shards=2, **kw)
    merged = merge_shards(tmp_path / "s", 2, progress=False)
    np.testing.assert_array_equal(np.asarray(merged["labels"]), fixed.labels())


def test_manifest_writes_of_two_processes_do_not_collide(tmp_path, monkeypatch):
    """Two processes replacing one manifest (ranks sharing a store) each write their own
    temporary file: here a second process writes the manifest completely while the first
    sits between writing its temporary file and renaming it."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from spurfast import store as E

    path = tmp_path / "manifest.json"
    real = os.replace
    other = ("import sys; from pathlib import Path; from spurfast.store import _write_json; "
             "_write_json(Path(sys.argv[1]), {'by': 'other'})")

    def replace_after_the_other_process(src, dst):
        r = subprocess.run([sys.executable, "-c", other, str(path)], capture_output=True, text=True, timeout=120,
                           cwd=Path(E.__file__).parents[1])
        assert r.returncode == 0, r.stderr[-2000:]
        real(src, dst)
    monkeypatch.setattr(os, "replace", replace_after_the_other_process)   # the os module atomic_files renames with
    E._write_json(path, {"by": "this"})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"by": "this"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]  # no temporary file left


def test_a_bfloat16_classifier_is_embedded(tmp_path):
    # the store's fingerprint hashed every weight through numpy, which has no bfloat16:
    # a model that runs in bfloat16 crashed the pass before its first image
    from spurfast.identity import fingerprint

    class Bf16(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = SmallCNN(1, 4, 28).to(torch.bfloat16)

        def forward(self, x):
            return self.m(x.to(torch.bfloat16))

    src, _, vae = _setup(20)
    a, b = Bf16().eval(), Bf16().eval()
    assert fingerprint(src, a) != fingerprint(src, b)   # other weights, another store
    store = embed_pool(src, a, vae, tmp_path / "s", num_classes=4, batch_size=8, progress=False)
    assert store.complete and np.asarray(store["probs"]).shape == (20, 4)


def _store_begun_with_the_torch_loader(tmp_path):
    """(classifier, VAE, embed_pool kwargs) after one batch of a folder pool embedded into
    tmp_path / "s" with the torch loader; skips without DALI (the other loader)."""
    from spurfast import backends
    from spurfast.data.folder import ImageFolderSource
    from spurfast.make_pool import PoolSpec, make_pool

    try:
        backends.resolve("loader", "dali")
    except backends.BackendUnavailable as exc:
        pytest.skip(f"no DALI here: {exc}")
    torch.manual_seed(0)
    clf, vae = SmallCNN(3, 10, 32).eval(), VAE(VAEConfig.for_images(3, 32, 6)).eval()
    make_pool(tmp_path / "pool", PoolSpec(n=24, seed=0), workers=1, progress=False)
    kw = dict(num_classes=10, batch_size=8, progress=False, num_workers=1)
    embed_pool(ImageFolderSource(tmp_path / "pool", size=32), clf, vae, tmp_path / "s", loader_backend="torch",
               stop_after=1, **kw)
    return clf, vae, kw


def test_a_resume_with_another_loader_is_refused(tmp_path):
    # a pass begun with the torch loader and resumed with DALI silently mixed two decoders'
    # pixels (a few levels apart on resized images): findings matched neither run's
    from spurfast.data.folder import ImageFolderSource

    clf, vae, kw = _store_begun_with_the_torch_loader(tmp_path)
    with pytest.raises(ValueError, match=r"begun with the 'torch' loader, and this run would resume it with "
                                         r"'dali'.*--loader-backend torch"):
        embed_pool(ImageFolderSource(tmp_path / "pool", size=32), clf, vae, tmp_path / "s", loader_backend="dali",
                   **kw)
    store = embed_pool(ImageFolderSource(tmp_path / "pool", size=32), clf, vae, tmp_path / "s",
                       loader_backend="torch", **kw)
    assert store.complete and store.manifest["loader"] == "torch"


def test_shards_that_would_continue_a_store_begun_with_another_loader_are_refused(tmp_path):
    # a 1-process pass begun with the torch loader, resumed by several ranks with DALI: each
    # rank's fresh shard store recorded "dali" and nothing compared it with the main store's
    # rows, so the merge silently mixed both decoders' pixels
    from spurfast.data.folder import ImageFolderSource

    clf, vae, kw = _store_begun_with_the_torch_loader(tmp_path)
    with pytest.raises(ValueError, match=rf"store {tmp_path / 's'} was begun with the 'torch' loader.*"
                                         rf"--loader-backend torch \(or start afresh: remove {tmp_path / 's'}"):
        embed_pool(ImageFolderSource(tmp_path / "pool", size=32), clf, vae, tmp_path / "s", loader_backend="dali",
                   shard_id=0, num_shards=2, **kw)


def test_made_from_tells_this_runs_store_or_its_shards_from_another(tmp_path):
    # what --overwrite keeps: a store (or, before the merge, a shard store) of this pool and these models
    import json

    from spurfast.data.sources import content_digest
    from spurfast.store import made_from
    from spurfast.identity import fingerprint

    src, clf, vae = _setup(20)
    fp, content = fingerprint(src, clf, vae), content_digest(src)
    embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=8, progress=False, stop_after=1)
    embed_pool(src, clf, vae, tmp_path / "sh", num_classes=4, batch_size=4, progress=False, stop_after=1,
               shard_id=1, num_shards=2)
    assert made_from(tmp_path / "s", fp, content) and made_from(tmp_path / "sh", fp, content)
    assert not made_from(tmp_path / "s", fp, "other-content") and not made_from(tmp_path / "sh", "other-fp", content)
    assert not made_from(tmp_path / "none", fp, content)
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({"fingerprint": "old", "content": "older"}))
    assert made_from(tmp_path / "s", fp, content, legacy=lambda: [("old", "older")])   # an earlier version's


def test_a_store_or_run_of_this_scheme_is_never_taken_over_through_an_earlier_ones_identity(tmp_path, caplog):
    # model B = model A's weights with another activation (a partial, which the scheme before
    # this one left out): B's identity under that scheme equals A's under this one, so A's store
    # was "relabelled" as B's and resumed with A's predictions, and A's run folder resumed as B's
    import functools

    import torch.nn.functional as F

    from spurfast.data.sources import content_digest
    from spurfast.discover import DiscoverConfig
    from spurfast.identity import fingerprint
    from spurfast.pipeline import run_discovery
    from spurfast.store import legacy_identities, made_from

    class Head(torch.nn.Module):
        def __init__(self, act):
            super().__init__()
            self.body, self.head, self.act = torch.nn.Linear(28 * 28, 16), torch.nn.Linear(16, 4), act

        def forward(self, x):
            return self.head(self.act(self.body(x.flatten(1))))

    src, _, vae = _setup(20)
    a = Head(torch.relu).eval()
    b = Head(functools.partial(F.leaky_relu, negative_slope=-3.0)).eval()
    b.load_state_dict(a.state_dict())
    fp_a, fp_b = fingerprint(src, a, vae), fingerprint(src, b, vae)
    content = content_digest(src)
    assert fp_a != fp_b and (fp_a, content) in legacy_identities(src, b, vae, content=content)   # the trap
    embed_pool(src, a, vae, tmp_path / "s", num_classes=4, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="made with other models"):
        embed_pool(src, b, vae, tmp_path / "s", num_classes=4, batch_size=8, progress=False)
    assert not made_from(tmp_path / "s", fp_b, content, lambda: legacy_identities(src, b, vae, content=content))
    kw = dict(num_classes=4, config=DiscoverConfig(k=2, n_null=2), progress=False, confirm=False)
    run_discovery(src, a, vae, tmp_path / "run", **kw)
    with pytest.raises(FileExistsError, match="already holds run"):
        run_discovery(src, b, vae, tmp_path / "run", **kw)


def test_any_source_named_from_a_non_utf8_file_name_can_be_fingerprinted():
    # folder and .npz sources escape such names; a SubsetSource (or a user's own source) given
    # one crashed every digest with "surrogates not allowed"
    import os

    from spurfast.data.sources import ArraySource, SubsetSource, content_digest
    from spurfast.identity import fingerprint

    base = ArraySource(np.zeros((4, 1, 8, 8), np.float32), name="base")
    odd = SubsetSource(base, [0, 2], name=os.fsdecode(b"pool-\xff"))
    same = SubsetSource(base, [0, 2], name="pool-\xff")   # a UTF-8 name of other bytes: another identity
    assert fingerprint(odd) != fingerprint(same) and content_digest(odd) != content_digest(same)
    assert fingerprint(base) == fingerprint(ArraySource(np.zeros((4, 1, 8, 8), np.float32), name="base"))


def test_a_store_records_the_loader_of_its_first_rows(tmp_path):
    # a store created with the torch loader and stopped before its first batch was written
    # kept "torch" as its loader while DALI decoded its rows: a later resume with torch was
    # accepted and mixed both decoders' pixels
    import json

    from spurfast.data.folder import ImageFolderSource

    clf, vae, kw = _store_begun_with_the_torch_loader(tmp_path)
    pool = lambda: ImageFolderSource(tmp_path / "pool", size=32)   # noqa: E731
    embed_pool(pool(), clf, vae, tmp_path / "t", loader_backend="torch", stop_after=0, **kw)
    embed_pool(pool(), clf, vae, tmp_path / "t", loader_backend="dali", stop_after=1, **kw)
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["loader"] == "dali"
    with pytest.raises(ValueError, match=r"begun with the 'dali' loader, and this run would resume it with 'torch'"):
        embed_pool(pool(), clf, vae, tmp_path / "t", loader_backend="torch", **kw)


def test_shards_of_one_store_decoded_by_two_loaders_are_refused(tmp_path):
    # a rank that finished its shard with DALI and one that began (or resumed, with no rows
    # yet) its shard with torch each checked only their own rows: the merge silently mixed both decoders' pixels
    import json

    from spurfast.data.folder import ImageFolderSource
    from spurfast.store_shards import merge_shards, shard_dir

    clf, vae, kw = _store_begun_with_the_torch_loader(tmp_path)
    pool = lambda: ImageFolderSource(tmp_path / "pool", size=32)   # noqa: E731
    s = tmp_path / "sh"
    embed_pool(pool(), clf, vae, s, loader_backend="dali", shard_id=0, num_shards=2, **kw)
    with pytest.raises(ValueError, match=rf"store {shard_dir(s, 0, 2)} was begun with the 'dali' loader, and this "
                                         rf"run would resume it with 'torch'"):
        embed_pool(pool(), clf, vae, s, loader_backend="torch", shard_id=1, num_shards=2, **kw)
    # shards that got past that check (two ranks starting at once) are refused by the merge
    embed_pool(pool(), clf, vae, s, loader_backend="dali", shard_id=1, num_shards=2, **kw)
    m = json.loads((shard_dir(s, 1, 2) / "manifest.json").read_text())
    (shard_dir(s, 1, 2) / "manifest.json").write_text(json.dumps({**m, "loader": "torch"}))
    with pytest.raises(ValueError, match=r"shard stores were decoded by different loaders .*'dali'.*'torch'"):
        merge_shards(s, 2, progress=False)
    (shard_dir(s, 1, 2) / "manifest.json").write_text(json.dumps(m))
    assert merge_shards(s, 2, progress=False).manifest["loader"] == "dali"


def test_a_restart_on_another_number_of_processes_keeps_no_rows_of_another_loader(tmp_path):
    """The rows a 2-process run finished are kept by a 1-process restart; their loader was never
    compared: DALI shards' rows sat in a store a torch pass had begun (with no row yet) and
    finished, all under "torch".  Now the store takes the shards' record, and the torch resume
    is refused as any resume of a DALI store with torch is; shards of two loaders keep nothing."""
    import json

    from spurfast.data.folder import ImageFolderSource
    from spurfast.store import EmbeddingStore
    from spurfast.store_shards import merge_shards, shard_dir

    clf, vae, kw = _store_begun_with_the_torch_loader(tmp_path)
    pool = lambda: ImageFolderSource(tmp_path / "pool", size=32)   # noqa: E731
    s = tmp_path / "p"
    embed_pool(pool(), clf, vae, s, loader_backend="torch", stop_after=0, **kw)   # begun, no row yet
    assert EmbeddingStore(s).done == 0 and EmbeddingStore(s).manifest["loader"] == "torch"
    for r in range(2):
        embed_pool(pool(), clf, vae, s, loader_backend="dali", shard_id=r, num_shards=2, stop_after=1, **kw)
    with pytest.raises(ValueError, match=r"begun with the 'dali' loader, and this run would resume it with 'torch'"):
        embed_pool(pool(), clf, vae, s, loader_backend="torch", **kw)
    kept = EmbeddingStore(s)
    assert kept.done == 16 and kept.manifest["loader"] == "dali"
    assert embed_pool(pool(), clf, vae, s, loader_backend="dali", **kw).complete
    # shards of two loaders: nothing kept (a merge refuses them too)
    s = tmp_path / "q"
    for r in range(2):
        embed_pool(pool(), clf, vae, s, loader_backend="dali", shard_id=r, num_shards=2, stop_after=1, **kw)
    m = json.loads((shard_dir(s, 1, 2) / "manifest.json").read_text())
    (shard_dir(s, 1, 2) / "manifest.json").write_text(json.dumps({**m, "loader": "torch"}))
    got = embed_pool(pool(), clf, vae, s, loader_backend="torch", stop_after=0, **kw)
    assert got.done == 0 and got.manifest["loader"] == "torch"
    # a merge into a main store whose own rows are another loader's is refused
    s = tmp_path / "r"
    embed_pool(pool(), clf, vae, s, loader_backend="torch", stop_after=1, **kw)   # 8 rows, torch
    for r in range(2):
        embed_pool(pool(), clf, vae, s, loader_backend="torch", shard_id=r, num_shards=2, **kw)
    for r in range(2):
        m = json.loads((shard_dir(s, r, 2) / "manifest.json").read_text())
        (shard_dir(s, r, 2) / "manifest.json").write_text(json.dumps({**m, "loader": "dali"}))
    with pytest.raises(ValueError, match=r"was decoded as \{'loader': 'torch'.*its shards as \{'loader': 'dali'"):
        merge_shards(s, 2, progress=False)
    # ... and a 1-process resume discards them (a run of another size nobody resumes), not fails
    done = embed_pool(pool(), clf, vae, s, loader_backend="torch", **kw)
    assert done.complete and done.manifest["loader"] == "torch" and not (s / "shards").exists()


@pytest.mark.parametrize("num_shards", [0, -1, 1.5])
def test_merge_names_a_bad_number_of_shards(tmp_path, num_shards):
    # 0 (no shard directories counted, say) failed with a bare "IndexError: list index out of range"
    from spurfast.store_shards import merge_shards

    with pytest.raises(ValueError, match=rf"num_shards must be an integer >= 1 .*got {num_shards}"):
        merge_shards(tmp_path / "s", num_shards, progress=False)


def test_settling_shards_with_nothing_to_remove_leaves_the_shards_folder(tmp_path):
    """Every rank settles the shards on its way in (open_main, "changes nothing when called
    again"); its removal of an empty "shards" folder raced with a rank that had just made it on
    the way to its own shard folder, which then failed with FileNotFoundError (seen in CI)."""
    from spurfast.store_shards import _settle_shards

    (tmp_path / "shards").mkdir()
    assert _settle_shards(tmp_path, None, "fp", "content", 2, False) is None
    assert (tmp_path / "shards").is_dir()


def test_removing_an_old_store_never_follows_links_out_of_the_run(tmp_path):
    # --overwrite unmarked every sub-folder's stores through a "shards" link, deleting the
    # manifest.json files of the folder it pointed to; settling shards rmtree'd through one too
    from spurfast.store_shards import _settle_shards
    from spurfast.store import unmark_stores

    outside = tmp_path / "outside"
    for name in ("projectA", "1-of-3"):
        (outside / name).mkdir(parents=True)
        (outside / name / "manifest.json").write_text("{}")
    (outside / "manifest.json").write_text("{}")
    for linked in ("shards", "parts"):   # the folder itself a link, or one entry of a real one
        sub = tmp_path / f"run-{linked}" / "store"
        sub.mkdir(parents=True)
        (sub / "manifest.json").write_text("{}")
        if linked == "shards":
            (sub / "shards").symlink_to(outside)
        else:
            (sub / "shards").mkdir()
            (sub / "shards" / "0-of-3").symlink_to(outside / "1-of-3")
        unmark_stores(sub)
        assert not (sub / "manifest.json").exists()
        assert _settle_shards(sub, None, "fp", "content", 2, False) is None
        unmark_stores(tmp_path / "run-link")   # none there: nothing happens
    assert sorted(str(p.relative_to(outside)) for p in outside.rglob("manifest.json")) == \
        ["1-of-3/manifest.json", "manifest.json", "projectA/manifest.json"]
    # a store folder that is itself a link is not unmarked through it
    (tmp_path / "linked-store").symlink_to(outside)
    unmark_stores(tmp_path / "linked-store")
    assert len(list(outside.rglob("manifest.json"))) == 3


def _interrupted_rmtree(monkeypatch):
    """shutil.rmtree stopped by Ctrl-C where a filesystem listing in creation order (btrfs,
    small XFS folders) leaves it: the columns gone, the manifest (written last) not yet."""
    import shutil
    from pathlib import Path

    def interrupted(path, *a, **k):
        for f in Path(path).rglob("*.npy"):
            f.unlink()
        raise KeyboardInterrupt
    monkeypatch.setattr(shutil, "rmtree", interrupted)


def test_shards_whose_discarding_was_interrupted_are_not_resumed(tmp_path, monkeypatch):
    # a 1-process run discarding a 2-process run's unfinished shards, interrupted: the shard
    # stores kept their manifests without their columns; a 2-process run then returned the
    # "complete" rank 0 shard and crashed resuming rank 1's (No such file: labels.npy)
    src, clf, vae = _setup(40)
    kw = dict(num_classes=4, batch_size=8, progress=False)
    s = tmp_path / "s"
    embed_pool(src, clf, vae, s, shard_id=0, num_shards=2, **kw)
    embed_pool(src, clf, vae, s, shard_id=1, num_shards=2, stop_after=1, **kw)
    _interrupted_rmtree(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        embed_pool(src, clf, vae, s, **kw)
    monkeypatch.undo()
    from spurfast.store_shards import merge_shards
    for r in range(2):
        assert embed_pool(src, clf, vae, s, shard_id=r, num_shards=2, **kw).complete
    ref = embed_pool(src, clf, vae, tmp_path / "one", **kw)
    np.testing.assert_allclose(np.asarray(merge_shards(s, 2, progress=False)["mu"]), np.asarray(ref["mu"]),
                               rtol=1e-5, atol=1e-6)


def test_a_merge_run_again_after_it_completed_returns_the_merged_store(tmp_path):
    # "idempotent, so an interrupted merge is simply run again": once the main store was
    # marked complete, a second call (keep_shards, or a merge interrupted while removing the
    # shards) said the store "does not match its shards", or that the removed ones were missing
    import json
    import shutil

    from spurfast.store_shards import merge_shards, shard_dir

    src, clf, vae = _setup(20)
    kw = dict(num_classes=4, batch_size=8, progress=False)
    s = tmp_path / "s"
    for r in range(3):
        embed_pool(src, clf, vae, s, shard_id=r, num_shards=3, **kw)
    shutil.copytree(s / "shards", tmp_path / "saved")
    first = np.asarray(merge_shards(s, 3, progress=False, keep_shards=True)["mu"])
    again = merge_shards(s, 3, progress=False, keep_shards=True)
    assert again.complete and np.array_equal(np.asarray(again["mu"]), first)
    shutil.rmtree(shard_dir(s, 0, 3))   # the removal stopped after the first shard
    fixed = (np.arange(20) + 1) % 4
    again = merge_shards(s, 3, progress=False, labels=fixed)
    assert again.complete and np.array_equal(np.asarray(again["mu"]), first)
    assert np.array_equal(np.asarray(again["labels"]), fixed) and not (s / "shards").exists()
    # a complete store of other models is still no merge target
    other = SmallCNN(1, 4, 28).eval()
    for r in range(3):
        embed_pool(src, other, vae, tmp_path / "u", shard_id=r, num_shards=3, **kw)
    embed_pool(src, clf, vae, tmp_path / "t", **kw)
    shutil.copytree(tmp_path / "u" / "shards", tmp_path / "t" / "shards")
    with pytest.raises(ValueError, match="does not match its shards"):
        merge_shards(tmp_path / "t", 3, progress=False)
    # nor one of other images under the same names: its shards are refused, and kept
    m = json.loads((s / "manifest.json").read_text())
    (s / "manifest.json").write_text(json.dumps({**m, "content": "regenerated-in-place"}))
    shutil.copytree(tmp_path / "saved", s / "shards")
    with pytest.raises(ValueError, match="does not match its shards"):
        merge_shards(s, 3, progress=False)
    assert all(shard_dir(s, r, 3).is_dir() for r in range(3))


@pytest.mark.parametrize("device", ["cpu", "cpu:1"])
def test_the_run_device_reaches_a_loader_that_can_decode_on_a_gpu(tmp_path, monkeypatch, device):
    # DALI decoded on the GPU whenever torch saw one, `--device cpu` included (its images then
    # came from nvJPEG, and a store resumed on a machine without a GPU mixed two decoders);
    # `--device cpu:1` (torch computes there as on "cpu"; the CLI accepts it) reached DALI as
    # "cpu:1", which it refused at the first batch, after the store was created
    from spurfast import backends
    from spurfast.data import loader_dali
    from spurfast.data.folder import ImageFolderSource
    from spurfast.make_pool import PoolSpec, make_pool

    seen = []

    def recording(paths, *, device=None, bad_files=None, **k):   # the loader op's signature, recorded
        seen.append(device)
        yield from loader_dali.iter_folder_batches(paths, device=device, bad_files=bad_files, **k)

    try:
        backends.resolve("loader", "dali")
    except backends.BackendUnavailable as exc:
        pytest.skip(f"no DALI here: {exc}")
    monkeypatch.setitem(backends._cache, ("loader", "dali", None), ("dali", recording))
    torch.manual_seed(0)
    clf, vae = SmallCNN(3, 10, 32).eval(), VAE(VAEConfig.for_images(3, 32, 6)).eval()
    make_pool(tmp_path / "pool", PoolSpec(n=12, seed=0), workers=1, progress=False)
    store = embed_pool(ImageFolderSource(tmp_path / "pool", size=32), clf, vae, tmp_path / "s", num_classes=10,
                       batch_size=8, progress=False, num_workers=1, loader_backend="dali", device=device)
    assert store.complete and seen == ["cpu"] and store.manifest["decode"] == "cpu"


def test_a_resume_decoding_on_another_device_is_refused(tmp_path):
    # DALI decodes where --device computes: a store begun on a GPU (nvJPEG, the GPU resize)
    # and resumed with --device cpu (libjpeg-turbo, the CPU resize) mixed both decoders'
    # pixels, as two loaders would; a GPU run's record is written here by hand (no GPU)
    import json

    from spurfast.data.folder import ImageFolderSource
    from spurfast.store_shards import merge_shards, shard_dir

    clf, vae, kw = _store_begun_with_the_torch_loader(tmp_path)
    pool = lambda: ImageFolderSource(tmp_path / "pool", size=32)   # noqa: E731
    embed_pool(pool(), clf, vae, tmp_path / "t", loader_backend="dali", stop_after=1, **kw)
    path = tmp_path / "t" / "manifest.json"
    m = json.loads(path.read_text())
    assert m["loader"] == "dali" and m["decode"] == "cpu"
    path.write_text(json.dumps({**m, "decode": "gpu"}))
    with pytest.raises(ValueError, match=rf"store {tmp_path / 't'} was begun decoding on the GPU and this run would "
                                         rf"resume it decoding on the CPU.*resume with --device cuda"):
        embed_pool(pool(), clf, vae, tmp_path / "t", loader_backend="dali", **kw)
    path.write_text(json.dumps(m))
    assert embed_pool(pool(), clf, vae, tmp_path / "t", loader_backend="dali", **kw).complete
    # shards decoded on two devices are refused by the merge
    s = tmp_path / "sh"
    for r in range(2):
        embed_pool(pool(), clf, vae, s, loader_backend="dali", shard_id=r, num_shards=2, **kw)
    m = json.loads((shard_dir(s, 1, 2) / "manifest.json").read_text())
    (shard_dir(s, 1, 2) / "manifest.json").write_text(json.dumps({**m, "decode": "gpu"}))
    with pytest.raises(ValueError, match=r"shard stores were decoded on different devices .*'cpu'.*'gpu'"):
        merge_shards(s, 2, progress=False)
    (shard_dir(s, 1, 2) / "manifest.json").write_text(json.dumps(m))
    assert merge_shards(s, 2, progress=False).manifest["decode"] == "cpu"


def test_a_loader_that_skips_a_file_inside_a_batch_is_refused(tmp_path, monkeypatch):
    # only each batch's first pool index was checked: rows 1.. of a batch missing one image
    # took the next images' results, and in the last batch nothing noticed at all
    import spurfast.embed as E

    src, clf, vae = _setup(12)
    real = E.iter_batches

    def skipping(*a, **k):
        for b in real(*a, **k):
            if int(b.indices[0]) == 8:   # the last batch: pool index 9 goes missing
                keep = torch.tensor([0, 2, 3])
                b = type(b)(b.indices[keep], b.images[keep], b.labels[keep], b.ok[keep])
            yield b
    monkeypatch.setattr(E, "iter_batches", skipping)
    with pytest.raises(RuntimeError, match="loader yielded pool index 10 in row 9 of the store, expected 9"):
        embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=4, progress=False)
    assert EmbeddingStore(tmp_path / "s").done == 8   # the good batches are kept


def test_unreadable_files_cost_no_growing_manifest_and_survive_a_resume(tmp_path, monkeypatch):
    # every batch rewrote the manifest with every unreadable file so far: quadratic (35 min
    # of JSON for a pool with a million unreadable files)
    import spurfast.store as E   # where every manifest is written

    src, clf, vae = _setup(64)
    src.bad_files = {i: f"broken {i}" for i in range(0, 64, 2)}   # the loader marks these rows not ok
    sizes = []
    real = E._write_json
    monkeypatch.setattr(E, "_write_json", lambda path, obj, **k: (sizes.append(len(json.dumps(obj))),
                                                                  real(path, obj, **k)))
    part = embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=4, progress=False, stop_after=5)
    assert max(sizes) <= sizes[0] + 4, sizes   # the same size after every batch (but its digits of done)
    with open(tmp_path / "s" / E.BAD_LOG, "a") as fh:   # a line an interruption cut short
        fh.write('{"done": 24, "bad": {"20": "bro')
    assert part.bad_files() == {str(i): f"broken {i}" for i in range(0, 20, 2)}
    store = embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=8, progress=False)
    assert store.complete and store.bad_files() == {str(i): r for i, r in src.bad_files.items()}
    assert not np.asarray(store["ok"])[::2].any() and np.asarray(store["ok"])[1::2].all()


def test_a_merge_drops_the_bad_file_line_of_the_main_stores_interrupted_batch(tmp_path):
    # a 1-process pass interrupted between a batch's bad-file line and its manifest write; the
    # file is repaired and a 2-process run embeds those rows again: once the merge marked every
    # row done, the stale line counted, and the repaired (embedded, ok) image was reported unreadable
    from spurfast.store import BAD_LOG
    from spurfast.store_shards import merge_shards

    src, clf, vae = _setup(16)
    src.bad_files = {5: "broken 5"}
    embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=4, progress=False, stop_after=1)
    with open(tmp_path / "s" / BAD_LOG, "a") as fh:
        fh.write(json.dumps({"done": 8, "bad": {"5": "broken 5"}}) + "\n")
    src.bad_files = {}
    for r in range(2):
        embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=4, progress=False, shard_id=r,
                   num_shards=2)
    store = merge_shards(tmp_path / "s", 2, progress=False)
    assert store.complete and bool(store["ok"][5])
    assert store.bad_files() == {}


def test_a_numpy_integer_number_of_classes_is_embedded(tmp_path):
    # num_classes=labels.max() + 1 (a numpy int64) failed at the manifest's JSON write, after the
    # columns were made: "Object of type int64 is not JSON serializable"
    src, clf, vae = _setup(8)
    store = embed_pool(src, clf, vae, tmp_path / "s", num_classes=np.int64(4), batch_size=4, progress=False)
    assert store.complete and store.manifest["num_classes"] == 4 and store["probs"].shape == (8, 4)
    shard = embed_pool(src, clf, vae, tmp_path / "t", num_classes=np.int64(4), batch_size=4, progress=False,
                       shard_id=np.int64(1), num_shards=np.int64(2))
    assert shard.complete and shard.manifest["shard_id"] == 1
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1, got 4.5"):
        embed_pool(src, clf, vae, tmp_path / "u", num_classes=4.5, progress=False)


def test_a_shard_id_or_count_that_is_no_integer_is_refused(tmp_path):
    # int() made a shard_id of 1.5 shard 1 without a word
    src, clf, vae = _setup(8)
    for shard_id, num_shards in ((1.5, 2), (0, 2.0), (True, 2), (0, 0), (2, 2)):
        with pytest.raises(ValueError, match=f"need integers 0 <= shard_id < num_shards, got shard_id={shard_id!r}"):
            embed_pool(src, clf, vae, tmp_path / "v", num_classes=4, progress=False, shard_id=shard_id,
                       num_shards=num_shards)
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize("text", ["", '{"n": 8, "do'])
def test_a_manifest_that_is_not_json_is_named(tmp_path, text):
    # json's "Expecting value: line 1 column 1 (char 0)" named no file (a manifest emptied by a crash
    # of the machine, a hand edit), on a resume and in `spurfast report`
    src, clf, vae = _setup(8)
    embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=4, progress=False, stop_after=1)
    (tmp_path / "s" / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match=f"{tmp_path}/s/manifest.json is not readable JSON"):
        embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=4, progress=False)


def test_a_classifier_for_other_images_is_named(tmp_path):
    # torch's "mat1 and mat2 shapes cannot be multiplied (1x1024 and 3136x128)" named neither the pool nor
    # its images (the CLI checks this itself; run_discovery and embed_pool did not)
    from spurfast.pipeline import run_discovery

    src = ArraySource(torch.rand(8, 1, 16, 16), np.arange(8) % 4, name="small")
    vae = VAE(VAEConfig.for_images(1, 16, 4))
    for clf in (SmallCNN(1, 4, 28), SmallCNN(3, 4, 16)):
        with pytest.raises(ValueError, match=r"classifier cannot run on images of shape 1x16x16 \(CxHxW\) from small"):
            embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, progress=False)
        with pytest.raises(ValueError, match=r"classifier cannot run on images of shape 1x16x16 \(CxHxW\) from small"):
            run_discovery(src, clf, vae, tmp_path / "run", num_classes=4, confirm=False, progress=False)
    assert not (tmp_path / "run").exists()


class _RGBOnly(torch.nn.Module):
    """A user's classifier that checks its input, as TorchScript models often do."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 16 * 16, 4)

    def forward(self, x):
        assert x.shape[1] == 3, "expected RGB input"
        return self.fc(x.flatten(1))


def test_a_classifier_that_refuses_the_images_says_why(tmp_path):
    # a TorchScript assert raises torch.jit.Error, no RuntimeError: it ended in a traceback; and
    # TorchScript's first line ("The following operation failed in the TorchScript interpreter.")
    # was all the message showed of a failure whose cause is on its last line
    src = ArraySource(torch.rand(8, 1, 16, 16), np.arange(8) % 4, name="small")
    vae = VAE(VAEConfig.for_images(1, 16, 4))
    traced_double = torch.jit.trace(SmallCNN(1, 4, 16).double().eval(), torch.rand(1, 1, 16, 16, dtype=torch.float64))
    for clf, why in ((torch.jit.script(_RGBOnly()), "AssertionError: expected RGB input"),
                     (_RGBOnly(), "AssertionError: expected RGB input"),
                     (traced_double, "expected scalar type Float but found Double")):
        with pytest.raises(ValueError, match=r"classifier cannot run on images of shape 1x16x16 \(CxHxW\) from "
                                             rf"small: .*{why}") as got:
            embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, progress=False)
        assert "TorchScript interpreter" not in str(got.value)
        with pytest.raises(ValueError, match=rf"classifier cannot run .*{why}"):
            check_output_width(clf, (1, 16, 16), 4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_classifier_of_other_weights_is_told_to_pass_float(tmp_path, dtype):
    # torch's "Input type (float) and bias type (double) should be the same" said what
    # clashed but not what to do
    src = ArraySource(torch.rand(8, 1, 16, 16), np.arange(8) % 4, name="small")
    vae = VAE(VAEConfig.for_images(1, 16, 4))
    clf = SmallCNN(1, 4, 16).to(dtype)
    name = str(dtype).replace("torch.", "")
    hint = rf"\(its weights are {name}, spurfast's images float32: pass model.float\(\)\)"
    with pytest.raises(ValueError, match=r"classifier cannot run on images of shape 1x16x16 .*" + hint):
        embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, progress=False)
    with pytest.raises(ValueError, match=hint):
        check_output_width(clf, (1, 16, 16), 4)
    # a float32 classifier that fails gets no such hint
    with pytest.raises(ValueError) as got:
        embed_pool(src, SmallCNN(1, 4, 28), vae, tmp_path / "s", num_classes=4, progress=False)
    assert "model.float()" not in str(got.value)


class _IndexOneHot(torch.nn.Module):
    """A "classifier" that outputs the one-hot of its class index: integers, not logits."""

    def forward(self, x):
        return torch.nn.functional.one_hot((x.flatten(1).sum(1) > 0).long(), 4)


def test_a_classifier_of_integer_outputs_is_refused(tmp_path):
    # accepted: its softmax ties every class, and the run found nothing without a word
    src = ArraySource(torch.rand(8, 1, 16, 16), np.arange(8) % 4, name="small")
    vae = VAE(VAEConfig.for_images(1, 16, 4))
    for clf in (_IndexOneHot(), torch.jit.script(_IndexOneHot())):
        with pytest.raises(ValueError, match="classifier outputs int64 values for small; expected floating-point"):
            embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, progress=False)
        with pytest.raises(ValueError, match="classifier outputs int64 values; expected floating-point"):
            check_output_width(clf, (1, 16, 16), 4)


def test_a_vae_of_other_than_float32_weights_is_refused_before_any_work(tmp_path):
    # it encoded (the batch cast to its weights), then decoding float32 latents failed in
    # characterisation, after the embedding pass and discovery
    from spurfast.pipeline import run_discovery

    src = ArraySource(torch.rand(8, 1, 16, 16), np.arange(8) % 4, name="small")
    for dtype in (torch.float64, torch.float16):
        vae = VAE(VAEConfig.for_images(1, 16, 4)).to(dtype)
        with pytest.raises(ValueError, match=f"the VAE has {str(dtype)[6:]} weights; spurfast runs it in float32"):
            run_discovery(src, SmallCNN(1, 4, 16), vae, tmp_path / "run", num_classes=4, confirm=False,
                          progress=False)
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", [2.5, 2.0, 0, np.int64(0), True])
def test_the_loader_and_the_embedding_pass_word_a_bad_batch_size_alike(tmp_path, value):
    # one check (spurfast.checks.check_whole) behind both: the loader said "must be an integer" or
    # "must be >= 1" and took True as 1, embed_pool "must be an integer >= 1" and refused True; each
    # keeps its exception type (the loader: TypeError for no integer)
    from spurfast.data import iter_batches

    src, clf, vae = _setup(8)
    loader_type = ValueError if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else TypeError
    with pytest.raises(loader_type) as by_loader:
        list(iter_batches(src, value))
    with pytest.raises(ValueError) as by_embed:
        embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=value, progress=False)
    assert str(by_loader.value) == str(by_embed.value) == f"batch_size must be an integer >= 1, got {value!r}"


@pytest.mark.parametrize("value", [2.5, 0, True])
def test_a_bad_batch_size_is_refused_before_the_store_is_made(tmp_path, value):
    # 2.5 failed in the loader with "'float' object cannot be interpreted as an integer", and 0 was
    # refused there, after an empty store had been created
    src, clf, vae = _setup(8)
    with pytest.raises(ValueError, match=f"batch_size must be an integer >= 1, got {value!r}"):
        embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=value, progress=False)
    assert not (tmp_path / "s").exists()


def test_a_classifier_whose_logits_are_not_a_matrix_is_named(tmp_path):
    # a model that squeezes its one logit failed in check_outputs with a bare "IndexError: tuple index out of range"
    class Squeezed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(28 * 28, 1)

        def forward(self, x):
            return self.lin(x.flatten(1)).squeeze(1)

    src, _, vae = _setup(8)
    with pytest.raises(ValueError, match=r"classifier outputs shape \(1,\) for one image of .*expected logits of "
                                         r"shape \(1, classes\)"):
        embed_pool(src, Squeezed(), vae, tmp_path / "s", num_classes=1, progress=False)


def test_a_vae_for_other_images_is_named_before_the_store_is_made(tmp_path):
    # run_discovery checked it, embed_pool did not: the encoder refused at the first batch, after the
    # store was made, with "flattened features 1024 != head input width 3136" (naming neither shape)
    import re

    pool = ArraySource(torch.rand(8, 1, 16, 16), np.zeros(8, dtype=np.int64), name="p16")
    for vae, want in ((VAE(VAEConfig.for_images(1, 28, 4)), "1x28x28"), (VAE(VAEConfig.for_images(3, 16, 4)), "3x16x16")):
        with pytest.raises(ValueError, match=re.escape(f"the VAE expects {want} images (CxHxW), the pool (p16) has "
                                                       f"1x16x16")):
            embed_pool(pool, SmallCNN(1, 2, 16), vae, tmp_path / "s", num_classes=2, progress=False)
        assert not (tmp_path / "s").exists()


class _Doubled(torch.nn.Module):
    """A classifier computing on 2x its input, with SmallCNN's parameters by name."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x * 2.0)


def test_a_model_with_the_same_weights_and_other_code_is_another_model(tmp_path):
    """The fingerprint hashed the state_dicts alone: a TorchScript classifier re-exported with
    its input scaling in the forward (same weights, 164 of 500 predictions changed), or a VAE
    of another input normalisation, resumed the old model's run and reported its findings."""
    from spurfast.identity import fingerprint, weights_fingerprint

    src, clf, vae = _setup(10)
    plain = torch.jit.script(clf)
    doubled = torch.jit.script(_Doubled(clf))
    torch.jit.save(plain, tmp_path / "plain.pt")
    again = torch.jit.load(tmp_path / "plain.pt")
    assert fingerprint(src, again, vae) == fingerprint(src, plain, vae)          # a saved copy: the same
    assert fingerprint(src, doubled, vae) != fingerprint(src, plain, vae)
    other = VAE(VAEConfig(1, 28, (8, 16), 6, mean=(0.25,), std=(0.5,))).eval()
    other.load_state_dict(vae.state_dict())
    assert fingerprint(src, clf, other) != fingerprint(src, clf, vae)
    buffered = SmallCNN(1, 4, 28).eval()
    buffered.load_state_dict(clf.state_dict())
    buffered.register_buffer("scale", torch.tensor(3.0), persistent=False)
    assert fingerprint(src, buffered, vae) != fingerprint(src, clf, vae)
    # the weights alone: how stores and runs were recognised before, still read as theirs
    assert weights_fingerprint(src, clf, other) == weights_fingerprint(src, clf, vae)


def test_a_store_fingerprinted_by_the_weights_alone_resumes(tmp_path):
    from spurfast.store import MANIFEST
    from spurfast.identity import fingerprint, weights_fingerprint

    src, clf, vae = _setup()
    embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=16, progress=False, stop_after=1)
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    manifest["fingerprint"] = weights_fingerprint(src, clf, vae)   # as the twenty-fifth session wrote it
    manifest.pop("identity")
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(manifest))
    assert embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, progress=False).complete
    assert json.loads((tmp_path / "s" / MANIFEST).read_text())["fingerprint"] == fingerprint(src, clf, vae)


class _Shifted(torch.nn.Module):
    """SmallCNN's parameters by name, on its input less a shift kept as a plain attribute
    (an input mean saved as a tensor or a float, not a buffer)."""

    def __init__(self, net, shift):
        super().__init__()
        self.net = net
        self.shift = shift

    def forward(self, x):
        return self.net(x - self.shift)


@pytest.mark.parametrize("kind", ["module", "script", "trace"])
@pytest.mark.parametrize("as_tensor", [True, False])
def test_a_model_with_another_attribute_is_another_model(tmp_path, kind, as_tensor):
    """The fingerprint missed a plain attribute and a trace's constants (CONSTANTS.c0): a store
    begun with one input shift was resumed with another, mixing the two models' rows."""
    from spurfast.identity import fingerprint

    src, clf, vae = _setup(16)
    models = []
    for shift in (0.0, 0.5):
        m = _Shifted(clf, torch.tensor(shift) if as_tensor else shift).eval()
        if kind == "script":
            m = torch.jit.script(m)
        elif kind == "trace":
            m = torch.jit.trace(m, src.images[:2])
        models.append(m)
    a, b = models
    assert not torch.allclose(a(src.images[:4]), b(src.images[:4]))
    assert fingerprint(src, a, vae) != fingerprint(src, b, vae)
    embed_pool(src, a, vae, tmp_path / "s", num_classes=4, batch_size=8, progress=False, stop_after=1)
    with pytest.raises(ValueError, match="made with other models"):
        embed_pool(src, b, vae, tmp_path / "s", num_classes=4, batch_size=8, progress=False)
    # ... and a store of a model is its own: the same model again resumes it
    assert embed_pool(src, a, vae, tmp_path / "s", num_classes=4, batch_size=8, progress=False).complete


def test_numpy_and_partial_attributes_are_part_of_a_models_identity():
    # skipped as unknown values: a gain of np.float32(3) for np.float32(1), or another slope in
    # a partial activation, got the other model's fingerprint and resumed its run
    import functools

    from spurfast.identity import model_identity

    class Scaled(torch.nn.Module):
        def __init__(self, gain, act):
            super().__init__()
            self.gain, self.act = gain, act

        def forward(self, x):
            return self.act(x * torch.as_tensor(self.gain))
    slope = functools.partial(torch.nn.functional.leaky_relu, negative_slope=0.1)
    base = model_identity(Scaled(np.float32(1), slope))
    assert model_identity(Scaled(np.float32(1), slope)) == base   # the same model: the same identity
    for other in (Scaled(np.float32(3), slope), Scaled(np.array([1.0], np.float32), slope),
                  Scaled(np.float32(1), functools.partial(torch.nn.functional.leaky_relu, negative_slope=0.3)),
                  Scaled(np.float32(1), functools.partial(torch.nn.functional.elu, alpha=0.1))):
        assert model_identity(other) != base


def test_a_reused_store_names_files_it_could_not_open_and_the_way_out(tmp_path, caplog):
    # a file unreadable for permissions stayed unreadable in the reused store once fixed, without
    # a word: its size (the store's identity) had not changed
    src, clf, vae = _setup(16)
    store = embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=8, progress=False)
    store.manifest["bad_files"] = {"3": "truncated JPEG", "9": "cannot read file: PermissionError: Permission denied",
                                   "12": "cannot read file: OSError: Input/output error"}
    store.save_manifest()
    with caplog.at_level("WARNING", logger="spurfast.embed"):
        embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=8, progress=False)
    assert (f"marks 2 pool image(s) unreadable for an error reading the file, not for its content (first pool "
            f"index 9: cannot read file: PermissionError: Permission denied); if they can be read now, remove "
            f"{tmp_path / 's'} to embed the pool again") in caplog.text, caplog.text


def _resumes_under_an_earlier_fingerprint(tmp_path, src, clf, vae, **earlier):
    """A store begun, its manifest rewritten to the fingerprint ``earlier`` gives (an earlier
    version's), is resumed and relabelled with today's."""
    from spurfast.identity import fingerprint
    from spurfast.store import MANIFEST

    embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=16, progress=False, stop_after=1)
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    old = fingerprint(src, clf, vae, **earlier)
    assert old != manifest["fingerprint"]
    manifest["fingerprint"] = old
    manifest.pop("identity")   # recorded from this session on
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(manifest))
    assert embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, progress=False).complete
    assert json.loads((tmp_path / "s" / MANIFEST).read_text())["fingerprint"] == fingerprint(src, clf, vae)


def test_a_store_fingerprinted_before_the_attributes_resumes(tmp_path):
    _resumes_under_an_earlier_fingerprint(tmp_path, *_setup(), attributes=False)   # the twenty-seventh session's


def test_a_store_of_a_model_with_a_partial_attribute_fingerprinted_before_it_counted_resumes(tmp_path):
    # numpy and partial attributes joined the identity: such a model's store from before was
    # refused as "made with other models" (torchvision's ViT keeps partial(LayerNorm))
    import functools

    src, clf, vae = _setup()
    clf.norm_layer = functools.partial(torch.nn.LayerNorm, eps=1e-6)
    _resumes_under_an_earlier_fingerprint(tmp_path, src, clf, vae, extras=False)   # the fifty-second session's


def test_a_quantized_classifier_is_fingerprinted_by_its_packed_weights(tmp_path):
    """A dynamically quantized model's state_dict holds a dtype and a tuple: the fingerprint
    failed with "'tuple' object has no attribute 'detach'", naming neither model nor key."""
    import warnings

    from spurfast.identity import fingerprint

    src, _, vae = _setup(16)
    quantized = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 32), torch.nn.ReLU(),
                                  torch.nn.Linear(32, 4)).eval()
        with warnings.catch_warnings():   # torch.ao's eager quantization is deprecated in favour of torchao
            warnings.simplefilter("ignore")
            quantized.append(torch.ao.quantization.quantize_dynamic(net, {torch.nn.Linear}, dtype=torch.qint8))
    a, b = quantized
    assert fingerprint(src, a, vae) == fingerprint(src, a, vae) != fingerprint(src, b, vae)
    assert embed_pool(src, a, vae, tmp_path / "s", num_classes=4, progress=False).complete


def test_a_state_dict_entry_that_cannot_be_fingerprinted_is_named():
    from spurfast.identity import fingerprint

    class Odd(torch.nn.Module):
        def get_extra_state(self):
            return {"opaque": object()}

        def set_extra_state(self, state):
            pass

    src, clf, vae = _setup(4)
    with pytest.raises(ValueError, match=r"state_dict entry '_extra_state': a dict, expected tensors"):
        fingerprint(src, Odd(), vae)


class _Standardising(torch.nn.Module):
    """A classifier that standardises each image first, as many pipelines do: NaN logits for a
    constant image (the loader's stand-in for an unreadable file is all zeros)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner((x - x.mean((1, 2, 3), keepdim=True)) / x.std((1, 2, 3), keepdim=True))


def test_an_unreadable_files_stand_in_cannot_stop_the_run_with_nan_outputs(tmp_path):
    # the NaN check covered the zero images that stand in for unreadable files: one broken file
    # stopped the run with "classifier produced NaN/inf outputs for pool indices [3]"
    src, clf, vae = _setup(16)
    src.images[3] = 0.0
    src.bad_files = {3: "broken 3"}
    store = embed_pool(src, _Standardising(clf), vae, tmp_path / "s", num_classes=4, batch_size=8, progress=False)
    assert store.complete and store.bad_files() == {"3": "broken 3"}
    assert int(np.asarray(store["pred"])[3]) == -1
    for name in ("conf", "probs", "mu", "feats"):
        assert np.isfinite(np.asarray(store[name], dtype=np.float32)).all(), name
    # a readable image the classifier gives NaN for is still refused, by its index
    src.bad_files = {}
    with pytest.raises(ValueError, match=r"classifier produced NaN/inf outputs for pool indices \[3\]"):
        embed_pool(src, _Standardising(clf), vae, tmp_path / "t", num_classes=4, batch_size=8, progress=False)


def test_every_stored_column_is_the_models_output_for_its_row(tmp_path):
    # the columns leave the device as one host array and are sliced apart again: probs taken one
    # column early (conf in place of class 0) went through every test
    src, clf, vae = _setup(21)
    store = embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=8, progress=False)
    x = src.images
    with torch.no_grad():
        logits = clf(x)
        feats = clf.features(x)
        mu, _ = vae.encode(x, backend="torch")
    probs = torch.softmax(logits, 1).numpy()
    np.testing.assert_allclose(np.asarray(store["probs"]), probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(store["conf"]), probs.max(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(store["pred"]), probs.argmax(1))
    np.testing.assert_allclose(np.asarray(store["mu"]), mu.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(store["feats"], np.float32), feats.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(np.asarray(store["labels"]), src.labels())


def test_a_column_cut_short_is_named(tmp_path):
    # np.load's "mmap length is greater than file size" named no file (a full disk, outside damage)
    src, clf, vae = _setup(8)
    store = embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=4, progress=False)
    mu = tmp_path / "s" / "mu.npy"
    mu.write_bytes(mu.read_bytes()[:-40])
    with pytest.raises(ValueError, match=rf"^{mu} \(a column of store {store.root}\) cannot be read \(.*\): damaged "
                                         rf"or cut short; remove {store.root} to embed the pool again$"):
        EmbeddingStore(tmp_path / "s")["mu"]


def test_a_full_disk_is_an_error_when_the_store_is_made_not_a_bus_error_later(tmp_path, monkeypatch):
    # the columns were sparse memory maps: a row written into a page of a full disk ended the
    # run with SIGBUS ("Bus error", no message); reserved up front, it is an OSError naming the column
    import errno
    import os

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"no space for the embedding store's column .*mu\.npy \(\d+ bytes\)") as got:
        EmbeddingStore.create(tmp_path / "s", 1000, {"mu": ((1000, 16), "float32")}, {})
    assert "PIXEL_CACHE" not in str(got.value)
    # the pool's pixels, the one column a run can do without, say how to go without them
    with pytest.raises(OSError, match=r"pixels\.npy .*SPURFAST_PIXEL_CACHE_GB=0 keeps none"):
        EmbeddingStore.create(tmp_path / "p", 1000, {"pixels": ((1000, 3, 8, 8), "uint8")}, {})

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)   # such a file system keeps the file sparse
    store = EmbeddingStore.create(tmp_path / "t", 1000, {"mu": ((1000, 16), "float32")}, {})
    assert store.n == 1000


def test_store_columns_are_reserved_on_disk(tmp_path):
    store = EmbeddingStore.create(tmp_path / "s", 4096, {"mu": ((4096, 16), "float32")}, {})
    st = (store.root / "mu.npy").stat()
    assert st.st_blocks * 512 >= 4096 * 16 * 4   # not sparse


def test_the_pass_runs_both_models_on_a_cpu_in_blocks_with_one_calls_rows(tmp_path, monkeypatch):
    """Both models see a 150-image batch 64 images at a time on a CPU (`layout.CPU_BLOCK`:
    a layer's output for 256 RGB images outgrows the caches), and the store's rows are those
    of one call over the batch."""
    from spurfast.models import layout

    src, clf, vae = _setup(150)
    sizes = {"classifier": [], "encoder": []}
    clf.conv1.register_forward_pre_hook(lambda _, args: sizes["classifier"].append(len(args[0])))
    encode = vae.encode
    vae.encode = lambda x, **kw: (sizes["encoder"].append(len(x)), encode(x, **kw))[1]
    blocked = embed_pool(src, clf, vae, tmp_path / "a", num_classes=4, batch_size=150, progress=False)
    # (the classifier after its up-front trial of one image)
    assert sizes == {"classifier": [1, 64, 64, 22], "encoder": [64, 64, 22]}
    monkeypatch.setattr(layout, "CPU_BLOCK", 10 ** 6)
    whole = embed_pool(src, clf, vae, tmp_path / "b", num_classes=4, batch_size=150, progress=False)
    assert sizes == {"classifier": [1, 64, 64, 22, 1, 150], "encoder": [64, 64, 22, 150]}
    for col in ("pred", "conf", "probs", "mu", "feats"):
        np.testing.assert_array_equal(np.asarray(blocked[col]), np.asarray(whole[col]), err_msg=col)


def test_a_scripted_model_in_train_mode_is_the_same_model_and_its_old_stores_resume(tmp_path):
    # a scripted model with dropout reads self.training: given in train mode (the passes compute
    # in eval mode all the same) it was refused the store it had made in eval mode
    import json

    from spurfast.identity import fingerprint
    from spurfast.store import MANIFEST

    class Dropped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.drop = torch.nn.Linear(28 * 28, 4), torch.nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(self.body(x.flatten(1)))

    src, _, vae = _setup(20)
    torch.manual_seed(0)
    scripted = torch.jit.script(Dropped()).eval()
    fp_eval = fingerprint(src, scripted, vae)
    assert fingerprint(src, scripted.train(), vae) == fp_eval
    assert fingerprint(src, scripted, vae, mode=True) != fingerprint(src, scripted.eval(), vae, mode=True)
    embed_pool(src, scripted.eval(), vae, tmp_path / "s", num_classes=4, batch_size=8, progress=False, stop_after=1)
    assert embed_pool(src, scripted.train(), vae, tmp_path / "s", num_classes=4, progress=False).complete
    # a store the scheme before wrote (mode counted, no scheme recorded) resumes
    embed_pool(src, scripted.eval(), vae, tmp_path / "t", num_classes=4, batch_size=8, progress=False, stop_after=1)
    manifest = json.loads((tmp_path / "t" / MANIFEST).read_text())
    manifest["fingerprint"] = fingerprint(src, scripted, vae, mode=True)
    manifest.pop("identity")
    (tmp_path / "t" / MANIFEST).write_text(json.dumps(manifest))
    assert embed_pool(src, scripted, vae, tmp_path / "t", num_classes=4, progress=False).complete


def test_a_model_changed_in_place_between_passes_is_checked_again(tmp_path):
    # whether a user model's logits are fc2(features) was decided once per model object: after
    # a temperature and a logit shift changed its forward, the next pass stored fc2(features)
    class Calibrated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 8), torch.nn.ReLU())
            self.fc2 = torch.nn.Linear(8, 4)
            self.temperature = 1.0
            self.register_buffer("shift", torch.zeros(4))

        def forward(self, x):
            return self.fc2(self.features(x)) / self.temperature + self.shift

    src, _, vae = _setup(20)
    torch.manual_seed(0)
    model = Calibrated().eval()
    embed_pool(src, model, vae, tmp_path / "a", num_classes=4, batch_size=8, progress=False)
    model.temperature, model.shift[3] = 4.0, 5.0
    store = embed_pool(src, model, vae, tmp_path / "b", num_classes=4, batch_size=8, progress=False)
    with torch.no_grad():
        want = torch.softmax(model(src.get_batch(list(range(20)))[0]), 1).numpy()
    np.testing.assert_allclose(np.asarray(store["probs"]), want, atol=1e-5)


def test_a_finished_store_still_leaves_the_models_on_the_runs_device(tmp_path, monkeypatch):
    """embed_pool returned a finished store before it moved the models: the later steps that
    use them where the pass left them (confirmation in `bench confirm` on a rerun) fed CUDA
    batches to a classifier left on the CPU.  Shown with a spy on Module.to (one CPU here)."""
    g = torch.Generator().manual_seed(0)
    src = ArraySource(torch.rand(12, 1, 28, 28, generator=g), np.arange(12) % 3)
    clf, vae = SmallCNN(1, 3, 28, width=4), VAE(VAEConfig(1, 28, (8, 16), 4))
    embed_pool(src, clf, vae, tmp_path / "store", num_classes=3, progress=False, num_workers=0)
    moved, real = [], torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: (moved.append((self, a)), real(self, *a, **k))[1])
    store = embed_pool(src, clf, vae, tmp_path / "store", num_classes=3, progress=False, num_workers=0)
    assert store.complete and (clf, ("cpu",)) in moved and (vae, ("cpu",)) in moved


# ---- mutation-testing gaps (spurfast/store.py) ----

def test_a_store_made_again_over_an_old_one_and_stopped_is_no_store(tmp_path, monkeypatch):
    # create() removes the old manifest before it rewrites the columns: one stopped part way
    # (here a full disk at a column's reservation) must not leave the old manifest, "done" and
    # all, over columns now zeroed, which a later run would take for finished rows
    import errno
    import os

    from spurfast.store import MANIFEST
    old = EmbeddingStore.create(tmp_path / "s", 4, {"mu": ((4, 2), "float32")}, {})
    old.write(0, {"mu": np.ones((4, 2), np.float32)})
    assert old.complete

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match="no space for the embedding store's column"):
        EmbeddingStore.create(tmp_path / "s", 4, {"mu": ((4, 2), "float32")}, {})
    assert not (tmp_path / "s" / MANIFEST).exists()
    with pytest.raises(FileNotFoundError, match="is not an embedding store"):
        EmbeddingStore(tmp_path / "s")


def test_a_wide_column_of_a_wider_dtype_is_read_and_written_row_for_row(tmp_path):
    # rows over WIDE_ROW_BYTES (4,100 float32 = 16,400 bytes: the probs of a 21k-class model)
    # go through pread/pwrite, whose offsets count bytes, not elements
    store = EmbeddingStore.create(tmp_path / "s", 3, {"probs": ((3, 4100), "float32")}, {})
    assert store.wide("probs") and store.row_bytes("probs") == 16400
    want = np.arange(3 * 4100, dtype=np.float32).reshape(3, 4100)
    store.write_rows("probs", slice(None), want)
    np.testing.assert_array_equal(np.load(store.root / "probs.npy"), want)
    np.testing.assert_array_equal(store.read_rows("probs", np.array([2, 0])), want[[2, 0]])
    np.testing.assert_array_equal(EmbeddingStore(store.root).read_rows("probs", slice(1, 3)), want[1:])


def test_the_bad_file_line_of_a_batch_stopped_before_its_manifest_is_not_counted(tmp_path, monkeypatch):
    # write() appends a batch's unreadable files, then marks its rows done: the line names the
    # batch's end, so a pass stopped between the two leaves it to the rows done again (a file
    # repaired meanwhile was otherwise reported unreadable for ever)
    store = EmbeddingStore.create(tmp_path / "s", 8, {"ok": ((8,), "bool")}, {})
    store.write(0, {"ok": np.array([True, False, True, True])}, {"1": "broken 1"})

    def stopped():
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "save_manifest", stopped)
    with pytest.raises(KeyboardInterrupt):
        store.write(4, {"ok": np.array([True, False, True, True])}, {"5": "broken 5"})
    again = EmbeddingStore(tmp_path / "s")
    assert again.done == 4 and again.bad_files() == {"1": "broken 1"}
    again.drop_unfinished_bad_files()
    lines = (tmp_path / "s" / "bad_files.jsonl").read_text().splitlines()
    assert [json.loads(line)["bad"] for line in lines] == [{"1": "broken 1"}]


def _record_syncs(monkeypatch) -> list[str]:
    """The events, in order, of mapped columns flushed ("map flushed"), pwrite-written ones synced
    ("rows synced") and the manifest written ("manifest"), each still done."""
    import os

    import spurfast.store as E
    events = []
    real_sync, real_flush, real_json = os.fdatasync, np.memmap.flush, E._write_json
    monkeypatch.setattr(os, "fdatasync", lambda fd: (events.append("rows synced"), real_sync(fd))[1])
    monkeypatch.setattr(np.memmap, "flush", lambda self: (events.append("map flushed"), real_flush(self))[1])
    monkeypatch.setattr(E, "_write_json", lambda path, obj, **k: (events.append("manifest"),
                                                                  real_json(path, obj, **k))[1])
    return events


def test_a_batchs_rows_reach_the_disk_before_the_manifest_says_done(tmp_path, monkeypatch):
    # a power cut after the manifest's replace must find the rows it marks done on disk: the
    # pwrite-written pixel column is fdatasync'd and the mapped columns msync'd first
    store = EmbeddingStore.create(tmp_path / "s", 4, {"pixels": ((4, 3, 2, 2), "uint8"),
                                                      "mu": ((4, 2), "float32")}, {})
    events = _record_syncs(monkeypatch)
    store.write(0, {"pixels": np.ones((2, 3, 2, 2), np.uint8), "mu": np.ones((2, 2), np.float32)})
    assert "manifest" in events
    before = events[:events.index("manifest")]
    assert "rows synced" in before and "map flushed" in before, events


def test_a_store_made_before_the_content_digest_was_recorded_resumes_and_is_kept(tmp_path):
    # stores written before the content digest was recorded have none to compare: such a store
    # (this fingerprint, no "content") is resumed, and --overwrite keeps it (made_from)
    from spurfast.data.sources import content_digest
    from spurfast.identity import fingerprint
    from spurfast.store import MANIFEST, made_from

    src, clf, vae = _setup(20)
    fp, content = fingerprint(src, clf, vae), content_digest(src)
    full = embed_pool(src, clf, vae, tmp_path / "a", num_classes=4, batch_size=8, progress=False)
    embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=8, progress=False, stop_after=1)
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    del manifest["content"]
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(manifest))
    assert made_from(tmp_path / "s", fp, content)
    resumed = embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=8, progress=False)
    assert resumed.complete
    np.testing.assert_array_equal(np.asarray(resumed["mu"]), np.asarray(full["mu"]))


def test_made_from_takes_a_damaged_manifest_for_no_store(tmp_path):
    # --overwrite asks made_from whether to keep the store: a manifest that is no JSON (a crash,
    # a hand edit) is not this run's store, not a JSONDecodeError stopping the run
    from spurfast.store import MANIFEST, made_from

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / MANIFEST).write_text('{"n": 20, "done"')
    (tmp_path / "sh" / "shards" / "0-of-2").mkdir(parents=True)
    (tmp_path / "sh" / "shards" / "0-of-2" / MANIFEST).write_text("")
    assert made_from(tmp_path / "s", "fp", "content") is False
    assert made_from(tmp_path / "sh", "fp", "content") is False


def test_the_store_columns_have_the_documented_dtypes(tmp_path):
    # EmbeddingStore's layout: feats float16 (half the disk of the widest column but probs),
    # labels int64 (what _sync_labels compares against and the steps read)
    src, clf, vae = _setup(8)
    store = embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=8, progress=False)
    want = {"pred": "int32", "conf": "float32", "probs": "float32", "mu": "float32", "feats": "float16",
            "labels": "int64", "ok": "bool"}
    assert {k: d for k, (_, d) in store.manifest["columns"].items()} == want
    assert {k: str(np.load(tmp_path / "s" / f"{k}.npy", mmap_mode="r").dtype) for k in want} == want


def test_an_empty_pool_is_refused_by_name(tmp_path):
    # without the check, check_outputs' first image failed as "indices into array must lie in [0, 0)"
    src = ArraySource(torch.rand(0, 1, 28, 28), np.zeros(0, np.int64))
    _, clf, vae = _setup(1)
    with pytest.raises(ValueError, match=r"pool .* is empty"):
        embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, progress=False)
    assert not (tmp_path / "s").exists()


def test_a_resumed_pass_embeds_only_the_rows_not_yet_done(tmp_path):
    # finished work is never redone: 3 batches of 8 on disk, the resume encodes the other 26 rows
    src, clf, vae = _setup()
    part = embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=8, progress=False, stop_after=3)
    assert part.done == 24
    seen, real = [], vae.encode

    def encode(x, *a, **k):
        seen.append(x.shape[0])
        return real(x, *a, **k)

    vae.encode = encode
    assert embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=8, progress=False).complete
    assert sum(seen) == 50 - 24


def test_a_store_keeps_the_compute_its_rows_were_begun_with(tmp_path, caplog):
    # the record is the first rows' compute: a resume elsewhere warns, and so does every later
    # one (the record rewritten by the first resume made the next say nothing); a store with no
    # row yet takes this run's compute without a word
    import logging

    from spurfast.store import MANIFEST
    src, clf, vae = _setup()
    kw = dict(num_classes=4, batch_size=16, progress=False)
    embed_pool(src, clf, vae, tmp_path / "s", stop_after=1, **kw)
    path = tmp_path / "s" / MANIFEST
    path.write_text(json.dumps(dict(json.loads(path.read_text()), compute="cuda:triton")))
    for stop in (2, None):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="spurfast.embed"):
            store = embed_pool(src, clf, vae, tmp_path / "s", stop_after=stop, **kw)
        assert "was begun computing on cuda with the triton encoder" in caplog.text
        assert json.loads(path.read_text())["compute"] == "cuda:triton"
    assert store.complete
    embed_pool(src, clf, vae, tmp_path / "e", stop_after=0, **kw)   # made, no row yet
    path = tmp_path / "e" / MANIFEST
    path.write_text(json.dumps(dict(json.loads(path.read_text()), compute="cuda:triton")))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spurfast.embed"):
        embed_pool(src, clf, vae, tmp_path / "e", **kw)
    assert "computing on" not in caplog.text
    assert json.loads(path.read_text())["compute"] == "cpu:torch"


def test_negative_penultimate_features_past_float16_are_clipped_to_minus_its_max(tmp_path):
    # the clip is symmetric: features below -65504 are stored as -65504, not as 0 or -inf
    src, clf, vae = _setup(16)
    real = clf.features
    clf.features = lambda x: -real(x) * 1e6 - 1e6   # every feature <= -1e6
    store = embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=8, progress=False)
    feats = np.asarray(store["feats"])
    assert feats.shape == (16, clf.fc2.in_features) and (feats == -65504.0).all()


def test_half_precision_logits_are_turned_into_float32_probabilities(tmp_path):
    # a classifier giving bfloat16 logits (autocast, a .bfloat16() head): its softmax in bfloat16
    # kept 3 significant digits, so conf and probs (stored as float32) were rounded
    class Bf16(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return (self.inner(x) * 3.0).to(torch.bfloat16)

    src, clf, vae = _setup(16)
    model = Bf16(clf).eval()
    store = embed_pool(src, model, vae, tmp_path / "s", num_classes=4, batch_size=8, progress=False)
    with torch.no_grad():
        want = torch.softmax(model(src.get_batch(np.arange(16))[0]).float(), 1).numpy()
    np.testing.assert_allclose(np.asarray(store["probs"]), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(store["conf"]), want.max(1), rtol=1e-5, atol=1e-7)


def test_a_new_stores_initial_columns_reach_the_disk_before_its_manifest(tmp_path, monkeypatch):
    # a shard store's "index" column is written at creation: msync'd before the manifest, so a
    # power cut cannot leave a manifest over an index of zeros (every row merged onto pool row 0)
    events = _record_syncs(monkeypatch)
    store = EmbeddingStore.create(tmp_path / "s", 3, {"index": ((3,), "int64")}, {},
                                  initial={"index": np.array([4, 6, 8])})
    assert events == ["map flushed", "manifest"]
    np.testing.assert_array_equal(np.asarray(store["index"]), [4, 6, 8])


def test_a_stale_sibling_shard_of_another_start_does_not_refuse_a_ranks_pass(tmp_path):
    # a sibling shard store covering another selection (another start: its own rank starts it
    # again) joins no merge: its loader is no reason to refuse this rank's pass
    from spurfast.data.folder import ImageFolderSource
    from spurfast.make_pool import PoolSpec, make_pool
    from spurfast.store import MANIFEST
    from spurfast.store_shards import shard_dir

    torch.manual_seed(0)
    clf, vae = SmallCNN(3, 10, 32).eval(), VAE(VAEConfig.for_images(3, 32, 6)).eval()
    make_pool(tmp_path / "pool", PoolSpec(n=24, seed=0), workers=1, progress=False)
    kw = dict(num_classes=10, batch_size=4, progress=False, num_workers=1, loader_backend="torch", num_shards=2)
    embed_pool(ImageFolderSource(tmp_path / "pool", size=32), clf, vae, tmp_path / "s", shard_id=1, stop_after=1,
               **kw)
    path = shard_dir(tmp_path / "s", 1, 2) / MANIFEST
    m = json.loads(path.read_text())
    assert m["done"] == 4 and m["start"] == 0 and m["loader"] == "torch"
    path.write_text(json.dumps(dict(m, loader="dali", decode="cpu", start=8)))   # a DALI run's, begun at 8
    store = embed_pool(ImageFolderSource(tmp_path / "pool", size=32), clf, vae, tmp_path / "s", shard_id=0, **kw)
    assert store.complete and store.n == 12 and store.manifest["loader"] == "torch"
