// The SIMT emulator behind cuda_emu.h (see there for the model).
#include "cuda_emu.h"

#include <cuda_fp16.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

namespace emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;

// One cp.async in flight: the source bytes are read at issue (global inputs do not change
// during a launch), the destination is written when its group retires.
struct PendingCopy {
  unsigned char* dst;
  unsigned char data[16];
};

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  uint3 tid;
  int linear = 0;
  bool done = false;
  std::vector<PendingCopy> open_group;          // issued since the last commit_group
  std::deque<std::vector<PendingCopy>> groups;  // committed, oldest first
#if EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

struct Warp {
  int count = 0;
  int gen = 0;
  int size = 32;
  alignas(16) unsigned char scratch[32][64];
};

struct Cta {
  dim3 grid, block;
  uint3 bid;
  std::vector<Fiber>* fibers = nullptr;
  std::vector<Warp> warps;
  int nthreads = 0;
  int bar_count = 0, bar_gen = 0;
  long long progress = 0;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  const std::function<void()>* body = nullptr;
};

Cta* g_cta = nullptr;
Fiber* g_cur = nullptr;
ucontext_t g_main;
#if EMU_ASAN
const void* g_main_bottom = nullptr;  // the scheduler's stack, as ASan reports it to the fibers
size_t g_main_size = 0;
#endif
long long g_launches = 0, g_ctas = 0;

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s (block %u,%u,%u thread %u,%u,%u)\n", what, g_cta ? g_cta->bid.x : 0,
               g_cta ? g_cta->bid.y : 0, g_cta ? g_cta->bid.z : 0, g_cur ? g_cur->tid.x : 0,
               g_cur ? g_cur->tid.y : 0, g_cur ? g_cur->tid.z : 0);
  std::abort();
}

void switch_to_main() {
#if EMU_ASAN
  __sanitizer_start_switch_fiber(&g_cur->fake_stack, g_main_bottom, g_main_size);
#endif
  swapcontext(&g_cur->ctx, &g_main);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(g_cur->fake_stack, &g_main_bottom, &g_main_size);
#endif
}

void yield() { switch_to_main(); }

// kForward / kReverse / kShuffle: round robin, every fiber runs to its next synchronisation
// point each round, in thread order, reversed or shuffled anew each round. kWarps /
// kWarpsReverse: warp by warp, each warp running as far as it can (to a __syncthreads or its
// end) before the next one starts, so warps drift apart as far as the barriers allow.
enum class Order { kForward, kReverse, kShuffle, kWarps, kWarpsReverse };
struct Schedule {
  Order order = Order::kForward;
  unsigned seed = 0;
  bool async_copies = true;
};
Schedule g_schedule;

Schedule read_schedule() {
  Schedule s;
  if (const char* o = std::getenv("ASPP_CUDA_EMU_ORDER")) {
    const std::string v(o);
    if (v.empty() || v == "forward") {
      s.order = Order::kForward;
    } else if (v == "reverse") {
      s.order = Order::kReverse;
    } else if (v == "warps") {
      s.order = Order::kWarps;
    } else if (v == "warps-reverse") {
      s.order = Order::kWarpsReverse;
    } else if (v.rfind("shuffle:", 0) == 0) {
      s.order = Order::kShuffle;
      s.seed = static_cast<unsigned>(std::strtoul(v.c_str() + 8, nullptr, 10));
    } else {
      std::fprintf(stderr, "cuda_emu: ASPP_CUDA_EMU_ORDER=%s: expected forward, reverse, shuffle:SEED, warps or "
                   "warps-reverse\n", o);
      std::abort();
    }
  }
  if (const char* a = std::getenv("ASPP_CUDA_EMU_ASYNC")) s.async_copies = std::string(a) != "0";
  return s;
}

void trampoline() {
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_main_bottom, &g_main_size);
#endif
  (*g_cta->body)();
  if (!g_cur->open_group.empty() || !g_cur->groups.empty())
    fail("cp.async copies still in flight when the thread exits (missing cp.async.wait_group)");
  g_cur->done = true;
  ++g_cta->progress;
#if EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, g_main_bottom, g_main_size);  // this fiber ends
#endif
  // returning resumes uc_link (the scheduler)
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

Warp& my_warp() { return g_cta->warps[g_cur->linear / 32]; }

float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float f16_to_float(uint16_t h) {
  __half_raw r;
  r.x = h;
  return __half2float(__half(r));
}

float tf32_value(uint32_t bits) {
  // The tensor core reads 19 bits (sign, 8 exponent, 10 mantissa) of a .tf32 operand.
  const uint32_t u = bits & 0xffffe000u;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace

uint3 thread_idx() { return g_cur->tid; }
uint3 block_idx() { return g_cta->bid; }
dim3 block_dim() { return g_cta->block; }
dim3 grid_dim() { return g_cta->grid; }
unsigned char* dynamic_smem() { return g_cta->smem; }
int lane_id() { return g_cur->linear % 32; }
unsigned char* warp_scratch(int lane) { return my_warp().scratch[lane]; }
long long launches() { return g_launches; }

int num_sms() {
  const char* v = std::getenv("ASPP_CUDA_EMU_SMS");
  if (!v || !*v) return 4;
  const long n = std::strtol(v, nullptr, 10);
  if (n < 1 || n > 1024) {
    std::fprintf(stderr, "cuda_emu: ASPP_CUDA_EMU_SMS=%s: expected an SM count in [1, 1024]\n", v);
    std::abort();
  }
  return static_cast<int>(n);
}
long long ctas() { return g_ctas; }

void syncthreads() {
  Cta& c = *g_cta;
  const int gen = c.bar_gen;
  ++c.progress;
  if (++c.bar_count == c.nthreads) {
    c.bar_count = 0;
    ++c.bar_gen;
    return;
  }
  while (c.bar_gen == gen) yield();
}

void warp_sync() {
  Warp& w = my_warp();
  const int gen = w.gen;
  ++g_cta->progress;
  if (++w.count == w.size) {
    w.count = 0;
    ++w.gen;
    return;
  }
  while (w.gen == gen) yield();
}

void cp_async_16(void* dst, const void* src, int src_bytes) {
  if (!aligned16(dst)) fail("cp.async: shared address not 16-byte aligned");
  if (src_bytes < 0 || src_bytes > 16) fail("cp.async: src-size outside [0, 16]");
  // PTX asks for a naturally aligned source even when src-size is 0 and nothing is read.
  if (!aligned16(src)) fail("cp.async: global address not 16-byte aligned");
  unsigned char* d = static_cast<unsigned char*>(dst);
  if (g_cta->smem && (d < g_cta->smem || d + 16 > g_cta->smem + g_cta->smem_bytes))
    fail("cp.async: destination outside dynamic shared memory");
  PendingCopy c;
  c.dst = d;
  std::memset(c.data, 0, sizeof(c.data));
  if (src_bytes > 0) std::memcpy(c.data, src, static_cast<size_t>(src_bytes));
  if (!g_schedule.async_copies) {
    std::memcpy(d, c.data, 16);
    return;
  }
  std::memset(d, 0xff, 16);  // NaN until the copy's group is waited for
  g_cur->open_group.push_back(c);
}

void cp_async_commit() {
  // An empty group is legal (and counts for wait_group), as in PTX.
  g_cur->groups.push_back(std::move(g_cur->open_group));
  g_cur->open_group.clear();
}

void cp_async_wait(int pending_groups) {
  // PTX: wait until at most `pending_groups` of the most recent committed groups are pending.
  // Copies not yet committed are not waited for.
  while (static_cast<int>(g_cur->groups.size()) > pending_groups) {
    for (const PendingCopy& c : g_cur->groups.front()) std::memcpy(c.dst, c.data, 16);
    g_cur->groups.pop_front();
  }
}

void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  if (!aligned16(row)) fail("ldmatrix: row address not 16-byte aligned");
  const int lane = lane_id();
  std::memcpy(warp_scratch(lane), &row, sizeof(row));
  warp_sync();
  const unsigned char* rows[32];
  for (int l = 0; l < 32; ++l) std::memcpy(&rows[l], warp_scratch(l), sizeof(void*));
  for (int j = 0; j < 4; ++j) {
    if (!trans) {
      // Register j: row lane/4 of matrix j, elements 2*(lane%4), +1.
      std::memcpy(&r[j], rows[j * 8 + lane / 4] + (lane % 4) * 4, 4);
    } else {
      // Transposed: element lane/4 of rows 2*(lane%4) and 2*(lane%4)+1 of matrix j.
      uint16_t lo, hi;
      std::memcpy(&lo, rows[j * 8 + 2 * (lane % 4)] + (lane / 4) * 2, 2);
      std::memcpy(&hi, rows[j * 8 + 2 * (lane % 4) + 1] + (lane / 4) * 2, 2);
      r[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
  warp_sync();
}

namespace {
// The mma.sync operand fragments of all 32 lanes of the calling thread's warp: each lane posts
// its own a and b, then reads everyone's.
struct WarpFragments {
  uint32_t a[32][4], b[32][2];
};
WarpFragments exchange_fragments(const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  unsigned char* s = warp_scratch(lane_id());
  std::memcpy(s, a, 16);
  std::memcpy(s + 16, b, 8);
  warp_sync();
  WarpFragments f;
  for (int l = 0; l < 32; ++l) {
    std::memcpy(f.a[l], warp_scratch(l), 16);
    std::memcpy(f.b[l], warp_scratch(l) + 16, 8);
  }
  warp_sync();
  return f;
}
}  // namespace

// PTX ISA, mma.m16n8k16 (.bf16 / .f16): with g = lane / 4, t = lane % 4,
//   A (16 x 16, row): a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..]
//   B (16 x 8, col):  b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]
//   C/D (16 x 8):     d[0..1] = D[g][2t..2t+1], d[2..3] = D[g+8][2t..2t+1]
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16) {
  const WarpFragments f = exchange_fragments(a, b);
  float A[16][16], B[16][8];
  auto cvt = [bf16](uint16_t h) { return bf16 ? bf16_to_float(h) : f16_to_float(h); };
  for (int l = 0; l < 32; ++l) {
    const uint32_t(&la)[4] = f.a[l];
    const uint32_t(&lb)[2] = f.b[l];
    const int g = l / 4, t = l % 4;
    for (int e = 0; e < 2; ++e) {
      const int sh = 16 * e;
      A[g][2 * t + e] = cvt(static_cast<uint16_t>(la[0] >> sh));
      A[g + 8][2 * t + e] = cvt(static_cast<uint16_t>(la[1] >> sh));
      A[g][2 * t + 8 + e] = cvt(static_cast<uint16_t>(la[2] >> sh));
      A[g + 8][2 * t + 8 + e] = cvt(static_cast<uint16_t>(la[3] >> sh));
      B[2 * t + e][g] = cvt(static_cast<uint16_t>(lb[0] >> sh));
      B[2 * t + 8 + e][g] = cvt(static_cast<uint16_t>(lb[1] >> sh));
    }
  }
  const int lane = lane_id();
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e / 2) * 8, col = 2 * t + (e % 2);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];  // bf16/fp16 products are exact in fp32
    d[e] += acc;
  }
}

// PTX ISA, mma.m16n8k8 .tf32:
//   A (16 x 8): a[0] = A[g][t], a[1] = A[g+8][t], a[2] = A[g][t+4], a[3] = A[g+8][t+4]
//   B (8 x 8):  b[0] = B[t][g], b[1] = B[t+4][g];  C/D as for m16n8k16
void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const WarpFragments f = exchange_fragments(a, b);
  float A[16][8], B[8][8];
  for (int l = 0; l < 32; ++l) {
    const uint32_t(&la)[4] = f.a[l];
    const uint32_t(&lb)[2] = f.b[l];
    const int g = l / 4, t = l % 4;
    A[g][t] = tf32_value(la[0]);
    A[g + 8][t] = tf32_value(la[1]);
    A[g][t + 4] = tf32_value(la[2]);
    A[g + 8][t + 4] = tf32_value(la[3]);
    B[t][g] = tf32_value(lb[0]);
    B[t + 4][g] = tf32_value(lb[1]);
  }
  const int lane = lane_id();
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e / 2) * 8, col = 2 * t + (e % 2);
    double acc = 0.0;  // tf32 products are exact in fp32; sum them carefully
    for (int k = 0; k < 8; ++k) acc += static_cast<double>(A[row][k]) * B[k][col];
    d[e] += static_cast<float>(acc);
  }
}

uint32_t cvt_rna_tf32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if (std::isnan(x) || std::isinf(x)) return u;
  // Round to nearest, ties away from zero, at mantissa bit 13.
  u += 0x1000u;
  return u & 0xffffe000u;
}

namespace {
// Resumes each live fiber of `ids` once, in that order; false when none was left.
bool run_round(std::vector<Fiber>& fibers, const std::vector<int>& ids) {
  bool alive = false;
  for (int i : ids) {
    Fiber& f = fibers[static_cast<size_t>(i)];
    if (f.done) continue;
    alive = true;
    g_cur = &f;
#if EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
    swapcontext(&g_main, &f.ctx);
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  }
  return alive;
}
}  // namespace

void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  if (nthreads <= 0 || nthreads > 1024) fail("launch: bad block size");
  ++g_launches;
  std::vector<Fiber> fibers(static_cast<size_t>(nthreads));
  for (Fiber& f : fibers) f.stack = static_cast<char*>(std::malloc(kStackBytes));
  Cta cta;
  cta.grid = grid;
  cta.block = block;
  cta.fibers = &fibers;
  cta.nthreads = nthreads;
  cta.body = &body;
  cta.warps.resize(static_cast<size_t>((nthreads + 31) / 32));
  for (size_t w = 0; w < cta.warps.size(); ++w)
    cta.warps[w].size = std::min(32, nthreads - static_cast<int>(w) * 32);
  Cta* const saved_cta = g_cta;
  g_cta = &cta;
  g_schedule = read_schedule();
  std::vector<int> order(static_cast<size_t>(nthreads));
  for (int i = 0; i < nthreads; ++i) order[static_cast<size_t>(i)] = g_schedule.order == Order::kReverse ? nthreads - 1 - i : i;
  std::mt19937 rng(g_schedule.seed + static_cast<unsigned>(g_launches));
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        ++g_ctas;
        cta.bid = make_uint3(bx, by, bz);
        cta.bar_count = cta.bar_gen = 0;
        for (Warp& w : cta.warps) w.count = w.gen = 0;
        // Fresh dynamic shared memory, poisoned (0xff: NaN in every float type) so reads of
        // bytes never written show up in the results.
        cta.smem_bytes = smem;
        cta.smem = smem ? static_cast<unsigned char*>(std::malloc(smem)) : nullptr;
        if (cta.smem) std::memset(cta.smem, 0xff, smem);
        for (int i = 0; i < nthreads; ++i) {
          Fiber& f = fibers[static_cast<size_t>(i)];
          f.linear = i;
          f.tid = make_uint3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
          f.done = false;
          f.open_group.clear();
          f.groups.clear();
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack;
          f.ctx.uc_stack.ss_size = kStackBytes;
          f.ctx.uc_link = &g_main;
          makecontext(&f.ctx, trampoline, 0);
        }
        for (;;) {
          const long long before = cta.progress;
          bool alive = false;
          if (g_schedule.order == Order::kWarps || g_schedule.order == Order::kWarpsReverse) {
            const int nwarps = static_cast<int>(cta.warps.size());
            for (int k = 0; k < nwarps; ++k) {
              const int w = g_schedule.order == Order::kWarps ? k : nwarps - 1 - k;
              const auto first = order.begin() + w * 32;
              const std::vector<int> lanes(first, first + cta.warps[static_cast<size_t>(w)].size);
              for (;;) {  // this warp, until it makes no more progress
                const long long p = cta.progress;
                const bool a = run_round(fibers, lanes);
                alive = alive || a;
                if (!a || cta.progress == p) break;
              }
            }
          } else {
            if (g_schedule.order == Order::kShuffle) std::shuffle(order.begin(), order.end(), rng);
            alive = run_round(fibers, order);
          }
          if (!alive) break;
          if (cta.progress == before) fail("deadlock: a barrier that not every thread reaches");
        }
        g_cur = nullptr;
        std::free(cta.smem);
        cta.smem = nullptr;
      }
  g_cta = saved_cta;
  for (Fiber& f : fibers) std::free(f.stack);
}

}  // namespace emu
