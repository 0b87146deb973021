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


@pytest.mark.parametrize("value", ["fp16,fp8", "fp8"])
def test_a_misspelt_variant_is_refused_before_any_sweep(tmp_path, monkeypatch, value):
    # it raised in `sweep` only after sweeping the variants before it (minutes of GPU time)
    import bench.bench_triton_shapes as bts
    from bench.harness import ResultWriter

    swept = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kt, "is_available", lambda: (True, ""))
    monkeypatch.setattr(bts, "device_name", lambda dev: "gpu")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bts, "sweep", lambda writer, kt_, problem, variants, *a, **k: swept.append(variants) or {})
    monkeypatch.setenv("SPURFAST_BENCH_SHAPE_VARIANTS", value)
    with pytest.raises(ValueError, match="SPURFAST_BENCH_SHAPE_VARIANTS=.*unknown variant 'fp8'"):
        bts.run(ResultWriter(tmp_path / "r.csv"), quick=True, device="cuda")
    assert swept == []
    # spaces after the commas are fine
    monkeypatch.setenv("SPURFAST_BENCH_SHAPE_VARIANTS", "fp16, fp32")
    bts.run(ResultWriter(tmp_path / "r.csv"), quick=True, device="cuda")
    assert swept == [["fp16", "fp32"]] * len(bts.PROBLEMS)


def test_spill_rows_are_bytes_and_the_roofline_is_the_gpus_own():
    # triton's n_spills counts 32-bit words (LOCAL_SIZE_BYTES / 4), written as bytes; and every
    # GPU's encoder roofline used the H200's peaks (an H100's bf16 rows read 30% low)
    import types

    from bench import bench_encoder as be
    from bench.bench_triton_shapes import _resources

    fake = types.SimpleNamespace(last_kernel=types.SimpleNamespace(n_regs=40, n_spills=3))
    assert _resources(fake) == (40.0, 12.0)
    h100, h200 = be.device_peak("NVIDIA H100 80GB HBM3"), be.device_peak("NVIDIA H200")
    assert (h100["hbm_bytes_per_s"], h200["hbm_bytes_per_s"]) == (3.35e12, 4.8e12)
    assert be.device_peak("NVIDIA H100 PCIe")["hbm_bytes_per_s"] == 2.0e12 and be.device_peak("Tesla T4") is None
    args = ("rgb64", 256, torch.bfloat16)
    assert be.roofline_bound_s(*args, peak=h100) == pytest.approx(be.roofline_bound_s(*args, peak=h200) * 4.8 / 3.35)
