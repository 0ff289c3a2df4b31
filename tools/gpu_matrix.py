"""The correctness matrix of `make gpu-check` (tools/gpu_check.sh, stages "triton" and "matrix").

  python3 tools/gpu_matrix.py --backends cuda,triton [--size smoke,standard] [--json FILE]

{backend} x {aspp_v3_os16, aspp_v3_os8, aspp_v2_os8, sep_aspp_os16} x {eval, train, backward}
in bf16 (eval: the module cast to bf16; train and backward: fp32 module under
torch.autocast(bf16), as one trains), plus fp32 for aspp_v3_os16, each fused module against the same module on the float64
torch backend (the reference), with the tests' tolerance rule (docs/DESIGN.md, "Tests"):
fp32 (TF32 off) 1e-5 forward / 1e-4 gradients; bf16 at most 2x the error of the torch backend run
in bf16. "train" is the first training call: its output and the running statistics it leaves
(the first-call statistics check); "backward": the input and every parameter gradient.

"cuda" is backend="cpp" on CUDA tensors. --size smoke runs every cell on a small shape first
(C=16, 11x11, batch 4: at batch 2 the pooling branch's BN sees two values per channel and its weight gradient cancels to noise), so a crashing kernel is found in seconds; "standard" is the docs' case
size (batch 16, C=2048; backward at batch 4 to bound the float64 reference's cost). Every cell's
record is written to --json as soon as it is measured; a cell that raises is recorded as failed
and the next one runs. The last line starts with "KEY:" (the summary line of gpu_check.sh).
Exit status 1 when a cell fails. --device cpu runs the same cells on CPU (cpp: the CPU kernels;
triton: only under TRITON_INTERPRET=1), which is how the script itself is tested.
"""
import argparse
import copy
import json
import os
import sys
import time
import traceback

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # benchmarks/ (randomize_bn) is a folder of the repository, not of the installed package
    sys.path.insert(0, ROOT)

F64 = torch.float64
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
BACKENDS = {"cuda": "cpp", "cpp": "cpp", "triton": "triton", "torch": "torch"}
MODES = ("eval", "train", "backward")

# name: (builder(C) -> (twin, fused class), H = W); rates as in benchmarks/cases.py.
CASES = {
    "aspp_v3_os16": ("v3", (6, 12, 18), 33),
    "aspp_v3_os8": ("v3", (12, 24, 36), 65),
    "aspp_v2_os8": ("v2", (6, 12, 18, 24), 65),
    "sep_aspp_os16": ("sep", (6, 12, 18), 33),
}
# (case, dtype) cells: bf16 everywhere, fp32 for aspp_v3_os16.
CELLS = [(c, "bf16") for c in CASES] + [("aspp_v3_os16", "fp32")]
SIZES = {"smoke": dict(batch=4, bwd_batch=4, channels=16, hw=11),
         "standard": dict(batch=16, bwd_batch=4, channels=2048, hw=None)}


def rel_err(actual, expected):
    """max |actual - expected| / max |expected| (tests/conftest.py's rule)."""
    if expected.numel() == 0:
        return 0.0
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def build(case, channels, gen_seed=0):
    import aspp_fused.nn as ann
    from benchmarks.cases import randomize_bn

    kind, rates, _ = CASES[case]
    torch.manual_seed(gen_seed)
    if kind == "v3":
        twin, cls = ann.ASPP(channels, rates, 256 if channels > 64 else 8), ann.FusedASPP
    elif kind == "v2":
        twin, cls = ann.ASPPv2(channels, 21, rates), ann.FusedASPPv2
    else:
        twin, cls = ann.SeparableASPP(channels, 256 if channels > 64 else 8, rates), ann.FusedSeparableASPP
    randomize_bn(twin, conv_bias=True)  # fresh BN statistics are 0 / 1: too easy
    for m in twin.modules():
        if isinstance(m, nn.Dropout):
            # Dropout masks depend on the dtype's RNG use; the matrix checks the convs.
            m.p = 0.0
    return twin, cls


def run_cell(case, dtype_name, backend, mode, size, device):
    """[(quantity, err, limit, torch_err)] for one cell."""
    dtype = DTYPES[dtype_name]
    sz = SIZES[size]
    hw = sz["hw"] or CASES[case][2]
    batch = sz["bwd_batch"] if mode == "backward" else sz["batch"]
    twin, cls = build(case, sz["channels"])
    twin = twin.to(device)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(batch, sz["channels"], hw, hw, generator=gen, device=device)
    x = x.contiguous(memory_format=torch.channels_last)

    # Low precision in training is autocast (fp32 parameters and BN, bf16 convs), as one trains:
    # a module cast to bf16 whole has bf16 BN affine parameters and batch statistics, whose
    # gradients cancel to noise (torch's own bf16 error on grad x reached 57% at the smoke size).
    autocast = dtype != torch.float32 and mode != "eval"
    param_dtype = torch.float32 if autocast else dtype

    def make(dt, be):
        m = cls.from_module(copy.deepcopy(twin).to(dt), backend=be)
        return m.train(mode != "eval")

    runs = {"ref": make(F64, "torch"), "torch": make(param_dtype, "torch"), "ours": make(param_dtype, BACKENDS[backend])}
    results = {}
    for key, m in runs.items():
        dt = F64 if key == "ref" else param_dtype
        xi = x.to(dt).detach().requires_grad_(mode == "backward")
        if mode == "eval":
            with torch.no_grad():
                results[key] = {"out": m(xi)}
            continue
        with torch.autocast(device.type, dtype=dtype, enabled=autocast and key != "ref"):
            out = m(xi)
        got = {"out": out.detach()}
        if mode == "train":
            for name, buf in m.named_buffers():
                if name.endswith(("running_mean", "running_var")):
                    got[name] = buf.detach().clone()
        else:
            g = torch.rand(out.shape, generator=torch.Generator(device=device).manual_seed(2), device=device,
                           dtype=F64) + 0.5
            (out.double() * g).sum().backward()
            got = {"grad x": xi.grad}
            # Low precision: the input and conv-weight gradients. A BN's affine gradients are sums
            # of zero-mean terms that cancel (torch's own bf16 error on them: 15-20% at the smoke
            # size), so they are held to the rule in the fp32 cell, with every other gradient.
            got.update({"grad " + n: p.grad for n, p in m.named_parameters() if p.grad is not None
                        and (p.dim() == 4 or not autocast)})
        results[key] = got
    rows = []
    grad_tol = mode != "eval" and mode != "train"
    for q, ref in results["ref"].items():
        if q not in results["ours"]:
            rows.append((q, float("inf"), 0.0, 0.0))  # a gradient the fused module did not produce
            continue
        err = rel_err(results["ours"][q], ref)
        p_err = rel_err(results["torch"][q], ref)
        fp32_tol = 1e-4 if grad_tol else 1e-5
        limit = fp32_tol if dtype == torch.float32 else max(2 * p_err, fp32_tol)
        rows.append((q, err, limit, p_err))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="cuda,triton", help="comma list of cuda, triton (default: %(default)s)")
    p.add_argument("--size", default="smoke,standard", help="comma list of smoke, standard (default: %(default)s)")
    p.add_argument("--cases", default=",".join(CASES), help="comma list (default: all)")
    p.add_argument("--modes", default=",".join(MODES))
    # Under the Triton interpreter (CPU), tl.dot of bf16 operands is wrong in Triton 3.9 (a bare
    # 16x16 bf16 tl.dot came back off by 2.5e10; fp32 and fp16 are right): --dtypes fp32 there.
    p.add_argument("--dtypes", default="bf16,fp32", help="comma list of the cells' dtypes (default: %(default)s)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--json", default=None, help="records file, rewritten after every cell")
    p.add_argument("--expect-package", default=None, help="fail unless aspp_fused is imported from this folder")
    args = p.parse_args(argv)
    import aspp_fused  # first, before a concurrent editable install could change what it resolves to

    where = os.path.dirname(os.path.abspath(aspp_fused.__file__))
    print("aspp_fused from %s" % where)
    if args.expect_package and where != os.path.abspath(args.expect_package):
        print("KEY: aspp_fused imported from %s, expected %s" % (where, args.expect_package))
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("KEY: skipped (no CUDA device)")
        return 2
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    backends = [b for b in args.backends.split(",") if b]
    for b in backends:
        if b not in BACKENDS:
            raise SystemExit("--backends: got %r, expected a comma list of %s" % (b, ", ".join(BACKENDS)))
    cases = args.cases.split(",")
    dtypes = args.dtypes.split(",")
    cells = [(c, d) for c, d in CELLS if c in cases and d in dtypes]
    records = []

    def save():
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump({"records": records, "device": torch.cuda.get_device_name(0) if device.type == "cuda"
                           else "cpu", "torch": torch.__version__}, f, indent=1)
            os.replace(args.json + ".tmp", args.json)

    for size in args.size.split(","):
        for backend in backends:
            for case, dt in cells:
                for mode in args.modes.split(","):
                    t0 = time.perf_counter()
                    rec = {"size": size, "backend": backend, "case": case, "dtype": dt, "mode": mode}
                    try:
                        rows = run_cell(case, dt, backend, mode, size, device)
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        worst = max(rows, key=lambda r: r[1] / r[2] if r[2] else float("inf"))
                        rec.update(ok=all(e <= lim for _, e, lim, _ in rows), worst=worst[0], err=worst[1],
                                   limit=worst[2], torch_err=worst[3],
                                   quantities={q: [e, lim] for q, e, lim, _ in rows})
                    except Exception as exc:
                        rec.update(ok=False, error="%s: %s" % (type(exc).__name__, str(exc)[:500]))
                        traceback.print_exc()
                    rec["seconds"] = round(time.perf_counter() - t0, 2)
                    records.append(rec)
                    save()
                    print("%-4s %-8s %-6s %-14s %-4s %-8s %s" % (
                        "ok" if rec["ok"] else "FAIL", size, backend, case, dt, mode,
                        rec.get("error") or "%s err %.3g <= %.3g (torch %.3g)" % (
                            rec["worst"], rec["err"], rec["limit"], rec["torch_err"])), flush=True)
    failed = [r for r in records if not r["ok"]]
    ratios = [r["err"] / r["limit"] for r in records if r.get("limit")]
    print("KEY: %d/%d cells ok%s%s" % (
        len(records) - len(failed), len(records),
        "; worst err/limit %.2f" % max(ratios) if ratios else "",
        "; failed: " + ", ".join("%s %s %s %s %s" % (r["size"], r["backend"], r["case"], r["dtype"], r["mode"])
                                 for r in failed[:6]) if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
