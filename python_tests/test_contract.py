"""The op contract is written twice, in din_ext/contract.py and in csrc/common.{h,cpp}: the two must agree.

din_ext::_contract lists the C++ side: activation and normalization names in enum order (an activation's enum value
is the id the kernels switch on), the act_params rows of each activation, and the Dice row names in row order.
"""

from __future__ import annotations

import pytest
import torch

from conftest import requires_cpp
from din_ext import contract

pytestmark = requires_cpp


def cpp_contract():
    activations, normalizations, act_param_rows, dice_rows = torch.ops.din_ext._contract()
    return list(activations), list(normalizations), list(act_param_rows), list(dice_rows)


def test_activation_ids_match_the_cpp_enum():
    activations, _, _, _ = cpp_contract()
    assert {name: i for i, name in enumerate(activations)} == contract.ACTIVATION_IDS
    assert tuple(activations) == contract.ACTIVATIONS


def test_normalizations_match_the_cpp_enum():
    _, normalizations, _, _ = cpp_contract()
    assert tuple(normalizations) == contract.NORMALIZATIONS


def test_act_param_rows_match():
    activations, _, act_param_rows, _ = cpp_contract()
    assert dict(zip(activations, act_param_rows)) == contract.ACT_PARAM_ROWS


def test_dice_rows_match():
    _, _, _, dice_rows = cpp_contract()
    assert tuple(dice_rows) == contract.DICE_ROWS
    assert [dice_rows.index(row) for row in ("alpha", "gamma", "beta", "running_mean", "running_var")] == [
        contract.DICE_ALPHA, contract.DICE_GAMMA, contract.DICE_BETA, contract.DICE_RUNNING_MEAN,
        contract.DICE_RUNNING_VAR]


def test_the_ops_accept_every_contract_name_and_refuse_others():
    """parse_activation / parse_normalization read the same table _contract lists: each name runs, others fail."""
    query, keys = torch.randn(2, 3), torch.randn(4, 3)
    starts, lengths = torch.tensor([0, 2]), torch.tensor([2, 2])
    weights, biases = [torch.randn(5, 12), torch.randn(1, 5)], [torch.randn(5), torch.randn(1)]

    def run(activation, normalization):
        act_params = torch.rand(contract.ACT_PARAM_ROWS.get(activation, 0), 5) + 0.5
        return torch.ops.din_ext.local_activation_attention(query, keys, None, starts, lengths, 2, weights, biases,
                                                            act_params, activation, normalization, 1.0, False, 1e-8)

    for activation in contract.ACTIVATIONS:
        for normalization in contract.NORMALIZATIONS:
            run(activation, normalization)
    quoted = ", ".join(f"'{name}'" for name in contract.ACTIVATIONS)
    with pytest.raises(RuntimeError, match=f"activation must be one of {quoted}, got 'tanh'"):
        run("tanh", "none")
    quoted = ", ".join(f"'{name}'" for name in contract.NORMALIZATIONS)
    with pytest.raises(RuntimeError, match=f"normalization must be one of {quoted}, got 'mean'"):
        run("relu", "mean")
