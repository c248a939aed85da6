"""``prepare("amazon", ...)``: an Amazon reviews + meta pair, as ``load_amazon`` reads it, into prepared shards.

The reviews file is scanned with polars' NDJSON reader: strict JSON lines with ``reviewerID``, ``asin`` (strings)
and ``unixReviewTime`` (an integer), as the published files are (``load_amazon`` also reads Python dict literals;
those lines are a clear error here, naming the file). Line numbers in errors count the non-blank lines. The meta
file is read by ``load_amazon``'s own ``read_categories`` (a pass over it that keeps only the reviewed items'
categories), so both see the same categories.

Buckets are ranges of the sorted reviewer ids, so that walking them in order walks the reviews in the order that
``load_amazon`` sorts them (user, time, file order). That is the order its negatives are drawn in, and
``NegativeSampler`` draws them bucket by bucket: the same seed gives the same negatives.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from din_ext.data import prepare_core as core
from din_ext.data.amazon import META_FILES, REVIEW_FILES, resolve_file, read_categories
from din_ext.data.prepare_core import item_column, user_column
from din_ext.data.readers import MISSING, require_path

_FIELDS = {"reviewerID": "user_id", "asin": "item", "unixReviewTime": "time"}


def prepare_amazon(path, out, *, reviews_file=None, meta_file=None, max_history: Optional[int] = 100, seed: int = 0,
                   user_feature: bool = True, strict_meta: bool = False, memory_limit=core.DEFAULT_MEMORY_LIMIT,
                   shard_rows: Optional[int] = None, log: Optional[Callable[[str], None]] = None) -> dict:
    """Prepare an Amazon reviews + meta pair into ``out``; returns the schema.json dict.

    Options as ``load_amazon``'s (same defaults, same results: the same sampled negatives for the same seed).
    memory_limit, shard_rows: as ``prepare_taobao``'s (shard_rows counts reviews).
    """
    pl, log, max_history, limit = core.setup(log, max_history, memory_limit)
    path = require_path(path, "amazon")
    reviews_path = resolve_file(path, reviews_file, REVIEW_FILES, "amazon reviews")
    meta_path = resolve_file(path if path.is_dir() else reviews_path.parent, meta_file, META_FILES, "amazon meta")
    options = {"max_history": max_history, "seed": seed, "user_feature": user_feature, "strict_meta": strict_meta}
    return core.run(out, lambda out, scratch: _prepare(pl, reviews_path, meta_path, out, scratch, options, limit,
                                                       shard_rows, log))


def _prepare(pl, reviews_path, meta_path, out, scratch, options, limit, shard_rows, log):
    scan = pl.scan_ndjson(core.plain(reviews_path, scratch), row_index_name="row",
                          schema={"reviewerID": pl.String, "asin": pl.String, "unixReviewTime": pl.Int64})
    scan = scan.select(pl.col("row").cast(pl.Int64), **{new: pl.col(old) for old, new in _FIELDS.items()})
    checks = {old: pl.col(new).is_null() for old, new in _FIELDS.items()}
    stats = core.collect(scan.select(rows=pl.len(), **{k: v for c, bad in checks.items()
                                                       for k, v in core.bad_rows(pl, c, bad).items()}),
                         reviews_path).row(0, named=True)
    if not stats["rows"]:
        raise ValueError(f"{reviews_path}, line 1: no reviews: the file is empty or blank")
    core.check_rows(stats, {c: f"missing field {c!r} (or null)" for c in checks}, reviews_path, 1)
    user_names, item_names = (core.collect(scan.select(pl.col(c).unique().sort()), reviews_path)[c].to_numpy()
                              for c in ("user_id", "item"))
    categories = read_categories(meta_path, set(item_names.tolist()), options["strict_meta"])
    cate_names = np.array([categories.get(a, "") for a in item_names.tolist()], dtype=str)
    known = np.array([a in categories for a in item_names.tolist()], dtype=bool)
    cate_labels = np.unique(cate_names[known])
    cate_of_item = np.where(known, np.searchsorted(cate_labels, cate_names), MISSING).astype(np.int64)

    users = user_names.size
    buckets = min(users, core.bucket_count(limit, shard_rows, stats["rows"], 2 * stats["rows"]))
    log(f"amazon: {stats['rows']:,} reviews of {users:,} users -> {buckets} shard(s)")
    codes = lambda names, column: pl.DataFrame({column: names, "code": np.arange(names.size)}).lazy()  # noqa: E731
    coded = (scan.join(codes(user_names, "user_id"), on="user_id").drop("user_id").rename({"code": "user_id"})
             .join(codes(item_names, "item"), on="item").drop("item").rename({"code": "item"})
             .with_columns(bucket=pl.col("user_id") * buckets // users))
    core.sink_buckets(pl, coded, scratch / "reviews", reviews_path)

    # the pool of negatives: the items of the training reviews (every review but each user's last)
    pool = np.unique(np.concatenate([np.zeros(0, np.int64)] + [
        review["item"][~review["last"]] for review in (_reviews(pl, scratch, k) for k in range(buckets))]))
    sampler = core.NegativeSampler(pool, options["seed"])
    hist_counts = {"item": {}, "cate": {}}
    done, rejected = 0, []
    for k in range(buckets):  # in user order: the order load_amazon draws the negatives in
        review = _reviews(pl, scratch, k)
        user, item, position = review["user_id"], review["item"], review["position"]
        at = np.flatnonzero(position >= 1)  # reviews that become impressions: a positive and a negative row each
        keys = done + np.arange(at.size)
        negative = sampler.draw(at.size)
        bad = sampler.forbidden(user[at], negative, user, item)
        sampler.reject(keys[bad], user[at][bad])
        if bad.any():
            rejected.append(k)
        pair = lambda a, b: np.stack([a, b], 1).reshape(-1)  # noqa: E731
        candidate = pair(item[at], negative)
        two = lambda v: np.repeat(v, 2)  # noqa: E731
        imp = pl.DataFrame({"row": pair(2 * keys, 2 * keys + 1), "user_id": two(user[at]),
                            "time": two(review["time"][at]), "test": two(review["last"][at]),
                            **({user_column("user"): two(user[at])} if options["user_feature"] else {}),
                            item_column("item"): candidate, item_column("cate"): cate_of_item[candidate],
                            "label.click": np.tile(np.array([1.0, 0.0], np.float32), at.size),
                            "draw": pair(np.full(at.size, -1), keys)})
        seq = pl.DataFrame({"user_id": user, "item": item, "cate": cate_of_item[item]})
        core.store_bucket(pl, scratch, k, imp, seq, position, two(position[at]), options["max_history"], hist_counts)
        done += at.size
    if not done:
        raise ValueError(f"{reviews_path}: no impressions: every user has a single review")

    sampler.settle(pl, scratch, scratch / "reviews", rejected,
                   {item_column("item"): None, item_column("cate"): cate_of_item}, reviews_path)
    return core.finish(pl, out, scratch, range(buckets), dataset="amazon",
                       user_fields=("user",) if options["user_feature"] else (), item_fields=("item", "cate"),
                       history_fields=("item", "cate"), dense=[], hist_counts=hist_counts,
                       names={"user": user_names, "item": item_names, "cate": cate_labels}, options=options,
                       log=log)


def _reviews(pl, scratch, k: int) -> dict:
    """Bucket ``k``'s reviews as numpy columns, sorted by (user, time, file order), with each review's position
    among its user's and whether it is the user's last."""
    frame = core.read_bucket(pl, scratch / "reviews", k, {c: pl.Int64 for c in ("row", "time", "user_id", "item")})
    frame = frame.sort(["user_id", "time", "row"])
    out = {c: frame[c].to_numpy() for c in ("user_id", "item", "time")}
    user = out["user_id"]
    new = np.r_[True, user[1:] != user[:-1]][:user.size]  # a user's first review
    first, group = np.flatnonzero(new), np.cumsum(new) - 1
    size = np.diff(np.r_[first, user.size])
    out["position"] = np.arange(user.size) - first[group]
    out["last"] = out["position"] == size[group] - 1
    return out
