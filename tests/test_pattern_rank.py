"""Pattern ranking (`spurfast.pattern_rank`) on hand-made pools with known carriers."""
import numpy as np
import pytest
import torch

from spurfast.data.sources import ArraySource
from spurfast.metrics import average_precision
from spurfast.pattern_rank import pattern_rankings, peak_mask, ranking_mask
from spurfast.pixel_probe import robust_z
from tests.helpers import AtOnce

H = W = 10
PATCH = np.zeros((H, W), bool)
PATCH[:2, :2] = True                      # 4 of 100 pixels: localised
N, CARRIERS = 300, np.arange(0, 300, 10)  # every tenth image carries the patch


def _pool(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 0.5, (N, 1, H, W)).astype(np.float32)
    x[CARRIERS, :, :2, :2] = 1.0
    return ArraySource(x, np.zeros(N, int), name="hand-made")


class CountingSource(ArraySource):
    """Records every index read."""
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.read = []

    def get_batch(self, idx):
        self.read.extend(np.asarray(idx).tolist())
        return super().get_batch(idx)


def _finding(mask=PATCH, rank=1):
    return {"rank": rank, "class": 0, "_mask": mask, "_contrast": torch.full((1, H, W), 0.5)}


def _carries():
    c = np.zeros(N, bool)
    c[CARRIERS] = True
    return c


def test_a_localised_pattern_ranks_its_carriers_first():
    src = _pool()
    latent = np.random.default_rng(1).normal(size=N).astype(np.float32)   # a latent ranking that knows nothing
    rankings = {1: latent.copy()}
    f = _finding()
    pattern_rankings([f], rankings, src)
    assert f["ranked_by"] == "pattern"
    assert average_precision(latent, _carries()) < 0.3
    assert average_precision(rankings[1], _carries()) == pytest.approx(1.0)


def test_a_diffuse_pattern_keeps_the_latent_ranking():
    src = _pool()
    latent = np.random.default_rng(1).normal(size=N).astype(np.float32)
    rankings = {1: latent.copy()}
    half = np.zeros((H, W), bool)
    half[:, :5] = True                    # 50% of the image: noise or a background, not a stamp
    empty = np.zeros((H, W), bool)        # nothing extracted
    fs = [_finding(half, 1), _finding(empty, 2)]
    rankings[2] = latent.copy()
    pattern_rankings(fs, rankings, src)
    assert [f["ranked_by"] for f in fs] == ["latent", "latent"]
    np.testing.assert_array_equal(rankings[1], latent)
    np.testing.assert_array_equal(rankings[2], latent)


def _shadowed_patch():
    """A mixed cluster's contrast: the patch (0.8) plus a faint shadow of content (-0.2 on 60% of
    the image), in a pool whose images vary inside the shadow far more than the patch does."""
    contrast = torch.zeros(1, H, W)
    contrast[0, 4:, :] = -0.2                               # members' garments a little darker
    contrast[0, :2, :2] = 0.8
    mask = contrast[0].abs().numpy() > 0.05                 # one Otsu cut keeps both: 64% of the image
    return {"rank": 1, "class": 0, "_mask": mask, "_contrast": contrast}


def test_a_pattern_inside_a_faint_shadow_ranks_by_its_core():
    """The mask is not localised but its strong core is: the pool is ranked by the patch with the
    latent probe (the whole mask's projection follows the content and misses carriers); a patch
    stands out of the pool's spread so far that a latent ranking that knows nothing moves none."""
    rng = np.random.default_rng(3)
    x = _pool().get_batch(np.arange(N))[0].numpy()
    x[:, :, 4:, :] = rng.uniform(0, 1, (N, 1, 1, 1))      # each image's garment: one brightness
    src = ArraySource(x, np.zeros(N, int), name="shadowed")
    latent = rng.normal(size=N)
    f = _shadowed_patch()
    assert ranking_mask(f["_mask"], f["_contrast"]).sum() == 4            # the patch's 4 pixels
    rankings = {1: latent.copy()}
    pattern_rankings([f], rankings, src)
    assert f["ranked_by"] == "latent+pattern"
    assert average_precision(rankings[1], _carries()) == pytest.approx(1.0)
    whole = (f["_contrast"] * torch.as_tensor(f["_mask"])).reshape(-1).numpy()
    assert average_precision(x.reshape(N, -1) @ whole, _carries()) < 0.5   # the one-cut mask's ranking


def test_the_core_of_a_diffuse_pattern_ranks_with_the_latent_probe():
    """Noise over the image: the core (its 6 strongest pixels) lies where the images' content
    varies more than the pattern adds, so its projection alone ranks carriers poorly, as does a
    noisy latent probe; carriers stand out in both, and both together rank them best (noise at
    0.5 among three patterns at n = 1000, seed 0: latent 0.93, core 0.57, both 0.94)."""
    rng = np.random.default_rng(5)
    contrast = torch.zeros(1, H, W)
    contrast[0, :6, :] = 0.2                                # a faint diffuse part: 60% of the image
    contrast[0, 6, :6] = 1.0                                # the strong part: 6 pixels
    mask = contrast[0].numpy() > 0
    core = ranking_mask(mask, contrast)
    assert core.sum() == 6
    x = rng.uniform(0, 0.2, (N, 1, H, W)).astype(np.float32)
    x[:, 0, 6, :6] = rng.uniform(0, 0.7, (N, 1))            # each image's content there: one brightness
    x[CARRIERS, 0, 6, :6] += 0.3                            # the pattern, within that spread
    carries = _carries()
    latent = rng.normal(size=N) + 2.0 * carries             # a probe that knows the carriers, noisily
    rankings = {1: latent.copy()}
    f = {"rank": 1, "class": 0, "_mask": mask, "_contrast": contrast}
    pattern_rankings([f], rankings, ArraySource(x, np.zeros(N, int), name="noise core"))
    assert f["ranked_by"] == "latent+pattern"
    alone = x.reshape(N, -1) @ (contrast[0].numpy() * core).reshape(-1)
    both = average_precision(rankings[1], carries)
    assert both > max(average_precision(latent, carries), average_precision(alone, carries)) + 0.05, \
        (both, average_precision(latent, carries), average_precision(alone, carries))


def test_a_diffuse_mask_whose_core_is_diffuse_too_keeps_the_latent_ranking():
    """Noise-like contrast on half the image: the second cut halves it, still 25% of the image."""
    contrast = torch.zeros(1, H, W)
    contrast[0, :, :5] = torch.linspace(0.2, 1.0, 50).reshape(H, 5)
    mask = contrast[0].numpy() > 0
    assert ranking_mask(mask, contrast) is None
    rankings = {1: np.random.default_rng(4).normal(size=N)}
    f = {"rank": 1, "class": 0, "_mask": mask, "_contrast": contrast}
    pattern_rankings([f], rankings, _pool())
    assert f["ranked_by"] == "latent"


def test_only_the_latent_head_is_read_and_reordered():
    x = _pool().get_batch(np.arange(N))[0].numpy()
    src = CountingSource(x, np.zeros(N, int), name="counted")
    latent = np.arange(N, dtype=np.float32)[::-1].copy()   # image 0 best, 299 worst
    latent[5] = -np.inf                                    # unreadable: unranked
    rankings = {1: latent.copy()}
    pattern_rankings([_finding()], rankings, src, top=50)
    head = [i for i in range(51) if i != 5]                # the 50 best finite scores
    assert sorted(set(src.read)) == head
    r = rankings[1]
    assert r[5] == -np.inf
    # the head's carriers (0, 10, ..., 50 minus those outside) first, then the rest of the head,
    # then everything else in the latent order
    order = np.argsort(-r, kind="stable")
    head_carriers = [i for i in head if i % 10 == 0]
    assert sorted(order[:len(head_carriers)].tolist()) == head_carriers
    assert set(order[:50].tolist()) == set(head)
    rest = order[50:N - 1]
    assert rest.tolist() == sorted(rest.tolist())          # latent order: smaller index = better
    assert 60 in rest and r[60] < r[head].min()            # a carrier outside the head is not lifted


def test_ties_in_the_pattern_keep_the_latent_order():
    x = np.zeros((N, 1, H, W), np.float32)                 # every projection equal
    latent = np.random.default_rng(2).normal(size=N)
    rankings = {1: latent.copy()}
    pattern_rankings([_finding()], rankings, ArraySource(x, np.zeros(N, int), name="flat"))
    np.testing.assert_array_equal(np.argsort(-rankings[1], kind="stable"), np.argsort(-latent, kind="stable"))


def test_exact_double_ties_keep_the_latent_order_smaller_index_first():
    """Images alike in both the projection and the latent score (duplicates) came out in
    reversed order (the best-latent, smallest index last), unlike the latent ranking's
    ties (by index) that the docstring says the re-ranked head keeps."""
    x = np.zeros((N, 1, H, W), np.float32)                 # every projection equal
    latent = np.repeat(np.arange(N // 3, dtype=np.float64), 3)[::-1].copy()   # triples of equal scores
    rankings = {1: latent.copy()}
    pattern_rankings([_finding()], rankings, ArraySource(x, np.zeros(N, int), name="flat"), top=N // 2)
    order = np.argsort(-rankings[1], kind="stable")
    np.testing.assert_array_equal(order, np.lexsort((np.arange(N), -latent)))


def test_bad_arguments_are_refused():
    src = _pool()
    with pytest.raises(ValueError, match="characterise"):
        pattern_rankings([{"rank": 1, "class": 0}], {1: np.zeros(N)}, src)
    with pytest.raises(ValueError, match="no latent ranking"):
        pattern_rankings([_finding(rank=2)], {1: np.zeros(N)}, src)
    # checked before any finding is marked: the first one said "pattern" over its latent ranking
    found = [_finding(), _finding(rank=2)]
    with pytest.raises(ValueError, match="finding 2 has no latent ranking"):
        pattern_rankings(found, {1: np.zeros(N)}, src)
    assert [f.get("ranked_by") for f in found] == [None, None]
    with pytest.raises(ValueError, match="localised"):
        pattern_rankings([_finding()], {1: np.zeros(N)}, src, localised=0)
    with pytest.raises(ValueError, match="top"):
        pattern_rankings([_finding()], {1: np.zeros(N)}, src, top=0)
    with pytest.raises(ValueError, match="batch_size"):
        pattern_rankings([_finding()], {1: np.zeros(N)}, src, batch_size=0)
    pattern_rankings([], {}, src)                          # no finding: nothing to do


def test_an_image_unreadable_on_the_reread_is_unranked_not_among_the_carriers(tmp_path):
    """A folder image that the store embedded but that is unreadable now projects to 0 in the
    pass: a dark patch's carriers project near 0 too (everyone else below), so it ranked among
    them; the docstring promises unreadable images -inf."""
    from PIL import Image

    from spurfast.data.folder import ImageFolderSource

    rng = np.random.default_rng(0)
    for i in range(20):
        a = rng.integers(180, 256, (16, 16, 3), dtype=np.uint8)
        if i % 5 == 0:
            a[:3, :3] = 0                                  # a dark corner patch: carriers 0, 5, 10, 15
        Image.fromarray(a).save(tmp_path / f"{i:02d}.png")
    (tmp_path / "07.png").write_bytes(b"damaged since it was embedded")
    src = ImageFolderSource(tmp_path, size=16)
    mask = np.zeros((16, 16), bool)
    mask[:3, :3] = True
    f = {"rank": 1, "class": 0, "_mask": mask, "_contrast": torch.full((3, 16, 16), -0.7)}
    rankings = {1: np.linspace(1, 0, 20).astype(np.float32)}   # every image embedded: finite
    pattern_rankings([f], rankings, src)
    assert f["ranked_by"] == "pattern" and 7 in src.bad_files
    assert rankings[1][7] == -np.inf
    assert np.argsort(-rankings[1], kind="stable")[:4].tolist() == [0, 5, 10, 15]


@pytest.mark.parametrize("n, head", [(1000, 10), (1000, 999), (1000, 1000), (1000, 5000), (7, 1), (0, 3)])
def test_a_latent_orders_head_is_the_full_orders_first_entries(n, head):
    # the head sorts only the scores at least as good as its last one: ties across that cut
    # (many equal scores), -0.0 beside 0.0, and non-finite scores left out, as the full order does
    from spurfast.pattern_rank import _latent_order
    rng = np.random.default_rng(n + head)
    r = rng.integers(-5, 6, n).astype(np.float64)        # heavy ties
    r[rng.random(n) < 0.1] = -0.0
    r[rng.random(n) < 0.05] = np.nan
    r[rng.random(n) < 0.05] = -np.inf
    np.testing.assert_array_equal(_latent_order(r, head), _latent_order(r)[:head])


def test_findings_ranked_at_once_rank_as_one_at_a_time(monkeypatch):
    # each finding's latent head and final order are computed on every core (`run_in_order`):
    # the rankings are one at a time's, whatever the number of cores, and the threads are used
    import threading

    import spurfast.pattern_rank as P
    masks = []
    for i in range(5):
        m = np.zeros((H, W), bool)
        m[i:i + 2, :2] = True
        masks.append(m)
    latent = np.random.default_rng(1).normal(size=(5, N)).astype(np.float32)
    latent[:, ::7] = latent[:, :1]   # ties in the latent order too
    real = P._latent_order

    def run(cores, order):
        monkeypatch.setattr(P, "usable_cores", lambda: cores)
        monkeypatch.setattr(P, "_latent_order", order)
        rankings = {i + 1: latent[i].copy() for i in range(5)}
        pattern_rankings([_finding(m, i + 1) for i, m in enumerate(masks)], rankings, _pool(), top=50)
        return rankings

    alone = AtOnce(real, parties=1)
    one = run(1, alone)
    assert alone.threads == {threading.current_thread().name}
    together = AtOnce(real, parties=3)   # three sorts wait for each other: they run at once
    several = run(3, together)
    assert threading.current_thread().name not in together.threads, together.threads
    for r in one:
        np.testing.assert_array_equal(several[r], one[r])


def test_a_mask_of_at_most_a_tenth_is_localised_and_more_is_not():
    tenth = np.zeros((10, 10), bool)
    tenth[0, :] = True                         # exactly 10%: localised ("at most")
    flat = torch.full((1, 10, 10), 0.5)
    assert ranking_mask(tenth, flat) is tenth or np.array_equal(ranking_mask(tenth, flat), tenth)
    wide = np.zeros((10, 10), bool)
    wide[:2, :8] = True                        # 16%, uniform contrast: no core -> latent ranking
    assert ranking_mask(wide, flat) is None


def test_the_peak_is_the_strongest_pixels_by_repeated_otsu_cuts():
    contrast = torch.zeros(1, H, W)
    contrast[0, 0, 0] = 0.9                   # one pixel far above
    contrast[0, 5, 1:9] = 0.5                 # a strong part
    contrast[0, 6:, :] = 0.2                  # a faint part
    mask = contrast[0].numpy() > 0
    peak = peak_mask(mask, contrast)
    assert np.argwhere(peak).tolist() == [[0, 0]]
    even = torch.zeros(1, H, W)
    even[0, 2:4, :] = -0.5                    # equal magnitudes: no cut splits them, the sign aside
    assert (peak_mask(even[0].numpy() != 0, even) == (even[0].numpy() != 0)).all()
    assert not peak_mask(np.zeros((H, W), bool), contrast).any()


def _pixel_in_a_shadow(rng):
    """A single planted pixel (0.75) inside a cluster's shadow of content: 8 strong pixels (0.4)
    where every image has its own brightness, 40 faint ones; the core keeps the 8 with the pixel."""
    contrast = torch.zeros(1, H, W)
    contrast[0, 0, 0] = 0.75
    contrast[0, 5, 1:9] = 0.4
    contrast[0, 6:, :] = 0.15
    x = rng.uniform(0, 0.2, (N, 1, H, W)).astype(np.float32)
    x[:, 0, 5, 1:9] = rng.uniform(0, 1, (N, 1))
    x[:, 0, 0, 0] = 0.0                        # a black corner, as Fashion-MNIST's top left
    x[CARRIERS, 0, 0, 0] = 1.0
    return contrast, x


def test_a_planted_pixel_inside_a_shadowed_core_ranks_by_the_peak_too():
    """The core (9 pixels) holds the pixel and content that varies 8x more than it adds: the core and
    a latent probe that knows little rank the carriers poorly; the peak's term ranks them first."""
    rng = np.random.default_rng(7)
    contrast, x = _pixel_in_a_shadow(rng)
    mask = contrast[0].numpy() > 0
    core = ranking_mask(mask, contrast)
    assert core.sum() == 9 and core[0, 0]
    latent = rng.normal(size=N) + 0.3 * _carries()
    f = {"rank": 1, "class": 0, "_mask": mask, "_contrast": contrast}
    rankings = {1: latent.copy()}
    pattern_rankings([f], rankings, ArraySource(x, np.zeros(N, int), name="pixel in a shadow"))
    assert f["ranked_by"] == "latent+pattern+stamp"   # 30 of 300 carry it: a stamp's carriers
    assert average_precision(rankings[1], _carries()) > 0.95
    core_proj = x.reshape(N, -1) @ (contrast[0].numpy() * core).reshape(-1)
    two_terms = robust_z(latent) + robust_z(core_proj)   # the ranking before the peak's term
    assert average_precision(two_terms, _carries()) < 0.5


def test_a_peak_that_is_the_core_adds_no_second_weight():
    """Equal strongest values (the core's 6 pixels at 1.0): the peak is the core, and the ranking is
    the latent probe and the core's projection alone, each once."""
    rng = np.random.default_rng(5)
    contrast = torch.zeros(1, H, W)
    contrast[0, :6, :] = 0.2
    contrast[0, 6, :6] = 1.0
    mask = contrast[0].numpy() > 0
    x = rng.uniform(0, 1, (N, 1, H, W)).astype(np.float32)
    latent = rng.normal(size=N)
    rankings = {1: latent.copy()}
    f = {"rank": 1, "class": 0, "_mask": mask, "_contrast": contrast}
    pattern_rankings([f], rankings, ArraySource(x, np.zeros(N, int), name="equal core"))
    core_proj = x.reshape(N, -1).astype(np.float64) @ (contrast[0].numpy() * ranking_mask(mask, contrast)).reshape(-1)
    expected = robust_z(latent) + robust_z(core_proj)
    assert (np.argsort(-rankings[1], kind="stable") == np.lexsort((np.arange(N), -expected))).all()


def test_separability_is_otsus_criterion_at_the_best_cut():
    from spurfast.pattern_rank import separability
    assert separability(np.r_[np.zeros(90), np.ones(10)]) == pytest.approx(1.0)    # two values
    # [0, 0, 1, 3]: variance 1.5; the cut {0, 0, 1} | {3} has between-group variance
    # 3/4 (1/3 - 1)^2 + 1/4 (3 - 1)^2 = 4/3, the best of the three cuts (1/3, 1, 4/3)
    assert separability(np.array([3.0, 0.0, 1.0, 0.0])) == pytest.approx(8 / 9)
    assert separability(np.linspace(0, 1, 10_001)) == pytest.approx(0.75, abs=1e-3)  # uniform: 3/4
    assert separability(np.ones(5)) == 0.0 and separability(np.zeros(0)) == 0.0
    assert separability(1e6 + np.array([0.0, 0.0, 1.0, 3.0])) == pytest.approx(8 / 9)   # shift invariant


def test_a_peak_whose_projection_follows_content_adds_no_term(monkeypatch):
    """The same shadowed core, but the strongest pixel is one where every image has its own
    brightness and carriers add 0.3 to it (a noise pattern's strongest pixel): not a stamp, so the
    ranking is the latent probe and the core's alone, as with no peak at all (the noise at 0.25,
    n = 100, lost 0.045 of AP to such a term)."""
    import spurfast.pattern_rank as pr
    rng = np.random.default_rng(7)
    contrast, x = _pixel_in_a_shadow(rng)
    x[:, 0, 0, 0] = rng.uniform(0, 0.7, N)
    x[CARRIERS, 0, 0, 0] += 0.3
    assert pr.separability(contrast[0, 0, 0].item() * x[:, 0, 0, 0]) < pr.TWO_VALUED
    mask = contrast[0].numpy() > 0
    latent = rng.normal(size=N) + 0.3 * _carries()
    src = ArraySource(x, np.zeros(N, int), name="noise-like peak")
    got = {1: latent.copy()}
    pattern_rankings([{"rank": 1, "class": 0, "_mask": mask, "_contrast": contrast}], got, src)
    monkeypatch.setattr(pr, "peak_mask", lambda mask, contrast: np.zeros_like(mask))
    without = {1: latent.copy()}
    pattern_rankings([{"rank": 1, "class": 0, "_mask": mask, "_contrast": contrast}], without, src)
    np.testing.assert_array_equal(got[1], without[1])


def _stamp_in_a_shadow(rng, latent_noise=3.0):
    """`_pixel_in_a_shadow`'s pool with a latent probe that ranks ten non-carriers above every
    carrier: the probe and the core together still rank some carriers below them."""
    contrast, x = _pixel_in_a_shadow(rng)
    latent = latent_noise * rng.normal(size=N)
    decoys = np.setdiff1d(np.arange(N), CARRIERS)[:10]
    latent[decoys] = 50.0
    x[decoys, 0, 5, 1:9] = 1.0          # and the core's content at its brightest
    return contrast, x, latent


def _ranked(contrast, x, latent, name):
    f = {"rank": 1, "class": 0, "_mask": contrast[0].numpy() > 0, "_contrast": contrast}
    rankings = {1: latent.copy()}
    pattern_rankings([f], rankings, ArraySource(x, np.zeros(N, int), name=name))
    return f, rankings[1]


def test_a_stamps_carriers_rank_above_every_other_image():
    """A two-valued peak carried by a minority (30 of 300) is a stamp: its carriers come first,
    whatever the latent probe and the core say (the pixel at n = 1000 ranked its carriers at
    AP 0.82 with the peak as a third term alone); among themselves, and among the rest, the
    three terms' sum orders them."""
    contrast, x, latent = _stamp_in_a_shadow(np.random.default_rng(7))
    mask = contrast[0].numpy() > 0
    core, peak = ranking_mask(mask, contrast), peak_mask(mask, contrast)
    flat = x.reshape(N, -1).astype(np.float64)
    three = (robust_z(latent) + robust_z(flat @ (contrast[0].numpy() * core).reshape(-1))
             + robust_z(flat @ (contrast[0].numpy() * peak).reshape(-1)))
    assert average_precision(three, _carries()) < 0.9          # the sum alone: decoys first
    f, got = _ranked(contrast, x, latent, "stamp in a shadow")
    assert f["ranked_by"] == "latent+pattern+stamp"
    assert np.argwhere(f["_mask"]).tolist() == [[0, 0]]   # the stamp's own pixel, not the 49 of the contrast
    assert f["_contrast"][0, 0, 0].item() == pytest.approx(1.0)   # carriers 1.0 there, the others 0: its full value
    order = np.argsort(-got, kind="stable")
    assert set(order[:len(CARRIERS)]) == set(CARRIERS.tolist())
    np.testing.assert_array_equal(order[:len(CARRIERS)], CARRIERS[np.argsort(-three[CARRIERS], kind="stable")])
    rest = np.setdiff1d(np.arange(N), CARRIERS)
    np.testing.assert_array_equal(order[len(CARRIERS):], rest[np.argsort(-three[rest], kind="stable")])


def test_a_two_valued_peak_most_images_carry_is_no_stamp():
    """The members *lack* a mark most images carry (the high side of the peak's projection holds
    270 of 300): an absence, not a stamp, so nothing is ranked first by it; the peak stays a third
    term of the sum."""
    contrast, x, latent = _stamp_in_a_shadow(np.random.default_rng(7))
    x[:, 0, 0, 0] = 1.0 - x[:, 0, 0, 0]   # every image but the 30 has the bright pixel
    mask = contrast[0].numpy() > 0
    core, peak = ranking_mask(mask, contrast), peak_mask(mask, contrast)
    flat = x.reshape(N, -1).astype(np.float64)
    three = (robust_z(latent) + robust_z(flat @ (contrast[0].numpy() * core).reshape(-1))
             + robust_z(flat @ (contrast[0].numpy() * peak).reshape(-1)))
    f, got = _ranked(contrast, x, latent, "an absence")
    assert f["ranked_by"] == "latent+pattern" and (f["_mask"] == mask).all()
    np.testing.assert_array_equal(np.argsort(-got, kind="stable"), np.lexsort((np.arange(N), -three)))


def test_a_stamp_half_the_images_carry_is_still_a_stamp():
    contrast, x, latent = _stamp_in_a_shadow(np.random.default_rng(7))
    x[:, 0, 0, 0] = 0.0
    x[::2, 0, 0, 0] = 1.0                 # 150 of 300: STAMP_SHARE exactly
    f, _ = _ranked(contrast, x, latent, "half stamped")
    assert f["ranked_by"] == "latent+pattern+stamp"


def test_a_stamp_whose_carriers_differ_everywhere_keeps_its_mask():
    """The carriers differ from the rest in every pixel (content, not a stamp, tells them apart):
    more than the localised share separates them, so the finding keeps the contrast's mask; its
    carriers still rank first."""
    contrast, x, latent = _stamp_in_a_shadow(np.random.default_rng(7))
    x[CARRIERS] = 1.0                     # white images: every pixel at least ties the brightest others'
    mask = contrast[0].numpy() > 0
    f, got = _ranked(contrast, x, latent, "brighter carriers")
    assert f["ranked_by"] == "latent+pattern+stamp" and (f["_mask"] == mask).all()
    assert set(np.argsort(-got, kind="stable")[:len(CARRIERS)]) == set(CARRIERS.tolist())
