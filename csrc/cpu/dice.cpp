// cpu backend of din_ext::dice: Dice on x [N, H] with statistics over the rows where mask is true (all rows if
// no mask). Masked-out rows output 0 and get no gradient.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/activation.h"

namespace din_ext::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> dice_forward(const at::Tensor& x_, const std::optional<at::Tensor>& mask,
                                                const at::Tensor& params, bool training, double eps) {
  check_dice_args(x_, mask, params);
  const at::Tensor x = x_.contiguous();
  at::Tensor stats = at::zeros({2, x.size(1)}, x.options());
  if (!mask.has_value()) {
    at::Tensor y = activation_forward(Activation::kDice, x, params, training, true, eps, stats[0], stats[1]);
    return {y, stats};
  }
  const at::Tensor rows = mask->nonzero().squeeze(1);
  const at::Tensor y_rows = activation_forward(Activation::kDice, x.index_select(0, rows), params, training, true,
                                               eps, stats[0], stats[1]);
  return {at::zeros_like(x).index_copy_(0, rows, y_rows), stats};
}

std::tuple<at::Tensor, at::Tensor> dice_backward(const at::Tensor& grad_y_, const at::Tensor& x_,
                                                 const std::optional<at::Tensor>& mask, const at::Tensor& params,
                                                 const at::Tensor& stats, bool training, double eps) {
  check_dice_args(x_, mask, params);
  TORCH_CHECK(grad_y_.sizes() == x_.sizes(), "din_ext: grad_y must have shape ", x_.sizes(), ", got ",
              grad_y_.sizes());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 2 && stats.size(1) == x_.size(1),
              "din_ext: stats must have shape [2, ", x_.size(1), "], got ", stats.sizes());
  const at::Tensor x = x_.contiguous();
  const at::Tensor grad_y = grad_y_.contiguous();
  at::Tensor grad_params = at::zeros_like(params);
  if (!mask.has_value()) {
    at::Tensor gx = activation_backward(Activation::kDice, grad_y, x, params, training, eps, stats[0], stats[1],
                                        grad_params);
    return {gx, grad_params};
  }
  const at::Tensor rows = mask->nonzero().squeeze(1);
  const at::Tensor gx_rows = activation_backward(Activation::kDice, grad_y.index_select(0, rows),
                                                 x.index_select(0, rows), params, training, eps, stats[0], stats[1],
                                                 grad_params);
  return {at::zeros_like(x).index_copy_(0, rows, gx_rows), grad_params};
}

}  // namespace

TORCH_LIBRARY_IMPL(din_ext, CPU, m) {
  m.impl("dice", &dice_forward);
  m.impl("dice_backward", &dice_backward);
}

}  // namespace din_ext::cpu
