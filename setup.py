"""spurfast: find the spurious features an image classifier has learned.

Python-only install: nothing is compiled here and no hardware is probed.  The CUDA
k-means sources are built ahead of time by CMake (`make kernels`) when wanted; the CuPy
launcher otherwise compiles them with NVRTC at first use.
"""
from setuptools import setup

setup(
    name="spurfast",
    version="0.1.0",
    description="Find spurious features (shortcuts) learned by image classifiers",
    python_requires=">=3.10",
    packages=["spurfast", "spurfast.data", "spurfast.models", "spurfast.kernels"],
    package_dir={"spurfast": "spurfast", "spurfast.kernels": "kernels"},
    package_data={"spurfast.kernels": ["cuda/*.cu", "cuda/*.cuh", "cpu/*.cpp", "prebuilt/*.fatbin", "prebuilt/*.fatbin.sources"]},
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "torchvision",
        "numpy",
        "scipy",
        "scikit-learn",
        "matplotlib",
        "tqdm",
        "pillow",
    ],
    extras_require={
        "gpu": ["cupy-cuda13x", "nvidia-dali-cuda130"],
        "dev": ["pytest", "pytest-timeout", "faiss-cpu"],
    },
    entry_points={"console_scripts": ["spurfast=spurfast.cli:main"]},
)
