"""The Amazon reviews format as the DIN paper uses it (Electronics, 5-core): next-item clicks with sampled negatives.

reviews file: one review per line (JSON, or a Python dict literal) with ``reviewerID``, ``asin`` and
``unixReviewTime``. meta file: one item per line with ``asin`` and ``categories`` (a list of category paths; the
item's category is the last entry of the last path) or ``category`` (a flat list; its last entry).
Both may be gzip'd. Each user's reviews are ordered by time (ties keep file order); review i >= 1 gives a
positive impression (history: reviews 0..i-1, candidate: item i) and a negative one (same history, an item
drawn uniformly from the training reviews' items that the user never reviewed). A user's last review goes to
the test set, earlier ones to training, as in the paper.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

from din_ext.data.build import check_max_history, jagged, raw_interactions, sample_negatives, split
from din_ext.data.readers import parse_error, find_file, iter_lines, parse_record
from din_ext.data.vocab import fit_and_encode, intern

REVIEW_FILES = ("reviews_Electronics_5.json", "reviews.json")
META_FILES = ("meta_Electronics.json", "meta.json")
_ASIN = re.compile(r"""["']asin["']\s*:\s*["']([^"']*)["']""")


def _resolve(path: Path, name, defaults, what) -> Path:
    if name is None:
        return find_file(path, defaults, what)
    name = Path(name)
    if not name.is_absolute() and path.is_dir():
        name = path / name
    if not name.is_file():
        raise FileNotFoundError(f"{what}: {name} not found")
    return name


def read_reviews(path):
    """(users, items, times) of a reviews file as lists."""
    users, items, times = [], [], []
    for line, text in iter_lines(path):
        record = parse_record(text, path, line)
        try:
            user, item, time = record["reviewerID"], record["asin"], record["unixReviewTime"]
        except KeyError as err:
            raise parse_error(path, line, f"missing field {err.args[0]!r}") from None
        if not isinstance(time, int) or isinstance(time, bool):
            try:
                time = int(time)
            except (TypeError, ValueError):
                raise parse_error(path, line, f"unixReviewTime {time!r} is not an integer") from None
        users.append(str(user))
        items.append(str(item))
        times.append(time)
    return users, items, times


def _category(record) -> Optional[str]:
    paths = record.get("categories")
    if isinstance(paths, list) and paths:
        last = paths[-1]
        if isinstance(last, list) and last:
            return str(last[-1])
        if isinstance(last, str):
            return last
    flat = record.get("category")
    if isinstance(flat, list) and flat:
        return str(flat[-1])
    return None


def read_categories(path, wanted: set) -> dict:
    """asin -> category for the items in ``wanted``; other lines are skipped without a full parse."""
    out = {}
    for line, text in iter_lines(path):
        quick = _ASIN.search(text)
        if quick is not None and quick.group(1) not in wanted:
            continue
        record = parse_record(text, path, line)
        if "asin" not in record:
            raise parse_error(path, line, "missing field 'asin'")
        asin = str(record["asin"])
        if asin in wanted:
            cate = _category(record)
            if cate is not None:
                out[asin] = cate
    return out


def load_amazon(path, *, reviews_file=None, meta_file=None, max_history: Optional[int] = 100, seed: int = 0,
                user_feature: bool = True):
    """Load an Amazon reviews + meta pair -> ``(train, test, schema)``.

    path: a directory holding ``reviews_Electronics_5.json`` and ``meta_Electronics.json`` (or ``.gz``), or the
    reviews file itself (then pass ``meta_file``). reviews_file / meta_file: other names (relative to ``path``)
    or paths. max_history: keep the most recent reviews only (None: all). seed: negative sampling.
    user_feature: add the user id as a user field ``user``.
    Fields: item fields ``item`` (asin) and ``cate``, both in histories.
    """
    max_history = check_max_history(max_history)
    path = Path(path)
    reviews_path = _resolve(path, reviews_file, REVIEW_FILES, "amazon reviews")
    base = path if path.is_dir() else reviews_path.parent
    meta_path = _resolve(base, meta_file, META_FILES, "amazon meta")
    users, items, times = read_reviews(reviews_path)
    if not users:
        raise ValueError(f"{reviews_path}: no reviews")
    user_code, _ = intern(np.array(users))
    item_code, item_names = intern(np.array(items))
    times = np.array(times, dtype=np.int64)
    categories = read_categories(meta_path, set(item_names.tolist()))
    cate_names = [categories.get(a) for a in item_names.tolist()]
    known = np.array([c is not None for c in cate_names], dtype=bool)
    cate_of_item = np.full(item_names.size, -1, dtype=np.int64)
    if known.any():
        cate_of_item[known] = intern(np.array([c for c in cate_names if c is not None]))[0]

    order = np.lexsort((np.arange(times.size), times, user_code))
    u, it, t = user_code[order], item_code[order], times[order]
    counts = np.bincount(u)
    position = np.arange(u.size) - (np.cumsum(counts) - counts)[u]
    last = position == counts[u] - 1
    at = np.flatnonzero(position >= 1)               # reviews that become impressions
    lengths = position[at] if max_history is None else np.minimum(position[at], max_history)
    pool = np.unique(it[~last])                      # the training reviews' items
    negatives = sample_negatives(u[at], pool, u, it, np.random.default_rng(seed))

    candidates = np.stack([it[at], negatives], 1).reshape(-1)   # rows alternate positive, negative
    offsets, index = jagged(np.repeat(at - lengths, 2), np.repeat(lengths, 2))
    hist_items = it[index]
    rows_user = np.repeat(u[at], 2)
    raw = raw_interactions(
        user_id=rows_user, user={"user": rows_user} if user_feature else {},
        item={"item": candidates, "cate": cate_of_item[candidates]}, offsets=offsets,
        hist={"item": hist_items, "cate": cate_of_item[hist_items]},
        labels={"click": np.tile(np.array([1.0, 0.0]), at.size)}, time=np.repeat(t[at], 2))
    train, test = split(raw, np.repeat(last[at], 2))
    train, test, schema, _ = fit_and_encode(train, test, user_fields=("user",) if user_feature else (),
                                            item_fields=("item", "cate"), history_fields=("item", "cate"))
    return train, test, schema
