"""The launch-shape sweep's code path on the CPU (Triton interpreter, one shape per
variant there), so a GPU session does not spend its minutes on a crash."""
import pytest
import torch

from spurfast.kernels import kmeans_triton as kt

pytestmark = pytest.mark.skipif(not kt.is_available()[0], reason="no CUDA device and no Triton interpreter")


def test_sweep_writes_timing_agreement_and_best_rows(tmp_path):
    from bench.bench_triton_shapes import shape_name, sweep
    from bench.harness import ResultWriter

    writer = ResultWriter(tmp_path / "results.csv")
    problem = ("tiny", 300, 24, 20, 3, ("fp32", "fp16"))
    times = sweep(writer, kt, problem, ["fp32", "fp16-single"], "cpu", "cpu", reps=1)
    assert set(times) == {"fp32", "fp16-single"} and all(len(t) == 1 for t in times.values())
    rows = writer.rows
    agree = [r for r in rows if r["metric"] == "same_assignment"]
    assert len(agree) == 2 and all(float(r["value"]) == 1.0 for r in agree)
    best = [r for r in rows if r["metric"] == "best_shape_speedup"]
    assert len(best) == 2 and all(float(r["value"]) == 1.0 for r in best)
    assert any(r["metric"] == "median_s" and "variant=fp16-single" in r["config"] for r in rows)
    assert shape_name(kt.launch_shape(torch.float16, 24, 20)) in times["fp16-single"]
    with pytest.raises(ValueError, match="unknown variant 'fp8'"):
        sweep(writer, kt, problem, ["fp8"], "cpu", "cpu", reps=1)
