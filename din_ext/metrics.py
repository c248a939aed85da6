"""CTR metrics of the DIN paper: AUC, GAUC (impression-weighted user AUC), logloss and RelaImpr.

All functions take 1-D tensors or arrays (labels in {0, 1}) and compute in float64 with numpy.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _vector(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
    return x


def _inputs(labels, scores):
    labels, scores = _vector(labels, "labels"), _vector(scores, "scores")
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must have the same length")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return labels, scores


def _tied_ranks(keys_sorted_equal: np.ndarray, count: int) -> np.ndarray:
    """1-based ranks 1..count of sorted items, ties (``keys_sorted_equal[i]``: item i equals item i-1) averaged."""
    starts = np.flatnonzero(~keys_sorted_equal)                 # first position of every tie run
    ends = np.append(starts[1:], count)                           # one past its last position
    run = np.repeat(np.arange(starts.size), ends - starts)
    return (starts[run] + ends[run] + 1) / 2.0                    # mean of the 1-based ranks starts+1 .. ends


def auc(labels, scores) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, tied scores sharing their average rank.

    labels: (S,) in {0, 1}; scores: (S,) any monotone score (logits or probabilities).
    Raises ValueError when only one class is present.
    """
    labels, scores = _inputs(labels, scores)
    positives = labels.sum()
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError("auc needs both positive and negative labels")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    equal = np.concatenate([[False], sorted_scores[1:] == sorted_scores[:-1]])
    ranks = _tied_ranks(equal, scores.size)
    rank_sum = ranks[labels[order] == 1].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


def gauc(labels, scores, groups) -> float:
    """Impression-weighted mean of per-user AUC (DIN paper eq. 9) over users with both classes.

    labels, scores: (S,); groups: (S,) integer user keys. Raises ValueError when no user has both classes.
    """
    labels, scores = _inputs(labels, scores)
    if isinstance(groups, torch.Tensor):
        groups = groups.detach().cpu().numpy()
    groups = np.asarray(groups)
    if groups.shape != labels.shape:
        raise ValueError(f"groups {groups.shape} must have the same length as labels {labels.shape}")
    _, user = np.unique(groups, return_inverse=True)
    user = user.reshape(-1)
    order = np.lexsort((scores, user))                            # by user, then score
    user_sorted, score_sorted, label_sorted = user[order], scores[order], labels[order]
    equal = np.concatenate([[False], (user_sorted[1:] == user_sorted[:-1]) & (score_sorted[1:] == score_sorted[:-1])])
    global_ranks = _tied_ranks(equal, labels.size)
    impressions = np.bincount(user_sorted).astype(np.float64)
    first = np.concatenate([[0], np.cumsum(impressions)[:-1]])   # global position of each user's first row
    ranks = global_ranks - first[user_sorted]                     # 1-based ranks within the user
    positives = np.bincount(user_sorted, weights=label_sorted, minlength=impressions.size)
    negatives = impressions - positives
    rank_sum = np.bincount(user_sorted, weights=ranks * label_sorted, minlength=impressions.size)
    both = (positives > 0) & (negatives > 0)
    if not both.any():
        raise ValueError("gauc needs at least one group with both positive and negative labels")
    per_user = (rank_sum[both] - positives[both] * (positives[both] + 1) / 2) / (positives[both] * negatives[both])
    return float((impressions[both] * per_user).sum() / impressions[both].sum())


def logloss(labels, probabilities, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities clipped to [eps, 1 - eps]."""
    labels, probabilities = _inputs(labels, probabilities)
    if labels.size == 0:
        raise ValueError("logloss of an empty set")
    if ((probabilities < 0) | (probabilities > 1)).any():
        raise ValueError("probabilities must lie in [0, 1] (apply a sigmoid to logits)")
    p = np.clip(probabilities, eps, 1 - eps)
    return float(-(labels * np.log(p) + (1 - labels) * np.log1p(-p)).mean())


def rela_impr(auc_model: float, auc_base: float) -> float:
    """RelaImpr in percent (DIN paper eq. 10): ((auc_model - 0.5) / (auc_base - 0.5) - 1) * 100."""
    if not (math.isfinite(auc_base) and auc_base > 0.5):
        raise ValueError(f"rela_impr needs a baseline AUC above 0.5, got {auc_base}")
    return ((auc_model - 0.5) / (auc_base - 0.5) - 1.0) * 100.0
