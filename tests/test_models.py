"""aspp_fused.models: backbones, DeepLab v2/v3/v3+ and LR-ASPP models, local weights, multi-scale inference.

CPU and small inputs (65 x 57): the whole file runs in well under two minutes on 2 cores.
torchvision is only used for compatibility checks, through the ``torchvision_models`` fixture.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

import aspp_fused
import aspp_fused.models as M
from aspp_fused.models import mobilenet, resnet, xception
from conftest import BACKENDS, assert_close_rel, randomize_bn

H, W = 65, 57  # odd and non-square: exercises the size arithmetic of every stride and upsampling
NC = 5

# name -> small keyword arguments covering each model family (and both output strides)
MODELS = {
    "deeplabv2_resnet101": dict(output_stride=16),
    "deeplabv3_resnet50": dict(output_stride=8),
    "deeplabv3_resnet101": dict(output_stride=16),
    "deeplabv3_mobilenetv3_large": dict(output_stride=16, aux_loss=True),
    "deeplabv3plus_resnet101": dict(output_stride=16),
    "deeplabv3plus_xception65": dict(output_stride=8),
    "deeplabv3plus_mobilenetv2": dict(output_stride=16, mid_norm=True),
    "lraspp_mobilenetv3_large": dict(output_stride=16),
}


def _images(n=2, h=H, w=W):
    return torch.randn(n, 3, h, w)


@pytest.fixture(scope="session")
def tv(torchvision_models):
    """torchvision.models (importable once the conftest fixture has stubbed its compiled ops)."""
    import torchvision.models

    return torchvision.models


def _same_keys_and_shapes(ours: nn.Module, theirs: nn.Module):
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b), "key mismatch: only ours %s, only torchvision %s" % (
        sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5])
    for k in a:
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)


def _out(y):
    return y["out"] if isinstance(y, dict) else y


def _load_and_compare(ours: nn.Module, theirs: nn.Module, x, tol=1e-5):
    """torchvision's weights (random BN statistics included) into ours; same numbers."""
    _same_keys_and_shapes(ours, theirs)
    randomize_bn(theirs).eval()
    ours.load_state_dict(theirs.state_dict())
    ours.eval()
    with torch.no_grad():
        assert_close_rel(_out(ours(x)), _out(theirs(x)), tol, type(ours).__name__)


# --------------------------------------------------------------------------- the seed's model


def test_seed_deeplabv3_resnet101_runs_fused_on_cpu():
    model = M.deeplabv3_resnet101(num_classes=21, output_stride=16).eval()
    fused = aspp_fused.list_fused(model)
    assert fused, "fused=True (the default) must put fused modules inside"
    assert ("classifier", "DeepLabHead", "FusedDeepLabHead") in fused
    # multi-grid (1, 2, 4) on layer4 at output stride 16 (rate 2): unit rates 2, 4, 8
    assert [b.conv2.dilation[0] for b in model.backbone.layer4] == [2, 4, 8]
    assert [tuple(b.conv2.stride) for b in model.backbone.layer4] == [(1, 1)] * 3
    assert model.classifier[0].convs[1][0].dilation == (6, 6)
    x = _images(1)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 21, H, W) and torch.isfinite(y).all()


# --------------------------------------------------------------------------- every model: fused == reference


@pytest.mark.parametrize("name", list(MODELS))
def test_model_fused_matches_reference(name):
    build = getattr(M, name)
    ref = randomize_bn(build(num_classes=NC, fused=False, **MODELS[name])).eval()
    assert aspp_fused.list_fused(ref) == []
    fused = aspp_fused.convert(copy.deepcopy(ref))
    assert aspp_fused.list_fused(fused), "%s: convert() found nothing to fuse" % name
    assert list(fused.state_dict()) == list(ref.state_dict())
    x = _images()
    with torch.no_grad():
        y_ref = ref(x)
        y = fused(x)
    assert y.shape == (2, NC, H, W)
    assert torch.isfinite(y_ref).all()
    assert_close_rel(y, y_ref, 1e-4, name)
    # the default build (fused=True) converts the same modules, keys unchanged
    default = build(num_classes=NC, **MODELS[name])
    assert aspp_fused.list_fused(default) == aspp_fused.list_fused(fused)
    assert list(default.state_dict()) == list(ref.state_dict())


def test_expected_heads_are_fused_without_warnings():
    kinds = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a build must not leave a recognised module unconverted
        for name, kw in MODELS.items():
            if "resnet" not in name:  # the ResNet builds are covered above
                kinds[name] = {f for _, _, f in aspp_fused.list_fused(getattr(M, name)(num_classes=NC, **kw))}
    assert kinds["deeplabv3_mobilenetv3_large"] >= {"FusedDeepLabHead", "FusedASPP"}
    assert kinds["lraspp_mobilenetv3_large"] >= {"FusedLRASPPHead"}
    assert kinds["deeplabv3plus_mobilenetv2"] >= {"FusedSeparableASPP", "FusedAtrousConvBNReLU",
                                                  "FusedSeparableAtrousConv"}
    assert kinds["deeplabv3plus_xception65"] >= kinds["deeplabv3plus_mobilenetv2"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_argument_reaches_every_fused_module(backend):
    for build in (M.deeplabv3plus_mobilenetv2, M.lraspp_mobilenetv3_large):
        ref = randomize_bn(build(num_classes=NC, fused=False)).eval()
        model = build(num_classes=NC, backend=backend).eval()
        model.load_state_dict(ref.state_dict())
        fused = [m for m in model.modules() if isinstance(m, aspp_fused.nn.FusedModule)]
        assert fused and all(m.backend == backend for m in fused)
        x = _images(1)
        with torch.no_grad():
            assert_close_rel(model(x), ref(x), 1e-4, build.__name__)


def test_model_fused_training_step_matches_reference():
    """One training step (batch statistics, dropout, backward) of a v3+ model: the fused
    head gives the reference's loss, gradients and running statistics."""
    ref = randomize_bn(M.deeplabv3plus_mobilenetv2(num_classes=NC, fused=False, mid_norm=True)).train()
    fused = aspp_fused.convert(copy.deepcopy(ref))
    x = _images()
    target = torch.randint(0, NC, (2, H, W))
    grads = []
    for m in (ref, fused):
        torch.manual_seed(3)  # same dropout masks
        loss = nn.functional.cross_entropy(m(x), target)
        loss.backward()
        grads.append((loss.detach(), {k: p.grad for k, p in m.named_parameters()}))
    assert_close_rel(grads[1][0], grads[0][0], 1e-5, "loss")
    # Per tensor in the head. In the backbone some gradients are exactly 0 in theory (a BN
    # bias whose only consumer is a conv followed by a training BN), so their fp32 values are
    # rounding noise: there the error is relative to the largest backbone gradient.
    for k, g in grads[0][1].items():
        if k.startswith("classifier."):
            assert_close_rel(grads[1][1][k], g, 1e-4, "grad " + k)
    flat = [torch.cat([g.flatten() for k, g in gs.items() if k.startswith("backbone.")]) for _, gs in grads]
    assert_close_rel(flat[1], flat[0], 1e-4, "backbone grads")
    for (k, b), b_ref in zip(fused.named_buffers(), ref.buffers()):
        assert_close_rel(b.double(), b_ref.double(), 1e-5, "buffer " + k)


# --------------------------------------------------------------------------- backbones: strides, rates


def _spatial(t):
    return tuple(t.shape[-2:])


@pytest.mark.parametrize("output_stride", [8, 16])
def test_backbone_output_strides(output_stride):
    x = _images(1)
    # ceil-halving per stride: 65 -> 33 -> 17 -> 9 -> 5;  57 -> 29 -> 15 -> 8 -> 4
    expect = {8: (9, 8), 16: (5, 4)}[output_stride]
    nets = {
        "resnet50": resnet.resnet50(output_stride=output_stride),
        "mobilenet_v2": mobilenet.MobileNetV2(output_stride=output_stride),
        "mobilenet_v3_large": mobilenet.MobileNetV3Large(output_stride=output_stride),
        "xception65": xception.AlignedXception65(output_stride=output_stride),
    }
    with torch.no_grad():
        for name, net in nets.items():
            assert _spatial(net.eval()(x)) == expect, name
        low = nets["xception65"].forward_features(x, {"block1": "low", "exit": "out"})
        assert _spatial(low["low"]) == (17, 15) and low["low"].shape[1] == 128
        feats = nets["mobilenet_v2"].features.forward_features(x, {"3": "low"})
        assert _spatial(feats["low"]) == (17, 15) and feats["low"].shape[1] == 24
    assert nets["resnet50"](x).shape[1] == 2048 and nets["xception65"](x).shape[1] == 2048


def test_resnet_dilation_multi_grid_and_cascade():
    # torchvision's rule without multi-grid: the block that lost its stride keeps the previous rate
    r = resnet.resnet50(output_stride=8)
    assert [b.conv2.dilation[0] for b in r.layer3] == [1, 2, 2, 2, 2, 2]
    assert [b.conv2.dilation[0] for b in r.layer4] == [2, 4, 4]
    assert r.layer3[0].downsample[0].stride == (1, 1) and r.layer2[0].conv2.stride == (2, 2)
    # multi-grid: every unit of layer4 at rate * grid
    r = resnet.resnet50(output_stride=8, multi_grid=(1, 2, 4))
    assert [b.conv2.dilation[0] for b in r.layer4] == [4, 8, 16]
    # cascaded blocks 5-7: atrous copies of block4, the rate doubling each block, stride kept
    r = resnet.resnet50(output_stride=16, multi_grid=(1, 2, 4), cascaded_blocks=3)
    assert [[b.conv2.dilation[0] for b in getattr(r, "layer%d" % i)] for i in (4, 5, 6, 7)] == [
        [2, 4, 8], [4, 8, 16], [8, 16, 32], [16, 32, 64]]
    assert all(b.downsample is None for b in r.layer5)
    model = M.deeplabv3_resnet50(num_classes=NC, cascaded_blocks=2).eval()
    assert model.return_layers == {"layer6": "out"}
    assert any(k.startswith("backbone.layer6.") for k in model.state_dict())
    with torch.no_grad():
        assert model(_images(1)).shape == (1, NC, H, W)


def _depthwise(block):
    return next(m for m in block.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)


def test_mobilenet_dilation_conventions():
    # V3: torchvision's dilated=True (the block that lost its stride already runs at the new rate)
    f = mobilenet.MobileNetV3Large(output_stride=16).features
    assert [_depthwise(f[i]).dilation[0] for i in (12, 13, 14, 15)] == [1, 2, 2, 2]
    assert _depthwise(f[13]).stride == (1, 1) and _depthwise(f[7]).stride == (2, 2)
    f = mobilenet.MobileNetV3Large(output_stride=8).features
    assert [_depthwise(f[i]).dilation[0] for i in (6, 7, 12, 13, 15)] == [1, 2, 2, 4, 4]
    # V2: TF DeepLab (the block that lost its stride keeps the previous rate)
    f = mobilenet.MobileNetV2(output_stride=16).features
    assert [_depthwise(f[i]).dilation[0] for i in (13, 14, 15, 17)] == [1, 1, 2, 2]
    assert _depthwise(f[14]).stride == (1, 1) and _depthwise(f[7]).stride == (2, 2)


def test_xception_port_layout():
    """Spot keys and shapes of the jfzhang95 port's AlignedXception (its ReLUs keep rep indices)."""
    sd = xception.AlignedXception65(output_stride=16).state_dict()
    shapes = {
        "conv1.weight": (32, 3, 3, 3), "bn2.running_var": (64,),
        "block1.rep.0.conv1.weight": (64, 1, 3, 3), "block1.rep.0.bn.weight": (64,),
        "block1.rep.0.pointwise.weight": (128, 64, 1, 1), "block1.rep.1.weight": (128,),
        "block1.rep.6.conv1.weight": (128, 1, 3, 3), "block1.skip.weight": (128, 64, 1, 1),
        "block1.skipbn.running_mean": (128,),
        "block3.rep.1.pointwise.weight": (728, 256, 1, 1), "block3.rep.8.weight": (728,),
        "block19.rep.7.pointwise.weight": (728, 728, 1, 1),
        "block20.rep.4.pointwise.weight": (1024, 728, 1, 1), "block20.rep.7.pointwise.weight": (1024, 1024, 1, 1),
        "block20.skip.weight": (1024, 728, 1, 1),
        "conv3.conv1.weight": (1024, 1, 3, 3), "conv5.pointwise.weight": (2048, 1536, 1, 1), "bn5.bias": (2048,),
    }
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k
    assert "block4.skip.weight" not in sd and "block1.rep.2.weight" not in sd  # identity skip; ReLU slot
    assert sum(1 for k in sd if k.startswith("block")) and max(
        int(k.split(".")[0][5:]) for k in sd if k.startswith("block")) == 20


# --------------------------------------------------------------------------- torchvision compatibility


def test_torchvision_backbones_keys_and_numbers(tv):
    x = _images()
    _load_and_compare(resnet.resnet50(output_stride=8, num_classes=7),
                      tv.resnet50(num_classes=7, replace_stride_with_dilation=[False, True, True]), x)
    _same_keys_and_shapes(resnet.resnet101(num_classes=1000), tv.resnet101())
    _load_and_compare(mobilenet.MobileNetV2(num_classes=7), tv.mobilenet_v2(num_classes=7), x)
    _load_and_compare(mobilenet.MobileNetV3Large(output_stride=16, num_classes=7),
                      tv.mobilenet_v3_large(num_classes=7, dilated=True), x)
    # the segmentation trunks: torchvision's keys minus the classification head
    ours = set(resnet.resnet101(output_stride=16).state_dict())
    assert ours == {k for k in tv.resnet101().state_dict() if not k.startswith("fc.")}
    theirs = tv.mobilenet_v2().state_dict()
    assert set(mobilenet.MobileNetV2(output_stride=16).features.state_dict()) == {
        k[len("features."):] for k in theirs if k.startswith("features.") and not k.startswith("features.18.")}


@pytest.mark.parametrize("name,tv_name,kwargs,tv_kwargs", [
    ("deeplabv3_resnet50", "deeplabv3_resnet50", dict(output_stride=8, multi_grid=None, aux_loss=True),
     dict(aux_loss=True)),
    ("deeplabv3_resnet101", "deeplabv3_resnet101", dict(output_stride=8, multi_grid=None), dict(aux_loss=False)),
    ("deeplabv3_mobilenetv3_large", "deeplabv3_mobilenet_v3_large",
     dict(atrous_rates=(12, 24, 36), aux_loss=True), dict(aux_loss=True)),
    ("lraspp_mobilenetv3_large", "lraspp_mobilenet_v3_large", dict(), dict()),
])
def test_torchvision_segmentation_checkpoints_load(tv, tmp_path, name, tv_name, kwargs, tv_kwargs):
    """A torchvision segmentation checkpoint file loads key for key through pretrained=PATH and,
    in the matching configuration, gives torchvision's logits from the fused model."""
    theirs = randomize_bn(getattr(tv.segmentation, tv_name)(weights=None, weights_backbone=None, num_classes=NC,
                                                             **tv_kwargs)).eval()
    path = tmp_path / "tv.pth"
    torch.save(theirs.state_dict(), path)
    ours = getattr(M, name)(num_classes=NC, pretrained=path, **kwargs).eval()
    assert aspp_fused.list_fused(ours)
    _same_keys_and_shapes(ours, theirs)
    x = _images()
    with torch.no_grad():
        assert_close_rel(ours(x), theirs(x)["out"], 1e-4, name)
        if kwargs.get("aux_loss"):
            out, aux = ours.forward_with_aux(x)
            assert_close_rel(aux, theirs(x)["aux"], 1e-5, name + " aux")


# --------------------------------------------------------------------------- local weights


def test_pretrained_file_loads(tmp_path):
    src = randomize_bn(M.lraspp_mobilenetv3_large(num_classes=NC, fused=False)).eval()
    path = tmp_path / "good.pth"
    torch.save({"epoch": 3, "state_dict": src.state_dict()}, path)  # a training checkpoint container
    model = M.lraspp_mobilenetv3_large(num_classes=NC, pretrained=str(path)).eval()
    x = _images(1)
    with torch.no_grad():
        assert_close_rel(model(x), src(x), 1e-5, "loaded model")


def test_pretrained_file_mismatch_is_a_clear_error(tmp_path):
    sd = M.lraspp_mobilenetv3_large(num_classes=NC, fused=False).state_dict()
    bad = dict(sd)
    del bad["classifier.low_classifier.bias"]
    bad["classifier.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError, match=r"lraspp_mobilenetv3_large: pretrained='.*bad\.pth' does not match the "
                                         r"model: 1 missing key\(s\) \[classifier\.low_classifier\.bias\]; "
                                         r"1 unexpected key\(s\) \[classifier\.extra\.weight\]"):
        M.lraspp_mobilenetv3_large(num_classes=NC, pretrained=path)
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"shape mismatch.*classifier\.low_classifier\.weight: file \(5, 40, 1, 1\), "
                                         r"model \(3, 40, 1, 1\)"):
        M.lraspp_mobilenetv3_large(num_classes=3, pretrained=path)
    with pytest.raises(FileNotFoundError, match="pretrained='.*nope.pth': no such file"):
        M.lraspp_mobilenetv3_large(pretrained=tmp_path / "nope.pth")
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read by torch.load"):
        M.lraspp_mobilenetv3_large(pretrained=path)


def test_pretrained_aux_hint(tmp_path):
    sd = M.deeplabv3_mobilenetv3_large(num_classes=NC, aux_loss=True, fused=False).state_dict()
    path = tmp_path / "aux.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"unexpected key\(s\) \[aux_classifier\.0\.weight.*aux_loss=True"):
        M.deeplabv3_mobilenetv3_large(num_classes=NC, pretrained=path)


def test_pretrained_backbone_skips_the_classification_head(tmp_path):
    """An ImageNet checkpoint of the torchvision layout (here our own classification twin) initialises
    the backbone; its classifier (and MobileNetV2's features.18) is skipped, nothing else."""
    cls = randomize_bn(mobilenet.MobileNetV2(num_classes=1000))
    path = tmp_path / "mv2.pth"
    torch.save(cls.state_dict(), path)
    model = M.deeplabv3plus_mobilenetv2(num_classes=NC, pretrained_backbone=path)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, cls.state_dict()["features." + k]), k
    cls = resnet.resnet50(num_classes=1000)
    torch.save(cls.state_dict(), path)
    model = M.deeplabv3_resnet50(num_classes=NC, pretrained_backbone=path, fused=False)
    assert torch.equal(model.backbone.layer4[2].conv3.weight, cls.layer4[2].conv3.weight)
    with pytest.raises(ValueError, match="pretrained_backbone=.*does not match.*missing"):
        M.deeplabv3_mobilenetv3_large(pretrained_backbone=path)  # a ResNet file for a MobileNet


# --------------------------------------------------------------------------- training helpers


def test_lr_param_groups_partition_all_parameters():
    model = M.deeplabv3_mobilenetv3_large(num_classes=NC, aux_loss=True)
    one = list(model.get_1x_lr_params())
    ten = list(model.get_10x_lr_params())
    ids1, ids10 = {id(p) for p in one}, {id(p) for p in ten}
    assert len(ids1) == len(one) and len(ids10) == len(ten) and not ids1 & ids10
    assert ids1 | ids10 == {id(p) for p in model.parameters()}
    assert ids1 == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in model.aux_classifier.parameters()} <= ids10
    torch.optim.SGD([{"params": one}, {"params": ten, "lr": 0.1}], lr=0.01)  # the seed's usage
    model.backbone[0][0].weight.requires_grad_(False)  # frozen parameters are left out
    assert len(list(model.get_1x_lr_params())) == len(one) - 1


def test_freeze_bn():
    model = M.deeplabv3plus_mobilenetv2(num_classes=NC).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert model.freeze_backbone_bn() is model
    assert all(not m.training for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    assert any(m.training for m in model.classifier.modules() if isinstance(m, nn.BatchNorm2d))
    model.freeze_bn()
    assert all(not m.training for m in bns)
    assert model.classifier.training  # dropout etc. stay in training mode
    stats = [m.running_mean.clone() for m in bns]
    with torch.no_grad():
        model(_images())
    assert all(torch.equal(m.running_mean, s) for m, s in zip(bns, stats)), "frozen BN updated its statistics"


def test_forward_with_aux():
    model = M.deeplabv3_resnet50(num_classes=NC, aux_loss=True, output_stride=16).eval()
    x = _images(1)
    with torch.no_grad():
        out, aux = model.forward_with_aux(x)
        assert torch.equal(out, model(x))
        assert out.shape == aux.shape == (1, NC, H, W)
    with pytest.raises(RuntimeError, match="aux_loss=True"):
        M.lraspp_mobilenetv3_large(num_classes=NC).forward_with_aux(_images(1))


# --------------------------------------------------------------------------- multi-scale inference


def test_multi_scale_inference():
    model = M.lraspp_mobilenetv3_large(num_classes=NC).eval()
    x = _images()
    y = M.multi_scale_inference(model, x)
    assert y.shape == (2, NC, H, W) and torch.isfinite(y).all()
    with torch.no_grad():
        assert_close_rel(M.multi_scale_inference(model, x, scales=(1.0,), flip=False), model(x), 1e-6, "scale 1")
        expected = (model(x) + model(x.flip(-1)).flip(-1)) / 2
    assert_close_rel(M.multi_scale_inference(model, x, scales=[1], flip=True), expected, 1e-6, "flip")
    # torchvision-style dict outputs are accepted
    dict_model = nn.Module()
    dict_model.forward = lambda t: {"out": model(t)}
    assert M.multi_scale_inference(dict_model.eval(), x, scales=(0.5,)).shape == (2, NC, H, W)


def test_multi_scale_inference_arguments():
    model = M.lraspp_mobilenetv3_large(num_classes=NC)
    with pytest.raises(ValueError, match="images must be a 4-D tensor"):
        M.multi_scale_inference(model, torch.randn(3, H, W))
    with pytest.raises(ValueError, match="scales must be"):
        M.multi_scale_inference(model, _images(1), scales=())
    with pytest.raises(ValueError, match="scales must be"):
        M.multi_scale_inference(model, _images(1), scales=(1.0, -0.5))
    with pytest.warns(UserWarning, match="training mode"):
        M.multi_scale_inference(model.train(), _images(2, 33, 33), scales=(1.0,), flip=False)


# --------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize("kwargs,match", [
    (dict(output_stride=32), "deeplabv3_resnet50: output_stride must be one of 8, 16, got 32"),
    (dict(num_classes=0), "num_classes must be >= 1, got 0"),
    (dict(num_classes=True), "num_classes must be an int"),
    (dict(multi_grid=(1, 2)), "multi_grid must have 3 entries"),
    (dict(multi_grid=(1, 0, 2)), "multi_grid must be a non-empty sequence of positive ints"),
    (dict(cascaded_blocks=4), "deeplabv3_resnet50: cascaded_blocks must be one of 0, 1, 2, 3"),
    (dict(atrous_rates=(6, 12)), "atrous_rates must have 3 entries"),
    (dict(backend="nope"), "backend must be one of"),
    (dict(fused="yes"), "fused must be True or False"),
])
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.deeplabv3_resnet50(**kwargs)


def test_argument_errors_other_models():
    with pytest.raises(ValueError, match="deeplabv3plus_xception65: output_stride must be one of 8, 16"):
        M.deeplabv3plus_xception65(output_stride=4)
    with pytest.raises(ValueError, match="lraspp_mobilenetv3_large: inter_channels must be >= 1"):
        M.lraspp_mobilenetv3_large(inter_channels=0)
    with pytest.raises(ValueError, match="deeplabv3plus_mobilenetv2: mid_norm must be True or False"):
        M.deeplabv3plus_mobilenetv2(mid_norm=1)
    with pytest.raises(ValueError, match="deeplabv2_resnet101: atrous_rates must be a non-empty"):
        M.deeplabv2_resnet101(atrous_rates=())
    with pytest.raises(ValueError, match="pass pretrained .* or pretrained_backbone, not both"):
        M.lraspp_mobilenetv3_large(pretrained="a", pretrained_backbone="b")
    with pytest.raises(TypeError, match="pretrained must be a path"):
        M.lraspp_mobilenetv3_large(pretrained={"a": torch.zeros(1)})
