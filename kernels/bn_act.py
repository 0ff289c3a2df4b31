"""Backward of the fused epilogue (affine + BN-statistics + ReLU) as one elementwise + reduction pass.

For every output element (schema of aspp_fused::epilogue_backward):
    z      = acc * scale[o] + shift[o] (+ bias[n, o])         (or z read back from `out`)
    g_z    = grad_out * act'(z) + grad_sum[o] + 2 z grad_sumsq[o]
    g_acc  = g_z * scale[o]                                    (stored, feeds dgrad / wgrad)
and per-program partial sums of g_z * acc and g_z over its pixels, reduced on the host into
grad_scale[o], grad_shift[o] and grad_bias[n, o]. A program covers BP pixels of one image, so
its partial row belongs to one n (grad_bias without atomics, deterministic).
"""
import torch
import triton
import triton.language as tl

from ._common import device_guard, launch, nhwc

BP = 64
BO = 32


@triton.jit
def epilogue_bwd_kernel(go_ptr, z_ptr, scale_ptr, shift_ptr, bias_ptr, gsum_ptr, gsumsq_ptr, gacc_ptr, pscale_ptr,
                        pshift_ptr, HW, O,
                        RECOMPUTE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GSUM: tl.constexpr,
                        HAS_GSUMSQ: tl.constexpr, ACT: tl.constexpr, STORE_GACC: tl.constexpr,
                        NEED_EP: tl.constexpr, BP: tl.constexpr, BO: tl.constexpr):
    pid0 = tl.program_id(0)
    pid1 = tl.program_id(1)
    nblk = tl.cdiv(HW, BP)
    n = pid0 // nblk
    p = (pid0 % nblk) * BP + tl.arange(0, BP)
    pm = p < HW
    o = pid1 * BO + tl.arange(0, BO)
    om = o < O
    m = pm[:, None] & om[None, :]
    offs = (n.to(tl.int64) * HW + p)[:, None] * O + o[None, :]
    g = tl.load(go_ptr + offs, mask=m, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + o, mask=om, other=0.0)
    if RECOMPUTE:  # z_ptr holds acc (fp32)
        a = tl.load(z_ptr + offs, mask=m, other=0.0).to(tl.float32)
        z = a * s[None, :] + tl.load(shift_ptr + o, mask=om, other=0.0)[None, :]
        if HAS_BIAS:
            z = z + tl.load(bias_ptr + n.to(tl.int64) * O + o, mask=om, other=0.0)[None, :]
    else:  # z_ptr holds out: z itself (act none) or relu(z), which has the same sign test
        z = tl.load(z_ptr + offs, mask=m, other=0.0).to(tl.float32)
        a = z
    if ACT == 1:
        g = tl.where(z > 0.0, g, 0.0)
    if HAS_GSUM:
        g = g + tl.load(gsum_ptr + o, mask=om, other=0.0)[None, :]
    if HAS_GSUMSQ:
        g = g + 2.0 * z * tl.load(gsumsq_ptr + o, mask=om, other=0.0)[None, :]
    g = tl.where(m, g, 0.0)
    if STORE_GACC:
        tl.store(gacc_ptr + offs, (g * s[None, :]).to(gacc_ptr.dtype.element_ty), mask=m)
    if NEED_EP:
        row = pid0.to(tl.int64) * O
        tl.store(pscale_ptr + row + o, tl.sum(g * a, axis=0), mask=om)
        tl.store(pshift_ptr + row + o, tl.sum(g, axis=0), mask=om)


def epilogue_backward(grad_out, zsrc, recompute, scale, shift, bias, grad_sum, grad_sumsq, act, store_gacc, need_ep,
                      gacc_dtype):
    """grad_out, zsrc [N, O, H, W] (zsrc: fp32 acc when recompute, else the forward's out).

    Returns (g_acc [N, H, W, O] dense in gacc_dtype or None, grad_scale [O] fp32 or None,
    per-image partials of grad_shift [N, blocks, O] fp32 or None)."""
    N, O, H, W = grad_out.shape
    hw = H * W
    dev = grad_out.device
    f32 = torch.float32
    go = nhwc(grad_out)
    z = nhwc(zsrc)
    nblk = triton.cdiv(hw, BP)
    g_acc = torch.empty((N, H, W, O), dtype=gacc_dtype, device=dev) if store_gacc else None
    pscale = torch.empty((N * nblk, O), dtype=f32, device=dev) if need_ep else None
    pshift = torch.empty((N * nblk, O), dtype=f32, device=dev) if need_ep else None
    s = scale.to(f32).contiguous()
    t = shift.to(f32).contiguous()
    b = bias.to(f32).contiguous() if bias is not None else None
    gs = grad_sum.to(f32).contiguous() if grad_sum is not None else None
    gss = grad_sumsq.to(f32).contiguous() if grad_sumsq is not None else None
    if N * hw > 0 and O > 0 and (store_gacc or need_ep):
        d = go.new_empty((1,), dtype=f32)  # unused pointers: a scratch tensor (see atrous_conv.tap_conv)
        with device_guard(go):
            launch(epilogue_bwd_kernel, (N * nblk, triton.cdiv(O, BO)), go, z, s, t, b if b is not None else d,
                   gs if gs is not None else d, gss if gss is not None else d, g_acc if store_gacc else d,
                   pscale if need_ep else d, pshift if need_ep else d, hw, O,
                   RECOMPUTE=bool(recompute), HAS_BIAS=b is not None, HAS_GSUM=gs is not None,
                   HAS_GSUMSQ=gss is not None, ACT=int(act), STORE_GACC=bool(store_gacc), NEED_EP=bool(need_ep),
                   BP=BP, BO=BO)
    if not need_ep:
        return g_acc, None, None
    return g_acc, pscale.sum(0), pshift.view(N, nblk, O)


def epilogue_backward_op(grad_out, grad_sum, grad_sumsq, out, acc, scale, shift, bias, act, output_mask):
    """The schema's epilogue_backward (csrc/aspp_fused.cpp): (g_acc [N, O, H, W] channels_last in
    out's dtype, grad_scale, grad_shift, grad_bias), empty [0] where not asked for."""
    need_g, need_ep = (bool(m) for m in output_mask)
    g_acc = out.new_empty((0,))
    g_scale, g_shift = scale.new_empty((0,)), shift.new_empty((0,))
    g_bias = (scale if bias is None else bias).new_empty((0,))
    if not (need_g or need_ep):
        return g_acc, g_scale, g_shift, g_bias
    # (no pixels or channels: epilogue_backward launches nothing and its sums are zeros)
    ga, ps, psh = epilogue_backward(grad_out, out if acc is None else acc, acc is not None, scale, shift, bias,
                                    grad_sum, grad_sumsq, act, need_g, need_ep, out.dtype)
    if need_g:
        g_acc = ga.permute(0, 3, 1, 2)  # [N, H, W, O] dense: [N, O, H, W] channels_last
    if need_ep:
        g_scale, g_shift = ps.to(scale.dtype), psh.sum((0, 1)).to(shift.dtype)
        if bias is not None:
            g_bias = psh.sum(1).to(bias.dtype)
    return g_acc, g_scale, g_shift, g_bias


def epilogue_ref(acc, scale, shift, bias, act, compute_stats, dtype):
    """Pure torch: the forward epilogue of a float accumulator acc [N, O, H, W] as the kernels
    apply it (z = acc * scale + shift (+ bias), statistics of z, act), out rounded to dtype in
    channels_last; returns (out, ch_sum, ch_sumsq)."""
    z = acc * scale.to(acc.dtype).view(1, -1, 1, 1) + shift.to(acc.dtype).view(1, -1, 1, 1)
    if bias is not None:
        z = z + bias.to(acc.dtype)[:, :, None, None]
    s, ss = (z.sum((0, 2, 3)), (z * z).sum((0, 2, 3))) if compute_stats else (z.new_empty(0), z.new_empty(0))
    out = torch.relu(z) if act == 1 else z
    return out.to(dtype).contiguous(memory_format=torch.channels_last), s, ss


def epilogue_backward_ref(grad_out, acc, scale, shift, bias, grad_sum, grad_sumsq, act):
    """Pure torch: (g_acc, grad_scale, grad_shift, grad_bias) from the raw conv output acc."""
    f = torch.float32 if acc.dtype != torch.float64 else torch.float64
    a = acc.to(f)
    z = a * scale.to(f).view(1, -1, 1, 1) + shift.to(f).view(1, -1, 1, 1)
    if bias is not None:
        z = z + bias.to(f)[:, :, None, None]
    g = grad_out.to(f)
    if act == 1:
        g = torch.where(z > 0, g, torch.zeros_like(g))
    if grad_sum is not None:
        g = g + grad_sum.to(f).view(1, -1, 1, 1)
    if grad_sumsq is not None:
        g = g + 2 * z * grad_sumsq.to(f).view(1, -1, 1, 1)
    return g * scale.to(f).view(1, -1, 1, 1), (g * a).sum((0, 2, 3)), g.sum((0, 2, 3)), g.sum((2, 3))
