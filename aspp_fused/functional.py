"""Functional API: the two fused ops behind one backend switch, with argument checks.

``backend``: ``"auto"`` | ``"torch"`` | ``"cpp"`` | ``"triton"`` (docs/DESIGN.md, "Backends").
Every backend computes the same thing (csrc/aspp_fused.cpp documents the semantics):

    atrous_conv(x, weights, dilations, scale, shift, bias=None, sum_mode=False, act="relu",
                compute_stats=False) -> (out, ch_sum, ch_sumsq)
    separable_conv(x, dw_weights, dilations, mid_scales, mid_shifts, mid_act, pw_weights,
                   scale, shift, bias=None, act="relu", compute_stats=False) -> (out, ...)
"""
import numbers

import torch

from aspp_fused import _extension, dispatch, torch_backend
from aspp_fused._dtypes import acc_dtype
from aspp_fused._tracing import size_checks

BACKENDS = ("auto", "torch", "cpp", "triton")
ACTS = {"none": 0, "identity": 0, None: 0, "relu": 1}
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_backend(backend: str) -> str:
    """Validates a backend name at construction time; returns it."""
    if backend == "cuda":
        raise ValueError("backend must be one of %s, got 'cuda': the CUDA kernels are backend='cpp' on CUDA "
                         "tensors (backend='auto' picks them when they are built)" % ", ".join(map(repr, BACKENDS)))
    if backend not in BACKENDS and not dispatch.is_stand_in(backend):  # a test stand-in is a name too
        raise ValueError("backend must be one of %s, got %r" % (", ".join(map(repr, BACKENDS)), backend))
    if backend == "triton":
        try:
            import triton  # noqa: F401

            # Loads the Triton backend now (at a module's construction, in eager): a first load
            # while torch.compile traces would make dynamo trace its lock and imports (unsupported).
            _extension.triton_kernels()
        except Exception as exc:  # not installed, or broken
            raise RuntimeError(
                "backend='triton' needs the triton package and aspp_fused's Triton kernels, which failed to load "
                "(%s: %s); install triton with "
                "`pip install 'aspp_fused[triton]'` or use backend='torch' / 'cpp'" % (type(exc).__name__, exc)
            ) from exc
    return backend


def resolve_backend(backend: str, x: torch.Tensor, op: str = "atrous_conv") -> str:
    """The concrete backend that runs for input x. For ``"auto"`` this is the choice of the
    table (aspp_fused/dispatch.py), else the torch backend; in benchmark mode the op itself may
    pick a measured faster one per call (dispatch.choose), which computes the same thing."""
    check_backend(backend)
    if backend == "auto":
        # CPU: the ATen composition, measured faster than the readable loops of
        # csrc/cpu (benchmarks/results: 1.0-1.3x eager_cl vs 0.1-0.4x). CUDA: what committed
        # GPU measurements say (dispatch_table.json; none yet), else the ATen composition
        # (cuDNN): the CUDA and Triton kernels have not been verified on a GPU.
        return dispatch.static_choice(op, x)
    if backend == "cpp":
        if not _extension.cpp_available():
            raise RuntimeError(
                "backend='cpp' needs the compiled extension aspp_fused._C, which failed to load (%s); "
                "rebuild with `pip install --no-build-isolation -e .` or use backend='torch'"
                % _extension.LOAD_ERROR
            )
        if x.is_cuda and not _extension.cuda_kernels_built():
            raise RuntimeError(
                "backend='cpp' got a CUDA tensor, but aspp_fused._C was built without CUDA kernels; "
                "rebuild with a CUDA build of torch (see README, build knobs) or use backend='torch'"
            )
    if backend == "triton":
        kernels = _extension.triton_kernels()  # imports triton; TRITON_INTERPRET is read then, once

        if x.device.type == "cpu":
            if not kernels.INTERPRET:
                raise RuntimeError(
                    "backend='triton' got a CPU tensor: the Triton kernels run on CUDA tensors, and on CPU only "
                    "under the Triton interpreter, which must be on (TRITON_INTERPRET=1) before "
                    "aspp_fused.kernels is first imported; use backend='torch' or 'cpp' on CPU"
                )
        elif x.device.type != "cuda":
            raise RuntimeError("backend='triton' runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got a "
                               "tensor on %s" % x.device)
        if x.dtype not in kernels.SUPPORTED_DTYPES:
            raise TypeError(
                "backend='triton' supports float32, bfloat16 and float16 inputs, got %s; use backend='cpp' or "
                "'torch' for float64 (tl.dot has no float64 tensor-core path)" % x.dtype
            )
    return backend


def act_code(act) -> int:
    if isinstance(act, numbers.Integral) and act in (0, 1):
        return int(act)
    if act in ACTS:
        return ACTS[act]
    raise ValueError("act must be 'relu' or 'none', got %r" % (act,))


# --------------------------------------------------------------------------- checks


def _check_x(op, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError("%s: x must be a torch.Tensor, got %s" % (op, type(x).__name__))
    if x.dim() != 4:
        raise ValueError("%s: x must be 4-D [N, C, H, W], got shape %s" % (op, tuple(x.shape)))
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError("%s: x must be float32, float64, bfloat16 or float16, got %s" % (op, x.dtype))


def _check_param(op, name, t, x, shape):
    if not isinstance(t, torch.Tensor):
        raise TypeError("%s: %s must be a torch.Tensor, got %s" % (op, name, type(t).__name__))
    if t.device != x.device:
        raise RuntimeError("%s: %s is on %s but x is on %s" % (op, name, t.device, x.device))
    if not t.is_floating_point():
        raise TypeError("%s: %s must be a floating tensor, got %s" % (op, name, t.dtype))
    if tuple(t.shape) != tuple(shape):
        raise ValueError("%s: %s must have shape %s, got %s" % (op, name, tuple(shape), tuple(t.shape)))


def _check_weight(op, name, w, x, shape_ok, expected):
    if not isinstance(w, torch.Tensor):
        raise TypeError("%s: %s must be a torch.Tensor, got %s" % (op, name, type(w).__name__))
    if w.device != x.device:
        raise RuntimeError("%s: %s is on %s but x is on %s" % (op, name, w.device, x.device))
    if w.dtype != x.dtype:
        raise TypeError("%s: %s has dtype %s, expected x's dtype %s" % (op, name, w.dtype, x.dtype))
    if not shape_ok(tuple(w.shape)):
        raise ValueError("%s: %s must have shape %s, got %s" % (op, name, expected, tuple(w.shape)))


def _check_dilations(op, dilations, n):
    if len(dilations) != n:
        raise ValueError("%s: got %d dilations for %d branches" % (op, len(dilations), n))
    for i, d in enumerate(dilations):
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise TypeError("%s: dilations[%d] must be an int, got %r" % (op, i, d))
        if d < 1:
            raise ValueError("%s: dilations[%d] (the atrous rate) must be >= 1, got %d" % (op, i, d))


def _check_epilogue(op, x, o, scale, shift, bias):
    if scale is not None:
        _check_param(op, "scale", scale, x, (o,))
    if shift is not None:
        _check_param(op, "shift", shift, x, (o,))
    if bias is not None:
        _check_param(op, "bias", bias, x, (x.shape[0], o))


def check_atrous_args(x, weights, dilations, scale, shift, bias, sum_mode):
    op = "atrous_conv"
    _check_x(op, x)
    weights = list(weights)
    if not weights:
        raise ValueError("%s: weights must hold at least one branch" % op)
    _check_dilations(op, dilations, len(weights))
    c = x.shape[1]
    for i, w in enumerate(weights):
        _check_weight(
            op, "weights[%d]" % i, w, x,
            lambda s: len(s) == 4 and s[1] == c and s[2] == s[3] and s[2] in (1, 3),
            "[O, %d, k, k] with k in (1, 3) (x has %d channels)" % (c, c),
        )
    if sum_mode and len({int(w.shape[0]) for w in weights}) != 1:  # int(): sizes are tensors in an ONNX trace
        raise ValueError("%s: sum_mode needs branches with equal output channels, got %s"
                         % (op, [w.shape[0] for w in weights]))
    o = weights[0].shape[0] if sum_mode else sum(w.shape[0] for w in weights)
    _check_epilogue(op, x, o, scale, shift, bias)


def check_separable_args(x, dw_weights, dilations, mid_scales, mid_shifts, pw_weights, scale, shift, bias):
    op = "separable_conv"
    _check_x(op, x)
    nb = len(pw_weights)
    if nb == 0:
        raise ValueError("%s: pw_weights must hold at least one branch" % op)
    for name, lst in (("dw_weights", dw_weights), ("mid_scales", mid_scales), ("mid_shifts", mid_shifts)):
        if len(lst) != nb:
            raise ValueError("%s: %s has %d entries for %d branches" % (op, name, len(lst), nb))
    _check_dilations(op, dilations, nb)
    c = x.shape[1]
    for i in range(nb):
        dw, ms, msh, pw = dw_weights[i], mid_scales[i], mid_shifts[i], pw_weights[i]
        if dw is not None:
            _check_weight(op, "dw_weights[%d]" % i, dw, x, lambda s: s == (c, 1, 3, 3), "[%d, 1, 3, 3]" % c)
        if (ms is None) != (msh is None):
            raise ValueError("%s: mid_scales[%d] and mid_shifts[%d] must both be given or both be None" % (op, i, i))
        if ms is not None:
            if dw is None:
                raise ValueError("%s: mid_scales[%d] given for a branch without a depthwise conv" % (op, i))
            _check_param(op, "mid_scales[%d]" % i, ms, x, (c,))
            _check_param(op, "mid_shifts[%d]" % i, msh, x, (c,))
        _check_weight(op, "pw_weights[%d]" % i, pw, x, lambda s: len(s) == 4 and s[1:] == (c, 1, 1),
                      "[O, %d, 1, 1]" % c)
    _check_epilogue(op, x, sum(w.shape[0] for w in pw_weights), scale, shift, bias)


# --------------------------------------------------------------------------- ops


def _autocast(x, weight_lists):
    """Under torch.autocast the compiled / Triton ops see the autocast dtype, as F.conv2d
    would (the ``torch`` backend gets that from ATen). The BN epilogue vectors stay fp32."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return x, weight_lists  # the argument checks will say what is wrong
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return x, weight_lists
    dt = torch.get_autocast_dtype(dev)
    if x.dtype == torch.float64:  # autocast leaves float64 alone
        return x, weight_lists
    cast = [[None if w is None else w.to(dt) for w in ws] for ws in weight_lists]
    return x.to(dt), cast


def _materialize(scale, shift, o, x):
    """The compiled ops take explicit vectors: None -> ones / zeros."""
    dt = acc_dtype(x.dtype)
    if scale is None:
        scale = torch.ones(o, dtype=dt, device=x.device)
    if shift is None:
        shift = torch.zeros(o, dtype=dt, device=x.device)
    return scale, shift


def atrous_conv(x, weights, dilations, scale, shift, bias=None, sum_mode=False, act="relu", compute_stats=False,
                backend="auto"):
    """Multi-branch atrous conv with a fused affine + activation epilogue.

    ``scale=None`` means 1 and ``shift=None`` means 0. Returns (out, ch_sum, ch_sumsq);
    the stats are empty unless ``compute_stats``.
    """
    x, (weights,) = _autocast(x, [list(weights)])
    with size_checks():
        check_atrous_args(x, weights, dilations, scale, shift, bias, sum_mode)
    args = (x, list(weights), [int(d) for d in dilations], scale, shift, bias, bool(sum_mode), act_code(act),
            bool(compute_stats))
    if backend == "auto":
        chosen = dispatch.choose("atrous_conv", args, run_atrous_conv)
    else:
        chosen = resolve_backend(backend, x, "atrous_conv")
    return run_atrous_conv(chosen, *args)


def run_atrous_conv(backend, x, weights, dilations, scale, shift, bias, sum_mode, act, compute_stats):
    """One concrete backend (or a test stand-in, see dispatch.register_stand_in) on checked arguments."""
    if backend in ("cpp", "triton"):
        o = weights[0].shape[0] if sum_mode else sum(w.shape[0] for w in weights)
        scale, shift = _materialize(scale, shift, o, x)
        if backend == "triton":
            return _extension.triton_kernels().ops.atrous_conv(x, weights, dilations, scale, shift, bias, sum_mode,
                                                               act, compute_stats)
        from aspp_fused import ops

        return ops.atrous_conv(x, weights, dilations, scale, shift, bias, sum_mode, act, compute_stats)
    if backend != "torch":
        return dispatch.stand_in(backend, "atrous_conv")(x, weights, dilations, scale, shift, bias, sum_mode, act,
                                                         compute_stats)
    return torch_backend.atrous_conv(x, list(weights), dilations, scale, shift, bias, sum_mode, act, compute_stats)


def separable_conv(x, dw_weights, dilations, mid_scales, mid_shifts, mid_act, pw_weights, scale, shift, bias=None,
                   act="relu", compute_stats=False, backend="auto"):
    """Depthwise-separable atrous conv of several branches (concat), fused epilogue.

    ``scale=None`` means 1 and ``shift=None`` means 0.
    """
    x, (dw_weights, pw_weights) = _autocast(x, [list(dw_weights), list(pw_weights)])
    with size_checks():
        check_separable_args(x, dw_weights, dilations, mid_scales, mid_shifts, pw_weights, scale, shift, bias)
    args = (x, list(dw_weights), [int(d) for d in dilations], list(mid_scales), list(mid_shifts), act_code(mid_act),
            list(pw_weights), scale, shift, bias, act_code(act), bool(compute_stats))
    if backend == "auto":
        chosen = dispatch.choose("separable_conv", args, run_separable_conv)
    else:
        chosen = resolve_backend(backend, x, "separable_conv")
    return run_separable_conv(chosen, *args)


def run_separable_conv(backend, x, dw_weights, dilations, mid_scales, mid_shifts, mid_act, pw_weights, scale, shift,
                       bias, act, compute_stats):
    """One concrete backend (or a test stand-in) on checked arguments."""
    if backend in ("cpp", "triton"):
        scale, shift = _materialize(scale, shift, sum(w.shape[0] for w in pw_weights), x)
        if backend == "triton":
            return _extension.triton_kernels().ops.separable_conv(x, dw_weights, dilations, mid_scales, mid_shifts,
                                                                  mid_act, pw_weights, scale, shift, bias, act,
                                                                  compute_stats)
        from aspp_fused import ops

        return ops.separable_conv(x, dw_weights, dilations, mid_scales, mid_shifts, mid_act, pw_weights, scale, shift,
                                  bias, act, compute_stats)
    if backend != "torch":
        return dispatch.stand_in(backend, "separable_conv")(x, dw_weights, dilations, mid_scales, mid_shifts,
                                                            mid_act, pw_weights, scale, shift, bias, act,
                                                            compute_stats)
    return torch_backend.separable_conv(x, list(dw_weights), dilations, list(mid_scales), list(mid_shifts), mid_act,
                                        list(pw_weights), scale, shift, bias, act, compute_stats)
