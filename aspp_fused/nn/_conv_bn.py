"""The fused modules' calls of the ops: conv + BN + act and separable conv + BN + act.

Eval: the BN is the ops' epilogue (scale, shift), folded into the weights once on the torch
backend (FoldCache). Training: the ops return the raw conv output and its per-channel sums,
and ``_batchnorm.batch_norm_act`` normalises it (the one train-mode BN step).
"""
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from aspp_fused import functional as AF
from aspp_fused import column_conv, torch_backend, torch_onednn
from aspp_fused._dtypes import acc_dtype
from aspp_fused.nn._batchnorm import (batch_norm_act, centers, conv_batch_mean, eval_affine_all, running_centre,
                                      uses_batch_stats)
from aspp_fused.nn._fold_cache import FoldCache, fold_cache_enabled


def like_input_format(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The fused ops return channels_last; hand back the layout the caller gave us.

    Drop-in means the same numbers *and* the same layout as the original (whose dropout
    masks, for one, depend on it). Pass channels_last inputs to skip this copy.
    """
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


def _bn_tensors(bns):
    return [t for bn in bns for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)]


def conv_bn_act(x, convs: Sequence[nn.Conv2d], bns, backend: str, act="relu", weights=None,
                sample_bias: Optional[torch.Tensor] = None, cache: Optional[FoldCache] = None, cache_key=None,
                cols: Optional[Sequence[Tuple[int, int]]] = None):
    """act(BN(concat_b conv_b(x) + sample_bias)) with the BN as the fused epilogue.

    ``weights`` overrides the convs' weights (e.g. a concatenation of projection columns);
    ``cols`` [(start, stop)] reads each conv's weight through its input columns [start, stop)
    instead (a slice of the projection weight: the oneDNN path takes the whole parameter, which
    its packing cache can key; ints from the modules, not x.shape[1], which a tracer would record
    as a graph value that the legacy ONNX exporter rejects as a weight slice's size);
    conv biases, if any, are folded in. ``sample_bias`` [N, O] is added before the BN.
    In training the op returns the raw conv output and its per-channel sums, BN takes
    the batch statistics from them, and the normalise + act runs as one elementwise pass.
    """
    dt = acc_dtype(x.dtype)
    whole = [c.weight for c in convs] if weights is None else list(weights)
    weights = whole if cols is None else [w[:, a:b] for w, (a, b) in zip(whole, cols)]
    dilations = [c.dilation[0] for c in convs]
    biases = [c.bias for c in convs]
    conv_bias = _conv_biases(convs, weights, dt)
    n = x.shape[0]
    if any(uses_batch_stats(bn) for bn in bns):
        # The op emits z = conv + bias - K and the sums of z, z^2 (see _batchnorm.centers), K
        # the batch mean computed from box sums of x (exact up to rounding, cheap).
        mean = conv_batch_mean(x, weights, dilations, dt)
        if conv_bias is not None:
            mean = mean + conv_bias.detach()
        if sample_bias is not None and n > 0:
            mean = mean + sample_bias.detach().to(dt).mean(0)
        k = centers(bns, dt, x.device, estimate=mean)
        shift0 = -k if conv_bias is None else conv_bias - k
        raw, s, ss = AF.atrous_conv(x, weights, dilations, None, shift0, sample_bias, act="none",
                                    compute_stats=True, backend=backend)
        return batch_norm_act(raw, bns, k, AF.act_code(act), s, ss, out_dtype=x.dtype)

    def bn_affine():
        return _eval_affine(bns, conv_bias, dt, x.device)

    sources = list(weights) + biases + _bn_tensors(bns)
    chosen = AF.resolve_backend(backend, x)
    if _onednn(x, backend, chosen, sources):
        # CPU float32 inference: oneDNN on weights packed once, also under torch.compile
        scale, shift = bn_affine()
        if sample_bias is not None:
            sample_bias = sample_bias.to(dt) * scale
        return torch_onednn.onednn_conv(x, whole, [] if cols is None else [a for a, _ in cols], dilations, scale,
                                        shift, sample_bias, False, AF.act_code(act), None, [], None, None)
    # Not while tracing either: a traced graph would hold the folded weights as constants, and a
    # later load_state_dict on the traced module would not reach them. Not in auto's benchmark
    # mode: it measures per call arguments, and the folded ones would make the eager decisions
    # keys that a compiled graph (which never folds) does not look up.
    if (cache is not None and fold_cache_enabled() and chosen == "torch"
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and not (backend == "auto" and AF.dispatch.benchmark_enabled())
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources))):
        # The ATen composition multiplies the BN scale into the weights itself: do that
        # once and reuse it while nothing changes (see FoldCache).
        def fold_weights():
            sc, sh = bn_affine()
            splits = sc.split([w.shape[0] for w in weights])
            return sc, sh, [torch_backend.fold(w, sc_b.to(w.dtype)) for w, sc_b in zip(weights, splits)]

        scale, shift, folded = cache.get(cache_key, sources, fold_weights)
        if sample_bias is not None:
            sample_bias = sample_bias.to(dt) * scale
        out, _, _ = AF.atrous_conv(x, folded, dilations, None, shift, sample_bias, act=act, backend=backend)
        return out
    scale, shift = bn_affine()
    if sample_bias is not None:
        sample_bias = sample_bias.to(dt) * scale
    if cols is not None and column_conv.applies(x, chosen, sources + [x, sample_bias]):
        # a compiled graph: the slice is taken inside the op, where the packing cache can key it
        return column_conv.column_conv(x, whole, [a for a, _ in cols], [b for _, b in cols], dilations, scale, shift,
                                       sample_bias, AF.act_code(act), chosen)
    out, _, _ = AF.atrous_conv(x, weights, dilations, scale, shift, sample_bias, act=act, backend=backend)
    return out


def _onednn(x, backend, chosen, sources) -> bool:
    """Whether the call runs on the torch backend's oneDNN path (aspp_fused/torch_onednn.py);
    ``chosen``: the concrete backend ``backend`` resolves to. Not in auto's benchmark mode, which
    measures the backends on the op itself."""
    return (chosen == "torch" and not (backend == "auto" and AF.dispatch.benchmark_enabled())
            and torch_onednn.applies(x, sources))


def _conv_biases(convs, weights, dt):
    """The convs' biases concatenated ([sum O], zeros where a conv has none), or None."""
    if all(c.bias is None for c in convs):
        return None
    return torch.cat([(c.bias if c.bias is not None else w.new_zeros(w.shape[0])).to(dt)
                      for c, w in zip(convs, weights)])


def _eval_affine(bns, conv_bias, dt, device):
    """The eval-mode BN as (scale, shift) over the concatenated channels, the conv bias inside."""
    sc, sh = eval_affine_all(bns, dt, device)
    if conv_bias is not None:
        sh = sh + conv_bias * sc
    return sc, sh


def conv_sum(x, convs: Sequence[nn.Conv2d], backend: str):
    """sum_b conv_b(x), the convs' biases included (ASPP v2: the branches' class scores summed)."""
    dt = acc_dtype(x.dtype)
    weights = [c.weight for c in convs]
    dilations = [c.dilation[0] for c in convs]
    biases = [c.bias.to(dt) for c in convs if c.bias is not None]
    shift = None
    for b in biases:
        shift = b if shift is None else shift + b
    if _onednn(x, backend, AF.resolve_backend(backend, x), weights + [c.bias for c in convs]):
        return torch_onednn.onednn_conv(x, weights, [], dilations, None, shift, None, True, 0, None, [], None, None)
    out, _, _ = AF.atrous_conv(x, weights, dilations, None, shift, None, sum_mode=True, act="none", backend=backend)
    return out


def aspp_bn_act(x, convs, bns, proj, proj_bn, cols, sample_bias, backend, cache: Optional[FoldCache] = None,
                cache_key=()):
    """An ASPP head's conv branches and 1x1 projection, the pooled branch as ``sample_bias``:
    ReLU(BN_p(W_main concat_b ReLU(BN_b(conv_b(x))) + sample_bias)). Branch b enters the
    projection ``proj`` through its weight's columns [cols[b], cols[b] + O_b) (W_main: those
    columns; the pooled branch's are not read); ``sample_bias`` [N, P] or None.

    CPU float32 inference runs it as one oneDNN op that never writes the concatenation
    (aspp_fused/torch_onednn.py); otherwise the branches, then the projection (conv_bn_act)."""
    dt = acc_dtype(x.dtype)
    weights = [c.weight for c in convs]
    widths = [c.out_channels for c in convs]  # ints, also under a tracer (w.shape[0] would be a graph value)
    w = proj.weight
    sources = weights + [c.bias for c in convs] + _bn_tensors(bns) + [w, proj.bias] + _bn_tensors([proj_bn])
    if not any(uses_batch_stats(bn) for bn in list(bns) + [proj_bn]) and _onednn(
            x, backend, AF.resolve_backend(backend, x), sources):
        scale, shift = _eval_affine(bns, _conv_biases(convs, weights, dt), dt, x.device)
        p_scale, p_shift = _eval_affine([proj_bn], _conv_biases([proj], [w], dt), dt, x.device)
        if sample_bias is not None:
            sample_bias = sample_bias.to(dt) * p_scale
        return torch_onednn.onednn_conv(x, weights, [], [c.dilation[0] for c in convs], scale, shift, sample_bias,
                                        False, AF.act_code("relu"), w, list(cols), p_scale, p_shift)
    h = conv_bn_act(x, convs, bns, backend, cache=cache, cache_key=cache_key + ("branches",))
    main = proj_columns(w, [(c, c + o) for c, o in zip(cols, widths)])
    return conv_bn_act(h, [proj], [proj_bn], backend, sample_bias=sample_bias, cache=cache,
                       cache_key=cache_key + ("project",), **main)


def proj_columns(w, ranges):
    """conv_bn_act's keyword for a projection weight ``w`` read through its input column ranges
    [(start, stop)], in order: adjacent ranges as one ``cols`` range (the parameter itself, which
    the oneDNN path's packing cache can key), ranges with a gap (the pooled branch's columns
    between them) as ``weights``, their concatenation."""
    merged = []
    for a, b in ranges:
        if b <= a:
            continue
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    if len(merged) == 1:
        return dict(cols=merged)
    return dict(weights=[torch.cat([w[:, a:b] for a, b in merged], 1)])


def separable_bn_act(x, branches, bns, backend):
    """Concat over branches of ReLU(BN(pointwise(mid(depthwise(x))))).

    ``branches``: (depthwise conv or None, mid BN or None, pointwise conv) per branch.
    Eval: one separable_conv launch for all branches. Training with a mid BN needs the batch
    statistics of the depthwise output before the pointwise can start, so that case runs
    in two steps (depthwise + mid BN, then the pointwise through the fused 1x1 path).
    """
    dt = acc_dtype(x.dtype)
    c = x.shape[1]
    for _, _, pw in branches:
        if pw.bias is not None:
            raise ValueError("separable_conv: pointwise convs with a bias are not supported by the fused path")
    mids_in_batch_mode = any(mid is not None and uses_batch_stats(mid) for _, mid, _ in branches)
    if mids_in_batch_mode:
        outs = []
        for (dw, mid, pw), bn in zip(branches, bns):
            if dw is None:
                y = x
            else:
                y = torch.nn.functional.conv2d(x, dw.weight, None, padding=dw.padding, dilation=dw.dilation, groups=c)
                if mid is not None:
                    yd = y.to(dt)
                    k = centers([mid], dt, x.device, estimate=yd.mean((0, 2, 3)) if yd.numel() else None)
                    y = batch_norm_act(yd - k.view(1, -1, 1, 1), [mid], k, 1, out_dtype=x.dtype)
            outs.append(conv_bn_act(y, [pw], [bn], backend))
        return torch.cat(outs, dim=1)
    dws = [dw.weight if dw is not None else None for dw, _, _ in branches]
    dil = [dw.dilation[0] if dw is not None else 1 for dw, _, _ in branches]
    mid_affines = [eval_affine_all([mid], dt, x.device) if mid is not None else (None, None)
                   for _, mid, _ in branches]
    pws = [pw.weight for _, _, pw in branches]
    ms = [a[0] for a in mid_affines]
    msh = [a[1] for a in mid_affines]
    if any(uses_batch_stats(bn) for bn in bns):
        # The centre K (see _batchnorm.centers): the batch mean of pointwise(depthwise(x)) where
        # that is linear (no mid BN), else (a mid BN in eval mode, then ReLU) the running mean.
        mean = conv_batch_mean(x, pws, dil, dt, depthwise=dws)
        parts, offset = [], 0
        for (_, mid, pw), bn in zip(branches, bns):
            part = mean[offset:offset + pw.out_channels]
            if mid is not None:
                part = running_centre(bn, dt, x.device)
            parts.append(part)
            offset += pw.out_channels
        k = centers(bns, dt, x.device, estimate=torch.cat(parts))
        raw, s, ss = AF.separable_conv(x, dws, dil, ms, msh, "relu", pws, None, -k, None, act="none",
                                       compute_stats=True, backend=backend)
        return batch_norm_act(raw, bns, k, 1, s, ss, out_dtype=x.dtype)
    scale, shift = eval_affine_all(bns, dt, x.device)
    out, _, _ = AF.separable_conv(x, dws, dil, ms, msh, "relu", pws, scale, shift, None, act="relu", backend=backend)
    return out
