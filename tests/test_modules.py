"""Fused modules against their plain-PyTorch twins: outputs, gradients, running stats, state_dicts."""
import copy

import pytest
import torch
from torch import nn

import aspp_fused
import aspp_fused.nn as ann
from conftest import BACKENDS, DEV, assert_close_rel, compare_with_twin, needs_triton, randomize_bn

TOL = 1e-5  # fp32 against fp32 PyTorch; the algebra differs (folded BN, pooling as a bias)


def _aspp():
    return ann.ASPP(8, [2, 3, 12], out_channels=6), ann.FusedASPP


def _sep_aspp():
    return ann.SeparableASPP(8, 6, [2, 5, 12]), ann.FusedSeparableASPP


def _sep_aspp_mid():
    # Rates below every test map size: when only the centre tap of a depthwise conv is
    # in the image, a training mid BN makes the output invariant to that weight, so its
    # exact gradient is 0 and any fp32 value (PyTorch's too) is pure rounding noise.
    return ann.SeparableASPP(8, 6, [1, 2, 3], mid_norm=True), ann.FusedSeparableASPP


def _aspp_v2():
    m = ann.ASPPv2(8, 5, [1, 6, 12, 24])
    with torch.no_grad():  # the DeepLab v2 init (std 0.01, zero bias) makes outputs tiny
        for c in m.convs:
            c.weight.normal_()
            c.bias.normal_()
    return m, ann.FusedASPPv2


def _deeplab_head():
    return ann.DeepLabHead(8, 5, [2, 3, 12]), ann.FusedDeepLabHead


def _cbr3():
    return ann.AtrousConvBNReLU(8, 6, 3, 7), ann.FusedAtrousConvBNReLU


def _cbr1():
    return ann.AtrousConvBNReLU(8, 6, 1, 1), ann.FusedAtrousConvBNReLU


def _sep():
    return ann.SeparableAtrousConv(8, 6, 3), ann.FusedSeparableAtrousConv


def _sep_mid():
    return ann.SeparableAtrousConv(8, 6, 3, mid_norm=True), ann.FusedSeparableAtrousConv


def _lraspp():
    return ann.LRASPPHead(4, 8, 5, 6), ann.FusedLRASPPHead


CASES = {
    "aspp": _aspp, "sep_aspp": _sep_aspp, "sep_aspp_mid": _sep_aspp_mid, "aspp_v2": _aspp_v2,
    "deeplab_head": _deeplab_head, "cbr3": _cbr3, "cbr1": _cbr1, "sep": _sep, "sep_mid": _sep_mid,
    "lraspp": _lraspp,
}

# (N, H, W): odd sizes, a rate (12) at or beyond the map size, a 1-pixel-wide map, batch 1
# (eval only: training raises, see test_batch_of_one_raises_like_the_original).
# Training uses N >= 3: the image-pooling BN normalises N values of a 1x1 map, and for N = 2
# they normalise to exactly +-1, so its input gradient is identically zero and what fp32
# computes there is rounding noise amplified by 1 / |a - b| (in PyTorch's twin as well).
SHAPES = [(3, 7, 9), (4, 5, 5), (3, 13, 1), (1, 6, 7)]


def _inputs(case, n, h, w, channels_last, requires_grad):
    def mk(c, hh, ww):
        t = torch.randn(n, c, hh, ww)
        if channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        return t.requires_grad_(requires_grad)

    if case == "lraspp":
        return {"low": mk(4, 2 * h + 1, 2 * w), "high": mk(8, h, w)}
    return mk(8, h, w)


def _pair(case, backend, train):
    twin, fused_cls = CASES[case]()
    randomize_bn(twin)
    twin.train(train)
    ref = copy.deepcopy(twin)
    return ref, fused_cls.from_module(twin, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("train,shape", [(t, s) for t in (False, True) for s in SHAPES if not (t and s[0] == 1)],
                         ids=lambda v: ("train" if v else "eval") if isinstance(v, bool) else "x".join(map(str, v)))
def test_fused_matches_twin(case, backend, train, shape):
    n, h, w = shape
    ref, fused = _pair(case, backend, train)
    compare_with_twin(ref, fused, _inputs(case, n, h, w, channels_last=False, requires_grad=train), train)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["aspp", "sep_aspp", "lraspp"])
def test_channels_last_and_noncontiguous_inputs(case, backend):
    ref, fused = _pair(case, backend, True)
    compare_with_twin(ref, fused, _inputs(case, 3, 7, 9, channels_last=True, requires_grad=True), True)
    x = torch.randn(3, 8, 9, 7).transpose(2, 3)  # non-contiguous view
    if case != "lraspp":
        ref.eval(), fused.eval()
        compare_with_twin(ref, fused, x, False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_train_steps_then_eval(backend):
    """Running stats accumulate over steps (momentum=None: cumulative average) exactly as nn's."""
    twin = ann.ASPP(8, [2, 12], out_channels=6)
    for m in twin.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    ref = copy.deepcopy(twin)
    fused = ann.FusedASPP.from_module(twin, backend=backend)
    for _ in range(3):
        x = torch.randn(3, 8, 6, 7) * 2 + 0.5
        compare_with_twin(ref.train(), fused.train(), x, True)
    compare_with_twin(ref.eval(), fused.eval(), torch.randn(2, 8, 6, 7), False)


# The Triton backend, reached through convert(): interpreted on CPU (every program in numpy), so the
# ASPP heads at one eval and one train shape; on DEV (a GPU's CUDA tensors where there is one).
TRITON_CASES = ["aspp", "aspp_v2", "sep_aspp", "sep_aspp_mid"]


@needs_triton
@pytest.mark.usefixtures("no_tf32")  # conftest: the exact fp32 path
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", TRITON_CASES)
def test_convert_to_triton_matches_twin(case, train):
    n, h, w = (3, 7, 9) if train else (2, 7, 5)  # N >= 3 in training: see SHAPES
    twin, fused_cls = CASES[case]()
    twin = randomize_bn(twin).to(DEV).train(train)
    if hasattr(twin, "project"):
        twin.project[3].p = 0.0  # dropout masks would differ between the fp64 twin and fp32 kernels' order
    ref = copy.deepcopy(twin)
    fused = aspp_fused.convert(twin, backend="triton")
    assert type(fused) is fused_cls and fused.backend == "triton"
    compare_with_twin(ref, fused, torch.randn(n, 8, h, w, device=DEV).requires_grad_(train), train, TOL)


@needs_triton
@pytest.mark.usefixtures("no_tf32")
def test_convert_to_triton_several_train_steps_then_eval():
    """Running stats accumulate over training steps on the Triton backend, then eval uses them."""
    twin = randomize_bn(ann.ASPP(8, [2, 12], out_channels=6)).to(DEV)
    twin.project[3].p = 0.0
    ref = copy.deepcopy(twin)
    fused = aspp_fused.convert(twin, backend="triton")
    for _ in range(2):
        x = torch.randn(3, 8, 6, 7, device=DEV) * 2 + 0.5
        compare_with_twin(ref.train(), fused.train(), x.requires_grad_(), True, TOL)
    compare_with_twin(ref.eval(), fused.eval(), torch.randn(2, 8, 6, 7, device=DEV), False, TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bn_without_running_stats_uses_batch_stats_in_eval(backend):
    twin = ann.AtrousConvBNReLU(8, 6, 3, 2)
    twin[1] = nn.BatchNorm2d(6, track_running_stats=False)
    ref = copy.deepcopy(twin).eval()
    fused = ann.FusedAtrousConvBNReLU.from_module(twin.eval(), backend=backend)
    compare_with_twin(ref, fused, torch.randn(2, 8, 5, 6), False)


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dict_and_parameters_shared(case):
    twin, fused_cls = CASES[case]()
    keys = list(twin.state_dict())
    params = {n: p for n, p in twin.named_parameters()}
    fused = fused_cls.from_module(twin)
    assert list(fused.state_dict()) == keys
    for n, p in fused.named_parameters():
        assert p is params[n], n  # shared, so an optimizer built before conversion keeps working
    assert fused.to_reference() is twin


@pytest.mark.parametrize("case", ["aspp", "sep_aspp", "aspp_v2", "cbr3", "sep", "lraspp", "deeplab_head"])
def test_direct_construction_loads_twin_checkpoint(case):
    twin, fused_cls = CASES[case]()
    randomize_bn(twin).eval()
    args = {
        "aspp": ((8, [2, 3, 12]), {"out_channels": 6}), "sep_aspp": ((8, 6, [2, 5, 12]), {}),
        "aspp_v2": ((8, 5, [1, 6, 12, 24]), {}), "cbr3": ((8, 6, 3, 7), {}), "sep": ((8, 6, 3), {}),
        "lraspp": ((4, 8, 5, 6), {}), "deeplab_head": ((8, 5, [2, 3, 12]), {}),
    }[case]
    fused = fused_cls(*args[0], backend="torch", **args[1])
    fused.load_state_dict(twin.state_dict())
    fused.eval()
    inp = _inputs(case, 2, 7, 9, False, False)
    assert_close_rel(fused(inp), twin(inp), TOL, "output")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_of_one_raises_like_the_original(backend):
    twin = ann.ASPP(8, [2], out_channels=6).train()
    fused = ann.FusedASPP.from_module(copy.deepcopy(twin), backend=backend)
    x = torch.randn(1, 8, 5, 5)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel") as e_ref:
        twin(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel") as e_fused:
        fused(x)
    assert str(e_fused.value) == str(e_ref.value)
    cbr = ann.FusedAtrousConvBNReLU(8, 6, 1, 1, backend=backend).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        cbr(torch.randn(1, 8, 1, 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["aspp", "sep_aspp", "aspp_v2", "cbr3", "lraspp"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_batch_zero_behaves_like_the_original(case, backend, train):
    ref, fused = _pair(case, backend, train)
    inp = _inputs(case, 0, 5, 6, False, False)
    try:
        expected = ref(inp)
    except Exception as exc:  # the original refuses: so must we, with the same type
        with pytest.raises(type(exc)):
            fused(inp)
        return
    out = fused(inp)
    assert out.shape == expected.shape
    for (name, b), (_, b_ref) in zip(fused.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, b_ref), name


def test_wrong_input_errors_name_the_module():
    fused = ann.FusedASPP(8, [2], out_channels=6)
    with pytest.raises(ValueError, match="FusedASPP: input has 5 channels, expected 8"):
        fused(torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match="4-D"):
        fused(torch.randn(8, 4, 4))
    with pytest.raises(TypeError, match="dict with 'low' and 'high'"):
        ann.FusedLRASPPHead(4, 8, 5, 6)(torch.randn(2, 8, 4, 4))


def test_from_module_explains_unsupported_layouts():
    twin = ann.ASPP(8, [2], out_channels=6)
    twin.convs[1][0].stride = (2, 2)
    with pytest.raises(ValueError, match=r"convs\[1\]\[0\] has stride \(2, 2\), expected 1"):
        ann.FusedASPP.from_module(twin)
    with pytest.raises(ValueError, match="backend must be one of"):
        ann.FusedASPP(8, [2], backend="cuda")
    with pytest.raises(ValueError, match="atrous_rates must be positive"):
        ann.FusedASPP(8, [0, 2])


def test_eval_fold_cache_follows_parameter_changes():
    """Inference reuses the BN-folded weights until a parameter or running stat changes."""
    twin = randomize_bn(ann.ASPP(8, [2, 3], out_channels=6)).eval()
    fused = ann.FusedASPP.from_module(copy.deepcopy(twin), backend="torch").eval()
    x = torch.randn(2, 8, 7, 9)
    with torch.no_grad():
        assert_close_rel(fused(x), twin(x), TOL, "first call")
        assert_close_rel(fused(x), twin(x), TOL, "cached call")
        for m in (twin, fused):  # an in-place update, as an optimizer or load_state_dict does
            m.convs[1][0].weight.mul_(1.5)
            m.convs[1][1].running_var.add_(0.3)
        assert_close_rel(fused(x), twin(x), TOL, "after in-place updates")
        fused.load_state_dict(randomize_bn(copy.deepcopy(twin)).state_dict())
        twin.load_state_dict(fused.state_dict())
        assert_close_rel(fused(x), twin(x), TOL, "after load_state_dict")
    clone = copy.deepcopy(fused)
    with torch.no_grad():
        clone.convs[0][0].weight.zero_()
        assert_close_rel(fused(x), twin(x), TOL, "a deepcopy does not share the cache")
