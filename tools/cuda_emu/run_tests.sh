#!/usr/bin/env bash
# Builds the CUDA kernels for the host SIMT emulator and runs tests/test_cuda.py against them
# (no GPU needed; ~5 minutes on 2 cores, ASan ~10x slower).
# Usage: tools/cuda_emu/run_tests.sh [--asan] [pytest args...]
#   --asan  AddressSanitizer build: every global / dynamic-shared access of the kernels is
#           bounds-checked (libasan and libstdc++ are preloaded into python for it).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
asan=""
if [ "${1:-}" = "--asan" ]; then asan="--asan"; shift; fi
lib=$($PYTHON tools/cuda_emu/build.py $asan | tail -1)
export ASPP_CUDA_EMU_LIB="$lib"
if [ -n "$asan" ]; then
    export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
    export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:detect_stack_use_after_return=0}
fi
exec $PYTHON -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda.py "$@"
