"""aspp_fused::column_conv: an inference conv of weights read through input-column ranges, opaque to
torch.compile, so that the compiled backends keep their packed weights across calls.

In a graph compiled by inductor a slice of a parameter (the ASPP projection's columns without the
pooled branch's) reaches an op as an alias with a version counter of its own (reinterpret_tensor),
which an optimizer step or load_state_dict on the parameter never bumps. The packing caches
(csrc/pack_cache.h, kernels/pack_cache.py) cannot follow such an alias, so they pack it on every
call. This op is given the whole parameter and the ranges, and slices it when it runs: an eager
view that shares the parameter's counter, which the caches key. Used by nn/_conv_bn.conv_bn_act
for the `cpp` and `triton` backends in inference under torch.compile (not under export: an exported
graph keeps the public ops).
"""
from typing import List, Optional

import torch
from torch import Tensor


# aspp_fused::column_conv(Tensor x, Tensor[] weights, int[] starts, int[] stops, int[] dilations,
#                         Tensor? scale, Tensor? shift, Tensor? bias, int act, str backend) -> Tensor
#   out = aspp_fused.functional.atrous_conv(x, [w[:, a:b] for w, a, b in zip(weights, starts, stops)],
#                                           dilations, scale, shift, bias, act=act, backend=backend)[0]:
#   the branches' outputs concatenated, epilogue act(acc * scale + shift + bias[n]); `backend` is a
#   concrete one ("cpp" or "triton"). No autograd formula: for calls that need no gradient.
def _column_conv(x, weights, starts, stops, dilations, scale, shift, bias, act, backend):
    from aspp_fused import functional as AF

    sliced = [w[:, a:b] for w, a, b in zip(weights, starts, stops)]
    return AF.atrous_conv(x, sliced, dilations, scale, shift, bias, act=act, backend=backend)[0]


@torch.library.custom_op("aspp_fused::column_conv", mutates_args=())
def column_conv(x: Tensor, weights: List[Tensor], starts: List[int], stops: List[int], dilations: List[int],
                scale: Optional[Tensor], shift: Optional[Tensor], bias: Optional[Tensor], act: int,
                backend: str) -> Tensor:
    return _column_conv(x, weights, starts, stops, dilations, scale, shift, bias, act, backend)


# The fake kernel is the same body: the backends' own fake kernels, on the sliced fake weights.
column_conv.register_fake(_column_conv)


def applies(x: Tensor, backend: str, sources) -> bool:
    """Whether a call with weights read through columns goes through column_conv: a compiled
    graph (not an export) on a concrete compiled backend, no gradient needed by any of the call's
    tensors (``sources``: the input, weights, biases, BN tensors; the op has no autograd formula),
    no autocast (its casts are new tensors on every call anyway)."""
    return (backend in ("cpp", "triton") and torch.compiler.is_compiling() and not torch.compiler.is_exporting()
            and not torch.is_autocast_enabled(x.device.type)
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources)))
