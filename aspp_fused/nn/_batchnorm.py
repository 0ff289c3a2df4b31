"""BatchNorm as an epilogue: per-channel (scale, shift) from running or batch statistics.

The fused ops apply ``z * scale + shift``; this file turns one or more BatchNorm2d modules
(one per branch, concatenated along channels) into those vectors, with exactly the
semantics of ``nn.BatchNorm2d.forward``: batch statistics in training or when running
stats are not tracked, running-stat updates with ``momentum`` (or the cumulative average
when it is None) and the unbiased variance, ``num_batches_tracked``, the batch-of-1 error,
and SyncBatchNorm's cross-process statistics under torch.distributed.
"""
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from aspp_fused._dtypes import acc_dtype

Stats = Tuple[torch.Tensor, torch.Tensor]


def uses_batch_stats(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    return bn.training or bn.running_mean is None


def _affine_params(bn, dtype, device):
    c = bn.num_features
    w = bn.weight if bn.weight is not None else torch.ones(c, dtype=dtype, device=device)
    b = bn.bias if bn.bias is not None else torch.zeros(c, dtype=dtype, device=device)
    return w.to(dtype), b.to(dtype)


def eval_affine(bn, dtype, device) -> Stats:
    """(scale, shift) of a BN that normalises with its running statistics."""
    w, b = _affine_params(bn, dtype, device)
    scale = w * torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    return scale, b - bn.running_mean.to(dtype) * scale


def _sync_group(bn):
    """The process group whose statistics a SyncBatchNorm in training shares, or None."""
    if not isinstance(bn, nn.SyncBatchNorm) or not bn.training:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group if bn.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _check_batch(count: int, shape):
    if count == 1:
        # nn.BatchNorm2d's own error (torch.nn.functional._verify_batch_size), same type and text.
        raise ValueError("Expected more than 1 value per channel when training, got input size %s"
                         % (torch.Size(shape),))


def _momentum_factor(bn) -> float:
    """nn.BatchNorm2d.forward: bumps num_batches_tracked and returns the update factor."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return factor


def _tap_box_sums(xsum: torch.Tensor, k: int, rate: int) -> torch.Tensor:
    """[C, k, k]: for each tap (a, b) of a k x k conv at ``rate`` ('same' zero padding, stride
    1), the sum of ``xsum`` [C, H, W] over the input pixels that tap reads. Masks built from
    aranges, so the sizes may be symbolic (torch.compile / export) without a guard."""
    _, h, w = xsum.shape
    offsets = (torch.arange(k, device=xsum.device) - k // 2) * rate

    def mask(size):  # [k, size]: input index i is read by tap offset t at output i - t in [0, size)
        out = torch.arange(size, device=xsum.device).unsqueeze(0) - offsets.unsqueeze(1)
        return ((out >= 0) & (out < size)).to(xsum.dtype)

    return torch.einsum("chw,ah,bw->cab", xsum, mask(h), mask(w))


def conv_batch_mean(x: torch.Tensor, weights, rates, dtype, depthwise=None) -> torch.Tensor:
    """The per-channel mean over (N, H, W) of concat_b conv_b(x) (no bias), without running a
    convolution: by linearity it is sum_tap W[tap] . (sum of x over the pixels the tap reads),
    from one sum over the batch and per-tap box sums, O(N*C*H*W + taps*C*O) (at the OS16 head,
    batch 16, that is one read of x beside the ~10^12 multiply-adds of the convolution).

    ``weights``: per branch [O_b, C, k, k]; ``depthwise``: per branch None or a depthwise
    weight [C, 1, 3, 3] applied first (a separable branch with no mid BN: linear too), in which
    case the branch's weight is the pointwise [O_b, C, 1, 1] and ``rates`` are the depthwise's.
    Everything detached: this is a centre for the batch statistics (see ``centers``), where
    rounding does not matter, only closeness to the batch mean.
    """
    n, _, h, w = x.shape
    xsum = x.detach().sum(0, dtype=dtype)  # accumulates in dtype without a full-size cast copy
    means = []
    for i, (wt, r) in enumerate(zip(weights, rates)):
        dw = None if depthwise is None else depthwise[i]
        wt = wt.detach().to(dtype)
        if dw is not None:  # pointwise(depthwise(x)): the depthwise's per-channel mean, then the 1x1
            box = _tap_box_sums(xsum, dw.shape[-1], r)
            means.append(wt.flatten(1) @ torch.einsum("cab,cab->c", dw.detach().to(dtype)[:, 0], box))
        elif wt.shape[-1] == 1:  # the einsum below gives the same up to rounding; a matmul is cheaper
            means.append(wt.flatten(1) @ xsum.sum((1, 2)))
        else:
            means.append(torch.einsum("ocab,cab->o", wt, _tap_box_sums(xsum, wt.shape[-1], r)))
    return torch.cat(means) / max(n * h * w, 1)


def running_centre(bn, dtype, device) -> torch.Tensor:
    """The centre of a BN whose batch mean has no estimate: its running mean, else 0."""
    if bn.running_mean is not None:
        return bn.running_mean.detach().to(dtype)
    return torch.zeros(bn.num_features, dtype=dtype, device=device)


def centers(bns: Sequence[nn.modules.batchnorm._BatchNorm], dtype, device, estimate=None) -> torch.Tensor:
    """Per-channel centres K for the batch statistics of ``bns`` (concatenated).

    The kernels sum z - K and (z - K)^2 rather than z and z^2: the variance is then
    E[(z-K)^2] - E[z-K]^2, which loses nothing to cancellation when K is close to the batch
    mean, whereas the relative rounding error of the variance grows as (mean - K)^2 / var.
    K is any constant (the result is exact for every K), so K is ``estimate`` when the caller
    has one (``conv_batch_mean``: the batch mean of a convolution's output from box sums of
    its input, or the exact mean of a tiny tensor), else the running mean. The running mean
    alone is not close enough: in the module fuzz, 1 train-mode case in 10-15 (batch mean 2-450
    standard deviations from the running mean) gave weight gradients 10-40x less accurate
    than the fp32 twin's. ``estimate`` is detached. SyncBatchNorm ranks must share K so
    their sums add up: rank 0's is broadcast.
    """
    if estimate is not None:
        k = estimate.detach().to(dtype)
    else:
        parts = [running_centre(bn, dtype, device) for bn in bns]
        k = parts[0] if len(parts) == 1 else torch.cat(parts)
    group = next((g for g in (_sync_group(bn) for bn in bns) if g is not None), None)
    if group is not None:
        import torch.distributed as dist

        k = k.contiguous()
        dist.broadcast(k, src=dist.get_global_rank(group, 0), group=group)
    return k


def eval_affine_all(bns: Sequence[nn.modules.batchnorm._BatchNorm], dtype, device) -> Stats:
    """(scale, shift) of ``bns`` (concatenated in order), each normalising with its running
    statistics: ``BN(v) = v * scale + shift``. Only for BNs that do not use batch statistics."""
    parts = [eval_affine(bn, dtype, device) for bn in bns]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def batch_norm_act(z: torch.Tensor, bns: Sequence[nn.modules.batchnorm._BatchNorm], center: Optional[torch.Tensor],
                   act: int, ch_sum: Optional[torch.Tensor] = None, ch_sumsq: Optional[torch.Tensor] = None,
                   out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """act(BN(z + center)), the channels of z [N, O, ...] normalised by ``bns`` (concatenated in
    order): the one train-mode BatchNorm step of every fused module.

    ``ch_sum`` / ``ch_sumsq``: the per-channel sums of z and z^2 over every dim but 1 (the ops'
    statistics); None: summed here. BNs that use batch statistics take them from these sums
    (SyncBatchNorm: summed over its process group) and update their running statistics; the
    others apply their running statistics. ``act``: 0 none, 1 ReLU. The result has
    ``out_dtype`` (default z's); the arithmetic is in float32 (float64 for float64).

    The backward is BatchNorm's own closed form (``_NormAct``), one pass over z, as ATen's
    batch_norm backward: autograd through the sums would reach the same value along a longer
    path whose rounding cancels badly where the BN's input gradient is near zero (the module
    fuzz's last misses: 1.6e-5 against a 1.8e-6 twin). The sums therefore get no gradient.
    """
    dt = acc_dtype(z.dtype)
    device = z.device
    dims = [d for d in range(z.dim()) if d != 1]
    count = 1
    for d in dims:
        count = count * z.shape[d]
    if ch_sum is None and any(uses_batch_stats(bn) for bn in bns):
        zd = z.detach().to(dt)
        ch_sum, ch_sumsq = zd.sum(dims), (zd * zd).sum(dims)
    means, invstds, weights, biases, batch, counts, synced = [], [], [], [], [], [], []
    offset = 0
    for bn in bns:
        c = bn.num_features
        k = None if center is None else center[offset:offset + c].detach().to(dt)
        w, b = _affine_params(bn, dt, device)
        weights.append(w)
        biases.append(b)
        if uses_batch_stats(bn):
            mean_z, var, n = _batch_moments(bn, ch_sum[offset:offset + c].detach().to(dt),
                                            ch_sumsq[offset:offset + c].detach().to(dt), count, tuple(z.shape), k)
            group = _sync_group(bn)
            if group is not None:
                synced.append((offset, c, group))
            counts.append(torch.full((c,), float(max(n, 1)), dtype=dt, device=device))
            batch.append(torch.ones(c, dtype=torch.bool, device=device))
        else:
            mean_z = bn.running_mean.detach().to(dt)
            if k is not None:
                mean_z = mean_z - k
            var = bn.running_var.detach().to(dt)
            counts.append(torch.ones(c, dtype=dt, device=device))
            batch.append(torch.zeros(c, dtype=torch.bool, device=device))
        means.append(mean_z)
        invstds.append(torch.rsqrt(var + bn.eps))
        offset += c

    def cat(ts):
        return ts[0] if len(ts) == 1 else torch.cat(ts)

    return _NormAct.apply(z, cat(means), cat(invstds), cat(weights), cat(biases), cat(batch), cat(counts), synced,
                          int(act), out_dtype or z.dtype)


def _batch_moments(bn, s, ss, count: int, shape, center):
    """(mean of z, biased variance, count) of a BN's batch, from the sums of z and z^2
    (SyncBatchNorm: over its process group); updates the running statistics."""
    group = _sync_group(bn)
    if group is not None:
        import torch.distributed as dist

        packed = torch.cat([s, ss, s.new_full((1,), float(count))])
        dist.all_reduce(packed, group=group)
        c = bn.num_features
        s, ss, count = packed[:c], packed[c:2 * c], int(packed[2 * c].item())
    _check_batch(count, shape)  # SyncBatchNorm checks the global count
    factor = _momentum_factor(bn)
    n = max(count, 1)
    mean_z = s / n
    # Clamp the rounding-level negatives of a constant channel.
    var = torch.clamp(ss / n - mean_z * mean_z, min=0.0)
    if bn.training and bn.track_running_stats and bn.running_mean is not None and count > 0:
        with torch.no_grad():
            mean = mean_z if center is None else mean_z + center
            unbiased = var * (count / (count - 1)) if count > 1 else var
            bn.running_mean.mul_(1.0 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
            bn.running_var.mul_(1.0 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)
    return mean_z, var, count


class _NormAct(torch.autograd.Function):
    """y = act((z - mean) * invstd * weight + bias) per channel (dim 1), with BatchNorm's backward.

    ``mean`` / ``invstd`` are constants to autograd; for the channels marked ``batch`` they are
    the batch's own moments, and the backward adds their dependence on z in closed form:
    g_z = weight * invstd * (g - mean(g) - xhat * mean(g * xhat)), xhat = (z - mean) * invstd,
    the means over the batch (``count`` elements; SyncBatchNorm: both sums over the process
    group of each ``synced`` (offset, channels, group) segment). The other channels are a plain
    affine: g_z = g * weight * invstd. g_weight / g_bias are the local sums of g * xhat / g, as
    nn.BatchNorm2d's.
    Not twice differentiable (the moments' second-order terms are not modelled): a double
    backward raises.
    """

    @staticmethod
    def forward(ctx, z, mean, invstd, weight, bias, batch, count, synced, act, out_dtype):
        dt = mean.dtype
        shape = [1, -1] + [1] * (z.dim() - 2)
        y = (z.to(dt) - mean.view(shape)) * (invstd * weight).view(shape) + bias.view(shape)
        if act == 1:
            y = torch.relu(y)
        ctx.save_for_backward(z, mean, invstd, weight, bias, batch, count)
        ctx.synced, ctx.act = synced, act
        return y.to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        z, mean, invstd, weight, bias, batch, count = ctx.saved_tensors
        dt = mean.dtype
        shape = [1, -1] + [1] * (z.dim() - 2)
        dims = [d for d in range(z.dim()) if d != 1]
        # In the order of ATen's CPU batch_norm backward: centred values, their dot product with
        # g, and invstd applied to the sums (not to every term).
        centred = z.to(dt) - mean.view(shape)
        g = g.to(dt)
        if ctx.act == 1:
            y = centred * (invstd * weight).view(shape) + bias.view(shape)
            g = torch.where(y > 0, g, torch.zeros((), dtype=dt, device=g.device))
        sum_g, dotp = g.sum(dims), (g * centred).sum(dims)
        grad_w = dotp * invstd if ctx.needs_input_grad[3] else None
        grad_b = sum_g if ctx.needs_input_grad[4] else None
        grad_z = None
        if ctx.needs_input_grad[0]:
            glob_g, glob_dotp = sum_g, dotp
            if ctx.synced:
                import torch.distributed as dist

                glob_g, glob_dotp = sum_g.clone(), dotp.clone()
                for offset, c, group in ctx.synced:
                    packed = torch.cat([glob_g[offset:offset + c], glob_dotp[offset:offset + c]])
                    dist.all_reduce(packed, group=group)
                    glob_g[offset:offset + c], glob_dotp[offset:offset + c] = packed[:c], packed[c:]
            zero = torch.zeros((), dtype=dt, device=g.device)
            mean_g = torch.where(batch, glob_g / count, zero)
            proj = torch.where(batch, glob_dotp * invstd * invstd / count, zero)
            grad_z = ((g - mean_g.view(shape) - centred * proj.view(shape)) * (invstd * weight).view(shape))
            grad_z = grad_z.to(z.dtype)
        return grad_z, None, None, grad_w, grad_b, None, None, None, None, None
