// Autograd of din_ext::mba_embedding for every device that implements it (cpu, cuda): one C++
// torch::autograd::Function that calls the forward and the backward op through the dispatcher, as
// csrc/attention_autograd.cpp does for the attention. A training step runs no Python around the op (a model looks up
// each of its tables once a step, so the Python setup_context and backward of a torch.library autograd cost more
// than the op itself on small tables). Registered for the Autograd key, so torch.compile and torch.export trace
// through it; the Triton twin keeps its autograd in din_ext/ops/mba.py.
//
// The weight's gradient has one row per distinct non-padding id of the call (docs/design.md section 2.4): a
// coalesced sparse COO tensor when `sparse`, else dense with zeros elsewhere.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

namespace din_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardResult call_forward(const at::Tensor& weight, const at::Tensor& ids, const at::Tensor& frequencies,
                           double reg_lambda, int64_t padding_idx, bool sparse) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("din_ext::mba_embedding", "")
                             .typed<ForwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                                  int64_t, bool)>();
  return op.call(weight, ids, frequencies, reg_lambda, padding_idx, sparse);
}

at::Tensor call_backward(const at::Tensor& grad_out, const at::Tensor& weight, const at::Tensor& frequencies,
                         const at::Tensor& unique_ids, const at::Tensor& offsets, const at::Tensor& order,
                         double reg_lambda) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("din_ext::mba_embedding_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(grad_out, weight, frequencies, unique_ids, offsets, order, reg_lambda);
}

// Gradients in the order of the op's arguments: weight, ids, frequencies, reg_lambda, padding_idx, sparse. Only the
// embeddings `out` are differentiable.
class MbaFunction : public torch::autograd::Function<MbaFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& ids,
                               const at::Tensor& frequencies, double reg_lambda, int64_t padding_idx, bool sparse) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, reg, unique_ids, offsets, order] =
        call_forward(weight, ids, frequencies, reg_lambda, padding_idx, sparse);
    ctx->mark_non_differentiable({reg, unique_ids, offsets, order});
    // No zeros for the outputs without a gradient (backward reads grads[0] alone, and returns nothing when it is
    // undefined): the engine would otherwise allocate one per such output every step.
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({weight, frequencies, unique_ids, offsets, order});
    ctx->saved_data["reg_lambda"] = reg_lambda;
    ctx->saved_data["sparse"] = sparse;
    return {out, reg, unique_ids, offsets, order};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(6);
    if (!grads[0].defined()) return out;  // only the non-differentiable outputs were used
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &weight = saved[0], &unique_ids = saved[2];
    const at::Tensor rows = call_backward(grads[0].contiguous(), weight, saved[1], unique_ids, saved[3], saved[4],
                                          ctx->saved_data["reg_lambda"].toDouble());
    if (ctx->saved_data["sparse"].toBool()) {
      // Coalesced: unique_ids are distinct and ascending (the forward's grouping).
      at::Tensor grad = at::_sparse_coo_tensor_unsafe(unique_ids.unsqueeze(0), rows, weight.sizes(),
                                                      weight.options().layout(at::kSparse), /*is_coalesced=*/true);
      // AccumulateGrad re-wraps a sparse gradient that nothing else references, dropping its coalesced flag (then
      // every optimizer step would coalesce it again); a second reference makes it clone it, flag kept.
      ctx->saved_data["sparse_grad"] = grad;
      out[0] = grad;
    } else {
      out[0] = at::zeros_like(weight, at::MemoryFormat::Contiguous).index_put_({unique_ids}, rows);
    }
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mba_autograd(
    const at::Tensor& weight, const at::Tensor& ids, const at::Tensor& frequencies, double reg_lambda,
    int64_t padding_idx, bool sparse) {
  const variable_list outs = MbaFunction::apply(weight, ids, frequencies, reg_lambda, padding_idx, sparse);
  return {outs[0], outs[1], outs[2], outs[3], outs[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(din_ext, Autograd, m) { m.impl("mba_embedding", &mba_autograd); }

}  // namespace din_ext
