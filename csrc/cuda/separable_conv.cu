// CUDA launch glue of aspp_fused::separable_conv and of its backward's primitives (semantics: the
// schema comments in csrc/aspp_fused.cpp; the formula: aspp_fused/_autograd.py; the CPU backend
// csrc/cpu/separable_conv.cpp, whose checks, output dtypes, memory formats and empty placeholders
// this file mirrors).
//
//   separable_conv           one launch of separable_gemm_kernel for all branches
//                            (separable_gemm.cuh): depthwise prologue (acc type, valid taps only)
//                            -> mid affine + act -> rounded to x.dtype in shared memory ->
//                            pointwise GEMM on tensor cores -> epilogue + statistics
//   separable_gemm           the same launch, raw (the backward's acc, written fp32)
//   separable_gemm_backward  per branch, from g_acc (x dtype; epilogue_backward's, atrous_conv.cu):
//             3. the GEMM operand m (depthwise + mid, as the forward rounds it) and the raw
//                depthwise d (depthwise_kernel) when wgrad / the mid backward need them
//             4. grad_pw = m^T g_acc (wgrad kernel, one 1x1 tap)
//             5. g_m = g_acc pw (tap-list GEMM, one 1x1 branch, fp32 out); a plain branch
//                accumulates it straight into grad_x
//             6. mid backward (in place: g_m -> g_d, grad_mid_scale / shift)
//             7. grad_dw (dw_wgrad_kernel) and grad_x += depthwise^T(g_d) (depthwise_kernel
//                with negated taps)
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "op_signatures.h"
#include "glue.h"
#include "separable_gemm.cuh"

namespace aspp_fused {
namespace cuda {
namespace {

using checks::SepBranchSpec;
using checks::SepProblem;
const auto kCL = at::MemoryFormat::ChannelsLast;

// Parameters of the fused kernel: the weights packed once per parameter version (pack_cache.h),
// the mid affine and the branch descriptors (which depend on the map size) per call.
struct SepPacked {
  at::Tensor pw;   // [C][ldb_b] slabs, x dtype
  at::Tensor dw;   // [9][C] slabs, acc type (undefined when no branch has a depthwise)
  at::Tensor mid;  // [scale C | shift C] per branch with a mid affine, acc type
  std::vector<SepBranch> br;
};

struct SepWeights {
  at::Tensor pw, dw;
  std::vector<int64_t> pw_off, dw_off, ldb;  // per branch; dw_off -1 without a depthwise
};

std::shared_ptr<const SepWeights> packed_weights(const SepProblem& pb, at::ScalarType dtype) {
  std::vector<at::Tensor> sources;
  for (const SepBranchSpec& spec : pb.branches) {
    sources.push_back(spec.pw);
    sources.push_back(spec.dw);
  }
  return cached_pack<SepWeights>("cuda/separable/" + std::string(c10::toString(dtype)), sources, [&] {
    const at::ScalarType acc = acc_dtype(dtype);
    const int vec = vec_elems(dtype);
    SepWeights w;
    std::vector<at::Tensor> pws, dws;
    int64_t pw_off = 0, dw_off = 0;
    for (const SepBranchSpec& spec : pb.branches) {
      const int64_t Ob = spec.out_channels, ldb = round_up(Ob, vec);
      at::Tensor pw = spec.pw.reshape({Ob, pb.C}).t();  // [C, O_b]
      if (ldb > Ob) pw = at::constant_pad_nd(pw, {0, ldb - Ob}, 0);
      pws.push_back(pw.contiguous().reshape({-1}));
      w.pw_off.push_back(pw_off);
      w.ldb.push_back(ldb);
      pw_off += pws.back().numel();
      w.dw_off.push_back(spec.dw.defined() ? dw_off : -1);
      if (spec.dw.defined()) {
        dws.push_back(spec.dw.reshape({pb.C, 9}).to(acc).t().contiguous().reshape({-1}));
        dw_off += 9 * pb.C;
      }
    }
    w.pw = at::cat(pws);
    if (!dws.empty()) w.dw = at::cat(dws);
    return w;
  });
}

SepPacked pack_separable(const SepProblem& pb, at::ScalarType dtype) {
  const at::ScalarType acc = acc_dtype(dtype);
  const std::shared_ptr<const SepWeights> w = packed_weights(pb, dtype);
  SepPacked pk;
  pk.pw = w->pw;
  pk.dw = w->dw;
  std::vector<at::Tensor> mids;
  int64_t mid_off = 0;
  for (size_t i = 0; i < pb.branches.size(); ++i) {
    const SepBranchSpec& spec = pb.branches[i];
    SepBranch b{};
    b.pw_off = w->pw_off[i];
    b.ldb = static_cast<int>(w->ldb[i]);
    b.cout = static_cast<int>(spec.out_channels);
    b.out_off = static_cast<int>(spec.offset);
    b.dilation = clamp_dilation(spec.dilation, pb.H, pb.W);
    b.dw_off = w->dw_off[i];
    b.mid_off = -1;
    if (spec.mid_scale.defined()) {
      mids.push_back(spec.mid_scale.to(acc).contiguous());
      mids.push_back(spec.mid_shift.to(acc).contiguous());
      b.mid_off = mid_off;
      mid_off += 2 * pb.C;
    }
    pk.br.push_back(b);
  }
  if (!mids.empty()) pk.mid = at::cat(mids);
  return pk;
}

template <typename T, typename OutT, Math M>
void launch_separable(const SepGemmParams& p, bool vec_a) {
  using Cfg = GemmCfg<T, M>;
  const int64_t grid = static_cast<int64_t>(p.tl.N) * p.tl.tiles_per_image * p.ncol;
  constexpr int smem = separable_smem_bytes<Cfg, T>();
  if (vec_a) {
    launch(separable_gemm_kernel<T, OutT, M, true>, grid, dim3(Cfg::kThreads), smem, p);
  } else {
    launch(separable_gemm_kernel<T, OutT, M, false>, grid, dim3(Cfg::kThreads), smem, p);
  }
}

template <typename T, Math M>
void run_separable_typed(const SepProblem& pb, const at::Tensor& xc, const SepPacked& pk, const Epilogue& ep,
                         void* out, int64_t out_stride, bool out_acc) {
  using Cfg = GemmCfg<T, M>;
  using A = acc_t<T>;
  SepGemmParams p{};
  p.x = xc.data_ptr();
  p.C = static_cast<int>(pb.C);
  p.pw = pk.pw.data_ptr();
  check_aligned16(p.pw, "the packed pointwise weights");
  p.dw = ptr<void>(pk.dw);
  p.mid = ptr<void>(pk.mid);
  p.out = out;
  p.out_stride = out_stride;
  p.tl = make_tiling(static_cast<int>(pb.N), static_cast<int>(pb.H), static_cast<int>(pb.W), Cfg::BM);
  p.mid_act = pb.mid_act;
  p.ep = ep;
  const bool vec_a = vec_ok(xc.data_ptr(), pb.C, {pb.C}, Cfg::kVec);
  const int nb = static_cast<int>(pk.br.size());
  for (int g0 = 0; g0 < nb; g0 += kMaxBranches) {
    const int gn = std::min(kMaxBranches, nb - g0);
    p.nbranch = gn;
    p.cb_start[0] = 0;
    for (int i = 0; i < gn; ++i) {
      p.br[i] = pk.br[g0 + i];
      p.cb_start[i + 1] = p.cb_start[i] + (p.br[i].cout + Cfg::BN - 1) / Cfg::BN;
    }
    p.ncol = p.cb_start[gn];
    if (out_acc) {
      launch_separable<T, A, M>(p, vec_a);
    } else {
      launch_separable<T, T, M>(p, vec_a);
    }
  }
}

void run_separable(const SepProblem& pb, const at::Tensor& xc, const SepPacked& pk, const Epilogue& ep, void* out,
                   int64_t out_stride, bool out_acc) {
  if (pb.N * pb.H * pb.W == 0) return;
  dispatch_gemm_math(xc.scalar_type(), "separable_conv", [&](auto tag, auto math) {
    run_separable_typed<decltype(tag), decltype(math)::value>(pb, xc, pk, ep, out, out_stride, out_acc);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> separable_conv_cuda(
    const at::Tensor& x, at::TensorList dw_weights, at::IntArrayRef dilations, at::TensorList mid_scales,
    at::TensorList mid_shifts, int64_t mid_act, at::TensorList pw_weights, const at::Tensor& scale,
    const at::Tensor& shift, const std::optional<at::Tensor>& bias, int64_t act, bool compute_stats) {
  const SepProblem pb = checks::check_separable_args("separable_conv", x, dw_weights, dilations, mid_scales,
                                                          mid_shifts, mid_act, pw_weights, scale, shift, bias, act);
  DeviceGuard guard(x.device());
  check_device("separable_conv");
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  const at::Tensor xc = x.contiguous(kCL);
  const ForwardOutputs res(x, pb.N, pb.O, pb.H, pb.W, compute_stats);
  if (pb.N * pb.H * pb.W > 0 && pb.O > 0) {
    const SepPacked pk = pack_separable(pb, x.scalar_type());
    const at::Tensor sc = scale.to(acc).contiguous(), sh = shift.to(acc).contiguous();
    const at::Tensor bi = pb.bias.defined() ? pb.bias.to(acc).contiguous() : at::Tensor();
    Epilogue ep{};
    ep.scale = sc.data_ptr();
    ep.shift = sh.data_ptr();
    ep.bias = ptr<void>(bi);
    res.into(ep);
    ep.o_total = static_cast<int>(pb.O);
    ep.act = pb.act;
    run_separable(pb, xc, pk, ep, res.out.data_ptr(), pb.O, false);
  }
  return res.result(acc);
}

// --------------------------------------------------------------------------- the backward's primitives
// separable_conv's backward is written once, in aspp_fused/_autograd.py, over separable_gemm,
// epilogue_backward (atrous_conv.cu) and separable_gemm_backward.

// separable_gemm: the fused separable GEMM with no epilogue (raw), written in the accumulation
// type or in x's dtype.
at::Tensor separable_gemm_cuda(const at::Tensor& x, at::TensorList dw_weights, at::IntArrayRef dilations,
                               at::TensorList mid_scales, at::TensorList mid_shifts, int64_t mid_act,
                               at::TensorList pw_weights, std::optional<at::ScalarType> out_dtype) {
  const SepProblem pb = checks::check_separable_gemm_args("separable_gemm", x, dw_weights, dilations, mid_scales,
                                                          mid_shifts, mid_act, pw_weights, out_dtype);
  DeviceGuard guard(x.device());
  check_device("separable_gemm");
  const at::ScalarType dtype = x.scalar_type(), acc = acc_dtype(dtype);
  const at::ScalarType want = out_dtype.value_or(dtype);
  const bool out_acc = want == acc;
  at::Tensor out = at::empty({pb.N, pb.O, pb.H, pb.W}, x.options().dtype(out_acc ? acc : dtype).memory_format(kCL));
  if (pb.N * pb.H * pb.W == 0 || pb.O == 0) return out.zero_().to(want);
  const at::Tensor xc = x.contiguous(kCL);
  const SepPacked pk = pack_separable(pb, dtype);
  Epilogue ep{};
  ep.raw = 1;
  ep.o_total = static_cast<int>(pb.O);
  run_separable(pb, xc, pk, ep, out.data_ptr(), pb.O, out_acc);
  return out.scalar_type() == want ? out : out.to(want);
}

// separable_gemm_backward: per branch, from g (the gradient of acc, read in x's dtype):
//   3. m (the GEMM operand) and d (the raw depthwise) of a depthwise branch (depthwise_kernel)
//   4. grad_pw = wgrad GEMM over m (or x), one 1x1 tap
//   5. g_m = g_b @ pw_b, a 1x1 tap GEMM (a plain branch accumulates it straight into grad_x)
//   6. the mid affine / act backward in place (g_m -> g_d)
//   7. grad_dw (dw_wgrad_kernel) and grad_x += depthwise^T(g_d) (depthwise_kernel, negated taps)
sig::SeparableGemmBackwardResult separable_gemm_backward_cuda(const at::Tensor& g, const at::Tensor& x,
                                                              at::TensorList dw_weights, at::IntArrayRef dilations,
                                                              at::TensorList mid_scales, at::TensorList mid_shifts,
                                                              int64_t mid_act, at::TensorList pw_weights,
                                                              c10::List<bool> output_mask) {
  const char* op = "separable_gemm_backward";
  const SepProblem pb = checks::check_separable_gemm_backward_args(op, g, x, dw_weights, dilations, mid_scales,
                                                                   mid_shifts, mid_act, pw_weights, output_mask.size());
  const bool f_input = output_mask.get(0), f_weights = output_mask.get(1);
  DeviceGuard guard(x.device());
  check_device(op);

  const int64_t N = pb.N, C = pb.C, H = pb.H, W = pb.W, O = pb.O, P = N * H * W;
  const size_t nb = pb.branches.size();
  const at::ScalarType dtype = x.scalar_type(), acc = acc_dtype(dtype);
  auto empty_like = [](const at::Tensor& t) { return at::empty({0}, t.options()); };

  at::Tensor grad_x = empty_like(x);
  if (!(f_input || f_weights)) return {grad_x, {}, {}, {}, {}};

  const at::TensorOptions acc_opts = x.options().dtype(acc);
  const at::TensorOptions dbl_opts = x.options().dtype(at::kDouble);
  at::Tensor gx_acc = f_input ? at::zeros({P, C}, acc_opts) : at::Tensor();  // [N*H*W][C]
  std::vector<at::Tensor> ws_pw(nb), ws_dw(nb), ws_mid(nb);

  if (P > 0 && O > 0) {
    const at::Tensor xc = x.contiguous(kCL);
    const SepPacked pk = pack_separable(pb, dtype);
    const at::Tensor g_acc = g.to(dtype).contiguous(kCL);  // [N*H*W][O]

    // 3-7, per branch.
    bool any_dw = false, any_mid = false;
    for (const SepBranchSpec& spec : pb.branches) {
      any_dw = any_dw || spec.dw.defined();
      any_mid = any_mid || spec.mid_scale.defined();
    }
    const bool need_gm_dw = f_input || f_weights;  // a depthwise branch needs g_m for either
    at::Tensor d_buf = (any_mid && need_gm_dw) ? at::empty({P, C}, acc_opts) : at::Tensor();
    at::Tensor m_buf = (any_dw && f_weights) ? at::empty({P, C}, x.options()) : at::Tensor();
    at::Tensor gm_buf = (any_dw && need_gm_dw) ? at::empty({P, C}, acc_opts) : at::Tensor();
    const int vec = vec_elems(dtype);

    for (size_t b = 0; b < nb; ++b) {
      const SepBranchSpec& spec = pb.branches[b];
      const SepBranch& kb = pk.br[b];
      const bool has_dw = spec.dw.defined(), has_mid = spec.mid_scale.defined();
      const int64_t Ob = spec.out_channels;
      const bool need_gm = f_input || (f_weights && has_dw);
      const void* dw_b = has_dw ? static_cast<const char*>(pk.dw.data_ptr()) + kb.dw_off * pk.dw.element_size()
                                : nullptr;
      const void* ms_b = has_mid ? static_cast<const char*>(pk.mid.data_ptr()) + kb.mid_off * pk.mid.element_size()
                                 : nullptr;
      const void* msh_b = has_mid ? static_cast<const char*>(ms_b) + C * pk.mid.element_size() : nullptr;

      // 3. m (GEMM operand) and d (raw depthwise) of a depthwise branch.
      const bool want_d = has_mid && need_gm, want_m = f_weights && has_dw;
      if (has_dw && (want_d || want_m)) {
        DepthwiseParams p{};
        p.in = xc.data_ptr();
        p.w = dw_b;
        p.mid_scale = ms_b;
        p.mid_shift = msh_b;
        p.mid_act = pb.mid_act;
        p.out_acc = want_d ? d_buf.data_ptr() : nullptr;
        p.out_m = want_m ? m_buf.data_ptr() : nullptr;
        p.N = static_cast<int>(N);
        p.H = static_cast<int>(H);
        p.W = static_cast<int>(W);
        p.C = static_cast<int>(C);
        p.step = kb.dilation;
        run_depthwise(dtype, false, p);
      }

      // 4. grad_pw[c][o] = sum_p m[p][c] g_acc[p][off + o].
      if (f_weights) {
        ws_pw[b] = at::zeros({C * Ob}, acc_opts);
        WgradJob j{};
        j.g_off = static_cast<int>(spec.offset);
        j.cout = static_cast<int>(Ob);
        run_wgrad(dtype, has_dw ? m_buf.data_ptr() : xc.data_ptr(), C, C, g_acc.data_ptr(), O, ws_pw[b].data_ptr(),
                  N, H, W, {j});
      }
      if (!need_gm || C == 0) continue;

      // 5. g_m = g_acc[:, off:off+O_b] @ pw_b: a one-branch 1x1 tap GEMM, weights [O_b][C].
      at::Tensor pw_t = spec.pw.reshape({Ob, C});
      const int64_t ldb = round_up(C, vec);
      if (ldb > C) pw_t = at::constant_pad_nd(pw_t, {0, ldb - C}, 0);
      pw_t = aligned16(pw_t);
      TapGemmCall call{};
      call.dtype = dtype;
      call.in = g_acc.data_ptr();
      call.in_stride = O;
      call.w = pw_t.data_ptr();
      GemmBranch gb{};
      gb.w_off = 0;
      gb.k = 1;
      gb.step = 1;
      gb.in_off = static_cast<int>(spec.offset);
      gb.cin = static_cast<int>(Ob);
      gb.cout = static_cast<int>(C);
      gb.ldb = static_cast<int>(ldb);
      gb.out_off = 0;
      call.branches.push_back(gb);
      call.sum_mode = true;
      call.out_stride = C;
      call.out_acc = true;
      call.out_channels = C;
      call.ep.raw = 1;
      call.ep.o_total = static_cast<int>(C);
      call.N = N;
      call.H = H;
      call.W = W;
      if (!has_dw) {
        // A plain branch: g_m is its grad_x contribution.
        call.out = gx_acc.data_ptr();
        call.ep.accumulate = 1;
        run_tap_gemm(call);
        continue;
      }
      call.out = gm_buf.data_ptr();
      run_tap_gemm(call);

      // 6. Through the mid affine / act: g_m -> g_d in place.
      if (has_mid) {
        if (f_weights) ws_mid[b] = at::zeros({2 * C}, dbl_opts);
        MidBwdParams p{};
        p.cg = channel_grid(N, H * W, C);
        p.d = d_buf.data_ptr();
        p.g = gm_buf.data_ptr();
        p.mid_scale = ms_b;
        p.mid_shift = msh_b;
        p.mid_act = pb.mid_act;
        p.g_ms = f_weights ? ws_mid[b].data_ptr<double>() : nullptr;
        p.g_msh = f_weights ? ws_mid[b].data_ptr<double>() + C : nullptr;
        run_mid_backward(dtype, p);
      }

      // 7. grad_dw and grad_x += depthwise^T(g_d).
      if (f_weights) {
        ws_dw[b] = at::zeros({9 * C}, dbl_opts);
        DwWgradParams p{};
        p.cg = channel_grid(N, H * W, C);
        p.H = static_cast<int>(H);
        p.W = static_cast<int>(W);
        p.dilation = kb.dilation;
        p.g = gm_buf.data_ptr();
        p.x = xc.data_ptr();
        p.out = ws_dw[b].data_ptr<double>();
        run_dw_wgrad(dtype, p);
      }
      if (f_input) {
        DepthwiseParams p{};
        p.in = gm_buf.data_ptr();
        p.w = dw_b;
        p.out_acc = gx_acc.data_ptr();
        p.accumulate = 1;
        p.N = static_cast<int>(N);
        p.H = static_cast<int>(H);
        p.W = static_cast<int>(W);
        p.C = static_cast<int>(C);
        p.step = -kb.dilation;
        run_depthwise(dtype, true, p);
      }
    }
  }

  if (f_input) {
    // [N*H*W][C] -> [N, C, H, W] channels_last in x.dtype.
    grad_x = gx_acc.view({N, H, W, C}).permute({0, 3, 1, 2}).to(dtype).contiguous(kCL);
  }
  sig::SeparableGemmBackwardResult res{grad_x, {}, {}, {}, {}};
  if (f_weights) {
    std::vector<at::Tensor> ms(nb), msh(nb);
    for (size_t b = 0; b < nb; ++b) {
      if (!ws_mid[b].defined()) continue;
      ms[b] = ws_mid[b].narrow(0, 0, C);
      msh[b] = ws_mid[b].narrow(0, C, C);
    }
    sig::separable_weight_grads(pb, x, ws_pw, ws_dw, ms, msh, res);
  }
  return res;
}

}  // namespace
}  // namespace cuda
}  // namespace aspp_fused

ASPP_FUSED_CHECK_SIGNATURE(aspp_fused::cuda::separable_conv_cuda, SeparableConv);
ASPP_FUSED_CHECK_SIGNATURE(aspp_fused::cuda::separable_gemm_cuda, SeparableGemm);
ASPP_FUSED_CHECK_SIGNATURE(aspp_fused::cuda::separable_gemm_backward_cuda, SeparableGemmBackward);

ASPP_CUDA_LIBRARY_IMPL(m) {  // cuda/launch.h: aspp_fused for CUDA (the emulator's: aspp_fused_emu for CPU)
  m.impl("separable_conv", &aspp_fused::cuda::separable_conv_cuda);
  m.impl("separable_gemm", &aspp_fused::cuda::separable_gemm_cuda);
  m.impl("separable_gemm_backward", &aspp_fused::cuda::separable_gemm_backward_cuda);
}
