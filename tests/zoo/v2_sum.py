"""DeepLab v2 classifiers: a sum of dilated 3x3 convs with bias, once over a ModuleList (builtin sum)
and once written out in the model's own forward."""
from torch import nn


class Classifier(nn.Module):
    def __init__(self, cin, classes, rates=(2, 4, 6, 8)):
        super().__init__()
        self.conv2d_list = nn.ModuleList([nn.Conv2d(cin, classes, 3, padding=r, dilation=r) for r in rates])

    def forward(self, x):
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:]:
            out += conv(x)
        return out


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer5 = Classifier(8, 4)
        self.c6 = nn.Conv2d(8, 4, 3, padding=3, dilation=3)
        self.c12 = nn.Conv2d(8, 4, 3, padding=5, dilation=5)

    def forward(self, x):
        f = self.layer(x)
        return self.layer5(f) - (self.c6(f) + self.c12(f))  # two sums: a difference is no v2 head


def build():
    return Model()


EXPECTED = {"fused_sites": 2, "heads": 2, "unfused": {"layer.0": "not dilated"}, "not_sites": []}
