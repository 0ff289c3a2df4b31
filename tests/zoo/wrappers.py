"""conv-BN-act wrapper modules with their own forward (attributes conv / bn / act, F.relu), used as
a dilated decoder; plus wrappers the fused ops cannot run (stride 2, groups=4, SiLU, BN without
running statistics)."""
import torch.nn.functional as F
from torch import nn


class ConvBNAct(nn.Module):
    def __init__(self, cin, cout, k=3, dilation=1, stride=1, groups=1, act="relu", track=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=(k // 2) * dilation, dilation=dilation,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, track_running_stats=track)
        self.act = act

    def forward(self, x):
        y = self.bn(self.conv(x))
        return F.relu(y) if self.act == "relu" else F.silu(y)


class SepConvBNReLU(nn.Module):
    """depthwise -> BN -> ReLU -> pointwise -> BN -> ReLU, attributes of one module."""

    def __init__(self, cin, cout, dilation):
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin, bias=False)
        self.dw_bn = nn.BatchNorm2d(cin)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        x = F.relu(self.dw_bn(self.dw(x)))
        return F.relu(self.pw_bn(self.pw(x)))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = ConvBNAct(3, 8, stride=2)
        self.grouped = ConvBNAct(8, 8, groups=4)
        self.swish = ConvBNAct(8, 8, dilation=2, act="silu")
        self.untracked = ConvBNAct(8, 8, dilation=2, track=False)
        self.block1 = ConvBNAct(8, 8, dilation=2)
        self.block2 = ConvBNAct(8, 8, 1)
        self.block3 = SepConvBNReLU(8, 6, 4)
        self.out = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        x = self.untracked(self.swish(self.grouped(self.down(x))))
        return self.out(self.block3(self.block2(self.block1(x))))


def build():
    return Model()


EXPECTED = {"fused_sites": 3, "heads": 0,
            "unfused": {"down.conv": "stride 2", "grouped.conv": "groups=4", "swish.conv": "activation silu",
                        "untracked.conv": "track_running_stats=False"},
            "not_sites": ["out"]}
