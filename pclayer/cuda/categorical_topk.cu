// Categorical input layer under top-k sparse soft evidence and its backward:
// y[b,g,n] = log sum_j exp(values[b,g,j] + table_t[g',indices[b,g,j],n]), i.e.
// log sum_k theta_n(k) w(k) with w given only on k entries (values are log-weights).
// The log-table is read transposed, table_t (Gt,K,n) with Gt in {1, G} (g' = 0 when shared),
// so each candidate category is one contiguous row of n log-probabilities: the threads of a
// block (consecutive nodes) read consecutive addresses. values / indices (B,G,k), y (B,G,n).
// Indices must lie in [0, K) (checked by the caller). Full (dense) evidence is the dense sum
// kernel pc_sum_dense_fwd_* with x = evidence and logw = table.
#include "logspace.h"

#define PC_TOPK_THREADS 128  // nodes per block
#define PC_FULL_MASK 0xffffffffu

// Grid (B*G, ceil(n / PC_TOPK_THREADS)), block (PC_TOPK_THREADS): one thread per output node.
template <typename T>
__device__ void categorical_topk_fwd(const T* __restrict__ values, const long long* __restrict__ indices,
                                     const T* __restrict__ table_t, T* __restrict__ y, int G, int k, int n, int K,
                                     int shared_table) {
  const long long row = blockIdx.x;
  const int node = blockIdx.y * blockDim.x + threadIdx.x;
  if (node >= n) return;
  const T* t = table_t + (long long)(shared_table ? 0 : (int)(row % G)) * K * n + node;
  LogSumExp<T> acc;
  acc.init();
  for (int j = 0; j < k; ++j) acc.add(values[row * k + j] + t[indices[row * k + j] * n]);
  y[row * n + node] = acc.value();
}

// Backward with flows f[b,g,n,j] = grad_y[b,g,n] exp(values[b,g,j] + table_t[g',idx,n] - y[b,g,n])
// (zero where y is not finite): grad_values[b,g,j] += sum_n f (a warp sum, then one atomic
// per warp) and grad_table_t[g',idx,n] += f (atomics: candidates of different rows may share a
// category). Same grid as the forward; both outputs start zeroed. Atomics make the order of
// the additions, and so the last bits, vary between runs.
template <typename T>
__device__ void categorical_topk_bwd(const T* __restrict__ values, const long long* __restrict__ indices,
                                     const T* __restrict__ table_t, const T* __restrict__ y,
                                     const T* __restrict__ grad_y, T* __restrict__ grad_values,
                                     T* __restrict__ grad_table_t, int G, int k, int n, int K, int shared_table,
                                     int need_values, int need_table) {
  const long long row = blockIdx.x;
  const int node = blockIdx.y * blockDim.x + threadIdx.x;
  const bool active = node < n;  // inactive lanes still take part in the warp sums
  const long long offset = (long long)(shared_table ? 0 : (int)(row % G)) * K * n + node;
  const T yn = active ? y[row * n + node] : (T)0;
  const T gn = active && pc_isfinite(yn) ? grad_y[row * n + node] : (T)0;
  for (int j = 0; j < k; ++j) {
    const long long at = offset + indices[row * k + j] * n;
    const T flow = gn != (T)0 ? gn * pc_exp(values[row * k + j] + table_t[at] - yn) : (T)0;
    if (need_table && flow != (T)0) atomicAdd(&grad_table_t[at], flow);
    if (need_values) {
      T sum = flow;
      for (int delta = 16; delta > 0; delta >>= 1) sum += __shfl_xor_sync(PC_FULL_MASK, sum, delta);
      if (threadIdx.x % 32 == 0 && sum != (T)0) atomicAdd(&grad_values[row * k + j], sum);
    }
  }
}

extern "C" __global__ void pc_categorical_topk_fwd_f32(const float* __restrict__ values,
                                                       const long long* __restrict__ indices,
                                                       const float* __restrict__ table_t, float* __restrict__ y, int G,
                                                       int k, int n, int K, int shared_table) {
  categorical_topk_fwd<float>(values, indices, table_t, y, G, k, n, K, shared_table);
}
extern "C" __global__ void pc_categorical_topk_fwd_f64(const double* __restrict__ values,
                                                       const long long* __restrict__ indices,
                                                       const double* __restrict__ table_t, double* __restrict__ y,
                                                       int G, int k, int n, int K, int shared_table) {
  categorical_topk_fwd<double>(values, indices, table_t, y, G, k, n, K, shared_table);
}
extern "C" __global__ void pc_categorical_topk_bwd_f32(const float* __restrict__ values,
                                                       const long long* __restrict__ indices,
                                                       const float* __restrict__ table_t, const float* __restrict__ y,
                                                       const float* __restrict__ grad_y, float* __restrict__ grad_values,
                                                       float* __restrict__ grad_table_t, int G, int k, int n, int K,
                                                       int shared_table, int need_values, int need_table) {
  categorical_topk_bwd<float>(values, indices, table_t, y, grad_y, grad_values, grad_table_t, G, k, n, K, shared_table,
                              need_values, need_table);
}
extern "C" __global__ void pc_categorical_topk_bwd_f64(const double* __restrict__ values,
                                                       const long long* __restrict__ indices,
                                                       const double* __restrict__ table_t, const double* __restrict__ y,
                                                       const double* __restrict__ grad_y,
                                                       double* __restrict__ grad_values,
                                                       double* __restrict__ grad_table_t, int G, int k, int n, int K,
                                                       int shared_table, int need_values, int need_table) {
  categorical_topk_bwd<double>(values, indices, table_t, y, grad_y, grad_values, grad_table_t, G, k, n, K,
                               shared_table, need_values, need_table);
}
