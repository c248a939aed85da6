#include "cpu/activation.h"

namespace din_ext::cpu {

at::Tensor dice_rows_forward(const at::Tensor& z, const at::Tensor& params, bool compute_stats, double eps,
                             at::Tensor mean, at::Tensor var) {
  if (compute_stats) {
    if (z.size(0) > 0) {
      mean.copy_(z.mean(0));
      var.copy_(at::var(z, at::IntArrayRef{0}, /*correction=*/0, /*keepdim=*/false));
    } else {
      mean.zero_();
      var.zero_();
    }
  }
  const at::Tensor rstd = (var + eps).rsqrt();
  const at::Tensor alpha = params[kDiceAlpha];
  const at::Tensor p = at::sigmoid(params[kDiceGamma] * (z - mean) * rstd + params[kDiceBeta]);
  return z * (alpha + (1 - alpha) * p);
}

at::Tensor dice_rows_backward(const at::Tensor& grad_y, const at::Tensor& z, const at::Tensor& params,
                              const at::Tensor& mean, const at::Tensor& var, bool training, double eps,
                              at::Tensor grad_params) {
  const at::Tensor alpha = params[kDiceAlpha];
  const at::Tensor gamma = params[kDiceGamma];
  const at::Tensor rstd = (var + eps).rsqrt();
  const at::Tensor xhat = (z - mean) * rstd;
  const at::Tensor p = at::sigmoid(gamma * xhat + params[kDiceBeta]);
  // d/d(sigmoid argument): y depends on it through p only.
  const at::Tensor g_arg = grad_y * z * (1 - alpha) * p * (1 - p);
  grad_params[kDiceAlpha].copy_((grad_y * z * (1 - p)).sum(0));
  grad_params[kDiceGamma].copy_((g_arg * xhat).sum(0));
  grad_params[kDiceBeta].copy_(g_arg.sum(0));
  const at::Tensor g_xhat = g_arg * gamma;
  at::Tensor grad_z = grad_y * (alpha + (1 - alpha) * p);
  if (training) {
    if (z.size(0) > 0) {
      // xhat_r = (z_r - mean) * rstd with mean and var over the same rows: BatchNorm's backward.
      grad_z += rstd * (g_xhat - g_xhat.mean(0) - xhat * (g_xhat * xhat).mean(0));
    }
  } else {
    // Fixed (running) statistics: they are inputs of the op too, so they get their exact gradient.
    grad_z += g_xhat * rstd;
    grad_params[kDiceRunningMean].copy_(-rstd * g_xhat.sum(0));
    grad_params[kDiceRunningVar].copy_(-0.5 * rstd * rstd * (g_xhat * xhat).sum(0));
  }
  return grad_z;
}

at::Tensor activation_forward(Activation act, const at::Tensor& z, const at::Tensor& params, bool training,
                              bool compute_stats, double eps, at::Tensor mean, at::Tensor var) {
  switch (act) {
    case Activation::kDice:
      if (!training) {
        return dice_rows_forward(z, params, false, eps, params[kDiceRunningMean], params[kDiceRunningVar]);
      }
      return dice_rows_forward(z, params, compute_stats, eps, mean, var);
    case Activation::kSigmoid:
      return at::sigmoid(z);
    case Activation::kPrelu:
      return at::where(z > 0, z, params[0] * z);
    case Activation::kRelu:
      return at::relu(z);
  }
  TORCH_CHECK(false, "din_ext: unknown activation");
}

at::Tensor activation_backward(Activation act, const at::Tensor& grad_y, const at::Tensor& z,
                               const at::Tensor& params, bool training, double eps, const at::Tensor& mean,
                               const at::Tensor& var, at::Tensor grad_params) {
  switch (act) {
    case Activation::kDice:
      if (!training) {
        return dice_rows_backward(grad_y, z, params, params[kDiceRunningMean], params[kDiceRunningVar], false, eps,
                                  grad_params);
      }
      return dice_rows_backward(grad_y, z, params, mean, var, true, eps, grad_params);
    case Activation::kSigmoid: {
      const at::Tensor y = at::sigmoid(z);
      return grad_y * y * (1 - y);
    }
    case Activation::kPrelu: {
      const at::Tensor pos = z > 0;
      grad_params[0].copy_(at::where(pos, at::zeros_like(z), grad_y * z).sum(0));
      return at::where(pos, grad_y, grad_y * params[0]);
    }
    case Activation::kRelu:
      return at::where(z > 0, grad_y, at::zeros_like(grad_y));
  }
  TORCH_CHECK(false, "din_ext: unknown activation");
}

}  // namespace din_ext::cpu
