"""The ``torch`` backend: the fused ops as ATen compositions.

Same semantics as the compiled ops in csrc/aspp_fused.cpp (read the schema comments there),
differentiable by autograd, and the path used for ONNX export (exact at every size: see
may_prune_taps). It is also the readable reference the compiled kernels are tested against
(in float64).

Speed choices: channels_last activations, BN folded into the conv weights and bias (the
eval epilogue is then only the ReLU; under torch.compile an epilogue instead, see
_fold_into_weights), the image-pooling branch as a per-sample bias; optionally (REGIONS) the
exact-region plan: a dilated 3x3 conv as one ATen conv per region, over the taps that touch the
image there (region_conv).
Low-precision inputs run PyTorch's own conv in that dtype, so this backend's rounding is
PyTorch's.
"""
import contextlib
import os
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from aspp_fused._dtypes import acc_dtype
from aspp_fused._tracing import size_checks
from aspp_fused.kernels.plan import axis_regions
from aspp_fused.kernels.worklog import log_work

ACT_NONE = 0
ACT_RELU = 1


def _act(z: torch.Tensor, act: int) -> torch.Tensor:
    return torch.relu(z) if act == ACT_RELU else z


def _stats(z: torch.Tensor, compute_stats: bool):
    if not compute_stats:
        return z.new_empty(0, dtype=acc_dtype(z.dtype)), z.new_empty(0, dtype=acc_dtype(z.dtype))
    za = z.to(acc_dtype(z.dtype))
    return za.sum(dim=(0, 2, 3)), (za * za).sum(dim=(0, 2, 3))


def _finish(z: torch.Tensor, bias, act: int, compute_stats: bool):
    """z (before the per-sample bias) -> (act(z + bias), ch_sum, ch_sumsq), channels_last."""
    if bias is not None:
        z = z + bias.to(z.dtype).view(z.shape[0], z.shape[1], 1, 1)
    ch_sum, ch_sumsq = _stats(z, compute_stats)
    if act == ACT_RELU:
        # In place when nothing needs z for backward: saves a pass over the output.
        z = torch.relu_(z) if not z.requires_grad else torch.relu(z)
    return z.contiguous(memory_format=torch.channels_last), ch_sum, ch_sumsq


def fold(w: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """w * scale[o], written straight into channels_last (the layout oneDNN wants for a
    channels_last input, so the conv does not copy the weight again)."""
    if scale is None:
        return w
    scale = scale.view(-1, 1, 1, 1)
    if ((torch.is_grad_enabled() and (w.requires_grad or scale.requires_grad)) or torch.compiler.is_compiling()
            or torch.jit.is_tracing()):
        return w * scale  # out= records no autograd, dynamo does not trace a strided out=, nor ONNX an out=
    return torch.mul(w, scale, out=torch.empty_like(w, memory_format=torch.channels_last))


def _slice(t: Optional[torch.Tensor], start: int, stop: int):
    return None if t is None else t[start:stop]


def may_prune_taps(h, wd) -> bool:
    """Whether this call may drop taps by comparing the map size h x wd with the rate in Python.

    That comparison is a Python branch on the size. Eager sizes are plain ints: always safe.
    Under torch.compile the size is a SymInt and dynamo turns the comparison into a guard, so a
    graph is only reused at sizes on the same side of every threshold (one recompile per side,
    then cached). A graph that is *recorded* to run at any size has no such guard behind it:
    torch.export (and the ONNX dynamo exporter, which runs it) would either pin the dynamic
    dims to one side (a constraint violation, or a narrowed range with ``Dim.AUTO``) or, where
    nothing checks the range (ONNX), bake the pruned filter; torch.jit.trace and the legacy
    ONNX exporter record only the branch taken. So there, and for any other symbolic size, all
    9 taps are kept: exact at every size, at the cost of the dense MACs for branches whose rate
    is >= the map (up to 9x that branch's pruned MACs; none at all once the map is larger than
    every rate, e.g. a 513 x 513 input at output stride 16: 33 x 33 > rate 18).
    """
    if torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        return False
    if isinstance(h, torch.SymInt) or isinstance(wd, torch.SymInt):
        return torch.compiler.is_dynamo_compiling()
    return True


def _valid_taps(w: torch.Tensor, dilation: int, h, wd):
    """Drops the rows / columns of 3x3 taps that never touch an h x wd image.

    A tap row at offset +-dilation reads only zero padding once dilation >= h, so the 3x3
    filter degenerates to 1x3, 3x1 or its centre tap (1x1): up to 9x fewer MACs, exactly the
    same result. Only where the size is known to hold for every run (see may_prune_taps);
    otherwise the full filter. Returns (weight, padding)."""
    with size_checks():
        if w.shape[-1] != 3:
            return w, 0
    if not may_prune_taps(h, wd):
        return w, dilation
    row_skip, col_skip = dilation >= h, dilation >= wd
    if row_skip:
        w = w[:, :, 1:2, :]
    if col_skip:
        w = w[:, :, :, 1:2]
    return w, (0 if row_skip else dilation, 0 if col_skip else dilation)


def _regions_mode() -> str:
    mode = os.environ.get("ASPP_FUSED_TORCH_REGIONS", "0")
    if mode not in ("0", "1", "cuda"):
        raise ValueError("ASPP_FUSED_TORCH_REGIONS must be '0' (never), 'cuda' (CUDA tensors) or '1' (always), "
                         "got %r" % mode)
    return mode


# Where the exact-region plan runs dilated convs (region_conv): "0" = never (the default), "cuda" =
# on CUDA tensors, "1" = also on CPU. Off by default: the backend is picked from evidence, and there
# is none yet on a GPU (cuDNN multiplies the zero padding, but the plan trades it for up to 9 smaller
# convs per branch on strided input slices and two concatenations; benchmarks' fused_torch_regions
# is fused_torch with it on, for the GPU run to decide). On CPU oneDNN already skips padded taps, and
# the regions measured 5x slower: the OS16 branches (512 -> 4 x 256 channels, 33 x 33, rates
# 6 / 12 / 18, batch 2, fp32, 2 busy cores), medians of 7 interleaved calls, 208 ms plain against
# 1038 ms in regions.
REGIONS = _regions_mode()


@contextlib.contextmanager
def regions(mode: str):
    """REGIONS set to ``mode`` for the block (the benchmark's fused_torch_regions, --work-only);
    process-wide, not per thread."""
    global REGIONS
    if mode not in ("0", "1", "cuda"):
        raise ValueError("regions: mode must be '0', 'cuda' or '1', got %r" % (mode,))
    prev, REGIONS = REGIONS, mode
    try:
        yield
    finally:
        REGIONS = prev


def _use_regions(x: torch.Tensor, w: torch.Tensor, dilation: int) -> bool:
    """A 3x3 branch at a size known for every run (plain ints: eager, or torch.compile with the
    size specialised) whose padding splits the map into more than one region."""
    if REGIONS == "0" or (REGIONS == "cuda" and not x.is_cuda):
        return False
    h, wd = x.shape[-2], x.shape[-1]
    if type(h) is not int or type(wd) is not int or not may_prune_taps(h, wd) or w.shape[-1] != 3:
        return False
    return len(axis_regions(h, 3, dilation)) * len(axis_regions(wd, 3, dilation)) > 1


def region_conv(x: torch.Tensor, w: torch.Tensor, dilation: int, bias=None) -> torch.Tensor:
    """conv2d(x, w, bias, padding=dilation, dilation=dilation) of a 3x3 filter, exactly, issuing
    only the multiply-adds that read the image: per region of the exact-region plan
    (kernels/plan.axis_regions: at most 3 x 3 regions, inside each a constant tap rectangle) one
    ATen conv of the region's sub-filter over the input rows / columns those taps read, without
    padding; the regions' outputs concatenated back in W, then in H.

    Region [lo, hi) with taps [t0, t1] reads rows [lo + (t0 - 1) d, hi + (t1 - 1) d), all inside
    the image by the region's definition; a valid conv of the (t1 - t0 + 1)-tap filter at
    dilation d over them gives hi - lo rows."""
    d = dilation
    n, _, h, wd = x.shape
    rows, cols = axis_regions(h, 3, d), axis_regions(wd, 3, d)
    _log_work("torch_region_conv", lambda: _region_work(x.shape[1], w.shape[0], n, h, wd, d, rows, cols))
    bands = []
    for lo, hi, t0, t1 in rows:
        xr = x[:, :, lo + (t0 - 1) * d:hi + (t1 - 1) * d]
        parts = [F.conv2d(xr[:, :, :, clo + (s0 - 1) * d:chi + (s1 - 1) * d], w[:, :, t0:t1 + 1, s0:s1 + 1], bias,
                          dilation=d) for clo, chi, s0, s1 in cols]
        bands.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=3))
    out = bands[0] if len(bands) == 1 else torch.cat(bands, dim=2)
    return out.contiguous(memory_format=torch.channels_last)


def _log_work(kernel, work):
    """kernels/worklog.log_work, in eager only (a graph being traced logs nothing)."""
    if not torch.compiler.is_compiling():
        log_work(kernel, work)


def _region_work(c, o, n, h, wd, d, rows, cols, issued_taps=None):
    """dense / valid / issued MACs of one 3x3 branch: the region convs issue exactly the valid
    (pixel, tap) pairs; a plain conv (issued_taps given) issues that many taps at every pixel."""
    valid = sum((hi - lo) * (t1 - t0 + 1) for lo, hi, t0, t1 in rows) * \
        sum((chi - clo) * (s1 - s0 + 1) for clo, chi, s0, s1 in cols)
    issued = valid if issued_taps is None else h * wd * issued_taps
    return dict(dense_macs=n * h * wd * 9 * c * o, valid_macs=n * valid * c * o, issued_macs=n * issued * c * o)


def _plain_work(x, w, kept, d):
    """The work of the plain conv of branch weight w (kept: its taps after _valid_taps)."""
    n, c, h, wd = x.shape
    k = w.shape[-1]
    work = _region_work(c, w.shape[0], n, h, wd, d, axis_regions(h, k, d), axis_regions(wd, k, d),
                        issued_taps=kept.shape[-2] * kept.shape[-1])
    if k == 1:
        work["dense_macs"] = work["valid_macs"]
    return work


def _depthwise(x, w, dilation):
    """The depthwise 3x3 (groups = channels) with the never-valid taps dropped; its work logged
    per channel (c = 1 input channel per group)."""
    kept, padding = _valid_taps(w, dilation, x.shape[-2], x.shape[-1])
    _log_work("torch_depthwise", lambda: _plain_work(x[:, :1], w.transpose(0, 1), kept, dilation))
    return F.conv2d(x, kept, None, padding=padding, dilation=dilation, groups=x.shape[1])


def _pointwise(m, w, bias=None):
    _log_work("torch_conv", lambda: _plain_work(m, w, w, 1))
    return F.conv2d(m, w, bias)


def atrous_conv(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    dilations: Sequence[int],
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    sum_mode: bool,
    act: int,
    compute_stats: bool,
):
    """Multi-branch atrous conv + epilogue; returns (out, ch_sum, ch_sumsq).

    scale / shift may be None here (identity / zero): the functional layer passes None
    when it knows, so no ones-multiply is spent on the weights.

    BN is folded into each conv (weights * scale, shift as the conv bias), so the epilogue
    costs nothing but the ReLU; the per-sample bias (image pooling) is added after.
    """
    x = x.contiguous(memory_format=torch.channels_last)
    scale = None if scale is None else scale.to(x.dtype)
    shift = None if shift is None else shift.to(x.dtype)
    folding = _fold_into_weights()
    parts: List[torch.Tensor] = []
    offset = 0
    for i, (w, d) in enumerate(zip(weights, dilations)):
        o = w.shape[0]
        regions = _use_regions(x, w, d)
        if not regions:
            w_full = w
            w, padding = _valid_taps(w, d, x.shape[-2], x.shape[-1])
            _log_work("torch_conv", lambda: _plain_work(x, w_full, w, d))
        if not folding:
            w_folded, b_folded = w, None
        elif sum_mode:
            w_folded = fold(w, scale)
            b_folded = shift if i == 0 else None
        else:
            w_folded = fold(w, _slice(scale, offset, offset + o))
            b_folded = _slice(shift, offset, offset + o)
            offset += o
        parts.append(region_conv(x, w_folded, d, b_folded) if regions
                     else F.conv2d(x, w_folded, b_folded, padding=padding, dilation=d))
    if sum_mode:
        z = parts[0]
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in parts)
        for p in parts[1:]:
            z = z + p if grad else z.add_(p)  # in place when autograd does not need the parts
    else:
        z = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    if not folding:
        z = _affine(z, scale, shift)
    return _finish(z, bias, act, compute_stats)


def _fold_into_weights() -> bool:
    """Where the BN scale goes: into the weights (eager; the eval modules cache the folded
    weights, nn/_fold_cache.py), or, under torch.compile, after the conv as an epilogue that
    inductor fuses into the concat / ReLU pass. Inside a graph nothing is cached, so folding
    would cost a pass over every weight on every call. Measured (CPU, 2 cores, ASPP v3 OS16 head,
    512 channels, batch 2, fp32, eval, interleaved, medians): torch.compile(convert(m)) 68.9 ms
    folding against torch.compile(m)'s 65.5 ms; as an epilogue 57.5 / 65.3 / 61.8 ms against
    57.5 / 64.0 / 60.7 ms in three runs."""
    return not torch.compiler.is_compiling()


def _affine(z: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor]) -> torch.Tensor:
    shape = (1, z.shape[1], 1, 1)
    if scale is not None:
        z = z * scale.view(shape)
    return z if shift is None else z + shift.view(shape)


def separable_conv(
    x: torch.Tensor,
    dw_weights: Sequence[Optional[torch.Tensor]],
    dilations: Sequence[int],
    mid_scales: Sequence[Optional[torch.Tensor]],
    mid_shifts: Sequence[Optional[torch.Tensor]],
    mid_act: int,
    pw_weights: Sequence[torch.Tensor],
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    act: int,
    compute_stats: bool,
):
    """Separable atrous conv (concat of branches) + epilogue; returns (out, ch_sum, ch_sumsq)."""
    x = x.contiguous(memory_format=torch.channels_last)
    c = x.shape[1]
    scale = None if scale is None else scale.to(x.dtype)
    shift = None if shift is None else shift.to(x.dtype)
    folding = _fold_into_weights()
    parts: List[torch.Tensor] = []
    offset = 0
    for dw, d, ms, msh, pw in zip(dw_weights, dilations, mid_scales, mid_shifts, pw_weights):
        if dw is None:
            m = x
        else:
            m = _depthwise(x, dw, d)
            if ms is not None:
                m = _act(m * ms.to(m.dtype).view(1, c, 1, 1) + msh.to(m.dtype).view(1, c, 1, 1), mid_act)
        o = pw.shape[0]
        if folding:
            parts.append(_pointwise(m, fold(pw, _slice(scale, offset, offset + o)), _slice(shift, offset, offset + o)))
        else:
            parts.append(_pointwise(m, pw))
        offset += o
    z = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    if not folding:
        z = _affine(z, scale, shift)
    return _finish(z, bias, act, compute_stats)
