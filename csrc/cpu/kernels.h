// Small dense kernels of the fused cpu backend: register-blocked GEMMs on row tiles, a vectorizable exp, and the
// runtime choice between an AVX2+FMA build of them and a baseline one (a distributable build has no -march=native).
//
// Layout conventions: every matrix is row-major; "padded" widths are rounded up to kPad<T> elements (one 64-byte
// cache line) and the padding columns of weights and biases are zero, so padded outputs are exactly zero.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace din_ext::cpu {

template <typename T>
constexpr int64_t kPad = 64 / sizeof(T);

template <typename T>
inline int64_t padded(int64_t n) {
  return (n + kPad<T> - 1) / kPad<T> * kPad<T>;
}

#if defined(__GNUC__)
#define DIN_EXT_INLINE inline __attribute__((always_inline))
#else
#define DIN_EXT_INLINE inline
#endif

// exp(x) for float, Cephes' expf polynomial (about 1 ulp) in a form that compilers vectorize; std::exp for double.
DIN_EXT_INLINE float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
DIN_EXT_INLINE double exp_approx(double x) { return std::exp(x); }

template <typename T>
DIN_EXT_INLINE T sigmoid(T x) {
  return T(1) / (T(1) + exp_approx(-x));
}

// C[r, :n] = bias[:n] + sum_k A[r, k] * B[k, :n] for r < rows; n is a multiple of kPad<T>.
// A: [rows, lda] (k < K used), B: [K, ldb], C: [rows, ldc]. bias may be null (zero).
template <typename T>
DIN_EXT_INLINE void gemm_nn_body(int64_t rows, int64_t K, int64_t n, const T* A, int64_t lda, const T* B,
                                 int64_t ldb, const T* bias, T* C, int64_t ldc) {
  constexpr int64_t R = 4, W = kPad<T>;
  int64_t r0 = 0;
  for (; r0 + R <= rows; r0 += R) {
    for (int64_t c0 = 0; c0 < n; c0 += W) {
      T acc[R][W];
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < W; ++j) acc[r][j] = bias ? bias[c0 + j] : T(0);
      for (int64_t k = 0; k < K; ++k) {
        const T* b = B + k * ldb + c0;
        for (int64_t r = 0; r < R; ++r) {
          const T a = A[(r0 + r) * lda + k];
          for (int64_t j = 0; j < W; ++j) acc[r][j] += a * b[j];
        }
      }
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < W; ++j) C[(r0 + r) * ldc + c0 + j] = acc[r][j];
    }
  }
  for (; r0 < rows; ++r0) {
    for (int64_t c0 = 0; c0 < n; c0 += W) {
      T acc[W];
      for (int64_t j = 0; j < W; ++j) acc[j] = bias ? bias[c0 + j] : T(0);
      for (int64_t k = 0; k < K; ++k) {
        const T a = A[r0 * lda + k];
        const T* b = B + k * ldb + c0;
        for (int64_t j = 0; j < W; ++j) acc[j] += a * b[j];
      }
      for (int64_t j = 0; j < W; ++j) C[r0 * ldc + c0 + j] = acc[j];
    }
  }
}

// C[m, :n] += sum_t A[t, m] * B[t, :n] for m < M (M a multiple of 4, n of kPad<T>): the A^T B of weight gradients.
template <typename T>
DIN_EXT_INLINE void gemm_tn_body(int64_t rows, int64_t M, int64_t n, const T* A, int64_t lda, const T* B,
                                 int64_t ldb, T* C, int64_t ldc) {
  constexpr int64_t R = 4, W = kPad<T>;
  for (int64_t m0 = 0; m0 < M; m0 += R) {
    for (int64_t c0 = 0; c0 < n; c0 += W) {
      T acc[R][W];
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < W; ++j) acc[r][j] = C[(m0 + r) * ldc + c0 + j];
      for (int64_t t = 0; t < rows; ++t) {
        const T* b = B + t * ldb + c0;
        for (int64_t r = 0; r < R; ++r) {
          const T a = A[t * lda + m0 + r];
          for (int64_t j = 0; j < W; ++j) acc[r][j] += a * b[j];
        }
      }
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < W; ++j) C[(m0 + r) * ldc + c0 + j] = acc[r][j];
    }
  }
}

// Function-pointer table of one instruction-set build of the kernels.
template <typename T>
struct Gemm {
  void (*nn)(int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t, const T*, T*, int64_t);
  void (*tn)(int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t, T*, int64_t);
};

// The best build this processor runs (AVX2+FMA on x86-64 when available, else the baseline).
template <typename T>
const Gemm<T>& gemm();

}  // namespace din_ext::cpu
