// Schemas of every din_ext op. Always compiled (the Python extension and the standalone CMake library);
// each device registers its implementations in its own file with TORCH_LIBRARY_IMPL.
//
// Shared argument conventions (see din_ext/ops/attention.py for the Python side):
//   query [B, D], or [B, C, D]: C >= 1 candidates per user, all scored against the user's one history (every
//     (candidate, behaviour) pair is one row of the unit; out [B, C, Dv], grad_query [B, C, D], grad_keys summed
//     over the candidates, Dice statistics over all C * sum(lengths) valid pairs); keys [N, D]; values [N, Dv] or
//     None (= keys)
//   starts [B], lengths [B] int64: row b's behaviours are keys[starts[b] : starts[b] + lengths[b]]
//     (padded [B, L, D] inputs pass keys.view(B * L, D) and starts = b * L; jagged pass offsets[:-1] and diff)
//   max_len: an upper bound on lengths, or -1 if unknown (only GPU grids use it)
//   weights / biases: the MLP, Linear(4D, H1), ..., Linear(H_last, 1), nn.Linear layout [out, in]
//   act_params [P, sum(H_i)]: per-feature activation parameters of all hidden layers, concatenated:
//     P = 0 (sigmoid, relu), P = 1 (prelu: slope), P = 5 (dice: alpha, gamma, beta, running_mean, running_var)
//   stats [2, sum(H_i)]: Dice batch mean and biased variance over valid rows (training mode; zeros otherwise)
//
// MBA embedding (DIN paper section 5.1; din_ext/ops/mba.py is the Python side):
//   weight [V, D]; ids [N] int32/int64 in [0, V), all the step's lookups of the table concatenated;
//   frequencies [V] float32/float64/int64, n_j (values below 1 count as 1); padding_idx in [0, V) or -1 (none).
//   Forward: out [N, D] = weight[ids]; reg [] = reg_lambda / 2 * sum_{j in U} ||w_j||^2 / n_j (float64 for float64
//   weights, else float32) over the distinct non-padding ids U; unique_ids [U] ascending; order [M] int64: the
//   positions of the M non-padding ids, grouped by id (ascending positions within an id); offsets [U + 1]: id
//   unique_ids[u] occurs at positions order[offsets[u] : offsets[u + 1]]. `sparse` is read by the autograd only.
//   Backward: grad_rows [U, D] = sum of grad_out over the id's positions + reg_lambda * w_j / n_j.
#include <torch/library.h>

TORCH_LIBRARY(din_ext, m) {
  m.def(
      "local_activation_attention(Tensor query, Tensor keys, Tensor? values, Tensor starts, Tensor lengths, "
      "int max_len, Tensor[] weights, Tensor[] biases, Tensor act_params, str activation, str normalization, "
      "float score_scale, bool training, float eps) -> (Tensor out, Tensor stats)");
  m.def(
      "local_activation_attention_backward(Tensor grad_out, Tensor query, Tensor keys, Tensor? values, "
      "Tensor starts, Tensor lengths, int max_len, Tensor[] weights, Tensor[] biases, Tensor act_params, "
      "Tensor stats, str activation, str normalization, float score_scale, bool training, float eps) -> "
      "(Tensor grad_query, Tensor grad_keys, Tensor grad_values, Tensor[] grad_weights, Tensor[] grad_biases, "
      "Tensor grad_act_params)");
  m.def("dice(Tensor x, Tensor? mask, Tensor params, bool training, float eps) -> (Tensor y, Tensor stats)");
  m.def(
      "dice_backward(Tensor grad_y, Tensor x, Tensor? mask, Tensor params, Tensor stats, bool training, "
      "float eps) -> (Tensor grad_x, Tensor grad_params)");
  m.def(
      "mba_embedding(Tensor weight, Tensor ids, Tensor frequencies, float reg_lambda, int padding_idx, bool sparse) "
      "-> (Tensor out, Tensor reg, Tensor unique_ids, Tensor offsets, Tensor order)");
  m.def(
      "mba_embedding_backward(Tensor grad_out, Tensor weight, Tensor frequencies, Tensor unique_ids, "
      "Tensor offsets, Tensor order, float reg_lambda) -> Tensor grad_rows");

  // Private ops (not public API).
  // The cpu attention's stored-activation kernels (training Dice, query [B, D]); the autograd of
  // local_activation_attention (csrc/attention_autograd.cpp) runs them when their memory fits: saved holds the
  // pre-activations the backward reads instead of recomputing them.
  m.def(
      "_local_activation_attention_stored(Tensor query, Tensor keys, Tensor? values, Tensor starts, Tensor lengths, "
      "int max_len, Tensor[] weights, Tensor[] biases, Tensor act_params, str activation, str normalization, "
      "float score_scale, bool training, float eps) -> (Tensor out, Tensor stats, Tensor saved)");
  m.def(
      "_local_activation_attention_stored_backward(Tensor grad_out, Tensor query, Tensor keys, Tensor? values, "
      "Tensor starts, Tensor lengths, int max_len, Tensor[] weights, Tensor[] biases, Tensor act_params, "
      "Tensor stats, Tensor saved, str activation, str normalization, float score_scale, bool training, float eps) "
      "-> (Tensor grad_query, Tensor grad_keys, Tensor grad_values, Tensor[] grad_weights, Tensor[] grad_biases, "
      "Tensor grad_act_params)");
  // One lazy-Adam step of the rows of several tables' coalesced sparse gradients, in place (cpu only:
  // din_ext.training.RowAdam's fused step; csrc/cpu/row_adam.cpp has the update).
  m.def(
      "_row_adam_(Tensor(a!)[] params, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor[] indices, "
      "Tensor[] values, float[] step_sizes, float beta1, float beta2, float eps, bool maximize) -> ()");
  // The cuda attention kernels' launch planning run on the host (csrc/attention_plan.cpp).
  m.def(
      "_attention_launch_plan(int[] widths, int dim, int value_dim, int elem_bytes, int smem_limit, Tensor lengths, "
      "int max_len, int candidates=1) -> (int[] summary, int[] smem_forward, int[] smem_backward, int[] params, "
      "Tensor items, Tensor tiles, int[] multi, Tensor steps)");
  // The C++ side of the op contract (csrc/common.cpp): activation and normalization names in enum order, the
  // act_params rows of each activation, the Dice row names in row order.
  m.def("_contract() -> (str[] activations, str[] normalizations, int[] act_param_rows, str[] dice_rows)");
  // The instruction set of the cpu kernels: "avx512", "avx2" or "base" (the processor's, capped by DIN_EXT_CPU_ISA).
  m.def("_cpu_isa() -> str");
}
