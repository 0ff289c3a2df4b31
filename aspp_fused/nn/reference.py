"""Reference twins: plain-PyTorch ASPP heads, the layouts the fused modules reproduce.

Parameter names follow torchvision (ASPP, ASPPConv, ASPPPooling, LRASPPHead, DeepLabHead)
and segmentation_models_pytorch (SeparableConv2d, ASPPSeparableConv), so their
state_dicts load into these twins and into the fused modules unchanged.
"""
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AtrousConvBNReLU", "ASPPConv", "ASPPPooling", "ASPP", "ASPPv2", "SeparableConv2d", "SeparableAtrousConv",
    "SeparableASPP", "LRASPPHead", "DeepLabHead",
]


def _check_rates(rates, name="atrous_rates", min_count=0):
    if isinstance(rates, (int, float)) or not hasattr(rates, "__iter__"):
        raise TypeError("%s must be a sequence of positive ints (e.g. [6, 12, 18]), got %r (%s)"
                        % (name, rates, type(rates).__name__))
    rates = tuple(rates)
    for r in rates:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError("%s must be positive ints, got %r" % (name, rates))
    if len(rates) < min_count:
        raise ValueError("%s must hold at least %d rate(s), got %r" % (name, min_count, rates))
    return rates


def _check_channels(**counts):
    """Channel counts are ints >= 1 (a 0 built an empty conv that failed later; a negative, a raw torch error)."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError("%s must be an int >= 1, got %r" % (name, value))


class AtrousConvBNReLU(nn.Sequential):
    """Conv2d(k x k, dilation, 'same' padding, no bias) -> BatchNorm2d -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1):
        _check_channels(in_channels=in_channels, out_channels=out_channels)
        if kernel_size not in (1, 3):
            raise ValueError("kernel_size must be 1 or 3, got %r" % (kernel_size,))
        _check_rates([dilation], "dilation")
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size // 2),
                      dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


class ASPPConv(AtrousConvBNReLU):
    """torchvision's ASPPConv: a 3x3 AtrousConvBNReLU."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int):
        super().__init__(in_channels, out_channels, 3, dilation)


class ASPPPooling(nn.Sequential):
    """Image pooling: global average pool -> 1x1 conv -> BN -> ReLU, broadcast back to H x W."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        for mod in self:
            x = mod(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _build_concat_aspp(m: nn.Module, in_channels: int, out_channels: int, branches, dropout: float):
    """The v3 / v3+ layout on ``m``: convs = [1x1 conv-BN-ReLU, *branches, image pooling] and
    project = 1x1 conv-BN-ReLU + dropout over their concatenation (torchvision's / smp's keys)."""
    modules = [nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
                             nn.ReLU())]
    modules += list(branches)
    modules.append(ASPPPooling(in_channels, out_channels))
    m.convs = nn.ModuleList(modules)
    m.project = nn.Sequential(
        nn.Conv2d(len(m.convs) * out_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.Dropout(dropout),
    )


class _ConcatASPP(nn.Module):
    """The forward of the v3 / v3+ layout (``_build_concat_aspp``): every branch, concat, project."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class ASPP(_ConcatASPP):
    """DeepLab v3 ASPP (torchvision layout): 1x1 + one 3x3 per rate + image pooling, concat, project."""

    def __init__(self, in_channels: int, atrous_rates: Sequence[int], out_channels: int = 256, dropout: float = 0.5):
        super().__init__()
        _check_channels(in_channels=in_channels, out_channels=out_channels)
        rates = _check_rates(atrous_rates)
        _build_concat_aspp(self, in_channels, out_channels, [ASPPConv(in_channels, out_channels, r) for r in rates],
                           dropout)


class ASPPv2(nn.Module):
    """DeepLab v2 ASPP: the sum of one dilated 3x3 classifier conv (with bias) per rate."""

    def __init__(self, in_channels: int, num_classes: int, atrous_rates: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        _check_channels(in_channels=in_channels, num_classes=num_classes)
        # At least one rate: the sum of no branches has no output (it built, then failed at forward).
        rates = _check_rates(atrous_rates, min_count=1)
        self.convs = nn.ModuleList(
            [nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True) for r in rates]
        )
        for conv in self.convs:  # DeepLab v2's initialisation
            nn.init.normal_(conv.weight, mean=0, std=0.01)
            nn.init.constant_(conv.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs[0](x)
        for conv in self.convs[1:]:
            out = out + conv(x)
        return out


class SeparableConv2d(nn.Sequential):
    """Depthwise dilated 3x3 -> pointwise 1x1 (smp's layout: keys 0 = depthwise, 1 = pointwise).

    ``mid_norm=True`` gives the TF / mmseg variant depthwise -> BN -> ReLU -> pointwise
    (keys 0 = depthwise, 1 = BN, 3 = pointwise).
    """

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1, mid_norm: bool = False,
                 bias: bool = False):
        _check_rates([dilation], "dilation")
        depthwise = nn.Conv2d(in_channels, in_channels, 3, padding=dilation, dilation=dilation, groups=in_channels,
                              bias=False)
        pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        if mid_norm:
            super().__init__(depthwise, nn.BatchNorm2d(in_channels), nn.ReLU(), pointwise)
        else:
            super().__init__(depthwise, pointwise)


class SeparableAtrousConv(nn.Sequential):
    """smp's ASPPSeparableConv: SeparableConv2d -> BatchNorm2d -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int, mid_norm: bool = False):
        super().__init__(
            SeparableConv2d(in_channels, out_channels, dilation, mid_norm=mid_norm),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


class SeparableASPP(_ConcatASPP):
    """DeepLab v3+ ASPP (smp layout): 1x1 + one separable 3x3 per rate + image pooling, project."""

    def __init__(self, in_channels: int, out_channels: int = 256, atrous_rates: Sequence[int] = (12, 24, 36),
                 dropout: float = 0.5, mid_norm: bool = False):
        super().__init__()
        _check_channels(in_channels=in_channels, out_channels=out_channels)
        rates = _check_rates(atrous_rates)
        _build_concat_aspp(self, in_channels, out_channels,
                           [SeparableAtrousConv(in_channels, out_channels, r, mid_norm=mid_norm) for r in rates], dropout)


class LRASPPHead(nn.Module):
    """LR-ASPP (torchvision's LRASPPHead): input is a dict with 'low' and 'high' feature maps."""

    def __init__(self, low_channels: int, high_channels: int, num_classes: int, inter_channels: int):
        super().__init__()
        _check_channels(low_channels=low_channels, high_channels=high_channels, num_classes=num_classes,
                        inter_channels=inter_channels)
        self.cbr = nn.Sequential(
            nn.Conv2d(high_channels, inter_channels, 1, bias=False),
            nn.BatchNorm2d(inter_channels),
            nn.ReLU(inplace=True),
        )
        self.scale = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(high_channels, inter_channels, 1, bias=False),
            nn.Sigmoid(),
        )
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter_channels, num_classes, 1)

    def forward(self, input: Dict[str, torch.Tensor]) -> torch.Tensor:
        low = input["low"]
        high = input["high"]
        x = self.cbr(high)
        s = self.scale(high)
        x = x * s
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.low_classifier(low) + self.high_classifier(x)


class DeepLabHead(nn.Sequential):
    """torchvision's DeepLabHead: ASPP -> 3x3 conv-BN-ReLU -> 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, atrous_rates: Sequence[int] = (12, 24, 36)):
        _check_channels(in_channels=in_channels, num_classes=num_classes)
        super().__init__(
            ASPP(in_channels, atrous_rates),
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(),
            nn.Conv2d(256, num_classes, 1),
        )
