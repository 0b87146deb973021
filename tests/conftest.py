"""Shared pytest set-up.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set
before any kernel module is imported, so it is set here, at collection start.
Markers: ``gpu`` (skipped cleanly without CUDA), ``on_gpu`` (runs on CUDA where there is one,
else under the Triton interpreter: `bench/gpu_check.sh` selects these with the ``gpu`` ones),
``slow`` (deselected by `make test`).
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "on_gpu: on CUDA where there is one (else the Triton interpreter)")
    config.addinivalue_line("markers", "slow: long evaluation, outside `make test`")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
