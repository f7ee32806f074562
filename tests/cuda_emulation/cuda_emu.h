// Portability header: lets g++ compile unchanged CUDA C kernels for CPU emulation.
// Force-included (-include cuda_emu.h) before each .cu file. Provides the CUDA keywords,
// the built-in index variables (read-only), __shared__ memory and __syncthreads. Each block's
// threads run as cooperating fibers (see scheduler.cpp): a fiber runs until it reaches a
// barrier or returns, so memory races that a missing barrier allows become visible when
// threads run in reversed or shuffled order. Atomics and warp shuffles are not provided
// because no pclayer kernel uses them; a kernel that does fails to compile here.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

namespace cuda_emu {
extern thread_local dim3 thread_idx;
extern thread_local dim3 block_idx;
extern thread_local dim3 block_dim;
extern thread_local dim3 grid_dim;
void barrier();
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
