// CUDA launch glue of aspp_fused::atrous_conv and of the primitives its backward is written over
// (semantics: the schema comments in csrc/aspp_fused.cpp; the formula: aspp_fused/_autograd.py;
// the CPU backend is csrc/cpu/atrous_conv.cpp, whose checks, output dtypes, memory formats and
// empty placeholders this file mirrors).
//
//   atrous_conv        one tap-list GEMM launch over all branches (concat or sum mode), epilogue
//                      and batch statistics fused (tap_gemm.cu / tap_gemm.cuh)
//   tap_gemm           the same GEMM raw (the backward's acc, written fp32), or its adjoint, the
//                      dgrad: sum mode over g_acc with negated taps and transposed weights
//                      [tap][O_b][C] (tensor cores, like the forward)
//   epilogue_backward  g_z, g_acc = g_z * scale (x dtype), grad_scale/shift/bias
//                      (epilogue_kernels.cuh)
//   tap_wgrad          per (branch, tap) GEMM over the tap's valid pixel region, split over
//                      pixels with atomic reduction (wgrad_gemm_kernel in wgrad_gemm.cuh, tensor
//                      cores)
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "op_signatures.h"
#include "glue.h"

namespace aspp_fused {
namespace cuda {
namespace {

using checks::AtrousShape;
const auto kCL = at::MemoryFormat::ChannelsLast;

// Weights [O_b, C, k, k] -> one buffer of [k*k][C][ldb_b] slabs (transpose=false, forward) or
// [k*k][O_b][ldb_b] (transpose=true, dgrad), ldb rounded up to 16 bytes and zero padded, so
// every weight copy of the GEMM is an aligned 16-byte cp.async. Returns the slab offsets.
at::Tensor pack_weights(at::TensorList weights, bool transpose, std::vector<int64_t>* offsets,
                        std::vector<int>* ldbs) {
  std::vector<at::Tensor> parts;
  int64_t off = 0;
  for (const at::Tensor& w : weights) {
    const int vec = vec_elems(w.scalar_type());
    at::Tensor t = transpose ? w.permute({2, 3, 0, 1}) : w.permute({2, 3, 1, 0});  // [k, k, rows, cols]
    const int64_t cols = t.size(3), ldb = round_up(cols, vec);
    if (ldb > cols) t = at::constant_pad_nd(t, {0, ldb - cols}, 0);
    parts.push_back(t.contiguous().reshape({-1}));
    offsets->push_back(off);
    ldbs->push_back(static_cast<int>(ldb));
    off += parts.back().numel();
  }
  return at::cat(parts);
}

// pack_weights kept across calls while the weights are unchanged (pack_cache.h).
struct PackedWeights {
  at::Tensor buf;
  std::vector<int64_t> offs;
  std::vector<int> ldbs;
};

std::shared_ptr<const PackedWeights> packed_weights(at::TensorList weights, bool transpose) {
  return cached_pack<PackedWeights>(transpose ? "cuda/atrous/dgrad" : "cuda/atrous/forward", weights.vec(), [&] {
    PackedWeights p;
    p.buf = pack_weights(weights, transpose, &p.offs, &p.ldbs);
    return p;
  });
}

at::Tensor acc_vector(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }
at::Tensor acc_vector(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() ? t->to(acc).contiguous() : at::Tensor();
}

// The forward GEMM of the op (branches over x) writing `out` ([N*H*W][O]).
TapGemmCall forward_call(const AtrousShape& s, const at::Tensor& xc, at::IntArrayRef dilations,
                         const at::Tensor& packed, const std::vector<int64_t>& offs, const std::vector<int>& ldbs,
                         bool sum_mode, void* out, bool out_acc) {
  TapGemmCall call{};
  call.dtype = xc.scalar_type();
  call.in = xc.data_ptr();
  call.in_stride = s.C;
  call.w = packed.data_ptr();
  for (size_t b = 0; b < s.out_ch.size(); ++b) {
    GemmBranch br{};
    br.w_off = offs[b];
    br.k = s.ksize[b];
    br.step = clamp_dilation(dilations[b], s.H, s.W);
    br.in_off = 0;
    br.cin = static_cast<int>(s.C);
    br.cout = static_cast<int>(s.out_ch[b]);
    br.ldb = ldbs[b];
    br.out_off = static_cast<int>(s.ch_off[b]);
    call.branches.push_back(br);
  }
  call.sum_mode = sum_mode;
  call.out = out;
  call.out_stride = s.O;
  call.out_acc = out_acc;
  call.out_channels = s.O;
  call.N = s.N;
  call.H = s.H;
  call.W = s.W;
  return call;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> atrous_conv_cuda(const at::Tensor& x, at::TensorList weights,
                                                                at::IntArrayRef dilations, const at::Tensor& scale,
                                                                const at::Tensor& shift,
                                                                const std::optional<at::Tensor>& bias,
                                                                bool sum_mode, int64_t act, bool compute_stats) {
  const AtrousShape s =
      checks::check_atrous_args("atrous_conv", x, weights, dilations, scale, shift, bias, sum_mode, act);
  DeviceGuard guard(x.device());
  check_device("atrous_conv");
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const at::Tensor xc = x.contiguous(kCL);
  const ForwardOutputs res(x, s.N, s.O, s.H, s.W, compute_stats);
  if (s.N * s.H * s.W > 0 && s.O > 0) {
    const auto pw = packed_weights(weights, /*transpose=*/false);
    const at::Tensor sc = acc_vector(scale, acc), sh = acc_vector(shift, acc), bi = acc_vector(bias, acc);
    TapGemmCall call = forward_call(s, xc, dilations, pw->buf, pw->offs, pw->ldbs, sum_mode, res.out.data_ptr(), false);
    call.ep.scale = sc.data_ptr();
    call.ep.shift = sh.data_ptr();
    call.ep.bias = ptr<void>(bi);
    res.into(call.ep);
    call.ep.o_total = static_cast<int>(s.O);
    call.ep.act = static_cast<int>(act);
    run_tap_gemm(call);
  }
  return res.result(acc);
}

// --------------------------------------------------------------------------- the backward's primitives
// atrous_conv's backward is written once, in aspp_fused/_autograd.py, over these three ops.

// tap_gemm: the forward GEMM with no epilogue (adjoint false), or its adjoint (dgrad): the same
// GEMM in sum mode over x (a gradient [N, O, H, W]) with negated taps and transposed weights
// [tap][O_b][C], branch b reading x's channels [off_b, off_b + O_b). The GEMM reads x in the
// weights' dtype (tensor cores) and writes out in that dtype or in its accumulation dtype.
at::Tensor tap_gemm_cuda(const at::Tensor& x, at::TensorList weights, at::IntArrayRef dilations, bool sum_mode,
                         bool adjoint, std::optional<at::ScalarType> out_dtype) {
  const AtrousShape s = checks::check_tap_gemm_args("tap_gemm", x, weights, dilations, sum_mode, adjoint, out_dtype);
  DeviceGuard guard(x.device());
  check_device("tap_gemm");
  const at::ScalarType dtype = weights[0].scalar_type(), acc = acc_dtype(dtype);
  const at::ScalarType want = out_dtype.value_or(x.scalar_type());
  const bool out_acc = want == acc;  // else the GEMM writes its own dtype (cast below if want is another)
  const int64_t N = s.N, H = s.H, W = s.W, out_ch = adjoint ? s.C : s.O;
  at::Tensor out = at::empty({N, out_ch, H, W}, x.options().dtype(out_acc ? acc : dtype).memory_format(kCL));
  if (N * H * W == 0 || out_ch == 0) return out.zero_().to(want);
  const at::Tensor xc = x.to(dtype).contiguous(kCL);
  // The packing lives until the launch (uncached weights pack per call).
  const auto pw = packed_weights(weights, /*transpose=*/adjoint);
  TapGemmCall call{};
  if (!adjoint) {
    call = forward_call(s, xc, dilations, pw->buf, pw->offs, pw->ldbs, sum_mode, out.data_ptr(), out_acc);
  } else {
    call.dtype = dtype;
    call.in = xc.data_ptr();
    call.in_stride = s.O;
    call.w = pw->buf.data_ptr();
    for (size_t b = 0; b < weights.size(); ++b) {
      GemmBranch br{};
      br.w_off = pw->offs[b];
      br.k = s.ksize[b];
      br.step = -clamp_dilation(dilations[b], H, W);
      br.in_off = static_cast<int>(s.ch_off[b]);
      br.cin = static_cast<int>(s.out_ch[b]);
      br.cout = static_cast<int>(s.C);
      br.ldb = pw->ldbs[b];
      br.out_off = 0;
      call.branches.push_back(br);
    }
    call.sum_mode = true;
    call.out = out.data_ptr();
    call.out_stride = s.C;
    call.out_acc = out_acc;
    call.out_channels = s.C;
    call.N = N;
    call.H = H;
    call.W = W;
  }
  call.ep.raw = 1;
  call.ep.o_total = static_cast<int>(out_ch);
  run_tap_gemm(call);
  return out.scalar_type() == want ? out : out.to(want);
}

// epilogue_backward: one pass over the pixels (epilogue_backward_kernel, epilogue_kernels.cuh);
// g_acc in out's dtype (the dtype the tap GEMMs read), the epilogue grads summed in double.
sig::EpilogueBackwardResult epilogue_backward_cuda(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_sum,
                                                   const std::optional<at::Tensor>& grad_sumsq, const at::Tensor& out,
                                                   const std::optional<at::Tensor>& acc_in, const at::Tensor& scale,
                                                   const at::Tensor& shift, const std::optional<at::Tensor>& bias,
                                                   int64_t act, c10::List<bool> output_mask) {
  const char* op = "epilogue_backward";
  const bool need_epilogue = output_mask.size() == 2 && output_mask.get(1);
  checks::check_epilogue_backward_args(op, grad_out, grad_sum, grad_sumsq, out, acc_in, scale, shift, bias, act,
                                       output_mask.size(), need_epilogue);
  const bool need_g_acc = output_mask.get(0);
  DeviceGuard guard(out.device());
  check_device(op);
  const bool has_bias = bias.has_value();
  const int64_t N = out.size(0), O = out.size(1), H = out.size(2), W = out.size(3);
  const at::ScalarType dtype = out.scalar_type(), acc = acc_dtype(dtype);
  sig::EpilogueBackwardResult res{at::empty({0}, out.options()), at::empty({0}, scale.options()),
                                  at::empty({0}, shift.options()),
                                  at::empty({0}, has_bias ? bias->options() : scale.options())};
  auto& [g_acc, grad_scale, grad_shift, grad_bias] = res;
  if (need_g_acc) g_acc = at::empty({N, O, H, W}, out.options().memory_format(kCL));
  if (!(need_g_acc || need_epilogue)) return res;
  at::Tensor ep_ws = need_epilogue ? at::zeros({2 * O + N * O}, out.options().dtype(at::kDouble)) : at::Tensor();
  if (N * H * W > 0 && O > 0) {
    const at::Tensor sc = acc_vector(scale, acc), sh = acc_vector(shift, acc), bi = acc_vector(bias, acc);
    const at::Tensor gs = acc_vector(grad_sum, acc), gss = acc_vector(grad_sumsq, acc);
    // z from acc, or out standing in for it (z itself with act none, the relu mask with relu).
    const at::Tensor acc_c = acc_in.has_value() ? acc_in->contiguous(kCL) : at::Tensor();
    const at::Tensor out_c = acc_in.has_value() ? at::Tensor() : out.contiguous(kCL);
    const at::Tensor go = grad_out.to(dtype).contiguous(kCL);
    EpilogueBwdParams p{};
    p.cg = channel_grid(N, H * W, O);
    p.grad_out = go.data_ptr();
    p.acc = ptr<void>(acc_c);
    p.out = ptr<void>(out_c);
    p.scale = sc.data_ptr();
    p.shift = sh.data_ptr();
    p.bias = ptr<void>(bi);
    p.grad_sum = ptr<void>(gs);
    p.grad_sumsq = ptr<void>(gss);
    p.act = static_cast<int>(act);
    p.g_acc = need_g_acc ? ptr<void>(g_acc) : nullptr;  // not the [0] placeholder's pointer
    if (need_epilogue) {
      double* ws = ep_ws.data_ptr<double>();
      p.g_scale = ws;
      p.g_shift = ws + O;
      p.g_bias = has_bias ? ws + 2 * O : nullptr;
    }
    run_epilogue_backward(dtype, p);
  }
  if (need_epilogue) {
    grad_scale = ep_ws.narrow(0, 0, O).to(scale.scalar_type(), false, /*copy=*/true);
    grad_shift = ep_ws.narrow(0, O, O).to(shift.scalar_type(), false, /*copy=*/true);
    if (has_bias) grad_bias = ep_ws.narrow(0, 2 * O, N * O).view({N, O}).to(bias->scalar_type(), false, true);
  }
  return res;
}

// tap_wgrad: per (branch, tap) GEMM over the tap's valid pixel region (wgrad_gemm.cuh).
std::vector<at::Tensor> tap_wgrad_cuda(const at::Tensor& x, const at::Tensor& g, at::TensorList weights,
                                       at::IntArrayRef dilations, bool sum_mode) {
  const AtrousShape s = checks::check_tap_wgrad_args("tap_wgrad", x, g, weights, dilations, sum_mode);
  DeviceGuard guard(x.device());
  check_device("tap_wgrad");
  const at::ScalarType dtype = x.scalar_type(), acc = acc_dtype(dtype);
  const int64_t N = s.N, C = s.C, H = s.H, W = s.W, O = s.O;
  std::vector<WgradJob> jobs;
  std::vector<int64_t> ws_off;
  int64_t total = 0;
  for (size_t b = 0; b < weights.size(); ++b) {
    const int k = s.ksize[b];
    const int d = clamp_dilation(dilations[b], H, W);
    ws_off.push_back(total);
    for (int tap = 0; tap < k * k; ++tap) {
      WgradJob j{};
      j.dy = (tap / k - k / 2) * d;
      j.dx = (tap % k - k / 2) * d;
      j.g_off = static_cast<int>(s.ch_off[b]);
      j.cout = static_cast<int>(s.out_ch[b]);
      j.ws_off = total + static_cast<int64_t>(tap) * C * s.out_ch[b];
      jobs.push_back(j);
    }
    total += static_cast<int64_t>(k) * k * C * s.out_ch[b];
  }
  at::Tensor ws = at::zeros({total}, x.options().dtype(acc));
  if (N * H * W > 0 && total > 0) {
    const at::Tensor xc = x.contiguous(kCL), gc = g.to(dtype).contiguous(kCL);
    run_wgrad(dtype, xc.data_ptr(), C, C, gc.data_ptr(), O, ws.data_ptr(), N, H, W, jobs);
  }
  std::vector<at::Tensor> grads;
  for (size_t b = 0; b < weights.size(); ++b) {
    const int64_t k = s.ksize[b], Ob = s.out_ch[b];
    // [k, k, C, O_b] -> [O_b, C, k, k]
    at::Tensor gw = ws.narrow(0, ws_off[b], k * k * C * Ob).view({k, k, C, Ob}).permute({3, 2, 0, 1});
    grads.push_back(gw.to(weights[b].scalar_type(), false, /*copy=*/true).contiguous());
  }
  return grads;
}

}  // namespace
}  // namespace cuda
}  // namespace aspp_fused

ASPP_FUSED_CHECK_SIGNATURE(aspp_fused::cuda::atrous_conv_cuda, AtrousConv);
ASPP_FUSED_CHECK_SIGNATURE(aspp_fused::cuda::tap_gemm_cuda, TapGemm);
ASPP_FUSED_CHECK_SIGNATURE(aspp_fused::cuda::epilogue_backward_cuda, EpilogueBackward);
ASPP_FUSED_CHECK_SIGNATURE(aspp_fused::cuda::tap_wgrad_cuda, TapWgrad);

ASPP_CUDA_LIBRARY_IMPL(m) {  // cuda/launch.h: aspp_fused for CUDA (the emulator's: aspp_fused_emu for CPU)
  m.impl("atrous_conv", &aspp_fused::cuda::atrous_conv_cuda);
  m.impl("tap_gemm", &aspp_fused::cuda::tap_gemm_cuda);
  m.impl("epilogue_backward", &aspp_fused::cuda::epilogue_backward_cuda);
  m.impl("tap_wgrad", &aspp_fused::cuda::tap_wgrad_cuda);
}
