"""Streaming mini-batches from a folder written by ``din_ext.data.prepare``: training data larger than memory.

    train, test, schema = open_prepared("prepared/")          # nothing but schema.json and the vocab counts read
    for batch in train.batches(1024, shuffle=True, seed=0):     # Interactions, as iterate_batches yields
        ...

A split streams its shards: in a seeded random order per epoch (``shuffle``), ``shuffle_shards`` shards at a time
loaded and their rows shuffled together (the shuffle buffer: it mixes rows across shards; rows left over at the end
of one window open the next batch), with a background thread that reads, shuffles and gathers up to ``prefetch``
batches ahead of the consumer. Memory holds one window of shards (their impressions and behaviour sequences), never
the dataset. ``rank`` / ``world_size`` give each process of a distributed run its part: a disjoint slice of each
global batch, the global batches in the same shuffled order on every rank (``PreparedSplit``):

    train, test, schema = open_prepared("prepared/", rank=rank, world_size=world_size)
    for batch in train.batches(1024, shuffle=True, seed=epoch):    # 1024 rows per rank, 1024 * world_size a step

``load_prepared`` reads everything back into memory, in the raw files' order (for tests and small data).
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from din_ext.data.build import jagged
from din_ext.data.core import Interactions, Schema, concat
from din_ext.data.prepare_core import FORMAT, item_column, require_polars, user_column

SPLITS = ("train", "test")


def read_schema(path) -> Tuple[dict, Schema]:
    """(schema.json as a dict, the ``Schema`` with its training frequencies) of a prepared folder."""
    pl = require_polars()
    path = Path(path)
    file = path / "schema.json"
    if not file.is_file():
        raise FileNotFoundError(f"prepared: {file} not found; write the folder with din-ext prepare")
    info = json.loads(file.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"prepared: {file} has format {info.get('format')!r}, this din_ext reads {FORMAT}")
    frequencies, vocabularies = {}, {}
    for f in (*info["user_fields"], *info["item_fields"]):
        table = pl.read_parquet(path / "vocab" / f"{f}.parquet", columns=["key", "count"])
        counts = table["count"].to_numpy()
        frequencies[f] = torch.from_numpy(np.concatenate([[info["oov_counts"][f]], counts]).astype(np.int64))
        vocabularies[f] = [None, *table["key"].to_list()]  # raw ids in row order, for serving raw requests
    schema = Schema(user_fields=dict(info["user_fields"]), item_fields=dict(info["item_fields"]),
                    history_fields=tuple(info["history_fields"]), dense_dim=len(info["dense"]),
                    tasks=tuple(info["tasks"]), frequencies=frequencies, vocabularies=vocabularies)
    return info, schema


class _Block:
    """Impressions of one or more shards as numpy columns, with the behaviour sequences their histories index."""

    def __init__(self, columns: Dict[str, np.ndarray], sequences: Dict[str, np.ndarray]):
        self.columns, self.sequences = columns, sequences

    def __len__(self) -> int:
        return self.columns["row"].size

    @classmethod
    def read(cls, folder: Path, split: str) -> "_Block":
        pl = require_polars()
        frame = pl.read_parquet(folder / f"{split}.parquet")
        sequences = pl.read_parquet(folder / "sequences.parquet")
        return cls({c: frame[c].to_numpy() for c in frame.columns},
                   {c: sequences[c].to_numpy() for c in sequences.columns})

    @classmethod
    def join(cls, blocks: List["_Block"]) -> "_Block":
        if len(blocks) == 1:
            return blocks[0]
        shift, columns = 0, {c: [] for c in blocks[0].columns}
        for block in blocks:
            for c, v in block.columns.items():
                columns[c].append(v + shift if c in ("hist_start", "hist_end") else v)
            shift += next(iter(block.sequences.values())).size
        return cls({c: np.concatenate(v) for c, v in columns.items()},
                   {c: np.concatenate([b.sequences[c] for b in blocks]) for c in blocks[0].sequences})

    def take(self, index: np.ndarray, info: dict, max_history: Optional[int]) -> Interactions:
        """Rows ``index`` as ``Interactions``, histories gathered from the sequences (the most recent max_history)."""
        col = self.columns
        long = lambda v: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64))  # noqa: E731
        end = col["hist_end"][index]
        start = col["hist_start"][index]
        if max_history is not None:
            start = np.maximum(start, end - max_history)
        offsets, positions = jagged(start, end - start)
        dense = None
        if info["dense"]:
            dense = torch.from_numpy(np.stack([col[f"dense.{c}"][index] for c in info["dense"]], 1).astype(np.float32))
        return Interactions(
            user_id=long(col["user_id"][index]),
            user={f: long(col[user_column(f)][index]) for f in info["user_fields"]},
            item={f: long(col[item_column(f)][index]) for f in info["item_fields"]},
            hist_offsets=long(offsets),
            hist={f: long(self.sequences[f][positions]) for f in info["history_fields"]},
            labels={t: torch.from_numpy(col[info["label_columns"][t]][index].astype(np.float32))
                    for t in info["tasks"]},
            dense=dense, time=long(col["time"][index]))


class PreparedSplit:
    """The train or test split of a prepared folder, streamed in mini-batches (see the module docstring).

    batches(batch_size, shuffle=, seed=, drop_last=) is the per-epoch iterable factory that din_ext.training.fit
    takes in place of in-memory ``Interactions``. Under data parallelism (``world_size`` > 1) every rank streams
    the same global batches of ``batch_size * world_size`` rows (same shard order, same shuffle: the seed is
    shared) and yields its slice ``[rank * batch_size, (rank + 1) * batch_size)`` of each; the last global batch is
    padded to a multiple of ``world_size`` with its own first rows, so every rank yields as many batches, of equal
    sizes step by step (``drop_last`` drops it instead). ``len()`` is the rows one rank yields per epoch without
    drop_last: ``ceil(rows / world_size)``.
    """

    def __init__(self, path, split: str, info: dict, *, max_history: Optional[int] = None, rank: int = 0,
                 world_size: int = 1, shuffle_shards: int = 2, prefetch: int = 8):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"rank must lie in [0, world_size), got rank {rank}, world_size {world_size}")
        if shuffle_shards < 1 or prefetch < 0:
            raise ValueError(f"shuffle_shards must be >= 1 and prefetch >= 0, got {shuffle_shards}, {prefetch}")
        self.path, self.split, self.info = Path(path), split, info
        prepared = info["options"].get("max_history")
        # the prepared sequences hold the most recent ``prepared`` behaviours of each history, no more
        self.max_history = prepared if max_history is None else (
            max_history if prepared is None else min(max_history, prepared))
        self.rank, self.world_size = rank, world_size
        self.shuffle_shards, self.prefetch = shuffle_shards, prefetch
        self.shards = [s for s in info["shards"] if s[split]]
        self.rows = sum(s[split] for s in self.shards)

    def __len__(self) -> int:
        return -(-self.rows // self.world_size)

    def _windows(self, rng: Optional[np.random.Generator]) -> Iterator[_Block]:
        order = list(range(len(self.shards)))
        if rng is not None:
            order = rng.permutation(len(order)).tolist()
        for i in range(0, len(order), self.shuffle_shards):
            yield _Block.join([_Block.read(self.path / "shards" / self.shards[j]["name"], self.split)
                               for j in order[i:i + self.shuffle_shards]])

    def _global_batches(self, size: int, rng: Optional[np.random.Generator]) -> Iterator[List[tuple]]:
        """Each global batch of ``size`` rows (the last may be smaller) as its pieces ``(block, rows)``, in order:
        a batch that straddles two windows of shards has a piece in each."""
        pending, count = [], 0
        for block in self._windows(rng):
            index = rng.permutation(len(block)) if rng is not None else np.arange(len(block))
            at = 0
            while at < index.size:
                piece = index[at:at + size - count]
                pending.append((block, piece))
                count, at = count + piece.size, at + piece.size
                if count == size:
                    yield pending
                    pending, count = [], 0
        if count:
            yield pending

    def _produce(self, batch_size: int, shuffle: bool, seed: int, drop_last: bool) -> Iterator[Interactions]:
        rng = np.random.default_rng(seed) if shuffle else None
        world = self.world_size
        for pieces in self._global_batches(batch_size * world, rng):
            rows = np.concatenate([p for _, p in pieces])
            if rows.size < batch_size * world and drop_last:
                return
            share = -(-rows.size // world)
            mine = np.arange(self.rank * share, (self.rank + 1) * share) % rows.size  # padded: wraps to the start
            piece_of = np.repeat(np.arange(len(pieces)), [p.size for _, p in pieces])[mine]
            runs = np.flatnonzero(np.diff(piece_of)) + 1  # consecutive positions of one piece: one gather each
            parts = [pieces[int(part[0])][0].take(rows[at], self.info, self.max_history)
                     for part, at in zip(np.split(piece_of, runs), np.split(mine, runs))]
            yield parts[0] if len(parts) == 1 else concat(parts)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False) -> Iterator[Interactions]:
        """This rank's mini-batches of ``batch_size`` rows (the last may be smaller unless drop_last), read ahead
        in a thread."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        produce = lambda: self._produce(batch_size, shuffle, seed, drop_last)  # noqa: E731
        return prefetched(produce, self.prefetch) if self.prefetch else produce()


_END = object()


def prefetched(produce: Callable[[], Iterator], depth: int) -> Iterator:
    """The items of ``produce()``, computed in a background thread up to ``depth`` ahead; its errors re-raise here.

    Closing the iterator early (break, garbage collection) stops the thread.
    """
    items: "queue.Queue" = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in produce():
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put(exc)

    thread = threading.Thread(target=work, name="din_ext-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def open_prepared(path, *, max_history: Optional[int] = None, rank: int = 0, world_size: int = 1,
                  shuffle_shards: int = 2, prefetch: int = 8) -> Tuple[PreparedSplit, PreparedSplit, Schema]:
    """(train, test, schema) of a prepared folder; the splits stream (``PreparedSplit``), nothing else is read.

    max_history: cut histories to the most recent that many (None: as prepared).
    """
    if path is None:
        raise ValueError("prepared: a path to the folder written by din-ext prepare is required")
    info, schema = read_schema(path)
    splits = [PreparedSplit(path, s, info, max_history=max_history, rank=rank, world_size=world_size,
                            shuffle_shards=shuffle_shards, prefetch=prefetch) for s in SPLITS]
    return splits[0], splits[1], schema


def load_prepared(path, *, max_history: Optional[int] = None) -> Tuple[Interactions, Interactions, Schema]:
    """(train, test, schema) of a prepared folder, whole in memory, rows in the order of the raw files."""
    info, schema = read_schema(path)
    out = []
    for split in SPLITS:
        source = PreparedSplit(path, split, info, max_history=max_history)
        block = _Block.join([_Block.read(Path(path) / "shards" / s["name"], split) for s in source.shards])
        out.append(block.take(np.argsort(block.columns["row"], kind="stable"), info, source.max_history))
    return out[0], out[1], schema

