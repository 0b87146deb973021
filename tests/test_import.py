"""`import spurfast` stays lean: no triton, cupy or DALI, and CUDA is not initialised."""
import subprocess
import sys

CODE = r"""
import sys, torch
import spurfast, spurfast.cli, spurfast.discover, spurfast.pipeline, spurfast.kernels, spurfast.backends
heavy = [m for m in ("triton", "cupy", "nvidia.dali") if m in sys.modules]
assert not heavy, f"heavy modules imported eagerly: {heavy}"
assert not torch.cuda.is_initialized(), "importing spurfast initialised CUDA"
print("ok")
"""


def _prints_ok(code: str) -> None:
    """Run ``code`` in a fresh interpreter (nothing imported yet); it must print "ok"."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_import_is_lean():
    _prints_ok(CODE)


def test_kernels_package_maps_to_kernels_dir():
    import spurfast.kernels.reference as ref

    assert ref.__file__.replace("\\", "/").endswith("kernels/reference.py")


LAZY = r"""
import sys
import spurfast
assert "spurfast.pipeline" not in sys.modules and "spurfast.evaluate" not in sys.modules, "API loaded eagerly"
from spurfast import run_discovery, DiscoverConfig
assert run_discovery.__module__ == "spurfast.pipeline" and DiscoverConfig.__module__ == "spurfast.discover"
print("ok")
"""


def test_public_api_loads_on_first_use():
    _prints_ok(LAZY)


def test_every_public_name_resolves():
    import pytest

    import spurfast

    for name in spurfast.__all__:
        assert getattr(spurfast, name) is not None, name
        assert name in dir(spurfast)
    import spurfast.discover
    assert spurfast.discover.__name__ == "spurfast.discover"   # a step's module is not shadowed
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        spurfast.nothing_here


def test_every_public_name_says_what_it_is():
    # eight exported names had no docstring, and help() on the config dataclasses showed only
    # their generated signature (the fields' meaning sat in source comments)
    import spurfast

    bare = [n for n in spurfast.__all__ if not (getattr(spurfast, n).__doc__ or "").strip()
            or getattr(spurfast, n).__doc__.startswith(n + "(")]   # a dataclass's generated one
    assert not bare, bare


SHADOW = r"""
import importlib, sys
import spurfast
from spurfast import run_discovery   # loads the pipeline, which imports spurfast.characterise
for name in spurfast.__all__[1:]:
    module = importlib.import_module("spurfast." + spurfast._API[name])
    assert getattr(spurfast, name) is getattr(module, name), f"spurfast.{name} is {getattr(spurfast, name)!r}"
# and no public name replaced a module: its attribute is the module importing it gives
for mod in [m for m in sys.modules if m.startswith("spurfast.") and m.count(".") == 1]:
    assert getattr(spurfast, mod.split(".")[1]) is sys.modules[mod], mod
import spurfast.characterise as c
assert c.__name__ == "spurfast.characterise"
print("ok")
"""


def test_a_public_name_is_never_a_module_of_the_same_name():
    # "characterise" named both the function spurfast.discover.characterise and the module
    # spurfast.characterise: after run_discovery, `from spurfast import characterise` gave the module
    _prints_ok(SHADOW)
