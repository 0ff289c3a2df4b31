// Tap plans: which taps of a dilated conv touch the image where. Pure C++ (no torch, no CUDA
// runtime), shared by the CPU kernels (tile tap ranges), the CUDA kernels (tap_range, on the
// device too), the CUDA glue (the exact-region plan of the concat forward, csrc/cuda/tap_gemm.cu)
// and the op that reports what the CUDA plan issues (cuda_plan_work, csrc/aspp_fused.cpp). The
// Triton and torch backends' plan builder is kernels/plan.py (tests/test_cuda_plan.py checks that
// the region plans here and there count the same work).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__CUDACC__)
#define ASPP_PLAN_HD __host__ __device__ inline
#else
#define ASPP_PLAN_HD inline
#endif

namespace aspp_fused {

// Output pixels are processed in TH x TW tiles. For a tile covering rows
// [h0, h1) and a k-tap axis at dilation d (tap t reads row h + (t - k/2) * d),
// the taps that read at least one in-image row form [t0, t1] (t1 < t0: none).
struct TapRange {
  int t0, t1;
};

ASPP_PLAN_HD TapRange tap_range(int64_t h0, int64_t h1, int64_t size, int k, int64_t d) {
  TapRange r{k, -1};
  const int half = k / 2;
  for (int t = 0; t < k; ++t) {
    const int64_t off = (t - half) * d;
    // Rows h in [h0, h1) with 0 <= h + off < size.
    const int64_t lo = h0 > -off ? h0 : -off;
    const int64_t hi = h1 < size - off ? h1 : size - off;
    if (lo < hi) {
      r.t0 = t < r.t0 ? t : r.t0;
      r.t1 = t > r.t1 ? t : r.t1;
    }
  }
  return r;
}

// The sub-range [lo, hi) of rows [h0, h1) whose tap at offset `off` is inside [0, size).
inline void valid_rows(int64_t h0, int64_t h1, int64_t size, int64_t off, int64_t* lo, int64_t* hi) {
  *lo = std::max<int64_t>(h0, -off);
  *hi = std::min<int64_t>(h1, size - off);
}

// Dilations beyond the map only ever hit padding with their outer taps: clamp them so the
// kernels' int offsets cannot overflow (the result is the same).
inline int clamp_dilation(int64_t d, int64_t H, int64_t W) {
  const int64_t m = std::max<int64_t>(std::max<int64_t>(H, W), 1);
  return static_cast<int>(std::min<int64_t>(d, m));
}

// ------------------------------------------------------------------------------------------
// The exact-region plan (kernels/plan.py states the same plan for Triton; see its docstring).
// Per axis, a k-tap axis at step d has breakpoints where a tap enters or leaves the image;
// between two breakpoints the set of valid taps is constant and contiguous.

struct AxisRegion {
  int lo, hi;  // output positions [lo, hi)
  int t0, t1;  // exactly the taps [t0, t1] are valid for each of them
};

inline std::vector<AxisRegion> axis_regions(int size, int k, int step) {
  const int half = k / 2;
  std::vector<int> cuts{0, size};
  for (int t = 0; t < k; ++t) {
    const int64_t off = static_cast<int64_t>(t - half) * step;
    for (int64_t b : {-off, size - off})  // tap t is valid for p in [-off, size - off)
      if (b > 0 && b < size) cuts.push_back(static_cast<int>(b));
  }
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  std::vector<AxisRegion> out;
  for (size_t i = 0; i + 1 < cuts.size(); ++i) {
    AxisRegion r{cuts[i], cuts[i + 1], k, -1};
    for (int t = 0; t < k; ++t) {
      const int64_t src = cuts[i] + static_cast<int64_t>(t - half) * step;
      if (src >= 0 && src < size) {
        r.t0 = std::min(r.t0, t);
        r.t1 = std::max(r.t1, t);
      }
    }
    out.push_back(r);
  }
  return out;
}

// One branch as the plan sees it: k x k taps at `step`, cin input and cout output channels.
struct PlanBranch {
  int k, step, cin, cout;
};

// One region: output pixels [h0, h1) x [w0, w1) of every image, inside which the valid taps of
// `branch` (concat) or of every branch (sum mode, branch = -1) are the same for each pixel, so
// tap_range over the region is exactly them. Its work items are its pixel tiles (bm consecutive
// pixels of the region counted across the batch, image-major) x its column blocks (bn outputs).
struct PlanRegion {
  int branch, h0, h1, w0, w1;
  int64_t pixel_tiles;  // ceil(N * area / bm)
  int col_blocks;       // ceil(cout / bn)

  int64_t items() const { return pixel_tiles * col_blocks; }
};

// The taps of `br` valid at every pixel of region r (all of them: r lies inside one of br's
// axis regions per axis).
inline int64_t region_taps(const PlanBranch& br, const PlanRegion& r, int H, int W) {
  const TapRange ty = tap_range(r.h0, r.h1, H, br.k, br.step), tx = tap_range(r.w0, r.w1, W, br.k, br.step);
  return int64_t(std::max(0, ty.t1 - ty.t0 + 1)) * std::max(0, tx.t1 - tx.t0 + 1);
}

// The branches a region's items run: its own (concat) or all (sum mode).
template <class F>
void for_region_branches(const PlanRegion& r, const std::vector<PlanBranch>& branches, F&& f) {
  if (r.branch >= 0) {
    f(branches[r.branch]);
  } else {
    for (const PlanBranch& br : branches) f(br);
  }
}

// The plan of one launch, regions longest first (valid taps x cin of their items, stable: ties
// keep the order they were made in); item order = region order, then pixel tile, then column
// block. Concat: each branch's own axis regions (at most 3 x 3 for k = 3; kernels/plan.region_plan
// lists the very same items). Sum mode (every item runs every branch into the same columns):
// the common refinement of all branches' axis regions (at most (2 x branches + 1)^2).
inline std::vector<PlanRegion> region_plan(int64_t N, int H, int W, const std::vector<PlanBranch>& branches, int bm,
                                           int bn, bool sum_mode = false) {
  std::vector<PlanRegion> out;
  auto add = [&](int branch, int h0, int h1, int w0, int w1, int cout) {
    PlanRegion r{branch, h0, h1, w0, w1, 0, 0};
    r.pixel_tiles = (N * (h1 - h0) * (w1 - w0) + bm - 1) / bm;
    r.col_blocks = (cout + bn - 1) / bn;
    out.push_back(r);
  };
  if (!sum_mode) {
    for (size_t b = 0; b < branches.size(); ++b) {
      const PlanBranch& br = branches[b];
      if (br.cout <= 0) continue;
      for (const AxisRegion& ry : axis_regions(H, br.k, br.step))
        for (const AxisRegion& rx : axis_regions(W, br.k, br.step))
          add(static_cast<int>(b), ry.lo, ry.hi, rx.lo, rx.hi, br.cout);
    }
  } else if (!branches.empty() && branches[0].cout > 0) {
    auto cuts = [&](int size) {
      std::vector<int> c{size};
      for (const PlanBranch& br : branches)
        for (const AxisRegion& r : axis_regions(size, br.k, br.step)) c.push_back(r.lo);
      std::sort(c.begin(), c.end());
      c.erase(std::unique(c.begin(), c.end()), c.end());
      return c;
    };
    const std::vector<int> ch = cuts(H), cw = cuts(W);
    for (size_t i = 0; i + 1 < ch.size(); ++i)
      for (size_t j = 0; j + 1 < cw.size(); ++j) add(-1, ch[i], ch[i + 1], cw[j], cw[j + 1], branches[0].cout);
  }
  // Each region's cost once (not per comparison), then a stable sort of (cost, region) pairs.
  std::vector<std::pair<int64_t, PlanRegion>> keyed;
  keyed.reserve(out.size());
  for (const PlanRegion& r : out) {
    int64_t c = 0;
    for_region_branches(r, branches, [&](const PlanBranch& br) { c += region_taps(br, r, H, W) * br.cin; });
    keyed.emplace_back(c, r);
  }
  std::stable_sort(keyed.begin(), keyed.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  for (size_t i = 0; i < keyed.size(); ++i) out[i] = keyed[i].second;
  return out;
}

// What a plan multiplies. dense: every tap at every pixel; valid: the (pixel, tap) pairs inside
// the image; issued: what the kernel's K loops run, bm x bn x (cin rounded up to bk) per tap
// of each item, masked rows and columns included.
struct PlanWork {
  int64_t dense = 0, valid = 0, issued = 0;
};

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

inline PlanWork dense_and_valid(int64_t N, int H, int W, const std::vector<PlanBranch>& branches) {
  PlanWork w;
  for (const PlanBranch& br : branches) {
    int64_t taps_h = 0, taps_w = 0;
    for (const AxisRegion& r : axis_regions(H, br.k, br.step)) taps_h += int64_t(r.hi - r.lo) * (r.t1 - r.t0 + 1);
    for (const AxisRegion& r : axis_regions(W, br.k, br.step)) taps_w += int64_t(r.hi - r.lo) * (r.t1 - r.t0 + 1);
    w.dense += N * H * W * br.k * br.k * br.cin * int64_t(br.cout);
    w.valid += N * taps_h * taps_w * br.cin * int64_t(br.cout);
  }
  return w;
}

inline PlanWork region_plan_work(int64_t N, int H, int W, const std::vector<PlanBranch>& branches,
                                 const std::vector<PlanRegion>& regions, int bm, int bn, int bk) {
  PlanWork w = dense_and_valid(N, H, W, branches);
  for (const PlanRegion& r : regions)
    for_region_branches(r, branches, [&](const PlanBranch& br) {
      w.issued += r.items() * bm * bn * region_taps(br, r, H, W) * round_up(br.cin, bk);
    });
  return w;
}

// The tile plan (the sum-mode forward, and the concat forward when it issues less): a CTA per
// tile_h x tile_w pixels of one image runs, per branch, every tap of the rectangle that touches
// its tile (tap_range). Concat: a CTA per (tile, column block of one branch); sum mode: a CTA
// per (tile, column block of the common cout) runs every branch. A tile's taps are the product
// of its row and column tap ranges, so the sum over tiles is the product of two axis sums.
inline PlanWork tile_plan_work(int64_t N, int H, int W, int tile_h, int tile_w, const std::vector<PlanBranch>& branches,
                               bool sum_mode, int bm, int bn, int bk) {
  PlanWork w = dense_and_valid(N, H, W, branches);
  for (const PlanBranch& br : branches) {
    if (br.cout <= 0) continue;
    int64_t taps_h = 0, taps_w = 0;  // sum over row (column) tiles of the tile's tap count
    for (int h0 = 0; h0 < H; h0 += tile_h) {
      const TapRange r = tap_range(h0, std::min(h0 + tile_h, H), H, br.k, br.step);
      taps_h += std::max(0, r.t1 - r.t0 + 1);
    }
    for (int w0 = 0; w0 < W; w0 += tile_w) {
      const TapRange r = tap_range(w0, std::min(w0 + tile_w, W), W, br.k, br.step);
      taps_w += std::max(0, r.t1 - r.t0 + 1);
    }
    const int64_t cols = sum_mode ? branches[0].cout : br.cout;
    w.issued += N * bm * round_up(cols, bn) * taps_h * taps_w * round_up(br.cin, bk);
  }
  return w;
}

// Which plan a CUDA launch runs (csrc/cuda/tap_gemm.cu; cuda_plan_work counts the same choice):
// ASPP_FUSED_CUDA_REGIONS=1 the exact-region plan, =0 the tile plan, unset / auto the one that
// issues fewer MACs. The region plan wins on DeepLab heads (standard OS16 head: 1.026 of the
// valid MACs against 1.318); the tile plan on maps so small that one tile holds a whole image
// and the regions' tiles would be mostly empty rows (2 images of 9 x 11: 128-row tiles for 9
// regions of at most 35 pixels each).
inline int cuda_region_mode() {
  const char* v = std::getenv("ASPP_FUSED_CUDA_REGIONS");
  if (v == nullptr) return -1;
  if (std::strcmp(v, "0") == 0) return 0;
  if (std::strcmp(v, "1") == 0) return 1;
  return -1;
}

// The choice itself, for mode (cuda_region_mode's values): true and the region plan in *plan
// when the launch runs it; false for the tile plan (mode 0, more than max_regions regions, or,
// in auto mode, the tile plan issues no more). The one statement of the rule for the glue and
// the op that counts its work.
inline bool use_region_plan(int mode, int64_t N, int H, int W, const std::vector<PlanBranch>& branches, bool sum_mode,
                            int tile_h, int tile_w, int bm, int bn, int bk, int max_regions,
                            std::vector<PlanRegion>* plan) {
  if (mode == 0) return false;
  *plan = region_plan(N, H, W, branches, bm, bn, sum_mode);
  if (static_cast<int>(plan->size()) > max_regions) return false;
  return mode == 1 || region_plan_work(N, H, W, branches, *plan, bm, bn, bk).issued <
                          tile_plan_work(N, H, W, tile_h, tile_w, branches, sum_mode, bm, bn, bk).issued;
}

}  // namespace aspp_fused
