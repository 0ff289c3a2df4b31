"""Multi-branch atrous conv as a tap-list implicit GEMM (docs/DESIGN.md, "The one primitive").

Kernels
  tap_conv_kernel   forward of every branch in one launch (concat or sum mode) with the fused
                    epilogue and per-tile batch statistics; with negated taps and transposed
                    weights it is also the dgrad (sum mode over the branches).
  region_conv_kernel  the concat-mode forward over an exact-region plan (kernels/plan.py): each
                    program BM pixels of one region of one branch, across the batch, times
                    exactly that region's valid taps (issued / valid MACs 1.027 at the standard
                    OS16 head, 1.006 at OS8). The tile kernel keeps sum mode, the dgrad and
                    symbolic sizes (torch.compile dynamic=True: the plan is built in Python).
  tap_wgrad_kernel  grad of the packed weights: per (branch, tap) a GEMM over the pixels whose
                    source is inside the image, split over pixels for parallelism.

Layouts
  input    [N, H, W, CIN_STRIDE] dense; branch b reads channels [in_off, in_off + K_b)
  weights  one flat buffer; branch b at w_off as [k*k][K_b][N_b] (tap = ky * k + kx)
  out      [N, H, W, OUT_STRIDE] dense; branch b writes [out_off, out_off + N_b) (0 in sum mode)
  meta     int32 rows, one per branch: _common.TapRow (w_off, step, k, k_b, in_off, n_b, out_off);
           tap (ky, kx) reads pixel (h + (ky - k//2) * step, w + (kx - k//2) * step); step =
           +dilation forward, -dilation dgrad

Each program owns a TH x TW tile of one image and BN output channels of one branch (concat) or
of the shared accumulator (sum mode). The taps that can touch the tile form a rectangle
[ky0, ky1] x [kx0, kx1] (tap_range, once per program and branch); the K loop runs over exactly
those taps x channel blocks of BK, a single flattened loop with computed bounds and no branch
inside, loads masked only where the tap leaves the image or the channel block is ragged.
"""
import functools
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import autotune_configs
from ._common import (INTERPRET, ITEM_ROW, META_COLS, RI_BRANCH, RI_H0, RI_H1, RI_KX0, RI_KX1,
                      RI_KY0, RI_KY1, RI_O0, RI_P0, RI_W0, RI_W1, ROW, TAP_IN_OFF, TAP_K, TAP_K_B, TAP_N_B,
                      TAP_OUT_OFF, TAP_STEP, TAP_W_OFF, WG_DX, WG_DY, WG_G_OFF, WG_N_E, WG_W_OFF, WG_X_OFF, TapRow,
                      WgradEntry, device_guard, dot_precision, empty_nchw_cl, epilogue_store, launch, max_tiles,
                      nhwc, pixel_tile, sm_count, stats_autotune, tap_range, tile_config)
from .bn_act import epilogue_ref
from .pack_cache import PACKED
from .worklog import log_work
from .plan import REGION_COLS, plan_work, region_plan


if INTERPRET:
    # The interpreter runs each program in numpy: one small config (autotuning would run every
    # config on every call) whose 4 x 4 tiles still give several tiles per test image.
    FWD_CONFIGS = [tile_config(4, 4, 16, 16, 16, 4, 1)]
    WGRAD_CONFIGS = [triton.Config({"BM": 16, "BN": 16, "BK": 16}, num_warps=4, num_stages=1)]
else:
    # Candidates for H100/H200 at the DESIGN cases (C = 2048, O_b = 256; 33 x 33 and 65 x 65).
    # 11 x 11 tiles cover 33 x 33 in 3 x 3 tiles at 121/128 rows; 13 x 9 covers 65 rows
    # exactly. Not timed yet: no GPU was available when these were written. Every config
    # builds without local memory (no spills) for sm_90 and sm_80 with Triton 3.6 and 3.9
    # (`make triton-check`); dropped for spilling there: 11x11/128x256/64 (117 LDL on sm_90),
    # 16x16/256x128/64 and 8x32/256x128/32 (3-7 LDL on sm_90).
    # Narrow column tiles (BN 32, 64) serve heads with few outputs per branch: the v2 head's 21
    # classes in a 128-column block are 6.1x the MACs they need; fit_column_tile keeps, per
    # launch, only the configs of the narrowest BN that covers its widest branch.
    FWD_CONFIGS = [
        tile_config(8, 16, 128, 128, 64, 8, 3),
        tile_config(8, 16, 128, 128, 32, 4, 4),
        tile_config(11, 11, 128, 128, 64, 8, 3),
        tile_config(13, 9, 128, 128, 64, 8, 3),
        tile_config(8, 8, 64, 128, 64, 4, 4),
        tile_config(11, 11, 128, 64, 64, 4, 3),
        tile_config(11, 11, 128, 32, 64, 4, 3),
    ]
    WGRAD_CONFIGS = [
        triton.Config({"BM": 128, "BN": 128, "BK": 32}, num_warps=8, num_stages=3),
        triton.Config({"BM": 128, "BN": 128, "BK": 64}, num_warps=8, num_stages=3),
        triton.Config({"BM": 64, "BN": 128, "BK": 64}, num_warps=4, num_stages=4),
        triton.Config({"BM": 128, "BN": 64, "BK": 64}, num_warps=4, num_stages=4),
        triton.Config({"BM": 128, "BN": 256, "BK": 32}, num_warps=8, num_stages=3),
    ]


# region_conv_kernel: the plan (kernels/plan.py) is built for one (BM, BN), so only BK, warps and
# stages are tuned. Not timed yet: no GPU was available when these were written. triton-check
# (sm_90, Triton 3.9) dropped: 4 warps on the 128 x 128 accumulator (150-170 LDL), BK = 32 with
# 8 warps (4 LDL in the train epilogue) and BK = 128 at 2 stages (not a >= 3-stage pipeline).
# Known: with Triton 3.6 the train epilogue with a per-sample bias (each row's image's bias, a
# 2-D load beside the statistics) spills 12 LDL on sm_90 in both configs (17 with the weight tiles by
# TMA); 16 warps, 64 x 128 and 64 x 256 tiles spill too there. Clean with 3.9 and on sm_80.
GPU_REGION_TILE = (128, 128)  # (BM, BN) on a GPU
REGION_BM, REGION_BN = (16, 16) if INTERPRET else GPU_REGION_TILE
if INTERPRET:
    REGION_CONFIGS = [triton.Config({"BK": 16}, num_warps=4, num_stages=1)]
else:
    REGION_CONFIGS = [
        triton.Config({"BK": 64}, num_warps=8, num_stages=3),
        triton.Config({"BK": 64}, num_warps=8, num_stages=4),
    ]
# One BK for all region configs: the TMA descriptor's block is fixed before the autotuner picks.
REGION_BK, = {c.kwargs["BK"] for c in REGION_CONFIGS}


@triton.jit
def tap_rect_gemm(acc, in_ptr, w_ptr, row, img, ph, pw, valid, ky0, ky1, kx0, kx1, H, W, CIN_STRIDE, ocols, omask,
                  BOUNDS: tl.constexpr, DOT_PREC: tl.constexpr, A_ALIGN: tl.constexpr, W_ALIGN: tl.constexpr,
                  BK: tl.constexpr, w_desc=None, o0=0, USE_TMA: tl.constexpr = False):
    """acc += the branch at meta row ``row`` (TapRow) over taps [ky0, ky1] x [kx0, kx1] for the
    pixels (img / H, ph, pw) of the program's rows (``valid``): one flattened loop over
    (tap, channel block of BK), no branch inside. BOUNDS: mask the taps' reads at the image edge
    (the tile kernel); without, every tap of the rectangle must read inside (a region's).

    USE_TMA: the weight tiles come from ``w_desc``, a tensor descriptor over the packed weights
    as rows of the branch's N_b columns (block [BK, BN], columns from ``o0``): one TMA copy per
    tile, out-of-range columns zero-filled by the copy engine. Rows past the tap's K_b belong to
    the next tap, not to the padding: the input tile is zero there (its channel mask), so those
    rows multiply zeros."""
    w_off = tl.multiple_of(tl.load(row + TAP_W_OFF), W_ALIGN)
    step = tl.load(row + TAP_STEP)
    k = tl.load(row + TAP_K)
    kb = tl.multiple_of(tl.load(row + TAP_K_B), A_ALIGN)
    in_off = tl.multiple_of(tl.load(row + TAP_IN_OFF), A_ALIGN)
    nb = tl.multiple_of(tl.load(row + TAP_N_B), W_ALIGN)
    half = k // 2
    nkx = kx1 - kx0 + 1
    n_cb = tl.cdiv(kb, BK)
    n_iter = (ky1 - ky0 + 1) * nkx * n_cb
    for it in range(0, n_iter):
        t = it // n_cb
        cb = it - t * n_cb
        ky = ky0 + t // nkx
        kx = kx0 + t % nkx
        sh = ph + (ky - half) * step
        sw = pw + (kx - half) * step
        m = valid
        if BOUNDS:
            m = m & (sh >= 0) & (sh < H) & (sw >= 0) & (sw < W)
        c = cb * BK + tl.arange(0, BK)
        cm = c < kb
        src = ((img + sh) * W + sw) * CIN_STRIDE + in_off
        a = tl.load(in_ptr + src[:, None] + c[None, :], mask=m[:, None] & cm[None, :], other=0.0)
        if USE_TMA:
            wt = w_desc.load([w_off // nb + (ky * k + kx) * kb + cb * BK, o0])
        else:
            wrow = w_off + ((ky * k + kx) * kb + c) * nb
            wt = tl.load(w_ptr + wrow[:, None] + ocols[None, :], mask=cm[:, None] & omask[None, :], other=0.0)
        acc = tl.dot(a, wt, acc, input_precision=DOT_PREC)
    return acc


def fit_column_tile(configs, named_args, **kwargs):
    """tap_conv_kernel's early_config_prune: the configs whose BN is the narrowest that covers the
    launch's widest branch (NMAX output channels), or the widest BN where none covers it: a
    program's column block then wastes less than half of itself (none at O_b = 256 or 21 -> 32)."""
    nmax = named_args["NMAX"]
    widths = sorted({c.kwargs["BN"] for c in configs})
    want = next((bn for bn in widths if bn >= nmax), widths[-1])
    return [c for c in configs if c.kwargs["BN"] == want]


@stats_autotune(FWD_CONFIGS, ["N", "H", "W", "CIN_STRIDE", "OUT_STRIDE", "NB", "NMAX", "SUM_MODE"],
                group=lambda c: c.kwargs["BN"], prune_configs_by={"early_config_prune": fit_column_tile})
@triton.jit
def tap_conv_kernel(in_ptr, w_ptr, meta_ptr, out_ptr, scale_ptr, shift_ptr, bias_ptr, psum_ptr, psumsq_ptr,
                    N, H, W, CIN_STRIDE, OUT_STRIDE, NB, NMAX,
                    SUM_MODE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                    STATS: tl.constexpr, DOT_PREC: tl.constexpr, A_ALIGN: tl.constexpr, W_ALIGN: tl.constexpr,
                    TH: tl.constexpr, TW: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # NMAX: the widest branch's output channels; not read here, it picks the column tile
    # (fit_column_tile). A_ALIGN / W_ALIGN: powers of two dividing every input-side (in_off, K_b, CIN_STRIDE) and
    # weight/output-side (w_off, N_b, out_off, OUT_STRIDE) value of the meta table. Values loaded
    # from memory carry no divisibility facts: without the hints the masks `c < K_b` and
    # `o < N_b` are not known constant over a 16-byte vector, the loads cannot become cp.async
    # and the K loop is not software-pipelined (sm_90 build, bf16, 128x128x64, 3 stages: 32 KB
    # of shared memory = one stage without them, 96 KB with them).
    pid_t = tl.program_id(0)
    pid_o = tl.program_id(1)
    n, h0, h1, w0, w1, ph, pw, valid = pixel_tile(pid_t, H, W, TH, TW, BM)

    # Which branch (concat) and which BN channels of it this program owns.
    if SUM_MODE:
        b_lo = 0
        b_hi = NB
        o0 = pid_o * BN
        n_sel = OUT_STRIDE
        out_off = 0
    else:
        b_lo = 0
        o0 = 0
        start = 0
        for b in range(NB):
            nb_b = tl.load(meta_ptr + b * ROW + TAP_N_B)
            nblk = tl.cdiv(nb_b, BN)
            hit = (pid_o >= start) & (pid_o < start + nblk)
            b_lo = tl.where(hit, b, b_lo)
            o0 = tl.where(hit, (pid_o - start) * BN, o0)
            start += nblk
        b_hi = b_lo + 1
        n_sel = tl.multiple_of(tl.load(meta_ptr + b_lo * ROW + TAP_N_B), W_ALIGN)
        out_off = tl.multiple_of(tl.load(meta_ptr + b_lo * ROW + TAP_OUT_OFF), W_ALIGN)

    ocols = tl.multiple_of(o0, BN) + tl.arange(0, BN)
    omask = ocols < n_sel
    img = n.to(tl.int64) * H
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for b in range(b_lo, b_hi):
        row = meta_ptr + b * ROW
        k = tl.load(row + TAP_K)
        step = tl.load(row + TAP_STEP)
        ky0, ky1 = tap_range(h0, h1, H, k, step)
        kx0, kx1 = tap_range(w0, w1, W, k, step)
        acc = tap_rect_gemm(acc, in_ptr, w_ptr, row, img, ph, pw, valid, ky0, ky1, kx0, kx1, H, W, CIN_STRIDE,
                            ocols, omask, True, DOT_PREC, A_ALIGN, W_ALIGN, BK)

    pix = (img + ph) * W + pw
    epilogue_store(acc, n, pid_t, pix, valid, out_off + ocols, omask, out_ptr, OUT_STRIDE, scale_ptr, shift_ptr,
                   bias_ptr, psum_ptr, psumsq_ptr, HAS_SCALE, HAS_BIAS, ACT, STATS, False)


@stats_autotune(REGION_CONFIGS, ["N", "H", "W", "CIN_STRIDE", "OUT_STRIDE", "NI"])
@triton.jit
def region_conv_kernel(in_ptr, w_ptr, w_desc, meta_ptr, item_ptr, out_ptr, scale_ptr, shift_ptr, bias_ptr, psum_ptr,
                       psumsq_ptr, N, H, W, CIN_STRIDE, OUT_STRIDE, NI,
                       HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STATS: tl.constexpr,
                       DOT_PREC: tl.constexpr, A_ALIGN: tl.constexpr, W_ALIGN: tl.constexpr, USE_TMA: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Concat mode over an exact-region plan (kernels/plan.py): program pid runs item pid, BM
    pixels of one region of one branch across the batch, over exactly the region's valid taps
    (no image-bounds masks: every tap of the rectangle reads inside the image). Rows as
    tap_conv_kernel's (TapRow); the alignment hints as there. USE_TMA: the weight tiles by TMA
    from ``w_desc`` (tap_rect_gemm; Hopper), else ``w_desc`` is None."""
    pid = tl.program_id(0)
    item = item_ptr + pid * ITEM_ROW
    b = tl.load(item + RI_BRANCH)
    h0 = tl.load(item + RI_H0)
    w0 = tl.load(item + RI_W0)
    rh = tl.load(item + RI_H1) - h0
    rw = tl.load(item + RI_W1) - w0
    p0 = tl.load(item + RI_P0)
    ky0 = tl.load(item + RI_KY0)
    ky1 = tl.load(item + RI_KY1)
    kx0 = tl.load(item + RI_KX0)
    kx1 = tl.load(item + RI_KX1)
    o0 = tl.load(item + RI_O0)
    row = meta_ptr + b * ROW
    nb = tl.multiple_of(tl.load(row + TAP_N_B), W_ALIGN)
    out_off = tl.multiple_of(tl.load(row + TAP_OUT_OFF), W_ALIGN)

    area = rh * rw
    q = p0 + tl.arange(0, BM)
    valid = q < N * area
    n = q // area
    r = q % area
    ph = h0 + r // rw
    pw = w0 + r % rw
    img = n.to(tl.int64) * H
    ocols = tl.multiple_of(o0, BN) + tl.arange(0, BN)
    omask = ocols < nb
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = tap_rect_gemm(acc, in_ptr, w_ptr, row, img, ph, pw, valid, ky0, ky1, kx0, kx1, H, W, CIN_STRIDE, ocols,
                        omask, False, DOT_PREC, A_ALIGN, W_ALIGN, BK, w_desc, o0, USE_TMA)

    pix = (img + ph) * W + pw
    epilogue_store(acc, n, pid, pix, valid, out_off + ocols, omask, out_ptr, OUT_STRIDE, scale_ptr, shift_ptr,
                   bias_ptr, psum_ptr, psumsq_ptr, HAS_SCALE, HAS_BIAS, ACT, STATS, True)


# No reset_to_zero: every config writes every element of `part` it is launched for (each split
# row, all (entry, C-block, O-block) programs), so benchmarked runs leave nothing behind.
@triton.autotune(configs=autotune_configs(WGRAD_CONFIGS), key=["N", "H", "W", "KC", "OMAX", "NE", "SPLIT"])
@triton.jit
def tap_wgrad_kernel(x_ptr, g_ptr, ent_ptr, part_ptr, N, H, W, CX, GO, KC, OMAX, NE, TOTAL, SPLIT,
                     DOT_PREC: tl.constexpr, X_ALIGN: tl.constexpr, G_ALIGN: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr):
    """part[split][w_off + c * N_e + o] = sum over this split's pixels p of the tap's valid region
    of x[p + tap][x_off + c] * g[p][g_off + o]; entry rows: _common.WgradEntry."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_cblk = tl.cdiv(KC, BM)
    n_oblk = tl.cdiv(OMAX, BN)
    e = pid // (n_cblk * n_oblk)
    rem = pid % (n_cblk * n_oblk)
    cblk = rem // n_oblk
    oblk = rem % n_oblk
    row = ent_ptr + e * ROW
    w_off = tl.multiple_of(tl.load(row + WG_W_OFF), G_ALIGN).to(tl.int64)
    dy = tl.load(row + WG_DY)
    dx = tl.load(row + WG_DX)
    no = tl.multiple_of(tl.load(row + WG_N_E), G_ALIGN)
    g_off = tl.multiple_of(tl.load(row + WG_G_OFF), G_ALIGN)
    x_off = tl.multiple_of(tl.load(row + WG_X_OFF), X_ALIGN)  # hints: see tap_conv_kernel
    # Output pixels whose source pixel (h + dy, w + dx) is inside the image.
    h_lo = tl.maximum(0, -dy)
    h_hi = tl.minimum(H, H - dy)
    w_lo = tl.maximum(0, -dx)
    w_hi = tl.minimum(W, W - dx)
    hv = tl.maximum(h_hi - h_lo, 0)
    wv = tl.maximum(w_hi - w_lo, 0)
    hw = hv * wv
    count = N * hw
    steps = tl.cdiv(tl.cdiv(count, BK), SPLIT)
    k_begin = split * steps * BK
    k_end = tl.minimum(count, k_begin + steps * BK)
    hw1 = tl.maximum(hw, 1)
    wv1 = tl.maximum(wv, 1)

    c = cblk * BM + tl.arange(0, BM)
    cm = c < KC
    o = oblk * BN + tl.arange(0, BN)
    om = o < no
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kk in range(k_begin, k_end, BK):
        idx = kk + tl.arange(0, BK)
        v = idx < k_end
        nn = idx // hw1
        r = idx % hw1
        h = h_lo + r // wv1
        w = w_lo + r % wv1
        pix = (nn.to(tl.int64) * H + h) * W + w
        src = pix + dy * W + dx
        xa = tl.load(x_ptr + src[None, :] * CX + x_off + c[:, None], mask=cm[:, None] & v[None, :], other=0.0)
        ga = tl.load(g_ptr + pix[:, None] * GO + g_off + o[None, :], mask=v[:, None] & om[None, :], other=0.0)
        acc = tl.dot(xa, ga, acc, input_precision=DOT_PREC)
    dst = part_ptr + split.to(tl.int64) * TOTAL + w_off + c[:, None] * no + o[None, :]
    tl.store(dst, acc, mask=cm[:, None] & om[None, :])


# --------------------------------------------------------------------------- host side

_META_CACHE = {}


def meta_tensor(rows, device, cols: int = META_COLS) -> torch.Tensor:
    """int32 [len(rows), cols] table of plan rows (_common.TapRow, ..., plan.RegionItem) on
    device. Eager calls reuse one tensor per (device, rows), so a CUDA-graph capture after a
    warm-up copies nothing from the host; under tracing it is a fresh constant of the graph."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    def table():
        padded = [tuple(int(v) for v in r) + (0,) * (cols - len(r)) for r in rows]
        return torch.tensor(padded, dtype=torch.int32, device=device).reshape(len(padded), cols)

    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return table()
    # A tuple of rows is a cached plan (plan.region_plan: the same object for the same launch,
    # thousands of rows): known by identity, so a call neither converts nor hashes it. A list
    # (a few rows built per call) is known by its values.
    key = (str(device), cols, id(rows)) if isinstance(rows, tuple) else (str(device), cols, tuple(map(tuple, rows)))
    entry = _META_CACHE.get(key)
    if entry is None or (isinstance(rows, tuple) and entry[0] is not rows):
        if len(_META_CACHE) > 512:
            _META_CACHE.clear()
        entry = _META_CACHE[key] = (rows, table())
    return entry[1]


def pow2_align(*values) -> int:
    """The largest power of two <= 16 dividing every value (alignment hint of the kernels)."""
    a = 16
    for v in values:
        while a > 1 and int(v) % a:
            a //= 2
    return a


def tap_conv(inp: torch.Tensor, w_packed: torch.Tensor, rows, out: torch.Tensor, n_oblocks, *, sum_mode: bool,
             scale=None, shift=None, bias=None, act: int = 0, stats: bool = False, prec: str = "ieee"):
    """Launches tap_conv_kernel. inp [N, H, W, Cin] and out [N, H, W, O] dense NHWC; rows as the
    module docstring; n_oblocks(BN) is the grid's channel-block count. Returns the partial
    (sum, sumsq) buffers [tiles, O] (fp32) when stats, else None."""
    N, H, W, cin = inp.shape
    o_stride = out.shape[3]
    log_work("tap_conv", lambda: {"dense_macs": sum(N * H * W * r.k * r.k * r.k_b * r.n_b for r in rows),
                                  "valid_macs": None, "issued_macs": None})
    psum = psumsq = None
    if stats:
        r = max_tiles(tap_conv_kernel.configs, N, H, W)
        psum = torch.zeros((r, o_stride), dtype=torch.float32, device=inp.device)
        psumsq = torch.zeros((r, o_stride), dtype=torch.float32, device=inp.device)
    if N * H * W == 0 or o_stride == 0:
        return (psum, psumsq) if stats else None
    meta = meta_tensor(rows, inp.device)
    # Unused pointer arguments get a never-written scratch tensor, not `out`: an output passed
    # twice would look like aliased mutated arguments to torch.compile's kernel analysis.
    dummy = inp.new_empty((1,), dtype=torch.float32)
    grid = lambda META: (N * triton.cdiv(H, META["TH"]) * triton.cdiv(W, META["TW"]), n_oblocks(META["BN"]))  # noqa
    with device_guard(inp):
        launch(tap_conv_kernel, grid, inp, w_packed, meta, out,
               scale if scale is not None else dummy, shift if shift is not None else dummy,
               bias if bias is not None else dummy, psum if stats else dummy, psumsq if stats else dummy,
               N, H, W, cin, o_stride, len(rows), max((r.n_b for r in rows), default=0),
               SUM_MODE=bool(sum_mode), HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, ACT=int(act),
               STATS=bool(stats), DOT_PREC=prec, A_ALIGN=pow2_align(cin, *(v for r in rows for v in (r.k_b, r.in_off))),
               W_ALIGN=pow2_align(o_stride, *(v for r in rows for v in (r.w_off, r.n_b, r.out_off))))
    return (psum, psumsq) if stats else None


def region_plan_of(n, h, w, rows) -> Optional[tuple]:
    """The exact-region plan (kernels/plan.py; cached there) of a concat-mode launch over rows
    (TapRow), or None where the sizes are symbolic (torch.compile dynamic shapes: the tile kernel,
    whose tiling needs no Python branch on the size, runs instead)."""
    if not all(isinstance(v, int) for v in (n, h, w)):
        return None
    return region_plan(n, h, w, tuple((r.k, r.step, r.k_b, r.n_b) for r in rows), REGION_BM, REGION_BN)


def region_conv(inp: torch.Tensor, w_packed: torch.Tensor, rows, items, out: torch.Tensor, *, scale=None,
                shift=None, bias=None, act: int = 0, stats: bool = False, prec: str = "ieee"):
    """Launches region_conv_kernel over the plan ``items`` (concat mode; arguments as tap_conv).
    Returns the partial (sum, sumsq) buffers [items, O] (fp32) when stats, else None."""
    N, H, W, cin = inp.shape
    o_stride = out.shape[3]
    def work():
        branches = tuple((r.k, r.step, r.k_b, r.n_b) for r in rows)
        return dict(plan_work(items, N, H, W, branches, REGION_BM, REGION_BN), geometry=(N, H, W, branches))

    log_work("region_conv", work)
    psum = psumsq = None
    if stats:
        psum = torch.zeros((max(len(items), 1), o_stride), dtype=torch.float32, device=inp.device)
        psumsq = torch.zeros((max(len(items), 1), o_stride), dtype=torch.float32, device=inp.device)
    if not items:
        return (psum, psumsq) if stats else None
    meta = meta_tensor(rows, inp.device)
    table = meta_tensor(items, inp.device, REGION_COLS)
    dummy = inp.new_empty((1,), dtype=torch.float32)  # see tap_conv
    w_desc = weight_descriptor(w_packed, rows) if use_tma(inp) else None
    with device_guard(inp):
        launch(region_conv_kernel, (len(items),), inp, w_packed, w_desc, meta, table, out,
               scale if scale is not None else dummy, shift if shift is not None else dummy,
               bias if bias is not None else dummy, psum if stats else dummy, psumsq if stats else dummy,
               N, H, W, cin, o_stride, len(items),
               HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, ACT=int(act), STATS=bool(stats),
               DOT_PREC=prec, A_ALIGN=pow2_align(cin, *(v for r in rows for v in (r.k_b, r.in_off))),
               W_ALIGN=pow2_align(o_stride, *(v for r in rows for v in (r.w_off, r.n_b, r.out_off))),
               USE_TMA=w_desc is not None, BM=REGION_BM, BN=REGION_BN)
    return (psum, psumsq) if stats else None


def use_tma(inp: torch.Tensor) -> bool:
    """Whether region_conv loads its weight tiles by TMA: ASPP_FUSED_TRITON_TMA (read per call)
    = "auto" (the default: on CUDA devices of compute capability >= 9, Hopper's copy engine),
    "1" (wherever a descriptor fits, also under the interpreter: the tests), "0" (never)."""
    mode = os.environ.get("ASPP_FUSED_TRITON_TMA", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError("ASPP_FUSED_TRITON_TMA must be 'auto', '0' or '1', got %r" % mode)
    if mode == "auto":
        return inp.is_cuda and not INTERPRET and torch.cuda.get_device_capability(inp.device)[0] >= 9
    return mode == "1"


def weight_descriptor(w_packed: torch.Tensor, rows):
    """A TMA descriptor over the packed weights as rows of N_b columns, block [BK, BN] (the
    configs' one BK), or None where one does not fit: branches of different widths, or a base
    or row that is not 16-byte aligned (TMA's rules; then the pointer loads run)."""
    widths = {r.n_b for r in rows}
    if len(widths) != 1:
        return None
    nb = widths.pop()
    # The base's alignment from its storage offset (the packed buffers are our own allocations,
    # 16-byte aligned at offset 0): data_ptr() does not exist under torch.compile's fake tensors.
    elem = w_packed.element_size()
    if nb == 0 or (nb * elem) % 16 or (w_packed.storage_offset() * elem) % 16 or any(r.w_off % nb for r in rows):
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    # A 2-D view and from_tensor, the form torch.compile's Triton wrapper rebuilds descriptors in.
    rows_total = w_packed.numel() // nb
    return TensorDescriptor.from_tensor(w_packed[:rows_total * nb].view(rows_total, nb), [REGION_BK, REGION_BN])


def tap_wgrad(x: torch.Tensor, g: torch.Tensor, entries, total: int, kc: int, omax: int, prec: str) -> torch.Tensor:
    """Launches tap_wgrad_kernel; returns the fp32 flat buffer [total] of packed weight grads.
    x [N, H, W, CX] and g [N, H, W, GO] dense NHWC of the same dtype; entries: rows
    (w_off, dy, dx, N_e, g_off, x_off), every element of the result written by exactly one."""
    N, H, W, cx = x.shape
    go = g.shape[3]
    if N * H * W == 0 or total == 0 or not entries:
        return torch.zeros((total,), dtype=torch.float32, device=x.device)
    # Split the pixel range when (branch, tap, C-block, O-block) programs cannot fill the GPU.
    progs = len(entries) * triton.cdiv(kc, 128 if not INTERPRET else 16) * triton.cdiv(omax, 128 if not INTERPRET
                                                                                          else 16)
    want = 2 * sm_count(x.device)
    max_split = max(1, triton.cdiv(N * H * W, 1024 if not INTERPRET else 16))
    split = int(min(max(1, triton.cdiv(want, progs)), max_split, 64))
    part = torch.empty((split, total), dtype=torch.float32, device=x.device)
    ent = meta_tensor(entries, x.device)
    grid = lambda META: (len(entries) * triton.cdiv(kc, META["BM"]) * triton.cdiv(omax, META["BN"]), split)  # noqa
    with device_guard(x):
        launch(tap_wgrad_kernel, grid, x, g, ent, part, N, H, W, cx, go, kc, omax, len(entries), total, split,
               DOT_PREC=prec, X_ALIGN=pow2_align(cx, *(e.x_off for e in entries)),
               G_ALIGN=pow2_align(go, *(v for e in entries for v in (e.w_off, e.n_e, e.g_off))))
    return part[0] if split == 1 else part.sum(0)


# --------------------------------------------------------------------------- the op's algebra


def _branch_layout(weights: Sequence[torch.Tensor], sum_mode: bool):
    """(O, out channel offset per branch)."""
    offs, off = [], 0
    for w in weights:
        offs.append(0 if sum_mode else off)
        off += w.shape[0]
    return (weights[0].shape[0] if sum_mode else off), offs


def _blocks(sizes):
    sizes = tuple(int(s) for s in sizes)
    return lambda bn: sum(triton.cdiv(s, bn) for s in sizes)


def pack_forward(weights: Sequence[torch.Tensor], dilations: Sequence[int], offs, dtype):
    """[O_b, C, k, k] -> one flat [tap][C][O_b] buffer in dtype, and its meta rows."""
    parts, rows, w_off = [], [], 0
    for w, d, off in zip(weights, dilations, offs):
        ob, c, k, _ = w.shape
        parts.append(w.to(dtype).permute(2, 3, 1, 0).reshape(-1))
        rows.append(TapRow(w_off=w_off, step=d, k=k, k_b=c, in_off=0, n_b=ob, out_off=off))
        w_off += w.numel()
    return torch.cat(parts), rows


def atrous_forward(x, weights, dilations, scale, shift, bias, sum_mode, act, compute_stats, out_dtype=None):
    """(out [N, O, H, W] channels_last, ch_sum, ch_sumsq); scale None = raw acc (no epilogue)."""
    N, C, H, W = x.shape
    O, offs = _branch_layout(weights, sum_mode)
    xn = nhwc(x)
    packed, rows = PACKED.get(("atrous", x.dtype, tuple(dilations), tuple(offs)), weights,
                              lambda: pack_forward(weights, dilations, offs, x.dtype))
    out, out_n = empty_nchw_cl(N, O, H, W, out_dtype or x.dtype, x.device)
    f32 = torch.float32
    epilogue = dict(scale=None if scale is None else scale.to(f32).contiguous(),
                    shift=None if scale is None else shift.to(f32).contiguous(),
                    bias=None if bias is None else bias.to(f32).contiguous(), act=act, stats=compute_stats,
                    prec=dot_precision(x.dtype))
    items = None if sum_mode else region_plan_of(N, H, W, rows)
    if items is not None:
        parts = region_conv(xn, packed, rows, items, out_n, **epilogue)
    else:
        n_oblocks = (lambda bn: triton.cdiv(O, bn)) if sum_mode else _blocks(w.shape[0] for w in weights)
        parts = tap_conv(xn, packed, rows, out_n, n_oblocks, sum_mode=sum_mode, **epilogue)
    if compute_stats:
        return out, parts[0].sum(0), parts[1].sum(0)
    e = x.new_empty((0,), dtype=f32)
    return out, e, e.clone()


def tap_gemm_op(x, weights, dilations, sum_mode, adjoint, out_dtype=None):
    """The schema's tap_gemm (csrc/aspp_fused.cpp): the raw forward GEMM (adjoint False), or its
    adjoint, the dgrad: the forward kernel in sum mode over the branches with negated taps and
    transposed weights, out[p, c] = sum_{b, tap, o} x[p - tap, off_b + o] W_b[o, c, tap]."""
    if not adjoint:
        return atrous_forward(x, weights, dilations, None, None, None, sum_mode, 0, False, out_dtype or x.dtype)[0]
    N, _, H, W = x.shape
    C, dtype = weights[0].shape[1], weights[0].dtype
    _, offs = _branch_layout(weights, sum_mode)
    out, out_n = empty_nchw_cl(N, C, H, W, out_dtype or x.dtype, x.device)
    if N * H * W == 0 or C == 0:
        return out.zero_()
    parts, rows, w_off = [], [], 0
    for w, d, off in zip(weights, dilations, offs):
        ob, _, k, _ = w.shape
        parts.append(w.to(dtype).permute(2, 3, 0, 1).reshape(-1))
        rows.append(TapRow(w_off=w_off, step=-d, k=k, k_b=ob, in_off=off, n_b=C, out_off=0))
        w_off += w.numel()
    tap_conv(nhwc(x.to(dtype)), torch.cat(parts), rows, out_n, lambda bn: triton.cdiv(C, bn), sum_mode=True,
             prec=dot_precision(dtype))
    return out


def tap_wgrad_op(x, g, weights, dilations, sum_mode):
    """The schema's tap_wgrad: grad_W_b[o, c, tap] = sum_{n, p} g[n, off_b + o, p] x[n, c, p + tap d_b]."""
    N, C, H, W = x.shape
    _, offs = _branch_layout(weights, sum_mode)
    entries, w_off = [], 0
    for w, d, off in zip(weights, dilations, offs):
        ob, _, k, _ = w.shape
        half = k // 2
        for t in range(k * k):
            entries.append(WgradEntry(w_off=w_off + t * C * ob, dy=(t // k - half) * d, dx=(t % k - half) * d, n_e=ob,
                                      g_off=off, x_off=0))
        w_off += w.numel()
    flat = tap_wgrad(nhwc(x), nhwc(g.to(x.dtype)), entries, w_off, C, max(w.shape[0] for w in weights),
                     dot_precision(x.dtype))
    grads, w_off = [], 0
    for w in weights:
        ob, _, k, _ = w.shape
        gw = flat[w_off:w_off + w.numel()].view(k, k, C, ob).permute(3, 2, 0, 1)
        # clone: a custom op's outputs may not alias each other (a view of `flat` could)
        grads.append(gw.to(w.dtype).clone(memory_format=torch.contiguous_format))
        w_off += w.numel()
    return grads


# --------------------------------------------------------------------------- reference


def atrous_conv_ref(x, weights, dilations, scale, shift, bias=None, sum_mode=False, act=0, compute_stats=False):
    """Pure-torch statement of what the kernels compute (schema of aspp_fused::atrous_conv),
    in the input's dtype with float accumulation as F.conv2d does it."""
    acc_dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    parts = []
    for w, d in zip(weights, dilations):
        k = w.shape[-1]
        parts.append(F.conv2d(x.to(acc_dt), w.to(acc_dt), padding=(k // 2) * d, dilation=d))
    acc = functools.reduce(torch.add, parts) if sum_mode else torch.cat(parts, 1)
    return epilogue_ref(acc, scale, shift, bias, act, compute_stats, x.dtype)
