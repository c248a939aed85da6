"""The oracle itself: the reference against a plain per-user, per-behaviour loop written independently."""

from __future__ import annotations

import pytest
import torch

import din_ext
from din_ext import reference


def loop_attention(unit: din_ext.LocalActivationUnit, query, keys, lengths):
    """DIN attention one behaviour at a time with nn layers (eval mode, so Dice uses running statistics)."""
    outs = []
    for b in range(query.shape[0]):
        scores, rows = [], []
        for l in range(int(lengths[b])):
            q, k = query[b], keys[b, l]
            h = torch.cat([q, k, q - k, q * k])
            for linear, act in zip(unit.linears, unit.activations):
                h = linear(h)
                if isinstance(act, din_ext.Dice):
                    p = torch.sigmoid((h - act.running_mean) / torch.sqrt(act.running_var + act.eps))
                    h = p * h + (1 - p) * act.alpha * h
                else:
                    h = act(h[None])[0]
            scores.append(unit.out(h)[0] * unit.score_scale)
            rows.append(keys[b, l])
        if not rows:
            outs.append(torch.zeros_like(query[b]))
            continue
        s = torch.stack(scores)
        w = torch.softmax(s, 0) if unit.normalization == "softmax" else s
        outs.append((w[:, None] * torch.stack(rows)).sum(0))
    return torch.stack(outs)


@pytest.mark.parametrize("activation", ["dice", "sigmoid", "prelu", "relu"])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_reference_matches_loop(activation, normalization):
    torch.manual_seed(0)
    unit = din_ext.LocalActivationUnit(6, (7, 5), activation=activation, normalization=normalization,
                                       score_scale=0.5, backend="reference").double().eval()
    if activation == "dice":
        for act in unit.activations:
            act.running_mean.uniform_(-0.2, 0.2)
            act.alpha.data.uniform_(-0.5, 0.5)
    query, keys = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 5, 6, dtype=torch.float64)
    lengths = torch.tensor([5, 0, 1, 3])
    torch.testing.assert_close(unit(query, keys, lengths), loop_attention(unit, query, keys, lengths))


def test_reference_dice_training_statistics_over_valid_rows_only():
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    mask = torch.arange(6)[None, :] < torch.tensor([6, 2, 0, 4])[:, None]
    x_masked = x.masked_fill(~mask[..., None], 1e6)  # padding must not move the statistics
    y, mean, var = reference.dice(x_masked, torch.zeros(3), torch.zeros(3), torch.ones(3), mask=mask)
    rows = x[mask]
    torch.testing.assert_close(mean, rows.mean(0))
    torch.testing.assert_close(var, rows.var(0, unbiased=False))
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))


def test_jagged_to_padded():
    values = torch.arange(12.0).reshape(6, 2)
    padded, lengths = reference.jagged_to_padded(values, torch.tensor([0, 3, 3, 5]))
    assert lengths.tolist() == [3, 0, 2]
    assert padded.shape == (3, 3, 2)
    assert padded[0].tolist() == values[:3].tolist()
    assert padded[2, :2].tolist() == values[3:5].tolist() and padded[2, 2].tolist() == [0, 0]
    assert padded[1].abs().sum() == 0


def test_mba_regularization_matches_loop():
    torch.manual_seed(0)
    weight = torch.randn(10, 3, dtype=torch.float64)
    freq = torch.randint(1, 9, (10,))
    ids = [torch.tensor([[1, 4, 4], [9, 0, 1]]), torch.tensor([4, 7, 0])]
    value, grad = reference.mba_regularization(weight, ids, freq, 0.3, padding_idx=0)
    distinct = {1, 4, 9, 7}  # 0 is the padding row; repeats and the second tensor count once
    expected_value = sum(0.15 * weight[j].square().sum() / freq[j] for j in distinct)
    torch.testing.assert_close(value, expected_value)
    for j in range(10):
        expected = 0.3 * weight[j] / freq[j] if j in distinct else torch.zeros(3, dtype=torch.float64)
        torch.testing.assert_close(grad[j], expected)
    w = weight.clone().requires_grad_()
    reference.mba_regularization(w, ids, freq, 0.3, padding_idx=0)[0].backward()
    torch.testing.assert_close(w.grad, grad)  # grad is the derivative of the value
