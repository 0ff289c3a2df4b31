"""Separable atrous conv (DeepLab v3+): a depthwise prologue feeding the pointwise GEMM.

Kernels
  sep_conv_kernel  every branch in one launch (concat). Per BK channel block the program
                   computes the depthwise dilated 3x3 of its TH x TW pixel tile over the valid
                   taps only (tap_range; fp32, CUDA cores), the optional mid affine + act,
                   rounds to x's dtype and feeds tl.dot with the pointwise weight; the
                   depthwise output never touches memory. A plain 1x1 branch is the same code
                   with a single unit "depthwise" tap and no mid affine, so nothing branches
                   on the branch kind inside the K loop.
  dw_kernel        depthwise conv of several branches ("slots"), concat (forward recompute in
                   the backward: d and m) or summed (grad_x through the transposed depthwise,
                   negated taps), with an optional fp32 addend.
  dw_bwd_kernel    through the mid affine/act (g_d from g_m) plus per-pixel-block partials of
                   grad_mid_scale, grad_mid_shift and grad_dw.
The pointwise dgrad / wgrad reuse atrous_conv's tap_conv / tap_wgrad as 1x1 branches.
"""
from typing import List

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (DW_DW_OFF, DW_HAS_MID, DW_IN_COFF, DW_K, DW_MID_OFF, DW_OUT_COFF, DW_STEP, INTERPRET,
                      ROW, SEP_DW_OFF, SEP_HAS_MID, SEP_K, SEP_MID_OFF, SEP_N_B, SEP_OUT_OFF,
                      SEP_PW_OFF, SEP_STEP, DwSlot, SepRow, TapRow, WgradEntry, device_guard, dot_precision,
                      empty_nchw_cl, epilogue_store, launch, max_tiles, nhwc, pixel_tile, stats_autotune,
                      tap_range, tile_config)
from .bn_act import epilogue_ref
from .pack_cache import PACKED
from .atrous_conv import _blocks, meta_tensor, pow2_align, tap_conv, tap_wgrad
from .worklog import log_work


if INTERPRET:
    SEP_CONFIGS = [tile_config(4, 4, 16, 16, 16, 4, 1)]
    DW_TILE = dict(TH=4, TW=4, BM=16, BC=16)
    DWB_BP, DWB_BC = 16, 16
else:
    # A wide BN (256 = a whole DeepLab branch) computes the depthwise prologue once per tile;
    # narrower BN recomputes it O_b / BN times. Not timed yet (no GPU at hand when written).
    # Every config builds without spills for sm_90 and sm_80 with Triton 3.9 and 3.6
    # (`make triton-check`); dropped for spilling: 128 x 256 tiles (the depthwise block beside a
    # 128-register accumulator: 20-60 LDL on both archs), 64 x 128 with 4 warps (sm_80, 3.6).
    # The pointwise weights are cp.async-pipelined, 3 buffers on sm_90 (see sep_conv_kernel).
    SEP_CONFIGS = [
        tile_config(8, 8, 64, 256, 32, 8, 3),
        tile_config(8, 16, 128, 128, 32, 8, 3),
        tile_config(11, 11, 128, 128, 32, 8, 3),
    ]
    DW_TILE = dict(TH=8, TW=16, BM=128, BC=32)
    DWB_BP, DWB_BC = 64, 64


@stats_autotune(SEP_CONFIGS, ["N", "H", "W", "C", "OUT_STRIDE", "NB"])
@triton.jit
def sep_conv_kernel(x_ptr, dw_ptr, mid_ptr, pw_ptr, meta_ptr, out_ptr, scale_ptr, shift_ptr, bias_ptr, psum_ptr,
                    psumsq_ptr, N, H, W, C, OUT_STRIDE, NB,
                    MID_ACT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                    STATS: tl.constexpr, DOT_PREC: tl.constexpr, W_ALIGN: tl.constexpr, D_ALIGN: tl.constexpr,
                    TH: tl.constexpr, TW: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """meta rows: _common.SepRow (pw_off, step, k, n_b, out_off, has_mid, dw_off, mid_off); dw [k*k][C] fp32,
    mid [scale C | shift C] fp32 (ones / zeros when absent), pw [C][O_b] in x's dtype.
    W_ALIGN / D_ALIGN: divisibility hints of (pw_off, O_b, out_off) / (dw_off, mid_off), see
    atrous_conv.tap_conv_kernel (without them the masked weight loads are not pipelined)."""
    pid_t = tl.program_id(0)
    pid_o = tl.program_id(1)
    n, h0, h1, w0, w1, ph, pw, valid = pixel_tile(pid_t, H, W, TH, TW, BM)
    b_sel = 0
    o0 = 0
    start = 0
    for b in range(NB):
        nblk = tl.cdiv(tl.load(meta_ptr + b * ROW + SEP_N_B), BN)
        hit = (pid_o >= start) & (pid_o < start + nblk)
        b_sel = tl.where(hit, b, b_sel)
        o0 = tl.where(hit, (pid_o - start) * BN, o0)
        start += nblk
    row = meta_ptr + b_sel * ROW
    pw_off = tl.multiple_of(tl.load(row + SEP_PW_OFF), W_ALIGN)
    step = tl.load(row + SEP_STEP)
    k = tl.load(row + SEP_K)
    nb = tl.multiple_of(tl.load(row + SEP_N_B), W_ALIGN)
    out_off = tl.multiple_of(tl.load(row + SEP_OUT_OFF), W_ALIGN)
    has_mid = tl.load(row + SEP_HAS_MID)
    dw_off = tl.multiple_of(tl.load(row + SEP_DW_OFF), D_ALIGN)
    mid_off = tl.multiple_of(tl.load(row + SEP_MID_OFF), D_ALIGN)
    half = k // 2
    ky0, ky1 = tap_range(h0, h1, H, k, step)
    kx0, kx1 = tap_range(w0, w1, W, k, step)
    img = n.to(tl.int64) * H

    ocols = tl.multiple_of(o0, BN) + tl.arange(0, BN)
    omask = ocols < nb
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    nky = ky1 - ky0 + 1
    nkx = kx1 - kx0 + 1
    # The channel-block loop is the innermost loop (the depthwise taps are unrolled, k <= 3,
    # each behind a branch on the tile's tap range), so Triton software-pipelines it: the
    # pointwise weight tiles arrive by cp.async into num_stages buffers (sm_90; num_stages - 1
    # on sm_80) while the depthwise of the next block runs. With the taps as a runtime loop
    # inside, the sm_90 build had one buffer and no cp.async (tools/triton_check.py checks).
    for cb in tl.range(0, tl.cdiv(C, BK)):
        c = cb * BK + tl.arange(0, BK)
        cm = c < C
        d = tl.zeros((BM, BK), dtype=tl.float32)
        for t in tl.static_range(9):
            if (t // 3 < nky) & (t % 3 < nkx):
                ky = ky0 + t // 3
                kx = kx0 + t % 3
                sh = ph + (ky - half) * step
                sw = pw + (kx - half) * step
                m = valid & (sh >= 0) & (sh < H) & (sw >= 0) & (sw < W)
                src = ((img + sh) * W + sw) * C
                xv = tl.load(x_ptr + src[:, None] + c[None, :], mask=m[:, None] & cm[None, :], other=0.0)
                wv = tl.load(dw_ptr + dw_off + (ky * k + kx) * C + c, mask=cm, other=0.0)
                d += xv.to(tl.float32) * wv[None, :]
        ms = tl.load(mid_ptr + mid_off + c, mask=cm, other=1.0)
        msh = tl.load(mid_ptr + mid_off + C + c, mask=cm, other=0.0)
        v = d * ms[None, :] + msh[None, :]
        if MID_ACT == 1:
            v = tl.where((has_mid != 0) & (v < 0.0), 0.0, v)
        mv = v.to(x_ptr.dtype.element_ty)  # the schema's rounding of m to x.dtype
        wt = tl.load(pw_ptr + pw_off + c[:, None] * nb + ocols[None, :], mask=cm[:, None] & omask[None, :],
                     other=0.0)
        acc = tl.dot(mv, wt, acc, input_precision=DOT_PREC)

    pix = (img + ph) * W + pw
    epilogue_store(acc, n, pid_t, pix, valid, out_off + ocols, omask, out_ptr, OUT_STRIDE, scale_ptr, shift_ptr,
                   bias_ptr, psum_ptr, psumsq_ptr, HAS_SCALE, HAS_BIAS, ACT, STATS, False)


@triton.jit
def dw_kernel(in_ptr, dw_ptr, mid_ptr, meta_ptr, d_ptr, m_ptr, add_ptr, N, H, W, C, IN_STRIDE, OUT_STRIDE, NS,
              SUM_MODE: tl.constexpr, STORE_D: tl.constexpr, STORE_M: tl.constexpr, HAS_ADD: tl.constexpr,
              MID_ACT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    """d[p][out_coff + c] = (add[p][c] +) sum_{slots, valid taps} in[p + tap][in_coff + c] * dw[tap][c];
    m = mid_act(d * ms + msh) rounded to m's dtype. meta rows: _common.DwSlot."""
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    n, h0, h1, w0, w1, ph, pw, valid = pixel_tile(pid_t, H, W, TH, TW, BM)
    c = pid_c * BC + tl.arange(0, BC)
    cm = c < C
    if SUM_MODE:
        s_lo = 0
        s_hi = NS
        out_coff = 0
    else:
        s_lo = pid_s
        s_hi = pid_s + 1
        out_coff = tl.load(meta_ptr + pid_s * ROW + DW_OUT_COFF)
    img = n.to(tl.int64) * H
    d = tl.zeros((BM, BC), dtype=tl.float32)
    for s in range(s_lo, s_hi):
        row = meta_ptr + s * ROW
        in_coff = tl.load(row + DW_IN_COFF)
        dw_off = tl.load(row + DW_DW_OFF)
        step = tl.load(row + DW_STEP)
        k = tl.load(row + DW_K)
        half = k // 2
        ky0, ky1 = tap_range(h0, h1, H, k, step)
        kx0, kx1 = tap_range(w0, w1, W, k, step)
        nkx = kx1 - kx0 + 1
        for t in range(0, (ky1 - ky0 + 1) * nkx):
            ky = ky0 + t // nkx
            kx = kx0 + t % nkx
            sh = ph + (ky - half) * step
            sw = pw + (kx - half) * step
            m = valid & (sh >= 0) & (sh < H) & (sw >= 0) & (sw < W)
            src = ((img + sh) * W + sw) * IN_STRIDE + in_coff
            xv = tl.load(in_ptr + src[:, None] + c[None, :], mask=m[:, None] & cm[None, :], other=0.0)
            wv = tl.load(dw_ptr + dw_off + (ky * k + kx) * C + c, mask=cm, other=0.0)
            d += xv.to(tl.float32) * wv[None, :]
    pix = (img + ph) * W + pw
    m2 = valid[:, None] & cm[None, :]
    dst = pix[:, None] * OUT_STRIDE + out_coff + c[None, :]
    if HAS_ADD:
        d += tl.load(add_ptr + dst, mask=m2, other=0.0)
    if STORE_D:
        tl.store(d_ptr + dst, d.to(d_ptr.dtype.element_ty), mask=m2)
    if STORE_M:
        mid_off = tl.load(meta_ptr + pid_s * ROW + DW_MID_OFF)
        has_mid = tl.load(meta_ptr + pid_s * ROW + DW_HAS_MID)
        ms = tl.load(mid_ptr + mid_off + c, mask=cm, other=1.0)
        msh = tl.load(mid_ptr + mid_off + C + c, mask=cm, other=0.0)
        v = d * ms[None, :] + msh[None, :]
        if MID_ACT == 1:
            v = tl.where((has_mid != 0) & (v < 0.0), 0.0, v)
        tl.store(m_ptr + dst, v.to(m_ptr.dtype.element_ty), mask=m2)


@triton.jit
def dw_bwd_kernel(g_ptr, d_ptr, x_ptr, dw_meta_ptr, mid_ptr, pms_ptr, pmsh_ptr, pdw_ptr, P, H, W, C, J,
                  MID_ACT: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
    """Slot j: g (= g_m, [P, J*C] fp32) -> g_d in place, through the mid affine/act:
    g_pre = g_m * act'(d * ms + msh), g_d = g_pre * ms; partial rows (this pixel block) of
    grad_ms = sum g_pre * d, grad_msh = sum g_pre and grad_dw[tap] = sum g_d * x[p + tap]."""
    pid0 = tl.program_id(0)
    pid1 = tl.program_id(1)
    j = tl.program_id(2)
    row = dw_meta_ptr + j * ROW
    step = tl.load(row + DW_STEP)
    mid_off = tl.load(row + DW_MID_OFF)
    has_mid = tl.load(row + DW_HAS_MID)
    p = pid0 * BP + tl.arange(0, BP)
    pm = p < P
    c = pid1 * BC + tl.arange(0, BC)
    cm = c < C
    m2 = pm[:, None] & cm[None, :]
    p64 = p.to(tl.int64)
    offs = p64[:, None] * (J * C) + j * C + c[None, :]
    gm = tl.load(g_ptr + offs, mask=m2, other=0.0)
    dv = tl.load(d_ptr + offs, mask=m2, other=0.0)
    ms = tl.load(mid_ptr + mid_off + c, mask=cm, other=1.0)
    msh = tl.load(mid_ptr + mid_off + C + c, mask=cm, other=0.0)
    gpre = gm
    if MID_ACT == 1:
        pre = dv * ms[None, :] + msh[None, :]
        gpre = tl.where((has_mid == 0) | (pre > 0.0), gm, 0.0)  # relu' = (pre > 0), as the CPU kernel
    gd = gpre * ms[None, :]
    tl.store(g_ptr + offs, gd, mask=m2)
    prow = (pid0.to(tl.int64) * J + j) * C
    tl.store(pms_ptr + prow + c, tl.sum(gpre * dv, axis=0), mask=cm)
    tl.store(pmsh_ptr + prow + c, tl.sum(gpre, axis=0), mask=cm)
    hw = H * W
    nn = p // hw
    r = p % hw
    h = r // W
    w = r % W
    for tap in tl.static_range(9):
        sh = h + (tap // 3 - 1) * step
        sw = w + (tap % 3 - 1) * step
        mt = pm & (sh >= 0) & (sh < H) & (sw >= 0) & (sw < W)
        src = ((nn.to(tl.int64) * H + sh) * W + sw) * C
        xv = tl.load(x_ptr + src[:, None] + c[None, :], mask=mt[:, None] & cm[None, :], other=0.0).to(tl.float32)
        tl.store(pdw_ptr + (prow * 9) + tap * C + c, tl.sum(gd * xv, axis=0), mask=cm)


# --------------------------------------------------------------------------- host side


def _present(t) -> bool:
    return not (t.dim() == 1 and t.numel() == 0)


def _pack(x, dw_weights, dilations, mid_scales, mid_shifts, pw_weights):
    """Flat buffers + meta rows of the sep_conv kernel (see its docstring)."""
    C = x.shape[1]
    f32, dev = torch.float32, x.device
    dws, mids, pws, rows = [], [], [], []
    dw_off = pw_off = out_off = 0
    for b, (dw, d, ms, msh, pw) in enumerate(zip(dw_weights, dilations, mid_scales, mid_shifts, pw_weights)):
        ob = pw.shape[0]
        has_dw, has_mid = _present(dw), _present(ms)
        if has_dw:
            dws.append(dw.to(f32).reshape(C, 9).t().reshape(-1))
        else:
            dws.append(torch.ones(C, dtype=f32, device=dev))  # a plain branch: one unit tap
        if has_mid:
            mids += [ms.to(f32).reshape(-1), msh.to(f32).reshape(-1)]
        else:
            mids += [torch.ones(C, dtype=f32, device=dev), torch.zeros(C, dtype=f32, device=dev)]
        pws.append(pw.to(x.dtype).reshape(ob, C).t().reshape(-1))
        k = 3 if has_dw else 1
        rows.append(SepRow(pw_off=pw_off, step=d, k=k, n_b=ob, out_off=out_off, has_mid=int(has_mid), dw_off=dw_off,
                           mid_off=2 * C * b))
        dw_off += k * k * C
        pw_off += C * ob
        out_off += ob
    return torch.cat(dws), torch.cat(mids), torch.cat(pws), rows, out_off


def separable_forward(x, dw_weights, dilations, mid_scales, mid_shifts, mid_act, pw_weights, scale, shift, bias,
                      act, compute_stats, out_dtype=None):
    """(out, ch_sum, ch_sumsq); scale None = raw acc (no epilogue), e.g. for the backward."""
    N, C, H, W = x.shape
    f32 = torch.float32
    dwb, midb, pwb, rows, O = PACKED.get(
        ("separable", x.dtype, C, str(x.device), tuple(dilations), tuple(_present(t) for t in dw_weights),
         tuple(_present(t) for t in mid_scales)),
        [t for t in list(dw_weights) + list(mid_scales) + list(mid_shifts) if _present(t)] + list(pw_weights),
        lambda: _pack(x, dw_weights, dilations, mid_scales, mid_shifts, pw_weights))
    # The pointwise GEMM's MACs (the depthwise prologue runs on CUDA cores, taps from the tile).
    log_work("sep_conv", lambda: {"dense_macs": sum(N * H * W * C * r.n_b for r in rows), "valid_macs": None,
                                  "issued_macs": None})
    out, out_n = empty_nchw_cl(N, O, H, W, out_dtype or x.dtype, x.device)
    psum = psumsq = None
    if compute_stats:
        r = max_tiles(sep_conv_kernel.configs, N, H, W)
        psum = torch.zeros((r, O), dtype=f32, device=x.device)
        psumsq = torch.zeros((r, O), dtype=f32, device=x.device)
    if N * H * W > 0 and O > 0:
        xn = nhwc(x)
        meta = meta_tensor(rows, x.device)
        has_scale = scale is not None
        dummy = x.new_empty((1,), dtype=f32)  # unused pointers (never `out`: see atrous_conv.tap_conv)
        s = scale.to(f32).contiguous() if has_scale else dummy
        t = shift.to(f32).contiguous() if has_scale else dummy
        bb = bias.to(f32).contiguous() if bias is not None else dummy
        n_oblocks = _blocks(w.shape[0] for w in pw_weights)
        grid = lambda META: (N * triton.cdiv(H, META["TH"]) * triton.cdiv(W, META["TW"]), n_oblocks(META["BN"]))  # noqa
        with device_guard(x):
            launch(sep_conv_kernel, grid, xn, dwb, midb, pwb, meta, out_n, s, t, bb,
                   psum if compute_stats else dummy, psumsq if compute_stats else dummy, N, H, W, C, O, len(rows),
                   MID_ACT=int(mid_act), HAS_SCALE=has_scale, HAS_BIAS=bias is not None, ACT=int(act),
                   STATS=bool(compute_stats), DOT_PREC=dot_precision(x.dtype),
                   W_ALIGN=pow2_align(O, *(v for r in rows for v in (r.pw_off, r.n_b, r.out_off))),
                   D_ALIGN=pow2_align(C, *(v for r in rows for v in (r.dw_off, r.mid_off))))
    if compute_stats:
        return out, psum.sum(0), psumsq.sum(0)
    e = x.new_empty((0,), dtype=f32)
    return out, e, e.clone()


def depthwise(inp, dwb, midb, rows, out_d, out_m, add, *, sum_mode, mid_act, C):
    """Launches dw_kernel over [N, H, W, *] dense NHWC buffers (see its docstring)."""
    N, H, W, in_stride = inp.shape
    out = out_d if out_d is not None else out_m
    if N * H * W == 0 or C == 0:
        return
    tile = DW_TILE
    grid = (N * triton.cdiv(H, tile["TH"]) * triton.cdiv(W, tile["TW"]), triton.cdiv(C, tile["BC"]),
            1 if sum_mode else len(rows))
    meta = meta_tensor(rows, inp.device)
    dummy = inp.new_empty((1,), dtype=torch.float32)  # unused pointers (see atrous_conv.tap_conv)
    with device_guard(inp):
        launch(dw_kernel, grid, inp, dwb, midb, meta, out_d if out_d is not None else dummy,
               out_m if out_m is not None else dummy, add if add is not None else dummy, N, H, W, C, in_stride,
               out.shape[3], len(rows), SUM_MODE=bool(sum_mode), STORE_D=out_d is not None,
               STORE_M=out_m is not None, HAS_ADD=add is not None, MID_ACT=int(mid_act), **tile)


def separable_gemm_op(x, dw_weights, dilations, mid_scales, mid_shifts, mid_act, pw_weights, out_dtype=None):
    """The schema's separable_gemm (csrc/aspp_fused.cpp): separable_conv's acc, raw."""
    return separable_forward(x, dw_weights, dilations, mid_scales, mid_shifts, mid_act, pw_weights, None, None, None,
                             0, False, out_dtype or x.dtype)[0]


def separable_gemm_backward_op(g, x, dw_weights, dilations, mid_scales, mid_shifts, mid_act, pw_weights, mask):
    """The schema's separable_gemm_backward: (grad_x, grad_dw, grad_mid_scales, grad_mid_shifts, grad_pw)
    from g, the gradient of separable_gemm's output."""
    need_in, need_w = bool(mask[0]), bool(mask[1])
    N, C, H, W = x.shape
    f32, dev = torch.float32, x.device
    nb = len(pw_weights)
    offs = [sum(w.shape[0] for w in pw_weights[:b]) for b in range(nb)]
    absent = x.new_empty((0,))
    grad_x = x.new_empty((0,))
    g_dw: List[torch.Tensor] = []
    g_ms: List[torch.Tensor] = []
    g_msh: List[torch.Tensor] = []
    g_pw: List[torch.Tensor] = []
    if need_in:
        grad_x, gx_n = empty_nchw_cl(N, C, H, W, x.dtype, dev)
    has_dw = [_present(t) for t in dw_weights]
    has_mid = [_present(t) for t in mid_scales]
    if N * H * W == 0 or not (need_in or need_w):
        if need_in:
            grad_x.zero_()
        if need_w:
            g_dw = [torch.zeros_like(t) if p else absent.clone() for t, p in zip(dw_weights, has_dw)]
            g_ms = [torch.zeros_like(t) if p else absent.clone() for t, p in zip(mid_scales, has_mid)]
            g_msh = [torch.zeros_like(t) if p else absent.clone() for t, p in zip(mid_shifts, has_mid)]
            g_pw = [torch.zeros_like(t, memory_format=torch.contiguous_format) for t in pw_weights]
        return grad_x, g_dw, g_ms, g_msh, g_pw
    g_acc = nhwc(g.to(x.dtype))  # [N, H, W, O] dense, read by the 1x1 GEMMs

    prec = dot_precision(x.dtype)
    xn = nhwc(x)
    dw_idx = [b for b in range(nb) if has_dw[b]]
    plain_idx = [b for b in range(nb) if not has_dw[b]]
    J = len(dw_idx)
    # Depthwise branch j: dw [9][C] at j*9*C, mid rows at j*2*C; the slot tables of dw_kernel.
    if J:
        dwb = torch.cat([dw_weights[b].to(f32).reshape(C, 9).t().reshape(-1) for b in dw_idx])
        midb = torch.cat([torch.cat([mid_scales[b].to(f32).reshape(-1), mid_shifts[b].to(f32).reshape(-1)])
                          if has_mid[b] else torch.cat([torch.ones(C, dtype=f32, device=dev),
                                                        torch.zeros(C, dtype=f32, device=dev)]) for b in dw_idx])
        fwd_slots = [DwSlot(in_coff=0, dw_off=9 * C * j, step=dilations[b], k=3, mid_off=2 * C * j, has_mid=int(has_mid[b]),
                            out_coff=C * j) for j, b in enumerate(dw_idx)]
        # d (fp32, before the mid affine) and m (the rounded GEMM operand) of every depthwise branch.
        D = torch.empty((N, H, W, J * C), dtype=f32, device=dev)
        M = torch.empty((N, H, W, J * C), dtype=x.dtype, device=dev)
        depthwise(xn, dwb, midb, fwd_slots, D, M, None, sum_mode=False, mid_act=mid_act, C=C)
        # g_m of every depthwise branch = g_acc_b @ pw_b^T: 1x1 branches of tap_conv, concat.
        GM = torch.empty((N, H, W, J * C), dtype=f32, device=dev)
        pw_t, rows, w_off = [], [], 0
        for j, b in enumerate(dw_idx):
            ob = pw_weights[b].shape[0]
            pw_t.append(pw_weights[b].to(x.dtype).reshape(-1))  # [O_b][C] = [tap][K][N] transposed
            rows.append(TapRow(w_off=w_off, step=1, k=1, k_b=ob, in_off=offs[b], n_b=C, out_off=j * C))
            w_off += ob * C
        tap_conv(g_acc, torch.cat(pw_t), rows, GM, _blocks([C] * J), sum_mode=False, prec=prec)
        # Through the mid affine/act (g_d in place of g_m) + partials of the dw and mid grads.
        rows_p = triton.cdiv(N * H * W, DWB_BP)
        pms = torch.empty((rows_p, J, C), dtype=f32, device=dev)
        pmsh = torch.empty((rows_p, J, C), dtype=f32, device=dev)
        pdw = torch.empty((rows_p, J, 9, C), dtype=f32, device=dev)
        if C > 0:
            slot_meta = meta_tensor(fwd_slots, dev)
            with device_guard(x):
                launch(dw_bwd_kernel, (rows_p, triton.cdiv(C, DWB_BC), J), GM, D, xn, slot_meta, midb, pms, pmsh,
                       pdw, N * H * W, H, W, C, J, MID_ACT=int(mid_act), BP=DWB_BP, BC=DWB_BC)

    if need_in:
        add = None
        if plain_idx:
            # Plain branches: grad_x += g_acc_b @ pw_b^T, summed over them in one sum-mode launch.
            target = torch.empty((N, H, W, C), dtype=f32, device=dev) if J else gx_n
            pw_t, rows, w_off = [], [], 0
            for b in plain_idx:
                ob = pw_weights[b].shape[0]
                pw_t.append(pw_weights[b].to(x.dtype).reshape(-1))
                rows.append(TapRow(w_off=w_off, step=1, k=1, k_b=ob, in_off=offs[b], n_b=C, out_off=0))
                w_off += ob * C
            tap_conv(g_acc, torch.cat(pw_t), rows, target, lambda bn: triton.cdiv(C, bn), sum_mode=True, prec=prec)
            add = target if J else None
        if J:
            # Depthwise branches: the transposed depthwise (negated taps) of every g_d, summed.
            bwd_slots = [DwSlot(in_coff=C * j, dw_off=9 * C * j, step=-dilations[b], k=3, mid_off=0, has_mid=0, out_coff=0)
                         for j, b in enumerate(dw_idx)]
            depthwise(GM, dwb, midb, bwd_slots, gx_n, None, add, sum_mode=True, mid_act=0, C=C)

    if need_w:
        # grad_pw[c][o] = sum_p m[p][c] g_acc[p][off_b + o]: 1x1 entries of tap_wgrad, over x for the
        # plain branches and over m for the depthwise ones.
        gpw = [None] * nb
        for idx, src, slot in ((plain_idx, xn, None), (dw_idx, M if J else None, True)):
            if not idx:
                continue
            entries, w_off = [], 0
            for j, b in enumerate(idx):
                ob = pw_weights[b].shape[0]
                entries.append(WgradEntry(w_off=w_off, dy=0, dx=0, n_e=ob, g_off=offs[b], x_off=C * j if slot else 0))
                w_off += C * ob
            flat = tap_wgrad(src, g_acc, entries, w_off, C, max(pw_weights[b].shape[0] for b in idx), prec)
            w_off = 0
            for b in idx:
                ob = pw_weights[b].shape[0]
                # (a custom op's outputs may not alias each other: always a fresh tensor, in the
                # weight's standard strides as the fake kernel gives them)
                gpw[b] = flat[w_off:w_off + C * ob].view(C, ob).t().to(pw_weights[b].dtype).clone(
                    memory_format=torch.contiguous_format).reshape(pw_weights[b].shape)
                w_off += C * ob
        g_pw = gpw
        if J:
            s_ms, s_msh, s_dw = pms.sum(0), pmsh.sum(0), pdw.sum(0)
        for b in range(nb):
            if has_dw[b]:
                j = dw_idx.index(b)
                g_dw.append(s_dw[j].t().to(dw_weights[b].dtype).clone(memory_format=torch.contiguous_format).reshape(
                    C, 1, 3, 3))
            else:
                g_dw.append(absent.clone())
            if has_mid[b]:
                g_ms.append(s_ms[j].to(mid_scales[b].dtype).clone())
                g_msh.append(s_msh[j].to(mid_shifts[b].dtype).clone())
            else:
                g_ms.append(absent.clone())
                g_msh.append(absent.clone())
    return grad_x, g_dw, g_ms, g_msh, g_pw


# --------------------------------------------------------------------------- reference


def depthwise_ref(x, dw, dilation):
    """The depthwise dilated 3x3 in float (x [N, C, H, W], dw [C, 1, 3, 3])."""
    f = torch.float64 if x.dtype == torch.float64 else torch.float32
    return F.conv2d(x.to(f), dw.to(f), padding=dilation, dilation=dilation, groups=x.shape[1])


def separable_conv_ref(x, dw_weights, dilations, mid_scales, mid_shifts, mid_act, pw_weights, scale, shift,
                       bias=None, act=0, compute_stats=False):
    """Pure-torch statement of aspp_fused::separable_conv (None = absent), as the kernels compute it:
    depthwise + mid in float, m rounded to x.dtype, pointwise GEMM in float, then the epilogue."""
    f = torch.float64 if x.dtype == torch.float64 else torch.float32
    C = x.shape[1]
    parts = []
    for dw, d, ms, msh, pw in zip(dw_weights, dilations, mid_scales, mid_shifts, pw_weights):
        if dw is None:
            m = x
        else:
            v = depthwise_ref(x, dw, d)
            if ms is not None:
                v = v * ms.to(f).view(1, C, 1, 1) + msh.to(f).view(1, C, 1, 1)
                if mid_act == 1:
                    v = torch.relu(v)
            m = v.to(x.dtype)
        parts.append(F.conv2d(m.to(f), pw.to(f)))
    return epilogue_ref(torch.cat(parts, 1), scale, shift, bias, act, compute_stats, x.dtype)
