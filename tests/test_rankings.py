"""SpilledRankings: the findings' pool-wide rankings on disk, read back memory-mapped."""
import gc
import time

from pathlib import Path

import numpy as np
import pytest

from spurfast.rankings import SpilledRankings


def test_values_round_trip_exactly_and_are_read_only_maps(tmp_path):
    r = SpilledRankings(folder=tmp_path)
    a = np.array([0.5, -np.inf, 3.25], np.float32)
    b = np.arange(7, dtype=np.float64) / 3
    r[1], r[2] = a, b
    assert isinstance(r[1], np.memmap) and r[1].dtype == np.float32 and r[2].dtype == np.float64
    np.testing.assert_array_equal(r[1], a)
    np.testing.assert_array_equal(r[2], b)
    a[0] = 9.0                       # a copy was saved: later edits of the caller's array do not leak in
    assert r[1][0] == 0.5
    with pytest.raises(ValueError, match="read-only"):
        r[1][0] = 1.0
    assert sorted(r) == [1, 2] and len(r) == 2 and dict(r).keys() == {1, 2}


def test_replacing_and_deleting_remove_the_files_but_not_values_handed_out(tmp_path):
    r = SpilledRankings(folder=tmp_path)
    r[1] = np.ones(4)
    held = r[1]
    r[1] = np.zeros(4)               # replaced while a map of the old value is held
    np.testing.assert_array_equal(held, np.ones(4))
    np.testing.assert_array_equal(r[1], np.zeros(4))
    assert len(list(r.folder.glob("*.npy"))) == 1
    del r[1]
    assert len(r) == 0 and list(r.folder.glob("*.npy")) == []
    with pytest.raises(KeyError):
        r[1]


def test_renumbering_as_the_rerank_does_keeps_every_value(tmp_path):
    """`pipeline.rank_confirmed_first`: new = {new rank: old value}, clear, update: the old files are gone
    before the new ones are written from their maps."""
    r = SpilledRankings({1: np.array([1.0]), 2: np.array([2.0]), 3: np.array([3.0])}, folder=tmp_path)
    moved = {new: r[old] for new, old in ((1, 3), (2, 1), (3, 2))}
    r.clear()
    r.update(moved)
    assert {k: float(r[k][0]) for k in r} == {1: 3.0, 2: 1.0, 3: 2.0}
    assert len(list(r.folder.glob("*.npy"))) == 3


def test_the_folder_goes_when_closed_or_collected(tmp_path):
    r = SpilledRankings({1: np.ones(3)}, folder=tmp_path)
    folder = r.folder
    assert folder.parent == tmp_path and folder.is_dir()
    r.close()
    assert not folder.exists() and len(r) == 0
    r2 = SpilledRankings({1: np.ones(3)}, folder=tmp_path)
    folder2 = r2.folder
    del r2
    gc.collect()
    assert not folder2.exists()


def test_discovery_keeps_its_rankings_on_disk(tmp_path):
    """One pool-sized array per finding stayed in memory until the run wrote them (gigabytes
    for hundreds of findings over an ImageNet-sized pool); the values are the probe's, as before."""
    from spurfast.discover import DiscoverConfig, discover, write_outputs
    from tests.test_discover import _store

    store, _ = _store(tmp_path / "store")
    res = discover(store, DiscoverConfig(k=4, n_null=30, seed=0), progress=False)
    assert isinstance(res.rankings, SpilledRankings) and len(res.rankings) == len(res.findings) >= 1
    assert all(isinstance(res.rankings[f["rank"]], np.memmap) for f in res.findings)
    write_outputs(res, tmp_path / "run")
    for f in res.findings:
        saved = np.load(tmp_path / "run" / "rankings" / f"finding{f['rank']}.npy")
        assert saved.shape == (store.n,)
        np.testing.assert_array_equal(saved, res.rankings[f["rank"]])


def test_folders_of_killed_runs_are_swept_and_live_ones_kept(tmp_path):
    """A run killed before it removed its rankings left the folder in TMPDIR for good; the next
    mapping made there removes those of processes that are gone, not those of running ones."""
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    gone = tmp_path / f"spurfast-rankings-{dead}-abc"
    gone.mkdir()
    (gone / "0.npy").write_bytes(b"x")
    alive = tmp_path / f"spurfast-rankings-{os.getppid()}-def"   # the parent process is running
    alive.mkdir()
    other = tmp_path / "spurfast-rankings-notapid-x"
    other.mkdir()
    for d in (gone, alive, other):
        os.utime(d, (time.time() - 3600,) * 2)     # left an hour ago
    recent = tmp_path / f"spurfast-rankings-{dead}-new"   # under a minute old: perhaps not locked yet
    recent.mkdir()
    r = SpilledRankings(folder=tmp_path)
    assert not gone.exists() and alive.is_dir() and other.is_dir() and recent.is_dir() and r.folder.is_dir()
    assert r.folder.name.startswith(f"spurfast-rankings-{os.getpid()}-")


def test_export_links_the_file_and_keeps_its_values_after_replacement_and_close(tmp_path):
    r = SpilledRankings({1: np.arange(5.0)}, folder=tmp_path / "spill")
    out = tmp_path / "run" / "finding1.npy"
    out.parent.mkdir()
    out.write_bytes(b"an older run's")
    r.export(1, out)
    np.testing.assert_array_equal(np.load(out), np.arange(5.0))
    assert out.stat().st_nlink == 2                  # one file, two names: nothing was copied
    r[1] = np.zeros(5)                                # a new file: the exported one keeps its values
    r.close()
    np.testing.assert_array_equal(np.load(out), np.arange(5.0))
    assert out.stat().st_nlink == 1 and [p.name for p in out.parent.iterdir()] == ["finding1.npy"]


def test_export_copies_where_the_file_system_refuses_a_link(tmp_path, monkeypatch):
    import os

    r = SpilledRankings({1: np.arange(3, dtype=np.float32)}, folder=tmp_path / "spill")

    def refuse(*a):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    r.export(1, tmp_path / "finding1.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "finding1.npy"), np.arange(3, dtype=np.float32))
    assert (tmp_path / "finding1.npy").stat().st_nlink == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finding1.npy", "spill"]   # no temporary left


def test_discovery_with_a_work_folder_spills_there_not_in_tmpdir(tmp_path, monkeypatch):
    """TMPDIR is often a tmpfs (memory again) or small; a run's rankings wait in its own folder."""
    import tempfile

    from spurfast.discover import DiscoverConfig, discover, write_outputs
    from tests.test_discover import _store

    store, _ = _store(tmp_path / "store")
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    res = discover(store, DiscoverConfig(k=4, n_null=30, seed=0), progress=False, work_dir=tmp_path / "work")
    assert res.rankings.folder.parent == tmp_path / "work" and list(tmpdir.iterdir()) == []
    write_outputs(res, tmp_path / "run")
    for f in res.findings:
        saved = tmp_path / "run" / "rankings" / f"finding{f['rank']}.npy"
        np.testing.assert_array_equal(np.load(saved), res.rankings[f["rank"]])
    folder = res.rankings.folder
    del res
    gc.collect()
    assert not folder.exists()


def test_exporting_to_the_same_place_twice_leaves_no_temporary_file(tmp_path):
    """write_outputs called twice on one result: the second rename onto a name of the same file
    did nothing and left finding1.npy.PID.tmp in rankings/."""
    r = SpilledRankings({1: np.arange(4.0)}, folder=tmp_path / "spill")
    for _ in range(2):
        r.export(1, tmp_path / "finding1.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finding1.npy", "spill"]
    np.testing.assert_array_equal(np.load(tmp_path / "finding1.npy"), np.arange(4.0))


def test_a_folder_whose_pid_means_nothing_here_is_kept_while_its_owner_holds_it(tmp_path):
    """A process of another PID namespace (a container sharing this TMPDIR) looks gone to the pid
    check; its folder's lock says it lives, and the folder goes once the lock is free."""
    import fcntl
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    other = tmp_path / f"spurfast-rankings-{dead}-ns"
    other.mkdir()
    fd = os.open(other / ".owner", os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # held as its owner would hold it
    os.utime(other, (time.time() - 3600,) * 2)
    SpilledRankings(folder=tmp_path).close()
    assert other.is_dir()
    os.close(fd)                                       # the owner ended
    SpilledRankings(folder=tmp_path).close()
    assert not other.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_killed_owner_s_folder_goes_at_once_not_after_a_quiet_minute(tmp_path):
    """A rerun within a minute of a kill kept the killed pass's rankings folder beside its own
    finished run: the pid and quiet-time rule alone waited 60 s; the owner's free lock says it ended."""
    import subprocess
    import sys

    code = ("import os, sys; from spurfast.atomic_files import private_folder; "
            "print(private_folder('spurfast-rankings-', sys.argv[1]), flush=True); os._exit(0)")
    made = Path(subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                               check=True).stdout.strip())
    assert made.is_dir() and (made / ".owner").is_file()   # killed: no clean-up ran
    SpilledRankings(folder=tmp_path).close()
    assert not made.exists() and list(tmp_path.iterdir()) == []


def test_a_folder_is_never_seen_with_an_unlocked_owner_file(tmp_path, monkeypatch):
    # the lock file was created, then locked: a sweep in between read a free lock
    import fcntl

    from spurfast import atomic_files
    seen = []
    real = fcntl.flock

    def watch(fd, op):
        seen.append(sorted(p.name for p in tmp_path.glob("spurfast-rankings-*/*")))
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", watch)
    folder = atomic_files.private_folder("spurfast-rankings-", tmp_path)
    assert seen and all(".owner" not in names for names in seen), seen
    assert (folder / ".owner").is_file()
    atomic_files.release_folder(folder)


def test_a_file_system_without_locks_still_spills(tmp_path, monkeypatch):
    """flock failing (NFS without lockd, Lustre mounted noflock) failed the mapping and left its
    folder and a descriptor behind; the folder is then swept by the pid alone."""
    import errno
    import fcntl

    from spurfast import atomic_files

    def no_locks(*a):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    r = SpilledRankings({1: np.ones(3)}, folder=tmp_path)
    assert str(r.folder) not in atomic_files._held
    np.testing.assert_array_equal(r[1], np.ones(3))
    r.close()
    assert list(tmp_path.iterdir()) == []


def test_save_ranking_links_a_spilled_ranking_and_saves_any_other_mapping_s(tmp_path):
    import os

    from spurfast.rankings import save_ranking
    spilled = SpilledRankings({1: np.arange(5.0)}, folder=tmp_path / "spill")
    save_ranking(spilled, 1, tmp_path / "a.npy")
    assert os.path.samefile(tmp_path / "a.npy", spilled._files[1])        # a link: no second copy
    save_ranking({2: [0.5, 0.25]}, 2, tmp_path / "b.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.arange(5.0))
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), [0.5, 0.25])
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["a.npy", "b.npy"]
    spilled.close()


def test_save_ranking_of_a_plain_mapping_keeps_float64_values_exactly(tmp_path):
    # a narrowing save rounded pattern_rank's float64 scores to float32: near ties swapped places on disk
    from spurfast.rankings import save_ranking

    v = np.array([1 / 3, 1 / 3 + 1e-12, -np.inf, 2.0 ** -40])
    save_ranking({1: v}, 1, tmp_path / "finding1.npy")
    got = np.load(tmp_path / "finding1.npy")
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, v)


def test_an_export_copy_interrupted_midway_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    # copying straight into the destination truncated the earlier run's finding1.npy to the bytes written so far
    import os
    import shutil

    from spurfast.rankings import SpilledRankings

    r = SpilledRankings({1: np.arange(1000.0)}, folder=tmp_path / "spill")
    out = tmp_path / "finding1.npy"
    np.save(out, np.ones(3))

    def refuse(*a):
        raise OSError(18, "Invalid cross-device link")

    def half_then_fail(fin, fout):
        fout.write(fin.read(100))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "link", refuse)
    monkeypatch.setattr(shutil, "copyfileobj", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        r.export(1, out)
    np.testing.assert_array_equal(np.load(out), np.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finding1.npy", "spill"]   # no temporary left
    r.close()
