// Device helpers shared by the cuda backend's kernels: math in the compute type, vectorized tile loads,
// deterministic block reductions and the host-side launch checks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <cstring>

namespace din_ext::cuda {

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid_(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp_(-x));
}

template <typename acc_t>
__device__ __forceinline__ acc_t max_(acc_t a, acc_t b) {
  return a > b ? a : b;
}

template <typename acc_t>
__device__ __forceinline__ acc_t min_(acc_t a, acc_t b) {
  return a < b ? a : b;
}

// dst[i] = src[i] for i < count, converted to the compute type, by all threads of the block. 16-byte loads when
// src is 16-byte aligned (a tile of keys rows is one contiguous span), scalar loads otherwise.
template <typename T, typename acc_t>
__device__ __forceinline__ void load_span(const T* __restrict__ src, int64_t count, acc_t* __restrict__ dst) {
  constexpr int kVec = 16 / sizeof(T);
  int64_t done = 0;
  if (reinterpret_cast<uintptr_t>(src) % 16 == 0) {
    const int64_t vectors = count / kVec;
    const uint4* vsrc = reinterpret_cast<const uint4*>(src);
    for (int64_t i = threadIdx.x; i < vectors; i += blockDim.x) {
      const uint4 raw = vsrc[i];
      T e[kVec];
      memcpy(e, &raw, sizeof(raw));
#pragma unroll
      for (int k = 0; k < kVec; ++k) dst[i * kVec + k] = static_cast<acc_t>(e[k]);
    }
    done = vectors * kVec;
  }
  for (int64_t i = done + threadIdx.x; i < count; i += blockDim.x) dst[i] = static_cast<acc_t>(src[i]);
}

// Sum (or max) over the block of one value per thread, in a fixed order: thread-sequential values, then a tree in
// shared memory (scratch: blockDim.x elements, blockDim.x a power of two). Every thread gets the result.
template <typename acc_t, bool kMax>
__device__ __forceinline__ acc_t block_reduce(acc_t value, acc_t* scratch) {
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      const acc_t other = scratch[threadIdx.x + stride];
      scratch[threadIdx.x] = kMax ? max_(scratch[threadIdx.x], other) : scratch[threadIdx.x] + other;
    }
    __syncthreads();
  }
  const acc_t result = scratch[0];
  __syncthreads();  // scratch is reused by the caller's next reduction
  return result;
}

// out[k] = sum_r in[r * K + k] for k < K, rows added in order r = 0, 1, ... (deterministic).
template <typename S>
__global__ void sum_rows_kernel(const S* __restrict__ in,  // [R, K]
                                int64_t R, int64_t K,
                                S* __restrict__ out) {     // [K]
  const int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (k >= K) return;
  S total = 0;
  for (int64_t r = 0; r < R; ++r) total += in[r * K + k];
  out[k] = total;
}

// The column sums of a [R, K] tensor on the current stream, in row order.
inline at::Tensor sum_rows(const at::Tensor& in) {
  TORCH_INTERNAL_ASSERT(in.dim() == 2 && in.is_contiguous());
  const int64_t R = in.size(0), K = in.size(1);
  at::Tensor out = at::empty({K}, in.options());
  if (K == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  constexpr int kBlock = 256;
  const auto blocks = static_cast<unsigned>((K + kBlock - 1) / kBlock);
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "din_ext_sum_rows", [&] {
    sum_rows_kernel<scalar_t><<<blocks, kBlock, 0, stream>>>(in.const_data_ptr<scalar_t>(), R, K,
                                                             out.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Shared memory beyond the default 48 KiB must be requested per kernel.
template <typename Kernel>
inline void allow_smem(Kernel kernel, int64_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "din_ext: the cuda backend needs ", name, " on a CUDA device, got ", t.device());
}

}  // namespace din_ext::cuda
