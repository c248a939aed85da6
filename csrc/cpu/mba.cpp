// cpu backend of din_ext::mba_embedding and din_ext::mba_embedding_backward: an embedding lookup whose backward
// adds mini-batch-aware L2 regularization (DIN paper section 5.1) and touches only the step's distinct ids.
//
// R and its gradient, once per distinct non-padding id of the step, are docs/design.md section 1.5; the grouping
// outputs (unique_ids, order, offsets) section 2.4.
// Cost O(N log V / 12 + |U| D + N D): nothing is proportional to the table size V.
//
// The forward groups the positions by id with a stable LSD radix sort of (id, position) pairs (12-bit digits, so
// 2 passes up to V = 2^24, 3 up to 2^36), parallel over fixed chunks: per-chunk digit histograms, an exclusive scan
// in (digit, chunk) order, then each chunk scatters its pairs in position order. A stable sort has one result, so
// the grouping (ascending positions within an id) is the same for any number of threads. The backward sums each
// id's gradient rows in that order, one id per task, in the compute type (float for float/half/bfloat16, double for
// double); R is summed in double per fixed block of ids and the blocks in order. Results are bitwise identical for
// any number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common.h"

namespace din_ext::cpu {
namespace {

constexpr int kMaxDigitBits = 12;
// Fixed chunk sizes: neither the sort's result nor any summation order depends on them or on the thread count.
constexpr int64_t kSortChunk = 1 << 15;   // ids per radix chunk
constexpr int64_t kRegBlock = 256;        // ids per partial sum of R
constexpr int64_t kRowGrain = 64;         // distinct ids per backward task
constexpr int64_t kPrefetch = 16;         // positions between a gradient row's prefetch and its use
// Below this many ids the grouping passes run on one thread: sorting 2e5 ids takes a few ms, less than what a
// parallel region costs on a busy machine (a descheduled thread stalls the barrier).
constexpr int64_t kMinParallelIds = 1 << 20;
constexpr int64_t kChunkGrain = kMinParallelIds / kSortChunk;  // radix chunks per parallel task

void check_table(const at::Tensor& weight, const at::Tensor& frequencies) {
  check_mba_table(weight, frequencies);
  TORCH_CHECK(weight.device().is_cpu(), "din_ext: the cpu mba_embedding got weight on ", weight.device());
}

// Reads frequencies in double whatever their dtype; n_j < 1 (unseen ids) counts as 1.
struct Frequencies {
  const float* f32 = nullptr;
  const double* f64 = nullptr;
  const int64_t* i64 = nullptr;
  explicit Frequencies(const at::Tensor& t) {
    if (t.scalar_type() == at::kDouble) {
      f64 = t.const_data_ptr<double>();
    } else if (t.scalar_type() == at::kFloat) {
      f32 = t.const_data_ptr<float>();
    } else {
      i64 = t.const_data_ptr<int64_t>();
    }
  }
  double operator()(int64_t j) const {
    const double n = f64 ? f64[j] : f32 ? static_cast<double>(f32[j]) : static_cast<double>(i64[j]);
    return n < 1.0 ? 1.0 : n;
  }
};

template <typename index_t>
void check_ids_in_range(const index_t* ids, int64_t n, int64_t num_rows) {
  // Bad positions are found in parallel; the error names the first one.
  const int64_t bad = at::parallel_reduce(
      0, n, kMinParallelIds, n,
      [&](int64_t i0, int64_t i1, int64_t first) {
        for (int64_t i = i0; i < i1 && i < first; ++i) {
          const int64_t id = static_cast<int64_t>(ids[i]);
          if (id < 0 || id >= num_rows) return i;
        }
        return first;
      },
      [](int64_t a, int64_t b) { return std::min(a, b); });
  TORCH_CHECK(bad == n, "din_ext: ids must be in [0, ", num_rows, ") (rows of weight), got ",
              static_cast<int64_t>(ids[bad]), " at position ", bad);
}

// Stable LSD radix sort of (key, position) pairs by key, keys in [0, num_rows). Returns the sorted keys and
// positions.
template <typename index_t>
std::pair<std::vector<int64_t>, std::vector<int64_t>> sort_by_id(const index_t* ids, int64_t n, int64_t num_rows) {
  std::vector<int64_t> keys(n), pos(n), keys_tmp(n), pos_tmp(n);
  at::parallel_for(0, n, kMinParallelIds, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      keys[i] = static_cast<int64_t>(ids[i]);
      pos[i] = i;
    }
  });
  int bits = 0;
  while (bits < 63 && (int64_t{1} << bits) < num_rows) ++bits;
  const int passes = (bits + kMaxDigitBits - 1) / kMaxDigitBits;
  if (passes == 0 || n < 2) return {std::move(keys), std::move(pos)};
  const int digit_bits = (bits + passes - 1) / passes;
  const int64_t buckets = int64_t{1} << digit_bits;
  const int64_t chunks = (n + kSortChunk - 1) / kSortChunk;
  std::vector<int64_t> counts(chunks * buckets);
  for (int pass = 0; pass < passes; ++pass) {
    const int shift = pass * digit_bits;
    const int64_t mask = buckets - 1;
    std::fill(counts.begin(), counts.end(), 0);
    at::parallel_for(0, chunks, kChunkGrain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t* count = counts.data() + c * buckets;
        for (int64_t i = c * kSortChunk, end = std::min(n, i + kSortChunk); i < end; ++i) {
          ++count[(keys[i] >> shift) & mask];
        }
      }
    });
    int64_t total = 0;  // exclusive scan in (digit, chunk) order: chunk c's pairs of a digit follow chunk c - 1's
    for (int64_t d = 0; d < buckets; ++d) {
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t k = counts[c * buckets + d];
        counts[c * buckets + d] = total;
        total += k;
      }
    }
    at::parallel_for(0, chunks, kChunkGrain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t* next = counts.data() + c * buckets;
        for (int64_t i = c * kSortChunk, end = std::min(n, i + kSortChunk); i < end; ++i) {
          const int64_t dst = next[(keys[i] >> shift) & mask]++;
          keys_tmp[dst] = keys[i];
          pos_tmp[dst] = pos[i];
        }
      }
    });
    keys.swap(keys_tmp);
    pos.swap(pos_tmp);
  }
  return {std::move(keys), std::move(pos)};
}

// From the sorted pairs: unique ids [U], offsets [U + 1] and order [M] without the padding id's positions.
std::tuple<at::Tensor, at::Tensor, at::Tensor> group(const std::vector<int64_t>& keys, const std::vector<int64_t>& pos,
                                                     int64_t padding_idx, const at::TensorOptions& opts) {
  const int64_t n = static_cast<int64_t>(keys.size());
  // The padding id's positions form one run [pad_begin, pad_end) of the sorted keys.
  int64_t pad_begin = n, pad_end = n;
  if (padding_idx >= 0) {
    pad_begin = std::lower_bound(keys.begin(), keys.end(), padding_idx) - keys.begin();
    pad_end = std::upper_bound(keys.begin(), keys.end(), padding_idx) - keys.begin();
  }
  const int64_t m = n - (pad_end - pad_begin);
  auto kept = [&](int64_t i) { return i < pad_begin ? i : i + (pad_end - pad_begin); };  // i-th kept pair
  at::Tensor order = at::empty({m}, opts);
  int64_t* order_ptr = order.data_ptr<int64_t>();
  const int64_t chunks = (m + kSortChunk - 1) / kSortChunk;
  std::vector<int64_t> starts(chunks + 1, 0);  // per chunk: how many ids begin in it
  at::parallel_for(0, chunks, kChunkGrain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t count = 0;
      for (int64_t i = c * kSortChunk, end = std::min(m, i + kSortChunk); i < end; ++i) {
        order_ptr[i] = pos[kept(i)];
        count += i == 0 || keys[kept(i)] != keys[kept(i - 1)];
      }
      starts[c + 1] = count;
    }
  });
  for (int64_t c = 0; c < chunks; ++c) starts[c + 1] += starts[c];
  const int64_t num_unique = starts[chunks];
  at::Tensor unique_ids = at::empty({num_unique}, opts);
  at::Tensor offsets = at::empty({num_unique + 1}, opts);
  int64_t* unique_ptr = unique_ids.data_ptr<int64_t>();
  int64_t* offsets_ptr = offsets.data_ptr<int64_t>();
  offsets_ptr[num_unique] = m;
  at::parallel_for(0, chunks, kChunkGrain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t u = starts[c];
      for (int64_t i = c * kSortChunk, end = std::min(m, i + kSortChunk); i < end; ++i) {
        if (i == 0 || keys[kept(i)] != keys[kept(i - 1)]) {
          unique_ptr[u] = keys[kept(i)];
          offsets_ptr[u++] = i;
        }
      }
    }
  });
  return {unique_ids, offsets, order};
}

// R = lambda / 2 * sum_u ||w_{unique[u]}||^2 / n: double partial sums per block of kRegBlock ids, merged in order.
template <typename scalar_t>
double regularization(const scalar_t* w, int64_t dim, const int64_t* unique_ids, int64_t num_unique,
                      const Frequencies& freq, double reg_lambda) {
  const int64_t blocks = (num_unique + kRegBlock - 1) / kRegBlock;
  std::vector<double> partial(blocks, 0.0);
  at::parallel_for(0, blocks, kMinParallelIds / (kRegBlock * 64), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double sum = 0.0;
      for (int64_t u = b * kRegBlock, end = std::min(num_unique, u + kRegBlock); u < end; ++u) {
        const scalar_t* row = w + unique_ids[u] * dim;
        double sq = 0.0;
        for (int64_t d = 0; d < dim; ++d) sq += static_cast<double>(row[d]) * static_cast<double>(row[d]);
        sum += sq / freq(unique_ids[u]);
      }
      partial[b] = sum;
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return 0.5 * reg_lambda * total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mba_embedding_forward(
    const at::Tensor& weight_in, const at::Tensor& ids_in, const at::Tensor& frequencies_in, double reg_lambda,
    int64_t padding_idx, bool /*sparse: read by the autograd*/) {
  check_table(weight_in, frequencies_in);
  check_mba_lookup(weight_in, ids_in, padding_idx);
  const int64_t num_rows = weight_in.size(0), dim = weight_in.size(1), n = ids_in.size(0);
  const at::Tensor weight = weight_in.contiguous(), ids = ids_in.contiguous(), frequencies = frequencies_in.contiguous();
  const auto opts = ids.options().dtype(at::kLong);
  at::Tensor unique_ids, offsets, order;
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "mba_embedding", [&] {
    const index_t* ids_ptr = ids.const_data_ptr<index_t>();
    check_ids_in_range(ids_ptr, n, num_rows);
    auto [keys, pos] = sort_by_id(ids_ptr, n, num_rows);
    std::tie(unique_ids, offsets, order) = group(keys, pos, padding_idx, opts);
  });
  at::Tensor out = at::index_select(weight, 0, ids);  // the lookup itself (ids checked above)
  const Frequencies freq(frequencies);
  double reg = 0.0;
  // Without regularization (the sparse gradient of plain tables) R is 0 and its O(U D) pass is skipped: a third of
  // the op's time at DIN's sizes.
  if (reg_lambda != 0.0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "mba_regularization", [&] {
      reg = regularization(weight.const_data_ptr<scalar_t>(), dim, unique_ids.const_data_ptr<int64_t>(),
                           unique_ids.size(0), freq, reg_lambda);
    });
  }
  const auto reg_dtype = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {out, at::scalar_tensor(reg, weight.options().dtype(reg_dtype)), unique_ids, offsets, order};
}

at::Tensor mba_embedding_backward(const at::Tensor& grad_out_in, const at::Tensor& weight_in,
                                  const at::Tensor& frequencies_in, const at::Tensor& unique_ids_in,
                                  const at::Tensor& offsets_in, const at::Tensor& order_in, double reg_lambda) {
  check_table(weight_in, frequencies_in);
  const MbaBackwardArgs args =
      mba_backward_args(grad_out_in, weight_in, frequencies_in, unique_ids_in, offsets_in, order_in);
  const at::Tensor &grad_out = args.grad_out, &weight = args.weight, &unique_ids = args.unique_ids,
                   &offsets = args.offsets, &order = args.order, &grad_rows = args.grad_rows;
  const int64_t num_rows = weight.size(0), dim = weight.size(1);
  const int64_t num_unique = unique_ids.size(0), n = grad_out.size(0);
  const int64_t* unique_ptr = unique_ids.const_data_ptr<int64_t>();
  const int64_t* offsets_ptr = offsets.const_data_ptr<int64_t>();
  const int64_t* order_ptr = order.const_data_ptr<int64_t>();
  // The grouping comes from the forward; check it cheaply rather than trust it (O(U + M)).
  TORCH_CHECK(num_unique == 0 || (offsets_ptr[0] == 0 && offsets_ptr[num_unique] == order.size(0)),
              "din_ext: offsets must start at 0 and end at the length of order");
  for (int64_t u = 0; u < num_unique; ++u) {
    TORCH_CHECK(offsets_ptr[u] <= offsets_ptr[u + 1] && unique_ptr[u] >= 0 && unique_ptr[u] < num_rows,
                "din_ext: broken grouping at distinct id ", u, " (offsets must be non-decreasing, unique_ids in [0, ",
                num_rows, "))");
  }
  for (int64_t i = 0, m = order.size(0); i < m; ++i) {
    TORCH_CHECK(order_ptr[i] >= 0 && order_ptr[i] < n, "din_ext: order must hold positions in [0, ", n,
                ") (rows of grad_out), got ", order_ptr[i]);
  }
  const Frequencies freq(args.frequencies);
  const bool regularized = reg_lambda != 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "mba_embedding_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    scalar_t* out = grad_rows.data_ptr<scalar_t>();
    // The rows of an id are scattered over grad_out (cache misses, latency-bound): prefetch the rows kPrefetch
    // positions ahead in the grouped order, across id boundaries.
    const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(scalar_t));
    // By value: with captures by reference every call reloaded g, order_ptr, dim and row_bytes through the
    // closure (about 40% of the loop in perf at D = 16).
    auto prefetch_row = [g, order_ptr, dim, row_bytes](int64_t k) {
      const char* row = reinterpret_cast<const char*>(g + order_ptr[k] * dim);
      for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(row + b);
    };
    at::parallel_for(0, num_unique, kRowGrain, [&](int64_t u0, int64_t u1) {
      const int64_t* __restrict__ offs = offsets_ptr;  // locals: the loop below keeps them in registers
      const int64_t* __restrict__ pos = order_ptr;
      const scalar_t* __restrict__ grad = g;
      const int64_t width = dim;
      std::vector<acc_t> acc_buffer(width);
      acc_t* __restrict__ acc = acc_buffer.data();
      const int64_t k_end = offs[u1];
      for (int64_t k = offs[u0]; k < std::min(k_end, offs[u0] + kPrefetch); ++k) prefetch_row(k);
      for (int64_t u = u0; u < u1; ++u) {
        std::fill(acc, acc + width, acc_t(0));
        for (int64_t k = offs[u], k1 = offs[u + 1]; k < k1; ++k) {
          if (k + kPrefetch < k_end) prefetch_row(k + kPrefetch);
          const scalar_t* __restrict__ row = grad + pos[k] * width;
          for (int64_t d = 0; d < width; ++d) acc[d] += static_cast<acc_t>(row[d]);
        }
        const int64_t j = unique_ptr[u];
        scalar_t* dst = out + u * dim;
        if (!regularized) {
          // acc + 0 * w_j is acc bit for bit for a finite w_j (a sum that starts at +0 is never -0): no division
          // and no read of the table's row.
          for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<scalar_t>(acc[d]);
          continue;
        }
        const acc_t scale = static_cast<acc_t>(reg_lambda / freq(j));
        const scalar_t* wj = w + j * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<scalar_t>(acc[d] + scale * static_cast<acc_t>(wj[d]));
      }
    });
  });
  return grad_rows;
}

}  // namespace

TORCH_LIBRARY_IMPL(din_ext, CPU, m) {
  m.impl("mba_embedding", &mba_embedding_forward);
  m.impl("mba_embedding_backward", &mba_embedding_backward);
}

}  // namespace din_ext::cpu
