"""Metrics against hand-computed cases and a brute-force pairwise AUC."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from din_ext.metrics import auc, gauc, logloss, rela_impr


def pairwise_auc(labels, scores) -> float:
    """O(n^2) definition: P(score_pos > score_neg) + 0.5 P(tie)."""
    pos = [s for y, s in zip(labels, scores) if y == 1]
    neg = [s for y, s in zip(labels, scores) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def pairwise_gauc(labels, scores, groups) -> float:
    total = weight = 0.0
    for g in set(groups):
        idx = [i for i, x in enumerate(groups) if x == g]
        ys = [labels[i] for i in idx]
        if 0 < sum(ys) < len(ys):
            total += len(idx) * pairwise_auc(ys, [scores[i] for i in idx])
            weight += len(idx)
    return total / weight


def test_auc_hand_computed():
    # positives 0.8, 0.4; negatives 0.6, 0.2: pairs (0.8>0.6, 0.8>0.2, 0.4<0.6, 0.4>0.2) -> 3/4
    assert auc([1, 0, 1, 0], [0.8, 0.6, 0.4, 0.2]) == pytest.approx(0.75)
    assert auc([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.0]) == 1.0
    assert auc([0, 0, 1, 1], [0.9, 0.8, 0.1, 0.0]) == 0.0


def test_auc_ties_count_half():
    # positive 0.5 ties negative 0.5 (half), beats negative 0.1 -> (0.5 + 1) / 2
    assert auc([1, 0, 0], [0.5, 0.5, 0.1]) == pytest.approx(0.75)
    assert auc([1, 0, 1, 0], [1.0, 1.0, 1.0, 1.0]) == pytest.approx(0.5)


def test_auc_matches_pairwise_on_random_data():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(2, 60))
        labels = rng.integers(0, 2, n)
        labels[0], labels[1] = 0, 1
        scores = rng.integers(0, 6, n) / 5.0 if trial % 2 else rng.normal(size=n)  # many ties on odd trials
        assert auc(labels, scores) == pytest.approx(pairwise_auc(labels, scores), abs=1e-12)


def test_auc_accepts_tensors_and_rejects_bad_input():
    assert auc(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 1.0])) == 1.0
    with pytest.raises(ValueError, match="both positive and negative"):
        auc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="same length"):
        auc([1, 0], [0.1])
    with pytest.raises(ValueError, match="0 or 1"):
        auc([2, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        auc([1, 0], [float("nan"), 0.2])


def test_gauc_hand_computed():
    # user 7: 4 impressions, AUC 0.75 (case above); user 3: 2 impressions, AUC 0; user 5: one class only (skipped)
    labels = [1, 0, 1, 0, 0, 1, 1, 1]
    scores = [0.8, 0.6, 0.4, 0.2, 0.9, 0.1, 0.3, 0.5]
    groups = [7, 7, 7, 7, 3, 3, 5, 5]
    assert gauc(labels, scores, groups) == pytest.approx((4 * 0.75 + 2 * 0.0) / 6)


def test_gauc_matches_pairwise_on_random_data():
    rng = np.random.default_rng(1)
    for trial in range(10):
        n = int(rng.integers(10, 80))
        labels = rng.integers(0, 2, n).tolist()
        groups = rng.integers(0, 6, n).tolist()
        groups[:4], labels[:4] = [0, 0, 1, 1], [0, 1, 1, 0]
        scores = (rng.integers(0, 4, n) / 3.0 if trial % 2 else rng.normal(size=n)).tolist()
        assert gauc(labels, scores, groups) == pytest.approx(pairwise_gauc(labels, scores, groups), abs=1e-12)


def test_gauc_ties_are_per_user():
    # the same score in two users is not a tie across users: user 1 has AUC 1, user 2 has AUC 0
    assert gauc([1, 0, 0, 1], [0.5, 0.2, 0.5, 0.2], [1, 1, 2, 2]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both positive and negative"):
        gauc([1, 0], [0.1, 0.2], [1, 2])


def test_logloss_hand_computed_and_clipped():
    assert logloss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert logloss([1], [0.0]) == pytest.approx(-math.log(1e-7))  # clipped, not inf
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        logloss([1], [1.5])


def test_rela_impr():
    assert rela_impr(0.66, 0.6) == pytest.approx(60.0)
    assert rela_impr(0.6, 0.6) == pytest.approx(0.0)
    assert rela_impr(0.55, 0.6) == pytest.approx(-50.0)
    with pytest.raises(ValueError, match="above 0.5"):
        rela_impr(0.7, 0.5)
