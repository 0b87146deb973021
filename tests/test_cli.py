"""CLI: every subcommand has --help; bad input fails early with a clear message."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from spurfast.cli import _verdict_counts, build_parser, main
from spurfast.discover import DiscoverConfig
from spurfast.pipeline import prepare_output

SUBCOMMANDS = ["demo", "plant", "train-classifier", "train-vae", "discover", "report", "env"]


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: spurfast" in capsys.readouterr().out


def test_console_script_env():
    out = subprocess.run([sys.executable, "-m", "spurfast", "env"], capture_output=True, text=True, timeout=120)
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
    assert main(args[:-1] + ["--num-classes", "7"]) == 2  # width mismatch named before any work
    assert "expected (1, 7)" in capsys.readouterr().err
    assert main(["report", "--run", str(d / "run")]) == 0


def test_discover_flags_reach_the_config():
    from spurfast.cli import _discover_config

    args = build_parser().parse_args(["discover", "--pool", "p", "--classifier", "c", "--vae", "v", "--out", "o",
                                      "--max-k", "7", "--max-mean-cluster-size", "40", "--k", "3",
                                      "--statistic", "surprise"])
    cfg = _discover_config(args)
    assert (cfg.max_k, cfg.max_mean_cluster_size, cfg.k, cfg.statistic) == (7, 40, 3, "surprise")
    default = _discover_config(build_parser().parse_args(["discover", "--pool", "p", "--classifier", "c", "--vae", "v",
                                                          "--out", "o"]))
    assert (default.max_k, default.statistic) == (256, "share")


def test_cli_statistics_are_the_scoring_ones():
    from spurfast.cli import STATISTICS
    from spurfast.scoring import STATISTICS as scoring_statistics

    assert STATISTICS == scoring_statistics


def test_verdict_counts_line():
    fs = [{"confirm": {"verdict": "class_content"}}, {"confirm": {"verdict": "confirmed"}},
          {"confirm": {"verdict": "class_content"}}, {"confirm": None}]
    assert _verdict_counts(fs) == " (1 confirmed, 2 class_content)"
    assert _verdict_counts([{"confirm": None}]) == "" and _verdict_counts([]) == ""
