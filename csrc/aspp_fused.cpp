// Every op schema of aspp_fused, in one place. Kernels register per backend:
// csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL CPU) and csrc/cuda/*.cu (TORCH_LIBRARY_IMPL CUDA).
// Python wrappers, fake (meta) kernels and autograd live in aspp_fused/ops.py.
//
// Conventions shared by all ops (docs/DESIGN.md, "The one primitive"):
//   x            [N, C, H, W] logical shape, any strides; kernels read it as NHWC.
//   weights[b]   [O_b, C, k, k], k in {1, 3}, same dtype as x; tap (ky, kx) reads
//                x at (h + (ky - k/2) * d_b, w + (kx - k/2) * d_b), zero outside.
//   sum_mode     false: branch b writes channels [off_b, off_b + O_b) of the output
//                (off_b = O_0 + ... + O_{b-1}); true: all O_b equal, branches summed.
//   epilogue     z = acc * scale[o] + shift[o] (+ bias[n, o]); out = act(z) cast to
//                x.dtype; act 0 = none, 1 = relu. Accumulation in float (double for
//                float64 inputs); scale/shift/bias may be any float dtype.
//   stats        with compute_stats, ch_sum[o] = sum_{n,h,w} z and ch_sumsq[o] =
//                sum z^2 (float32, float64 for float64 x); else both are empty [0].
//   outputs      out is [N, O, H, W] in channels_last memory format.
#include <Python.h>
#include <torch/library.h>

#include "cuda/params.cuh"  // the GEMM tiles (plain C++)
#include "pack_cache.h"
#include "tap_plan.h"

namespace {

// cuda_plan_work: the plan the CUDA glue (csrc/cuda/tap_gemm.cu) launches for an atrous_conv
// forward, counted on the host (no GPU needed).
std::vector<int64_t> cuda_plan_work(int64_t N, int64_t C, int64_t H, int64_t W, c10::IntArrayRef ksizes,
                                    c10::IntArrayRef dilations, c10::IntArrayRef couts, bool sum_mode,
                                    int64_t elem_bytes, std::optional<bool> regions) {
  TORCH_CHECK(elem_bytes == 2 || elem_bytes == 4 || elem_bytes == 8,
              "cuda_plan_work: elem_bytes must be 2, 4 or 8, got ", elem_bytes);
  TORCH_CHECK(ksizes.size() == dilations.size() && ksizes.size() == couts.size(),
              "cuda_plan_work: ksizes, dilations and couts must have one entry per branch, got ", ksizes.size(), ", ",
              dilations.size(), " and ", couts.size());
  TORCH_CHECK(N >= 0 && C >= 0 && H >= 1 && W >= 1, "cuda_plan_work: expected N, C >= 0 and H, W >= 1, got ", N,
              ", ", C, ", ", H, ", ", W);
  std::vector<aspp_fused::PlanBranch> branches;
  for (size_t b = 0; b < ksizes.size(); ++b) {
    TORCH_CHECK(ksizes[b] == 1 || ksizes[b] == 3, "cuda_plan_work: ksizes[", b, "] must be 1 or 3, got ", ksizes[b]);
    TORCH_CHECK(dilations[b] >= 1, "cuda_plan_work: dilations[", b, "] must be >= 1, got ", dilations[b]);
    branches.push_back({static_cast<int>(ksizes[b]), aspp_fused::clamp_dilation(dilations[b], H, W),
                        static_cast<int>(C), static_cast<int>(couts[b])});
  }
  const int eb = static_cast<int>(elem_bytes);
  const int bm = aspp_fused::cuda::gemm_bm(eb), bn = aspp_fused::cuda::gemm_bn(eb), bk = aspp_fused::cuda::gemm_bk(eb);
  const aspp_fused::cuda::Tiling tl = aspp_fused::cuda::make_tiling(N, H, W, bm);
  const int mode = regions.has_value() ? (*regions ? 1 : 0) : aspp_fused::cuda_region_mode();
  std::vector<aspp_fused::PlanRegion> plan;
  const aspp_fused::PlanWork w =
      aspp_fused::use_region_plan(mode, N, H, W, branches, sum_mode, tl.tile_h, tl.tile_w, bm, bn, bk,
                                  aspp_fused::cuda::kMaxRegions, &plan)
          ? aspp_fused::region_plan_work(N, H, W, branches, plan, bm, bn, bk)
          : aspp_fused::tile_plan_work(N, H, W, tl.tile_h, tl.tile_w, branches, sum_mode, bm, bn, bk);
  return {w.dense, w.valid, w.issued};
}

}  // namespace

// `import aspp_fused._C` only has to load this library so the registrations run;
// the ops are reached through torch.ops.aspp_fused (no pybind functions).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(aspp_fused, m) {
  // Multi-branch atrous conv + epilogue (+ batch statistics of z for training).
  m.def(
      "atrous_conv(Tensor x, Tensor[] weights, int[] dilations, Tensor scale, Tensor shift, "
      "Tensor? bias, bool sum_mode, int act, bool compute_stats) -> (Tensor out, Tensor ch_sum, "
      "Tensor ch_sumsq)",
      {at::Tag::pt2_compliant_tag});
  // The backward of atrous_conv is no op of its own: aspp_fused/_autograd.py writes it once, in
  // Python, over the three primitives below (tap_gemm, epilogue_backward, tap_wgrad), which
  // every backend implements.
  //
  // tap_gemm: the one primitive, raw (no epilogue), and its adjoint.
  //   adjoint false  x [N, C, H, W]: out[n, off_b + o, p] = sum_{c, tap} x[n, c, p + tap d_b] W_b[o, c, tap]
  //                  (zero outside the image; sum mode: the branches summed into out[n, o, p]);
  //                  out has O channels. This is atrous_conv's acc.
  //   adjoint true   x [N, O, H, W], a gradient of acc: out[n, c, p] = sum_{b, o, tap}
  //                  x[n, off_b + o, p - tap d_b] W_b[o, c, tap] (sum mode: off_b = 0); out has
  //                  C channels. This is the gradient of acc with respect to the input (dgrad).
  //   x has the weights' dtype, or (adjoint) the accumulation dtype of the weights' dtype (the CPU
  //   backend's g_acc); out is channels_last in out_dtype (None: x's dtype). Accumulation as
  //   atrous_conv.
  m.def(
      "tap_gemm(Tensor x, Tensor[] weights, int[] dilations, bool sum_mode, bool adjoint, "
      "ScalarType? out_dtype=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // epilogue_backward: the backward of atrous_conv's epilogue (and separable_conv's).
  //   g_z = grad_out * act'(z) + grad_sum[o] + 2 z grad_sumsq[o] (the last two only when given);
  //   relu' is (z > 0). With acc (the raw GEMM, [N, O, H, W] in the accumulation dtype) z is
  //   acc * scale[o] + shift[o] (+ bias[n, o]); without, out (the forward's output) stands in:
  //   z itself with act none, the relu mask (out > 0) with relu. acc is required for grad_scale
  //   and for relu with grad_sumsq (relu hides the negative z).
  //   output_mask = [g_acc, epilogue]; what is not asked for comes back empty ([0]):
  //   g_acc = g_z * scale[o], [N, O, H, W] channels_last, in the dtype the backend's tap GEMMs
  //     read: the accumulation dtype on CPU, out's dtype on CUDA (tensor cores);
  //   grad_scale[o] = sum g_z * acc, grad_shift[o] = sum g_z, grad_bias[n, o] = sum_hw g_z (empty
  //     without bias), each in the dtype of the tensor it belongs to.
  m.def(
      "epilogue_backward(Tensor grad_out, Tensor? grad_sum, Tensor? grad_sumsq, Tensor out, Tensor? acc, "
      "Tensor scale, Tensor shift, Tensor? bias, int act, bool[] output_mask) -> (Tensor g_acc, "
      "Tensor grad_scale, Tensor grad_shift, Tensor grad_bias)",
      {at::Tag::pt2_compliant_tag});
  // tap_wgrad: the weights' gradient of tap_gemm (adjoint false): grad_W_b[o, c, tap] =
  //   sum_{n, p} g[n, off_b + o, p] x[n, c, p + tap d_b] over the pixels whose source is inside
  //   the image. x [N, C, H, W] has the weights' dtype; g [N, O, H, W] as tap_gemm's adjoint x.
  //   weights give the shapes and dtypes only; grads are contiguous, in the weights' dtype.
  m.def(
      "tap_wgrad(Tensor x, Tensor g, Tensor[] weights, int[] dilations, bool sum_mode) -> Tensor[]",
      {at::Tag::pt2_compliant_tag});
  // Separable atrous conv, concat mode, one launch for all branches. In dw_weights,
  // mid_scales and mid_shifts an empty 1-D tensor ([0]) means "absent" (not Tensor?[]:
  // torch.library's autograd treats a list holding None as one opaque leaf). Branch b:
  //   d_b = depthwise 3x3 of x at dilation d_b with dw_weights[b] [C, 1, 3, 3]
  //         (d_b = x when dw_weights[b] is absent: a plain 1x1 branch)
  //   m_b = mid_act(d_b * mid_scales[b][c] + mid_shifts[b][c]) when mid_scales[b] is
  //         present (only allowed with a depthwise), else d_b; computed in float and
  //         rounded to x.dtype (the kernels feed it to the tensor-core GEMM in x.dtype)
  //   acc = pw_weights[b] [O_b, C, 1, 1] @ m_b, then the epilogue/stats of atrous_conv.
  m.def(
      "separable_conv(Tensor x, Tensor[] dw_weights, int[] dilations, Tensor[] mid_scales, "
      "Tensor[] mid_shifts, int mid_act, Tensor[] pw_weights, Tensor scale, Tensor shift, "
      "Tensor? bias, int act, bool compute_stats) -> (Tensor out, Tensor ch_sum, Tensor ch_sumsq)",
      {at::Tag::pt2_compliant_tag});
  // separable_conv's backward is, like atrous_conv's, one formula (aspp_fused/_autograd.py) over
  // primitives: separable_gemm (its acc, when needed), epilogue_backward, separable_gemm_backward.
  //
  // separable_gemm: separable_conv's acc, raw (no epilogue): branch b's channels of out are
  //   pw_weights[b] @ m_b, m_b as separable_conv computes it (rounded to x.dtype); out [N, O, H, W]
  //   channels_last in out_dtype (None: x's dtype).
  m.def(
      "separable_gemm(Tensor x, Tensor[] dw_weights, int[] dilations, Tensor[] mid_scales, "
      "Tensor[] mid_shifts, int mid_act, Tensor[] pw_weights, ScalarType? out_dtype=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // separable_gemm_backward: the gradients of separable_gemm's inputs from g, a gradient of its
  //   output ([N, O, H, W], in x's dtype or its accumulation dtype, as tap_gemm's adjoint reads
  //   it): through the pointwise GEMM (the rounding of m to x.dtype taken as the identity), the
  //   mid affine / act and the depthwise. output_mask = [input, weights (dw, mid scale/shift,
  //   pw)]; lists have one entry per branch, and an entry whose forward input was absent, or a
  //   grad not asked for, is an empty [0] tensor ([] for the lists when weights are not asked for).
  //   Grads have the dtype of the tensor they belong to; grad_x is channels_last.
  m.def(
      "separable_gemm_backward(Tensor g, Tensor x, Tensor[] dw_weights, int[] dilations, Tensor[] mid_scales, "
      "Tensor[] mid_shifts, int mid_act, Tensor[] pw_weights, bool[] output_mask) -> (Tensor grad_x, "
      "Tensor[] grad_dw_weights, Tensor[] grad_mid_scales, Tensor[] grad_mid_shifts, Tensor[] grad_pw_weights)",
      {at::Tag::pt2_compliant_tag});
  // The CPU and CUDA kernels' packed-weight cache (csrc/pack_cache.h), for aspp_fused.clear_caches
  // and the tests: info = [hits, packs, entries] since load or the last clear; clear drops all;
  // drop drops the entries and keeps the counts (the optimizer step hook, aspp_fused/nn/_fold_cache.py).
  m.def("pack_cache_info() -> int[]", [] { return aspp_fused::pack_cache::info(); });
  m.def("pack_cache_clear() -> ()", [] { aspp_fused::pack_cache::clear(); });
  m.def("pack_cache_drop() -> ()", [] { aspp_fused::pack_cache::drop(); });
  // The multiply-adds the CUDA backend's forward plan issues for one atrous_conv call, counted
  // on the host from the plan the CUDA glue launches (csrc/tap_plan.h; no GPU needed):
  // [dense, valid, issued] for an N x C x H x W input and branches of ksizes[b] x ksizes[b] taps
  // at dilations[b] with couts[b] outputs; elem_bytes 2 / 4 / 8 picks the GEMM tile
  // (csrc/cuda/params.cuh); regions: True the concat forward's exact-region plan, False its tile
  // plan, None the glue's choice (ASPP_FUSED_CUDA_REGIONS: 1, 0, or unset / auto: the plan that
  // issues fewer MACs; a region plan of more than kMaxRegions regions: the tile plan). Sum mode
  // too (the v2 head; the backward's dgrad is this sum with negated dilations). python -m
  // benchmarks --work-only reports it.
  m.def(
      "cuda_plan_work(int N, int C, int H, int W, int[] ksizes, int[] dilations, int[] couts, bool sum_mode, "
      "int elem_bytes, bool? regions=None) -> int[]",
      &cuda_plan_work);
}
