"""Dice: every backend against din_ext.reference, and the reference against nn.BatchNorm1d."""

from __future__ import annotations

import copy

import pytest
import torch

import din_ext
from conftest import requires_cpp


def make_dice(features, affine, device, dtype=torch.float64, training=True, seed=0):
    torch.manual_seed(seed)
    dice = din_ext.Dice(features, affine=affine).to(device=device, dtype=dtype).train(training)
    with torch.no_grad():
        dice.alpha.uniform_(-1, 1)
        dice.running_mean.uniform_(-0.5, 0.5)
        dice.running_var.uniform_(0.5, 2)
        if affine:
            dice.weight.uniform_(0.5, 1.5)
            dice.bias.uniform_(-0.5, 0.5)
    return dice


def inputs(shape, masked, device, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=dtype) * 2 + 0.3).to(device)
    mask = None
    if masked:
        mask = (torch.rand(shape[:-1], generator=g) < 0.6).to(device)
        x = torch.where(mask[..., None], x, torch.full_like(x, float("nan")))  # masked rows are never read
    return x, mask


def run(dice, x, mask):
    x = x.detach().clone().requires_grad_()
    y = dice(x, mask)
    # Drawn in float64 whatever y's dtype, so that runs in different dtypes get the same upstream gradient.
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.device, y.dtype)
    params = [p for p in dice.parameters()]
    grads = torch.autograd.grad((torch.nan_to_num(y) * g).sum(), [x, *params])
    return y, grads


@pytest.mark.parametrize("shape", [(37, 9), (5, 13, 9), (1000, 9)], ids=["2d", "3d", "blocks"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_reference(backend, shape, masked, affine, training):
    name, device = backend
    ours = make_dice(shape[-1], affine, device, training=training)
    oracle = copy.deepcopy(ours)
    ours.backend, oracle.backend = name, "reference"
    x, mask = inputs(shape, masked, device)
    y, grads = run(ours, x, mask)
    ref_y, ref_grads = run(oracle, torch.nan_to_num(x), mask)
    torch.testing.assert_close(y, ref_y, atol=1e-12, rtol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(torch.nan_to_num(g), r, atol=1e-12, rtol=1e-10)
    for b, r in zip(ours.buffers(), oracle.buffers()):
        torch.testing.assert_close(b, r, atol=1e-12, rtol=1e-10)
    if masked:
        assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
        assert torch.equal(grads[0][~mask], torch.zeros_like(grads[0][~mask]))


@pytest.mark.parametrize("rows", [0, 1])
def test_too_few_rows(backend, rows):
    name, device = backend
    dice = make_dice(4, False, device)
    dice.backend = name
    before = dice.running_var.clone()
    x = torch.randn(rows, 4, dtype=torch.float64, device=device)
    y = dice(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert torch.equal(dice.running_var, before)


def test_float32(backend):
    name, device = backend
    ours = make_dice(33, True, device, dtype=torch.float32)
    oracle = copy.deepcopy(ours)
    ours.backend, oracle.backend = name, "reference"
    x, mask = inputs((7, 19, 33), True, device, dtype=torch.float32)
    y, grads = run(ours, x, mask)
    ref_y, ref_grads = run(oracle, torch.nan_to_num(x), mask)
    torch.testing.assert_close(y, ref_y)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(torch.nan_to_num(g), r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("masked", [False, True])
def test_reference_is_batchnorm_gated(masked):
    """Dice's gate is sigmoid of BatchNorm over the valid rows; running stats update like BatchNorm1d."""
    dice = make_dice(6, False, "cpu")
    dice.backend = "reference"
    bn = torch.nn.BatchNorm1d(6, eps=dice.eps, affine=False).double()
    bn.running_mean.copy_(dice.running_mean)
    bn.running_var.copy_(dice.running_var)
    x, mask = inputs((40, 6), masked, "cpu")
    x = torch.nan_to_num(x)
    rows = x if mask is None else x[mask]
    p = torch.sigmoid(bn(rows))
    expected = p * rows + (1 - p) * dice.alpha * rows
    y = dice(x, mask)
    torch.testing.assert_close(y if mask is None else y[mask], expected)
    torch.testing.assert_close(dice.running_mean, bn.running_mean)
    torch.testing.assert_close(dice.running_var, bn.running_var)
    dice.eval()
    bn.eval()
    p = torch.sigmoid(bn(x))
    torch.testing.assert_close(dice(x), p * x + (1 - p) * dice.alpha * x)


@requires_cpp
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_cpu(training, masked):
    assert gradcheck_dice(inputs((9, 3), masked, "cpu"), training, "cpu")


def gradcheck_dice(x_and_mask, training, backend):
    """float64 gradcheck of the Dice op on ``backend`` for x (NaN garbage zeroed) and mask, every parameter too."""
    x, mask = x_and_mask
    x = torch.nan_to_num(x)
    g = torch.Generator().manual_seed(3)
    params = [(torch.rand(3, generator=g, dtype=torch.float64) + 0.5).to(x.device)
              for _ in range(5)]  # alpha ... running_var
    leaves = [t.requires_grad_() for t in [x, *params]]

    def fn(x, alpha, gamma, beta, running_mean, running_var):
        y, _, _ = din_ext.ops.dice(x, alpha, running_mean, running_var, mask=mask, gamma=gamma, beta=beta,
                                   training=training, backend=backend)
        return y

    return torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


@requires_cpp
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(training, masked):
    x, mask = inputs((11, 4), masked, "cpu")
    x = torch.nan_to_num(x).requires_grad_()
    params = torch.rand(5, 4, dtype=torch.float64).add_(0.5).requires_grad_()
    torch.library.opcheck(torch.ops.din_ext.dice.default, (x, mask, params, training, 1e-8))
    y, stats = torch.ops.din_ext.dice(x, mask, params, training, 1e-8)
    torch.library.opcheck(torch.ops.din_ext.dice_backward.default,
                          (torch.randn_like(y), x.detach(), mask, params.detach(), stats.detach(), training, 1e-8))


@requires_cpp
def test_torch_compile_fullgraph():
    dice = make_dice(8, True, "cpu", dtype=torch.float32)
    dice.backend = "cpu"
    reference = copy.deepcopy(dice)
    x, mask = inputs((6, 5, 8), True, "cpu", dtype=torch.float32)
    x = torch.nan_to_num(x)
    y, grads = run(torch.compile(dice, fullgraph=True), x, mask)
    ref_y, ref_grads = run(reference, x, mask)
    torch.testing.assert_close(y, ref_y)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    torch.testing.assert_close(dice.running_var, reference.running_var)


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_bitwise_deterministic_across_thread_counts(dtype):
    """Fixed row blocks merged in order: the same bits with 1 and 2 threads (forward, backward, running stats).

    float64 too: the sums are accumulated in double, so rounding to float32 can hide a change of summation order.
    """
    x, mask = inputs((3000, 37), True, "cpu", dtype=dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            dice = make_dice(37, True, "cpu", dtype=dtype)
            dice.backend = "cpu"
            y, grads = run(dice, x, mask)
            results.append((y, grads, list(dice.buffers())))
    finally:
        torch.set_num_threads(threads)
    (y1, grads1, bufs1), (y2, grads2, bufs2) = results
    assert torch.equal(y1, y2)
    for a, b in zip(grads1, grads2):
        assert torch.equal(a, b)
    for a, b in zip(bufs1, bufs2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_few_valid_rows(backend, training):
    """3 valid rows of 1000, in different row blocks: the statistics skip the empty blocks."""
    name, device = backend
    ours = make_dice(11, True, device, training=training)
    oracle = copy.deepcopy(ours)
    ours.backend, oracle.backend = name, "reference"
    x, _ = inputs((1000, 11), False, device)
    mask = torch.zeros(1000, dtype=torch.bool, device=device)
    mask[[3, 517, 998]] = True
    y, grads = run(ours, x, mask)
    ref_y, ref_grads = run(oracle, x, mask)
    torch.testing.assert_close(y, ref_y, atol=1e-12, rtol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)
    for b, r in zip(ours.buffers(), oracle.buffers()):
        torch.testing.assert_close(b, r, atol=1e-12, rtol=1e-10)


def test_large_mean_float32(backend):
    """mean 1e3, std 1 in float32 against the float64 reference: no catastrophic cancellation in the variance."""
    name, device = backend
    ours = make_dice(29, True, device, dtype=torch.float32)
    oracle = copy.deepcopy(ours).double()
    ours.backend, oracle.backend = name, "reference"
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2000, 29, generator=g) + 1e3).to(device)
    mask = (torch.rand(2000, generator=g) < 0.8).to(device)
    y, grads = run(ours, x, mask)
    ref_y, ref_grads = run(oracle, x.double(), mask)

    def close(a, ref):
        torch.testing.assert_close(a.double(), ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())

    close(y, ref_y)
    for a, ref in zip(grads, ref_grads):
        close(a, ref)
    params = (ours.alpha, ours.running_mean, ours.running_var)
    _, mean, var = din_ext.ops.dice(x, *params, mask=mask, gamma=ours.weight, beta=ours.bias, backend=name)
    ref_x = x.double()[mask]
    torch.testing.assert_close(mean.double(), ref_x.mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), ref_x.var(0, unbiased=False), rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(backend, dtype):
    """|ours - ref_fp64| <= 2 |reference in dtype - ref_fp64| + atol (flash-attention's rule)."""
    name, device = backend
    ours = make_dice(24, True, device, dtype=dtype)
    same = copy.deepcopy(ours)
    exact = copy.deepcopy(ours).double()
    ours.backend, same.backend, exact.backend = name, "reference", "reference"
    x, mask = inputs((9, 13, 24), True, device, dtype=dtype)
    x = torch.nan_to_num(x)
    y, grads = run(ours, x, mask)
    same_y, same_grads = run(same, x, mask)
    ref_y, ref_grads = run(exact, x.double(), mask)
    for a, s, ref in zip((y, *grads), (same_y, *same_grads), (ref_y, *ref_grads)):
        err = (a.double() - ref).abs().max().item()
        bound = 2 * (s.double() - ref).abs().max().item() + 1e-3 * ref.abs().max().item()
        assert err <= bound, (err, bound)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_of_a_host_count_equal_those_of_a_device_count(momentum):
    """update_running_stats with an int count (Dice without a mask) gives the bits of a 0-d tensor count (with a
    mask), batches of fewer than two rows skipped by both."""
    host = din_ext.Dice(5, momentum=momentum)
    device = copy.deepcopy(host)
    g = torch.Generator().manual_seed(0)
    for rows in (7, 1, 12, 0, 3):
        mean, var = torch.randn(5, generator=g), torch.rand(5, generator=g)
        host.update_running_stats(mean, var, rows)
        device.update_running_stats(mean, var, torch.tensor(rows))
    assert host.num_batches_tracked.item() == 3
    assert all(torch.equal(a, b) for a, b in zip(host.buffers(), device.buffers()))
    assert not torch.equal(host.running_var, torch.ones(5))


@pytest.mark.parametrize("momenta", [(0.1, 0.1), (0.1, 0.3), (None, None)], ids=["one", "two", "cumulative"])
def test_attention_running_stats_of_all_layers_at_once(momenta):
    """LocalActivationUnit folds the op's batch statistics into every Dice layer's running ones at once (foreach ops)
    when the layers share a momentum and the count is a host int: the bits of each layer's update_running_stats,
    with a 0-d tensor count and with an int, and no update from fewer than two rows."""
    unit = din_ext.LocalActivationUnit(4, (6, 3)).train()
    for act, momentum in zip(unit.activations, momenta):
        act.momentum = momentum
    layers = copy.deepcopy(list(unit.activations))
    g = torch.Generator().manual_seed(0)
    for rows in (7, 1, 12, 0, 3):
        stats = torch.randn(2, 9, generator=g).abs()
        unit._update_running_stats(stats, rows)
        for act, mean, var in zip(layers, stats[0].split([6, 3]), stats[1].split([6, 3])):
            act.update_running_stats(mean, var, torch.tensor(rows))
    assert all(a.num_batches_tracked.item() == 3 for a in unit.activations)
    for act, ref in zip(unit.activations, layers):
        assert all(torch.equal(a, b) for a, b in zip(act.buffers(), ref.buffers()))


def test_pack_layers_is_the_stack_of_each_layers_rows():
    """ops.dice.pack_layers (one cat) gives each layer's rows (alpha, gamma, beta, running_mean, running_var; 1 and 0
    for a layer that is not affine) side by side, and alpha's gradient flows back through it."""
    from din_ext.ops.dice import pack_layers
    layers = [din_ext.Dice(3), din_ext.Dice(2, affine=True), din_ext.Dice(4)]
    g = torch.Generator().manual_seed(1)
    for layer in layers:
        for t in (layer.alpha, layer.running_mean, layer.running_var, layer.weight, layer.bias):
            if t is not None:
                t.data.copy_(torch.randn(t.shape, generator=g))
    def rows(d):
        gamma = d.weight if d.affine else torch.ones(d.num_features)
        beta = d.bias if d.affine else torch.zeros(d.num_features)
        return torch.stack([d.alpha, gamma, beta, d.running_mean, d.running_var])
    for group in (layers, layers[::2], layers[:1]):
        packed = pack_layers([(d.alpha, d.weight, d.bias, d.running_mean, d.running_var) for d in group])
        assert torch.equal(packed, torch.cat([rows(d) for d in group], dim=1))
    packed.sum().backward()
    assert torch.equal(layers[0].alpha.grad, torch.ones(3))
