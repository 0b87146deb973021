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


def test_import_is_lean():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_kernels_package_maps_to_kernels_dir():
    import spurfast.kernels.reference as ref

    assert ref.__file__.replace("\\", "/").endswith("kernels/reference.py")
