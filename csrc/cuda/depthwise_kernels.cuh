// The depthwise 3x3 of the separable backward (the forward operand, and its transpose for
// grad_x), the mid affine backward and the depthwise weight gradient. (The tap-list wgrad is a
// GEMM: wgrad_gemm.cuh.)
#pragma once

#include "channel_reduce.cuh"

namespace aspp_fused {
namespace cuda {

// Calls f(tap, hh, ww) for each tap (tap = ky * 3 + kx) of the 3x3 window around (h, w), taps
// `step` pixels apart, that falls inside the H x W image.
template <typename F>
ASPP_DEVICE void for_each_tap3x3(int h, int w, int step, int H, int W, F&& f) {
#pragma unroll
  for (int ky = 0; ky < 3; ++ky) {
    const int hh = h + (ky - 1) * step;
    if (hh < 0 || hh >= H) continue;
#pragma unroll
    for (int kx = 0; kx < 3; ++kx) {
      const int ww = w + (kx - 1) * step;
      if (ww < 0 || ww >= W) continue;
      f(ky * 3 + kx, hh, ww);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Depthwise 3x3, one thread per output element (channel fastest: coalesced). T is the x
// dtype (for out_m), In the input's element type (x dtype, or the acc type for g_d).

template <typename T, typename In>
__global__ void __launch_bounds__(256) depthwise_kernel(const __grid_constant__ DepthwiseParams p) {
  using A = acc_t<T>;
  const In* in = static_cast<const In*>(p.in);
  const A* w = static_cast<const A*>(p.w);
  const A* ms = static_cast<const A*>(p.mid_scale);
  const A* msh = static_cast<const A*>(p.mid_shift);
  A* out_acc = static_cast<A*>(p.out_acc);
  T* out_m = static_cast<T*>(p.out_m);
  const int64_t C = p.C;
  const int64_t total = static_cast<int64_t>(p.N) * p.H * p.W * C;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(idx % C);
    const int64_t pix = idx / C;
    const int x_w = static_cast<int>(pix % p.W);
    const int x_h = static_cast<int>((pix / p.W) % p.H);
    const int64_t img = pix - (static_cast<int64_t>(x_h) * p.W + x_w);  // n * H * W
    A v = A(0);
    for_each_tap3x3(x_h, x_w, p.step, p.H, p.W, [&](int tap, int hh, int ww) {
      v += w[tap * C + c] * convert<A>(in[(img + static_cast<int64_t>(hh) * p.W + ww) * C + c]);
    });
    if (out_acc) out_acc[idx] = p.accumulate ? out_acc[idx] + v : v;
    if (out_m) {
      A m = v;
      if (ms) {
        m = m * ms[c] + msh[c];
        if (p.mid_act == 1) m = relu(m);
      }
      out_m[idx] = convert<T>(m);
    }
  }
}

// ------------------------------------------------------------------------------------------

template <typename A>
__global__ void __launch_bounds__(kRedChannels * kRedRows) mid_backward_kernel(const __grid_constant__ MidBwdParams p) {
  const ChannelBlock cb = channel_block(p.cg);
  const int c = cb.c;
  const A* d = static_cast<const A*>(p.d);
  A* g = static_cast<A*>(p.g);
  const A s = static_cast<const A*>(p.mid_scale)[c];
  const A t = static_cast<const A*>(p.mid_shift)[c];
  A part[2] = {A(0), A(0)};
  if (cb.c_ok) {
    for (int px = cb.p0 + static_cast<int>(threadIdx.y); px < cb.p1; px += kRedRows) {
      const int64_t idx = (static_cast<int64_t>(cb.n) * p.cg.HW + px) * p.cg.C + c;
      const A dv = d[idx];
      A gp = g[idx];
      if (p.mid_act == 1 && !(dv * s + t > A(0))) gp = A(0);
      part[0] += gp * dv;
      part[1] += gp;
      g[idx] = gp * s;
    }
  }
  if (p.g_ms == nullptr) return;  // uniform
  double* const dst[2] = {p.g_ms, p.g_msh};
  reduce_rows_atomic<2>(part, dst, cb);
}

template <typename T>
__global__ void __launch_bounds__(kRedChannels * kRedRows) dw_wgrad_kernel(const __grid_constant__ DwWgradParams p) {
  using A = acc_t<T>;
  const ChannelBlock cb = channel_block(p.cg);
  const int C = p.cg.C, c = cb.c;
  const A* g = static_cast<const A*>(p.g);
  const T* x = static_cast<const T*>(p.x);
  A part[9];
#pragma unroll
  for (int k = 0; k < 9; ++k) part[k] = A(0);
  if (cb.c_ok) {
    const int64_t img = static_cast<int64_t>(cb.n) * p.cg.HW;
    for (int px = cb.p0 + static_cast<int>(threadIdx.y); px < cb.p1; px += kRedRows) {
      const int h = px / p.W, w = px % p.W;
      const A gv = g[(img + px) * C + c];
      for_each_tap3x3(h, w, p.dilation, p.H, p.W, [&](int tap, int hh, int ww) {
        part[tap] += gv * convert<A>(x[(img + static_cast<int64_t>(hh) * p.W + ww) * C + c]);
      });
    }
  }
  double* const dst[9] = {p.out,         p.out + C,     p.out + 2 * C, p.out + 3 * C, p.out + 4 * C,
                          p.out + 5 * C, p.out + 6 * C, p.out + 7 * C, p.out + 8 * C};
  reduce_rows_atomic<9>(part, dst, cb);
}

}  // namespace cuda
}  // namespace aspp_fused
