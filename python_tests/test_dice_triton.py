"""The triton Dice beyond the shared conformance tests (test_dice.py): float64 gradcheck and opcheck of its ops.

On the CPU these run under TRITON_INTERPRET=1 (CI: ``TRITON_INTERPRET=1 pytest -k triton``).
"""

from __future__ import annotations

import pytest
import torch

from conftest import TRITON_DEVICE as DEVICE, requires_triton
from test_dice import gradcheck_dice, inputs as dice_inputs

pytestmark = requires_triton


def test_triton_dice_gradcheck():
    assert gradcheck_dice(dice_inputs((9, 3), True, DEVICE), True, "triton")


@pytest.mark.parametrize("training", [True, False])
def test_triton_dice_opcheck(training):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(11, 4, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    mask = (torch.rand(11, generator=g) < 0.7).to(DEVICE)
    params = (torch.rand(5, 4, generator=g, dtype=torch.float64) + 0.5).to(DEVICE).requires_grad_()
    torch.library.opcheck(torch.ops.din_ext.triton_dice.default, (x, mask, params, training, 1e-8))
    y, stats = torch.ops.din_ext.triton_dice(x, mask, params, training, 1e-8)
    torch.library.opcheck(torch.ops.din_ext.triton_dice_backward.default,
                          (torch.randn_like(y), x.detach(), mask, params.detach(), stats.detach(), training, 1e-8))
