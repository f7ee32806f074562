// Top-down sampling step: for each row of logits (A,C) pick an index by inverse CDF with a
// caller-given uniform u (A,), exactly as the torch path pclayer.ops.inverse_cdf:
//   probs = exp(logits - max) (max replaced by 0 when not finite), cdf = cumsum(probs)
//   accumulated in double and rounded to T per element (as torch's CPU cumsum does),
//   index = the first c with cdf[c] > min(u * total, the T below total): where u * total
//   rounds up to the total, the first c at which the CDF reaches it; 0 for a row of zeros.
// Used for a sum node's child (logits = log-weight + child value) and an input node's value.
#include "logspace.h"

// One thread per row: grid (ceil(A / block)); out (A,) int64.
template <typename T>
__device__ void inverse_cdf(const T* __restrict__ logits, const T* __restrict__ uniforms, long long* __restrict__ out,
                            long long A, int C) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= A) return;
  const T* l = logits + i * C;
  T m = (T)-INFINITY;
  for (int c = 0; c < C; ++c) m = l[c] > m ? l[c] : m;
  if (!pc_isfinite(m)) m = (T)0;
  double running = 0.0;
  for (int c = 0; c < C; ++c) running += (double)pc_exp((T)(l[c] - m));
  const T total = (T)running;
  const T below_total = pc_below(total);
  const T scaled = uniforms[i] * total;
  const T target = scaled < below_total ? scaled : below_total;
  long long index = 0;
  running = 0.0;
  for (int c = 0; c < C; ++c) {
    running += (double)pc_exp((T)(l[c] - m));
    if ((T)running > target) {
      index = c;
      break;
    }
  }
  out[i] = index;
}

extern "C" __global__ void pc_inverse_cdf_f32(const float* __restrict__ logits, const float* __restrict__ uniforms,
                                              long long* __restrict__ out, long long A, int C) {
  inverse_cdf<float>(logits, uniforms, out, A, C);
}
extern "C" __global__ void pc_inverse_cdf_f64(const double* __restrict__ logits, const double* __restrict__ uniforms,
                                              long long* __restrict__ out, long long A, int C) {
  inverse_cdf<double>(logits, uniforms, out, A, C);
}
