"""Several processes (GPUs, machines) through torch.distributed; a no-op in one process.

Launch with torchrun (``torchrun --nproc-per-node N -m spurfast discover ...``, and on
several nodes the usual ``--nnodes/--node-rank/--rdzv-*`` flags); :func:`init` reads the
environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and joins
the group: NCCL when the run is on CUDA devices, gloo on CPUs.  Without those variables
(or with WORLD_SIZE=1) every helper here does nothing and the caller runs alone.
spurfast starts no processes and opens no sockets of its own.

What runs where in ``spurfast discover`` (see :func:`spurfast.pipeline.run_discovery`):

1. rank 0 prepares the output directory; the others wait for its verdict;
2. every rank embeds its shard of the pool (every W-th pool index, as the loaders shard)
   into its own part of the store, resumable per rank at batch granularity
   (``embed.embed_pool(shard_id=, num_shards=)``); rank 0 merges the parts;
3. rank 0 scores: on GPUs or over several nodes (:func:`cluster_across_ranks`; on one CPU
   node rank 0 clusters alone, faster than gloo) every k-means it runs (the real clustering
   and every permutation of the null) is a Lloyd loop across all ranks: rank 0 broadcasts the points and the k-means++
   initial centroids, each rank assigns a W-th of the points and sums its clusters, and
   the sums and counts are all-reduced, so all ranks hold identical centroids every
   iteration (:func:`kmeans_across_ranks` on rank 0, :func:`serve_kmeans` on the others);
4. rank 0 characterises and writes the report; all ranks meet at a barrier.

The output directory must be visible to every rank (one machine, or a shared filesystem
across nodes): rank 0 reads the shard stores the others write.

Two process groups, created by :func:`init` in the same order on every rank: the default
one (NCCL or gloo) carries the Lloyd loop's tensors and gives up on a silent rank after
$SPURFAST_DIST_TIMEOUT (1800 s); a gloo group on the CPU carries the control messages
and the open-ended waits (ranks that finished their shard waiting for the slowest one,
the other ranks waiting while rank 0 alone discovers and reports), which may rightly
last hours, with $SPURFAST_DIST_WAIT_TIMEOUT (24 h).  A long wait does not hang a
broken run: torchrun tears down every rank when one dies.
"""
from __future__ import annotations

import builtins
import datetime
import hashlib
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .cluster import check_input, lloyd
from .cores import usable_cores

log = logging.getLogger("spurfast.distributed")


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None      # "gloo" / "nccl"; None when not distributed
    device: str = "cpu"             # where collectives' tensors live ("cuda:<local_rank>" with NCCL)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CTX = Context()
_OWNED = False  # this module initialised the process group (and so destroys it)
_WAIT = None    # the gloo group with the long timeout (see the module docstring)
_MIDWAY = False  # rank 0 sent a k-means to the other ranks and has not finished it


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer") from None


def _seconds(arg: str, given: float | None, name: str, default: float) -> float:
    """A timeout in seconds: ``given`` (argument ``arg``), else $``name``, else ``default``;
    finite and > 0 (float() of "30m" named neither the variable nor what it wants)."""
    v = given if given is not None else os.environ.get(name) or default
    try:
        s = float(v)
    except (TypeError, ValueError):
        s = float("nan")
    if not 0 < s < float("inf"):
        where = f"environment variable {name}={v!r}" if given is None else f"{arg}={v!r}"
        raise ValueError(f"{where}: expected a timeout in seconds > 0")
    return s


def check_rank_device(device: str) -> None:
    """Refuse an explicit ``cuda:N`` under several ranks: every rank would compute on GPU
    N while :func:`init` put its collectives on its own ``cuda:<LOCAL_RANK>``."""
    if not _CTX.distributed:
        return
    dev = torch.device(device)
    # naming the rank's own GPU (cuda:0 where a scheduler shows each rank one GPU) is fine
    if dev.type == "cuda" and dev.index is not None and dev != torch.device(_CTX.device):
        raise ValueError(f"--device {device} under {_CTX.world_size} ranks would put every rank on GPU {dev.index}; "
                         f"use --device cuda: each rank takes its LOCAL_RANK GPU")


def rank_cuda_index(local_rank: int, visible: int) -> int:
    """The CUDA device a rank uses: ``LOCAL_RANK`` when every rank sees all the node's GPUs,
    device 0 when a scheduler gives each rank its own single GPU (``CUDA_VISIBLE_DEVICES``
    per rank, as Slurm's ``--gpus-per-task=1`` does)."""
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        raise ValueError(f"LOCAL_RANK={local_rank} but this rank sees {visible} CUDA devices: "
                         "start at most one rank per GPU (torchrun --nproc-per-node)")
    return local_rank


def init(device: str = "cpu", backend: str | None = None, timeout_s: float | None = None,
         wait_timeout_s: float | None = None) -> Context:
    """Join the torch.distributed group described by torchrun's environment variables.

    ``device``: the compute device of the run ("cpu" or "cuda[:i]"); with CUDA each rank
    uses ``cuda:<LOCAL_RANK>`` (``cuda:0`` when it sees one GPU: :func:`rank_cuda_index`)
    and the backend defaults to NCCL, else gloo.  Returns the
    context; a no-op (world size 1) when WORLD_SIZE is unset or 1.  Idempotent.
    ``timeout_s`` (default $SPURFAST_DIST_TIMEOUT or 1800): how long a k-means collective
    waits for a rank that stopped answering before raising.  ``wait_timeout_s`` (default
    $SPURFAST_DIST_WAIT_TIMEOUT or 86400): the same for the waits on another rank's long
    work (:func:`all_succeed`, :func:`run_on_main`, :func:`main_section`, ...).

    A launch to fix (a torchrun variable missing or out of range, CUDA asked for where there is
    none, two ranks on one GPU) raises ValueError: the CLI reports it as "error: ..." (exit 2),
    where a RuntimeError, kept for crashes, gave a traceback."""
    global _CTX, _OWNED, _WAIT
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        _CTX = Context()
        return _CTX
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    # checked before joining: every rank would fail at once, a rank already in the group waits
    timeout = _seconds("timeout_s", timeout_s, "SPURFAST_DIST_TIMEOUT", 1800)
    wait = _seconds("wait_timeout_s", wait_timeout_s, "SPURFAST_DIST_WAIT_TIMEOUT", 86400)
    _across_override()   # read by rank 0's main section: a bad value failed after the whole embedding pass
    cuda = str(device).startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but torch sees no CUDA device")
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda and "LOCAL_RANK" not in os.environ and torch.cuda.device_count() > 1 and not dist.is_initialized():
        # every rank of a node took GPU 0 (NCCL then failed on a duplicate GPU, naming no variable)
        raise ValueError(f"WORLD_SIZE={world} but LOCAL_RANK is not set: launch with torchrun")
    dev = f"cuda:{rank_cuda_index(local, torch.cuda.device_count())}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(torch.device(dev))
    if not dist.is_initialized():
        # without RANK every process took rank 0: the group never formed, and the run hung
        # for the whole timeout before an error that named no variable
        for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise ValueError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun")
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        _OWNED = True
    else:
        world, rank = dist.get_world_size(), dist.get_rank()
        backend = dist.get_backend()
    if _WAIT is None:  # every rank calls init, so every rank creates this group, in the same order
        _WAIT = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=wait))
    if cuda and backend == "nccl":   # NCCL refuses two ranks on one GPU; gloo does not
        _refuse_shared_gpus(dev)
    _CTX = Context(rank, world, local, backend, dev)
    log.info("rank %d of %d (local %d), backend %s, device %s", rank, world, local, backend, dev)
    return _CTX


def shared_gpu(owners: list) -> tuple[int, int] | None:
    """The first two ranks whose (host, GPU) in ``owners`` (one per rank) is the same, or None."""
    first: dict = {}
    for r, owner in enumerate(owners):
        if owner in first:
            return first[owner], r
        first[owner] = r
    return None


def _refuse_shared_gpus(dev: str) -> None:
    """Every rank at once: two ranks on one GPU (more ranks than a node's GPUs where each rank
    sees one) ran the whole embedding pass, then NCCL refused the first k-means ("Duplicate GPU
    detected"), naming no setting."""
    import socket

    uuid = getattr(torch.cuda.get_device_properties(torch.device(dev)), "uuid", None)
    if uuid is None:
        return
    owners = [None] * dist.get_world_size()
    dist.all_gather_object(owners, (socket.gethostname(), str(uuid)), group=_WAIT)
    pair = shared_gpu(owners)
    if pair is not None:
        host, gpu = owners[pair[0]]
        raise ValueError(f"ranks {pair[0]} and {pair[1]} both use GPU {gpu} on {host}: start at most one rank per "
                         f"GPU (torchrun --nproc-per-node at most the node's GPUs)")


def shutdown() -> None:
    """Leave the groups :func:`init` created."""
    global _CTX, _OWNED, _WAIT
    if dist.is_initialized():
        if _OWNED:
            dist.destroy_process_group()  # every group, the wait group with it
        elif _WAIT is not None:
            dist.destroy_process_group(_WAIT)
    _OWNED, _WAIT = False, None
    _CTX = Context()


def context() -> Context:
    return _CTX


def rank() -> int:
    return _CTX.rank


def world_size() -> int:
    return _CTX.world_size


def is_main() -> bool:
    return _CTX.rank == 0


def barrier() -> None:
    if _CTX.distributed:
        dist.barrier(group=_WAIT)  # ranks may arrive far apart: the long-timeout group


def broadcast_object(obj=None, src: int = 0):
    """``obj`` of rank ``src`` on every rank (pickled; for small control messages).  Over
    the long-timeout gloo group: the receivers may wait for as long as ``src`` works."""
    if not _CTX.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_WAIT, device=torch.device("cpu"))
    return box[0]


def run_on_main(fn, *args, **kwargs):
    """Rank 0 runs ``fn``; every rank returns its result, or raises its error (so no rank
    is left waiting when rank 0 refuses bad input)."""
    if not _CTX.distributed:
        return fn(*args, **kwargs)
    result, error = None, None
    if _CTX.is_main:
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            error = exc
    verdict = broadcast_object((result, None if error is None else (type(error).__name__, str(error))))
    if error is not None:
        raise error
    if verdict[1] is not None:
        kind, msg = verdict[1]
        raise _rank0_error(kind, f"rank 0 failed: {msg}")
    return verdict[0]


def _rank0_error(kind: str, text: str) -> Exception:
    """An error ``text`` of rank 0's (or another rank's) kind ``kind`` where that is a built-in
    one (or BackendUnavailable), else a RuntimeError: the CLI tells the user's errors (an
    output directory that is a file: NotADirectoryError; a pool discovery cannot use:
    ValueError) from crashes by kind, and the other ranks printed a traceback where rank 0
    said "error: ..."."""
    from .backends import BackendUnavailable   # the CLI's too

    exc_type = BackendUnavailable if kind == "BackendUnavailable" else getattr(builtins, kind, None)
    if isinstance(exc_type, type) and issubclass(exc_type, Exception):
        try:
            return exc_type(text)
        except TypeError:   # one that takes other arguments (UnicodeDecodeError)
            pass
    return RuntimeError(text)


def all_succeed(fn, *args, **kwargs):
    """Every rank runs ``fn``; if any rank raised, every rank raises (naming the ranks),
    instead of the others blocking in the next collective."""
    if not _CTX.distributed:
        return fn(*args, **kwargs)
    result, error = None, None
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:
        error = exc
    errors = [None] * _CTX.world_size
    # ranks that finish first wait here for the slowest (a resumed rank's whole shard)
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}", group=_WAIT)
    if error is not None:
        raise error
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:   # of the first failed rank's kind (see _rank0_error)
        raise _rank0_error(failed[0][1].split(":", 1)[0], "; ".join(f"rank {r} failed: {e}" for r, e in failed))
    return result


# ------------------------------------------------------------------ sharded embedding
def embed_pool_sharded(source, classifier, vae, store_dir, *, progress: bool = True, **kwargs):
    """Every rank embeds its shard (resumable per rank), rank 0 merges the shards into
    the main store, and every rank returns the complete main store.  In one process this
    is ``embed.embed_pool``.  Ranks that loaded other inputs than rank 0 (another pool or
    model file, other labels) are refused before any of them embeds."""
    from .data.sources import content_digest
    from .embed import embed_pool, how_rows_are_made
    from .store import EmbeddingStore
    from .identity import fingerprint

    if not _CTX.distributed:
        return embed_pool(source, classifier, vae, store_dir, progress=progress, **kwargs)
    W = _CTX.world_size
    if kwargs.get("num_workers") is None:  # share the node's cores among its ranks
        per_node = _env_int("LOCAL_WORLD_SIZE", W)
        kwargs["num_workers"] = max(1, usable_cores() // max(1, per_node))
    identity = tuple(kwargs.pop("identity", None) or (fingerprint(source, classifier, vae), content_digest(source)))
    # otherwise the mismatch shows only at the merge, after every rank embedded its shard
    # labels are no part of the identity, but every rank rewrites a store's labels with its
    # own (store_shards.open_main): ranks with other labels would race to leave theirs for rank 0
    labels = hashlib.sha256(np.ascontiguousarray(source.labels(), dtype=np.int64).tobytes()).hexdigest()[:16]
    # how each rank decodes and encodes: a rank whose environment picks another loader (no
    # DALI there) was refused only at the merge, after every rank embedded its shard, and one
    # with another encoder was merged into a store of mixed rows without a word
    try:
        made = how_rows_are_made(source, kwargs.get("device", "cpu"), kwargs.get("encoder_backend"),
                                 kwargs.get("loader_backend"))
    except Exception as exc:   # a backend named but missing on this rank: raised alone, it left the others waiting
        made = f"{type(exc).__name__}: {exc}"
    ids = [None] * W
    dist.all_gather_object(ids, (identity, labels, made), group=_WAIT)
    failed = [r for r in range(W) if isinstance(ids[r][2], str)]
    if failed:
        raise ValueError(f"ranks {failed} cannot embed as asked: rank {failed[0]}: {ids[failed[0]][2]}")
    other = [r for r in range(W) if tuple(ids[r][0]) != tuple(ids[0][0])]
    if other:
        what = "the pool" if ids[other[0]][0][1] != ids[0][0][1] else "the classifier or the VAE"
        raise ValueError(f"ranks {other} loaded other inputs than rank 0: {what} differs (fingerprint, content "
                         f"{tuple(ids[other[0]][0])} != {tuple(ids[0][0])}); every rank must read the same pool, "
                         f"classifier and VAE")
    other = [r for r in range(W) if tuple(ids[r][2]) != tuple(ids[0][2])]
    if other:
        (l0, d0, c0), (l1, d1, c1) = ids[0][2], ids[other[0]][2]
        raise ValueError(f"ranks {other} would make the store's rows otherwise than rank 0 (loader, decoding device, "
                         f"encoder: {l1!r}, {d1!r}, {c1!r} against {l0!r}, {d0!r}, {c0!r}): their rows differ a "
                         f"little and the store would mix both; give every rank the same --loader-backend, "
                         f"--encoder-backend and --device (and the same SPURFAST_BACKEND* variables and packages)")
    other = [r for r in range(W) if ids[r][1] != ids[0][1]]
    if other:
        raise ValueError(f"ranks {other} loaded other labels for pool {source.name} than rank 0 (labels digest "
                         f"{ids[other[0]][1]} != {ids[0][1]}); every rank must read the same pool (and class names)")
    # the main store is shared: rank 0 alone brings it up to date (relabels an earlier
    # version's, settles old shards, updates labels); the others then find nothing to change
    run_on_main(_open_main, source, classifier, vae, store_dir, identity, W, progress)
    # the ranks agree on the inputs and the store is this run's: a shard store of other
    # inputs is a leftover (of a run whose ranks disagreed), not a reason to refuse
    store = all_succeed(embed_pool, source, classifier, vae, store_dir, shard_id=_CTX.rank, num_shards=W,
                        progress=progress, identity=identity, restart_stale_shards=True, **kwargs)
    if kwargs.get("stop_after") is not None:  # a simulated interruption: nothing to merge yet
        return store
    # embed_pool returned the main store itself when an earlier run had completed it;
    # every rank saw the same main store (only rank 0 writes it, in the merge below)
    if Path(store.root).resolve() != Path(store_dir).resolve():
        run_on_main(_merge, store_dir, W, progress, source)
    return EmbeddingStore(store_dir)


def _open_main(source, classifier, vae, store_dir, identity, num_shards: int, progress: bool) -> None:
    """Rank 0's ``store_shards.open_main``; returns nothing (run_on_main would pickle the store)."""
    from .store_shards import open_main

    open_main(source, classifier, vae, store_dir, identity, num_shards=num_shards, progress=progress)


def _merge(store_dir, num_shards: int, progress: bool, source) -> None:
    """Rank 0's merge; returns nothing, since run_on_main broadcasts the return value and
    pickling the merged store would read every column into memory: each rank opens it."""
    from .store import MANIFEST
    from .store_shards import merge_shards, shard_dir

    # every rank has finished its shard (all_succeed): one rank 0 cannot see was written to a
    # disk of its own (merge_shards would say to run that rank's pass first: it has run)
    unseen = [r for r in range(num_shards) if not (shard_dir(store_dir, r, num_shards) / MANIFEST).is_file()]
    if unseen:
        raise FileNotFoundError(f"rank 0 cannot see the shard stores of ranks {unseen} in {store_dir}, which those "
                                f"ranks finished: the output directory must be on a filesystem every rank shares")
    merge_shards(store_dir, num_shards, progress=progress, labels=source.labels())


# ------------------------------------------------------------------ distributed k-means
def _shard_positions(n: int, r: int, w: int) -> torch.Tensor:
    # min: with fewer points than ranks, arange(r, n) with r > n raises instead of being empty
    return torch.arange(min(r, n), n, w, dtype=torch.int64)


def _gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of taking every W-th row from rank r: the full (n, ...) tensor on every rank."""
    W = _CTX.world_size
    m = -(-n // W)
    pad = torch.zeros((m,) + tuple(local.shape[1:]), dtype=local.dtype, device=local.device)
    pad[:len(local)] = local
    parts = [torch.empty_like(pad) for _ in range(W)]
    dist.all_gather(parts, pad)
    out = torch.empty((n,) + tuple(local.shape[1:]), dtype=local.dtype, device=local.device)
    for r in range(W):
        pos = _shard_positions(n, r, W).to(local.device)
        out[pos] = parts[r][:len(pos)]
    return out


class RankTeam:
    """`spurfast.cluster.Solo`'s operations over this process group: each rank assigns
    every W-th group-sorted point; partial sums, counts and inertia are all-reduced;
    rank 0's centroids and stop decision are broadcast (bitwise-identical everywhere)."""

    def __init__(self):
        self.rank, self.size = _CTX.rank, _CTX.world_size
        self.device = torch.device(_CTX.device)

    def local_positions(self, n: int) -> torch.Tensor:
        return _shard_positions(n, self.rank, self.size)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        out = t.contiguous().clone()
        dist.all_reduce(out)
        return out

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        dist.broadcast(t, 0)
        return t

    def agree(self, flag: bool) -> bool:
        f = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(f, 0)
        return bool(f.item())

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        return _gather_rows(local, n)


def _kmeans_main(x, groups, k_per_group, *, n_groups=None, n_iter=50, tol=1e-6, seed=0, metric="l2",
                 init=None, backend=None):
    """The ``cluster.kmeans_hook`` on rank 0: send the problem to every rank, run Lloyd together."""
    dev = torch.device(_CTX.device)
    x = torch.as_tensor(x).to(dev)
    # float64 stays so, as in one process: lloyd shifts points far from the origin before they
    # become fp32 (cast here first, blobs at 1e8 and 1e8 + 1 were one point across ranks)
    x = (x if x.dtype == torch.float64 else x.float()).contiguous()
    # checked before anything is sent: a bad call leaves no rank waiting; the group ids as given
    # (cast to int64 here first, 0.5 was group 0 across ranks where one process refused it)
    groups, kpg, G = check_input(x, groups, k_per_group, n_groups, init=init)
    groups, kpg = groups.contiguous(), kpg.contiguous()
    # and what every rank's lloyd refuses (all at once, after the data was sent): rank 0 raised an
    # error one could catch, its serving ranks ended, and the next k-means lost the connection
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    from . import backends, cluster
    from .checks import real_number, whole_number
    n_iter, seed, tol = whole_number(n_iter, "n_iter"), cluster.check_seed(seed), real_number(tol, "tol")
    provider = backends.resolve("kmeans_assign", backend, dev.type)[0]
    if init is None:   # k-means++ runs on rank 0 alone: a bad SPURFAST_BACKEND_KMEANS_PLUSPLUS failed midway
        cluster._seeding(provider, backend, dev.type)
    header = {"n": len(x), "d": x.shape[1], "G": G, "has_init": init is not None, "dtype": str(x.dtype),
              "opts": dict(n_iter=n_iter, tol=tol, seed=seed, metric=metric, backend=backend)}
    global _MIDWAY
    _MIDWAY = True   # cleared only by a Lloyd loop that every rank finished
    broadcast_object(header)
    dist.broadcast(x, 0)
    dist.broadcast(groups, 0)
    dist.broadcast(kpg, 0)
    res = lloyd(x, groups, kpg, G, init=init, team=RankTeam(), **header["opts"])
    _MIDWAY = False
    return res


def serve_kmeans() -> int:
    """On ranks != 0: take part in every k-means rank 0 runs under
    :func:`kmeans_across_ranks`, until it leaves that block.  Returns how many ran."""
    if not _CTX.distributed or _CTX.is_main:
        return 0
    dev = torch.device(_CTX.device)
    served = 0
    while True:
        header = broadcast_object(None)
        if header is None:
            return served
        if isinstance(header, str):  # main_section failed before sending any header or release
            raise _rank0_error(header.split(":", 1)[0], f"rank 0 failed: {header}")
        x = torch.empty(header["n"], header["d"], dtype=getattr(torch, header["dtype"].split(".")[-1]), device=dev)
        groups = torch.empty(header["n"], dtype=torch.int64, device=dev)
        kpg = torch.empty(header["G"], dtype=torch.int64, device=dev)
        dist.broadcast(x, 0)
        dist.broadcast(groups, 0)
        dist.broadcast(kpg, 0)
        lloyd(x, groups, kpg, header["G"], init=None, team=RankTeam(), **header["opts"])
        served += 1


@contextmanager
def kmeans_across_ranks():
    """On rank 0: every ``cluster.batched_kmeans`` call inside the block runs across all
    ranks (the other ranks sit in :func:`serve_kmeans`).  Leaving the block, also by an
    exception, releases them.  Results are returned on rank 0 in batched_kmeans's form."""
    from . import cluster

    if not _CTX.distributed or not _CTX.is_main:
        yield
        return
    if cluster.kmeans_hook is not None:
        raise RuntimeError("kmeans_across_ranks blocks cannot be nested")
    global _MIDWAY
    _MIDWAY = False
    cluster.kmeans_hook = _kmeans_main
    try:
        yield
    finally:
        cluster.kmeans_hook = None
        if not _stranded():
            broadcast_object(None)  # release the serving ranks


# ------------------------------------------------------------------ the discover step
def cluster_across_ranks() -> bool:
    """Whether the main section's k-means runs across ranks.  On one CPU node the ranks
    share that node's cores, so splitting Lloyd steps over processes adds messages but no
    compute (measured on 2 cores: discovery 0.62x / 0.84x of one process at 10k / 100k
    images); there rank 0 clusters alone on all the cores.  On GPUs or over several nodes
    the ranks bring their own hardware: across ranks.  SPURFAST_KMEANS_ACROSS_RANKS=1 or 0
    overrides."""
    across = _across_override()
    if across is not None:
        return across
    return _CTX.device != "cpu" or _env_int("LOCAL_WORLD_SIZE", _CTX.world_size) < _CTX.world_size


def _across_override() -> bool | None:
    """SPURFAST_KMEANS_ACROSS_RANKS as a bool; None when unset."""
    env = os.environ.get("SPURFAST_KMEANS_ACROSS_RANKS")
    if env is not None and env not in ("0", "1"):
        raise ValueError(f"SPURFAST_KMEANS_ACROSS_RANKS must be 0 or 1, got {env!r}")
    return None if env is None else env == "1"


def _stranded() -> bool:
    """Whether rank 0 left a k-means midway (an error between two of its collectives): the
    other ranks wait in one of those, not for a message on the wait group, which then hung
    rank 0 until they gave up ($SPURFAST_DIST_TIMEOUT, 30 min) and replaced its error with
    theirs.  It sends nothing more: its error ends it, and torchrun (or the closed
    connections) ends them."""
    if _MIDWAY:
        log.error("rank 0 failed inside a k-means the other ranks take part in; they stop as this rank exits")
    return _MIDWAY


@contextmanager
def _rank0_clusters_alone():
    """The main section without k-means across ranks: release the serving ranks at the end."""
    try:
        yield
    finally:
        broadcast_object(None)  # serve_kmeans: no k-means will come


@contextmanager
def main_section():
    """Rank 0's part after the embedding pass: discovery, characterisation, report.
    Inside the block every k-means runs across all ranks where :func:`cluster_across_ranks`
    says so (the others are in :func:`serve_main_section`); leaving it, by success or error, releases them and tells
    them whether rank 0 succeeded.  A no-op in one process."""
    if not _CTX.distributed:
        yield
        return
    if not _CTX.is_main:
        raise RuntimeError("main_section() is for rank 0; other ranks call serve_main_section()")
    global _MIDWAY
    failure, _MIDWAY = None, False
    # the other ranks of this node mostly wait in here, so rank 0 may use their cores for
    # what it runs alone (kNN, scores); torchrun starts every rank with OMP_NUM_THREADS=1
    threads = torch.get_num_threads()
    per_node = _env_int("LOCAL_WORLD_SIZE", _CTX.world_size)
    if _CTX.device == "cpu" and per_node > 1:
        torch.set_num_threads(max(threads, min(usable_cores(), threads * per_node)))
    try:
        with (kmeans_across_ranks() if cluster_across_ranks() else _rank0_clusters_alone()):
            yield
    except BaseException as exc:
        failure = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        torch.set_num_threads(threads)
        if not _MIDWAY:
            broadcast_object(failure)


def serve_main_section() -> int:
    """Ranks != 0: serve k-means for rank 0's :func:`main_section`, then wait for it to
    finish; raises if rank 0 failed.  Returns how many k-means runs this rank took part in."""
    served = serve_kmeans()
    failure = broadcast_object(None)
    if failure is not None:
        raise _rank0_error(failure.split(":", 1)[0], f"rank 0 failed: {failure}")
    return served
