// cuda-check translation unit (no torch headers): every fused separable kernel the launch glue
// (separable_conv.cu, run_separable_typed) can launch.
#include "../separable_gemm.cuh"

namespace aspp_fused {
namespace cuda {

using bf16 = __nv_bfloat16;
using f16 = __half;

#define ASPP_SEP_GEMM(T, OutT, M)                       \
  (const void*)&separable_gemm_kernel<T, OutT, M, true>, \
      (const void*)&separable_gemm_kernel<T, OutT, M, false>

extern const void* const kSeparableKernels[];  // extern: referenced, so every entry is kept
const void* const kSeparableKernels[] = {
    ASPP_SEP_GEMM(bf16, bf16, Math::kMma16),   ASPP_SEP_GEMM(bf16, float, Math::kMma16),
    ASPP_SEP_GEMM(f16, f16, Math::kMma16),     ASPP_SEP_GEMM(f16, float, Math::kMma16),
    ASPP_SEP_GEMM(float, float, Math::kTf32),  ASPP_SEP_GEMM(float, float, Math::kFfma),
    ASPP_SEP_GEMM(double, double, Math::kFfma),
};

}  // namespace cuda
}  // namespace aspp_fused
