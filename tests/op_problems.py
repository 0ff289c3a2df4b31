"""Op-level problems and the parity check shared by the backend tests (not a test module).

The float64 torch backend is the reference: ``op_parity`` runs a backend on the problem's dtype and
the reference on float64 copies, and compares outputs, batch statistics and every gradient.
"""
import os

import torch

from aspp_fused import functional as AF
from conftest import DEV, assert_close_rel, map_tensors, tensors_of

F64 = torch.float64
TOL = 1e-5
# An ASPP v3 layout: (k, O_b, dilation) of the 1x1 and two 3x3 branches, one rate beyond small maps.
ASPP_BRANCHES = ((1, 3, 1), (3, 4, 2), (3, 4, 12))


def atrous_problem(n, c, h, w, branches, sum_mode, bias, dtype=torch.float32, layout="nchw", device=DEV):
    """branches: (k, O_b, dilation). Returns the functional's positional args after x."""
    if layout == "noncontiguous":
        x = torch.randn(n, c, w, h, dtype=dtype, device=device).transpose(2, 3)
    else:
        x = torch.randn(n, c, h, w, dtype=dtype, device=device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    if sum_mode:
        branches = [(k, branches[0][1], d) for k, _, d in branches]
    weights = [torch.randn(o, c, k, k, dtype=dtype, device=device) / (c * k * k) ** 0.5 for k, o, _ in branches]
    o = branches[0][1] if sum_mode else sum(b[1] for b in branches)
    sd = F64 if dtype == F64 else torch.float32
    scale = torch.rand(o, dtype=sd, device=device) + 0.5
    shift = torch.randn(o, dtype=sd, device=device)
    b = torch.randn(n, o, dtype=sd, device=device) if bias else None
    return [x, weights, [d for _, _, d in branches], scale, shift, b]


def separable_problem(n, c, h, w, branches, bias, dtype=torch.float32, layout="nchw", device=DEV):
    """branches: (kind in plain / dw / mid, O_b, dilation)."""
    x = torch.randn(n, c, h, w, dtype=dtype, device=device)
    if layout == "noncontiguous":
        x = torch.randn(n, c, w, h, dtype=dtype, device=device).transpose(2, 3)
    sd = F64 if dtype == F64 else torch.float32
    dw, ms, msh, pw, dil = [], [], [], [], []
    for kind, o, d in branches:
        dw.append(None if kind == "plain" else torch.randn(c, 1, 3, 3, dtype=dtype, device=device) / 3)
        ms.append(torch.rand(c, dtype=sd, device=device) + 0.5 if kind == "mid" else None)
        msh.append(torch.randn(c, dtype=sd, device=device) if kind == "mid" else None)
        pw.append(torch.randn(o, c, 1, 1, dtype=dtype, device=device) / c ** 0.5)
        dil.append(d)
    o = sum(b[1] for b in branches)
    scale = torch.rand(o, dtype=sd, device=device) + 0.5
    shift = torch.randn(o, dtype=sd, device=device)
    b = torch.randn(n, o, dtype=sd, device=device) if bias else None
    return [x, dw, dil, ms, msh, pw, scale, shift, b]


def atrous_fn(backend, sum_mode, act, stats):
    return lambda x, ws, d, s, t, b: AF.atrous_conv(x, ws, d, s, t, b, sum_mode=sum_mode, act=act,
                                                    compute_stats=stats, backend=backend)


def separable_fn(backend, mid_act, act, stats):
    return lambda x, dw, d, ms, msh, pw, s, t, b: AF.separable_conv(x, dw, d, ms, msh, mid_act, pw, s, t, b, act=act,
                                                                     compute_stats=stats, backend=backend)


def op_parity(backend, make_fn, args, stats, tol=TOL):
    """``backend`` (on the args' dtype) against the torch backend in float64: outputs, stats, every
    gradient. make_fn(backend) -> the op as a function of args."""
    a_t = map_tensors(args, lambda t: t.detach().clone().requires_grad_(True))
    a_r = map_tensors(args, lambda t: t.detach().double().requires_grad_(True))
    out_t = make_fn(backend)(*a_t)
    out_r = make_fn("torch")(*a_r)
    assert out_t[0].dtype == args[0].dtype and out_t[0].is_contiguous(memory_format=torch.channels_last)
    for name, a, r in zip(("out", "ch_sum", "ch_sumsq"), out_t, out_r):
        assert a.shape == r.shape, name
        assert_close_rel(a, r, tol, name)
    if stats:
        assert out_t[1].dtype == torch.float32 and out_t[2].dtype == torch.float32
    g0 = torch.rand(out_t[0].shape, dtype=F64, device=DEV) + 0.5  # not summing to ~0 (grad_shift)
    loss_t, loss_r = (out_t[0].double() * g0).sum(), (out_r[0] * g0).sum()
    if stats:
        g1 = torch.randn(out_t[1].shape, dtype=F64, device=DEV)
        g2 = torch.randn(out_t[2].shape, dtype=F64, device=DEV) / max(out_t[0].numel(), 1)
        loss_t = loss_t + (out_t[1].double() * g1).sum() + (out_t[2].double() * g2).sum()
        loss_r = loss_r + (out_r[1] * g1).sum() + (out_r[2] * g2).sum()
    leaves_t, leaves_r = tensors_of(a_t), tensors_of(a_r)
    grads_t = torch.autograd.grad(loss_t, leaves_t, allow_unused=True)
    grads_r = torch.autograd.grad(loss_r, leaves_r, allow_unused=True)
    for i, (gt, gr, leaf) in enumerate(zip(grads_t, grads_r, leaves_t)):
        assert gt is not None and gt.dtype == leaf.dtype and gt.shape == leaf.shape, i
        if gr is None:
            assert gt.abs().max() == 0, i
        else:
            assert_close_rel(gt, gr, tol, "grad of input %d" % i)


def opcheck(op, args, test_utils=None):
    """torch.library.opcheck, and the fake kernel's strides against the real outputs' (opcheck
    compares shapes and dtypes only) on every dimension longer than 1."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils import _pytree

    torch.library.opcheck(op, args, **({} if test_utils is None else {"test_utils": test_utils}))
    real = _pytree.tree_leaves(op(*args))
    with FakeTensorMode() as mode:
        fake = _pytree.tree_leaves(op(*_pytree.tree_map_only(torch.Tensor, mode.from_tensor, args)))
    assert len(real) == len(fake)
    for i, (r, f) in enumerate(zip(real, fake)):
        assert r.shape == f.shape and r.dtype == f.dtype, (op, i)
        strides = [(r.stride(k), f.stride(k)) for k in range(r.dim()) if r.shape[k] > 1]
        assert all(a == b for a, b in strides), (op, i, r.shape, r.stride(), f.stride())


# --------------------------------------------------------------------------- the CUDA kernels on the emulator

EMU_LIB = os.environ.get("ASPP_CUDA_EMU_LIB")
_emu_registered = []


def cuda_emu_ops():
    """torch.ops.aspp_fused_emu, the CUDA kernels built for the host emulator (CPU tensors), loaded
    once; None unless ASPP_CUDA_EMU_LIB names the built library (tools/cuda_emu/run_tests.sh, make
    emu-test) and there is no GPU (on a GPU the real CUDA kernels run)."""
    if not EMU_LIB or torch.cuda.is_available():
        return None
    if not hasattr(torch.ops.aspp_fused_emu, "atrous_conv"):
        torch.ops.load_library(EMU_LIB)
    return torch.ops.aspp_fused_emu


def cuda_emu_backend():
    """The CUDA kernels run on the host SIMT emulator (tools/cuda_emu), as a backend name the
    functional accepts: "cuda_emu", a dispatch stand-in over torch.ops.aspp_fused_emu.* (CPU
    tensors) with the ops' own autograd formulas (aspp_fused/_autograd.py), so the op cases run on
    them as on every backend. None unless the emulator library is built and named by
    ASPP_CUDA_EMU_LIB (tools/cuda_emu/run_tests.sh, make emu-test)."""
    emu = cuda_emu_ops()
    if emu is None:  # on a GPU the real CUDA kernels run as "cpp"
        return None
    if not _emu_registered:
        from aspp_fused import _autograd, dispatch
        from aspp_fused.functional import _materialize

        _autograd.register_atrous("aspp_fused_emu::atrous_conv", _autograd.primitives(emu))
        _autograd.register_separable("aspp_fused_emu::separable_conv", _autograd.primitives(emu))

        def atrous(x, ws, d, s, t, b, sum_mode, act, stats):
            s, t = _materialize(s, t, ws[0].shape[0] if sum_mode else sum(w.shape[0] for w in ws), x)
            return emu.atrous_conv(x, list(ws), list(d), s, t, b, sum_mode, act, stats)

        def separable(x, dw, d, ms, msh, mid_act, pw, s, t, b, act, stats):
            s, t = _materialize(s, t, sum(w.shape[0] for w in pw), x)

            def absent_as_empty(ts):  # the schema's [0] placeholder, as aspp_fused/ops.py
                return [x.new_empty((0,)) if v is None else v for v in ts]

            return emu.separable_conv(x, absent_as_empty(dw), list(d), absent_as_empty(ms), absent_as_empty(msh),
                                      mid_act, list(pw), s, t, b, act, stats)

        dispatch.register_stand_in("cuda_emu", {"atrous_conv": atrous, "separable_conv": separable})
        _emu_registered.append(True)
    return "cuda_emu"
