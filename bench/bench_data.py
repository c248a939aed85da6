"""Streaming data at scale: preparation rows/s and peak RSS, streaming vs training samples/s, training RSS at 1x / 4x.

    python bench/bench_data.py --rows 20000000 --scale 4 --threads 1     # generates the CSVs once, in --work
    python bench/bench_data.py generate --rows 20000000 --out DIR         # Taobao-format CSVs of that many behaviours
    python bench/bench_data.py --formats amazon,recbole --amazon-rows 10000000 --recbole-rows 10000000
    python bench/bench_data.py generate --format amazon --rows 10000000 --out DIR   # reviews + meta (recbole: atomic)

Taobao gets the whole study (preparation, streaming, training RSS at 1x and --scale x); amazon and recbole get
their preparation only (rows/s and peak RSS of ``din-ext prepare`` on generated data of the chosen size).

Every measured run is a subprocess (``din-ext prepare``, a training run through din_ext.training.fit on the
prepared folder) whose peak RSS is read from ``os.wait4``'s rusage (ru_maxrss). Streaming samples/s: a full epoch
of ``PreparedSplit.batches(B, shuffle=True)`` drained as fast as it comes; training samples/s: the median of
``train_step`` on batches already in memory, B=1024, the default DIN of ``din-ext train``. No timing is asserted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

START = 1494028800  # 2017-05-06 00:00 UTC: the public impressions' first day
DAY = 86400
CATALOG = {"ads": 200_000, "cates": 6_000, "brands": 80_000, "campaigns": 100_000, "customers": 60_000}
BEHAVIOURS_PER_USER = 200     # about the public data's 640 in 22 days, a third
IMPRESSIONS_PER_USER = 8      # public data: 700M behaviours / 26M impressions, about 27 behaviours each


def generate(out, rows: int, seed: int = 0, chunk_users: int = 20_000) -> Path:
    """Taobao-format CSVs (the four files) with about ``rows`` behaviour rows; a fixed catalog, users scale.

    Users have favourite categories; behaviours and clicks lean to them. Rows of a chunk of users are shuffled, so
    the log is not grouped by user within a chunk. About 35 bytes a behaviour row (20M rows: 0.7 GB).
    """
    import polars as pl

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    users = max(10, rows // BEHAVIOURS_PER_USER)
    ad_cate = rng.integers(1, CATALOG["cates"] + 1, CATALOG["ads"])
    ad_brand = rng.integers(1, CATALOG["brands"] + 1, CATALOG["ads"])
    pl.DataFrame({"adgroup_id": np.arange(1, CATALOG["ads"] + 1), "cate_id": ad_cate,
                  "campaign_id": rng.integers(1, CATALOG["campaigns"], CATALOG["ads"]),
                  "customer": rng.integers(1, CATALOG["customers"], CATALOG["ads"]),
                  "brand": np.where(rng.random(CATALOG["ads"]) < 0.1, None, ad_brand).tolist(),
                  "price": np.round(rng.gamma(2.0, 100.0, CATALOG["ads"]), 2)}).write_csv(out / "ad_feature.csv")
    profile = {"userid": np.arange(1, users + 1)}
    for name, top in (("cms_segid", 98), ("cms_group_id", 13), ("final_gender_code", 3), ("age_level", 7),
                      ("pvalue_level", 4), ("shopping_level", 4), ("occupation", 2), ("new_user_class_level ", 5)):
        values = rng.integers(0 if top != 3 else 1, top, users)
        profile[name] = np.where(rng.random(users) < 0.15, None, values).tolist() if "level" in name else values
    keep = rng.random(users) > 0.05  # some users have no profile
    pl.DataFrame(profile).filter(pl.Series(keep)).write_csv(out / "user_profile.csv")

    written = 0
    with open(out / "behavior_log.csv", "wb") as log, open(out / "raw_sample.csv", "wb") as sample:
        log.write(b"user,time_stamp,btag,cate,brand\n")
        sample.write(b"user,time_stamp,adgroup_id,pid,nonclk,clk\n")
        for first in range(1, users + 1, chunk_users):
            ids = np.arange(first, min(first + chunk_users, users + 1))
            favourite = rng.integers(1, CATALOG["cates"] + 1, (ids.size, 3))
            n = rng.poisson(BEHAVIOURS_PER_USER, ids.size)
            user = np.repeat(ids, n)
            own = rng.random(user.size) < 0.7
            ad = rng.integers(0, CATALOG["ads"], user.size)
            cate = np.where(own, favourite[np.repeat(np.arange(ids.size), n), rng.integers(0, 3, user.size)],
                            ad_cate[ad])
            order = rng.permutation(user.size)
            pl.DataFrame({"user": user[order], "time_stamp": (START - 14 * DAY + rng.integers(0, 22 * DAY, user.size)
                                                              )[order],
                          "btag": np.array(["pv", "cart", "fav", "buy"])[rng.choice(4, user.size,
                                                                                     p=[.9, .03, .03, .04])][order],
                          "cate": cate[order], "brand": ad_brand[ad][order]}).write_csv(log, include_header=False)
            written += user.size
            m = rng.poisson(IMPRESSIONS_PER_USER, ids.size)
            who = np.repeat(np.arange(ids.size), m)
            shown = rng.integers(0, CATALOG["ads"], who.size)
            liked = np.any(ad_cate[shown][:, None] == favourite[who], axis=1)
            clk = (rng.random(who.size) < np.where(liked, 0.3, 0.04)).astype(np.int64)
            pl.DataFrame({"user": ids[who], "time_stamp": START + rng.integers(0, 8 * DAY, who.size),
                          "adgroup_id": shown + 1,
                          "pid": np.where(rng.random(who.size) < 0.6, "430548_1007", "430539_1007"),
                          "nonclk": 1 - clk, "clk": clk}).write_csv(sample, include_header=False)
    (out / "rows.json").write_text(json.dumps({"behaviours": written, "users": users, "seed": seed}))
    return out


AMAZON = {"items": 300_000, "cates": 2_000, "reviews_per_user": 12}   # Books 5-core: 22M reviews, 8.9M ratings/user
RECBOLE = {"items": 60_000, "genres": 20, "per_user": 80}                # ml-20m: 20M ratings of 138k users, 27k movies


def _chunks(users: int, per_user: int, rng, chunk_users: int = 50_000):
    """(user ids, each one's row count) for chunks of users; counts at least 5 (as the 5-core data)."""
    for first in range(0, users, chunk_users):
        ids = np.arange(first, min(first + chunk_users, users))
        yield ids, 5 + rng.poisson(per_user - 5, ids.size)


def _favourite(rng, n, ids_size, cates: int, items_by_cate, item_count: int):
    """For rows of users (``n`` rows each): an item of one of the user's 3 favourite categories 70% of the time."""
    favourite = rng.integers(0, cates, (ids_size, 3))
    who = np.repeat(np.arange(ids_size), n)
    cate = favourite[who, rng.integers(0, 3, who.size)]
    own = items_by_cate[cate, rng.integers(0, items_by_cate.shape[1], who.size)]
    return who, np.where(rng.random(who.size) < 0.7, own, rng.integers(0, item_count, who.size))


def _catalog(out, seed: int, items: int, cates: int):
    """(the created folder, the generator, each item's category, 64 items of each category)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    item_cate = rng.integers(0, cates, items)
    return out, rng, item_cate, np.stack([rng.choice(np.flatnonzero(item_cate == c), 64) for c in range(cates)])


def generate_amazon(out, rows: int, seed: int = 0) -> Path:
    """Amazon-format reviews (JSON lines) and meta (Python dict literals, as the published meta files) with about
    ``rows`` reviews; users have favourite categories; some reviews of a user share a day. About 110 bytes a review."""
    import polars as pl

    items, cates = AMAZON["items"], AMAZON["cates"]
    out, rng, item_cate, by_cate = _catalog(out, seed, items, cates)
    written = 0
    with open(out / "reviews.json", "wb") as f:
        for ids, n in _chunks(max(10, rows // AMAZON["reviews_per_user"]), AMAZON["reviews_per_user"], rng):
            who, item = _favourite(rng, n, ids.size, cates, by_cate, items)
            day = 1_200_000_000 // DAY + rng.integers(0, 3000, ids.size)[who] + rng.integers(0, 400, who.size) // 3
            pl.DataFrame({"reviewerID": pl.Series(ids[who]).cast(pl.String).str.zfill(9).str.replace("^", "A"),
                          "asin": pl.Series(item).cast(pl.String).str.zfill(9).str.replace("^", "B"),
                          "overall": rng.integers(1, 6, who.size).astype(np.float64),
                          "unixReviewTime": day * DAY}).write_ndjson(f)
            written += who.size
    with open(out / "meta.json", "w") as f:
        for i in range(items + 1000):  # some items no review names, a few reviewed ones without categories
            if i < items and i % 50:
                f.write(f"{{'asin': 'B{i:09d}', 'title': 'Book {i}', 'categories': [['Books', 'Genre "
                        f"{item_cate[i] % 40}', 'Category {item_cate[i]}']]}}\n")
            else:
                f.write(f"{{'asin': 'B{i:09d}', 'title': 'Book {i}'}}\n")
    (out / "rows.json").write_text(json.dumps({"rows": written, "seed": seed}))
    return out


def generate_recbole(out, rows: int, seed: int = 0) -> Path:
    """RecBole atomic files (``<dir>.inter`` / ``.item`` / ``.user``) with about ``rows`` rated interactions."""
    import polars as pl

    items, genres = RECBOLE["items"], RECBOLE["genres"]
    out, rng, item_genre, by_genre = _catalog(out, seed, items, genres)
    written, users = 0, max(10, rows // RECBOLE["per_user"])
    with open(out / f"{out.name}.inter", "wb") as f:
        f.write(b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for ids, n in _chunks(users, RECBOLE["per_user"], rng):
            who, item = _favourite(rng, n, ids.size, genres, by_genre, items)
            pl.DataFrame({"user": ids[who] + 1, "item": item + 1, "rating": rng.integers(1, 6, who.size),
                          "timestamp": 880_000_000 + rng.integers(0, 10 ** 8, who.size)}
                         ).write_csv(f, separator="\t", include_header=False)
            written += who.size
    pl.DataFrame({"item_id:token": np.arange(1, items + 1),
                  "class:token_seq": [f"G{g} G{(g + 7) % genres}" for g in item_genre.tolist()]}
                 ).write_csv(out / f"{out.name}.item", separator="\t")
    pl.DataFrame({"user_id:token": np.arange(1, users + 1), "age:float": rng.integers(15, 70, users),
                  "gender:token": np.array(["F", "M"])[rng.integers(0, 2, users)]}
                 ).write_csv(out / f"{out.name}.user", separator="\t")
    (out / "rows.json").write_text(json.dumps({"rows": written, "seed": seed}))
    return out


GENERATORS = {"amazon": generate_amazon, "recbole": generate_recbole}


def run_measured(command, **kwargs):
    """(seconds, peak RSS bytes, stdout) of a subprocess, its RSS from wait4's rusage."""
    tick = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - tick
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{' '.join(map(str, command))} failed ({process.returncode}):\n{output[-3000:]}")
    return seconds, usage.ru_maxrss * 1024, output


class Limited:
    """A batch source cut to its first ``steps`` batches (a bounded training run on large data)."""

    def __init__(self, source, steps: int, batch_size: int):
        self.source, self.steps, self.batch_size = source, steps, batch_size

    def __len__(self) -> int:
        return min(len(self.source), self.steps * self.batch_size)

    def batches(self, batch_size, *, shuffle=False, seed=0):
        return itertools.islice(self.source.batches(batch_size, shuffle=shuffle, seed=seed), self.steps)


def child_train(args) -> None:
    """In the measured subprocess: fit DIN on the prepared folder for --steps batches, evaluate as many."""
    import tempfile

    import torch

    from din_ext.data.stream import open_prepared
    from din_ext.model import DIN
    from din_ext.training import fit

    torch.set_num_threads(args.threads)
    train, test, schema = open_prepared(args.path)
    torch.manual_seed(0)
    model = DIN(schema, embed_dim=16, attention_hidden=(80, 40), tower_hidden=(200, 80), activation="dice")
    result = fit(model, Limited(train, args.steps, args.batch_size), Limited(test, args.steps // 4, 4096), epochs=1,
                 out=tempfile.mkdtemp(), batch_size=args.batch_size, log=lambda _: None)
    print(json.dumps({"train_samples_per_second": result["train_samples_per_second"], "rows": len(train)}))


def child_speeds(args) -> None:
    """In a subprocess: streaming samples/s over one shuffled epoch, and train_step samples/s at --batch-size."""
    import torch

    from din_ext.data.stream import open_prepared
    from din_ext.model import DIN
    from din_ext.training import make_optimizer, train_step

    torch.set_num_threads(args.threads)
    train, _, schema = open_prepared(args.path)
    out = {}
    for prefetch in (0, 8):
        train.prefetch = prefetch
        tick, seen = time.perf_counter(), 0
        for batch in train.batches(args.batch_size, shuffle=True, seed=1):
            seen += len(batch)
        out[f"stream_prefetch{prefetch}"] = seen / (time.perf_counter() - tick)
    train.prefetch = 0
    batches = list(itertools.islice(train.batches(args.batch_size, shuffle=True, seed=2), args.warmup + 30))
    torch.manual_seed(0)
    model = DIN(schema, embed_dim=16, attention_hidden=(80, 40), tower_hidden=(200, 80), activation="dice")
    optimizer = make_optimizer(model, 1e-3)
    model.train()
    times = []
    for i, batch in enumerate(batches):
        tick = time.perf_counter()
        train_step(model, optimizer, batch).item()
        if i >= args.warmup:
            times.append(time.perf_counter() - tick)
    out["train_step"] = args.batch_size / float(np.median(times))
    out["stream_rows"] = len(train)
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="bench", choices=("bench", "generate", "_train", "_speeds"))
    parser.add_argument("--rows", type=int, default=20_000_000, help="behaviour rows of the 1x data")
    parser.add_argument("--scale", type=int, default=4, help="the larger data, in multiples of --rows (0: skip)")
    parser.add_argument("--work", default="/tmp/din_ext_bench_data", help="generated and prepared data (kept)")
    parser.add_argument("--out", help="generate: the folder")
    parser.add_argument("--path", help="_train/_speeds: a prepared folder")
    parser.add_argument("--memory-limit", default="2G")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=300, help="training steps of the RSS runs")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--table", default=None, help="also write the table there (e.g. bench/results/data_cpu.md)")
    parser.add_argument("--formats", default="taobao,amazon,recbole", help="what to benchmark, comma separated")
    parser.add_argument("--amazon-rows", type=int, default=10_000_000, help="reviews of the generated amazon data")
    parser.add_argument("--recbole-rows", type=int, default=10_000_000, help="interactions of the recbole data")
    parser.add_argument("--format", default="taobao", choices=("taobao", *GENERATORS), help="generate: the format")
    args = parser.parse_args()
    if args.mode == "generate":
        tick = time.perf_counter()
        GENERATORS.get(args.format, generate)(args.out, args.rows)
        print(f"wrote {args.out} in {time.perf_counter() - tick:.0f} s")
        return
    if args.mode == "_train":
        return child_train(args)
    if args.mode == "_speeds":
        return child_speeds(args)
    bench(args)


def _data(work: Path, rows: int, name: str = "taobao") -> Path:
    raw = work / (f"raw-{rows}" if name == "taobao" else f"{name}-{rows}")
    if not (raw / "rows.json").exists():
        tick = time.perf_counter()
        GENERATORS.get(name, generate)(raw, rows)
        print(f"generated {raw} in {time.perf_counter() - tick:.0f} s", flush=True)
    return raw


def bench(args) -> None:
    import torch
    from common import git_commit, machine_description, write_table

    work = Path(args.work)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    python = sys.executable
    me = [python, str(Path(__file__).resolve())]
    formats = args.formats.split(",")
    results, others = [], []
    for name in (f for f in GENERATORS if f in formats):
        raw = _data(work, getattr(args, f"{name}_rows"), name)
        rows = json.loads((raw / "rows.json").read_text())["rows"]
        others.append({"format": name, "rows": rows, **prepare_measured(python, name, raw, work / f"prepared-{name}",
                                                                        args.memory_limit, env)})
        print(json.dumps(others[-1]), flush=True)
    for scale in ([1] + ([args.scale] if args.scale else [])) if "taobao" in formats else []:
        raw = _data(work, args.rows * scale)
        rows = json.loads((raw / "rows.json").read_text())["behaviours"]
        prepared = work / f"prepared-{rows}"
        row = {"scale": scale, "behaviours": rows,
               **prepare_measured(python, "taobao", raw, prepared, args.memory_limit, env)}
        print(json.dumps(row), flush=True)
        if scale == 1:
            _, _, output = run_measured([*me, "_speeds", "--path", str(prepared), "--threads", str(args.threads),
                                         "--batch-size", str(args.batch_size), "--warmup", str(args.warmup)], env=env)
            row.update(json.loads(output.strip().splitlines()[-1]))
        seconds, rss, output = run_measured([*me, "_train", "--path", str(prepared), "--threads", str(args.threads),
                                             "--batch-size", str(args.batch_size), "--steps", str(args.steps)],
                                            env=env)
        row.update(train_rss=rss, train_s=seconds, **{"fit_" + k: v for k, v in
                                                      json.loads(output.strip().splitlines()[-1]).items()})
        print(json.dumps(row), flush=True)
        results.append(row)
    machine = (f"{machine_description(torch.device('cpu'))}; {time.strftime('%Y-%m-%d')}; commit {git_commit()}; "
               f"torch threads {args.threads}; --memory-limit {args.memory_limit}")
    text = "\n\n".join([machine] + ([report(results, args)] if results else []) + (
        [report_others(others)] if others else []))
    print(text)
    write_table(text + "\n", args.table)


def prepare_measured(python, name: str, raw: Path, prepared: Path, memory_limit: str, env) -> dict:
    """``din-ext prepare --data name`` of ``raw`` into ``prepared`` (replaced) in a measured subprocess."""
    if prepared.exists():
        subprocess.run(["rm", "-rf", str(prepared)], check=True)
    seconds, rss, _ = run_measured([python, "-m", "din_ext", "prepare", "--data", name, "--path", str(raw),
                                    "--out", str(prepared), "--memory-limit", memory_limit], env=env)
    info = json.loads((prepared / "schema.json").read_text())
    return {"impressions": info["rows"]["train"] + info["rows"]["test"], "shards": len(info["shards"]),
            "prepare_s": seconds, "prepare_rss": rss,
            "csv_bytes": sum(p.stat().st_size for p in raw.iterdir() if p.name != "rows.json"),
            "prepared_bytes": sum(p.stat().st_size for p in prepared.rglob("*") if p.is_file())}


def report_others(others) -> str:
    gib = 1 << 30
    lines = ["| format | raw rows | impressions | shards | raw files | prepared | prepare s | rows/s "
             "| prepare peak RSS |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in others:
        lines.append(f"| {r['format']} | {r['rows']:,} | {r['impressions']:,} | {r['shards']} | "
                     f"{r['csv_bytes'] / gib:.2f} GiB | {r['prepared_bytes'] / gib:.2f} GiB | {r['prepare_s']:.0f} | "
                     f"{r['rows'] / r['prepare_s']:,.0f} | {r['prepare_rss'] / gib:.2f} GiB |")
    return "\n".join(lines)


def report(results, args) -> str:
    gib = 1 << 30
    one = results[0]
    lines = [("| data | behaviour rows | impressions | shards | CSV | prepared | prepare s | rows/s | prepare peak RSS "
              "| training peak RSS |"), "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['scale']}x | {r['behaviours']:,} | {r['impressions']:,} | {r['shards']} | "
                     f"{r['csv_bytes'] / gib:.2f} GiB | {r['prepared_bytes'] / gib:.2f} GiB | {r['prepare_s']:.0f} | "
                     f"{r['behaviours'] / r['prepare_s']:,.0f} | {r['prepare_rss'] / gib:.2f} GiB | "
                     f"{r['train_rss'] / gib:.2f} GiB |")
    lines += ["", f"B={args.batch_size}: streaming (one shuffled epoch, {one['stream_rows']:,} rows) "
              f"{one['stream_prefetch0']:,.0f} samples/s without prefetch, {one['stream_prefetch8']:,.0f} with; "
              f"train_step {one['train_step']:,.0f} samples/s; ratio "
              f"{one['stream_prefetch0'] / one['train_step']:.1f}x "
              f"(target >= 5x). fit through the stream (prefetch 8, {args.steps} steps): "
              f"{one['fit_train_samples_per_second']:,.0f} samples/s."]
    if len(results) > 1:
        lines.append(f"Training peak RSS {results[-1]['scale']}x / 1x: "
                     f"{results[-1]['train_rss'] / one['train_rss']:.2f} (target <= 1.2); prepare peak RSS at 1x "
                     f"{one['prepare_rss'] / gib:.2f} GiB (target <= 2 GB).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
