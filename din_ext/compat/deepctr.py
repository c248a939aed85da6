"""DeepCTR-Torch's DIN with din_ext inside: change ``from deepctr_torch.models import DIN`` to
``from din_ext.compat.deepctr import DIN`` and keep the rest of the script.

    feature_columns = [SparseFeat("user", 3, 8), SparseFeat("item_id", 4, 8),
                       VarLenSparseFeat(SparseFeat("hist_item_id", 4, 8, embedding_name="item_id"), 4,
                                        length_name="seq_length")]
    model = DIN(feature_columns, ["item_id"])
    model.compile("adam", "binary_crossentropy", metrics=["auc"])
    history = model.fit(x, y, batch_size=256, epochs=2, validation_split=0.1)
    probabilities = model.predict(x_test)                      # numpy float64 (N, 1)

The constructor takes deepctr_torch.models.DIN's arguments and its feature columns (DeepCTR-Torch's own classes
when it is installed, or any objects with the same fields: ``SparseFeat``, ``VarLenSparseFeat`` and ``DenseFeat``
below). Inputs are the same dicts of numpy arrays. Inside, zero-padded histories become jagged ``values + offsets``
(positions past ``length_name``, or id 0 when there is no length column, are dropped, never scored), the attention
and Dice run as din_ext kernels, and ``dnn_activation="dice"`` works in the tower. README's "Coming from
DeepCTR-Torch" lists every intended difference from DeepCTR-Torch 0.3.0's numbers.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, namedtuple
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from din_ext import metrics as _metrics
from din_ext.data.core import Interactions, Schema
from din_ext.model import DIN as _DIN
from din_ext.modules import Dice

logger = logging.getLogger("din_ext")

DEFAULT_GROUP_NAME = "default_group"
LABEL = "label"  # the one task of the model (DeepCTR-Torch's DIN has one output)

try:  # DeepCTR-Torch's own feature columns, so that isinstance checks in user code keep working
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat, get_feature_names
except ImportError:  # the same fields, for users without deepctr-torch
    class SparseFeat(namedtuple("SparseFeat", ["name", "vocabulary_size", "embedding_dim", "use_hash", "dtype",
                                               "embedding_name", "group_name"])):
        """A categorical feature: ids in [0, vocabulary_size), one embedding of embedding_dim."""

        __slots__ = ()

        def __new__(cls, name, vocabulary_size, embedding_dim=4, use_hash=False, dtype="int32", embedding_name=None,
                    group_name=DEFAULT_GROUP_NAME):
            if embedding_dim == "auto":
                embedding_dim = 6 * int(pow(vocabulary_size, 0.25))
            return super().__new__(cls, name, vocabulary_size, embedding_dim, use_hash, dtype,
                                   embedding_name or name, group_name)

    class VarLenSparseFeat(namedtuple("VarLenSparseFeat", ["sparsefeat", "maxlen", "combiner", "length_name"])):
        """A sequence of ids of ``sparsefeat``, zero-padded to maxlen; length_name: the column of real lengths."""

        __slots__ = ()

        def __new__(cls, sparsefeat, maxlen, combiner="mean", length_name=None):
            return super().__new__(cls, sparsefeat, maxlen, combiner, length_name)

        name = property(lambda self: self.sparsefeat.name)
        vocabulary_size = property(lambda self: self.sparsefeat.vocabulary_size)
        embedding_dim = property(lambda self: self.sparsefeat.embedding_dim)
        embedding_name = property(lambda self: self.sparsefeat.embedding_name)
        group_name = property(lambda self: self.sparsefeat.group_name)

    class DenseFeat(namedtuple("DenseFeat", ["name", "dimension", "dtype"])):
        """A float feature of ``dimension`` values."""

        __slots__ = ()

        def __new__(cls, name, dimension=1, dtype="float32"):
            return super().__new__(cls, name, dimension, dtype)

    def get_feature_names(feature_columns) -> List[str]:
        """The input names the model reads, in DeepCTR-Torch's order (length columns included)."""
        return list(_feature_index(feature_columns))


def _kind(column) -> str:
    """"varlen", "sparse" or "dense", by the fields a feature column has (duck typing)."""
    if hasattr(column, "sparsefeat") and hasattr(column, "maxlen"):
        return "varlen"
    if hasattr(column, "vocabulary_size") and hasattr(column, "embedding_dim"):
        return "sparse"
    if hasattr(column, "dimension"):
        return "dense"
    raise TypeError(f"not a feature column (SparseFeat, VarLenSparseFeat or DenseFeat): {column!r}")


def _feature_index(feature_columns) -> "OrderedDict[str, Tuple[int, int]]":
    """DeepCTR-Torch's input layout: name -> (start, end) columns, length columns after their sequence."""
    index: "OrderedDict[str, Tuple[int, int]]" = OrderedDict()
    start = 0
    for column in feature_columns:
        if column.name in index:
            continue
        kind = _kind(column)
        width = {"sparse": 1, "dense": getattr(column, "dimension", 1), "varlen": getattr(column, "maxlen", 1)}[kind]
        index[column.name] = (start, start + width)
        start += width
        if kind == "varlen" and column.length_name is not None and column.length_name not in index:
            index[column.length_name] = (start, start + 1)
            start += 1
    return index


def _grouped(columns: Sequence) -> List:
    """Columns in the order DeepCTR-Torch concatenates their embeddings: by group_name (first seen first)."""
    groups: "OrderedDict[str, list]" = OrderedDict()
    for column in columns:
        groups.setdefault(getattr(column, "group_name", DEFAULT_GROUP_NAME), []).append(column)
    return [c for group in groups.values() for c in group]


def _activation(name, width: int, where: str) -> nn.Module:
    """DeepCTR-Torch's activation_layer for the tower: a name (case-insensitive) or an nn.Module class."""
    if isinstance(name, type) and issubclass(name, nn.Module):
        return name()
    key = str(name).lower()
    if key == "dice":
        return Dice(width)
    layers = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "linear": nn.Identity, "prelu": nn.PReLU}
    if key not in layers:
        raise ValueError(f"{where} must be 'dice', 'relu', 'sigmoid', 'prelu', 'linear' or an nn.Module class, "
                         f"got {name!r}")
    return layers[key]()


def _attention_activation(name) -> str:
    """The din_ext activation of the local activation unit for DeepCTR-Torch's att_activation."""
    key = str(name).lower()
    if key not in ("dice", "sigmoid", "relu", "prelu"):
        raise ValueError(f"att_activation must be 'Dice', 'sigmoid', 'relu' or 'prelu' (the din_ext kernels' "
                         f"activations), got {name!r}")
    return key


class History:
    """Keras' History callback, as DeepCTR-Torch's fit returns it: ``.history[name]`` per epoch, ``.epoch``."""

    def __init__(self):
        self.model, self.params, self.epoch, self.history = None, {}, [], {}

    def set_model(self, model):
        self.model = model

    def set_params(self, params):
        self.params = params or {}

    def on_train_begin(self, logs=None):
        self.epoch = []

    def on_epoch_begin(self, epoch, logs=None):
        pass

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(value)

    def on_train_end(self, logs=None):
        pass


def _call(callbacks, method: str, *args, **kwargs) -> None:
    for callback in callbacks:
        fn = getattr(callback, method, None)
        if fn is not None:
            fn(*args, **kwargs)


def _accuracy(y_true, y_pred) -> float:
    return float(np.mean(np.asarray(y_true) == (np.asarray(y_pred) > 0.5)))


METRICS: Dict[str, Callable] = {"auc": _metrics.auc, "logloss": _metrics.logloss,
                                "binary_crossentropy": _metrics.logloss,
                                "mse": lambda t, p: float(np.mean((np.asarray(t) - np.asarray(p)) ** 2)),
                                "accuracy": _accuracy, "acc": _accuracy}
LOSSES = {"binary_crossentropy": F.binary_cross_entropy, "mse": F.mse_loss, "mae": F.l1_loss}
OPTIMIZERS = {"sgd": lambda p: torch.optim.SGD(p, lr=0.01), "adam": torch.optim.Adam,
              "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop}


class DIN(nn.Module):
    """DeepCTR-Torch's ``deepctr_torch.models.DIN`` (same arguments, defaults and methods) over ``din_ext.DIN``.

    dnn_feature_columns: SparseFeat / VarLenSparseFeat / DenseFeat (DeepCTR-Torch's or duck-typed);
    history_feature_list: the SparseFeat names whose ``hist_<name>`` VarLenSparseFeat is the behaviour history.
    Other VarLenSparseFeat are pooled by their combiner (mean, sum, max) into the tower, as in DeepCTR-Torch.
    gpus: with several devices, fit trains with DistributedDataParallel (see ``fit``); backend: din_ext backend.
    forward(x) -> (B, 1) probabilities for task "binary", raw values for "regression"; x: a dict of arrays.
    """

    def __init__(self, dnn_feature_columns, history_feature_list, dnn_use_bn=False, dnn_hidden_units=(256, 128),
                 dnn_activation="relu", att_hidden_size=(64, 16), att_activation="Dice",
                 att_weight_normalization=False, l2_reg_dnn=0.0, l2_reg_embedding=1e-6, dnn_dropout=0,
                 init_std=0.0001, seed=1024, task="binary", device="cpu", gpus=None, *, backend="auto"):
        super().__init__()
        if task not in ("binary", "regression"):
            raise ValueError(f"task must be 'binary' or 'regression' (DIN has one output), got {task!r}")
        if gpus and str(gpus[0]) not in str(device):
            raise ValueError("`gpus[0]` should be the same gpu with `device`")
        if not 0 <= float(dnn_dropout) < 1:
            raise ValueError(f"dnn_dropout must be in [0, 1), got {dnn_dropout}")
        torch.manual_seed(seed)
        self.dnn_feature_columns = list(dnn_feature_columns)
        self.history_feature_list = list(history_feature_list)
        self.task, self.device, self.gpus, self.seed = task, str(device), gpus, int(seed)
        self.l2_reg_embedding, self.l2_reg_dnn = float(l2_reg_embedding), float(l2_reg_dnn)
        self.feature_index = _feature_index(self.dnn_feature_columns)
        self._parse_columns()

        schema = Schema(user_fields={c.name: c.vocabulary_size + 1 for c in self.user_columns},
                        item_fields={c.name: c.vocabulary_size + 1 for c in self.item_columns},
                        history_fields=tuple(c.name for c in self.item_columns),
                        dense_dim=self._dense_dim + sum(c.embedding_dim for c in self.pooled_columns),
                        tasks=(LABEL,))
        dims = {c.name: int(c.embedding_dim) for c in self.user_columns + self.item_columns}
        self.din = _DIN(schema, embed_dim=dims, attention_hidden=att_hidden_size, tower_hidden=dnn_hidden_units,
                        activation=_attention_activation(att_activation),
                        normalization="softmax" if att_weight_normalization else "none", use_dense=True,
                        embedding_std=init_std)
        # DeepCTR-Torch's tower: Linear -> [BatchNorm1d] -> activation -> Dropout, each hidden layer.
        for i, width in enumerate(int(h) for h in dnn_hidden_units):
            layers = ([nn.BatchNorm1d(width)] if dnn_use_bn else []) + [
                _activation(dnn_activation, width, "dnn_activation")] + (
                [nn.Dropout(float(dnn_dropout))] if dnn_dropout else [])
            self.din.tower_activations[i] = layers[0] if len(layers) == 1 else nn.Sequential(*layers)
        self.pooled_tables = nn.ModuleDict()
        for column in self.pooled_columns:
            if column.embedding_name not in self._sparse_tables and column.embedding_name not in self.pooled_tables:
                table = nn.Embedding(column.vocabulary_size + 1, column.embedding_dim, padding_idx=0)
                nn.init.normal_(table.weight, 0.0, init_std)
                self.pooled_tables[column.embedding_name] = table
        with torch.no_grad():  # DeepCTR-Torch's DNN draws its weights from N(0, 1e-4) whatever init_std is
            for linear in [*self.din.tower, *self.din.attention.linears]:
                linear.weight.normal_(0.0, 1e-4)
            self.din.heads.bias.zero_()
        self.din.backend = backend  # the Dice modules of the tower too
        self.history = History()
        self.stop_training = False
        self.optim, self.loss_func, self.metrics = None, None, {}
        self.to(self.device)

    # -- feature columns -----------------------------------------------------------------------------------------

    def _parse_columns(self) -> None:
        kinds = [(_kind(c), c) for c in self.dnn_feature_columns]
        sparse = _grouped([c for k, c in kinds if k == "sparse"])
        varlen = [c for k, c in kinds if k == "varlen"]
        self.dense_columns = [c for k, c in kinds if k == "dense"]
        self._dense_dim = sum(int(c.dimension) for c in self.dense_columns)
        names = {c.name for c in sparse}
        missing = [f for f in self.history_feature_list if f not in names]
        if missing:
            raise ValueError(f"history_feature_list names {missing}, which are not SparseFeat columns")
        history = {f"hist_{f}": f for f in self.history_feature_list}
        self.history_columns = {history[c.name]: c for c in varlen if c.name in history}
        absent = [f for f in self.history_feature_list if f not in self.history_columns]
        if absent:
            raise ValueError(f"no VarLenSparseFeat named {[f'hist_{f}' for f in absent]} for history_feature_list "
                             f"{absent}")
        self.item_columns = [c for c in sparse if c.name in history.values()]
        self.user_columns = [c for c in sparse if c.name not in history.values()]
        self.pooled_columns = [c for c in varlen if c.name not in history]
        for column in self.item_columns:
            if self.history_columns[column.name].embedding_dim != column.embedding_dim:
                raise ValueError(f"hist_{column.name} must have the embedding_dim of {column.name} (they share a "
                                 f"table)")
        self._sparse_tables = {}  # embedding_name -> the din_ext field whose table it is
        for column in sparse:
            if column.embedding_name in self._sparse_tables:
                raise ValueError(f"SparseFeat {column.name!r} shares the table {column.embedding_name!r} with "
                                 f"{self._sparse_tables[column.embedding_name]!r}; din_ext gives each SparseFeat "
                                 f"its own table")
            self._sparse_tables[column.embedding_name] = column.name
        for column in self.pooled_columns:
            if column.combiner not in ("mean", "sum", "max"):
                raise ValueError(f"{column.name}: combiner must be 'mean', 'sum' or 'max', got {column.combiner!r}")
            owner = self._sparse_tables.get(column.embedding_name)
            if owner is not None and dict(zip([c.name for c in sparse], sparse))[owner].embedding_dim != \
                    column.embedding_dim:
                raise ValueError(f"{column.name} must have the embedding_dim of {owner} (they share a table)")
        # DeepCTR-Torch reads every history's length from the first VarLenSparseFeat with a length column.
        self._length_name = next((c.length_name for c in varlen if c.length_name is not None), None)

    # -- inputs --------------------------------------------------------------------------------------------------

    def _column(self, x: Mapping[str, Any], name: str, rows: Optional[int], dtype) -> np.ndarray:
        if name not in x:
            raise ValueError(f"the input has no column {name!r} (has {sorted(x)})")
        value = np.asarray(x[name])
        if rows is not None and value.shape[0] != rows:
            raise ValueError(f"column {name!r} has {value.shape[0]} rows, the others {rows}")
        return value.astype(dtype, copy=False)

    def _ids(self, x, column, rows: int, width: Optional[int] = None) -> torch.Tensor:
        """The ids of ``column`` shifted by one (din_ext's row 0 is padding), range-checked."""
        value = self._column(x, column.name, rows, np.int64)
        value = value.reshape(rows) if width is None else value.reshape(rows, -1)
        if value.size and (value.min() < 0 or value.max() >= column.vocabulary_size):
            raise ValueError(f"column {column.name!r} has ids outside [0, {column.vocabulary_size}) "
                             f"(its vocabulary_size)")
        return torch.from_numpy(value + 1)

    def _mask(self, x, ids: Sequence[torch.Tensor], rows: int, length_name: Optional[str]) -> torch.Tensor:
        """(rows, L) True on the real positions: below the length column, else where any id is not padding."""
        width = ids[0].shape[1]
        if length_name is not None:
            lengths = torch.from_numpy(self._column(x, length_name, rows, np.int64).reshape(rows))
            return torch.arange(width)[None, :] < lengths.clamp(0, width)[:, None]
        mask = torch.zeros(rows, width, dtype=torch.bool)
        for column in ids:
            mask |= column != 1  # DeepCTR-Torch's id 0, shifted
        return mask

    def make_inputs(self, x, y=None) -> Tuple[Interactions, Dict[str, Tuple[torch.Tensor, torch.Tensor]]]:
        """DeepCTR-Torch's input dict (or list in feature-name order) -> (jagged Interactions on the CPU, pooled
        sequences {name: (ids (S, L), mask (S, L))}); y: labels (S,) or (S, 1), None for zeros."""
        if isinstance(x, (list, tuple)):
            x = dict(zip(self.feature_index, x))
        if not isinstance(x, Mapping):
            raise TypeError(f"x must be a dict of arrays (or a list in feature-name order), got {type(x).__name__}")
        first = next(iter(self.feature_index))
        rows = int(np.asarray(self._column(x, first, None, np.float64)).shape[0])
        user = {c.name: self._ids(x, c, rows) for c in self.user_columns}
        item = {c.name: self._ids(x, c, rows) for c in self.item_columns}
        padded = {f: self._ids(x, self.history_columns[f], rows, width=True) for f in item}
        widths = {v.shape[1] for v in padded.values()}
        if len(widths) != 1:
            raise ValueError(f"the history columns have different widths {sorted(widths)}")
        mask = self._mask(x, list(padded.values()), rows, self._length_name)
        offsets = torch.zeros(rows + 1, dtype=torch.long)
        torch.cumsum(mask.sum(1), 0, out=offsets[1:])
        hist = {f: v[mask] for f, v in padded.items()}  # row-major: each row's behaviours in order, padding dropped
        dense = [torch.from_numpy(self._column(x, c.name, rows, np.float32).reshape(rows, int(c.dimension)))
                 for c in self.dense_columns]
        dense = torch.cat(dense, 1) if dense else torch.zeros(rows, 0)
        pooled = {}
        for column in self.pooled_columns:
            ids = self._ids(x, column, rows, width=True)
            pooled[column.name] = (ids, self._mask(x, [ids], rows, column.length_name))
        labels = torch.zeros(rows) if y is None else torch.as_tensor(np.asarray(y, dtype=np.float32)).reshape(rows)
        data = Interactions(user_id=torch.arange(rows), user=user, item=item, hist_offsets=offsets, hist=hist,
                            labels={LABEL: labels}, dense=dense)
        return data, pooled

    @staticmethod
    def _take(data, pooled, index: torch.Tensor):
        return data.take(index), {k: (ids[index], mask[index]) for k, (ids, mask) in pooled.items()}

    # -- model ---------------------------------------------------------------------------------------------------

    def _table(self, embedding_name: str) -> nn.Embedding:
        field = self._sparse_tables.get(embedding_name)
        return self.din.embeddings[field] if field is not None else self.pooled_tables[embedding_name]

    def logits(self, data: Interactions, pooled: Mapping[str, Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """(S, 1) pre-activation outputs of a batch made by ``make_inputs`` (on the model's device)."""
        dense = [data.dense]
        for column in self.pooled_columns:  # DeepCTR-Torch's SequencePoolingLayer, masked
            ids, mask = pooled[column.name]
            emb = F.embedding(ids, self._table(column.embedding_name).weight)
            weight = mask[..., None].to(emb.dtype)
            if column.combiner == "max":
                dense.append((emb - (1 - weight) * 1e9).max(1).values)
            else:
                total = (emb * weight).sum(1)
                dense.append(total if column.combiner == "sum" else total / (weight.sum(1) + 1e-8))
        batch = Interactions(data.user_id, data.user, data.item, data.hist_offsets, data.hist, data.labels,
                             torch.cat(dense, 1) if len(dense) > 1 else dense[0])
        return self.din(batch)

    def forward(self, x, pooled=None, raw: bool = False) -> torch.Tensor:
        """x: a dict of arrays (or Interactions from ``make_inputs`` with its ``pooled``). Returns (B, 1):
        probabilities for task "binary", values for "regression"; raw: the logits."""
        if not isinstance(x, Interactions):
            data, pooled = self.make_inputs(x)
            x, pooled = data.to(self.device), {k: (i.to(self.device), m.to(self.device))
                                               for k, (i, m) in pooled.items()}
        out = self.logits(x, pooled or {})
        return torch.sigmoid(out) if self.task == "binary" and not raw else out

    def get_regularization_loss(self) -> torch.Tensor:
        """DeepCTR-Torch's L2: l2_reg_embedding * sum(W^2) over every embedding table, and l2_reg_dnn over the
        tower's weights (which DeepCTR-Torch 0.3.0's DIN accepts but never applies)."""
        total = torch.zeros((), device=self.din.heads.weight.device)
        if self.l2_reg_embedding:
            for table in [*self.din.embeddings.values(), *self.pooled_tables.values()]:
                total = total + self.l2_reg_embedding * table.weight.square().sum()
        if self.l2_reg_dnn:
            for linear in self.din.tower:
                total = total + self.l2_reg_dnn * linear.weight.square().sum()
        return total

    # -- DeepCTR-Torch's training API ----------------------------------------------------------------------------

    def compile(self, optimizer, loss=None, metrics=None) -> None:
        """optimizer: "sgd" (lr 0.01), "adam", "adagrad", "rmsprop" or an optimizer; loss: "binary_crossentropy",
        "mse", "mae" or fn(pred, target, reduction="sum"); metrics: "auc", "logloss"/"binary_crossentropy",
        "mse", "accuracy"/"acc"."""
        if isinstance(optimizer, str):
            if optimizer not in OPTIMIZERS:
                raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)} or an optimizer, got {optimizer!r}")
            optimizer = OPTIMIZERS[optimizer](self.parameters())
        self.optim = optimizer
        if isinstance(loss, (list, tuple)):
            raise ValueError("DIN has one output: give one loss, not a list")
        if isinstance(loss, str) and loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)} or a function, got {loss!r}")
        self.loss_func = loss
        unknown = [m for m in metrics or [] if m not in METRICS]
        if unknown:
            raise ValueError(f"metrics {unknown} are not among {sorted(METRICS)}")
        self.metrics = {m: METRICS[m] for m in metrics or []}
        self.metrics_names = ["loss", *self.metrics]

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed over the batch, as DeepCTR-Torch's fit; binary cross-entropy from the logits (stable)."""
        if self.loss_func == "binary_crossentropy" and self.task == "binary":
            return F.binary_cross_entropy_with_logits(logits, y, reduction="sum")
        pred = torch.sigmoid(logits) if self.task == "binary" else logits
        fn = LOSSES[self.loss_func] if isinstance(self.loss_func, str) else self.loss_func
        return fn(pred, y, reduction="sum")

    def _batches(self, rows: int, batch_size: int, shuffle: bool, epoch: int) -> List[torch.Tensor]:
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch)) if shuffle \
            else torch.arange(rows)
        return list(order.split(batch_size))

    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose=1, initial_epoch=0, validation_split=0.,
            validation_data=None, shuffle=True, callbacks=None) -> History:
        """DeepCTR-Torch's fit: x a dict of arrays, y labels; returns the History (``history.history["loss"]``,
        ``"auc"``, ``"val_auc"``, ...). Callbacks (DeepCTR-Torch's EarlyStopping, ModelCheckpoint) work.

        Multi-GPU: inside a ``torch.distributed`` process group (``torchrun``, one process per GPU), the model is
        wrapped in DistributedDataParallel and each process takes every world_size-th batch of the same seeded
        order: batch_size is per process, as DeepCTR-Torch's ``gpus`` batch_size is per GPU.
        """
        if self.optim is None or self.loss_func is None:
            raise RuntimeError("call compile(optimizer, loss, metrics) before fit")
        if isinstance(x, (list, tuple)):
            x = dict(zip(self.feature_index, x))
        y = np.asarray(y)
        if validation_data:
            val_x, val_y = validation_data[:2]
        elif validation_split and 0.0 < validation_split < 1.0:
            split = int(len(y) * (1.0 - validation_split))  # the last rows, before shuffling (as Keras)
            val_x, val_y = {k: np.asarray(v)[split:] for k, v in x.items()}, y[split:]
            x, y = {k: np.asarray(v)[:split] for k, v in x.items()}, y[:split]
        else:
            val_x, val_y = None, None
        batch_size = int(batch_size or 256)
        data, pooled = self.make_inputs(x, y)
        rows = len(data)
        model, rank, world = self, 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            if world > 1:
                device = torch.device(self.device)
                model = nn.parallel.DistributedDataParallel(
                    self, device_ids=[device] if device.type == "cuda" else None)
        elif self.gpus and len(self.gpus) > 1:
            logger.warning("gpus=%s: several GPUs train with DistributedDataParallel, one process each: launch the "
                           "script with torchrun --nproc_per_node=%d; training on %s now", self.gpus,
                           len(self.gpus), self.device)
        callbacks = list(callbacks or []) + [self.history]
        for callback in callbacks:
            callback.set_model(self)
        self.stop_training = False
        _call(callbacks, "on_train_begin")
        for epoch in range(initial_epoch, epochs):
            _call(callbacks, "on_epoch_begin", epoch)
            self.train()
            batches = self._batches(rows, batch_size, shuffle, epoch)
            if world > 1:  # every process the same number of steps (DDP's all-reduce in each)
                steps = math.ceil(len(batches) / world)
                batches = [batches[(rank + world * s) % len(batches)] for s in range(steps)]
            total, seen, outputs, targets = 0.0, 0, [], []
            for index in batches:
                batch, side = self._take(data, pooled, index)
                batch = batch.to(self.device)
                side = {k: (i.to(self.device), m.to(self.device)) for k, (i, m) in side.items()}
                target = batch.labels[LABEL].float()
                logits = model(batch, side, raw=True).reshape(-1)
                loss = self._loss(logits, target) + self.get_regularization_loss()
                self.optim.zero_grad()
                loss.backward()
                self.optim.step()
                total += float(loss.detach())
                seen += len(index)
                outputs.append((torch.sigmoid(logits) if self.task == "binary" else logits).detach().cpu())
                targets.append(target.cpu())
            logs = {"loss": total / max(seen, 1)}
            pred, true = torch.cat(outputs).double().numpy(), torch.cat(targets).double().numpy()
            for name, fn in self.metrics.items():
                logs[name] = _safe(fn, true, pred)
            if val_x is not None:
                for name, value in self.evaluate(val_x, val_y, batch_size).items():
                    logs["val_" + name] = value
            if verbose > 0:
                logger.info("Epoch %d/%d - %s", epoch + 1, epochs,
                            " - ".join(f"{k}: {v:.4f}" for k, v in logs.items()))
            _call(callbacks, "on_epoch_end", epoch, logs)
            if self.stop_training:
                break
        if world > 1:  # each process folded its own last batch into the Dice/BatchNorm statistics: take rank 0's
            for buffer in self.buffers():
                torch.distributed.broadcast(buffer, 0)
        _call(callbacks, "on_train_end")
        return self.history

    def evaluate(self, x, y, batch_size=256) -> Dict[str, float]:
        """The compiled metrics of predict(x) against y."""
        pred = self.predict(x, batch_size).reshape(-1)
        true = np.asarray(y, dtype=np.float64).reshape(-1)
        return {name: _safe(fn, true, pred) for name, fn in self.metrics.items()}

    @torch.no_grad()
    def predict(self, x, batch_size=256) -> np.ndarray:
        """(N, 1) float64 numpy predictions of x (a dict of arrays), in eval mode."""
        self.eval()
        data, pooled = self.make_inputs(x)
        out = []
        for index in self._batches(len(data), int(batch_size), False, 0):
            batch, side = self._take(data, pooled, index)
            side = {k: (i.to(self.device), m.to(self.device)) for k, (i, m) in side.items()}
            out.append(self(batch.to(self.device), side).double().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 1))

    # -- weights from DeepCTR-Torch ------------------------------------------------------------------------------

    @torch.no_grad()
    def load_deepctr_weights(self, model: nn.Module) -> "DIN":
        """Copies the weights of a ``deepctr_torch.models.DIN`` built from the same feature columns and sizes (a
        model trained with DeepCTR-Torch keeps its weights). Dice statistics are not copied: DeepCTR-Torch's Dice
        has BatchNorm's gamma and beta, which din_ext's (the paper's) has not."""
        for column in self.user_columns + self.item_columns:
            self.din.embeddings[column.name].weight[1:].copy_(model.embedding_dict[column.embedding_name].weight)
        for name, table in self.pooled_tables.items():
            table.weight[1:].copy_(model.embedding_dict[name].weight)
        attention = model.attention.local_att
        for ours, theirs in zip(self.din.attention.linears, attention.dnn.linears):
            ours.load_state_dict(theirs.state_dict())
        self.din.attention.out.load_state_dict(attention.dense.state_dict())
        for ours, theirs in zip(self.din.attention.activations, attention.dnn.activation_layers):
            if isinstance(theirs, nn.PReLU):
                ours.weight.copy_(theirs.weight.expand_as(ours.weight))
        first, *rest = zip(self.din.tower, model.dnn.linears)
        first[0].bias.copy_(first[1].bias)
        first[0].weight.copy_(first[1].weight[:, self._deepctr_columns()])
        for ours, theirs in rest:
            ours.load_state_dict(theirs.state_dict())
        for i, theirs in enumerate(model.dnn.activation_layers):
            ours = self.din.tower_activations[i]
            layers = list(ours) if isinstance(ours, nn.Sequential) else [ours]
            if getattr(model.dnn, "use_bn", False):
                layers[0].load_state_dict(model.dnn.bn[i].state_dict())
            if isinstance(theirs, nn.PReLU):
                next(m for m in layers if isinstance(m, nn.PReLU)).load_state_dict(theirs.state_dict())
        self.din.heads.weight.copy_(model.dnn_linear.weight)
        self.din.heads.bias.copy_(model.out.bias)
        return self

    def _deepctr_columns(self) -> torch.Tensor:
        """For each input column of din_ext's tower, its column in DeepCTR-Torch's tower input."""
        def layout(parts):
            spans, start = {}, 0
            for key, width in parts:
                spans[key] = (start, start + width)
                start += width
            return spans

        sparse = _grouped(self.user_columns + self.item_columns)
        # DeepCTR-Torch: [sparse embeddings (grouped), pooled sequences, interest, dense]; din_ext: [user, item,
        # interest, dense, pooled sequences].
        interest = sum(c.embedding_dim for c in self.item_columns)
        theirs = layout([(c.name, c.embedding_dim) for c in sparse] + [(c.name, c.embedding_dim)
                                                                       for c in self.pooled_columns]
                        + [("_interest", interest)] + [(c.name, int(c.dimension)) for c in self.dense_columns])
        ours = [(c.name, c.embedding_dim) for c in self.user_columns + self.item_columns] + [("_interest", interest)] \
            + [(c.name, int(c.dimension)) for c in self.dense_columns] + [(c.name, c.embedding_dim)
                                                                          for c in self.pooled_columns]
        return torch.cat([torch.arange(*theirs[key]) for key, _ in ours])


def _safe(fn, true, pred) -> float:
    """The metric, or NaN where it is undefined (one class only)."""
    try:
        return float(fn(true, pred))
    except ValueError:
        return float("nan")


__all__ = ["DIN", "DenseFeat", "History", "SparseFeat", "VarLenSparseFeat", "get_feature_names"]
