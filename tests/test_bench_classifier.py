"""The classifier benchmark: its cost count on a model of known size, and its rows."""
import csv

import torch

from bench import bench_classifier as bc
from bench.harness import ResultWriter
from spurfast.models.classifier import SmallCNN
import spurfast.models.classifier as arch
import spurfast.models.outputs as outputs


def test_layer_costs_count_every_convolution_and_linear_layer():
    m = SmallCNN(1, 10, 28, width=4).eval()
    flops, nbytes = bc.layer_costs(m, torch.rand(2, 1, 28, 28))
    macs = (2 * 4 * 28 * 28 * 1 * 9          # conv1: 4 maps of 28x28 from 1 channel, 3x3
            + 2 * 8 * 14 * 14 * 4 * 9        # conv2: 8 maps of 14x14 from 4 channels
            + 2 * 128 * 8 * 7 * 7            # fc1
            + 2 * 10 * 128)                  # fc2
    assert flops == 2 * macs
    maps = ((2 * 28 * 28 + 2 * 4 * 28 * 28) + (2 * 4 * 14 * 14 + 2 * 8 * 14 * 14)   # the convolutions' maps
            + (2 * 392 + 2 * 128) + (2 * 128 + 2 * 10))                                # the linear layers
    assert nbytes == 4 * maps


def test_both_layouts_are_timed_and_the_switch_is_given_back(tmp_path, monkeypatch):
    monkeypatch.setattr(bc, "CASES_QUICK", [("small_cnn", 1, 8, 4, {"width": 2})])
    product = arch._channels_last_on_cpu, outputs._cpu_layout
    w = ResultWriter(tmp_path / "r.csv")
    bc.run(w, quick=True, device="cpu")
    assert (arch._channels_last_on_cpu, outputs._cpu_layout) == product
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    timed = {(r["provider"], r["metric"]) for r in rows if r["op"] == "classify"}
    for p in ("torch-channels-last", "torch-nchw"):
        assert {(p, "median_s"), (p, "items_per_s"), (p, "tflops"), (p, "gbytes_per_s")} <= timed
    ratio = [r for r in rows if r["op"] == "ratio" and r["provider"] == "channels_last_vs_nchw"]
    assert len(ratio) == 1 and float(ratio[0]["value"]) > 0
    steps = {r["provider"] for r in rows if r["op"] == "train_step" and r["metric"] == "items_per_s"}
    assert steps == {"torch-channels-last", "torch-nchw"}
    assert any(r["provider"] == "train_step_channels_last_vs_nchw" for r in rows)
    assert "image=1x8x8" in ratio[0]["config"] and "width=2" in ratio[0]["config"]


def test_each_provider_gets_the_peak_of_its_own_timed_calls_and_a_traced_model_its_costs(tmp_path, monkeypatch):
    # one window over every call (the warm-up round too) gave both layouts the same peak; a traced
    # model's layers are script modules the cost hooks did not see (0 FLOPs: no tflops rows)
    import itertools
    reads = itertools.count(1)
    monkeypatch.setattr(bc, "read_peak", lambda device, source: next(reads))
    monkeypatch.setattr(bc, "CASES_QUICK", [("small_cnn-traced", 1, 8, 4, {"width": 2})])
    monkeypatch.setattr(bc, "_training_steps", lambda *a: None)
    w = ResultWriter(tmp_path / "r.csv")
    bc.run(w, quick=True, device="cpu")
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    peak = {r["provider"]: float(r["value"]) for r in rows if r["op"] == "classify" and r["metric"] == "peak_memory"}
    assert peak == {"torch-channels-last": 13.0, "torch-nchw": 14.0}   # 7 timed calls each, in turn: no warm-up
    timed = {(r["provider"], r["metric"]) for r in rows if r["op"] == "classify"}
    assert {("torch-nchw", "tflops"), ("torch-nchw", "gbytes_per_s")} <= timed
