"""MobileNetV2 and MobileNetV3-Large backbones in torchvision's layout, with a dilated tail.

State_dict keys are torchvision's (``features.<i>.conv.*`` for V2, ``features.<i>.block.*`` for
V3; ``classifier.*`` when ``num_classes`` is given), so torchvision checkpoints load key for
key. The segmentation models use the ``features`` Sequential itself as their backbone, as
torchvision's DeepLabV3 / LR-ASPP do with MobileNetV3 (keys ``backbone.<i>.*``).

Where a stride would take the map below ``output_stride`` it is replaced by dilation:

* MobileNetV3 follows torchvision's ``dilated=True``: the block that loses its stride already
  runs at the new rate. At ``output_stride=16`` this *is* torchvision's dilated network
  (numbers included); 8 also dilates the C3 stage (a layout torchvision does not build).
* MobileNetV2 (torchvision has no dilated variant) follows TF DeepLab / the common PyTorch
  DeepLab ports: the block that loses its stride keeps the previous rate, later blocks use
  the new one, so DeepLab checkpoints trained that way see the receptive fields they expect.
"""
from functools import partial
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from aspp_fused.models._utils import Stage, check_int, forward_stages

__all__ = ["ConvBNAct", "MobileNetFeatures", "MobileNetV2", "MobileNetV3Large", "mobilenet_v2", "mobilenet_v3_large"]


def _make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """torchvision's (from TF slim): round to a multiple of divisor, never down by more than 10%."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNAct(nn.Sequential):
    """torchvision's Conv2dNormActivation layout: 0 = Conv2d (no bias), 1 = norm, [2 = activation]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1,
                 groups: int = 1, norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
                 activation_layer: Optional[Callable[..., nn.Module]] = nn.ReLU6):
        layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2 * dilation,
                            dilation=dilation, groups=groups, bias=False),
                  norm_layer(out_channels)]
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)
        self.out_channels = out_channels


class MobileNetFeatures(nn.Sequential):
    """The ``features`` Sequential of a MobileNet (children ``0`` .. ``n-1``), with staged outputs."""

    def named_stages(self) -> List[Stage]:
        return list(self._modules.items())

    @property
    def last_stage(self) -> str:
        return str(len(self) - 1)

    @property
    def out_channels(self) -> int:
        return self[-1].out_channels

    def forward_features(self, x: torch.Tensor, return_layers: Dict[str, str]) -> Dict[str, torch.Tensor]:
        return forward_stages(type(self).__name__, self.named_stages(), x, return_layers)

    def adapt_classification_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """A torchvision ImageNet checkpoint (``features.<i>.*``, ``classifier.*``) -> these keys.

        The classifier, and features past this trunk (MobileNetV2's 1280-channel
        ``features.18``, which DeepLab does not use), are dropped; every other key must match.
        """
        out = {}
        for k, v in state_dict.items():
            if k.startswith("classifier."):
                continue
            if k.startswith("features."):
                index = k.split(".")[1]
                if index.isdigit() and int(index) >= len(self):
                    continue
                k = k[len("features."):]
            out[k] = v
        return out


def _init_weights(module: nn.Module):
    """torchvision's MobileNet initialisation."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- MobileNetV2


class InvertedResidualV2(nn.Module):
    """torchvision's MobileNetV2 InvertedResidual (keys ``conv.*``), plus a dilation for the depthwise."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, dilation: int = 1):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(inp, hidden, 1))
        layers += [
            ConvBNAct(hidden, hidden, 3, stride=stride, dilation=dilation, groups=hidden),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# t (expansion), c (channels), n (blocks), s (stride of the first block)
_V2_SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1)]


class _MobileNet(nn.Module):
    """What both MobileNets share: ``features`` (a MobileNetFeatures) and, with ``num_classes``,
    a classifier on the globally pooled features."""

    def __init__(self, output_stride: int, num_classes: Optional[int]):
        super().__init__()
        owner = type(self).__name__
        check_int(owner, "output_stride", output_stride, choices=(8, 16, 32))
        if num_classes is not None:
            check_int(owner, "num_classes", num_classes, minimum=1)
        self.output_stride = output_stride

    def _finish(self, layers: List[nn.Module], classifier: Optional[nn.Module], avgpool: bool = False):
        """features from layers, then the classifier (None: the segmentation trunk); ``avgpool``:
        an ``avgpool`` attribute as torchvision's layout has it (no parameters)."""
        self.features = MobileNetFeatures(*layers)
        if avgpool:
            self.avgpool = nn.AdaptiveAvgPool2d(1) if classifier is not None else None
        self.classifier = classifier
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if self.classifier is None:
            return x
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class MobileNetV2(_MobileNet):
    """MobileNetV2 (width 1.0), torchvision layout.

    ``num_classes=None`` builds the segmentation trunk: ``features.0`` .. ``features.17`` (the
    320-channel output DeepLab reads; TF DeepLab drops the 1280-channel 1x1 too). An int adds
    ``features.18`` and ``classifier`` so a torchvision checkpoint loads key for key and
    ``forward`` returns class logits. ``output_stride``: 8, 16 or 32 (see the module docstring).
    """

    def __init__(self, output_stride: int = 32, num_classes: Optional[int] = None, dropout: float = 0.2):
        super().__init__(output_stride, num_classes)
        channels = 32
        layers: List[nn.Module] = [ConvBNAct(3, channels, 3, stride=2)]
        current_stride, rate = 2, 1
        for t, c, n, s in _V2_SETTING:
            for i in range(n):
                stride = s if i == 0 else 1
                dilation = rate  # the block that loses its stride keeps the previous rate
                if stride > 1 and current_stride >= output_stride:
                    rate *= stride
                    stride = 1
                else:
                    current_stride *= stride
                layers.append(InvertedResidualV2(channels, c, stride, t, dilation))
                channels = c
        if num_classes is not None:
            layers.append(ConvBNAct(channels, 1280, 1))
        self._finish(layers, None if num_classes is None else nn.Sequential(nn.Dropout(p=dropout),
                                                                           nn.Linear(1280, num_classes)))


# --------------------------------------------------------------------------- MobileNetV3-Large


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation as MobileNetV3 uses it (keys fc1, fc2; hard sigmoid)."""

    def __init__(self, channels: int, squeeze_channels: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class InvertedResidualV3(nn.Module):
    """torchvision's MobileNetV3 InvertedResidual (keys ``block.*``)."""

    def __init__(self, inp: int, kernel: int, expanded: int, oup: int, use_se: bool, use_hs: bool, stride: int,
                 dilation: int, norm_layer: Callable[..., nn.Module]):
        super().__init__()
        # as torchvision: a dilated block never strides, and the residual and the "C" stage
        # marker follow the *configured* stride, dilated or not
        self.use_res_connect = stride == 1 and inp == oup
        act = nn.Hardswish if use_hs else nn.ReLU
        layers: List[nn.Module] = []
        if expanded != inp:
            layers.append(ConvBNAct(inp, expanded, 1, norm_layer=norm_layer, activation_layer=act))
        layers.append(ConvBNAct(expanded, expanded, kernel, stride=1 if dilation > 1 else stride, dilation=dilation,
                                groups=expanded, norm_layer=norm_layer, activation_layer=act))
        if use_se:
            layers.append(SqueezeExcitation(expanded, _make_divisible(expanded // 4, 8)))
        layers.append(ConvBNAct(expanded, oup, 1, norm_layer=norm_layer, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = oup
        self._is_cn = stride > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


# input, kernel, expanded, output, SE, hard-swish, stride (torchvision's mobilenet_v3_large)
_V3_LARGE_SETTING = [
    (16, 3, 16, 16, False, False, 1), (16, 3, 64, 24, False, False, 2), (24, 3, 72, 24, False, False, 1),
    (24, 5, 72, 40, True, False, 2), (40, 5, 120, 40, True, False, 1), (40, 5, 120, 40, True, False, 1),
    (40, 3, 240, 80, False, True, 2), (80, 3, 200, 80, False, True, 1), (80, 3, 184, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1), (80, 3, 480, 112, True, True, 1), (112, 3, 672, 112, True, True, 1),
    (112, 5, 672, 160, True, True, 2), (160, 5, 960, 160, True, True, 1), (160, 5, 960, 160, True, True, 1),
]


class MobileNetV3Large(_MobileNet):
    """MobileNetV3-Large (width 1.0), torchvision layout.

    ``features.0`` .. ``features.16`` (the last a 1x1 to 960 channels, which torchvision's
    segmentation models read as "out"; ``features.4`` is the stride-8, 40-channel "low" / "aux"
    map). ``num_classes=None``: no ``avgpool`` / ``classifier``; an int adds torchvision's
    classifier so its checkpoints load key for key. ``output_stride``: 8, 16 or 32.
    """

    def __init__(self, output_stride: int = 32, num_classes: Optional[int] = None, dropout: float = 0.2):
        super().__init__(output_stride, num_classes)
        norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)  # torchvision's (TF's) BN settings
        layers: List[nn.Module] = [ConvBNAct(3, 16, 3, stride=2, norm_layer=norm_layer, activation_layer=nn.Hardswish)]
        current_stride, rate = 2, 1
        for inp, k, exp, out, se, hs, stride in _V3_LARGE_SETTING:
            if stride > 1 and current_stride >= output_stride:
                rate *= stride  # torchvision: the block that loses its stride already runs at the new rate
            else:
                current_stride *= stride
            layers.append(InvertedResidualV3(inp, k, exp, out, se, hs, stride, rate, norm_layer))
        layers.append(ConvBNAct(160, 960, 1, norm_layer=norm_layer, activation_layer=nn.Hardswish))
        self._finish(layers, None if num_classes is None else nn.Sequential(
            nn.Linear(960, 1280), nn.Hardswish(inplace=True), nn.Dropout(p=dropout, inplace=True),
            nn.Linear(1280, num_classes)), avgpool=True)


def mobilenet_v2(**kwargs) -> MobileNetV2:
    """MobileNetV2 (torchvision layout); keyword arguments as :class:`MobileNetV2`."""
    return MobileNetV2(**kwargs)


def mobilenet_v3_large(**kwargs) -> MobileNetV3Large:
    """MobileNetV3-Large (torchvision layout); keyword arguments as :class:`MobileNetV3Large`."""
    return MobileNetV3Large(**kwargs)
