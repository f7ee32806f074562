// Block scheduler of the CPU emulator: runs a kernel's grid one block at a time, each block's
// threads as ucontext fibers switched at __syncthreads. Threads (and blocks) run in index,
// reversed or shuffled order. A barrier reached by some but not all live threads of a block
// (divergent __syncthreads) is reported as an error instead of being silently tolerated.
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "cuda_emu.h"

namespace cuda_emu {
thread_local dim3 thread_idx;
thread_local dim3 block_idx;
thread_local dim3 block_dim;
thread_local dim3 grid_dim;

namespace {
constexpr size_t kStackBytes = 256 * 1024;

struct Fiber {
  ucontext_t context;
  dim3 index;
  bool done = false;
};

using Thunk = void (*)(void**);

thread_local ucontext_t scheduler_context;
thread_local Fiber* current = nullptr;
thread_local Thunk current_thunk = nullptr;
thread_local void** current_args = nullptr;

void fiber_main() {
  current_thunk(current_args);
  current->done = true;  // returning resumes scheduler_context through uc_link
}

// Separate function so that getcontext's second return cannot clobber the caller's locals.
__attribute__((noinline)) void start_fiber(Fiber& fiber, char* stack) {
  fiber.done = false;
  getcontext(&fiber.context);
  fiber.context.uc_stack.ss_sp = stack;
  fiber.context.uc_stack.ss_size = kStackBytes;
  fiber.context.uc_link = &scheduler_context;
  makecontext(&fiber.context, fiber_main, 0);
}

std::vector<size_t> order_of(size_t count, int order, std::mt19937_64& rng) {
  std::vector<size_t> out(count);
  std::iota(out.begin(), out.end(), size_t{0});
  if (order == 1) std::reverse(out.begin(), out.end());
  if (order == 2) std::shuffle(out.begin(), out.end(), rng);
  return out;
}
}  // namespace

void barrier() {
  swapcontext(&current->context, &scheduler_context);
}
}  // namespace cuda_emu

using namespace cuda_emu;

// Launch ``thunk(args)`` over grid x block (cuLaunchKernel's void** argument convention).
// order: 0 index, 1 reversed, 2 shuffled (seeded). Returns 0, or 1 with a message in ``error``.
extern "C" int emu_launch(Thunk thunk, void** args, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                          unsigned bz, int order, unsigned long long seed, char* error, size_t error_size) {
  std::mt19937_64 rng(seed);
  const size_t threads = (size_t)bx * by * bz;
  const size_t blocks = (size_t)gx * gy * gz;
  std::vector<Fiber> fibers(threads);
  std::unique_ptr<char[]> stacks(new char[threads * kStackBytes]);  // uninitialised: pages stay untouched
  grid_dim = dim3{gx, gy, gz};
  block_dim = dim3{bx, by, bz};
  current_thunk = thunk;
  current_args = args;
  for (size_t block : order_of(blocks, order, rng)) {
    block_idx = dim3{(unsigned)(block % gx), (unsigned)(block / gx % gy), (unsigned)(block / ((size_t)gx * gy))};
    for (size_t t = 0; t < threads; ++t) {
      fibers[t].index = dim3{(unsigned)(t % bx), (unsigned)(t / bx % by), (unsigned)(t / ((size_t)bx * by))};
      start_fiber(fibers[t], stacks.get() + t * kStackBytes);
    }
    size_t live = threads;
    while (live > 0) {
      size_t finished_now = 0;
      for (size_t t : order_of(threads, order, rng)) {
        Fiber& f = fibers[t];
        if (f.done) continue;
        current = &f;
        thread_idx = f.index;
        swapcontext(&scheduler_context, &f.context);
        if (f.done) ++finished_now;
      }
      if (finished_now != 0 && finished_now != live) {
        std::snprintf(error, error_size,
                      "divergent __syncthreads in block (%u,%u,%u): %zu of %zu live threads returned while the "
                      "others wait at a barrier",
                      block_idx.x, block_idx.y, block_idx.z, finished_now, live);
        return 1;
      }
      live -= finished_now;
    }
  }
  current = nullptr;
  return 0;
}
