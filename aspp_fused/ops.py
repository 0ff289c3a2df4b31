"""Python face of the compiled ops: thin wrappers, fake (meta) kernels and autograd.

The schemas and their exact semantics are in csrc/aspp_fused.cpp. Registering the fake
kernels here and the autograd formulas (aspp_fused/_autograd.py), through torch.library, is what lets torch.compile
(fullgraph), AMP, CUDA graphs and opcheck see the ops like any ATen op.
"""
import torch

from aspp_fused import _autograd
from aspp_fused._autograd import _present
from aspp_fused._dtypes import acc_dtype
from aspp_fused._extension import cpp_available

__all__ = ["atrous_conv", "separable_conv", "atrous_conv_backward", "separable_conv_backward"]


def atrous_conv(x, weights, dilations, scale, shift, bias=None, sum_mode=False, act=0, compute_stats=False):
    """torch.ops.aspp_fused.atrous_conv; returns (out, ch_sum, ch_sumsq)."""
    return torch.ops.aspp_fused.atrous_conv(
        x, list(weights), [int(d) for d in dilations], scale, shift, bias, bool(sum_mode), int(act), bool(compute_stats)
    )


def separable_conv(
    x, dw_weights, dilations, mid_scales, mid_shifts, mid_act, pw_weights, scale, shift, bias=None, act=0,
    compute_stats=False,
):
    """torch.ops.aspp_fused.separable_conv; returns (out, ch_sum, ch_sumsq).

    None entries of dw_weights / mid_scales / mid_shifts become the schema's empty [0]
    "absent" tensors.
    """
    return torch.ops.aspp_fused.separable_conv(
        x, _absent_as_empty(dw_weights, x), [int(d) for d in dilations], _absent_as_empty(mid_scales, x),
        _absent_as_empty(mid_shifts, x), int(mid_act), list(pw_weights), scale, shift, bias, int(act),
        bool(compute_stats),
    )


def _absent_as_empty(tensors, x):
    return [x.new_empty((0,)) if t is None else t for t in tensors]


def atrous_conv_backward(*args):
    """The backward of torch.ops.aspp_fused.atrous_conv (aspp_fused/_autograd.py: atrous_conv_backward)
    over the compiled primitives; arguments as that function's after ``p``."""
    return _autograd.atrous_conv_backward(_autograd.primitives(torch.ops.aspp_fused), *args)


def separable_conv_backward(*args):
    """The backward of torch.ops.aspp_fused.separable_conv (aspp_fused/_autograd.py:
    separable_conv_backward) over the compiled primitives; arguments as that function's after ``p``."""
    return _autograd.separable_conv_backward(_autograd.primitives(torch.ops.aspp_fused), *args)


# --------------------------------------------------------------------------- fake kernels


def _fake_forward(x, o, compute_stats):
    n, _, h, w = x.shape
    out = torch.empty((n, o, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    k = o if compute_stats else 0
    stats = [torch.empty((k,), dtype=acc_dtype(x.dtype), device=x.device) for _ in range(2)]
    return out, stats[0], stats[1]


def _atrous_out_channels(weights, sum_mode):
    return weights[0].shape[0] if sum_mode else sum(w.shape[0] for w in weights)


def _empty(like):
    return like.new_empty((0,))


def _grad_like(t):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _grad_x_like(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def _fake_epilogue_grads(need, scale, shift, bias):
    if not need:
        return _empty(scale), _empty(shift), _empty(scale if bias is None else bias)
    return _grad_like(scale), _grad_like(shift), (_empty(scale) if bias is None else _grad_like(bias))


def _register_fakes():
    @torch.library.register_fake("aspp_fused::atrous_conv")
    def _(x, weights, dilations, scale, shift, bias, sum_mode, act, compute_stats):
        return _fake_forward(x, _atrous_out_channels(weights, sum_mode), compute_stats)

    @torch.library.register_fake("aspp_fused::tap_gemm")
    def _(x, weights, dilations, sum_mode, adjoint, out_dtype=None):
        n, _, h, w = x.shape
        c = weights[0].shape[1] if adjoint else _atrous_out_channels(weights, sum_mode)
        return torch.empty((n, c, h, w), dtype=out_dtype or x.dtype, device=x.device,
                           memory_format=torch.channels_last)

    @torch.library.register_fake("aspp_fused::epilogue_backward")
    def _(grad_out, grad_sum, grad_sumsq, out, acc, scale, shift, bias, act, mask):
        # g_acc in the dtype the backend's tap GEMMs read (the schema): the accumulation dtype on CPU.
        g_dtype = acc_dtype(out.dtype) if out.device.type == "cpu" else out.dtype
        g_acc = torch.empty_like(out, dtype=g_dtype, memory_format=torch.channels_last) if mask[0] else \
            out.new_empty((0,), dtype=g_dtype)
        return (g_acc,) + _fake_epilogue_grads(mask[1], scale, shift, bias)

    @torch.library.register_fake("aspp_fused::tap_wgrad")
    def _(x, g, weights, dilations, sum_mode):
        return [_grad_like(w) for w in weights]

    @torch.library.register_fake("aspp_fused::separable_conv")
    def _(x, dw_weights, dilations, mid_scales, mid_shifts, mid_act, pw_weights, scale, shift, bias, act, stats):
        return _fake_forward(x, sum(w.shape[0] for w in pw_weights), stats)

    @torch.library.register_fake("aspp_fused::separable_gemm")
    def _(x, dw_weights, dilations, mid_scales, mid_shifts, mid_act, pw_weights, out_dtype=None):
        n, _, h, w = x.shape
        return torch.empty((n, sum(t.shape[0] for t in pw_weights), h, w), dtype=out_dtype or x.dtype,
                           device=x.device, memory_format=torch.channels_last)

    @torch.library.register_fake("aspp_fused::separable_gemm_backward")
    def _(g, x, dw_weights, dilations, mid_scales, mid_shifts, mid_act, pw_weights, mask):
        grad_x = _grad_x_like(x) if mask[0] else _empty(x)

        def per_branch(ts):
            return [(_grad_like(t) if _present(t) else _empty(x)) for t in ts] if mask[1] else []

        return (grad_x, per_branch(dw_weights), per_branch(mid_scales), per_branch(mid_shifts),
                per_branch(pw_weights))


if cpp_available():
    _register_fakes()
    _prims = _autograd.primitives(torch.ops.aspp_fused)
    _autograd.register_atrous("aspp_fused::atrous_conv", _prims)
    _autograd.register_separable("aspp_fused::separable_conv", _prims)
