"""End to end: `spurfast discover`'s steps over a procedural JPEG folder pool, 1 vs N
processes under torchrun, with per-stage times and peak memory.

For each pool size (10k and 100k images; --quick: 600, on a GPU 20k; or
$SPURFAST_BENCH_E2E_SIZES, comma-separated) the pool is generated once with
`spurfast make-pool` (64-160 px JPEGs, 10 classes, a noise pattern planted in 5%) and
cached under $SPURFAST_BENCH_DIR (default /tmp/spurfast-bench).  Models: the classifier is a
user's TorchScript model, a SmallCNN at width 8 (spurfast's own SmallCNN-32 and ResNet-18 cost
about 10x more per image at 64x64 on a CPU; their classify rates are recorded as stage rows,
so the pass's rate with them is their rate), fitted for a few seconds to the pools' procedural
classes (`train_small_classifier`: with random weights it called every image one class, and
discovery and the report ran on nothing like a real run's classes and findings); the RGB
64x64 VAE (four stride-2 convs, 16 latents).  On a GPU (--device cuda) one process per GPU runs.

Rows (op "e2e", provider "procs=P"):
- ``e2e_images_per_s``: pool size / seconds from the start of the embedding pass to the
  written report (inside the processes: interpreter start-up and model loading excluded;
  ``wall_s`` includes them);
- ``embed_images_per_s``: the streaming pass alone (load + classify + encode, overlapped:
  the DataLoader or DALI decodes while the models run, and the store is written on a thread
  while the next batch computes); ``embed_split_s`` rows say where rank 0's pass waited
  (``part=load_wait``, ``compute``, ``write``) and how long its writer thread wrote
  (``write_busy``);
- ``stage_s`` per stage of the run `spurfast discover` makes (`pipeline.run_discovery`, timed
  through its ``on_step``): embed, discover (per-class k-means + kNN + permutation null,
  k-means across ranks), report (characterise, the pattern rankings' re-reads, confirmation,
  outputs; characterise, confirmation and the
  rankings alone are ``part=characterise``, ``part=confirm`` and ``part=rank`` rows
  (``e2e_no_confirm_images_per_s``: the run without confirmation, as the rows before the
  forty-seventh session timed it), with ``findings`` rows counting the findings
  in all and of each ``ranked_by``; the images are re-read from the store's pixel rows where
  it kept them, `spurfast.pixel_cache`);
- ``peak_memory``: max RSS of the busiest rank process (``VmHWM``: ``ru_maxrss`` of a
  spawned process starts at its parent's RSS, since Linux carries the high-water mark
  over exec, so it measured the benchmark driver, not the run), and of its child
  processes separately (``peak_memory_loader``: ``ru_maxrss`` of children, an upper
  bound that includes the worker's own RSS when a child was forked);
  ``peak_memory_after`` per stage (ready = models loaded and warmed up, embed, discover,
  report): rank 0's high-water mark after that stage, so the stage that sets the peak shows;

Stage-alone rows (op "stage", one process, all cores; provider: the registry's choice for the
stage, "pil" for one process decoding, "torch" for the models): load (the folder loader alone),
classify and encode (the models on in-memory 256-image batches), cluster (batched
k-means over the pool's latents, grouped by predicted class; median of 3 after one
untimed call).  ``ratio`` rows put the
targets side by side: embed pass vs its slowest stage, and vs the three stages taking turns
on all cores (1 / the sum of their times per image: what overlap must beat, and on a CPU
node whose stages each fill every core, about all it can reach), 2 vs 1 process, peak
memory at the largest vs smallest pool.  On a CPU node one more run pins 1 process to 1 core (affinity
and one OpenMP thread): ``*_2procs_vs_1_1core`` is the sharding's own scaling, where
``*_2procs_vs_1`` compares with 1 process whose threads already fill every core.  The
machine's load average before each run is recorded (``loadavg_1m``): other jobs on a
shared machine slow every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.harness import bench_dir
from spurfast.cores import usable_cores

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
CLASSES = 10


def _pool_spec(n: int):
    from spurfast.make_pool import PoolSpec

    return PoolSpec(n=n, classes=CLASSES, min_size=64, max_size=160, plant="noise", strength=0.5, fraction=0.05,
                    target_size=SIZE, seed=0)


def ensure_pool(n: int) -> Path:
    from spurfast.make_pool import make_pool, written_spec

    spec = _pool_spec(n)
    d = bench_dir() / f"pool-{n}"
    info = d / "pool.json"
    try:
        done = json.loads(info.read_text())
    except FileNotFoundError:
        done = None
    except ValueError:
        # cut short by an interrupted make-pool (it writes pool.json in place): every later run
        # failed here with json's traceback, and make-pool refuses a folder without a readable
        # one; this folder is the benchmark's own cache, so it is marked make-pool's again
        from spurfast.make_pool import POOL_WRITER
        info.write_text(json.dumps({"writer": POOL_WRITER, "spec": None}))
        done = None
    if isinstance(done, dict) and written_spec(done.get("spec")) == json.loads(json.dumps(spec.__dict__)):
        return d
    print(f"[e2e] generating a {n}-image pool in {d}", flush=True)
    make_pool(d, spec, overwrite=True, progress=False)
    return d


CLF_WIDTH = 8  # a user's TorchScript classifier: SmallCNN at width 8 (see the module docstring)
TRAIN_IMAGES, TRAIN_EPOCHS = 2000, 6


def train_small_classifier(device: str = "cpu"):
    """SmallCNN-8 fitted to the pools' procedural classes (their own images: another seed, no
    pattern).  With random weights it called every pool image one class (measured: 100% class
    8), so discovery clustered one class of the whole pool (k = n / 100 clusters in one
    group) and its null had nothing to shuffle: a discover stage unlike any real run's."""
    from spurfast.data.folder import ImageFolderSource
    from spurfast.make_pool import PoolSpec, make_pool
    from spurfast.models.classifier import SmallCNN

    spec = PoolSpec(n=TRAIN_IMAGES, classes=CLASSES, min_size=64, max_size=160, target_size=SIZE, seed=1)
    folder = bench_dir() / f"train-{TRAIN_IMAGES}"
    make_pool(folder, spec, overwrite=True, progress=False)
    src = ImageFolderSource(folder, size=SIZE)
    x, y = src.get_batch(np.arange(len(src)))
    torch.manual_seed(0)
    clf = SmallCNN(3, CLASSES, SIZE, width=CLF_WIDTH).to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    x, y = x.float().to(device), torch.as_tensor(y).to(device)
    for _ in range(TRAIN_EPOCHS):
        for i in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(clf(x[i]), y[i]).backward()
            opt.step()
    clf = clf.cpu().eval()
    with torch.no_grad():
        acc = float((clf(x.cpu()).argmax(1) == y.cpu()).float().mean())
    print(f"[e2e] bench classifier: training accuracy {acc:.2f} on {len(x)} images", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    return clf


def ensure_models() -> tuple[Path, Path]:
    from spurfast.models.files import save_vae
    from spurfast.models.vae import VAE, VAEConfig

    d = bench_dir()
    d.mkdir(parents=True, exist_ok=True)
    clf_p, vae_p = d / f"clf-ts-w{CLF_WIDTH}-fitted.pt", d / "vae.pt"
    if not (clf_p.is_file() and vae_p.is_file()):
        clf = train_small_classifier("cuda" if torch.cuda.is_available() else "cpu")
        # through a temporary name, as save_vae does: a save cut short under the final name
        # was taken as done by every later run
        tmp = clf_p.with_name(clf_p.name + ".tmp")
        torch.jit.trace(clf, torch.rand(2, 3, SIZE, SIZE)).save(str(tmp))
        os.replace(tmp, clf_p)
        torch.manual_seed(0)
        save_vae(VAE(VAEConfig.for_images(3, SIZE, 16)), vae_p)
    return clf_p, vae_p


# ----------------------------------------------------------------------------- worker
def own_peak_rss() -> int:
    """Peak resident bytes of this process image (VmHWM).  ``ru_maxrss`` is not: Linux
    keeps the larger of it and the pre-exec image's, so a worker started by a driver that
    holds 2 GB reports at least 2 GB whatever it uses (measured: 2.26 vs 1.28 GiB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


HWM_STAGES = {"embedded": "embed", "discovered": "discover"}   # run_discovery's steps -> peak_memory_after rows


def worker(argv=None) -> int:
    """One rank (or the only process) of a timed discover run; writes timings-rank<r>.json."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--clf", required=True)
    ap.add_argument("--vae", required=True)
    ap.add_argument("--n-null", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    from spurfast import distributed as dist
    from spurfast.data.folder import ImageFolderSource
    from spurfast.discover import DiscoverConfig
    from spurfast.models.files import load_classifier, load_vae
    from spurfast.pipeline import run_discovery

    ctx = dist.init(args.device)
    device = ctx.device if ctx.distributed else args.device
    pool = ImageFolderSource(args.pool, size=SIZE)
    clf, vae = load_classifier(args.clf), load_vae(args.vae)
    config = DiscoverConfig(n_null=args.n_null, seed=0, device=device)
    _warm_up(clf, vae, device, args.batch_size, len(pool), ctx)
    hwm = {"ready": own_peak_rss()}   # VmHWM after the stages the rows name: which one sets the peak
    t = {"start": time.perf_counter()}

    def step_ended(name):
        t[name] = time.perf_counter()
        if name in HWM_STAGES:
            hwm[HWM_STAGES[name]] = own_peak_rss()
    split = {}   # where this rank's embedding pass waited: loader, models, store
    # the run `spurfast discover` makes (confirmation included), timed step by step
    _, result, _ = run_discovery(pool, clf, vae, args.out, num_classes=CLASSES, config=config,
                                 batch_size=args.batch_size, progress=False, timings=split, on_step=step_ended)
    for name in ("discovered", "characterised", "ranked", "confirmed", "reported"):
        t.setdefault(name, time.perf_counter())   # a rank other than the main one: it served rank 0 till now
    rec = {"rank": ctx.rank, "world": ctx.world_size, "n": len(pool),
           "embed_s": t["embedded"] - t["start"], "discover_s": t["discovered"] - t["embedded"],
           "report_s": t["reported"] - t["discovered"], "rank_s": t["ranked"] - t["characterised"],
           "characterise_s": t["characterised"] - t["discovered"], "confirm_s": t["confirmed"] - t["ranked"],
           "n_findings": len(result.findings) if ctx.is_main else 0,
           "n_ranked_by": {k: sum(f.get("ranked_by") == k for f in result.findings)
                           for k in ("pattern", "latent+pattern", "latent+pixels", "latent")} if ctx.is_main else {},
           "total_s": t["reported"] - t["start"],
           "peak_rss": own_peak_rss(),
           "peak_rss_after": dict(hwm, report=own_peak_rss()),
           "peak_rss_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
           "threads": torch.get_num_threads(), "embed_split": split,
           "cuda_peak": torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0}
    (Path(args.out) / f"timings-rank{ctx.rank}.json").write_text(json.dumps(rec))
    dist.shutdown()
    return 0


def _warm_up(clf, vae, device, batch_size, n, ctx):
    """One-time costs out of the timed pass, as model loading is: the encoder's Triton
    kernels compile per batch shape (tens of seconds on a cold cache) and TorchScript
    specialises on its first calls.  Shapes: a full batch and this rank's last one."""
    from spurfast.data.folder import select_indices
    from spurfast.models.outputs import classifier_outputs

    rows = len(select_indices(n, shard_id=ctx.rank, num_shards=ctx.world_size))
    clf, vae = clf.to(device).eval(), vae.to(device).eval()
    with torch.no_grad():
        for b in sorted({batch_size, rows % batch_size} - {0}):
            x = torch.rand(b, 3, SIZE, SIZE, device=device)
            for _ in range(3):
                classifier_outputs(clf, x)
                vae.encode(x)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run_e2e(pool: Path, clf: Path, vae: Path, procs: int, n_null: int, device: str = "cpu",
            cores: int | None = None) -> dict:
    """One timed run in fresh processes; ``cores``: pin it to that many of this process's
    cores (CPU affinity, as taskset does, and as many OpenMP threads)."""
    out = bench_dir() / (f"run-{pool.name}-p{procs}" + (f"-c{cores}" if cores else ""))
    shutil.rmtree(out, ignore_errors=True)
    wargs = ["--pool", str(pool), "--out", str(out), "--clf", str(clf), "--vae", str(vae), "--n-null", str(n_null),
             "--device", device]
    # ROOT first, the caller's path kept: packages installed there (gpu_check.sh puts wheels in
    # /tmp/site) were missing from the runs, though this process's stage rates had them
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if procs == 1:
        cmd = [sys.executable, "-m", "bench.bench_e2e", "--worker"] + wargs
        env.pop("WORLD_SIZE", None)
        # threads on every core, as the row's cores= says: an inherited OMP_NUM_THREADS=1 ran it on
        # one thread and the 2-process ratio compared 2 x 1 threads with 1 x 1
        env["OMP_NUM_THREADS"] = str(cores or usable_cores())
    else:
        # torchrun's module, not a script beside the interpreter (a system Python puts it elsewhere)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), "-m", "bench.bench_e2e", "--worker"] + wargs
        # torchrun leaves a torchelastic_* log folder in TMPDIR per launch: in the bench's folder, not /tmp
        tmp = out.with_name(out.name + "-tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        env["TMPDIR"] = str(tmp)
    pin = None
    if cores:
        allowed = sorted(os.sched_getaffinity(0))[:cores]
        env["OMP_NUM_THREADS"] = str(len(allowed))
        pin = lambda: os.sched_setaffinity(0, allowed)   # noqa: E731 (in the child, before exec)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, preexec_fn=pin)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"e2e run ({procs} procs, {pool}) failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    ranks = [json.loads((out / f"timings-rank{i}.json").read_text()) for i in range(procs)]
    main = ranks[0]
    res = {"procs": procs, "cores": cores or usable_cores(), "n": main["n"], "wall_s": wall, "loadavg_1m": load,
           "embed_s": max(x["embed_s"] for x in ranks), "discover_s": main["discover_s"], "report_s": main["report_s"],
           "rank_s": main.get("rank_s", 0.0), "n_ranked_by": main.get("n_ranked_by", {}),
           "characterise_s": main.get("characterise_s", 0.0), "n_findings": main.get("n_findings", 0),
           "confirm_s": main.get("confirm_s", 0.0),
           "total_s": main["total_s"], "peak_rss": max(x["peak_rss"] for x in ranks),
           "peak_rss_loader": max(x["peak_rss_children"] for x in ranks),
           "cuda_peak": max(x.get("cuda_peak", 0) for x in ranks), "embed_split": main.get("embed_split", {}),
           "peak_rss_after": main.get("peak_rss_after", {})}
    if procs > 1:
        shutil.rmtree(out / "store", ignore_errors=True)  # keep the disk lean; findings stay
    res["store"] = out / "store"
    return res


# ----------------------------------------------------------------------------- stages alone
def stage_rates(pool: Path, clf_p: Path, vae_p: Path, sample: int, store_dir: Path | None,
                device: str = "cpu", other_classifiers: bool = True) -> dict:
    from bench.harness import measure
    from spurfast import backends
    from spurfast.cluster import batched_kmeans, choose_k
    from spurfast.data.folder import ImageFolderSource
    from spurfast.data.loader_torch import iter_batches
    from spurfast.models.files import load_classifier, load_vae
    from spurfast.models.outputs import classifier_outputs

    src = ImageFolderSource(pool, size=SIZE)
    m = min(sample, len(src))
    dev_type = torch.device(device).type
    # who runs each stage: the registry's choice, as the pass makes it (every stage row was "torch",
    # where the CPU clusters on the fused kernel, and a GPU encodes on Triton and clusters on CuPy)
    loader = backends.resolve("loader")[0]
    out = {"loader": loader,
           "providers": {"load": loader, "decode_1proc": "pil", "encode": backends.resolve("encoder", None, dev_type)[0],
                         "cluster": backends.resolve("kmeans_assign", None, dev_type)[0]}}
    t0 = time.perf_counter()
    seen = 0
    raw = torch.uint8 if str(device).startswith("cuda") else None   # as the pass loads for this device
    for b in iter_batches(src, 256, indices=np.arange(m), num_workers=usable_cores(), dtype=raw):
        seen += len(b.indices)
    out["load"] = seen / (time.perf_counter() - t0)
    # one process decoding (no workers): the per-core rate the loader's workers multiply
    from spurfast.data.preprocess import checked_load_uint8
    t0 = time.perf_counter()
    for p in src.paths[:300]:
        checked_load_uint8(p, src.spec)
    out["decode_1proc"] = min(300, len(src.paths)) / (time.perf_counter() - t0)
    from spurfast.models.layout import in_cpu_blocks
    clf, vae = load_classifier(clf_p).to(device), load_vae(vae_p).to(device)
    x = torch.rand(256, 3, SIZE, SIZE, device=device)
    with torch.no_grad():
        st = measure(lambda: classifier_outputs(clf, x), device=device, warmup=1, reps=5)
        out["classify"] = 256 / st["median_s"]
        # in the blocks the embedding pass encodes in on a CPU (`in_cpu_blocks`)
        st = measure(lambda: in_cpu_blocks(vae.encode, x), device=device, warmup=1, reps=5)
        out["encode"] = 256 / st["median_s"]
        from spurfast.models.classifier import build_classifier
        for arch in ("small_cnn", "resnet18") if other_classifiers else ():  # spurfast's own models' classify cost
            m = build_classifier(arch, 3, CLASSES, SIZE).to(device).eval()
            st = measure(lambda: classifier_outputs(m, x), device=device, warmup=1, reps=3)
            out[f"classify_{arch}"] = 256 / st["median_s"]
    if store_dir is not None and (store_dir / "manifest.json").is_file():
        from spurfast.store import EmbeddingStore
        store = EmbeddingStore(store_dir)
        pred = np.asarray(store["pred"]).astype(np.int64)
        ok = pred >= 0
        z = torch.from_numpy(np.asarray(store["mu"])[ok]).to(device)
        g = torch.from_numpy(pred[ok]).to(device)
        kpg = choose_k(np.bincount(pred[ok], minlength=CLASSES), 8, 5)
        # one untimed call: the first pays one-time start-up (kernel library load; CuPy/NVRTC
        # compiles on a GPU), not a cost of clustering
        st = measure(lambda: batched_kmeans(z, g, kpg, n_groups=CLASSES, n_iter=20, seed=0), device=device,
                     warmup=1, reps=3)
        out["cluster"] = len(z) / st["median_s"]
    return out


def _run_rows(writer, n: int, res: dict, n_null: int, dev: str, gpu: bool) -> None:
    """The rows of one timed run (provider "procs=P"; the config says how many cores)."""
    cfg = {"n": n, "size": SIZE, "classifier": f"torchscript small_cnn w{CLF_WIDTH}", "latent": 16, "n_null": n_null,
           "cores": res["cores"]}
    prov = f"procs={res['procs']}"
    writer.add("e2e", prov, cfg, "e2e_images_per_s", n / res["total_s"], "1/s", dev)
    writer.add("e2e", prov, cfg, "embed_images_per_s", n / res["embed_s"], "1/s", dev)
    for s in ("embed", "discover", "report"):
        writer.add("e2e", prov, dict(cfg, stage=s), "stage_s", res[f"{s}_s"], "s", dev)
    # the pattern rankings' re-reads, part of report: how much of it the pixel probes take
    writer.add("e2e", prov, dict(cfg, stage="report", part="rank"), "stage_s", res["rank_s"], "s", dev)
    writer.add("e2e", prov, dict(cfg, stage="report", part="characterise"), "stage_s", res["characterise_s"], "s", dev)
    writer.add("e2e", prov, dict(cfg, stage="report", part="confirm"), "stage_s", res["confirm_s"], "s", dev)
    # the run as `spurfast discover --no-confirm` makes it (the figure before confirmation was timed)
    writer.add("e2e", prov, cfg, "e2e_no_confirm_images_per_s", n / (res["total_s"] - res["confirm_s"]), "1/s", dev)
    writer.add("e2e", prov, cfg, "findings", res["n_findings"], "", dev)
    for kind, count in res["n_ranked_by"].items():
        writer.add("e2e", prov, dict(cfg, ranked_by=kind), "findings", count, "", dev)
    writer.add("e2e", prov, cfg, "wall_s", res["wall_s"], "s", dev)
    writer.add("e2e", prov, cfg, "peak_memory", res["peak_rss"], "bytes", dev)
    writer.add("e2e", prov, cfg, "peak_memory_loader", res["peak_rss_loader"], "bytes", dev)
    for stage, b in res["peak_rss_after"].items():   # rank 0's high-water mark after each stage
        writer.add("e2e", prov, dict(cfg, stage=stage), "peak_memory_after", b, "bytes", dev)
    writer.add("e2e", prov, cfg, "loadavg_1m", res["loadavg_1m"], "", dev)
    if gpu:
        writer.add("e2e", prov, cfg, "peak_memory_cuda", res["cuda_peak"], "bytes", dev)
    for part, sec in res["embed_split"].items():   # rank 0's embedding pass, by where it waited
        writer.add("e2e", prov, dict(cfg, part=part.removesuffix("_s")), "embed_split_s", sec, "s", dev)
    print(f"[e2e] n={n} procs={res['procs']} cores={res['cores']}: {n / res['total_s']:.0f} img/s end to end, "
          f"embed {res['embed_s']:.1f} s ({n / res['embed_s']:.0f} img/s), discover {res['discover_s']:.1f} s, "
          f"report {res['report_s']:.1f} s ({res['n_findings']} findings: characterise {res['characterise_s']:.1f} s, "
          f"confirm {res['confirm_s']:.1f} s, pattern rankings {res['rank_s']:.1f} s: "
          f"{', '.join(f'{v} {k}' for k, v in res['n_ranked_by'].items())}), peak RSS {res['peak_rss'] / 2**20:.0f} MiB (loader workers "
          f"{res['peak_rss_loader'] / 2**20:.0f} MiB), embed split "
          f"{', '.join(f'{k} {v:.1f}' for k, v in res['embed_split'].items())}, load avg {res['loadavg_1m']:.1f}",
          flush=True)


def check_env() -> list[int] | None:
    """SPURFAST_BENCH_E2E_SIZES (None: unset); `python -m bench` calls it before any suite runs."""
    from bench.harness import env_ints

    sizes = env_ints("SPURFAST_BENCH_E2E_SIZES")
    for n in sizes or ():   # a size with no carrier failed after the models and the earlier pools, in make-pool's
        try:                # words ("--fraction 0.05 ... among --n 10"): flags the user never passed
            _pool_spec(n).validate()
        except ValueError as exc:
            raise ValueError(f"SPURFAST_BENCH_E2E_SIZES={os.environ.get('SPURFAST_BENCH_E2E_SIZES')!r}: a pool of {n} "
                             f"images plants its pattern in 5% of them, which rounds to none; expected sizes >= 11 "
                             f"({exc})") from None
    return sizes


def run(writer, quick: bool = False, device=None) -> None:
    from bench.harness import device_name

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = device_name(device)
    gpu = device.startswith("cuda")
    # on GPUs: one process per GPU (NCCL needs distinct devices)
    sizes = ([20_000] if gpu else [600]) if quick else [10_000, 100_000]
    # e.g. "100000" for one large pool on a GPU
    sizes = check_env() or sizes
    procs = [1] + [p for p in (2,) if not gpu or torch.cuda.device_count() >= p]
    # on a CPU node, also 1 process pinned to 1 core: 2 processes on 2 cores against it is
    # the sharding's own scaling (against 1 process on all cores, which already fills them
    # with its threads, it is not)
    runs = [(p, None) for p in procs] + ([(1, 1)] if not gpu and 2 in procs and usable_cores() >= 2 else [])
    n_null = 5 if quick else 30
    clf, vae = ensure_models()
    results = {}
    for n in sizes:
        pool = ensure_pool(n)
        for p, cores in runs:
            res = run_e2e(pool, clf, vae, p, n_null, device, cores=cores)
            results[(n, p, cores)] = res
            _run_rows(writer, n, res, n_null, dev, gpu)
        # stages alone (one process, all cores), on this pool and the 1-process run's store
        rates = stage_rates(pool, clf, vae, n if gpu else (2000 if quick else 10_000), results[(n, 1, None)]["store"], device,
                            other_classifiers=not quick)  # ResNet-18 alone takes minutes on a CPU
        cfg = {"n": n, "size": SIZE, "cores": usable_cores()}
        for s in ("load", "decode_1proc", "classify", "encode", "cluster", "classify_small_cnn", "classify_resnet18"):
            if s in rates:
                extra = {"classifier": f"torchscript small_cnn width {CLF_WIDTH}"} if s == "classify" else {}
                writer.add("stage", rates["providers"].get(s, "torch"), dict(cfg, stage=s, **extra),
                           "items_per_s", rates[s], "1/s", dev)
        slowest = min(("load", "classify", "encode"), key=lambda s: rates[s])
        r1 = results[(n, 1, None)]
        writer.add("ratio", "embed_vs_slowest_stage", dict(cfg, slowest=slowest), "ratio",
                   (n / r1["embed_s"]) / rates[slowest], "x", dev)
        writer.add("ratio", "e2e_vs_slowest_stage", dict(cfg, slowest=slowest), "ratio",
                   (n / r1["total_s"]) / rates[slowest], "x", dev)
        # the stages taking turns on all cores: above 1, overlap gained something (stages that
        # leave cores idle alone); on a CPU node that already fills its cores in every stage,
        # about 1 is what sharing the cores allows, whatever the overlap
        in_turn = 1.0 / sum(1.0 / rates[s] for s in ("load", "classify", "encode"))
        writer.add("ratio", "embed_vs_stages_in_turn", dict(cfg, in_turn_per_s=round(in_turn, 1)), "ratio",
                   (n / r1["embed_s"]) / in_turn, "x", dev)
        if (n, 2, None) in results:
            r2 = results[(n, 2, None)]
            for base, suffix in ((r1, ""), (results.get((n, 1, 1)), "_1core")):
                if base is None:
                    continue
                for s in ("embed", "discover"):
                    writer.add("ratio", f"{s}_2procs_vs_1{suffix}", cfg, "ratio", base[f"{s}_s"] / r2[f"{s}_s"], "x", dev)
                writer.add("ratio", f"e2e_2procs_vs_1{suffix}", cfg, "ratio", base["total_s"] / r2["total_s"], "x", dev)
        print(f"[e2e] n={n} stages alone: " + ", ".join(f"{s} {rates[s]:.0f} img/s" for s in
                                                       ("load", "decode_1proc", "classify", "encode", "cluster", "classify_small_cnn",
                                                        "classify_resnet18") if s in rates)
              + f" (loader: {rates['loader']}); slowest of the pass: {slowest}", flush=True)
    if len(sizes) > 1:
        for p in procs:
            lo, hi = results[(sizes[0], p, None)], results[(sizes[-1], p, None)]
            writer.add("ratio", f"peak_memory_{sizes[-1]}_vs_{sizes[0]}", {"procs": p}, "ratio",
                       hi["peak_rss"] / lo["peak_rss"], "x", dev)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.argv.remove("--worker")
        sys.exit(worker())
    from bench.harness import ResultWriter
    run(ResultWriter(), quick="--quick" in sys.argv)  # python -m bench e2e [--quick] [--device cuda] is the usual way
