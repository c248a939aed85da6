"""RecBole atomic files: ``<name>.inter`` plus optional ``<name>.user`` and ``<name>.item``.

Tab separated, with a header of ``field:type`` tokens (types token, token_seq, float, float_seq), e.g.
``user_id:token  item_id:token  rating:float  timestamp:float``. Labels come from the rating (``>= threshold``
is a click) or, for implicit feedback, every interaction is a click and ``negatives`` sampled items per
interaction are non-clicks. An impression's history is the user's clicked (or, with ``history="all"``, every)
interaction strictly before its time, oldest first. Item fields: the item id plus category-like columns of
the .item file (first token of a token_seq); user fields: the user id plus the .user columns (float columns
such as an age become ``float_buckets`` equal-frequency buckets).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from din_ext.data.build import check_max_history, histories_before, raw_interactions, sample_negatives, split
from din_ext.data.readers import MISSING, convert_column, parse_error, read_columns, read_header, require_path
from din_ext.data.vocab import fit_and_encode, intern, locate

CATEGORY_COLUMNS = ("class", "genre", "genres", "categories", "category", "cate", "brand")
TYPES = ("token", "token_seq", "float", "float_seq")


def field_name(token: str) -> str:
    """The field of a RecBole header token (``"item_id:token"`` -> ``"item_id"``)."""
    return token.strip().split(":", 1)[0]


def field_types(path) -> Dict[str, str]:
    """{field: type} of an atomic file's ``name:type`` header; a token without a known type is a parse error."""
    types = {}
    for token in read_header(path, "\t"):
        name, _, kind = token.partition(":")
        if kind not in TYPES:
            raise parse_error(path, 1, f"header token {token!r} is not 'name:type' with a type in {TYPES}")
        types[name] = kind
    return types


def atomic_files(path, name: Optional[str] = None):
    """(.inter, .user or None, .item or None) of a RecBole dataset directory (or of its .inter file)."""
    path = require_path(path, "recbole")
    if path.is_file():
        inter = path
    elif path.is_dir():
        inter = path / f"{name or path.name}.inter"
        if not inter.is_file():
            found = sorted(path.glob("*.inter"))
            if name is not None or len(found) != 1:
                raise FileNotFoundError(f"recbole: no {inter.name} in {path} (found {[p.name for p in found]})")
            inter = found[0]
    else:
        raise FileNotFoundError(f"recbole: {path} is neither a file nor a directory")
    side = [inter.with_suffix(s) for s in (".user", ".item")]
    return inter, *[p if p.is_file() else None for p in side]


def read_side_table(path, key: str, wanted: Optional[Sequence[str]], default: Sequence[str], buckets: int):
    """(sorted key tokens, {field: int codes aligned with the keys}, {token field: its tokens, indexed by code}) of a
    .user / .item file; a float field's codes are its quantile buckets (no tokens)."""
    types = field_types(path)
    if key not in types:
        raise parse_error(path, 1, f"header lacks the id column {key!r}")
    if wanted is None:
        wanted = [f for f in default if f in types and types[f] != "float_seq"]
    else:
        missing = [f for f in wanted if f not in types]
        if missing:
            raise parse_error(path, 1, f"header lacks the requested column(s) {missing}")
    table = read_columns(path, {key: "str", **{f: "str" for f in wanted}}, delimiter="\t", normalize=field_name)
    keys, first = np.unique(table[key], return_index=True)
    codes, tokens = {}, {}
    for f in wanted:
        text = table[f]
        if types[f] in ("token_seq", "float_seq"):  # the first token of a sequence
            text = np.array([t.split(" ", 1)[0] for t in text.tolist()], dtype=str)
        blank = (text == "")[first]
        if types[f].startswith("float"):
            values = convert_column(path, np.where(text == "", "nan", text), "float", f, 2)[first]
            known = ~np.isnan(values)
            edges = np.unique(np.quantile(values[known], np.linspace(0, 1, buckets + 1)[1:-1])) if known.any() \
                else np.zeros(0)
            codes[f] = np.where(known, np.searchsorted(edges, np.nan_to_num(values), side="right"), MISSING)
        else:
            c, tokens[f] = intern(text[first])
            codes[f] = np.where(blank, MISSING, c)
    return keys, codes, tokens


def align_side(keys: np.ndarray, codes: Dict[str, np.ndarray], names: np.ndarray) -> Dict[str, np.ndarray]:
    """Side-table codes for each of ``names`` (MISSING where a name has no row)."""
    pos, found = locate(keys, names)
    return {f: np.where(found, c[pos], MISSING) for f, c in codes.items()}


def _test_mask(split_by: str, user, rank, test_fraction: float):
    if split_by == "time":
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
        ordered = np.sort(rank)
        cut = ordered[min(int(np.floor((1.0 - test_fraction) * rank.size)), rank.size - 1)]
        return rank >= cut
    if split_by == "leave_last_out":
        order = np.lexsort((np.arange(user.size), rank, user))
        last = np.ones(user.size, bool)
        last[:-1] = user[order][1:] != user[order][:-1]
        mask = np.zeros(user.size, bool)
        mask[order[last]] = True
        return mask
    raise ValueError(f"split must be 'time' or 'leave_last_out', got {split_by!r}")


def load_recbole(path, *, name: Optional[str] = None, user_field: str = "user_id", item_field: str = "item_id",
                 rating_field: str = "rating", time_field: str = "timestamp", label: str = "auto",
                 threshold: float = 4.0, negatives: int = 1, history: str = "positive", split_by: str = "time",
                 test_fraction: float = 0.2, max_history: Optional[int] = 100,
                 item_features: Optional[Sequence[str]] = None, user_features: Optional[Sequence[str]] = None,
                 float_buckets: int = 10, user_feature: bool = True, seed: int = 0):
    """Load RecBole atomic files -> ``(train, test, schema)``.

    path: the dataset directory (``<dir name>.inter`` or ``<name>.inter``, or its only .inter) or the .inter
    file. label: ``"rating"`` (click = rating >= threshold), ``"implicit"`` (every interaction a click, plus
    ``negatives`` sampled non-clicks each) or ``"auto"`` (rating when the .inter has one). history:
    ``"positive"`` (clicked interactions only) or ``"all"``. split_by: ``"time"`` (interactions at or after the
    global ``1 - test_fraction`` time quantile are the test set) or ``"leave_last_out"`` (each user's last
    interaction, with its sampled negatives). max_history: most recent behaviours kept (None: all).
    item_features / user_features: side-file columns to use (default: category-like .item columns, every .user
    column). user_feature: the user id as a user field. Without a time column, file order is the time.
    """
    max_history = check_max_history(max_history)
    if history not in ("positive", "all"):
        raise ValueError(f"history must be 'positive' or 'all', got {history!r}")
    inter_path, user_path, item_path = atomic_files(path, name)
    types = field_types(inter_path)
    for required in (user_field, item_field):
        if required not in types:
            raise parse_error(inter_path, 1, f"header lacks the column {required!r}")
    if label == "auto":
        label = "rating" if rating_field in types else "implicit"
    if label not in ("rating", "implicit"):
        raise ValueError(f"label must be 'auto', 'rating' or 'implicit', got {label!r}")
    if label == "rating" and rating_field not in types:
        raise parse_error(inter_path, 1, f"header lacks the rating column {rating_field!r}")
    if label == "implicit" and (not isinstance(negatives, int) or negatives < 1):
        raise ValueError(f"negatives must be a positive int, got {negatives!r}")
    columns = {user_field: "str", item_field: "str"}
    if label == "rating":
        columns[rating_field] = "float"
    if time_field in types:
        columns[time_field] = "float"
    inter = read_columns(inter_path, columns, delimiter="\t", normalize=field_name)
    if not inter[user_field].size:
        raise parse_error(inter_path, 2, "no interactions after the header")
    user, user_names = intern(inter[user_field])
    item, item_names = intern(inter[item_field])
    stamp = inter[time_field] if time_field in inter else np.arange(user.size, dtype=np.float64)
    rank = np.unique(stamp, return_inverse=True)[1].reshape(-1).astype(np.int64)
    test_inter = _test_mask(split_by, user, rank, test_fraction)
    clicked = inter[rating_field] >= threshold if label == "rating" else np.ones(user.size, bool)

    # impressions: the interactions themselves, plus sampled negatives for implicit feedback
    source = np.arange(user.size)
    candidate, click = item, clicked.astype(np.float64)
    if label == "implicit":
        pool = np.unique(item[~test_inter])
        sampled = sample_negatives(np.repeat(user, negatives), pool, user, item, np.random.default_rng(seed))
        source = np.concatenate([source, np.repeat(np.arange(user.size), negatives)])
        candidate = np.concatenate([item, sampled])
        click = np.concatenate([click, np.zeros(sampled.size)])
        regroup = np.argsort(source, kind="stable")  # each interaction followed by its negatives
        source, candidate, click = source[regroup], candidate[regroup], click[regroup]

    events = clicked if history == "positive" else np.ones(user.size, bool)
    order, offsets, index = histories_before(user[events], rank[events], user[source], rank[source], max_history)
    hist_item = item[events][order][index]

    item_side, side_tokens, user_tokens = {}, {}, {}
    if item_path is not None:
        keys, codes, side_tokens = read_side_table(item_path, item_field, item_features, CATEGORY_COLUMNS,
                                                   float_buckets)
        item_side = align_side(keys, codes, item_names)
    elif item_features:
        raise ValueError(f"item_features {list(item_features)} given but there is no .item file")
    user_side = {}
    if user_path is not None:
        types_u = field_types(user_path)
        keys, codes, user_tokens = read_side_table(user_path, user_field, user_features,
                                               [f for f in types_u if f != user_field], float_buckets)
        user_side = {f: c[user] for f, c in align_side(keys, codes, user_names).items()}
    elif user_features:
        raise ValueError(f"user_features {list(user_features)} given but there is no .user file")

    item_cols = {item_field: candidate, **{f: c[candidate] for f, c in item_side.items()}}
    hist_cols = {item_field: hist_item, **{f: c[hist_item] for f, c in item_side.items()}}
    user_cols = ({user_field: user} if user_feature else {}) | user_side
    raw = raw_interactions(user_id=user[source], user={f: c[source] for f, c in user_cols.items()},
                           item=item_cols, offsets=offsets, hist=hist_cols, labels={"click": click},
                           time=np.floor(stamp[source]).astype(np.int64))
    train, test = split(raw, test_inter[source])
    if not len(train) or not len(test):
        raise ValueError(f"the {split_by} split leaves {len(train)} training and {len(test)} test impressions")
    train, test, schema, _ = fit_and_encode(train, test, user_fields=tuple(user_cols), item_fields=tuple(item_cols),
                                            history_fields=tuple(item_cols),
                                            names={**side_tokens, **user_tokens, user_field: user_names,
                                                   item_field: item_names})
    return train, test, schema
