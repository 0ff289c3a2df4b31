#!/usr/bin/env python
"""Builds the CUDA kernels and launch glue of csrc/cuda for the host SIMT emulator.

The real sources (csrc/cuda/*.cu and *.cuh) are compiled as C++, next to
tools/cuda_emu/cuda_emu.cpp, into one shared library. shim/ comes first on the include path: its
cuda/ptx.cuh (the PTX wrappers) and cuda/launch.h (launches, registration) replace csrc/cuda's,
so the product sources carry nothing of the emulator. Loading it registers the ops as
torch.ops.aspp_fused_emu.* (schemas copied from csrc/aspp_fused.cpp) for CPU tensors, so the
CUDA code path can be compared with the CPU backend's kernels on a machine without a GPU:

    python tools/cuda_emu/build.py [--asan]      # -> build/cuda_emu/libaspp_cuda_emu[_asan].so
    tools/cuda_emu/run_tests.sh [--asan]         # builds, then runs tests/test_op_dtypes.py on it

`make emu-test` (run by CI) is the second line. Not part of the package (the emulator runs a
CTA's threads as fibers: fine for the small shapes of the tests, far too slow for anything
else).
"""
import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
GLUE = ["atrous_conv.cu", "separable_conv.cu", "tap_gemm.cu", "depthwise_epilogue.cu"]


def schemas_source():
    """TORCH_LIBRARY(aspp_fused_emu) with the schema strings of csrc/aspp_fused.cpp."""
    text = open(os.path.join(ROOT, "csrc", "aspp_fused.cpp")).read()
    defs = []
    for m in re.finditer(r"m\.def\(\s*((?:\"(?:[^\"\\]|\\.)*\"\s*)+)", text):
        defs.append("  m.def(%s);" % m.group(1).strip())
    if len(defs) < 4:
        sys.exit("build.py: could not find the op schemas in csrc/aspp_fused.cpp")
    return "#include <torch/library.h>\nTORCH_LIBRARY(aspp_fused_emu, m) {\n%s\n}\n" % "\n".join(defs)


def cuda_include():
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and os.path.exists(os.path.join(base, "include", "cuda_bf16.h")):
            return os.path.join(base, "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        base = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(base, "include", "cuda_bf16.h")):
            return os.path.join(base, "include")
    sys.exit("build.py: the CUDA toolkit headers (cuda_bf16.h) are needed; set CUDA_HOME")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--asan", action="store_true", help="build with AddressSanitizer")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--opt", default="-O1")
    ap.add_argument("--check-toolkit", action="store_true",
                    help="only say whether the CUDA headers the build needs are here (exit 0) or not (exit 1)")
    args = ap.parse_args()
    if args.check_toolkit:
        try:
            print("cuda_emu: CUDA headers in %s" % cuda_include())
            return 0
        except SystemExit as exc:
            print(exc)
            return 1

    import torch
    from torch.utils import cpp_extension

    out_dir = os.path.join(ROOT, "build", "cuda_emu" + ("_asan" if args.asan else ""))
    os.makedirs(out_dir, exist_ok=True)
    schemas = os.path.join(out_dir, "emu_schemas.cpp")
    src = schemas_source()
    if not os.path.exists(schemas) or open(schemas).read() != src:
        with open(schemas, "w") as f:
            f.write(src)

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-std=c++17", "-fPIC", args.opt, "-g", "-D_GLIBCXX_USE_CXX11_ABI=%d" % abi,
             "-Wno-unknown-pragmas", "-I" + os.path.join(HERE, "shim"), "-I" + os.path.join(ROOT, "csrc"), "-I" + HERE,
             "-I" + cuda_include()]  # shim/ first: its cuda/ptx.cuh and cuda/launch.h replace csrc/cuda's
    flags += ["-I" + p for p in cpp_extension.include_paths()]
    if args.asan:
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    cxx = os.environ.get("CXX", "g++")

    units = [(os.path.join(ROOT, "csrc", "cuda", g), True) for g in GLUE]
    units += [(os.path.join(HERE, "cuda_emu.cpp"), False), (schemas, False)]
    headers = [os.path.join(ROOT, "csrc", "cuda", f) for f in os.listdir(os.path.join(ROOT, "csrc", "cuda"))
               if f.endswith((".cuh", ".h"))] + [os.path.join(HERE, "cuda_emu.h")]
    headers += [os.path.join(ROOT, "csrc", f) for f in os.listdir(os.path.join(ROOT, "csrc")) if f.endswith(".h")]
    headers += [os.path.join(HERE, "shim", "cuda", f) for f in os.listdir(os.path.join(HERE, "shim", "cuda"))]
    newest_header = max(os.path.getmtime(h) for h in headers)

    def compile_unit(unit):
        path, is_cu = unit
        obj = os.path.join(out_dir, os.path.basename(path) + ".o")
        if os.path.exists(obj) and os.path.getmtime(obj) > max(os.path.getmtime(path), newest_header):
            return obj
        cmd = [cxx] + flags + (["-x", "c++"] if is_cu else []) + ["-c", path, "-o", obj]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            sys.stderr.write(" ".join(cmd) + "\n" + res.stdout + res.stderr)
            raise SystemExit("build.py: compiling %s failed" % path)
        return obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as ex:
        objs = list(ex.map(compile_unit, units))

    lib = os.path.join(out_dir, "libaspp_cuda_emu%s.so" % ("_asan" if args.asan else ""))
    link = [cxx, "-shared", "-o", lib] + objs + ["-L" + p for p in cpp_extension.library_paths()]
    link += ["-Wl,-rpath," + p for p in cpp_extension.library_paths()] + ["-lc10", "-ltorch_cpu", "-ltorch"]
    if args.asan:
        link += ["-fsanitize=address"]
    res = subprocess.run(link, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout + res.stderr)
        raise SystemExit("build.py: link failed")
    print(lib)


if __name__ == "__main__":
    sys.exit(main())
