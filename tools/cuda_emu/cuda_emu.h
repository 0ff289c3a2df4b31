// A small SIMT emulator that runs the CUDA kernels of csrc/cuda on the host, for machines
// without a GPU. Not part of the product: tools/cuda_emu/build.py compiles the real kernel
// sources and launch glue with ASPP_CUDA_EMULATE against this header.
//
// Model: a launch runs its CTAs one after another; the threads of a CTA are fibers
// (ucontext), scheduled round-robin, switching only at __syncthreads and at warp-collective
// operations, so a run is deterministic. Warp collectives (shuffles, ldmatrix, mma.sync) meet
// at a per-warp barrier, exchange operands through a per-warp buffer and compute the result
// from the PTX ISA's fragment layouts (implemented here independently of the kernels).
// cp.async is a synchronous copy with zero fill. Checked at run time: barrier deadlocks
// (a __syncthreads not reached by every thread), 16-byte alignment and bounds of cp.async /
// ldmatrix addresses; dynamic shared memory is poisoned with NaN bytes before each CTA, and
// under ASan (build.py --asan) every global and shared access is bounds-checked.
#pragma once

#include <cuda_bf16.h>  // before the keyword macros below
#include <cuda_fp16.h>
#include <vector_types.h>  // dim3, uint3, uint4 (plain host structs)

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static
#define __align__(n) alignas(n)

namespace emu {

uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();
unsigned char* dynamic_smem();
void syncthreads();
void warp_sync();
unsigned char* warp_scratch(int lane);  // 64 bytes per lane of the calling thread's warp
int lane_id();

template <class T>
T shfl_xor(T v, int mask) {
  static_assert(sizeof(T) <= 64, "shuffle payload");
  const int lane = lane_id();
  std::memcpy(warp_scratch(lane), &v, sizeof(T));
  warp_sync();
  T r;
  std::memcpy(&r, warp_scratch(lane ^ mask), sizeof(T));
  warp_sync();
  return r;
}

void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes);
void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row, bool trans);
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16);
void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
uint32_t cvt_rna_tf32(float x);

void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

// Counters for tests: launches and CTAs run since the library was loaded.
long long launches();
long long ctas();

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())

inline void __syncthreads() { ::emu::syncthreads(); }

template <class T>
inline T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask, int /*width*/ = 32) {
  return ::emu::shfl_xor(v, lane_mask);
}

// One host thread runs every fiber, and fibers switch only at barriers: plain adds are atomic.
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}
inline double atomicAdd(double* p, double v) {
  const double old = *p;
  *p = old + v;
  return old;
}
