"""Local-activation attention: the public function, its validation, and the registration of every backend (the
compiled op ``din_ext::local_activation_attention`` and its Triton twin ``din_ext::triton_local_activation_attention``
over kernels/attention.py), with one fake for both. The compiled op's autograd is C++ (csrc/attention_autograd.cpp,
no Python runs around it in a training step); the Triton op's is registered here.

The ops see one canonical form for padded and jagged inputs: keys as rows ``[N, D]`` plus ``starts``/``lengths``
per user (padded ``[B, L, D]`` keys are viewed as ``[B * L, D]`` with ``starts = b * L``), so every backend has a
single kernel and padding is skipped rather than masked.

Contract of the internal ops (what ``local_activation_attention`` guarantees before it calls one): the tensors have
the shapes, dtypes and device that ``_check`` enforces, and ``0 <= starts[b]``, ``starts[b] + lengths[b] <= N``,
``lengths[b] <= max_len`` (when ``max_len >= 0``). The compiled ops check their shapes again and what they can of the
values; the Triton ops trust the values.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from din_ext import _backend, _ext, _validate, reference
from din_ext.contract import ACT_PARAM_ROWS, acc_dtype, check_activation, check_normalization

OP = "local_activation_attention"
OP_NAME = f"din_ext::{OP}"
TRITON_OP_NAME = f"din_ext::triton_{OP}"


def local_activation_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    act_params: Optional[torch.Tensor] = None,
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
    backend: str = "auto",
    checked: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """DIN attention pooling of each user's behaviours by their local-activation scores against the query.

    query: (B, D), or (B, C, D): C >= 1 candidates per user, each scored against the user's one history (which
    the kernels read once per user, never tiled C times); keys: (B, L, D) padded with lengths (B,) int32/int64, or
    (N, D) jagged with offsets (B+1,);
    values: like keys with width Dv (default: keys); max_len: jagged only, an upper bound of the row lengths;
    weights/biases: the MLP Linear(4D, H1), ..., Linear(H_last, 1) in nn.Linear layout;
    act_params: (P, sum(H_i)) packed activation parameters (see din_ext.contract; None for sigmoid/relu).
    checked: the caller has validated the values of lengths/offsets (e.g. DIN.forward); they are not read again.
    Returns (out (B, Dv), or (B, C, Dv) for a 3-D query, stats (2, sum(H_i))): stats holds the Dice batch mean and
    biased variance of each hidden feature over the valid (candidate, behaviour) pairs in training mode (for the
    running statistics; C * sum(lengths) rows), zeros otherwise.
    """
    _validate.positive_finite(eps, "eps")
    weights, biases, act_params = _check(query, keys, weights, biases, act_params, lengths, offsets, values,
                                         max_len, activation, normalization, checked)
    name = _backend.resolve(backend, query.device, OP)
    if name == "reference":
        return reference.local_activation_attention(
            query, keys, weights, biases, act_params, lengths=lengths, offsets=offsets, values=values,
            max_len=max_len, activation=activation, normalization=normalization, score_scale=score_scale,
            training=training, eps=eps)
    if offsets is not None:
        offsets = offsets if offsets.dtype == torch.long else offsets.long()  # no aten::to call for int64
        starts, row_lengths = offsets[:-1], torch.diff(offsets)  # one op rather than two slices and a sub
        bound = -1 if max_len is None else int(max_len)
    else:
        batch, bound = keys.shape[0], keys.shape[1]
        starts = torch.arange(batch, device=keys.device, dtype=torch.long) * bound
        row_lengths = lengths if lengths.dtype == torch.long else lengths.long()
        keys = keys.reshape(batch * bound, keys.shape[2])
        if values is not None:
            values = values.reshape(batch * bound, values.shape[2])
    ops = torch.ops.din_ext
    op = ops.triton_local_activation_attention if name == "triton" else ops.local_activation_attention
    out, stats = op(query, keys, values, starts, row_lengths, bound, list(weights), list(biases), act_params,
                    activation, normalization, float(score_scale), bool(training), float(eps))[:2]
    return out, stats


def _check(query, keys, weights, biases, act_params, lengths, offsets, values, max_len, activation, normalization,
           checked):
    _validate.tensor(query, "query")
    if query.dim() not in (2, 3):
        raise ValueError(f"query must have shape [B, D] or [B, C, D] (C candidates per user), got "
                         f"{tuple(query.shape)}")
    _validate.floating(query, "query")
    batch, dim = query.shape[0], query.shape[-1]
    if batch == 0:
        raise ValueError("query: empty batch (B = 0); din_ext needs at least one user")
    if query.dim() == 3 and query.shape[1] == 0:
        raise ValueError("query: no candidates (C = 0); a [B, C, D] query needs C >= 1")
    check_activation(activation)
    check_normalization(normalization)
    if (lengths is None) == (offsets is None):
        raise ValueError("pass exactly one of lengths (padded keys [B, L, D]) or offsets (jagged keys [N, D])")
    _validate.tensor(keys, "keys")
    _validate.floating(keys, "keys", query)
    if lengths is not None:
        if keys.dim() != 3 or keys.shape[0] != batch or keys.shape[2] != dim:
            raise ValueError(f"keys must have shape [B={batch}, L, D={dim}] with lengths, got {tuple(keys.shape)}")
        if max_len is not None:
            raise ValueError("max_len is only for jagged inputs (offsets); padded keys give L = keys.shape[1]")
        _validate.index(lengths, "lengths", (batch,), query)
        if not checked:
            _validate.lengths_in_range(lengths, keys.shape[1])
        value_shape = (batch, keys.shape[1])
    else:
        if keys.dim() != 2 or keys.shape[1] != dim:
            raise ValueError(f"keys must have shape [N, D={dim}] with offsets, got {tuple(keys.shape)}")
        if max_len is not None and (not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 0):
            raise ValueError(f"max_len must be a non-negative int, got {max_len!r}")
        _validate.index(offsets, "offsets", (batch + 1,), query)
        if not checked:
            _validate.offsets_valid(offsets, keys.shape[0], max_len)
        value_shape = (keys.shape[0],)
    if values is not None:
        _validate.tensor(values, "values")
        _validate.floating(values, "values", query)
        if values.dim() != len(value_shape) + 1 or tuple(values.shape[:-1]) != value_shape:
            raise ValueError(f"values must have shape [{', '.join(map(str, value_shape))}, Dv] (like keys), got "
                             f"{tuple(values.shape)}")

    weights, biases = list(weights), list(biases)
    if not weights or len(weights) != len(biases):
        raise ValueError(f"weights and biases must be non-empty and of equal length, got {len(weights)} and "
                         f"{len(biases)}")
    fan_in = 4 * dim
    for i, (w, b) in enumerate(zip(weights, biases)):
        _validate.tensor(w, f"weights[{i}]", 2)
        _validate.floating(w, f"weights[{i}]", query)
        _validate.tensor(b, f"biases[{i}]", 1)
        _validate.floating(b, f"biases[{i}]", query)
        fan_out = 1 if i == len(weights) - 1 else w.shape[0]
        if tuple(w.shape) != (fan_out, fan_in):
            raise ValueError(f"weights[{i}] must have shape [{'1' if fan_out == 1 and i == len(weights) - 1 else 'H'}"
                             f", {fan_in}], got {tuple(w.shape)}")
        if tuple(b.shape) != (fan_out,):
            raise ValueError(f"biases[{i}] must have shape [{fan_out}], got {tuple(b.shape)}")
        fan_in = fan_out
    hidden_total = sum(w.shape[0] for w in weights[:-1])
    rows = ACT_PARAM_ROWS[activation]
    if act_params is None:
        if rows:
            raise ValueError(f"activation {activation!r} needs act_params of shape [{rows}, {hidden_total}]")
        act_params = query.new_empty(0, hidden_total)
    _validate.tensor(act_params, "act_params", 2)
    _validate.floating(act_params, "act_params", query)
    if tuple(act_params.shape) != (rows, hidden_total):
        raise ValueError(f"act_params must have shape [{rows}, {hidden_total}] for activation {activation!r}, got "
                         f"{tuple(act_params.shape)}")
    return weights, biases, act_params


# ---------------------------------------------------------------------------------------------------------------
# One fake for the compiled op and its Triton twin, and the Triton op's autograd


def _fake_forward(query, keys, values, starts, lengths, max_len, weights, biases, act_params, *config):
    """(out, stats, lse): the Triton op's outputs; the compiled op returns the first two. A query [B, D] gives
    out [B, Dv] and lse [B]; a query [B, C, D] gives out [B, C, Dv] and lse [B, C]."""
    value_dim = keys.shape[1] if values is None else values.shape[1]
    hidden_total = sum(w.shape[0] for w in weights[:-1])
    rows = tuple(query.shape[:-1])
    return (query.new_empty(*rows, value_dim), query.new_empty(2, hidden_total),
            query.new_empty(*rows, dtype=acc_dtype(query.dtype)))


def _fake_backward(grad_out, query, keys, values, starts, lengths, max_len, weights, biases, act_params, *saved):
    grad_values = keys.new_empty(0) if values is None else torch.empty_like(values)
    return (torch.empty_like(query), torch.empty_like(keys), grad_values, [torch.empty_like(w) for w in weights],
            [torch.empty_like(b) for b in biases], torch.empty_like(act_params))


def _register_autograd(name: str, backward_op, saved_outputs: Tuple[int, ...]) -> None:
    """Registers the autograd of the forward op ``name``: ``backward_op`` takes the forward's inputs with, after
    act_params, the forward outputs at ``saved_outputs``."""
    def setup_context(ctx, inputs, output):
        query, keys, values, starts, lengths, max_len, weights, biases, act_params, *config = inputs
        ctx.num_layers = len(weights)
        ctx.has_values = values is not None
        ctx.config = (max_len, *config)
        ctx.mark_non_differentiable(*output[1:])  # batch statistics (for the running averages only), lse
        ctx.save_for_backward(query, keys, values, starts, lengths, act_params, *[output[i] for i in saved_outputs],
                              *weights, *biases)

    def backward(ctx, grad_out, *unused):
        query, keys, values, starts, lengths, act_params, *rest = ctx.saved_tensors
        saved, layers = rest[:len(saved_outputs)], rest[len(saved_outputs):]
        weights, biases = layers[:ctx.num_layers], layers[ctx.num_layers:]
        max_len, *config = ctx.config
        grad_query, grad_keys, grad_values, grad_weights, grad_biases, grad_act = backward_op(
            grad_out, query, keys, values, starts, lengths, max_len, weights, biases, act_params, *saved, *config)
        return (grad_query, grad_keys, grad_values if ctx.has_values else None, None, None, None, list(grad_weights),
                list(grad_biases), grad_act, None, None, None, None, None)

    torch.library.register_autograd(name, backward, setup_context=setup_context)


def _fake_stored_forward(query, keys, values, starts, lengths, max_len, weights, biases, act_params, *config):
    """(out, stats, saved) of the cpu stored-activation op: saved holds z_j [N, wp_j] of every layer (wp_j: the
    width rounded up to one 32-byte vector), as csrc/cpu/attention.cpp lays it out."""
    pad = 32 // query.element_size()
    width = sum(-(-w.shape[0] // pad) * pad for w in weights)
    out, stats = _fake_forward(query, keys, values, starts, lengths, max_len, weights, biases, act_params)[:2]
    return out, stats, query.new_empty(keys.shape[0] * width)


if _ext.has_cpp():
    torch.library.register_fake(OP_NAME)(lambda *args: _fake_forward(*args)[:2])
    torch.library.register_fake(OP_NAME + "_backward")(_fake_backward)
    torch.library.register_fake("din_ext::_local_activation_attention_stored")(_fake_stored_forward)
    torch.library.register_fake("din_ext::_local_activation_attention_stored_backward")(
        lambda grad_out, query, keys, values, starts, lengths, max_len, weights, biases, act_params, stats, saved,
        *config: _fake_backward(grad_out, query, keys, values, starts, lengths, max_len, weights, biases, act_params))


def _register_triton() -> None:
    """Registers TRITON_OP_NAME and its backward over kernels/attention.py (run once, at import, where triton is
    installed). The forward's outputs: out, stats, and each user's log-sum-exp lse, which its backward takes."""
    from din_ext.kernels import attention as kernels
    from din_ext.ops._triton import define_op

    @define_op(TRITON_OP_NAME, _fake_forward)
    def forward(query: Tensor, keys: Tensor, values: Optional[Tensor], starts: Tensor, lengths: Tensor, max_len: int,
                weights: List[Tensor], biases: List[Tensor], act_params: Tensor, activation: str, normalization: str,
                score_scale: float, training: bool, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
        return kernels.forward(query, keys, values, starts, lengths, max_len, weights, biases, act_params, activation,
                               normalization, score_scale, training, eps)

    @define_op(TRITON_OP_NAME + "_backward", _fake_backward)
    def backward(grad_out: Tensor, query: Tensor, keys: Tensor, values: Optional[Tensor], starts: Tensor,
                 lengths: Tensor, max_len: int, weights: List[Tensor], biases: List[Tensor], act_params: Tensor,
                 out: Tensor, stats: Tensor, lse: Tensor, activation: str, normalization: str, score_scale: float,
                 training: bool, eps: float) -> Tuple[Tensor, Tensor, Tensor, List[Tensor], List[Tensor], Tensor]:
        return kernels.backward(grad_out, query, keys, values, starts, lengths, max_len, weights, biases, act_params,
                                out, stats, lse, activation, normalization, score_scale, training, eps)

    _register_autograd(TRITON_OP_NAME, backward, saved_outputs=(0, 1, 2))


if _backend.has_triton(OP):
    _register_triton()
