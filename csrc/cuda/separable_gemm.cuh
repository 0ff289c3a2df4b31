// separable_gemm_kernel: the fused separable conv (depthwise prologue in registers, then the
// pointwise GEMM on tensor cores; gemm_core.cuh: the machinery).
#pragma once

#include "gemm_core.cuh"

namespace aspp_fused {
namespace cuda {

// ------------------------------------------------------------------------------------------
// The fused separable conv kernel (concat mode, all branches in one launch).
//
// Plain 1x1 branch: the tap-list GEMM with one tap. Depthwise branch: the K loop runs over
// (channel block, tap of the CTA's tap rectangle); each step's input tile [BM x BK] at that
// tap's offset streams through the same cp.async ring as the atrous kernel (so the depthwise
// loads are pipelined, not latency-bound), and the consumer accumulates w[tap][c] * x into
// registers (acc type). After the block's last tap: mid affine + act, rounded to x.dtype into
// a shared [BM x BK] operand tile, and one tensor-core step with the pointwise weights (whose
// tile rides in the stage of that last tap). The depthwise output never touches device memory.

template <class Cfg, typename T>
constexpr int separable_smem_bytes() {
  return Cfg::kSmemBytes + Cfg::BM * Cfg::kAStride * static_cast<int>(sizeof(T));
}

template <typename T, typename OutT, Math M, bool kVecA>
__global__ void __launch_bounds__(GemmCfg<T, M>::kThreads)
    separable_gemm_kernel(const __grid_constant__ SepGemmParams p) {
  using Cfg = GemmCfg<T, M>;
  using A = acc_t<T>;
  constexpr int V = Cfg::kVec;
  ASPP_DYNAMIC_SMEM(smem_raw);
  T* smem = reinterpret_cast<T*>(smem_raw);
  T* s_op = smem + Cfg::kStages * Cfg::kStageElems;  // depthwise branches: the GEMM's A tile

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp % Cfg::kWarpsM, warp_n = warp / Cfg::kWarpsM;
  const int wm0 = warp_m * Cfg::WM, wn0 = warp_n * Cfg::WN;

  const int col = static_cast<int>(blockIdx.x % p.ncol);
  const CtaTile ct = cta_tile(p.tl, static_cast<int64_t>(blockIdx.x / p.ncol));
  const int b = branch_of_column(p.cb_start, p.nbranch, col);
  const int o0 = (col - p.cb_start[b]) * Cfg::BN;
  const SepBranch& br = p.br[b];
  const int C = p.C;
  const bool has_dw = br.dw_off >= 0;
  const bool has_mid = br.mid_off >= 0;
  const int d = br.dilation;
  int ty0 = 1, ty1 = 1, tx0 = 1, tx1 = 1;
  if (has_dw) {
    const TapRange ry = tap_range(ct.h0, ct.h_end(), ct.H, 3, d), rx = tap_range(ct.w0, ct.w_end(), ct.W, 3, d);
    ty0 = ry.t0;
    ty1 = ry.t1;
    tx0 = rx.t0;
    tx1 = rx.t1;
  }
  const int ntx = tx1 - tx0 + 1;
  const int ntap = (ty1 - ty0 + 1) * ntx;  // >= 1: the centre tap always reads the tile itself
  const int iters = ((C + Cfg::BK - 1) / Cfg::BK) * ntap;

  ARows<Cfg> ar;
  ar.init(ct, tid);
  const T* x = static_cast<const T*>(p.x);
  const T* pw_base = static_cast<const T*>(p.pw);
  const T* pw = pw_base + br.pw_off;
  const A* dw = has_dw ? static_cast<const A*>(p.dw) + br.dw_off : nullptr;
  const A* ms = has_mid ? static_cast<const A*>(p.mid) + br.mid_off : nullptr;
  const A* msh = has_mid ? ms + C : nullptr;

  A acc[Cfg::MI][Cfg::NI][4];
  zero_acc<Cfg>(acc);
  A dwacc[Cfg::kAChunks][V];  // the depthwise sums of this thread's [row][chunk] elements

  int pk = 0, pt = 0;  // producer: channel block, tap
  auto load = [&](int stage) {
    T* sX = smem + stage * Cfg::kStageElems;
    T* sB = sX + Cfg::BM * Cfg::kAStride;
    const int ty = ty0 + pt / ntx, tx = tx0 + pt % ntx;
    load_a_tile<Cfg, kVecA>(sX, ar, x, C, ct.H, ct.W, (ty - 1) * d, (tx - 1) * d, 0, C, pk * Cfg::BK);
    if (pt == ntap - 1) load_b_tile<Cfg>(sB, pw, C, br.ldb, pk * Cfg::BK, o0, tid, pw_base);
    if (++pt == ntap) {
      pt = 0;
      ++pk;
    }
  };
  int ck = 0, cq = 0;  // consumer: channel block, tap
  // One depthwise step from the stage's input tile; true after the block's last tap, when
  // s_op holds the finished GEMM operand (mid affine + act, rounded to T).
  auto depthwise_step = [&](const T* sX) -> bool {
    const int ch = ck * Cfg::BK + ar.chunk * V;
    const bool c_ok = ch < C;
    if (cq == 0) {
#pragma unroll
      for (int i = 0; i < Cfg::kAChunks; ++i)
#pragma unroll
        for (int e = 0; e < V; ++e) dwacc[i][e] = A(0);
    }
    if (c_ok) {
      const int tap = (ty0 + cq / ntx) * 3 + tx0 + cq % ntx;
      A wv[V];
      if (kVecA) {
        load_vec16(dw + tap * C + ch, wv);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) wv[e] = ch + e < C ? dw[tap * C + ch + e] : A(0);
      }
      // Rows and channels outside the tile / image were zero-filled by the loader.
#pragma unroll
      for (int i = 0; i < Cfg::kAChunks; ++i) {
        A xv[V];
        unpack16<T>(*reinterpret_cast<const uint4*>(sX + ar.row[i] * Cfg::kAStride + ar.chunk * V), xv);
#pragma unroll
        for (int e = 0; e < V; ++e) dwacc[i][e] += wv[e] * xv[e];
      }
    }
    if (++cq < ntap) return false;
    cq = 0;
#pragma unroll
    for (int i = 0; i < Cfg::kAChunks; ++i) {
      A v[V];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const bool e_ok = c_ok && ch + e < C;
        v[e] = dwacc[i][e];
        if (has_mid && e_ok) {
          v[e] = v[e] * ms[ch + e] + msh[ch + e];
          if (p.mid_act == 1) v[e] = relu(v[e]);
        }
        if (!e_ok) v[e] = A(0);  // K padding: keep it exactly zero
      }
      *reinterpret_cast<uint4*>(s_op + ar.row[i] * Cfg::kAStride + ar.chunk * V) = pack16<T>(v);
    }
    // s_op is complete once every thread passes; it is rewritten only after the next
    // iteration's pipeline barrier, i.e. after every warp's GEMM step on it.
    __syncthreads();
    return true;
  };
  auto compute = [&](int stage) {
    const T* sX = smem + stage * Cfg::kStageElems;
    const T* sB = sX + Cfg::BM * Cfg::kAStride;
    if (has_dw && !depthwise_step(sX)) return;
    warp_mma_stage<Cfg, M>(has_dw ? s_op : sX, sB, acc, wm0, wn0, lane);
    ++ck;
  };
  run_pipeline<Cfg>(iters, load, compute);

  gemm_epilogue<Cfg>(acc, p.ep, static_cast<OutT*>(p.out), p.out_stride, ct, o0, br.cout, br.out_off, wm0, wn0,
                     warp_m, lane, tid, reinterpret_cast<A*>(smem_raw));
}

}  // namespace cuda
}  // namespace aspp_fused
