#!/usr/bin/env python
"""The CUDA kernels at docs/DESIGN.md's aspp_v3_os16 / sep_aspp_os16 geometry, on the host SIMT emulator.

tests/test_op_dtypes.py runs its standard-size case on a GPU only (batch 16 is hours on the
emulator). This runs the same geometry at a batch the emulator can afford: C=2048 input
channels, 33x33, a 1x1 branch and rates 6/12/18, 256 channels each (1024 outputs: 8 column
blocks, a 64-step K loop per tap), train-mode op (stats) with per-sample bias and ReLU, and with
--backward the backward op too (input, weight, scale and shift grads of <out, go> + <ch_sumsq, gss>),
and checks the tolerance rule of tests/test_op_dtypes.py: max-abs error relative to float64 within 2x of
PyTorch's own in the same dtype (fp32: 1e-5, TF32 off). The forward takes about 6 minutes per batch
element on 2 cores. --op separable: the separable op at the same geometry (a plain 1x1 branch and
depthwise 3x3 at each rate with a mid BatchNorm, then the 2048 -> 256 pointwise per branch).

    python tools/cuda_emu/build.py
    ASPP_CUDA_EMU_LIB=build/cuda_emu/libaspp_cuda_emu.so python tools/cuda_emu/standard_case.py [--dtype bf16]
"""
import argparse
import os
import sys
import time
import warnings

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--channels", type=int, default=2048)
    ap.add_argument("--size", type=int, default=33)
    ap.add_argument("--branch-out", type=int, default=256)
    ap.add_argument("--rates", default="6,12,18")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--op", choices=["atrous", "separable"], default="atrous")
    ap.add_argument("--backward", action="store_true", help="also the backward op (about twice the forward's time)")
    args = ap.parse_args()
    lib = os.environ.get("ASPP_CUDA_EMU_LIB")
    if not lib:
        sys.exit("standard_case.py: set ASPP_CUDA_EMU_LIB to the library tools/cuda_emu/build.py printed")
    torch.ops.load_library(lib)
    from aspp_fused import _autograd, torch_backend

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator().manual_seed(0)
    n, c, hw, o = args.batch, args.channels, args.size, args.branch_out
    rates = [int(r) for r in args.rates.split(",")]
    x = torch.randn(n, c, hw, hw, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    total = o * (1 + len(rates))
    scale = torch.rand(total, generator=g) + 0.5
    shift = torch.randn(total, generator=g)
    bias = torch.randn(n, total, generator=g)
    if args.op == "atrous":
        ws = [(torch.randn(o, c, k, k, generator=g) / (c * k * k) ** 0.5).to(dtype) for k in [1] + [3] * len(rates)]
        dil = [1] + rates
        params = [ws]
        macs = n * hw * hw * c * o * (1 + 9 * len(rates))

        def op(ps, sc, sh, b):
            return torch.ops.aspp_fused_emu.atrous_conv(x, ps[0], dil, sc, sh, b, False, 1, True)

        def op_backward(go, gss, out, ps):
            r = _autograd.atrous_conv_backward(_autograd.primitives(torch.ops.aspp_fused_emu), go, None, gss, out, x,
                                               ps[0], dil, scale, shift, bias, False, 1, [True, True, True])
            return [r[0]] + list(r[1]) + [r[2], r[3]], ["grad_x"] + ["grad_w[%d]" % i for i in range(len(dil))]

        def reference(xx, ps, sc, sh, b):
            return torch_backend.atrous_conv(xx, ps[0], dil, sc, sh, b, False, 1, True)
    else:
        dws = [None] + [(torch.randn(c, 1, 3, 3, generator=g) / 3).to(dtype) for _ in rates]
        mss = [None] + [torch.rand(c, generator=g) + 0.5 for _ in rates]
        mshs = [None] + [torch.randn(c, generator=g) * 0.1 for _ in rates]
        pws = [(torch.randn(o, c, 1, 1, generator=g) / c ** 0.5).to(dtype) for _ in range(1 + len(rates))]
        dil = [1] + rates
        params = [dws, mss, mshs, pws]
        macs = n * hw * hw * (c * 9 * len(rates) + c * o * (1 + len(rates)))
        empty = x.new_empty(0)

        def present(lst):
            return [empty if t is None else t for t in lst]

        def op(ps, sc, sh, b):
            return torch.ops.aspp_fused_emu.separable_conv(x, present(ps[0]), dil, present(ps[1]), present(ps[2]), 0,
                                                           ps[3], sc, sh, b, 1, True)

        def op_backward(go, gss, out, ps):
            r = _autograd.separable_conv_backward(
                _autograd.primitives(torch.ops.aspp_fused_emu), go, None, gss, out, x, present(ps[0]), dil,
                present(ps[1]), present(ps[2]), 0, ps[3], scale, shift, bias, 1, [True, True, True])
            grads, names = [r[0]], ["grad_x"]
            for k, what in ((1, "grad_dw"), (2, "grad_mid_scale"), (3, "grad_mid_shift")):
                grads += [t for t in r[k][1:]]
                names += ["%s[%d]" % (what, i) for i in range(1, len(dil))]
            return grads + list(r[4]) + [r[5], r[6]], names + ["grad_pw[%d]" % i for i in range(len(dil))]

        def reference(xx, ps, sc, sh, b):
            return torch_backend.separable_conv(xx, ps[0], dil, ps[1], ps[2], 0, ps[3], sc, sh, b, 1, True)

    def f64(t):
        if isinstance(t, list):
            return [f64(v) for v in t]
        return None if t is None else t.double()

    print("%s_conv on the emulator: batch %d, C=%d, %dx%d, rates %s, %d x %d out, %s (%.3g MACs)" % (
        args.op, n, c, hw, hw, args.rates, 1 + len(rates), o, args.dtype, macs), flush=True)
    t0 = time.time()
    ours = op(params, scale, shift, bias)
    secs = time.time() - t0
    exact = reference(f64(x), f64(params), f64(scale), f64(shift), f64(bias))
    pytorch = reference(x, params, scale, shift, bias)
    ok = check(["out", "ch_sum", "ch_sumsq"], ours, exact, pytorch, dtype, args.dtype)
    print("forward emulated in %.0f s" % secs, flush=True)
    if not args.backward:
        return 0 if ok else 1

    out = ours[0]
    go = (torch.rand(out.shape, generator=g) + 0.5).to(dtype)
    gss = torch.randn(total, generator=g) / out.numel()
    t0 = time.time()
    ours, names = op_backward(go, gss, out, params)
    secs = time.time() - t0

    def autograd(xx, ps, sc, sh, b, loss_dtype):
        def leaf(t):
            return None if t is None else t.detach().clone().requires_grad_(True)

        xl, pl, scl, shl = leaf(xx), [[leaf(t) for t in lst] for lst in ps], leaf(sc), leaf(sh)
        # PyTorch's CPU oneDNN bf16 backward of dilated convs crashes (torch 2.13): native kernels
        # (the flag's context manager warns about Intel GPUs; irrelevant here).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.backends.mkldnn.flags(enabled=False):
                o_, _, ss = reference(xl, pl, scl, shl, b)
                loss = (o_.to(loss_dtype) * go.to(loss_dtype)).sum() + (ss.to(loss_dtype) * gss.to(loss_dtype)).sum()
                leaves = [xl] + [t for lst in pl for t in lst if t is not None] + [scl, shl]
                return torch.autograd.grad(loss, leaves)

    exact = autograd(f64(x), f64(params), f64(scale), f64(shift), f64(bias), torch.float64)
    pytorch = autograd(x, params, scale, shift, bias, torch.float32)
    names = names + ["grad_scale", "grad_shift"]
    ok = check(names, ours, exact, pytorch, dtype, args.dtype) and ok
    print("backward emulated in %.0f s" % secs)
    return 0 if ok else 1


def rel_err(actual, expected):
    """max |actual - expected| / max |expected|, as tests/test_op_dtypes.py measures."""
    a, e = actual.double(), expected.double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def check(names, ours, exact, pytorch, dtype, dtype_name):
    ok = True
    for name, o, e, p in zip(names, ours, exact, pytorch):
        err, p_err = rel_err(o, e), rel_err(p, e)
        limit = 1e-5 if dtype == torch.float32 else 2 * p_err
        ok = ok and err <= limit
        print("%-11s error vs float64 %.3g   PyTorch in %s %.3g   limit %.3g   %s" % (
            name, err, dtype_name, p_err, limit, "ok" if err <= limit else "FAILED"), flush=True)
    return ok


if __name__ == "__main__":
    sys.exit(main())
