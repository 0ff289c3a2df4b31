"""aspp_fused: fused multi-rate atrous conv + BatchNorm + ReLU for DeepLab ASPP heads.

    import aspp_fused
    model = aspp_fused.convert(model)          # in place; same state_dict, same numbers
    model = aspp_fused.revert(model)           # back to the original modules

``python -m aspp_fused.info`` tells which backends work on this machine.
"""
__version__ = "0.1.0"  # first: aspp_fused.dispatch reads it at import (benchmark cache file check)

from aspp_fused import _extension, functional, nn, ops  # noqa: F401  (ops registers fake/autograd)
from aspp_fused.convert import convert, explain, list_fused, revert
from aspp_fused.dispatch import benchmark_enabled, set_benchmark
from aspp_fused.functional import BACKENDS, atrous_conv, separable_conv
from aspp_fused.nn._fold_cache import clear_caches

__all__ = ["convert", "revert", "list_fused", "explain", "atrous_conv", "separable_conv", "BACKENDS", "nn",
           "functional", "set_benchmark", "benchmark_enabled", "clear_caches", "__version__"]
