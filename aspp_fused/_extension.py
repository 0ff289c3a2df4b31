"""Loads the backends' code: the compiled extension aspp_fused._C, if it is there, and the
Triton kernels on first use (triton_kernels).

``import aspp_fused`` must keep working without the extension (the ``torch`` backend needs nothing
compiled), so a missing or broken build is reported once as a warning, with the reason,
and ``backend="cpp"`` raises an error that repeats that reason.
"""
import importlib
import threading
import warnings

import torch

LOAD_ERROR = None
try:
    # Loading it runs the TORCH_LIBRARY registrations of csrc/.
    _C = importlib.import_module("aspp_fused._C")
except Exception as exc:  # ImportError, OSError (undefined symbol, ABI mismatch), ...
    _C = None
    LOAD_ERROR = "%s: %s" % (type(exc).__name__, exc)
    warnings.warn(
        "aspp_fused: the compiled extension aspp_fused._C could not be loaded (%s); only the 'torch' "
        "backend is available. Rebuild with `pip install --no-build-isolation -e .`." % LOAD_ERROR,
        RuntimeWarning,
        stacklevel=2,
    )


def cpp_available() -> bool:
    """True when the compiled ops are registered (CPU kernels at least)."""
    return _C is not None


def cuda_kernels_built() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key("aspp_fused::atrous_conv", "CUDA")


_triton_lock = threading.Lock()
_triton_kernels = None


def triton_kernels():
    """The Triton backend, aspp_fused.kernels, with its ops' autograd registered (once).

    Importing it imports triton, and Triton reads TRITON_INTERPRET then, once. The package
    imports its backends, never the reverse: the autograd formulas shared with the compiled
    ops (aspp_fused/_autograd.py) are tied to the Triton ops here, on first use.
    """
    global _triton_kernels
    if _triton_kernels is None:
        with _triton_lock:
            if _triton_kernels is None:
                from aspp_fused import _autograd, kernels

                kernels.ops  # registers the Triton ops
                prims = _autograd.primitives(torch.ops.aspp_fused, "triton_")
                _autograd.register_atrous("aspp_fused::triton_atrous_conv", prims)
                _autograd.register_separable("aspp_fused::triton_separable_conv", prims)
                _triton_kernels = kernels
    return _triton_kernels
