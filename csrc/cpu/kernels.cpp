#include "cpu/kernels.h"

#include <cstdlib>
#include <stdexcept>
#include <string>

namespace din_ext::cpu {
namespace {

// The widest instruction set the kernels may use: the processor's, capped by DIN_EXT_CPU_ISA ("avx512", "avx2" or
// "base"; unset or "auto": no cap), so that every build of the kernels can be run and tested on one machine.
enum class Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

Isa isa_cap() {
  static const Isa cap = [] {
    const char* env = std::getenv("DIN_EXT_CPU_ISA");
    const std::string v = env == nullptr ? "" : env;
    if (v.empty() || v == "auto" || v == "avx512") return Isa::kAvx512;
    if (v == "avx2") return Isa::kAvx2;
    if (v == "base") return Isa::kBase;
    throw std::invalid_argument("DIN_EXT_CPU_ISA must be one of auto, avx512, avx2, base; got '" + v + "'");
  }();
  return cap;
}

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
    return isa_cap() >= Isa::kAvx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
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
    return isa_cap() >= Isa::kAvx512 && has_avx2_fma() && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
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
