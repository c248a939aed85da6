"""Triton kernels of the MBA embedding (DIN paper section 5.1): the regularization value and the backward's
segmented reduction, over the distinct ids of a step grouped by a stable device sort.

R and its gradient are docs/design.md section 1.5, the grouping outputs (unique_ids, order, offsets) section 2.4.
The kernels compute reg_terms[u] = ||w_j||^2 / n_j and grad_rows[u] = (the sum of grad_out over id j's positions)
+ lambda * w_j / n_j for j = unique_ids[u].
Each program owns whole ids and sums their rows sequentially in position order, in float32 (float64 for float64
tables): no atomics, so results are bitwise reproducible. The grouping itself is torch.sort(stable=True) and
torch.unique_consecutive on the device (deterministic).
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from din_ext.contract import acc_dtype


@triton.jit
def mba_reg_terms_kernel(
    weight_ptr,  # [V, D] table
    freq_ptr,  # [V] frequencies n_j (float32, float64 or int64)
    unique_ptr,  # [U] int64 distinct ids
    terms_ptr,  # [U] out: ||w_j||^2 / n_j in the accumulation type
    num_unique,  # U
    dim,  # D
    stride_w,  # elements between two rows of weight
    ACC: tl.constexpr,  # accumulation type (tl.float32 or tl.float64)
    BLOCK_U: tl.constexpr,  # ids per program
    BLOCK_D: tl.constexpr,  # power of two >= D
):
    pid = tl.program_id(0)
    u = pid * BLOCK_U + tl.arange(0, BLOCK_U)
    d = tl.arange(0, BLOCK_D)
    u_mask = u < num_unique
    j = tl.load(unique_ptr + u, mask=u_mask, other=0)
    rows = tl.load(weight_ptr + j[:, None] * stride_w + d[None, :], mask=u_mask[:, None] & (d[None, :] < dim),
                   other=0.0).to(ACC)
    n = tl.maximum(tl.load(freq_ptr + j, mask=u_mask, other=1).to(ACC), 1.0)
    tl.store(terms_ptr + u, tl.sum(rows * rows, axis=1) / n, mask=u_mask)


@triton.jit
def mba_backward_kernel(
    grad_ptr,  # [N, D] gradient of the lookups
    weight_ptr,  # [V, D] table
    freq_ptr,  # [V] frequencies n_j
    unique_ptr,  # [U] int64 distinct ids
    offsets_ptr,  # [U + 1] int64 segment bounds into order
    order_ptr,  # [M] int64 positions grouped by id
    out_ptr,  # [U, D] out: gradient rows, dtype of weight
    dim,  # D
    stride_g,  # elements between two rows of grad
    stride_w,  # elements between two rows of weight
    reg_lambda,  # lambda
    ACC: tl.constexpr,  # accumulation type
    BLOCK_D: tl.constexpr,  # power of two >= D
):
    u = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < dim
    start = tl.load(offsets_ptr + u)
    end = tl.load(offsets_ptr + u + 1)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for k in range(start, end):
        pos = tl.load(order_ptr + k)
        acc += tl.load(grad_ptr + pos * stride_g + d, mask=d_mask, other=0.0).to(ACC)
    j = tl.load(unique_ptr + u)
    n = tl.maximum(tl.load(freq_ptr + j).to(ACC), 1.0)
    w = tl.load(weight_ptr + j * stride_w + d, mask=d_mask, other=0.0).to(ACC)
    acc += (reg_lambda / n) * w
    tl.store(out_ptr + u * dim + d, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


def _tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def group_ids(ids: torch.Tensor, padding_idx: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unique_ids [U], offsets [U + 1], order [M]) of ids [N] without the padding id (-1: none), as the ops define."""
    sorted_ids, order = torch.sort(ids.long(), stable=True)
    if padding_idx >= 0:
        keep = sorted_ids != padding_idx
        sorted_ids, order = sorted_ids[keep], order[keep]
    unique_ids, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return unique_ids, offsets, order


def reg_terms(weight: torch.Tensor, frequencies: torch.Tensor, unique_ids: torch.Tensor) -> torch.Tensor:
    """(U,) ||w_j||^2 / n_j per distinct id, in the accumulation dtype."""
    num_unique, dim = unique_ids.shape[0], weight.shape[1]
    terms = torch.empty(num_unique, dtype=acc_dtype(weight.dtype), device=weight.device)
    if num_unique:
        block_u = 16
        wrap_triton(mba_reg_terms_kernel)[(triton.cdiv(num_unique, block_u),)](
            weight, frequencies, unique_ids, terms, num_unique, dim, weight.stride(0),
            ACC=_tl(weight.dtype), BLOCK_U=block_u, BLOCK_D=triton.next_power_of_2(max(dim, 1)))
    return terms


def backward_rows(grad_out: torch.Tensor, weight: torch.Tensor, frequencies: torch.Tensor, unique_ids: torch.Tensor,
                  offsets: torch.Tensor, order: torch.Tensor, reg_lambda: float) -> torch.Tensor:
    """(U, D) summed gradient rows plus lambda * w_j / n_j, one per distinct id."""
    num_unique, dim = unique_ids.shape[0], weight.shape[1]
    out = torch.empty(num_unique, dim, dtype=weight.dtype, device=weight.device)
    if num_unique and dim:
        wrap_triton(mba_backward_kernel)[(num_unique,)](
            grad_out, weight, frequencies, unique_ids, offsets, order, out, dim, grad_out.stride(0),
            weight.stride(0), float(reg_lambda), ACC=_tl(weight.dtype), BLOCK_D=triton.next_power_of_2(dim))
    return out


def forward(weight: torch.Tensor, ids: torch.Tensor, frequencies: torch.Tensor, reg_lambda: float, padding_idx: int
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of din_ext::mba_embedding on Triton: ids [N] -> (out [N, D], reg, unique_ids, offsets, order)."""
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    unique_ids, offsets, order = group_ids(ids, padding_idx)
    terms = reg_terms(weight, frequencies, unique_ids)
    reg = (0.5 * reg_lambda) * terms.sum()
    return weight.index_select(0, ids.long()), reg, unique_ids, offsets, order


def backward(grad_out: torch.Tensor, weight: torch.Tensor, frequencies: torch.Tensor, unique_ids: torch.Tensor,
             offsets: torch.Tensor, order: torch.Tensor, reg_lambda: float) -> torch.Tensor:
    """Backward of ``forward``: (U, D) gradient rows of weight, one per distinct id."""
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    return backward_rows(grad_out.contiguous(), weight, frequencies, unique_ids, offsets, order, reg_lambda)
