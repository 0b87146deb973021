import numpy as np

from spurfast.discover import DiscoveryResult
from spurfast.pipeline import rank_confirmed_first


def _finding(rank, confirmed, out):
    cf = ({"flip_rate": 0.4, "control_flip_rate": 0.01, "p_value": 1e-4, "content_flip_rate": 0.05,
           "content_p_value": 1e-3} if confirmed else
          {"flip_rate": 0.2, "control_flip_rate": 0.01, "p_value": 1e-4, "content_flip_rate": 0.3,
           "content_p_value": 0.9})
    (out / "images").mkdir(exist_ok=True)
    (out / "images" / f"finding{rank}_mask.png").write_text(f"mask of {rank}")
    return {"rank": rank, "score": 10.0 - rank, "confirm": cf, "images": {"mask": f"images/finding{rank}_mask.png"}}


def test_confirmed_findings_move_first_with_their_files(tmp_path):
    fs = [_finding(1, False, tmp_path), _finding(2, True, tmp_path), _finding(3, False, tmp_path)]
    res = DiscoveryResult(fs, [], {1: np.array([1.0]), 2: np.array([2.0]), 3: np.array([3.0])}, {}, {})
    rank_confirmed_first(res, tmp_path)
    assert [f["rank"] for f in res.findings] == [1, 2, 3]
    assert [f["confirmed"] for f in res.findings] == [True, False, False]
    assert [float(res.rankings[r][0]) for r in (1, 2, 3)] == [2.0, 1.0, 3.0]
    assert [(tmp_path / f["images"]["mask"]).read_text() for f in res.findings] == ["mask of 2", "mask of 1", "mask of 3"]
    assert res.findings[0]["images"]["mask"] == "images/finding1_mask.png"


def test_not_specific_findings_come_after_confirmed_and_before_the_rest(tmp_path):
    """A finding that beats genuine class content but not random patterns (the model
    reacts to any corruption of that size) ranks above one genuine content explains."""
    fs = [_finding(1, False, tmp_path), _finding(2, False, tmp_path), _finding(3, True, tmp_path)]
    fs[1]["confirm"] = {"flip_rate": 1.0, "control_flip_rate": 0.99, "p_value": 0.12, "content_flip_rate": 0.0,
                        "content_p_value": 1e-30}
    res = DiscoveryResult(fs, [], {1: np.array([1.0]), 2: np.array([2.0]), 3: np.array([3.0])}, {}, {})
    rank_confirmed_first(res, tmp_path)
    assert [float(res.rankings[r][0]) for r in (1, 2, 3)] == [3.0, 2.0, 1.0]
    assert [f["confirmed"] for f in res.findings] == [True, False, False]
    assert [(tmp_path / f["images"]["mask"]).read_text() for f in res.findings] == ["mask of 3", "mask of 2", "mask of 1"]


def test_the_output_folder_may_be_a_str(tmp_path):
    """Every other step of README's step-by-step takes a str folder; this one failed with
    "unsupported operand type(s) for /: 'str' and 'str'", and only where the order changed."""
    fs = [_finding(1, False, tmp_path), _finding(2, True, tmp_path)]
    res = DiscoveryResult(fs, [], {1: np.array([1.0]), 2: np.array([2.0])}, {}, {})
    rank_confirmed_first(res, str(tmp_path))
    assert [(tmp_path / f["images"]["mask"]).read_text() for f in res.findings] == ["mask of 2", "mask of 1"]
