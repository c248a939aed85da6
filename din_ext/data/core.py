"""The in-memory form every din_ext data source produces: columnar impressions with jagged behaviour histories.

One row is one impression (a user shown a candidate item): user-profile ids, candidate item ids, the user's
behaviour history before that impression (jagged: ``hist_offsets`` into ``hist`` columns), optional dense
features, and one label per task. Ids are already mapped to table rows: 0 is the padding/OOV row of every
field, so vocabulary sizes include it. ``Schema`` says which fields exist and how large their tables are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

OOV = 0  # row 0 of every table: ids unseen in training and padding


@dataclass
class Schema:
    """The fields of a dataset. Behaviour-history fields share the embedding tables of the item fields."""

    user_fields: Dict[str, int]                 # user-profile field -> table size (including row 0)
    item_fields: Dict[str, int]                 # candidate item field -> table size (including row 0)
    history_fields: Tuple[str, ...]             # item fields that also appear in the behaviour history
    dense_dim: int = 0                          # width of the optional dense features
    tasks: Tuple[str, ...] = ("click",)         # label columns, one head each
    frequencies: Dict[str, torch.Tensor] = field(default_factory=dict)  # field -> [table size] training counts
    # field -> the raw id of every table row in row order (ints or strings; entry 0, the OOV/padding row, is a
    # placeholder such as None): what serving maps a request's raw ids through. Empty: rows only.
    vocabularies: Dict[str, List[Any]] = field(default_factory=dict)

    def __post_init__(self):
        unknown = [f for f in self.history_fields if f not in self.item_fields]
        if unknown:
            raise ValueError(f"history_fields {unknown} are not item fields {list(self.item_fields)}")
        if not self.tasks:
            raise ValueError("tasks must name at least one label column")
        sizes = {**self.user_fields, **self.item_fields}
        for name, vocabulary in self.vocabularies.items():
            if name not in sizes:
                raise ValueError(f"vocabularies[{name!r}]: not a user or item field {list(sizes)}")
            if len(vocabulary) != sizes[name]:
                raise ValueError(f"vocabularies[{name!r}] has {len(vocabulary)} entries (row 0 included), but the "
                                 f"table has {sizes[name]} rows")


@dataclass
class Interactions:
    """Impressions as columns: S rows, N = hist_offsets[-1] behaviour rows in total."""

    user_id: torch.Tensor                       # [S] int64 grouping key (GAUC groups by it)
    user: Dict[str, torch.Tensor]               # field -> [S] int64
    item: Dict[str, torch.Tensor]               # field -> [S] int64
    hist_offsets: torch.Tensor                  # [S + 1] int64, hist_offsets[0] = 0
    hist: Dict[str, torch.Tensor]               # history field -> [N] int64
    labels: Dict[str, torch.Tensor]             # task -> [S] float32 in {0, 1}
    dense: Optional[torch.Tensor] = None        # [S, dense_dim] float32
    time: Optional[torch.Tensor] = None         # [S] int64 timestamp of the impression, for time splits

    def __len__(self) -> int:
        return self.user_id.shape[0]

    @property
    def hist_lengths(self) -> torch.Tensor:
        return self.hist_offsets[1:] - self.hist_offsets[:-1]

    def validate(self, schema: Schema) -> "Interactions":
        """Check shapes and id ranges against ``schema``; raises ValueError naming the column."""
        rows = len(self)
        offsets = self.hist_offsets
        if offsets.dtype != torch.long or offsets.shape != (rows + 1,) or (rows + 1 and int(offsets[0]) != 0):
            raise ValueError(f"hist_offsets must be int64 [S + 1 = {rows + 1}] starting at 0")
        if rows and bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError("hist_offsets must be non-decreasing")
        total = int(offsets[-1])
        for kind, columns, sizes, length in (("user", self.user, schema.user_fields, rows),
                                             ("item", self.item, schema.item_fields, rows),
                                             ("hist", self.hist, {f: schema.item_fields[f]
                                                                  for f in schema.history_fields}, total)):
            if set(columns) != set(sizes):
                raise ValueError(f"{kind} columns {sorted(columns)} do not match the schema's {sorted(sizes)}")
            for name, col in columns.items():
                if col.dtype != torch.long or col.shape != (length,):
                    raise ValueError(f"{kind}[{name!r}] must be int64 [{length}], got {col.dtype} "
                                     f"{tuple(col.shape)}")
                if length and (int(col.min()) < 0 or int(col.max()) >= sizes[name]):
                    raise ValueError(f"{kind}[{name!r}] has ids outside [0, {sizes[name]})")
        if set(self.labels) != set(schema.tasks):
            raise ValueError(f"labels {sorted(self.labels)} do not match the schema's tasks {list(schema.tasks)}")
        for name, col in self.labels.items():
            if col.shape != (rows,) or not col.is_floating_point():
                raise ValueError(f"labels[{name!r}] must be float [{rows}]")
        if schema.dense_dim:
            if self.dense is None or tuple(self.dense.shape) != (rows, schema.dense_dim):
                raise ValueError(f"dense must be float [{rows}, {schema.dense_dim}]")
        elif self.dense is not None:
            raise ValueError("dense features given but schema.dense_dim is 0")
        if self.user_id.shape != (rows,):
            raise ValueError(f"user_id must be [{rows}]")
        return self

    def take(self, index: torch.Tensor) -> "Interactions":
        """The rows ``index`` (int64, any order), with their histories gathered into a new jagged layout."""
        index = torch.as_tensor(index, dtype=torch.long)
        lengths = self.hist_lengths[index]
        offsets = torch.zeros(index.numel() + 1, dtype=torch.long)
        torch.cumsum(lengths, 0, out=offsets[1:])
        # behaviour row positions: start of each taken row + arange within it
        starts = self.hist_offsets[:-1][index]
        within = torch.arange(int(offsets[-1]), dtype=torch.long) - torch.repeat_interleave(offsets[:-1], lengths)
        rows = torch.repeat_interleave(starts, lengths) + within
        return Interactions(
            user_id=self.user_id[index],
            user={k: v[index] for k, v in self.user.items()},
            item={k: v[index] for k, v in self.item.items()},
            hist_offsets=offsets,
            hist={k: v[rows] for k, v in self.hist.items()},
            labels={k: v[index] for k, v in self.labels.items()},
            dense=None if self.dense is None else self.dense[index],
            time=None if self.time is None else self.time[index],
        )

    def truncate_history(self, max_len: int) -> "Interactions":
        """Keep only the most recent ``max_len`` behaviours of each row (histories are time-ordered)."""
        lengths = self.hist_lengths
        keep = lengths.clamp(max=max_len)
        offsets = torch.zeros_like(self.hist_offsets)
        torch.cumsum(keep, 0, out=offsets[1:])
        ends = self.hist_offsets[1:]
        within = torch.arange(int(offsets[-1]), dtype=torch.long) - torch.repeat_interleave(offsets[:-1], keep)
        rows = torch.repeat_interleave(ends - keep, keep) + within
        return Interactions(self.user_id, self.user, self.item, offsets, {k: v[rows] for k, v in self.hist.items()},
                            self.labels, self.dense, self.time)

    def to(self, device) -> "Interactions":
        move = lambda d: {k: v.to(device, non_blocking=True) for k, v in d.items()}  # noqa: E731
        return Interactions(self.user_id.to(device), move(self.user), move(self.item),
                            self.hist_offsets.to(device), move(self.hist), move(self.labels),
                            None if self.dense is None else self.dense.to(device),
                            None if self.time is None else self.time.to(device))


def iterate_batches(data: Interactions, batch_size: int, *, shuffle: bool = False, bucket: bool = False,
                    seed: int = 0, drop_last: bool = False) -> Iterator[Interactions]:
    """Mini-batches of ``data`` as jagged ``Interactions``.

    shuffle: a seeded random order. bucket: rows are grouped by history length within windows of 64 batches
    (then the batches are shuffled), so a batch's histories are of similar length and the kernels waste nothing.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rows = len(data)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(rows, generator=g) if shuffle else torch.arange(rows)
    if bucket:
        window = batch_size * 64
        lengths = data.hist_lengths
        chunks = []
        for start in range(0, rows, window):
            part = order[start:start + window]
            chunks.append(part[torch.argsort(lengths[part], stable=True)])
        order = torch.cat(chunks) if chunks else order
    batches = [order[i:i + batch_size] for i in range(0, rows, batch_size)]
    if drop_last and batches and batches[-1].numel() < batch_size:
        batches.pop()
    if bucket and shuffle:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    for index in batches:
        yield data.take(index)


def concat(parts) -> Interactions:
    """Row-wise concatenation of ``Interactions`` with the same columns."""
    parts = list(parts)
    if not parts:
        raise ValueError("concat needs at least one part")
    offsets = [parts[0].hist_offsets]
    base = int(parts[0].hist_offsets[-1])
    for p in parts[1:]:
        offsets.append(p.hist_offsets[1:] + base)
        base += int(p.hist_offsets[-1])
    cat = lambda key: {k: torch.cat([getattr(p, key)[k] for p in parts]) for k in getattr(parts[0], key)}  # noqa
    opt = lambda key: None if getattr(parts[0], key) is None else torch.cat([getattr(p, key) for p in parts])  # noqa
    hist = {k: torch.cat([p.hist[k][:int(p.hist_offsets[-1])] for p in parts]) for k in parts[0].hist}
    return Interactions(torch.cat([p.user_id for p in parts]), cat("user"), cat("item"), torch.cat(offsets), hist,
                        cat("labels"), opt("dense"), opt("time"))
