// Top-down sampling step: for each draw a, pick an index of the row
//   logits[a, c] = table[table_rows[a], c] (+ addend[addend_rows[a], c] when has_addend)
// by inverse CDF with a caller-given uniform u[a], as the torch path pclayer.ops.inverse_cdf:
//   probs = exp(logits - max) (max replaced by 0 when not finite), cdf = prefix sums of probs
//   accumulated in double and rounded to T, index = first c with cdf[c] > u * cdf[C-1],
//   clamped to the last c with probs[c] > 0 (0 if none).
// The gather and the addition (a sum node's log-weights + its children's values) are fused.
// The prefix sums are summed in a parallel order, so they can differ from torch's sequential
// ones in the last bits: a draw whose target u * cdf[C-1] lies within a few ulps of a CDF
// boundary may pick the neighbouring index (see pclayer/cuda/README.md).
//
// A group of threads handles one row: a warp (pc_inverse_cdf_warp_*, 4 rows per 128-thread
// block, rows of up to PC_CDF_WARP_MAX_C) or a block (pc_inverse_cdf_block_*, 1024 threads,
// rows of up to PC_CDF_BLOCK_MAX_C). The row is read in tiles of one element per thread
// (coalesced): pass 1 takes the maximum, pass 2 scans each tile in double and records the
// running prefix at each tile's end, pass 3 finds the first tile whose end exceeds the target
// and rescans only that tile. Passes 2 and 3 compute each prefix with the same operations in
// the same order, so the total and the prefixes agree exactly.
#include "logspace.h"

#define PC_FULL_MASK 0xffffffffu
#define PC_WARP 32
#define PC_CDF_WARP_ROWS 4  // rows (warps) per block of the warp kernel
#define PC_CDF_WARP_TILES 128
#define PC_CDF_WARP_MAX_C (PC_WARP * PC_CDF_WARP_TILES)  // 4096
#define PC_CDF_BLOCK 1024   // threads per block of the block kernel
#define PC_CDF_BLOCK_TILES 4096
#define PC_CDF_BLOCK_MAX_C (PC_CDF_BLOCK * PC_CDF_BLOCK_TILES)  // 4,194,304
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

// One warp per row. ends: this warp's PC_CDF_WARP_TILES running prefixes.
struct WarpGroup {
  int rank;
  double* ends;
  __device__ int size() const { return PC_WARP; }
  template <typename V, typename Op>
  __device__ V reduce(V v, Op op) const { return warp_reduce(v, op); }
  __device__ double scan(double v) const { return warp_inclusive_scan(v, rank); }
  __device__ double last(double v) const { return __shfl_sync(PC_FULL_MASK, v, PC_WARP - 1); }
  __device__ void sync() const { __syncwarp(); }
};

// One block per row; the values every thread reduces are staged in shared memory (one slot
// per warp, converted to double, which holds every float, double and int exactly).
struct BlockGroup {
  int rank;
  double* ends;
  double* scratch;  // PC_WARP slots
  __device__ int size() const { return blockDim.x; }
  __device__ int warps() const { return (int)(blockDim.x / PC_WARP); }
  template <typename V, typename Op>
  __device__ V reduce(V v, Op op) const {
    v = warp_reduce(v, op);
    if (rank % PC_WARP == 0) scratch[rank / PC_WARP] = (double)v;
    __syncthreads();
    V out = (V)scratch[0];
    for (int w = 1; w < warps(); ++w) out = op(out, (V)scratch[w]);
    __syncthreads();
    return out;
  }
  __device__ double scan(double v) const {
    v = warp_inclusive_scan(v, rank % PC_WARP);
    if (rank % PC_WARP == PC_WARP - 1) scratch[rank / PC_WARP] = v;
    __syncthreads();
    double offset = 0.0;
    for (int w = 0; w < rank / PC_WARP; ++w) offset += scratch[w];
    __syncthreads();
    return offset + v;
  }
  __device__ double last(double v) const {
    if (rank == size() - 1) scratch[0] = v;
    __syncthreads();
    const double out = scratch[0];
    __syncthreads();
    return out;
  }
  __device__ void sync() const { __syncthreads(); }
};

// The row of draw ``draw``: table row + addend row (fused gather), read at column c.
template <typename T>
struct DrawRow {
  const T* table;
  const T* addend;  // nullptr without addend
  __device__ T operator()(int c) const { return addend ? (T)(table[c] + addend[c]) : table[c]; }
};

template <typename T, typename Group>
__device__ long long inverse_cdf_row(const Group& group, const DrawRow<T>& row, T u, int C) {
  const int size = group.size();
  const int tiles = (C + size - 1) / size;
  T m = (T)-INFINITY;
  for (int c = group.rank; c < C; c += size) m = pc_max(m, row(c));
  m = group.reduce(m, MaxOp());
  if (!pc_isfinite(m)) m = (T)0;
  // pass 2: running prefix at each tile's end, and the last positive index
  double base = 0.0;
  int last_positive = -1;
  for (int j = 0; j < tiles; ++j) {
    const int c = j * size + group.rank;
    const T p = c < C ? pc_exp((T)(row(c) - m)) : (T)0;
    if (p > (T)0) last_positive = c;
    base = group.last(base + group.scan((double)p));
    if (group.rank == 0) group.ends[j] = base;
  }
  last_positive = group.reduce(last_positive, MaxOp());
  group.sync();  // ends[] written by rank 0 is read by every rank below
  const T target = u * (T)base;
  int tile = PC_NO_INDEX;
  for (int j = group.rank; j < tiles; j += size) {
    if ((T)group.ends[j] > target) {
      tile = j;
      break;
    }
  }
  tile = group.reduce(tile, MinOp());
  long long index = C;
  if (tile != PC_NO_INDEX) {  // rescan the crossing tile exactly as pass 2 did
    const int c = tile * size + group.rank;
    const T p = c < C ? pc_exp((T)(row(c) - m)) : (T)0;
    const double prefix = (tile > 0 ? group.ends[tile - 1] : 0.0) + group.scan((double)p);
    index = group.reduce(p > (T)0 && (T)prefix > target ? c : PC_NO_INDEX, MinOp());
    // A parallel prefix need not grow monotonically within the tile: if no positive entry's
    // prefix exceeds the target, take the tile's last positive entry (the tile has some,
    // since its end exceeds the previous tile's).
    if (index == PC_NO_INDEX) index = group.reduce(p > (T)0 ? c : -1, MaxOp());
  }
  const long long clamp = last_positive < 0 ? 0 : last_positive;
  return index < clamp ? index : clamp;
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
