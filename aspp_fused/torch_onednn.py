"""The torch backend's CPU inference path: oneDNN convolutions on weights packed once.

On a float32 CPU tensor, in eval mode with nothing needing a gradient, the torch backend's
convolutions run as ``torch.ops.mkldnn._convolution_pointwise`` (the call inductor itself emits
under ``freezing``) on weights folded with the BN scale and reordered into oneDNN's blocked
layout once per parameter version (kernels/pack_cache.PACKED), with the ReLU as the
convolution's post-op. An ASPP head runs as one op: its projection is applied branch by branch,
each 1x1 conv of one branch accumulated into the output by oneDNN's ``add`` post-op, so the
concatenation of the branches is never written.

Why (CPU, 2 cores, 512 -> 4 x 256 channels, batch 2, fp32, medians of 7 interleaved calls of
each part; the whole OS16 / OS8 heads in benchmarks/results: 51.8 / 198 ms compiled converted
against 58.1 / 218 ms compiled original):
- a weight reorder per call costs 3.2 ms per 3x3 branch at 33 x 33 (its conv 10 to 23 ms), and
  is what a plain ``F.conv2d`` on a channels_last input pays every call; the branches of the OS16
  head: 51.7 ms plain against 45.8 ms packed; OS8 (65 x 65): 204.7 against 187.7 ms;
- the concatenation costs 11.2 ms at 65 x 65 (memory-bound); the projection of the four branches
  without it: 31.2 ms (concat + one 1024 -> 256 conv) against 21.9 ms (four accumulated
  256 -> 256 convs).

The op ``aspp_fused::onednn_conv`` (schema below) is opaque to torch.compile, so a compiled
converted model keeps the packed weights (inside a graph nothing could be cached). Not used
where a graph is recorded to run elsewhere (torch.export, ONNX, torch.jit.trace: they see the
ATen composition), for other dtypes, under autocast, with autograd, with the exact-region convs
asked for on CPU (``ASPP_FUSED_TORCH_REGIONS=1``), or with ``ASPP_FUSED_ONEDNN=0`` (read at each
eager call; a compiled graph reads it when it is traced). The numbers are oneDNN's own
convolutions; the projection's per-branch accumulation rounds in a different order than one
conv over the concatenation (float32 rounding, about 1e-6 relative).
"""
import os
from typing import List, Optional

import torch
from torch import Tensor

from aspp_fused import torch_backend
from aspp_fused.kernels.pack_cache import PACKED
from aspp_fused.kernels.worklog import log_work

ACT_RELU = 1


def enabled() -> bool:
    mode = os.environ.get("ASPP_FUSED_ONEDNN", "1")
    if mode not in ("0", "1"):
        raise ValueError("ASPP_FUSED_ONEDNN must be '1' (use oneDNN with packed weights for CPU float32 inference, "
                         "the default) or '0' (never), got %r" % mode)
    return mode == "1"


# This torch has oneDNN (mkldnn) and its fused convolution ops (read once: dynamo does not trace
# torch.backends.mkldnn.is_available).
AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def applies(x: Tensor, tensors) -> bool:
    """Whether a conv over ``x`` whose parameters are ``tensors`` runs on this path (module
    docstring): CPU float32 outside autocast, not empty, no gradient wanted, no graph being
    recorded for export."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or not AVAILABLE or not enabled():
        return False
    if torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        return False
    if torch_backend.REGIONS == "1":  # the exact-region convs, asked for on CPU too
        return False
    if torch.is_autocast_enabled("cpu"):  # ATen's convs then run in the autocast dtype, as the original's
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in tensors)):
        return False
    return x.numel() > 0


# aspp_fused::onednn_conv(Tensor x, Tensor[] weights, int[] cols, int[] dilations, Tensor? scale,
#                         Tensor? shift, Tensor? sample_bias, bool sum_mode, int act,
#                         Tensor? proj_weight, int[] proj_cols, Tensor? proj_scale,
#                         Tensor? proj_shift) -> Tensor out
#   x [N, C, H, W] float32 CPU (any layout); weights[b] [O_b, C_b >= C, k, k], k in {1, 3}, read
#   through its input columns [cols[b], cols[b] + C) (cols empty: all from 0), applied at
#   dilations[b] with padding dilations[b] (k = 3); scale / shift [sum O_b] (sum_mode: [O]) or
#   None (1 / 0). The branch stage: z_b = conv(x, weights[b][:, cols] * scale_b) + shift_b.
#   Without proj_weight: out = act(concat_b z_b + sample_bias) (sum_mode: sum_b z_b), sample_bias
#   [N, sum O_b] or None.
#   With proj_weight [P, Q, 1, 1] (an ASPP projection; concat mode), branch b read by its columns
#   [proj_cols[b], proj_cols[b] + O_b) (the rest, e.g. the pooled branch's, unused): h_b = act(z_b),
#   out = act(sum_b conv(h_b, proj_weight[:, cols of b] * proj_scale) + proj_shift + sample_bias),
#   sample_bias [N, P] or None. (Whole parameters and column offsets, not slices of them: a slice
#   made inside a compiled graph is a new tensor on every call, which no cache could key.)
#   act: 0 none, 1 ReLU. out channels_last float32. Inference only (no autograd formula).
@torch.library.custom_op("aspp_fused::onednn_conv", mutates_args=())
def onednn_conv(x: Tensor, weights: List[Tensor], cols: List[int], dilations: List[int], scale: Optional[Tensor],
                shift: Optional[Tensor], sample_bias: Optional[Tensor], sum_mode: bool, act: int,
                proj_weight: Optional[Tensor], proj_cols: List[int], proj_scale: Optional[Tensor],
                proj_shift: Optional[Tensor]) -> Tensor:
    x = x.contiguous(memory_format=torch.channels_last)
    n = x.shape[0]
    packed = _packed(x, weights, cols, dilations, scale, sum_mode, proj_weight, proj_cols, proj_scale)
    branch_act = act if proj_weight is not None else (act if sample_bias is None and not sum_mode else 0)
    shifts = [None] * len(weights) if shift is None else (
        [shift] + [None] * (len(weights) - 1) if sum_mode else list(shift.split([w.shape[0] for w in weights])))
    parts = []  # concat: one per branch; sum mode: the one sum, the later branches added into it
    for (wp, padding, d), t in zip(packed.branches, shifts):
        if sum_mode and parts:
            _accumulate(parts[0], x, wp, t, padding, d)
        else:
            parts.append(_conv(x, wp, t, padding, d, branch_act))
    if proj_weight is not None:
        out = _conv(parts[0], packed.proj[0], proj_shift, [0, 0], 1, 0)
        for z, wp in zip(parts[1:], packed.proj[1:]):
            _accumulate(out, z, wp, None, [0, 0], 1)
    else:
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    if sample_bias is not None:
        out.add_(sample_bias.to(out.dtype).view(n, -1, 1, 1))
    if act == ACT_RELU and (sample_bias is not None or sum_mode or proj_weight is not None):
        out.relu_()
    return out.contiguous(memory_format=torch.channels_last)


@onednn_conv.register_fake
def _(x, weights, cols, dilations, scale, shift, sample_bias, sum_mode, act, proj_weight, proj_cols, proj_scale,
      proj_shift):
    n, _, h, w = x.shape
    o = proj_weight.shape[0] if proj_weight is not None else (
        weights[0].shape[0] if sum_mode else sum(t.shape[0] for t in weights))
    return torch.empty((n, o, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def _conv(x, wp, bias, padding, d, act):
    return torch.ops.mkldnn._convolution_pointwise(x, wp, bias, padding, [1, 1], [d, d], 1,
                                                   "relu" if act == ACT_RELU else "none", [None], "")


def _accumulate(out, x, wp, bias, padding, d):
    """out += conv(x, wp) + bias, by oneDNN's add post-op (out contiguous channels_last)."""
    torch.ops.mkldnn._convolution_pointwise_.binary(out, x, wp, bias, padding, [1, 1], [d, d], 1, "add", 1.0,
                                                    None, [], None)


class _Packed:
    """One call's packed weights: (packed, padding, dilation) per branch, packed projection slices,
    and the scales they were folded with (compared by value: made afresh on every call)."""

    def __init__(self, branches, proj, scales):
        self.branches, self.proj, self.scales = branches, proj, scales

    def folded_with(self, scales):
        return all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
                   for a, b in zip(self.scales, scales))


def _packed(x, weights, cols, dilations, scale, sum_mode, proj_weight, proj_cols, proj_scale):
    n, c, h, wd = x.shape
    scales = tuple(None if t is None else t.detach() for t in (scale, proj_scale))
    widths = [w.shape[0] for w in weights]
    if cols:
        weights = [w[:, k:k + c] for w, k in zip(weights, cols)]  # views of the sources
    taps = []  # per branch: its taps that touch an h x wd map, and their padding
    for w, d in zip(weights, dilations):
        kept, padding = torch_backend._valid_taps(w, d, h, wd)
        taps.append((kept, [padding, padding] if isinstance(padding, int) else list(padding)))
        log_work("torch_conv", lambda w=w, kept=kept, d=d: torch_backend._plain_work(x, w, kept, d))

    def fold(w, s):
        return (w if s is None else w * s.view(-1, 1, 1, 1)).contiguous()

    def pack():
        # oneDNN's reorder takes the input size as a hint only: a weight packed at one map size
        # runs as fast at another (measured: packed at 33 x 33, run at 65 x 65 and 129 x 129,
        # within 1%, the same numbers), so maps with the same taps share one packing.
        split = [scale] * len(weights) if scale is None or sum_mode else list(scale.split(widths))
        branches = [(torch.ops.mkldnn._reorder_convolution_weight(fold(kept, s), padding, [1, 1], [d, d], 1,
                                                                  [n, c, h, wd]), padding, d)
                    for (kept, padding), d, s in zip(taps, dilations, split)]
        proj = []
        if proj_weight is not None:
            for o, start in zip(widths, proj_cols):
                wf = fold(proj_weight[:, start:start + o], proj_scale)
                proj.append(torch.ops.mkldnn._reorder_convolution_weight(wf, [0, 0], [1, 1], [1, 1], 1, [n, o, h, wd]))
        # The scales kept as copies: in a compiled graph they are inductor's buffers, reused for
        # other values once this op has read them (and a caller of the op may edit its own in place).
        return _Packed(branches, proj, tuple(None if t is None else t.clone() for t in scales))

    key = ("onednn", c, tuple(cols), tuple(dilations), tuple((tuple(k.shape), tuple(p)) for k, p in taps),
           sum_mode, None if proj_weight is None else (tuple(proj_weight.shape), tuple(proj_cols)))
    return PACKED.get(key, list(weights) + [proj_weight], pack, valid=lambda p: p.folded_with(scales))
