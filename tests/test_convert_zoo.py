"""convert() on DeepLab code in the styles found in the wild (tests/zoo): recognition by structure
and dataflow, exact parity in float64, training, state_dicts, hooks, revert, report, copies."""
import copy
import importlib
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aspp_fused
import zoo
from conftest import assert_close_rel, assert_grads_close

CASES = ["attr_branches", "own_forward", "seq_subclass", "tv_layout", "wrappers", "v2_sum"]
HEAD_MODULES = ("FusedASPP", "FusedSeparableASPP", "FusedASPPv2", "FusedLRASPPHead")
X_SHAPE = (3, 3, 13, 11)


def _case(name):
    return importlib.import_module("zoo." + name)


def _build(name, dtype=torch.float64):
    return zoo.build(name, dtype)


def _heads(report):
    return [r for r in report.fused if r.kind in ("head", "v2-sum") or r.result.split(" ")[0] in HEAD_MODULES]


def _convert(model):
    return aspp_fused.convert(model, backend="torch")


@pytest.mark.parametrize("name", CASES)
def test_counts_and_report(name):
    model = _build(name)
    before = aspp_fused.explain(model)
    assert all(r.path for r in before)
    _convert(model)
    report = aspp_fused.explain(model)
    expected = _case(name).EXPECTED
    assert len(report.fused) == expected["fused_sites"], str(report)
    assert len(_heads(report)) == expected["heads"], str(report)
    assert [r.fused for r in before] == [r.fused for r in report] or len(before.fused) == len(report.fused)
    for path, why in expected["unfused"].items():
        hits = [r for r in report if r.path == path and not r.fused]
        assert hits and why in hits[0].result, (path, str(report))
    # every conv of the model is named by the report (a site's path, a fused module, or a head's parts)
    text = str(report)
    for path, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and path not in expected["not_sites"]:  # classifiers etc.: no BN, no site
            assert path in text or any(path.startswith(r.path + ".") for r in report), (path, text)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_eval_parity(name, dtype, tol):
    model = _build(name, dtype).eval()
    ref = copy.deepcopy(model)
    _convert(model)
    x = torch.randn(*X_SHAPE, dtype=dtype)
    with torch.no_grad():
        assert_close_rel(model(x), ref(x), tol, name)
        xc = x.contiguous(memory_format=torch.channels_last)
        assert_close_rel(model(xc), ref(xc), tol, name + " channels_last")


@pytest.mark.parametrize("name", CASES)
def test_train_step_parity(name):
    model = _build(name).train()
    ref = copy.deepcopy(model)
    _convert(model)
    x = torch.randn(*X_SHAPE, dtype=torch.float64)
    torch.manual_seed(3)
    y_ref = ref(x)
    torch.manual_seed(3)
    y = model(x)
    assert_close_rel(y, y_ref, 1e-10, "train output")
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    assert_grads_close({n: p.grad for n, p in model.named_parameters()},
                       {n: p.grad for n, p in ref.named_parameters()}, 1e-9)
    ref_buffers = dict(ref.named_buffers())
    for bname, b in model.named_buffers():
        if b.is_floating_point():
            assert_close_rel(b, ref_buffers[bname], 1e-10, bname)
        else:
            assert torch.equal(b, ref_buffers[bname]), bname


@pytest.mark.parametrize("name", CASES)
def test_keys_identity_hooks_revert(name):
    model = _build(name).eval()
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    params = list(model.parameters())
    modules = list(model.named_modules())
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append("pre"))
    model.register_forward_hook(lambda m, a, o: calls.append("post"))
    out = _convert(model)
    assert out is model and type(model) is type(ref)
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params))
    # converting again changes nothing
    fused = aspp_fused.list_fused(model)
    assert fused and aspp_fused.convert(model, backend="torch") is model and aspp_fused.list_fused(model) == fused
    x = torch.randn(*X_SHAPE, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
    assert calls == ["pre", "post"]
    # hooks on a fused module / a module with a fused forward fire (moved along when replaced)
    for path, _, _ in fused:
        sub = model if path == "<root>" else model.get_submodule(path)
        seen = []
        h = sub.register_forward_hook(lambda m, a, o: seen.append(1))
        with torch.no_grad():
            model(x)
        h.remove()
        assert seen, path
    assert aspp_fused.revert(model) is model
    assert [(n, id(m)) for n, m in model.named_modules()] == [(n, id(m)) for n, m in modules]
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert aspp_fused.list_fused(model) == []
    with torch.no_grad():
        assert_close_rel(model(x), ref(x), 1e-10, "reverted")


@pytest.mark.parametrize("name", CASES)
def test_copies_pickles_and_state_dict_into_unconverted(name):
    model = _convert(_build(name).eval())
    x = torch.randn(*X_SHAPE, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
    clone = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    unpickled = pickle.loads(pickle.dumps(model))
    for other in (clone, loaded, unpickled):
        assert aspp_fused.list_fused(other) == aspp_fused.list_fused(model)
        assert all(p is not q for p, q in zip(other.parameters(), model.parameters()))
        with torch.no_grad():
            assert torch.equal(other(x), y)
        # the copy's fused forward runs the copy's parameters, not the original's
        with torch.no_grad():
            for p in other.parameters():
                p.mul_(0.5)
            assert not torch.equal(other(x), y)
    fresh = _build(name).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert_close_rel(fresh(x), y, 1e-10, "unconverted with the converted state_dict")


def test_hooks_of_a_replaced_module_move_to_its_replacement():
    model = _build("tv_layout").eval()
    seen = []
    model.classifier.register_forward_pre_hook(lambda m, a: seen.append("pre"))
    handle = model.classifier.register_forward_hook(lambda m, a, o: seen.append("post"))
    _convert(model)
    assert type(model.classifier).__name__ == "FusedDeepLabHead"
    with torch.no_grad():
        model(torch.randn(*X_SHAPE, dtype=torch.float64))
    assert seen == ["pre", "post"]
    handle.remove()  # the handle still works on the replacement
    with torch.no_grad():
        model(torch.randn(*X_SHAPE, dtype=torch.float64))
    assert seen == ["pre", "post", "pre"]


def test_hook_on_inner_conv_leaves_site_unfused_and_reported():
    model = _build("attr_branches").eval()
    seen = []
    model.aspp.aspp3.atrous_conv.register_forward_hook(lambda m, a, o: seen.append(1))
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"left aspp \(AttrASPP\) unconverted: .*aspp3.atrous_conv carries a hook"):
        _convert(model)
    report = aspp_fused.explain(model)
    assert not [r for r in report if r.kind == "head" and r.fused]
    x = torch.randn(*X_SHAPE, dtype=torch.float64)
    with torch.no_grad():
        assert_close_rel(model(x), ref(x), 1e-10, "hooked")
    assert seen


def test_untraceable_forward_is_reported_and_deeplab_with_nothing_fused_warns():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return F.relu(self.bn(self.conv(x)))
            return x

    model = nn.Sequential(Branchy())
    report = aspp_fused.explain(model)
    assert len(report) == 1 and not report[0].fused and report[0].path == "0"
    assert report[0].result.startswith("forward not traceable: ")
    with pytest.warns(UserWarning, match="NOTHING was fused"):
        aspp_fused.convert(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_upsampling_a_1x1_map_is_a_constant_broadcast(dtype):
    """Why the image pooling branch fuses under either align_corners: bilinear upsampling of a
    1x1 map is constant over H x W. align_corners=True (and nearest) reproduce the value
    exactly; align_corners=False computes (1 - l) v + l v per pixel, equal to v up to the
    rounding of those terms (measured: at most 1.31 eps |v|, i.e. within 2 ulp), so the fused
    constant is the exact value of what the original rounds."""
    torch.manual_seed(0)
    v = torch.randn(4, 16, 1, 1, dtype=dtype) * 100
    for size in ((7, 9), (33, 33), (65, 57), (1, 5)):
        exact = v.expand(4, 16, *size)
        assert torch.equal(F.interpolate(v, size=size, mode="bilinear", align_corners=True), exact)
        assert torch.equal(F.interpolate(v, size=size, mode="nearest"), exact)
        y = F.interpolate(v, size=size, mode="bilinear", align_corners=False)
        ulp = 2 * torch.finfo(dtype).eps * v.abs()
        assert ((y - exact).abs() <= ulp).all()


def test_frozen_batchnorm_site_is_reported(torchvision_models):
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False), FrozenBatchNorm2d(4), nn.ReLU())
    report = aspp_fused.explain(model)
    assert len(report) == 1 and not report[0].fused and report[0].path == "0"
    assert "normalization is FrozenBatchNorm2d" in report[0].result
