#!/usr/bin/env python
"""`make cuda-check`: compile every CUDA kernel of csrc/cuda with nvcc, report its resources.

Each translation unit in csrc/cuda/check/ instantiates the kernel templates the launch glue can
launch (pure CUDA, no torch headers), and is compiled to a cubin for every target architecture
with `-Xptxas -v`. Prints registers, shared memory, stack frame and spills per kernel and arch,
and fails on a compile error or on any register spill. Exits 0 (after saying so) when nvcc is
not installed, so CPU-only CI machines without the CUDA toolkit pass.

When a cuobjdump is at hand (the CUDA toolkit's, or the one Triton ships), every cubin is also
disassembled and each GEMM kernel's instructions are checked against what its template promises,
so a build that silently fell back to another code path fails here, on a machine without a GPU:
tensor-core kernels must hold HMMA of their type (.16816 bf16 / f16 with ldmatrix = LDSM, .1688
TF32), FFMA kernels no HMMA, cp.async variants LDGSTS, and no kernel may hold the pre-sm_80 trap
(BPT.TRAP) or local-memory traffic (LDL / STL).

Optional: with a CUDA build of torch's headers (CUDA_CHECK_TORCH_INCLUDE=<.../torch/include>,
or automatically when the installed torch has CUDA) the launch glue csrc/cuda/*.cu is compiled
too (host + device code against ATen/c10 CUDA headers; slow, one object per file).
"""
import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK_DIR = os.path.join(ROOT, "csrc", "cuda", "check")
ARCHS = [("sm_80", "-gencode=arch=compute_80,code=sm_80"), ("sm_90a", "-gencode=arch=compute_90a,code=sm_90a")]
COMMON = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-I" + os.path.join(ROOT, "csrc")]

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")


def run(cmd):
    start = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    return res.returncode, res.stdout + res.stderr, time.time() - start


def demangle(names):
    if not names or not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    if len(out) != len(names):
        return {n: n for n in names}
    return dict(zip(names, out))


def short(name):
    name = name.replace("aspp_fused::cuda::", "").replace("__nv_bfloat16", "bf16").replace("__half", "f16")
    name = re.sub(r"\((const )?\w+Params\)$", "", name)
    name = re.sub(r"\(Math\)(\d)", lambda m: ["mma16", "tf32", "ffma"][int(m.group(1))], name)
    return name.replace("void ", "")


def parse(text):
    """[(mangled, arch, stack, spill_st, spill_ld, regs, smem)] from ptxas -v output."""
    rows, cur = [], None
    for line in text.splitlines():
        m = ENTRY.search(line)
        if m:
            cur = {"name": m.group(1), "arch": m.group(2)}
            continue
        if cur is None:
            continue
        m = PROPS.search(line)
        if m:
            cur["stack"], cur["st"], cur["ld"] = map(int, m.groups())
            continue
        m = USED.search(line)
        if m:
            cur["regs"] = int(m.group(1))
            cur["smem"] = int(m.group(3) or 0)
            rows.append(cur)
            cur = None
    return rows


def find_cuobjdump(nvcc=None):
    """$CUOBJDUMP, else the CUDA toolkit's cuobjdump beside ``nvcc`` (or on PATH), else the one
    bundled with Triton, else None. Without ``nvcc`` (tools/triton_check.py: Triton's own cubins)
    Triton's bundled one comes before the toolkit's."""
    triton_one = None
    try:
        import triton
        triton_one = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    except Exception:
        pass
    toolkit = [os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cuobjdump") if nvcc else None,
               shutil.which("cuobjdump")]
    cands = [os.environ.get("CUOBJDUMP")] + (toolkit + [triton_one] if nvcc else [triton_one] + toolkit)
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


SASS_FUNC = re.compile(r"^\s*Function : (\S+)", re.M)
SASS_INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)")
COUNTED = ("HMMA", "LDSM", "LDGSTS", "BAR", "LDL", "STL", "BPT")


def sass_mix(text):
    """{mangled kernel name: {opcode: count, 'HMMA kinds': set of full HMMA opcodes}} from cuobjdump -sass."""
    out = {}
    parts = SASS_FUNC.split(text)
    for name, body in zip(parts[1::2], parts[2::2]):
        mix = {op: 0 for op in COUNTED}
        kinds = set()
        for op, suffix in SASS_INSN.findall(body):
            if op in mix:
                mix[op] += 1
            if op == "HMMA":
                kinds.add(op + suffix)
        mix["HMMA kinds"] = kinds
        out[name] = mix
    return out


def sass_problems(demangled, mix):
    """What is wrong with one kernel's instruction mix, given the promises of its template arguments."""
    bad = []
    if mix["BPT"]:
        bad.append("holds BPT (the pre-sm_80 trap path)")
    if mix["LDL"] or mix["STL"]:
        bad.append("local memory traffic (LDL %d / STL %d)" % (mix["LDL"], mix["STL"]))
    m = re.search(r"(tap_gemm|wgrad_gemm|separable_gemm)_kernel<([^,]+),.*\(aspp_fused::cuda::Math\)(\d)(?:, (true|false))?>", demangled)
    if not m:
        return bad
    _, elem, math, vec = m.group(1), m.group(2).strip(), int(m.group(3)), m.group(4)
    kinds = mix["HMMA kinds"]
    if math == 0:
        want = "HMMA.16816.F32.BF16" if "bfloat16" in elem else "HMMA.16816.F32"
        if want not in kinds:
            bad.append("no %s (has %s)" % (want, sorted(kinds) or "no HMMA"))
        if not mix["LDSM"]:
            bad.append("no LDSM (ldmatrix)")
    elif math == 1:
        if "HMMA.1688.F32.TF32" not in kinds:
            bad.append("no HMMA.1688.F32.TF32 (has %s)" % (sorted(kinds) or "no HMMA"))
    elif kinds:
        bad.append("FFMA kernel holds %s" % sorted(kinds))
    if vec == "true" and not mix["LDGSTS"]:
        bad.append("cp.async variant without LDGSTS")
    return bad


def occupancy_lost(name, regs):
    """True when a tensor-core GEMM kernel that should run 2 CTAs / SM (256 threads) uses more
    than 128 registers. The tap-list kernel reaches <= 128 unforced (forcing it spills), so a
    toolkit or code change that adds a register would halve its occupancy without a spill to
    show it; this makes it visible. The separable kernel is designed for 1 CTA / SM."""
    tensor_core = "mma16" in name or "tf32" in name
    return tensor_core and name.startswith(("tap_gemm_kernel", "wgrad_gemm_kernel")) and regs > 128


def torch_cuda_include():
    inc = os.environ.get("CUDA_CHECK_TORCH_INCLUDE")
    if inc:
        return inc if os.path.exists(os.path.join(inc, "ATen", "cuda", "CUDAContext.h")) else None
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception:
        return None
    if torch.version.cuda is None:
        return None
    inc = cpp_extension.include_paths()[0]
    return inc if os.path.exists(os.path.join(inc, "ATen", "cuda", "CUDAContext.h")) else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nvcc", default=os.environ.get("NVCC", "nvcc"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--extra", action="append", default=[], help="extra nvcc flag for the kernel units (testing)")
    args = ap.parse_args()

    nvcc = shutil.which(args.nvcc)
    if nvcc is None:
        print("cuda-check: nvcc not found (%s); skipping the CUDA compile check. Install the CUDA toolkit "
              "(or set NVCC=/path/to/nvcc) to run it." % args.nvcc)
        return 0
    t0 = time.time()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    print("cuda-check: %s (%s)" % (nvcc, version[-1] if version else "?"))

    units = sorted(f for f in os.listdir(CHECK_DIR) if f.endswith(".cu") and f != "print_config.cu")
    tmp = tempfile.mkdtemp(prefix="cuda-check-")
    jobs = []
    for unit in units:
        for arch, gencode in ARCHS:
            out = os.path.join(tmp, "%s.%s.cubin" % (unit, arch))
            jobs.append(((unit, arch), [nvcc] + COMMON + args.extra + ["-cubin", gencode, "-Xptxas", "-v",
                                                           os.path.join(CHECK_DIR, unit), "-o", out]))
    cfg_exe = os.path.join(tmp, "print_config")
    jobs.append((("print_config.cu", "host"), [nvcc] + COMMON + [os.path.join(CHECK_DIR, "print_config.cu"),
                                                                   "-o", cfg_exe]))
    glue_inc = torch_cuda_include()
    if glue_inc:
        import sysconfig
        glue_flags = ["-I" + glue_inc, "-I" + os.path.join(glue_inc, "torch", "csrc", "api", "include"),
                      "-I" + sysconfig.get_paths()["include"], "-D_GLIBCXX_USE_CXX11_ABI=1",
                      "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", "-Xcompiler", "-fPIC",
                      "-U__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
        # C++20: torch's headers need it from 2.14 on (and compile as it before).
        glue_common = ["-std=c++20" if flag == "-std=c++17" else flag for flag in COMMON]
        for f in sorted(os.listdir(os.path.join(ROOT, "csrc", "cuda"))):
            if f.endswith(".cu"):
                jobs.append(((f, "glue sm_90a"), [nvcc] + glue_common + glue_flags + [
                    "-gencode=arch=compute_90a,code=sm_90a", "-c", os.path.join(ROOT, "csrc", "cuda", f),
                    "-o", os.path.join(tmp, f + ".o")]))

    cuobjdump = find_cuobjdump(nvcc)
    failed, rows, mixes = [], [], {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        futures = {ex.submit(run, cmd): key for key, cmd in jobs}
        for fut in concurrent.futures.as_completed(futures):
            key = futures[fut]
            rc, text, secs = fut.result()
            print("cuda-check: compiled %-24s %-12s %5.1fs%s" % (key[0], key[1], secs, "" if rc == 0 else "  FAILED"))
            if rc != 0:
                failed.append(key)
                sys.stdout.write(text)
            elif key[1] not in ("host",) and not key[1].startswith("glue"):
                rows += parse(text)
                if cuobjdump:
                    cubin = os.path.join(tmp, "%s.%s.cubin" % key)
                    res = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True)
                    if res.returncode != 0:
                        print("cuda-check: cuobjdump failed on %s: %s" % (cubin, res.stderr.strip()))
                        failed.append((key[0], key[1] + " sass"))
                    for name, mix in sass_mix(res.stdout).items():
                        mixes[(name, key[1])] = mix

    if os.path.exists(cfg_exe):
        print("\ncuda-check: GEMM tile configurations")
        res = subprocess.run([cfg_exe], capture_output=True, text=True)
        sys.stdout.write(res.stdout)

    names = demangle(sorted({r["name"] for r in rows}))
    print("\n%-7s %4s %8s %6s %6s %5s %5s %6s %4s  %s   (smem: static bytes; dynamic: the tile table above; "
          "HMMA..BAR: SASS instruction counts)" % ("arch", "regs", "smem", "stack", "spill", "HMMA", "LDSM",
                                                    "LDGSTS", "BAR", "kernel"))
    spills, sass_bad, occupancy = [], [], []
    for r in sorted(rows, key=lambda r: (short(names[r["name"]]), r["arch"])):
        name = short(names[r["name"]])
        spill = r.get("st", 0) + r.get("ld", 0)
        mix = mixes.get((r["name"], r["arch"]))
        counts = ("%5d %5d %6d %4d" % tuple(mix[k] for k in ("HMMA", "LDSM", "LDGSTS", "BAR")) if mix
                  else "%5s %5s %6s %4s" % ("-", "-", "-", "-"))
        print("%-7s %4d %8d %6d %6s %s  %s" % (r["arch"], r["regs"], r["smem"], r.get("stack", 0),
                                              "%d/%d" % (r.get("st", 0), r.get("ld", 0)), counts,
                                              name))
        if spill:
            spills.append((r["arch"], name))
        if occupancy_lost(name, r["regs"]):
            occupancy.append("%s %s: %d registers" % (r["arch"], name, r["regs"]))
        if mix:
            for problem in sass_problems(names[r["name"]], mix):
                sass_bad.append("%s %s: %s" % (r["arch"], name, problem))
    if cuobjdump:
        missing = [r for r in rows if (r["name"], r["arch"]) not in mixes]
        for r in missing:
            sass_bad.append("%s %s: not found in the disassembly" % (r["arch"], short(names[r["name"]])))
        print("\ncuda-check: SASS checked with %s (%d kernels)" % (cuobjdump, len(mixes)))
    else:
        print("\ncuda-check: no cuobjdump found (CUDA toolkit or Triton): SASS instruction check skipped")
    if not glue_inc:
        print("\ncuda-check: launch glue (csrc/cuda/*.cu) not compiled: needs a CUDA build of torch's headers "
              "(set CUDA_CHECK_TORCH_INCLUDE=<torch/include of a CUDA torch>)")
    shutil.rmtree(tmp, ignore_errors=True)
    print("\ncuda-check: %d kernels x %d archs in %.0fs" % (len(names), len(ARCHS), time.time() - t0))
    if failed:
        print("cuda-check: FAILED: compile errors in %s" % ", ".join("%s (%s)" % k for k in failed))
        return 1
    if sass_bad:
        print("cuda-check: FAILED: instruction check:\n  " + "\n  ".join(sass_bad))
        return 1
    if spills:
        print("cuda-check: FAILED: register spills in %s" % "; ".join("%s %s" % s for s in spills))
        return 1
    if occupancy:
        print("cuda-check: FAILED: over 128 registers, so 1 CTA / SM instead of the 2 the design counts on "
              "(csrc/cuda/README.md):\n  " + "\n  ".join(occupancy))
        return 1
    if not rows:
        print("cuda-check: FAILED: no kernels found in the ptxas output")
        return 1
    print("cuda-check: OK (no compile errors, no register spills%s)" % (
        ", instruction mix as promised" if cuobjdump else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
