"""The Triton backend (aspp_fused.kernels) against the torch backend run in float64.

Without a GPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1),
which executes every program in numpy: the shapes here are tiny on purpose (C <= 20, H, W <= 9,
O_b <= 4), yet they cover several 4 x 4 tiles per image with ragged edges, rates at and beyond
the map size (tap rectangles of 1, 2 and 3 taps per axis), C not a multiple of the channel
block, batch 0 and 1, concat and sum mode, separable with and without the mid BN, stats on and
off, and every gradient. With a GPU the same tests run compiled on CUDA tensors, and the
`gpu`-marked tests check the docs/DESIGN.md standard cases in bf16 / fp16 / fp32.

Tolerance (docs/DESIGN.md): fp32 against the float64 reference 1e-5 relative (TF32 off); bf16 /
fp16 at most 2x the error of PyTorch's own path in that dtype.
"""
import copy
import os
import sys

import pytest
import torch

import aspp_fused
import aspp_fused.nn as ann
from aspp_fused import functional as AF
from aspp_fused import torch_backend
from conftest import (assert_close_rel, check_compiled_intermediate_weights, compare_with_twin, map_tensors,
                      randomize_bn, rel_err, run_in_threads, tensors_of)
from op_problems import ASPP_BRANCHES, atrous_problem, separable_problem

try:
    import triton  # noqa: F401

    TRITON_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the environment
    TRITON_ERROR = "%s: %s" % (type(exc).__name__, exc)

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEV = "cuda" if CUDA else "cpu"
F64 = torch.float64
TOL = 1e-5

pytestmark = [
    pytest.mark.skipif(TRITON_ERROR is not None or not (CUDA or INTERPRET),
                       reason="triton not importable (%s) or neither CUDA nor TRITON_INTERPRET=1" % TRITON_ERROR),
    pytest.mark.usefixtures("no_tf32"),  # conftest: the exact fp32 path (tests that want TF32 set it)
]


# --------------------------------------------------------------------------- modules and convert()


def _module_inputs(n, h, w, train):
    return torch.randn(n, 8, h, w, device=DEV).requires_grad_(train)


def _aspp_v2():
    m = ann.ASPPv2(8, 5, [1, 6, 12])
    with torch.no_grad():  # the DeepLab v2 init (std 0.01, zero bias) makes outputs tiny
        for c in m.convs:
            c.weight.normal_()
            c.bias.normal_()
    return m


MODULES = {
    "aspp": lambda: ann.ASPP(8, [2, 3, 12], out_channels=6),
    "sep_aspp": lambda: ann.SeparableASPP(8, 6, [2, 5, 12]),
    # Rates below the map size: see test_modules._sep_aspp_mid (a training mid BN makes the
    # output invariant to a centre-tap-only depthwise weight; its exact grad is 0).
    "sep_aspp_mid": lambda: ann.SeparableASPP(8, 6, [1, 2, 3], mid_norm=True),
    "aspp_v2": _aspp_v2,
}
MODULE_TYPES = {"aspp": ann.FusedASPP, "sep_aspp": ann.FusedSeparableASPP, "sep_aspp_mid": ann.FusedSeparableASPP,
                "aspp_v2": ann.FusedASPPv2}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", sorted(MODULES))
def test_convert_to_triton_matches_twin(case, train):
    # N >= 3 in training: see test_modules.SHAPES (the pooling BN of N = 2 normalises to +-1).
    n, h, w = (3, 7, 9) if train else (2, 7, 5)
    twin = randomize_bn(MODULES[case]()).to(DEV).train(train)
    if hasattr(twin, "project"):
        twin.project[3].p = 0.0  # dropout masks would differ between the fp64 twin and fp32 kernels' order
    ref = copy.deepcopy(twin)
    fused = aspp_fused.convert(twin, backend="triton")
    assert isinstance(fused, MODULE_TYPES[case]) and fused.backend == "triton"
    compare_with_twin(ref, fused, _module_inputs(n, h, w, train), train, TOL)


def test_convert_several_train_steps_then_eval():
    """Running stats accumulate over training steps on the Triton backend, then eval uses them."""
    twin = randomize_bn(ann.ASPP(8, [2, 12], out_channels=6)).to(DEV)
    twin.project[3].p = 0.0
    ref = copy.deepcopy(twin)
    fused = aspp_fused.convert(twin, backend="triton")
    for _ in range(2):
        x = torch.randn(3, 8, 6, 7, device=DEV) * 2 + 0.5
        compare_with_twin(ref.train(), fused.train(), x.requires_grad_(), True, TOL)
    compare_with_twin(ref.eval(), fused.eval(), torch.randn(2, 8, 6, 7, device=DEV), False, TOL)


# --------------------------------------------------------------------------- torch.compile, opcheck


# torch.compile of the Triton-backed modules: tests/test_compile.py (every backend).


def test_opcheck_triton_ops():
    from aspp_fused import _extension

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


# --------------------------------------------------------------------------- dispatch and errors


def test_backend_errors_are_clear(monkeypatch):
    from aspp_fused import kernels

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


def test_tf32_follows_cudnn_switch():
    from aspp_fused.kernels._common import dot_precision

    assert dot_precision(torch.float32) == "ieee"  # the no_tf32 fixture turned TF32 off
    torch.backends.cudnn.allow_tf32 = True
    assert dot_precision(torch.float32) == "tf32"
    assert dot_precision(torch.bfloat16) == "tf32"


def test_refs_match_torch_backend():
    """The pure-torch *_ref beside each kernel states the same semantics as the torch backend."""
    from aspp_fused.kernels.atrous_conv import atrous_conv_ref
    from aspp_fused.kernels.separable_conv import separable_conv_ref

    args = atrous_problem(2, 5, 7, 9, ASPP_BRANCHES, False, True, dtype=F64, device="cpu")
    for a, r in zip(atrous_conv_ref(*args, False, 1, True), torch_backend.atrous_conv(*args, False, 1, True)):
        assert_close_rel(a, r, 1e-12, "atrous_conv_ref")
    sargs = separable_problem(2, 5, 7, 9, (("plain", 3, 1), ("dw", 4, 2), ("mid", 4, 12)), True, dtype=F64,
                              device="cpu")
    x, dw, d, ms, msh, pw, s, t, b = sargs
    for a, r in zip(separable_conv_ref(x, dw, d, ms, msh, 1, pw, s, t, b, 1, True),
                    torch_backend.separable_conv(x, dw, d, ms, msh, 1, pw, s, t, b, 1, True)):
        assert_close_rel(a, r, 1e-12, "separable_conv_ref")


# --------------------------------------------------------------------------- sm_90 / sm_80 builds without a GPU


def test_kernels_build_for_sm90_and_sm80_with_their_promises():
    """tools/triton_check.py builds every Triton kernel family for sm_90 and sm_80 (Triton's own
    ptxas; no GPU) in the modules' eval and train epilogues: the GEMM families hold wgmma (sm_90)
    / mma.sync (sm_80), cp.async and a >= 3-stage pipeline of their operand tiles (region_conv_tma:
    its weight tiles by TMA, cp.async.bulk.tensor), and no family spills. Each GEMM family's one-stage build must break the pipeline promises, so the check
    is shown able to fail. (`make triton-check` runs every autotune config.)"""
    import json
    import subprocess
    import tempfile

    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "triton_check.py")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "records.json")
        proc = subprocess.run([sys.executable, tool, "--json", out], env=env, capture_output=True, text=True,
                              timeout=900)
        if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
            pytest.skip("no ptxas for an offline build")
        assert os.path.exists(out), proc.stdout[-3000:] + proc.stderr[-3000:]
        recs = json.load(open(out))["records"]
    assert proc.returncode == 0, proc.stdout[-5000:]
    gemm = {"tap_conv", "region_conv", "region_conv_tma", "tap_wgrad", "sep_conv"}
    assert {r["family"] for r in recs} == gemm | {"dw", "dw_bwd", "epilogue_bwd"}
    # the Hopper path: region_conv's weight tiles by TMA, built for sm_90 only
    tma = [r for r in recs if r["family"] == "region_conv_tma" and not r["counter"]]
    assert tma and all(r["arch"] == "sm_90" and r["tma"] for r in tma), tma
    assert not any(r["tma"] for r in recs if r["family"] != "region_conv_tma"), "TMA where none was asked for"
    for arch in ("sm_90", "sm_80"):
        for r in (r for r in recs if r["arch"] == arch):
            if r["counter"]:
                # judged from the build itself (PTX, TTGIR), not only from its num_stages
                assert any("not pipelined" in p for p in r["problems"]), r
                assert any("no cp.async" in p for p in r["problems"]), r
                continue
            assert r["problems"] == [], r
            if r["family"] in gemm:
                assert r["mma"] and r["cp_async"] and r["stages"] >= 3, r
        # sep_conv's pointwise weights are multi-buffered (one buffer, no cp.async, before its
        # depthwise taps were unrolled out of the channel loop).
        sep = [r for r in recs if r["family"] == "sep_conv" and r["arch"] == arch and not r["counter"]]
        assert sep and all(max(r["depths"]) >= 2 for r in sep), sep
    if any(r["ldl"] is None for r in recs):
        pytest.skip("no cuobjdump: spills not checked (everything else passed)")


# --------------------------------------------------------------------------- GPU: docs/DESIGN.md standard cases

GPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _low_precision_limit(ours, pytorch, exact, dtype):
    return TOL if dtype == torch.float32 else 2 * rel_err(pytorch, exact)


STANDARD_ATROUS = {
    # name: (H = W, rates, O_b, sum_mode, act, bias)
    "aspp_v3_os16": (33, (6, 12, 18), 256, False, 1, True),
    "aspp_v3_os8": (65, (12, 24, 36), 256, False, 1, True),
    "aspp_v2_os8": (65, (6, 12, 18, 24), 21, True, 0, False),
}


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(STANDARD_ATROUS))
def test_gpu_standard_atrous(case, dtype):
    hw, rates, ob, sum_mode, act, bias = STANDARD_ATROUS[case]
    branches = ([] if sum_mode else [(1, ob, 1)]) + [(3, ob, r) for r in rates]
    args = atrous_problem(16, 2048, hw, hw, branches, sum_mode, bias, dtype=dtype)
    exact = AF.atrous_conv(*map_tensors(args, lambda t: t.double()), sum_mode=sum_mode, act=act, backend="torch")[0]
    ours = AF.atrous_conv(*args, sum_mode=sum_mode, act=act, backend="triton")[0]
    pytorch = AF.atrous_conv(*args, sum_mode=sum_mode, act=act, backend="torch")[0]
    assert ours.dtype == dtype
    assert rel_err(ours, exact) <= _low_precision_limit(ours, pytorch, exact, dtype)
    # Stats (training) on the same problem.
    _, s, ss = AF.atrous_conv(*args, sum_mode=sum_mode, act="none", compute_stats=True, backend="triton")
    _, s_e, ss_e = AF.atrous_conv(*map_tensors(args, lambda t: t.double()), sum_mode=sum_mode, act="none",
                                  compute_stats=True, backend="torch")
    _, s_p, ss_p = AF.atrous_conv(*args, sum_mode=sum_mode, act="none", compute_stats=True, backend="torch")
    assert rel_err(ss, ss_e) <= max(_low_precision_limit(ss, ss_p, ss_e, dtype), 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("mid", [False, True], ids=["smp", "midbn"])
def test_gpu_standard_separable(mid, dtype):
    kind = "mid" if mid else "dw"
    args = separable_problem(16, 2048, 33, 33, (("plain", 256, 1),) + tuple((kind, 256, r) for r in (6, 12, 18)),
                             True, dtype=dtype)
    x, dw, d, ms, msh, pw, s, t, b = args

    def run(a, backend):
        return AF.separable_conv(*a[:5], "relu", *a[5:], act="relu", backend=backend)[0]

    exact = run(map_tensors(args, lambda v: v.double()), "torch")
    ours = run(args, "triton")
    pytorch = run(args, "torch")
    assert ours.dtype == dtype
    assert rel_err(ours, exact) <= _low_precision_limit(ours, pytorch, exact, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_standard_backward(dtype):
    """Every grad of the OS16 ASPP conv (batch 4 to bound the float64 reference's cost)."""
    branches = [(1, 256, 1)] + [(3, 256, r) for r in (6, 12, 18)]
    args = atrous_problem(4, 2048, 33, 33, branches, False, True, dtype=dtype)

    def grads(a, backend):
        a = map_tensors(a, lambda v: v.detach().clone().requires_grad_(True))
        out, cs, css = AF.atrous_conv(*a, act="relu", compute_stats=True, backend=backend)
        gen = torch.Generator(device=DEV).manual_seed(1)
        g0 = torch.rand(out.shape, generator=gen, device=DEV, dtype=F64) + 0.5
        g2 = torch.randn(css.shape, generator=gen, device=DEV, dtype=F64) / out.numel()
        loss = (out.double() * g0).sum() + (css.double() * g2).sum()
        return torch.autograd.grad(loss, tensors_of(a))

    exact = grads(map_tensors(args, lambda v: v.double()), "torch")
    ours = grads(args, "triton")
    pytorch = grads(args, "torch")
    for i, (o, p, e) in enumerate(zip(ours, pytorch, exact)):
        limit = 1e-4 if dtype == torch.float32 else 2 * rel_err(p, e)
        assert rel_err(o, e) <= limit, (i, rel_err(o, e), limit)


# --------------------------------------------------------------------------- packed-weight cache


# Branch widths equal (a descriptor spans the packed weights as rows of one width) and 16-byte rows:
# C off the channel block (20 = 16 + 4: the last K step's rows run into the next tap's weights,
# zero-masked on the input side), width-1 regions across images, a 1-pixel map, rates beyond it.
TMA_CASES = {
    "c20_width1_regions_7x7": (3, 20, 7, 7, ((3, 4, 3), (3, 4, 5), (1, 4, 1)), True),
    "1x1_map": (2, 6, 1, 1, ((1, 8, 1), (3, 8, 2)), False),
    "rates_ge_map_c16": (2, 16, 4, 5, ((3, 4, 6), (3, 4, 2)), True),
}


@pytest.mark.parametrize("case", sorted(TMA_CASES))
def test_region_conv_weight_tiles_by_tma(monkeypatch, case):
    """ASPP_FUSED_TRITON_TMA=1: region_conv reads its weight tiles through a tensor descriptor
    (the Hopper path, here under the interpreter): the reference's numbers (forward and every
    grad), and bitwise the pointer path's (the same tiles, the same products)."""
    from aspp_fused.kernels import atrous_conv as KA
    from op_problems import atrous_fn, op_parity

    n, c, h, w, branches, bias = TMA_CASES[case]
    made = []

    def spy(w_packed, rows):
        made.append(real(w_packed, rows))
        return made[-1]

    real = KA.weight_descriptor
    monkeypatch.setattr(KA, "weight_descriptor", spy)
    monkeypatch.setenv("ASPP_FUSED_TRITON_TMA", "1")
    args = atrous_problem(n, c, h, w, branches, False, bias)
    op_parity("triton", lambda be: atrous_fn(be, False, 1, True), args, True)
    assert made and all(d is not None for d in made), "the descriptor path did not run"
    via_tma = AF.atrous_conv(*args, act="relu", compute_stats=True, backend="triton")
    monkeypatch.setenv("ASPP_FUSED_TRITON_TMA", "0")
    calls = len(made)
    via_pointers = AF.atrous_conv(*args, act="relu", compute_stats=True, backend="triton")
    assert len(made) == calls  # no descriptor asked for
    for a, b in zip(via_tma, via_pointers):
        assert torch.equal(a, b)


def test_tma_switch_and_descriptor_rules(monkeypatch):
    from aspp_fused.kernels import atrous_conv as KA

    x = torch.zeros(1, 2, 2, 2)
    monkeypatch.setenv("ASPP_FUSED_TRITON_TMA", "yes")
    with pytest.raises(ValueError, match="ASPP_FUSED_TRITON_TMA must be 'auto', '0' or '1', got 'yes'"):
        KA.use_tma(x)
    monkeypatch.setenv("ASPP_FUSED_TRITON_TMA", "auto")
    assert not KA.use_tma(x)  # CPU tensors: no copy engine

    class Row:
        def __init__(self, n_b, w_off):
            self.n_b, self.w_off = n_b, w_off

    w = torch.zeros(4096)
    assert KA.weight_descriptor(w, [Row(8, 0), Row(8, 72)]) is not None
    assert KA.weight_descriptor(w, [Row(8, 0), Row(4, 72)]) is None  # widths differ
    assert KA.weight_descriptor(w, [Row(2, 0)]) is None  # 8-byte rows
    assert KA.weight_descriptor(w, [Row(8, 0), Row(8, 12)]) is None  # a branch off a row start
    assert KA.weight_descriptor(w[1:], [Row(8, 0)]) is None  # base not 16-byte aligned
    assert KA.weight_descriptor(w[4:], [Row(8, 0)]) is not None


def test_weights_are_packed_once_per_parameter_version():
    """The Triton ops keep packed weights while their parameters are unchanged (kernels/pack_cache.
    PackCache): repeated eval calls and threads sharing a model pack once; an optimizer-style
    in-place update, load_state_dict and a dtype change repack; results stay exact throughout."""
    from aspp_fused.kernels.pack_cache import PACKED

    twin = randomize_bn(ann.ASPP(8, [2, 3], out_channels=6)).to(DEV).eval()
    fused = aspp_fused.convert(copy.deepcopy(twin), backend="triton")
    x = torch.randn(2, 8, 5, 6, device=DEV)

    def check():
        with torch.no_grad():
            assert_close_rel(fused(x), twin(x), TOL, "output")

    PACKED.clear()
    start = PACKED.misses
    check()
    first = PACKED.misses - start  # the branches' launch and the projection's
    assert first >= 2
    for _ in range(3):
        check()
    assert PACKED.misses - start == first, "repacked without a change"
    # Threads asking for the same packing at once get one packing. (The interpreter cannot run
    # kernels from several threads, so the threads meet in the cache itself.)
    w = fused.convs[1][0].weight
    made = []

    def pack():
        made.append(1)
        return object()

    got = run_in_threads(lambda _: PACKED.get(("test-threads",), [w], pack), 6)
    assert len(made) == 1 and len(got) == 6 and all(v is got[0] for v in got)
    start += 1
    with torch.no_grad():  # an optimizer step: in place, the version counter moves
        for m in (twin, fused):
            m.convs[1][0].weight.mul_(0.5)
    check()
    assert PACKED.misses - start == first + 1  # only the launch that reads that weight
    state = {k: v.clone() for k, v in twin.state_dict().items()}
    state["project.0.weight"].add_(0.1)
    twin.load_state_dict(state)
    fused.load_state_dict(state)
    check()
    assert PACKED.misses - start == first + 1 + first  # load_state_dict writes every parameter
    # .to(dtype) gives new parameters: a packing of the old ones is never served for them.
    w2 = fused.convs[1][0].weight
    before = PACKED.misses
    a = PACKED.get(("test-dtype",), [w2], object)
    b = PACKED.get(("test-dtype",), [torch.nn.Parameter(w2.detach().to(torch.float64))], object)
    c = PACKED.get(("test-dtype",), [w2], object)
    # the new tensor gets a packing of its own; the old one's is kept beside it, for the old one
    assert b is not a and c is a and PACKED.misses - before == 2


def test_compiled_model_packs_once_and_follows_updates():
    """The Triton ops are opaque to torch.compile (kernels/ops.py), so a compiled graph runs their
    host code each call and keeps the packed weights: no packing per call, a repack after an
    in-place update, the twin's numbers throughout."""
    from aspp_fused.kernels.pack_cache import PACKED

    twin = randomize_bn(ann.ASPP(8, [2, 3], out_channels=6)).to(DEV).eval()
    fused = aspp_fused.convert(copy.deepcopy(twin), backend="triton")
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, 8, 5, 6, device=DEV)
    with torch.no_grad():
        assert_close_rel(compiled(x), twin(x), TOL, "compiled")
        compiled(x)  # the first run of a new graph gets aliases of the parameters: packed, then dropped
        misses = PACKED.misses
        for _ in range(3):
            compiled(x)
        assert PACKED.misses == misses, "the compiled graph repacks every call"
        for m in (twin, fused):
            m.convs[1][0].weight.mul_(0.5)
        assert_close_rel(compiled(x), twin(x), TOL, "compiled, after an update")
        assert PACKED.misses == misses + 1, "one repack: the launch that reads the updated weight"


def test_reused_buffers_of_a_compiled_graph_are_not_served():
    """Two ops in one compiled graph whose weights are intermediates (w * 2): inductor reuses the
    first one's buffer, the same tensor object, for the second one's weight; PackCache keeps only
    parameters, so the second op packs its own (it was served the first one's: 391 off)."""
    check_compiled_intermediate_weights("triton", DEV, TOL)


def test_packed_weights_go_with_their_model():
    """A deleted model's packed weights are not kept (the entry's weakref to a source drops it)."""
    import gc

    from aspp_fused.kernels.pack_cache import PACKED

    fused = aspp_fused.convert(randomize_bn(ann.ASPP(8, [2], out_channels=4)).to(DEV).eval(), backend="triton")
    PACKED.clear()
    with torch.no_grad():
        fused(torch.randn(1, 8, 4, 4, device=DEV))
    assert len(PACKED.entries) >= 2
    del fused
    gc.collect()
    assert len(PACKED.entries) == 0
