"""The benchmark harness's bookkeeping: percentiles, peak memory, GB/s counts, warm-ups.
Nothing here passes or fails on a measured time: clocks are scripted where times matter."""
import csv
import re
import time

import numpy as np
import pytest
import torch

from bench import bench_kmeans as bk
from bench import harness
from bench.harness import ResultWriter, measure

MiB = 2 ** 20


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


needs_peak_reset = pytest.mark.skipif(not _can_reset_peak(), reason="no /proc/self/clear_refs (not Linux)")


class FakeClock:
    """time.perf_counter stand-in: advances only when a benchmarked call says so."""

    def __init__(self, log=None):
        self.now, self.log = 0.0, log

    def __call__(self):
        if self.log is not None:
            self.log.append("clock")
        return self.now

    def spend(self, seconds):
        self.now += seconds


def _rows(path):
    return list(csv.DictReader(open(path)))


def _big():   # a 256 MiB temporary, returned to the OS when freed
    return torch.ones(256 * MiB // 4).sum()


def _small():
    return torch.ones(1024).sum()


# ----------------------------------------------------------------------------- bug 3
def test_p20_p80_stay_within_the_measured_times(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    steps = iter([0.0, 0.0, 0.010, 0.030, 0.032])            # 2 warm-ups, then 3 timed reps
    st = measure(lambda: clock.spend(next(steps)), reps=3)
    assert 0.010 <= st["p20_s"] <= st["median_s"] <= st["p80_s"] <= 0.032, st

    # the side-by-side rounds: a step timed directly and a fit timed by differencing
    R = bk.DIFF_ITERS
    step_times = iter([0.0, 0.010, 0.030, 0.032])            # warm-up, then 3 rounds
    fit_times = iter([0.0, 0.0] + [t for per in (0.010, 0.030, 0.032) for t in (0.1, 0.1 + R * per)])
    out = bk._interleaved({"step": ("step", lambda: clock.spend(next(step_times))),
                           "fit": ("fit", lambda n: clock.spend(next(fit_times)))}, "cpu", 3)
    for name, st in out.items():
        assert 0.010 - 1e-9 <= st["p20_s"] <= st["median_s"] <= st["p80_s"] <= 0.032 + 1e-9, (name, st)
    # a fit's median is the paired differences' median, as its spread is: the difference of the
    # two medians (here 10 ms) fell outside the differences' p20-p80 (a committed sklearn row did)
    ones, manys = [0.050, 0.050, 0.010, 0.010, 0.010], [0.060, 0.060, 0.060, 0.015, 0.015]
    fit_times = iter([0.0, 0.0] + [t for pair in zip(ones, manys) for t in pair])
    st = bk._interleaved({"fit": ("fit", lambda n: clock.spend(next(fit_times)))}, "cpu", 5)["fit"]
    assert st["p20_s"] <= st["median_s"] <= st["p80_s"], st
    assert st["median_s"] == pytest.approx(0.010 / R), st   # pairs: 10, 10, 50, 5, 5 ms over R


def test_a_fit_timed_faster_with_more_iterations_gives_no_negative_time(monkeypatch, capsys):
    # load on a shared machine made a round's longer fit faster: a committed sklearn row had
    # p20_s -0.06 (the median alone was clamped)
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    ones, manys = [0.50, 0.50, 0.010, 0.010, 0.010], [0.10, 0.20, 0.060, 0.060, 0.060]
    fit_times = iter([0.0, 0.0] + [t for pair in zip(ones, manys) for t in pair])
    st = bk._interleaved({"fit": ("fit", lambda n: clock.spend(next(fit_times)))}, "cpu", 5)["fit"]
    assert 0 < st["p20_s"] <= st["median_s"] <= st["p80_s"], st
    assert st["median_s"] == pytest.approx(0.050 / bk.DIFF_ITERS), st
    assert "fit: 2 of 5 rounds timed the longer fit no slower than the shorter" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bug 2
@needs_peak_reset
def test_cpu_peak_is_each_measurements_own():
    big = measure(_big, warmup=0, reps=1)
    small = measure(_small, warmup=0, reps=1)   # must not inherit big's high-water mark
    assert small["peak_bytes"] < big["peak_bytes"] - 128 * MiB, (small["peak_bytes"] / MiB, big["peak_bytes"] / MiB)
    assert big["peak_source"] == small["peak_source"] == "vmhwm"


def test_cpu_peak_falls_back_to_ru_maxrss_and_the_row_says_so(tmp_path, monkeypatch):
    real_open = open

    def no_clear_refs(path, *a, **kw):
        if str(path) == "/proc/self/clear_refs":
            raise PermissionError(path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", no_clear_refs)
    st = measure(_small, warmup=0, reps=1)
    monkeypatch.undo()
    assert st["peak_source"] == "ru_maxrss" and st["peak_bytes"] > 0
    w = ResultWriter(tmp_path / "r.csv")
    w.add_timing("op", "p", {}, st, "cpu")
    metrics = [r["metric"] for r in _rows(tmp_path / "r.csv")]
    assert "peak_memory_process_max" in metrics and "peak_memory" not in metrics


# ----------------------------------------------------------------------------- bug 1
@needs_peak_reset
def test_interleaved_rows_carry_each_providers_peak():
    out = bk._interleaved({"big": ("step", _big), "small": ("step", _small),
                           "big-fit": ("fit", lambda n: _big())}, "cpu", 3)
    assert out["small"]["peak_bytes"] > 0
    assert out["big"]["peak_bytes"] > out["small"]["peak_bytes"] + 128 * MiB
    assert out["big-fit"]["peak_bytes"] > out["small"]["peak_bytes"] + 128 * MiB


# ----------------------------------------------------------------------------- bug 5
def test_interleaved_synchronizes_the_gpu_before_the_first_timed_sample(monkeypatch):
    log = []
    monkeypatch.setattr(time, "perf_counter", FakeClock(log))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: log.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 1)
    bk._interleaved({"s": ("step", lambda: log.append("fn"))}, "cuda", 2)
    assert log[0] == "fn"                                  # the warm-up call
    assert log.index("sync") < log.index("clock"), log    # its queued work done before timing starts


def test_the_batching_gain_is_logged_against_the_reference_it_batches(tmp_path, monkeypatch, capsys):
    # the per-group loop calls the torch reference, but its time was divided by the fused CPU
    # kernel's: "1298.8x faster" where batching alone gave 13x (the kernel's own gain mixed in)
    monkeypatch.setattr(bk, "_configs", lambda quick, device: iter([dict(N=2000, d=8, k=4, G=10)]))
    monkeypatch.setattr(bk, "_plusplus_rows", lambda *a, **kw: None)
    monkeypatch.setattr(bk, "_knn_rows", lambda *a, **kw: None)
    bk.run(ResultWriter(tmp_path / "k.csv"), quick=True, device="cpu")
    med = {r["provider"]: float(r["value"]) for r in _rows(tmp_path / "k.csv")
           if r["op"] == "kmeans_iter" and r["metric"] == "median_s"}
    err = capsys.readouterr().err
    for batched in [p for p in ("torch", "cpu") if p in med]:
        line = f"{batched} batched / per-group loop of the torch reference at N=2000 d=8 k=4 G=10: "
        assert f"{line}{med['torch-loop'] / med[batched]:.1f}x faster" in err, err
    assert "torch batched" in err


# ----------------------------------------------------------------------------- bug 6
def test_gbytes_per_s_only_where_the_providers_traffic_is_known(tmp_path, monkeypatch):
    N, d, k = 3000, 8, 4
    monkeypatch.setattr(bk, "_configs", lambda quick, device: iter([dict(N=N, d=d, k=k, G=1, side_by_side=True)]))
    monkeypatch.setattr(bk, "_plusplus_rows", lambda *a, **kw: None)
    monkeypatch.setattr(bk, "_knn_rows", lambda *a, **kw: None)
    bk.run(ResultWriter(tmp_path / "k.csv"), quick=True, device="cpu")
    rows = [r for r in _rows(tmp_path / "k.csv") if r["op"] == "kmeans_iter"]
    by = {(r["provider"], r["metric"]): float(r["value"]) for r in rows if "vs=" not in r["config"]}
    providers = {p for p, _ in by}
    assert {"torch", "torch-fit"} <= providers
    with_gbs = {p for p, m in by if m == "gbytes_per_s"}
    assert with_gbs == providers & {"torch", "cpu"}, with_gbs   # *-fit and the peers: not known
    for p in with_gbs:   # x read twice by the reference, once by the fused cpu kernel
        reads = 1 if p == "cpu" else 2
        nbytes = reads * N * d * 4 + k * d * 4 + N * 12
        assert by[(p, "gbytes_per_s")] == pytest.approx(nbytes / by[(p, "median_s")] / 1e9, rel=1e-4)
    if _can_reset_peak():   # bug 1 in a real run: no side-by-side row records a zero peak
        assert all(by[(p, "peak_memory")] > 0 for p in providers)


# ----------------------------------------------------------------------------- bug 4
def test_cluster_stage_is_timed_after_an_untimed_call(tmp_path, monkeypatch):
    import spurfast.cluster
    from bench import bench_e2e
    from spurfast.store import EmbeddingStore
    from spurfast.make_pool import PoolSpec, make_pool

    monkeypatch.setenv("SPURFAST_BENCH_DIR", str(tmp_path / "bench"))
    monkeypatch.setattr(bench_e2e, "TRAIN_IMAGES", 40)   # the fitted classifier's 2,000 take seconds
    pool = tmp_path / "pool"
    make_pool(pool, PoolSpec(n=12, classes=bench_e2e.CLASSES, min_size=64, max_size=64), workers=1, progress=False)
    clf, vae = bench_e2e.ensure_models()
    n = 400
    store = EmbeddingStore.create(tmp_path / "store", n, {"pred": ((n,), "int32"), "mu": ((n, 16), "float32")}, {})
    rng = np.random.default_rng(0)
    store.write(0, {"pred": (np.arange(n) % bench_e2e.CLASSES).astype(np.int32),
                    "mu": rng.normal(size=(n, 16)).astype(np.float32)})

    kmeans_calls = [0]
    real_kmeans = spurfast.cluster.batched_kmeans

    def counting_kmeans(*a, **kw):
        kmeans_calls[0] += 1
        return real_kmeans(*a, **kw)

    seen = []

    def spy_measure(fn, *, device="cpu", warmup=2, reps=10, min_time=0.0):
        before = kmeans_calls[0]
        fn()   # once: what is measured, not how fast
        seen.append((kmeans_calls[0] > before, warmup, reps))
        return {"median_s": 1.0, "p20_s": 1.0, "p80_s": 1.0, "peak_bytes": 0, "reps": reps}

    monkeypatch.setattr(spurfast.cluster, "batched_kmeans", counting_kmeans)
    monkeypatch.setattr(harness, "measure", spy_measure)
    rates = bench_e2e.stage_rates(pool, clf, vae, 12, tmp_path / "store", "cpu", other_classifiers=False)
    assert "cluster" in rates
    # each stage row names who ran it: every one was "torch", the fused CPU k-means included
    from spurfast import backends
    assert rates["providers"] == {"load": rates["loader"], "decode_1proc": "pil",
                                  "encode": backends.resolve("encoder", None, "cpu")[0],
                                  "cluster": backends.resolve("kmeans_assign", None, "cpu")[0]}
    (warmup, reps), = [(w, r) for is_kmeans, w, r in seen if is_kmeans]
    assert warmup >= 1 and reps >= 3, (warmup, reps)


def test_e2e_worker_times_the_run_users_get(tmp_path, monkeypatch):
    # the worker repeated run_discovery's report steps by hand (a copy that had to follow the
    # pipeline); it now runs run_discovery and times each of its steps
    import json
    from bench import bench_e2e
    from spurfast.make_pool import PoolSpec, make_pool

    monkeypatch.setenv("SPURFAST_BENCH_DIR", str(tmp_path / "bench"))
    monkeypatch.setattr(bench_e2e, "TRAIN_IMAGES", 40)
    pool = tmp_path / "pool"
    make_pool(pool, PoolSpec(n=40, classes=bench_e2e.CLASSES, min_size=64, max_size=64), workers=1, progress=False)
    clf, vae = bench_e2e.ensure_models()
    out = tmp_path / "run"
    assert bench_e2e.worker(["--pool", str(pool), "--out", str(out), "--clf", str(clf), "--vae", str(vae),
                             "--n-null", "3", "--batch-size", "16"]) == 0
    rec = json.loads((out / "timings-rank0.json").read_text())
    for key in ("embed_s", "discover_s", "characterise_s", "rank_s", "confirm_s", "report_s", "total_s"):
        assert rec[key] >= 0, (key, rec)
    steps = rec["embed_s"] + rec["discover_s"] + rec["report_s"]
    assert abs(steps - rec["total_s"]) < 1e-6, rec
    assert rec["report_s"] >= rec["characterise_s"] + rec["rank_s"] + rec["confirm_s"] - 1e-6, rec
    assert set(rec["peak_rss_after"]) == {"ready", "embed", "discover", "report"}, rec
    assert rec["embed_split"]["compute_s"] > 0, rec
    assert (out / "report.html").is_file() and (out / "findings.json").is_file()   # the real run's outputs
    doc = json.loads((out / "findings.json").read_text())
    assert len(doc["findings"]) == rec["n_findings"]


def test_an_emptied_results_csv_gets_its_header(tmp_path):
    # `: > results.csv` to start afresh: rows were appended without a header, so the first
    # row became the header and `python -m bench plot` found nothing
    path = tmp_path / "r.csv"
    path.write_text("")
    ResultWriter(path).add("op", "p", {"a": 1}, "items_per_s", 2.0, "1/s", "cpu")
    rows = _rows(path)
    assert len(rows) == 1 and rows[0]["op"] == "op" and rows[0]["value"] == "2", rows


def test_plot_reads_the_csv_the_writer_wrote_to(tmp_path, monkeypatch):
    # SPURFAST_BENCH_CSV moved the rows but `python -m bench plot` still drew bench/results.csv
    from bench.plot import plot

    monkeypatch.setenv("SPURFAST_BENCH_CSV", str(tmp_path / "r.csv"))
    ResultWriter().add("op", "p", {"a": 1}, "items_per_s", 2.0, "1/s", "cpu")
    assert plot() == [tmp_path / "plots" / "op.png"] and (tmp_path / "plots" / "op.png").is_file()


def test_an_empty_results_csv_variable_means_the_default(monkeypatch):
    # SPURFAST_BENCH_CSV= (set to nothing) made the path ".": the first row raised IsADirectoryError
    # after its measurement, while `bench plot` read the default
    monkeypatch.setenv("SPURFAST_BENCH_CSV", "")
    assert ResultWriter().path == harness.DEFAULT_CSV


def test_plot_keeps_devices_whose_names_share_their_first_24_characters(tmp_path, monkeypatch):
    # devices were cut to 24 characters before matching: "cpu:x86_64 x16 threads=16" and
    # "cpu:x86_64 x16 threads=1" made one bar, and the second one's figures were dropped
    import matplotlib.axes

    from bench.plot import plot

    bars = []
    orig = matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar",
                        lambda self, xs, ys, *a, **k: bars.append((k.get("label"), list(ys))) or orig(self, xs, ys, *a, **k))
    w = ResultWriter(tmp_path / "r.csv")
    w.add("op", "p", {"a": 1}, "items_per_s", 5.0, "1/s", "cpu:x86_64 x16 threads=16")
    w.add("op", "p", {"a": 1}, "items_per_s", 2.0, "1/s", "cpu:x86_64 x16 threads=1")
    plot(tmp_path / "r.csv")
    assert sorted(bars) == [("p (cpu:x86_64 x16 threads=1)", [2.0]), ("p (cpu:x86_64 x16 threads=16)", [5.0])], bars


def test_bench_device_cuda_without_a_gpu_is_refused_up_front(tmp_path, monkeypatch, capsys):
    # encoder raised CUDA's "Found no NVIDIA driver" traceback; e2e generated its pool first
    from bench import bench_encoder
    from bench.__main__ import main as bench_main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench_encoder, "run", lambda *a, **k: pytest.fail("the suite ran"))
    with pytest.raises(SystemExit) as e:
        bench_main(["encoder", "--quick", "--device", "cuda", "--csv", str(tmp_path / "r.csv")])
    assert e.value.code == 2 and "--device cuda: torch sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "r.csv").exists()


def test_gpu_check_keeps_to_its_budget_and_a_cut_test_step_still_reports(tmp_path):
    """bench/gpu_check.sh on the one GPU run a session gets: the GPU test step (329 tests, the
    Triton ones compiling cold) had a fixed 180 s under TERM, which leaves pytest's output
    without its failure summary, and the steps' limits added up past the device tool's 600 s
    per command, which then kills the script before its summary.  A scripted python stands
    in: its pytest runs until stopped, and prints its summary on SIGINT."""
    import tarfile

    fake = tmp_path / "python"
    fake.write_text("#!/bin/bash\n"
                    'if [ "$1 $2" = "-m pytest" ]; then\n'
                    '  trap \'echo "FAILED tests/test_x.py::test_y - summary after SIGINT"; exit 2\' INT\n'
                    "  while :; do sleep 0.2; done\n"
                    "fi\n"
                    '[ "$1" = "-" ] && cat > /dev/null\n'
                    '[ "$1" = "-c" ] && exit 1\n'
                    "exit 0\n")
    fake.chmod(0o755)
    # a 3 s least step and 2 s for the summary (30 and 15 by default): the tests step is cut after ~6 s
    out, stdout = _run_gpu_check(tmp_path, fake, budget=8, timeout=30, steps="tests kmeans",
                                 env={"SPURFAST_GPU_CHECK_MIN_STEP": "3", "SPURFAST_GPU_CHECK_RESERVE": "2"})
    steps = (out / "steps.log").read_text()
    # the device tool hands back 8 files at most: the logs come packed beside the CSV and steps.log
    assert {p.name for p in out.iterdir()} <= {"logs.tgz", "results.csv", "steps.log"}, list(out.iterdir())
    with tarfile.open(out / "logs.tgz") as tar:
        assert "summary after SIGINT" in tar.extractfile("./gpu_tests.log").read().decode(), steps
    assert "kmeans skipped: the 8 s budget is spent" in steps, steps
    assert "[gpu_check]" in stdout and "done" in steps.splitlines()[-1], steps


def test_gpu_check_measures_the_open_targets_before_the_tests(tmp_path):
    """The GPU tests ran first and may take 330 s of the 570 s budget, which left the e2e
    benchmark (issue 7's H200 target) none: the steps now run in the order of
    SPURFAST_GPU_CHECK_STEPS, by default the k-means and e2e benchmarks first."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/bash\n"
                    '[ "$1" = "-" ] && cat > /dev/null\n'
                    '[ "$1" = "-c" ] && exit 1\n'
                    "exit 0\n")
    fake.chmod(0o755)
    out, _ = _run_gpu_check(tmp_path, fake, budget=120, timeout=60)
    ran = [line.split("s ", 1)[1] for line in (out / "steps.log").read_text().splitlines()
           if line.split("s ", 1)[-1] in ("kmeans", "e2e", "confirm", "tests", "encoder", "shapes")]
    assert ran == ["kmeans", "e2e", "confirm", "tests", "encoder", "shapes"], ran
    out, _ = _run_gpu_check(tmp_path / "b", fake, budget=120, timeout=60, steps="encoder tests nosuch")
    log = (out / "steps.log").read_text()
    assert log.index("s encoder\n") < log.index("s tests\n") and "unknown step nosuch" in log, log


def test_gpu_check_summary_shows_the_encoders_roofline_share(tmp_path):
    """The closing table (what the device tool hands back) kept "roofline_frac" in its set but
    printed encoder rows only for images/s: the figure that sets the kernel against the H200's
    limit stayed inside results.csv."""
    import subprocess
    import sys
    from pathlib import Path

    script = (Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh").read_text()
    summary = script.rsplit("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    csv_path = tmp_path / "results.csv"
    csv_path.write_text("date,op,provider,config,metric,value,unit,device,versions\n"
                        "d,encoder,triton,arch=rgb64;batch=256;dtype=bf16,items_per_s,325000,1/s,H200,v\n"
                        "d,encoder,triton,arch=rgb64;batch=256;dtype=bf16,roofline_frac,0.031,1,H200,v\n"
                        "d,encoder,triton,arch=rgb64;batch=64;dtype=bf16,roofline_frac,0.02,1,H200,v\n")
    out = subprocess.run([sys.executable, "-", str(csv_path)], input=summary, capture_output=True, text=True,
                         check=True).stdout
    assert [line.split()[-2:] for line in out.splitlines()] == [["items_per_s", "3.25e+05"], ["roofline_frac", "0.031"]], out


@pytest.mark.parametrize("device", ["cuda:0", pytest.param("gpu", id="named-gpu")])   # (an id "gpu" is the marker)
def test_bench_device_other_than_cpu_or_cuda_is_refused(monkeypatch, capsys, device):
    # --device cuda:0 on a GPU machine ran bench kmeans with the torch reference alone (its GPU
    # providers are chosen on device == "cuda") and triton-shapes skipped itself as GPU-only;
    # "gpu" reached torch.device and raised there
    from bench import bench_kmeans
    from bench.__main__ import main as bench_main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_kmeans, "run", lambda *a, **k: pytest.fail("the suite ran"))
    with pytest.raises(SystemExit) as e:
        bench_main(["kmeans", "--quick", "--device", device])
    assert e.value.code == 2 and "--device" in capsys.readouterr().err


def test_gpu_check_caps_its_probes_by_the_budget_too(tmp_path):
    """The probes before the steps (nvidia-smi, the versions script, the pointer-argument check,
    the optional wheels) had fixed limits outside the budget: a CUDA init that hangs in them took
    up to 300 s, past the device tool's 600 s with the steps after them.  A scripted python
    hangs in every stdin script; with a 20 s budget the check must still end with its summary."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/bash\n"
                    '[ "$1" = "-" ] && [ -z "$2" ] && while :; do sleep 0.2; done\n'   # the probes: CUDA init hangs
                    '[ "$1" = "-" ] && cat > /dev/null\n'
                    '[ "$1" = "-c" ] && exit 1\n'
                    "exit 0\n")
    fake.chmod(0o755)
    out, _ = _run_gpu_check(tmp_path, fake, budget=20, timeout=45)
    steps = (out / "steps.log").read_text()
    assert "kmeans skipped: the 20 s budget is spent" in steps and "tests skipped" in steps, steps
    assert "done" in steps.splitlines()[-1], steps


def _run_gpu_check(tmp_path, fake_python, *, budget: int, timeout: int, steps: str | None = None,
                   env: dict | None = None):
    """Run bench/gpu_check.sh with a scripted python, a no-op make, a ``budget`` (s) and
    ``steps`` (SPURFAST_GPU_CHECK_STEPS; None: its default); kill its whole session and fail
    if it runs past ``timeout``.  Returns ($OUT, its stdout)."""
    import os
    import signal
    import subprocess
    from pathlib import Path

    (tmp_path / "bin").mkdir(parents=True)
    (tmp_path / "bin" / "make").write_text("#!/bin/sh\nexit 0\n")   # the fatbin build, where nvcc is found
    (tmp_path / "bin" / "make").chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=str(fake_python), SPURFAST_GPU_CHECK_BUDGET=str(budget),
               PATH=f"{tmp_path / 'bin'}:/usr/bin:/bin", **({} if steps is None else {"SPURFAST_GPU_CHECK_STEPS": steps}),
               **(env or {}))
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:   # every process of its session (timeout makes its own groups)
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[3]) == proc.pid:
                    os.kill(int(stat.parent.name), signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                pass
        proc.communicate()
        pytest.fail(f"gpu_check.sh ran past its {budget} s budget")
    return out, stdout


def test_plot_of_a_csv_without_throughput_rows_says_so(tmp_path, capsys):
    # it printed "[bench] wrote " (an empty list) and made an empty plots folder
    from bench.plot import plot

    w = ResultWriter(tmp_path / "r.csv")
    w.add("op", "p", {"a": 1}, "median_s", 0.5, "s", "cpu")
    assert plot(tmp_path / "r.csv") == [] and not (tmp_path / "plots").exists()
    assert f"{tmp_path / 'r.csv'} holds no items_per_s rows: no plots written" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["1e5", "-5", "600,x"])
def test_a_bad_e2e_sizes_variable_is_named(monkeypatch, value):
    # int()'s "invalid literal for int() with base 10: '1e5'" named no variable; "-5" reached make-pool
    from bench import bench_e2e

    monkeypatch.setenv("SPURFAST_BENCH_E2E_SIZES", value)
    monkeypatch.setattr(bench_e2e, "ensure_models", lambda: pytest.fail("the benchmark started"))
    with pytest.raises(ValueError, match=r"SPURFAST_BENCH_E2E_SIZES=.*expected comma-separated integers >= 1"):
        bench_e2e.run(None, quick=True, device="cpu")


def test_e2e_sizes_with_a_trailing_comma_and_an_empty_threads_variable_are_read(monkeypatch):
    # "100000," raised int()'s error on '', and SPURFAST_BENCH_THREADS= (set to nothing) did too
    from bench import bench_e2e, bench_loader

    class Started(Exception):
        pass

    monkeypatch.setenv("SPURFAST_BENCH_E2E_SIZES", " 700, 600,")
    pools = []
    monkeypatch.setattr(bench_e2e, "ensure_models", lambda: ("c", "v"))
    monkeypatch.setattr(bench_e2e, "ensure_pool", lambda n: pools.append(n) or (_ for _ in ()).throw(Started()))
    with pytest.raises(Started):
        bench_e2e.run(None, quick=True, device="cpu")
    assert pools == [700]
    monkeypatch.setenv("SPURFAST_BENCH_THREADS", "")
    monkeypatch.setattr(bench_loader, "image_folder", lambda n: (_ for _ in ()).throw(Started()))
    with pytest.raises(Started):
        bench_loader.run(None, quick=True, device="cpu")
    assert harness.env_ints("SPURFAST_BENCH_E2E_SIZES") == [700, 600]


@pytest.mark.parametrize("suite", ["kmeans", "plot"])
def test_a_results_csv_that_is_a_folder_is_refused_up_front(tmp_path, monkeypatch, capsys, suite):
    # a suite raised IsADirectoryError at its first row, after that row's measurement; plot said
    # the folder did not exist
    from bench import bench_kmeans
    from bench.__main__ import main as bench_main

    monkeypatch.setattr(bench_kmeans, "run", lambda *a, **k: pytest.fail("the suite ran"))
    with pytest.raises(SystemExit) as e:
        bench_main([suite, "--quick", "--device", "cpu", "--csv", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"results CSV {tmp_path} is a folder" in err, err


@pytest.mark.parametrize("tail", ["/", "/."])
def test_a_results_csv_naming_a_folder_not_made_yet_is_refused_up_front(tmp_path, monkeypatch, capsys, tail):
    # --csv out/ (no such folder yet): Path dropped the "/", and the rows went to a file "out"
    from bench import bench_kmeans
    from bench.__main__ import main as bench_main

    monkeypatch.setattr(bench_kmeans, "run", lambda *a, **k: pytest.fail("the suite ran"))
    csv_arg = str(tmp_path / "out") + tail
    with pytest.raises(SystemExit) as e:
        bench_main(["kmeans", "--quick", "--device", "cpu", "--csv", csv_arg])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"results CSV {csv_arg} names a folder" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["rel", ""])
def test_a_relative_or_empty_bench_dir_names_the_same_folder_for_the_runs(tmp_path, monkeypatch, value):
    # the runs start in the repository root: a relative SPURFAST_BENCH_DIR given from elsewhere made
    # the pool here and failed there ("image folder rel/pool-600 does not exist"); an empty one was
    # the working folder, where SPURFAST_BENCH_CSV's empty value is the default
    import subprocess
    import tempfile
    from pathlib import Path

    from bench import bench_e2e

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPURFAST_BENCH_DIR", value)
    want = tmp_path / "rel" if value else Path(tempfile.gettempdir()) / "spurfast-bench"
    assert bench_e2e.bench_dir() == want
    seen = {}

    def fake_run(cmd, cwd=None, **kw):
        seen["pool"] = Path(cwd) / cmd[cmd.index("--pool") + 1]
        seen["out"] = Path(cwd) / cmd[cmd.index("--out") + 1]
        raise RuntimeError("stop")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="stop"):
        bench_e2e.run_e2e(bench_e2e.bench_dir() / "pool-12", Path("c.pt"), Path("v.pt"), 1, 5)
    assert seen == {"pool": want / "pool-12", "out": want / "run-pool-12-p1"}


def test_generated_bench_data_goes_under_the_bench_dir_and_rows_name_the_code(tmp_path, monkeypatch):
    # the loader suite wrote its JPEGs into the checkout (build/bench_images) whatever
    # SPURFAST_BENCH_DIR said; the versions column named no spurfast commit; a 1-process e2e run
    # inherited OMP_NUM_THREADS=1 while its row said cores=2
    import subprocess
    from pathlib import Path

    from bench import bench_e2e, bench_loader
    from bench.harness import versions
    from spurfast.cores import usable_cores

    monkeypatch.setenv("SPURFAST_BENCH_DIR", str(tmp_path))
    paths = bench_loader.image_folder(2)
    assert all(Path(p).is_file() and Path(p).parent.parent == tmp_path / "loader-images" for p in paths)
    assert re.search(r"^spurfast=\S+ torch=", versions())
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    seen = {}

    def fake_run(cmd, env=None, **kw):
        seen["threads"] = env["OMP_NUM_THREADS"]
        raise RuntimeError("stop")
    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="stop"):
        bench_e2e.run_e2e(tmp_path / "pool-12", Path("c.pt"), Path("v.pt"), 1, 5)
    assert seen["threads"] == str(usable_cores())


def test_a_csv_of_other_columns_is_refused_before_a_row_is_appended(tmp_path, capsys):
    # `--csv out/eval/results.csv` appended benchmark rows under the evaluation's header without a
    # word, and `bench plot` on such a file failed with KeyError: 'metric'
    from bench.__main__ import main as bench_main
    from bench.plot import plot

    f = tmp_path / "results.csv"
    f.write_text("setting,seed,rank\nx,0,1\n")
    with pytest.raises(ValueError, match=r"results CSV .*results.csv has the columns \['setting', 'seed', 'rank'\]"):
        ResultWriter(f)
    with pytest.raises(ValueError, match="not a benchmark's"):
        plot(f)
    for suite in ("plot", "kmeans"):
        with pytest.raises(SystemExit) as e:
            bench_main([suite, "--quick", "--device", "cpu", "--csv", str(f)])
        assert e.value.code == 2 and "not a benchmark's" in capsys.readouterr().err
    assert f.read_text() == "setting,seed,rank\nx,0,1\n"
    ResultWriter(f.with_name("new.csv")).add("op", "p", {"a": 1}, "items_per_s", 2.0, "1/s", "cpu")
    ResultWriter(f.with_name("new.csv")).add("op", "p", {"a": 1}, "items_per_s", 3.0, "1/s", "cpu")
    assert len(plot(f.with_name("new.csv"))) == 1


def test_a_list_of_loader_threads_is_refused(monkeypatch):
    # SPURFAST_BENCH_THREADS=4,8 measured at 4 threads alone and said nothing of the 8
    from bench import bench_loader

    monkeypatch.setenv("SPURFAST_BENCH_THREADS", "4,8")
    monkeypatch.setattr(bench_loader, "image_folder", lambda n: pytest.fail("the benchmark started"))
    with pytest.raises(ValueError, match=r"SPURFAST_BENCH_THREADS='4,8': expected one integer >= 1"):
        bench_loader.run(None, quick=True, device="cpu")


def test_the_runs_keep_the_callers_python_path(tmp_path, monkeypatch):
    # PYTHONPATH was replaced by the repository root: packages installed on the caller's path
    # (gpu_check.sh puts wheels in /tmp/site) were missing from the timed runs alone
    import os
    import subprocess

    from bench import bench_e2e

    monkeypatch.setenv("SPURFAST_BENCH_DIR", str(tmp_path))
    seen = []

    def fake_run(cmd, env=None, **kw):
        seen.append(env["PYTHONPATH"])
        raise RuntimeError("stop")

    monkeypatch.setattr(subprocess, "run", fake_run)
    for given, want in (("/tmp/site", f"{bench_e2e.ROOT}{os.pathsep}/tmp/site"), ("", str(bench_e2e.ROOT))):
        monkeypatch.setenv("PYTHONPATH", given)
        with pytest.raises(RuntimeError, match="stop"):
            bench_e2e.run_e2e(tmp_path / "pool-12", tmp_path / "c.pt", tmp_path / "v.pt", 1, 5)
        assert seen[-1] == want


def test_a_csv_under_a_file_is_refused_up_front(tmp_path, monkeypatch, capsys):
    # --csv notes.txt/r.csv failed at the first row's mkdir ("[Errno 17] File exists"), after its measurement
    from bench import bench_kmeans
    from bench.__main__ import main as bench_main

    (tmp_path / "notes.txt").write_text("mine")
    f = tmp_path / "notes.txt" / "sub" / "r.csv"
    with pytest.raises(NotADirectoryError, match=r"results CSV .*r.csv: .*notes.txt is a file, not a folder"):
        ResultWriter(f)
    monkeypatch.setattr(bench_kmeans, "run", lambda *a, **k: pytest.fail("the suite ran"))
    with pytest.raises(SystemExit) as e:
        bench_main(["kmeans", "--quick", "--device", "cpu", "--csv", str(f)])
    assert e.value.code == 2 and "notes.txt is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_cut_short_pool_json_is_regenerated_not_a_traceback_forever(tmp_path, monkeypatch):
    # make-pool writes pool.json in place: one cut short failed every later e2e run in json.loads,
    # and make-pool itself refused the folder (no readable make-pool pool.json)
    from bench import bench_e2e

    monkeypatch.setenv("SPURFAST_BENCH_DIR", str(tmp_path / "bench"))
    made = []
    import spurfast.make_pool
    real = spurfast.make_pool.make_pool
    monkeypatch.setattr(spurfast.make_pool, "make_pool", lambda d, spec, **kw: made.append(d) or
                        real(d, spurfast.make_pool.PoolSpec(**{**spec.__dict__, "n": 12, "fraction": 0.5}),
                             **{**kw, "workers": 1}))
    d = bench_e2e.ensure_pool(12)
    (d / "pool.json").write_text('{"writer": "spurf')
    assert bench_e2e.ensure_pool(12) == d and len(made) == 2
    assert (d / "pool.json").is_file() and (d / "ground_truth.csv").is_file()


def test_a_classifier_save_cut_short_is_not_taken_as_done(tmp_path, monkeypatch):
    # torch.jit's save wrote the final name in place: cut short (with vae.pt there), every later
    # run took the broken file as the benchmark's classifier
    from pathlib import Path

    from bench import bench_e2e

    monkeypatch.setenv("SPURFAST_BENCH_DIR", str(tmp_path))
    clf_p, vae_p = bench_e2e.ensure_models()
    clf_p.unlink()

    class Cut:
        def save(self, path):
            Path(path).write_bytes(b"PK\x03\x04cut")
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(torch.jit, "trace", lambda *a, **k: Cut())
        with pytest.raises(KeyboardInterrupt):
            bench_e2e.ensure_models()
    assert bench_e2e.ensure_models() == (clf_p, vae_p)
    from spurfast.models.files import load_classifier
    assert load_classifier(clf_p) is not None


def test_an_e2e_size_too_small_for_a_carrier_is_named_up_front(monkeypatch):
    # SPURFAST_BENCH_E2E_SIZES=10 failed after the models (and any earlier size's runs) in make-pool's
    # words, "--fraction 0.05 ... among --n 10 rounds to no carrier": flags the user never passed
    from bench import bench_e2e

    monkeypatch.setenv("SPURFAST_BENCH_E2E_SIZES", "600,10")
    monkeypatch.setattr(bench_e2e, "ensure_models", lambda: pytest.fail("the benchmark started"))
    with pytest.raises(ValueError, match=r"SPURFAST_BENCH_E2E_SIZES='600,10': a pool of 10 images .* sizes >= 11"):
        bench_e2e.run(None, quick=True, device="cpu")


@pytest.mark.parametrize("var, value", [("SPURFAST_BENCH_THREADS", "4,8"),
                                        ("SPURFAST_BENCH_SHAPE_VARIANTS", "fp8"),
                                        ("SPURFAST_BENCH_E2E_SIZES", "10")])
def test_bench_all_checks_every_suites_variables_before_any_suite_runs(tmp_path, monkeypatch, capsys, var, value):
    # `bench all` runs the suites in sorted order: a bad SPURFAST_BENCH_THREADS failed (a traceback)
    # only after e2e, encoder and kmeans had run, a bad shape variant after every other suite
    from bench import bench_e2e, bench_encoder, bench_kmeans, bench_loader, bench_triton_shapes
    from bench.__main__ import main as bench_main

    for mod in (bench_e2e, bench_encoder, bench_kmeans, bench_loader, bench_triton_shapes):
        monkeypatch.setattr(mod, "run", lambda *a, **k: pytest.fail("a suite ran"))
    monkeypatch.setenv(var, value)
    with pytest.raises(SystemExit) as exc:
        bench_main(["all", "--quick", "--device", "cpu", "--csv", str(tmp_path / "r.csv")])
    assert exc.value.code == 2
    assert f"{var}={value!r}" in capsys.readouterr().err


def test_a_row_cut_short_neither_swallows_the_next_runs_row_nor_fails_the_plot(tmp_path, capsys):
    # a run killed mid-row left a line without its end: the next run's first row was appended to it
    # (both lost), and `bench plot` failed with float(None)'s TypeError, naming no file
    from bench.plot import latest_rows, plot

    path = tmp_path / "r.csv"
    path.write_text(",".join(harness.FIELDS) + "\r\nd0,kmeans,cpu,k=8,items_per_s,12")
    writer = ResultWriter(path)
    writer.add("kmeans", "torch", {"k": 8}, "items_per_s", 5.0, "1/s", "cpu:x")
    rows = latest_rows(path)
    assert [(k[1], r["value"]) for k, r in rows.items()] == [("torch", "5")]
    assert "skipped 1 items_per_s row(s)" in capsys.readouterr().out
    assert [p.name for p in plot(path)] == ["kmeans.png"]


def test_a_cpu_device_names_the_processor_model():
    """platform.processor() says "x86_64" on every x86 machine (AMD or Intel): their rows read
    as one device, and `bench plot` kept the later one's figure for both."""
    from bench.harness import device_name
    from spurfast.cores import cpu_model
    name = device_name("cpu")
    assert name.startswith(f"cpu:{cpu_model()} x") and name.endswith(f"threads={torch.get_num_threads()}"), name


def test_residual_suite_writes_its_rows(tmp_path):
    import csv

    from bench import bench_residual
    from bench.harness import ResultWriter

    writer = ResultWriter(tmp_path / "r.csv")
    bench_residual.run(writer, quick=True, device="cpu")
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    metrics = {r["metric"] for r in rows if r["op"] == "residual_scan" and r["provider"] == "torch-cpu"}
    assert {"median_s", "items_per_s", "gbytes_per_s", "s_per_null"} <= metrics, metrics
    assert all(float(r["value"]) > 0 for r in rows if r["metric"] in ("median_s", "s_per_null"))


def test_whole_fit_timing_is_the_median_of_paired_differences(monkeypatch):
    """_diff_time took the difference of two medians and a band around it from the longer
    fit's spread alone: its p20/p80 described no measured quantity."""
    import time

    from bench import bench_kmeans

    clock = [0.0]   # a clock the fits advance: sleeps overslept by milliseconds on a loaded machine
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])

    def fit(n_iter):   # 2 ms of start-up, then 1 ms an iteration
        clock[0] += 0.002 + 0.001 * n_iter

    st = bench_kmeans._diff_time(fit, "cpu", 5)
    assert st["p20_s"] <= st["median_s"] <= st["p80_s"], st
    assert st["median_s"] == pytest.approx(0.001), st   # the start-up differenced away
    assert st["reps"] == 5
    calls = []

    def jumpy(n_iter):   # the one-iteration fit takes 5 ms more every other round: the differences vary
        calls.append(n_iter)
        clock[0] += 0.001 * n_iter + (0.005 if n_iter == 1 and calls.count(1) % 2 else 0.0)

    st = bench_kmeans._diff_time(jumpy, "cpu", 6)
    # per iteration the rounds differ by 1 ms; the long fit alone does not vary (the old band: ~0 wide)
    assert st["p80_s"] - st["p20_s"] > 0.0005, st


def test_cluster_similarity_rows_time_the_op_against_a_peer_that_picks_the_same_exemplars(tmp_path):
    # the similarity kernel (exemplars of every finding) had no benchmark row at all
    bk._similarity_rows(ResultWriter(tmp_path / "s.csv"), "cpu", "cpu", None, True, 1)
    rows = [r for r in _rows(tmp_path / "s.csv") if r["op"] == "cluster_similarity"]
    by = {(r["provider"], r["metric"]): float(r["value"]) for r in rows}
    assert {p for p, _ in by} == {"torch", "numpy-loop"}
    assert by[("numpy-loop", "same_exemplars")] == 1.0
    N, d = 100_000, 16
    for p in ("torch", "numpy-loop"):
        assert by[(p, "gbytes_per_s")] == pytest.approx((N * d * 4 + N * 16) / by[(p, "median_s")] / 1e9, rel=1e-4)


def test_confirm_suite_times_one_and_several_findings_at_once_and_checks_their_results(tmp_path, monkeypatch):
    from bench import bench_confirm
    from spurfast.data.sources import ArraySource
    from tests.test_confirm import CornerModel, _clean, _findings_of_two_classes

    x = _clean(300)
    with torch.no_grad():
        probs = torch.softmax(CornerModel()(x), 1).numpy()
    pool = ArraySource(x, np.r_[np.zeros(200, int), np.ones(100, int)], name="pool")
    store = {"pred": probs.argmax(1), "probs": probs}
    found = _findings_of_two_classes()
    for f in found:
        f["members"] = [250, 251]
    monkeypatch.setattr(bench_confirm, "findings_to_confirm", lambda n, device: (found, CornerModel(), pool, store))
    writer = ResultWriter(tmp_path / "r.csv")
    bench_confirm.run(writer, quick=True, device="cpu")
    rows = {(r["op"], r["provider"], r["metric"]): r for r in csv.DictReader(open(tmp_path / "r.csv"))}
    assert ("confirm", "at_once=1", "median_s") in rows and ("confirm", "at_once=2", "median_s") in rows
    assert "auto=1" in rows["confirm", "at_once=1", "median_s"]["config"]   # a CPU confirms one at a time
    assert float(rows["ratio", "confirm_at_once_2_vs_1", "ratio"]["value"]) > 0
    assert rows["confirm", "at_once=2", "results_identical"]["value"] == "1"
    assert all(f.get("confirm") is None for f in found)   # timed on copies

    real = bench_confirm.time_confirmation

    def differs(findings, clf, source, st, device, at_once):   # a mutant whose threads share a generator
        s, got = real(findings, clf, source, st, device, at_once)
        return s, got if at_once == 1 else got[::-1]
    monkeypatch.setattr(bench_confirm, "time_confirmation", differs)
    with pytest.raises(AssertionError, match="other results than one at a time"):
        bench_confirm.run(ResultWriter(tmp_path / "r2.csv"), quick=True, device="cpu")
    assert "results_identical,0," in (tmp_path / "r2.csv").read_text()
