"""Aligned Xception-65, the DeepLab v3+ backbone (torchvision has none).

The layout, state_dict keys and forward semantics follow the common PyTorch port
(jfzhang95/pytorch-deeplab-xception, ``modeling/backbone/xception.py``: ``conv1``, ``bn1``,
``conv2``, ``bn2``, ``block1`` .. ``block20`` with ``rep.<i>.{conv1,bn,pointwise}`` /
``skip`` / ``skipbn``, then ``conv3`` .. ``conv5`` with ``bn3`` .. ``bn5``), so its checkpoints
load and give the same numbers. This is *not* a torchvision layout. Two behaviours of the
port differ from TF DeepLab's Xception and are kept on purpose, because checkpoints in this
layout were trained with them:

* a block that starts with ReLU rectifies its input for the shortcut too (the port's in-place
  ReLU overwrote the block input); TF's shortcut reads the raw input;
* the extra separable conv that replaces a removed stride (``is_last``) runs at rate 1.

Explicit "fixed" padding of the port equals Conv2d's symmetric ``padding=dilation`` for the
3x3 kernels used here, so plain padding is used.
"""
from typing import Dict, List

import torch
from torch import nn

from aspp_fused.models._utils import Stage, check_int, forward_stages

__all__ = ["XceptionSeparableConv2d", "XceptionBlock", "AlignedXception65", "xception65"]


class XceptionSeparableConv2d(nn.Module):
    """Depthwise 3x3 (``conv1``) -> BN (``bn``) -> pointwise 1x1 (``pointwise``); no ReLU in between."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, inplanes, 3, stride, padding=dilation, dilation=dilation, groups=inplanes,
                               bias=False)
        self.bn = nn.BatchNorm2d(inplanes)
        self.pointwise = nn.Conv2d(inplanes, planes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.bn(self.conv1(x)))


class XceptionBlock(nn.Module):
    """The port's ``Block``: ``reps`` x [ReLU, separable conv, BN] (+ a strided or an ``is_last``
    extra one), plus a 1x1 conv + BN shortcut when the shape changes.

    ``rep`` keeps the port's ReLU entries (parameter-free) so the indices, hence the keys, match.
    """

    def __init__(self, inplanes: int, planes: int, reps: int, stride: int = 1, dilation: int = 1,
                 start_with_relu: bool = True, grow_first: bool = True, is_last: bool = False):
        super().__init__()
        if planes != inplanes or stride != 1:
            self.skip = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
            self.skipbn = nn.BatchNorm2d(planes)
        else:
            self.skip = None
            self.skipbn = None
        rep: List[nn.Module] = []
        filters = inplanes
        if grow_first:
            rep += [nn.ReLU(), XceptionSeparableConv2d(inplanes, planes, 1, dilation), nn.BatchNorm2d(planes)]
            filters = planes
        for _ in range(reps - 1):
            rep += [nn.ReLU(), XceptionSeparableConv2d(filters, filters, 1, dilation), nn.BatchNorm2d(filters)]
        if not grow_first:
            rep += [nn.ReLU(), XceptionSeparableConv2d(inplanes, planes, 1, dilation), nn.BatchNorm2d(planes)]
        if stride != 1:
            rep += [nn.ReLU(), XceptionSeparableConv2d(planes, planes, 2), nn.BatchNorm2d(planes)]
        elif is_last:
            rep += [nn.ReLU(), XceptionSeparableConv2d(planes, planes, 1), nn.BatchNorm2d(planes)]
        self.start_with_relu = start_with_relu
        self.rep = nn.Sequential(*(rep if start_with_relu else rep[1:]))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = inp
        layers = iter(self.rep)
        if self.start_with_relu:
            inp = x = next(layers)(x)  # the shortcut reads the rectified input too (see the module docstring)
        for layer in layers:
            x = layer(x)
        skip = inp if self.skip is None else self.skipbn(self.skip(inp))
        return x + skip


class AlignedXception65(nn.Module):
    """Aligned Xception-65 trunk: entry flow (stem, block1-3), middle flow (block4-19), exit flow
    (block20, conv3-5), output stride 8 or 16 through dilation (2048 channels out).

    Stages for :meth:`forward_features`: "stem", "block1" (its output after ReLU: the 128-channel,
    stride-4 low-level features of v3+), "block2" .. "block20", "exit".
    """

    def __init__(self, output_stride: int = 16):
        super().__init__()
        check_int(type(self).__name__, "output_stride", output_stride, choices=(8, 16))
        if output_stride == 16:
            entry_block3_stride, middle_dilation, exit_dilations = 2, 1, (1, 2)
        else:
            entry_block3_stride, middle_dilation, exit_dilations = 1, 2, (2, 4)
        self.output_stride = output_stride
        self.out_channels = 2048
        self.conv1 = nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        # entry flow
        self.block1 = XceptionBlock(64, 128, 2, stride=2, start_with_relu=False)
        self.block2 = XceptionBlock(128, 256, 2, stride=2, start_with_relu=False)
        self.block3 = XceptionBlock(256, 728, 2, stride=entry_block3_stride, is_last=True)
        # middle flow
        for i in range(4, 20):
            self.add_module("block%d" % i, XceptionBlock(728, 728, 3, dilation=middle_dilation))
        # exit flow
        self.block20 = XceptionBlock(728, 1024, 2, dilation=exit_dilations[0], grow_first=False, is_last=True)
        self.conv3 = XceptionSeparableConv2d(1024, 1536, dilation=exit_dilations[1])
        self.bn3 = nn.BatchNorm2d(1536)
        self.conv4 = XceptionSeparableConv2d(1536, 1536, dilation=exit_dilations[1])
        self.bn4 = nn.BatchNorm2d(1536)
        self.conv5 = XceptionSeparableConv2d(1536, 2048, dilation=exit_dilations[1])
        self.bn5 = nn.BatchNorm2d(2048)
        for m in self.modules():  # the port's initialisation: N(0, sqrt(2 / (k * k * out)))
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stem(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(x)))

    def _block1(self, x):
        return self.relu(self.block1(x))  # the port's extra ReLU: the low-level features

    def _exit(self, x):
        x = self.relu(x)
        x = self.relu(self.bn3(self.conv3(x)))
        x = self.relu(self.bn4(self.conv4(x)))
        return self.relu(self.bn5(self.conv5(x)))

    def named_stages(self) -> List[Stage]:
        return ([("stem", self._stem), ("block1", self._block1)]
                + [("block%d" % i, getattr(self, "block%d" % i)) for i in range(2, 21)] + [("exit", self._exit)])

    last_stage = "exit"

    def forward_features(self, x: torch.Tensor, return_layers: Dict[str, str]) -> Dict[str, torch.Tensor]:
        return forward_stages(type(self).__name__, self.named_stages(), x, return_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x, {"exit": "out"})["out"]

    def adapt_classification_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Port checkpoints hold exactly these keys; nothing to adapt."""
        return dict(state_dict)


def xception65(**kwargs) -> AlignedXception65:
    """Aligned Xception-65 (the jfzhang95 port's layout); keyword arguments as :class:`AlignedXception65`."""
    return AlignedXception65(**kwargs)
