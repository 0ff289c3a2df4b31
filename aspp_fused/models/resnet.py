"""ResNet-50 / 101 backbones in torchvision's layout, with atrous (dilated) output stride 8/16,
DeepLab v3's multi-grid and its optional cascaded blocks 5-7.

State_dict keys are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1`` ... ``layer4``; ``fc``
when ``num_classes`` is given), so a torchvision ResNet checkpoint loads key for key. With
``multi_grid=None`` and ``cascaded_blocks=0`` the network is torchvision's
``resnet50/101(replace_stride_with_dilation=...)`` exactly, numbers included.
"""
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from aspp_fused.models._utils import Stage, check_int, check_rates, forward_stages

__all__ = ["Bottleneck", "ResNet", "resnet50", "resnet101"]

# output stride -> torchvision's replace_stride_with_dilation for layer2, layer3, layer4
_DILATE = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5: the stride sits on the 3x3 conv)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet trunk (Bottleneck blocks) for segmentation.

    Args:
        layers: blocks per stage, (3, 4, 6, 3) for ResNet-50, (3, 4, 23, 3) for ResNet-101.
        output_stride: 32 (classification), 16 (layer4 dilated) or 8 (layer3 and layer4 dilated):
            the stride of a stage is replaced by dilation like torchvision's
            ``replace_stride_with_dilation`` (the first block of a dilated stage keeps the
            previous rate, later blocks use the new one).
        multi_grid: DeepLab v3's unit rates for the blocks of layer4 (and of each cascaded
            block): block i uses ``rate * multi_grid[i]``, where ``rate`` is the stage's dilation
            (2 at OS16, 4 at OS8). ``(1, 2, 4)`` is the paper's best; ``None`` keeps torchvision's
            rates exactly.
        cascaded_blocks: 0-3 extra copies of block4 (``layer5`` .. ``layer7``, 3 bottlenecks of
            512 -> 2048 each), the paper's "going deeper" cascade. Their strides are replaced
            by atrous rates, which double from block to block (OS16: 4, 8, 16), so the output
            stride is kept. They are new layers: a torchvision checkpoint leaves them missing.
        num_classes: None for a segmentation trunk (no avgpool / fc; ``forward`` returns the
            last feature map); an int adds torchvision's ``avgpool`` + ``fc``, so a full
            torchvision classification checkpoint loads and ``forward`` returns class logits.
    """

    def __init__(self, layers: Sequence[int], output_stride: int = 32, multi_grid: Optional[Sequence[int]] = None,
                 cascaded_blocks: int = 0, num_classes: Optional[int] = None):
        super().__init__()
        owner = type(self).__name__
        layers = check_rates(owner, "layers", layers, 4)
        check_int(owner, "output_stride", output_stride, choices=(8, 16, 32))
        if multi_grid is not None:
            multi_grid = check_rates(owner, "multi_grid", multi_grid, layers[3])
        check_int(owner, "cascaded_blocks", cascaded_blocks, choices=(0, 1, 2, 3))
        if num_classes is not None:
            check_int(owner, "num_classes", num_classes, minimum=1)
        self.output_stride = output_stride
        self.multi_grid = multi_grid
        self.inplanes = 64
        self.dilation = 1
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        dilate = _DILATE[output_stride]
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_layer(256, layers[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_layer(512, layers[3], stride=2, dilate=dilate[2], multi_grid=multi_grid)
        self.cascaded_blocks = cascaded_blocks
        for k in range(cascaded_blocks):
            # block(5+k) replaces its stride 2 by doubling the rate, as every later block.
            self.dilation *= 2
            self.add_module("layer%d" % (5 + k), self._make_layer(512, layers[3], multi_grid=multi_grid or
                                                                  (1,) * layers[3]))
        self.out_channels = 512 * Bottleneck.expansion
        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(self.out_channels, num_classes)
        else:
            self.avgpool = None
            self.fc = None
        # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilate: bool = False,
                    multi_grid: Optional[Sequence[int]] = None) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        if multi_grid is None:
            # torchvision: the block that lost its stride still runs at the previous rate
            rates = [previous_dilation] + [self.dilation] * (blocks - 1)
        else:
            # DeepLab v3 multi-grid (the seed's _make_MG_unit): every unit at rate * grid[i]
            rates = [self.dilation * g for g in multi_grid]
        out = [Bottleneck(self.inplanes, planes, stride, downsample, rates[0])]
        self.inplanes = planes * Bottleneck.expansion
        out += [Bottleneck(self.inplanes, planes, dilation=r) for r in rates[1:]]
        return nn.Sequential(*out)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def named_stages(self) -> List[Stage]:
        """(name, callable) in forward order: "stem", "layer1" .. "layer4" [, "layer5" .. "layer7"]."""
        names = ["layer%d" % i for i in range(1, 5 + self.cascaded_blocks)]
        return [("stem", self._stem)] + [(n, getattr(self, n)) for n in names]

    @property
    def last_stage(self) -> str:
        return "layer%d" % (4 + self.cascaded_blocks)

    def forward_features(self, x: torch.Tensor, return_layers: Dict[str, str]) -> Dict[str, torch.Tensor]:
        return forward_stages(type(self).__name__, self.named_stages(), x, return_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x, {self.last_stage: "out"})["out"]
        if self.fc is None:
            return x
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def adapt_classification_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """A torchvision ImageNet checkpoint -> this module's keys: a trunk without a classifier
        drops the checkpoint's ``fc.*``; everything else must match."""
        if self.fc is not None:
            return dict(state_dict)
        return {k: v for k, v in state_dict.items() if not k.startswith("fc.")}


def resnet50(**kwargs) -> ResNet:
    """ResNet-50 (torchvision layout); keyword arguments as :class:`ResNet`."""
    return ResNet((3, 4, 6, 3), **kwargs)


def resnet101(**kwargs) -> ResNet:
    """ResNet-101 (torchvision layout); keyword arguments as :class:`ResNet`."""
    return ResNet((3, 4, 23, 3), **kwargs)
