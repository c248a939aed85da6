"""Pure-PyTorch reference of every din_ext op: the oracle of the tests and the baseline of the benchmarks.

Written for clarity, not speed: the textbook padded implementation (concatenate ``[q, k, q - k, q * k]`` for every
position, run the MLP, mask, pool), differentiable by autograd, float64-capable. See docs/design.md.

Activation parameters use the packed layout of the din_ext ops (din_ext.contract): ``act_params`` is
``[P, sum(H_i)]``, the per-feature parameters of all hidden layers side by side, with ``P = 5`` rows for Dice
(contract.DICE_ROWS: alpha, gamma, beta, running_mean, running_var), ``P = 1`` for PReLU (slope) and ``P = 0`` for
sigmoid and relu.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from din_ext.contract import PRELU_SLOPE, acc_dtype, check_activation, check_normalization


def dice(
    x: torch.Tensor,
    alpha: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    gamma: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
    training: bool = True,
    eps: float = 1e-8,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dice activation (DIN paper section 5.2), per feature (last dim).

    x: (..., H); mask: x.shape[:-1] bool, rows that are real (padding excluded), or None for all rows.
    Returns (y, mean, var): y has x's shape and is 0 on masked-out rows; mean and the biased var are the
    statistics used (batch statistics over the valid rows in training, the running ones in eval), detached.
    """
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    valid = None if mask is None else mask.reshape(-1)
    if training:
        rows = x if valid is None else x[valid]
        if rows.shape[0] > 0:
            mean = rows.mean(0)
            var = rows.var(0, unbiased=False)
        else:
            mean = x.new_zeros(shape[-1])
            var = x.new_zeros(shape[-1])
    else:
        mean, var = running_mean, running_var
    x_hat = (x - mean) / torch.sqrt(var + eps)
    if gamma is not None:
        x_hat = gamma * x_hat + beta
    p = torch.sigmoid(x_hat)
    y = p * x + (1 - p) * alpha * x
    if valid is not None:
        y = torch.where(valid[:, None], y, torch.zeros_like(y))
    return y.reshape(shape), mean.detach(), var.detach()


def _hidden_activation(
    z: torch.Tensor, mask: torch.Tensor, activation: str, params: torch.Tensor, training: bool, eps: float
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One hidden layer's activation on z (B, C, L, H) with mask (B, C, L); params (P, H) in the packed layout."""
    if activation == "dice":
        alpha, gamma, beta, running_mean, running_var = params
        y, mean, var = dice(z, alpha, running_mean, running_var, mask=mask, gamma=gamma, beta=beta,
                            training=training, eps=eps)
        return y, mean, var
    if activation == "sigmoid":
        return torch.sigmoid(z), None, None
    if activation == "prelu":
        return torch.where(z > 0, z, params[PRELU_SLOPE] * z), None, None
    check_activation(activation)
    return torch.relu(z), None, None


def jagged_to_padded(
    values: torch.Tensor, offsets: torch.Tensor, max_len: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """values: (N, D) jagged rows, offsets: (B+1,) -> (padded (B, L, D) with zeros, lengths (B,) int64)."""
    offsets = offsets.long()
    lengths = offsets[1:] - offsets[:-1]
    if max_len is None:
        max_len = int(lengths.max()) if lengths.numel() else 0
    positions = torch.arange(max_len, device=values.device)
    valid = positions[None, :] < lengths[:, None]
    index = (offsets[:-1, None] + positions[None, :]).clamp(max=max(values.shape[0] - 1, 0))
    if values.shape[0] == 0:
        padded = values.new_zeros(lengths.shape[0], max_len, values.shape[1])
    else:
        padded = torch.where(valid[..., None], values[index], torch.zeros((), dtype=values.dtype,
                                                                          device=values.device))
    return padded, lengths


def local_activation_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    act_params: torch.Tensor,
    *,
    lengths: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
    values: Optional[torch.Tensor] = None,
    max_len: Optional[int] = None,
    activation: str = "dice",
    normalization: str = "none",
    score_scale: float = 1.0,
    training: bool = False,
    eps: float = 1e-8,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """DIN local-activation attention pooling (docs/design.md), textbook padded form.

    query: (B, D), or (B, C, D) for C candidates per user scored against the user's one history; keys: (B, L, D)
    padded with lengths (B,), or (N, D) jagged with offsets (B+1,); values: like keys with width Dv, default keys;
    weights/biases: Linear(4D, H1), ..., Linear(H_last, 1) in nn.Linear layout; act_params: (P, sum(H_i)) packed.
    Returns (out (B, Dv) or (B, C, Dv), stats (2, sum(H_i))), stats being the Dice batch mean and biased variance
    over the valid (candidate, behaviour) pairs in training mode, zeros otherwise.
    """
    if offsets is not None:
        keys, lengths = jagged_to_padded(keys, offsets, max_len)
        if values is not None:
            values, _ = jagged_to_padded(values, offsets, keys.shape[1])
    values = keys if values is None else values
    single = query.dim() == 2
    if single:
        query = query[:, None, :]
    batch, candidates, dim = query.shape
    max_positions = keys.shape[1]
    # Every (candidate c, behaviour t) pair of a user is one row of the unit: the history is tiled C times.
    mask = torch.arange(max_positions, device=keys.device)[None, :] < lengths[:, None]  # (B, L)
    mask = mask[:, None, :].expand(batch, candidates, max_positions)  # (B, C, L)
    q = query[:, :, None, :].expand(batch, candidates, max_positions, dim)
    k = keys[:, None, :, :].expand(batch, candidates, max_positions, dim)
    h = torch.cat([q, k, q - k, q * k], dim=-1)  # (B, C, L, 4D), the paper's order
    hidden_total = sum(w.shape[0] for w in weights[:-1])
    stats = query.new_zeros(2, hidden_total)
    column = 0
    for weight, bias in zip(weights[:-1], biases[:-1]):
        width = weight.shape[0]
        z = F.linear(h, weight, bias)
        h, mean, var = _hidden_activation(z, mask, activation, act_params[:, column:column + width], training, eps)
        if activation == "dice" and training:
            stats[0, column:column + width] = mean
            stats[1, column:column + width] = var
        column += width
    scores = F.linear(h, weights[-1], biases[-1]).squeeze(-1) * score_scale  # (B, C, L)

    if normalization == "softmax":
        scores = scores.masked_fill(~mask, float("-inf"))
        w = torch.softmax(scores, dim=-1)
        w = torch.where(mask, w, torch.zeros_like(w))  # an empty row is all -inf: NaN -> 0
    else:
        check_normalization(normalization)
        w = torch.where(mask, scores, torch.zeros_like(scores))
    values = torch.where(mask[:, 0, :, None], values, torch.zeros_like(values))  # (B, L, Dv)
    out = torch.einsum("bcl,bld->bcd", w, values)  # (B, C, Dv)
    return (out[:, 0] if single else out), stats


def mba_regularization(
    weight: torch.Tensor,
    ids: Union[torch.Tensor, Sequence[torch.Tensor]],
    frequencies: torch.Tensor,
    reg_lambda: float,
    padding_idx: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mini-batch-aware L2 regularization (DIN paper section 5.1) of one step.

    weight: (V, D) table; ids: the step's id tensors of that table (any shapes; an id counts once however often and
    in however many tensors it occurs); frequencies: (V,) occurrences in the training set (>= 1).
    Returns (R, grad): R = reg_lambda / 2 * sum_{j in U} ||w_j||^2 / n_j over the distinct ids U, and its dense
    gradient (V, D): reg_lambda * w_j / n_j on the rows in U, zero elsewhere and on the padding row.
    """
    if isinstance(ids, torch.Tensor):
        ids = [ids]
    flat = torch.cat([i.reshape(-1).long() for i in ids]) if ids else weight.new_zeros(0, dtype=torch.long)
    present = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
    present[flat] = True
    if padding_idx is not None:
        present[padding_idx] = False
    scale = torch.where(present, reg_lambda / frequencies.to(weight.dtype), torch.zeros_like(weight[:, 0]))
    grad = scale[:, None] * weight
    value = 0.5 * (scale * (weight * weight).sum(1)).sum()
    return value, grad


def mba_embedding(
    weight: torch.Tensor,
    ids: Union[torch.Tensor, Sequence[torch.Tensor]],
    frequencies: torch.Tensor,
    reg_lambda: float,
    padding_idx: Optional[int] = None,
) -> Tuple[Union[torch.Tensor, Tuple[torch.Tensor, ...]], torch.Tensor]:
    """The MBA embedding as a loss term: lookups plus a differentiable R (DIN paper section 5.1).

    weight: (V, D); ids: a tensor or a list of tensors of one step; frequencies: (V,) n_j, values below 1 count as 1.
    Returns (embeddings, R): embeddings ids.shape + (D,) (a tuple for a list), R = reg_lambda / 2 * sum_{j in U}
    ||w_j||^2 / n_j. The gradient of ``loss + R`` is what din_ext.ops.mba_embedding's backward yields for ``loss``
    alone: the padding row gets neither a data nor a regularization gradient.
    """
    single = isinstance(ids, torch.Tensor)
    id_list = [ids] if single else list(ids)
    outs = tuple(F.embedding(i.long(), weight, padding_idx=padding_idx) for i in id_list)
    value, _ = mba_regularization(weight, id_list, frequencies.clamp_min(1), reg_lambda, padding_idx)
    return (outs[0] if single else outs), value


class _AddRegGrad(torch.autograd.Function):
    """Identity on the lookups whose backward adds the regularization gradient ``reg_grad`` to weight."""

    @staticmethod
    def forward(ctx, out, weight, reg_grad):
        ctx.reg_grad = reg_grad
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out, ctx.reg_grad, None


def mba_lookup(
    weight: torch.Tensor, ids: torch.Tensor, frequencies: torch.Tensor, reg_lambda: float, padding_idx: int,
    sparse: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The reference backend of din_ext.ops.mba_embedding: the lookups, whose backward adds R's gradient to weight's.

    Plain PyTorch, slow (dense O(V D) work per step). weight: (V, D); ids: (N,) int; frequencies: (V,) n_j (values
    below 1 count as 1); padding_idx: -1 for none. Returns (out (N, D), R) with R as din_ext.ops.mba_embedding's.
    """
    padding = None if padding_idx < 0 else padding_idx
    freq = frequencies.clamp_min(1)
    with torch.no_grad():
        reg, dense = mba_regularization(weight, ids, freq, reg_lambda, padding)
    reg = reg.to(acc_dtype(weight.dtype))
    out = F.embedding(ids.long(), weight, padding_idx=padding, sparse=sparse)
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return out, reg
    if sparse:
        unique_ids = torch.unique(ids.long())
        if padding is not None:
            unique_ids = unique_ids[unique_ids != padding]
        reg_grad = torch.sparse_coo_tensor(unique_ids[None], dense[unique_ids], weight.shape, is_coalesced=True,
                                           check_invariants=False)
    else:
        reg_grad = dense
    return _AddRegGrad.apply(out, weight, reg_grad), reg
