"""The backend registry's choice (argument, SPURFAST_BACKEND_<OP>, SPURFAST_BACKEND, auto)
and how the Lloyd loop follows it for every op it runs."""
from __future__ import annotations

import os

import pytest
import torch

from spurfast import backends
from spurfast.cluster import batched_kmeans
from spurfast.kernels import kmeans_cpu as kcpu
from spurfast.kernels import reference as ref
from tests.helpers import assert_close, assert_equal_int

needs_kernel = pytest.mark.skipif(not kcpu.is_available()[0],
                                  reason=f"fused CPU kernels unavailable: {kcpu.is_available()[1]}")


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    for var in [v for v in os.environ if v.startswith("SPURFAST_BACKEND")]:
        monkeypatch.delenv(var)
    backends.clear_cache()
    yield
    backends.clear_cache()


def _data(seed=3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(2, 4, 8, generator=g) * 10
    groups = torch.arange(2).repeat_interleave(300)
    x = centres[groups, torch.randint(0, 4, (600,), generator=g)] + 0.3 * torch.randn(600, 8, generator=g)
    return x, groups


def test_a_global_variable_that_names_no_backend_raises(monkeypatch):
    # SPURFAST_BACKEND=toch fell through to auto on every op, silently
    monkeypatch.setenv("SPURFAST_BACKEND", "toch")
    for op in ("kmeans_assign", "latent_knn", "loader"):
        with pytest.raises(backends.BackendUnavailable, match="SPURFAST_BACKEND='toch' names no backend; choose from"):
            backends.resolve(op, None, "cpu")
    # a per-op variable or an argument decides before it
    monkeypatch.setenv("SPURFAST_BACKEND_LATENT_KNN", "torch")
    assert backends.resolve("latent_knn", None, "cpu")[0] == "torch"
    assert backends.resolve("kmeans_assign", "torch", "cpu")[0] == "torch"
    # a real backend that some ops lack still applies to the others only
    monkeypatch.setenv("SPURFAST_BACKEND", "dali")
    assert backends.requested("loader") == "dali" and backends.requested("kmeans_assign") == "auto"
    monkeypatch.setenv("SPURFAST_BACKEND", "auto")
    assert backends.requested("kmeans_assign") == "auto"


@pytest.mark.parametrize("var, msg", [
    ("spurfast_backend_kmeans_assign", r"spurfast_backend_kmeans_assign=cupy is never read: spurfast reads "
                                       r"SPURFAST_BACKEND and SPURFAST_BACKEND_<OP>, in upper case "
                                       r"\(SPURFAST_BACKEND_KMEANS_ASSIGN\?\)"),
    ("SPURFAST_BACKENDS", r"SPURFAST_BACKENDS=cupy is never read"),
    ("SPURFAST_BACKEND_KMEANS_ASIGN", r"no op is named 'kmeans_asign'")])
def test_a_variable_no_op_reads_is_refused_through_the_api_too(monkeypatch, var, msg):
    # only the CLI checked the names: batched_kmeans ran on auto without a word, and a prefix in
    # lower case (or SPURFAST_BACKENDS) went unnoticed by the CLI as well
    for k in [k for k in os.environ if k.upper().startswith("SPURFAST_BACKEND")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv(var, "cupy")
    with pytest.raises(backends.BackendUnavailable, match=msg):
        backends.resolve("kmeans_assign", None, "cpu")
    with pytest.raises(backends.BackendUnavailable, match=msg):
        backends.check_op_variables()
    monkeypatch.delenv(var)
    assert backends.resolve("kmeans_assign", None, "cpu")[0] in ("cpu", "torch")


def test_a_backend_value_spelt_otherwise_is_named_as_a_spelling(monkeypatch):
    # 'Cupy' and 'torch ' were "does not implement 'kmeans_assign'; choose from [... 'cupy', 'torch' ...]"
    monkeypatch.setenv("SPURFAST_BACKEND_KMEANS_ASSIGN", "Cupy")
    with pytest.raises(backends.BackendUnavailable, match=r"backend 'Cupy' does not implement 'kmeans_assign': "
                                                          r"backend names are lower case, without spaces \('cupy'\)"):
        backends.resolve("kmeans_assign", None, "cpu")
    with pytest.raises(backends.BackendUnavailable, match=r"backend 'torch ' does not implement 'kmeans_assign': "
                                                          r"backend names are lower case"):
        backends.resolve("kmeans_assign", "torch ", "cpu")


def test_a_backend_that_serves_the_assignment_alone_runs_the_lloyd_loop(monkeypatch):
    # backend="triton" died after the first assignment: its name went to kmeans_update too,
    # which triton does not provide; the update now takes its usual choice
    monkeypatch.setitem(backends.REGISTRY, "kmeans_assign", backends.REGISTRY["kmeans_assign"] + [
        backends.Provider("assign-only", f"{backends.REF}:kmeans_assign")])
    x, groups = _data()
    want = batched_kmeans(x, groups, [4, 4], seed=1, backend="torch")
    got = batched_kmeans(x, groups, [4, 4], seed=1, backend="assign-only")
    assert_equal_int(got.assign, want.assign, "assignment-only backend")
    assert_close(got.centroids, want.centroids, name="centroids")


def _spy(monkeypatch, module, name, calls):
    orig, key = getattr(module, name), f"{module.__name__.rsplit('.', 1)[-1]}.{name}"

    def spy(*a, **k):
        calls[key] = calls.get(key, 0) + 1
        return orig(*a, **k)

    monkeypatch.setattr(module, name, spy)


@pytest.fixture
def calls(monkeypatch):
    got: dict[str, int] = {}
    for module in (ref, kcpu):
        for name in ("kmeans_plusplus", "kmeans_update", "kmeans_assign_update", "kmeans_assign"):
            _spy(monkeypatch, module, name, got)
    backends.clear_cache()   # resolve loads the spies
    return got


@needs_kernel
@pytest.mark.parametrize("var,value,want,never", [
    # the loop took seeding and the fused step from the assignment's provider (cpu) whatever these said
    ("SPURFAST_BACKEND_KMEANS_PLUSPLUS", "torch", {"reference.kmeans_plusplus": 1}, ["kmeans_cpu.kmeans_plusplus"]),
    # (the first, full update and the final counts at least; later ones add the movers only)
    ("SPURFAST_BACKEND_KMEANS_UPDATE", "torch", {"reference.kmeans_update": 2}, ["kmeans_cpu.kmeans_assign_update"]),
    ("SPURFAST_BACKEND_KMEANS_ASSIGN_UPDATE", "torch", {"reference.kmeans_assign_update": "n_iter"},
     ["kmeans_cpu.kmeans_assign_update"]),
])
def test_per_op_variables_choose_the_lloyd_loops_other_ops(monkeypatch, calls, var, value, want, never):
    x, groups = _data()
    monkeypatch.setenv(var, value)
    res = batched_kmeans(x, groups, [4, 4], seed=1, n_iter=5)
    for name, n in want.items():
        n = res.n_iter if n == "n_iter" else n
        assert calls.get(name, 0) >= n, f"{var}={value}: {name} ran {calls.get(name, 0)} times; calls {calls}"
    for name in never:
        assert name not in calls, f"{var}={value}: {name} ran; calls {calls}"
    monkeypatch.setenv(var, "toch")   # a typo raises, as for any op
    backends.clear_cache()
    with pytest.raises(backends.BackendUnavailable, match="backend 'toch' does not implement"):
        batched_kmeans(x, groups, [4, 4], seed=1, n_iter=5)


@needs_kernel
def test_a_backend_named_for_the_run_covers_every_op_of_its_loop(monkeypatch, calls):
    # an explicit argument decides before any variable (the registry's order)
    x, groups = _data()
    monkeypatch.setenv("SPURFAST_BACKEND_KMEANS_PLUSPLUS", "torch")
    monkeypatch.setenv("SPURFAST_BACKEND_KMEANS_UPDATE", "torch")
    batched_kmeans(x, groups, [4, 4], seed=1, n_iter=5, backend="cpu")
    assert not any(name.startswith("reference.") for name in calls), calls
    assert calls.get("kmeans_cpu.kmeans_plusplus") == 1 and calls.get("kmeans_cpu.kmeans_assign_update", 0) >= 1


@needs_kernel
def test_default_run_keeps_the_assignments_provider_for_every_op(calls):
    x, groups = _data()
    batched_kmeans(x, groups, [4, 4], seed=1, n_iter=5)
    assert not any(name.startswith("reference.") for name in calls), calls


def test_a_group_id_out_of_range_is_named():
    # the error said only "group ids must lie in [0, 2)": not which point, nor its id
    x, groups = _data()
    groups = groups.clone()
    groups[7] = -1
    with pytest.raises(ValueError, match=r"group ids must lie in \[0, 2\); 1 do not, e.g. groups\[7\] = -1"):
        batched_kmeans(x, groups, [4, 4], n_groups=2)


@needs_kernel
def test_the_assignments_own_variable_beats_the_global_one_in_every_iteration(monkeypatch, calls):
    """SPURFAST_BACKEND=cpu with SPURFAST_BACKEND_KMEANS_ASSIGN=torch: the global variable
    picked the cpu kernel's fused assign + update, so every iteration assigned on it and the
    per-op choice reached only the final assignment."""
    x, groups = _data()
    monkeypatch.setenv("SPURFAST_BACKEND", "cpu")
    monkeypatch.setenv("SPURFAST_BACKEND_KMEANS_ASSIGN", "torch")
    res = batched_kmeans(x, groups, [4, 4], seed=1, n_iter=5, tol=0.0)
    assert "kmeans_cpu.kmeans_assign_update" not in calls, calls
    assert calls.get("reference.kmeans_assign", 0) >= res.n_iter, calls
    assert calls.get("kmeans_cpu.kmeans_update", 0) >= 1, calls     # the update follows the global variable


def test_call_takes_the_device_of_a_numpy_argument():
    """numpy 2 arrays have .device == "cpu", a string: call() raised "'str' object has no
    attribute 'type'" where the providers take numpy themselves."""
    import numpy as np

    z = np.random.default_rng(0).standard_normal((20, 3)).astype(np.float32)
    got = backends.call("latent_knn", z, 3)
    assert_equal_int(torch.as_tensor(got), ref.latent_knn(torch.from_numpy(z), 3), "latent_knn through call()")
