import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from spurfast.data import ArraySource, ConcatSource, SubsetSource, iter_batches, load_digits, load_fashion_mnist
from spurfast.data.builtin import find_fashion_mnist, read_idx


def _write_idx(path, arr, gz=False):
    header = b"\x00\x00\x08" + bytes([arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    # closed here: an unclosed GzipFile left a 0-byte file on Python 3.12 (the GPU machine's), whose
    # GzipFile buffers writes
    with (gzip.open if gz else open)(path, "wb") as fh:
        fh.write(data)


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_from_idx_dir(tmp_path, gz):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labs = np.arange(7, dtype=np.uint8)
    ext = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{ext}", imgs, gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{ext}", labs, gz)
    src = load_fashion_mnist("train", root=tmp_path)
    assert len(src) == 7 and src.image_shape == (1, 28, 28)
    x, y = src[3]
    assert y == 3 and torch.allclose(x[0], torch.as_tensor(imgs[3]) / 255.0)
    assert find_fashion_mnist(tmp_path) == tmp_path


def test_fashion_mnist_torchvision_root_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.array([1, 2], np.uint8))
    assert len(load_fashion_mnist("test", root=tmp_path)) == 2


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    bad = tmp_path / "x"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        read_idx(bad)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val", root=tmp_path)


def test_debian_fashion_mnist_if_installed():
    if find_fashion_mnist() is None:
        pytest.skip("dataset-fashion-mnist not installed")
    src = load_fashion_mnist("test")
    assert len(src) == 10000 and src.class_names[0] == "T-shirt/top"


def test_digits_resized():
    d = load_digits(28)
    assert len(d) == 1797 and d.image_shape == (1, 28, 28)
    assert float(d.images.max()) <= 1.0 and set(np.unique(d.labels())) == set(range(10))


def test_array_source_and_batches():
    x = np.random.default_rng(0).integers(0, 256, (10, 3, 8, 8), dtype=np.uint8)
    src = ArraySource(x, labels=np.arange(10) % 3, ids=[f"im{i}" for i in range(10)])
    assert src.item_id(4) == "im4" and src[4][1] == 1
    seen = []
    for b in iter_batches(src, batch_size=4, start=2):
        seen += b.indices.tolist()
        assert torch.allclose(b.images, torch.as_tensor(x[b.indices.numpy()]).float() / 255)
        assert b.ok.all()
    assert seen == list(range(2, 10))
    sub = SubsetSource(src, [9, 1])
    assert sub.item_id(0) == "im9" and sub.labels().tolist() == [0, 1]
    cat = ConcatSource([src, sub])
    assert len(cat) == 12 and cat.item_id(11) == "im1"
    im, lb = cat.get_batch([0, 10, 11])
    assert lb.tolist() == [0, 0, 1] and torch.equal(im[1], src[9][0])


def test_array_source_bad_input():
    with pytest.raises(ValueError, match="3 labels for 2 images"):
        ArraySource(np.zeros((2, 4, 4), np.uint8), labels=[0, 1, 2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ArraySource(np.full((2, 4, 4), 3.0))
    with pytest.raises(ValueError, match="NaN"):
        ArraySource(np.full((2, 4, 4), np.nan))
    with pytest.raises(ValueError, match="shape"):
        ArraySource(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="different image shapes"):
        ConcatSource([ArraySource(np.zeros((1, 4, 4))), ArraySource(np.zeros((1, 5, 5)))])


def test_iter_batches_yields_raw_uint8_from_folders_on_request(tmp_path):
    from PIL import Image

    from spurfast.data.folder import ImageFolderSource

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    src = ImageFolderSource(tmp_path, size=16)
    f = torch.cat([b.images for b in iter_batches(src, batch_size=4, backend="torch")])
    u = torch.cat([b.images for b in iter_batches(src, batch_size=4, backend="torch", dtype=torch.uint8)])
    assert f.dtype == torch.float32 and u.dtype == torch.uint8 and u.shape == f.shape == (6, 3, 16, 16)
    assert torch.equal(u.float().div(255), f)
    arr = ArraySource(torch.rand(5, 1, 8, 8), np.zeros(5, dtype=np.int64))   # in memory: its own floats
    assert next(iter(iter_batches(arr, batch_size=5, dtype=torch.uint8))).images.dtype == torch.float32


def test_array_source_errors_name_the_source_and_the_layout():
    hwc = r"mypool: images have shape \(2, 28, 28, 1\).*\(N,H,W,C\).*expected \(N,C,H,W\)"
    with pytest.raises(ValueError, match=hwc):
        ArraySource(np.zeros((2, 28, 28, 1), np.uint8), name="mypool")
    with pytest.raises(ValueError, match=r"\(N,H,W,C\)"):
        ArraySource(np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=r"mypool: float images must lie in \[0, 1\]"):
        ArraySource(np.full((2, 4, 4), 3.0), name="mypool")
    assert ArraySource(np.zeros((2, 3, 16, 16), np.uint8)).image_shape == (3, 16, 16)  # CHW stays accepted


def test_folder_pool_identity_ignores_path_spelling_and_location(tmp_path, monkeypatch):
    """The run id and the store fingerprint hash item ids: a pool given as a relative or an
    absolute path, or mounted elsewhere (another node), must be the same pool."""
    import shutil

    from PIL import Image

    from spurfast.data.folder import ImageFolderSource
    from spurfast.data.sources import content_digest
    from spurfast.identity import fingerprint

    rng = np.random.default_rng(0)
    root = tmp_path / "a" / "pool"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    shutil.copytree(root, tmp_path / "b" / "pool")
    monkeypatch.chdir(tmp_path / "a")
    (tmp_path / "link").symlink_to(root)
    spellings = [ImageFolderSource("pool", size=8), ImageFolderSource(root, size=8),
                 ImageFolderSource(f"{tmp_path}/a/../a/pool/", size=8), ImageFolderSource(tmp_path / "b" / "pool", size=8),
                 ImageFolderSource(tmp_path / "link", size=8)]
    assert [s.item_id(4) for s in spellings] == ["pool/dog/1.png"] * len(spellings)
    monkeypatch.chdir(root)      # "." names the folder too
    here = ImageFolderSource(".", size=8)
    assert here.item_id(4) == "pool/dog/1.png"
    assert (fingerprint(here), content_digest(here)) == (fingerprint(spellings[1]), content_digest(spellings[1]))
    monkeypatch.chdir(tmp_path / "a")
    assert len({fingerprint(s) for s in spellings}) == 1
    assert len({content_digest(s) for s in spellings}) == 1
    (tmp_path / "b" / "pool" / "dog" / "1.png").write_bytes((root / "cat" / "0.png").read_bytes())
    assert content_digest(ImageFolderSource(tmp_path / "b" / "pool", size=8)) != content_digest(spellings[0])


def test_class_names_keep_the_classifiers_labels_when_a_class_folder_is_missing(tmp_path):
    from PIL import Image

    from spurfast.data.folder import ImageFolderSource

    for c in ("0", "1", "2", "4"):        # no class 3, as in a pool of unrelated images
        (tmp_path / c).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / c / "a.png")
    assert ImageFolderSource(tmp_path, size=8).labels().tolist() == [0, 1, 2, 3]   # sorted folder order
    names = [str(i) for i in range(6)]
    src = ImageFolderSource(tmp_path, size=8, class_names=names)
    assert src.labels().tolist() == [0, 1, 2, 4] and src.class_names == names
    with pytest.raises(ValueError, match=r"class folders \['4'\].*not among the 4 class names"):
        ImageFolderSource(tmp_path, size=8, class_names=["0", "1", "2", "3"])


def test_array_source_rejects_channels_last_rgba():
    # (N,H,W,4) read as CHW would be 8 channels of 8x4 images, and a classifier trains on it
    with pytest.raises(ValueError, match=r"mypool: images have shape \(2, 8, 8, 4\).*\(N,H,W,C\)"):
        ArraySource(np.zeros((2, 8, 8, 4), np.uint8), name="mypool")
    assert ArraySource(np.zeros((2, 4, 8, 8), np.uint8)).image_shape == (4, 8, 8)  # CHW RGBA stays accepted
    # grey + alpha (np.asarray of PIL "LA" images) was taken as 28 channels of 28 x 2 images
    with pytest.raises(ValueError, match=r"mypool: images have shape \(10, 28, 28, 2\).*\(N,H,W,C\)"):
        ArraySource(np.zeros((10, 28, 28, 2), np.uint8), name="mypool")


def test_array_source_labels_must_be_whole_numbers():
    x = np.zeros((3, 4, 4), np.uint8)
    with pytest.raises(ValueError, match=r"mypool: labels must be integers, got dtype float64 \(e\.g\. 1\.95\)"):
        ArraySource(x, labels=[1.0, 1.95, 2.0], name="mypool")
    with pytest.raises(ValueError, match=r"mypool: labels must be integers.*nan"):
        ArraySource(x, labels=[0.0, np.nan, 1.0], name="mypool")
    with pytest.raises(ValueError, match=r"mypool: labels must be integers, got dtype <U3 \(e\.g\. 'cat'\)"):
        ArraySource(x, labels=["cat", "dog", "cow"], name="mypool")
    assert ArraySource(x, labels=np.array([2.0, 0.0, -1.0], np.float32)).labels().tolist() == [2, 0, -1]
    assert ArraySource(x, labels=np.array([1, 0, 1], np.uint8)).labels().tolist() == [1, 0, 1]


def test_array_source_rejects_unusable_dtypes_and_empty_images():
    for bad, dtype in ((np.full((2, 4, 4), "a"), "<U1"), (np.full((2, 4, 4), 0.5 + 0j), "complex128"),
                       (np.empty((2, 4, 4), dtype=object), "object"),
                       (torch.full((2, 4, 4), 0.5 + 0j), "torch.complex64")):
        with pytest.raises(ValueError, match=rf"mypool: images have dtype {dtype}; expected uint8 \(0\.\.255\) or fl"):
            ArraySource(bad, name="mypool")
    with pytest.raises(ValueError, match=r"mypool: uint16 images must lie in \[0, 1\]; got range \[1000, 1000\]"):
        ArraySource(np.full((2, 4, 4), 1000, np.uint16), name="mypool")
    with pytest.raises(ValueError, match=r"mypool: images have shape \(2, 1, 0, 8\); .*height and width must be >= 1"):
        ArraySource(np.zeros((2, 1, 0, 8), np.uint8), name="mypool")
    assert len(ArraySource(np.zeros((0, 1, 8, 8), np.uint8))) == 0  # no images is fine; empty images are not
    assert ArraySource(np.ones((2, 1, 4, 4), np.int64)).images.max() == 1.0   # integers within [0, 1] still work


def test_read_idx_names_truncated_and_corrupt_files(tmp_path):
    (tmp_path / "short.idx").write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(ValueError, match=r"short\.idx: not a complete IDX file \(6 bytes"):
        read_idx(tmp_path / "short.idx")
    gz = gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + bytes(5))
    (tmp_path / "trunc.idx.gz").write_bytes(gz[:-6])
    with pytest.raises(ValueError, match=r"trunc\.idx\.gz: not a complete gzipped IDX file \(EOFError"):
        read_idx(tmp_path / "trunc.idx.gz")
    (tmp_path / "plain.idx.gz").write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + bytes(5))
    with pytest.raises(ValueError, match=r"plain\.idx\.gz: not a complete gzipped IDX file \(BadGzipFile"):
        read_idx(tmp_path / "plain.idx.gz")


def test_array_source_takes_flipped_views_and_tensors_that_require_grad():
    x = np.random.default_rng(0).integers(0, 256, (3, 3, 6, 8), dtype=np.uint8)
    bgr = x[:, ::-1]   # BGR -> RGB as a view: negative strides, which torch.from_numpy refuses
    np.testing.assert_array_equal(ArraySource(bgr).images.numpy(), x[:, ::-1] / np.float32(255))
    assert float(ArraySource(x[..., ::-1]).images[0, 0, 0, 0]) == float(x[0, 0, 0, -1] / np.float32(255))
    t = torch.rand(2, 1, 4, 4, requires_grad=True)
    src = ArraySource(t)
    assert torch.equal(src.images, t.detach()) and not src.images.requires_grad
    with pytest.raises(ValueError, match="NaN"):
        ArraySource(torch.full((2, 1, 4, 4), float("nan"), requires_grad=True))


def test_fashion_mnist_env_var_takes_a_torchvision_root(tmp_path, monkeypatch):
    """$SPURFAST_FASHION_MNIST is the default ``root``: the same layouts are found under it."""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.array([1, 2, 0], np.uint8))
    _write_idx(raw / "train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    monkeypatch.setenv("SPURFAST_FASHION_MNIST", str(tmp_path))
    # images without their labels: each file was looked up on its own, and the labels came from
    # Debian's package, silently paired with these images
    assert find_fashion_mnist() is None
    with pytest.raises(FileNotFoundError, match=r"train IDX files \(images and labels\) not found together in "
                                                rf"{tmp_path}, .*\$SPURFAST_FASHION_MNIST names that folder"):
        load_fashion_mnist("train")
    _write_idx(raw / "train-labels-idx1-ubyte", np.array([4, 5], np.uint8))
    assert find_fashion_mnist() == raw
    assert load_fashion_mnist("test").labels().tolist() == [1, 2, 0]
    assert load_fashion_mnist("train").labels().tolist() == [4, 5]
    # a mistyped folder fell back to Debian's copy without a word
    monkeypatch.setenv("SPURFAST_FASHION_MNIST", str(tmp_path / "no-such"))
    assert find_fashion_mnist() is None
    with pytest.raises(FileNotFoundError, match="no-such"):
        load_fashion_mnist("test")


def test_folder_batches_take_a_numpy_integer_batch_size(tmp_path):
    """run_discovery accepts a numpy integer batch size; the torch loader's DataLoader
    refused it ("batch_size should be a positive integer value, but got batch_size=4")."""
    from PIL import Image

    from spurfast.data.folder import ImageFolderSource

    for i in range(5):
        Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    src = ImageFolderSource(tmp_path, size=8)
    got = list(iter_batches(src, batch_size=np.int64(4), backend="torch", num_workers=np.int64(0)))
    assert [len(b.indices) for b in got] == [4, 1] and bool(torch.cat([b.ok for b in got]).all())


def test_class_folders_match_class_names_in_either_unicode_form(tmp_path):
    """A folder written on macOS spells "café" decomposed (NFD); a class-names file has it
    composed (NFC): they look the same, and the folder was refused as not among the names."""
    import unicodedata

    from PIL import Image

    from spurfast.data.folder import ImageFolderSource

    for name in (unicodedata.normalize("NFD", "café"), "tea"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name / "a.png")
    names = ["tea", "water", unicodedata.normalize("NFC", "café")]
    src = ImageFolderSource(tmp_path, size=8, class_names=names)
    assert src.labels().tolist() == [2, 0] and src.class_names == names
    # without class names each folder keeps its own label, even two spellings of one name
    (tmp_path / unicodedata.normalize("NFC", "café")).mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "café" / "b.png")
    assert sorted(ImageFolderSource(tmp_path, size=8).labels().tolist()) == [0, 1, 2]


def test_flat_folder_takes_class_names_for_the_predictions(tmp_path):
    """An unlabelled folder pool with --class-names: the names are the classifier's, and
    name its predicted classes in the report (as an unlabelled .npz takes them); the
    folder was refused ("class names were given, but ... has no class folders")."""
    from PIL import Image

    from spurfast.input_files import load_pool
    from spurfast.data.folder import ImageFolderSource

    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(pool / f"{i}.png")
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    src, _ = load_pool(pool, 8, 3, tmp_path / "names.txt")
    assert src.class_names == ["cat", "dog"] and src.labels().tolist() == [-1, -1, -1]
    assert ImageFolderSource(pool, size=8).class_names is None     # without names: none


def test_iter_batches_refuses_negative_start_and_indices_for_arrays():
    """A negative start or index counted from the end of an in-memory source: pool
    indices -2, -1 came out with the last images; a folder source refused them."""
    src = ArraySource(np.arange(5 * 4, dtype=np.uint8).reshape(5, 1, 2, 2), labels=[0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"start must be in \[0, 5\], got -2"):
        list(iter_batches(src, 4, start=-2))
    with pytest.raises(IndexError, match=r"indices must lie in \[0, 5\); got range \[-1, 1\]"):
        list(iter_batches(src, 4, indices=[-1, 1]))
    assert [b.indices.tolist() for b in iter_batches(src, 4, start=3)] == [[3, 4]]
    assert [b.labels.tolist() for b in iter_batches(src, 4, indices=[4, 0])] == [[4, 0]]


def test_array_source_takes_labels_held_as_python_objects():
    """Labels as Python objects (a pandas column) crashed the label check with
    AttributeError ('int' object has no attribute 'item')."""
    x = np.zeros((3, 4, 4), np.uint8)
    assert ArraySource(x, labels=np.array([1, 2, 0], dtype=object)).labels().tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match=r"mypool: labels must be integers, got dtype object \(e\.g\. 'cat'\)"):
        ArraySource(x, labels=np.array(["cat", "dog", "cow"], dtype=object), name="mypool")
    with pytest.raises(ValueError, match=r"mypool: labels must be integers, got dtype object \(e\.g\. nan\)"):
        ArraySource(x, labels=[1, None, 2], name="mypool")


def test_array_source_takes_big_endian_arrays():
    """Big-endian images (an .npz of FITS data) failed with torch's "byte order different
    from the native byte order", naming neither the source nor a fix."""
    big = np.full((2, 1, 4, 4), 0.25, ">f4")
    src = ArraySource(big, labels=np.array([0, 1], ">i8"))
    assert src.images.dtype == torch.float32 and float(src.images.max()) == 0.25 and src.labels().tolist() == [0, 1]
    assert float(ArraySource(np.full((2, 4, 4), 255, ">u2")[:, None] // 255).images.max()) == 1.0


def test_an_npz_whose_file_name_is_not_utf8(tmp_path):
    """`spurfast discover --pool` of an .npz named in Latin-1: its stem (the source's
    name) kept its surrogates and the pool's fingerprint crashed ("'utf-8' codec can't
    encode character '\\udcff' ... surrogates not allowed")."""
    import os

    from spurfast.input_files import load_pool
    from spurfast.data.sources import content_digest
    from spurfast.identity import fingerprint

    path = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"p\xff.npz"))
    np.savez(path, images=np.zeros((3, 1, 4, 4), np.uint8), labels=np.array([0, 1, 0]))
    src, _ = load_pool(path, 4, 1)
    assert len(fingerprint(src)) and len(content_digest(src))
    assert src.name == "p\\xff"


@pytest.mark.parametrize("backend", ["memory", "torch"])
def test_iter_batches_refuses_a_boolean_mask_and_fractional_indices(tmp_path, backend):
    """indices=mask (numpy's usual row selection) was cast to int64: rows 3 and 4 of a
    5-image pool came out as pool indices [0, 0, 0, 1, 1]; 2.7 was truncated to 2."""
    from PIL import Image

    from spurfast.data.folder import ImageFolderSource

    if backend == "memory":
        src = ArraySource(np.arange(5 * 4, dtype=np.uint8).reshape(5, 1, 2, 2), labels=[0, 1, 2, 3, 4])
    else:
        for i in range(5):
            Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        src = ImageFolderSource(tmp_path, size=2)
    mask = np.array([False, False, False, True, True])
    with pytest.raises(ValueError, match=r"indices must be integer pool indices, got dtype bool: a boolean mask, "
                                         r"pass np\.flatnonzero\(mask\)"):
        list(iter_batches(src, 4, indices=mask, backend="torch"))
    with pytest.raises(ValueError, match=r"indices must be integer pool indices, got dtype float64$"):
        list(iter_batches(src, 4, indices=[2.7, 3.0], backend="torch"))
    assert [b.indices.tolist() for b in iter_batches(src, 4, indices=np.flatnonzero(mask), backend="torch")] == [[3, 4]]
    assert [b.indices.tolist() for b in iter_batches(src, 4, indices=[3.0, 4.0], backend="torch")] == [[3, 4]]
    assert [b.indices.tolist() for b in iter_batches(src, 4, indices=[], backend="torch")] == []


def test_array_source_takes_integer_ids():
    """ids=np.arange(n) (dataset positions as ids) crashed the store fingerprint and the
    content digest of every run: "'numpy.int64' object has no attribute 'encode'"."""
    from spurfast.data.sources import content_digest
    from spurfast.identity import fingerprint

    x = np.zeros((3, 1, 4, 4), np.uint8)
    src = ArraySource(x, ids=np.array([10, 11, 12]))
    assert src.item_id(1) == "11" and len(fingerprint(src)) and len(content_digest(src))
    # string ids keep their identity
    assert fingerprint(ArraySource(x, ids=np.array(["10", "11", "12"]))) == fingerprint(src)


def test_concat_refuses_parts_whose_labels_mean_other_classes(tmp_path):
    """Labels are concatenated as they are: two folders labelled each in its own sorted
    order (the second lacks "cat") gave the second's "dog" images label 0, named "cat"."""
    from PIL import Image

    from spurfast.data.folder import ImageFolderSource

    for pool, classes in (("a", ("cat", "dog")), ("b", ("dog", "fish"))):
        for c in classes:
            (tmp_path / pool / c).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / pool / c / "x.png")
    a, b = ImageFolderSource(tmp_path / "a", size=8), ImageFolderSource(tmp_path / "b", size=8)
    with pytest.raises(ValueError, match=r"labels mean different classes: a names \['cat', 'dog'\], b \['dog', "
                                         r"'fish'\]; give every part the same class_names"):
        ConcatSource([a, b])
    names = ["cat", "dog", "fish"]
    both = ConcatSource([ImageFolderSource(tmp_path / "a", size=8, class_names=names),
                         ImageFolderSource(tmp_path / "b", size=8, class_names=names)])
    assert both.class_names == names and both.labels().tolist() == [0, 1, 1, 2]
    # unnamed parts take the named part's names, wherever it stands
    plain = ArraySource(np.zeros((1, 3, 8, 8), np.uint8), labels=[-1])
    assert ConcatSource([plain, a]).class_names == ["cat", "dog"]


def test_array_source_takes_long_double_images():
    """np.longdouble images (float128 on x86) failed in torch.from_numpy ("can't convert
    np.ndarray of type numpy.longdouble"), naming no source."""
    x = np.full((2, 1, 3, 3), 0.5, np.longdouble)
    assert float(ArraySource(x).images.max()) == 0.5
    with pytest.raises(ValueError, match=r"mypool: float images must lie in \[0, 1\]"):
        ArraySource(x * 4, name="mypool")


def test_subset_source_refuses_indices_that_name_no_item():
    """SubsetSource cast its indices as iter_batches once did: a boolean mask became items
    0 and 1 (duplicated), 2.7 became 2, and -1 the last image under the id "array:-1"."""
    src = ArraySource(np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1), labels=[0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="a boolean mask, pass np.flatnonzero"):
        SubsetSource(src, np.array([False, False, False, True, True]))
    with pytest.raises(ValueError, match="integer pool indices, got dtype float64"):
        SubsetSource(src, [2.7, 3.2])
    with pytest.raises(IndexError, match=r"SubsetSource indices into array must lie in \[0, 5\); got range \[-1, 2\]"):
        SubsetSource(src, [-1, 2])
    with pytest.raises(IndexError, match=r"got range \[7, 7\]"):
        SubsetSource(src, [7])
    assert SubsetSource(src, np.flatnonzero([0, 0, 0, 1, 1])).labels().tolist() == [3, 4]
    assert SubsetSource(src, [4.0, 1.0]).item_id(0) == "array:4" and len(SubsetSource(src, [])) == 0


def test_array_source_decodes_bytes_ids_and_class_names():
    """An .npz's S-dtype arrays hold bytes: str() wrote ids and class names as "b'img1.jpg'"
    into the store and the findings."""
    from spurfast.data.sources import content_digest

    s = ArraySource(np.zeros((2, 4, 4)), labels=[0, 1], ids=np.array([b"img1.jpg", b"caf\xc3\xa9.jpg"]),
                    class_names=np.array([b"cat", b"dog"]))
    assert [s.item_id(0), s.item_id(1)] == ["img1.jpg", "café.jpg"] and s.class_names == ["cat", "dog"]
    same = ArraySource(np.zeros((2, 4, 4)), labels=[0, 1], ids=["img1.jpg", "café.jpg"])
    assert content_digest(s) == content_digest(same)
    odd = ArraySource(np.zeros((1, 4, 4)), ids=[b"im\xff.jpg"])   # not UTF-8: escaped as folder ids are
    assert odd.item_id(0) == "im\\xff.jpg" and content_digest(odd)


def test_class_folders_match_utf8_class_names_under_a_non_utf8_locale(tmp_path):
    """Under a non-UTF-8 locale a folder "zéro" reads back as "z\\udcc3\\udca9ro" while the
    class-names file is read as UTF-8: the folder was refused as not among the names."""
    import subprocess
    import sys

    from PIL import Image

    for name in ("zéro", "un"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name / "a.png")
    code = ("import sys; from spurfast.data.folder import ImageFolderSource; "
            "print(ImageFolderSource(sys.argv[1], size=8, class_names=['un', 'deux', 'z\\u00e9ro']).labels().tolist())")
    env = {**__import__("os").environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                         errors="replace")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[0, 2]"


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_both_folder_loaders_refuse_a_repeated_index_and_name_it(tmp_path, backend):
    """The DALI loader refused indices=[2, 0, 2] naming no index; the torch loader decoded
    pool item 2 twice.  Both refuse now, naming the index and where it repeats."""
    from PIL import Image

    from spurfast import backends

    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    _, fn = backends.resolve("loader", backend)
    paths = []
    for i in range(3):
        Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    extra = {"device": "cpu"} if backend == "dali" else {}
    with pytest.raises(ValueError, match=r"must not repeat .*: pool index 2 is given 2 times \(at positions 0, 2\)"):
        list(fn(paths, size=2, indices=[2, 0, 2], num_threads=1, **extra))
    assert [b[0].tolist() for b in fn(paths, size=2, indices=[2, 0], num_threads=1, **extra)] == [[2, 0]]


def test_indices_out_of_range_are_named_as_given():
    """An index of inf, 1e30 or a uint64 2**63 was cast to int64 first and named as
    -9223372036854775808, a value nobody passed."""
    src = ArraySource(np.zeros((5, 1, 2, 2), np.uint8))
    for given, shown in (([np.inf], r"\[inf, inf\]"), ([1e30, 2.0], r"\[2\.0, 1e\+30\]"),
                         (np.array([2**63], np.uint64), r"\[9223372036854775808, 9223372036854775808\]")):
        with pytest.raises(IndexError, match=r"indices must lie in \[0, 5\); got range " + shown):
            list(iter_batches(src, 4, indices=given))
    with pytest.raises(IndexError, match=r"SubsetSource indices into array must lie in \[0, 5\); got range \[inf"):
        SubsetSource(src, [np.inf])


def test_labels_past_int64_are_refused_not_wrapped():
    """uint64 2**64-1 was cast to -1 (read as unlabelled) and a float 1e30 or a Python int
    2**70 to -2**63, silently; labels that fit still pass."""
    im = np.zeros((2, 1, 4, 4), np.uint8)
    for lab, shown in ((np.array([2**64 - 1, 0], np.uint64), "18446744073709551615"), ([1e30, 0], r"1e\+30"),
                       ([2**70, 0], str(2**70)), ([float(2**63), 0], r"9\.223372036854776e\+18")):
        with pytest.raises(ValueError, match=rf"mypool: labels must fit in int64, got range \[0(\.0)?, {shown}\]"):
            ArraySource(im, lab, name="mypool")
    assert ArraySource(im, np.array([5, 0], np.uint64)).labels().tolist() == [5, 0]
    assert ArraySource(im, [2**63 - 1, 0]).labels().tolist() == [2**63 - 1, 0]
    assert ArraySource(im, np.array([np.int64(3), 2], dtype=object)).labels().tolist() == [3, 2]


def test_the_sampled_digest_reads_a_large_file_in_pieces(tmp_path):
    """A sampled file was read into memory whole (a 2 GB file, 2 GB); the digest stays
    the one of the whole file's bytes."""
    import hashlib
    import tracemalloc

    from spurfast.data.sources import sampled_digest

    class Files:   # a source read from files, as sampled_digest sees one
        name, image_shape = "big", (3, 8, 8)

        def __init__(self, paths):
            self.paths = paths

        def __len__(self):
            return len(self.paths)

        def item_id(self, i):
            return f"big:{i}"

    data = np.random.default_rng(0).bytes(48 << 20)
    (tmp_path / "a.png").write_bytes(data)
    src = Files([str(tmp_path / "a.png")])
    tracemalloc.start()
    try:
        got = sampled_digest(src)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    h = hashlib.sha256(f"big:1:{(3, 8, 8)}".encode())
    h.update(b"big:0")
    h.update(data)
    assert got == h.hexdigest()[:16]


def test_folder_pool_identity_does_not_depend_on_a_numpy_image_size(tmp_path):
    """A numpy integer size (accepted by the loaders) put "np.int64(8)" into the image
    shape the digests hash: the same pool got another run id and store fingerprint."""
    from PIL import Image

    from spurfast.data.folder import ImageFolderSource
    from spurfast.data.sources import content_digest, sampled_digest
    from spurfast.identity import fingerprint

    for i in range(3):
        Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    plain = ImageFolderSource(tmp_path, size=8, channels=3)
    for size, channels in ((np.int64(8), 3), (8, np.int32(3))):
        other = ImageFolderSource(tmp_path, size=size, channels=channels)
        assert other.image_shape == (3, 8, 8) and all(type(x) is int for x in other.image_shape)
        assert (sampled_digest(other), content_digest(other), fingerprint(other)) == \
            (sampled_digest(plain), content_digest(plain), fingerprint(plain))


def test_images_just_past_one_are_named_with_the_value_that_is_past_it():
    """A float32 image of max 1.0000001 (denormalised, say) was refused as "must lie in [0, 1];
    got range [0.5, 1]": the value that broke the range was rounded back into it."""
    a = np.full((2, 1, 4, 4), 0.5, np.float32)
    a[0, 0, 0, 0] = np.nextafter(np.float32(1), np.float32(2))
    with pytest.raises(ValueError, match=r"mypool: float images must lie in \[0, 1\]; got range \[0\.5, 1\.00000012\]"):
        ArraySource(a, name="mypool")
    a[0, 0, 0, 0], a[1, 0, 0, 0] = 0.5, -1e-9
    with pytest.raises(ValueError, match=r"got range \[-9\.99999972e-10, 0\.5\]"):
        ArraySource(a, name="mypool")


@pytest.mark.parametrize("backend", ["memory", "torch", "dali"])
def test_a_fractional_batch_size_is_refused_by_name(tmp_path, backend):
    """batch_size 2.5: the torch folder loader cut it to batches of 2 without a word; the DALI
    loader and in-memory sources failed with "'float' object cannot be interpreted as an
    integer", naming nothing."""
    from PIL import Image

    from spurfast.data import loader_dali, loader_torch
    from spurfast.data.folder import ImageFolderSource

    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="nvidia.dali is not importable")
    if backend == "memory":
        src = ArraySource(np.zeros((5, 1, 2, 2), np.uint8))
    else:
        for i in range(5):
            Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        src = ImageFolderSource(tmp_path, size=2)
    with pytest.raises(TypeError, match=r"batch_size must be an integer >= 1, got 2\.5"):
        list(iter_batches(src, 2.5, backend=backend if backend != "memory" else None))
    # True passed as a batch size of 1 (bool is an integer), where embed_pool refused it
    with pytest.raises(TypeError, match=r"batch_size must be an integer >= 1, got True"):
        list(iter_batches(src, True, backend=backend if backend != "memory" else None))
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0"):
        list(iter_batches(src, 0, backend=backend if backend != "memory" else None))
    if backend != "memory":
        mod = loader_torch if backend == "torch" else loader_dali
        with pytest.raises(TypeError, match=r"batch_size must be an integer >= 1, got 2\.0"):
            list(mod.iter_folder_batches(src.paths, size=2, batch_size=2.0))
    assert [len(b.indices) for b in iter_batches(src, np.int64(2), backend=backend if backend != "memory" else None)] \
        == [2, 2, 1]
    # num_workers too: 2.5 failed the folder loaders naming nothing (DataLoader's TypeError, DALI's pybind one)
    with pytest.raises(TypeError, match=r"num_workers must be an integer, got 2\.5"):
        list(iter_batches(src, 2, num_workers=2.5, backend=backend if backend != "memory" else None))


class _OwnSource:
    """A source of one's own (duck-typed as the README invites) whose get_batch is ``f`` of
    an ArraySource's."""

    def __new__(cls, f):
        from spurfast.data.sources import ImageSource
        base = ArraySource(torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0)), np.arange(10) % 2)

        class Own(ImageSource):
            image_shape, name = (1, 8, 8), "own"

            def __len__(self):
                return 10

            def labels(self):
                return base.labels()

            def get_batch(self, idx):
                return f(*base.get_batch(idx))
        return Own()


@pytest.mark.parametrize("f, want", [
    # normalised pixels and 0..255 floats ran a whole discovery to "0 findings" without a word
    (lambda x, y: ((x - 0.13) / 0.31, y), r"pixel values in \[-0\.\d+, 2\.\d+\]"),
    (lambda x, y: (x * 255, y), r"pixel values in \[\d\.\d+, 2\d\d\.\d+\]; expected floats in \[0, 1\]"),
    (lambda x, y: (x * float("nan"), y), r"pixel values in \[nan, nan\]"),
    (lambda x, y: ((x * 255).byte(), y), r"torch\.uint8 images; expected floats in \[0, 1\]"),
    (lambda x, y: (x[:-1], y), r"images of shape \(3, 1, 8, 8\), expected \(4, 1, 8, 8\)"),   # a bare IndexError
    (lambda x, y: (x, y[:-1]), r"labels of shape \(3,\) and dtype torch\.int64; expected 4 integer labels"),
    (lambda x, y: (x, y.float()), r"labels of shape \(4,\) and dtype torch\.float32"),
    (lambda x, y: (x, y > 0), r"labels of shape \(4,\) and dtype torch\.bool"),
])
def test_a_sources_own_get_batch_is_checked_where_the_pass_reads_it(f, want):
    with pytest.raises(ValueError, match=f"^source own: get_batch of images 0\\.\\.3 returned {want}"):
        list(iter_batches(_OwnSource(f), 4))


def test_a_sources_own_get_batch_of_numpy_arrays_and_lists_is_taken():
    # numpy images and list labels failed deep in the pass (AttributeError 'detach', 'numpy')
    got = list(iter_batches(_OwnSource(lambda x, y: (x.numpy(), y.tolist())), 4))
    assert [tuple(b.images.shape) for b in got] == [(4, 1, 8, 8), (4, 1, 8, 8), (2, 1, 8, 8)]
    assert all(b.labels.dtype == torch.int64 for b in got)
    got = list(iter_batches(_OwnSource(lambda x, y: (x, y.int())), 4))   # int32 labels: int64, as every source's
    assert all(b.labels.dtype == torch.int64 for b in got)


def test_spurfasts_sources_check_the_indices_they_are_given():
    # ArraySource read 1.5 as image 1 and -1 as the last; SubsetSource of an array and a bare
    # source given to ConcatSource failed with AttributeErrors; ConcatSource[-1] named index -11
    a = ArraySource(torch.rand(5, 1, 4, 4), np.arange(5), name="a")
    with pytest.raises(ValueError, match="indices into a must be integer pool indices, got dtype float64"):
        a.get_batch([1.5])
    with pytest.raises(IndexError, match=r"indices into a must lie in \[0, 5\); got range \[-1, -1\]"):
        a.get_batch([-1])
    with pytest.raises(TypeError, match="SubsetSource takes an ImageSource"):
        SubsetSource(np.zeros((3, 1, 4, 4)), [0])
    with pytest.raises(TypeError, match="ConcatSource takes a list of ImageSources"):
        ConcatSource(a)
    both = ConcatSource([a, a], name="both")
    with pytest.raises(IndexError, match=r"index into both must lie in \[0, 10\); got range \[-1, -1\]"):
        both[-1]
    with pytest.raises(IndexError, match=r"indices into both must lie in \[0, 10\)"):
        both.get_batch([10])
    with pytest.raises(IndexError, match=r"must lie in \[0, 2\); got range \[2, 2\]"):
        SubsetSource(a, [1, 2]).get_batch([2])
    assert torch.equal(both.get_batch(np.array([7, 1]))[0], a.images[[2, 1]])


def test_subsets_and_concatenations_read_from_threads_as_their_parts_do():
    import torch

    from spurfast.data.sources import ArraySource, ConcatSource, ImageSource, SubsetSource

    class Own(ArraySource):   # a source of one's own, not known to read safely from threads
        reads_in_threads = False
    a = ArraySource(torch.rand(4, 1, 5, 5), name="a")
    own = Own(torch.rand(3, 1, 5, 5), name="own")
    assert not ImageSource.reads_in_threads and a.reads_in_threads
    assert SubsetSource(a, [0, 2]).reads_in_threads and not SubsetSource(own, [1]).reads_in_threads
    assert ConcatSource([a, a]).reads_in_threads and not ConcatSource([a, own]).reads_in_threads


def test_a_folder_source_checks_the_indices_it_is_given(tmp_path):
    """ImageFolderSource read through the base class's int(): -1 gave the last image, 1.7 image 1
    and a boolean mask images 0 and 1, where every other source refuses them."""
    from PIL import Image

    from spurfast.data.folder import ImageFolderSource

    for i in range(5):
        Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    src = ImageFolderSource(tmp_path, size=2, channels=1)
    name = re.escape(src.name)
    with pytest.raises(IndexError, match=rf"indices into {name} must lie in \[0, 5\); got range \[-1, -1\]"):
        src.get_batch([-1])
    with pytest.raises(IndexError, match=r"must lie in \[0, 5\); got range \[0, 5\]"):
        src.get_batch(np.array([0, 5]))
    with pytest.raises(ValueError, match=rf"indices into {name} must be integer pool indices, got dtype float64$"):
        src.get_batch([1.7])
    with pytest.raises(ValueError, match="got dtype bool: a boolean mask, pass np.flatnonzero"):
        src.get_batch(np.array([False, True, False, False, True]))
    with pytest.raises(IndexError, match=rf"index into {name} must lie in \[0, 5\); got range \[-1, -1\]"):
        src[-1]
    with pytest.raises(ValueError, match="integer pool indices, got dtype float64"):
        src[1.7]
    # what ArraySource takes, it takes: lists, numpy and torch integers, whole floats, nothing
    want = torch.stack([src[i][0] for i in (3, 0, 3)])
    for idx in ([3, 0, 3], np.array([3, 0, 3], np.int32), torch.tensor([3, 0, 3]), [3.0, 0.0, 3.0]):
        images, labels = src.get_batch(idx)
        assert torch.equal(images, want) and labels.dtype == torch.int64 and labels.tolist() == [-1, -1, -1]
    assert torch.equal(src[np.int64(3)][0], want[0]) and torch.equal(src[torch.tensor(3)][0], want[0])
    images, labels = src.get_batch([])
    assert images.shape == (0, 1, 2, 2) and labels.shape == (0,) and labels.dtype == torch.int64
    assert torch.equal(src.get_batch(range(5))[0], torch.stack([src[i][0] for i in range(5)]))


def _grey_pngs(folder, n):
    """``n`` flat grey 8x8 PNGs in ``folder``, named in their sorted order (00.png, 01.png, ...)."""
    from PIL import Image

    for i in range(n):
        Image.fromarray(np.full((8, 8), 10 * i, np.uint8)).save(folder / f"{i:02d}.png")


def test_content_digest_sees_what_the_sampled_one_does_not(tmp_path):
    """The sampled digest reads 8 items; the content digest tells apart edits to the others:
    a file of another size or gone (not the same as emptied), an array's image, a part of a
    concatenation, a subset's base image or its choice of indices."""
    from PIL import Image

    from spurfast.data.folder import ImageFolderSource
    from spurfast.data.sources import content_digest, sampled_digest

    unsampled = 1   # of 20 items the 8 sampled are 0, 3, 5, 8, 11, 14, 16, 19
    _grey_pngs(tmp_path, 20)
    folder = ImageFolderSource(tmp_path, size=8)
    seen = {content_digest(folder)}
    first = sampled_digest(folder)
    target = Path(folder.paths[unsampled])
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), np.uint8)).save(target)   # another size
    seen.add(content_digest(folder))
    open(target, "wb").close()                    # emptied
    seen.add(content_digest(folder))
    target.unlink()                               # gone (its stat fails): not the emptied file's 0 bytes
    seen.add(content_digest(folder))
    assert len(seen) == 4 and sampled_digest(folder) == first

    rng = np.random.default_rng(0)
    x = rng.random((30, 1, 4, 4)).astype(np.float32)
    edited = x.copy()
    edited[unsampled] = 0.5

    def digests(images):
        a = ArraySource(images[:20])
        return (content_digest(a), content_digest(ConcatSource([ArraySource(x[20:]), a])),
                content_digest(SubsetSource(ArraySource(images), np.arange(20))))
    before, after = digests(x), digests(edited)
    assert all(b != a for b, a in zip(before, after)), (before, after)
    # the same base, the same sampled items, another unsampled index
    other = np.arange(20)
    other[unsampled] = 25
    base = ArraySource(np.concatenate([x[:25], x[1:2], x[26:]]))   # item 25 is item 1's image
    assert content_digest(SubsetSource(base, other)) != content_digest(SubsetSource(base, np.arange(20)))


def test_the_sampled_digest_holds_the_sampled_items(tmp_path):
    from spurfast.data.folder import ImageFolderSource
    from spurfast.data.sources import sampled_digest

    x = np.random.default_rng(0).random((5, 1, 4, 4)).astype(np.float32)
    edited = x.copy()
    edited[2] = 0.5
    assert sampled_digest(ArraySource(x)) != sampled_digest(ArraySource(edited))   # images held in memory
    _grey_pngs(tmp_path, 3)
    folder = ImageFolderSource(tmp_path, size=8)
    open(folder.paths[1], "wb").close()
    emptied = sampled_digest(folder)
    Path(folder.paths[1]).unlink()
    assert sampled_digest(folder) != emptied      # a file that cannot be opened is not an empty one


def test_array_source_checks_and_keeps_what_it_is_given():
    from spurfast.data.sources import ImageSource

    with pytest.raises(ValueError, match="arr: 2 ids for 3 images"):
        ArraySource(np.zeros((3, 4, 4), np.float32), ids=["a", "b"], name="arr")
    src = ArraySource(np.zeros((3, 4, 4), np.float32), labels=[0, 1, 2])
    src.labels()[0] = 7                           # the caller's copy
    assert src.labels().tolist() == [0, 1, 2]

    class One(ImageSource):                       # a source of one's own: the base get_batch
        image_shape = (2, 3, 5)

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return torch.zeros(self.image_shape), 0

    images, labels = One().get_batch([])
    assert images.shape == (0, 2, 3, 5) and labels.shape == (0,)


def test_iter_batches_gives_a_folder_loader_what_its_signature_takes(tmp_path, monkeypatch):
    """The run's device and worker count reach a loader that takes them (DALI's signature);
    what a loader without ``bad_files`` flags unreadable is recorded on the source."""
    from spurfast import backends
    from spurfast.data.folder import ImageFolderSource

    _grey_pngs(tmp_path, 3)
    pool = ImageFolderSource(tmp_path, size=8, channels=1)
    seen = {}

    def loader(paths, *, size, channels, batch_size, indices, num_threads, device="gpu"):
        seen.update(num_threads=num_threads, device=device)
        yield torch.as_tensor(indices), torch.zeros(len(indices), 1, 8, 8), torch.tensor([True, False, True])

    monkeypatch.setattr(backends, "resolve", lambda op, backend=None, device=None: ("fake", loader))
    batch, = iter_batches(pool, 4, num_workers=3, device="cpu")
    assert seen == {"num_threads": 3, "device": "cpu"} and batch.ok.tolist() == [True, False, True]
    assert pool.bad_files == {1: "could not be decoded"}
    list(iter_batches(pool, 4, num_workers=0))
    assert seen == {"num_threads": 1, "device": "gpu"}   # at least one thread; no device given, the loader's own


def test_the_torch_folder_loader_decodes_in_this_process_with_one_thread(tmp_path, monkeypatch):
    import os

    from spurfast.data import loader_torch

    _grey_pngs(tmp_path, 2)
    real, pids = loader_torch.checked_load_uint8, []

    def load(path, spec):
        pids.append(os.getpid())
        return real(path, spec)

    monkeypatch.setattr(loader_torch, "checked_load_uint8", load)
    paths = sorted(str(p) for p in tmp_path.iterdir())
    got = list(loader_torch.iter_folder_batches(paths, size=8, channels=1, num_threads=1))
    assert len(got) == 1 and pids == [os.getpid()] * 2


def test_folder_listing_and_selection_edges(tmp_path, caplog):
    """Upper-case extensions are images; a class folder's name matches its class however its
    accents are composed (macOS writes NFD), and a name given twice means its first place;
    more skipped files than the warning lists end in "..."; a selection may start at the end;
    a repeat is named by the first index that repeats, in the order given."""
    import logging

    from PIL import Image

    from spurfast.data.folder import ImageFolderSource, list_folder, refuse_repeats, select_indices

    for name in ("e\u0301t\u00e9", "b"):   # "été" with its first accent decomposed
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / name / "A.JPG")
    for i in range(7):
        (tmp_path / "b" / f"{i}.webp").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="spurfast.data"):
        paths, labels, names = list_folder(tmp_path, class_names=["b", "\u00e9t\u00e9", "b"])
    assert [p.rsplit("/", 2)[-2:] for p in paths] == [["b", "A.JPG"], ["e\u0301t\u00e9", "A.JPG"]]
    assert labels == [0, 1] and names == ["b", "\u00e9t\u00e9", "b"]
    assert "left out 7 image file(s)" in caplog.text and "4.webp, ..." in caplog.text
    pool = ImageFolderSource(tmp_path, size=4, channels=1)
    pool.labels()[0] = 5                          # the caller's copy
    assert pool.labels().tolist() == [0, 1]
    assert select_indices(5, start=5).tolist() == [] and select_indices(5, start=3).tolist() == [3, 4]
    with pytest.raises(ValueError, match="pool index 3 is given 2 times"):
        refuse_repeats(np.array([3, 1, 1, 3]))
