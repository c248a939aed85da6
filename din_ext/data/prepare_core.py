"""The machinery every preparer shares (``din_ext.data.prepare`` documents the layout it writes).

A preparer scans its raw files with polars' streaming engine, partitions the rows by user into buckets that each fit
the memory limit (``bucket_count``), and hands each bucket's impressions and behaviours to ``store_bucket``, which
places every history in its user's sequence and writes the bucket to the scratch folder. ``NegativeSampler``
draws sampled negatives bucket by bucket exactly as ``din_ext.data.build.sample_negatives`` draws them whole.
``finish`` fits the vocabularies on the training rows, encodes and writes the shards, the vocabularies and
schema.json.

Column names inside the scratch and shard files: ``row`` (the order of the in-memory loader's rows), ``user_id``,
``test``, ``time``, ``hist_start`` / ``hist_end``, and ``user.<field>``, ``item.<field>``, ``dense.<name>``,
``label.<task>`` (prefixed, so that a field may be called ``user_id`` or ``time``); sequences hold the history
fields under their own names.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np

from din_ext._validate import first_line
from din_ext.data.build import check_max_history, history_bounds
from din_ext.data.readers import MISSING, read_header
from din_ext.data.vocab import Vocabulary, locate

logger = logging.getLogger("din_ext")

FORMAT = 2                      # version of the prepared layout, in schema.json (2: prefixed field columns)
NULLS = ["NULL", "null", "NaN", "nan"]  # with '' (polars' empty_string_is_null): missing id values
BYTES_PER_BEHAVIOUR = 160       # peak bytes per behaviour row while a bucket is sorted and joined in memory
BYTES_PER_IMPRESSION = 400      # the same per impression row (about 20 columns and their copies)
BASELINE_BYTES = 450 << 20      # the process before any data: python, torch, din_ext, polars
DEFAULT_MEMORY_LIMIT = 2 << 30
MAX_SHARD_ROWS = 4_000_000      # behaviour rows of a bucket at most, whatever the memory limit allows


def require_polars():
    """polars, or an ImportError that says how to install it (the optional extra ``din_ext[data]``)."""
    try:
        import polars
    except ImportError:
        raise ImportError("din_ext.data.prepare and din_ext.data.stream need polars and pyarrow: "
                          "pip install 'din_ext[data]' (or: pip install polars pyarrow)") from None
    return polars


def parse_memory(value) -> int:
    """Bytes of a memory size: an int, or text such as ``2G``, ``1500M``, ``512MiB``, ``3.5GB``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        size = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(value), flags=re.IGNORECASE)
        if match is None:
            raise ValueError(f"memory_limit {value!r} is not a size such as 2G, 1500M or 2147483648")
        size = float(match.group(1)) * 1024 ** "_kmgt".index((match.group(2) or "_").lower())
    if not size > BASELINE_BYTES + (64 << 20):
        raise ValueError(f"memory_limit {value!r} is too small: at least {(BASELINE_BYTES >> 20) + 64} MiB "
                         "(the process alone takes about that)")
    return int(size)


def setup(log, max_history, memory_limit):
    """(polars, the log function, the checked max_history, the memory limit in bytes) of a preparer's options."""
    return require_polars(), log or logger.info, check_max_history(max_history), parse_memory(memory_limit)


def user_column(field: str) -> str:
    return f"user.{field}"


def item_column(field: str) -> str:
    return f"item.{field}"


def run(out, body: Callable[[Path, Path], dict]) -> dict:
    """``body(out, scratch)`` with ``out`` a new (or empty) folder and ``scratch`` inside it, removed afterwards."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"out {str(out)!r} is not empty; prepare into a new folder")
    scratch = out / "_scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        return body(out, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def plain(path: Path, scratch: Path) -> Path:
    """``path``, or a decompressed copy in ``scratch`` when it is gzip'd (polars scans plain text only)."""
    with open(path, "rb") as probe:
        if probe.read(2) != b"\x1f\x8b":
            return path
    target = scratch / path.name.removesuffix(".gz")
    with gzip.open(path, "rb") as source, open(target, "wb") as sink:
        shutil.copyfileobj(source, sink, 1 << 22)
    return target


def rows_estimate(path: Path, limit: Optional[int] = None) -> int:
    """About how many data rows ``path`` holds, from the length of its first lines (the file is not read)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    lines = max(head.count(b"\n"), 1)
    rows = int(os.path.getsize(path) / (len(head) / lines)) + 1
    return rows if limit is None else min(rows, limit)


def bucket_count(limit: int, shard_rows: Optional[int], behaviours: int, impressions: int) -> int:
    """How many user buckets make one bucket's behaviours and impressions (together) fit the memory limit ``limit``;
    shard_rows: at most that many behaviours a bucket (default ``MAX_SHARD_ROWS``)."""
    room = limit - BASELINE_BYTES
    need = behaviours * BYTES_PER_BEHAVIOUR + impressions * BYTES_PER_IMPRESSION
    return max(1, math.ceil(behaviours / (shard_rows or MAX_SHARD_ROWS)), math.ceil(need / room))


def scan_csv(pl, path: Path, dtypes: Dict[str, object], *, separator: str = ",",
             normalize: Callable[[str], str] = str.strip, nulls: Optional[List[str]] = NULLS, **options):
    """A lazy scan of a delimited file with a header, names passed through ``normalize``; ``dtypes``: the columns
    used. nulls: the texts (besides '') that are missing values; None: none, and '' is an empty string."""
    header = read_header(path, separator, normalize)
    missing = [c for c in dtypes if c not in header]
    if missing:
        raise ValueError(f"{path}, line 1: header {list(header)} lacks the column(s) {missing}")
    index = [options["row_index_name"]] if "row_index_name" in options else []
    return pl.scan_csv(path, separator=separator, new_columns=list(header), schema_overrides=dtypes,
                       null_values=nulls, empty_string_is_null=nulls is not None, quote_char=None,
                       **options).select(index + list(dtypes))


def _polars_errors(path, call):
    try:
        return call()
    except Exception as exc:  # polars raises its own ComputeError, SchemaError, ... for malformed text
        if type(exc).__module__.split(".")[0] != "polars":
            raise
        raise ValueError(f"{path}: {first_line(exc)}") from None


def collect(frame, path):
    """``frame.collect()`` with polars' errors (a row that does not parse) as a ValueError naming the file."""
    return _polars_errors(path, lambda: frame.collect(engine="streaming"))


def sink_buckets(pl, frame, target: Path, path) -> None:
    """Write ``frame`` (with a ``bucket`` column) to ``target/bucket=<k>/``, streaming; errors name ``path``."""
    _polars_errors(path, lambda: frame.sink_parquet(pl.PartitionBy(target, key="bucket", include_key=False),
                                                    mkdir=True, engine="streaming"))


def read_bucket(pl, folder: Path, k: int, schema: Dict[str, object]):
    """Bucket ``k`` of a ``sink_buckets`` folder, whole (an empty frame of ``schema`` when no row fell in it)."""
    part = folder / f"bucket={k}"
    return pl.read_parquet(part) if part.exists() else pl.DataFrame(schema=schema)


def check_rows(stats: dict, checks: Dict[str, str], path, first_line_of_data: int = 2) -> None:
    """Raise on the first bad row of each check: ``stats`` holds ``any_<name>`` and ``bad_<name>`` (the row index of
    the first bad row) from a scan; ``checks``: name -> what is wrong, for the message."""
    for name, what in checks.items():
        if stats[f"any_{name}"]:
            raise ValueError(f"{path}, line {stats[f'bad_{name}'] + first_line_of_data}: {what}")


def bad_rows(pl, name: str, bad) -> dict:
    """The expressions ``check_rows`` reads for the condition ``bad`` (a boolean polars expression)."""
    return {f"any_{name}": bad.any(), f"bad_{name}": bad.arg_max()}


def windows(beh_user, beh_key, imp_user, imp_key, train, max_history: Optional[int]):
    """Histories as windows into the behaviours: behaviours sorted by (user, key), impression i's history is the
    user's behaviours with a key strictly below ``imp_key[i]``, the most recent ``max_history``.

    Returns (hist_start, hist_end) into the kept behaviours, keep (the behaviours some history holds) and coverage
    (for each kept behaviour, how many training histories hold it: its weight in the vocabularies).
    """
    first, end = history_bounds(beh_user, beh_key, imp_user, imp_key)
    events = len(beh_user)
    start = first if max_history is None else np.maximum(first, end - max_history)
    used = end > start
    delta = np.bincount(start[used], minlength=events + 1) - np.bincount(end[used], minlength=events + 1)
    keep = np.cumsum(delta[:-1]) > 0
    kept_before = np.zeros(events + 1, dtype=np.int64)
    np.cumsum(keep, out=kept_before[1:])
    train = train & used
    cover = np.bincount(start[train], minlength=events + 1) - np.bincount(end[train], minlength=events + 1)
    return kept_before[start], kept_before[end], keep, np.cumsum(cover[:-1])[keep]


def store_bucket(pl, scratch: Path, k: int, imp, seq, beh_key, imp_key, max_history: Optional[int],
                 hist_counts: Dict[str, Dict]) -> None:
    """Write bucket ``k``: impressions ``imp`` (``user_id``, ``test``, ...) with their history windows into ``seq``
    (behaviours sorted by user then ``beh_key``: ``user_id`` and the history fields), and the behaviours some
    history holds; add the training histories' occurrences of each history field to ``hist_counts``."""
    start, end, keep, coverage = windows(seq["user_id"].to_numpy(), beh_key, imp["user_id"].to_numpy(), imp_key,
                                         ~imp["test"].to_numpy(), max_history)
    kept = seq.drop("user_id").filter(pl.Series(keep))
    for f, total in hist_counts.items():
        grouped = kept.with_columns(coverage=pl.Series(coverage)).group_by(f).agg(pl.col("coverage").sum())
        add(total, dict(zip(grouped[f].to_list(), grouped["coverage"].to_list())))
    imp.with_columns(hist_start=pl.Series(start), hist_end=pl.Series(end)).write_parquet(scratch / f"imp-{k}.parquet")
    kept.write_parquet(scratch / f"seq-{k}.parquet")


def add(total: Dict, part: Dict) -> None:
    for key, n in part.items():
        total[key] = total.get(key, 0) + n


def counts(pl, frame, column: str) -> Dict:
    table = frame.group_by(column).agg(pl.len().alias("n")).collect(engine="streaming")
    return dict(zip(table[column].to_list(), table["n"].to_list()))


def vocabulary(occurrences: Dict, strings: bool = False):
    """(Vocabulary, frequencies int64 [V]) of training counts ``raw id -> n``; row 0 counts the missing ids."""
    known = {k: n for k, n in occurrences.items() if k is not None and k != MISSING and n > 0}
    keys = np.array(sorted(known), dtype=str if strings else np.int64)
    oov = sum(n for k, n in occurrences.items() if k is None or k == MISSING)
    freq = np.array([oov] + [known[k] for k in keys.tolist()], dtype=np.int64)
    return Vocabulary(keys), np.maximum(freq, 1)


def encode(vocab: Vocabulary, values: np.ndarray) -> np.ndarray:
    if vocab.keys.dtype.kind in "US":
        values = np.array(["" if v is None else v for v in values.tolist()], dtype=str)
    return vocab.encode(values).numpy()


class NegativeSampler:
    """``build.sample_negatives(users, pool, ..., np.random.default_rng(seed))`` of one long sequence of impressions,
    drawn piece by piece in that sequence's order (a Generator's draws do not depend on how a request is split).

    ``draw(n)`` gives the first-round items of the next n impressions; ``reject(keys, users)`` records the ones that
    hit an item of their user (keys: their positions in the sequence); ``resolve(pairs_of)`` runs the later rounds,
    one draw for all rejected impressions in sequence order each, as sample_negatives does, and returns
    ``{key: item}``; ``settle`` resolves and writes the results into the stored buckets. pool: the sorted item
    codes to sample from.
    """

    def __init__(self, pool: np.ndarray, seed: int, max_rounds: int = 64):
        self.pool, self.max_rounds = np.asarray(pool, np.int64), max_rounds
        self.rng = np.random.default_rng(seed)
        self.keys: List[np.ndarray] = []
        self.users: List[np.ndarray] = []

    def draw(self, n: int) -> np.ndarray:
        if n and not self.pool.size:
            raise ValueError("cannot sample negatives: the pool of items is empty")
        return self.pool[self.rng.integers(0, self.pool.size, n)] if n else np.zeros(0, np.int64)

    @staticmethod
    def forbidden(users, items, pair_users, pair_items) -> np.ndarray:
        """Which (users[i], items[i]) are among the pairs (pair_users, pair_items) (all codes >= 0)."""
        space = int(max(np.max(items, initial=0), np.max(pair_items, initial=0))) + 1
        known = np.sort(np.asarray(pair_users, np.int64) * space + np.asarray(pair_items, np.int64))
        return locate(known, np.asarray(users, np.int64) * space + np.asarray(items, np.int64))[1]

    def reject(self, keys: np.ndarray, users: np.ndarray) -> None:
        self.keys.append(np.asarray(keys, np.int64))
        self.users.append(np.asarray(users, np.int64))

    def resolve(self, pairs_of: Callable[[np.ndarray], tuple]) -> Dict[int, int]:
        """pairs_of(users): the (user, item) pairs of those users, forbidden as negatives."""
        keys = np.concatenate([np.zeros(0, np.int64), *self.keys])
        order = np.argsort(keys, kind="stable")
        keys, users = keys[order], np.concatenate([np.zeros(0, np.int64), *self.users])[order]
        out = np.zeros(keys.size, np.int64)
        redo = np.arange(keys.size)
        if not keys.size:
            return {}
        pair_users, pair_items = pairs_of(np.unique(users))
        for _ in range(self.max_rounds - 1):  # the first round's check was reject()'s caller's
            out[redo] = self.draw(redo.size)
            redo = redo[self.forbidden(users[redo], out[redo], pair_users, pair_items)]
            if not redo.size:
                return dict(zip(keys.tolist(), out.tolist()))
        raise ValueError(f"cannot sample negatives for {redo.size} impressions: their users interacted with "
                         "(almost) every item of the pool")

    def settle(self, pl, scratch: Path, folder: Path, buckets: Iterable[int],
               columns: Dict[str, Optional[np.ndarray]], path) -> None:
        """Run the later rounds and rewrite the impressions of ``buckets`` (those with rejected draws) with their
        final negatives. folder: the ``sink_buckets`` folder whose ``user_id`` / ``item`` pairs are the forbidden
        ones; columns: impression column -> the lookup from item code to its value (None: the item code itself);
        the impressions' ``draw`` column holds each negative's key (-1 on other rows)."""
        def pairs_of(users):
            frame = collect(pl.scan_parquet(folder / "**" / "*.parquet").filter(pl.col("user_id").is_in(users))
                            .select("user_id", "item"), path)
            return frame["user_id"].to_numpy(), frame["item"].to_numpy()

        fixed = self.resolve(pairs_of)
        keys = np.fromiter(fixed, np.int64, len(fixed))
        for k in buckets:
            file = scratch / f"imp-{k}.parquet"
            imp = pl.read_parquet(file)
            draw = imp["draw"].to_numpy()
            hit = np.flatnonzero(np.isin(draw, keys))
            items = np.array([fixed[d] for d in draw[hit].tolist()], np.int64)
            updates = {}
            for column, lookup in columns.items():
                values = imp[column].to_numpy().copy()
                values[hit] = items if lookup is None else lookup[items]
                updates[column] = pl.Series(values)
            imp.with_columns(**updates).write_parquet(file)


def finish(pl, out: Path, scratch: Path, buckets: Iterable[int], *, dataset: str, user_fields: Sequence[str],
           item_fields: Sequence[str], history_fields: Sequence[str], dense: Sequence[str],
           hist_counts: Dict[str, Dict], names: Dict[str, np.ndarray], strings: Sequence[str] = (),
           options: dict, log) -> dict:
    """Fit the vocabularies on the stored training rows, encode and write the shards, vocab/ and schema.json.

    names: field -> the raw id of each code (fields whose raw values are codes of interned strings); strings: the
    fields whose raw values are strings themselves. Returns the schema.json dict.
    """
    buckets = list(buckets)
    stored = pl.scan_parquet([scratch / f"imp-{k}.parquet" for k in buckets])
    train = stored.filter(~pl.col("test"))
    columns = {f: user_column(f) for f in user_fields} | {f: item_column(f) for f in item_fields}
    occurrences = {f: counts(pl, train, c) for f, c in columns.items()}
    for f, part in hist_counts.items():
        add(occurrences[f], part)
    vocabs, frequencies = {}, {}
    (out / "vocab").mkdir(exist_ok=True)
    for f, c in occurrences.items():
        vocabs[f], frequencies[f] = vocabulary(c, strings=f in strings)
        keys = vocabs[f].keys if f not in names else np.asarray(names[f])[vocabs[f].keys]
        pl.DataFrame({"key": keys, "count": frequencies[f][1:]}).write_parquet(out / "vocab" / f"{f}.parquet")

    shards = []
    for k in buckets:
        directory = out / "shards" / f"{k:05d}"
        directory.mkdir(parents=True)
        seq = pl.read_parquet(scratch / f"seq-{k}.parquet")
        pl.DataFrame({f: encode(vocabs[f], seq[f].to_numpy()).astype(np.int32) for f in history_fields}
                     ).write_parquet(directory / "sequences.parquet")
        imp = pl.read_parquet(scratch / f"imp-{k}.parquet")
        table = imp.drop("test", "draw", strict=False).with_columns(
            **{c: pl.Series(encode(vocabs[f], imp[c].to_numpy())) for f, c in columns.items()})
        test = imp["test"].to_numpy()
        info = {"name": f"{k:05d}", "sequences": seq.height}
        for split, mask in (("train", ~test), ("test", test)):
            part = table.filter(pl.Series(mask))
            part.write_parquet(directory / f"{split}.parquet", row_group_size=65536)
            info[split] = part.height
        shards.append(info)
        (scratch / f"seq-{k}.parquet").unlink()
        (scratch / f"imp-{k}.parquet").unlink()

    schema = {
        "format": FORMAT, "dataset": dataset,
        "user_fields": {f: len(vocabs[f]) for f in user_fields},
        "item_fields": {f: len(vocabs[f]) for f in item_fields},
        "history_fields": list(history_fields), "dense": list(dense), "tasks": ["click"],
        "label_columns": {"click": "label.click"},
        "oov_counts": {f: int(frequencies[f][0]) for f in vocabs},
        "options": options,
        "rows": {"train": sum(s["train"] for s in shards), "test": sum(s["test"] for s in shards),
                 "sequences": sum(s["sequences"] for s in shards)},
        "shards": shards,
    }
    (out / "schema.json").write_text(json.dumps(schema, indent=1))
    log(f"{dataset}: {schema['rows']['train']:,} train / {schema['rows']['test']:,} test impressions, "
        f"{schema['rows']['sequences']:,} stored behaviours in {len(shards)} shard(s) -> {out}")
    return schema
