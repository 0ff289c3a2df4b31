"""The ``torch`` backend: the fused ops as ATen compositions.

Same semantics as the compiled ops in csrc/aspp_fused.cpp (read the schema comments there),
differentiable by autograd, and the path used for ONNX export. It is also the readable
reference the compiled kernels are tested against (in float64).

Speed choices: channels_last activations, BN folded into the conv weights and bias (the
eval epilogue is then only the ReLU), the image-pooling branch as a per-sample bias.
Low-precision inputs run PyTorch's own conv in that dtype, so this backend's rounding is
PyTorch's.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

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


def _conv(x, w, dilation, bias=None):
    k = w.shape[-1]
    return F.conv2d(x, w, bias, padding=(k // 2) * dilation, dilation=dilation)


def atrous_conv(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    dilations: Sequence[int],
    scale: torch.Tensor,
    shift: torch.Tensor,
    bias: Optional[torch.Tensor],
    sum_mode: bool,
    act: int,
    compute_stats: bool,
):
    """Multi-branch atrous conv + epilogue; returns (out, ch_sum, ch_sumsq).

    BN is folded into each conv (weights * scale, shift as the conv bias), so the epilogue
    costs nothing but the ReLU; the per-sample bias (image pooling) is added after.
    """
    x = x.contiguous(memory_format=torch.channels_last)
    scale, shift = scale.to(x.dtype), shift.to(x.dtype)
    parts: List[torch.Tensor] = []
    offset = 0
    for i, (w, d) in enumerate(zip(weights, dilations)):
        o = w.shape[0]
        if sum_mode:
            w_folded = w * scale.view(-1, 1, 1, 1)
            b_folded = shift if i == 0 else None
        else:
            w_folded = w * scale[offset:offset + o].view(-1, 1, 1, 1)
            b_folded = shift[offset:offset + o]
            offset += o
        parts.append(_conv(x, w_folded, d, b_folded))
    if sum_mode:
        z = parts[0]
        for p in parts[1:]:
            z = z + p
    else:
        z = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return _finish(z, bias, act, compute_stats)


def separable_conv(
    x: torch.Tensor,
    dw_weights: Sequence[Optional[torch.Tensor]],
    dilations: Sequence[int],
    mid_scales: Sequence[Optional[torch.Tensor]],
    mid_shifts: Sequence[Optional[torch.Tensor]],
    mid_act: int,
    pw_weights: Sequence[torch.Tensor],
    scale: torch.Tensor,
    shift: torch.Tensor,
    bias: Optional[torch.Tensor],
    act: int,
    compute_stats: bool,
):
    """Separable atrous conv (concat of branches) + epilogue; returns (out, ch_sum, ch_sumsq)."""
    x = x.contiguous(memory_format=torch.channels_last)
    c = x.shape[1]
    scale, shift = scale.to(x.dtype), shift.to(x.dtype)
    parts: List[torch.Tensor] = []
    offset = 0
    for dw, d, ms, msh, pw in zip(dw_weights, dilations, mid_scales, mid_shifts, pw_weights):
        if dw is None:
            m = x
        else:
            m = F.conv2d(x, dw, padding=d, dilation=d, groups=c)
            if ms is not None:
                m = _act(m * ms.to(m.dtype).view(1, c, 1, 1) + msh.to(m.dtype).view(1, c, 1, 1), mid_act)
        o = pw.shape[0]
        w_folded = pw * scale[offset:offset + o].view(-1, 1, 1, 1)
        parts.append(F.conv2d(m, w_folded, shift[offset:offset + o]))
        offset += o
    z = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return _finish(z, bias, act, compute_stats)
