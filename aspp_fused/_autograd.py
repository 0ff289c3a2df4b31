"""The autograd formulas of the atrous_conv and separable_conv ops, written once for every
backend that implements them: the compiled ops (aspp_fused::atrous_conv, registered by
aspp_fused/ops.py) and the Triton ones (aspp_fused::triton_atrous_conv, registered when the
package loads aspp_fused.kernels: _extension.triton_kernels). A backend supplies the forward
and its backward op (same schemas, csrc/aspp_fused.cpp); ``register`` ties them together.

The backend modules never import this package: it imports them (kernels/ stays a plain set of
Triton ops, loadable and testable on its own).
"""
import functools

import torch

__all__ = ["register_atrous", "register_separable"]


def _present(t) -> bool:
    """False for the schema's empty [0] "absent" placeholder."""
    return not (t.dim() == 1 and t.numel() == 0)


def _any(flags) -> bool:
    if isinstance(flags, (list, tuple)):
        return any(_any(f) for f in flags)
    return bool(flags)


def _stats_grads(ctx, grad_out, grad_sum, grad_sumsq, out):
    # Autograd hands None for outputs that took no part in the loss (materialize_grads off).
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if not ctx.compute_stats:
        grad_sum = grad_sumsq = None
    return grad_out, grad_sum, grad_sumsq


def atrous_setup(ctx, inputs, output):
    x, weights, dilations, scale, shift, bias, sum_mode, act, compute_stats = inputs
    ctx.set_materialize_grads(False)
    ctx.dilations, ctx.sum_mode, ctx.act, ctx.compute_stats = list(dilations), sum_mode, act, compute_stats
    ctx.has_bias = bias is not None
    ctx.save_for_backward(output[0], x, scale, shift, bias, *weights)


def _atrous_backward(backward_op, ctx, grad_out, grad_sum, grad_sumsq):
    out, x, scale, shift, bias, *weights = ctx.saved_tensors
    grad_out, grad_sum, grad_sumsq = _stats_grads(ctx, grad_out, grad_sum, grad_sumsq, out)
    need = ctx.needs_input_grad
    mask = [_any(need[0]), _any(need[1]), _any(need[3:6])]
    gx, gws, gscale, gshift, gbias = backward_op(
        grad_out, grad_sum, grad_sumsq, out, x, weights, ctx.dilations, scale, shift, bias, ctx.sum_mode,
        ctx.act, mask,
    )
    return (
        gx if mask[0] else None,
        list(gws) if mask[1] else [None] * len(weights),  # a list input needs a list of grads
        None,
        gscale if mask[2] else None,
        gshift if mask[2] else None,
        gbias if mask[2] and ctx.has_bias else None,
        None,
        None,
        None,
    )


def separable_setup(ctx, inputs, output):
    x, dw, dilations, mid_scales, mid_shifts, mid_act, pw, scale, shift, bias, act, compute_stats = inputs
    ctx.set_materialize_grads(False)
    nb = len(pw)
    ctx.nb = nb
    ctx.dilations, ctx.mid_act, ctx.act, ctx.compute_stats = list(dilations), mid_act, act, compute_stats
    ctx.has_bias = bias is not None
    ctx.dw_present = [_present(t) for t in dw]
    ctx.mid_present = [_present(t) for t in mid_scales]
    ctx.save_for_backward(output[0], x, scale, shift, bias, *pw, *dw, *mid_scales, *mid_shifts)


def _separable_backward(backward_op, ctx, grad_out, grad_sum, grad_sumsq):
    out, x, scale, shift, bias, *rest = ctx.saved_tensors
    nb = ctx.nb
    pw, dw, mid_scales, mid_shifts = rest[:nb], rest[nb:2 * nb], rest[2 * nb:3 * nb], rest[3 * nb:]
    grad_out, grad_sum, grad_sumsq = _stats_grads(ctx, grad_out, grad_sum, grad_sumsq, out)
    need = ctx.needs_input_grad
    mask = [_any(need[0]), _any(need[1]) or _any(need[3]) or _any(need[4]) or _any(need[6]), _any(need[7:10])]
    gx, gdw, gms, gmsh, gpw, gscale, gshift, gbias = backward_op(
        grad_out, grad_sum, grad_sumsq, out, x, dw, ctx.dilations, mid_scales, mid_shifts, ctx.mid_act, pw,
        scale, shift, bias, ctx.act, mask,
    )

    def per_branch(grads, present):
        # Entries whose forward input was absent come back as empty placeholders.
        return [g if p else None for g, p in zip(grads, present)] if mask[1] else [None] * nb

    return (
        gx if mask[0] else None,
        per_branch(gdw, ctx.dw_present),
        None,
        per_branch(gms, ctx.mid_present),
        per_branch(gmsh, ctx.mid_present),
        None,
        per_branch(gpw, [True] * nb),
        gscale if mask[2] else None,
        gshift if mask[2] else None,
        gbias if mask[2] and ctx.has_bias else None,
        None,
        None,
    )


def register_atrous(op_name: str, backward_op) -> None:
    """Autograd of the atrous_conv-schema op ``op_name`` through ``backward_op``."""
    torch.library.register_autograd(op_name, functools.partial(_atrous_backward, backward_op),
                                    setup_context=atrous_setup)


def register_separable(op_name: str, backward_op) -> None:
    """Autograd of the separable_conv-schema op ``op_name`` through ``backward_op``."""
    torch.library.register_autograd(op_name, functools.partial(_separable_backward, backward_op),
                                    setup_context=separable_setup)
