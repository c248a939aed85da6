// The hidden-layer activations on a [rows, H] matrix whose rows are all valid, forward and exact backward.
// Written with ATen ops: the clean baseline of the cpu backend (one pass per layer over all valid rows).
#pragma once

#include <ATen/ATen.h>

#include "common.h"

namespace din_ext::cpu {

// Dice (paper section 5.2):  p = sigmoid(gamma * (z - mean) * rstd + beta),  y = z * (alpha + (1 - alpha) * p),
// rstd = 1 / sqrt(var + eps). With compute_stats, mean and biased var are the statistics of the rows of z, written
// to mean/var; otherwise they are read from mean/var. params: [5, H] (see common.h).
at::Tensor dice_rows_forward(const at::Tensor& z, const at::Tensor& params, bool compute_stats, double eps,
                             at::Tensor mean, at::Tensor var);

// Backward of dice_rows_forward given the statistics it used. Writes d/d(alpha, gamma, beta) to the first three
// rows of grad_params ([5, H]). In training the gradient flows through the batch statistics (as BatchNorm's);
// in eval the running statistics are inputs and get their gradient in the last two rows.
at::Tensor dice_rows_backward(const at::Tensor& grad_y, const at::Tensor& z, const at::Tensor& params,
                              const at::Tensor& mean, const at::Tensor& var, bool training, double eps,
                              at::Tensor grad_params);

// Any activation: params [P, H] (P per num_act_params), mean/var [H] views into the stats tensor (Dice only).
// Dice in training uses the batch statistics in mean/var, computing them first if compute_stats; in eval it uses
// the running statistics in params and leaves mean/var alone.
at::Tensor activation_forward(Activation act, const at::Tensor& z, const at::Tensor& params, bool training,
                              bool compute_stats, double eps, at::Tensor mean, at::Tensor var);

at::Tensor activation_backward(Activation act, const at::Tensor& grad_y, const at::Tensor& z,
                               const at::Tensor& params, bool training, double eps, const at::Tensor& mean,
                               const at::Tensor& var, at::Tensor grad_params);

}  // namespace din_ext::cpu
