"""DALI folder loader (CPU pipeline): pool-index alignment, partial last batch, start /
indices / sharding, dtypes, grey, multi-pipeline chunking, registry wiring."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="nvidia.dali is not importable")

from spurfast import backends  # noqa: E402
from spurfast.data import loader_dali, loader_torch  # noqa: E402
from spurfast.data.folder import ImageFolderSource, list_folder  # noqa: E402

N = 23
SIZE = 16


def _colour(i):
    """A colour that encodes index i (distinct, far apart in every channel)."""
    return np.array([(i * 11) % 256, (i * 37 + 60) % 256, 250 - i * 10], dtype=np.uint8)


@pytest.fixture(scope="module")
def coded_folder(tmp_path_factory):
    """N flat-colour images (PNG, lossless) of varied shapes: file i has colour _colour(i),
    so after any resize the pixels still say which file a sample came from."""
    root = tmp_path_factory.mktemp("coded")
    shapes = [(20, 30), (30, 20), (16, 16), (17, 41), (50, 19)]
    for i in range(N):
        h, w = shapes[i % len(shapes)]
        Image.fromarray(np.broadcast_to(_colour(i), (h, w, 3)).copy()).save(root / f"{i:03d}.png")
    paths, _, _ = list_folder(root)
    return paths


def _decode_index(images_u8: torch.Tensor) -> list[int]:
    table = np.stack([_colour(i) for i in range(N)]).astype(int)
    centre = images_u8[:, :, SIZE // 2, SIZE // 2].numpy().astype(int)
    return [int(np.abs(table - c).sum(1).argmin()) for c in centre]


def _all(it):
    batches = list(it)
    return batches, torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def _dali(paths, **kw):
    kw.setdefault("size", SIZE)
    kw.setdefault("device", "cpu")
    return loader_dali.iter_folder_batches(paths, **kw)


def test_indices_align_with_pixels_and_last_batch_is_partial(coded_folder):
    batches, idx, images = _all(_dali(coded_folder, batch_size=5, dtype=torch.uint8))
    assert [len(b[0]) for b in batches] == [5, 5, 5, 5, 3], "last batch partial, nothing padded or dropped"
    assert idx.dtype == torch.int64 and idx.tolist() == list(range(N))
    assert images.shape == (N, 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert _decode_index(images) == idx.tolist(), "each sample's pixels belong to its pool index"
    assert all(bool(b[2].all()) and b[2].dtype == torch.bool for b in batches)


@pytest.mark.parametrize("batch_size", [1, 4, 23, 64])
def test_batch_sizes_cover_everything_once(coded_folder, batch_size):
    batches, idx, images = _all(_dali(coded_folder, batch_size=batch_size, dtype=torch.uint8))
    assert idx.tolist() == list(range(N))
    assert [len(b[0]) for b in batches][:-1] == [batch_size] * (len(batches) - 1)
    assert _decode_index(images) == idx.tolist()


def test_start_and_explicit_indices(coded_folder):
    _, idx, images = _all(_dali(coded_folder, batch_size=4, start=9, dtype=torch.uint8))
    assert idx.tolist() == list(range(9, N)) and _decode_index(images) == idx.tolist()
    order = [17, 3, 4, 22, 0]
    _, idx, images = _all(_dali(coded_folder, batch_size=2, indices=order, dtype=torch.uint8))
    assert idx.tolist() == order and _decode_index(images) == order
    with pytest.raises(ValueError, match="repeat"):
        list(_dali(coded_folder, indices=[1, 1]))
    assert list(_dali(coded_folder, start=N)) == []


@pytest.mark.parametrize("num_shards", [2, 3, 5])
def test_shards_are_disjoint_and_cover_everything_once(coded_folder, num_shards):
    seen = []
    for shard in range(num_shards):
        _, idx, images = _all(_dali(coded_folder, batch_size=3, shard_id=shard, num_shards=num_shards,
                                    dtype=torch.uint8))
        assert _decode_index(images) == idx.tolist()
        t_idx = torch.cat([b[0] for b in loader_torch.iter_folder_batches(
            coded_folder, size=SIZE, batch_size=3, shard_id=shard, num_shards=num_shards, num_threads=0)])
        assert idx.tolist() == t_idx.tolist(), "DALI and torch loaders shard identically"
        seen += idx.tolist()
    assert sorted(seen) == list(range(N)) and len(seen) == N


def test_chunked_pipelines_give_the_same_stream(coded_folder):
    _, idx1, im1 = _all(_dali(coded_folder, batch_size=3, dtype=torch.uint8))
    _, idx2, im2 = _all(_dali(coded_folder, batch_size=3, dtype=torch.uint8, first_pipeline_batches=1))
    assert torch.equal(idx1, idx2) and torch.equal(im1, im2)


def test_dtypes(coded_folder):
    _, _, u8 = _all(_dali(coded_folder, batch_size=8, dtype=torch.uint8))
    _, _, f32 = _all(_dali(coded_folder, batch_size=8, dtype=torch.float32))
    _, _, f16 = _all(_dali(coded_folder, batch_size=8, dtype="float16"))
    _, _, bf16 = _all(_dali(coded_folder, batch_size=8, dtype="bf16"))
    assert (u8.dtype, f32.dtype, f16.dtype, bf16.dtype) == (torch.uint8, torch.float32, torch.float16, torch.bfloat16)
    ref = u8.float() / 255.0
    assert float(f32.min()) >= 0.0 and float(f32.max()) <= 1.0
    assert float((f32 - ref).abs().max()) <= 1e-6, "float32 is exactly the uint8 output / 255"
    assert float((f16.float() - ref).abs().max()) <= 2 ** -11, "fp16 within half an fp16 ulp of [0,1] values"
    assert float((bf16.float() - ref).abs().max()) <= 2 ** -8, "bf16 within half a bf16 ulp"
    with pytest.raises(ValueError, match="dtype"):
        list(_dali(coded_folder, dtype=torch.int32))


def test_grey_output(coded_folder):
    _, idx, g = _all(_dali(coded_folder, batch_size=8, channels=1, dtype=torch.uint8))
    _, _, rgb = _all(_dali(coded_folder, batch_size=8, dtype=torch.uint8))
    assert g.shape == (N, 1, SIZE, SIZE)
    r, gg, b = (rgb[:, c].int() for c in range(3))
    luma = (r * 19595 + gg * 38470 + b * 7471 + 32768) >> 16
    assert int((g[:, 0].int() - luma).abs().max()) <= 1, "grey = PIL's luma of the RGB output (flat images)"


def test_bad_arguments(coded_folder):
    with pytest.raises(ValueError, match="batch_size"):
        list(_dali(coded_folder, batch_size=0))
    with pytest.raises(ValueError, match="shard_id"):
        list(_dali(coded_folder, shard_id=2, num_shards=2))
    with pytest.raises(ValueError, match="channels"):
        list(_dali(coded_folder, channels=4))
    with pytest.raises(ValueError, match="device"):
        list(_dali(coded_folder, device="tpu"))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            list(_dali(coded_folder, device="gpu"))


def test_registry_and_iter_batches_use_dali(tmp_path):
    ok, why = loader_dali.is_available()
    assert ok, why
    name, fn = backends.resolve("loader", "dali")
    assert name == "dali" and fn is loader_dali.iter_folder_batches
    for c, cls in enumerate(["ants", "bees"]):
        (tmp_path / cls).mkdir()
        for k in range(3 + c):
            Image.fromarray(np.broadcast_to(_colour(5 * c + k), (20, 24, 3)).copy()).save(tmp_path / cls / f"{k}.png")
    src = ImageFolderSource(tmp_path, size=SIZE)
    got = list(loader_torch.iter_batches(src, batch_size=4, backend="dali"))
    assert torch.cat([b.indices for b in got]).tolist() == list(range(7))
    assert torch.cat([b.labels for b in got]).tolist() == [0, 0, 0, 1, 1, 1, 1]
    ref = list(loader_torch.iter_batches(src, batch_size=4, backend="torch"))
    diff = max(float((a.images - b.images).abs().max()) for a, b in zip(got, ref))
    assert diff <= 1 / 255, "flat images: the two loaders agree to one level"


@pytest.mark.gpu
def test_mixed_gpu_matches_cpu_pipeline(coded_folder):
    """GPU (mixed) decoding: same indices, pixels within the parity bound of the CPU run."""
    _, idx_c, cpu = _all(_dali(coded_folder, batch_size=5, dtype=torch.float32, device="cpu"))
    _, idx_g, gpu = _all(_dali(coded_folder, batch_size=5, dtype=torch.float32, device="gpu"))
    assert gpu.is_cuda and torch.equal(idx_c, idx_g)
    assert float((gpu.cpu() - cpu).abs().max()) <= 12 / 255


def test_two_pipelines_at_most_whatever_the_pool_size():
    """DALI keeps memory per pipeline built: a first piece, then one pipeline for the rest."""
    from spurfast.data.loader_dali import _pipeline_pieces

    order = np.arange(1000) * 3
    pieces = _pipeline_pieces(order, 10)
    assert [len(p) for p in pieces] == [10, 990]
    assert np.array_equal(np.concatenate(pieces), order)
    assert _pipeline_pieces(order[:0], 10) == []
    assert [len(p) for p in _pipeline_pieces(order[:7], 10)] == [7]
    assert [len(p) for p in _pipeline_pieces(order[:10], 10)] == [10]


def test_closing_the_stream_early_stops_the_background_file_check(coded_folder, monkeypatch):
    """The rest of the pool is checked in one background call; a stream closed early
    (Ctrl-C, an error downstream) waited for it to check every remaining file (~0.1 ms
    a file from the page cache, far more on network storage: a minute at 1M files)."""
    import time

    checked = []
    real = loader_dali.validate_image_file

    def slow(path):
        checked.append(path)
        time.sleep(0.3)
        return real(path)

    monkeypatch.setattr(loader_dali, "validate_image_file", slow)
    it = _dali(coded_folder, batch_size=1, first_pipeline_batches=1, dtype=torch.uint8)
    idx, images, ok = next(it)
    assert idx.tolist() == [0] and bool(ok.all())
    it.close()
    assert len(checked) < len(coded_folder), "closed after one image, yet every file was checked first"


def test_pathlib_paths_as_the_torch_loader_takes_them(coded_folder):
    """The loader op's paths as pathlib.Path: the torch loader took them, DALI failed
    with "'PosixPath' object has no attribute 'encode'"."""
    from pathlib import Path

    _, idx, images = _all(_dali([Path(p) for p in coded_folder[:5]], batch_size=2, dtype=torch.uint8))
    assert idx.tolist() == list(range(5)) and _decode_index(images) == idx.tolist()


def test_a_numbered_cuda_device_decodes_on_that_gpu(coded_folder, monkeypatch):
    """`--device cuda:1` reaches the loader as "cuda:1": DALI decoded on torch's current
    device (GPU 0) whatever the number said, and yielded its images there.  The pipeline
    and the output now name GPU 1; a GPU torch does not see is refused by name."""
    seen = {}

    class Built(Exception):
        pass

    def build(files, labels, **kw):
        seen.update(kw)
        raise Built

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(loader_dali, "build_pipeline", build)
    with pytest.raises(Built):
        list(_dali(coded_folder, device="cuda:1"))
    assert seen["device"] == "gpu" and seen["device_id"] == 1
    with pytest.raises(Built):
        list(_dali(coded_folder, device="cuda"))
    assert seen["device_id"] == 0
    with pytest.raises(ValueError, match="'cuda:2': torch sees 2 CUDA device"):
        list(_dali(coded_folder, device="cuda:2"))


def test_a_batch_size_past_the_pool_builds_pipelines_of_the_pool_size(coded_folder, monkeypatch):
    """The file list was topped up to (prefetch depth + 1) x batch_size names whatever the
    pool's size: batch_size 1e9 on 40 images was killed for memory at 23 GB."""
    built = []

    def build(files, labels, **kw):
        built.append((len(files), kw["batch_size"]))
        return real(files, labels, **kw)

    real = loader_dali.build_pipeline
    monkeypatch.setattr(loader_dali, "build_pipeline", build)
    batches, idx, images = _all(_dali(coded_folder, batch_size=1000, dtype=torch.uint8))
    assert [len(b[0]) for b in batches] == [N] and _decode_index(images) == idx.tolist() == list(range(N))
    assert built and all(b <= N and n <= 4 * N for n, b in built), built


def test_a_numbered_cpu_device_decodes_on_the_cpu():
    """torch computes on "cpu:1" as on the CPU; DALI's device check refused it."""
    assert loader_dali.resolve_device("cpu:1") == "cpu" and loader_dali.resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="got 'cpu:x'"):
        loader_dali.resolve_device("cpu:x")


def test_a_relative_non_utf8_path_after_a_chdir_is_its_own_file(tmp_path, monkeypatch):
    """A name that is not UTF-8 reaches DALI through a link, which was memoised by the path
    as given: the same relative path after a chdir decoded the first folder's file."""
    import os

    name = os.fsdecode(b"pool/\xff.png")
    for d, v in (("a", 0), ("b", 250)):
        (tmp_path / d / "pool").mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), v, np.uint8)).save(os.path.join(tmp_path, d, name))
    for d, v in (("a", 0), ("b", 250)):
        monkeypatch.chdir(tmp_path / d)
        _, img, ok = next(loader_dali.iter_folder_batches([name], size=8, batch_size=1, device="cpu",
                                                          num_threads=1, dtype=torch.uint8))
        assert bool(ok.all()) and img.unique().tolist() == [v], d


def test_a_non_utf8_path_through_a_link_and_dotdot_is_the_file_it_opens(tmp_path, monkeypatch):
    """The link DALI reads a non-UTF-8 name through pointed at ``os.path.abspath(path)``,
    which drops "L/.." as text: with L a link to a folder elsewhere, "L/../x" opens that
    folder's parent's x, but DALI decoded ./x (another image, ok=True) in its place."""
    import os

    monkeypatch.chdir(tmp_path)
    (tmp_path / "A" / "sub").mkdir(parents=True)
    (tmp_path / "L").symlink_to(tmp_path / "A" / "sub")
    name = os.fsdecode(b"\xff.png")
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(os.path.join(tmp_path, "A", name))
    Image.fromarray(np.full((8, 8, 3), 0, np.uint8)).save(os.path.join(tmp_path, name))
    path = os.path.join("L", "..", name)
    for mod, kw in ((loader_torch, {}), (loader_dali, {"device": "cpu"})):
        _, img, ok = next(mod.iter_folder_batches([path], size=8, batch_size=1, num_threads=1, dtype=torch.uint8,
                                                  **kw))
        assert bool(ok.all()) and img.unique().tolist() == [200], mod.__name__


def test_a_killed_process_filler_folder_is_removed_by_the_next_one(tmp_path):
    """The filler image's folder went only at a normal exit: a rank killed mid-run (the
    distributed resume test does that) left one in TMPDIR per run, for good.  Its name carries
    the pid now, and the next process's folder removes those whose process is gone."""
    import os
    import signal
    import subprocess
    import sys

    import time

    make = ("import os, sys; from spurfast.data.loader_dali import _filler_file; "
            "print(_filler_file(), flush=True); sys.stdin.read()")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    killed = subprocess.Popen([sys.executable, "-c", make], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    left = os.path.dirname(killed.stdout.readline().strip())
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert os.path.isdir(left) and os.path.basename(left).startswith(f"spurfast-dali-{killed.pid}-")
    os.utime(left, (time.time() - 3600,) * 2)   # a folder under a minute old is never swept
    made = subprocess.run([sys.executable, "-c", make], input="", capture_output=True, text=True, env=env,
                          check=True).stdout.strip()
    assert not os.path.exists(left) and not os.path.exists(made)   # swept; its own went at exit


def test_torch_running_out_of_memory_is_not_taken_for_a_bad_file(coded_folder, monkeypatch):
    """CUDA out of memory while a decoded batch was copied out of DALI was caught with DALI's
    failures: every file of the window was decoded alone, then "no single file reproduces the
    failure" was raised as a plain RuntimeError, which no caller could catch as out of memory."""
    real, calls, built = loader_dali._to_torch, [], []

    def copy(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real(*a, **k)

    real_build = loader_dali.build_pipeline
    monkeypatch.setattr(loader_dali, "_to_torch", copy)
    monkeypatch.setattr(loader_dali, "build_pipeline", lambda *a, **k: built.append(1) or real_build(*a, **k))
    with pytest.raises(torch.cuda.OutOfMemoryError, match="CUDA out of memory"):
        list(_dali(coded_folder, batch_size=4, dtype=torch.uint8))
    assert len(built) == 1   # no file-by-file probe
