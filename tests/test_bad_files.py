"""Bad and unusual image files, for both folder loaders, and folder-layout errors.

Bad (must be flagged, zero image, listed with a reason; the run goes on): a truncated
JPEG, a zero-byte .jpg, a text file named .jpg, a truncated PNG.  Unusual but good (must
decode): grayscale JPEG, CMYK JPEG, PNG with alpha, a JPEG with trailing bytes after its
end marker.  The DALI recovery path (a file that gets past the pre-check) is tested by
switching the pre-check off, and the probe path by hiding the file name in DALI's error.
Corrupt files with valid magic and end markers (bad PNG chunk CRCs, random bytes between
JPEG markers) and images over PIL's pixel limit are caught by the shared PIL open+verify
pre-check, identically in both loaders.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spurfast.data import folder as folder_mod
from spurfast.data import loader_torch
from spurfast.data.folder import ImageFolderSource, list_folder
from spurfast.data.preprocess import PreprocessSpec, check_image_file, validate_image_file

try:
    import nvidia.dali  # noqa: F401
    from spurfast.data import loader_dali
    HAS_DALI = True
except Exception:  # pragma: no cover - depends on the install
    HAS_DALI = False

needs_dali = pytest.mark.skipif(not HAS_DALI, reason="nvidia.dali is not importable")
SIZE = 32


def _picture(seed, h=60, w=80):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 40 * (seed % 6))], -1)
    return np.clip(base + rng.integers(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


def _jpeg_bytes(arr, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    """(paths, bad names) in a flat folder; names sort in the order written here."""
    root = tmp_path_factory.mktemp("bad")
    good_jpeg = _jpeg_bytes(_picture(0))
    files = {}
    for k in range(6):
        files[f"a{k}_good.jpg"] = _jpeg_bytes(_picture(k + 1))
    files["b_truncated.jpg"] = good_jpeg[: len(good_jpeg) // 2]
    files["c_zero.jpg"] = b""
    files["d_text.jpg"] = b"this is not an image, just text with a .jpg name\n" * 3
    png = io.BytesIO()
    Image.fromarray(_picture(9)).save(png, format="PNG")
    files["e_truncated.png"] = png.getvalue()[: len(png.getvalue()) // 2]
    gray = io.BytesIO()
    Image.fromarray(_picture(10)[:, :, 0], mode="L").save(gray, format="JPEG", quality=90)
    files["f_gray.jpg"] = gray.getvalue()
    cmyk = io.BytesIO()
    Image.fromarray(_picture(11)).convert("CMYK").save(cmyk, format="JPEG", quality=90)
    files["g_cmyk.jpg"] = cmyk.getvalue()
    rgba = io.BytesIO()
    a = np.dstack([_picture(12), np.linspace(0, 255, 80, dtype=np.uint8)[None, :].repeat(60, 0)])
    Image.fromarray(a, mode="RGBA").save(rgba, format="PNG")
    files["h_alpha.png"] = rgba.getvalue()
    files["i_trailing.jpg"] = _jpeg_bytes(_picture(13)) + b"\0" * 3000  # junk after EOI: still valid
    for k in range(5):
        files[f"j{k}_good.png"] = png.getvalue() if k == 0 else _png_bytes(_picture(20 + k))
    for name, data in files.items():
        (root / name).write_bytes(data)
    paths, labels, classes = list_folder(root)
    assert [p.rsplit("/", 1)[1] for p in paths] == sorted(files)
    bad = {"b_truncated.jpg", "c_zero.jpg", "d_text.jpg", "e_truncated.png"}
    return paths, bad


def _png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _loaders():
    out = [pytest.param("torch", id="torch")]
    out.append(pytest.param("dali", id="dali", marks=needs_dali))
    return out


def _run(which, paths, **kw):
    mod = loader_torch if which == "torch" else loader_dali
    extra = {"device": "cpu"} if which == "dali" else {}
    kw.setdefault("num_threads", 2)
    bad = {}
    batches = list(mod.iter_folder_batches(paths, size=SIZE, batch_size=5,
                                           bad_files=bad, **extra, **kw))
    idx = torch.cat([b[0] for b in batches])
    images = torch.cat([b[1] for b in batches])
    ok = torch.cat([b[2] for b in batches])
    return idx, images, ok, bad


def _check_outcome(paths, expected_bad, idx, images, ok, bad):
    names = [p.rsplit("/", 1)[1] for p in paths]
    assert idx.tolist() == list(range(len(paths))), "every file, in pool order, exactly once"
    flagged = {names[i] for i in range(len(paths)) if not ok[i]}
    assert flagged == expected_bad
    assert {names[i] for i in bad} == expected_bad
    assert all(isinstance(r, str) and r for r in bad.values())
    for i in range(len(paths)):
        if ok[i]:
            assert float(images[i].max()) > 0.05, f"{names[i]} decoded to a (near) black image"
        else:
            assert float(images[i].abs().max()) == 0.0
    gray = images[names.index("f_gray.jpg")]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2]), "grayscale -> equal RGB channels"


@pytest.mark.parametrize("which", _loaders())
def test_bad_files_flagged_and_good_files_processed(bad_folder, which, capsys):
    paths, expected_bad = bad_folder
    idx, images, ok, bad = _run(which, paths)
    _check_outcome(paths, expected_bad, idx, images, ok, bad)
    print(f"[{which}] bad files: " + "; ".join(f"{paths[i].rsplit('/', 1)[1]}: {r}" for i, r in sorted(bad.items())))


@needs_dali
def test_dali_and_torch_agree_on_unusual_good_files(bad_folder):
    """CMYK, alpha, grey and trailing-bytes files: same pixels up to the parity bound."""
    paths, _ = bad_folder
    _, t_img, t_ok, _ = _run("torch", paths)
    _, d_img, d_ok, _ = _run("dali", paths)
    assert torch.equal(t_ok, d_ok)
    names = [p.rsplit("/", 1)[1] for p in paths]
    for name in ("f_gray.jpg", "g_cmyk.jpg", "h_alpha.png", "i_trailing.jpg"):
        i = names.index(name)
        err = (t_img[i] - d_img[i]).abs()
        print(f"{name}: max {float(err.max()):.4f} mean {float(err.mean()):.5f}")
        assert float(err.max()) <= 12 / 255 and float(err.mean()) <= 1 / 255, name


@needs_dali
def test_dali_recovers_when_bad_files_get_past_the_precheck(bad_folder, monkeypatch):
    """No pre-check: each bad file kills a pipeline; the loader must name it from DALI's
    error (or probe), rebuild, and still deliver every good file."""
    paths, expected_bad = bad_folder
    monkeypatch.setattr(loader_dali, "_precheck", lambda *a, **k: {})
    idx, images, ok, bad = _run("dali", paths, first_pipeline_batches=2)
    _check_outcome(paths, expected_bad, idx, images, ok, bad)
    _, ref, _, _ = _run("dali", paths)
    assert torch.equal(images, ref), "recovered run must give the same pixels as the pre-checked run"


@needs_dali
def test_dali_probe_finds_bad_files_without_names_in_the_error(bad_folder, monkeypatch):
    paths, expected_bad = bad_folder
    monkeypatch.setattr(loader_dali, "_precheck", lambda *a, **k: {})
    monkeypatch.setattr(loader_dali, "_named_in_error", lambda *a, **k: {})
    idx, images, ok, bad = _run("dali", paths)
    _check_outcome(paths, expected_bad, idx, images, ok, bad)


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_iter_batches_records_bad_files_on_the_source(bad_folder, backend):
    paths, expected_bad = bad_folder
    root = paths[0].rsplit("/", 1)[0]
    src = ImageFolderSource(root, size=SIZE)
    n = 0
    for b in loader_torch.iter_batches(src, batch_size=7, backend=backend):
        n += len(b.indices)
        assert b.labels.tolist() == [-1] * len(b.indices)
    assert n == len(paths)
    assert {paths[i].rsplit("/", 1)[1] for i in src.bad_files} == expected_bad
    assert all("could not be decoded" != r for r in src.bad_files.values()), "reasons are specific"


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_each_unreadable_file_is_named_once_a_run(bad_folder, backend, caplog):
    # the trial read (one image through the source) and the loader's pass each named the same
    # file, and a step that re-read it named it again
    paths, expected_bad = bad_folder
    src = ImageFolderSource(paths[0].rsplit("/", 1)[0], size=SIZE)
    first_bad = min(i for i, p in enumerate(paths) if p.rsplit("/", 1)[1] in expected_bad)
    with caplog.at_level("WARNING", logger="spurfast.data"):
        src.get_batch([first_bad])
        for _ in range(2):
            for _ in loader_torch.iter_batches(src, batch_size=7, backend=backend):
                pass
        src.get_batch([first_bad])
    named = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping unreadable image")]
    assert sorted(m.split(" (")[0].rsplit("/", 1)[1] for m in named) == sorted(expected_bad), named


def test_wrapped_folder_sources_pass_their_bad_files_on(bad_folder):
    from spurfast.data.sources import ArraySource, ConcatSource, SubsetSource

    paths, expected_bad = bad_folder
    root = paths[0].rsplit("/", 1)[0]
    names = [p.rsplit("/", 1)[1] for p in paths]
    front = ArraySource(torch.rand(3, 3, SIZE, SIZE), name="front")
    for src, offset in ((ConcatSource([front, ImageFolderSource(root, size=SIZE)]), 3),
                        (SubsetSource(ImageFolderSource(root, size=SIZE), np.arange(len(paths))[::-1]), None)):
        ok = torch.cat([b.ok for b in loader_torch.iter_batches(src, batch_size=4)])
        pos = {i: (offset + i if offset is not None else len(paths) - 1 - i) for i in range(len(paths))}
        flagged = {names[i] for i in range(len(paths)) if not ok[pos[i]]}
        assert flagged == expected_bad, type(src).__name__
        assert {names[i] for i in range(len(paths)) if pos[i] in src.bad_files} == expected_bad


def test_check_image_file_verdicts(bad_folder):
    paths, _ = bad_folder
    by = {p.rsplit("/", 1)[1]: p for p in paths}
    assert check_image_file(by["c_zero.jpg"])[0] == "bad"
    assert check_image_file(by["d_text.jpg"])[0] == "bad"
    assert check_image_file(by["b_truncated.jpg"])[0] == "suspect"
    assert check_image_file(by["e_truncated.png"])[0] == "suspect"
    assert check_image_file(by["i_trailing.jpg"])[0] == "suspect"
    assert check_image_file(by["a0_good.jpg"]) == ("ok", "JPEG")
    assert check_image_file(by["h_alpha.png"]) == ("ok", "PNG")
    verdict, reason = check_image_file(by["a0_good.jpg"] + ".missing")
    assert verdict == "bad" and "cannot read" in reason


def test_list_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        list_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        list_folder(tmp_path / "empty")
    f = tmp_path / "file.jpg"
    f.write_bytes(_jpeg_bytes(_picture(1)))
    with pytest.raises(NotADirectoryError, match="file.jpg"):
        list_folder(f)
    classes = tmp_path / "classes"
    (classes / "cat").mkdir(parents=True)
    (classes / "dog").mkdir()
    (classes / "cat" / "1.jpg").write_bytes(_jpeg_bytes(_picture(2)))
    (classes / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="dog.*holds no images"):
        list_folder(classes)
    (classes / "dog" / "2.png").write_bytes(_png_bytes(_picture(3)))
    paths, labels, names = list_folder(classes)
    assert names == ["cat", "dog"] and labels == [0, 1]


def test_select_indices_rejects_bad_arguments():
    with pytest.raises(ValueError, match="shard_id"):
        folder_mod.select_indices(10, shard_id=3, num_shards=3)
    with pytest.raises(ValueError, match="num_shards"):
        folder_mod.select_indices(10, num_shards=0)
    with pytest.raises(IndexError, match="indices"):
        folder_mod.select_indices(10, indices=[3, 10])
    with pytest.raises(ValueError, match="start"):
        folder_mod.select_indices(10, start=11)


def _png16(path, arr):
    Image.fromarray(arr).save(path)  # uint16 grey: PIL writes (and reopens) a 16-bit PNG, mode I;16
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I"), im.mode


def test_16bit_gray_png_is_scaled_not_clipped(tmp_path):
    """PIL's convert clips 16-bit grey to 255 (an all-white image); values become round(v / 257)."""
    from spurfast.data.preprocess import PreprocessSpec, load_image_uint8

    a = np.linspace(0, 65535, 24 * 24).reshape(24, 24).astype(np.uint16)
    _png16(tmp_path / "g16.png", a)
    want = torch.from_numpy(((a.astype(np.int64) + 128) // 257).astype(np.uint8))
    for ch in (1, 3):
        got = load_image_uint8(str(tmp_path / "g16.png"), PreprocessSpec(24, ch))  # same size: no resampling
        assert got.shape == (ch, 24, 24)
        for c in range(ch):
            assert torch.equal(got[c], want), f"channels={ch}: max error {int((got[c].int() - want.int()).abs().max())}"


@needs_dali
@pytest.mark.parametrize("channels", [1, 3])
def test_16bit_gray_png_matches_dali(tmp_path, channels):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 65536, (37, 53), dtype=np.uint16)
    _png16(tmp_path / "r16.png", a)
    paths = [str(tmp_path / "r16.png")]
    out = {}
    for which, mod in (("torch", loader_torch), ("dali", loader_dali)):
        extra = {"device": "cpu"} if which == "dali" else {}
        (_, im, ok), = mod.iter_folder_batches(paths, size=24, channels=channels, batch_size=1, num_threads=1,
                                               dtype=torch.uint8, **extra)
        assert ok.all()
        out[which] = im.int()
    diff = (out["torch"] - out["dali"]).abs()
    # the same bound as any 8-bit image (resampler border differences), not ~128 levels
    assert float(diff.float().mean()) < 1.0 and int(diff.max()) <= 12, (float(diff.float().mean()), int(diff.max()))


def test_symlinked_folders_are_followed_once_and_broken_links_reported(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "deep").mkdir(parents=True)
    for k in range(2):
        (elsewhere / f"e{k}.png").write_bytes(_png_bytes(_picture(30 + k, 20, 20)))
    (elsewhere / "deep" / "d.png").write_bytes(_png_bytes(_picture(40, 20, 20)))
    root = tmp_path / "pool"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "c.png").write_bytes(_png_bytes(_picture(1, 20, 20)))
    (root / "cat" / "linked").symlink_to(elsewhere)            # a symlinked subfolder: followed
    (root / "cat" / "loop").symlink_to(root / "cat")           # a cycle: visited once
    (root / "cat" / "missing.png").symlink_to(tmp_path / "gone.png")  # broken: reported, not dropped
    (root / "dog").symlink_to(elsewhere / "deep")              # a symlinked class folder
    (root / "cat" / "up").symlink_to(root)                     # back up to the root: not walked
    paths, labels, names = list_folder(root)
    rel = [str(Path(p).relative_to(root)) for p in paths]
    assert names == ["cat", "dog"]
    # another class folder's images (dog's d.png, reached through cat/linked/deep; or through
    # cat/up/dog) were listed again under cat's label
    assert rel == ["cat/c.png", "cat/linked/e0.png", "cat/linked/e1.png", "cat/missing.png", "dog/d.png"]
    assert labels == [0, 0, 0, 0, 1]
    flat = list_folder(root / "cat")[0]  # flat layout (images at the top): same walk, no class folders
    assert len(flat) == 5
    src = ImageFolderSource(root, size=16)
    x, _ = src.get_batch(range(len(src)))
    assert list(src.bad_files) == [rel.index("cat/missing.png")]
    assert "broken symbolic link" in src.bad_files[rel.index("cat/missing.png")]
    assert float(x[rel.index("cat/linked/e0.png")].max()) > 0.05


def test_a_link_to_a_subfolder_of_another_class_lists_its_images_once(tmp_path):
    """A link to another class folder was left out, but one to a folder inside it was
    followed: its images were in the pool twice, under both labels."""
    root = tmp_path / "pool"
    (root / "dog" / "puppies" / "small").mkdir(parents=True)
    (root / "cat").mkdir()
    for rel, k in (("cat/c.png", 1), ("dog/d.png", 2), ("dog/puppies/p.png", 3), ("dog/puppies/small/s.png", 4)):
        (root / rel).write_bytes(_png_bytes(_picture(k, 20, 20)))
    (root / "cat" / "puppies").symlink_to(root / "dog" / "puppies")
    (root / "cat" / "small").symlink_to(root / "dog" / "puppies" / "small")
    (root / "dog" / "own").symlink_to(root / "dog" / "puppies" / "small")   # its own class: once, as before
    paths, labels, _ = list_folder(root)
    rel = [str(Path(p).relative_to(root)) for p in paths]
    assert rel == ["cat/c.png", "dog/d.png", "dog/own/s.png", "dog/puppies/p.png"] and labels == [0, 1, 1, 1], rel


def test_a_class_folder_linked_to_another_is_refused_naming_both(tmp_path):
    # its images were listed twice, under both labels
    root = tmp_path / "pool"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "c.png").write_bytes(_png_bytes(_picture(1, 20, 20)))
    (root / "kitten").symlink_to(root / "cat")
    with pytest.raises(ValueError, match=r"class folders 'cat' and 'kitten' of .*pool are one folder .*remove the link"):
        list_folder(root)


def test_broken_top_level_link_keeps_the_class_folder_layout(tmp_path, caplog):
    """The layout follows real files: a stale link at the top of a class-folder pool is no
    member (and no class) but is named in a warning, not taken for a flat unlabelled pool."""
    root = tmp_path / "pool"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for k in range(2):
            (root / c / f"{k}.png").write_bytes(_png_bytes(_picture(k, 20, 20)))
    (root / "thumb.png").symlink_to(tmp_path / "gone.png")
    with caplog.at_level("WARNING", logger="spurfast.data"):
        paths, labels, names = list_folder(root)
    assert names == ["cat", "dog"] and labels == [0, 0, 1, 1] and len(paths) == 4
    assert "thumb.png" in caplog.text and str(root) in caplog.text
    # a flat pool still lists its broken links, so the loader reports them as unreadable
    (root / "top.png").write_bytes(_png_bytes(_picture(9, 20, 20)))
    paths, labels, names = list_folder(root)
    assert names is None and str(root / "thumb.png") in paths and set(labels) == {-1}


# ------------------------------------------------------------ corrupt but well-framed files
def _corrupt_files():
    """name -> bytes: files whose magic and end marker are intact (the cheap check says
    "ok"), so only PIL's open + verify tells the corrupt ones."""
    import struct

    from PIL import PngImagePlugin

    arr = _picture(5)
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "hello")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", pnginfo=info)
    text = bytearray(buf.getvalue())
    k = text.find(b"tEXt")
    text[k + 4 + struct.unpack(">I", text[k - 4:k])[0]] ^= 0xFF  # the tEXt chunk's CRC
    idat = bytearray(_png_bytes(arr))
    k = idat.find(b"IDAT")
    idat[k + 4 + struct.unpack(">I", idat[k - 4:k])[0]] ^= 0xFF  # the IDAT chunk's CRC
    rng = np.random.default_rng(1)
    # the reviewer's garbage JPEG: SOI + APP0 marker, random bytes, EOI.  In a large DALI
    # batch it can kill the process (SIGSEGV in pipe.run()), so it must never get there.
    garbage = b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 255, 500, dtype=np.uint8)) + b"\xff\xd9"
    return {"a_good.jpg": _jpeg_bytes(arr), "b_text_bad_crc.png": bytes(text),
            "c_idat_bad_crc.png": bytes(idat), "d_garbage.jpg": garbage, "e_good.png": _png_bytes(arr)}


CORRUPT = {"b_text_bad_crc.png", "c_idat_bad_crc.png", "d_garbage.jpg"}


@pytest.fixture(scope="module")
def corrupt_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    for name, data in _corrupt_files().items():
        (root / name).write_bytes(data)
    return list_folder(root)[0]


def test_validate_image_file_catches_corrupt_files_the_cheap_check_passes(corrupt_folder):
    for p in corrupt_folder:
        name = p.rsplit("/", 1)[1]
        assert check_image_file(p)[0] == "ok", name
        verdict, reason = validate_image_file(p)
        if name in CORRUPT:
            assert verdict == "bad" and "rejected by PIL" in reason, (name, verdict, reason)
        else:
            assert (verdict, reason) == check_image_file(p), name


@needs_dali
def test_loaders_agree_on_corrupt_files_that_pass_the_cheap_check(corrupt_folder):
    """Same ok flags and the same bad_files (keys and reasons) from both loaders; in DALI
    the pre-check catches them, not the pipeline-rebuild recovery."""
    paths = corrupt_folder
    names = [p.rsplit("/", 1)[1] for p in paths]
    # asserted first, so that a regression fails here rather than feed the garbage JPEG to DALI
    pre = loader_dali._precheck(paths, np.arange(len(paths)), PreprocessSpec(SIZE))
    assert {names[i] for i in pre} == CORRUPT
    _, t_img, t_ok, t_bad = _run("torch", paths)
    _, d_img, d_ok, d_bad = _run("dali", paths)
    assert {names[i] for i in range(len(paths)) if not t_ok[i]} == CORRUPT
    assert torch.equal(t_ok, d_ok)
    assert t_bad == d_bad == pre
    assert float(t_img[~t_ok].abs().max()) == 0.0 and float(d_img[~d_ok].abs().max()) == 0.0


def _small_jpeg(path, h, w):
    Image.fromarray(_picture(3, h, w)).save(path, quality=90)


def test_validate_image_file_applies_pils_pixel_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL raises above 2 x this, warns above it
    _small_jpeg(tmp_path / "small.jpg", 40, 40)  # 1600 px
    _small_jpeg(tmp_path / "huge.jpg", 50, 50)   # 2500 px
    with pytest.warns(Image.DecompressionBombWarning):
        assert validate_image_file(str(tmp_path / "small.jpg")) == ("ok", "JPEG")
    verdict, reason = validate_image_file(str(tmp_path / "huge.jpg"))
    assert verdict == "bad" and "DecompressionBombError" in reason
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # no limit
    assert validate_image_file(str(tmp_path / "huge.jpg")) == ("ok", "JPEG")


@needs_dali
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_both_loaders_apply_the_same_pixel_limit(tmp_path, monkeypatch):
    """One policy for huge images: over PIL's limit (2 x Image.MAX_IMAGE_PIXELS, ~179 MP
    by default; lowered here to keep the files small) a file is bad in both loaders."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    _small_jpeg(tmp_path / "a_small.jpg", 40, 40)
    _small_jpeg(tmp_path / "b_huge.jpg", 50, 50)
    Image.fromarray(_picture(4, 45, 60)).save(tmp_path / "c_huge.png")
    paths = list_folder(tmp_path)[0]
    # num_threads=1: the torch loader decodes in this process, under the patched limit
    _, _, t_ok, t_bad = _run("torch", paths, num_threads=1)
    _, _, d_ok, d_bad = _run("dali", paths, num_threads=1)
    assert t_ok.tolist() == d_ok.tolist() == [True, False, False]
    assert t_bad == d_bad and all("DecompressionBombError" in r for r in t_bad.values())


# ------------------------------------------------------------------ unusual shapes and layouts
def test_extreme_aspect_ratio_resamples_only_the_crop_window(tmp_path, monkeypatch):
    """A 1x20000 strip at size 224 is 224 x 4.48M pixels once resized whole (4.5 GB, half a
    minute, an OOM-killed worker for longer strips): only the crop window may be resampled."""
    from spurfast.data.preprocess import load_image_uint8

    strip = np.random.default_rng(0).integers(0, 256, (1, 20000, 3), dtype=np.uint8)
    Image.fromarray(strip).save(tmp_path / "strip.png")
    resize = Image.Image.resize

    def bounded(im, size, *a, **k):
        assert size[0] * size[1] <= 224 * 224, f"resampling to {size[0]}x{size[1]} for a 224x224 output"
        return resize(im, size, *a, **k)

    monkeypatch.setattr(Image.Image, "resize", bounded)
    out = load_image_uint8(str(tmp_path / "strip.png"), PreprocessSpec(224, 3))
    assert out.shape == (3, 224, 224) and out.dtype == torch.uint8


def test_crop_window_resampling_keeps_the_whole_image_definition(tmp_path):
    """Resampling only the crop window samples where resize-whole-then-crop does (up to
    float rounding of the filter weights: 1 level), with the filter clamped to the edge
    pixel at the image's border as DALI's is (the whole image's edges repeated)."""
    import math

    from spurfast.data.preprocess import crop_geometry, load_image_uint8

    rng = np.random.default_rng(1)
    for h, w in ((60, 80), (97, 13), (3, 900), (301, 37), (64, 63)):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "a.png")
        for size, ch in ((32, 3), (64, 1), (224, 3)):
            got = load_image_uint8(str(tmp_path / "a.png"), PreprocessSpec(size, ch)).int()
            with Image.open(tmp_path / "a.png") as im:
                im = im.convert("RGB" if ch == 3 else "L")
                nh, nw, top, left = crop_geometry(h, w, size)
                r = math.ceil(max(h / nh, w / nw, 1.0)) + 1
                a = np.asarray(im)
                edged = Image.fromarray(np.pad(a, ((r, r), (r, r)) + ((0, 0),) * (a.ndim - 2), mode="edge"))
                whole = edged.resize((nw, nh), Image.BILINEAR, reducing_gap=None, box=(r, r, r + w, r + h))
                ref = np.asarray(whole.crop((left, top, left + size, top + size))).reshape(size, size, ch)
            ref = torch.from_numpy(ref.copy()).permute(2, 0, 1).int()
            assert int((got - ref).abs().max()) <= 1, (h, w, size, ch)


def test_images_at_the_top_of_a_class_folder_pool_are_named(tmp_path, caplog):
    """One stray image at the top makes the pool flat and unlabelled: say so, and name it."""
    root = tmp_path / "pool"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        (root / c / "a.png").write_bytes(_png_bytes(_picture(1, 20, 20)))
    (root / "cover.png").write_bytes(_png_bytes(_picture(2, 20, 20)))
    with caplog.at_level("WARNING", logger="spurfast.data"):
        paths, labels, names = list_folder(root)
    assert names is None and set(labels) == {-1} and len(paths) == 3    # still the flat reading
    assert "subfolders (cat, dog) and 1 image(s) at its top (cover.png)" in caplog.text
    with pytest.raises(ValueError, match=r"class names were given, but .*pool has subfolders \(cat, dog\) and "
                                         r"1 image\(s\) at its top \(cover\.png\).*move those images"):
        list_folder(root, class_names=["cat", "dog"])


def test_a_folder_that_cannot_be_listed_is_reported(tmp_path, monkeypatch, caplog):
    """os.walk skips an unreadable folder silently; its images must not vanish unreported.
    (An EACCES from scandir, simulated: the tests may run as root.)"""
    import os

    root = tmp_path / "pool"
    (root / "cat" / "sub").mkdir(parents=True)
    (root / "dog").mkdir()
    for p in ("cat/a.png", "cat/sub/b.png", "dog/d.png"):
        (root / p).write_bytes(_png_bytes(_picture(1, 20, 20)))
    locked, scandir = str(root / "cat" / "sub"), os.scandir

    def no_access(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", no_access)
    with caplog.at_level("WARNING", logger="spurfast.data"):
        paths, labels, _ = list_folder(root)
    assert [str(Path(p).relative_to(root)) for p in paths] == ["cat/a.png", "dog/d.png"]
    assert f"cannot list folder {locked} (Permission denied)" in caplog.text


def test_hidden_files_and_folders_are_not_pool_images(tmp_path, caplog):
    """macOS "._x.jpg" twins (metadata, not images) and thumbnail caches (".@__thumb/",
    copies of the images) are hidden, as the hidden folders at the top already were: not
    pool items, and a hidden image at the top does not make a class-folder pool flat."""
    root = tmp_path / "pool"
    for c in ("cat", "dog"):
        (root / c / ".@__thumb").mkdir(parents=True)
        (root / c / "a.png").write_bytes(_png_bytes(_picture(1, 20, 20)))
        (root / c / "._a.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
        (root / c / ".@__thumb" / "s100a.png").write_bytes(_png_bytes(_picture(1, 10, 10)))
    (root / ".cover.jpg").write_bytes(_jpeg_bytes(_picture(2)))
    with caplog.at_level("WARNING", logger="spurfast.data"):
        paths, labels, names = list_folder(root)
    assert [str(Path(p).relative_to(root)) for p in paths] == ["cat/a.png", "dog/a.png"]
    assert labels == [0, 1] and names == ["cat", "dog"] and "flat" not in caplog.text
    flat = tmp_path / "flat"
    (flat / ".thumbnails").mkdir(parents=True)
    for p in ("b.png", ".thumbnails/b.png", "._b.png"):
        (flat / p).write_bytes(_png_bytes(_picture(3, 20, 20)))
    assert [Path(p).name for p in list_folder(flat)[0]] == ["b.png"]
    (tmp_path / ".pool").mkdir()   # a hidden root is the pool the user named
    (tmp_path / ".pool" / "c.png").write_bytes(_png_bytes(_picture(4, 20, 20)))
    assert len(ImageFolderSource(tmp_path / ".pool", size=8)) == 1


def test_images_of_formats_the_loaders_do_not_read_are_left_out_with_a_warning(tmp_path, caplog):
    """.webp, .bmp, .gif and .tif files (which torchvision's ImageFolder reads) were dropped
    without a word: a mixed-format dataset lost part of every class."""
    root = tmp_path / "pool"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        (root / c / "a.png").write_bytes(_png_bytes(_picture(1, 20, 20)))
        for ext in ("webp", "BMP", "gif"):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / c / f"b.{ext}", format=ext.upper())
        (root / c / ".c.bmp").write_bytes(b"hidden")
        (root / c / "notes.txt").write_text("not an image")
    with caplog.at_level("WARNING", logger="spurfast.data"):
        paths, _, _ = list_folder(root)
    assert [Path(p).name for p in paths] == ["a.png", "a.png"]
    assert "left out 6 image file(s) of" in caplog.text and "cat/b.BMP" in caplog.text, caplog.text
    assert ".c.bmp" not in caplog.text and "notes.txt" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="spurfast.data"):
        list_folder(root / "cat")   # flat
    assert "left out 3 image file(s)" in caplog.text, caplog.text


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_file_names_that_are_not_utf8(tmp_path, backend):
    """A name of Latin-1 bytes comes back from os.walk with surrogate escapes: the pool's
    identity (run id, store fingerprint) hashed item_id().encode() and crashed, and DALI's
    file list refused the whole pipeline ("Unsupported argument type with name files")."""
    import os

    from spurfast.data.sources import content_digest
    from spurfast.identity import fingerprint

    root = tmp_path / "pool"
    (root / "cat").mkdir(parents=True)
    names = [b"caf\xe9.png", b"na\xefve.jpg", b"plain.png", b"z\xff.jpg"]
    for k, n in enumerate(names):
        data = _png_bytes(_picture(k, 20, 24)) if n.endswith(b".png") else _jpeg_bytes(_picture(k, 20, 24))
        with open(os.path.join(os.fsencode(root / "cat"), n), "wb") as fh:
            fh.write(data if n != b"z\xff.jpg" else b"")   # one bad file among them
    src = ImageFolderSource(root, size=SIZE)
    got = list(loader_torch.iter_batches(src, batch_size=3, backend=backend))
    assert torch.cat([b.ok for b in got]).tolist() == [True, True, True, False]
    assert list(src.bad_files) == [3] and "empty file" in src.bad_files[3]
    ref = torch.stack([src[i][0] for i in range(3)])
    assert float((torch.cat([b.images for b in got])[:3] - ref).abs().max()) <= 12 / 255
    assert [src.item_id(i) for i in range(4)] == ["pool/cat/caf\\xe9.png", "pool/cat/na\\xefve.jpg",
                                                  "pool/cat/plain.png", "pool/cat/z\\xff.jpg"]
    assert len(fingerprint(src)) and len(content_digest(src))


def test_a_pool_folder_whose_own_name_is_not_utf8(tmp_path):
    """Only the files' names were escaped: a pool folder named in Latin-1 kept its
    surrogates in ``name``, and every digest of the pool crashed (`spurfast discover`:
    "'utf-8' codec can't encode character '\\udcff' ... surrogates not allowed")."""
    import os

    from spurfast.data.sources import content_digest
    from spurfast.identity import fingerprint

    root = os.path.join(os.fsencode(tmp_path), b"pool\xff")
    os.makedirs(os.path.join(root, b"cat"))
    with open(os.path.join(root, b"cat", b"a.png"), "wb") as fh:
        fh.write(_png_bytes(_picture(0, 20, 24)))
    src = ImageFolderSource(os.fsdecode(root), size=SIZE)
    assert len(fingerprint(src)) and len(content_digest(src))
    assert src.name == "pool\\xff" and src.item_id(0) == "pool\\xff/cat/a.png"   # as item ids were


@pytest.mark.parametrize("which", _loaders())
def test_png_with_a_side_over_libpngs_limit_is_bad_for_both_loaders(tmp_path, which):
    """DALI's decoder keeps libpng's 1,000,000-pixel side limit (it failed such a PNG that
    PIL decodes): one verdict for both loaders, as for PIL's pixel limit."""
    col = (np.arange(1_000_001) % 251).astype(np.uint8)[:, None]
    Image.fromarray(col).save(tmp_path / "a_tall.png")
    Image.fromarray(col[:-1]).save(tmp_path / "b_at_the_limit.png")
    Image.fromarray(_picture(1)).save(tmp_path / "c_plain.png")
    paths = sorted(str(p) for p in tmp_path.iterdir())
    idx, images, ok, bad = _run(which, paths)
    assert ok.tolist() == [False, True, True]
    assert list(bad) == [0] and "PNG of 1x1000001 pixels: a side over libpng's limit of 1,000,000" in bad[0]


def _png_with_chunks(arr, before_idat=b"", after_idat=b"", colour_type=2):
    """A PNG of ``arr`` (RGB, or palette indices for colour type 3) with extra raw chunks."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[r].tobytes() for r in range(h))
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0))
    return (b"\x89PNG\r\n\x1a\n" + ihdr + before_idat + chunk(b"IDAT", zlib.compress(raw)) + after_idat
            + chunk(b"IEND", b"")), chunk


@pytest.mark.parametrize("which", _loaders())
def test_pngs_libpng_refuses_and_pil_decodes_are_bad_for_both_loaders(tmp_path, which):
    """An unknown critical chunk (before or after the image data) or a palette image with
    no PLTE: PIL decodes them (torch: ok), libpng refuses them (DALI: bad, found only by
    a pipeline rebuild); the shared pre-check now marks them bad for both, for one reason."""
    arr = _picture(2, 12, 16)
    _, chunk = _png_with_chunks(arr)
    files = {"a_critical_chunk.png": _png_with_chunks(arr, before_idat=chunk(b"ABCD", b"xyz"))[0],
             "b_critical_chunk_after_idat.png": _png_with_chunks(arr, after_idat=chunk(b"ABCD", b"xyz"))[0],
             "c_palette_without_plte.png": _png_with_chunks(arr[..., 0] % 4, colour_type=3)[0],
             "d_ancillary_chunk.png": _png_with_chunks(arr, before_idat=chunk(b"abCD", b"xyz"))[0],
             "e_palette.png": _png_with_chunks(arr[..., 0] % 4, colour_type=3,
                                               before_idat=chunk(b"PLTE", bytes(range(12))))[0]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = sorted(str(p) for p in tmp_path.iterdir())
    idx, images, ok, bad = _run(which, paths)
    assert ok.tolist() == [False, False, False, True, True]
    assert bad == {0: "PNG with an unknown critical chunk 'ABCD' (libpng, DALI's decoder, refuses it; PIL would "
                      "decode it)",
                   1: "PNG with an unknown critical chunk 'ABCD' (libpng, DALI's decoder, refuses it; PIL would "
                      "decode it)",
                   2: "PNG palette image without a PLTE chunk before its image data (libpng, DALI's decoder, "
                      "refuses it; PIL would decode it)"}
    if which == "dali":   # caught before any pipeline, not by a rebuild
        assert set(loader_dali._precheck(paths, np.arange(len(paths)), PreprocessSpec(SIZE))) == {0, 1, 2}


def test_a_class_folder_link_whose_target_is_gone_is_named(tmp_path, caplog):
    """A class folder linked from elsewhere (an unmounted disk) whose target is gone: the
    whole class was left out without a word; with --class-names the run went on without it."""
    root = tmp_path / "pool"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        (root / c / "0.png").write_bytes(_png_bytes(_picture(1, 20, 20)))
    (root / "fish").symlink_to(tmp_path / "unmounted" / "fish")
    (root / "dog" / "more").symlink_to(tmp_path / "unmounted" / "dogs")   # inside a class folder too
    with caplog.at_level("WARNING", logger="spurfast.data"):
        paths, labels, names = list_folder(root, class_names=["cat", "dog", "fish"])
    assert labels == [0, 1] and names == ["cat", "dog", "fish"]
    assert f"ignoring 1 broken link(s) in {root} (their targets are gone" in caplog.text
    assert f"ignoring 1 broken link(s) in {root / 'dog'} (their targets are gone" in caplog.text
    assert caplog.text.count("broken link") == 2


@pytest.mark.parametrize("which", _loaders())
def test_only_the_exif_orientation_tag_turns_an_image(tmp_path, which):
    """PIL's getexif() also reads XMP's tiff:Orientation and a PNG's "Raw profile type exif"
    text, which DALI's decoder ignores: the torch loader turned such images 90 degrees from
    DALI's.  And a malformed PNG eXIf chunk made PIL's getexif() raise: torch marked bad an
    image DALI decodes.  All of them now load as the plain image in both loaders."""
    import struct

    from PIL import PngImagePlugin

    arr = _picture(3, 24, 40)
    arr[:, :8] = (255, 0, 0)
    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF>'
           '</x:xmpmeta>')
    plain = _jpeg_bytes(arr)
    app1 = b"http://ns.adobe.com/xap/1.0/\0" + xmp.encode()
    (tmp_path / "a_plain.jpg").write_bytes(plain)
    (tmp_path / "b_xmp.jpg").write_bytes(plain[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + plain[2:])
    Image.fromarray(arr).save(tmp_path / "c_plain.png")
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp)
    Image.fromarray(arr).save(tmp_path / "d_xmp.png", pnginfo=info)
    exif = Image.Exif()
    exif[0x0112] = 6
    raw = exif.tobytes()
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", f"\nexif\n{len(raw):8}\n{raw.hex()}\n", zip=True)   # ImageMagick's
    Image.fromarray(arr).save(tmp_path / "e_raw_profile.png", pnginfo=info)
    _, chunk = _png_with_chunks(arr)
    (tmp_path / "f_junk_exif.png").write_bytes(_png_with_chunks(arr, before_idat=chunk(b"eXIf", b"junkjunk"))[0])
    paths = sorted(str(p) for p in tmp_path.iterdir())
    idx, images, ok, bad = _run(which, paths)
    assert ok.all() and not bad
    assert torch.equal(images[1], images[0]), paths[1]
    for k in (3, 4, 5):
        assert torch.equal(images[k], images[2]), paths[k]


@pytest.mark.parametrize("which", _loaders())
def test_more_pngs_dali_refuses_and_pil_decodes_are_bad_for_both_loaders(tmp_path, which):
    """Chunk sequences DALI's decoder refuses and PIL decodes, which passed the pre-check
    (torch: ok; DALI: bad after a pipeline rebuild, in its own words): a chunk type that is
    not four letters or has the reserved (third-letter) bit set, an IHDR twice, of 14
    bytes, or with compression method 1, and a palette image with a second PLTE or one of
    7 bytes.  Now bad for both, for one reason."""
    import struct

    arr = _picture(2, 12, 16)
    _, chunk = _png_with_chunks(arr)
    h, w = arr.shape[:2]
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    plain = _png_with_chunks(arr)[0]
    pal, plte = arr[..., 0] % 4, chunk(b"PLTE", bytes(range(12)))
    files = {"a_digit_chunk.png": _png_with_chunks(arr, before_idat=chunk(b"a1bc", b"x"))[0],
             "b_reserved_bit.png": _png_with_chunks(arr, after_idat=chunk(b"abcd", b"x"))[0],
             "c_second_ihdr.png": _png_with_chunks(arr, before_idat=ihdr)[0],
             "d_ihdr_of_14_bytes.png": plain.replace(ihdr, chunk(b"IHDR", ihdr[8:21] + b"\0")),
             "e_compression_1.png": plain.replace(ihdr, chunk(b"IHDR", ihdr[8:18] + b"\1\0\0")),
             "f_second_plte.png": _png_with_chunks(pal, colour_type=3, before_idat=plte, after_idat=plte)[0],
             "g_plte_of_7_bytes.png": _png_with_chunks(pal, colour_type=3, before_idat=chunk(b"PLTE", bytes(7)))[0],
             "h_ancillary.png": _png_with_chunks(arr, before_idat=chunk(b"abCd", b"x"))[0],
             "i_plte_in_rgb.png": _png_with_chunks(arr, before_idat=plte + chunk(b"PLTE", bytes(7)))[0]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = sorted(str(p) for p in tmp_path.iterdir())
    idx, images, ok, bad = _run(which, paths)
    assert ok.tolist() == [False] * 7 + [True, True]
    why = "(libpng, DALI's decoder, refuses it; PIL would decode it)"
    assert bad == {0: f"PNG with an invalid chunk type 'a1bc' {why}",
                   1: f"PNG with an invalid chunk type 'abcd' {why}",
                   2: f"PNG with a second IHDR chunk {why}",
                   3: f"PNG with an IHDR chunk of 14 bytes (13 expected) {why}",
                   4: f"PNG with compression method 1 in IHDR (only 0 is defined) {why}",
                   5: f"PNG palette image with a second PLTE chunk {why}",
                   6: f"PNG palette image with a PLTE chunk of 7 bytes (a positive multiple of 3 expected) {why}"}
    if which == "dali":   # caught before any pipeline, not by a rebuild
        assert set(loader_dali._precheck(paths, np.arange(len(paths)), PreprocessSpec(SIZE))) == set(range(7))


@pytest.mark.parametrize("which", _loaders())
def test_malformed_chunks_after_the_image_data_are_bad_for_both_loaders(tmp_path, which):
    """PIL reads the ancillary chunks after a PNG's image data only when it decodes: a
    truncated pHYs, or zTXt text over PIL's limit, there failed the torch loader's decode
    while DALI decoded the image (before the image data they fail PIL's open, bad for
    both).  The pre-check now replays PIL's handling of them: bad for both, one reason."""
    import zlib

    arr = _picture(4, 12, 16)
    _, chunk = _png_with_chunks(arr)
    big = chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"x" * 2_000_000))
    files = {"a_phys_after.png": _png_with_chunks(arr, after_idat=chunk(b"pHYs", b"\0"))[0],
             "b_big_ztxt_after.png": _png_with_chunks(arr, after_idat=big)[0],
             "c_phys_before.png": _png_with_chunks(arr, before_idat=chunk(b"pHYs", b"\0"))[0],
             "d_text_after.png": _png_with_chunks(arr, after_idat=chunk(b"tEXt", b"k\0v") + chunk(b"abCd", b"?"))[0],
             "e_plain.png": _png_with_chunks(arr)[0]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = sorted(str(p) for p in tmp_path.iterdir())
    idx, images, ok, bad = _run(which, paths)
    assert ok.tolist() == [False, False, False, True, True]
    assert bad == {0: "PNG rejected by PIL: ValueError: Truncated pHYs chunk (after the image data)",
                   1: "PNG rejected by PIL: ValueError: Decompressed data too large for "
                      "PngImagePlugin.MAX_TEXT_CHUNK (after the image data)",
                   2: "PNG rejected by PIL: ValueError: Truncated pHYs chunk"}
    assert torch.equal(images[3], images[4])


def test_chunks_after_the_image_data_are_judged_by_a_decode_where_pils_internals_moved(tmp_path, monkeypatch):
    """The pre-check replays Pillow's private load_end loop; another Pillow without those
    internals (AttributeError / TypeError) must not call every such PNG bad: it decodes."""
    from spurfast.data import preprocess

    def moved(path, trailer):
        raise AttributeError("'PngImageFile' object has no attribute 'png'")

    monkeypatch.setattr(preprocess, "_replay_png_load_end", moved)
    arr = _picture(4, 12, 16)
    _, chunk = _png_with_chunks(arr)
    (tmp_path / "bad.png").write_bytes(_png_with_chunks(arr, after_idat=chunk(b"pHYs", b"\0"))[0])
    (tmp_path / "text.png").write_bytes(_png_with_chunks(arr, after_idat=chunk(b"tEXt", b"k\0v"))[0])
    assert preprocess.validate_image_file(str(tmp_path / "bad.png")) == \
        ("bad", "PNG rejected by PIL: ValueError: Truncated pHYs chunk (after the image data)")
    assert preprocess.validate_image_file(str(tmp_path / "text.png"))[0] != "bad"


def _tiff(entries, order, extra=b""):
    """A minimal EXIF block (TIFF header + IFD0) of (tag, type, count, 4-byte value) entries."""
    import struct

    p = "<" if order == b"II" else ">"
    ifd = struct.pack(p + "H", len(entries)) + b"".join(
        struct.pack(p + "HHI", tag, kind, count) + (struct.pack(p + "HH", value, 0) if kind == 3 else
                                                   struct.pack(p + "I", value))
        for tag, kind, count, value in entries) + struct.pack(p + "I", 0)
    return order + struct.pack(p + "HI", 42, 8) + ifd + extra


@pytest.mark.filterwarnings("ignore:Truncated File Read:UserWarning")   # PIL's own EXIF read at open
@pytest.mark.parametrize("which", _loaders())
def test_malformed_exif_orientation_is_read_as_dali_reads_it(tmp_path, which):
    """DALI reads IFD0's orientation as 16 bits whatever its type and gives up on an entry
    whose data lies outside the EXIF block (a JPEG then keeps no orientation, a PNG the one
    read before it); PIL read a LONG orientation as its value and skipped the bad entry:
    the torch loader turned these images where DALI did not, or the other way round."""
    import struct

    y, x = np.mgrid[0:24, 0:24]
    arr = np.stack([x * 10, y * 10, np.zeros_like(x)], -1).astype(np.uint8)   # every turn differs
    plain = _jpeg_bytes(arr)

    def jpeg(exif):
        app1 = b"Exif\0\0" + exif
        return plain[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + plain[2:]

    def png(exif):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", exif=exif)
        return buf.getvalue()

    cases = {   # name: (EXIF block, turn DALI gives a JPEG, turn DALI gives a PNG; None: bad, see below)
        "long_6_le": (_tiff([(0x0112, 4, 1, 6)], b"II"), 6, 6),
        "long_6_be": (_tiff([(0x0112, 4, 1, 6)], b"MM"), 1, 1),
        "orientation_9": (_tiff([(0x0112, 3, 1, 9)], b"MM"), 1, 1),
        "bad_make_after": (_tiff([(0x0112, 3, 1, 6), (0x010F, 2, 20, 5000)], b"II"), 1, None),
        "bad_make_before": (_tiff([(0x010F, 2, 20, 5000), (0x0112, 3, 1, 6)], b"MM"), 1, None),
        "bad_xres_after": (_tiff([(0x0112, 3, 1, 8), (0x011A, 5, 1, 5000)], b"MM"), 1, None)}
    names = []
    for o in (1, 6, 8):   # well-formed references
        (tmp_path / f"ref{o}.jpg").write_bytes(jpeg(_tiff([(0x0112, 3, 1, o)], b"MM")))
        (tmp_path / f"ref{o}.png").write_bytes(png(_tiff([(0x0112, 3, 1, o)], b"II")))
        names += [f"ref{o}.jpg", f"ref{o}.png"]
    for name, (exif, _, turn_png) in cases.items():
        (tmp_path / f"{name}.jpg").write_bytes(jpeg(exif))
        (tmp_path / f"{name}.png").write_bytes(png(exif))
        names += [f"{name}.jpg", f"{name}.png"]
    paths = [str(tmp_path / n) for n in names]
    idx, images, ok, bad = _run(which, paths)
    # a PNG whose IFD0 runs past its block corrupts DALI's memory: bad for both loaders
    # (test_png_exif_that_dali_cannot_read_is_bad_for_both_loaders)
    want_bad = {f"{name}.png" for name, (_, _, turn_png) in cases.items() if turn_png is None}
    assert {names[i] for i in bad} == want_bad and {names[i] for i in range(len(names)) if not ok[i]} == want_bad
    got = {n: images[k] for k, n in enumerate(names)}
    for name, (_, turn_jpeg, turn_png) in cases.items():
        assert torch.equal(got[f"{name}.jpg"], got[f"ref{turn_jpeg}.jpg"]), f"{name}.jpg"
        if turn_png is not None:
            assert torch.equal(got[f"{name}.png"], got[f"ref{turn_png}.png"]), f"{name}.png"


@pytest.mark.filterwarnings("ignore:Truncated File Read:UserWarning")
@pytest.mark.parametrize("which", _loaders())
def test_png_exif_that_dali_cannot_read_is_bad_for_both_loaders(tmp_path, which):
    """Passed by the pre-check, these PNGs killed the DALI loader's process (an IFD0 entry's
    data, or its entry count, past the EXIF block: "free(): invalid next size", or a
    segfault) or gave a scrambled image with ok=True (an eXIf without a TIFF byte order,
    which libpng drops and DALI still turns by); the torch loader decoded them."""
    import struct
    import zlib

    arr = np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    plain = buf.getvalue()

    def with_exif(exif):   # an eXIf chunk right after IHDR
        chunk = struct.pack(">I", len(exif)) + b"eXIf" + exif + struct.pack(">I", zlib.crc32(b"eXIf" + exif))
        return plain[:33] + chunk + plain[33:]

    count_3_of_1 = bytearray(_tiff([(0x0112, 3, 1, 6)], b"MM"))
    count_3_of_1[8:10] = struct.pack(">H", 3)
    files = {"good.png": plain, "good_orient6.png": with_exif(_tiff([(0x0112, 3, 1, 6)], b"MM")),
             "xm_orient3.png": with_exif(b"XM" + _tiff([(0x0112, 3, 1, 3)], b"MM")[2:]),   # dropped, not turned
             "make_after.png": with_exif(_tiff([(0x0112, 3, 1, 6), (0x010F, 2, 20, 5000)], b"II")),
             "xres_after.png": with_exif(_tiff([(0x0112, 3, 1, 8), (0x011A, 5, 1, 5000)], b"MM")),
             "count_3_of_1.png": with_exif(bytes(count_3_of_1)),
             "xm_orient6.png": with_exif(b"XM" + _tiff([(0x0112, 3, 1, 6)], b"MM")[2:]),
             "xm_orient8.png": with_exif(b"XM" + _tiff([(0x0112, 3, 1, 8)], b"MM")[2:])}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = [str(tmp_path / n) for n in files]
    idx, images, ok, bad = _run(which, paths)
    assert idx.tolist() == list(range(len(paths)))
    assert sorted(bad) == [i for i in range(len(paths)) if not ok[i]] == [3, 4, 5, 6, 7]
    assert all(float(images[i].abs().max()) == 0.0 for i in bad)
    assert "runs past its end" in bad[3] and "libpng drops" in bad[6], bad
    assert not torch.equal(images[1], images[0]) and torch.equal(images[2], images[0])   # turned / not turned


@pytest.mark.filterwarnings("ignore:Truncated File Read:UserWarning")   # PIL's own EXIF read at open
@pytest.mark.parametrize("which", _loaders())
def test_several_exif_blocks_are_read_as_dali_reads_them(tmp_path, which):
    """PIL joins a JPEG's Exif APP1 segments into one block and keeps a PNG's last eXIf
    chunk; DALI reads the segments one by one (the first orientation read counts once a
    segment read whole has one) and keeps the first eXIf chunk libpng accepts: the torch
    loader turned these images otherwise than DALI (measured, DALI 2.4)."""
    import struct

    y, x = np.mgrid[0:24, 0:24]
    arr = np.stack([x * 10, y * 10, np.zeros_like(x)], -1).astype(np.uint8)   # every turn differs
    plain = _jpeg_bytes(arr)
    _, chunk = _png_with_chunks(arr)

    def jpeg(*blocks):
        segs = b"".join(b"\xff\xe1" + struct.pack(">H", len(b) + 8) + b"Exif\0\0" + b for b in blocks)
        return plain[:2] + segs + plain[2:]

    def png(*blocks):
        return _png_with_chunks(arr, before_idat=b"".join(chunk(b"eXIf", b) for b in blocks))[0]

    def orient(o, order=b"MM"):
        return _tiff([(0x0112, 3, 1, o)], order)

    make = _tiff([(0x010F, 3, 1, 6)], b"MM")                                 # a whole IFD0, no orientation
    broken6 = _tiff([(0x0112, 3, 1, 6), (0x010F, 2, 20, 5000)], b"II")    # 6, then an entry off the block
    cases = {   # name: (file, turn DALI gives it)
        "jpeg_make_then_8": (jpeg(make, orient(8)), "jpg", 8),
        "jpeg_short_then_8": (jpeg(b"MM", orient(8)), "jpg", 8),
        "jpeg_broken6_then_8": (jpeg(broken6, orient(8)), "jpg", 6),
        "jpeg_broken6_then_make": (jpeg(broken6, make), "jpg", 1),
        "jpeg_6_then_8": (jpeg(orient(6), orient(8)), "jpg", 6),
        "jpeg_6_spills_into_next": (jpeg(_tiff([(0x0112, 3, 1, 6), (0x010F, 2, 20, 30)], b"MM"), b"A" * 40),
                                    "jpg", 1),
        "png_6_then_8": (png(orient(6), orient(8)), "png", 6),
        "png_make_then_8": (png(make, orient(8)), "png", 1),
        "png_3_bytes_then_8": (png(b"MM\0", orient(8)), "png", 8),
        "png_exif_prefix_then_8": (png(b"Exif\0\0" + orient(6), orient(8)), "png", 8)}
    names = []
    for o in (1, 6, 8):   # well-formed references
        (tmp_path / f"ref{o}.jpg").write_bytes(jpeg(orient(o)))
        (tmp_path / f"ref{o}.png").write_bytes(png(orient(o, b"II")))
        names += [f"ref{o}.jpg", f"ref{o}.png"]
    for name, (data, ext, _) in cases.items():
        (tmp_path / f"{name}.{ext}").write_bytes(data)
        names.append(f"{name}.{ext}")
    paths = [str(tmp_path / n) for n in names]
    idx, images, ok, bad = _run(which, paths)
    assert ok.all() and not bad
    got = {n: images[k] for k, n in enumerate(names)}
    for name, (_, ext, turn) in cases.items():
        assert torch.equal(got[f"{name}.{ext}"], got[f"ref{turn}.{ext}"]), f"{name}.{ext}"


@pytest.mark.parametrize("which", _loaders())
def test_a_chunk_before_ihdr_or_a_cut_iend_is_bad_for_both_loaders(tmp_path, which):
    """DALI's PNG parser wants IHDR first and libpng reads IEND's CRC; PIL takes a chunk
    before IHDR and stops at IEND's type: a tEXt before IHDR, or a file that ends inside
    IEND's CRC (cut in its last bytes), decoded in the torch loader and failed DALI's
    pipeline (found by a rebuild and a probe).  Now bad for both, for one reason.  A wrong
    IEND CRC or IEND data with its CRC are good for both."""
    arr = _picture(5, 12, 16)
    plain, chunk = _png_with_chunks(arr)
    ihdr = plain[8:33]
    iend = chunk(b"IEND", b"")
    files = {"a_text_before_ihdr.png": plain[:8] + chunk(b"tEXt", b"k\0v") + plain[8:],
             "b_iend_crc_cut.png": plain[:-2],
             "c_iend_without_crc.png": plain[:-4],
             "d_iend_data_cut.png": plain[:-len(iend)] + chunk(b"IEND", b"xx")[:-3],
             "e_iend_crc_wrong.png": plain[:-4] + b"\0\0\0\0",
             "f_iend_data.png": plain[:-len(iend)] + chunk(b"IEND", b"xx"),
             "g_plain.png": plain}
    assert ihdr[4:8] == b"IHDR" and plain.endswith(iend)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = sorted(str(p) for p in tmp_path.iterdir())
    idx, images, ok, bad = _run(which, paths)
    assert ok.tolist() == [False] * 4 + [True] * 3
    why = "(libpng, DALI's decoder, refuses it; PIL would decode it)"
    cut = f"PNG with its IEND chunk cut short (the file ends inside its data or CRC) {why}"
    assert bad == {0: f"PNG with a 'tEXt' chunk before IHDR (IHDR must come first) {why}", 1: cut, 2: cut, 3: cut}
    assert torch.equal(images[4], images[6]) and torch.equal(images[5], images[6])
    if which == "dali":   # caught before any pipeline, not by a rebuild
        assert set(loader_dali._precheck(paths, np.arange(len(paths)), PreprocessSpec(SIZE))) == {0, 1, 2, 3}


@pytest.mark.parametrize("which", _loaders())
def test_jpeg_markers_dalis_parser_refuses_are_bad_for_both_loaders(tmp_path, which):
    """PIL (and libjpeg) skip stray bytes between a JPEG's header segments and a restart
    marker among them; DALI's JPEG parser refuses them ("Invalid marker"): the torch loader
    decoded such files and DALI failed its pipeline (found by a rebuild and a probe).  Now
    bad for both, for one reason; fill bytes (0xFF runs) and a comment stay good."""
    import struct

    plain = _jpeg_bytes(_picture(6, 20, 24))
    dqt, sos = plain.find(b"\xff\xdb"), plain.find(b"\xff\xda")
    text = b"\xff\xd9 hi\xff"   # marker-like bytes inside a segment are its data
    com = b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text
    files = {"a_stray_before_dqt.jpg": plain[:dqt] + b"\x00\x01\x02" + plain[dqt:],
             "b_stray_before_sos.jpg": plain[:sos] + b"\x12\x34" + plain[sos:],
             "c_ff00_in_header.jpg": plain[:2] + b"\xff\x00" + plain[2:],
             "d_restart_in_header.jpg": plain[:2] + b"\xff\xd0" + plain[2:],
             "e_fill_bytes.jpg": plain[:sos] + b"\xff\xff" + plain[sos:],
             "f_comment.jpg": plain[:dqt] + com + plain[dqt:],
             "g_plain.jpg": plain}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = sorted(str(p) for p in tmp_path.iterdir())
    idx, images, ok, bad = _run(which, paths)
    assert ok.tolist() == [False] * 4 + [True] * 3
    why = "(DALI's decoder refuses it; PIL would decode it)"
    assert bad == {0: f"JPEG with stray bytes where a marker belongs (byte {dqt}: 00 01) {why}",
                   1: f"JPEG with stray bytes where a marker belongs (byte {sos}: 12 34) {why}",
                   2: f"JPEG with stray bytes where a marker belongs (byte 2: ff 00) {why}",
                   3: f"JPEG whose marker segments run past the end of the file before its scan {why}"}
    assert torch.equal(images[4], images[6]) and torch.equal(images[5], images[6])
    if which == "dali":   # caught before any pipeline, not by a rebuild
        assert set(loader_dali._precheck(paths, np.arange(len(paths)), PreprocessSpec(SIZE))) == {0, 1, 2, 3}


@pytest.mark.parametrize("which", _loaders())
def test_an_animation_whose_default_image_is_not_a_frame_is_bad_for_both_loaders(tmp_path, which):
    """An APNG whose image data is a default image outside its animation (a still for
    viewers without APNG): DALI decoded its first frame, PIL (torch) the default image, two
    different pictures.  Now bad for both, for one reason; with one frame both take the
    default image, and an APNG whose first frame is its image data is good for both."""
    still, first, second = (Image.fromarray(_picture(k, 20, 24)) for k in (7, 8, 9))

    def apng(frames, **kw):
        buf = io.BytesIO()
        still.save(buf, format="PNG", save_all=True, append_images=frames, **kw)
        return buf.getvalue()

    files = {"a_hidden_default.png": apng([first, second], default_image=True),
             "b_hidden_default_one_frame.png": apng([first], default_image=True),
             "c_animation.png": apng([first, second]),
             "d_still.png": _png_bytes(np.asarray(still))}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = sorted(str(p) for p in tmp_path.iterdir())
    idx, images, ok, bad = _run(which, paths)
    assert ok.tolist() == [False, True, True, True]
    assert bad == {0: "PNG animation whose default image is not its first frame (DALI decodes the first frame, "
                      "PIL the default image)"}
    assert torch.equal(images[1], images[3]) and torch.equal(images[2], images[3])
    if which == "dali":   # caught before any pipeline
        assert set(loader_dali._precheck(paths, np.arange(len(paths)), PreprocessSpec(SIZE))) == {0}


@pytest.mark.parametrize("which", _loaders())
def test_malformed_chunks_after_an_animations_first_frame_are_bad_for_both_loaders(tmp_path, which):
    """The replay of PIL's chunk handling after the image data skipped every APNG, but
    PIL's decode of the first frame reads the chunks up to the next frame's fcTL (up to IEND
    with one frame): a truncated pHYs there failed the torch loader while DALI decoded the
    frame.  Bad for both now, for one reason; chunks after a later frame, which decoding
    the first frame never reads, stay good for both."""
    import struct

    arr = _picture(4, 12, 16)
    _, chunk = _png_with_chunks(arr)
    first, second = Image.fromarray(arr), Image.fromarray(255 - arr)

    def apng(frames, after, nth=1):
        """An APNG of ``frames`` with raw chunk ``after`` after the ``nth`` chunk of image data."""
        buf = io.BytesIO()
        frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
        data, at, out, seen = buf.getvalue(), 8, [], 0
        while at < len(data):
            n = struct.unpack(">I", data[at:at + 4])[0]
            out.append(data[at:at + 12 + n])
            seen += data[at + 4:at + 8] in (b"IDAT", b"fdAT")
            if seen == nth and data[at + 4:at + 8] in (b"IDAT", b"fdAT"):
                out.append(after)
            at += 12 + n
        return data[:8] + b"".join(out)

    phys = chunk(b"pHYs", b"\0")
    files = {"a_phys_after_first_frame.png": apng([first, second], phys),
             "b_phys_in_one_frame_apng.png": apng([first], phys),
             "c_phys_after_second_frame.png": apng([first, second], phys, nth=2),
             "d_text_after_first_frame.png": apng([first, second], chunk(b"tEXt", b"k\0v")),
             "e_plain.png": _png_with_chunks(arr)[0]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = sorted(str(p) for p in tmp_path.iterdir())
    idx, images, ok, bad = _run(which, paths)
    assert ok.tolist() == [False, False, True, True, True]
    why = "PNG rejected by PIL: ValueError: Truncated pHYs chunk (after the image data)"
    assert bad == {0: why, 1: why}
    assert torch.equal(images[2], images[4]) and torch.equal(images[3], images[4])


@pytest.mark.filterwarnings("ignore:Invalid APNG:UserWarning")   # PIL's word on two acTL chunks
@pytest.mark.parametrize("which", _loaders())
def test_animations_and_their_acTL_chunks_are_read_as_dali_reads_them(tmp_path, which):
    """DALI's decoder ignores the EXIF orientation of an animation (the last acTL chunk
    before the image data counts more than one frame) and refuses an acTL chunk there of 0
    frames or of other than 8 bytes; PIL turned the first frame and decoded those files
    (measured, DALI 2.4): the torch loader gave other pixels, or decoded what DALI refused."""
    import struct

    y, x = np.mgrid[0:24, 0:24]
    arr = np.stack([x * 10, y * 10, np.zeros_like(x)], -1).astype(np.uint8)   # every turn differs
    _, chunk = _png_with_chunks(arr)
    exif6 = chunk(b"eXIf", _tiff([(0x0112, 3, 1, 6)], b"MM"))

    def apng(actl=None, exif_at=b"IDAT", **kw):
        """An APNG of ``arr`` then ``255 - arr`` with orientation 6 before its image data (or
        before chunk ``exif_at``), its acTL chunk replaced by the raw chunks ``actl``."""
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", save_all=True, append_images=[Image.fromarray(255 - arr)], **kw)
        data, at, out = buf.getvalue(), 8, []
        while at < len(data):
            n = struct.unpack(">I", data[at:at + 4])[0]
            kind, whole = data[at + 4:at + 8], data[at:at + 12 + n]
            out.append(exif6 + whole if kind == exif_at else actl if kind == b"acTL" and actl is not None else whole)
            at += 12 + n
        return data[:8] + b"".join(out)

    def actl(n, extra=b""):
        return chunk(b"acTL", struct.pack(">II", n, 0) + extra)

    files = {"a_animation.png": apng(),
             "b_one_frame_counted.png": apng(actl(1)),
             "c_last_actl_counts_one.png": apng(actl(2) + actl(1)),
             "d_last_actl_counts_two.png": apng(actl(1) + actl(2)),
             "e_actl_of_0_frames.png": apng(actl(0)),
             "f_actl_of_12_bytes.png": apng(actl(2, b"\0\0\0\0")),
             "g_still.png": _png_with_chunks(arr)[0],
             "h_still_turned.png": _png_with_chunks(arr, before_idat=exif6)[0],
             # a still outside a one-frame animation: DALI decoded the frame where the last acTL counts two
             "i_hidden_default_last_actl_two.png": apng(actl(1) + actl(2), default_image=True),
             "j_hidden_default_last_actl_one.png": apng(actl(2) + actl(1), default_image=True),
             # PIL's decode of the still read no eXIf after the frame; DALI's turned it
             "k_hidden_default_exif_at_end.png": apng(exif_at=b"IEND", default_image=True)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = sorted(str(p) for p in tmp_path.iterdir())
    idx, images, ok, bad = _run(which, paths)
    assert ok.tolist() == [True, True, True, True, False, False, True, True, False, True, True]
    why = "(libpng, DALI's decoder, refuses it; PIL would decode it)"
    assert bad == {4: f"PNG with an acTL chunk of 0 frames {why}",
                   5: f"PNG with an acTL chunk of 12 bytes (8 expected) {why}",
                   8: "PNG animation whose default image is not its first frame (DALI decodes the first frame, "
                      "PIL the default image)"}
    still, turned = images[6], images[7]
    assert not torch.equal(still, turned)
    assert [torch.equal(images[k], still) for k in range(4)] == [True, False, False, True]
    assert [torch.equal(images[k], turned) for k in range(4)] == [False, True, True, False]
    assert torch.equal(images[9], turned) and torch.equal(images[10], turned)
    if which == "dali":   # caught before any pipeline
        assert set(loader_dali._precheck(paths, np.arange(len(paths)), PreprocessSpec(SIZE))) == {4, 5, 8}


def test_the_jpeg_marker_walk_seeks_past_large_header_segments(tmp_path, monkeypatch):
    """The walk over a JPEG's header markers read every byte of the segments into one
    growing buffer: 1.2 s (quadratic copying) and 16 MB of memory for a JPEG with 16 MB of
    APP segments (extended XMP, say).  It reads a block at each marker now, and its verdicts
    stay the same."""
    import struct

    from spurfast.data import preprocess

    plain = _jpeg_bytes(_picture(6, 20, 24))
    seg = b"\xff\xe2" + struct.pack(">H", 65535) + b"x" * 65533
    sos = plain.find(b"\xff\xda")
    files = {"big.jpg": plain[:2] + seg * 64 + plain[2:],
             "big_stray.jpg": plain[:2] + seg * 64 + plain[2:sos] + b"\x12\x34" + plain[sos:]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    read = []

    class Counting(io.FileIO):
        def read(self, n=-1):
            out = super().read(n)
            read.append(len(out))
            return out

    monkeypatch.setattr(preprocess, "open", lambda path, mode: Counting(path, mode), raising=False)
    assert preprocess._jpeg_marker_error(str(tmp_path / "big.jpg")) is None
    assert sum(read) < len(files["big.jpg"]) // 2
    stray = len(files["big_stray.jpg"]) - len(plain) + sos - 2
    assert preprocess._jpeg_marker_error(str(tmp_path / "big_stray.jpg")) == \
        f"with stray bytes where a marker belongs (byte {stray}: 12 34)"


def test_an_image_with_data_after_its_end_marker_is_not_decoded_by_the_pre_check(tmp_path, monkeypatch):
    """A JPEG or PNG with over 1 KiB after its end marker (a phone's trailer, an MPO's second
    image) was "suspect", so DALI's pre-check decoded it whole with PIL (250 ms for a 12 MP
    JPEG, 370 ms for a PNG, on its one thread) before DALI decoded it again.  A JPEG's scans
    are walked to its end marker now, and a PNG's IEND is found whole by the chunk checks; a
    JPEG cut short stays suspect, also where its EXIF thumbnail holds an end marker or another
    whole JPEG follows the cut, and so does one with a scan spliced in (PIL refuses it)."""
    from spurfast.data import loader_dali as dali_mod

    pic = _picture(7, 40, 56)
    plain, prog, png = _jpeg_bytes(pic), _jpeg_bytes(pic, progressive=True), _png_bytes(pic)
    thumb = _jpeg_bytes(pic[:8, :8])
    app1 = b"\xff\xe1" + (len(thumb) + 8).to_bytes(2, "big") + b"Exif\x00\x00" + thumb
    with_thumb = plain[:2] + app1 + plain[2:]
    big = _jpeg_bytes(_picture(3, 200, 240))
    big_with_thumb = big[:2] + app1 + big[2:]
    files = {"trailer.jpg": plain + b"\x00" * 3000,
             "prog_trailer.jpg": prog + bytes(range(256)) * 12,
             "second_image.jpg": plain + _jpeg_bytes(pic[::-1]) + b"\x00" * 2000,
             "fill_bytes.jpg": plain[:-2] + b"\xff\xff\xff\xd9" + b"\x01" * 2000,
             "trailer.png": png + bytes(range(256)) * 12,
             "second_image.png": png + _png_bytes(pic[::-1]),
             "cut.jpg": plain[:len(plain) // 2],
             "prog_cut.jpg": prog[:len(prog) * 2 // 3],
             "thumb_cut.jpg": with_thumb[:-200],
             # cut within 1 KiB after the thumbnail: its end marker sat in the tail the cheap
             # check reads, which passed the file, and DALI failed a pipeline on it
             "cut_after_thumb.jpg": big_with_thumb[:2 + len(app1) + 900],
             "cut_then_image.jpg": plain[:len(plain) // 2] + _jpeg_bytes(pic[::-1]) + b"\x00" * 2000,
             "second_scan.jpg": plain[:-2] + plain[plain.find(b"\xff\xda"):] + b"\x00" * 2000}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    verdicts = {name: validate_image_file(str(tmp_path / name))[0] for name in files}
    assert verdicts == {**{name: "ok" for name in list(files)[:6]},
                        **{name: "suspect" for name in list(files)[6:]}}
    decoded = []
    real = dali_mod.load_image_uint8
    monkeypatch.setattr(dali_mod, "load_image_uint8", lambda p, s: decoded.append(p) or real(p, s))
    paths = [str(tmp_path / name) for name in files]
    bad = dali_mod._precheck(paths, np.arange(len(paths)), PreprocessSpec(SIZE, 3))
    assert sorted(decoded) == sorted(paths[6:])
    assert sorted(bad) == [6, 7, 8, 9, 10, 11]
    for which in ["torch"] + ["dali"] * HAS_DALI:
        _, _, ok, _ = _run(which, paths)
        assert ok.tolist() == [True] * 6 + [False] * 6, which


@pytest.mark.parametrize("which", _loaders())
def test_chunks_opencvs_png_reader_refuses_are_bad_for_both_loaders(tmp_path, which):
    """DALI's PNG decoder reads the chunks before the image data, and an animation's up to its
    first frame's end, with OpenCV's chunk reader, which refuses a bKGD chunk not of 1, 2 or
    6 bytes, an fcTL chunk not of 26 bytes or with a dispose op over 2 or a blend op over 1, a
    next frame outside the image, and other chunks over 8 MB (tEXt and a few others
    excepted); PIL decodes them all (measured, DALI 2.4): the torch loader called them good."""
    import struct

    arr = _picture(4, 24, 24)
    _, chunk = _png_with_chunks(arr)

    def fctl(seq, w=24, x=0, dop=0, bop=0, extra=b""):
        return chunk(b"fcTL", struct.pack(">IIIIIHHBB", seq, w, 24, x, 0, 1, 10, dop, bop) + extra)

    raw = b"".join(b"\x00" + arr[::-1][r].tobytes() for r in range(24))
    actl2 = chunk(b"acTL", struct.pack(">II", 2, 0))
    second = chunk(b"fdAT", struct.pack(">I", 2) + __import__("zlib").compress(raw))
    big = b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + b"x" * (8_000_000 - 12 - 22)
    files = {"a_bkgd_5.png": dict(before_idat=chunk(b"bKGD", bytes(5))),
             "b_bkgd_0.png": dict(before_idat=chunk(b"bKGD", b"")),
             "c_fctl_27.png": dict(before_idat=chunk(b"acTL", struct.pack(">II", 1, 0)) + fctl(0, extra=b"\x00")),
             "d_fctl_dispose_3.png": dict(before_idat=chunk(b"acTL", struct.pack(">II", 1, 0)) + fctl(0, dop=3)),
             "e_next_frame_outside.png": dict(before_idat=actl2 + fctl(0), after_idat=fctl(1, x=1) + second),
             "f_next_fctl_27.png": dict(before_idat=actl2 + fctl(0), after_idat=fctl(1, extra=b"\x00") + second),
             "g_itxt_over_8mb.png": dict(before_idat=chunk(b"iTXt", big + b"x")),
             "h_bkgd_1.png": dict(before_idat=chunk(b"bKGD", b"\x07")),   # the wrong size for RGB, and fine
             "i_bkgd_5_after.png": dict(after_idat=chunk(b"bKGD", bytes(5))),
             "j_itxt_8mb.png": dict(before_idat=chunk(b"iTXt", big)),
             "k_itxt_over_8mb_after.png": dict(after_idat=chunk(b"iTXt", big + b"x")),
             "l_animation.png": dict(before_idat=actl2 + fctl(0), after_idat=fctl(1) + second
                                     + chunk(b"bKGD", bytes(5)))}
    for name, kw in files.items():
        (tmp_path / name).write_bytes(_png_with_chunks(arr, **kw)[0])
    paths = sorted(str(p) for p in tmp_path.iterdir())
    idx, images, ok, bad = _run(which, paths)
    assert ok.tolist() == [False] * 7 + [True] * 5
    expected = ["bKGD chunk of 5 bytes (1, 2 or 6 expected)", "bKGD chunk of 0 bytes (1, 2 or 6 expected)",
                "fcTL chunk of 27 bytes (26 expected)", "fcTL chunk of dispose op 3 and blend op 0 (at most 2 and 1 "
                "expected)", "fcTL chunk of a frame outside the image", "fcTL chunk of 27 bytes (26 expected)",
                "'iTXt' chunk of 7,999,989 bytes where DALI's decoder reads at most 7,999,988"]
    assert bad == {i: f"PNG with a{'n' * why.startswith('fcTL')} {why} (libpng, DALI's decoder, refuses it; PIL "
                      f"would decode it)" for i, why in enumerate(expected)}


@pytest.mark.parametrize("which", _loaders())
def test_an_animation_whose_first_frame_is_narrower_than_the_image_is_bad_for_both_loaders(tmp_path, which):
    """An animation whose first frame (its default image) is narrower than the image: PIL's
    decode ends in a data-stream error, DALI's decoder puts the image data in the frame
    (measured, DALI 2.4): torch bad, DALI good.  A lower first frame, or one of a single-frame
    file, both decode."""
    import struct

    arr = _picture(5, 24, 24)
    _, chunk = _png_with_chunks(arr)

    def apng(w, h, x, y, n=2):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", save_all=True,
                                  append_images=[Image.fromarray(arr[::-1])] * (n - 1))
        data, at, out, first = buf.getvalue(), 8, [], True
        while at < len(data):
            k = struct.unpack(">I", data[at:at + 4])[0]
            kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + k]
            if kind == b"fcTL" and first:
                body, first = body[:4] + struct.pack(">IIII", w, h, x, y) + body[20:], False
            out.append(chunk(kind, body))
            at += 12 + k
        return data[:8] + b"".join(out)

    files = {"a_narrow.png": apng(10, 24, 0, 0), "b_narrow_offset.png": apng(19, 24, 5, 0),
             "c_lower.png": apng(24, 19, 0, 5), "d_narrow_one_frame.png": apng(10, 24, 0, 0, n=1),
             "e_whole.png": apng(24, 24, 0, 0)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = sorted(str(p) for p in tmp_path.iterdir())
    idx, images, ok, bad = _run(which, paths)
    assert ok.tolist() == [False, False, True, True, True]
    why = ("PNG animation whose first frame, its default image, is narrower than the image (PIL cannot decode it, "
           "DALI decodes it)")
    assert bad == {0: why, 1: why}


@pytest.mark.filterwarnings("ignore:Truncated File Read:UserWarning")   # PIL's own EXIF read at open
@pytest.mark.parametrize("which", _loaders())
def test_a_later_exif_segment_of_no_turn_undoes_the_first_ones_turn(tmp_path, which):
    """Of a JPEG's several Exif APP1 segments, DALI's decoder turns by the first orientation
    read, unless the last segment read whole with an orientation has one other than 2-8:
    then it does not turn.  The torch loader stopped at the first segment read whole and
    turned 6-then-1 and 6-then-9 (measured, DALI 2.4)."""
    import struct

    y, x = np.mgrid[0:24, 0:24]
    arr = np.stack([x * 10, y * 10, np.zeros_like(x)], -1).astype(np.uint8)   # every turn differs
    plain = _jpeg_bytes(arr)

    def jpeg(*blocks):
        segs = b"".join(b"\xff\xe1" + struct.pack(">H", len(b) + 8) + b"Exif\0\0" + b for b in blocks)
        return plain[:2] + segs + plain[2:]

    def orient(o):
        return _tiff([(0x0112, 3, 1, o)], b"MM")

    broken6 = _tiff([(0x0112, 3, 1, 6), (0x010F, 2, 20, 5000)], b"MM")   # 6, then an entry off the block
    make = _tiff([(0x010F, 3, 1, 6)], b"MM")
    cases = {"a_6_then_1": (jpeg(orient(6), orient(1)), 1), "b_6_then_9": (jpeg(orient(6), orient(9)), 1),
             "c_broken6_then_1": (jpeg(broken6, orient(1)), 1), "d_broken6_then_8_then_1": (jpeg(broken6, orient(8),
                                                                                                 orient(1)), 1),
             "e_broken6_then_1_then_8": (jpeg(broken6, orient(1), orient(8)), 6),
             "f_6_then_make": (jpeg(orient(6), make), 6), "g_1_then_6": (jpeg(orient(1), orient(6)), 1),
             "h_broken3_then_6": (jpeg(_tiff([(0x0112, 3, 1, 3), (0x010F, 2, 20, 5000)], b"MM"), orient(6)), 3)}
    names = []
    for o in (1, 3, 6):
        (tmp_path / f"ref{o}.jpg").write_bytes(jpeg(orient(o)))
        names.append(f"ref{o}.jpg")
    for name, (data, _) in cases.items():
        (tmp_path / f"{name}.jpg").write_bytes(data)
        names.append(f"{name}.jpg")
    idx, images, ok, bad = _run(which, [str(tmp_path / n) for n in names])
    assert ok.all() and not bad
    got = {n: images[k] for k, n in enumerate(names)}
    for name, (_, turn) in cases.items():
        assert torch.equal(got[f"{name}.jpg"], got[f"ref{turn}.jpg"]), name


def test_indices_past_int64_or_not_integers_are_named():
    """Python ints past int64 (an object array) raised numpy's bare "Python int too large to
    convert to C long"; strings were cast ("1" read as index 1), ragged lists named nothing."""
    for bad in ([2**64], [0, 2**70], [-2**70]):
        with pytest.raises(IndexError, match=r"indices must lie in \[0, 10\); got range"):
            folder_mod.select_indices(10, indices=bad)
    with pytest.raises(ValueError, match="integer pool indices, got dtype <U1"):
        folder_mod.select_indices(10, indices=["1"])
    with pytest.raises(ValueError, match="indices must be a flat sequence"):
        folder_mod.select_indices(10, indices=[[1, 2], [3]])
    assert folder_mod.select_indices(10, indices=np.array([np.int64(2), 3], dtype=object)).tolist() == [2, 3]


def test_a_fractional_start_or_shard_is_refused_by_name():
    """start=2.5 streamed from pool index 2 without a word; a float shard_id or num_shards
    failed with numpy's "slice indices must be integers"."""
    for kw, what in ((dict(start=2.5), "start"), (dict(shard_id=0.5, num_shards=2), "shard_id"),
                     (dict(num_shards=2.0), "num_shards")):
        with pytest.raises(TypeError, match=f"{what} must be an integer, got"):
            folder_mod.select_indices(10, **kw)
    assert folder_mod.select_indices(10, start=np.int32(2), shard_id=np.int64(1), num_shards=2).tolist() == [3, 5, 7, 9]


@pytest.mark.parametrize("which", _loaders())
def test_a_cmyk_jpeg_without_adobes_marker_is_bad_for_both_loaders(tmp_path, which):
    """DALI's decoder gave a CMYK JPEG without Adobe's APP14 marker all black, marked good
    (PIL decodes it): one latent 0.42 away from the torch loader's run, nothing listed.  Both
    loaders now list it, as they do other files DALI cannot read as PIL does; with the marker
    it decodes (the CMYK file of the folder above)."""
    import struct

    buf = io.BytesIO()
    Image.fromarray(_picture(3)).convert("CMYK").save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    k = data.find(b"\xff\xee")   # Pillow writes Adobe's APP14 for CMYK
    assert k > 0
    (tmp_path / "a_marked.jpg").write_bytes(data)
    (tmp_path / "b_unmarked.jpg").write_bytes(data[:k] + data[k + 2 + struct.unpack(">H", data[k + 2:k + 4])[0]:])
    paths = [str(tmp_path / "a_marked.jpg"), str(tmp_path / "b_unmarked.jpg")]
    assert validate_image_file(paths[0])[0] == "ok"
    verdict, why = validate_image_file(paths[1])
    assert (verdict, why) == ("bad", "JPEG of 4 components (CMYK) without an Adobe APP14 marker (DALI decodes it "
                                     "all black, PIL decodes it)")
    idx, images, ok, bad = _run(which, paths)
    assert ok.tolist() == [True, False] and set(bad) == {1} and bad[1] == why
    assert float(images[0].float().mean()) > 0.1


@needs_dali
def test_dalis_reason_for_a_file_of_a_non_utf8_name_names_the_file(tmp_path):
    """DALI reads such a file through a link in a private folder, and its words named the
    link (".../spurfast-dali-PID/alias-0.img", gone at exit) as the reason for the file."""
    import os
    import zlib

    rows = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    whole, chunk = _png_with_chunks(rows)
    z = zlib.compress(b"".join(b"\0" + r.tobytes() for r in rows))
    at = whole.index(b"IDAT") - 4   # the IDAT chunk, its length first
    png = whole[:at] + chunk(b"IDAT", z[:len(z) // 2]) + chunk(b"IEND", b"")   # image data cut: DALI refuses it
    name = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")
    with open(name, "wb") as fh:
        fh.write(png)
    _, _, ok, bad = _run("dali", [os.fsdecode(name)])
    assert not bool(ok[0])
    assert "alias-" not in bad[0] and f"{tmp_path}/caf\\xe9.png" in bad[0], bad[0]


@pytest.mark.parametrize("which", [*_loaders(), "source"])
def test_a_skipped_file_of_a_non_utf8_name_is_logged_as_the_report_spells_it(tmp_path, which, caplog):
    """The warning showed the name's surrogate escape (q\\udcff.png) where bad_files.json, the
    report and the VAE's training log write q\\xff.png."""
    import os

    name = os.path.join(os.fsencode(tmp_path), b"q\xff.png")
    open(name, "wb").close()   # empty: unreadable
    path = os.fsdecode(name)
    with caplog.at_level("WARNING", logger="spurfast.data"):
        if which == "source":
            (tmp_path / "b.png").write_bytes(_png_bytes(_picture(1, 20, 20)))
            src = ImageFolderSource(tmp_path, size=SIZE)
            src.load(src.paths.index(path))
        else:
            _run(which, [path])
    assert f"skipping unreadable image {tmp_path}/q\\xff.png" in caplog.text
    assert "\udcff" not in caplog.text


def test_an_unreadable_files_name_is_one_line_of_the_log(caplog):
    # a newline (or an escape sequence) in a file name broke the warning into lines that read as
    # more log lines
    with caplog.at_level("WARNING", logger="spurfast.data"):
        folder_mod.warn_unreadable("/pool/a\nWARNING fake\x1b[31m\u00e9.png", "damaged")
    assert caplog.messages == ["skipping unreadable image /pool/a\\x0aWARNING fake\\x1b[31m\u00e9.png (damaged)"]


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_pathlib_paths_with_an_unreadable_file_are_named_not_a_crash(bad_folder, backend, caplog):
    # the torch loader decoded pathlib paths but died on the first bad one (its warning called
    # .encode() on the path); DALI's turned them into str first
    import importlib

    loader = importlib.import_module(f"spurfast.data.loader_{backend}")
    paths, expected_bad = bad_folder
    bad = {}
    with caplog.at_level("WARNING", logger="spurfast.data"):
        got = [ok for _, _, ok in loader.iter_folder_batches([Path(p) for p in paths], size=SIZE, batch_size=7,
                                                             num_threads=1, bad_files=bad)]
    assert {paths[i].rsplit("/", 1)[1] for i in bad} == expected_bad
    assert int((~torch.cat(got)).sum()) == len(expected_bad)
    assert caplog.text.count("skipping unreadable image") == len(expected_bad), caplog.text


@pytest.mark.parametrize("channels", [3.0, True, np.float64(1)])
def test_channels_not_a_whole_number_is_refused_at_once(channels):
    # 3.0 (and True, a 1) passed `in (1, 3)` and failed at the first bad file with a TypeError
    # naming neither the setting nor the input
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        PreprocessSpec(16, channels)
    assert PreprocessSpec(16, np.int64(3)).channels == 3
