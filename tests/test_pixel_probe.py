"""Pixel probes of diffuse findings (`spurfast.pixel_probe`, `spurfast.pattern_rank`) on
hand-made pools with known carriers."""
import numpy as np
import pytest
import torch

from spurfast.data.sources import ArraySource
from spurfast.metrics import average_precision
from spurfast.pattern_rank import pattern_rankings
from spurfast.pixel_probe import (full_size_pattern, negative_sample, positive_sample, robust_z,
                                  thumbnails)
from test_pattern_rank import CountingSource


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 29, 31), (2, 9, 40), (1, 14, 14), (3, 64, 64)])
def test_the_full_size_pattern_projects_as_the_thumbnail_probe(shape):
    """<x, p> = <thumbnails(x), w>: odd sides (ceil pooling's partial windows), a side already
    small enough (no pooling), several channels."""
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.uniform(0, 1, (5, *shape)))
    t = thumbnails(x)
    assert min(shape[1:]) <= 14 or max(d for d in shape[1:]) > 14   # shapes as described
    w = rng.normal(size=t.shape[1])
    p = full_size_pattern(w, shape)
    assert tuple(p.shape) == shape and p.dtype == torch.float64
    np.testing.assert_allclose(x.reshape(5, -1).numpy() @ p.reshape(-1).numpy(), t.numpy() @ w, rtol=1e-10,
                               atol=1e-12)


def test_thumbnails_pool_until_a_side_is_at_most_14():
    assert thumbnails(torch.zeros(2, 1, 28, 28)).shape == (2, 196)
    assert thumbnails(torch.zeros(2, 3, 64, 64)).shape == (2, 3 * 8 * 8)
    assert thumbnails(torch.zeros(2, 1, 10, 100)).shape == (2, 1000)    # one short side: no pooling


def test_robust_z_centres_on_the_median_in_units_of_the_interquartile_range():
    v = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 100.0])
    z = robust_z(v)
    assert np.median(z) == pytest.approx(0.0)
    q1, q3 = np.percentile(z, [25, 75])
    assert q3 - q1 == pytest.approx(1.0)
    assert np.isfinite(robust_z(np.r_[np.zeros(10), 1.0])).all()        # IQR 0: the std instead
    np.testing.assert_array_equal(robust_z(np.ones(4)), np.zeros(4))       # no spread at all
    assert len(robust_z(np.zeros(0))) == 0


def test_samples_are_capped_sorted_and_reproducible():
    pred = np.full(100, 2)
    pred[::7] = -1                                                         # no prediction: never drawn
    neg = negative_sample(pred, cap=30)
    assert len(neg) == 30 and np.all(np.diff(neg) > 0) and np.all(pred[neg] >= 0)
    np.testing.assert_array_equal(neg, negative_sample(pred, cap=30))
    np.testing.assert_array_equal(negative_sample(pred, cap=1000), np.nonzero(pred >= 0)[0])
    pos = positive_sample(np.array([9, 3, 3, 5]), cap=10)
    np.testing.assert_array_equal(pos, [3, 5, 9])
    assert len(positive_sample(np.arange(50), cap=8)) == 8


# ------------------------------------------------------------------ pattern_rankings, diffuse findings
N, H, W = 400, 16, 16
CLASS = 3


def _noise_pool(seed=0):
    """Images of several brightness 'contents'; every fifth carries one fixed noise image added
    over the whole frame (a diffuse shortcut).  Predictions: carriers and 40 genuine images
    (of a content of their own) are class 3, the rest spread over 0-2."""
    rng = np.random.default_rng(seed)
    content = rng.integers(0, 4, N)
    x = (0.2 + 0.15 * content[:, None, None, None] + 0.05 * rng.normal(size=(N, 1, H, W))).astype(np.float32)
    x += (rng.uniform(0, 1, (N, 1, H, W)) * 0.2 * (np.arange(W) / W)).astype(np.float32)   # content texture
    noise = rng.uniform(-0.3, 0.3, (1, H, W)).astype(np.float32)
    carries = np.arange(N) % 5 == 0
    x[carries] += noise
    pred = rng.integers(0, 3, N)
    pred[carries] = CLASS
    genuine = np.nonzero(~carries)[0][:40]
    pred[genuine] = CLASS
    x[genuine, :, :, :W // 2] += 0.3                       # the class's own content: a bright left half
    return ArraySource(np.clip(x, 0, 1), np.zeros(N, int), name="noise pool"), pred, carries, genuine


def _diffuse_finding(unrelated):
    mask = np.ones((H, W), bool)                           # the whole image: not localised
    return {"rank": 1, "class": CLASS, "_mask": mask, "_contrast": torch.full((1, H, W), 0.1),
            "_unrelated": np.asarray(unrelated)}


def test_a_diffuse_finding_is_ranked_by_its_pixels_where_the_latent_probe_knows_little():
    src, pred, carries, genuine = _noise_pool()
    latent = np.random.default_rng(1).normal(size=N) + 0.5 * carries   # a weak latent ranking
    before = average_precision(latent, carries)
    # a mixed cluster: 30 carriers and the 40 genuine images; only the carriers are unrelated
    f = _diffuse_finding(np.nonzero(carries)[0][:30])
    rankings = {1: latent.copy()}
    pattern_rankings([f], rankings, src, pred=pred)
    assert f["ranked_by"] == "latent+pixels"
    assert before < 0.5
    assert average_precision(rankings[1], carries) > 0.95
    # fitted on every member, genuine content included, the probe learns it too
    mixed = _diffuse_finding(np.r_[np.nonzero(carries)[0][:30], genuine])
    rankings_mixed = {1: latent.copy()}
    pattern_rankings([mixed], rankings_mixed, src, pred=pred)
    assert average_precision(rankings_mixed[1], carries) < 0.9


def test_without_predictions_or_unrelated_members_a_diffuse_finding_keeps_the_latent_ranking():
    src, pred, carries, _ = _noise_pool()
    latent = np.random.default_rng(1).normal(size=N)
    for kwargs, unrelated in (({}, np.nonzero(carries)[0]),              # no pred: as before
                              ({"pred": pred}, None),                   # not listed (a residual finding)
                              ({"pred": pred}, np.nonzero(carries)[0][:1])):   # one positive: no probe
        f = _diffuse_finding(unrelated)
        if unrelated is None:
            del f["_unrelated"]
        rankings = {1: latent.copy()}
        pattern_rankings([f], rankings, src, **kwargs)
        assert f["ranked_by"] == "latent"
        np.testing.assert_array_equal(rankings[1], latent)


def test_negatives_of_the_findings_class_are_left_out():
    """With every image predicted class 3, no negative is left: the latent ranking stays."""
    src, _, carries, _ = _noise_pool()
    latent = np.random.default_rng(1).normal(size=N)
    f = _diffuse_finding(np.nonzero(carries)[0])
    rankings = {1: latent.copy()}
    pattern_rankings([f], rankings, src, pred=np.full(N, CLASS))
    assert f["ranked_by"] == "latent"


def test_a_pred_of_the_wrong_length_is_refused():
    src, pred, carries, _ = _noise_pool()
    with pytest.raises(ValueError, match="one prediction per image"):
        pattern_rankings([_diffuse_finding(np.nonzero(carries)[0])], {1: np.zeros(N)}, src, pred=pred[:-1])


def test_a_pool_without_predictions_reads_nothing_and_keeps_the_latent_ranking():
    pool, _, carries, _ = _noise_pool()
    src = CountingSource(pool.get_batch(np.arange(N))[0].numpy(), np.zeros(N, int), name="counted")
    latent = np.random.default_rng(1).normal(size=N)
    f = _diffuse_finding(np.nonzero(carries)[0])
    rankings = {1: latent.copy()}
    pattern_rankings([f], rankings, src, pred=np.full(N, -1))          # every image unreadable at embedding
    assert f["ranked_by"] == "latent" and src.read == []
    np.testing.assert_array_equal(rankings[1], latent)
    pattern_rankings([f], rankings, src, pred=np.full(N, 1))           # predicted: the pass reads them
    assert f["ranked_by"] == "latent+pixels" and src.read


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_a_caller_without_autograd_still_gets_pixel_probes(context):
    """The pattern of a thumbnail probe is the pooling's adjoint, taken by autograd: inside a
    caller's no_grad (or inference_mode) it raised."""
    src, pred, carries, _ = _noise_pool()
    f = _diffuse_finding(np.nonzero(carries)[0][:30])
    rankings = {1: np.random.default_rng(1).normal(size=N)}
    with context():
        pattern_rankings([f], rankings, src, pred=pred)
    assert f["ranked_by"] == "latent+pixels"
    assert average_precision(rankings[1], carries) > 0.95


def test_an_image_the_probes_read_finds_unreadable_is_unranked(tmp_path):
    """A negative damaged since it was embedded, outside the re-ranked head: the probes' read
    finds it, and it is -inf like every unreadable image, not left at its latent place."""
    from PIL import Image

    from spurfast.data.folder import ImageFolderSource

    pool, pred, carries, _ = _noise_pool()
    x = pool.get_batch(np.arange(60))[0].numpy()
    for i in range(60):
        Image.fromarray((x[i, 0] * 255).astype(np.uint8)).save(tmp_path / f"{i:03d}.png")
    src = ImageFolderSource(tmp_path, size=H, channels=1)
    pred, carries = pred[:60], carries[:60]
    bad = next(i for i in range(10, 60) if pred[i] != CLASS)            # a negative below the head
    (tmp_path / f"{bad:03d}.png").write_bytes(b"damaged since it was embedded")
    f = _diffuse_finding(np.nonzero(carries)[0])
    rankings = {1: np.linspace(1, 0, 60)}                                # head: the first 10 images
    pattern_rankings([f], rankings, src, pred=pred, top=10)
    assert f["ranked_by"] == "latent+pixels" and bad in src.bad_files
    assert rankings[1][bad] == -np.inf
    assert np.isfinite(np.delete(rankings[1], bad)).all()


def test_the_probes_samples_of_a_large_pool_follow_the_runs_seed():
    """The pixel probe's samples (and the latent probe's negatives, above 20,000) were drawn
    from seed 0 whatever the run's --seed, "the seed of every random choice"."""
    import spurfast.discover as D

    pred = np.zeros(30000, np.int64)
    assert np.array_equal(negative_sample(pred, 100, seed=3), negative_sample(pred, 100, seed=3))
    assert not np.array_equal(negative_sample(pred, 100, seed=3), negative_sample(pred, 100, seed=4))
    assert not np.array_equal(positive_sample(np.arange(500), 50, seed=3), positive_sample(np.arange(500), 50, seed=4))
    rng = np.random.default_rng(0)
    z = rng.normal(size=(25000, 4)).astype(np.float32)
    g = np.r_[np.zeros(30, np.int64), np.ones(24970, np.int64)]
    z[:30] += 3.0
    w0, _ = D._probe(z, g, np.arange(30), 0, seed=0)
    assert np.array_equal(w0, D._probe(z, g, np.arange(30), 0, seed=0)[0])
    assert not np.array_equal(w0, D._probe(z, g, np.arange(30), 0, seed=1)[0])


def test_every_pixel_of_an_odd_sized_image_reaches_its_thumbnail():
    # floor pooling dropped the last row and column of a 29 x 31 image: a pattern there was invisible
    from spurfast.pixel_probe import full_size_pattern, thumbnails

    shape = (2, 29, 31)
    x = torch.zeros((1, *shape), dtype=torch.float64)
    x[0, :, -1, :] = 1.0                                      # the last row alone
    x[0, :, :, -1] = 1.0                                      # and the last column
    assert float(thumbnails(x).abs().sum()) > 0
    p = full_size_pattern(np.ones(thumbnails(x).shape[1]), shape)
    assert bool((p > 0).all())                                # each pixel has a say in some thumbnail value


def test_thumbnail_shape_is_channels_then_pooled_height_and_width():
    # a reordered (w, h, C) shape drew the pixel ablation's centroid pictures from scrambled values
    from spurfast.pixel_probe import thumbnail_shape

    assert thumbnail_shape((3, 29, 31)) == (3, 8, 8)
    assert thumbnail_shape((1, 28, 28)) == (1, 14, 14)
    assert thumbnail_shape((2, 10, 100)) == (2, 10, 100)


def test_robust_z_without_an_interquartile_range_scales_by_the_standard_deviation():
    # a fixed scale of 1 gave a score with most values tied its raw units, not an equal say beside the other
    from spurfast.pixel_probe import robust_z

    v = np.r_[np.zeros(10), 1.0]
    np.testing.assert_allclose(robust_z(v), v / v.std())
    np.testing.assert_allclose(robust_z(100 * v), v / v.std())


def test_fit_probe_is_the_ridge_fisher_direction_in_thumbnail_units():
    # 1-D by hand: standardised z = (x - 1) / 2 puts positives at 0.5, 1.5 and negatives at -0.5, 0.5;
    # pooled scatter 1 over 2 degrees of freedom = 0.5, plus 1e-2 of it: w_z = 1 / 0.505, and w = w_z / 2.
    # Without the final / spread w was in standardised units, without the first the ridge met raw
    # pixels, and a negative range starting one row early counted a positive as a negative too
    from spurfast.pixel_probe import fit_probe

    w = fit_probe(np.array([[2.0], [4.0]]), np.array([[0.0], [2.0]]), np.array([1.0]), np.array([2.0]))
    np.testing.assert_allclose(w, [1 / 0.505 / 2], rtol=1e-12)


def test_fit_probe_scores_do_not_depend_on_the_units_of_each_thumbnail_value():
    # w in standardised units ranked raw thumbnails with a pixel of large spread given too much weight
    from spurfast.pixel_probe import fit_probe

    rng = np.random.default_rng(0)
    pos = rng.normal(size=(20, 3)) + [1.0, 0.0, 0.5]
    neg = rng.normal(size=(30, 3))
    s = np.array([1.0, 100.0, 0.01])
    w = fit_probe(pos, neg, neg.mean(0), neg.std(0))
    ws = fit_probe(pos * s, neg * s, neg.mean(0) * s, neg.std(0) * s)
    np.testing.assert_allclose(ws * s, w, rtol=1e-9)


def test_a_thumbnail_pixel_constant_over_the_negatives_leaves_the_probe_finite():
    # a black border (MNIST-like) is the same in every negative: its spread is 0
    src, pred, carries, _ = _noise_pool()
    x = src.images.clone()
    x[:, :, :2, :] = 0.0
    rankings = {1: np.random.default_rng(1).normal(size=N)}
    f = _diffuse_finding(np.nonzero(carries)[0][:30])
    pattern_rankings([f], rankings, ArraySource(x, np.zeros(N, int), name="bordered"), pred=pred)
    assert f["ranked_by"] == "latent+pixels"
    assert np.isfinite(rankings[1]).all()
    assert average_precision(rankings[1], carries) > 0.95


def test_unreadable_images_are_no_probe_examples(tmp_path, monkeypatch):
    from PIL import Image

    import spurfast.pattern_rank as PR
    from spurfast.data.folder import ImageFolderSource
    src, pred, carries, _ = _noise_pool()
    n = 60
    pred, carries = pred[:n], carries[:n]
    for i in range(n):
        Image.fromarray((src.images[i, 0].numpy() * 255).astype(np.uint8)).save(tmp_path / f"{i:03d}.png")
    negative = pred != CLASS
    bad_neg, bad_pos = int(np.argmax(negative)), int(np.argmax(carries))
    for b in (bad_neg, bad_pos):
        (tmp_path / f"{b:03d}.png").write_bytes(b"damaged")
    seen = {}
    real = PR.fit_probe

    def spy(pos, neg, centre, spread):
        seen["pos"], seen["neg"] = pos, neg
        return real(pos, neg, centre, spread)
    monkeypatch.setattr(PR, "fit_probe", spy)
    PR.pattern_rankings([_diffuse_finding(np.nonzero(carries)[0])], {1: np.linspace(1, 0, n)},
                        ImageFolderSource(tmp_path, size=16, channels=1), pred=pred)
    assert len(seen["pos"]) == carries.sum() - 1 and len(seen["neg"]) == negative.sum() - 1
    assert (np.abs(seen["pos"]).sum(1) > 0).all() and (np.abs(seen["neg"]).sum(1) > 0).all()


def test_a_diffuse_finding_without_a_localised_peak_adds_no_peak_term(monkeypatch):
    """Equal contrast over the whole image: its peak is the whole image, no stamp, so the ranking is
    the latent and pixel probes' alone, as with no peak at all."""
    import spurfast.pattern_rank as pr
    src, pred, carries, _ = _noise_pool()
    latent = np.random.default_rng(1).normal(size=N) + 0.5 * carries
    f = _diffuse_finding(np.nonzero(carries)[0][:30])
    rankings = {1: latent.copy()}
    pattern_rankings([f], rankings, src, pred=pred)
    monkeypatch.setattr(pr, "peak_mask", lambda mask, contrast: np.zeros_like(mask))
    g = _diffuse_finding(np.nonzero(carries)[0][:30])
    without = {1: latent.copy()}
    pattern_rankings([g], without, src, pred=pred)
    assert f["ranked_by"] == g["ranked_by"] == "latent+pixels"
    np.testing.assert_array_equal(rankings[1], without[1])
