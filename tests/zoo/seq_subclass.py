"""ASPPConv as an nn.Sequential subclass, a custom image-pooling module (mean over H, W, nearest
upsampling), branches in a ModuleList, the projection a Sequential."""
import torch
import torch.nn.functional as F
from torch import nn


class ASPPConv(nn.Sequential):
    def __init__(self, cin, cout, rate):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=rate, dilation=rate, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class GlobalPool(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, 1, bias=False)
        self.norm = nn.BatchNorm2d(cout)

    def forward(self, x):
        h, w = x.shape[-2:]
        y = x.mean((2, 3), keepdim=True)
        y = F.relu(self.norm(self.proj(y)))
        return F.interpolate(y, size=(h, w), mode="nearest")


class ASPP(nn.Module):
    def __init__(self, cin, cout, rates=(2, 3, 7)):
        super().__init__()
        self.branches = nn.ModuleList([nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                                                     nn.ReLU())] + [ASPPConv(cin, cout, r) for r in rates])
        self.pool = GlobalPool(cin, cout)
        self.project = nn.Sequential(nn.Conv2d(cout * (len(rates) + 2), cout, 1, bias=False), nn.BatchNorm2d(cout),
                                     nn.ReLU(), nn.Dropout(0.2))

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        outs.append(self.pool(x))
        return self.project(torch.cat(outs, dim=1))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False, groups=1), nn.BatchNorm2d(8),
                                     nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False),
                                     nn.BatchNorm2d(8), nn.ReLU())
        self.head = ASPP(8, 6)
        self.cls = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        return self.cls(self.head(self.encoder(x)))


def build():
    return Model()


EXPECTED = {"fused_sites": 1, "heads": 1, "unfused": {"encoder.0": "not dilated", "encoder.3": "groups=4"},
            "not_sites": ["cls"]}
