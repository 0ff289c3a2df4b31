"""A DeepLab class that runs its ASPP in its own forward: self.aspp1(x) ... torch.cat ...
self.conv1, self.bn1, self.relu, then the classifier and the upsampling to the input size."""
import torch
import torch.nn.functional as F
from torch import nn


def _cbr(cin, cout, k, rate):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=(k // 2) * rate, dilation=rate, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DeepLab(nn.Module):
    def __init__(self, num_classes=4, rates=(2, 4, 6)):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8),
                                      nn.ReLU(inplace=True))
        self.aspp1 = _cbr(8, 6, 1, 1)
        self.aspp2 = _cbr(8, 6, 3, rates[0])
        self.aspp3 = _cbr(8, 6, 3, rates[1])
        self.aspp4 = _cbr(8, 6, 3, rates[2])
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 6, 1), nn.ReLU())  # no BN, conv bias
        self.conv1 = nn.Conv2d(30, 6, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.1)
        self.last_conv = nn.Conv2d(6, num_classes, 1)

    def forward(self, img):
        size = img.shape[-2:]
        x = self.backbone(img)
        pooled = F.interpolate(self.image_pool(x), size=x.shape[2:], mode="bilinear", align_corners=False)
        x = torch.cat([self.aspp1(x), self.aspp2(x), pooled, self.aspp3(x), self.aspp4(x)], dim=1)  # pool not last
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.last_conv(self.dropout(x))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def build():
    return DeepLab()


EXPECTED = {"fused_sites": 1, "heads": 1, "unfused": {"backbone.0": "stride 2"}, "not_sites": ["last_conv"]}
