"""The Amazon reviews format as the DIN paper uses it (Electronics, 5-core): next-item clicks with sampled negatives.

reviews file: one review per line (JSON, or a Python dict literal) with ``reviewerID``, ``asin`` and
``unixReviewTime``. meta file: one item per line with ``asin`` and ``categories`` (a list of category paths; the
item's category is the last entry of the last path) or ``category`` (a flat list; its last entry).
Both may be gzip'd. Each user's reviews are ordered by time (ties keep file order); review i >= 1 gives a
positive impression (history: reviews 0..i-1, candidate: item i) and a negative one (same history, an item
drawn uniformly from the training reviews' items that the user never reviewed). A user's last review goes to
the test set, earlier ones to training, as in the paper.

Speed: strict-JSON review lines are read with one regular expression for the three fields (a line must still
be ``{...}``; any other line is parsed in full), and only the meta lines of reviewed items are looked at, so
the 1.7M-review Electronics file loads in well under a minute on one core.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Optional

import numpy as np

from din_ext.data.build import check_max_history, jagged, raw_interactions, sample_negatives, split
from din_ext.data.readers import find_file, iter_lines, parse_error, parse_record, require_path
from din_ext.data.vocab import fit_and_encode, intern, intern_strings

REVIEW_FILES = ("reviews_Electronics_5.json", "reviews.json")
META_FILES = ("meta_Electronics.json", "meta.json")
_ASIN = re.compile(r"""["']asin["']\s*:\s*["']([^"'\\]*)["']""")
_CATEGORIES = re.compile(r"""["']categories["']\s*:\s*(\[\s*\[.*?\]\s*\])""")


def resolve_file(path: Path, name, defaults, what) -> Path:
    """The file ``name`` (relative to the directory ``path``), or the first of ``defaults`` found under ``path``."""
    if name is None:
        return find_file(path, defaults, what)
    name = Path(name)
    if not name.is_absolute() and path.is_dir():
        name = path / name
    if not name.is_file():
        raise FileNotFoundError(f"{what}: {name} not found")
    return name


# Fast paths for strict-JSON lines. JSON escapes every quote inside a string value, so a bare '"key"' is a key.
# The first pattern follows the key order of the published files (greedy gaps: the time comes after a long
# review text, and backtracking from the end finds it fastest); the others find the keys in any order.
_KEYS = {"reviewerID": r'"([^"\\]*)"', "asin": r'"([^"\\]*)"', "unixReviewTime": r"(-?\d+)\s*[,}]"}
_IN_ORDER = re.compile(".*".join(rf'"{key}"\s*:\s*{value}' for key, value in _KEYS.items()))
_ANY_ORDER = [re.compile(rf'"{key}"\s*:\s*{value}') for key, value in _KEYS.items()]


def _fields(text: str):
    match = _IN_ORDER.search(text)
    if match is not None:
        return match.groups()
    found = [p.search(text) for p in _ANY_ORDER]
    return None if None in found else [m.group(1) for m in found]


def _id(record: dict, key: str, path, line: int) -> str:
    """Field ``key`` of ``record`` as an id: a string (or a JSON integer); null, a list or an object is an error."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise parse_error(path, line, f"{key} {value!r} is not a string")
    return str(value)


def _slow_review(text: str, path, line: int):
    record = parse_record(text, path, line)
    try:
        user, item = _id(record, "reviewerID", path, line), _id(record, "asin", path, line)
        time = record["unixReviewTime"]
    except KeyError as err:
        raise parse_error(path, line, f"missing field {err.args[0]!r}") from None
    if not isinstance(time, int) or isinstance(time, bool):
        try:
            time = int(time)
        except (TypeError, ValueError):
            raise parse_error(path, line, f"unixReviewTime {time!r} is not an integer") from None
    return user, item, time


def read_reviews(path):
    """(user codes, user names, item codes, item names, times) of a reviews file; names sorted."""
    users, items, times = [], [], []
    for line, text in iter_lines(path):
        text = text.strip()
        fields = _fields(text) if text[0] == "{" and text[-1] == "}" else None
        if fields is None:
            user, item, time = _slow_review(text, path, line)
        else:
            user, item, time = fields[0], fields[1], int(fields[2])
        users.append(user)
        items.append(item)
        times.append(time)
    if not times:
        raise parse_error(path, 1, "no reviews: the file is empty or blank")
    return (*intern_strings(users), *intern_strings(items), np.array(times, dtype=np.int64))


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


def read_categories(path, wanted: set, strict: bool = False) -> dict:
    """asin -> category for the items in ``wanted``; other lines are skipped without a full parse.

    Unless ``strict``, a wanted item's line that is ``{...}`` with a ``categories`` list of lists that parses on
    its own is not parsed further (the rest of that line is not validated): meta lines carry long ``related``
    lists, and parsing only the part that is needed makes the original 500k-line file load in seconds instead
    of minutes. Other wanted lines (and all of them when ``strict``) are parsed in full, JSON or Python literal.
    """
    out, seen = {}, False
    for line, text in iter_lines(path):
        seen = True
        quick = _ASIN.search(text)
        if quick is not None and quick.group(1) not in wanted:
            continue
        stripped = text.strip()
        paths = _CATEGORIES.search(stripped)
        if not strict and quick is not None and paths is not None and stripped[0] == "{" and stripped[-1] == "}":
            try:
                cate = _category({"categories": ast.literal_eval(paths.group(1))})
            except (ValueError, SyntaxError):
                pass
            else:
                if cate is not None:
                    out[quick.group(1)] = cate
                continue
        record = parse_record(text, path, line)
        if "asin" not in record:
            raise parse_error(path, line, "missing field 'asin'")
        asin = _id(record, "asin", path, line)
        if asin in wanted:
            cate = _category(record)
            if cate is not None:
                out[asin] = cate
    if not seen:  # every item would silently lose its category
        raise parse_error(path, 1, "no items: the file is empty or blank")
    return out


def load_amazon(path, *, reviews_file=None, meta_file=None, max_history: Optional[int] = 100, seed: int = 0,
                user_feature: bool = True, strict_meta: bool = False):
    """Load an Amazon reviews + meta pair -> ``(train, test, schema)``.

    path: a directory holding ``reviews_Electronics_5.json`` and ``meta_Electronics.json`` (or ``.gz``), or the
    reviews file itself (then pass ``meta_file``). reviews_file / meta_file: other names (relative to ``path``)
    or paths. max_history: keep the most recent reviews only (None: all). seed: negative sampling.
    user_feature: add the user id as a user field ``user``. strict_meta: parse the used meta lines in full
    (slower; by default only their ``asin`` and ``categories`` are parsed, see ``read_categories``).
    Fields: item fields ``item`` (asin) and ``cate``, both in histories.
    """
    max_history = check_max_history(max_history)
    path = require_path(path, "amazon")
    reviews_path = resolve_file(path, reviews_file, REVIEW_FILES, "amazon reviews")
    base = path if path.is_dir() else reviews_path.parent
    meta_path = resolve_file(base, meta_file, META_FILES, "amazon meta")
    user_code, user_names, item_code, item_names, times = read_reviews(reviews_path)
    categories = read_categories(meta_path, set(item_names.tolist()), strict_meta)
    cate_names = [categories.get(a) for a in item_names.tolist()]
    known = np.array([c is not None for c in cate_names], dtype=bool)
    cate_of_item = np.full(item_names.size, -1, dtype=np.int64)
    cate_labels = np.zeros(0, dtype=str)
    if known.any():
        cate_of_item[known], cate_labels = intern(np.array([c for c in cate_names if c is not None]))

    order = np.lexsort((np.arange(times.size), times, user_code))
    u, it, t = user_code[order], item_code[order], times[order]
    counts = np.bincount(u)
    position = np.arange(u.size) - (np.cumsum(counts) - counts)[u]
    last = position == counts[u] - 1
    at = np.flatnonzero(position >= 1)               # reviews that become impressions
    lengths = position[at] if max_history is None else np.minimum(position[at], max_history)
    pool = np.flatnonzero(np.bincount(it[~last], minlength=item_names.size))  # the training reviews' items
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
                                            item_fields=("item", "cate"), history_fields=("item", "cate"),
                                            names={"user": user_names, "item": item_names, "cate": cate_labels})
    return train, test, schema
