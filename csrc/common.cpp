#include "common.h"

namespace din_ext {

Activation parse_activation(c10::string_view name) {
  if (name == "dice") return Activation::kDice;
  if (name == "sigmoid") return Activation::kSigmoid;
  if (name == "prelu") return Activation::kPrelu;
  if (name == "relu") return Activation::kRelu;
  TORCH_CHECK(false, "din_ext: activation must be one of 'dice', 'sigmoid', 'prelu', 'relu', got '",
              std::string(name), "'");
}

Normalization parse_normalization(c10::string_view name) {
  if (name == "none") return Normalization::kNone;
  if (name == "softmax") return Normalization::kSoftmax;
  TORCH_CHECK(false, "din_ext: normalization must be 'none' or 'softmax', got '", std::string(name), "'");
}

int64_t num_act_params(Activation act) {
  switch (act) {
    case Activation::kDice:
      return 5;
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

}  // namespace

AttentionShape check_attention_args(const at::Tensor& query, const at::Tensor& keys,
                                    const std::optional<at::Tensor>& values, const at::Tensor& starts,
                                    const at::Tensor& lengths, int64_t max_len, at::TensorList weights,
                                    at::TensorList biases, const at::Tensor& act_params, Activation act) {
  AttentionShape s;
  TORCH_CHECK(query.dim() == 2, "din_ext: query must have shape [B, D], got ", query.sizes());
  TORCH_CHECK(at::isFloatingType(query.scalar_type()), "din_ext: query must be floating point, got ",
              query.scalar_type());
  s.batch = query.size(0);
  s.dim = query.size(1);
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
    TORCH_CHECK(lengths.min().item<int64_t>() >= 0, "din_ext: lengths must be >= 0");
    TORCH_CHECK(starts.min().item<int64_t>() >= 0, "din_ext: starts must be >= 0");
    TORCH_CHECK((starts + lengths).max().item<int64_t>() <= s.num_keys,
                "din_ext: starts + lengths exceeds the number of keys (", s.num_keys, ")");
    TORCH_CHECK(max_len < 0 || lengths.max().item<int64_t>() <= max_len, "din_ext: lengths exceed max_len (",
                max_len, ")");
    // Kernels write each key row's gradient once: the rows of different users must not overlap. Sorted by start,
    // non-empty ranges are disjoint iff each ends before the next begins.
    const at::Tensor nonempty = (lengths > 0).nonzero().squeeze(1);
    const at::Tensor used = starts.index_select(0, nonempty), order = used.argsort();
    const at::Tensor first = used.index_select(0, order);
    const at::Tensor ends = first + lengths.index_select(0, nonempty).index_select(0, order);
    const int64_t m = first.size(0);
    TORCH_CHECK(m < 2 || (first.narrow(0, 1, m - 1) >= ends.narrow(0, 0, m - 1)).all().item<bool>(),
                "din_ext: the key rows of different users (starts, lengths) overlap");
  }
  return s;
}

void check_dice_args(const at::Tensor& x, const std::optional<at::Tensor>& mask, const at::Tensor& params) {
  TORCH_CHECK(x.dim() == 2, "din_ext: dice input must have shape [N, H], got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "din_ext: dice input must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(params.dim() == 2 && params.size(0) == 5 && params.size(1) == x.size(1),
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

}  // namespace din_ext
