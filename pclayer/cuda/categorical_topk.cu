// Categorical input layer under top-k sparse soft evidence:
// y[b,g,n] = log sum_j exp(values[b,g,j] + table[g',n,indices[b,g,j]]), i.e.
// log sum_k theta_n(k) w(k) with w given only on k entries (values are log-weights).
// Shapes: values / indices (B,G,k), table (Gt,n,K) with Gt in {1, G} (g' = 0 when shared),
// y (B,G,n). Indices must lie in [0, K) (checked by the caller). Full (dense) evidence is the
// dense sum kernel pc_sum_dense_fwd_* with x = evidence and logw = table.
#include "logspace.h"

// One thread per output: grid (ceil(B*G*n / block)).
template <typename T>
__device__ void categorical_topk_fwd(const T* __restrict__ values, const long long* __restrict__ indices,
                                     const T* __restrict__ table, T* __restrict__ y, long long rows, int G, int k,
                                     int n, int K, int shared_table) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows * n) return;
  const long long row = i / n;
  const int node = (int)(i % n);
  const T* t = table + ((long long)(shared_table ? 0 : (int)(row % G)) * n + node) * K;
  LogSumExp<T> acc;
  acc.init();
  for (int j = 0; j < k; ++j) acc.add(values[row * k + j] + t[indices[row * k + j]]);
  y[i] = acc.value();
}

extern "C" __global__ void pc_categorical_topk_fwd_f32(const float* __restrict__ values,
                                                       const long long* __restrict__ indices,
                                                       const float* __restrict__ table, float* __restrict__ y,
                                                       long long rows, int G, int k, int n, int K, int shared_table) {
  categorical_topk_fwd<float>(values, indices, table, y, rows, G, k, n, K, shared_table);
}
extern "C" __global__ void pc_categorical_topk_fwd_f64(const double* __restrict__ values,
                                                       const long long* __restrict__ indices,
                                                       const double* __restrict__ table, double* __restrict__ y,
                                                       long long rows, int G, int k, int n, int K, int shared_table) {
  categorical_topk_fwd<double>(values, indices, table, y, rows, G, k, n, K, shared_table);
}
