"""The triton attention kernels with a multi-candidate query [B, C, D] (C candidates against each user's one history),
through the launchers ``din_ext.kernels.attention.forward/backward`` themselves.

Oracles built from the single-candidate path: eval, or an activation without batch statistics, gives out[:, c] equal
to the forward with query[:, c]; training Dice's statistics are over all (candidate, behaviour) pairs, which the
single-candidate reference computes on the history tiled C times (query.reshape(B * C, D) with every row's keys
repeated per candidate); the backward (grad_keys summed over the candidates) is checked against that reference's
autograd. On the CPU these run under TRITON_INTERPRET=1 (CI: ``pytest -k triton``).
"""

from __future__ import annotations

import pytest
import torch

from conftest import TRITON_DEVICE, requires_triton
from din_ext import reference
from din_ext.contract import ACT_PARAM_ROWS

DEVICE = TRITON_DEVICE
pytestmark = requires_triton
GARBAGE = float("nan")  # storage past the last row: never read


def kernels():
    from din_ext.kernels import attention

    return attention


def make_case(lengths, candidates, activation="dice", normalization="softmax", hidden=(6, 4), dim=5, value_dim=None,
              dtype=torch.float64, seed=0, past=3):
    """Jagged inputs (starts/lengths, ``past`` garbage rows after the last one), a query [B, C, D], the MLP and
    packed activation parameters."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths, dtype=torch.long)
    starts = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])
    rows = int(lengths.sum())
    keys = torch.randn(rows + past, dim, generator=g, dtype=dtype)
    keys[rows:] = GARBAGE
    values = None
    if value_dim is not None:
        values = torch.randn(rows + past, value_dim, generator=g, dtype=dtype)
        values[rows:] = GARBAGE
    query = torch.randn(len(lengths), candidates, dim, generator=g, dtype=dtype)
    weights, biases, fan_in = [], [], 4 * dim
    for width in [*hidden, 1]:
        weights.append(torch.randn(width, fan_in, generator=g, dtype=dtype) / fan_in ** 0.5)
        biases.append(torch.randn(width, generator=g, dtype=dtype) * 0.1)
        fan_in = width
    act_params = torch.rand(ACT_PARAM_ROWS[activation], sum(hidden), generator=g, dtype=dtype) + 0.5
    to = lambda t: None if t is None else t.to(DEVICE)
    return dict(query=to(query), keys=to(keys), values=to(values), starts=to(starts), lengths=to(lengths),
                max_len=int(lengths.max()), weights=[to(w) for w in weights], biases=[to(b) for b in biases],
                act_params=to(act_params), activation=activation, normalization=normalization, score_scale=0.7,
                eps=1e-5)


def run(case, training, query=None, grad_out=None):
    """The triton forward and backward of ``case`` (query overridden by ``query``): (out, stats, lse, grads)."""
    A = kernels()
    query = case["query"] if query is None else query
    common = (case["keys"], case["values"], case["starts"], case["lengths"], case["max_len"], case["weights"],
              case["biases"], case["act_params"])
    config = (case["activation"], case["normalization"], case["score_scale"], training, case["eps"])
    out, stats, lse = A.forward(query, *common, *config)
    grads = None
    if grad_out is not None:
        grads = A.backward(grad_out, query, *common, out, stats, lse, *config)
    return out, stats, lse, grads


def tiled_reference(case, training, grad_out):
    """The reference on the history tiled C times: (out [B, C, Dv], stats, gradients as the launcher returns them)."""
    query, keys, values = case["query"], case["keys"], case["values"]
    batch, candidates, dim = query.shape
    lengths = case["lengths"].repeat_interleave(candidates)
    starts = case["starts"].repeat_interleave(candidates)
    index = torch.cat([torch.arange(s, s + n) for s, n in zip(starts.tolist(), lengths.tolist())]
                      + [torch.zeros(0, dtype=torch.long)]).to(keys.device)
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    leaf = lambda t: None if t is None else t.detach().clone().requires_grad_()
    query, keys, values = leaf(query), leaf(keys), leaf(values)
    weights, biases = [leaf(w) for w in case["weights"]], [leaf(b) for b in case["biases"]]
    act_params = leaf(case["act_params"])
    out, stats = reference.local_activation_attention(
        query.reshape(batch * candidates, dim), keys[index], weights, biases, act_params, offsets=offsets,
        values=None if values is None else values[index], max_len=case["max_len"], activation=case["activation"],
        normalization=case["normalization"], score_scale=case["score_scale"], training=training, eps=case["eps"])
    out = out.reshape(batch, candidates, -1)
    inputs = [query, keys] + ([] if values is None else [values]) + weights + biases + [act_params]
    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
    layers = len(weights)
    grad_values = grads[2] if values is not None else None
    rest = grads[3 if values is not None else 2:]
    return out.detach(), stats.detach(), (grads[0], grads[1], grad_values, rest[:layers], rest[layers:2 * layers],
                                          rest[-1])


def assert_grads_close(grads, expected, atol, rtol):
    grad_query, grad_keys, grad_values, grad_weights, grad_biases, grad_act = grads
    ref_query, ref_keys, ref_values, ref_weights, ref_biases, ref_act = expected
    rows = grad_keys.shape[0]
    torch.testing.assert_close(grad_query, ref_query, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad_keys, torch.nan_to_num(ref_keys), atol=atol, rtol=rtol)
    if ref_values is not None:
        torch.testing.assert_close(grad_values, torch.nan_to_num(ref_values), atol=atol, rtol=rtol)
    assert grad_keys.shape[0] == rows
    for ours, ref in zip([*grad_weights, *grad_biases, grad_act], [*ref_weights, *ref_biases, ref_act]):
        torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol)


TOL = {torch.float64: {"atol": 1e-10, "rtol": 1e-9}, torch.float32: {"atol": 2e-5, "rtol": 2e-4}}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("activation, normalization, training, value_dim", [
    ("dice", "softmax", True, None), ("dice", "none", True, 3), ("dice", "softmax", False, 3),
    ("dice", "none", False, None), ("prelu", "softmax", True, None), ("sigmoid", "none", True, 3),
    ("relu", "softmax", False, None)])
def test_triton_multi_matches_tiled_reference(dtype, activation, normalization, training, value_dim):
    """Forward, statistics and every gradient against the reference on the tiled history; odd C, an empty row,
    L = 1, several tiles, storage past the last row (NaN)."""
    case = make_case([3, 0, 1, 19], 7, activation, normalization, value_dim=value_dim, dtype=dtype, seed=1)
    grad_out = torch.randn(4, 7, value_dim or 5, dtype=dtype, device=DEVICE)
    out, stats, lse, grads = run(case, training, grad_out=grad_out)
    ref_out, ref_stats, ref_grads = tiled_reference(case, training, grad_out)
    assert out.shape == (4, 7, value_dim or 5) and lse.shape == (4, 7) and grads[0].shape == (4, 7, 5)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(stats, ref_stats, **TOL[dtype])
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # the empty row: exactly 0 for every candidate
    assert torch.equal(grads[0][1], torch.zeros_like(grads[0][1]))
    rows = int(case["lengths"].sum())
    assert torch.equal(grads[1][rows:], torch.zeros_like(grads[1][rows:]))  # storage past the last row
    assert_grads_close(grads, ref_grads, **TOL[dtype])


@pytest.mark.parametrize("hidden", [(), (5,), (7, 3, 4, 5)], ids=["0", "1", "4"])
def test_triton_multi_hidden_layers(hidden):
    case = make_case([2, 9, 0, 1, 4], 3, "dice", "softmax", hidden=hidden, seed=2)
    grad_out = torch.randn(5, 3, 5, dtype=torch.float64, device=DEVICE)
    out, stats, _, grads = run(case, True, grad_out=grad_out)
    ref_out, ref_stats, ref_grads = tiled_reference(case, True, grad_out)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float64])
    torch.testing.assert_close(stats, ref_stats, **TOL[torch.float64])
    assert_grads_close(grads, ref_grads, **TOL[torch.float64])


@pytest.mark.parametrize("activation, normalization, training", [
    ("dice", "softmax", False), ("dice", "none", False), ("prelu", "softmax", True), ("sigmoid", "none", True),
    ("relu", "softmax", True)])
def test_triton_multi_forward_equals_candidate_loop(activation, normalization, training):
    """Without batch statistics, candidate c's output and log-sum-exp are the single-candidate forward's with
    query[:, c]."""
    case = make_case([5, 1, 0, 12, 3, 2], 6, activation, normalization, value_dim=4, seed=3)
    out, stats, lse, _ = run(case, training)
    for c in range(case["query"].shape[1]):
        single_out, single_stats, single_lse, _ = run(case, training, query=case["query"][:, c])
        torch.testing.assert_close(out[:, c], single_out, **TOL[torch.float64])
        torch.testing.assert_close(lse[:, c], single_lse, **TOL[torch.float64])
        torch.testing.assert_close(stats, single_stats)


@pytest.mark.parametrize("candidates", [1, 2, 5])
def test_triton_multi_all_rows_empty(candidates):
    case = make_case([0, 0, 0], candidates, "dice", "softmax", seed=4)
    grad_out = torch.randn(3, candidates, 5, dtype=torch.float64, device=DEVICE)
    out, stats, lse, grads = run(case, True, grad_out=grad_out)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(lse, torch.zeros_like(lse))
    assert torch.equal(stats, torch.zeros_like(stats))
    assert torch.equal(grads[0], torch.zeros_like(grads[0])) and torch.equal(grads[1], torch.zeros_like(grads[1]))


@pytest.mark.parametrize("training", [True, False])
def test_triton_multi_one_candidate_is_the_2d_path(training):
    """query [B, 1, D] gives bitwise the results of query [B, D]."""
    case = make_case([4, 0, 1, 9], 1, "dice", "softmax", value_dim=3, seed=5)
    grad_out = torch.randn(4, 1, 3, dtype=torch.float64, device=DEVICE)
    out, stats, lse, grads = run(case, training, grad_out=grad_out)
    flat_out, flat_stats, flat_lse, flat_grads = run(case, training, query=case["query"][:, 0],
                                                     grad_out=grad_out[:, 0])
    assert out.shape == (4, 1, 3) and lse.shape == (4, 1) and grads[0].shape == (4, 1, 5)
    assert torch.equal(out[:, 0], flat_out) and torch.equal(stats, flat_stats) and torch.equal(lse[:, 0], flat_lse)
    assert torch.equal(grads[0][:, 0], flat_grads[0])
    for ours, flat in zip(grads[1:3], flat_grads[1:3]):
        assert torch.equal(ours, flat)
    for ours, flat in zip([*grads[3], *grads[4], grads[5]], [*flat_grads[3], *flat_grads[4], flat_grads[5]]):
        assert torch.equal(ours, flat)


@pytest.mark.parametrize("programs", [2, 1])
def test_triton_multi_several_users_per_backward_program(monkeypatch, programs):
    """Each backward program owns several users, one of them long (many tiles), some empty."""
    monkeypatch.setattr(kernels(), "NUM_BLOCKS", programs)
    case = make_case([9, 0, 30, 1, 0, 4], 5, "dice", "softmax", value_dim=3, seed=6)
    grad_out = torch.randn(6, 5, 3, dtype=torch.float64, device=DEVICE)
    _, _, _, grads = run(case, True, grad_out=grad_out)
    _, _, ref_grads = tiled_reference(case, True, grad_out)
    assert_grads_close(grads, ref_grads, **TOL[torch.float64])


def _flat(grads):
    """The launcher's gradients (tensors and lists of tensors) as one list of tensors."""
    return [t for g in grads for t in (g if isinstance(g, (list, tuple)) else [g])]


def test_triton_multi_is_deterministic():
    case = make_case([7, 0, 3, 18], 7, "dice", "softmax", dtype=torch.float32, seed=7)
    grad_out = torch.randn(4, 7, 5, dtype=torch.float32, device=DEVICE)
    first = run(case, True, grad_out=grad_out)
    second = run(case, True, grad_out=grad_out)
    for a, b in zip([*first[:3], *_flat(first[3])], [*second[:3], *_flat(second[3])]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("candidates", [0, 3, 6])  # 0: a [B, D] query
@pytest.mark.parametrize("training", [True, False])
def test_triton_split_backward_equals_fused(monkeypatch, candidates, training):
    """The gradient pass as two kernels (input gradients, then parameter gradients; the default) gives bitwise the
    fused kernel's results (DIN_EXT_TRITON_SPLIT_BACKWARD=0): the same products in the same order."""
    case = make_case([4, 0, 9, 1, 6], max(candidates, 1), value_dim=3, seed=7)
    if candidates == 0:
        case["query"] = case["query"][:, 0]
    out, _, _, _ = run(case, training)
    grad_out = torch.randn_like(out)
    results = {}
    for split in ("0", "1"):
        monkeypatch.setenv("DIN_EXT_TRITON_SPLIT_BACKWARD", split)
        results[split] = _flat(run(case, training, grad_out=grad_out)[3])
    assert kernels().split_backward()
    assert len(results["0"]) == len(results["1"]) >= 6
    for fused, split in zip(results["0"], results["1"]):
        assert torch.equal(fused, split)
        assert torch.isfinite(split).all()
