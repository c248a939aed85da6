// Launch planning of the cuda backend's attention kernels: how users are cut into chunks and row tiles, which
// block handles which chunk, and where each buffer lives in shared memory and in the per-block partial sums.
//
// Everything here is plain integer arithmetic in __host__ __device__ functions, compiled by nvcc into the kernels and
// by g++ into the always-built CPU op din_ext::_attention_launch_plan (csrc/attention_plan.cpp), so that the index
// math can be tested on a machine without a GPU (python_tests/test_attention_cuda_plan.py).
//
// Work decomposition (attention):
//   user b's behaviours are rows starts[b] + [0, lengths[b]) of keys; they are cut into chunks of kChunkRows rows
//   (the last one shorter); chunk c covers [c * kChunkRows, min((c + 1) * kChunkRows, len)).
//   S = chunks_per_user(max_len) chunks are reserved per user, so there are B * S work items; item w is chunk
//   w % S of user w / S, and items whose chunk is empty (c * kChunkRows >= len) are skipped.
//   Kernels that only write per-item results (forward pooling, softmax scores) use one block per item; kernels that
//   accumulate parameter gradients or statistics use grid_blocks(B * S) blocks, block g taking items g, g + grid,
//   g + 2 grid, ... in that order, each block accumulating into its own row of a partial-sum buffer that is then
//   reduced in block order. The partition depends only on B, S and constants, never on the device, so results are
//   bitwise reproducible run to run.
//   Inside a chunk, a block processes row tiles of tile_rows rows (a divisor of kChunkRows chosen by
//   choose_tile_rows so that the shared-memory layout fits the device).
//
// Several candidates per user (query [B, C, D], C > 1): the candidates of a user share its history, so a work item
// is (user, chunk, candidate group): a key tile is loaded into shared memory once and then serves every candidate
// of the group in candidate order (set up its c and Weff, run the tile's MLP, pool / back-propagate). Per-candidate
// running state that outlives a tile (the online softmax's (m, l, acc), the query-gradient accumulator) lives in
// its own partial row, partial_row(item, c), read and written only by the item's block; the key- and value-gradients
// of a tile are summed over the group's candidates in shared memory and stored once per tile. There are
// G = candidate_groups(B * S, C) groups: 1 (the history is read once per chunk) unless the B * S chunks alone leave
// blocks idle, in which case the candidates are split into groups of at least kMinGroup, up to kMaxBlocks items;
// with G > 1 each group writes its own [N, D] key-gradient (and value-gradient) partial, reduced in group order.
// Item w is (user, chunk, group) = ((w / G) / S, (w / G) % S, w % G); with C = 1, G = 1 and everything is as above.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DIN_EXT_HD __host__ __device__ __forceinline__
#else
#define DIN_EXT_HD inline
#endif

namespace din_ext::plan {

constexpr int kMaxLinears = 9;           // at most 8 hidden layers + the output layer
constexpr int64_t kChunkRows = 256;      // rows of one work item
constexpr int64_t kMaxBlocks = 512;      // blocks of the accumulating kernels (fixed: it fixes the summation order)
constexpr int kThreads = 256;            // threads per block of every attention kernel
constexpr int64_t kAlign = 4;            // shared-memory offsets are multiples of 4 elements (>= 16 bytes)
constexpr int kNumTileChoices = 4;   // row tiles tried, largest first: 64, 32, 16, 8 (divisors of kChunkRows)
constexpr int64_t kMinGroup = 8;     // candidates of a work item at least, when the candidates are split (C > 1)

// Rows of the per-feature activation constants handed to the kernels ([kNumActConstants, sum H]).
constexpr int kActAlpha = 0, kActGamma = 1, kActBeta = 2, kActMean = 3, kActRstd = 4, kActGradMean = 5,
              kActGradXhatMean = 6, kNumActConstants = 7;
// Rows of the per-feature activation sums of the backward ([kNumActSums, sum H] per block).
constexpr int kSumAlpha = 0, kSumGamma = 1, kSumBeta = 2, kSumGradXhat = 3, kSumGradXhatXhat = 4, kNumActSums = 5;

DIN_EXT_HD int64_t tile_choice(int i) { return int64_t(64) >> i; }
DIN_EXT_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
DIN_EXT_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
DIN_EXT_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
DIN_EXT_HD int64_t align_up(int64_t n) { return ceil_div(n, kAlign) * kAlign; }

// Non-empty chunks of a user with len behaviours (0 for an empty user).
DIN_EXT_HD int64_t num_chunks(int64_t len) { return ceil_div(len, kChunkRows); }

// Chunks reserved per user for an upper bound max_len of the lengths (at least 1, so an all-empty batch still has
// one work item per user).
DIN_EXT_HD int64_t chunks_per_user(int64_t max_len) { return max64(num_chunks(max_len), 1); }

// Blocks of the accumulating kernels for `items` work items.
DIN_EXT_HD int64_t grid_blocks(int64_t items) { return max64(min64(items, kMaxBlocks), 1); }

struct Range {
  int64_t begin, end;  // rows [begin, end) of the user, relative to its start; empty when begin == end
};

// The rows of chunk c of a user with len behaviours.
DIN_EXT_HD Range chunk_range(int64_t len, int64_t c) {
  const int64_t begin = min64(c * kChunkRows, len);
  return {begin, min64(begin + kChunkRows, len)};
}

// Candidate groups for B * S = user_chunks chunks of C candidates: 1 when C == 1 or the chunks alone fill
// kMaxBlocks blocks; otherwise as many as bring the items up to kMaxBlocks, each of at least kMinGroup candidates
// (of all C when C < 2 kMinGroup), and none empty. Depends only on B, S and C (never on the device).
DIN_EXT_HD int64_t candidate_groups(int64_t user_chunks, int64_t C) {
  if (C <= 1 || user_chunks >= kMaxBlocks) return 1;
  const int64_t groups = min64(ceil_div(kMaxBlocks, max64(user_chunks, 1)), max64(C / kMinGroup, 1));
  return ceil_div(C, ceil_div(C, groups));
}

// Candidates of one group (the last one may be smaller).
DIN_EXT_HD int64_t group_size(int64_t C, int64_t groups) { return ceil_div(C, groups); }

struct Item {
  int64_t user, chunk, group;
};

DIN_EXT_HD Item work_item(int64_t w, int64_t chunks, int64_t groups = 1) {
  const int64_t uc = w / groups;
  return {uc / chunks, uc % chunks, w % groups};
}

// The candidates [begin, end) of group g (C candidates, groups of size per_group).
DIN_EXT_HD Range candidate_range(int64_t C, int64_t per_group, int64_t g) {
  const int64_t begin = min64(g * per_group, C);
  return {begin, min64(begin + per_group, C)};
}

// The partial row of (user, chunk, candidate c): [B * S * C] rows in (user, chunk, candidate) order, so that a
// user's chunks of one candidate are combined in chunk order. With C = 1 it is the work item's index.
DIN_EXT_HD int64_t partial_row(int64_t user, int64_t chunk, int64_t c, int64_t chunks, int64_t C) {
  return (user * chunks + chunk) * C + c;
}

// Widths of the MLP: w[i] = output width of linear i (w[n] == 1 is the score), n hidden layers.
struct Widths {
  int n;                    // hidden layers; linears 0 .. n
  int64_t w[kMaxLinears];
};

DIN_EXT_HD int64_t max_width(const Widths& net) {
  int64_t m = 1;
  for (int i = 0; i <= net.n; ++i) m = max64(m, net.w[i]);
  return m;
}

// Shared-memory layout of one attention block, in elements of the compute type. Offsets of buffers a mode does not
// use point at zero-sized regions.
struct SmemLayout {
  int64_t weff;              // [D, w0] effective layer-1 weight of the user, transposed (h fastest)
  int64_t c;                 // [w0] the user's layer-1 constant (Wq + Wd) q + b0
  int64_t q;                 // [D] the user's query
  int64_t gout;              // [Dv] the user's output gradient (backward)
  int64_t keys;              // [tile, D] the tile's keys
  int64_t z[kMaxLinears];    // [tile, w_i] pre-activations
  int64_t h[kMaxLinears];    // [tile, w_i] activations of hidden layer i (i < n)
  int64_t score;             // [tile] pooling weights (forward: exp(s - m) or s; backward: w_t)
  int64_t gscore;            // [tile] d loss / d score (backward)
  int64_t g0, g1;            // [tile, max w] gradient ping-pong buffers (backward)
  int64_t grad_weff;         // [w0, D] the tile's d loss / d Weff (backward)
  int64_t dc;                // [w0] the tile's d loss / d c (backward)
  int64_t acc;               // [max(D, Dv)] pooled-value accumulator (forward) / query-gradient accumulator (backward)
  int64_t vals;              // [tile, Dv] the tile's values (C > 1 only: they serve every candidate)
  int64_t gkeys;             // [tile, D] the tile's key gradient summed over candidates (C > 1, backward)
  int64_t gvals;             // [tile, Dv] the tile's value gradient summed over candidates (C > 1, backward)
  int64_t total;             // elements
};

// candidates > 1 adds the vals / gkeys / gvals regions at the end; with one candidate they are empty and every other
// offset is the same.
DIN_EXT_HD SmemLayout smem_layout(const Widths& net, int64_t tile, int64_t D, int64_t Dv, bool backward,
                                  int64_t candidates = 1) {
  SmemLayout L{};
  int64_t at = 0;
  auto take = [&at](int64_t size) {
    const int64_t offset = at;
    at += align_up(size);
    return offset;
  };
  const int64_t w0 = net.w[0];
  L.weff = take(D * w0);
  L.c = take(w0);
  L.q = take(D);
  L.gout = take(backward ? Dv : 0);
  L.keys = take(tile * D);
  for (int i = 0; i < kMaxLinears; ++i) L.z[i] = take(i <= net.n ? tile * net.w[i] : 0);
  for (int i = 0; i < kMaxLinears; ++i) L.h[i] = take(i < net.n ? tile * net.w[i] : 0);
  L.score = take(tile);
  L.gscore = take(backward ? tile : 0);
  L.g0 = take(backward ? tile * max_width(net) : 0);
  L.g1 = take(backward ? tile * max_width(net) : 0);
  L.grad_weff = take(backward ? w0 * D : 0);
  L.dc = take(backward ? w0 : 0);
  L.acc = take(max64(D, Dv));
  const bool multi = candidates > 1;
  L.vals = take(multi ? tile * Dv : 0);
  L.gkeys = take(multi && backward ? tile * D : 0);
  L.gvals = take(multi && backward ? tile * Dv : 0);
  L.total = at;
  return L;
}

// The largest tile_choice whose layout fits limit_bytes, or 0 if none does.
DIN_EXT_HD int64_t choose_tile_rows(const Widths& net, int64_t D, int64_t Dv, bool backward, int64_t elem_bytes,
                                    int64_t limit_bytes, int64_t candidates = 1) {
  for (int i = 0; i < kNumTileChoices; ++i) {
    if (smem_layout(net, tile_choice(i), D, Dv, backward, candidates).total * elem_bytes <= limit_bytes) {
      return tile_choice(i);
    }
  }
  return 0;
}

// One block's row of the backward's parameter-gradient partial sums, in elements of the compute type.
struct ParamLayout {
  int64_t dW[kMaxLinears];   // linear i >= 1: [w_i, w_{i-1}] (nn.Linear layout); dW[0] unused (0)
  int64_t db[kMaxLinears];   // [w_i]
  int64_t dA, dKc, dPc;      // [w0, D] each: gradients of Wq + Wd, Wk - Wd, Wp
  int64_t act;               // [kNumActSums, sum H]
  int64_t total;
};

DIN_EXT_HD ParamLayout param_layout(const Widths& net, int64_t D) {
  ParamLayout P{};
  int64_t at = 0;
  int64_t hidden_total = 0;
  for (int i = 0; i < net.n; ++i) hidden_total += net.w[i];
  for (int i = 0; i < kMaxLinears; ++i) {
    P.dW[i] = at;
    if (i >= 1 && i <= net.n) at += net.w[i] * net.w[i - 1];
  }
  for (int i = 0; i < kMaxLinears; ++i) {
    P.db[i] = at;
    if (i <= net.n) at += net.w[i];
  }
  P.dA = at;
  at += net.w[0] * D;
  P.dKc = at;
  at += net.w[0] * D;
  P.dPc = at;
  at += net.w[0] * D;
  P.act = at;
  at += kNumActSums * hidden_total;
  P.total = at;
  return P;
}

// Row tiles of a chunk: tile k covers [begin + k * tile, min(begin + (k + 1) * tile, end)).
DIN_EXT_HD int64_t tile_rows_at(Range r, int64_t tile, int64_t t0) { return min64(tile, r.end - t0); }

// The (row, column) an element index of a [rows, cols] row-major tile maps to.
struct Cell {
  int64_t row, col;
};
DIN_EXT_HD Cell cell(int64_t index, int64_t cols) { return {index / cols, index % cols}; }

// The fixed-order tree reduction over a block of `threads` threads (a power of two): the pairs added at each step.
// Step s (stride = threads >> (s + 1)) adds element i + stride into element i for i < stride.
DIN_EXT_HD int64_t tree_steps(int64_t threads) {
  int64_t steps = 0;
  while ((threads >> steps) > 1) ++steps;
  return steps;
}

}  // namespace din_ext::plan
