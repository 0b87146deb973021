"""spurfast.kernels: custom kernels and their pure-PyTorch references.

`reference` is imported eagerly (torch only).  The Triton and CuPy modules are imported
lazily through `spurfast.backends`, so importing this package never pulls in triton or
cupy and never initialises CUDA.
"""
from . import reference  # noqa: F401
