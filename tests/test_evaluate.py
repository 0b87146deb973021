"""The evaluation suite end to end: a tiny sweep on scikit-learn's digits (under a minute),
its cache, RESULTS.md regeneration and bad input; the quick preset is marked slow."""
import csv
import os
import time
from pathlib import Path

import numpy as np
import pytest

from spurfast.cli import main
from spurfast.evaluate import DEFAULT_METHODS, PRESETS, confirmed, run_evaluation


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_tiny")
    t = time.time()
    run_evaluation("tiny", out, progress=False)
    return out, time.time() - t


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_tiny_sweep_writes_long_csv(tiny):
    out, _ = tiny
    rows = _rows(out / "results.csv")
    assert set(rows[0]) == {"preset", "setting", "seed", "method", "feature", "metric", "value"}
    assert {r["setting"] for r in rows} == {s.name for s in PRESETS["tiny"]["settings"]}
    assert {r["method"] for r in rows} == set(DEFAULT_METHODS) | {"model"}
    planted = [r for r in rows if r["setting"] == "patch3-nall"]
    for m in ("spurfast", "pixels", "george", "george+pattern", "activation_clustering",
              "activation_clustering+pattern", "random"):
        got = {r["metric"] for r in planted if r["method"] == m}
        assert {"hit@1", "auroc", "ap", "precision@10", "precision@25", "mask_iou", "ap_in_class"} <= got, (m, got)
    for m in ("spurfast", "spurfast+support", "pixels"):
        got = {r["metric"] for r in planted if r["method"] == m}
        assert {"recall@q0.05", "recall@q0.1", "false_findings@q0.05", "false_findings@q0.1"} <= got
    # metric values are in range
    for r in rows:
        v = float(r["value"])
        if r["metric"] in ("hit@1", "auroc", "ap", "precision@10", "precision@25", "recall@q0.05"):
            assert 0 <= v <= 1, r
    ss = {r["setting"]: float(r["value"]) for r in rows if r["metric"] == "spurious_score"}
    assert ss["patch3-nall"] > ss["clean-model"]          # the planted model learned the patch, the clean one did not
    clean = [r for r in rows if r["setting"] == "clean-model"]
    assert not any(r["metric"] in ("ap", "hit@1") for r in clean)   # nothing learned: only false findings count
    assert any(r["metric"] == "false_findings@q0.05" for r in clean)


def test_tiny_sweep_finds_the_patch(tiny):
    out, _ = tiny
    rows = _rows(out / "results.csv")
    get = lambda m, k: float(next(r["value"] for r in rows if r["setting"] == "patch3-nall"  # noqa: E731
                                  and r["method"] == m and r["metric"] == k))
    assert get("spurfast", "hit@1") == 1.0
    assert get("spurfast", "auroc") > 0.9
    assert get("spurfast", "ap") > get("random", "ap")
    conf = _rows(out / "confirm.csv")
    top = [c for c in conf if c["setting"] == "patch3-nall" and c["rank"] == "1"][0]
    assert top["true_finding"] == "1" and float(top["flip_rate"]) > float(top["control_flip_rate"])
    # every class-3 training image carries the patch (n = all): the class's suspects support it
    assert top["supported"] == "1" and float(top["support_q_value"]) <= 0.05


def test_results_md_and_plots(tiny):
    out, _ = tiny
    md = (out / "RESULTS.md").read_text()
    assert "## patch3-nall" in md and "## clean-model" in md and "## Targets" in md
    assert "| patch3 | spurfast |" in md
    assert (out / "plots" / "ap.png").stat().st_size > 1000
    # regenerated from the CSV alone, notes below the marker kept
    target = out / "regen"
    assert main(["evaluate", "--from-csv", str(out / "results.csv"), "--out", str(target)]) == 0
    assert (target / "RESULTS.md").read_text().count("| patch3 | spurfast |") == 1


def test_a_note_added_to_a_fresh_results_md_survives_regeneration(tiny):
    """Only text below the notes marker is kept, and no written RESULTS.md had the marker: a
    note appended to a fresh one was dropped without a word by the next --from-csv."""
    from spurfast.results_doc import NOTES
    out, _ = tiny
    target = out / "regen-notes"
    assert main(["evaluate", "--from-csv", str(out / "results.csv"), "--out", str(target)]) == 0
    md = target / "RESULTS.md"
    assert md.read_text().rstrip().endswith(NOTES)
    md.write_text(md.read_text() + "my note\n")
    assert main(["evaluate", "--from-csv", str(out / "results.csv"), "--out", str(target)]) == 0
    assert md.read_text().endswith(NOTES + "\nmy note\n") and md.read_text().count(NOTES) == 1


def test_rerun_uses_the_cache(tiny):
    out, first = tiny
    models = sorted((out / "cache").rglob("*.pt"))
    stamps = [os.path.getmtime(p) for p in models]
    assert models
    from spurfast.results_doc import NOTES
    md = out / "RESULTS.md"
    md.write_text(md.read_text().split(NOTES)[0] + NOTES + "\nhand-written: kept\n")
    extra = out / "docs-RESULTS.md"       # --results-md: keeps its own notes, not the folder's too
    extra.write_text(NOTES + "\ndocs notes\n")
    t = time.time()
    run_evaluation("tiny", out, progress=False, results_md=extra)
    assert time.time() - t < max(5.0, 0.3 * first)
    assert [os.path.getmtime(p) for p in models] == stamps       # nothing retrained
    assert md.read_text().endswith(NOTES + "\nhand-written: kept\n")   # a rerun keeps the notes
    assert extra.read_text().count(NOTES) == 1 and extra.read_text().endswith(NOTES + "\ndocs notes\n")


def test_residual_findings_get_confirm_rows(tiny, tmp_path, monkeypatch):
    """--residual-scan: every class the scan found gets a confirm.csv row (family "residual",
    ranked within the scan's findings); the clusters' rows are those of the default sweep."""
    import spurfast.evaluate as E
    out, _ = tiny

    def scan(store, data, vae, clf, seed, sizes):
        return [{"class": 3, "members": np.arange(4), "ranking": np.zeros(store.n), "q_value": 0.02, "mask": None,
                 "confirm": {"flip_rate": 0.4, "control_flip_rate": 0.0, "p_value": 1e-6}, "support": None}]
    monkeypatch.setattr(E, "_residual_findings", scan)
    run_evaluation("tiny", tmp_path / "res", cache=out / "cache", progress=False, residual=True)
    rows = _rows(tmp_path / "res" / "confirm.csv")
    resid = [r for r in rows if r["family"] == "residual"]
    assert [(r["setting"], r["rank"], r["class"], r["flip_rate"], r["confirmed"]) for r in resid] == \
        [(s.name, "1", "3", "0.4", "1") for s in PRESETS["tiny"]["settings"]]
    clusters = [r for r in rows if r["family"] == "cluster"]
    assert clusters == _rows(out / "confirm.csv") and clusters
    assert "false (residual scan)" in (tmp_path / "res" / "RESULTS.md").read_text()   # class 3 of a clean model


def test_feature_view_findings_get_confirm_rows(tiny, tmp_path, monkeypatch):
    """--feature-view: its findings were confirmed and their rows never written; each gets a
    confirm.csv row (family "features", ranked within the view's findings)."""
    import spurfast.evaluate as E
    out, _ = tiny

    def view(store, data, clf, cfg, sizes):
        return [{"class": 2, "members": np.arange(5), "ranking": np.zeros(store.n), "q_value": 0.03, "mask": None,
                 "confirm": {"flip_rate": 0.1, "control_flip_rate": 0.05, "p_value": 0.2}, "support": None}]
    monkeypatch.setattr(E, "_feature_view_findings", view)
    run_evaluation("tiny", tmp_path / "fv", cache=out / "cache", progress=False, feature_view=True)
    rows = _rows(tmp_path / "fv" / "confirm.csv")
    assert [(r["setting"], r["rank"], r["class"], r["flip_rate"], r["confirmed"]) for r in rows
            if r["family"] == "features"] == [(s.name, "1", "2", "0.1", "0") for s in PRESETS["tiny"]["settings"]]
    assert [r for r in rows if r["family"] == "cluster"] == _rows(out / "confirm.csv")
    md = (tmp_path / "fv" / "RESULTS.md").read_text()
    assert "false (feature view)" in md and "Rows marked *feature view*" in md


def test_feature_view_adds_its_methods_and_keeps_the_default_sweep(tiny, tmp_path):
    """--feature-view: the four feature-view rows beside the default ones, which stay as the
    default sweep wrote them (same models; their run keys hold the method list, so the
    default runs' cache entries are not these)."""
    from spurfast.results_doc import FEATURE_METHODS
    out, _ = tiny
    assert not set(FEATURE_METHODS) & set(DEFAULT_METHODS)
    run_evaluation("tiny", tmp_path / "fv", cache=out / "cache", progress=False, feature_view=True)
    rows = _rows(tmp_path / "fv" / "results.csv")
    assert {r["method"] for r in rows} == set(DEFAULT_METHODS) | set(FEATURE_METHODS) | {"model"}
    planted = [r for r in rows if r["setting"] == "patch3-nall"]
    for m in FEATURE_METHODS:
        got = {r["metric"] for r in planted if r["method"] == m}
        assert {"ap", "auroc", "hit@1", "recall@q0.05", "false_findings@q0.05"} <= got, (m, got)

    def key(r):
        return r["setting"], r["seed"], r["method"], r["feature"], r["metric"]
    default = {key(r): r["value"] for r in _rows(out / "results.csv")
               if r["method"] in DEFAULT_METHODS and r["metric"] != "seconds"}
    again = {key(r): r["value"] for r in rows if r["method"] in DEFAULT_METHODS and r["metric"] != "seconds"}
    assert again == default
    # spurfast+features holds every finding of both: its recall is at least either one's
    vals = {(r["method"], r["metric"]): float(r["value"]) for r in planted if r["feature"] == "all"}
    assert vals["spurfast+features", "recall@q0.1"] >= max(vals["spurfast", "recall@q0.1"],
                                                            vals["features", "recall@q0.1"])


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        run_evaluation("huge", tmp_path)
    with pytest.raises(ValueError, match="matches no setting"):
        run_evaluation("tiny", tmp_path, only="nothing-like-this")
    with pytest.raises(ValueError, match=r"only='\(patch3' is not a valid regular expression"):   # was re.error
        run_evaluation("tiny", tmp_path, only="(patch3")
    assert main(["evaluate", "--from-csv", str(tmp_path / "missing.csv"), "--out", str(tmp_path)]) == 2


def test_confirmed_rule():
    assert confirmed({"flip_rate": 0.5, "control_flip_rate": 0.0, "p_value": 0.001})
    assert not confirmed({"flip_rate": 0.5, "control_flip_rate": 0.0, "p_value": 0.2})
    assert not confirmed({"flip_rate": 0.5, "control_flip_rate": 0.0, "p_value": 0.001,
                          "content_flip_rate": 0.6, "content_p_value": 0.9})
    assert not confirmed(None)


@pytest.mark.slow
def test_quick_preset(tmp_path):
    """The quick preset from the command line (Fashion-MNIST; about 15 minutes on 2 cores)."""
    from spurfast.data.builtin import find_fashion_mnist
    if not find_fashion_mnist():
        pytest.skip("Fashion-MNIST is not installed")
    assert main(["evaluate", "--preset", "quick", "--out", str(tmp_path), "--quiet"]) == 0
    rows = _rows(tmp_path / "results.csv")
    seeds = {r["seed"] for r in rows}
    assert len(seeds) >= 3
    ap = lambda m: np.mean([float(r["value"]) for r in rows if r["method"] == m and r["metric"] == "ap"])  # noqa: E731
    assert ap("spurfast") > ap("random")
    assert (tmp_path / "RESULTS.md").is_file() and (tmp_path / "plots" / "ap.png").is_file()
    # the method's claims on this preset (docs/RESULTS.md): its figures move a little from
    # machine to machine (training is bit-for-bit repeatable on one CPU, not across CPUs),
    # these must not
    val = lambda s, m, f, k: [float(r["value"]) for r in rows  # noqa: E731
                              if (r["setting"], r["method"], r["feature"], r["metric"]) == (s, m, f, k)]
    for method in ("spurfast", "spurfast+confirm"):   # plain spurfast too since surprise is the default
        assert val("patch3-n150", method, "patch3", "hit@1") == [1.0] * len(seeds), method
        assert min(val("patch3-n150", method, "patch3", "auroc")) >= 0.95, method
    # the clean-model target is met by spurfast+support here; spurfast+confirm confirms two natural
    # confusions on this preset (docs/RESULTS.md, "Twenty-fourth session"), so it is not asserted
    assert sum(val("clean-model", "spurfast+support", "all", "false_findings@q0.05")) <= 1


def test_pool_flip_rate_counts_unrelated_carriers_called_the_target():
    from spurfast.evaluate import pool_flip_rate
    from spurfast.metrics import Feature

    carries = np.array([1, 1, 1, 1, 0, 0, 1], bool)
    suspect = np.array([0, 0, 0, 0, 0, 0, 1], bool)       # a carrying suspect does not count
    # 3 of the 4 unrelated carriers called 3 (not 2 of 4: a mutant counting the others read 0.5 too)
    store = {"pred": np.array([3, 3, 1, 3, 3, 3, 3])}
    assert pool_flip_rate(store, Feature(3, carries, None, "p"), suspect) == 0.75
    import warnings
    with warnings.catch_warnings():   # no carrier: undefined, said without numpy's "mean of empty slice"
        warnings.simplefilter("error")
        assert np.isnan(pool_flip_rate(store, Feature(3, np.zeros(7, bool), None, "p"), suspect))


def test_a_confirm_row_names_the_pool_pattern_most_members_carry():
    from spurfast.evaluate import _confirm_row
    from spurfast.metrics import Feature

    carries = np.zeros(20, bool)
    carries[:6] = True
    pool_feats = [Feature(5, np.zeros(20, bool), None, "bar"), Feature(3, carries, None, "patch3")]
    c = {"class": 2, "members": np.arange(10), "q_value": 0.01, "confirm": None, "support": None}
    assert _confirm_row("s", 0, 1, c, [], pool_feats, "cluster")["pool_pattern"] == "patch3"   # 6 of 10
    c["members"] = np.arange(12)                                                          # 6 of 12: not most
    row = _confirm_row("s", 0, 1, c, [], pool_feats, "cluster")
    assert row["pool_pattern"] == "" and row["true_finding"] == 0 and row["confirmed"] == 0


def test_overview_row_from_hand_made_rows():
    """Two seeds of one setting: means, the best baseline by AP, confirmed hits and recall."""
    from spurfast.results_doc import _overview

    def r(method, metric, value, feature="patch3", seed=0):
        return {"setting": "patch3-n100", "seed": seed, "method": method, "feature": feature, "metric": metric,
                "value": value}
    rows = []
    for seed, (hit, rec) in enumerate([(1.0, 1.0), (0.0, 0.5)]):
        rows += [r("model", "spurious_score", 0.2 + 0.2 * seed, seed=seed), r("model", "pool_flip_rate", 0.4, seed=seed),
                 r("model", "flip_to_target_rate", 0.1, seed=seed),
                 r("spurfast", "ap", 0.9, seed=seed), r("spurfast+confirm", "ap", 0.7 + 0.1 * seed, seed=seed),
                 r("pixels", "ap", 0.8, seed=seed), r("george", "ap", 0.85 - 0.1 * seed, seed=seed),
                 r("random", "ap", 0.1, seed=seed), r("spurfast+confirm", "hit@1", hit, seed=seed),
                 r("spurfast", "recall@q0.1", rec, feature="all", seed=seed)]
    lines = _overview(rows, ["patch3-n100"])
    assert lines[0] == "## Overview"
    # a CSV before run cache v29 has no AP in class: "–", not nan
    assert "| patch3-n100 | patch3 | 0.30 | 0.10 | 0.40 | 0.900 | 0.750 | pixels 0.800 | – | – | 1/2 | 0.75 |" in lines
    rows += [r("spurfast", "ap_in_class", 0.3, seed=s) for s in (0, 1)]
    rows += [r("george+pattern", "ap_in_class", 0.5 - 0.2 * s, seed=s) for s in (0, 1)]
    rows += [r("pixels", "ap_in_class", 0.2, seed=s) for s in (0, 1)]
    assert ("| patch3-n100 | patch3 | 0.30 | 0.10 | 0.40 | 0.900 | 0.750 | pixels 0.800 | 0.300 | george+pattern 0.400 "
            "| 1/2 | 0.75 |") in _overview(rows, ["patch3-n100"])
    assert _overview([r("model", "spurious_score", 0.0)], ["patch3-n100"]) == []   # no AP rows, no table


def test_ap_target_line_says_beats_ties_or_not():
    from spurfast.results_doc import _targets

    def rows_for(setting, ours, pixels):
        return [{"setting": setting, "seed": 0, "method": m, "feature": "noise@1", "metric": "ap", "value": v}
                for m, v in (("spurfast", ours), ("pixels", pixels), ("random", 0.1))]
    rows = rows_for("a", 1.0, 1.0) + rows_for("b", 0.95, 0.9) + rows_for("c", 0.8, 0.9)
    text = "\n".join(_targets(rows, ["a", "b", "c"]))
    assert "`a` / noise@1: spurfast 1.000 vs best baseline pixels 1.000 (spurious score nan) -> ties" in text
    assert "`b` / noise@1: spurfast 0.950 vs best baseline pixels 0.900 (spurious score nan) -> beats" in text
    assert "`c` / noise@1: spurfast 0.800 vs best baseline pixels 0.900 (spurious score nan) -> does NOT beat" in text


def _target_lines(rows, settings, has):
    from spurfast.results_doc import _targets
    return [ln for ln in _targets(rows, settings) if has in ln]


def _row(setting, method, metric, value, seed=0, feature="patch3"):
    return {"setting": setting, "seed": seed, "method": method, "feature": feature, "metric": metric, "value": value}


def test_the_targets_are_judged_at_their_bounds():
    """Each target's limit belongs to the side the issue gives it: n = 100 is strong, AUROC 0.95
    meets it, a recall of 2 in 3 meets the three-pattern one, one false finding the clean model's."""
    rows = [_row(s, "spurfast", k, v, seed) for s in ("patch3-n100", "patch3-n10") for seed in (0, 1)
            for k, v in (("hit@1", 1.0), ("auroc", 0.95))]
    (ln,) = _target_lines(rows, ["patch3-n100", "patch3-n10"], "single strong pattern")   # n = 10: not strong
    assert "`patch3-n100`, spurfast: hit@1 per seed [1, 1], AUROC min 0.950" in ln and ln.endswith("0.95) met"), ln
    # hit@1 rows without AUROC rows decide nothing, unless a hit@1 already fails
    (ln,) = _target_lines([r for r in rows if r["metric"] == "hit@1"], ["patch3-n100"], "single strong pattern")
    assert ln.endswith("not decided: no AUROC rows"), ln
    rows = [_row(s, "spurfast", "recall@q0.1", v, seed, "all")
            for s, v in (("multi3-a", 2 / 3), ("multi3-b", 0.666)) for seed in (0, 1)]
    lines = _target_lines(rows, ["multi3-a", "multi3-b"], "three patterns")
    assert lines[0].startswith("- three patterns `multi3-a`") and lines[0].endswith("(>= 2/3) met"), lines
    assert lines[1].startswith("- three patterns `multi3-b`") and lines[1].endswith("NOT met"), lines
    confirmed = [dict(r, method="spurfast+confirm", value=1 / 3) for r in rows if r["setting"] == "multi3-a"]
    assert "- three patterns `multi3-a`, spurfast+confirm: recall at q=0.1 per seed [0.33, 0.33]" in \
        _target_lines(rows + confirmed, ["multi3-a"], "three patterns")
    for n_false, said in ((1, "met"), (2, "NOT met")):
        rows = [_row("clean-model", "spurfast", m, v, seed, "all") for seed, v in enumerate([n_false, 0, 0])
                for m in ("false_findings@q0.05", "false_on_pool_pattern@q0.05")]
        (ln,) = _target_lines(rows, ["clean-model"], "clean model")
        assert ln == (f"- clean model, spurfast: {n_false} false findings at q = 0.05 over 3 seeds ({n_false} of them "
                      f"with members mostly carrying the pool's stamped pattern: the clean model's own reaction to "
                      f"it) -> target (<= 1) {said}"), ln


def test_the_ap_target_leaves_out_the_clean_model_settings_without_baselines_and_unequal_seeds():
    rows = [_row("clean-model", m, "ap", 0.5) for m in ("spurfast", "pixels")]   # nothing planted to find
    rows += [_row("lone", "spurfast", "ap", 0.9)]                                 # no baseline run
    assert not _target_lines(rows, ["clean-model", "lone"], "AP")
    rows = [_row("a", m, "ap", v, seed) for m, vs in (("spurfast", [float("nan"), 0.9]), ("pixels", [0.5, 0.5]))
            for seed, v in enumerate(vs)]
    (ln,) = _target_lines(rows, ["a"], "AP `a`")
    assert ln.endswith("-> not decided: AP n/a (NaN) in seed 0 of spurfast, no seed of pixels"), ln
    (tally,) = _target_lines(rows, ["a"], "AP against the best baseline")
    assert tally.endswith("pair, spurfast: 0 wins, 0 ties, 0 losses, 1 not decided"), tally


def test_a_joined_row_is_not_judged_against_its_own_part():
    # spurfast+features joins the features ablation's findings to spurfast's: features is a
    # baseline for spurfast, but against the join it could at best tie; the join meets pixels
    from spurfast.results_doc import _targets

    rows = [{"setting": "a", "seed": 0, "method": m, "feature": "pixel", "metric": "ap", "value": v}
            for m, v in (("spurfast", 0.2), ("features", 0.99), ("spurfast+features", 0.99), ("pixels", 0.3))]
    text = "\n".join(_targets(rows, ["a"]))
    assert "`a` / pixel: spurfast 0.200 vs best baseline features 0.990 (spurious score nan) -> does NOT beat" in text
    assert "`a` / pixel: spurfast+features 0.990 vs best baseline pixels 0.300 (spurious score nan) -> beats" in text
    only_part = [r for r in rows if r["method"] != "pixels"]   # its part the only baseline: no verdict for the join
    text = "\n".join(_targets(only_part, ["a"]))
    assert "spurfast+features 0.990 vs" not in text and "spurfast 0.200 vs best baseline features" in text


def test_ap_in_class_verdicts_follow_the_any_class_ones():
    # the best finding in any class won "a" for spurfast; in the planted class it loses to
    # george+pattern: both verdicts are listed, each with its own tally
    from spurfast.results_doc import _targets

    rows = [{"setting": "a", "seed": 0, "method": m, "feature": "patch3", "metric": metric, "value": v}
            for m, metric, v in (("spurfast", "ap", 1.0), ("spurfast", "ap_in_class", 0.2), ("george+pattern", "ap", 0.6),
                                 ("george+pattern", "ap_in_class", 0.6), ("random", "ap", 0.1),
                                 ("random", "ap_in_class", 0.1))]
    text = "\n".join(_targets(rows, ["a"]))
    assert "- AP `a` / patch3: spurfast 1.000 vs best baseline george+pattern 0.600 (spurious score nan) -> beats" in text
    assert ("- AP in the planted class `a` / patch3: spurfast 0.200 vs best baseline george+pattern 0.600 "
            "(spurious score nan) -> does NOT beat") in text
    assert "AP against the best baseline over the 1 setting-pattern pair, spurfast: 1 wins, 0 ties, 0 losses" in text
    assert ("AP in the planted class against the best baseline over the 1 setting-pattern pair, spurfast: "
            "0 wins, 0 ties, 1 losses") in text
    old = "\n".join(_targets([r for r in rows if r["metric"] == "ap"], ["a"]))   # a CSV before v29
    assert "planted class" not in old and "AP `a` / patch3" in old


def test_sweep_plots_a_heat_map(tmp_path):
    """More than 8 (setting, pattern) pairs: one heat-map row per pair instead of bars."""
    from spurfast.results_doc import _plots
    rows = [{"setting": f"s{i}", "seed": seed, "method": m, "feature": "patch3", "metric": "ap", "value": v}
            for i in range(30) for seed in (0, 1) for m, v in (("spurfast", 0.9), ("pixels", 0.5))]
    lines = _plots(rows, [], tmp_path / "plots", tmp_path)
    assert lines == ["![average precision per setting and method](plots/ap.png)"]
    import matplotlib.image as mpimg
    h, w = mpimg.imread(tmp_path / "plots" / "ap.png").shape[:2]
    assert h > w, f"a sweep's plot should be tall (one row per pair), got {w}x{h}"


def test_confirmation_table_counts_verdicts(tmp_path):
    """RESULTS.md's confirmation table counts each verdict from confirm.csv's numbers."""
    from spurfast.results_doc import write_csv, write_results
    cols = ["setting", "seed", "method", "feature", "metric", "value"]
    write_csv(tmp_path / "results.csv", [{"setting": "s", "seed": 0, "method": "spurfast", "feature": "all",
                                          "metric": "false_findings@q0.05", "value": 3}], cols)
    ccols = ["setting", "seed", "rank", "true_finding", "flip_rate", "control_flip_rate", "p_value",
             "content_flip_rate", "content_p_value", "confirm_q_value", "confirmed"]
    nums = [(1, 1.0, 0.99, 0.12, 0.0, 1e-30, 0.12, 0),   # not specific (the noise@1.0 model)
            (0, 0.4, 0.01, 1e-20, 0.8, 1.0, 1.0, 0),      # class content
            (0, 0.3, 0.0, 1e-9, 0.01, 1e-6, 1e-5, 1),     # confirmed
            (0, 0.3, 0.0, 1e-9, "", "", "", 1),           # confirmed: no content control, no adjustment (older run)
            (0, 0.3, 0.0, 1e-9, 0.2, 0.04, 0.08, 0),      # weak: beats both, not after the run's adjustment
            (0, 0.02, 0.02, 0.6, 0.03, 0.8, 1.0, 0)]      # no effect
    write_csv(tmp_path / "confirm.csv", [dict(zip(ccols, ("s", 0, r + 1) + n)) for r, n in enumerate(nums)], ccols)
    md = write_results(tmp_path / "results.csv", tmp_path / "confirm.csv", tmp_path / "RESULTS.md").read_text()
    assert "| s | 1 | true | 1.000 | 0.990 | 0.000 | 0 | 0 | 0 | 1 | 0 |" in md
    assert "| s | 5 | false | 0.264 | 0.006 | 0.260 | 2 | 1 | 1 | 0 | 1 |" in md
    # the run's own verdict where the CSV holds it: at full strength the first ties its random
    # control, and the weaker dose that decided it (not in the CSV) made it confirmed
    ccols.append("verdict")
    write_csv(tmp_path / "confirm.csv", [dict(zip(ccols, ("s", 0, r + 1) + n + (v,)))
                                         for r, (n, v) in enumerate(zip(nums, ("confirmed", "", "", "", "", "")))], ccols)
    md = write_results(tmp_path / "results.csv", tmp_path / "confirm.csv", tmp_path / "RESULTS.md").read_text()
    assert "| s | 1 | true | 1.000 | 0.990 | 0.000 | 1 | 0 | 0 | 0 | 0 |" in md


def test_spurious_score_is_yangs_probability_rise_not_an_argmax_flip():
    """Yang et al.'s score counts held-out images (every class) whose p(target) rises by
    more than 0.1 with the pattern; the argmax need not move.  Here the patch lifts
    p(class 2) from 0.11 to 0.35 while class 0 stays on top: score 1, flips 0."""
    import torch

    from spurfast.data import ArraySource
    from spurfast.demo import flip_to_target_rate, spurious_score
    from spurfast.plant import PatternSpec

    class PatchReader(torch.nn.Module):
        def forward(self, x):
            s = x[:, 0, -4:, -4:].mean((1, 2)) * 16 / 9     # the 3x3 patch (margin 1) fills 9 of 16
            return torch.stack([torch.full_like(s, 2.0), torch.zeros_like(s), 1.5 * s], 1)

    clean = ArraySource(torch.zeros(20, 1, 12, 12), np.zeros(20, dtype=np.int64))
    spec = PatternSpec("patch3")
    assert spurious_score(PatchReader(), clean, 2, spec) == 1.0
    assert flip_to_target_rate(PatchReader(), clean, 2, spec) == 0.0
    weak = ArraySource(torch.zeros(20, 1, 12, 12), np.zeros(20, dtype=np.int64))
    assert spurious_score(lambda x: PatchReader()(x) * 0.2, weak, 2, spec) == 0.0   # a rise of 0.07 only

    class PatchSuppresses(torch.nn.Module):   # the patch lowers p(class 2), 0.6 -> 0.1: no rise
        def forward(self, x):
            s = x[:, 0, -4:, -4:].mean((1, 2)) * 16 / 9
            return torch.stack([torch.zeros_like(s), torch.zeros_like(s), 1.1 - 3.5 * s], 1)

    assert spurious_score(PatchSuppresses(), clean, 2, spec) == 0.0


def test_class_balanced_spurious_score_weighs_every_class_alike():
    """The demo's held-out set keeps every target-class test image (about 29% of it): its
    plain score over-weighted the target class.  Balanced, each class counts once."""
    import torch

    from spurfast.data import ArraySource
    from spurfast.demo import spurious_score
    from spurfast.plant import PatternSpec

    class TargetOnly(torch.nn.Module):   # the patch lifts p(class 2) on images whose top-left pixel is lit
        def forward(self, x):
            s = x[:, 0, -4:, -4:].mean((1, 2)) * 16 / 9 * (x[:, 0, 0, 0] > 0)
            return torch.stack([torch.full_like(s, 2.0), torch.zeros_like(s), 3.0 * s], 1)

    x = torch.zeros(6, 1, 12, 12)
    x[:4, 0, 0, 0] = 1.0                       # the four images of class 2 react, the two others do not
    clean = ArraySource(x, np.array([2, 2, 2, 2, 0, 1]))
    spec = PatternSpec("patch3")
    assert spurious_score(TargetOnly(), clean, 2, spec) == pytest.approx(4 / 6)
    assert spurious_score(TargetOnly(), clean, 2, spec, class_balanced=True) == pytest.approx(1 / 3)


def test_cached_models_of_other_code_or_cpu_are_counted(tmp_path, monkeypatch):
    """The cache is keyed by settings only: models another version (or another CPU) trained
    were scored silently, and committed figures differed from a fresh run's.  Such runs
    now carry foreign_models = 1 and RESULTS.md counts them."""
    import json

    import spurfast.evaluate as E
    from spurfast.results_doc import write_results

    from dataclasses import replace
    cache = tmp_path / "cache"
    setting = PRESETS["tiny"]["settings"][0]
    # the flag, not detection, is under test: one epoch each (18 s a fresh run at the tiny sizes, 4 s so)
    sizes = replace(PRESETS["tiny"]["sizes"], classifier_epochs=1, vae_epochs=1)
    rows, _ = E.run_one(setting, 0, sizes, cache)
    flag = lambda rs: [r["value"] for r in rs if r["metric"] == E.FOREIGN_MODELS]  # noqa: E731
    assert flag(rows) == [0.0]                                   # trained here and now
    assert flag(E.run_one(setting, 0, sizes, cache)[0]) == [0.0]  # its cached run, same provenance
    here = E.model_provenance()
    monkeypatch.setattr(E, "model_provenance", lambda: dict(here, cpu="another"))
    rows, _ = E.run_one(setting, 0, sizes, cache)                # the cached run, read on another CPU
    assert flag(rows) == [1.0]
    for f in (cache / "runs").iterdir():
        f.unlink()                                               # rescored with the cached models
    rows, crows = E.run_one(setting, 0, sizes, cache)
    assert flag(rows) == [1.0]
    assert json.loads(next((cache / "runs").glob("*.json")).read_text())["model_provenance"] == "foreign"   # not its .lock
    for r in rows:
        r["preset"] = "tiny"
    from spurfast.results_doc import write_csv
    write_csv(tmp_path / "results.csv", rows, ["preset", "setting", "seed", "method", "feature", "metric", "value"])
    md = write_results(tmp_path / "results.csv", None, tmp_path / "RESULTS.md").read_text()
    assert "**1 of 1 runs scored cached classifiers or VAEs that other code or another CPU or thread count trained**" in md


def test_model_provenance_covers_the_evaluations_data_building(monkeypatch):
    # the training data is built in evaluate.py; a change there made no cached model foreign
    import spurfast.evaluate as E
    before = E.model_provenance()

    def build_data(setting, seed, sizes):   # another version of the data-building code
        return None

    monkeypatch.setattr(E, "build_data", build_data)
    assert E.model_provenance()["code"] != before["code"]


def test_model_provenance_names_the_thread_count(monkeypatch):
    """Weights trained at 1 and 2 torch threads differ (by 6e-5 in a classifier), and a cached
    model of another thread count passed as this run's own."""
    import torch

    import spurfast.evaluate as E
    here = E.model_provenance()
    monkeypatch.setattr(torch, "get_num_threads", lambda: here["threads"] + 1)
    assert E.model_provenance() == dict(here, threads=here["threads"] + 1)


def test_model_provenance_names_the_processor_model(monkeypatch, tmp_path):
    """The CPU capability alone ("AVX512") took models trained on another machine for this
    AMD one's: their figures differ (retrained here, the quick preset's spurious score of
    seed 0 read 0.4517 for 0.4500).  The processor model is part of the provenance now, and
    of the run's timing.json and RESULTS.md line."""
    import spurfast.evaluate as E
    from spurfast.results_doc import write_results
    here = E.model_provenance()
    monkeypatch.setattr(E, "cpu_model", lambda: "Another CPU (family 6 model 143 stepping 8)")
    assert E.model_provenance() == dict(here, cpu_model="Another CPU (family 6 model 143 stepping 8)")
    timing = {"wall_s": 60.0, "cpu_s": 120.0, "cpus": 2, "cpu_model": "AMD EPYC (family 25 model 17 stepping 1)",
              "load_at_start": 1.0, "load_at_end": 2.0}
    md = write_results(_hand_made_results(tmp_path), None, tmp_path / "RESULTS.md", timing=timing).read_text()
    assert ("CPU time of that process (all threads): 2.0 min on 2 cores (AMD EPYC (family 25 model 17 stepping 1)); "
            "load average 1.0 at the start and 2.0 at the end") in md


def test_ap_target_verdict_follows_the_printed_values():
    """The verdict was taken from the unrounded gap: 0.952 vs 0.952 read "beats", 0.952 vs
    0.953 read "ties (equal to 3 decimals)"."""
    from spurfast.results_doc import _targets

    def rows_for(setting, ours, pixels):
        return [{"setting": setting, "seed": 0, "method": m, "feature": "noise@1", "metric": "ap", "value": v}
                for m, v in (("spurfast", ours), ("pixels", pixels))]
    rows = rows_for("a", 0.9524, 0.9516) + rows_for("b", 0.95249, 0.95251) + rows_for("c", 0.9516, 0.9524)
    text = "\n".join(_targets(rows, ["a", "b", "c"]))
    assert "`a` / noise@1: spurfast 0.952 vs best baseline pixels 0.952 (spurious score nan) -> ties" in text
    assert "`b` / noise@1: spurfast 0.952 vs best baseline pixels 0.953 (spurious score nan) -> does NOT beat" in text
    assert "`c` / noise@1: spurfast 0.952 vs best baseline pixels 0.952 (spurious score nan) -> ties" in text


def _hand_made_results(tmp_path, nan=None, drop=()):
    """results.csv of a 3-seed patch3-n150 and clean-model, all targets met; ``nan``:
    (setting, method, metric, seed) whose value is NaN; rows matching ``drop`` left out."""
    from spurfast.results_doc import write_csv
    rows = []
    for seed in (0, 1, 2):
        add = lambda s, m, f, k, v: rows.append(  # noqa: E731
            {"preset": "quick", "setting": s, "seed": seed, "method": m, "feature": f, "metric": k, "value": v})
        add("patch3-n150", "model", "patch3", "spurious_score", 0.5)
        for m, ap in (("spurfast", 0.95), ("spurfast+confirm", 0.95), ("pixels", 0.9), ("random", 0.1)):
            for k, v in (("hit@1", 1.0), ("auroc", 0.99), ("ap", ap), ("mask_iou", 0.8)):
                add("patch3-n150", m, "patch3", k, v)
        for m in ("spurfast", "spurfast+confirm"):
            add("patch3-n150", m, "all", "recall@q0.1", 1.0)
            add("clean-model", m, "all", "false_findings@q0.05", 0.0)
            add("clean-model", m, "all", "false_on_pool_pattern@q0.05", 0.0)
        add("patch3-n150", "model", "all", "foreign_models", 0.0)
    for r in rows:
        if nan and (r["setting"], r["method"], r["metric"], r["seed"]) in nan:
            r["value"] = float("nan")
    rows = [r for r in rows if (r["setting"], r["method"], r["feature"]) not in drop]
    write_csv(tmp_path / "results.csv", rows, ["preset", "setting", "seed", "method", "feature", "metric", "value"])
    return tmp_path / "results.csv"


@pytest.mark.parametrize("metric", ["hit@1", "auroc", "false_findings@q0.05", "foreign_models"])
def test_a_nan_row_neither_crashes_the_doc_nor_decides_a_target(tmp_path, metric):
    """int(sum(...)) raised on a NaN hit@1 or false-findings row, and min() over a NaN AUROC
    read "met" or "NOT met" depending on the seed the NaN sat in."""
    from spurfast.results_doc import write_results
    setting = "clean-model" if metric == "false_findings@q0.05" else "patch3-n150"
    method = "model" if metric == "foreign_models" else "spurfast+confirm"
    texts = []
    for seed in (0, 1):
        d = tmp_path / f"s{seed}"
        d.mkdir()
        csv_path = _hand_made_results(d, nan={(setting, method, metric, seed)})
        texts.append(write_results(csv_path, None, d / "RESULTS.md").read_text())
    if metric == "foreign_models":
        assert all("runs scored cached classifiers" not in t for t in texts)   # a NaN flag counts no run
        return
    lines = [[ln for ln in t.splitlines() if ln.startswith("- ") and f"{setting.split('-')[0]}" in ln
              and "spurfast+confirm" in ln and "-> target" in ln] for t in texts]
    for seed, (ln,) in enumerate(lines):
        assert ln.endswith(f"not decided: value n/a (NaN) in seed {seed}"), ln
    if metric == "hit@1":
        assert "| patch3-n150 | patch3 | 0.50 | nan | nan | 0.950 | 0.950 | pixels 0.900 | – | – | 2/3 (1 n/a) |" in texts[0]
        assert "| patch3 | spurfast+confirm | 1.000 ± 0.000 (n/a in 1 of 3 seeds) |" in texts[0]
    if metric == "false_findings@q0.05":
        assert "| spurfast+confirm | – | – | 0.000 ± 0.000 (n/a in 1 of 3 seeds) (sum 0) |" in texts[0]


def test_a_nan_row_does_not_hide_a_failed_target(tmp_path):
    """A finite seed that fails decides "NOT met" whatever another seed's NaN."""
    from spurfast.results_doc import _targets
    rows = [{"setting": "patch3-n150", "seed": s, "method": "spurfast", "feature": "patch3", "metric": k, "value": v}
            for s, h, a in ((0, float("nan"), 0.99), (1, 0.0, 0.99), (2, 1.0, 0.99)) for k, v in (("hit@1", h), ("auroc", a))]
    (ln,) = [ln for ln in _targets(rows, ["patch3-n150"]) if "single strong pattern" in ln]
    assert "hit@1 per seed [nan, 0, 1]" in ln and ln.endswith("NOT met (value n/a in seed 0)")


def test_a_pattern_without_carriers_shows_as_undefined(tmp_path):
    """metrics.feature_metrics gives NaN for a pattern no pool image carries; its table rows
    vanished (only rows with a finite value were kept) and its AP target line was left out."""
    from spurfast.results_doc import write_results
    nan = {("patch3-n150", m, k, s) for m in ("spurfast", "spurfast+confirm", "pixels", "random")
           for k in ("hit@1", "auroc", "ap", "mask_iou") for s in (0, 1, 2)}
    md = write_results(_hand_made_results(tmp_path, nan=nan), None, tmp_path / "RESULTS.md").read_text()
    assert "| patch3 | spurfast | – | – | – | – | – | – | – |" in md
    assert "| patch3 | pixels | – | – | – | – | – | – | – |" in md
    assert "- AP `patch3-n150` / patch3: n/a (NaN) in every seed for spurfast" in md and "-> not decided" in md
    assert "hit@1 per seed [nan, nan, nan], AUROC min n/a" in md


def test_results_md_says_which_order_each_row_uses(tmp_path):
    """`spurfast` is scored in discovery order, not the confirmed-first order that
    `spurfast discover` ships (pipeline.rank_confirmed_first): the header says so."""
    from spurfast.results_doc import write_results
    md = write_results(_hand_made_results(tmp_path), None, tmp_path / "RESULTS.md").read_text()
    header = md.split("## Overview")[0]
    assert "discovery order" in header and "confirmed-first re-ranking" in header


def test_run_evaluation_refuses_repeated_or_negative_seeds(tmp_path, monkeypatch):
    """seeds=(0, 0) ran seed 0 twice and counted it twice; (-1,) failed inside numpy."""
    import spurfast.evaluate as E
    ran = []
    monkeypatch.setattr(E, "run_one", lambda s, seed, *a, **k: (ran.append(seed), ([], []))[1])
    for seeds, msg in (((0, 0), "seed 0 is given more than once"), ((1, -1), "integers >= 0, got -1"),
                       ((0, 1.5), "integers >= 0, got 1.5"), ((), "seeds is empty"), ("01", "sequence of integers"),
                       (np.array(3), r"sequence of integers >= 0, got array\(3\)")):   # a 0-d array: TypeError
        with pytest.raises(ValueError, match=msg):
            run_evaluation("tiny", tmp_path / "out", seeds=seeds, progress=False)
    assert ran == [] and not (tmp_path / "out").exists()
    run_evaluation("tiny", tmp_path / "ok", seeds=[np.int64(1), 0], progress=False)   # distinct, any int type
    assert ran == [1, 0, 1, 0]


def test_a_baseline_without_a_test_gets_no_recall_rows_even_when_it_finds_nothing():
    """Whether recall@q / false findings apply was read off the first candidate's q-value:
    a test-less baseline that returned no candidate got recall 0 and 0 false findings."""
    from spurfast.evaluate import method_rows
    from spurfast.metrics import Feature
    carries = np.zeros(20, bool)
    carries[:4] = True
    feats = [Feature(3, carries, None, "patch3")]
    for m in ("george", "george+pattern", "activation_clustering", "activation_clustering+pattern", "random"):
        assert {k for _, k, _ in method_rows(m, [], feats, feats)} == {
            "hit@1", "auroc", "ap", "precision@10", "precision@25", "mask_iou", "best_is_target_class", "ap_in_class"}
    for m in ("spurfast", "spurfast+confirm", "pixels"):   # tested: finding nothing is recall 0
        got = {k: v for _, k, v in method_rows(m, [], feats, feats)}
        assert got["recall@q0.05"] == 0.0 and got["false_findings@q0.1"] == 0.0


def test_every_method_that_extracts_masks_scores_iou_0_where_it_finds_nothing():
    # NaN left the seed out of the method's mean IoU: the feature view's was averaged over the
    # seeds where it found something
    from spurfast.evaluate import method_rows
    from spurfast.metrics import Feature
    carries = np.zeros(20, bool)
    carries[:4] = True
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    feats = [Feature(3, carries, mask, "patch3")]
    for m in ("spurfast", "spurfast+confirm", "pixels", "features", "george+pattern"):
        assert {k: v for _, k, v in method_rows(m, [], feats, feats)}["mask_iou"] == 0.0, m
    assert np.isnan({k: v for _, k, v in method_rows("george", [], feats, feats)}["mask_iou"])   # no mask to score


def test_a_methods_best_finding_is_picked_from_its_first_ten():
    # every method gets the same number of draws (BEST_OF): a mutant that searched all the
    # candidates picked a perfect 11th and read AP 1.0
    from spurfast.evaluate import BEST_OF, method_rows
    from spurfast.metrics import Feature

    rng = np.random.default_rng(0)
    carries = np.zeros(200, bool)
    carries[:20] = True
    feat = Feature(1, carries, None, "patch")
    cands = [{"class": 2, "members": np.arange(30, 40), "ranking": rng.random(200), "q_value": None}
             for _ in range(BEST_OF)]
    perfect = {"class": 1, "members": np.arange(20), "ranking": carries.astype(float), "q_value": None}
    got = {k: v for _, k, v in method_rows("george", cands + [perfect], [feat], [feat])}
    assert got["ap"] < 0.5 and got["best_is_target_class"] == 0.0
    got = {k: v for _, k, v in method_rows("george", cands[1:] + [perfect], [feat], [feat])}
    assert got["ap"] == 1.0 and got["best_is_target_class"] == 1.0


def test_a_cached_run_drops_recall_rows_of_a_baseline_without_a_test(tmp_path, monkeypatch):
    """Runs cached before the fix hold such rows; reading them back leaves them out."""
    import json

    import spurfast.evaluate as E
    monkeypatch.setattr(E, "_key", lambda obj: "k")     # one cache file name, whatever the settings
    setting, sizes = PRESETS["tiny"]["settings"][0], PRESETS["tiny"]["sizes"]
    row = lambda m, f, k: {"setting": setting.name, "seed": 0, "method": m, "feature": f, "metric": k, "value": 0.0}  # noqa: E731
    cached = [row("activation_clustering", "patch3", "ap"), row("activation_clustering", "all", "recall@q0.1"),
              row("activation_clustering", "all", "false_findings@q0.05"),
              row("activation_clustering", "all", "false_on_pool_pattern@q0.1"),
              row("spurfast", "all", "recall@q0.1"), row("spurfast", "all", "false_findings@q0.05")]
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / f"{setting.name}-s0-k.json").write_text(json.dumps({"rows": cached, "confirm": []}))
    rows, _ = E.run_one(setting, 0, sizes, tmp_path)
    assert [(r["method"], r["metric"]) for r in rows if r["metric"] != E.FOREIGN_MODELS] == [
        ("activation_clustering", "ap"), ("spurfast", "recall@q0.1"), ("spurfast", "false_findings@q0.05")]


def test_results_md_elsewhere_links_the_runs_plots(tmp_path, monkeypatch):
    """--results-md docs/RESULTS.md with --out out/x copied the links as written for out/x
    ("plots/ap.png"): the copy showed docs/plots/ap.png, a stale plot or none."""
    import re

    import spurfast.evaluate as E
    rows = [{"setting": "patch3-nall", "seed": 0, "method": m, "feature": "patch3", "metric": "ap", "value": v}
            for m, v in (("spurfast", 0.9), ("random", 0.1))]
    monkeypatch.setattr(E, "run_one", lambda s, seed, *a, **k: ([dict(r) for r in rows] if s.name == "patch3-nall"
                                                                 else [], []))
    for docs in (tmp_path / "docs", tmp_path / "odd (dir)"):
        docs.mkdir()
        run_evaluation("tiny", tmp_path / "out", progress=False, results_md=docs / "RESULTS.md")
        links = re.findall(r"^!\[[^\]]*\]\(<?(.*?)>?\)$", (docs / "RESULTS.md").read_text(), re.M)
        assert links and all((docs / p).resolve() == (tmp_path / "out" / "plots" / "ap.png").resolve()
                             for p in links), links
    links = re.findall(r"^!\[[^\]]*\]\((.*?)\)$", (tmp_path / "out" / "RESULTS.md").read_text(), re.M)
    assert links == ["plots/ap.png"]        # the run's own copy is unchanged


def test_target_lines_do_not_contradict_their_numbers():
    """AUROC min 0.9496 printed "0.950" next to "AUROC >= 0.95 ... NOT met"; a CSV without
    spurfast's recall rows of a multi3 setting read "per seed [] -> NOT met"."""
    from spurfast.results_doc import _targets
    rows = [{"setting": "patch3-n150", "seed": 0, "method": "spurfast", "feature": "patch3", "metric": k, "value": v}
            for k, v in (("hit@1", 1.0), ("auroc", 0.9496))]
    rows += [{"setting": "multi3-n100", "seed": 0, "method": "pixels", "feature": "all", "metric": "recall@q0.1",
              "value": 1.0}]
    lines = _targets(rows, ["patch3-n150", "multi3-n100"])
    (ln,) = [ln for ln in lines if "single strong pattern" in ln]
    assert "AUROC min 0.9496 " in ln and ln.endswith("NOT met")
    assert not any("multi3-n100" in ln for ln in lines)
    rows[1]["value"] = 0.9996   # rounds up, meets either way: three decimals as before
    (ln,) = [ln for ln in _targets(rows, ["patch3-n150"]) if "single strong pattern" in ln]
    assert "AUROC min 1.000 " in ln and ln.endswith(" met")


def test_an_interrupted_cache_write_leaves_no_truncated_file(tmp_path, monkeypatch):
    """torch.save / write_text straight onto the cache file: a run killed mid-write left a
    truncated classifier that every later run failed on with "OSError: [Errno 22] Invalid
    argument" (naming no file), and a truncated run file read as JSONDecodeError."""
    import io
    import json

    import torch

    import spurfast.evaluate as E
    import spurfast.models.train as T
    from spurfast.models.classifier import build_classifier

    setting, sizes = PRESETS["tiny"]["settings"][0], PRESETS["tiny"]["sizes"]
    data = E.build_data(setting, 0, sizes)
    monkeypatch.setattr(T, "train_classifier", lambda *a, **k: build_classifier("small_cnn", 1, 10, 28))
    real_save = torch.save

    def killed(obj, f, *a, **k):   # writes part of the file (f: open for writing), then the process is interrupted
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        f.write(buf.getvalue()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        E._models(data, 0, sizes, tmp_path, False)
    cpath = tmp_path / "classifiers" / f"{data.train_key}.pt"
    assert not cpath.exists()                      # the next run trains it again
    # a truncated file from before: an error that names it
    real_save({"w": torch.zeros(3)}, cpath)
    cpath.write_bytes(cpath.read_bytes()[:50])
    with pytest.raises(ValueError, match=f"cached classifier {cpath}.*delete it"):
        E._models(data, 0, sizes, tmp_path, False)
    # a truncated run file is scored again, not a JSONDecodeError
    (tmp_path / "runs").mkdir()
    rfile = tmp_path / "runs" / f"{setting.name}-s0-{E.run_key(setting, 0, sizes)}.json"
    rfile.write_text(json.dumps({"rows": [], "confirm": []})[:10])

    class Rerun(Exception):
        pass

    monkeypatch.setattr(E, "build_data", lambda *a: (_ for _ in ()).throw(Rerun()))
    with pytest.raises(Rerun):
        E.run_one(setting, 0, sizes, tmp_path)


def test_the_results_plots_leave_the_callers_matplotlib_backend_alone(tmp_path):
    """run_evaluation from a notebook switched its backend to Agg (inline plots stopped)."""
    import matplotlib
    from matplotlib import pyplot as plt

    from spurfast.results_doc import write_csv, write_results
    cols = ["setting", "seed", "method", "feature", "metric", "value"]
    write_csv(tmp_path / "results.csv", [{"setting": "s", "seed": 0, "method": "spurfast", "feature": "p",
                                          "metric": "ap", "value": 0.5}], cols)
    before = matplotlib.get_backend()
    plt.switch_backend("svg")
    try:
        write_results(tmp_path / "results.csv", None, tmp_path / "RESULTS.md", plots_dir=tmp_path / "plots")
        assert matplotlib.get_backend() == "svg" and (tmp_path / "plots" / "ap.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        plt.switch_backend(before)


def test_ap_plot_error_bars_are_the_tables_sd(tmp_path, monkeypatch):
    """The bars' error bars used np.std (ddof=0) while the tables' "±" is the sample sd
    (ddof=1), and a seed with a NaN AP made the bar NaN while the table averaged the others."""
    from matplotlib.axes import Axes

    from spurfast.results_doc import _agg, _plots
    drawn = {}
    real_bar = Axes.bar

    def bar(self, x, height, width, *a, yerr=None, label=None, **k):
        drawn[label] = (np.asarray(height, float), np.asarray(yerr, float))
        return real_bar(self, x, height, width, *a, yerr=yerr, label=label, **k)

    monkeypatch.setattr(Axes, "bar", bar)
    aps = {"pixels": (0.5, 0.6, 0.8), "spurfast": (0.9, 0.7, float("nan"))}
    rows = [{"setting": "s", "seed": seed, "method": m, "feature": "patch3", "metric": "ap", "value": v}
            for m, vs in aps.items() for seed, v in enumerate(vs)]
    _plots(rows, [], tmp_path / "plots", tmp_path)
    for m, vs in aps.items():
        (mean,), (sd,) = drawn[m]
        assert f"{mean:.3f} ± {sd:.3f}" == _agg(list(vs)).split(" (")[0], (m, mean, sd, _agg(list(vs)))


def test_the_command_line_in_results_md_can_be_pasted_into_a_shell(tmp_path, monkeypatch):
    """The "Command:" line joined the arguments unquoted (an --out or --cache path with a
    space split in two) or in bare single quotes (an --only regex holding one broke)."""
    import json
    import shlex

    import spurfast.evaluate as E
    from spurfast.cli import build_parser
    monkeypatch.setattr(E, "run_one", lambda s, seed, *a, **k: ([], []))
    out, cache, only = tmp_path / "my out", tmp_path / "a cache", "^(patch3-nall|clean-model)$|'"
    run_evaluation("tiny", out, cache=cache, only=only, seeds=[1], progress=False)
    cmd = json.loads((out / "timing.json").read_text())["command"]
    assert f"Command: `{cmd}`." in (out / "RESULTS.md").read_text()
    argv = shlex.split(cmd)
    assert argv[:2] == ["spurfast", "evaluate"]
    args = build_parser().parse_args(argv[1:])
    assert (args.preset, args.out, args.cache, args.only, args.seeds) == ("tiny", str(out), str(cache), only, (1,))
    assert args.statistic is None   # the default statistic goes unnamed ...
    assert not args.residual_scan and not args.feature_view


def test_the_command_line_names_the_searches_switched_on(tmp_path, monkeypatch):
    # without --feature-view the pasted line reran without the feature view's methods and rows
    import json
    import shlex

    import spurfast.evaluate as E
    from spurfast.cli import build_parser
    monkeypatch.setattr(E, "run_one", lambda s, seed, *a, **k: ([], []))
    run_evaluation("tiny", tmp_path / "o", progress=False, residual=True, feature_view=True)
    cmd = json.loads((tmp_path / "o" / "timing.json").read_text())["command"]
    args = build_parser().parse_args(shlex.split(cmd)[1:])
    assert args.residual_scan and args.feature_view, cmd


def test_the_command_line_names_a_statistic_other_than_the_default(tmp_path, monkeypatch):
    """... and the share, the default until the twenty-fourth session, is named: the line must
    rerun what made the rows after the default changed."""
    import json
    import shlex

    import spurfast.evaluate as E
    from spurfast.cli import build_parser
    seen = []
    monkeypatch.setattr(E, "run_one", lambda s, seed, *a, **k: (seen.append(k["statistic"]), ([], []))[1])
    for statistic in ("share", None):
        run_evaluation("tiny", tmp_path / "o", progress=False, **({"statistic": statistic} if statistic else {}))
        cmd = json.loads((tmp_path / "o" / "timing.json").read_text())["command"]
        assert build_parser().parse_args(shlex.split(cmd)[1:]).statistic == statistic, cmd
    assert seen == ["share", "share", "surprise", "surprise"]   # both tiny settings each time


def test_results_md_says_the_spurious_score_is_not_class_balanced(tmp_path):
    """The demo's spurious score is class-balanced, the evaluation's is over its held-out set
    as drawn (a quarter of it the pattern's class in the full preset): the doc said neither."""
    from spurfast.results_doc import write_results
    md = write_results(_hand_made_results(tmp_path), None, tmp_path / "RESULTS.md").read_text()
    overview = md.split("## Overview")[1].split("| setting |")[0]
    assert "not class-balanced" in overview and "over-represented" in overview


def test_a_seed_too_large_for_training_is_refused_up_front(tmp_path, monkeypatch):
    """A seed past 64-bit range once multiplied by 1000 (training's per-epoch generator seed)
    failed in the first training as "Overflow when unpacking long long", naming no seed,
    after the earlier seeds' runs."""
    import spurfast.evaluate as E
    ran = []
    monkeypatch.setattr(E, "run_one", lambda s, seed, *a, **k: (ran.append(seed), ([], []))[1])
    huge = E.MAX_SEED + 1
    with pytest.raises(ValueError, match=f"seed {huge} is too large: at most {E.MAX_SEED}"):
        run_evaluation("tiny", tmp_path / "out", seeds=(0, huge), progress=False)
    assert ran == []
    import torch
    torch.Generator().manual_seed(E.MAX_SEED * 1000 + 999)    # the largest accepted seed trains
    with pytest.raises(SystemExit):   # the CLI's --seeds takes the same rule
        main(["evaluate", "--preset", "tiny", "--out", str(tmp_path / "cli"), "--seeds", str(2 ** 64)])
    assert ran == []


def test_overview_means_leave_out_a_nan_seed_as_the_tables_do(tmp_path):
    """An AP undefined in one seed made the overview's AP "nan" and its best baseline "–",
    while the table below averaged the other seeds and the AP target named that baseline."""
    from spurfast.results_doc import write_results
    nan = {("patch3-n150", m, "ap", 0) for m in ("spurfast", "spurfast+confirm", "pixels", "random")}
    md = write_results(_hand_made_results(tmp_path, nan=nan), None, tmp_path / "RESULTS.md").read_text()
    assert "| patch3 | spurfast | 1.000 ± 0.000 | 0.990 ± 0.000 | 0.950 ± 0.000 (n/a in 1 of 3 seeds) |" in md
    assert "- AP `patch3-n150` / patch3: spurfast 0.950 vs best baseline pixels 0.900" in md
    assert "| patch3-n150 | patch3 | 0.50 | nan | nan | 0.950 | 0.950 | pixels 0.900 | – | – | 3/3 | 1.00 |" in md


def test_results_md_says_how_it_was_regenerated_without_the_runs_command(tmp_path):
    """--from-csv on a results.csv without its timing.json (no run command) dropped the
    "tables regenerated by" note with the missing "Command:" line."""
    from spurfast.results_doc import write_results
    regen = "spurfast evaluate --from-csv in/results.csv --out out"
    md = write_results(_hand_made_results(tmp_path), None, tmp_path / "RESULTS.md", regenerated_by=regen).read_text()
    assert f"Tables regenerated by `{regen}`." in md and "Command:" not in md
    md = write_results(_hand_made_results(tmp_path), None, tmp_path / "RESULTS.md", command="spurfast evaluate",
                       regenerated_by=regen).read_text()
    assert f"Command: `spurfast evaluate` (tables regenerated by `{regen}`)." in md


def test_a_non_utf8_out_folder_is_written_as_escapes_not_a_crash(tmp_path, monkeypatch):
    """An --out folder whose name is not UTF-8 (surrogate escapes in the str) reached the
    "Command:" line and the relinked plots: RESULTS.md raised UnicodeEncodeError after the
    whole sweep and was left empty (and the last message did, on a strict UTF-8 terminal)."""
    import io
    import sys

    import spurfast.evaluate as E
    terminal = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")   # a UTF-8 locale's stdout
    monkeypatch.setattr(sys, "stdout", terminal)
    if os.fsencode("x\udcff") != b"x\xff":
        pytest.skip("the file system encoding does not escape undecodable bytes")
    rows = [{"setting": "patch3-nall", "seed": 0, "method": m, "feature": "patch3", "metric": "ap", "value": v}
            for m, v in (("spurfast", 0.9), ("random", 0.1))]
    monkeypatch.setattr(E, "run_one", lambda s, seed, *a, **k: ([dict(r) for r in rows] if s.name == "patch3-nall"
                                                                 else [], []))
    out, docs = tmp_path / "bad\udcff" / "run", tmp_path / "docs"
    docs.mkdir()
    run_evaluation("tiny", out, progress=False, results_md=docs / "RESULTS.md")
    md = (out / "RESULTS.md").read_text(encoding="utf-8")
    assert f"--out '{tmp_path}/bad\\xff/run'" in md   # the byte as \xNN, the path still quoted for a shell
    assert "![average precision per setting and method](../bad\\xff/run/plots/ap.png)" in \
        (docs / "RESULTS.md").read_text(encoding="utf-8")
    terminal.flush()
    assert b"bad\\xff/run/RESULTS.md" in terminal.buffer.getvalue()


def test_a_cut_short_csv_is_named_not_a_traceback(tmp_path):
    """--from-csv on a results.csv or confirm.csv cut short mid-row: a missing field read as
    None (TypeError traceback, or the finding silently left out of the confirmation table);
    a value that is not a number named neither the file nor the line."""
    from spurfast.results_doc import write_results
    csv_path = _hand_made_results(tmp_path)
    whole = csv_path.read_text()
    csv_path.write_text(whole[:whole.rindex(",")])            # the last row loses its value
    with pytest.raises(ValueError, match=r"results\.csv: line \d+ has 6 fields, the header 7 \(cut short"):
        write_results(csv_path, None, tmp_path / "RESULTS.md")
    csv_path.write_text(whole.replace(",0.5\n", ",half\n", 1))
    with pytest.raises(ValueError, match=r"results\.csv line 2: could not convert string to float: 'half'"):
        write_results(csv_path, None, tmp_path / "RESULTS.md")
    head, rest = whole.split("\n", 1)    # a blank line before it: the file's line, not the row's number
    csv_path.write_text(head + "\n\n" + rest.replace(",0.5\n", ",half\n", 1))
    with pytest.raises(ValueError, match=r"results\.csv line 3: could not convert string to float: 'half'"):
        write_results(csv_path, None, tmp_path / "RESULTS.md")
    csv_path.write_text(whole)
    (tmp_path / "confirm.csv").write_text("setting,seed,rank,true_finding,flip_rate,control_flip_rate,p_value\n"
                                          "patch3-n150,0,1,1,0.5,0.0,1e-9\npatch3-n150,0,2\n")
    with pytest.raises(ValueError, match=r"confirm\.csv: line 3 has 3 fields, the header 7"):
        write_results(csv_path, tmp_path / "confirm.csv", tmp_path / "RESULTS.md")
    with pytest.raises(ValueError, match=r"confirm\.csv: no method, feature, metric, value column"):
        write_results(tmp_path / "confirm.csv", None, tmp_path / "RESULTS.md")   # the wrong file: KeyError


def test_an_interrupted_csv_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """results.csv was written in place: Ctrl-C mid-write left it cut short, its last value
    possibly cut mid-number (a wrong figure once regenerated)."""
    import csv as csv_mod

    from spurfast.results_doc import read_csv, write_csv
    cols = ["setting", "value"]
    write_csv(tmp_path / "results.csv", [{"setting": "a", "value": 0.125}], cols)
    calls = []

    def interrupted(self, row, real=csv_mod.DictWriter.writerow):
        calls.append(row)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(self, row)
    monkeypatch.setattr(csv_mod.DictWriter, "writerow", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_csv(tmp_path / "results.csv", [{"setting": s, "value": 0.5} for s in "bcd"], cols)
    assert read_csv(tmp_path / "results.csv") == [{"setting": "a", "value": "0.125"}]
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_the_timing_line_names_the_support_test_it_includes(tmp_path):
    """run_one times spurfast's discovery, characterisation, confirmation and (since
    spurfast+support) the training support test together: the line named the first three."""
    from spurfast.results_doc import write_csv, write_results
    cols = ["setting", "seed", "method", "feature", "metric", "value"]
    rows = [{"setting": "s", "seed": 0, "method": "spurfast", "feature": "all", "metric": "seconds", "value": 4.0}]
    for support, line in ((True, "spurfast discovery + characterisation + confirmation + training support: 4.0 s"),
                          (False, "spurfast discovery + characterisation + confirmation: 4.0 s")):   # an older CSV
        extra = [{"setting": "s", "seed": 0, "method": "spurfast+support", "feature": "all",
                  "metric": "false_findings@q0.05", "value": 0.0}] if support else []
        write_csv(tmp_path / "results.csv", rows + extra, cols)
        assert line in write_results(tmp_path / "results.csv", None, tmp_path / "RESULTS.md").read_text()


def test_per_seed_lists_follow_the_seeds_of_the_heading(tmp_path):
    """A sweep run with --seeds 2,0,1 wrote its rows in that order: the section read
    "(seeds 0, 1, 2)" and then "per seed: 0.20, 0.00, 0.10" and "hit@1 per seed [0, 1, 1]",
    seed 2's values in seed 0's place."""
    from spurfast.results_doc import write_csv, write_results
    rows = []
    for seed, ss, hit in ((2, 0.2, 0.0), (0, 0.0, 1.0), (1, 0.1, 1.0)):
        rows += [{"setting": "patch3-n150", "seed": seed, "method": m, "feature": "patch3", "metric": k, "value": v}
                 for m, k, v in (("model", "spurious_score", ss), ("spurfast", "hit@1", hit),
                                 ("spurfast", "auroc", 0.99))]
    write_csv(tmp_path / "results.csv", rows, ["setting", "seed", "method", "feature", "metric", "value"])
    md = write_results(tmp_path / "results.csv", None, tmp_path / "RESULTS.md").read_text()
    assert "## patch3-n150 (seeds 0, 1, 2)" in md
    assert "(per seed: 0.00, 0.10, 0.20)" in md and "hit@1 per seed [1, 1, 0]" in md


def test_two_evaluations_sharing_a_cache_make_each_entry_once(tmp_path, monkeypatch):
    """Two `spurfast evaluate` runs on one --cache (the committed full-surprise run used the
    full run's) both trained the same classifier and VAE (through one .ckpt.tmp, renamed away
    under the other writer), filled one store at once (the second's columns truncated the
    first's) and scored the same run twice.  Each cache entry is locked now: the second
    evaluation waits for it and reuses the first's."""
    import threading

    import torch

    import spurfast.embed as EM
    import spurfast.evaluate as E
    import spurfast.models.train as T
    from spurfast.models.classifier import build_classifier
    from spurfast.models.vae import VAE

    calls = {"classifier": 0, "vae": 0, "store": 0, "data": 0}
    count_lock = threading.Lock()

    def count(what, wait=1.0):   # the other evaluation arrives while this one makes the entry
        with count_lock:
            calls[what] += 1
        time.sleep(wait)

    def fake_classifier(*a, **k):
        count("classifier")
        torch.manual_seed(0)
        return build_classifier("small_cnn", 1, 10, 28).eval()

    def fake_vae(src, config, **k):
        count("vae")
        torch.manual_seed(0)
        return VAE(config).eval()

    real_create, real_build = EM.EmbeddingStore.create.__func__, E.build_data

    def create(cls, *a, **k):
        count("store")
        return real_create(cls, *a, **k)

    def build_data(*a, **k):
        count("data", 0)
        return real_build(*a, **k)

    monkeypatch.setattr(T, "train_classifier", fake_classifier)
    monkeypatch.setattr(T, "train_vae", fake_vae)
    monkeypatch.setattr(EM.EmbeddingStore, "create", classmethod(create))
    monkeypatch.setattr(E, "build_data", build_data)
    setting, sizes = PRESETS["tiny"]["settings"][0], PRESETS["tiny"]["sizes"]

    def together(cache, statistics):
        start, errors, out = threading.Barrier(len(statistics)), [], {}

        def one(i, st):
            try:
                start.wait()
                out[i] = E.run_one(setting, 0, sizes, cache, methods=(), statistic=st)[0]
            except BaseException as exc:   # noqa: BLE001 - reported below
                errors.append(exc)
        threads = [threading.Thread(target=one, args=(i, st), daemon=True) for i, st in enumerate(statistics)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not any(t.is_alive() for t in threads), "the two evaluations wait for each other"
        assert not errors, errors
        return out

    for k in calls:
        calls[k] = 0
    # the same run twice at once: scored once, the second reads its rows
    out = together(tmp_path / "same", ["share", "share"])
    assert calls == {"classifier": 1, "vae": 1, "store": 1, "data": 1}
    value = lambda rows: {(r["feature"], r["metric"]): r["value"] for r in rows if "seconds" not in r["metric"]}  # noqa: E731
    assert value(out[0]) == value(out[1])
    # two statistics (two runs) at once: one classifier, one VAE, one store between them
    for k in calls:
        calls[k] = 0
    together(tmp_path / "two", ["share", "surprise"])
    assert calls == {"classifier": 1, "vae": 1, "store": 1, "data": 2}


def test_what_the_end_of_a_run_needs_is_checked_before_the_sweep(tmp_path, monkeypatch):
    """run_evaluation (public API) with a misspelt statistic failed at the first discovery,
    after training; a results_md in a missing folder or naming a folder, and an existing
    RESULTS.md that is not UTF-8 (its notes are kept), failed after the whole sweep, the last
    with a UnicodeDecodeError naming no file."""
    import spurfast.evaluate as E
    ran = []
    monkeypatch.setattr(E, "run_one", lambda s, seed, *a, **k: (ran.append(seed), ([], []))[1])
    latin1 = tmp_path / "latin1"
    latin1.mkdir()
    (latin1 / "RESULTS.md").write_bytes("# old\nnotes: caf\xe9\n".encode("latin-1"))
    for kw, err, msg in ((dict(statistic="Surprise"), ValueError, "statistic must be one of .*got 'Surprise'"),
                         (dict(results_md=tmp_path / "missing" / "R.md"), FileNotFoundError,
                          f"folder {tmp_path / 'missing'} does not exist"),
                         (dict(results_md=tmp_path), IsADirectoryError, f"results_md {tmp_path} is a folder"),
                         (dict(results_md=latin1 / "RESULTS.md"), ValueError, "RESULTS.md is not UTF-8 text"),
                         (dict(out_dir=latin1), ValueError, f"{latin1 / 'RESULTS.md'} is not UTF-8 text"),
                         # a file at out_dir failed at its mkdir ("[Errno 17] File exists"); a folder at
                         # out_dir/RESULTS.md after the whole sweep, naming a temporary file
                         (dict(out_dir=latin1 / "RESULTS.md" / "x"), NotADirectoryError,
                          f"out_dir {latin1 / 'RESULTS.md' / 'x'}: {latin1 / 'RESULTS.md'} is a file, not a folder"),
                         (dict(out_dir=tmp_path), IsADirectoryError,
                          f"out_dir {tmp_path}: {tmp_path / 'RESULTS.md'} is a folder; the evaluation writes")):
        if kw.get("out_dir") == tmp_path:
            (tmp_path / "RESULTS.md").mkdir(exist_ok=True)
        with pytest.raises(err, match=msg):
            run_evaluation("tiny", **{"out_dir": tmp_path / "out", "progress": False, **kw})
        assert ran == []
    (tmp_path / "RESULTS.md").rmdir()
    run_evaluation("tiny", tmp_path / "out", progress=False, statistic="surprise", results_md=tmp_path / "R.md")
    assert ran == [0, 0] and (tmp_path / "R.md").is_file()   # both tiny settings, seed 0


def test_from_csv_names_a_results_md_that_is_not_utf8(tmp_path, capsys):
    """--from-csv --results-md FILE keeps FILE's notes: a FILE saved as Latin-1 stopped it with
    "'utf-8' codec can't decode byte 0xe9 ...", naming no file."""
    from spurfast.results_doc import write_csv
    write_csv(tmp_path / "results.csv", [{"setting": "s", "seed": 0, "method": "spurfast", "feature": "all",
                                          "metric": "false_findings@q0.05", "value": 0}],
              ["setting", "seed", "method", "feature", "metric", "value"])
    latin1 = tmp_path / "notes.md"
    latin1.write_bytes("notes: caf\xe9\n".encode("latin-1"))
    assert main(["evaluate", "--from-csv", str(tmp_path / "results.csv"), "--out", str(tmp_path / "o"),
                 "--results-md", str(latin1)]) == 2
    assert f"{latin1} is not UTF-8 text" in capsys.readouterr().err
    assert latin1.read_bytes() == "notes: caf\xe9\n".encode("latin-1")   # left as it was


def test_a_cache_on_a_file_system_without_locks_still_runs(tmp_path, monkeypatch, caplog):
    """flock raises ENOLCK / EOPNOTSUPP on some network mounts: the evaluation went on
    unlocked before the cache locks came, and must still (with a warning)."""
    import errno
    import fcntl

    from spurfast import evaluate

    def no_locks(fh, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="spurfast.evaluate"):
        with evaluate._locked(tmp_path / "entry.pt"):
            ran = True
    assert ran and "cannot lock" in caplog.text and "No locks available" in caplog.text


def test_a_results_csv_saved_by_a_spreadsheet_or_emptied_is_read_or_named(tmp_path):
    """A byte-order mark (a spreadsheet's "CSV UTF-8") became part of the first column's name:
    results.csv lost its preset, confirm.csv was "no setting column"; an empty results.csv
    gave an empty document without a word."""
    from spurfast.results_doc import write_results
    csv_path = _hand_made_results(tmp_path)
    plain = write_results(csv_path, None, tmp_path / "RESULTS.md").read_text()
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes().replace(b"\n", b"\r\n"))
    (tmp_path / "confirm.csv").write_bytes(b"\xef\xbb\xbfsetting,seed,rank,true_finding,flip_rate,control_flip_rate,"
                                           b"p_value\r\npatch3-n150,0,1,1,0.5,0.0,1e-9\r\n")
    md = write_results(csv_path, tmp_path / "confirm.csv", tmp_path / "RESULTS.md").read_text()
    assert "(preset quick)" in md and md.startswith(plain.split("## Targets")[0].split("## Overview")[0])
    assert "| patch3-n150 | 1 | true | 0.500 | 0.000 |" in md
    csv_path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"results\.csv: no setting, seed, method, feature, metric, value column"):
        write_results(csv_path, None, tmp_path / "RESULTS.md")


def test_a_row_given_twice_is_refused_not_counted_twice(tmp_path):
    """A results.csv row pasted twice (or two runs' CSVs joined) entered every mean, sum and
    "per seed" list twice; a confirm.csv row twice, the verdict counts."""
    from spurfast.results_doc import write_results
    csv_path = _hand_made_results(tmp_path)
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(lines + [lines[2]]) + "\n")
    with pytest.raises(ValueError, match=rf"results\.csv: line {len(lines) + 1} repeats line 3 \(setting "
                                         r"'patch3-n150', seed 0, method 'spurfast', feature 'patch3', metric 'hit@1'\)"):
        write_results(csv_path, None, tmp_path / "RESULTS.md")
    _hand_made_results(tmp_path)
    (tmp_path / "confirm.csv").write_text("setting,seed,rank,true_finding,flip_rate,control_flip_rate,p_value\n"
                                          + "patch3-n150,0,1,1,0.5,0.0,1e-9\n" * 2)
    with pytest.raises(ValueError, match=r"confirm\.csv: line 3 repeats line 2 \(setting 'patch3-n150', seed 0, "
                                         r"cluster rank 1\)"):
        write_results(csv_path, tmp_path / "confirm.csv", tmp_path / "RESULTS.md")


def test_residual_scan_rows_of_confirm_csv_are_their_own_family(tmp_path):
    """The residual scan's findings are ranked in their own family: its rank 1 beside the
    clusters' rank 1 is no repeat, and the verdict table gives them rows of their own."""
    from spurfast.results_doc import write_results
    csv_path = _hand_made_results(tmp_path)
    conf = tmp_path / "confirm.csv"
    conf.write_text("setting,seed,family,rank,true_finding,flip_rate,control_flip_rate,p_value\n"
                    "patch3-n150,0,cluster,1,1,0.5,0.0,1e-9\n"
                    "patch3-n150,0,residual,1,0,0.25,0.0,0.5\n"
                    "patch3-n150,0,features,1,1,0.75,0.0,1e-6\n")
    md = write_results(csv_path, conf, tmp_path / "RESULTS.md").read_text()
    assert "| patch3-n150 | 1 | true | 0.500 | 0.000 |" in md
    assert "| patch3-n150 | 1 | false (residual scan) | 0.250 | 0.000 |" in md
    assert "| patch3-n150 | 1 | true (feature view) | 0.750 | 0.000 |" in md
    assert "Rows marked *residual scan*" in md and "Rows marked *feature view*" in md
    # a family the table has no row for was left out without a word
    conf.write_text(conf.read_text().replace(",features,", ",Features,"))
    with pytest.raises(ValueError, match=r"confirm\.csv line 4: family 'Features', expected one of "
                                         r"\('cluster', 'residual', 'features'\)"):
        write_results(csv_path, conf, tmp_path / "RESULTS.md")
    conf.write_text("setting,seed,rank,true_finding,flip_rate,control_flip_rate,p_value\n"   # before the column
                    "patch3-n150,0,1,1,0.5,0.0,1e-9\n")
    md = write_results(csv_path, conf, tmp_path / "RESULTS.md").read_text()
    assert "| patch3-n150 | 1 | true | 0.500 | 0.000 |" in md and "residual scan" not in md


def test_a_hand_edited_confirm_csv_is_read_or_named(tmp_path):
    """true_finding "1.0" or " 1" (a spreadsheet's) left the finding out of the confirmation
    table and plot without a word; a value that is not a number, or a flip rate without its
    control, failed with float()'s message or a KeyError, naming no file, line or column."""
    from spurfast.results_doc import write_results
    csv_path = _hand_made_results(tmp_path)
    conf = tmp_path / "confirm.csv"
    head = "setting,seed,rank,true_finding,flip_rate,control_flip_rate,p_value,content_flip_rate,content_p_value\n"
    conf.write_text(head + "patch3-n150,0,1,1.0,0.5,0.0,1e-9,,\npatch3-n150,1,1, 1 ,0.3,0.1,1e-3,,\n")
    md = write_results(csv_path, conf, tmp_path / "RESULTS.md").read_text()
    assert "| patch3-n150 | 2 | true | 0.400 | 0.050 |" in md
    for row, msg in (("patch3-n150,0,1,yes,0.5,0.0,1e-9,,", r"line 2: true_finding 'yes', expected 0 or 1"),
                     ("patch3-n150,0,1,1,0.5,n/a,1e-9,,", r"line 2: control_flip_rate 'n/a' is not a number"),
                     ("patch3-n150,0,1,1,0.5,,1e-9,,", r"line 2: no control_flip_rate beside its flip_rate"),
                     ("patch3-n150,0,1,1,0.5,0.0,1e-9,,0.3", r"line 2: no content_flip_rate beside its content_p_value")):
        conf.write_text(head + row + "\n")
        with pytest.raises(ValueError, match=r"confirm\.csv " + msg):
            write_results(csv_path, conf, tmp_path / "RESULTS.md")


def test_an_infinite_ap_is_left_out_of_the_ap_target_as_of_the_tables(tmp_path):
    """The tables leave a non-finite value out (`_agg`); the AP target line took the nanmean,
    which keeps an inf: "spurfast inf vs best baseline pixels inf ... -> ties", said to be the
    "means over the seeds with an AP"."""
    from spurfast.results_doc import write_results
    csv_path = _hand_made_results(tmp_path)
    text = csv_path.read_text().splitlines()
    edited = [ln.rsplit(",", 1)[0] + ",inf" if ln.startswith("quick,patch3-n150,0,") and ln.endswith(",ap,0.95")
              or ln.startswith("quick,patch3-n150,0,pixels,patch3,ap,") else ln for ln in text]
    csv_path.write_text("\n".join(edited) + "\n")
    md = write_results(csv_path, None, tmp_path / "RESULTS.md").read_text()
    (ln,) = [ln for ln in md.splitlines() if ln.startswith("- AP `patch3-n150`")]
    assert ln == ("- AP `patch3-n150` / patch3: spurfast 0.950 vs best baseline pixels 0.900 (spurious score 0.50) "
                  "-> beats every baseline (means over the seeds with an AP: n/a in seed 0)"), ln


def test_residual_rows_get_their_own_ap_target_line(tmp_path):
    """evaluate --residual-scan: spurfast+residual is judged against the baselines beside
    spurfast (a results.csv without it reads as before)."""
    from spurfast.results_doc import write_results
    csv_path = _hand_made_results(tmp_path)
    before = write_results(csv_path, None, tmp_path / "before.md").read_text()
    text = csv_path.read_text().splitlines()
    extra = [ln.replace(",spurfast,", ",spurfast+residual,", 1).rsplit(",", 1)[0] + ",0.99"
             for ln in text if ",spurfast,patch3,ap," in ln]
    csv_path.write_text("\n".join(text + extra) + "\n")
    md = write_results(csv_path, None, tmp_path / "RESULTS.md").read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("- AP `patch3-n150`")]
    assert [ln for ln in before.splitlines() if ln.startswith("- AP `patch3-n150`")] == lines[:1]
    assert lines[1] == ("- AP `patch3-n150` / patch3: spurfast+residual 0.990 vs best baseline pixels 0.900 "
                        "(spurious score 0.50) -> beats every baseline"), lines


def test_every_row_of_spurfast_is_counted_against_the_baselines(tmp_path):
    """The Targets judged spurfast+residual+confirm's AP setting by setting and never
    spurfast+confirm's: the filtered rows (confirmed, supported) are now counted, wins /
    ties / losses, beside the rankers' per-setting lines."""
    from spurfast.results_doc import write_results
    csv_path = _hand_made_results(tmp_path)
    text = [ln.rsplit(",", 1)[0] + ",0.5" if ",spurfast+confirm,patch3,ap," in ln else ln
            for ln in csv_path.read_text().splitlines()]   # a loss against pixels' 0.9
    extra = []
    for m, v in (("spurfast+residual", "0.99"), ("spurfast+residual+confirm", "0.9")):
        extra += [ln.replace(",spurfast,", f",{m},", 1).rsplit(",", 1)[0] + "," + v
                  for ln in text if ",spurfast,patch3,ap," in ln]
    csv_path.write_text("\n".join(text + extra) + "\n")
    md = write_results(csv_path, None, tmp_path / "RESULTS.md").read_text()
    per_setting = [ln.split(": ", 1)[1].split(" ", 1)[0] for ln in md.splitlines() if ln.startswith("- AP `")]
    assert per_setting == ["spurfast", "spurfast+residual"], per_setting
    counted = [ln for ln in md.splitlines() if ln.startswith("- AP against the best baseline over")]
    assert counted == [f"- AP against the best baseline over the 1 setting-pattern pair, {m}: {w}"
                       for m, w in (("spurfast", "1 wins, 0 ties, 0 losses"),
                                    ("spurfast+confirm", "0 wins, 0 ties, 1 losses"),
                                    ("spurfast+residual", "1 wins, 0 ties, 0 losses"),
                                    ("spurfast+residual+confirm", "0 wins, 1 ties, 0 losses"))], counted


def test_a_timing_json_without_the_cpu_figures_leaves_their_line_out(tmp_path):
    """--from-csv beside a timing.json holding the wall time and command only (hand-edited,
    or a run whose os.cpu_count() was None): KeyError 'cpu_s' after the CSVs were read."""
    from spurfast.results_doc import write_results
    csv_path = _hand_made_results(tmp_path)
    for timing in ({"wall_s": 60.0, "command": "spurfast evaluate"}, {"wall_s": 60.0, "cpu_s": 120.0, "cpus": None,
                                                                      "load_at_start": 1.0, "load_at_end": 2.0}):
        md = write_results(csv_path, None, tmp_path / "RESULTS.md", wall_s=60.0, timing=timing).read_text()
        assert "Wall time of the run that wrote it: 1.0 min" in md and "CPU time" not in md


def test_run_evaluation_refuses_a_results_md_that_is_one_of_its_outputs(tmp_path, monkeypatch):
    """The CLI refused --results-md OUT/results.csv; run_evaluation (public API) wrote the
    tables over the results.csv (or timing.json) it had just written."""
    import spurfast.evaluate as E
    ran = []
    monkeypatch.setattr(E, "run_one", lambda s, seed, *a, **k: (ran.append(seed), ([], []))[1])
    out = tmp_path / "out"
    out.mkdir()
    for name in ("results.csv", "timing.json"):
        with pytest.raises(FileExistsError, match=f"results_md .*{name} is the evaluation's {name}"):
            run_evaluation("tiny", out, progress=False, results_md=out / ".." / "out" / name)
    assert ran == []


def test_a_seed_without_a_row_reads_nan_in_its_place_not_the_next_seeds_value(tmp_path):
    """A hand-edited CSV without seed 1's spurious score listed "per seed: 0.00, 0.20" under
    "(seeds 0, 1, 2)" (seed 2's value in seed 1's place); a recall target missing seed 1 read
    "met" on the other two; and a strong pattern whose AUROC rows were deleted read "not
    decided" though a hit@1 of 0 already failed it."""
    from spurfast.results_doc import write_csv, write_results
    rows = []
    for seed in (0, 1, 2):
        if seed != 1:
            rows.append({"setting": "patch3-n150", "seed": seed, "method": "model", "feature": "patch3",
                         "metric": "spurious_score", "value": 0.1 * seed})
            rows.append({"setting": "multi3-n100", "seed": seed, "method": "spurfast", "feature": "all",
                         "metric": "recall@q0.1", "value": 1.0})
        rows.append({"setting": "patch3-n150", "seed": seed, "method": "spurfast", "feature": "patch3",
                     "metric": "hit@1", "value": float(seed > 0)})
        rows.append({"setting": "multi3-n100", "seed": seed, "method": "model", "feature": "all",
                     "metric": "seconds_models", "value": 1.0})
    write_csv(tmp_path / "results.csv", rows, ["setting", "seed", "method", "feature", "metric", "value"])
    md = write_results(tmp_path / "results.csv", None, tmp_path / "RESULTS.md").read_text()
    assert "(n/a in 1 of 3 seeds) (per seed: 0.00, nan, 0.20)" in md
    assert "`multi3-n100`: recall at q=0.1 per seed [1.0, nan, 1.0] -> target (>= 2/3) not decided" in md
    assert "`patch3-n150`, spurfast: hit@1 per seed [0, 1, 1]" in md
    assert "AUROC >= 0.95) NOT met" in md


def test_the_notes_survive_a_run_killed_between_the_tables_and_the_notes(tmp_path):
    """write_results wrote RESULTS.md without its notes and write_with_notes put them back
    from memory: killed between the two (or a full disk mid-write), a hundred hand-written
    lines were gone."""
    from spurfast.results_doc import NOTES, write_results
    csv_path = _hand_made_results(tmp_path)
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# old tables\n\n{NOTES}\nhand-written: café\n", encoding="utf-8")
    write_results(csv_path, None, md)   # ... and killed here, before write_with_notes
    text = md.read_text(encoding="utf-8")
    assert text.endswith(f"{NOTES}\nhand-written: café\n") and "# old tables" not in text
    assert text.count(NOTES) == 1


def test_a_timing_json_whose_wall_time_is_text_leaves_its_line_out(tmp_path):
    """A hand-edited timing.json with "wall_s": "600" gave a TypeError traceback from
    `--from-csv` after the CSVs were read (the CPU line already left such values out)."""
    import json
    csv_path = _hand_made_results(tmp_path)
    (tmp_path / "timing.json").write_text(json.dumps({"wall_s": "600", "command": "spurfast evaluate --preset quick"}))
    assert main(["evaluate", "--from-csv", str(csv_path), "--out", str(tmp_path / "o")]) == 0
    md = (tmp_path / "o" / "RESULTS.md").read_text()
    assert "Command: `spurfast evaluate --preset quick`" in md and "Wall time" not in md


def test_a_seed_without_a_row_is_said_in_the_tables_means_too(tmp_path):
    """The per-setting tables took the mean of the rows present: without seed 1's spurfast
    AP row (a hand-edited CSV) the table read "0.950 ± 0.000" under "(seeds 0, 1, 2)", a mean
    over two seeds with nothing said, where the lists and targets say n/a."""
    from spurfast.results_doc import write_csv, write_results
    csv_path = _hand_made_results(tmp_path)
    rows = _rows(csv_path)
    rows = [r for r in rows if not (r["seed"] == "1" and r["method"] == "spurfast"
                                    and r["metric"] in ("ap", "false_findings@q0.05"))]
    write_csv(csv_path, rows, list(rows[0]))
    md = write_results(csv_path, None, tmp_path / "RESULTS.md").read_text()
    (row,) = [ln for ln in md.splitlines() if ln.startswith("| patch3 | spurfast |")]
    assert row.split(" | ")[4] == "0.950 ± 0.000 (n/a in 1 of 3 seeds)", row
    (row,) = [ln for ln in md.splitlines() if ln.startswith("| spurfast |") and "(sum" in ln]
    assert "0.000 ± 0.000 (n/a in 1 of 3 seeds) (sum 0)" in row, row
    (row,) = [ln for ln in md.splitlines() if ln.startswith("| patch3 | pixels |")]
    assert "n/a" not in row   # a method with every seed's row: as before


def test_a_csv_that_is_not_utf8_is_named(tmp_path, capsys):
    """A results.csv or confirm.csv saved in a legacy encoding (a spreadsheet's "CSV", cp1252)
    stopped --from-csv with "'utf-8' codec can't decode byte 0xe9 ...", naming no file: with
    confirm.csv, read beside the results.csv given, the user could not tell which."""
    csv_path = _hand_made_results(tmp_path)
    conf = tmp_path / "confirm.csv"
    conf.write_bytes("setting,seed,rank,true_finding,flip_rate,control_flip_rate,p_value\n"
                     "patch3-n150 café,0,1,1,0.5,0.0,1e-9\n".encode("cp1252"))
    assert main(["evaluate", "--from-csv", str(csv_path), "--out", str(tmp_path / "o")]) == 2
    assert f"{conf} is not UTF-8 text" in capsys.readouterr().err
    conf.unlink()
    csv_path.write_bytes(csv_path.read_bytes().replace(b"patch3-n150", "patch3-n150 é".encode("cp1252")))
    assert main(["evaluate", "--from-csv", str(csv_path), "--out", str(tmp_path / "o")]) == 2
    assert f"{csv_path} is not UTF-8 text" in capsys.readouterr().err


@pytest.mark.parametrize("cached", [[], {"rows": []}, {"rows": [1], "confirm": []}, {"rows": [], "confirm": [2]}])
def test_a_cached_run_file_of_another_shape_is_run_again(tmp_path, monkeypatch, caplog, cached):
    """A runs/*.json holding valid JSON that is not {"rows": [...], "confirm": [...]} (hand-edited,
    damaged) gave a KeyError / TypeError naming no file; it is scored again, as unreadable JSON is."""
    import json

    import spurfast.evaluate as E

    setting, sizes = PRESETS["tiny"]["settings"][0], PRESETS["tiny"]["sizes"]
    (tmp_path / "runs").mkdir()
    rfile = tmp_path / "runs" / f"{setting.name}-s0-{E.run_key(setting, 0, sizes)}.json"
    rfile.write_text(json.dumps(cached))

    class Rerun(Exception):
        pass

    monkeypatch.setattr(E, "build_data", lambda *a: (_ for _ in ()).throw(Rerun()))
    with pytest.raises(Rerun):
        E.run_one(setting, 0, sizes, tmp_path)
    assert str(rfile) in caplog.text


def test_from_csv_warns_of_a_results_csv_left_beside_another_sweeps_confirm_csv(tmp_path, monkeypatch, caplog):
    """run_evaluation writes results.csv, confirm.csv and timing.json one after another: a kill
    between them left a new results.csv beside the previous sweep's confirm.csv (and timing.json),
    and --from-csv showed that sweep's confirmation table and command without a word."""
    import spurfast.evaluate as E
    import spurfast.results_doc as RD

    def sweep(value):
        monkeypatch.setattr(E, "run_one", lambda s, seed, *a, **k: (
            [{"setting": s.name, "seed": seed, "method": "spurfast", "feature": "p", "metric": "ap", "value": value}],
            [{"setting": s.name, "seed": seed, "rank": 1, "class": 3, "q_value": 0.01, "true_finding": 1,
              "flip_rate": value, "control_flip_rate": 0.0, "p_value": 0.001, "confirmed": 1}]))
        run_evaluation("tiny", out, progress=False, only="^clean", seeds=[0])

    out = tmp_path / "out"
    sweep(0.5)
    caplog.clear()
    assert main(["evaluate", "--from-csv", str(out / "results.csv"), "--out", str(tmp_path / "a")]) == 0
    assert "another sweep" not in caplog.text   # a whole sweep's files: nothing to say
    real = RD.write_csv

    def killed_at(name, write):   # the sweep is killed as it comes to write ``name``
        def at(path, *a, **k):
            if Path(path).name == name:
                raise KeyboardInterrupt
            write(path, *a, **k)
        return at

    monkeypatch.setattr(E, "write_csv", killed_at("confirm.csv", real))   # after its results.csv
    with pytest.raises(KeyboardInterrupt):
        sweep(0.75)
    caplog.clear()
    assert main(["evaluate", "--from-csv", str(out / "results.csv"), "--out", str(tmp_path / "b")]) == 0
    assert f"{out / 'results.csv'} is not the results.csv written with {out / 'confirm.csv'}" in caplog.text
    # killed after both CSVs, before timing.json: its command and times are the earlier sweep's
    monkeypatch.setattr(E, "write_csv", real)
    real_json = E._write_json
    monkeypatch.setattr(E, "_write_json", killed_at("timing.json", real_json))
    with pytest.raises(KeyboardInterrupt):
        sweep(0.25)
    caplog.clear()
    assert main(["evaluate", "--from-csv", str(out / "results.csv"), "--out", str(tmp_path / "c")]) == 0
    assert f"timing.json) was written by another sweep than {out / 'results.csv'} and" in caplog.text
    monkeypatch.setattr(E, "_write_json", real_json)   # a whole sweep again: nothing to say
    sweep(0.25)
    caplog.clear()
    assert main(["evaluate", "--from-csv", str(out / "results.csv"), "--out", str(tmp_path / "d")]) == 0
    assert "another sweep" not in caplog.text and "not the" not in caplog.text
    for name in ("results.csv", "confirm.csv"):   # checked out by git with LF line ends: the same files
        (out / name).write_bytes((out / name).read_bytes().replace(b"\r\n", b"\n"))
    caplog.clear()
    assert main(["evaluate", "--from-csv", str(out / "results.csv"), "--out", str(tmp_path / "e")]) == 0
    assert "another sweep" not in caplog.text and "not the" not in caplog.text


def test_plants_and_settings_are_checked_when_made():
    """A setting with no plants divided by zero in build_data; an n of 'abc' failed there in
    int()'s words, naming neither the plant nor the setting."""
    from spurfast.evaluate import Plant, Setting

    with pytest.raises(ValueError, match=r"setting 'none' has no plants"):
        Setting("none", ())
    for n in ("abc", "-3", -3, 2.5, True, None):
        with pytest.raises(ValueError, match=r"Plant 'bar': n must be a count .* or 'all', got"):
            Plant("bar", 3, n)
    for cls in (-1, 10, 3.0, "3"):
        with pytest.raises(ValueError, match=r"Plant 'bar': target_class must be a class index in 0\.\.9"):
            Plant("bar", cls, "10")
    assert Plant("bar", np.int64(3), 100).n == "100" and Plant("bar", 9, "all").n == "all"
    # one cache key per count, however it is spelt
    from spurfast.evaluate import PRESETS, run_key
    sizes = PRESETS["quick"]["sizes"]
    keys = {run_key(Setting("s", (Plant("patch3", 3, n),)), 0, sizes) for n in (150, "150", "0150", np.int64(150))}
    assert len(keys) == 1, keys
    # ... class and strength too (np.int64(3) and 3, 1 and 1.0 were two keys: models trained twice)
    keys = {run_key(Setting("s", (Plant("noise", c, "150", st),)), 0, sizes)
            for c in (3, np.int64(3)) for st in (1, 1.0, np.float32(1.0))}
    assert len(keys) == 1, keys
    assert keys == {run_key(Setting("s", (Plant("noise", 3, "150", 1.0),)), 0, sizes)}   # the presets' keys kept
    with pytest.raises(ValueError, match="unknown pattern family 'patch4'"):
        Plant("patch4", 3, "10")
    with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\], got '0.5'"):
        Plant("noise", 3, "10", "0.5")
    # names the run's cache files: "a/b" failed to write them after all the work
    for name in ("a/b", "", "a\\b"):
        with pytest.raises(ValueError, match="must be a non-empty name without"):
            Setting(name, (Plant("bar", 3, "10"),))
    with pytest.raises(ValueError, match=r"unknown pool 'digit'; expected one of"):
        Setting("s", (Plant("bar", 3, "10"),), pool="digit")
    # one finding matched both plants of one class (hit@1 and recall for two features); two plants of
    # one label wrote colliding rows that read_results refused after the whole sweep
    with pytest.raises(ValueError, match=r"plants patch3 and bar share the target class 3; give each plant its own class"):
        Setting("s", (Plant("patch3", 3, "10"), Plant("bar", 3, "10")))
    with pytest.raises(ValueError, match=r"plants patch3 and patch3 share the label 'patch3'"):
        Setting("s", (Plant("patch3", 3, "10"), Plant("patch3", 7, "10")))
    Setting("s", (Plant("patch3", 3, "10"), Plant("bar", 7, "10")))


def test_a_pattern_stamped_at_random_places_has_no_mask_to_score():
    """Its mask was one random spot, while each image got its own: a perfect extractor scored
    IoU 0 against it (the pipeline's own ground truth already had none)."""
    from spurfast.evaluate import Plant, Setting, Sizes, build_data

    sizes = Sizes(n_train=60, n_suspect=100, pool_max=300, n_clean=100, pool_fraction=0.15)
    data = build_data(Setting("rand", (Plant("patch3", 3, "20", position="random"),), pool="digits-self"), 0, sizes)
    assert data.features[0].mask is None
    data = build_data(Setting("fixed", (Plant("patch3", 3, "20"),), pool="digits-self"), 0, sizes)
    assert data.features[0].mask is not None and int(data.features[0].mask.sum()) == 9


def test_a_digits_self_pool_with_every_digit_in_training_is_refused():
    # at the full preset's sizes (1,200 per class; digits have 174-183) the pool came out empty
    from spurfast.evaluate import Plant, Setting, Sizes, build_data

    setting = Setting("s", (Plant("patch3", 3, "20"),), pool="digits-self")
    with pytest.raises(ValueError, match=r"n_train below 174 .*got 1200"):
        build_data(setting, 0, Sizes())
    data = build_data(setting, 0, Sizes(n_train=170, n_suspect=100, pool_max=300))
    assert data.unrelated_n > 0


def test_a_mistyped_fashion_mnist_folder_is_named_not_blamed_on_debian(monkeypatch):
    # the evaluation said "Fashion-MNIST is not installed (/usr/share/...)" whatever was wrong
    from spurfast.evaluate import Sizes, _base_images

    monkeypatch.setenv("SPURFAST_FASHION_MNIST", "/no/such/folder")
    with pytest.raises(FileNotFoundError, match=r"/no/such/folder.*SPURFAST_FASHION_MNIST names that folder.*'tiny'"):
        _base_images("fashion-mnist", 0, Sizes())


def test_three_pattern_settings_stamp_disjoint_places():
    """The three weaker patterns are three shortcuts, not one: the bar (class 7) covered 6 of the
    3x3 patch's (class 3) 9 pixels until it moved to the left edge.  The full-frame noise
    (class 9) overlaps everything by nature; the localised patterns must not overlap each other."""
    from spurfast.evaluate import _multi, _spec
    from spurfast.plant import fixed_mask
    for n in ("100", "1000"):
        plants = _multi(n)
        masks = {p.family: fixed_mask(_spec(p, 0), (1, 28, 28)) for p in plants if p.family != "noise"}
        assert set(masks) == {"patch3", "bar"}
        assert int((masks["patch3"] & masks["bar"]).sum()) == 0
        assert int(masks["bar"][:, :14].sum()) == int(masks["bar"].sum()) == 28   # 14 x 2 at the left edge


def test_plant_position_stays_out_of_the_keys_at_its_default():
    """Plants written before `position` existed keep their cache keys (and cached models)."""
    from spurfast.evaluate import Plant, Setting, run_key
    assert Plant("bar", 7, "100").key() == {"family": "bar", "target_class": 7, "n": "100", "strength": 1.0}
    assert Plant("bar", 7, "100", position="bottom_left").key()["position"] == "bottom_left"
    sizes = PRESETS["quick"]["sizes"]
    left, right = (run_key(Setting("s", (Plant("bar", 7, "100", position=pos),)), 0, sizes)
                   for pos in ("bottom_left", "bottom_right"))
    assert left != right and right == run_key(Setting("s", (Plant("bar", 7, "100"),)), 0, sizes)
    with pytest.raises(ValueError, match="unknown position 'middle'"):
        Plant("bar", 7, "100", position="middle")


def test_a_rerun_removes_what_writers_killed_mid_write_left(tmp_path, monkeypatch):
    # kill -9 (or a default SIGTERM) mid-write left NAME.PID.tmp in --out and the cache's runs for
    # good; a live writer's (another evaluation sharing the cache) must stay
    import spurfast.evaluate as E
    monkeypatch.setattr(E, "run_one", lambda s, seed, *a, **k: ([], []))
    out, runs = tmp_path / "out", tmp_path / "out" / "cache" / "runs"
    runs.mkdir(parents=True)
    dead = 2 ** 22 + 12345   # above Linux's pid_max default: no such process
    for p in (out / f"results.csv.{dead}.tmp", runs / f"clean-model-s0-abc.json.{dead}.tmp",
              runs / f"clean-model-s0-abc.json.{os.getpid()}.tmp", out / "notes.txt", out / f"notes.txt.{dead}.tmp"):
        p.write_text("x")
    run_evaluation("tiny", out, seeds=[0], progress=False)
    assert not (out / f"results.csv.{dead}.tmp").exists() and not (runs / f"clean-model-s0-abc.json.{dead}.tmp").exists()
    assert (runs / f"clean-model-s0-abc.json.{os.getpid()}.tmp").exists() and (out / "notes.txt").exists()
    assert (out / f"notes.txt.{dead}.tmp").exists()   # not a name the evaluation writes: not its to remove


def test_a_cut_short_cached_vae_is_named_with_its_fix(tmp_path):
    # it said "not a VAE checkpoint written by `spurfast train-vae`" (evaluate wrote it) and gave no
    # fix; a cut-short cached classifier already said to delete it
    import torch

    import spurfast.evaluate as E
    from spurfast.data import ArraySource
    from spurfast.models import SmallCNN
    from spurfast.models.files import save_vae
    from spurfast.models.vae import VAE, VAEConfig

    images = ArraySource(torch.rand(8, 1, 8, 8), np.arange(8) % 2)
    data = E.RunData(train=images, pool=images, unrelated_n=8, suspect=np.zeros(8, bool), features=[], specs=[],
                     clean=images, pool_key="p", train_key="t")
    sizes = E.Sizes(vae_epochs=1, latent_dim=4)
    (tmp_path / "classifiers").mkdir()
    torch.save(SmallCNN(1, 10, 8).state_dict(), tmp_path / "classifiers" / "t.pt")
    vkey = E._key({"pool": "p", "epochs": 1, "latent": 4})
    (tmp_path / "vaes").mkdir()
    save_vae(VAE(VAEConfig.for_images(1, 8, 4)), tmp_path / "vaes" / f"{vkey}.pt")
    whole = (tmp_path / "vaes" / f"{vkey}.pt").read_bytes()
    (tmp_path / "vaes" / f"{vkey}.pt").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match=rf"cached VAE .*{vkey}\.pt cannot be read \(.*\); delete it and the next run "
                                         r"retrains it"):
        E._models(data, 0, sizes, tmp_path, progress=False)


def test_the_look_alike_null_has_runs_of_its_own_and_the_label_nulls_keep_their_keys(tmp_path):
    from spurfast.evaluate import run_key
    setting, sizes = PRESETS["tiny"]["settings"][0], PRESETS["tiny"]["sizes"]
    assert run_key(setting, 0, sizes) == run_key(setting, 0, sizes, null="label")   # cached runs stay valid
    assert run_key(setting, 0, sizes, null="look-alike") != run_key(setting, 0, sizes)
    with pytest.raises(ValueError, match="null must be one of"):
        run_evaluation("tiny", tmp_path / "out", null="lookalike")
    assert not (tmp_path / "out").exists()   # refused before the sweep


def test_the_full_grids_single_pixel_lies_where_no_fashion_mnist_image_is_white():
    """At the bottom right, (26, 26), 101 of Fashion-MNIST's 60,000 training images are white
    already (Bags, Ankle boots): 18-28 training images of other classes carried the "shortcut"
    beside the few stamped, and pool images showed it without counting as carriers."""
    import torch

    from spurfast.data import load_fashion_mnist
    from spurfast.data.builtin import find_fashion_mnist
    from spurfast.evaluate import _grid_full
    from spurfast.plant import PatternSpec, fixed_mask

    pixels = [p for s in _grid_full() for p in s.plants if p.family == "pixel"]
    assert len(pixels) == 4 and {p.position for p in pixels} == {"top_left"}
    if find_fashion_mnist() is None:
        pytest.skip("Fashion-MNIST is not installed (dataset-fashion-mnist)")
    images = load_fashion_mnist("train").get_batch(range(60000))[0]
    mask = fixed_mask(PatternSpec("pixel", position="top_left"), images.shape[1:])
    assert int((images[:, 0][:, mask] >= 1.0).all(1).sum()) == 0
    old = fixed_mask(PatternSpec("pixel"), images.shape[1:])
    assert int((images[:, 0][:, old] >= 1.0).all(1).sum()) == 101   # the position it replaced
