"""``python -m aspp_fused.info``: what is built and which backends work here, and why not."""
import os
import platform
import sys

import torch


def _triton_status():
    try:
        import triton
    except Exception as exc:  # not installed or broken
        return None, "triton not importable (%s)" % type(exc).__name__
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if torch.cuda.is_available():
        why = "Triton kernels on CUDA tensors" + (" (TRITON_INTERPRET=1: interpreted, slow)" if interpret else "")
    elif interpret:
        why = "no CUDA device; TRITON_INTERPRET=1: the kernels run interpreted on CPU tensors (slow, for tests)"
    else:
        why = "no CUDA device (set TRITON_INTERPRET=1 before import to run the kernels on CPU, for tests)"
    return triton.__version__, why


def collect() -> dict:
    import aspp_fused
    from aspp_fused import _extension

    triton_version, triton_why = _triton_status()
    gpu = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = "%s (sm_%d%d, %.0f GiB)" % (p.name, p.major, p.minor, p.total_memory / 2**30)
    backends = {
        "torch": (True, "ATen composition; always available"),
        "cpp (CPU)": (_extension.cpp_available(),
                      "compiled CPU reference kernels" if _extension.cpp_available() else _extension.LOAD_ERROR),
        "cpp (CUDA)": (_extension.cuda_kernels_built(),
                       "compiled CUDA kernels" if _extension.cuda_kernels_built()
                       else "extension built without CUDA kernels" if _extension.cpp_available()
                       else _extension.LOAD_ERROR),
        "triton": (triton_version is not None and (torch.cuda.is_available()
                                                    or os.environ.get("TRITON_INTERPRET", "0") == "1"), triton_why),
    }
    return {
        "aspp_fused": aspp_fused.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda,
        "triton": triton_version,
        "GPU": gpu,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"),
        "extension": getattr(_extension._C, "__file__", None),
        "backends": backends,
    }


def main() -> int:
    info = collect()
    backends = info.pop("backends")
    width = max(len(k) for k in list(info) + list(backends))
    for key, value in info.items():
        print("%-*s  %s" % (width, key, value))
    print("\nbackends:")
    for name, (ok, why) in backends.items():
        print("  %-*s  %-3s  %s" % (width, name, "yes" if ok else "no", why))
    hints = [(name, ENABLE_HINTS[name]) for name, (ok, _) in backends.items() if not ok and name in ENABLE_HINTS]
    if hints:
        print("\nto enable a missing backend:")
        for name, hint in hints:
            print("  %-*s  %s" % (width, name, hint))
    return 0


# How to get each backend that can be missing (printed for those that are).
ENABLE_HINTS = {
    "cpp (CPU)": "rebuild the extension: pip install --no-build-isolation -e . (torch installed first)",
    "cpp (CUDA)": "on a machine with a CUDA build of torch and the CUDA toolkit (nvcc): pip install "
                  "--no-build-isolation -e . (ASPP_FUSED_FORCE_CUDA=1 builds without a visible GPU)",
    "triton": "pip install 'aspp_fused[triton]', then run on CUDA tensors (or set TRITON_INTERPRET=1 for CPU tests)",
}


if __name__ == "__main__":
    sys.exit(main())
