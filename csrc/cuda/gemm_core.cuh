// The machinery of the GPU GEMM kernels (tap_gemm.cuh, separable_gemm.cuh, wgrad_gemm.cuh): tile
// configuration, operand loaders, warp-level math, the cp.async pipeline and the epilogue.
//
// The one primitive on the GPU (docs/DESIGN.md) is a tap-list implicit GEMM over 2-D pixel tiles
// with a fused epilogue (tap_gemm.cuh), and its separable twin with a depthwise prologue.
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
  // The tap-list kernel's launch bound. 16-bit / fp32: none (0 = no minimum; ptxas lands at
  // <= 128 registers by itself). float64: 1, i.e. all registers allowed: without it ptxas aimed
  // at 128 and spilled 8 bytes on sm_90a once the region plan's prologue was added (cuda-check;
  // 144 registers with the bound).
  static constexpr int kTapMinBlocks = kWide ? 1 : 0;
  static constexpr int BM = gemm_bm(sizeof(T));  // pixels per CTA
  static constexpr int BN = gemm_bn(sizeof(T));  // output channels per CTA
  static constexpr int BK = gemm_bk(sizeof(T));  // input channels per stage: 64-byte rows
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

// The CTA's pixels. GEMM row r is pixel q0 + r of a th x tw block at (h0, w0) repeated in every
// image, counted image-major (image q / (th * tw)), for r < rows.
//   tile plan:   one image's tile (q0 = n * th * tw, rows = th * tw), clipped at the image edge;
//   region plan: BM consecutive pixels of one region across the batch (th x tw = the region).
// n0 / off0 split q0 once per CTA so each row needs only 32-bit arithmetic.
struct CtaTile {
  int h0, w0, th, tw, H, W;
  int n0, off0, rows;

  // GEMM row r -> image n, pixel (h, w); false for rows past the tile or the image edge.
  ASPP_DEVICE bool pixel(int r, int* n, int* h, int* w) const {
    if (r >= rows) return false;
    const int area = th * tw;
    const int off = off0 + r;
    *n = n0 + off / area;
    const int in_img = off % area;
    *h = h0 + in_img / tw;
    *w = w0 + in_img % tw;
    return *h < H && *w < W;
  }
  ASPP_DEVICE int image(int r) const { return n0 + (off0 + r) / (th * tw); }
  ASPP_DEVICE int64_t pixel_index(int n, int h, int w) const { return (static_cast<int64_t>(n) * H + h) * W + w; }
  ASPP_DEVICE int h_end() const { return imin(h0 + th, H); }
  ASPP_DEVICE int w_end() const { return imin(w0 + tw, W); }
};

// Tile plan: tile `tile` of the tiling (image-major).
ASPP_DEVICE CtaTile cta_tile(const Tiling& tl, int64_t tile) {
  CtaTile c;
  c.n0 = static_cast<int>(tile / tl.tiles_per_image);
  const int t = static_cast<int>(tile % tl.tiles_per_image);
  c.th = tl.tile_h;
  c.tw = tl.tile_w;
  c.h0 = (t / tl.tiles_w) * tl.tile_h;
  c.w0 = (t % tl.tiles_w) * tl.tile_w;
  c.H = tl.H;
  c.W = tl.W;
  c.off0 = 0;
  c.rows = tl.tile_h * tl.tile_w;
  return c;
}

// Region plan: pixel tile `ptile` (bm pixels) of region `rd`, counted across the batch.
ASPP_DEVICE CtaTile region_tile(const Tiling& tl, const RegionDesc& rd, int ptile, int bm) {
  CtaTile c;
  c.h0 = rd.h0;
  c.w0 = rd.w0;
  c.th = rd.h1 - rd.h0;
  c.tw = rd.w1 - rd.w0;
  c.H = tl.H;
  c.W = tl.W;
  const int64_t area = static_cast<int64_t>(c.th) * c.tw;
  const int64_t q0 = static_cast<int64_t>(ptile) * bm;
  c.n0 = static_cast<int>(q0 / area);
  c.off0 = static_cast<int>(q0 % area);
  const int64_t left = tl.N * area - q0;
  c.rows = static_cast<int>(left < bm ? left : bm);
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
      int nn = 0, hh = 0, ww = 0;
      ok[i] = ct.pixel(row[i], &nn, &hh, &ww);
      h[i] = hh;
      w[i] = ww;
      pix[i] = ct.pixel_index(nn, hh, ww);
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

// The accumulators of a CTA's warp tile, zeroed (in the mma C-fragment layout, see below).
template <class Cfg, typename A>
ASPP_DEVICE void zero_acc(A (&acc)[Cfg::MI][Cfg::NI][4]) {
#pragma unroll
  for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < Cfg::NI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = A(0);
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
  const A* bias = static_cast<const A*>(ep.bias);  // [N][o_total]: per row's image (region tiles span images)

  int64_t pix[Cfg::MI][2];
  bool rok[Cfg::MI][2];
#pragma unroll
  for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      int n = 0, h = 0, w = 0;
      rok[mi][hf] = ct.pixel(wm0 + mi * 16 + g + hf * 8, &n, &h, &w);
      pix[mi][hf] = ct.pixel_index(n, h, w);
    }

#pragma unroll
  for (int ni = 0; ni < Cfg::NI; ++ni)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int col = wn0 + ni * 8 + 2 * tq + j;
      const int o = o0 + col;
      const bool cok = o < cout;
      const int oc = out_off + o;
      A sc = A(1), sh = A(0);
      if (cok && !raw) {
        sc = scale[oc];
        sh = shift[oc];
      }
      A s = A(0), q = A(0);
#pragma unroll
      for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          if (!(rok[mi][hf] && cok)) continue;
          A v = acc[mi][ni][hf * 2 + j];
          if (!raw) {
            v = v * sc + sh;
            // The row's image (region tiles span images) is recomputed here, only when there
            // is a bias, rather than kept in a register per row through the epilogue.
            if (bias) v += bias[static_cast<int64_t>(ct.image(wm0 + mi * 16 + g + hf * 8)) * ep.o_total + oc];
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

}  // namespace cuda
}  // namespace aspp_fused
