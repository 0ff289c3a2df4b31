// The host emulator's cuda/launch.h: found ahead of csrc/cuda/launch.h on the emulator build's
// include path (tools/cuda_emu/build.py). Launches run on the SIMT emulator, on CPU tensors,
// and the ops register as aspp_fused_emu::* for CPU (schemas: build.py copies csrc's).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <string>

#include "cuda_emu.h"

#define ASPP_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(aspp_fused_emu, CPU, m)

namespace aspp_fused {
namespace cuda {

struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};

// The grid-sizing heuristics (pixel splits of wgrad, chunks of the channel reductions) depend on
// the SM count: ASPP_CUDA_EMU_SMS (default 4; an H100 has 132) picks the one they see.
inline int num_sms() { return ::emu::num_sms(); }
inline at::Device current_device() { return at::Device(at::kCPU); }
inline std::string stream_key() { return "emulator"; }
inline bool stream_capturing() { return false; }
inline void check_device(const char*) {}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), int64_t grid, dim3 block, size_t smem, const Args&... args) {
  if (grid <= 0) return;
  TORCH_CHECK(grid <= std::numeric_limits<int32_t>::max(), "aspp_fused: grid of ", grid, " blocks is too large");
  ::emu::launch(dim3(static_cast<unsigned>(grid)), block, smem, [&]() { kernel(args...); });
}

}  // namespace cuda
}  // namespace aspp_fused
