// cuda backend of din_ext::local_activation_attention: fused forward and backward.
//
// The math (layer-1 split z_0 = c_b + Weff_b k, activations, pooling, backward) is docs/design.md sections 1.1-1.3,
// the op contract section 2; this header says what is particular to the cuda kernels.
//
// Work decomposition (csrc/cuda/attention_plan.h): a user's rows are cut into chunks of plan::kChunkRows rows, one work
// item each; a block sets up the user's c_b and Weff_b in shared memory once per item and walks the chunk in row tiles
// whose pre-activations and activations live in shared memory. Nothing of size [N, H] is materialized, padded
// positions are never read, and the backward recomputes the forward.
//   forward:  [Dice training: one statistics pass per hidden layer, per-block partial sums reduced in block order]
//             pooling pass (one block per item: partial pooled sums, or the online-softmax triple (m, l, acc)),
//             then a per-user combine over the user's chunks in chunk order. No atomics.
//   backward: [softmax: a scores pass writing s_t and g.v_t per key row, then a per-user pass turning them into
//             pooling weights and score gradients] [Dice training: one sums pass per hidden layer, from the top,
//             gathering sum(g_xhat) and sum(g_xhat * xhat) for the exact gradient through the batch statistics]
//             then the gradient pass: grad_keys / grad_values rows are written once (rows are disjoint across
//             users), parameter gradients go to per-block partial rows (each element owned by one thread), reduced
//             in block order; the query gradient per item, combined per user in chunk order. No atomics anywhere,
//             so every result is bitwise reproducible run to run.
// Several candidates per user (query [B, C, D]; attention_plan.h): a work item is (user, chunk, candidate group);
// each key (and value) tile is loaded into shared memory once and serves the group's candidates in order, each
// setting up its own c and Weff (O(D H1) per tile, against O(tile D H1) for the tile's layer 1). Per-candidate state
// that spans tiles (online-softmax triple, query-gradient accumulator) is carried in the candidate's partial row;
// per-(candidate, key row) softmax buffers are [C, N] scalars; a tile's key / value gradients are summed over the
// group's candidates in shared memory and stored once (per group into [G, N, D] partials reduced in group order
// when the candidates are split). The combine, softmax-gradient and query-gradient kernels run one block per
// (user, candidate). Dice's statistics count C * sum(lengths) pairs. With C = 1 every kernel does what it did for a
// 2-D query, in the same order (bitwise the same results).
// Compute type: float for float/half/bfloat16, double for double (at::opmath_type).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cuda/device.cuh"
#include "cuda/attention_plan.h"
#include "cuda/mma.cuh"

namespace din_ext::cuda {
namespace {

using plan::kMaxLinears;
using plan::kThreads;

constexpr int kDice = static_cast<int>(Activation::kDice);
constexpr int kSigmoid = static_cast<int>(Activation::kSigmoid);
constexpr int kPrelu = static_cast<int>(Activation::kPrelu);

// The MLP as the kernels read it (device pointers, compute type).
template <typename acc_t>
struct Net {
  int n;                      // hidden layers; linears 0 .. n
  int act;                    // Activation
  int mma;                    // Mma: the layer products on tensor cores (float compute only), or kMmaOff (FMA)
  int64_t D, Dv, htot;
  int64_t w[kMaxLinears];     // output width of linear i (w[n] == 1)
  int64_t col[kMaxLinears];   // first column of hidden layer j in act_c
  const acc_t* AT;            // [D, w0] (Wq + Wd)^T
  const acc_t* KcT;           // [D, w0] (Wk - Wd)^T
  const acc_t* PcT;           // [D, w0] Wp^T
  const acc_t* A;             // [w0, D] Wq + Wd
  const acc_t* Pc;            // [w0, D] Wp
  const acc_t* bias[kMaxLinears];  // [w_i]
  const acc_t* WT[kMaxLinears];    // i >= 1: [w_{i-1}, w_i]
  const acc_t* W[kMaxLinears];     // i >= 1: [w_i, w_{i-1}]
  const acc_t* act_c;              // [plan::kNumActConstants, htot]
};

template <typename T, typename acc_t>
struct Batch {
  const T* query;     // [B, C, D] ([B, D] when C == 1)
  const T* keys;      // [N, D]
  const T* values;    // [N, Dv] (keys when no values were given)
  const int64_t* starts;
  const int64_t* lengths;
  int64_t B, S;       // users, chunks reserved per user
  int64_t C, G, per_group;  // candidates per user, candidate groups (plan::candidate_groups), candidates per group
  int64_t N;          // rows of keys storage: the candidate stride of the per-key-row buffers [C, N]
  bool shared_values; // the values are the keys
  acc_t scale;        // score_scale
  __host__ __device__ int64_t items() const { return B * S * G; }
};

// Pointers into a block's dynamic shared memory (layout: plan::smem_layout). With several candidates and the keys as
// values, vals is the keys tile itself.
template <typename acc_t>
struct Smem {
  acc_t *weff, *c, *q, *gout, *keys, *score, *gscore, *g0, *g1, *grad_weff, *dc, *acc, *vals, *gkeys, *gvals;
  acc_t* z[kMaxLinears];
  acc_t* h[kMaxLinears];
  __device__ Smem(acc_t* base, const plan::SmemLayout& L, bool shared_values)
      : weff(base + L.weff), c(base + L.c), q(base + L.q), gout(base + L.gout), keys(base + L.keys),
        score(base + L.score), gscore(base + L.gscore), g0(base + L.g0), g1(base + L.g1),
        grad_weff(base + L.grad_weff), dc(base + L.dc), acc(base + L.acc),
        vals(shared_values ? base + L.keys : base + L.vals), gkeys(base + L.gkeys), gvals(base + L.gvals) {
    for (int i = 0; i < kMaxLinears; ++i) {
      z[i] = base + L.z[i];
      h[i] = base + L.h[i];
    }
  }
};

template <typename acc_t>
__device__ __forceinline__ acc_t* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  return reinterpret_cast<acc_t*>(smem_raw);
}

// Loads one candidate's query and builds c = (Wq + Wd) q + b_0 and Weff^T = (Wk - Wd)^T + diag(q) Wp^T.
// Starts by writing s.q: the caller's previous readers of s.q, s.c and s.weff must be past a barrier.
template <typename T, typename acc_t>
__device__ void setup_query(const Net<acc_t>& net, const T* __restrict__ query, Smem<acc_t>& s) {
  const int64_t D = net.D, w0 = net.w[0];
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) s.q[d] = static_cast<acc_t>(query[d]);
  __syncthreads();
  for (int64_t o = threadIdx.x; o < w0; o += blockDim.x) {
    acc_t v = net.bias[0][o];
    for (int64_t d = 0; d < D; ++d) v += net.AT[d * w0 + o] * s.q[d];
    s.c[o] = v;
  }
  for (int64_t i = threadIdx.x; i < D * w0; i += blockDim.x) s.weff[i] = net.KcT[i] + net.PcT[i] * s.q[i / w0];
  __syncthreads();
}

// Work item w of the block's sequence: its user, chunk, rows and candidates. False for an empty chunk (uniform
// across the block).
template <typename T, typename acc_t>
__device__ __forceinline__ bool open_item(const Batch<T, acc_t>& bt, int64_t w, plan::Item& item, plan::Range& r,
                                          plan::Range& cands) {
  item = plan::work_item(w, bt.S, bt.G);
  r = plan::chunk_range(bt.lengths[item.user], item.chunk);
  cands = plan::candidate_range(bt.C, bt.per_group, item.group);
  return r.begin != r.end;
}

// A tile's candidate step: with one candidate, the query is set up once per item (at its first tile); with several,
// before every (tile, candidate) step.
template <typename T, typename acc_t>
__device__ __forceinline__ bool needs_setup(const Batch<T, acc_t>& bt, const plan::Range& r, int64_t t0) {
  return bt.C > 1 || t0 == r.begin;
}
// out[t, o] = bias[o] + sum_k in[t, k] WT[k, o] for t < rows (dense [rows, O] and [rows, K] tiles).
// A thread computes kRowBlock rows of one column, so each weight it loads serves kRowBlock rows. Rows of the last
// group past `rows` (still inside the tile buffer: tiles are multiples of 8 rows) are computed from stale data and
// discarded. Every output is the same k-ordered sum whatever the tile, so recomputations agree bitwise.
constexpr int64_t kRowBlock = 4;
static_assert(8 % kRowBlock == 0, "row groups must not run past a tile buffer");

template <typename acc_t>
__device__ __forceinline__ void tile_linear(int64_t rows, int64_t K, int64_t O, const acc_t* in, const acc_t* WT,
                                            const acc_t* bias, acc_t* out) {
  const int64_t groups = plan::ceil_div(rows, kRowBlock);
  for (int64_t i = threadIdx.x; i < groups * O; i += blockDim.x) {
    const int64_t t0 = (i / O) * kRowBlock, o = i % O;
    const acc_t* a = in + t0 * K;
    acc_t v[kRowBlock];
#pragma unroll
    for (int r = 0; r < kRowBlock; ++r) v[r] = bias[o];
    for (int64_t k = 0; k < K; ++k) {
      const acc_t wk = WT[k * O + o];
#pragma unroll
      for (int r = 0; r < kRowBlock; ++r) v[r] += a[r * K + k] * wk;
    }
#pragma unroll
    for (int r = 0; r < kRowBlock; ++r) {
      if (t0 + r < rows) out[(t0 + r) * O + o] = v[r];
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t act_forward(const Net<acc_t>& net, int j, int64_t h, acc_t z) {
  const acc_t* c = net.act_c + net.col[j] + h;
  const int64_t H = net.htot;
  if (net.act == kDice) {
    const acc_t alpha = c[plan::kActAlpha * H];
    const acc_t xhat = (z - c[plan::kActMean * H]) * c[plan::kActRstd * H];
    const acc_t p = sigmoid_(c[plan::kActGamma * H] * xhat + c[plan::kActBeta * H]);
    return z * (alpha + (acc_t(1) - alpha) * p);
  }
  if (net.act == kSigmoid) return sigmoid_(z);
  if (net.act == kPrelu) return z > acc_t(0) ? z : c[plan::kActAlpha * H] * z;
  return z > acc_t(0) ? z : acc_t(0);
}

// Forward of the tile in s.keys ([rows, D]): z_0 .. z_upto and h_0 .. h_{upto-1}. Ends synchronized.
template <typename acc_t>
__device__ void forward_tile(const Net<acc_t>& net, Smem<acc_t>& s, int64_t rows, int upto) {
  // out = in WT + bias, on tensor cores when the call selected them (net.mma; float compute only).
  auto linear = [&](int64_t K, int64_t O, const acc_t* in, const acc_t* WT, const acc_t* bias, acc_t* out) {
    if constexpr (std::is_same_v<acc_t, float>) {
      if (net.mma != kMmaOff) return tile_linear_mma(net.mma, rows, K, O, in, WT, bias, out);
    }
    tile_linear(rows, K, O, in, WT, bias, out);
  };
  linear(net.D, net.w[0], s.keys, s.weff, s.c, s.z[0]);
  __syncthreads();
  for (int i = 1; i <= upto; ++i) {
    const int64_t wp = net.w[i - 1];
    for (int64_t k = threadIdx.x; k < rows * wp; k += blockDim.x) s.h[i - 1][k] = act_forward(net, i - 1, k % wp, s.z[i - 1][k]);
    __syncthreads();
    linear(wp, net.w[i], s.h[i - 1], net.WT[i], net.bias[i], s.z[i]);
    __syncthreads();
  }
}

// Loads rows [row0, row0 + rows) of keys into s.keys. Ends synchronized.
template <typename T, typename acc_t>
__device__ __forceinline__ void load_keys(const Net<acc_t>& net, const T* keys, int64_t row0, int64_t rows,
                                          Smem<acc_t>& s) {
  load_span(keys + row0 * net.D, rows * net.D, s.keys);
  __syncthreads();
}

// Loads a tile's keys and, with several candidates and separate values, its values (once for all the candidates).
// Ends synchronized.
template <typename T, typename acc_t>
__device__ __forceinline__ void load_tile(const Net<acc_t>& net, const Batch<T, acc_t>& bt, int64_t row0,
                                          int64_t rows, Smem<acc_t>& s) {
  load_span(bt.keys + row0 * net.D, rows * net.D, s.keys);
  if (bt.C > 1 && !bt.shared_values) load_span(bt.values + row0 * net.Dv, rows * net.Dv, s.vals);
  __syncthreads();
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// gw_t = g . v_t for the tile's rows (one warp per row), written by lane 0 through store(t, gw).
template <typename T, typename acc_t, typename Store>
__device__ __forceinline__ void grad_dot_values(int64_t Dv, const T* values, int64_t row0, int64_t rows,
                                                const acc_t* gout, Store store) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int64_t t = warp; t < rows; t += warps) {
    const T* v = values + (row0 + t) * Dv;
    acc_t dot = 0;
    for (int64_t d = lane; d < Dv; d += 32) dot += gout[d] * static_cast<acc_t>(v[d]);
    dot = warp_sum(dot);
    if (lane == 0) store(t, dot);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Forward kernels

// Dice training, hidden layer j: per block, sum and sum of squares of z_j - b_j (shifted: the bias is a cheap guess
// of the mean) over the valid (candidate, row) pairs of the block's items, tile by tile, candidate by candidate.
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads, 2) stats_kernel(const Net<acc_t> net, const Batch<T, acc_t> bt,
                                                         const plan::SmemLayout L, int64_t tile, int j,
                                                         double* __restrict__ partial) {  // [grid, 2, w_j]
  Smem<acc_t> s(dynamic_smem<acc_t>(), L, bt.shared_values);
  const int64_t wj = net.w[j];
  double* sums = partial + blockIdx.x * 2 * wj;
  for (int64_t h = threadIdx.x; h < 2 * wj; h += blockDim.x) sums[h] = 0;
  for (int64_t w = blockIdx.x; w < bt.items(); w += gridDim.x) {
    plan::Item item;
    plan::Range r, cands;
    if (!open_item(bt, w, item, r, cands)) continue;
    for (int64_t t0 = r.begin; t0 < r.end; t0 += tile) {
      const int64_t rows = plan::tile_rows_at(r, tile, t0);
      load_keys(net, bt.keys, bt.starts[item.user] + t0, rows, s);
      for (int64_t c = cands.begin; c < cands.end; ++c) {
        if (needs_setup(bt, r, t0)) setup_query(net, bt.query + (item.user * bt.C + c) * net.D, s);
        forward_tile(net, s, rows, j);
        const acc_t* z = s.z[j];
        for (int64_t h = threadIdx.x; h < wj; h += blockDim.x) {
          const acc_t shift = net.bias[j][h];
          acc_t sum = 0, sq = 0;
          for (int64_t t = 0; t < rows; ++t) {
            const acc_t v = z[t * wj + h] - shift;
            sum += v;
            sq += v * v;
          }
          sums[h] += static_cast<double>(sum);
          sums[wj + h] += static_cast<double>(sq);
        }
        __syncthreads();
      }
    }
  }
}

// Pooling, one block per work item: for each candidate c of the item, partial[partial_row(user, chunk, c)] =
// (m, l, acc[Dv]) with softmax (running max, sum of exp(s - m), sum of exp(s - m) v), or (0, 0, sum of w_t v_t)
// without. A key tile is loaded once and serves the item's candidates in order; with several candidates a
// candidate's running triple is carried from tile to tile in its partial row (one candidate: in registers and
// s.acc, written after the last tile). Empty items write nothing (the combine skips them).
template <typename T, typename acc_t, bool kSoftmax>
__global__ void __launch_bounds__(kThreads, 2) pool_kernel(const Net<acc_t> net, const Batch<T, acc_t> bt,
                                                        const plan::SmemLayout L, int64_t tile,
                                                        acc_t* __restrict__ partial) {  // [B * S * C, Dv + 2]
  Smem<acc_t> s(dynamic_smem<acc_t>(), L, bt.shared_values);
  const int64_t Dv = net.Dv, n = net.n;
  const bool multi = bt.C > 1;
  for (int64_t w = blockIdx.x; w < bt.items(); w += gridDim.x) {
    plan::Item item;
    plan::Range r, cands;
    if (!open_item(bt, w, item, r, cands)) continue;
    acc_t m = -INFINITY, l = 0;  // identical in every thread
    for (int64_t t0 = r.begin; t0 < r.end; t0 += tile) {
      const int64_t rows = plan::tile_rows_at(r, tile, t0);
      const int64_t row0 = bt.starts[item.user] + t0;
      const bool first = t0 == r.begin, last = t0 + tile >= r.end;
      load_tile(net, bt, row0, rows, s);
      for (int64_t c = cands.begin; c < cands.end; ++c) {
        acc_t* out = partial + plan::partial_row(item.user, item.chunk, c, bt.S, bt.C) * (Dv + 2);
        if (needs_setup(bt, r, t0)) setup_query(net, bt.query + (item.user * bt.C + c) * net.D, s);
        if (first) {
          m = -INFINITY;
          l = 0;
          for (int64_t d = threadIdx.x; d < Dv; d += blockDim.x) s.acc[d] = 0;
        } else if (multi) {  // written by this block's previous tile, past barriers
          m = out[0];
          l = out[1];
          for (int64_t d = threadIdx.x; d < Dv; d += blockDim.x) s.acc[d] = out[2 + d];
        }
        forward_tile(net, s, rows, n);
        const acc_t* score = s.z[n];  // width 1
        acc_t rescale = 1;
        if (kSoftmax) {
          acc_t tile_max = m;
          for (int64_t t = 0; t < rows; ++t) tile_max = max_(tile_max, bt.scale * score[t]);
          rescale = exp_(m - tile_max);
          m = tile_max;
          for (int64_t t = threadIdx.x; t < rows; t += blockDim.x) s.score[t] = exp_(bt.scale * score[t] - m);
        } else {
          for (int64_t t = threadIdx.x; t < rows; t += blockDim.x) s.score[t] = bt.scale * score[t];
        }
        __syncthreads();
        if (kSoftmax) {
          acc_t tile_sum = 0;
          for (int64_t t = 0; t < rows; ++t) tile_sum += s.score[t];
          l = l * rescale + tile_sum;
        }
        for (int64_t d = threadIdx.x; d < Dv; d += blockDim.x) {
          acc_t v = 0;
          if (multi) {
            for (int64_t t = 0; t < rows; ++t) v += s.score[t] * s.vals[t * Dv + d];
          } else {
            for (int64_t t = 0; t < rows; ++t) v += s.score[t] * static_cast<acc_t>(bt.values[(row0 + t) * Dv + d]);
          }
          s.acc[d] = s.acc[d] * rescale + v;
          if (multi || last) out[2 + d] = s.acc[d];
        }
        if ((multi || last) && threadIdx.x == 0) {
          out[0] = m;
          out[1] = l;
        }
        __syncthreads();
      }
    }
  }
}

// out[b, c] from the chunk partials of (b, c) in chunk order, one block per (user, candidate); exactly 0 for an
// empty user.
template <typename T, typename acc_t, bool kSoftmax>
__global__ void __launch_bounds__(kThreads) combine_kernel(const acc_t* __restrict__ partial,  // [B * S * C, Dv + 2]
                                                           const int64_t* __restrict__ lengths, int64_t S, int64_t C,
                                                           int64_t Dv, T* __restrict__ out) {  // [B, C, Dv]
  const int64_t bc = blockIdx.x, b = bc / C, cand = bc % C;
  const int64_t chunks = plan::num_chunks(lengths[b]);
  auto part = [&](int64_t chunk) { return partial + plan::partial_row(b, chunk, cand, S, C) * (Dv + 2); };
  acc_t m = -INFINITY, denom = 0;
  if (kSoftmax) {
    for (int64_t c = 0; c < chunks; ++c) m = max_(m, part(c)[0]);
    for (int64_t c = 0; c < chunks; ++c) denom += part(c)[1] * exp_(part(c)[0] - m);
  }
  for (int64_t d = threadIdx.x; d < Dv; d += blockDim.x) {
    acc_t v = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const acc_t* pc = part(c);
      v += kSoftmax ? pc[2 + d] * exp_(pc[0] - m) : pc[2 + d];
    }
    if (kSoftmax && chunks > 0) v /= denom;
    out[bc * Dv + d] = static_cast<T>(v);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward kernels

// Softmax backward, one block per work item: score[c * N + row] = score_scale * s_t and gw[c * N + row] = g_bc . v_t
// per (candidate, key row), a key tile serving the item's candidates in order.
template <typename T, typename acc_t>  // (kThreads, 1): as backward_kernel's; fp64 spilled without it
__global__ void __launch_bounds__(kThreads, 1) scores_kernel(const Net<acc_t> net, const Batch<T, acc_t> bt,
                                                          const T* __restrict__ grad_out,  // [B, C, Dv]
                                                          const plan::SmemLayout L, int64_t tile,
                                                          acc_t* __restrict__ score,       // [C, N]
                                                          acc_t* __restrict__ gw) {        // [C, N]
  Smem<acc_t> s(dynamic_smem<acc_t>(), L, bt.shared_values);
  const int64_t Dv = net.Dv, n = net.n;
  for (int64_t w = blockIdx.x; w < bt.items(); w += gridDim.x) {
    plan::Item item;
    plan::Range r, cands;
    if (!open_item(bt, w, item, r, cands)) continue;
    for (int64_t t0 = r.begin; t0 < r.end; t0 += tile) {
      const int64_t rows = plan::tile_rows_at(r, tile, t0);
      const int64_t row0 = bt.starts[item.user] + t0;
      load_tile(net, bt, row0, rows, s);
      for (int64_t c = cands.begin; c < cands.end; ++c) {
        const int64_t qrow = item.user * bt.C + c;
        if (needs_setup(bt, r, t0)) {
          setup_query(net, bt.query + qrow * net.D, s);
          for (int64_t d = threadIdx.x; d < Dv; d += blockDim.x) s.acc[d] = static_cast<acc_t>(grad_out[qrow * Dv + d]);
        }
        forward_tile(net, s, rows, n);  // its barriers also publish s.acc
        acc_t* sc = score + c * bt.N + row0;
        acc_t* g = gw + c * bt.N + row0;
        for (int64_t t = threadIdx.x; t < rows; t += blockDim.x) sc[t] = bt.scale * s.z[n][t];
        if (bt.C > 1) {
          grad_dot_values(Dv, s.vals, 0, rows, s.acc, [&](int64_t t, acc_t v) { g[t] = v; });
        } else {
          grad_dot_values(Dv, bt.values, row0, rows, s.acc, [&](int64_t t, acc_t v) { g[t] = v; });
        }
        __syncthreads();
      }
    }
  }
}

// Softmax backward, one block per (user, candidate): turns its scores into the pooling weights w_t in place and
// writes gs_t = score_scale * w_t (gw_t - sum_u w_u gw_u). Block reductions in a fixed order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) softmax_grad_kernel(const int64_t* __restrict__ starts,
                                                                const int64_t* __restrict__ lengths, int64_t C,
                                                                int64_t N, acc_t scale,
                                                                acc_t* __restrict__ score_,     // [C, N] -> weights
                                                                const acc_t* __restrict__ gw_,  // [C, N]
                                                                acc_t* __restrict__ gs_) {      // [C, N]
  __shared__ acc_t scratch[kThreads];
  const int64_t b = blockIdx.x / C, cand = blockIdx.x % C;
  const int64_t len = lengths[b], row0 = starts[b];
  if (len == 0) return;
  acc_t* score = score_ + cand * N;
  const acc_t* gw = gw_ + cand * N;
  acc_t* gs = gs_ + cand * N;
  acc_t m = -INFINITY;
  for (int64_t t = threadIdx.x; t < len; t += blockDim.x) m = max_(m, score[row0 + t]);
  m = block_reduce<acc_t, true>(m, scratch);
  acc_t denom = 0;
  for (int64_t t = threadIdx.x; t < len; t += blockDim.x) denom += exp_(score[row0 + t] - m);
  denom = block_reduce<acc_t, false>(denom, scratch);
  acc_t dot = 0;
  for (int64_t t = threadIdx.x; t < len; t += blockDim.x) {
    const acc_t w = exp_(score[row0 + t] - m) / denom;
    score[row0 + t] = w;
    dot += w * gw[row0 + t];
  }
  dot = block_reduce<acc_t, false>(dot, scratch);
  for (int64_t t = threadIdx.x; t < len; t += blockDim.x) gs[row0 + t] = scale * score[row0 + t] * (gw[row0 + t] - dot);
}

// Backward through hidden layer j's activation on a tile: g (d/dh_j, [rows, w_j]) -> d/dz_j in place, one thread
// per column. With params, the column's sums (d alpha or PReLU slope, d gamma, d beta, sum g_xhat,
// sum g_xhat * xhat) are added to params ([kNumActSums, htot]); with stat_sums, sum g_xhat and sum g_xhat * xhat
// to stat_sums ([2, w_j], double). Dice's statistics term uses the GradMean / GradXhatMean constants, zero unless
// Dice trains and they are known.
template <typename acc_t>
__device__ void act_backward(const Net<acc_t>& net, int j, int64_t rows, const acc_t* z, acc_t* g, acc_t* params,
                             double* stat_sums) {
  const int64_t wj = net.w[j], H = net.htot;
  for (int64_t h = threadIdx.x; h < wj; h += blockDim.x) {
    const acc_t* c = net.act_c + net.col[j] + h;
    if (net.act == kDice) {
      const acc_t alpha = c[plan::kActAlpha * H], gamma = c[plan::kActGamma * H], beta = c[plan::kActBeta * H];
      const acc_t mean = c[plan::kActMean * H], rstd = c[plan::kActRstd * H];
      const acc_t m1 = c[plan::kActGradMean * H], m2 = c[plan::kActGradXhatMean * H];
      acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0;
      for (int64_t t = 0; t < rows; ++t) {
        const acc_t zv = z[t * wj + h], gv = g[t * wj + h];
        const acc_t xhat = (zv - mean) * rstd;
        const acc_t p = sigmoid_(gamma * xhat + beta);
        const acc_t one_minus_alpha = acc_t(1) - alpha;
        const acc_t g_arg = gv * zv * one_minus_alpha * p * (acc_t(1) - p);
        const acc_t g_xhat = g_arg * gamma;
        s0 += gv * zv * (acc_t(1) - p);
        s1 += g_arg * xhat;
        s2 += g_arg;
        s3 += g_xhat;
        s4 += g_xhat * xhat;
        g[t * wj + h] = gv * (alpha + one_minus_alpha * p) + rstd * (g_xhat - m1 - xhat * m2);
      }
      if (params) {
        const int64_t k = net.col[j] + h;
        params[plan::kSumAlpha * H + k] += s0;
        params[plan::kSumGamma * H + k] += s1;
        params[plan::kSumBeta * H + k] += s2;
        params[plan::kSumGradXhat * H + k] += s3;
        params[plan::kSumGradXhatXhat * H + k] += s4;
      }
      if (stat_sums) {
        stat_sums[h] += static_cast<double>(s3);
        stat_sums[wj + h] += static_cast<double>(s4);
      }
    } else if (net.act == kSigmoid) {
      for (int64_t t = 0; t < rows; ++t) {
        const acc_t y = sigmoid_(z[t * wj + h]);
        g[t * wj + h] *= y * (acc_t(1) - y);
      }
    } else if (net.act == kPrelu) {
      const acc_t slope = c[plan::kActAlpha * H];
      acc_t s0 = 0;
      for (int64_t t = 0; t < rows; ++t) {
        const acc_t zv = z[t * wj + h], gv = g[t * wj + h];
        if (zv > acc_t(0)) continue;
        s0 += gv * zv;
        g[t * wj + h] = gv * slope;
      }
      if (params) params[plan::kSumAlpha * H + net.col[j] + h] += s0;
    } else {
      for (int64_t t = 0; t < rows; ++t) {
        if (!(z[t * wj + h] > acc_t(0))) g[t * wj + h] = 0;
      }
    }
  }
}

// The backward's passes over all work items, grid_blocks(B * S * G) blocks; a key tile serves the item's
// candidates in order.
//   kFull = false (Dice training sums pass for hidden layer `stop`): recompute z_0 .. z_{n-1}, back-propagate from
//     the scores down to z_stop, add sum g_xhat and sum g_xhat * xhat of that layer to stat_sums[block].
//   kFull = true: recompute everything, back-propagate to the inputs; write grad_keys / grad_values rows, each
//     candidate's query gradient to gq_partial[partial_row], and parameter gradients to params[block]
//     (plan::param_layout). With several candidates, a tile's key and value gradients are summed over the item's
//     candidates in shared memory (s.gkeys, s.gvals, in candidate order) and stored once: into grad_keys /
//     grad_values with one candidate group, into the group's row of gk_partial / gv_partial otherwise; a
//     candidate's query-gradient accumulator is carried from tile to tile in its gq_partial row.
// kSoftmax: the pooling weights and score gradients come from softmax_grad_kernel (weight, gs per candidate and key
// row); otherwise they are w_t = score_scale * s_t and score_scale * g . v_t, derived per tile.
// Launch bounds (kThreads, 1): shared memory allows one block of the backward per SM at the plan's tiles anyway, and
// without the hint ptxas capped some instantiations at 64-80 registers and spilled (bench/results/gpu_static.md).
template <typename T, typename acc_t, bool kFull, bool kSoftmax>
__global__ void __launch_bounds__(kThreads, 1) backward_kernel(
    const Net<acc_t> net, const Batch<T, acc_t> bt,
    const T* __restrict__ grad_out,        // [B, C, Dv]
    const acc_t* __restrict__ weight,      // [C, N] softmax pooling weights (kSoftmax)
    const acc_t* __restrict__ gs,          // [C, N] softmax score gradients (kSoftmax)
    const plan::SmemLayout L, int64_t tile, int stop,
    const plan::ParamLayout P,
    double* __restrict__ stat_sums,        // [grid, 2, w_stop] (sums pass)
    acc_t* __restrict__ params,            // [grid, P.total] (gradient pass)
    acc_t* __restrict__ gq_partial,        // [B * S * C, D] (gradient pass)
    T* __restrict__ grad_keys,             // [N, D], zero-initialized (gradient pass)
    T* __restrict__ grad_values,           // [N, Dv] or nullptr when values are the keys (gradient pass)
    acc_t* __restrict__ gk_partial,        // [G, N, D] zero-initialized when G > 1, else nullptr (gradient pass)
    acc_t* __restrict__ gv_partial) {      // [G, N, Dv] zero-initialized when G > 1 with values, else nullptr
  Smem<acc_t> s(dynamic_smem<acc_t>(), L, bt.shared_values);
  const int n = net.n;
  const int64_t D = net.D, Dv = net.Dv, w0 = net.w[0];
  const bool multi = bt.C > 1;
  acc_t* part = kFull ? params + blockIdx.x * P.total : nullptr;
  double* sums = kFull ? nullptr : stat_sums + blockIdx.x * 2 * net.w[stop];
  if (kFull) {
    for (int64_t k = threadIdx.x; k < P.total; k += blockDim.x) part[k] = 0;
  } else {
    for (int64_t k = threadIdx.x; k < 2 * net.w[stop]; k += blockDim.x) sums[k] = 0;
  }
  __syncthreads();  // the zeroing threads are not the accumulating ones
  for (int64_t w = blockIdx.x; w < bt.items(); w += gridDim.x) {
    plan::Item item;
    plan::Range r, cands;
    if (!open_item(bt, w, item, r, cands)) continue;
    for (int64_t t0 = r.begin; t0 < r.end; t0 += tile) {
      const int64_t rows = plan::tile_rows_at(r, tile, t0);
      const int64_t row0 = bt.starts[item.user] + t0;
      const bool first = t0 == r.begin, last = t0 + tile >= r.end;
      load_tile(net, bt, row0, rows, s);
      for (int64_t c = cands.begin; c < cands.end; ++c) {
        const int64_t qrow = item.user * bt.C + c;
        acc_t* gq = kFull ? gq_partial + plan::partial_row(item.user, item.chunk, c, bt.S, bt.C) * D : nullptr;
        if (needs_setup(bt, r, t0)) {
          setup_query(net, bt.query + qrow * D, s);
          for (int64_t d = threadIdx.x; d < Dv; d += blockDim.x) s.gout[d] = static_cast<acc_t>(grad_out[qrow * Dv + d]);
        }
        if (kFull) {
          if (first) {
            for (int64_t d = threadIdx.x; d < D; d += blockDim.x) s.acc[d] = 0;
          } else if (multi) {  // written by this block's previous tile (same thread per d)
            for (int64_t d = threadIdx.x; d < D; d += blockDim.x) s.acc[d] = gq[d];
          }
        }
        forward_tile(net, s, rows, kFull ? n : n - 1);  // its barriers also publish s.gout
        // Pooling weights (gradient pass) and score gradients of the tile's rows.
        if (kSoftmax) {
          const acc_t* gsc = gs + c * bt.N + row0;
          const acc_t* wc = weight + c * bt.N + row0;
          for (int64_t t = threadIdx.x; t < rows; t += blockDim.x) {
            s.gscore[t] = gsc[t];
            s.score[t] = wc[t];
          }
        } else {
          const acc_t scale = bt.scale;
          acc_t* gscore = s.gscore;
          auto store = [&](int64_t t, acc_t v) { gscore[t] = scale * v; };
          if (multi) {
            grad_dot_values(Dv, s.vals, 0, rows, s.gout, store);
          } else {
            grad_dot_values(Dv, bt.values, row0, rows, s.gout, store);
          }
          if (kFull) {
            for (int64_t t = threadIdx.x; t < rows; t += blockDim.x) s.score[t] = scale * s.z[n][t];
          }
        }
        __syncthreads();
        acc_t* gz = s.g0;  // d/dz_i, [rows, w_i]
        acc_t* gh = s.g1;
        for (int64_t t = threadIdx.x; t < rows; t += blockDim.x) gz[t] = s.gscore[t];
        __syncthreads();
        for (int i = n; i >= 1; --i) {
          const int64_t wi = net.w[i], wp = net.w[i - 1];
          if (kFull) {
            for (int64_t k = threadIdx.x; k < wi * wp; k += blockDim.x) {
              const int64_t o = k / wp, in = k % wp;
              acc_t v = 0;
              for (int64_t t = 0; t < rows; ++t) v += gz[t * wi + o] * s.h[i - 1][t * wp + in];
              part[P.dW[i] + k] += v;
            }
            for (int64_t o = threadIdx.x; o < wi; o += blockDim.x) {
              acc_t v = 0;
              for (int64_t t = 0; t < rows; ++t) v += gz[t * wi + o];
              part[P.db[i] + o] += v;
            }
          }
          const acc_t* W = net.W[i];
          for (int64_t k = threadIdx.x; k < rows * wp; k += blockDim.x) {
            const int64_t t = k / wp, in = k % wp;
            acc_t v = 0;
            for (int64_t o = 0; o < wi; ++o) v += gz[t * wi + o] * W[o * wp + in];
            gh[k] = v;
          }
          __syncthreads();
          const bool sums_here = !kFull && i - 1 == stop;
          act_backward(net, i - 1, rows, s.z[i - 1], gh, kFull ? part + P.act : nullptr, sums_here ? sums : nullptr);
          __syncthreads();
          acc_t* tmp = gz;
          gz = gh;
          gh = tmp;
          if (sums_here) break;
        }
        if constexpr (kFull) {
          // Layer 1, z_0 = c + Weff k: gz is d/dz_0 [rows, w0].
          for (int64_t o = threadIdx.x; o < w0; o += blockDim.x) {
            acc_t v = 0;
            for (int64_t t = 0; t < rows; ++t) v += gz[t * w0 + o];
            s.dc[o] = v;
            part[P.db[0] + o] += v;
          }
          for (int64_t k = threadIdx.x; k < w0 * D; k += blockDim.x) {
            const int64_t o = k / D, d = k % D;
            acc_t v = 0;
            for (int64_t t = 0; t < rows; ++t) v += gz[t * w0 + o] * s.keys[t * D + d];
            s.grad_weff[k] = v;                   // d/dWeff[o, d]
            part[P.dKc + k] += v;                 // Weff = Kc + Pc diag(q)
            part[P.dPc + k] += v * s.q[d];
          }
          __syncthreads();
          for (int64_t k = threadIdx.x; k < w0 * D; k += blockDim.x) part[P.dA + k] += s.dc[k / D] * s.q[k % D];
          // d/dq through c (A^T dc) and through Weff (sum_o dWeff[o, d] Pc[o, d]).
          for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
            acc_t v = 0;
            for (int64_t o = 0; o < w0; ++o) v += net.A[o * D + d] * s.dc[o] + s.grad_weff[o * D + d] * net.Pc[o * D + d];
            s.acc[d] += v;
            if (multi || last) gq[d] = s.acc[d];
          }
          const bool first_cand = c == cands.begin;
          for (int64_t k = threadIdx.x; k < rows * D; k += blockDim.x) {
            const int64_t t = k / D, d = k % D;
            acc_t v = 0;
            for (int64_t o = 0; o < w0; ++o) v += gz[t * w0 + o] * s.weff[d * w0 + o];
            if (!grad_values) v += s.score[t] * s.gout[d];  // the keys are also the pooled values
            if (multi) {
              s.gkeys[k] = first_cand ? v : s.gkeys[k] + v;
            } else {
              grad_keys[(row0 + t) * D + d] = static_cast<T>(v);
            }
          }
          if (grad_values) {
            for (int64_t k = threadIdx.x; k < rows * Dv; k += blockDim.x) {
              const int64_t t = k / Dv, d = k % Dv;
              const acc_t v = s.score[t] * s.gout[d];
              if (multi) {
                s.gvals[k] = first_cand ? v : s.gvals[k] + v;
              } else {
                grad_values[(row0 + t) * Dv + d] = static_cast<T>(v);
              }
            }
          }
        }
        __syncthreads();
      }
      if (kFull && multi) {
        // The tile's key / value gradients, summed over the group's candidates: stored once.
        for (int64_t k = threadIdx.x; k < rows * D; k += blockDim.x) {
          if (gk_partial) {
            gk_partial[(item.group * bt.N + row0) * D + k] = s.gkeys[k];
          } else {
            grad_keys[row0 * D + k] = static_cast<T>(s.gkeys[k]);
          }
        }
        if (grad_values) {
          for (int64_t k = threadIdx.x; k < rows * Dv; k += blockDim.x) {
            if (gv_partial) {
              gv_partial[(item.group * bt.N + row0) * Dv + k] = s.gvals[k];
            } else {
              grad_values[row0 * Dv + k] = static_cast<T>(s.gvals[k]);
            }
          }
        }
        __syncthreads();
      }
    }
  }
}

// grad_query[b, c] = sum of the (b, c) chunk partials in chunk order (0 for an empty user), one block per
// (user, candidate).
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads) query_grad_kernel(const acc_t* __restrict__ gq_partial,  // [B*S*C, D]
                                                              const int64_t* __restrict__ lengths, int64_t S,
                                                              int64_t C, int64_t D,
                                                              T* __restrict__ grad_query) {  // [B, C, D]
  const int64_t bc = blockIdx.x, b = bc / C, cand = bc % C, chunks = plan::num_chunks(lengths[b]);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t v = 0;
    for (int64_t c = 0; c < chunks; ++c) v += gq_partial[plan::partial_row(b, c, cand, S, C) * D + d];
    grad_query[bc * D + d] = static_cast<T>(v);
  }
}
// ---------------------------------------------------------------------------------------------------------------
// Host side

// The MLP's tensors in the compute type, kept alive while the kernels run.
struct Packed {
  at::Tensor AT, KcT, PcT, A, Pc, act_c;
  std::vector<at::Tensor> bias, WT, W;
};

Packed pack(int64_t D, at::TensorList weights, at::TensorList biases, const at::Tensor& act_params, Activation act,
            bool training, double eps, const at::Tensor& stats, at::ScalarType acc) {
  Packed p;
  const at::Tensor W0 = weights[0].to(acc);
  const at::Tensor Wq = W0.narrow(1, 0, D), Wk = W0.narrow(1, D, D), Wd = W0.narrow(1, 2 * D, D);
  p.A = (Wq + Wd).contiguous();
  p.Pc = W0.narrow(1, 3 * D, D).contiguous();
  const at::Tensor Kc = Wk - Wd;
  p.AT = p.A.t().contiguous();
  p.KcT = Kc.t().contiguous();
  p.PcT = p.Pc.t().contiguous();
  for (size_t i = 0; i < weights.size(); ++i) {
    p.bias.push_back(biases[i].to(acc).contiguous());
    if (i == 0) {
      p.W.emplace_back();
      p.WT.emplace_back();
      continue;
    }
    p.W.push_back(weights[i].to(acc).contiguous());
    p.WT.push_back(p.W.back().t().contiguous());
  }
  const int64_t htot = act_params.size(1);
  p.act_c = at::zeros({plan::kNumActConstants, htot}, act_params.options().dtype(acc));
  if (act == Activation::kPrelu) p.act_c[plan::kActAlpha].copy_(act_params[0]);
  if (act == Activation::kDice) {
    p.act_c.narrow(0, plan::kActAlpha, 3).copy_(act_params.narrow(0, kDiceAlpha, 3));
    // Training: the batch statistics (filled later by the forward's statistics passes, or saved for the backward).
    const at::Tensor mean = training ? stats[0] : act_params[kDiceRunningMean];
    const at::Tensor var = training ? stats[1] : act_params[kDiceRunningVar];
    p.act_c[plan::kActMean].copy_(mean);
    p.act_c[plan::kActRstd].copy_((var.to(at::kDouble) + eps).rsqrt());
  }
  return p;
}

// The tensor-core mode of a call with inputs of `dtype`: off unless DIN_EXT_CUDA_TENSOR_CORES=1 (read per call) and
// the device is sm_80 or newer; then bf16 / fp16 products for bf16 / fp16 inputs, TF32 for float inputs when torch
// allows TF32 matmuls (torch.backends.cuda.matmul.allow_tf32), and off for double.
int tensor_core_mode(at::ScalarType dtype) {
  const char* flag = std::getenv("DIN_EXT_CUDA_TENSOR_CORES");
  if (flag == nullptr || std::string(flag) != "1" || at::cuda::getCurrentDeviceProperties()->major < 8) return kMmaOff;
  if (dtype == at::kBFloat16) return kMmaBf16;
  if (dtype == at::kHalf) return kMmaFp16;
  if (dtype == at::kFloat && at::globalContext().allowTF32CuBLAS()) return kMmaTf32;
  return kMmaOff;
}

template <typename acc_t>
Net<acc_t> make_net(const Packed& p, const AttentionShape& shape, Activation act, at::ScalarType dtype) {
  Net<acc_t> net{};
  net.n = static_cast<int>(shape.hidden.size());
  net.act = static_cast<int>(act);
  net.mma = tensor_core_mode(dtype);
  net.D = shape.dim;
  net.Dv = shape.value_dim;
  net.htot = shape.hidden_total;
  int64_t col = 0;
  for (int i = 0; i <= net.n; ++i) {
    net.w[i] = i < net.n ? shape.hidden[i] : 1;
    net.col[i] = col;
    if (i < net.n) col += shape.hidden[i];
    net.bias[i] = p.bias[i].const_data_ptr<acc_t>();
    if (i >= 1) {
      net.W[i] = p.W[i].const_data_ptr<acc_t>();
      net.WT[i] = p.WT[i].const_data_ptr<acc_t>();
    }
  }
  net.AT = p.AT.const_data_ptr<acc_t>();
  net.KcT = p.KcT.const_data_ptr<acc_t>();
  net.PcT = p.PcT.const_data_ptr<acc_t>();
  net.A = p.A.const_data_ptr<acc_t>();
  net.Pc = p.Pc.const_data_ptr<acc_t>();
  net.act_c = p.act_c.numel() ? p.act_c.const_data_ptr<acc_t>() : nullptr;
  return net;
}

template <typename acc_t>
plan::Widths widths_of(const Net<acc_t>& net) {
  plan::Widths w{};
  w.n = net.n;
  for (int i = 0; i <= net.n; ++i) w.w[i] = net.w[i];
  return w;
}

// The row tile and shared-memory layout of a mode, or a clear error when even the smallest tile does not fit.
struct Launch {
  int64_t tile;
  plan::SmemLayout layout;
  int64_t bytes;
};

Launch plan_launch(const plan::Widths& widths, int64_t D, int64_t Dv, bool backward, int64_t elem_bytes,
                   int64_t candidates) {
  const int64_t limit = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  const int64_t tile = plan::choose_tile_rows(widths, D, Dv, backward, elem_bytes, limit, candidates);
  const int64_t smallest = plan::tile_choice(plan::kNumTileChoices - 1);
  TORCH_CHECK(tile > 0, "din_ext: the cuda backend keeps the user's layer-1 weight (H1 = ", widths.w[0], " x D = ", D,
              ") and a ", smallest, "-row tile of every layer in shared memory: that needs ",
              plan::smem_layout(widths, smallest, D, Dv, backward, candidates).total * elem_bytes,
              " bytes, more than the ", limit,
              " this device allows per block; use the triton or cpu backend, or smaller layers");
  const plan::SmemLayout layout = plan::smem_layout(widths, tile, D, Dv, backward, candidates);
  return {tile, layout, layout.total * elem_bytes};
}

unsigned grid_of(int64_t blocks) {
  TORCH_CHECK(blocks <= 0x7fffffff, "din_ext: too many work items for one launch (", blocks, ")");
  return static_cast<unsigned>(blocks);
}

int64_t resolve_max_len(const at::Tensor& lengths, int64_t max_len) {
  // Unknown (jagged input without max_len): one device-to-host read. Padded inputs always pass L.
  return max_len >= 0 ? max_len : lengths.max().item<int64_t>();
}

void check_devices(const at::Tensor& query, at::TensorList weights) {
  check_cuda(query, "query");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) <= kMaxLinears, "din_ext: the cuda backend supports at most ",
              kMaxLinears - 1, " hidden layers, got ", weights.size() - 1);
}

// The kernels' view of a batch, with S chunks reserved per user and the plan's candidate groups.
template <typename T, typename acc_t>
Batch<T, acc_t> batch_of(const AttentionArgs& args, int64_t S) {
  const int64_t B = args.shape.batch, C = args.shape.candidates;
  const int64_t G = plan::candidate_groups(B * S, C);
  return {args.query.const_data_ptr<T>(), args.keys.const_data_ptr<T>(), args.values.const_data_ptr<T>(),
          args.starts.const_data_ptr<int64_t>(), args.lengths.const_data_ptr<int64_t>(), B, S, C, G,
          plan::group_size(C, G), args.shape.num_keys, !args.separate_values, static_cast<acc_t>(args.score_scale)};
}

// max_len: the resolved upper bound on lengths.
template <typename T>
void forward_impl(const AttentionForwardArgs& args, int64_t max_len) {
  using acc_t = at::opmath_type<T>;
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const AttentionShape& shape = args.shape;
  const at::Tensor &query = args.query, &lengths = args.lengths, &out = args.out, &stats = args.stats;
  const double eps = args.eps;
  Packed packed = pack(shape.dim, args.weights, args.biases, args.act_params, args.act, args.training, eps, stats, acc);
  const Net<acc_t> net = make_net<acc_t>(packed, shape, args.act, query.scalar_type());
  const plan::Widths widths = widths_of(net);
  const int64_t C = shape.candidates;
  const Launch launch = plan_launch(widths, shape.dim, shape.value_dim, false, sizeof(acc_t), C);
  const int64_t S = plan::chunks_per_user(max_len);
  const Batch<T, acc_t> bt = batch_of<T, acc_t>(args, S);
  const int64_t items = bt.items();

  if (args.act == Activation::kDice && args.training) {
    // Over all valid (candidate, behaviour) pairs: C * sum_b len_b rows per feature.
    const at::Tensor count = lengths.sum().to(at::kDouble) * static_cast<double>(C);
    const at::Tensor safe = count.clamp_min(1);
    const int64_t grid = plan::grid_blocks(items);
    allow_smem(stats_kernel<T, acc_t>, launch.bytes);
    for (int j = 0; j < net.n; ++j) {
      const int64_t wj = net.w[j];
      at::Tensor partial = at::empty({grid, 2 * wj}, query.options().dtype(at::kDouble));
      stats_kernel<T, acc_t><<<grid_of(grid), kThreads, launch.bytes, stream>>>(net, bt, launch.layout, launch.tile,
                                                                               j, partial.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor total = sum_rows(partial);
      const at::Tensor shifted = total.narrow(0, 0, wj) / safe;
      const at::Tensor var = (total.narrow(0, wj, wj) / safe - shifted * shifted).clamp_min(0);
      const at::Tensor mean = shifted + packed.bias[j].to(at::kDouble);
      const at::Tensor any = count > 0;
      stats[0].narrow(0, net.col[j], wj).copy_(at::where(any, mean, at::zeros_like(mean)));
      stats[1].narrow(0, net.col[j], wj).copy_(at::where(any, var, at::zeros_like(var)));
      // The activation uses the statistics as rounded to the op's dtype, as the reference does.
      packed.act_c[plan::kActMean].narrow(0, net.col[j], wj).copy_(stats[0].narrow(0, net.col[j], wj));
      packed.act_c[plan::kActRstd].narrow(0, net.col[j], wj).copy_(
          (stats[1].narrow(0, net.col[j], wj).to(at::kDouble) + eps).rsqrt());
    }
  }
  at::Tensor partial = at::empty({shape.batch * S * C, shape.value_dim + 2}, query.options().dtype(acc));
  auto pool = [&](auto kernel) {
    allow_smem(kernel, launch.bytes);
    kernel<<<grid_of(items), kThreads, launch.bytes, stream>>>(net, bt, launch.layout, launch.tile,
                                                              partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  auto combine = [&](auto kernel) {
    kernel<<<grid_of(shape.batch * C), kThreads, 0, stream>>>(partial.const_data_ptr<acc_t>(),
                                                              lengths.const_data_ptr<int64_t>(), S, C,
                                                              shape.value_dim, out.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (args.norm == Normalization::kSoftmax) {
    pool(pool_kernel<T, acc_t, true>);
    combine(combine_kernel<T, acc_t, true>);
  } else {
    pool(pool_kernel<T, acc_t, false>);
    combine(combine_kernel<T, acc_t, false>);
  }
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& query, const at::Tensor& keys,
                                                     const std::optional<at::Tensor>& values,
                                                     const at::Tensor& starts, const at::Tensor& lengths,
                                                     int64_t max_len, at::TensorList weights, at::TensorList biases,
                                                     const at::Tensor& act_params, c10::string_view activation,
                                                     c10::string_view normalization, double score_scale,
                                                     bool training, double eps) {
  check_devices(query, weights);
  const c10::cuda::CUDAGuard guard(query.device());
  const AttentionForwardArgs args = attention_forward_args(query, keys, values, starts, lengths, max_len, weights,
                                                           biases, act_params, activation, normalization,
                                                           score_scale, training, eps);
  if (args.shape.batch == 0) return {args.out, args.stats};
  const int64_t bound = resolve_max_len(args.lengths, max_len);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.query.scalar_type(), "din_ext_attention_forward_cuda",
                                  [&] { forward_impl<scalar_t>(args, bound); });
  return {args.out, args.stats};
}

using BackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>;

// max_len: the resolved upper bound on lengths. Fills res (grad_query zeroed by the caller).
template <typename T>
void backward_impl(const AttentionBackwardArgs& args, int64_t max_len, BackwardResult& res) {
  using acc_t = at::opmath_type<T>;
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const AttentionShape& shape = args.shape;
  const at::Tensor &query = args.query, &starts = args.starts, &lengths = args.lengths, &grad_out = args.grad_out;
  const Activation act = args.act;
  const bool training = args.training;
  const double score_scale = args.score_scale;
  Packed packed = pack(shape.dim, args.weights, args.biases, args.act_params, act, training, args.eps, args.stats, acc);
  const Net<acc_t> net = make_net<acc_t>(packed, shape, act, query.scalar_type());
  const plan::Widths widths = widths_of(net);
  const int64_t D = shape.dim, Dv = shape.value_dim, B = shape.batch, N = shape.num_keys;
  const int64_t C = shape.candidates;
  const Launch fwd = plan_launch(widths, D, Dv, false, sizeof(acc_t), C);
  const Launch bwd = plan_launch(widths, D, Dv, true, sizeof(acc_t), C);
  const int64_t S = plan::chunks_per_user(max_len);
  const Batch<T, acc_t> bt = batch_of<T, acc_t>(args, S);
  const int64_t items = bt.items(), grid = plan::grid_blocks(items), G = bt.G;
  const auto acc_options = query.options().dtype(acc);
  const bool softmax = args.norm == Normalization::kSoftmax;

  at::Tensor weight, gs;
  if (softmax) {
    weight = at::empty({C, N}, acc_options);
    gs = at::empty({C, N}, acc_options);
    at::Tensor gw = at::empty({C, N}, acc_options);
    allow_smem(scores_kernel<T, acc_t>, fwd.bytes);
    scores_kernel<T, acc_t><<<grid_of(items), kThreads, fwd.bytes, stream>>>(
        net, bt, grad_out.const_data_ptr<T>(), fwd.layout, fwd.tile, weight.mutable_data_ptr<acc_t>(),
        gw.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    softmax_grad_kernel<acc_t><<<grid_of(B * C), kThreads, 0, stream>>>(
        starts.const_data_ptr<int64_t>(), lengths.const_data_ptr<int64_t>(), C, N, static_cast<acc_t>(score_scale),
        weight.mutable_data_ptr<acc_t>(), gw.const_data_ptr<acc_t>(), gs.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const acc_t* weight_ptr = softmax ? weight.const_data_ptr<acc_t>() : nullptr;
  const acc_t* gs_ptr = softmax ? gs.const_data_ptr<acc_t>() : nullptr;
  const plan::ParamLayout P = plan::param_layout(widths, D);

  if (act == Activation::kDice && training) {
    const at::Tensor safe = (lengths.sum().to(at::kDouble) * static_cast<double>(C)).clamp_min(1);
    auto kernel = softmax ? backward_kernel<T, acc_t, false, true> : backward_kernel<T, acc_t, false, false>;
    allow_smem(kernel, bwd.bytes);
    for (int j = net.n - 1; j >= 0; --j) {
      const int64_t wj = net.w[j];
      at::Tensor sums = at::empty({grid, 2 * wj}, query.options().dtype(at::kDouble));
      kernel<<<grid_of(grid), kThreads, bwd.bytes, stream>>>(net, bt, grad_out.const_data_ptr<T>(), weight_ptr,
                                                             gs_ptr, bwd.layout, bwd.tile, j, P,
                                                             sums.mutable_data_ptr<double>(), nullptr, nullptr,
                                                             nullptr, nullptr, nullptr, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor total = sum_rows(sums);
      packed.act_c[plan::kActGradMean].narrow(0, net.col[j], wj).copy_(total.narrow(0, 0, wj) / safe);
      packed.act_c[plan::kActGradXhatMean].narrow(0, net.col[j], wj).copy_(total.narrow(0, wj, wj) / safe);
    }
  }

  at::Tensor& grad_query = std::get<0>(res);
  at::Tensor& grad_keys = std::get<1>(res);
  at::Tensor& grad_values = std::get<2>(res);
  at::Tensor params = at::empty({grid, P.total}, acc_options);
  at::Tensor gq_partial = at::empty({B * S * C, D}, acc_options);
  // Several candidate groups: each writes its own key- (value-) gradient rows, reduced below in group order.
  at::Tensor gk_partial, gv_partial;
  if (G > 1) {
    gk_partial = at::zeros({G, N, D}, acc_options);
    if (args.separate_values) gv_partial = at::zeros({G, N, Dv}, acc_options);
  }
  auto kernel = softmax ? backward_kernel<T, acc_t, true, true> : backward_kernel<T, acc_t, true, false>;
  allow_smem(kernel, bwd.bytes);
  kernel<<<grid_of(grid), kThreads, bwd.bytes, stream>>>(
      net, bt, grad_out.const_data_ptr<T>(), weight_ptr, gs_ptr, bwd.layout, bwd.tile, -1, P, nullptr,
      params.mutable_data_ptr<acc_t>(), gq_partial.mutable_data_ptr<acc_t>(), grad_keys.mutable_data_ptr<T>(),
      args.separate_values ? grad_values.mutable_data_ptr<T>() : nullptr,
      gk_partial.defined() ? gk_partial.mutable_data_ptr<acc_t>() : nullptr,
      gv_partial.defined() ? gv_partial.mutable_data_ptr<acc_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (gk_partial.defined()) {
    grad_keys.copy_(sum_rows(gk_partial.view({G, N * D})).view({N, D}));
    if (gv_partial.defined()) grad_values.copy_(sum_rows(gv_partial.view({G, N * Dv})).view({N, Dv}));
  }
  if (D > 0) {
    query_grad_kernel<T, acc_t><<<grid_of(B * C), kThreads, 0, stream>>>(gq_partial.const_data_ptr<acc_t>(),
                                                                         lengths.const_data_ptr<int64_t>(), S, C, D,
                                                                         grad_query.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Parameter gradients: the block partials reduced in block order, then unpacked.
  const at::Tensor total = sum_rows(params);
  const at::ScalarType dtype = query.scalar_type();
  const int64_t w0 = net.w[0];
  const at::Tensor dA = total.narrow(0, P.dA, w0 * D).view({w0, D});
  const at::Tensor dKc = total.narrow(0, P.dKc, w0 * D).view({w0, D});
  const at::Tensor dPc = total.narrow(0, P.dPc, w0 * D).view({w0, D});
  // W_0 = [Wq, Wk, Wd, Wp] with A = Wq + Wd, Kc = Wk - Wd, Pc = Wp.
  std::vector<at::Tensor>& grad_weights = std::get<3>(res);
  std::vector<at::Tensor>& grad_biases = std::get<4>(res);
  grad_weights.push_back(at::cat({dA, dKc, dA - dKc, dPc}, 1).to(dtype));
  grad_biases.push_back(total.narrow(0, P.db[0], w0).to(dtype));
  for (int i = 1; i <= net.n; ++i) {
    grad_weights.push_back(total.narrow(0, P.dW[i], net.w[i] * net.w[i - 1]).view({net.w[i], net.w[i - 1]}).to(dtype));
    grad_biases.push_back(total.narrow(0, P.db[i], net.w[i]).to(dtype));
  }
  at::Tensor& grad_act = std::get<5>(res);
  const int64_t htot = shape.hidden_total;
  const at::Tensor sums = total.narrow(0, P.act, plan::kNumActSums * htot).view({plan::kNumActSums, htot});
  if (act == Activation::kPrelu) grad_act[0].copy_(sums[plan::kSumAlpha]);
  if (act == Activation::kDice) {
    grad_act.narrow(0, kDiceAlpha, 3).copy_(sums.narrow(0, plan::kSumAlpha, 3));
    if (!training) {  // eval: the running statistics are inputs of the op
      const at::Tensor rstd = packed.act_c[plan::kActRstd];
      grad_act[kDiceRunningMean].copy_(-rstd * sums[plan::kSumGradXhat]);
      grad_act[kDiceRunningVar].copy_(-0.5 * rstd * rstd * sums[plan::kSumGradXhatXhat]);
    }
  }
}

BackwardResult attention_backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& keys,
                                  const std::optional<at::Tensor>& values, const at::Tensor& starts,
                                  const at::Tensor& lengths, int64_t max_len, at::TensorList weights,
                                  at::TensorList biases, const at::Tensor& act_params, const at::Tensor& stats,
                                  c10::string_view activation, c10::string_view normalization, double score_scale,
                                  bool training, double eps) {
  check_devices(query, weights);
  const c10::cuda::CUDAGuard guard(query.device());
  const AttentionBackwardArgs args =
      attention_backward_args(grad_out, query, keys, values, starts, lengths, max_len, weights, biases, act_params,
                              stats, activation, normalization, score_scale, training, eps);
  BackwardResult res{at::zeros_like(args.query), args.grad_keys, args.grad_values, {}, {}, args.grad_act_params};
  if (args.shape.batch == 0) {
    for (size_t i = 0; i < weights.size(); ++i) {
      std::get<3>(res).push_back(at::zeros_like(weights[i]));
      std::get<4>(res).push_back(at::zeros_like(biases[i]));
    }
    return res;
  }
  const int64_t bound = resolve_max_len(args.lengths, max_len);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.query.scalar_type(),
                                  "din_ext_attention_backward_cuda",
                                  [&] { backward_impl<scalar_t>(args, bound, res); });
  return res;
}

}  // namespace

TORCH_LIBRARY_IMPL(din_ext, CUDA, m) {
  m.impl("local_activation_attention", &attention_forward);
  m.impl("local_activation_attention_backward", &attention_backward);
}

}  // namespace din_ext::cuda
