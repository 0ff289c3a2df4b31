"""The Triton ops, registered through torch.library (DESIGN.md, "Backends and dispatch").

    aspp_fused::triton_atrous_conv            (x, weights, dilations, scale, shift, bias, sum_mode, act,
                                               compute_stats) -> (out, ch_sum, ch_sumsq)
    aspp_fused::triton_atrous_conv_backward   as aspp_fused::atrous_conv_backward
    aspp_fused::triton_separable_conv         as aspp_fused::separable_conv
    aspp_fused::triton_separable_conv_backward

Semantics are those of the C++ schemas (csrc/aspp_fused.cpp), except that float64 is not
supported (TypeError). On GPU the ops are ``torch.library.triton_op``s whose kernels launch
through ``wrap_triton``, so torch.compile sees the kernels and the fake (meta) kernel is the
op's own Python traced with fake tensors. Under TRITON_INTERPRET=1 the interpreted kernels
cannot be traced, so the ops are opaque ``custom_op``s instead, with the same Python run with
launches skipped as their fake kernel.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._common import INTERPRET, check_dtype, skip_launches
from .atrous_conv import atrous_backward, atrous_forward
from .separable_conv import separable_backward, separable_forward


def _define(name, fn):
    if INTERPRET:
        op = torch.library.custom_op(name, fn, mutates_args=())

        def fake(*args, **kwargs):
            with skip_launches():
                return fn(*args, **kwargs)

        op.register_fake(fake)
        return op
    return torch.library.triton_op(name, fn, mutates_args=())


def _triton_atrous_conv(x: Tensor, weights: List[Tensor], dilations: List[int], scale: Tensor, shift: Tensor,
                        bias: Optional[Tensor], sum_mode: bool, act: int,
                        compute_stats: bool) -> Tuple[Tensor, Tensor, Tensor]:
    check_dtype("triton_atrous_conv", x)
    return atrous_forward(x, weights, dilations, scale, shift, bias, sum_mode, act, compute_stats)


def _triton_atrous_conv_backward(grad_out: Tensor, grad_sum: Optional[Tensor], grad_sumsq: Optional[Tensor],
                                 out: Tensor, x: Tensor, weights: List[Tensor], dilations: List[int], scale: Tensor,
                                 shift: Tensor, bias: Optional[Tensor], sum_mode: bool, act: int,
                                 output_mask: List[bool]) -> Tuple[Tensor, List[Tensor], Tensor, Tensor, Tensor]:
    check_dtype("triton_atrous_conv_backward", x)
    return atrous_backward(grad_out, grad_sum, grad_sumsq, out, x, weights, dilations, scale, shift, bias, sum_mode,
                           act, output_mask)


def _triton_separable_conv(x: Tensor, dw_weights: List[Tensor], dilations: List[int], mid_scales: List[Tensor],
                           mid_shifts: List[Tensor], mid_act: int, pw_weights: List[Tensor], scale: Tensor,
                           shift: Tensor, bias: Optional[Tensor], act: int,
                           compute_stats: bool) -> Tuple[Tensor, Tensor, Tensor]:
    check_dtype("triton_separable_conv", x)
    return separable_forward(x, dw_weights, dilations, mid_scales, mid_shifts, mid_act, pw_weights, scale, shift,
                             bias, act, compute_stats)


def _triton_separable_conv_backward(
        grad_out: Tensor, grad_sum: Optional[Tensor], grad_sumsq: Optional[Tensor], out: Tensor, x: Tensor,
        dw_weights: List[Tensor], dilations: List[int], mid_scales: List[Tensor], mid_shifts: List[Tensor],
        mid_act: int, pw_weights: List[Tensor], scale: Tensor, shift: Tensor, bias: Optional[Tensor], act: int,
        output_mask: List[bool]
) -> Tuple[Tensor, List[Tensor], List[Tensor], List[Tensor], List[Tensor], Tensor, Tensor, Tensor]:
    check_dtype("triton_separable_conv_backward", x)
    return separable_backward(grad_out, grad_sum, grad_sumsq, out, x, dw_weights, dilations, mid_scales, mid_shifts,
                              mid_act, pw_weights, scale, shift, bias, act, output_mask)


triton_atrous_conv = _define("aspp_fused::triton_atrous_conv", _triton_atrous_conv)
triton_atrous_conv_backward = _define("aspp_fused::triton_atrous_conv_backward", _triton_atrous_conv_backward)
triton_separable_conv = _define("aspp_fused::triton_separable_conv", _triton_separable_conv)
triton_separable_conv_backward = _define("aspp_fused::triton_separable_conv_backward", _triton_separable_conv_backward)


# --------------------------------------------------------------------------- autograd
# Mirrors aspp_fused/ops.py (the compiled ops' autograd), calling the Triton backward ops.


def _any(flags) -> bool:
    if isinstance(flags, (list, tuple)):
        return any(_any(f) for f in flags)
    return bool(flags)


def _present(t) -> bool:
    return not (t.dim() == 1 and t.numel() == 0)


def _stats_grads(ctx, grad_out, grad_sum, grad_sumsq, out):
    if grad_out is None:  # materialize_grads is off: None for outputs that took no part in the loss
        grad_out = torch.zeros_like(out)
    if not ctx.compute_stats:
        grad_sum = grad_sumsq = None
    return grad_out, grad_sum, grad_sumsq


def _atrous_setup(ctx, inputs, output):
    x, weights, dilations, scale, shift, bias, sum_mode, act, compute_stats = inputs
    ctx.set_materialize_grads(False)
    ctx.dilations, ctx.sum_mode, ctx.act, ctx.compute_stats = list(dilations), sum_mode, act, compute_stats
    ctx.has_bias = bias is not None
    ctx.save_for_backward(output[0], x, scale, shift, bias, *weights)


def _atrous_backward(ctx, grad_out, grad_sum, grad_sumsq):
    out, x, scale, shift, bias, *weights = ctx.saved_tensors
    grad_out, grad_sum, grad_sumsq = _stats_grads(ctx, grad_out, grad_sum, grad_sumsq, out)
    need = ctx.needs_input_grad
    mask = [_any(need[0]), _any(need[1]), _any(need[3:6])]
    gx, gws, gscale, gshift, gbias = triton_atrous_conv_backward(
        grad_out, grad_sum, grad_sumsq, out, x, weights, ctx.dilations, scale, shift, bias, ctx.sum_mode, ctx.act,
        mask)
    # A Tensor[] input takes a list back even when none of it needs a grad ([None] * n, not None).
    return (gx if mask[0] else None, list(gws) if mask[1] else [None] * len(weights), None,
            gscale if mask[2] else None,
            gshift if mask[2] else None, gbias if mask[2] and ctx.has_bias else None, None, None, None)


def _separable_setup(ctx, inputs, output):
    x, dw, dilations, mid_scales, mid_shifts, mid_act, pw, scale, shift, bias, act, compute_stats = inputs
    ctx.set_materialize_grads(False)
    ctx.nb = len(pw)
    ctx.dilations, ctx.mid_act, ctx.act, ctx.compute_stats = list(dilations), mid_act, act, compute_stats
    ctx.has_bias = bias is not None
    ctx.dw_present = [_present(t) for t in dw]
    ctx.mid_present = [_present(t) for t in mid_scales]
    ctx.save_for_backward(output[0], x, scale, shift, bias, *pw, *dw, *mid_scales, *mid_shifts)


def _separable_backward(ctx, grad_out, grad_sum, grad_sumsq):
    out, x, scale, shift, bias, *rest = ctx.saved_tensors
    nb = ctx.nb
    pw, dw, mid_scales, mid_shifts = rest[:nb], rest[nb:2 * nb], rest[2 * nb:3 * nb], rest[3 * nb:]
    grad_out, grad_sum, grad_sumsq = _stats_grads(ctx, grad_out, grad_sum, grad_sumsq, out)
    need = ctx.needs_input_grad
    mask = [_any(need[0]), _any(need[1]) or _any(need[3]) or _any(need[4]) or _any(need[6]), _any(need[7:10])]
    gx, gdw, gms, gmsh, gpw, gscale, gshift, gbias = triton_separable_conv_backward(
        grad_out, grad_sum, grad_sumsq, out, x, dw, ctx.dilations, mid_scales, mid_shifts, ctx.mid_act, pw, scale,
        shift, bias, ctx.act, mask)

    def per_branch(grads, present):
        # A Tensor[] input takes a list back even when none of it needs a grad.
        return [g if p else None for g, p in zip(grads, present)] if mask[1] else [None] * nb

    return (gx if mask[0] else None, per_branch(gdw, ctx.dw_present), None, per_branch(gms, ctx.mid_present),
            per_branch(gmsh, ctx.mid_present), None, per_branch(gpw, [True] * nb), gscale if mask[2] else None,
            gshift if mask[2] else None, gbias if mask[2] and ctx.has_bias else None, None, None)


torch.library.register_autograd("aspp_fused::triton_atrous_conv", _atrous_backward, setup_context=_atrous_setup)
torch.library.register_autograd("aspp_fused::triton_separable_conv", _separable_backward,
                                setup_context=_separable_setup)


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
