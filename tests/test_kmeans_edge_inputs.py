"""Every kmeans_assign provider that runs here against the reference on inputs a user can
hit and the per-provider files do not cover: latents of 1 or 3 dimensions (a VAE's
latent_dim may be 1; the CPU kernel's 8-wide body and Triton's 16-wide d chunk are then
all remainder), one point in all, strided views, zero vectors under cosine, and exact
ties in every provider.  On the CPU the Triton kernel runs under the interpreter (fp32);
on a GPU it and the CuPy kernel take CUDA tensors.
"""
from __future__ import annotations

import pytest
import torch

from spurfast.kernels import kmeans_cpu, kmeans_cupy, kmeans_triton
from spurfast.kernels import reference as ref
from tests.helpers import assert_equal_int, check_assign_near_optimal, exact_dists

HAS_CUDA = torch.cuda.is_available()


def _providers():
    out = [pytest.param((kmeans_cpu.kmeans_assign, "cpu"), id="cpu",
                        marks=pytest.mark.skipif(not kmeans_cpu.is_available()[0], reason="CPU kernels unavailable"))]
    out.append(pytest.param((kmeans_triton.kmeans_assign, "cuda" if HAS_CUDA else "cpu"), id="triton",
                            marks=[pytest.mark.on_gpu, pytest.mark.skipif(not kmeans_triton.is_available()[0],
                                                                          reason="no CUDA device and no Triton "
                                                                                 "interpreter")]))
    out.append(pytest.param((kmeans_cupy.kmeans_assign, "cuda"), id="cupy",
                            marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA or not kmeans_cupy.is_available()[0],
                                                                       reason="needs CUDA and CuPy")]))
    return out


def _offsets(sizes):
    off = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(torch.tensor(sizes, dtype=torch.int64), 0)
    return off


def _agree(provider, x, off, cent, kpg, metric, what, exact_ties=False):
    fn, device = provider
    want_a, want_d = ref.kmeans_assign(x, off, cent, kpg, metric)
    got_a, got_d = fn(x.to(device), off.to(device), cent.to(device), kpg.to(device), metric)
    if device == "cuda" and not exact_ties:   # tensor-core products (tf32x3): near-ties may go either way
        D = exact_dists(x.float().contiguous(), off, cent, kpg, metric)
        check_assign_near_optimal(got_a.cpu(), got_d.cpu(), D, torch.float32, f"{what}: assign")
        return
    assert_equal_int(got_a.cpu(), want_a, f"{what}: assign")
    torch.testing.assert_close(got_d.cpu(), want_d, rtol=1e-5, atol=1e-6, equal_nan=True,
                               msg=lambda m: f"{what}: dist\n{m}")


@pytest.mark.parametrize("provider", _providers())
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("d", [1, 3])
def test_latents_of_one_or_three_dimensions(provider, metric, d):
    g = torch.Generator().manual_seed(d)
    sizes = [7, 0, 1, 30]
    x = torch.randn(sum(sizes), d, generator=g)
    cent = torch.randn(len(sizes), 5, d, generator=g)
    _agree(provider, x, _offsets(sizes), cent, torch.tensor([5, 2, 1, 4]), metric, f"d={d} {metric}")


@pytest.mark.parametrize("provider", _providers())
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_one_point_in_all(provider, metric):
    g = torch.Generator().manual_seed(3)
    _agree(provider, torch.randn(1, 17, generator=g), _offsets([1]), torch.randn(1, 3, 17, generator=g),
           torch.tensor([3]), metric, f"N=1 {metric}")


@pytest.mark.parametrize("provider", _providers())
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_strided_views_of_the_points(provider, metric):
    g = torch.Generator().manual_seed(4)
    sizes = [11, 20]
    wide = torch.randn(sum(sizes), 2 * 9, generator=g)
    cent = torch.randn(2, 4, 9, generator=g)
    for view in (wide[:, ::2], wide[:, :9], torch.randn(9, sum(sizes), generator=g).t()):
        assert not view.is_contiguous()
        _agree(provider, view, _offsets(sizes), cent, torch.tensor([4, 3]), metric, f"{metric} view {view.stride()}")


@pytest.mark.parametrize("provider", _providers())
def test_zero_vectors_under_cosine(provider):
    # no direction: 1 - cos is 1 to every centroid, and the lowest index wins, as the reference says
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    cent = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 2.0, 0.0], [3.0, 0.0, 0.0]]])
    _agree(provider, x, _offsets([3]), cent, torch.tensor([3]), "cosine", "zero vectors")


@pytest.mark.parametrize("provider", _providers())
def test_exact_ties_go_to_the_same_index_in_every_provider(provider):
    # small integers: every L2 score is exact in any summation order, so ties are exact ties
    g = torch.Generator().manual_seed(1)
    for trial in range(12):
        d = int(torch.randint(1, 6, (1,), generator=g))
        G = int(torch.randint(1, 4, (1,), generator=g))
        kmax = int(torch.randint(1, 40, (1,), generator=g))
        sizes = torch.randint(0, 40, (G,), generator=g).tolist()
        x = torch.randint(-2, 3, (sum(sizes), d), generator=g).float()
        cent = torch.randint(-2, 3, (G, kmax, d), generator=g).float()
        kpg = torch.randint(0, kmax + 1, (G,), generator=g)
        _agree(provider, x, _offsets(sizes), cent, kpg, "l2", f"trial {trial}", exact_ties=True)
