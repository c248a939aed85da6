"""Vocabularies (raw id -> table row) fitted on training data, and per-row training frequencies for MBA.

Row 0 of every table is the padding / OOV row: ids never seen in training and missing values map to it.
Rows 1..V-1 hold the ids seen in training, in sorted order of the raw id, so a vocabulary is a pure function
of the set of training ids (reproducible, independent of file order).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from din_ext.data.core import OOV, Interactions, Schema


def _as_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


class Vocabulary:
    """Maps raw ids (strings or integers) to rows 1..V-1; anything not in it maps to row 0 (OOV).

    keys: the known raw ids, sorted and unique; row ``i + 1`` is ``keys[i]``. ``len(vocab)`` is the table size
    V including row 0.
    """

    def __init__(self, keys):
        keys = _as_numpy(keys).ravel()
        if keys.size and not bool(np.all(keys[1:] > keys[:-1])):
            raise ValueError("Vocabulary keys must be sorted and unique (use Vocabulary.build)")
        self.keys = keys

    @classmethod
    def build(cls, *values, missing=None) -> "Vocabulary":
        """The vocabulary of every id in ``values`` (arrays, tensors or lists), except ``missing``."""
        parts = [_as_numpy(v).ravel() for v in values]
        allv = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if missing is not None:
            allv = allv[allv != missing]
        if allv.dtype.kind in "iu" and allv.size and 0 <= allv.min() and allv.max() < _dense_limit(allv.size):
            return cls(np.flatnonzero(np.bincount(allv)).astype(allv.dtype))  # dense codes: O(n), no sort
        return cls(np.unique(allv))

    def __len__(self) -> int:
        return int(self.keys.size) + 1

    def __contains__(self, key) -> bool:
        return bool(self.encode(np.asarray([key]))[0] != OOV)

    def encode(self, values) -> torch.Tensor:
        """Raw ids -> int64 rows (same shape); unknown ids -> 0."""
        v = _as_numpy(values)
        if self.keys.dtype.kind in "US" and v.dtype.kind not in "US":
            v = v.astype(str)
        elif self.keys.dtype.kind not in "US" and v.dtype.kind in "US":
            raise TypeError(f"this vocabulary holds {self.keys.dtype} ids, got strings")
        if not self.keys.size:
            return torch.zeros(v.shape, dtype=torch.long)
        dense = self.keys.dtype.kind in "iu" and v.dtype.kind in "iu" and 0 <= self.keys[0] \
            and self.keys[-1] < _dense_limit(v.size + self.keys.size)
        if dense:
            # dense integer codes: one gather from a row table instead of a binary search per value
            top = int(self.keys[-1])
            table = np.zeros(top + 2, dtype=np.int64)
            table[self.keys] = np.arange(1, self.keys.size + 1)
            inside = (v >= 0) & (v <= top)
            return torch.from_numpy(np.where(inside, table[np.where(inside, v, top + 1)], OOV).astype(np.int64))
        pos, found = locate(self.keys, v)
        rows = np.where(found, pos + 1, OOV)
        return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))

    def decode(self, rows) -> np.ndarray:
        """Rows -> raw ids (object array); row 0 -> None."""
        rows = _as_numpy(rows).astype(np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise ValueError(f"rows must lie in [0, {len(self)})")
        out = np.empty(rows.shape, dtype=object)
        known = rows > 0
        out[known] = self.keys[rows[known] - 1]
        return out

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self)})"


def search_sorted(keys: np.ndarray, values: np.ndarray, side: str = "left") -> np.ndarray:
    """``np.searchsorted(keys, values)``, several times faster for many values: searching them in sorted order
    walks ``keys`` once instead of missing the cache on every lookup."""
    values = np.asarray(values)
    if values.size < 4096 or values.ndim != 1:
        return np.searchsorted(keys, values, side=side)
    order = np.argsort(values, kind="stable")
    out = np.empty(values.size, dtype=np.int64)
    out[order] = np.searchsorted(keys, values[order], side=side)
    return out


def locate(keys: np.ndarray, values: np.ndarray):
    """(position in sorted unique ``keys``, found mask) of each of ``values``; position is clipped in range."""
    values = np.asarray(values)
    if not keys.size:
        return np.zeros(values.shape, np.int64), np.zeros(values.shape, bool)
    pos = np.minimum(search_sorted(keys, values.reshape(-1)).reshape(values.shape), keys.size - 1)
    return pos, keys[pos] == values


def _dense_limit(n: int) -> int:
    """Largest integer id for which a table of that many entries is cheap next to ``n`` values."""
    return 8 * n + (1 << 20)


def intern(values) -> Tuple[np.ndarray, np.ndarray]:
    """Raw ids -> (int64 codes, names) with ``names[codes] == values`` and ``names`` sorted."""
    names, codes = np.unique(_as_numpy(values), return_inverse=True)
    return codes.astype(np.int64).reshape(-1), names


def intern_strings(values: list) -> Tuple[np.ndarray, np.ndarray]:
    """Like ``intern`` for a Python list of strings, with one dict lookup per value and a sort of the distinct
    values only (several times faster than sorting millions of strings)."""
    index: Dict[str, int] = {}
    codes = np.fromiter((index.setdefault(v, len(index)) for v in values), dtype=np.int64, count=len(values))
    names = np.array(list(index), dtype=str) if index else np.zeros(0, dtype=str)
    order = np.argsort(names, kind="stable")
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    return rank[codes], names[order]


def count_frequencies(data: Interactions, schema: Schema) -> Dict[str, torch.Tensor]:
    """Training occurrences of every row of every table: ``field -> int64 [table size]``.

    An item field counts both impressions (candidates) and behaviour-history occurrences; a user field counts
    impressions. Every entry is >= 1 (MBA divides by it): rows 1..V-1 of a vocabulary fitted on ``data`` occur
    at least once by construction, and row 0 holds the number of training occurrences that are missing or OOV,
    raised to 1 when there are none.
    """
    out = {}
    for name, size in schema.user_fields.items():
        out[name] = torch.bincount(data.user[name], minlength=size)
    for name, size in schema.item_fields.items():
        counts = torch.bincount(data.item[name], minlength=size)
        if name in schema.history_fields:
            counts = counts + torch.bincount(data.hist[name], minlength=size)
        out[name] = counts
    return {name: counts.clamp_(min=1) for name, counts in out.items()}


def _raw_ids(keys: np.ndarray, names: Optional[np.ndarray]) -> list:
    """The raw ids of a vocabulary's codes, as Python ints or strings."""
    return (keys if names is None else np.asarray(names)[keys]).tolist()


def fit_and_encode(train: Interactions, test: Interactions, *, user_fields, item_fields, history_fields,
                   tasks=("click",), dense_dim: int = 0, missing: int = -1, names: Optional[Mapping] = None):
    """Fit one vocabulary per field on ``train`` (raw int codes), encode both splits, and build the ``Schema``.

    train, test: ``Interactions`` whose id columns hold raw integer codes (``missing`` for absent values).
    An item field that appears in histories gets one vocabulary over its candidate and history columns, since
    the two share an embedding table. names: field -> array with ``names[code]`` the raw id a code stands for
    (fields whose codes were interned from strings); other fields' codes are their raw ids. The schema's
    ``vocabularies`` get each table's raw ids in row order (row 0, OOV/padding: None), for serving raw requests.
    Returns ``(train, test, schema, vocabularies)``, both splits validated.
    """
    vocabs: Dict[str, Vocabulary] = {}
    for f in user_fields:
        vocabs[f] = Vocabulary.build(train.user[f], missing=missing)
    for f in item_fields:
        columns = [train.item[f]] + ([train.hist[f]] if f in history_fields else [])
        vocabs[f] = Vocabulary.build(*columns, missing=missing)

    def encode(raw: Interactions) -> Interactions:
        return Interactions(
            user_id=raw.user_id,
            user={f: vocabs[f].encode(raw.user[f]) for f in user_fields},
            item={f: vocabs[f].encode(raw.item[f]) for f in item_fields},
            hist_offsets=raw.hist_offsets,
            hist={f: vocabs[f].encode(raw.hist[f][:int(raw.hist_offsets[-1])]) for f in history_fields},
            labels=raw.labels, dense=raw.dense, time=raw.time)

    schema = Schema(user_fields={f: len(vocabs[f]) for f in user_fields},
                    item_fields={f: len(vocabs[f]) for f in item_fields},
                    history_fields=tuple(history_fields), dense_dim=dense_dim, tasks=tuple(tasks))
    schema.vocabularies = {f: [None, *_raw_ids(vocab.keys, (names or {}).get(f))] for f, vocab in vocabs.items()}
    train_enc, test_enc = encode(train), encode(test)
    schema.frequencies = count_frequencies(train_enc, schema)
    return train_enc.validate(schema), test_enc.validate(schema), schema, vocabs
