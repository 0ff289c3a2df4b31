// The one primitive on the GPU (docs/DESIGN.md): a tap-list implicit GEMM over 2-D pixel tiles with
// a fused epilogue, and its separable twin with a depthwise prologue.
//
// A CTA owns a tile_h x tile_w block of pixels of one image (<= BM GEMM rows) and BN output
// channels. Its K loop runs over (tap, channel block) pairs, where the taps are only those of
// the rectangle [ky0, ky1] x [kx0, kx1] that can touch the tile (computed once per CTA into a
// shared-memory table; with DeepLab rates most border tiles skip most taps, and at rate >= the
// map size a 3x3 branch is just its centre tap). Loads at the tile / image edges are masked
// by zero-filling cp.async (src-size 0), so the padding costs neither MACs nor traffic.
//
// Pipeline: kStages-deep cp.async ring of [BM x BK] input and [BK x BN] weight tiles, 16-byte
// copies when the channel layout allows (kVecA; else the input tile is gathered by scalar
// loads, the weights are always packed 16-byte aligned). Math per dtype (GemmCfg, Math):
//   bf16 / fp16  mma.sync m16n8k16 (ldmatrix / ldmatrix.trans fragments), fp32 accumulate
//   fp32         mma.sync m16n8k8 tf32 when TF32 is allowed, else FFMA
//   fp64         FFMA on a 64 x 64 tile (correct, not fast)
// All three keep the accumulators in the mma C-fragment layout so the epilogue is shared.
#pragma once

#include "common.cuh"
#include "params.cuh"

namespace aspp_fused {
namespace cuda {

template <typename T, Math M>
struct GemmCfg {
  static constexpr bool kWide = sizeof(T) == 8;  // float64: smaller tile (accumulators in doubles)
  static constexpr int kWarpsM = kWide ? 2 : 4;
  static constexpr int kWarpsN = 2;
  static constexpr int kThreads = kWarpsM * kWarpsN * 32;
  // Two CTAs per SM is the target (<= 128 registers at 256 threads; 2 x 76 KB of shared memory
  // fits sm_80's 164 KB and sm_90's 227 KB) so one CTA's prologue / epilogue overlaps the
  // other's mainloop. ptxas reaches it unforced for the tap-list kernel (forcing it made two
  // sm_90a variants spill); the wgrad kernel needs the launch bound (tensor-core configurations
  // only: the FFMA ones spill under it). The separable kernel (its depthwise sums live in
  // registers across K steps) needs ~165 registers and spills under the bound: 1 CTA / SM,
  // latency hidden by the 4-stage pipeline alone.
  static constexpr int kMinBlocks = M == Math::kFfma ? 1 : 2;
  static constexpr int BM = kWide ? 64 : 128;  // pixels per CTA
  static constexpr int BN = kWide ? 64 : 128;  // output channels per CTA
  static constexpr int BK = 64 / (int)sizeof(T);  // input channels per stage: 64-byte rows
  static constexpr int kStages = kWide ? 3 : 4;
  static constexpr int kVec = 16 / (int)sizeof(T);  // elements per 16-byte copy
  static constexpr int WM = BM / kWarpsM, WN = BN / kWarpsN;
  static constexpr int MI = WM / 16, NI = WN / 8;  // 16 x 8 accumulator fragments per warp
  // Row padding keeps ldmatrix / fragment loads free of bank conflicts: A rows of 80 bytes
  // (8 consecutive rows hit 8 distinct 16-byte bank groups), B rows of BN + 8 elements.
  static constexpr int kAStride = BK + kVec;
  static constexpr int kBStride = BN + (M == Math::kFfma ? kVec : 8);
  static constexpr int kAChunksPerRow = BK / kVec;  // 4
  static constexpr int kBChunksPerRow = BN / kVec;
  static constexpr int kAChunks = BM * kAChunksPerRow / kThreads;  // per thread
  static constexpr int kBChunks = BK * kBChunksPerRow / kThreads;
  static constexpr int kStageElems = BM * kAStride + BK * kBStride;
  // wgrad keeps its A operand (x^T) as [BK pixels][BM channels], padded like B.
  static constexpr int kAtStride = BM + (M == Math::kFfma ? kVec : 8);
  static constexpr int kAtChunksPerRow = BM / kVec;
  static_assert(BK * kAtStride + BK * kBStride <= kStageElems, "wgrad stage fits the GEMM stage");
  static_assert(kAtChunksPerRow == kBChunksPerRow, "wgrad loads A and B rows alike");
  static constexpr int kSmemBytes = kStages * kStageElems * (int)sizeof(T);

  static_assert(kAChunksPerRow == 4, "A rows are four 16-byte chunks");
  static_assert(BM * kAChunksPerRow % kThreads == 0 && BK * kBChunksPerRow % kThreads == 0, "loader split");
  static_assert(kThreads % kAChunksPerRow == 0 && kThreads % kBChunksPerRow == 0, "loader split");
  static_assert(M != Math::kMma16 || (sizeof(T) == 2 && BK % 16 == 0 && NI % 2 == 0), "m16n8k16 tiling");
  static_assert(M != Math::kTf32 || (sizeof(T) == 4 && BK % 8 == 0), "m16n8k8 tf32 tiling");
  static_assert((kAStride * sizeof(T)) % 16 == 0 && (kBStride * sizeof(T)) % 16 == 0, "16-byte rows");
};

// One (tap, branch) entry of a CTA's K loop.
struct TapEntry {
  int dy, dx;
  int in_off, cin;
  int ldb;
  int pad_;
  int64_t w_off;  // weights of this tap: [cin][ldb]
};

// The CTA's pixel tile.
struct CtaTile {
  int n, h0, w0, th, tw, H, W;

  // GEMM row r -> pixel (h, w); false for rows past the tile or the image edge.
  ASPP_DEVICE bool pixel(int r, int* h, int* w) const {
    if (r >= th * tw) return false;
    *h = h0 + r / tw;
    *w = w0 + r % tw;
    return *h < H && *w < W;
  }
  ASPP_DEVICE int h_end() const { return imin(h0 + th, H); }
  ASPP_DEVICE int w_end() const { return imin(w0 + tw, W); }
};

ASPP_DEVICE CtaTile cta_tile(const Tiling& tl, int64_t tile) {
  CtaTile c;
  c.n = static_cast<int>(tile / tl.tiles_per_image);
  const int t = static_cast<int>(tile % tl.tiles_per_image);
  c.th = tl.tile_h;
  c.tw = tl.tile_w;
  c.h0 = (t / tl.tiles_w) * tl.tile_h;
  c.w0 = (t % tl.tiles_w) * tl.tile_w;
  c.H = tl.H;
  c.W = tl.W;
  return c;
}

// Concat mode: the branch owning column block `col`.
ASPP_DEVICE int branch_of_column(const int* cb_start, int nbranch, int col) {
  int b = 0;
  while (b + 1 < nbranch && col >= cb_start[b + 1]) ++b;
  return b;
}

// ------------------------------------------------------------------------------------------
// Loaders.

// The thread's share of the [BM x BK] input tile: rows (pixels) fixed for the whole CTA.
template <class Cfg>
struct ARows {
  int h[Cfg::kAChunks], w[Cfg::kAChunks];
  bool ok[Cfg::kAChunks];
  int64_t pix[Cfg::kAChunks];  // (n * H + h) * W + w
  int row[Cfg::kAChunks];
  int chunk;  // 16-byte chunk within the row

  ASPP_DEVICE void init(const CtaTile& ct, int tid) {
    chunk = tid % Cfg::kAChunksPerRow;
#pragma unroll
    for (int i = 0; i < Cfg::kAChunks; ++i) {
      row[i] = tid / Cfg::kAChunksPerRow + i * (Cfg::kThreads / Cfg::kAChunksPerRow);
      int hh = 0, ww = 0;
      ok[i] = ct.pixel(row[i], &hh, &ww);
      h[i] = hh;
      w[i] = ww;
      pix[i] = (static_cast<int64_t>(ct.n) * ct.H + hh) * ct.W + ww;
    }
  }
};

// Input tile of tap (dy, dx), channels [in_off + kc, in_off + kc + BK) of in[pixel][in_stride].
template <class Cfg, bool kVecA, typename T>
ASPP_DEVICE void load_a_tile(T* sA, const ARows<Cfg>& ar, const T* __restrict__ in, int64_t in_stride, int H, int W,
                             int dy, int dx, int in_off, int cin, int kc) {
  const int ch = kc + ar.chunk * Cfg::kVec;
#pragma unroll
  for (int i = 0; i < Cfg::kAChunks; ++i) {
    const int hh = ar.h[i] + dy, ww = ar.w[i] + dx;
    const bool ok = ar.ok[i] && hh >= 0 && hh < H && ww >= 0 && ww < W;
    T* dst = sA + ar.row[i] * Cfg::kAStride + ar.chunk * Cfg::kVec;
    const T* src = in + (ar.pix[i] + static_cast<int64_t>(dy) * W + dx) * in_stride + in_off + ch;
    if (kVecA) {
      // cin % kVec == 0 here, so a chunk is entirely in or out of [0, cin).
      const bool in_range = ok && ch < cin;
      cp_async_16(dst, in_range ? static_cast<const void*>(src) : static_cast<const void*>(in), in_range ? 16 : 0);
    } else {
#pragma unroll
      for (int e = 0; e < Cfg::kVec; ++e) dst[e] = (ok && ch + e < cin) ? src[e] : convert<T>(0.0f);
    }
  }
}

// Weight tile rows [kc, kc + BK) x columns [o0, o0 + BN) of a packed [cin][ldb] slab.
template <class Cfg, typename T>
ASPP_DEVICE void load_b_tile(T* sB, const T* __restrict__ wtap, int cin, int ldb, int kc, int o0, int tid,
                             const T* any_valid) {
  const int chunk = tid % Cfg::kBChunksPerRow;
#pragma unroll
  for (int i = 0; i < Cfg::kBChunks; ++i) {
    const int r = tid / Cfg::kBChunksPerRow + i * (Cfg::kThreads / Cfg::kBChunksPerRow);
    const int k = kc + r, o = o0 + chunk * Cfg::kVec;
    // ldb is a multiple of kVec: a chunk is entirely in or out.
    const bool ok = k < cin && o < ldb;
    const T* src = wtap + static_cast<int64_t>(k) * ldb + o;
    cp_async_16(sB + r * Cfg::kBStride + chunk * Cfg::kVec, ok ? static_cast<const void*>(src) : any_valid,
                ok ? 16 : 0);
  }
}

// ------------------------------------------------------------------------------------------
// Warp-level math on one pipeline stage. acc[mi][ni][e]: row wm0 + mi*16 + lane/4 + (e/2)*8,
// column wn0 + ni*8 + 2*(lane%4) + e%2 (the mma.sync C fragment layout).

// kATrans: sA holds A^T, [BK][kAtStride] (k-major: the wgrad operand x^T), else A, [BM][kAStride].
template <class Cfg, Math M, bool kATrans = false, typename T, typename A>
ASPP_DEVICE void warp_mma_stage(const T* sA, const T* sB, A (&acc)[Cfg::MI][Cfg::NI][4], int wm0, int wn0,
                                int lane) {
  constexpr int MI = Cfg::MI, NI = Cfg::NI;
  if constexpr (M == Math::kMma16) {
#pragma unroll
    for (int ks = 0; ks < Cfg::BK / 16; ++ks) {
      uint32_t af[MI][4];
      uint32_t bfr[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        if constexpr (kATrans) {
          // Matrices (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15) of the
          // k-major tile; .trans hands lane (g, t) the elements (m = g, k = 2t, 2t + 1): a0..a3.
          ldmatrix_x4_trans(af[mi], sA + (ks * 16 + (lane & 7) + ((lane >> 4) << 3)) * Cfg::kAtStride + wm0 +
                                        mi * 16 + ((lane >> 3) & 1) * 8);
        } else {
          ldmatrix_x4(af[mi], sA + (wm0 + mi * 16 + (lane & 15)) * Cfg::kAStride + ks * 16 + (lane >> 4) * 8);
        }
      }
#pragma unroll
      for (int nj = 0; nj < NI / 2; ++nj) {
        uint32_t r[4];
        ldmatrix_x4_trans(r, sB + (ks * 16 + (lane & 15)) * Cfg::kBStride + wn0 + nj * 16 + (lane >> 4) * 8);
        bfr[2 * nj][0] = r[0];
        bfr[2 * nj][1] = r[1];
        bfr[2 * nj + 1][0] = r[2];
        bfr[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma_m16n8k16<T>(acc[mi][ni], af[mi], bfr[ni]);
    }
  } else if constexpr (M == Math::kTf32) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int ks = 0; ks < Cfg::BK / 8; ++ks) {
      uint32_t af[MI][4];
      uint32_t bfr[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        if constexpr (kATrans) {
          const T* a0 = sA + (ks * 8 + t) * Cfg::kAtStride + wm0 + mi * 16 + g;
          af[mi][0] = to_tf32(a0[0]);
          af[mi][1] = to_tf32(a0[8]);
          af[mi][2] = to_tf32(a0[4 * Cfg::kAtStride]);
          af[mi][3] = to_tf32(a0[4 * Cfg::kAtStride + 8]);
        } else {
          const T* a0 = sA + (wm0 + mi * 16 + g) * Cfg::kAStride + ks * 8 + t;
          af[mi][0] = to_tf32(a0[0]);
          af[mi][1] = to_tf32(a0[8 * Cfg::kAStride]);
          af[mi][2] = to_tf32(a0[4]);
          af[mi][3] = to_tf32(a0[8 * Cfg::kAStride + 4]);
        }
      }
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const T* b0 = sB + (ks * 8 + t) * Cfg::kBStride + wn0 + ni * 8 + g;
        bfr[ni][0] = to_tf32(b0[0]);
        bfr[ni][1] = to_tf32(b0[4 * Cfg::kBStride]);
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma_m16n8k8_tf32(acc[mi][ni], af[mi], bfr[ni]);
    }
  } else {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll 2
    for (int kk = 0; kk < Cfg::BK; ++kk) {
      A a[MI][2], b[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        if constexpr (kATrans) {
          a[mi][0] = convert<A>(sA[kk * Cfg::kAtStride + wm0 + mi * 16 + g]);
          a[mi][1] = convert<A>(sA[kk * Cfg::kAtStride + wm0 + mi * 16 + g + 8]);
        } else {
          a[mi][0] = convert<A>(sA[(wm0 + mi * 16 + g) * Cfg::kAStride + kk]);
          a[mi][1] = convert<A>(sA[(wm0 + mi * 16 + g + 8) * Cfg::kAStride + kk]);
        }
      }
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        b[ni][0] = convert<A>(sB[kk * Cfg::kBStride + wn0 + ni * 8 + 2 * t]);
        b[ni][1] = convert<A>(sB[kk * Cfg::kBStride + wn0 + ni * 8 + 2 * t + 1]);
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
          acc[mi][ni][0] += a[mi][0] * b[ni][0];
          acc[mi][ni][1] += a[mi][0] * b[ni][1];
          acc[mi][ni][2] += a[mi][1] * b[ni][0];
          acc[mi][ni][3] += a[mi][1] * b[ni][1];
        }
    }
  }
}

// The multistage pipeline. load(stage) issues the copies of the next K step into `stage`
// (producer state lives in the caller's lambda); compute(stage) consumes one stage.
template <class Cfg, class Load, class Compute>
ASPP_DEVICE void run_pipeline(int iters, Load&& load, Compute&& compute) {
#pragma unroll 1
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < iters) load(s);
    cp_async_commit();
  }
#pragma unroll 1
  for (int it = 0; it < iters; ++it) {
    // Stage `it` has landed for this thread; the barrier makes it visible to all threads and
    // guarantees that every warp is done with stage it - 1, which the prefetch overwrites.
    cp_async_wait<Cfg::kStages - 2>();
    __syncthreads();
    const int next = it + Cfg::kStages - 1;
    if (next < iters) load(next % Cfg::kStages);
    cp_async_commit();
    compute(it % Cfg::kStages);
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory may be reused after this
}

// ------------------------------------------------------------------------------------------
// Epilogue: affine (+ bias), batch statistics, act, store (or raw / accumulate).
// red: >= kWarpsM * BN * 2 accumulators of shared memory (the drained pipeline buffers).

template <class Cfg, typename OutT, typename A>
ASPP_DEVICE void gemm_epilogue(A (&acc)[Cfg::MI][Cfg::NI][4], const Epilogue& ep, OutT* __restrict__ out,
                               int64_t out_stride, const CtaTile& ct, int o0, int cout, int out_off, int wm0,
                               int wn0, int warp_m, int lane, int tid, A* red) {
  const int g = lane >> 2, tq = lane & 3;
  const bool raw = ep.raw != 0;
  const bool stats = !raw && ep.ch_sum != nullptr;
  const A* scale = static_cast<const A*>(ep.scale);
  const A* shift = static_cast<const A*>(ep.shift);
  const A* bias = ep.bias ? static_cast<const A*>(ep.bias) + static_cast<int64_t>(ct.n) * ep.o_total : nullptr;

  int64_t pix[Cfg::MI][2];
  bool rok[Cfg::MI][2];
#pragma unroll
  for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      int h = 0, w = 0;
      rok[mi][hf] = ct.pixel(wm0 + mi * 16 + g + hf * 8, &h, &w);
      pix[mi][hf] = (static_cast<int64_t>(ct.n) * ct.H + h) * ct.W + w;
    }

#pragma unroll
  for (int ni = 0; ni < Cfg::NI; ++ni)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int col = wn0 + ni * 8 + 2 * tq + j;
      const int o = o0 + col;
      const bool cok = o < cout;
      const int oc = out_off + o;
      A sc = A(1), sh = A(0), bi = A(0);
      if (cok && !raw) {
        sc = scale[oc];
        sh = shift[oc];
        if (bias) bi = bias[oc];
      }
      A s = A(0), q = A(0);
#pragma unroll
      for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          if (!(rok[mi][hf] && cok)) continue;
          A v = acc[mi][ni][hf * 2 + j];
          if (!raw) {
            v = v * sc + sh + bi;
            s += v;
            q += v * v;
            if (ep.act == 1) v = relu(v);
          }
          OutT* dst = out + pix[mi][hf] * out_stride + oc;
          if (ep.accumulate) v += convert<A>(*dst);
          *dst = convert<OutT>(v);
        }
      if (stats) {
        // Lanes with the same tq hold the same columns: reduce over the 8 row groups.
        s += shfl_xor(s, 4);
        q += shfl_xor(q, 4);
        s += shfl_xor(s, 8);
        q += shfl_xor(q, 8);
        s += shfl_xor(s, 16);
        q += shfl_xor(q, 16);
        if (g == 0) {
          red[(warp_m * Cfg::BN + col) * 2] = s;
          red[(warp_m * Cfg::BN + col) * 2 + 1] = q;
        }
      }
    }
  if (stats) {
    __syncthreads();
    for (int c = tid; c < Cfg::BN; c += Cfg::kThreads) {
      const int o = o0 + c;
      if (o >= cout) continue;
      double s = 0.0, q = 0.0;
#pragma unroll
      for (int wm = 0; wm < Cfg::kWarpsM; ++wm) {
        s += static_cast<double>(red[(wm * Cfg::BN + c) * 2]);
        q += static_cast<double>(red[(wm * Cfg::BN + c) * 2 + 1]);
      }
      atomicAdd(ep.ch_sum + out_off + o, s);
      atomicAdd(ep.ch_sumsq + out_off + o, q);
    }
  }
}

// ------------------------------------------------------------------------------------------
// The tap-list conv kernel. Grid: 1-D, N * tiles_per_image * ncol CTAs, column block fastest
// (the CTAs sharing a tile run together and share its input in L2).

template <typename T, typename OutT, Math M, bool kVecA>
__global__ void __launch_bounds__(GemmCfg<T, M>::kThreads)
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

  const int col = static_cast<int>(blockIdx.x % p.ncol);
  const CtaTile ct = cta_tile(p.tl, static_cast<int64_t>(blockIdx.x / p.ncol));
  int b0 = 0, b1 = p.nbranch, o0 = col * Cfg::BN;
  if (!p.sum_mode) {
    b0 = branch_of_column(p.cb_start, p.nbranch, col);
    b1 = b0 + 1;
    o0 = (col - p.cb_start[b0]) * Cfg::BN;
  }

  // The CTA's tap table: for each branch, the rectangle of taps that touch the tile.
  if (tid == 0) {
    int ne = 0, iters = 0;
    for (int b = b0; b < b1; ++b) {
      const GemmBranch& br = p.br[b];
      if (br.cin <= 0) continue;
      int ty0, ty1, tx0, tx1;
      tap_range(ct.h0, ct.h_end(), ct.H, br.k, br.step, &ty0, &ty1);
      tap_range(ct.w0, ct.w_end(), ct.W, br.k, br.step, &tx0, &tx1);
      for (int ty = ty0; ty <= ty1; ++ty)
        for (int tx = tx0; tx <= tx1; ++tx) {
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
#pragma unroll
  for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < Cfg::NI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = A(0);

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
    tap_range(ct.h0, ct.h_end(), ct.H, 3, d, &ty0, &ty1);
    tap_range(ct.w0, ct.w_end(), ct.W, 3, d, &tx0, &tx1);
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
#pragma unroll
  for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < Cfg::NI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = A(0);
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
#pragma unroll
  for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < Cfg::NI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = A(0);

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
