// Argument parsing and validation shared by every device's implementation of the din_ext ops: the device-agnostic
// checks, and the prologues that turn an op's arguments into one struct of checked, contiguous tensors and
// preallocated outputs (flash-attention's params struct), so that each device file holds only its kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace din_ext {

// The op contract's C++ side. din_ext/contract.py writes the same facts for Python (ACTIVATION_IDS, NORMALIZATIONS,
// ACT_PARAM_ROWS, DICE_ROWS); python_tests/test_contract.py compares the two through the op din_ext::_contract.
// An activation's value is the id the kernels switch on.
enum class Activation { kDice, kSigmoid, kPrelu, kRelu };
enum class Normalization { kNone, kSoftmax };
constexpr int kNumActivations = 4, kNumNormalizations = 2;

Activation parse_activation(c10::string_view name);
Normalization parse_normalization(c10::string_view name);
const char* activation_name(Activation act);
const char* normalization_name(Normalization norm);

// Rows of act_params per activation: dice (alpha, gamma, beta, running_mean, running_var), prelu (slope), none.
int64_t num_act_params(Activation act);

// Row indices into act_params for Dice.
constexpr int64_t kDiceAlpha = 0, kDiceGamma = 1, kDiceBeta = 2, kDiceRunningMean = 3, kDiceRunningVar = 4;
constexpr int64_t kNumDiceRows = 5;

struct AttentionShape {
  int64_t batch = 0;       // B
  int64_t candidates = 1;  // C: candidates per user (query [B, C, D]); 1 for a query [B, D]
  bool multi = false;      // query is [B, C, D] (out [B, C, Dv], grad_query [B, C, D]), C >= 1
  int64_t num_keys = 0;    // N, rows of keys storage
  int64_t dim = 0;         // D
  int64_t value_dim = 0;   // Dv
  std::vector<int64_t> hidden;  // H_1 .. H_last
  int64_t hidden_total = 0;     // sum(hidden)
};

// The arguments of local_activation_attention and of its backward, checked (shapes, dtypes, devices and, for CPU
// tensors, the values of starts/lengths), with their tensors made contiguous.
struct AttentionArgs {
  Activation act = Activation::kDice;
  Normalization norm = Normalization::kNone;
  AttentionShape shape;
  at::Tensor query, keys;        // [B, D] or [B, C, D], [N, D]
  at::Tensor values;             // [N, Dv]; keys itself when the op got no values
  bool separate_values = false;  // the op got values
  at::Tensor starts, lengths;    // [B] int64
  int64_t max_len = -1;          // as given: -1 (unknown) or an upper bound on lengths
  at::TensorList weights, biases;  // as given (each device packs them); valid for the op call
  at::Tensor act_params;           // [P, sum(H_i)] as given
  double score_scale = 1.0;
  bool training = false;
  double eps = 0.0;
};

// The forward's arguments and its outputs: out [B, Dv], or [B, C, Dv] for a query [B, C, D] (uninitialized),
// stats [2, sum(H_i)] (zeros).
struct AttentionForwardArgs : AttentionArgs {
  at::Tensor out, stats;
};

// The backward's arguments (grad_out shaped like out, [B, Dv] or [B, C, Dv], and the forward's stats, contiguous)
// and the outputs every device allocates alike: grad_keys (zeros: rows outside every user's range get exactly zero;
// with zero_keys false uninitialized, for a device that zeroes those rows itself), grad_values (likewise, or [0]
// without values), grad_act_params (zeros). grad_query (shaped like query) and the parameter gradients are the
// device's.
struct AttentionBackwardArgs : AttentionArgs {
  at::Tensor grad_out, stats;
  at::Tensor grad_keys, grad_values, grad_act_params;
};

AttentionForwardArgs attention_forward_args(const at::Tensor& query, const at::Tensor& keys,
                                            const std::optional<at::Tensor>& values, const at::Tensor& starts,
                                            const at::Tensor& lengths, int64_t max_len, at::TensorList weights,
                                            at::TensorList biases, const at::Tensor& act_params,
                                            c10::string_view activation, c10::string_view normalization,
                                            double score_scale, bool training, double eps);

AttentionBackwardArgs attention_backward_args(const at::Tensor& grad_out, const at::Tensor& query,
                                              const at::Tensor& keys, const std::optional<at::Tensor>& values,
                                              const at::Tensor& starts, const at::Tensor& lengths, int64_t max_len,
                                              at::TensorList weights, at::TensorList biases,
                                              const at::Tensor& act_params, const at::Tensor& stats,
                                              c10::string_view activation, c10::string_view normalization,
                                              double score_scale, bool training, double eps, bool zero_keys = true);

// The arguments of dice and of its backward, checked (x [N, H], mask [N] bool, params [5, H]) and contiguous.
struct DiceArgs {
  at::Tensor x, params;
  at::Tensor valid;  // the mask, or undefined: every row is valid
  int64_t rows = 0, features = 0;  // N, H
  bool training = false;
  double eps = 0.0;
  const bool* valid_rows() const { return valid.defined() ? valid.const_data_ptr<bool>() : nullptr; }
};

// The forward's arguments and outputs: y [N, H] (uninitialized), stats [2, H] (zeros).
struct DiceForwardArgs : DiceArgs {
  at::Tensor y, stats;
};

// The backward's arguments (grad_y [N, H] and the forward's stats, contiguous) and outputs: grad_x [N, H]
// (uninitialized), grad_params [5, H] (zeros).
struct DiceBackwardArgs : DiceArgs {
  at::Tensor grad_y, stats;
  at::Tensor grad_x, grad_params;
};

DiceForwardArgs dice_forward_args(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                  const at::Tensor& params, bool training, double eps);

DiceBackwardArgs dice_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                    const std::optional<at::Tensor>& mask, const at::Tensor& params,
                                    const at::Tensor& stats, bool training, double eps);

// Checks an MBA table: weight [V, D] floating point, frequencies [V] float32/float64/int64 on weight's device.
// The device's own check (the device of weight) is the caller's.
void check_mba_table(const at::Tensor& weight, const at::Tensor& frequencies);

// Checks the rest of mba_embedding's arguments: ids [N] int32/int64 on weight's device, padding_idx in [-1, V).
void check_mba_lookup(const at::Tensor& weight, const at::Tensor& ids, int64_t padding_idx);

// The arguments of mba_embedding_backward past the table (checked by the caller), checked (grad_out [N, D] with
// weight's dtype and device; unique_ids [U], offsets [U + 1] and order [M] int64 on weight's device) and contiguous,
// and its output grad_rows [U, D] (uninitialized).
struct MbaBackwardArgs {
  at::Tensor grad_out, weight, frequencies, unique_ids, offsets, order;
  at::Tensor grad_rows;
};

MbaBackwardArgs mba_backward_args(const at::Tensor& grad_out, const at::Tensor& weight,
                                  const at::Tensor& frequencies, const at::Tensor& unique_ids,
                                  const at::Tensor& offsets, const at::Tensor& order);

}  // namespace din_ext
