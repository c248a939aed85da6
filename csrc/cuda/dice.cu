// cuda backend of din_ext::dice: Dice on x [N, H], statistics over the rows where mask is true (all rows if no
// mask). Masked-out rows output 0, get no gradient and are never read. The math is docs/design.md section 1.3.
// Reproducibility: per-feature sums are taken in double over fixed blocks of kBlockRows rows (one thread per
// feature, rows in order) and the blocks are merged in block order (Chan et al.'s update for the moments), so the
// result does not depend on the launch configuration and never uses atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"
#include "cuda/device.cuh"

namespace din_ext::cuda {
namespace {

constexpr int64_t kBlockRows = 256;  // rows of one statistics block (fixes the summation order)
constexpr int kColumns = 128;        // features per thread block of the per-feature kernels
constexpr int kElementwise = 256;    // threads per block of the elementwise kernels

// Rows of the per-feature constants ([5, H], compute type).
constexpr int kAlpha = 0, kGamma = 1, kBeta = 2, kMean = 3, kRstd = 4;

__device__ __forceinline__ bool is_valid(const bool* valid, int64_t r) { return valid == nullptr || valid[r]; }

// Per block of rows and feature: count of valid rows, their mean and sum of squared deviations (double).
template <typename T>
__global__ void __launch_bounds__(kColumns) moments_kernel(const T* __restrict__ x,          // [N, H]
                                                            const bool* __restrict__ valid,  // [N] or nullptr
                                                            int64_t N, int64_t H,
                                                            int64_t* __restrict__ count,     // [blocks]
                                                            double* __restrict__ mean,       // [blocks, H]
                                                            double* __restrict__ m2) {       // [blocks, H]
  const int64_t blk = blockIdx.x, r0 = blk * kBlockRows, r1 = min_(N, r0 + kBlockRows);
  const int64_t h = blockIdx.y * static_cast<int64_t>(kColumns) + threadIdx.x;
  int64_t n = 0;
  for (int64_t r = r0; r < r1; ++r) n += is_valid(valid, r);
  if (blockIdx.y == 0 && threadIdx.x == 0) count[blk] = n;
  if (h >= H) return;
  double sum = 0;
  for (int64_t r = r0; r < r1; ++r) {
    if (is_valid(valid, r)) sum += static_cast<double>(x[r * H + h]);
  }
  const double mu = n > 0 ? sum / static_cast<double>(n) : 0.0;
  double sq = 0;
  for (int64_t r = r0; r < r1; ++r) {
    if (!is_valid(valid, r)) continue;
    const double d = static_cast<double>(x[r * H + h]) - mu;
    sq += d * d;
  }
  mean[blk * H + h] = mu;
  m2[blk * H + h] = sq;
}

// Merges the blocks in order into the batch mean and biased variance (stats [2, H], the op's dtype).
template <typename T>
__global__ void __launch_bounds__(kElementwise) merge_moments_kernel(const int64_t* __restrict__ count,
                                                                     const double* __restrict__ mean,
                                                                     const double* __restrict__ m2, int64_t blocks,
                                                                     int64_t H, T* __restrict__ stats) {
  const int64_t h = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (h >= H) return;
  double mu = 0, sq = 0, n = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    if (count[b] == 0) continue;
    const double nb = static_cast<double>(count[b]);
    const double delta = mean[b * H + h] - mu;
    mu += delta * nb / (n + nb);
    sq += m2[b * H + h] + delta * delta * n * nb / (n + nb);
    n += nb;
  }
  stats[h] = static_cast<T>(mu);
  stats[H + h] = static_cast<T>(n > 0 ? sq / n : 0.0);
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kElementwise) forward_kernel(const T* __restrict__ x, const bool* __restrict__ valid,
                                                               const acc_t* __restrict__ c,  // [5, H]
                                                               int64_t N, int64_t H, T* __restrict__ y) {
  const int64_t total = N * H, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total; i += stride) {
    const int64_t r = i / H, h = i % H;
    if (!is_valid(valid, r)) {
      y[i] = static_cast<T>(0);
      continue;
    }
    const acc_t xv = static_cast<acc_t>(x[i]), alpha = c[kAlpha * H + h];
    const acc_t p = sigmoid_(c[kGamma * H + h] * ((xv - c[kMean * H + h]) * c[kRstd * H + h]) + c[kBeta * H + h]);
    y[i] = static_cast<T>(xv * (alpha + (acc_t(1) - alpha) * p));
  }
}

// dx = g (alpha + (1 - alpha) p) + gamma rstd t on valid rows (0 elsewhere); per block of rows and feature the
// sums d alpha, d gamma, d beta (double, [blocks, 3, H]).
template <typename T, typename acc_t>  // min blocks 1: ptxas spilled the fp32 instantiation at 47 registers without it
__global__ void __launch_bounds__(kColumns, 1) backward_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                                             const bool* __restrict__ valid,
                                                             const acc_t* __restrict__ c,  // [5, H]
                                                             int64_t N, int64_t H, T* __restrict__ dx,
                                                             double* __restrict__ sums,    // [blocks, 3, H]
                                                             int64_t* __restrict__ count) {  // [blocks]
  const int64_t blk = blockIdx.x, r0 = blk * kBlockRows, r1 = min_(N, r0 + kBlockRows);
  const int64_t h = blockIdx.y * static_cast<int64_t>(kColumns) + threadIdx.x;
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    int64_t n = 0;
    for (int64_t r = r0; r < r1; ++r) n += is_valid(valid, r);
    count[blk] = n;
  }
  if (h >= H) return;
  const acc_t alpha = c[kAlpha * H + h], gamma = c[kGamma * H + h], beta = c[kBeta * H + h];
  const acc_t mean = c[kMean * H + h], rstd = c[kRstd * H + h];
  double d_alpha = 0, d_gamma = 0, d_beta = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i = r * H + h;
    if (!is_valid(valid, r)) {
      dx[i] = static_cast<T>(0);
      continue;
    }
    const acc_t xv = static_cast<acc_t>(x[i]), gv = static_cast<acc_t>(g[i]);
    const acc_t xhat = (xv - mean) * rstd;
    const acc_t p = sigmoid_(gamma * xhat + beta);
    const acc_t t = gv * xv * (acc_t(1) - alpha) * p * (acc_t(1) - p);
    dx[i] = static_cast<T>(gv * (alpha + (acc_t(1) - alpha) * p) + gamma * rstd * t);
    d_alpha += static_cast<double>(gv * xv * (acc_t(1) - p));
    d_gamma += static_cast<double>(t * xhat);
    d_beta += static_cast<double>(t);
  }
  double* s = sums + blk * 3 * H;
  s[h] = d_alpha;
  s[H + h] = d_gamma;
  s[2 * H + h] = d_beta;
}

// Training: dx -= k0 + k1 (x - mean) on valid rows (the gradient through the batch statistics).
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kElementwise) statistics_kernel(const T* __restrict__ x,
                                                                  const bool* __restrict__ valid,
                                                                  const acc_t* __restrict__ c,  // [5, H]
                                                                  const acc_t* __restrict__ k,  // [2, H]
                                                                  int64_t N, int64_t H, T* __restrict__ dx) {
  const int64_t total = N * H, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total; i += stride) {
    const int64_t r = i / H, h = i % H;
    if (!is_valid(valid, r)) continue;
    const acc_t xv = static_cast<acc_t>(x[i]);
    dx[i] = static_cast<T>(static_cast<acc_t>(dx[i]) - (k[h] + k[H + h] * (xv - c[kMean * H + h])));
  }
}

unsigned elementwise_blocks(int64_t total) {
  const int64_t blocks = (total + kElementwise - 1) / kElementwise;
  return static_cast<unsigned>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

dim3 feature_grid(int64_t N, int64_t H) {
  const int64_t row_blocks = (N + kBlockRows - 1) / kBlockRows;
  const int64_t column_blocks = (H + kColumns - 1) / kColumns;
  TORCH_CHECK(row_blocks <= 0x7fffffff && column_blocks <= 65535, "din_ext: dice input too large for one launch");
  return dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(column_blocks));
}

// [5, H] constants in the compute type: alpha, gamma, beta, mean, rstd (taken in double so that var + eps does not
// round eps away in low precision).
at::Tensor feature_constants(const at::Tensor& params, const at::Tensor& mean, const at::Tensor& var, double eps,
                             at::ScalarType acc) {
  return at::cat({params.narrow(0, kDiceAlpha, 3).to(acc), mean.to(acc).unsqueeze(0),
                  (var.to(at::kDouble) + eps).rsqrt().to(acc).unsqueeze(0)},
                 0)
      .contiguous();
}

std::tuple<at::Tensor, at::Tensor> dice_forward(const at::Tensor& x_, const std::optional<at::Tensor>& mask,
                                                const at::Tensor& params_, bool training, double eps) {
  check_cuda(x_, "x");
  const c10::cuda::CUDAGuard guard(x_.device());
  const DiceForwardArgs args = dice_forward_args(x_, mask, params_, training, eps);
  const at::Tensor &x = args.x, &params = args.params, &y = args.y, &stats = args.stats;
  const bool* valid_ptr = args.valid_rows();
  const int64_t N = args.rows, H = args.features;
  if (N == 0 || H == 0) return {y, stats};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "din_ext_dice_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
    if (training) {
      const dim3 grid = feature_grid(N, H);
      at::Tensor count = at::empty({grid.x}, x.options().dtype(at::kLong));
      at::Tensor mean = at::empty({grid.x, H}, x.options().dtype(at::kDouble));
      at::Tensor m2 = at::empty_like(mean);
      moments_kernel<scalar_t><<<grid, kColumns, 0, stream>>>(x.const_data_ptr<scalar_t>(), valid_ptr, N, H,
                                                              count.mutable_data_ptr<int64_t>(),
                                                              mean.mutable_data_ptr<double>(),
                                                              m2.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      merge_moments_kernel<scalar_t><<<elementwise_blocks(H), kElementwise, 0, stream>>>(
          count.const_data_ptr<int64_t>(), mean.const_data_ptr<double>(), m2.const_data_ptr<double>(), grid.x, H,
          stats.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const at::Tensor c = training ? feature_constants(params, stats[0], stats[1], eps, acc)
                                  : feature_constants(params, params[kDiceRunningMean], params[kDiceRunningVar], eps,
                                                      acc);
    forward_kernel<scalar_t, acc_t><<<elementwise_blocks(N * H), kElementwise, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), valid_ptr, c.const_data_ptr<acc_t>(), N, H, y.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, stats};
}

std::tuple<at::Tensor, at::Tensor> dice_backward(const at::Tensor& grad_y_, const at::Tensor& x_,
                                                 const std::optional<at::Tensor>& mask, const at::Tensor& params_,
                                                 const at::Tensor& stats_, bool training, double eps) {
  check_cuda(x_, "x");
  const c10::cuda::CUDAGuard guard(x_.device());
  const DiceBackwardArgs args = dice_backward_args(grad_y_, x_, mask, params_, stats_, training, eps);
  const at::Tensor &x = args.x, &grad_y = args.grad_y, &params = args.params, &stats = args.stats;
  const at::Tensor &grad_x = args.grad_x, &grad_params = args.grad_params;
  const bool* valid_ptr = args.valid_rows();
  const int64_t N = args.rows, H = args.features;
  if (N == 0 || H == 0) return {grad_x, grad_params};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "din_ext_dice_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor mean = training ? stats[0] : params[kDiceRunningMean];
    const at::Tensor var = training ? stats[1] : params[kDiceRunningVar];
    const at::Tensor c = feature_constants(params, mean, var, eps, acc);
    const dim3 grid = feature_grid(N, H);
    at::Tensor block_sums = at::empty({grid.x, 3 * H}, x.options().dtype(at::kDouble));
    at::Tensor count = at::empty({grid.x}, x.options().dtype(at::kLong));
    backward_kernel<scalar_t, acc_t><<<grid, kColumns, 0, stream>>>(
        grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), valid_ptr, c.const_data_ptr<acc_t>(), N, H,
        grad_x.mutable_data_ptr<scalar_t>(), block_sums.mutable_data_ptr<double>(), count.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor sums = sum_rows(block_sums).view({3, H});  // d alpha, d gamma, d beta, blocks in order
    grad_params.narrow(0, kDiceAlpha, 3).copy_(sums);
    const at::Tensor gamma = c[kGamma].to(at::kDouble), rstd = c[kRstd].to(at::kDouble);
    if (!training) {  // the running statistics are inputs of the op in eval
      grad_params[kDiceRunningMean].copy_(-gamma * rstd * sums[2]);
      grad_params[kDiceRunningVar].copy_(-0.5 * gamma * rstd * rstd * sums[1]);
      return;
    }
    const at::Tensor n = count.sum().to(at::kDouble).clamp_min(1);  // no valid row: nothing to correct
    const at::Tensor scale = gamma * rstd / n;
    const at::Tensor k = at::stack({scale * sums[2], scale * rstd * sums[1]}).to(acc).contiguous();
    statistics_kernel<scalar_t, acc_t><<<elementwise_blocks(N * H), kElementwise, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), valid_ptr, c.const_data_ptr<acc_t>(), k.const_data_ptr<acc_t>(), N, H,
        grad_x.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_params};
}

}  // namespace

TORCH_LIBRARY_IMPL(din_ext, CUDA, m) {
  m.impl("dice", &dice_forward);
  m.impl("dice_backward", &dice_backward);
}

}  // namespace din_ext::cuda
