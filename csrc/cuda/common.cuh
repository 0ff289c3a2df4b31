// Device basics shared by every CUDA kernel of aspp_fused: element types, conversions and the
// few PTX instructions the kernels use (cp.async, ldmatrix, mma.sync).
//
// Pure CUDA: no torch headers, so `make cuda-check` can compile every kernel with nvcc alone.
// With ASPP_CUDA_EMULATE defined the same code compiles as host C++ against the SIMT emulator
// in tools/cuda_emu (fibers for threads, warp-collective emulation of the PTX below), which is
// how the kernels' index math is tested on machines without a GPU.
#pragma once

#include <cstdint>
#include <cstring>

#if !defined(ASPP_CUDA_EMULATE)
#include <cuda_runtime.h>
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#if defined(ASPP_CUDA_EMULATE)
#include "cuda_emu.h"  // tools/cuda_emu: __global__, threadIdx, __syncthreads, ... on the host
#endif

#define ASPP_DEVICE __device__ __forceinline__
#define ASPP_HD __host__ __device__ __forceinline__

#if defined(ASPP_CUDA_EMULATE)
#define ASPP_DYNAMIC_SMEM(name) unsigned char* name = ::emu::dynamic_smem()
#else
#define ASPP_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

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

template <typename To, typename From>
struct Convert {
  static ASPP_HD To run(From v) { return static_cast<To>(v); }
};
template <>
struct Convert<float, __nv_bfloat16> {
  static ASPP_HD float run(__nv_bfloat16 v) { return __bfloat162float(v); }
};
template <>
struct Convert<__nv_bfloat16, float> {
  static ASPP_HD __nv_bfloat16 run(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Convert<float, __half> {
  static ASPP_HD float run(__half v) { return __half2float(v); }
};
template <>
struct Convert<__half, float> {
  static ASPP_HD __half run(float v) { return __float2half_rn(v); }
};
template <>
struct Convert<__nv_bfloat16, __nv_bfloat16> {
  static ASPP_HD __nv_bfloat16 run(__nv_bfloat16 v) { return v; }
};
template <>
struct Convert<__half, __half> {
  static ASPP_HD __half run(__half v) { return v; }
};

template <typename To, typename From>
ASPP_HD To convert(From v) {
  return Convert<To, From>::run(v);
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
// Tap ranges (the device twin of csrc/cpu/tap_range.h): the taps t in [0, k) of one axis,
// offset (t - k/2) * step, that read at least one in-image row of [lo, hi) (t1 < t0: none).

ASPP_HD void tap_range(int lo, int hi, int size, int k, int step, int* t0, int* t1) {
  *t0 = k;
  *t1 = -1;
  for (int t = 0; t < k; ++t) {
    const int off = (t - k / 2) * step;
    const int a = imax(lo, -off), b = imin(hi, size - off);
    if (a < b) {
      *t0 = imin(*t0, t);
      *t1 = imax(*t1, t);
    }
  }
}

// ------------------------------------------------------------------------------------------
// PTX. Each wrapper has an emulated twin in tools/cuda_emu with the semantics of the PTX ISA.
// They need sm_80+ (cp.async, bf16 / tf32 mma.sync); a build that also targets older GPUs
// compiles them to a trap there (the glue refuses such devices before launching anything).

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define ASPP_PRE_SM80 1
#else
#define ASPP_PRE_SM80 0
#endif

// 16-byte global -> shared copy; bytes [src_bytes, 16) of the destination are zero-filled
// (src_bytes == 0 reads nothing: the zero padding of out-of-image taps costs no traffic).
ASPP_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
#if defined(ASPP_CUDA_EMULATE)
  ::emu::cp_async_16(smem_dst, gmem_src, src_bytes);
#elif ASPP_PRE_SM80
  __trap();
#else
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes)
               : "memory");
#endif
}

ASPP_DEVICE void cp_async_commit() {
#if defined(ASPP_CUDA_EMULATE)
  ::emu::cp_async_commit();
#elif !ASPP_PRE_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
ASPP_DEVICE void cp_async_wait() {
#if defined(ASPP_CUDA_EMULATE)
  ::emu::cp_async_wait(N);
#elif !ASPP_PRE_SM80
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Four 8x8 b16 matrices; lane l gives the address of row (l % 8) of matrix (l / 8).
ASPP_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
#if defined(ASPP_CUDA_EMULATE)
  ::emu::ldmatrix_x4(r, smem_row, false);
#elif ASPP_PRE_SM80
  __trap();
#else
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#endif
}

ASPP_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
#if defined(ASPP_CUDA_EMULATE)
  ::emu::ldmatrix_x4(r, smem_row, true);
#elif ASPP_PRE_SM80
  __trap();
#else
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#endif
}

// d += a * b, m16n8k16, fp32 accumulate. T: __nv_bfloat16 or __half.
template <typename T>
ASPP_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
ASPP_DEVICE void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(ASPP_CUDA_EMULATE)
  ::emu::mma_m16n8k16(d, a, b, /*bf16=*/true);
#elif ASPP_PRE_SM80
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

template <>
ASPP_DEVICE void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(ASPP_CUDA_EMULATE)
  ::emu::mma_m16n8k16(d, a, b, /*bf16=*/false);
#elif ASPP_PRE_SM80
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// d += a * b, m16n8k8 with tf32 operands (registers hold cvt.rna.tf32 results).
ASPP_DEVICE void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(ASPP_CUDA_EMULATE)
  ::emu::mma_m16n8k8_tf32(d, a, b);
#elif ASPP_PRE_SM80
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// fp32 -> tf32, round to nearest (ties away), as cuDNN / cuBLAS feed their TF32 MMAs.
ASPP_DEVICE uint32_t to_tf32(float x) {
#if defined(ASPP_CUDA_EMULATE)
  return ::emu::cvt_rna_tf32(x);
#elif ASPP_PRE_SM80
  __trap();
  return 0;
#else
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#endif
}

// ------------------------------------------------------------------------------------------
// Warp / block reductions.

template <typename A>
ASPP_DEVICE A shfl_xor(A v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}

}  // namespace cuda
}  // namespace aspp_fused
