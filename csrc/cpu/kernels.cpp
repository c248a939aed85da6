#include "cpu/kernels.h"

namespace din_ext::cpu {
namespace {

template <typename T>
void nn_base(int64_t rows, int64_t K, int64_t n, const T* A, int64_t lda, const T* B, int64_t ldb, const T* bias,
             T* C, int64_t ldc) {
  gemm_nn_body<T>(rows, K, n, A, lda, B, ldb, bias, C, ldc);
}

template <typename T>
void tn_base(int64_t rows, int64_t M, int64_t n, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
             int64_t ldc) {
  gemm_tn_body<T>(rows, M, n, A, lda, B, ldb, C, ldc);
}

#if DIN_EXT_HAVE_AVX2
template <typename T>
DIN_EXT_AVX2 void nn_avx2(int64_t rows, int64_t K, int64_t n, const T* A, int64_t lda, const T* B, int64_t ldb,
                          const T* bias, T* C, int64_t ldc) {
  gemm_nn_body<T>(rows, K, n, A, lda, B, ldb, bias, C, ldc);
}

template <typename T>
DIN_EXT_AVX2 void tn_avx2(int64_t rows, int64_t M, int64_t n, const T* A, int64_t lda, const T* B, int64_t ldb,
                          T* C, int64_t ldc) {
  gemm_tn_body<T>(rows, M, n, A, lda, B, ldb, C, ldc);
}

template <typename T>
DIN_EXT_AVX512 void nn_avx512(int64_t rows, int64_t K, int64_t n, const T* A, int64_t lda, const T* B, int64_t ldb,
                              const T* bias, T* C, int64_t ldc) {
  wide_gemm<T, false>(rows, K, n, A, lda, 1, B, ldb, bias, C, ldc);
}

template <typename T>
DIN_EXT_AVX512 void tn_avx512(int64_t rows, int64_t M, int64_t n, const T* A, int64_t lda, const T* B, int64_t ldb,
                              T* C, int64_t ldc) {
  wide_gemm<T, true>(M, rows, n, A, 1, lda, B, ldb, nullptr, C, ldc);
}

#endif

template <typename T>
Gemm<T> select() {
#if DIN_EXT_HAVE_AVX2
  if (has_avx512()) return {&nn_avx512<T>, &tn_avx512<T>};
  if (has_avx2_fma()) return {&nn_avx2<T>, &tn_avx2<T>};
#endif
  return {&nn_base<T>, &tn_base<T>};
}

}  // namespace

bool has_avx2_fma() {
#if DIN_EXT_HAVE_AVX2
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
#else
  return false;
#endif
}

bool has_avx512() {
#if DIN_EXT_HAVE_AVX2
  static const bool yes = [] {
    __builtin_cpu_init();
    return has_avx2_fma() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq");
  }();
  return yes;
#else
  return false;
#endif
}

template <typename T>
const Gemm<T>& gemm() {
  static const Gemm<T> table = select<T>();
  return table;
}

template const Gemm<float>& gemm<float>();
template const Gemm<double>& gemm<double>();

}  // namespace din_ext::cpu
