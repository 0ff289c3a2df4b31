"""The autograd formulas of the atrous_conv and separable_conv ops, written once for every
backend that implements them: the compiled ops (aspp_fused::atrous_conv, registered by
aspp_fused/ops.py), the Triton ones (aspp_fused::triton_atrous_conv, registered when the
package loads aspp_fused.kernels: _extension.triton_kernels) and the CUDA kernels on the host
emulator (aspp_fused_emu::atrous_conv, tests/op_problems.py).

Each op's backward is one formula over the primitives every backend implements (schemas:
csrc/aspp_fused.cpp), handed in as ``Primitives``:
  atrous_conv_backward     tap_gemm (the tap-list GEMM raw; its adjoint, the dgrad),
                           epilogue_backward, tap_wgrad
  separable_conv_backward  separable_gemm (raw), epilogue_backward, separable_gemm_backward
Both start the same way: the raw GEMM (acc) where ``out`` cannot stand in for z, then the
epilogue's backward; then the GEMM's own backward from g_acc.

The backend modules never import this package: it imports them (kernels/ stays a plain set of
Triton ops, loadable and testable on its own).
"""
import functools
from typing import Callable, NamedTuple

import torch

from aspp_fused._dtypes import acc_dtype

__all__ = ["Primitives", "primitives", "atrous_conv_backward", "separable_conv_backward", "register_atrous",
           "register_separable"]


class Primitives(NamedTuple):
    """One backend's ops of the primitive schemas."""
    tap_gemm: Callable
    epilogue_backward: Callable
    tap_wgrad: Callable
    separable_gemm: Callable
    separable_gemm_backward: Callable


def primitives(namespace, prefix: str = "") -> Primitives:
    """The primitives ``namespace.<prefix>tap_gemm`` etc. (torch.ops.aspp_fused for the compiled
    ops, with prefix "triton_" for the Triton ones; torch.ops.aspp_fused_emu for the emulator)."""
    return Primitives(*(getattr(namespace, prefix + name) for name in Primitives._fields))


def atrous_conv_backward(p: Primitives, grad_out, grad_sum, grad_sumsq, out, x, weights, dilations, scale, shift,
                         bias, sum_mode, act, output_mask):
    """The backward of atrous_conv (every backend's): (grad_x, grad_weights, grad_scale, grad_shift,
    grad_bias) from the upstream grads of (out, ch_sum, ch_sumsq). output_mask = [input, weights,
    epilogue (scale, shift, bias)]; a grad not asked for comes back empty ([0] tensor, [] list), as
    does grad_bias without a bias. Grads have the dtype of the tensor they belong to; grad_x is
    channels_last.

        acc    = tap_gemm(x)                         only where out cannot stand in for z
        g_acc  = epilogue_backward(grad_out, ...)    g_z * scale, and grad_scale / shift / bias
        grad_x = tap_gemm(g_acc, adjoint=True)       the dgrad
        grad_W = tap_wgrad(x, g_acc)
    """
    need_x, need_w, need_ep = _mask("atrous_conv_backward", output_mask)
    weights, dilations = list(weights), [int(d) for d in dilations]
    grad_x, grad_ws = x.new_empty((0,)), []
    g_acc, grad_scale, grad_shift, grad_bias = _epilogue_backward(
        p, lambda dt: p.tap_gemm(x, weights, dilations, sum_mode, False, dt), grad_out, grad_sum, grad_sumsq, out, x,
        scale, shift, bias, act, need_x or need_w, need_ep)
    if need_x:
        grad_x = p.tap_gemm(g_acc, weights, dilations, sum_mode, True, x.dtype)
    if need_w:
        grad_ws = list(p.tap_wgrad(x, g_acc, weights, dilations, sum_mode))
    return grad_x, grad_ws, grad_scale, grad_shift, grad_bias


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


def _atrous_backward(prims, ctx, grad_out, grad_sum, grad_sumsq):
    out, x, scale, shift, bias, *weights = ctx.saved_tensors
    grad_out, grad_sum, grad_sumsq = _stats_grads(ctx, grad_out, grad_sum, grad_sumsq, out)
    need = ctx.needs_input_grad
    mask = [_any(need[0]), _any(need[1]), _any(need[3:6])]
    gx, gws, gscale, gshift, gbias = atrous_conv_backward(
        prims, grad_out, grad_sum, grad_sumsq, out, x, weights, ctx.dilations, scale, shift, bias, ctx.sum_mode,
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


def _separable_backward(prims, ctx, grad_out, grad_sum, grad_sumsq):
    out, x, scale, shift, bias, *rest = ctx.saved_tensors
    nb = ctx.nb
    pw, dw, mid_scales, mid_shifts = rest[:nb], rest[nb:2 * nb], rest[2 * nb:3 * nb], rest[3 * nb:]
    grad_out, grad_sum, grad_sumsq = _stats_grads(ctx, grad_out, grad_sum, grad_sumsq, out)
    need = ctx.needs_input_grad
    mask = [_any(need[0]), _any(need[1]) or _any(need[3]) or _any(need[4]) or _any(need[6]), _any(need[7:10])]
    gx, gdw, gms, gmsh, gpw, gscale, gshift, gbias = separable_conv_backward(
        prims, grad_out, grad_sum, grad_sumsq, out, x, dw, ctx.dilations, mid_scales, mid_shifts, ctx.mid_act, pw,
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


def separable_conv_backward(p: Primitives, grad_out, grad_sum, grad_sumsq, out, x, dw_weights, dilations, mid_scales,
                            mid_shifts, mid_act, pw_weights, scale, shift, bias, act, output_mask):
    """The backward of separable_conv (every backend's): (grad_x, grad_dw_weights, grad_mid_scales,
    grad_mid_shifts, grad_pw_weights, grad_scale, grad_shift, grad_bias). output_mask = [input,
    weights (dw, mid scale / shift, pw), epilogue]; per-branch lists hold an empty [0] tensor where
    the forward's entry was absent; what is not asked for comes back empty, as in atrous_conv_backward.

        acc    = separable_gemm(x)                     only where out cannot stand in for z
        g_acc  = epilogue_backward(grad_out, ...)
        grads  = separable_gemm_backward(g_acc, x, ...)
    """
    need_x, need_w, need_ep = _mask("separable_conv_backward", output_mask)
    args = (list(dw_weights), [int(d) for d in dilations], list(mid_scales), list(mid_shifts), int(mid_act),
            list(pw_weights))
    g_acc, grad_scale, grad_shift, grad_bias = _epilogue_backward(
        p, lambda dt: p.separable_gemm(x, *args, dt), grad_out, grad_sum, grad_sumsq, out, x, scale, shift, bias, act,
        need_x or need_w, need_ep)
    if need_x or need_w:
        grads = p.separable_gemm_backward(g_acc, x, *args, [need_x, need_w])
    else:
        grads = (x.new_empty((0,)), [], [], [], [])
    return tuple(grads) + (grad_scale, grad_shift, grad_bias)


def _mask(op, output_mask):
    if len(output_mask) != 3:
        raise ValueError(f"{op}: output_mask has {len(output_mask)} entries, expected 3 ([input, weights, epilogue])")
    return tuple(bool(m) for m in output_mask)


def _epilogue_backward(p, raw_gemm, grad_out, grad_sum, grad_sumsq, out, x, scale, shift, bias, act, need_g, need_ep):
    """Both ops' first steps: (g_acc, grad_scale, grad_shift, grad_bias), empty [0] where not asked for.

    acc (``raw_gemm(dtype)``, the op's GEMM without its epilogue) is computed only where it is
    needed: for grad_scale, and for z where relu hides the negative z that 2 z grad_sumsq needs.
    Otherwise the forward's out stands in for z (act none) or gives the relu mask (out > 0)."""
    if not (need_g or need_ep):
        empty = (scale.new_empty((0,)), shift.new_empty((0,)), (scale if bias is None else bias).new_empty((0,)))
        return (x.new_empty((0,)),) + empty
    acc = raw_gemm(acc_dtype(x.dtype)) if need_ep or (act == 1 and grad_sumsq is not None) else None
    return p.epilogue_backward(grad_out, grad_sum, grad_sumsq, out, acc, scale, shift, bias, act, [need_g, need_ep])


# torch.compile's on-disk caches (AOTAutograd, FX graph) key a custom op by its name, not by the
# autograd formula registered for it: after an upgrade that reshaped the formulas, a backward graph
# compiled under the old ones was served from the cache (measured: one that called the former
# atrous_conv_backward op; with unchanged primitives it would have been the old formula, silently).
# Inductor's hook for custom ops mixes a value into every cache key; ours is a digest of what a
# traced backward depends on: these formulas, the accumulation-dtype rule, the fake kernels of the
# compiled ops (their dtypes and strides are baked into a graph) and the Triton ops' host code
# (their fakes).
CACHE_KEY_ENTRY = "torch.ops.aspp_fused"


@functools.lru_cache(maxsize=None)
def formulas_digest() -> str:
    import hashlib
    import importlib.util
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    files = [os.path.join(here, name) for name in ("_autograd.py", "_dtypes.py", "ops.py")]
    spec = importlib.util.find_spec("aspp_fused.kernels")  # the package itself imports nothing
    if spec is not None and spec.submodule_search_locations:
        kdir = list(spec.submodule_search_locations)[0]
        files += sorted(os.path.join(kdir, n) for n in os.listdir(kdir) if n.endswith(".py"))
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _key_compile_caches() -> None:
    import torch._inductor.config as config

    marked = getattr(config, "unsafe_marked_cacheable_functions", None)
    if isinstance(marked, dict):  # torch releases without the hook: nothing to tie
        config.unsafe_marked_cacheable_functions = {**marked, CACHE_KEY_ENTRY: formulas_digest()}


def register_atrous(op_name: str, prims: Primitives) -> None:
    """Autograd of the atrous_conv-schema op ``op_name``: atrous_conv_backward over ``prims``."""
    _key_compile_caches()
    torch.library.register_autograd(op_name, functools.partial(_atrous_backward, prims),
                                    setup_context=atrous_setup)


def register_separable(op_name: str, prims: Primitives) -> None:
    """Autograd of the separable_conv-schema op ``op_name``: separable_conv_backward over ``prims``."""
    torch.library.register_autograd(op_name, functools.partial(_separable_backward, prims),
                                    setup_context=separable_setup)
