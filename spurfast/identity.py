"""Identity of a pool and the models a store or a run was made with: `fingerprint`.

A store (`spurfast.store`) and a run (`spurfast.pipeline`) are recognised by it, so a rerun
with the same pool and models resumes, and one with another model starts afresh.  It hashes
the models' weights and what else changes what they compute (their class, TorchScript code,
buffers outside the state_dict, plain attributes, spurfast's model configurations); the older
identities (`weights_fingerprint`, ``attributes=False``) are kept to recognise stores and runs
made by earlier versions.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re

import numpy as np
import torch

from .data.sources import ImageSource

# the fingerprint scheme, written beside each fingerprint (stores' manifests, run.json): what
# records it is compared under this scheme alone.  Earlier schemes (`store.legacy_identities`)
# are tried only for what records none: a store this scheme made for one model matched another
# model's fingerprint under an earlier scheme (which leaves out the attributes that tell them
# apart) and was taken over as that model's, predictions and all
IDENTITY_SCHEME = 1


def weights_fingerprint(source: ImageSource, *models: torch.nn.Module) -> str:
    """The identity of a pool and models by the models' state_dicts alone: `fingerprint`
    before the twenty-sixth session (kept to recognise stores and runs made then)."""
    h = hashlib.sha256()
    # surrogateescape: a name or id read from a file name that is not UTF-8 (any source's)
    # hashes as its bytes; a UTF-8 one hashes as before
    h.update(f"{source.name}:{len(source)}:{source.image_shape}".encode("utf-8", "surrogateescape"))
    for i in sorted({0, len(source) // 2, len(source) - 1}):
        if 0 <= i < len(source):
            h.update(source.item_id(i).encode("utf-8", "surrogateescape"))
    for m in models:
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode())
            h.update(_state_bytes(v, k))
    return h.hexdigest()[:16]


def _tensor_bytes(v: torch.Tensor) -> bytes:
    t = v.detach().cpu().contiguous()
    if t.is_quantized:   # its integers and how they map to values (numpy and a uint8 view refuse it)
        if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            scale = f"{t.q_scale()!r}:{t.q_zero_point()}".encode()
        else:
            scale = (f"{t.q_per_channel_axis()}:".encode() + _tensor_bytes(t.q_per_channel_scales())
                     + _tensor_bytes(t.q_per_channel_zero_points()))
        return f"{t.dtype}:".encode() + scale + _tensor_bytes(t.int_repr())
    try:
        return t.numpy().tobytes()
    except TypeError:  # a dtype numpy lacks (bfloat16, float8): the same bytes, as uint8
        return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _plain_bytes(v, extras: bool = True) -> bytes | None:
    """Bytes of a value that can change what a model computes (a tensor, a number, a string,
    a dtype, a numpy value, a partial function by its function's name and arguments, or a
    tuple, list or str-keyed dict of them); None for anything else (a submodule, a function:
    their repr holds a memory address, which differs from run to run).  ``extras=False``:
    numpy values and partials skipped, as before the fifty-third session (kept to recognise
    the stores and runs made then)."""
    if isinstance(v, torch.Tensor):
        return f"{v.dtype}:{tuple(v.shape)}:".encode() + _tensor_bytes(v)
    if v is None or isinstance(v, (bool, int, float, complex, str, torch.dtype)):
        return repr(v).encode("utf-8", "surrogateescape")
    if isinstance(v, (tuple, list)):
        parts = [_plain_bytes(x, extras) for x in v]
        return None if any(p is None for p in parts) else b"(" + b",".join(parts) + b")"
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        parts = [_plain_bytes(x, extras) for _, x in sorted(v.items())]
        return None if any(p is None for p in parts) else b"{" + b",".join(
            k.encode("utf-8", "surrogateescape") + b":" + p for k, p in zip(sorted(v), parts)) + b"}"
    # numpy values and partial functions were skipped as unknown: a gain of np.float32(3) for
    # np.float32(1), or leaky_relu's slope in a partial, resumed the other model's run
    if not extras:
        return None
    if isinstance(v, (np.generic, np.ndarray)) and v.dtype != object:
        a = np.asarray(v)   # its shape: ascontiguousarray makes a scalar one of shape (1,)
        return f"numpy {a.dtype.str}:{a.shape}:".encode() + np.ascontiguousarray(a).tobytes()
    if isinstance(v, functools.partial):
        fn = f"{getattr(v.func, '__module__', '')}.{getattr(v.func, '__qualname__', '')}"
        rest = _plain_bytes((v.args, dict(v.keywords)))
        return None if rest is None else f"partial {fn}:".encode("utf-8", "surrogateescape") + rest
    return None


def _state_bytes(v, key: str) -> bytes:
    """A state_dict value's bytes: a tensor's as before; a quantized module's packed parameters
    (a dtype, a tuple of tensors) as `_plain_bytes` (they raised a bare AttributeError)."""
    if isinstance(v, torch.Tensor):
        return _tensor_bytes(v)
    b = _plain_bytes(v)
    if b is None:
        raise ValueError(f"cannot fingerprint the model's state_dict entry {key!r}: a {type(v).__name__}, "
                         f"expected tensors, numbers, dtypes or tuples of them")
    return b


def _attribute_parts(name: str, sub: torch.nn.Module, code: str | None, extras: bool = True,
                     mode: bool = False) -> list[bytes]:
    """What a submodule computes with outside its parameters and buffers: its plain attributes
    (an input mean kept as a tensor or a float), or in TorchScript the attributes its code reads
    and the constants a trace baked into it (``CONSTANTS.c0``).  Never its train/eval mode: the
    passes compute in eval mode whatever the caller's (``mode=True``: a TorchScript module's
    counted, as before the fifty-fourth session, when a scripted model given in train mode was
    refused the store it had made in eval mode)."""
    if isinstance(sub, torch.jit.ScriptModule):
        own = {n for n, _ in sub.named_parameters(recurse=False)} | {n for n, _ in sub.named_buffers(recurse=False)}
        own |= set() if mode else {"training"}
        values = [(n, sub._c.getattr(n)) for n in sorted(set(re.findall(r"\bself\.(\w+)", code or "")) - own)
                  if sub._c.hasattr(n)]
        try:
            consts = sub.code_with_constants[1].const_mapping
        except Exception:   # no forward (as for .code)
            consts = {}
        values += [(f"CONSTANTS.{k}", v) for k, v in sorted(consts.items())]
    else:   # parameters, buffers and submodules live under underscore names
        values = [(k, v) for k, v in sorted(vars(sub).items()) if not k.startswith("_") and k != "training"]
    out = []
    for k, v in values:
        b = _plain_bytes(v, extras)
        if b is not None:
            out.append(f"attribute {name}.{k}:".encode("utf-8", "surrogateescape") + b)
    return out


def model_identity(m: torch.nn.Module, attributes: bool = True, extras: bool = True, mode: bool = False) -> bytes:
    """What a model computes with besides its state_dict: its class, the code of its
    TorchScript modules, its buffers kept out of the state_dict, its attributes
    (`_attribute_parts`) and a spurfast model's configuration (the VAE's input normalisation
    and activation, a classifier's architecture record).  A model re-exported with, say, the
    input standardisation baked into its forward has the same weights: by the weights alone it
    resumed the old model's run and reported its findings.  ``attributes=False``: the identity
    before the twenty-eighth session, which missed an input shift kept as a plain attribute
    or traced into a constant (kept to recognise stores and runs made then); ``extras=False``:
    the identity before numpy and partial attributes counted (`_plain_bytes`); ``mode``: a
    TorchScript module's train/eval mode counted (`_attribute_parts`)."""
    parts = [f"{type(m).__module__}.{type(m).__qualname__}".encode()]
    for name, sub in m.named_modules():
        try:   # a scripted module without a forward has no code to show (and may raise for it)
            code = sub.code if isinstance(sub, torch.jit.ScriptModule) else None
        except Exception:
            code = None
        if isinstance(code, str):
            parts.append(f"code {name}:{code}".encode())
        if attributes:
            parts += _attribute_parts(name, sub, code if isinstance(code, str) else None, extras, mode)
    persistent = set(m.state_dict())
    for name, buf in m.named_buffers():
        if name not in persistent:
            parts += [f"buffer {name}:{buf.dtype}:{tuple(buf.shape)}".encode(), _tensor_bytes(buf)]
    config = getattr(m, "config", None)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        parts.append(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode())
    arch = getattr(m, "arch", None)
    if isinstance(arch, dict):
        parts.append(json.dumps(arch, sort_keys=True, default=str).encode())
    return b"\0".join(parts)


def fingerprint(source: ImageSource, *models: torch.nn.Module, attributes: bool = True, extras: bool = True,
                mode: bool = False) -> str:
    """The identity of a pool (its name, size, shape and a few item ids) and of the models
    (weights, and `model_identity`): what a store and a run are recognised by."""
    h = hashlib.sha256(weights_fingerprint(source, *models).encode())
    for m in models:
        h.update(hashlib.sha256(model_identity(m, attributes, extras, mode)).digest())
    return h.hexdigest()[:16]
