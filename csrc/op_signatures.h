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

}  // namespace sig
}  // namespace aspp_fused

// ASPP_FUSED_CHECK_SIGNATURE(fn, Sig): fn has exactly the signature sig::Sig.
#define ASPP_FUSED_CHECK_SIGNATURE(fn, Sig)                                                  \
  static_assert(std::is_same_v<decltype(fn), ::aspp_fused::sig::Sig>,                       \
                #fn " must have the C++ signature aspp_fused::sig::" #Sig " (csrc/op_signatures.h): " \
                "every backend's kernel of an op must match, or the library fails to load")
