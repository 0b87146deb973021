"""RESULTS.md and plots of an evaluation, from its CSVs alone (`spurfast evaluate` writes
them after a sweep; ``--from-csv`` redoes them without running anything).

``results.csv``: one row per (setting, seed, method, feature, metric); ``confirm.csv``: one
row per spurfast finding.  The document has an overview (one row per setting and planted
pattern), per-setting tables (mean ± sd over seeds), the confirmation verdicts, the
issue's targets checked against the numbers, and the plots.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from pathlib import Path

import numpy as np

from .confirm import confirm_verdict
from .data.sources import utf8_name

log = logging.getLogger("spurfast.results_doc")

# the methods compared, in table order: spurfast, then the baselines (`spurfast.baselines`)
# every method a results.csv may hold, in the order tables list them.  The residual and
# feature-view ones are opt-in (evaluate --residual-scan, --feature-view): `DEFAULT_METHODS`
# run without them.  `features` is an ablation (spurfast's pipeline in the classifier's
# feature space alone, `spurfast.feature_view`); the `spurfast+...features` rows join its
# findings to spurfast's by q-value: all of them, the confirmed ones to the confirmed, or the
# confirmed ones to all of spurfast's (what `discover --feature-view` ships, in discovery order)
METHODS = ("spurfast", "spurfast+confirm", "spurfast+support", "spurfast+residual", "spurfast+residual+confirm",
           "pixels", "features", "spurfast+features", "spurfast+features+confirm", "spurfast+confirmed-features",
           "george", "george+pattern", "activation_clustering", "activation_clustering+pattern", "random")
RESIDUAL_METHODS = ("spurfast+residual", "spurfast+residual+confirm")
FEATURE_METHODS = ("features", "spurfast+features", "spurfast+features+confirm", "spurfast+confirmed-features")
# spurfast's own rows; the rest are baselines (and ablations)
OURS = METHODS[:5] + FEATURE_METHODS[1:]
# spurfast's rows that rank the pool by their own findings; the others keep some of those findings
# (confirmed, supported): the Targets judge the rankers' AP per setting, and count the others'
RANKERS = ("spurfast", "spurfast+residual", "spurfast+features")
# the ablation each of spurfast's joined rows is built from: not a baseline *for that row* (a
# join can at best tie its own part), still one for the others
PART_OF = {m: ("features",) for m in FEATURE_METHODS[1:]}
DEFAULT_METHODS = tuple(m for m in METHODS if m not in RESIDUAL_METHODS + FEATURE_METHODS)


def write_csv(path: Path, rows: list[dict], cols: list[str]) -> None:
    """``rows`` as CSV, atomically: a run interrupted mid-write left a results.csv cut short,
    its last value cut mid-number (``--from-csv`` then printed a wrong figure)."""
    from .atomic_files import replace_atomically

    def write(fh):
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    replace_atomically(Path(path), write, newline="", encoding="utf-8")


def read_csv(path) -> list[dict]:
    return _read_numbered(path)[0]


def _read_numbered(path) -> tuple[list[dict], list[int]]:
    """(rows, the file line each ends on): DictReader skips blank lines and a quoted field may
    span lines, so counting rows named the wrong line in error messages."""
    # utf-8-sig: a CSV saved by a spreadsheet starts with a byte-order mark, which became part
    # of the first column's name (confirm.csv: "no setting column"; results.csv: preset lost)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows, lines = [], []
            for r in reader:
                rows.append(r)
                lines.append(reader.line_num)
            return rows, lines
    except UnicodeDecodeError as exc:   # the codec's message named no file (confirm.csv is read unasked)
        raise ValueError(f"{path} is not UTF-8 text ({exc}); save it as UTF-8, as `spurfast evaluate` "
                         f"writes it") from None


def csv_digests(*paths) -> dict:
    """{file name: sha256 of its text, LF line ends} of the CSVs a sweep just wrote, for its timing.json:
    the three files are written one after another, and `check_digests` tells a set that a
    kill between those writes left mixed."""
    return {Path(p).name: _digest(p) for p in paths}


def _digest(path) -> str:
    # of the text, whatever its line ends: git (autocrlf) checks a committed CSV out with LF
    return hashlib.sha256(Path(path).read_bytes().replace(b"\r\n", b"\n")).hexdigest()


def check_digests(timing, csv_path, confirm_path) -> None:
    """Warn where ``csv_path`` / ``confirm_path`` are not the files the sweep of ``timing``
    (its timing.json, with `csv_digests`) wrote: a sweep killed between its writes paired a
    new results.csv with the previous sweep's confirm.csv (or timing.json), and the document
    showed the other sweep's confirmation table (or command) unsaid.  A timing.json without
    digests (written before they were kept) is not checked."""
    want = (timing or {}).get("csv_sha256") if isinstance(timing, dict) else None
    if not isinstance(want, dict):
        return

    def same(p, name):   # by role: --from-csv takes a results CSV of any name
        return p is not None and Path(p).is_file() and _digest(p) == want.get(name)
    # confirm_path None: the caller reads no confirm.csv, so there is none to pair
    r_ok = same(csv_path, "results.csv")
    c_ok = None if confirm_path is None else same(confirm_path, "confirm.csv")
    if r_ok and c_ok is not False:
        return
    if not r_ok and c_ok:
        log.warning("%s is not the results.csv written with %s and timing.json beside it (a later sweep killed "
                    "before writing those, or an edited CSV): the confirmation table, command and times are of "
                    "another sweep; rerun the evaluation", csv_path, confirm_path)
    elif r_ok:
        log.warning("%s is not the confirm.csv written with %s (edited, replaced or missing): the confirmation "
                    "table may be of another sweep; rerun the evaluation", confirm_path, csv_path)
    else:
        log.warning("the run's timing (timing.json) was written by another sweep than %s (one killed before "
                    "writing it, or an edited CSV): the command and times shown are that sweep's",
                    csv_path if confirm_path is None else f"{csv_path} and {confirm_path}")


def _read_whole(path, need=()) -> tuple[list[dict], list[int]]:
    """`_read_numbered` of a CSV this module reads, refusing a row cut short (a missing field
    reads as None: a TypeError traceback), a longer one, or a missing column of ``need``
    (an empty file too: it gave an empty document), with the file and line named."""
    rows, lines = _read_numbered(path)
    if not rows:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), [])
        missing = [k for k in need if k not in header]
        if missing:
            raise ValueError(f"{path}: no {', '.join(missing)} column (not the CSV `spurfast evaluate` wrote)")
    for line, r in zip(lines, rows):
        missing = [k for k in need if k not in r]
        if missing or None in r or None in r.values():
            head = len(r) - (None in r)   # DictReader: None for a missing field, extras listed under None
            got = head - list(r.values()).count(None) + len(r.get(None) or [])
            raise ValueError(f"{path}: " + (f"no {', '.join(missing)} column (not the CSV `spurfast evaluate` wrote)"
                             if missing else f"line {line} has {got} fields, the header {head} (cut short or "
                             f"edited?); rerun the evaluation"))
    return rows, lines


NOTES = "<!-- notes: text below this line is kept when the file is regenerated -->"


def read_notes(path: Path) -> str:
    """The text of a RESULTS.md about to be regenerated (its notes are kept), as UTF-8; a
    ValueError naming the file where it is not (the codec's message named none)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc}); its notes below the marker are kept when it is "
                         f"regenerated: save it as UTF-8, or move it away") from None


TITLE = "# spurfast: planted-shortcut evaluation results"   # the first line of every RESULTS.md it writes


def check_results_md(path, label: str = "results_md") -> None:
    """Where RESULTS.md is to be written: a file in a folder that exists (a folder, or a
    missing one, failed only when the sweep was done).  ``label`` names it in the errors.
    Whether a file there is one `spurfast evaluate` wrote: `check_ours`."""
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{label} {target} is a folder; expected the file to write, e.g. "
                                f"{target / 'RESULTS.md'}")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"{label} {target}: folder {target.parent} does not exist")


def check_ours(target: Path, label: str) -> str | None:
    """The text of ``target`` (`read_notes`), None where there is no such file; refused where
    it is a file `spurfast evaluate` did not write (no title line of its tables, no notes
    marker): a slip (--results-md README.md) replaced a hand-written file without a word,
    where plant, discover and make-pool refuse to."""
    if not Path(target).is_file():
        return None
    text = read_notes(target)
    if not text.startswith(TITLE) and NOTES not in text:
        raise FileExistsError(f"{label} {target} is not a RESULTS.md of `spurfast evaluate` (its first line is "
                              f"not {TITLE!r}, and it has no notes marker {NOTES}): the tables would replace it; "
                              f"choose another file, or move it away")
    return text


def keep_notes(text: str, target: Path | None, previous: str | None = None) -> str:
    """``text`` plus the notes marker and whatever followed it in ``previous`` (or in the file
    ``target``).  The marker ends every file written, so that notes added below it survive the
    next regeneration (without it, nothing told them apart from the tables, and they were lost)."""
    if previous is None and target is not None and target.is_file():
        previous = read_notes(target)
    text = text.split(NOTES, 1)[0]   # notes of its own (`write_results` keeps the file's): not twice
    notes = previous.split(NOTES, 1)[1] if previous and NOTES in previous else "\n"
    return text.rstrip() + "\n\n" + NOTES + notes


def write_with_notes(md: Path, previous: str | None, out, results_md=None) -> None:
    """Keep the hand-written notes of ``previous`` (``md``'s text before ``md`` was just
    regenerated in ``out``), and copy the tables to ``results_md`` with that file's own
    notes and its image links made to reach ``out``'s plots."""
    fresh = md.read_text(encoding="utf-8")
    _write_text(md, keep_notes(fresh, None, previous))
    if results_md:
        target = Path(results_md)
        # a non-UTF-8 folder name (surrogate escapes) in the relinked plots: \xNN, as in write_results
        _write_text(target, utf8_name(keep_notes(relink(fresh, out, target.parent), target)))


def _write_text(path: Path, text: str) -> None:
    """``text`` into ``path`` (through a link: the file it names) atomically: ``write_text``
    truncated first, and a kill or a full disk mid-write lost the notes kept in it."""
    from .atomic_files import replace_atomically
    real = Path(os.path.realpath(path))
    try:
        replace_atomically(real, lambda fh: fh.write(text), encoding="utf-8")
    except PermissionError:   # a writable file in a folder that takes no new file (the CLI allows it): in place
        real.write_text(text, encoding="utf-8")


_IMAGE = re.compile(r"^(!\[[^\]]*\]\()([^)\s]+)(\))$", re.M)


def relink(text: str, from_dir, to_dir) -> str:
    """``text``, a document written in ``from_dir``, with its relative image links made
    relative to ``to_dir``: a copy written there (``--results-md``) showed ``to_dir``'s
    own plots (stale ones, or none) instead of the run's."""
    def fix(m):
        p = m.group(2)
        if os.path.isabs(p) or "://" in p:
            return m.group(0)
        new = _rel(Path(from_dir) / p, Path(to_dir))
        return m.group(1) + (f"<{new}>" if re.search(r"[\s()<>]", new) else new) + m.group(3)
    return _IMAGE.sub(fix, text)


def _agg(vals):
    """mean ± sd of the finite values; "–" when none is.  Seeds whose value is undefined
    (NaN, or infinite) are left out, and said to be where some are: the mean is then over
    fewer seeds than the section names."""
    v = np.array([x for x in vals if np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return "–"
    text = f"{v.mean():.3f}" if len(v) == 1 else f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"
    return text + (f" (n/a in {len(vals) - len(v)} of {len(vals)} seeds)" if len(v) < len(vals) else "")


def _count(vals) -> tuple[int, int]:
    """(sum of the finite values as an integer, number of non-finite ones) of per-seed
    counts or 0/1 values: ``int(sum(...))`` raised on a NaN row."""
    v = np.asarray(vals, dtype=float)
    ok = np.isfinite(v)
    return int(v[ok].sum()), int((~ok).sum())


def read_results(csv_path, confirm_path=None) -> tuple[list[dict], list[dict]]:
    """The rows of a results CSV and of its confirm.csv (none where ``confirm_path`` is None or
    no file), checked as `write_results` needs them: a ValueError naming the file (and line)
    where either is not what `spurfast evaluate` writes.  Writes nothing, so a caller can
    check its input before it creates anything."""
    rows, lines = _read_whole(csv_path, ("setting", "seed", "method", "feature", "metric", "value"))
    crows, clines = _read_whole(confirm_path, ("setting", "true_finding", "flip_rate", "control_flip_rate")) \
        if confirm_path and Path(confirm_path).is_file() else ([], [])
    for line, r in zip(lines, rows):
        try:
            r["value"] = float(r["value"])
            r["seed"] = int(r["seed"])
        except ValueError as exc:   # float()'s message named neither the file nor the line
            raise ValueError(f"{csv_path} line {line}: {exc}") from None
    # a row given twice (pasted twice, or two runs' CSVs joined) entered every mean and count twice
    seen = {}
    for line, r in zip(lines, rows):
        key = (r["setting"], r["seed"], r["method"], r["feature"], r["metric"])
        if key in seen:
            raise ValueError(f"{csv_path}: line {line} repeats line {seen[key]} (setting {key[0]!r}, seed {key[1]}, "
                             f"method {key[2]!r}, feature {key[3]!r}, metric {key[4]!r}); each is counted once "
                             f"per seed: remove one")
        seen[key] = line
    _check_confirm_rows(crows, confirm_path, clines)
    return rows, crows


def write_results(csv_path, confirm_path, md_path, *, command: str = "", wall_s: float | None = None,
                  plots_dir=None, timing: dict | None = None, regenerated_by: str = "") -> Path:
    """RESULTS.md (and plots) from the CSVs alone."""
    rows, crows = read_results(csv_path, confirm_path)
    check_digests(timing, csv_path, confirm_path)
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    # in seed order within each setting: the "per seed" lists are read against the sorted seeds
    # of the setting's heading (--seeds 2,0,1 listed seed 2's value first)
    pos = {s: i for i, s in enumerate(settings)}
    rows.sort(key=lambda r: (pos[r["setting"]], r["seed"]))
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    L = [TITLE, ""]
    presets = sorted({r.get("preset", "") for r in rows})
    L += [f"Generated by `spurfast evaluate` from `{Path(csv_path).name}` (preset {', '.join(presets)}).",
          (f"Command: `{command}`" + (f" (tables regenerated by `{regenerated_by}`)" if regenerated_by else "") + "."
           # a CSV without its run's timing.json has no command: the regeneration was left unsaid
           if command else f"Tables regenerated by `{regenerated_by}`." if regenerated_by else ""),
          # a number: a hand-edited timing.json's "600" was a TypeError traceback after the tables were read
          f"Wall time of the run that wrote it: {wall_s / 60:.1f} min (cached parts not re-run)."
          if isinstance(wall_s, (int, float)) and wall_s else "",
          (f"CPU time of that process (all threads): {timing['cpu_s'] / 60:.1f} min on {timing['cpus']} cores"
           # the processor: models trained on another one differ a little (recorded since the 21st session)
           + (f" ({timing['cpu_model']})" if isinstance(timing.get("cpu_model"), str) else "") + "; "
           f"load average {timing['load_at_start']:.1f} at the start and {timing['load_at_end']:.1f} at the end "
           # a timing.json without these (hand-edited, another tool's): KeyError after the tables were read
           f"(the machine was shared)." if timing and all(isinstance(timing.get(k), (int, float))
                                                          for k in ("cpu_s", "cpus", "load_at_start", "load_at_end"))
           else ""), "",
          "Metrics per planted feature: mean ± sd over seeds. `best` = the method's finding whose pool ranking "
          "has the highest average precision, picked from its first 10 (spurfast: its 10 highest-ranked "
          "significant findings, q <= 0.1; baselines without a test: their top 10 candidates), in any class. "
          "hit@1: the top finding is the planted class and enriched (>= 2x the pool's carrier rate). A method "
          "with no finding counts as a random ranking, and as mask IoU 0. `best in target class`: the share of "
          "seeds whose best finding lies in the pattern's class (a best finding elsewhere is usually the model's "
          "reaction to the pool's stamp in another class). `AP in target class`: the best AP among the first 10 "
          "that lie in the pattern's class (the carrier rate where none does): whether the method found the "
          "shortcut where it was planted. `george+pattern` and `activation_clustering+pattern`: those baselines' "
          "candidates ranked as spurfast ranks its findings (a linear probe in the classifier's feature space, "
          "then the extracted pixel pattern; `spurfast.baselines.pattern_ranked`), so the comparison with them "
          "is one of the clusters alone. Order: `spurfast` and `pixels` rows take findings in "
          "discovery order (by score, before the confirmed-first re-ranking that `spurfast discover` and the demo "
          "ship), `spurfast+confirm` keeps only the confirmed findings in that order (its top finding is the top "
          "of the shipped order whenever a finding is confirmed), `spurfast+support` keeps of those the ones whose "
          "pattern the suspect images of their class carry more often than the other classes' suspects "
          "(`spurfast.support`), and the other baselines keep their own order."
          + (" Feature view (`evaluate --feature-view`, `spurfast.feature_view`): `features` is spurfast's "
             "pipeline in the classifier's standardised penultimate features alone (an ablation, so a baseline "
             "for the other rows but not for the rows built from it); `spurfast+features` places all of its "
             "findings among spurfast's by q-value, `spurfast+confirmed-features` only its confirmed ones (the "
             "findings `spurfast discover --feature-view` ships, in discovery order), `spurfast+features+confirm` "
             "its confirmed ones among spurfast's confirmed ones."
             if any(r["method"] in FEATURE_METHODS for r in rows) else ""), ""]
    foreign = [r["value"] for r in rows if r["metric"] == "foreign_models"]
    n_foreign = _count(foreign)[0]
    if n_foreign:
        L += [f"**{n_foreign} of {len(foreign)} runs scored cached classifiers or VAEs that other code "
              f"or another CPU or thread count trained**: a fresh run (`--cache` empty) retrains them, and its figures differ a "
              f"little (training repeats bit for bit on one machine at one thread count only).", ""]
    L += _overview(rows, settings)
    metrics = ["hit@1", "auroc", "ap", "precision@10", "precision@25", "mask_iou", "best_is_target_class",
               "ap_in_class"]
    for s in settings:
        rs = [r for r in rows if r["setting"] == s]
        seeds = sorted({r["seed"] for r in rs})
        L += [f"## {s} (seeds {', '.join(map(str, seeds))})", ""]
        model = [r for r in rs if r["method"] == "model"]
        for feat in dict.fromkeys(r["feature"] for r in model if r["feature"] != "all"):
            ss = [v for _, v in _by_seed(model, seeds, feat, "spurious_score")]
            called = [v for _, v in _by_seed(model, seeds, feat, "flip_to_target_rate")]
            fr = [v for _, v in _by_seed(model, seeds, feat, "pool_flip_rate")]
            L.append(f"- pattern {feat}: Yang's spurious score of the trained models {_agg(ss)} "
                     f"(per seed: {', '.join(f'{v:.2f}' for v in ss)})"
                     + (f"; held-out images the stamp makes it call the class {_agg(called)}" if called else "")
                     + (f"; unrelated pool carriers predicted as its class {_agg(fr)}" if fr else ""))
        L.append("")
        feats = list(dict.fromkeys(r["feature"] for r in rs if r["method"] in methods and r["feature"] != "all"))
        if feats:
            heads = [{"best_is_target_class": "best in target class", "ap_in_class": "AP in target class"}.get(k, k)
                     for k in metrics]
            L += ["| feature | method | " + " | ".join(heads) + " |", "|" + "---|" * (len(metrics) + 2)]
            for feat in feats:
                for m in methods:
                    # against the heading's seeds, as the lists and targets: a seed without its row
                    # (a hand-edited CSV) gave a mean over the others with no "n/a" said
                    mine = [r for r in rs if r["method"] == m]
                    got = [[v for _, v in _by_seed(mine, seeds, feat, k)] for k in metrics]
                    # a method with rows shows them, "–" where undefined in every seed (a
                    # pattern no pool item carries): its row does not just vanish
                    if any(got):
                        L.append(f"| {feat} | {m} | " + " | ".join(_agg(v) for v in got) + " |")
            L.append("")
        gm = ["recall@q0.05", "recall@q0.1", "false_findings@q0.05", "false_findings@q0.1", "false_on_pool_pattern@q0.05"]
        tab = []
        for m in methods:
            mine = [r for r in rs if r["method"] == m]
            vals = [[v for _, v in _by_seed(mine, seeds, "all", k)] for k in gm]
            if any(vals):
                tab.append(f"| {m} | " + " | ".join(
                    (_agg(v) + (f" (sum {_count(v)[0]})" if k.startswith("false") and v else "")) if v else "–"
                    for k, v in zip(gm, vals)) + " |")
        if tab:
            L += ["| method | " + " | ".join(gm) + " |", "|" + "---|" * (len(gm) + 1)] + tab + [""]
    if crows:
        L += ["## Confirmation (every spurfast finding at q <= 0.1)", "",
              "Verdicts (`spurfast.confirm.VERDICTS`): *confirmed* beats both controls (and, where the run adjusted "
              "for its number of findings, its Benjamini-Hochberg q-value is <= 0.05); *weak*: beats both, not after "
              "that adjustment; *class content*: genuine class content in the same place moves the model as much; "
              "*not specific*: random patterns of the same area and intensity move it as much; *no effect*: neither."
              + (" Rows marked *residual scan*: the classes `--residual-scan` found (`spurfast.residual`), confirmed "
                 "the same way." if any(c["family"] == "residual" for c in crows) else "")
              + (" Rows marked *feature view*: the clusters of the classifier's features `--feature-view` found "
                 "(`spurfast.feature_view`), confirmed the same way over their own family."
                 if any(c["family"] == "features" for c in crows) else ""),
              "", "| setting | findings | kind | mean flip rate | mean random-control flip rate | mean content-control "
              "flip rate | confirmed | weak | class content | not specific | no effect |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in dict.fromkeys(c["setting"] for c in crows):
            for fam, kind, lab in (("cluster", "1", "true"), ("cluster", "0", "false"),
                                   ("residual", "1", "true (residual scan)"), ("residual", "0", "false (residual scan)"),
                                   ("features", "1", "true (feature view)"), ("features", "0", "false (feature view)")):
                cs = [c for c in crows if c["setting"] == s and c["family"] == fam and c["true_finding"] == kind
                      and c["flip_rate"] != ""]
                if not cs:
                    continue
                fl = [float(c["flip_rate"]) for c in cs]
                co = [float(c["control_flip_rate"]) for c in cs]
                ct = [float(c["content_flip_rate"]) for c in cs if c.get("content_flip_rate", "") != ""]
                # the run's own verdict where the CSV has it: the rates alone leave out the dose that
                # decided a tie at full strength (runs written before the column: from the rates)
                verdicts = [c.get("verdict") or confirm_verdict(_confirm_of(c)) for c in cs]
                L.append(f"| {s} | {len(cs)} | {lab} | {np.mean(fl):.3f} | {np.mean(co):.3f} | "
                         f"{np.mean(ct) if ct else float('nan'):.3f} | "
                         + " | ".join(str(verdicts.count(v))
                                      for v in ("confirmed", "weak", "class_content", "not_specific", "no_effect"))
                         + " |")
        L.append("")
    L += _targets(rows, settings)
    secs = [r["value"] for r in rows if r["metric"] == "seconds" and r["method"] == "spurfast"]
    if secs:   # the training support test is timed with them where the run scored it
        sup = " + training support" if "spurfast+support" in methods else ""
        L += ["", f"spurfast discovery + characterisation + confirmation{sup}: {np.mean(secs):.1f} s per run on "
                  f"average (models excluded; {len(secs)} runs)."]
    if plots_dir:
        L += ["", *_plots(rows, crows, Path(plots_dir), Path(md_path).parent)]
    md = Path(md_path)
    # "±", "–" and notes: not the locale's; a non-UTF-8 path in the command (surrogate escapes)
    # as \xNN: it raised UnicodeEncodeError after the whole sweep and left RESULTS.md empty.
    # The file's notes are kept here already: killed before `write_with_notes` put them back
    # (their text only in memory), the file was left without them
    _write_text(md, keep_notes(utf8_name("\n".join(L) + "\n"), md))
    return md


# confirm.csv's families: spurfast's clusters, the residual scan's classes, the feature view's clusters
CONFIRM_FAMILIES = ("cluster", "residual", "features")
_CONFIRM_NUMBERS = ("flip_rate", "control_flip_rate", "p_value", "content_flip_rate", "content_p_value",
                    "confirm_q_value")


def _check_confirm_rows(crows: list[dict], path, lines: list[int]) -> None:
    """confirm.csv's rows as the tables read them, in place: true_finding "0" or "1" (a
    "1.0" or " 1" saved by a spreadsheet silently left the finding out of the table and the
    plot), numbers stripped and parsed, and the controls a flip rate is read against; a
    ValueError naming the file, line and column (float()'s named none; a missing control
    was a KeyError), or a finding given twice."""
    seen = {}
    for line, c in zip(lines, crows):
        for k in list(c):
            c[k] = c[k].strip()
        try:
            tf = float(c["true_finding"])
            if tf not in (0, 1):
                raise ValueError
        except ValueError:
            raise ValueError(f"{path} line {line}: true_finding {c['true_finding']!r}, expected 0 or 1") from None
        c["true_finding"] = str(int(tf))
        for k in _CONFIRM_NUMBERS:
            try:
                if c.get(k, ""):
                    float(c[k])
            except ValueError:
                raise ValueError(f"{path} line {line}: {k} {c[k]!r} is not a number") from None
        need = [k for k in ("control_flip_rate", "p_value") if c["flip_rate"]] + \
            (["content_flip_rate"] if c.get("content_p_value", "") else [])
        blank = [k for k in need if not c.get(k, "")]
        if blank:
            raise ValueError(f"{path} line {line}: no {', '.join(blank)} beside its "
                             f"{'flip_rate' if blank[0] != 'content_flip_rate' else 'content_p_value'} "
                             f"(edited?); confirmation writes both")
        c["family"] = c.get("family") or "cluster"   # written before the residual scan had rows
        if c["family"] not in CONFIRM_FAMILIES:   # the table and plot have no row for it: left out unsaid
            raise ValueError(f"{path} line {line}: family {c['family']!r}, expected one of {CONFIRM_FAMILIES}")
        key = (c["setting"], c.get("seed"), c["family"], c.get("rank"))
        if key[3] is not None and key in seen:   # counted twice in the verdict table
            raise ValueError(f"{path}: line {line} repeats line {seen[key]} (setting {key[0]!r}, seed {key[1]}, "
                             f"{key[2]} rank {key[3]}); remove one")
        seen[key] = line


def _by_seed(rows, seeds, feature, metric) -> list[tuple]:
    """(seed, value) of ``rows``' ``metric`` (of ``feature``; any where None), in seed order,
    NaN for a seed of ``seeds`` that has none where another has: a hand-edited CSV missing
    one seed's row listed the others one place early (under the heading's seeds, the wrong
    ones), and a target was judged on the remaining seeds alone ("met")."""
    got = [(r["seed"], r["value"]) for r in rows if r["metric"] == metric and (feature is None or r["feature"] == feature)]
    have = {seed for seed, _ in got}
    return sorted(got + [(seed, float("nan")) for seed in seeds if seed not in have], key=lambda p: p[0]) if got else []


def _na(vals) -> str:
    """" (k n/a)" where ``vals`` holds k non-finite values, else ""."""
    bad = _count(vals)[1]
    return f" ({bad} n/a)" if bad else ""


def _confirm_of(crow: dict) -> dict:
    """The ``confirm`` object of one confirm.csv row (numbers back from text; blanks: not run)."""
    keys = {"flip_rate": "flip_rate", "control_flip_rate": "control_flip_rate", "p_value": "p_value",
            "content_flip_rate": "content_flip_rate", "content_p_value": "content_p_value", "q_value": "confirm_q_value"}
    return {k: float(crow[col]) for k, col in keys.items() if crow.get(col, "") not in ("", None)}


def _best_baseline(ap: dict, for_method: str = "spurfast") -> tuple[str | None, float]:
    """(name, AP) of the baseline with the highest mean AP for ``for_method`` (spurfast's own
    rows excluded, and the ablation ``for_method`` is joined from, `PART_OF`; methods without
    a finite AP skipped), or (None, nan)."""
    skip = set(OURS) | set(PART_OF.get(for_method, ()))
    base = {m: v for m, v in ap.items() if m not in skip and np.isfinite(v)}
    if not base:
        return None, float("nan")
    best = max(base, key=base.get)
    return best, base[best]


def _overview(rows, settings) -> list[str]:
    """One row per (setting, planted pattern): did the model learn it, could a method that
    looks inside predicted classes see it, and how each method ranked the pool."""
    def mean(s, m, metric, f):
        rs = [r for r in rows if r["setting"] == s]
        v = [x for _, x in _by_seed([r for r in rs if r["method"] == m], sorted({r["seed"] for r in rs}), f, metric)]
        fin = [x for x in v if np.isfinite(x)]   # as the tables and targets: one NaN seed read "nan" here
        return (float(np.mean(fin)) if fin else float("nan")), v

    out = []
    for s in settings:
        feats = dict.fromkeys(r["feature"] for r in rows if r["setting"] == s and r["metric"] == "ap")
        for f in feats:
            ss, _ = mean(s, "model", "spurious_score", f)
            called, _ = mean(s, "model", "flip_to_target_rate", f)
            fr, _ = mean(s, "model", "pool_flip_rate", f)
            ap = {m: mean(s, m, "ap", f)[0] for m in METHODS}
            best, best_ap = _best_baseline(ap)
            in_class = {m: mean(s, m, "ap_in_class", f)[0] for m in METHODS}   # none in a CSV before v29
            best_in, best_in_ap = _best_baseline(in_class)
            _, hits = mean(s, "spurfast+confirm", "hit@1", f)
            rec, _ = mean(s, "spurfast", "recall@q0.1", "all")
            out.append(f"| {s} | {f} | {ss:.2f} | {called:.2f} | {fr:.2f} | {ap['spurfast']:.3f} | {ap['spurfast+confirm']:.3f} | "
                       + (f"{best} {best_ap:.3f}" if best else "–")
                       + (f" | {in_class['spurfast']:.3f}" if np.isfinite(in_class["spurfast"]) else " | –")
                       + (f" | {best_in} {best_in_ap:.3f}" if best_in else " | –")
                       + f" | {_count(hits)[0]}/{len(hits)}{_na(hits)} | {rec:.2f} |")
    if not out:
        return []
    return ["## Overview", "",
            "Per planted pattern, means over seeds. Spurious score: Yang et al.'s measure of how much the trained "
            "model uses the pattern, the share of held-out images (every class) whose probability of the pattern's "
            "class rises by more than 0.1 once it is stamped on them (a model that never saw the pattern can react "
            "to the stamp too: see the clean model's), over the run's held-out set as drawn: not class-balanced as "
            "the demo's; with a Fashion-MNIST pool, which takes test images of the other classes only, the pattern's "
            "class is over-represented there (about 1/8 of the set in the quick preset, 1/4 in the full one). "
            "Called: the share of correctly classified held-out images of other classes that the stamp makes the "
            "model call the pattern's class (the argmax moves; called \"spurious score\" before the eleventh "
            "session). Pool flip: share of the unrelated pool images carrying it that the model calls its class, the "
            "ceiling of any method that looks inside predicted classes. hit@1 counts the seeds whose top confirmed "
            "finding is the planted class; recall over all patterns of the setting. AP in class: the best finding "
            "among those in the pattern's class (the tables' `AP in target class`).",
            "", "| setting | pattern | spurious score | called | pool flip | AP spurfast | AP spurfast+confirm | "
            "best baseline AP | AP in class spurfast | best baseline AP in class | hit@1 (confirmed) | recall@q0.1 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|", *out, ""]


def _seeds_text(seeds) -> str:
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def _verdict(fails: bool, nan_seeds) -> str:
    """"met" / "NOT met" of a target over per-seed values.  A seed whose value is NaN can
    neither meet nor fail it (``min`` and ``sum`` over a list with a NaN gave a verdict that
    depended on where the NaN stood): where no finite value fails, the verdict is "not
    decided" and names those seeds."""
    if fails:
        return "NOT met" + (f" (value n/a in {_seeds_text(nan_seeds)})" if nan_seeds else "")
    if nan_seeds:
        return f"not decided: value n/a (NaN) in {_seeds_text(nan_seeds)}"
    return "met"


def _on_side(v: float, limit: float, decimals: int = 3) -> str:
    """``v`` to ``decimals`` places, more where fewer would put it on the other side of
    ``limit`` (0.9496 is "0.9496", not "0.950", next to a target of >= 0.95 it fails)."""
    from .report import digits_on_side
    return digits_on_side(v, lambda t: t >= limit, "f", decimals)


def _targets(rows, settings) -> list[str]:
    """The issue's targets, checked against the CSV (only where the CSV has the data)."""
    L = ["## Targets (checked from the CSV)", ""]

    def pairs(setting, method, metric, feature=None):
        """(seed, value) of the setting's rows of ``method`` and ``metric``; NaN in a seed without one."""
        rs = [r for r in rows if r["setting"] == setting]
        return _by_seed([r for r in rs if r["method"] == method], sorted({r["seed"] for r in rs}), feature, metric)

    def vals(setting, method, metric, feature=None):
        return [v for _, v in pairs(setting, method, metric, feature)]

    def nan_seeds(*ps):
        return sorted({seed for p in ps for seed, v in p if not np.isfinite(v)})

    def ints(v):
        return "[" + ", ".join(str(int(x)) if np.isfinite(x) else "nan" for x in v) + "]"

    strong = [s for s in settings if re.match(r"(patch3|noise@1)-n(\d+|all)$", s) and
              (s.endswith("nall") or int(re.findall(r"n(\d+)$", s)[0]) >= 100)]
    for s, m in [(s, m) for s in strong for m in OURS]:
        h, a = pairs(s, m, "hit@1"), pairs(s, m, "auroc")
        ss = vals(s, "model", "spurious_score")
        if not h:
            continue
        hv, av = [v for _, v in h], [v for _, v in a]
        fin_a = [v for v in av if np.isfinite(v)]
        fails = any(np.isfinite(v) and v != 1 for v in hv) or any(v < 0.95 for v in fin_a)
        # a hit@1 that fails decides without the AUROC rows too (it read "not decided")
        verdict = _verdict(fails, nan_seeds(h, a)) if a or fails else "not decided: no AUROC rows"
        L.append(f"- single strong pattern `{s}`, {m}: hit@1 per seed {ints(hv)}, AUROC min "
                 f"{_on_side(min(fin_a), 0.95) if fin_a else 'n/a'} "
                 f"(spurious score {_agg(ss)}) -> target (hit@1 = 1 in every seed, AUROC >= 0.95) {verdict}")
    for s in [s for s in settings if s.startswith("multi3")]:
        p = pairs(s, "spurfast", "recall@q0.1")
        r = [v for _, v in p]
        if not r:
            continue   # spurfast not run: nothing to judge (it read "NOT met")
        verdict = _verdict(any(np.isfinite(x) and x < 2 / 3 - 1e-9 for x in r), nan_seeds(p))
        L.append(f"- three patterns `{s}`: recall at q=0.1 per seed {[round(x, 2) for x in r]} -> target (>= 2/3) "
                 f"{verdict}")
    for s, m in [(s, m) for s in settings if s.startswith("multi3") for m in OURS[1:]]:
        r = vals(s, m, "recall@q0.1")
        if r:
            L.append(f"- three patterns `{s}`, {m}: recall at q=0.1 per seed {[round(x, 2) for x in r]}")
    for s, label in (("clean-model", "clean model"), ("clean-model-clean-pool", "clean model, unstamped pool")):
        for m in OURS:
            p = pairs(s, m, "false_findings@q0.05")
            if p:
                ff = [v for _, v in p]
                n_false = _count(ff)[0]
                n_pool = _count(vals(s, m, "false_on_pool_pattern@q0.05"))[0]
                why = (f" ({n_pool} of them with members mostly carrying the pool's stamped pattern: the clean "
                       f"model's own reaction to it)") if n_pool else ""
                L.append(f"- {label}, {m}: {n_false} false findings at q = 0.05 over {len(ff)} seeds{why} -> "
                         f"target (<= 1) {_verdict(n_false > 1, nan_seeds(p))}")
    for metric, what in (("ap", "AP"), ("ap_in_class", "AP in the planted class")):
        L += _ap_verdicts(rows, settings, metric, what, pairs, vals, nan_seeds)
    return L


def _ap_verdicts(rows, settings, metric: str, what: str, pairs, vals, nan_seeds) -> list[str]:
    """The Targets' "AP beats every baseline" lines on ``metric`` ("ap": the best finding in any
    class; "ap_in_class": in the planted class), named ``what``; a CSV without its rows: none."""
    L = []
    tally = {m: {} for m in OURS}   # method -> verdict kind -> count, over every setting and pattern
    for s in settings:
        if s.startswith("clean-model"):
            continue
        feats = dict.fromkeys(r["feature"] for r in rows if r["setting"] == s and r["metric"] == metric)
        for f in feats:
            aps = {m: vals(s, m, metric, f) for m in METHODS}
            if not aps["spurfast"] or not any(v for m, v in aps.items() if m not in OURS):
                continue   # spurfast or every baseline not run
            # means of the finite seeds, as the tables' (nanmean kept an inf: "spurfast inf", and a verdict on it)
            ap = {m: _finite_mean(v) for m, v in aps.items()}
            best, best_ap = _best_baseline(ap)   # spurfast's; the joined rows' below
            if best is None or not np.isfinite(ap["spurfast"]):
                L.append(f"- {what} `{s}` / {f}: n/a (NaN) in every seed for "
                         f"{'spurfast' if not np.isfinite(ap['spurfast']) else 'every baseline'} (a pattern that no "
                         f"pool image carries has nothing to find) -> not decided")
                continue
            ss = vals(s, "model", "spurious_score", f)
            ss = _finite_mean(ss)
            # every row of spurfast's that the run has (the residual ones: evaluate --residual-scan);
            # a line each for the rankers, a count for the filtered rows (confirmed, supported)
            for m in [m for m in OURS if aps.get(m) and np.isfinite(ap[m])]:
                best, best_ap = _best_baseline(ap, m)
                if best is None:   # its own part the only baseline run: nothing to judge it against
                    continue
                # judged on the printed (3-decimal) means, so the verdict cannot contradict them
                ours, theirs = f"{ap[m]:.3f}", f"{best_ap:.3f}"
                kind = "ties" if ours == theirs else "wins" if float(ours) > float(theirs) else "losses"
                verdict = {"ties": "ties with the best baseline (equal to 3 decimals)", "wins": "beats every baseline",
                           "losses": "does NOT beat every baseline"}[kind]
                na_ours, na_theirs = nan_seeds(pairs(s, m, metric, f)), nan_seeds(pairs(s, best, metric, f))
                if na_ours != na_theirs:   # means over different seeds: no verdict
                    kind = "not decided"
                    verdict = (f"not decided: {what} n/a (NaN) in {_seeds_text(na_ours) if na_ours else 'no seed'} of "
                               f"{m}, {_seeds_text(na_theirs) if na_theirs else 'no seed'} of {best}")
                elif na_ours:
                    verdict += f" (means over the seeds with an AP: n/a in {_seeds_text(na_ours)})"
                tally[m][kind] = tally[m].get(kind, 0) + 1
                if m in RANKERS:
                    L.append(f"- {what} `{s}` / {f}: {m} {ours} vs best baseline {best} {theirs} "
                             f"(spurious score {ss:.2f}) -> {verdict}")
    for m, t in tally.items():
        if t:
            n = sum(t.values())
            L.append(f"- {what} against the best baseline over the {n} setting-pattern pair{'s' * (n != 1)}, {m}: "
                     + ", ".join(f"{t.get(k, 0)} {k}" for k in ("wins", "ties", "losses"))
                     + (f", {t['not decided']} not decided" if t.get("not decided") else ""))
    return L


def _finite_mean(vals) -> float:
    """Mean of the finite values (as `_agg`'s); NaN when none is."""
    v = [x for x in vals if np.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def _plots(rows, crows, plots_dir: Path, rel_to: Path) -> list[str]:
    # Figures of their own, not pyplot: matplotlib.use("Agg") switched the caller's backend
    # (a notebook's inline plots stopped showing after run_evaluation)
    from matplotlib.figure import Figure

    plots_dir.mkdir(parents=True, exist_ok=True)
    out = []
    pairs = list(dict.fromkeys((r["setting"], r["feature"]) for r in rows if r["metric"] == "ap"))
    methods = [m for m in METHODS if any(r["method"] == m and r["metric"] == "ap" for r in rows)]
    if pairs and methods:
        mean = np.full((len(pairs), len(methods)), np.nan)
        sd = np.zeros_like(mean)
        for i, (s, f) in enumerate(pairs):
            for j, m in enumerate(methods):
                v = [r["value"] for r in rows if r["setting"] == s and r["feature"] == f and r["method"] == m
                     and r["metric"] == "ap" and np.isfinite(r["value"])]
                if v:   # as the tables (`_agg`): the finite seeds, sample sd (ddof=1; np.std's 0 drew shorter bars)
                    mean[i, j], sd[i, j] = np.mean(v), (np.std(v, ddof=1) if len(v) > 1 else 0.0)
        if len(pairs) <= 8:   # a few settings: bars with the seeds' spread
            fig = Figure(figsize=(max(5, 1.2 * len(pairs) * len(methods) / 3), 3.5))
            ax = fig.subplots()
            w = 0.8 / len(methods)
            for j, m in enumerate(methods):
                ax.bar(np.arange(len(pairs)) + j * w, mean[:, j], w, yerr=sd[:, j], label=m)
            ax.set_xticks(np.arange(len(pairs)) + 0.4 - w / 2)
            ax.set_xticklabels([f"{s}\n{f}" for s, f in pairs], fontsize=7)
            ax.set_ylabel("average precision (best finding)")
            ax.legend(fontsize=7)
        else:   # a sweep: one row per (setting, pattern), one column per method, mean AP written in
            fig = Figure(figsize=(1.3 * len(methods) + 3, 0.28 * len(pairs) + 1.5))
            ax = fig.subplots()
            im = ax.imshow(mean, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for (i, j), v in np.ndenumerate(mean):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if v < 0.6 else "black")
            ax.set_xticks(range(len(methods)))
            ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=7)
            ax.set_yticks(range(len(pairs)))
            ax.set_yticklabels([s if f in s else f"{s} / {f}" for s, f in pairs], fontsize=7)
            fig.colorbar(im, ax=ax, label="average precision (best finding), mean over seeds")
        fig.tight_layout()
        fig.savefig(plots_dir / "ap.png", dpi=110)
        out.append(f"![average precision per setting and method]({_rel(plots_dir / 'ap.png', rel_to)})")
    cs = [c for c in crows if c["flip_rate"] != ""]
    if cs:
        fig = Figure(figsize=(8, 3.5))
        axes = fig.subplots(1, 2, sharey=True)
        for ax, key, name in zip(axes, ("control_flip_rate", "content_flip_rate"),
                                 ("random-pattern control", "content control")):
            for fam, kind, col, lab in (("cluster", "0", "tab:gray", "false finding"), ("cluster", "1", "tab:red", "true finding"),
                                        ("residual", "0", "tab:blue", "false (residual scan)"),
                                        ("residual", "1", "tab:orange", "true (residual scan)"),
                                        ("features", "0", "tab:green", "false (feature view)"),
                                        ("features", "1", "tab:purple", "true (feature view)")):
                sel = [c for c in cs if c["family"] == fam and c["true_finding"] == kind and c.get(key, "") != ""]
                if sel or fam == "cluster":   # no legend entry for the residual scan where it did not run
                    ax.scatter([float(c[key]) for c in sel], [float(c["flip_rate"]) for c in sel], c=col, label=lab,
                               s=18, marker={"cluster": "o", "residual": "x"}.get(fam, "+"))
            ax.plot([0, 1], [0, 1], "k:", lw=0.8)
            ax.set_xlabel(f"{name} flip rate")
            ax.legend(fontsize=7)
        axes[0].set_ylabel("flip rate of the extracted pattern")
        fig.tight_layout()
        fig.savefig(plots_dir / "confirm.png", dpi=110)
        out.append(f"![confirmation: flip rate vs control]({_rel(plots_dir / 'confirm.png', rel_to)})")
    return out


def _rel(p: Path, base: Path) -> str:
    return os.path.relpath(p, base)
