"""The shared comparison helper (tests/helpers.py) itself: it must fail on every kind of
mismatch, say how many elements mismatch, where and by how much, and its half-precision
tolerances must be tight enough to catch a wrong fp16/bf16 path on small outputs."""
from __future__ import annotations

import re

import pytest
import torch

from tests.helpers import TOLERANCES, assert_close

INF, NAN = float("inf"), float("nan")


def _fails(actual, expected, dtype=torch.float32, **kw) -> str:
    with pytest.raises(AssertionError) as info:
        assert_close(torch.tensor(actual), torch.tensor(expected), dtype, name="probe", **kw)
    return str(info.value)


@pytest.mark.parametrize("actual,expected", [
    ([5.0, 1.0], [INF, 1.0]),        # finite where +inf is expected
    ([-INF], [INF]),                 # the opposite infinity
    ([INF], [-INF]),
    ([3e38], [INF]),               # the largest fp32 values are still finite
    ([INF], [3.0]),                  # an infinity where a finite value is expected
    ([NAN], [INF]),
    ([INF], [NAN]),
], ids=["finite-vs-inf", "-inf-vs-inf", "inf-vs--inf", "huge-vs-inf", "inf-vs-finite", "nan-vs-inf", "inf-vs-nan"])
def test_infinities_must_match_exactly(actual, expected):
    msg = _fails(actual, expected)
    assert re.search(r"1 of \d+ elements mismatch", msg), msg
    assert "NaN/inf mismatches" in msg, msg


def test_matching_infinities_and_nans_pass():
    assert_close(torch.tensor([INF, -INF, NAN, 1.0]), torch.tensor([INF, -INF, NAN, 1.0 + 1e-6]))
    for dtype in TOLERANCES:
        assert_close(torch.tensor([INF, 2.0]), torch.tensor([INF, 2.0]), dtype)


@pytest.mark.parametrize("actual,expected", [([NAN], [1.0]), ([NAN, 2.0, NAN], [1.0, 2.0, 3.0]), ([1.0], [NAN])],
                         ids=["one", "two-of-three", "finite-vs-nan"])
def test_nan_mismatches_give_the_count_and_positions(actual, expected):
    msg = _fails(actual, expected)           # an AssertionError, not a crash building the message
    n = sum((a != a) != (e != e) for a, e in zip(actual, expected))
    assert f"{n} of {len(actual)} elements mismatch" in msg, msg
    assert f"{n} of them NaN/inf mismatches" in msg and "first positions [[0]" in msg, msg


def test_message_reports_count_position_and_largest_error():
    e = torch.zeros(3, 4)
    a = e.clone()
    a[1, 2], a[2, 0], a[0, 3] = 0.5, -2.0, NAN
    msg = _fails(a.tolist(), e.tolist())
    assert "3 of 12 elements mismatch" in msg, msg
    assert "max abs error 2 at [2, 0]" in msg and "1 of them NaN/inf" in msg, msg
    assert "first positions [[0, 3], [1, 2], [2, 0]]" in msg, msg


def test_shape_mismatch_and_empty_input():
    with pytest.raises(AssertionError, match=r"shape \(2,\) != expected \(3,\)"):
        assert_close(torch.zeros(2), torch.zeros(3))
    assert_close(torch.zeros(0, 5), torch.zeros(0, 5))


def test_fp32_tolerance_is_unchanged_elementwise():
    assert TOLERANCES[torch.float32] == (1e-4, 1e-4, 0.0)
    assert_close(torch.tensor([1.0 + 1.5e-4, 1e-4]), torch.tensor([1.0, 0.0]))
    _fails([1.0 + 3e-4], [1.0])
    _fails([100.0, 0.0 + 2e-4], [100.0, 0.0])         # a large element does not widen a small one's bound


@pytest.mark.parametrize("dtype,u", [(torch.float16, 2.0 ** -11), (torch.bfloat16, 2.0 ** -8)], ids=str)
def test_half_tolerances_follow_the_outputs_magnitude(dtype, u):
    """Outputs as small as the Triton encoder's (|mu| <= 0.07): roundoff-level errors (2 units
    of roundoff of the largest output, beyond the 1.33 u the half paths reach) pass, a path
    wrong by 30 % (the audit's mutant) or by 10 % fails; the same holds at any magnitude."""
    g = torch.Generator().manual_seed(0)
    for mag in (0.07, 1.0, 50.0):
        ref = torch.randn(300, 16, generator=g) * (mag / 4)
        ref[0, 0] = mag
        noise = (torch.rand(ref.shape, generator=g) * 2 - 1) * 2 * u * float(ref.abs().max())
        assert_close(ref + noise, ref, dtype, name=f"roundoff, magnitude {mag}")
        for wrong in (0.7, 0.9):
            msg = _fails((ref * wrong).tolist(), ref.tolist(), dtype)
            assert "elements mismatch" in msg and "max abs error" in msg, msg


def test_integer_mismatches_show_the_values_and_assignments_the_excess():
    from tests.helpers import assert_equal_int, check_assign_near_optimal

    with pytest.raises(AssertionError, match=re.escape("2 of 4 entries differ; first positions [[1], [3]] "
                                                       "(actual [5, 7], expected [1, 2])")):
        assert_equal_int(torch.tensor([0, 5, 0, 7]), torch.tensor([0, 1, 0, 2]), "assign")
    D = torch.tensor([[0.0, 1.0], [4.0, 1.0], [2.0, 9.0]])
    with pytest.raises(AssertionError, match=re.escape("1 of 3 points not at a nearest centroid, first [1]; point 1 "
                                                       "chose 0 at 4, nearest 1 at 1; worst excess 3 at point 1")):
        check_assign_near_optimal(torch.tensor([0, 0, 0]), torch.tensor([0.0, 4.0, 2.0]), D, torch.float32, "a")
    check_assign_near_optimal(torch.tensor([0, 1, 0]), torch.tensor([0.0, 1.0, 2.0]), D, torch.float64, "a")
    assert_close(torch.tensor([1.0], dtype=torch.float64), torch.tensor([1.0]), torch.float64)   # a KeyError before


def test_bitwise_mismatches_give_count_values_and_largest_difference():
    from tests.helpers import assert_bitwise

    assert_bitwise(torch.tensor([1.0, NAN]), torch.tensor([1.0, NAN]))   # NaN where expected has NaN
    with pytest.raises(AssertionError, match=re.escape("sums: 1 of 3 entries differ; first positions [[2]] (actual "
                                                       "[3.5], expected [3.0]); largest difference 0.5")):
        assert_bitwise(torch.tensor([1.0, 2.0, 3.5]), torch.tensor([1.0, 2.0, 3.0]), "sums")
    with pytest.raises(AssertionError, match=r"a: torch.float64 \(2,\) != expected torch.float32 \(2,\)"):
        assert_bitwise(torch.zeros(2, dtype=torch.float64), torch.zeros(2), "a")
