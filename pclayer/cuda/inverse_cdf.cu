// Top-down sampling step: for each draw a, pick an index of the row
//   logits[a, c] = table[table_rows[a], c] (+ addend[addend_rows[a], c] when has_addend)
// by inverse CDF with a caller-given uniform u[a], as the torch path pclayer.ops.inverse_cdf:
//   probs = exp(logits - max) (max replaced by 0 when not finite), cdf = prefix sums of probs
//   (here accumulated in double and rounded to T), total = cdf[C-1],
//   index = the first c with cdf[c] > min(u * total, the T below total): where u * total
//   rounds up to the total, the first c at which the CDF reaches it; 0 for a row of zeros.
// The gather and the addition (a sum node's log-weights + its children's values) are fused.
// The prefix sums are summed in a parallel order, so they can differ from torch's sequential
// ones in the last bits: a draw whose target lies within a few ulps of a CDF boundary may pick
// the neighbouring index (see pclayer/cuda/README.md).
//
// A group of threads handles one row: a warp (pc_inverse_cdf_warp_*, 4 rows per 128-thread
// block, rows of up to PC_CDF_WARP_MAX_C) or a block (pc_inverse_cdf_block_*, 1024 threads,
// rows of up to PC_CDF_BLOCK_MAX_C). Pass 1 takes the maximum (coalesced, one element per
// thread and step, then a shuffle/shared-memory reduction). Pass 2 reads the row in tiles of
// PC_CDF_ITEMS consecutive elements per thread, sums each thread's elements in double, scans
// the group's sums (warp shuffles, then one shuffle scan of the warp totals) and records the
// running prefix at each tile's end. Pass 3 finds the first tile whose end exceeds the target
// (a parallel search over the recorded ends) and rescans only that tile.
#include "logspace.h"

#define PC_FULL_MASK 0xffffffffu
#define PC_WARP 32
#define PC_CDF_ITEMS 4      // consecutive elements per thread and tile
#define PC_CDF_WARP_ROWS 4  // rows (warps) per block of the warp kernel
#define PC_CDF_WARP_MAX_C 4096
#define PC_CDF_WARP_TILES (PC_CDF_WARP_MAX_C / (PC_WARP * PC_CDF_ITEMS))  // 32
#define PC_CDF_BLOCK 1024   // threads per block of the block kernel
#define PC_CDF_BLOCK_TILES 4096
#define PC_CDF_BLOCK_MAX_C (PC_CDF_BLOCK * PC_CDF_ITEMS * PC_CDF_BLOCK_TILES)  // 16,777,216
#define PC_NO_INDEX 0x7fffffff

template <typename V>
__device__ inline V pc_max(V a, V b) { return a > b ? a : b; }
template <typename V>
__device__ inline V pc_min(V a, V b) { return a < b ? a : b; }

struct MaxOp {
  template <typename V>
  __device__ V operator()(V a, V b) const { return pc_max(a, b); }
};
struct MinOp {
  template <typename V>
  __device__ V operator()(V a, V b) const { return pc_min(a, b); }
};

template <typename V, typename Op>
__device__ inline V warp_reduce(V v, Op op) {
  for (int offset = PC_WARP / 2; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(PC_FULL_MASK, v, offset));
  return v;
}

__device__ inline double warp_inclusive_scan(double v, int lane) {
  for (int offset = 1; offset < PC_WARP; offset <<= 1) {
    const double before = __shfl_up_sync(PC_FULL_MASK, v, offset);
    if (lane >= offset) v += before;
  }
  return v;
}

// A thread's exclusive prefix of the group's values (in rank order) and the group's total.
struct Scan {
  double exclusive;
  double total;
};

// One warp per row. ends: this warp's PC_CDF_WARP_TILES running prefixes.
struct WarpGroup {
  int rank;
  double* ends;
  __device__ int size() const { return PC_WARP; }
  template <typename V, typename Op>
  __device__ V reduce(V v, Op op) const { return warp_reduce(v, op); }
  __device__ Scan scan(double v) const {
    const double inclusive = warp_inclusive_scan(v, rank);
    const double before = __shfl_up_sync(PC_FULL_MASK, inclusive, 1);
    return Scan{rank == 0 ? 0.0 : before, __shfl_sync(PC_FULL_MASK, inclusive, PC_WARP - 1)};
  }
  __device__ void sync() const { __syncwarp(); }
};

// One block per row (at most 32 warps). Warp results are staged in shared memory, one slot
// per warp, as double (which holds every float, double and int exactly); every warp then
// combines the slots with the same shuffles, so all threads get identical values.
struct BlockGroup {
  int rank;
  double* ends;
  double* scratch;  // PC_WARP slots
  __device__ int size() const { return blockDim.x; }
  __device__ int lane() const { return rank % PC_WARP; }
  __device__ int warps() const { return (int)(blockDim.x / PC_WARP); }
  template <typename V, typename Op>
  __device__ V reduce(V v, Op op) const {
    v = warp_reduce(v, op);
    if (lane() == 0) scratch[rank / PC_WARP] = (double)v;
    __syncthreads();
    V out = (V)scratch[lane() < warps() ? lane() : 0];
    __syncthreads();  // slots read before they are written again
    return warp_reduce(out, op);
  }
  __device__ Scan scan(double v) const {
    const double inclusive = warp_inclusive_scan(v, lane());
    if (lane() == PC_WARP - 1) scratch[rank / PC_WARP] = inclusive;
    const double before = __shfl_up_sync(PC_FULL_MASK, inclusive, 1);
    __syncthreads();
    const double warp_inclusive = warp_inclusive_scan(lane() < warps() ? scratch[lane()] : 0.0, lane());
    __syncthreads();  // slots read before they are written again
    const int warp = rank / PC_WARP;
    const double offset = __shfl_sync(PC_FULL_MASK, warp_inclusive, warp > 0 ? warp - 1 : 0);
    const double total = __shfl_sync(PC_FULL_MASK, warp_inclusive, warps() - 1);
    const double in_warp = lane() == 0 ? 0.0 : before;
    return Scan{warp > 0 ? offset + in_warp : in_warp, total};
  }
  __device__ void sync() const { __syncthreads(); }
};

// The row of a draw: table row + addend row (fused gather), read at column c.
template <typename T>
struct DrawRow {
  const T* table;
  const T* addend;  // nullptr without addend
  __device__ T operator()(int c) const { return addend ? (T)(table[c] + addend[c]) : table[c]; }
};

// Probabilities p = exp(logit - m) of the PC_CDF_ITEMS consecutive elements from ``first``
// (0 beyond C) and their sum in double, in column order.
template <typename T>
__device__ inline double tile_items(const DrawRow<T>& row, T m, int first, int C, T (&p)[PC_CDF_ITEMS]) {
  double sum = 0.0;
  for (int e = 0; e < PC_CDF_ITEMS; ++e) {
    p[e] = first + e < C ? pc_exp((T)(row(first + e) - m)) : (T)0;
    sum += (double)p[e];
  }
  return sum;
}

template <typename T, typename Group>
__device__ long long inverse_cdf_row(const Group& group, const DrawRow<T>& row, T u, int C) {
  const int span = group.size() * PC_CDF_ITEMS;
  const int tiles = (C + span - 1) / span;
  T m = (T)-INFINITY;
  for (int c = group.rank; c < C; c += group.size()) m = pc_max(m, row(c));
  m = group.reduce(m, MaxOp());
  if (!pc_isfinite(m)) m = (T)0;
  // pass 2: the running prefix at each tile's end
  T p[PC_CDF_ITEMS];
  double base = 0.0;
  for (int j = 0; j < tiles; ++j) {
    const Scan scan = group.scan(tile_items(row, m, j * span + group.rank * PC_CDF_ITEMS, C, p));
    base += scan.total;
    if (group.rank == 0) group.ends[j] = base;
  }
  group.sync();  // ends[] written by rank 0 is read by every rank below
  const T total = (T)base;
  const T below_total = pc_below(total);
  const T scaled = u * total;
  const T target = scaled < below_total ? scaled : below_total;
  int tile = PC_NO_INDEX;
  for (int j = group.rank; j < tiles; j += group.size()) {
    if ((T)group.ends[j] > target) {
      tile = j;
      break;
    }
  }
  tile = group.reduce(tile, MinOp());
  if (tile == PC_NO_INDEX) return 0;  // a row of zeros (else the last tile's end, the total, exceeds the target)
  // rescan the crossing tile
  const int first = tile * span + group.rank * PC_CDF_ITEMS;
  const Scan scan = group.scan(tile_items(row, m, first, C, p));
  double prefix = (tile > 0 ? group.ends[tile - 1] : 0.0) + scan.exclusive;
  int crossing = PC_NO_INDEX, positive = -1;
  for (int e = 0; e < PC_CDF_ITEMS; ++e) {
    prefix += (double)p[e];
    if (p[e] > (T)0) {
      positive = first + e;
      if (crossing == PC_NO_INDEX && (T)prefix > target) crossing = first + e;
    }
  }
  const int index = group.reduce(crossing, MinOp());
  // The parallel prefixes need not reach the tile's end exactly: if no positive entry's prefix
  // exceeds the target, take the tile's last positive entry (the tile has some, since its end
  // exceeds the previous tile's). A draw never lands on an entry of probability zero.
  return index != PC_NO_INDEX ? index : group.reduce(positive, MaxOp());
}

template <typename T>
__device__ DrawRow<T> draw_row(const T* table, const long long* table_rows, const T* addend,
                               const long long* addend_rows, int has_addend, long long draw, int C) {
  return DrawRow<T>{table + table_rows[draw] * C, has_addend ? addend + addend_rows[draw] * C : nullptr};
}

// Grid (ceil(A / PC_CDF_WARP_ROWS)), block (PC_WARP * PC_CDF_WARP_ROWS); C <= PC_CDF_WARP_MAX_C.
template <typename T>
__device__ void inverse_cdf_warp(const T* __restrict__ table, const long long* __restrict__ table_rows,
                                 const T* __restrict__ addend, const long long* __restrict__ addend_rows,
                                 int has_addend, const T* __restrict__ uniforms, long long* __restrict__ out,
                                 long long A, int C) {
  __shared__ double ends[PC_CDF_WARP_ROWS][PC_CDF_WARP_TILES];
  const int warp = (int)(threadIdx.x / PC_WARP);
  const long long draw = (long long)blockIdx.x * PC_CDF_WARP_ROWS + warp;
  if (draw >= A) return;  // the whole warp leaves together
  const WarpGroup group{(int)(threadIdx.x % PC_WARP), ends[warp]};
  const long long index =
      inverse_cdf_row(group, draw_row(table, table_rows, addend, addend_rows, has_addend, draw, C), uniforms[draw], C);
  if (group.rank == 0) out[draw] = index;
}

// Grid (A), block (PC_CDF_BLOCK); C <= PC_CDF_BLOCK_MAX_C.
template <typename T>
__device__ void inverse_cdf_block(const T* __restrict__ table, const long long* __restrict__ table_rows,
                                  const T* __restrict__ addend, const long long* __restrict__ addend_rows,
                                  int has_addend, const T* __restrict__ uniforms, long long* __restrict__ out,
                                  long long A, int C) {
  __shared__ double ends[PC_CDF_BLOCK_TILES];
  __shared__ double scratch[PC_WARP];
  const long long draw = blockIdx.x;
  if (draw >= A) return;  // uniform over the block
  const BlockGroup group{(int)threadIdx.x, ends, scratch};
  const long long index =
      inverse_cdf_row(group, draw_row(table, table_rows, addend, addend_rows, has_addend, draw, C), uniforms[draw], C);
  if (group.rank == 0) out[draw] = index;
}

extern "C" __global__ void pc_inverse_cdf_warp_f32(const float* __restrict__ table, const long long* __restrict__ table_rows,
    const float* __restrict__ addend, const long long* __restrict__ addend_rows, int has_addend,
    const float* __restrict__ uniforms, long long* __restrict__ out, long long A, int C) {
  inverse_cdf_warp<float>(table, table_rows, addend, addend_rows, has_addend, uniforms, out, A, C);
}
extern "C" __global__ void pc_inverse_cdf_warp_f64(const double* __restrict__ table, const long long* __restrict__ table_rows,
    const double* __restrict__ addend, const long long* __restrict__ addend_rows, int has_addend,
    const double* __restrict__ uniforms, long long* __restrict__ out, long long A, int C) {
  inverse_cdf_warp<double>(table, table_rows, addend, addend_rows, has_addend, uniforms, out, A, C);
}
extern "C" __global__ void pc_inverse_cdf_block_f32(const float* __restrict__ table, const long long* __restrict__ table_rows,
    const float* __restrict__ addend, const long long* __restrict__ addend_rows, int has_addend,
    const float* __restrict__ uniforms, long long* __restrict__ out, long long A, int C) {
  inverse_cdf_block<float>(table, table_rows, addend, addend_rows, has_addend, uniforms, out, A, C);
}
extern "C" __global__ void pc_inverse_cdf_block_f64(const double* __restrict__ table, const long long* __restrict__ table_rows,
    const double* __restrict__ addend, const long long* __restrict__ addend_rows, int has_addend,
    const double* __restrict__ uniforms, long long* __restrict__ out, long long A, int C) {
  inverse_cdf_block<double>(table, table_rows, addend, addend_rows, has_addend, uniforms, out, A, C);
}
