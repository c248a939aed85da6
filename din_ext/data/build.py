"""Vectorized building blocks of the loaders: jagged histories, negative sampling, splits."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch

from din_ext.data.core import Interactions
from din_ext.data.vocab import locate, search_sorted


def _long(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))


def jagged(starts: np.ndarray, lengths: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Row i takes positions ``starts[i] .. starts[i] + lengths[i] - 1`` of some array.

    Returns ``offsets [S + 1]`` and the gather index ``[offsets[-1]]`` (both int64).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    return offsets, np.repeat(np.asarray(starts, dtype=np.int64), lengths) + within


def histories_before(event_user, event_time, user, time, max_history: Optional[int]):
    """For each impression (user, time): the user's events strictly before ``time``, oldest first.

    event_user, event_time: [E] int64 (any order). user, time: [S] int64. Ties in time keep file order. At
    most the ``max_history`` most recent events are kept (None: all).
    Returns ``(order, offsets, index)``: events sorted by (user, time) are ``order``; row i's history is
    ``order[index[offsets[i]:offsets[i + 1]]]``.
    """
    event_user, event_time = np.asarray(event_user, np.int64), np.asarray(event_time, np.int64)
    user, time = np.asarray(user, np.int64), np.asarray(time, np.int64)
    order = np.lexsort((np.arange(event_user.size), event_time, event_user))
    if not event_user.size or not user.size:
        return order, np.zeros(user.size + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    first, end = history_bounds(event_user[order], event_time[order], user, time)
    lengths = end - first
    if max_history is not None:
        lengths = np.minimum(lengths, max_history)
    offsets, index = jagged(end - lengths, lengths)
    return order, offsets, index


def history_bounds(event_user, event_time, user, time) -> Tuple[np.ndarray, np.ndarray]:
    """(first, end) positions in events sorted by (user, time): impression i's user's events strictly before its
    time are ``first[i]:end[i]``. event_user, event_time: [E] int64, sorted; user, time: [S] int64."""
    event_user, event_time = np.asarray(event_user, np.int64), np.asarray(event_time, np.int64)
    user, time = np.asarray(user, np.int64), np.asarray(time, np.int64)
    if not event_user.size or not user.size:
        return np.zeros(user.size, dtype=np.int64), np.zeros(user.size, dtype=np.int64)
    t_min = min(int(event_time.min()), int(time.min()))
    span = max(int(event_time.max()), int(time.max())) - t_min + 1
    top = max(int(event_user.max()), int(user.max())) + 1
    if min(int(event_user.min()), int(user.min())) < 0:
        raise ValueError("user codes must be non-negative")
    if top * span >= 2 ** 62:  # the (user, time) key would overflow: compare time ranks instead
        ranks = np.unique(np.concatenate([event_time, time]), return_inverse=True)[1].reshape(-1)
        event_time, time = ranks[:event_time.size], ranks[event_time.size:]
        t_min, span = 0, int(ranks.max()) + 1
    keys = event_user * span + (event_time - t_min)
    return search_sorted(keys, user * span), search_sorted(keys, user * span + (time - t_min))


def sample_negatives(user, pool, forbidden_user, forbidden_item, rng: np.random.Generator,
                     max_rounds: int = 64) -> np.ndarray:
    """One item from ``pool`` per entry of ``user``, uniformly, never an item the user interacted with.

    forbidden_user, forbidden_item: the (user, item) pairs to avoid (all int64 codes >= 0).
    """
    user, pool = np.asarray(user, np.int64), np.asarray(pool, np.int64)
    if user.size and not pool.size:
        raise ValueError("cannot sample negatives: the pool of items is empty")
    space = int(max(pool.max(initial=0), np.max(forbidden_item, initial=0))) + 1
    forbidden = np.sort(np.asarray(forbidden_user, np.int64) * space + np.asarray(forbidden_item, np.int64))
    out = pool[rng.integers(0, pool.size, user.size)] if user.size else np.zeros(0, np.int64)
    redo = np.arange(user.size)
    for _ in range(max_rounds):
        redo = redo[locate(forbidden, user[redo] * space + out[redo])[1]]
        if not redo.size:
            return out
        out[redo] = pool[rng.integers(0, pool.size, redo.size)]
    raise ValueError(f"cannot sample negatives for {redo.size} impressions: their users interacted with "
                     "(almost) every item of the pool")


def raw_interactions(user_id, user: Dict[str, np.ndarray], item: Dict[str, np.ndarray], offsets,
                     hist: Dict[str, np.ndarray], labels: Dict[str, np.ndarray], dense=None,
                     time=None) -> Interactions:
    """``Interactions`` from numpy columns (ids still raw codes)."""
    return Interactions(
        user_id=_long(user_id), user={k: _long(v) for k, v in user.items()},
        item={k: _long(v) for k, v in item.items()}, hist_offsets=_long(offsets),
        hist={k: _long(v) for k, v in hist.items()},
        labels={k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in labels.items()},
        dense=None if dense is None else torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
        time=None if time is None else _long(time))


def split(raw: Interactions, test_mask) -> Tuple[Interactions, Interactions]:
    """(rows where ``test_mask`` is False, rows where it is True), each in the original order."""
    test_mask = torch.as_tensor(np.asarray(test_mask, dtype=bool))
    return raw.take(torch.nonzero(~test_mask).reshape(-1)), raw.take(torch.nonzero(test_mask).reshape(-1))


def check_max_history(max_history) -> Optional[int]:
    if max_history is not None and (not isinstance(max_history, int) or max_history < 0):
        raise ValueError(f"max_history must be a non-negative int or None, got {max_history!r}")
    return max_history
