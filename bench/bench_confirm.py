"""Confirmation alone: one finding at a time against several at once (`ConfirmConfig.at_once`).

On a GPU host confirmation is host work (each finding's random controls drawn with numpy and
built with torch, ~20 ms per 256 images, beside sub-millisecond forwards), so findings
confirmed at once on threads should divide its time by up to their number; on a CPU the
forwards fill the cores already.  This suite times both on the e2e benchmark's pool, models
and findings (`python -m bench e2e` makes the same pool; its store is made again here), and
checks that both give the same results (on a CPU a difference fails the suite; on a GPU it is
recorded, ``results_identical`` 0).  Rows: op ``confirm``, provider ``at_once=K``.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch

from bench.bench_e2e import SIZE, CLASSES, ensure_models, ensure_pool
from bench.harness import bench_dir, device_name


def findings_to_confirm(n: int, device: str):
    """(findings characterised as `spurfast discover` leaves them, the classifier, the pool as
    the run reads it, the store) on the e2e benchmark's pool of ``n`` images."""
    from spurfast.data.folder import ImageFolderSource
    from spurfast.data.reread import read_as_stored
    from spurfast.discover import DiscoverConfig, characterise, discover
    from spurfast.embed import embed_pool
    from spurfast.models.files import load_classifier, load_vae
    from spurfast.pipeline import _reread_loader

    clf_p, vae_p = ensure_models()
    pool = ImageFolderSource(ensure_pool(n), size=SIZE)
    clf, vae = load_classifier(clf_p), load_vae(vae_p)
    work = bench_dir() / f"confirm-{n}-{device.split(':')[0]}"
    store = embed_pool(pool, clf, vae, work / "store", num_classes=CLASSES, device=device, progress=False)
    result = discover(store, DiscoverConfig(n_null=30, seed=0, device=device), class_names=pool.class_names,
                      progress=False)
    reread = _reread_loader(pool, store, None, device)
    as_stored = read_as_stored(pool, reread["loader_backend"], reread["device"], 256, store=store)
    characterise(result, store, as_stored, vae, work / "out", seed=0, device=device)
    return result.findings, clf, as_stored, store


def time_confirmation(findings, clf, source, store, device: str, at_once: int) -> tuple[float, list]:
    """(seconds, the findings' ``confirm``) of one `confirm_findings` over copies of ``findings``."""
    from spurfast.confirm import ConfirmConfig, confirm_findings

    mine = copy.deepcopy(findings)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    confirm_findings(mine, clf, pool=source, pool_pred=np.asarray(store["pred"]), pool_probs=store["probs"],
                     config=ConfirmConfig(seed=0, device=device, at_once=at_once))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t, [f.get("confirm") for f in mine]


def run(writer, quick: bool = False, device=None) -> None:
    from spurfast.confirm import ConfirmConfig, findings_at_once

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = device_name(device)
    gpu = device.startswith("cuda")
    n = (20_000 if quick else 100_000) if gpu else 10_000   # smaller CPU pools have no finding
    findings, clf, source, store = findings_to_confirm(n, device)
    if not findings:
        print(f"[confirm] n={n}: no finding to confirm", flush=True)
        return
    auto = findings_at_once(ConfirmConfig(device=device), source.image_shape)
    several = auto if auto > 1 else 2   # on a CPU (auto: 1) the record of why one at a time
    cfg = {"n": n, "size": SIZE, "findings": len(findings)}
    # untimed: TorchScript specialises on its first calls, and the layout check runs once a model
    time_confirmation(findings[:1], clf, source, store, device, 1)
    times: dict[int, list[float]] = {1: [], several: []}
    results = {}
    differ = []
    for _ in range(1 if quick else 2):   # alternating, so a drifting machine load hits both
        for k in (1, several):
            s, got = time_confirmation(findings, clf, source, store, device, k)
            times[k].append(s)
            if results.setdefault(k, got) != got:
                differ.append(f"confirmation at_once={k} gave other results on a second run")
    if results[several] != results[1]:
        differ.append(f"confirmation {several} findings at once gave other results than one at a time")
    writer.add("confirm", f"at_once={several}", cfg, "results_identical", float(not differ), "", dev)
    if differ:
        # a CPU computes every forward alike whatever the thread; a GPU's kernels may differ in their
        # last bits from call to call, so there the row records it and the timings still count
        if not gpu:
            raise AssertionError("; ".join(differ))
        print(f"[confirm] WARNING: {'; '.join(differ)}", flush=True)
    for k, ts in times.items():
        writer.add("confirm", f"at_once={k}", dict(cfg, auto=int(k == auto)), "median_s", float(np.median(ts)),
                   "s", dev)
    gain = float(np.median(times[1]) / np.median(times[several]))
    writer.add("ratio", f"confirm_at_once_{several}_vs_1", cfg, "ratio", gain, "x", dev)
    print(f"[confirm] n={n}, {len(findings)} findings on {device}: one at a time "
          f"{', '.join(f'{t:.2f}' for t in times[1])} s; {several} at once "
          f"{', '.join(f'{t:.2f}' for t in times[several])} s ({gain:.2f}x; automatic: {auto}); results "
          f"{'differ' if differ else 'identical'}",
          flush=True)
