"""A stamp's own pixels (`spurfast.stamp`) on hand-made images with known stamps."""
import numpy as np
import pytest
from PIL import Image

from spurfast.data.sources import ArraySource
from spurfast.discover import redraw_stamp_masks, save_mask_image
from spurfast.stamp import SHIFTED, Stamp, separating_pixels, stamp_masks, take_stamp


def _sides(rng, n=200):
    carriers = rng.uniform(0, 0.5, (n, 1, 6, 6))
    others = rng.uniform(0, 0.5, (n, 1, 6, 6))
    return carriers, others


def test_the_pixels_a_stamp_sets_separate_its_carriers_bright_or_dark():
    rng = np.random.default_rng(0)
    carriers, others = _sides(rng)
    carriers[:, 0, 0, 0] = 1.0           # a white stamp on a dark image
    carriers[:, 0, 3, 4] = -1.0          # and a dark one
    got = separating_pixels(carriers, others)
    assert np.argwhere(got).tolist() == [[0, 0], [3, 4]]


def test_ties_count_half_at_the_auroc_bound():
    """Others that hold the stamp's value too are ties, each half a win: 50 of 100 others at the
    value give AUROC 0.75, a stamp pixel; 51 give 0.745, not one; a content pixel no side
    shifts sits near 0.5."""
    assert SHIFTED == 0.75
    carriers, others = np.zeros((50, 1, 2, 2)), np.zeros((100, 1, 2, 2))
    carriers[:, 0, 0, 0] = carriers[:, 0, 1, 1] = 1.0
    others[:50, 0, 0, 0] = 1.0
    others[:51, 0, 1, 1] = 1.0
    rng = np.random.default_rng(3)
    carriers[:, 0, 0, 1], others[:, 0, 0, 1] = rng.uniform(size=50), rng.uniform(size=100)
    assert separating_pixels(carriers, others).tolist() == [[True, False], [False, False]]


def test_any_channel_and_an_empty_side():
    import warnings

    carriers, others = np.zeros((10, 3, 2, 2)), np.zeros((10, 3, 2, 2))
    carriers[:, 2, 1, 0] = 1.0            # blue only
    assert np.argwhere(separating_pixels(carriers, others)).tolist() == [[1, 0]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")    # no 0 / 0
        none = separating_pixels(carriers[:0], others)
    assert not none.any() and none.shape == (2, 2)


def test_stamp_masks_read_each_side_and_leave_out_unreadable_images(tmp_path):
    """A pixel stamp at (1, 2) on 40 carriers of 120 PNGs; 15 carriers' files are damaged and
    read as all zeros: counted, they would rank below every other image there, and the pixel's
    AUROC of 25 / 40 would miss the stamp."""
    from spurfast.data.folder import ImageFolderSource

    rng = np.random.default_rng(1)
    x = rng.uniform(0.2, 0.6, (120, 5, 5))
    carriers, others = np.arange(40), np.arange(40, 120)
    x[carriers, 1, 2] = 1.0
    for i in range(120):
        Image.fromarray((x[i] * 255).astype(np.uint8)).save(tmp_path / f"{i:03d}.png")
    for i in [*range(15), *range(40, 85)]:   # and 45 of the 80 others: counted, every pixel would separate
        (tmp_path / f"{i:03d}.png").write_bytes(b"damaged")
    src = ImageFolderSource(tmp_path, size=5, channels=1)
    kw = dict(localised=0.1, batch_size=16, progress=False, num_workers=0, loader_backend="torch", device="cpu")
    got, = stamp_masks([(carriers, others)], src, **kw)
    assert np.argwhere(got.mask).tolist() == [[1, 2]]
    # the means of the readable images alone, as the files hold them
    readable_c, readable_o = carriers[15:], np.setdiff1d(others, np.arange(40, 85))
    for mean, rows in ((got.carriers_mean, readable_c), (got.others_mean, readable_o)):
        np.testing.assert_allclose(mean[0], (x[rows] * 255).astype(np.uint8).mean(0) / 255, atol=1e-6)
    none, = stamp_masks([(others[45:60], others[60:])], src, **kw)   # no stamp between two sets of others
    assert none is None
    empty = np.zeros(0, np.int64)
    assert stamp_masks([(empty, empty)], src, **kw) == [None]           # no image a side: no stamp


def test_a_separating_set_beyond_the_localised_share_is_no_stamp():
    x = np.zeros((60, 1, 4, 4), np.float32)
    x[:20] = 1.0                                   # the carriers differ in every pixel
    kw = dict(batch_size=16, progress=False, num_workers=0, loader_backend=None, device=None)
    src = ArraySource(x, np.zeros(60, int), name="bright carriers")
    assert stamp_masks([(np.arange(20), np.arange(20, 60))], src, localised=0.5, **kw) == [None]
    got, = stamp_masks([(np.arange(20), np.arange(20, 60))], src, localised=1.0, **kw)
    assert got.mask.all()


def test_only_stamped_findings_masks_are_drawn_again(tmp_path):
    old, new = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    old[2:6, 2:6] = True
    new[1, 1] = True
    for rank in (1, 2):
        save_mask_image(tmp_path, rank, old)
    findings = [{"rank": 1, "ranked_by": "latent+pattern+stamp", "_mask": new},
                {"rank": 2, "ranked_by": "latent+pattern", "_mask": new}]
    redraw_stamp_masks(findings, tmp_path)

    def drawn(rank):   # the picture is the mask scaled up: back to one pixel a cell
        picture = Image.open(tmp_path / "images" / f"finding{rank}_mask.png").convert("L")
        return np.asarray(picture.resize((8, 8), Image.NEAREST)) > 127

    np.testing.assert_array_equal(drawn(1), new)
    np.testing.assert_array_equal(drawn(2), old)


def test_masks_are_the_same_whatever_the_pass_and_column_budgets(monkeypatch):
    """Three findings' samples in one pass, or one pass each (a budget below two findings'
    images), and ranked 5 pixel values at a time: the same masks, each pass reading its own."""
    import spurfast.stamp as stamp

    rng = np.random.default_rng(4)
    x = rng.uniform(0, 0.5, (90, 3, 4, 4)).astype(np.float32)
    x[:10, 1, 0, 0] = 1.0
    x[10:20, :, 2, 3] = 1.0
    sides = [(np.arange(10), np.arange(30, 90)), (np.arange(10, 20), np.arange(30, 90)),
             (np.arange(20, 30), np.arange(30, 90))]   # the third: no stamp
    src = ArraySource(x, np.zeros(90, int), name="three stamps")
    kw = dict(localised=0.2, batch_size=16, progress=False, num_workers=0, loader_backend=None, device=None)
    one = stamp_masks(sides, src, **kw)
    assert [np.argwhere(m.mask).tolist() if m is not None else None for m in one] == [[[0, 0]], [[2, 3]], None]
    passes = []
    real = stamp.image_pass
    monkeypatch.setattr(stamp, "image_pass", lambda source, idx, *a: (passes.append(len(idx)), real(source, idx, *a)))
    monkeypatch.setattr(stamp, "COLUMNS", 5)
    for budget, reads in [(100, [70, 70, 70]),   # images of 3 x 4 x 4 bytes: one finding's 70 a pass
                          (140, [80, 70]),       # two findings' 140 (their others shared: 80 read), then one
                          (1, [70, 70, 70])]:    # below one finding's: still one a pass
        passes.clear()
        monkeypatch.setattr(stamp, "PASS_BYTES", budget * 48)
        each = stamp_masks(sides, src, **kw)
        assert passes == reads, budget
        assert all((a is None and b is None) or all((u == v).all() for u, v in zip(a, b)) for a, b in zip(one, each))


def test_a_stamp_becomes_the_findings_pattern_inside_its_mask_only():
    """Inside the stamp the contrast is the carriers' mean minus the others' (what confirmation
    adds) and the pattern the carriers' mean (what it pastes); outside, the cluster's stay."""
    import torch

    mask = np.zeros((3, 3), bool)
    mask[0, 1] = True
    carriers_mean, others_mean = np.full((1, 3, 3), 0.9), np.full((1, 3, 3), 0.1)
    f = {"_mask": np.ones((3, 3), bool), "_contrast": torch.full((1, 3, 3), 0.25),
         "_pattern": torch.full((1, 3, 3), 0.5)}
    take_stamp(f, Stamp(mask, carriers_mean, others_mean))
    assert (f["_mask"] == mask).all()
    expected_contrast, expected_pattern = np.full((1, 3, 3), 0.25), np.full((1, 3, 3), 0.5)
    expected_contrast[0, 0, 1], expected_pattern[0, 0, 1] = 0.8, 0.9
    np.testing.assert_allclose(f["_contrast"].numpy(), expected_contrast, rtol=1e-6)
    np.testing.assert_allclose(f["_pattern"].numpy(), expected_pattern, rtol=1e-6)
    g = {"_mask": mask, "_contrast": torch.zeros(1, 3, 3)}   # no members' mean (a residual finding's): none made
    take_stamp(g, Stamp(mask, carriers_mean, others_mean))
    assert "_pattern" not in g and g["_contrast"][0, 0, 1] == pytest.approx(0.8)
