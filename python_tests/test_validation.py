"""Bad input gets a clear error that names the argument, before any kernel runs (one test per kind)."""

from __future__ import annotations

import pytest
import torch

import din_ext
from conftest import requires_cpp

BACKENDS = ["reference"] + (["cpu"] if din_ext._ext.has_cpp() else [])


@pytest.fixture(params=BACKENDS)
def unit(request):
    torch.manual_seed(0)
    return din_ext.LocalActivationUnit(4, (6, 3), backend=request.param)


def padded(batch=3, max_len=5, dim=4):
    return torch.randn(batch, dim), torch.randn(batch, max_len, dim), torch.tensor([5, 0, 2])


def jagged():
    return torch.randn(3, 4), torch.randn(7, 4), torch.tensor([0, 5, 5, 7])


def expect(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_query_shape(unit):
    q, k, l = padded()
    expect(ValueError, r"query must have shape \[B, D\] or \[B, C, D\]", unit, q[None, None], k, l)
    expect(ValueError, r"keys must have shape \[B=1, L, D", unit, q[None], k, l)  # [1, B, D]: B = 1 user


def test_query_dtype(unit):
    q, k, l = padded()
    expect(TypeError, "query must be a floating-point", unit, q.long(), k, l)


def test_keys_dtype(unit):
    q, k, l = padded()
    expect(TypeError, r"keys must have the dtype of query", unit, q, k.double(), l)


def test_keys_device(unit):
    q, k, l = padded()
    expect(ValueError, r"keys must be on the device of query", unit, q, k.to("meta"), l)


def test_keys_shape(unit):
    q, k, l = padded()
    expect(ValueError, r"keys must have shape \[B=3, L, D=4\]", unit, q, k[:2], l)
    q, k, o = jagged()
    expect(ValueError, r"keys must have shape \[N, D=4\]", unit, q, k[:, :3], offsets=o)


def test_lengths_past_L(unit):
    q, k, _ = padded()
    expect(ValueError, r"lengths must be <= L = 5", unit, q, k, torch.tensor([6, 0, 1]))


def test_negative_lengths(unit):
    q, k, _ = padded()
    expect(ValueError, "lengths must be >= 0", unit, q, k, torch.tensor([1, -1, 1]))


def test_lengths_dtype_and_shape(unit):
    q, k, l = padded()
    expect(TypeError, "lengths must be int32 or int64", unit, q, k, l.float())
    expect(ValueError, r"lengths must have shape \(3,\)", unit, q, k, l[:2])
    expect(ValueError, "lengths must be on the device of query", unit, q, k, l.to("meta"))


def test_offsets_not_starting_at_zero(unit):
    q, k, _ = jagged()
    expect(ValueError, r"offsets\[0\] must be 0", unit, q, k, offsets=torch.tensor([1, 5, 5, 7]))


def test_offsets_decreasing(unit):
    q, k, _ = jagged()
    expect(ValueError, "offsets must be non-decreasing", unit, q, k, offsets=torch.tensor([0, 5, 4, 7]))


def test_offsets_past_storage(unit):
    q, k, _ = jagged()
    expect(ValueError, r"offsets\[-1\] = 8 exceeds the 7 rows of keys", unit, q, k, offsets=torch.tensor([0, 5, 5, 8]))


def test_offsets_shape(unit):
    q, k, o = jagged()
    expect(ValueError, r"offsets must have shape \(4,\)", unit, q, k, offsets=o[:3])


def test_max_len_too_small(unit):
    q, k, o = jagged()
    expect(ValueError, "max_len = 4 is smaller than the longest row", unit, q, k, offsets=o, max_len=4)
    expect(ValueError, "max_len must be a non-negative int", unit, q, k, offsets=o, max_len=-2)
    q, k, l = padded()
    expect(ValueError, "max_len is only for jagged inputs", unit, q, k, l, max_len=5)


def test_lengths_and_offsets_together(unit):
    q, k, l = padded()
    expect(ValueError, "exactly one of lengths", unit, q, k, l, offsets=torch.tensor([0, 1, 2, 3]))
    expect(ValueError, "exactly one of lengths", unit, q, k)


def test_values_shape(unit):
    q, k, l = padded()
    expect(ValueError, r"values must have shape \[3, 5, Dv\]", unit, q, k, l, values=torch.randn(3, 4, 2))
    q, k, o = jagged()
    expect(ValueError, r"values must have shape \[7, Dv\]", unit, q, k, offsets=o, values=torch.randn(6, 2))


def test_empty_batch(unit):
    expect(ValueError, "empty batch", unit, torch.randn(0, 4), torch.randn(0, 5, 4), torch.zeros(0, dtype=torch.long))


def test_weights_shapes():
    q, k, l = padded()
    w = [torch.randn(6, 16), torch.randn(1, 6)]
    b = [torch.randn(6), torch.randn(1)]
    f = din_ext.ops.local_activation_attention
    expect(ValueError, r"weights\[0\] must have shape \[H, 16\]", f, q, k, [torch.randn(6, 15), w[1]], b,
           activation="relu", lengths=l)
    expect(ValueError, r"weights\[1\] must have shape \[1, 6\]", f, q, k, [w[0], torch.randn(2, 6)], b,
           activation="relu", lengths=l)
    expect(ValueError, r"biases\[0\] must have shape \[6\]", f, q, k, w, [torch.randn(5), b[1]], activation="relu",
           lengths=l)
    expect(ValueError, r"act_params must have shape \[5, 6\]", f, q, k, w, b, torch.randn(5, 5), lengths=l)
    expect(ValueError, r"needs act_params of shape \[1, 6\]", f, q, k, w, b, activation="prelu", lengths=l)


def test_bad_names():
    expect(ValueError, "activation must be one of", din_ext.LocalActivationUnit, 4, activation="gelu")
    expect(ValueError, "normalization must be one of", din_ext.LocalActivationUnit, 4, normalization="mean")
    unit = din_ext.LocalActivationUnit(4, (6,), backend="fast")
    expect(ValueError, "backend must be one of", unit, *padded())


def test_dice_bad_input():
    dice = din_ext.Dice(4)
    expect(ValueError, "x must have shape", dice, torch.randn(4))
    expect(ValueError, r"alpha must have shape \[5\]", dice, torch.randn(3, 5))
    expect(ValueError, "mask must be a bool tensor", dice, torch.randn(3, 4), torch.ones(3))
    expect(TypeError, "x must be a floating-point", dice, torch.ones(3, 4, dtype=torch.long))


@requires_cpp
def test_compiled_op_checks_direct_calls():
    """Calling torch.ops.din_ext.* directly (no Python validation) still fails cleanly, naming the argument."""
    q, k = torch.randn(2, 4), torch.randn(5, 4)
    w, b = [torch.randn(3, 16), torch.randn(1, 3)], [torch.randn(3), torch.randn(1)]
    p = torch.zeros(0, 3)
    op = torch.ops.din_ext.local_activation_attention
    starts, lengths = torch.tensor([0, 3]), torch.tensor([3, 2])
    with pytest.raises(RuntimeError, match="starts \\+ lengths exceeds the number of keys"):
        op(q, k, None, starts, torch.tensor([3, 3]), -1, w, b, p, "relu", "none", 1.0, False, 1e-8)
    with pytest.raises(RuntimeError, match="lengths must be >= 0"):
        op(q, k, None, starts, torch.tensor([3, -1]), -1, w, b, p, "relu", "none", 1.0, False, 1e-8)
    with pytest.raises(RuntimeError, match="lengths must be int64"):
        op(q, k, None, starts, lengths.int(), -1, w, b, p, "relu", "none", 1.0, False, 1e-8)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        op(q, k, None, starts, lengths, -1, w, b, p, "gelu", "none", 1.0, False, 1e-8)
    with pytest.raises(RuntimeError, match=r"weights\[0\] must have shape"):
        op(q, k, None, starts, lengths, -1, [torch.randn(3, 15), w[1]], b, p, "relu", "none", 1.0, False, 1e-8)
    with pytest.raises(RuntimeError, match="lengths exceed max_len"):
        op(q, k, None, starts, lengths, 2, w, b, p, "relu", "none", 1.0, False, 1e-8)


@requires_cpp
def test_backward_ops_check_grad_and_stats():
    """The compiled backward ops name a bad incoming gradient or batch-statistics tensor (shape, dtype)."""
    query, keys = torch.randn(2, 3), torch.randn(4, 3)
    starts, lengths = torch.tensor([0, 2]), torch.tensor([2, 2])
    weights, biases = [torch.randn(5, 12), torch.randn(1, 5)], [torch.randn(5), torch.randn(1)]
    act_params, stats, grad_out = torch.empty(0, 5), torch.zeros(2, 5), torch.randn(2, 3)

    def attention_backward(grad_out=grad_out, stats=stats):
        return torch.ops.din_ext.local_activation_attention_backward(
            grad_out, query, keys, None, starts, lengths, 2, weights, biases, act_params, stats, "sigmoid", "none",
            1.0, False, 1e-8)

    attention_backward()  # the good arguments pass
    expect(RuntimeError, r"grad_out must have shape \[2, 3\]", attention_backward, grad_out=torch.randn(2, 4))
    expect(RuntimeError, r"stats must have shape \[2, 5\]", attention_backward, stats=torch.zeros(2, 4))
    expect(RuntimeError, "grad_out and stats must have the dtype Float", attention_backward,
           grad_out=grad_out.double())

    x, params = torch.randn(6, 5), torch.rand(5, 5) + 0.5

    def dice_backward(grad_y=torch.randn(6, 5), stats=stats):
        return torch.ops.din_ext.dice_backward(grad_y, x, None, params, stats, True, 1e-8)

    dice_backward()
    expect(RuntimeError, r"grad_y must have shape \[6, 5\]", dice_backward, grad_y=torch.randn(5, 5))
    expect(RuntimeError, r"stats must have shape \[2, 5\]", dice_backward, stats=torch.zeros(3, 5))
    expect(RuntimeError, "grad_y and stats must have the dtype Float", dice_backward, stats=stats.double())


@pytest.mark.parametrize("kwargs, argument", [
    ({"eps": 0.0}, "eps"), ({"eps": -1e-5}, "eps"), ({"eps": float("nan")}, "eps"), ({"eps": float("inf")}, "eps"),
    ({"momentum": 1.5}, "momentum"), ({"momentum": -0.1}, "momentum"), ({"momentum": float("nan")}, "momentum"),
    ({"num_features": 0}, "num_features"),
])
def test_dice_options_are_checked_at_construction(kwargs, argument):
    """eps=0 gave NaN for a feature of zero batch variance, momentum=1.5 a negative running_var."""
    args = {"num_features": 4, **kwargs}
    with pytest.raises(ValueError, match=f"Dice {argument} must be") as info:
        din_ext.Dice(**args)
    assert repr(list(kwargs.values())[0]) in str(info.value)


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan")])
def test_functional_ops_check_eps(eps):
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        din_ext.ops.dice(x, torch.zeros(4), torch.zeros(4), torch.ones(4), eps=eps)
    unit = din_ext.LocalActivationUnit(4, (8,))
    weights = [lin.weight for lin in unit.linears] + [unit.out.weight]
    biases = [lin.bias for lin in unit.linears] + [unit.out.bias]
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        din_ext.ops.local_activation_attention(x, torch.randn(3, 2, 4), weights, biases, unit.act_params(),
                                               lengths=torch.tensor([2, 1, 0]), eps=eps)


def test_dice_momentum_none_is_a_cumulative_average():
    """momentum=None averages every batch's statistics equally, as nn.BatchNorm1d(momentum=None) does."""
    dice = din_ext.Dice(3, momentum=None, affine=True)
    norm = torch.nn.BatchNorm1d(3, momentum=None)
    for seed in range(4):
        x = torch.randn(16, 3, generator=torch.Generator().manual_seed(seed)) * (seed + 1)
        dice(x), norm(x)
    assert torch.allclose(dice.running_mean, norm.running_mean, atol=1e-6)
    assert torch.allclose(dice.running_var, norm.running_var, atol=1e-6)
    for momentum in (0.0, 1.0):  # the ends of the range are legal
        din_ext.Dice(3, momentum=momentum)
