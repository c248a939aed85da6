// Autograd of din_ext::local_activation_attention for every device that implements it (cpu, cuda): one C++
// torch::autograd::Function that calls the forward and the backward op through the dispatcher (FBGEMM's
// jagged_tensor_ops_autograd.cpp pattern). A training step runs no Python around the op: no pytree flattening of
// the weight lists, no Python setup_context/backward, no per-call validation of the returned gradients.
// Registered for the Autograd key, so torch.compile and torch.export trace through it like a built-in op's autograd.
// The Triton twin keeps its autograd in din_ext/ops/attention.py. For training Dice on the cpu it also chooses, per
// call by size, between the recomputing kernels and the stored-activation ones (use_stored).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/attention.h"

namespace din_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& query, const at::Tensor& keys,
                                                const std::optional<at::Tensor>& values, const at::Tensor& starts,
                                                const at::Tensor& lengths, int64_t max_len, at::TensorList weights,
                                                at::TensorList biases, const at::Tensor& act_params,
                                                c10::string_view activation, c10::string_view normalization,
                                                double score_scale, bool training, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("din_ext::local_activation_attention", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                 const at::Tensor&, const at::Tensor&, int64_t, at::TensorList, at::TensorList,
                                 const at::Tensor&, c10::string_view, c10::string_view, double, bool, double)>();
  return op.call(query, keys, values, starts, lengths, max_len, weights, biases, act_params, activation,
                 normalization, score_scale, training, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_stored_forward(
    const at::Tensor& query, const at::Tensor& keys, const std::optional<at::Tensor>& values, const at::Tensor& starts,
    const at::Tensor& lengths, int64_t max_len, at::TensorList weights, at::TensorList biases,
    const at::Tensor& act_params, c10::string_view activation, c10::string_view normalization, double score_scale,
    bool training, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("din_ext::_local_activation_attention_stored", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                 const at::Tensor&, const at::Tensor&, int64_t, at::TensorList, at::TensorList,
                                 const at::Tensor&, c10::string_view, c10::string_view, double, bool, double)>();
  return op.call(query, keys, values, starts, lengths, max_len, weights, biases, act_params, activation,
                 normalization, score_scale, training, eps);
}

using BackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>;

BackwardResult call_backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& keys,
                             const std::optional<at::Tensor>& values, const at::Tensor& starts,
                             const at::Tensor& lengths, int64_t max_len, at::TensorList weights, at::TensorList biases,
                             const at::Tensor& act_params, const at::Tensor& stats, c10::string_view activation,
                             c10::string_view normalization, double score_scale, bool training, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("din_ext::local_activation_attention_backward", "")
                             .typed<BackwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const std::optional<at::Tensor>&, const at::Tensor&,
                                                   const at::Tensor&, int64_t, at::TensorList, at::TensorList,
                                                   const at::Tensor&, const at::Tensor&, c10::string_view,
                                                   c10::string_view, double, bool, double)>();
  return op.call(grad_out, query, keys, values, starts, lengths, max_len, weights, biases, act_params, stats,
                 activation, normalization, score_scale, training, eps);
}

BackwardResult call_stored_backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& keys,
                                    const std::optional<at::Tensor>& values, const at::Tensor& starts,
                                    const at::Tensor& lengths, int64_t max_len, at::TensorList weights,
                                    at::TensorList biases, const at::Tensor& act_params, const at::Tensor& stats,
                                    const at::Tensor& saved, c10::string_view activation,
                                    c10::string_view normalization, double score_scale, bool training, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("din_ext::_local_activation_attention_stored_backward", "")
                             .typed<BackwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const std::optional<at::Tensor>&, const at::Tensor&,
                                                   const at::Tensor&, int64_t, at::TensorList, at::TensorList,
                                                   const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   c10::string_view, c10::string_view, double, bool, double)>();
  return op.call(grad_out, query, keys, values, starts, lengths, max_len, weights, biases, act_params, stats, saved,
                 activation, normalization, score_scale, training, eps);
}

// The default budget of the stored-activation kernels, in MiB; DIN_EXT_ATTENTION_STORE_MB overrides it (0: always
// recompute). 256 MiB keeps B = 1024 users' histories of up to ~250 behaviours with the default (80, 40) MLP.
constexpr int64_t kStoreBudgetMiB = 256;

int64_t store_budget_bytes() {
  const char* env = std::getenv("DIN_EXT_ATTENTION_STORE_MB");
  const int64_t mib = env && *env ? std::max<int64_t>(0, std::atoll(env)) : kStoreBudgetMiB;
  return mib << 20;
}

// Whether this call runs the cpu stored-activation kernels: training Dice with a query [B, D] and hidden layers,
// where something needs gradients, and N key rows x their bytes per row within the budget (the kernels store the
// valid pairs alone, at most N: the lengths are not read here, where they may be fake or on another device, so
// padded keys over-estimate). Their peak is below a quarter of the eager reference's at every shape (about
// 2 (H_1 + ... + H_n) floats per pair against its 4D + 9 (H_1 + ... + H_n)); long histories recompute.
bool use_stored(const at::Tensor& query, const at::Tensor& keys, const std::optional<at::Tensor>& values,
                at::TensorList weights, at::TensorList biases, const at::Tensor& act_params,
                c10::string_view activation, bool training) {
  if (!training || activation != "dice" || query.dim() != 2 || weights.size() < 2 || !query.device().is_cpu()) {
    return false;
  }
  bool grad = query.requires_grad() || keys.requires_grad() || (values && values->requires_grad()) ||
              act_params.requires_grad();
  for (size_t i = 0; i < weights.size(); ++i) grad = grad || weights[i].requires_grad() || biases[i].requires_grad();
  if (!grad || !at::GradMode::is_enabled()) return false;
  return keys.sym_size(0) * cpu::stored_row_bytes(weights, query.scalar_type()) <= store_budget_bytes();
}

// Gradients, in the order Function::apply counts its arguments: stored (the kernels' choice), query, keys, values,
// starts, lengths, max_len, each weight, each bias, act_params, activation, normalization, score_scale, training,
// eps (undefined for the arguments that are not differentiable). stats (batch statistics, for the running averages
// only) is not differentiable.
class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, bool stored, const at::Tensor& query, const at::Tensor& keys,
                               const std::optional<at::Tensor>& values, const at::Tensor& starts,
                               const at::Tensor& lengths, int64_t max_len, at::TensorList weights,
                               at::TensorList biases, const at::Tensor& act_params, c10::string_view activation,
                               c10::string_view normalization, double score_scale, bool training, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out, stats, activations;
    if (stored) {
      std::tie(out, stats, activations) = call_stored_forward(query, keys, values, starts, lengths, max_len, weights,
                                                              biases, act_params, activation, normalization,
                                                              score_scale, training, eps);
    } else {
      std::tie(out, stats) = call_forward(query, keys, values, starts, lengths, max_len, weights, biases, act_params,
                                          activation, normalization, score_scale, training, eps);
    }
    ctx->mark_non_differentiable({stats});
    // No zeros for the outputs without a gradient (backward reads grads[0] alone, and returns nothing when it is
    // undefined): the engine would otherwise allocate one per such output every step.
    ctx->set_materialize_grads(false);
    // activations: the stored kernels' pre-activations, or undefined (the backward recomputes them).
    std::vector<at::Tensor> saved{query, keys, values.value_or(at::Tensor()), starts, lengths, act_params, stats,
                                  activations};
    saved.insert(saved.end(), weights.begin(), weights.end());
    saved.insert(saved.end(), biases.begin(), biases.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["layers"] = static_cast<int64_t>(weights.size());
    ctx->saved_data["has_values"] = values.has_value();
    ctx->saved_data["max_len"] = max_len;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["normalization"] = std::string(normalization);
    ctx->saved_data["score_scale"] = score_scale;
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    return {out, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t layers = ctx->saved_data["layers"].toInt();
    const bool has_values = ctx->saved_data["has_values"].toBool();
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<at::Tensor> weights(saved.begin() + 8, saved.begin() + 8 + layers);
    const std::vector<at::Tensor> biases(saved.begin() + 8 + layers, saved.begin() + 8 + 2 * layers);
    const std::optional<at::Tensor> values = has_values ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    // Slots: stored, query, keys, values, starts, lengths, max_len; the lists; then 6 more arguments.
    variable_list out(7 + 2 * layers + 6);
    if (!grads[0].defined()) return out;  // only stats was used: no gradient flows
    const int64_t max_len = ctx->saved_data["max_len"].toInt();
    const std::string& activation = ctx->saved_data["activation"].toStringRef();
    const std::string& normalization = ctx->saved_data["normalization"].toStringRef();
    const double score_scale = ctx->saved_data["score_scale"].toDouble(), eps = ctx->saved_data["eps"].toDouble();
    const bool training = ctx->saved_data["training"].toBool();
    auto [grad_query, grad_keys, grad_values, grad_weights, grad_biases, grad_act] =
        saved[7].defined()
            ? call_stored_backward(grads[0], saved[0], saved[1], values, saved[3], saved[4], max_len, weights,
                                   biases, saved[5], saved[6], saved[7], activation, normalization, score_scale,
                                   training, eps)
            : call_backward(grads[0], saved[0], saved[1], values, saved[3], saved[4], max_len, weights, biases,
                            saved[5], saved[6], activation, normalization, score_scale, training, eps);
    out[1] = grad_query;
    out[2] = grad_keys;
    if (has_values) out[3] = grad_values;
    for (int64_t i = 0; i < layers; ++i) {
      out[7 + i] = grad_weights[i];
      out[7 + layers + i] = grad_biases[i];
    }
    out[7 + 2 * layers] = grad_act;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> attention_autograd(const at::Tensor& query, const at::Tensor& keys,
                                                      const std::optional<at::Tensor>& values,
                                                      const at::Tensor& starts, const at::Tensor& lengths,
                                                      int64_t max_len, at::TensorList weights, at::TensorList biases,
                                                      const at::Tensor& act_params, c10::string_view activation,
                                                      c10::string_view normalization, double score_scale,
                                                      bool training, double eps) {
  // Decided here: Function::apply runs forward with gradients disabled.
  const bool stored = use_stored(query, keys, values, weights, biases, act_params, activation, training);
  const variable_list outs = AttentionFunction::apply(stored, query, keys, values, starts, lengths, max_len, weights,
                                                      biases, act_params, activation, normalization, score_scale,
                                                      training, eps);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(din_ext, Autograd, m) { m.impl("local_activation_attention", &attention_autograd); }

}  // namespace din_ext
