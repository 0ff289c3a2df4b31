"""A DeepLab v3 head written the way much user code writes it, for the end-to-end benchmark of
aspp_fused.convert: branches as attributes (aspp1 ... aspp4, a global_avg_pool Sequential), the
ASPP run in the model's own forward, align_corners=True upsampling of the pooled map, then the
projection and a classifier. convert() fuses it by an instance-level forward (no fused class fits)."""
import torch
import torch.nn.functional as F
from torch import nn


def _branch(cin, cout, rate):
    k = 1 if rate == 1 else 3
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=0 if k == 1 else rate, dilation=rate, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class OwnForwardDeepLab(nn.Module):
    def __init__(self, in_channels, num_classes=21, rates=(6, 12, 18), channels=256):
        super().__init__()
        self.aspp1 = _branch(in_channels, channels, 1)
        self.aspp2 = _branch(in_channels, channels, rates[0])
        self.aspp3 = _branch(in_channels, channels, rates[1])
        self.aspp4 = _branch(in_channels, channels, rates[2])
        self.global_avg_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, channels, 1, bias=False),
                                             nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.conv1 = nn.Conv2d(5 * channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(0.5)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features):
        x1, x2, x3, x4 = self.aspp1(features), self.aspp2(features), self.aspp3(features), self.aspp4(features)
        x5 = F.interpolate(self.global_avg_pool(features), size=x4.shape[2:], mode="bilinear", align_corners=True)
        x = self.relu(self.bn1(self.conv1(torch.cat((x1, x2, x3, x4, x5), dim=1))))
        return self.classifier(self.dropout(x))
