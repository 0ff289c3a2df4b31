"""Generic fusion inside a plain ``nn.Sequential``: dilated conv + BN + ReLU runs and
separable (depthwise + pointwise) conv + BN + ReLU runs.

The Sequential keeps its children and their indices (so its state_dict keys); only its
forward changes: each recognised run of three children executes as one fused op, every
other child runs as before. This is how e.g. smp's DeepLabV3+ decoder
(``Sequential(ASPP, SeparableConv2d, BatchNorm2d, ReLU)``) is fused around its ASPP.
"""
from typing import Dict

from torch import nn

from aspp_fused.nn._checks import _fail, check_bn, check_conv, separable_branch_args
from aspp_fused.nn._conv_bn import conv_bn_act, like_input_format, separable_bn_act
from aspp_fused.nn._fold_cache import fold_cache
from aspp_fused.nn.fused import FusedModule

__all__ = ["FusedSequential", "fusable_runs"]


def _run_kind(first, bn, act):
    """'cbr' / 'sep' if (first, bn, act) is a run the fused ops take, else None."""
    if not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)) or not isinstance(act, nn.ReLU):
        return None
    try:
        if isinstance(first, nn.Conv2d):
            check_conv("", "", first)
            if first.kernel_size[0] != 3 or first.dilation[0] < 2:
                return None  # only dilated 3x3 convs: plain convs gain nothing from the fused op
            check_bn("", "", bn, first.out_channels)
            return "cbr"
        if not isinstance(first, nn.Sequential) or type(first).forward is not nn.Sequential.forward:
            return None  # a Sequential's forward is its children in order: known without tracing
        _, _, pw = separable_branch_args("", first, "")
        if pw.bias is not None:
            return None
        check_bn("", "", bn, pw.out_channels)
        return "sep"
    except (ValueError, TypeError):
        return None


def fusable_runs(seq: nn.Sequential) -> Dict[int, str]:
    """{index of the run's first child: kind} for the non-overlapping runs of ``seq``."""
    mods = list(seq.children())
    runs, i = {}, 0
    while i < len(mods):
        kind = _run_kind(*mods[i:i + 3]) if i + 2 < len(mods) else None
        if kind is not None:
            runs[i] = kind
            i += 3
        else:
            i += 1
    return runs


class FusedSequential(FusedModule, nn.Sequential):
    """An ``nn.Sequential`` whose conv + BN + ReLU runs execute fused (same children, same keys)."""

    twin = nn.Sequential

    @classmethod
    def check_source(cls, module):
        if type(module) is not nn.Sequential:
            _fail(cls.__name__, "module", "is %s, expected a plain nn.Sequential" % type(module).__name__)
        if not fusable_runs(module):
            _fail(cls.__name__, "module", "has no dilated conv + BN + ReLU or separable conv + BN + ReLU run")

    def forward(self, x):
        mods = list(self.children())
        runs = fusable_runs(self)  # recomputed: cheap, and right if a child was swapped since
        i = 0
        while i < len(mods):
            kind = runs.get(i)
            if kind == "cbr":
                x = like_input_format(conv_bn_act(x, [mods[i]], [mods[i + 1]], self.backend,
                                                  cache=fold_cache(self), cache_key=i), x)
                i += 3
            elif kind == "sep":
                branch = separable_branch_args(type(self).__name__, mods[i], "[%d]" % i)
                x = like_input_format(separable_bn_act(x, [branch], [mods[i + 1]], self.backend), x)
                i += 3
            else:
                x = mods[i](x)
                i += 1
        return x
