// cuda-check translation unit (no torch headers): instantiates every tap-list GEMM and wgrad
// GEMM kernel the launch glue (tap_gemm.cu) can launch, so `make cuda-check` compiles each one
// with ptxas -v. Keep in sync with run_typed / launch_group / run_wgrad_typed in tap_gemm.cu.
#include "../tap_gemm.cuh"
#include "../wgrad_gemm.cuh"
#include "gemm_variants.cuh"

namespace aspp_fused {
namespace cuda {

#define ASPP_TAP_GEMM(T, OutT, M)                 \
  (const void*)&tap_gemm_kernel<T, OutT, M, true>, \
      (const void*)&tap_gemm_kernel<T, OutT, M, false>

extern const void* const kTapGemmKernels[];  // extern: referenced, so every entry is kept
const void* const kTapGemmKernels[] = {ASPP_GEMM_VARIANTS(ASPP_TAP_GEMM)};

#define ASPP_WGRAD_GEMM(T, M) (const void*)&wgrad_gemm_kernel<T, M, true>, (const void*)&wgrad_gemm_kernel<T, M, false>

extern const void* const kWgradKernels[];
const void* const kWgradKernels[] = {
    ASPP_WGRAD_GEMM(bf16, Math::kMma16),  ASPP_WGRAD_GEMM(f16, Math::kMma16), ASPP_WGRAD_GEMM(float, Math::kTf32),
    ASPP_WGRAD_GEMM(float, Math::kFfma),  ASPP_WGRAD_GEMM(double, Math::kFfma),
};

}  // namespace cuda
}  // namespace aspp_fused
