"""The torch backend's CPU inference path (aspp_fused/torch_onednn.py): the op against the float64
torch backend on every mode (concat, sum, projection over column ranges, pruned taps), opcheck;
where the fused modules take it and where not (training, autograd, export, other dtypes, the
switch); weights packed once per parameter version, across calls, models, threads and
torch.compile."""
import copy

import pytest
import torch
from torch import nn

import aspp_fused
import aspp_fused.nn as ann
from aspp_fused import torch_backend, torch_onednn
from aspp_fused.kernels.pack_cache import PACKED
from conftest import assert_close_rel, randomize_bn, run_in_threads

pytestmark = pytest.mark.skipif(not torch_onednn.AVAILABLE, reason="this torch has no oneDNN")

OP = torch.ops.aspp_fused.onednn_conv.default


@pytest.fixture(autouse=True)
def packings():
    """An empty cache, and a count of the packings since the test began."""
    PACKED.clear()
    start = PACKED.misses
    yield lambda: PACKED.misses - start
    PACKED.clear()


def _ref(x, weights, cols, dilations, scale, shift, sample_bias, sum_mode, act, proj_weight, proj_cols, proj_scale,
         proj_shift):
    """The op's schema (torch_onednn.py) written with the float64 torch backend."""
    if cols:
        weights = [w[:, k:k + x.shape[1]] for w, k in zip(weights, cols)]
    d64 = [None if t is None else t.double() for t in (x, scale, shift, sample_bias, proj_scale, proj_shift)]
    x64, scale, shift, sample_bias, proj_scale, proj_shift = d64
    ws = [w.double() for w in weights]
    if proj_weight is None:
        out, _, _ = torch_backend.atrous_conv(x64, ws, dilations, scale, shift, sample_bias, sum_mode, act, False)
        return out
    h, _, _ = torch_backend.atrous_conv(x64, ws, dilations, scale, shift, None, False, act, False)
    w_main = torch.cat([proj_weight[:, c:c + w.shape[0]] for c, w in zip(proj_cols, weights)], 1).double()
    out, _, _ = torch_backend.atrous_conv(h, [w_main], [1], proj_scale, proj_shift, sample_bias, False, act, False)
    return out


def _case(n=2, c=6, hw=(7, 9), widths=(4, 3, 5), dilations=(1, 2, 8), sample_bias=False, sum_mode=False, act=1,
          proj=None, scale=True, cols=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *hw, generator=g)
    if sum_mode:
        widths = (widths[0],) * len(widths)
    extra = 3 if cols else 0  # weights wider than x, read from column 2 (branch 0) / 0 (the others)
    weights = [torch.randn(o, c + extra, 1 if d == 1 else 3, 1 if d == 1 else 3, generator=g)
               for o, d in zip(widths, dilations)]
    o_all = widths[0] if sum_mode else sum(widths)
    sc = torch.rand(o_all, generator=g) + 0.5 if scale else None
    sh = torch.randn(o_all, generator=g) if scale else None
    proj_weight, cols_p, psc, psh = None, [], None, None
    if proj is not None:  # (P, gap): the projection's columns, a gap of `gap` unused columns before branch 1
        p, gap = proj
        proj_weight = torch.randn(p, o_all + gap, 1, 1, generator=g)
        cols_p = [0] + [sum(widths[:i]) + gap for i in range(1, len(widths))]
        psc, psh = torch.rand(p, generator=g) + 0.5, torch.randn(p, generator=g)
    o_out = proj[0] if proj is not None else o_all
    sb = torch.randn(n, o_out, generator=g) if sample_bias else None
    branch_cols = [2] + [0] * (len(widths) - 1) if cols else []
    return [x, weights, branch_cols, list(dilations), sc, sh, sb, sum_mode, act, proj_weight, cols_p, psc, psh]


CASES = {
    "concat_relu": dict(),
    "concat_sample_bias": dict(sample_bias=True),
    "concat_no_act_no_scale": dict(act=0, scale=False),
    "sum": dict(sum_mode=True, act=0),
    "sum_relu_sample_bias": dict(sum_mode=True, sample_bias=True),
    "projection": dict(proj=(5, 0)),
    "projection_gap_sample_bias": dict(proj=(5, 3), sample_bias=True),
    "rates_beyond_map": dict(dilations=(1, 9, 12), hw=(6, 10)),  # 3x3 -> 1x3 and 1x1
    "one_pixel": dict(hw=(1, 1), dilations=(1, 2, 3), proj=(4, 2)),
    "batch_1_single_branch": dict(n=1, widths=(4,), dilations=(3,)),
    "weight_columns": dict(cols=True, sample_bias=True),
    "weight_columns_projection": dict(cols=True, proj=(5, 2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_op_matches_reference(name):
    args = _case(**CASES[name])
    out = OP(*args)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == torch.float32
    assert_close_rel(out, _ref(*args), 2e-6, name)
    assert_close_rel(OP(*args), out, 0.0, name + " (cached packing)")


def test_op_follows_a_scale_edited_in_place():
    """The scale is compared by value against a copy kept with the packing, not against the
    caller's tensor (which a compiled graph reuses for other values, and a caller may edit)."""
    args = _case()
    first = OP(*args)
    args[4].mul_(2.0)
    assert_close_rel(OP(*args), _ref(*args), 2e-6, "after the scale doubled in place")
    assert not torch.equal(OP(*args), first)


def test_op_nchw_input_and_opcheck():
    args = _case(proj=(5, 3), sample_bias=True)
    out = OP(*args)
    args[0] = args[0].contiguous(memory_format=torch.channels_last)
    assert_close_rel(OP(*args), out, 0.0, "channels_last input")
    torch.library.opcheck(OP, tuple(_case(sample_bias=True)))
    torch.library.opcheck(OP, tuple(_case(proj=(5, 3))))


def _aspp(c=16, rates=(2, 4, 6), o=8):
    torch.manual_seed(0)
    twin = ann.ASPP(c, rates, o)
    randomize_bn(twin)
    return twin.eval()


def _counting():
    """A dispatch mode recording whether the oneDNN op ran."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func))
            return func(*args, **(kwargs or {}))

    return Seen()


def _runs_onednn(m, x):
    with _counting() as seen:
        m(x)
    return "aspp_fused.onednn_conv.default" in seen.ops


def test_fused_head_takes_the_path_and_matches_the_twin():
    twin = _aspp()
    m = ann.FusedASPP.from_module(copy.deepcopy(twin), backend="torch").eval()
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        assert _runs_onednn(m, x)
        ref = copy.deepcopy(twin).double()(x.double())
        assert_close_rel(m(x), ref, 1e-5, "oneDNN path")
        assert_close_rel(m(x.contiguous(memory_format=torch.channels_last)), ref, 1e-5, "channels_last input")


@pytest.mark.parametrize("why", ["grad", "train", "float64", "switch_off", "backend_cpp", "autocast", "regions"])
def test_path_not_taken(why, monkeypatch):
    twin = _aspp()
    m = ann.FusedASPP.from_module(copy.deepcopy(twin), backend="cpp" if why == "backend_cpp" else "torch").eval()
    x = torch.randn(2, 16, 9, 9)
    if why == "backend_cpp" and not aspp_fused._extension.cpp_available():
        pytest.skip("the compiled extension is not built")
    if why == "train":
        m.train()
    if why == "float64":
        m.double()
        x = x.double()
    if why == "switch_off":
        monkeypatch.setenv("ASPP_FUSED_ONEDNN", "0")
    if why == "regions":
        monkeypatch.setattr(torch_backend, "REGIONS", "1")
    with torch.set_grad_enabled(why in ("grad", "train")), torch.autocast("cpu", enabled=why == "autocast"):
        assert not _runs_onednn(m, x)
        if why == "autocast":  # the original's dtype: its convs run in bfloat16 there
            assert m(x).dtype == torch.bfloat16


def test_switch_rejects_other_values(monkeypatch):
    monkeypatch.setenv("ASPP_FUSED_ONEDNN", "yes")
    m = ann.FusedASPP.from_module(_aspp(), backend="torch").eval()
    with torch.no_grad(), pytest.raises(ValueError, match="ASPP_FUSED_ONEDNN must be '1'.*got 'yes'"):
        m(torch.randn(1, 16, 5, 5))


def test_export_sees_aten_only():
    m = ann.FusedASPP.from_module(_aspp(), backend="torch").eval()
    ep = torch.export.export(m, (torch.randn(2, 16, 9, 9),))
    assert not any("onednn_conv" in str(n.target) for n in ep.graph.nodes)


def test_packs_once_per_parameter_version(packings):
    twin = _aspp()
    m = ann.FusedASPP.from_module(copy.deepcopy(twin), backend="torch").eval()
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        m(x)
        assert packings() == 1
        for _ in range(3):
            m(x)
        assert packings() == 1, "repacked without a change"
        m.convs[1][0].weight.mul_(1.5)  # an optimizer-style in-place step: the version moves
        twin.convs[1][0].weight.mul_(1.5)
        assert_close_rel(m(x), copy.deepcopy(twin).double()(x.double()), 1e-5, "after an in-place update")
        assert packings() == 2
        m.convs[1][1].running_var.mul_(2.0)  # a BN buffer: the folded scale changes, compared by value
        twin.convs[1][1].running_var.mul_(2.0)
        assert_close_rel(m(x), copy.deepcopy(twin).double()(x.double()), 1e-5, "after a BN change")
        assert packings() == 3
        other = _aspp()
        for p in other.parameters():
            p.add_(0.25)
        m.load_state_dict(other.state_dict())
        assert_close_rel(m(x), copy.deepcopy(other).double()(x.double()), 1e-5, "after load_state_dict")
        assert packings() == 4
        for hw, count in (((7, 8), 4), ((5, 5), 5)):
            # 7 x 8: another map size, the same taps: the same packing; 5 x 5: rate 6 >= 5, that
            # branch's 3x3 is its centre tap: another packing
            y = torch.randn(1, 16, *hw)
            assert_close_rel(m(y), copy.deepcopy(other).double()(y.double()), 1e-5, "map %s" % (hw,))
            assert packings() == count, hw


def test_models_of_one_shape_keep_their_own_packings(packings):
    a = ann.FusedASPP.from_module(_aspp(), backend="torch").eval()
    b = copy.deepcopy(a)
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        for _ in range(3):
            a(x)
            b(x)
    assert packings() == 2 and len(PACKED.entries) == 2
    del a
    assert len(PACKED.entries) == 1, "a dead model's packing stayed"


def test_threads_share_one_packing():
    m = ann.FusedASPP.from_module(_aspp(), backend="torch").eval()
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        ref = m(x)
    PACKED.clear()
    start = PACKED.misses

    def work(_):
        with torch.no_grad():
            return [m(x) for _ in range(3)]

    outs = [out for outs in run_in_threads(work, 4) for out in outs]
    assert PACKED.misses - start == 1
    for out in outs:
        assert_close_rel(out, ref, 0.0, "thread")


def test_compiled_model_packs_once_and_follows_updates():
    twin = _aspp()
    m = ann.FusedASPP.from_module(copy.deepcopy(twin), backend="torch").eval()
    c = torch.compile(m, fullgraph=True)
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        ref = copy.deepcopy(twin).double()(x.double())
        assert_close_rel(c(x), ref, 1e-5, "compiled")
        misses = PACKED.misses
        for _ in range(3):
            c(x)
        assert PACKED.misses == misses, "the compiled graph repacks every call"
        m.project[0].weight.mul_(0.5)
        twin.project[0].weight.mul_(0.5)
        assert_close_rel(c(x), copy.deepcopy(twin).double()(x.double()), 1e-5, "compiled, after an update")
        assert PACKED.misses == misses + 1


def test_compiled_heads_pack_once_whatever_follows_them(packings):
    """Two heads in one compiled graph (the first one's scales are buffers inductor reuses for the
    second's), and a DeepLabHead (a conv after the ASPP): no packing after the first call."""
    torch.manual_seed(0)
    heads = nn.Sequential(_aspp(16, (2, 4), 16), _aspp(16, (3, 5), 8)).eval()
    dlh = ann.DeepLabHead(16, 5)
    randomize_bn(dlh)
    for twin in (heads, dlh.eval()):
        m = aspp_fused.convert(copy.deepcopy(twin), backend="torch")
        c = torch.compile(m, fullgraph=True)
        x = torch.randn(2, 16, 9, 9)
        with torch.no_grad():
            ref = copy.deepcopy(twin).double()(x.double())
            assert_close_rel(c(x), ref, 1e-5, type(twin).__name__)
            first = packings()
            for _ in range(3):
                assert_close_rel(c(x), ref, 1e-5, type(twin).__name__)
            assert packings() == first, "%s: repacked on every compiled call" % type(twin).__name__


class _PoolFirst(nn.Module):
    """A user-style head whose pooled branch comes first in the concatenation: the projection
    reads the conv branches through columns after a gap."""

    def __init__(self, c=16, o=8):
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, o, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(c, o, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(c, o, 3, padding=3, dilation=3, bias=False), nn.BatchNorm2d(o), nn.ReLU())
        self.project = nn.Sequential(nn.Conv2d(3 * o, o, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

    def forward(self, x):
        p = nn.functional.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.project(torch.cat([p, self.b1(x), self.b2(x)], 1))


def test_converted_head_with_the_pool_first():
    torch.manual_seed(0)
    twin = _PoolFirst()
    randomize_bn(twin)
    twin.eval()
    m = aspp_fused.convert(copy.deepcopy(twin), backend="torch")
    assert aspp_fused.list_fused(m), "nothing fused"
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        assert _runs_onednn(m, x)
        assert_close_rel(m(x), copy.deepcopy(twin).double()(x.double()), 1e-5, "pool first")


def test_compiled_separable_head_in_inference_mode(packings):
    """The v3+ head's projection reads a slice of its weight: passed as the whole parameter and a
    column offset, so a compiled graph under inference_mode (whose slices would be fresh inference
    tensors with no version counter) still packs once."""
    torch.manual_seed(0)
    twin = ann.SeparableASPP(16, 8, (2, 4))
    randomize_bn(twin)
    twin.eval()
    m = ann.FusedSeparableASPP.from_module(copy.deepcopy(twin), backend="torch").eval()
    c = torch.compile(m, fullgraph=True)
    x = torch.randn(2, 16, 9, 9)
    ref = copy.deepcopy(twin).double()(x.double()).detach()
    with torch.inference_mode():
        assert_close_rel(c(x), ref, 1e-5, "compiled, inference_mode")  # the first run may pass an alias
        assert_close_rel(m(x), ref, 1e-5, "eager, inference_mode")
        first = packings()
        for _ in range(3):
            assert_close_rel(c(x), ref, 1e-5, "compiled, inference_mode")
            assert_close_rel(m(x), ref, 1e-5, "eager, inference_mode")
    assert first <= 2 and packings() == first, "the projection was repacked"


def test_inference_tensor_sources_pack_every_call():
    """A weight made under inference_mode has no version counter: never cached, always right."""
    with torch.inference_mode():
        w = torch.randn(4, 6, 3, 3)
        x = torch.randn(1, 6, 5, 5)
        args = [x, [w], [], [2], None, None, None, False, 1, None, [], None, None]
        first = OP(*args)
        w.mul_(2.0)
        assert_close_rel(OP(*args), torch.relu(torch.nn.functional.conv2d(x, w, padding=2, dilation=2)), 1e-6,
                         "after an in-place change")
    assert len(PACKED.entries) == 0, "an entry that no version counter could invalidate"
    assert first.shape == (1, 4, 5, 5)
