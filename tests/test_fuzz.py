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
all three outputs. Tolerance (docs/DESIGN.md): float32 against the float64 reference 1e-5
norm-relative, float64 1e-10 (tests/conftest.rel_err).

Counts (per op): in CI 500 for ``cpp`` (CPU kernels) and ``torch``, 60 for ``triton`` under the
interpreter; the fused-module-vs-twin fuzz 200 for ``torch`` and ``cpp`` (500 per backend with
``--run-slow``: ``make fuzz``, see MODULE_COUNTS), which also raises every op count to 500. The CUDA kernels' fuzz (30 per op in CI, 500 with
``--run-slow``) is ``gpu``-marked: it runs on a GPU, or on the host emulator of the kernels
in ``make emu-test`` (tools/cuda_emu/run_tests.sh).
"""
import copy
import os
import random

import pytest
import torch

import aspp_fused.nn as ann
from aspp_fused import _autograd, _extension
from aspp_fused import functional as AF
from conftest import map_tensors, randomize_bn, rel_err, tensors_of

F64 = torch.float64
TOL = {torch.float32: 1e-5, F64: 1e-10}

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
EMU_LIB = os.environ.get("ASPP_CUDA_EMU_LIB")

pytestmark = pytest.mark.usefixtures("no_tf32")  # conftest: the exact fp32 path (tests that want TF32 set it)

# (CI count, count with --run-slow) per backend and test family.
OP_COUNTS = {"torch": (500, 500), "cpp": (500, 500), "triton": (60, 500), "cuda": (30, 500)}
# The module fuzz: about 50 ms a case for torch / cpp, 1 s for triton under the interpreter.
# Train-mode batch statistics centre on the batch mean computed from box sums of the input
# (aspp_fused/nn/_batchnorm.conv_batch_mean); centred on the running mean, as before, 62 of
# 1000 torch + cpp cases missed the tolerance (batch mean 2-450 standard deviations from the
# centre); then 1 of 1000 (torch seed 465: 1.6e-5 on the BN weight gradient of a 1-channel
# branch, twin 1.8e-6), where the BN backward composed through autograd from the op's
# statistics rounded worse than ATen's. The train-mode BN now has BatchNorm's closed-form
# backward (_batchnorm.batch_norm_act): 465 passes, and 1 of 1000 still misses, cpp seed 429:
# 2.0e-5 against 1.3e-5 on the weight gradient of the pooling branch's BN (1 channel, batch 4).
# That gradient is a 4-term sum g . xhat cancelling 12x; its error comes from the upstream
# gradient g (the projection's per-sample bias gradient: 9.4e-7 relative, twin 3.8e-7), not
# from the BN step. Triton stays out of CI until its misses are understood: 4 of 500 (seeds 2,
# 231, 351, 423), all the BN weight gradient of a 1-channel branch, the same cancelling kind:
# at seed 2 sum |g * xhat| is 218x the result, and the upstream gradient's error, 4.5e-7
# (torch backend: 2.4e-7), alone makes 6.6e-5 of the 7.1e-5 miss (tolerance 1.3e-5).
MODULE_COUNTS = {"torch": (200, 500), "cpp": (200, 500), "triton": (0, 500)}


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
    """The drawn configuration of atrous_conv case `seed`; small: map sides up to 9 (interpreter,
    emulator) instead of 13."""
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
    """The drawn configuration of separable_conv case `seed` (as draw_atrous)."""
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


def _leaves(args):
    return [t for t in tensors_of(args) if t.requires_grad]


def _to_reference(args):
    """float64 CPU copies with the same requires_grad flags."""
    return map_tensors(args, lambda t: t.detach().to(device="cpu", dtype=F64).requires_grad_(t.requires_grad))


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


def _f64_oracle(statement, fn, cfg):
    """The torch backend in float64 is the reference itself, so it is checked against another
    implementation: the kernels' pure-torch ``*_ref`` statements (they live beside the Triton
    kernels, so they need triton importable), else the CPU kernels of csrc/cpu in float64."""
    try:
        import triton  # noqa: F401
    except ImportError:
        if not _extension.cpp_available():
            pytest.skip("no second float64 implementation here: triton (the *_ref statements) and "
                        "aspp_fused._C both missing")
        return fn(cfg, "cpp")
    return statement(cfg)


def _fuzz_op(op, backend, seed):
    """One drawn case of ``op`` on ``backend`` against the torch backend (float64: the statement)."""
    draw, build, fn, statement = {"atrous_conv": (draw_atrous, build_atrous, _atrous_fn, _atrous_ref_statement),
                                  "separable_conv": (draw_separable, build_separable, _separable_fn,
                                                     _separable_ref_statement)}[op]
    cfg = draw(seed, backend == "triton")
    dtype = _dtype_for(backend, seed)
    device = "cuda" if (backend == "triton" and CUDA) else "cpu"
    args = build(cfg, seed, dtype, device)
    ref_args = _to_reference(args)
    desc = "%s backend=%s dtype=%s seed=%d %s" % (op, backend, dtype, seed, cfg)
    run_ref = _f64_oracle(statement, fn, cfg) if (backend == "torch" and dtype == F64) else fn(cfg, "torch")
    check_op(fn(cfg, backend), run_ref, args, ref_args, _Desc(desc, cfg), dtype, seed)


@pytest.mark.parametrize("backend,seed", _seeds(("torch", "cpp", "triton"), OP_COUNTS))
def test_fuzz_atrous_conv(backend, seed):
    _fuzz_op("atrous_conv", backend, seed)


@pytest.mark.parametrize("backend,seed", _seeds(("torch", "cpp", "triton"), OP_COUNTS))
def test_fuzz_separable_conv(backend, seed):
    _fuzz_op("separable_conv", backend, seed)


class _Desc(dict):
    """The drawn configuration (a dict, for check_op) that prints as the full case description."""

    def __init__(self, text, cfg):
        super().__init__(cfg)
        self.text = text

    def __str__(self):
        return self.text

    __repr__ = __str__


# --------------------------------------------------------------------------- fused modules vs twins

# Module kinds and their fused classes. deeplab_head (a fixed 256-channel 3x3 conv after the
# ASPP) is left to the compiled backends: under the Triton interpreter one case takes minutes.
MODULE_KINDS = ("cbr", "sep", "aspp", "sep_aspp", "aspp_v2", "lraspp", "deeplab_head")
FUSED_CLASS = {"cbr": ann.FusedAtrousConvBNReLU, "sep": ann.FusedSeparableAtrousConv, "aspp": ann.FusedASPP,
               "sep_aspp": ann.FusedSeparableASPP, "aspp_v2": ann.FusedASPPv2, "lraspp": ann.FusedLRASPPHead,
               "deeplab_head": ann.FusedDeepLabHead}


def draw_module(seed, backend):
    rng = random.Random(2 * 10 ** 6 + seed)
    kinds = MODULE_KINDS[:-1] if backend == "triton" else MODULE_KINDS
    kind = kinds[seed % len(kinds)]
    train = rng.random() < 0.75
    h, w = _side(rng, 9 if backend == "triton" else 11), _side(rng, 9 if backend == "triton" else 11)
    mid = kind in ("sep", "sep_aspp") and rng.random() < 0.5
    if mid and train and max(h, w) < 2:
        w = 2
    pooled = kind in ("aspp", "sep_aspp", "deeplab_head")
    if train and pooled:
        # The image-pooling BN normalises N values: N = 2 gives exactly +-1 whatever the input
        # (an identically zero input gradient, in fp32 rounding noise, the twin's too); N = 1 raises.
        n = rng.choice([3, 4])
    elif train:
        n = rng.choice([1, 2, 3])
        while n * h * w < 3:  # a BN over 1 value raises, over 2 it is the same +-1 degenerate case
            n += 1
    else:
        n = rng.choice([0, 1, 2, 3])

    def rate():
        if mid and train:
            # A training mid BN after a depthwise conv of which only the centre tap meets the
            # image is invariant to that tap's weight: its exact gradient is 0 (test_modules).
            return rng.randint(1, max(h, w) - 1)
        return _rate(rng, h, w)

    c = _channels(rng, 17)
    if train and c == 1:
        # Every kind has a 1x1 conv (or pointwise) of the input before a training BN; with one
        # input channel its weight is a per-output scalar that the BN divides out, so its exact
        # gradient is 0 up to the eps term, and relative errors compare rounding noise (PyTorch's
        # own fp32 path misses 1e-5 there too). One input channel is drawn in eval mode.
        c = 2
    return dict(kind=kind, train=train, n=n, h=h, w=w, c=c, o=rng.randint(1, 7), mid=mid,
                rates=[rate() for _ in range(rng.randint(1, 3))], layout=rng.choice(LAYOUTS),
                k=rng.choice([1, 3]))


def build_twin(cfg):
    kind, c, o, rates = cfg["kind"], cfg["c"], cfg["o"], cfg["rates"]
    if kind == "cbr":
        return ann.AtrousConvBNReLU(c, o, cfg["k"], rates[0] if cfg["k"] == 3 else 1)
    if kind == "sep":
        return ann.SeparableAtrousConv(c, o, rates[0], mid_norm=cfg["mid"])
    if kind == "aspp":
        return ann.ASPP(c, rates, out_channels=o)
    if kind == "sep_aspp":
        return ann.SeparableASPP(c, o, rates, mid_norm=cfg["mid"])
    if kind == "aspp_v2":
        m = ann.ASPPv2(c, o, rates)
        with torch.no_grad():  # the DeepLab v2 init (std 0.01, zero bias) makes outputs tiny
            for conv in m.convs:
                conv.weight.normal_()
                conv.bias.normal_()
        return m
    if kind == "lraspp":
        return ann.LRASPPHead(max(1, c // 2), c, o, _lraspp_inter(cfg))
    return ann.DeepLabHead(c, o, rates)


def _lraspp_inter(cfg):
    return 1 + (cfg["c"] + cfg["o"]) % 6  # inter_channels 1..6


def _module_input(cfg, gen):
    n, c, h, w = cfg["n"], cfg["c"], cfg["h"], cfg["w"]
    x = _make_input((n, c, h, w), torch.float32, cfg["layout"], gen, "cpu")
    if cfg["kind"] == "lraspp":
        low = _make_input((n, max(1, c // 2), 2 * h + 1, 2 * w), torch.float32, cfg["layout"], gen, "cpu")
        return {"low": low, "high": x}
    return x


def _inputs_like(inp, fn):
    return {k: fn(v) for k, v in inp.items()} if isinstance(inp, dict) else fn(inp)


def _run_module(model, inp, dtype, dev, train, g):
    """Output, {input / parameter name: gradient}, {buffer name: value} of one (train) call;
    g(shape) -> the float64 output gradient."""
    x = _inputs_like(inp, lambda t: t.detach().to(device=dev, dtype=dtype).requires_grad_(train))
    torch.manual_seed(123)  # the same dropout masks on every side
    y = model(x)
    grads = {}
    if train and y.numel():
        y.backward(g(y.shape).to(device=dev, dtype=dtype))
        for name, t in (x if isinstance(x, dict) else {"x": x}).items():
            grads["grad of input " + name] = t.grad
        grads.update(("grad of " + n, p.grad) for n, p in model.named_parameters())
    return y, grads, dict(model.named_buffers())


@pytest.mark.parametrize("backend,seed", _seeds(("torch", "cpp", "triton"), MODULE_COUNTS))
def test_fuzz_module_vs_twin(backend, seed):
    """A fused module (fp32, backend) against its twin in float64, mostly in train mode: output,
    input and parameter gradients, running statistics and num_batches_tracked.

    Tolerance: the fp32 rule (1e-5 relative), or twice the error of PyTorch's own fp32 path on
    the same input where that is larger (the low-precision rule of docs/DESIGN.md, applied to
    fp32; that error estimated as the larger of the fp32 twin's in NCHW and in channels_last,
    which take different kernels and summation orders): a
    quantity that is ill-conditioned in exact arithmetic (the weight gradient of a 1-channel 1x1
    conv before a training BN, which is invariant to that weight's scale up to eps) defeats
    PyTorch's own fp32 path too, and is held to that path's accuracy."""
    cfg = draw_module(seed, backend)
    desc = "module backend=%s seed=%d %s" % (backend, seed, cfg)
    dev = "cuda" if (backend == "triton" and CUDA) else "cpu"
    torch.manual_seed(seed)
    twin = randomize_bn(build_twin(cfg)).train(cfg["train"])
    if backend == "triton" and hasattr(twin, "project"):
        twin.project[3].p = 0.0  # dropout masks: the twin's and the kernels' RNG draws differ in order
    ref64 = copy.deepcopy(twin).double()
    twins32 = [copy.deepcopy(twin).to(dev), copy.deepcopy(twin).to(dev, memory_format=torch.channels_last)]
    fused = FUSED_CLASS[cfg["kind"]].from_module(twin.to(dev), backend=backend)
    gen = torch.Generator().manual_seed(seed)
    inp = _module_input(cfg, gen)
    train = cfg["train"]
    drawn = []

    def g(shape):  # the output gradient, drawn once from gen after the input, when the shape is known
        if not drawn:
            drawn.append(torch.rand(shape, generator=gen, dtype=F64) + 0.5)
        return drawn[0]

    y_ref, grads_ref, bufs_ref = _run_module(ref64, inp, F64, "cpu", train, g)
    cl = _inputs_like(inp, lambda t: t.contiguous(memory_format=torch.channels_last))
    twin_runs = [_run_module(twins32[0], inp, torch.float32, dev, train, g),
                 _run_module(twins32[1], cl, torch.float32, dev, train, g)]
    y, grads, bufs = _run_module(fused, inp, torch.float32, dev, train, g)
    assert y.dtype == torch.float32, desc

    def close(what, actual, twin_values, expected):
        tol = TOL[torch.float32]
        if actual.numel() and expected.numel():
            tol = max([tol] + [2 * rel_err(t.detach().cpu(), expected.detach()) for t in twin_values])
        _close(what, actual, expected, tol, desc)

    close("output", y, [r[0] for r in twin_runs], y_ref)
    assert list(grads) == list(grads_ref), desc
    for name, gr in grads_ref.items():
        assert (grads[name] is None) == (gr is None), "%s\n%s: None on one side only" % (desc, name)
        if gr is not None:
            close(name, grads[name], [r[1][name] for r in twin_runs], gr)
    for name, b in bufs.items():
        if b.is_floating_point():
            close(name, b, [r[2][name] for r in twin_runs], bufs_ref[name])
        else:
            assert torch.equal(b.cpu(), bufs_ref[name]), "%s\n%s differs" % (desc, name)


# --------------------------------------------------------------------------- the CUDA kernels

if EMU_LIB:  # the host emulator of csrc/cuda (tools/cuda_emu): the ops as aspp_fused_emu.*, CPU tensors
    torch.ops.load_library(EMU_LIB)
    CUDA_OPS, CUDA_DEV = torch.ops.aspp_fused_emu, "cpu"
    CUDA_OK, CUDA_WHY = _extension.cpp_available(), "aspp_fused._C not built"
else:
    CUDA_OPS, CUDA_DEV = torch.ops.aspp_fused, "cuda"
    CUDA_OK = CUDA and _extension.cpp_available() and _extension.cuda_kernels_built()
    CUDA_WHY = "needs CUDA and aspp_fused built with its CUDA kernels (or the emulator: make emu-test)"


def _explicit(args, o, dtype, device):
    """The raw ops take explicit scale / shift (None -> ones / zeros)."""
    sd = F64 if dtype == F64 else torch.float32
    s = args[-3] if args[-3] is not None else torch.ones(o, dtype=sd, device=device)
    t = args[-2] if args[-2] is not None else torch.zeros(o, dtype=sd, device=device)
    return s, t


def _flat(grads):
    out = []
    for g in grads:
        out += list(g) if isinstance(g, (list, tuple)) else [g]
    return out


def _check_cuda_backward(desc, tol, out, ref, ref_leaves, grads, mask_groups, gen, cfg, dtype, run_bwd):
    """run_bwd(go, gs, gss, mask) -> the backward op's outputs, compared with autograd on the reference."""
    sd = F64 if dtype == F64 else torch.float32
    go = (torch.rand(ref[0].shape, generator=gen, dtype=F64) + 0.5).to(dtype)
    gs = torch.randn(ref[1].shape, generator=gen, dtype=F64).to(sd) if cfg["stats"] else None
    gss = (torch.randn(ref[2].shape, generator=gen, dtype=F64) / max(ref[0].numel(), 1)).to(sd) \
        if cfg["stats"] else None
    mask = [any(flags) for flags in mask_groups]
    bw = run_bwd(go.to(CUDA_DEV), None if gs is None else gs.to(CUDA_DEV), None if gss is None else gss.to(CUDA_DEV),
                 mask)
    loss = (ref[0] * go.double()).sum()
    if cfg["stats"]:
        loss = loss + (ref[1] * gs.double()).sum() + (ref[2] * gss.double()).sum()
    leaves = [t for t in ref_leaves if t is not None]
    expected = dict(zip(map(id, leaves), torch.autograd.grad(loss, leaves, allow_unused=True)))
    for (name, group), got in zip(grads, bw):
        # group: the reference tensors this backward output (or list of outputs) corresponds to
        items = list(zip(group, got)) if isinstance(group, list) else [(group, got)]
        for j, (r, g) in enumerate(items):
            if r is None:
                continue
            e = expected[id(r)]
            e = torch.zeros_like(r) if e is None else e
            _close("%s[%d]" % (name, j), g.reshape(e.shape), e, tol, desc)


def _cuda_fuzz(test):
    """A CUDA fuzz test: drawn seeds (the later ones slow), on a GPU or the emulator."""
    seeds = [pytest.param(s, marks=[pytest.mark.slow] if s >= OP_COUNTS["cuda"][0] else [])
             for s in range(OP_COUNTS["cuda"][1])]
    test = pytest.mark.skipif(not CUDA_OK, reason=CUDA_WHY)(pytest.mark.gpu(test))
    return pytest.mark.parametrize("seed", seeds)(test)


@_cuda_fuzz
def test_fuzz_cuda_atrous_conv(seed):
    """The CUDA kernels (raw ops, forward and backward with a drawn output_mask)."""
    cfg = draw_atrous(seed, True)
    dtype = _dtype_for("cuda", seed)
    args = build_atrous(cfg, seed, dtype, CUDA_DEV)
    args = map_tensors(args, lambda t: t.detach())
    ref_args = map_tensors(args, lambda t: t.detach().to(device="cpu", dtype=F64).requires_grad_(True))
    x, ws, d, _, _, b = args
    o = ws[0].shape[0] if cfg["sum_mode"] else sum(w.shape[0] for w in ws)
    s, t = _explicit(args, o, dtype, CUDA_DEV)
    desc = _Desc("cuda atrous_conv emu=%s dtype=%s seed=%d %s" % (bool(EMU_LIB), dtype, seed, cfg), cfg)
    sm, act, st = cfg["sum_mode"], cfg["act"], cfg["stats"]
    out = CUDA_OPS.atrous_conv(x, ws, d, s, t, b, sm, act, st)
    rx, rws, _, rs, rt, rb = ref_args
    rs = torch.ones(o, dtype=F64, requires_grad=True) if rs is None else rs
    rt = torch.zeros(o, dtype=F64, requires_grad=True) if rt is None else rt
    ref = AF.atrous_conv(rx, rws, d, rs, rt, rb, sum_mode=sm, act=act, compute_stats=st, backend="torch")
    tol = TOL[dtype]
    for name, a, r in zip(("out", "ch_sum", "ch_sumsq"), out, ref):
        _close(name, a, r, tol, desc)
    if x.shape[0] * x.shape[2] * x.shape[3] == 0:
        return
    gx, gw, gs_, gt, gb = cfg["grads"]
    grads = [("grad_x", rx), ("grad_weights", rws), ("grad_scale", rs), ("grad_shift", rt), ("grad_bias", rb)]
    mask_groups = [[gx], [gw], [gs_, gt, gb]]
    mask = [any(g) for g in mask_groups]
    grads = [g for g, on in zip(grads, [mask[0], mask[1], mask[2], mask[2], mask[2]]) if on]
    gen = torch.Generator().manual_seed(seed + 1)

    def run_bwd(go, gsum, gsumsq, m):
        r = _autograd.atrous_conv_backward(_autograd.primitives(CUDA_OPS), go, gsum, gsumsq, out[0], x, ws, d, s, t, b, sm, act, m)
        return [v for v, on in zip(r, [m[0], m[1], m[2], m[2], m[2]]) if on]

    _check_cuda_backward(desc, tol, out, ref, [rx] + rws + [rs, rt, rb], grads, mask_groups, gen, cfg, dtype,
                         run_bwd)


@_cuda_fuzz
def test_fuzz_cuda_separable_conv(seed):
    cfg = draw_separable(seed, True)
    dtype = _dtype_for("cuda", seed)
    args = map_tensors(build_separable(cfg, seed, dtype, CUDA_DEV), lambda t: t.detach())
    ref_args = map_tensors(args, lambda t: t.detach().to(device="cpu", dtype=F64).requires_grad_(True))
    x, dw, d, ms, msh, pw, _, _, b = args
    o = sum(w.shape[0] for w in pw)
    s, t = _explicit(args, o, dtype, CUDA_DEV)
    desc = _Desc("cuda separable_conv emu=%s dtype=%s seed=%d %s" % (bool(EMU_LIB), dtype, seed, cfg), cfg)
    ma, act, st = cfg["mid_act"], cfg["act"], cfg["stats"]
    e = x.new_empty(0)

    def absent(lst):
        return [e if v is None else v for v in lst]

    out = CUDA_OPS.separable_conv(x, absent(dw), d, absent(ms), absent(msh), ma, pw, s, t, b, act, st)
    rx, rdw, _, rms, rmsh, rpw, rs, rt, rb = ref_args
    rs = torch.ones(o, dtype=F64, requires_grad=True) if rs is None else rs
    rt = torch.zeros(o, dtype=F64, requires_grad=True) if rt is None else rt
    ref = AF.separable_conv(rx, rdw, d, rms, rmsh, ma, rpw, rs, rt, rb, act=act, compute_stats=st, backend="torch")
    tol = TOL[dtype]
    for name, a, r in zip(("out", "ch_sum", "ch_sumsq"), out, ref):
        _close(name, a, r, tol, desc)
    if x.shape[0] * x.shape[2] * x.shape[3] == 0:
        return
    gx, gdw, gmid, gpw, gaff, gb = cfg["grads"]
    mask_groups = [[gx], [gdw, gmid, gpw], [gaff, gb]]
    mask = [any(g) for g in mask_groups]
    names = [("grad_x", rx), ("grad_dw", rdw), ("grad_mid_scale", rms), ("grad_mid_shift", rmsh), ("grad_pw", rpw),
             ("grad_scale", rs), ("grad_shift", rt), ("grad_bias", rb)]
    on = [mask[0]] + [mask[1]] * 4 + [mask[2]] * 3
    grads = [g for g, flag in zip(names, on) if flag]
    gen = torch.Generator().manual_seed(seed + 1)

    def run_bwd(go, gsum, gsumsq, m):
        r = _autograd.separable_conv_backward(_autograd.primitives(CUDA_OPS), go, gsum, gsumsq, out[0], x, absent(dw),
                                              d, absent(ms), absent(msh), ma, pw, s, t, b, act, m)
        return [v for v, flag in zip(r, [m[0]] + [m[1]] * 4 + [m[2]] * 3) if flag]

    leaves = [rx] + rdw + rms + rmsh + rpw + [rs, rt, rb]
    _check_cuda_backward(desc, tol, out, ref, leaves, grads, mask_groups, gen, cfg, dtype, run_bwd)
