"""MBAEmbedding: an embedding table with the DIN paper's mini-batch-aware L2 regularization (section 5.1), and
count_frequencies, the n_j of one table from its id tensors (din_ext.data.count_frequencies counts every table of a
dataset at once)."""

from __future__ import annotations

from typing import Iterable, Optional, Tuple, Union

import torch
from torch import nn

from din_ext import _validate
from din_ext.ops import mba as mba_ops


def count_frequencies(ids: Union[torch.Tensor, Iterable[torch.Tensor]], num_embeddings: int) -> torch.Tensor:
    """Occurrences n_j of every id in the training data, for MBAEmbedding's ``frequencies``.

    ids: an int tensor of any shape, or an iterable of them (e.g. every batch's id tensors of one table).
    Returns (num_embeddings,) int64 counts; ids that never occur get 0, which the regularization counts as 1.
    """
    counts = torch.zeros(num_embeddings, dtype=torch.long)
    for k, chunk in enumerate([ids] if isinstance(ids, torch.Tensor) else ids):
        name = f"ids[{k}]" if not isinstance(ids, torch.Tensor) else "ids"
        _validate.tensor(chunk, name)
        if chunk.dtype not in _validate.INDEX_DTYPES:
            raise TypeError(f"{name} must be int32 or int64, got {chunk.dtype}")
        flat = chunk.reshape(-1).long().cpu()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_embeddings):
            raise ValueError(f"{name} must be in [0, {num_embeddings}), got ids in [{int(flat.min())}, "
                             f"{int(flat.max())}]")
        counts += torch.bincount(flat, minlength=num_embeddings)
    return counts


class MBAEmbedding(nn.Module):
    """Embedding table whose gradient includes the mini-batch-aware L2 regularization of the step's distinct ids.

    For the distinct non-padding ids U of a forward call, the backward adds ``reg_lambda * w_j / n_j`` to row j's
    summed data gradient, once per id however often it occurs: the gradient of
    ``R = reg_lambda / 2 * sum_{j in U} ||w_j||^2 / n_j``. Rows absent from the step and the padding row get nothing.
    Look all of a step's id tensors of the table up in ONE call, ``emb(candidate_ids, history_ids)``, so that a
    shared id counts once. R is in the gradient but not in the returned embeddings' loss: ``last_regularization``
    holds it (detached) for logging; add it to the LOGGED loss only, never to the one you backpropagate.

    num_embeddings, embedding_dim: V, D. frequencies: (V,) occurrences n_j (count_frequencies), values below 1 count
    as 1. sparse: weight.grad is a coalesced sparse COO tensor with one row per distinct id (for SparseAdam, sparse
    Adagrad, SGD); False gives a dense gradient. backend: "auto", "cpu", "triton", "cuda" or "reference".
    In eval mode or without grad, forward is a plain (validated) lookup and last_regularization is None.
    """

    count_frequencies = staticmethod(count_frequencies)

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        frequencies: torch.Tensor,
        reg_lambda: float,
        padding_idx: Optional[int] = None,
        sparse: bool = True,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if num_embeddings <= 0 or embedding_dim < 0:
            raise ValueError(f"num_embeddings must be > 0 and embedding_dim >= 0, got {num_embeddings}, "
                             f"{embedding_dim}")
        if not float(reg_lambda) >= 0:
            raise ValueError(f"reg_lambda must be >= 0, got {reg_lambda}")
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx must be in [-{num_embeddings}, {num_embeddings}), got {padding_idx}")
            padding_idx %= num_embeddings
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.reg_lambda, self.padding_idx, self.sparse, self.backend = float(reg_lambda), padding_idx, sparse, backend
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        self.register_buffer("frequencies", self._checked_frequencies(frequencies, device))
        # A (non-persistent) buffer, so that torch.export records its update as a buffer mutation.
        self.register_buffer("last_regularization", None, persistent=False)
        self.reset_parameters()

    def _checked_frequencies(self, frequencies, device) -> torch.Tensor:
        _validate.tensor(frequencies, "frequencies", dims=1)
        if frequencies.shape[0] != self.num_embeddings:
            raise ValueError(f"frequencies must have shape [{self.num_embeddings}], got {tuple(frequencies.shape)}")
        if frequencies.is_floating_point():
            if not torch.isfinite(frequencies).all():
                raise ValueError("frequencies must be finite")
            freq = frequencies.detach().to(device=device or frequencies.device, dtype=torch.float64)
        elif frequencies.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
            freq = frequencies.detach().to(device=device or frequencies.device, dtype=torch.long)
        else:
            raise TypeError(f"frequencies must be an integer or floating-point tensor, got {frequencies.dtype}")
        return freq.clamp_min(1)

    def reset_parameters(self) -> None:
        """N(0, 1) like nn.Embedding, padding row zero."""
        nn.init.normal_(self.weight)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight[self.padding_idx].fill_(0)

    def _apply(self, fn, *args, **kwargs):
        # A dtype cast of the module (.half(), .to(torch.bfloat16)) must not round the counts.
        frequencies = self.frequencies
        super()._apply(fn, *args, **kwargs)
        if self.frequencies.dtype not in mba_ops.FREQUENCY_DTYPES:
            self.frequencies = frequencies.to(self.frequencies.device)
        return self

    def forward(self, *ids: torch.Tensor, checked: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
        """ids: one or more int tensors of any shapes; checked: the caller has validated that they are in range
        (DIN.forward). Returns their embeddings (a tuple for several)."""
        if not ids:
            raise ValueError("MBAEmbedding needs at least one ids tensor")
        arg = ids[0] if len(ids) == 1 else ids
        if not (self.training and torch.is_grad_enabled() and self.weight.requires_grad):
            self.last_regularization = None
            names = ["ids"] if len(ids) == 1 else [f"ids[{k}]" for k in range(len(ids))]
            mba_ops.check_inputs(self.weight, list(ids), names, self.frequencies, self.reg_lambda, self.padding_idx,
                                 checked)
            outs = tuple(nn.functional.embedding(i, self.weight) for i in ids)
            return outs[0] if len(ids) == 1 else outs
        outs, self.last_regularization = mba_ops.mba_embedding(
            self.weight, arg, self.frequencies, self.reg_lambda, padding_idx=self.padding_idx, sparse=self.sparse,
            backend=self.backend, checked=checked)
        return outs

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, reg_lambda={self.reg_lambda}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s + f", sparse={self.sparse}, backend={self.backend!r}"
