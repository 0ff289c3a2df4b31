"""ASPP whose branches are attributes (aspp1 ... aspp4, a global_avg_pool Sequential), concatenated
in forward, the pooled map upsampled with align_corners=True."""
import torch
import torch.nn.functional as F
from torch import nn


class AtrousBranch(nn.Module):
    def __init__(self, cin, cout, k, rate):
        super().__init__()
        self.atrous_conv = nn.Conv2d(cin, cout, k, padding=0 if k == 1 else rate, dilation=rate, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.atrous_conv(x)
        x = self.bn(x)
        return self.relu(x)


class AttrASPP(nn.Module):
    def __init__(self, cin, cout, rates=(1, 2, 3, 5)):
        super().__init__()
        self.aspp1 = AtrousBranch(cin, cout, 1, rates[0])
        self.aspp2 = AtrousBranch(cin, cout, 3, rates[1])
        self.aspp3 = AtrousBranch(cin, cout, 3, rates[2])
        self.aspp4 = AtrousBranch(cin, cout, 3, rates[3])
        self.global_avg_pool = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Conv2d(cin, cout, 1, bias=False),
                                             nn.BatchNorm2d(cout), nn.ReLU())
        self.conv1 = nn.Conv2d(5 * cout, cout, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        x1 = self.aspp1(x)
        x2 = self.aspp2(x)
        x3 = self.aspp3(x)
        x4 = self.aspp4(x)
        x5 = self.global_avg_pool(x)
        x5 = F.interpolate(x5, size=x4.size()[2:], mode="bilinear", align_corners=True)
        x = torch.cat((x1, x2, x3, x4, x5), dim=1)
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        return self.dropout(x)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.aspp = AttrASPP(8, 6)
        self.classifier = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.classifier(self.aspp(self.stem(x)))


def build():
    return Model()


# the head (its 4 conv branches, pooling and projection in one op); stem: stride 2
EXPECTED = {"fused_sites": 1, "heads": 1, "unfused": {"stem.0": "stride 2"}, "not_sites": ["classifier"]}
