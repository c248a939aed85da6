"""Streaming, memory-bounded preparation of a click log into parquet shards that ``din_ext.data.stream`` reads.

    prepare("taobao", "raw/", "prepared/", memory_limit="2G")      # or: din-ext prepare --data taobao ...

The raw files are scanned with polars' streaming engine and partitioned by user into buckets (``user % K``, K chosen
so that one bucket fits the memory limit); each bucket is then sorted and joined in memory on its own. The result
has the semantics of the in-memory loader (``load_taobao``): the same vocabularies (fitted on the training split,
histories included), frequencies, histories (the user's behaviours strictly before the impression, the most recent
``max_history``), time split and features. Layout of ``out``:

    schema.json                       fields, table sizes, OOV counts, options, shards and their row counts
    vocab/<field>.parquet             key (raw id of rows 1..V-1, sorted), count (training occurrences)
    shards/<k>/sequences.parquet      the bucket's users' behaviours that some history holds, one row each
                                      (history fields, encoded): each user's sequence once, oldest first
    shards/<k>/{train,test}.parquet   impressions: row (line in the raw file - 2), user_id, the user and item
                                      fields (encoded), dense, labels, time, hist_start / hist_end (the
                                      impression's history is sequences[hist_start:hist_end])

Peak memory: one bucket (its behaviours and impressions) plus polars' streaming buffers, bounded by
``memory_limit``; the vocabularies and the set of users with impressions are held whole (small next to the log).
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
from typing import Callable, Dict, Iterable, Optional

import numpy as np

from din_ext._validate import first_line
from din_ext.data.build import check_max_history, history_bounds
from din_ext.data.readers import find_file, read_header, require_path
from din_ext.data.taobao import AD_FIELDS, BTAGS, DAY, PROFILE_FIELDS
from din_ext.data.vocab import Vocabulary

logger = logging.getLogger("din_ext")

FORMAT = 1                      # version of the prepared layout, in schema.json
MISSING = -1                    # the raw code of a missing id (as in din_ext.data.readers)
_NULLS = ["NULL", "null", "NaN", "nan"]  # with '' (polars' empty_string_is_null): missing id values
BYTES_PER_BEHAVIOUR = 160       # peak bytes per behaviour row while a bucket is sorted and joined in memory
BYTES_PER_IMPRESSION = 400      # the same per impression row (about 20 columns and their copies)
BASELINE_BYTES = 450 << 20      # the process before any data: python, torch, din_ext, polars
DEFAULT_MEMORY_LIMIT = 2 << 30


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


def _plain(path: Path, scratch: Path) -> Path:
    """``path``, or a decompressed copy in ``scratch`` when it is gzip'd (polars scans plain text only)."""
    with open(path, "rb") as probe:
        if probe.read(2) != b"\x1f\x8b":
            return path
    target = scratch / path.name.removesuffix(".gz")
    with gzip.open(path, "rb") as source, open(target, "wb") as sink:
        shutil.copyfileobj(source, sink, 1 << 22)
    return target


def _rows_estimate(path: Path, limit: Optional[int] = None) -> int:
    """About how many data rows ``path`` holds, from the length of its first lines (the file is not read)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    lines = max(head.count(b"\n"), 1)
    rows = int(os.path.getsize(path) / (len(head) / lines)) + 1
    return rows if limit is None else min(rows, limit)


def _scan(pl, path: Path, dtypes: Dict[str, object], **options):
    """A lazy scan of a comma-separated file with a header, names stripped; ``dtypes``: the columns used."""
    header = read_header(path, ",")
    missing = [c for c in dtypes if c not in header]
    if missing:
        raise ValueError(f"{path}, line 1: header {list(header)} lacks the column(s) {missing}")
    index = [options["row_index_name"]] if "row_index_name" in options else []
    return pl.scan_csv(path, new_columns=list(header), schema_overrides=dtypes, null_values=_NULLS,
                       quote_char=None, **options).select(index + list(dtypes))


def _collect(frame, path):
    """``frame.collect()`` with polars' errors (a row that does not parse) as a ValueError naming the file."""
    try:
        return frame.collect(engine="streaming")
    except Exception as exc:  # polars raises its own ComputeError, SchemaError, ... for malformed text
        if type(exc).__module__.split(".")[0] != "polars":
            raise
        raise ValueError(f"{path}: {first_line(exc)}") from None


def _sink(frame, target, path) -> None:
    try:
        frame.sink_parquet(target, mkdir=True, engine="streaming")
    except Exception as exc:
        if type(exc).__module__.split(".")[0] != "polars":
            raise
        raise ValueError(f"{path}: {first_line(exc)}") from None


def _counts(pl, frame, column: str) -> Dict[int, int]:
    table = frame.group_by(column).agg(pl.len().alias("n")).collect(engine="streaming")
    return dict(zip(table[column].to_list(), table["n"].to_list()))


def _vocabulary(counts: Dict, strings: bool = False):
    """(Vocabulary, frequencies int64 [V]) of training counts ``raw id -> n``; row 0 counts the missing ids."""
    known = {k: n for k, n in counts.items() if k is not None and k != MISSING and n > 0}
    keys = np.array(sorted(known), dtype=str if strings else np.int64)
    oov = sum(n for k, n in counts.items() if k is None or k == MISSING)
    freq = np.array([oov] + [known[k] for k in keys.tolist()], dtype=np.int64)
    return Vocabulary(keys), np.maximum(freq, 1)


def _add(total: Dict, part: Dict) -> None:
    for key, n in part.items():
        total[key] = total.get(key, 0) + n


def _table(pl, path: Path, columns: Dict[str, object], key: str):
    """A small side table, whole, keeping the first row of each ``key`` (as the in-memory loader)."""
    frame = _collect(_scan(pl, path, columns), path)
    return frame.unique(subset=key, keep="first", maintain_order=True)


def _arrays(frame) -> Dict[str, np.ndarray]:
    return {c: frame[c].to_numpy() for c in frame.columns}


def prepare_taobao(path, out, *, max_history: Optional[int] = 50, btags: Optional[Iterable[str]] = None,
                   test_start: Optional[int] = None, price: bool = True, pid: bool = True,
                   behavior_rows: Optional[int] = None, memory_limit=DEFAULT_MEMORY_LIMIT,
                   shard_rows: Optional[int] = None, log: Optional[Callable[[str], None]] = None) -> dict:
    """Prepare the four Taobao csv files in ``path`` into ``out``; returns the schema.json dict.

    Options as ``load_taobao``'s (same defaults, same results). memory_limit: bytes or text (``2G``) that the peak
    memory should stay within. shard_rows: at most about that many behaviour rows per shard (default: what the
    memory limit allows, at most 4M; the stream holds a shard or two at a time).
    """
    pl = require_polars()
    log = log or logger.info
    max_history = check_max_history(max_history)
    limit = parse_memory(memory_limit)
    if btags is not None:
        btags = list(btags)
        unknown = [b for b in btags if b not in BTAGS]
        if unknown:
            raise ValueError(f"btags must be among {BTAGS}, got {unknown}")
    path = require_path(path, "taobao")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"out {str(out)!r} is not empty; prepare into a new folder")
    scratch = out / "_scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        return _prepare_taobao(pl, path, out, scratch, max_history, btags, test_start, price, pid, behavior_rows,
                               limit, shard_rows, log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _prepare_taobao(pl, path, out, scratch, max_history, btags, test_start, price, pid, behavior_rows, limit,
                    shard_rows, log):
    files = {name: _plain(find_file(path, (f"{name}.csv",), f"taobao {name}"), scratch)
             for name in ("raw_sample", "ad_feature", "user_profile", "behavior_log")}
    sample_path, log_path = files["raw_sample"], files["behavior_log"]

    # buckets: one must fit the memory limit in the per-bucket pass
    room = limit - BASELINE_BYTES
    per_bucket = max(1, min(shard_rows or 4_000_000, room // BYTES_PER_BEHAVIOUR))
    behaviours = _rows_estimate(log_path, behavior_rows)
    impressions = _rows_estimate(sample_path)
    buckets = max(1, math.ceil(behaviours / per_bucket), math.ceil(impressions * BYTES_PER_IMPRESSION / room))
    log(f"taobao: about {behaviours:,} behaviour and {impressions:,} impression rows -> {buckets} shard(s)")

    # impressions, checked, with their ad and profile columns, partitioned by bucket
    sample = _scan(pl, sample_path, {"user": pl.Int64, "time_stamp": pl.Int64, "adgroup_id": pl.Int64,
                                     "pid": pl.String, "clk": pl.Int64}, row_index_name="row"
                   ).with_columns(pl.col("pid").fill_null(""))
    stats = _collect(sample.select(
        rows=pl.len(), t_max=pl.col("time_stamp").max(),
        bad_clk=(~pl.col("clk").is_in([0, 1]) | pl.col("clk").is_null()).arg_max(),
        any_clk=(~pl.col("clk").is_in([0, 1]) | pl.col("clk").is_null()).any(),
        any_user=(pl.col("user").is_null() | (pl.col("user") < 0)).any(),
        bad_user=(pl.col("user").is_null() | (pl.col("user") < 0)).arg_max(),
        any_time=(pl.col("time_stamp").is_null() | (pl.col("time_stamp") < 0)).any(),
        bad_time=(pl.col("time_stamp").is_null() | (pl.col("time_stamp") < 0)).arg_max()), sample_path).row(
        0, named=True)
    if not stats["rows"]:
        raise ValueError(f"{sample_path}, line 2: no impressions after the header")
    for column in ("clk", "user", "time"):
        if stats[f"any_{column}"]:
            name = "time_stamp" if column == "time" else column
            raise ValueError(f"{sample_path}, line {stats[f'bad_{column}'] + 2}: column {name!r}: invalid or "
                             "missing value")
    cut = (int(stats["t_max"]) // DAY) * DAY if test_start is None else int(test_start)

    ads = _table(pl, files["ad_feature"], {"adgroup_id": pl.Int64, "cate_id": pl.Int64, "campaign_id": pl.Int64,
                                          "customer": pl.Int64, "brand": pl.Int64, "price": pl.Float64},
                 "adgroup_id")
    assert set(ads.columns) == set(AD_FIELDS)
    profile = _table(pl, files["user_profile"], {"userid": pl.Int64, **{f: pl.Int64 for f in PROFILE_FIELDS}},
                     "userid")
    ads = ads.rename({"adgroup_id": "_ad", "cate_id": "cate", "campaign_id": "campaign"}).with_columns(
        _found=pl.lit(True))
    price_value = pl.col("price").fill_nan(0.0).fill_null(0.0)
    dense = pl.when(pl.col("_found")).then(price_value.clip(lower_bound=0.0).log1p()).otherwise(0.0)
    item_fields = ["adgroup", "cate", "brand", "campaign", "customer"] + (["pid"] if pid else [])
    impressions_lf = (
        sample.join(ads.lazy(), left_on="adgroup_id", right_on="_ad", how="left")
        .join(profile.lazy(), left_on="user", right_on="userid", how="left")
        .with_columns(pl.col(["cate", "brand", "campaign", "customer", *PROFILE_FIELDS]).fill_null(MISSING),
                      price=dense.cast(pl.Float32), click=pl.col("clk").cast(pl.Float32),
                      test=pl.col("time_stamp") >= cut, bucket=pl.col("user") % buckets)
        .rename({"adgroup_id": "adgroup", "time_stamp": "time"})
        .select(["row", "user", "time", "test", *PROFILE_FIELDS, *item_fields, "price", "click", "bucket"]))
    _sink(impressions_lf, pl.PartitionBy(scratch / "impressions", key="bucket", include_key=False), sample_path)
    stored = pl.scan_parquet(scratch / "impressions" / "**" / "*.parquet")
    split = _collect(stored.select(test=pl.col("test").sum(), rows=pl.len()), sample_path).row(0, named=True)
    if split["test"] in (0, split["rows"]):
        raise ValueError(f"test_start={cut} leaves {split['rows'] - split['test']} training and {split['test']} "
                         "test impressions; both must be non-empty")

    # behaviours of the users with impressions, partitioned by the same buckets
    users = _collect(stored.select(pl.col("user").unique()), sample_path)
    log_lf = _scan(pl, log_path, {"user": pl.Int64, "time_stamp": pl.Int64, "btag": pl.String, "cate": pl.Int64,
                                  "brand": pl.Int64}, row_index_name="row")
    if behavior_rows is not None:
        log_lf = log_lf.head(behavior_rows)
    if btags is not None:
        log_lf = log_lf.filter(pl.col("btag").is_in(btags))
    log_lf = (log_lf.join(users.lazy(), on="user", how="semi")
              .select("user", pl.col("time_stamp").alias("time"), pl.col(["cate", "brand"]).fill_null(MISSING),
                      "row", bucket=pl.col("user") % buckets))
    _sink(log_lf, pl.PartitionBy(scratch / "behaviours", key="bucket", include_key=False), log_path)

    # pass 1, per bucket: histories as positions in each user's sequence; training counts of the history fields
    train = stored.filter(~pl.col("test"))
    counts = {f: _counts(pl, train, f) for f in (*PROFILE_FIELDS, *item_fields)}
    hist_counts = {"cate": {}, "brand": {}}
    filled = [k for k in range(buckets) if (scratch / "impressions" / f"bucket={k}").exists()]
    for k in filled:
        imp, seq = _bucket(pl, scratch, k, max_history)
        for f, total in hist_counts.items():
            grouped = seq.group_by(f).agg(pl.col("coverage").sum())
            _add(total, dict(zip(grouped[f].to_list(), grouped["coverage"].to_list())))
        imp.write_parquet(scratch / f"imp-{k}.parquet")
        seq.select("cate", "brand").write_parquet(scratch / f"seq-{k}.parquet")
    for f, part in hist_counts.items():
        _add(counts[f], part)

    vocabs, frequencies = {}, {}
    for f, c in counts.items():
        vocabs[f], frequencies[f] = _vocabulary(c, strings=f == "pid")
    (out / "vocab").mkdir(exist_ok=True)
    for f, vocab in vocabs.items():
        pl.DataFrame({"key": vocab.keys, "count": frequencies[f][1:]}).write_parquet(out / "vocab" / f"{f}.parquet")

    # pass 2, per bucket: encode and write the shards
    shards = []
    for k in filled:
        directory = out / "shards" / f"{k:05d}"
        directory.mkdir(parents=True)
        seq = pl.read_parquet(scratch / f"seq-{k}.parquet")
        encoded_seq = {f: _encode(vocabs[f], seq[f].to_numpy()).astype(np.int32) for f in ("cate", "brand")}
        pl.DataFrame(encoded_seq).write_parquet(directory / "sequences.parquet")
        imp = pl.read_parquet(scratch / f"imp-{k}.parquet")
        encoded = {"row": imp["row"].to_numpy().astype(np.int64), "user_id": imp["user"].to_numpy()}
        for f in (*PROFILE_FIELDS, *item_fields):
            encoded[f] = _encode(vocabs[f], imp[f].to_numpy())
        encoded.update({c: imp[c].to_numpy() for c in ("price", "click", "time", "hist_start", "hist_end")})
        table = pl.DataFrame(encoded)
        test = imp["test"].to_numpy()
        info = {"name": f"{k:05d}", "sequences": seq.height}
        for name, mask in (("train", ~test), ("test", test)):
            part = table.filter(pl.Series(mask))
            part.write_parquet(directory / f"{name}.parquet", row_group_size=65536)
            info[name] = part.height
        shards.append(info)
        (scratch / f"seq-{k}.parquet").unlink()
        (scratch / f"imp-{k}.parquet").unlink()

    schema = {
        "format": FORMAT, "dataset": "taobao",
        "user_fields": {f: len(vocabs[f]) for f in PROFILE_FIELDS},
        "item_fields": {f: len(vocabs[f]) for f in item_fields},
        "history_fields": ["cate", "brand"], "dense": ["price"] if price else [], "tasks": ["click"],
        "label_columns": {"click": "click"},
        "oov_counts": {f: int(frequencies[f][0]) for f in vocabs},
        "options": {"max_history": max_history, "btags": btags, "test_start": cut, "price": price, "pid": pid,
                    "behavior_rows": behavior_rows},
        "rows": {"train": sum(s["train"] for s in shards), "test": sum(s["test"] for s in shards),
                 "sequences": sum(s["sequences"] for s in shards)},
        "shards": shards,
    }
    (out / "schema.json").write_text(json.dumps(schema, indent=1))
    log(f"taobao: {schema['rows']['train']:,} train / {schema['rows']['test']:,} test impressions, "
        f"{schema['rows']['sequences']:,} stored behaviours in {len(shards)} shard(s) -> {out}")
    return schema


def _encode(vocab: Vocabulary, values: np.ndarray) -> np.ndarray:
    if vocab.keys.dtype.kind in "US":
        values = np.array(["" if v is None else v for v in values.tolist()], dtype=str)
    return vocab.encode(values).numpy()


def _bucket(pl, scratch: Path, k: int, max_history: Optional[int]):
    """Bucket ``k``'s impressions with hist_start / hist_end, and its users' behaviours that some history uses,
    each user's contiguous and in time order (ties in file order), with ``coverage``: how many training histories
    hold that behaviour (its weight in the vocabularies and frequencies)."""
    imp = pl.read_parquet(scratch / "impressions" / f"bucket={k}")
    folder = scratch / "behaviours" / f"bucket={k}"
    if folder.exists():
        beh = pl.read_parquet(folder).sort(["user", "time", "row"])
    else:
        beh = pl.DataFrame({"user": [], "time": [], "cate": [], "brand": [], "row": []},
                           schema={c: pl.Int64 for c in ("user", "time", "cate", "brand", "row")})
    first, end = history_bounds(beh["user"].to_numpy(), beh["time"].to_numpy(), imp["user"].to_numpy(),
                                imp["time"].to_numpy())
    events = beh.height
    start = first if max_history is None else np.maximum(first, end - max_history)
    # keep the behaviours that some history holds (the union of the windows start:end)
    used = end > start
    delta = np.bincount(start[used], minlength=events + 1) - np.bincount(end[used], minlength=events + 1)
    keep = np.cumsum(delta[:-1]) > 0
    kept_before = np.zeros(events + 1, dtype=np.int64)
    np.cumsum(keep, out=kept_before[1:])
    hist_start, hist_end = kept_before[start], kept_before[end]
    # coverage of each kept behaviour by the training histories
    train = ~imp["test"].to_numpy() & used
    cover = np.bincount(start[train], minlength=events + 1) - np.bincount(end[train], minlength=events + 1)
    coverage = np.cumsum(cover[:-1])[keep]
    seq = beh.filter(pl.Series(keep)).select("cate", "brand").with_columns(coverage=pl.Series(coverage))
    imp = imp.with_columns(hist_start=pl.Series(hist_start), hist_end=pl.Series(hist_end))
    return imp, seq


PREPARERS = {"taobao": prepare_taobao}


def prepare(name: str, path, out, **options) -> dict:
    """Prepare raw data of format ``name`` (``PREPARERS``) into the folder ``out``; returns its schema.json dict."""
    if name not in PREPARERS:
        raise ValueError(f"prepare supports {sorted(PREPARERS)}, got {name!r}")
    return PREPARERS[name](path, out, **options)
