"""convert() on heads from other libraries, by structure only: transformers' MobileViT + DeepLabV3
(conv-BN-act layer modules) and mmsegmentation's ASPPHead / DepthwiseSeparableASPPHead (mmcv
ConvModules with their own forward). Tiny random configurations, nothing downloaded."""
import copy
import sys
import types

import pytest
import torch
from torch import nn

import aspp_fused
from conftest import assert_close_rel


def _stub_torchvision_ops():
    # both libraries import torchvision (transformers' image utilities, timm): same stand-in for
    # its compiled-op registrations as conftest's torchvision fixtures
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))


@pytest.fixture(scope="module")
def mobilevit():
    _stub_torchvision_ops()
    try:
        import transformers.utils as tu
        import transformers.utils.import_utils as iu

        # Run from the repository root, the project's top-level kernels/ directory shadows the
        # distribution named "kernels" (Hugging Face's hub kernels), which transformers imports when
        # that distribution's metadata is present; hub kernels are not used here.
        tu.is_kernels_available = iu.is_kernels_available = lambda *a, **k: False
        from transformers import MobileViTConfig, MobileViTForSemanticSegmentation
    except Exception as exc:
        pytest.skip("transformers not usable: %s" % exc)
    return MobileViTConfig, MobileViTForSemanticSegmentation


@pytest.fixture(scope="module")
def mmseg_heads():
    _stub_torchvision_ops()

    # mmseg imports mmcv.ops (compiled CUDA / C++ ops) at import time, which mmcv-lite does not
    # ship; the decode heads tested here never call them. A stand-in module whose every name is a
    # class that refuses to be built (so a head that did need one would fail loudly).
    def missing(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError("mmcv.ops.%s is not available in mmcv-lite (test stand-in)" % name)
        return type(name, (), {"__init__": unavailable})

    ops = types.ModuleType("mmcv.ops")
    ops.__getattr__ = missing
    ops.__path__ = []
    saved = sys.modules.get("mmcv.ops")
    sys.modules["mmcv.ops"] = ops
    # mmseg.utils imports ftfy for its text tokenizer only (not a dependency of the heads)
    if "ftfy" not in sys.modules:
        try:
            import ftfy  # noqa: F401
        except ImportError:
            sys.modules["ftfy"] = types.ModuleType("ftfy")
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from mmseg.models.decode_heads import ASPPHead, DepthwiseSeparableASPPHead
    except Exception as exc:
        pytest.skip("mmsegmentation not usable: %s" % exc)
    finally:
        if saved is not None:
            sys.modules["mmcv.ops"] = saved
    return ASPPHead, DepthwiseSeparableASPPHead


def _randomize(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(-0.5, 0.5) if p.dim() == 1 else p.normal_(0, 0.3)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return model.double()


def _check(model, run, expected_fused, expected_heads):
    """Converted == unconverted in float64: eval (1e-10), one train step (outputs, every gradient,
    running statistics); keys, revert."""
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    aspp_fused.convert(model, backend="torch")
    report = aspp_fused.explain(model)
    assert len(report.fused) == expected_fused, str(report)
    assert len([r for r in report.fused if r.kind == "head"]) == expected_heads, str(report)
    assert list(model.state_dict()) == keys
    for train in (False, True):
        model.train(train)
        ref.train(train)
        for m in list(model.modules()) + list(ref.modules()):
            if isinstance(m, nn.Dropout):
                m.p = 0.0 if train else m.p
        torch.manual_seed(1)
        y_ref = run(ref)
        torch.manual_seed(1)
        y = run(model)
        assert_close_rel(y, y_ref, 1e-10, "train" if train else "eval")
        if train:
            g = torch.randn_like(y)
            y_ref.backward(g)
            y.backward(g)
            scale = max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
            ref_params = dict(ref.named_parameters())
            for name, p in model.named_parameters():
                e = ref_params[name].grad
                if e is None:
                    assert p.grad is None, name
                elif e.abs().max().item() < 1e-12 * scale:  # exactly zero in exact arithmetic
                    assert p.grad.abs().max().item() < 1e-12 * scale, name
                else:
                    assert_close_rel(p.grad, e, 1e-9, "grad of " + name)
            ref_buffers = dict(ref.named_buffers())
            for name, b in model.named_buffers():
                if b.is_floating_point():
                    assert_close_rel(b, ref_buffers[name], 1e-10, name)
    aspp_fused.revert(model)
    assert aspp_fused.list_fused(model) == [] and all("forward" not in m.__dict__ for m in model.modules())
    return report


def test_transformers_mobilevit_deeplabv3(mobilevit):
    config_cls, model_cls = mobilevit
    config = config_cls(image_size=32, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 16, 16, 16, 32],
                        num_attention_heads=2, aspp_out_channels=8, atrous_rates=[2, 3, 4], num_labels=3)
    model = _randomize(model_cls(config))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    report = _check(model, lambda m: m(pixel_values=x).logits, 1, 1)
    head = [r for r in report.fused][0]
    assert head.path == "segmentation_head.aspp.project.convolution"
    # every dilated conv of the model runs inside the fused head
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.dilation[0] > 1:
            assert name in head.result, name


@pytest.mark.parametrize("separable", [False, True], ids=["ASPPHead", "DepthwiseSeparableASPPHead"])
def test_mmseg_aspp_heads(mmseg_heads, separable):
    aspp_head, sep_head = mmseg_heads
    bn = dict(type="BN", requires_grad=True)
    if separable:
        head = sep_head(in_channels=8, channels=6, dilations=(1, 2, 3), c1_in_channels=4, c1_channels=2,
                        num_classes=3, norm_cfg=bn)
        inputs = [torch.randn(2, 4, 13, 11, dtype=torch.float64), torch.randn(2, 8, 7, 6, dtype=torch.float64)]
    else:
        head = aspp_head(in_channels=8, channels=6, dilations=(1, 2, 3, 4), num_classes=3, norm_cfg=bn)
        inputs = [torch.randn(2, 8, 7, 6, dtype=torch.float64)]
    model = _randomize(head)
    # the head (3x3 projection of the concat: the pooled branch is broadcast before it) and, in the
    # separable head, both separable decoder blocks; the 1x1 c1 projection is left as it is
    report = _check(model, lambda m: m(inputs), 3 if separable else 1, 1)
    assert report[0].path == "bottleneck.conv" and report[0].fused
    if separable:
        c1 = [r for r in report if r.path == "c1_bottleneck.conv"]
        assert c1 and not c1[0].fused and "not an ASPP head" in c1[0].result
