"""Fused ASPP heads: v3 (FusedASPP), v3+ (FusedSeparableASPP), v2 (FusedASPPv2), LR-ASPP,
and torchvision's DeepLabHead.

ASPP v3 / v3+ forward (docs/DESIGN.md): all conv branches in one fused launch writing their
channel slice of one buffer; the image-pooling branch (constant over space) enters the
projection as a per-sample bias, ``proj(cat(h_1..h_k, pool)) = W_main h + W_pool p``, so
neither the pooled map nor the concat with it is ever materialised at H x W.
"""
import torch
import torch.nn.functional as F
from torch import nn

from aspp_fused import functional as AF
from aspp_fused.nn import reference
from aspp_fused.nn._batchnorm import batch_norm_act, centers, eval_affine_all, uses_batch_stats
from aspp_fused.nn._checks import (_fail, check_bn, check_cbr, check_conv, check_input, check_sequential,
                                   check_type, separable_branch_args, separable_parts)
from aspp_fused._dtypes import acc_dtype
from aspp_fused.nn._conv_bn import aspp_bn_act, conv_bn_act, conv_sum, like_input_format, separable_bn_act
from aspp_fused.nn._fold_cache import fold_cache
from aspp_fused.nn.fused import FusedModule

__all__ = ["FusedASPP", "FusedSeparableASPP", "FusedASPPv2", "FusedLRASPPHead", "FusedDeepLabHead"]


def _check_pooling(owner, where, pool):
    check_type(owner, where, pool, nn.Sequential)
    if len(pool) != 4:
        _fail(owner, where, "has %d children, expected 4 (AdaptiveAvgPool2d(1), Conv2d, BatchNorm2d, ReLU)"
              % len(pool))
    check_type(owner, where + "[0]", pool[0], nn.AdaptiveAvgPool2d)
    if pool[0].output_size not in (1, (1, 1)):
        _fail(owner, where + "[0]", "has output_size %s, expected 1" % (pool[0].output_size,))
    check_cbr(owner, where + "[1:]", nn.Sequential(pool[1], pool[2], pool[3]), (1,))


def _check_project(owner, project, in_channels):
    check_type(owner, "project", project, nn.Sequential)
    if len(project) not in (3, 4):
        _fail(owner, "project", "has %d children, expected Conv2d, BatchNorm2d, ReLU[, Dropout]" % len(project))
    check_cbr(owner, "project[:3]", nn.Sequential(project[0], project[1], project[2]), (1,))
    if project[0].in_channels != in_channels:
        _fail(owner, "project[0]", "has %d input channels, expected %d (all branches concatenated)"
              % (project[0].in_channels, in_channels))
    if len(project) == 4:
        check_type(owner, "project[3]", project[3], nn.Dropout)


def _check_convs_list(owner, module):
    """module.convs: a ModuleList of conv branches followed by the image pooling."""
    convs = getattr(module, "convs", None)
    if convs is None:
        _fail(owner, "module", "is a %s, not an ASPP: expected a module with `convs` (an nn.ModuleList of conv "
              "branches followed by the image pooling) and `project`, as torchvision's ASPP" % type(module).__name__)
    check_type(owner, "convs", convs, nn.ModuleList)
    if len(convs) < 2:
        _fail(owner, "convs", "has %d branches, expected conv branches followed by the pooling" % len(convs))
    return convs


def _check_pool_and_project(owner, module, readers, branch_channels):
    """The conv branches read one input (``readers``: the conv reading the input in each branch,
    ``where`` names of them), then the pooling branch and a projection reading all branches + the
    pooling."""
    c = readers[0][1].in_channels
    for where, conv in readers:
        if conv.in_channels != c:
            _fail(owner, where, "has %d input channels, expected %d" % (conv.in_channels, c))
    convs = module.convs
    _check_pooling(owner, "convs[-1]", convs[-1])
    _check_project(owner, getattr(module, "project", None), branch_channels + convs[-1][1].out_channels)


def _pool_vector(pool, x):
    """The image-pooling branch (GAP -> 1x1 conv -> BN -> ReLU) before its broadcast: [N, O]."""
    return pool_vector(pool[1], pool[2], x)


def pool_vector(conv, bn, x):
    """Image pooling before its broadcast, [N, O]: mean over H, W -> 1x1 conv [-> BN] -> ReLU.

    Tiny, so plain ATen; the BN through the fused heads' helpers (batch statistics, running
    statistics, the batch-of-1 error, SyncBatchNorm)."""
    dt = acc_dtype(x.dtype)
    y = x.mean(dim=(2, 3), dtype=dt) @ conv.weight.flatten(1).to(dt).t()
    if conv.bias is not None:
        y = y + conv.bias.to(dt)
    if bn is None:
        return torch.relu(y)
    if uses_batch_stats(bn):
        k = centers([bn], dt, x.device, estimate=y.mean(0) if y.shape[0] > 0 else None)
        # As [N, O, 1, 1]: the batch-of-1 error names the shape the original BN saw.
        return batch_norm_act((y - k)[:, :, None, None], [bn], k, 1).flatten(1)
    scale, shift = eval_affine_all([bn], dt, x.device)
    return torch.relu(y * scale + shift)


def _main_columns(self):
    """The projection's input columns of the conv branches, [0, split); the pooled branch's
    follow. (From the modules, not h.shape[1]: a tracer records a tensor's size as a graph value,
    and the legacy ONNX exporter rejects a conv whose weight slice then has an unknown shape.)"""
    return self.project[0].in_channels - self.convs[-1][1].out_channels


def _pool_bias(self, x, p):
    """The pooled branch p [N, O] as the projection's per-sample bias [N, P]:
    proj(cat(h, broadcast(p))) = W_main h + W_pool p."""
    w_pool = self.project[0].weight[:, _main_columns(self):, 0, 0]
    return p.to(acc_dtype(x.dtype)) @ w_pool.to(acc_dtype(x.dtype)).t()


def _dropout(self, x, out):
    """The projection's dropout as the original's; the caller's layout."""
    if len(self.project) == 4:
        dropout = self.project[3]
        if dropout.training and dropout.p > 0:
            # The original's projection input is the concat with the (NCHW) pooled branch,
            # so its dropout always draws the mask over an NCHW tensor; drawing ours in the
            # same order gives the same mask for the same RNG state. Training only.
            out = dropout(out.contiguous())
    return like_input_format(out, x)


def _project(self, x, h, p):
    """project(cat(h, broadcast(p))) with p as a per-sample bias; dropout as the original."""
    out = conv_bn_act(h, [self.project[0]], [self.project[1]], self.backend, cols=[(0, _main_columns(self))],
                      sample_bias=_pool_bias(self, x, p), cache=fold_cache(self), cache_key="project")
    return _dropout(self, x, out)


class FusedASPP(FusedModule):
    """DeepLab v3 ASPP (torchvision's ASPP layout and state_dict), fused."""

    twin = reference.ASPP

    @classmethod
    def check_source(cls, module):
        owner = cls.__name__
        branches = list(_check_convs_list(owner, module))[:-1]
        for i, br in enumerate(branches):
            check_cbr(owner, "convs[%d]" % i, br)
        _check_pool_and_project(owner, module, [("convs[%d][0]" % i, br[0]) for i, br in enumerate(branches)],
                                sum(br[0].out_channels for br in branches))

    def forward(self, x):
        branches = list(self.convs)[:-1]
        check_input(type(self).__name__, x, branches[0][0].in_channels, branches[0][0].weight)
        convs = [b[0] for b in branches]
        cols = [sum(c.out_channels for c in convs[:i]) for i in range(len(convs))]
        out = aspp_bn_act(x, convs, [b[1] for b in branches], self.project[0], self.project[1], cols,
                          _pool_bias(self, x, _pool_vector(self.convs[-1], x)), self.backend, cache=fold_cache(self))
        return _dropout(self, x, out)


class FusedSeparableASPP(FusedModule):
    """DeepLab v3+ ASPP with separable branches (smp's layout; mid BN optional), fused."""

    twin = reference.SeparableASPP

    @classmethod
    def _branches(cls, convs):
        """(depthwise or None, mid BN or None, pointwise) and the output BN of each conv branch."""
        owner = cls.__name__
        out = []
        for i, br in enumerate(list(convs)[:-1]):
            check_type(owner, "convs[%d]" % i, br, nn.Sequential)
            if len(br) == 3 and isinstance(br[0], nn.Conv2d):
                check_cbr(owner, "convs[%d]" % i, br, (1,))
                out.append(((None, None, br[0]), br[1]))
            elif len(br) == 3:
                dw, mid, pw = separable_branch_args(owner, br[0], "convs[%d][0]" % i)
                check_bn(owner, "convs[%d][1]" % i, br[1], pw.out_channels)
                check_type(owner, "convs[%d][2]" % i, br[2], nn.ReLU)
                out.append(((dw, mid, pw), br[1]))
            else:
                _fail(owner, "convs[%d]" % i, "has %d children, expected 3" % len(br))
        return out

    @classmethod
    def check_source(cls, module):
        owner = cls.__name__
        branches = cls._branches(_check_convs_list(owner, module))
        # the conv reading the input: the depthwise where there is one (its channels are the pointwise's input)
        readers = [("convs[%d]" % i, dw if dw is not None else pw) for i, ((dw, _, pw), _) in enumerate(branches)]
        _check_pool_and_project(owner, module, readers, sum(pw.out_channels for (_, _, pw), _ in branches))

    @staticmethod
    def _branch_parts(convs):
        """_branches without the checks (check_source ran them at construction): the forward's."""
        return [((None, None, br[0]), br[1]) if isinstance(br[0], nn.Conv2d) else (separable_parts(br[0]), br[1])
                for br in list(convs)[:-1]]

    def forward(self, x):
        branches = self._branch_parts(self.convs)
        check_input(type(self).__name__, x, branches[0][0][2].in_channels, branches[0][0][2].weight)
        h = separable_bn_act(x, [b for b, _ in branches], [bn for _, bn in branches], self.backend)
        return _project(self, x, h, _pool_vector(self.convs[-1], x))


class FusedASPPv2(FusedModule):
    """DeepLab v2 ASPP: sum of dilated 3x3 classifier convs, one fused sum-mode launch."""

    twin = reference.ASPPv2

    @classmethod
    def check_source(cls, module):
        owner = cls.__name__
        convs = getattr(module, "convs", None)
        if convs is None:
            _fail(owner, "module", "is a %s, not an ASPP v2: expected a module with `convs` (an nn.ModuleList of "
                  "dilated 3x3 convs whose outputs are summed)" % type(module).__name__)
        check_type(owner, "convs", convs, nn.ModuleList)
        if len(convs) == 0:
            _fail(owner, "convs", "is empty")
        for i, conv in enumerate(convs):
            check_conv(owner, "convs[%d]" % i, conv)
            if conv.weight.shape[:2] != convs[0].weight.shape[:2]:
                _fail(owner, "convs[%d]" % i, "has weight shape %s, expected [%d, %d, k, k] like convs[0]"
                      % (tuple(conv.weight.shape), convs[0].out_channels, convs[0].in_channels))

    def forward(self, x):
        convs = list(self.convs)
        check_input(type(self).__name__, x, convs[0].in_channels, convs[0].weight)
        return like_input_format(conv_sum(x, convs, self.backend), x)


class FusedLRASPPHead(FusedModule):
    """LR-ASPP head (torchvision's LRASPPHead layout), fused.

    cbr is one fused 1x1 conv + BN + ReLU. The high-resolution classifier is linear and
    bilinear upsampling is a per-channel convex combination, so they commute:
    ``high_classifier(up(x * s)) == up(high_classifier(x * s))``; running the classifier
    first upsamples num_classes channels instead of inter_channels.
    """

    twin = reference.LRASPPHead

    @classmethod
    def check_source(cls, module):
        owner = cls.__name__
        check_cbr(owner, "cbr", getattr(module, "cbr", None), (1,))
        scale = getattr(module, "scale", None)
        check_type(owner, "scale", scale, nn.Sequential)
        if len(scale) != 3:
            _fail(owner, "scale", "has %d children, expected AdaptiveAvgPool2d, Conv2d, Sigmoid" % len(scale))
        check_type(owner, "scale[2]", scale[2], nn.Sigmoid)
        check_conv(owner, "low_classifier", getattr(module, "low_classifier", None), (1,))
        check_conv(owner, "high_classifier", getattr(module, "high_classifier", None), (1,))

    def forward(self, input):
        owner = type(self).__name__
        if not isinstance(input, dict) or "low" not in input or "high" not in input:
            raise TypeError("%s: input must be a dict with 'low' and 'high' tensors" % owner)
        low, high = input["low"], input["high"]
        check_input(owner + " (input['high'])", high, self.cbr[0].in_channels)
        check_input(owner + " (input['low'])", low, self.low_classifier.in_channels)
        x = conv_bn_act(high, [self.cbr[0]], [self.cbr[1]], self.backend, cache=fold_cache(self), cache_key="cbr")
        s = self.scale(high)
        x = x * s
        hc = self.high_classifier
        y = conv_bn_act_free(x, hc, self.backend)
        y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=False)
        out = conv_bn_act_free(low, self.low_classifier, self.backend, add=y)
        return like_input_format(out, low)


def conv_bn_act_free(x, conv, backend, add=None):
    """A plain 1x1 conv (+ bias) through the fused op (scale 1, shift = bias); + add."""
    shift = conv.bias.to(acc_dtype(x.dtype)) if conv.bias is not None else None
    out, _, _ = AF.atrous_conv(x, [conv.weight], [1], None, shift, None, act="none", backend=backend)
    return out if add is None else out + add


class FusedDeepLabHead(FusedModule, nn.Sequential):
    """torchvision's DeepLabHead: [ASPP, 3x3 conv, BN, ReLU, 1x1 classifier], fused.

    Children keep their indices (and state_dict keys); the ASPP child is converted to
    FusedASPP, and the 3x3 conv + BN + ReLU run as one fused op.
    """

    twin = reference.DeepLabHead

    def _adopt(self, source, backend):
        super()._adopt(source, backend)
        if not isinstance(self[0], FusedModule):
            self._modules["0"] = FusedASPP.from_module(self[0], backend)

    @classmethod
    def check_source(cls, module):
        owner = cls.__name__
        check_sequential(owner, "module", module, ("ASPP", "Conv2d", "BatchNorm2d", "ReLU", "Conv2d"))
        if not isinstance(module[0], FusedASPP):
            FusedASPP.check_source(module[0])
        check_cbr(owner, "module[1:4]", nn.Sequential(module[1], module[2], module[3]))
        check_conv(owner, "module[4]", module[4], (1,))

    def to_reference(self):
        if isinstance(self[0], FusedModule):
            self._modules["0"] = self[0].to_reference()
        return super().to_reference()

    def forward(self, x):
        y = self[0](x)
        y = conv_bn_act(y, [self[1]], [self[2]], self.backend, cache=fold_cache(self), cache_key="conv")
        return like_input_format(conv_bn_act_free(y, self[4], self.backend), x)
