"""Every evaluation metric on hand-made cases with known answers (and AUROC/AP against
scikit-learn on random data)."""
import numpy as np
import pytest

from spurfast.metrics import (Feature, auroc, average_precision, best_candidate, carried_by, enriched, false_findings,
                              false_findings_on_pool_patterns, feature_metrics, hit_at_1, mask_iou, matches, precision_at_k, recall_at_q,
                              significant)


def test_auroc_known_values():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([1, 1, 0], [1, 0, 0]) == pytest.approx(0.75)      # a tie counts half
    assert auroc([3, 2, 1], [1, 1, 0]) == 1.0
    assert auroc([1, 2, 3], [1, 1, 0]) == 0.0
    assert np.isnan(auroc([1, 2], [0, 0]))


def test_average_precision_known_values():
    # ranked: + - + -  -> precision 1 at recall 1/2, 2/3 at recall 1
    assert average_precision([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert average_precision([1, 1, 0], [1, 0, 0]) == pytest.approx(0.5)  # tied scores enter together
    assert average_precision([3, 2, 1], [1, 1, 0]) == 1.0
    assert average_precision([1, 2, 3, 4], [1, 0, 0, 0]) == pytest.approx(0.25)
    assert np.isnan(average_precision([1, 2], [0, 0]))


def test_auroc_ap_match_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score
    rng = np.random.default_rng(0)
    for _ in range(5):
        s = rng.integers(0, 6, 200).astype(float)  # many ties
        t = rng.random(200) < 0.3
        assert auroc(s, t) == pytest.approx(roc_auc_score(t, s))
        assert average_precision(s, t) == pytest.approx(average_precision_score(t, s))


def test_precision_at_k():
    s, t = [0.9, 0.8, 0.7, 0.1], [1, 0, 1, 1]
    assert precision_at_k(s, t, 1) == 1.0
    assert precision_at_k(s, t, 2) == 0.5
    assert precision_at_k(s, t, 3) == pytest.approx(2 / 3)
    assert precision_at_k(s, t, 10) == 0.75          # k larger than the pool: all of it
    assert precision_at_k([1, 1, 1], [0, 1, 1], 1) == 0.0  # ties broken by pool index
    with pytest.raises(ValueError, match="k must be"):
        precision_at_k(s, t, 0)
    assert precision_at_k(s, t, 2.0) == 0.5
    with pytest.raises(ValueError, match="precision_at_k's k must be an integer, got 2.5"):
        precision_at_k(s, t, 2.5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="one length"):
        auroc([1, 2, 3], [1, 0])
    with pytest.raises(ValueError, match="NaN"):
        average_precision([1, np.nan], [1, 0])
    with pytest.raises(ValueError, match="shapes differ"):
        mask_iou(np.ones((2, 2)), np.ones((3, 3)))


def test_mask_iou():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2, :2] = True          # 4 pixels
    b[1:3, 1:3] = True        # 4 pixels, 1 shared
    assert mask_iou(a, b) == pytest.approx(1 / 7)
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, ~a) == 0.0
    assert np.isnan(mask_iou(a, None))
    assert np.isnan(mask_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)))


def _feat():
    carries = np.zeros(100, bool)
    carries[:10] = True                    # pool rate 0.1
    return Feature(3, carries, name="p")


def _cand(cls, members, ranking=None, q=None):
    r = np.zeros(100) if ranking is None else ranking
    return {"class": cls, "members": np.asarray(members), "ranking": r, "q_value": q}


def test_enriched_and_matches():
    f = _feat()
    assert enriched([0, 1, 50, 51], f.carries)            # 0.5 >= 2 * 0.1
    assert enriched([0] + list(range(20, 24)), f.carries)  # 0.2 = 2 * 0.1 (boundary counts)
    assert not enriched([0] + list(range(20, 25)), f.carries)  # 1/6 < 0.2
    assert not enriched([], f.carries)
    assert matches(_cand(3, [0, 1]), f) and not matches(_cand(4, [0, 1]), f)
    # halfway from the pool's rate to 1, exactly: 10 carriers of 14 (rate 5/7), 6 of 7 members
    # is 6/7 = (1 + 5/7) / 2, which floats rounded above the members' rate
    busy = np.r_[np.ones(10, bool), np.zeros(4, bool)]
    assert enriched([0, 1, 2, 3, 4, 5, 10], busy)
    assert not enriched([0, 1, 2, 3, 4, 10, 11], busy)     # 5/7 < 6/7


def test_enriched_where_the_pool_mostly_carries_the_feature():
    carries = np.r_[np.ones(60, bool), np.zeros(40, bool)]       # 60%: twice that is out of reach
    assert enriched(np.arange(10), carries)                      # carriers alone
    assert enriched(np.r_[np.arange(8), 60, 61], carries)        # 0.8 = halfway from 0.6 to 1
    assert not enriched(np.r_[np.arange(7), 60, 61, 62], carries)  # 0.7: hardly more than the pool
    third = np.r_[np.ones(30, bool), np.zeros(60, bool)]           # a third: both rules agree (2/3)
    assert enriched(np.r_[np.arange(20), 30, 31, 32, 33, 34, 35, 36, 37, 38, 39], third)
    assert not enriched(np.r_[np.arange(19), np.arange(30, 41)], third)


def test_hit_at_1_and_best_candidate():
    f = _feat()
    perfect = np.r_[np.ones(10), np.zeros(90)]
    cands = [_cand(5, [50, 51]), _cand(3, [0, 1], ranking=perfect)]
    assert hit_at_1(cands, f) == 0.0
    assert hit_at_1(cands[::-1], f) == 1.0
    assert hit_at_1([], f) == 0.0
    i, ap = best_candidate(cands, f)
    assert i == 1 and ap == 1.0
    m = feature_metrics(cands, f)
    assert m["hit@1"] == 0.0 and m["auroc"] == 1.0 and m["ap"] == 1.0
    assert m["precision@10"] == 1.0 and m["precision@25"] == pytest.approx(10 / 25)
    assert m["best_is_target_class"] == 1.0 and np.isnan(m["mask_iou"])


def test_no_candidate_scores_as_random():
    m = feature_metrics([], _feat())
    assert m == {"hit@1": 0.0, "auroc": 0.5, "ap": pytest.approx(0.1), "precision@10": pytest.approx(0.1),
                 "precision@25": pytest.approx(0.1), "mask_iou": m["mask_iou"], "best_is_target_class": 0.0,
                 "ap_in_class": pytest.approx(0.1)}


def test_no_finding_scores_mask_iou_zero_where_a_mask_was_planted():
    # a seed without a finding must not drop out of the mean IoU over seeds
    f = _feat()
    f.mask = np.zeros((4, 4), bool)
    f.mask[1:3, 1:3] = True
    assert feature_metrics([], f)["mask_iou"] == 0.0
    assert np.isnan(feature_metrics([], f, masks=False)["mask_iou"])   # a method that extracts no mask
    f.mask = None                                                      # no planted mask (background colour)
    assert np.isnan(feature_metrics([], f)["mask_iou"])


def test_unranked_items_rank_last():
    f = _feat()
    r = np.full(100, -np.inf)
    r[:10] = 1.0                        # only the carriers are ranked
    assert feature_metrics([_cand(3, [0], ranking=r)], f)["auroc"] == 1.0


def test_recall_and_false_findings():
    f1 = _feat()
    c2 = np.zeros(100, bool)
    c2[10:20] = True
    f2 = Feature(7, c2, name="q")
    cands = [_cand(3, [0, 1], q=0.01), _cand(7, [10, 11], q=0.08), _cand(1, [50], q=0.02), _cand(2, [60], q=0.5)]
    assert recall_at_q(cands, [f1, f2], 0.05) == 0.5
    assert recall_at_q(cands, [f1, f2], 0.1) == 1.0
    assert false_findings(cands, [f1, f2], 0.05) == 1
    assert false_findings(cands, [f1, f2], 0.1) == 1
    assert false_findings(cands, [], 0.1) == 3         # clean model: every finding is false
    assert np.isnan(recall_at_q(cands, [], 0.1))
    # a feature no pool item carries is undefined (feature_metrics: NaN), not a miss
    nobody = Feature(5, np.zeros(100, bool), name="none")
    assert recall_at_q(cands, [f1, nobody], 0.05) == 1.0
    assert np.isnan(recall_at_q(cands, [nobody], 0.05))
    assert false_findings([_cand(3, [0])], [f1], 0.1) == 0   # no q-value: not a finding at any level


def test_false_findings_on_pool_patterns():
    f1 = _feat()                                   # carriers 0..9, planted in class 3
    c2 = np.zeros(100, bool)
    c2[10:20] = True
    f2 = Feature(7, c2, name="q")
    cands = [_cand(3, [0, 1], q=0.01),             # the learned feature: not false
             _cand(6, [2, 3, 4, 50], q=0.02),      # 3 of 4 carry p, wrong class: false, on a pool pattern
             _cand(6, [5, 6, 50, 51], q=0.02),     # exactly half: not "mostly"
             _cand(1, [12, 13, 14], q=0.08),       # all carry q: on a pool pattern at q = 0.1 only
             _cand(2, [60, 61], q=0.03)]           # natural look-alikes
    assert carried_by(cands[1], [f1, f2]) and not carried_by(cands[2], [f1, f2])
    assert not carried_by(_cand(1, []), [f1])
    assert false_findings(cands, [f1], 0.05) == 3
    assert false_findings_on_pool_patterns(cands, [f1], [f1, f2], 0.05) == 1
    assert false_findings_on_pool_patterns(cands, [f1], [f1, f2], 0.1) == 2
    # clean model: nothing learned, so the class-3 cluster of carriers counts too
    assert false_findings_on_pool_patterns(cands, [], [f1, f2], 0.05) == 2
    assert false_findings_on_pool_patterns(cands, [f1], [], 0.1) == 0


def test_infinite_scores_rank_in_order_whatever_the_input_order():
    """+inf ranks first, -inf and NaN (unranked) last, tied infinities tie: the ranking
    became "min - 1" for every non-finite value (+inf last; unranked tied with the lowest
    score once |scores| >= 2**53), and AP split tied infinities by input order."""
    s, t = np.array([np.inf, np.inf, 1.0, 0.0]), np.array([1, 0, 1, 0], bool)
    same = average_precision([9.0, 9.0, 1.0, 0.0], t)                    # finite stand-ins, same order
    assert average_precision(s, t) == pytest.approx(same)
    assert average_precision(s[[1, 0, 2, 3]], t[[1, 0, 2, 3]]) == pytest.approx(same)
    assert average_precision(-s, t) == average_precision(-s[[1, 0, 2, 3]], t[[1, 0, 2, 3]])
    f = Feature(3, np.array([1, 0, 1, 0], bool))
    cand = lambda r: [{"class": 3, "members": np.array([0, 2]), "ranking": np.asarray(r, float), "q_value": 0.01}]  # noqa: E731
    assert feature_metrics(cand([np.inf, 0.5, 1.0, 0.0]), f)["auroc"] == 1.0           # +inf: the surest carrier
    assert feature_metrics(cand([3e17, -1e17, 2e17, -np.inf]), f)["auroc"] == 1.0      # unranked below -1e17
    m = feature_metrics(cand([1.0, np.nan, 0.5, 0.7]), f)                                # NaN: unranked, last
    assert m["auroc"] == 0.75 and m["precision@10"] == 0.5


def test_feature_without_carriers_is_undefined_not_random():
    """No pool item carries the feature: nothing to find, so every metric is NaN (it scored
    AUROC 0.5, AP 0, precision 0 and IoU 0, and those entered the means over seeds)."""
    f = Feature(3, np.zeros(10, bool), np.ones((2, 2), bool), "p")
    cands = [{"class": 3, "members": np.arange(3), "ranking": np.arange(10.0), "q_value": 0.01, "mask": np.ones((2, 2))}]
    for got in (feature_metrics(cands, f), feature_metrics([], f), feature_metrics(cands, f, masks=False)):
        assert list(got) == ["hit@1", "auroc", "ap", "precision@10", "precision@25", "mask_iou", "best_is_target_class",
                             "ap_in_class"]
        assert all(np.isnan(v) for v in got.values()), got


def test_feature_every_item_carries_has_no_auroc_with_or_without_a_candidate():
    # no negative: a candidate's ranking gave AUROC NaN, no candidate 0.5, and the means over
    # seeds mixed the two
    f = Feature(3, np.ones(10, bool), None, "p")
    cands = [{"class": 3, "members": np.arange(3), "ranking": np.arange(10.0), "q_value": 0.01}]
    for got in (feature_metrics(cands, f), feature_metrics([], f)):
        assert np.isnan(got["auroc"]) and got["ap"] == 1.0 and got["precision@10"] == 1.0, got


def test_no_candidate_scores_the_carrier_rate_a_hair_under_a_random_rankings_mean_ap():
    # the module docstring's claim, against the closed form of a random ranking's expected AP
    # (n items, p carriers): ((p - 1) / (n - 1) (n - H_n) + H_n) / n
    rng = np.random.default_rng(0)
    for n, p in ((700, 20), (7000, 600)):
        h = float(np.sum(1.0 / np.arange(1, n + 1)))
        want = ((p - 1) / (n - 1) * (n - h) + h) / n
        carries = np.zeros(n, bool)
        carries[:p] = True
        sampled = np.mean([average_precision(rng.random(n), carries) for _ in range(400)])
        assert abs(sampled - want) < 2e-3, (sampled, want)
        got = feature_metrics([], Feature(0, carries))["ap"]
        assert got == p / n < want and want - got < 1.2 * (1 - p / n) * (h - 1) / n


def test_members_must_be_pool_indices_not_a_mask_or_negative():
    carries = np.array([False, True, True, False, False, False])
    # a boolean mask of members 1 and 2 was read as the indices 0, 1, 1, 0, 0, 0: rate 1/3,
    # not enriched, though both members carry the feature
    with pytest.raises(ValueError, match="boolean mask"):
        enriched(carries.copy(), carries)
    with pytest.raises(ValueError, match=r"\[0, 6\); 1 are not, e.g. members\[1\] = -1"):
        enriched([1, -1], carries)   # -1 read the last item
    with pytest.raises(ValueError, match="members"):
        carried_by({"members": [6]}, [Feature(0, carries)])
    with pytest.raises(ValueError, match=r"whole numbers; 2 are not, e.g. members\[0\] = 1.9"):
        enriched([1.9, 2.9], carries)   # read as images 1 and 2
    with pytest.raises(ValueError, match=r"members\[1\] = nan"):
        enriched([1.0, np.nan], carries)
    assert enriched(np.array([1.0, 2.0]), carries)
    assert enriched(np.flatnonzero(carries), carries) and not enriched([], carries)
    assert carried_by({"members": [1, 2]}, [Feature(0, carries)]) and not carried_by({"members": [1]}, [])


def test_tied_scores_are_broken_by_pool_index_in_a_large_pool():
    # numpy's default sort keeps equal items in order for small arrays only: a 3-item test
    # could not tell a stable sort from an unstable one
    scores = np.random.default_rng(0).integers(0, 3, 1000).astype(float)   # a coarse ranking
    truth = np.zeros(1000, bool)
    truth[np.flatnonzero(scores == 2)[:10]] = True   # the top tie group's 10 lowest indices
    assert precision_at_k(scores, truth, 10) == 1.0


def test_the_best_of_tied_candidates_is_the_earlier():
    truth = np.r_[np.ones(5, bool), np.zeros(15, bool)]
    ranking = np.r_[np.ones(5), np.zeros(15)]
    feat = Feature(2, truth, None, "p")
    cands = [{"class": 2, "members": np.arange(5), "ranking": ranking},
             {"class": 4, "members": np.arange(5), "ranking": ranking.copy()}]
    assert best_candidate(cands, feat) == (0, 1.0)
    assert feature_metrics(cands, feat)["best_is_target_class"] == 1.0
    assert feature_metrics(cands[::-1], feat)["best_is_target_class"] == 0.0


def test_ap_in_class_takes_the_best_candidate_of_the_features_class_only():
    # dcbench's best slice may lie in any class: a class-4 candidate that ranks every carrier
    # first gave AP 1.0 while the class-2 candidates ranked the pool at chance
    truth = np.r_[np.ones(5, bool), np.zeros(15, bool)]
    feat = Feature(2, truth, None, "p")
    perfect = np.r_[np.ones(5), np.zeros(15)]
    half = np.r_[1.0, 0, 1, 0, 1, np.ones(5), np.zeros(10)]   # carriers 0, 2, 4 tied with 5 non-carriers first
    cands = [{"class": 4, "members": np.arange(5), "ranking": perfect},
             {"class": 2, "members": np.arange(5), "ranking": half},
             {"class": 2, "members": np.arange(5), "ranking": -perfect}]
    m = feature_metrics(cands, feat)
    assert m["ap"] == 1.0 and m["best_is_target_class"] == 0.0
    assert m["ap_in_class"] == pytest.approx(average_precision(half, truth)) and m["ap_in_class"] < 1.0
    assert best_candidate(cands, feat, in_class=True) == (1, m["ap_in_class"])
    # no candidate of the class: the carrier rate, as a method with no candidate scores
    assert feature_metrics(cands[:1], feat)["ap_in_class"] == pytest.approx(5 / 20)
    assert feature_metrics(cands[1:], feat)["ap_in_class"] == feature_metrics(cands[1:], feat)["ap"]


def test_a_q_value_equal_to_the_level_is_significant():
    feat = Feature(2, np.r_[np.ones(5, bool), np.zeros(15, bool)], None, "p")
    cand = {"class": 2, "members": np.arange(5), "ranking": np.zeros(20), "q_value": 0.05}
    assert significant([cand], 0.05) == [cand]
    assert recall_at_q([cand], [feat], 0.05) == 1.0
    assert recall_at_q([cand], [feat], float(np.nextafter(0.05, 0))) == 0.0


# ---- metrics.feature_metrics: tied non-finite ranking values stay tied ----
def test_tied_infinite_rankings_stay_tied_in_feature_metrics():
    f = Feature(3, np.array([0, 1, 1, 0], bool))
    ranking = np.array([np.inf, np.inf, 1.0, 0.0])
    cand = [{"class": 3, "members": np.array([1, 2]), "ranking": ranking, "q_value": 0.01}]
    m = feature_metrics(cand, f)
    # tie group {0, 1}: 1 carrier of 2 (P 1/2, R 1/2), then item 2 (P 2/3, R 1): AP = 1/4 + 1/3
    assert m["ap"] == pytest.approx(0.25 + 1 / 3)
    assert m["auroc"] == pytest.approx(2.5 / 4)   # the tie of items 0 and 1 counts half
    # the same for unranked (-inf and NaN) items tied at the bottom
    f2 = Feature(3, np.array([1, 0, 1, 0], bool))
    cand2 = [{"class": 3, "members": np.array([0]), "ranking": np.array([1.0, -np.inf, np.nan, 0.5]), "q_value": 0.01}]
    assert feature_metrics(cand2, f2)["auroc"] == pytest.approx(2.5 / 4)   # carrier 2 (NaN) ties item 1 (-inf)
