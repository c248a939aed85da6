"""DIN layers: thin nn.Modules that hold the parameters and call the din_ext ops."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from din_ext import _validate, ops
from din_ext.contract import ACT_PARAM_ROWS, check_activation, check_normalization
from din_ext.ops.dice import pack_layers, pack_params


def _update_running_stats(modules: Sequence["Dice"], mean: torch.Tensor, var: torch.Tensor,
                          count: Union[torch.Tensor, int]) -> None:
    """nn.BatchNorm1d's update (unbiased variance) of Dice layers whose batch statistics over the same ``count``
    rows are mean and var side by side (sum of their widths), skipped for batches of fewer than two valid rows.
    count: a 0-d tensor (counted on the device, no synchronization: about 12 ops a layer), or an int known on the
    host (with a shared fixed momentum, every layer at once: 4 ops in all)."""
    widths = [m.num_features for m in modules]
    # split_with_sizes: Tensor.split's op without its Python wrapper (three calls a step for DIN's attention)
    means, variances = ((mean.split_with_sizes(widths), var.split_with_sizes(widths)) if len(modules) > 1
                        else ([mean], [var]))
    momenta = {m.momentum for m in modules}
    with torch.no_grad():
        if not isinstance(count, torch.Tensor) and len(momenta) == 1 and None not in momenta:
            if count > 1:
                unbiased = var * count / (count - 1)
                unbiased = unbiased.split_with_sizes(widths) if len(modules) > 1 else [unbiased]
                torch._foreach_lerp_([m.running_mean for m in modules] + [m.running_var for m in modules],
                                     [*means, *unbiased], momenta.pop())
                torch._foreach_add_([m.num_batches_tracked for m in modules], 1)
            return
        for module, layer_mean, layer_var in zip(modules, means, variances):
            momentum = module.momentum
            if momentum is None:  # cumulative moving average, as nn.BatchNorm1d(momentum=None)
                momentum = 1.0 / (module.num_batches_tracked + 1).to(layer_mean.dtype)
            if not isinstance(count, torch.Tensor):
                if count > 1:
                    module.running_mean.lerp_(layer_mean, momentum)
                    module.running_var.lerp_(layer_var * count / (count - 1), momentum)
                    module.num_batches_tracked.add_(1)
                continue
            n = count.to(layer_mean.dtype)
            update = count > 1
            unbiased = layer_var * n / (n - 1).clamp_min(1)
            module.running_mean.copy_(torch.where(update, torch.lerp(module.running_mean, layer_mean, momentum),
                                                  module.running_mean))
            module.running_var.copy_(torch.where(update, torch.lerp(module.running_var, unbiased, momentum),
                                                 module.running_var))
            module.num_batches_tracked.add_(update.to(module.num_batches_tracked.dtype))


def check_dice_options(num_features: int, eps: float, momentum: Optional[float]) -> None:
    """Raises ValueError naming the argument: num_features a positive int, eps finite and > 0, momentum in [0, 1]
    or None (a cumulative average)."""
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
        raise ValueError(f"Dice num_features must be a positive int, got {num_features!r}")
    _validate.positive_finite(eps, "Dice eps")  # > 0 keeps 1/sqrt(var + eps) finite for a feature of zero variance
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                 or not 0 <= momentum <= 1):
        raise ValueError(f"Dice momentum must be in [0, 1], or None for a cumulative average, got {momentum!r}")


class Dice(nn.Module):
    """Dice activation (DIN paper section 5.2) with batch statistics over valid rows only.

    ``p = sigmoid((x - mean) / sqrt(var + eps))`` (``sigmoid(gamma * ... + beta)`` when affine),
    ``y = p * x + (1 - p) * alpha * x`` per feature. Training uses the batch mean and biased variance over the rows
    where ``mask`` is True and updates the running statistics like nn.BatchNorm1d (``momentum=None``: a cumulative
    average); eval uses the running ones. eps must be finite and > 0, momentum in [0, 1] or None.
    """

    def __init__(self, num_features: int, eps: float = 1e-8, momentum: Optional[float] = 0.1, affine: bool = False):
        super().__init__()
        check_dice_options(num_features, eps, momentum)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.alpha = nn.Parameter(torch.zeros(num_features))
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.backend = "auto"

    def packed_params(self) -> torch.Tensor:
        """(5, H): alpha, gamma, beta, running_mean, running_var (the ops' packed layout)."""
        return pack_params(self.alpha, self.weight, self.bias, self.running_mean, self.running_var)

    def update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: Union[torch.Tensor, int]) -> None:
        """Fold one batch's statistics (biased var over ``count`` rows: a 0-d tensor or an int) into the running
        ones."""
        _update_running_stats([self], mean, var, count)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (N, H) or (B, L, H); mask: x.shape[:-1] bool, True on real rows. Masked-out rows give 0."""
        y, mean, var = ops.dice(x, self.alpha, self.running_mean, self.running_var, mask=mask, gamma=self.weight,
                                beta=self.bias, training=self.training, eps=self.eps, backend=self.backend)
        if self.training:
            self.update_running_stats(mean, var, mask.sum() if mask is not None else x.numel() // x.shape[-1])
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"


def make_activation(name: str, width: int) -> nn.Module:
    """The activation module ``name`` (a contract.ACTIVATIONS) of a hidden layer of ``width`` features."""
    check_activation(name)
    if name == "dice":
        return Dice(width)
    if name == "prelu":
        return nn.PReLU(width)
    return nn.Sigmoid() if name == "sigmoid" else nn.ReLU()


class LocalActivationUnit(nn.Module):
    """DIN's local activation unit with attention pooling (docs/design.md).

    Scores every behaviour k of a user against the query q with ``MLP([q, k, q - k, q * k])`` and returns the
    score-weighted sum of the values (unnormalized, as in the paper, or softmax-normalized).
    Attributes: ``.linears`` (Linear(4D, H1), ...), ``.activations`` (one per hidden layer), ``.out``
    (Linear(H_last, 1)).
    """

    def __init__(
        self,
        embed_dim: int,
        hidden_units: Sequence[int] = (80, 40),
        activation: str = "dice",
        normalization: str = "none",
        score_scale: float = 1.0,
        backend: str = "auto",
    ):
        super().__init__()
        check_activation(activation)
        check_normalization(normalization)
        self.embed_dim = embed_dim
        self.activation = activation
        self.normalization = normalization
        self.score_scale = float(score_scale)
        self.backend = backend
        widths = [4 * embed_dim, *hidden_units]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activations = nn.ModuleList(make_activation(activation, h) for h in hidden_units)
        self.out = nn.Linear(widths[-1], 1)

    def act_params(self) -> Optional[torch.Tensor]:
        """Activation parameters of all hidden layers in the ops' packed (P, sum(H_i)) layout."""
        if not len(self.activations):
            rows = ACT_PARAM_ROWS[self.activation]
            return self.out.weight.new_zeros(rows, 0) if rows else None
        if self.activation == "dice":
            return pack_layers([(act.alpha, act.weight, act.bias, act.running_mean, act.running_var)
                                for act in self.activations])
        if self.activation == "prelu":
            return torch.cat([act.weight.expand(lin.out_features)
                              for act, lin in zip(self.activations, self.linears)])[None]
        return None

    def forward(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        lengths: Optional[torch.Tensor] = None,
        offsets: Optional[torch.Tensor] = None,
        values: Optional[torch.Tensor] = None,
        max_len: Optional[int] = None,
        *,
        checked: bool = False,
    ) -> torch.Tensor:
        """query: (B, D), or (B, C, D) for C candidates per user against the user's one history; keys: (B, L, D)
        with lengths (B,), or (N, D) jagged with offsets (B+1,) and optional max_len; values: like keys (default
        keys). checked: the caller has validated the values of lengths/offsets (DIN.forward). Returns (B, Dv) or
        (B, C, Dv); a user without behaviours gets zeros. Dice's running statistics count every valid
        (candidate, behaviour) pair: C * sum(lengths) rows."""
        training = self.training and self.activation == "dice"
        linears, activations, last = self.linears, self.activations, self.out  # Module.__getattr__ once each
        eps = activations[0].eps if self.activation == "dice" and len(activations) else 1e-8
        params = self.act_params()
        out, stats = ops.local_activation_attention(
            query, keys, [lin.weight for lin in linears] + [last.weight],
            [lin.bias for lin in linears] + [last.bias], params, lengths=lengths, offsets=offsets,
            values=values, max_len=max_len, activation=self.activation, normalization=self.normalization,
            score_scale=self.score_scale, training=training, eps=eps, backend=self.backend, checked=checked)
        if training:
            count = lengths.sum() if lengths is not None else offsets[-1]
            if count.device.type == "cpu" and not _validate.tracing():
                count = int(count)  # no synchronization on the cpu, and the running stats' short path
            if query.dim() == 3:
                count = count * query.shape[1]
            self._update_running_stats(stats, count)
        return out

    def _update_running_stats(self, stats: torch.Tensor, count: Union[torch.Tensor, int]) -> None:
        """Folds the op's batch statistics (2, sum(H_i)) into each Dice layer's running ones."""
        _update_running_stats(list(self.activations), stats[0], stats[1], count)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, activation={self.activation!r}, normalization={self.normalization!r}, "
                f"score_scale={self.score_scale}, backend={self.backend!r}")
