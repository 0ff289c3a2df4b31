"""Each op's cases, written once and run on every available backend against the float64 torch
backend (the reference): the compiled kernels (``cpp``: CPU kernels on CPU, CUDA kernels on a GPU
when built), Triton (compiled on a GPU, under the interpreter on CPU) and the CUDA kernels on the
host emulator (``cuda_emu``, in make emu-test; op_problems.cuda_emu_backend).

The shapes are tiny (C <= 20, H, W <= 9, O_b <= 4) for the interpreter, yet they cover several
tiles per image with ragged edges, rates at and beyond the map (tap rectangles of 1, 2 and 3 taps
per axis), the exact-region plan's shape classes, C off the channel block, batch 0 and 1, concat
and sum mode, separable with and without the mid BN, stats on and off, and every gradient.
Tolerance (docs/DESIGN.md): fp32 against float64 1e-5 relative, TF32 off.
"""
import pytest
import torch

from aspp_fused import _extension
from aspp_fused import functional as AF
from conftest import assert_close_rel, triton_backend_param
from op_problems import (ASPP_BRANCHES, DEV, F64, TOL, atrous_fn, atrous_problem, cuda_emu_backend, op_parity,
                         separable_fn, separable_problem)


def _backends():
    cuda = torch.cuda.is_available()
    params = []
    if _extension.cpp_available() and (not cuda or _extension.cuda_kernels_built()):
        params.append(pytest.param("cpp", id="cpp"))
    else:
        params.append(pytest.param("cpp", id="cpp", marks=pytest.mark.skip(reason="aspp_fused._C (with kernels for "
                                                                              "this device) not built")))
    params.append(triton_backend_param())
    emu = cuda_emu_backend()
    params.append(pytest.param("cuda_emu", id="cuda_emu", marks=[] if emu else pytest.mark.skip(
        reason="the CUDA kernels' host emulator is not built (make emu-test runs these)")))
    return params


pytestmark = [pytest.mark.parametrize("backend", _backends()),
              pytest.mark.usefixtures("no_tf32")]  # conftest: the exact fp32 path


# --------------------------------------------------------------------------- atrous_conv

ATROUS_CASES = {
    # name: (n, c, h, w, branches, sum_mode, act, stats, bias)
    "concat_relu_stats_7x9": (2, 5, 7, 9, ASPP_BRANCHES, False, 1, True, True),
    "sum_none_stats_b1_5x5": (1, 5, 5, 5, ASPP_BRANCHES, True, 0, True, True),
    # C = 20: two channel blocks, the second ragged; a 1-row map.
    "concat_c20_1x9": (3, 20, 1, 9, ((1, 3, 1), (3, 4, 2), (3, 4, 5)), False, 0, False, False),
    # Rates at / beyond both sides: only the centre tap (or centre row / column) survives.
    "sum_relu_rates_ge_hw": (2, 3, 9, 4, ((3, 4, 9), (3, 4, 4)), True, 1, False, True),
    # Concat mode runs the exact-region plan (kernels/plan.py): a 1-pixel map; width-1 regions
    # (7 at rate 3) with tiles spanning images (batch 3); rates beyond the map.
    "concat_region_1x1_map": (2, 3, 1, 1, ((1, 2, 1), (3, 3, 2)), False, 1, True, True),
    "concat_region_width1_7x7": (3, 4, 7, 7, ((3, 3, 3), (3, 2, 5), (1, 2, 1)), False, 0, True, True),
    "concat_region_rates_ge_map": (2, 3, 4, 5, ((3, 3, 6), (3, 2, 4)), False, 1, False, False),
}


@pytest.mark.parametrize("case", sorted(ATROUS_CASES))
def test_atrous_conv_matches_reference(backend, case):
    n, c, h, w, branches, sum_mode, act, stats, bias = ATROUS_CASES[case]
    args = atrous_problem(n, c, h, w, branches, sum_mode, bias)
    op_parity(backend, lambda be: atrous_fn(be, sum_mode, act, stats), args, stats)


@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous"])
def test_atrous_conv_input_layouts(backend, layout):
    args = atrous_problem(2, 4, 6, 7, ((1, 2, 1), (3, 3, 2)), False, True, layout=layout)
    op_parity(backend, lambda be: atrous_fn(be, False, 1, True), args, True)


def test_atrous_conv_output_only_grads(backend):
    """Only x needs a grad (weights frozen): the backward skips the epilogue grads and wgrad."""
    x, ws, d, s, t, b = atrous_problem(2, 4, 5, 6, ((1, 2, 1), (3, 3, 2)), False, False)
    xt, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    yt = AF.atrous_conv(xt, ws, d, s, t, act="relu", backend=backend)[0]
    yr = AF.atrous_conv(xr, [w.double() for w in ws], d, s.double(), t.double(), act="relu", backend="torch")[0]
    g = torch.randn(yt.shape, dtype=F64, device=DEV)
    (gt,), (gr,) = torch.autograd.grad((yt.double() * g).sum(), [xt]), torch.autograd.grad((yr * g).sum(), [xr])
    assert gt.is_contiguous(memory_format=torch.channels_last)
    assert_close_rel(gt, gr, TOL, "grad x")


# --------------------------------------------------------------------------- separable_conv

SEP_CASES = {
    # name: (n, c, h, w, branches, mid_act, act, stats, bias, layout)
    "mixed_midrelu_relu_stats": (2, 5, 7, 9, (("plain", 3, 1), ("dw", 4, 2), ("mid", 4, 12)), 1, 1, True, True,
                                 "nchw"),
    "mixed_none_b1_noncontig": (1, 5, 5, 5, (("plain", 3, 1), ("dw", 4, 2), ("mid", 4, 12)), 0, 0, False, False,
                                "noncontiguous"),
    "c20_dw_mid": (2, 20, 6, 5, (("dw", 4, 2), ("mid", 3, 3)), 1, 1, True, False, "nchw"),
    "all_plain": (2, 5, 4, 7, (("plain", 3, 1), ("plain", 2, 1)), 1, 1, True, True, "nchw"),
}


@pytest.mark.parametrize("case", sorted(SEP_CASES))
def test_separable_conv_matches_reference(backend, case):
    n, c, h, w, branches, mid_act, act, stats, bias, layout = SEP_CASES[case]
    args = separable_problem(n, c, h, w, branches, bias, layout=layout)
    op_parity(backend, lambda be: separable_fn(be, mid_act, act, stats), args, stats)


# --------------------------------------------------------------------------- batch 0


def test_batch_zero_gives_empty_outputs_zero_stats_and_zero_grads(backend):
    x, ws, d, s, t, _ = atrous_problem(0, 5, 7, 9, ASPP_BRANCHES, False, False)
    ws = [w.requires_grad_() for w in ws]
    out, cs, css = AF.atrous_conv(x, ws, d, s, t, act="none", compute_stats=True, backend=backend)
    assert out.shape == (0, 11, 7, 9) and cs.shape == (11,) and torch.all(cs == 0) and torch.all(css == 0)
    gw = torch.autograd.grad(out.sum() + cs.sum() + css.sum(), ws)
    assert all(g.shape == w.shape and torch.all(g == 0) for g, w in zip(gw, ws))
    sx, dw, dd, ms, msh, pw, s2, t2, _ = separable_problem(0, 5, 7, 9, (("plain", 3, 1), ("mid", 4, 2)), False)
    out, cs, _ = AF.separable_conv(sx, dw, dd, ms, msh, "relu", pw, s2, t2, None, act="relu", compute_stats=True,
                                   backend=backend)
    assert out.shape == (0, 7, 7, 9) and torch.all(cs == 0)
