"""``prepare("taobao", ...)``: the four Taobao csv files, as ``load_taobao`` reads them, into prepared shards.

Buckets by ``user % K``. Impressions are joined with their ad and profile rows in the streaming scan; a bucket's
histories are its users' behaviours strictly before each impression's time stamp (ties in file order).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from din_ext.data import prepare_core as core
from din_ext.data.prepare_core import item_column, user_column
from din_ext.data.readers import MISSING, find_file, require_path
from din_ext.data.taobao import AD_FIELDS, BTAGS, DAY, PROFILE_FIELDS


def prepare_taobao(path, out, *, max_history: Optional[int] = 50, btags: Optional[Iterable[str]] = None,
                   test_start: Optional[int] = None, price: bool = True, pid: bool = True,
                   behavior_rows: Optional[int] = None, memory_limit=core.DEFAULT_MEMORY_LIMIT,
                   shard_rows: Optional[int] = None, log: Optional[Callable[[str], None]] = None) -> dict:
    """Prepare the four Taobao csv files in ``path`` into ``out``; returns the schema.json dict.

    Options as ``load_taobao``'s (same defaults, same results). memory_limit: bytes or text (``2G``) that the peak
    memory should stay within. shard_rows: at most about that many behaviour rows per shard (default: what the
    memory limit allows, at most 4M; the stream holds a shard or two at a time).
    """
    pl, log, max_history, limit = core.setup(log, max_history, memory_limit)
    if btags is not None:
        btags = list(btags)
        unknown = [b for b in btags if b not in BTAGS]
        if unknown:
            raise ValueError(f"btags must be among {BTAGS}, got {unknown}")
    path = require_path(path, "taobao")
    options = {"max_history": max_history, "btags": btags, "test_start": test_start, "price": price, "pid": pid,
               "behavior_rows": behavior_rows}
    return core.run(out, lambda out, scratch: _prepare(pl, path, out, scratch, options, limit, shard_rows, log))


def _prepare(pl, path, out, scratch, options, limit, shard_rows, log):
    files = {name: core.plain(find_file(path, (f"{name}.csv",), f"taobao {name}"), scratch)
             for name in ("raw_sample", "ad_feature", "user_profile", "behavior_log")}
    sample_path, log_path = files["raw_sample"], files["behavior_log"]
    behaviours = core.rows_estimate(log_path, options["behavior_rows"])
    impressions = core.rows_estimate(sample_path)
    buckets = core.bucket_count(limit, shard_rows, behaviours, impressions)
    log(f"taobao: about {behaviours:,} behaviour and {impressions:,} impression rows -> {buckets} shard(s)")

    # impressions, checked, with their ad and profile columns, partitioned by bucket
    sample = core.scan_csv(pl, sample_path, {"user": pl.Int64, "time_stamp": pl.Int64, "adgroup_id": pl.Int64,
                                             "pid": pl.String, "clk": pl.Int64}, row_index_name="row"
                           ).with_columns(pl.col("pid").fill_null(""))
    checks = {"clk": ~pl.col("clk").is_in([0, 1]) | pl.col("clk").is_null(),
              "user": pl.col("user").is_null() | (pl.col("user") < 0),
              "time_stamp": pl.col("time_stamp").is_null() | (pl.col("time_stamp") < 0)}
    stats = core.collect(sample.select(rows=pl.len(), t_max=pl.col("time_stamp").max(),
                                       **{k: v for c, bad in checks.items() for k, v in
                                          core.bad_rows(pl, c, bad).items()}), sample_path).row(0, named=True)
    if not stats["rows"]:
        raise ValueError(f"{sample_path}, line 2: no impressions after the header")
    core.check_rows(stats, {c: f"column {c!r}: invalid or missing value" for c in checks}, sample_path)
    test_start = options["test_start"]
    cut = (int(stats["t_max"]) // DAY) * DAY if test_start is None else int(test_start)
    options["test_start"] = cut

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
    item_fields = ["adgroup", "cate", "brand", "campaign", "customer"] + (["pid"] if options["pid"] else [])
    impressions_lf = (
        sample.join(ads.lazy(), left_on="adgroup_id", right_on="_ad", how="left")
        .join(profile.lazy(), left_on="user", right_on="userid", how="left")
        .with_columns(pl.col(["cate", "brand", "campaign", "customer", *PROFILE_FIELDS]).fill_null(MISSING),
                      bucket=pl.col("user") % buckets)
        .select("row", pl.col("user").alias("user_id"), pl.col("time_stamp").alias("time"),
                test=pl.col("time_stamp") >= cut,
                **{user_column(f): pl.col(f) for f in PROFILE_FIELDS},
                **{item_column(f): pl.col("adgroup_id" if f == "adgroup" else f) for f in item_fields},
                **({"dense.price": dense.cast(pl.Float32)} if options["price"] else {}),
                **{"label.click": pl.col("clk").cast(pl.Float32), "bucket": pl.col("bucket")}))
    core.sink_buckets(pl, impressions_lf, scratch / "impressions", sample_path)
    stored = pl.scan_parquet(scratch / "impressions" / "**" / "*.parquet")
    split = core.collect(stored.select(test=pl.col("test").sum(), rows=pl.len()), sample_path).row(0, named=True)
    if split["test"] in (0, split["rows"]):
        raise ValueError(f"test_start={cut} leaves {split['rows'] - split['test']} training and {split['test']} "
                         "test impressions; both must be non-empty")

    # behaviours of the users with impressions, partitioned by the same buckets
    users = core.collect(stored.select(pl.col("user_id").unique()), sample_path)
    log_lf = core.scan_csv(pl, log_path, {"user": pl.Int64, "time_stamp": pl.Int64, "btag": pl.String,
                                          "cate": pl.Int64, "brand": pl.Int64}, row_index_name="row")
    if options["behavior_rows"] is not None:
        log_lf = log_lf.head(options["behavior_rows"])
    if options["btags"] is not None:
        log_lf = log_lf.filter(pl.col("btag").is_in(options["btags"]))
    log_lf = (log_lf.rename({"user": "user_id"}).join(users.lazy(), on="user_id", how="semi")
              .select("user_id", pl.col("time_stamp").alias("time"), pl.col(["cate", "brand"]).fill_null(MISSING),
                      "row", bucket=pl.col("user_id") % buckets))
    core.sink_buckets(pl, log_lf, scratch / "behaviours", log_path)

    # per bucket: histories as windows into each user's sequence (time order, ties in file order)
    hist_counts = {"cate": {}, "brand": {}}
    filled = [k for k in range(buckets) if (scratch / "impressions" / f"bucket={k}").exists()]
    behaviour_schema = {c: pl.Int64 for c in ("user_id", "time", "cate", "brand", "row")}
    for k in filled:
        imp = pl.read_parquet(scratch / "impressions" / f"bucket={k}")
        beh = core.read_bucket(pl, scratch / "behaviours", k, behaviour_schema).sort(["user_id", "time", "row"])
        core.store_bucket(pl, scratch, k, imp, beh.select("user_id", "cate", "brand"), beh["time"].to_numpy(),
                          imp["time"].to_numpy(), options["max_history"], hist_counts)
    return core.finish(pl, out, scratch, filled, dataset="taobao", user_fields=PROFILE_FIELDS,
                       item_fields=item_fields, history_fields=("cate", "brand"),
                       dense=["price"] if options["price"] else [], hist_counts=hist_counts, names={},
                       strings=("pid",), options=options, log=log)


def _table(pl, path, columns, key: str):
    """A small side table, whole, keeping the first row of each ``key`` (as the in-memory loader)."""
    frame = core.collect(core.scan_csv(pl, path, columns), path)
    return frame.unique(subset=key, keep="first", maintain_order=True)
