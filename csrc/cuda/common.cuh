// Device basics shared by every CUDA kernel of aspp_fused: element types, conversions, warp /
// block reductions (tap ranges: csrc/tap_plan.h) (the PTX wrappers: ptx.cuh).
//
// Pure CUDA: no torch headers, so `make cuda-check` can compile every kernel with nvcc alone.
// The PTX wrappers are in ptx.cuh; the host emulator (tools/cuda_emu) compiles these same
// sources as C++ with its own cuda/ptx.cuh ahead on the include path.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/ptx.cuh"  // CUDA headers, ASPP_DEVICE / ASPP_HD / ASPP_DYNAMIC_SMEM, the PTX wrappers
#include "tap_plan.h"     // tap_range (host and device)

namespace aspp_fused {
namespace cuda {

// ------------------------------------------------------------------------------------------
// Types. Accumulation is float for bf16 / fp16 / fp32 inputs and double for float64.

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

// How a CTA multiplies its shared-memory tiles.
enum class Math {
  kMma16,  // bf16 / fp16: mma.sync m16n8k16, fp32 accumulate
  kTf32,   // fp32 with TF32 allowed: mma.sync m16n8k8 .tf32
  kFfma,   // fp32 without TF32, float64: CUDA-core FMA with the same accumulator layout
};

// v as a To: bf16 / fp16 <-> float by the CUDA intrinsics (float -> bf16 / fp16 rounds to
// nearest even), the same type unchanged, anything else by static_cast.
template <typename To, typename From>
ASPP_HD To convert(From v) {
  if constexpr (std::is_same_v<To, From>) {
    return v;
  } else if constexpr (std::is_same_v<To, float> && std::is_same_v<From, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else if constexpr (std::is_same_v<To, __nv_bfloat16> && std::is_same_v<From, float>) {
    return __float2bfloat16_rn(v);
  } else if constexpr (std::is_same_v<To, float> && std::is_same_v<From, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<To, __half> && std::is_same_v<From, float>) {
    return __float2half_rn(v);
  } else {
    return static_cast<To>(v);
  }
}

ASPP_HD int imin(int a, int b) { return a < b ? a : b; }
ASPP_HD int imax(int a, int b) { return a > b ? a : b; }
ASPP_HD int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
ASPP_HD int64_t lmax(int64_t a, int64_t b) { return a > b ? a : b; }

template <typename To, typename From>
ASPP_HD To bit_cast(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast size");
  To t;
  memcpy(&t, &f, sizeof(To));
  return t;
}

// 16 bytes (one vector load / store) <-> its 16 / sizeof(T) elements in the accumulation type,
// through registers (a reinterpret_cast of a local array would put it on the stack).
template <typename T, typename A, int V>
ASPP_HD void unpack16(const uint4& raw, A (&v)[V]) {
  static_assert(V * sizeof(T) == 16, "16 bytes");
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
  if constexpr (sizeof(T) == 2) {
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = convert<A>(bit_cast<T>(static_cast<uint16_t>(w[i >> 1] >> ((i & 1) * 16))));
  } else if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = convert<A>(bit_cast<T>(w[i]));
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i)
      v[i] = convert<A>(bit_cast<T>((static_cast<uint64_t>(w[2 * i + 1]) << 32) | w[2 * i]));
  }
}

template <typename T, typename A, int V>
ASPP_HD uint4 pack16(const A (&v)[V]) {
  static_assert(V * sizeof(T) == 16, "16 bytes");
  uint32_t w[4];
  if constexpr (sizeof(T) == 2) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint16_t lo = bit_cast<uint16_t>(convert<T>(v[2 * j]));
      const uint16_t hi = bit_cast<uint16_t>(convert<T>(v[2 * j + 1]));
      w[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  } else if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int j = 0; j < 4; ++j) w[j] = bit_cast<uint32_t>(convert<T>(v[j]));
  } else {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const uint64_t u = bit_cast<uint64_t>(convert<T>(v[j]));
      w[2 * j] = static_cast<uint32_t>(u);
      w[2 * j + 1] = static_cast<uint32_t>(u >> 32);
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// V accumulation-type values from a 16-byte aligned address, in 16-byte loads.
template <typename A, int V>
ASPP_DEVICE void load_vec16(const A* p, A (&v)[V]) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(A));
  static_assert(V % kPer == 0, "whole 16-byte loads");
#pragma unroll
  for (int j = 0; j < V / kPer; ++j) {
    const uint4 r = reinterpret_cast<const uint4*>(p)[j];
    A t[kPer];
    memcpy(t, &r, 16);
#pragma unroll
    for (int k = 0; k < kPer; ++k) v[j * kPer + k] = t[k];
  }
}

// relu that lets NaN through, as torch.relu (and the CPU kernels: `z < 0 ? 0 : z`).
template <typename A>
ASPP_HD A relu(A v) {
  return v < A(0) ? A(0) : v;
}

// ------------------------------------------------------------------------------------------
// Warp / block reductions.

template <typename A>
ASPP_DEVICE A shfl_xor(A v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}

}  // namespace cuda
}  // namespace aspp_fused
