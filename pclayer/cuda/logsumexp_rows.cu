// Padded (block-sparse) sum layer: y[r] = log sum_f exp(a[r,f]) over rows of a (R,F), where
// a = child value + log-weight with -inf pads; and its backward grad_a = grad_y exp(a - y)
// over finite y. Semantics equal pclayer.ops.masked_logsumexp.
#include "logspace.h"

// One thread per row: grid (ceil(R / block)).
template <typename T>
__device__ void logsumexp_rows_fwd(const T* __restrict__ a, T* __restrict__ y, long long R, int F) {
  const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= R) return;
  LogSumExp<T> acc;
  acc.init();
  for (int f = 0; f < F; ++f) acc.add(a[r * F + f]);
  y[r] = acc.value();
}

// One thread per element of a: grid (ceil(R*F / block)).
template <typename T>
__device__ void logsumexp_rows_bwd(const T* __restrict__ a, const T* __restrict__ y, const T* __restrict__ grad_y,
                                   T* __restrict__ grad_a, long long R, int F) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= R * F) return;
  const long long r = i / F;
  const T yr = y[r];
  grad_a[i] = pc_isfinite(yr) ? grad_y[r] * pc_exp(a[i] - yr) : (T)0;
}

extern "C" __global__ void pc_logsumexp_rows_fwd_f32(const float* __restrict__ a, float* __restrict__ y, long long R,
                                                     int F) {
  logsumexp_rows_fwd<float>(a, y, R, F);
}
extern "C" __global__ void pc_logsumexp_rows_fwd_f64(const double* __restrict__ a, double* __restrict__ y,
                                                     long long R, int F) {
  logsumexp_rows_fwd<double>(a, y, R, F);
}
extern "C" __global__ void pc_logsumexp_rows_bwd_f32(const float* __restrict__ a, const float* __restrict__ y,
                                                     const float* __restrict__ grad_y, float* __restrict__ grad_a,
                                                     long long R, int F) {
  logsumexp_rows_bwd<float>(a, y, grad_y, grad_a, R, F);
}
extern "C" __global__ void pc_logsumexp_rows_bwd_f64(const double* __restrict__ a, const double* __restrict__ y,
                                                     const double* __restrict__ grad_y, double* __restrict__ grad_a,
                                                     long long R, int F) {
  logsumexp_rows_bwd<double>(a, y, grad_y, grad_a, R, F);
}
