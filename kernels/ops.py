"""The Triton ops, registered through torch.library (docs/DESIGN.md, "Backends and dispatch").

    aspp_fused::triton_atrous_conv            (x, weights, dilations, scale, shift, bias, sum_mode, act,
                                               compute_stats) -> (out, ch_sum, ch_sumsq)
    aspp_fused::triton_separable_conv         as aspp_fused::separable_conv
  the primitives of their backward formulas (aspp_fused/_autograd.py):
    aspp_fused::triton_tap_gemm                  as aspp_fused::tap_gemm
    aspp_fused::triton_epilogue_backward         as aspp_fused::epilogue_backward
    aspp_fused::triton_tap_wgrad                 as aspp_fused::tap_wgrad
    aspp_fused::triton_separable_gemm            as aspp_fused::separable_gemm
    aspp_fused::triton_separable_gemm_backward   as aspp_fused::separable_gemm_backward

Semantics are those of the C++ schemas (csrc/aspp_fused.cpp), except that float64 is not
supported (TypeError); g_acc is in the input's dtype, as on CUDA. The ops are opaque
``torch.library.custom_op``s, on a GPU as under TRITON_INTERPRET=1, with their own Python run
with launches skipped as the fake (meta) kernel. Opaque, so that a compiled graph runs the op's own host code on every call and the packed
weights stay in kernels/pack_cache.PACKED across calls, once per parameter version (a
``triton_op`` would have its body, packing included, traced into the graph and run on every
call; and a packing returned from an op of its own is a buffer inductor may reuse). Under a
CUDA-graph capture the op packs inside the graph (PackCache), so each replay follows the
weights' current values.

Their autograd formulas are the compiled ops' (aspp_fused/_autograd.py, over the primitives here),
registered by the package when it loads this backend (aspp_fused._extension.triton_kernels): this
package imports nothing of aspp_fused.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._common import check_dtype, skip_launches
from .atrous_conv import atrous_forward, tap_gemm_op, tap_wgrad_op
from .bn_act import epilogue_backward_op
from .separable_conv import separable_forward, separable_gemm_backward_op, separable_gemm_op


def _define(name, fn):
    op = torch.library.custom_op(name, fn, mutates_args=())

    def fake(*args, **kwargs):
        with skip_launches():
            return fn(*args, **kwargs)

    op.register_fake(fake)
    return op


def _triton_atrous_conv(x: Tensor, weights: List[Tensor], dilations: List[int], scale: Tensor, shift: Tensor,
                        bias: Optional[Tensor], sum_mode: bool, act: int,
                        compute_stats: bool) -> Tuple[Tensor, Tensor, Tensor]:
    check_dtype("triton_atrous_conv", x)
    return atrous_forward(x, weights, dilations, scale, shift, bias, sum_mode, act, compute_stats)


def _triton_tap_gemm(x: Tensor, weights: List[Tensor], dilations: List[int], sum_mode: bool, adjoint: bool,
                     out_dtype: Optional[torch.dtype] = None) -> Tensor:
    check_dtype("triton_tap_gemm", weights[0])
    return tap_gemm_op(x, weights, dilations, sum_mode, adjoint, out_dtype)


def _triton_epilogue_backward(grad_out: Tensor, grad_sum: Optional[Tensor], grad_sumsq: Optional[Tensor], out: Tensor,
                              acc: Optional[Tensor], scale: Tensor, shift: Tensor, bias: Optional[Tensor], act: int,
                              output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    check_dtype("triton_epilogue_backward", out)
    return epilogue_backward_op(grad_out, grad_sum, grad_sumsq, out, acc, scale, shift, bias, act, output_mask)


def _triton_tap_wgrad(x: Tensor, g: Tensor, weights: List[Tensor], dilations: List[int],
                      sum_mode: bool) -> List[Tensor]:
    check_dtype("triton_tap_wgrad", x)
    return tap_wgrad_op(x, g, weights, dilations, sum_mode)


def _triton_separable_conv(x: Tensor, dw_weights: List[Tensor], dilations: List[int], mid_scales: List[Tensor],
                           mid_shifts: List[Tensor], mid_act: int, pw_weights: List[Tensor], scale: Tensor,
                           shift: Tensor, bias: Optional[Tensor], act: int,
                           compute_stats: bool) -> Tuple[Tensor, Tensor, Tensor]:
    check_dtype("triton_separable_conv", x)
    return separable_forward(x, dw_weights, dilations, mid_scales, mid_shifts, mid_act, pw_weights, scale, shift,
                             bias, act, compute_stats)


def _triton_separable_gemm(x: Tensor, dw_weights: List[Tensor], dilations: List[int], mid_scales: List[Tensor],
                           mid_shifts: List[Tensor], mid_act: int, pw_weights: List[Tensor],
                           out_dtype: Optional[torch.dtype] = None) -> Tensor:
    check_dtype("triton_separable_gemm", x)
    return separable_gemm_op(x, dw_weights, dilations, mid_scales, mid_shifts, mid_act, pw_weights, out_dtype)


def _triton_separable_gemm_backward(
        g: Tensor, x: Tensor, dw_weights: List[Tensor], dilations: List[int], mid_scales: List[Tensor],
        mid_shifts: List[Tensor], mid_act: int, pw_weights: List[Tensor], output_mask: List[bool]
) -> Tuple[Tensor, List[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
    check_dtype("triton_separable_gemm_backward", x)
    return separable_gemm_backward_op(g, x, dw_weights, dilations, mid_scales, mid_shifts, mid_act, pw_weights,
                                      output_mask)


triton_atrous_conv = _define("aspp_fused::triton_atrous_conv", _triton_atrous_conv)
triton_tap_gemm = _define("aspp_fused::triton_tap_gemm", _triton_tap_gemm)
triton_epilogue_backward = _define("aspp_fused::triton_epilogue_backward", _triton_epilogue_backward)
triton_tap_wgrad = _define("aspp_fused::triton_tap_wgrad", _triton_tap_wgrad)
triton_separable_conv = _define("aspp_fused::triton_separable_conv", _triton_separable_conv)
triton_separable_gemm = _define("aspp_fused::triton_separable_gemm", _triton_separable_gemm)
triton_separable_gemm_backward = _define("aspp_fused::triton_separable_gemm_backward", _triton_separable_gemm_backward)


# --------------------------------------------------------------------------- Python face


def atrous_conv(x, weights, dilations, scale, shift, bias=None, sum_mode=False, act=0, compute_stats=False):
    """torch.ops.aspp_fused.triton_atrous_conv; returns (out, ch_sum, ch_sumsq)."""
    return torch.ops.aspp_fused.triton_atrous_conv(x, list(weights), [int(d) for d in dilations], scale, shift, bias,
                                                   bool(sum_mode), int(act), bool(compute_stats))


def separable_conv(x, dw_weights, dilations, mid_scales, mid_shifts, mid_act, pw_weights, scale, shift, bias=None,
                   act=0, compute_stats=False):
    """torch.ops.aspp_fused.triton_separable_conv; None entries become the schema's empty [0]."""
    def absent(ts):
        return [x.new_empty((0,)) if t is None else t for t in ts]

    return torch.ops.aspp_fused.triton_separable_conv(
        x, absent(dw_weights), [int(d) for d in dilations], absent(mid_scales), absent(mid_shifts), int(mid_act),
        list(pw_weights), scale, shift, bias, int(act), bool(compute_stats))
