"""The Triton ops as registered (kernels/ops.py): opcheck of the ops and of the primitives their
backward formulas run over, and the pure-torch ``*_ref`` statements beside the kernels. Their
numbers against the reference: tests/test_op_cases.py and tests/test_op_dtypes.py (backend /
kernel set triton)."""
import pytest
import torch

from aspp_fused import _autograd, _extension, torch_backend
from conftest import CUDA, assert_close_rel, needs_triton
from op_problems import ASPP_BRANCHES, atrous_problem, opcheck, separable_problem

pytestmark = needs_triton


def test_opcheck_triton_ops():
    _extension.triton_kernels()  # the package's loader: registers the ops' autograd (aspp_fused/_autograd.py)
    x, ws, d, s, t, b = atrous_problem(2, 3, 5, 4, ((1, 2, 1), (3, 2, 3)), False, True)
    ws = [w.requires_grad_() for w in ws]
    torch.library.opcheck(torch.ops.aspp_fused.triton_atrous_conv.default, (x, ws, d, s, t, b, False, 1, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    sx, dw, dd, ms, msh, pw, s2, t2, _ = separable_problem(2, 3, 5, 4, (("plain", 2, 1), ("mid", 2, 2)), False)
    e = sx.new_empty(0)
    absent = lambda lst: [e if v is None else v for v in lst]  # noqa: E731  (the schema's "absent")
    torch.library.opcheck(torch.ops.aspp_fused.triton_separable_conv.default,
                          (sx, absent(dw), dd, absent(ms), absent(msh), 1, pw, s2, t2, None, 1, True),
                          test_utils=("test_schema", "test_faketensor"))


# bfloat16 on a GPU only: the interpreter's tl.dot of bfloat16 operands is wrong (tests/test_op_dtypes.py)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []), ids=str)
def test_opcheck_triton_primitives(dtype):
    """The primitives the backward formulas run over (aspp_fused/_autograd.py), as Triton
    implements them (aspp_fused::triton_*): schema, and the fake kernels' shapes, dtypes and
    strides against the real outputs."""
    _extension.triton_kernels()
    prims = _autograd.primitives(torch.ops.aspp_fused, "triton_")
    utils = ("test_schema", "test_faketensor")
    f32 = torch.float32
    x, ws, d, s, t, b = atrous_problem(2, 3, 5, 4, ((1, 2, 1), (3, 2, 3)), False, True, dtype=dtype)
    dev = x.device
    opcheck(prims.tap_gemm.default, (x, ws, d, False, False, f32), utils)
    acc = prims.tap_gemm(x, ws, d, False, False, f32)
    out = torch.ops.aspp_fused.triton_atrous_conv(x, ws, d, s, t, b, False, 1, True)[0]
    g = torch.randn_like(out)
    for mask in ([True, True], [True, False], [False, True]):
        gs, gss = torch.randn(4, device=dev), torch.randn(4, device=dev)
        opcheck(prims.epilogue_backward.default, (g, gs, gss, out, acc, s, t, b, 1, mask), utils)
    g_acc = prims.epilogue_backward(g, None, None, out, None, s, t, b, 1, [True, False])[0]
    opcheck(prims.tap_gemm.default, (g_acc, ws, d, False, True, dtype), utils)
    opcheck(prims.tap_wgrad.default, (x, g_acc, ws, d, False), utils)
    sx, dw, dd, ms, msh, pw, _, _, _ = separable_problem(2, 3, 5, 4, (("plain", 2, 1), ("dw", 2, 2), ("mid", 2, 3)),
                                                         False, dtype=dtype)
    e = sx.new_empty(0)
    base = (sx, [e if v is None else v for v in dw], dd, [e if v is None else v for v in ms],
            [e if v is None else v for v in msh], 1, pw)
    opcheck(prims.separable_gemm.default, base + (f32,), utils)
    g = torch.randn(2, 6, 5, 4, dtype=dtype, device=dev).contiguous(memory_format=torch.channels_last)
    for mask in ([True, True], [True, False], [False, True]):
        opcheck(prims.separable_gemm_backward.default, (g,) + base + (mask,), utils)


def test_refs_match_torch_backend():
    """The pure-torch *_ref beside each kernel states the same semantics as the torch backend."""
    from aspp_fused.kernels.atrous_conv import atrous_conv_ref
    from aspp_fused.kernels.separable_conv import separable_conv_ref

    args = atrous_problem(2, 5, 7, 9, ASPP_BRANCHES, False, True, dtype=torch.float64, device="cpu")
    for a, r in zip(atrous_conv_ref(*args, False, 1, True), torch_backend.atrous_conv(*args, False, 1, True)):
        assert_close_rel(a, r, 1e-12, "atrous_conv_ref")
    sargs = separable_problem(2, 5, 7, 9, (("plain", 3, 1), ("dw", 4, 2), ("mid", 4, 12)), True, dtype=torch.float64,
                              device="cpu")
    x, dw, d, ms, msh, pw, s, t, b = sargs
    for a, r in zip(separable_conv_ref(x, dw, d, ms, msh, 1, pw, s, t, b, 1, True),
                    torch_backend.separable_conv(x, dw, d, ms, msh, 1, pw, s, t, b, 1, True)):
        assert_close_rel(a, r, 1e-12, "separable_conv_ref")
