// The channel reduction shared by the small kernels around the GEMMs (epilogue_kernels.cuh,
// depthwise_kernels.cuh): blocks of 32 channels x 8 pixel rows; consecutive lanes read
// consecutive channels of one pixel (NHWC), each thread walks a strided slice of one image's
// pixel chunk, partial sums go through shared memory and one double atomicAdd per channel
// and block (so grad_bias[n, o], a per-image sum, falls out of the same partials).
//
// These kernels are memory-bound, simple and correct; they are not tuned (csrc/cuda/README.md).
#pragma once

#include "common.cuh"
#include "params.cuh"

namespace aspp_fused {
namespace cuda {

// The block's channel, image and pixel range of a ChannelGrid launch (1-D grid).
struct ChannelBlock {
  int c;  // this thread's channel (may be >= C: idle lane)
  int n;
  int p0, p1;  // pixel range within image n
};

ASPP_DEVICE ChannelBlock channel_block(const ChannelGrid& cg) {
  ChannelBlock cb;
  const int64_t bid = blockIdx.x;
  const int cblk = static_cast<int>(bid % cg.cblocks);
  const int64_t rest = bid / cg.cblocks;
  cb.n = static_cast<int>(rest / cg.chunks);
  const int chunk = static_cast<int>(rest % cg.chunks);
  cb.c = cblk * kRedChannels + static_cast<int>(threadIdx.x);
  cb.p0 = static_cast<int>(static_cast<int64_t>(chunk) * cg.HW / cg.chunks);
  cb.p1 = static_cast<int>(static_cast<int64_t>(chunk + 1) * cg.HW / cg.chunks);
  return cb;
}

// Sums v[k] over the block's 8 rows and atomically adds it to dst[k][c] (skipping null dst).
template <int NV, typename A>
ASPP_DEVICE void reduce_rows_atomic(A (&v)[NV], A* red, double* const (&dst)[NV], int c, bool c_ok) {
  const int tx = threadIdx.x, ty = threadIdx.y;
#pragma unroll
  for (int k = 0; k < NV; ++k) red[(k * kRedRows + ty) * kRedChannels + tx] = v[k];
  __syncthreads();
  if (ty == 0 && c_ok) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      if (dst[k] == nullptr) continue;
      double s = 0.0;
#pragma unroll
      for (int r = 0; r < kRedRows; ++r) s += static_cast<double>(red[(k * kRedRows + r) * kRedChannels + tx]);
      atomicAdd(dst[k] + c, s);
    }
  }
}

}  // namespace cuda
}  // namespace aspp_fused
