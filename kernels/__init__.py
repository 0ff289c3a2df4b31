"""Triton kernels of aspp_fused (installed as aspp_fused.kernels): the ``backend="triton"`` ops.

One file per kernel family, each with its launcher and a pure-torch ``*_ref`` beside it:
  atrous_conv.py     multi-branch tap-list implicit GEMM (forward, dgrad) and its wgrad
  plan.py            the exact-region tap plan of the concat forward (pure Python; the torch
                     backend's region convolutions use it too)
  worklog.py         record_work / log_work: what each launch's plan multiplies (pure Python)
  separable_conv.py  depthwise-prologue GEMM (v3+ separable branches) and the depthwise kernels
  bn_act.py          backward of the fused affine / BN statistics / ReLU epilogue
  ops.py             torch.library registration (opaque custom ops); the autograd is
                     registered by aspp_fused (its _autograd.py), which imports this package

Importing the package itself imports nothing: the plan (plan.py) and the work log (worklog.py)
are pure Python, and the torch backend uses them without triton. ``ops`` (and INTERPRET,
SUPPORTED_DTYPES) import triton on first access. Kernels run on CUDA tensors, and on CPU tensors
under the Triton interpreter, which must be switched on (TRITON_INTERPRET=1) before ``ops`` is
first imported: Triton reads the variable when a kernel is defined.
"""
import importlib

# The Python face is ops.atrous_conv / ops.separable_conv: the package attributes atrous_conv /
# separable_conv stay the kernel submodules.
__all__ = ["ops", "INTERPRET", "SUPPORTED_DTYPES"]


def __getattr__(name):
    """ops (registers the torch.library ops) and the _common constants, imported on first use."""
    if name == "ops":
        return importlib.import_module(".ops", __name__)
    if name in ("INTERPRET", "SUPPORTED_DTYPES"):
        return getattr(importlib.import_module("._common", __name__), name)
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
