"""Builds aspp_fused._C: the CPU reference kernels always, the CUDA kernels when torch has CUDA.

Build knobs (environment variables):
  ASPP_FUSED_FORCE_CUDA=1  build the CUDA kernels even if no GPU is visible (torch must be a CUDA build)
  ASPP_FUSED_SKIP_CUDA=1   never build the CUDA kernels
  ASPP_FUSED_DEBUG=1       -O0 -g, for debugging the kernels
  TORCH_CUDA_ARCH_LIST     GPU archs to build for (e.g. "9.0a" for H100/H200 only)
  MAX_JOBS                 parallel compile jobs (ninja)
"""
import glob
import os

import setuptools
from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:
    # `pip install .` builds in an isolated environment that has no torch: say what to run instead.
    raise SystemExit("aspp_fused: the build needs torch (%s): install torch first, then build against it with "
                     "`pip install --no-build-isolation .` (or `make test`)" % exc)

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda():
    if _flag("ASPP_FUSED_SKIP_CUDA"):
        return False, "ASPP_FUSED_SKIP_CUDA=1"
    cuda_sources = glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))
    if not cuda_sources:
        return False, "no CUDA sources in csrc/cuda"
    if torch.version.cuda is None:
        if _flag("ASPP_FUSED_FORCE_CUDA"):
            raise RuntimeError(
                "ASPP_FUSED_FORCE_CUDA=1 but this torch (%s) is a CPU-only build; install a CUDA build "
                "of torch to compile the CUDA kernels" % torch.__version__
            )
        return False, "torch %s has no CUDA" % torch.__version__
    if CUDA_HOME is None:
        if _flag("ASPP_FUSED_FORCE_CUDA"):
            raise RuntimeError("ASPP_FUSED_FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        return False, "no CUDA toolkit (CUDA_HOME unset, nvcc not found)"
    if not torch.cuda.is_available() and not _flag("ASPP_FUSED_FORCE_CUDA"):
        # Building without a visible GPU works, but needs TORCH_CUDA_ARCH_LIST to know the targets.
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            return False, "no GPU visible and TORCH_CUDA_ARCH_LIST unset (set ASPP_FUSED_FORCE_CUDA=1)"
    return True, "torch CUDA %s, toolkit %s" % (torch.version.cuda, CUDA_HOME)


def _extension():
    debug = _flag("ASPP_FUSED_DEBUG")
    # No -std here: torch's BuildExtension adds the C++ standard its own headers need (C++17
    # for older releases, C++20 since: torch 2.14's headers do not compile as C++17), and nvcc
    # refuses a second -std. The sources compile as either.
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    sources = [os.path.join("csrc", "aspp_fused.cpp")] + sorted(
        os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp"))
    )
    with_cuda, why = _want_cuda()
    print("aspp_fused: CUDA kernels %s (%s)" % ("ON" if with_cuda else "OFF", why))
    define_macros = [("ASPP_FUSED_WITH_CUDA", "1" if with_cuda else "0")]
    if with_cuda:
        sources += sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
        nvcc = ["-O0", "-G"] if debug else ["-O3", "-lineinfo"]
        nvcc += ["--expt-relaxed-constexpr"]
        return CUDAExtension(
            "aspp_fused._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        )
    return CppExtension(
        "aspp_fused._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx},
    )


def _license() -> dict:
    # setuptools >= 77 takes an SPDX expression (and warns on the old field); older ones only
    # know the free-text field.
    major = int(setuptools.__version__.split(".")[0])
    return {"license_expression": "BSD-3-Clause"} if major >= 77 else {"license": "BSD-3-Clause"}


setup(
    **_license(),
    packages=["aspp_fused", "aspp_fused.nn", "aspp_fused.models", "aspp_fused.kernels"],
    package_dir={"aspp_fused.kernels": "kernels"},
    package_data={"aspp_fused": ["dispatch_table.json"]},  # what backend="auto" runs (aspp_fused/dispatch.py)
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
)
