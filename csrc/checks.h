// Argument checks shared by the CPU kernels and the CUDA kernels: the same checks,
// messages and derived shapes on every device, so an op fails the same way on either.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace aspp_fused {
namespace checks {

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// ------------------------------------------------------------------------------------------ atrous

struct AtrousShape {
  int64_t N, C, H, W;
  int64_t O;                    // output channels: sum O_b (concat) or O_0 (sum mode)
  std::vector<int64_t> out_ch;  // O_b
  std::vector<int64_t> ch_off;  // first channel of branch b in out (0 for every branch in sum mode)
  std::vector<int> ksize;       // k_b in {1, 3}
};

inline void check_channel_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                                 int64_t O, const char* o_meaning, const char* x_name = "x") {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but ", x_name, " is on ",
              x.device());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating point tensor, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == O, op, ": ", name, " has shape ", t.sizes(), ", expected [", O,
                    "] (", o_meaning, ")");
}

// The branches (weights[b] [O_b, C, k, k], k 1 or 3, of dtype w_dtype, on x's device;
// dilations[b] >= 1; sum mode: equal O_b) into s, whose C is already set: O, out_ch, ch_off, ksize.
inline void check_branches(const char* op, AtrousShape& s, const at::Tensor& x, at::TensorList weights,
                           at::IntArrayRef dilations, bool sum_mode, at::ScalarType w_dtype,
                           const char* w_dtype_meaning, const char* c_meaning) {
  TORCH_CHECK_VALUE(!weights.empty(), op, ": weights is empty, expected at least one branch");
  TORCH_CHECK_VALUE(weights.size() == dilations.size(), op, ": got ", weights.size(), " weights but ",
                    dilations.size(), " dilations, expected one dilation per branch");
  int64_t off = 0;
  for (size_t b = 0; b < weights.size(); ++b) {
    const at::Tensor& w = weights[b];
    TORCH_CHECK(w.device() == x.device(), op, ": weights[", b, "] is on ", w.device(), " but x is on ",
                x.device());
    TORCH_CHECK_TYPE(w.scalar_type() == w_dtype, op, ": weights[", b, "] has dtype ", w.scalar_type(),
                     ", expected ", w_dtype, " (", w_dtype_meaning, ")");
    TORCH_CHECK_VALUE(w.dim() == 4, op, ": weights[", b, "] must be 4-D [O_b, C, k, k], got shape ", w.sizes());
    TORCH_CHECK_VALUE(w.size(1) == s.C, op, ": weights[", b, "] has ", w.size(1), " input channels, expected ",
                      s.C, " (", c_meaning, ")");
    TORCH_CHECK_VALUE(w.size(2) == w.size(3) && (w.size(2) == 1 || w.size(2) == 3), op, ": weights[", b,
                      "] has kernel size ", w.size(2), "x", w.size(3), ", expected 1x1 or 3x3");
    TORCH_CHECK_VALUE(dilations[b] >= 1, op, ": dilations[", b, "] is ", dilations[b], ", expected >= 1");
    if (sum_mode) {
      TORCH_CHECK_VALUE(w.size(0) == weights[0].size(0), op, ": sum_mode needs the same output channels in "
                        "every branch, weights[", b, "] has ", w.size(0), " but weights[0] has ",
                        weights[0].size(0));
    }
    s.out_ch.push_back(w.size(0));
    s.ch_off.push_back(sum_mode ? 0 : off);
    s.ksize.push_back(static_cast<int>(w.size(2)));
    off += w.size(0);
  }
  s.O = sum_mode ? s.out_ch[0] : off;
}

inline const char* o_meaning(bool sum_mode) { return sum_mode ? "O_0, sum mode" : "sum of O_b, concat mode"; }

inline AtrousShape check_x(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": ", name, " must be 4-D [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK_TYPE(is_supported_dtype(x.scalar_type()), op, ": ", name,
                   " must be float32, float64, bfloat16 or float16, got ", x.scalar_type());
  AtrousShape s;
  s.N = x.size(0);
  s.C = x.size(1);
  s.H = x.size(2);
  s.W = x.size(3);
  return s;
}

inline AtrousShape check_atrous_args(const char* op, const at::Tensor& x, at::TensorList weights,
                                     at::IntArrayRef dilations, const at::Tensor& scale, const at::Tensor& shift,
                                     const std::optional<at::Tensor>& bias, bool sum_mode, int64_t act) {
  AtrousShape s = check_x(op, "x", x);
  check_branches(op, s, x, weights, dilations, sum_mode, x.scalar_type(), "the dtype of x", "x.shape[1]");
  check_channel_vector(op, "scale", scale, x, s.O, o_meaning(sum_mode));
  check_channel_vector(op, "shift", shift, x, s.O, o_meaning(sum_mode));
  if (bias.has_value()) {
    const at::Tensor& t = *bias;
    TORCH_CHECK(t.device() == x.device(), op, ": bias is on ", t.device(), " but x is on ", x.device());
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": bias must be a floating point tensor, got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == s.N && t.size(1) == s.O, op, ": bias has shape ", t.sizes(),
                      ", expected [", s.N, ", ", s.O, "] ([N, O]) or None");
  }
  TORCH_CHECK_VALUE(act == 0 || act == 1, op, ": act is ", act, ", expected 0 (none) or 1 (relu)");
  return s;
}

inline void check_optional_stat_grad(const char* op, const char* name, const std::optional<at::Tensor>& t,
                                     const at::Tensor& x, int64_t O, const char* x_name = "x") {
  if (!t.has_value()) return;
  check_channel_vector(op, name, *t, x, O, "one entry per output channel", x_name);
}

// The accumulation dtype of a GEMM input dtype: float64 for float64, else float32.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The gradient input g [N, O, H, W] of tap_gemm's adjoint and of tap_wgrad.
inline void check_g(const char* op, const char* name, const at::Tensor& g, const AtrousShape& s,
                    at::ScalarType w_dtype, bool sum_mode) {
  TORCH_CHECK_TYPE(g.scalar_type() == w_dtype || g.scalar_type() == acc_dtype(w_dtype), op, ": ", name,
                   " has dtype ", g.scalar_type(), ", expected ", w_dtype, " (the weights' dtype) or ",
                   acc_dtype(w_dtype), " (its accumulation dtype)");
  const std::vector<int64_t> want{s.N, s.O, s.H, s.W};
  TORCH_CHECK_VALUE(g.sizes() == at::IntArrayRef(want), op, ": ", name, " has shape ", g.sizes(), ", expected ",
                    at::IntArrayRef(want), " ([N, O, H, W], O = ", o_meaning(sum_mode), ")");
}

// tap_gemm's arguments. The forward reads x [N, C, H, W] in the weights' dtype; the adjoint reads
// x [N, O, H, W] (C is the weights' input channels).
inline AtrousShape check_tap_gemm_args(const char* op, const at::Tensor& x, at::TensorList weights,
                                       at::IntArrayRef dilations, bool sum_mode, bool adjoint,
                                       std::optional<at::ScalarType> out_dtype) {
  AtrousShape s = check_x(op, "x", x);
  if (!adjoint) {
    check_branches(op, s, x, weights, dilations, sum_mode, x.scalar_type(), "the dtype of x", "x.shape[1]");
  } else {
    TORCH_CHECK_VALUE(!weights.empty() && weights[0].dim() == 4, op, ": weights[0] must be 4-D [O_b, C, k, k]",
                      weights.empty() ? std::string(", got no weights") : ", got shape " + c10::str(weights[0].sizes()));
    s.C = weights[0].size(1);
    check_branches(op, s, x, weights, dilations, sum_mode, weights[0].scalar_type(), "the dtype of weights[0]",
                   "weights[0].shape[1]");
    check_g(op, "x", x, s, weights[0].scalar_type(), sum_mode);
  }
  if (out_dtype.has_value()) {
    TORCH_CHECK_TYPE(is_supported_dtype(*out_dtype), op, ": out_dtype must be float32, float64, bfloat16 or "
                     "float16, got ", *out_dtype);
  }
  return s;
}

// tap_wgrad's arguments: x [N, C, H, W] in the weights' dtype, g [N, O, H, W].
inline AtrousShape check_tap_wgrad_args(const char* op, const at::Tensor& x, const at::Tensor& g,
                                        at::TensorList weights, at::IntArrayRef dilations, bool sum_mode) {
  AtrousShape s = check_x(op, "x", x);
  check_branches(op, s, x, weights, dilations, sum_mode, x.scalar_type(), "the dtype of x", "x.shape[1]");
  TORCH_CHECK(g.device() == x.device(), op, ": g is on ", g.device(), " but x is on ", x.device());
  check_g(op, "g", g, s, x.scalar_type(), sum_mode);
  return s;
}

// epilogue_backward's arguments; returns [N, O, H, W] (out's shape).
inline std::vector<int64_t> check_epilogue_backward_args(
    const char* op, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_sum,
    const std::optional<at::Tensor>& grad_sumsq, const at::Tensor& out, const std::optional<at::Tensor>& acc,
    const at::Tensor& scale, const at::Tensor& shift, const std::optional<at::Tensor>& bias, int64_t act,
    size_t mask_size, bool need_epilogue) {
  TORCH_CHECK_VALUE(out.dim() == 4, op, ": out must be 4-D [N, O, H, W] (the forward's output), got shape ",
                    out.sizes());
  TORCH_CHECK_TYPE(is_supported_dtype(out.scalar_type()), op,
                   ": out must be float32, float64, bfloat16 or float16, got ", out.scalar_type());
  const std::vector<int64_t> shape = out.sizes().vec();
  const int64_t N = shape[0], O = shape[1];
  TORCH_CHECK(grad_out.device() == out.device(), op, ": grad_out is on ", grad_out.device(), " but out is on ",
              out.device());
  TORCH_CHECK_TYPE(at::isFloatingType(grad_out.scalar_type()), op,
                   ": grad_out must be a floating point tensor, got ", grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.sizes() == out.sizes(), op, ": grad_out has shape ", grad_out.sizes(), ", expected ",
                    out.sizes(), " (the shape of out, [N, O, H, W])");
  if (acc.has_value()) {
    TORCH_CHECK(acc->device() == out.device(), op, ": acc is on ", acc->device(), " but out is on ", out.device());
    TORCH_CHECK_TYPE(acc->scalar_type() == acc_dtype(out.scalar_type()), op, ": acc has dtype ",
                     acc->scalar_type(), ", expected ", acc_dtype(out.scalar_type()),
                     " (the accumulation dtype of out's dtype)");
    TORCH_CHECK_VALUE(acc->sizes() == out.sizes(), op, ": acc has shape ", acc->sizes(), ", expected ",
                      out.sizes(), " (the shape of out)");
  } else {
    TORCH_CHECK_VALUE(!need_epilogue, op, ": acc is None, but grad_scale (output_mask[1]) needs it");
    TORCH_CHECK_VALUE(!(act == 1 && grad_sumsq.has_value()), op,
                      ": acc is None, but relu with grad_sumsq needs it (relu hides the negative z)");
  }
  check_channel_vector(op, "scale", scale, out, O, "out.shape[1]", "out");
  check_channel_vector(op, "shift", shift, out, O, "out.shape[1]", "out");
  if (bias.has_value()) {
    const at::Tensor& t = *bias;
    TORCH_CHECK(t.device() == out.device(), op, ": bias is on ", t.device(), " but out is on ", out.device());
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": bias must be a floating point tensor, got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == N && t.size(1) == O, op, ": bias has shape ", t.sizes(),
                      ", expected [", N, ", ", O, "] ([N, O]) or None");
  }
  check_optional_stat_grad(op, "grad_sum", grad_sum, out, O, "out");
  check_optional_stat_grad(op, "grad_sumsq", grad_sumsq, out, O, "out");
  TORCH_CHECK_VALUE(act == 0 || act == 1, op, ": act is ", act, ", expected 0 (none) or 1 (relu)");
  TORCH_CHECK_VALUE(mask_size == 2, op, ": output_mask has ", mask_size,
                    " entries, expected 2 ([g_acc, epilogue])");
  return shape;
}

// ------------------------------------------------------------------------------------------ separable

// The schema passes "absent" per-branch tensors as empty 1-D [0] tensors.
inline bool present(const at::Tensor& t) { return !(t.dim() == 1 && t.numel() == 0); }

struct SepBranchSpec {
  int64_t out_channels;  // O_b
  int64_t offset;        // first channel of this branch in the concat output
  int64_t dilation;
  at::Tensor dw;         // [C, 1, 3, 3] or undefined (plain 1x1 branch)
  at::Tensor mid_scale;  // [C] or undefined
  at::Tensor mid_shift;  // [C] or undefined
  at::Tensor pw;         // [O_b, C, 1, 1]
};

struct SepProblem {
  int64_t N, C, H, W, O;
  int mid_act, act;
  std::vector<SepBranchSpec> branches;
  at::Tensor bias;  // [N, O] or undefined
};

inline void check_vector(const char* op, const at::Tensor& t, const char* name, int64_t b, int64_t len,
                         const char* len_what, const at::Tensor& x) {
  const std::string what = b < 0 ? std::string(name) : std::string(name) + "[" + std::to_string(b) + "]";
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == len, op, ": ", what, " must be 1-D of length ", len, " (",
                    len_what, "), got shape ", t.sizes());
  TORCH_CHECK_TYPE(is_supported_dtype(t.scalar_type()), op, ": ", what, " must be a floating tensor, got ",
                   t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", what, " is on ", t.device(), " but x is on ", x.device());
}

// The branches of a separable op (x, the depthwise, mid affine and pointwise weights): act 0, no bias.
inline SepProblem check_separable_branches(const char* op, const at::Tensor& x, at::TensorList dw_weights,
                                           at::IntArrayRef dilations, at::TensorList mid_scales,
                                           at::TensorList mid_shifts, int64_t mid_act, at::TensorList pw_weights) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK_TYPE(is_supported_dtype(x.scalar_type()), op,
                   ": x must be float32, float64, bfloat16 or float16, got ", x.scalar_type());
  const int64_t nb = static_cast<int64_t>(dilations.size());
  TORCH_CHECK_VALUE(nb >= 1, op, ": needs at least one branch (dilations is empty)");
  TORCH_CHECK_VALUE(static_cast<int64_t>(dw_weights.size()) == nb, op, ": dw_weights has ", dw_weights.size(),
                    " entries, expected ", nb, " (len(dilations))");
  TORCH_CHECK_VALUE(static_cast<int64_t>(mid_scales.size()) == nb, op, ": mid_scales has ", mid_scales.size(),
                    " entries, expected ", nb, " (len(dilations))");
  TORCH_CHECK_VALUE(static_cast<int64_t>(mid_shifts.size()) == nb, op, ": mid_shifts has ", mid_shifts.size(),
                    " entries, expected ", nb, " (len(dilations))");
  TORCH_CHECK_VALUE(static_cast<int64_t>(pw_weights.size()) == nb, op, ": pw_weights has ", pw_weights.size(),
                    " entries, expected ", nb, " (len(dilations))");
  TORCH_CHECK_VALUE(mid_act == 0 || mid_act == 1, op, ": mid_act must be 0 (none) or 1 (relu), got ", mid_act);

  SepProblem pb;
  pb.N = x.size(0);
  pb.C = x.size(1);
  pb.H = x.size(2);
  pb.W = x.size(3);
  pb.mid_act = static_cast<int>(mid_act);
  pb.act = 0;
  const int64_t C = pb.C;
  int64_t offset = 0;
  for (int64_t b = 0; b < nb; ++b) {
    SepBranchSpec br;
    br.dilation = dilations[b];
    TORCH_CHECK_VALUE(br.dilation >= 1, op, ": dilations[", b, "] must be >= 1, got ", br.dilation);

    if (present(dw_weights[b])) br.dw = dw_weights[b];
    if (br.dw.defined()) {
      TORCH_CHECK_VALUE(br.dw.dim() == 4 && br.dw.size(0) == C && br.dw.size(1) == 1 && br.dw.size(2) == 3 &&
                            br.dw.size(3) == 3,
                        op, ": dw_weights[", b, "] must have shape [", C, ", 1, 3, 3] (C = x.shape[1]), got ",
                        br.dw.sizes());
      TORCH_CHECK_TYPE(br.dw.scalar_type() == x.scalar_type(), op, ": dw_weights[", b, "] has dtype ",
                       br.dw.scalar_type(), ", expected x's dtype ", x.scalar_type());
      TORCH_CHECK(br.dw.device() == x.device(), op, ": dw_weights[", b, "] is on ", br.dw.device(),
                  " but x is on ", x.device());
    }

    if (present(mid_scales[b])) br.mid_scale = mid_scales[b];
    if (present(mid_shifts[b])) br.mid_shift = mid_shifts[b];
    TORCH_CHECK_VALUE(br.mid_scale.defined() == br.mid_shift.defined(), op, ": mid_scales[", b, "] and mid_shifts[",
                      b, "] must both be given or both be None");
    if (br.mid_scale.defined()) {
      TORCH_CHECK_VALUE(br.dw.defined(), op, ": mid_scales[", b, "] is given but dw_weights[", b,
                        "] is None; a mid affine is only allowed after a depthwise");
      check_vector(op, br.mid_scale, "mid_scales", b, C, "C = x.shape[1]", x);
      check_vector(op, br.mid_shift, "mid_shifts", b, C, "C = x.shape[1]", x);
    }

    br.pw = pw_weights[b];
    TORCH_CHECK_VALUE(br.pw.dim() == 4 && br.pw.size(2) == 1 && br.pw.size(3) == 1, op, ": pw_weights[", b,
                      "] must have shape [O_b, C, 1, 1], got ", br.pw.sizes());
    TORCH_CHECK_VALUE(br.pw.size(1) == C, op, ": pw_weights[", b, "] has ", br.pw.size(1),
                      " input channels, expected ", C, " (x.shape[1])");
    TORCH_CHECK_TYPE(br.pw.scalar_type() == x.scalar_type(), op, ": pw_weights[", b, "] has dtype ",
                     br.pw.scalar_type(), ", expected x's dtype ", x.scalar_type());
    TORCH_CHECK(br.pw.device() == x.device(), op, ": pw_weights[", b, "] is on ", br.pw.device(), " but x is on ",
                x.device());
    br.out_channels = br.pw.size(0);
    br.offset = offset;
    offset += br.out_channels;
    pb.branches.push_back(std::move(br));
  }
  pb.O = offset;
  return pb;
}

inline SepProblem check_separable_args(const char* op, const at::Tensor& x, at::TensorList dw_weights,
                                       at::IntArrayRef dilations, at::TensorList mid_scales,
                                       at::TensorList mid_shifts, int64_t mid_act, at::TensorList pw_weights,
                                       const at::Tensor& scale, const at::Tensor& shift,
                                       const std::optional<at::Tensor>& bias, int64_t act) {
  TORCH_CHECK_VALUE(act == 0 || act == 1, op, ": act must be 0 (none) or 1 (relu), got ", act);
  SepProblem pb = check_separable_branches(op, x, dw_weights, dilations, mid_scales, mid_shifts, mid_act, pw_weights);
  pb.act = static_cast<int>(act);
  check_vector(op, scale, "scale", -1, pb.O, "O = sum of pw_weights[b].shape[0]", x);
  check_vector(op, shift, "shift", -1, pb.O, "O = sum of pw_weights[b].shape[0]", x);
  if (bias.has_value() && bias->defined()) {
    pb.bias = *bias;
    TORCH_CHECK_VALUE(pb.bias.dim() == 2 && pb.bias.size(0) == pb.N && pb.bias.size(1) == pb.O, op,
                      ": bias must have shape [N, O] = [", pb.N, ", ", pb.O, "], got ", pb.bias.sizes());
    TORCH_CHECK_TYPE(is_supported_dtype(pb.bias.scalar_type()), op, ": bias must be a floating tensor, got ",
                     pb.bias.scalar_type());
    TORCH_CHECK(pb.bias.device() == x.device(), op, ": bias is on ", pb.bias.device(), " but x is on ",
                x.device());
  }
  return pb;
}

// separable_gemm's arguments.
inline SepProblem check_separable_gemm_args(const char* op, const at::Tensor& x, at::TensorList dw_weights,
                                            at::IntArrayRef dilations, at::TensorList mid_scales,
                                            at::TensorList mid_shifts, int64_t mid_act, at::TensorList pw_weights,
                                            std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK_TYPE(!out_dtype.has_value() || is_supported_dtype(*out_dtype), op,
                   ": out_dtype must be float32, float64, bfloat16 or float16, got ", *out_dtype);
  return check_separable_branches(op, x, dw_weights, dilations, mid_scales, mid_shifts, mid_act, pw_weights);
}

// separable_gemm_backward's arguments: the branches, g [N, O, H, W] in x's dtype or its
// accumulation dtype, and a 2-entry output_mask.
inline SepProblem check_separable_gemm_backward_args(const char* op, const at::Tensor& g, const at::Tensor& x,
                                                     at::TensorList dw_weights, at::IntArrayRef dilations,
                                                     at::TensorList mid_scales, at::TensorList mid_shifts,
                                                     int64_t mid_act, at::TensorList pw_weights, size_t mask_size) {
  const SepProblem pb =
      check_separable_branches(op, x, dw_weights, dilations, mid_scales, mid_shifts, mid_act, pw_weights);
  TORCH_CHECK(g.device() == x.device(), op, ": g is on ", g.device(), " but x is on ", x.device());
  TORCH_CHECK_TYPE(g.scalar_type() == x.scalar_type() || g.scalar_type() == acc_dtype(x.scalar_type()), op,
                   ": g has dtype ", g.scalar_type(), ", expected ", x.scalar_type(), " (x's dtype) or ",
                   acc_dtype(x.scalar_type()), " (its accumulation dtype)");
  const std::vector<int64_t> want{pb.N, pb.O, pb.H, pb.W};
  TORCH_CHECK_VALUE(g.sizes() == at::IntArrayRef(want), op, ": g has shape ", g.sizes(), ", expected ",
                    at::IntArrayRef(want), " ([N, O, H, W], O = sum of pw_weights[b].shape[0])");
  TORCH_CHECK_VALUE(mask_size == 2, op, ": output_mask has ", mask_size, " entries, expected 2 ([input, weights])");
  return pb;
}

}  // namespace checks
}  // namespace aspp_fused
