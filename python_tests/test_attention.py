"""Conformance of every attention backend with din_ext.reference: output and every gradient."""

from __future__ import annotations

import copy
import itertools
import zlib

import pytest
import torch
import torch.utils._python_dispatch

import din_ext
from conftest import clean, make_batch, requires_cpp, run_unit

ACTIVATIONS = ["dice", "sigmoid", "prelu", "relu"]
CASES = [
    pytest.param(act, norm, layout, training, id=f"{act}-{norm}-{layout}-{'train' if training else 'eval'}")
    for act, norm, layout, training in itertools.product(ACTIVATIONS, ["none", "softmax"], ["padded", "jagged"],
                                                         [True, False])
]


def make_unit(activation, normalization, hidden=(80, 40), dim=24, score_scale=1.0, dtype=torch.float64,
              device="cpu", seed=0, training=True):
    torch.manual_seed(seed)
    unit = din_ext.LocalActivationUnit(dim, hidden, activation=activation, normalization=normalization,
                                       score_scale=score_scale)
    with torch.no_grad():  # non-trivial activation parameters and running statistics
        for act in unit.activations:
            if isinstance(act, din_ext.Dice):
                act.alpha.uniform_(-0.5, 0.5)
                act.running_mean.uniform_(-0.3, 0.3)
                act.running_var.uniform_(0.5, 2.0)
            elif isinstance(act, torch.nn.PReLU):
                act.weight.uniform_(-0.5, 0.5)
    return unit.to(dtype=dtype, device=device).train(training)


def assert_matches_reference(unit, batch, backend, atol=1e-10, rtol=1e-9):
    oracle = copy.deepcopy(unit)
    oracle.backend = "reference"
    unit.backend = backend
    ours = batch.fresh()
    out, grads = run_unit(unit, ours)
    ref_out, ref_grads = run_unit(oracle, clean(batch))
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    names = ["query", "keys", "values"][:len(ours.leaves())] + [n for n, p in unit.named_parameters()]
    for name, g, r in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, r, atol=atol, rtol=rtol, msg=lambda m: f"grad of {name}: {m}")
    for (name, ours_buf), (_, ref_buf) in zip(unit.named_buffers(), oracle.named_buffers()):
        torch.testing.assert_close(ours_buf, ref_buf, atol=atol, rtol=rtol, msg=lambda m: f"buffer {name}: {m}")
    return out


@pytest.mark.parametrize("activation, normalization, layout, training", CASES)
def test_matches_reference(backend, activation, normalization, layout, training):
    name, device = backend
    unit = make_unit(activation, normalization, device=device, training=training, score_scale=0.37)
    batch = make_batch(layout, device=device, seed=zlib.crc32(f"{activation}{normalization}{layout}".encode()))
    assert_matches_reference(unit, batch, name)


@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_separate_values(backend, layout, normalization):
    name, device = backend
    unit = make_unit("dice", normalization, device=device)
    batch = make_batch(layout, batch=6, max_len=31, value_dim=17, device=device, seed=3)
    out = assert_matches_reference(unit, batch, name)
    assert out.shape == (6, 17)


@pytest.mark.parametrize("hidden", [(), (7,), (33, 9, 5)], ids=["no-hidden", "one-hidden", "three-hidden"])
def test_hidden_depths(backend, hidden):
    name, device = backend
    unit = make_unit("prelu", "softmax", hidden=hidden, dim=10, device=device)
    assert_matches_reference(unit, make_batch("jagged", batch=4, max_len=9, dim=10, device=device), name)


@pytest.mark.parametrize("normalization", ["none", "softmax"])
@pytest.mark.parametrize("training", [True, False])
def test_all_rows_empty(backend, normalization, training):
    name, device = backend
    unit = make_unit("dice", normalization, device=device, training=training)
    before = [b.clone() for b in unit.buffers()]
    batch = make_batch("padded", batch=3, max_len=4, lengths=[0, 0, 0], device=device)
    out = assert_matches_reference(unit, batch, name)
    assert torch.equal(out, torch.zeros_like(out))
    for old, new in zip(before, unit.buffers()):  # no valid row: the running statistics stay as they were
        assert torch.equal(old, new)


@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_length_one(backend, layout):
    name, device = backend
    unit = make_unit("dice", "softmax", device=device)
    assert_matches_reference(unit, make_batch(layout, batch=9, max_len=1, device=device, seed=5), name)


def test_single_valid_row_in_training(backend):
    """One valid behaviour in the batch: variance 0, statistics of one row, no running-stat update."""
    name, device = backend
    unit = make_unit("dice", "none", device=device)
    assert_matches_reference(unit, make_batch("padded", batch=3, max_len=5, lengths=[0, 1, 0], device=device), name)


def test_int32_indices_and_odd_shapes(backend):
    name, device = backend
    unit = make_unit("sigmoid", "none", hidden=(13, 3), dim=5, device=device)
    for layout in ("padded", "jagged"):
        batch = make_batch(layout, batch=11, max_len=7, dim=5, device=device, index_dtype=torch.int32, seed=7)
        assert_matches_reference(unit, batch, name)


def test_float32(backend):
    name, device = backend
    unit = make_unit("dice", "softmax", dtype=torch.float32, device=device)
    batch = make_batch("jagged", dtype=torch.float32, device=device, seed=11)
    assert_matches_reference(unit, batch, name, atol=2e-4, rtol=2e-4)


def test_padded_equals_jagged(backend):
    name, device = backend
    unit = make_unit("dice", "softmax", device=device, training=False)
    unit.backend = name
    padded = make_batch("padded", device=device, seed=2, garbage=0.0)
    lengths = padded.index["lengths"]
    valid = torch.arange(padded.keys.shape[1], device=device)[None, :] < lengths[:, None]
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    out_padded = unit(padded.query, padded.keys, lengths=lengths)
    out_jagged = unit(padded.query, padded.keys[valid], offsets=offsets)
    torch.testing.assert_close(out_padded, out_jagged, atol=1e-12, rtol=1e-12)


def test_zero_length_gets_exact_zero_and_no_nan(backend):
    name, device = backend
    unit = make_unit("dice", "softmax", device=device)
    unit.backend = name
    batch = make_batch("padded", batch=4, max_len=6, lengths=[6, 0, 3, 0], device=device).fresh()
    out = unit(batch.query, batch.keys, **batch.index)
    out.sum().backward()
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[3], torch.zeros_like(out[3]))
    assert torch.isfinite(out).all() and torch.isfinite(batch.query.grad).all()
    assert torch.equal(batch.query.grad[1], torch.zeros_like(batch.query.grad[1]))
    pad = torch.arange(6, device=device)[None, :] >= batch.index["lengths"][:, None]
    assert torch.equal(batch.keys.grad[pad], torch.zeros_like(batch.keys.grad[pad]))  # padding never gets gradient


def test_deterministic(backend):
    name, device = backend
    results = []
    for _ in range(2):
        unit = make_unit("dice", "softmax", dtype=torch.float32, device=device)
        unit.backend = name
        batch = make_batch("jagged", dtype=torch.float32, device=device, seed=4).fresh()
        results.append(run_unit(unit, batch))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


@requires_cpp
def test_cpu_bitwise_reproducible_across_thread_counts():
    """Reductions go through a fixed partition of the users, so 1 and 2 threads give identical bits."""
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            unit = make_unit("dice", "softmax", dtype=torch.float32)
            unit.backend = "cpu"
            batch = make_batch("jagged", batch=150, max_len=70, dtype=torch.float32, seed=8).fresh()
            results.append(run_unit(unit, batch))
    finally:
        torch.set_num_threads(threads)
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


STORE_BUDGET_ENV = "DIN_EXT_ATTENTION_STORE_MB"  # the cpu autograd's budget for stored activations (0: recompute)
STORED_OP = "din_ext._local_activation_attention_stored.default"


class RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The names of the ops that run below autograd inside the block."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("layout, value_dim", [("padded", None), ("jagged", 17)], ids=["padded", "jagged-values"])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
@pytest.mark.parametrize("hidden", [(80, 40), (33, 9, 5)], ids=["80x40", "33x9x5"])
def test_cpu_stored_activations_equal_recompute(monkeypatch, hidden, normalization, layout, value_dim, dtype):
    """Training Dice on the cpu keeps the pre-activations when they fit the budget and recomputes them otherwise
    (histories past one 64-row tile, an empty row, storage past the end): both give bitwise the same output and
    statistics, the same gradients to rounding, and the stored mode matches the reference."""
    results = {}
    for mode, budget in (("stored", "256"), ("recompute", "0")):
        monkeypatch.setenv(STORE_BUDGET_ENV, budget)
        unit = make_unit("dice", normalization, hidden=hidden, dtype=dtype, score_scale=0.37)
        unit.backend = "cpu"
        batch = make_batch(layout, batch=7, max_len=70, value_dim=value_dim, dtype=dtype, seed=12)
        with RecordOps() as record:
            out, grads = run_unit(unit, batch.fresh())
        assert (STORED_OP in record.names) == (mode == "stored"), record.names
        results[mode] = (out, grads, list(unit.buffers()))
    (out, grads, buffers), (out_r, grads_r, buffers_r) = results["stored"], results["recompute"]
    assert torch.equal(out, out_r)  # the same products in the same order
    assert all(torch.equal(a, b) for a, b in zip(buffers, buffers_r))  # the Dice batch statistics
    for a, b in zip(grads, grads_r):  # vectorized in place on other alignments: equal to rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if dtype == torch.float64:
        monkeypatch.setenv(STORE_BUDGET_ENV, "256")
        unit = make_unit("dice", normalization, hidden=hidden, score_scale=0.37)
        assert_matches_reference(unit, make_batch(layout, batch=7, max_len=70, value_dim=value_dim, seed=12), "cpu")


@requires_cpp
def test_cpu_stored_activations_only_where_they_pay(monkeypatch):
    """The stored kernels run for training Dice with gradients; eval, other activations, no_grad and a budget the
    batch exceeds recompute."""
    monkeypatch.setenv(STORE_BUDGET_ENV, "1")  # 1 MiB: 300 rows x ~1 KB fit, 3000 do not
    for activation, training, rows, grad, stored in [("dice", True, 300, True, True), ("dice", False, 300, True, False),
                                                     ("sigmoid", True, 300, True, False),
                                                     ("dice", True, 300, False, False),
                                                     ("dice", True, 3000, True, False)]:
        unit = make_unit(activation, "none", dtype=torch.float32, training=training)
        unit.backend = "cpu"
        lengths = [rows // 4] * 4
        batch = make_batch("padded", batch=4, max_len=rows // 4, lengths=lengths, dtype=torch.float32)
        with RecordOps() as record, torch.set_grad_enabled(grad):
            unit(batch.fresh().query, batch.keys, lengths=batch.index["lengths"])
        assert (STORED_OP in record.names) == stored, (activation, training, rows, grad)


@requires_cpp
@pytest.mark.parametrize("with_values", [True, False])
def test_opcheck_stored(with_values):
    unit = make_unit("dice", "softmax", hidden=(6, 4), dim=5)
    batch = make_batch("jagged", batch=4, max_len=5, dim=5, value_dim=3 if with_values else None, garbage=0.0)
    offsets = batch.index["offsets"]
    total = int(offsets[-1])  # no key row outside the users' ranges: saved has no unspecified rows to compare
    keys, values = batch.keys[:total], None if batch.values is None else batch.values[:total]
    weights = [lin.weight.detach().clone() for lin in [*unit.linears, unit.out]]
    biases = [lin.bias.detach().clone() for lin in [*unit.linears, unit.out]]
    args = (batch.query, keys, values, offsets[:-1], offsets.diff(), 5, weights, biases,
            unit.act_params().detach(), "dice", "softmax", 0.5, True, 1e-8)
    ops = torch.ops.din_ext
    torch.library.opcheck(ops._local_activation_attention_stored.default, args)
    out, stats, saved = ops._local_activation_attention_stored(*args)
    grad_args = (torch.randn_like(out), *args[:9], stats, saved, *args[9:])
    torch.library.opcheck(ops._local_activation_attention_stored_backward.default, grad_args)


@requires_cpp
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_cpu_stored_layout_by_pair(normalization):
    """The stored kernels keep z_j by valid pair, not by key row: the same histories as padded keys (rows of
    padding between users, a user past one 64-row tile, an empty one) and as jagged keys store the same first
    valid x width values, and, their row tiles depending on the lengths alone, give bitwise the same output,
    statistics and gradients (the key gradients at each layout's rows)."""
    unit = make_unit("dice", normalization, hidden=(33, 9, 5), dim=7, dtype=torch.float32)
    torch.manual_seed(3)
    lengths = torch.tensor([5, 0, 70, 1, 30, 64, 9])
    B, L, D = len(lengths), 80, 7
    padded = torch.randn(B * L, D)
    query = torch.randn(B, D)
    starts = {"padded": torch.arange(B) * L, "jagged": torch.cat([torch.zeros(1, dtype=torch.long),
                                                                   lengths.cumsum(0)[:-1]])}
    rows = torch.cat([torch.arange(int(n)) + b * L for b, n in enumerate(lengths)])
    keys = {"padded": padded, "jagged": padded[rows].clone()}
    weights = [lin.weight.detach() for lin in [*unit.linears, unit.out]]
    biases = [lin.bias.detach() for lin in [*unit.linears, unit.out]]
    config = (unit.act_params().detach(), "dice", normalization, 0.37, True, 1e-8)
    ops, results = torch.ops.din_ext, {}
    for layout in ("padded", "jagged"):
        args = (query, keys[layout], None, starts[layout], lengths, L, weights, biases)
        out, stats, saved = ops._local_activation_attention_stored(*args, *config)
        grad_out = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        grads = ops._local_activation_attention_stored_backward(grad_out, *args, config[0], stats, saved, *config[1:])
        grad_keys = grads[1] if layout == "jagged" else grads[1][rows]
        results[layout] = (out, stats, saved, grads[0], grad_keys, *grads[3], *grads[4], grads[5])
    valid = results["jagged"][2].numel()  # jagged keys: no row outside the users' ranges
    assert results["padded"][2].numel() == valid // len(rows) * B * L  # N x width, the tail past valid unused
    assert torch.equal(results["padded"][2][:valid], results["jagged"][2])
    for name, a, b in zip(["out", "stats", "saved", "query", "keys"], results["padded"], results["jagged"]):
        if name != "saved":
            assert torch.equal(a, b), name
    for a, b in zip(results["padded"][5:], results["jagged"][5:]):
        assert torch.equal(a, b)


def test_running_stats_match_batchnorm(backend):
    """The Dice running statistics follow nn.BatchNorm1d run on the valid behaviours' pre-activations."""
    name, device = backend
    unit = make_unit("dice", "none", hidden=(6,), dim=4, device=device)
    unit.backend = name
    batch = make_batch("padded", batch=5, max_len=8, dim=4, device=device, garbage=0.0, seed=9)
    bn = torch.nn.BatchNorm1d(6, eps=1e-8, affine=False).double().to(device)
    bn.running_mean.copy_(unit.activations[0].running_mean)
    bn.running_var.copy_(unit.activations[0].running_var)
    unit(batch.query, batch.keys, **batch.index)
    valid = torch.arange(8, device=device)[None, :] < batch.index["lengths"][:, None]
    q = batch.query[:, None, :].expand_as(batch.keys)
    x = torch.cat([q, batch.keys, q - batch.keys, q * batch.keys], -1)[valid]
    bn(unit.linears[0](x))
    torch.testing.assert_close(unit.activations[0].running_mean, bn.running_mean)
    torch.testing.assert_close(unit.activations[0].running_var, bn.running_var)


@requires_cpp
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_cpu(activation, training):
    """float64 finite differences through the op, every differentiable input (running statistics included)."""
    torch.manual_seed(0)
    assert gradcheck_attention(activation, training, "cpu", "cpu")


def gradcheck_attention(activation, training, backend, device, hidden=(5, 4), fast_mode=False):
    """float64 gradcheck of the attention op on ``backend``: softmax in training mode, no normalization in eval, a
    tiny jagged batch with separate values, gradients of every input (activation parameters and running stats too)."""
    unit = make_unit(activation, "softmax" if training else "none", hidden=hidden, dim=3, training=training,
                     device=device)
    batch = make_batch("jagged", batch=3, max_len=4, dim=3, value_dim=2, garbage=0.0, seed=1, device=device)
    weights = [p.detach() for p in [*[l.weight for l in unit.linears], unit.out.weight]]
    biases = [p.detach() for p in [*[l.bias for l in unit.linears], unit.out.bias]]
    params = unit.act_params()
    inputs = [batch.query, batch.keys, batch.values, *weights, *biases] + ([params] if params is not None else [])
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    n = len(weights)

    def fn(query, keys, values, *rest):
        act = rest[2 * n] if params is not None else None
        out, _ = din_ext.ops.local_activation_attention(
            query, keys, list(rest[:n]), list(rest[n:2 * n]), act, values=values, activation=activation,
            normalization=unit.normalization, training=training, backend=backend, **batch.index)
        return out

    return torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, fast_mode=fast_mode)


@requires_cpp
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("with_values", [True, False])
def test_opcheck(training, with_values):
    unit = make_unit("dice", "softmax", hidden=(6, 4), dim=5, training=training)
    batch = make_batch("jagged", batch=4, max_len=5, dim=5, value_dim=3 if with_values else None, garbage=0.0)
    offsets = batch.index["offsets"]
    weights = [p.detach().clone().requires_grad_() for p in [*[l.weight for l in unit.linears], unit.out.weight]]
    biases = [p.detach().clone().requires_grad_() for p in [*[l.bias for l in unit.linears], unit.out.bias]]
    params = unit.act_params().detach().clone().requires_grad_()
    args = (batch.query.requires_grad_(), batch.keys.requires_grad_(),
            None if batch.values is None else batch.values.requires_grad_(), offsets[:-1], offsets.diff(), 5,
            weights, biases, params, "dice", "softmax", 0.5, training, 1e-8)
    opcheck_compiled_op(args)


def opcheck_compiled_op(args):
    """torch.library.opcheck of din_ext::local_activation_attention on ``args`` and of its backward on the forward's
    outputs; returns the forward's out."""
    torch.library.opcheck(torch.ops.din_ext.local_activation_attention.default, args)
    out, stats = torch.ops.din_ext.local_activation_attention(*args)
    grad_args = (torch.randn_like(out), *[a.detach() if isinstance(a, torch.Tensor) else a for a in args[:9]],
                 stats.detach(), *args[9:])
    grad_args = tuple([t.detach() for t in a] if isinstance(a, list) else a for a in grad_args)
    torch.library.opcheck(torch.ops.din_ext.local_activation_attention_backward.default, grad_args)
    return out


@requires_cpp
def test_torch_compile_fullgraph():
    unit = make_unit("dice", "softmax", hidden=(16, 8), dim=8, dtype=torch.float32)
    unit.backend = "cpu"
    reference = copy.deepcopy(unit)
    compiled = torch.compile(unit, fullgraph=True)
    for seed in range(2):  # the second call reuses the graph with new data
        batch = make_batch("jagged", batch=6, max_len=9, dim=8, dtype=torch.float32, garbage=0.0, seed=seed)
        ours = batch.fresh()
        out, grads = run_unit(compiled, ours)
        ref_out, ref_grads = run_unit(reference, batch.fresh())
        torch.testing.assert_close(out, ref_out)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r)
    torch.testing.assert_close(unit.activations[0].running_mean, reference.activations[0].running_mean)


@requires_cpp
def test_torch_export():
    unit = make_unit("dice", "none", hidden=(16, 8), dim=8, dtype=torch.float32, training=False)
    unit.backend = "cpu"
    batch = make_batch("padded", batch=6, max_len=9, dim=8, dtype=torch.float32, garbage=0.0)
    args = (batch.query, batch.keys, batch.index["lengths"])
    exported = torch.export.export(unit, args)
    assert any("din_ext.local_activation_attention" in str(node.target) for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(*args), unit(*args))
