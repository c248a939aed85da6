// Small dense kernels of the fused cpu backend: register-blocked GEMMs on row tiles, a vectorizable exp, and the
// runtime choice between an AVX2+FMA build of them and a baseline one (a distributable build has no -march=native).
//
// Layout conventions: every matrix is row-major; "padded" widths are rounded up to kPad<T> elements (one 32-byte
// vector) and the padding columns of weights and biases are zero, so padded outputs are exactly zero.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace din_ext::cpu {

template <typename T>
constexpr int64_t kPad = 32 / sizeof(T);

template <typename T>
inline int64_t padded(int64_t n) {
  return (n + kPad<T> - 1) / kPad<T> * kPad<T>;
}

#define DIN_EXT_INLINE inline __attribute__((always_inline))

// Functions marked DIN_EXT_AVX2 are compiled for AVX2+FMA whatever the build flags; they run only where
// has_avx2_fma() says so. Their bodies are DIN_EXT_INLINE templates shared with the baseline build.
#if defined(__x86_64__) && defined(__GNUC__)
#define DIN_EXT_HAVE_AVX2 1
#define DIN_EXT_AVX2 __attribute__((target("avx2,fma")))
#else
#define DIN_EXT_HAVE_AVX2 0
#define DIN_EXT_AVX2
#endif

// Whether this processor runs the AVX2+FMA builds.
bool has_avx2_fma();

// Functions marked DIN_EXT_AVX512 are compiled for AVX-512 (F, VL, DQ) with 512-bit vectors, which double the FMA
// throughput of the AVX2 build where the processor has them; they run only where has_avx512() says so.
#if DIN_EXT_HAVE_AVX2
#define DIN_EXT_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512")))
#else
#define DIN_EXT_AVX512
#endif
bool has_avx512();

// 32-byte vectors in always-inlined code are never passed across a call boundary; GCC's ABI note is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

// Cephes' expf argument reduction: x clamped to [-87, 88], shifted = 1.5 * 2^23 + n with n = round(x / ln 2) (the
// 1.5 * 2^23 trick: plain arithmetic, which vectorizes where floor may not), r = x - n ln 2 in two parts, and the
// polynomial p(r) of exp(r) = 1 + r + r^2 p(r).
struct ExpParts {
  float shifted, n, r, p;
};
DIN_EXT_INLINE ExpParts exp_parts(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // a select: vectorizes with -fno-trapping-math
  ExpParts e;
  e.shifted = x * 1.44269504088896341f + 12582912.0f;
  e.n = e.shifted - 12582912.0f;
  e.r = x - e.n * 0.693359375f + e.n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * e.r + 1.3981999507e-3f;
  p = p * e.r + 8.3334519073e-3f;
  p = p * e.r + 4.1665795894e-2f;
  p = p * e.r + 1.6666665459e-1f;
  e.p = p * e.r + 5.0000001201e-1f;
  return e;
}

// exp(x) for float, Cephes' expf polynomial (about 1 ulp) in a form that compilers vectorize; std::exp for double.
DIN_EXT_INLINE float exp_approx(float x) {
  const ExpParts e = exp_parts(x);
  const float p = e.p * e.r * e.r + e.r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(e.n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
DIN_EXT_INLINE double exp_approx(double x) { return std::exp(x); }

template <typename T>
DIN_EXT_INLINE T sigmoid(T x) {
  return T(1) / (T(1) + exp_approx(-x));
}

// 1 / (1 + exp(x)) = sigmoid(-x) for float, exp_approx's reduction and polynomial (the same coefficients; at most
// 1.5e-7 relative error against double) in 21 vector operations instead of 25: the polynomial's last two steps in
// Horner form, the power of two from the bits of the rounding sum (no conversion) and the 1 + added by the scaling
// FMA. The Dice forward's gate, whose argument comes negated from its folded affine. std::exp for double.
DIN_EXT_INLINE float sigmoid_of_neg(float x) {
  const ExpParts e = exp_parts(x);
  const float p = (e.p * e.r + 1.0f) * e.r + 1.0f;  // exp(r)
  uint32_t bits;
  std::memcpy(&bits, &e.shifted, sizeof(bits));
  bits = (bits + (127u - 0x4B400000u)) << 23;  // (n + 127) << 23: the low mantissa bits of `shifted` hold n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return 1.0f / (p * scale + 1.0f);
}
DIN_EXT_INLINE double sigmoid_of_neg(double x) { return 1.0 / (1.0 + std::exp(x)); }

// 32-byte SIMD vectors (GCC/Clang vector extensions; two SSE registers on a baseline build, one AVX register in an
// AVX2 build), unaligned.
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float type __attribute__((vector_size(32), aligned(4)));
  static constexpr int64_t lanes = 8;
};
template <>
struct Simd<double> {
  typedef double type __attribute__((vector_size(32), aligned(8)));
  static constexpr int64_t lanes = 4;
};

template <typename T>
DIN_EXT_INLINE typename Simd<T>::type load(const T* p) {
  return *reinterpret_cast<const typename Simd<T>::type*>(p);
}
template <typename T>
DIN_EXT_INLINE void store(T* p, typename Simd<T>::type v) {
  *reinterpret_cast<typename Simd<T>::type*>(p) = v;
}

// C[r, :n] = bias[:n] + sum_{k < K} A[r, k] * B[k, :n] for R rows; n is a multiple of kPad<T> (one vector).
// A: [R, lda], B: [K, ldb], C: [R, ldc]; bias may be null (zero). R x 2 vector accumulators stay in registers.
template <typename T, int R>
DIN_EXT_INLINE void gemm_nn_rows(int64_t K, int64_t n, const T* A, int64_t lda, const T* B, int64_t ldb,
                                 const T* bias, T* C, int64_t ldc) {
  using V = typename Simd<T>::type;
  constexpr int64_t L = Simd<T>::lanes;
  const V zero = {};
  int64_t c0 = 0;
  for (; c0 + 2 * L <= n; c0 += 2 * L) {
    const V i0 = bias ? load(bias + c0) : zero, i1 = bias ? load(bias + c0 + L) : zero;
    V acc[R][2];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      acc[r][0] = i0;
      acc[r][1] = i1;
    }
    const T* b = B + c0;
    for (int64_t k = 0; k < K; ++k, b += ldb) {
      const V b0 = load(b), b1 = load(b + L);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const T a = A[r * lda + k];
        acc[r][0] += a * b0;
        acc[r][1] += a * b1;
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      store(C + r * ldc + c0, acc[r][0]);
      store(C + r * ldc + c0 + L, acc[r][1]);
    }
  }
  if (c0 < n) {  // one vector left
    const V i0 = bias ? load(bias + c0) : zero;
    V acc[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[r] = i0;
    const T* b = B + c0;
    for (int64_t k = 0; k < K; ++k, b += ldb) {
      const V b0 = load(b);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r] += A[r * lda + k] * b0;
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) store(C + r * ldc + c0, acc[r]);
  }
}

// The same for any number of rows: blocks of 4, then one block of the 1 to 3 left.
template <typename T>
DIN_EXT_INLINE void gemm_nn_body(int64_t rows, int64_t K, int64_t n, const T* A, int64_t lda, const T* B,
                                 int64_t ldb, const T* bias, T* C, int64_t ldc) {
  int64_t r0 = 0;
  for (; r0 + 4 <= rows; r0 += 4) gemm_nn_rows<T, 4>(K, n, A + r0 * lda, lda, B, ldb, bias, C + r0 * ldc, ldc);
  switch (rows - r0) {
    case 3:
      gemm_nn_rows<T, 3>(K, n, A + r0 * lda, lda, B, ldb, bias, C + r0 * ldc, ldc);
      break;
    case 2:
      gemm_nn_rows<T, 2>(K, n, A + r0 * lda, lda, B, ldb, bias, C + r0 * ldc, ldc);
      break;
    case 1:
      gemm_nn_rows<T, 1>(K, n, A + r0 * lda, lda, B, ldb, bias, C + r0 * ldc, ldc);
      break;
    default:
      break;
  }
}

// C[m, :n] += sum_{t < rows} A[t, m] * B[t, :n] for m < M (M a multiple of 4, n of kPad<T>): the A^T B of weight
// gradients. A: [rows, lda], B: [rows, ldb], C: [M, ldc].
template <typename T>
DIN_EXT_INLINE void gemm_tn_body(int64_t rows, int64_t M, int64_t n, const T* A, int64_t lda, const T* B,
                                 int64_t ldb, T* C, int64_t ldc) {
  using V = typename Simd<T>::type;
  constexpr int64_t L = Simd<T>::lanes;
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    int64_t c0 = 0;
    for (; c0 + 2 * L <= n; c0 += 2 * L) {
      T* c = C + m0 * ldc + c0;
      V c00 = load(c), c01 = load(c + L), c10 = load(c + ldc), c11 = load(c + ldc + L);
      V c20 = load(c + 2 * ldc), c21 = load(c + 2 * ldc + L), c30 = load(c + 3 * ldc), c31 = load(c + 3 * ldc + L);
      const T* a = A + m0;
      const T* b = B + c0;
      for (int64_t t = 0; t < rows; ++t, a += lda, b += ldb) {
        const V b0 = load(b), b1 = load(b + L);
        c00 += a[0] * b0;
        c01 += a[0] * b1;
        c10 += a[1] * b0;
        c11 += a[1] * b1;
        c20 += a[2] * b0;
        c21 += a[2] * b1;
        c30 += a[3] * b0;
        c31 += a[3] * b1;
      }
      store(c, c00);
      store(c + L, c01);
      store(c + ldc, c10);
      store(c + ldc + L, c11);
      store(c + 2 * ldc, c20);
      store(c + 2 * ldc + L, c21);
      store(c + 3 * ldc, c30);
      store(c + 3 * ldc + L, c31);
    }
    if (c0 < n) {  // one vector left
      T* c = C + m0 * ldc + c0;
      V c00 = load(c), c10 = load(c + ldc), c20 = load(c + 2 * ldc), c30 = load(c + 3 * ldc);
      const T* a = A + m0;
      const T* b = B + c0;
      for (int64_t t = 0; t < rows; ++t, a += lda, b += ldb) {
        const V b0 = load(b);
        c00 += a[0] * b0;
        c10 += a[1] * b0;
        c20 += a[2] * b0;
        c30 += a[3] * b0;
      }
      store(c, c00);
      store(c + ldc, c10);
      store(c + 2 * ldc, c20);
      store(c + 3 * ldc, c30);
    }
  }
}

// 64-byte vectors: one AVX-512 register in a DIN_EXT_AVX512 function (only those use them).
template <typename T>
struct Wide {
  typedef T type __attribute__((vector_size(64), aligned(sizeof(T))));
  static constexpr int64_t lanes = 64 / sizeof(T);
};

// The low 256 bits of a wide vector (a register alias: no instruction).
template <typename T>
DIN_EXT_INLINE typename Simd<T>::type low_half(typename Wide<T>::type v) {
  typename Simd<T>::type h;
  std::memcpy(&h, &v, sizeof(h));
  return h;
}

// The register block of the AVX-512 GEMMs: C[r, c0 : c0 + NZ * W + kTail * L] for r < R (W = Wide lanes, L = Simd
// lanes), R x (NZ + kTail) accumulators over k < K of a(r, k) * B[k, :], with a(r, k) = A[r * ra + k * ka] (a row
// of A for C = A B, a column for C = A^T B). The accumulators start at bias (or zero when bias is null), or at C
// itself with kAccumulate. Each element is its start plus the K products in k order, one FMA each: the same
// arithmetic as gemm_nn_rows and gemm_tn_body, so every build gives bitwise the same results.
template <typename T, int R, int NZ, bool kTail, bool kAccumulate>
DIN_EXT_INLINE void wide_block(int64_t K, const T* A, int64_t ra, int64_t ka, const T* B, int64_t ldb,
                               const T* bias, T* C, int64_t ldc) {
  using V = typename Wide<T>::type;
  using H = typename Simd<T>::type;
  constexpr int64_t W = Wide<T>::lanes;
  V acc[R][NZ > 0 ? NZ : 1];
  H tail[R];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NZ; ++v) {
      if (kAccumulate) {
        acc[r][v] = *reinterpret_cast<const V*>(C + r * ldc + v * W);
      } else {
        acc[r][v] = bias ? *reinterpret_cast<const V*>(bias + v * W) : V{};
      }
    }
    if (kTail) tail[r] = kAccumulate ? load(C + r * ldc + NZ * W) : (bias ? load(bias + NZ * W) : H{});
  }
  const T* b = B;
  const T* a = A;
  for (int64_t k = 0; k < K; ++k, b += ldb, a += ka) {
    V bv[NZ > 0 ? NZ : 1];
#pragma GCC unroll 4
    for (int v = 0; v < NZ; ++v) bv[v] = *reinterpret_cast<const V*>(b + v * W);
    const H bt = kTail ? load(b + NZ * W) : H{};
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      // One broadcast of a(r, k) from memory (a load, no shuffle), whose low half multiplies the half vector: a
      // scalar used twice was broadcast twice from a register, a port-5 shuffle each, as many as the FMAs of a
      // 40-wide block (the GEMM then ran at ~60% of its FMA rate).
      const V x = a[r * ra] - V{};  // x - 0 is x: the compiler emits the broadcast alone
#pragma GCC unroll 4
      for (int v = 0; v < NZ; ++v) acc[r][v] += x * bv[v];
      if (kTail) tail[r] += low_half<T>(x) * bt;
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NZ; ++v) *reinterpret_cast<V*>(C + r * ldc + v * W) = acc[r][v];
    if (kTail) store(C + r * ldc + NZ * W, tail[r]);
  }
}

// Rows [0, rows) of one column block of NZ wide vectors (+ a half one): blocks of 6 rows (at most 24 accumulators
// and 4 vectors of B in the 32 registers), then of 4, then the 1 to 3 left (the row stride of a(r, k) is ra). A
// block of one vector a row (a 16-wide or an 8-wide one, the 1-output last layer padded to 8) takes 12 rows first:
// 6 accumulators do not cover the FMA latency (4 cycles, 2 ports).
template <typename T, int NZ, bool kTail, bool kAccumulate>
DIN_EXT_INLINE void wide_rows(int64_t rows, int64_t K, const T* A, int64_t ra, int64_t ka, const T* B, int64_t ldb,
                              const T* bias, T* C, int64_t ldc) {
  int64_t r0 = 0;
  if (NZ + kTail == 1) {
    for (; r0 + 12 <= rows; r0 += 12)
      wide_block<T, 12, NZ, kTail, kAccumulate>(K, A + r0 * ra, ra, ka, B, ldb, bias, C + r0 * ldc, ldc);
  }
  // The rows left after the blocks of 6 as 4 + 3 or 4 + 4 rather than 1 or 2 (too few accumulators).
  const int64_t left = rows - r0, sixes = left / 6 - (left >= 6 && left % 6 > 0 && left % 6 < 3 ? 1 : 0);
  for (const int64_t end = r0 + 6 * sixes; r0 < end; r0 += 6)
    wide_block<T, 6, NZ, kTail, kAccumulate>(K, A + r0 * ra, ra, ka, B, ldb, bias, C + r0 * ldc, ldc);
  for (; r0 + 4 <= rows; r0 += 4)
    wide_block<T, 4, NZ, kTail, kAccumulate>(K, A + r0 * ra, ra, ka, B, ldb, bias, C + r0 * ldc, ldc);
  switch (rows - r0) {
    case 3:
      wide_block<T, 3, NZ, kTail, kAccumulate>(K, A + r0 * ra, ra, ka, B, ldb, bias, C + r0 * ldc, ldc);
      break;
    case 2:
      wide_block<T, 2, NZ, kTail, kAccumulate>(K, A + r0 * ra, ra, ka, B, ldb, bias, C + r0 * ldc, ldc);
      break;
    case 1:
      wide_block<T, 1, NZ, kTail, kAccumulate>(K, A + r0 * ra, ra, ka, B, ldb, bias, C + r0 * ldc, ldc);
      break;
    default:
      break;
  }
}

// C[r, :n] over all rows, the n columns (a multiple of kPad<T>, one half vector) cut into blocks of at most 3 wide
// vectors (enough independent accumulators to hide the FMA latency), the half vector in the last.
template <typename T, bool kAccumulate>
DIN_EXT_INLINE void wide_gemm(int64_t rows, int64_t K, int64_t n, const T* A, int64_t ra, int64_t ka, const T* B,
                              int64_t ldb, const T* bias, T* C, int64_t ldc) {
  constexpr int64_t W = Wide<T>::lanes;
  int64_t full = n / W, c0 = 0;
  const bool tail = n % W != 0;
  while (full > 0 || (tail && c0 < n)) {
    // 4 -> 2 + 2 and 5 -> 3 + 2: no lone vector of 4 accumulators while wider blocks are possible.
    const int64_t nz = full > 4 ? 3 : (full == 4 ? 2 : full);
    full -= nz;
    const bool with_tail = tail && full == 0;
    const T* bb = bias ? bias + c0 : nullptr;
#define DIN_EXT_WIDE_CASE(NZ)                                                                                   \
  if (with_tail) {                                                                                              \
    wide_rows<T, NZ, true, kAccumulate>(rows, K, A, ra, ka, B + c0, ldb, bb, C + c0, ldc);                      \
  } else {                                                                                                      \
    wide_rows<T, NZ, false, kAccumulate>(rows, K, A, ra, ka, B + c0, ldb, bb, C + c0, ldc);                     \
  }
    switch (nz) {
      case 3:
        DIN_EXT_WIDE_CASE(3)
        break;
      case 2:
        DIN_EXT_WIDE_CASE(2)
        break;
      case 1:
        DIN_EXT_WIDE_CASE(1)
        break;
      default:
        wide_rows<T, 0, true, kAccumulate>(rows, K, A, ra, ka, B + c0, ldb, bb, C + c0, ldc);
        break;
    }
#undef DIN_EXT_WIDE_CASE
    c0 += nz * W + (with_tail ? W / 2 : 0);
  }
}

// Function-pointer table of one instruction-set build of the kernels.
template <typename T>
struct Gemm {
  void (*nn)(int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t, const T*, T*, int64_t);
  void (*tn)(int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t, T*, int64_t);
};

// The best build this processor runs (AVX-512, else AVX2+FMA on x86-64 when available, else the baseline).
template <typename T>
const Gemm<T>& gemm();

}  // namespace din_ext::cpu
