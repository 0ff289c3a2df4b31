// Tile-level tap ranges: the heart of the zero-padding skip (docs/DESIGN.md), for the CPU
// kernels. The CUDA kernels' device twin is tap_range in csrc/cuda/common.cuh, the Triton
// kernels' is tap_range in kernels/_common.py (each backend's op tests cover the edge cases).
#pragma once
#include <algorithm>
#include <cstdint>

namespace aspp_fused {

// Output pixels are processed in TH x TW tiles. For a tile covering rows
// [h0, h1) and a k-tap axis at dilation d (tap t reads row h + (t - k/2) * d),
// the taps that read at least one in-image row form [t0, t1] (t1 < t0: none).
struct TapRange {
  int t0, t1;
};

inline TapRange tap_range(int64_t h0, int64_t h1, int64_t size, int k, int64_t d) {
  TapRange r{k, -1};
  const int half = k / 2;
  for (int t = 0; t < k; ++t) {
    const int64_t off = (t - half) * d;
    // Rows h in [h0, h1) with 0 <= h + off < size.
    const int64_t lo = std::max<int64_t>(h0, -off);
    const int64_t hi = std::min<int64_t>(h1, size - off);
    if (lo < hi) {
      r.t0 = std::min(r.t0, t);
      r.t1 = std::max(r.t1, t);
    }
  }
  return r;
}

// The sub-range [lo, hi) of rows [h0, h1) whose tap at offset `off` is inside [0, size).
inline void valid_rows(int64_t h0, int64_t h1, int64_t size, int64_t off, int64_t* lo, int64_t* hi) {
  *lo = std::max<int64_t>(h0, -off);
  *hi = std::min<int64_t>(h1, size - off);
}

}  // namespace aspp_fused
