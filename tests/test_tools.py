"""The developer tools that guard the CUDA and Triton kernels on machines without a GPU.

tools/cuda_check.py's SASS instruction check: fed made-up disassembly, it must pass a kernel
whose instructions keep its template's promises and name each broken promise otherwise.
tools/triton_check.py: the Triton kernels built offline for sm_90 / sm_80 keep their promises.
"""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cuda_check():
    # tools/ is a folder of the repository, not a package: load the script as a module.
    spec = importlib.util.spec_from_file_location("cuda_check", os.path.join(ROOT, "tools", "cuda_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BF16_TAP = ("void aspp_fused::cuda::tap_gemm_kernel<__nv_bfloat16, float, (aspp_fused::cuda::Math)0, true>"
            "(aspp_fused::cuda::TapGemmParams)")
TF32_WGRAD = "void aspp_fused::cuda::wgrad_gemm_kernel<float, (aspp_fused::cuda::Math)1, false>(aspp_fused::cuda::WgradParams)"
FFMA_SEP = ("void aspp_fused::cuda::separable_gemm_kernel<float, float, (aspp_fused::cuda::Math)2, true>"
            "(aspp_fused::cuda::SepGemmParams)")


def sass(name, *insns):
    """A cuobjdump -sass listing of one function with the given instructions."""
    lines = ["\t\tFunction : %s" % name, "\t.headerflags\t@\"EF_CUDA_SM90\""]
    for i, insn in enumerate(insns):
        lines.append("        /*%04x*/                   %s ;                 /* 0x000fe20000000f00 */" % (16 * i, insn))
    return "\n".join(lines) + "\n"


def test_sass_mix_counts_opcodes_per_function(cuda_check):
    text = sass("_Z1a", "LDGSTS.E.BYPASS.LTC128B.128 [R1], desc[UR4][R2.64]", "BAR.SYNC.DEFER_BLOCKING 0x0",
                "LDSM.16.M88.4 R4, [R3]", "HMMA.16816.F32.BF16 R8, R4, R12, R8", "@!P0 HMMA.16816.F32.BF16 R8, R4, R12, R8")
    text += sass("_Z1b", "FFMA R1, R2, R3, R1", "@P1 BPT.TRAP 0x1", "STL [R1], R2")
    mix = cuda_check.sass_mix(text)
    assert set(mix) == {"_Z1a", "_Z1b"}
    a, b = mix["_Z1a"], mix["_Z1b"]
    assert (a["HMMA"], a["LDSM"], a["LDGSTS"], a["BAR"]) == (2, 1, 1, 1)
    assert a["HMMA kinds"] == {"HMMA.16816.F32.BF16"}
    assert (b["BPT"], b["STL"], b["HMMA"]) == (1, 1, 0)


def test_sass_problems_pass_a_kernel_that_keeps_its_promises(cuda_check):
    good = cuda_check.sass_mix(sass("k", "LDGSTS.E [R1], [R2.64]", "LDSM.16.MT88.4 R4, [R3]",
                                    "HMMA.16816.F32.BF16 R8, R4, R12, R8"))["k"]
    assert cuda_check.sass_problems(BF16_TAP, good) == []
    tf32 = cuda_check.sass_mix(sass("k", "HMMA.1688.F32.TF32 R8, R4, R12, R8"))["k"]
    assert cuda_check.sass_problems(TF32_WGRAD, tf32) == []
    ffma = cuda_check.sass_mix(sass("k", "LDGSTS.E [R1], [R2.64]", "FFMA R1, R2, R3, R1"))["k"]
    assert cuda_check.sass_problems(FFMA_SEP, ffma) == []


@pytest.mark.parametrize("insns, expect", [
    (("LDGSTS.E [R1], [R2.64]", "LDSM.16.M88.4 R4, [R3]", "HMMA.16816.F32 R8, R4, R12, R8"), "no HMMA.16816.F32.BF16"),
    (("LDGSTS.E [R1], [R2.64]", "HMMA.16816.F32.BF16 R8, R4, R12, R8"), "no LDSM"),
    (("LDSM.16.M88.4 R4, [R3]", "HMMA.16816.F32.BF16 R8, R4, R12, R8"), "without LDGSTS"),
    (("LDGSTS.E [R1], [R2.64]", "LDSM.16.M88.4 R4, [R3]", "HMMA.16816.F32.BF16 R8, R4, R12, R8", "BPT.TRAP 0x1"),
     "pre-sm_80 trap"),
    (("LDGSTS.E [R1], [R2.64]", "LDSM.16.M88.4 R4, [R3]", "HMMA.16816.F32.BF16 R8, R4, R12, R8", "LDL R1, [R1]"),
     "local memory"),
])
def test_sass_problems_name_each_broken_promise(cuda_check, insns, expect):
    mix = cuda_check.sass_mix(sass("k", *insns))["k"]
    problems = cuda_check.sass_problems(BF16_TAP, mix)
    assert any(expect in p for p in problems), problems


def test_sass_problems_ffma_kernel_must_not_use_tensor_cores(cuda_check):
    mix = cuda_check.sass_mix(sass("k", "LDGSTS.E [R1], [R2.64]", "HMMA.1688.F32.TF32 R8, R4, R12, R8"))["k"]
    assert any("FFMA kernel holds" in p for p in cuda_check.sass_problems(FFMA_SEP, mix))
    mix = cuda_check.sass_mix(sass("k", "FFMA R1, R2, R3, R1"))["k"]
    assert any("no HMMA.1688.F32.TF32" in p for p in cuda_check.sass_problems(TF32_WGRAD, mix))


def test_occupancy_check_flags_tensor_core_gemms_over_128_registers(cuda_check):
    """2 CTAs / SM at 256 threads leave 128 registers a thread: one more on a tensor-core tap-list or
    wgrad kernel is flagged; FFMA variants and the separable kernel (1 CTA / SM by design) are not."""
    tap, wgrad, sep = (cuda_check.short(n) for n in (BF16_TAP, TF32_WGRAD, FFMA_SEP))
    ffma_tap = cuda_check.short(BF16_TAP.replace("__nv_bfloat16, float, (aspp_fused::cuda::Math)0",
                                                 "float, float, (aspp_fused::cuda::Math)2"))
    assert not cuda_check.occupancy_lost(tap, 128) and cuda_check.occupancy_lost(tap, 129)
    assert cuda_check.occupancy_lost(wgrad, 130)
    assert not cuda_check.occupancy_lost(ffma_tap, 160)
    assert not cuda_check.occupancy_lost(sep, 237)


def test_kernels_build_for_sm90_and_sm80_with_their_promises():
    """tools/triton_check.py builds every Triton kernel family for sm_90 and sm_80 (Triton's own
    ptxas; no GPU) in the modules' eval and train epilogues: the GEMM families hold wgmma (sm_90)
    / mma.sync (sm_80), cp.async and a >= 3-stage pipeline of their operand tiles (region_conv_tma:
    its weight tiles by TMA, cp.async.bulk.tensor), and no family spills. Each GEMM family's
    one-stage build must break the pipeline promises, so the check
    is shown able to fail. (`make triton-check` runs every autotune config.)"""
    import json
    import subprocess
    import sys
    import tempfile

    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    tool = os.path.join(ROOT, "tools", "triton_check.py")
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
