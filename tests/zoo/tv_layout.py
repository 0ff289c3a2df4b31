"""A torchvision-layout ASPP (convs ModuleList: 1x1, ASPPConv per rate, ASPPPooling; project) in
the user's own package, plus a DeepLabHead-like Sequential around it."""
import torch
import torch.nn.functional as F
from torch import nn


class ASPPConv(nn.Sequential):
    def __init__(self, cin, cout, dilation):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class ASPPPooling(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())

    def forward(self, x):
        size = x.shape[-2:]
        for mod in self:
            x = mod(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    def __init__(self, cin, rates, cout=6):
        super().__init__()
        mods = [nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())]
        mods += [ASPPConv(cin, cout, r) for r in rates]
        mods.append(ASPPPooling(cin, cout))
        self.convs = nn.ModuleList(mods)
        self.project = nn.Sequential(nn.Conv2d(len(mods) * cout, cout, 1, bias=False), nn.BatchNorm2d(cout),
                                     nn.ReLU(), nn.Dropout(0.5))

    def forward(self, x):
        res = []
        for conv in self.convs:
            res.append(conv(x))
        return self.project(torch.cat(res, dim=1))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 8, 3, padding=1)
        self.classifier = nn.Sequential(ASPP(8, [2, 5]), nn.Conv2d(6, 6, 3, padding=1, bias=False),
                                        nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 3, 1))

    def forward(self, x):
        return self.classifier(self.features(x))


def build():
    return Model()


# replaced by FusedDeepLabHead (and FusedASPP inside): two fused modules, the ASPP a head
EXPECTED = {"fused_sites": 2, "heads": 1, "unfused": {}, "not_sites": ["features", "classifier.4"]}
