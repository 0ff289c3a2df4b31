"""Triton's autotuner on the real path: the first call per shape benchmarks every config.

The autotuned forward kernels write per-tile partial batch statistics into buffers sized for
the config with the most tiles (kernels/_common.PARTIAL_STATS_ARGS; the region kernel: one row
per plan item, the same for every config); every benchmarked config writes into them. These tests re-wrap each autotuned kernel's JIT function with triton.autotune
and the kernel's own autotune arguments (key, reset_to_zero, restore_value), but several configs
of *different tile counts* and a stub benchmarker (Triton's default one needs a GPU driver):
each benchmarked config really runs, in the configs' order, and the stub's timings choose the
winner. The statistics, outputs and gradients of that first call must equal the float64 torch
backend (the reference), in eager and under torch.compile.

Runs under the Triton interpreter on CPU (conftest sets TRITON_INTERPRET=1), and on a GPU.
"""
import copy
import os

import pytest
import torch

import aspp_fused
import aspp_fused.nn as ann
from aspp_fused import functional as AF
from conftest import assert_close_rel, map_tensors, randomize_bn, tensors_of

triton = pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEV = "cuda" if CUDA else "cpu"
F64 = torch.float64
TOL = 1e-5

pytestmark = [pytest.mark.skipif(not (CUDA or INTERPRET), reason="neither CUDA nor TRITON_INTERPRET=1"),
              pytest.mark.usefixtures("no_tf32")]  # conftest: the exact fp32 path


def _tile_cfg(th, tw, bm, bn=16, bk=16):
    return triton.Config({"TH": th, "TW": tw, "BM": bm, "BN": bn, "BK": bk}, num_warps=4, num_stages=1)


# On a 9 x 9 map: 5 x 3 = 15, 3 x 3 = 9 and 2 x 2 = 4 tiles per image. The stub's timings pick
# the last (fewest tiles), so without a reset the rows 4..14 keep the other configs' sums.
TILE_CONFIGS = [_tile_cfg(2, 4, 16), _tile_cfg(4, 4, 16), _tile_cfg(8, 8, 64)]
TILE_TIMES = [3.0, 2.0, 1.0]
# Weight-gradient configs: 2 x 2 and 1 x 1 (C-block, O-block) programs at C = 20, O_b = 20.
WGRAD_CONFIGS = [triton.Config({"BM": 16, "BN": 16, "BK": 16}, num_warps=4, num_stages=1),
                 triton.Config({"BM": 32, "BN": 32, "BK": 16}, num_warps=4, num_stages=1)]
WGRAD_TIMES = [1.0, 2.0]  # the first config (more programs) wins, benchmarked before the other
# The region kernel's plan fixes BM and BN (kernels/plan.py), so its configs differ in BK: 16 runs
# two channel steps per tap at C = 20, 32 one. Every config writes the same partial rows (one per
# plan item); the last one benchmarked wins.
REGION_CONFIGS = [triton.Config({"BK": 16}, num_warps=4, num_stages=1),
                  triton.Config({"BK": 32}, num_warps=4, num_stages=1)]
REGION_TIMES = [2.0, 1.0]


class StubBench:
    """do_bench stand-in: runs the benchmarked kernel once (as a real benchmarker does, at least
    once) and reports the next preset time, so the configs' order decides the winner."""

    def __init__(self, times):
        self.times = list(times)
        self.calls = 0

    def __call__(self, kernel_call, quantiles=None, **kwargs):
        t = self.times[self.calls % len(self.times)]
        self.calls += 1
        kernel_call()
        return [t] * len(quantiles) if quantiles else t


def _retune(kernel, configs, times):
    """kernel's JIT function under triton.autotune with kernel's own arguments but `configs`."""
    bench = StubBench(times)
    prune = {"early_config_prune": kernel.early_config_prune} if kernel.early_config_prune else None
    tuned = triton.autotune(configs=configs, key=list(kernel.keys), reset_to_zero=list(kernel.reset_to_zero) or None,
                            restore_value=list(kernel.restore_value) or None, prune_configs_by=prune,
                            do_bench=bench)(kernel.fn)
    return tuned, bench


@pytest.fixture
def retuned(monkeypatch):
    """Installs fresh multi-config autotuners (empty caches) in place of the kernels; returns
    {name: (autotuner, stub)}. The launchers read the module globals at call time."""
    from aspp_fused.kernels import atrous_conv as KA
    from aspp_fused.kernels import separable_conv as KS

    def install():
        made = {}
        for mod, name, configs, times in ((KA, "tap_conv_kernel", TILE_CONFIGS, TILE_TIMES),
                                          (KA, "region_conv_kernel", REGION_CONFIGS, REGION_TIMES),
                                          (KA, "tap_wgrad_kernel", WGRAD_CONFIGS, WGRAD_TIMES),
                                          (KS, "sep_conv_kernel", TILE_CONFIGS, TILE_TIMES)):
            tuned, bench = _retune(getattr(mod, name), configs, times)
            monkeypatch.setattr(mod, name, tuned)
            made[name] = (tuned, bench)
        return made

    return install


def _atrous_args(n=2, c=20, h=9, w=9, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    branches = ((1, 20, 1), (3, 6, 2), (3, 5, 12))
    ws = [(torch.randn(o, c, k, k, generator=g) / (c * k * k) ** 0.5).to(dtype) for k, o, _ in branches]
    o = sum(b[1] for b in branches)
    scale = torch.rand(o, generator=g) + 0.5
    shift = torch.randn(o, generator=g)
    bias = torch.randn(n, o, generator=g)
    return [x.to(DEV), [w.to(DEV) for w in ws], [d for _, _, d in branches], scale.to(DEV), shift.to(DEV),
            bias.to(DEV)]


def _separable_args(n=2, c=6, h=9, w=9):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, c, h, w, generator=g)
    kinds = (("plain", 4, 1), ("dw", 5, 2), ("mid", 3, 12))
    dw = [None if k == "plain" else torch.randn(c, 1, 3, 3, generator=g) / 3 for k, _, _ in kinds]
    ms = [torch.rand(c, generator=g) + 0.5 if k == "mid" else None for k, _, _ in kinds]
    msh = [torch.randn(c, generator=g) if k == "mid" else None for k, _, _ in kinds]
    pw = [torch.randn(o, c, 1, 1, generator=g) / c ** 0.5 for _, o, _ in kinds]
    o = sum(b[1] for b in kinds)
    scale, shift = torch.rand(o, generator=g) + 0.5, torch.randn(o, generator=g)

    def d(t):
        return None if t is None else t.to(DEV)

    return [d(x), [d(t) for t in dw], [b[2] for b in kinds], [d(t) for t in ms], [d(t) for t in msh],
            [d(t) for t in pw], d(scale), d(shift), None]


def _first_call_matches_reference(op, args, bench_names, retuned, compiled):
    """op(backend, *args) -> (out, ch_sum, ch_sumsq). The first call (autotuning every config)
    against the reference: outputs, statistics, and every gradient of a loss on all three."""
    made = retuned()
    ref_args = map_tensors(args, lambda t: t.detach().double().requires_grad_(True))
    tri_args = map_tensors(args, lambda t: t.detach().clone().requires_grad_(True))
    fn = (lambda *a: op("triton", *a))
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = fn(*tri_args)
    ref = op("torch", *ref_args)
    for name, a, r in zip(("out", "ch_sum", "ch_sumsq"), out, ref):
        assert_close_rel(a, r, TOL, name + " of the first (autotuning) call")
    # Gradients: the backward's dgrad (tap_conv_kernel, no stats) and wgrad are autotuned too.
    g = torch.Generator().manual_seed(5)
    g0 = (torch.rand(ref[0].shape, generator=g, dtype=F64) + 0.5).to(DEV)
    g1 = torch.randn(ref[1].shape, generator=g, dtype=F64).to(DEV)
    g2 = (torch.randn(ref[2].shape, generator=g, dtype=F64) / ref[0].numel()).to(DEV)
    loss = (out[0].double() * g0).sum() + (out[1].double() * g1).sum() + (out[2].double() * g2).sum()
    loss_r = (ref[0] * g0).sum() + (ref[1] * g1).sum() + (ref[2] * g2).sum()
    grads = torch.autograd.grad(loss, tensors_of(tri_args))
    grads_r = torch.autograd.grad(loss_r, tensors_of(ref_args))
    for i, (a, r) in enumerate(zip(grads, grads_r)):
        assert_close_rel(a, r, TOL, "grad of input %d (first backward call)" % i)
    for name in bench_names:
        t, b = made[name]  # the forward's, and the backward's wgrad
        assert b.calls >= len(t.configs), "%s: the autotuner did not benchmark every config (%d runs)" % (name,
                                                                                                         b.calls)
    return made


def _atrous_op(backend, x, ws, d, s, t, b):
    return AF.atrous_conv(x, ws, d, s, t, b, act="relu", compute_stats=True, backend=backend)


def _separable_op(backend, x, dw, d, ms, msh, pw, s, t, b):
    return AF.separable_conv(x, dw, d, ms, msh, "relu", pw, s, t, b, act="relu", compute_stats=True, backend=backend)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_atrous_first_autotuned_call_gives_reference_statistics(retuned, compiled):
    made = _first_call_matches_reference(_atrous_op, _atrous_args(),
                                         ["region_conv_kernel", "tap_conv_kernel", "tap_wgrad_kernel"], retuned,
                                         compiled)
    # The forward (concat mode: the region kernel) took the stub's last config; the backward's
    # dgrad (the tile kernel, sum mode) the one with the fewest tiles; the wgrad the one with the
    # most programs.
    assert made["region_conv_kernel"][0].best_config.kwargs["BK"] == 32
    assert made["tap_conv_kernel"][0].best_config.kwargs["TH"] == 8
    assert made["tap_wgrad_kernel"][0].best_config.kwargs["BM"] == 16


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_separable_first_autotuned_call_gives_reference_statistics(retuned, compiled):
    made = _first_call_matches_reference(_separable_op, _separable_args(), ["sep_conv_kernel"], retuned, compiled)
    assert made["sep_conv_kernel"][0].best_config.kwargs["TH"] == 8


def test_first_training_step_running_stats(retuned):
    """A fused ASPP's first train-mode call with the autotuners fresh: its running statistics
    (from the kernels' partial sums) and output equal its twin's in float64."""
    twin = randomize_bn(ann.ASPP(20, [2, 12], out_channels=6)).to(DEV).train()
    twin.project[3].p = 0.0
    ref = copy.deepcopy(twin).double()
    fused = aspp_fused.convert(twin, backend="triton")
    made = retuned()
    x = torch.randn(3, 20, 9, 9, device=DEV)
    y = fused(x)
    y_ref = ref(x.double())
    assert made["region_conv_kernel"][1].calls >= len(REGION_CONFIGS)
    assert_close_rel(y, y_ref, TOL, "output")
    ref_buffers = dict(ref.named_buffers())
    for name, b in fused.named_buffers():
        if b.is_floating_point():
            assert_close_rel(b, ref_buffers[name], TOL, name)


def test_kernels_declare_their_partial_statistics_resets():
    """The kernels that write per-tile partial statistics name those buffers in reset_to_zero
    (what the tests above exercise); the weight-gradient kernel writes all it owns."""
    from aspp_fused.kernels import _common
    from aspp_fused.kernels import atrous_conv as KA
    from aspp_fused.kernels import separable_conv as KS

    for k in (KA.tap_conv_kernel, KA.region_conv_kernel, KS.sep_conv_kernel):
        assert sorted(k.reset_to_zero) == sorted(_common.PARTIAL_STATS_ARGS)
        assert all(name in k.fn.arg_names for name in _common.PARTIAL_STATS_ARGS)
    assert list(KA.tap_wgrad_kernel.reset_to_zero) == []


def test_column_tile_fits_the_widest_branch(monkeypatch):
    """tap_conv_kernel keeps, per launch, the configs of the narrowest BN covering its widest
    branch (NMAX): 21 classes run 32-column blocks, not 128. ASPP_FUSED_TRITON_AUTOTUNE=0 keeps
    the first config of each width, so that choice survives without autotuning."""
    from aspp_fused.kernels import _common
    from aspp_fused.kernels.atrous_conv import fit_column_tile

    cfgs = [_tile_cfg(8, 16, 128, 128), _tile_cfg(11, 11, 128, 128), _tile_cfg(11, 11, 128, 64),
            _tile_cfg(11, 11, 128, 32), _tile_cfg(8, 8, 64, 32)]
    for nmax, want in ((21, 32), (32, 32), (33, 64), (64, 64), (200, 128), (256, 128), (1000, 128), (0, 32)):
        kept = fit_column_tile(cfgs, {"NMAX": nmax})
        assert kept and {c.kwargs["BN"] for c in kept} == {want}, (nmax, kept)
    assert fit_column_tile(cfgs, {"NMAX": 21}) == [cfgs[3], cfgs[4]]
    monkeypatch.setenv("ASPP_FUSED_TRITON_AUTOTUNE", "0")
    assert _common.autotune_configs(cfgs) == cfgs[:1]
    assert _common.autotune_configs(cfgs, group=lambda c: c.kwargs["BN"]) == [cfgs[0], cfgs[2], cfgs[3]]
    monkeypatch.setenv("ASPP_FUSED_TRITON_AUTOTUNE", "1")
    assert _common.autotune_configs(cfgs, group=lambda c: c.kwargs["BN"]) == cfgs
