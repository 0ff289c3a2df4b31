// The C++ signature of each op's kernels, one per schema of csrc/aspp_fused.cpp.
//
// The dispatcher requires every backend's kernel of an op to have exactly the same C++
// signature: a mismatch (say `const c10::List<bool>&` on CPU and `c10::List<bool>` on CUDA)
// throws from the second registration while the library loads, which terminates the process
// at `import aspp_fused` on a CUDA build, and only there. Each kernel file static_asserts its
// functions against these types, so the mismatch is a compile error in every build (the CUDA
// glue is also compiled by the emulator build of tools/cuda_emu, in CI).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"

namespace aspp_fused {
namespace sig {

// (out, ch_sum, ch_sumsq) of both forward ops.
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
// (g_acc, grad_scale, grad_shift, grad_bias)
using EpilogueBackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// (grad_x, grad_dw_weights, grad_mid_scales, grad_mid_shifts, grad_pw_weights)
using SeparableGemmBackwardResult = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                                               std::vector<at::Tensor>, std::vector<at::Tensor>>;

using AtrousConv = ForwardResult(
    const at::Tensor& x, at::TensorList weights, at::IntArrayRef dilations, const at::Tensor& scale,
    const at::Tensor& shift, const std::optional<at::Tensor>& bias, bool sum_mode, int64_t act, bool compute_stats);

using TapGemm = at::Tensor(const at::Tensor& x, at::TensorList weights, at::IntArrayRef dilations, bool sum_mode,
                           bool adjoint, std::optional<at::ScalarType> out_dtype);

using EpilogueBackward = EpilogueBackwardResult(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_sum, const std::optional<at::Tensor>& grad_sumsq,
    const at::Tensor& out, const std::optional<at::Tensor>& acc, const at::Tensor& scale, const at::Tensor& shift,
    const std::optional<at::Tensor>& bias, int64_t act, c10::List<bool> output_mask);

using TapWgrad = std::vector<at::Tensor>(const at::Tensor& x, const at::Tensor& g, at::TensorList weights,
                                         at::IntArrayRef dilations, bool sum_mode);

using SeparableConv = ForwardResult(
    const at::Tensor& x, at::TensorList dw_weights, at::IntArrayRef dilations, at::TensorList mid_scales,
    at::TensorList mid_shifts, int64_t mid_act, at::TensorList pw_weights, const at::Tensor& scale,
    const at::Tensor& shift, const std::optional<at::Tensor>& bias, int64_t act, bool compute_stats);

using SeparableGemm = at::Tensor(const at::Tensor& x, at::TensorList dw_weights, at::IntArrayRef dilations,
                                 at::TensorList mid_scales, at::TensorList mid_shifts, int64_t mid_act,
                                 at::TensorList pw_weights, std::optional<at::ScalarType> out_dtype);

using SeparableGemmBackward = SeparableGemmBackwardResult(
    const at::Tensor& g, const at::Tensor& x, at::TensorList dw_weights, at::IntArrayRef dilations,
    at::TensorList mid_scales, at::TensorList mid_shifts, int64_t mid_act, at::TensorList pw_weights,
    c10::List<bool> output_mask);

// separable_gemm_backward's weight grads (both backends' kernels end with it) from per-branch
// flat sums in the kernels' layouts, any float dtype: pw [C][O_b], dw [9][C], ms [C], msh [C]
// (an undefined sum: zeros, nothing was summed). Transposed to the weights' layouts and dtypes;
// an empty [0] tensor where the forward's entry was absent.
inline void separable_weight_grads(const checks::SepProblem& pb, const at::Tensor& x, const std::vector<at::Tensor>& pw,
                                   const std::vector<at::Tensor>& dw, const std::vector<at::Tensor>& ms,
                                   const std::vector<at::Tensor>& msh, SeparableGemmBackwardResult& r) {
  auto& [grad_x, g_dw, g_ms, g_msh, g_pw] = r;
  (void)grad_x;
  const int64_t C = pb.C;
  auto grad = [&](const at::Tensor& sum, int64_t rows, int64_t cols, const at::Tensor& like) {
    const at::Tensor s = sum.defined() ? sum : at::zeros({rows * cols}, x.options().dtype(at::kDouble));
    // Into a fresh tensor of the standard strides (.contiguous() keeps odd strides on size-1 dims).
    return at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous))
        .copy_(s.view({rows, cols}).t().reshape(like.sizes()));
  };
  const at::Tensor absent = at::empty({0}, x.options());
  for (size_t b = 0; b < pb.branches.size(); ++b) {
    const checks::SepBranchSpec& spec = pb.branches[b];
    g_pw.push_back(grad(pw[b], C, spec.out_channels, spec.pw));
    g_dw.push_back(spec.dw.defined() ? grad(dw[b], 9, C, spec.dw) : absent.clone());
    g_ms.push_back(spec.mid_scale.defined() ? grad(ms[b], 1, C, spec.mid_scale) : absent.clone());
    g_msh.push_back(spec.mid_shift.defined() ? grad(msh[b], 1, C, spec.mid_shift) : absent.clone());
  }
}

}  // namespace sig
}  // namespace aspp_fused

// ASPP_FUSED_CHECK_SIGNATURE(fn, Sig): fn has exactly the signature sig::Sig.
#define ASPP_FUSED_CHECK_SIGNATURE(fn, Sig)                                                  \
  static_assert(std::is_same_v<decltype(fn), ::aspp_fused::sig::Sig>,                       \
                #fn " must have the C++ signature aspp_fused::sig::" #Sig " (csrc/op_signatures.h): " \
                "every backend's kernel of an op must match, or the library fails to load")
