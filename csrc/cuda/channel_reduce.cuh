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

// This thread's part of a ChannelGrid launch (1-D grid of blocks of kRedChannels x kRedRows
// threads): its channel and image, and the block's pixel range of that image, which the
// thread walks from p0 + threadIdx.y in steps of kRedRows.
struct ChannelBlock {
  int c;       // this thread's channel; 0 on an idle lane, so per-channel loads stay in bounds
  bool c_ok;   // c is a real channel (false: an idle lane of the last channel block)
  int n;       // image
  int p0, p1;  // pixel range within image n
};

ASPP_DEVICE ChannelBlock channel_block(const ChannelGrid& cg) {
  ChannelBlock cb;
  const int64_t bid = blockIdx.x;
  const int cblk = static_cast<int>(bid % cg.cblocks);
  const int64_t rest = bid / cg.cblocks;
  cb.n = static_cast<int>(rest / cg.chunks);
  const int chunk = static_cast<int>(rest % cg.chunks);
  const int c = cblk * kRedChannels + static_cast<int>(threadIdx.x);
  cb.p0 = static_cast<int>(static_cast<int64_t>(chunk) * cg.HW / cg.chunks);
  cb.p1 = static_cast<int>(static_cast<int64_t>(chunk + 1) * cg.HW / cg.chunks);
  cb.c_ok = c < cg.C;
  cb.c = cb.c_ok ? c : 0;
  return cb;
}

// Sums v[k] over the block's kRedRows rows (through a shared buffer of NV x kRedRows x
// kRedChannels A's) and atomically adds it to dst[k][cb.c] (skipping null dst). Every thread
// of the block calls it.
template <int NV, typename A>
ASPP_DEVICE void reduce_rows_atomic(A (&v)[NV], double* const (&dst)[NV], const ChannelBlock& cb) {
  __shared__ A red[NV * kRedRows * kRedChannels];
  const int tx = threadIdx.x, ty = threadIdx.y;
#pragma unroll
  for (int k = 0; k < NV; ++k) red[(k * kRedRows + ty) * kRedChannels + tx] = v[k];
  __syncthreads();
  if (ty == 0 && cb.c_ok) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      if (dst[k] == nullptr) continue;
      double s = 0.0;
#pragma unroll
      for (int r = 0; r < kRedRows; ++r) s += static_cast<double>(red[(k * kRedRows + r) * kRedChannels + tx]);
      atomicAdd(dst[k] + cb.c, s);
    }
  }
}

}  // namespace cuda
}  // namespace aspp_fused
