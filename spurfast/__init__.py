"""spurfast: find the spurious features ("shortcuts") an image classifier has learned.

Importing spurfast imports torch and numpy only: no triton, cupy or DALI, and no CUDA
initialisation.  The public API mirrors the CLI (`spurfast --help`).
"""
__version__ = "0.1.0"
