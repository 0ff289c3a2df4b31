"""backend="auto": the table, the torch default, benchmark mode (verification, timing, cache), tracing, threads."""
import json
import threading
import time
import warnings

import pytest
import torch

import aspp_fused
import aspp_fused.nn as ann
from aspp_fused import _extension, dispatch, functional, torch_backend
from conftest import assert_close_rel, needs_triton, randomize_bn, run_in_threads


def atrous_args(n=2, c=5, h=7, w=9, dtype=torch.float32, grad=False, stats=False, seed=0):
    """The runner arguments of atrous_conv (x, weights, dilations, scale, shift, bias, sum_mode, act, stats)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    ws = [(torch.randn(o, c, k, k, generator=g) / (c * k * k) ** 0.5).to(dtype) for k, o in ((1, 3), (3, 4), (3, 4))]
    scale = torch.rand(11, generator=g) + 0.5
    shift = torch.randn(11, generator=g)
    bias = torch.randn(n, 11, generator=g)
    if grad:
        for t in [x] + ws:
            t.requires_grad_(True)
    return x, ws, [1, 2, 12], scale, shift, bias, False, 1, stats


def call(args, backend="auto"):
    x, ws, d, s, t, b, sm, act, stats = args
    return aspp_fused.atrous_conv(x, ws, d, s, t, b, sm, act, stats, backend=backend)


@pytest.fixture
def bench(monkeypatch):
    """Benchmark mode on a clean cache, with only the stand-ins a test registers as candidates.
    One torch thread: on a loaded 2-core machine oneDNN's two threads wait for each other, and a
    1 ms convolution then takes 50-170 ms (measured), which would drown the timing contrasts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dispatch.clear_cache()
    monkeypatch.setattr(dispatch, "_BENCHMARK", True)
    monkeypatch.setattr(dispatch, "_CACHE_FILE", None)
    real = dispatch.candidates
    monkeypatch.setattr(dispatch, "candidates",
                        lambda op, x: [n for n in real(op, x) if n in dispatch._STAND_INS])
    yield
    for name in list(dispatch._STAND_INS):
        dispatch.unregister_stand_in(name)
    dispatch.clear_cache()
    torch.set_num_threads(threads)


class ScaleGrad(torch.autograd.Function):
    """The identity whose backward scales the gradient by ``factor``: a wrong gradient."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def torch_runner(**wrap):
    """A stand-in that runs the torch backend (optionally altered): ``out`` / ``stats`` scale
    those outputs; ``grad`` scales the input gradient; ``sleep`` adds seconds per call."""
    base = torch_backend.atrous_conv

    def run(x, ws, d, s, t, b, sm, act, stats):
        if "sleep" in wrap:
            time.sleep(wrap["sleep"])
        if "grad" in wrap:
            x = ScaleGrad.apply(x, wrap["grad"])
        out, cs, css = base(x, list(ws), d, s, t, b, sm, act, stats)
        if "out" in wrap:
            out = out * wrap["out"]
        if "stats" in wrap:
            cs = cs * wrap["stats"]
        return out, cs, css

    return run


# --------------------------------------------------------------------------- the default: table, else torch


def test_table_rows_only_from_committed_gpu_results():
    """Every row cites a committed GPU results file; with none committed (today) the table is empty."""
    import glob
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = dispatch.load_table()
    assert rows == dispatch.TABLE
    gpu_files = []
    for path in glob.glob(os.path.join(root, "benchmarks", "results", "*.json")):
        with open(path) as f:
            if json.load(f).get("meta", {}).get("device_type") == "cuda":
                gpu_files.append(os.path.relpath(path, root))
    for row in rows:
        cited = re.findall(r"benchmarks/results/[^\s:,;]+\.json", row["evidence"])
        assert cited and all(c in gpu_files for c in cited), row
    if not gpu_files:
        assert rows == []
    with pytest.raises(ValueError, match="evidence must name the committed benchmarks/results/ file"):
        dispatch._validate_row(0, dict(device="cuda:sm_90", op="atrous_conv", dtype="*", shape_class="*",
                                       backend="triton", evidence="it felt fast"))
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch._validate_row(0, dict(device="cuda:sm_90", op="atrous_conv", dtype="*", shape_class="*",
                                       backend="cuda", evidence="benchmarks/results/x.json"))


def test_auto_on_cpu_runs_torch(monkeypatch):
    calls = []
    monkeypatch.setattr(functional, "run_atrous_conv",
                        lambda backend, *a: calls.append(backend) or torch_backend.atrous_conv(*a))
    args = atrous_args()
    assert functional.resolve_backend("auto", args[0]) == "torch"
    call(args)
    assert calls == ["torch"]


class FakeCuda:
    """Stands in for a CUDA tensor on this CPU-only machine (what resolve / explain read)."""

    is_cuda = True
    device = torch.device("cuda", 0)
    dtype = torch.bfloat16
    shape = (16, 2048, 33, 33)


def _fake_gpu(monkeypatch, cls="cuda:sm_90"):
    monkeypatch.setattr(dispatch, "device_class", lambda d: cls if d.type == "cuda" else d.type)
    monkeypatch.setattr(_extension, "cuda_kernels_built", lambda: True)  # built, yet never verified


def test_cuda_without_measurement_runs_torch_and_says_why(monkeypatch):
    _fake_gpu(monkeypatch)
    for op in dispatch.OPS:
        backend, why = dispatch.explain(op, FakeCuda())
        assert backend == "torch"
        assert why == "no committed measurement for cuda:sm_90: torch backend (cuDNN)"
    assert functional.resolve_backend("auto", FakeCuda()) == "torch"
    # What `python -m aspp_fused.info` prints for a GPU here.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    picks = dispatch.describe()["picks"]
    assert ("cuda:0", "atrous_conv", "torch", "no committed measurement for cuda:sm_90: torch backend (cuDNN)") in picks
    assert ("cpu", "separable_conv", "torch", "no committed measurement for cpu: torch backend (oneDNN)") in picks


def test_table_row_decides_when_it_matches(monkeypatch):
    _fake_gpu(monkeypatch)
    row = dict(device="cuda:sm_90", op="atrous_conv", dtype="bfloat16", shape_class="c2048_p32768", backend="cpp",
               evidence="benchmarks/results/2030-01-01_h200.json: aspp_v3_os16")
    generic = dict(row, dtype="*", shape_class="*", backend="torch")
    monkeypatch.setattr(dispatch, "TABLE", [generic, row])
    assert dispatch.shape_class(FakeCuda()) == "c2048_p32768"
    assert dispatch.explain("atrous_conv", FakeCuda()) == ("cpp", "table: cpp (%s)" % row["evidence"])
    assert dispatch.explain("separable_conv", FakeCuda())[0] == "torch"  # no row for that op
    other = type("Other", (FakeCuda,), {"shape": (1, 256, 33, 33)})
    assert dispatch.explain("atrous_conv", other())[0] == "torch"  # only the generic row matches
    assert dispatch.explain("atrous_conv", type("Sm80", (FakeCuda,), {})())[0] == "cpp"
    monkeypatch.setattr(dispatch, "device_class", lambda d: "cuda:sm_80")
    assert dispatch.explain("atrous_conv", FakeCuda())[1].startswith("no committed measurement for cuda:sm_80")
    # A row for a backend this build lacks falls back to torch, saying so.
    monkeypatch.setattr(dispatch, "device_class", lambda d: "cuda:sm_90")
    monkeypatch.setattr(_extension, "cuda_kernels_built", lambda: False)
    backend, why = dispatch.explain("atrous_conv", FakeCuda())
    assert backend == "torch" and "cannot run here (aspp_fused._C built without CUDA kernels)" in why


# --------------------------------------------------------------------------- benchmark mode


def test_set_benchmark_switch(monkeypatch):
    monkeypatch.setattr(dispatch, "_BENCHMARK", False)
    aspp_fused.set_benchmark(True)
    assert aspp_fused.benchmark_enabled()
    aspp_fused.set_benchmark(False)
    assert not aspp_fused.benchmark_enabled()
    with pytest.raises(TypeError, match="enabled must be True or False, got 'yes'"):
        aspp_fused.set_benchmark("yes")


@pytest.mark.parametrize("wrong", ["out", "stats", "grad"])
def test_wrong_stand_in_never_chosen_and_warns_once(bench, wrong):
    """Wrong by 1% in the output, in the batch statistics only, or in the input gradient only; and
    faster than torch (torch sleeps), so only verification keeps it out."""
    dispatch.register_stand_in("bad", {"atrous_conv": torch_runner(**{wrong: 1.01})})
    slow_torch = torch_runner(sleep=0.02)
    orig = functional.run_atrous_conv
    runner = lambda b, *a: slow_torch(*a) if b == "torch" else orig(b, *a)  # noqa: E731
    args = atrous_args(grad=(wrong == "grad"), stats=(wrong == "stats"))
    with pytest.warns(RuntimeWarning, match="backend 'bad' gave a wrong result on cpu") as rec:
        assert dispatch.choose("atrous_conv", args, runner) == "torch"
    assert len([w for w in rec if "gave a wrong result" in str(w.message)]) == 1
    decision = list(dispatch._DECISIONS.values())[0]
    assert decision["rejected"]["bad"].startswith("wrong: ") and "bad" not in decision["times_ms"]
    what = {"out": "output", "stats": "ch_sum", "grad": "gradient of input 0"}[wrong]
    assert what in decision["rejected"]["bad"]
    # Another shape: a fresh decision, but the wrong backend is not even tried again, and no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.choose("atrous_conv", atrous_args(h=5, grad=(wrong == "grad"), stats=(wrong == "stats")),
                               runner) == "torch"
    assert len(dispatch._DECISIONS) == 2 and "bad" not in list(dispatch._DECISIONS.values())[1]["rejected"]
    assert ("bad", "cpu") in dispatch._REJECTED


def test_correct_faster_stand_in_is_chosen_and_runs(bench, monkeypatch):
    orig_torch = torch_backend.atrous_conv
    monkeypatch.setattr(torch_backend, "atrous_conv", torch_runner(sleep=0.02))  # torch is now the slow one
    ran = []

    def fast(*a):
        ran.append(1)
        return orig_torch(*a[:1], list(a[1]), *a[2:])

    dispatch.register_stand_in("fast", {"atrous_conv": fast})
    args = atrous_args(grad=True, stats=True)
    out = call(args)
    decision = list(dispatch._DECISIONS.values())[0]
    assert decision["backend"] == "fast", decision
    assert decision["times_ms"]["fast"] < decision["times_ms"]["torch"]
    assert decision["reason"].startswith("benchmark mode: fastest verified backend (fast ")
    n = len(ran)
    out2 = call(args)  # cached: runs the stand-in once, no new measurement
    assert len(ran) == n + 1 and len(dispatch._DECISIONS) == 1
    expected = orig_torch(*args[:1], list(args[1]), *args[2:])
    for a, b, e in zip(out, out2, expected):
        assert torch.equal(a, b) and torch.equal(a, e)


def test_real_backends_verified_on_cpu(monkeypatch):
    """Benchmark mode with the real candidates of this machine (the compiled CPU kernels): verified,
    timed, one of the two chosen; the caller's tensors, grads and RNG stream untouched."""
    if not _extension.cpp_available():
        pytest.skip("aspp_fused._C not built")
    dispatch.clear_cache()
    monkeypatch.setattr(dispatch, "_BENCHMARK", True)
    monkeypatch.setattr(dispatch, "_CACHE_FILE", None)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            args = atrous_args(dtype=dtype, grad=True, stats=True)
            before = args[0].detach().clone()
            rng = torch.get_rng_state()
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                out = call(args)
            assert torch.equal(torch.get_rng_state(), rng)
            assert torch.equal(args[0], before) and args[0].grad is None
            decision = list(dispatch._DECISIONS.values())[-1]
            assert set(decision["times_ms"]) == {"torch", "cpp"} and not decision["rejected"], decision
            expected = torch_backend.atrous_conv(*args[:1], list(args[1]), *args[2:])
            assert_close_rel(out[0], expected[0], 1e-5 if dtype == torch.float32 else 2e-2, "auto output")
        # Separable, no grad needed: forward and statistics verified.
        m = randomize_bn(ann.FusedSeparableAtrousConv(5, 6, 2)).eval()
        x = torch.randn(2, 5, 6, 7)
        with torch.no_grad():
            y = m(x)
        assert_close_rel(y, m.to_reference()(x), 1e-5, "separable")
        assert list(dispatch._DECISIONS)[-1][0] == "separable_conv"
    finally:
        dispatch.clear_cache()


def test_cache_keyed_per_shape_stride_dtype_and_grad(bench, monkeypatch):
    dispatch.register_stand_in("fast", {"atrous_conv": torch_runner()})
    runs = []
    orig = dispatch._decide
    monkeypatch.setattr(dispatch, "_decide", lambda *a: runs.append(1) or orig(*a))
    base = atrous_args()
    call(base)
    call(atrous_args(seed=1))                      # same key: new values only
    assert len(runs) == 1
    call(atrous_args(h=8))                         # shape
    x, *rest = atrous_args()
    call((x.contiguous(memory_format=torch.channels_last), *rest))  # strides
    call(atrous_args(dtype=torch.bfloat16))        # dtype
    call(atrous_args(grad=True))                   # requires_grad
    with torch.no_grad():
        call(base)                                 # grad mode
    call(base[:7] + (0, False))                    # static argument (act)
    assert len(runs) == 7 and len(dispatch._DECISIONS) == 7


def test_empty_and_nonfinite_inputs_decide_torch_without_blame(bench):
    dispatch.register_stand_in("bad", {"atrous_conv": torch_runner(out=2.0)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(atrous_args(n=0))
        x, *rest = atrous_args()
        x[0, 0, 0, 0] = float("nan")
        call((x, *rest))
    reasons = [d["reason"] for d in dispatch._DECISIONS.values()]
    assert [d["backend"] for d in dispatch._DECISIONS.values()] == ["torch", "torch"]
    assert "empty input" in reasons[0] and "not finite" in reasons[1]
    assert not dispatch._REJECTED


def test_json_cache_round_trip(bench, tmp_path, monkeypatch):
    if not _extension.cpp_available():
        pytest.skip("aspp_fused._C not built")
    path = tmp_path / "cache.json"
    monkeypatch.setattr(dispatch, "candidates", lambda op, x: ["cpp"])
    dispatch.set_benchmark(True, cache_file=str(path))
    args = atrous_args()
    call(args)
    call(atrous_args(h=4))
    decisions = dict(dispatch._DECISIONS)
    data = json.loads(path.read_text())
    assert data["format"] == dispatch.CACHE_FORMAT and len(data["entries"]) == 2
    dispatch._REJECTED[("cpp", "cuda")] = "wrong: output: relative error 0.5 > 1e-05"
    dispatch.save_cache(str(path))
    dispatch.clear_cache()
    assert dispatch.load_cache(str(path)) == 2
    assert dispatch._DECISIONS == decisions and dispatch._CHOICES == {k: d["backend"] for k, d in decisions.items()}
    assert dispatch._REJECTED == {("cpp", "cuda"): "wrong: output: relative error 0.5 > 1e-05"}
    # A cached key is not measured again.
    monkeypatch.setattr(dispatch, "_decide", lambda *a: pytest.fail("measured a cached key"))
    call(args)
    # Another version's file is ignored, and said so.
    data["torch"] = "0.0"
    path.write_text(json.dumps(data))
    dispatch.clear_cache()
    assert dispatch.load_cache(str(path)) == 0 and "ignored" in dispatch.describe()["cache_file_note"]
    with pytest.raises(ValueError, match="is not an aspp_fused benchmark cache"):
        path.write_text("{}")
        dispatch.load_cache(str(path))


def test_compile_fullgraph_uses_eager_cache(bench, monkeypatch):
    """Under torch.compile nothing is measured: the graph runs what the eager call cached (a
    stand-in that notes when dynamo traces it), or torch for a key never seen eagerly; no graph
    break (fullgraph)."""
    dispatch.register_stand_in("tagged", {"atrous_conv": _tagged})
    m = randomize_bn(ann.FusedASPP(8, [2, 12], out_channels=6)).eval()
    x = torch.randn(2, 8, 7, 9)
    with torch.no_grad():
        monkeypatch.setattr(torch_backend, "atrous_conv", torch_runner(sleep=0.02))  # the stand-in wins
        eager = m(x)
        monkeypatch.setattr(torch_backend, "atrous_conv", _ORIG_ATROUS)
        assert set(dispatch._CHOICES.values()) == {"tagged"}, dispatch._DECISIONS
        n = len(dispatch._DECISIONS)
        torch._dynamo.reset()
        _TAGGED.clear()
        compiled = torch.compile(m, fullgraph=True, backend="eager")
        assert_close_rel(compiled(x), eager, 1e-6, "compiled")
        assert len(_TAGGED) == n, "the compiled graph does not run the cached backend"
        _TAGGED.clear()
        compiled(torch.randn(2, 8, 5, 6))  # a new key under compile: no measurement, torch
        assert len(dispatch._DECISIONS) == n and not _TAGGED
    torch._dynamo.reset()


_TAGGED = []
_ORIG_ATROUS = torch_backend.atrous_conv


def _tagged(x, ws, d, s, t, b, sm, act, stats):
    if torch.compiler.is_compiling():
        _TAGGED.append(1)
    return _ORIG_ATROUS(x, list(ws), d, s, t, b, sm, act, stats)


def test_tracing_never_measures(bench):
    dispatch.register_stand_in("fast", {"atrous_conv": torch_runner()})
    args = atrous_args()
    from torch.fx.experimental.proxy_tensor import make_fx

    x, ws, d, sc, sh, b = args[:6]
    make_fx(lambda x, w0, w1, w2, sc, sh, b: call((x, [w0, w1, w2], d, sc, sh, b) + args[6:])[0],
            tracing_mode="fake")(x, *ws, sc, sh, b)
    assert not dispatch._DECISIONS
    seen = []

    def probe(x):
        seen.append(dispatch._tracing(x))
        return x * 2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace's own deprecation notice
        torch.jit.trace(probe, (args[0],), check_trace=False)
    assert seen == [True] and not dispatch._tracing(args[0])


def test_threads_get_one_decision_and_the_same_answers(bench):
    """An inference server: one model, eight threads, first calls all at once."""
    decided = []
    orig = dispatch._decide

    def slow_decide(*a):
        decided.append(threading.get_ident())
        time.sleep(0.05)  # widen the window in which the other threads arrive
        return orig(*a)

    dispatch._decide = slow_decide
    dispatch.register_stand_in("fast", {"atrous_conv": torch_runner()})
    m = randomize_bn(ann.FusedASPP(8, [2, 12], out_channels=6)).eval()
    x = torch.randn(2, 8, 7, 9)

    def serve(i):
        with torch.no_grad():
            return m(x)

    try:
        results = run_in_threads(serve, 8)
    finally:
        dispatch._decide = orig
    assert len(decided) == len(dispatch._DECISIONS) == len(set(dispatch._DECISIONS))
    for r in results[1:]:
        assert torch.equal(r, results[0])
    with torch.no_grad():
        assert_close_rel(results[0], m.to_reference()(x), 1e-5, "threaded output")


def test_tolerance_rule():
    assert dispatch.tolerance(torch.float64, 0.0) == 1e-10
    assert dispatch.tolerance(torch.float32, 1e-7) == 1e-5
    assert dispatch.tolerance(torch.float32, 1e-3) == 2e-3  # TF32 convolutions
    assert dispatch.tolerance(torch.bfloat16, 0.01) == 0.02
    assert dispatch.tolerance(torch.bfloat16, 0.0) == torch.finfo(torch.bfloat16).eps


def test_separable_wrong_gradient_stand_in_rejected(bench):
    """separable_conv: a stand-in whose forward and statistics are right but whose depthwise-weight
    gradient is off by 1% is caught by the backward check."""
    from test_ops import separable_problem

    x, dw, d, ms, msh, pw, s, t, b = separable_problem(dtype=torch.float32)
    for w in [x] + [w for w in dw if w is not None] + pw:
        w.requires_grad_(True)

    def wrong(x, dw, d, ms, msh, mid_act, pw, s, t, b, act, stats):
        dw = [None if w is None else ScaleGrad.apply(w, 1.01) for w in dw]
        return torch_backend.separable_conv(x, dw, d, ms, msh, mid_act, pw, s, t, b, act, stats)

    dispatch.register_stand_in("bad", {"separable_conv": wrong})
    with pytest.warns(RuntimeWarning, match="backend 'bad' gave a wrong result"):
        out = aspp_fused.separable_conv(x, dw, d, ms, msh, "relu", pw, s, t, b, compute_stats=True)
    decision = list(dispatch._DECISIONS.values())[0]
    assert decision["backend"] == "torch" and "gradient of input" in decision["rejected"]["bad"], decision
    expected = torch_backend.separable_conv(x, dw, d, ms, msh, 1, pw, s, t, b, 1, True)
    for a, e in zip(out, expected):
        assert torch.equal(a, e)


def test_info_prints_picks_mode_and_cache(bench, capsys):
    from aspp_fused import info

    dispatch.register_stand_in("fast", {"atrous_conv": torch_runner()})
    call(atrous_args())
    info.print_auto_section()
    text = capsys.readouterr().out
    assert "cpu      atrous_conv     torch   no committed measurement for cpu: torch backend (oneDNN)" in text
    assert "benchmark mode: on" in text and "cache: 1 decision(s)" in text
    assert "atrous_conv cpu x2x5x7x9 float32 +grad -> " in text


def test_environment_switch_and_cache_file_at_import(tmp_path, monkeypatch):
    """ASPP_FUSED_BENCHMARK=1 and ASPP_FUSED_BENCHMARK_CACHE are read at import; the file's
    decisions are there before any call (so a first compiled call can use them)."""
    if not _extension.cpp_available():
        pytest.skip("aspp_fused._C not built")
    import os
    import subprocess
    import sys

    path = tmp_path / "cache.json"
    dispatch.clear_cache()
    monkeypatch.setattr(dispatch, "_BENCHMARK", True)
    monkeypatch.setattr(dispatch, "_CACHE_FILE", str(path))
    monkeypatch.setattr(dispatch, "candidates", lambda op, x: ["cpp"])
    try:
        call(atrous_args())
        key, backend = next(iter(dispatch._CHOICES.items()))
    finally:
        dispatch.clear_cache()
    env = dict(os.environ, ASPP_FUSED_BENCHMARK="1", ASPP_FUSED_BENCHMARK_CACHE=str(path))
    code = ("import aspp_fused; from aspp_fused import dispatch; "
            "print(aspp_fused.benchmark_enabled(), len(dispatch._CHOICES), repr(list(dispatch._CHOICES.items())))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True 1 %r" % ([(key, backend)],)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_auto_is_torch_until_measured_and_benchmark_verifies(dtype):
    """On a real GPU: no committed row -> torch, saying why; benchmark mode verifies every available
    backend (cpp CUDA kernels when built, Triton) on the input and picks among the verified ones."""
    args = atrous_args(n=2, c=64, h=33, w=33, dtype=dtype, grad=True, stats=True)
    args = tuple([t.cuda() for t in a] if isinstance(a, list) and isinstance(a[0], torch.Tensor)
                 else a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    x = args[0]
    p = torch.cuda.get_device_properties(x.device)
    assert dispatch.explain("atrous_conv", x) == (
        "torch", "no committed measurement for cuda:sm_%d%d: torch backend (cuDNN)" % (p.major, p.minor))
    dispatch.clear_cache()
    aspp_fused.set_benchmark(True)
    try:
        out = call(args)
        decision = list(dispatch._DECISIONS.values())[0]
        assert decision["backend"] in decision["times_ms"], decision
        low = torch_backend.atrous_conv(*args[:1], list(args[1]), *args[2:])[0]
        a64 = tuple([t.double() for t in a] if isinstance(a, list) and isinstance(a[0], torch.Tensor)
                    else a.double() if isinstance(a, torch.Tensor) else a for a in args)
        exact = torch_backend.atrous_conv(*a64)[0]
        limit = dispatch.tolerance(dtype, dispatch._rel_err(low, exact))
        assert dispatch._rel_err(out[0], exact) <= limit
        print("benchmark decision:", decision)
    finally:
        aspp_fused.set_benchmark(False)
        dispatch.clear_cache()


@needs_triton
@pytest.mark.usefixtures("no_tf32")  # conftest: TF32 off, as the first assert expects
def test_tf32_follows_cudnn_switch():
    from aspp_fused.kernels._common import dot_precision

    assert dot_precision(torch.float32) == "ieee"  # the no_tf32 fixture turned TF32 off
    torch.backends.cudnn.allow_tf32 = True
    assert dot_precision(torch.float32) == "tf32"
    assert dot_precision(torch.bfloat16) == "tf32"
