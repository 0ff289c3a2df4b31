// Launch glue of the tap-list implicit GEMM and the wgrad GEMM (tap_gemm.cuh, wgrad_gemm.cuh): tiling, math
// and load-path choice, branch grouping, pixel splits. Used by the atrous ops (forward, acc
// recompute, dgrad, wgrad) and by the separable backward (its 1x1 GEMMs and grad_pw).
#include <algorithm>
#include <type_traits>

#include "glue.h"  // first: the torch headers must not see the emulator's CUDA keyword macros
#include "tap_plan.h"
#include "epilogue_kernels.cuh"
#include "tap_gemm.cuh"
#include "wgrad_gemm.cuh"

namespace aspp_fused {
namespace cuda {
namespace {

// The plan of one launch of p's branches (csrc/tap_plan.h: use_region_plan): fills p.rg /
// p.nregion with the exact-region plan, or leaves p.nregion = 0 (the tile plan); returns the
// launch's number of CTAs (0: nothing to launch). Concat and sum mode alike (sum mode: the common
// refinement of the branches' regions).
int64_t plan_launch(TapGemmParams& p, int bm, int bn, int bk) {
  p.nregion = 0;
  std::vector<PlanBranch> branches;
  for (int b = 0; b < p.nbranch; ++b) branches.push_back({p.br[b].k, p.br[b].step, p.br[b].cin, p.br[b].cout});
  std::vector<PlanRegion> plan;
  if (!use_region_plan(cuda_region_mode(), p.tl.N, p.tl.H, p.tl.W, branches, p.sum_mode != 0, p.tl.tile_h,
                       p.tl.tile_w, bm, bn, bk, kMaxRegions, &plan))
    return static_cast<int64_t>(p.tl.N) * p.tl.tiles_per_image * p.ncol;
  int64_t first = 0;
  for (size_t i = 0; i < plan.size(); ++i) {
    const PlanRegion& r = plan[i];
    const int ncolb = p.sum_mode ? p.ncol : p.cb_start[r.branch + 1] - p.cb_start[r.branch];
    TORCH_CHECK(r.col_blocks == ncolb, "aspp_fused: internal error: region plan and column blocks disagree");
    p.rg[i] = RegionDesc{r.branch, r.h0, r.h1, r.w0, r.w1, static_cast<int>(first)};
    first += r.items();
  }
  TORCH_CHECK(first < (int64_t(1) << 31), "aspp_fused: ", first, " CTAs in one launch (at most 2^31 - 1)");
  p.nregion = static_cast<int>(plan.size());
  return first;
}

template <typename T, typename OutT, Math M>
void launch_group(const TapGemmParams& p, bool vec_a, int64_t grid) {
  using Cfg = GemmCfg<T, M>;
  if (vec_a) {
    launch(tap_gemm_kernel<T, OutT, M, true>, grid, dim3(Cfg::kThreads), Cfg::kSmemBytes, p);
  } else {
    launch(tap_gemm_kernel<T, OutT, M, false>, grid, dim3(Cfg::kThreads), Cfg::kSmemBytes, p);
  }
}

template <typename T, Math M>
void run_typed(const TapGemmCall& call) {
  using Cfg = GemmCfg<T, M>;
  using A = acc_t<T>;
  using OutAcc = A;
  const int nb = static_cast<int>(call.branches.size());
  std::vector<int64_t> align_checks;
  for (const GemmBranch& b : call.branches) {
    align_checks.push_back(b.in_off);
    align_checks.push_back(b.cin);
  }
  const bool vec_a = vec_ok(call.in, call.in_stride, align_checks, Cfg::kVec);

  TapGemmParams p{};
  p.in = call.in;
  p.in_stride = call.in_stride;
  p.w = call.w;
  check_aligned16(p.w, "the packed weights");
  p.tl = make_tiling(static_cast<int>(call.N), static_cast<int>(call.H), static_cast<int>(call.W), Cfg::BM);

  // Launches p's branches into the caller's output, with its epilogue.
  auto launch_to_out = [&]() {
    p.out = call.out;
    p.out_stride = call.out_stride;
    p.ep = call.ep;
    const int64_t grid = plan_launch(p, Cfg::BM, Cfg::BN, Cfg::BK);
    if (grid <= 0) return;
    if (call.out_acc) {
      launch_group<T, OutAcc, M>(p, vec_a, grid);
    } else {
      launch_group<T, T, M>(p, vec_a, grid);
    }
  };

  if (!call.sum_mode) {
    for (int g0 = 0; g0 < nb; g0 += kMaxBranches) {
      const int gn = std::min(kMaxBranches, nb - g0);
      p.nbranch = gn;
      p.sum_mode = 0;
      p.cb_start[0] = 0;
      for (int i = 0; i < gn; ++i) {
        p.br[i] = call.branches[g0 + i];
        p.cb_start[i + 1] = p.cb_start[i] + (p.br[i].cout + Cfg::BN - 1) / Cfg::BN;
      }
      p.ncol = p.cb_start[gn];
      launch_to_out();
    }
    return;
  }

  const int cout = call.branches[0].cout;
  p.sum_mode = 1;
  p.ncol = (cout + Cfg::BN - 1) / Cfg::BN;
  if (nb <= kMaxBranches) {
    p.nbranch = nb;
    for (int i = 0; i < nb; ++i) p.br[i] = call.branches[i];
    launch_to_out();
    return;
  }

  // Sum mode over more than kMaxBranches branches: raw partial sums, accumulated in the acc
  // type, then the epilogue (or the cast) over the finished sum.
  const auto acc_type = std::is_same<A, double>::value ? at::kDouble : at::kFloat;
  const int64_t pixels = call.N * call.H * call.W;
  at::Tensor tmp;
  void* acc_out = call.out;
  int64_t acc_stride = call.out_stride;
  const bool direct = call.out_acc && call.ep.raw;  // accumulate straight into the caller's buffer
  if (!direct) {
    tmp = at::zeros({pixels, cout}, at::TensorOptions().dtype(acc_type).device(current_device()));
    acc_out = tmp.data_ptr();
    acc_stride = cout;
  }
  for (int g0 = 0; g0 < nb; g0 += kMaxBranches) {
    const int gn = std::min(kMaxBranches, nb - g0);
    p.nbranch = gn;
    for (int i = 0; i < gn; ++i) p.br[i] = call.branches[g0 + i];
    p.out = acc_out;
    p.out_stride = acc_stride;
    p.ep = call.ep;
    p.ep.raw = 1;
    p.ep.accumulate = direct ? (g0 > 0 || call.ep.accumulate) : 1;
    const int64_t grid = plan_launch(p, Cfg::BM, Cfg::BN, Cfg::BK);
    if (grid > 0) launch_group<T, OutAcc, M>(p, vec_a, grid);
  }
  if (direct) return;
  if (call.ep.raw) {
    // Raw result wanted in the input dtype (dgrad): cast the sum into place.
    TORCH_CHECK(!call.ep.accumulate, "aspp_fused: accumulate needs an acc-type output");
    at::Tensor dst = at::from_blob(call.out, {pixels, call.out_stride},
                                   at::TensorOptions().dtype(call.dtype).device(current_device()));
    dst.narrow(1, 0, cout).copy_(tmp);
    return;
  }
  TORCH_CHECK(!call.out_acc && call.out_stride == cout && !call.ep.accumulate,
              "aspp_fused: internal error: sum-mode epilogue needs a dense output");
  EpilogueFwdParams ep{};
  ep.cg = channel_grid(call.N, call.H * call.W, cout);
  ep.acc = tmp.data_ptr();
  ep.out = call.out;
  ep.ep = call.ep;
  launch(epilogue_forward_kernel<T>, channel_grid_blocks(ep.cg), dim3(kRedChannels, kRedRows), 0, ep);
}

template <typename T, Math M>
void run_wgrad_typed(WgradParams& p, const std::vector<WgradJob>& jobs, int64_t pixels) {
  using Cfg = GemmCfg<T, M>;
  std::vector<int64_t> align_checks{p.C};
  int max_cout = 0;
  for (const WgradJob& j : jobs) {
    max_cout = std::max(max_cout, j.cout);
    align_checks.push_back(j.cout);
    align_checks.push_back(j.g_off);
  }
  if (max_cout == 0) return;
  const bool vec = vec_ok(p.x, p.x_stride, {p.C}, Cfg::kVec) && vec_ok(p.g, p.g_stride, align_checks, Cfg::kVec);
  p.cblocks = (p.C + Cfg::BM - 1) / Cfg::BM;
  p.oblocks = (max_cout + Cfg::BN - 1) / Cfg::BN;
  // Split the pixels until the grid covers the GPU a couple of times (each split's partial
  // sums are atomically added into the workspace), keeping >= 4 K steps per split.
  const int64_t per_split = static_cast<int64_t>(p.cblocks) * p.oblocks * static_cast<int64_t>(jobs.size());
  const int64_t want = (4 * static_cast<int64_t>(num_sms()) + per_split - 1) / per_split;
  p.splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, pixels / (4 * Cfg::BK))));
  for (size_t j0 = 0; j0 < jobs.size(); j0 += kMaxWgradJobs) {
    const int jn = static_cast<int>(std::min<size_t>(kMaxWgradJobs, jobs.size() - j0));
    p.njobs = jn;
    for (int i = 0; i < jn; ++i) p.job[i] = jobs[j0 + i];
    const int64_t grid = static_cast<int64_t>(p.cblocks) * p.oblocks * p.splits * jn;
    if (vec) {
      launch(wgrad_gemm_kernel<T, M, true>, grid, dim3(Cfg::kThreads), Cfg::kSmemBytes, p);
    } else {
      launch(wgrad_gemm_kernel<T, M, false>, grid, dim3(Cfg::kThreads), Cfg::kSmemBytes, p);
    }
  }
}

}  // namespace

void run_wgrad(at::ScalarType dtype, const void* x, int64_t x_stride, int64_t C, const void* g, int64_t g_stride,
               void* ws, int64_t N, int64_t H, int64_t W, const std::vector<WgradJob>& jobs) {
  if (N * H * W == 0 || C == 0 || jobs.empty()) return;
  WgradParams p{};
  p.x = x;
  p.x_stride = x_stride;
  p.C = static_cast<int>(C);
  p.g = g;
  p.g_stride = g_stride;
  p.ws = ws;
  p.N = static_cast<int>(N);
  p.H = static_cast<int>(H);
  p.W = static_cast<int>(W);
  const int64_t pixels = N * H * W;
  dispatch_gemm_math(dtype, "aspp_fused", [&](auto tag, auto math) {
    run_wgrad_typed<decltype(tag), decltype(math)::value>(p, jobs, pixels);
  });
}

void run_tap_gemm(const TapGemmCall& call) {
  if (call.N * call.H * call.W == 0 || call.branches.empty()) return;
  dispatch_gemm_math(call.dtype, "aspp_fused", [&](auto tag, auto math) {
    run_typed<decltype(tag), decltype(math)::value>(call);
  });
}

}  // namespace cuda
}  // namespace aspp_fused
