"""Contrast maps: members minus content-matched non-members leave the shared pattern."""
import numpy as np
import pytest
import torch

from spurfast.characterise import neighbour_contrast, pattern_mask
from spurfast.data.sources import ArraySource


def _shapes(n, kind, rng, patch):
    x = 0.05 * torch.as_tensor(rng.random((n, 1, 8, 8)), dtype=torch.float32)
    if kind == 0:
        x[:, :, :4, :4] += 0.8         # shape A: top-left quadrant bright
    else:
        x[:, :, 4:, :4] += 0.8         # shape B: bottom-left quadrant bright
    if patch:
        x[:, :, 7, 7] = 1.0
    return x


def test_neighbour_contrast_cancels_content_and_keeps_the_pattern():
    rng = np.random.default_rng(0)
    # members: 5 of shape A and 25 of shape B, all patched; others: 40 + 40 unpatched
    imgs = torch.cat([_shapes(5, 0, rng, True), _shapes(25, 1, rng, True),
                      _shapes(40, 0, rng, False), _shapes(40, 1, rng, False)])
    kind = np.r_[np.zeros(5), np.ones(25), np.zeros(40), np.ones(40)]
    z = np.stack([kind, 1 - kind], 1) + 0.01 * rng.normal(size=(110, 2))   # the latent knows the shape only
    src = ArraySource(imgs, None, name="shapes")
    members, others = np.arange(30), np.arange(30, 110)
    contrast, mem_mean = neighbour_contrast(src, z, members, others, k=3, seed=0)
    assert contrast.shape == (1, 8, 8) and mem_mean.shape == (1, 8, 8)
    assert abs(float(contrast[0, 7, 7]) - 0.95) < 0.1, float(contrast[0, 7, 7])
    rest = contrast.clone()
    rest[0, 7, 7] = 0
    assert float(rest.abs().max()) < 0.1, "content should cancel against the latent neighbours"
    mask = pattern_mask(contrast)
    assert mask.sum() == 1 and mask[7, 7]
    # the unmatched mean difference (members vs all others) keeps the shape imbalance
    naive = imgs[members].mean(0) - imgs[others].mean(0)
    assert float(naive[0, 0, 0].abs()) > 0.2


def test_neighbour_contrast_without_others_is_zero():
    rng = np.random.default_rng(1)
    imgs = _shapes(4, 0, rng, True)
    contrast, mem_mean = neighbour_contrast(ArraySource(imgs, None, name="s"), np.zeros((4, 2)), np.arange(4),
                                            np.arange(0), seed=0)
    assert float(contrast.abs().max()) == 0.0 and mem_mean.shape == (1, 8, 8)


def test_otsu_cut_keeps_a_bin_whole():
    from spurfast.characterise import otsu_threshold

    v = np.r_[np.linspace(0.0, 0.01, 63), 1.0]      # background in the first bin, one bright value
    t = otsu_threshold(v)
    assert (v > t).sum() == 1
    two = np.r_[np.zeros(50), np.ones(50) * 0.5]
    assert (two > otsu_threshold(two)).sum() == 50


def test_mask_of_a_contrast_spanning_a_few_ulps():
    """A near-uniform contrast whose values differ by one fp32 ulp is no reason to crash
    the characterisation (numpy has no 64 finite fp32 bins for that range)."""
    hi = np.nextafter(np.float32(0.5), np.float32(1))
    contrast = torch.full((1, 4, 4), 0.5)
    contrast[0, 0, 0] = float(hi)
    mask = pattern_mask(contrast)
    assert mask.sum() == 1 and mask[0, 0]


def test_identical_members_and_others_give_no_pattern():
    """Members and their others alike to the pixel (a constant image, either side's count):
    float32 means of 3 and of 7 copies differed by a few ulps everywhere, and `pattern_mask`
    read that uniform residue as a pattern covering the whole image."""
    from spurfast.characterise import contrast_map

    x = np.full((10, 1, 4, 4), 0.3, np.float32)
    src = ArraySource(x, None, name="same")
    contrast, _ = contrast_map(src, np.arange(3), np.zeros(3, int), np.arange(3, 10), np.zeros(7, int))
    assert float(contrast.abs().max()) == 0.0 and not pattern_mask(contrast).any()
    z = np.zeros((10, 2), np.float32)
    contrast, _ = neighbour_contrast(src, z, np.arange(3), np.arange(3, 10), k=2, seed=0)
    assert float(contrast.abs().max()) == 0.0 and not pattern_mask(contrast).any()


def test_contrast_maps_refuse_a_cap_below_one():
    """cap = 0 drew no image: a NaN contrast (then a numpy histogram error) and a bare
    torch.cat error."""
    from spurfast.characterise import contrast_map

    src = ArraySource(np.random.default_rng(0).random((10, 1, 4, 4)).astype(np.float32), None, name="s")
    with pytest.raises(ValueError, match=r"contrast_map: cap .* must be an integer >= 1, got 0"):
        contrast_map(src, np.arange(4), np.zeros(4, int), np.arange(4, 10), np.zeros(6, int), cap=0)
    with pytest.raises(ValueError, match=r"neighbour_contrast: cap .* must be an integer >= 1, got 0"):
        neighbour_contrast(src, np.zeros((10, 2)), np.arange(4), np.arange(4, 10), cap=0)


def test_mask_of_a_contrast_equal_everywhere_is_all_of_it():
    """1-pixel images whose members differ from the rest by 0.8: the one pixel was not "above
    the threshold" (the maximum itself), the mask was empty and confirmation skipped it."""
    assert pattern_mask(torch.full((1, 1, 1), 0.8)).tolist() == [[True]]
    assert pattern_mask(torch.full((3, 4, 4), -0.5)).all()
    assert not pattern_mask(torch.zeros(1, 4, 4)).any()   # no difference: no pattern


def test_neighbour_contrast_of_huge_latents_is_the_same():
    """Nearest neighbours do not depend on the latents' scale, but fp32 distances do: from
    about 1e19 their squares overflowed to inf and the "neighbours" were arbitrary ties."""
    rng = np.random.default_rng(0)
    imgs = torch.cat([_shapes(5, 0, rng, True), _shapes(25, 1, rng, True),
                      _shapes(40, 0, rng, False), _shapes(40, 1, rng, False)])
    kind = np.r_[np.zeros(5), np.ones(25), np.zeros(40), np.ones(40)]
    z = (np.stack([kind, 1 - kind], 1) + 0.01 * rng.normal(size=(110, 2))).astype(np.float32)
    src = ArraySource(imgs, None, name="shapes")
    members, others = np.arange(30), np.arange(30, 110)
    want, _ = neighbour_contrast(src, z, members, others, k=3, seed=0)
    got, _ = neighbour_contrast(src, z * np.float32(1e20), members, others, k=3, seed=0)
    assert torch.equal(got, want), float((got - want).abs().max())


def test_neighbour_contrast_of_latents_far_from_the_origin_takes_the_nearest_others():
    """cdist's fp32 |a|^2 + |b|^2 - 2 a.b cancels for latents far from the origin for their
    spread (offset 1000, spread 0.01): every member was matched with arbitrary others of its
    kind, not its nearest ones."""
    rng = np.random.default_rng(0)
    imgs = torch.as_tensor(rng.random((110, 1, 4, 4)), dtype=torch.float32)   # each image its own
    kind = np.r_[np.zeros(5), np.ones(25), np.zeros(40), np.ones(40)]
    z = (1000 + np.stack([kind, 1 - kind], 1) + 0.01 * rng.normal(size=(110, 2))).astype(np.float32)
    src = ArraySource(imgs, None, name="far")
    members, others = np.arange(30), np.arange(30, 110)
    got, _ = neighbour_contrast(src, z, members, others, k=3, seed=0)
    d = ((z[members, None].astype(np.float64) - z[None, others]) ** 2).sum(-1)   # exact, in fp64
    matched = others[np.argsort(d, 1, kind="stable")[:, :3].ravel()]
    want = imgs[members].mean(0) - imgs[matched].mean(0)
    assert torch.allclose(got, want, atol=1e-6), float((got - want).abs().max())


def test_neighbour_contrast_of_float64_latents_far_from_the_origin_takes_the_nearest_others():
    """float64 latents at 1e8 + spread 30 were cast to fp32 (a spacing of 8) before the shift
    about the others' mean: the distances came from rounded latents, the neighbours were wrong."""
    rng = np.random.default_rng(0)
    imgs = torch.as_tensor(rng.random((110, 1, 4, 4)), dtype=torch.float32)   # each image its own
    kind = np.r_[np.zeros(5), np.ones(25), np.zeros(40), np.ones(40)]
    z = 1e8 + 300 * np.stack([kind, 1 - kind], 1) + 30 * rng.normal(size=(110, 2))
    src = ArraySource(imgs, None, name="far64")
    members, others = np.arange(30), np.arange(30, 110)
    got, _ = neighbour_contrast(src, z, members, others, k=3, seed=0)
    d = ((z[members, None] - z[None, others]) ** 2).sum(-1)
    matched = others[np.argsort(d, 1, kind="stable")[:, :3].ravel()]
    want = imgs[members].mean(0) - imgs[matched].mean(0)
    assert torch.allclose(got, want, atol=1e-6), float((got - want).abs().max())


@pytest.mark.parametrize("k", [0, -1, 2.5])
def test_neighbour_contrast_refuses_a_k_that_is_no_positive_integer(k):
    """k = 0 matched no other and divided by zero: a NaN contrast, no word of why."""
    imgs = torch.zeros(6, 1, 4, 4)
    z = np.arange(12, dtype=np.float32).reshape(6, 2)
    with pytest.raises(ValueError, match=rf"^k must be a positive integer \(neighbours per member\), got {k!r}$"):
        neighbour_contrast(ArraySource(imgs, None, name="k"), z, np.arange(3), np.arange(3, 6), k=k)


def test_neighbour_contrast_of_a_tight_blob_far_out_beside_a_wide_one_takes_the_nearest_others():
    """Others made of a wide group near the origin and a tight one at 1000: no one shift
    helps cdist's fp32 |a|^2 + |b|^2 - 2 a.b, and members inside the tight group got
    arbitrary "nearest" others (an unlabelled pool's contrast and mask)."""
    rng = np.random.default_rng(0)
    imgs = torch.as_tensor(rng.random((200, 1, 4, 4)), dtype=torch.float32)   # each image its own
    z = np.r_[rng.normal(size=(100, 2)), 1000 + 0.01 * rng.normal(size=(100, 2))].astype(np.float32)
    src = ArraySource(imgs, None, name="mix")
    members, others = np.arange(100, 130), np.r_[np.arange(0, 100), np.arange(130, 200)]
    got, _ = neighbour_contrast(src, z, members, others, k=3, seed=0)
    d = ((z[members, None].astype(np.float64) - z[None, others]) ** 2).sum(-1)   # exact, in fp64
    matched = others[np.argsort(d, 1, kind="stable")[:, :3].ravel()]
    want = imgs[members].mean(0) - imgs[matched].mean(0)
    assert torch.allclose(got, want, atol=1e-6), float((got - want).abs().max())


@pytest.mark.parametrize("case", ["tight blob at 1e8", "beyond fp32"])
def test_neighbour_contrast_of_float64_latents_takes_the_nearest_others(case):
    """float64 latents were re-measured from their fp32 copies: a tight group at 1e8 beside
    a wide one (no one shift helps) collapsed into one fp32 point, and latents past fp32's
    range were inf; either way members got arbitrary "nearest" others."""
    rng = np.random.default_rng(0)
    imgs = torch.as_tensor(rng.random((200, 1, 4, 4)), dtype=torch.float32)   # each image its own
    if case == "tight blob at 1e8":
        z, scale = np.r_[rng.normal(size=(100, 2)), 1e8 + 0.01 * rng.normal(size=(100, 2))], 1.0
        members, others = np.arange(100, 130), np.r_[np.arange(0, 100), np.arange(130, 200)]
    else:
        z, scale = 1e39 * rng.normal(size=(200, 3)), 1e39
        members, others = np.arange(30), np.arange(30, 200)
    got, _ = neighbour_contrast(ArraySource(imgs, None, name="f64"), z, members, others, k=3, seed=0)
    zs = z / scale   # exact distances in float64 (1e39 squared is past fp32, not float64)
    d = ((zs[members, None] - zs[None, others]) ** 2).sum(-1)
    matched = others[np.argsort(d, 1, kind="stable")[:, :3].ravel()]
    want = imgs[members].mean(0) - imgs[matched].mean(0)
    assert torch.allclose(got, want, atol=1e-6), float((got - want).abs().max())


class _CountingSource(ArraySource):
    """An ArraySource that counts the images read through get_batch (``reads``; which ones:
    ``read``) and its calls (``calls``: a DALI reread builds a pipeline per call)."""

    def __init__(self, x, labels):
        super().__init__(x, labels)
        self.reads = self.calls = 0
        self.read = []

    def get_batch(self, idx):
        self.reads += len(idx)
        self.calls += 1
        self.read.extend(np.asarray(idx).tolist())
        return super().get_batch(idx)


def _content_pool(n_classes, per_class, seed=0):
    """Each content class one grey level, plus noise; members (the first 2 of each class)
    carry a bright 2x2 patch at (1, 1)."""
    rng = np.random.default_rng(seed)
    content = np.repeat(np.arange(n_classes), per_class)
    x = (content[:, None, None, None] % 7) / 10 + 0.05 * rng.random((len(content), 1, 8, 8))
    members = np.concatenate([np.flatnonzero(content == k)[:2] for k in range(n_classes)])
    x[members, :, 1:3, 1:3] = 1.0
    others = np.setdiff1d(np.arange(len(content)), members)
    return torch.tensor(x, dtype=torch.float32), content, members, others


def test_contrast_map_reads_a_bounded_number_of_others_over_many_content_classes():
    """Members of 300 content classes read up to ``cap`` others of each: 300 x 40 = 12,000
    reads for 600 members here, 256,000 per finding on an ImageNet pool.  Past 16 x cap the
    classes share the reads by their members (at least one each); the patch still shows."""
    from spurfast.characterise import contrast_map
    x, content, members, others = _content_pool(300, 42)
    src = _CountingSource(x, content)
    contrast, _ = contrast_map(src, members, content[members], others, content[others], cap=40)
    # members: at most cap per class and 4 cap for their mean; others: 16 cap + one per class
    assert src.reads <= len(members) + 4 * 40 + 16 * 40 + 300, f"{src.reads} images read"
    assert np.array_equal(pattern_mask(contrast), np.pad(np.ones((2, 2), bool), ((1, 5), (1, 5))))


def test_contrast_map_of_few_content_classes_reads_as_before():
    """Under the budget nothing changes: the same draws, the same contrast, bit for bit."""
    from spurfast.characterise import contrast_map
    x, content, members, others = _content_pool(9, 400, seed=1)
    src = ArraySource(x, content)
    a = contrast_map(src, members, content[members], others, content[others], seed=3)
    b = contrast_map(src, members, content[members], others, content[others], seed=3, budget=10 ** 9)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_contrast_map_without_content_matched_others_compares_with_all_others():
    """No other of a member's content (or no other at all): the members' mean minus all
    others' (zero with none), as before the read budget."""
    from spurfast.characterise import contrast_map
    x, content, members, others = _content_pool(3, 10)
    src = ArraySource(x, content)
    got, mean = contrast_map(src, members, content[members], others, content[others] + 100)
    want = x[members].mean(0) - x[others].mean(0)
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(mean, x[members].mean(0), atol=1e-6)
    got, _ = contrast_map(src, members, content[members], others[:0], content[others][:0])
    assert torch.equal(got, torch.zeros_like(got))



def test_contrast_map_names_no_members_and_unpaired_content():
    from spurfast.characterise import contrast_map
    x, content, members, others = _content_pool(3, 10)
    src = ArraySource(x, content)
    with pytest.raises(ValueError, match="contrast_map: members is empty; a contrast needs at least one member"):
        contrast_map(src, members[:0], content[members][:0], others, content[others])
    with pytest.raises(ValueError, match=rf"contrast_map: {len(others)} others but {len(others) - 1} content classes"):
        contrast_map(src, members, content[members], others, content[others][1:])


def test_exemplars_are_the_members_nearest_their_mean_ties_by_index():
    from spurfast.characterise import exemplars

    def one(z, members, m):
        return [e.tolist() for e in exemplars(z, [np.asarray(members)], m)][0]

    z = np.array([[0.0], [10.0], [1.0], [-1.0], [0.5]])
    assert one(z, np.arange(5), 2) == [2, 4]      # mean 2.1: 1.1 and 1.6 away
    z = np.zeros((10, 1))
    z[5], z[3], z[9] = 1.0, -1.0, 0.0                             # mean 0: 9, then 3 and 5 tied
    assert one(z, [3, 5, 9], 2) == [9, 3]
    assert one(z, [3, 5, 9], 5) == [9, 3, 5]
    # several findings in one call, each about its own mean (an empty one among them), as one by one
    z = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    lists = [np.array([1, 4, 7, 30, 41]), np.array([], np.int64), np.array([2]), np.arange(10, 30)]
    got = exemplars(z, lists, 4)
    assert [g.tolist() for g in got] == [one(z, ms, 4) for ms in lists]
    for ms, g in zip(lists, got):
        if len(ms):
            d = ((z[ms] - z[ms].astype(np.float64).mean(0)) ** 2).sum(1)
            assert g.tolist() == ms[np.lexsort((ms, d))][:4].tolist()
    assert [g.tolist() for g in exemplars(z, lists, 0)] == [[], [], [], []]
    assert exemplars(z, [], 3) == []


def test_linear_probe_cuts_at_the_midpoint_of_the_projected_means():
    """The threshold decides which clusters merge into a finding and how many images it expands
    to; a ranking (z @ w - thr) is the same whatever it is, so no ranking metric checks it."""
    from spurfast.characterise import linear_probe

    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal([3.0, 1.0], 1.0, (200, 2)), rng.normal([-1.0, 0.0], 1.0, (300, 2))])
    pos, neg = np.arange(200), np.arange(200, 500)
    w, thr = linear_probe(z, pos, neg)
    assert thr == pytest.approx(0.5 * (z[pos].mean(0) @ w + z[neg].mean(0) @ w))
    side = z @ w - thr
    assert (side[pos] > 0).mean() > 0.95 and (side[neg] < 0).mean() > 0.95


def test_linear_probe_of_one_image_against_many_is_finite_and_of_none_refused():
    from spurfast.characterise import linear_probe

    rng = np.random.default_rng(1)
    z = np.concatenate([[[4.0, 4.0, 0.0]], rng.normal(0, 1, (50, 3))])
    w, thr = linear_probe(z, np.array([0]), np.arange(1, 51))
    assert np.isfinite(w).all() and np.isfinite(thr)
    assert (z @ w - thr)[0] > 0 and ((z @ w - thr)[1:] < 0).mean() > 0.9
    with pytest.raises(ValueError, match="both sides, got 0 positive and 50 negative"):
        linear_probe(z, np.array([], int), np.arange(1, 51))


@pytest.mark.parametrize("read_bytes", [None, 1, 4 * 64 * 25])
def test_group_means_are_each_groups_own_mean_bit_for_bit(read_bytes, monkeypatch):
    """Groups read together (their union once), or apart where the union exceeds READ_BYTES
    (1 byte: one group a read; 25 images of 8 x 8: a few groups a read), each mean is the
    group's own get_batch mean, rows in the group's order, repeats and overlaps included."""
    import spurfast.characterise as ch

    if read_bytes is not None:
        monkeypatch.setattr(ch, "READ_BYTES", read_bytes)
    x, content, _, _ = _content_pool(4, 30, seed=5)
    rng = np.random.default_rng(0)
    groups = [rng.choice(120, n, replace=False) for n in (7, 1, 30, 12, 19)] + [np.array([5, 3, 5]), np.arange(120)]
    src = _CountingSource(x, content)
    got = ch.group_means(src, groups)
    for g, m in zip(groups, got):
        assert torch.equal(m, ArraySource(x, content).get_batch(g)[0].double().mean(0).float())
    fewest, most = {None: (1, 1), 1: (len(groups), len(groups))}.get(read_bytes, (2, len(groups) - 1))
    assert fewest <= src.calls <= most, src.calls


def test_a_contrast_map_reads_once_where_its_samples_fit(monkeypatch):
    """Two reads per content class and one for the members' mean were one read; the contrast
    is the same bit for bit when the samples take one read per group (READ_BYTES = 1)."""
    import spurfast.characterise as ch

    x, content, members, others = _content_pool(9, 60, seed=1)
    src = _CountingSource(x, content)
    one = ch.contrast_map(src, members, content[members], others, content[others], seed=3)
    assert src.calls == 1
    monkeypatch.setattr(ch, "READ_BYTES", 1)
    apart = ch.contrast_map(src, members, content[members], others, content[others], seed=3)
    assert src.calls == 1 + 2 * 9 + 1
    assert torch.equal(one[0], apart[0]) and torch.equal(one[1], apart[1])


@pytest.mark.parametrize("n_low, n_high", [(90, 10), (20, 80)])
def test_otsu_cuts_a_bimodal_set_in_its_gap(n_low, n_high):
    from spurfast.characterise import otsu_threshold
    v = np.r_[np.linspace(0, 0.3, n_low), np.linspace(0.7, 1.0, n_high)]
    t = otsu_threshold(v)
    assert 0.3 <= t < 0.7, t


def test_magnitude_is_the_largest_over_channels():
    from spurfast.characterise import contrast_magnitude
    c = torch.zeros(3, 4, 4)
    c[0, 0, 0] = -0.6          # one channel only
    c[:, 1, 1] = 0.3           # all three, weaker
    mag = contrast_magnitude(c)
    assert mag[0, 0] == pytest.approx(0.6) and mag[1, 1] == pytest.approx(0.3)


def _two_content_pool():
    # content 0: members 0..2 (value 0.9), others 3..6 (0.1); content 1: member 7 (0.5), others 8..9 (0.4)
    vals = np.array([0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1, 0.5, 0.4, 0.4], np.float32)
    x = np.broadcast_to(vals[:, None, None, None], (10, 1, 2, 2)).copy()
    return ArraySource(x, np.zeros(10, int), name="content")


def test_contrast_is_members_minus_others_weighted_by_members():
    from spurfast.characterise import contrast_map
    src = _two_content_pool()
    contrast, mean = contrast_map(src, np.array([0, 1, 2, 7]), np.array([0, 0, 0, 1]),
                                  np.array([3, 4, 5, 6, 8, 9]), np.array([0, 0, 0, 0, 1, 1]))
    want = (3 * (0.9 - 0.1) + 1 * (0.5 - 0.4)) / 4       # 0.625
    assert torch.allclose(contrast, torch.full((1, 2, 2), want), atol=1e-6)
    assert torch.allclose(mean, torch.full((1, 2, 2), (3 * 0.9 + 0.5) / 4), atol=1e-6)


def test_at_most_cap_others_of_a_content_class_are_read():
    from spurfast.characterise import contrast_map

    x = np.random.default_rng(0).uniform(0, 1, (40, 1, 2, 2)).astype(np.float32)
    src = _CountingSource(x, np.zeros(40, int))
    others = np.arange(4, 40)
    contrast_map(src, np.arange(4), np.zeros(4, int), others, np.zeros(36, int), cap=5)
    assert len(set(src.read) & set(others.tolist())) <= 5


def test_a_content_class_past_the_budget_still_gets_one_other():
    from spurfast.characterise import contrast_map
    x = np.random.default_rng(0).uniform(0, 1, (60, 1, 2, 2)).astype(np.float32)
    src = ArraySource(x, np.zeros(60, int), name="b")
    # content 0: 20 members, content 1: 1 member; 19 others each; budget 4: content 1's share rounds to 0
    members, m_content = np.arange(21), np.r_[np.zeros(20, int), 1]
    others, o_content = np.arange(21, 59), np.r_[np.zeros(19, int), np.ones(19, int)]
    contrast, _ = contrast_map(src, members, m_content, others, o_content, cap=10, budget=4)
    assert torch.isfinite(contrast).all()
