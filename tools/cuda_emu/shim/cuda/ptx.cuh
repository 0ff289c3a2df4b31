// The host emulator's cuda/ptx.cuh: found ahead of csrc/cuda/ptx.cuh on the emulator build's
// include path (tools/cuda_emu/build.py), it gives the kernels the same names running on the
// host SIMT emulator (cuda_emu.h: CUDA keywords, thread indices, warp collectives).
#pragma once

#include <cstdint>

#include "cuda_emu.h"  // includes cuda_bf16.h / cuda_fp16.h before its keyword macros

#define ASPP_DEVICE __device__ __forceinline__
#define ASPP_HD __host__ __device__ __forceinline__
#define ASPP_DYNAMIC_SMEM(name) unsigned char* name = ::emu::dynamic_smem()

namespace aspp_fused {
namespace cuda {

// ------------------------------------------------------------------------------------------
// PTX: the emulated twins of csrc/cuda/ptx.cuh's wrappers (cuda_emu.cpp: the PTX ISA's semantics).

// 16-byte global -> shared copy; bytes [src_bytes, 16) of the destination are zero-filled
// (src_bytes == 0 reads nothing: the zero padding of out-of-image taps costs no traffic).
ASPP_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
  ::emu::cp_async_16(smem_dst, gmem_src, src_bytes);
}

ASPP_DEVICE void cp_async_commit() {
  ::emu::cp_async_commit();
}

template <int N>
ASPP_DEVICE void cp_async_wait() {
  ::emu::cp_async_wait(N);
}

// Four 8x8 b16 matrices; lane l gives the address of row (l % 8) of matrix (l / 8).
ASPP_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  ::emu::ldmatrix_x4(r, smem_row, false);
}

ASPP_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  ::emu::ldmatrix_x4(r, smem_row, true);
}

// d += a * b, m16n8k16, fp32 accumulate. T: __nv_bfloat16 or __half.
template <typename T>
ASPP_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
ASPP_DEVICE void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ::emu::mma_m16n8k16(d, a, b, /*bf16=*/true);
}

template <>
ASPP_DEVICE void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ::emu::mma_m16n8k16(d, a, b, /*bf16=*/false);
}

// d += a * b, m16n8k8 with tf32 operands (registers hold cvt.rna.tf32 results).
ASPP_DEVICE void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ::emu::mma_m16n8k8_tf32(d, a, b);
}

// fp32 -> tf32, round to nearest (ties away), as cuDNN / cuBLAS feed their TF32 MMAs.
ASPP_DEVICE uint32_t to_tf32(float x) {
  return ::emu::cvt_rna_tf32(x);
}

}  // namespace cuda
}  // namespace aspp_fused
