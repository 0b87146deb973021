"""Comparison helpers shared by every kernel test: one tolerance table, and failure
messages that say how many elements mismatch, where, and the max error."""
from __future__ import annotations

import torch

# (atol, rtol) per compute dtype; kernels accumulate in fp32 in every case.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (6e-2, 4e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32,
                 name: str = "output", atol: float | None = None, rtol: float | None = None) -> None:
    a_tol, r_tol = TOLERANCES[dtype]
    atol = a_tol if atol is None else atol
    rtol = r_tol if rtol is None else rtol
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.numel() == 0:
        return
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    bad |= torch.isnan(a) != torch.isnan(e)
    n_bad = int(bad.sum())
    if n_bad:
        pos = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{name} ({dtype}): {n_bad} of {a.numel()} elements mismatch (atol={atol}, rtol={rtol}); "
            f"max abs error {float(err[~torch.isnan(err)].max()):.3g}; first positions {pos}")


def assert_equal_int(actual: torch.Tensor, expected: torch.Tensor, name: str = "output") -> None:
    a, e = actual.cpu(), expected.cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    bad = a != e
    if bool(bad.any()):
        pos = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())} of {a.numel()} entries differ; first positions {pos}")
