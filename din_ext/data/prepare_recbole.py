"""``prepare("recbole", ...)``: RecBole atomic files, as ``load_recbole`` reads them, into prepared shards.

The .inter file is scanned with polars (tab separated, ``field:type`` header); the .user and .item side files are
read whole by ``load_recbole``'s own ``read_side_table`` (they hold one row per user or item, vocabulary-sized). The
time split's cut is the global quantile, from a count of the distinct time stamps; leave_last_out marks each user's
last interaction by two grouped aggregations. Buckets are ranges of the sorted user tokens.

Negatives (``label="implicit"``): ``load_recbole`` draws them for every interaction in file order, so the
first-round draws are generated in that order before the scan and joined to it row by row (a horizontal concat,
streamed); the later rounds (``NegativeSampler.resolve``) follow, as in ``build.sample_negatives``: the same seed
gives the same negatives.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from din_ext.data import prepare_core as core
from din_ext.data.prepare_core import item_column, user_column
from din_ext.data.recbole import CATEGORY_COLUMNS, align_side, field_name, read_side_table, field_types, atomic_files

_DRAW_ROWS = 1 << 20  # interactions whose first-round negatives are drawn (and written) at a time


def prepare_recbole(path, out, *, name: Optional[str] = None, user_field: str = "user_id",
                    item_field: str = "item_id", rating_field: str = "rating", time_field: str = "timestamp",
                    label: str = "auto", threshold: float = 4.0, negatives: int = 1, history: str = "positive",
                    split_by: str = "time", test_fraction: float = 0.2, max_history: Optional[int] = 100,
                    item_features: Optional[Sequence[str]] = None, user_features: Optional[Sequence[str]] = None,
                    float_buckets: int = 10, user_feature: bool = True, seed: int = 0,
                    memory_limit=core.DEFAULT_MEMORY_LIMIT, shard_rows: Optional[int] = None,
                    log: Optional[Callable[[str], None]] = None) -> dict:
    """Prepare RecBole atomic files into ``out``; returns the schema.json dict.

    Options as ``load_recbole``'s (same defaults, same results: the same sampled negatives for the same seed).
    memory_limit, shard_rows: as ``prepare_taobao``'s (shard_rows counts interactions).
    """
    pl, log, max_history, limit = core.setup(log, max_history, memory_limit)
    for option, value, allowed in (("history", history, ("positive", "all")),
                                   ("split_by", split_by, ("time", "leave_last_out")),
                                   ("label", label, ("auto", "rating", "implicit"))):
        if value not in allowed:
            raise ValueError(f"{option} must be one of {allowed}, got {value!r}")
    if split_by == "time" and not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    inter_path, user_path, item_path = atomic_files(path, name)
    types = field_types(inter_path)  # the columns themselves are checked by the scan
    label = ("rating" if rating_field in types else "implicit") if label == "auto" else label
    if label == "implicit" and (not isinstance(negatives, int) or negatives < 1):
        raise ValueError(f"negatives must be a positive int, got {negatives!r}")
    for side, wanted in ((item_path, item_features), (user_path, user_features)):
        if side is None and wanted:
            kind = "item" if wanted is item_features else "user"
            raise ValueError(f"{kind}_features {list(wanted)} given but there is no .{kind} file")
    options = {"user_field": user_field, "item_field": item_field, "rating_field": rating_field,
               "time_field": time_field if time_field in types else None, "label": label, "threshold": threshold,
               "negatives": negatives if label == "implicit" else 0, "history": history, "split_by": split_by,
               "test_fraction": test_fraction, "max_history": max_history, "item_features": item_features,
               "user_features": user_features, "float_buckets": float_buckets, "user_feature": user_feature,
               "seed": seed}
    files = (inter_path, user_path, item_path)
    return core.run(out, lambda out, scratch: _prepare(pl, files, out, scratch, options, limit, shard_rows, log))


def _prepare(pl, files, out, scratch, options, limit, shard_rows, log):
    inter_path, user_path, item_path = files
    user_field, item_field, time_field = options["user_field"], options["item_field"], options["time_field"]
    columns = {user_field: pl.String, item_field: pl.String}
    if options["label"] == "rating":
        columns[options["rating_field"]] = pl.Float64
    if time_field is not None:
        columns[time_field] = pl.Float64
    raw = core.scan_csv(pl, core.plain(inter_path, scratch), columns, separator="\t", normalize=field_name,
                        nulls=None, row_index_name="row")
    rating = options["rating_field"] if options["label"] == "rating" else None
    raw = raw.select(pl.col("row").cast(pl.Int64), user=pl.col(user_field), item=pl.col(item_field),
                     stamp=pl.col(time_field) if time_field is not None else pl.col("row").cast(pl.Float64),
                     **({"rating": pl.col(rating)} if rating else {}))
    numbers = {name: column for name, column in ((rating, "rating"), (time_field, "stamp")) if name is not None}
    stats = core.collect(raw.select(rows=pl.len(), **{k: v for name, column in numbers.items() for k, v in
                                                      core.bad_rows(pl, name, pl.col(column).is_null()).items()}),
                         inter_path).row(0, named=True)
    if not stats["rows"]:
        raise ValueError(f"{inter_path}, line 2: no interactions after the header")
    core.check_rows(stats, {name: f"column {name!r}: missing or not a number" for name in numbers}, inter_path)
    # a NaN rating is no click (as numpy compares it); polars orders NaN above every number
    click = (pl.col("rating") >= options["threshold"]) & ~pl.col("rating").is_nan() if rating else pl.lit(True)
    user_names, item_names = (core.collect(raw.select(pl.col(c).unique().sort()), inter_path)[c].to_numpy()
                              for c in ("user", "item"))
    users, rows = user_names.size, stats["rows"]
    codes = lambda names, column: pl.DataFrame({column: names, "code": np.arange(names.size)}).lazy()  # noqa: E731

    def coded(frame):
        """``frame`` (rows of ``raw``) with user and item codes, the click and, once known, the test flag."""
        frame = (frame.join(codes(user_names, "user"), on="user").drop("user").rename({"code": "user_id"})
                 .join(codes(item_names, "item"), on="item").drop("item").rename({"code": "item"})
                 .with_columns(click=click).drop("rating", strict=False))
        return frame if test is None else test(frame)

    # the split: every interaction's test flag
    test = None
    if options["split_by"] == "time":
        k = min(int(np.floor((1.0 - options["test_fraction"]) * rows)), rows - 1)
        if time_field is None:  # file order is the time: the k-th interaction starts the test set
            cut = float(k)
        else:
            stamps = core.collect(raw.group_by("stamp").agg(n=pl.len()).sort("stamp"), inter_path)
            cut = float(stamps["stamp"][int(np.searchsorted(np.cumsum(stamps["n"].to_numpy()), k, side="right"))])
        test = lambda frame: frame.with_columns(test=pl.col("stamp") >= cut)  # noqa: E731
    else:  # each user's last interaction: the latest stamp, the last in the file among equal stamps
        plain = coded(raw)
        latest = plain.group_by("user_id").agg(pl.col("stamp").max())
        last = core.collect(plain.join(latest, on=["user_id", "stamp"]).group_by("user_id").agg(pl.col("row").max())
                            .select("row", test=pl.lit(True)), inter_path)
        test = lambda frame: frame.join(last.lazy(), on="row", how="left").with_columns(  # noqa: E731
            pl.col("test").fill_null(False))

    negatives = options["negatives"]
    sampler, source = None, raw
    if negatives:  # first-round negatives in file order, joined to the interactions row by row
        pool = core.collect(coded(raw).filter(~pl.col("test")).select(pl.col("item").unique().sort()), inter_path)
        sampler = core.NegativeSampler(pool["item"].to_numpy(), options["seed"])
        (scratch / "draws").mkdir()
        for j, begin in enumerate(range(0, rows, _DRAW_ROWS)):
            drawn = sampler.draw(min(_DRAW_ROWS, rows - begin) * negatives).reshape(-1, negatives)
            pl.DataFrame({f"d{n}": drawn[:, n] for n in range(negatives)}).write_parquet(
                scratch / "draws" / f"{j:06d}.parquet")
        source = pl.concat([raw, pl.scan_parquet(scratch / "draws" / "*.parquet")], how="horizontal")
    buckets = min(users, core.bucket_count(limit, shard_rows, rows, rows * (1 + negatives)))
    log(f"recbole: {rows:,} interactions of {users:,} users -> {buckets} shard(s)")
    core.sink_buckets(pl, coded(source).with_columns(bucket=pl.col("user_id") * buckets // users),
                      scratch / "inter", inter_path)

    item_side, side_tokens, user_side, user_tokens = {}, {}, {}, {}
    if item_path is not None:
        keys, side_codes, side_tokens = read_side_table(item_path, item_field, options["item_features"],
                                                    CATEGORY_COLUMNS, options["float_buckets"])
        item_side = align_side(keys, side_codes, item_names)
    if user_path is not None:
        keys, side_codes, user_tokens = read_side_table(user_path, user_field, options["user_features"],
                                                    [f for f in field_types(user_path) if f != user_field],
                                                    options["float_buckets"])
        user_side = align_side(keys, side_codes, user_names)
    identity = lambda codes: codes  # noqa: E731
    item_fields = {item_field: identity, **{f: c.__getitem__ for f, c in item_side.items()}}
    user_fields = ({user_field: identity} if options["user_feature"] else {}) | {
        f: c.__getitem__ for f, c in user_side.items()}

    hist_counts = {f: {} for f in item_fields}
    sizes, rejected = {"train": 0, "test": 0}, []
    schema = {"row": pl.Int64, "stamp": pl.Float64, "click": pl.Boolean, "user_id": pl.Int64, "item": pl.Int64,
              "test": pl.Boolean, **{f"d{n}": pl.Int64 for n in range(negatives)}}
    for k in range(buckets):
        frame = core.read_bucket(pl, scratch / "inter", k, schema).sort(["user_id", "stamp", "row"])
        col = {c: frame[c].to_numpy() for c in frame.columns}
        per = 1 + negatives  # impressions per interaction: itself, then its negatives
        candidate = np.stack([col["item"]] + [col[f"d{n}"] for n in range(negatives)], 1)
        draw = np.stack([np.full(frame.height, -1)] + [col["row"] * negatives + n for n in range(negatives)], 1)
        if negatives:
            bad = sampler.forbidden(np.repeat(col["user_id"], negatives), candidate[:, 1:].reshape(-1),
                                    col["user_id"], col["item"])
            sampler.reject(draw[:, 1:].reshape(-1)[bad], np.repeat(col["user_id"], negatives)[bad])
            if bad.any():
                rejected.append(k)
        candidate, draw = candidate.reshape(-1), draw.reshape(-1)
        click = np.stack([col["click"]] + [np.zeros(frame.height, bool)] * negatives, 1).reshape(-1)
        source = np.repeat(np.arange(frame.height), per)
        user, test = col["user_id"][source], col["test"][source]
        sizes["test"] += int(test.sum())
        sizes["train"] += int(test.size - test.sum())
        imp = pl.DataFrame({"row": (col["row"][:, None] * per + np.arange(per)).reshape(-1), "user_id": user,
                            "time": np.floor(col["stamp"][source]).astype(np.int64), "test": test,
                            **{user_column(f): lookup(user) for f, lookup in user_fields.items()},
                            **{item_column(f): lookup(candidate) for f, lookup in item_fields.items()},
                            "label.click": click.astype(np.float32), "draw": draw})
        events = col["click"] if options["history"] == "positive" else np.ones(frame.height, bool)
        event_item = col["item"][events]
        seq = pl.DataFrame({"user_id": col["user_id"][events],
                            **{f: lookup(event_item) for f, lookup in item_fields.items()}})
        rank = np.unique(np.concatenate([col["stamp"][events], col["stamp"]]), return_inverse=True)[1].reshape(-1)
        core.store_bucket(pl, scratch, k, imp, seq, rank[:event_item.size], rank[event_item.size:][source],
                          options["max_history"], hist_counts)
    if not sizes["train"] or not sizes["test"]:
        raise ValueError(f"the {options['split_by']} split leaves {sizes['train']} training and {sizes['test']} "
                         "test impressions")
    if negatives:
        sampler.settle(pl, scratch, scratch / "inter", rejected, {
            item_column(item_field): None, **{item_column(f): c for f, c in item_side.items()}}, inter_path)
    return core.finish(pl, out, scratch, range(buckets), dataset="recbole", user_fields=tuple(user_fields),
                       item_fields=tuple(item_fields), history_fields=tuple(item_fields), dense=[],
                       hist_counts=hist_counts,
                       names={**side_tokens, **user_tokens, user_field: user_names, item_field: item_names},
                       options=options, log=log)
