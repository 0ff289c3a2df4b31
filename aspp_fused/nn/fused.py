"""FusedModule and the building blocks shared by every fused head.

A fused module *adopts the children* of the module it replaces (the very same submodule
objects), so it has exactly the same parameters, buffers and state_dict keys, an optimizer
built before conversion keeps training the same tensors, and reverting just hands the
original back. Only ``forward`` differs: it calls the fused ops (aspp_fused.functional).
"""
import inspect
import os
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from aspp_fused import functional as AF
from aspp_fused import torch_backend
from aspp_fused._tracing import size_checks
from aspp_fused.nn import reference
from aspp_fused.nn._batchnorm import affine, centers, conv_batch_mean, running_centre, uses_batch_stats

__all__ = ["FusedModule", "FusedAtrousConvBNReLU", "FusedSeparableAtrousConv", "conv_bn_act"]


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def like_input_format(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The fused ops return channels_last; hand back the layout the caller gave us.

    Drop-in means the same numbers *and* the same layout as the original (whose dropout
    masks, for one, depend on it). Pass channels_last inputs to skip this copy.
    """
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


class FusedModule(nn.Module):
    """Base of every fused module: same children as the reference ``twin``, fused forward.

    ``FusedX(*args, backend=...)`` builds the twin's layout; ``FusedX.from_module(m)``
    adopts the children of an existing module ``m`` (torchvision, smp or our twin);
    ``to_reference()`` gives back that module (or the twin built at construction).
    """

    twin: type = None  # the reference class this module reproduces

    def __init__(self, *args, backend: str = "auto", **kwargs):
        twin = type(self).twin
        sig = inspect.signature(twin)
        try:
            unknown = [k for k in kwargs if k not in sig.parameters]
            if unknown:
                raise TypeError("unexpected keyword argument %s" % ", ".join(map(repr, unknown)))
            sig.bind(*args, **kwargs)
        except TypeError as exc:  # name this class and its arguments, not the twin's __init__
            raise TypeError("%s%s: %s; expected %s%s (the arguments of its twin %s, plus backend=)"
                            % (type(self).__name__, _call_repr(args, kwargs), exc, type(self).__name__, sig,
                               twin.__name__)) from None
        self._adopt(twin(*args, **kwargs), backend)

    @property
    def backend(self) -> str:
        return self.__dict__["_backend"]

    @backend.setter
    def backend(self, value: str):
        # Checked when set, so `m.backend = "cuda"` fails here and not at the next forward.
        self.__dict__["_backend"] = AF.check_backend(value)

    def _adopt(self, source: nn.Module, backend: str):
        nn.Module.__init__(self)
        self.backend = backend
        for name, child in source.named_children():
            self._modules[name] = child
        self.training = source.training
        # Not a child: kept outside the module tree so it adds no state_dict keys.
        object.__setattr__(self, "_source", source)

    @classmethod
    def check_source(cls, module: nn.Module) -> None:
        """Raises ValueError saying why ``module`` cannot be fused by this class."""
        raise NotImplementedError

    @classmethod
    def from_module(cls, module: nn.Module, backend: str = "auto") -> "FusedModule":
        if not isinstance(module, nn.Module):
            raise TypeError("%s.from_module: module must be an nn.Module (a %s), got %s"
                            % (cls.__name__, cls.twin.__name__, type(module).__name__))
        cls.check_source(module)
        fused = cls.__new__(cls)
        fused._adopt(module, backend)
        return fused

    def to_reference(self) -> nn.Module:
        source = self.__dict__["_source"]
        for name, child in self.named_children():  # children may have been converted/reverted since
            source._modules[name] = child
        source.training = self.training
        return source

    def extra_repr(self) -> str:
        return "backend=%r" % (self.backend,)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling anything. The fused
        # forwards pick a backend, fold BN and check arguments in Python, which TorchScript
        # cannot compile (it died inside its frontend, and a second try said "Can't redefine
        # method: forward"): refuse up front, naming what does work.
        raise RuntimeError(
            "%s (aspp_fused) cannot be compiled by torch.jit.script: use torch.compile(model), or "
            "torch.export.export(model, args) / torch.onnx.export(model, args, dynamo=True) to deploy "
            "(torch.jit.trace also works); aspp_fused.revert(model) gives back scriptable modules"
            % type(self).__name__)


def _call_repr(args, kwargs) -> str:
    return "(%s)" % ", ".join([repr(a) for a in args] + ["%s=%r" % kv for kv in kwargs.items()])


# --------------------------------------------------------------------------- structure checks


def _fail(owner: str, where: str, why: str):
    raise ValueError("%s.from_module: %s %s" % (owner, where, why))


def check_type(owner, where, module, types):
    if not isinstance(module, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        _fail(owner, where, "is %s, expected %s" % (type(module).__name__, names))


def conv_problem(conv: nn.Conv2d, kernel_sizes=(1, 3), depthwise=False) -> Optional[Tuple[str, str]]:
    """Why the fused ops cannot run ``conv`` (a 'same'-padded, stride-1, square conv, groups=1 or
    depthwise), or None: (short reason for convert's report, "has X, expected Y" detail for
    from_module's error). The one statement of the rule, checked in this order."""
    k, d, s = conv.kernel_size, conv.dilation, conv.stride
    if tuple(s) != (1, 1):
        return ("stride %d" % s[0] if s[0] == s[1] else "stride %s" % (tuple(s),),
                "has stride %s, expected 1" % (s,))
    if k[0] != k[1] or k[0] not in kernel_sizes:
        return "kernel %dx%d" % tuple(k), "has kernel_size %s, expected one of %s (square)" % (k, kernel_sizes)
    if d[0] != d[1]:
        return "dilation %s (unequal)" % (tuple(d),), "has dilation %s, expected equal rates for H and W" % (d,)
    groups = conv.in_channels if depthwise else 1
    if conv.groups != groups or (depthwise and conv.out_channels != conv.in_channels):
        return "groups=%d" % conv.groups, "has groups=%d (in %d, out %d), expected %s" % (
            conv.groups, conv.in_channels, conv.out_channels, "a depthwise conv" if depthwise else "groups=1")
    if conv.padding_mode != "zeros":
        return ("padding_mode %r" % conv.padding_mode,
                "has padding_mode %r, expected 'zeros'" % conv.padding_mode)
    if isinstance(conv.padding, str):
        if conv.padding != "same" and k[0] != 1:
            return "padding %r (not 'same')" % conv.padding, "has padding %r, expected 'same'" % conv.padding
    elif tuple(conv.padding) != (d[0] * (k[0] // 2),) * 2:
        return ("padding %s (not 'same')" % (tuple(conv.padding),),
                "has padding %s, expected dilation * (k // 2) = %d" % (conv.padding, d[0] * (k[0] // 2)))
    return None


def check_conv(owner: str, where: str, conv, kernel_sizes=(1, 3), depthwise=False):
    """A conv the fused ops can run (conv_problem), else from_module's ValueError."""
    check_type(owner, where, conv, nn.Conv2d)
    problem = conv_problem(conv, kernel_sizes, depthwise)
    if problem is not None:
        _fail(owner, where, problem[1])


def check_bn(owner: str, where: str, bn, channels: int):
    check_type(owner, where, bn, (nn.BatchNorm2d, nn.SyncBatchNorm))
    if bn.num_features != channels:
        _fail(owner, where, "has %d features, expected %d" % (bn.num_features, channels))


def check_cbr(owner: str, where: str, seq, kernel_sizes=(1, 3)):
    """[Conv2d, BatchNorm2d, ReLU] (an nn.Sequential, e.g. torchvision's ASPPConv)."""
    check_type(owner, where, seq, nn.Sequential)
    if len(seq) != 3:
        _fail(owner, where, "has %d children, expected 3 (Conv2d, BatchNorm2d, ReLU)" % len(seq))
    check_conv(owner, where + "[0]", seq[0], kernel_sizes)
    check_bn(owner, where + "[1]", seq[1], seq[0].out_channels)
    check_type(owner, where + "[2]", seq[2], nn.ReLU)


# --------------------------------------------------------------------------- fused conv + BN + act


class FoldCache:
    """Eval-mode BN folded into the conv weights, kept until one of its sources changes.

    Folding costs a pass over the weights per forward (measured on the CPU end-to-end
    DeepLabV3 head: 144.5 ms per call refolding vs 130.3 ms cached, eager_cl 134.7 ms).
    Entries hold their source tensors and compare identity, version counter and storage
    pointer, so an optimizer step, load_state_dict, an in-place edit under no_grad, a replaced
    parameter or .to() all invalidate them. The price is one folded copy of the head's conv
    weights while the module is in eval mode.

    The one edit no version counter sees is an in-place write through ``.data``
    (``p.data.mul_(...)``: PyTorch gives ``.data`` a fresh counter, which is also why autograd
    cannot catch it); after such an edit call ``aspp_fused.clear_caches(model)``, or run with
    ``ASPP_FUSED_FOLD_CACHE=0`` (read at each call) to fold on every call.
    """

    def __init__(self):
        self.entries = {}

    @staticmethod
    def _signature(sources):
        return [(t, t._version, t.data_ptr()) for t in sources if t is not None]

    def get(self, key, sources, compute):
        sig = self._signature(sources)
        entry = self.entries.get(key)
        if entry is not None and len(entry[0]) == len(sig) and all(
                a[0] is b[0] and a[1:] == b[1:] for a, b in zip(entry[0], sig)):
            return entry[1]
        value = compute()
        self.entries[key] = (sig, value)
        return value


def clear_caches(model: nn.Module) -> nn.Module:
    """Drop every folded-weight cache in ``model`` (see FoldCache: needed only after in-place
    edits through ``.data``). Returns the model."""
    for m in model.modules():
        cache = m.__dict__.get("_fold_cache")
        if cache is not None:
            cache.entries.clear()
    return model


def fold_cache_enabled() -> bool:
    return os.environ.get("ASPP_FUSED_FOLD_CACHE", "1") != "0"


def fold_cache(module: nn.Module) -> FoldCache:
    """The module's FoldCache (a plain attribute: no state_dict keys, copied by deepcopy)."""
    cache = module.__dict__.get("_fold_cache")
    if cache is None:
        cache = FoldCache()
        object.__setattr__(module, "_fold_cache", cache)
    return cache


def _bn_tensors(bns):
    return [t for bn in bns for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)]


def conv_bn_act(x, convs: Sequence[nn.Conv2d], bns, backend: str, act="relu", weights=None,
                sample_bias: Optional[torch.Tensor] = None, cache: Optional[FoldCache] = None, cache_key=None):
    """act(BN(concat_b conv_b(x) + sample_bias)) with the BN as the fused epilogue.

    ``weights`` overrides the convs' weights (e.g. a slice of the projection weight);
    conv biases, if any, are folded in. ``sample_bias`` [N, O] is added before the BN.
    In training the op returns the raw conv output and its per-channel sums, BN takes
    the batch statistics from them, and the normalise + act runs as one elementwise pass.
    """
    dt = acc_dtype(x)
    weights = [c.weight for c in convs] if weights is None else list(weights)
    dilations = [c.dilation[0] for c in convs]
    biases = [c.bias for c in convs]
    o = sum(w.shape[0] for w in weights)
    conv_bias = None
    if any(b is not None for b in biases):
        conv_bias = torch.cat([(b if b is not None else w.new_zeros(w.shape[0])).to(dt)
                               for b, w in zip(biases, weights)])
    n, _, h, w_ = x.shape
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
        scale, shift = affine(bns, s, ss, n * h * w_, (n, o, h, w_), dt, x.device, center=k)
        y = raw.to(dt) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        if AF.act_code(act) == 1:
            y = torch.relu(y)
        return y.to(x.dtype)

    def bn_affine():
        sc, sh = affine(bns, None, None, 0, None, dt, x.device)
        if conv_bias is not None:
            sh = sh + conv_bias * sc
        return sc, sh

    sources = list(weights) + biases + _bn_tensors(bns)
    # Not while tracing either: a traced graph would hold the folded weights as constants, and a
    # later load_state_dict on the traced module would not reach them. Not in auto's benchmark
    # mode: it measures per call arguments, and the folded ones would make the eager decisions
    # keys that a compiled graph (which never folds) does not look up.
    if (cache is not None and fold_cache_enabled() and AF.resolve_backend(backend, x) == "torch"
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
    out, _, _ = AF.atrous_conv(x, weights, dilations, scale, shift, sample_bias, act=act, backend=backend)
    return out


def check_input(owner: str, x, channels: int, weight: Optional[torch.Tensor] = None):
    """``weight``: a parameter of the module; the input must have its dtype (outside autocast)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError("%s: input must be a torch.Tensor, got %s" % (owner, type(x).__name__))
    if x.dim() != 4:
        raise ValueError("%s: input must be 4-D [N, C, H, W], got shape %s" % (owner, tuple(x.shape)))
    with size_checks():
        if x.shape[1] != channels:
            raise ValueError("%s: input has %d channels, expected %d" % (owner, x.shape[1], channels))
    if (weight is not None and x.dtype != weight.dtype and x.is_floating_point()
            and not torch.is_autocast_enabled(x.device.type)):
        raise TypeError("%s: input has dtype %s, expected the module's parameter dtype %s (convert one: "
                        "module.to(%s) or input.to(%s))" % (owner, x.dtype, weight.dtype, x.dtype, weight.dtype))


class FusedAtrousConvBNReLU(FusedModule, nn.Sequential):
    """Fused [Conv2d (1x1 or dilated 3x3), BatchNorm2d, ReLU] (e.g. torchvision's ASPPConv)."""

    twin = reference.AtrousConvBNReLU

    @classmethod
    def check_source(cls, module):
        check_cbr(cls.__name__, "module", module)

    def forward(self, x):
        check_input(type(self).__name__, x, self[0].in_channels, self[0].weight)
        return like_input_format(conv_bn_act(x, [self[0]], [self[1]], self.backend, cache=fold_cache(self),
                                             cache_key=0), x)


def separable_branch_args(owner: str, sep: nn.Sequential, where: str):
    """(depthwise conv, mid BN or None, pointwise conv) of a SeparableConv2d layout."""
    check_type(owner, where, sep, nn.Sequential)
    if len(sep) == 2:
        dw, mid, pw = sep[0], None, sep[1]
    elif len(sep) == 4:
        dw, mid, pw = sep[0], sep[1], sep[3]
        check_bn(owner, where + "[1]", mid, dw.out_channels)
        check_type(owner, where + "[2]", sep[2], nn.ReLU)
    else:
        _fail(owner, where, "has %d children, expected (depthwise, pointwise) or (depthwise, BN, ReLU, pointwise)"
              % len(sep))
    check_conv(owner, where + "[0]", dw, (3,), depthwise=True)
    if dw.bias is not None:
        _fail(owner, where + "[0]", "has a bias; the fused separable conv expects bias=False on the depthwise")
    check_conv(owner, where + "[-1]", pw, (1,))
    if pw.in_channels != dw.out_channels:
        _fail(owner, where + "[-1]", "has %d input channels, expected %d" % (pw.in_channels, dw.out_channels))
    return dw, mid, pw


def separable_bn_act(x, branches, bns, backend):
    """Concat over branches of ReLU(BN(pointwise(mid(depthwise(x))))).

    ``branches``: (depthwise conv or None, mid BN or None, pointwise conv) per branch.
    Eval: one separable_conv launch for all branches. Training with a mid BN needs the batch
    statistics of the depthwise output before the pointwise can start, so that case runs
    in two steps (depthwise + mid BN, then the pointwise through the fused 1x1 path).
    """
    dt = acc_dtype(x)
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
                    n, _, h, w = y.shape
                    yd = y.to(dt)
                    k = centers([mid], dt, x.device, estimate=yd.mean((0, 2, 3)) if yd.numel() else None)
                    zd = yd - k.view(1, -1, 1, 1)
                    s, ss = zd.sum((0, 2, 3)), (zd * zd).sum((0, 2, 3))
                    ms, msh = affine([mid], s, ss, n * h * w, tuple(y.shape), dt, x.device, center=k)
                    y = torch.relu(zd * ms.view(1, -1, 1, 1) + msh.view(1, -1, 1, 1)).to(x.dtype)
            outs.append(conv_bn_act(y, [pw], [bn], backend))
        return torch.cat(outs, dim=1)
    dws = [dw.weight if dw is not None else None for dw, _, _ in branches]
    dil = [dw.dilation[0] if dw is not None else 1 for dw, _, _ in branches]
    mid_affines = [affine([mid], None, None, 0, None, dt, x.device) if mid is not None else (None, None)
                   for _, mid, _ in branches]
    pws = [pw.weight for _, _, pw in branches]
    o = sum(w.shape[0] for w in pws)
    n, _, h, w_ = x.shape
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
        scale, shift = affine(bns, s, ss, n * h * w_, (n, o, h, w_), dt, x.device, center=k)
        return torch.relu(raw.to(dt) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(x.dtype)
    scale, shift = affine(bns, None, None, 0, None, dt, x.device)
    out, _, _ = AF.separable_conv(x, dws, dil, ms, msh, "relu", pws, scale, shift, None, act="relu", backend=backend)
    return out


class FusedSeparableAtrousConv(FusedModule, nn.Sequential):
    """Fused [SeparableConv2d (depthwise dilated 3x3 [-> BN -> ReLU] -> pointwise), BN, ReLU]."""

    twin = reference.SeparableAtrousConv

    @classmethod
    def check_source(cls, module):
        owner = cls.__name__
        check_type(owner, "module", module, nn.Sequential)
        if len(module) != 3:
            _fail(owner, "module", "has %d children, expected 3 (SeparableConv2d, BatchNorm2d, ReLU)" % len(module))
        _, _, pw = separable_branch_args(owner, module[0], "module[0]")
        check_bn(owner, "module[1]", module[1], pw.out_channels)
        check_type(owner, "module[2]", module[2], nn.ReLU)

    def forward(self, x):
        owner = type(self).__name__
        dw, mid, pw = separable_branch_args(owner, self[0], "[0]")
        check_input(owner, x, dw.in_channels)
        return like_input_format(separable_bn_act(x, [(dw, mid, pw)], [self[1]], self.backend), x)
