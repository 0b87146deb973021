"""Plots from the long-format results CSV: one panel per op, throughput (items/s) of each
provider per config, newest measurement of each (op, provider, config, device)."""
from __future__ import annotations

import csv
import os
from pathlib import Path

from .harness import DEFAULT_CSV, check_header


def latest_rows(path) -> dict:
    best: dict = {}
    bad = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            if r["metric"] != "items_per_s":
                continue
            try:   # a row cut short (a run killed mid-write, a full disk) failed the plot with
                float(r["value"])   # float(None)'s TypeError (or len(None)'s, of its device), naming no file
                ok = r["device"] is not None
            except (TypeError, ValueError):
                ok = False
            if not ok:
                bad.append(r)
                continue
            key = (r["op"], r["provider"], r["config"], r["device"])
            if key not in best or r["date"] >= best[key]["date"]:
                best[key] = r
    if bad:
        print(f"[bench] {path}: skipped {len(bad)} items_per_s row(s) without a number in 'value' or a device (cut short?), "
              f"the first of {bad[0]['op']!r} by {bad[0]['provider']!r}")
    return best


def _short(device: str) -> str:
    """A legend's device name: at most 32 characters, the end kept (a CPU's thread count)."""
    return device if len(device) <= 32 else device[:14] + "..." + device[-15:]


def plot(csv_path=None, out_dir=None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(csv_path or os.environ.get("SPURFAST_BENCH_CSV") or DEFAULT_CSV)   # where ResultWriter wrote
    if path.is_dir():   # it was said not to exist
        raise IsADirectoryError(f"results CSV {path} is a folder; expected the CSV file a benchmark wrote")
    if not path.is_file():
        raise FileNotFoundError(f"results CSV {path} does not exist; run a benchmark first")
    check_header(path)
    rows = latest_rows(path)
    if not rows:   # it printed "[bench] wrote " and nothing else: no plots, no word of why
        print(f"[bench] {path} holds no items_per_s rows: no plots written")
        return []
    out_dir = Path(out_dir or path.parent / "plots")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for op in sorted({k[0] for k in rows}):
        sel = sorted((k, r) for k, r in rows.items() if k[0] == op)
        configs = sorted({k[2] for k, _ in sel})
        # whole device names: cut to 24 characters, "cpu:x86_64 x16 threads=16" and "...=1" were one
        # bar (the first row's), the other's figures dropped; only the legend is shortened
        provs = sorted({(k[1], k[3]) for k, _ in sel})
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(configs) * len(provs) ** 0.5), 4), dpi=100)
        width = 0.8 / max(1, len(provs))
        for j, (p, dev) in enumerate(provs):
            ys = [next((float(r["value"]) for k, r in sel if k[1] == p and k[2] == c and k[3] == dev), 0.0)
                  for c in configs]
            ax.bar([i + j * width for i in range(len(configs))], ys, width, label=f"{p} ({_short(dev)})")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))])
        ax.set_xticklabels([c.replace(";", "\n") for c in configs], fontsize=5)
        ax.set_yscale("log")
        ax.set_ylabel("items/s (newest run)")
        ax.set_title(op)
        ax.legend(fontsize=6)
        fig.tight_layout()
        f = out_dir / f"{op}.png"
        fig.savefig(f)
        plt.close(fig)
        written.append(f)
    print(f"[bench] wrote {', '.join(str(w) for w in written)}")
    return written
