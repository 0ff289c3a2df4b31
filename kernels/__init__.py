"""Triton kernels of aspp_fused (installed as aspp_fused.kernels): the ``backend="triton"`` ops.

One file per kernel family, each with its launcher and a pure-torch ``*_ref`` beside it:
  atrous_conv.py     multi-branch tap-list implicit GEMM (forward, dgrad) and its wgrad
  plan.py            the exact-region tap plan of the concat forward (pure Python)
  separable_conv.py  depthwise-prologue GEMM (v3+ separable branches) and the depthwise kernels
  bn_act.py          backward of the fused affine / BN statistics / ReLU epilogue
  ops.py             torch.library registration (triton_op + wrap_triton); the autograd is
                     registered by aspp_fused (its _autograd.py), which imports this package

Importing this package needs ``triton``. Kernels run on CUDA tensors, and on CPU tensors under
the Triton interpreter, which must be switched on (TRITON_INTERPRET=1) before this package is
imported: Triton reads the variable when a kernel is defined.
"""
from . import ops  # noqa: F401  (registers the torch.library ops)
from ._common import INTERPRET, SUPPORTED_DTYPES  # noqa: F401

# The Python face is ops.atrous_conv / ops.separable_conv: the package attributes atrous_conv /
# separable_conv stay the kernel submodules.
__all__ = ["ops", "INTERPRET", "SUPPORTED_DTYPES"]
