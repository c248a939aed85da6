// cpu backend of din_ext::local_activation_attention (forward and backward).
//
// For user b with behaviours k_l = keys[starts[b] + l], l < lengths[b]:
//   s_l = MLP([q, k_l, q - k_l, q * k_l])                       (Linear -> act, ..., Linear(H_last, 1))
//   t_l = score_scale * s_l;  w_l = t_l ("none") or softmax_l(t_l) ("softmax")
//   out_b = sum_l w_l * v_l                                      (0 for an empty row)
// Only valid behaviours are gathered, so padded positions cost nothing and never contribute. The backward
// recomputes the MLP instead of saving [N, H] activations between the two ops.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "common.h"
#include "cpu/activation.h"

namespace din_ext::cpu {
namespace {

// The valid behaviours in (user, position) order: their user (seg) and their row in keys (row).
struct ValidRows {
  at::Tensor seg;
  at::Tensor row;
};

ValidRows valid_rows(const at::Tensor& starts, const at::Tensor& lengths) {
  const int64_t total = lengths.sum().item<int64_t>();
  const at::Tensor seg = at::repeat_interleave(lengths, std::optional<int64_t>(total));
  const at::Tensor first = at::cumsum(lengths, 0) - lengths;
  const at::Tensor pos = at::arange(total, lengths.options()) - first.index_select(0, seg);
  return {seg, starts.index_select(0, seg) + pos};
}

struct MlpTrace {
  std::vector<at::Tensor> inputs;  // input of each Linear (inputs[0] is [q, k, q - k, q * k])
  std::vector<at::Tensor> pre;     // pre-activation of each hidden layer
  at::Tensor score;                // [rows]
};

MlpTrace mlp_forward(const at::Tensor& x, at::TensorList weights, at::TensorList biases, const at::Tensor& act_params,
                     Activation act, bool training, bool compute_stats, double eps, const at::Tensor& stats,
                     bool keep) {
  MlpTrace t;
  at::Tensor h = x;
  int64_t col = 0;
  const size_t hidden_layers = weights.size() - 1;
  for (size_t i = 0; i < hidden_layers; ++i) {
    const int64_t width = weights[i].size(0);
    at::Tensor z = at::linear(h, weights[i], biases[i]);
    at::Tensor y = activation_forward(act, z, act_params.narrow(1, col, width), training, compute_stats, eps,
                                      stats[0].narrow(0, col, width), stats[1].narrow(0, col, width));
    if (keep) {
      t.inputs.push_back(h);
      t.pre.push_back(z);
    }
    h = y;
    col += width;
  }
  if (keep) t.inputs.push_back(h);
  t.score = at::linear(h, weights.back(), biases.back()).squeeze(1);
  return t;
}

// Pooling weights of every valid behaviour from its scaled score t.
at::Tensor pooling_weights(const at::Tensor& t, const at::Tensor& seg, int64_t batch, Normalization norm) {
  if (norm == Normalization::kNone) return t;
  at::Tensor row_max = at::full({batch}, -std::numeric_limits<double>::infinity(), t.options());
  row_max.scatter_reduce_(0, seg, t, "amax", /*include_self=*/true);
  const at::Tensor e = (t - row_max.index_select(0, seg)).exp();
  const at::Tensor denom = at::zeros({batch}, t.options()).index_add_(0, seg, e);
  return e / denom.index_select(0, seg);
}

at::Tensor behaviour_features(const at::Tensor& q, const at::Tensor& k) {
  return at::cat({q, k, q - k, q * k}, 1);
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& query_, const at::Tensor& keys_,
                                                     const std::optional<at::Tensor>& values_,
                                                     const at::Tensor& starts, const at::Tensor& lengths,
                                                     int64_t max_len, at::TensorList weights, at::TensorList biases,
                                                     const at::Tensor& act_params, c10::string_view activation,
                                                     c10::string_view normalization, double score_scale,
                                                     bool training, double eps) {
  const Activation act = parse_activation(activation);
  const Normalization norm = parse_normalization(normalization);
  const AttentionShape shape =
      check_attention_args(query_, keys_, values_, starts, lengths, max_len, weights, biases, act_params, act);
  const at::Tensor query = query_.contiguous();
  const at::Tensor keys = keys_.contiguous();
  const at::Tensor values = values_.has_value() ? values_->contiguous() : keys;

  at::Tensor stats = at::zeros({2, shape.hidden_total}, query.options());
  const ValidRows r = valid_rows(starts, lengths);
  const at::Tensor k = keys.index_select(0, r.row);
  const at::Tensor x = behaviour_features(query.index_select(0, r.seg), k);
  const MlpTrace t =
      mlp_forward(x, weights, biases, act_params, act, training, /*compute_stats=*/true, eps, stats, false);
  const at::Tensor w = pooling_weights(t.score * score_scale, r.seg, shape.batch, norm);
  const at::Tensor v = values_.has_value() ? values.index_select(0, r.row) : k;
  at::Tensor out = at::zeros({shape.batch, shape.value_dim}, query.options());
  out.index_add_(0, r.seg, v * w.unsqueeze(1));
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>
attention_backward(const at::Tensor& grad_out_, const at::Tensor& query_, const at::Tensor& keys_,
                   const std::optional<at::Tensor>& values_, const at::Tensor& starts, const at::Tensor& lengths,
                   int64_t max_len, at::TensorList weights, at::TensorList biases, const at::Tensor& act_params,
                   const at::Tensor& stats, c10::string_view activation, c10::string_view normalization,
                   double score_scale, bool training, double eps) {
  const Activation act = parse_activation(activation);
  const Normalization norm = parse_normalization(normalization);
  const AttentionShape shape =
      check_attention_args(query_, keys_, values_, starts, lengths, max_len, weights, biases, act_params, act);
  TORCH_CHECK(grad_out_.dim() == 2 && grad_out_.size(0) == shape.batch && grad_out_.size(1) == shape.value_dim,
              "din_ext: grad_out must have shape [", shape.batch, ", ", shape.value_dim, "], got ", grad_out_.sizes());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 2 && stats.size(1) == shape.hidden_total,
              "din_ext: stats must have shape [2, ", shape.hidden_total, "], got ", stats.sizes());
  const at::Tensor grad_out = grad_out_.contiguous();
  const at::Tensor query = query_.contiguous();
  const at::Tensor keys = keys_.contiguous();
  const at::Tensor values = values_.has_value() ? values_->contiguous() : keys;
  const int64_t D = shape.dim;

  const ValidRows r = valid_rows(starts, lengths);
  const at::Tensor q = query.index_select(0, r.seg);
  const at::Tensor k = keys.index_select(0, r.row);
  const MlpTrace t = mlp_forward(behaviour_features(q, k), weights, biases, act_params, act, training,
                                 /*compute_stats=*/false, eps, stats, true);
  const at::Tensor w = pooling_weights(t.score * score_scale, r.seg, shape.batch, norm);
  const at::Tensor v = values_.has_value() ? values.index_select(0, r.row) : k;

  // Pooling.
  const at::Tensor g_rows = grad_out.index_select(0, r.seg);
  const at::Tensor grad_v = g_rows * w.unsqueeze(1);
  const at::Tensor grad_w = (g_rows * v).sum(1);
  at::Tensor grad_t = grad_w;
  if (norm == Normalization::kSoftmax) {
    const at::Tensor dot = at::zeros({shape.batch}, w.options()).index_add_(0, r.seg, w * grad_w);
    grad_t = w * (grad_w - dot.index_select(0, r.seg));
  }
  const at::Tensor grad_score = grad_t * score_scale;

  // MLP, last layer first.
  const size_t layers = weights.size();
  std::vector<at::Tensor> grad_weights(layers), grad_biases(layers);
  at::Tensor grad_act_params = at::zeros_like(act_params);
  at::Tensor grad_pre = grad_score.unsqueeze(1);  // d/d(output of Linear i), here i = last
  int64_t col = shape.hidden_total;
  for (size_t i = layers; i-- > 0;) {
    grad_weights[i] = at::mm(grad_pre.t(), t.inputs[i]);
    grad_biases[i] = grad_pre.sum(0);
    at::Tensor grad_in = at::mm(grad_pre, weights[i]);
    if (i == 0) {
      grad_pre = grad_in;  // d/dx, x = [q, k, q - k, q * k]
      break;
    }
    const int64_t width = weights[i - 1].size(0);
    col -= width;
    grad_pre = activation_backward(act, grad_in, t.pre[i - 1], act_params.narrow(1, col, width), training, eps,
                                   stats[0].narrow(0, col, width), stats[1].narrow(0, col, width),
                                   grad_act_params.narrow(1, col, width));
  }
  const at::Tensor& gx = grad_pre;
  const at::Tensor g_qk = gx.narrow(1, 3 * D, D);
  const at::Tensor g_diff = gx.narrow(1, 2 * D, D);
  const at::Tensor grad_q_rows = gx.narrow(1, 0, D) + g_diff + g_qk * k;
  at::Tensor grad_k_rows = gx.narrow(1, D, D) - g_diff + g_qk * q;

  at::Tensor grad_query = at::zeros_like(query).index_add_(0, r.seg, grad_q_rows);
  at::Tensor grad_keys = at::zeros_like(keys);
  at::Tensor grad_values;
  if (values_.has_value()) {
    grad_values = at::zeros_like(values).index_add_(0, r.row, grad_v);
  } else {
    grad_k_rows = grad_k_rows + grad_v;
    grad_values = at::empty({0}, keys.options());
  }
  grad_keys.index_add_(0, r.row, grad_k_rows);
  return {grad_query, grad_keys, grad_values, grad_weights, grad_biases, grad_act_params};
}

}  // namespace

TORCH_LIBRARY_IMPL(din_ext, CPU, m) {
  m.impl("local_activation_attention", &attention_forward);
  m.impl("local_activation_attention_backward", &attention_backward);
}

}  // namespace din_ext::cpu
