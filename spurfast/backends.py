"""One registry that picks, per operation, which implementation runs.

Operations and their providers, fastest first.  Every provider is named by a lazy
"module:function" path, so importing spurfast never imports triton, cupy or DALI and
never initialises CUDA.  A provider module may define ``is_available() -> (bool, why)``.

Choice per call: an explicit ``backend=`` argument, else the environment variable
``SPURFAST_BACKEND_<OP>`` (e.g. ``SPURFAST_BACKEND_KMEANS_ASSIGN=torch``), else
``SPURFAST_BACKEND`` (applies to every op that has such a provider; a name no op has
raises), else ``auto``.
``auto`` takes the first available provider and logs why it skipped the others; a
provider named explicitly raises :class:`BackendUnavailable` if it cannot run here.
A provider may serve one device type only (``devices``): :func:`call` reads the device
of its first tensor argument, and ``auto`` skips providers that cannot take it (CPU
tensors on a GPU machine go to a CPU provider, not to the CuPy kernels).
"""
from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("spurfast.backends")


class BackendUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Provider:
    name: str
    target: str  # "module:function"
    devices: tuple[str, ...] | None = None   # device types it takes; None: any

    def serves(self, device: str | None) -> bool:
        return device is None or self.devices is None or device in self.devices

    def load(self) -> Callable:
        module, func = self.target.split(":")
        return getattr(importlib.import_module(module), func)

    def available(self) -> tuple[bool, str]:
        module = self.target.split(":")[0]
        try:
            mod = importlib.import_module(module)
        except Exception as exc:  # ImportError, or a broken optional install
            return False, f"cannot import {module}: {exc.__class__.__name__}: {exc}"
        check = getattr(mod, "is_available", None)
        if check is None:
            return True, ""
        try:
            ok, why = check()
        except Exception as exc:
            return False, f"{module}.is_available() raised {exc!r}"
        return bool(ok), why


REF = "spurfast.kernels.reference"
# op -> providers in preference order (auto takes the first available one).
REGISTRY: dict[str, list[Provider]] = {
    "encoder": [
        # CUDA tensors only under auto: on CPU tensors Triton has just its interpreter, a
        # test tool (named explicitly, backend="triton", it still runs there)
        Provider("triton", "spurfast.kernels.encoder_triton:encoder_forward", ("cuda",)),
        Provider("torch", f"{REF}:encoder_forward"),
    ],
    "kmeans_assign": [
        # wgmma through tl.dot: on an H200 (2026-12-04) 4.8 ms against CuPy's 14.8 ms in fp32 and
        # 2.0 against 3.2 ms in fp16 at N=1e6, d=128, k=1024; level with it at N=1e5, d=64, k=64
        # and at 1000 groups x 1300 points, k=16
        Provider("triton", "spurfast.kernels.kmeans_triton:kmeans_assign", ("cuda",)),
        Provider("cupy", "spurfast.kernels.kmeans_cupy:kmeans_assign", ("cuda",)),
        Provider("cpu", "spurfast.kernels.kmeans_cpu:kmeans_assign", ("cpu",)),
        Provider("torch", f"{REF}:kmeans_assign"),
    ],
    # assign + update in one pass.  Used by the Lloyd loop only when the provider chosen
    # for kmeans_assign also offers it (see `companion`); others run the two ops, where
    # the loop can update with the points that moved alone.
    "kmeans_assign_update": [
        Provider("cpu", "spurfast.kernels.kmeans_cpu:kmeans_assign_update", ("cpu",)),
        Provider("torch", f"{REF}:kmeans_assign_update"),
    ],
    "kmeans_plusplus": [
        Provider("cpu", "spurfast.kernels.kmeans_cpu:kmeans_plusplus", ("cpu",)),
        Provider("torch", f"{REF}:kmeans_plusplus"),
    ],
    "latent_knn": [
        Provider("cpu", "spurfast.kernels.kmeans_cpu:latent_knn", ("cpu",)),
        Provider("torch", f"{REF}:latent_knn"),
    ],
    "kmeans_update": [
        Provider("cupy", "spurfast.kernels.kmeans_cupy:kmeans_update", ("cuda",)),
        Provider("cpu", "spurfast.kernels.kmeans_cpu:kmeans_update", ("cpu",)),
        Provider("torch", f"{REF}:kmeans_update"),
    ],
    "cluster_similarity": [
        Provider("cupy", "spurfast.kernels.kmeans_cupy:cluster_similarity", ("cuda",)),
        Provider("torch", f"{REF}:cluster_similarity"),
    ],
    "loader": [
        Provider("dali", "spurfast.data.loader_dali:iter_folder_batches"),
        Provider("torch", "spurfast.data.loader_torch:iter_folder_batches"),
    ],
}

_cache: dict[tuple[str, str, str | None], tuple[str, Callable]] = {}


def providers(op: str) -> list[Provider]:
    if op not in REGISTRY:
        raise KeyError(f"unknown operation {op!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[op]


def requested_for_op(op: str) -> str | None:
    """``op``'s own variable (SPURFAST_BACKEND_<OP>) alone, None when unset: a choice that
    beats the global SPURFAST_BACKEND."""
    return os.environ.get(f"SPURFAST_BACKEND_{op.upper()}") or None


def _check_global(glob: str) -> None:
    """SPURFAST_BACKEND must name a provider of some op (or auto): a typo raises instead of
    falling back to auto."""
    known = sorted({p.name for provs in REGISTRY.values() for p in provs})
    if glob not in known + ["auto"]:
        raise BackendUnavailable(f"SPURFAST_BACKEND={glob!r} names no backend; choose from {known + ['auto']}")


def check_op_variables() -> None:
    """Refuse a SPURFAST_BACKEND_<OP> variable that no op reads: a misspelt op, or one in
    lower case (the registry reads upper case).  Either was ignored and the run went on with
    auto, as a misspelt backend in its value would not (that raises).  And a SPURFAST_BACKEND
    that names no backend, before any op asks for it (`spurfast env` listed every backend
    "available" under SPURFAST_BACKEND=Torch)."""
    if os.environ.get("SPURFAST_BACKEND"):
        _check_global(os.environ["SPURFAST_BACKEND"])
    _check_names()


def _check_names() -> None:
    """`check_op_variables`' check of the variables' names (their values are checked where
    an op reads them)."""
    for var in sorted(os.environ):
        if not os.environ[var] or not var.upper().startswith("SPURFAST_BACKEND") or var == "SPURFAST_BACKEND":
            continue
        # the prefix in another case, or another name (SPURFAST_BACKENDS): ignored as well
        if not var.startswith("SPURFAST_BACKEND_"):
            tail = var[len("SPURFAST_BACKEND"):]   # "" or "_OP" where only the case is wrong
            right = f" (SPURFAST_BACKEND{tail.upper()}?)" if tail[:1] in ("", "_") else ""
            raise BackendUnavailable(f"{var}={os.environ[var]} is never read: spurfast reads SPURFAST_BACKEND and "
                                     f"SPURFAST_BACKEND_<OP>, in upper case{right}")
        op = var.removeprefix("SPURFAST_BACKEND_")
        if op.lower() not in REGISTRY:
            raise BackendUnavailable(f"{var}={os.environ[var]}: no op is named {op.lower()!r}; SPURFAST_BACKEND_<OP> "
                                     f"takes one of {', '.join(k.upper() for k in REGISTRY)}")
        if op != op.upper():
            raise BackendUnavailable(f"{var}={os.environ[var]} is never read: the op is spelt in upper case, "
                                     f"SPURFAST_BACKEND_{op.upper()}")


_checked: int | None = None   # the number of environment variables when the names were last checked


def _check_variables_once() -> None:
    """`check_op_variables`' check of the names for API runs too, again whenever a variable
    comes or goes: only the CLI checked them, and a misspelt SPURFAST_BACKEND_KMEANS_ASIGN ran
    `batched_kmeans` on auto without a word (where a misspelt SPURFAST_BACKEND raised).  Keyed
    on the count alone: a scan of the environment on every `resolve` made it 50-300x slower."""
    global _checked
    if len(os.environ) != _checked:
        _check_names()   # names only: a per-op variable or an argument still decides before the global one
        _checked = len(os.environ)


def requested(op: str, backend: str | None = None) -> str:
    """The backend asked for: argument, then env var per op, then global env var (which
    must name a provider of some op: a typo raises instead of falling back to auto)."""
    if backend:
        return backend
    per_op = requested_for_op(op)
    if per_op:
        return per_op
    glob = os.environ.get("SPURFAST_BACKEND")
    if glob and glob != "auto":
        if any(p.name == glob for p in providers(op)):
            return glob
        _check_global(glob)
    return "auto"


def resolve(op: str, backend: str | None = None, device: str | None = None) -> tuple[str, Callable]:
    """Return (provider name, function) for ``op``; ``device`` (a device type such as
    "cpu" or "cuda") restricts ``auto`` to the providers that take it."""
    if device == "meta":   # the torch providers took them, and failed deep inside torch naming nothing
        raise ValueError(f"{op}: tensors on the meta device hold no data; pass CPU or CUDA tensors")
    _check_variables_once()
    want = requested(op, backend)
    key = (op, want, device)
    if key in _cache:
        return _cache[key]
    provs = providers(op)
    if want != "auto":
        match = [p for p in provs if p.name == want]
        if not match:
            # 'Cupy' or 'torch ' is a spelling, not a backend the op lacks
            spelt = (f": backend names are lower case, without spaces ({want.strip().lower()!r})"
                     if any(p.name == want.strip().lower() for p in provs) else "")
            raise BackendUnavailable(
                f"backend {want!r} does not implement {op!r}{spelt}; choose from "
                f"{[p.name for p in provs] + ['auto']}")
        ok, why = match[0].available()
        if not ok:
            raise BackendUnavailable(f"backend {want!r} for {op!r} is unavailable here: {why}")
        _cache[key] = (want, match[0].load())
        return _cache[key]
    for p in provs:
        if not p.serves(device):
            continue
        ok, why = p.available()
        if ok:
            _cache[key] = (p.name, p.load())
            return _cache[key]
        log.info("%s: skipping backend %s (%s)", op, p.name, why)
    raise BackendUnavailable(f"no backend for {op!r} is available" + (f" for {device} tensors" if device else ""))


def _device_type(a) -> str | None:
    """The device type ("cpu", "cuda") of an argument with a device: a numpy 2 array's
    .device is the string "cpu" itself (``.device.type`` raised an AttributeError for it)."""
    dev = getattr(a, "device", None)
    return dev if isinstance(dev, str) else getattr(dev, "type", None)


def call(op: str, *args, backend: str | None = None, **kwargs):
    """Run ``op`` with the provider chosen for the device of its first tensor argument."""
    device = next(filter(None, map(_device_type, args)), None)
    return resolve(op, backend, device)[1](*args, **kwargs)


def companion(op: str, provider: str) -> Callable | None:
    """``op``'s function from the named provider if it has one and it runs here, else None
    (e.g. the fused step of whichever provider the assignment resolved to)."""
    try:
        return resolve(op, provider)[1]   # cached after the first success
    except BackendUnavailable:
        return None


def report() -> dict[str, dict[str, str]]:
    """Availability of every provider of every op (for `spurfast env`)."""
    out: dict[str, dict[str, str]] = {}
    for op, provs in REGISTRY.items():
        out[op] = {}
        for p in provs:
            ok, why = p.available()
            out[op][p.name] = "available" if ok else f"unavailable: {why}"
    return out


def clear_cache() -> None:
    _cache.clear()
