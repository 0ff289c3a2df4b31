#!/usr/bin/env python
"""`make triton-check`: build every Triton kernel family for sm_90 and sm_80 without a GPU, and
check what each promises.

Triton compiles to PTX and, through the ptxas it ships, to a cubin for any target; nothing needs a
GPU. Each kernel is built as its launcher specialises it (16-byte aligned pointers, the ints that are
multiples of 16 at the DESIGN sizes marked so, bf16 activations), with its first autotune config
(all of them with --all-configs). Promises checked:

* GEMM families (tap_conv, region_conv, region_conv_tma, tap_wgrad, sep_conv):
  - sm_90: `wgmma.mma_async` in the PTX (Hopper's tensor-core path); sm_80: `mma.sync`;
  - `cp.async` in the PTX (asynchronous copies of the K loop's tiles);
  - region_conv_tma (sm_90 only: Hopper's copy engine): its weight tiles by TMA,
    `cp.async.bulk.tensor` in the PTX;
  - a software pipeline of >= 3 stages: in the TTGIR, each operand tile the K loop copies
    asynchronously (A and B; sep_conv: its pointwise weights B, its A being the depthwise result
    computed in registers) is allocated num_stages deep in shared memory (sm_90; sm_80's
    pipeliner keeps num_stages - 1);
* every family: no local-memory traffic (LDL / STL in the SASS, i.e. no spills), when a cuobjdump
  is at hand (the CUDA toolkit's or Triton's own).

Each forward family is built in the two epilogues the fused modules launch: eval (BN scale and
shift, per-sample bias where the op gets one, ReLU) and train (the same without ReLU, with the
per-tile batch statistics). The check must be able to fail: each GEMM family is also built with
num_stages=1, and that build must break the pipeline promises (tests/test_tools.py asserts both).
Run it with any Python that has
Triton, e.g. the GPU image's Triton 3.6 in a side venv: `make triton-check PYTHON=...`.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # the GPU configs, not the interpreter's (read at import)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import atrous_conv as A, bn_act as B, separable_conv as S  # noqa: E402  (the Triton backend, as aspp_fused.kernels ships it)
from cuda_check import find_cuobjdump, sass_mix  # noqa: E402

ARCHS = {"sm_90": 90, "sm_80": 80}
MMA = {"sm_90": "wgmma.mma_async", "sm_80": "mma.sync"}
# Ints the launchers pass that are multiples of 16 at the DESIGN sizes (C = 2048, O = 256, ...).
DIV16 = {"CIN_STRIDE", "OUT_STRIDE", "C", "CX", "GO", "KC", "OMAX", "TOTAL", "IN_STRIDE", "HW", "O"}
BF = "*bf16"
F32 = "*fp32"
EPILOGUE = dict(scale_ptr=F32, shift_ptr=F32, bias_ptr=F32, psum_ptr=F32, psumsq_ptr=F32)
EPILOGUE_FLAGS = dict(HAS_SCALE=True, HAS_BIAS=True, DOT_PREC="tf32")
# The modules' two epilogues (nn/_conv_bn.py). The separable modules pass no per-sample bias.
VARIANTS = {"eval": dict(ACT=1, STATS=False), "train": dict(ACT=0, STATS=True)}
PIPELINED = re.compile(r"ttg\.local_alloc[^\n]*?-> !ttg\.memdesc<(\d+)x\d+x\d+x\w+,[^>]*mutable>")


def _gemm(name, kernel, ptrs, consts, configs, operands):
    """operands: how many operand tiles the K loop copies asynchronously (A and B: 2)."""
    return dict(name=name, kernel=kernel, ptrs=ptrs, consts=consts, configs=configs, operands=operands,
                variants=VARIANTS if "STATS" not in consts and "ACT" in kernel.fn.arg_names else {"": {}})


def families():
    return [
        _gemm("tap_conv", A.tap_conv_kernel, dict(in_ptr=BF, w_ptr=BF, meta_ptr="*i32", out_ptr=BF, **EPILOGUE),
              dict(SUM_MODE=False, A_ALIGN=16, W_ALIGN=16, **EPILOGUE_FLAGS), A.FWD_CONFIGS, 2),
        _gemm("region_conv", A.region_conv_kernel,
              dict(in_ptr=BF, w_ptr=BF, meta_ptr="*i32", item_ptr="*i32", out_ptr=BF, **EPILOGUE),
              dict(A_ALIGN=16, W_ALIGN=16, BM=A.REGION_BM, BN=A.REGION_BN, w_desc=None, USE_TMA=False,
                   **EPILOGUE_FLAGS), A.REGION_CONFIGS, 2),
        # Hopper: the weight tiles by TMA (a host tensor descriptor over the packed weights).
        dict(_gemm("region_conv_tma", A.region_conv_kernel,
                   dict(in_ptr=BF, w_ptr=BF, meta_ptr="*i32", item_ptr="*i32", out_ptr=BF,
                        w_desc="tensordesc<bf16[%d, %d]>" % (A.REGION_BK, A.REGION_BN), **EPILOGUE),
                   dict(A_ALIGN=16, W_ALIGN=16, BM=A.REGION_BM, BN=A.REGION_BN, USE_TMA=True, **EPILOGUE_FLAGS),
                   A.REGION_CONFIGS, 2), archs=("sm_90",), tma=True),
        _gemm("tap_wgrad", A.tap_wgrad_kernel, dict(x_ptr=BF, g_ptr=BF, ent_ptr="*i32", part_ptr=F32),
              dict(DOT_PREC="tf32", X_ALIGN=16, G_ALIGN=16), A.WGRAD_CONFIGS, 2),
        _gemm("sep_conv", S.sep_conv_kernel,
              dict(x_ptr=BF, dw_ptr=F32, mid_ptr=F32, pw_ptr=BF, meta_ptr="*i32", out_ptr=BF, **EPILOGUE),
              dict(MID_ACT=1, W_ALIGN=16, D_ALIGN=16, **dict(EPILOGUE_FLAGS, HAS_BIAS=False)), S.SEP_CONFIGS, 1),
        dict(name="dw", kernel=S.dw_kernel, variants={"": {}},
             ptrs=dict(in_ptr=F32, dw_ptr=F32, mid_ptr=F32, meta_ptr="*i32", d_ptr=F32, m_ptr=BF, add_ptr=F32),
             consts=dict(SUM_MODE=False, STORE_D=True, STORE_M=True, HAS_ADD=False, MID_ACT=1, **S.DW_TILE)),
        dict(name="dw_bwd", kernel=S.dw_bwd_kernel, variants={"": {}},
             ptrs=dict(g_ptr=F32, d_ptr=F32, x_ptr=BF, dw_meta_ptr="*i32", mid_ptr=F32, pms_ptr=F32, pmsh_ptr=F32,
                       pdw_ptr=F32),
             consts=dict(MID_ACT=1, BP=S.DWB_BP, BC=S.DWB_BC)),
        dict(name="epilogue_bwd", kernel=B.epilogue_bwd_kernel, variants={"": {}},
             ptrs=dict(go_ptr=BF, z_ptr=F32, scale_ptr=F32, shift_ptr=F32, bias_ptr=F32, gsum_ptr=F32, gsumsq_ptr=F32,
                       gacc_ptr=BF, pscale_ptr=F32, pshift_ptr=F32),
             consts=dict(RECOMPUTE=True, HAS_BIAS=True, HAS_GSUM=True, HAS_GSUMSQ=True, ACT=1, STORE_GACC=True,
                         NEED_EP=True, BP=B.BP, BO=B.BO)),
    ]


def build(kernel, ptrs, consts, arch, cfg=None):
    """{shared, mma, cp_async, depths, ldl, stl} of one offline build: depths = the depth of each
    multi-buffered shared-memory allocation in the TTGIR; ldl / stl None without cuobjdump."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    c = dict(consts, **(cfg.kwargs if cfg else {}))
    sig = {n: "constexpr" if n in c else ptrs.get(n, "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n] != "constexpr" and (sig[n].startswith("*") or n in DIV16)}
    opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages) if cfg else {}
    k = triton.compile(ASTSource(fn, sig, c, attrs), target=GPUTarget("cuda", ARCHS[arch], 32), options=opts)
    ptx = k.asm["ptx"]
    out = dict(shared=k.metadata.shared, mma=MMA[arch] in ptx, cp_async="cp.async." in ptx.replace(
        "cp.async.bulk", ""), tma="cp.async.bulk.tensor" in ptx,
               depths=[int(d) for d in PIPELINED.findall(k.asm["ttgir"])], ldl=None, stl=None)
    tool = find_cuobjdump()
    if tool:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
        mixes = list(sass_mix(sass).values())
        out["ldl"] = sum(m["LDL"] for m in mixes)
        out["stl"] = sum(m["STL"] for m in mixes)
    return out


def problems(fam, res, stages, arch):
    """What one build breaks of its family's promises ([] = none). The pipeline is judged from the
    build's own PTX / TTGIR (cp.async, buffer depths), never from its config alone."""
    bad = []
    if res["ldl"] or res["stl"]:
        bad.append("local memory traffic (LDL %d / STL %d)" % (res["ldl"], res["stl"]))
    if "operands" in fam:
        if not res["mma"]:
            bad.append("no tensor-core MMA of its arch in the PTX")
        if not res["cp_async"]:
            bad.append("no cp.async in the PTX")
        if fam.get("tma") and not res["tma"]:
            bad.append("no TMA copy (cp.async.bulk.tensor) in the PTX")
        # sm_90 (wgmma) allocates num_stages buffers per pipelined tile, sm_80 (mma.sync) num_stages
        # - 1; multi-buffered means at least 2.
        need = max(2, stages if arch == "sm_90" else stages - 1)
        deep = sum(1 for d in res["depths"] if d >= need)
        if deep < fam["operands"]:
            bad.append("%d of %d operand tiles multi-buffered %d deep in the TTGIR: K loop not pipelined" % (
                deep, fam["operands"], need))
        if stages < 3:
            bad.append("num_stages %d < 3" % stages)
    return bad


def run(archs, all_configs, counter=True, log=print):
    """Records, one per build: {family, arch, variant, config, stages, counter, shared, mma, cp_async,
    depths, ldl, stl, problems}."""
    out = []
    for arch in archs:
        for fam in families():
            if arch not in fam.get("archs", ARCHS):
                continue
            configs = fam.get("configs") or [None]
            for variant, flags in fam["variants"].items():
                for cfg in configs if all_configs else configs[:1]:
                    builds = [(cfg, False)]
                    if counter and cfg is not None:  # the deliberately unpipelined build of the same config
                        builds.append((triton.Config(dict(cfg.kwargs), num_warps=cfg.num_warps, num_stages=1), True))
                    for c, is_counter in builds:
                        res = build(fam["kernel"], fam["ptrs"], dict(fam["consts"], **flags), arch, c)
                        stages = c.num_stages if c else None
                        rec = dict(family=fam["name"], arch=arch, variant=variant, config=str(c.kwargs) if c else "",
                                   warps=c.num_warps if c else None, stages=stages, counter=is_counter, **res,
                                   problems=problems(fam, res, stages, arch))
                        log("%-15s %-5s %-5s %-44s w%-2s s%-4s shared %6d B  mma %-5s cp.async %-5s tma %-5s buffers %-8s "
                            "LDL/STL %s/%s  %s%s" % (
                                rec["family"], arch, variant, rec["config"], rec["warps"], rec["stages"],
                                rec["shared"], rec["mma"], rec["cp_async"], rec["tma"], rec["depths"], rec["ldl"],
                                rec["stl"],
                                "counter-check: " if is_counter else "", "; ".join(rec["problems"]) or "ok"))
                        out.append(rec)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=["sm_90", "sm_80"])
    ap.add_argument("--all-configs", action="store_true", help="every autotune config, not only the first")
    ap.add_argument("--json", help="write the records here")
    args = ap.parse_args()
    print("Triton %s, offline builds for %s" % (triton.__version__, ", ".join(args.arch)))
    recs = run(args.arch, args.all_configs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, records=recs), f, indent=1)
    broken = [r for r in recs if r["problems"] and not r["counter"]]
    blind = [r for r in recs if r["counter"] and not r["problems"]]
    for r in blind:
        print("counter-check passed where it must fail: %s %s %s" % (r["family"], r["arch"], r["variant"]))
    if find_cuobjdump() is None:
        print("note: no cuobjdump found, spills (LDL / STL) not checked")
    print("triton-check: %s (%d builds, %d broken promises, %d blind checks)" % (
        "FAILED" if broken or blind else "OK", len(recs), len(broken), len(blind)))
    return 1 if broken or blind else 0


if __name__ == "__main__":
    sys.exit(main())
