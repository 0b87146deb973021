"""torch.distributed on the CPU (gloo): k-means across ranks equals k-means in one
process; `torchrun --nproc-per-node 2 -m spurfast discover` over a small planted JPEG pool
gives the 1-process findings; a rank killed mid-run resumes from its part of the store."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as tmp_mp

from helpers import assert_close, assert_equal_int
from spurfast import distributed as sd
from spurfast.cluster import batched_kmeans

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is unavailable")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, outq, timeout_s=120):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    sd.init("cpu", timeout_s=timeout_s)
    try:
        outq.put((rank, fn(*args)))
    finally:
        sd.shutdown()


def _spawn(fn, args, world=2, timeout_s=120):
    ctx = tmp_mp.get_context("spawn")
    q = ctx.SimpleQueue()
    ranks = tmp_mp.start_processes(_worker, args=(world, _free_port(), fn, args, q, timeout_s), nprocs=world,
                                   join=False, start_method="spawn")
    out = {}
    # drained while the ranks run: a result larger than the pipe's buffer (~64 KiB) blocked its
    # rank in put() while this waited for every rank to end, and the test hung
    done = False
    while not done:
        done = ranks.join(timeout=0.1)   # raises for a rank that failed
        while not q.empty():
            r, v = q.get()
            out[r] = v
    return out


def _big_result(n):
    return np.zeros(n, np.float64)


def test_spawned_ranks_may_return_results_larger_than_a_pipe_holds():
    out = _spawn(_big_result, (40_000,))   # 320 KB each
    assert sorted(out) == [0, 1] and all(v.shape == (40_000,) for v in out.values())


def _kmeans_job(x, groups, kpg, seed, init):
    if sd.is_main():
        with sd.kmeans_across_ranks():
            res = batched_kmeans(x, groups, kpg, n_groups=len(kpg), n_iter=30, seed=seed)
            dup = batched_kmeans(x, groups, kpg, n_groups=len(kpg), n_iter=30, init=init)
            try:
                batched_kmeans(x, groups, np.asarray(kpg) + 1000, n_groups=len(kpg))
                bad = "no error"
            except ValueError as exc:
                bad = str(exc)
        # numpy: tensors would travel through shared memory that dies with this process
        return {"assign": res.assign.numpy(), "cent": res.centroids.numpy(), "counts": res.counts.numpy(),
                "dist": res.dist.numpy(), "n_iter": res.n_iter, "bad": bad,
                "dup_assign": dup.assign.numpy(), "dup_reseeded": dup.reseeded}
    return {"served": sd.serve_kmeans()}


def test_not_distributed_is_a_noop(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = sd.init("cpu")
    assert not ctx.distributed and sd.world_size() == 1 and sd.is_main()
    assert sd.broadcast_object(5) == 5 and sd.run_on_main(lambda: 7) == 7
    sd.barrier()
    with sd.main_section():
        pass
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="RANK=5"):
        sd.init("cpu")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="torchrun"):   # the user's launch to fix: "error: ...", not a traceback
        sd.init("cpu")


def test_cluster_across_ranks_only_where_ranks_bring_their_own_hardware(monkeypatch):
    monkeypatch.delenv("SPURFAST_KMEANS_ACROSS_RANKS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(sd, "_CTX", sd.Context(rank=0, world_size=2, backend="gloo", device="cpu"))
    assert not sd.cluster_across_ranks()        # one CPU node: the ranks share its cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert sd.cluster_across_ranks()            # two nodes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(sd, "_CTX", sd.Context(rank=0, world_size=2, backend="nccl", device="cuda:0"))
    assert sd.cluster_across_ranks()            # GPUs
    monkeypatch.setenv("SPURFAST_KMEANS_ACROSS_RANKS", "0")
    assert not sd.cluster_across_ranks()
    monkeypatch.setenv("SPURFAST_KMEANS_ACROSS_RANKS", "yes")
    with pytest.raises(ValueError, match="SPURFAST_KMEANS_ACROSS_RANKS must be 0 or 1, got 'yes'"):
        sd.cluster_across_ranks()


def test_kmeans_across_two_ranks_matches_one_process():
    g = torch.Generator().manual_seed(0)
    # odd sizes, one group with a single point, one with k == size
    sizes = [301, 1, 57, 4, 190]
    centres = torch.randn(len(sizes), 6, 5, generator=g) * 4
    xs, gs = [], []
    for gi, n in enumerate(sizes):
        lab = torch.randint(0, 6, (n,), generator=g)
        xs.append(centres[gi, lab] + 0.3 * torch.randn(n, 5, generator=g))
        gs.append(torch.full((n,), gi))
    perm = torch.randperm(sum(sizes), generator=g)
    x, groups = torch.cat(xs)[perm], torch.cat(gs)[perm]
    kpg = np.array([6, 1, 5, 4, 6])
    ref = batched_kmeans(x, groups, kpg, n_groups=len(kpg), n_iter=30, seed=3)
    # a start with two equal centroids in group 0: one cluster empties and is re-seeded
    init = ref.centroids.clone()
    init[0, 1] = init[0, 0]
    dup = batched_kmeans(x, groups, kpg, n_groups=len(kpg), n_iter=30, init=init)
    assert dup.reseeded >= 1
    out = _spawn(_kmeans_job, (x, groups, kpg, 3, init))
    got = out[0]
    assert out[1]["served"] == 2  # the bad call was refused on rank 0 before anything was sent
    assert got["dup_reseeded"] == dup.reseeded
    assert_equal_int(torch.from_numpy(got["dup_assign"]), dup.assign, name="assign after a re-seed")
    assert "larger than group" in got["bad"]
    assert got["n_iter"] == ref.n_iter
    assert_equal_int(torch.from_numpy(got["assign"]), ref.assign, name="assign")
    assert_equal_int(torch.from_numpy(got["counts"]), ref.counts, name="counts")
    assert_close(torch.from_numpy(got["cent"]), ref.centroids, name="centroids", atol=1e-5, rtol=1e-5)
    assert_close(torch.from_numpy(got["dist"]), ref.dist, name="dist", atol=1e-5, rtol=1e-5)


def _long_work_job(pause):
    # one rank busy longer than the collective timeout: the ranks done with their shard wait
    # for the slowest (all_gather_object), the others for rank 0's main section (broadcast
    # objects, as run_on_main)
    sd.all_succeed(lambda: time.sleep(pause) if sd.rank() == 1 else None)
    if sd.is_main():
        with sd.main_section():
            time.sleep(pause)
        return "done"
    return sd.serve_main_section()


def test_waits_on_another_ranks_long_work_outlast_the_collective_timeout():
    out = _spawn(_long_work_job, (3.5,), timeout_s=2.5)
    assert out == {0: "done", 1: 0}


def _early_failure_job():
    from spurfast import cluster
    seen = []
    for across, hook in (("yes", None), ("1", object())):  # a bad setting; a nested k-means block
        os.environ["SPURFAST_KMEANS_ACROSS_RANKS"] = across
        cluster.kmeans_hook = hook
        try:
            if sd.is_main():
                with sd.main_section():
                    pass
            else:
                sd.serve_main_section()
            seen.append("no error")
        except Exception as exc:
            seen.append(f"{type(exc).__name__}: {exc}")
        cluster.kmeans_hook = None
    return seen


def test_main_section_failing_before_kmeans_reaches_the_other_ranks():
    out = _spawn(_early_failure_job, ())
    bad = "ValueError: SPURFAST_KMEANS_ACROSS_RANKS must be 0 or 1, got 'yes'"
    nested = "RuntimeError: kmeans_across_ranks blocks cannot be nested"
    assert out[0] == [bad, nested]
    # of rank 0's kind: the CLI says "error: ..." for a ValueError, and printed a traceback on the other ranks
    assert out[1] == [f"ValueError: rank 0 failed: {bad}", f"RuntimeError: rank 0 failed: {nested}"]


def _sharded_store_job(root):
    from spurfast.store import EmbeddingStore

    def refuse(self, protocol):
        raise TypeError("an EmbeddingStore was pickled (its columns read into memory)")
    EmbeddingStore.__reduce_ex__ = refuse
    src, clf, vae = _small(30)
    store = sd.embed_pool_sharded(src, clf, vae, root, num_classes=4, batch_size=8, progress=False, num_workers=1)
    return store.complete, np.array(store["mu"])


def test_sharded_embedding_sends_no_store_between_ranks(tmp_path):
    """Every rank opens the merged store itself rather than receiving rank 0's pickled."""
    out = _spawn(_sharded_store_job, (str(tmp_path / "s"),))
    assert out[0][0] and out[1][0] and out[0][1].shape[0] == 30
    np.testing.assert_array_equal(out[0][1], out[1][1])


# ---------------------------------------------------------------- sharded store, in one process
def _small(n=50):
    from spurfast.data import ArraySource
    from spurfast.models import VAE, SmallCNN, VAEConfig
    torch.manual_seed(0)
    src = ArraySource(torch.rand(n, 1, 28, 28), np.arange(n) % 4)
    return src, SmallCNN(1, 4, 28).eval(), VAE(VAEConfig(1, 28, (8, 16), 6)).eval()


def test_shards_resume_and_merge_into_the_one_process_store(tmp_path):
    from spurfast.embed import embed_pool
    from spurfast.store_shards import merge_shards, shard_dir
    src, clf, vae = _small(53)
    kw = dict(num_classes=4, batch_size=8, progress=False)
    full = embed_pool(src, clf, vae, tmp_path / "one", **kw)
    embed_pool(src, clf, vae, tmp_path / "sh", shard_id=0, num_shards=3, **kw)
    with pytest.raises(ValueError, match=r"ranks \[1, 2\] \(of 3\) are missing"):
        merge_shards(tmp_path / "sh", 3, progress=False)
    part = embed_pool(src, clf, vae, tmp_path / "sh", shard_id=1, num_shards=3, stop_after=1, **kw)
    assert part.done == 8 and part.n == 18 and list(part["index"][:3]) == [1, 4, 7]
    embed_pool(src, clf, vae, tmp_path / "sh", shard_id=2, num_shards=3, **kw)
    with pytest.raises(ValueError, match="unfinished"):
        merge_shards(tmp_path / "sh", 3, progress=False)
    again = embed_pool(src, clf, vae, tmp_path / "sh", shard_id=1, num_shards=3, **kw)  # resumes at row 8
    assert again.complete and again.root == shard_dir(tmp_path / "sh", 1, 3)
    merged = merge_shards(tmp_path / "sh", 3, progress=False)
    assert merged.complete and not (tmp_path / "sh" / "shards").exists()
    for col in ("pred", "probs", "mu", "labels", "ok"):
        # rows of other batch compositions: equal up to float summation order
        np.testing.assert_allclose(np.asarray(merged[col], dtype=np.float64), np.asarray(full[col], dtype=np.float64),
                                   rtol=1e-5, atol=1e-6, err_msg=col)
    # a complete main store is returned as is, sharded or not
    assert embed_pool(src, clf, vae, tmp_path / "sh", shard_id=0, num_shards=3, **kw).root == tmp_path / "sh"
    with pytest.raises(ValueError, match="shard_id"):
        embed_pool(src, clf, vae, tmp_path / "x", shard_id=3, num_shards=3, **kw)


def test_a_merge_of_rows_computed_by_two_encoders_says_so(tmp_path, caplog):
    """A 1-process run resumed by 2 ranks with another encoder merged the mixed rows without a
    word (one process resuming says so), and the store recorded the first encoder alone."""
    import json

    from spurfast.store import MANIFEST
    from spurfast.embed import embed_pool
    from spurfast.store_shards import merge_shards, shard_dir
    src, clf, vae = _small(24)
    kw = dict(num_classes=4, batch_size=8, progress=False)
    for r in range(2):
        embed_pool(src, clf, vae, tmp_path / "sh", shard_id=r, num_shards=2, **kw)
    path = shard_dir(tmp_path / "sh", 1, 2) / MANIFEST
    path.write_text(json.dumps(dict(json.loads(path.read_text()), compute="cpu:triton")))
    with caplog.at_level("WARNING", logger="spurfast.embed"):
        merge_shards(tmp_path / "sh", 2, progress=False)
    assert "mixes rows computed on cpu:torch" in caplog.text and "on cpu:triton" in caplog.text, caplog.text
    caplog.clear()   # one encoder: nothing to say
    for r in range(2):
        embed_pool(src, clf, vae, tmp_path / "ok", shard_id=r, num_shards=2, **kw)
    with caplog.at_level("WARNING", logger="spurfast.embed"):
        merge_shards(tmp_path / "ok", 2, progress=False)
    assert "mixes rows" not in caplog.text


def test_merge_refuses_shards_of_other_models(tmp_path):
    from spurfast.embed import embed_pool
    from spurfast.store_shards import merge_shards
    from spurfast.models import SmallCNN
    src, clf, vae = _small(20)
    kw = dict(num_classes=4, batch_size=8, progress=False)
    embed_pool(src, clf, vae, tmp_path / "s", shard_id=0, num_shards=2, **kw)
    embed_pool(src, SmallCNN(1, 4, 28).eval(), vae, tmp_path / "s", shard_id=1, num_shards=2, **kw)
    with pytest.raises(ValueError, match="disagree on fingerprint"):
        merge_shards(tmp_path / "s", 2, progress=False)


def _counting_encoder(vae):
    """``vae`` with its encoder counting the images it embeds (into the returned list)."""
    seen, real = [], vae.encode
    vae.encode = lambda x, **k: (seen.append(len(x)), real(x, **k))[1]
    return seen


def test_shard_store_killed_right_after_its_creation_resumes_with_its_pool_indices(tmp_path, monkeypatch):
    from spurfast import embed as E
    from spurfast import store as S
    from spurfast.store_shards import merge_shards
    src, clf, vae = _small(20)
    kw = dict(num_classes=4, batch_size=8, progress=False)
    ref = E.embed_pool(src, clf, vae, tmp_path / "one", **kw)
    E.embed_pool(src, clf, vae, tmp_path / "s", shard_id=0, num_shards=2, **kw)
    real = S._write_json

    def killed(path, obj):  # the process dies as soon as the shard store's manifest exists
        real(path, obj)
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(S, "_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        E.embed_pool(src, clf, vae, tmp_path / "s", shard_id=1, num_shards=2, **kw)
    monkeypatch.undo()
    part = E.embed_pool(src, clf, vae, tmp_path / "s", shard_id=1, num_shards=2, **kw)
    assert list(part["index"]) == list(range(1, 20, 2))
    merged = merge_shards(tmp_path / "s", 2, progress=False)
    np.testing.assert_allclose(np.asarray(merged["mu"]), np.asarray(ref["mu"]), rtol=1e-5, atol=1e-6)


def test_merge_refuses_a_shard_whose_index_is_not_its_selection(tmp_path):
    from spurfast.store import MANIFEST, EmbeddingStore
    from spurfast.embed import embed_pool
    from spurfast.store_shards import merge_shards, shard_dir
    src, clf, vae = _small(20)
    kw = dict(num_classes=4, batch_size=8, progress=False)
    for r in range(2):
        embed_pool(src, clf, vae, tmp_path / "s", shard_id=r, num_shards=2, **kw)
    index = EmbeddingStore(shard_dir(tmp_path / "s", 1, 2)).array("index", writable=True)
    index[3] = 0   # a shard row that would land on pool row 0
    index.flush()
    with pytest.raises(ValueError, match=r"1-of-2 holds pool index 0 in row 3 where 7 belongs"):
        merge_shards(tmp_path / "s", 2, progress=False)
    assert not (tmp_path / "s" / MANIFEST).exists()   # nothing merged, nothing marked complete


def test_finished_shards_of_another_world_size_are_merged_not_redone(tmp_path):
    from spurfast.embed import embed_pool
    src, clf, vae = _small(40)
    kw = dict(num_classes=4, batch_size=8, progress=False)
    ref = embed_pool(src, clf, vae, tmp_path / "one", **kw)
    for r in range(2):
        embed_pool(src, clf, vae, tmp_path / "s", shard_id=r, num_shards=2, **kw)
    seen = _counting_encoder(vae)
    for shards in (1, 3):   # resumed by one process, or by three ranks
        d = tmp_path / f"s{shards}"
        import shutil
        shutil.copytree(tmp_path / "s", d)
        store = embed_pool(src, clf, vae, d, shard_id=0, num_shards=shards, **kw)
        assert store.complete and store.root == d and sum(seen) == 0, (shards, sum(seen))
        assert not (d / "shards").exists()
        np.testing.assert_allclose(np.asarray(store["mu"]), np.asarray(ref["mu"]), rtol=1e-5, atol=1e-6)


def test_unfinished_shards_of_another_world_size_keep_their_finished_rows(tmp_path, caplog):
    """A 1-process restart of an unfinished 2-process run threw away every row the shards
    had embedded (28 of 40 here); the pool rows they finished without a gap (0-16: rank 1
    stopped at its 8th row, pool index 15) are kept and only the rest is embedded again."""
    from spurfast.embed import embed_pool
    src, clf, vae = _small(40)
    kw = dict(num_classes=4, batch_size=8, progress=False)
    one = embed_pool(src, clf, vae, tmp_path / "one", **kw)
    embed_pool(src, clf, vae, tmp_path / "s", shard_id=0, num_shards=2, **kw)                # 20 rows
    embed_pool(src, clf, vae, tmp_path / "s", shard_id=1, num_shards=2, stop_after=1, **kw)  # 8 rows
    seen = _counting_encoder(vae)
    with caplog.at_level("WARNING", logger="spurfast.embed"):
        store = embed_pool(src, clf, vae, tmp_path / "s", **kw)
    assert store.complete and sum(seen) == 23, f"embedded {sum(seen)} rows again; 23 (pool 17-39) were left"
    assert "discarding 11 embedded rows of an earlier 2-process run" in caplog.text, caplog.text
    assert "the 17 rows they finished from pool index 0 on are kept" in caplog.text
    for col in ("pred", "mu", "probs", "labels", "ok"):
        np.testing.assert_allclose(np.asarray(store[col], dtype=np.float64), np.asarray(one[col], dtype=np.float64),
                                   rtol=1e-5, atol=1e-6, err_msg=col)
    assert not (tmp_path / "s" / "shards").exists()
    (tmp_path / "s" / "shards" / "0-of-3").mkdir(parents=True)   # left by a merge that died at its end
    assert embed_pool(src, clf, vae, tmp_path / "s", **kw).complete
    assert not (tmp_path / "s" / "shards").exists()   # a complete store needs no shards


def test_a_restart_on_more_processes_continues_after_the_kept_rows(tmp_path):
    """An unfinished 2-process run restarted on 3: the rows both shards finished (pool 0-16)
    go into the main store first, the 3 new shards start at pool index 17, and the merged
    store equals a 1-process run's."""
    from spurfast.embed import embed_pool
    from spurfast.store_shards import merge_shards
    src, clf, vae = _small(40)
    kw = dict(num_classes=4, batch_size=8, progress=False)
    one = embed_pool(src, clf, vae, tmp_path / "one", **kw)
    embed_pool(src, clf, vae, tmp_path / "s", shard_id=0, num_shards=2, **kw)
    embed_pool(src, clf, vae, tmp_path / "s", shard_id=1, num_shards=2, stop_after=1, **kw)
    seen = _counting_encoder(vae)
    shards = [embed_pool(src, clf, vae, tmp_path / "s", shard_id=r, num_shards=3, **kw) for r in range(3)]
    assert [s.manifest["start"] for s in shards] == [17] * 3 and sum(seen) == 23, (
        [s.manifest["start"] for s in shards], sum(seen))
    store = merge_shards(tmp_path / "s", 3, progress=False)
    for col in ("pred", "mu", "labels", "ok"):
        np.testing.assert_allclose(np.asarray(store[col], dtype=np.float64), np.asarray(one[col], dtype=np.float64),
                                   rtol=1e-5, atol=1e-6, err_msg=col)


def _identity_job(root, wrong_rank):
    from spurfast.models import SmallCNN
    src, clf, vae = _small(24)
    if sd.rank() == wrong_rank:   # this rank loaded another classifier file
        torch.manual_seed(123)
        clf = SmallCNN(1, 4, 28).eval()
    seen = _counting_encoder(vae)
    try:
        store = sd.embed_pool_sharded(src, clf, vae, root, num_classes=4, batch_size=8, progress=False, num_workers=1)
        return sum(seen), store.complete, np.array(store["mu"])
    except Exception as exc:
        return sum(seen), f"{type(exc).__name__}: {exc}", None


def test_ranks_with_other_inputs_are_refused_before_embedding(tmp_path):
    """...and a shard store of other inputs left in the run's store (by such a run under
    an earlier version) is started again, not a reason to refuse the corrected run."""
    from spurfast.embed import embed_pool
    from spurfast.models import SmallCNN
    src, clf, vae = _small(24)
    torch.manual_seed(123)
    embed_pool(src, SmallCNN(1, 4, 28).eval(), vae, tmp_path / "s", shard_id=1, num_shards=2, num_classes=4,
               batch_size=8, progress=False)
    out = _spawn(_identity_job, (str(tmp_path / "s"), 1))
    for r in range(2):
        assert out[r][0] == 0, out[r][:2]   # nothing embedded
        assert "ranks [1] loaded other inputs than rank 0" in out[r][1], out[r][1]
    out = _spawn(_identity_job, (str(tmp_path / "s"), None))
    ref = embed_pool(src, clf, vae, tmp_path / "one", num_classes=4, batch_size=8, progress=False)
    assert out[0][1] is True and out[1][1] is True, (out[0][1], out[1][1])
    np.testing.assert_allclose(out[0][2], np.asarray(ref["mu"]), rtol=1e-5, atol=1e-6)


def _rows_made_job(root, case):
    import spurfast.embed as E
    src, clf, vae = _small(24)
    kw = {}
    if sd.rank() == 1 and case == "other encoder":   # as a rank whose environment picks another encoder
        real = E.how_rows_are_made
        E.how_rows_are_made = lambda *a, **k: real(*a, **k)[:2] + ("cpu:triton",)
    if sd.rank() == 1 and case == "missing backend":
        kw["encoder_backend"] = "cupy"                # no encoder of that backend: raised on rank 1 alone
    seen = _counting_encoder(vae)
    try:
        sd.embed_pool_sharded(src, clf, vae, root, num_classes=4, batch_size=8, progress=False, num_workers=1, **kw)
        return sum(seen), "no error"
    except Exception as exc:
        return sum(seen), f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize("case,says", [
    ("other encoder", "would make the store's rows otherwise than rank 0"),
    ("missing backend", "ranks [1] cannot embed as asked: rank 1: BackendUnavailable")])
def test_ranks_that_would_make_rows_otherwise_are_refused_before_embedding(tmp_path, case, says):
    """A rank whose environment picked another loader was refused only at the merge, after
    every rank had embedded its shard; one with another encoder merged mixed rows silently;
    one whose named backend was missing raised alone and left the others waiting."""
    out = _spawn(_rows_made_job, (str(tmp_path / "s"), case))
    for r in range(2):
        assert out[r][0] == 0 and says in out[r][1], out[r]


def _write_log_job(root):
    from spurfast import store as S   # every manifest is written there
    writes, real = [], S._write_json
    S._write_json = lambda path, obj: (writes.append(str(path)), real(path, obj))[1]
    src, clf, vae = _small(40)
    if sd.is_main():
        time.sleep(1)   # rank 1 reaches the legacy store first
    store = sd.embed_pool_sharded(src, clf, vae, root, num_classes=4, batch_size=8, progress=False, num_workers=1)
    return store.complete, writes.count(str(Path(root) / S.MANIFEST))


def test_legacy_main_store_is_relabelled_by_rank_0_alone(tmp_path):
    """Relabelling the shared main store on every rank raced on its manifest."""
    from spurfast.data.sources import sampled_digest
    from spurfast.store import MANIFEST
    from spurfast.embed import embed_pool
    from spurfast.identity import weights_fingerprint
    src, clf, vae = _small(40)
    embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=8, progress=False, stop_after=1)
    m = json.loads((tmp_path / "s" / MANIFEST).read_text())
    m["content"] = sampled_digest(src)   # as an earlier spurfast version recorded it
    m["fingerprint"] = weights_fingerprint(src, clf, vae)
    m.pop("identity")   # nor a fingerprint scheme
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(m))
    out = _spawn(_write_log_job, (str(tmp_path / "s"),))
    assert out[0][0] and out[1][0]
    assert out[1][1] == 0 and out[0][1] >= 1, out   # rank 1 never wrote the main store's manifest


# ---------------------------------------------------------------- discover under torchrun
SIZE = 32


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A poisoned training pool (a fixed noise pattern at strength 0.5 in 60% of class 0),
    a 400-image JPEG pool with the pattern in 20% of all images, and a classifier and VAE
    trained on them (the classifier calls about 90% of stamped images class 0)."""
    from spurfast.data.folder import ImageFolderSource
    from spurfast.make_pool import PoolSpec, make_pool
    from spurfast.models.files import save_classifier, save_vae
    from spurfast.models.train import train_classifier, train_vae
    from spurfast.models.vae import VAEConfig

    d = tmp_path_factory.mktemp("dist")
    common = dict(classes=4, min_size=SIZE, max_size=48, plant="noise", strength=0.5, target_size=SIZE)
    make_pool(d / "train", PoolSpec(n=480, fraction=0.6, plant_class=0, seed=1, **common), workers=1, progress=False)
    make_pool(d / "pool", PoolSpec(n=400, fraction=0.2, seed=2, **common), workers=1, progress=False)
    torch.manual_seed(0)
    clf = train_classifier(ImageFolderSource(d / "train", size=SIZE), 4, epochs=6, seed=0, progress=False)
    save_classifier(clf, d / "clf.pt")
    vae = train_vae(ImageFolderSource(d / "pool", size=SIZE), VAEConfig.for_images(3, SIZE, 8), epochs=4, seed=0,
                    progress=False)
    save_vae(vae, d / "vae.pt")
    return d


def _discover_args(d: Path, out: Path, batch: int = 32, extra: tuple = ("--no-confirm",)):
    return ["-v", "discover", "--pool", str(d / "pool"), "--classifier", str(d / "clf.pt"), "--vae", str(d / "vae.pt"),
            "--out", str(out), "--size", str(SIZE), "--n-null", "8", *extra, "--batch-size", str(batch),
            "--quiet"]


def _env():
    # the caller's PYTHONPATH kept after the repository: packages installed there were missing
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    env.pop("WORLD_SIZE", None)
    return env


def test_the_subprocess_environment_keeps_the_callers_python_path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/tmp/site")
    assert _env()["PYTHONPATH"] == f"{ROOT}{os.pathsep}/tmp/site"
    monkeypatch.delenv("PYTHONPATH")
    assert _env()["PYTHONPATH"] == str(ROOT)


def _one_process(d: Path, out: Path, env: dict | None = None, **kw):
    r = subprocess.run([sys.executable, "-m", "spurfast"] + _discover_args(d, out, **kw), capture_output=True,
                       text=True, timeout=300, env=dict(_env(), **(env or {})), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]


def _torchrun(d: Path, out: Path, batch: int = 32, env: dict | None = None, extra: tuple = ("--no-confirm",), **kw):
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "spurfast"] + _discover_args(d, out, batch,
                                                                                                    extra)
    # torchrun leaves a torchelastic_* log folder in TMPDIR per launch: keep them in the test's own
    tmp = out.parent / f"{out.name}-tmp"
    tmp.mkdir(exist_ok=True)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(_env(), TMPDIR=str(tmp), **(env or {})), cwd=ROOT, **kw)


def _assert_same_findings(a: Path, b: Path):
    fa, fb = json.loads((a / "findings.json").read_text()), json.loads((b / "findings.json").read_text())
    assert fa["pool"] == fb["pool"]
    assert len(fa["findings"]) == len(fb["findings"]) > 0, (len(fa["findings"]), len(fb["findings"]))
    for x, y in zip(fa["findings"], fb["findings"]):
        for k in ("rank", "class", "cluster", "size", "members", "merged_clusters", "view"):
            assert x.get(k) == y.get(k), (k, x["rank"])
        for k in ("score", "p_value", "q_value"):
            assert x[k] == pytest.approx(y[k], rel=1e-6), (k, x["rank"])
        if x["confirm"] is not None or y["confirm"] is not None:   # the same images pasted on the same clean ones
            assert x["confirm"]["verdict"] == y["confirm"]["verdict"], x["rank"]
            for k in ("flip_rate", "control_flip_rate", "q_value"):
                assert x["confirm"][k] == pytest.approx(y["confirm"][k], rel=1e-6), (k, x["rank"])
    # every cluster, significant or not, and its null p-value
    assert (a / "clusters.csv").read_text() == (b / "clusters.csv").read_text()


@pytest.fixture(scope="module")
def single_run(planted):
    out = planted / "out1"
    _one_process(planted, out)
    return out


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to the interpreter")
def test_two_ranks_give_the_one_process_findings(planted, single_run):
    """With k-means across the ranks (on one CPU node rank 0 would cluster alone: the
    resume test below runs that default)."""
    out = planted / "out2"
    p = _torchrun(planted, out, env={"SPURFAST_KMEANS_ACROSS_RANKS": "1"})
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log[-3000:]
    assert "rank 1 of 2" in log and "rank 0 of 2" in log
    _assert_same_findings(single_run, out)
    doc = json.loads((single_run / "findings.json").read_text())
    carries = np.loadtxt(planted / "pool" / "ground_truth.csv", delimiter=",", skiprows=1, usecols=3, dtype=int)
    top = np.asarray(doc["findings"][0]["members"])
    assert doc["findings"][0]["class"] == 0 and carries[top].mean() > 2 * carries.mean()
    assert not (out / "store" / "shards").exists()  # merged into the one store, parts removed
    # the pool's pixels as the passes decoded them, merged from the ranks' shards
    from spurfast.pixel_cache import PIXELS, usable
    from spurfast.store import EmbeddingStore
    one, two = EmbeddingStore(single_run / "store"), EmbeddingStore(out / "store")
    assert usable(one) and usable(two)
    np.testing.assert_array_equal(one.read_rows(PIXELS, slice(None)), two.read_rows(PIXELS, slice(None)))


def test_findings_and_pictures_do_not_depend_on_the_kept_pixels(planted):
    """The steps after discovery read the store's pixel rows (spurfast.pixel_cache) where they
    decoded the pool's files again: the same findings, confirmations, pictures and rankings,
    bit for bit, as a run that keeps none."""
    from spurfast.pixel_cache import usable
    from spurfast.store import EmbeddingStore

    outs = {}
    for gb in ("4", "0"):
        outs[gb] = planted / f"out-pixels-{gb}"
        _one_process(planted, outs[gb], env={"SPURFAST_PIXEL_CACHE_GB": gb}, extra=())
    kept, decoded = outs["4"], outs["0"]
    assert usable(EmbeddingStore(kept / "store")) and not usable(EmbeddingStore(decoded / "store"))
    _assert_same_findings(kept, decoded)
    fa, fb = (json.loads((o / "findings.json").read_text())["findings"] for o in (kept, decoded))
    assert [f["confirm"] for f in fa] == [f["confirm"] for f in fb] and any(f["confirm"] for f in fa)
    assert [f.get("ranked_by") for f in fa] == [f.get("ranked_by") for f in fb]
    files = sorted(p.relative_to(kept) for p in (kept / "images").glob("*.png")) + \
        sorted(p.relative_to(kept) for p in (kept / "rankings").glob("*.npy"))
    assert files and files == sorted(p.relative_to(decoded) for p in (decoded / "images").glob("*.png")) + \
        sorted(p.relative_to(decoded) for p in (decoded / "rankings").glob("*.npy"))
    for f in files:
        assert (kept / f).read_bytes() == (decoded / f).read_bytes(), f


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to the interpreter")
def test_two_ranks_with_the_feature_view_give_the_one_process_findings(planted):
    """`--feature-view` (which needs confirmation) under torchrun: the view's clusters come from
    the merged store's features, with k-means across the ranks, and rank 0 confirms and ships
    the same findings as one process does."""
    view = ("--feature-view",)
    _one_process(planted, planted / "view1", extra=view)
    p = _torchrun(planted, planted / "view2", env={"SPURFAST_KMEANS_ACROSS_RANKS": "1"}, extra=view)
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log[-3000:]
    _assert_same_findings(planted / "view1", planted / "view2")
    doc = json.loads((planted / "view1" / "findings.json").read_text())
    # every finding of the view that ships was confirmed (the others left, pictures and all)
    assert all(f["confirm"]["verdict"] == "confirmed" for f in doc["findings"] if f.get("view") == "features")
    assert any(f["confirm"] and f["confirm"]["verdict"] == "confirmed" for f in doc["findings"])


def _children(pid: int) -> list[int]:
    kids = []
    for t in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(c) for c in (t / "children").read_text().split()]
    return kids


def _env_of(pid: int) -> dict:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode(errors="replace").split("=", 1) for kv in raw if b"=" in kv)


@pytest.mark.skipif(not TORCHRUN.exists() or not Path("/proc/self/task").exists(),
                    reason="needs torchrun and Linux /proc")
def test_killed_rank_resumes_from_its_store(planted, single_run):
    out = planted / "out_kill"
    manifest = out / "store" / "shards" / "1-of-2" / "manifest.json"
    p = _torchrun(planted, out, batch=4, start_new_session=True)
    killed_at = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None:
            if manifest.is_file():
                try:
                    done = json.loads(manifest.read_text())["done"]
                except (json.JSONDecodeError, OSError):
                    done = 0
                if done >= 8:
                    rank1 = [c for c in _children(p.pid) if _env_of(c).get("RANK") == "1"]
                    assert rank1, "rank 1 process not found"
                    os.kill(rank1[0], signal.SIGKILL)
                    killed_at = done
                    break
            time.sleep(0.01)
        log, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert killed_at is not None, "rank 1 finished before it could be killed"
    assert p.returncode != 0, "torchrun should report the killed rank"
    done_before = json.loads(manifest.read_text())["done"]
    assert 0 < done_before < 200, done_before
    assert not (out / "findings.json").exists()
    p = _torchrun(planted, out, batch=32)  # rows, not batches, are the unit of resumption
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log[-3000:]
    assert f"resuming shard 1/2 at row {done_before}" in log, log[-3000:]
    _assert_same_findings(single_run, out)


def test_rank_cuda_index_under_per_rank_visible_devices():
    from spurfast.distributed import rank_cuda_index

    assert rank_cuda_index(3, 8) == 3          # torchrun on one node: every rank sees every GPU
    assert rank_cuda_index(3, 1) == 0          # Slurm --gpus-per-task=1: each rank sees its own GPU as 0
    with pytest.raises(ValueError, match="LOCAL_RANK=4 but this rank sees 2 CUDA devices"):
        rank_cuda_index(4, 2)


def test_shard_positions_with_fewer_points_than_ranks():
    for n in range(6):
        for w in range(1, 6):
            pos = [sd._shard_positions(n, r, w) for r in range(w)]
            assert all(len(p) == len(range(r, n, w)) for r, p in enumerate(pos)), (n, w)
            assert sorted(torch.cat(pos).tolist()) == list(range(n)), (n, w)


def test_explicit_cuda_index_under_several_ranks_is_refused(tmp_path, monkeypatch):
    """Every rank would compute on GPU N while its collectives run on cuda:LOCAL_RANK."""
    from spurfast.discover import DiscoverConfig
    from spurfast.pipeline import run_discovery
    src, clf, vae = _small(10)
    monkeypatch.setattr(sd, "_CTX", sd.Context(rank=1, world_size=2, local_rank=1, backend="nccl", device="cuda:1"))
    # a context with no process group behind it: the ranks' agreement on the checks runs them alone
    monkeypatch.setattr(sd, "all_succeed", lambda fn, *a, **k: fn(*a, **k))
    with pytest.raises(ValueError, match=r"--device cuda:0 under 2 ranks.*use --device cuda"):
        run_discovery(src, clf, vae, tmp_path / "out", num_classes=4, config=DiscoverConfig(device="cuda:0"),
                      progress=False)
    assert not (tmp_path / "out").exists()
    sd.check_rank_device("cuda")                  # each rank on its own GPU
    sd.check_rank_device("cuda:1")                # this rank's own GPU, named
    monkeypatch.setattr(sd, "_CTX", sd.Context())
    sd.check_rank_device("cuda:3")                # one process: any GPU it likes


def _labels_job(root):
    from spurfast.data import ArraySource
    src, clf, vae = _small(24)
    if sd.rank() == 1:   # this rank's copy of the pool holds other labels
        src = ArraySource(src.images, (np.arange(24) + 1) % 4)
    try:
        sd.embed_pool_sharded(src, clf, vae, root, num_classes=4, batch_size=8, progress=False, num_workers=1)
        return "no error"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _refusing_rank_job(root):
    from spurfast.pipeline import run_discovery
    src, clf, vae = _small(24)
    num_classes = 3 if sd.rank() == 1 else 4   # this rank alone refuses its inputs (labels 0..3)
    try:
        run_discovery(src, clf, vae, root, num_classes=num_classes, progress=False, confirm=False)
        return "no error"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def test_a_rank_refusing_its_inputs_is_named_by_every_rank(tmp_path):
    # a rank's own checks came before the first collective: it said why and left, and the others
    # failed in the output directory's broadcast with gloo's "Connection closed by peer"
    out = _spawn(_refusing_rank_job, (str(tmp_path / "run"),))
    assert out[1].startswith("ValueError: ") and "rank" not in out[1], out[1]   # its own refusal
    assert out[0] == "ValueError: rank 1 failed: " + out[1], out[0]
    assert not (tmp_path / "run").exists()


def test_ranks_with_other_labels_are_refused(tmp_path):
    """Labels take no part in the store's identity, and every rank brought the shared
    store's labels up to date with its own: on a complete store the ranks raced, and
    rank 0 could discover with another rank's labels."""
    from spurfast.store import EmbeddingStore
    from spurfast.embed import embed_pool
    src, clf, vae = _small(24)
    embed_pool(src, clf, vae, tmp_path / "s", num_classes=4, batch_size=8, progress=False)
    out = _spawn(_labels_job, (str(tmp_path / "s"),))
    for r in range(2):
        assert "ranks [1] loaded other labels for pool" in out[r], out[r]
    np.testing.assert_array_equal(np.asarray(EmbeddingStore(tmp_path / "s")["labels"]), src.labels())


@pytest.mark.parametrize("var,value", [("SPURFAST_DIST_TIMEOUT", "30m"), ("SPURFAST_DIST_WAIT_TIMEOUT", "-5"),
                                       ("SPURFAST_DIST_TIMEOUT", "0")])
def test_a_bad_timeout_variable_is_named_before_joining(monkeypatch, var, value):
    # float('30m') raised "could not convert string to float" naming no variable; a wait
    # timeout was read only after this rank had joined the group, a zero one not refused
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv(var, value)
    monkeypatch.setattr(sd.dist, "init_process_group", lambda *a, **k: pytest.fail("joined the group"))
    with pytest.raises(ValueError, match=f"environment variable {var}='{value}': expected a timeout in seconds > 0"):
        sd.init("cpu")
    with pytest.raises(ValueError, match=r"timeout_s=-1: expected a timeout in seconds > 0"):
        sd.init("cpu", timeout_s=-1)


def test_a_missing_rank_variable_is_named_before_joining(monkeypatch):
    # RANK defaulted to 0: every process took rank 0 and waited for the others for the
    # whole timeout, then failed naming no variable
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setattr(sd.dist, "init_process_group", lambda *a, **k: pytest.fail("joined the group as rank 0"))
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but RANK is not set: launch with torchrun"):
        sd.init("cpu")


def test_the_module_docstring_names_functions_that_exist():
    # it sent readers to discover_run, a function that no longer exists (run_discovery does it)
    import importlib
    import re

    for name in re.findall(r":func:`([\w.]+)`", sd.__doc__):
        module, _, attr = name.rpartition(".")
        assert hasattr(importlib.import_module(module) if module else sd, attr), name


def test_shards_rank_0_cannot_see_are_blamed_on_an_unshared_output_directory(tmp_path):
    # every rank had finished its shard, on a disk of its own; rank 0's merge then said
    # "run every rank's embedding pass first"
    from spurfast.embed import embed_pool
    src, clf, vae = _small(20)
    embed_pool(src, clf, vae, tmp_path / "s", shard_id=0, num_shards=2, num_classes=4, batch_size=8, progress=False)
    with pytest.raises(FileNotFoundError, match=r"rank 0 cannot see the shard stores of ranks \[1\] .* must be on a "
                                                r"filesystem every rank shares"):
        sd._merge(tmp_path / "s", 2, False, src)


def test_a_missing_local_rank_variable_is_named_on_a_node_with_several_gpus(monkeypatch):
    # LOCAL_RANK defaulted to 0: every rank of the node took GPU 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail(f"took {d}"))
    monkeypatch.setattr(sd.dist, "init_process_group", lambda *a, **k: pytest.fail("joined the group"))
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but LOCAL_RANK is not set: launch with torchrun"):
        sd.init("cuda")


def test_a_bad_kmeans_across_ranks_variable_is_named_before_joining(monkeypatch):
    # only rank 0's main section read it: a misspelt value failed after every rank had
    # embedded its shard of the pool (hours at scale)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("SPURFAST_KMEANS_ACROSS_RANKS", "true")
    monkeypatch.setattr(sd.dist, "init_process_group", lambda *a, **k: pytest.fail("joined the group"))
    with pytest.raises(ValueError, match="SPURFAST_KMEANS_ACROSS_RANKS must be 0 or 1, got 'true'"):
        sd.init("cpu")


def _midway_failure_job():
    # rank 0 fails between two of a Lloyd loop's collectives (an out-of-memory, say)
    os.environ["SPURFAST_KMEANS_ACROSS_RANKS"] = "1"
    t = time.perf_counter()
    try:
        if sd.is_main():
            def fail(self, t):
                raise MemoryError("out of memory in the assignment step")
            sd.RankTeam.all_reduce = fail
            x = np.random.default_rng(0).normal(size=(60, 3)).astype(np.float32)
            with sd.main_section():
                batched_kmeans(x, np.zeros(60, np.int64), np.array([3]), n_groups=1)
        else:
            sd.serve_main_section()
        return "no error", time.perf_counter() - t
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}", time.perf_counter() - t


def test_rank_0_failing_inside_a_kmeans_across_ranks_ends_every_rank_at_once():
    # rank 0's release went over the wait group while the others sat in a Lloyd collective:
    # it hung until they gave up after the collective timeout (30 min by default), and its
    # own error was replaced by "Connection closed by peer"
    out = _spawn(_midway_failure_job, (), timeout_s=20)
    assert out[0][0] == "MemoryError: out of memory in the assignment step", out
    assert out[1][0].startswith("RuntimeError"), out
    assert out[0][1] < 10 and out[1][1] < 10, out


def _rank0_oserror_job():
    def refuse():
        raise NotADirectoryError("output directory /x/out is a file")
    seen = []
    try:
        sd.run_on_main(refuse)
    except Exception as exc:
        seen.append((type(exc).__name__, str(exc)))

    def rank_1_refuses():   # a rank's shard store of another pool, say
        if sd.rank() == 1:
            raise ValueError("embedding store s was made with other models")
    try:
        sd.all_succeed(rank_1_refuses)
    except Exception as exc:
        seen.append((type(exc).__name__, str(exc)))

    def unavailable():
        from spurfast.backends import BackendUnavailable
        raise BackendUnavailable("backend 'triton' for 'kmeans_assign' is unavailable here")
    try:
        sd.run_on_main(unavailable)
    except Exception as exc:
        seen.append((type(exc).__name__, str(exc)))
    return seen


def test_every_rank_raises_the_failed_ranks_kind_of_error():
    # only FileExistsError, FileNotFoundError and ValueError travelled from rank 0 (and none
    # from the others): an output directory that is a file (or unwritable) gave rank 0
    # "error: ..." and every other rank a traceback
    out = _spawn(_rank0_oserror_job, ())
    assert out[0][0] == ("NotADirectoryError", "output directory /x/out is a file")
    assert out[1][0] == ("NotADirectoryError", "rank 0 failed: output directory /x/out is a file")
    # and the ranks that did not fail in a step they all run raise the failed rank's kind
    assert out[1][1] == ("ValueError", "embedding store s was made with other models")
    assert out[0][1] == ("ValueError", "rank 1 failed: ValueError: embedding store s was made with other models")
    assert out[1][2][0] == "BackendUnavailable", out[1]   # the CLI says "error: ..." for it too


def _float64_kmeans_job(x, groups, kpg):
    if sd.is_main():
        with sd.kmeans_across_ranks():
            res = batched_kmeans(x, groups, kpg, n_groups=len(kpg), n_iter=20, seed=0)
        return {"assign": res.assign.numpy(), "cent": res.centroids.numpy()}
    return {"served": sd.serve_kmeans()}


def test_float64_points_far_from_the_origin_cluster_across_ranks_as_in_one_process():
    # rank 0 cast the points to fp32 before sending them: blobs at 1e8 and 1e8 + 1 became one
    # point, where one process shifts them first (cluster.lloyd) and tells them apart
    g = torch.Generator().manual_seed(0)
    x = torch.cat([1e8 + 0.01 * torch.randn(40, 3, generator=g, dtype=torch.float64),
                   1e8 + 1 + 0.01 * torch.randn(40, 3, generator=g, dtype=torch.float64)])
    groups, kpg = torch.zeros(80, dtype=torch.int64), np.array([2])
    ref = batched_kmeans(x, groups, kpg, n_groups=1, n_iter=20, seed=0)
    assert len(set(ref.assign[:40].tolist())) == 1 and set(ref.assign[:40].tolist()) != set(ref.assign[40:].tolist())
    out = _spawn(_float64_kmeans_job, (x, groups, kpg))
    assert out[1]["served"] == 1
    assert_equal_int(torch.from_numpy(out[0]["assign"]), ref.assign, name="assign")
    assert_close(torch.from_numpy(out[0]["cent"]), ref.centroids, name="centroids", atol=1e-5, rtol=1e-5)


def _fractional_groups_job(x, groups):
    if sd.is_main():
        with sd.kmeans_across_ranks():
            try:
                res = batched_kmeans(x, groups, [2, 2], n_groups=2, n_iter=5)
                return f"no error: cluster sizes {res.counts.flatten().tolist()}"
            except ValueError as exc:
                return str(exc)
    return sd.serve_kmeans()


def test_fractional_group_ids_are_refused_across_ranks_as_in_one_process():
    # rank 0 cast the group ids to int64 before checking them: 0.5 became group 0 without a word
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    groups = np.r_[np.zeros(10), np.ones(9), [0.5]]
    msg = "group ids must be integers; 1 are not, e.g. groups[19] = 0.5"
    with pytest.raises(ValueError, match=re.escape(msg)):
        batched_kmeans(x, groups, [2, 2], n_groups=2)
    assert _spawn(_fractional_groups_job, (x, groups)) == {0: msg, 1: 0}   # refused before anything was sent


def _bad_metric_or_backend_job(x, groups):
    if sd.is_main():
        seen = []
        with sd.kmeans_across_ranks():
            # seed, n_iter, tol and k-means++'s backend too: each failed on rank 0 (or every rank)
            # after the points were sent, and the serving rank waited out the timeout or ended
            for kw in (dict(metric="cos"), dict(backend="nosuch"), dict(seed=None), dict(n_iter=None),
                       dict(tol="0.1"), dict(plusplus="nosuch"), {}):
                kw = {"n_iter": 5, **kw}
                if "plusplus" in kw:
                    os.environ["SPURFAST_BACKEND_KMEANS_PLUSPLUS"] = kw.pop("plusplus")
                try:
                    batched_kmeans(x, groups, [2, 2], n_groups=2, **kw)
                    seen.append("ok")
                except (ValueError, RuntimeError) as exc:   # BackendUnavailable: a RuntimeError
                    seen.append(str(exc))
                os.environ.pop("SPURFAST_BACKEND_KMEANS_PLUSPLUS", None)
        return seen
    return sd.serve_kmeans()


def test_a_bad_metric_or_backend_is_refused_before_the_other_ranks_take_part():
    # every rank's lloyd refused it after rank 0 had sent the points: rank 0 raised an error one
    # could catch, the serving rank ended, and the next k-means failed with "Connection closed by peer"
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    out = _spawn(_bad_metric_or_backend_job, (x, np.r_[np.zeros(10), np.ones(10)]), timeout_s=30)
    assert out[0][0] == "metric must be 'l2' or 'cosine', got 'cos'"
    assert out[0][1].startswith("backend 'nosuch' does not implement 'kmeans_assign'")
    assert out[0][2:5] == ["seed must be an integer, got None", "n_iter must be an integer, got None",
                           "tol must be a number, got '0.1'"]
    assert "nosuch" in out[0][5] and "kmeans_plusplus" in out[0][5]
    assert out == {0: out[0][:6] + ["ok"], 1: 1}


def test_ranks_sharing_a_gpu_are_found():
    assert sd.shared_gpu([("a", "GPU-1"), ("a", "GPU-2"), ("b", "GPU-1")]) is None   # one GPU per rank
    assert sd.shared_gpu([("a", "GPU-1"), ("a", "GPU-2"), ("a", "GPU-1")]) == (0, 2)


def test_ranks_sharing_a_gpu_are_refused_as_a_launch_to_fix(monkeypatch):
    # more ranks than GPUs is the user's launch setting: a RuntimeError reached the CLI as a traceback
    import types

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(uuid="GPU-1"))
    monkeypatch.setattr(sd.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(sd.dist, "all_gather_object", lambda owners, obj, group=None: owners.__setitem__(
        slice(None), [obj, obj]))
    with pytest.raises(ValueError, match="ranks 0 and 1 both use GPU GPU-1 on .*: start at most one rank per GPU"):
        sd._refuse_shared_gpus("cuda:0")


def test_cuda_asked_for_without_a_cuda_device_is_refused_as_a_setting(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sd.dist, "init_process_group", lambda *a, **k: pytest.fail("joined the group"))
    with pytest.raises(ValueError, match="device 'cuda' was asked for, but torch sees no CUDA device"):
        sd.init("cuda")
