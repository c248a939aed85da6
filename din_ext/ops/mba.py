"""Functional MBA embedding: validation, backend dispatch, fake kernels and autograd of ``din_ext::mba_embedding``.

The op looks up all of a step's id tensors of one table at once, so that an id shared by several lookups (the
candidate item and the behaviour items) counts once. Its backward returns, for each distinct non-padding id j of the
step, the summed gradient of its lookups plus ``reg_lambda * w_j / n_j``: the gradient of the mini-batch-aware L2
term ``R = reg_lambda / 2 * sum_j ||w_j||^2 / n_j`` (DIN paper section 5.1, DESIGN.md section 1). R is returned for
logging, detached: it is already in the gradient, so it must not be added to the loss that is backpropagated.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from din_ext import _backend, _ext, _validate, reference

OP_NAME = "din_ext::mba_embedding"
TRITON_OP_NAME = "din_ext::mba_embedding_triton"
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
) -> Tuple[Union[torch.Tensor, Tuple[torch.Tensor, ...]], torch.Tensor]:
    """Embedding lookup(s) whose backward adds the MBA regularization gradient of the step's distinct ids.

    weight: (V, D) table; ids: an int32/int64 tensor of any shape, or a list/tuple of them (one call per step and
    table: an id counts once however often and in however many of them it occurs); frequencies: (V,) float32,
    float64 or int64 occurrences n_j (values below 1 count as 1); padding_idx: a row that gets no gradient at all.
    sparse: weight's gradient is a coalesced sparse COO tensor with one row per distinct id (else dense).
    Returns (embeddings, reg): embeddings ids.shape + (D,) (a tuple for a list of ids), reg the detached scalar
    R = reg_lambda / 2 * sum_{j in U} ||w_j||^2 / n_j (float64 for float64 tables, else float32).
    """
    single = isinstance(ids, torch.Tensor)
    if not single and not isinstance(ids, (list, tuple)):
        raise TypeError(f"ids must be a torch.Tensor or a list/tuple of them, got {type(ids).__name__}")
    id_list = [ids] if single else list(ids)
    names = ["ids"] if single else [f"ids[{k}]" for k in range(len(id_list))]
    padding = check_inputs(weight, id_list, names, frequencies, reg_lambda, padding_idx)
    name = _pick_backend(backend, weight.device)
    flat = torch.cat([i.reshape(-1) for i in id_list]) if len(id_list) != 1 else id_list[0].reshape(-1)
    if name == "reference":
        out, reg = _reference_lookup(weight, flat, frequencies, float(reg_lambda), padding, bool(sparse))
    elif name == "triton":
        out, reg = _triton_op()(weight, flat, frequencies, float(reg_lambda), padding, bool(sparse))[:2]
    else:
        _ext.require_cpp(name)
        out, reg = torch.ops.din_ext.mba_embedding(weight, flat, frequencies, float(reg_lambda), padding,
                                                   bool(sparse))[:2]
    pieces = torch.split(out, [i.numel() for i in id_list]) if len(id_list) != 1 else [out]
    outs = tuple(p.view(*i.shape, weight.shape[1]) for p, i in zip(pieces, id_list))
    return (outs[0] if single else outs), reg.detach()


def check_inputs(weight, id_list, names, frequencies, reg_lambda, padding_idx) -> int:
    """Validates the arguments, naming the bad one; returns padding_idx as the ops take it (-1: none)."""
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
        if ids.numel() and not _validate.tracing():
            lo, hi = (int(v) for v in torch.aminmax(ids))
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


def _has_cuda_kernel() -> bool:
    return _ext.has_cpp() and torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, "CUDA")


@functools.lru_cache(maxsize=None)
def has_triton_kernels() -> bool:
    """Whether triton and din_ext.kernels.mba import."""
    try:
        from din_ext.kernels import mba  # noqa: F401
    except ImportError:
        return False
    return True


def _pick_backend(backend: str, device: torch.device) -> str:
    """_backend.resolve, plus what is particular to this op: a cuda build may lack its kernel (auto prefers triton
    on CUDA anyway, so that case means triton is not installed either)."""
    wanted = _backend.requested(backend)
    name = _backend.resolve(wanted, device)
    if name == "cuda" and not _has_cuda_kernel():
        if wanted == "cuda":
            raise RuntimeError("din_ext backend 'cuda' was built without the mba_embedding kernel; use "
                               "backend='triton' (pip install triton)")
        _backend._warn_once("mba-cuda", "din_ext: the cuda backend was built without mba_embedding and triton "
                                        "is not installed; running the slow pure-PyTorch reference on the GPU")
        return "reference"
    return name


# --- autograd of the compiled ops (cpu, cuda) and of the triton op -------------------------------------------------

def _setup_context(ctx, inputs, output):
    weight, ids, frequencies, reg_lambda, padding_idx, sparse = inputs
    out, reg, unique_ids, offsets, order = output
    ctx.mark_non_differentiable(reg, unique_ids, offsets, order)
    ctx.save_for_backward(weight, frequencies, unique_ids, offsets, order)
    ctx.reg_lambda, ctx.sparse = reg_lambda, sparse


def weight_grad(rows: torch.Tensor, unique_ids: torch.Tensor, shape, sparse: bool) -> torch.Tensor:
    """Weight's gradient from one row per distinct id: coalesced sparse COO, or dense with zeros elsewhere."""
    if sparse:
        return torch.sparse_coo_tensor(unique_ids[None], rows, shape, is_coalesced=True, check_invariants=False)
    return rows.new_zeros(shape).index_put_((unique_ids,), rows)


def _make_backward(backward_op):
    def backward(ctx, grad_out, *unused):
        weight, frequencies, unique_ids, offsets, order = ctx.saved_tensors
        rows = backward_op(grad_out.contiguous(), weight, frequencies, unique_ids, offsets, order, ctx.reg_lambda)
        grad = weight_grad(rows, unique_ids, weight.shape, ctx.sparse)
        if ctx.sparse:
            # AccumulateGrad re-wraps a sparse gradient that nothing else references, dropping its coalesced flag
            # (then every optimizer step would coalesce it again); a second reference makes it clone it, flag kept.
            ctx.sparse_grad = grad
        return grad, None, None, None, None, None
    return backward


def _fake_forward(weight, ids, frequencies, reg_lambda, padding_idx, sparse):
    ctx = torch.library.get_ctx()
    num_unique, num_kept = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    reg_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return (weight.new_empty(ids.shape[0], weight.shape[1]), weight.new_empty((), dtype=reg_dtype),
            ids.new_empty(num_unique, dtype=torch.long), ids.new_empty(num_unique + 1, dtype=torch.long),
            ids.new_empty(num_kept, dtype=torch.long))


def _fake_backward(grad_out, weight, frequencies, unique_ids, offsets, order, reg_lambda):
    return weight.new_empty(unique_ids.shape[0], weight.shape[1])


if _ext.has_cpp():
    torch.library.register_fake(OP_NAME)(_fake_forward)
    torch.library.register_fake(OP_NAME + "_backward")(_fake_backward)
    torch.library.register_autograd(OP_NAME, _make_backward(torch.ops.din_ext.mba_embedding_backward),
                                    setup_context=_setup_context)


@functools.lru_cache(maxsize=None)
def _triton_op():
    """Registers (once) and returns din_ext::mba_embedding_triton, the triton twin of din_ext::mba_embedding."""
    from torch.library import triton_op, wrap_triton

    from din_ext.kernels import mba as kernels

    @triton_op(TRITON_OP_NAME, mutates_args=())
    def forward(weight: torch.Tensor, ids: torch.Tensor, frequencies: torch.Tensor, reg_lambda: float,
                padding_idx: int, sparse: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                          torch.Tensor]:
        weight = weight if weight.stride(-1) == 1 else weight.contiguous()
        unique_ids, offsets, order = kernels.group_ids(ids, padding_idx)
        terms = kernels.reg_terms(weight, frequencies, unique_ids, launch=wrap_triton)
        reg = (0.5 * reg_lambda) * terms.sum()
        return weight.index_select(0, ids.long()), reg, unique_ids, offsets, order

    @triton_op(TRITON_OP_NAME + "_backward", mutates_args=())
    def backward(grad_out: torch.Tensor, weight: torch.Tensor, frequencies: torch.Tensor, unique_ids: torch.Tensor,
                 offsets: torch.Tensor, order: torch.Tensor, reg_lambda: float) -> torch.Tensor:
        weight = weight if weight.stride(-1) == 1 else weight.contiguous()
        return kernels.backward_rows(grad_out.contiguous(), weight, frequencies, unique_ids, offsets, order,
                                     reg_lambda, launch=wrap_triton)

    torch.library.register_fake(TRITON_OP_NAME)(_fake_forward)
    torch.library.register_fake(TRITON_OP_NAME + "_backward")(_fake_backward)
    torch.library.register_autograd(TRITON_OP_NAME, _make_backward(backward), setup_context=_setup_context)
    return forward


# --- the reference backend: plain PyTorch, slow (dense O(V D) work per step) ----------------------------------------

class _AddRegGrad(torch.autograd.Function):
    """Identity on the lookups whose backward adds the regularization gradient ``reg_grad`` to weight."""

    @staticmethod
    def forward(ctx, out, weight, reg_grad):
        ctx.reg_grad = reg_grad
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out, ctx.reg_grad, None


def _reference_lookup(weight, flat, frequencies, reg_lambda, padding_idx, sparse):
    padding = None if padding_idx < 0 else padding_idx
    freq = frequencies.clamp_min(1)
    with torch.no_grad():
        reg, dense = reference.mba_regularization(weight, flat, freq, reg_lambda, padding)
    reg = reg.to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    out = F.embedding(flat.long(), weight, padding_idx=padding, sparse=sparse)
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return out, reg
    if sparse:
        unique_ids = torch.unique(flat.long())
        if padding is not None:
            unique_ids = unique_ids[unique_ids != padding]
        reg_grad = torch.sparse_coo_tensor(unique_ids[None], dense[unique_ids], weight.shape, is_coalesced=True,
                                           check_invariants=False)
    else:
        reg_grad = dense
    return _AddRegGrad.apply(out, weight, reg_grad), reg
