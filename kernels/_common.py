"""Shared pieces of the Triton kernels: interpreter detection, launch helper, tap ranges, epilogue.

TRITON_INTERPRET is read once, when this package is imported, because Triton itself reads it
when a kernel is defined (``@triton.jit`` returns an interpreted function under it).
"""
import contextlib
import os
import threading
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .plan import REGION_COLS, RegionItem

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_configs(configs, group=None):
    """ASPP_FUSED_TRITON_AUTOTUNE=0 keeps the first config only (the first of each ``group(config)``
    when a kernel prunes its configs by that key per launch, e.g. the column tile): no
    autotuning. A GPU check sets it to spend its minutes on checks instead of on compiling every
    candidate (read at import)."""
    if os.environ.get("ASPP_FUSED_TRITON_AUTOTUNE", "1") == "0":
        if group is None:
            return list(configs[:1])
        firsts = {}
        for c in configs:
            firsts.setdefault(group(c), c)
        return list(firsts.values())
    return list(configs)

# Layouts shared by all kernels: activations are [N, H, W, C] row-major (NHWC) views; a pixel
# index is ((n * H + h) * W + w) and is promoted to int64 before it is multiplied by a channel
# stride, so N * H * W * C may pass 2^31.

# ----------------------------------------------------------------------------- plan rows
# Every kernel reads its branches / taps from a table of int32 rows (``meta_tensor``), one row
# per work item, META_COLS wide. Each table's columns are named once, here: the host builds rows
# as these NamedTuples (by field name), the kernels load columns through the constexpr indices
# below (``tl.load(row + TAP_N_B)``), both derived from the same field order.

META_COLS = 8
ROW = tl.constexpr(META_COLS)  # a row's stride in the table, for the kernels


class TapRow(NamedTuple):
    """tap_conv_kernel, one per branch: tap (ky, kx) reads pixel (h + (ky - k//2) * step,
    w + (kx - k//2) * step) at input channels [in_off, in_off + k_b) and multiplies the weights
    [k*k][k_b][n_b] at w_off; the branch writes output channels [out_off, out_off + n_b).
    step = +dilation forward, -dilation for the dgrad."""
    w_off: int
    step: int
    k: int
    k_b: int
    in_off: int
    n_b: int
    out_off: int


class WgradEntry(NamedTuple):
    """tap_wgrad_kernel, one per (branch, tap): part[w_off + c * n_e + o] sums
    x[p + (dy, dx)][x_off + c] * g[p][g_off + o] over the pixels p whose source is inside."""
    w_off: int
    dy: int
    dx: int
    n_e: int
    g_off: int
    x_off: int


class SepRow(NamedTuple):
    """sep_conv_kernel, one per branch: depthwise [k*k][C] fp32 at dw_off (dilation ``step``),
    mid [scale C | shift C] at mid_off (applied with the mid act when has_mid), pointwise
    [C][n_b] at pw_off, output channels [out_off, out_off + n_b)."""
    pw_off: int
    step: int
    k: int
    n_b: int
    out_off: int
    has_mid: int
    dw_off: int
    mid_off: int


class DwSlot(NamedTuple):
    """dw_kernel / dw_bwd_kernel, one per depthwise slot: input channels from in_coff, taps
    [k*k][C] at dw_off with dilation ``step``, mid affine at mid_off (has_mid), output channels
    from out_coff."""
    in_coff: int
    dw_off: int
    step: int
    k: int
    mid_off: int
    has_mid: int
    out_coff: int


def _columns(row_type, width=META_COLS):
    assert len(row_type._fields) <= width
    return tuple(tl.constexpr(i) for i in range(len(row_type._fields)))


TAP_W_OFF, TAP_STEP, TAP_K, TAP_K_B, TAP_IN_OFF, TAP_N_B, TAP_OUT_OFF = _columns(TapRow)
WG_W_OFF, WG_DY, WG_DX, WG_N_E, WG_G_OFF, WG_X_OFF = _columns(WgradEntry)
SEP_PW_OFF, SEP_STEP, SEP_K, SEP_N_B, SEP_OUT_OFF, SEP_HAS_MID, SEP_DW_OFF, SEP_MID_OFF = _columns(SepRow)
DW_IN_COFF, DW_DW_OFF, DW_STEP, DW_K, DW_MID_OFF, DW_HAS_MID, DW_OUT_COFF = _columns(DwSlot)
# region_conv_kernel's item table (plan.RegionItem, REGION_COLS wide).
ITEM_ROW = tl.constexpr(REGION_COLS)
(RI_BRANCH, RI_H0, RI_H1, RI_W0, RI_W1, RI_P0, RI_KY0, RI_KY1, RI_KX0, RI_KX1,
 RI_O0) = _columns(RegionItem, REGION_COLS)

_skip = threading.local()


@contextlib.contextmanager
def skip_launches():
    """The ops' fake kernels (kernels/ops.py): the host code runs on fake tensors, allocates the
    outputs and launches nothing."""
    prev = getattr(_skip, "on", False)
    _skip.on = True
    try:
        yield
    finally:
        _skip.on = prev


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args), unless the fake kernel is running (skip_launches)."""
    if getattr(_skip, "on", False):
        return
    kernel[grid](*args, **kwargs)


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device, not on the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows PyTorch's conv TF32 switch (docs/DESIGN.md, precision); bf16/fp16 ignore it."""
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_dtype(op: str, x: torch.Tensor):
    # tl.dot has no float64 tensor-core path (and the interpreter's fp64 dot would not be the
    # GPU's), so float64 stays with the cpp / torch backends rather than silently rounding.
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            "%s: backend='triton' supports float32, bfloat16 and float16 inputs, got %s; use "
            "backend='cpp' or 'torch' for float64" % (op, x.dtype)
        )


def nhwc(t: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] (any strides) -> dense [N, H, W, C] (a no-op for channels_last input)."""
    return t.permute(0, 2, 3, 1).contiguous()


def empty_nchw_cl(n, c, h, w, dtype, device) -> torch.Tensor:
    """[N, C, H, W] in channels_last memory, plus its dense NHWC view for the kernels."""
    t = torch.empty((n, h, w, c), dtype=dtype, device=device)
    return t.permute(0, 3, 1, 2), t


def max_tiles(configs, n, h, w) -> int:
    """The most pixel tiles any config can use: rows of the per-tile partial buffers."""
    return max(n * triton.cdiv(h, c.kwargs["TH"]) * triton.cdiv(w, c.kwargs["TW"]) for c in configs)


# The per-tile partial-statistics arguments of the autotuned forward kernels (epilogue_store),
# handed to triton.autotune as reset_to_zero. The buffers have max_tiles() rows and the host sums
# every row, but a config writes only its own tile count of rows: the first call per shape
# benchmarks every config into the same buffers, so without the reset the rows past the chosen
# config's tiles keep sums from other configs' tilings, and the first training step's batch
# statistics are wrong (tests/test_triton_autotune.py). The autotuner zeroes the named buffers
# before each benchmarked run and once more after benchmarking, before the real run; the chosen
# config then writes every row it owns and the rest stay 0, which is exact. Cost: two memsets
# of max_tiles x O fp32 per benchmarked run, on the first call per tuning key only (inductor
# reads the same list for user-defined kernels under torch.compile). Kernels that write every
# element of their output on every run (tap_wgrad_kernel) need no reset.
PARTIAL_STATS_ARGS = ["psum_ptr", "psumsq_ptr"]


def tile_config(th, tw, bm, bn, bk, warps, stages):
    """A tiled conv kernel's config: a TH x TW pixel tile of BM GEMM rows, BN output columns, BK
    reduction steps."""
    return triton.Config({"TH": th, "TW": tw, "BM": bm, "BN": bn, "BK": bk}, num_warps=warps, num_stages=stages)


def stats_autotune(configs, key, group=None, **kwargs):
    """triton.autotune for a kernel whose epilogue writes partial statistics: it resets
    PARTIAL_STATS_ARGS (above) between benchmarked runs; ``group``: as autotune_configs."""
    return triton.autotune(configs=autotune_configs(configs, group), key=key, reset_to_zero=PARTIAL_STATS_ARGS,
                           **kwargs)


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: small, so that the split-K paths are exercised by the CPU tests


# --------------------------------------------------------------------------- device helpers


@triton.jit
def tap_range(lo, hi, size, k, d):
    """Taps t in [t0, t1] of a k-tap axis at (signed) step d, tap t reading row h + (t - k//2) * d,
    that read at least one in-image row for output rows [lo, hi) (hi > lo, inside the image).

    Only the two outer taps can fall outside; the centre tap always reads the row itself.
    Tap t0 = 0 reads rows [lo - k//2 * d, hi - k//2 * d) and is kept when that range meets
    [0, size); likewise t1 = k - 1.
    """
    half = k // 2
    off = half * d
    first_ok = (lo - off < size) & (hi - 1 - off >= 0)
    last_ok = (lo + off < size) & (hi - 1 + off >= 0)
    t0 = tl.where(first_ok, 0, half)
    t1 = tl.where(last_ok, k - 1, half)
    return t0, t1


@triton.jit
def pixel_tile(pid_t, H, W, TH: tl.constexpr, TW: tl.constexpr, BM: tl.constexpr):
    """Program pid_t's TH x TW tile of one image: (n, h0, h1, w0, w1, row, col, valid).

    BM is the power of two >= TH * TW that the pixel vectors have; TH, TW need not be powers
    of two (11 x 11 covers a 33 x 33 map in 9 tiles at 94% of 128 rows)."""
    tiles_w = tl.cdiv(W, TW)
    per_img = tl.cdiv(H, TH) * tiles_w
    n = pid_t // per_img
    r = pid_t % per_img
    h0 = (r // tiles_w) * TH
    w0 = (r % tiles_w) * TW
    h1 = tl.minimum(h0 + TH, H)
    w1 = tl.minimum(w0 + TW, W)
    i = tl.arange(0, BM)
    ph = h0 + i // TW
    pw = w0 + i % TW
    valid = (i < TH * TW) & (ph < H) & (pw < W)
    return n, h0, h1, w0, w1, ph, pw, valid


@triton.jit
def epilogue_store(acc, n, pid_t, pix, valid, oc, omask, out_ptr, OUT_STRIDE, scale_ptr, shift_ptr, bias_ptr,
                   psum_ptr, psumsq_ptr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                   STATS: tl.constexpr, N_PER_ROW: tl.constexpr):
    """z = acc * scale[o] + shift[o] (+ bias[n, o]); per-tile channel sums of z and z^2 into
    row pid_t of the partial buffers (STATS); out = act(z) cast to out's dtype. n: the tile's
    image, or (N_PER_ROW) each row's image (a tile drawn across the batch)."""
    z = acc
    if HAS_SCALE:
        s = tl.load(scale_ptr + oc, mask=omask, other=0.0)
        t = tl.load(shift_ptr + oc, mask=omask, other=0.0)
        z = z * s[None, :] + t[None, :]
    m2 = valid[:, None] & omask[None, :]
    if HAS_BIAS:
        if N_PER_ROW:
            bb2 = tl.load(bias_ptr + n.to(tl.int64)[:, None] * OUT_STRIDE + oc[None, :], mask=m2, other=0.0)
            z = z + bb2
        else:
            bb = tl.load(bias_ptr + n.to(tl.int64) * OUT_STRIDE + oc, mask=omask, other=0.0)
            z = z + bb[None, :]
    if STATS:
        z = tl.where(m2, z, 0.0)  # z itself: one masked copy live, not two (spills otherwise)
        row = pid_t.to(tl.int64) * OUT_STRIDE
        tl.store(psum_ptr + row + oc, tl.sum(z, axis=0), mask=omask)
        tl.store(psumsq_ptr + row + oc, tl.sum(z * z, axis=0), mask=omask)
    if ACT == 1:
        z = tl.where(z < 0.0, 0.0, z)  # `z < 0` lets NaN through, as torch.relu does
    tl.store(out_ptr + pix[:, None] * OUT_STRIDE + oc[None, :], z.to(out_ptr.dtype.element_ty), mask=m2)
