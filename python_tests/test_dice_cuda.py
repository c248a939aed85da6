"""cuda-backend Dice specifics beyond the conformance suite (test_dice.py runs the cuda backend on a GPU): float64
gradcheck and opcheck on the GPU, bitwise determinism over many row blocks. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

import din_ext
from test_dice import gradcheck_dice, inputs, make_dice, run

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and din_ext._backend.has_cuda_kernel("dice")),
    reason="needs a GPU and din_ext built with its CUDA kernels")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(training, masked):
    assert gradcheck_dice(inputs((9, 3), masked, "cuda"), training, "cuda")


@pytest.mark.parametrize("training", [True, False])
def test_opcheck(training):
    x, mask = inputs((11, 4), True, "cuda")
    x = torch.nan_to_num(x).requires_grad_()
    params = torch.rand(5, 4, dtype=torch.float64, device="cuda").add_(0.5).requires_grad_()
    torch.library.opcheck(torch.ops.din_ext.dice.default, (x, mask, params, training, 1e-8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bitwise_deterministic(dtype):
    x, mask = inputs((5000, 37), True, "cuda", dtype=dtype)
    results = []
    for _ in range(3):
        dice = make_dice(37, True, "cuda", dtype=dtype)
        dice.backend = "cuda"
        y, grads = run(dice, x, mask)
        results.append((y, grads, [b.clone() for b in dice.buffers()]))
    y1, grads1, bufs1 = results[0]
    for y2, grads2, bufs2 in results[1:]:
        assert torch.equal(y1, y2)
        assert all(torch.equal(a, b) for a, b in zip(grads1, grads2))
        assert all(torch.equal(a, b) for a, b in zip(bufs1, bufs2))


def test_cpu_tensor_is_refused():
    x = torch.randn(4, 3, dtype=torch.float64)
    params = torch.rand(5, 3, dtype=torch.float64, device="cuda")
    with pytest.raises(RuntimeError, match="dice params must match"):
        torch.ops.din_ext.dice(x.cuda(), None, params.cpu(), True, 1e-8)
