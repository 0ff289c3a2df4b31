// wgrad_gemm_kernel: the weight gradient, one GEMM per (branch, tap) over the tap's valid pixel
// region (gemm_core.cuh: the machinery).
#pragma once

#include "gemm_core.cuh"

namespace aspp_fused {
namespace cuda {

// ------------------------------------------------------------------------------------------
// wgrad of the tap-list conv on the same machinery: for each job (branch, tap) the GEMM
//   ws[c][o] += sum_p x[p + (dy, dx)][c] * g[p][g_off + o]
// over the pixels p whose tap source is inside the image (the tap's valid region: no padding
// multiplied). M = input channels (BM), N = output channels (BN), K = pixels (BK per stage),
// A = x^T kept k-major in shared memory (ldmatrix.trans), B = g as in the forward. The pixels
// are split over `splits` CTAs (grid), whose partial sums are atomically added into the
// acc-type workspace. Grid: 1-D, oblocks fastest, then cblocks, splits, jobs.

template <typename T, Math M, bool kVec>
__global__ void __launch_bounds__(GemmCfg<T, M>::kThreads, GemmCfg<T, M>::kMinBlocks) wgrad_gemm_kernel(const __grid_constant__ WgradParams p) {
  using Cfg = GemmCfg<T, M>;
  using A = acc_t<T>;
  ASPP_DYNAMIC_SMEM(smem_raw);
  T* smem = reinterpret_cast<T*>(smem_raw);

  const int64_t bid = blockIdx.x;
  const int ob = static_cast<int>(bid % p.oblocks);
  const int cbk = static_cast<int>((bid / p.oblocks) % p.cblocks);
  const int64_t rest = bid / (static_cast<int64_t>(p.oblocks) * p.cblocks);
  const int split = static_cast<int>(rest % p.splits);
  const WgradJob& jb = p.job[static_cast<int>(rest / p.splits)];
  const int o0 = ob * Cfg::BN, c0 = cbk * Cfg::BM;
  // Uniform early exits, before any barrier.
  if (o0 >= jb.cout || c0 >= p.C) return;
  const int hlo = imax(0, -jb.dy), hhi = imin(p.H, p.H - jb.dy);
  const int wlo = imax(0, -jb.dx), whi = imin(p.W, p.W - jb.dx);
  if (hlo >= hhi || wlo >= whi) return;
  const int rw = whi - wlo;
  const int64_t region = static_cast<int64_t>(hhi - hlo) * rw;
  const int64_t total = region * p.N;
  const int64_t q0 = total * split / p.splits, q1 = total * (split + 1) / p.splits;
  const int iters = static_cast<int>((q1 - q0 + Cfg::BK - 1) / Cfg::BK);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp % Cfg::kWarpsM, warp_n = warp / Cfg::kWarpsM;
  const int wm0 = warp_m * Cfg::WM, wn0 = warp_n * Cfg::WN;
  const T* x = static_cast<const T*>(p.x);
  const T* g = static_cast<const T*>(p.g);

  A acc[Cfg::MI][Cfg::NI][4];
  zero_acc<Cfg>(acc);

  // Each thread copies the same (pixel row, 16-byte chunk) pairs of both operand tiles.
  const int chunk = tid % Cfg::kBChunksPerRow;
  const int cx = c0 + chunk * Cfg::kVec, og = o0 + chunk * Cfg::kVec;
  int64_t qb = q0;
  auto load = [&](int stage) {
    T* sAt = smem + stage * Cfg::kStageElems;
    T* sB = sAt + Cfg::BK * Cfg::kAtStride;
#pragma unroll
    for (int i = 0; i < Cfg::kBChunks; ++i) {
      const int r = tid / Cfg::kBChunksPerRow + i * (Cfg::kThreads / Cfg::kBChunksPerRow);
      const int64_t q = qb + r;
      const bool ok = q < q1;
      int64_t gp = 0;
      if (ok) {
        const int64_t n = q / region, rr = q - n * region;
        gp = (n * p.H + hlo + rr / rw) * p.W + wlo + rr % rw;
      }
      const int64_t xp = gp + static_cast<int64_t>(jb.dy) * p.W + jb.dx;
      T* da = sAt + r * Cfg::kAtStride + chunk * Cfg::kVec;
      T* db = sB + r * Cfg::kBStride + chunk * Cfg::kVec;
      const T* sa = x + xp * p.x_stride + cx;
      const T* sb = g + gp * p.g_stride + jb.g_off + og;
      if (kVec) {
        // C, cout, the strides and g_off are multiples of kVec: a chunk is entirely in or out.
        const bool oka = ok && cx < p.C, okb = ok && og < jb.cout;
        cp_async_16(da, oka ? static_cast<const void*>(sa) : static_cast<const void*>(x), oka ? 16 : 0);
        cp_async_16(db, okb ? static_cast<const void*>(sb) : static_cast<const void*>(g), okb ? 16 : 0);
      } else {
#pragma unroll
        for (int e = 0; e < Cfg::kVec; ++e) {
          da[e] = (ok && cx + e < p.C) ? sa[e] : convert<T>(0.0f);
          db[e] = (ok && og + e < jb.cout) ? sb[e] : convert<T>(0.0f);
        }
      }
    }
    qb += Cfg::BK;
  };
  auto compute = [&](int stage) {
    const T* sAt = smem + stage * Cfg::kStageElems;
    warp_mma_stage<Cfg, M, true>(sAt, sAt + Cfg::BK * Cfg::kAtStride, acc, wm0, wn0, lane);
  };
  run_pipeline<Cfg>(iters, load, compute);

  A* ws = static_cast<A*>(p.ws) + jb.ws_off;
  const int gq = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int c = c0 + wm0 + mi * 16 + gq + hf * 8;
      if (c >= p.C) continue;
#pragma unroll
      for (int ni = 0; ni < Cfg::NI; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int o = o0 + wn0 + ni * 8 + 2 * tq + j;
          if (o < jb.cout) atomicAdd(ws + static_cast<int64_t>(c) * jb.cout + o, acc[mi][ni][hf * 2 + j]);
        }
    }
}

}  // namespace cuda
}  // namespace aspp_fused
