"""CMakeLists.txt builds the k-means fatbins ahead of time (skipped without nvcc/cmake).

One architecture (sm_80) into a temporary build and output directory, so the test does
not touch kernels/prebuilt and stays around 15-60 s on two cores.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from spurfast.kernels import kmeans_cupy as kc

ROOT = Path(__file__).resolve().parents[1]
FATBIN_MAGIC = 0xBA55ED50

needs_tools = pytest.mark.skipif(not (shutil.which("nvcc") and shutil.which("cmake")),
                                 reason="needs nvcc and cmake")


def _run(cmd, **kw):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kw)


@needs_tools
@pytest.mark.timeout(600)
def test_cmake_builds_fatbins_for_arch_80(tmp_path, monkeypatch):
    build, out = tmp_path / "build", tmp_path / "fatbins"
    cfg = _run(["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_CUDA_ARCHITECTURES=80",
                f"-DSPURFAST_FATBIN_DIR={out}"])
    assert cfg.returncode == 0, f"configure failed:\n{cfg.stdout}\n{cfg.stderr}"
    bld = _run(["cmake", "--build", str(build), "-j", "2"])
    assert bld.returncode == 0, f"build failed:\n{bld.stdout}\n{bld.stderr}"
    for name in kc.SOURCES:
        f = out / f"{name}_sm80.fatbin"
        assert f.is_file(), f"missing {f}; built: {sorted(p.name for p in out.glob('*'))}"
        head = f.read_bytes()[:8]
        assert struct.unpack("<I", head[:4])[0] == FATBIN_MAGIC, f"{f} is not a fatbin (header {head.hex()})"
        assert b"sm_80" in f.read_bytes(), f"{f} holds no sm_80 code"
    assert not list(out.glob("*_sm90.fatbin")), "built an architecture that was not asked for"
    # each fatbin records the sources it came from; the launcher loads only a current one
    for name in kc.SOURCES:
        assert kc.fatbin_is_current(out / f"{name}_sm80.fatbin", name), \
            (out / f"{name}_sm80.fatbin.sources").read_text()
    # the launcher finds what CMake wrote (exact arch, and sm_86 runs the sm_80 cubin)
    monkeypatch.setenv("SPURFAST_KMEANS_FATBIN_DIR", str(out))
    assert kc.find_fatbin("kmeans_assign", 80) == out / "kmeans_assign_sm80.fatbin"
    assert kc.find_fatbin("kmeans_assign", 86) == out / "kmeans_assign_sm80.fatbin"


@pytest.mark.skipif(not shutil.which("cmake"), reason="needs cmake")
@pytest.mark.parametrize("archs", ["native", "80;all"])
def test_cmake_refuses_implicit_architectures(tmp_path, archs):
    cfg = _run(["cmake", "-S", str(ROOT), "-B", str(tmp_path / "b"), f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
                f"-DSPURFAST_FATBIN_DIR={tmp_path / 'o'}", "-DCMAKE_CUDA_COMPILER=/bin/true"])
    assert cfg.returncode != 0
    assert "is not an explicit architecture" in cfg.stderr, cfg.stderr


def test_a_fatbin_older_than_its_sources_is_not_current(tmp_path, monkeypatch):
    """A fatbin built before kmeans_assign.cu gained kernels would be loaded and then fail
    on the first call of a missing entry; its .sources file tells the launcher to compile."""
    cuda = tmp_path / "cuda"
    shutil.copytree(kc.CUDA_DIR, cuda)
    monkeypatch.setattr(kc, "CUDA_DIR", cuda)
    fatbin = tmp_path / "kmeans_assign_sm90.fatbin"
    fatbin.write_bytes(b"")
    assert not kc.fatbin_is_current(fatbin, "kmeans_assign")          # no .sources: built by hand
    Path(f"{fatbin}.sources").write_text(kc.source_hashes("kmeans_assign"))
    assert kc.fatbin_is_current(fatbin, "kmeans_assign")
    (cuda / "kmeans_common.cuh").write_text((cuda / "kmeans_common.cuh").read_text() + "\n// edit\n")
    assert not kc.fatbin_is_current(fatbin, "kmeans_assign")          # a header changed


@pytest.mark.skipif(not (shutil.which("cmake") and shutil.which("make")), reason="needs cmake and make")
def test_nvcc_flags_given_as_one_string_reach_nvcc_one_by_one(tmp_path):
    # -DSPURFAST_NVCC_FLAGS="-O2 -lineinfo" reached nvcc as the one argument "-O2 -lineinfo"
    # ("nvcc fatal: '2 -lineinfo': expected a number"); a stand-in nvcc records its arguments
    log = tmp_path / "args.txt"
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\nprev=\nfor a in \"$@\"; do printf '%s\\n' \"$a\" >> \"$LOG\"; "
                    "[ \"$prev\" = -o ] && out=$a; prev=$a; done\necho -- >> \"$LOG\"\n: > \"$out\"\n")
    nvcc.chmod(0o755)
    calls = {}
    for name, flags in (("given", ['-DSPURFAST_NVCC_FLAGS=-O2 -Xcompiler "-g -O1"']), ("default", [])):
        build = tmp_path / name
        cfg = _run(["cmake", "-S", str(ROOT), "-B", str(build), "-G", "Unix Makefiles", "-DCMAKE_CUDA_ARCHITECTURES=80",
                    f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DSPURFAST_FATBIN_DIR={build / 'o'}", *flags])
        assert cfg.returncode == 0, f"configure failed:\n{cfg.stdout}\n{cfg.stderr}"
        log.unlink(missing_ok=True)
        bld = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True,
                             env={**os.environ, "LOG": str(log)})
        assert bld.returncode == 0, f"build failed:\n{bld.stdout}\n{bld.stderr}"
        calls[name] = [c.strip("\n").split("\n") for c in log.read_text().split("--\n") if c.strip()]
        assert len(calls[name]) == len(kc.SOURCES), calls[name]
    for args in calls["given"]:
        assert args[:4] == ["-fatbin", "-O2", "-Xcompiler", "-g -O1"], args
    for args in calls["default"]:   # the defaults as they were
        assert args[:7] == ["-fatbin", "-std=c++17", "-O3", "-lineinfo", "-Xptxas=-warn-spills", "--Werror",
                            "all-warnings"], args
