// Kernel parameter blocks (plain structs, passed by value as __grid_constant__ kernel
// parameters, so a launch needs no host-to-device copy and CUDA graphs capture it as is) and
// the tile configurations. Shared by the device code and the launch glue; no torch headers.
#pragma once

#include <cstdint>

namespace aspp_fused {
namespace cuda {

// Branches one launch handles. More branches: the glue splits them over launches (concat:
// independent channel slices; sum mode: raw partial sums accumulated in a float buffer).
constexpr int kMaxBranches = 8;
constexpr int kMaxTaps = kMaxBranches * 9;
// Regions of one exact-region launch (csrc/tap_plan.h): concat at most 3 x 3 per 3x3 branch
// (72 for 8 branches); sum mode the common refinement of all branches' regions, (2 d + 1)^2 for
// d distinct dilated rates (81 for DeepLab v2's four, 121 for five). A plan with more runs on
// the tile plan.
constexpr int kMaxRegions = 128;

// The GEMM kernels' tile per element size (GemmCfg in gemm_core.cuh reads them from here, and so
// does the host's count of what a plan issues, cuda_plan_work): BM pixels x BN output channels,
// BK input channels per K step (64-byte rows). float64 keeps its accumulators in doubles: 64 x 64.
constexpr int gemm_bm(int elem_bytes) { return elem_bytes == 8 ? 64 : 128; }
constexpr int gemm_bn(int elem_bytes) { return elem_bytes == 8 ? 64 : 128; }
constexpr int gemm_bk(int elem_bytes) { return 64 / elem_bytes; }

// ------------------------------------------------------------------------------------------
// Pixel tiling: a CTA owns tile_h x tile_w pixels (tile_h * tile_w <= BM rows of the GEMM) of
// one image. The glue picks the tile shape per problem (choose_tile below).

struct Tiling {
  int N, H, W;
  int tile_h, tile_w;
  int tiles_w, tiles_per_image;
};

// The tile shape with the fewest tiles (so the least masked work) for an H x W map, ties to
// the squarest tile (fewest taps per tile that straddle the border: more padding skipped).
// 33x33 -> 11x11 (9 tiles, 121 of 128 rows used); 65x65 -> 11x11 (36 tiles, 92%) where
// 8x16 tiles would use 57% / 73% of the rows.
inline void choose_tile(int H, int W, int bm, int* tile_h, int* tile_w) {
  int best_h = 1, best_w = 1;
  long long best_tiles = -1;
  int best_skew = 0;
  for (int th = 1; th <= bm; ++th) {
    int tw = bm / th;
    const int eff_h = th < H ? th : H;
    if (tw > W) tw = W;
    if (tw < 1) tw = 1;
    const long long tiles = (long long)((H + eff_h - 1) / eff_h) * ((W + tw - 1) / tw);
    const int skew = eff_h > tw ? eff_h - tw : tw - eff_h;
    if (best_tiles < 0 || tiles < best_tiles || (tiles == best_tiles && skew < best_skew)) {
      best_tiles = tiles;
      best_skew = skew;
      best_h = eff_h;
      best_w = tw;
    }
  }
  *tile_h = best_h;
  *tile_w = best_w;
}

inline Tiling make_tiling(int N, int H, int W, int bm) {
  Tiling t;
  t.N = N;
  t.H = H;
  t.W = W;
  choose_tile(H, W, bm, &t.tile_h, &t.tile_w);
  t.tiles_w = (W + t.tile_w - 1) / t.tile_w;
  t.tiles_per_image = ((H + t.tile_h - 1) / t.tile_h) * t.tiles_w;
  return t;
}

// ------------------------------------------------------------------------------------------
// The fused epilogue: z = acc * scale[o] + shift[o] (+ bias[n, o]); out = act(z); batch
// statistics of z. All vectors in the accumulation type; o is the channel in the output.

struct Epilogue {
  const void* scale;  // [o_total]
  const void* shift;  // [o_total]
  const void* bias;   // [N][o_total] or null
  double* ch_sum;     // [o_total] atomically accumulated, or null (no statistics)
  double* ch_sumsq;
  int o_total;
  int act;         // 0 none, 1 relu
  int raw;         // 1: store acc itself (no affine, act, stats): the backward's recompute
  int accumulate;  // 1: out += result (out must be the accumulation type)
};

// ------------------------------------------------------------------------------------------
// The tap-list implicit GEMM (atrous forward, dgrad, the backward's 1x1 GEMMs).

struct GemmBranch {
  int64_t w_off;    // element offset of the branch's packed weights [k * k][cin][ldb]
  int k;            // 1 or 3
  int step;         // tap spacing: the dilation, negated for dgrad
  int in_off, cin;  // the branch reads input channels [in_off, in_off + cin)
  int cout, ldb;    // output channels; packed row length (cout rounded up to 16 bytes)
  int out_off;      // first output channel (concat); 0 in sum mode
};

// One region of the exact-region plan as a launch reads it (csrc/tap_plan.h: PlanRegion). CTAs
// [first_cta, first_cta + pixel_tiles * col_blocks) of the launch are its items, pixel tile
// major, column block fastest; the column blocks are those of `branch` (cb_start; sum mode:
// branch -1, every branch into the launch's ncol blocks). Its taps per branch: tap_range over
// the region, exact there.
struct RegionDesc {
  int branch, h0, h1, w0, w1;
  int first_cta;
};

struct TapGemmParams {
  const void* in;     // [N * H * W][in_stride] (NHWC)
  int64_t in_stride;  // elements per input pixel
  const void* w;      // packed weights of all branches
  void* out;          // [N * H * W][out_stride]
  int64_t out_stride;
  Tiling tl;
  int nbranch;
  int sum_mode;  // 1: every CTA accumulates all branches into the same columns
  int ncol;      // column blocks per tile
  int cb_start[kMaxBranches + 1];  // concat: branch b owns column blocks [cb_start[b], cb_start[b+1])
  GemmBranch br[kMaxBranches];
  Epilogue ep;
  // nregion > 0: the CTAs run the exact-region plan rg[0, nregion) (each one region's pixels
  // across the batch, exactly its valid taps; `tl` only gives N, H, W); nregion == 0: the tile
  // plan (`tl`'s tiles, taps from tap_range per tile).
  int nregion;
  RegionDesc rg[kMaxRegions];
};
// Kernel parameters must fit the classic 4 KB limit (launches go through any driver).
static_assert(sizeof(TapGemmParams) <= 4096, "TapGemmParams exceeds 4 KB of kernel parameters");

// ------------------------------------------------------------------------------------------
// The fused separable conv: depthwise prologue -> (mid affine, act) -> pointwise GEMM.

struct SepBranch {
  int64_t pw_off;   // packed pointwise weights [C][ldb] (x dtype)
  int64_t dw_off;   // packed depthwise weights [9][C] (accumulation type), -1: plain 1x1 branch
  int64_t mid_off;  // mid scale [C] at mid_off, shift [C] at mid_off + C (acc type), -1: none
  int dilation;
  int cout, ldb, out_off;
};

struct SepGemmParams {
  const void* x;  // [N * H * W][C]
  int C;
  const void* pw;   // x dtype
  const void* dw;   // acc type
  const void* mid;  // acc type
  void* out;
  int64_t out_stride;
  Tiling tl;
  int nbranch, ncol, mid_act;
  int cb_start[kMaxBranches + 1];
  SepBranch br[kMaxBranches];
  Epilogue ep;
};

// ------------------------------------------------------------------------------------------
// Per-channel elementwise + reduction kernels (blocks of 32 channels x 8 pixel rows).

constexpr int kRedChannels = 32;
constexpr int kRedRows = 8;

struct ChannelGrid {
  int N, HW, C;
  int cblocks;  // ceil(C / 32)
  int chunks;   // pixel chunks per image
};

// Backward of the epilogue: g_z = grad_out * act'(z) + grad_sum + 2 z grad_sumsq,
// g_acc = g_z * scale, and the partial sums of grad_scale / grad_shift / grad_bias.
struct EpilogueBwdParams {
  ChannelGrid cg;
  const void* grad_out;  // x dtype [N*HW][O]
  const void* acc;       // acc type [N*HW][O]: z = acc * scale + shift + bias; or null
  const void* out;       // x dtype: z (act none) / relu(z) (the relu mask) when acc is null; or null
  const void* scale;     // acc type [O]
  const void* shift;
  const void* bias;  // [N][O] or null
  const void* grad_sum;    // [O] or null
  const void* grad_sumsq;  // [O] or null
  int act;
  void* g_acc;        // x dtype [N*HW][O] or null
  double* g_scale;    // [O] or null (needs acc)
  double* g_shift;    // [O] or null
  double* g_bias;     // [N][O] or null
};

// The epilogue applied to a finished accumulator (sum mode with more than kMaxBranches).
struct EpilogueFwdParams {
  ChannelGrid cg;
  const void* acc;  // acc type [N*HW][O]
  void* out;        // x dtype
  Epilogue ep;
};

// Depthwise 3x3: out[p][c] = sum_taps w[tap][c] * in[p + (tap - centre) * step][c].
struct DepthwiseParams {
  const void* in;  // [N*H*W][C]
  const void* w;   // acc type [9][C]
  const void* mid_scale;  // acc type [C] or null
  const void* mid_shift;
  int mid_act;
  void* out_acc;   // acc type: the raw depthwise result (or +=, accumulate) or null
  int accumulate;
  void* out_m;     // x dtype: mid_act(d * ms + msh) rounded (the GEMM operand) or null
  int N, H, W, C, step;
};

// Backward of the mid affine + act, in place on g_m: g_pre = g_m * act'(pre),
// grad_ms += g_pre * d, grad_msh += g_pre, g_m <- g_pre * ms.
struct MidBwdParams {
  ChannelGrid cg;
  const void* d;  // acc type [N*HW][C]
  void* g;        // acc type [N*HW][C], in: g_m, out: g_d
  const void* mid_scale;
  const void* mid_shift;
  int mid_act;
  double* g_ms;   // [C] or null
  double* g_msh;  // [C] or null
};

// grad_dw[tap][c] += sum_p g_d[p][c] * x[p + tap][c].
struct DwWgradParams {
  ChannelGrid cg;
  int H, W, dilation;
  const void* g;  // acc type [N*HW][C]
  const void* x;  // x dtype [N*HW][C]
  double* out;    // [9][C]
};

// wgrad of the tap-list conv: ws[job][c][o] += sum over the pixels p whose tap source
// p + (dy, dx) is in the image of x[p + (dy, dx)][c] * g[p][g_off + o].
constexpr int kMaxWgradJobs = kMaxTaps;

struct WgradJob {
  int dy, dx;
  int g_off, cout;
  int64_t ws_off;  // [C][cout] block of this (branch, tap) in the workspace
};

struct WgradParams {
  const void* x;
  int64_t x_stride;
  int C;
  const void* g;
  int64_t g_stride;
  void* ws;  // acc type
  int N, H, W;
  int njobs, splits, cblocks, oblocks;
  WgradJob job[kMaxWgradJobs];
};

}  // namespace cuda
}  // namespace aspp_fused
