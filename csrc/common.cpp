#include "common.h"

#include "cpu/kernels.h"

#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace din_ext {

namespace {

// Names in enum order (index i names the enumerator of value i): the one table parse_* and *_name read.
constexpr const char* kActivationNames[kNumActivations] = {"dice", "sigmoid", "prelu", "relu"};
constexpr const char* kNormalizationNames[kNumNormalizations] = {"none", "softmax"};
static_assert(static_cast<int>(Activation::kRelu) + 1 == kNumActivations, "kActivationNames lists every activation");
static_assert(static_cast<int>(Normalization::kSoftmax) + 1 == kNumNormalizations,
              "kNormalizationNames lists every normalization");

// "'a', 'b', ..." for an error message.
std::string quoted(const char* const* names, int count) {
  std::string out;
  for (int i = 0; i < count; ++i) out += std::string(i ? ", '" : "'") + names[i] + "'";
  return out;
}

}  // namespace

Activation parse_activation(c10::string_view name) {
  for (int i = 0; i < kNumActivations; ++i) {
    if (name == kActivationNames[i]) return static_cast<Activation>(i);
  }
  TORCH_CHECK(false, "din_ext: activation must be one of ", quoted(kActivationNames, kNumActivations), ", got '",
              std::string(name), "'");
}

Normalization parse_normalization(c10::string_view name) {
  for (int i = 0; i < kNumNormalizations; ++i) {
    if (name == kNormalizationNames[i]) return static_cast<Normalization>(i);
  }
  TORCH_CHECK(false, "din_ext: normalization must be one of ", quoted(kNormalizationNames, kNumNormalizations),
              ", got '", std::string(name), "'");
}

const char* activation_name(Activation act) { return kActivationNames[static_cast<int>(act)]; }

const char* normalization_name(Normalization norm) { return kNormalizationNames[static_cast<int>(norm)]; }

int64_t num_act_params(Activation act) {
  switch (act) {
    case Activation::kDice:
      return kNumDiceRows;
    case Activation::kPrelu:
      return 1;
    default:
      return 0;
  }
}

namespace {

void check_float(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "din_ext: ", name, " must have dtype ", like.scalar_type(),
              " (the dtype of query), got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "din_ext: ", name, " must be on ", like.device(),
              " (the device of query), got ", t.device());
}

void check_index(const at::Tensor& t, const char* name, int64_t batch, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == batch, "din_ext: ", name, " must have shape [", batch, "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kLong, "din_ext: ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "din_ext: ", name, " must be on ", like.device(),
              " (the device of query), got ", t.device());
}

// The values of starts/lengths (CPU, int64), in plain loops over the data: a training step calls this twice (forward
// and backward), and a dozen small ATen reductions cost more than the loops.
void check_key_rows(const at::Tensor& starts_, const at::Tensor& lengths_, int64_t num_keys, int64_t max_len) {
  const at::Tensor starts = starts_.contiguous(), lengths = lengths_.contiguous();
  const int64_t* st = starts.const_data_ptr<int64_t>();
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  const int64_t batch = starts.numel();
  for (int64_t b = 0; b < batch; ++b) TORCH_CHECK(len[b] >= 0, "din_ext: lengths must be >= 0");
  for (int64_t b = 0; b < batch; ++b) TORCH_CHECK(st[b] >= 0, "din_ext: starts must be >= 0");
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(st[b] <= num_keys - len[b], "din_ext: starts + lengths exceeds the number of keys (", num_keys, ")");
  }
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(max_len < 0 || len[b] <= max_len, "din_ext: lengths exceed max_len (", max_len, ")");
  }
  // Kernels write each key row's gradient once: the rows of different users must not overlap. Non-empty ranges in
  // increasing order of start (padded and jagged inputs) are disjoint iff each ends before the next begins;
  // otherwise sort them by start first.
  std::vector<std::pair<int64_t, int64_t>> ranges;  // (start, end) of the non-empty rows
  bool ordered = true;
  for (int64_t b = 0; b < batch; ++b) {
    if (len[b] == 0) continue;
    ordered = ordered && (ranges.empty() || st[b] >= ranges.back().first);
    ranges.emplace_back(st[b], st[b] + len[b]);
  }
  if (!ordered) std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    TORCH_CHECK(ranges[i].first >= ranges[i - 1].second,
                "din_ext: the key rows of different users (starts, lengths) overlap");
  }
}

AttentionShape check_attention_args(const at::Tensor& query, const at::Tensor& keys,
                                    const std::optional<at::Tensor>& values, const at::Tensor& starts,
                                    const at::Tensor& lengths, int64_t max_len, at::TensorList weights,
                                    at::TensorList biases, const at::Tensor& act_params, Activation act) {
  AttentionShape s;
  TORCH_CHECK(query.dim() == 2 || query.dim() == 3, "din_ext: query must have shape [B, D] or [B, C, D] (C "
              "candidates per user), got ", query.sizes());
  TORCH_CHECK(at::isFloatingType(query.scalar_type()), "din_ext: query must be floating point, got ",
              query.scalar_type());
  s.multi = query.dim() == 3;
  s.batch = query.size(0);
  s.candidates = s.multi ? query.size(1) : 1;
  s.dim = query.size(-1);
  TORCH_CHECK(s.candidates >= 1, "din_ext: query [B, C, D] needs C >= 1 candidates, got ", query.sizes());
  TORCH_CHECK(keys.dim() == 2 && keys.size(1) == s.dim, "din_ext: keys must have shape [N, ", s.dim, "], got ",
              keys.sizes());
  check_float(keys, "keys", query);
  s.num_keys = keys.size(0);
  s.value_dim = s.dim;
  if (values.has_value()) {
    TORCH_CHECK(values->dim() == 2 && values->size(0) == s.num_keys, "din_ext: values must have shape [",
                s.num_keys, ", Dv] (one row per key), got ", values->sizes());
    check_float(*values, "values", query);
    s.value_dim = values->size(1);
  }
  check_index(starts, "starts", s.batch, query);
  check_index(lengths, "lengths", s.batch, query);
  TORCH_CHECK(max_len >= -1, "din_ext: max_len must be -1 (unknown) or >= 0, got ", max_len);

  TORCH_CHECK(!weights.empty() && weights.size() == biases.size(), "din_ext: weights and biases must be non-empty "
              "lists of equal length, got ", weights.size(), " and ", biases.size());
  int64_t fan_in = 4 * s.dim;
  for (size_t i = 0; i < weights.size(); ++i) {
    const bool last = i + 1 == weights.size();
    const at::Tensor& w = weights[i];
    const at::Tensor& b = biases[i];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == fan_in && (!last || w.size(0) == 1), "din_ext: weights[", i,
                "] must have shape [", last ? "1" : "H", ", ", fan_in, "], got ", w.sizes());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == w.size(0), "din_ext: biases[", i, "] must have shape [", w.size(0),
                "], got ", b.sizes());
    check_float(w, "weights", query);
    check_float(b, "biases", query);
    if (!last) {
      s.hidden.push_back(w.size(0));
      s.hidden_total += w.size(0);
    }
    fan_in = w.size(0);
  }
  const int64_t rows = num_act_params(act);
  TORCH_CHECK(act_params.dim() == 2 && act_params.size(0) == rows && act_params.size(1) == s.hidden_total,
              "din_ext: act_params must have shape [", rows, ", ", s.hidden_total, "] for this activation, got ",
              act_params.sizes());
  check_float(act_params, "act_params", query);

  if (starts.device().is_cpu() && s.batch > 0) {
    // Value checks are cheap on the CPU; GPU callers validate in Python before launching.
    check_key_rows(starts, lengths, s.num_keys, max_len);
  }
  return s;
}

void check_dice_args(const at::Tensor& x, const std::optional<at::Tensor>& mask, const at::Tensor& params) {
  TORCH_CHECK(x.dim() == 2, "din_ext: dice input must have shape [N, H], got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "din_ext: dice input must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(params.dim() == 2 && params.size(0) == kNumDiceRows && params.size(1) == x.size(1),
              "din_ext: dice params must have shape [5, ", x.size(1), "], got ", params.sizes());
  TORCH_CHECK(params.scalar_type() == x.scalar_type() && params.device() == x.device(),
              "din_ext: dice params must match the input's dtype and device");
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 1 && mask->size(0) == x.size(0), "din_ext: mask must have shape [", x.size(0),
                "], got ", mask->sizes());
    TORCH_CHECK(mask->scalar_type() == at::kBool, "din_ext: mask must be bool, got ", mask->scalar_type());
    TORCH_CHECK(mask->device() == x.device(), "din_ext: mask must be on ", x.device());
  }
}

void check_backward_args(const at::Tensor& grad, const char* grad_name, at::IntArrayRef grad_shape,
                         const at::Tensor& stats, int64_t hidden, const at::Tensor& like) {
  TORCH_CHECK(grad.sizes() == grad_shape, "din_ext: ", grad_name, " must have shape ", grad_shape, ", got ",
              grad.sizes());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 2 && stats.size(1) == hidden,
              "din_ext: stats must have shape [2, ", hidden, "], got ", stats.sizes());
  TORCH_CHECK(grad.scalar_type() == like.scalar_type() && stats.scalar_type() == like.scalar_type(),
              "din_ext: ", grad_name, " and stats must have the dtype ", like.scalar_type(), ", got ",
              grad.scalar_type(), " and ", stats.scalar_type());
  TORCH_CHECK(grad.device() == like.device() && stats.device() == like.device(), "din_ext: ", grad_name,
              " and stats must be on ", like.device(), ", got ", grad.device(), " and ", stats.device());
}

// The checks and contiguous tensors the forward and the backward share.
AttentionArgs attention_args(const at::Tensor& query, const at::Tensor& keys, const std::optional<at::Tensor>& values,
                             const at::Tensor& starts, const at::Tensor& lengths, int64_t max_len,
                             at::TensorList weights, at::TensorList biases, const at::Tensor& act_params,
                             c10::string_view activation, c10::string_view normalization, double score_scale,
                             bool training, double eps) {
  AttentionArgs a;
  a.act = parse_activation(activation);
  a.norm = parse_normalization(normalization);
  a.shape = check_attention_args(query, keys, values, starts, lengths, max_len, weights, biases, act_params, a.act);
  a.query = query.contiguous();
  a.keys = keys.contiguous();
  a.separate_values = values.has_value();
  a.values = a.separate_values ? values->contiguous() : a.keys;
  a.starts = starts.contiguous();
  a.lengths = lengths.contiguous();
  a.max_len = max_len;
  a.weights = weights;
  a.biases = biases;
  a.act_params = act_params;
  a.score_scale = score_scale;
  a.training = training;
  a.eps = eps;
  return a;
}

DiceArgs dice_args(const at::Tensor& x, const std::optional<at::Tensor>& mask, const at::Tensor& params,
                   bool training, double eps) {
  check_dice_args(x, mask, params);
  DiceArgs a;
  a.x = x.contiguous();
  a.params = params.contiguous();
  if (mask.has_value()) a.valid = mask->contiguous();
  a.rows = a.x.size(0);
  a.features = a.x.size(1);
  a.training = training;
  a.eps = eps;
  return a;
}

}  // namespace

AttentionForwardArgs attention_forward_args(const at::Tensor& query, const at::Tensor& keys,
                                            const std::optional<at::Tensor>& values, const at::Tensor& starts,
                                            const at::Tensor& lengths, int64_t max_len, at::TensorList weights,
                                            at::TensorList biases, const at::Tensor& act_params,
                                            c10::string_view activation, c10::string_view normalization,
                                            double score_scale, bool training, double eps) {
  AttentionForwardArgs a{attention_args(query, keys, values, starts, lengths, max_len, weights, biases, act_params,
                                        activation, normalization, score_scale, training, eps)};
  a.stats = at::zeros({2, a.shape.hidden_total}, a.query.options());
  a.out = a.shape.multi ? at::empty({a.shape.batch, a.shape.candidates, a.shape.value_dim}, a.query.options())
                        : at::empty({a.shape.batch, a.shape.value_dim}, a.query.options());
  return a;
}

AttentionBackwardArgs attention_backward_args(const at::Tensor& grad_out, const at::Tensor& query,
                                              const at::Tensor& keys, const std::optional<at::Tensor>& values,
                                              const at::Tensor& starts, const at::Tensor& lengths, int64_t max_len,
                                              at::TensorList weights, at::TensorList biases,
                                              const at::Tensor& act_params, const at::Tensor& stats,
                                              c10::string_view activation, c10::string_view normalization,
                                              double score_scale, bool training, double eps, bool zero_keys) {
  AttentionBackwardArgs a{attention_args(query, keys, values, starts, lengths, max_len, weights, biases, act_params,
                                         activation, normalization, score_scale, training, eps)};
  const AttentionShape& s = a.shape;
  const std::vector<int64_t> out_shape = s.multi ? std::vector<int64_t>{s.batch, s.candidates, s.value_dim}
                                                 : std::vector<int64_t>{s.batch, s.value_dim};
  check_backward_args(grad_out, "grad_out", out_shape, stats, s.hidden_total, query);
  a.grad_out = grad_out.contiguous();
  a.stats = stats.contiguous();
  a.grad_keys = zero_keys ? at::zeros_like(a.keys) : at::empty_like(a.keys);
  a.grad_values = !a.separate_values ? at::empty({0}, a.keys.options())
                  : zero_keys        ? at::zeros_like(a.values)
                                     : at::empty_like(a.values);
  a.grad_act_params = at::zeros_like(act_params);
  return a;
}

DiceForwardArgs dice_forward_args(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                  const at::Tensor& params, bool training, double eps) {
  DiceForwardArgs a{dice_args(x, mask, params, training, eps)};
  a.y = at::empty_like(a.x);
  a.stats = at::zeros({2, a.features}, a.x.options());
  return a;
}

DiceBackwardArgs dice_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                    const std::optional<at::Tensor>& mask, const at::Tensor& params,
                                    const at::Tensor& stats, bool training, double eps) {
  DiceBackwardArgs a{dice_args(x, mask, params, training, eps)};
  check_backward_args(grad_y, "grad_y", x.sizes(), stats, x.size(1), x);
  a.grad_y = grad_y.contiguous();
  a.stats = stats.contiguous();
  a.grad_x = at::empty_like(a.x);
  a.grad_params = at::zeros_like(a.params);
  return a;
}

void check_mba_table(const at::Tensor& weight, const at::Tensor& frequencies) {
  TORCH_CHECK(weight.dim() == 2, "din_ext: weight must have shape [V, D], got ", weight.sizes());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), "din_ext: weight must be floating point, got ",
              weight.scalar_type());
  TORCH_CHECK(frequencies.dim() == 1 && frequencies.size(0) == weight.size(0),
              "din_ext: frequencies must have shape [", weight.size(0), "] (one per row of weight), got ",
              frequencies.sizes());
  const auto freq_dtype = frequencies.scalar_type();
  TORCH_CHECK(freq_dtype == at::kFloat || freq_dtype == at::kDouble || freq_dtype == at::kLong,
              "din_ext: frequencies must be float32, float64 or int64, got ", freq_dtype);
  TORCH_CHECK(frequencies.device() == weight.device(), "din_ext: frequencies must be on ", weight.device(),
              " (the device of weight), got ", frequencies.device());
}

void check_mba_lookup(const at::Tensor& weight, const at::Tensor& ids, int64_t padding_idx) {
  TORCH_CHECK(ids.dim() == 1, "din_ext: ids must be 1-D (the step's lookups concatenated), got shape ", ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
              "din_ext: ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.device() == weight.device(), "din_ext: ids must be on ", weight.device(),
              " (the device of weight), got ", ids.device());
  const int64_t num_rows = weight.size(0);
  TORCH_CHECK(padding_idx >= -1 && padding_idx < num_rows, "din_ext: padding_idx must be -1 (none) or in [0, ",
              num_rows, "), got ", padding_idx);
}

MbaBackwardArgs mba_backward_args(const at::Tensor& grad_out, const at::Tensor& weight,
                                  const at::Tensor& frequencies, const at::Tensor& unique_ids,
                                  const at::Tensor& offsets, const at::Tensor& order) {
  const int64_t dim = weight.size(1);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(1) == dim, "din_ext: grad_out must have shape [N, ", dim,
              "], got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == weight.scalar_type() && grad_out.device() == weight.device(),
              "din_ext: grad_out must have the dtype and device of weight");
  const std::pair<const at::Tensor*, const char*> index_args[] = {
      {&unique_ids, "unique_ids"}, {&offsets, "offsets"}, {&order, "order"}};
  for (const auto& arg : index_args) {
    const at::Tensor& t = *arg.first;
    TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong && t.device() == weight.device(), "din_ext: ",
                arg.second, " must be a 1-D int64 tensor on ", weight.device(), ", got ", t.scalar_type(), " ",
                t.sizes(), " on ", t.device());
  }
  TORCH_CHECK(offsets.size(0) == unique_ids.size(0) + 1, "din_ext: offsets must have shape [", unique_ids.size(0) + 1,
              "] (unique_ids + 1), got ", offsets.sizes());
  MbaBackwardArgs a{grad_out.contiguous(), weight.contiguous(), frequencies.contiguous(),
                    unique_ids.contiguous(), offsets.contiguous(), order.contiguous()};
  a.grad_rows = at::empty({unique_ids.size(0), dim}, a.weight.options());
  return a;
}

namespace {

// din_ext::_contract: the facts above as python_tests/test_contract.py compares them with din_ext/contract.py.
std::tuple<std::vector<std::string>, std::vector<std::string>, std::vector<int64_t>, std::vector<std::string>>
contract() {
  std::vector<std::string> activations, normalizations;
  std::vector<int64_t> act_param_rows;
  for (int i = 0; i < kNumActivations; ++i) {
    const auto act = static_cast<Activation>(i);
    activations.emplace_back(activation_name(act));
    act_param_rows.push_back(num_act_params(act));
  }
  for (int i = 0; i < kNumNormalizations; ++i) {
    normalizations.emplace_back(normalization_name(static_cast<Normalization>(i)));
  }
  std::vector<std::string> dice_rows(kNumDiceRows);
  dice_rows[kDiceAlpha] = "alpha";
  dice_rows[kDiceGamma] = "gamma";
  dice_rows[kDiceBeta] = "beta";
  dice_rows[kDiceRunningMean] = "running_mean";
  dice_rows[kDiceRunningVar] = "running_var";
  return {activations, normalizations, act_param_rows, dice_rows};
}

// din_ext::_cpu_isa: the instruction set the cpu kernels run with here ("avx512", "avx2" or "base"): the
// processor's, capped by DIN_EXT_CPU_ISA.
std::string cpu_isa() {
  return cpu::has_avx512() ? "avx512" : cpu::has_avx2_fma() ? "avx2" : "base";
}

}  // namespace

TORCH_LIBRARY_IMPL(din_ext, CompositeExplicitAutograd, m) {
  m.impl("_contract", &contract);
  m.impl("_cpu_isa", &cpu_isa);
}

}  // namespace din_ext
