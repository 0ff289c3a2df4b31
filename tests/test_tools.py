"""The developer tools that guard the CUDA kernels on machines without a GPU.

tools/cuda_check.py's SASS instruction check: fed made-up disassembly, it must pass a kernel
whose instructions keep its template's promises and name each broken promise otherwise.
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
