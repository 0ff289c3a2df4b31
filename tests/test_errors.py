"""Bad input gets a clear error that names the argument, on every backend and in the C++ ops."""
import pytest
import torch

import aspp_fused
from aspp_fused import _extension, ops
from conftest import BACKENDS, needs_triton


def _args(n=2, c=4, h=5, w=5, o=3, dtype=torch.float32):
    x = torch.randn(n, c, h, w, dtype=dtype)
    ws = [torch.randn(o, c, 1, 1, dtype=dtype), torch.randn(o, c, 3, 3, dtype=dtype)]
    return x, ws, [1, 2], torch.ones(2 * o), torch.zeros(2 * o)


@pytest.mark.parametrize("backend", BACKENDS)
class TestAtrousConvErrors:
    def test_wrong_rank(self, backend):
        x, ws, d, s, t = _args()
        with pytest.raises(ValueError, match=r"x must be 4-D"):
            aspp_fused.atrous_conv(x[0], ws, d, s, t, backend=backend)

    # A bad branch weight: (branch, its replacement, O for scale / shift, sum_mode, error, message).
    BAD_WEIGHTS = {
        "wrong_channels": (1, torch.randn(3, 5, 3, 3), 6, False, ValueError,
                           r"weights\[1\] must have shape \[O, 4, k, k\]"),
        "dtype_mismatch": (0, torch.randn(3, 4, 1, 1, dtype=torch.float64), 6, False, TypeError,
                           r"weights\[0\] has dtype torch.float64, expected x's dtype"),
        "sum_mode_unequal_outputs": (1, torch.randn(2, 4, 3, 3), 3, True, ValueError,
                                     r"sum_mode needs branches with equal output channels"),
        "kernel_size": (1, torch.randn(3, 4, 5, 5), 6, False, ValueError, r"k in \(1, 3\)"),
    }

    @pytest.mark.parametrize("case", sorted(BAD_WEIGHTS))
    def test_bad_weight(self, backend, case):
        i, weight, o, sum_mode, error, match = self.BAD_WEIGHTS[case]
        x, ws, d, s, t = _args()
        ws[i] = weight
        with pytest.raises(error, match=match):
            aspp_fused.atrous_conv(x, ws, d, s[:o], t[:o], sum_mode=sum_mode, backend=backend)

    def test_integer_dtype(self, backend):
        x, ws, d, s, t = _args()
        with pytest.raises(TypeError, match=r"x must be float32, float64, bfloat16 or float16, got torch.int64"):
            aspp_fused.atrous_conv(x.long(), ws, d, s, t, backend=backend)

    @pytest.mark.parametrize("rate", [0, -6])
    def test_rates_must_be_positive(self, backend, rate):
        x, ws, d, s, t = _args()
        with pytest.raises(ValueError, match=r"dilations\[1\] \(the atrous rate\) must be >= 1, got %d" % rate):
            aspp_fused.atrous_conv(x, ws, [1, rate], s, t, backend=backend)

    def test_rate_must_be_int(self, backend):
        x, ws, d, s, t = _args()
        with pytest.raises(TypeError, match=r"dilations\[1\] must be an int"):
            aspp_fused.atrous_conv(x, ws, [1, 2.5], s, t, backend=backend)

    def test_scale_length(self, backend):
        x, ws, d, s, t = _args()
        with pytest.raises(ValueError, match=r"scale must have shape \(6,\), got \(5,\)"):
            aspp_fused.atrous_conv(x, ws, d, s[:5], t, backend=backend)

    def test_bias_shape(self, backend):
        x, ws, d, s, t = _args()
        with pytest.raises(ValueError, match=r"bias must have shape \(2, 6\)"):
            aspp_fused.atrous_conv(x, ws, d, s, t, bias=torch.zeros(6), backend=backend)

    def test_bad_act_and_backend(self, backend):
        x, ws, d, s, t = _args()
        with pytest.raises(ValueError, match=r"act must be 'relu' or 'none'"):
            aspp_fused.atrous_conv(x, ws, d, s, t, act="gelu", backend=backend)
        with pytest.raises(ValueError, match=r"backend must be one of"):
            aspp_fused.atrous_conv(x, ws, d, s, t, backend="cudnn")

    def test_no_branches_and_count_mismatch(self, backend):
        x, ws, d, s, t = _args()
        with pytest.raises(ValueError, match=r"weights must hold at least one branch"):
            aspp_fused.atrous_conv(x, [], [], s, t, backend=backend)
        with pytest.raises(ValueError, match=r"got 1 dilations for 2 branches"):
            aspp_fused.atrous_conv(x, ws, [1], s, t, backend=backend)

    def test_separable_errors(self, backend):
        x = torch.randn(2, 4, 5, 5)
        pw = [torch.randn(3, 4, 1, 1)]
        s, t = torch.ones(3), torch.zeros(3)
        with pytest.raises(ValueError, match=r"dw_weights\[0\] must have shape \[4, 1, 3, 3\]"):
            aspp_fused.separable_conv(x, [torch.randn(4, 1, 5, 5)], [2], [None], [None], "relu", pw, s, t,
                                      backend=backend)
        with pytest.raises(ValueError, match=r"mid_scales\[0\] given for a branch without a depthwise conv"):
            aspp_fused.separable_conv(x, [None], [1], [torch.ones(4)], [torch.zeros(4)], "relu", pw, s, t,
                                      backend=backend)
        with pytest.raises(ValueError, match=r"must both be given or both be None"):
            aspp_fused.separable_conv(x, [torch.randn(4, 1, 3, 3)], [2], [torch.ones(4)], [None], "relu", pw, s, t,
                                      backend=backend)
        with pytest.raises(ValueError, match=r"dilations\[0\] \(the atrous rate\) must be >= 1"):
            aspp_fused.separable_conv(x, [torch.randn(4, 1, 3, 3)], [0], [None], [None], "relu", pw, s, t,
                                      backend=backend)


def test_triton_backend_refuses_float64():
    pytest.importorskip("triton")
    x, ws, d, s, t = _args(dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='triton' supports float32, bfloat16 and float16 inputs"):
        aspp_fused.atrous_conv(x, ws, d, s.double(), t.double(), backend="triton")


def test_modules_reject_bad_rates():
    with pytest.raises(ValueError, match="atrous_rates must be positive ints"):
        aspp_fused.nn.FusedASPP(8, [6, -12])
    with pytest.raises(ValueError, match="dilation must be positive ints"):
        aspp_fused.nn.FusedAtrousConvBNReLU(8, 4, 3, 0)


@pytest.mark.skipif(not _extension.cpp_available(), reason="aspp_fused._C not built")
class TestCppOpChecks:
    """The C++ ops check their own arguments too (they are public through torch.ops)."""

    def test_atrous_conv(self):
        x, ws, d, s, t = _args()
        op = torch.ops.aspp_fused.atrous_conv
        with pytest.raises(ValueError, match=r"weights\[1\]"):
            op(x, [ws[0], torch.randn(3, 5, 3, 3)], d, s, t, None, False, 1, False)
        with pytest.raises(ValueError, match=r"dilation"):
            op(x, ws, [1, 0], s, t, None, False, 1, False)
        with pytest.raises(TypeError):
            op(x.long(), ws, d, s, t, None, False, 1, False)
        with pytest.raises(ValueError, match=r"act"):
            op(x, ws, d, s, t, None, False, 7, False)
        with pytest.raises(ValueError, match=r"scale"):
            op(x, ws, d, s[:2], t, None, False, 1, False)

    def test_backward_checks_output_mask(self):
        x, ws, d, s, t = _args()
        out, _, _ = torch.ops.aspp_fused.atrous_conv(x, ws, d, s, t, None, False, 1, False)
        with pytest.raises(ValueError, match=r"output_mask"):
            ops.atrous_conv_backward(out, None, None, out, x, ws, d, s, t, None, False, 1, [True])
        with pytest.raises(ValueError, match=r"output_mask has 1 entries, expected 2"):
            torch.ops.aspp_fused.epilogue_backward(out, None, None, out, None, s, t, None, 1, [True])

    def test_backward_primitives(self):
        x, ws, d, s, t = _args()
        out, _, _ = torch.ops.aspp_fused.atrous_conv(x, ws, d, s, t, None, False, 1, False)
        prims = torch.ops.aspp_fused
        with pytest.raises(ValueError, match=r"acc is None, but grad_scale"):
            prims.epilogue_backward(out, None, None, out, None, s, t, None, 1, [True, True])
        with pytest.raises(ValueError, match=r"acc is None, but relu with grad_sumsq"):
            prims.epilogue_backward(out, None, s, out, None, s, t, None, 1, [True, False])
        with pytest.raises(TypeError, match=r"acc has dtype"):
            prims.epilogue_backward(out, None, None, out, out.half(), s, t, None, 1, [True, True])
        with pytest.raises(ValueError, match=r"x has shape .*, expected \[2, \d+, 5, 5\] \(\[N, O, H, W\]"):
            prims.tap_gemm(x, ws, d, False, True)  # the adjoint reads a gradient of the output, not x
        with pytest.raises(TypeError, match=r"g has dtype"):
            prims.tap_wgrad(x, out.long(), ws, d, False)
        with pytest.raises(ValueError, match=r"dilations\[0\] is 0"):
            prims.tap_gemm(x, ws, [0] * len(ws), False, False)

    def test_separable_conv(self):
        x = torch.randn(2, 4, 5, 5)
        e = x.new_empty(0)
        with pytest.raises(ValueError, match=r"pw_weights\[0\]"):
            torch.ops.aspp_fused.separable_conv(x, [e], [1], [e], [e], 1, [torch.randn(3, 5, 1, 1)], torch.ones(3),
                                                torch.zeros(3), None, 1, False)


def test_mixed_devices_name_the_argument():
    x, ws, d, s, t = _args()
    ws[1] = ws[1].to("meta")
    with pytest.raises(RuntimeError, match=r"weights\[1\] is on meta but x is on cpu"):
        aspp_fused.atrous_conv(x, ws, d, s, t)
    x, ws, d, s, t = _args()
    with pytest.raises(RuntimeError, match=r"scale is on meta but x is on cpu"):
        aspp_fused.atrous_conv(x, ws, d, s.to("meta"), t)


def test_auto_backend_choice(monkeypatch):
    from aspp_fused import functional

    assert functional.resolve_backend("auto", torch.randn(1, 1, 1, 1)) == "torch"

    class FakeCuda:  # stands in for a CUDA tensor on this CPU-only machine
        is_cuda = True
        device = torch.device("cuda")
        dtype = torch.float32

    from aspp_fused import dispatch

    monkeypatch.setattr(dispatch, "device_class", lambda d: "cuda:sm_90" if d.type == "cuda" else d.type)
    monkeypatch.setattr(_extension, "cuda_kernels_built", lambda: False)
    assert functional.resolve_backend("auto", FakeCuda()) == "torch"
    # Built CUDA kernels are not evidence: without a committed measurement auto stays on torch.
    monkeypatch.setattr(_extension, "cuda_kernels_built", lambda: True)
    assert functional.resolve_backend("auto", FakeCuda()) == "torch"


# --------------------------------------------------------------------------- what a new user meets first


def test_module_arguments_name_the_argument_and_the_expected_value():
    from aspp_fused.nn import (FusedASPP, FusedASPPv2, FusedDeepLabHead, FusedLRASPPHead, FusedSeparableASPP)

    with pytest.raises(TypeError, match=r"atrous_rates must be a sequence of positive ints .*got 6 \(int\)"):
        FusedASPP(32, 6)  # was: 'int' object is not iterable
    with pytest.raises(TypeError, match=r"^FusedASPP\(32, rates=\[2\]\): unexpected keyword argument 'rates'; "
                                        r"expected FusedASPP\(in_channels: int, atrous_rates"):
        FusedASPP(32, rates=[2])  # was: ASPP.__init__() got an unexpected keyword argument
    for bad in (0, -3):  # 0 was accepted; -3 a raw torch error
        with pytest.raises(ValueError, match=r"in_channels must be an int >= 1, got %d" % bad):
            FusedASPP(bad, [6])
    with pytest.raises(ValueError, match=r"out_channels must be an int >= 1, got 0"):
        FusedSeparableASPP(8, 0, [2])
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 1, got 0"):
        FusedDeepLabHead(8, 0, [2])
    with pytest.raises(ValueError, match=r"inter_channels must be an int >= 1, got 0"):
        FusedLRASPPHead(4, 8, 5, 0)
    with pytest.raises(ValueError, match=r"atrous_rates must hold at least 1 rate\(s\), got \(\)"):
        FusedASPPv2(32, 5, [])  # was: built, then IndexError at forward


def test_input_dtype_is_checked_by_the_module():
    from aspp_fused.nn import FusedASPP

    m = FusedASPP(8, [2]).eval()
    with pytest.raises(TypeError, match=r"^FusedASPP: input has dtype torch.float64, expected the module's "
                                        r"parameter dtype torch.float32"):
        m(torch.randn(1, 8, 5, 5, dtype=torch.float64))  # was: atrous_conv: weights[0] has dtype ...
    assert m.double()(torch.randn(1, 8, 5, 5, dtype=torch.float64)).dtype == torch.float64


def test_from_module_of_something_else_says_it_is_not_an_aspp():
    from torch import nn

    from aspp_fused.nn import FusedASPP, FusedASPPv2

    with pytest.raises(ValueError, match=r"FusedASPP.from_module: module is a Conv2d, not an ASPP: expected a "
                                         r"module with `convs`"):
        FusedASPP.from_module(nn.Conv2d(8, 8, 3))  # was: convs is NoneType
    with pytest.raises(ValueError, match=r"FusedASPPv2.from_module: module is a Conv2d, not an ASPP v2"):
        FusedASPPv2.from_module(nn.Conv2d(8, 8, 3))
    with pytest.raises(TypeError, match=r"module must be an nn.Module \(a ASPP\), got str"):
        FusedASPP.from_module("aspp")


def test_backend_cuda_points_to_cpp_when_constructed_and_when_set():
    from aspp_fused.nn import FusedASPP

    with pytest.raises(ValueError, match=r"got 'cuda': the CUDA kernels are backend='cpp' on CUDA tensors"):
        FusedASPP(8, [2], backend="cuda")
    m = FusedASPP(8, [2])
    with pytest.raises(ValueError, match=r"backend='cpp'"):
        m.backend = "cuda"  # was accepted, then failed at the next forward
    assert m.backend == "auto"
    m.backend = "torch"
    assert m.backend == "torch" and "backend" not in dict(m.state_dict())
    with pytest.raises(ValueError, match=r"backend must be one of 'auto', 'torch', 'cpp', 'triton', got 'gpu'"):
        aspp_fused.convert(torch.nn.Sequential(), backend="gpu")


def test_pretrained_directory_and_garbage_file(tmp_path):
    from aspp_fused.models import deeplabv3_resnet50

    with pytest.raises(IsADirectoryError, match=r"pretrained=.* is a directory, expected a checkpoint file"):
        deeplabv3_resnet50(num_classes=2, pretrained=str(tmp_path))  # was: no such file
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(ValueError, match=r"could not be read by torch.load\(weights_only=True\)") as info:
        deeplabv3_resnet50(num_classes=2, pretrained=str(bad))
    # torch's advice to retry with weights_only=False is not something this API can take
    assert "weights_only=False" not in str(info.value) and "weights_only` set to" not in str(info.value)
    assert str(info.value).endswith("expected a state_dict of tensors saved with torch.save")


@needs_triton
def test_backend_errors_are_clear(monkeypatch):
    import sys

    import aspp_fused.nn as ann
    from aspp_fused import functional as AF
    from aspp_fused import kernels
    from op_problems import atrous_problem

    x, ws, d, s, t, _ = atrous_problem(1, 3, 4, 4, ((1, 2, 1),), False, False, device="cpu")
    with pytest.raises(TypeError, match="float32, bfloat16 and float16.*float64"):
        AF.atrous_conv(x.double(), [w.double() for w in ws], d, s, t, backend="triton")
    monkeypatch.setattr(kernels, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="CPU tensor.*TRITON_INTERPRET=1"):
        AF.atrous_conv(x, ws, d, s, t, backend="triton")
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    with pytest.raises(RuntimeError, match="needs the triton package"):
        ann.FusedASPP(8, [2], backend="triton")
    assert AF.resolve_backend("auto", x) == "torch"
