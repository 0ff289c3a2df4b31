"""What ``backend="auto"`` runs: committed evidence, or a measurement on the very input.

Two sources, in this order:

1. **Benchmark mode** (off by default; ``aspp_fused.set_benchmark(True)`` or the environment switch
   ``ASPP_FUSED_BENCHMARK=1``, read at import), in the spirit of ``torch.backends.cudnn.benchmark``.
   On the first eager call per key (op, every tensor's shape / strides / dtype / requires_grad,
   the op's static arguments, device class, grad mode, TF32 switch) each available backend runs
   on that very input and is checked against the torch backend with the tolerance rule of the
   tests (``tolerance`` below): the forward outputs, the batch statistics when the call computes
   them, and the gradients of every input that requires one when the call needs backward. The
   correct ones are timed (forward, plus backward when the call needs it) and the fastest is
   kept for that key (in memory; also in a JSON file when ``ASPP_FUSED_BENCHMARK_CACHE=PATH`` or
   ``set_benchmark(True, cache_file=PATH)``). A backend that gives a wrong answer is reported in
   one warning and never used again on that device type, in this process or (through the cache
   file) a later one.
2. **The table** ``dispatch_table.json`` (package data), else the **torch backend** (cuDNN on
   CUDA, oneDNN on CPU). No row: torch.

The choice is made outside any traced graph. Under torch.compile / torch.export (dynamo),
``torch.jit.trace``, fake tensors (make_fx), functorch transforms and CUDA graph capture nothing is
measured: ``auto`` takes the choice an earlier eager call cached for the same key (benchmark mode
on, concrete shapes), or the table, else torch. Symbolic shapes (``dynamic=True``) see only the
table's shape-generic rows (``"shape_class": "*"``), since a choice made at one size must not be
baked into a graph that runs at every size. All of it is plain Python that dynamo traces without
a graph break.

Candidates: the torch backend, the compiled backend (its CPU kernels on CPU tensors, its CUDA
kernels when built), Triton on CUDA tensors only (on CPU it runs under the interpreter, a test
tool). A backend that raises on an input is left out for that key, not banned. Inputs that
cannot be verified (empty, or a non-finite float64 result) get the table's choice. The
verification and timing runs use private copies of the arguments and a private RNG, so the
caller's tensors, gradients and random stream are untouched. In benchmark mode the eval-mode
modules do not use their folded-weight cache (aspp_fused/nn/_fold_cache.py), so that eager calls and
compiled graphs look up the same keys; that costs one weight multiply per call.

Thread safety: the decisions are made under one lock; a key is decided once and every thread
then reads the same answer (a cached key is a lock-free dict read).

TABLE SCHEMA (``dispatch_table.json``)::

    {"schema": "...", "rows": [ROW, ...]}
    ROW = {"device": "cuda:sm_90",          # device_class(): "cpu" or "cuda:sm_<major><minor>"
           "op": "atrous_conv",             # or "separable_conv"
           "dtype": "bfloat16",             # float32 | float64 | bfloat16 | float16 | "*"
           "shape_class": "c2048_p16384",   # shape_class() of the input, or "*" (any size)
           "backend": "triton",             # torch | cpp | triton
           "evidence": "benchmarks/results/<date>_<device>.json: case aspp_v3_os16, fused_triton 1.8x fused_torch,
                        bf16 infer + train; `make gpu-check` gpu tests passed on the same device"}

A row is added only from a committed GPU results file (``make bench`` / ``make gpu-check`` on that
device, ``benchmarks/results/``): the backend's ``fused_<backend>`` provider beats ``fused_torch``
in that file for the op's cases at that dtype, in inference and in training, and the ``gpu`` tests
passed on the same device class. ``evidence`` names the file and the cases. The first matching
row wins, most specific first: exact dtype and shape class, then ``"*"``. Today no kernel of this
package has run on a GPU, so the table is empty and ``auto`` is the torch backend everywhere.

Benchmark-mode cache file (JSON)::

    {"format": "aspp_fused benchmark cache 1", "aspp_fused": VERSION, "torch": VERSION,
     "entries": [{"key": KEY, "backend": NAME, "reason": TEXT, "times_ms": {NAME: MS}, "rejected": {NAME: TEXT}}],
     "rejected": [{"backend": NAME, "device_type": "cuda", "reason": TEXT}]}

KEY is the in-memory key as nested lists (``make_key``). A file written by another version of
aspp_fused or torch is ignored (its kernels or their speeds may differ) and overwritten.
"""
import contextlib
import json
import math
import os
import statistics
import tempfile
import threading
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

OPS = ("atrous_conv", "separable_conv")
REAL_BACKENDS = ("torch", "cpp", "triton")
DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
               torch.float16: "float16"}

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dispatch_table.json")
CACHE_FORMAT = "aspp_fused benchmark cache 1"

# Timing of each verified backend: one warm-up (the verification run before it already compiled
# and autotuned), then at least MIN_RUNS and at most MAX_RUNS timed runs, stopping after
# BUDGET_S of timed runs; the median is compared. On a GPU a DESIGN-sized ASPP forward is ~1-10 ms,
# so this is a fraction of a second per backend, once per key (cudnn.benchmark spends about as much).
MIN_RUNS, MAX_RUNS, BUDGET_S = 3, 20, 0.2

_LOCK = threading.RLock()
_BENCHMARK = os.environ.get("ASPP_FUSED_BENCHMARK", "0").lower() in ("1", "true", "yes", "on")
_CACHE_FILE: Optional[str] = os.environ.get("ASPP_FUSED_BENCHMARK_CACHE") or None
_CACHE_FILE_NOTE = ""
_CHOICES: Dict[tuple, str] = {}  # key -> backend; the only thing read on the hot path and under tracing
_DECISIONS: Dict[tuple, dict] = {}  # key -> {"backend", "reason", "times_ms", "rejected"}
_REJECTED: Dict[Tuple[str, str], str] = {}  # (backend, device type) -> why it was wrong
_WARNED = set()
# Test-only stand-in backends: name -> {"ops": {op: fn}, "device_types": (...)}. fn takes the
# same arguments as the op's real runners (functional.run_atrous_conv / run_separable_conv minus
# the backend name) and returns (out, ch_sum, ch_sumsq).
_STAND_INS: Dict[str, dict] = {}


# --------------------------------------------------------------------------- switches


def set_benchmark(enabled: bool, cache_file: Optional[str] = None) -> None:
    """Turns benchmark mode on or off (see the module docstring). ``cache_file``: a JSON file the
    decisions are read from now and written to after each new one (``None`` keeps the current
    setting; ``ASPP_FUSED_BENCHMARK_CACHE`` sets it at import)."""
    global _BENCHMARK, _CACHE_FILE
    if not isinstance(enabled, bool):
        raise TypeError("set_benchmark: enabled must be True or False, got %r" % (enabled,))
    with _LOCK:
        _BENCHMARK = enabled
        if cache_file is not None:
            _CACHE_FILE = os.fspath(cache_file)
            load_cache(_CACHE_FILE)


def benchmark_enabled() -> bool:
    return _BENCHMARK


def cache_file() -> Optional[str]:
    return _CACHE_FILE


def clear_cache() -> None:
    """Forgets every decision and rejection of this process (not the cache file)."""
    with _LOCK:
        _CHOICES.clear()
        _DECISIONS.clear()
        _REJECTED.clear()
        _WARNED.clear()


def register_stand_in(name: str, fns: Dict[str, Callable], device_types=("cpu",)) -> None:
    """Test-only: a stand-in backend benchmark mode considers like a real one (it is verified and
    timed the same way). ``fns``: op name -> runner. ``unregister_stand_in`` removes it."""
    if name in REAL_BACKENDS or name == "auto":
        raise ValueError("register_stand_in: name must not be a real backend, got %r" % (name,))
    for op in fns:
        if op not in OPS:
            raise ValueError("register_stand_in: op must be one of %s, got %r" % (", ".join(OPS), op))
    with _LOCK:
        _STAND_INS[name] = {"ops": dict(fns), "device_types": tuple(device_types)}


def unregister_stand_in(name: str) -> None:
    with _LOCK:
        _STAND_INS.pop(name, None)
        for key in [k for k, b in _CHOICES.items() if b == name]:
            del _CHOICES[key]
            del _DECISIONS[key]


def is_stand_in(name: str) -> bool:
    return name in _STAND_INS


def stand_in(name: str, op: str) -> Optional[Callable]:
    entry = _STAND_INS.get(name)
    return None if entry is None else entry["ops"].get(op)


# --------------------------------------------------------------------------- device and shape classes


def device_class(device: torch.device) -> str:
    """The table's device key: "cpu", or "cuda:sm_<major><minor>" (compute capability).
    Tests replace it to stand for a GPU. get_device_properties is constant-folded by dynamo."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return "cuda:sm_%d%d" % (p.major, p.minor)
    return device.type


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 2 ** math.ceil(math.log2(n))


def shape_class(x: torch.Tensor) -> str:
    """The table's shape key: input channels and pixels (N*H*W) rounded up to powers of two,
    "c<C>_p<P>" (DESIGN's OS16 case, batch 16 x 2048 x 33 x 33: "c2048_p32768"). "*" for
    symbolic shapes."""
    n, c, h, w = x.shape
    if not all(isinstance(s, int) for s in (n, c, h, w)):
        return "*"
    return "c%d_p%d" % (_pow2(c), _pow2(n * h * w))


def _torch_library_name(device_type: str) -> str:
    return "cuDNN" if device_type == "cuda" else "oneDNN" if device_type == "cpu" else "ATen"


# --------------------------------------------------------------------------- the table


def _validate_row(i, row):
    fields = ("device", "op", "dtype", "shape_class", "backend", "evidence")
    if not isinstance(row, dict) or set(row) != set(fields):
        raise ValueError("dispatch table row %d must have exactly the fields %s, got %r" % (i, fields, row))
    if row["op"] not in OPS:
        raise ValueError("dispatch table row %d: op must be one of %s, got %r" % (i, OPS, row["op"]))
    if row["dtype"] not in tuple(DTYPE_NAMES.values()) + ("*",):
        raise ValueError("dispatch table row %d: dtype must be a float dtype name or '*', got %r" % (i, row["dtype"]))
    if row["backend"] not in REAL_BACKENDS:
        raise ValueError("dispatch table row %d: backend must be one of %s, got %r" % (i, REAL_BACKENDS,
                                                                                       row["backend"]))
    if not (isinstance(row["evidence"], str) and "benchmarks/results/" in row["evidence"]):
        raise ValueError("dispatch table row %d: evidence must name the committed benchmarks/results/ file, got %r"
                         % (i, row["evidence"]))


def load_table(path: str = TABLE_PATH) -> List[dict]:
    with open(path) as f:
        data = json.load(f)
    rows = data.get("rows")
    if not isinstance(rows, list):
        raise ValueError("%s: 'rows' must be a list, got %r" % (os.path.basename(path), type(rows).__name__))
    for i, row in enumerate(rows):
        _validate_row(i, row)
    return rows


TABLE: List[dict] = load_table()


def table_row(dev_class: str, op: str, dtype_name: str, shape_cls: str) -> Optional[dict]:
    """The most specific row for this situation, or None."""
    best, best_rank = None, -1
    for row in TABLE:
        if row["device"] != dev_class or row["op"] != op:
            continue
        if row["dtype"] not in (dtype_name, "*") or row["shape_class"] not in (shape_cls, "*"):
            continue
        rank = (row["dtype"] != "*") * 2 + (row["shape_class"] != "*")
        if rank > best_rank:
            best, best_rank = row, rank
    return best


def _unavailable(name: str, device_type: str, dtype_name: str) -> str:
    """Why backend ``name`` cannot run here ("" when it can). Plain checks on constants, so the
    traced path may call it (assume_constant_result: evaluated once at trace time)."""
    from aspp_fused import _extension

    if name == "torch":
        return ""
    if name in _STAND_INS:
        return "" if device_type in _STAND_INS[name]["device_types"] else "stand-in not for %s" % device_type
    if name == "cpp":
        if not _extension.cpp_available():
            return "aspp_fused._C not loaded (%s)" % _extension.LOAD_ERROR
        if device_type == "cuda" and not _extension.cuda_kernels_built():
            return "aspp_fused._C built without CUDA kernels"
        if device_type not in ("cpu", "cuda"):
            return "no kernels for %s" % device_type
        return ""
    if name == "triton":
        # Only CUDA: on CPU the Triton kernels run under the interpreter, a test tool, not a
        # path to time or to pick.
        if device_type != "cuda":
            return "the Triton kernels run on CUDA tensors"
        if dtype_name == "float64":
            return "no float64 Triton kernels"
        try:
            import triton  # noqa: F401
        except Exception as exc:
            return "triton not importable (%s)" % type(exc).__name__
        return ""
    return "unknown backend %r" % name


_unavailable_traced = torch.compiler.assume_constant_result(_unavailable)


def explain(op: str, x: torch.Tensor) -> Tuple[str, str]:
    """(backend, why) from the table alone: what ``auto`` runs when nothing was measured here."""
    dtype_name = DTYPE_NAMES.get(x.dtype, str(x.dtype))
    return explain_for(op, x.device, dtype_name, shape_class(x) if TABLE else "*")


def explain_for(op: str, device: torch.device, dtype_name: str, shape_cls: str) -> Tuple[str, str]:
    dev_type = device.type
    dev_class = device_class(device)
    default = "torch backend (%s)" % _torch_library_name(dev_type)
    if not TABLE:
        return "torch", "no committed measurement for %s: %s" % (dev_class, default)
    row = table_row(dev_class, op, dtype_name, shape_cls)
    if row is None:
        return "torch", "no committed measurement for %s, %s, %s, shape class %s: %s" % (
            dev_class, op, dtype_name, shape_cls, default)
    why_not = (_unavailable_traced if torch.compiler.is_compiling() else _unavailable)(row["backend"], dev_type,
                                                                                         dtype_name)
    if why_not:
        return "torch", "table picks %s for %s, %s, %s, but it cannot run here (%s): %s" % (
            row["backend"], dev_class, op, dtype_name, why_not, default)
    return row["backend"], "table: %s (%s)" % (row["backend"], row["evidence"])


def static_choice(op: str, x: torch.Tensor) -> str:
    if not TABLE:  # the per-call path: no device query while there is nothing to look up
        return "torch"
    return explain(op, x)[0]


# --------------------------------------------------------------------------- keys


def _tensor_key(t):
    if t is None:
        return None
    return (tuple(t.shape), tuple(t.stride()), DTYPE_NAMES.get(t.dtype, str(t.dtype)), t.requires_grad)


def make_key(op: str, args: tuple) -> tuple:
    """(op, device class, grad mode, TF32 switch, per argument: a tensor's (shape, strides, dtype,
    requires_grad), a list of those, or the static value). Only primitives: it round-trips
    through JSON."""
    x = args[0]
    parts = [op, device_class(x.device), torch.is_grad_enabled(),
             x.device.type == "cuda" and torch.backends.cudnn.allow_tf32]
    for a in args:
        if isinstance(a, torch.Tensor) or a is None:
            parts.append(_tensor_key(a))
        elif isinstance(a, (list, tuple)):
            parts.append(tuple(_tensor_key(t) if isinstance(t, torch.Tensor) or t is None else t for t in a))
        else:
            parts.append(a)
    return tuple(parts)


def _as_tuple(v):
    return tuple(_as_tuple(e) for e in v) if isinstance(v, list) else v


def _describe_key(key) -> str:
    op, dev_class, grad = key[0], key[1], key[2]
    x = key[4]
    return "%s %s x%s %s%s" % (op, dev_class, "x".join(map(str, x[0])), x[2], " +grad" if grad else "")


# --------------------------------------------------------------------------- choosing


def _tracing(x: torch.Tensor) -> bool:
    """Anything that records the ops instead of (only) running them: no measuring there."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    if torch._C._len_torch_dispatch_stack() > 0:  # fake tensors, make_fx, functionalization
        return True
    if torch._C._functorch.peek_interpreter_stack() is not None:  # vmap / grad transforms
        return True
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(x) or x.device.type == "meta":
        return True
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def choose(op: str, args: tuple, runner: Callable) -> str:
    """The backend ``auto`` runs for this call. ``args``: the op's runner arguments (x first);
    ``runner(backend, *args)`` runs one backend."""
    x = args[0]
    # is_compiling() first: dynamo folds it to True and never traces _tracing (is_fake is not traceable).
    if torch.compiler.is_compiling() or not _BENCHMARK or _tracing(x):
        if _BENCHMARK and all(isinstance(s, int) for s in x.shape):
            cached = _CHOICES.get(make_key(op, args))
            if cached is not None:
                return cached
        return static_choice(op, x)
    key = make_key(op, args)
    cached = _CHOICES.get(key)
    if cached is not None:
        return cached
    with _LOCK:
        cached = _CHOICES.get(key)
        if cached is not None:
            return cached
        decision = _decide(op, args, runner)
        _DECISIONS[key] = decision
        _CHOICES[key] = decision["backend"]
        if _CACHE_FILE:
            try:
                save_cache(_CACHE_FILE)
            except OSError as exc:  # the decision stands in memory; say once why the file is not kept
                if ("cache file", _CACHE_FILE) not in _WARNED:
                    _WARNED.add(("cache file", _CACHE_FILE))
                    warnings.warn("aspp_fused: cannot write the benchmark cache %s (%s); decisions are kept in "
                                  "memory only" % (_CACHE_FILE, exc), RuntimeWarning, stacklevel=3)
        return decision["backend"]


def candidates(op: str, x: torch.Tensor) -> List[str]:
    """The backends benchmark mode tries for op on x besides torch (real ones, then stand-ins)."""
    dtype_name = DTYPE_NAMES.get(x.dtype, str(x.dtype))
    names = [b for b in ("cpp", "triton") if not _unavailable(b, x.device.type, dtype_name)]
    return names + [b for b in list(_STAND_INS) if stand_in(b, op) is not None
                    and not _unavailable(b, x.device.type, dtype_name)]


# --------------------------------------------------------------------------- verification


def tolerance(dtype: torch.dtype, torch_err: float) -> float:
    """The tests' rule (tests/test_ops.py, DESIGN "Precision"), as relative error (max |diff| /
    max |reference|) against the float64 torch backend: float64 1e-10; float32 1e-5, or twice the
    torch backend's own float32 error when that is larger (TF32 convolutions); bfloat16 / float16
    twice the torch backend's own error in that dtype, and never below one unit of that dtype's
    precision (a relative error that small is the output's own rounding, which a torch result
    that happens to be exact would otherwise forbid)."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return max(1e-5, 2 * torch_err)
    return max(2 * torch_err, torch.finfo(dtype).eps)


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if expected.numel() == 0:
        return 0.0
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def _tensors(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            for t in a:
                if isinstance(t, torch.Tensor):
                    yield t


def _copy_args(args, needs_grad, dtype=None):
    """Fresh leaves (detached copies, float64 when ``dtype``), requiring grad where the caller's do."""
    def cp(t):
        if not isinstance(t, torch.Tensor):
            return t
        c = t.detach()
        c = c.to(dtype) if dtype is not None and c.is_floating_point() else c.clone()
        return c.requires_grad_(needs_grad and t.requires_grad)

    return tuple([cp(t) for t in a] if isinstance(a, (list, tuple)) else cp(a) for a in args)


class _Upstream:
    """Fixed upstream gradients (a private generator: the caller's RNG stream is untouched)."""

    def __init__(self, ref_out):
        out, s, _ = ref_out
        gen = torch.Generator(device=out.device)
        gen.manual_seed(0)
        kw = dict(dtype=torch.float64, device=out.device, generator=gen)
        # Not summing to ~0 (which would make the shift gradient ~0 and its relative error meaningless).
        self.g_out = torch.rand(out.shape, **kw) + 0.5
        self.g_sum = torch.randn(s.shape, **kw)
        self.g_sumsq = torch.randn(s.shape, **kw) / max(out.numel(), 1)


def _forward(runner, name, args, needs_grad):
    with torch.enable_grad() if needs_grad else torch.no_grad():
        return list(runner(name, *args))


def _results(outs, args, needs_grad, upstream):
    """[out, ch_sum, ch_sumsq] and, when the call needs backward, the gradient of every input
    that requires one, of a fixed loss over the output and the statistics."""
    results = [o.detach() for o in outs]
    if needs_grad:
        leaves = [t for t in _tensors(args) if t.requires_grad]
        loss = (outs[0].double() * upstream.g_out).sum()
        if outs[1].numel():
            loss = loss + (outs[1].double() * upstream.g_sum).sum() + (outs[2].double() * upstream.g_sumsq).sum()
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        results += [None if g is None else g.detach() for g in grads]
    return results


def _evaluate(runner, name, args, needs_grad, upstream):
    return _results(_forward(runner, name, args, needs_grad), args, needs_grad, upstream)


def _names(n_grads):
    return ["output", "ch_sum", "ch_sumsq"] + ["gradient of input %d" % i for i in range(n_grads)]


def _compare(cand, ref, low, dtype) -> str:
    """"" when every quantity is within tolerance, else what was wrong."""
    for name, c, r, l in zip(_names(len(ref) - 3), cand, ref, low):
        if r is None:
            if c is not None and c.abs().max() != 0:
                return "%s: nonzero where the torch backend has none" % name
            continue
        if c is None:
            c = torch.zeros_like(r)
        if tuple(c.shape) != tuple(r.shape):
            return "%s: shape %s, expected %s" % (name, tuple(c.shape), tuple(r.shape))
        if l is not None and c.dtype != l.dtype:
            return "%s: dtype %s, expected %s" % (name, c.dtype, l.dtype)
        err = _rel_err(c, r)
        limit = tolerance(dtype, 0.0 if l is None else _rel_err(l, r))
        if not err <= limit:  # NaN fails too
            return "%s: relative error %.3g > %.3g" % (name, err, limit)
    return ""


def _time(runner, name, args, needs_grad, g_out):
    leaves = [t for t in _tensors(args) if t.requires_grad] if needs_grad else []
    sync = torch.cuda.synchronize if args[0].is_cuda else (lambda: None)

    def step():
        with torch.enable_grad() if needs_grad else torch.no_grad():
            out = runner(name, *args)[0]
        if leaves:
            torch.autograd.grad([out], leaves, [g_out.to(out.dtype)], allow_unused=True)

    step()
    sync()
    times: List[float] = []
    while len(times) < MAX_RUNS and (len(times) < MIN_RUNS or sum(times) < BUDGET_S):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _reject(name, device_type, why):
    _REJECTED[(name, device_type)] = why
    if (name, device_type) not in _WARNED:
        _WARNED.add((name, device_type))
        warnings.warn("aspp_fused: backend %r gave a wrong result on %s (%s); backend='auto' will not use it on %s "
                      "again (benchmark mode). Please report it with `python -m aspp_fused.info`."
                      % (name, device_type, why, device_type), RuntimeWarning, stacklevel=4)


def _decide(op, args, runner) -> dict:
    x = args[0]
    dev_type = x.device.type
    static, static_why = explain(op, x)
    names = [n for n in candidates(op, x) if (n, dev_type) not in _REJECTED]
    decision = {"backend": "torch", "reason": "", "times_ms": {}, "rejected": {}}
    if not names:
        decision.update(backend=static, reason="benchmark mode: no other backend to try here; " + static_why)
        return decision
    if x.numel() == 0:
        decision.update(backend=static, reason="benchmark mode: empty input, nothing to verify; " + static_why)
        return decision
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in _tensors(args))
    with torch.autocast(dev_type, enabled=False) if dev_type in ("cpu", "cuda") else contextlib.nullcontext():
        ref_args = _copy_args(args, needs_grad, torch.float64)
        ref_outs = _forward(runner, "torch", ref_args, needs_grad)
        upstream = _Upstream(ref_outs)
        ref = _results(ref_outs, ref_args, needs_grad, upstream)
        if not all(r is None or bool(torch.isfinite(r).all()) for r in ref):
            decision.update(backend="torch", reason="benchmark mode: the float64 result of this input is not finite, "
                                                    "so no backend can be verified on it: torch backend")
            return decision
        low = ref if x.dtype == torch.float64 else _evaluate(runner, "torch", _copy_args(args, needs_grad), needs_grad,
                                                             upstream)
        times = {"torch": _time(runner, "torch", _copy_args(args, needs_grad), needs_grad, upstream.g_out)}
        for name in names:
            try:
                cand = _evaluate(runner, name, _copy_args(args, needs_grad), needs_grad, upstream)
            except Exception as exc:  # a backend that cannot take this input is not wrong, just not a candidate
                decision["rejected"][name] = "raised %s: %s" % (type(exc).__name__, str(exc).splitlines()[0][:200]
                                                                 if str(exc) else "")
                continue
            wrong = _compare(cand, ref, low, x.dtype)
            if wrong:
                decision["rejected"][name] = "wrong: " + wrong
                _reject(name, dev_type, wrong)
                continue
            times[name] = _time(runner, name, _copy_args(args, needs_grad), needs_grad, upstream.g_out)
    best = min(times, key=lambda n: (times[n], n != "torch"))  # torch wins a tie
    verified = ", ".join("%s %.3g ms" % (n, t) for n, t in sorted(times.items(), key=lambda kv: kv[1]))
    decision.update(backend=best, times_ms=times,
                    reason="benchmark mode: fastest verified backend (%s)%s" % (
                        verified, "; not used: " + "; ".join("%s %s" % kv for kv in decision["rejected"].items())
                        if decision["rejected"] else ""))
    return decision


# --------------------------------------------------------------------------- the cache file


def _versions():
    import aspp_fused

    return aspp_fused.__version__, torch.__version__


def save_cache(path: str) -> None:
    """Writes every decision and rejection of this process to ``path`` (atomically), keeping the
    entries of other keys already in the file."""
    with _LOCK:
        entries = {}
        rejected = {}
        if os.path.exists(path):
            try:
                old = _read_cache(path)
            except (OSError, ValueError):
                old = None
            if old is not None:
                entries = {e["key"]: e for e in old[0]}
                rejected = dict(old[1])
        for key, d in _DECISIONS.items():
            if d["backend"] in REAL_BACKENDS:  # stand-ins are test-only
                entries[key] = dict(d, key=key)
        for k, why in _REJECTED.items():
            if k[0] in REAL_BACKENDS:
                rejected[k] = why
        version, torch_version = _versions()
        data = {"format": CACHE_FORMAT, "aspp_fused": version, "torch": torch_version,
                "entries": [dict(e, key=list(_listify(k))) for k, e in entries.items()],
                "rejected": [{"backend": b, "device_type": dt, "reason": why} for (b, dt), why in rejected.items()]}
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".aspp_fused_cache_", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)


def _listify(v):
    return [_listify(e) for e in v] if isinstance(v, tuple) else v


def _read_cache(path):
    """(entries, rejected) of a cache file of this version, or None for another version."""
    global _CACHE_FILE_NOTE
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        raise ValueError("%s is not an aspp_fused benchmark cache (format %r, expected %r)"
                         % (path, data.get("format") if isinstance(data, dict) else None, CACHE_FORMAT))
    if (data.get("aspp_fused"), data.get("torch")) != _versions():
        _CACHE_FILE_NOTE = "%s was written by aspp_fused %s / torch %s: ignored, will be overwritten" % (
            path, data.get("aspp_fused"), data.get("torch"))
        return None
    entries = []
    for e in data.get("entries", []):
        entries.append(dict(e, key=_as_tuple(e["key"])))
    rejected = {(r["backend"], r["device_type"]): r["reason"] for r in data.get("rejected", [])}
    return entries, rejected


def load_cache(path: str) -> int:
    """Reads the decisions and rejections in ``path`` (a missing file is an empty cache); returns
    how many decisions were taken. Entries naming a backend that cannot run here are skipped."""
    global _CACHE_FILE_NOTE
    with _LOCK:
        _CACHE_FILE_NOTE = ""
        if not os.path.exists(path):
            return 0
        read = _read_cache(path)
        if read is None:
            return 0
        entries, rejected = read
        _REJECTED.update(rejected)
        taken = 0
        for e in entries:
            key, backend = e["key"], e["backend"]
            dev_type = key[1].split(":")[0]
            dtype_name = key[4][2]
            if backend not in REAL_BACKENDS or _unavailable(backend, dev_type, dtype_name) \
                    or (backend, dev_type) in _REJECTED:
                continue
            _DECISIONS[key] = {k: e[k] for k in ("backend", "reason", "times_ms", "rejected") if k in e}
            _CHOICES[key] = backend
            taken += 1
        return taken


if _BENCHMARK and _CACHE_FILE:
    load_cache(_CACHE_FILE)


# --------------------------------------------------------------------------- for aspp_fused.info


def describe() -> dict:
    """What ``auto`` picks per device and op here (any dtype and size, unless a table row says
    otherwise), and why; the table rows for these devices; the mode and the cache."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    picks, rows = [], []
    for dev in devices:
        for op in OPS:
            backend, why = explain_for(op, dev, "*", "*")
            picks.append((str(dev), op, backend, why))
        rows += [r for r in TABLE if r["device"] == device_class(dev) and r not in rows]
    with _LOCK:
        entries = [(_describe_key(k), d["backend"], d.get("reason", "")) for k, d in _DECISIONS.items()]
        rejected = [(b, dt, why) for (b, dt), why in _REJECTED.items()]
    return {"benchmark": _BENCHMARK, "cache_file": _CACHE_FILE, "cache_file_note": _CACHE_FILE_NOTE,
            "table_rows": len(TABLE), "picks": picks, "rows": rows, "entries": entries, "rejected": rejected}
