// Argument parsing and validation shared by every device's implementation of the din_ext ops.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace din_ext {

enum class Activation { kDice, kSigmoid, kPrelu, kRelu };
enum class Normalization { kNone, kSoftmax };

Activation parse_activation(c10::string_view name);
Normalization parse_normalization(c10::string_view name);

// Rows of act_params per activation: dice (alpha, gamma, beta, running_mean, running_var), prelu (slope), none.
int64_t num_act_params(Activation act);

// Row indices into act_params for Dice.
constexpr int64_t kDiceAlpha = 0, kDiceGamma = 1, kDiceBeta = 2, kDiceRunningMean = 3, kDiceRunningVar = 4;

struct AttentionShape {
  int64_t batch = 0;       // B
  int64_t num_keys = 0;    // N, rows of keys storage
  int64_t dim = 0;         // D
  int64_t value_dim = 0;   // Dv
  std::vector<int64_t> hidden;  // H_1 .. H_last
  int64_t hidden_total = 0;     // sum(hidden)
};

// Checks shapes, dtypes, devices and (for CPU tensors) the values of starts/lengths; names the bad argument.
AttentionShape check_attention_args(const at::Tensor& query, const at::Tensor& keys,
                                    const std::optional<at::Tensor>& values, const at::Tensor& starts,
                                    const at::Tensor& lengths, int64_t max_len, at::TensorList weights,
                                    at::TensorList biases, const at::Tensor& act_params, Activation act);

// Checks a Dice op's arguments: x [N, H], mask [N] bool, params [5, H].
void check_dice_args(const at::Tensor& x, const std::optional<at::Tensor>& mask, const at::Tensor& params);

// Checks the extra arguments of a backward op: the incoming gradient (shape grad_shape) and the forward's batch
// statistics [2, hidden] must have the dtype and device of `like`.
void check_backward_args(const at::Tensor& grad, const char* grad_name, at::IntArrayRef grad_shape,
                         const at::Tensor& stats, int64_t hidden, const at::Tensor& like);

}  // namespace din_ext
