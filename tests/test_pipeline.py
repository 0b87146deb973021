"""run_discovery's early refusals, for API users as for the CLI."""
import logging
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from spurfast.data import ArraySource
from spurfast.data.folder import ImageFolderSource
from spurfast.models import VAE, VAEConfig, SmallCNN
import spurfast.pipeline as P
from spurfast import run_folder
from spurfast.store import EmbeddingStore
from spurfast.pipeline import run_discovery
from tests.helpers import assert_bitwise


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


def test_a_folder_pool_of_unreadable_files_is_named_with_one_of_them(tmp_path):
    # discovery refused it naming the run's store ("store RUN/store: only 0 readable image(s)"),
    # neither the pool nor that none of its files could be read
    (tmp_path / "pool").mkdir()
    for i in range(3):
        (tmp_path / "pool" / f"{i:02d}.png").write_bytes(b"not a png")
    pool = ImageFolderSource(tmp_path / "pool", size=16)
    with pytest.raises(ValueError, match=r"pool .*pool: only 0 of its 3 images could be read \(e\.g\. .*/00\.png: "):
        run_discovery(pool, SmallCNN(3, 2, 16), VAE(VAEConfig.for_images(3, 16, 4)), tmp_path / "o", num_classes=2,
                      progress=False)


def test_a_pool_naming_other_than_the_classifiers_classes_is_refused_before_any_work(tmp_path):
    # the CLI refused it; from the API the findings of classes past a short list went unnamed
    for names in (["zero", "one"], [str(i) for i in range(5)]):
        pool = ArraySource(torch.rand(8, 1, 28, 28), np.arange(8) % 4, class_names=names, name="named")
        with pytest.raises(ValueError, match=f"pool named names {len(names)} classes \\(its class_names\\), but the "
                                             f"classifier has 4"):
            run_discovery(pool, SmallCNN(1, 4, 28), VAE(VAEConfig.for_images(1, 28, 4)), tmp_path / "o", num_classes=4,
                          progress=False)
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["abc", "-3", "1.5", True, ""])
def test_make_planted_data_refuses_a_bad_n_poisoned_before_loading(value, monkeypatch):
    # API users (run_demo, make_planted_data) get the CLI's message, not int()'s
    import spurfast.pipeline as P
    monkeypatch.setattr(P, "load_digits", lambda *a, **k: pytest.fail("data loaded before the check"))
    with pytest.raises(ValueError, match="n_poisoned: expected an integer >= 0 or 'all'"):
        P.make_planted_data("digits", n_poisoned=value)


@pytest.mark.parametrize("name,value", [("n_suspect", -5), ("n_suspect", 2.5), ("n_suspect", True),
                                        ("n_train_per_class", -1), ("seed", -1)])
def test_make_planted_data_refuses_a_bad_count_or_seed_before_loading(name, value, monkeypatch):
    monkeypatch.setattr(P, "load_digits", lambda *a, **k: pytest.fail("data loaded before the check"))
    with pytest.raises(ValueError, match=f"{name}: expected an integer >= 0, got {value!r}"):
        P.make_planted_data("digits", **{name: value})


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


class _Embedded(Exception):
    pass


def test_another_clean_set_suspect_mask_or_no_confirmation_is_another_run(tmp_path, monkeypatch):
    """They change the findings: rerunning into the same directory with others silently
    rewrote findings.json.  The same inputs resume; a directory from before they were in
    the run id resumes too."""
    import json
    import spurfast.pipeline as P

    def stop(*a, **k):
        raise _Embedded
    monkeypatch.setattr(P.dist, "embed_pool_sharded", stop)
    torch.manual_seed(0)
    pool = ArraySource(torch.rand(12, 1, 16, 16), np.arange(12) % 2, name="pool")
    clean_a = ArraySource(torch.rand(5, 1, 16, 16), np.zeros(5, int), name="clean")
    clean_b = ArraySource(torch.rand(5, 1, 16, 16), np.zeros(5, int), name="clean")
    clf, vae = SmallCNN(1, 2, 16), VAE(VAEConfig.for_images(1, 16, 4))
    out = tmp_path / "run"

    def run(**kw):
        with pytest.raises(_Embedded):    # got past the output directory's check
            run_discovery(pool, clf, vae, out, num_classes=2, progress=False, **kw)

    run(clean=clean_a)
    run(clean=clean_a)                    # the same run: resumed
    first = json.loads((out / "run.json").read_text())["run_id"]
    for kw in ({"clean": clean_b}, {"clean": clean_a, "suspect": np.arange(12) < 3},
               {"clean": clean_a, "confirm": False}, {}):
        with pytest.raises(FileExistsError, match="already holds run"):
            run_discovery(pool, clf, vae, out, num_classes=2, progress=False, **kw)
    # a directory an earlier version made for this run (its id hashed no inputs) resumes
    fp, content = P.fingerprint(pool, clf, vae), P.content_digest(pool)
    old = P._digest(fp + content + json.dumps(P.asdict(P.DiscoverConfig()), sort_keys=True))
    (out / "run.json").write_text(json.dumps({"run_id": old}))
    run(clean=clean_a)
    assert json.loads((out / "run.json").read_text())["run_id"] == first


def test_backend_auto_spelled_out_is_the_default_run_unless_a_variable_picks_another(tmp_path, monkeypatch):
    # the help calls the two one choice, yet a rerun with --kmeans-backend auto was refused as
    # another run; where SPURFAST_BACKEND_KMEANS_ASSIGN asks for torch, they are two choices
    import json

    def stop(*a, **k):
        raise _Embedded
    monkeypatch.setattr(P.dist, "embed_pool_sharded", stop)
    for var in ("SPURFAST_BACKEND", "SPURFAST_BACKEND_KMEANS_ASSIGN", "SPURFAST_BACKEND_KMEANS_UPDATE"):
        monkeypatch.delenv(var, raising=False)
    torch.manual_seed(0)
    pool = ArraySource(torch.rand(12, 1, 16, 16), np.arange(12) % 2, name="pool")
    clf, vae = SmallCNN(1, 2, 16), VAE(VAEConfig.for_images(1, 16, 4))

    def run(out, backend):
        with pytest.raises(_Embedded):
            run_discovery(pool, clf, vae, out, num_classes=2, progress=False, confirm=False,
                          config=P.DiscoverConfig(backend=backend))

    run(tmp_path / "a", None)
    run(tmp_path / "a", "auto")                      # the same run: resumed
    # a run an earlier version made with "auto" spelled out (no fingerprint scheme recorded) resumes
    ids = json.loads((tmp_path / "a" / "run.json").read_text())["run_id"]
    fp, content = P.fingerprint(pool, clf, vae), P.content_digest(pool)
    old = P._digest(fp + content + json.dumps(P.asdict(P.DiscoverConfig(backend="auto")), sort_keys=True)
                    + json.dumps(P.run_inputs(None, None, False), sort_keys=True))
    (tmp_path / "a" / "run.json").write_text(json.dumps({"run_id": old}))
    run(tmp_path / "a", "auto")
    assert json.loads((tmp_path / "a" / "run.json").read_text())["run_id"] == ids
    monkeypatch.setenv("SPURFAST_BACKEND_KMEANS_ASSIGN", "torch")
    run(tmp_path / "b", None)
    with pytest.raises(FileExistsError, match="already holds run"):
        run_discovery(pool, clf, vae, tmp_path / "b", num_classes=2, progress=False, confirm=False,
                      config=P.DiscoverConfig(backend="auto"))


def test_a_second_process_on_the_same_output_directory_is_refused(tmp_path):
    """Two runs on one folder both exited 0, and every finding showed another's pictures: each
    applied the confirmed-first renaming to the same files.  The folder is locked per run."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    other = os.open(out, os.O_RDONLY)           # as another process holding it (another open file)
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(FileExistsError, match="is in use by another spurfast process"):
            run_folder.prepare_output(out, "r1", overwrite=False)
    finally:
        os.close(other)
    assert not (out / "run.json").exists()
    run_folder.prepare_output(out, "r1", overwrite=False)      # free again: taken, and held until released
    held = os.open(out, os.O_RDONLY)
    with pytest.raises(BlockingIOError):
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    run_folder.release_output(out)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(held)
    # a refusal keeps no hold: another run may use the folder next
    with pytest.raises(FileExistsError, match="already holds run r1"):
        run_folder.prepare_output(out, "r2", overwrite=False)
    assert str(out.resolve()) not in run_folder._HELD


def test_a_file_system_without_locks_warns_and_runs_unlocked(tmp_path, monkeypatch, caplog):
    # NFS without lockd answers flock with ENOLCK: every discover and demo was refused as
    # "in use by another spurfast process"
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="spurfast"):
        run_folder.prepare_output(out, "r1", overwrite=False)
    assert "cannot lock output directory" in caplog.text and "No locks available" in caplog.text
    assert run_folder.holds_output(out)   # the thread check still keeps this process's threads apart
    run_folder.release_output(out)
    assert str(out.resolve()) not in run_folder._HELD


def test_a_second_thread_on_the_same_output_directory_is_refused(tmp_path):
    """Two threads of one process (a service) ran on one folder: the process's lock let both
    in, and the folder ended with one run's findings.json beside the other's pictures."""
    import threading

    pool, clf, vae = _tiny()
    out = tmp_path / "run"
    took, done = threading.Event(), threading.Event()

    def other_run():
        run_folder.prepare_output(out, "r1", overwrite=False)
        took.set()
        done.wait(60)
        run_folder.release_output(out)

    t = threading.Thread(target=other_run)
    t.start()
    try:
        assert took.wait(60)
        assert not run_folder.holds_output(out)   # this thread does not hold it
        with pytest.raises(FileExistsError, match="in use by another thread of this process"):
            run_discovery(pool, clf, vae, out, num_classes=2, confirm=False, progress=False, overwrite=True)
        run_folder.release_output(out)   # not this thread's to release: still held
        assert str(out.resolve()) in run_folder._HELD
    finally:
        done.set()
        t.join()
    assert str(out.resolve()) not in run_folder._HELD
    run_discovery(pool, clf, vae, out, num_classes=2, confirm=False, progress=False, overwrite=True)


def test_a_float64_default_dtype_is_refused_before_any_work(tmp_path):
    """Under torch.set_default_dtype(torch.float64) load_classifier and load_vae built float64
    models without a word, and run_discovery embedded the whole pool before it failed with
    torch's "self (Double) and source (Float) must have the same scalar type"."""
    from spurfast import embed_pool, load_classifier, load_vae, save_classifier, save_vae
    from spurfast.models.train import train_classifier, train_vae
    pool, clf, vae = _tiny()
    save_classifier(clf, tmp_path / "clf.pt")
    save_vae(vae, tmp_path / "vae.pt")
    calls = {"run_discovery": lambda: run_discovery(pool, clf, vae, tmp_path / "run", num_classes=2, progress=False),
             "embed_pool": lambda: embed_pool(pool, clf, vae, tmp_path / "store", num_classes=2, progress=False),
             "load_classifier": lambda: load_classifier(tmp_path / "clf.pt"),
             "load_vae": lambda: load_vae(tmp_path / "vae.pt"),
             "classifier": lambda: train_classifier(pool, 2, epochs=1, progress=False),
             "VAE": lambda: train_vae(pool, VAEConfig.for_images(1, 16, 4), epochs=1, progress=False)}
    torch.set_default_dtype(torch.float64)
    try:
        for name, call in calls.items():
            with pytest.raises(TypeError, match=rf"^{name}: torch's default dtype is torch.float64 .*"
                                                r"torch.set_default_dtype\(torch.float32\)"):
                call()
    finally:
        torch.set_default_dtype(torch.float32)
    assert not (tmp_path / "run").exists() and not (tmp_path / "store").exists()


def _older_run(out):
    from spurfast.pipeline import prepare_output
    prepare_output(out, "an-older-run", overwrite=False)
    (out / "findings.json").write_text("{}")
    return out


@pytest.mark.parametrize("case", ["batch_size", "suspect", "suspect_nan", "suspect_half"])
def test_bad_batch_size_or_suspect_mask_is_refused_before_overwrite_deletes(tmp_path, case):
    # the loader refused batch_size 0 and discover() a short mask: after --overwrite had
    # deleted the old run (and after the embedding pass, for the mask); a NaN or 0.5 in a float
    # mask counted as suspect without a word
    pool = ArraySource(torch.rand(12, 1, 16, 16), np.arange(12) % 2, name="pool")
    out = _older_run(tmp_path / "run")
    gappy = np.zeros(12)
    gappy[4] = np.nan if case == "suspect_nan" else 0.5
    kw, want = {"batch_size": (({"batch_size": 0}, "batch_size must be an integer >= 1, got 0")),
                "suspect": ({"suspect": np.zeros(11, bool)}, r"suspect mask has shape \(11,\), expected \(12,\)"),
                "suspect_nan": ({"suspect": gappy}, r"suspect mask must hold True/False \(or 0/1\); 1 entries do not, "
                                                    r"e\.g\. suspect\[4\] = .*nan"),
                "suspect_half": ({"suspect": gappy}, r"suspect\[4\] = .*0\.5")}[case]
    with pytest.raises(ValueError, match=want):
        run_discovery(pool, SmallCNN(1, 2, 16), VAE(VAEConfig.for_images(1, 16, 4)), out, num_classes=2,
                      overwrite=True, progress=False, **kw)
    assert (out / "findings.json").is_file() and not (out / "store").exists()


def test_overwrite_through_a_symlinked_output_directory(tmp_path):
    # shutil.rmtree refuses a symlink: --overwrite of a linked --out ended in a traceback
    from spurfast.pipeline import prepare_output

    real = _older_run(tmp_path / "real")
    (real / "images").mkdir()
    (real / "images" / "a.png").write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("keep")
    (real / "link").symlink_to(tmp_path / "elsewhere")     # a link inside is removed, not followed
    link = tmp_path / "link"
    link.symlink_to(real)
    prepare_output(link, "new-run", overwrite=True)
    assert link.is_symlink() and sorted(p.name for p in real.iterdir()) == ["run.json"]
    assert (tmp_path / "elsewhere" / "keep.txt").read_text() == "keep"
    assert "new-run" in (real / "run.json").read_text()


def test_overwrite_names_what_it_deletes(tmp_path, caplog):
    """--overwrite empties a run's folder, notes of the user's own in it too: it did so
    without a word (README said a folder spurfast did not write is never deleted, which a
    user could read as "files it did not write")."""
    from spurfast.pipeline import prepare_output

    run = _older_run(tmp_path / "run")
    (run / "notes.md").write_text("mine")
    (run / "images").mkdir()
    with caplog.at_level("WARNING", logger="spurfast"):
        prepare_output(run, "new-run", overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["run.json"]
    assert f"--overwrite: deleting 3 entries of {run}: findings.json, images, notes.md" in caplog.text


def test_interrupted_overwrite_can_be_run_again(tmp_path, monkeypatch):
    # run.json was removed with the rest, in listing order: when it went before a big store
    # and the user pressed Ctrl-C, the same --overwrite command was refused ever after
    # ("holds files spurfast did not write")
    import pathlib
    import shutil

    from spurfast.pipeline import prepare_output

    out = _older_run(tmp_path / "run")
    (out / "store").mkdir()
    (out / "store" / "mu.npy").write_bytes(b"x")
    listing = pathlib.Path.iterdir
    monkeypatch.setattr(pathlib.Path, "iterdir",   # a filesystem that lists run.json first
                        lambda self: iter(sorted(listing(self), key=lambda p: p.name != "run.json")))

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_output(out, "new-run", overwrite=True)
    monkeypatch.undo()
    prepare_output(out, "new-run", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["run.json"] and "new-run" in (out / "run.json").read_text()


@pytest.mark.parametrize("case", ["num_classes", "empty", "pool_label", "clean_label", "pool_below", "clean_below"])
def test_wrong_num_classes_or_empty_pool_is_refused_before_overwrite_deletes(tmp_path, case):
    # the embedding pass refused them, after --overwrite had deleted the old run; labels past the
    # classifier's classes were not refused at all (a clean set's left the content control without
    # class images: natural content read as confirmed shortcuts), nor labels below -1 (unlabelled
    # everywhere but in the null, which made -1 and -2 two groups)
    n = 0 if case == "empty" else 12
    pool_labels = np.arange(n) % 2 + 7 * (case == "pool_label") - 3 * (case == "pool_below")
    clean_labels = np.arange(6) % 2 + 50 * (case == "clean_label") - 4 * (case == "clean_below")
    pool = ArraySource(torch.rand(n, 1, 16, 16), pool_labels, name="pool")
    clean = ArraySource(torch.rand(6, 1, 16, 16), clean_labels, name="clean")
    out = _older_run(tmp_path / "run")
    want = {"empty": "pool pool is empty", "num_classes": "classifier outputs 2 logits; expected 3 classes",
            "pool_label": r"pool pool has label 8, but the classifier has 3 classes \(labels 0\.\.2; -1 = unlabelled\)",
            "clean_label": "clean set clean has label 51, but the classifier has 3 classes",
            "pool_below": r"pool pool has label -3; labels are 0\.\.2, or -1 for an unlabelled image",
            "clean_below": r"clean set clean has label -4; labels are 0\.\.2, or -1"}[case]
    with pytest.raises(ValueError, match=want):
        run_discovery(pool, SmallCNN(1, 2 if case == "num_classes" else 3, 16), VAE(VAEConfig.for_images(1, 16, 4)),
                      out, num_classes=3, overwrite=True, progress=False, clean=clean)
    assert (out / "findings.json").is_file() and not (out / "store").exists()


def test_a_folder_pool_with_names_that_are_not_utf8_runs_and_reports(tmp_path):
    # such names crashed the store's legacy identity (a hash of the raw path) and then the
    # report (a bad file named by its raw path could not be written as UTF-8)
    import json
    import os

    root = os.fsencode(tmp_path / "pool")
    rng = np.random.default_rng(0)
    for c in (b"c0", b"c1"):
        os.makedirs(os.path.join(root, c))
        for k in range(6):
            name = os.path.join(root, c, b"im\xff%d.png" % k if k % 2 else b"im%d.png" % k)
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(os.fsdecode(name))
    open(os.path.join(root, b"c0", b"bad\xfe.png"), "wb").close()
    pool = ImageFolderSource(os.fsdecode(root), size=16)
    torch.manual_seed(0)
    out = tmp_path / "run"
    run_discovery(pool, SmallCNN(3, 2, 16), VAE(VAEConfig.for_images(3, 16, 4)), out, num_classes=2,
                  confirm=False, progress=False, loader_backend="torch")
    bad = json.loads((out / "bad_files.json").read_text())
    assert list(bad) == [str(tmp_path / "pool" / "c0") + "/bad\\xfe.png"], bad
    assert "bad\\xfe.png" in (out / "report.html").read_text(encoding="utf-8")


def _tiny():
    torch.manual_seed(0)
    pool = ArraySource(torch.rand(24, 1, 16, 16), np.arange(24) % 2, name="pool")
    return pool, SmallCNN(1, 2, 16), VAE(VAEConfig.for_images(1, 16, 4))


def test_a_vae_not_of_spurfast_is_refused_before_overwrite_deletes(tmp_path):
    """A VAE of one's own (encode and decode, no config) failed as "'MyVAE' object has no
    attribute 'config'" in the embedding pass, after --overwrite had emptied the folder."""
    class MyVAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = torch.nn.Linear(256, 8), torch.nn.Linear(4, 256)

        def encode(self, x):
            h = self.enc(x.flatten(1))
            return h[:, :4], h[:, 4:]

        def decode(self, z):
            return self.dec(z).view(-1, 1, 16, 16)

    pool, clf, _ = _tiny()
    out = _older_run(tmp_path / "run")
    with pytest.raises(TypeError, match=r"the VAE \(MyVAE\) is not a spurfast VAE: it lacks config \(in_channels, "
                                        r"image_size, latent_dim\); load one with spurfast.load_vae"):
        run_discovery(pool, clf, MyVAE(), out, num_classes=2, confirm=False, progress=False, overwrite=True)
    assert (out / "findings.json").is_file()


def test_the_models_come_back_in_the_mode_they_came_in(tmp_path):
    """A classifier mid-training came back in eval mode (its dropout off), a refused run's too."""
    pool, _, vae = _tiny()
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(256, 2)).train()
    clf[1].eval()   # a part the caller froze stays so
    vae.train()
    run_discovery(pool, clf, vae, tmp_path / "run", num_classes=2, confirm=False, progress=False)
    assert [clf.training, clf[1].training, clf[2].training, vae.training] == [True, False, True, True]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        run_discovery(pool=pool, classifier=clf, vae=vae, out_dir=tmp_path / "file" / "run", num_classes=2,
                      confirm=False, progress=False)
    assert [clf.training, clf[1].training, vae.training] == [True, False, True]


def test_the_steps_after_the_embedding_pass_decode_in_eval_mode(tmp_path):
    # embed_pool now gives the caller's mode back, and characterise and the residual scan
    # decoded with a VAE in train mode (batch norm on batch statistics, dropout on)
    from spurfast.residual import ResidualConfig

    class WatchedVAE(VAE):
        def decode(self, z):
            modes.append(self.training)
            return super().decode(z)

    modes = []
    pool, clf, _ = _tiny()
    vae = WatchedVAE(VAEConfig.for_images(1, 16, 4)).train()
    run_discovery(pool, clf, vae, tmp_path / "run", num_classes=2, confirm=False, progress=False,
                  residual=ResidualConfig(min_images=2), config=P.DiscoverConfig(fdr=0.99, n_null=3, max_null=3))
    assert modes and not any(modes), modes
    assert vae.training


def test_embed_pool_gives_the_models_back_in_their_mode(tmp_path):
    # the public step alone (run_discovery restored them) left a model mid-training in eval mode
    from spurfast import embed_pool
    pool, clf, vae = _tiny()
    clf.train()
    vae.train()
    embed_pool(pool, clf, vae, tmp_path / "store", num_classes=2, progress=False)
    assert [clf.training, vae.training] == [True, True]


@pytest.mark.parametrize("var,says", [("SPURFAST_BACKEND_KMEANS_ASIGN", "no op is named 'kmeans_asign'"),
                                      ("SPURFAST_BACKEND_kmeans_assign", "is never read: the op is spelt in upper "
                                                                         "case, SPURFAST_BACKEND_KMEANS_ASSIGN")])
def test_a_backend_variable_no_op_reads_is_refused_by_the_api_too(tmp_path, monkeypatch, var, says):
    """`spurfast discover` refused it; run_discovery went on with auto without a word."""
    from spurfast.backends import BackendUnavailable

    monkeypatch.setenv(var, "torch")
    pool, clf, vae = _tiny()
    with pytest.raises(BackendUnavailable, match=re.escape(says)):
        run_discovery(pool, clf, vae, tmp_path / "run", num_classes=2, confirm=False, progress=False)
    assert not (tmp_path / "run").exists()


def test_overwrite_keeps_the_store_of_this_pool_and_these_models(tmp_path, caplog, monkeypatch):
    # a rerun with only a discovery setting changed is another run: --overwrite deleted its
    # store, and the whole pool (hours at ImageNet scale) was classified and embedded again
    import logging

    import spurfast.embed as E
    from spurfast.discover import DiscoverConfig

    pool, clf, vae = _tiny()
    out = tmp_path / "run"
    run_discovery(pool, clf, vae, out, num_classes=2, confirm=False, progress=False)
    (out / "images" / "old.png").write_bytes(b"x")     # the old run's other files go
    mu = (out / "store" / "mu.npy").read_bytes()
    with pytest.raises(FileExistsError, match=r"pass --overwrite \(its embedding store, of this pool and these "
                                              r"models, is kept and reused\)"):
        run_discovery(pool, clf, vae, out, num_classes=2, confirm=False, progress=False,
                      config=DiscoverConfig(fdr=0.1))
    monkeypatch.setattr(E.EmbeddingStore, "write", lambda *a, **k: pytest.fail("the kept store was embedded again"))
    with caplog.at_level(logging.INFO, logger="spurfast"):
        run_discovery(pool, clf, vae, out, num_classes=2, confirm=False, progress=False,
                      config=DiscoverConfig(fdr=0.1), overwrite=True)
    monkeypatch.undo()
    assert "keeping the embedding store" in caplog.text
    assert (out / "store" / "mu.npy").read_bytes() == mu and not (out / "images" / "old.png").exists()
    # a store of other models goes, as before
    other = VAE(VAEConfig.for_images(1, 16, 4))
    with pytest.raises(FileExistsError, match=r"pass --overwrite$"):
        run_discovery(pool, clf, other, out, num_classes=2, confirm=False, progress=False)
    run_discovery(pool, clf, other, out, num_classes=2, confirm=False, progress=False, overwrite=True)
    assert (out / "store" / "mu.npy").read_bytes() != mu
    assert EmbeddingStore(out / "store").manifest["fingerprint"] == P.fingerprint(pool, clf, other)


def test_an_interrupted_run_json_write_leaves_the_directory_usable(tmp_path, monkeypatch):
    # run.json was written in place: an interruption mid-write left a truncated marker, and
    # spurfast then refused its own run directory ("files spurfast did not write")
    import pathlib

    from spurfast.pipeline import prepare_output

    out, fresh = _older_run(tmp_path / "run"), tmp_path / "fresh"

    def torn(src, dst, *a, **k):   # interrupted with the new text half written
        pathlib.Path(src).write_text('{"ru')
        raise KeyboardInterrupt
    for d in (out, fresh):   # a run being resumed, a run's first write
        monkeypatch.setattr(os, "replace", torn)
        with pytest.raises(KeyboardInterrupt):
            prepare_output(d, "an-older-run", overwrite=False)
        monkeypatch.undo()
        prepare_output(d, "an-older-run", overwrite=False)
    assert sorted(p.name for p in out.iterdir()) == ["findings.json", "run.json"]
    assert sorted(p.name for p in fresh.iterdir()) == ["run.json"]


def _ended_pid() -> str:
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()


def test_a_folder_left_with_only_a_half_written_first_run_json_is_used(tmp_path):
    """A run killed while writing its first run.json left only run.json.PID.tmp, and every
    rerun, --overwrite too, refused the folder as holding "files spurfast did not write"."""
    from spurfast.pipeline import prepare_output
    gone = _ended_pid()
    out = tmp_path / "run"
    out.mkdir()
    (out / f"run.json.{gone}.tmp").write_text('{"run_id": "ab')
    prepare_output(out, "run-abc", overwrite=False)
    assert [p.name for p in out.iterdir()] == ["run.json"]
    (out / "run.json").unlink()
    (out / f"run.json.{gone}.tmp").write_text("")
    (out / "photo.png").write_text("a user's")   # not only the leftover: still refused
    with pytest.raises(FileExistsError, match="spurfast did not write"):
        prepare_output(out, "run-abc", overwrite=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / f"run.json.{os.getppid()}.tmp").write_text("")   # a live writer's: not taken
    with pytest.raises(FileExistsError, match="spurfast did not write"):
        prepare_output(other, "run-abc", overwrite=False)


def test_a_rerun_leaves_no_finding_files_of_an_earlier_pass(tmp_path):
    # a rerun of the same run (corrected labels: the same run, maybe fewer findings) rewrote
    # the images and rankings of its findings and left those of findings that are gone, and
    # an interrupted re-ranking's staged images, beside them
    pool, clf, vae = _tiny()
    out = tmp_path / "run"
    run_discovery(pool, clf, vae, out, num_classes=2, confirm=False, progress=False)
    gone = _ended_pid()
    # and the temporary files of a pass killed mid-write (a ranking's is a link to its whole data)
    stale = [out / "images" / "finding7_grid.png", out / "images" / ".rerank2_finding1_mask.png",
             out / "rankings" / "finding7.npy", out / "rankings" / f"finding1.npy.{gone}.tmp",
             out / "images" / f"finding2_mask.png.{gone}.tmp"]
    for f in stale:
        f.write_bytes(b"x")
    (out / "images" / "notes.txt").write_text("mine")
    (out / "images" / f"notes.txt.{gone}.tmp").write_text("not a finding's: kept")
    doc, _, _ = run_discovery(pool, clf, vae, out, num_classes=2, confirm=False, progress=False)
    assert not any(f.exists() for f in stale)
    assert (out / "images" / "notes.txt").read_text() == "mine" and (out / "images" / f"notes.txt.{gone}.tmp").exists()
    assert sorted(p.name for p in (out / "rankings").iterdir()) == sorted(f"finding{f['rank']}.npy"
                                                                         for f in doc["findings"])


def test_a_rerun_stopped_before_its_documents_leaves_no_old_findings_json_over_new_pictures(tmp_path, monkeypatch,
                                                                                          capsys):
    # the rerun replaced the pictures (discovery order) and was stopped before it wrote its
    # findings.json: the old one, confirmed findings first, named the new pass's pictures of
    # other findings, and `spurfast report` showed them without a word
    import spurfast.pipeline as pipeline
    from spurfast.cli import main

    pool, clf, vae = _tiny()
    out = tmp_path / "run"
    run_discovery(pool, clf, vae, out, num_classes=2, confirm=False, progress=False)
    assert (out / "findings.json").is_file()

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "pattern_rankings", stopped)   # after the new pictures
    with pytest.raises(KeyboardInterrupt):
        run_discovery(pool, clf, vae, out, num_classes=2, confirm=False, progress=False)
    documents = ("findings.json", "findings.csv", "clusters.csv", "report.html")
    assert [n for n in documents if (out / n).exists()] == []
    capsys.readouterr()
    assert main(["report", "--run", str(out)]) == 2
    assert "holds no findings.json" in capsys.readouterr().err
    monkeypatch.undo()
    doc, _, _ = run_discovery(pool, clf, vae, out, num_classes=2, confirm=False, progress=False)
    assert all((out / n).is_file() for n in documents) and doc["findings"] is not None


def test_an_interrupted_bad_files_write_leaves_the_run_reportable(tmp_path, monkeypatch):
    # bad_files.json was written in place: Ctrl-C mid-write left a truncated file that
    # `spurfast report` (read_bad_files) then failed to parse
    import pathlib

    from spurfast.run_folder import read_bad_files

    pool, clf, vae = _tiny()
    out = tmp_path / "run"
    run_discovery(pool, clf, vae, out, num_classes=2, confirm=False, progress=False)
    real = os.replace

    def torn(src, dst, *a, **k):   # interrupted with bad_files.json half written
        if pathlib.Path(dst).name == "bad_files.json":
            pathlib.Path(src).write_text("{")
            raise KeyboardInterrupt
        return real(src, dst, *a, **k)
    monkeypatch.setattr(os, "replace", torn)
    with pytest.raises(KeyboardInterrupt):
        run_discovery(pool, clf, vae, out, num_classes=2, confirm=False, progress=False)
    monkeypatch.undo()
    assert read_bad_files(out) == {}


def test_an_overwrite_interrupted_before_its_run_json_keeps_the_directory_usable(tmp_path, monkeypatch):
    # --overwrite deleted the old run.json before writing the new one: interrupted between
    # the two with the store kept, the directory held only store/ and was refused ever
    # after ("holds files spurfast did not write"), even with --overwrite
    import pathlib

    from spurfast.pipeline import prepare_output

    out = _older_run(tmp_path / "run")
    (out / "store").mkdir()
    (out / "store" / "mu.npy").write_bytes(b"x")
    real = os.replace

    def interrupted(src, dst, *a, **k):
        if pathlib.Path(dst).name == "run.json":
            raise KeyboardInterrupt
        return real(src, dst, *a, **k)
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_output(out, "new-run", overwrite=True, keep_store=lambda store: True)
    monkeypatch.undo()
    prepare_output(out, "new-run", overwrite=True, keep_store=lambda store: True)
    assert sorted(p.name for p in out.iterdir()) == ["run.json", "store"] and "new-run" in (out / "run.json").read_text()
    assert (out / "store" / "mu.npy").read_bytes() == b"x"


@pytest.mark.parametrize("case", ["encoder", "loader"])
def test_a_misspelt_backend_is_refused_before_overwrite_deletes(tmp_path, case):
    # the encoder and the loader resolved their backend at the first batch: after --overwrite
    # had deleted the old run (API users; the CLI checks its flags first)
    from spurfast.backends import BackendUnavailable

    torch.manual_seed(0)
    pool = _folder(tmp_path / "pool")
    out = _older_run(tmp_path / "run")
    with pytest.raises(BackendUnavailable, match=f"backend 'tritn' does not implement '{case}'"):
        run_discovery(pool, SmallCNN(3, 2, 16), VAE(VAEConfig.for_images(3, 16, 4)), out, num_classes=2,
                      overwrite=True, progress=False, **{f"{case}_backend": "tritn"})
    assert (out / "findings.json").is_file() and not (out / "store").exists()


def test_a_device_torch_cannot_compute_on_is_refused_before_overwrite_deletes(tmp_path):
    """'meta' passed every check and failed in discovery (Tensor.item() on meta tensors) after
    --overwrite had deleted the old run, leaving the caller's models on meta."""
    from spurfast.discover import DiscoverConfig

    pool = ArraySource(torch.rand(12, 1, 16, 16), np.arange(12) % 2, name="pool")
    out = _older_run(tmp_path / "run")
    clf, vae = SmallCNN(1, 2, 16), VAE(VAEConfig.for_images(1, 16, 4))
    with pytest.raises(ValueError, match="run_discovery: device 'meta': torch cannot compute there"):
        run_discovery(pool, clf, vae, out, num_classes=2, overwrite=True, progress=False,
                      config=DiscoverConfig(device="meta"))
    assert (out / "findings.json").is_file() and not (out / "store").exists()
    assert next(clf.parameters()).device.type == "cpu"


def test_an_overwrite_interrupted_while_deleting_the_old_store_leaves_no_store_to_resume(tmp_path, monkeypatch):
    # --overwrite with other models deletes the old store; Ctrl-C in that rmtree, where the
    # listing is in creation order (btrfs, small XFS folders), left the old manifest without
    # its columns, and run.json still named the old run: rerunning it resumed that store and
    # crashed (No such file: ...npy) every time, --overwrite or not
    import shutil
    from pathlib import Path

    pool, clf, vae = _tiny()
    out = tmp_path / "run"
    run_discovery(pool, clf, vae, out, num_classes=2, confirm=False, progress=False)
    real = shutil.rmtree

    def interrupted(path, *a, **k):
        if Path(path).name != "store":
            return real(path, *a, **k)
        for f in Path(path).rglob("*.npy"):
            f.unlink()
        raise KeyboardInterrupt
    monkeypatch.setattr(shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_discovery(pool, clf, VAE(VAEConfig.for_images(1, 16, 4)), out, num_classes=2, confirm=False,
                      progress=False, overwrite=True)
    monkeypatch.undo()
    doc, _, store = run_discovery(pool, clf, vae, out, num_classes=2, confirm=False, progress=False)
    assert store.complete and np.asarray(store["mu"]).shape == (24, 4) and (out / "findings.json").is_file()


def test_planted_data_with_fewer_training_images_than_suspects(caplog):
    # Fashion-MNIST with n_train_per_class=50 (500 training images) and the default 1,000
    # suspects failed in numpy ("Cannot take a larger sample than population"), naming nothing
    from spurfast.data.builtin import find_fashion_mnist

    if not find_fashion_mnist(None):
        pytest.skip("Fashion-MNIST not found")
    with caplog.at_level("WARNING", logger="spurfast"):
        data = P.make_planted_data("fashion-mnist", n_train_per_class=50, n_poisoned="10")
    assert int(data.suspect.sum()) == len(data.train) == 500
    assert "n_suspect=1000: the training split holds 500 images" in caplog.text


def test_the_steps_that_reread_images_decode_where_the_run_computes(tmp_path, monkeypatch):
    # pattern ranking and training support re-read the pool through its loader without the
    # run's device: DALI decoded on a GPU whenever torch saw one, --device cpu included
    from spurfast.discover import DiscoverConfig

    seen = []
    monkeypatch.setattr(P, "pattern_rankings", lambda *a, **k: seen.append(k.get("device")))
    pool, clf, vae = _tiny()
    run_discovery(pool, clf, vae, tmp_path / "run", num_classes=2, confirm=False, progress=False,
                  config=DiscoverConfig(device="cpu:0"))
    assert seen == ["cpu:0"]


def test_the_steps_that_reread_images_use_the_loader_that_made_the_store(tmp_path, monkeypatch, caplog):
    # a finished run rerun (or a store kept by --overwrite) with the other --loader-backend
    # embeds nothing, but its pattern ranking read the pool through the other loader, whose
    # pixels differ a little: the findings changed with the rerun's flag.  The rerun says that
    # its flag was not used (a notice at INFO level alone), and findings.json names the loader
    # (the two loaders' findings differ on a large pool; the run id does not hold the loader)
    import json
    import logging

    pytest.importorskip("nvidia.dali")
    seen = []
    monkeypatch.setattr(P, "pattern_rankings", lambda *a, **k: seen.append(k["loader_backend"]))
    torch.manual_seed(0)
    pool, clf, vae = _folder(tmp_path / "pool"), SmallCNN(3, 2, 16), VAE(VAEConfig.for_images(3, 16, 4))
    for backend in ("torch", "dali"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="spurfast"):
            run_discovery(pool, clf, vae, tmp_path / "run", num_classes=2, confirm=False, progress=False,
                          loader_backend=backend)
        doc = json.loads((tmp_path / "run" / "findings.json").read_text())
        assert doc["config"]["embedding"] == {"loader": "torch"}, doc["config"].get("embedding")
    assert "--loader-backend dali: the embedding store kept from an earlier pass of this run was decoded by the " \
           "'torch' loader" in caplog.text, caplog.text
    assert EmbeddingStore(tmp_path / "run" / "store").manifest["loader"] == "torch"
    assert seen == ["torch", "torch"]
    # a store DALI decoded on the CPU is re-read on the CPU by a run on a GPU
    store = EmbeddingStore(tmp_path / "run" / "store")
    store.manifest.update(loader="dali", decode="cpu")
    assert P._reread_loader(pool, store, "dali", "cuda:1") == {"loader_backend": "dali", "device": "cpu"}
    store.manifest.update(decode="gpu")
    assert P._reread_loader(pool, store, None, "cuda:1") == {"loader_backend": None, "device": "cuda:1"}
    # asked for by its variable: said too (an INFO line alone, unseen without -v)
    store.manifest.update(loader="torch", decode="cpu")
    monkeypatch.setenv("SPURFAST_BACKEND_LOADER", "dali")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spurfast"):
        assert P._reread_loader(pool, store, None, "cpu")["loader_backend"] == "torch"
    assert "SPURFAST_BACKEND_LOADER=dali: the embedding store kept from an earlier pass" in caplog.text, caplog.text


def _jpeg_folder(root, n=30):
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    for i in range(n):   # JPEGs resized on loading: the two loaders' pixels differ (up to 1/255)
        Image.fromarray(rng.integers(0, 256, (23, 23, 3), dtype=np.uint8)).save(root / f"{i:02d}.jpg", quality=80)
    return ImageFolderSource(root, size=16)


def test_a_dali_run_reads_pictures_and_clean_images_as_its_store_was_decoded(tmp_path, monkeypatch):
    # characterise and confirmation read pool images through get_batch (PIL) in a run whose
    # store DALI decoded: a finding's mask differed in 25 of 299 pixels, its control flip rate
    # moved 0.08 -> 0.10, against the same pool given as arrays of DALI's pixels
    pytest.importorskip("nvidia.dali")
    from spurfast.data.loader_torch import iter_batches
    from spurfast.data.reread import StoreLoaderReads, read_as_stored

    pool = _jpeg_folder(tmp_path / "pool")
    idx = [7, 3, 3, 29, 0]   # any order, repeats too
    every = torch.cat([b.images for b in iter_batches(pool, 64, backend="dali", device="cpu")])
    dali = every[idx]
    reads = read_as_stored(pool, "dali", "cpu")
    assert isinstance(reads, StoreLoaderReads)
    x, y = reads.get_batch(idx)
    assert_bitwise(x, dali, "images read as stored (DALI)")
    assert y.tolist() == pool.labels()[idx].tolist()
    assert not torch.equal(x, pool.get_batch(idx)[0]), "the test's JPEGs decode alike in both loaders"
    assert reads.get_batch([])[0].shape == (0, 3, 16, 16) and len(reads) == len(pool)
    assert read_as_stored(pool, "torch", "cpu") is pool   # the torch loader decodes as get_batch does
    from spurfast.data.sources import content_digest
    assert len(content_digest(reads)) == 16   # raised AttributeError: a wrapper with a base has no subset indices
    array_pool = ArraySource(torch.rand(4, 1, 16, 16), np.zeros(4, int))
    assert read_as_stored(array_pool, "dali", "cpu") is array_pool
    # run_discovery hands the store's reads to the steps that read a batch at a time
    seen = {}
    monkeypatch.setattr(P, "characterise", lambda result, store, source, *a, **k: seen.update(characterise=source))
    torch.manual_seed(0)
    import spurfast.residual
    from spurfast.residual import ResidualConfig
    monkeypatch.setattr(spurfast.residual, "add_residual_findings", lambda *a, **k: seen.update(residual=k["reads"]))
    from spurfast.pixel_cache import StorePixelReads
    clf, vae = SmallCNN(3, 2, 16), VAE(VAEConfig.for_images(3, 16, 4))
    # the store's own pixel rows where it kept them (spurfast.pixel_cache), else DALI's decode again
    for gb, kind in (("4", StorePixelReads), ("0", StoreLoaderReads)):
        monkeypatch.setenv("SPURFAST_PIXEL_CACHE_GB", gb)
        seen.clear()
        run_discovery(pool, clf, vae, tmp_path / f"run{gb}", num_classes=2, confirm=False, progress=False,
                      loader_backend="dali", residual=ResidualConfig())
        assert isinstance(seen["characterise"], kind) and seen["characterise"].base is pool
        assert seen["residual"] is seen["characterise"]
        if kind is StorePixelReads:
            assert_bitwise(seen["characterise"].get_batch(idx)[0], dali, "images read from the store's pixels")


@pytest.mark.parametrize("case", ["list of names", "list of indices", "manifest a list"])
def test_a_hand_edited_store_record_of_bad_files_is_named(tmp_path, case):
    # `spurfast report` on a run without bad_files.json reads the store's manifest: a bad_files
    # list failed in dict() naming nothing (or with a TypeError traceback), a manifest list with
    # an AttributeError
    import json
    from spurfast.run_folder import read_bad_files
    (tmp_path / "store").mkdir()
    manifest = {"n": 4, "done": 4, "columns": {},
                "bad_files": ["a.png", "b.png"] if case == "list of names" else [1, 3]}
    (tmp_path / "store" / "manifest.json").write_text(json.dumps([manifest] if case == "manifest a list"
                                                                 else manifest))
    with pytest.raises(ValueError, match="manifest.json.*expected an object"):
        read_bad_files(tmp_path)


def test_a_store_record_of_bad_files_as_pairs_still_reads(tmp_path):
    import json
    from spurfast.run_folder import read_bad_files
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "manifest.json").write_text(json.dumps({"n": 4, "done": 4, "columns": {},
                                                                  "bad_files": [[3, "truncated"]]}))
    assert read_bad_files(tmp_path) == {"pool index 3": "truncated"}


def test_overwrite_that_keeps_the_store_keeps_the_discovery_work_too(tmp_path, monkeypatch):
    # discovery's neighbour search and null are kept under a hash of their inputs, for another
    # k, fdr or n_null to reuse; but such a run is another run, and --overwrite deleted them:
    # both were computed again (minutes each at ImageNet scale on a CPU)
    import spurfast.discover as D
    from spurfast.discover import DiscoverConfig

    searches = []
    real = D.latent_neighbours
    monkeypatch.setattr(D, "latent_neighbours", lambda *a, **k: (searches.append(1), real(*a, **k))[1])
    pool, clf, vae = _tiny()
    out = tmp_path / "run"
    run_discovery(pool, clf, vae, out, num_classes=2, confirm=False, progress=False, config=DiscoverConfig(n_null=4))
    clusters = (out / "clusters.csv").read_text()
    run_discovery(pool, clf, vae, out, num_classes=2, confirm=False, progress=False, overwrite=True,
                  config=DiscoverConfig(n_null=4, fdr=0.1))
    assert len(searches) == 1
    assert (out / "clusters.csv").read_text() == clusters   # the same scores and p-values
    # a store of other models goes, and its discovery work with it
    run_discovery(pool, clf, VAE(VAEConfig.for_images(1, 16, 4)), out, num_classes=2, confirm=False,
                  progress=False, overwrite=True, config=DiscoverConfig(n_null=4))
    assert len(searches) == 2


def test_a_bad_loader_backend_for_an_unlabelled_clean_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    # an .npz pool goes through no loader, but confirmation predicts an unlabelled clean folder
    # through one: a misspelt backend failed there, after the embedding pass and discovery
    from spurfast.backends import BackendUnavailable

    pool, clf, vae = _tiny()
    _folder(tmp_path / "clean")
    clean = ImageFolderSource(tmp_path / "clean", size=16, channels=1)   # no class folders: unlabelled
    assert (clean.labels() < 0).all()
    monkeypatch.setattr(P.dist, "embed_pool_sharded", lambda *a, **k: pytest.fail("embedded before the check"))
    with pytest.raises(BackendUnavailable, match="backend 'tritn' does not implement 'loader'"):
        run_discovery(pool, clf, vae, tmp_path / "run", num_classes=2, clean=clean, progress=False,
                      loader_backend="tritn")
    # without confirmation, or with a clean set of arrays, no loader reads it: the flag is not checked
    for i, kw in enumerate(({"confirm": False}, {"clean": ArraySource(torch.rand(4, 1, 16, 16), np.zeros(4, int))})):
        with pytest.raises(pytest.fail.Exception, match="embedded before the check"):
            run_discovery(pool, clf, vae, tmp_path / f"run{i}", num_classes=2, progress=False, loader_backend="tritn",
                          **{"clean": clean, **kw})


def test_an_output_directory_below_a_file_is_named(tmp_path):
    # it failed at mkdir with a bare "[Errno 20] Not a directory: '.../clf.pt/x'"
    (tmp_path / "clf.pt").write_text("x")
    with pytest.raises(NotADirectoryError, match=f"output directory {tmp_path}/clf.pt/x/y: {tmp_path}/clf.pt is a file, "
                                                  "not a folder"):
        P.prepare_output(tmp_path / "clf.pt" / "x" / "y", "run", False)


def test_overwrite_resolves_each_folder_of_the_pool_once_and_still_finds_what_lies_in_the_run(tmp_path, monkeypatch):
    # --overwrite resolved every pool file (about 15 s per 100,000 files here, minutes for an ImageNet pool)
    from pathlib import Path

    out = tmp_path / "run"
    (out / "imgs").mkdir(parents=True)
    (out / "imgs" / "a.png").write_text("x")
    (tmp_path / "pool" / "c0").mkdir(parents=True)
    (tmp_path / "pool" / "c0" / "link.png").symlink_to(out / "imgs" / "a.png")
    (tmp_path / "pool" / "c1").symlink_to(out / "imgs")
    files = [str(tmp_path / "pool" / f"c{i % 2}" / f"{i}.png") for i in range(400)]
    calls = []
    real = Path.resolve
    monkeypatch.setattr(Path, "resolve", lambda self, *a, **k: calls.append(self) or real(self, *a, **k))
    assert run_folder._inside(out, [str(tmp_path / "pool")] + files[::2]) is None
    assert len(calls) <= 3, len(calls)
    # a file of a folder linked into the run, a file linked into it, the run itself, a relative path
    assert run_folder._inside(out, files) == files[1]
    link = str(tmp_path / "pool" / "c0" / "link.png")
    assert run_folder._inside(out, [files[0], link]) == link
    assert run_folder._inside(out, [str(tmp_path / "run" / ".")]) == str(tmp_path / "run" / ".")
    monkeypatch.chdir(out)
    assert run_folder._inside(out, ["a.png"]) == "a.png"
    assert run_folder._inside(out, ["../x.png", "imgs/.."]) == "imgs/.."
    assert run_folder._inside(out / "imgs", [str(out / "imgsx" / "b.png"), str(out)]) is None


def test_overwrite_refuses_a_run_folder_through_whose_link_the_pool_is_read(tmp_path):
    # the pool's files resolved outside the run and were called safe: --overwrite deleted the
    # link, and the new run's store called every image unreadable (a rerun resumed that store)
    out = tmp_path / "run"
    P.prepare_output(out, "older", overwrite=False)
    run_folder.release_output(out)
    (tmp_path / "real" / "a").mkdir(parents=True)
    (tmp_path / "real" / "a" / "0.png").write_text("x")
    (out / "mypool").symlink_to(tmp_path / "real")
    files = [str(out / "mypool" / "a" / "0.png")]
    assert run_folder._inside(out, files) == files[0]
    with pytest.raises(FileExistsError, match=f"--overwrite would delete output directory {out}, which holds "
                                              f"{files[0]} that this run reads"):
        P.prepare_output(out, "newer", overwrite=True, protect=files)
    assert (out / "mypool").is_symlink() and (tmp_path / "real" / "a" / "0.png").exists()
    linked_out = tmp_path / "out-link"   # --out given as a link, the pool spelled through its target
    linked_out.symlink_to(out)
    assert run_folder._inside(linked_out, files) == files[0]
    assert run_folder._inside(linked_out, [str(linked_out / "mypool" / "a" / "0.png")]) is not None


def test_an_output_directory_that_is_a_dangling_symlink_is_named(tmp_path):
    # mkdir failed with a bare "[Errno 17] File exists: '.../out'"
    (tmp_path / "out").symlink_to(tmp_path / "unmounted" / "run")
    for out in (tmp_path / "out", tmp_path / "out" / "deeper"):
        with pytest.raises(FileNotFoundError, match=f"output directory {out}: {tmp_path}/out is a symlink to "
                                                    f"{tmp_path}/unmounted/run, which does not exist"):
            P.prepare_output(out, "run", False)
    assert not (tmp_path / "unmounted").exists()


@pytest.mark.parametrize("sub,kind", [("images", "file"), ("rankings", "file"), ("discovery-work", "link"),
                                      ("store", "file")])
def test_a_file_where_a_rerun_keeps_a_folder_is_named_before_any_work(tmp_path, monkeypatch, sub, kind):
    # a resumed run failed at that folder's mkdir with a bare "[Errno 17] File exists: 'RUN/images'",
    # after the embedding pass and discovery
    import shutil

    from spurfast.discover import DiscoverConfig

    pool, clf, vae = _tiny()
    out = tmp_path / "run"
    run_discovery(pool, clf, vae, out, num_classes=2, confirm=False, progress=False, config=DiscoverConfig(n_null=4))
    shutil.rmtree(out / sub, ignore_errors=True)
    (out / sub).write_text("x") if kind == "file" else (out / sub).symlink_to(tmp_path / "gone")
    monkeypatch.setattr(P.dist, "embed_pool_sharded", lambda *a, **k: pytest.fail("embedded before the check"))
    with pytest.raises(NotADirectoryError, match=f"output directory {out}: {out / sub} is not a folder; the run "
                                                 f"keeps its {sub} there: move or remove it"):
        run_discovery(pool, clf, vae, out, num_classes=2, confirm=False, progress=False,
                      config=DiscoverConfig(n_null=4))


@pytest.mark.parametrize("sub", ["images", "rankings"])
def test_a_rerun_refuses_a_linked_images_or_rankings_folder_before_deleting_through_it(tmp_path, monkeypatch, sub):
    # a rerun deletes the finding files it finds there: through a link, another folder's finding1.png went
    import shutil

    from spurfast.discover import DiscoverConfig

    pool, clf, vae = _tiny()
    out = tmp_path / "run"
    run_discovery(pool, clf, vae, out, num_classes=2, confirm=False, progress=False, config=DiscoverConfig(n_null=4))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "finding1_grid.png").write_bytes(b"someone else's")   # a name a rerun deletes
    shutil.rmtree(out / sub, ignore_errors=True)
    (out / sub).symlink_to(elsewhere)
    monkeypatch.setattr(P.dist, "embed_pool_sharded", lambda *a, **k: pytest.fail("embedded before the check"))
    with pytest.raises(ValueError, match=f"{out / sub} is a symbolic link; the run writes and deletes"):
        run_discovery(pool, clf, vae, out, num_classes=2, confirm=False, progress=False,
                      config=DiscoverConfig(n_null=4))
    assert (elsewhere / "finding1_grid.png").read_bytes() == b"someone else's"


def test_removing_an_earlier_passs_finding_files_does_not_follow_a_linked_folder(tmp_path):
    # defence in depth behind the claim's check: a link made after it is not followed either
    out = tmp_path / "run"
    (out / "rankings").mkdir(parents=True)
    (out / "rankings" / "finding2.npy").write_bytes(b"old pass")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "finding1_grid.png").write_bytes(b"someone else's")
    (out / "images").symlink_to(elsewhere)
    P._remove_finding_files(out)
    assert (elsewhere / "finding1_grid.png").read_bytes() == b"someone else's"
    assert not (out / "rankings" / "finding2.npy").exists()


@pytest.mark.parametrize("value", [2.0, True, 0])
def test_a_bad_number_of_classes_is_refused_before_overwrite_deletes_the_old_run(tmp_path, value):
    # 2.0 passed the logits check (2 == 2.0); the embedding pass refused it after --overwrite had
    # deleted the old run's findings and report
    from spurfast.discover import DiscoverConfig

    pool, clf, vae = _tiny()
    out = tmp_path / "run"
    run_discovery(pool, clf, vae, out, num_classes=2, confirm=False, progress=False, config=DiscoverConfig(n_null=4))
    with pytest.raises(ValueError, match=f"num_classes must be an integer >= 1, got {value!r}"):
        run_discovery(pool, clf, vae, out, num_classes=value, confirm=False, progress=False, overwrite=True,
                      config=DiscoverConfig(n_null=5))
    assert (out / "findings.json").is_file() and (out / "report.html").is_file()


@pytest.mark.parametrize("how", ["config", "env"])
def test_an_unavailable_kmeans_backend_is_refused_before_any_work(tmp_path, monkeypatch, how):
    # run_discovery checked the encoder and loader backends up front, not the k-means one: cupy
    # without a GPU failed at the first clustering, after the embedding pass
    from spurfast import backends
    from spurfast.discover import DiscoverConfig

    prov = next(p for p in backends.providers("kmeans_assign") if p.name == "cupy")
    if prov.available()[0]:
        pytest.skip("the CuPy k-means runs here")
    if how == "env":
        monkeypatch.setenv("SPURFAST_BACKEND_KMEANS_ASSIGN", "cupy")
    pool, clf, vae = _tiny()
    monkeypatch.setattr(P.dist, "embed_pool_sharded", lambda *a, **k: pytest.fail("embedded before the check"))
    with pytest.raises(backends.BackendUnavailable, match="backend 'cupy' for 'kmeans_assign' is unavailable here"):
        run_discovery(pool, clf, vae, tmp_path / "run", num_classes=2, confirm=False, progress=False,
                      config=DiscoverConfig(n_null=4, backend="cupy" if how == "config" else None))
    assert not (tmp_path / "run").exists()


def test_a_pool_of_one_image_is_refused_before_overwrite_deletes_the_old_run(tmp_path):
    # discovery refused it ("only 1 readable image(s)"), after --overwrite had deleted the old run's
    # findings, report and store (another pool's) and the one image had been embedded
    from spurfast.discover import DiscoverConfig

    pool, clf, vae = _tiny()
    out = tmp_path / "run"
    run_discovery(pool, clf, vae, out, num_classes=2, confirm=False, progress=False, config=DiscoverConfig(n_null=4))
    one = ArraySource(torch.rand(1, 1, 16, 16), np.zeros(1, int), name="one")
    with pytest.raises(ValueError, match="pool one holds 1 image; discovery needs at least 2"):
        run_discovery(one, clf, vae, out, num_classes=2, confirm=False, progress=False, overwrite=True,
                      config=DiscoverConfig(n_null=4))
    assert (out / "findings.json").is_file() and EmbeddingStore(out / "store").n == len(pool)


@pytest.mark.parametrize("op", ["latent_knn", "kmeans_update", "kmeans_plusplus", "kmeans_assign_update",
                                "cluster_similarity"])
def test_a_bad_backend_variable_for_another_discovery_op_is_refused_before_any_work(tmp_path, monkeypatch, op):
    # only the assignment's was checked up front: SPURFAST_BACKEND_LATENT_KNN=cupy (say) failed at the
    # neighbour search, after the embedding pass (with --overwrite, after deleting the old run)
    from spurfast import backends
    from spurfast.discover import DiscoverConfig

    monkeypatch.setenv(f"SPURFAST_BACKEND_{op.upper()}", "nosuch")
    pool, clf, vae = _tiny()
    embed = P.dist.embed_pool_sharded
    monkeypatch.setattr(P.dist, "embed_pool_sharded", lambda *a, **k: pytest.fail("embedded before the check"))
    with pytest.raises(backends.BackendUnavailable, match=f"backend 'nosuch' does not implement '{op}'"):
        run_discovery(pool, clf, vae, tmp_path / "run", num_classes=2, confirm=False, progress=False,
                      config=DiscoverConfig(n_null=4))
    assert not (tmp_path / "run").exists()
    if op in ("kmeans_plusplus", "kmeans_assign_update"):
        # a k-means backend named for the run decides these two (cluster.lloyd reads no variable): not refused
        monkeypatch.setattr(P.dist, "embed_pool_sharded", embed)
        doc, _, _ = run_discovery(pool, clf, vae, tmp_path / "run", num_classes=2, confirm=False, progress=False,
                                  config=DiscoverConfig(n_null=4, backend="torch"))
        assert doc is not None


def test_an_extra_config_that_is_not_json_is_refused_before_any_work(tmp_path, monkeypatch):
    # findings.json's write refused it after the embedding pass, discovery and confirmation, naming
    # nothing: "TypeError: Object of type int64 is not JSON serializable"
    import re

    pool, clf, vae = _tiny()
    monkeypatch.setattr(P.dist, "embed_pool_sharded", lambda *a, **k: pytest.fail("embedded before the check"))
    with pytest.raises(ValueError, match=re.escape("extra_config['n_train']: Object of type int64 is not JSON "
                                                   "serializable; it is recorded in findings.json")):
        run_discovery(pool, clf, vae, tmp_path / "run", num_classes=2, confirm=False, progress=False,
                      extra_config={"dataset": "mine", "n_train": np.int64(3)})
    # NaN passed, and findings.json held a NaN token that strict parsers (jq, a browser) refuse
    with pytest.raises(ValueError, match=re.escape("extra_config['ratio']: Out of range float values are not JSON")):
        run_discovery(pool, clf, vae, tmp_path / "run", num_classes=2, confirm=False, progress=False,
                      extra_config={"ratio": float("nan")})
    with pytest.raises(ValueError, match=re.escape("summary['aurocs']: Out of range float values are not JSON")):
        run_discovery(pool, clf, vae, tmp_path / "run", num_classes=2, confirm=False, progress=False,
                      summary={"aurocs": [0.5, float("nan")]})
    assert not (tmp_path / "run").exists()


def test_objects_run_discovery_cannot_use_are_named_before_any_work(tmp_path, monkeypatch):
    # a path for the classifier, an array for the pool, a dict for the config: bare AttributeErrors
    # ("'str' object has no attribute 'state_dict'") from inside the embedding pass
    import re

    pool, clf, vae = _tiny()
    monkeypatch.setattr(P.dist, "embed_pool_sharded", lambda *a, **k: pytest.fail("embedded before the check"))
    for kw, want in ((dict(classifier="clf.pt"), "classifier must be a torch.nn.Module, got str (load a file with "
                                                  "spurfast.load_classifier(path))"),
                     (dict(vae="vae.pt"), "vae must be a torch.nn.Module, got str"),
                     (dict(pool=np.zeros((4, 1, 16, 16))), "pool must be an ImageSource, got ndarray (wrap arrays"),
                     (dict(config={"k": 4}), "config must be a DiscoverConfig or None, got dict"),
                     (dict(clean=np.zeros((4, 1, 16, 16))), "clean must be an ImageSource or None, got ndarray")):
        args = {"pool": pool, "classifier": clf, "vae": vae, **kw}
        with pytest.raises(TypeError, match="run_discovery: " + re.escape(want)):
            run_discovery(args.pop("pool"), args.pop("classifier"), args.pop("vae"), tmp_path / "run", num_classes=2,
                          progress=False, **args)
    assert not (tmp_path / "run").exists()


def test_a_runs_summary_is_kept_for_spurfast_report(tmp_path, capsys):
    # run_discovery(summary=...) showed it in the run's report only: `spurfast report` redrew the page
    # without it (the demo alone wrote summary.json)
    import json

    from spurfast.cli import main
    from spurfast.discover import DiscoverConfig

    pool, clf, vae = _tiny()
    run = tmp_path / "run"
    summary = {"dataset": "mine", "AUROC": float("nan"), "n": np.int64(3)}
    run_discovery(pool, clf, vae, run, num_classes=2, confirm=False, progress=False, summary=summary,
                  config=DiscoverConfig(n_null=4))
    first = (run / "report.html").read_text()
    assert json.loads((run / "summary.json").read_text()) == {"dataset": "mine", "AUROC": None, "n": "3"}
    assert "<th>dataset</th><td>mine</td>" in first and "<th>AUROC</th><td>n/a</td>" in first
    assert main(["report", "--run", str(run)]) == 0
    assert (run / "report.html").read_text() == first
    # the same run again without one: the old summary must not come back in `spurfast report`
    run_discovery(pool, clf, vae, run, num_classes=2, confirm=False, progress=False, config=DiscoverConfig(n_null=4))
    assert not (run / "summary.json").exists() and "<th>dataset</th>" not in (run / "report.html").read_text()


def test_a_rerun_stopped_after_its_findings_leaves_no_earlier_summary_beside_them(tmp_path, monkeypatch):
    # summary.json was replaced after findings.json: a rerun stopped between them left the new
    # findings beside the earlier pass's summary, which `spurfast report` showed as this run's
    import json

    import spurfast.discover as D
    from spurfast.discover import DiscoverConfig

    pool, clf, vae = _tiny()
    run = tmp_path / "run"
    kw = dict(num_classes=2, confirm=False, progress=False, config=DiscoverConfig(n_null=4))
    run_discovery(pool, clf, vae, run, summary={"labels": "old, wrong"}, **kw)
    real = D.write_outputs

    def stop_after(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt
    monkeypatch.setattr(P, "write_outputs", stop_after)
    with pytest.raises(KeyboardInterrupt):
        run_discovery(pool, clf, vae, run, summary={"labels": "new"}, **kw)
    assert (run / "findings.json").is_file()
    assert json.loads((run / "summary.json").read_text()) == {"labels": "new"}


@pytest.mark.parametrize("device", [None, torch.device("cpu")])
def test_a_config_device_of_none_or_a_torch_device_runs(tmp_path, device):
    # discover takes device None as torch's default, the CPU, and a torch.device; run_discovery raised
    # torch's bare "device() received an invalid combination of arguments - got (NoneType)", and for a
    # torch.device "Object of type device is not JSON serializable" (its run id)
    from spurfast.discover import DiscoverConfig

    pool, clf, vae = _tiny()
    doc, _, _ = run_discovery(pool, clf, vae, tmp_path / "run", num_classes=2, confirm=False, progress=False,
                              config=DiscoverConfig(n_null=4, device=device))
    assert doc["config"]["discover"]["device"] == "cpu" and (tmp_path / "run" / "findings.json").is_file()


def test_auto_dataset_falls_back_to_digits_without_the_test_split(tmp_path, caplog):
    """A Fashion-MNIST folder with the training split only was taken for the dataset, and the
    demo then failed on the missing test files instead of using digits."""
    import gzip
    import struct
    imgs = np.zeros((20, 28, 28), np.uint8)
    for stem, arr in (("train-images-idx3-ubyte", imgs), ("train-labels-idx1-ubyte", np.arange(20, dtype=np.uint8) % 10)):
        with gzip.open(tmp_path / f"{stem}.gz", "wb") as fh:
            fh.write(b"\x00\x00\x08" + bytes([arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes())
    with caplog.at_level("WARNING", logger="spurfast"):
        data = P.make_planted_data("auto", n_train_per_class=20, n_poisoned="5", n_suspect=50, fashion_root=tmp_path)
    assert "using scikit-learn's digits instead of Fashion-MNIST" in caplog.text and str(tmp_path) in caplog.text
    assert data.train.image_shape == (1, 28, 28) and len(data.train) > 20


def test_auto_dataset_names_a_mistyped_fashion_mnist_variable(tmp_path, caplog, monkeypatch):
    # "Fashion-MNIST not found" alone, with Debian's copy installed: the variable went unmentioned
    monkeypatch.setenv("SPURFAST_FASHION_MNIST", str(tmp_path / "typo"))
    with caplog.at_level("WARNING", logger="spurfast"):
        P.make_planted_data("auto", n_train_per_class=20, n_poisoned="5", n_suspect=50)
    assert "instead of Fashion-MNIST" in caplog.text and "typo" in caplog.text, caplog.text
    assert "$SPURFAST_FASHION_MNIST names that folder" in caplog.text


def test_more_poisoned_images_than_the_class_has_says_so(caplog):
    # --n-poisoned 5000 on digits was cut to the class's 107 training images without a word
    with caplog.at_level("WARNING", logger="spurfast"):
        data = P.make_planted_data("digits", n_poisoned="5000")
    n = data.truth.to_dict()["n_poisoned"]
    assert 0 < n < 5000
    assert f"n_poisoned=5000: class 3 has {n} training images; all of them are poisoned" in caplog.text


@pytest.mark.parametrize("fraction", [2.0, float("nan"), -0.1])
def test_plant_refuses_a_bad_pool_fraction_before_any_work(caplog, fraction):
    # an unrelated n_poisoned warning on the training set came first, then the refusal
    with caplog.at_level("WARNING", logger="spurfast"), pytest.raises(ValueError, match="pool fraction must be in"):
        P.make_planted_data("digits", n_poisoned="5000", pool_fraction=fraction)
    assert caplog.text == ""


@pytest.mark.parametrize("target", [10, -1])
def test_plant_refuses_a_target_class_the_dataset_lacks_first(caplog, target):
    """It warned "class 10 has 0 training images; all of them are poisoned" before failing."""
    from spurfast.pipeline import make_planted_data
    from spurfast.plant import PatternSpec

    with caplog.at_level("WARNING", logger="spurfast"), \
            pytest.raises(ValueError, match=rf"target class {target} is not a class of digits: expected 0 to 9"):
        make_planted_data("digits", target_class=target, n_poisoned=50, spec=PatternSpec("patch3"))
    assert "poisoned" not in caplog.text


def test_a_run_json_nested_too_deep_proves_nothing(tmp_path):
    # its RecursionError ended the run in a traceback; an unreadable marker keeps the folder
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("[" * 100_000)
    with pytest.raises(FileExistsError, match="holds files spurfast did not write"):
        P.prepare_output(out, "run-a", overwrite=True)
    assert (out / "run.json").read_text() == "[" * 100_000


def test_run_discovery_reports_its_steps_in_order(tmp_path):
    # `bench e2e` times the run users get through these calls (it had a copy of the steps)
    torch.manual_seed(0)
    pool = ArraySource(torch.rand(48, 1, 16, 16), np.arange(48) % 3, name="pool")
    seen, split = [], {}
    run_discovery(pool, SmallCNN(1, 3, 16).eval(), VAE(VAEConfig.for_images(1, 16, 4)).eval(), tmp_path / "run",
                  num_classes=3, config=P.DiscoverConfig(n_null=2, seed=0), progress=False, on_step=seen.append,
                  timings=split)
    assert seen == ["embedded", "discovered", "characterised", "ranked", "confirmed", "reported"], seen
    assert split["compute_s"] > 0 and "load_wait_s" in split, split
