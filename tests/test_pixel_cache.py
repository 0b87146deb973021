"""The pool's pixels kept in the embedding store (spurfast.pixel_cache): the rows are what the
loader gave the pass, bit for bit, whichever loader; resumes, sizes and mixed rows."""
import json
import numpy as np
import pytest
import torch
from PIL import Image

from spurfast.data.folder import ImageFolderSource
from spurfast.data.reread import StoreLoaderReads, read_as_stored
from spurfast.embed import embed_pool
from spurfast.models import VAE, SmallCNN, VAEConfig
from spurfast.pixel_cache import (MIXED, MODE_KEY, PIXELS, StorePixelReads, batch_pixels, keeps_pixels, max_bytes,
                                  merged_mode, to_float, usable)
from spurfast.store import EmbeddingStore

SIZE = 16
BROKEN = "b/9.jpg"


def _has_dali() -> bool:
    from spurfast.data.loader_dali import is_available
    return is_available()[0]   # (ok, why): the tuple itself is always true, so the skip never skipped


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of JPEGs of odd sizes (resized and cropped by the loaders) and a truncated one."""
    d = tmp_path_factory.mktemp("pixels")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (d / c).mkdir()
        for i in range(9):
            h, w = rng.integers(17, 41, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / c / f"{i}.jpg", quality=90)
    good = (d / "a" / "0.jpg").read_bytes()
    (d / BROKEN).write_bytes(good[:len(good) // 3])
    return d


def _models():
    torch.manual_seed(0)
    return SmallCNN(3, 2, SIZE, width=4).eval(), VAE(VAEConfig(3, SIZE, (4, 8), 4)).eval()


def _embed(folder, out, loader, **kw):
    pool = ImageFolderSource(folder, size=SIZE)
    clf, vae = _models()
    return pool, embed_pool(pool, clf, vae, out, num_classes=2, batch_size=5, num_workers=1, progress=False,
                            loader_backend=loader, **kw)


@pytest.mark.parametrize("loader", ["torch", pytest.param("dali", marks=pytest.mark.skipif(
    not _has_dali(), reason="DALI is not installed"))])
def test_the_kept_rows_are_the_loaders_images_bit_for_bit(folder, tmp_path, loader):
    pool, store = _embed(folder, tmp_path / "s", loader)
    assert store.manifest[MODE_KEY] == {"torch": "div255", "dali": "mul_inv255"}[loader] and usable(store)
    reads = read_as_stored(pool, loader, "cpu", store=store)
    assert isinstance(reads, StorePixelReads)
    idx = np.array([17, 0, 3, 18, 3, 11])   # unsorted, repeated, the truncated file among them
    got, labels = reads.get_batch(idx)
    # what the steps read before: the loader that made the store, one batch at a time
    want, want_labels = (pool.get_batch(idx) if loader == "torch" else
                         StoreLoaderReads(ImageFolderSource(folder, size=SIZE), "dali", "cpu").get_batch(idx))
    broken = [str(x) for x in pool.paths].index(str(folder / BROKEN))
    assert got.dtype == torch.float32 and torch.equal(got, want) and torch.equal(labels, want_labels)
    assert float(reads.get_batch([broken])[0].abs().max()) == 0.0 and broken in reads.bad_files
    assert reads.item_id(4) == pool.item_id(4) and list(reads.labels()) == list(pool.labels())
    # the steps' passes read it as an in-memory source (no decoding): the same images
    from spurfast.data.loader_torch import iter_batches
    batches = list(iter_batches(reads, 7, indices=np.arange(len(pool))))
    assert torch.equal(torch.cat([b.images for b in batches]), reads.get_batch(np.arange(len(pool)))[0])
    assert not torch.cat([b.ok for b in batches])[broken] and torch.cat([b.ok for b in batches]).sum() == len(pool) - 1


def test_a_resumed_pass_keeps_the_same_rows(folder, tmp_path):
    _, whole = _embed(folder, tmp_path / "whole", "torch")
    _, part = _embed(folder, tmp_path / "part", "torch", stop_after=2)
    assert part.done == 10 and not usable(part)   # unfinished: not read
    _, resumed = _embed(folder, tmp_path / "part", "torch")
    assert resumed.complete and usable(resumed)
    np.testing.assert_array_equal(resumed.read_rows(PIXELS, slice(None)), whole.read_rows(PIXELS, slice(None)))


def test_the_pixel_column_is_never_kept_mapped(folder, tmp_path):
    """A mapped column counts the pages a run touched in its resident memory: 1.2 GB of
    pixels at 100k images, against about 40 MB for every other column."""
    pool, store = _embed(folder, tmp_path / "s", "torch")
    StorePixelReads(pool, store).get_batch(np.arange(len(pool)))
    assert store.wide(PIXELS) and not store.wide("mu")
    assert not any(name == PIXELS for name, _ in store._arrays)
    again = EmbeddingStore(store.root)
    again.write_rows(PIXELS, slice(0, 2), again.read_rows(PIXELS, slice(0, 2)))
    assert not again._arrays


def test_the_size_limit_and_in_memory_pools(folder, tmp_path, monkeypatch):
    pool = ImageFolderSource(folder, size=SIZE)
    monkeypatch.setenv("SPURFAST_PIXEL_CACHE_GB", "0")
    assert max_bytes() == 0 and not keeps_pixels(pool, len(pool))
    _, store = _embed(folder, tmp_path / "none", "torch")
    assert PIXELS not in store.manifest["columns"] and read_as_stored(pool, "torch", "cpu", store=store) is pool
    monkeypatch.setenv("SPURFAST_PIXEL_CACHE_GB", str(len(pool) * 3 * SIZE * SIZE / 2 ** 30))   # exactly the column
    assert keeps_pixels(pool, len(pool)) and not keeps_pixels(pool, len(pool) + 1)
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv("SPURFAST_PIXEL_CACHE_GB", bad)
        with pytest.raises(ValueError, match="SPURFAST_PIXEL_CACHE_GB"):
            max_bytes()
    monkeypatch.delenv("SPURFAST_PIXEL_CACHE_GB")
    from spurfast.data import ArraySource
    assert not keeps_pixels(ArraySource(torch.rand(3, 3, SIZE, SIZE)), 3)   # pixels in memory already


def test_conversions_and_mixed_rows(folder, tmp_path):
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    for mode in ("div255", "mul_inv255"):
        rows, got = batch_pixels(to_float(u, mode))
        assert got == mode and np.array_equal(rows, u.numpy())
    # the two differ in the last bit for some values, so each is told from the other
    assert not torch.equal(to_float(u, "div255"), to_float(u, "mul_inv255"))
    rows, got = batch_pixels(u)   # a uint8 batch (to a GPU) is made float by uint8_to: / 255
    assert got == "div255" and np.array_equal(rows, u.numpy())
    assert batch_pixels(torch.full((1, 1, 2, 2), 0.3))[1] is None   # not a uint8 scaled
    assert merged_mode(None, "div255", "div255") == "div255" and merged_mode() is None
    assert merged_mode("div255", "mul_inv255") == MIXED and merged_mode(None, MIXED) == MIXED
    pool, store = _embed(folder, tmp_path / "s", "torch")
    store.manifest[MODE_KEY] = MIXED   # e.g. a resume on another device: not read, the files decoded again
    assert not usable(store) and read_as_stored(pool, "torch", "cpu", store=store) is pool


def test_a_batch_both_conversions_give_back_decides_nothing():
    # black and white frames (or an all-unreadable batch of zeros) convert alike either way: taken
    # as div255, the first DALI batch of other values made the store "mixed" and its column unread
    from spurfast.pixel_cache import EITHER
    plain = torch.tensor([0, 255] * 8, dtype=torch.uint8).reshape(1, 1, 4, 4)
    for mode in ("div255", "mul_inv255"):
        assert batch_pixels(to_float(plain, mode))[1] == EITHER
    assert batch_pixels(to_float(plain, "mul_inv255"), "mul_inv255")[1] == "mul_inv255"   # the one expected
    other = to_float((torch.arange(16) * 13).to(torch.uint8).reshape(1, 1, 4, 4), "mul_inv255")
    got = batch_pixels(other, EITHER)[1]
    assert got == "mul_inv255" and merged_mode(EITHER, got) == "mul_inv255"
    assert merged_mode(None, EITHER, EITHER) == EITHER and merged_mode(EITHER, "div255", "mul_inv255") == MIXED
    assert torch.equal(to_float(plain, EITHER), to_float(plain, "div255"))


def test_rows_are_read_and_written_as_numpy_indexing_does(tmp_path):
    """The pixel column is read and written with pread/pwrite (a map of it counted the file's
    pages a read touched as resident: 1,365 scattered rows, 16 MiB, raised a process's peak by
    860 MiB where a merge had just written the file): the same rows as indexing an array."""
    store = EmbeddingStore.create(tmp_path / "s", 11, {PIXELS: ((11, 2, 3, 3), "uint8"), "mu": ((11, 4), "float32")},
                                  {})
    want = np.zeros((11, 2, 3, 3), np.uint8)
    rng = np.random.default_rng(0)
    for rows in (slice(0, 11), np.array([7, 2, 2, 9, 0]), np.array([10]), slice(3, 6), np.zeros(0, np.int64)):
        vals = rng.integers(0, 256, (len(np.arange(11)[rows]), 2, 3, 3), dtype=np.uint8)
        store.write_rows(PIXELS, rows, vals)
        want[rows] = vals   # a repeated row keeps its last value
        np.testing.assert_array_equal(np.load(store.root / f"{PIXELS}.npy"), want)
    for rows in (slice(None), np.array([9, 0, 0, 4, 10]), slice(2, 2), np.array([3, 4, 5, 7, 8])):
        np.testing.assert_array_equal(store.read_rows(PIXELS, rows), want[rows])
    with pytest.raises(IndexError, match="row 11 is outside"):
        store.read_rows(PIXELS, np.array([1, 11]))
    with open(store.root / f"{PIXELS}.npy", "r+b") as fh:   # cut short
        fh.truncate(128 + 5 * 18)
    with pytest.raises(ValueError, match="cut short"):
        store.read_rows(PIXELS, np.array([2, 8]))


def _rows_store(tmp_path):
    return EmbeddingStore.create(tmp_path / "s", 11, {PIXELS: ((11, 2, 3, 3), "uint8"), "mu": ((11, 4), "float32")},
                                 {})


def test_a_short_write_is_finished_and_one_that_writes_nothing_raises(tmp_path, monkeypatch):
    """pwritev's count was ignored: a short write (a full disk without fallocate, a file size
    limit, a span over 2 GiB: Linux moves at most 0x7ffff000 bytes a call) left rows unwritten
    and marked done."""
    import os
    store, real = _rows_store(tmp_path), os.pwritev
    vals = np.random.default_rng(0).integers(1, 256, (11, 2, 3, 3), dtype=np.uint8)

    def short(fd, bufs, offset):   # at most 7 bytes a call, as a kernel may
        return real(fd, [memoryview(bufs[0]).cast("B")[:7]], offset)
    monkeypatch.setattr(os, "pwritev", short)
    store.write_rows(PIXELS, slice(0, 11), vals)
    store.write_rows(PIXELS, np.array([9, 2, 3]), vals[[4, 5, 6]])
    want = vals.copy()
    want[[9, 2, 3]] = vals[[4, 5, 6]]
    np.testing.assert_array_equal(np.load(store.root / f"{PIXELS}.npy"), want)
    calls = []

    def stuck(fd, bufs, offset):   # 5 bytes, then nothing: a full disk
        calls.append(offset)
        return real(fd, [memoryview(bufs[0]).cast("B")[:5]], offset) if len(calls) == 1 else 0
    monkeypatch.setattr(os, "pwritev", stuck)
    with pytest.raises(OSError, match=rf"{PIXELS}\.npy.*rows 4\.\.6 .*wrote 5 of 54 bytes"):
        store.write_rows(PIXELS, slice(4, 7), vals[:3])

    def full(fd, bufs, offset):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "pwritev", full)
    with pytest.raises(OSError, match=rf"No space left on device.*{PIXELS}\.npy.*rows 1\.\.1 ") as err:
        store.write_rows(PIXELS, [1], vals[:1])
    assert err.value.errno == 28


def test_a_read_the_kernel_cuts_short_is_finished(tmp_path, monkeypatch):
    """Each span was one preadv, which Linux stops at 0x7ffff000 bytes: a span over 2 GiB was
    called cut short, telling the user to delete an intact store.  Only the end of the file is."""
    import os
    store, real = _rows_store(tmp_path), os.preadv
    want = np.random.default_rng(1).integers(0, 256, (11, 2, 3, 3), dtype=np.uint8)
    store.write_rows(PIXELS, slice(None), want)

    def short(fd, bufs, offset):   # at most 7 bytes a call
        return real(fd, [memoryview(bufs[0]).cast("B")[:7]], offset)
    monkeypatch.setattr(os, "preadv", short)
    for rows in (slice(None), np.array([9, 0, 0, 4, 10]), np.array([3, 4, 5, 7, 8]), slice(2, 2)):
        np.testing.assert_array_equal(store.read_rows(PIXELS, rows), want[rows])
    with open(store.root / f"{PIXELS}.npy", "r+b") as fh:   # cut short in row 5
        fh.truncate(128 + 5 * 18 + 4)
    with pytest.raises(ValueError, match=r"cut short: rows 4\.\.6 read 22 of 54 bytes"):
        store.read_rows(PIXELS, np.array([4, 5, 6]))


@pytest.mark.parametrize("raw", ["inf", "Infinity", "1e400", "1e300"])
def test_an_endless_pixel_cache_size_is_refused_naming_the_variable(monkeypatch, raw):
    """inf (and 1e400, read as inf; 1e300 GB is inf in bytes) passed the check and crashed
    int() with OverflowError, naming nothing."""
    monkeypatch.setenv("SPURFAST_PIXEL_CACHE_GB", raw)
    with pytest.raises(ValueError, match=rf"SPURFAST_PIXEL_CACHE_GB must be a finite number of gigabytes, got '{raw}'"):
        max_bytes()
    monkeypatch.setenv("SPURFAST_PIXEL_CACHE_GB", "1e9")   # large but finite: a limit in bytes
    assert max_bytes() == 10 ** 9 * (1 << 30)


@pytest.mark.parametrize("kept_by", [0, 1])
def test_shards_of_which_one_kept_no_pixels_merge(folder, tmp_path, monkeypatch, kept_by):
    # ranks run with another SPURFAST_PIXEL_CACHE_GB (another node's environment): the merge read
    # every shard's pixel column when shard 0 had one and called the other shard damaged
    from spurfast.store_shards import merge_shards

    for rank in (0, 1):
        monkeypatch.setenv("SPURFAST_PIXEL_CACHE_GB", "4" if rank == kept_by else "0")
        _embed(folder, tmp_path / "s", "torch", shard_id=rank, num_shards=2)
    merged = merge_shards(tmp_path / "s", 2, progress=False)
    whole = _embed(folder, tmp_path / "whole", "torch")[1]
    assert merged.complete and not usable(merged)   # its rows of the other shard are not there: unread
    for k in ("mu", "pred"):
        np.testing.assert_array_equal(np.asarray(merged[k]), np.asarray(whole[k]))


# ---- mutation-testing gaps (spurfast/store.py) ----

def test_a_negative_row_is_refused_not_written_over_the_npy_header(tmp_path):
    # pwrite at offset + row * -1 lands in the .npy header (18-byte rows, 128-byte header):
    # numpy would count -1 from the end; the store refuses it, as a row past the end
    store = _rows_store(tmp_path)
    before = (store.root / f"{PIXELS}.npy").read_bytes()
    with pytest.raises(IndexError, match="row -1 is outside"):
        store.write_rows(PIXELS, np.array([-1]), np.full((1, 2, 3, 3), 7, np.uint8))
    with pytest.raises(IndexError, match="row -1 is outside"):
        store.read_rows(PIXELS, np.array([3, -1]))
    assert (store.root / f"{PIXELS}.npy").read_bytes() == before
    assert np.load(store.root / f"{PIXELS}.npy").shape == (11, 2, 3, 3)


def test_a_pixel_column_in_fortran_order_is_refused(tmp_path):
    # read with pread as C-order rows, a Fortran-order file (not spurfast's) gave scrambled pixels
    store = _rows_store(tmp_path)
    np.save(store.root / f"{PIXELS}.npy", np.asfortranarray(np.arange(11 * 18, dtype=np.uint8).reshape(11, 2, 3, 3)))
    with pytest.raises(ValueError, match="Fortran order"):
        EmbeddingStore(store.root).read_rows(PIXELS, slice(None))


def test_a_resume_keeps_the_mixed_record_of_the_rows_before_it(folder, tmp_path):
    # the rows so far were converted two ways (a resume on another device): the record must stay
    # "mixed" whatever the resumed batches give, else the column is read with one conversion
    from spurfast.store import MANIFEST
    _, part = _embed(folder, tmp_path / "s", "torch", stop_after=1)
    assert part.done == 5 and part.manifest[MODE_KEY] == "div255"
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(dict(manifest, **{MODE_KEY: MIXED})))
    _, resumed = _embed(folder, tmp_path / "s", "torch")
    assert resumed.complete and resumed.manifest[MODE_KEY] == MIXED and not usable(resumed)


def test_a_batch_either_conversion_gives_back_keeps_the_passs_mode(folder, tmp_path, monkeypatch):
    # DALI's rows are x * (1/255) ("mul_inv255"); a last batch of black and white frames converts
    # alike either way (EITHER): the pass's record stays mul_inv255, not EITHER (read back as /255)
    import spurfast.embed as embed_module
    from spurfast.pixel_cache import EITHER
    real, calls = embed_module.batch_pixels, []

    def pixels(images, mode=None):
        rows, _ = real(images, mode)
        calls.append(mode)
        return rows, "mul_inv255" if len(calls) == 1 else EITHER

    monkeypatch.setattr(embed_module, "batch_pixels", pixels)
    _, store = _embed(folder, tmp_path / "s", "torch")
    assert len(calls) == 4 and store.manifest[MODE_KEY] == "mul_inv255"


def test_whether_pixels_are_kept_is_the_whole_pools_decision_on_every_rank(folder, tmp_path, monkeypatch):
    # a shard store decided by its own size kept a pixel column that one process would not, and
    # the merged main store took the shards' columns: a column of the whole pool, past the limit
    pool = ImageFolderSource(folder, size=SIZE)
    monkeypatch.setenv("SPURFAST_PIXEL_CACHE_GB", str(10 * 3 * SIZE * SIZE / 2 ** 30))   # one shard's pixels
    assert len(pool) == 19 and keeps_pixels(pool, 10) and not keeps_pixels(pool, len(pool))
    for r, rows in ((0, 10), (1, 9)):
        _, shard = _embed(folder, tmp_path / "s", "torch", shard_id=r, num_shards=2)
        assert shard.n == rows and PIXELS not in shard.manifest["columns"]


def test_a_wide_column_takes_a_row_mask_as_numpy_does_and_refuses_fractional_rows(tmp_path):
    """A mask was cast to rows 0 and 1 (read [0, 1, 0, 1] for rows 1 and 3) and 2.7 read row 2,
    where the small columns follow numpy's indexing."""
    store = _rows_store(tmp_path)
    vals = np.arange(11 * 18, dtype=np.uint8).reshape(11, 2, 3, 3)
    store.write_rows(PIXELS, slice(None), vals)
    mask = np.zeros(11, bool)
    mask[[1, 3]] = True
    np.testing.assert_array_equal(store.read_rows(PIXELS, mask), vals[[1, 3]])
    assert store.read_rows("mu", mask).shape == (2, 4)
    store.write_rows(PIXELS, mask, np.zeros((2, 2, 3, 3), np.uint8))
    assert not store.read_rows(PIXELS, [1, 3]).any() and store.read_rows(PIXELS, [0, 2]).any()
    with pytest.raises(IndexError, match="row mask of shape \\(4,\\)"):
        store.read_rows(PIXELS, mask[:4])
    with pytest.raises(IndexError, match="must be integers or a mask, got float64"):
        store.read_rows(PIXELS, np.array([2.7]))
    assert store.read_rows(PIXELS, []).shape == (0, 2, 3, 3)


def test_reading_a_column_the_store_never_kept_says_so(tmp_path):
    """A store without pixel rows was called "damaged or cut short; remove it", which would throw
    away a good store."""
    store = EmbeddingStore.create(tmp_path / "s", 3, {"mu": ((3, 2), "float32")}, {})
    with pytest.raises(KeyError, match="has no column 'pixels'.*'mu'"):
        store.read_rows(PIXELS, [0])
    with pytest.raises(KeyError, match="has no column 'pixels'"):
        store.write_rows(PIXELS, [0], np.zeros((1, 2, 3, 3), np.uint8))


def test_store_loader_reads_are_the_pools_but_for_their_pixels(folder, monkeypatch):
    """A folder pool read through the store's loader: that loader, on the run's device, gives
    the pixels; labels, item by item too, and the record of unreadable files stay the pool's."""
    from spurfast import backends
    from spurfast.data import loader_torch

    pool = ImageFolderSource(folder, size=SIZE)
    resolve = backends.resolve   # as if DALI were the loader here (it may not be installed)
    monkeypatch.setattr(backends, "resolve", lambda op, backend=None, device=None:
                        ("dali", None) if backend == "dali" else resolve(op, backend, device))
    reads = read_as_stored(pool, "dali", "cpu")
    assert isinstance(reads, StoreLoaderReads) and reads.device == "cpu" and reads.loader_backend == "dali"
    seen = []
    real = loader_torch.iter_batches

    def iter_batches(source, batch_size, *, indices, backend, device):
        seen.append((backend, device))
        return real(source, batch_size, indices=indices, backend="torch")

    monkeypatch.setattr(loader_torch, "iter_batches", iter_batches)
    x, label = reads[10]
    assert seen == [("dali", "cpu")] and label == pool.labels()[10] == 1
    assert torch.equal(x, pool.get_batch([10])[0][0])
    broken = [str(p) for p in pool.paths].index(str(folder / BROKEN))
    reads.get_batch([broken])
    assert reads.bad_files is pool.bad_files and broken in pool.bad_files


def test_only_a_folder_pool_is_read_from_the_stores_pixel_rows(folder, tmp_path):
    from spurfast.data import ArraySource

    pool, store = _embed(folder, tmp_path / "s", "torch")
    assert usable(store)
    arrays = ArraySource(pool.get_batch(np.arange(len(pool)))[0], pool.labels())   # no files: read as given
    assert read_as_stored(arrays, "torch", "cpu", store=store) is arrays
