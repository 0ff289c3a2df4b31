"""Each op's kernels in every dtype, on every kernel set, against the float64 torch backend (the
reference).

A kernel set is a backend's ops called directly (``<namespace>.<prefix>atrous_conv`` etc.), the
backward through the op's one formula (aspp_fused/_autograd.py) over the set's primitives:
    cpu       the CPU backend's kernels (CPU tensors)
    cuda      the CUDA kernels (a GPU)
    cuda_emu  the CUDA kernels on the host SIMT emulator (tools/cuda_emu): make emu-test, or
              tools/cuda_emu/run_tests.sh [--asan] (python tools/cuda_emu/build.py, then
              ASPP_CUDA_EMU_LIB=<the built library> pytest -k cuda_emu tests/test_op_dtypes.py)
    triton    the Triton kernels: compiled on a GPU; on CPU under the interpreter, in float32 and
              float16 and on the small cases (Triton 3.9's interpreter computes tl.dot of bfloat16
              operands wrongly, a 16 x 16 dot 5e9 off, so Triton's bfloat16 runs on a GPU only).
Each case runs the op in its dtype and the reference on float64 copies of the same (dtype-rounded)
inputs: forward, backward (each output_mask), eval and train (statistics). The output conventions
(dtype, shape, memory format of every output and grad) are the CPU backend's in the same dtypes.
Tolerances (docs/DESIGN.md): float64 1e-10; float32 with TF32 off 1e-5; TF32 on 2e-3 (the TF32
rounding of both operands, 2 * 2^-11, bounds it); bf16 / fp16 at most 2x the error of PyTorch's
own path in that dtype (torch_backend, autograd for the grads) against the same reference. Errors
are norm-relative (conftest.rel_err). Under compute-sanitizer: tools/sanitize_cuda.sh.
"""
import contextlib
import os
import warnings
from typing import NamedTuple

import pytest
import torch

from aspp_fused import _autograd, _extension, torch_backend
from conftest import rel_err, triton_unavailable
from op_problems import cuda_emu_ops

F64 = torch.float64
DTYPES = [F64, torch.float32, torch.bfloat16, torch.float16]
LOW = (torch.bfloat16, torch.float16)
TF32_TOL = 2e-3
CUDA = torch.cuda.is_available()
CONV = torch.ops.aspp_fused  # the CPU backend's kernels: the output conventions


class KernelSet(NamedTuple):
    """One backend's kernels as these tests call them."""
    name: str
    ops: object  # the torch.ops namespace
    prefix: str  # of the op names in it
    device: str
    dtypes: tuple  # those it runs
    small_only: bool  # the small cases only (an interpreter's time)

    def op(self, name):
        return getattr(self.ops, self.prefix + name)

    def primitives(self):
        return _autograd.primitives(self.ops, self.prefix)


def _kernel_set(name):
    """(KernelSet, None) or (None, why it cannot run here)."""
    if not _extension.cpp_available():
        return None, "aspp_fused._C (the CPU backend, the output conventions) not built"
    if name == "cpu":
        return KernelSet("cpu", torch.ops.aspp_fused, "", "cpu", tuple(DTYPES), False), None
    if name == "cuda":
        if not (CUDA and _extension.cuda_kernels_built()):
            return None, "needs CUDA and aspp_fused built with its CUDA kernels"
        return KernelSet("cuda", torch.ops.aspp_fused, "", "cuda", tuple(DTYPES), False), None
    if name == "cuda_emu":
        emu = cuda_emu_ops()
        if emu is None:
            return None, "the CUDA kernels' host emulator is not built (make emu-test runs these)"
        return KernelSet("cuda_emu", emu, "", "cpu", tuple(DTYPES), False), None
    assert name == "triton", name
    why = triton_unavailable()
    if why:
        return None, why
    _extension.triton_kernels()  # registers the Triton ops
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if CUDA else (torch.float32, torch.float16)
    return KernelSet("triton", torch.ops.aspp_fused, "triton_", "cuda" if CUDA else "cpu", dtypes, not CUDA), None


def _params(names):
    params = []
    for name in names:
        ks, why = _kernel_set(name)
        marks = [pytest.mark.gpu] if ks is not None and ks.device == "cuda" else []
        if ks is None:
            marks.append(pytest.mark.skip(reason=why))
        params.append(pytest.param(ks, id=name, marks=marks))
    return params


ALL_SETS = _params(["cpu", "cuda", "cuda_emu", "triton"])
CUDA_SETS = _params(["cuda", "cuda_emu"])  # the CUDA kernels' own features (their two plans)
TF32_SETS = _params(["cuda", "cuda_emu", "triton"])  # those with a TF32 path
COMPILED_SETS = _params(["cpu", "cuda", "cuda_emu"])  # those whose ops check their arguments in C++
STANDARD_SETS = _params(["cuda"])  # the standard-size case: a GPU's
# tools/sanitize_cuda.sh: no standard-size case (one cudaMalloc per tensor under the sanitizer)
SANITIZED = os.environ.get("ASPP_CUDA_TEST_SMALL") == "1"

pytestmark = pytest.mark.usefixtures("no_tf32")  # conftest: the exact fp32 path unless a test asks for TF32


def _low(ks):
    """The low-precision dtype a single-dtype case runs in: bfloat16 where the set runs it."""
    return torch.bfloat16 if torch.bfloat16 in ks.dtypes else torch.float16


def _runs(ks, dtype, large=False):
    """Skips a dtype the set does not run, or a large case on an interpreter."""
    if dtype not in ks.dtypes:
        pytest.skip("%s does not run %s (see the module docstring)" % (ks.name, dtype))
    if large and ks.small_only:
        pytest.skip("a large case: %s runs the small ones here" % ks.name)


@contextlib.contextmanager
def _pytorch_path(device):
    """Context for running PyTorch's own path on device. On CPU that path is PyTorch's CPU
    convolution, whose oneDNN bf16 backward of dilated convs crashes (torch 2.13): use the
    native CPU kernels there."""
    if device != "cpu":
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def _sync(ks):
    if ks.device == "cuda":
        torch.cuda.synchronize()


def _stat_dtype(dtype):
    return F64 if dtype == F64 else torch.float32


def _tol(dtype, pytorch_err=None):
    if dtype == F64:
        return 1e-10
    if dtype == torch.float32:
        return TF32_TOL if torch.backends.cudnn.allow_tf32 else 1e-5
    assert pytorch_err is not None
    return 2 * pytorch_err


def _dev(device, t, dtype=None):
    if t is None:
        return None
    if isinstance(t, list):
        return [_dev(device, v, dtype) for v in t]
    return t.to(device=device, dtype=dtype or t.dtype)


def _to(t, dtype):
    return None if t is None else t.to(dtype)


def _unaligned(t, memory_format=torch.contiguous_format):
    """t in a storage that starts one element past an allocation (so not 16-byte aligned), dense
    in memory_format: what a view into one flat parameter buffer hands the kernels."""
    if t is None:
        return None
    if isinstance(t, list):
        return [_unaligned(v, memory_format) for v in t]
    dense = torch.empty_like(t, memory_format=memory_format)
    flat = t.new_empty(t.numel() + 1)
    v = flat.as_strided(t.shape, dense.stride(), 1)
    v.copy_(t)
    assert v.data_ptr() % 16 != 0 and v.is_contiguous(memory_format=memory_format)
    return v


def _check(name, ours, ref, dtype, pytorch=None):
    ours = ours.detach().cpu()
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    err = rel_err(ours, ref)
    p_err = rel_err(pytorch.detach().cpu(), ref) if pytorch is not None else None
    tol = _tol(dtype, p_err)
    assert err <= tol, "%s (%s): relative error %.3g > %.3g (pytorch's own: %s)" % (name, dtype, err, tol, p_err)


def _same_conventions(ours, ref_same_dtype, name):
    """dtype, shape and memory format as the CPU backend's kernel returns them for the same dtypes."""
    assert ours.dtype == ref_same_dtype.dtype, (name, ours.dtype, ref_same_dtype.dtype)
    assert ours.shape == ref_same_dtype.shape, (name, ours.shape, ref_same_dtype.shape)
    if ours.dim() == 4 and ours.numel() > 0:
        for fmt in (torch.contiguous_format, torch.channels_last):
            if ref_same_dtype.is_contiguous(memory_format=fmt):
                assert ours.is_contiguous(memory_format=fmt), (name, fmt)


# --------------------------------------------------------------------------- problems (float64, CPU)


def atrous_problem(n, c, h, w, branches, sum_mode=False, bias=True, gen_seed=0):
    """branches: (k, O_b, dilation). float64 CPU tensors: x, weights, dilations, scale, shift, bias."""
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(n, c, h, w, dtype=F64, generator=g)
    if sum_mode:
        branches = [(k, branches[0][1], d) for k, _, d in branches]
    ws = [torch.randn(o, c, k, k, dtype=F64, generator=g) / max(c * k * k, 1) ** 0.5 for k, o, _ in branches]
    dil = [d for _, _, d in branches]
    o = branches[0][1] if sum_mode else sum(b[1] for b in branches)
    scale = torch.rand(o, dtype=F64, generator=g) + 0.5
    shift = torch.randn(o, dtype=F64, generator=g)
    b = torch.randn(n, o, dtype=F64, generator=g) if bias else None
    return x, ws, dil, scale, shift, b


def separable_problem(n, c, h, w, branches, bias=True, gen_seed=0):
    """branches: (kind in plain/dw/mid, O_b, dilation). None marks an absent tensor."""
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(n, c, h, w, dtype=F64, generator=g)
    dw, ms, msh, pw, dil = [], [], [], [], []
    for kind, o, d in branches:
        dw.append(None if kind == "plain" else torch.randn(c, 1, 3, 3, dtype=F64, generator=g) / 3)
        ms.append(torch.rand(c, dtype=F64, generator=g) + 0.5 if kind == "mid" else None)
        msh.append(torch.randn(c, dtype=F64, generator=g) if kind == "mid" else None)
        pw.append(torch.randn(o, c, 1, 1, dtype=F64, generator=g) / max(c, 1) ** 0.5)
        dil.append(d)
    o = sum(b[1] for b in branches)
    scale = torch.rand(o, dtype=F64, generator=g) + 0.5
    shift = torch.randn(o, dtype=F64, generator=g)
    b = torch.randn(n, o, dtype=F64, generator=g) if bias else None
    return x, dw, dil, ms, msh, pw, scale, shift, b


def _round(t, dtype):
    """t rounded to dtype and back to float64 (the reference sees what the kernel sees)."""
    if t is None:
        return None
    if isinstance(t, list):
        return [_round(v, dtype) for v in t]
    return t.to(dtype).to(F64)


def _absent(ts, like):
    return [like.new_empty(0) if t is None else t for t in ts]


# --------------------------------------------------------------------------- atrous_conv


def _upstream_grads(out_ref, stats, dtype):
    """Upstream grads of out (and of the statistics in train mode): float64, then rounded to the
    op's dtypes. (go, gs, gss, and their rounded go_q, gs_q, gss_q)"""
    sd = _stat_dtype(dtype)
    g = torch.Generator().manual_seed(1)
    go = torch.rand(out_ref.shape, dtype=F64, generator=g) + 0.5
    gs = torch.randn(out_ref.shape[1], dtype=F64, generator=g) if stats else None
    gss = torch.randn(out_ref.shape[1], dtype=F64, generator=g) / max(out_ref.numel(), 1) if stats else None
    return go, gs, gss, _round(go, dtype), _round(gs, sd), _round(gss, sd)


def _atrous_case(ks, prob, dtype, sum_mode, act, stats, mask=(True, True, True), layout="nchw", check_backward=True):
    x, ws, dil, scale, shift, bias = prob
    # Kernel inputs: x and weights in dtype; epilogue vectors in float32 (float64 for float64).
    sd = _stat_dtype(dtype)
    xq, wq = _round(x, dtype), _round(ws, dtype)
    scq, shq, bq = _round(scale, sd), _round(shift, sd), _round(bias, sd)
    xd = _dev(ks.device, xq, dtype)
    if layout == "channels_last":
        xd = xd.contiguous(memory_format=torch.channels_last)
    elif layout == "noncontiguous":
        xd = _dev(ks.device, xq.transpose(2, 3).contiguous(), dtype).transpose(2, 3)
        assert not xd.is_contiguous() and not xd.is_contiguous(memory_format=torch.channels_last)
    wd, scd, shd, bd = [_dev(ks.device, t, d) for t, d in ((wq, dtype), (scq, sd), (shq, sd), (bq, sd))]
    if layout == "unaligned":
        xd, wd = _unaligned(xd, torch.channels_last), _unaligned(wd)

    out = ks.op("atrous_conv")(xd, wd, dil, scd, shd, bd, sum_mode, act, stats)
    _sync(ks)
    ref = torch_backend.atrous_conv(xq, wq, dil, scq, shq, bq, sum_mode, act, stats)
    conv = CONV.atrous_conv(xq.to(dtype), [w.to(dtype) for w in wq], dil, scq.to(sd), shq.to(sd),
                           None if bq is None else bq.to(sd), sum_mode, act, stats)
    pt = None
    if dtype in LOW:  # PyTorch's own path in this dtype
        with _pytorch_path(ks.device):
            pt = torch_backend.atrous_conv(xd, wd, dil, scd, shd, bd, sum_mode, act, stats)
    for i, name in enumerate(["out", "ch_sum", "ch_sumsq"]):
        _same_conventions(out[i], conv[i], name)
        _check(name, out[i], ref[i], dtype, None if pt is None else pt[i])
    if not check_backward or x.shape[0] * x.shape[2] * x.shape[3] == 0:
        return
    if dtype in LOW and act == 1:
        # A relu mask of a rounded z flips where |z| ~ 2^-8 |z|; at test sizes one flipped
        # pixel dominates a weight grad's relative error, a coin toss for PyTorch's path and
        # ours alike. Low precision checks the backward's rounding on the linear path (relu
        # backward is checked exactly in float32 / float64, and in bf16 / fp16 at full size by
        # test_standard_aspp_v3_os16); the relu backward still runs here (conventions, finite).
        _atrous_backward(ks, out, ref, conv, xd, wd, scd, shd, bd, xq, wq, scq, shq, bq, dil, dtype, sum_mode, act,
                         stats, mask, compare=False)
        act = 0
        out = ks.op("atrous_conv")(xd, wd, dil, scd, shd, bd, sum_mode, act, stats)
        ref = torch_backend.atrous_conv(xq, wq, dil, scq, shq, bq, sum_mode, act, stats)
        conv = CONV.atrous_conv(xq.to(dtype), [w.to(dtype) for w in wq], dil, scq.to(sd), shq.to(sd),
                               None if bq is None else bq.to(sd), sum_mode, act, stats)
    _atrous_backward(ks, out, ref, conv, xd, wd, scd, shd, bd, xq, wq, scq, shq, bq, dil, dtype, sum_mode, act, stats,
                     mask)


def _atrous_backward(ks, out, ref, conv, xd, wd, scd, shd, bd, xq, wq, scq, shq, bq, dil, dtype, sum_mode, act, stats,
                     mask, compare=True):
    sd = _stat_dtype(dtype)

    # Backward: upstream grads of out (and of the statistics in train mode).
    go, gs, gss, goq, gsq, gssq = _upstream_grads(ref[0], stats, dtype)
    mask = list(mask)
    bw = _autograd.atrous_conv_backward(ks.primitives(), _dev(ks.device, goq, dtype), _dev(ks.device, gsq, sd),
                                        _dev(ks.device, gssq, sd), out[0], xd, wd, dil, scd, shd, bd, sum_mode, act,
                                        mask)
    _sync(ks)
    bconv = _autograd.atrous_conv_backward(_autograd.primitives(CONV), goq.to(dtype), _to(gsq, sd), _to(gssq, sd),
                                           conv[0], xq.to(dtype), [w.to(dtype) for w in wq], dil, scq.to(sd),
                                           shq.to(sd), _to(bq, sd), sum_mode, act, mask)

    def torch_grads(args, dt):
        return _torch_grads(lambda a: torch_backend.atrous_conv(a[0], a[1], dil, a[2], a[3], a[4], sum_mode, act,
                                                                stats), args, goq, gsq, gssq, dt)

    bref = torch_grads([xq, wq, scq, shq, bq], F64)  # the reference
    ptg = torch_grads([xd, wd, scd, shd, bd], dtype) if dtype in LOW and compare else None
    names = ["grad_x", "grad_weights", "grad_scale", "grad_shift", "grad_bias"]  # = the order of bref, ptg
    if not compare:
        for i, name in enumerate(names):
            for j, (o, c) in enumerate(zip(bw[i], bconv[i]) if i == 1 else [(bw[i], bconv[i])]):
                _same_conventions(o, c, "%s[%d]" % (name, j))
                assert torch.isfinite(o).all(), name
        return
    for i, name in enumerate(names):
        if name == "grad_weights":
            assert len(bw[1]) == len(bconv[1]), name
            for j, (o, r, c) in enumerate(zip(bw[1], bref[1], bconv[1])):
                _same_conventions(o, c, "%s[%d]" % (name, j))
                _check("%s[%d]" % (name, j), o, r, dtype, None if ptg is None else ptg[1][j])
            continue
        _same_conventions(bw[i], bconv[i], name)
        if bw[i].numel() == 0:
            continue
        _check(name, bw[i], bref[i], dtype, None if ptg is None else ptg[i])


def _torch_grads(fn, args, go, gs, gss, dtype):
    """PyTorch's own grads (autograd through torch_backend in dtype) for the loss the backward
    ops receive: <out, go> + <ch_sum, gs> + <ch_sumsq, gss>. Returns a structure parallel to
    args (lists for list arguments, None for None)."""
    device = args[0].device
    leaves, rebuilt = [], []
    for a in args:
        if a is None:
            rebuilt.append(None)
        elif isinstance(a, list):
            lst = [None if t is None else t.detach().clone().requires_grad_(True) for t in a]
            leaves += [t for t in lst if t is not None]
            rebuilt.append(lst)
        else:
            t = a.detach().clone().requires_grad_(True)
            leaves.append(t)
            rebuilt.append(t)
    with _pytorch_path(device.type):
        out, s, ss = fn(rebuilt)
    ldt = F64 if dtype == F64 else torch.float32
    loss = (out.to(ldt) * _dev(device, go, ldt)).sum()
    if gs is not None:
        loss = loss + (s.to(ldt) * _dev(device, gs, ldt)).sum() + (ss.to(ldt) * _dev(device, gss, ldt)).sum()
    with _pytorch_path(device.type):
        grads = iter(torch.autograd.grad(loss, leaves, allow_unused=True))
    result = []
    for a in rebuilt:
        if a is None:
            result.append(None)
        elif isinstance(a, list):
            result.append([None if t is None else next(grads) for t in a])
        else:
            result.append(next(grads))

    def zeros_if_none(g, like):
        if like is None:
            return None
        return torch.zeros_like(like) if g is None else g

    return [[zeros_if_none(g, t) for g, t in zip(r, a)] if isinstance(r, list) else zeros_if_none(r, a)
            for r, a in zip(result, rebuilt)]


ATROUS_BRANCHES = ((1, 8, 1), (3, 8, 2), (3, 8, 12))
ATROUS_SHAPES = [
    (2, 16, 9, 11),  # one tile per image, rate 12 >= H: centre tap only
    (1, 20, 25, 30),  # several 2-D tiles, C % 8 != 0 (bf16 / fp16: scalar input loads)
    (2, 3, 5, 7),  # tiny C, odd H / W
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATROUS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("sum_mode", [False, True], ids=["concat", "sum"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("ks", ALL_SETS)
def test_atrous_conv(ks, dtype, shape, sum_mode, train):
    _runs(ks, dtype, large=shape[1:] == (20, 25, 30))
    n, c, h, w = shape
    prob = atrous_problem(n, c, h, w, ATROUS_BRANCHES, sum_mode=sum_mode, bias=not train)
    _atrous_case(ks, prob, dtype, sum_mode, act=1 if not train else 0, stats=train)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous"])
@pytest.mark.parametrize("ks", ALL_SETS)
def test_atrous_conv_input_layouts(ks, dtype, layout):
    _runs(ks, dtype)
    prob = atrous_problem(2, 16, 9, 11, ATROUS_BRANCHES)
    _atrous_case(ks, prob, dtype, False, 1, True, layout=layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sum_mode", [False, True], ids=["concat", "sum"])
@pytest.mark.parametrize("ks", ALL_SETS)
def test_atrous_conv_unaligned_storage(ks, dtype, sum_mode):
    """x and weights that start mid-allocation (views into flat buffers): scalar input loads,
    and the weights the 16-byte copies read must be repacked, not used in place."""
    _runs(ks, dtype)
    prob = atrous_problem(2, 16, 9, 11, ATROUS_BRANCHES, sum_mode=sum_mode)
    _atrous_case(ks, prob, dtype, sum_mode, 1, True, layout="unaligned")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ks", ALL_SETS)
def test_atrous_conv_awkward_channels(ks, dtype):
    """O_b not a multiple of 8 (packed weights padded), C odd, rates >= both map sides."""
    _runs(ks, dtype)
    prob = atrous_problem(1, 7, 6, 13, ((1, 5, 1), (3, 3, 2), (3, 6, 40)))
    _atrous_case(ks, prob, dtype, False, 1, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sum_mode", [False, True], ids=["concat", "sum"])
@pytest.mark.parametrize("ks", ALL_SETS)
def test_atrous_conv_multiple_blocks(ks, dtype, sum_mode):
    """Several K steps with a partial last one (C = 72) and several column blocks per branch
    with a partial last one (O_b = 136 > BN), two pixel tiles per image."""
    _runs(ks, dtype, large=True)
    prob = atrous_problem(1, 72, 12, 13, ((1, 136, 1), (3, 136, 2)), sum_mode=sum_mode)
    _atrous_case(ks, prob, dtype, sum_mode, 1, True)


@pytest.mark.parametrize("dtype", [F64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sum_mode", [False, True], ids=["concat", "sum"])
@pytest.mark.parametrize("ks", ALL_SETS)
def test_atrous_conv_more_branches_than_one_launch(ks, dtype, sum_mode):
    """9 branches > kMaxBranches (8): concat splits launches, sum mode accumulates in fp32."""
    _runs(ks, dtype)
    branches = tuple((3 if i % 2 else 1, 4, 1 + i) for i in range(9))
    prob = atrous_problem(1, 8, 7, 6, branches, sum_mode=sum_mode)
    _atrous_case(ks, prob, dtype, sum_mode, 1, True)


# The exact-region plan of the concat forward (csrc/tap_plan.h; forced here with
# ASPP_FUSED_CUDA_REGIONS=1, where the glue would pick the tile plan for some of these small maps):
# the fuzz's shape classes. (n, c, h, w, branches (k, O_b, d)).
REGION_SHAPES = [
    (3, 16, 1, 1, ((3, 8, 1), (3, 8, 5))),  # 1-pixel maps: centre tap only, tiles across images
    (2, 24, 7, 13, ((3, 8, 3), (3, 136, 6), (1, 8, 1))),  # width-1 regions (7 - 2 * 3), 2 column blocks
    (5, 8, 6, 6, ((3, 8, 3),)),  # rate = map / 2: breakpoints coincide
    (4, 32, 4, 4, ((3, 8, 4), (3, 8, 9))),  # rates at / beyond the map
    (3, 40, 11, 11, ((3, 16, 2), (1, 16, 1))),  # 9 x 9 centre region: tiles span images, bias per image
]


@pytest.mark.parametrize("dtype", [F64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", REGION_SHAPES, ids=lambda s: "n%d_c%d_%dx%d" % s[:4])
@pytest.mark.parametrize("sum_mode", [False, True], ids=["concat", "sum"])
@pytest.mark.parametrize("ks", ALL_SETS)
def test_atrous_conv_region_shapes(ks, dtype, shape, sum_mode, monkeypatch):
    """The region plan's shape classes against the reference (forward; backward, whose dgrad is a
    sum-mode launch with negated rates; eval with a per-image bias, train statistics). The CUDA
    kernels take their region plan here (ASPP_FUSED_CUDA_REGIONS=1); Triton's concat forward
    always does (kernels/plan.py)."""
    _runs(ks, dtype, large=shape[1] > 16)
    n, c, h, w, branches = shape
    monkeypatch.setenv("ASPP_FUSED_CUDA_REGIONS", "1")
    prob = atrous_problem(n, c, h, w, branches, sum_mode=sum_mode, bias=True)
    _atrous_case(ks, prob, dtype, sum_mode, 1, False)
    _atrous_case(ks, atrous_problem(n, c, h, w, branches, sum_mode=sum_mode, bias=False, gen_seed=1), dtype, sum_mode,
                 0, True)


@pytest.mark.parametrize("dtype", [F64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", REGION_SHAPES, ids=lambda s: "n%d_c%d_%dx%d" % s[:4])
@pytest.mark.parametrize("sum_mode", [False, True], ids=["concat", "sum"])
@pytest.mark.parametrize("ks", CUDA_SETS)
def test_cuda_region_plan_matches_tile_plan(ks, dtype, shape, sum_mode, monkeypatch):
    """The CUDA kernels' region plan against their tile plan: both multiply the same valid taps in
    the same order (the tile plan's extra taps add exact zeros), so the outputs are bitwise equal.
    Sum mode plans over the common refinement of the branches' regions."""
    _runs(ks, dtype)
    n, c, h, w, branches = shape
    x, ws, dil, scale, shift, bias = atrous_problem(n, c, h, w, branches, sum_mode=sum_mode, bias=True)
    sd = _stat_dtype(dtype)
    args = (_dev(ks.device, x, dtype), _dev(ks.device, ws, dtype), dil, _dev(ks.device, scale, sd),
            _dev(ks.device, shift, sd), _dev(ks.device, bias, sd), sum_mode, 1, True)
    monkeypatch.setenv("ASPP_FUSED_CUDA_REGIONS", "1")
    regions = ks.op("atrous_conv")(*args)
    monkeypatch.setenv("ASPP_FUSED_CUDA_REGIONS", "0")
    tiles = ks.op("atrous_conv")(*args)
    _sync(ks)
    assert torch.equal(regions[0], tiles[0])
    for i in (1, 2):  # the statistics: per-CTA partial sums added atomically, in another grouping
        torch.testing.assert_close(regions[i], tiles[i], rtol=1e-12 if dtype == F64 else 1e-5, atol=0)


@pytest.mark.parametrize("n", [0, 1])
@pytest.mark.parametrize("ks", ALL_SETS)
def test_atrous_conv_batch_0_and_1(ks, n):
    prob = atrous_problem(n, 8, 7, 9, ATROUS_BRANCHES)
    _atrous_case(ks, prob, torch.float32, False, 1, True)
    prob = atrous_problem(n, 8, 7, 9, ATROUS_BRANCHES, sum_mode=True, bias=False)
    _atrous_case(ks, prob, _low(ks), True, 0, True)


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, False, False)], ids=["input", "weights", "epilogue", "none"])
@pytest.mark.parametrize("act", [0, 1])
@pytest.mark.parametrize("ks", ALL_SETS)
def test_atrous_conv_backward_masks(ks, mask, act):
    prob = atrous_problem(2, 8, 7, 9, ATROUS_BRANCHES)
    _atrous_case(ks, prob, torch.float32, False, act, True, mask=mask)


@pytest.mark.parametrize("ks", TF32_SETS)
def test_atrous_conv_tf32(ks):
    torch.backends.cudnn.allow_tf32 = True
    prob = atrous_problem(2, 32, 9, 11, ATROUS_BRANCHES)
    _atrous_case(ks, prob, torch.float32, False, 1, True)


# --------------------------------------------------------------------------- separable_conv


def _separable_case(ks, prob, dtype, mid_act, act, stats, mask=(True, True, True), layout="nchw"):
    if dtype in LOW and (act == 1 or mid_act == 1):
        # Relu masks in low precision: see _atrous_case. The backward with the masks runs
        # (conventions, finite values); its rounding is compared on the linear path.
        _separable_run(ks, prob, dtype, mid_act, act, stats, mask, layout, compare_backward=False)
        mid_act, act = 0, 0
    _separable_run(ks, prob, dtype, mid_act, act, stats, mask, layout)


def _separable_run(ks, prob, dtype, mid_act, act, stats, mask, layout, compare_backward=True):
    x, dw, dil, ms, msh, pw, scale, shift, bias = prob
    sd = _stat_dtype(dtype)
    xq, dwq, pwq = _round(x, dtype), _round(dw, dtype), _round(pw, dtype)
    msq, mshq = _round(ms, sd), _round(msh, sd)
    scq, shq, bq = _round(scale, sd), _round(shift, sd), _round(bias, sd)
    xd = _dev(ks.device, xq, dtype)
    if layout == "noncontiguous":
        xd = _dev(ks.device, xq.transpose(2, 3).contiguous(), dtype).transpose(2, 3)
    dwd, pwd, msd, mshd = [_dev(ks.device, t, d) for t, d in ((dwq, dtype), (pwq, dtype), (msq, sd), (mshq, sd))]
    if layout == "unaligned":
        xd, dwd, pwd = _unaligned(xd, torch.channels_last), _unaligned(dwd), _unaligned(pwd)
    scd, shd, bd = [_dev(ks.device, t, sd) for t in (scq, shq, bq)]
    e_d, e_r = xd.new_empty(0), xq.new_empty(0)
    args_d = (xd, _absent(dwd, e_d), dil, _absent(msd, e_d), _absent(mshd, e_d), mid_act, pwd, scd, shd, bd, act)

    out = ks.op("separable_conv")(*args_d, stats)
    _sync(ks)
    ref = torch_backend.separable_conv(xq, dwq, dil, msq, mshq, mid_act, pwq, scq, shq, bq, act, stats)
    # The CPU backend's kernel in the same dtypes, for the output conventions.
    conv_args = (xq.to(dtype), [t.to(dtype) for t in _absent(dwq, e_r)], dil,
                 [t.to(sd) for t in _absent(msq, e_r)], [t.to(sd) for t in _absent(mshq, e_r)], mid_act,
                 [t.to(dtype) for t in pwq], scq.to(sd), shq.to(sd), None if bq is None else bq.to(sd), act)
    conv = CONV.separable_conv(*conv_args, stats)
    pt = None
    if dtype in LOW:
        with _pytorch_path(ks.device):
            pt = torch_backend.separable_conv(xd, dwd, dil, msd, mshd, mid_act, pwd, scd, shd, bd, act, stats)
    for i, name in enumerate(["out", "ch_sum", "ch_sumsq"]):
        _same_conventions(out[i], conv[i], name)
        _check(name, out[i], ref[i], dtype, None if pt is None else pt[i])
    if x.shape[0] * x.shape[2] * x.shape[3] == 0:
        return

    go, gs, gss, goq, gsq, gssq = _upstream_grads(ref[0], stats, dtype)
    mask = list(mask)
    bw = _autograd.separable_conv_backward(ks.primitives(), _dev(ks.device, goq, dtype), _dev(ks.device, gsq, sd),
                                           _dev(ks.device, gssq, sd), out[0], *args_d[:10], act, mask)
    _sync(ks)
    bconv = _autograd.separable_conv_backward(_autograd.primitives(CONV), goq.to(dtype), _to(gsq, sd), _to(gssq, sd),
                                              conv[0], *conv_args[:10], act, mask)

    def torch_grads(args, dt):
        return _torch_grads(
            lambda a: torch_backend.separable_conv(a[0], a[1], dil, a[2], a[3], mid_act, a[4], a[5], a[6], a[7], act,
                                                   stats), args, goq, gsq, gssq, dt)

    bref = torch_grads([xq, dwq, msq, mshq, pwq, scq, shq, bq], F64)  # the reference, in the op's output order
    ptg = torch_grads([xd, dwd, msd, mshd, pwd, scd, shd, bd], dtype) if dtype in LOW and compare_backward else None
    names = ["grad_x", "grad_dw", "grad_mid_scale", "grad_mid_shift", "grad_pw", "grad_scale", "grad_shift",
             "grad_bias"]
    for i, name in enumerate(names):
        entries = list(zip(bw[i], bref[i], bconv[i])) if isinstance(bw[i], (list, tuple)) else \
            [(bw[i], bref[i], bconv[i])]
        if isinstance(bw[i], (list, tuple)):
            assert len(bw[i]) == len(bconv[i]), name
        for j, (o, r, c) in enumerate(entries):
            what = "%s[%d]" % (name, j) if isinstance(bw[i], (list, tuple)) else name
            _same_conventions(o, c, what)
            if not o.numel():
                continue
            if not compare_backward:
                assert torch.isfinite(o).all(), what
                continue
            p = None
            if ptg is not None:
                p = ptg[i][j] if isinstance(bw[i], (list, tuple)) else ptg[i]
            _check(what, o, r, dtype, p)


SEP_BRANCHES = (("plain", 8, 1), ("dw", 8, 2), ("mid", 8, 12))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 16, 9, 11), (1, 20, 25, 30), (2, 3, 5, 7)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mid_act", [0, 1], ids=["midnone", "midrelu"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("ks", ALL_SETS)
def test_separable_conv(ks, dtype, shape, mid_act, train):
    _runs(ks, dtype, large=shape[1:] == (20, 25, 30))
    n, c, h, w = shape
    prob = separable_problem(n, c, h, w, SEP_BRANCHES, bias=not train)
    _separable_case(ks, prob, dtype, mid_act, act=0 if train else 1, stats=train)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ks", ALL_SETS)
def test_separable_conv_noncontiguous_awkward_and_all_plain(ks, dtype):
    _runs(ks, dtype)
    prob = separable_problem(2, 7, 6, 13, (("mid", 5, 1), ("dw", 3, 40), ("plain", 6, 1)))
    _separable_case(ks, prob, dtype, 1, 1, True, layout="noncontiguous")
    prob = separable_problem(2, 16, 9, 11, (("plain", 8, 1), ("plain", 4, 1)))
    _separable_case(ks, prob, dtype, 1, 1, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ks", ALL_SETS)
def test_separable_conv_unaligned_storage(ks, dtype):
    """x, depthwise and pointwise weights that start mid-allocation; C = 16 fills whole 16-byte
    rows, so the backward's pointwise GEMM would read the caller's pointwise weights in place."""
    _runs(ks, dtype)
    prob = separable_problem(2, 16, 9, 11, SEP_BRANCHES)
    _separable_case(ks, prob, dtype, 1, 1, True, layout="unaligned")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ks", ALL_SETS)
def test_separable_conv_multiple_blocks(ks, dtype):
    """C = 72 (several K steps, partial last), O_b = 136 (several column blocks), two tiles."""
    _runs(ks, dtype, large=True)
    prob = separable_problem(1, 72, 12, 13, (("plain", 136, 1), ("mid", 136, 2)))
    _separable_case(ks, prob, dtype, 1, 1, True)


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, False, False)], ids=["input", "weights", "epilogue", "none"])
@pytest.mark.parametrize("ks", ALL_SETS)
def test_separable_conv_backward_masks(ks, mask):
    prob = separable_problem(2, 8, 7, 9, SEP_BRANCHES)
    _separable_case(ks, prob, torch.float32, 1, 1, True, mask=mask)


@pytest.mark.parametrize("n", [0, 1])
@pytest.mark.parametrize("ks", ALL_SETS)
def test_separable_conv_batch_0_and_1(ks, n):
    prob = separable_problem(n, 8, 7, 9, SEP_BRANCHES)
    _separable_case(ks, prob, torch.float32, 1, 1, True)


@pytest.mark.parametrize("ks", ALL_SETS)
def test_separable_conv_more_branches_than_one_launch(ks):
    _runs(ks, F64)
    branches = tuple((("plain", "dw", "mid")[i % 3], 4, 1 + i) for i in range(10))
    prob = separable_problem(1, 8, 7, 6, branches)
    _separable_case(ks, prob, F64, 1, 1, True)


@pytest.mark.parametrize("ks", TF32_SETS)
def test_separable_conv_tf32(ks):
    torch.backends.cudnn.allow_tf32 = True
    prob = separable_problem(2, 32, 9, 11, SEP_BRANCHES)
    _separable_case(ks, prob, torch.float32, 1, 1, True)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("ks", COMPILED_SETS)
def test_errors_name_the_argument(ks):
    x = torch.randn(2, 4, 5, 5, device=ks.device)
    w = [torch.randn(3, 4, 3, 3, device=ks.device)]
    s, t = torch.ones(3, device=ks.device), torch.zeros(3, device=ks.device)
    with pytest.raises(ValueError, match="dilations\\[0\\]"):
        ks.op("atrous_conv")(x, w, [0], s, t, None, False, 1, False)
    with pytest.raises(ValueError, match="weights\\[0\\] has 5 input channels"):
        ks.op("atrous_conv")(x, [torch.randn(3, 5, 3, 3, device=ks.device)], [1], s, t, None, False, 1, False)
    with pytest.raises(TypeError, match="weights\\[0\\] has dtype"):
        ks.op("atrous_conv")(x, [w[0].double()], [1], s, t, None, False, 1, False)
    if ks.device == "cuda":
        with pytest.raises(RuntimeError, match="scale is on cpu"):
            ks.op("atrous_conv")(x, w, [1], s.cpu(), t, None, False, 1, False)
    e = x.new_empty(0)
    with pytest.raises(ValueError, match="mid_scales\\[0\\] is given but dw_weights\\[0\\] is None"):
        ks.op("separable_conv")(x, [e], [1], [torch.ones(4, device=ks.device)], [torch.zeros(4, device=ks.device)], 1,
                                [torch.randn(3, 4, 1, 1, device=ks.device)], s, t, None, 1, False)


# --------------------------------------------------------------------------- docs/DESIGN.md standard case


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("ks", STANDARD_SETS)
@pytest.mark.skipif(SANITIZED, reason="standard-size case: not under the sanitizer (ASPP_CUDA_TEST_SMALL)")
def test_standard_aspp_v3_os16(ks, dtype):
    """batch 16, C=2048, 33x33, rates 6/12/18, 4 branches of 256, against torch_backend: the fused
    CUDA op vs float64 torch_backend, within 2x of torch_backend in dtype (fp32: TF32 off, 1e-5)."""
    g = torch.Generator(device=ks.device).manual_seed(0)
    n, c, hw = 16, 2048, 33
    branches = [(1, 256, 1)] + [(3, 256, r) for r in (6, 12, 18)]
    x = torch.randn(n, c, hw, hw, device=ks.device, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    ws = [(torch.randn(o, c, k, k, device=ks.device, generator=g) / (c * k * k) ** 0.5).to(dtype)
          for k, o, _ in branches]
    dil = [d for _, _, d in branches]
    scale = torch.rand(1024, device=ks.device, generator=g) + 0.5
    shift = torch.randn(1024, device=ks.device, generator=g)
    bias = torch.randn(n, 1024, device=ks.device, generator=g)

    def f64(t):
        return [v.double() for v in t] if isinstance(t, list) else t.double()

    for act, stats, b in ((1, False, bias), (0, True, None)):
        ours = ks.op("atrous_conv")(x, ws, dil, scale, shift, b, False, act, stats)
        exact = torch_backend.atrous_conv(f64(x), f64(ws), dil, f64(scale), f64(shift),
                                          None if b is None else f64(b), False, act, stats)
        pytorch = torch_backend.atrous_conv(x, ws, dil, scale, shift, b, False, act, stats)
        for i in range(3 if stats else 1):
            err, p_err = rel_err(ours[i], exact[i]), rel_err(pytorch[i], exact[i])
            limit = 1e-5 if dtype == torch.float32 else 2 * p_err
            assert err <= limit, (act, stats, i, err, limit)

    # Backward of the train-mode op (batch 4 bounds the float64 reference's cost).
    xs = x[:4]
    out, s, ss = ks.op("atrous_conv")(xs, ws, dil, scale, shift, None, False, 1, True)
    go = (torch.rand(out.shape, device=ks.device, generator=g) + 0.5).to(dtype)
    gss = torch.randn(1024, device=ks.device, generator=g) / out.numel()
    ours = _autograd.atrous_conv_backward(ks.primitives(), go, None, gss, out, xs, ws, dil, scale, shift, None, False,
                                          1, [True, True, True])
    exact = _torch_grads(lambda a: torch_backend.atrous_conv(a[0], a[1], dil, a[2], a[3], None, False, 1, True),
                         [f64(xs), f64(ws), f64(scale), f64(shift)], go.double().cpu(), torch.zeros(1024, dtype=F64),
                         gss.double().cpu(), F64)
    pytorch = _torch_grads(lambda a: torch_backend.atrous_conv(a[0], a[1], dil, a[2], a[3], None, False, 1, True),
                           [xs, ws, scale, shift], go.double().cpu(), torch.zeros(1024, dtype=F64), gss.double().cpu(),
                           dtype)
    pairs = [(ours[0], exact[0], pytorch[0])] + list(zip(ours[1], exact[1], pytorch[1]))
    pairs += [(ours[2], exact[2], pytorch[2]), (ours[3], exact[3], pytorch[3])]
    for i, (o, e, p) in enumerate(pairs):
        err, p_err = rel_err(o, e), rel_err(p, e)
        limit = 1e-5 if dtype == torch.float32 else 2 * p_err
        assert err <= limit, ("backward", i, err, limit)
