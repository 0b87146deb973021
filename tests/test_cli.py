"""CLI: every subcommand has --help; bad input fails early with a clear message."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from spurfast.cli import PLANT_FILES, _verdict_counts, build_parser, main
from spurfast.discover import DiscoverConfig
from spurfast.pipeline import prepare_output

SUBCOMMANDS = ["demo", "plant", "train-classifier", "train-vae", "discover", "report", "env"]


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: spurfast" in capsys.readouterr().out


def test_help_shows_each_options_default():
    # --size, --channels, --k, --fdr, --n-null, --batch-size and --seed showed none
    import re

    text = re.sub(r"\s+", " ", build_parser()._subparsers._group_actions[0].choices["discover"].format_help())
    for flag, default in (("--size SIZE", "64"), ("--channels CHANNELS", "3"), ("--k K", "8"), ("--fdr FDR", "0.05"),
                          ("--n-null N_NULL", "30"), ("--batch-size BATCH_SIZE", "256"), ("--seed SEED", "0")):
        after = text.split(f" {flag} ", 1)[1].split(" --", 1)[0]
        assert f"(default: {default})" in after, (flag, after)
    assert "(default: None)" not in text and "(default: False)" not in text
    # help that says its own default says it once
    assert "(default: 120, or --n-null where larger) --" in text


def test_a_clean_folder_of_another_shape_than_an_npz_pool_names_size_and_channels(tmp_path, capsys):
    # with an .npz pool, a --clean folder is read at --size/--channels' defaults (64, 3): the
    # message gave two shapes and no hint of why the folder's was 3x64x64
    from PIL import Image

    from spurfast.models import VAE, VAEConfig, SmallCNN
    from spurfast.models.files import save_classifier, save_vae

    np.savez(tmp_path / "pool.npz", images=np.random.default_rng(0).random((8, 1, 16, 16), dtype=np.float32),
             labels=np.arange(8) % 2, class_names=np.array(["a", "b"]))
    for c in "ab":
        (tmp_path / "clean" / c).mkdir(parents=True)
        Image.new("L", (16, 16), 128).save(tmp_path / "clean" / c / "0.png")
    save_classifier(SmallCNN(1, 2, 16), tmp_path / "clf.pt")
    save_vae(VAE(VAEConfig.for_images(1, 16, 4)), tmp_path / "vae.pt")
    assert main(["discover", "--pool", str(tmp_path / "pool.npz"), "--clean", str(tmp_path / "clean"), "--classifier",
                 str(tmp_path / "clf.pt"), "--vae", str(tmp_path / "vae.pt"), "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (f"clean set {tmp_path / 'clean'} has images of shape 3x64x64 (CxHxW), pool {tmp_path / 'pool.npz'} has "
            f"1x16x16; a folder is read at --size 64 --channels 3: give the pool's") in err, err


def test_console_script_env():
    # a guard against a hang, not a speed check: importing torch, triton, cupy and DALI cold took
    # over 120 s on the 2-core machine at load 8 (10 s quiet)
    out = subprocess.run([sys.executable, "-m", "spurfast", "env"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["backends"]["kmeans_assign"]["torch"] == "available"


def test_missing_paths_are_named(tmp_path, capsys):
    code = main(["discover", "--pool", str(tmp_path / "nope.npz"), "--classifier", "c.pt", "--vae", "v.pt",
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "nope.npz does not exist" in capsys.readouterr().err
    code = main(["train-vae", "--data", str(tmp_path / "nofolder"), "--out", str(tmp_path / "v.pt")])
    assert code == 2


def test_empty_folder_pool(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["train-vae", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "v.pt")])
    assert code == 2 and "holds no images" in capsys.readouterr().err


def test_output_dir_with_other_run_is_refused(tmp_path):
    prepare_output(tmp_path / "o", "run-a", overwrite=False)
    (tmp_path / "o" / "x.txt").write_text("keep")
    prepare_output(tmp_path / "o", "run-a", overwrite=False)  # same run: resumes
    assert (tmp_path / "o" / "x.txt").exists()
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_output(tmp_path / "o", "run-b", overwrite=False)
    prepare_output(tmp_path / "o", "run-b", overwrite=True)
    assert not (tmp_path / "o" / "x.txt").exists()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "a").write_text("1")
    with pytest.raises(FileExistsError, match="did not write"):
        prepare_output(tmp_path / "foreign", "run-a", overwrite=False)


def test_k_larger_than_class_and_nan_latents():
    from spurfast.cluster import batched_kmeans
    with pytest.raises(ValueError, match="larger than group 1"):
        batched_kmeans(torch.randn(6, 2), torch.tensor([0, 0, 0, 0, 1, 1]), [2, 3], n_groups=2)
    x = torch.randn(6, 2)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        batched_kmeans(x, torch.zeros(6, dtype=torch.long), [2], n_groups=1)


def test_discover_config_validation():
    with pytest.raises(ValueError, match="fdr"):
        DiscoverConfig(fdr=1.5)
    with pytest.raises(ValueError, match="k must be"):
        DiscoverConfig(k=0)
    with pytest.raises(ValueError, match="max_mean_cluster_size must be >= 0"):
        DiscoverConfig(max_mean_cluster_size=-1)
    with pytest.raises(ValueError, match="max_k must be >= 0"):
        DiscoverConfig(max_k=-1)


def test_plant_then_discover_via_cli(tmp_path, capsys):
    """The CLI chain on digits: plant -> train-classifier -> train-vae -> discover -> report."""
    d = tmp_path
    assert main(["plant", "--out", str(d / "data"), "--dataset", "digits", "--n-poisoned", "all",
                 "--pool-fraction", "0.15"]) == 0
    pool = np.load(d / "data" / "pool.npz")
    assert {"images", "labels", "suspect", "carries"} <= set(pool.keys())
    # plant.json's pool_fraction is the one asked for (of the unrelated images); it held the
    # carriers' share of the whole pool, suspects included
    truth = json.loads((d / "data" / "plant.json").read_text())
    unrelated = ~pool["suspect"].astype(bool)
    assert truth["pool_fraction"] == 0.15 != truth["pool_carrier_share"] == pool["carries"].mean()
    assert abs(pool["carries"][unrelated].mean() - 0.15) < 0.01
    assert main(["train-classifier", "--data", str(d / "data" / "train.npz"), "--out", str(d / "clf.pt"),
                 "--epochs", "2", "--quiet"]) == 0
    assert main(["train-vae", "--data", str(d / "data" / "pool.npz"), "--out", str(d / "vae.pt"),
                 "--epochs", "2", "--quiet"]) == 0
    args = ["discover", "--pool", str(d / "data" / "pool.npz"), "--classifier", str(d / "clf.pt"),
            "--vae", str(d / "vae.pt"), "--out", str(d / "run"), "--n-null", "3", "--quiet"]
    capsys.readouterr()
    assert main(args) == 0
    assert (d / "run" / "findings.json").is_file() and (d / "run" / "report.html").is_file()
    doc = json.loads((d / "run" / "findings.json").read_text())
    assert f"{len(doc['findings'])} findings{_verdict_counts(doc['findings'])}; report:" in capsys.readouterr().out
    assert main(args[:-1] + ["--num-classes", "7"]) == 2  # a count the pool's names deny, before any work
    assert "names 10 classes (its class_names), but --num-classes is 7" in capsys.readouterr().err
    np.savez(d / "unnamed.npz", images=pool["images"], labels=pool["labels"])   # the classifier's width, then
    assert main([*args[:2], str(d / "unnamed.npz"), *args[3:-1], "--num-classes", "7"]) == 2
    assert "expected (1, 7) to match 7 classes (--num-classes)" in capsys.readouterr().err   # before any work
    # a pool's short names list: its count, not the classifier, is what does not fit (it read as the classifier's fault)
    np.savez(d / "names5.npz", images=pool["images"], labels=pool["labels"] % 5, class_names=np.array(list("abcde")))
    assert main([*args[:2], str(d / "names5.npz"), *args[3:]]) == 2
    assert f"expected (1, 5) to match 5 classes (the class_names of {d / 'names5.npz'})" in capsys.readouterr().err
    assert main(["report", "--run", str(d / "run")]) == 0


def test_discover_flags_reach_the_config():
    from spurfast.cli import _discover_config

    args = build_parser().parse_args(["discover", "--pool", "p", "--classifier", "c", "--vae", "v", "--out", "o",
                                      "--max-k", "7", "--max-mean-cluster-size", "40", "--k", "3",
                                      "--statistic", "share", "--null", "look-alike"])
    cfg = _discover_config(args)
    assert (cfg.max_k, cfg.max_mean_cluster_size, cfg.k, cfg.statistic, cfg.null) == (7, 40, 3, "share", "look-alike")
    default = _discover_config(build_parser().parse_args(["discover", "--pool", "p", "--classifier", "c", "--vae", "v",
                                                          "--out", "o"]))
    assert (default.max_k, default.statistic, default.null) == (256, "surprise", "label")


def test_residual_scan_flag_reaches_the_run():
    from spurfast.cli import _discover_config, _residual_config

    base = ["discover", "--pool", "p", "--classifier", "c", "--vae", "v", "--out", "o"]
    assert _residual_config(build_parser().parse_args(base)) is None
    cfg = _residual_config(build_parser().parse_args(base + ["--residual-scan", "--seed", "4", "--fdr", "0.1"]))
    assert (cfg.seed, cfg.fdr) == (4, 0.1)
    # its own level: one --fdr set both the clusters' and the scan's, which test different things
    args = build_parser().parse_args(base + ["--residual-scan", "--fdr", "0.1", "--residual-fdr", "0.2"])
    assert (_discover_config(args).fdr, _residual_config(args).fdr) == (0.1, 0.2)



def test_residual_flags_out_of_range_are_refused_by_name_before_any_work(capsys):
    # "fdr must be in (0, 1)" read as --fdr's error; a null of 1e9 resamplings asked for a 74.5 GiB
    # table after the whole embedding pass
    base = ["discover", "--pool", "p", "--classifier", "c", "--vae", "v", "--out", "o", "--residual-scan"]
    for flag, value, said in (("--residual-fdr", "1.5", "expected a number in (0, 1), got '1.5'"),
                              ("--residual-fdr", "0", "expected a number in (0, 1)"),
                              ("--residual-null", "1000000000", "expected an integer from 1 to 100000"),
                              ("--residual-null", "99999999999999999999", "expected an integer from 1 to 100000")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(base + [flag, value])
        err = capsys.readouterr().err
        assert f"argument {flag}: {said}" in err, err
    from spurfast.residual import ResidualConfig
    with pytest.raises(ValueError, match="n_null must be at most 100000"):
        ResidualConfig(n_null=100_001)
    assert ResidualConfig(n_null=100_000).n_null == 100_000


def test_cli_statistics_are_the_scoring_ones():
    from spurfast.cli import DEFAULT_STATISTIC, STATISTICS
    from spurfast.discover import DiscoverConfig
    from spurfast.scoring import DEFAULT_STATISTIC as scoring_default
    from spurfast.scoring import STATISTICS as scoring_statistics

    assert STATISTICS == scoring_statistics
    assert DEFAULT_STATISTIC == scoring_default == DiscoverConfig().statistic == "surprise"
    from spurfast import cli, scoring
    assert cli.NULLS == scoring.NULLS and cli.DEFAULT_NULL == scoring.DEFAULT_NULL == DiscoverConfig().null
    from spurfast import residual
    assert cli.RESIDUAL_MAX_NULL == residual.MAX_NULL


def test_verdict_counts_line():
    fs = [{"confirm": {"verdict": "class_content"}}, {"confirm": {"verdict": "confirmed"}},
          {"confirm": {"verdict": "class_content"}}, {"confirm": None}]
    assert _verdict_counts(fs) == " (1 confirmed, 2 class_content)"
    assert _verdict_counts([{"confirm": None}]) == "" and _verdict_counts([]) == ""


def _models(d, c=1, size=28, classes=10):
    """A random classifier and VAE for c x size x size images, saved under ``d``."""
    from spurfast.models import VAE, VAEConfig, SmallCNN
    from spurfast.models.files import save_classifier, save_vae

    torch.manual_seed(0)
    save_classifier(SmallCNN(c, classes, size), d / f"clf{c}x{size}.pt")
    save_vae(VAE(VAEConfig.for_images(c, size, 4)), d / f"vae{c}x{size}.pt")
    return str(d / f"clf{c}x{size}.pt"), str(d / f"vae{c}x{size}.pt")


def _npz(path, images, n_classes=10):
    np.savez(path, images=images, labels=np.arange(len(images)) % n_classes,
             class_names=np.array([str(i) for i in range(n_classes)]))
    return str(path)


def test_overwrite_never_deletes_foreign_dirs_or_the_pool(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match=f"{foreign}.*did not write") as e:
        prepare_output(foreign, "run-a", overwrite=True)
    assert "pass --overwrite" not in str(e.value)  # the refusal must not suggest the flag that deletes
    assert (foreign / "thesis.tex").read_text() == "years of work"
    prepare_output(tmp_path / "empty", "run-a", overwrite=True)  # empty or new directories are fine
    # a spurfast run directory that also holds the pool being read: --overwrite must not delete it
    clf, vae = _models(tmp_path)
    run = tmp_path / "run"
    prepare_output(run, "an-older-run", overwrite=False)
    pool = _npz(run / "pool.npz", np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8))
    capsys.readouterr()
    code = main(["discover", "--pool", pool, "--classifier", clf, "--vae", vae, "--out", str(run),
                 "--overwrite", "--quiet"])
    assert code == 2 and "holds" in capsys.readouterr().err and (run / "pool.npz").is_file()


@pytest.mark.parametrize("link", ["class_folder", "image"])
def test_overwrite_never_deletes_pool_images_reached_through_symlinks(tmp_path, link):
    """A pool whose class folder (or one image) is a link into an old run's directory:
    --overwrite of that directory would delete images the run reads."""
    from PIL import Image

    from spurfast.data.folder import ImageFolderSource
    from spurfast.pipeline import source_paths

    out = tmp_path / "out"
    prepare_output(out, "older-run", overwrite=False)
    (out / "kept").mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 50 * i, np.uint8)).save(out / "kept" / f"{i}.png")
    (tmp_path / "pool" / "dog").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "pool" / "dog" / "0.png")
    if link == "class_folder":
        (tmp_path / "pool" / "cat").symlink_to(out / "kept")
    else:
        (tmp_path / "pool" / "dog" / "1.png").symlink_to(out / "kept" / "1.png")
    pool = ImageFolderSource(tmp_path / "pool", size=8)
    with pytest.raises(FileExistsError, match="that this run reads"):
        prepare_output(out, "new-run", overwrite=True, protect=source_paths(pool))
    assert (out / "kept" / "1.png").is_file()


@pytest.mark.parametrize("case", ["shape", "hwc", "suspect_high", "suspect_negative", "not_npz", "float_range",
                                  "vae_as_classifier"])
def test_bad_discover_inputs_are_named(tmp_path, capsys, case):
    """Each bad input fails before any work with a message naming the file, the value and
    what was expected (not a traceback)."""
    clf, vae = _models(tmp_path)
    rng = np.random.default_rng(0)
    pool = _npz(tmp_path / "pool.npz", rng.integers(0, 256, (12, 28, 28), dtype=np.uint8))
    extra, want = [], []
    if case == "shape":
        pool = _npz(tmp_path / "rgb.npz", rng.integers(0, 256, (12, 3, 64, 64), dtype=np.uint8))
        want = ["1x28x28", "3x64x64", "rgb.npz", "clf1x28.pt"]
    elif case == "hwc":
        pool = _npz(tmp_path / "hwc.npz", rng.integers(0, 256, (12, 28, 28, 1), dtype=np.uint8))
        want = ["hwc.npz", "(N,H,W,C)", "expected (N,C,H,W)"]
    elif case.startswith("suspect"):
        value = "12" if case == "suspect_high" else "-1"
        (tmp_path / "sus.txt").write_text(f"0\n{value}\n")
        extra = ["--suspect", str(tmp_path / "sus.txt")]
        want = ["sus.txt", f"index {value}", "12 images", "[0, 11]"]
    elif case == "not_npz":
        (tmp_path / "text.npz").write_text("x\n")
        pool = str(tmp_path / "text.npz")
        want = ["text.npz", "not an .npz"]
    elif case == "float_range":
        pool = _npz(tmp_path / "f255.npz", np.full((12, 28, 28), 200.0, np.float32))
        want = ["f255.npz", "must lie in [0, 1]"]
    elif case == "vae_as_classifier":
        clf = vae
        want = ["vae1x28.pt", "VAE", "--vae"]
    capsys.readouterr()
    code = main(["discover", "--pool", pool, "--classifier", clf, "--vae", vae, "--out", str(tmp_path / "o"),
                 "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    for w in want:
        assert w in err, f"{w!r} not in {err!r}"
    assert "bare state_dict" not in err
    assert not (tmp_path / "o").exists(), "failed after starting work"


def test_report_rewrite_keeps_unreadable_files(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "pool" / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "pool" / c / f"{i}.png")
    (tmp_path / "pool" / "dog" / "broken.png").write_bytes(b"not a png")
    clf, vae = _models(tmp_path, c=3, size=16, classes=2)
    run = tmp_path / "run"
    assert main(["discover", "--pool", str(tmp_path / "pool"), "--size", "16", "--classifier", clf, "--vae", vae,
                 "--out", str(run), "--n-null", "2", "--k", "2", "--no-confirm", "--quiet"]) == 0
    first = (run / "report.html").read_text()
    assert "broken.png" in first
    (run / "report.html").unlink()
    assert main(["report", "--run", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert "Unreadable files (1" in html and "broken.png" in html
    # the same page: clusters.csv held its scores to 4 digits, and the redrawn scores plot moved
    assert html == first
    (run / "bad_files.json").unlink()  # a run from before bad_files.json: the store's manifest (pool indices)
    assert main(["report", "--run", str(run)]) == 0
    assert "Unreadable files (1" in (run / "report.html").read_text()



def test_report_waits_for_no_run_but_refuses_a_folder_a_run_is_writing(tmp_path, capsys):
    # report rewrote report.html and images/scores.png while a discover run renamed the
    # pictures it inlines, and the run's own report.html could land over it (or under it)
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    (run / "findings.json").write_text("{}")
    other = os.open(run, os.O_RDONLY)           # as a discover run of another process holding it
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        assert main(["report", "--run", str(run)]) == 2
        assert f"output directory {run} is in use by another spurfast process" in capsys.readouterr().err
    finally:
        os.close(other)
    assert not (run / "report.html").exists()
    assert main(["report", "--run", str(run)]) == 2          # free: read (and refused for its content)
    assert "in use" not in capsys.readouterr().err
    from spurfast.run_folder import hold_output, holds_output, release_output
    assert not holds_output(run), "the lock outlived the command"
    hold_output(run)   # held by this thread's caller before: still held after
    try:
        main(["report", "--run", str(run)])
        assert holds_output(run), "the report released its caller's hold"
    finally:
        release_output(run)


def test_demo_pattern_flags_reach_the_pattern_and_the_run_id(monkeypatch):
    import types

    from spurfast import demo

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: seen.append(k))
    assert main(["demo", "--out", "o", "--family", "noise", "--strength", "0.25", "--position", "top_left"]) == 0
    assert (seen[0]["strength"], seen[0]["position"]) == (0.25, "top_left")
    monkeypatch.undo()

    class Stop(Exception):
        pass

    from spurfast.data import ArraySource

    specs, run_ids, pixel = [], [], [0.0]

    def fake_data(dataset, *, spec, **kw):
        specs.append(spec)   # a pool shape: run_demo checks the VAE's settings before any work
        images = ArraySource(torch.full((4, 1, 8, 8), pixel[0]), np.arange(4))
        return types.SimpleNamespace(dataset="digits", train=images, pool=images, test_clean=None)

    def fake_prepare(out, run_id, overwrite, protect=()):
        run_ids.append(run_id)
        raise Stop

    monkeypatch.setattr(demo, "make_planted_data", fake_data)
    monkeypatch.setattr(demo, "prepare_output", fake_prepare)
    for kw in ({}, {"strength": 0.5}, {"position": "top_left"}):
        with pytest.raises(Stop):
            demo.run_demo("o", family="patch3", **kw)
    assert (specs[1].strength, specs[2].position) == (0.5, "top_left")
    assert len(set(run_ids)) == 3, "a changed pattern flag must make a different demo run"
    # other images under the same dataset name ($SPURFAST_FASHION_MNIST at another copy) too:
    # read as this run, it retrained the models over the old ones and failed at the store
    pixel[0] = 0.5
    with pytest.raises(Stop):
        demo.run_demo("o", family="patch3")
    assert len(set(run_ids)) == 4, "other images must make a different demo run"


def test_demo_overwrite_never_deletes_the_dataset_it_reads(tmp_path, monkeypatch):
    # discover passes its inputs as protected; the demo passed none, and --overwrite of another
    # run deleted a Fashion-MNIST folder lying inside --out (already read, so unnoticed)
    import types

    from spurfast import demo
    from spurfast.data import ArraySource

    out, data_dir = tmp_path / "out", tmp_path / "out" / "fmnist"
    data_dir.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (data_dir / name).write_bytes(b"idx")
    (out / "run.json").write_text(json.dumps({"run_id": "another-run"}))
    monkeypatch.setenv("SPURFAST_FASHION_MNIST", str(data_dir))
    images = ArraySource(torch.zeros(4, 1, 8, 8), np.arange(4))
    monkeypatch.setattr(demo, "make_planted_data", lambda *a, **k: types.SimpleNamespace(
        dataset="fashion-mnist", train=images, pool=images, test_clean=None))
    with pytest.raises(FileExistsError, match=r"--overwrite would delete output directory .*fmnist"):
        demo.run_demo(out, overwrite=True)
    assert len(list(data_dir.iterdir())) == 4


def test_folder_runs_made_before_relative_item_ids_resume(tmp_path, caplog):
    """Item ids of folder pools were their paths as spelled, the content digest sampled 8
    items, and run ids had none before the tenth session: such a run directory and store
    are the same run."""
    import hashlib
    import json
    import logging
    from dataclasses import asdict

    from PIL import Image

    from spurfast.data.folder import ImageFolderSource
    from spurfast.data.sources import sampled_digest
    from spurfast.discover import DiscoverConfig
    from spurfast.store import MANIFEST
    from spurfast.identity import fingerprint, weights_fingerprint
    from spurfast.models.files import load_classifier, load_vae
    from spurfast.pipeline import run_discovery

    class SpelledIds(ImageFolderSource):   # item ids as they were
        def item_id(self, i):
            return self.paths[i]

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "pool" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "pool" / c / f"{i}.png")
    clf_path, vae_path = _models(tmp_path, c=3, size=16, classes=2)
    clf, vae = load_classifier(clf_path, in_channels=3), load_vae(vae_path)
    pool, config = ImageFolderSource(tmp_path / "pool", size=16), DiscoverConfig(k=2, n_null=2)
    settings = json.dumps(asdict(config), sort_keys=True)
    old = SpelledIds(tmp_path / "pool", size=16)
    old_fp, old_content = weights_fingerprint(old, clf, vae), sampled_digest(old)   # the identity then
    run = tmp_path / "run"
    kw = dict(num_classes=2, config=config, progress=False, confirm=False)
    for old_id, store_content in [(hashlib.sha256((old_fp + settings).encode()).hexdigest()[:16], None),
                                  (hashlib.sha256((old_fp + old_content + settings).encode()).hexdigest()[:16],
                                   old_content)]:
        run_discovery(pool, clf, vae, run, overwrite=True, **kw)
        # relabel the finished run as the earlier version wrote it
        (run / "run.json").write_text(json.dumps({"run_id": old_id}))
        manifest = json.loads((run / "store" / MANIFEST).read_text())
        manifest["fingerprint"] = old_fp
        manifest.pop("content")
        manifest.pop("identity")   # no scheme recorded then
        if store_content:
            manifest["content"] = store_content
        (run / "store" / MANIFEST).write_text(json.dumps(manifest))
        mu_written = (run / "store" / "mu.npy").stat().st_mtime_ns
        with caplog.at_level(logging.INFO, logger="spurfast"):
            run_discovery(pool, clf, vae, run, **kw)             # no --overwrite: the same run
        assert "earlier spurfast version" in caplog.text
        assert (run / "store" / "mu.npy").stat().st_mtime_ns == mu_written   # not embedded again
        assert json.loads((run / "store" / MANIFEST).read_text())["fingerprint"] == fingerprint(pool, clf, vae)
        caplog.clear()


def _digit_folders(root, classes, per_class=3, size=28):
    """Grey PNGs in one folder per class name; returns the root."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L").save(root / c / f"{i}.png")
    return str(root)


def test_folder_pool_lacking_a_class_needs_the_class_names(tmp_path, capsys):
    """Class folders are labelled in sorted order: a pool without class 3 would shift
    labels 4..9 to 3..8.  Without --class-names that must stop; with them labels hold."""
    clf, vae = _models(tmp_path)
    pool = _digit_folders(tmp_path / "pool", [str(c) for c in range(10) if c != 3])
    base = ["discover", "--pool", pool, "--size", "28", "--channels", "1", "--classifier", clf, "--vae", vae,
            "--n-null", "2", "--k", "2", "--no-confirm", "--quiet"]
    for extra in (["--num-classes", "10"], []):   # given, or the classifier's output width
        capsys.readouterr()
        assert main(base + ["--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err
        for w in (pool, "9 class folders", "10 classes", "--class-names"):
            assert w in err, f"{w!r} not in {err!r}"
        assert not (tmp_path / "o").exists()
    names = tmp_path / "names.txt"
    names.write_text("".join(f"{c}\n" for c in range(10)))
    assert main(base + ["--out", str(tmp_path / "run"), "--class-names", str(names)]) == 0
    labels = np.load(tmp_path / "run" / "store" / "labels.npy")
    assert sorted(set(labels.tolist())) == [c for c in range(10) if c != 3]
    # the file's problems are named
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "o"), "--class-names", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt" in capsys.readouterr().err
    names.write_text("0\n1\n1\n")
    assert main(base + ["--out", str(tmp_path / "o"), "--class-names", str(names)]) == 2
    err = capsys.readouterr().err
    assert "names.txt" in err and "'1'" in err


def test_a_num_classes_the_classifier_lacks_is_blamed_on_the_option(tmp_path, capsys):
    # a 10-class classifier, 10 class folders, --num-classes 7: "the classifier has 7 classes;
    # pass --class-names", advice that could not help
    clf, vae = _models(tmp_path)
    pool = _digit_folders(tmp_path / "pool", [str(c) for c in range(10)])
    capsys.readouterr()
    assert main(["discover", "--pool", pool, "--size", "28", "--channels", "1", "--classifier", clf, "--vae", vae,
                 "--num-classes", "7", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "outputs shape (1, 10) for one image; expected (1, 7)" in err and "(--num-classes)" in err, err
    assert "--class-names" not in err, err


def test_clean_folder_lacking_a_class_is_labelled_by_the_pools_names(tmp_path, capsys, monkeypatch):
    # it was refused (9 folders, 10 classes, sorted order would shift the labels); the pool's
    # class folders name the classes, so the clean folders are matched by name instead
    import spurfast.pipeline as P
    clf, vae = _models(tmp_path)
    digits = [str(c) for c in range(10)]
    pool = _digit_folders(tmp_path / "pool", digits)
    clean = _digit_folders(tmp_path / "clean", digits[1:])
    seen = {}

    def stop(pool, *a, clean=None, **k):
        seen["labels"], seen["names"] = sorted(set(clean.labels().tolist())), clean.class_names
        return {"findings": []}, None, None
    monkeypatch.setattr(P, "run_discovery", stop)
    base = ["discover", "--pool", pool, "--clean", clean, "--size", "28", "--channels", "1", "--classifier", clf,
            "--vae", vae, "--n-null", "2", "--k", "2", "--quiet", "--out", str(tmp_path / "o")]
    assert main(base) == 0, capsys.readouterr().err
    assert seen == {"labels": list(range(1, 10)), "names": digits}


def test_class_names_with_an_npz_pool_name_its_classes(tmp_path):
    from spurfast.input_files import load_pool

    names = tmp_path / "names.txt"
    names.write_text("a\nb\n\nc\n")   # blank lines are skipped
    path = tmp_path / "p.npz"
    np.savez(path, images=np.zeros((4, 1, 8, 8), np.uint8), labels=np.array([0, 1, 2, 0]))
    assert load_pool(path, 8, 1, class_names=names)[0].class_names == ["a", "b", "c"]
    _npz(path, np.zeros((4, 8, 8), np.uint8), n_classes=3)   # the archive's own names win
    assert load_pool(path, 8, 1, class_names=names)[0].class_names == ["0", "1", "2"]


def test_class_names_an_npz_pool_does_not_take_are_said_unused_and_blamed_for_nothing(tmp_path, capsys, caplog,
                                                                                      monkeypatch):
    # the pool's own names won without a word; the width error then blamed --class-names (whose
    # count matched the classifier), and a nameless --clean .npz took the file's names and was
    # refused as another set's classes
    import spurfast.pipeline as P
    clf, vae = _models(tmp_path, classes=3)
    pool = _npz(tmp_path / "pool.npz", np.zeros((6, 28, 28), np.uint8), n_classes=2)   # names "0", "1"
    names = tmp_path / "names3.txt"
    names.write_text("x\ny\nz\n")
    base = ["discover", "--pool", pool, "--classifier", clf, "--vae", vae, "--quiet", "--out", str(tmp_path / "o")]
    capsys.readouterr()
    with caplog.at_level("WARNING", logger="spurfast.cli"):
        assert main([*base, "--class-names", str(names)]) == 2
    assert f"--class-names {names} has no effect: pool {pool} names its own classes (0, 1)" in caplog.text
    err = capsys.readouterr().err
    assert f"to match 2 classes (the class_names of {pool})" in err and "--class-names" not in err, err
    seen = {}
    monkeypatch.setattr(P, "run_discovery", lambda *a, clean=None, **k: seen.update(names=clean.class_names)
                        or ({"findings": []}, None, None))
    _models(tmp_path, classes=2)
    clean = tmp_path / "clean.npz"
    np.savez(clean, images=np.zeros((4, 28, 28), np.uint8), labels=np.arange(4) % 2)
    names.write_text("A\nB\n")
    assert main(["discover", "--pool", pool, "--clean", str(clean), "--class-names", str(names), "--classifier",
                 str(tmp_path / "clf1x28.pt"), "--vae", vae, "--quiet", "--out", str(tmp_path / "o2")]) == 0, \
        capsys.readouterr().err
    assert seen["names"] is None   # the pool's numbers mean the pool's classes


def _wide_pool_and_narrow_vae(tmp_path):
    """(classifier, VAE, pool) paths that the VAE shape check refuses (1x28x32 pool, 1x28x28
    VAE) after the earlier checks pass: a discover command that stops just before any work."""
    class Const(torch.nn.Module):
        def forward(self, x):
            return x.new_zeros(x.shape[0], 10)

    torch.jit.save(torch.jit.script(Const()), tmp_path / "const.pt")
    _, vae = _models(tmp_path)
    return str(tmp_path / "const.pt"), vae, _npz(tmp_path / "wide.npz", np.zeros((12, 1, 28, 32), np.uint8))


def test_vae_shape_is_checked_in_full(tmp_path, capsys):
    """A 1x28x32 pool and a 1x28x28 VAE: comparing (C, H) alone let it through."""
    clf, vae, pool = _wide_pool_and_narrow_vae(tmp_path)
    assert main(["discover", "--pool", pool, "--classifier", clf, "--vae", vae,
                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    for w in ("vae1x28.pt", "1x28x28", "wide.npz", "1x28x32"):
        assert w in err, f"{w!r} not in {err!r}"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["bogus_device", "cuda", "cupy", "triton", "train_device", "demo_cupy"])
def test_unavailable_devices_and_backends_fail_first(tmp_path, capsys, monkeypatch, case):
    """A device or a named backend that cannot run here: one error line before any work."""
    from spurfast import backends

    if case in ("cuda", "cupy", "triton", "demo_cupy") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    clf, vae = _models(tmp_path)
    pool = _npz(tmp_path / "pool.npz", np.zeros((12, 28, 28), np.uint8))
    cmd = ["discover", "--pool", pool, "--classifier", clf, "--vae", vae, "--out", str(tmp_path / "o"), "--quiet"]
    extra, want = {"bogus_device": (["--device", "bogus"], ["--device", "bogus"]),
                   "cuda": (["--device", "cuda"], ["--device", "cuda", "CUDA"]),
                   "cupy": (["--kmeans-backend", "cupy"], ["--kmeans-backend", "cupy"]),
                   "triton": (["--encoder-backend", "triton"], ["--encoder-backend", "triton"]),
                   "train_device": ([], ["--device", "bogus"]),
                   "demo_cupy": ([], ["--kmeans-backend", "cupy"])}[case]
    if case == "train_device":
        cmd = ["train-vae", "--data", pool, "--out", str(tmp_path / "o"), "--device", "bogus"]
    if case == "demo_cupy":
        cmd = ["demo", "--out", str(tmp_path / "o"), "--kmeans-backend", "cupy"]
    if case == "triton":   # the interpreter mode is fixed when the kernel module is first imported
        from spurfast.kernels import encoder_triton
        monkeypatch.setattr(encoder_triton, "_INTERPRET", False)
    backends.clear_cache()
    capsys.readouterr()
    assert main(cmd + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for w in want:
        assert w in err, f"{w!r} not in {err!r}"
    assert not (tmp_path / "o").exists(), "failed after starting work"


def test_main_reports_backend_unavailable(monkeypatch, capsys):
    from spurfast import backends

    def boom(args):
        raise backends.BackendUnavailable("backend 'x' for 'op' is unavailable here: reasons")

    monkeypatch.setattr("spurfast.cli.cmd_env", boom)
    assert main(["env"]) == 2
    assert capsys.readouterr().err == "error: backend 'x' for 'op' is unavailable here: reasons\n"


@pytest.mark.parametrize("value", ["abc", "-1", "1.5"])
def test_n_poisoned_is_validated_by_argparse(value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["plant", "--out", "o", "--n-poisoned", value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--n-poisoned" in err and repr(value) in err and "'all'" in err


def test_n_poisoned_accepts_counts_and_all():
    parse = build_parser().parse_args
    assert parse(["plant", "--out", "o", "--n-poisoned", "all"]).n_poisoned == "all"
    assert parse(["plant", "--out", "o", "--n-poisoned", "0"]).n_poisoned == "0"
    assert parse(["demo"]).n_poisoned == "600"


def test_a_cuda_index_past_the_visible_gpus_is_refused_up_front(monkeypatch):
    # cuda:3 on a one-GPU machine failed deep inside the first transfer
    from spurfast.cli import check_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_device("cuda")
    check_device("cuda:0")
    with pytest.raises(ValueError, match=r"--device cuda:3: torch sees 1 CUDA device\(s\)"):
        check_device("cuda:3")


def test_loader_backend_on_an_array_pool_says_it_has_no_effect(tmp_path, caplog):
    clf, vae, pool = _wide_pool_and_narrow_vae(tmp_path)
    with caplog.at_level("WARNING", logger="spurfast.cli"):
        assert main(["discover", "--pool", pool, "--classifier", clf, "--vae", vae,
                     "--out", str(tmp_path / "o"), "--quiet", "--loader-backend", "torch"]) == 2
    assert any("--loader-backend torch has no effect" in r.getMessage() and "wide.npz" in r.getMessage()
               for r in caplog.records), caplog.text


def test_a_state_dict_with_arch_takes_its_class_count_from_a_labelled_pool(tmp_path, capsys):
    """README: a state_dict plus --arch loads; it was refused unless --num-classes was
    given too, although the pool names its classes."""
    from spurfast.models import SmallCNN
    torch.manual_seed(0)
    torch.save(SmallCNN(1, 10, 28).state_dict(), tmp_path / "sd.pt")
    _, vae, pool = _wide_pool_and_narrow_vae(tmp_path)   # refused at the VAE check
    capsys.readouterr()
    assert main(["discover", "--pool", pool, "--classifier", str(tmp_path / "sd.pt"), "--arch", "small_cnn",
                 "--vae", vae, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "bare state_dict" not in err and "1x28x32" in err, err


_DISCOVER = ["discover", "--pool", "p", "--classifier", "c", "--vae", "v", "--out", "o"]


@pytest.mark.parametrize("argv,flag,value", [
    (_DISCOVER + ["--batch-size", "0"], "--batch-size", "0"),
    (_DISCOVER + ["--num-classes", "0"], "--num-classes", "0"),
    (_DISCOVER + ["--seed", "-1"], "--seed", "-1"),
    (["train-classifier", "--data", "d", "--out", "m.pt", "--epochs", "-1"], "--epochs", "-1"),
    (["train-classifier", "--data", "d", "--out", "m.pt", "--num-classes", "x"], "--num-classes", "x"),
    (["train-vae", "--data", "d", "--out", "m.pt", "--epochs", "0"], "--epochs", "0"),
    (["demo", "--classifier-epochs", "-1"], "--classifier-epochs", "-1"),
    (["plant", "--out", "o", "--seed", "-1"], "--seed", "-1"),
    (["make-pool", "--out", "o", "--n", "10", "--seed", "-1"], "--seed", "-1"),
    (["make-pool", "--out", "o", "--n", "10", "--workers", "-2"], "--workers", "-2"),
    (["make-pool", "--out", "o", "--n", "10", "--pattern-seed", "-1"], "--pattern-seed", "-1"),
    (["evaluate", "--out", "o", "--seeds", "1,,2"], "--seeds", "1,,2"),
    (["evaluate", "--out", "o", "--seeds", "a,b"], "--seeds", "a,b"),
    (["evaluate", "--out", "o", "--seeds", "-1"], "--seeds", "-1"),
    (["evaluate", "--out", "o", "--seeds", "0,1,0"], "--seeds", "0,1,0"),
])
def test_bad_numeric_flags_are_refused_naming_the_flag(argv, flag, value, capsys):
    # they were ignored (--num-classes 0), ran nothing (--epochs -1), ran a seed twice
    # (--seeds 0,0), or failed later without the flag's name (numpy's, int()'s messages)
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and repr(value) in err, err


def test_numeric_flags_still_take_good_values():
    parse = build_parser().parse_args
    assert parse(["evaluate", "--out", "o", "--seeds", "2, 0"]).seeds == (2, 0)
    assert parse(_DISCOVER + ["--batch-size", "1", "--num-classes", "3"]).batch_size == 1
    assert parse(["make-pool", "--out", "o", "--n", "10", "--workers", "1"]).workers == 1
    assert parse(["make-pool", "--out", "o", "--n", "10"]).pattern_seed == 0
    assert parse(["make-pool", "--out", "o", "--n", "10", "--pattern-seed", "5"]).pattern_seed == 5


class _Stop(Exception):
    pass


def test_overwrite_never_deletes_the_class_names_file(tmp_path, capsys, monkeypatch):
    import spurfast.pipeline as P

    monkeypatch.setattr(P.dist, "embed_pool_sharded", lambda *a, **k: (_ for _ in ()).throw(_Stop()))
    clf, vae = _models(tmp_path)
    pool = tmp_path / "unnamed.npz"   # no class names of its own: the file's are used
    np.savez(pool, images=np.zeros((12, 28, 28), np.uint8), labels=np.arange(12) % 10)
    run = tmp_path / "run"
    prepare_output(run, "an-older-run", overwrite=False)
    (run / "names.txt").write_text("".join(f"c{i}\n" for i in range(10)))
    capsys.readouterr()
    assert main(["discover", "--pool", str(pool), "--classifier", clf, "--vae", vae, "--out", str(run), "--quiet",
                 "--overwrite", "--class-names", str(run / "names.txt")]) == 2
    assert "names.txt" in capsys.readouterr().err and (run / "names.txt").is_file()


@pytest.mark.parametrize("cmd", ["train-vae", "train-classifier"])
def test_train_out_is_checked_before_training_and_its_folder_made(tmp_path, capsys, monkeypatch, cmd):
    from spurfast.models import train

    pool = _npz(tmp_path / "pool.npz", np.zeros((12, 28, 28), np.uint8))
    (tmp_path / "adir").mkdir()
    fn = "train_vae" if cmd == "train-vae" else "train_classifier"
    real = getattr(train, fn)
    monkeypatch.setattr(train, fn, lambda *a, **k: pytest.fail("trained before --out was checked"))
    capsys.readouterr()
    assert main([cmd, "--data", pool, "--out", str(tmp_path / "adir"), "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and "adir" in err and "is a directory" in err, err
    monkeypatch.setattr(train, fn, real)
    out = tmp_path / "new" / "deeper" / "m.pt"   # a missing folder is made, as discover/plant do
    assert main([cmd, "--data", pool, "--out", str(out), "--epochs", "1", "--quiet"]) == 0
    assert out.is_file()


@pytest.mark.parametrize("cmd", ["train-vae", "train-classifier"])
@pytest.mark.parametrize("tail", ["/", "/."])
def test_train_out_naming_a_folder_not_made_yet_is_refused_before_training(tmp_path, capsys, monkeypatch, cmd, tail):
    # --out models/ (no such folder yet): Path dropped the "/", the model was to be the file
    # "models", and its checkpoint models/.ckpt failed after the first epoch with a traceback
    from spurfast.models import train

    pool = _npz(tmp_path / "pool.npz", np.zeros((12, 28, 28), np.uint8))
    monkeypatch.setattr(train, "train_vae" if cmd == "train-vae" else "train_classifier",
                        lambda *a, **k: pytest.fail("trained before --out was checked"))
    capsys.readouterr()
    assert main([cmd, "--data", pool, "--out", str(tmp_path / "models") + tail, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and "names a folder" in err and "model.pt" in err, err
    assert not (tmp_path / "models").exists()


def test_a_pool_npz_suspect_array_of_the_wrong_length_is_refused_first(tmp_path, capsys):
    clf, vae = _models(tmp_path)
    pool = tmp_path / "short.npz"
    np.savez(pool, images=np.zeros((12, 28, 28), np.uint8), labels=np.arange(12) % 10,
             class_names=np.array([str(i) for i in range(10)]), suspect=np.zeros(11, bool))
    capsys.readouterr()
    assert main(["discover", "--pool", str(pool), "--classifier", clf, "--vae", vae, "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    for w in ("short.npz", "'suspect'", "(11,)", "(12,)"):
        assert w in err, f"{w!r} not in {err!r}"
    assert not (tmp_path / "o").exists(), "failed after starting work"


def test_train_classifier_counts_the_npz_class_names(tmp_path, monkeypatch):
    # an .npz naming 10 classes without a training image of the last: 10 outputs, not 9
    from spurfast.models import train

    seen = []

    def fake(src, n_classes, **kw):
        seen.append(n_classes)
        raise _Stop
    monkeypatch.setattr(train, "train_classifier", fake)
    data = tmp_path / "no9.npz"
    np.savez(data, images=np.zeros((9, 28, 28), np.uint8), labels=np.arange(9),
             class_names=np.array([str(i) for i in range(10)]))
    with pytest.raises(_Stop):
        main(["train-classifier", "--data", str(data), "--out", str(tmp_path / "m.pt"), "--quiet"])
    assert seen == [10]


def test_an_npz_with_an_empty_class_names_array_takes_the_class_names_file(tmp_path):
    # `spurfast plant` writes class_names=[] for a dataset without names
    from spurfast.input_files import load_pool

    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    path = tmp_path / "p.npz"
    np.savez(path, images=np.zeros((4, 1, 8, 8), np.uint8), labels=np.array([0, 1, 2, 0]), class_names=np.array([]))
    assert load_pool(path, 8, 1)[0].class_names is None
    assert load_pool(path, 8, 1, class_names=names)[0].class_names == ["a", "b", "c"]


def test_evaluate_only_with_a_bad_regular_expression_is_named(tmp_path, capsys):
    assert main(["evaluate", "--out", str(tmp_path / "e"), "--preset", "tiny", "--only", "(", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --only '('") and "regular expression" in err, err
    assert not (tmp_path / "e").exists()


def _quick_csv(tmp_path):
    import shutil
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs" / "results" / "quick"
    (tmp_path / "csv").mkdir()
    for f in ("results.csv", "confirm.csv"):
        shutil.copy(docs / f, tmp_path / "csv" / f)
    return str(tmp_path / "csv" / "results.csv")


def test_evaluate_results_md_naming_a_folder_not_made_yet_is_refused(tmp_path, capsys):
    # --results-md docs/new/ (no such folder yet): Path dropped the "/", and RESULTS.md was
    # written as a file "docs/new" (after the whole sweep, for a run)
    md = str(tmp_path / "new") + "/"
    assert main(["evaluate", "--from-csv", _quick_csv(tmp_path), "--out", str(tmp_path / "e"),
                 "--results-md", md]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --results-md {md} names a folder") and "RESULTS.md" in err, err
    assert not (tmp_path / "new").exists() and not (tmp_path / "e").exists()


def test_evaluate_from_csv_writes_results_md_keeping_its_notes(tmp_path, capsys):
    import re

    from spurfast.results_doc import NOTES

    csv = _quick_csv(tmp_path)
    out, doc = tmp_path / "out", tmp_path / "docs" / "RESULTS.md"
    out.mkdir()
    doc.parent.mkdir()
    (out / "RESULTS.md").write_text("old\n" + NOTES + "\nout's notes\n")
    doc.write_text("old tables\n" + NOTES + "\ndoc's notes\n")
    assert main(["evaluate", "--from-csv", csv, "--out", str(out), "--results-md", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# spurfast: planted-shortcut evaluation results") and "old tables" not in text
    assert text.endswith(NOTES + "\ndoc's notes\n") and text.count(NOTES) == 1, text[-300:]
    assert (out / "RESULTS.md").read_text().endswith(NOTES + "\nout's notes\n")
    tables = lambda t: re.sub(r"^!\[.*$", "", t.split(NOTES)[0], flags=re.M)   # noqa: E731 (links: relative to each file)
    assert tables(text) == tables((out / "RESULTS.md").read_text())   # the same tables


@pytest.mark.parametrize("extra", [["--preset", "quick"], ["--seeds", "0,1"], ["--only", "patch"],
                                   ["--cache", "c"], ["--statistic", "surprise"], ["--residual-scan"],
                                   ["--feature-view"]])
def test_evaluate_from_csv_refuses_run_options(tmp_path, capsys, extra):
    csv = _quick_csv(tmp_path)
    capsys.readouterr()
    assert main(["evaluate", "--from-csv", csv, "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {extra[0]} only apply to a run") and "--from-csv" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["discover", "demo", "demo_encoder", "discover_plusplus", "demo_assign_update",
                                  "discover_similarity"])
def test_an_unavailable_latent_knn_backend_variable_fails_first(tmp_path, capsys, monkeypatch, case):
    """latent_knn, k-means++, the fused step and the exemplars' similarity have no option, only
    SPURFAST_BACKEND_<OP>: they failed after the embedding pass (the demo's encoder variable
    after training; the similarity's after discovery)."""
    from spurfast import backends, demo

    var = {"demo_encoder": "SPURFAST_BACKEND_ENCODER", "discover_plusplus": "SPURFAST_BACKEND_KMEANS_PLUSPLUS",
           "demo_assign_update": "SPURFAST_BACKEND_KMEANS_ASSIGN_UPDATE",
           "discover_similarity": "SPURFAST_BACKEND_CLUSTER_SIMILARITY"}.get(case, "SPURFAST_BACKEND_LATENT_KNN")
    monkeypatch.setenv(var, "bogus")
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: pytest.fail("the demo started"))
    backends.clear_cache()
    if case.startswith("discover"):
        clf, vae = _models(tmp_path)
        pool = _npz(tmp_path / "pool.npz", np.zeros((12, 28, 28), np.uint8))
        cmd = ["discover", "--pool", pool, "--classifier", clf, "--vae", vae, "--out", str(tmp_path / "o"), "--quiet"]
    else:
        cmd = ["demo", "--out", str(tmp_path / "o"), "--quiet"]
    capsys.readouterr()
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {var}=bogus: backend 'bogus' does not implement"), err
    assert not (tmp_path / "o").exists(), "failed after starting work"


def test_evaluate_from_csv_results_md_elsewhere_links_the_plots_in_out(tmp_path, capsys):
    # the copy kept the links as written for --out: docs/RESULTS.md showed docs/plots (stale ones, or none)
    import re
    from pathlib import Path

    csv = _quick_csv(tmp_path)
    out, doc = tmp_path / "out", tmp_path / "docs" / "RESULTS.md"
    doc.parent.mkdir()
    assert main(["evaluate", "--from-csv", csv, "--out", str(out), "--results-md", str(doc)]) == 0
    links = re.findall(r"^!\[[^\]]*\]\(<?([^)>]+)>?\)$", doc.read_text(), re.M)
    assert links, doc.read_text()[:500]
    for link in links:
        assert (doc.parent / link).resolve() == (out / "plots" / Path(link).name).resolve(), link
        assert (doc.parent / link).is_file(), link


@pytest.mark.parametrize("device", ["meta", "mps"])
def test_a_device_torch_cannot_compute_on_is_refused_up_front(tmp_path, capsys, device):
    # mps without MPS, meta: a traceback once the models were moved there
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    clf, vae = _models(tmp_path)
    pool = _npz(tmp_path / "pool.npz", np.zeros((12, 28, 28), np.uint8))
    capsys.readouterr()
    assert main(["discover", "--pool", pool, "--classifier", clf, "--vae", vae, "--out", str(tmp_path / "o"),
                 "--quiet", "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --device {device}: torch cannot compute there") and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_train_classifier_on_an_empty_npz_names_it(tmp_path, capsys):
    # numpy's "zero-size array to reduction operation maximum which has no identity", naming nothing
    data = tmp_path / "none.npz"
    np.savez(data, images=np.zeros((0, 28, 28), np.uint8), labels=np.zeros(0, np.int64))
    capsys.readouterr()
    assert main(["train-classifier", "--data", str(data), "--out", str(tmp_path / "m.pt"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "none" in err and "no images" in err, err


def test_a_labelled_pool_without_class_names_is_not_called_unlabelled(tmp_path, capsys):
    clf, vae = _models(tmp_path)
    pool = tmp_path / "nonames.npz"
    np.savez(pool, images=np.zeros((12, 28, 28), np.uint8), labels=np.arange(12) % 10)
    capsys.readouterr()
    assert main(["discover", "--pool", str(pool), "--classifier", clf, "--vae", vae, "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unlabelled" not in err and "has labels but no class names" in err and "--num-classes" in err, err


def test_a_class_names_file_with_a_byte_order_mark_or_not_in_utf8(tmp_path):
    import re

    from spurfast.input_files import read_class_names

    names = tmp_path / "names.txt"
    names.write_bytes("\ufeffcat\r\ndog\r\n".encode("utf-8"))
    assert read_class_names(names) == ["cat", "dog"]
    names.write_bytes("caf\xe9\ndog\n".encode("latin-1"))   # the codec's message named no file
    with pytest.raises(ValueError, match=f"class-names file {re.escape(str(names))} is not UTF-8"):
        read_class_names(names)


def test_a_class_names_file_splits_at_line_breaks_only(tmp_path):
    # str.splitlines split "a\x0cx" (and names holding \x1c-\x1e, \x85, U+2028) in two: a 3-line
    # file read as 4 names, which a 4-class classifier then accepted with every later name shifted
    from spurfast.input_files import read_class_names

    names = tmp_path / "names.txt"
    names.write_text("a\x0cx\nb\u2028c\rd\x85e\r\nf\x1cg\n", encoding="utf-8", newline="")
    assert read_class_names(names) == ["a\x0cx", "b\u2028c", "d\x85e", "f\x1cg"]


@pytest.mark.parametrize("damage", ["findings", "clusters"])
def test_report_on_a_cut_short_run_file_names_it(tmp_path, capsys, damage):
    # json's "Expecting value: line 1 column 1" named no file; a clusters.csv cut mid-row raised a TypeError
    run = tmp_path / "run"
    run.mkdir()
    (run / "findings.json").write_text('{"schema": 1, "findings": [' if damage == "findings" else
                                       json.dumps({"schema": 1, "findings": []}))
    (run / "clusters.csv").write_text("class,cluster,size,n_unrelated,n_suspect,score,p_value,q_value\n"
                                      "3,1,20,18,2,5.5,0.01,0.04\n3,2,20,18,2,4.1")
    capsys.readouterr()
    assert main(["report", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    name = "findings.json" if damage == "findings" else "clusters.csv"
    assert err.startswith("error: ") and name in err and "Traceback" not in err, err


@pytest.mark.parametrize("name", ["findings.json", "summary.json", "bad_files.json", "store/manifest.json"])
def test_a_run_file_nested_too_deep_is_named_not_a_traceback(tmp_path, capsys, name):
    # json's RecursionError got past every "is not readable JSON" message
    run = tmp_path / "run"
    (run / "store").mkdir(parents=True)
    (run / "findings.json").write_text(json.dumps({"schema": 1, "findings": []}))
    (run / name).write_text("[" * 100_000)
    capsys.readouterr()
    assert main(["report", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nested deeper than the JSON reader goes" in err, err
    assert str(run / name) in err and "Traceback" not in err, err


def test_a_misspelt_backend_variable_name_is_refused_first(tmp_path, capsys, monkeypatch):
    # SPURFAST_BACKEND_KMEANS=torch (no such op) was never read: the run went on with auto
    monkeypatch.setenv("SPURFAST_BACKEND_KMEANS", "torch")
    clf, vae = _models(tmp_path)
    pool = _npz(tmp_path / "pool.npz", np.zeros((12, 28, 28), np.uint8))
    capsys.readouterr()
    assert main(["discover", "--pool", pool, "--classifier", clf, "--vae", vae, "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: SPURFAST_BACKEND_KMEANS=torch: no op is named 'kmeans'") and "KMEANS_ASSIGN" in err
    assert not (tmp_path / "o").exists()


def test_a_backend_variable_with_its_op_in_lower_case_is_refused_first(tmp_path, capsys, monkeypatch):
    # the check took the op's name in any case, the registry reads it in upper case only:
    # SPURFAST_BACKEND_kmeans_assign=nonesuch passed and the run went on with auto
    monkeypatch.setenv("SPURFAST_BACKEND_kmeans_assign", "nonesuch")
    clf, vae = _models(tmp_path)
    pool = _npz(tmp_path / "pool.npz", np.zeros((12, 28, 28), np.uint8))
    capsys.readouterr()
    assert main(["discover", "--pool", pool, "--classifier", clf, "--vae", vae, "--out", str(tmp_path / "o"),
                 "--quiet", "--no-confirm", "--n-null", "2", "--max-null", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: SPURFAST_BACKEND_kmeans_assign=nonesuch is never read") \
        and "SPURFAST_BACKEND_KMEANS_ASSIGN" in err, err
    assert not (tmp_path / "o").exists()


def test_evaluate_from_csv_refuses_a_folder_where_it_writes_results_md(tmp_path, capsys):
    # it failed after the tables were made, as "[Errno 21] Is a directory: '.../RESULTS.md.PID.tmp'"
    from spurfast.results_doc import write_csv
    write_csv(tmp_path / "results.csv", [{"setting": "s", "seed": 0, "method": "spurfast", "feature": "all",
                                          "metric": "false_findings@q0.05", "value": 0}],
              ["setting", "seed", "method", "feature", "metric", "value"])
    (tmp_path / "o" / "RESULTS.md").mkdir(parents=True)
    capsys.readouterr()
    assert main(["evaluate", "--from-csv", str(tmp_path / "results.csv"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out {tmp_path / 'o'}: {tmp_path / 'o' / 'RESULTS.md'} is a "
                                              f"folder; the evaluation writes its RESULTS.md there")


def test_evaluate_results_md_in_a_missing_folder_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    # the write failed at the very end, after the whole evaluation
    import spurfast.evaluate

    monkeypatch.setattr(spurfast.evaluate, "run_evaluation", lambda *a, **k: pytest.fail("the evaluation ran"))
    target = tmp_path / "no" / "RESULTS.md"
    capsys.readouterr()
    assert main(["evaluate", "--out", str(tmp_path / "e"), "--preset", "tiny", "--results-md", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --results-md {target}") and "does not exist" in err, err


def test_evaluate_from_csv_writes_results_md_in_utf8_whatever_the_locale(tmp_path):
    # RESULTS.md holds "±" and "–" (and notes in any language): under an ASCII locale the
    # doc generator crashed writing it, and a file with notes could not be read back
    import os
    import subprocess
    import sys
    from pathlib import Path

    from spurfast.results_doc import NOTES

    csv = _quick_csv(tmp_path)
    out, doc = tmp_path / "out", tmp_path / "RESULTS.md"
    doc.write_text("old\n" + NOTES + "\nnotes: café ± 0.1\n", encoding="utf-8")
    # the repository first, the caller's path kept (gpu_check.sh puts wheels on it)
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                           *filter(None, [os.environ.get("PYTHONPATH")])]))
    run = subprocess.run([sys.executable, "-m", "spurfast", "evaluate", "--from-csv", csv, "--out", str(out),
                          "--results-md", str(doc)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    text = doc.read_text(encoding="utf-8")
    assert "±" in text and text.endswith(NOTES + "\nnotes: café ± 0.1\n"), text[-300:]


def _class_folders(root, names, size=8):
    from PIL import Image
    for n in names:
        (root / n).mkdir(parents=True)
        Image.fromarray(np.full((size, size), 9, np.uint8)).save(root / n / "a.png")
    return root


def test_a_clean_folder_is_labelled_by_the_pools_class_names():
    # each side was labelled by its own sorted folders: clean cat/fish read 0/1, fish is 2 in the pool
    import tempfile
    from pathlib import Path

    from spurfast.input_files import same_classes
    from spurfast.data.folder import ImageFolderSource
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        pool = ImageFolderSource(_class_folders(d / "pool", ["cat", "dog", "fish"]), size=8, channels=1)
        clean = ImageFolderSource(_class_folders(d / "clean", ["cat", "fish"]), size=8, channels=1)
        fixed = same_classes(clean, pool, d / "clean", d / "pool")
        assert fixed.class_names == ["cat", "dog", "fish"] and fixed.labels().tolist() == [0, 2]
        odd = ImageFolderSource(_class_folders(d / "odd", ["bird", "cat", "dog"]), size=8, channels=1)
        with pytest.raises(ValueError, match=r"class folders \['bird'\] of .*odd are not among the 3 class names"):
            same_classes(odd, pool, d / "odd", d / "pool")


def test_a_clean_npz_with_other_class_names_is_refused(tmp_path):
    from spurfast.input_files import same_classes
    from spurfast.data.sources import ArraySource
    imgs = np.zeros((2, 1, 8, 8), np.float32)
    pool = ArraySource(imgs, np.array([0, 1]), class_names=["cat", "dog"], name="pool")
    same = ArraySource(imgs, np.array([1, 0]), class_names=["cat", "dog"], name="clean")
    assert same_classes(same, pool, tmp_path / "c.npz", tmp_path / "p.npz") is same
    other = ArraySource(imgs, np.array([1, 0]), class_names=["bird", "cat"], name="clean")
    with pytest.raises(ValueError, match=r"clean set .*c.npz names its classes \['bird', 'cat'\], pool .*p.npz "
                                         r"\['cat', 'dog'\]: their labels would not mean the same classes"):
        same_classes(other, pool, tmp_path / "c.npz", tmp_path / "p.npz")


def test_discover_refuses_a_clean_folder_of_classes_the_pool_does_not_name(tmp_path, capsys):
    # pool cat/dog/fish and clean bird/cat/dog both read 0, 1, 2: the run went ahead, and
    # confirmation pasted patterns onto "dogs" that were cats
    clf, vae = _models(tmp_path, classes=3)
    pool = _class_folders(tmp_path / "pool", ["cat", "dog", "fish"], size=28)
    clean = _class_folders(tmp_path / "clean", ["bird", "cat", "dog"], size=28)
    capsys.readouterr()
    assert main(["discover", "--pool", str(pool), "--clean", str(clean), "--classifier", clf, "--vae", vae,
                 "--size", "28", "--channels", "1", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "class folders ['bird']" in err and "not among the 3 class names" in err, err
    # none were given: they are the pool's, and the message said "class names given"
    assert f"class names of pool {pool} (['cat', 'dog', 'fish'])" in err and "given" not in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["bogus", "triton"])
def test_evaluate_on_a_gpu_machine_checks_the_encoder_variable_before_training(tmp_path, capsys, monkeypatch, value):
    # with CUDA the sweep leaves the (CPU) encoder to SPURFAST_BACKEND_ENCODER, which the up-front
    # check skipped ("the sweep names its encoder": only without CUDA): it failed after training
    import spurfast.evaluate as E
    from spurfast import backends
    from spurfast.kernels import encoder_triton

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(encoder_triton, "_INTERPRET", False)   # as on a GPU machine: CUDA tensors only
    monkeypatch.setenv("SPURFAST_BACKEND_ENCODER", value)
    monkeypatch.setattr(E, "run_evaluation", lambda *a, **k: pytest.fail("the sweep started"))
    backends.clear_cache()
    capsys.readouterr()
    try:
        assert main(["evaluate", "--preset", "tiny", "--out", str(tmp_path / "ev")]) == 2
    finally:
        backends.clear_cache()
    err = capsys.readouterr().err
    assert err.startswith(f"error: SPURFAST_BACKEND_ENCODER={value}: "), err
    if value == "triton":   # the sweep encodes CPU tensors
        assert "computes on device cpu" in err, err


@pytest.mark.parametrize("var", ["SPURFAST_BACKEND_KMEANS_ASSIGN", "SPURFAST_BACKEND_KMEANS_ASIGN"])
def test_evaluate_checks_backend_variables_before_training(tmp_path, capsys, monkeypatch, var):
    # an unavailable backend failed at the first discovery, after training models; a
    # misspelt op was never refused
    import spurfast.evaluate as E
    from spurfast import backends
    monkeypatch.setenv(var, "bogus" if var.endswith("ASSIGN") else "torch")
    monkeypatch.setattr(E, "run_evaluation", lambda *a, **k: pytest.fail("the sweep started"))
    backends.clear_cache()
    capsys.readouterr()
    assert main(["evaluate", "--preset", "tiny", "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {var}="), err


def test_a_clean_npz_with_other_class_names_is_refused_with_class_names_too(tmp_path, capsys):
    # --class-names left an .npz's own names in place: the check was skipped with it
    clf, vae = _models(tmp_path, classes=3)
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    pool = tmp_path / "pool.npz"
    np.savez(pool, images=np.zeros((6, 28, 28), np.uint8), labels=np.arange(6) % 3)
    clean = tmp_path / "clean.npz"
    np.savez(clean, images=np.zeros((6, 28, 28), np.uint8), labels=np.arange(6) % 3,
             class_names=np.array(["c", "b", "a"]))
    capsys.readouterr()
    assert main(["discover", "--pool", str(pool), "--clean", str(clean), "--class-names", str(names),
                 "--classifier", clf, "--vae", vae, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "names its classes ['c', 'b', 'a'], pool" in err and "['a', 'b', 'c']" in err, err


def test_ctrl_c_says_the_same_command_resumes(tmp_path, capsys, monkeypatch):
    # a KeyboardInterrupt traceback did not say that finished work is kept
    import spurfast.demo as D
    monkeypatch.setattr(D, "run_demo", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    capsys.readouterr()
    assert main(["demo", "--out", str(tmp_path / "o"), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted: finished work is kept") and "`spurfast demo` command resumes" in err, err
    assert "training checkpoints" in err
    # discover trains nothing: its message named training checkpoints all the same
    import spurfast.pipeline as P
    monkeypatch.setattr(P, "run_discovery", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    _models(tmp_path)
    pool = tmp_path / "pool.npz"
    np.savez(pool, images=np.zeros((6, 28, 28), np.uint8), labels=np.arange(6) % 4)
    assert main(["discover", "--pool", str(pool), "--classifier", str(tmp_path / "clf1x28.pt"), "--vae",
                 str(tmp_path / "vae1x28.pt"), "--num-classes", "10", "--out", str(tmp_path / "d"), "--quiet"]) == 130, \
        capsys.readouterr()
    err = capsys.readouterr().err
    assert err.startswith("interrupted: finished work is kept (the embedding store") and "training" not in err, err


def test_ctrl_c_in_report_or_training_says_what_that_command_keeps(tmp_path, capsys, monkeypatch):
    # every command without its own message got discover's: "the embedding store, discovery's
    # neighbours and null ... resumes", for a report that keeps none of them
    import spurfast.models.train as T
    import spurfast.report as R

    def interrupt(*a, **k):
        raise KeyboardInterrupt()
    monkeypatch.setattr(R, "write_report", interrupt)
    run = tmp_path / "run"
    run.mkdir()
    (run / "findings.json").write_text(json.dumps({"findings": []}))
    capsys.readouterr()
    assert main(["report", "--run", str(run)]) == 130
    err = capsys.readouterr().err
    assert err.startswith(f"interrupted: {run}/report.html is written whole") and "store" not in err, err
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(4) % 2)
    monkeypatch.setattr(T, "train_vae", interrupt)
    assert main(["train-vae", "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "v.pt"), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert err.startswith(f"interrupted: the epochs finished are kept in {tmp_path / 'v.pt'}.ckpt; the same "
                          f"`spurfast train-vae` command resumes from it"), err


def test_a_refused_training_leaves_no_folder_it_made(tmp_path, capsys, monkeypatch):
    # --out's new folders were made before the labels, the size and the VAE's shape were checked
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 10, 10), np.uint8), labels=np.arange(4) % 2)
    (tmp_path / "kept").mkdir()
    for cmd in (["train-classifier", "--num-classes", "1"], ["train-vae"]):   # label 1 >= 1; 10 is not 4k
        out = tmp_path / "kept" / "new" / "sub" / "m.pt"
        assert main([*cmd, "--data", str(tmp_path / "d.npz"), "--out", str(out), "--epochs", "1", "--quiet"]) == 2
        assert "error:" in capsys.readouterr().err
        assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "new").exists()
    import spurfast.models.train as T

    def interrupted(*a, checkpoint, **k):   # an interrupted one keeps its checkpoint, and so its folder
        open(checkpoint, "wb").close()
        raise KeyboardInterrupt()
    monkeypatch.setattr(T, "train_classifier", interrupted)
    out = tmp_path / "new2" / "m.pt"
    assert main(["train-classifier", "--data", str(tmp_path / "d.npz"), "--out", str(out), "--quiet"]) == 130
    assert (tmp_path / "new2" / "m.pt.ckpt").exists()


def test_ctrl_c_while_the_parser_imports_says_nothing_was_done(capsys, monkeypatch):
    # the parser imports torch (5-15 s on a loaded machine): a Ctrl-C then printed torch's
    # 20-frame import traceback
    import spurfast.cli as cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_add_pattern_args", interrupted)
    capsys.readouterr()
    assert main(["make-pool", "--out", "p", "--n", "3"]) == 130
    assert capsys.readouterr().err == "interrupted before the command started: nothing was done\n"


class _GonePipe:
    """A standard stream whose reader has gone (`| head -1`)."""
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")

    def isatty(self):
        return False


@pytest.mark.parametrize("which", ["stdout", "stderr"])
@pytest.mark.parametrize("gone", ["pipe", "closed"])
def test_a_reader_that_went_away_does_not_stop_the_work(tmp_path, monkeypatch, which, gone):
    # `discover 2>&1 | head -c 100` stopped during the embedding pass (a progress bar's write
    # raised BrokenPipeError), `demo | head -1` after training, and with `2>&-` tqdm failed on a
    # None stderr; each without a message, leaving half a run
    import sys
    stream = _GonePipe() if gone == "pipe" else None
    monkeypatch.setattr(sys, which, stream)
    out = tmp_path / "pool"
    assert main(["make-pool", "--out", str(out), "--n", "6", "--size", "16:20", "--classes", "2",
                 "--workers", "1"]) == 0
    assert len(list(out.rglob("*.jpg"))) == 6
    assert getattr(sys, which) is stream   # given back as it came


def test_a_read_only_or_full_file_system_is_an_error_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    # EROFS / ENOSPC / EDQUOT are OSErrors main() did not catch (PermissionError and the like it did)
    import errno
    import spurfast.cli as cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli, "cmd_env", full)
    capsys.readouterr()
    assert main(["env"]) == 2
    assert capsys.readouterr().err == "error: [Errno 28] No space left on device\n"


@pytest.mark.parametrize("var, value, says", [("SPURFAST_BACKEND", "Torch", "SPURFAST_BACKEND='Torch' names no backend"),
                                              ("SPURFAST_BACKEND_KMEANS_ASIGN", "torch", "no op is named 'kmeans_asign'")])
def test_env_refuses_the_backend_variables_a_run_refuses(capsys, monkeypatch, var, value, says):
    # `spurfast env`, the diagnostic, listed every backend "available" where discover then stopped
    monkeypatch.setenv(var, value)
    capsys.readouterr()
    assert main(["env"]) == 2
    assert says in capsys.readouterr().err


def test_an_explicit_kmeans_backend_auto_beats_the_update_variable(tmp_path, capsys, monkeypatch):
    # --kmeans-backend auto left the update to SPURFAST_BACKEND_KMEANS_UPDATE (the loop passes the
    # run's backend only when it names an update provider), past the up-front check, which skips an
    # explicit auto: an unavailable one failed after the embedding pass
    import os

    from spurfast import backends

    if torch.cuda.is_available():
        pytest.skip("CuPy can run here")
    monkeypatch.setenv("SPURFAST_BACKEND_KMEANS_UPDATE", "cupy")
    monkeypatch.delenv("SPURFAST_BACKEND_KMEANS_ASSIGN", raising=False)
    backends.clear_cache()
    clf, vae = _models(tmp_path)
    pool = _npz(tmp_path / "pool.npz", np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8))
    capsys.readouterr()
    assert main(["discover", "--pool", pool, "--classifier", clf, "--vae", vae, "--out", str(tmp_path / "o"),
                 "--quiet", "--n-null", "2", "--max-null", "2", "--no-confirm", "--kmeans-backend", "auto"]) == 0, \
        capsys.readouterr().err
    assert (tmp_path / "o" / "findings.json").is_file()
    assert os.environ["SPURFAST_BACKEND_KMEANS_UPDATE"] == "cupy"   # the caller's environment is left as it was
    assert "SPURFAST_BACKEND_KMEANS_ASSIGN" not in os.environ


@pytest.mark.parametrize("flag", ["--kmeans-backend", "--encoder-backend", "--loader-backend"])
def test_backend_flags_say_they_beat_the_variables(flag, capsys):
    # --help said nothing about SPURFAST_BACKEND*, which a given flag overrides
    with pytest.raises(SystemExit):
        main(["discover", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    help_ = text.split(flag + " {")[-1].split(" --")[0]   # the options list, not the usage line
    assert "SPURFAST_BACKEND" in help_ and "given here, it beats those variables" in help_, help_


@pytest.mark.parametrize("damage", ["summary.json", "bad_files.json", "store/manifest.json"])
def test_report_names_a_cut_short_summary_or_bad_files_list(tmp_path, capsys, damage):
    # json's "Expecting value" named no file: summary.json (the demo's) and the unreadable-file
    # list are written by the run in one go, so an interrupted run leaves them cut short too
    run = tmp_path / "run"
    (run / "store").mkdir(parents=True)
    (run / "findings.json").write_text(json.dumps({"schema": 1, "findings": []}))
    (run / damage).write_text('{"a": ')
    capsys.readouterr()
    assert main(["report", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run / damage} is not readable JSON") and "Traceback" not in err, err


@pytest.mark.parametrize("name,text", [("summary.json", "[1, 2]"), ("bad_files.json", '"x"')])
def test_report_names_a_summary_or_bad_files_list_that_is_no_object(tmp_path, capsys, name, text):
    # a hand-edited list or string ended in "AttributeError: 'list' object has no attribute 'items'"
    run = tmp_path / "run"
    run.mkdir()
    (run / "findings.json").write_text(json.dumps({"schema": 1, "spurfast_version": "0.1.0", "config": {},
                                                   "pool": {}, "findings": []}))
    (run / name).write_text(text)
    capsys.readouterr()
    assert main(["report", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run / name} holds a JSON ") and "expected an object" in err, err
    (run / name).write_text("{}")
    assert main(["report", "--run", str(run)]) == 0 and (run / "report.html").is_file()


@pytest.mark.parametrize("mode", ["from-csv", "run"])
def test_evaluate_out_in_place_of_a_file_is_named(tmp_path, capsys, monkeypatch, mode):
    # both failed as "error: [Errno 17] File exists: 'e'" (or Errno 20 below it), which said nothing of why
    import spurfast.evaluate

    monkeypatch.setattr(spurfast.evaluate, "run_evaluation", lambda *a, **k: pytest.fail("the evaluation ran"))
    (tmp_path / "e").write_text("x")
    how = ["--preset", "tiny"] if mode == "run" else ["--from-csv", _quick_csv(tmp_path)]
    for out in (tmp_path / "e", tmp_path / "e" / "sub"):
        capsys.readouterr()
        assert main(["evaluate", "--out", str(out), *how]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out}: {tmp_path / 'e'} is a file, not a folder"), err


def test_ctrl_c_in_make_pool_says_the_same_command_resumes(tmp_path, capsys, monkeypatch):
    # it once said "the same command resumes" when the same command refused the half-written
    # pool; now the same command does resume it (and another one needs --overwrite)
    import spurfast.make_pool as M

    out = str(tmp_path / "pool")
    real = M.render
    monkeypatch.setattr(M, "render", lambda i, *a: real(i, *a) if i < 5 else (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main(["make-pool", "--out", out, "--n", "20", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert err.startswith(f"interrupted: pool {out} is incomplete; the same command resumes it"), err
    assert "--overwrite" in err
    monkeypatch.undo()
    assert main(["make-pool", "--out", out, "--n", "21", "--quiet"]) == 2   # other settings: not resumed
    assert "--overwrite" in capsys.readouterr().err
    assert main(["make-pool", "--out", out, "--n", "20", "--quiet"]) == 0
    assert "5 kept from the interrupted run" in capsys.readouterr().out


def test_ctrl_c_in_make_pool_with_overwrite_says_to_drop_it_to_resume(tmp_path, capsys, monkeypatch):
    # "the same command resumes it": the same command, --overwrite and all, deleted the images
    # written and drew them again
    import spurfast.make_pool as M

    out = str(tmp_path / "pool")
    real = M.render
    monkeypatch.setattr(M, "render", lambda i, *a: real(i, *a) if i < 5 else (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main(["make-pool", "--out", out, "--n", "20", "--quiet", "--overwrite"]) == 130
    err = capsys.readouterr().err
    assert "the same command without --overwrite resumes it (the images written are kept)" in err, err
    monkeypatch.undo()
    assert main(["make-pool", "--out", out, "--n", "20", "--quiet"]) == 0
    assert "5 kept from the interrupted run" in capsys.readouterr().out


def test_evaluate_from_csv_names_a_cut_short_timing_file(tmp_path, capsys):
    # json's "Expecting value" named no file (timing.json beside the CSV is written in one go)
    from pathlib import Path

    csv = _quick_csv(tmp_path)
    (Path(csv).parent / "timing.json").write_text('{"wall_s": ')
    capsys.readouterr()
    assert main(["evaluate", "--from-csv", csv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {Path(csv).parent / 'timing.json'} (the run's timing") and "Traceback" not in err, err


@pytest.mark.parametrize("case", ["not_results", "not_utf8", "bad_confirm", "bad_timing", "header_only"])
def test_evaluate_from_csv_of_bad_input_makes_no_out_folder(tmp_path, capsys, case):
    # --out was created before the CSV was read: a CSV that is not a results CSV left it behind, empty;
    # a header without rows was written up as a document of empty tables
    from pathlib import Path

    csv = Path(_quick_csv(tmp_path))
    if case == "not_results":
        csv.write_text("a,b\n1,2\n")
    elif case == "header_only":
        csv.write_text(csv.read_text().splitlines()[0] + "\n")
    elif case == "not_utf8":
        csv.write_bytes(b"\xff\xfe\x00junk")
    elif case == "bad_confirm":
        (csv.parent / "confirm.csv").write_text("setting,true_finding,flip_rate,control_flip_rate\nx,2,0.5,0.1\n")
    else:
        (csv.parent / "timing.json").write_text('{"wall_s": ')
    out = tmp_path / "new" / "out"
    capsys.readouterr()
    assert main(["evaluate", "--from-csv", str(csv), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    if case == "header_only":
        assert "holds a header and no rows" in err, err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("existed", [False, True])
def test_evaluate_from_csv_failing_mid_write_leaves_no_folder_of_its_own(tmp_path, monkeypatch, capsys, existed):
    # a write that fails (a full disk, Ctrl-C) after --out was made removes the folders it made, and only those
    from spurfast import results_doc

    def fail(csv_path, confirm_path, md_path, plots_dir=None, **kw):
        (plots_dir / "half.png").parent.mkdir(parents=True)
        (plots_dir / "half.png").write_bytes(b"")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(results_doc, "write_results", fail)
    csv = _quick_csv(tmp_path)
    out = tmp_path / "new" / "out"
    if existed:
        out.mkdir(parents=True)
        (out / "mine.txt").write_text("kept")
    capsys.readouterr()
    assert main(["evaluate", "--from-csv", csv, "--out", str(out)]) == 2   # worded since main() takes OSError
    assert capsys.readouterr().err == "error: [Errno 28] No space left on device\n"
    if existed:   # the user's folder stays, with what it held; the half-written plots too (no way to tell them)
        assert (out / "mine.txt").read_text() == "kept"
    else:
        assert not (tmp_path / "new").exists()


def test_evaluate_from_csv_names_a_timing_file_that_is_no_object_and_reads_one_without_wall_time(tmp_path, capsys):
    # [1] gave an AttributeError traceback, {"command": ...} a KeyError: 'wall_s'
    from pathlib import Path

    csv = _quick_csv(tmp_path)
    (Path(csv).parent / "timing.json").write_text("[1]")
    capsys.readouterr()
    assert main(["evaluate", "--from-csv", csv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "holds a list, not the object" in err and "Traceback" not in err, err
    (Path(csv).parent / "timing.json").write_text('{"command": "spurfast evaluate --preset quick"}')
    assert main(["evaluate", "--from-csv", csv, "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "RESULTS.md").read_text()
    assert "Command: `spurfast evaluate --preset quick`" in md and "Wall time" not in md


@pytest.mark.parametrize("cmd", ["train-vae", "train-classifier"])
def test_train_out_in_an_unwritable_folder_is_refused_before_training(tmp_path, capsys, monkeypatch, cmd):
    # the first checkpoint failed after an epoch, with torch's traceback ("open file failed")
    import tempfile

    import spurfast.models.train as T

    try:
        tempfile.TemporaryFile(dir="/sys").close()
        pytest.skip("/sys takes files here")
    except OSError:
        pass
    monkeypatch.setattr(T, "train_vae", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(T, "train_classifier", lambda *a, **k: pytest.fail("training started"))
    pool = _npz(tmp_path / "pool.npz", np.zeros((12, 28, 28), np.uint8))
    capsys.readouterr()
    assert main([cmd, "--data", pool, "--out", "/sys/model.pt", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out /sys/model.pt: cannot write in folder /sys"), err


@pytest.mark.parametrize("how", ["flag", "variable"])
def test_a_cuda_only_backend_with_device_cpu_is_refused_first(tmp_path, capsys, monkeypatch, how):
    # on a GPU machine (CuPy available) --device cpu with the CuPy k-means passed the check and
    # failed at the first clustering ("x is on cpu; the CuPy kernels need CUDA tensors"), after
    # the embedding pass
    from spurfast import backends
    from spurfast.kernels import kmeans_cupy

    monkeypatch.setattr(kmeans_cupy, "is_available", lambda: (True, ""))
    monkeypatch.delenv("SPURFAST_BACKEND_KMEANS_ASSIGN", raising=False)
    backends.clear_cache()
    clf, vae = _models(tmp_path)
    pool = _npz(tmp_path / "pool.npz", np.zeros((12, 28, 28), np.uint8))
    cmd = ["discover", "--pool", pool, "--classifier", clf, "--vae", vae, "--out", str(tmp_path / "o"), "--quiet",
           "--device", "cpu"]
    if how == "flag":
        cmd += ["--kmeans-backend", "cupy"]
    else:
        monkeypatch.setenv("SPURFAST_BACKEND_KMEANS_ASSIGN", "cupy")
    capsys.readouterr()
    try:
        assert main(cmd) == 2
    finally:
        backends.clear_cache()   # the registry cached the patched availability
    err = capsys.readouterr().err
    by = "--kmeans-backend cupy" if how == "flag" else "SPURFAST_BACKEND_KMEANS_ASSIGN=cupy"
    assert err.startswith(f"error: {by}: backend 'cupy' for 'kmeans_assign' takes cuda tensors"), err
    assert not (tmp_path / "o").exists(), "failed after starting work"


def test_evaluate_from_csv_quotes_the_command_it_records(tmp_path):
    # the "tables regenerated by" command was joined bare: an --out with a space split in two
    import shlex

    csv = _quick_csv(tmp_path)
    out = tmp_path / "regen out"
    assert main(["evaluate", "--from-csv", csv, "--out", str(out)]) == 0
    line = next(ln for ln in (out / "RESULTS.md").read_text().splitlines() if "regenerated by" in ln)
    cmd = line.split("regenerated by `")[1].split("`")[0]
    assert shlex.split(cmd)[-2:] == ["--out", str(out)], cmd


def test_unreadable_clean_images_are_listed_with_the_pools(tmp_path, capsys):
    # confirmation skipped them with a log line only: bad_files.json and the report said nothing
    import pathlib

    clf, vae = _models(tmp_path)
    digits = [str(c) for c in range(10)]
    pool = _digit_folders(tmp_path / "pool", digits, per_class=6)
    clean = _digit_folders(tmp_path / "clean", digits)
    (pathlib.Path(clean) / "4" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "o"
    assert main(["discover", "--pool", pool, "--clean", clean, "--size", "28", "--channels", "1", "--classifier", clf,
                 "--vae", vae, "--n-null", "2", "--max-null", "2", "--k", "2", "--min-cluster-size", "1",
                 "--fdr", "0.999", "--quiet", "--out", str(out)]) == 0, capsys.readouterr().err
    doc = json.loads((out / "findings.json").read_text())
    assert any(f["confirm"] for f in doc["findings"]), "nothing was confirmed: the clean set was never read"
    bad = json.loads((out / "bad_files.json").read_text())
    assert [k for k in bad if k.startswith("clean set: ")] == [f"clean set: {pathlib.Path(clean) / '4' / 'broken.png'}"], bad
    assert "broken.png" in (out / "report.html").read_text()


@pytest.mark.parametrize("cmd", [["demo"], ["plant", "--out", "x"], ["train-vae", "--data", "d", "--out", "v.pt"],
                                 ["discover", "--pool", "p", "--classifier", "c", "--vae", "v", "--out", "o"]])
def test_a_seed_too_large_for_training_is_refused_by_argparse(cmd, capsys):
    # from about 1.8e16 training's seed * 1000 + epoch overflowed mid-run, naming no input
    from spurfast.evaluate import MAX_SEED
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--seed", str(MAX_SEED + 1)])
    assert e.value.code == 2 and "--seed" in capsys.readouterr().err


@pytest.mark.on_gpu
def test_kmeans_backend_triton_runs_leaving_the_update_to_its_usual_choice(tmp_path, capsys, monkeypatch):
    # triton serves the assignment alone; the run leaves the update to SPURFAST_BACKEND_KMEANS_UPDATE
    # (else auto), but the up-front check resolved the update with "triton" too and refused every run
    from spurfast import backends
    from spurfast.kernels import kmeans_triton

    if not kmeans_triton.is_available()[0]:
        pytest.skip("Triton cannot run here (no GPU and no interpreter)")
    for var in ("SPURFAST_BACKEND", "SPURFAST_BACKEND_KMEANS_ASSIGN", "SPURFAST_BACKEND_KMEANS_UPDATE"):
        monkeypatch.delenv(var, raising=False)
    backends.clear_cache()
    clf, vae = _models(tmp_path)
    pool = _npz(tmp_path / "pool.npz", np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8))
    device = "cuda" if torch.cuda.is_available() else "cpu"   # (the interpreter takes CPU tensors)
    capsys.readouterr()
    assert main(["discover", "--pool", pool, "--classifier", clf, "--vae", vae, "--out", str(tmp_path / "o"),
                 "--quiet", "--n-null", "2", "--max-null", "2", "--no-confirm", "--device", device,
                 "--kmeans-backend", "triton"]) == 0, capsys.readouterr().err
    assert (tmp_path / "o" / "findings.json").is_file()
    # a variable naming an update backend that cannot run here is still refused first
    monkeypatch.setenv("SPURFAST_BACKEND_KMEANS_UPDATE", "nonesuch")
    assert main(["discover", "--pool", pool, "--classifier", clf, "--vae", vae, "--out", str(tmp_path / "o2"),
                 "--quiet", "--no-confirm", "--device", device, "--kmeans-backend", "triton"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: SPURFAST_BACKEND_KMEANS_UPDATE=nonesuch: "), err
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("mode", ["run", "from-csv"])
@pytest.mark.parametrize("target", ["folder", "unwritable"])
def test_evaluate_results_md_that_is_a_folder_is_refused_before_the_run(tmp_path, capsys, monkeypatch, mode, target):
    # its folder existed, so it passed the check and the write failed at the very end ("Is a directory",
    # "Permission denied")
    import tempfile

    import spurfast.evaluate

    monkeypatch.setattr(spurfast.evaluate, "run_evaluation", lambda *a, **k: pytest.fail("the evaluation ran"))
    if target == "folder":
        md = tmp_path / "docs"
        md.mkdir()
        want = f"error: --results-md {md} is a folder"
    else:
        try:
            tempfile.TemporaryFile(dir="/sys").close()
            pytest.skip("/sys takes files here")
        except OSError:
            pass
        md = "/sys/RESULTS.md"
        want = "error: --results-md /sys/RESULTS.md: cannot write in folder /sys"
    how = ["--preset", "tiny"] if mode == "run" else ["--from-csv", _quick_csv(tmp_path)]
    capsys.readouterr()
    assert main(["evaluate", "--out", str(tmp_path / "e"), *how, "--results-md", str(md)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(want), err
    assert not (tmp_path / "e").exists(), "started writing"


@pytest.mark.parametrize("mode", ["run", "from-csv"])
def test_evaluate_does_not_replace_a_file_it_did_not_write(tmp_path, capsys, monkeypatch, mode):
    # --results-md README.md (a slip) replaced the hand-written file without a word, and a RESULTS.md
    # of someone else's in --out the same; plant, discover and make-pool refuse to
    import spurfast.evaluate

    monkeypatch.setattr(spurfast.evaluate, "run_one", lambda *a, **k: pytest.fail("the evaluation ran"))
    how = ["--preset", "tiny"] if mode == "run" else ["--from-csv", _quick_csv(tmp_path)]
    readme = tmp_path / "README.md"
    readme.write_text("# my project\n")
    capsys.readouterr()
    assert main(["evaluate", "--out", str(tmp_path / "e"), *how, "--results-md", str(readme)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --results-md {readme} is not a RESULTS.md of `spurfast "
                                              f"evaluate`")
    assert readme.read_text() == "# my project\n" and not (tmp_path / "e").exists()
    out = tmp_path / "mine"
    out.mkdir()
    (out / "RESULTS.md").write_text("my own results\n")
    assert main(["evaluate", "--out", str(out), *how]) == 2
    assert "RESULTS.md" in capsys.readouterr().err and (out / "RESULTS.md").read_text() == "my own results\n"


@pytest.mark.parametrize("mode", ["cli", "api"])
def test_evaluate_cache_that_is_not_a_folder_is_named_before_any_work(tmp_path, capsys, mode):
    # "[Errno 20] Not a directory: 'afile/runs'" or "[Errno 17] File exists: 'dl'", and an empty --out left
    from spurfast.evaluate import run_evaluation

    afile = tmp_path / "afile"
    afile.write_text("x")
    dead = tmp_path / "dl"
    dead.symlink_to(tmp_path / "nowhere")
    for cache in (afile, dead, afile / "sub"):
        capsys.readouterr()
        if mode == "cli":
            assert main(["evaluate", "--preset", "tiny", "--out", str(tmp_path / "e"), "--cache", str(cache)]) == 2
            assert capsys.readouterr().err.startswith(f"error: --cache {cache}: "), cache
        else:
            with pytest.raises(NotADirectoryError, match=f"cache {re.escape(str(cache))}: .* is not a folder"):
                run_evaluation("tiny", tmp_path / "e", cache=cache, progress=False)
        assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("mode", ["run", "from-csv"])
def test_evaluate_results_md_that_is_a_read_only_file_is_refused_before_the_run(tmp_path, capsys, monkeypatch,
                                                                                mode):
    # only its folder was checked (it takes files), so the rewrite in place failed at the very end
    import os

    import spurfast.evaluate

    monkeypatch.setattr(spurfast.evaluate, "run_evaluation", lambda *a, **k: pytest.fail("the evaluation ran"))
    md = tmp_path / "RESULTS.md"
    md.write_text("# spurfast: planted-shortcut evaluation results\n")
    md.chmod(0o444)
    real = os.access   # as a user who is not root sees it (root may write any file)
    monkeypatch.setattr(os, "access", lambda p, m, **k: False if str(p) == str(md) and m & os.W_OK else real(p, m, **k))
    how = ["--preset", "tiny"] if mode == "run" else ["--from-csv", _quick_csv(tmp_path)]
    capsys.readouterr()
    assert main(["evaluate", "--out", str(tmp_path / "e"), *how, "--results-md", str(md)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --results-md {md}: the file is not writable"), err
    assert not (tmp_path / "e").exists(), "started writing"


@pytest.mark.parametrize("mode", ["run", "from-csv"])
def test_evaluate_results_md_naming_the_results_csv_is_refused(tmp_path, capsys, monkeypatch, mode):
    # RESULTS.md was written over the CSV it was made from (the run's results.csv: a whole sweep's rows)
    import spurfast.evaluate

    monkeypatch.setattr(spurfast.evaluate, "run_evaluation", lambda *a, **k: pytest.fail("the evaluation ran"))
    if mode == "run":
        how, md = ["--preset", "tiny"], tmp_path / "e" / "results.csv"
        md.parent.mkdir()
    else:
        how, md = ["--from-csv", _quick_csv(tmp_path)], tmp_path / "csv" / "results.csv"
    before = md.read_bytes() if md.exists() else None
    capsys.readouterr()
    assert main(["evaluate", "--out", str(tmp_path / "e"), *how, "--results-md", str(md)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --results-md {md} is the evaluation's results.csv"), err
    assert (md.read_bytes() if md.exists() else None) == before


@pytest.mark.parametrize("cmd", ["train-classifier", "train-vae"])
def test_a_folder_size_whose_batch_cannot_fit_in_memory_is_refused_first(tmp_path, capsys, monkeypatch, cmd):
    # --size 100000 on a folder ran about two minutes and was killed by the kernel (22 GB resident)
    from spurfast.models import train

    # stand-ins with the real ones' batch size (the check reads it from their signature)
    monkeypatch.setattr(train, "train_classifier", lambda *a, batch_size=128, **k: pytest.fail("trained"))
    monkeypatch.setattr(train, "train_vae", lambda *a, batch_size=128, **k: pytest.fail("trained"))
    pool = _class_folders(tmp_path / "pool", ["cat", "dog"])
    capsys.readouterr()
    assert main([cmd, "--data", str(pool), "--size", "100000", "--out", str(tmp_path / "m.pt"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --size 100000: a training batch of 128 images of 3x100000x100000"), err
    assert "choose a smaller --size" in err and not (tmp_path / "m.pt").exists()


def test_a_class_names_file_shorter_than_num_classes_is_refused_first(tmp_path, capsys):
    # without --num-classes the classifier's width is checked against the file; with it a file
    # naming 5 of 10 classes passed: folders were labelled by a partial list (whatever the
    # classifier's order) and findings of classes past the file had no class name
    clf, vae = _models(tmp_path)
    pool = _digit_folders(tmp_path / "pool", [str(c) for c in range(5)])
    names = tmp_path / "names.txt"
    names.write_text("".join(f"{c}\n" for c in range(5)))
    base = ["discover", "--pool", pool, "--size", "28", "--channels", "1", "--classifier", clf, "--vae", vae,
            "--n-null", "2", "--max-null", "2", "--k", "2", "--no-confirm", "--quiet", "--class-names", str(names)]
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "o"), "--num-classes", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --class-names {names} names 5 classes, but --num-classes is 10"), err
    assert not (tmp_path / "o").exists()
    names.write_text("".join(f"{c}\n" for c in range(10)))   # the whole list: fine
    assert main(base + ["--out", str(tmp_path / "run"), "--num-classes", "10"]) == 0, capsys.readouterr().err


def test_npz_class_names_stored_as_bytes_or_not_one_dimensional(tmp_path, capsys):
    # str() of a bytes name gave "b'cat'" (no folder or clean set matched it, and the report showed
    # it); a 2-D array became one name; a 0-d one raised TypeError with a traceback
    from spurfast.input_files import load_npz_source

    def npz(name, class_names):
        np.savez(tmp_path / name, images=np.zeros((4, 28, 28), np.uint8), labels=np.arange(4) % 2,
                 class_names=class_names)
        return str(tmp_path / name)

    assert load_npz_source(npz("b.npz", np.array([b"cat", "dög".encode()])))[0].class_names == ["cat", "dög"]
    for name, arr, shape in (("two.npz", np.array([["a", "b"]]), "(1, 2)"), ("zero.npz", np.array("ab"), "()")):
        path = npz(name, arr)
        with pytest.raises(ValueError, match=rf"{name}: its 'class_names' array has shape {re.escape(shape)}"):
            load_npz_source(path)
        capsys.readouterr()
        assert main(["train-vae", "--data", path, "--out", str(tmp_path / "v.pt"), "--quiet"]) == 2
        assert capsys.readouterr().err.startswith(f"error: {path}: its 'class_names' array has shape")


def test_an_npz_naming_a_class_twice_is_refused(tmp_path):
    # a --class-names file with a repeated name was refused, an .npz's class_names was not:
    # a clean folder matched by name then took one of the two labels, and two classes' findings one name
    from spurfast.input_files import load_npz_source

    np.savez(tmp_path / "p.npz", images=np.zeros((4, 28, 28), np.uint8), labels=np.arange(4) % 3,
             class_names=np.array(["cat", "dog", "cat"]))
    with pytest.raises(ValueError, match=r"p.npz: its class_names name 'cat' more than once"):
        load_npz_source(tmp_path / "p.npz")


def test_an_npz_with_a_damaged_array_header_is_named(tmp_path, capsys):
    # numpy parses a member's header as Python: one damaged byte raised tokenize.TokenError (no
    # ValueError), a traceback naming no file
    from spurfast.input_files import load_npz_source

    path = tmp_path / "pool.npz"
    np.savez(path, images=np.zeros((8, 1, 28, 28), np.uint8), labels=np.arange(8) % 2)
    raw = bytearray(path.read_bytes())
    raw[raw.find(b"\x93NUMPY") + 8] = ord("(")
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} is not a readable \.npz file \(a damaged array "
                                         r"header: TokenError"):
        load_npz_source(path)
    capsys.readouterr()
    assert main(["train-vae", "--data", str(path), "--out", str(tmp_path / "v.pt"), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path} is not a readable .npz file")


def test_an_npz_with_a_damaged_member_is_named(tmp_path, capsys):
    # a damaged deflate stream raised zlib.error (no ValueError): a traceback that named no file
    import struct
    import zipfile

    from spurfast.input_files import load_npz_source

    path = tmp_path / "pool.npz"
    np.savez_compressed(path, images=np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8),
                        labels=np.arange(8) % 2)
    info = zipfile.ZipFile(path).getinfo("images.npy")
    with open(path, "r+b") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        fh.write(b"\xff")   # the first deflate block's type: 11, reserved
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: .*invalid block type"):
        load_npz_source(path)
    capsys.readouterr()
    assert main(["train-vae", "--data", str(path), "--out", str(tmp_path / "v.pt"), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: ")


def test_a_model_is_never_written_over_its_training_data(tmp_path, capsys):
    # `train-vae --data pool.npz --out pool.npz` (a slip) trained and then saved the model over the pool
    pool = _npz(tmp_path / "pool.npz", np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8))
    before = (tmp_path / "pool.npz").read_bytes()
    (tmp_path / "link.npz").symlink_to(tmp_path / "pool.npz")
    names = tmp_path / "names.txt"
    names.write_text("".join(f"{c}\n" for c in range(10)))
    for cmd, out, flag in ((["train-vae", "--data", pool], pool, "data"),
                           (["train-classifier", "--data", pool], str(tmp_path / "link.npz"), "data"),
                           (["train-classifier", "--data", pool, "--class-names", str(names)], str(names),
                            "class-names")):
        capsys.readouterr()
        assert main([*cmd, "--out", out, "--epochs", "1", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out} is the --{flag} file "), err
    assert (tmp_path / "pool.npz").read_bytes() == before and names.read_text().startswith("0\n")
    assert not list(tmp_path.glob("*.ckpt"))


def test_an_input_file_that_is_a_folder_or_a_pipe_is_not_said_to_be_missing(tmp_path, capsys):
    # --suspect, --class-names and --from-csv naming a folder (or <(...), a pipe) said "does not exist"
    import os

    clf, vae = _models(tmp_path)
    pool = _npz(tmp_path / "pool.npz", np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8))
    folder = tmp_path / "folder"
    folder.mkdir()
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    run = ["discover", "--pool", pool, "--classifier", clf, "--vae", vae, "--out", str(tmp_path / "o"), "--quiet"]
    for argv, what, path, why in (
            (run + ["--suspect", str(folder)], "suspect file", folder, "is a folder; expected a file"),
            (run + ["--class-names", str(folder)], "class-names file", folder, "is a folder; expected a file"),
            (run + ["--class-names", str(pipe)], "class-names file", pipe, "is not a regular file"),
            (["evaluate", "--from-csv", str(folder), "--out", str(tmp_path / "e")], "results CSV", folder,
             "is a folder; expected a file"),
            (["train-vae", "--data", str(pipe), "--out", str(tmp_path / "v.pt")], "data file", pipe,
             "is not a regular file")):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {what} {path} {why}"), err
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


@pytest.mark.parametrize("text", ["", "\n\n", "# suspects of run 3\n"])
def test_a_suspect_file_listing_no_index_is_refused(tmp_path, capsys, text):
    # it ran as "no image is suspect" (said only in numpy's "input contained no data" warning): over a
    # pool .npz's own suspect array, with the training-support test left without suspects
    import warnings

    from spurfast.input_files import load_suspect

    f = tmp_path / "suspect.txt"
    f.write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # numpy's warning is not shown on top of the error
        with pytest.raises(ValueError, match=f"^suspect file {f} lists no pool indices; expected the suspect "
                                             f"samples' pool indices, one per line"):
            load_suspect(f, 10, "pool")
    clf, vae = _models(tmp_path)
    pool = _npz(tmp_path / "pool.npz", np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8))
    capsys.readouterr()
    assert main(["discover", "--pool", pool, "--classifier", clf, "--vae", vae, "--out", str(tmp_path / "o"),
                 "--suspect", str(f), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: suspect file {f} lists no pool indices") and "--suspect" in err, err
    assert not (tmp_path / "o").exists()


def test_a_suspect_file_with_a_byte_order_mark_is_read(tmp_path):
    # Windows editors' UTF-8 starts with a byte-order mark: the first index read "\ufeff1" and the
    # file was refused as not holding integers (--class-names files already took it)
    from spurfast.input_files import load_suspect

    f = tmp_path / "suspect.txt"
    f.write_bytes("\ufeff1\r\n2\r\n5\r\n".encode("utf-8"))
    assert np.flatnonzero(load_suspect(f, 10, "pool")).tolist() == [1, 2, 5]
    f.write_bytes(b"1\n\xff\n")   # not text at all: still named
    with pytest.raises(ValueError, match="suspect file .*suspect.txt must hold integer pool indices"):
        load_suspect(f, 10, "pool")


def test_a_suspect_file_of_two_columns_is_refused_not_flattened(tmp_path):
    # "index label" lines were read as one flat list: the labels became suspect indices
    from spurfast.input_files import load_suspect

    f = tmp_path / "suspect.txt"
    for text in ("17 3\n42 5\n", "17 3\n"):
        f.write_text(text)
        with pytest.raises(ValueError, match="suspect file .*suspect.txt has 2 columns; expected one pool index a line"):
            load_suspect(f, 100, "pool")
    for text in ("17\n", "17\n42\n"):   # one column, one line or more
        f.write_text(text)
        assert np.flatnonzero(load_suspect(f, 100, "pool")).tolist() == [17, 42][:text.count("\n")]


def test_a_result_line_naming_a_path_that_is_not_utf8_is_printed(tmp_path, capsys):
    # argv decodes such a name with surrogate escapes; under a strict stdout (a UTF-8 locale; pytest's
    # capture is one) "wrote ..." raised after the model was saved: exit 2, "'utf-8' codec can't encode"
    import os

    pool = _npz(tmp_path / "pool.npz", np.zeros((12, 28, 28), np.uint8))
    out = os.fsdecode(os.fsencode(str(tmp_path)) + b"/v\xff.pt")
    capsys.readouterr()
    assert main(["train-vae", "--data", pool, "--out", out, "--epochs", "1", "--quiet"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("wrote ") and os.path.isfile(out)


_SAVEZ = np.savez_compressed


@pytest.mark.parametrize("pattern", [["--family", "noise", "--strength", "0.001"],
                                     ["--family", "pixel", "--strength", "0.5", "--position", "center"]])
def test_plants_ground_truth_is_about_the_bytes_it_writes(tmp_path, capsys, pattern):
    # a stamp off the 1/255 grid rounded back to the image's own bytes in the uint8 files, and
    # such images were listed as carriers (noise of 0.001: every one of them, none changed)
    base = ["plant", "--dataset", "digits", "--n-poisoned", "all", "--target-class", "3", *pattern]
    assert main([*base, "--out", str(tmp_path / "p1"), "--pool-fraction", "1.0"]) == 0
    assert main([*base[:3], "--dataset", "digits", "--n-poisoned", "0", "--target-class", "3", *pattern,
                 "--out", str(tmp_path / "p0"), "--pool-fraction", "0"]) == 0
    p1, p0 = np.load(tmp_path / "p1" / "pool.npz"), np.load(tmp_path / "p0" / "pool.npz")
    moved = (p1["images"] != p0["images"]).reshape(len(p1["images"]), -1).any(1)
    assert np.array_equal(p1["carries"], moved)
    info = json.loads((tmp_path / "p1" / "plant.json").read_text())
    assert info["n_pool_carrying"] == int(moved.sum())
    t1, t0 = np.load(tmp_path / "p1" / "train.npz"), np.load(tmp_path / "p0" / "train.npz")
    assert info["n_poisoned"] == int((t1["images"] != t0["images"]).reshape(len(t1["images"]), -1).any(1).sum())


def _fake_planted_data(monkeypatch, interrupt_after=None):
    """make_planted_data as a few random images (the CLI's plant writes them as the real ones);
    ``interrupt_after``: a file name whose write is followed by Ctrl-C."""
    import types

    import spurfast.pipeline as P
    from spurfast.data.sources import ArraySource

    def fake(dataset, **kw):
        src = lambda n: ArraySource(torch.rand(n, 1, 8, 8), labels=np.arange(n) % 2)  # noqa: E731
        truth = types.SimpleNamespace(to_dict=lambda: {"target_class": 1})
        return types.SimpleNamespace(train=src(4), pool=src(6), test_clean=src(2), class_names=["a", "b"],
                                     suspect=np.zeros(6, bool), carries=np.zeros(6, bool), dataset="digits",
                                     truth=truth)
    monkeypatch.setattr(P, "make_planted_data", fake)
    real = _SAVEZ

    def savez(file, **arrays):
        real(file, **arrays)
        name = os.path.basename(getattr(file, "name", file))   # a path, or the file object plant writes to
        if interrupt_after and name.startswith(interrupt_after):
            raise KeyboardInterrupt
    monkeypatch.setattr(np, "savez_compressed", savez)


def test_plant_does_not_write_over_files_it_did_not_write(tmp_path, capsys, monkeypatch):
    # --out's train/pool/clean.npz and plant.json were written over whoever had written them
    _fake_planted_data(monkeypatch)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "pool.npz").write_text("the user's own pool")
    assert main(["plant", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out} holds pool.npz, not written by `spurfast plant`"), err
    assert "--overwrite" in err
    assert (out / "pool.npz").read_text() == "the user's own pool"
    assert main(["plant", "--out", str(out), "--overwrite"]) == 0   # asked for
    assert json.loads((out / "plant.json").read_text())["dataset"] == "digits"
    assert main(["plant", "--out", str(out)]) == 0, capsys.readouterr().err   # its own output: rewritten
    assert main(["plant", "--out", str(tmp_path / "new" / "d")]) == 0   # a new folder
    # a rewrite cut short leaves the earlier output whole: it wrote train.npz and pool.npz in place and
    # left them beside the old clean.npz, which train-classifier and discover took without a word
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _fake_planted_data(monkeypatch, interrupt_after="pool.npz")
    capsys.readouterr()
    assert main(["plant", "--out", str(out), "--seed", "5"]) == 130
    assert "rerun the same command to plant" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before   # no temporary file left either
    _fake_planted_data(monkeypatch)
    assert main(["plant", "--out", str(out), "--seed", "5"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["clean.npz", "plant.json", "pool.npz", "train.npz"]
    assert all((out / n).read_bytes() != before[n] for n in ("train.npz", "pool.npz", "clean.npz"))
    # stopped between the renames: a new train.npz beside the old pool.npz; plant.json said "held
    # what it held before", and the same command was refused as "not written by spurfast plant"
    real, renamed = os.replace, []

    def stopped(src, dst, *a, **k):
        if str(dst).endswith(".npz") and renamed:
            raise KeyboardInterrupt
        real(src, dst, *a, **k)
        renamed.append(dst)

    with monkeypatch.context() as mp:
        mp.setattr(os, "replace", stopped)
        assert main(["plant", "--out", str(out), "--seed", "6"]) == 130
    assert "rerun the same command to plant" in capsys.readouterr().err
    assert "incomplete" in json.loads((out / "plant.json").read_text())
    assert main(["plant", "--out", str(out), "--seed", "6"]) == 0, capsys.readouterr().err
    assert json.loads((out / "plant.json").read_text())["dataset"] == "digits"


@pytest.mark.parametrize("argv", [["plant", "--out", ""], ["discover", "--pool", "", "--classifier", "c.pt",
                                                           "--vae", "v.pt", "--out", "o"]])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(tmp_path, capsys, monkeypatch, argv):
    # --out "" (an unset shell variable) planted into the current folder; --pool "" read it as a pool
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    flag = argv[argv.index("") - 1]
    assert capsys.readouterr().err.startswith(f"error: {flag} is empty; expected a value"), flag
    assert list(tmp_path.iterdir()) == []


def test_plant_removes_what_a_killed_plant_left(tmp_path, capsys, monkeypatch):
    # a plant killed (SIGKILL) mid-write left train.npz.PID.tmp beside its output for good
    _fake_planted_data(monkeypatch)
    out = tmp_path / "d"
    assert main(["plant", "--out", str(out)]) == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = [out / f"train.npz.{dead.pid}.tmp", out / f"plant.json.{dead.pid}.tmp"]
    foreign = out / f"notes.txt.{dead.pid}.tmp"
    for f in left + [foreign]:
        f.write_bytes(b"half an archive")
    assert main(["plant", "--out", str(out), "--seed", "3"]) == 0, capsys.readouterr().err
    assert not any(f.exists() for f in left)
    assert foreign.exists()   # not a file plant writes: not its to remove
    assert sorted(p.name for p in out.iterdir()) == sorted([*PLANT_FILES, foreign.name])


def test_plant_out_that_is_a_file_is_refused_before_the_data_is_made(tmp_path, capsys, monkeypatch):
    # mkdir failed after the data was made, with "[Errno 17] File exists: 'x'" (or "Not a directory")
    import spurfast.pipeline as P

    monkeypatch.setattr(P, "make_planted_data", lambda *a, **k: pytest.fail("the data was made"))
    f = tmp_path / "data"
    f.write_text("a file")
    for out in (f, f / "sub"):
        capsys.readouterr()
        assert main(["plant", "--out", str(out)]) == 2
        assert capsys.readouterr().err.startswith(f"error: --out {out}: {f} is a file, not a folder; expected the "
                                                  f"folder for train.npz")


@pytest.mark.parametrize("cmd", ["plant", "evaluate", "train-vae"])
def test_an_out_below_a_dangling_link_is_named_before_any_work(tmp_path, capsys, monkeypatch, cmd):
    # plant (after the data was made) and evaluate failed as "[Errno 17] File exists: 'x'", train-*
    # as "cannot write in folder x (File exists)": none said that x is a link to nothing
    import spurfast.pipeline as P
    from spurfast.models import train

    monkeypatch.setattr(P, "make_planted_data", lambda *a, **k: pytest.fail("the data was made"))
    monkeypatch.setattr(train, "train_vae", lambda *a, **k: pytest.fail("trained"))
    link = tmp_path / "gone"
    link.symlink_to(tmp_path / "nowhere")
    argv = {"plant": ["plant", "--out", str(link)],
            "evaluate": ["evaluate", "--from-csv", _quick_csv(tmp_path), "--out", str(link / "e")],
            "train-vae": ["train-vae", "--data", _npz(tmp_path / "p.npz", np.zeros((4, 28, 28), np.uint8)),
                          "--out", str(link / "v.pt"), "--quiet"]}[cmd]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{link} is a link to {str(tmp_path / 'nowhere')!r}, which does not exist" in err, err
    assert not (tmp_path / "nowhere").exists()


def test_train_classifier_refuses_class_names_and_num_classes_that_disagree(tmp_path, capsys):
    # discover refuses the pair, so the model trained with it could not be used with its names file
    f = tmp_path / "data.npz"
    np.savez(f, images=np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8), labels=np.arange(8) % 3)
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    base = ["train-classifier", "--data", str(f), "--class-names", str(names), "--epochs", "1", "--quiet"]
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "c5.pt"), "--num-classes", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --class-names {names} names 3 classes, but --num-classes is 5"), err
    assert not list(tmp_path.glob("c5.pt*"))
    assert main(base + ["--out", str(tmp_path / "c3.pt"), "--num-classes", "3"]) == 0, capsys.readouterr().err


def test_npz_class_names_and_num_classes_that_disagree_are_refused(tmp_path, capsys):
    f = tmp_path / "data.npz"
    np.savez(f, images=np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8), labels=np.arange(8) % 3,
             class_names=np.array(["a", "b", "c"]))
    capsys.readouterr()
    assert main(["train-classifier", "--data", str(f), "--out", str(tmp_path / "c.pt"), "--num-classes", "5",
                 "--epochs", "1", "--quiet"]) == 2
    assert capsys.readouterr().err.startswith(f"error: data {f} names 3 classes (its class_names), but --num-classes is 5")
    # a --class-names file of 5 names, which the .npz does not use (it keeps its own), skipped
    # that check: a 5-class model trained, and discover refused it on this data
    names = tmp_path / "names5.txt"
    names.write_text("a\nb\nc\nd\ne\n")
    assert main(["train-classifier", "--data", str(f), "--out", str(tmp_path / "c.pt"), "--num-classes", "5",
                 "--class-names", str(names), "--epochs", "1", "--quiet"]) == 2
    assert capsys.readouterr().err.startswith(f"error: data {f} names 3 classes (its class_names), but --num-classes is 5")
    assert not (tmp_path / "c.pt").exists()
    _models(tmp_path, classes=5)
    assert main(["discover", "--pool", str(f), "--classifier", str(tmp_path / "clf1x28.pt"), "--vae",
                 str(tmp_path / "vae1x28.pt"), "--out", str(tmp_path / "run"), "--num-classes", "5", "--quiet"]) == 2
    assert capsys.readouterr().err.startswith(f"error: pool {f} names 3 classes (its class_names), but --num-classes is 5")
    assert not (tmp_path / "run").exists()


def test_class_folders_and_num_classes_that_disagree_are_refused_at_training_as_at_discover(tmp_path, capsys):
    # the model trained, and discover then refused the folder it was trained on
    from PIL import Image
    for c in ("a", "b"):
        (tmp_path / "pool" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / "pool" / c / f"{i}.png")
    capsys.readouterr()
    assert main(["train-classifier", "--data", str(tmp_path / "pool"), "--size", "8", "--channels", "1",
                 "--num-classes", "3", "--out", str(tmp_path / "c.pt"), "--epochs", "1", "--quiet"]) == 2
    assert capsys.readouterr().err.startswith(f"error: data {tmp_path / 'pool'} has 2 class folders but the "
                                              f"classifier has 3 classes")
    assert not list(tmp_path.glob("c.pt*"))


def test_from_csv_names_an_out_results_md_that_is_not_utf8(tmp_path, capsys):
    # --from-csv keeps the notes of --out/RESULTS.md: one saved as Latin-1 stopped it with the
    # codec's message, naming no file
    import csv as _csv

    src = tmp_path / "src"
    src.mkdir()
    with open(src / "results.csv", "w", newline="") as fh:
        _csv.writer(fh).writerow(["preset", "setting", "seed", "method", "feature", "metric", "value"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "RESULTS.md").write_bytes("notes: caf\xe9\n".encode("latin-1"))
    assert main(["evaluate", "--from-csv", str(src / "results.csv"), "--out", str(out)]) == 2
    assert f"{out / 'RESULTS.md'} is not UTF-8 text" in capsys.readouterr().err


def test_a_long_class_names_file_is_checked_for_repeats_in_linear_time(tmp_path):
    # each name was counted with list.count: 29 s for ImageNet-21k's 21,841 classes on this
    # machine, before any work, and discover reads the file up to three times
    import time

    from spurfast.input_files import load_npz_source, read_class_names

    names = [f"n{i:08d}" for i in range(30_000)]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    np.savez(tmp_path / "p.npz", images=np.zeros((2, 8, 8), np.uint8), labels=np.zeros(2, np.int64),
             class_names=np.array(names))
    t0 = time.perf_counter()
    assert read_class_names(tmp_path / "names.txt") == names
    assert load_npz_source(tmp_path / "p.npz")[0].class_names == names
    assert time.perf_counter() - t0 < 5.0
    (tmp_path / "names.txt").write_text("\n".join(names + ["n00000007", "n00000003"]) + "\n")
    with pytest.raises(ValueError, match=r"names 'n00000003' more than once \(2 duplicate name\(s\)\)"):
        read_class_names(tmp_path / "names.txt")


def test_a_zip_of_images_given_as_the_pool_names_a_few_of_its_files(tmp_path, capsys):
    # any zip reads as an .npz of one key per file: the error listed every key (51 KB for
    # 3,000 images) and did not say what was expected
    import zipfile

    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as z:
        for i in range(3000):
            z.writestr(f"img_{i:05d}.jpg", b"x")
    code = main(["discover", "--pool", str(tmp_path / "imgs.zip"), "--classifier", "c.pt", "--vae", "v.pt",
                 "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "imgs.zip has no 'images' array" in err, err[:500]
    assert "'img_00009.jpg'" in err and "img_00010.jpg" not in err and "and 2990 more" in err, err[:500]
    assert "expected an .npz archive" in err and len(err) < 1000, err[:500]


def test_a_missing_pool_is_not_said_to_hold_arrays(tmp_path, capsys, caplog):
    # --loader-backend with a pool path that is no folder warned "pool ... holds arrays" first,
    # then failed on the pool not existing
    with caplog.at_level("WARNING", logger="spurfast.cli"):
        code = main(["discover", "--pool", str(tmp_path / "nope.npz"), "--classifier", "c.pt", "--vae", "v.pt",
                     "--out", str(tmp_path / "o"), "--quiet", "--loader-backend", "torch"])
    assert code == 2 and "nope.npz does not exist" in capsys.readouterr().err
    assert "has no effect" not in caplog.text, caplog.text


def test_the_loader_backend_of_an_unlabelled_clean_folder_is_checked_up_front(tmp_path, capsys, caplog, monkeypatch):
    # an .npz pool with a flat --clean folder: confirmation predicts the folder through the loader,
    # but its backend went unchecked (a bad SPURFAST_BACKEND_LOADER failed at confirmation, after
    # the embedding pass and discovery) and --loader-backend was said to have no effect
    from PIL import Image
    clf, vae = _models(tmp_path)
    pool = _npz(tmp_path / "pool.npz", np.random.default_rng(0).integers(0, 256, (40, 1, 28, 28), dtype=np.uint8))
    (tmp_path / "flat").mkdir()
    for i in range(4):
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(tmp_path / "flat" / f"{i}.png")
    args = ["discover", "--pool", pool, "--classifier", clf, "--vae", vae, "--clean", str(tmp_path / "flat"),
            "--size", "28", "--channels", "1", "--quiet"]
    monkeypatch.setenv("SPURFAST_BACKEND_LOADER", "bogus")
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: SPURFAST_BACKEND_LOADER=bogus: backend 'bogus' does not implement 'loader'"), err
    assert not (tmp_path / "o").exists()
    monkeypatch.delenv("SPURFAST_BACKEND_LOADER")
    import spurfast.pipeline
    monkeypatch.setattr(spurfast.pipeline, "run_discovery", lambda *a, **k: (None, None, None))
    with caplog.at_level("WARNING", logger="spurfast.cli"):
        assert main([*args, "--out", str(tmp_path / "o2"), "--loader-backend", "torch"]) == 0
    assert "has no effect" not in caplog.text, caplog.text
    # a labelled clean folder is read image by image, not through the loader: its backend is not asked for
    for c in ("0", "1"):
        (tmp_path / "labelled" / c).mkdir(parents=True)
        Image.fromarray(np.full((28, 28), 99, np.uint8)).save(tmp_path / "labelled" / c / "a.png")
    monkeypatch.setenv("SPURFAST_BACKEND_LOADER", "bogus")
    labelled = [a if a != str(tmp_path / "flat") else str(tmp_path / "labelled") for a in args]
    assert main([*labelled, "--out", str(tmp_path / "o3")]) == 0


@pytest.mark.parametrize("manifest,says", [
    ('{"n": 3, "done": 3, "columns": {}, "bad_files": [1, 2]}', "its bad_files is a JSON list"),
    ('{"n": 3, "done": 3, "columns": {}, "bad_files": {"x": "unreadable"}}', "is not as spurfast wrote it"),
    ('{"n": 3, "columns": {}}', "is not as spurfast wrote it (KeyError: 'done')")])   # was a traceback
def test_report_on_a_readable_manifest_with_a_bad_bad_files_does_not_call_it_unreadable_json(tmp_path, capsys,
                                                                                           manifest, says):
    # every ValueError from the store's record was "manifest.json is not readable JSON", which it is
    run = tmp_path / "run"
    (run / "store").mkdir(parents=True)
    (run / "findings.json").write_text(json.dumps({"schema": 1, "findings": []}))
    (run / "store" / "manifest.json").write_text(manifest)
    (run / "store" / "bad_files.jsonl").write_text('{"done": 1, "bad": {"0": "unreadable"}}\n')
    capsys.readouterr()
    assert main(["report", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "not readable JSON" not in err and says in err and str(run / "store" / "manifest.json") in err, err


def test_demo_overwrite_help_says_a_discovery_only_change_keeps_the_models(capsys):
    # run_demo keeps the trained models and store of a run that differs only in discovery
    # settings; the help promised only a replacement (a user would expect to retrain)
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    help_ = text.split("--overwrite ")[-1].split(" --quiet")[0]
    assert "keeping its trained models and embedding store" in help_ and "discovery settings" in help_, help_


def test_loader_backend_with_an_npz_pool_and_a_labelled_clean_folder_still_says_it_has_no_effect(tmp_path, caplog,
                                                                                                 monkeypatch):
    # any --clean folder silenced the warning, but a labelled one is read image by image: no loader
    # decodes anything in this run, and --loader-backend torch was taken without a word
    from PIL import Image
    clf, vae = _models(tmp_path)
    pool = _npz(tmp_path / "pool.npz", np.random.default_rng(0).integers(0, 256, (40, 1, 28, 28), dtype=np.uint8))
    for c in ("0", "1"):
        (tmp_path / "labelled" / c).mkdir(parents=True)
        Image.fromarray(np.full((28, 28), 99, np.uint8)).save(tmp_path / "labelled" / c / "a.png")
    import spurfast.pipeline
    monkeypatch.setattr(spurfast.pipeline, "run_discovery", lambda *a, **k: (None, None, None))
    with caplog.at_level("WARNING", logger="spurfast.cli"):
        assert main(["discover", "--pool", pool, "--classifier", clf, "--vae", vae, "--clean",
                     str(tmp_path / "labelled"), "--size", "28", "--channels", "1", "--quiet", "--out",
                     str(tmp_path / "o"), "--loader-backend", "torch"]) == 0
    assert "--loader-backend torch has no effect" in caplog.text, caplog.text


def test_every_option_of_every_command_says_what_it_does():
    """--min-cluster-size showed in --help with no word of what it does (it lowers k: clusters
    of fewer members still appear)."""
    import argparse

    from spurfast.cli import build_parser

    silent = []
    for sub in build_parser()._subparsers._group_actions:
        for name, parser in sub.choices.items():
            for action in parser._actions:
                if action.option_strings and not action.help and not isinstance(action, argparse._HelpAction):
                    silent.append(f"{name} {action.option_strings[0]}")
    assert not silent, silent


def test_clean_with_no_confirm_says_it_has_no_effect(tmp_path, caplog, monkeypatch):
    # --clean went without a word under --no-confirm, even a path to nothing
    clf, vae = _models(tmp_path)
    pool = _npz(tmp_path / "pool.npz", np.random.default_rng(0).integers(0, 256, (40, 1, 28, 28), dtype=np.uint8))
    import spurfast.pipeline
    monkeypatch.setattr(spurfast.pipeline, "run_discovery", lambda *a, **k: (None, None, None))
    with caplog.at_level("WARNING", logger="spurfast.cli"):
        assert main(["discover", "--pool", pool, "--classifier", clf, "--vae", vae, "--no-confirm", "--clean",
                     str(tmp_path / "nowhere.npz"), "--quiet", "--out", str(tmp_path / "o")]) == 0
    assert f"--clean {tmp_path / 'nowhere.npz'} has no effect: --no-confirm" in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="spurfast.cli"):   # the residual scan's limit without the scan: silent
        assert main(["discover", "--pool", pool, "--classifier", clf, "--vae", vae, "--residual-max-values", "7",
                     "--residual-null", "900", "--residual-fdr", "0.1", "--quiet", "--out", str(tmp_path / "o")]) == 0
    assert "--residual-max-values 7 has no effect without --residual-scan" in caplog.text, caplog.text
    assert "--residual-null 900 has no effect without --residual-scan" in caplog.text, caplog.text
    assert "--residual-fdr 0.1 has no effect without --residual-scan" in caplog.text, caplog.text



def test_size_and_channels_given_for_npz_inputs_alone_say_they_have_no_effect(tmp_path, caplog, monkeypatch):
    # an .npz keeps the shape it was written at: --size 32 --channels 3 went unused without a word
    clf, vae = _models(tmp_path)
    pool = _npz(tmp_path / "pool.npz", np.random.default_rng(0).integers(0, 256, (40, 1, 28, 28), dtype=np.uint8))
    import spurfast.models.train
    import spurfast.pipeline
    monkeypatch.setattr(spurfast.pipeline, "run_discovery", lambda *a, **k: (None, None, None))
    base = ["--classifier", clf, "--vae", vae, "--quiet", "--out", str(tmp_path / "o")]
    with caplog.at_level("WARNING", logger="spurfast.cli"):
        assert main(["discover", "--pool", pool, "--size", "32", "--channels", "3", *base]) == 0
    assert f"--size 32 and --channels 3 have no effect: {pool} holds arrays" in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="spurfast.cli"):
        assert main(["discover", "--pool", pool, "--clean", pool, "--channels", "1", *base]) == 0
    assert f"--channels 1 has no effect: {pool} and {pool} hold arrays" in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="spurfast.cli"):   # not given: silent
        assert main(["discover", "--pool", pool, *base]) == 0
    assert "has no effect" not in caplog.text, caplog.text
    trained = []
    monkeypatch.setattr(spurfast.models.train, "train_vae", lambda src, *a, **k: trained.append(src) or 1 / 0)
    with caplog.at_level("WARNING", logger="spurfast.cli"), pytest.raises(ZeroDivisionError):
        main(["train-vae", "--data", pool, "--size", "16", "--out", str(tmp_path / "v2.pt"), "--quiet"])
    assert f"--size 16 has no effect: {pool} holds arrays" in caplog.text, caplog.text
    assert tuple(trained[0].image_shape) == (1, 28, 28)
    caplog.clear()
    with caplog.at_level("WARNING", logger="spurfast.cli"):   # a mistyped folder: its own error, no such word
        assert main(["train-vae", "--data", str(tmp_path / "my_images"), "--size", "16", "--out",
                     str(tmp_path / "v3.pt"), "--quiet"]) == 2
    assert "has no effect" not in caplog.text, caplog.text


def test_feature_view_without_confirmation_is_refused_before_any_work(tmp_path, capsys):
    clf, vae = _models(tmp_path)
    pool = _npz(tmp_path / "pool.npz", np.random.default_rng(0).integers(0, 256, (40, 1, 28, 28), dtype=np.uint8))
    assert main(["discover", "--pool", pool, "--classifier", clf, "--vae", vae, "--quiet", "--feature-view",
                 "--no-confirm", "--out", str(tmp_path / "o")]) == 2
    assert "feature_view needs confirmation" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_n_null_alone_raises_max_null_and_the_residual_limit_has_a_flag(tmp_path, monkeypatch):
    # --n-null 200 alone was refused ("max_null must be >= n_null=200, got 120", naming no flag), and the
    # residual scan's refusal said "raise max_values", a setting no flag reached
    clf, vae = _models(tmp_path)
    pool = _npz(tmp_path / "pool.npz", np.random.default_rng(0).integers(0, 256, (40, 1, 28, 28), dtype=np.uint8))
    import spurfast.pipeline
    seen = {}
    monkeypatch.setattr(spurfast.pipeline, "run_discovery",
                        lambda *a, **k: seen.update(k) or (None, None, None))
    base = ["discover", "--pool", pool, "--classifier", clf, "--vae", vae, "--quiet", "--out", str(tmp_path / "o")]
    assert main(base + ["--n-null", "200", "--residual-scan", "--residual-max-values", "5000000"]) == 0
    assert (seen["config"].n_null, seen["config"].max_null) == (200, 200)
    assert seen["residual"].max_values == 5_000_000 and seen["residual"].n_null == 400
    assert main(base + ["--residual-scan", "--residual-null", "900"]) == 0   # 30 classes at q = 0.05 need ~600
    assert seen["residual"].n_null == 900
    assert main(base + ["--n-null", "10", "--max-null", "40"]) == 0
    assert (seen["config"].n_null, seen["config"].max_null, seen["residual"]) == (10, 40, None)
    assert main(base) == 0
    assert seen["config"].max_null == 120 and seen["feature_view"] is False
    assert main(base + ["--feature-view"]) == 0
    assert seen["feature_view"] is True
    from spurfast.residual import check_size
    with pytest.raises(ValueError, match="--residual-max-values"):
        check_size(100, 784, 1000)


def test_a_suspect_file_repeating_an_index_is_refused_and_a_mask_named(tmp_path):
    # a 0/1 mask saved one value a line (np.savetxt of the pool's suspect array) read as the
    # indices {0, 1}: two suspects in place of the pool's 1,000, without a word
    from spurfast.input_files import load_suspect

    f = tmp_path / "suspect.txt"
    np.savetxt(f, (np.arange(10) % 3 == 0).astype(int), fmt="%d")
    with pytest.raises(ValueError, match=rf"^suspect file {f} lists pool index 0 6 times \(2 index\(es\) repeated in "
                                         r"all\); .*once, one per line \(a 0/1 mask, one value per image\? list "
                                         r"the pool indices of its 1s instead\)$"):
        load_suspect(f, 10, "pool")
    f.write_text("4\n7\n4\n")
    with pytest.raises(ValueError, match=r"lists pool index 4 2 times \(1 index\(es\) repeated in all\); it lists "
                                         r"each suspect sample's pool index once, one per line$"):
        load_suspect(f, 10, "pool")
    f.write_text("4\n7\n0\n")
    assert np.flatnonzero(load_suspect(f, 10, "pool")).tolist() == [0, 4, 7]


def test_ctrl_c_in_an_evaluation_names_what_it_keeps(tmp_path, capsys, monkeypatch):
    # it listed discovery's neighbours and null, which an evaluation's discovery does not keep
    import spurfast.evaluate as E
    monkeypatch.setattr(E, "run_one", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    capsys.readouterr()
    assert main(["evaluate", "--preset", "tiny", "--out", str(tmp_path / "o"), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted: finished work is kept (trained models and training checkpoints, embedding "
                          "stores, finished runs); the same `spurfast evaluate` command resumes"), err
    assert "neighbours" not in err


def test_a_run_left_on_the_cpu_on_a_gpu_machine_says_so(tmp_path, monkeypatch, caplog):
    # --device defaults to cpu: on a GPU machine the README's commands ran some 20x slower without a word
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    argv = ["train-classifier", "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "c.pt")]
    for extra, noted in (([], True), (["--device", "cpu"], False), (["--device=cpu"], False)):
        caplog.clear()
        assert main(argv + extra) == 2   # the missing data is refused after the note
        assert ("torch sees 2 CUDA device(s): --device cuda runs on the GPU" in caplog.text) is noted, (extra, caplog.text)


def test_commands_other_than_discover_are_refused_under_several_ranks(tmp_path, monkeypatch, capsys):
    # under torchrun every rank ran make-pool into one folder at once, each calling the other's
    # images leftovers of an interrupted run
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["make-pool", "--out", str(tmp_path / "p"), "--n", "10"]) == 2
    err = capsys.readouterr().err
    assert "only `spurfast discover` runs across ranks (WORLD_SIZE=2)" in err, err
    assert not (tmp_path / "p").exists()
    assert main(["env"]) == 0


def test_several_ranks_without_torchruns_variables_are_an_error_not_a_traceback(tmp_path, monkeypatch, capsys):
    # WORLD_SIZE without RANK (a launch without torchrun) raised RuntimeError in dist.init: a traceback
    # and exit 1, where every other bad input gives "error: ..." and exit 2
    clf, vae = _models(tmp_path)
    pool = _npz(tmp_path / "pool.npz", np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    capsys.readouterr()
    code = main(["discover", "--pool", pool, "--classifier", clf, "--vae", vae, "--out", str(tmp_path / "o"),
                 "--quiet", "--no-confirm"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith("error: WORLD_SIZE=2 but RANK is not set: launch with torchrun"), err
