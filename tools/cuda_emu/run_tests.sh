#!/usr/bin/env bash
# Builds the CUDA kernels for the host SIMT emulator and runs tests/test_op_dtypes.py, the fuzz and the
# op cases (tests/test_op_cases.py, backend cuda_emu) against them
# (no GPU needed; ~6 minutes per schedule on 2 cores, ASan ~10x slower).
# Usage: tools/cuda_emu/run_tests.sh [--asan] [--all-orders] [pytest args...]
#   (a -k of the pytest args replaces the script's own selection: write "-k 'cuda_emu and ...'")
#   --asan        AddressSanitizer build: every global / dynamic-shared access of the kernels is
#                 bounds-checked (libasan and libstdc++ are preloaded into python for it).
#   --all-orders  run the tests under each ASPP_CUDA_EMU_ORDER: forward, reverse, shuffle:1,
#                 warps, warps-reverse (~30 minutes; a shared-memory race or a stage refilled
#                 too early changes the result under at least one of them); otherwise the
#                 order is $ASPP_CUDA_EMU_ORDER (default forward).
# cp.async is asynchronous unless ASPP_CUDA_EMU_ASYNC=0 (see tools/cuda_emu/cuda_emu.h).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
asan=""
orders="${ASPP_CUDA_EMU_ORDER:-forward}"
while [ $# -gt 0 ]; do
    case $1 in
        --asan) asan="--asan"; shift ;;
        --all-orders) orders="forward reverse shuffle:1 warps warps-reverse"; shift ;;
        *) break ;;
    esac
done
lib=$($PYTHON tools/cuda_emu/build.py $asan | tail -1)
export ASPP_CUDA_EMU_LIB="$lib"
if [ -n "$asan" ]; then
    export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
    export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:detect_stack_use_after_return=0}
fi
status=0
for order in $orders; do
    echo "== ASPP_CUDA_EMU_ORDER=$order"
    # Each op in every dtype (tests/test_op_dtypes.py, kernel set cuda_emu) and the fuzz.
    ASPP_CUDA_EMU_ORDER=$order $PYTHON -m pytest -q -p no:cacheprovider tests/test_op_dtypes.py -k cuda_emu "$@" || status=1
    ASPP_CUDA_EMU_ORDER=$order $PYTHON -m pytest -q -p no:cacheprovider -m gpu tests/test_fuzz.py "$@" || status=1
    # The op cases every backend meets (tests/test_op_cases.py), on the emulated CUDA kernels.
    ASPP_CUDA_EMU_ORDER=$order $PYTHON -m pytest -q -p no:cacheprovider tests/test_op_cases.py -k cuda_emu "$@" || status=1
done
exit $status
