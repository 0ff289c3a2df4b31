"""The docs/DESIGN.md standard cases (batch 16, C = 2048, 33 x 33 and 65 x 65, branches of 256) on
every GPU backend: the CUDA kernels (backend ``cpp`` on CUDA tensors) and Triton, against the
float64 torch backend (the reference).

Tolerance (docs/DESIGN.md): fp32 (TF32 off) 1e-5 relative, 1e-4 for the statistics and the
gradients (sums over 16 x 33 x 33 products); bf16 / fp16 at most 2x the error of PyTorch's own path
(the torch backend in that dtype). The CUDA kernels' standard case at 1e-5 for every gradient:
tests/test_op_dtypes.py::test_standard_aspp_v3_os16.
"""
import pytest
import torch

from aspp_fused import _extension
from aspp_fused import functional as AF
from conftest import map_tensors, needs_triton, rel_err, tensors_of
from op_problems import atrous_problem, separable_problem

DEV = "cuda"
F64 = torch.float64
TOL = 1e-5

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.usefixtures("no_tf32"),  # conftest: the exact fp32 path
              pytest.mark.parametrize("backend", [
                  pytest.param("cpp", marks=pytest.mark.skipif(not _extension.cuda_kernels_built(),
                                                               reason="aspp_fused built without its CUDA kernels")),
                  pytest.param("triton", marks=needs_triton)])]


GPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _low_precision_limit(ours, pytorch, exact, dtype):
    return TOL if dtype == torch.float32 else 2 * rel_err(pytorch, exact)


STANDARD_ATROUS = {
    # name: (H = W, rates, O_b, sum_mode, act, bias)
    "aspp_v3_os16": (33, (6, 12, 18), 256, False, 1, True),
    "aspp_v3_os8": (65, (12, 24, 36), 256, False, 1, True),
    "aspp_v2_os8": (65, (6, 12, 18, 24), 21, True, 0, False),
}


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(STANDARD_ATROUS))
def test_standard_atrous(backend, case, dtype):
    hw, rates, ob, sum_mode, act, bias = STANDARD_ATROUS[case]
    branches = ([] if sum_mode else [(1, ob, 1)]) + [(3, ob, r) for r in rates]
    args = atrous_problem(16, 2048, hw, hw, branches, sum_mode, bias, dtype=dtype)
    exact = AF.atrous_conv(*map_tensors(args, lambda t: t.double()), sum_mode=sum_mode, act=act, backend="torch")[0]
    ours = AF.atrous_conv(*args, sum_mode=sum_mode, act=act, backend=backend)[0]
    pytorch = AF.atrous_conv(*args, sum_mode=sum_mode, act=act, backend="torch")[0]
    assert ours.dtype == dtype
    assert rel_err(ours, exact) <= _low_precision_limit(ours, pytorch, exact, dtype)
    # Stats (training) on the same problem.
    _, s, ss = AF.atrous_conv(*args, sum_mode=sum_mode, act="none", compute_stats=True, backend=backend)
    _, s_e, ss_e = AF.atrous_conv(*map_tensors(args, lambda t: t.double()), sum_mode=sum_mode, act="none",
                                  compute_stats=True, backend="torch")
    _, s_p, ss_p = AF.atrous_conv(*args, sum_mode=sum_mode, act="none", compute_stats=True, backend="torch")
    assert rel_err(ss, ss_e) <= max(_low_precision_limit(ss, ss_p, ss_e, dtype), 1e-4)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("mid", [False, True], ids=["smp", "midbn"])
def test_standard_separable(backend, mid, dtype):
    kind = "mid" if mid else "dw"
    args = separable_problem(16, 2048, 33, 33, (("plain", 256, 1),) + tuple((kind, 256, r) for r in (6, 12, 18)),
                             True, dtype=dtype)
    x, dw, d, ms, msh, pw, s, t, b = args

    def run(a, be):
        return AF.separable_conv(*a[:5], "relu", *a[5:], act="relu", backend=be)[0]

    exact = run(map_tensors(args, lambda v: v.double()), "torch")
    ours = run(args, backend)
    pytorch = run(args, "torch")
    assert ours.dtype == dtype
    assert rel_err(ours, exact) <= _low_precision_limit(ours, pytorch, exact, dtype)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_standard_backward(backend, dtype):
    """Every grad of the OS16 ASPP conv (batch 4 to bound the float64 reference's cost)."""
    branches = [(1, 256, 1)] + [(3, 256, r) for r in (6, 12, 18)]
    args = atrous_problem(4, 2048, 33, 33, branches, False, True, dtype=dtype)

    def grads(a, be):
        a = map_tensors(a, lambda v: v.detach().clone().requires_grad_(True))
        out, cs, css = AF.atrous_conv(*a, act="relu", compute_stats=True, backend=be)
        gen = torch.Generator(device=DEV).manual_seed(1)
        g0 = torch.rand(out.shape, generator=gen, device=DEV, dtype=F64) + 0.5
        g2 = torch.randn(css.shape, generator=gen, device=DEV, dtype=F64) / out.numel()
        loss = (out.double() * g0).sum() + (css.double() * g2).sum()
        return torch.autograd.grad(loss, tensors_of(a))

    exact = grads(map_tensors(args, lambda v: v.double()), "torch")
    ours = grads(args, backend)
    pytorch = grads(args, "torch")
    for i, (o, p, e) in enumerate(zip(ours, pytorch, exact)):
        limit = 1e-4 if dtype == torch.float32 else 2 * rel_err(p, e)
        assert rel_err(o, e) <= limit, (i, rel_err(o, e), limit)
