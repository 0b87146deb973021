"""Caller's models back as they came in: a step puts them in eval mode on its device."""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch


@contextlib.contextmanager
def models_as_given(*models, device: bool = True):
    """Each torch module of ``models`` back in the train/eval mode (and, with ``device``, on the
    device) it came in, however the block ends: the run puts them in eval mode on its device,
    and a caller's model mid-training came back without its dropout (a refused run too)."""
    kept = []
    for m in models:
        if isinstance(m, torch.nn.Module):
            first = next(iter(m.parameters()), None)
            kept.append((m, {n: sub.training for n, sub in m.named_modules()},
                         None if first is None or not device else first.device))
    try:
        yield
    finally:
        for m, modes, came_on in kept:
            for n, sub in m.named_modules():
                sub.training = modes.get(n, sub.training)
            if came_on is not None:
                m.to(came_on)


def restores_models(*names: str, device: bool = True):
    """Decorator: the function's arguments ``names`` (models, named or not) `models_as_given`.
    Every public step that takes a caller's model wears it: only run_discovery did, and
    embed_pool and confirm_findings left a model mid-training without its dropout.
    ``device=False``: the mode alone (the embedding pass leaves the models on the run's
    device, where run_discovery's later steps, confirmation among them, use them)."""
    def wrap(run):
        signature = inspect.signature(run)

        @functools.wraps(run)
        def wrapper(*args, **kwargs):
            given = signature.bind_partial(*args, **kwargs).arguments
            with models_as_given(*(given.get(n) for n in names), device=device):
                return run(*args, **kwargs)
        return wrapper
    return wrap
