// Tensor-core tile products for the cuda attention kernels (docs/design.md §3; issue 19 item 6), behind a switch.
//
// tile_linear_mma computes out[rows, O] = in[rows, K] WT[K, O] + bias (all row-major float tiles in shared memory,
// the operands of the FMA path's tile_linear) with warp-level mma.sync: each warp owns 16 x 8 output tiles and walks
// K in steps of the instruction's depth, converting its fragments on load: bf16 or fp16 (m16n8k16, the inputs'
// precision) or TF32 (m16n8k8, float inputs when torch allows TF32), with fp32 accumulation. Out-of-range rows and
// columns read as zeros and are not stored. The switch (Mma below, chosen per call on the host by
// tensor_core_mode in attention.cu) keeps the FMA path the default until a GPU run shows this one exact to the
// input precision and faster; no such run has happened yet (bench/results/gpu_static.md).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

namespace din_ext::cuda {

enum Mma : int { kMmaOff = 0, kMmaBf16 = 1, kMmaFp16 = 2, kMmaTf32 = 3 };

// Fragment layouts of mma.sync m16n8k16 / m16n8k8 (PTX ISA, "Matrix Fragments for mma.m16n8k16"): with
// g = lane / 4 and t = lane % 4, A holds rows g and g + 8, B column g, C/D rows g and g + 8 at columns 2t, 2t + 1.
__device__ __forceinline__ uint32_t pack2(float lo, float hi, int mode) {
  uint32_t bits;
  if (mode == kMmaBf16) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (lo) in the low half
    memcpy(&bits, &v, sizeof(bits));
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    memcpy(&bits, &v, sizeof(bits));
  }
  return bits;
}

__device__ __forceinline__ uint32_t tf32(float x) {
  uint32_t bits;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(x));
  return bits;
}

__device__ __forceinline__ void mma_16816(int mode, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if (mode == kMmaBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  __trap();  // the host never selects a tensor-core mode below sm_80 (tensor_core_mode)
#endif
}

__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

// out = in WT + bias on tensor cores (see the header); `mode` is a Mma other than kMmaOff. All threads of the block
// call it; it does not synchronize (the caller's barrier publishes out, as for tile_linear).
__device__ __forceinline__ void tile_linear_mma(int mode, int64_t rows, int64_t K, int64_t O, const float* in,
                                                const float* WT, const float* bias, float* out) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t tiles_n = (O + 7) / 8, tiles = ((rows + 15) / 16) * tiles_n;
  auto a_at = [&](int64_t r, int64_t k) { return r < rows && k < K ? in[r * K + k] : 0.f; };
  auto b_at = [&](int64_t k, int64_t n) { return k < K && n < O ? WT[k * O + n] : 0.f; };
  for (int64_t tile = warp; tile < tiles; tile += warps) {
    const int64_t m0 = (tile / tiles_n) * 16, n0 = (tile % tiles_n) * 8;
    const int64_t r0 = m0 + g, r1 = m0 + g + 8, c0 = n0 + 2 * t, c1 = c0 + 1;
    const float bias0 = c0 < O ? bias[c0] : 0.f, bias1 = c1 < O ? bias[c1] : 0.f;
    float d[4] = {bias0, bias1, bias0, bias1};
    if (mode == kMmaTf32) {
      for (int64_t k0 = 0; k0 < K; k0 += 8) {
        const uint32_t a[4] = {tf32(a_at(r0, k0 + t)), tf32(a_at(r1, k0 + t)), tf32(a_at(r0, k0 + t + 4)),
                               tf32(a_at(r1, k0 + t + 4))};
        const uint32_t b[2] = {tf32(b_at(k0 + t, n0 + g)), tf32(b_at(k0 + t + 4, n0 + g))};
        mma_1688_tf32(d, a, b);
      }
    } else {
      for (int64_t k0 = 0; k0 < K; k0 += 16) {
        const int64_t k = k0 + 2 * t;
        const uint32_t a[4] = {pack2(a_at(r0, k), a_at(r0, k + 1), mode), pack2(a_at(r1, k), a_at(r1, k + 1), mode),
                               pack2(a_at(r0, k + 8), a_at(r0, k + 9), mode),
                               pack2(a_at(r1, k + 8), a_at(r1, k + 9), mode)};
        const uint32_t b[2] = {pack2(b_at(k, n0 + g), b_at(k + 1, n0 + g), mode),
                               pack2(b_at(k + 8, n0 + g), b_at(k + 9, n0 + g), mode)};
        mma_16816(mode, d, a, b);
      }
    }
    if (r0 < rows && c0 < O) out[r0 * O + c0] = d[0];
    if (r0 < rows && c1 < O) out[r0 * O + c1] = d[1];
    if (r1 < rows && c0 < O) out[r1 * O + c0] = d[2];
    if (r1 < rows && c1 < O) out[r1 * O + c1] = d[3];
  }
}

}  // namespace din_ext::cuda
