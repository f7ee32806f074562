// Device helpers shared by the pclayer kernels: precision-generic exp/log and an online
// (single-pass, max-shifted) log-sum-exp accumulator, so no kernel materialises exp copies.
#pragma once

#ifndef INFINITY  // NVRTC (the run-time compilation fallback) compiles without the C math headers
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ inline float pc_exp(float v) { return expf(v); }
__device__ inline double pc_exp(double v) { return exp(v); }
__device__ inline float pc_log(float v) { return logf(v); }
__device__ inline double pc_log(double v) { return log(v); }
// The representable value next to v towards zero (v itself when v is 0).
__device__ inline float pc_below(float v) { return nextafterf(v, 0.0f); }
__device__ inline double pc_below(double v) { return nextafter(v, 0.0); }

template <typename T>
__device__ inline bool pc_isfinite(T v) {
  return v > (T)-INFINITY && v < (T)INFINITY;  // false for NaN
}

// Running value log(s) + m of a log-sum-exp; -inf terms are skipped, NaN propagates.
template <typename T>
struct LogSumExp {
  T m;
  T s;
  __device__ inline void init() {
    m = (T)-INFINITY;
    s = (T)0;
  }
  __device__ inline void add(T a) {
    if (a == (T)-INFINITY) return;
    if (a > m) {
      s = s * pc_exp(m - a) + (T)1;
      m = a;
    } else if (a == m) {
      s += (T)1;
    } else {
      s += pc_exp(a - m);
    }
  }
  __device__ inline T value() const {
    return (m == (T)-INFINITY && s == (T)0) ? m : m + pc_log(s);
  }
};
