"""Fuzz at scale: random configurations of both ops and of the fused modules against the reference.

The reference is the float64 ``torch`` backend (for the ``torch`` backend's own float64 runs:
the kernels' pure-torch statements ``*_ref``, plain F.conv2d with no tap dropping or BN
folding). Each case is drawn by its own seeded generator, ``random.Random(seed)``; the test id
is the seed and every assertion message starts with the drawn configuration, so a failure
reruns alone with ``-k "<test>[<backend>-<seed>]"``.

Every case draws: batch (0, 1, 2, 3), odd and 1-pixel map sides, channel counts that are not
multiples of 8, 1-4 branches with rates at and beyond the map size, an input layout (NCHW,
channels_last, transposed, sliced from a larger tensor, spatially strided, sliced
channels_last), which leaves need a gradient (so every backward output_mask occurs), and
scale / shift present or None; the act / stats / bias / sum_mode (atrous) and mid_act / act /
stats / bias (separable) combination cycles with the seed, so every one of the 16 occurs in
every 16 consecutive cases. Checked: outputs, batch statistics and every gradient of a loss on
all three outputs. Tolerance (DESIGN.md): float32 against the float64 reference 1e-5
norm-relative, float64 1e-10 (tests/conftest.rel_err).

Counts (per op): in CI 500 for ``cpp`` (CPU kernels) and ``torch``, 60 for ``triton`` under the
interpreter, 120 module cases for ``torch`` / ``cpp`` and 12 for ``triton``; ``make fuzz``
(``--run-slow``) raises every count to 500. The CUDA kernels' fuzz (30 per op in CI, 500 with
``--run-slow``) is ``gpu``-marked: it runs on a GPU, or on the host emulator of the kernels
in ``make emu-test`` (tools/cuda_emu/run_tests.sh).
"""
import copy
import os
import random

import pytest
import torch

import aspp_fused.nn as ann
from aspp_fused import _extension
from aspp_fused import functional as AF
from conftest import randomize_bn, rel_err

F64 = torch.float64
TOL = {torch.float32: 1e-5, F64: 1e-10}

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
EMU_LIB = os.environ.get("ASPP_CUDA_EMU_LIB")

# (CI count, count with --run-slow) per backend and test family.
OP_COUNTS = {"torch": (500, 500), "cpp": (500, 500), "triton": (60, 500), "cuda": (30, 500)}
MODULE_COUNTS = {"torch": (120, 500), "cpp": (120, 500), "triton": (12, 500)}


def _triton_ok():
    if not (CUDA or INTERPRET):
        return False, "neither CUDA nor TRITON_INTERPRET=1"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return False, "triton not importable: %s" % exc
    return True, ""


def _backend_marks(backend):
    if backend == "cpp":
        return [pytest.mark.skipif(not _extension.cpp_available(), reason="aspp_fused._C not built")]
    if backend == "triton":
        ok, why = _triton_ok()
        return [pytest.mark.skipif(not ok, reason=why)]
    return []


def _seeds(backends, counts):
    """pytest params (backend, seed): the CI count, then the rest up to the slow count marked slow."""
    params = []
    for be in backends:
        ci, full = counts[be]
        for seed in range(full):
            marks = _backend_marks(be) + ([pytest.mark.slow] if seed >= ci else [])
            params.append(pytest.param(be, seed, marks=marks, id="%s-%d" % (be, seed)))
    return params


# --------------------------------------------------------------------------- drawing a case

LAYOUTS = ("nchw", "channels_last", "transposed", "sliced", "strided", "channels_last_sliced")


def _side(rng, hi):
    """A map side: 1 a fifth of the time, else 2..hi (odd ones as often as even)."""
    return 1 if rng.random() < 0.2 else rng.randint(2, hi)


def _rate(rng, h, w):
    """An atrous rate: a third of the time at or beyond a map side (taps outside the image)."""
    if rng.random() < 1 / 3:
        return rng.choice([h, w, max(h, w), max(h, w) + rng.randint(1, 6)])
    return rng.randint(1, max(h, w, 2))


CHANNELS = (1, 2, 3, 5, 7, 8, 9, 12, 13, 16, 17, 20)  # mostly not multiples of 8


def _channels(rng, hi):
    return rng.choice([c for c in CHANNELS if c <= hi])


def _make_input(shape, dtype, layout, gen, device):
    """A [N, C, H, W] tensor of dtype on device in the given memory layout (values from gen)."""
    n, c, h, w = shape

    def base(*size, channels_last=False):
        t = torch.randn(*size, generator=gen, dtype=F64).to(device=device, dtype=dtype)
        return t.contiguous(memory_format=torch.channels_last) if channels_last else t

    if layout == "nchw":
        return base(n, c, h, w)
    if layout == "channels_last":
        return base(n, c, h, w, channels_last=True)
    if layout == "transposed":
        return base(n, c, w, h).transpose(2, 3)
    if layout == "sliced":  # a view with an offset and padded strides
        return base(n + 1, c + 2, h + 3, w + 2)[1:, 1:c + 1, 2:h + 2, 1:w + 1]
    if layout == "strided":
        return base(n, c, 2 * h, 2 * w)[:, :, ::2, ::2]
    return base(n, c + 3, h, w, channels_last=True)[:, 2:c + 2]  # channels_last storage, a channel slice


ATROUS_COMBOS = [(act, stats, bias, sm) for act in (0, 1) for stats in (False, True) for bias in (False, True)
                 for sm in (False, True)]
SEP_COMBOS = [(ma, act, stats, bias) for ma in (0, 1) for act in (0, 1) for stats in (False, True)
              for bias in (False, True)]


def draw_atrous(seed, small):
    """(description, builder) of one atrous_conv case; small: the interpreter / emulator sizes."""
    rng = random.Random(seed)
    act, stats, bias, sum_mode = ATROUS_COMBOS[seed % 16]
    n = rng.choice([0, 1, 1, 2, 2, 3])
    h, w = _side(rng, 9 if small else 13), _side(rng, 9 if small else 13)
    c = _channels(rng, 20)
    nb = rng.randint(1, 4)
    ob = rng.randint(1, 6)
    branches = [(rng.choice([1, 3]), ob if sum_mode else rng.randint(1, 6), _rate(rng, h, w)) for _ in range(nb)]
    cfg = dict(n=n, c=c, h=h, w=w, branches=branches, sum_mode=sum_mode, act=act, stats=stats, bias=bias,
               layout=rng.choice(LAYOUTS), no_affine=rng.random() < 0.1,
               grads=[rng.random() < 0.7 for _ in range(5)])  # x, weights, scale, shift, bias
    return cfg


def draw_separable(seed, small):
    rng = random.Random(10 ** 6 + seed)
    mid_act, act, stats, bias = SEP_COMBOS[seed % 16]
    n = rng.choice([0, 1, 1, 2, 2, 3])
    h, w = _side(rng, 9 if small else 13), _side(rng, 9 if small else 13)
    c = _channels(rng, 20)
    nb = rng.randint(1, 4)
    branches = [(rng.choice(["plain", "dw", "mid"]), rng.randint(1, 6), _rate(rng, h, w)) for _ in range(nb)]
    return dict(n=n, c=c, h=h, w=w, branches=branches, mid_act=mid_act, act=act, stats=stats, bias=bias,
                layout=rng.choice(LAYOUTS), no_affine=rng.random() < 0.1,
                grads=[rng.random() < 0.7 for _ in range(6)])  # x, dw, mid (scale+shift), pw, scale/shift, bias


def _requires(t, flag):
    return t.requires_grad_(True) if (t is not None and flag) else t


def build_atrous(cfg, seed, dtype, device):
    """The op's arguments in dtype on device (leaves flagged for grad), and their float64 CPU twins."""
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = cfg["n"], cfg["c"], cfg["h"], cfg["w"]
    x = _make_input((n, c, h, w), dtype, cfg["layout"], gen, device)
    ws = [(torch.randn(o, c, k, k, generator=gen, dtype=F64) / (c * k * k) ** 0.5) for k, o, _ in cfg["branches"]]
    o = cfg["branches"][0][1] if cfg["sum_mode"] else sum(b[1] for b in cfg["branches"])
    sd = F64 if dtype == F64 else torch.float32
    scale = torch.rand(o, generator=gen, dtype=F64) + 0.5
    shift = torch.randn(o, generator=gen, dtype=F64)
    b = torch.randn(n, o, generator=gen, dtype=F64) if cfg["bias"] else None
    if cfg["no_affine"]:
        scale = shift = None
    gx, gw, gs, gt, gb = cfg["grads"]

    def dev(t, dt):
        return None if t is None else t.to(device=device, dtype=dt)

    args = [_requires(x.detach(), gx), [_requires(dev(t, dtype), gw) for t in ws], [d for _, _, d in cfg["branches"]],
            _requires(dev(scale, sd), gs), _requires(dev(shift, sd), gt), _requires(dev(b, sd), gb)]
    return args


def build_separable(cfg, seed, dtype, device):
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = cfg["n"], cfg["c"], cfg["h"], cfg["w"]
    x = _make_input((n, c, h, w), dtype, cfg["layout"], gen, device)
    sd = F64 if dtype == F64 else torch.float32
    gx, gdw, gmid, gpw, gaff, gb = cfg["grads"]
    dw, ms, msh, pw, dil = [], [], [], [], []
    for kind, o, d in cfg["branches"]:
        dw.append(None if kind == "plain" else
                  _requires((torch.randn(c, 1, 3, 3, generator=gen, dtype=F64) / 3).to(device, dtype), gdw))
        ms.append(_requires((torch.rand(c, generator=gen, dtype=F64) + 0.5).to(device, sd), gmid) if kind == "mid"
                  else None)
        msh.append(_requires(torch.randn(c, generator=gen, dtype=F64).to(device, sd), gmid) if kind == "mid"
                   else None)
        pw.append(_requires((torch.randn(o, c, 1, 1, generator=gen, dtype=F64) / c ** 0.5).to(device, dtype), gpw))
        dil.append(d)
    o = sum(b[1] for b in cfg["branches"])
    scale = _requires((torch.rand(o, generator=gen, dtype=F64) + 0.5).to(device, sd), gaff)
    shift = _requires(torch.randn(o, generator=gen, dtype=F64).to(device, sd), gaff)
    if cfg["no_affine"]:
        scale = shift = None
    b = _requires(torch.randn(n, o, generator=gen, dtype=F64).to(device, sd), gb) if cfg["bias"] else None
    return [_requires(x.detach(), gx), dw, dil, ms, msh, pw, scale, shift, b]


# --------------------------------------------------------------------------- comparing


def _map(args, fn):
    def one(t):
        return fn(t) if isinstance(t, torch.Tensor) else t

    return [[one(t) for t in a] if isinstance(a, list) else one(a) for a in args]


def _leaves(args):
    out = []
    for a in args:
        out += [t for t in (a if isinstance(a, list) else [a]) if isinstance(t, torch.Tensor) and t.requires_grad]
    return out


def _to_reference(args):
    """float64 CPU copies with the same requires_grad flags."""
    return _map(args, lambda t: t.detach().to(device="cpu", dtype=F64).requires_grad_(t.requires_grad))


def _close(what, actual, expected, tol, cfg):
    assert actual.shape == expected.shape, "%s: %s shape %s, expected %s" % (cfg, what, tuple(actual.shape),
                                                                             tuple(expected.shape))
    err = rel_err(actual.detach().cpu(), expected.detach())
    assert err <= tol, "%s\n%s: relative error %.3g > %.3g" % (cfg, what, err, tol)


def check_op(run, run_ref, args, ref_args, cfg, dtype, seed):
    """run(args) / run_ref(ref_args) -> (out, ch_sum, ch_sumsq): outputs and every gradient."""
    tol = TOL[dtype]
    out = run(args)
    ref = run_ref(ref_args)
    assert out[0].dtype == dtype, cfg
    for name, a, r in zip(("out", "ch_sum", "ch_sumsq"), out, ref):
        _close(name, a, r, tol, cfg)
    leaves, ref_leaves = _leaves(args), _leaves(ref_args)
    if not leaves:
        return
    gen = torch.Generator().manual_seed(seed + 1)
    g0 = torch.rand(ref[0].shape, generator=gen, dtype=F64) + 0.5  # not summing to ~0 (grad_shift)
    loss_r = (ref[0] * g0).sum()
    dev = out[0].device
    loss = (out[0].double() * g0.to(dev)).sum()
    if cfg["stats"]:
        g1 = torch.randn(ref[1].shape, generator=gen, dtype=F64)
        g2 = torch.randn(ref[2].shape, generator=gen, dtype=F64) / max(ref[0].numel(), 1)
        loss = loss + (out[1].double() * g1.to(dev)).sum() + (out[2].double() * g2.to(dev)).sum()
        loss_r = loss_r + (ref[1] * g1).sum() + (ref[2] * g2).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads_r = torch.autograd.grad(loss_r, ref_leaves, allow_unused=True)
    for i, (g, gr, leaf) in enumerate(zip(grads, grads_r, leaves)):
        if gr is None:
            gr = torch.zeros(leaf.shape, dtype=F64)
        assert g is not None, "%s\ngrad of leaf %d is None" % (cfg, i)
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, "%s\ngrad of leaf %d: %s %s" % (cfg, i, g.dtype,
                                                                                               tuple(g.shape))
        _close("grad of leaf %d %s" % (i, tuple(leaf.shape)), g, gr, tol, cfg)


def _atrous_fn(cfg, backend):
    return lambda a: AF.atrous_conv(*a, sum_mode=cfg["sum_mode"], act=cfg["act"], compute_stats=cfg["stats"],
                                    backend=backend)


def _separable_fn(cfg, backend):
    return lambda a: AF.separable_conv(*a[:5], cfg["mid_act"], *a[5:], act=cfg["act"], compute_stats=cfg["stats"],
                                       backend=backend)


def _atrous_ref_statement(cfg):
    """The kernels' pure-torch statement of the op (F.conv2d, no tap dropping, no folding)."""
    from aspp_fused.kernels.atrous_conv import atrous_conv_ref

    def run(a):
        x, ws, d, s, t, b = a
        o = ws[0].shape[0] if cfg["sum_mode"] else sum(w.shape[0] for w in ws)
        s = torch.ones(o, dtype=F64) if s is None else s
        t = torch.zeros(o, dtype=F64) if t is None else t
        return atrous_conv_ref(x, ws, d, s, t, b, cfg["sum_mode"], cfg["act"], cfg["stats"])

    return run


def _separable_ref_statement(cfg):
    from aspp_fused.kernels.separable_conv import separable_conv_ref

    def run(a):
        x, dw, d, ms, msh, pw, s, t, b = a
        o = sum(w.shape[0] for w in pw)
        s = torch.ones(o, dtype=F64) if s is None else s
        t = torch.zeros(o, dtype=F64) if t is None else t
        return separable_conv_ref(x, dw, d, ms, msh, cfg["mid_act"], pw, s, t, b, cfg["act"], cfg["stats"])

    return run


def _dtype_for(backend, seed):
    """cpp and torch alternate float32 / float64; triton and the CUDA kernels' fuzz use float32
    (the CUDA kernels: float64 every fourth case)."""
    if backend in ("cpp", "torch"):
        return F64 if seed % 2 else torch.float32
    if backend == "cuda":
        return F64 if seed % 4 == 3 else torch.float32
    return torch.float32


def _no_tf32():
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    return prev


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 parity is to 1e-5: the kernels follow cudnn.allow_tf32, so switch it off."""
    prev = _no_tf32()
    yield
    torch.backends.cudnn.allow_tf32 = prev


@pytest.mark.parametrize("backend,seed", _seeds(("torch", "cpp", "triton"), OP_COUNTS))
def test_fuzz_atrous_conv(backend, seed):
    small = backend == "triton"
    cfg = draw_atrous(seed, small)
    dtype = _dtype_for(backend, seed)
    device = "cuda" if (backend == "triton" and CUDA) else "cpu"
    args = build_atrous(cfg, seed, dtype, device)
    ref_args = _to_reference(args)
    desc = "atrous_conv backend=%s dtype=%s seed=%d %s" % (backend, dtype, seed, cfg)
    run_ref = _atrous_ref_statement(cfg) if (backend == "torch" and dtype == F64) else _atrous_fn(cfg, "torch")
    check_op(_atrous_fn(cfg, backend), run_ref, args, ref_args, _Desc(desc, cfg), dtype, seed)


@pytest.mark.parametrize("backend,seed", _seeds(("torch", "cpp", "triton"), OP_COUNTS))
def test_fuzz_separable_conv(backend, seed):
    small = backend == "triton"
    cfg = draw_separable(seed, small)
    dtype = _dtype_for(backend, seed)
    device = "cuda" if (backend == "triton" and CUDA) else "cpu"
    args = build_separable(cfg, seed, dtype, device)
    ref_args = _to_reference(args)
    desc = "separable_conv backend=%s dtype=%s seed=%d %s" % (backend, dtype, seed, cfg)
    run_ref = _separable_ref_statement(cfg) if (backend == "torch" and dtype == F64) else _separable_fn(cfg, "torch")
    check_op(_separable_fn(cfg, backend), run_ref, args, ref_args, _Desc(desc, cfg), dtype, seed)


class _Desc(dict):
    """The drawn configuration (a dict, for check_op) that prints as the full case description."""

    def __init__(self, text, cfg):
        super().__init__(cfg)
        self.text = text

    def __str__(self):
        return self.text

    __repr__ = __str__
