"""End to end on scikit-learn's digits (offline, under a minute): plant a 3x3 patch in
class 3, train, discover; the planted class must be the top finding and its members
enriched for pattern-bearing pool images."""
import io
import json
import os
import sys
from html import escape

import numpy as np
import pytest
import torch

from spurfast.confirm import VERDICTS
from spurfast.demo import run_demo
from spurfast.discover import DiscoverConfig


def _digits_demo(out):
    return run_demo(out, dataset="digits", seed=0, target_class=3, family="patch3", n_poisoned="all",
                    pool_fraction=0.15, classifier_epochs=8, vae_epochs=15, progress=False,
                    # max_null: a strong shortcut on a pool this small can sit at the permutation
                    # resolution limit (p >= 1 / (1 + null clusters of its size)); on some CPUs the
                    # trained models left it at q = 0.10 with 120 permutations, on others below 0.05
                    config=DiscoverConfig(n_null=20, max_null=480, seed=0))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_run")
    return out, _digits_demo(out)


def test_planted_class_is_top_finding(digits_run):
    out, summary = digits_run
    doc = json.loads((out / "findings.json").read_text())
    assert doc["schema"] == 1 and doc["config"]["plant"]["target_class"] == 3
    assert doc["findings"], "no significant finding"
    top = doc["findings"][0]
    assert top["class"] == 3 and top["rank"] == 1
    carries = np.load(out / "ground_truth_carries.npy")
    members = np.asarray(top["members"])
    base = carries.mean()
    assert carries[members].mean() > 3 * base, (carries[members].mean(), base)
    assert summary["AUROC (ranking)"] > 0.8
    assert top["ranked_by"] == summary["ranked by"] == "pattern"   # a corner patch: localised
    # every poisoned training image of class 3 carries the patch: its suspects support it
    sp = top["support"]
    assert sp["supported"] and sp["class_above"] > sp["n_class"] / 2, sp


def test_outputs_are_complete(digits_run):
    out, _ = digits_run
    doc = json.loads((out / "findings.json").read_text())
    assert set(doc["pool"]) >= {"n", "n_unrelated", "n_suspect"}
    f = doc["findings"][0]
    for key in ("rank", "class", "class_name", "cluster", "size", "score", "p_value", "q_value", "members",
                "exemplars", "confirm", "images"):
        assert key in f, key
    assert 0 < f["p_value"] <= f["q_value"] <= 1
    assert [g["rank"] for g in doc["findings"]] == list(range(1, len(doc["findings"]) + 1))
    for k in ("centroid", "contrast", "mask", "grid"):
        assert (out / f["images"][k]).is_file()
    html = (out / "report.html").read_text()
    assert "finding1_centroid.png" in html and "<script" not in html
    # the report says why each finding is (not) confirmed, as findings.json and .csv do
    verdicts = [g["confirm"]["verdict"] for g in doc["findings"] if g["confirm"]]
    # as the report writes them: escaped ('weak' says "the run's")
    assert verdicts and all(v in VERDICTS and escape(VERDICTS[v]) in html for v in verdicts)
    assert "confirm_verdict" in (out / "findings.csv").read_text().splitlines()[0]
    assert (out / "findings.csv").read_text().splitlines()[0].endswith("support_p_value,support_q_value,supported,"
                                                                      "family")
    assert "Training support:" in html
    assert (out / "findings.csv").read_text().count("\n") == len(doc["findings"]) + 1


def test_a_rerun_reads_each_finding_s_kept_confirmation(digits_run, monkeypatch):
    """The run keeps every finding's confirmation in RUN/discovery-work/confirm; rerunning it
    reads them back (no classifier pass) into the same verdicts."""
    import spurfast.confirm
    out, _ = digits_run
    doc = json.loads((out / "findings.json").read_text())
    assert len(list((out / "discovery-work" / "confirm").glob("*.json"))) == len(doc["findings"])
    monkeypatch.setattr(spurfast.confirm, "confirm_pattern", lambda *a, **k: pytest.fail("confirmed again"))
    _digits_demo(out)
    again = json.loads((out / "findings.json").read_text())
    assert [f["confirm"] for f in again["findings"]] == [f["confirm"] for f in doc["findings"]]
    assert [f["members"] for f in again["findings"]] == [f["members"] for f in doc["findings"]]


def test_demo_without_a_planted_pattern_writes_valid_json(tmp_path, monkeypatch):
    """Nothing planted, nothing carries a pattern: the AUROCs are undefined (null in
    summary.json, which must stay strict JSON) and no finding is 'the planted class'.
    Its folder's name is not UTF-8: the closing 'report: PATH' line raised
    UnicodeEncodeError on a strict stdout after the whole run (the API; the CLI escapes)."""
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    tmp_path = tmp_path / os.fsdecode(b"demo-\xff")
    summary = run_demo(tmp_path, dataset="digits", seed=0, n_poisoned="0", pool_fraction=0.0, classifier_epochs=1,
                       vae_epochs=1, progress=False, config=DiscoverConfig(n_null=3, fdr=0.9, seed=0), confirm=False)
    text = (tmp_path / "summary.json").read_text()
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    assert summary["findings"] > 0, "the test needs a finding (fdr 0.9)"
    assert saved["top finding is planted class"] is None and saved["AUROC (ranking)"] is None
    assert saved["planted"].startswith("nothing")
    assert saved["pattern IoU"] is None     # no planted mask to compare with
    stdout.flush()
    assert b"report: " + os.fsencode(str(tmp_path)).replace(b"\xff", b"\\xff") in stdout.buffer.getvalue()
    # the console line as the report: it printed "AUROC (ranking): nan" and "pattern IoU: None"
    printed = stdout.buffer.getvalue().decode()
    assert "AUROC (ranking): n/a" in printed and "pattern IoU: n/a" in printed and ": nan" not in printed
    report = (tmp_path / "report.html").read_text()
    for key in ("AUROC (ranking)", "pattern IoU"):   # the summary table said nan
        assert f"<th>{key}</th><td>n/a</td>" in report, f"{key} is not n/a in the report"


def test_overwrite_with_other_discovery_settings_keeps_the_models_and_store(tmp_path):
    """`demo --overwrite` of a run that differed only in its discovery settings (--fdr)
    deleted everything and trained both models and embedded the pool again, where
    `discover --overwrite` keeps a store of the same pool and models (README)."""
    kw = dict(dataset="digits", seed=0, n_poisoned="0", pool_fraction=0.0, classifier_epochs=1, vae_epochs=1,
              progress=False, confirm=False)
    run_demo(tmp_path, config=DiscoverConfig(n_null=3, fdr=0.9, seed=0), **kw)
    _assert_not_held(tmp_path)   # the demo kept its lock for the process's life: another process was refused
    kept = ("classifier.ckpt", "vae.ckpt", "store/manifest.json")
    before = {n: (tmp_path / n).stat() for n in kept}
    with pytest.raises(FileExistsError, match="already holds run"):   # still refused without --overwrite
        run_demo(tmp_path, config=DiscoverConfig(n_null=3, fdr=0.5, seed=0), **kw)
    run_demo(tmp_path, config=DiscoverConfig(n_null=3, fdr=0.5, seed=0), overwrite=True, **kw)
    doc = json.loads((tmp_path / "findings.json").read_text())
    assert doc["config"]["discover"]["fdr"] == 0.5
    for n in kept:   # not deleted and made again
        after = (tmp_path / n).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before[n].st_ino, before[n].st_mtime_ns), n
    # other training settings: everything is replaced, as before
    run_demo(tmp_path, config=DiscoverConfig(n_null=3, fdr=0.5, seed=0), overwrite=True, **dict(kw, vae_epochs=2))
    assert (tmp_path / "vae.ckpt").stat().st_mtime_ns != before["vae.ckpt"].st_mtime_ns
    import spurfast.demo

    def stopped(*a, **k):
        raise KeyboardInterrupt

    # refused before overwrite deletes anything: a float64 default dtype (training's own check
    # came after), and a folder another process holds (its run.json was rewritten first)
    import fcntl
    before = sorted(p.name for p in tmp_path.iterdir())
    run_json = (tmp_path / "run.json").read_text()
    torch.set_default_dtype(torch.float64)
    try:
        with pytest.raises(TypeError, match="run_demo: torch's default dtype is torch.float64"):
            run_demo(tmp_path, config=DiscoverConfig(n_null=3, fdr=0.5, seed=0), overwrite=True, **dict(kw, vae_epochs=3))
    finally:
        torch.set_default_dtype(torch.float32)
    other = os.open(tmp_path, os.O_RDONLY)   # as another process holding the folder
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(FileExistsError, match="in use by another spurfast process"):
            run_demo(tmp_path, config=DiscoverConfig(n_null=3, fdr=0.4, seed=0), overwrite=True, **kw)
    finally:
        os.close(other)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (tmp_path / "run.json").read_text() == run_json
    with pytest.MonkeyPatch.context() as mp:   # stopped mid-run: released too
        mp.setattr(spurfast.demo, "train_vae", stopped)
        with pytest.raises(KeyboardInterrupt):
            run_demo(tmp_path, config=DiscoverConfig(n_null=3, fdr=0.5, seed=0), overwrite=True, **dict(kw, vae_epochs=3))
    _assert_not_held(tmp_path)


def _assert_not_held(folder):
    import fcntl

    from spurfast import run_folder
    assert not run_folder.holds_output(folder)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # as another process would take it
    finally:
        os.close(fd)


def test_a_device_that_contradicts_the_config_is_refused_up_front(tmp_path):
    """run_demo(device=...) trained on that device while discovery ran on config.device (the
    CLI passes both alike; an API caller who gave one got a classifier on one device fed
    tensors on the other)."""
    with pytest.raises(ValueError, match="device 'cuda' and config.device 'cpu' disagree"):
        run_demo(tmp_path, dataset="digits", config=DiscoverConfig(device="cpu"), device="cuda", progress=False)
    assert not any(tmp_path.iterdir())


def test_same_device_names():
    from spurfast.demo import same_device

    assert same_device("cuda", "cuda:0") and same_device("cpu", "cpu:0") and same_device("cuda:1", "cuda:1")
    assert not same_device("cuda:1", "cuda:0") and not same_device("cpu", "cuda")


def test_a_demo_given_neither_device_nor_config_trains_on_the_cpu(tmp_path, monkeypatch):
    """run_demo(out) with the defaults (no device, no config) made its config on the CPU but
    passed device None on to training: torch.device(None) raised TypeError."""
    import spurfast.demo as D

    seen = []

    def stop(*a, device=None, **k):
        seen.append(device)
        raise KeyboardInterrupt

    monkeypatch.setattr(D, "train_classifier", stop)
    with pytest.raises(KeyboardInterrupt):
        run_demo(tmp_path, dataset="digits", n_poisoned="0", pool_fraction=0.0, progress=False)
    assert seen == ["cpu"]
    assert json.loads((tmp_path / "demo.json").read_text())["models"]   # the marker hashes device "cpu"


def test_a_confirmed_demo_is_not_resumed_unconfirmed(tmp_path):
    """run_demo(confirm=False) into a folder holding the same demo, confirmed, resumed it
    (the run id left out ``confirm``) and silently rewrote its findings with no confirmation."""
    # fdr 0.1: fewer findings to confirm than 0.9 gave (half the test's time), one confirmed still
    kw = dict(dataset="digits", seed=0, n_poisoned="0", pool_fraction=0.0, classifier_epochs=1, vae_epochs=1,
              progress=False, config=DiscoverConfig(n_null=3, fdr=0.1, seed=0))
    run_demo(tmp_path, **kw)
    doc = json.loads((tmp_path / "findings.json").read_text())
    assert any(f["confirm"] for f in doc["findings"]), "the test needs a confirmed finding"
    ckpt = (tmp_path / "classifier.ckpt").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="already holds run"):
        run_demo(tmp_path, confirm=False, **kw)
    assert json.loads((tmp_path / "findings.json").read_text()) == doc
    run_demo(tmp_path, confirm=False, overwrite=True, **kw)   # another run of the same models: they are kept
    assert not any(f["confirm"] for f in json.loads((tmp_path / "findings.json").read_text())["findings"])
    assert (tmp_path / "classifier.ckpt").stat().st_mtime_ns == ckpt


@pytest.mark.parametrize("kw, match", [(dict(config=DiscoverConfig(backend="cupy", device="cpu")), "cupy"),
                                       (dict(latent_dim=0), "latent_dim"), (dict(latent_dim=5000), "latent_dim"),
                                       (dict(device="meta"), "device 'meta': torch cannot compute there"),
                                       (dict(env="SPURFAST_BACKEND_LATENT_KNN"), "nosuch"),
                                       # the CLI's seed rule: 2**62 failed in training ("Overflow")
                                       (dict(seed=2 ** 62), "seed 4611686018427387904 is too large"),
                                       (dict(seed=-1), "-1")])
def test_a_demo_that_discovery_or_the_vae_would_refuse_is_refused_before_training(tmp_path, monkeypatch, kw, match):
    """run_demo with a k-means backend that cannot run here (cupy on a CPU), a latent_dim
    the VAE refuses or a device torch cannot compute on (a GPU that is not there) trained the
    classifier first, or failed in it, and with overwrite had deleted the old run, before
    run_discovery, VAEConfig or training refused it."""
    import spurfast.demo as D
    from spurfast import backends

    if "env" in kw:   # a backend that discovery's neighbour search would refuse
        monkeypatch.setenv(kw.pop("env"), "nosuch")
    if "config" in kw and next(p for p in backends.providers("kmeans_assign") if p.name == "cupy").available()[0]:
        pytest.skip("cupy can run here")
    monkeypatch.setattr(D, "train_classifier", lambda *a, **k: pytest.fail("trained before refusing"))
    old = tmp_path / "run"
    old.mkdir()
    (old / "run.json").write_text(json.dumps({"run_id": "demo-older"}))
    (old / "findings.json").write_text("{}")
    with pytest.raises(Exception, match=match):
        run_demo(old, dataset="digits", n_poisoned="0", pool_fraction=0.0, progress=False, overwrite=True, **kw)
    assert sorted(p.name for p in old.iterdir()) == ["findings.json", "run.json"]   # the old run is kept


@pytest.mark.parametrize("kw", [dict(classifier_epochs=0), dict(vae_epochs=2.5)])
def test_bad_epochs_are_refused_before_an_old_run_is_replaced(tmp_path, kw):
    """run_demo (the API; the CLI checks its own flags) ran a whole demo on an untrained
    classifier for classifier_epochs=0 and reported it, and with vae_epochs=2.5 failed at
    training, with overwrite after the previous run had been deleted."""
    (tmp_path / "run.json").write_text('{"run_id": "demo-older"}')
    (tmp_path / "findings.json").write_text("{}")
    name = next(iter(kw))
    with pytest.raises(ValueError, match=f"run_demo: {name} must be an integer >= 1, got {kw[name]}"):
        run_demo(tmp_path, dataset="digits", progress=False, overwrite=True, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["findings.json", "run.json"]


def test_spurious_score_and_flip_rate_run_without_autograd():
    """Both only read the model's outputs: no graph kept (a decorator moved off them once)."""
    from spurfast.data import ArraySource
    from spurfast.demo import flip_to_target_rate, spurious_score
    from spurfast.plant import PatternSpec

    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            seen.append(torch.is_grad_enabled())
            return torch.stack([x.flatten(1).mean(1) * self.w[0], x.flatten(1).mean(1)], 1)

    clean = ArraySource(torch.rand(8, 1, 28, 28), np.arange(8) % 2)
    spurious_score(Probe(), clean, 1, PatternSpec("patch3"))
    flip_to_target_rate(Probe(), clean, 1, PatternSpec("patch3"))
    assert seen and not any(seen), seen


def test_a_demo_config_without_a_device_runs_on_the_cpu(tmp_path, monkeypatch):
    """DiscoverConfig(device=None), which run_discovery reads as the CPU, failed in run_demo with
    torch.device(None)'s TypeError, which named no input."""
    import spurfast.demo as D

    def reached(*a, device=None, **k):
        raise RuntimeError(f"reached training on {device}")

    monkeypatch.setattr(D, "train_classifier", reached)
    for kw in ({}, {"device": "cpu"}):
        with pytest.raises(RuntimeError, match="reached training on cpu"):
            run_demo(tmp_path / "run", dataset="digits", n_poisoned="0", pool_fraction=0.0, progress=False,
                     config=DiscoverConfig(device=None), **kw)
    # a device given beside it is the one both use (not "cpu", then "they disagree")
    with pytest.raises(ValueError, match="device 'meta': torch cannot compute there"):
        run_demo(tmp_path / "run", dataset="digits", n_poisoned="0", pool_fraction=0.0, progress=False,
                 config=DiscoverConfig(device=None), device="meta")
