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
                      "the CPU backend's compiled kernels" if _extension.cpp_available() else _extension.LOAD_ERROR),
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


def print_auto_section() -> None:
    """What backend="auto" picks here and why (aspp_fused/dispatch.py), benchmark mode, its cache."""
    from aspp_fused import dispatch

    d = dispatch.describe()
    print("\nbackend='auto':")
    for device, op, backend, why in d["picks"]:
        print("  %-8s %-15s %-7s %s" % (device, op, backend, why))
    print("  table: %d committed row(s) (aspp_fused/dispatch_table.json)" % d["table_rows"])
    for row in d["rows"]:
        print("    %(device)s %(op)s %(dtype)s %(shape_class)s -> %(backend)s  (%(evidence)s)" % row)
    print("  benchmark mode: %s (aspp_fused.set_benchmark(True) or ASPP_FUSED_BENCHMARK=1)"
          % ("on" if d["benchmark"] else "off"))
    print("  cache file: %s" % (d["cache_file"] or "none (ASPP_FUSED_BENCHMARK_CACHE=PATH to keep decisions)"))
    if d["cache_file_note"]:
        print("    " + d["cache_file_note"])
    print("  cache: %d decision(s)" % len(d["entries"]))
    for what, backend, why in d["entries"]:
        print("    %s -> %s: %s" % (what, backend, why))
    for backend, device_type, why in d["rejected"]:
        print("  never used on %s (gave a wrong result): %s: %s" % (device_type, backend, why))


def plan_switches() -> list:
    """(switch, value, what it does here) of the kernels' plan and copy choices (README, runtime
    switches): the CUDA, Triton and oneDNN ones are read per call, the torch backend's regions at import."""
    cuda_regions = os.environ.get("ASPP_FUSED_CUDA_REGIONS", "auto")
    tma = os.environ.get("ASPP_FUSED_TRITON_TMA", "auto")
    if tma == "auto":
        hopper = torch.cuda.is_available() and torch.cuda.get_device_capability(0)[0] >= 9
        tma_why = "on: compute capability >= 9" if hopper else "off: no CUDA device of compute capability >= 9"
    else:
        tma_why = {"0": "off", "1": "on wherever a descriptor fits"}.get(tma, "invalid: expected auto, 0 or 1")
    from aspp_fused import torch_backend, torch_onednn

    torch_regions = torch_backend.REGIONS
    onednn = os.environ.get("ASPP_FUSED_ONEDNN", "1")
    onednn_why = ("invalid: expected 1 or 0" if onednn not in ("0", "1") else "off" if onednn == "0"
                  else "on" if torch_onednn.AVAILABLE else "off: this torch has no oneDNN")
    return [
        ("ASPP_FUSED_CUDA_REGIONS", cuda_regions,
         {"0": "CUDA concat forward on the per-tile tap plan", "1": "CUDA concat forward on the exact-region plan"}
         .get(cuda_regions, "CUDA concat forward on whichever plan issues fewer multiply-adds")),
        ("ASPP_FUSED_TRITON_TMA", tma, "Triton concat forward's weight tiles by TMA: " + tma_why),
        ("ASPP_FUSED_TORCH_REGIONS", torch_regions,
         {"0": "torch backend: one conv per branch (its exact-region convs off)", "cuda": "torch backend: "
          "exact-region convs on CUDA tensors", "1": "torch backend: exact-region convs everywhere"}
         .get(torch_regions, "invalid: expected 0, cuda or 1")),
        ("ASPP_FUSED_ONEDNN", onednn, "torch backend, CPU float32 inference: oneDNN convs on weights packed once, "
         "an ASPP head without its concatenation: " + onednn_why),
    ]


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
    print("\nplans (runtime switches):")
    for name, value, what in plan_switches():
        print("  %s=%s  %s" % (name, value, what))
    print_auto_section()
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
