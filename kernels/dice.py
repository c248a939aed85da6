"""Triton backend of din_ext::dice: Dice on x [N, H] with statistics over the rows where mask is true.

The forward and the exact backward (through the batch statistics in training; to the running statistics in eval)
are docs/design.md section 1.3. Per feature, with the sums over the valid rows that the backward needs:
t = g x (1 - alpha) p (1 - p); d alpha = sum g x (1 - p), d gamma = sum t xhat, d beta = sum t.
Rows are split into fixed blocks of BLOCK_N; each block's per-feature sums (count, block mean and centred sum of
squares for the statistics; d alpha, d gamma, d beta for the backward) go to a partial buffer merged in block order
(Chan et al.'s parallel formula for the variance), so results are bitwise reproducible. Math in float32 (float64
for float64 inputs).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from din_ext.contract import DICE_ALPHA, DICE_BETA, DICE_RUNNING_MEAN, DICE_RUNNING_VAR, acc_dtype
from din_ext.kernels.common import interpreting, sigmoid

BLOCK_N = 256  # rows per block: fixes the summation order
# The elementwise kernels walk their block in SUB_N-row steps: a whole [BLOCK_N, 64] tile held at once (its values,
# addresses and masks, 128 elements a thread with 4 warps) spills on sm_90 (bench/results/gpu_static.md). The
# moments kernel needs its block's mean before the centred sums, so it holds the tile, with MOMENTS_WARPS warps.
SUB_N = 32
MOMENTS_WARPS = 8


def _block_h(features: int) -> int:
    return min(max(16, triton.next_power_of_2(features)), 32 if interpreting() else 64)


@triton.jit
def _tile(X, MASK, N, H, first, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
          BLOCK_H: tl.constexpr):
    """Offsets, valid-row mask and feature mask of rows first .. first + ROWS - 1 of this program's block."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + first + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    valid = rows < N
    if HAS_MASK:
        valid = valid & (tl.load(MASK + rows, mask=rows < N, other=0) != 0)
    col_ok = cols < H
    return rows[:, None] * H + cols[None, :], valid, cols, col_ok


@triton.jit
def _constants_of(C, H, cols, col_ok):
    """alpha, gamma, beta, mean, rstd of the tile's features, [1, BLOCK_H] each."""
    alpha = tl.load(C + cols, mask=col_ok, other=0.0)[None, :]
    gamma = tl.load(C + H + cols, mask=col_ok, other=0.0)[None, :]
    beta = tl.load(C + 2 * H + cols, mask=col_ok, other=0.0)[None, :]
    mean = tl.load(C + 3 * H + cols, mask=col_ok, other=0.0)[None, :]
    rstd = tl.load(C + 4 * H + cols, mask=col_ok, other=1.0)[None, :]
    return alpha, gamma, beta, mean, rstd


@triton.jit
def _dice_moments_kernel(
    X,  # [N, H]
    MASK,  # [N] bool (HAS_MASK)
    COUNT,  # [blocks] valid rows per block
    MEAN,  # [blocks, H] block means
    M2,  # [blocks, H] centred sums of squares of the blocks
    N, H,
    HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    ACC = MEAN.dtype.element_ty
    offs, valid, cols, col_ok = _tile(X, MASK, N, H, 0, HAS_MASK, BLOCK_N, BLOCK_N, BLOCK_H)
    m = valid[:, None] & col_ok[None, :]
    x = tl.load(X + offs, mask=m, other=0.0).to(ACC)
    count = tl.sum(valid.to(ACC), 0)
    mean = tl.sum(x, 0) / tl.maximum(count, 1.0)
    d = tl.where(m, x - mean[None, :], 0.0)
    blk = tl.program_id(0)
    tl.store(MEAN + blk * H + cols, mean, mask=col_ok)
    tl.store(M2 + blk * H + cols, tl.sum(d * d, 0), mask=col_ok)
    if tl.program_id(1) == 0:
        tl.store(COUNT + blk + tl.arange(0, 1), tl.zeros([1], ACC) + count)


@triton.jit
def _dice_forward_kernel(
    X, MASK,
    C,  # [5, H] alpha, gamma, beta, mean, rstd (accumulation dtype)
    Y,  # [N, H]
    N, H,
    HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    ACC = C.dtype.element_ty
    for first in range(0, BLOCK_N, SUB_N):
        offs, valid, cols, col_ok = _tile(X, MASK, N, H, first, HAS_MASK, BLOCK_N, SUB_N, BLOCK_H)
        alpha, gamma, beta, mean, rstd = _constants_of(C, H, cols, col_ok)
        m = valid[:, None] & col_ok[None, :]
        x = tl.load(X + offs, mask=m, other=0.0).to(ACC)
        p = sigmoid(gamma * ((x - mean) * rstd) + beta)
        y = tl.where(m, x * (alpha + (1.0 - alpha) * p), 0.0)
        tl.store(Y + offs, y, mask=(offs < N * H) & col_ok[None, :])


@triton.jit
def _dice_backward_kernel(
    G,  # [N, H] dL/dy
    X, MASK,
    C,  # [5, H] feature constants, as in the forward
    K,  # [2, H] k0 = gamma rstd d beta / n, k1 = gamma rstd^2 d gamma / n (CORRECT)
    GX,  # [N, H] dL/dx (WRITE_DX)
    SUMS,  # [blocks, 3, H] per-block d alpha, d gamma, d beta (WRITE_SUMS)
    N, H,
    HAS_MASK: tl.constexpr,
    WRITE_SUMS: tl.constexpr,  # write the block's parameter-gradient sums
    WRITE_DX: tl.constexpr,  # write dx
    CORRECT: tl.constexpr,  # subtract the gradient through the batch statistics (training)
    BLOCK_N: tl.constexpr, SUB_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    ACC = C.dtype.element_ty
    d_alpha = tl.zeros([BLOCK_H], dtype=ACC)  # the block's sums, its SUB_N-row steps added in order
    d_gamma = tl.zeros([BLOCK_H], dtype=ACC)
    d_beta = tl.zeros([BLOCK_H], dtype=ACC)
    for first in range(0, BLOCK_N, SUB_N):
        offs, valid, cols, col_ok = _tile(X, MASK, N, H, first, HAS_MASK, BLOCK_N, SUB_N, BLOCK_H)
        alpha, gamma, beta, mean, rstd = _constants_of(C, H, cols, col_ok)
        m = valid[:, None] & col_ok[None, :]
        x = tl.load(X + offs, mask=m, other=0.0).to(ACC)
        g = tl.load(G + offs, mask=m, other=0.0).to(ACC)
        xhat = (x - mean) * rstd
        p = sigmoid(gamma * xhat + beta)
        t = g * x * (1.0 - alpha) * p * (1.0 - p)
        if WRITE_SUMS:
            d_alpha += tl.sum(g * x * (1.0 - p), 0)
            d_gamma += tl.sum(t * xhat, 0)
            d_beta += tl.sum(t, 0)
        if WRITE_DX:
            dx = g * (alpha + (1.0 - alpha) * p) + gamma * rstd * t
            if CORRECT:
                k0 = tl.load(K + cols, mask=col_ok, other=0.0)[None, :]
                k1 = tl.load(K + H + cols, mask=col_ok, other=0.0)[None, :]
                dx -= k0 + k1 * (x - mean)
            dx = tl.where(m, dx, 0.0)
            tl.store(GX + offs, dx, mask=(offs < N * H) & col_ok[None, :])
    if WRITE_SUMS:
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        base = SUMS + tl.program_id(0).to(tl.int64) * 3 * H + cols
        tl.store(base, d_alpha, mask=cols < H)
        tl.store(base + H, d_gamma, mask=cols < H)
        tl.store(base + 2 * H, d_beta, mask=cols < H)


def _grid(rows: int, features: int) -> Tuple[int, int]:
    return triton.cdiv(rows, BLOCK_N), triton.cdiv(features, _block_h(features))


def _constants(params: Tensor, mean: Tensor, var: Tensor, eps: float, acc: torch.dtype) -> Tensor:
    """[5, H] alpha, gamma, beta, mean, rstd (the kernels' C) in the accumulation dtype (rstd from var in float64)."""
    rstd = torch.rsqrt(var.double() + eps)
    return torch.cat([params[DICE_ALPHA:DICE_BETA + 1].to(acc), mean.to(acc)[None], rstd.to(acc)[None]])


def forward(x: Tensor, mask: Optional[Tensor], params: Tensor, training: bool, eps: float) -> Tuple[Tensor, Tensor]:
    """din_ext::dice on Triton: x [N, H], mask [N] bool or None, params [5, H] -> (y [N, H], stats [2, H])."""
    x, params = x.contiguous(), params.contiguous()
    rows, features = x.shape
    acc = acc_dtype(x.dtype)
    y = torch.empty_like(x)
    stats = x.new_zeros(2, features)
    if rows == 0:
        return y, stats
    grid = _grid(rows, features)
    has_mask = mask is not None
    mask_arg = mask.contiguous() if has_mask else x
    if training:
        count = torch.empty(grid[0], dtype=acc, device=x.device)
        block_mean = torch.empty(grid[0], features, dtype=acc, device=x.device)
        block_m2 = torch.empty(grid[0], features, dtype=acc, device=x.device)
        wrap_triton(_dice_moments_kernel)[grid](x, mask_arg, count, block_mean, block_m2, rows, features,
                                                HAS_MASK=has_mask, BLOCK_N=BLOCK_N, BLOCK_H=_block_h(features),
                                                num_warps=MOMENTS_WARPS)
        count = count.double()[:, None]
        total = count.sum()
        mean = (count * block_mean.double()).sum(0) / total.clamp(min=1)
        m2 = block_m2.double().sum(0) + (count * (block_mean.double() - mean) ** 2).sum(0)
        stats[0] = torch.where(total > 0, mean, 0)
        stats[1] = torch.where(total > 0, m2 / total.clamp(min=1), 0)
        consts = _constants(params, stats[0], stats[1], eps, acc)
    else:
        consts = _constants(params, params[DICE_RUNNING_MEAN], params[DICE_RUNNING_VAR], eps, acc)
    wrap_triton(_dice_forward_kernel)[grid](x, mask_arg, consts, y, rows, features, HAS_MASK=has_mask,
                                            BLOCK_N=BLOCK_N, SUB_N=SUB_N, BLOCK_H=_block_h(features))
    return y, stats


def backward(grad_y: Tensor, x: Tensor, mask: Optional[Tensor], params: Tensor, stats: Tensor, training: bool,
             eps: float) -> Tuple[Tensor, Tensor]:
    """Backward of ``forward``: (grad_x [N, H], grad_params [5, H])."""
    grad_y, x, params = grad_y.contiguous(), x.contiguous(), params.contiguous()
    rows, features = x.shape
    acc = acc_dtype(x.dtype)
    grad_x = torch.zeros_like(x)
    grad_params = torch.zeros_like(params)
    if rows == 0:
        return grad_x, grad_params
    mean, var = (stats[0], stats[1]) if training else (params[DICE_RUNNING_MEAN], params[DICE_RUNNING_VAR])
    consts = _constants(params, mean, var, eps, acc)
    grid = _grid(rows, features)
    has_mask = mask is not None
    mask_arg = mask.contiguous() if has_mask else x
    sums = torch.empty(grid[0], 3, features, dtype=acc, device=x.device)
    launch = dict(HAS_MASK=has_mask, BLOCK_N=BLOCK_N, SUB_N=SUB_N, BLOCK_H=_block_h(features))
    # Eval: dx needs no sums, one pass does both. Training: the sums first, then dx with the statistics term.
    wrap_triton(_dice_backward_kernel)[grid](grad_y, x, mask_arg, consts, consts, grad_x, sums, rows, features,
                                             WRITE_SUMS=True, WRITE_DX=not training, CORRECT=False, **launch)
    total = sums.sum(0, dtype=torch.float64)  # d alpha, d gamma, d beta
    grad_params[DICE_ALPHA:DICE_BETA + 1] = total.to(params.dtype)
    gamma, rstd = consts[1].double(), consts[4].double()  # rows of C, see _constants
    if not training:
        grad_params[DICE_RUNNING_MEAN] = (-gamma * rstd * total[2]).to(params.dtype)
        grad_params[DICE_RUNNING_VAR] = (-0.5 * gamma * rstd * rstd * total[1]).to(params.dtype)
        return grad_x, grad_params
    count = (mask.sum() if has_mask else torch.tensor(rows, device=x.device)).double().clamp(min=1)
    scale = gamma * rstd / count
    k = torch.stack([scale * total[2], scale * rstd * total[1]]).to(acc)
    wrap_triton(_dice_backward_kernel)[grid](grad_y, x, mask_arg, consts, k, grad_x, sums, rows, features,
                                             WRITE_SUMS=False, WRITE_DX=True, CORRECT=True, **launch)
    return grad_x, grad_params
