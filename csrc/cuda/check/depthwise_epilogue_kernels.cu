// cuda-check translation unit (no torch headers): every small kernel of epilogue_kernels.cuh and
// depthwise_kernels.cuh the launch glue (depthwise_epilogue.cu, tap_gemm.cu) can launch.
#include "../depthwise_kernels.cuh"
#include "../epilogue_kernels.cuh"

namespace aspp_fused {
namespace cuda {

using bf16 = __nv_bfloat16;
using f16 = __half;

#define ASPP_PER_DTYPE(K) (const void*)&K<bf16>, (const void*)&K<f16>, (const void*)&K<float>, (const void*)&K<double>

extern const void* const kReduceKernels[];  // extern: referenced, so every entry is kept
const void* const kReduceKernels[] = {
    ASPP_PER_DTYPE(epilogue_backward_kernel),
    ASPP_PER_DTYPE(epilogue_forward_kernel),
    ASPP_PER_DTYPE(dw_wgrad_kernel),
    (const void*)&depthwise_kernel<bf16, bf16>,
    (const void*)&depthwise_kernel<bf16, float>,
    (const void*)&depthwise_kernel<f16, f16>,
    (const void*)&depthwise_kernel<f16, float>,
    (const void*)&depthwise_kernel<float, float>,
    (const void*)&depthwise_kernel<double, double>,
    (const void*)&mid_backward_kernel<float>,
    (const void*)&mid_backward_kernel<double>,
};

}  // namespace cuda
}  // namespace aspp_fused
