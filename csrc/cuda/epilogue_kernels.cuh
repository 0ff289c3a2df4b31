// The epilogue's kernels outside the GEMMs: its backward (BN affine / ReLU / batch statistics ->
// g_z, g_acc and the grad_scale / shift / bias sums) and the epilogue of a finished fp32
// accumulator (sum mode over more than 8 branches).
#pragma once

#include "channel_reduce.cuh"

namespace aspp_fused {
namespace cuda {

// ------------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kRedChannels * kRedRows)
    epilogue_backward_kernel(const __grid_constant__ EpilogueBwdParams p) {
  using A = acc_t<T>;
  const ChannelBlock cb = channel_block(p.cg);
  const int O = p.cg.C, c = cb.c;

  const A* acc = static_cast<const A*>(p.acc);
  const T* out = static_cast<const T*>(p.out);
  const T* go = static_cast<const T*>(p.grad_out);
  T* g_acc = static_cast<T*>(p.g_acc);
  const A sc = static_cast<const A*>(p.scale)[c];
  const A sh = static_cast<const A*>(p.shift)[c];
  const A bi = p.bias ? static_cast<const A*>(p.bias)[static_cast<int64_t>(cb.n) * O + c] : A(0);
  const A gs = p.grad_sum ? static_cast<const A*>(p.grad_sum)[c] : A(0);
  const A gss = p.grad_sumsq ? static_cast<const A*>(p.grad_sumsq)[c] : A(0);

  A part[3] = {A(0), A(0), A(0)};  // sum g_z * acc, sum g_z (= shift and bias partials)
  if (cb.c_ok) {
    for (int px = cb.p0 + static_cast<int>(threadIdx.y); px < cb.p1; px += kRedRows) {
      const int64_t idx = (static_cast<int64_t>(cb.n) * p.cg.HW + px) * p.cg.C + c;
      A a = A(0), z = A(0);
      if (acc) {
        a = acc[idx];
        z = a * sc + sh + bi;
      } else if (out) {
        z = convert<A>(out[idx]);  // z itself (act none) or relu(z): the same sign test
      }
      A g = convert<A>(go[idx]);
      if (p.act == 1 && !(z > A(0))) g = A(0);
      g += gs;
      g += A(2) * z * gss;
      if (g_acc) g_acc[idx] = convert<T>(g * sc);
      part[0] += g * a;
      part[1] += g;
    }
  }
  part[2] = part[1];
  double* const dst[3] = {p.g_scale, p.g_shift, p.g_bias ? p.g_bias + static_cast<int64_t>(cb.n) * O : nullptr};
  reduce_rows_atomic<3>(part, dst, cb);
}

template <typename T>
__global__ void __launch_bounds__(kRedChannels * kRedRows)
    epilogue_forward_kernel(const __grid_constant__ EpilogueFwdParams p) {
  using A = acc_t<T>;
  const ChannelBlock cb = channel_block(p.cg);
  const int c = cb.c;
  const Epilogue& ep = p.ep;
  const A sc = static_cast<const A*>(ep.scale)[c];
  const A sh = static_cast<const A*>(ep.shift)[c];
  const A bi = ep.bias ? static_cast<const A*>(ep.bias)[static_cast<int64_t>(cb.n) * ep.o_total + c] : A(0);
  const A* acc = static_cast<const A*>(p.acc);
  T* out = static_cast<T*>(p.out);

  A part[2] = {A(0), A(0)};
  if (cb.c_ok) {
    for (int px = cb.p0 + static_cast<int>(threadIdx.y); px < cb.p1; px += kRedRows) {
      const int64_t idx = (static_cast<int64_t>(cb.n) * p.cg.HW + px) * p.cg.C + c;
      A z = acc[idx] * sc + sh + bi;
      part[0] += z;
      part[1] += z * z;
      out[idx] = convert<T>(ep.act == 1 ? relu(z) : z);
    }
  }
  if (ep.ch_sum == nullptr) return;  // uniform over the block
  double* const dst[2] = {ep.ch_sum, ep.ch_sumsq};
  reduce_rows_atomic<2>(part, dst, cb);
}

}  // namespace cuda
}  // namespace aspp_fused
