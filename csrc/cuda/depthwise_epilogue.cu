// Launch glue of the small kernels (epilogue_kernels.cuh, depthwise_kernels.cuh): dtype dispatch
// and grid sizes.
#include <algorithm>

#include "glue.h"  // first: the torch headers must not see the emulator's CUDA keyword macros
#include "depthwise_kernels.cuh"
#include "epilogue_kernels.cuh"

namespace aspp_fused {
namespace cuda {
namespace {

const dim3 kRedBlock(kRedChannels, kRedRows);

}  // namespace

void run_epilogue_backward(at::ScalarType dtype, const EpilogueBwdParams& p) {
  dispatch_dtype(dtype, "aspp_fused", [&](auto tag) {
    using T = decltype(tag);
    launch(epilogue_backward_kernel<T>, channel_grid_blocks(p.cg), kRedBlock, 0, p);
  });
}

void run_depthwise(at::ScalarType dtype, bool in_is_acc, const DepthwiseParams& p) {
  const int64_t total = static_cast<int64_t>(p.N) * p.H * p.W * p.C;
  const int64_t grid = std::min<int64_t>((total + 255) / 256, static_cast<int64_t>(num_sms()) * 32);
  dispatch_dtype(dtype, "aspp_fused", [&](auto tag) {
    using T = decltype(tag);
    if (in_is_acc) {
      launch(depthwise_kernel<T, acc_t<T>>, grid, dim3(256), 0, p);
    } else {
      launch(depthwise_kernel<T, T>, grid, dim3(256), 0, p);
    }
  });
}

void run_mid_backward(at::ScalarType dtype, const MidBwdParams& p) {
  if (dtype == at::kDouble) {
    launch(mid_backward_kernel<double>, channel_grid_blocks(p.cg), kRedBlock, 0, p);
  } else {
    launch(mid_backward_kernel<float>, channel_grid_blocks(p.cg), kRedBlock, 0, p);
  }
}

void run_dw_wgrad(at::ScalarType dtype, const DwWgradParams& p) {
  dispatch_dtype(dtype, "aspp_fused", [&](auto tag) {
    using T = decltype(tag);
    launch(dw_wgrad_kernel<T>, channel_grid_blocks(p.cg), kRedBlock, 0, p);
  });
}

}  // namespace cuda
}  // namespace aspp_fused
