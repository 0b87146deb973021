"""The HTML report's confirmation sentence, from hand-made findings."""
import os
import threading

import pytest
import torch

from spurfast.confirm import VERDICTS
from spurfast.report import plot_scores, save_image, write_report


def _doc(confirm):
    finding = {"rank": 1, "class": 3, "class_name": "Dress", "cluster": 0, "size": 12, "score": 5.0, "p_value": 0.01,
               "q_value": 0.02, "members": list(range(12)), "exemplars": [0, 1], "confirm": confirm, "images": {}}
    return {"schema": 1, "spurfast_version": "test", "config": {"discover": {"fdr": 0.05}},
            "pool": {"n": 100, "n_unrelated": 90, "n_suspect": 10}, "findings": [finding]}


NOISE = {"flip_rate": 1.0, "control_flip_rate": 0.99, "p_value": 0.12, "content_flip_rate": 0.0,
         "content_p_value": 1e-30, "q_value": 0.12}


def test_not_specific_says_what_the_smooth_control_showed(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    html = write_report(_doc(dict(NOISE, smooth_flip_rate=1.0, smooth_p_value=1.0)), tmp_path / "a").read_text()
    assert "not confirmed" in html and VERDICTS["not_specific"] in html
    assert "smooth random fields of the same size there flip 100.0%" in html
    assert "it reacts to any change of this size there" in html
    html = write_report(_doc(dict(NOISE, smooth_flip_rate=0.05, smooth_p_value=1e-20)), tmp_path / "b").read_text()
    assert "the model reacts to the pattern's texture, not its exact values" in html


def test_confirmed_finding_shows_its_adjusted_q_value(tmp_path):
    cf = {"flip_rate": 0.5, "control_flip_rate": 0.01, "p_value": 1e-9, "content_flip_rate": 0.02,
          "content_p_value": 1e-8, "q_value": 2e-8}
    html = write_report(_doc(cf), tmp_path).read_text()
    assert "<b>confirmed shortcut</b>" in html and "q = 2e-08 over this run's latent-cluster findings" in html


def test_each_family_is_said_with_its_own_search_and_level(tmp_path):
    # a feature-view finding's confirmation q "over this run's findings" ran over the view's alone;
    # the heading gave the clusters' level to a residual-scan finding kept at its own, and the
    # explanation above them described the scan's findings in the clusters' terms
    cf = {"flip_rate": 0.5, "control_flip_rate": 0.01, "p_value": 1e-9, "q_value": 2e-8}
    doc = _doc(cf)
    doc["findings"][0]["view"] = "features"
    (tmp_path / "a").mkdir()
    html = write_report(doc, tmp_path / "a").read_text()
    assert "q = 2e-08 over this run's feature-view findings" in html
    doc = _doc(None)
    doc["config"]["inputs"] = {"residual_scan": {"fdr": 0.99}}
    doc["findings"][0].update(kind="residual", peak=[3, 4], peak_t=5.0)
    (tmp_path / "b").mkdir()
    html = write_report(doc, tmp_path / "b").read_text()
    assert "<h2>Findings (0 at q &le; 0.05, 1 of the residual scan at q &le; 0.99)</h2>" in html
    assert "the residual scan's findings have a test of their own" in html
    doc["config"]["inputs"]["residual_scan"]["fdr"] = 0.05   # one level: said once
    (tmp_path / "c").mkdir()
    assert "<h2>Findings (1 at q &le; 0.05)</h2>" in write_report(doc, tmp_path / "c").read_text()


def test_the_report_says_what_a_score_sums(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    html = write_report(_doc(None), tmp_path / "a").read_text()   # no statistic recorded: the share
    assert "the share of the member&#x27;s unrelated latent neighbours" in html
    doc = _doc(None)
    doc["config"]["discover"]["statistic"] = "surprise"
    assert "the chance that so many" in write_report(doc, tmp_path / "b").read_text()


def test_a_run_without_its_images_folder_still_reports(tmp_path):
    """The images folder is made for the score plot; a finding's missing PNGs are named, not broken links."""
    doc = _doc(None)
    doc["findings"][0]["images"] = {"centroid": "images/finding1_centroid.png", "grid": "images/finding1_grid.png"}
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "finding1_grid.png").write_bytes(b"\x89PNG\r\n\x1a\npng")
    html = write_report(doc, tmp_path).read_text()
    assert "<img src='data:image/png;base64,iVBORw0KGgpwbmc=' alt='exemplars' title='images/finding1_grid.png'>" in html
    assert "title='images/finding1_centroid.png'" not in html and "images/finding1_centroid.png is missing" in html
    clusters = [{"score": 5.0, "q_value": 0.02}, {"score": 1.0, "q_value": 0.9}]
    html = write_report(doc, tmp_path / "fresh", clusters=clusters).read_text()
    assert (tmp_path / "fresh" / "images" / "scores.png").is_file() and "title='images/scores.png'" in html


def test_the_report_page_alone_holds_its_pictures(tmp_path):
    """DESIGN.md: a self-contained report.  Every picture is a data URI, none a link to a
    file next to the page (a copied report.html lost them all)."""
    import re
    doc = _doc(None)
    doc["findings"][0]["images"] = {"mask": "images/finding1_mask.png"}
    (tmp_path / "images").mkdir()
    png = (tmp_path / "images" / "finding1_mask.png")
    from PIL import Image
    Image.new("L", (4, 4), 255).save(png)
    html = write_report(doc, tmp_path, clusters=[{"score": 5.0, "q_value": 0.02}]).read_text()
    srcs = re.findall(r"<img src='([^']*)'", html)
    assert len(srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in srcs), srcs
    import base64
    assert base64.b64decode(srcs[1].split(",", 1)[1]) == png.read_bytes()


def test_summary_values_without_meaning_read_n_a(tmp_path):
    html = write_report(_doc(None), tmp_path, summary={"top finding is planted class": None}).read_text()
    assert "<th>top finding is planted class</th><td>n/a</td>" in html


def test_a_report_into_a_folder_that_does_not_exist_yet(tmp_path):
    """With clusters the folder was made for their plot; without them the page had nowhere to go."""
    path = write_report(_doc(None), tmp_path / "new" / "run")
    assert path == tmp_path / "new" / "run" / "report.html" and path.is_file()


def test_the_score_plot_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    """A notebook calling the API kept its own backend (inline plots) after a run."""
    import matplotlib
    from matplotlib import pyplot as plt

    before = matplotlib.get_backend()
    plt.switch_backend("svg")
    try:
        plot_scores([{"score": 5.0, "q_value": 0.02}, {"score": 1.0, "q_value": 0.9}], 0.05, tmp_path / "s.png")
        assert matplotlib.get_backend() == "svg" and (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        plt.switch_backend(before)


def test_a_confirmation_without_the_content_control_says_so(tmp_path):
    """The page said "more than both controls" where only the random one had run (no image
    of the class outside the findings and the suspect samples, e.g. a `spurfast plant` pool)."""
    cf = {"flip_rate": 0.6, "control_flip_rate": 0.01, "p_value": 1e-9, "q_value": 1e-8, "verdict": "confirmed",
          "content_skipped": "no image of class 3 to compare with outside the findings and the suspect samples"}
    html = write_report(_doc(cf), tmp_path).read_text()
    assert "more than both controls" not in html
    assert "genuine class content was not tested: no image of class 3 to compare with" in html


def test_names_that_are_not_utf8_are_spelled_out_not_fatal(tmp_path):
    """A class folder or file whose name is not UTF-8 reads with surrogate escapes
    ('caf\\udce9'); writing the page raised UnicodeEncodeError (`spurfast report` too)."""
    doc = _doc(None)
    doc["findings"][0]["class_name"] = "caf\udce9 <b>"
    html = write_report(doc, tmp_path, bad_files={"dir/caf\udce9.png": "cannot identify image"},
                        summary={"dataset": "x\ud800"}).read_text(encoding="utf-8")
    assert "class 3 (caf\\xe9 &lt;b&gt;)" in html and "<code>dir/caf\\xe9.png</code>" in html
    assert "<td>x\\ud800</td>" in html


def test_no_effect_without_the_content_control_claims_no_content_comparison(tmp_path):
    """'no more than random patterns or genuine class content' claimed a content test that
    did not run (no image of the class to compare with), as "both controls" did."""
    cf = {"flip_rate": 0.0, "control_flip_rate": 0.0, "p_value": 1.0, "q_value": 1.0, "verdict": "no_effect",
          "content_skipped": "no image of class 3 to compare with"}
    html = write_report(_doc(cf), tmp_path).read_text()
    assert "not confirmed (the pattern does not move the model significantly more than random patterns; genuine " \
           "class content was not tested: no image of class 3 to compare with)" in html
    assert VERDICTS["no_effect"] not in html


def test_a_document_spurfast_did_not_write_is_named_not_a_traceback(tmp_path):
    """`spurfast report --run DIR` on another tool's findings.json ended in a KeyError
    (or TypeError) traceback that named neither the file nor what it lacked."""
    import pytest
    for doc, says in (([1], "is a JSON list"), ({"findings": []}, "it lacks schema, spurfast_version, config, pool"),
                      (dict(_doc(None), pool=[]), "its config or pool is no object")):
        with pytest.raises(ValueError, match="findings document of .* \\(findings.json\\)") as err:
            write_report(doc, tmp_path)
        assert says in str(err.value)
    doc = _doc(None)
    del doc["findings"][0]["score"]
    with pytest.raises(ValueError, match="finding 1 lacks score"):
        write_report(doc, tmp_path)


def test_an_unsupported_finding_is_not_said_to_lack_what_its_counts_show(tmp_path):
    """A class whose suspects carry the pattern more often than the others' do, but not
    significantly (2 of 24 vs 3 of 223, a digits demo's finding), read "its training data
    carries it no more often than other classes'" beside those very counts."""
    doc = _doc(None)
    doc["findings"][0]["support"] = {"p_value": 0.0756, "n_class": 24, "class_above": 2, "n_other": 223,
                                     "other_above": 3, "tail": 0.01, "q_value": 0.085, "supported": False}
    html = write_report(doc, tmp_path).read_text()
    assert "2 of 24 suspect images of this class carry the pattern beyond the top 1%" in html
    assert "no more often" not in html
    assert "not supported: this class&#x27;s training data does not carry it significantly more often" in html


def test_a_finding_without_its_cluster_is_named_not_a_traceback(tmp_path):
    """The page reads every finding's cluster (the default of merged_clusters, evaluated
    even where that key is there), but the document check did not ask for it: KeyError."""
    import pytest
    doc = _doc(None)
    del doc["findings"][0]["cluster"]
    doc["findings"][0]["merged_clusters"] = [0, 2]
    with pytest.raises(ValueError, match="finding 1 lacks cluster"):
        write_report(doc, tmp_path)


def test_the_support_line_names_the_tail_the_test_used(tmp_path):
    """training_support(tail=0.005) (an API setting) read "beyond the top 0%" (:.0%)."""
    doc = _doc(None)
    sp = {"p_value": 1e-6, "n_class": 40, "class_above": 12, "n_other": 400, "other_above": 2, "q_value": 1e-6,
          "supported": True}
    doc["findings"][0]["support"] = dict(sp, tail=0.005)
    assert "beyond the top 0.5% of the other classes" in write_report(doc, tmp_path / "a").read_text()
    doc["findings"][0]["support"] = dict(sp, tail=0.01)
    assert "beyond the top 1% of the other classes" in write_report(doc, tmp_path / "b").read_text()


def test_the_support_line_says_when_ties_at_the_threshold_were_counted(tmp_path):
    """Where support kept the count with ties at its threshold (an identical stamp on many of
    the other classes' suspects), "50 of 100 beyond the top 1% ... (20 of 200)" contradicted itself."""
    doc = _doc(None)
    doc["findings"][0]["support"] = {"p_value": 1e-9, "n_class": 100, "class_above": 50, "n_other": 200,
                                     "other_above": 20, "tail": 0.01, "q_value": 1e-9, "supported": True,
                                     "ties_at_threshold": True, "ties_counted_above": True}
    html = write_report(doc, tmp_path).read_text()
    assert "50 of 100 suspect images of this class carry the pattern at or beyond the value that bounds the top 1%" in html
    assert "tie at that bound" not in html
    # ties at the bound counted below it: "0 of 105 ... beyond the top 1% ... (0 of 895)" read as impossible
    doc["findings"][0]["support"].update(class_above=0, other_above=0, ties_counted_above=False, supported=False,
                                         p_value=1.0, q_value=1.0)
    html = write_report(doc, tmp_path / "below").read_text()
    assert "(0 of 200; several tie at that bound, counted below it); p = 1" in html


def test_only_pngs_inside_the_run_are_inlined(tmp_path):
    """The page inlines image bytes: a findings.json naming a file outside the run (or one
    that is no PNG) pulled it into a page meant to be shared."""
    from spurfast.report import save_image

    run, secret = tmp_path / "run", tmp_path / "secret.png"
    (run / "images").mkdir(parents=True)
    save_image(torch.rand(1, 4, 4), secret)
    save_image(torch.rand(1, 4, 4), run / "images" / "f1_mask.png")
    (run / "images" / "f1_grid.png").write_text("not a picture")
    doc = _doc(None)
    doc["findings"][0]["images"] = {"centroid": "../secret.png", "contrast": str(secret),
                                    "mask": "images/f1_mask.png", "grid": "images/f1_grid.png"}
    html = write_report(doc, run).read_text()
    assert html.count("data:image/png;base64,") == 1
    assert "../secret.png is missing (or not a PNG of this run)" in html
    assert "images/f1_grid.png is missing (or not a PNG of this run)" in html


def test_links_take_neither_the_reports_reads_nor_its_writes_outside_the_run(tmp_path):
    # a received run folder's links pulled outside PNGs into the shared page, and a planted
    # link at a picture's path had the picture written into the file it pointed to
    outside, run = tmp_path / "outside", tmp_path / "run"
    (run / "images").mkdir(parents=True)
    outside.mkdir()
    save_image(torch.rand(1, 4, 4), outside / "secret.png")
    (run / "images" / "link.png").symlink_to(outside / "secret.png")
    (run / "linkdir").symlink_to(outside)
    doc = _doc(None)
    doc["findings"][0]["images"] = {"mask": "images/link.png", "grid": "linkdir/secret.png"}
    html = write_report(doc, run).read_text()
    assert "data:image/png;base64," not in html
    assert "images/link.png is missing (or not a PNG of this run)" in html
    assert "linkdir/secret.png is missing (or not a PNG of this run)" in html
    victim = outside / "victim.txt"
    victim.write_text("keep me")
    for name, write in (("planted.png", lambda p: save_image(torch.rand(1, 4, 4), p)),
                        ("scores.png", lambda p: plot_scores([{"score": 1.0, "q_value": 0.5}], 0.05, p))):
        (run / "images" / name).symlink_to(victim)
        write(run / "images" / name)
        assert victim.read_text() == "keep me" and not (run / "images" / name).is_symlink(), name
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "images").symlink_to(outside)
    with pytest.raises(NotADirectoryError, match=r"images is a link to .*outside; the report writes its pictures "
                                                 r"into the run's own folder: remove the link"):
        save_image(torch.rand(1, 4, 4), tmp_path / "run2" / "images" / "f.png")
    assert sorted(p.name for p in outside.iterdir()) == ["secret.png", "victim.txt"]


def test_no_effect_is_not_said_to_be_no_more_than_the_controls_beside_rates_that_are_more(tmp_path):
    """Four clean images, every one flipped by the pattern and none by either control: p =
    0.0625, so 'no_effect', which read "the pattern moves the model no more than random
    patterns or genuine class content" beside "flips 100.0% ... vs 0.0%"."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cf = {"flip_rate": 1.0, "control_flip_rate": 0.0, "p_value": 0.0625, "content_flip_rate": 0.0,
          "content_p_value": 0.0625, "q_value": 0.0625}
    html = write_report(_doc(cf), tmp_path / "a").read_text()
    assert "flips 100.0% of clean images towards this class vs 0.0% for random patterns" in html
    assert "no more than" not in html
    assert "not confirmed (the pattern does not move the model significantly more than random patterns or genuine " \
           "class content)" in html
    cf = {"flip_rate": 1.0, "control_flip_rate": 0.0, "p_value": 0.0625, "q_value": 0.0625,
          "content_skipped": "no image of class 3 to compare with"}
    html = write_report(_doc(cf), tmp_path / "b").read_text()
    assert "no more than" not in html
    assert "does not move the model significantly more than random patterns; genuine class content was not tested" \
        in html


def test_an_image_name_holding_a_nul_byte_is_missing_not_a_traceback(tmp_path):
    """open() raises ValueError ("embedded null byte"), not OSError, for such a name: the
    check meant to refuse odd image paths in a findings.json ended the report naming nothing."""
    doc = _doc(None)
    doc["findings"][0]["images"] = {"mask": "images/finding1\x00_mask.png"}
    html = write_report(doc, tmp_path).read_text()
    assert "images/finding1\x00_mask.png is missing (or not a PNG of this run)" in html


def test_the_score_plot_of_many_clusters_is_not_a_patch_per_cluster(tmp_path, monkeypatch):
    """A pool of 1.2M images has about 13k clusters: one bar (a matplotlib patch) per cluster
    took about a minute to add and draw at the end of every run (3 ms a bar here); above
    MAX_BARS the clusters are drawn as one collection of lines, with the same legend."""
    import numpy as np
    from matplotlib.figure import Figure

    from spurfast import report

    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: drawn.append(self))
    rng = np.random.default_rng(0)
    n = 3 * getattr(report, "MAX_BARS", 1000)
    clusters = [{"score": float(s), "q_value": float(q)} for s, q in zip(rng.exponential(size=n), rng.uniform(size=n))]
    plot_scores(clusters, 0.05, tmp_path / "s.png")
    ax = drawn[0].axes[0]
    assert len(ax.patches) < 10, len(ax.patches)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["not significant", "q <= 0.05"]
    assert sum(len(c.get_segments()) for c in ax.collections) == n
    plot_scores(clusters[:5], 0.05, tmp_path / "few.png")         # few clusters: bars as before
    assert len(drawn[1].axes[0].patches) == 5
    plot_scores([], 0.05, tmp_path / "none.png")                  # no cluster: an empty plot, not a TypeError


def test_an_interrupted_rewrite_keeps_the_report_it_was_replacing(tmp_path, monkeypatch):
    """`spurfast report --run` (or a rerun) writes the page over the old one: Ctrl-C during
    the write left a truncated report.html where a whole one had been."""
    import builtins
    import io

    import pytest

    path = write_report(_doc(None), tmp_path)
    whole = path.read_text()
    real_open = builtins.open

    class Interrupted(io.StringIO):
        def __init__(self, fh):
            super().__init__()
            self.fh = fh

        def write(self, text):   # half the page reaches the file, then Ctrl-C
            self.fh.write(text[:len(text) // 2])
            self.fh.flush()
            raise KeyboardInterrupt

        def __exit__(self, *exc):
            self.fh.close()

    def interrupted_open(file, mode="r", *a, **k):
        fh = real_open(file, mode, *a, **k)
        return Interrupted(fh) if "w" in mode and "report.html" in str(file) else fh

    monkeypatch.setattr(builtins, "open", interrupted_open)
    monkeypatch.setattr(io, "open", interrupted_open)
    with pytest.raises(KeyboardInterrupt):
        write_report(_doc(None), tmp_path)
    monkeypatch.undo()
    assert path.read_text() == whole
    assert [p.name for p in tmp_path.iterdir() if "report" in p.name] == ["report.html"]   # no temporary file left


def test_a_confirmation_that_could_not_run_says_why(tmp_path):
    """confirm is null where confirmation could not run (an empty mask, no clean image of
    another class): the page said nothing, and the reason was only in the log."""
    doc = _doc(None)
    doc["findings"][0]["confirm_skipped"] = "no clean images of other classes <all class 3>"
    html = write_report(doc, tmp_path).read_text()
    assert "Confirmation not run: no clean images of other classes &lt;all class 3&gt;." in html
    (tmp_path / "b").mkdir()
    html = write_report(_doc(None), tmp_path / "b").read_text()   # --no-confirm: nothing to say
    assert "Confirmation" not in html


def test_not_specific_without_the_content_control_says_so(tmp_path):
    """Every other verdict said that genuine class content was not tested where the control
    could not run; not_specific, ranked second as "beats class content", said nothing."""
    cf = {"flip_rate": 1.0, "control_flip_rate": 0.98, "p_value": 0.25, "q_value": 0.25,
          "content_skipped": "no image of class 3 to compare with"}
    html = write_report(_doc(cf), tmp_path).read_text()
    assert f"not confirmed ({VERDICTS['not_specific']}; genuine class content was not tested: no image of class 3 " \
           f"to compare with)" in html


def test_a_hand_edited_value_is_named_not_a_traceback(tmp_path):
    """A findings.json edited by hand (a string fdr, a null score, confirm given as a list,
    support without its counts) ended in a TypeError, KeyError or AttributeError traceback
    from deep in the page that named neither the file nor the field."""
    import pytest

    def edited(change):
        doc = _doc(None)
        change(doc, doc["findings"][0])
        return doc

    for change, says in (
            (lambda d, f: d["config"].update(discover=[1]), "config.discover is a JSON list, expected an object"),
            (lambda d, f: d["config"]["discover"].update(statistic=["x"]), "config.discover.statistic is ['x']"),
            (lambda d, f: d["config"]["discover"].update(fdr=None), "config.discover.fdr is null, expected a number"),
            (lambda d, f: f.update(score=None), "finding 1's score is null, expected a number"),
            (lambda d, f: f.update(p_value="abc"), "finding 1's p_value is \"abc\", expected a number"),
            (lambda d, f: f.update(confirm=["a"]), "finding 1's confirm is a JSON list, expected an object or null"),
            (lambda d, f: f.update(confirm={"flip_rate": 0.5, "p_value": 0.01}),
             "finding 1's confirm.control_flip_rate is null, expected a number"),
            (lambda d, f: f.update(confirm={"flip_rate": "0.5", "control_flip_rate": 0.1, "p_value": 0.01}),
             "finding 1's confirm.flip_rate is \"0.5\", expected a number"),
            # dose rates without a dose: the verdict compared the text with a number (a TypeError)
            (lambda d, f: f.update(confirm={"flip_rate": 0.5, "control_flip_rate": 0.1, "p_value": 0.01,
                                            "dose_flip_rate": "0.5"}),
             "finding 1's confirm.dose_flip_rate is \"0.5\", expected a number"),
            # the content control's and the dose's values where the document says they ran
            (lambda d, f: f.update(confirm={"flip_rate": 0.5, "control_flip_rate": 0.1, "p_value": 0.01,
                                            "content_p_value": 0.2, "content_flip_rate": "x"}),
             "finding 1's confirm.content_flip_rate is \"x\", expected a number"),
            (lambda d, f: f.update(confirm={"flip_rate": 0.5, "control_flip_rate": 0.1, "p_value": 0.01, "dose": "half",
                                            "dose_flip_rate": 0.4, "dose_control_flip_rate": 0.1}),
             "finding 1's confirm.dose is \"half\", expected a number"),
            (lambda d, f: f.update(support={"p_value": 0.01}), "finding 1's support has a p_value but lacks n_class, "
                                                              "class_above, n_other, other_above, q_value"),
            (lambda d, f: f.update(support=["x"]), "finding 1's support is a JSON list"),
            (lambda d, f: f.update(images=["centroid"]), "finding 1's images is a JSON list"),
            (lambda d, f: f.update(images={"mask": 3}), "finding 1's images.mask is 3, expected a file name"),
            # a residual scan's finding: its paragraph read these as a number and a pair
            (lambda d, f: f.update(kind="residual", peak_t=None), "finding 1's peak_t is null, expected a number"),
            (lambda d, f: f.update(kind="residual", peak=[3]), "finding 1's peak is [3], expected [y, x]"),
            (lambda d, f: f.update(kind="residual", peak=7), "finding 1's peak is 7, expected [y, x]")):
        with pytest.raises(ValueError, match="findings document of .* \\(findings.json\\)") as err:
            write_report(edited(change), tmp_path / "r", clusters=[{"score": 5.0, "q_value": 0.01}])
        assert says in str(err.value)
    # an fdr written as text is still the number it spells (plot_scores compared it with q-values)
    html = write_report(edited(lambda d, f: d["config"]["discover"].update(fdr="0.05")), tmp_path / "s",
                        clusters=[{"score": 5.0, "q_value": 0.01}]).read_text()
    assert "Findings (1 at q &le; 0.05)" in html


def test_an_images_file_where_the_folder_goes_is_named(tmp_path):
    """RUN/images a file: `spurfast report` said only "[Errno 17] File exists"."""
    (tmp_path / "images").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="images is not a folder; the report writes its pictures there: move or remove it"):
        write_report(_doc(None), tmp_path, clusters=[{"score": 5.0, "q_value": 0.02}])
    (tmp_path / "images").unlink()
    (tmp_path / "images").symlink_to(tmp_path / "gone")   # a dangling link: mkdir said "File exists" too
    with pytest.raises(NotADirectoryError, match="images is not a folder"):
        write_report(_doc(None), tmp_path, clusters=[{"score": 5.0, "q_value": 0.02}])
    with pytest.raises(NotADirectoryError, match="images is not a folder"):   # a finding's picture (characterise)
        save_image(torch.zeros(1, 8, 8), tmp_path / "images" / "finding1_mask.png")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_named_as_a_finding_image_does_not_block_the_report(tmp_path):
    """_run_png opened the file before asking is_file(): a FIFO named in findings.json
    blocked `spurfast report` forever, waiting for a writer."""
    doc = _doc(None)
    doc["findings"][0]["images"] = {"grid": "images/finding1_grid.png"}
    (tmp_path / "images").mkdir()
    fifo = tmp_path / "images" / "finding1_grid.png"
    os.mkfifo(fifo)
    done = []
    t = threading.Thread(target=lambda: done.append(write_report(doc, tmp_path).read_text()), daemon=True)
    t.start()
    t.join(60)
    try:
        assert done, "write_report blocked on the FIFO"
        assert "images/finding1_grid.png is missing" in done[0]
    finally:
        if t.is_alive():   # release the blocked open()
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            t.join(10)


def test_a_huge_integer_value_is_named_not_an_overflow_traceback(tmp_path):
    """JSON reads 1 followed by 400 zeros as an int: float() of it raised OverflowError, a
    traceback naming no field, where other bad values were named."""
    import json

    doc = _doc({"flip_rate": 0.5, "control_flip_rate": 0.01, "p_value": 1e-9})
    doc["findings"][0]["score"] = json.loads("1" + "0" * 400)
    with pytest.raises(ValueError, match="finding 1's score is 1000.*expected a number within a float's range"):
        write_report(doc, tmp_path)
    doc = _doc({"flip_rate": json.loads("1" + "0" * 400), "control_flip_rate": 0.01, "p_value": 1e-9})
    with pytest.raises(ValueError, match="finding 1's confirm.flip_rate is 1000"):
        write_report(doc, tmp_path)


def test_the_contrast_map_shows_a_change_of_hue(tmp_path):
    """A colour patch as bright as what it replaces (magenta on grey: +0.33, -0.66, +0.33)
    averaged to 0 over the channels: the report's contrast map was blank where the mask
    found the patch.  The map shows each pixel's channel that differs most."""
    import numpy as np
    from PIL import Image

    from spurfast.characterise import pattern_mask
    from spurfast.report import UPSCALE_TO, save_map
    c = torch.zeros(3, 16, 16)
    c[:, 2:6, 2:6] = torch.tensor([0.33, -0.66, 0.33])[:, None, None]
    c[:, 10:12, 10:12] = 0.2   # a plain brightening stays red, a third as strong
    assert pattern_mask(c)[2:6, 2:6].all()   # the mask finds it
    a = np.asarray(Image.open(save_map(c, tmp_path / "contrast.png"))).astype(int)
    s = UPSCALE_TO // 16
    changed = (a != 255).any(2)[::s, ::s]   # one screen pixel per contrast pixel
    assert changed.sum() == 20 and changed[2:6, 2:6].all() and changed[10:12, 10:12].all()
    assert tuple(a[3 * s, 3 * s]) == (0, 0, 255)   # green the most, darker: full blue
    r, g, b = a[10 * s, 10 * s]
    assert r == 255 and g == b and 150 < g < 200   # 1 - 0.2 / 0.66 of white


def test_the_contrast_map_of_one_channel_is_as_before(tmp_path):
    import numpy as np
    from PIL import Image

    from spurfast.report import save_map
    c = torch.zeros(1, 4, 4)
    c[0, 0, 0], c[0, 3, 3] = 0.5, -0.25
    a = np.asarray(Image.open(save_map(c, tmp_path / "one.png"))).astype(int)
    b = np.asarray(Image.open(save_map(c[0], tmp_path / "two.png"))).astype(int)
    assert (a == b).all() and tuple(a[0, 0]) == (255, 0, 0) and tuple(a[-1, -1]) == (128, 128, 255)


def test_two_channel_pictures_are_drawn_in_colour_not_as_transparency(tmp_path):
    """PIL read a 2-channel array as grey + alpha: a finding's centroid and grid of a 2-channel
    pool came out transparent where the second channel was 0 (here: everywhere)."""
    from PIL import Image

    from spurfast.report import save_grid
    img = torch.zeros(2, 8, 8)
    img[0, 5:8, 5:8] = 1.0                                  # a patch in the first channel only
    save_image(img, tmp_path / "one.png")
    save_grid(torch.stack([img, img * 0.5]), tmp_path / "grid.png")
    for name in ("one.png", "grid.png"):
        im = Image.open(tmp_path / name)
        assert im.mode == "RGB", (name, im.mode)
    one = Image.open(tmp_path / "one.png")
    px = one.load()
    w = one.width // 8
    assert px[6 * w, 6 * w] == (255, 0, 0) and px[0, 0] == (0, 0, 0)


def test_unrelated_members_are_not_said_to_be_of_another_class(tmp_path):
    """An unlabelled non-suspect member counts as unrelated (`scoring.unrelated_to_class`),
    though nobody knows its class: in an unlabelled folder pool "90 of another class than 3"
    was said of members mostly of class 3 itself."""
    doc = _doc(None)
    doc["findings"][0].update(n_unrelated=9, n_suspect=2)
    html = write_report(doc, tmp_path).read_text()
    assert "of another class" not in html
    # the two counts overlap: said so, or they read as a split of the members
    assert ("9 unrelated to class 3: labelled another class, or unlabelled and not suspect; 2 suspect samples, those "
            "labelled another class counted in both") in html


def test_a_value_just_past_the_level_is_not_printed_on_it(tmp_path):
    """q = 0.0500004 (not supported at q <= 0.05) printed "q = 0.05: not supported", and a
    confirmation q of 0.0500004 "q = 0.05" beside "weak": the rule the page states read as broken."""
    doc = _doc({"flip_rate": 0.3, "control_flip_rate": 0.01, "p_value": 1e-9, "content_flip_rate": 0.02,
                "content_p_value": 1e-8, "q_value": 0.0500004})
    doc["findings"][0]["support"] = {"p_value": 0.0250002, "n_class": 30, "class_above": 5, "n_other": 300,
                                     "other_above": 3, "tail": 0.01, "q_value": 0.0500004, "supported": False}
    html = write_report(doc, tmp_path).read_text()
    assert "q = 0.0500004: not supported" in html
    assert "q = 0.0500004 over this run's latent-cluster findings" in html
    assert "q = 0.05:" not in html and "q = 0.05 over" not in html


def test_beside_level_keeps_three_digits_where_they_are_on_the_right_side():
    from spurfast.report import beside_level
    assert beside_level(0.0123456) == "0.0123" and beside_level(0.05) == "0.05" and beside_level(2e-8) == "2e-08"
    assert beside_level(0.0500004) == "0.0500004" and beside_level(0.04999996) == "0.05"
    assert beside_level(0.0499996) == "0.05" and beside_level(0.050001) == "0.050001"


@pytest.mark.parametrize("clusters, said", [
    ([{"score": 5.0, "q_value": 0.02}, {"rank": 1, "q_value": 0.9}], r"clusters\[1\] lacks score"),
    ([{"score": "5", "q_value": 0.02}], r"clusters\[0\]\['score'\] is \"5\""),
    ([3.0], r"clusters\[0\] lacks score, q_value"),
    ({"score": 5.0, "q_value": 0.02}, "clusters is a dict, expected a list"),
])
def test_clusters_without_a_score_are_named_before_any_file_is_written(tmp_path, clusters, said):
    """write_report's plot of every cluster had ended in a bare KeyError ('score')."""
    with pytest.raises(ValueError, match=said):
        write_report(_doc(None), tmp_path / "run", clusters=clusters)
    assert not (tmp_path / "run").exists()


def test_the_demo_line_shows_the_rates_at_the_strength_that_counted():
    from spurfast.demo import flip_rates_text

    cf = {"flip_rate": 1.0, "control_flip_rate": 1.0, "dose": 0.5, "dose_flip_rate": 1.0,
          "dose_control_flip_rate": 0.342}
    assert flip_rates_text(cf) == "1.000 (1.000); at 50% strength, where its p-value comes from: 1.000 (0.342)"
    assert flip_rates_text({**cf, "dose": 1.0}) == "1.000 (1.000)"
    assert flip_rates_text({"flip_rate": 0.3, "control_flip_rate": 0.01}) == "0.300 (0.010)"   # older results


def test_a_weak_confirmation_is_not_headed_confirmed(tmp_path):
    from html import escape

    # beats both controls, but not once the run's number of findings is accounted for
    cf = {"flip_rate": 0.5, "control_flip_rate": 0.01, "p_value": 1e-6, "content_flip_rate": 0.01,
          "content_p_value": 1e-6, "q_value": 0.2}
    html = write_report(_doc(cf), tmp_path).read_text()
    assert "not confirmed" in html and escape(VERDICTS["weak"]) in html and "confirmed shortcut" not in html


def test_a_confirmation_at_full_strength_names_no_weaker_dose(tmp_path):
    cf = {"flip_rate": 0.5, "control_flip_rate": 0.01, "p_value": 1e-6, "dose": 1.0, "dose_flip_rate": 0.5,
          "dose_control_flip_rate": 0.01}
    (tmp_path / "a").mkdir()
    assert "strength" not in write_report(_doc(cf), tmp_path / "a").read_text()
    (tmp_path / "b").mkdir()
    html = write_report(_doc(dict(cf, dose=0.5, dose_flip_rate=0.3)), tmp_path / "b").read_text()
    assert "at 50% strength, pattern and random ones alike, 30.0% vs 1.0%" in html


def test_unreadable_files_are_listed_by_name(tmp_path):
    html = write_report(_doc(None), tmp_path, bad_files={"b.png": "truncated", "a.png": "not an image"}).read_text()
    assert html.index("<code>a.png</code>: not an image") < html.index("<code>b.png</code>: truncated")
    assert "Unreadable files (2, skipped)" in html


def test_a_finding_without_exemplars_gets_an_empty_grid(tmp_path):
    from PIL import Image

    from spurfast.report import save_grid

    path = save_grid(torch.zeros(0, 1, 8, 8), tmp_path / "g.png")
    assert Image.open(path).size[0] > 0


def test_the_score_plot_marks_a_q_value_at_the_level_significant(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    bars = {}
    real = Axes.bar

    def bar(self, x, height, *a, label=None, **kw):
        bars[label] = list(x)
        return real(self, x, height, *a, label=label, **kw)

    monkeypatch.setattr(Axes, "bar", bar)
    plot_scores([{"score": 3.0, "q_value": 0.05}, {"score": 2.0, "q_value": 0.0501}], 0.05, tmp_path / "s.png")
    assert bars == {"not significant": [1], "q <= 0.05": [0]}
