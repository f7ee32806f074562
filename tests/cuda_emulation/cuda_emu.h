// Portability header: lets g++ compile unchanged CUDA C kernels for CPU emulation.
// Force-included (-include cuda_emu.h) before each .cu file. Provides the CUDA keywords,
// the built-in index variables (read-only), __shared__ memory and __syncthreads. Each block's
// threads run as cooperating fibers (see scheduler.cpp): a fiber runs until it reaches a
// barrier, a warp-level operation or returns, so memory races that a missing barrier allows
// become visible when threads run in reversed or shuffled order. Warp-level operations
// (__shfl_sync, __shfl_up_sync, __shfl_down_sync, __shfl_xor_sync, __ballot_sync, __syncwarp)
// exchange values through one slot per lane, between two warp-wide waits, with CUDA's lane
// arithmetic; only the full mask 0xffffffff is accepted, and every lane of the warp must take
// part. atomicAdd is a plain read-modify-write: fibers never preempt each other inside it, so
// it is atomic; the order of the additions follows the thread order, as on a GPU it varies. The emulator compiles with -ffp-contract=fast -mfma -fexpensive-optimizations, so a*b+c becomes
// one fused multiply-add as nvcc's default --fmad=true makes it. expf, exp, logf and log carry
// errors up to CUDA's documented bounds (see the end of this file).
#pragma once

// Every standard header the emulator uses comes first: the math macros at the end of this
// file must not reach into the library's own code (this header is force-included everywhere).
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>
#include <cstdint>
#include <cstring>

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

namespace cuda_emu {
extern thread_local dim3 thread_idx;
extern thread_local dim3 block_idx;
extern thread_local dim3 block_dim;
extern thread_local dim3 grid_dim;
void barrier();
unsigned lane_id();
std::uint64_t* warp_slots();  // the 32 exchange slots of the calling thread's warp
void warp_wait(unsigned mask);  // waits until every lane of the warp has called it

template <typename V>
V exchange(unsigned mask, V value, int source_lane) {
  static_assert(sizeof(V) <= sizeof(std::uint64_t), "warp exchange of a type wider than 64 bits");
  std::uint64_t* slots = warp_slots();
  std::memcpy(&slots[lane_id()], &value, sizeof(V));
  warp_wait(mask);  // every lane has written
  V out;
  std::memcpy(&out, &slots[source_lane], sizeof(V));
  warp_wait(mask);  // every lane has read, so the slots may be written again
  return out;
}

inline int segment_start(int width) { return (int)lane_id() & ~(width - 1); }
}  // namespace cuda_emu

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// Shared memory: one instance per OS thread, i.e. per block being run (blocks run one at a time).
#define __shared__ static thread_local

#define threadIdx (static_cast<const dim3&>(::cuda_emu::thread_idx))
#define blockIdx (static_cast<const dim3&>(::cuda_emu::block_idx))
#define blockDim (static_cast<const dim3&>(::cuda_emu::block_dim))
#define gridDim (static_cast<const dim3&>(::cuda_emu::grid_dim))

inline void __syncthreads() { ::cuda_emu::barrier(); }

constexpr int warpSize = 32;

inline void __syncwarp(unsigned mask = 0xffffffffu) { ::cuda_emu::warp_wait(mask); }

template <typename V>
V __shfl_sync(unsigned mask, V value, int source, int width = warpSize) {
  return ::cuda_emu::exchange(mask, value, ::cuda_emu::segment_start(width) + (source & (width - 1)));
}
template <typename V>
V __shfl_up_sync(unsigned mask, V value, unsigned delta, int width = warpSize) {
  const int lane = (int)::cuda_emu::lane_id();
  return ::cuda_emu::exchange(mask, value, (lane & (width - 1)) >= (int)delta ? lane - (int)delta : lane);
}
template <typename V>
V __shfl_down_sync(unsigned mask, V value, unsigned delta, int width = warpSize) {
  const int lane = (int)::cuda_emu::lane_id();
  return ::cuda_emu::exchange(mask, value, (lane & (width - 1)) + (int)delta < width ? lane + (int)delta : lane);
}
template <typename V>
V __shfl_xor_sync(unsigned mask, V value, int lane_mask, int width = warpSize) {
  const int lane = (int)::cuda_emu::lane_id();
  const int source = lane ^ lane_mask;
  return ::cuda_emu::exchange(mask, value, (source & ~(width - 1)) == ::cuda_emu::segment_start(width) ? source : lane);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  std::uint64_t* slots = ::cuda_emu::warp_slots();
  slots[::cuda_emu::lane_id()] = predicate != 0;
  ::cuda_emu::warp_wait(mask);
  unsigned bits = 0;
  for (unsigned lane = 0; lane < 32; ++lane) bits |= (slots[lane] != 0 ? 1u : 0u) << lane;
  ::cuda_emu::warp_wait(mask);
  return bits;
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }

template <typename V>
inline V atomicAdd(V* address, V value) {
  const V old = *address;
  *address = old + value;
  return old;
}

// CUDA's math functions are not correctly rounded: the CUDA C Programming Guide bounds expf by
// 2 ulps and logf, exp, log by 1 ulp. The kernels see the host's (nearly correctly rounded)
// result moved by a deterministic, argument-dependent number of ulps within those bounds, so
// tests must tolerate a GPU's math library, not just the host's.
namespace cuda_emu {
template <typename F>
F within_ulps(F value, F argument, int max_ulps) {
  if (!std::isfinite(value) || value == F(0)) return value;
  std::uint64_t bits = 0;
  std::memcpy(&bits, &argument, sizeof(F));
  bits = (bits ^ (bits >> 29)) * 0xbf58476d1ce4e5b9ull;
  const int steps = (int)((bits >> 32) % (std::uint64_t)(2 * max_ulps + 1)) - max_ulps;
  for (int i = 0; i < (steps < 0 ? -steps : steps); ++i)
    value = std::nextafter(value, steps < 0 ? F(0) : std::numeric_limits<F>::infinity());
  return value;
}
inline float device_expf(float x) { return within_ulps(std::exp(x), x, 2); }
inline double device_exp(double x) { return within_ulps(std::exp(x), x, 1); }
inline float device_logf(float x) { return within_ulps(std::log(x), x, 1); }
inline double device_log(double x) { return within_ulps(std::log(x), x, 1); }
}  // namespace cuda_emu

#define expf(x) ::cuda_emu::device_expf(x)
#define exp(x) ::cuda_emu::device_exp(x)
#define logf(x) ::cuda_emu::device_logf(x)
#define log(x) ::cuda_emu::device_log(x)
