// The (element type, output type, math) of every tap-list and separable GEMM kernel the launch
// glue can launch: each dtype with its math (dispatch_gemm_math in glue.h), the output in that
// dtype or in the accumulation type. X(T, OutT, M) is applied to each, comma-separated.
#pragma once

#include "../common.cuh"

namespace aspp_fused {
namespace cuda {
using bf16 = __nv_bfloat16;
using f16 = __half;
}  // namespace cuda
}  // namespace aspp_fused

#define ASPP_GEMM_VARIANTS(X)                                                                 \
  X(bf16, bf16, Math::kMma16), X(bf16, float, Math::kMma16), X(f16, f16, Math::kMma16),       \
      X(f16, float, Math::kMma16), X(float, float, Math::kTf32), X(float, float, Math::kFfma), \
      X(double, double, Math::kFfma)
