// CPU kernels of aspp_fused::atrous_conv and of the primitives its backward is written over
// (tap_gemm, epilogue_backward, tap_wgrad; the formula: aspp_fused/_autograd.py).
//
// The exact semantics are in the schema comments of csrc/aspp_fused.cpp; this file is the
// readable loop version of the algorithm the GPU kernels use (docs/DESIGN.md, "The one primitive"):
// a tap-list implicit GEMM over 2-D tiles of output pixels that only visits the taps (and,
// per tap, the pixels) that read inside the image, so no zero padding is ever multiplied.
//
// Layouts used throughout:
//   x, out, grad_x  NHWC in memory (channels_last), pixel p of image n at ((n * H + h) * W + w)
//   packed weights  [tap][C][O_b] in the accumulation type (tap = ky * k + kx), so the inner
//                   loop runs over contiguous output channels; dgrad uses the transpose
//                   [tap][O_b][C]
//   g_acc           [N, H, W, O] in the accumulation type (epilogue_backward's, read by the
//                   adjoint tap_gemm and tap_wgrad)
//
// Determinism: every reduction (batch statistics, epilogue grads) goes through per-tile
// partials in double that are summed in tile order, and wgrad gives each output element to
// exactly one task that walks the pixels in a fixed order, so results do not depend on the
// number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "op_signatures.h"
#include "pack_cache.h"
#include "tap_plan.h"

namespace aspp_fused {
namespace {

// Output tile (docs/DESIGN.md: 2-D tiles recover the padding skip, row-only tiles only ~25% of it).
constexpr int64_t kTileH = 8;
constexpr int64_t kTileW = 8;
constexpr int64_t kTilePixels = kTileH * kTileW;
// Input channels per wgrad task: the task's [kWgradCBlock][O_b] accumulator stays in L1/L2.
constexpr int64_t kWgradCBlock = 16;

// --------------------------------------------------------------------------- argument checks

// In csrc/checks.h, shared with the CUDA kernels.
using checks::AtrousShape;
using checks::check_atrous_args;

// --------------------------------------------------------------------------- helpers

// A tensor's values as a flat vector of the accumulation type (scale, shift, bias, grads of stats).
template <typename acc_t>
std::vector<acc_t> to_acc_vector(const at::Tensor& t) {
  const at::Tensor c = t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  return std::vector<acc_t>(c.data_ptr<acc_t>(), c.data_ptr<acc_t>() + c.numel());
}

// Weights [O_b, C, k, k] -> [tap][C][O_b] (transpose=false, forward) or [tap][O_b][C]
// (transpose=true, dgrad), in the accumulation type.
template <typename acc_t>
std::vector<acc_t> pack_weights(const at::Tensor& w, bool transpose) {
  const at::Tensor wc = w.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* src = wc.data_ptr<acc_t>();
  const int64_t O = wc.size(0), C = wc.size(1), taps = wc.size(2) * wc.size(3);
  std::vector<acc_t> packed(static_cast<size_t>(taps * C * O));
  for (int64_t o = 0; o < O; ++o)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = 0; t < taps; ++t) {
        const int64_t dst = transpose ? (t * O + o) * C + c : (t * C + c) * O + o;
        packed[dst] = src[(o * C + c) * taps + t];
      }
  return packed;
}

// pack_weights of every branch, kept across calls while the weights are unchanged (pack_cache.h).
template <typename acc_t>
std::shared_ptr<const std::vector<std::vector<acc_t>>> packed_branches(at::TensorList weights, bool transpose) {
  const std::string tag = std::string("cpu/atrous/") + (transpose ? "dgrad/" : "forward/") +
                          c10::toString(c10::CppTypeToScalarType<acc_t>::value);
  return pack_cache::get<std::vector<std::vector<acc_t>>>(tag, weights.vec(), [&] {
    std::vector<std::vector<acc_t>> packed;
    for (const at::Tensor& w : weights) packed.push_back(pack_weights<acc_t>(w, transpose));
    return packed;
  });
}

// The (n, tile) work items: tiles of kTileH x kTileW output pixels, clipped to the image.
struct Tile {
  int64_t n, h0, h1, w0, w1;
};

struct Tiling {
  int64_t H, W, tiles_w, per_image, total;

  Tiling(int64_t N, int64_t H_, int64_t W_) : H(H_), W(W_) {
    const int64_t tiles_h = (H + kTileH - 1) / kTileH;
    tiles_w = (W + kTileW - 1) / kTileW;
    per_image = tiles_h * tiles_w;
    total = N * per_image;
  }

  Tile tile(int64_t index) const {
    const int64_t r = index % per_image;
    const int64_t h0 = (r / tiles_w) * kTileH, w0 = (r % tiles_w) * kTileW;
    return {index / per_image, h0, std::min(h0 + kTileH, H), w0, std::min(w0 + kTileW, W)};
  }
};

// --------------------------------------------------------------------------- the tiled tap core

// One branch of the tap-list conv, as the core sees it. Tap (ty, tx) reads input pixel
// (h + (ty - k/2) * step, w + (tx - k/2) * step): step = +d in the forward, -d in dgrad
// (negated taps), which is all that tap_range / valid_rows need to know.
template <typename acc_t>
struct TapBranch {
  const acc_t* weight;  // [k * k][cin][cout]
  int k;
  int64_t step;
  int64_t in_off, cin;    // the branch reads input channels [in_off, in_off + cin)
  int64_t out_off, cout;  // and accumulates into acc channels [out_off, out_off + cout)
};

// acc[p][out_off + o] += sum_{taps, c} in[p + tap][in_off + c] * weight[tap][c][o] for every
// pixel p of `tile` and every branch (branches with the same out_off sum: "sum mode").
//   in   the tile's image, NHWC with `in_stride` elements per pixel
//   acc  [kTileH * kTileW][acc_stride], pixel (h, w) at row (h - h0) * kTileW + (w - w0)
// Only taps that touch the image for this tile are visited (tap_range), and per tap only the
// pixels whose source is inside the image (valid_rows): the inner loops have no bounds checks.
template <typename in_t, typename acc_t>
void tap_conv_tile(const in_t* in, int64_t in_stride, int64_t H, int64_t W,
                   const std::vector<TapBranch<acc_t>>& branches, const Tile& tile, acc_t* acc,
                   int64_t acc_stride) {
  for (const TapBranch<acc_t>& br : branches) {
    const int half = br.k / 2;
    const TapRange ry = tap_range(tile.h0, tile.h1, H, br.k, br.step);
    const TapRange rx = tap_range(tile.w0, tile.w1, W, br.k, br.step);
    for (int ty = ry.t0; ty <= ry.t1; ++ty) {
      const int64_t dy = (ty - half) * br.step;
      int64_t h_lo, h_hi;
      valid_rows(tile.h0, tile.h1, H, dy, &h_lo, &h_hi);
      for (int tx = rx.t0; tx <= rx.t1; ++tx) {
        const int64_t dx = (tx - half) * br.step;
        int64_t w_lo, w_hi;
        valid_rows(tile.w0, tile.w1, W, dx, &w_lo, &w_hi);
        const acc_t* w_tap = br.weight + static_cast<int64_t>(ty * br.k + tx) * br.cin * br.cout;
        for (int64_t h = h_lo; h < h_hi; ++h) {
          for (int64_t w = w_lo; w < w_hi; ++w) {
            const in_t* src = in + ((h + dy) * W + (w + dx)) * in_stride + br.in_off;
            acc_t* dst = acc + ((h - tile.h0) * kTileW + (w - tile.w0)) * acc_stride + br.out_off;
            for (int64_t c = 0; c < br.cin; ++c) {
              const acc_t v = static_cast<acc_t>(src[c]);
              const acc_t* w_row = w_tap + c * br.cout;
              for (int64_t o = 0; o < br.cout; ++o) dst[o] += v * w_row[o];
            }
          }
        }
      }
    }
  }
}

// The forward branches over x: each reads all C channels and writes at its channel offset.
template <typename acc_t>
std::vector<TapBranch<acc_t>> forward_branches(const AtrousShape& s, at::IntArrayRef dilations,
                                               const std::vector<std::vector<acc_t>>& packed) {
  std::vector<TapBranch<acc_t>> branches;
  for (size_t b = 0; b < packed.size(); ++b)
    branches.push_back({packed[b].data(), s.ksize[b], dilations[b], 0, s.C, s.ch_off[b], s.out_ch[b]});
  return branches;
}

// --------------------------------------------------------------------------- forward

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> atrous_conv_impl(const at::Tensor& x_in, at::TensorList weights,
                                                                at::IntArrayRef dilations, const at::Tensor& scale,
                                                                const at::Tensor& shift,
                                                                const std::optional<at::Tensor>& bias,
                                                                const AtrousShape& s, int64_t act,
                                                                bool compute_stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = s.N, H = s.H, W = s.W, C = s.C, O = s.O;
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty({N, O, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const auto stats_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;

  const Tiling tiling(N, H, W);
  const auto packed = packed_branches<acc_t>(weights, /*transpose=*/false);
  const std::vector<TapBranch<acc_t>> branches = forward_branches<acc_t>(s, dilations, *packed);
  const std::vector<acc_t> scale_v = to_acc_vector<acc_t>(scale), shift_v = to_acc_vector<acc_t>(shift);
  const std::vector<acc_t> bias_v = bias.has_value() ? to_acc_vector<acc_t>(*bias) : std::vector<acc_t>();

  // Per-tile [sum z | sum z^2] partials, reduced below in tile order (thread-count independent).
  std::vector<double> partials(compute_stats ? static_cast<size_t>(tiling.total * 2 * O) : 0, 0.0);
  const scalar_t* x_data = x.data_ptr<scalar_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();

  at::parallel_for(0, tiling.total, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(kTilePixels * O));
    for (int64_t t = begin; t < end; ++t) {
      const Tile tile = tiling.tile(t);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      tap_conv_tile(x_data + tile.n * H * W * C, C, H, W, branches, tile, acc.data(), O);

      // Epilogue: z = acc * scale + shift (+ bias), out = act(z), stats of z.
      const acc_t* bias_n = bias_v.empty() ? nullptr : bias_v.data() + tile.n * O;
      double* p_sum = compute_stats ? partials.data() + t * 2 * O : nullptr;
      double* p_sumsq = compute_stats ? p_sum + O : nullptr;
      for (int64_t h = tile.h0; h < tile.h1; ++h) {
        for (int64_t w = tile.w0; w < tile.w1; ++w) {
          const acc_t* a = acc.data() + ((h - tile.h0) * kTileW + (w - tile.w0)) * O;
          scalar_t* dst = out_data + ((tile.n * H + h) * W + w) * O;
          for (int64_t o = 0; o < O; ++o) {
            acc_t z = a[o] * scale_v[o] + shift_v[o];
            if (bias_n) z += bias_n[o];
            if (p_sum) {
              p_sum[o] += static_cast<double>(z);
              p_sumsq[o] += static_cast<double>(z) * static_cast<double>(z);
            }
            // `z < 0` (not `z > 0`) so a NaN passes through relu, as torch.relu does.
            dst[o] = static_cast<scalar_t>(act == 1 && z < acc_t(0) ? acc_t(0) : z);
          }
        }
      }
    }
  });

  if (!compute_stats) {
    return {out, at::empty({0}, x.options().dtype(stats_dtype)), at::empty({0}, x.options().dtype(stats_dtype))};
  }
  at::Tensor ch_sum = at::zeros({O}, x.options().dtype(at::kDouble));
  at::Tensor ch_sumsq = at::zeros({O}, x.options().dtype(at::kDouble));
  double* sum_data = ch_sum.data_ptr<double>();
  double* sumsq_data = ch_sumsq.data_ptr<double>();
  for (int64_t t = 0; t < tiling.total; ++t) {
    const double* p = partials.data() + t * 2 * O;
    for (int64_t o = 0; o < O; ++o) {
      sum_data[o] += p[o];
      sumsq_data[o] += p[O + o];
    }
  }
  return {out, ch_sum.to(stats_dtype), ch_sumsq.to(stats_dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> atrous_conv_cpu(const at::Tensor& x, at::TensorList weights,
                                                               at::IntArrayRef dilations, const at::Tensor& scale,
                                                               const at::Tensor& shift,
                                                               const std::optional<at::Tensor>& bias,
                                                               bool sum_mode, int64_t act, bool compute_stats) {
  const AtrousShape s = check_atrous_args("atrous_conv", x, weights, dilations, scale, shift, bias, sum_mode, act);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "atrous_conv", [&] {
    result = atrous_conv_impl<scalar_t>(x, weights, dilations, scale, shift, bias, s, act, compute_stats);
  });
  return result;
}

// --------------------------------------------------------------------------- the backward's primitives
// atrous_conv's backward is written once, in aspp_fused/_autograd.py, over these three ops.

// tap_gemm: the tiled core with no epilogue: the forward branches over x (adjoint false), or the
// adjoint, the same core in sum mode over the branches with negated taps and transposed weights,
// reading branch b's channels of x: out[p, c] = sum_{b, tap, o} x[p - tap, off_b + o] W_b[o, c, tap].
// in_t is the weights' dtype or (adjoint) its accumulation dtype; the result is in acc_t.
template <typename in_t, typename acc_t>
at::Tensor tap_gemm_impl(const at::Tensor& x, at::TensorList weights, at::IntArrayRef dilations,
                         const AtrousShape& s, bool adjoint) {
  const int64_t N = s.N, H = s.H, W = s.W;
  const int64_t in_ch = adjoint ? s.O : s.C, out_ch = adjoint ? s.C : s.O;
  const auto cl = at::MemoryFormat::ChannelsLast;
  at::Tensor out = at::empty({N, out_ch, H, W},
                             x.options().dtype(c10::CppTypeToScalarType<acc_t>::value).memory_format(cl));
  if (N * H * W == 0 || out_ch == 0) return out.zero_();
  const auto packed = packed_branches<acc_t>(weights, /*transpose=*/adjoint);
  std::vector<TapBranch<acc_t>> branches;
  if (adjoint) {
    for (size_t b = 0; b < packed->size(); ++b)
      branches.push_back({(*packed)[b].data(), s.ksize[b], -dilations[b], s.ch_off[b], s.out_ch[b], 0, s.C});
  } else {
    branches = forward_branches<acc_t>(s, dilations, *packed);
  }
  const in_t* in_data = x.data_ptr<in_t>();
  acc_t* out_data = out.data_ptr<acc_t>();
  const Tiling tiling(N, H, W);
  at::parallel_for(0, tiling.total, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(kTilePixels * out_ch));
    for (int64_t t = begin; t < end; ++t) {
      const Tile tile = tiling.tile(t);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      tap_conv_tile(in_data + tile.n * H * W * in_ch, in_ch, H, W, branches, tile, acc.data(), out_ch);
      for (int64_t h = tile.h0; h < tile.h1; ++h)
        for (int64_t w = tile.w0; w < tile.w1; ++w)
          std::copy_n(acc.data() + ((h - tile.h0) * kTileW + (w - tile.w0)) * out_ch, out_ch,
                      out_data + ((tile.n * H + h) * W + w) * out_ch);
    }
  });
  return out;
}

at::Tensor tap_gemm_cpu(const at::Tensor& x, at::TensorList weights, at::IntArrayRef dilations, bool sum_mode,
                        bool adjoint, std::optional<at::ScalarType> out_dtype) {
  const AtrousShape s = checks::check_tap_gemm_args("tap_gemm", x, weights, dilations, sum_mode, adjoint, out_dtype);
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weights[0].scalar_type(), "tap_gemm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (xc.scalar_type() == weights[0].scalar_type())
      out = tap_gemm_impl<scalar_t, acc_t>(xc, weights, dilations, s, adjoint);
    else
      out = tap_gemm_impl<acc_t, acc_t>(xc, weights, dilations, s, adjoint);
  });
  return out.to(out_dtype.value_or(x.scalar_type()));
}

// epilogue_backward: per 8 x 8 tile, g_z, g_acc = g_z * scale (in acc_t) and the partials
// [sum g_z * acc | sum g_z] of grad_scale / grad_shift / grad_bias, summed in tile order.
template <typename scalar_t>
sig::EpilogueBackwardResult epilogue_backward_impl(const at::Tensor& grad_out,
                                                   const std::optional<at::Tensor>& grad_sum,
                                                   const std::optional<at::Tensor>& grad_sumsq,
                                                   const at::Tensor& out_in, const std::optional<at::Tensor>& acc_in,
                                                   const at::Tensor& scale, const at::Tensor& shift,
                                                   const std::optional<at::Tensor>& bias, int64_t act,
                                                   bool need_g_acc, bool need_epilogue) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto cl = at::MemoryFormat::ChannelsLast;
  const int64_t N = out_in.size(0), O = out_in.size(1), H = out_in.size(2), W = out_in.size(3);
  const bool has_bias = bias.has_value(), recompute = acc_in.has_value();
  sig::EpilogueBackwardResult res{at::empty({0}, out_in.options().dtype(c10::CppTypeToScalarType<acc_t>::value)),
                                  at::empty({0}, scale.options()), at::empty({0}, shift.options()),
                                  at::empty({0}, has_bias ? bias->options() : scale.options())};
  auto& [g_acc_t, grad_scale, grad_shift, grad_bias] = res;
  if (need_g_acc) g_acc_t = at::empty({N, O, H, W}, g_acc_t.options().memory_format(cl));
  if (!(need_g_acc || need_epilogue)) return res;

  const Tiling tiling(N, H, W);
  const at::Tensor go = grad_out.to(out_in.scalar_type()).contiguous(cl);
  const scalar_t* go_data = go.data_ptr<scalar_t>();
  // z from acc, or out standing in for it (z itself with act none, the relu mask with relu).
  const at::Tensor zsrc = recompute ? acc_in->contiguous(cl) : out_in.contiguous(cl);
  const acc_t* acc_data = recompute ? zsrc.data_ptr<acc_t>() : nullptr;
  const scalar_t* out_data = recompute ? nullptr : zsrc.data_ptr<scalar_t>();
  acc_t* g_acc = need_g_acc ? g_acc_t.data_ptr<acc_t>() : nullptr;
  const std::vector<acc_t> scale_v = to_acc_vector<acc_t>(scale), shift_v = to_acc_vector<acc_t>(shift);
  const std::vector<acc_t> bias_v = has_bias ? to_acc_vector<acc_t>(*bias) : std::vector<acc_t>();
  const std::vector<acc_t> gsum_v = grad_sum.has_value() ? to_acc_vector<acc_t>(*grad_sum) : std::vector<acc_t>();
  const std::vector<acc_t> gsumsq_v =
      grad_sumsq.has_value() ? to_acc_vector<acc_t>(*grad_sumsq) : std::vector<acc_t>();

  std::vector<double> partials(need_epilogue ? static_cast<size_t>(tiling.total * 2 * O) : 0, 0.0);
  at::parallel_for(0, tiling.total, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Tile tile = tiling.tile(t);
      const acc_t* bias_n = has_bias ? bias_v.data() + tile.n * O : nullptr;
      double* p_scale = need_epilogue ? partials.data() + t * 2 * O : nullptr;
      double* p_shift = need_epilogue ? p_scale + O : nullptr;
      for (int64_t h = tile.h0; h < tile.h1; ++h) {
        for (int64_t w = tile.w0; w < tile.w1; ++w) {
          const int64_t pix = (tile.n * H + h) * W + w;
          const acc_t* a = recompute ? acc_data + pix * O : nullptr;
          const scalar_t* go_p = go_data + pix * O;
          const scalar_t* out_p = recompute ? nullptr : out_data + pix * O;
          for (int64_t o = 0; o < O; ++o) {
            acc_t z = 0;
            if (recompute) {
              z = a[o] * scale_v[o] + shift_v[o];
              if (bias_n) z += bias_n[o];
            } else {
              z = static_cast<acc_t>(out_p[o]);  // z itself (act none) or relu(z), same sign test
            }
            acc_t g = static_cast<acc_t>(go_p[o]);
            if (act == 1 && !(z > acc_t(0))) g = 0;
            if (!gsum_v.empty()) g += gsum_v[o];
            if (!gsumsq_v.empty()) g += acc_t(2) * z * gsumsq_v[o];
            if (g_acc) g_acc[pix * O + o] = g * scale_v[o];
            if (need_epilogue) {
              p_scale[o] += static_cast<double>(g) * static_cast<double>(a[o]);
              p_shift[o] += static_cast<double>(g);
            }
          }
        }
      }
    }
  });

  if (need_epilogue) {
    const auto f64 = out_in.options().dtype(at::kDouble);
    at::Tensor gs = at::zeros({O}, f64), gsh = at::zeros({O}, f64), gb = at::zeros({N, O}, f64);
    double* gs_d = gs.data_ptr<double>();
    double* gsh_d = gsh.data_ptr<double>();
    double* gb_d = gb.data_ptr<double>();
    for (int64_t t = 0; t < tiling.total; ++t) {
      const double* p = partials.data() + t * 2 * O;
      double* gb_n = gb_d + (t / tiling.per_image) * O;
      for (int64_t o = 0; o < O; ++o) {
        gs_d[o] += p[o];
        gsh_d[o] += p[O + o];
        gb_n[o] += p[O + o];
      }
    }
    grad_scale = gs.to(scale.scalar_type());
    grad_shift = gsh.to(shift.scalar_type());
    if (has_bias) grad_bias = gb.to(bias->scalar_type());
  }
  return res;
}

sig::EpilogueBackwardResult epilogue_backward_cpu(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_sum,
                                                  const std::optional<at::Tensor>& grad_sumsq, const at::Tensor& out,
                                                  const std::optional<at::Tensor>& acc, const at::Tensor& scale,
                                                  const at::Tensor& shift, const std::optional<at::Tensor>& bias,
                                                  int64_t act, c10::List<bool> output_mask) {
  const bool need_epilogue = output_mask.size() == 2 && output_mask.get(1);
  checks::check_epilogue_backward_args("epilogue_backward", grad_out, grad_sum, grad_sumsq, out, acc, scale, shift,
                                       bias, act, output_mask.size(), need_epilogue);
  sig::EpilogueBackwardResult result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "epilogue_backward", [&] {
    result = epilogue_backward_impl<scalar_t>(grad_out, grad_sum, grad_sumsq, out, acc, scale, shift, bias, act,
                                              output_mask.get(0), need_epilogue);
  });
  return result;
}

// tap_wgrad: grad_W_b[o, c, tap] = sum_{n, p in the tap's valid region} g_b[n, p, o] * x[n, p + tap, c].
// One task per (branch, tap, block of input channels): each output element belongs to exactly
// one task and is summed in pixel order (deterministic); the task's accumulator is
// [kWgradCBlock][O_b] so the inner loop runs over contiguous output channels.
template <typename scalar_t, typename acc_t>
std::vector<at::Tensor> tap_wgrad_impl(const scalar_t* x_data, const acc_t* g_acc, at::TensorList weights,
                                       at::IntArrayRef dilations, const AtrousShape& s) {
  const int64_t N = s.N, H = s.H, W = s.W, C = s.C, O = s.O;
  const int64_t c_blocks = (C + kWgradCBlock - 1) / kWgradCBlock;
  struct Task {
    size_t b;
    int tap;
    int64_t c0;
  };
  std::vector<Task> tasks;
  std::vector<std::vector<acc_t>> packed(weights.size());  // [tap][C][O_b], like the forward packing
  for (size_t b = 0; b < weights.size(); ++b) {
    const int k = s.ksize[b];
    packed[b].assign(static_cast<size_t>(k * k * C * s.out_ch[b]), acc_t(0));
    for (int tap = 0; tap < k * k; ++tap)
      for (int64_t cb = 0; cb < c_blocks; ++cb) tasks.push_back({b, tap, cb * kWgradCBlock});
  }

  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Task& task = tasks[i];
      const int k = s.ksize[task.b], half = k / 2;
      const int64_t d = dilations[task.b], Ob = s.out_ch[task.b], g_off = s.ch_off[task.b];
      const int64_t c1 = std::min(task.c0 + kWgradCBlock, C);
      const int64_t dy = (task.tap / k - half) * d, dx = (task.tap % k - half) * d;
      // The output pixels whose source pixel p + tap is inside the image.
      int64_t h_lo, h_hi, w_lo, w_hi;
      valid_rows(0, H, H, dy, &h_lo, &h_hi);
      valid_rows(0, W, W, dx, &w_lo, &w_hi);
      acc_t* dst = packed[task.b].data() + (task.tap * C + task.c0) * Ob;  // rows c0..c1 of this tap
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t h = h_lo; h < h_hi; ++h) {
          for (int64_t w = w_lo; w < w_hi; ++w) {
            const acc_t* g = g_acc + ((n * H + h) * W + w) * O + g_off;
            const scalar_t* xp = x_data + ((n * H + h + dy) * W + (w + dx)) * C;
            for (int64_t c = task.c0; c < c1; ++c) {
              const acc_t v = static_cast<acc_t>(xp[c]);
              acc_t* row = dst + (c - task.c0) * Ob;
              for (int64_t o = 0; o < Ob; ++o) row[o] += v * g[o];
            }
          }
        }
      }
    }
  });

  // [tap][C][O_b] -> [O_b, C, k, k] in the weight dtype.
  std::vector<at::Tensor> grads;
  for (size_t b = 0; b < weights.size(); ++b) {
    const int64_t k = s.ksize[b], Ob = s.out_ch[b];
    at::Tensor g = at::empty({Ob, C, k, k}, weights[b].options().dtype(c10::CppTypeToScalarType<acc_t>::value)
                                                .memory_format(at::MemoryFormat::Contiguous));
    acc_t* gd = g.data_ptr<acc_t>();
    for (int64_t o = 0; o < Ob; ++o)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t tap = 0; tap < k * k; ++tap) gd[(o * C + c) * k * k + tap] = packed[b][(tap * C + c) * Ob + o];
    grads.push_back(g.to(weights[b].scalar_type()));
  }
  return grads;
}

std::vector<at::Tensor> tap_wgrad_cpu(const at::Tensor& x, const at::Tensor& g, at::TensorList weights,
                                      at::IntArrayRef dilations, bool sum_mode) {
  const AtrousShape s = checks::check_tap_wgrad_args("tap_wgrad", x, g, weights, dilations, sum_mode);
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor xc = x.contiguous(cl);
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tap_wgrad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor gc = g.to(c10::CppTypeToScalarType<acc_t>::value).contiguous(cl);
    result = tap_wgrad_impl<scalar_t, acc_t>(xc.data_ptr<scalar_t>(), gc.data_ptr<acc_t>(), weights, dilations, s);
  });
  return result;
}

}  // namespace
}  // namespace aspp_fused

ASPP_FUSED_CHECK_SIGNATURE(aspp_fused::atrous_conv_cpu, AtrousConv);
ASPP_FUSED_CHECK_SIGNATURE(aspp_fused::tap_gemm_cpu, TapGemm);
ASPP_FUSED_CHECK_SIGNATURE(aspp_fused::epilogue_backward_cpu, EpilogueBackward);
ASPP_FUSED_CHECK_SIGNATURE(aspp_fused::tap_wgrad_cpu, TapWgrad);

TORCH_LIBRARY_IMPL(aspp_fused, CPU, m) {
  m.impl("atrous_conv", &aspp_fused::atrous_conv_cpu);
  m.impl("tap_gemm", &aspp_fused::tap_gemm_cpu);
  m.impl("epilogue_backward", &aspp_fused::epilogue_backward_cpu);
  m.impl("tap_wgrad", &aspp_fused::tap_wgrad_cpu);
}
