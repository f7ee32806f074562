// Dense sum layer: y[b,g,n] = log sum_c exp(logw[g',n,c] + x[b,g,c]) and its backward.
// Shapes (row-major, contiguous): x (B,G,C), logw (Gw,N,C) with Gw in {1, G} (g' = 0 when
// shared_weights), y / grad_y (B,G,N). Semantics equal pclayer.ops.log_matmul_exp.
#include "logspace.h"

#define PC_SUM_TILE 128  // threads per block of pc_sum_dense_fwd_*; also the x tile length

// Grid (B*G, ceil(N / PC_SUM_TILE)), block (PC_SUM_TILE). Each block stages tiles of one
// row of x in shared memory; each thread accumulates one output node online.
template <typename T>
__device__ void sum_dense_fwd(const T* __restrict__ x, const T* __restrict__ logw, T* __restrict__ y,
                              int G, int N, int C, int shared_weights) {
  __shared__ T tile[PC_SUM_TILE];
  const long long row = blockIdx.x;
  const int g = (int)(row % G);
  const int n = blockIdx.y * blockDim.x + threadIdx.x;
  const bool active = n < N;
  const T* xr = x + row * C;
  const T* wr = logw + ((long long)(shared_weights ? 0 : g) * N + (active ? n : 0)) * C;
  LogSumExp<T> acc;
  acc.init();
  for (int c0 = 0; c0 < C; c0 += blockDim.x) {
    const int c = c0 + threadIdx.x;
    tile[threadIdx.x] = c < C ? xr[c] : (T)-INFINITY;
    __syncthreads();
    const int len = C - c0 < (int)blockDim.x ? C - c0 : (int)blockDim.x;
    if (active) {
      for (int k = 0; k < len; ++k) acc.add(tile[k] + wr[c0 + k]);
    }
    __syncthreads();
  }
  if (active) y[row * N + n] = acc.value();
}

// Node flows: grad_x[b,g,c] = sum_n grad_y[b,g,n] exp(x[b,g,c] + logw[g',n,c] - y[b,g,n])
// over finite y. One thread per element of x: grid (ceil(B*G*C / block)).
template <typename T>
__device__ void sum_dense_grad_x(const T* __restrict__ x, const T* __restrict__ logw, const T* __restrict__ y,
                                 const T* __restrict__ grad_y, T* __restrict__ grad_x, long long rows, int G,
                                 int N, int C, int shared_weights) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows * C) return;
  const long long row = i / C;
  const int c = (int)(i % C);
  const T* w = logw + (long long)(shared_weights ? 0 : (int)(row % G)) * N * C + c;
  const T xv = x[i];
  T acc = (T)0;
  for (int n = 0; n < N; ++n) {
    const T yn = y[row * N + n];
    if (pc_isfinite(yn)) acc += grad_y[row * N + n] * pc_exp(xv + w[(long long)n * C] - yn);
  }
  grad_x[i] = acc;
}

// Parameter flows (EM expected counts): grad_logw[g',n,c] = sum over b (and over g when the
// weights are shared) of grad_y[b,g,n] exp(x[b,g,c] + logw[g',n,c] - y[b,g,n]) over finite y.
// One thread per weight: grid (ceil(Gw*N*C / block)); deterministic (no atomics).
template <typename T>
__device__ void sum_dense_grad_logw(const T* __restrict__ x, const T* __restrict__ logw, const T* __restrict__ y,
                                    const T* __restrict__ grad_y, T* __restrict__ grad_logw, int B, int G, int Gw,
                                    int N, int C) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long long)Gw * N * C) return;
  const int c = (int)(i % C);
  const int n = (int)((i / C) % N);
  const int gw = (int)(i / ((long long)N * C));
  const int g_begin = Gw == 1 ? 0 : gw;
  const int g_end = Gw == 1 ? G : gw + 1;
  const T lw = logw[i];
  T acc = (T)0;
  for (int b = 0; b < B; ++b) {
    for (int g = g_begin; g < g_end; ++g) {
      const long long row = (long long)b * G + g;
      const T yn = y[row * N + n];
      if (pc_isfinite(yn)) acc += grad_y[row * N + n] * pc_exp(x[row * C + c] + lw - yn);
    }
  }
  grad_logw[i] = acc;
}

extern "C" __global__ void pc_sum_dense_fwd_f32(const float* __restrict__ x, const float* __restrict__ logw,
                                                float* __restrict__ y, int G, int N, int C, int shared_weights) {
  sum_dense_fwd<float>(x, logw, y, G, N, C, shared_weights);
}
extern "C" __global__ void pc_sum_dense_fwd_f64(const double* __restrict__ x, const double* __restrict__ logw,
                                                double* __restrict__ y, int G, int N, int C, int shared_weights) {
  sum_dense_fwd<double>(x, logw, y, G, N, C, shared_weights);
}
extern "C" __global__ void pc_sum_dense_grad_x_f32(const float* __restrict__ x, const float* __restrict__ logw,
                                                   const float* __restrict__ y, const float* __restrict__ grad_y,
                                                   float* __restrict__ grad_x, long long rows, int G, int N, int C,
                                                   int shared_weights) {
  sum_dense_grad_x<float>(x, logw, y, grad_y, grad_x, rows, G, N, C, shared_weights);
}
extern "C" __global__ void pc_sum_dense_grad_x_f64(const double* __restrict__ x, const double* __restrict__ logw,
                                                   const double* __restrict__ y, const double* __restrict__ grad_y,
                                                   double* __restrict__ grad_x, long long rows, int G, int N, int C,
                                                   int shared_weights) {
  sum_dense_grad_x<double>(x, logw, y, grad_y, grad_x, rows, G, N, C, shared_weights);
}
extern "C" __global__ void pc_sum_dense_grad_logw_f32(const float* __restrict__ x, const float* __restrict__ logw,
                                                      const float* __restrict__ y, const float* __restrict__ grad_y,
                                                      float* __restrict__ grad_logw, int B, int G, int Gw, int N,
                                                      int C) {
  sum_dense_grad_logw<float>(x, logw, y, grad_y, grad_logw, B, G, Gw, N, C);
}
extern "C" __global__ void pc_sum_dense_grad_logw_f64(const double* __restrict__ x, const double* __restrict__ logw,
                                                      const double* __restrict__ y, const double* __restrict__ grad_y,
                                                      double* __restrict__ grad_logw, int B, int G, int Gw, int N,
                                                      int C) {
  sum_dense_grad_logw<double>(x, logw, y, grad_y, grad_logw, B, G, Gw, N, C);
}
