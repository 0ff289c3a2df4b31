// CPU kernels (the CPU backend) of aspp_fused::separable_conv and of its backward's primitives
// separable_gemm and separable_gemm_backward (the formula: aspp_fused/_autograd.py)
// (semantics: the schema comments in csrc/aspp_fused.cpp).
//
// This is a readable model of the fused GPU kernel, not a tuned CPU path. Work is split
// into (image n, TH x TW output tile) items. Per tile and branch:
//   1. depthwise prologue: d[p][c] over only the taps that touch the image (tap_plan.h),
//      each over its valid sub-rectangle, so the inner loops carry no bounds checks;
//   2. mid affine + mid_act (when given), rounded to x.dtype as the GEMM operand m[p][c];
//   3. pointwise GEMM acc[p][o] = sum_c m[p][c] * pw[c][o] with pw packed [C][O_b];
//   4. epilogue z = acc * scale + shift (+ bias), out = act(z) into the branch's channel
//      slice of the concat output, plus the batch statistics of z.
//
// Determinism: every reduction over pixels (stats, weight and epilogue grads) goes through
// per-slab partial sums in double. A slab is a fixed contiguous range of work items whose
// count depends only on the problem (never on the thread count), and slabs are added in slab
// order, so results are bitwise identical for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "op_signatures.h"
#include "pack_cache.h"
#include "tap_plan.h"

namespace aspp_fused {
namespace {


constexpr int64_t kTileH = 8;
constexpr int64_t kTileW = 8;
constexpr int64_t kTilePixels = kTileH * kTileW;
constexpr int kK = 3;  // depthwise kernel size
constexpr int kTaps = kK * kK;

constexpr int kActNone = 0;
constexpr int kActRelu = 1;

// ------------------------------------------------------------------------------------------
// Input validation, shared by forward and backward.

// In csrc/checks.h, shared with the CUDA kernels.
using BranchSpec = checks::SepBranchSpec;
using Problem = checks::SepProblem;
using checks::is_supported_dtype;

// ------------------------------------------------------------------------------------------
// Parameters converted to the accumulation type and packed for the inner loops.

template <typename acc_t>
struct PackedBranch {
  int64_t O, offset, dilation;
  bool has_dw, has_mid;
  const acc_t* dw;     // [9][C]: tap-major, so the depthwise inner loop over c is contiguous
  const acc_t* ms;     // [C]
  const acc_t* msh;    // [C]
  const acc_t* pw_co;  // [C][O_b]: the forward GEMM and wgrad inner loops run over o
  const acc_t* pw_oc;  // [O_b][C]: the dgrad GEMM inner loop runs over c
};

template <typename acc_t>
struct Packed {
  std::vector<PackedBranch<acc_t>> branches;
  const acc_t* scale;  // [O]
  const acc_t* shift;  // [O]
  const acc_t* bias;   // [N][O] or nullptr
  std::vector<at::Tensor> keep_alive;

  const acc_t* hold(at::Tensor t) {
    keep_alive.push_back(t.contiguous());
    return keep_alive.back().template data_ptr<acc_t>();
  }
};

// Per branch: dw [9][C], pw [O_b][C] and [C][O_b], in the accumulation type (undefined dw when the
// branch has none). Kept across calls while the weights are unchanged (pack_cache.h).
using BranchWeights = std::vector<std::array<at::Tensor, 3>>;

template <typename acc_t>
std::shared_ptr<const BranchWeights> packed_weights(const Problem& pb) {
  const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
  std::vector<at::Tensor> sources;
  for (const BranchSpec& spec : pb.branches) {
    sources.push_back(spec.dw);
    sources.push_back(spec.pw);
  }
  return pack_cache::get<BranchWeights>("cpu/separable/" + std::string(c10::toString(acc_type)), sources, [&] {
    BranchWeights out;
    for (const BranchSpec& spec : pb.branches) {
      // A copy even when no cast is needed: an entry must not alias (and keep alive) its source.
      const at::Tensor pw = spec.pw.reshape({spec.out_channels, pb.C}).to(acc_type, false, /*copy=*/true);
      out.push_back({spec.dw.defined() ? spec.dw.reshape({pb.C, kTaps}).to(acc_type, false, true).t().contiguous()
                                       : at::Tensor(),
                     pw.contiguous(), pw.t().contiguous()});
    }
    return out;
  });
}

template <typename acc_t>
Packed<acc_t> pack(const Problem& pb, const at::Tensor& scale, const at::Tensor& shift) {
  const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
  Packed<acc_t> pk;
  const std::shared_ptr<const BranchWeights> weights = packed_weights<acc_t>(pb);
  for (size_t b = 0; b < pb.branches.size(); ++b) {
    const BranchSpec& spec = pb.branches[b];
    const auto& [dw, pw_oc, pw_co] = (*weights)[b];
    PackedBranch<acc_t> br{};
    br.O = spec.out_channels;
    br.offset = spec.offset;
    br.dilation = spec.dilation;
    br.has_dw = spec.dw.defined();
    br.has_mid = spec.mid_scale.defined();
    if (br.has_dw) br.dw = pk.hold(dw);
    if (br.has_mid) {
      br.ms = pk.hold(spec.mid_scale.to(acc_type));
      br.msh = pk.hold(spec.mid_shift.to(acc_type));
    }
    br.pw_oc = pk.hold(pw_oc);
    br.pw_co = pk.hold(pw_co);
    pk.branches.push_back(br);
  }
  // No epilogue (separable_gemm, its backward): no scale / shift.
  pk.scale = scale.defined() ? pk.hold(scale.to(acc_type)) : nullptr;
  pk.shift = shift.defined() ? pk.hold(shift.to(acc_type)) : nullptr;
  pk.bias = pb.bias.defined() ? pk.hold(pb.bias.to(acc_type)) : nullptr;
  return pk;
}

// ------------------------------------------------------------------------------------------
// Tiles and slabs.

struct Tile {
  int64_t n, h0, h1, w0, w1;
  int64_t width() const { return w1 - w0; }
  int64_t pixels() const { return (h1 - h0) * (w1 - w0); }
};

struct Tiling {
  int64_t N, H, W, tiles_h, tiles_w;
  Tiling(int64_t n, int64_t h, int64_t w)
      : N(n), H(h), W(w), tiles_h((h + kTileH - 1) / kTileH), tiles_w((w + kTileW - 1) / kTileW) {}
  int64_t items() const { return N * tiles_h * tiles_w; }
  Tile tile(int64_t item) const {
    const int64_t per_image = tiles_h * tiles_w;
    const int64_t n = item / per_image, t = item % per_image;
    const int64_t h0 = (t / tiles_w) * kTileH, w0 = (t % tiles_w) * kTileW;
    return {n, h0, std::min(h0 + kTileH, H), w0, std::min(w0 + kTileW, W)};
  }
};

// Calls fn(tap, p, pix, src) for every tile pixel and every 3x3 tap whose source pixel is in
// the image: p is the pixel's index in the tile, pix = h * W + w its index in the image and
// src = (h + dy) * W + (w + dx) the index of the pixel the tap reads. Only the taps that
// tap_range() reports are visited, each over its valid sub-rectangle: this is the zero-padding
// skip (with d >= the tile size most taps of most tiles fall outside and cost nothing).
template <typename Fn>
inline void for_each_tap_pixel(const Tile& t, int64_t H, int64_t W, int64_t dil, const Fn& fn) {
  const TapRange ry = tap_range(t.h0, t.h1, H, kK, dil);
  const TapRange rx = tap_range(t.w0, t.w1, W, kK, dil);
  for (int ky = ry.t0; ky <= ry.t1; ++ky) {
    const int64_t dy = (ky - kK / 2) * dil;
    int64_t hlo, hhi;
    valid_rows(t.h0, t.h1, H, dy, &hlo, &hhi);
    for (int kx = rx.t0; kx <= rx.t1; ++kx) {
      const int64_t dx = (kx - kK / 2) * dil;
      int64_t wlo, whi;
      valid_rows(t.w0, t.w1, W, dx, &wlo, &whi);
      for (int64_t h = hlo; h < hhi; ++h) {
        for (int64_t w = wlo; w < whi; ++w) {
          fn(ky * kK + kx, (h - t.h0) * t.width() + (w - t.w0), h * W + w, (h + dy) * W + (w + dx));
        }
      }
    }
  }
}

// Calls fn(p, pix) for every tile pixel (tile index p, image index pix), row-major.
template <typename Fn>
inline void for_each_pixel(const Tile& t, int64_t W, const Fn& fn) {
  int64_t p = 0;
  for (int64_t h = t.h0; h < t.h1; ++h) {
    for (int64_t w = t.w0; w < t.w1; ++w) fn(p++, h * W + w);
  }
}

// Per-slab partial sums in double: slab s owns [s * len, (s + 1) * len).
struct SlabPartials {
  int64_t slabs, len;
  std::vector<double> data;

  // The slab count is fixed by the problem (never by the thread count) so that the sums are
  // reproducible bit for bit; it is capped to keep the partials within a memory budget.
  SlabPartials(int64_t items, int64_t partial_len) : len(partial_len) {
    constexpr int64_t kMaxSlabs = 64;
    constexpr int64_t kBudgetDoubles = (int64_t{256} << 20) / static_cast<int64_t>(sizeof(double));
    slabs = std::min(items, kMaxSlabs);
    if (len > 0) slabs = std::min(slabs, std::max<int64_t>(1, kBudgetDoubles / len));
    data.assign(static_cast<size_t>(slabs * len), 0.0);
  }
  double* slab(int64_t s) { return data.data() + s * len; }

  // Runs fn(partials_of_slab, item_begin, item_end) for each slab, slabs in parallel.
  template <typename Fn>
  void run(int64_t items, const Fn& fn) {
    at::parallel_for(0, slabs, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) fn(slab(s), s * items / slabs, (s + 1) * items / slabs);
    });
  }

  // Adds the slabs in slab order.
  std::vector<double> reduce() const {
    std::vector<double> total(static_cast<size_t>(len), 0.0);
    at::parallel_for(0, len, 1024, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        double s = 0.0;
        for (int64_t sl = 0; sl < slabs; ++sl) s += data[sl * len + i];
        total[i] = s;
      }
    });
    return total;
  }
};

template <typename acc_t>
inline void add_to_double(double* dst, const acc_t* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += static_cast<double>(src[i]);
}

at::Tensor double_tensor(const double* data, at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::from_blob(const_cast<double*>(data), sizes, at::TensorOptions().dtype(at::kDouble))
      .to(dtype, /*non_blocking=*/false, /*copy=*/true);
}

template <typename acc_t>
inline acc_t relu(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;  // NaN passes through, as torch.relu
}

// ------------------------------------------------------------------------------------------
// Per-tile building blocks shared by forward and backward.

// Fills m[p][c] with the branch's GEMM operand for the tile, exactly as the forward feeds it:
// the depthwise result (+ mid affine/act) rounded to scalar_t, or x itself for a plain branch.
// For a depthwise branch d[p][c] keeps the raw depthwise result (the backward needs it).
template <typename scalar_t, typename acc_t>
void branch_operand_tile(const PackedBranch<acc_t>& br, const Tile& t, const scalar_t* x_n, int64_t H,
                         int64_t W, int64_t C, int mid_act, acc_t* d, acc_t* m) {
  if (!br.has_dw) {
    for_each_pixel(t, W, [&](int64_t p, int64_t pix) {
      const scalar_t* xs = x_n + pix * C;
      acc_t* mp = m + p * C;
      for (int64_t c = 0; c < C; ++c) mp[c] = static_cast<acc_t>(xs[c]);
    });
    return;
  }
  const int64_t P = t.pixels();
  std::fill(d, d + P * C, acc_t(0));
  for_each_tap_pixel(t, H, W, br.dilation, [&](int tap, int64_t p, int64_t, int64_t src) {
    const acc_t* wt = br.dw + tap * C;
    const scalar_t* xs = x_n + src * C;
    acc_t* dp = d + p * C;
    for (int64_t c = 0; c < C; ++c) dp[c] += wt[c] * static_cast<acc_t>(xs[c]);
  });
  for (int64_t p = 0; p < P; ++p) {
    const acc_t* dp = d + p * C;
    acc_t* mp = m + p * C;
    for (int64_t c = 0; c < C; ++c) {
      acc_t v = dp[c];
      if (br.has_mid) {
        v = v * br.ms[c] + br.msh[c];
        if (mid_act == kActRelu) v = relu(v);
      }
      // The GPU kernel feeds the GEMM in x.dtype; a no-op for float32/float64.
      mp[c] = static_cast<acc_t>(static_cast<scalar_t>(v));
    }
  }
}

// c[p][o] = sum_k a[p][k] * b[k][o] for a tile (b packed [K][O]: the inner loop is over o).
template <typename acc_t>
void gemm_tile(const acc_t* a, const acc_t* b, acc_t* c, int64_t P, int64_t K, int64_t O) {
  std::fill(c, c + P * O, acc_t(0));
  for (int64_t p = 0; p < P; ++p) {
    acc_t* cp = c + p * O;
    for (int64_t k = 0; k < K; ++k) {
      const acc_t av = a[p * K + k];
      const acc_t* bk = b + k * O;
      for (int64_t o = 0; o < O; ++o) cp[o] += av * bk[o];
    }
  }
}

// ------------------------------------------------------------------------------------------
// Forward.

// The forward: out = the epilogue of acc (separable_conv), or (raw, scale undefined) acc itself
// in the accumulation type (separable_gemm).
template <typename scalar_t>
void forward_kernel(const Problem& pb, const at::Tensor& x_cl, const at::Tensor& scale, const at::Tensor& shift,
                    bool compute_stats, at::Tensor& out, std::vector<double>& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const Packed<acc_t> pk = pack<acc_t>(pb, scale, shift);
  const bool raw = !scale.defined();
  const int64_t C = pb.C, H = pb.H, W = pb.W, O = pb.O;
  const scalar_t* x = x_cl.data_ptr<scalar_t>();
  scalar_t* y = raw ? nullptr : out.data_ptr<scalar_t>();
  acc_t* y_raw = raw ? out.data_ptr<acc_t>() : nullptr;
  int64_t max_ob = 0;
  for (const auto& br : pk.branches) max_ob = std::max(max_ob, br.O);

  const Tiling tiling(pb.N, H, W);
  // Slab partials: [ch_sum (O) | ch_sumsq (O)].
  SlabPartials partials(tiling.items(), compute_stats ? 2 * O : 0);
  partials.run(tiling.items(), [&](double* part, int64_t item0, int64_t item1) {
    std::vector<acc_t> d(kTilePixels * C), m(kTilePixels * C), acc(kTilePixels * max_ob);
    for (int64_t item = item0; item < item1; ++item) {
      const Tile t = tiling.tile(item);
      const scalar_t* x_n = x + t.n * H * W * C;
      for (const PackedBranch<acc_t>& br : pk.branches) {
        branch_operand_tile(br, t, x_n, H, W, C, pb.mid_act, d.data(), m.data());
        gemm_tile(m.data(), br.pw_co, acc.data(), t.pixels(), C, br.O);
        if (raw) {
          acc_t* r_n = y_raw + t.n * H * W * O + br.offset;
          for_each_pixel(t, W, [&](int64_t p, int64_t pix) {
            std::copy_n(acc.data() + p * br.O, br.O, r_n + pix * O);
          });
          continue;
        }
        scalar_t* y_n = y + t.n * H * W * O;
        const acc_t* sc = pk.scale + br.offset;
        const acc_t* sh = pk.shift + br.offset;
        const acc_t* bi = pk.bias ? pk.bias + t.n * O + br.offset : nullptr;
        double* ch_sum = compute_stats ? part + br.offset : nullptr;
        double* ch_sumsq = compute_stats ? part + O + br.offset : nullptr;
        for_each_pixel(t, W, [&](int64_t p, int64_t pix) {
          const acc_t* ap = acc.data() + p * br.O;
          scalar_t* yp = y_n + pix * O + br.offset;
          for (int64_t o = 0; o < br.O; ++o) {
            acc_t z = ap[o] * sc[o] + sh[o];
            if (bi) z += bi[o];
            if (compute_stats) {
              ch_sum[o] += static_cast<double>(z);
              ch_sumsq[o] += static_cast<double>(z) * static_cast<double>(z);
            }
            yp[o] = static_cast<scalar_t>(pb.act == kActRelu ? relu(z) : z);
          }
        });
      }
    }
  });
  stats = partials.reduce();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> separable_conv_cpu(
    const at::Tensor& x, at::TensorList dw_weights, at::IntArrayRef dilations, at::TensorList mid_scales,
    at::TensorList mid_shifts, int64_t mid_act, at::TensorList pw_weights, const at::Tensor& scale,
    const at::Tensor& shift, const std::optional<at::Tensor>& bias, int64_t act, bool compute_stats) {
  const Problem pb = checks::check_separable_args(
      "separable_conv", x, dw_weights, dilations, mid_scales, mid_shifts, mid_act, pw_weights, scale, shift, bias, act);
  const at::ScalarType stats_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x_cl = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty({pb.N, pb.O, pb.H, pb.W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  std::vector<double> stats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "separable_conv_cpu", [&] {
    forward_kernel<scalar_t>(pb, x_cl, scale, shift, compute_stats, out, stats);
  });
  if (!compute_stats) {
    const at::Tensor empty = at::empty({0}, x.options().dtype(stats_type));
    return {out, empty, empty.clone()};
  }
  return {out, double_tensor(stats.data(), {pb.O}, stats_type), double_tensor(stats.data() + pb.O, {pb.O}, stats_type)};
}

// ------------------------------------------------------------------------------------------
// Backward.

struct BackwardFlags {
  bool input, weights;  // output_mask
};

// Weight grads of one branch, reduced over all pixels (double).
struct BranchGrads {
  std::vector<double> pw;    // [C][O_b]
  std::vector<double> dw;    // [9][C]
  std::vector<double> ms;    // [C]
  std::vector<double> msh;   // [C]
};

// Runs the backward of one branch from g_acc (the gradient of acc, [N, H, W, O] in acc_t).
// Branches are independent in concat mode (each owns its output channels), so the backward goes
// branch by branch: a depthwise branch's input grad at a pixel needs g_d at pixels up to
// `dilation` away, i.e. in other tiles, so g_d of the whole batch is completed (pass 1) before
// it is gathered into grad_x (pass 2).
template <typename scalar_t>
BranchGrads backward_branch(const Problem& pb, const PackedBranch<at::opmath_type<scalar_t>>& br,
                            const BackwardFlags& f, const scalar_t* x, const at::opmath_type<scalar_t>* g_acc,
                            at::opmath_type<scalar_t>* gd_img, at::opmath_type<scalar_t>* gx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = pb.C, H = pb.H, W = pb.W, O = pb.O, Ob = br.O, N = pb.N;
  const Tiling tiling(N, H, W);
  const bool need_gm = f.input || (f.weights && br.has_dw);

  // Slab partial layout (a segment is empty when its grad is not asked for).
  const int64_t len_pw = f.weights ? C * Ob : 0;
  const int64_t len_dw = f.weights && br.has_dw ? kTaps * C : 0;
  const int64_t len_mid = f.weights && br.has_mid ? C : 0;
  const int64_t off_dw = len_pw, off_ms = off_dw + len_dw, off_msh = off_ms + len_mid;

  // Pass 1, per tile: the forward's operand m, then from g_acc the weight grads, g_m, and through
  // the mid affine/act g_d.
  SlabPartials partials(tiling.items(), off_msh + len_mid);
  partials.run(tiling.items(), [&](double* part, int64_t item0, int64_t item1) {
    std::vector<acc_t> d(kTilePixels * C), m(kTilePixels * C), g(kTilePixels * Ob), gm(kTilePixels * C),
        tile_pw(len_pw), tile_dw(len_dw);
    for (int64_t item = item0; item < item1; ++item) {
      const Tile t = tiling.tile(item);
      const int64_t P = t.pixels();
      const scalar_t* x_n = x + t.n * H * W * C;
      branch_operand_tile(br, t, x_n, H, W, C, pb.mid_act, d.data(), m.data());
      // g[p][o] = g_acc of this branch's channels at the tile's pixels.
      for_each_pixel(t, W, [&](int64_t p, int64_t pix) {
        std::copy_n(g_acc + (t.n * H * W + pix) * O + br.offset, Ob, g.data() + p * Ob);
      });

  // grad_pw[c][o] += m[p][c] * g_acc[p][o] (m is the rounded operand the forward used).
      if (f.weights) {
        std::fill(tile_pw.begin(), tile_pw.end(), acc_t(0));
        for (int64_t p = 0; p < P; ++p) {
          const acc_t* gp = g.data() + p * Ob;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t mv = m[p * C + c];
            acc_t* wp = tile_pw.data() + c * Ob;
            for (int64_t o = 0; o < Ob; ++o) wp[o] += mv * gp[o];
          }
        }
        add_to_double(part, tile_pw.data(), len_pw);
      }
      if (!need_gm) continue;

      // g_m[p][c] = sum_o g_acc[p][o] * pw[o][c]; rounding of m is treated as identity.
      gemm_tile(g.data(), br.pw_oc, gm.data(), P, Ob, C);

      if (br.has_dw) {
        // Through the mid affine/act: g_pre = g_m * act'(pre), g_d = g_pre * ms (in place in gm).
        if (br.has_mid) {
          double* g_ms = part + off_ms;
          double* g_msh = part + off_msh;
          for (int64_t p = 0; p < P; ++p) {
            const acc_t* dp = d.data() + p * C;
            acc_t* gp = gm.data() + p * C;
            for (int64_t c = 0; c < C; ++c) {
              acc_t gpre = gp[c];
              if (pb.mid_act == kActRelu && !(dp[c] * br.ms[c] + br.msh[c] > acc_t(0))) gpre = 0;
              if (f.weights) {
                g_ms[c] += static_cast<double>(gpre) * static_cast<double>(dp[c]);
                g_msh[c] += static_cast<double>(gpre);
              }
              gp[c] = gpre * br.ms[c];
            }
          }
        }
        // grad_dw[tap][c] += g_d[p][c] * x[p + tap][c] over the same tap-range tiling.
        if (f.weights) {
          std::fill(tile_dw.begin(), tile_dw.end(), acc_t(0));
          for_each_tap_pixel(t, H, W, br.dilation, [&](int tap, int64_t p, int64_t, int64_t src) {
            const acc_t* gp = gm.data() + p * C;
            const scalar_t* xs = x_n + src * C;
            acc_t* wp = tile_dw.data() + tap * C;
            for (int64_t c = 0; c < C; ++c) wp[c] += gp[c] * static_cast<acc_t>(xs[c]);
          });
          add_to_double(part + off_dw, tile_dw.data(), len_dw);
        }
        if (f.input) {
          for_each_pixel(t, W, [&](int64_t p, int64_t pix) {
            std::copy(gm.data() + p * C, gm.data() + (p + 1) * C, gd_img + (t.n * H * W + pix) * C);
          });
        }
      } else if (f.input) {
        // Plain branch: g_m is this branch's grad_x; the tile's pixels belong to this item only.
        for_each_pixel(t, W, [&](int64_t p, int64_t pix) {
          const acc_t* gp = gm.data() + p * C;
          acc_t* gxp = gx + (t.n * H * W + pix) * C;
          for (int64_t c = 0; c < C; ++c) gxp[c] += gp[c];
        });
      }
    }
  });

  // Pass 2: grad_x += depthwise-transposed(g_d), gathered per output tile: the pixel the
  // forward tap `tap` read from pix receives g_d[pix] * w[tap]; seen from the receiving pixel
  // that is the negated offset, i.e. tap 8 - tap of the same tap-range walk.
  if (f.input && br.has_dw) {
    at::parallel_for(0, tiling.items(), 1, [&](int64_t item0, int64_t item1) {
      for (int64_t item = item0; item < item1; ++item) {
        const Tile t = tiling.tile(item);
        const acc_t* gd_n = gd_img + t.n * H * W * C;
        acc_t* gx_n = gx + t.n * H * W * C;
        for_each_tap_pixel(t, H, W, br.dilation, [&](int tap, int64_t, int64_t pix, int64_t src) {
          const acc_t* wt = br.dw + (kTaps - 1 - tap) * C;
          const acc_t* gs = gd_n + src * C;
          acc_t* gxp = gx_n + pix * C;
          for (int64_t c = 0; c < C; ++c) gxp[c] += gs[c] * wt[c];
        });
      }
    });
  }

  const std::vector<double> total = partials.reduce();
  auto segment = [&](int64_t off, int64_t len) {
    return std::vector<double>(total.begin() + off, total.begin() + off + len);
  };
  BranchGrads out;
  out.pw = segment(0, len_pw);
  out.dw = segment(off_dw, len_dw);
  out.ms = segment(off_ms, len_mid);
  out.msh = segment(off_msh, len_mid);
  return out;
}

// separable_gemm: the forward's acc, raw (forward_kernel with no scale), in the accumulation type.
at::Tensor separable_gemm_cpu(const at::Tensor& x, at::TensorList dw_weights, at::IntArrayRef dilations,
                              at::TensorList mid_scales, at::TensorList mid_shifts, int64_t mid_act,
                              at::TensorList pw_weights, std::optional<at::ScalarType> out_dtype) {
  const Problem pb = checks::check_separable_gemm_args("separable_gemm", x, dw_weights, dilations, mid_scales,
                                                       mid_shifts, mid_act, pw_weights, out_dtype);
  const at::Tensor x_cl = x.contiguous(at::MemoryFormat::ChannelsLast);
  // Every (pixel, channel) is written: each branch writes its channels of every pixel.
  at::Tensor acc = at::empty({pb.N, pb.O, pb.H, pb.W}, x.options()
                                                           .dtype(checks::acc_dtype(x.scalar_type()))
                                                           .memory_format(at::MemoryFormat::ChannelsLast));
  std::vector<double> stats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "separable_gemm_cpu", [&] {
    forward_kernel<scalar_t>(pb, x_cl, at::Tensor(), at::Tensor(), false, acc, stats);
  });
  return acc.to(out_dtype.value_or(x.scalar_type()));
}

// separable_gemm_backward: branch by branch (backward_branch), g read in the accumulation type.
sig::SeparableGemmBackwardResult separable_gemm_backward_cpu(const at::Tensor& g, const at::Tensor& x,
                                                             at::TensorList dw_weights, at::IntArrayRef dilations,
                                                             at::TensorList mid_scales, at::TensorList mid_shifts,
                                                             int64_t mid_act, at::TensorList pw_weights,
                                                             c10::List<bool> output_mask) {
  const char* op = "separable_gemm_backward";
  const Problem pb = checks::check_separable_gemm_backward_args(op, g, x, dw_weights, dilations, mid_scales,
                                                                mid_shifts, mid_act, pw_weights, output_mask.size());
  BackwardFlags f;
  f.input = output_mask.get(0);
  f.weights = output_mask.get(1);

  const at::ScalarType acc_type = checks::acc_dtype(x.scalar_type());
  const at::TensorOptions acc_cl = x.options().dtype(acc_type).memory_format(at::MemoryFormat::ChannelsLast);
  at::Tensor gx_acc, gd_img;
  if (f.input) {
    // (at::zeros would drop the memory format of the options.)
    gx_acc = at::empty({pb.N, pb.C, pb.H, pb.W}, acc_cl).zero_();
    bool any_dw = false;
    for (const BranchSpec& br : pb.branches) any_dw = any_dw || br.dw.defined();
    if (any_dw) gd_img = at::empty({pb.N, pb.C, pb.H, pb.W}, acc_cl);  // fully written per branch
  }

  std::vector<BranchGrads> grads;
  if (f.input || f.weights) {
    const at::Tensor x_cl = x.contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor g_acc = g.to(acc_type).contiguous(at::MemoryFormat::ChannelsLast);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "separable_gemm_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const Packed<acc_t> pk = pack<acc_t>(pb, at::Tensor(), at::Tensor());
      for (const PackedBranch<acc_t>& br : pk.branches) {
        grads.push_back(backward_branch<scalar_t>(pb, br, f, x_cl.data_ptr<scalar_t>(), g_acc.data_ptr<acc_t>(),
                                                  gd_img.defined() ? gd_img.data_ptr<acc_t>() : nullptr,
                                                  f.input ? gx_acc.data_ptr<acc_t>() : nullptr));
      }
    });
  }

  // .to() keeps the channels_last strides of gx_acc (and is a no-op for float32/float64).
  sig::SeparableGemmBackwardResult res{f.input ? gx_acc.to(x.scalar_type()) : at::empty({0}, x.options()), {}, {},
                                       {}, {}};
  if (f.weights) {
    std::vector<at::Tensor> pw, dw, ms, msh;
    auto as_tensor = [](const std::vector<double>& v) {
      return at::from_blob(const_cast<double*>(v.data()), {static_cast<int64_t>(v.size())},
                           at::TensorOptions().dtype(at::kDouble));
    };
    for (const BranchGrads& gr : grads) {
      pw.push_back(as_tensor(gr.pw));
      dw.push_back(as_tensor(gr.dw));
      ms.push_back(as_tensor(gr.ms));
      msh.push_back(as_tensor(gr.msh));
    }
    sig::separable_weight_grads(pb, x, pw, dw, ms, msh, res);
  }
  return res;
}

}  // namespace
}  // namespace aspp_fused

ASPP_FUSED_CHECK_SIGNATURE(aspp_fused::separable_conv_cpu, SeparableConv);
ASPP_FUSED_CHECK_SIGNATURE(aspp_fused::separable_gemm_cpu, SeparableGemm);
ASPP_FUSED_CHECK_SIGNATURE(aspp_fused::separable_gemm_backward_cpu, SeparableGemmBackward);

TORCH_LIBRARY_IMPL(aspp_fused, CPU, m) {
  m.impl("separable_conv", &aspp_fused::separable_conv_cpu);
  m.impl("separable_gemm", &aspp_fused::separable_gemm_cpu);
  m.impl("separable_gemm_backward", &aspp_fused::separable_gemm_backward_cpu);
}
