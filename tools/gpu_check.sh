#!/usr/bin/env bash
# `make gpu-check`: everything that needs a GPU, in stages, inside a time budget, with one log
# per stage and a summary line per stage.
#
#   tools/gpu_check.sh [OUT_DIR]                  (default: $GPU_CHECK_OUT or gpu-check-out)
#
#   stages (GPU_CHECK_STAGES, default "build info test sanitize bench"):
#     build     pip install -e . (CUDA kernels for TORCH_CUDA_ARCH_LIST); with GPU_CHECK_PREBUILT=DIR
#               the extension built by an earlier run (DIR/_C*.so, see GPU_CHECK_KEEP_BUILD) is
#               used instead, without compiling
#     info      python -m aspp_fused.info
#     test      pytest -m gpu (CUDA kernels vs the CPU kernels and the twins, Triton on the GPU)
#     sanitize  tools/sanitize_cuda.sh (compute-sanitizer memcheck / racecheck / synccheck)
#     bench     python -m benchmarks $BENCH_ARGS -> OUT_DIR/results
#   GPU_CHECK_BUDGET_S  (default 540) seconds for the whole run: every stage is stopped at the
#                       deadline (timeout), so the summary and the archive are always written
#   GPU_CHECK_TAR=FILE  also pack OUT_DIR into FILE (.tar.gz), for machines that hand back only
#                       a few files
#   GPU_CHECK_KEEP_BUILD=DIR  copy the built extension (aspp_fused/_C*.so) to DIR
#
# Exit status: nonzero when any stage failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-${GPU_CHECK_OUT:-gpu-check-out}}
export PYTHON=${PYTHON:-python}
STAGES=${GPU_CHECK_STAGES:-build info test sanitize bench}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
export PYTHONUNBUFFERED=1 GPU_CHECK_PREBUILT=${GPU_CHECK_PREBUILT:-}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
deadline=$(( $(date +%s) + BUDGET ))
status=0

note() { echo "gpu-check: $*" | tee -a "$SUMMARY"; }

finish() {
    if [ -n "${GPU_CHECK_TAR:-}" ]; then
        tar czf "$GPU_CHECK_TAR" -C "$(dirname "$OUT")" "$(basename "$OUT")" && echo "gpu-check: packed $OUT -> $GPU_CHECK_TAR"
    fi
}
trap finish EXIT

# run_stage NAME COMMAND...: runs COMMAND (a program, or a function of this script: it runs in a
# child bash, so `timeout` can stop it) with the time left, less a reserve for the summary; its
# output goes to OUT/NAME.log and to the terminal.
run_stage() {
    local name=$1; shift
    local left=$(( deadline - $(date +%s) - 10 ))
    if [ "$left" -lt 20 ]; then
        note "$name: SKIPPED (budget spent)"
        status=1
        return 1
    fi
    local start rc
    start=$(date +%s)
    echo "gpu-check: stage $name (at most ${left}s) -> $OUT/$name.log"
    timeout --kill-after=20 "$left" bash -c "$(declare -f build_stage); $(printf '%q ' "$@")" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - start ))
    case $rc in
        0) note "$name: ok in ${took}s" ;;
        124|137) note "$name: TIMED OUT after ${took}s"; status=1 ;;
        *) note "$name: FAILED (exit $rc) in ${took}s"; status=1 ;;
    esac
    # One line of results per stage, from the log's tail.
    case $name in
        test|sanitize) grep -E "passed|failed|error|SUMMARY|rc=" "$OUT/$name.log" | tail -4 | sed 's/^/    /' | tee -a "$SUMMARY" ;;
    esac
    return $rc
}

build_stage() {
    if [ -n "${GPU_CHECK_PREBUILT:-}" ]; then
        ls "$GPU_CHECK_PREBUILT"/_C*.so >/dev/null 2>&1 || { echo "no _C*.so in GPU_CHECK_PREBUILT=$GPU_CHECK_PREBUILT"; return 2; }
        # The editable install is still needed (it maps aspp_fused.kernels to kernels/); built
        # without CUDA it compiles only the CPU kernels, and the prebuilt library then replaces it.
        ASPP_FUSED_SKIP_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} $PYTHON -m pip install --no-build-isolation --no-deps -e . || return $?
        cp "$GPU_CHECK_PREBUILT"/_C*.so aspp_fused/ && echo "using the prebuilt extension from $GPU_CHECK_PREBUILT"
    else
        MAX_JOBS=${MAX_JOBS:-$(nproc)} $PYTHON -m pip install --no-build-isolation --no-deps -e . || return $?
    fi
    $PYTHON - <<'EOF'
import sys
import torch
from aspp_fused import _extension
ok = torch.cuda.is_available() and _extension.cuda_kernels_built()
print("torch", torch.__version__, "cuda available:", torch.cuda.is_available(),
      "aspp_fused CUDA kernels built:", _extension.cuda_kernels_built())
sys.exit(0 if ok else 3)
EOF
}

for stage in $STAGES; do
    case $stage in
        build)
            if ! run_stage build build_stage; then
                note "build failed: the later stages need the extension; stopping"
                status=1
                break
            fi
            if [ -n "${GPU_CHECK_KEEP_BUILD:-}" ]; then
                mkdir -p "$GPU_CHECK_KEEP_BUILD" && cp aspp_fused/_C*.so "$GPU_CHECK_KEEP_BUILD"/ && \
                    note "build: extension copied to $GPU_CHECK_KEEP_BUILD"
            fi ;;
        info) run_stage info $PYTHON -m aspp_fused.info ;;
        test) run_stage test $PYTHON -m pytest -q -p no:cacheprovider -m gpu ${GPU_CHECK_PYTEST_ARGS:-} ;;
        sanitize) run_stage sanitize tools/sanitize_cuda.sh "$OUT/sanitizer" ;;
        bench) run_stage bench $PYTHON -m benchmarks --out "$OUT/results" ${BENCH_ARGS:-} ;;
        *) note "unknown stage '$stage' (expected build, info, test, sanitize, bench)"; status=1 ;;
    esac
done
note "done in $(( BUDGET - (deadline - $(date +%s)) ))s; logs and results in $OUT/"
exit $status
