"""The ``torch`` backend: the fused ops as ATen compositions.

Same semantics as the compiled ops in csrc/aspp_fused.cpp (read the schema comments there),
differentiable by autograd, and the path used for ONNX export (exact at every size: see
may_prune_taps). It is also the readable reference the compiled kernels are tested against
(in float64).

Speed choices: channels_last activations, BN folded into the conv weights and bias (the
eval epilogue is then only the ReLU; under torch.compile an epilogue instead, see
_fold_into_weights), the image-pooling branch as a per-sample bias.
Low-precision inputs run PyTorch's own conv in that dtype, so this backend's rounding is
PyTorch's.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from aspp_fused._tracing import size_checks

ACT_NONE = 0
ACT_RELU = 1


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _act(z: torch.Tensor, act: int) -> torch.Tensor:
    return torch.relu(z) if act == ACT_RELU else z


def _stats(z: torch.Tensor, compute_stats: bool):
    if not compute_stats:
        return z.new_empty(0, dtype=_acc_dtype(z.dtype)), z.new_empty(0, dtype=_acc_dtype(z.dtype))
    za = z.to(_acc_dtype(z.dtype))
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


def _conv(x, w, dilation, bias=None, groups=1):
    w, padding = _valid_taps(w, dilation, x.shape[-2], x.shape[-1])
    return F.conv2d(x, w, bias, padding=padding, dilation=dilation, groups=groups)


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
        w, padding = _valid_taps(w, d, x.shape[-2], x.shape[-1])
        if not folding:
            w_folded, b_folded = w, None
        elif sum_mode:
            w_folded = fold(w, scale)
            b_folded = shift if i == 0 else None
        else:
            w_folded = fold(w, _slice(scale, offset, offset + o))
            b_folded = _slice(shift, offset, offset + o)
            offset += o
        parts.append(F.conv2d(x, w_folded, b_folded, padding=padding, dilation=d))
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
            m = _conv(x, dw, d, groups=c)
            if ms is not None:
                m = _act(m * ms.to(m.dtype).view(1, c, 1, 1) + msh.to(m.dtype).view(1, c, 1, 1), mid_act)
        o = pw.shape[0]
        if folding:
            parts.append(F.conv2d(m, fold(pw, _slice(scale, offset, offset + o)), _slice(shift, offset, offset + o)))
        else:
            parts.append(F.conv2d(m, pw))
        offset += o
    z = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    if not folding:
        z = _affine(z, scale, shift)
    return _finish(z, bias, act, compute_stats)
