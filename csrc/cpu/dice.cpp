// cpu backend of din_ext::dice: fused Dice on x [N, H], statistics over the rows where mask is true (all rows if
// no mask). Masked-out rows output 0, get no gradient and are never read.
//
// The forward and its exact backward are docs/design.md section 1.3. In its terms the backward is
// local = g (alpha + (1 - alpha) p) + gamma rstd t (the statistics held fixed), t = g x (1 - alpha) p (1 - p), and in
// training dx = local - gamma rstd (d beta + xhat d gamma) / n. The training correction depends on x only through xhat, so the backward's first pass writes `local` and the
// second pass subtracts the correction without recomputing the sigmoid.
//
// Reproducibility: every per-feature sum is accumulated in double per block of kBlockRows rows (one thread, row
// order) and the blocks are merged in block order on one thread, so results are bitwise identical for any number
// of threads. The elementwise math runs in at::opmath_type<scalar_t> (float for float/half/bfloat16), with the
// loops over the H contiguous features innermost so that the compiler vectorizes them (the sigmoid's exp included:
// kernels.h), in a baseline and an AVX2+FMA build.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "cpu/kernels.h"

namespace din_ext::cpu {
namespace {

// Fixed, not derived from the thread count: it fixes the summation order. 256 rows of H = 200 floats (200 KB) stay
// in L2 between the two reads of the statistics pass.
constexpr int64_t kBlockRows = 256;

int64_t num_blocks(int64_t rows) { return (rows + kBlockRows - 1) / kBlockRows; }

// Rows of the per-feature constants of the elementwise passes ([5, H] in the compute type): params' layout with
// the statistics replaced by what the loops need.
constexpr int64_t kAlpha = 0, kGamma = 1, kBeta = 2, kMean = 3, kRstd = 4, kNumConstants = 5;

// mean/var: the statistics the forward used (the batch ones as stored in stats, or the running ones). rstd is taken
// in double so that var + eps does not round eps away in low precision.
template <typename scalar_t, typename T>
std::vector<T> feature_constants(const scalar_t* params, const scalar_t* mean, const scalar_t* var, int64_t H,
                                 double eps) {
  std::vector<T> c(kNumConstants * H);
  for (int64_t h = 0; h < H; ++h) {
    c[kAlpha * H + h] = static_cast<T>(params[kDiceAlpha * H + h]);
    c[kGamma * H + h] = static_cast<T>(params[kDiceGamma * H + h]);
    c[kBeta * H + h] = static_cast<T>(params[kDiceBeta * H + h]);
    c[kMean * H + h] = static_cast<T>(mean[h]);
    c[kRstd * H + h] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(var[h]) + eps));
  }
  return c;
}

// The rows alpha, gamma, beta, mean, rstd of the feature constants c [5, H].
template <typename T>
struct ConstantRows {
  const T *alpha, *gamma, *beta, *mean, *rstd;
};

template <typename T>
DIN_EXT_INLINE ConstantRows<T> constant_rows(const T* c, int64_t H) {
  return {c + kAlpha * H, c + kGamma * H, c + kBeta * H, c + kMean * H, c + kRstd * H};
}

// Row loops over the H contiguous features. __restrict lets them vectorize without runtime alias checks.

template <typename scalar_t>
DIN_EXT_INLINE void add_row(const scalar_t* __restrict x, double* __restrict sum, int64_t H) {
  for (int64_t h = 0; h < H; ++h) sum[h] += static_cast<double>(x[h]);
}

template <typename scalar_t>
DIN_EXT_INLINE void add_squared_deviation(const scalar_t* __restrict x, const double* __restrict mean,
                                          double* __restrict m2, int64_t H) {
  for (int64_t h = 0; h < H; ++h) {
    const double d = static_cast<double>(x[h]) - mean[h];
    m2[h] += d * d;
  }
}

template <typename scalar_t, typename T>
DIN_EXT_INLINE void forward_row(const scalar_t* __restrict x,  // [H] one valid row
                                const T* __restrict c,         // [5, H] feature constants
                                scalar_t* __restrict y, int64_t H) {
  const auto [alpha, gamma, beta, mean, rstd] = constant_rows(c, H);
  for (int64_t h = 0; h < H; ++h) {
    const T xv = static_cast<T>(x[h]);
    const T p = sigmoid(gamma[h] * ((xv - mean[h]) * rstd[h]) + beta[h]);
    y[h] = static_cast<scalar_t>(xv * (alpha[h] + (T(1) - alpha[h]) * p));
  }
}

// Writes dx = local and adds the row's terms of d alpha, d gamma, d beta to sums.
template <typename scalar_t, typename T>
DIN_EXT_INLINE void backward_row(const scalar_t* __restrict g,  // [H] dL/dy of one valid row
                                 const scalar_t* __restrict x,  // [H]
                                 const T* __restrict c,         // [5, H] feature constants
                                 scalar_t* __restrict dx,       // [H]
                                 double* __restrict sums,       // [3, H] d alpha, d gamma, d beta of the row's block
                                 int64_t H) {
  const auto [alpha, gamma, beta, mean, rstd] = constant_rows(c, H);
  for (int64_t h = 0; h < H; ++h) {
    const T xv = static_cast<T>(x[h]);
    const T gx = static_cast<T>(g[h]) * xv;
    const T xhat = (xv - mean[h]) * rstd[h];
    const T p = sigmoid(gamma[h] * xhat + beta[h]);
    const T t = gx * (T(1) - alpha[h]) * p * (T(1) - p);
    dx[h] = static_cast<scalar_t>(static_cast<T>(g[h]) * (alpha[h] + (T(1) - alpha[h]) * p) + gamma[h] * rstd[h] * t);
    sums[h] += static_cast<double>(gx * (T(1) - p));
    sums[H + h] += static_cast<double>(t * xhat);
    sums[2 * H + h] += static_cast<double>(t);
  }
}

// dx -= k0 + k1 * (x - mean): the gradient through the batch statistics.
template <typename scalar_t, typename T>
DIN_EXT_INLINE void statistics_row(const scalar_t* __restrict x,  // [H] one valid row
                                   const T* __restrict mean,      // [H]
                                   const T* __restrict k,         // [2, H] k0, k1
                                   scalar_t* __restrict dx, int64_t H) {
  for (int64_t h = 0; h < H; ++h) {
    const T xv = static_cast<T>(x[h]);
    dx[h] = static_cast<scalar_t>(static_cast<T>(dx[h]) - (k[h] + k[H + h] * (xv - mean[h])));
  }
}

// The passes over rows r0 .. r1 - 1 (valid: [N] or nullptr for all rows valid). Each is compiled for the baseline
// and for AVX2+FMA and runs the build the processor has (kernels.h); its run() is inlined into both.

// Mean and sum of squared deviations of the block's valid rows (two reads, the second from cache); their number.
struct BlockMoments {
  template <typename scalar_t>
  static DIN_EXT_INLINE int64_t run(const scalar_t* x, const bool* valid, int64_t r0, int64_t r1, int64_t H,
                                    double* mean, double* m2) {
    int64_t n = 0;
    for (int64_t r = r0; r < r1; ++r) {
      if (valid && !valid[r]) continue;
      add_row(x + r * H, mean, H);
      ++n;
    }
    if (n == 0) return 0;
    const double inv_n = 1.0 / static_cast<double>(n);
    for (int64_t h = 0; h < H; ++h) mean[h] *= inv_n;
    for (int64_t r = r0; r < r1; ++r) {
      if (valid && !valid[r]) continue;
      add_squared_deviation(x + r * H, mean, m2, H);
    }
    return n;
  }
};

struct ForwardRows {
  template <typename scalar_t, typename T>
  static DIN_EXT_INLINE void run(const scalar_t* x, const bool* valid, const T* c, int64_t r0, int64_t r1, int64_t H,
                                 scalar_t* y) {
    for (int64_t r = r0; r < r1; ++r) {
      if (valid && !valid[r]) {
        std::fill_n(y + r * H, H, scalar_t(0));
      } else {
        forward_row(x + r * H, c, y + r * H, H);
      }
    }
  }
};

// dx = local on the block's rows (0 on invalid ones), their d alpha, d gamma, d beta added to sums; their number.
struct BackwardRows {
  template <typename scalar_t, typename T>
  static DIN_EXT_INLINE int64_t run(const scalar_t* g, const scalar_t* x, const bool* valid, const T* c, int64_t r0,
                                    int64_t r1, int64_t H, scalar_t* dx, double* sums) {
    int64_t n = 0;
    for (int64_t r = r0; r < r1; ++r) {
      if (valid && !valid[r]) {
        std::fill_n(dx + r * H, H, scalar_t(0));
        continue;
      }
      backward_row(g + r * H, x + r * H, c, dx + r * H, sums, H);
      ++n;
    }
    return n;
  }
};

struct StatisticsRows {
  template <typename scalar_t, typename T>
  static DIN_EXT_INLINE void run(const scalar_t* x, const bool* valid, const T* mean, const T* k, int64_t r0,
                                 int64_t r1, int64_t H, scalar_t* dx) {
    for (int64_t r = r0; r < r1; ++r) {
      if (!valid || valid[r]) statistics_row(x + r * H, mean, k, dx + r * H, H);
    }
  }
};

template <typename Pass, typename... Args>
auto run_baseline(Args... args) {
  return Pass::run(args...);
}
#if DIN_EXT_HAVE_AVX2
template <typename Pass, typename... Args>
DIN_EXT_AVX2 auto run_avx2(Args... args) {
  return Pass::run(args...);
}
#endif

template <typename Pass, typename... Args>
auto run_best(Args... args) {
#if DIN_EXT_HAVE_AVX2
  if (has_avx2_fma()) return run_avx2<Pass>(args...);
#endif
  return run_baseline<Pass>(args...);
}

// Batch mean and biased variance of the valid rows, written to mean/var ([H] each). Blocks are merged in order
// with Chan et al.'s pairwise update. Unlike sum(x^2) - n mean^2 this does not cancel when |mean| >> std.
template <typename scalar_t>
void batch_statistics(const scalar_t* x, const bool* valid, int64_t N, int64_t H, scalar_t* mean_out,
                      scalar_t* var_out) {
  const int64_t blocks = num_blocks(N);
  std::vector<int64_t> count(blocks, 0);
  std::vector<double> block_mean(blocks * H, 0.0), block_m2(blocks * H, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kBlockRows, r1 = std::min(N, r0 + kBlockRows);
      count[b] = run_best<BlockMoments>(x, valid, r0, r1, H, block_mean.data() + b * H, block_m2.data() + b * H);
    }
  });
  std::vector<double> mean(H, 0.0), m2(H, 0.0);
  int64_t n = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    if (count[b] == 0) continue;
    const double* bm = block_mean.data() + b * H;
    const double* bm2 = block_m2.data() + b * H;
    const double n_a = static_cast<double>(n), n_b = static_cast<double>(count[b]);
    const double w = n_b / (n_a + n_b);
    const double cross = n_a * n_b / (n_a + n_b);
    for (int64_t h = 0; h < H; ++h) {
      const double delta = bm[h] - mean[h];
      mean[h] += delta * w;
      m2[h] += bm2[h] + delta * delta * cross;
    }
    n += count[b];
  }
  const double inv_n = n > 0 ? 1.0 / static_cast<double>(n) : 0.0;
  for (int64_t h = 0; h < H; ++h) {
    mean_out[h] = static_cast<scalar_t>(mean[h]);
    var_out[h] = static_cast<scalar_t>(m2[h] * inv_n);
  }
}

template <typename scalar_t>
void dice_forward_kernel(const scalar_t* x,       // [N, H]
                         const bool* valid,       // [N] or nullptr (all rows valid)
                         const scalar_t* params,  // [5, H]
                         bool training, double eps, int64_t N, int64_t H,
                         scalar_t* y,             // [N, H]
                         scalar_t* stats) {       // [2, H] zeros; the batch mean and var in training
  using T = at::opmath_type<scalar_t>;
  if (training) batch_statistics(x, valid, N, H, stats, stats + H);
  const scalar_t* mean = training ? stats : params + kDiceRunningMean * H;
  const scalar_t* var = training ? stats + H : params + kDiceRunningVar * H;
  const std::vector<T> c = feature_constants<scalar_t, T>(params, mean, var, H, eps);
  at::parallel_for(0, N, kBlockRows, [&](int64_t r0, int64_t r1) {
    run_best<ForwardRows>(x, valid, c.data(), r0, r1, H, y);
  });
}

template <typename scalar_t>
void dice_backward_kernel(const scalar_t* grad_y,  // [N, H]
                          const scalar_t* x,       // [N, H]
                          const bool* valid,       // [N] or nullptr (all rows valid)
                          const scalar_t* params,  // [5, H]
                          const scalar_t* stats,   // [2, H] the forward's batch statistics (training)
                          bool training, double eps, int64_t N, int64_t H,
                          scalar_t* grad_x,        // [N, H]
                          scalar_t* grad_params) {   // [5, H] zeros
  using T = at::opmath_type<scalar_t>;
  const scalar_t* mean = training ? stats : params + kDiceRunningMean * H;
  const scalar_t* var = training ? stats + H : params + kDiceRunningVar * H;
  const std::vector<T> c = feature_constants<scalar_t, T>(params, mean, var, H, eps);

  // Pass 1: dx = local, and per block the sums d alpha, d gamma, d beta.
  const int64_t blocks = num_blocks(N);
  std::vector<int64_t> count(blocks, 0);
  std::vector<double> block_sums(blocks * 3 * H, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kBlockRows, r1 = std::min(N, r0 + kBlockRows);
      count[b] = run_best<BackwardRows>(grad_y, x, valid, c.data(), r0, r1, H, grad_x, block_sums.data() + b * 3 * H);
    }
  });
  std::vector<double> sums(3 * H, 0.0);  // d alpha, d gamma, d beta
  int64_t n = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t i = 0; i < 3 * H; ++i) sums[i] += block_sums[b * 3 * H + i];
    n += count[b];
  }
  const double* d_alpha = sums.data();
  const double* d_gamma = d_alpha + H;
  const double* d_beta = d_gamma + H;
  for (int64_t h = 0; h < H; ++h) {
    grad_params[kDiceAlpha * H + h] = static_cast<scalar_t>(d_alpha[h]);
    grad_params[kDiceGamma * H + h] = static_cast<scalar_t>(d_gamma[h]);
    grad_params[kDiceBeta * H + h] = static_cast<scalar_t>(d_beta[h]);
  }
  if (!training) {
    // The running statistics are inputs of the op in eval, so they get their exact gradient.
    for (int64_t h = 0; h < H; ++h) {
      const double gamma = static_cast<double>(c[kGamma * H + h]), rstd = static_cast<double>(c[kRstd * H + h]);
      grad_params[kDiceRunningMean * H + h] = static_cast<scalar_t>(-gamma * rstd * d_beta[h]);
      grad_params[kDiceRunningVar * H + h] = static_cast<scalar_t>(-0.5 * gamma * rstd * rstd * d_gamma[h]);
    }
    return;
  }
  if (n == 0) return;

  // Pass 2 (training): k0 = gamma rstd d beta / n, k1 = gamma rstd^2 d gamma / n.
  std::vector<T> k(2 * H);
  for (int64_t h = 0; h < H; ++h) {
    const double gamma = static_cast<double>(c[kGamma * H + h]), rstd = static_cast<double>(c[kRstd * H + h]);
    const double scale = gamma * rstd / static_cast<double>(n);
    k[h] = static_cast<T>(scale * d_beta[h]);
    k[H + h] = static_cast<T>(scale * rstd * d_gamma[h]);
  }
  at::parallel_for(0, N, kBlockRows, [&](int64_t r0, int64_t r1) {
    run_best<StatisticsRows>(x, valid, c.data() + kMean * H, k.data(), r0, r1, H, grad_x);
  });
}

std::tuple<at::Tensor, at::Tensor> dice_forward(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                                const at::Tensor& params, bool training, double eps) {
  const DiceForwardArgs args = dice_forward_args(x, mask, params, training, eps);
  // Half and bfloat16 compute in float (opmath): the op accepted them before it was fused, and still does.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(), "din_ext::dice", [&] {
    dice_forward_kernel<scalar_t>(args.x.const_data_ptr<scalar_t>(), args.valid_rows(),
                                  args.params.const_data_ptr<scalar_t>(), training, eps, args.rows, args.features,
                                  args.y.mutable_data_ptr<scalar_t>(), args.stats.mutable_data_ptr<scalar_t>());
  });
  return {args.y, args.stats};
}

std::tuple<at::Tensor, at::Tensor> dice_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                 const std::optional<at::Tensor>& mask, const at::Tensor& params,
                                                 const at::Tensor& stats, bool training, double eps) {
  const DiceBackwardArgs args = dice_backward_args(grad_y, x, mask, params, stats, training, eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(), "din_ext::dice_backward", [&] {
    dice_backward_kernel<scalar_t>(args.grad_y.const_data_ptr<scalar_t>(), args.x.const_data_ptr<scalar_t>(),
                                   args.valid_rows(), args.params.const_data_ptr<scalar_t>(),
                                   args.stats.const_data_ptr<scalar_t>(), training, eps, args.rows, args.features,
                                   args.grad_x.mutable_data_ptr<scalar_t>(),
                                   args.grad_params.mutable_data_ptr<scalar_t>());
  });
  return {args.grad_x, args.grad_params};
}

}  // namespace

TORCH_LIBRARY_IMPL(din_ext, CPU, m) {
  m.impl("dice", &dice_forward);
  m.impl("dice_backward", &dice_backward);
}

}  // namespace din_ext::cpu
