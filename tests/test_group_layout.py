"""The grouped layout helpers the GPU assign launchers share (CPU: they are torch only)."""
import re

import numpy as np
import pytest
import torch

from spurfast.kernels.group_layout import (assign_args, centroid_terms, check_offsets, exclusive_prefix,
                                           split_centroids, tile_prefix)


def test_tile_prefix_counts_partial_and_empty_groups():
    # groups of 0, 1, 128, 129 and 300 rows cut into 128-row tiles: 0, 1, 1, 2, 3 tiles
    offsets = exclusive_prefix(torch.tensor([0, 1, 128, 129, 300]))
    assert offsets.tolist() == [0, 0, 1, 129, 258, 558]
    assert tile_prefix(offsets, 128).tolist() == [0, 0, 1, 2, 4, 7]
    assert tile_prefix(torch.zeros(1, dtype=torch.int64), 64).tolist() == [0]   # no groups


def test_check_offsets_names_what_is_wrong():
    ok = check_offsets(torch.tensor([0, 3, 5], dtype=torch.int32), 5, "cpu")
    assert ok.dtype == torch.int64 and ok.tolist() == [0, 3, 5]
    with pytest.raises(ValueError, match="from 0 to N=5, got 1..5"):
        check_offsets(torch.tensor([1, 3, 5]), 5, "cpu")
    with pytest.raises(ValueError, match="from 0 to N=6"):
        check_offsets(torch.tensor([0, 3, 5]), 6, "cpu")
    with pytest.raises(ValueError, match="1-D tensor"):
        check_offsets([0, 5], 5, "cpu")
    with pytest.raises(ValueError, match=r"k_per_group has values in \[1, 9\]; expected \[0, kmax=8\]"):
        check_offsets(torch.tensor([0, 3, 5]), 5, "cpu", torch.tensor([1, 9]), 8)
    # decreasing offsets end at N too; the assign kernels then read and wrote rows past N
    with pytest.raises(ValueError, match=r"must not decrease .* offsets\[1\] = 12 > offsets\[2\] = 4 \(group 1 of size -8\)"):
        check_offsets(torch.tensor([0, 12, 4, 10]), 10, "cpu")
    assert check_offsets(torch.tensor([0]), 0, "cpu").tolist() == [0]     # no group at all
    assert check_offsets(torch.tensor([0, 0, 4, 4]), 4, "cpu").tolist() == [0, 0, 4, 4]


def test_assign_args_zeroed_outputs_and_group_count():
    x = torch.zeros(5, 3)
    off, kpg, assign, dist = assign_args(x, torch.tensor([0, 2, 5]), [2, 1], 2, 2)
    assert kpg.dtype == torch.int64 and assign.shape == dist.shape == (5,)
    assert not assign.any() and not dist.any() and assign.dtype == torch.int64 and dist.dtype == torch.float32
    with pytest.raises(ValueError, match="3 entries for 2 groups"):
        assign_args(x, torch.tensor([0, 2, 5]), [2, 1, 1], 2, 2)


@pytest.mark.parametrize("kpg", [[2, 1.5], torch.tensor([2.0, float("nan")])])
def test_assign_args_refuses_fractional_k_as_the_reference_does(kpg):
    # the Triton and CuPy launchers truncated k_g = 1.5 to 1 where the reference refuses it
    with pytest.raises(ValueError, match=r"k_per_group\[1\] = (1.5|nan): expected an integer"):
        assign_args(torch.zeros(5, 3), torch.tensor([0, 2, 5]), kpg, 2, 2)
    off, k, _, _ = assign_args(torch.zeros(5, 3), torch.tensor([0, 2, 5]), [2.0, 1.0], 2, 2)
    assert k.dtype == torch.int64 and k.tolist() == [2, 1]


def test_centroid_terms_per_metric():
    c = torch.tensor([[[3.0, 4.0], [0.0, 2.0]]], dtype=torch.float64)
    c32, term = centroid_terms(c, "l2", "cpu")
    assert c32.dtype == torch.float32 and term.tolist() == [[25.0, 4.0]]
    unit, zero = centroid_terms(c, "cosine", "cpu")
    assert torch.allclose(unit, torch.tensor([[[0.6, 0.8], [0.0, 1.0]]])) and not zero.any()


@pytest.mark.parametrize("dtype, rel", [(torch.float16, 2.0 ** -21), (torch.bfloat16, 2.0 ** -15)], ids=str)
def test_split_centroids_one_buffer(dtype, rel):
    c = torch.randn(7, 5, generator=torch.Generator().manual_seed(1)) * 100
    both = split_centroids(c, dtype, 8)
    assert both.shape == (2, 7, 8) and both.dtype == dtype and both.is_contiguous()
    hi, lo = both
    assert not both[:, :, 5:].any(), "padding must be zero"
    err = (hi[:, :5].float() + lo[:, :5].float() - c).abs()
    assert float((err - rel * c.abs() - 2.0 ** -24).max()) <= 0


@pytest.mark.parametrize("offsets, shown", [(torch.tensor([0, 2.5, 5]), "2.5"),
                                            (torch.tensor([0.0, float("nan"), 5.0]), "nan"),
                                            (torch.tensor([0.0, float("inf"), 5.0]), "inf")])
def test_check_offsets_refuses_fractional_or_nonfinite_float_offsets(offsets, shown):
    # the int64 conversion truncated 2.5 to 2: the rows were split in another place, silently
    with pytest.raises(ValueError, match=rf"offsets holds {shown} \(entry 1\); expected integers"):
        check_offsets(offsets, 5, "cpu")
    with pytest.raises(ValueError, match="offsets has dtype torch.complex64"):
        check_offsets(torch.tensor([0, 2, 5], dtype=torch.complex64), 5, "cpu")
    # whole floats still pass, as int64
    assert check_offsets(torch.tensor([0.0, 2.0, 5.0]), 5, "cpu").tolist() == [0, 2, 5]


@pytest.mark.parametrize("value, shown", [(1e30, "1e\\+30"), (2.0 ** 63, "9.22337e\\+18"), (-1e19, "-1e\\+19")])
def test_check_offsets_refuses_float_offsets_past_int64_as_given(value, shown):
    # the int64 cast wrapped them to -2**63, and the message showed that instead
    with pytest.raises(ValueError, match=rf"offsets holds {shown} \(entry 1\); expected integers within int64"):
        check_offsets(torch.tensor([0.0, value, 5.0], dtype=torch.float64), 5, "cpu")
    # -2**63 itself is an int64
    with pytest.raises(ValueError, match="offsets must run from 0"):
        check_offsets(torch.tensor([-2.0 ** 63, 5.0], dtype=torch.float64), 5, "cpu")


@pytest.mark.parametrize("kpg", [torch.tensor([[1, 2]]), torch.tensor(2)], ids=["1x2", "0-d"])
def test_assign_args_refuses_a_k_per_group_not_one_dimensional_as_the_reference_does(kpg):
    # (1, 2) for one group passed the length check and the Triton and CuPy kernels read
    # k = 1 from it, silently; a 0-d k failed in len() ("len() of a 0-d tensor")
    with pytest.raises(ValueError, match=re.escape(f"k_per_group has shape {tuple(kpg.shape)}; expected (1,), "
                                                   f"one k per group")):
        assign_args(torch.zeros(5, 3), torch.tensor([0, 5]), kpg, 1, 2)


@pytest.mark.parametrize("flag", [True, np.True_, torch.tensor(True)], ids=["bool", "numpy", "tensor"])
def test_a_bool_is_no_size(flag):
    # operator.index takes a bool: latent_knn(z, k=True) ran with k = 1, kmeans_update with kmax = 1
    from spurfast.kernels import reference as ref
    from spurfast.kernels.group_layout import check_count

    with pytest.raises(TypeError, match="k must be an integer, got"):
        check_count(flag, "k")
    with pytest.raises(TypeError, match="must be an integer, got True"):
        ref.latent_knn(torch.randn(10, 3), True)
    assert check_count(np.int64(3), "k") == 3 and check_count(torch.tensor(2), "k") == 2
