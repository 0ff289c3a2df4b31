// tap_gemm_kernel: the tap-list implicit GEMM of the atrous forward, its dgrad (sum mode, negated
// taps, transposed weights) and the 1x1 GEMMs of the backward (gemm_core.cuh: the machinery).
#pragma once

#include "gemm_core.cuh"

namespace aspp_fused {
namespace cuda {

// ------------------------------------------------------------------------------------------
// The tap-list conv kernel. Grid: 1-D, column block fastest (the CTAs sharing pixels run
// together and share their input in L2). Tile plan: N * tiles_per_image * ncol CTAs. Region plan
// (p.nregion > 0): the plan's items (csrc/tap_plan.h), longest region first.

template <typename T, typename OutT, Math M, bool kVecA>
__global__ void __launch_bounds__(GemmCfg<T, M>::kThreads, GemmCfg<T, M>::kTapMinBlocks)
    tap_gemm_kernel(const __grid_constant__ TapGemmParams p) {
  using Cfg = GemmCfg<T, M>;
  using A = acc_t<T>;
  ASPP_DYNAMIC_SMEM(smem_raw);
  T* smem = reinterpret_cast<T*>(smem_raw);
  __shared__ TapEntry taps[kMaxTaps];
  __shared__ int s_iters;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp % Cfg::kWarpsM, warp_n = warp / Cfg::kWarpsM;
  const int wm0 = warp_m * Cfg::WM, wn0 = warp_n * Cfg::WN;

  // The CTA's pixels, branches [b0, b1) and output columns [o0, o0 + BN) of them. Its taps per
  // branch: tap_range over its pixels (region plan: exactly the region's valid taps, the same
  // for each of its pixels; tile plan: every tap that touches the tile).
  int b0 = 0, b1 = p.nbranch, o0 = 0;
  CtaTile ct;
  if (p.nregion > 0) {
    const int cta = static_cast<int>(blockIdx.x);
    int r = 0;
    while (r + 1 < p.nregion && cta >= p.rg[r + 1].first_cta) ++r;
    const RegionDesc rd = p.rg[r];
    int ncolb = p.ncol;
    if (rd.branch >= 0) {
      b0 = rd.branch;
      b1 = b0 + 1;
      ncolb = p.cb_start[b0 + 1] - p.cb_start[b0];
    }
    const int local = cta - rd.first_cta;
    o0 = (local % ncolb) * Cfg::BN;
    ct = region_tile(p.tl, rd, local / ncolb, Cfg::BM);
  } else {
    const int col = static_cast<int>(blockIdx.x % p.ncol);
    ct = cta_tile(p.tl, static_cast<int64_t>(blockIdx.x / p.ncol));
    o0 = col * Cfg::BN;
    if (!p.sum_mode) {
      b0 = branch_of_column(p.cb_start, p.nbranch, col);
      b1 = b0 + 1;
      o0 = (col - p.cb_start[b0]) * Cfg::BN;
    }
  }

  // The CTA's tap table: for each branch, its rectangle of taps.
  if (tid == 0) {
    int ne = 0, iters = 0;
    for (int b = b0; b < b1; ++b) {
      const GemmBranch& br = p.br[b];
      if (br.cin <= 0) continue;
      const TapRange ry = tap_range(ct.h0, ct.h_end(), ct.H, br.k, br.step);
      const TapRange rx = tap_range(ct.w0, ct.w_end(), ct.W, br.k, br.step);
      for (int ty = ry.t0; ty <= ry.t1; ++ty)
        for (int tx = rx.t0; tx <= rx.t1; ++tx) {
          TapEntry& e = taps[ne++];
          e.dy = (ty - br.k / 2) * br.step;
          e.dx = (tx - br.k / 2) * br.step;
          e.in_off = br.in_off;
          e.cin = br.cin;
          e.ldb = br.ldb;
          e.pad_ = 0;
          e.w_off = br.w_off + static_cast<int64_t>(ty * br.k + tx) * br.cin * br.ldb;
          iters += (br.cin + Cfg::BK - 1) / Cfg::BK;
        }
    }
    s_iters = iters;
  }
  __syncthreads();
  const int iters = s_iters;

  ARows<Cfg> ar;
  ar.init(ct, tid);
  const T* in = static_cast<const T*>(p.in);
  const T* wts = static_cast<const T*>(p.w);

  A acc[Cfg::MI][Cfg::NI][4];
  zero_acc<Cfg>(acc);

  int pe = 0, pkc = 0;  // producer: tap entry, channel offset
  auto load = [&](int stage) {
    const TapEntry te = taps[pe];
    T* sA = smem + stage * Cfg::kStageElems;
    T* sB = sA + Cfg::BM * Cfg::kAStride;
    load_a_tile<Cfg, kVecA>(sA, ar, in, p.in_stride, ct.H, ct.W, te.dy, te.dx, te.in_off, te.cin, pkc);
    load_b_tile<Cfg>(sB, wts + te.w_off, te.cin, te.ldb, pkc, o0, tid, wts);
    pkc += Cfg::BK;
    if (pkc >= te.cin) {
      pkc = 0;
      ++pe;
    }
  };
  auto compute = [&](int stage) {
    const T* sA = smem + stage * Cfg::kStageElems;
    warp_mma_stage<Cfg, M>(sA, sA + Cfg::BM * Cfg::kAStride, acc, wm0, wn0, lane);
  };
  run_pipeline<Cfg>(iters, load, compute);

  const GemmBranch& ob = p.br[b0];
  gemm_epilogue<Cfg>(acc, p.ep, static_cast<OutT*>(p.out), p.out_stride, ct, o0, ob.cout, ob.out_off, wm0, wn0,
                     warp_m, lane, tid, reinterpret_cast<A*>(smem_raw));
}

}  // namespace cuda
}  // namespace aspp_fused
