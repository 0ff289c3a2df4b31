// The small kernels around the GEMMs: epilogue backward (BN / ReLU / stats), the epilogue of a
// finished accumulator, the depthwise 3x3 (forward operand for the backward, and its
// transpose), the mid affine backward and the depthwise weight gradient. (The tap-list wgrad
// is a GEMM: conv_gemm.cuh.)
//
// Channel-reduction kernels use blocks of 32 channels x 8 pixel rows: consecutive lanes read
// consecutive channels of one pixel (NHWC), each thread walks a strided slice of one image's
// pixel chunk, partial sums go through shared memory and one double atomicAdd per channel
// and block (so grad_bias[n, o], a per-image sum, falls out of the same partials).
//
// These are memory-bound, simple and correct; they are not tuned (csrc/cuda/README.md).
#pragma once

#include "common.cuh"
#include "params.cuh"

namespace aspp_fused {
namespace cuda {

// The block's channel, image and pixel range of a ChannelGrid launch (1-D grid).
struct ChannelBlock {
  int c;  // this thread's channel (may be >= C: idle lane)
  int n;
  int p0, p1;  // pixel range within image n
};

ASPP_DEVICE ChannelBlock channel_block(const ChannelGrid& cg) {
  ChannelBlock cb;
  const int64_t bid = blockIdx.x;
  const int cblk = static_cast<int>(bid % cg.cblocks);
  const int64_t rest = bid / cg.cblocks;
  cb.n = static_cast<int>(rest / cg.chunks);
  const int chunk = static_cast<int>(rest % cg.chunks);
  cb.c = cblk * kRedChannels + static_cast<int>(threadIdx.x);
  cb.p0 = static_cast<int>(static_cast<int64_t>(chunk) * cg.HW / cg.chunks);
  cb.p1 = static_cast<int>(static_cast<int64_t>(chunk + 1) * cg.HW / cg.chunks);
  return cb;
}

// Sums v[k] over the block's 8 rows and atomically adds it to dst[k][c] (skipping null dst).
template <int NV, typename A>
ASPP_DEVICE void reduce_rows_atomic(A (&v)[NV], A* red, double* const (&dst)[NV], int c, bool c_ok) {
  const int tx = threadIdx.x, ty = threadIdx.y;
#pragma unroll
  for (int k = 0; k < NV; ++k) red[(k * kRedRows + ty) * kRedChannels + tx] = v[k];
  __syncthreads();
  if (ty == 0 && c_ok) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      if (dst[k] == nullptr) continue;
      double s = 0.0;
#pragma unroll
      for (int r = 0; r < kRedRows; ++r) s += static_cast<double>(red[(k * kRedRows + r) * kRedChannels + tx]);
      atomicAdd(dst[k] + c, s);
    }
  }
}

// ------------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kRedChannels * kRedRows)
    epilogue_backward_kernel(const __grid_constant__ EpilogueBwdParams p) {
  using A = acc_t<T>;
  __shared__ A red[3 * kRedRows * kRedChannels];
  const ChannelGrid& cg = p.cg;
  const ChannelBlock cb = channel_block(cg);
  const int O = cg.C;
  const bool c_ok = cb.c < O;
  const int c = c_ok ? cb.c : 0;

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
  if (c_ok) {
    for (int px = cb.p0 + static_cast<int>(threadIdx.y); px < cb.p1; px += kRedRows) {
      const int64_t idx = (static_cast<int64_t>(cb.n) * cg.HW + px) * O + c;
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
  reduce_rows_atomic<3>(part, red, dst, c, c_ok);
}

template <typename T>
__global__ void __launch_bounds__(kRedChannels * kRedRows)
    epilogue_forward_kernel(const __grid_constant__ EpilogueFwdParams p) {
  using A = acc_t<T>;
  __shared__ A red[2 * kRedRows * kRedChannels];
  const ChannelGrid& cg = p.cg;
  const ChannelBlock cb = channel_block(cg);
  const int O = cg.C;
  const bool c_ok = cb.c < O;
  const int c = c_ok ? cb.c : 0;
  const Epilogue& ep = p.ep;
  const A sc = static_cast<const A*>(ep.scale)[c];
  const A sh = static_cast<const A*>(ep.shift)[c];
  const A bi = ep.bias ? static_cast<const A*>(ep.bias)[static_cast<int64_t>(cb.n) * ep.o_total + c] : A(0);
  const A* acc = static_cast<const A*>(p.acc);
  T* out = static_cast<T*>(p.out);

  A part[2] = {A(0), A(0)};
  if (c_ok) {
    for (int px = cb.p0 + static_cast<int>(threadIdx.y); px < cb.p1; px += kRedRows) {
      const int64_t idx = (static_cast<int64_t>(cb.n) * cg.HW + px) * O + c;
      A z = acc[idx] * sc + sh + bi;
      part[0] += z;
      part[1] += z * z;
      out[idx] = convert<T>(ep.act == 1 ? relu(z) : z);
    }
  }
  if (ep.ch_sum == nullptr) return;  // uniform over the block
  double* const dst[2] = {ep.ch_sum, ep.ch_sumsq};
  reduce_rows_atomic<2>(part, red, dst, c, c_ok);
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
#pragma unroll
    for (int ky = 0; ky < 3; ++ky) {
      const int hh = x_h + (ky - 1) * p.step;
      if (hh < 0 || hh >= p.H) continue;
#pragma unroll
      for (int kx = 0; kx < 3; ++kx) {
        const int ww = x_w + (kx - 1) * p.step;
        if (ww < 0 || ww >= p.W) continue;
        v += w[(ky * 3 + kx) * C + c] * convert<A>(in[(img + static_cast<int64_t>(hh) * p.W + ww) * C + c]);
      }
    }
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
  __shared__ A red[2 * kRedRows * kRedChannels];
  const ChannelGrid& cg = p.cg;
  const ChannelBlock cb = channel_block(cg);
  const int C = cg.C;
  const bool c_ok = cb.c < C;
  const int c = c_ok ? cb.c : 0;
  const A* d = static_cast<const A*>(p.d);
  A* g = static_cast<A*>(p.g);
  const A s = static_cast<const A*>(p.mid_scale)[c];
  const A t = static_cast<const A*>(p.mid_shift)[c];
  A part[2] = {A(0), A(0)};
  if (c_ok) {
    for (int px = cb.p0 + static_cast<int>(threadIdx.y); px < cb.p1; px += kRedRows) {
      const int64_t idx = (static_cast<int64_t>(cb.n) * cg.HW + px) * C + c;
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
  reduce_rows_atomic<2>(part, red, dst, c, c_ok);
}

template <typename T>
__global__ void __launch_bounds__(kRedChannels * kRedRows) dw_wgrad_kernel(const __grid_constant__ DwWgradParams p) {
  using A = acc_t<T>;
  __shared__ A red[9 * kRedRows * kRedChannels];
  const ChannelGrid& cg = p.cg;
  const ChannelBlock cb = channel_block(cg);
  const int C = cg.C;
  const bool c_ok = cb.c < C;
  const int c = c_ok ? cb.c : 0;
  const A* g = static_cast<const A*>(p.g);
  const T* x = static_cast<const T*>(p.x);
  A part[9];
#pragma unroll
  for (int k = 0; k < 9; ++k) part[k] = A(0);
  if (c_ok) {
    const int64_t img = static_cast<int64_t>(cb.n) * cg.HW;
    for (int px = cb.p0 + static_cast<int>(threadIdx.y); px < cb.p1; px += kRedRows) {
      const int h = px / p.W, w = px % p.W;
      const A gv = g[(img + px) * C + c];
#pragma unroll
      for (int ky = 0; ky < 3; ++ky) {
        const int hh = h + (ky - 1) * p.dilation;
        if (hh < 0 || hh >= p.H) continue;
#pragma unroll
        for (int kx = 0; kx < 3; ++kx) {
          const int ww = w + (kx - 1) * p.dilation;
          if (ww < 0 || ww >= p.W) continue;
          part[ky * 3 + kx] += gv * convert<A>(x[(img + static_cast<int64_t>(hh) * p.W + ww) * C + c]);
        }
      }
    }
  }
  double* const dst[9] = {p.out,         p.out + C,     p.out + 2 * C, p.out + 3 * C, p.out + 4 * C,
                          p.out + 5 * C, p.out + 6 * C, p.out + 7 * C, p.out + 8 * C};
  reduce_rows_atomic<9>(part, red, dst, c, c_ok);
}

}  // namespace cuda
}  // namespace aspp_fused
