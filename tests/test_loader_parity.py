"""DALI (CPU) vs torch loader: the same preprocessing, measured difference, bounded.

Both loaders implement the one definition in spurfast/data/preprocess.py; what can still
differ is the JPEG decoder (both libjpeg-turbo; measured bit-identical on these images)
and the antialiased-bilinear resampler's rounding.  At the image's border PIL renormalises
the filter weights where DALI clamps to the edge pixel; the torch loader resamples a window
whose edge pixels are repeated (``preprocess._edge_clamped_window``), so they agree there
too (before, a 1-pixel white frame came out 59/255 apart at size 16; this set's border up
to 21/255).  Measured on this generated set (DALI 2.4.0, Pillow 13.0, sizes 64/224, RGB and
grey, JPEG 4:4:4/4:2:0 and PNG): at most 1/255 anywhere (uint8 rounding).  Bounds: max
2/255, mean 0.5/255, 99.5% within one level.

Which files are bad is decided for both loaders by one pre-check
(``preprocess.validate_image_file``: PIL open + verify), so corrupt headers, PNG chunk
CRCs and PIL's pixel limit give the same ok flags (tests/test_bad_files.py).  One known
disagreement is left, because finding it takes a full decode: a JPEG whose entropy-coded
*scan data* is damaged (headers intact).  PIL's decoder stops with "broken data stream"
(torch: ok=False), DALI's libjpeg-turbo only warns ("Unsupported marker type") and
returns an image with garbage blocks (DALI: ok=True).  Pinned by
``test_known_difference_damaged_jpeg_scan`` (xfail, strict: it fails once they agree).

One known pixel difference is left, because Pillow cannot do otherwise: 16-bit colour
PNGs (RGB, RGBA, grey + alpha).  PIL keeps the high byte (``v >> 8``), DALI rounds
(``(v + 128) // 257``, as the torch path does for 16-bit grey): at most 1 level apart
before resampling.  Pinned by ``test_known_difference_16bit_colour_png`` (xfail, strict).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="nvidia.dali is not importable")

from spurfast.data import loader_dali, loader_torch  # noqa: E402
from tests.helpers import assert_equal_int  # noqa: E402

MAX_ABS = 2 / 255         # anywhere, the border too
MEAN_ABS = 0.5 / 255
WITHIN_ONE_LEVEL = 0.995
# Not bounded by these numbers: ok flags on a JPEG with damaged scan data differ (torch
# bad, DALI decodes it); see the module docstring and test_known_difference_damaged_jpeg_scan.

SHAPES = [(375, 500), (500, 375), (333, 500), (480, 640), (256, 256), (120, 97), (40, 50), (64, 63), (301, 37)]


def _picture(rng, h, w):
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = rng.uniform(0, 255, 3) * (1 - y[..., None] / h) + rng.uniform(0, 255, 3) * (y[..., None] / h)
    for _ in range(4):
        cy, cx, ry, rx = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(5, h / 2), rng.uniform(5, w / 2)
        m = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
        img[m] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module", params=["jpeg", "png"])
def folder(request, tmp_path_factory):
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp(request.param)
    paths = []
    for k in range(2):
        for i, (h, w) in enumerate(SHAPES):
            arr = _picture(rng, h, w)
            p = root / f"{k}_{i:02d}.{'jpg' if request.param == 'jpeg' else 'png'}"
            if request.param == "jpeg":
                Image.fromarray(arr).save(p, quality=90, subsampling=k * 2)  # 4:4:4 and 4:2:0
            else:
                Image.fromarray(arr).save(p)
            paths.append(str(p))
    return request.param, sorted(paths)


def _load(mod, paths, **kw):
    out = list(mod.iter_folder_batches(paths, batch_size=7, num_threads=2, **kw))
    return torch.cat([b[0] for b in out]), torch.cat([b[1] for b in out]), torch.cat([b[2] for b in out])


@pytest.mark.parametrize("size,channels", [(64, 3), (224, 3), (64, 1)])
def test_dali_cpu_matches_torch_loader(folder, size, channels):
    fmt, paths = folder
    t_idx, t_img, t_ok = _load(loader_torch, paths, size=size, channels=channels)
    d_idx, d_img, d_ok = _load(loader_dali, paths, size=size, channels=channels, device="cpu")
    assert_equal_int(d_idx, t_idx, "pool indices, DALI vs torch loader")
    assert bool(t_ok.all()) and bool(d_ok.all())
    assert t_img.shape == d_img.shape == (len(paths), channels, size, size)
    err = (t_img - d_img).abs()
    levels = (err * 255).round()
    max_e, mean_e, within = float(err.max()), float(err.mean()), float((levels <= 1).float().mean())
    per_img = err.flatten(1).max(1).values
    worst = int(per_img.argmax())
    print(f"\n[parity {fmt} size={size} C={channels}] max |DALI - torch| = {max_e:.4f} ({max_e * 255:.1f}/255), "
          f"mean = {mean_e:.5f} ({mean_e * 255:.2f}/255), within 1 level: {within:.4f}; "
          f"worst image {paths[worst].rsplit('/', 1)[1]}")
    assert max_e <= MAX_ABS, f"max difference {max_e:.4f} over the bound {MAX_ABS:.4f} ({paths[worst]})"
    assert mean_e <= MEAN_ABS, f"mean difference {mean_e:.5f} over the bound {MEAN_ABS:.5f}"
    assert within >= WITHIN_ONE_LEVEL, f"only {within:.4f} of values within one level"


def test_uint8_outputs_are_the_float_outputs_times_255(folder):
    _, paths = folder
    for mod, kw in ((loader_torch, {}), (loader_dali, {"device": "cpu"})):
        _, u8, _ = _load(mod, paths[:5], size=48, dtype=torch.uint8, **kw)
        _, f32, _ = _load(mod, paths[:5], size=48, **kw)
        assert float((u8.float() / 255 - f32).abs().max()) <= 1e-6, mod.__name__


def test_exif_orientation_is_applied_by_both_loaders(tmp_path):
    """A JPEG whose EXIF says "rotate 90 CW" (orientation 6) must come out rotated, the
    same way from both loaders (DALI applies EXIF orientation; the PIL path must too)."""
    rng = np.random.default_rng(3)
    arr = _picture(rng, 80, 80)  # square, so the centre crop keeps every edge
    arr[:, :20] = (255, 0, 0)  # a red band on the left edge of the stored picture
    exif = Image.Exif()
    exif[0x0112] = 6
    plain, rotated = tmp_path / "a_plain.jpg", tmp_path / "b_rotated.jpg"
    Image.fromarray(arr).save(plain, quality=95)
    Image.fromarray(arr).save(rotated, quality=95, exif=exif.tobytes())
    paths = [str(plain), str(rotated)]
    _, t_img, _ = _load(loader_torch, paths, size=32)
    _, d_img, _ = _load(loader_dali, paths, size=32, device="cpu")
    assert float((t_img - d_img).abs().max()) <= MAX_ABS
    # Orientation 6 displays the stored image rotated 90 degrees clockwise: the stored
    # left edge becomes the top edge.
    for img in (t_img, d_img):
        assert float(img[1, 0, :3, :].mean()) > 0.8 and float(img[1, 1, :3, :].mean()) < 0.2, "red band on top"
        assert float(img[0, 0, :, :3].mean()) > 0.8, "plain copy keeps the band on the left"


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="known: damaged JPEG scan data -- PIL fails ('broken data stream'), "
                          "DALI's libjpeg-turbo decodes with a warning; only a full decode tells")
def test_known_difference_damaged_jpeg_scan(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "scan_damaged.jpg"
    Image.fromarray(_picture(rng, 60, 80)).save(path, quality=90)
    buf = bytearray(path.read_bytes())
    sos = buf.find(b"\xff\xda")
    for k in range(sos + 200, sos + 240):  # inside the scan; never creates or breaks an 0xFF
        if buf[k] != 0xFF and buf[k] ^ 0x5A != 0xFF:
            buf[k] ^= 0x5A
    path.write_bytes(bytes(buf))
    paths = [str(path)]
    bad = {}
    _, _, t_ok = _load(loader_torch, paths, size=32, bad_files=bad)
    _, _, d_ok = _load(loader_dali, paths, size=32, device="cpu")
    if t_ok.tolist() != [False] or "broken data stream" not in bad.get(0, ""):
        pytest.fail(f"the documented difference changed: torch ok={t_ok.tolist()}, {bad}")  # not an xfail
    assert t_ok.tolist() == d_ok.tolist()


def _png16(path, arr):
    """A 16-bit PNG of ``arr`` (H, W, C) uint16, C = 1..4 (Pillow cannot write 16-bit colour)."""
    import struct
    import zlib

    h, w, c = arr.shape
    raw = b"".join(b"\0" + arr[r].astype(">u2").tobytes() for r in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="known: 16-bit colour PNG -- PIL keeps the high byte, DALI rounds (<= 1 level)")
def test_known_difference_16bit_colour_png(tmp_path):
    v = np.random.default_rng(0).integers(0, 65536, (32, 32, 3)).astype(np.uint16)
    _png16(tmp_path / "rgb16.png", v)
    paths = [str(tmp_path / "rgb16.png")]
    _, t_img, _ = _load(loader_torch, paths, size=32, dtype=torch.uint8)   # same size: no resampling
    _, d_img, _ = _load(loader_dali, paths, size=32, dtype=torch.uint8, device="cpu")
    t, d = t_img[0].permute(1, 2, 0).numpy(), d_img[0].permute(1, 2, 0).numpy()
    if not (np.array_equal(t, v >> 8) and np.array_equal(d, (v.astype(np.int64) + 128) // 257)):
        pytest.fail("the documented difference changed: torch is not v >> 8 or DALI is not round(v / 257)")
    assert np.array_equal(t, d)


def test_extreme_strips_are_cropped_where_the_torch_loader_crops_them(tmp_path):
    """DALI's crop window of a strip came from ``2 * h * size`` in INT32, which overflowed for
    a 1 x 1,000,000 PNG at size 1100 (a wrong crop, 180 levels from the torch loader), and
    from float32 ROI arithmetic, which put a 3 x 999,999 strip's crop at size 700 8 levels off
    (resized lengths past 2**24)."""
    paths, sizes = [], []
    for w, h, size in ((1, 1_000_000, 1100), (3, 999_999, 700)):
        ramp = (np.arange(h, dtype=np.int64) * 97 % 256).astype(np.uint8)   # changes every pixel
        arr = np.stack([ramp, ramp[::-1], ramp // 2], -1)[:, None, :].repeat(w, 1)
        paths.append(str(tmp_path / f"strip_{w}.png"))
        Image.fromarray(arr).save(paths[-1], compress_level=1)
        sizes.append(size)
    for path, size in zip(paths, sizes):
        _, t_img, t_ok = _load(loader_torch, [path], size=size, dtype=torch.uint8)
        _, d_img, d_ok = _load(loader_dali, [path], size=size, dtype=torch.uint8, device="cpu")
        assert bool(t_ok.all()) and bool(d_ok.all())
        assert int((t_img.int() - d_img.int()).abs().max()) <= 1, (path, size)


@pytest.mark.parametrize("size", [16, 64, 224])
def test_a_thin_frame_at_the_border_comes_out_alike(tmp_path, size):
    """PIL's filter renormalises at the image's border, DALI's clamps to the edge pixel: a
    1-pixel white frame on a black 1000 px image came out 59/255 apart at size 16 (the
    corner 4 against 63), 42/255 at 224 (a scan's or a screenshot's frame)."""
    arr = np.zeros((1000, 750, 3), np.uint8)
    arr[0] = arr[-1] = arr[:, 0] = arr[:, -1] = 255
    path = tmp_path / "frame.png"
    Image.fromarray(arr).save(path)
    _, t_img, _ = _load(loader_torch, [str(path)], size=size, dtype=torch.uint8)
    _, d_img, _ = _load(loader_dali, [str(path)], size=size, dtype=torch.uint8, device="cpu")
    assert int(t_img[0, 0, 0, 0]) > 8, "the frame shows in the corner"
    assert int((t_img.int() - d_img.int()).abs().max()) <= 1


@pytest.mark.parametrize("shape", [(1, 1), (1, 1, 3), (5, 7), (5, 7, 3), (1, 9), (9, 1, 3), (40, 23, 3)])
def test_the_window_is_padded_as_numpys_edge_mode(shape):
    # PIL crops and pastes in place of np.pad (70 us of the torch loader's 0.5 ms an image):
    # the same pixels for grey and colour images, any side padded or none
    import math

    from spurfast.data.preprocess import _edge_clamped_window

    a = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    h, w = a.shape[:2]
    im = Image.fromarray(a)
    for box in ((0, 0, w, h), (0.5, 0.25, w - 0.5, h - 0.75), (w / 3, h / 4, w / 2, h / 2), (0, h / 2, w / 3, h)):
        for reach in (1, 2, 5):
            got, got_box = _edge_clamped_window(im, box, reach)
            x0, y0 = math.floor(box[0]) - reach, math.floor(box[1]) - reach
            x1, y1 = math.ceil(box[2]) + reach, math.ceil(box[3]) + reach
            r = reach + 1
            padded = np.pad(a, ((r, r), (r, r)) + ((0, 0),) * (a.ndim - 2), mode="edge")
            want = padded[y0 + r:y1 + r, x0 + r:x1 + r]
            assert got.mode == im.mode and np.array_equal(np.asarray(got), want), (shape, box, reach)
            assert got_box == (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)
