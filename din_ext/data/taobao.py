"""The Taobao display-ad click logs (Alimama, "Ad Display/Click Data on Taobao.com").

Files (comma separated, header row, optionally gzip'd):
  raw_sample.csv    user,time_stamp,adgroup_id,pid,nonclk,clk      -- the impressions and their clicks
  ad_feature.csv    adgroup_id,cate_id,campaign_id,customer,brand,price
  user_profile.csv  userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,shopping_level,
                    occupation,new_user_class_level                 -- empty fields are missing values
  behavior_log.csv  user,time_stamp,btag,cate,brand                 -- btag: pv, cart, fav, buy
An impression's history is the user's behaviours (cate, brand) strictly before its time stamp, the most recent
``max_history`` of them. Impressions at or after ``test_start`` (default: 00:00 UTC of the last day with
impressions, i.e. 2017-05-13 on the public data) form the test set. Missing values ('', NULL), ads missing from
ad_feature.csv and users missing from user_profile.csv map to the OOV row.

Size: behavior_log.csv is read a chunk at a time (about 1 us a row), keeping only the behaviours of users with
impressions (16 bytes each). The result holds 16 bytes per history entry (two int64 fields), so the public
data (26M impressions, 700M behaviours) wants a large machine, a smaller ``max_history``, ``btags`` or
``behavior_rows``.
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

from din_ext.data.build import check_max_history, histories_before, raw_interactions, split
from din_ext.data.readers import MISSING, find_file, parse_error, read_columns, read_table, require_path
from din_ext.data.vocab import fit_and_encode, intern, locate

PROFILE_FIELDS = ("cms_segid", "cms_group_id", "final_gender_code", "age_level", "pvalue_level",
                  "shopping_level", "occupation", "new_user_class_level")
AD_FIELDS = {"adgroup_id": "int", "cate_id": "id", "campaign_id": "id", "customer": "id", "brand": "id",
             "price": "float"}
BTAGS = ("pv", "cart", "fav", "buy")
DAY = 86400


def _table(path, columns, key):
    """A small table as columns sorted by ``key``, keeping the first row of each key."""
    table = read_columns(path, columns)
    _, first = np.unique(table[key], return_index=True)
    return {c: v[first] for c, v in table.items()}


def _narrow(values: np.ndarray) -> np.ndarray:
    """int32 when the values fit (halves the memory of a long behaviour log), else unchanged."""
    if values.size and (values.min() < np.iinfo(np.int32).min or values.max() > np.iinfo(np.int32).max):
        return values
    return values.astype(np.int32)


def read_behaviors(path, users: np.ndarray, btags: Optional[Iterable[str]], limit: Optional[int] = None):
    """(user, time, cate, brand) of the behaviours of ``users`` (sorted unique) with a tag in ``btags``."""
    if btags is not None:
        btags = tuple(btags)
        unknown = [b for b in btags if b not in BTAGS]
        if unknown:
            raise ValueError(f"btags must be among {BTAGS}, got {unknown}")
    parts = []
    columns = {"user": "int", "time_stamp": "int", "cate": "id", "brand": "id"}
    if btags is not None:
        columns["btag"] = "str"
    for chunk in read_table(path, columns, limit=limit):
        keep = locate(users, chunk["user"])[1]
        if btags is not None:
            keep &= np.isin(chunk["btag"], btags)
        parts.append([_narrow(chunk[c][keep]) for c in ("user", "time_stamp", "cate", "brand")])
    if not parts:
        return [np.zeros(0, np.int64)] * 4
    return [np.concatenate(p) for p in zip(*parts)]


def load_taobao(path, *, max_history: Optional[int] = 50, btags: Optional[Iterable[str]] = None,
                test_start: Optional[int] = None, price: bool = True, pid: bool = True,
                behavior_rows: Optional[int] = None):
    """Load the four Taobao csv files in directory ``path`` -> ``(train, test, schema)``.

    max_history: most recent behaviours kept per impression (None: all). btags: behaviour types to keep, e.g.
    ``("pv",)`` (default: all four). test_start: unix time where the test set starts (default: 00:00 UTC of the
    last impression day). price: ``log1p(price)`` as the one dense feature. pid: the ad position id as a
    candidate-side field. behavior_rows: read only the first that many rows of behavior_log.csv.
    Fields: user fields = the profile columns; item fields adgroup, cate, brand, campaign, customer (+ pid);
    history fields cate, brand. ``user_id`` is the raw user id.
    """
    max_history = check_max_history(max_history)
    path = require_path(path, "taobao")
    sample_path = find_file(path, ("raw_sample.csv",), "taobao impressions")
    ads_path = find_file(path, ("ad_feature.csv",), "taobao ad features")
    profile_path = find_file(path, ("user_profile.csv",), "taobao user profiles")
    log_path = find_file(path, ("behavior_log.csv",), "taobao behaviour log")

    sample = read_columns(sample_path, {"user": "int", "time_stamp": "int", "adgroup_id": "int", "pid": "str",
                                        "clk": "int"})
    clicks, user, time = sample["clk"], sample["user"], sample["time_stamp"]
    for name, bad in (("clk", (clicks != 0) & (clicks != 1)), ("user", user < 0), ("time_stamp", time < 0)):
        if bad.any():
            row = int(np.argmax(bad))
            raise parse_error(sample_path, row + 2, f"column {name!r}: invalid value {sample[name][row]}")
    if not user.size:
        raise parse_error(sample_path, 2, "no impressions after the header")

    ads = _table(ads_path, AD_FIELDS, "adgroup_id")
    at, found = locate(ads["adgroup_id"], sample["adgroup_id"])
    item = {"adgroup": sample["adgroup_id"]}
    for field, column in (("cate", "cate_id"), ("brand", "brand"), ("campaign", "campaign_id"),
                          ("customer", "customer")):
        item[field] = np.where(found, ads[column][at], MISSING)
    names = {}
    if pid:
        item["pid"], names["pid"] = intern(sample["pid"])

    profile = _table(profile_path, {"userid": "int", **{f: "id" for f in PROFILE_FIELDS}}, "userid")
    at_user, has_profile = locate(profile["userid"], user)
    user_fields = {f: np.where(has_profile, profile[f][at_user], MISSING) for f in PROFILE_FIELDS}

    b_user, b_time, b_cate, b_brand = read_behaviors(log_path, np.unique(user), btags, behavior_rows)
    order, offsets, index = histories_before(b_user, b_time, user, time, max_history)
    hist = {"cate": b_cate[order][index], "brand": b_brand[order][index]}

    dense = None
    if price:
        value = np.where(found, ads["price"][at], 0.0)
        dense = np.log1p(np.maximum(np.nan_to_num(value), 0.0)).reshape(-1, 1)

    cut = (int(time.max()) // DAY) * DAY if test_start is None else int(test_start)
    test_mask = time >= cut
    if test_mask.all() or not test_mask.any():
        raise ValueError(f"test_start={cut} leaves {int((~test_mask).sum())} training and {int(test_mask.sum())} "
                         "test impressions; both must be non-empty")
    raw = raw_interactions(user_id=user, user=user_fields, item=item, offsets=offsets, hist=hist,
                           labels={"click": clicks}, dense=dense, time=time)
    train, test = split(raw, test_mask)
    train, test, schema, _ = fit_and_encode(train, test, user_fields=PROFILE_FIELDS, item_fields=tuple(item),
                                            history_fields=("cate", "brand"), dense_dim=1 if price else 0,
                                            names=names)
    return train, test, schema
