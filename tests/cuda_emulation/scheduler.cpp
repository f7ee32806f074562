// Block scheduler of the CPU emulator: runs a kernel's grid one block at a time, each block's
// threads as ucontext fibers. A fiber runs until it reaches a block barrier (__syncthreads),
// a warp-level operation (__shfl_*_sync, __ballot_sync, __syncwarp) or returns. The next fiber
// to run is the runnable one with the lowest index ("index"), the highest ("reversed") or a
// random one ("shuffled"); a warp resumes as soon as its 32 lanes wait at a warp-level
// operation, so in index and reversed order one warp runs ahead of the others up to the next
// __syncthreads (exposing races between warps), and when every live thread waits at
// __syncthreads the block resumes. Blocks run in the same order. Errors instead of silent tolerance: a thread returning while others of its
// block wait at __syncthreads (divergent barrier), a warp-level operation that not all 32
// lanes of the warp reach (exited or absent lanes, or lanes at __syncthreads instead), and a
// mask other than 0xffffffff.
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "cuda_emu.h"

namespace cuda_emu {
thread_local dim3 thread_idx;
thread_local dim3 block_idx;
thread_local dim3 block_dim;
thread_local dim3 grid_dim;

namespace {
constexpr size_t kStackBytes = 256 * 1024;
constexpr unsigned kWarpSize = 32;

enum class State { Ready, AtBlockBarrier, AtWarpOp, Failed, Done };

struct Fiber {
  ucontext_t context;  // the fiber's start (makecontext); later switches use jump
  jmp_buf jump;
  bool started = false;
  dim3 index;
  size_t linear = 0;
  State state = State::Ready;
};

using Thunk = void (*)(void**);

thread_local jmp_buf scheduler_jump;
thread_local Fiber* current = nullptr;
thread_local Thunk current_thunk = nullptr;
thread_local void** current_args = nullptr;
thread_local std::vector<std::uint64_t> slots;  // one slot per thread, for warp-level operations
thread_local std::string failure;

// Switches are _setjmp/_longjmp between stacks (no signal-mask system call, unlike
// swapcontext); ucontext only starts each fiber on its own stack.
[[noreturn]] void fiber_main() {
  current_thunk(current_args);
  current->state = State::Done;
  _longjmp(scheduler_jump, 1);
}

// Separate function so that getcontext's second return cannot clobber the caller's locals.
__attribute__((noinline)) void start_fiber(Fiber& fiber, char* stack) {
  fiber.state = State::Ready;
  fiber.started = false;
  getcontext(&fiber.context);
  fiber.context.uc_stack.ss_sp = stack;
  fiber.context.uc_stack.ss_size = kStackBytes;
  fiber.context.uc_link = nullptr;  // fiber_main never returns
  makecontext(&fiber.context, fiber_main, 0);
}

std::vector<size_t> order_of(size_t count, int order, std::mt19937_64& rng) {
  std::vector<size_t> out(count);
  std::iota(out.begin(), out.end(), size_t{0});
  if (order == 1) std::reverse(out.begin(), out.end());
  if (order == 2) std::shuffle(out.begin(), out.end(), rng);
  return out;
}

// Runs ``fiber`` until it waits or returns. A function of its own, so that no caller's local
// lives across the _setjmp.
__attribute__((noinline)) void resume(Fiber& fiber) {
  if (_setjmp(scheduler_jump) == 0) {
    if (fiber.started) _longjmp(fiber.jump, 1);
    fiber.started = true;
    setcontext(&fiber.context);
  }
}

void wait(State state) {
  current->state = state;
  if (_setjmp(current->jump) == 0) _longjmp(scheduler_jump, 1);
}

// Why the warp of thread ``first`` (its lane 0) cannot finish the warp-level operation some of
// its lanes wait at.
std::string stuck_warp(const std::vector<Fiber>& fibers, size_t first) {
  const size_t end = std::min(first + kWarpSize, fibers.size());
  const std::string warp = "warp-level operation with mask 0xffffffff in warp " + std::to_string(first / kWarpSize);
  if (end - first < kWarpSize)
    return warp + ": lane " + std::to_string(end - first) + " does not exist (block size not a multiple of 32)";
  for (size_t t = first; t < end; ++t)
    if (fibers[t].state != State::AtWarpOp)
      return warp + ": lane " + std::to_string(t - first) +
             (fibers[t].state == State::Done ? " has exited" : " waits at __syncthreads instead");
  return warp;
}
}  // namespace

void barrier() { wait(State::AtBlockBarrier); }

unsigned lane_id() { return (unsigned)(current->linear % kWarpSize); }

std::uint64_t* warp_slots() { return slots.data() + current->linear / kWarpSize * kWarpSize; }

void warp_wait(unsigned mask) {
  if (mask != 0xffffffffu) {
    char text[96];
    std::snprintf(text, sizeof text, "warp-level operation with mask %#x: the emulator supports only 0xffffffff", mask);
    failure = text;
    wait(State::Failed);
  }
  wait(State::AtWarpOp);
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
  slots.assign(threads + kWarpSize, 0);
  grid_dim = dim3{gx, gy, gz};
  block_dim = dim3{bx, by, bz};
  current_thunk = thunk;
  current_args = args;
  failure.clear();
  auto fail = [&](const std::string& message) {
    std::snprintf(error, error_size, "%s", message.c_str());
    current = nullptr;
    return 1;
  };
  std::set<std::pair<std::uint64_t, size_t>> ready;  // (priority, thread): the lowest runs next
  auto make_ready = [&](size_t t) {
    fibers[t].state = State::Ready;
    ready.insert({order == 0 ? t : order == 1 ? threads - 1 - t : rng(), t});
  };
  for (size_t block : order_of(blocks, order, rng)) {
    block_idx = dim3{(unsigned)(block % gx), (unsigned)(block / gx % gy), (unsigned)(block / ((size_t)gx * gy))};
    for (size_t t = 0; t < threads; ++t) {
      fibers[t].index = dim3{(unsigned)(t % bx), (unsigned)(t / bx % by), (unsigned)(t / ((size_t)bx * by))};
      fibers[t].linear = t;
      start_fiber(fibers[t], stacks.get() + t * kStackBytes);
      make_ready(t);
    }
    size_t live = threads;
    size_t finished_in_phase = 0;  // threads that returned since the block last passed __syncthreads
    while (live > 0) {
      if (ready.empty()) {  // every live thread waits: at __syncthreads, or at a warp operation that cannot finish
        for (size_t first = 0; first < threads; first += kWarpSize)
          for (size_t t = first; t < std::min(first + kWarpSize, threads); ++t)
            if (fibers[t].state == State::AtWarpOp) return fail(stuck_warp(fibers, first));
        if (finished_in_phase != 0) {
          char text[256];
          std::snprintf(text, sizeof text,
                        "divergent __syncthreads in block (%u,%u,%u): %zu threads returned while %zu others wait at a "
                        "barrier",
                        block_idx.x, block_idx.y, block_idx.z, finished_in_phase, live);
          return fail(text);
        }
        for (size_t t = 0; t < threads; ++t)
          if (fibers[t].state == State::AtBlockBarrier) make_ready(t);
        continue;
      }
      const size_t t = ready.begin()->second;
      ready.erase(ready.begin());
      Fiber& f = fibers[t];
      current = &f;
      thread_idx = f.index;
      resume(f);
      if (f.state == State::Failed) return fail(failure);
      if (f.state == State::Done) --live, ++finished_in_phase;
      if (f.state == State::AtWarpOp) {
        const size_t first = t / kWarpSize * kWarpSize;
        const size_t end = std::min(first + kWarpSize, threads);
        bool complete = end - first == kWarpSize;
        for (size_t lane = first; lane < end && complete; ++lane) complete = fibers[lane].state == State::AtWarpOp;
        if (complete)
          for (size_t lane = first; lane < end; ++lane) make_ready(lane);
      }
    }
  }
  current = nullptr;
  return 0;
}
