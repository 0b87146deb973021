#!/usr/bin/env bash
# One GPU check: every GPU test, then the GPU benchmarks, results under $OUT (or ./out/gpu_check).
# Budget: at most ~8 minutes on an H200.  Usage: bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SPURFAST_BENCH_CSV="$OUT/results.csv"
PY="${PYTHON:-python3}"
(command -v nvcc >/dev/null && make kernels CUDA_ARCHS=90) > "$OUT/kernels_build.log" 2>&1
# The GPU machine has torch/triton/cupy but maybe not this package's pure-Python deps.
if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; then
  # no setuptools there: lay the installed layout out by hand (kernels/ is spurfast.kernels)
  rm -rf /tmp/spurfast_site && mkdir -p /tmp/spurfast_site
  cp -r spurfast /tmp/spurfast_site/spurfast && cp -r kernels /tmp/spurfast_site/spurfast/kernels
  export PYTHONPATH="/tmp/spurfast_site:$PWD:${PYTHONPATH:-}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
$PY - <<'PY' >> "$OUT/gpu.txt" 2>&1
import torch, importlib
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
for m in ("triton", "cupy", "nvidia.dali"):
    try: print(m, importlib.import_module(m).__version__)
    except Exception as e: print(m, "missing:", e)
PY
timeout 150 $PY -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -20
timeout 180 $PY -m bench encoder --quick --device cuda 2>&1 | tail -40 > "$OUT/bench_encoder.log"
timeout 90 $PY -m bench kmeans --quick --device cuda 2>&1 | tail -40 > "$OUT/bench_kmeans.log"
timeout 45 $PY -m bench e2e --quick --device cuda 2>&1 | tail -20 > "$OUT/bench_e2e.log"
echo "results in $OUT"; ls -la "$OUT"
