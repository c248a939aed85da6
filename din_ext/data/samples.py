"""Small, seeded sample datasets in the raw public formats (for tests, demos and the CLI's smoke runs).

``write_sample("amazon" | "taobao" | "recbole", directory, seed)`` writes a few hundred users' worth of files
that the matching loader reads. Users have favourite categories: they review, browse and click items of those
categories far more often, so a history-aware model has something to find.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

START = 1494028800  # 2017-05-06 00:00 UTC, the first day of the public Taobao impressions
DAY = 86400


def _favourites(rng, users: int, cates: int, k: int = 2) -> np.ndarray:
    return np.stack([rng.choice(cates, k, replace=False) for _ in range(users)])


def _pick(rng, favourite, items_by_cate, cates: int, p_fav: float):
    cate = rng.choice(favourite) if rng.random() < p_fav else rng.integers(cates)
    return int(rng.choice(items_by_cate[cate]))


def _amazon(directory: Path, rng, users: int, compress: bool):
    cates, items = 12, 400
    item_cate = rng.integers(0, cates, items)
    by_cate = [np.flatnonzero(item_cate == c) for c in range(cates)]
    fav = _favourites(rng, users, cates)
    opener = (lambda p: gzip.open(str(p) + ".gz", "wt", encoding="utf-8")) if compress else \
        (lambda p: open(p, "w", encoding="utf-8"))
    with opener(directory / "reviews_Electronics_5.json") as f:
        for u in range(users):
            t = START - int(rng.integers(0, 400)) * DAY
            seen = set()
            for _ in range(int(rng.integers(5, 16))):
                i = _pick(rng, fav[u], by_cate, cates, 0.8)
                if i in seen:
                    continue
                seen.add(i)
                t += int(rng.integers(0, 20)) * DAY  # 0: same-day reviews, as in the real data
                f.write(f'{{"reviewerID": "A{u:05d}", "asin": "B{i:07d}", "overall": {rng.integers(1, 6)}.0, '
                        f'"reviewText": "item {i}", "unixReviewTime": {t}}}\n')
    with opener(directory / "meta_Electronics.json") as f:  # Python dict literals, like the original file
        for i in range(items + 20):
            record = {"asin": f"B{i:07d}", "title": f"Gadget's #{i}", "price": round(float(rng.random()) * 100, 2)}
            if i < items and rng.random() > 0.03:  # a few items without categories
                record["categories"] = [["Electronics", f"Group {item_cate[i] % 3}", f"Category {item_cate[i]}"]]
            f.write(repr(record) + "\n")


def _taobao(directory: Path, rng, users: int):
    cates, ads = 30, 500
    ad_cate = rng.integers(1, cates + 1, ads)
    by_cate = [np.flatnonzero(ad_cate == c) for c in range(1, cates + 1)]
    fav = _favourites(rng, users, cates) + 1
    brand = rng.integers(1000, 1100, ads)
    with open(directory / "ad_feature.csv", "w") as f:
        f.write("adgroup_id,cate_id,campaign_id,customer,brand,price\n")
        for a in range(ads):
            b = "NULL" if rng.random() < 0.1 else str(brand[a])
            f.write(f"{a + 1},{ad_cate[a]},{rng.integers(1, 200)},{rng.integers(1, 150)},{b},"
                    f"{float(rng.integers(1, 50000)) / 100}\n")
    with open(directory / "user_profile.csv", "w") as f:
        f.write("userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,shopping_level,"
                "occupation,new_user_class_level \n")
        for u in range(users):
            if rng.random() < 0.1:  # users without a profile
                continue
            pvalue = "" if rng.random() < 0.3 else str(rng.integers(1, 4))
            new = "" if rng.random() < 0.2 else str(rng.integers(1, 5))
            f.write(f"{u + 1},{rng.integers(0, 20)},{rng.integers(0, 13)},{rng.integers(1, 3)},{rng.integers(0, 7)},"
                    f"{pvalue},{rng.integers(1, 4)},{rng.integers(0, 2)},{new}\n")
    tags = np.array(["pv", "cart", "fav", "buy"])
    with open(directory / "behavior_log.csv", "w") as f:
        f.write("user,time_stamp,btag,cate,brand\n")
        for u in range(users):
            for _ in range(int(rng.integers(10, 60))):
                a = _pick(rng, fav[u] - 1, by_cate, cates, 0.85)
                t = START - 14 * DAY + int(rng.integers(0, 22 * DAY))
                f.write(f"{u + 1},{t},{tags[rng.choice(4, p=[0.85, 0.05, 0.05, 0.05])]},{ad_cate[a]},{brand[a]}\n")
    with open(directory / "raw_sample.csv", "w") as f:
        f.write("user,time_stamp,adgroup_id,pid,nonclk,clk\n")
        for u in range(users):
            for _ in range(int(rng.integers(5, 30))):
                a = int(rng.integers(0, ads)) if rng.random() < 0.6 else _pick(rng, fav[u] - 1, by_cate, cates, 1.0)
                clk = int(rng.random() < (0.35 if ad_cate[a] in fav[u] else 0.04))
                pid = "430548_1007" if rng.random() < 0.6 else "430539_1007"
                f.write(f"{u + 1},{START + int(rng.integers(0, 8 * DAY))},{a + 1},{pid},{1 - clk},{clk}\n")


def _recbole(directory: Path, rng, users: int):
    genres = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "Animation", "Documentary"]
    items = 400
    item_genre = rng.integers(0, len(genres), items)
    by_genre = [np.flatnonzero(item_genre == g) for g in range(len(genres))]
    fav = _favourites(rng, users, len(genres))
    name = directory.name
    with open(directory / f"{name}.item", "w") as f:
        f.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
        for i in range(items):
            extra = genres[int(rng.integers(len(genres)))]
            f.write(f"{i + 1}\tMovie {i}\t{rng.integers(1950, 2000)}\t{genres[item_genre[i]]} {extra}\n")
    with open(directory / f"{name}.user", "w") as f:
        f.write("user_id:token\tage:float\tgender:token\toccupation:token\n")
        for u in range(users):
            f.write(f"{u + 1}\t{rng.integers(15, 70)}\t{'MF'[rng.integers(2)]}\t"
                    f"{['student', 'engineer', 'artist', 'other'][rng.integers(4)]}\n")
    with open(directory / f"{name}.inter", "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for u in range(users):
            t = 880000000 + int(rng.integers(0, 1000)) * 3600
            seen = set()
            for _ in range(int(rng.integers(10, 40))):
                i = _pick(rng, fav[u], by_genre, len(genres), 0.6)
                if i in seen:
                    continue
                seen.add(i)
                t += int(rng.integers(0, 5)) * 3600
                liked = item_genre[i] in fav[u]
                rating = int(np.clip(rng.normal(4.2 if liked else 2.6, 0.8), 1, 5))
                f.write(f"{u + 1}\t{i + 1}\t{rating}\t{t}\n")


def write_sample(name: str, directory, seed: int = 0, users: int = 300, compress: bool = False) -> Path:
    """Write a sample dataset of format ``name`` into ``directory`` (created); returns the directory.

    compress: gzip the Amazon files (``*.json.gz``). RecBole files are named after the directory.
    """
    if users < 10:
        raise ValueError(f"users must be at least 10, got {users}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if name == "amazon":
        _amazon(directory, rng, users, compress)
    elif name == "taobao":
        _taobao(directory, rng, users)
    elif name == "recbole":
        _recbole(directory, rng, users)
    else:
        raise ValueError(f"no sample writer for {name!r}; known: amazon, taobao, recbole")
    return directory
