"""`bench kmeans`' comparison with flash-kmeans, run on the CPU with a stand-in for its
assign (the torch reference) and the Triton kernel under the interpreter: the plumbing a
GPU session relies on (variant switches, rows, agreement) works before it gets there."""
import os
import sys
import types

import pytest
import torch

from spurfast.kernels import kmeans_triton as kt
from spurfast.kernels import reference as ref

pytestmark = pytest.mark.skipif(not kt.is_available()[0], reason="no CUDA device and no Triton interpreter")


@pytest.fixture
def fake_flash(monkeypatch):
    """flash_kmeans.assign_euclid_triton.euclid_assign_triton(x (1,N,d), c (1,k,d), |x|^2, out)."""
    def euclid_assign_triton(x, c, xsq, out):
        n = x.shape[1]
        off = torch.tensor([0, n])
        a, _ = ref.kmeans_assign(x[0].float(), off, c.float(), torch.tensor([c.shape[1]]))
        out.copy_(a.view(1, n).to(out.dtype))
    mod = types.ModuleType("flash_kmeans.assign_euclid_triton")
    mod.euclid_assign_triton = euclid_assign_triton
    monkeypatch.setitem(sys.modules, "flash_kmeans", types.ModuleType("flash_kmeans"))
    monkeypatch.setitem(sys.modules, "flash_kmeans.assign_euclid_triton", mod)


def test_assign_vs_flash_rows_for_both_triton_arithmetics(fake_flash, tmp_path, monkeypatch):
    from bench.bench_kmeans import _assign_vs_flash, make_data
    from bench.harness import ResultWriter

    monkeypatch.setenv("SPURFAST_TRITON_CENTROID_SPLIT", "1")   # the bench resets it per variant anyway
    writer = ResultWriter(tmp_path / "results.csv")
    x, off, cent, kpg = make_data(200, 24, 20, 1, "cpu")
    _assign_vs_flash(writer, None, kt, x, off, cent, kpg, dict(N=200, d=24, k=20, groups=1), "cpu", reps=1)
    ratio = {(r["provider"], r["config"].split("dtype=")[1].split(";")[0]) for r in writer.rows
             if r["metric"] == "time_ratio"}
    # triton-prepared: the Lloyd loop's call (fixed arguments checked once)
    assert ratio == {(p, dt) for p in ("triton", "triton-fast", "triton-prepared") for dt in ("fp32", "fp16")}
    agree = [float(r["value"]) for r in writer.rows if r["metric"] == "same_assignment"]
    assert len(agree) == 6 and min(agree) > 0.97   # near-ties may differ after rounding to fp16
    assert os.environ["SPURFAST_TRITON_CENTROID_SPLIT"] == "1"   # restored after the fast variant
