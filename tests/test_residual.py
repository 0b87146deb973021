"""The residual scan (spurfast.residual) on hand-made pools with known answers."""
import numpy as np
import pytest
import torch

from spurfast.metrics import average_precision
from spurfast.residual import ClassSums, ResidualConfig, peak_windows, reconstruction_residuals, residual_scan

SHAPE = (1, 12, 12)


def _pool(n=1200, carriers=0.15, seed=0):
    """Residual noise, 4-d content latents, labels 0-3 and predictions by content; a share
    ``carriers`` of the images carry a bright residual at pixel (9, 9) and are called class 4
    (a class no image is) four times in five."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4)).astype(np.float32)
    labels = rng.integers(0, 4, n)
    # content: mostly the label, sometimes the class the latent points to
    pred = np.where(rng.random(n) < 0.8, labels, np.argmax(z, 1))
    res = torch.as_tensor(rng.normal(scale=0.1, size=(n, 144)), dtype=torch.float32)
    carries = rng.random(n) < carriers
    res[torch.as_tensor(carries), 9 * 12 + 9] += 1.0
    pred = np.where(carries & (rng.random(n) < 0.8), 4, pred)
    return res, z, pred, labels, carries


def test_class_tmaps_are_welch_t_per_pixel():
    rng = np.random.default_rng(1)
    r = torch.as_tensor(rng.normal(size=(60, 3)))
    labels = rng.integers(-1, 2, 60)          # -1: unlabelled, in both groups of every class
    pred = rng.integers(0, 3, 60)
    pred[:6] = 2
    t = ClassSums(r, labels, 3).tmaps(pred, 2)
    for c in range(3):
        a, b = (pred == c) & (labels != c), (pred != c) & (labels != c)
        x, y = r.numpy()[a], r.numpy()[b]
        want = (x.mean(0) - y.mean(0)) / np.sqrt(x.var(0, ddof=1) / len(x) + y.var(0, ddof=1) / len(y))
        np.testing.assert_allclose(t[c].numpy(), want, rtol=1e-9, err_msg=f"class {c}")


def test_class_tmaps_leave_small_classes_nan():
    r = torch.ones((10, 2), dtype=torch.float64)
    t = ClassSums(r, np.full(10, -1), 2).tmaps(np.array([0] * 8 + [1] * 2), 3)
    assert torch.isnan(t[1]).all() and not torch.isnan(t[0]).any()
    assert (t[0] == 0).all()     # a constant pixel has no spread: t 0, not NaN or inf
    # enough images called class 0, but one called another class: no second group to compare with
    t = ClassSums(r, np.full(10, -1), 2).tmaps(np.array([0] * 9 + [1]), 3)
    assert torch.isnan(t[0]).all()


def test_peak_window_ratio_and_mask():
    t = torch.zeros(1, 6, 6, dtype=torch.float64) + 0.5
    t[0, 0, 5] = 2.0      # the best outside the window
    t[0, 3, 3] = 8.0      # the peak
    t[0, 2, 3] = 3.0      # beside it, above the best outside: in the mask
    t[0, 4, 4] = 1.0      # beside it, below: not
    stat, mask = peak_windows(t.view(1, -1), (1, 6, 6))
    assert stat[0] == pytest.approx(4.0)
    assert sorted(zip(*np.nonzero(mask[0]))) == [(2, 3), (3, 3)]
    t[0, 0, 0] = 8.0      # a tie far away: ratio 1, and the (first) peak alone is its mask, never none
    stat, mask = peak_windows(t.view(1, -1), (1, 6, 6))
    assert stat[0] == 1.0 and sorted(zip(*np.nonzero(mask[0]))) == [(0, 0)]


def test_peak_window_at_the_border_nan_and_nothing_positive():
    t = torch.full((3, 25), 1.0, dtype=torch.float64)
    t[0, 0] = 3.0                    # a corner peak: its window is clipped
    t[1] = float("nan")
    t[2] = -1.0
    t[2, 7] = 0.5                    # the only positive t: nothing outside to compare with
    stat, mask = peak_windows(t, (5, 5))
    assert stat[0] == pytest.approx(3.0) and mask[0].sum() == 1 and mask[0, 0, 0]
    assert np.isnan(stat[1]) and not mask[1].any()
    assert stat[2] == np.inf and mask[2, 1, 2]
    stat, _ = peak_windows(torch.full((1, 25), -1.0, dtype=torch.float64), (5, 5))
    assert stat[0] == 0.0            # no t positive at all: nothing stands out


def test_peak_windows_take_the_strongest_channel():
    t = torch.zeros(1, 3, 4, 4, dtype=torch.float64) + 0.1
    t[0, 2, 1, 1] = 5.0
    t[0, 0, 3, 3] = 1.0
    stat, mask = peak_windows(t.view(1, -1), (3, 4, 4))
    assert stat[0] == pytest.approx(5.0) and mask[0, 1, 1] and mask.shape == (1, 4, 4)


def test_scan_finds_a_pixel_the_latent_does_not_hold():
    res, z, pred, labels, carries = _pool()
    found = residual_scan(res, z, pred, labels, np.zeros(len(pred), bool), SHAPE, ResidualConfig(n_null=100))
    assert [f["class"] for f in found] == [4]
    f = found[0]
    assert f["peak"] == [9, 9] and f["_mask"][9, 9] and f["_mask"].sum() == 1
    assert f["q_value"] <= 0.05 and f["p_value"] == pytest.approx(1 / 101)
    assert average_precision(f["ranking"], carries) > 0.99
    # energy: the squared residual in the mask, bright or dark alike
    np.testing.assert_allclose(f["ranking"], res[:, 9 * 12 + 9].double().square().numpy(), rtol=1e-6)
    assert carries[f["members"]].mean() > 0.95
    assert f["_contrast"].shape == SHAPE and float(f["_contrast"][0, 9, 9]) > 0.9


def test_a_label_no_image_is_called_takes_part():
    """Labels beyond every prediction (a class the model never calls) counted towards the
    classes' tables: sized by the predictions alone, they did not fit."""
    res, z, pred, labels, carries = _pool()
    labels = labels.copy()
    labels[np.flatnonzero(~carries & (pred != 4))[:50]] = 6   # no image is called 6
    found = residual_scan(res, z, pred, labels, np.zeros(len(pred), bool), SHAPE, ResidualConfig(n_null=100))
    assert [f["class"] for f in found] == [4]


def test_findings_of_equal_q_come_by_score():
    """Two shortcuts, each above every resampling (the same q): the one standing further above
    the rest of its map first."""
    res, z, pred, labels, carries = _pool(carriers=0.1)
    rng = np.random.default_rng(1)
    second = ~carries & (rng.random(len(pred)) < 0.1)
    res[torch.as_tensor(second), 2 * 12 + 2] += 0.4
    pred = np.where(second & (rng.random(len(pred)) < 0.8), 5, pred)
    found = residual_scan(res, z, pred, labels, np.zeros(len(pred), bool), SHAPE, ResidualConfig(n_null=100))
    assert sorted(f["class"] for f in found) == [4, 5] and found[0]["q_value"] == found[1]["q_value"]
    assert found[0]["score"] > found[1]["score"], [(f["class"], f["score"]) for f in found]


def test_float64_residuals_are_scanned_as_float32():
    """A float64 input failed at the windows' float32 masks, after the whole null had run."""
    res, z, pred, labels, _ = _pool()
    found = residual_scan(res.double(), z, pred, labels, np.zeros(len(pred), bool), SHAPE, ResidualConfig(n_null=100))
    want = residual_scan(res, z, pred, labels, np.zeros(len(pred), bool), SHAPE, ResidualConfig(n_null=100))
    assert [f["class"] for f in found] == [f["class"] for f in want] == [4]
    np.testing.assert_array_equal(found[0]["ranking"], want[0]["ranking"])


def test_scan_finds_nothing_where_predictions_follow_content():
    res, z, pred, labels, _ = _pool(carriers=0.0)
    # content the VAE misses, spread: images called 3 without the label draw a little more
    # residual everywhere (a detail the classifier reads and the latent does not)
    spread = torch.as_tensor((pred == 3) & (labels != 3))
    res[spread] += 0.05 * torch.randn(int(spread.sum()), 144, generator=torch.Generator().manual_seed(0))
    for seed in range(3):
        found = residual_scan(res, z, pred, labels, np.zeros(len(pred), bool), SHAPE,
                              ResidualConfig(n_null=100, seed=seed))
        assert found == [], [(f["class"], f["p_value"]) for f in found]


def test_scan_leaves_suspects_out_of_the_test_but_ranks_them():
    res, z, pred, labels, carries = _pool()
    suspect = np.zeros(len(pred), bool)
    suspect[:100] = True
    res[:100] = res[:100] * 0 + 5.0        # wild suspects must not move the test ...
    a = residual_scan(res, z, pred, labels, suspect, SHAPE, ResidualConfig(n_null=150))
    res2 = res.clone()
    res2[:100] = 0.0
    b = residual_scan(res2, z, pred, labels, suspect, SHAPE, ResidualConfig(n_null=150))
    assert [(f["class"], f["p_value"], f["score"]) for f in a] == [(f["class"], f["p_value"], f["score"]) for f in b]
    assert (a[0]["ranking"][:100] > a[0]["ranking"][100:].max()).all()   # ... but they are ranked


def test_scan_is_reproducible_from_its_seed():
    res, z, pred, labels, _ = _pool(carriers=0.04)
    runs = [residual_scan(res, z, pred, labels, np.zeros(len(pred), bool), SHAPE, ResidualConfig(n_null=60, seed=s))
            for s in (3, 3)]
    assert [(f["class"], f["p_value"]) for f in runs[0]] == [(f["class"], f["p_value"]) for f in runs[1]]


def test_scan_refuses_bad_input():
    res, z, pred, labels, _ = _pool(n=50)
    sus = np.zeros(50, bool)
    with pytest.raises(ValueError, match="one row per pool image"):
        residual_scan(res[:49], z, pred, labels, sus, SHAPE)
    with pytest.raises(ValueError, match="image_shape"):
        residual_scan(res, z, pred, labels, sus, (1, 12, 11))
    with pytest.raises(ValueError, match="max_values"):
        residual_scan(res, z, pred, labels, sus, SHAPE, ResidualConfig(max_values=1000))
    for bad in (dict(n_null=0), dict(fdr=1.0), dict(min_images=1), dict(n_neighbours=2.5), dict(n_neighbours=0),
                dict(seed=-1), dict(max_values=0), dict(batch_size=0)):
        with pytest.raises((ValueError, TypeError)):
            ResidualConfig(**bad)


def test_reconstruction_residuals_are_image_minus_decoding():
    from spurfast.data.sources import ArraySource

    class Halve(torch.nn.Module):
        def decode(self, mu):
            return mu.view(-1, 1, 2, 2) / 2

    x = torch.rand(7, 1, 2, 2)
    mu = np.random.default_rng(0).random((7, 4)).astype(np.float32)
    got = reconstruction_residuals(ArraySource(x), mu, Halve(), batch_size=3)
    np.testing.assert_allclose(got.numpy(), (x.view(7, 4) - torch.as_tensor(mu) / 2).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="max_values"):
        reconstruction_residuals(ArraySource(x), mu, Halve(), max_values=27)
    with pytest.raises(ValueError, match="rows"):
        reconstruction_residuals(ArraySource(x), mu[:6], Halve())


def test_merge_keeps_the_clusters_order_and_places_residual_findings_by_q():
    from spurfast.feature_view import merge_by_q   # the evaluation's join of the two families
    clusters = [{"id": "c1", "q_value": 0.02}, {"id": "c2", "q_value": 0.01}, {"id": "c3", "q_value": 0.08}]
    residual = [{"id": "r1", "q_value": 0.01}, {"id": "r2", "q_value": 0.05}, {"id": "r3", "q_value": 0.09}]
    assert [f["id"] for f in merge_by_q(clusters, residual)] == ["r1", "c1", "c2", "r2", "c3", "r3"]
    assert merge_by_q([], residual) == residual and merge_by_q(clusters, []) == clusters


class _PixelShortcutModel(torch.nn.Module):
    """Calls an image class 2 when pixel (14, 8) is bright, else 0 or 1 by which half holds
    the blob: a model that learned a one-pixel shortcut."""

    def forward(self, x):
        left, right = x[:, 0, :, :8].mean((1, 2)), x[:, 0, :, 8:].mean((1, 2))
        return torch.stack([20 * (left - right), 20 * (right - left), 40 * (x[:, 0, 14, 8] - 0.5)], 1)


def _blob_pool(n=600, seed=0):
    """Blobs on the left (label 0) or right (label 1); a sixth of the images carry a bright
    pixel at (14, 8), which the model reads as class 2 (no image's label)."""
    rng = np.random.default_rng(seed)
    x = torch.zeros(n, 1, 16, 16)
    labels = rng.integers(0, 2, n)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    for i in range(n):
        cy, cx = rng.uniform(4, 10), rng.uniform(2, 5) + 9 * labels[i]
        x[i, 0] = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(1.5, 2.5) ** 2))
    carries = rng.random(n) < 1 / 6
    x[torch.as_tensor(carries), 0, 14, 8] = 1.0
    return x, labels, carries


def test_discover_run_reports_the_residual_finding(tmp_path):
    import json

    from spurfast.data import ArraySource
    from spurfast.discover import DiscoverConfig
    from spurfast.models import VAEConfig
    from spurfast.models.train import train_vae
    from spurfast.pipeline import run_discovery

    x, labels, carries = _blob_pool()
    pool = ArraySource(x, labels, name="blobs")
    vae = train_vae(pool, VAEConfig.for_images(1, 16, 4), epochs=6, seed=0, progress=False)
    doc, result, _ = run_discovery(pool, _PixelShortcutModel(), vae, tmp_path / "run", num_classes=3,
                                   config=DiscoverConfig(k=4, n_null=10, max_null=10), progress=False,
                                   residual=ResidualConfig(n_null=100))
    found = [f for f in doc["findings"] if f.get("kind") == "residual"]
    assert [(f["class"], f["peak"], f["cluster"]) for f in found] == [(2, [14, 8], -1)]
    f = found[0]
    assert carries[f["members"]].mean() > 0.95 and f["size"] == len(f["members"])
    assert f["confirm"] is not None and f["confirm"]["flip_rate"] > 0.9    # pasting the pixel moves the model
    ranking = np.load(tmp_path / "run" / "rankings" / f"finding{f['rank']}.npy")
    assert average_precision(ranking, carries) > 0.99
    for path in f["images"].values():
        assert (tmp_path / "run" / path).is_file()
    on_disk = json.loads((tmp_path / "run" / "findings.json").read_text())
    assert on_disk["config"]["inputs"]["residual_scan"]["n_null"] == 100
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Residual scan" in page and "peaking at pixel (y 14, x 8)" in page and "members&#x27; mean image" in page


def test_discover_run_refuses_a_pool_too_large_for_the_scan_before_any_work(tmp_path):
    from spurfast.data import ArraySource
    from spurfast.models import VAE, SmallCNN, VAEConfig
    from spurfast.pipeline import run_discovery

    pool = ArraySource(torch.rand(20, 1, 16, 16), np.zeros(20, dtype=np.int64))
    with pytest.raises(ValueError, match="max_values"):
        run_discovery(pool, SmallCNN(1, 2, 16), VAE(VAEConfig.for_images(1, 16, 4)), tmp_path / "o", num_classes=2,
                      progress=False, residual=ResidualConfig(max_values=1000))
    assert not (tmp_path / "o").exists()


def test_scan_without_labels_and_in_colour():
    """An unlabelled pool (labels -1: every image of no class, one neighbourhood) of RGB
    images whose shortcut is a pixel in the green channel only."""
    rng = np.random.default_rng(5)
    n = 900
    z = rng.normal(size=(n, 4)).astype(np.float32)
    pred = np.argmax(z[:, :3], 1)                                   # content decides, classes 0-2
    res = torch.as_tensor(rng.normal(scale=0.1, size=(n, 3, 6, 8)), dtype=torch.float32)
    carries = rng.random(n) < 0.15
    res[torch.as_tensor(carries), 1, 4, 2] -= 1.0                   # a dark pixel: energy either way
    pred = np.where(carries & (rng.random(n) < 0.8), 3, pred)
    found = residual_scan(res.view(n, -1), z, pred, np.full(n, -1), np.zeros(n, bool), (3, 6, 8),
                          ResidualConfig(n_null=100))
    assert [(f["class"], f["peak"]) for f in found] == [(3, [4, 2])]
    assert found[0]["_mask"].shape == (6, 8) and float(found[0]["_contrast"][1, 4, 2]) < -0.9
    assert average_precision(found[0]["ranking"], carries) > 0.99


def test_reconstruction_residuals_of_a_folder_through_its_loader(tmp_path):
    from PIL import Image

    from spurfast.data.folder import ImageFolderSource

    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "5.png").write_bytes(b"not an image")        # unreadable: its row stays 0
    pool = ImageFolderSource(tmp_path, size=16)

    class Grey(torch.nn.Module):
        def decode(self, mu):
            return torch.full((len(mu), 3, 16, 16), 0.5)

    readable = np.ones(6, bool)
    readable[2] = False                                       # left out by the store: not read
    got = reconstruction_residuals(pool, np.zeros((6, 4), np.float32), Grey(), batch_size=4, readable=readable,
                                   num_workers=0, loader_backend="torch")
    want = pool.get_batch([0, 1, 3, 4])[0].reshape(4, -1) - 0.5
    np.testing.assert_allclose(got[[0, 1, 3, 4]].numpy(), want.numpy(), atol=1e-6)
    assert (got[2] == 0).all() and (got[5] == 0).all()   # not read, and read but unreadable: not -0.5


@pytest.mark.parametrize("n_rows", [0, 1, 7, 4097])
def test_mean_rows_in_chunks_is_the_mean(n_rows):
    """A finding's contrast averages every other class's residuals chunk by chunk (a float64
    copy of them all was n x P x 8 bytes); the mean is the one-shot mean's."""
    from spurfast.residual import _mean_rows
    values = torch.randn(5000, 3, 5, 7)
    rows = np.sort(np.random.default_rng(n_rows).choice(5000, n_rows, replace=False))
    got = _mean_rows(values, rows, chunk=1000)
    assert got.dtype == torch.float64 and got.shape == (3, 5, 7)
    if n_rows:
        torch.testing.assert_close(got, values[torch.as_tensor(rows)].double().mean(0), rtol=1e-12, atol=1e-12)
    else:
        assert torch.isnan(got).all()   # no other image: no contrast, as an empty mean


def _store_of(root, mu, pred, labels, n_classes, ok=None):
    from spurfast.store import EmbeddingStore

    n = len(mu)
    probs = np.full((n, n_classes), 0.1 / (n_classes - 1), np.float32)
    probs[np.arange(n), pred] = 0.9
    store = EmbeddingStore.create(root, n, {"pred": ((n,), "int32"), "probs": ((n, n_classes), "float32"),
                                            "mu": ((n, mu.shape[1]), "float32"), "labels": ((n,), "int64"),
                                            "ok": ((n,), "bool")}, {"num_classes": n_classes})
    store.write(0, {"pred": pred, "probs": probs, "mu": mu, "labels": labels,
                    "ok": np.ones(n, bool) if ok is None else ok})
    return store


class _GreyDecoder(torch.nn.Module):
    def decode(self, z):
        return torch.full((len(z), 1, 12, 12), 0.5)


def test_a_residual_finding_is_written_as_json_and_counts_unrelated_members_as_clusters_do(tmp_path):
    """Carriers plainer than the rest left no positive t outside the peak's window: the score was
    +inf and findings.json held the token Infinity (not JSON); and unlabelled suspect members
    counted as unrelated, where the clusters' count and the report's words leave them out."""
    import json

    from spurfast.data.sources import ArraySource
    from spurfast.discover import DiscoveryResult, write_outputs
    from spurfast.residual import SCORE_CAP, add_residual_findings
    from spurfast.scoring import top_two, unrelated_to_class

    rng = np.random.default_rng(0)
    n = 1200
    labels = rng.integers(0, 4, n)
    suspect = np.zeros(n, bool)
    suspect[:200] = True
    labels[:100] = -1                                              # unlabelled suspect samples
    carries = rng.random(n) < 0.15
    x = (0.5 + np.where(carries[:, None, None, None], 0.05, 0.1) * rng.normal(size=(n, 1, 12, 12))).astype(np.float32)
    x[carries, 0, 9, 9] = rng.uniform(0.9, 1.0, carries.sum())   # unequal energies: the exemplars' order shows
    pred = np.where(carries, 4, labels.clip(0))
    ok = np.ones(n, bool)
    ok[np.flatnonzero(carries)[-5:]] = False                       # carriers the store could not read
    store = _store_of(tmp_path / "s", rng.normal(size=(n, 4)).astype(np.float32), pred, labels, 5, ok)
    result = DiscoveryResult([{"rank": 1}], [], {1: np.zeros(n)}, {}, {"n": n})   # after the clusters' one
    # named classes 0-3: the finding's class 4 has no name (not an IndexError)
    add_residual_findings(result, store, ArraySource(x, labels, class_names=list("abcd")), _GreyDecoder(),
                          tmp_path / "out", ResidualConfig(n_null=200), suspect=suspect)
    f = result.findings[1]
    assert f["class"] == 4 and f["score"] == SCORE_CAP and f["rank"] == 2 and sorted(result.rankings) == [1, 2]
    assert f["class_name"] is None
    ranking = result.rankings[2]
    assert np.isneginf(ranking[~ok]).all() and np.isfinite(ranking[ok]).all()
    m = np.asarray(f["members"])
    assert ok[m].all() and f["n_suspect"] == int(suspect[m].sum()) > 0
    # exemplars: the members of most residual energy in the mask, ties by index
    assert f["exemplars"] == m[np.lexsort((m, -ranking[m]))][:16].tolist()
    assert ((labels[m] < 0) & suspect[m]).any()
    want = unrelated_to_class(top_two(np.asarray(store["probs"]))[m], labels[m], np.full(len(m), 4), ~suspect[m])
    assert f["n_unrelated"] == int(want.sum()) < len(m)
    result.findings.pop(0)   # the clusters' stand-in has nothing findings.json could hold
    del result.rankings[1]
    write_outputs(result, tmp_path / "out")

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    doc = json.loads((tmp_path / "out" / "findings.json").read_text(), parse_constant=refuse)
    assert doc["findings"][0]["score"] == SCORE_CAP
    # the report does not call the capped ratio a figure ("1e+06x the largest t elsewhere")
    from spurfast.report import write_report
    page = write_report(doc, tmp_path / "out").read_text()
    assert "no other t is positive" in page and "1e+06x" not in page


def _lone_spot_among_30_classes():
    rng = np.random.default_rng(0)
    C, per, H, W = 30, 40, 8, 8
    labels = np.repeat(np.arange(C), per)
    z = (rng.normal(0, 3, (C, 6))[labels] + rng.normal(0, 1, (len(labels), 6))).astype(np.float32)
    pred = np.where(rng.random(len(labels)) < 0.3, rng.integers(0, C, len(labels)), labels)
    r = rng.normal(0, 0.05, (len(labels), H, W))
    carriers = rng.random(len(labels)) < 0.15
    r[carriers, 2, 2] += 1.0                      # a spot the VAE cannot draw, every carrier called 7
    pred[carriers & (labels != 7)] = 7
    return torch.as_tensor(r.reshape(len(labels), -1), dtype=torch.float32), z, pred, labels, (H, W)


def test_a_scan_whose_p_values_the_resamplings_limit_says_so(caplog):
    # with 30 classes, BH at 0.05 needs p <= 0.05/30, below the floor 1/401: the strongest
    # possible lone spot was no finding, and nothing said why
    import logging
    r, z, pred, labels, shape = _lone_spot_among_30_classes()
    suspect = np.zeros(len(labels), bool)
    with caplog.at_level(logging.WARNING, logger="spurfast.residual"):
        assert residual_scan(r, z, pred, labels, suspect, shape, ResidualConfig()) == []
    assert "1 classes scored above every one of their null resamplings but miss q <= 0.05" in caplog.text, caplog.text
    assert "30 classes need about 600" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spurfast.residual"):
        found = residual_scan(r, z, pred, labels, suspect, shape, ResidualConfig(n_null=700))
    assert [f["class"] for f in found] == [7] and "resamplings" not in caplog.text
    # the pattern: the members' mean residual against the t-map's second group, images called
    # another class whose label is not 7 either (those of label 7 are the class's own content)
    f = found[0]
    others = (pred != 7) & (labels != 7)
    want = r[f["members"]].double().mean(0) - r[others].double().mean(0)
    np.testing.assert_allclose(f["_contrast"].numpy().ravel(), want.numpy(), atol=1e-6)


def test_a_class_no_resampling_gave_a_statistic_is_not_called_limited_by_them(caplog):
    # five outliers called class 2 are nobody's neighbour: every resampling gives class 2 too
    # few images (p = 1/1); the warning said it beat every resampling and asked for more
    import logging
    rng = np.random.default_rng(0)
    n, H, W = 100, 8, 8
    z = rng.normal(size=(n, 4)) * 0.1
    z[:5] += 50 * rng.normal(size=(5, 4))
    pred = np.ones(n, np.int64)
    pred[:5] = 2
    res = torch.tensor(rng.normal(size=(n, H * W)), dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="spurfast.residual"):
        residual_scan(res, z, pred, np.zeros(n, np.int64), np.zeros(n, bool), (H, W), ResidualConfig(seed=0))
    assert "resamplings" not in caplog.text, caplog.text


def test_a_null_an_ulp_below_the_observed_peak_ties_it(monkeypatch):
    # the scan's own p-value formula lacked discovery's tie floor: a resampling that gave the
    # class its observed peak in another summation order (0.3 + 0.2 + 0.1 < 0.1 + 0.2 + 0.3)
    # counted as beaten, and every class tested came out at p = 1 / (1 + n_null)
    from spurfast import residual as R

    res, z, pred, labels, _ = _pool()
    real, observed = R.peak_windows, []

    def null_ties_the_observed(obs, shape):
        stat, masks = real(obs, shape)
        if observed:
            return np.nextafter(observed[0], -np.inf), masks
        observed.append(stat.copy())
        return stat, masks

    monkeypatch.setattr(R, "peak_windows", null_ties_the_observed)
    assert residual_scan(res, z, pred, labels, np.zeros(len(pred), bool), SHAPE, ResidualConfig(n_null=100)) == []
    assert np.isfinite(observed[0]).sum() >= 2


def test_scan_store_standardises_the_latents_discovery_uses(monkeypatch, tmp_path):
    # every store row was standardised, unreadable ones too: the latents (and the null's
    # same-label neighbours) moved with the number of files that failed to load
    from spurfast import residual as R
    from spurfast.discover import _standardise
    from spurfast.store import EmbeddingStore

    rng = np.random.default_rng(0)
    n = 200
    mu = rng.normal(3, 2, (n, 5)).astype(np.float32)
    ok = np.ones(n, bool)
    ok[:40] = False
    mu[:40] = 0.0   # what the store holds for an unreadable image
    store = EmbeddingStore.create(tmp_path / "s", n, {"pred": ((n,), "int32"), "mu": ((n, 5), "float32"),
                                                      "labels": ((n,), "int64"), "ok": ((n,), "bool")},
                                  {"num_classes": 3})
    store.write(0, {"pred": rng.integers(0, 3, n), "mu": mu, "labels": rng.integers(0, 3, n), "ok": ok})
    seen = {}
    monkeypatch.setattr(R, "reconstruction_residuals", lambda *a, **k: torch.zeros(n, 16))

    def scan(res, z, pred, *args, **kw):
        seen["z"], seen["pred"] = z, pred
        return []

    monkeypatch.setattr(R, "residual_scan", scan)

    class Source:
        image_shape = (1, 4, 4)

    R.scan_store(store, Source(), vae=None, config=ResidualConfig())
    np.testing.assert_array_equal(seen["z"][ok], _standardise(mu[ok]))
    # and an unreadable image has no prediction to test, whatever its row holds
    assert (seen["pred"][~ok] == -1).all() and (seen["pred"][ok] == np.asarray(store["pred"])[ok]).all()


def test_the_scan_searches_latent_neighbours_on_the_run_s_device(monkeypatch):
    # the store's scan got the run's device for decoding only: its neighbour search ran on the
    # CPU whatever the run's (discovery's runs on the run's device)
    from spurfast import residual as R

    res, z, pred, labels, _ = _pool()
    real, seen = R.latent_neighbours, []

    def spy(zz, k, device="cpu"):
        seen.append(device)
        return real(zz, k)

    monkeypatch.setattr(R, "latent_neighbours", spy)
    want = residual_scan(res, z, pred, labels, np.zeros(len(pred), bool), SHAPE, ResidualConfig(n_null=20))
    assert seen and set(seen) == {"cpu"}
    seen.clear()
    got = residual_scan(res, z, pred, labels, np.zeros(len(pred), bool), SHAPE, ResidualConfig(n_null=20),
                        device="cuda:3")
    assert seen and set(seen) == {"cuda:3"}
    assert [(f["class"], f["p_value"]) for f in got] == [(f["class"], f["p_value"]) for f in want]


def test_same_label_neighbours_fill_small_labels_with_the_row_itself():
    from spurfast.residual import same_label_neighbours

    z = np.array([[0.0], [10.0], [1.0], [11.0], [3.0], [50.0]], np.float32)
    lab = np.array([0, 1, 0, 1, 0, 2])   # label 0: three rows, label 1: two, label 2: one
    got = same_label_neighbours(z, lab, k=3)
    assert got.tolist() == [[0, 2, 4, 0], [1, 3, 1, 1], [2, 0, 4, 2], [3, 1, 3, 3], [4, 2, 0, 4], [5, 5, 5, 5]]
    assert same_label_neighbours(z, lab, k=1).tolist() == [[0, 2], [1, 3], [2, 0], [3, 1], [4, 2], [5, 5]]


def test_the_null_draws_each_prediction_from_the_image_itself_or_its_neighbours(monkeypatch):
    """An image keeps its own prediction in about 1 of n_neighbours + 1 resamplings (itself is
    among the candidates): pairs of images, each the other's only neighbour, called 0 and 1."""
    from spurfast import residual as R

    n = 400
    z = np.repeat(np.arange(n // 2, dtype=np.float32) * 100, 2)[:, None]
    pred = np.tile([0, 1], n // 2)
    seen = []
    real = R.ClassSums.tmaps

    def spy(self, p, min_images):
        seen.append(np.array(p))
        return real(self, p, min_images)

    monkeypatch.setattr(R.ClassSums, "tmaps", spy)
    res = torch.as_tensor(np.random.default_rng(0).normal(size=(n, 16)), dtype=torch.float32)
    residual_scan(res, z, pred, np.zeros(n, np.int64), np.zeros(n, bool), (4, 4),
                  ResidualConfig(n_neighbours=1, n_null=20))
    assert np.array_equal(seen[0], pred)                     # the observed predictions first
    kept = np.mean([np.mean(p == pred) for p in seen[1:]])
    assert 0.4 < kept < 0.6, kept


def test_a_class_at_exactly_the_fdr_level_is_a_finding(monkeypatch):
    # q <= fdr, as discovery's findings and the report's "q <= 0.05"
    from spurfast import residual as R

    res, z, pred, labels, _ = _pool()
    monkeypatch.setattr(R, "bh_qvalues", lambda p: np.full(len(p), 0.05))
    found = residual_scan(res, z, pred, labels, np.zeros(len(pred), bool), SHAPE, ResidualConfig(n_null=20, fdr=0.05))
    assert 4 in [f["class"] for f in found] and all(f["q_value"] == 0.05 for f in found)
