"""Dice: the public function, its validation, and the registration of every backend (the compiled op
``din_ext::dice`` and its Triton twin ``din_ext::triton_dice`` over kernels/dice.py), with one fake for both; the
compiled op's autograd is C++ (csrc/dice_autograd.cpp: no Python runs in its forward or backward), the Triton twin's
is registered here with the same gradient.

Contract of the internal ops: x [N, H] floating, mask [N] bool or None, params [5, H] (contract.DICE_ROWS) of x's
dtype and device; they return (y [N, H], stats [2, H]) with the batch statistics in training (zeros in eval).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from din_ext import _backend, _ext, _validate, reference

OP = "dice"
OP_NAME = f"din_ext::{OP}"
TRITON_OP_NAME = f"din_ext::triton_{OP}"


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
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dice (DIN paper section 5.2) per feature, with batch statistics over the valid rows in training.

    x: (..., H); mask: x.shape[:-1] bool (True = real row) or None; alpha, running_mean, running_var, gamma, beta:
    (H,). Returns (y, mean, var): y like x, 0 on masked-out rows; the batch (training) or running (eval) mean and
    biased variance that were used.
    """
    _validate.tensor(x, "x")
    if x.dim() < 2:
        raise ValueError(f"x must have shape [N, H] or [B, L, H], got {tuple(x.shape)}")
    _validate.floating(x, "x")
    features = x.shape[-1]
    _validate.positive_finite(eps, "eps")
    for name, t in (("alpha", alpha), ("running_mean", running_mean), ("running_var", running_var),
                    ("gamma", gamma), ("beta", beta)):
        if t is None and name in ("gamma", "beta"):
            continue
        _validate.tensor(t, name)
        _validate.floating(t, name, x, "x")
        if tuple(t.shape) != (features,):
            raise ValueError(f"{name} must have shape [{features}], got {tuple(t.shape)}")
    if (gamma is None) != (beta is None):
        raise ValueError("pass both gamma and beta (affine Dice) or neither")
    if mask is not None:
        _validate.tensor(mask, "mask")
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:-1]) or mask.device != x.device:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(x.shape[:-1])} on {x.device}, got "
                             f"{mask.dtype} {tuple(mask.shape)} on {mask.device}")
    name = _backend.resolve(backend, x.device, OP)
    if name == "reference":
        return reference.dice(x, alpha, running_mean, running_var, mask=mask, gamma=gamma, beta=beta,
                              training=training, eps=eps)
    op = torch.ops.din_ext.triton_dice if name == "triton" else torch.ops.din_ext.dice
    params = pack_params(alpha, gamma, beta, running_mean, running_var)
    flat_mask = None if mask is None else mask.reshape(-1)
    # (N, H) as it is: a reshape to its own shape would still add an autograd node on the way in and out.
    flat = x.dim() == 2
    y, stats = op(x if flat else x.reshape(-1, features), flat_mask, params, bool(training), float(eps))
    y = y if flat else y.reshape(x.shape)
    if not training:
        return y, running_mean.detach(), running_var.detach()
    mean, var = stats.unbind(0)
    return y, mean, var


def pack_params(alpha, gamma, beta, running_mean, running_var) -> torch.Tensor:
    """(5, H) Dice parameters in the ops' packed row order (contract.DICE_ROWS); gamma = 1, beta = 0 when not
    affine."""
    return pack_layers([(alpha, gamma, beta, running_mean, running_var)])


def pack_layers(layers: Sequence[Tuple[Tensor, Optional[Tensor], Optional[Tensor], Tensor, Tensor]]) -> Tensor:
    """(5, H_1 + ... + H_n): the packed parameters (pack_params) of Dice layers given as (alpha, gamma, beta,
    running_mean, running_var), side by side, built by one cat of the rows (a training step packs them every call;
    stacks and cats of each layer took ~4 ops a layer)."""
    width = sum(layer[0].shape[0] for layer in layers)
    if all(layer[1] is None for layer in layers):
        pieces = [layer[0] for layer in layers] + [_identity_rows(layers[0][0], width)]
    else:
        pieces = [layer[0] for layer in layers]
        for k, value in ((1, 1.0), (2, 0.0)):  # gamma, beta: 1 and 0 for a layer that is not affine
            pieces += [layer[k] if layer[k] is not None else layer[0].new_full(layer[0].shape, value)
                       for layer in layers]
    pieces += [layer[3] for layer in layers] + [layer[4] for layer in layers]
    return torch.cat(pieces).view(5, width)


_IDENTITY_ROWS: Dict[Tuple[torch.dtype, torch.device, int], Tensor] = {}


def _identity_rows(like: Tensor, width: int) -> Tensor:
    """[1] * width + [0] * width: the gamma and beta rows of Dice that is not affine, flat, like ``like``; made
    once per dtype, device and width (a constant input of the cat: nothing writes it), anew while tracing or in
    inference mode."""
    key = (like.dtype, like.device, width)
    rows = _IDENTITY_ROWS.get(key)
    if rows is None:
        rows = torch.cat([like.new_ones(width), like.new_zeros(width)]).detach()
        if _validate.tracing() or torch.is_inference_mode_enabled():
            return rows
        _IDENTITY_ROWS[key] = rows
    return rows


# ---------------------------------------------------------------------------------------------------------------
# One fake for the compiled op and its Triton twin; the Triton twin's autograd (the compiled op's is C++)


def _fake_forward(x, mask, params, training, eps):
    return torch.empty_like(x), x.new_empty(2, x.shape[1])


def _fake_backward(grad_y, x, mask, params, stats, training, eps):
    return torch.empty_like(x), torch.empty_like(params)


def _register_autograd(name: str, backward_op) -> None:
    """Registers the autograd of the forward op ``name`` with its backward op ``backward_op``: the Triton twin's; it
    returns the gradients csrc/dice_autograd.cpp returns for the compiled op."""
    def setup_context(ctx, inputs, output):
        x, mask, params, training, eps = inputs
        ctx.config = (training, eps)
        ctx.mark_non_differentiable(output[1])  # batch statistics, for the running averages only
        ctx.save_for_backward(x, mask, params, output[1])

    def backward(ctx, grad_y, grad_stats):
        x, mask, params, stats = ctx.saved_tensors
        training, eps = ctx.config
        grad_x, grad_params = backward_op(grad_y, x, mask, params, stats, training, eps)
        return grad_x, None, grad_params, None, None

    torch.library.register_autograd(name, backward, setup_context=setup_context)


if _ext.has_cpp():
    torch.library.register_fake(OP_NAME)(_fake_forward)
    torch.library.register_fake(OP_NAME + "_backward")(_fake_backward)


def _register_triton() -> None:
    """Registers TRITON_OP_NAME and its backward over kernels/dice.py (run once, at import, where triton is
    installed)."""
    from din_ext.kernels import dice as kernels
    from din_ext.ops._triton import define_op

    @define_op(TRITON_OP_NAME, _fake_forward)
    def forward(x: Tensor, mask: Optional[Tensor], params: Tensor, training: bool, eps: float) -> Tuple[Tensor, Tensor]:
        return kernels.forward(x, mask, params, training, eps)

    @define_op(TRITON_OP_NAME + "_backward", _fake_backward)
    def backward(grad_y: Tensor, x: Tensor, mask: Optional[Tensor], params: Tensor, stats: Tensor, training: bool,
                 eps: float) -> Tuple[Tensor, Tensor]:
        return kernels.backward(grad_y, x, mask, params, stats, training, eps)

    _register_autograd(TRITON_OP_NAME, backward)


if _backend.has_triton(OP):
    _register_triton()
