"""convert() / revert(): torchvision and our own models, in place, same state_dict, same numbers."""
import copy

import pytest
import torch
from torch import nn

import aspp_fused
import aspp_fused.nn as ann
from conftest import BACKENDS, assert_close_rel, compare_with_twin, randomize_bn


class TinySegmenter(nn.Module):
    """A backbone stub + an ASPP head + a classifier, as users wire them."""

    def __init__(self, head):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = head
        self.classifier = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.classifier(self.head(self.backbone(x)))


@pytest.mark.parametrize("head", ["aspp", "sep_aspp"])
def test_convert_in_place_and_revert(head):
    h = ann.ASPP(8, [2, 3], out_channels=6) if head == "aspp" else ann.SeparableASPP(8, 6, [2, 3])
    model = randomize_bn(TinySegmenter(h)).eval()
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    params = list(model.parameters())
    out = aspp_fused.convert(model, backend="torch")
    assert out is model
    assert isinstance(model.head, (ann.FusedASPP, ann.FusedSeparableASPP))
    assert isinstance(model.backbone, nn.Sequential) and not isinstance(model.backbone, ann.FusedModule)
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert aspp_fused.list_fused(model) == [("head", type(h).__name__, type(model.head).__name__)]
    x = torch.randn(2, 3, 9, 11)
    assert_close_rel(model(x), ref(x), 1e-5, "converted output")
    assert aspp_fused.revert(model) is model
    assert type(model.head) is type(h) and model.head is h
    assert aspp_fused.list_fused(model) == []


def test_optimizer_built_before_convert_keeps_training():
    model = TinySegmenter(ann.ASPP(8, [2, 3], out_channels=6)).train()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    aspp_fused.convert(model, backend="torch")
    for _ in range(2):
        x = torch.randn(3, 3, 9, 11)
        for m, o in ((model, opt), (ref, opt_ref)):
            torch.manual_seed(7)
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        assert_close_rel(p, p_ref, 1e-5, name)


def test_convert_root_module_and_unsupported_layout():
    aspp = ann.ASPP(8, [2], out_channels=6)
    fused = aspp_fused.convert(aspp)
    assert isinstance(fused, ann.FusedASPP) and aspp_fused.revert(fused) is aspp
    bad = ann.ASPP(8, [2], out_channels=6)
    bad.convs[1][0].stride = (2, 2)
    model = nn.Sequential(bad)
    with pytest.warns(UserWarning, match=r"left 0 \(ASPP\) unconverted: .*stride"):
        aspp_fused.convert(model)
    assert model[0] is bad


def test_convert_rejects_bad_arguments():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        aspp_fused.convert("resnet")
    with pytest.raises(ValueError, match="backend must be one of"):
        aspp_fused.convert(nn.Sequential(), backend="fast")


def test_converted_model_pickles_and_deepcopies():
    model = aspp_fused.convert(TinySegmenter(ann.ASPP(8, [2], out_channels=6)).eval())
    clone = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(clone(x), model(x))
    restored = aspp_fused.revert(clone)
    assert type(restored.head) is ann.ASPP


# --------------------------------------------------------------------------- torchvision


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_torchvision_aspp_matches(torchvision_models, backend, train):
    from torchvision.models.segmentation.deeplabv3 import ASPP

    twin = randomize_bn(ASPP(8, [2, 5, 12], out_channels=6)).train(train)
    ref = copy.deepcopy(twin)
    fused = aspp_fused.convert(twin, backend=backend)
    assert isinstance(fused, ann.FusedASPP)
    compare_with_twin(ref, fused, torch.randn(3, 8, 7, 9, requires_grad=train), train)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_torchvision_lraspp_head_matches(torchvision_models, backend, train):
    from torchvision.models.segmentation.lraspp import LRASPPHead

    twin = randomize_bn(LRASPPHead(4, 8, 5, 6)).train(train)
    ref = copy.deepcopy(twin)
    fused = aspp_fused.convert(twin, backend=backend)
    assert isinstance(fused, ann.FusedLRASPPHead)
    inp = {"low": torch.randn(3, 4, 13, 17, requires_grad=train), "high": torch.randn(3, 8, 7, 9, requires_grad=train)}
    compare_with_twin(ref, fused, inp, train)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torchvision_deeplabv3_resnet50_end_to_end(torchvision_models, backend):
    model = torchvision_models.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=5).eval()
    randomize_bn(model)
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    aspp_fused.convert(model, backend=backend)
    assert list(model.state_dict()) == keys
    names = [n for n, _, _ in aspp_fused.list_fused(model)]
    assert names == ["classifier", "classifier.0"], names  # DeepLabHead, and the ASPP inside it
    assert isinstance(model.classifier[0], ann.FusedASPP)
    x = torch.randn(1, 3, 64, 72)
    with torch.no_grad():
        assert_close_rel(model(x)["out"], ref(x)["out"], 1e-5, "logits")
    aspp_fused.revert(model)
    assert type(model.classifier).__name__ == "DeepLabHead" and type(model.classifier[0]).__name__ == "ASPP"


def test_torchvision_lraspp_mobilenet_end_to_end(torchvision_models):
    model = torchvision_models.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5).eval()
    randomize_bn(model)
    ref = copy.deepcopy(model)
    aspp_fused.convert(model)
    fused = aspp_fused.list_fused(model)
    assert ("classifier", "LRASPPHead", "FusedLRASPPHead") in fused
    # recognised by structure: the backbone's 1x1 conv-BN-ReLU modules (torchvision's
    # Conv2dNormActivation) are conv-BN-ReLU too; nothing else is fused
    others = [(n, f) for n, _, f in fused if n != "classifier"]
    assert others and all(f == "FusedAtrousConvBNReLU" and model.get_submodule(n)[0].kernel_size == (1, 1)
                          for n, f in others), others
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        assert_close_rel(model(x)["out"], ref(x)["out"], 1e-5, "logits")


# --------------------------------------------------------------------------- generic runs, smp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_generic_sequential_runs_fused_with_same_keys(backend, train):
    seq = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1),            # plain 3x3: left alone
        # dilated run; a conv bias before a training BN has an exactly-zero gradient (BN
        # removes the mean), whose fp32 value is noise: bias only where it means something
        nn.Conv2d(8, 6, 3, padding=4, dilation=4, bias=not train), nn.BatchNorm2d(6), nn.ReLU(),
        ann.SeparableConv2d(6, 5, dilation=2), nn.BatchNorm2d(5), nn.ReLU(inplace=True),     # separable run
        nn.Conv2d(5, 3, 1),
    )
    randomize_bn(seq).train(train)
    ref = copy.deepcopy(seq)
    keys = list(seq.state_dict())
    fused = aspp_fused.convert(seq, backend=backend)
    assert isinstance(fused, ann.FusedSequential) and list(fused.state_dict()) == keys
    from aspp_fused.nn.fused_sequential import fusable_runs

    assert fusable_runs(fused) == {1: "cbr", 4: "sep"}
    compare_with_twin(ref, fused, torch.randn(3, 8, 7, 9, requires_grad=train), train)
    assert aspp_fused.revert(fused) is seq


def _smp_compare(model, ref, x, train):
    model.train(train)
    ref.train(train)
    for m in list(model.modules()) + list(ref.modules()):
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # smp models drop out after ASPP; masks are compared elsewhere
    torch.manual_seed(0)
    y_ref = ref(x)
    torch.manual_seed(0)
    y = model(x.clone())
    assert_close_rel(y, y_ref, 1e-4, "logits")
    if train:
        g = torch.randn_like(y_ref)
        y_ref.backward(g)
        y.backward(g)
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            assert_close_rel(p.grad, ref_params[name].grad, 1e-3, "grad of " + name)
        ref_buffers = dict(ref.named_buffers())
        for name, b in model.named_buffers():
            if b.is_floating_point():
                assert_close_rel(b, ref_buffers[name], 1e-3, name)


@pytest.mark.parametrize("arch", ["DeepLabV3", "DeepLabV3Plus"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_smp_models_convert_and_match(smp, arch, train):
    model = getattr(smp, arch)(encoder_name="resnet18", encoder_weights=None, classes=3)
    randomize_bn(model)
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    aspp_fused.convert(model, backend="torch")
    fused = {n: f for n, _, f in aspp_fused.list_fused(model)}
    assert any(f in ("FusedASPP", "FusedSeparableASPP") for f in fused.values()), fused
    if arch == "DeepLabV3Plus":
        assert fused["decoder.aspp.0"] == "FusedSeparableASPP"
        assert fused["decoder.aspp"] == "FusedSequential" and fused["decoder.block2"] == "FusedSequential"
    assert list(model.state_dict()) == keys
    _smp_compare(model, ref, torch.randn(2, 3, 64, 64), train)
    aspp_fused.revert(model)
    assert aspp_fused.list_fused(model) == []
