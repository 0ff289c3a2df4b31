// Host side shared by the CUDA launch glue (csrc/cuda/*.cu): the launch helper (current
// stream, dynamic shared memory opt-in, C10_CUDA_KERNEL_LAUNCH_CHECK after every launch),
// dtype mapping, and the runners of the kernels that more than one op uses.
//
// How a launch reaches the GPU is cuda/launch.h's; the host emulator (tools/cuda_emu) puts its
// own cuda/launch.h ahead on the include path, so this same glue runs on CPU tensors there and
// the ops register as aspp_fused_emu::* (the whole CUDA path, packing, tiling and kernels,
// checked against the CPU backend without a GPU).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "common.cuh"
#include "params.cuh"

#include "cuda/launch.h"  // current stream, device guard, SM count, launch helper, op registration
#include "pack_cache.h"
#include "tap_plan.h"  // tap ranges, the exact-region plan, clamp_dilation

namespace aspp_fused {
namespace cuda {

// c10 scalar types -> CUDA element types.
template <typename scalar_t>
struct DevType {
  using type = scalar_t;
};
template <>
struct DevType<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct DevType<at::Half> {
  using type = __half;
};

using checks::acc_dtype;  // the one accumulation-dtype rule (csrc/checks.h)


// The TF32 decision for float32 inputs, as PyTorch's convolutions make it. The query has had
// three shapes across the supported torch releases, told apart here by overload resolution
// rather than by version numbers:
//   allowTF32CuDNN(std::optional<Float32Op>)  the fp32_precision API with an enum: ask for CONV
//                                              (the bare query raises once conv and rnn differ)
//   allowTF32CuDNN(const std::string& op)      the same API with strings: ask for "conv"
//   allowTF32CuDNN()                           older releases: the one cudnn.allow_tf32 flag
namespace tf32_query {
template <class Ctx, class Op>
bool conv_enum(const Ctx& c, bool (Ctx::*)(std::optional<Op>) const) {
  return c.allowTF32CuDNN(Op::CONV);
}
template <class Ctx>
auto conv(const Ctx& c, int) -> decltype(conv_enum(c, &Ctx::allowTF32CuDNN)) {
  return conv_enum(c, &Ctx::allowTF32CuDNN);
}
template <class Ctx>
auto conv(const Ctx& c, long) -> decltype(c.allowTF32CuDNN(std::string("conv"))) {
  return c.allowTF32CuDNN(std::string("conv"));
}
template <class Ctx>
bool conv(const Ctx& c, ...) {
  return c.allowTF32CuDNN();
}
}  // namespace tf32_query

// pack_cache::get for the CUDA glue: the entry is keyed by the current device and stream (read only
// in stream order after the pack that wrote it) and bypassed while a CUDA graph is captured (a
// replay packs the weights of its time).
template <typename V, typename F>
std::shared_ptr<const V> cached_pack(const std::string& what, const std::vector<at::Tensor>& sources, F make) {
  return pack_cache::get<V>(what + "/" + stream_key(), sources, make, /*use=*/!stream_capturing());
}

inline bool allow_tf32() { return tf32_query::conv(at::globalContext(), 0); }

// Calls fn(T{}) with the CUDA element type T of `dtype` (bf16, fp16, fp32, fp64); any other
// dtype is an error of `op`.
template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kBFloat16:
      fn(__nv_bfloat16{});
      break;
    case at::kHalf:
      fn(__half{});
      break;
    case at::kFloat:
      fn(float{});
      break;
    case at::kDouble:
      fn(double{});
      break;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", dtype);
  }
}

template <Math M>
using MathTag = std::integral_constant<Math, M>;

// dispatch_dtype for the GEMMs: calls fn(T{}, MathTag<M>{}) with the math of T: mma.sync for
// bf16 / fp16, TF32 mma.sync or FFMA for fp32 (as allow_tf32() says), FFMA for fp64.
template <typename Fn>
void dispatch_gemm_math(at::ScalarType dtype, const char* op, Fn&& fn) {
  dispatch_dtype(dtype, op, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float>) {
      if (allow_tf32()) {
        fn(tag, MathTag<Math::kTf32>{});
      } else {
        fn(tag, MathTag<Math::kFfma>{});
      }
    } else if constexpr (std::is_same_v<T, double>) {
      fn(tag, MathTag<Math::kFfma>{});
    } else {
      fn(tag, MathTag<Math::kMma16>{});
    }
  });
}

// A tensor's data as a typed pointer (nullptr for an undefined tensor).
template <typename P>
inline P* ptr(const at::Tensor& t) {
  return t.defined() ? static_cast<P*>(t.data_ptr()) : nullptr;
}

// Elements per 16-byte copy, and whether a [pixels][stride] tensor read from channel offsets
// `offs` allows 16-byte copies.
inline int vec_elems(at::ScalarType t) { return 16 / static_cast<int>(c10::elementSize(t)); }
inline bool vec_ok(const void* base, int64_t stride, const std::vector<int64_t>& offs, int vec) {
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0 || stride % vec != 0) return false;
  for (int64_t o : offs)
    if (o % vec != 0) return false;
  return true;
}
inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Weight tiles are always copied with 16-byte cp.async (their rows are padded to 16 bytes), so a
// weight buffer must start 16-byte aligned. Buffers packed by at::cat are fresh allocations; one
// that may still be the caller's storage (a contiguous view at any offset, e.g. into one flat
// parameter buffer) is copied when it is not aligned: a misaligned cp.async is a sticky
// cudaErrorMisalignedAddress that ends the CUDA context.
inline at::Tensor aligned16(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}
inline void check_aligned16(const void* p, const char* what) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0, "aspp_fused (CUDA): internal error: ", what,
              " is not 16-byte aligned");
}

// Pixel chunks per image for the channel-reduction kernels: enough blocks for the GPU.
inline ChannelGrid channel_grid(int64_t N, int64_t HW, int64_t C) {
  ChannelGrid cg;
  cg.N = static_cast<int>(N);
  cg.HW = static_cast<int>(HW);
  cg.C = static_cast<int>(C);
  cg.cblocks = static_cast<int>((C + kRedChannels - 1) / kRedChannels);
  const int64_t base = std::max<int64_t>(1, N * cg.cblocks);
  const int64_t want = (4 * static_cast<int64_t>(num_sms()) + base - 1) / base;
  cg.chunks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, (HW + 63) / 64)));
  return cg;
}
inline int64_t channel_grid_blocks(const ChannelGrid& cg) {
  return static_cast<int64_t>(cg.cblocks) * cg.N * cg.chunks;
}

// ------------------------------------------------------------------------------------------
// The outputs of a forward op (csrc/aspp_fused.cpp): out [N, O, H, W] channels_last in x's
// dtype, and with compute_stats the per-channel sums the epilogue's atomics add up in double.

struct ForwardOutputs {
  at::Tensor out, ch_sum, ch_sumsq;
  bool stats;

  ForwardOutputs(const at::Tensor& x, int64_t N, int64_t O, int64_t H, int64_t W, bool compute_stats)
      : out(at::empty({N, O, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast))),
        stats(compute_stats) {
    if (stats) {
      ch_sum = at::zeros({O}, x.options().dtype(at::kDouble));
      ch_sumsq = at::zeros({O}, x.options().dtype(at::kDouble));
    }
  }
  // Where the epilogue adds the statistics (nullptr: none).
  void into(Epilogue& ep) const {
    ep.ch_sum = stats ? ch_sum.data_ptr<double>() : nullptr;
    ep.ch_sumsq = stats ? ch_sumsq.data_ptr<double>() : nullptr;
  }
  // The op's result: the statistics in the accumulation dtype, or empty [0] tensors.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result(at::ScalarType acc) const {
    if (!stats) {
      return {out, at::empty({0}, out.options().dtype(acc)), at::empty({0}, out.options().dtype(acc))};
    }
    return {out, ch_sum.to(acc), ch_sumsq.to(acc)};
  }
};

// ------------------------------------------------------------------------------------------
// Runners shared by the ops (defined in tap_gemm.cu and depthwise_epilogue.cu).

// The tap-list implicit GEMM. `in` and `out` are NHWC storage ([N*H*W][stride]); `out` is of
// the input dtype or (out_acc) of its accumulation type. Any number of branches: concat mode
// splits them over launches of <= kMaxBranches; sum mode with more accumulates raw partial
// sums in an acc-type buffer and applies the epilogue after.
struct TapGemmCall {
  at::ScalarType dtype;  // element type of `in` and `w`
  const void* in;
  int64_t in_stride;
  const void* w;
  std::vector<GemmBranch> branches;
  bool sum_mode;
  void* out;
  int64_t out_stride;
  bool out_acc;
  int64_t out_channels;  // channels of out written by this call (sum mode: the common cout)
  Epilogue ep;
  int64_t N, H, W;
};
void run_tap_gemm(const TapGemmCall& call);

// out[p][c] of the epilogue backward (see EpilogueBwdParams); pointers may be null.
void run_epilogue_backward(at::ScalarType dtype, const EpilogueBwdParams& p);
void run_depthwise(at::ScalarType dtype, bool in_is_acc, const DepthwiseParams& p);
void run_mid_backward(at::ScalarType dtype, const MidBwdParams& p);
void run_dw_wgrad(at::ScalarType dtype, const DwWgradParams& p);
// wgrad over jobs (any number: split over launches); ws is the acc-type workspace.
void run_wgrad(at::ScalarType dtype, const void* x, int64_t x_stride, int64_t C, const void* g, int64_t g_stride,
               void* ws, int64_t N, int64_t H, int64_t W, const std::vector<WgradJob>& jobs);

}  // namespace cuda
}  // namespace aspp_fused
