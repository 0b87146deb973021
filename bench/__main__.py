"""python -m bench {classifier,encoder,kmeans,triton-shapes,loader,e2e,confirm,residual,plot,all}
[--quick] [--csv PATH]"""
from __future__ import annotations

import argparse
import importlib
import sys

SUITES = {
    "classifier": "bench.bench_classifier",
    "encoder": "bench.bench_encoder",
    "kmeans": "bench.bench_kmeans",
    "triton-shapes": "bench.bench_triton_shapes",   # GPU only
    "loader": "bench.bench_loader",
    "e2e": "bench.bench_e2e",
    "confirm": "bench.bench_confirm",
    "residual": "bench.bench_residual",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("suite", choices=sorted(SUITES) + ["plot", "all"])
    ap.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    ap.add_argument("--csv", default=None, help="results CSV (default bench/results.csv)")
    # cpu or cuda only: the suites pick their GPU providers on device == "cuda", so cuda:0 ran
    # the torch reference alone and triton-shapes skipped itself as "GPU only"
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    args = ap.parse_args(argv)
    if args.device not in (None, "cpu") and args.suite != "plot":
        import torch
        if not torch.cuda.is_available():   # encoder and e2e raised CUDA's own error (e2e after its pool)
            ap.error(f"--device {args.device}: torch sees no CUDA device here; use --device cpu")
    from .harness import ResultWriter

    try:   # a folder, a missing CSV or another file: one line, not a traceback (a suite's after its first measurement)
        if args.suite == "plot":
            from .plot import plot
            plot(args.csv)
            return 0
        writer = ResultWriter(args.csv)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError) as exc:   # ValueError: another file's columns
        ap.error(str(exc))
    names = sorted(SUITES) if args.suite == "all" else [args.suite]
    mods = {}
    for name in names:
        try:
            mods[name] = importlib.import_module(SUITES[name])
        except ModuleNotFoundError as exc:
            print(f"[bench] suite {name} not available: {exc}", file=sys.stderr)
    # every suite's SPURFAST_BENCH_* variables before any measurement: in `all`, a bad one
    # failed (with a traceback) only once its suite came, after those sorted before it had run
    for mod in mods.values():
        try:
            getattr(mod, "check_env", lambda: None)()
        except ValueError as exc:
            ap.error(str(exc))
    for mod in mods.values():
        mod.run(writer, quick=args.quick, device=args.device)
    print(f"[bench] {len(writer.rows)} rows appended to {writer.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
