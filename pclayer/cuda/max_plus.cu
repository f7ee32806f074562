// Max-product (MPE) dense sum layer: y[b,g,n] = max_c (x[b,g,c] + logw[g',n,c]), the max-plus
// matrix product, without the (B, G, N, C) temporary. Shapes (row-major, contiguous): x (B,G,C),
// logw (Gw,N,C) with Gw in {1, G} (g' = 0 when shared_weights), y (B,G,N). Semantics equal
// pclayer.ops.max_plus.max_plus: -inf entries are absorbing, NaN propagates.
//
// Tiled like a matrix product: a block computes a PC_MP_TILE x PC_MP_TILE tile of (rows, nodes)
// of one group, staging PC_MP_TILE-wide slices of x and logw along C in shared memory (loads
// coalesced along C, padded rows against bank conflicts); each thread keeps PC_MP_WORK x
// PC_MP_WORK running maxima in registers.
#include "logspace.h"

#define PC_MP_TILE 32
#define PC_MP_SIDE 16  // threads per side of the block: PC_MP_SIDE x PC_MP_SIDE
#define PC_MP_WORK (PC_MP_TILE / PC_MP_SIDE)

template <typename T>
__device__ inline T pc_max_nan(T m, T v) {
  return (v > m || v != v) ? v : m;  // a NaN, once taken, is never replaced (v > NaN is false)
}

// Grid (ceil(N / PC_MP_TILE), ceil(B / PC_MP_TILE), G), block (PC_MP_SIDE, PC_MP_SIDE).
template <typename T>
__device__ void max_plus_fwd(const T* __restrict__ x, const T* __restrict__ logw, T* __restrict__ y, int B, int G,
                             int N, int C, int shared_weights) {
  __shared__ T xs[PC_MP_TILE][PC_MP_TILE + 1];
  __shared__ T ws[PC_MP_TILE][PC_MP_TILE + 1];
  const int g = blockIdx.z;
  const int n0 = blockIdx.x * PC_MP_TILE;
  const int b0 = blockIdx.y * PC_MP_TILE;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int linear = ty * PC_MP_SIDE + tx;
  const T* wg = logw + (long long)(shared_weights ? 0 : g) * N * C;
  T m[PC_MP_WORK][PC_MP_WORK];
  for (int i = 0; i < PC_MP_WORK; ++i)
    for (int j = 0; j < PC_MP_WORK; ++j) m[i][j] = (T)-INFINITY;
  for (int c0 = 0; c0 < C; c0 += PC_MP_TILE) {
    for (int e = linear; e < PC_MP_TILE * PC_MP_TILE; e += PC_MP_SIDE * PC_MP_SIDE) {
      const int r = e / PC_MP_TILE, c = c0 + e % PC_MP_TILE;
      const bool in_c = c < C;
      xs[r][e % PC_MP_TILE] = in_c && b0 + r < B ? x[((long long)(b0 + r) * G + g) * C + c] : (T)-INFINITY;
      ws[r][e % PC_MP_TILE] = in_c && n0 + r < N ? wg[(long long)(n0 + r) * C + c] : (T)-INFINITY;
    }
    __syncthreads();
    const int len = C - c0 < PC_MP_TILE ? C - c0 : PC_MP_TILE;
    for (int c = 0; c < len; ++c)
      for (int i = 0; i < PC_MP_WORK; ++i)
        for (int j = 0; j < PC_MP_WORK; ++j)
          m[i][j] = pc_max_nan(m[i][j], (T)(xs[ty + i * PC_MP_SIDE][c] + ws[tx + j * PC_MP_SIDE][c]));
    __syncthreads();
  }
  for (int i = 0; i < PC_MP_WORK; ++i)
    for (int j = 0; j < PC_MP_WORK; ++j) {
      const int b = b0 + ty + i * PC_MP_SIDE, n = n0 + tx + j * PC_MP_SIDE;
      if (b < B && n < N) y[((long long)b * G + g) * N + n] = m[i][j];
    }
}

extern "C" __global__ void pc_max_plus_fwd_f32(const float* __restrict__ x, const float* __restrict__ logw,
                                               float* __restrict__ y, int B, int G, int N, int C, int shared_weights) {
  max_plus_fwd<float>(x, logw, y, B, G, N, C, shared_weights);
}
extern "C" __global__ void pc_max_plus_fwd_f64(const double* __restrict__ x, const double* __restrict__ logw,
                                               double* __restrict__ y, int B, int G, int N, int C, int shared_weights) {
  max_plus_fwd<double>(x, logw, y, B, G, N, C, shared_weights);
}
