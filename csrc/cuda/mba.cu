// cuda backend of din_ext::mba_embedding and din_ext::mba_embedding_backward (the math: docs/design.md section 1.5).
//
// The grouping of the step's ids is ATen's stable device sort plus unique_consecutive (deterministic); the kernels
// give each distinct id one warp, lanes over the D features, and sum the id's gradient rows sequentially in
// position order in the compute type (float for float/half/bfloat16, double for double): no atomics, so results are
// bitwise reproducible. R is summed by at::sum over the per-id terms (a fixed-order device reduction).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "common.h"
#include "cuda/device.cuh"

namespace din_ext::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

void check_table(const at::Tensor& weight, const at::Tensor& frequencies) {
  check_mba_table(weight, frequencies);
  check_cuda(weight, "weight");
}

template <typename freq_t, typename acc_t>
__device__ __forceinline__ acc_t inverse_count(const freq_t* freq, int64_t j) {
  const acc_t n = static_cast<acc_t>(freq[j]);
  return n < acc_t(1) ? acc_t(1) : acc_t(1) / n;
}

// terms[u] = ||w_j||^2 / n_j, one warp per distinct id.
template <typename scalar_t, typename freq_t>
__global__ void reg_terms_kernel(const scalar_t* __restrict__ weight,  // [V, D]
                                 const freq_t* __restrict__ freq,      // [V]
                                 const int64_t* __restrict__ unique_ids,  // [U]
                                 at::opmath_type<scalar_t>* __restrict__ terms,  // [U] out
                                 int64_t num_unique, int64_t dim) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t u = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (u >= num_unique) return;
  const int64_t j = unique_ids[u];
  acc_t sq = 0;
  for (int64_t d = lane; d < dim; d += 32) {
    const acc_t w = static_cast<acc_t>(weight[j * dim + d]);
    sq += w * w;
  }
  for (int offset = 16; offset > 0; offset /= 2) sq += __shfl_down_sync(0xffffffffu, sq, offset);
  if (lane == 0) terms[u] = sq * inverse_count<freq_t, acc_t>(freq, j);
}

// grad_rows[u] = sum_{k in segment u} grad_out[order[k]] + lambda * w_j / n_j, one warp per distinct id.
template <typename scalar_t, typename freq_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_out,  // [N, D]
                                const scalar_t* __restrict__ weight,    // [V, D]
                                const freq_t* __restrict__ freq,        // [V]
                                const int64_t* __restrict__ unique_ids,  // [U]
                                const int64_t* __restrict__ offsets,     // [U + 1] segment bounds into order
                                const int64_t* __restrict__ order,       // [M] positions grouped by id
                                scalar_t* __restrict__ grad_rows,        // [U, D] out
                                int64_t num_unique, int64_t dim, double reg_lambda) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t u = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (u >= num_unique) return;
  const int64_t j = unique_ids[u];
  const acc_t scale = static_cast<acc_t>(reg_lambda) * inverse_count<freq_t, acc_t>(freq, j);
  const int64_t begin = offsets[u], end = offsets[u + 1];
  for (int64_t d0 = 0; d0 < dim; d0 += 32) {
    const int64_t d = d0 + lane;
    if (d >= dim) break;
    acc_t acc = 0;
    for (int64_t k = begin; k < end; ++k) acc += static_cast<acc_t>(grad_out[order[k] * dim + d]);
    grad_rows[u * dim + d] = static_cast<scalar_t>(acc + scale * static_cast<acc_t>(weight[j * dim + d]));
  }
}

unsigned int num_blocks(int64_t num_unique) {
  return static_cast<unsigned int>((num_unique + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

// Calls fn.template operator()<freq_t>() for the dtype of frequencies.
template <typename Fn>
void dispatch_frequencies(const at::Tensor& frequencies, Fn&& fn) {
  switch (frequencies.scalar_type()) {
    case at::kFloat:
      fn(static_cast<const float*>(nullptr));
      break;
    case at::kDouble:
      fn(static_cast<const double*>(nullptr));
      break;
    default:
      fn(static_cast<const int64_t*>(nullptr));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mba_embedding_forward(
    const at::Tensor& weight_in, const at::Tensor& ids_in, const at::Tensor& frequencies_in, double reg_lambda,
    int64_t padding_idx, bool /*sparse: read by the autograd*/) {
  check_table(weight_in, frequencies_in);
  check_mba_lookup(weight_in, ids_in, padding_idx);
  const int64_t num_rows = weight_in.size(0), dim = weight_in.size(1);
  const c10::cuda::CUDAGuard guard(weight_in.device());
  const at::Tensor weight = weight_in.contiguous(), frequencies = frequencies_in.contiguous();
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  if (ids.numel()) {  // one synchronization: a bad id must fail here, not read out of bounds
    const auto [lo, hi] = at::aminmax(ids);
    const int64_t lo_id = lo.item<int64_t>(), hi_id = hi.item<int64_t>();
    TORCH_CHECK(lo_id >= 0 && hi_id < num_rows, "din_ext: ids must be in [0, ", num_rows, ") (rows of weight), got ",
                lo_id < 0 ? lo_id : hi_id);
  }
  auto [sorted_ids, order] = at::sort(ids, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  if (padding_idx >= 0) {
    const at::Tensor keep = sorted_ids.ne(padding_idx);
    sorted_ids = sorted_ids.masked_select(keep);
    order = order.masked_select(keep);
  }
  auto [unique_ids, inverse, counts] = at::unique_consecutive(sorted_ids, false, true);
  const at::Tensor offsets = at::cat({at::zeros({1}, counts.options()), counts.cumsum(0)});
  const at::Tensor out = at::index_select(weight, 0, ids);
  const int64_t num_unique = unique_ids.size(0);
  const auto acc_dtype = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor terms = at::zeros({num_unique}, weight.options().dtype(acc_dtype));
  if (num_unique > 0) {
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "mba_reg_terms", [&] {
      dispatch_frequencies(frequencies, [&](auto tag) {
        using freq_t = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        reg_terms_kernel<scalar_t, freq_t><<<num_blocks(num_unique), kWarpsPerBlock * 32, 0, stream>>>(
            weight.const_data_ptr<scalar_t>(), frequencies.const_data_ptr<freq_t>(),
            unique_ids.const_data_ptr<int64_t>(), terms.data_ptr<at::opmath_type<scalar_t>>(), num_unique, dim);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  const at::Tensor reg = terms.sum().mul_(0.5 * reg_lambda);
  return {out, reg, unique_ids, offsets, order};
}

at::Tensor mba_embedding_backward(const at::Tensor& grad_out_in, const at::Tensor& weight_in,
                                  const at::Tensor& frequencies_in, const at::Tensor& unique_ids_in,
                                  const at::Tensor& offsets_in, const at::Tensor& order_in, double reg_lambda) {
  check_table(weight_in, frequencies_in);
  const c10::cuda::CUDAGuard guard(weight_in.device());
  const MbaBackwardArgs args =
      mba_backward_args(grad_out_in, weight_in, frequencies_in, unique_ids_in, offsets_in, order_in);
  const at::Tensor &grad_out = args.grad_out, &weight = args.weight, &frequencies = args.frequencies,
                   &unique_ids = args.unique_ids, &offsets = args.offsets, &order = args.order,
                   &grad_rows = args.grad_rows;
  const int64_t dim = weight.size(1), num_unique = unique_ids.size(0);
  if (num_unique == 0 || dim == 0) return grad_rows;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "mba_embedding_backward", [&] {
    dispatch_frequencies(frequencies, [&](auto tag) {
      using freq_t = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
      backward_kernel<scalar_t, freq_t><<<num_blocks(num_unique), kWarpsPerBlock * 32, 0, stream>>>(
          grad_out.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
          frequencies.const_data_ptr<freq_t>(), unique_ids.const_data_ptr<int64_t>(),
          offsets.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(), grad_rows.data_ptr<scalar_t>(),
          num_unique, dim, reg_lambda);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_rows;
}

}  // namespace

TORCH_LIBRARY_IMPL(din_ext, CUDA, m) {
  m.impl("mba_embedding", &mba_embedding_forward);
  m.impl("mba_embedding_backward", &mba_embedding_backward);
}

}  // namespace din_ext::cuda
