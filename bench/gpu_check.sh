#!/usr/bin/env bash
# The one command for a machine with an NVIDIA GPU (no network needed):
#
#   bench/gpu_check.sh RESULTS_DIR
#
# 1. builds pyengine._C with its CUDA kernel against the torch already installed
#    (pip install --no-build-isolation --no-deps -e .; plain CMake if scikit-build-core is
#    missing),
# 2. runs the CUDA tests (tests/test_cuda_fused_update.py) on the GPU,
# 3. runs the fused-update benchmark on the GPU (bench/bench_fused_update.py --device cuda),
# and writes the logs and the results table (fused_update_cuda_<GPU>_<date>.md) to RESULTS_DIR.
# Later GPU work (Triton, CUDA graphs) adds its steps here.
set -euo pipefail

OUT="${1:?usage: bench/gpu_check.sh RESULTS_DIR}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 4)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"

echo "== device" | tee "$OUT/gpu_check.log"
"$PY" - <<'PY' 2>&1 | tee -a "$OUT/gpu_check.log"
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device (a CPU build of torch?)"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.get_device_name()}")
PY
(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true) \
    | tee -a "$OUT/gpu_check.log"

echo "== build" | tee -a "$OUT/gpu_check.log"
if ! CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" "$PY" -m pip install --no-build-isolation --no-deps \
        -e . >"$OUT/build.log" 2>&1; then
    echo "pip build failed (see build.log); building with plain CMake" | tee -a "$OUT/gpu_check.log"
    PYBIND11_DIR="$("$PY" -m pybind11 --cmakedir)"
    cmake -S . -B build/gpu-check -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
        -Dpybind11_DIR="$PYBIND11_DIR" >>"$OUT/build.log" 2>&1
    cmake --build build/gpu-check -j "$JOBS" >>"$OUT/build.log" 2>&1
    cp build/gpu-check/_C*.so pyengine/
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "from pyengine import _C; assert _C.has_cuda(), 'pyengine._C was built without the CUDA kernel (is nvcc on PATH?)'; print('pyengine._C with CUDA:', _C.__file__)" \
    2>&1 | tee -a "$OUT/gpu_check.log"

echo "== CUDA tests" | tee -a "$OUT/gpu_check.log"
status=0
"$PY" -m pytest -q -rs tests/test_cuda_fused_update.py 2>&1 | tee "$OUT/test_cuda.log" || status=1

echo "== benchmark" | tee -a "$OUT/gpu_check.log"
extra=()
"$PY" -c "import diffusers" 2>/dev/null || extra+=(--skip-diffusers)
"$PY" bench/bench_fused_update.py --device cuda --out "$OUT" ${extra[@]+"${extra[@]}"} 2>&1 \
    | tee "$OUT/bench_cuda.log" || status=1

echo "== done: results in $OUT (status $status)" | tee -a "$OUT/gpu_check.log"
exit "$status"
