"""Export at any size: torch.export, ONNX (dynamo exporter, run in onnxruntime), torch.jit.trace,
the legacy ONNX exporter, and torch.jit.script's refusal.

The ``torch`` backend drops 3x3 taps whose rate is >= the map's H or W (the filter degenerates to
1x3, 3x1 or 1x1). A graph recorded to run at any size must not bake that choice: every check here
exports (or traces) at one size and runs at sizes on both sides of every such threshold, against
eager at that size, within 1e-4 relative.

onnx / onnxruntime / onnxscript are test-only dependencies (pinned in pyproject.toml's [test]
extra and .ci/run); the ONNX tests skip, saying so, without them.
"""
import copy
import inspect
import warnings

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.export import Dim

import aspp_fused
import aspp_fused.nn as ann
from aspp_fused.models import deeplab as D
from aspp_fused.models.mobilenet import ConvBNAct, MobileNetFeatures
from conftest import assert_close_rel, randomize_bn

TOL = 1e-4
NC = 3  # classes of the model cases


def _onnxruntime():
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name, reason="%s is not installed (pip install -e .[test])" % name)
    import onnxruntime

    return onnxruntime


# --------------------------------------------------------------------------- cases
#
# Each case: a module factory, its rates, an input builder (batch, (h, w)) -> args, the dynamic
# dims of those args, the export size and the run sizes. Heads take the map directly, so their
# sizes are map sizes; the rates are (2, 5), so the run sizes put H and W on both sides of both
# thresholds ((1, 1) and (5, 2) prune rows and columns, (3, 7) only rate 5's rows, (9, 11) none).

HEAD_EXPORT = (2, (4, 6))
HEAD_RUNS = [(1, (1, 1)), (3, (3, 7)), (1, (5, 2)), (2, (9, 11))]
RATES = (2, 5)
C = 8


def _x(n, hw, c=C):
    return (torch.randn(n, c, *hw),)


def _lraspp_args(n, hw):
    h, w = hw
    # LR-ASPP reads a stride-8 "low" map and the stride-16 "high" one (rate-free: 1x1 convs only)
    return ({"low": torch.randn(n, 4, 2 * h, 2 * w), "high": torch.randn(n, C, h, w)},)


def _image_dims(min_size=1):
    return {0: Dim("batch", min=1, max=64), 2: Dim("h", min=min_size, max=2048), 3: Dim("w", min=min_size, max=2048)}


def _lraspp_dims():
    b = Dim("batch", min=1, max=64)
    return {"low": {0: b, 2: Dim("hl", min=1, max=2048), 3: Dim("wl", min=1, max=2048)},
            "high": {0: b, 2: Dim("hh", min=1, max=2048), 3: Dim("wh", min=1, max=2048)}}


HEADS = {
    "FusedASPP": lambda: ann.FusedASPP(C, list(RATES), out_channels=6),
    "FusedSeparableASPP": lambda: ann.FusedSeparableASPP(C, 6, list(RATES)),
    "FusedSeparableASPP_mid_norm": lambda: ann.FusedSeparableASPP(C, 6, list(RATES), mid_norm=True),
    "FusedASPPv2": lambda: ann.FusedASPPv2(C, NC, list(RATES)),
    "FusedLRASPPHead": lambda: ann.FusedLRASPPHead(4, C, NC, 6),
    "FusedDeepLabHead": lambda: ann.FusedDeepLabHead(C, NC, list(RATES)),
    "FusedAtrousConvBNReLU": lambda: ann.FusedAtrousConvBNReLU(C, 6, 3, 5),
    "FusedSeparableAtrousConv": lambda: ann.FusedSeparableAtrousConv(C, 6, 2),
}


def _tiny_backbone():
    """Three stride-2 ConvBNAct stages (output stride 8, 16 channels): stages "1" (stride 4,
    8 channels: "low") and "2" (stride 8: "out")."""
    return MobileNetFeatures(ConvBNAct(3, 8, stride=2), ConvBNAct(8, 8, stride=2), ConvBNAct(8, 16, stride=2))


# aspp_fused.models' model classes and heads at tiny widths. Images of H map to ceil(H / 8): the
# export size 41 -> 6, runs 9 -> 2 (rates 2, 4, 6 all pruned), 17 x 57 -> 3 x 8 (4 and 6 pruned
# in H only), 33 -> 5 (6 pruned), 57 x 41 -> 8 x 6 (6 pruned in W only); v3+'s decoder runs at
# rate 1 on the stride-4 map (pruned at a 1-pixel map: 1 x 1 at 1 pixel).
MODEL_RATES = (2, 4, 6)
MODELS = {
    "DeepLabV3": lambda: D.DeepLabV3(_tiny_backbone(), ann.DeepLabHead(16, NC, MODEL_RATES), {"2": "out"}),
    "DeepLabV2": lambda: D.DeepLabV2(_tiny_backbone(), ann.ASPPv2(16, NC, MODEL_RATES), {"2": "out"}),
    "DeepLabV3Plus": lambda: D.DeepLabV3Plus(
        _tiny_backbone(), D.DeepLabV3PlusHead(16, 8, NC, MODEL_RATES, channels=16, low_proj_channels=8),
        {"1": "low", "2": "out"}),
    "DeepLabV3Plus_mid_norm": lambda: D.DeepLabV3Plus(
        _tiny_backbone(), D.DeepLabV3PlusHead(16, 8, NC, MODEL_RATES, channels=16, low_proj_channels=8,
                                              mid_norm=True), {"1": "low", "2": "out"}),
    "LRASPP": lambda: D.LRASPP(_tiny_backbone(), ann.LRASPPHead(8, 16, NC, 8), {"1": "low", "2": "out"}),
}
MODEL_EXPORT = (2, (41, 41))
MODEL_RUNS = [(1, (9, 9)), (3, (17, 57)), (1, (33, 33)), (2, (57, 41))]


class Case:
    def __init__(self, name, build, make_args, dims, export_at, runs):
        self.name, self.build, self.make_args, self.dims = name, build, make_args, dims
        self.export_at, self.runs = export_at, runs

    def module(self):
        torch.manual_seed(0)
        m = randomize_bn(self.build()).eval()
        m = aspp_fused.convert(m, backend="torch")
        assert aspp_fused.list_fused(m), "%s: nothing was fused" % self.name
        return m

    def args(self, at):
        return self.make_args(*at)


def _case(name):
    if name in HEADS:
        lr = name == "FusedLRASPPHead"
        return Case(name, HEADS[name], _lraspp_args if lr else _x, (_lraspp_dims() if lr else _image_dims(),),
                    HEAD_EXPORT, HEAD_RUNS)
    # min 9: the backbone's stride-8 map must stay >= 2 pixels, a limit of PyTorch's own conv / BN under
    # export (the unconverted model has it too: it specialises sizes 1)
    return Case(name, MODELS[name], lambda n, hw: (torch.randn(n, 3, *hw),), (_image_dims(9),), MODEL_EXPORT,
                MODEL_RUNS)


CASES = list(HEADS) + list(MODELS)


def _eager(m, args):
    with torch.no_grad():
        return m(*args)


def _compare(got, expected, what):
    got, expected = pytree.tree_leaves(got), pytree.tree_leaves(expected)
    assert len(got) == len(expected), what
    for g, e in zip(got, expected):
        assert_close_rel(torch.as_tensor(g), e, TOL, what)


def _onnx_session(m, args, dims, path):
    ort = _onnxruntime()
    kwargs = None
    if len(args) == 1 and isinstance(args[0], dict):
        # torch.onnx.export reads a trailing dict in args as keyword arguments: pass it by name
        name = next(iter(inspect.signature(m.forward).parameters))
        args, kwargs, dims = (), {name: args[0]}, {name: dims[0]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation / opset notes
        program = torch.onnx.export(m, args, kwargs=kwargs, dynamo=True, dynamic_shapes=dims, verbose=False)
    program.save(str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run_onnx(session, args):
    leaves = [a.numpy() for a in pytree.tree_leaves(args)]
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(leaves), (names, len(leaves))
    return session.run(None, dict(zip(names, leaves)))


# --------------------------------------------------------------------------- torch.export / ONNX


@pytest.mark.parametrize("name", CASES)
def test_torch_export_dynamic_batch_and_size(name):
    case = _case(name)
    m = case.module()
    ep = torch.export.export(m, case.args(case.export_at), dynamic_shapes=case.dims)
    for at in case.runs:
        args = case.args(at)
        with torch.no_grad():
            _compare(ep.module()(*args), _eager(m, args), "%s exported at %s, run at %s" % (name, case.export_at, at))


@pytest.mark.parametrize("name", CASES)
def test_onnx_dynamo_export_in_onnxruntime(name, tmp_path):
    case = _case(name)
    m = case.module()
    session = _onnx_session(m, case.args(case.export_at), case.dims, tmp_path / "model.onnx")
    for at in case.runs:
        args = case.args(at)
        _compare(_run_onnx(session, args), _eager(m, args), "%s ONNX exported at %s, run at %s"
                 % (name, case.export_at, at))


# --------------------------------------------------------------------------- a converted torchvision model


def test_torchvision_deeplabv3_mobilenet_exports_at_any_size(torchvision_models, tmp_path):
    """The new user's path: convert torchvision's deeplabv3_mobilenet_v3_large (rates 12 / 24 / 36
    at output stride 16), export at 65 x 65 (a 5 x 5 map: every rate pruned), run at 129 (9),
    257 (17: 12 kept), 385 x 321 (25 x 21: 36 pruned) and 609 (39: none pruned)."""
    model = torchvision_models.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                            num_classes=NC).eval()
    torch.manual_seed(0)
    randomize_bn(model)
    aspp_fused.convert(model, backend="torch")
    assert ("classifier", "DeepLabHead", "FusedDeepLabHead") in aspp_fused.list_fused(model)
    x = torch.randn(2, 3, 65, 65)  # batch 2: export specialises a dynamic dim seen as 1
    dims = ({0: Dim("batch", min=1, max=16), 2: Dim("h", min=33, max=1024), 3: Dim("w", min=33, max=1024)},)
    ep = torch.export.export(model, (x,), dynamic_shapes=dims)
    runs = [(3, 129, 129), (1, 257, 257), (1, 385, 321), (1, 609, 609)]
    inputs = [torch.randn(n, 3, h, w) for n, h, w in runs]
    expected = [_eager(model, (xi,))["out"] for xi in inputs]
    for xi, e in zip(inputs, expected):
        with torch.no_grad():
            assert_close_rel(ep.module()(xi)["out"], e, TOL, "torch.export at 65, run at %s" % (tuple(xi.shape),))
    session = _onnx_session(model, (x,), dims, tmp_path / "deeplabv3.onnx")
    for xi, e in zip(inputs, expected):
        assert_close_rel(torch.from_numpy(_run_onnx(session, (xi,))[0]), e, TOL,
                         "ONNX at 65, run at %s" % (tuple(xi.shape),))


def test_torchvision_deeplabv3_mobilenet_jit_trace_at_other_sizes(torchvision_models):
    """Traced at 65 x 65 (check_trace=False, as a user would), run at 257 and 385."""
    model = torchvision_models.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                            num_classes=NC).eval()
    torch.manual_seed(0)
    randomize_bn(model)
    aspp_fused.convert(model, backend="torch")
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(1, 3, 65, 65), check_trace=False, strict=False)
        for size in (257, 385):
            xi = torch.randn(1, 3, size, size)
            assert_close_rel(traced(xi)["out"], model(xi)["out"], TOL, "traced at 65, run at %d" % size)


# --------------------------------------------------------------------------- TorchScript


@pytest.mark.parametrize("name", ["FusedASPP", "FusedDeepLabHead", "FusedLRASPPHead", "DeepLabV3Plus"])
def test_jit_trace_at_other_sizes(name):
    """Traced at one size, run at two others on the far sides of the thresholds: exact."""
    case = _case(name)
    m = case.module()
    with torch.no_grad():
        traced = torch.jit.trace(m, case.args(case.export_at), check_trace=False, strict=False)
        for at in (case.runs[0], case.runs[-1]):
            args = case.args(at)
            _compare(traced(*args), _eager(m, args), "%s traced at %s, run at %s" % (name, case.export_at, at))


def test_jit_trace_follows_load_state_dict():
    """The traced graph computes the BN fold from the module's tensors, not a constant."""
    case = _case("FusedASPP")
    m = case.module()
    args = case.args(case.export_at)
    with torch.no_grad():
        traced = torch.jit.trace(m, args, check_trace=False)
        other = randomize_bn(case.build()).state_dict()
        m.load_state_dict(other)
        traced.load_state_dict(other)
        _compare(traced(*args), m(*args), "traced module after load_state_dict")


@pytest.mark.parametrize("name", list(HEADS) + ["DeepLabV3"])
def test_legacy_onnx_exporter_with_dynamic_axes(name, tmp_path):
    """The TorchScript-based exporter (dynamo=False) with dynamic_axes: exact at other sizes."""
    ort = _onnxruntime()
    case = _case(name)
    m = case.module()
    path = tmp_path / "legacy.onnx"
    args = case.args(case.export_at)
    names = list(args[0]) if isinstance(args[0], dict) else ["x"]
    axes = {k: {0: "batch", 2: "h_" + k, 3: "w_" + k} for k in names + ["y"]}
    if isinstance(args[0], dict):
        args = args + ({},)  # this exporter reads a trailing dict as keyword arguments
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, args, str(path), dynamo=False, input_names=names, output_names=["y"],
                          dynamic_axes=axes)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for at in case.runs:
        args = case.args(at)
        _compare(_run_onnx(session, args), _eager(m, args), "%s legacy ONNX at %s" % (name, at))


@pytest.mark.parametrize("name", ["FusedASPP", "FusedLRASPPHead", "DeepLabV3"])
def test_jit_script_refuses_in_one_line(name):
    m = _case(name).module()
    for _ in range(2):  # the same refusal on a second try (TorchScript once said "Can't redefine method")
        with pytest.raises(RuntimeError) as info:
            torch.jit.script(m)
        msg = str(info.value)
        assert "\n" not in msg and "torch.jit.script" in msg
        assert "torch.compile" in msg and "torch.export" in msg
    x = _case(name).args(_case(name).export_at)
    _compare(m(*x), copy.deepcopy(m)(*x), "still runs eagerly after the refusal")


def test_jit_script_refuses_converted_torchvision_model(torchvision_models):
    model = torchvision_models.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=NC)
    aspp_fused.convert(model.eval(), backend="torch")
    # The first fused module TorchScript meets refuses (convert also fuses the backbone's 1x1
    # conv-BN-ReLU blocks, so it need not be the head).
    with pytest.raises(RuntimeError, match=r"^Fused\w+ \(aspp_fused\) cannot be compiled by torch.jit.script: "
                                           r"use torch.compile"):
        torch.jit.script(model)


# --------------------------------------------------------------------------- torch.compile(dynamic=True)


def test_compile_dynamic_recompiles_across_thresholds():
    """torch.compile keeps the pruning: dynamo guards on the size comparison, so a graph is only
    reused on the same side of every threshold."""
    torch._dynamo.reset()
    case = _case("FusedASPP")
    m = case.module()
    compiled = torch.compile(m, dynamic=True, backend="eager")
    for at in [case.export_at] + case.runs:
        args = case.args(at)
        with torch.no_grad():
            _compare(compiled(*args), _eager(m, args), "compiled (dynamic) at %s" % (at,))


def test_symbolic_sizes_keep_all_taps():
    """What the shape-generic rule records: under torch.export a rate >= the export size still
    runs the full 3x3 filter with its padding (one conv per branch, 3x3 kernels)."""
    m = ann.FusedASPPv2(C, NC, [5]).eval()
    ep = torch.export.export(m, (torch.randn(1, C, 3, 3),), dynamic_shapes=({2: Dim("h"), 3: Dim("w")},))
    convs = [n for n in ep.graph.nodes if n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.conv2d.padding)]
    assert len(convs) == 1
    weight = convs[0].args[1].meta["val"]
    assert tuple(weight.shape[-2:]) == (3, 3), weight.shape
    # eager at the same size prunes to the centre tap, with the same numbers
    x = torch.randn(1, C, 3, 3)
    with torch.no_grad():
        assert_close_rel(ep.module()(x), m(x), TOL, "pruned eager vs full exported")
