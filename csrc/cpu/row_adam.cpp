// cpu op din_ext::_row_adam_: one lazy-Adam step (torch.optim.SparseAdam's update, din_ext.training.RowAdam) of the
// rows of several tables' coalesced sparse gradients, in place, in one pass over each row: the weight row and its
// two moments are read and written once, where the foreach formulation gathers the moments, updates them, scatters
// them, gathers the weight rows and scatters them again (five passes and ~10 temporary tensors per table).
//
// For table t, row indices[t][u] = j and gradient row g = values[t][u] (negated when maximize), SparseAdam's
// operations in its order, each rounded to the compute type (float for float/half/bfloat16, double for double):
//   d1 = (g - m_j) * (1 - beta1);  m_j += d1;  d2 = (g * g - v_j) * (1 - beta2);  v_j += d2;
//   w_j += m_j / (sqrt(v_j) + eps) * -step_sizes[t]
// (the build targets no fused multiply-add), so results are torch.optim.SparseAdam's but for the square root, which
// is correctly rounded here and within an ulp in torch's vectorized kernels (an ulp of difference, now and then).
// The rows of a table are distinct (strictly ascending indices, checked), so every row is one
// independent task: results are bitwise identical for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace din_ext::cpu {
namespace {

constexpr int64_t kRowGrain = 512;  // rows per parallel task

// One row's update for d in [0, dim), in the order of the file's header. The float rows go 4 lanes at a time
// through SSE2's sqrtps and divps: IEEE operations, correctly rounded like the scalar ones, in the same order, and
// the baseline target has no FMA to contract them into, so every lane's bits are the scalar loop's. (The scalar
// loop does not vectorize by itself: std::sqrt keeps errno's slow path.)
template <typename scalar_t, typename acc_t>
inline void update_row(scalar_t* __restrict__ wj, scalar_t* __restrict__ mj, scalar_t* __restrict__ vj,
                       const scalar_t* __restrict__ grad, int64_t dim, acc_t sign, acc_t mix, acc_t fresh,
                       acc_t epsilon, acc_t scale) {
  int64_t d = 0;
#if defined(__SSE2__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    const __m128 sign4 = _mm_set1_ps(sign), mix4 = _mm_set1_ps(mix), fresh4 = _mm_set1_ps(fresh);
    const __m128 eps4 = _mm_set1_ps(epsilon), scale4 = _mm_set1_ps(scale);
    for (; d + 4 <= dim; d += 4) {
      const __m128 gd = _mm_mul_ps(sign4, _mm_loadu_ps(grad + d));
      const __m128 avg = _mm_loadu_ps(mj + d), avg_sq = _mm_loadu_ps(vj + d);
      const __m128 new_avg = _mm_add_ps(avg, _mm_mul_ps(_mm_sub_ps(gd, avg), mix4));
      const __m128 new_avg_sq = _mm_add_ps(avg_sq, _mm_mul_ps(_mm_sub_ps(_mm_mul_ps(gd, gd), avg_sq), fresh4));
      _mm_storeu_ps(mj + d, new_avg);
      _mm_storeu_ps(vj + d, new_avg_sq);
      const __m128 direction = _mm_div_ps(new_avg, _mm_add_ps(_mm_sqrt_ps(new_avg_sq), eps4));
      _mm_storeu_ps(wj + d, _mm_add_ps(_mm_loadu_ps(wj + d), _mm_mul_ps(direction, scale4)));
    }
  }
#endif
  for (; d < dim; ++d) {
    const acc_t gd = sign * static_cast<acc_t>(grad[d]);
    const acc_t avg = static_cast<acc_t>(mj[d]), avg_sq = static_cast<acc_t>(vj[d]);
    const acc_t new_avg = avg + (gd - avg) * mix;
    const acc_t new_avg_sq = avg_sq + (gd * gd - avg_sq) * fresh;
    mj[d] = static_cast<scalar_t>(new_avg);
    vj[d] = static_cast<scalar_t>(new_avg_sq);
    const acc_t direction = new_avg / (std::sqrt(new_avg_sq) + epsilon);
    wj[d] = static_cast<scalar_t>(static_cast<acc_t>(wj[d]) + direction * scale);
  }
}

void check_tables(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                  at::TensorList indices, at::TensorList values, at::ArrayRef<double> step_sizes) {
  const size_t n = params.size();
  TORCH_CHECK(exp_avgs.size() == n && exp_avg_sqs.size() == n && indices.size() == n && values.size() == n &&
                  step_sizes.size() == n,
              "din_ext: _row_adam_ needs one exp_avg, exp_avg_sq, indices, values and step size per param, got ",
              n, " params, ", exp_avgs.size(), " exp_avgs, ", exp_avg_sqs.size(), " exp_avg_sqs, ", indices.size(),
              " indices, ", values.size(), " values, ", step_sizes.size(), " step sizes");
  for (size_t t = 0; t < n; ++t) {
    const at::Tensor& p = params[t];
    TORCH_CHECK(p.device().is_cpu() && p.dim() == 2 && p.is_contiguous() && p.is_floating_point(),
                "din_ext: _row_adam_ params[", t, "] must be a contiguous 2-D floating-point cpu tensor, got ",
                p.scalar_type(), " ", p.sizes(), " on ", p.device());
    for (const at::Tensor* state : {&exp_avgs[t], &exp_avg_sqs[t]}) {
      TORCH_CHECK(state->device().is_cpu() && state->sizes() == p.sizes() && state->scalar_type() == p.scalar_type() &&
                      state->is_contiguous(),
                  "din_ext: _row_adam_ the moments of params[", t, "] must be contiguous cpu tensors of its shape ",
                  p.sizes(), " and dtype ", p.scalar_type());
    }
    const at::Tensor &index = indices[t], &rows = values[t];
    TORCH_CHECK(index.device().is_cpu() && index.dim() == 1 && index.scalar_type() == at::kLong,
                "din_ext: _row_adam_ indices[", t, "] must be a 1-D int64 cpu tensor, got ", index.scalar_type(), " ",
                index.sizes());
    TORCH_CHECK(rows.device().is_cpu() && rows.dim() == 2 && rows.size(0) == index.size(0) &&
                    rows.size(1) == p.size(1) && rows.scalar_type() == p.scalar_type(),
                "din_ext: _row_adam_ values[", t, "] must be [", index.size(0), ", ", p.size(1), "] ", p.scalar_type(),
                " on the cpu (one row per index), got ", rows.scalar_type(), " ", rows.sizes());
    // Distinct rows are what makes the rows independent tasks: check it rather than trust the coalesced flag (O(U)).
    const at::Tensor index_c = index.contiguous();
    const int64_t* ids = index_c.const_data_ptr<int64_t>();
    for (int64_t u = 0; u < index_c.size(0); ++u) {
      TORCH_CHECK(ids[u] >= 0 && ids[u] < p.size(0) && (u == 0 || ids[u] > ids[u - 1]),
                  "din_ext: _row_adam_ indices[", t, "] must be strictly ascending rows in [0, ", p.size(0),
                  ") (a coalesced gradient), got ", ids[u], " at position ", u);
    }
  }
}

void row_adam_(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList indices,
               at::TensorList values, at::ArrayRef<double> step_sizes, double beta1, double beta2, double eps,
               bool maximize) {
  check_tables(params, exp_avgs, exp_avg_sqs, indices, values, step_sizes);
  const int64_t tables = static_cast<int64_t>(params.size());
  std::vector<at::Tensor> index_c(tables), values_c(tables);
  for (int64_t t = 0; t < tables; ++t) {
    index_c[t] = indices[t].contiguous();
    values_c[t] = values[t].contiguous();
  }
  // One parallel region per table: a table of fewer than kRowGrain step rows runs inline, with no barrier.
  for (int64_t t = 0; t < tables; ++t) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[t].scalar_type(), "_row_adam_", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t dim = params[t].size(1), count = index_c[t].size(0);
      scalar_t* w = params[t].data_ptr<scalar_t>();
      scalar_t* m = exp_avgs[t].data_ptr<scalar_t>();
      scalar_t* v = exp_avg_sqs[t].data_ptr<scalar_t>();
      const int64_t* ids = index_c[t].const_data_ptr<int64_t>();
      const scalar_t* g = values_c[t].const_data_ptr<scalar_t>();
      // The scalars as SparseAdam's tensor-scalar ops take them: cast once to the compute type.
      const acc_t mix = static_cast<acc_t>(1 - beta1), fresh = static_cast<acc_t>(1 - beta2);
      const acc_t epsilon = static_cast<acc_t>(eps), scale = static_cast<acc_t>(-step_sizes[t]);
      const acc_t sign = maximize ? acc_t(-1) : acc_t(1);
      at::parallel_for(0, count, kRowGrain, [&](int64_t u0, int64_t u1) {
        for (int64_t u = u0; u < u1; ++u) {
          update_row(w + ids[u] * dim, m + ids[u] * dim, v + ids[u] * dim, g + u * dim, dim, sign, mix, fresh,
                     epsilon, scale);
        }
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(din_ext, CPU, m) { m.impl("_row_adam_", &row_adam_); }

}  // namespace din_ext::cpu
