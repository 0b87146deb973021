import numpy as np
import pytest
import torch

from spurfast.plant import FAMILIES, PatternSpec, apply_pattern, fixed_mask, plant_pool, plant_training


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 17, 23), (2, 9, 9)])
def test_every_family_any_shape(family, shape):
    x = torch.rand((5,) + shape) * 0.05  # dark images: background family has pixels to colour
    spec = PatternSpec(family, color=(0.5,) * shape[0] if family == "background" else None,
                       strength=0.5 if family == "noise" else 1.0)
    y, masks = apply_pattern(x, spec)
    assert y.shape == x.shape and masks.shape == (5,) + shape[1:]
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    changed = (y != x).any(1)
    assert bool(masks.any()), "the pattern owns no pixel"
    assert not bool((changed & ~masks).any()), "pixels changed outside the mask"


def test_patch_geometry_and_value():
    x = torch.zeros(2, 1, 28, 28)
    y, m = apply_pattern(x, PatternSpec("patch3", position="bottom_right", margin=1))
    assert int(m[0].sum()) == 9
    assert torch.equal(y[0, 0, 24:27, 24:27], torch.ones(3, 3))
    assert float(y.sum()) == 18
    y5, m5 = apply_pattern(x, PatternSpec("patch5", position="top_left", margin=0))
    assert torch.equal(m5[0, :5, :5], torch.ones(5, 5, dtype=torch.bool))
    yp, mp = apply_pattern(x, PatternSpec("pixel", position="center"))
    assert int(mp[0].sum()) == 1 and bool(mp[0, 13, 13])


def test_bar_and_background_geometry():
    # the bar's width and the background's darkness threshold were pinned by no test, though the
    # committed evaluation results depend on both
    y, m = apply_pattern(torch.zeros(1, 1, 28, 28), PatternSpec("bar"))   # 14 x 2 at the bottom right, margin 1
    want = torch.zeros(28, 28, dtype=torch.bool)
    want[13:27, 25:27] = True
    assert torch.equal(m[0], want) and torch.equal(y[0, 0] == 1, want)
    x = torch.tensor([0.0, 0.09, 0.1, 0.5]).view(1, 1, 1, 4).expand(1, 3, 1, 4).clone()
    y, m = apply_pattern(x, PatternSpec("background", color=(0.9, 0.2, 0.2)))   # below 0.1 in every channel
    assert m[0, 0].tolist() == [True, True, False, False]
    assert y[0, :, 0, 0].tolist() == pytest.approx([0.9, 0.2, 0.2]) and torch.equal(y[0, :, 0, 2:], x[0, :, 0, 2:])


def test_noise_is_fixed_added_and_clipped():
    x = torch.full((3, 1, 8, 8), 0.9)
    spec = PatternSpec("noise", strength=0.5, seed=4)
    y1, _ = apply_pattern(x, spec)
    y2, _ = apply_pattern(x, spec)
    assert torch.equal(y1, y2) and torch.equal(y1[0], y1[2]), "one fixed noise image, deterministic"
    assert float(y1.max()) == 1.0 and float((y1 - x).min()) >= 0
    y3, _ = apply_pattern(x, PatternSpec("noise", strength=0.5, seed=5))
    assert not torch.equal(y1, y3)


def test_random_position_is_deterministic_by_seed():
    x = torch.zeros(20, 1, 16, 16)
    spec = PatternSpec("patch3", position="random")
    _, a = apply_pattern(x, spec, seed=1)
    _, b = apply_pattern(x, spec, seed=1)
    _, c = apply_pattern(x, spec, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(m.nonzero()[0].tolist()) for m in a}) > 1, "positions vary across images"
    for bad, want in ((-1, "apply_pattern: seed must be >= 0, got -1"),
                      (1.5, "apply_pattern: seed must be an integer")):
        with pytest.raises(ValueError, match=want):   # numpy's SeedSequence errors named no argument
            apply_pattern(x, spec, seed=bad)


def test_plant_training_and_pool_ground_truth():
    x = torch.zeros(100, 1, 12, 12)
    y = np.repeat(np.arange(5), 20)
    xs, idx = plant_training(x, y, target_class=2, n=7, spec=PatternSpec("patch3"), seed=0)
    assert len(idx) == 7 and set(y[idx]) == {2}
    stamped = (xs != x).flatten(1).any(1).numpy()
    assert np.array_equal(np.nonzero(stamped)[0], idx)
    xa, idx_all = plant_training(x, y, 2, "all", PatternSpec("bar"))
    assert len(idx_all) == 20
    xp, carries = plant_pool(x, 0.25, PatternSpec("pixel"), seed=3)
    assert carries.sum() == 25
    assert np.array_equal((xp != x).flatten(1).any(1).numpy(), carries)
    xp2, carries2 = plant_pool(x, 0.25, PatternSpec("pixel"), seed=3)
    assert np.array_equal(carries, carries2)


def test_bad_plant_inputs():
    with pytest.raises(ValueError, match="unknown pattern family"):
        PatternSpec("star")
    with pytest.raises(ValueError, match="strength"):
        PatternSpec("noise", strength=1.5)
    with pytest.raises(ValueError, match="has 20"):
        plant_training(torch.zeros(100, 1, 8, 8), np.repeat(np.arange(5), 20), 1, 21, PatternSpec())
    with pytest.raises(ValueError, match="does not fit"):
        fixed_mask(PatternSpec("patch5"), (1, 4, 4))
    with pytest.raises(ValueError, match="fraction"):
        plant_pool(torch.zeros(4, 1, 8, 8), 1.5, PatternSpec())
    # named, not numpy's unnamed refusal, a silent cast (2.7 stamped 2), or seed -1 drawn as seed 0
    x, y = torch.zeros(20, 1, 8, 8), np.arange(20) % 2
    for seed in (-1, -2, 1.5):
        with pytest.raises(ValueError, match=r"plant_pool: seed must be"):
            plant_pool(x, 0.2, PatternSpec(), seed=seed)
        with pytest.raises(ValueError, match=r"plant_training: seed must be"):
            plant_training(x, y, 1, 3, PatternSpec(), seed=seed)
    for n in (2.7, True, "3"):
        with pytest.raises(ValueError, match=r'plant_training: n \(or "all"\) must be an integer'):
            plant_training(x, y, 1, n, PatternSpec())
    with pytest.raises(ValueError, match="pool fraction must be a number, got '0.1'"):
        plant_pool(x, "0.1", PatternSpec())
    assert len(plant_training(x, y, 1, 3.0, PatternSpec())[1]) == 3
    assert len(plant_training(x, y, 1, "all", PatternSpec())[1]) == 10
    # labels of only the first images stamped among those alone, with no word
    for bad in (y[:12], y.reshape(2, 10)):
        with pytest.raises(ValueError, match=r"labels must be one per image \(20\)"):
            plant_training(x, bad, 1, 3, PatternSpec())



def test_placement_and_colour_given_to_a_family_that_does_not_use_them_are_refused():
    # taken and recorded in plant.json: noise "at the center" planted the default whole-image noise
    for fam in ("noise", "background"):
        with pytest.raises(ValueError, match=rf"the {fam} family covers the whole image; position and margin do "
                                             r"not apply to it: leave them at bottom_right and 1, got 'center' and 1"):
            PatternSpec(fam, position="center")
        with pytest.raises(ValueError, match="got 'bottom_right' and 0"):
            PatternSpec(fam, margin=0)
        assert PatternSpec(fam).position == "bottom_right"
    with pytest.raises(ValueError, match="color is the background family's colour; the patch3 family does not use it"):
        PatternSpec("patch3", color=(1.0,))
    for fam in ("pixel", "patch3", "patch5", "bar"):
        assert PatternSpec(fam, position="center", margin=0).position == "center"


def test_a_patterns_label_says_its_strength_and_place_where_not_the_default():
    assert PatternSpec("patch3").label == "patch3" and PatternSpec("noise", strength=1.0).label == "noise@1"
    assert PatternSpec("noise", strength=0.25).label == "noise@0.25"
    assert PatternSpec("patch3", strength=0.5).label == "patch3@0.5"
    assert PatternSpec("bar", position="top_left").label == "bar at top left"
    assert PatternSpec("pixel", strength=0.8, position="random").label == "pixel@0.8 at random"


@pytest.mark.parametrize("kind", ["float64", "float16", "numpy"])
def test_planting_takes_the_images_apply_pattern_takes(kind):
    # apply_pattern's float32 result written back into a float64 or float16 tensor raised "Index put
    # requires the source and destination dtypes match", and a numpy array had no clone
    x = torch.rand(6, 1, 8, 8)
    given = {"float64": x.double(), "float16": x.half(), "numpy": x.numpy()}[kind]
    want = torch.as_tensor(given).float()
    got, idx = plant_training(given, np.zeros(6, int), 0, 3, PatternSpec("pixel"), seed=0)
    ref, ref_idx = plant_training(want, np.zeros(6, int), 0, 3, PatternSpec("pixel"), seed=0)
    assert got.dtype == torch.float32 and torch.equal(got, ref) and list(idx) == list(ref_idx)
    got, carries = plant_pool(given, 0.5, PatternSpec("pixel"), seed=1)
    assert got.dtype == torch.float32 and carries.sum() == 3


def test_patterns_that_would_plant_nothing_or_out_of_range_are_refused():
    # a negative margin stamped nothing at top/left corners (empty slice) while the truth said it did
    for margin in (-1, 1.5, True):
        with pytest.raises(ValueError, match=rf"margin must be an integer >= 0, got {margin!r}"):
            PatternSpec("patch3", position="top_left", margin=margin)
    with pytest.raises(ValueError, match=r"background color components must be in \[0, 1\], got \(3\.0,\)"):
        PatternSpec("background", color=(3.0,))
    with pytest.raises(ValueError, match="color"):
        PatternSpec("background", color=(0.5, float("nan"), 0.5))
    x = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)   # a stamp of 1.0 on a 0..255 scale is invisible
    with pytest.raises(ValueError, match=r"images must be floats in \[0, 1\], got dtype torch.uint8"):
        apply_pattern(x, PatternSpec("pixel"))
    with pytest.raises(ValueError, match="torch.uint8"):
        plant_training(x, np.zeros(4, int), 0, 2, PatternSpec("pixel"))
    assert apply_pattern(x.double() / 255, PatternSpec("pixel"))[0].dtype == torch.float32


def test_bad_images_and_strengths_are_named():
    # 0-255 floats took an invisible stamp of 1.0, marked as carried; "0.5" passed the check
    # and failed in the label and the stamping; two channels got RGB's background colour
    with pytest.raises(ValueError, match=r"floats in \[0, 1\], got values in \[200, 200\]"):
        apply_pattern(torch.full((2, 1, 8, 8), 200.0), PatternSpec("patch3"))
    with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\], got '0.5'"):
        PatternSpec("noise", strength="0.5")
    assert PatternSpec("noise", strength=1).strength == 1.0 and isinstance(PatternSpec("bar", strength=1).strength, float)
    x, m = apply_pattern(torch.zeros(1, 2, 8, 8), PatternSpec("background"))
    assert m.any() and torch.allclose(x[0, :, m[0]], torch.tensor(0.5))


def test_an_image_the_stamp_leaves_unchanged_is_not_counted_as_carrying_it(caplog):
    """A pixel stamp of 1.0 where an image already holds 1.0 changes nothing, yet the image was
    listed as poisoned or as a pool carrier: ground truth no method could find."""
    import logging

    from spurfast.plant import PatternSpec, plant_pool, plant_training
    spec = PatternSpec("pixel", strength=1.0)
    x = torch.full((6, 1, 28, 28), 0.2)
    x[[1, 4], 0, 26, 26] = 1.0   # the corner pixel (bottom right, margin 1) already at the stamp's value
    with caplog.at_level(logging.INFO, logger="spurfast.plant"):
        out, planted = plant_training(x, np.zeros(6, int), 0, "all", spec)
    assert planted.tolist() == [0, 2, 3, 5] and torch.equal(out[[1, 4]], x[[1, 4]])
    assert "2 of 6 poisoned training images already held the pattern's values" in caplog.text
    out, carries = plant_pool(x, 1.0, spec)
    assert carries.tolist() == [True, False, True, True, False, True]
    assert ((out != x).flatten(1).any(1).numpy() == carries).all()


def test_a_numpy_batch_is_stamped_as_a_tensor_is():
    """apply_pattern(array) failed as "'numpy.ndarray' object has no attribute 'dim'"."""
    x = np.random.default_rng(0).random((3, 1, 16, 16), dtype=np.float32)
    spec = PatternSpec("patch3")
    got, masks = apply_pattern(x, spec)
    want, want_masks = apply_pattern(torch.from_numpy(x), spec)
    assert torch.equal(got, want) and torch.equal(masks, want_masks)


@pytest.mark.parametrize("seed", ["1", -1, 1.5, 2 ** 64])
def test_a_pattern_seed_that_no_generator_takes_is_refused_naming_it(seed):
    """"1" and -1 passed, then failed in numpy's generator ("SeedSequence expects int ...")."""
    with pytest.raises((ValueError, TypeError), match="pattern seed"):
        PatternSpec("noise", strength=0.5, seed=seed)
    assert PatternSpec("noise", seed=np.int64(7)).seed == 7 and type(PatternSpec("noise", seed=np.int64(7)).seed) is int


def test_a_strength_for_the_background_is_refused():
    """It paints its colour: --strength 0.3 gave the same images as 1, and plant.json said 0.3."""
    with pytest.raises(ValueError, match="strength does not apply to it: leave it at 1, got 0.3"):
        PatternSpec("background", strength=0.3)
    assert PatternSpec("background").strength == 1.0


# ---- mutation review (fifty-seventh session): places, sizes, bounds, seeds and levels


@pytest.mark.parametrize("position, rows, cols", [
    ("top_left", (2, 5), (2, 5)), ("top_right", (2, 5), (15, 18)), ("bottom_left", (5, 8), (2, 5)),
    ("bottom_right", (5, 8), (15, 18)), ("center", (3, 6), (8, 11))])
def test_a_patch_sits_at_its_place_and_margin_on_a_non_square_image(position, rows, cols):
    # 10 x 20 image, 3x3 patch, margin 2: top/left = 2, bottom = 10-3-2 = 5, right = 20-3-2 = 15,
    # centre = ((10-3)//2, (20-3)//2) = (3, 8)
    y, m = apply_pattern(torch.zeros(1, 1, 10, 20), PatternSpec("patch3", position=position, margin=2))
    want = torch.zeros(10, 20, dtype=torch.bool)
    want[rows[0]:rows[1], cols[0]:cols[1]] = True
    assert torch.equal(m[0], want) and torch.equal(y[0, 0] == 1, want)


def test_random_positions_reach_every_place_the_patch_fits():
    # a 3x3 patch in a 4 x 7 image fits at rows 0-1 and columns 0-4: 10 places
    _, masks = apply_pattern(torch.zeros(300, 1, 4, 7), PatternSpec("patch3", position="random", margin=0), seed=0)
    anchors = set()
    for m in masks:
        rows, cols = m.nonzero(as_tuple=True)
        assert len(rows) == 9 and int(rows.max() - rows.min()) == 2 and int(cols.max() - cols.min()) == 2
        anchors.add((int(rows.min()), int(cols.min())))
    assert anchors == {(r, c) for r in range(2) for c in range(5)}


def test_the_bar_on_small_images():
    # max(3, h // 2) tall, max(1, w // 14) wide, at the bottom right with margin 1
    _, m = apply_pattern(torch.zeros(1, 1, 16, 16), PatternSpec("bar"))     # 8 x 1
    want = torch.zeros(16, 16, dtype=torch.bool)
    want[7:15, 14] = True
    assert torch.equal(m[0], want)
    _, m = apply_pattern(torch.zeros(1, 1, 5, 5), PatternSpec("bar"))       # 3 x 1 (h // 2 = 2)
    want = torch.zeros(5, 5, dtype=torch.bool)
    want[1:4, 3] = True
    assert torch.equal(m[0], want)


def test_a_pattern_that_just_fits_is_stamped():
    assert bool(fixed_mask(PatternSpec("patch3", margin=0), (1, 3, 3)).all())
    m = fixed_mask(PatternSpec("patch5", margin=1), (1, 7, 7))
    assert int(m.sum()) == 25 and bool(m[1:6, 1:6].all())
    with pytest.raises(ValueError, match="does not fit"):
        fixed_mask(PatternSpec("patch5", margin=1), (1, 6, 7))


def test_a_strength_of_zero_is_refused():
    for fam in ("noise", "patch3"):
        with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\], got 0"):
            PatternSpec(fam, strength=0)
    assert PatternSpec("noise", strength=1e-6).strength == 1e-6


def test_a_background_colour_at_the_ends_of_the_range_is_taken():
    spec = PatternSpec("background", color=(1.0, 0.0, 0.0))   # pure red
    assert spec.color == (1.0, 0.0, 0.0)
    y, m = apply_pattern(torch.zeros(1, 3, 2, 2), spec)
    assert bool(m.all()) and y[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0]


def test_images_below_zero_are_refused():
    # images normalised to [-1, 1] are not on the pattern's [0, 1] scale
    with pytest.raises(ValueError, match=r"floats in \[0, 1\], got values in \[-0.5, 0.5\]"):
        apply_pattern(torch.tensor([-0.5, 0.5]).view(1, 1, 1, 2).expand(1, 1, 8, 2).clone(), PatternSpec("pixel"))


def test_the_default_background_colour_is_red_on_rgb_and_grey_on_extra_channels():
    y, m = apply_pattern(torch.zeros(1, 3, 2, 2), PatternSpec("background"))
    assert bool(m.all()) and y[0].permute(1, 2, 0).reshape(-1, 3).tolist() == [pytest.approx([0.9, 0.2, 0.2])] * 4
    y, _ = apply_pattern(torch.zeros(1, 4, 1, 1), PatternSpec("background"))
    assert y[0, :, 0, 0].tolist() == pytest.approx([0.9, 0.2, 0.2, 0.5])


def test_a_pixel_bright_in_one_channel_is_not_background():
    x = torch.zeros(1, 3, 1, 2)
    x[0, 0, 0, 1] = 1.0   # pure red: dark in two channels, not in all three
    y, m = apply_pattern(x, PatternSpec("background", color=(0.5, 0.5, 0.5)))
    assert m[0, 0].tolist() == [True, False] and y[0, :, 0, 1].tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("position", ["bottom_right", "random"])
def test_a_painted_pattern_takes_its_strength(position):
    y, m = apply_pattern(torch.zeros(4, 1, 12, 12), PatternSpec("patch3", strength=0.5, position=position))
    assert int(m.sum()) == 4 * 9 and torch.equal(y[:, 0][m], torch.full((36,), 0.5))
    assert float(y.sum()) == 4 * 9 * 0.5


def test_random_positions_follow_the_planting_seed():
    """plant_training stamps as apply_pattern(..., seed=seed) does; other seeds move the patches."""
    x, y = torch.zeros(10, 1, 12, 12), np.zeros(10, int)
    spec = PatternSpec("patch3", position="random")   # its own seed stays 0
    for seed in (1, 2):
        out, idx = plant_training(x, y, 0, "all", spec, seed=seed)
        assert idx.tolist() == list(range(10)) and torch.equal(out, apply_pattern(x, spec, seed=seed)[0])
    a, _ = plant_pool(x, 1.0, spec, seed=1)
    b, _ = plant_pool(x, 1.0, spec, seed=2)
    assert not torch.equal(a, b)


def test_a_negative_count_is_refused_naming_it():
    with pytest.raises(ValueError, match="cannot poison n=-1 images: class 1 has 10"):
        plant_training(torch.zeros(20, 1, 8, 8), np.arange(20) % 2, 1, -1, PatternSpec())


def test_a_pool_fraction_of_zero_stamps_nothing():
    x = torch.rand(8, 1, 8, 8)
    out, carries = plant_pool(x, 0.0, PatternSpec("patch3"))
    assert torch.equal(out, x) and not carries.any()


@pytest.mark.parametrize("fraction, want", [(0.29, 29), (0.57, 57), (0.58, 58)])
def test_the_pool_fraction_rounds_to_the_nearest_count(fraction, want):
    # 0.29 * 100 = 28.999999999999996 in floats: truncated, one carrier short
    _, carries = plant_pool(torch.zeros(100, 1, 8, 8), fraction, PatternSpec("pixel"))
    assert int(carries.sum()) == want


def test_stamps_are_rounded_to_the_nearest_level():
    # on the 1/255 grid; a pixel of 0.5 is 127.5 levels: rounded (half to even) to 128, the rest kept
    x = (torch.arange(64, dtype=torch.float32) * 4 / 255).view(1, 1, 8, 8).expand(2, 1, 8, 8).clone()
    out, carries = plant_pool(x, 1.0, PatternSpec("pixel", strength=0.5), levels=255)
    want = x.clone()
    want[:, 0, 6, 6] = 128 / 255
    assert carries.all() and torch.equal(out, want)
    from spurfast.plant import on_levels
    assert on_levels(torch.tensor([0.7, 0.2, 254.6]) / 255, 255).mul(255).round().tolist() == [1.0, 0.0, 255.0]
