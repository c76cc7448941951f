#!/usr/bin/env bash
# The one command for a machine with an NVIDIA GPU (no network needed):
#
#   bench/gpu_check.sh RESULTS_DIR             # logs, tables and a summary go there
#   bench/gpu_check.sh --dry-run RESULTS_DIR   # list the steps and write the summary; run nothing
#
# Steps, each under its own timeout inside a total budget (GPU_CHECK_BUDGET seconds, default
# 530, under a 10-minute limit on the whole call). A failing step is recorded and the next one
# runs; the exit status is 1 when any step failed or timed out (2: no GPU at all).
#
# 1. wheels: the wheels in .whl/ (carried to the GPU machine, e.g. diffusers, which its image
#    lacks) installed into /tmp/site, put first on PYTHONPATH;
# 2. build: pyengine._C with its CUDA kernel against the torch already installed, offline
#    (pip install --no-build-isolation --no-deps --no-index -e .; plain CMake if that fails);
# 3. tests: the GPU tests, one pytest run per file with -rs (skips listed with their reasons):
#    CUDA kernel, Triton, native extension, runtime (graph capture and replay), every backend
#    end to end, the diffusers drop-in; files not in this checkout are left out;
# 4. compute-sanitizer memcheck over a subset of the CUDA kernel tests (torch's caching
#    allocator off, so an out-of-bounds access is not hidden inside a cached block);
# 5. benchmarks: bench_fused_update.py and bench_sampling.py on the GPU;
# 6. summary: gpu_check_<gpu>_<date>.md with every step's status and time, the test summary
#    lines, the skip reasons and the benchmark tables; printed at the end too.
#
# RESULTS_DIR gets six files (few, for runners that copy back only a handful):
# gpu_check.log (device, steps, benchmark output), build.log, tests.log (pytest and sanitizer
# output, file by file), fused_update_cuda_<gpu>_<date>.md, sampling_<gpu>_<date>.md and the
# summary.
set -uo pipefail        # no -e: a failing step is recorded, the rest still run

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY=1
    shift
fi
OUT="${1:?usage: bench/gpu_check.sh [--dry-run] RESULTS_DIR}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 4)}"
BUDGET="${GPU_CHECK_BUDGET:-530}"
START=$SECONDS
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT" || exit 2
export PYTHONUNBUFFERED=1       # a step killed by its timeout still leaves what it printed

LOG="$OUT/gpu_check.log"
BUILD_LOG="$OUT/build.log"
TEST_LOG="$OUT/tests.log"
: >"$LOG"
: >"$TEST_LOG"
status=0
STEP_ROWS=()        # "| step | status | seconds |" rows of the summary
TEST_ROWS=()        # "| file | status | pytest's last line |"
SKIP_LINES=()       # pytest -rs lines

# The GPU tests; a file this checkout does not have (yet) is left out.
TEST_FILES=(
    tests/test_fused_update.py
    tests/test_cuda_fused_update.py
    tests/test_triton_cuda.py
    tests/test_triton_fused_update.py
    tests/test_runtime*.py
    tests/test_backends_e2e.py
    tests/test_diffusers_dropin.py
)
SANITIZER_SUBSET="cuda and (shapes or aliases or normals or unaligned)"

log() {
    echo "$*" | tee -a "$LOG"
}

record() {      # record NAME STATUS SECONDS
    STEP_ROWS+=("| $1 | $2 | $3 |")
    log "   -> $2 (${3}s)"
}

# step_limit MAX RESERVE: the timeout of a step: at most MAX seconds, leaving RESERVE seconds
# of the budget to the steps after it; 0 when less than 10 seconds would be left.
step_limit() {
    local left=$((BUDGET - (SECONDS - START) - $2))
    ((left > $1)) && left=$1
    ((left < 10)) && left=0
    echo "$left"
}

# run_step NAME MAX RESERVE LOGFILE CMD...: CMD under its timeout, output appended to LOGFILE;
# returns CMD's exit status (124: timed out, 125: not run).
run_step() {
    local name=$1 max=$2 reserve=$3 logfile=$4
    shift 4
    local limit t0 rc
    limit=$(step_limit "$max" "$reserve")
    log "== $name (limit ${limit}s): $*"
    if ((DRY)); then
        record "$name" "dry run" 0
        return 0
    fi
    if ((limit == 0)); then
        record "$name" "SKIPPED (time budget spent)" 0
        status=1
        return 125
    fi
    echo "== $name: $*" >>"$logfile"
    t0=$SECONDS
    timeout --kill-after=15 "$limit" "$@" >>"$logfile" 2>&1
    rc=$?
    case $rc in
        0) record "$name" ok $((SECONDS - t0)) ;;
        124 | 137) record "$name" "TIMEOUT (${limit}s)" $((SECONDS - t0)); status=1 ;;
        *) record "$name" "FAILED (exit $rc)" $((SECONDS - t0)); status=1 ;;
    esac
    return "$rc"
}

slug() {
    tr -c 'A-Za-z0-9\n' '-' | sed -e 's/--*/-/g' -e 's/^-//' -e 's/-$//'
}

# -- 0. the device -------------------------------------------------------------------------
log "== device"
if ((DRY)); then
    GPU="dry-run"
else
    if ! timeout 120 "$PY" - >>"$LOG" 2>&1 <<'PY'
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device (a CPU build of torch?)"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.get_device_name()}")
PY
    then
        tail -n 3 "$LOG"
        log "no usable GPU: nothing to check"
        exit 2
    fi
    tail -n 1 "$LOG"
    (timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
        --format=csv 2>&1 || true) | tee -a "$LOG"
    GPU="$(timeout 60 "$PY" -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null \
        | slug)"
    GPU="${GPU:-gpu}"
fi

# -- 1. carried wheels ---------------------------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
    if run_step "wheels (.whl/)" 120 400 "$LOG" "$PY" -m pip install -q --no-index --no-deps \
        --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
else
    log "== wheels: no .whl/ folder, nothing to install"
fi

# -- 2. build ------------------------------------------------------------------------------
: >"$BUILD_LOG"
export CMAKE_BUILD_PARALLEL_LEVEL="$JOBS"
before=$status
if ! run_step "build (pip -e)" 300 250 "$BUILD_LOG" \
        "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .; then
    # the CMake build below decides the outcome
    status=$before
    log "   pip build failed (see build.log); building with plain CMake"
    PYBIND11_DIR="$("$PY" -m pybind11 --cmakedir 2>/dev/null || true)"
    if run_step "build (cmake configure)" 120 250 "$BUILD_LOG" cmake -S . -B build/gpu-check \
            -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
            -Dpybind11_DIR="$PYBIND11_DIR" &&
        run_step "build (cmake build)" 300 250 "$BUILD_LOG" \
            cmake --build build/gpu-check -j "$JOBS"; then
        if ((!DRY)); then
            cp build/gpu-check/_C*.so pyengine/
            export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
        fi
    fi
fi
if ((!DRY)) && ! timeout 60 "$PY" - 2>&1 <<'PY' | tee -a "$LOG"; then
from pyengine import _C
assert _C.has_cuda(), "pyengine._C was built without the CUDA kernel (is nvcc on PATH?)"
print("pyengine._C with CUDA:", _C.__file__)
PY
    log "   pyengine._C has no CUDA kernel: the cuda backend tests will fail"
    status=1
fi

# -- 3. tests ------------------------------------------------------------------------------
for f in "${TEST_FILES[@]}"; do
    [[ -f "$f" ]] || { log "== $f: not in this checkout, left out"; continue; }
    tmp="$(mktemp)"
    run_step "pytest $f" 150 230 "$tmp" "$PY" -m pytest -q -rs -p no:cacheprovider "$f"
    rc=$?
    cat "$tmp" >>"$TEST_LOG"
    last="$(grep -v '^\s*$' "$tmp" | tail -n 1 | tr '|' '/')"
    case $rc in
        0) st=ok ;;
        5) st="no tests collected" ;;
        124 | 137) st=TIMEOUT ;;
        125) st="not run (time budget)" ;;
        *) st="FAILED (exit $rc)" ;;
    esac
    ((DRY)) && st="dry run"
    TEST_ROWS+=("| $f | $st | ${last:-} |")
    while IFS= read -r line; do
        SKIP_LINES+=("$f: $line")
    done < <(grep -E '^SKIPPED' "$tmp" || true)
    rm -f "$tmp"
done

# -- 4. compute-sanitizer ------------------------------------------------------------------
SANITIZER="$(command -v compute-sanitizer || true)"
if [[ -z "$SANITIZER" && -x /usr/local/cuda/bin/compute-sanitizer ]]; then
    SANITIZER=/usr/local/cuda/bin/compute-sanitizer
fi
if [[ -n "$SANITIZER" ]]; then
    run_step "compute-sanitizer memcheck" 120 170 "$TEST_LOG" \
        env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 1 \
        "$PY" -m pytest -q -p no:cacheprovider tests/test_fused_update.py \
        tests/test_cuda_fused_update.py -k "$SANITIZER_SUBSET"
else
    log "== compute-sanitizer: absent (not on PATH, not in /usr/local/cuda/bin); memcheck not run"
    STEP_ROWS+=("| compute-sanitizer memcheck | absent | 0 |")
fi

# -- 5. benchmarks -------------------------------------------------------------------------
extra=()
if ((!DRY)) && ! "$PY" -c "import diffusers" 2>/dev/null; then
    extra+=(--skip-diffusers)
    log "== diffusers is not installed: benchmarks run without it (carry its wheels in .whl/)"
fi
run_step "bench_fused_update.py" 120 150 "$LOG" "$PY" bench/bench_fused_update.py --device cuda \
    --min-seconds 0.1 --out "$OUT" ${extra[@]+"${extra[@]}"}
run_step "bench_sampling.py" 300 5 "$LOG" \
    "$PY" bench/bench_sampling.py --device cuda --out "$OUT" ${extra[@]+"${extra[@]}"}

# -- 6. summary ----------------------------------------------------------------------------
DATE="$(date +%F)"
SUMMARY="$OUT/gpu_check_${GPU}_${DATE}.md"
{
    echo "# GPU check: ${GPU}, ${DATE}"
    echo
    echo "- command: \`bench/gpu_check.sh $*\`$( ((DRY)) && echo ' (dry run: nothing was run)')"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- device: $(grep -m1 '^torch ' "$LOG" 2>/dev/null || echo n/a)"
    overall=ok
    ((status)) && overall=FAILED
    echo "- time: $((SECONDS - START)) s of a ${BUDGET} s budget; overall status: $overall"
    echo
    echo "## Steps"
    echo
    echo "| step | status | seconds |"
    echo "|---|---|---|"
    printf '%s\n' ${STEP_ROWS[@]+"${STEP_ROWS[@]}"}
    echo
    echo "## Tests"
    echo
    echo "| file | status | pytest's last line |"
    echo "|---|---|---|"
    printf '%s\n' ${TEST_ROWS[@]+"${TEST_ROWS[@]}"}
    echo
    echo "Skipped (pytest -rs):"
    echo
    if ((${#SKIP_LINES[@]})); then
        printf -- '- %s\n' "${SKIP_LINES[@]}"
    else
        echo "- none"
    fi
    for table in "$OUT"/fused_update_cuda_*.md "$OUT"/sampling_*.md; do
        [[ -f "$table" ]] || continue
        echo
        sed -e 's/^#/##/' "$table"
    done
} >"$SUMMARY"
log "== summary: $SUMMARY"
cat "$SUMMARY"
exit "$status"
