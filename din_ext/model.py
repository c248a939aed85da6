"""``din_ext.DIN``: the Deep Interest Network (and the paper's BaseModel) as a thin nn.Module over the din_ext ops.

Inputs are ``din_ext.data.Interactions`` batches: user-profile ids, candidate item ids, jagged behaviour histories
and optional dense features. Every field has one embedding table (row 0 is padding/OOV and stays zero); behaviour
fields share the candidate item fields' tables. The query of the local activation unit is the concatenation of the
candidate's embeddings of ``schema.history_fields``, its keys the same concatenation for every behaviour.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import zipfile
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from din_ext import _validate
from din_ext.contract import check_activation, check_normalization
from din_ext.data.core import Interactions, Schema
from din_ext.mba import MBAEmbedding
from din_ext.modules import Dice, LocalActivationUnit, make_activation
from din_ext.ops import mba as mba_ops

logger = logging.getLogger("din_ext")

POOLINGS = ("attention", "sum")
CHECKPOINT_FORMAT = 1


def _vocabulary_to_data(vocabulary: Sequence[Any]) -> Union[torch.Tensor, list]:
    """Rows 1.. of a vocabulary: an int64 tensor for integer ids (compact), else a list of strings."""
    rest = list(vocabulary)[1:]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in rest):
        return torch.tensor(rest, dtype=torch.long)
    return [str(v) for v in rest]


def schema_to_dict(schema: Schema) -> Dict[str, Any]:
    """A Schema as plain data (dicts, tuples, tensors) that ``torch.load(weights_only=True)`` reads back."""
    return {"user_fields": dict(schema.user_fields), "item_fields": dict(schema.item_fields),
            "history_fields": tuple(schema.history_fields), "dense_dim": int(schema.dense_dim),
            "tasks": tuple(schema.tasks), "frequencies": dict(schema.frequencies),
            "vocabularies": {f: _vocabulary_to_data(v) for f, v in schema.vocabularies.items()}}


def schema_from_dict(data: Mapping[str, Any]) -> Schema:
    """The Schema of ``schema_to_dict``'s data; data written before vocabularies existed gives none."""
    vocabularies = {f: [None, *(v.tolist() if isinstance(v, torch.Tensor) else v)]
                    for f, v in dict(data.get("vocabularies", {})).items()}
    return Schema(user_fields=dict(data["user_fields"]), item_fields=dict(data["item_fields"]),
                  history_fields=tuple(data["history_fields"]), dense_dim=int(data["dense_dim"]),
                  tasks=tuple(data["tasks"]), frequencies=dict(data.get("frequencies", {})),
                  vocabularies=vocabularies)


class SharedEmbedding(nn.Embedding):
    """nn.Embedding whose forward looks up several id tensors in one table: ``forward(ids, ...) -> (emb, ...)``.

    The same call signature as ``din_ext.MBAEmbedding``, so the model treats both alike (``checked``: the caller has
    validated the ids; nn.Embedding checks them in its kernel anyway, without a synchronization).
    sparse: in training mode with a gradient recorded, weight's gradient is a coalesced sparse COO tensor with one row
    per distinct non-padding id of the call (``din_ext.ops.mba_embedding`` without regularization), so that a
    row-wise optimizer (``din_ext.training.RowAdam``) steps O(ids x D) whatever the table size; False: nn.Embedding's
    dense gradient, O(V x D) per step. In eval mode or without a gradient (serving, export) both are nn.Embedding's
    plain lookup.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None,
                 sparse: bool = False):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.sparse = sparse

    @property
    def sparse(self) -> bool:
        return self._sparse_grad

    @sparse.setter
    def sparse(self, value: bool) -> None:
        self._sparse_grad = bool(value)
        self._sync_frequencies()

    def train(self, mode: bool = True) -> "SharedEmbedding":
        super().train(mode)
        self._sync_frequencies()
        return self

    def _sync_frequencies(self) -> None:
        # nn.Embedding's own sparse gradient is uncoalesced and does not trace for torch.compile; the MBA op's is
        # coalesced, deterministic and traces. Its n_j (unused without regularization) are a non-persistent buffer
        # that exists only while sparse and training: the state_dict is the same either way, and an exported eval
        # model carries no trace of it.
        wanted = self._sparse_grad and self.training
        current = self._buffers.get("unit_frequencies")
        if wanted and current is None:
            ones = torch.ones(self.num_embeddings, dtype=torch.long, device=self.weight.device)
            self.register_buffer("unit_frequencies", ones, persistent=False)
        elif not wanted:
            self.register_buffer("unit_frequencies", None, persistent=False)

    def forward(self, *ids: torch.Tensor, checked: bool = False) -> Tuple[torch.Tensor, ...]:
        frequencies, weight = self.unit_frequencies, self.weight  # each one Module.__getattr__ a call
        if frequencies is not None and torch.is_grad_enabled() and weight.requires_grad:
            out, _ = mba_ops.mba_embedding(weight, list(ids), frequencies, 0.0, padding_idx=self.padding_idx,
                                           sparse=True, checked=checked)
            return out
        if len(ids) == 1:
            return (super().forward(ids[0]),)
        flat = super().forward(torch.cat([i.reshape(-1) for i in ids]))
        parts = flat.split_with_sizes([i.numel() for i in ids])
        return tuple(part.view(*i.shape, self.embedding_dim) for part, i in zip(parts, ids))  # not -1: N may be 0


class DIN(nn.Module):
    """Deep Interest Network (Zhou et al., KDD 2018); ``pooling="sum"`` is the paper's BaseModel.

    schema: the dataset's fields (``din_ext.data.Schema``); embed_dim: one width for every field, or a mapping
    field -> width (history fields take their item field's width); attention_hidden: hidden widths of the local
    activation unit; tower_hidden: hidden widths of the MLP on [user, candidate, interest, dense]; activation: of
    both ("dice", "prelu", "relu", "sigmoid"); pooling: "attention" (DIN) or "sum" (BaseModel);
    normalization/score_scale: of the attention weights (docs/design.md); use_dense: feed the dense features, if the
    schema has them; mba_lambda > 0 builds the tables as ``din_ext.MBAEmbedding`` with the schema's frequencies;
    embedding_std: normal init of the tables; dropout: probability of dropping a tower activation in training (after
    each hidden layer's activation, as DeepCTR-Torch's DNN; 0, the default and the paper's, adds no module);
    backend: din_ext backend of attention and Dice.

    forward(batch) -> logits (B, T), one column per task in ``schema.tasks``; a batch whose candidate item fields
    are (B, C) (C candidates per row, scored against the row's one history) gives logits (B, C, T).
    rank(batch, candidate_offsets=None) -> probabilities of candidate lists, one list per row (user).
    """

    def __init__(
        self,
        schema: Schema,
        embed_dim: Union[int, Mapping[str, int]] = 16,
        attention_hidden: Sequence[int] = (80, 40),
        tower_hidden: Sequence[int] = (200, 80),
        activation: str = "dice",
        pooling: str = "attention",
        normalization: str = "none",
        score_scale: float = 1.0,
        use_dense: bool = True,
        mba_lambda: float = 0.0,
        embedding_std: float = 0.01,
        dropout: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        if not isinstance(schema, Schema):
            raise TypeError(f"schema must be a din_ext.data.Schema, got {type(schema).__name__}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        check_activation(activation)
        check_normalization(normalization)
        if not schema.history_fields:
            raise ValueError("schema.history_fields is empty: DIN needs at least one behaviour field")
        tower_hidden, attention_hidden = tuple(int(h) for h in tower_hidden), tuple(int(h) for h in attention_hidden)
        if any(h <= 0 for h in tower_hidden + attention_hidden):
            raise ValueError(f"hidden widths must be positive, got tower {tower_hidden}, attention {attention_hidden}")
        if not (math.isfinite(mba_lambda) and mba_lambda >= 0):
            raise ValueError(f"mba_lambda must be finite and >= 0, got {mba_lambda}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.schema = schema
        self.dims = self._field_dims(schema, embed_dim)
        plain_schema = schema_to_dict(schema)
        if not mba_lambda:
            plain_schema["frequencies"] = {}  # only MBA tables need them; keeps checkpoints small
        self._config = {"schema": plain_schema,
                        "embed_dim": dict(embed_dim) if isinstance(embed_dim, Mapping) else int(embed_dim),
                        "attention_hidden": attention_hidden, "tower_hidden": tower_hidden, "activation": activation,
                        "pooling": pooling, "normalization": normalization, "score_scale": float(score_scale),
                        "use_dense": bool(use_dense), "mba_lambda": float(mba_lambda),
                        "embedding_std": float(embedding_std)}  # not the backend: a choice of the machine that runs it
        if dropout:  # only when set: the configs of models without it (and of older checkpoints) stay the same
            self._config["dropout"] = float(dropout)
        self.pooling = pooling
        self.use_dense = bool(use_dense) and schema.dense_dim > 0
        self.mba_lambda = float(mba_lambda)
        self.embedding_std = float(embedding_std)
        self.tasks = tuple(schema.tasks)

        fields = {**schema.user_fields, **schema.item_fields}
        self.embeddings = nn.ModuleDict({name: self.make_embedding(name, size, self.dims[name])
                                         for name, size in fields.items()})
        self.interest_dim = sum(self.dims[f] for f in schema.history_fields)
        if pooling == "attention":
            self.attention = LocalActivationUnit(self.interest_dim, attention_hidden, activation=activation,
                                                 normalization=normalization, score_scale=score_scale)
        else:
            self.attention = None
        tower_in = sum(self.dims.values()) + self.interest_dim + (schema.dense_dim if self.use_dense else 0)
        widths = (tower_in, *tower_hidden)
        self.tower = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.tower_activations = nn.ModuleList(make_activation(activation, h) for h in tower_hidden)
        self.tower_dropout = nn.Dropout(float(dropout)) if dropout else None
        self.heads = nn.Linear(widths[-1], len(self.tasks))  # one logit per task over the shared tower
        self.backend = backend

    # -- construction -------------------------------------------------------------------------------------------

    @staticmethod
    def _field_dims(schema: Schema, embed_dim) -> Dict[str, int]:
        names = [*schema.user_fields, *schema.item_fields]
        if len(set(names)) != len(names):
            raise ValueError(f"user and item fields must have distinct names, got {names}")
        if isinstance(embed_dim, Mapping):
            missing = [n for n in names if n not in embed_dim]
            if missing:
                raise ValueError(f"embed_dim has no width for fields {missing}")
            dims = {n: int(embed_dim[n]) for n in names}
        else:
            dims = {n: int(embed_dim) for n in names}
        bad = {n: d for n, d in dims.items() if d <= 0}
        if bad:
            raise ValueError(f"embed_dim must be positive, got {bad}")
        return dims

    def make_embedding(self, field: str, num_embeddings: int, embedding_dim: int) -> nn.Module:
        """The table of ``field`` (the single factory of all tables): forward(ids, ...) -> tuple of embeddings.

        Row 0 (padding/OOV) is zero and receives no gradient. With ``mba_lambda > 0`` the table is a
        ``din_ext.MBAEmbedding`` regularized with the schema's training frequencies of ``field``.
        """
        if num_embeddings < 1:
            raise ValueError(f"field {field!r}: table size must be >= 1 (row 0 is padding/OOV), got {num_embeddings}")
        if self.mba_lambda:
            if field not in self.schema.frequencies:
                raise ValueError(f"mba_lambda > 0 needs schema.frequencies[{field!r}] (training counts per row)")
            table = MBAEmbedding(num_embeddings, embedding_dim, self.schema.frequencies[field],
                                         self.mba_lambda, padding_idx=0)
        else:
            table = SharedEmbedding(num_embeddings, embedding_dim, padding_idx=0)
        with torch.no_grad():
            table.weight.normal_(0.0, self.embedding_std)
            table.weight[0].zero_()
        return table

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        """Sets the din_ext backend of the attention and of every Dice."""
        self._backend = name
        for module in self.modules():
            if isinstance(module, (Dice, LocalActivationUnit)):
                module.backend = name

    @property
    def sparse_gradients(self) -> bool:
        """Whether every embedding table's gradient is sparse (one row per distinct id of the step, for a row-wise
        optimizer: ``din_ext.training.make_optimizer`` sets it); False (the default of a new model, except that MBA
        tables start sparse): dense gradients, which any torch.optim optimizer takes. Not part of the config."""
        return all(table.sparse for table in self.embeddings.values())

    @sparse_gradients.setter
    def sparse_gradients(self, value: bool) -> None:
        for table in self.embeddings.values():
            table.sparse = bool(value)

    @property
    def config(self) -> Dict[str, Any]:
        """The constructor arguments but ``backend`` as plain data; ``DIN.from_config(model.config)`` rebuilds it."""
        return dict(self._config)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], backend: str = "auto") -> "DIN":
        args = dict(config)
        schema = schema_from_dict(args.pop("schema"))
        return cls(schema, backend=backend, **args)

    def checkpoint(self, optimizer: Optional[torch.optim.Optimizer] = None, epoch: int = 0,
                   **extra: Any) -> Dict[str, Any]:
        """{format, config (schema included), state_dict, optimizer, epoch, **extra}, for ``torch.save``."""
        return {"format": CHECKPOINT_FORMAT, "config": self.config, "state_dict": self.state_dict(),
                "optimizer": None if optimizer is None else optimizer.state_dict(), "epoch": int(epoch), **extra}

    @classmethod
    def from_checkpoint(cls, checkpoint: Union[Mapping[str, Any], str, os.PathLike],
                        backend: str = "auto") -> "DIN":
        """The model of a ``checkpoint()`` dict (or a path to one, read with ``weights_only=True``).

        Raises CheckpointError (a ValueError) naming the file when it is not a usable DIN checkpoint.
        """
        source = "checkpoint"
        if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__"):
            source = os.fsdecode(checkpoint)
            checkpoint = load_checkpoint(checkpoint)
        else:
            check_checkpoint(checkpoint, source)
        try:
            model = cls.from_config(checkpoint["config"], backend=backend)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: its config (schema included) does not build a DIN: "
                                  f"{_reason(exc)}") from None
        try:
            model.load_state_dict(checkpoint["state_dict"])
        except (RuntimeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: its weights do not fit the model of its config: "
                                  f"{_reason(exc)}") from None
        return model

    # -- forward ------------------------------------------------------------------------------------------------

    def check_batch(self, batch: Interactions) -> None:
        """Raises ValueError naming the column if ``batch`` does not fit the schema (names, dtypes, shapes, offsets,
        ids)."""
        self._check_batch(batch)

    def _check_batch(self, batch: Interactions) -> Optional[int]:
        """check_batch, returning hist_offsets[-1]; every value it checks is read with one host-device
        synchronization, so forward passes ``checked=True`` to the layers. While torch.compile or torch.export
        traces, only names, dtypes and shapes are checked, and it returns None (the history columns are used
        whole)."""
        if not isinstance(batch, Interactions):
            raise TypeError(f"batch must be din_ext.data.Interactions, got {type(batch).__name__}")
        rows = batch.user_id.shape[0]  # not len(): a symbolic size under torch.export stays symbolic
        if rows == 0:
            raise ValueError("batch is empty (0 impressions)")
        offsets = batch.hist_offsets
        if offsets.dtype != torch.long or tuple(offsets.shape) != (rows + 1,):
            raise ValueError(f"hist_offsets must be int64 [{rows + 1}], got {offsets.dtype} {tuple(offsets.shape)}")
        history = {f: self.schema.item_fields[f] for f in self.schema.history_fields}
        columns = []  # (label, column, table size, length; None for a history column: >= hist_offsets[-1])
        # Candidate item columns are [S] (one candidate per row) or all [S, C] (C candidates per row).
        first_item = next(iter(batch.item.values()), None)
        item_shape = (rows, first_item.shape[1]) if first_item is not None and first_item.dim() == 2 else (rows,)
        for kind, present, sizes, length in (("user", batch.user, self.schema.user_fields, rows),
                                             ("item", batch.item, self.schema.item_fields, rows),
                                             ("hist", batch.hist, history, None)):
            for name, size in sizes.items():
                if name not in present:
                    raise ValueError(f"batch.{kind} has no column {name!r} (has {sorted(present)})")
                col, label = present[name], f"batch.{kind}[{name!r}]"
                if kind == "item":
                    if col.dtype != torch.long or tuple(col.shape) != item_shape or item_shape[1:] == (0,):
                        want = "[S] or, for C >= 1 candidates per row, every item column [S, C]"
                        raise ValueError(f"{label} must be int64 {want} (S = {rows}, the first item column is "
                                         f"{tuple(first_item.shape)}), got {col.dtype} {tuple(col.shape)}")
                elif col.dtype != torch.long or col.dim() != 1 or (length is not None and col.shape[0] != length):
                    want = f"[{length}]" if length is not None else f"[>= hist_offsets[-1] = {int(offsets[-1])}]"
                    raise ValueError(f"{label} must be int64 {want}, got {col.dtype} {tuple(col.shape)}")
                columns.append((label, col, size, length))
        if _validate.tracing():
            # Under torch.compile/torch.export the values are data of the graph: checking them would guard on them.
            # The caller checks them before the graph (check_batch, or din_ext.serving); the history columns are then
            # used whole, so they must end at hist_offsets[-1] (every din_ext loader's batches do).
            self._check_dense(batch, rows)
            return None
        filled = [c for c in columns if c[1].numel()]
        # History columns are read whole (their used part needs hist_offsets[-1], which this very read gets).
        values = torch.stack(_validate.offsets_summary(offsets) + [v for _, col, _, _ in filled
                                                                  for v in torch.aminmax(col)]).tolist()
        summary, bounds = values[:3], values[3:]
        _validate.check_offsets(summary, None, None)
        total = summary[1]
        for label, col, _, length in columns:
            if length is None and col.shape[0] < total:
                raise ValueError(f"{label} must be int64 [>= hist_offsets[-1] = {total}], got {col.dtype} "
                                 f"{tuple(col.shape)}")
        for (label, col, size, length), lo, hi in zip(filled, bounds[0::2], bounds[1::2]):
            if (lo < 0 or hi >= size) and length is None and col.shape[0] > total:
                # Storage past hist_offsets[-1] is never read: only the used part must be in range.
                used = col[:total]
                lo, hi = torch.stack(torch.aminmax(used)).tolist() if used.numel() else (0, 0)
            if lo < 0 or hi >= size:
                raise ValueError(f"{label} has ids outside [0, {size}) (the table size)")
        self._check_dense(batch, rows)
        return total

    def _check_dense(self, batch: Interactions, rows: int) -> None:
        if self.use_dense:
            dense = batch.dense
            if dense is None or tuple(dense.shape) != (rows, self.schema.dense_dim) or not dense.is_floating_point():
                got = None if dense is None else (dense.dtype, tuple(dense.shape))
                raise ValueError(f"batch.dense must be float [{rows}, {self.schema.dense_dim}], got {got}")

    def _lookup(self, field: str, *ids: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The embeddings of ``ids`` in the table of ``field``, one call per table per step (so an MBA table counts
        an id shared by the candidate and the history once), always as a tuple."""
        out = self.embeddings[field](*ids, checked=True)  # forward has checked the ids
        return out if isinstance(out, tuple) else (out,)

    def regularization(self) -> Optional[torch.Tensor]:
        """The MBA regularization value R of the last training step, summed over the tables (None without MBA).
        R's gradient is already in the tables' gradients; this value is for logging only."""
        values = [t.last_regularization for t in self.embeddings.values()
                  if getattr(t, "last_regularization", None) is not None]
        return torch.stack(values).sum() if values else None

    def forward(self, batch: Interactions) -> torch.Tensor:
        """batch: Interactions with S rows. Returns logits (S, T), T = len(schema.tasks); with candidate item
        fields (S, C), logits (S, C, T). The user side (profile embeddings, history lookups) is computed once per
        row, and the attention scores the C candidates against the row's one history (query (S, C, Dq))."""
        total = self._check_batch(batch)
        schema = self.schema
        users = [self._lookup(f, batch.user[f])[0] for f in schema.user_fields]
        candidates, query, keys = [], [], []
        for field in schema.item_fields:
            if field in schema.history_fields:
                history = batch.hist[field]
                if total is not None and history.shape[0] != total:  # no slice op where it ends at total
                    history = history[:total]
                candidate, behaviours = self._lookup(field, batch.item[field], history)
                query.append(candidate)
                keys.append(behaviours)
            else:
                (candidate,) = self._lookup(field, batch.item[field])
            candidates.append(candidate)
        keys = torch.cat(keys, dim=-1) if len(keys) > 1 else keys[0]
        query = torch.cat(query, dim=-1) if len(query) > 1 else query[0]
        interest = self.pool(query, keys, batch.hist_offsets, checked=True)
        dense = [batch.dense.to(query.dtype)] if self.use_dense else []
        if query.dim() == 2:
            x = torch.cat(users + candidates + [interest] + dense, dim=1)
        else:  # C candidates per row: the row's user side joins each of them, then the tower sees S * C rows
            rows, count = query.shape[:2]
            per_row = [u[:, None].expand(rows, count, u.shape[-1]) for u in users + dense]
            x = torch.cat(per_row[:len(users)] + candidates + [interest] + per_row[len(users):], dim=-1)
            x = x.reshape(rows * count, x.shape[-1])
        for linear, activation in zip(self.tower, self.tower_activations):
            x = activation(linear(x))
            if self.tower_dropout is not None:
                x = self.tower_dropout(x)
        logits = self.heads(x)
        return logits if query.dim() == 2 else logits.view(*query.shape[:2], logits.shape[-1])

    def pool(self, query: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor, checked: bool = False
             ) -> torch.Tensor:
        """query: (B, Dq) or (B, C, Dq); keys: (N, Dq) jagged with offsets (B+1,); checked: the offsets are
        validated (forward). Returns the user interest (B, Dq), or (B, C, Dq): one per candidate."""
        if self.attention is not None:
            return self.attention(query, keys, offsets=offsets, checked=checked)
        # The row of every key (rows past offsets[-1] go to a dropped extra row): no data-dependent size, so it
        # traces for torch.compile and torch.export.
        rows = query.shape[0]
        owner = torch.searchsorted(offsets[1:], torch.arange(keys.shape[0], device=keys.device), right=True)
        summed = keys.new_zeros(rows + 1, keys.shape[1]).index_add_(0, owner, keys)[:rows]
        return summed if query.dim() == 2 else summed[:, None].expand(query.shape)

    @torch.no_grad()
    def rank(self, batch: Interactions, candidate_offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scores a candidate list per user against the user's one history, in eval mode, without gradients.

        batch: one row per user (profile fields, history, dense); its candidate item fields are either (B, C),
        the same number C of candidates per user, or, with candidate_offsets (B+1,) int64, jagged (M,): user b's
        candidates are ``item[f][candidate_offsets[b]:candidate_offsets[b + 1]]`` (lists of different lengths;
        internally padded with id 0 to the longest list, and the padding is dropped).
        Returns probabilities (sigmoid of the logits) in candidate order: (B, C, T), or (M, T) with offsets.
        """
        # Module.train walks every submodule (about 0.1 ms for the two calls on a small DIN, a tenth of that for
        # this check): only when some module is in training mode.
        was_training = self.training
        toggle = any(module.training for module in self.modules())
        if toggle:
            self.eval()
        try:
            if candidate_offsets is None:
                return torch.sigmoid(self(batch))
            items, valid = self._pad_candidates(batch, candidate_offsets)
            padded = Interactions(batch.user_id, batch.user, items, batch.hist_offsets, batch.hist, batch.labels,
                                  batch.dense, batch.time)
            return torch.sigmoid(self(padded)[valid])
        finally:
            if toggle:
                self.train(was_training)

    @staticmethod
    def _pad_candidates(batch: Interactions, offsets: torch.Tensor
                        ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """Jagged candidate columns (M,) with offsets (B+1,) -> columns (B, C_max) padded with id 0 and the mask
        (B, C_max) of real candidates (True in candidate order)."""
        rows = len(batch)
        if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.long or tuple(offsets.shape) != (rows + 1,):
            raise ValueError(f"candidate_offsets must be int64 [{rows + 1}] (B + 1), got "
                             f"{getattr(offsets, 'dtype', type(offsets).__name__)} {tuple(getattr(offsets, 'shape', ()))}")
        counts = offsets[1:] - offsets[:-1]
        first, last, shortest, longest = torch.stack([offsets[0], offsets[-1], counts.min(), counts.max()]).tolist()
        if first != 0 or shortest < 1:
            raise ValueError("candidate_offsets must start at 0 and be increasing (every user needs a candidate)")
        width = longest
        valid = torch.arange(width, device=offsets.device)[None, :] < counts[:, None]
        items = {}
        for name, col in batch.item.items():
            if col.dim() != 1 or col.shape[0] < last:
                raise ValueError(f"batch.item[{name!r}] must be int64 [>= candidate_offsets[-1] = {last}] with "
                                 f"candidate_offsets, got {tuple(col.shape)}")
            padded = col.new_zeros(rows, width)
            padded[valid] = col[:last]
            items[name] = padded
        return items, valid

    def extra_repr(self) -> str:
        return f"pooling={self.pooling!r}, tasks={self.tasks}, backend={self.backend!r}"


def save_checkpoint(path, checkpoint: Mapping[str, Any]) -> None:
    """Writes ``checkpoint`` atomically (a temporary file renamed over ``path``): a failed write leaves the old one."""
    tmp = f"{os.fspath(path)}.tmp"
    try:
        torch.save(dict(checkpoint), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class CheckpointError(ValueError):
    """A file or dict that is not a usable din_ext DIN checkpoint; the message names the file and the problem."""


REQUIRED_KEYS = ("format", "config", "state_dict")


def _reason(exc: BaseException) -> str:
    """The exception's type and the first line of its message (KeyError's is just the key), for a one-line error."""
    name, line = type(exc).__name__, _validate.first_line(exc)
    return name if line == name else f"{name}: {line}"


def check_checkpoint(checkpoint: Any, source: str) -> None:
    """Raises CheckpointError unless ``checkpoint`` is a dict of this format with a config, schema and weights."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{source}: not a din_ext DIN checkpoint (it holds a {type(checkpoint).__name__}, "
                              f"not a dict)")
    if "format" not in checkpoint:
        raise CheckpointError(f"{source}: not a din_ext DIN checkpoint (no 'format' entry; din_ext writes format "
                              f"{CHECKPOINT_FORMAT})")
    if checkpoint["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{source}: checkpoint format {checkpoint['format']!r}, but this din_ext reads "
                              f"format {CHECKPOINT_FORMAT}; write it again with this version")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{source}: the checkpoint lacks {', '.join(map(repr, missing))}")
    if not isinstance(checkpoint["config"], dict) or "schema" not in checkpoint["config"]:
        raise CheckpointError(f"{source}: the checkpoint's config lacks 'schema'")


def load_checkpoint(path, map_location="cpu") -> Dict[str, Any]:
    """Reads a checkpoint with ``weights_only=True`` and checks its format and entries.

    Raises CheckpointError (a ValueError) naming ``path`` for anything that is not such a checkpoint: a missing,
    empty, truncated or foreign file, a pickle of objects other than tensors and plain data (refused, since loading
    it could run code), a dict without config, schema or weights, or another format version.
    """
    source = os.fsdecode(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{source}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{source}: is a directory, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"{source}: cannot be read ({exc.strerror or exc})") from None
    if not head:
        raise CheckpointError(f"{source}: the file is empty (0 bytes), not a checkpoint")
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        raise CheckpointError(f"{source}: not a checkpoint (torch.save writes a zip archive; this file is not one)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise CheckpointError(f"{source}: not a checkpoint: a truncated or corrupt torch.save archive "
                                  f"({_reason(exc)})") from None
        raise CheckpointError(f"{source}: refused: it holds objects other than tensors and plain data, and loading "
                              f"them could run code (din_ext reads checkpoints with weights_only=True)") from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{source}: not a checkpoint: a truncated or corrupt torch.save archive, or a zip "
                              f"file that torch.save did not write ({_reason(exc)})") from None
    check_checkpoint(checkpoint, source)
    return checkpoint
