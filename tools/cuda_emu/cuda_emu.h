// A small SIMT emulator that runs the CUDA kernels of csrc/cuda on the host, for machines
// without a GPU. Not part of the product: tools/cuda_emu/build.py compiles the real kernel
// sources and launch glue against this header (through shim/cuda/ptx.cuh and launch.h).
//
// Model: a launch runs its CTAs one after another; the threads of a CTA are fibers
// (ucontext), switching only at __syncthreads and at warp-collective operations. Warp
// collectives (shuffles, ldmatrix, mma.sync) meet at a per-warp barrier, exchange operands
// through a per-warp buffer and compute the result from the PTX ISA's fragment layouts
// (implemented here independently of the kernels).
//
// Because a fixed schedule and instant copies would hide ordering bugs, two knobs (environment
// variables read at each launch) make runs adversarial; each is deterministic for its value:
//   ASPP_CUDA_EMU_ORDER  forward (default) | reverse | shuffle:SEED — round robin: each round
//                        every fiber runs to its next synchronisation point, in thread order,
//                        reversed, or shuffled each round; a shared-memory race (a read not
//                        separated from another thread's write by a barrier) gives a different
//                        result under forward and reverse.
//                        warps | warps-reverse — each warp runs as far as it can (up to a
//                        __syncthreads) before the next warp starts: warps drift apart as far as
//                        the barriers allow, which exposes write-after-read hazards (a warp
//                        refilling a buffer another warp has not finished reading).
//   ASPP_CUDA_EMU_SMS    the SM count the glue's grid heuristics see (default 4; 132 = H100),
//                        so the GPU's pixel splits and reduction chunks can be exercised too.
//   ASPP_CUDA_EMU_ASYNC  1 (default) | 0 — cp.async is asynchronous: at issue the destination
//                        is filled with NaN bytes and the data lands only at the thread's
//                        cp.async.wait_group that retires its group. Reading a stage before its
//                        wait + barrier, or refilling a stage another warp still reads, yields NaN.
//                        A fiber that ends with copies never waited for is an error. 0: copies
//                        land at issue.
// Also checked: barrier deadlocks (a __syncthreads not reached by every thread), 16-byte
// alignment and bounds of cp.async / ldmatrix addresses; dynamic shared memory is poisoned
// with NaN bytes before each CTA, and under ASan (build.py --asan) every global and shared
// access is bounds-checked.
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
void cp_async_commit();
void cp_async_wait(int pending_groups);
void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row, bool trans);
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16);
void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
uint32_t cvt_rna_tf32(float x);

void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

// The SM count the launch glue sizes its grids for: ASPP_CUDA_EMU_SMS, default 4.
int num_sms();

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
