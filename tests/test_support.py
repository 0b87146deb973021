"""Training support (`spurfast.support`) on hand-made suspect sets with known answers."""
import numpy as np
import pytest
import torch
from scipy.stats import fisher_exact

from spurfast.data.sources import ArraySource
from spurfast.scoring import bh_qvalues
from spurfast.support import support_test, training_support

H = W = 8
MASK = np.zeros((H, W), bool)
MASK[:2, :2] = True            # the pattern: a 2x2 corner patch


def _pool(n_class=100, n_other=200, stamped_class=10, stamped_other=0, n_unrelated=0, seed=0):
    """Suspects of class 0 then of classes 1-2 (noise images in [0, 0.5]); the first
    ``stamped_*`` of each group carry the patch; then ``n_unrelated`` stamped non-suspects of class 0."""
    rng = np.random.default_rng(seed)
    n = n_class + n_other + n_unrelated
    x = rng.uniform(0, 0.5, (n, 1, H, W)).astype(np.float32)
    y = np.concatenate([np.zeros(n_class, int), 1 + np.arange(n_other) % 2, np.zeros(n_unrelated, int)])
    stamped = np.r_[np.arange(stamped_class), n_class + np.arange(stamped_other), n_class + n_other + np.arange(n_unrelated)]
    x[stamped, :, :2, :2] = 1.0
    suspect = np.r_[np.ones(n_class + n_other, bool), np.zeros(n_unrelated, bool)]
    return ArraySource(x, y, name="hand-made"), suspect


def _finding(cls=0, mask=MASK):
    return {"rank": 1, "class": cls, "_mask": mask, "_contrast": torch.full((1, H, W), 0.6)}


def test_class_suspects_carrying_the_pattern_are_support():
    src, sus = _pool()
    f = _finding()
    training_support([f], src, sus, src.labels())
    sp = f["support"]
    assert sp["n_class"] == 100 and sp["n_other"] == 200
    assert sp["class_above"] >= 10 and sp["other_above"] <= 2       # the top 1% of 200 others: at most 2
    assert sp["p_value"] < 1e-3 and sp["supported"]


def test_a_pattern_every_class_carries_alike_is_not_support():
    # what a model that reacts to a pool pattern it never trained on leaves: nothing
    # class-specific in the suspects (here 10% of every class carries it)
    src, sus = _pool(stamped_class=10, stamped_other=20)
    f = _finding()
    training_support([f], src, sus, src.labels())
    assert f["support"]["p_value"] > 0.05 and not f["support"]["supported"]


def test_a_pattern_no_suspect_carries_is_not_support():
    src, sus = _pool(stamped_class=0)
    f = _finding()
    training_support([f], src, sus, src.labels())
    assert f["support"]["class_above"] <= 3 and not f["support"]["supported"]


def test_only_suspects_count():
    # 50 stamped class-0 images that are not suspects (the unrelated pool) change nothing
    src, sus = _pool(stamped_class=0, n_unrelated=50)
    f = _finding()
    training_support([f], src, sus, src.labels())
    assert f["support"]["n_class"] == 100 and not f["support"]["supported"]


def test_too_few_other_suspects_is_not_tested():
    src, sus = _pool(n_other=50)
    f = _finding()
    training_support([f], src, sus, src.labels())
    assert f["support"]["p_value"] is None and "100 needed" in f["support"]["skipped"]
    f2 = _finding(cls=7)        # a class no suspect has
    training_support([f2], *_pool()[:2], _pool()[0].labels())
    assert f2["support"]["p_value"] is None and "no labelled suspect" in f2["support"]["skipped"]


def test_q_values_adjust_over_the_run_findings():
    src, sus = _pool()
    other_mask = np.zeros((H, W), bool)
    other_mask[-2:, -2:] = True
    fs = [_finding(), _finding(cls=1, mask=other_mask), _finding(cls=2)]
    training_support(fs, src, sus, src.labels())
    p = np.array([f["support"]["p_value"] for f in fs])
    assert np.allclose([f["support"]["q_value"] for f in fs], bh_qvalues(p))
    assert [f["support"]["supported"] for f in fs] == [True, False, False]


def test_q_values_adjust_within_each_search_family():
    # as discovery and confirmation adjust: the residual scan's or the feature view's findings,
    # switched on, leave the clusters' support as it was (here they would have cost it)
    src, sus = _pool(stamped_class=3)   # weak support: 3 of 100 class suspects carry the patch
    alone = _finding()
    training_support([alone], src, sus, src.labels())
    assert alone["support"]["supported"]
    other_mask = np.zeros((H, W), bool)
    other_mask[5:7, 5:7] = True
    views = [dict(_finding(1 + k % 2, other_mask), rank=2 + k, **({"kind": "residual"} if k < 2 else {"view": "features"}))
             for k in range(4)]
    cluster = _finding()
    training_support([cluster, *views], src, sus, src.labels())
    assert cluster["support"] == alone["support"]
    for family in (views[:2], views[2:]):
        p = np.array([f["support"]["p_value"] for f in family])
        assert np.allclose([f["support"]["q_value"] for f in family], bh_qvalues(p))


def test_unreadable_suspects_are_left_out():
    src, sus = _pool()
    src.bad_files = {0: "damaged", 1: "damaged"}      # two stamped class-0 suspects
    f = _finding()
    training_support([f], src, sus, src.labels())
    assert f["support"]["n_class"] == 98 and f["support"]["class_above"] >= 8


def test_ties_at_the_threshold_count_as_below():
    scores = np.zeros(300)
    in_class = np.r_[np.ones(100, bool), np.zeros(200, bool)]
    t = support_test(scores, in_class, ~in_class)
    assert t["class_above"] == 0 and t["other_above"] == 0 and t["p_value"] == 1.0


def test_an_identical_stamp_on_more_than_the_tail_of_other_classes_is_still_support():
    # 3% of the other classes' suspects carry the stamp, every carrier projecting alike: the
    # threshold lands on the stamp's value, and "above it" alone never counted a carrier
    rng = np.random.default_rng(0)
    n_in, n_other = 100, 1000
    scores = rng.uniform(0, 0.5, n_in + n_other)
    scores[:40] = 2.0                          # 40% of the class carry it
    scores[n_in:n_in + 30] = 2.0               # 3% of the others
    in_class = np.r_[np.ones(n_in, bool), np.zeros(n_other, bool)]
    t = support_test(scores, in_class, ~in_class)
    assert t["ties_at_threshold"] and t["ties_counted_above"] and t["class_above"] == 40 and t["other_above"] == 30
    expected = fisher_exact([[40, 60], [30, 970]], alternative="greater")[1]
    assert t["p_value"] == pytest.approx(2 * expected) and t["p_value"] < 1e-20


def test_a_black_corner_most_images_share_still_counts_ties_as_below():
    # most images project to exactly 0 (nothing in the corner): counting ties at 0 as above
    # would put every suspect above; the stamp's carriers stand out above 0
    n_in, n_other = 100, 1000
    scores = np.zeros(n_in + n_other)
    scores[:10] = 1.0
    scores[n_in:n_in + 5] = 0.3                # 0.5% of the others: the threshold is 0
    in_class = np.r_[np.ones(n_in, bool), np.zeros(n_other, bool)]
    t = support_test(scores, in_class, ~in_class)
    assert t["ties_at_threshold"] and not t["ties_counted_above"] and t["class_above"] == 10 and t["other_above"] == 5
    expected = fisher_exact([[10, 90], [5, 995]], alternative="greater")[1]
    assert t["p_value"] == pytest.approx(2 * expected)


def test_without_ties_at_the_threshold_the_test_is_one_count():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=1100)
    scores[:20] += 5
    in_class = np.r_[np.ones(100, bool), np.zeros(1000, bool)]
    t = support_test(scores, in_class, ~in_class)
    thr = np.quantile(scores[100:], 0.99)
    a, b = int((scores[:100] > thr).sum()), int((scores[100:] > thr).sum())
    assert not t["ties_at_threshold"] and (t["class_above"], t["other_above"]) == (a, b)
    assert t["p_value"] == fisher_exact([[a, 100 - a], [b, 1000 - b]], alternative="greater")[1]


def test_bad_inputs_are_refused():
    src, sus = _pool()
    with pytest.raises(ValueError, match="one entry per image"):
        training_support([_finding()], src, sus[:-1], src.labels())
    with pytest.raises(ValueError, match=r"suspect mask must hold True/False"):   # 0.5 counted as suspect
        training_support([_finding()], src, np.where(sus, 0.5, 0.0), src.labels())
    with pytest.raises(ValueError, match="no extracted pattern"):
        training_support([{"rank": 3, "class": 0}], src, sus, src.labels())
    with pytest.raises(ValueError, match="tail"):
        training_support([_finding()], src, sus, src.labels(), tail=1.5)
    for level in (1.5, 0.0, float("nan")):
        with pytest.raises(ValueError, match="support level must be in"):
            training_support([_finding()], src, sus, src.labels(), level=level)


def test_a_bad_batch_size_is_named_not_a_silent_answer():
    """batch_size 0 failed with range()'s message; a negative one read no image at all,
    so every projection stayed 0 and a finding the suspects plainly support was 'not supported'."""
    src, sus = _pool()
    for bs in (0, -4):
        f = _finding()
        with pytest.raises(ValueError, match=f"support batch_size must be >= 1, got {bs}"):
            training_support([f], src, sus, src.labels(), batch_size=bs)
        assert "support" not in f


def test_an_empty_pattern_is_not_tested_and_leaves_the_others_q_values_alone():
    """A finding with an empty mask (confirmation skips it: "empty pattern mask") was tested
    anyway: 0 carriers, p = 1, and that p in Benjamini-Hochberg doubled the q-value of the
    run's other finding, which lost its support (q 0.043 -> 0.087)."""
    src, sus = _pool(stamped_class=3)
    alone = _finding()
    training_support([alone], src, sus, src.labels())
    assert alone["support"]["supported"]
    fs = [_finding(), _finding(mask=np.zeros((H, W), bool))]
    training_support(fs, src, sus, src.labels())
    assert fs[0]["support"]["q_value"] == alone["support"]["q_value"] and fs[0]["support"]["supported"]
    assert fs[1]["support"]["p_value"] is None and fs[1]["support"]["skipped"] == "empty pattern mask"


def _png_folder(root, n: int, broken: int, seed: int):
    """(ImageFolderSource at 16 px, rng): ``n`` random 20x20 PNGs in ``root``, number
    ``broken`` not an image."""
    from PIL import Image

    from spurfast.data.folder import ImageFolderSource

    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    (root / f"{broken:02d}.png").write_bytes(b"not an image")
    return ImageFolderSource(root, size=16), rng


def test_projections_of_a_folder_pool_go_through_its_loader(tmp_path):
    """A folder pool is decoded by its loader, in worker processes, as the embedding pass
    decoded it (get_batch decoded one file at a time); rows follow ``idx`` whatever order the
    loader yields, and an unreadable image projects to 0."""
    from spurfast.data.folder import ImageFolderSource
    from spurfast.support import pattern_projections

    src, rng = _png_folder(tmp_path, 10, broken=5, seed=0)
    pats = torch.as_tensor(rng.normal(size=(2, 3, 16, 16)), dtype=torch.float32)
    idx = np.array([7, 2, 5, 9, 0])
    got = pattern_projections(src, idx, pats, batch_size=2, num_workers=2, loader_backend="torch")
    x, _ = ImageFolderSource(tmp_path, size=16).get_batch(idx)
    want = (x.reshape(len(idx), -1).double() @ pats.reshape(2, -1).double().T).numpy()
    want[2] = 0.0                               # 05.png
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)
    assert 5 in src.bad_files


def test_projections_of_each_patterns_own_images_equal_the_matrixs(tmp_path):
    """Pattern ranking needs each finding's own head only: the (union x findings) matrix grew
    with the square of the number of findings.  ``wanted`` gives per pattern the values the
    matrix holds for its images, bit for bit (the same batches), unreadable images 0."""
    from spurfast.support import pattern_projections, wanted_projections

    src, rng = _png_folder(tmp_path, 11, broken=4, seed=1)
    pats = torch.as_tensor(rng.normal(size=(3, 3, 16, 16)), dtype=torch.float32)
    idx = np.array([9, 0, 4, 3, 7, 10, 1])
    dense = pattern_projections(src, idx, pats, batch_size=3)
    wanted = [np.array([0, 3, 4, 10]), np.array([], np.int64), np.array([1, 9])]
    got = wanted_projections(src, idx, pats, wanted, batch_size=3)
    assert [len(g) for g in got] == [4, 0, 2]
    for j, w in enumerate(wanted):
        rows = [int(np.nonzero(idx == i)[0][0]) for i in w]
        np.testing.assert_array_equal(got[j], dense[rows, j])
    assert got[0][2] == 0.0                      # 04.png
    for bad, msg in (([np.array([3, 0]), wanted[1], wanted[2]], "sorted"),
                     ([np.array([0, 2]), wanted[1], wanted[2]], "drawn from idx"),
                     (wanted[:2], "2 index sets for 3 patterns")):
        with pytest.raises(ValueError, match=msg):
            wanted_projections(src, idx, pats, bad)


def test_a_folder_pool_is_decoded_where_the_run_computes(tmp_path, monkeypatch):
    """The embedding pass decodes a folder pool where the run computes; the re-reads of
    training support and pattern ranking passed no device, so DALI chose for itself: a GPU
    whenever torch saw one (--device cpu included), its current one for --device cuda:1."""
    from PIL import Image

    from spurfast import backends
    from spurfast.data import loader_torch
    from spurfast.data.folder import ImageFolderSource
    from spurfast.pattern_rank import pattern_rankings
    from spurfast.support import pattern_projections

    asked = []

    def dali(paths, *, device=None, **k):   # the DALI loader's signature, decoding with the torch one
        asked.append(device)
        yield from loader_torch.iter_folder_batches(paths, **k)

    monkeypatch.setitem(backends._cache, ("loader", "dali", None), ("dali", dali))
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    src = ImageFolderSource(tmp_path, size=8)
    pats = torch.as_tensor(rng.normal(size=(1, 3, 8, 8)), dtype=torch.float32)
    for device, decodes in (("cpu", "cpu"), ("cuda:1", "cuda:1"), ("cpu:1", "cpu"), (None, None)):
        asked.clear()
        pattern_projections(src, np.arange(6), pats, loader_backend="dali", device=device)
        assert asked == [decodes], (device, asked)
    mask = np.zeros((8, 8), bool)
    mask[:2, :2] = True
    f = {"rank": 1, "class": 0, "_mask": mask, "_contrast": torch.full((3, 8, 8), 0.5)}
    asked.clear()
    pattern_rankings([f], {1: np.linspace(1, 0, 6)}, src, loader_backend="dali", device="cuda:1")
    training_support([f], src, np.ones(6, bool), np.zeros(6, int), loader_backend="dali", device="cuda:1")
    assert asked == ["cuda:1", "cuda:1"]


@pytest.mark.gpu
def test_projections_take_images_a_loader_yields_on_the_gpu(tmp_path, monkeypatch):
    """On a GPU machine the DALI loader (auto's first choice) yields images on the GPU: the
    projection multiplied them by CPU patterns and failed before findings.json was written."""
    from PIL import Image

    from spurfast import backends
    from spurfast.data import loader_torch
    from spurfast.data.folder import ImageFolderSource
    from spurfast.support import pattern_projections

    def on_gpu(*a, **k):   # as the DALI loader yields: images on the GPU, indices and ok on the CPU
        for idx, images, ok in loader_torch.iter_folder_batches(*a, **k):
            yield idx, images.cuda(), ok

    monkeypatch.setitem(backends._cache, ("loader", "dali", None), ("dali", on_gpu))
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    src = ImageFolderSource(tmp_path, size=16)
    pats = torch.as_tensor(rng.normal(size=(2, 3, 16, 16)), dtype=torch.float32)
    got = pattern_projections(src, np.arange(6), pats, batch_size=4, loader_backend="dali")
    x, _ = src.get_batch(np.arange(6))
    want = (x.reshape(6, -1).double() @ pats.reshape(2, -1).double().T).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)


def test_the_tie_rule_holds_for_projections_an_ulp_apart():
    """Carriers of one identical stamp project an ulp or two apart (the float64 GEMM rounds a
    row by its place in the batch): the counts, p and verdict changed with the batch size
    (a repro: 6/6 and 15/15 above at batch 256, 3/6 and 11/15 at batch 7, p 0.017 -> 0.25)."""
    from spurfast.support import support_test

    rng = np.random.default_rng(0)
    n_in, n_other = 100, 1000
    exact = np.r_[rng.uniform(0, 1, n_in), rng.uniform(0, 1, n_other)]
    carriers = np.r_[rng.choice(n_in, 6, replace=False), n_in + rng.choice(n_other, 15, replace=False)]
    exact[carriers] = 7.25                                   # one stamp, above every other image
    in_class = np.r_[np.ones(n_in, bool), np.zeros(n_other, bool)]
    want = support_test(exact, in_class, ~in_class, tail=0.01)
    assert want["ties_at_threshold"] and (want["class_above"], want["other_above"]) == (6, 15)
    for seed in range(5):
        ulps = np.random.default_rng(seed).integers(-2, 3, len(carriers))
        noisy = exact.copy()
        noisy[carriers] = 7.25 + ulps * np.spacing(7.25)
        assert support_test(noisy, in_class, ~in_class, tail=0.01) == want, seed


def test_the_test_is_one_sided():
    # the class's suspects carrying the pattern *less* often than the others' is no support (a
    # two-sided test gave p = 9e-7 here)
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(0, 1, 3000) - 5, rng.normal(0, 1, 1000)]
    in_class = np.r_[np.ones(3000, bool), np.zeros(1000, bool)]
    t = support_test(scores, in_class, ~in_class)
    assert t["class_above"] == 0 and t["other_above"] > 0 and t["p_value"] == 1.0


def test_one_other_suspect_at_the_threshold_is_no_tie_and_100_others_are_enough():
    # 101 other suspects: the 0.99 quantile is one of their values, once; "tied" (p doubled)
    # needs two of them there
    scores = np.r_[np.full(3, 200.0), np.zeros(27), np.arange(101.0)]
    in_class = np.r_[np.ones(30, bool), np.zeros(101, bool)]
    t = support_test(scores, in_class, ~in_class)
    assert not t["ties_at_threshold"]
    assert t["p_value"] == fisher_exact([[3, 27], [1, 100]], alternative="greater")[1]   # 100 > 99
    # exactly 1 / tail other suspects: tested (the skip message asks for at least that many)
    scores = np.r_[np.full(5, 50.0), np.zeros(15), np.random.default_rng(0).normal(0, 1, 100)]
    in_class = np.r_[np.ones(20, bool), np.zeros(100, bool)]
    assert support_test(scores, in_class, ~in_class)["p_value"] is not None


def test_a_q_value_equal_to_the_level_is_supported():
    src, sus = _pool()
    f = _finding()
    training_support([f], src, sus, src.labels())
    q = f["support"]["q_value"]
    training_support([f], src, sus, src.labels(), level=q)
    assert f["support"]["supported"]
    training_support([f], src, sus, src.labels(), level=np.nextafter(q, 0))
    assert not f["support"]["supported"]


# ---- support.support_test: exactly two other-class suspects at the threshold are a tie ----
def test_two_other_suspects_at_the_threshold_are_a_tie():
    rng = np.random.default_rng(0)
    n_in, n_other = 20, 100
    scores = rng.uniform(0, 0.5, n_in + n_other)
    scores[:5] = 2.0                         # 5 of the class carry an identical stamp
    scores[n_in:n_in + 2] = 2.0              # 2 of 100 others: the 0.99 quantile is the stamp's value
    in_class = np.r_[np.ones(n_in, bool), np.zeros(n_other, bool)]
    t = support_test(scores, in_class, ~in_class)
    assert t["ties_at_threshold"] and t["ties_counted_above"]
    assert (t["class_above"], t["other_above"]) == (5, 2)
    assert t["p_value"] == pytest.approx(2 * fisher_exact([[5, 15], [2, 98]], alternative="greater")[1])


# ---- support.training_support: unlabelled suspects and images found unreadable in the pass ----
def test_unlabelled_suspects_are_neither_class_nor_other():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 0.5, (300, 1, H, W)).astype(np.float32)
    y = np.r_[np.zeros(100, int), 1 + np.arange(200) % 2]
    x[:10, :, :2, :2] = 1.0
    src = ArraySource(x, y, name="hand-made")
    labels = y.copy()
    labels[250:] = -1                        # 50 suspects of unknown label
    f = _finding()
    training_support([f], src, np.ones(300, bool), labels)
    assert f["support"]["n_class"] == 100 and f["support"]["n_other"] == 150


def test_images_found_unreadable_during_the_pass_are_left_out(tmp_path):
    src, _ = _png_folder(tmp_path, 10, broken=3, seed=0)   # 03.png: not known until the pass decodes it
    assert not (getattr(src, "bad_files", None) or {})
    labels = np.r_[np.zeros(5, int), np.ones(5, int)]
    mask = np.zeros((16, 16), bool)
    mask[:2, :2] = True
    f = {"rank": 1, "class": 0, "_mask": mask, "_contrast": torch.full((3, 16, 16), 0.6)}
    training_support([f], src, np.ones(10, bool), labels, tail=0.5)
    assert 3 in src.bad_files
    assert f["support"]["n_class"] == 4 and f["support"]["n_other"] == 5


def test_a_support_tail_of_0_is_refused_by_name():
    x = np.zeros((300, 1, H, W), np.float32)
    src = ArraySource(x, np.zeros(300, int))
    with pytest.raises(ValueError, match=r"support tail must be in \(0, 1\), got 0.0"):
        training_support([_finding()], src, np.ones(300, bool), np.r_[np.zeros(100, int), np.ones(200, int)], tail=0.0)
