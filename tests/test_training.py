"""Training: fused and reference models train side by side on a tiny synthetic segmentation
task with matching losses; AMP (bfloat16 autocast) and channels_last inputs."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aspp_fused
import aspp_fused.nn as ann
from conftest import BACKENDS, rel_err


class TinyDeepLab(nn.Module):
    def __init__(self, head="aspp", classes=3):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        if head == "aspp":
            self.head = ann.ASPP(16, [2, 4, 6], out_channels=8)
        else:
            self.head = ann.SeparableASPP(16, 8, [2, 4, 6])
        self.classifier = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        return self.classifier(self.head(self.backbone(x)))


def _task(steps, n=4, size=12, classes=3, channels_last=False):
    """Images whose label map is a fixed function of the pixels (learnable by a tiny model)."""
    g = torch.Generator().manual_seed(1)
    proj = torch.randn(classes, 3, generator=g)
    for _ in range(steps):
        x = torch.randn(n, 3, size, size, generator=g)
        y = torch.einsum("kc,nchw->nkhw", proj, F.avg_pool2d(x, 3, 1, 1)).argmax(1)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head", ["aspp", "sep_aspp"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fused_and_reference_train_side_by_side(backend, head, channels_last):
    torch.manual_seed(0)
    ref = TinyDeepLab(head).train()
    fused = aspp_fused.convert(copy.deepcopy(ref), backend=backend)
    assert aspp_fused.list_fused(fused)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    opt = torch.optim.SGD(fused.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step, (x, y) in enumerate(_task(6, channels_last=channels_last)):
        pair = []
        for model, o in ((ref, opt_ref), (fused, opt)):
            torch.manual_seed(100 + step)  # the same dropout masks on both sides
            o.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            o.step()
            pair.append(loss.item())
        losses.append(pair)
        # Small fp32 differences compound over steps, so the bar is the train tolerance.
        assert abs(pair[0] - pair[1]) <= 1e-3 * abs(pair[0]), (step, pair)
    assert losses[-1][1] < losses[0][1]  # it learns
    for (name, p), p_ref in zip(fused.named_parameters(), ref.parameters()):
        assert rel_err(p.detach(), p_ref.detach()) <= 1e-3, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head", ["aspp", "sep_aspp"])
def test_autocast_bf16_within_twice_pytorch_error(backend, head):
    """Forward and backward under torch.autocast(bfloat16): error against the float64 model at
    most 2x that of PyTorch's own bf16 path (docs/DESIGN.md tolerance rule)."""
    torch.manual_seed(0)
    ref = TinyDeepLab(head).train()
    for m in ref.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    fused = aspp_fused.convert(copy.deepcopy(ref), backend=backend)
    exact = copy.deepcopy(ref).double()
    x, _ = next(_task(1, n=3, size=11))
    g = torch.randn(3, 3, 11, 11)

    x64 = x.double().requires_grad_(True)
    out64 = exact(x64)
    out64.backward(g.double())
    results = {}
    for name, model in (("pytorch", ref), ("fused", fused)):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(xi)
        assert out.dtype == torch.bfloat16 or name == "pytorch"
        out.float().backward(g)
        results[name] = (rel_err(out.float(), out64), rel_err(xi.grad, x64.grad))
    assert results["fused"][0] <= 2 * results["pytorch"][0], results
    assert results["fused"][1] <= 2 * results["pytorch"][1], results
