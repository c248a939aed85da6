"""MBA embedding: the public function, its validation, and the registration of every backend (the compiled op
``din_ext::mba_embedding`` and its Triton twin ``din_ext::triton_mba_embedding`` over kernels/mba.py), with one fake
for both; the compiled op's autograd is C++ (csrc/mba_autograd.cpp: no Python runs in its forward or backward), the
Triton twin's is registered here with the same gradient; the reference backend is din_ext.reference.mba_lookup.

The op looks up all of a step's id tensors of one table at once, so that an id shared by several lookups (the
candidate item and the behaviour items) counts once. Its backward returns, for each distinct non-padding id j of the
step, the summed gradient of its lookups plus ``reg_lambda * w_j / n_j``: the gradient of the mini-batch-aware L2
term ``R = reg_lambda / 2 * sum_j ||w_j||^2 / n_j`` (DIN paper section 5.1, docs/design.md). R is returned for
logging, detached: it is already in the gradient, so it must not be added to the loss that is backpropagated.

Contract of the internal ops: weight [V, D] floating; ids [N] int32/int64 with every id in [0, V) (the ops read
weight at them unchecked); frequencies [V] float32, float64 or int64; padding_idx in [0, V) or -1 for none. They
return (out [N, D], reg, unique_ids [U], offsets [U + 1], order [M]): the distinct non-padding ids ascending and the
positions of their lookups grouped by id, which the backward op takes to build one gradient row per distinct id.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from din_ext import _backend, _ext, _validate, reference
from din_ext.contract import acc_dtype

OP = "mba_embedding"
OP_NAME = f"din_ext::{OP}"
TRITON_OP_NAME = f"din_ext::triton_{OP}"
FREQUENCY_DTYPES = (torch.float32, torch.float64, torch.int64)

Ids = Union[torch.Tensor, Sequence[torch.Tensor]]


def mba_embedding(
    weight: torch.Tensor,
    ids: Ids,
    frequencies: torch.Tensor,
    reg_lambda: float,
    *,
    padding_idx: Optional[int] = None,
    sparse: bool = True,
    backend: str = "auto",
    checked: bool = False,
) -> Tuple[Union[torch.Tensor, Tuple[torch.Tensor, ...]], torch.Tensor]:
    """Embedding lookup(s) whose backward adds the MBA regularization gradient of the step's distinct ids.

    weight: (V, D) table; ids: an int32/int64 tensor of any shape, or a list/tuple of them (one call per step and
    table: an id counts once however often and in however many of them it occurs); frequencies: (V,) float32,
    float64 or int64 occurrences n_j (values below 1 count as 1); padding_idx: a row that gets no gradient at all.
    sparse: weight's gradient is a coalesced sparse COO tensor with one row per distinct id (else dense).
    checked: the caller has validated that the ids are in range (e.g. DIN.forward); they are not read again.
    Returns (embeddings, reg): embeddings ids.shape + (D,) (a tuple for a list of ids), reg the detached scalar
    R = reg_lambda / 2 * sum_{j in U} ||w_j||^2 / n_j (float64 for float64 tables, else float32).
    """
    single = isinstance(ids, torch.Tensor)
    if not single and not isinstance(ids, (list, tuple)):
        raise TypeError(f"ids must be a torch.Tensor or a list/tuple of them, got {type(ids).__name__}")
    id_list = [ids] if single else list(ids)
    names = ["ids"] if single else [f"ids[{k}]" for k in range(len(id_list))]
    padding = check_inputs(weight, id_list, names, frequencies, reg_lambda, padding_idx, checked)
    name = _backend.resolve(backend, weight.device, OP)
    # 1-D ids as they are: a reshape to their own shape is still an op (DIN: 8 a step)
    flat_ids = [i if i.dim() == 1 else i.reshape(-1) for i in id_list]
    flat = torch.cat(flat_ids) if len(flat_ids) != 1 else flat_ids[0]
    if name == "reference":
        out, reg = reference.mba_lookup(weight, flat, frequencies, float(reg_lambda), padding, bool(sparse))
    else:
        op = torch.ops.din_ext.triton_mba_embedding if name == "triton" else torch.ops.din_ext.mba_embedding
        out, reg = op(weight, flat, frequencies, float(reg_lambda), padding, bool(sparse))[:2]
    # split_with_sizes: the op torch.split and Tensor.split reach through two Python wrappers a call
    pieces = out.split_with_sizes([i.numel() for i in id_list]) if len(id_list) != 1 else [out]
    # A piece of 1-D ids has its shape already: no view, so no autograd node a piece and step (DIN: 7 a step).
    outs = tuple(p if i.dim() == 1 else p.view(*i.shape, weight.shape[1]) for p, i in zip(pieces, id_list))
    # The compiled op's reg is a non-differentiable output already (no detach op a table and step for it).
    return (outs[0] if single else outs), (reg.detach() if reg.requires_grad else reg)


def check_inputs(weight, id_list, names, frequencies, reg_lambda, padding_idx, checked: bool = False) -> int:
    """Validates the arguments, naming the bad one; returns padding_idx as the ops take it (-1: none).

    Reads the ids' range with one host-device synchronization, unless ``checked`` (the caller has) or tracing.
    """
    _validate.tensor(weight, "weight", dims=2)
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    num_rows = weight.shape[0]
    if not id_list:
        raise ValueError("ids must be a tensor or a non-empty list of tensors")
    for ids, name in zip(id_list, names):
        _validate.tensor(ids, name)
        if ids.dtype not in _validate.INDEX_DTYPES:
            raise TypeError(f"{name} must be int32 or int64, got {ids.dtype}")
        if ids.device != weight.device:
            raise ValueError(f"{name} must be on the device of weight ({weight.device}), got {ids.device}")
    if not (checked or _validate.tracing()):
        filled = [(ids, name) for ids, name in zip(id_list, names) if ids.numel()]
        bounds = torch.stack([v for ids, _ in filled for v in torch.aminmax(ids)]).tolist() if filled else []
        for (_, name), lo, hi in zip(filled, bounds[0::2], bounds[1::2]):
            if lo < 0 or hi >= num_rows:
                raise ValueError(f"{name} must be in [0, {num_rows}) (the rows of the table), got "
                                 f"{lo if lo < 0 else hi}")
    _validate.tensor(frequencies, "frequencies", dims=1)
    if frequencies.dtype not in FREQUENCY_DTYPES or frequencies.shape[0] != num_rows:
        raise ValueError(f"frequencies must be a float32, float64 or int64 tensor of shape [{num_rows}], got "
                         f"{frequencies.dtype} {tuple(frequencies.shape)}")
    if frequencies.device != weight.device:
        raise ValueError(f"frequencies must be on the device of weight ({weight.device}), got {frequencies.device}")
    if not float(reg_lambda) >= 0:
        raise ValueError(f"reg_lambda must be >= 0, got {reg_lambda}")
    if padding_idx is None:
        return -1
    if not -num_rows <= int(padding_idx) < num_rows:
        raise ValueError(f"padding_idx must be in [-{num_rows}, {num_rows}), got {padding_idx}")
    return int(padding_idx) % num_rows


# ---------------------------------------------------------------------------------------------------------------
# One fake for the compiled op and its Triton twin; the Triton twin's autograd (the compiled op's is C++)


def _fake_forward(weight, ids, frequencies, reg_lambda, padding_idx, sparse):
    ctx = torch.library.get_ctx()
    num_unique, num_kept = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    return (weight.new_empty(ids.shape[0], weight.shape[1]), weight.new_empty((), dtype=acc_dtype(weight.dtype)),
            ids.new_empty(num_unique, dtype=torch.long), ids.new_empty(num_unique + 1, dtype=torch.long),
            ids.new_empty(num_kept, dtype=torch.long))


def _fake_backward(grad_out, weight, frequencies, unique_ids, offsets, order, reg_lambda):
    return weight.new_empty(unique_ids.shape[0], weight.shape[1])


def weight_grad(rows: torch.Tensor, unique_ids: torch.Tensor, shape, sparse: bool) -> torch.Tensor:
    """Weight's gradient from one row per distinct id: coalesced sparse COO, or dense with zeros elsewhere."""
    if sparse:
        return torch.sparse_coo_tensor(unique_ids[None], rows, shape, is_coalesced=True, check_invariants=False)
    return rows.new_zeros(shape).index_put_((unique_ids,), rows)


def _register_autograd(name: str, backward_op) -> None:
    """Registers the autograd of the forward op ``name`` with its backward op ``backward_op``: the Triton twin's; it
    returns the gradient csrc/mba_autograd.cpp returns for the compiled op."""
    def setup_context(ctx, inputs, output):
        weight, ids, frequencies, reg_lambda, padding_idx, sparse = inputs
        out, reg, unique_ids, offsets, order = output
        ctx.mark_non_differentiable(reg, unique_ids, offsets, order)
        ctx.save_for_backward(weight, frequencies, unique_ids, offsets, order)
        ctx.reg_lambda, ctx.sparse = reg_lambda, sparse

    def backward(ctx, grad_out, *unused):
        weight, frequencies, unique_ids, offsets, order = ctx.saved_tensors
        rows = backward_op(grad_out.contiguous(), weight, frequencies, unique_ids, offsets, order, ctx.reg_lambda)
        grad = weight_grad(rows, unique_ids, weight.shape, ctx.sparse)
        if ctx.sparse:
            # AccumulateGrad re-wraps a sparse gradient that nothing else references, dropping its coalesced flag
            # (then every optimizer step would coalesce it again); a second reference makes it clone it, flag kept.
            ctx.sparse_grad = grad
        return grad, None, None, None, None, None

    torch.library.register_autograd(name, backward, setup_context=setup_context)


if _ext.has_cpp():
    torch.library.register_fake(OP_NAME)(_fake_forward)
    torch.library.register_fake(OP_NAME + "_backward")(_fake_backward)


def _register_triton() -> None:
    """Registers TRITON_OP_NAME and its backward over kernels/mba.py (run once, at import, where triton is
    installed)."""
    from din_ext.kernels import mba as kernels
    from din_ext.ops._triton import define_op

    @define_op(TRITON_OP_NAME, _fake_forward, data_dependent=True)
    def forward(weight: Tensor, ids: Tensor, frequencies: Tensor, reg_lambda: float, padding_idx: int,
                sparse: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return kernels.forward(weight, ids, frequencies, reg_lambda, padding_idx)

    @define_op(TRITON_OP_NAME + "_backward", _fake_backward)
    def backward(grad_out: Tensor, weight: Tensor, frequencies: Tensor, unique_ids: Tensor, offsets: Tensor,
                 order: Tensor, reg_lambda: float) -> Tensor:
        return kernels.backward(grad_out, weight, frequencies, unique_ids, offsets, order, reg_lambda)

    _register_autograd(TRITON_OP_NAME, backward)


if _backend.has_triton(OP):
    _register_triton()
