// cuda-check translation unit (no torch headers): every fused separable kernel the launch glue
// (separable_conv.cu, run_separable_typed) can launch.
#include "../separable_gemm.cuh"
#include "gemm_variants.cuh"

namespace aspp_fused {
namespace cuda {

#define ASPP_SEP_GEMM(T, OutT, M)                       \
  (const void*)&separable_gemm_kernel<T, OutT, M, true>, \
      (const void*)&separable_gemm_kernel<T, OutT, M, false>

extern const void* const kSeparableKernels[];  // extern: referenced, so every entry is kept
const void* const kSeparableKernels[] = {ASPP_GEMM_VARIANTS(ASPP_SEP_GEMM)};

}  // namespace cuda
}  // namespace aspp_fused
