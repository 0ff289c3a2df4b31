// cuda-check helper (host only, runs without a GPU): prints the tile configuration and the
// dynamic shared memory of every GEMM kernel family, for the cuda-check report.
#include <cstdio>

#include "../channel_reduce.cuh"
#include "../gemm_core.cuh"
#include "../separable_gemm.cuh"

using namespace aspp_fused::cuda;

template <typename T, Math M>
void row(const char* name) {
  using C = GemmCfg<T, M>;
  std::printf("%-22s BMxBNxBK %3dx%3dx%2d  warps %dx%d  stages %d  threads %3d  dynamic smem %6d B (separable %6d B)\n",
              name, C::BM, C::BN, C::BK, C::kWarpsM, C::kWarpsN, C::kStages, C::kThreads, C::kSmemBytes,
              separable_smem_bytes<C, T>());
}

int main() {
  row<__nv_bfloat16, Math::kMma16>("bf16  mma.m16n8k16");
  row<__half, Math::kMma16>("fp16  mma.m16n8k16");
  row<float, Math::kTf32>("fp32  mma.m16n8k8.tf32");
  row<float, Math::kFfma>("fp32  ffma");
  row<double, Math::kFfma>("fp64  ffma");
  std::printf("(wgrad: the same configurations, M = input channels, N = output channels, K = pixels)\n");
  return 0;
}
