// Autograd of din_ext::dice for every device that implements it (cpu, cuda): one C++ torch::autograd::Function
// over the forward and the backward op, as csrc/attention_autograd.cpp and csrc/mba_autograd.cpp are. A DIN step
// runs the tower's Dice on small [B, H] inputs, where the Python setup_context and backward of a torch.library
// autograd cost about as much as the kernels. Registered for the Autograd key, so torch.compile and torch.export
// trace through it; the Triton twin keeps its autograd in din_ext/ops/dice.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace din_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                                const at::Tensor& params, bool training, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("din_ext::dice", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, bool, double)>();
  return op.call(x, mask, params, training, eps);
}

std::tuple<at::Tensor, at::Tensor> call_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                 const std::optional<at::Tensor>& mask, const at::Tensor& params,
                                                 const at::Tensor& stats, bool training, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("din_ext::dice_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                 const at::Tensor&, const at::Tensor&, bool, double)>();
  return op.call(grad_y, x, mask, params, stats, training, eps);
}

// Gradients in the order of the op's arguments: x, mask, params, training, eps. stats (the batch statistics, for
// the running averages only) is not differentiable.
class DiceFunction : public torch::autograd::Function<DiceFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& mask,
                               const at::Tensor& params, bool training, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, stats] = call_forward(x, mask, params, training, eps);
    ctx->mark_non_differentiable({stats});
    // No zeros for the outputs without a gradient (backward reads grads[0] alone, and returns nothing when it is
    // undefined): the engine would otherwise allocate one per such output every step.
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, mask.value_or(at::Tensor()), params, stats});
    ctx->saved_data["has_mask"] = mask.has_value();
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    return {y, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(5);
    if (!grads[0].defined()) return out;  // only stats was used: no gradient flows
    const variable_list saved = ctx->get_saved_variables();
    const std::optional<at::Tensor> mask =
        ctx->saved_data["has_mask"].toBool() ? std::optional<at::Tensor>(saved[1]) : std::nullopt;
    auto [grad_x, grad_params] = call_backward(grads[0], saved[0], mask, saved[2], saved[3],
                                               ctx->saved_data["training"].toBool(),
                                               ctx->saved_data["eps"].toDouble());
    out[0] = grad_x;
    out[2] = grad_params;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> dice_autograd(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                                 const at::Tensor& params, bool training, double eps) {
  const variable_list outs = DiceFunction::apply(x, mask, params, training, eps);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(din_ext, Autograd, m) { m.impl("dice", &dice_autograd); }

}  // namespace din_ext
