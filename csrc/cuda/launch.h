// How the CUDA launch glue reaches the GPU: device guard, SM count, the compute-capability
// check, the launch helper (current stream, dynamic shared memory opt-in, launch check) and
// the op registration (ASPP_CUDA_LIBRARY_IMPL).
//
// Included as "cuda/launch.h" through the include path (-I csrc); the host emulator
// (tools/cuda_emu/shim/cuda/launch.h) stands in for it there.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <string>

// The light c10 headers (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS / cuSPARSE headers):
// c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream aliases.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

// TORCH_LIBRARY_IMPL of the CUDA kernels (atrous_conv.cu, separable_conv.cu).
#define ASPP_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(aspp_fused, CUDA, m)

namespace aspp_fused {
namespace cuda {

using DeviceGuard = c10::cuda::CUDAGuard;

inline int num_sms() {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return n;
}
inline at::Device current_device() { return at::Device(at::kCUDA, c10::cuda::current_device()); }

// Whether the current stream is being captured into a CUDA graph. The pack cache is bypassed then:
// a graph must re-pack on every replay (an entry read by a graph would not follow later weight
// updates, and one written during capture holds nothing until the first replay).
inline bool stream_capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// The current device and stream, as a pack_cache tag: an entry packed on one stream is only read
// on that stream, after the pack in stream order.
inline std::string stream_key() {
  return "cuda:" + std::to_string(c10::cuda::current_device()) + "/stream " +
         std::to_string(c10::cuda::getCurrentCUDAStream().id());
}

// The kernels use cp.async and bf16 / tf32 mma.sync: compute capability 8.0 or newer.
inline void check_device(const char* op) {
  int major = 0, minor = 0;
  const int dev = c10::cuda::current_device();
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  TORCH_CHECK(major >= 8, op, ": the aspp_fused CUDA kernels need compute capability 8.0 or newer, cuda:", dev,
              " is ", major, ".", minor, "; use backend='torch' or backend='triton' on this GPU");
}

// Launches kernel<<<grid, block, smem, current stream>>>(args...) and checks the launch.
// A zero grid launches nothing (CUDA rejects it).
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), int64_t grid, dim3 block, size_t smem, const Args&... args) {
  if (grid <= 0) return;
  TORCH_CHECK(grid <= std::numeric_limits<int32_t>::max(), "aspp_fused: grid of ", grid, " blocks is too large");
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(grid), block, smem, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace aspp_fused
