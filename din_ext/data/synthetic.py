"""A seeded synthetic click log in which local activation matters: din-ext's embedded default dataset.

Items belong to categories and brands. Every user has a few latent interests (categories) and a behaviour history
drawn mostly from them. An impression shows a candidate item, from one of the user's interests or not; the click
probability rises with the number of behaviours in the candidate's category (and more with the candidate's brand),
saturating, plus a user bias, an item quality, a price effect and logistic noise. So what matters is the part of
the history related to the candidate — DIN's local activation — which a sum of all behaviours blurs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from din_ext.data.core import Interactions, Schema


@dataclass
class SyntheticConfig:
    """Sizes and effects of the synthetic log (defaults: din-ext's default dataset)."""

    num_users: int = 4000
    num_items: int = 3000
    num_categories: int = 60
    brands_per_category: int = 5
    min_history: int = 2                # behaviours per user, uniform in [min_history, max_history]
    max_history: int = 60
    impressions_per_user: int = 24      # mean; Poisson around it, at least 2
    interests: Tuple[int, int] = (2, 5)  # latent interests (categories) per user, uniform in this range
    off_interest: float = 0.15          # share of behaviours outside the user's interests
    candidate_in_interest: float = 0.5  # share of candidates drawn from the user's interests
    category_effect: float = 1.4        # logit slope in log1p(behaviours in the candidate's category)
    brand_effect: float = 0.9           # logit slope in log1p(behaviours of the candidate's brand)
    base_logit: float = -2.2
    user_bias: float = 0.5              # std of the per-user logit offset
    item_quality: float = 0.4           # std of the per-item logit offset
    price_effect: float = -0.3          # logit slope in the standardized price (a dense feature)
    dense: bool = True                  # dense features: item price and user activity, standardized
    conversion: bool = False            # a second task: conversion (only after a click)
    test_fraction: float = 0.2          # the latest impressions (by time) form the test set


def generate(config: Optional[SyntheticConfig] = None, seed: int = 0) -> Tuple[Interactions, Interactions, Schema]:
    """The synthetic log split by time: returns (train, test, schema). Same config and seed, same data."""
    c = config if config is not None else SyntheticConfig()
    if c.num_users < 1 or c.num_items < c.num_categories or c.num_categories < 2:
        raise ValueError("synthetic config needs num_users >= 1 and num_items >= num_categories >= 2")
    if not 1 <= c.min_history <= c.max_history:
        raise ValueError(f"need 1 <= min_history <= max_history, got {c.min_history}, {c.max_history}")
    if not 0 < c.test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {c.test_fraction}")
    lo, hi = c.interests
    if not 1 <= lo <= hi <= c.num_categories:
        raise ValueError(f"interests must be a range within [1, num_categories], got {c.interests}")
    rng = np.random.default_rng(seed)
    users, items, cats = c.num_users, c.num_items, c.num_categories

    # items: ids 1..items; category 1..cats (every category non-empty), brand 1..cats*brands_per_category
    item_cat = np.concatenate([[0], rng.permutation(np.arange(items) % cats) + 1])
    item_brand = np.concatenate([[0], (item_cat[1:] - 1) * c.brands_per_category
                                 + rng.integers(0, c.brands_per_category, items) + 1])
    item_pop = rng.pareto(1.5, items + 1) + 1.0                  # heavy-tailed popularity within a category
    item_pop[0] = 0.0
    quality = rng.normal(0.0, c.item_quality, items + 1)
    price = rng.normal(0.0, 1.0, items + 1)
    by_cat = [np.flatnonzero(item_cat == k) for k in range(cats + 1)]
    cat_prob = [None] + [item_pop[ix] / item_pop[ix].sum() for ix in by_cat[1:]]

    def draw_items(categories: np.ndarray) -> np.ndarray:
        out = np.empty(categories.size, dtype=np.int64)
        for k in np.unique(categories):
            where = categories == k
            out[where] = rng.choice(by_cat[k], size=int(where.sum()), p=cat_prob[k])
        return out

    # users: profile, interests (categories with Dirichlet weights; padded to `hi` columns), bias
    gender = rng.integers(1, 3, users)
    age = rng.integers(1, 8, users)
    n_interest = rng.integers(lo, hi + 1, users)
    interest_cats = np.argsort(rng.random((users, cats)), axis=1)[:, :hi] + 1  # distinct categories per user
    weights = rng.gamma(1.0, size=(users, hi)) * (np.arange(hi)[None, :] < n_interest[:, None])
    cum_weights = np.cumsum(weights / weights.sum(1, keepdims=True), axis=1)
    cum_weights[:, -1] = 1.0
    bias = rng.normal(0.0, c.user_bias, users)

    def draw_categories(user_of: np.ndarray, in_interest: np.ndarray) -> np.ndarray:
        pick = (rng.random(user_of.size)[:, None] > cum_weights[user_of]).sum(1)
        return np.where(in_interest, interest_cats[user_of, pick], rng.integers(1, cats + 1, user_of.size))

    # behaviour sequences: time-ordered per user, timestamps in [0, 1)
    seq_len = rng.integers(c.min_history, c.max_history + 1, users)
    seq_start = np.concatenate([[0], np.cumsum(seq_len)])
    seq_user = np.repeat(np.arange(users), seq_len)
    seq_items = draw_items(draw_categories(seq_user, rng.random(seq_user.size) >= c.off_interest))
    seq_key = np.sort(seq_user + rng.random(seq_user.size))  # user + time in [0, 1): sorted by user, then time
    # impressions: a time, a candidate, and the history before that time
    n_imp = np.maximum(rng.poisson(c.impressions_per_user, users), 2)
    imp_user = np.repeat(np.arange(users), n_imp)
    imp_time = rng.random(imp_user.size)
    imp_items = draw_items(draw_categories(imp_user, rng.random(imp_user.size) < c.candidate_in_interest))
    # number of behaviours of the user before the impression time
    hist_len = np.searchsorted(seq_key, imp_user + imp_time) - seq_start[imp_user]
    offsets = np.concatenate([[0], np.cumsum(hist_len)])
    owner = np.repeat(np.arange(imp_user.size), hist_len)
    hist_items = seq_items[np.repeat(seq_start[imp_user], hist_len) + np.arange(offsets[-1]) - offsets[owner]]

    # click model: saturating counts of related behaviours (same category; same brand counts again)
    same_cat = np.bincount(owner, item_cat[hist_items] == item_cat[imp_items][owner], minlength=imp_user.size)
    same_brand = np.bincount(owner, item_brand[hist_items] == item_brand[imp_items][owner], minlength=imp_user.size)
    logit = (c.base_logit + c.category_effect * np.log1p(same_cat) + c.brand_effect * np.log1p(same_brand)
             + bias[imp_user] + quality[imp_items] + c.price_effect * price[imp_items])
    click = rng.random(imp_user.size) < 1.0 / (1.0 + np.exp(-logit))
    labels = {"click": click}
    if c.conversion:
        cvr_logit = -1.0 + 0.8 * np.log1p(same_brand) + 2.0 * quality[imp_items] - 0.5 * price[imp_items]
        labels["conversion"] = click & (rng.random(imp_user.size) < 1.0 / (1.0 + np.exp(-cvr_logit)))
    dense = None
    if c.dense:
        activity = (hist_len - hist_len.mean()) / max(hist_len.std(), 1e-6)
        dense = np.stack([price[imp_items], activity], axis=1)

    long = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    data = Interactions(
        user_id=long(imp_user + 1),
        user={"gender": long(gender[imp_user]), "age": long(age[imp_user])},
        item={"item": long(imp_items), "category": long(item_cat[imp_items]), "brand": long(item_brand[imp_items])},
        hist_offsets=long(offsets),
        hist={"item": long(hist_items), "category": long(item_cat[hist_items]),
              "brand": long(item_brand[hist_items])},
        labels={k: torch.from_numpy(v.astype(np.float32)) for k, v in labels.items()},
        dense=None if dense is None else torch.from_numpy(dense.astype(np.float32)),
        time=long(np.floor(imp_time * 1e9)),
    )
    cutoff = np.quantile(imp_time, 1.0 - c.test_fraction)
    train = data.take(torch.from_numpy(np.flatnonzero(imp_time < cutoff)))
    test = data.take(torch.from_numpy(np.flatnonzero(imp_time >= cutoff)))
    item_fields = {"item": items + 1, "category": cats + 1, "brand": cats * c.brands_per_category + 1}
    frequencies = {f: torch.bincount(train.user[f], minlength=n) for f, n in (("gender", 3), ("age", 8))}
    for field, size in item_fields.items():
        frequencies[field] = torch.bincount(torch.cat([train.item[field], train.hist[field]]), minlength=size)
    schema = Schema(user_fields={"gender": 3, "age": 8}, item_fields=item_fields,
                    history_fields=("item", "category", "brand"), dense_dim=2 if c.dense else 0,
                    tasks=tuple(labels), frequencies=frequencies)
    return train.validate(schema), test.validate(schema), schema


def load_synthetic(path=None, *, seed: int = 0, users: Optional[int] = None,
                   conversion: bool = False) -> Tuple[Interactions, Interactions, Schema]:
    """The default synthetic log as a loader, ``load_dataset("synthetic", seed=..., users=..., conversion=...)``.

    users: num_users (default SyntheticConfig's); conversion: a second task. The data is generated: no path.
    """
    if path:
        raise ValueError(f"the synthetic data is generated from its seed, not read: it takes no path, got {path!r}")
    config = SyntheticConfig(conversion=bool(conversion))
    if users is not None:
        config.num_users = int(users)
    return generate(config, seed=int(seed))
