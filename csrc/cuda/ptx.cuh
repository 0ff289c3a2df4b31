// The device environment of the CUDA kernels: the CUDA headers, the function qualifiers, the
// dynamic shared memory declaration, and the few PTX instructions the kernels use (cp.async,
// ldmatrix, mma.sync, cvt.rna.tf32).
//
// Included as "cuda/ptx.cuh", resolved through the include path (-I csrc). The host emulator of
// the kernels (tools/cuda_emu) puts its own cuda/ptx.cuh ahead on that path, with the same
// names running on the host; this file is the GPU's and knows nothing of it.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define ASPP_DEVICE __device__ __forceinline__
#define ASPP_HD __host__ __device__ __forceinline__
#define ASPP_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]

namespace aspp_fused {
namespace cuda {

// ------------------------------------------------------------------------------------------
// PTX. Each wrapper has an emulated twin in tools/cuda_emu/shim with the PTX ISA's semantics.
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
#if ASPP_PRE_SM80
  __trap();
#else
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes)
               : "memory");
#endif
}

ASPP_DEVICE void cp_async_commit() {
#if !ASPP_PRE_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
ASPP_DEVICE void cp_async_wait() {
#if !ASPP_PRE_SM80
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Four 8x8 b16 matrices; lane l gives the address of row (l % 8) of matrix (l / 8).
ASPP_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
#if ASPP_PRE_SM80
  __trap();
#else
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#endif
}

ASPP_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
#if ASPP_PRE_SM80
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
#if ASPP_PRE_SM80
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
#if ASPP_PRE_SM80
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
#if ASPP_PRE_SM80
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
#if ASPP_PRE_SM80
  __trap();
  return 0;
#else
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#endif
}

}  // namespace cuda
}  // namespace aspp_fused
