#!/usr/bin/env bash
# `make cuda-build-check`: the real CUDA build of aspp_fused._C, as a GPU machine builds it
# (setup.py with ASPP_FUSED_FORCE_CUDA=1 against a CUDA build of torch), then loads it and
# checks that every op has both its CPU and its CUDA kernel. No GPU needed.
#
# It catches what `make cuda-check` (kernels compiled without torch) and the emulator (the glue
# built for CPU tensors, its ops under their own namespace) cannot: the C++ standard torch's
# headers need, link errors, and registration conflicts at load time. Each of those makes
# `import aspp_fused` fail or abort on the GPU machine, where device time is scarce.
#
#   CUDA_BUILD_CHECK_TORCH   pinned torch release to build against (default 2.14.1: the CUDA
#                            build pip resolves here, from local files)
#   CUDA_BUILD_CHECK_DIR     working folder (default build/cuda-build-check: a venv with that torch,
#                            about 5.5 GB, reused by later runs; build temp and output)
#   CUDA_BUILD_CHECK_ARCH    TORCH_CUDA_ARCH_LIST for the build (default 9.0a: H100/H200)
#   CUDA_BUILD_CHECK_DOWNLOAD=1  allow pip to download that torch (several GB) when it is not
#                            available locally; otherwise the check is skipped, saying so
#
# Exit status: 0 when the extension built and loaded with every kernel, or when skipped (no nvcc,
# or no local CUDA torch); nonzero otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
TORCH_VERSION=${CUDA_BUILD_CHECK_TORCH:-2.14.1}
DIR=${CUDA_BUILD_CHECK_DIR:-build/cuda-build-check}
ARCH=${CUDA_BUILD_CHECK_ARCH:-9.0a}
NVCC=${NVCC:-nvcc}
say() { echo "cuda-build-check: $*"; }

if ! command -v "$NVCC" >/dev/null 2>&1; then
    say "skipped: nvcc not found (set NVCC=/path/to/nvcc)"
    exit 0
fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
VENV="$DIR/venv-torch-$TORCH_VERSION"

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION' or torch.version.cuda is None)" 2>/dev/null; then
    # Where would pip take torch from? Only a local file is taken without asking (a CUDA torch
    # with its CUDA libraries is several GB).
    report="$DIR/pip-report.json"
    "$PYTHON" -m pip install --quiet --dry-run --no-deps --ignore-installed "torch==$TORCH_VERSION" --report "$report" \
        >/dev/null 2>&1 || { say "skipped: pip cannot resolve torch==$TORCH_VERSION"; exit 0; }
    url=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['install'][0]['download_info']['url'])" "$report")
    case $url in
        file://*) ;;
        *) if [ "${CUDA_BUILD_CHECK_DOWNLOAD:-0}" != 1 ]; then
               say "skipped: torch==$TORCH_VERSION is not available locally (pip would download $url;"
               say "         CUDA_BUILD_CHECK_DOWNLOAD=1 allows it, several GB with its CUDA libraries)"
               exit 0
           fi ;;
    esac
    say "creating $VENV with torch==$TORCH_VERSION (a CUDA build, from $url)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" numpy setuptools wheel ninja
fi
"$VENV/bin/python" -c "import torch; print('cuda-build-check: torch', torch.__version__, 'CUDA', torch.version.cuda)"

# The toolkit of this nvcc, as nvcc itself reports it: its root for CUDA_HOME, and its library
# folders (lib64, lib or targets/<arch>/lib, by installation) for the link of -lcudart.
dry=$("$NVCC" -v --dryrun -c -x cu /dev/null -o /dev/null 2>&1 || true)
top=$(printf '%s\n' "$dry" | sed -n 's/^#\$ TOP=//p' | head -1)
export CUDA_HOME=${CUDA_HOME:-$(cd "$top" && pwd)}
libdirs=$(printf '%s\n' "$dry" | sed -n 's/^#\$ LIBRARIES=//p' | head -1 | tr ' ' '\n' | sed -n 's/^"*-L\([^"]*\)"*$/\1/p' | grep -v stubs | tr '\n' ':')
export LIBRARY_PATH="${libdirs}${LIBRARY_PATH:-}"
say "CUDA_HOME=$CUDA_HOME, arch $ARCH"

start=$(date +%s)
rm -rf "$DIR/lib"
ASPP_FUSED_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "$VENV/bin/python" setup.py --quiet build_ext --build-temp "$DIR/tmp" --build-lib "$DIR/lib"
so=$(ls "$DIR"/lib/aspp_fused/_C*.so)
say "built $so in $(( $(date +%s) - start ))s"

# Load it (this runs every TORCH_LIBRARY / TORCH_LIBRARY_IMPL registration, where a kernel
# signature that differs between backends aborts) and check each op's kernels.
"$VENV/bin/python" - "$so" <<'EOF'
import sys
import torch

torch.ops.load_library(sys.argv[1])
ops = ["atrous_conv", "tap_gemm", "epilogue_backward", "tap_wgrad", "separable_conv", "separable_gemm",
       "separable_gemm_backward"]
missing = [(op, key) for op in ops for key in ("CPU", "CUDA")
           if not torch._C._dispatch_has_kernel_for_dispatch_key("aspp_fused::" + op, key)]
for op in ops:
    print("cuda-build-check: aspp_fused::%s CPU and CUDA kernels registered" % op
          if not any(m[0] == op for m in missing) else "cuda-build-check: aspp_fused::%s MISSING a kernel" % op)
# The CPU kernel of the CUDA build runs (a smoke test of the loaded library).
x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
w = torch.randn(2, 4, 3, 3, dtype=torch.float64)
out = torch.ops.aspp_fused.atrous_conv(x, [w], [2], torch.ones(2, dtype=torch.float64),
                                       torch.zeros(2, dtype=torch.float64), None, False, 0, False)[0]
ref = torch.nn.functional.conv2d(x, w, padding=2, dilation=2)
assert torch.allclose(out, ref, atol=1e-12), "CPU kernel of the CUDA build disagrees with conv2d"
if missing:
    sys.exit("cuda-build-check: FAILED: missing kernels %s" % missing)
print("cuda-build-check: OK (the CUDA build loads, every op has its CPU and CUDA kernel)")
EOF
