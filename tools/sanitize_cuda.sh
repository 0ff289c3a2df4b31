#!/usr/bin/env bash
# The CUDA kernels' tests (tests/test_op_dtypes.py, kernel set cuda, small shapes only) under
# compute-sanitizer:
#   memcheck   out-of-bounds / misaligned global and shared accesses, launch errors
#   racecheck  shared-memory hazards (missing __syncthreads in the cp.async pipeline, ...)
#   synccheck  barriers not reached by every thread of a block
# Usage: tools/sanitize_cuda.sh [OUT_DIR]      (default $GPU_CHECK_OUT/sanitizer or gpu-check-out/sanitizer)
#   SANITIZER_TOOLS="memcheck racecheck synccheck initcheck"  tools to run (initcheck is opt-in)
#   SANITIZE_SELECT="2x16x9x11"  a pytest -k selection for every tool (default: all of the cuda set's
#                                cases, racecheck a subset of them)
#   SANITIZER_TIMEOUT_S=N        stop each tool after N seconds (default: no limit)
#   COMPUTE_SANITIZER=/path/to/compute-sanitizer, PYTHON=python (default: python, else python3)
# One log per tool in OUT_DIR; exits nonzero when a tool reports an error or a test fails.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-${GPU_CHECK_OUT:-gpu-check-out}/sanitizer}
if [ -z "${PYTHON:-}" ]; then
    if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
TOOLS=${SANITIZER_TOOLS:-memcheck racecheck synccheck}
SAN=${COMPUTE_SANITIZER:-}
if [ -z "$SAN" ]; then
    for cand in compute-sanitizer "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
                /usr/local/cuda/bin/compute-sanitizer; do
        if command -v "$cand" >/dev/null 2>&1; then SAN=$(command -v "$cand"); break; fi
    done
fi
if [ -z "$SAN" ]; then
    echo "sanitize_cuda: compute-sanitizer not found (set COMPUTE_SANITIZER or CUDA_HOME)" >&2
    exit 2
fi
if ! $PYTHON -c "import torch, sys; from aspp_fused import _extension; \
sys.exit(0 if torch.cuda.is_available() and _extension.cuda_kernels_built() else 1)"; then
    echo "sanitize_cuda: needs a GPU and aspp_fused built with its CUDA kernels" >&2
    exit 2
fi
mkdir -p "$OUT"

# Small shapes only; one cudaMalloc per tensor, so an access past a tensor's end is caught
# (PyTorch's caching allocator would hide it inside a larger segment).
export ASPP_CUDA_TEST_SMALL=1
export PYTORCH_NO_CUDA_MEMORY_CACHING=1

status=0
for tool in $TOOLS; do
    case $tool in
        # racecheck is the slowest: one dtype per math path, both ops, forward and backward.
        racecheck) select="(test_atrous_conv or test_separable_conv) and (bfloat16 or float32 or float64) and 2x16x9x11 or more_branches or awkward" ;;
        *) select="" ;;
    esac
    [ -n "${SANITIZE_SELECT:-}" ] && select=$SANITIZE_SELECT
    log="$OUT/$tool.log"
    echo "sanitize_cuda: $tool -> $log"
    start=$(date +%s)
    ${SANITIZER_TIMEOUT_S:+timeout --kill-after=5 "$SANITIZER_TIMEOUT_S"} "$SAN" --tool "$tool" --error-exitcode 97 --print-limit 100 --target-processes all \
        $PYTHON -m pytest -q -p no:cacheprovider tests/test_op_dtypes.py \
        -k "not cpu and not cuda_emu and not triton${select:+ and ($select)}" >"$log" 2>&1
    rc=$?
    summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1)
    echo "sanitize_cuda: $tool rc=$rc in $(( $(date +%s) - start ))s ${summary}"
    if [ $rc -ne 0 ]; then
        status=1
        grep -E "^=========" "$log" | head -40
        tail -5 "$log"
    fi
done
exit $status
