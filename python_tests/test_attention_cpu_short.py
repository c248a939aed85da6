"""The cpu attention kernels at short histories, where the per-user layer-1 loops (each user's effective weight
Weff_b = Kc + diag(q_b) Pc and the fold of its gradient into d(Wk - Wd), dWp, d(Wq + Wd), db_0 and d/dq) cost as much
as the user's products and run vectorized: widths that leave every vector tail (D and H1 not multiples of 8 or 16),
many users of a few behaviours each (empty ones and ones that straddle the 64-row tile), both dtypes, against
din_ext.reference in float64; bitwise reproducibility run to run and across thread counts; a float64 gradcheck."""

from __future__ import annotations

import pytest
import torch
from conftest import Batch, clean, make_batch, requires_cpp, run_unit
from test_attention import assert_matches_reference, gradcheck_attention, make_unit

pytestmark = requires_cpp

# Mostly short histories with empty rows, L = 1, and lengths on both sides of the 64-row tile.
SHORT_LENGTHS = [3, 0, 1, 12, 0, 7, 63, 64, 65, 2, 1, 0, 9, 129, 5, 4, 11, 1]


@pytest.mark.parametrize("activation", ["dice", "sigmoid", "prelu", "relu"])
@pytest.mark.parametrize("dim, hidden", [(1, (1,)), (7, (9, 3)), (17, (19, 5)), (33, (80, 40)), (64, (17,))],
                         ids=["D1-H1", "D7-H9x3", "D17-H19x5", "D33-H80x40", "D64-H17"])
@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_short_histories_match_reference(activation, dim, hidden, layout):
    unit = make_unit(activation, "softmax", hidden=hidden, dim=dim, score_scale=0.61)
    batch = make_batch(layout, batch=len(SHORT_LENGTHS), max_len=max(SHORT_LENGTHS), dim=dim,
                       lengths=SHORT_LENGTHS, seed=dim)
    assert_matches_reference(unit, batch, "cpu")


def _project(unit, batch, weight):
    """Output and the gradients of (out * weight).sum() w.r.t. the batch's leaves and the unit's parameters."""
    out = unit(batch.query, batch.keys, values=batch.values, **batch.index)
    inputs = [*batch.leaves(), *(p for p in unit.parameters() if p.requires_grad)]
    return out, torch.autograd.grad((out * weight.to(out.dtype)).sum(), inputs)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_short_histories_float32_match_float64_reference(training, normalization):
    """float32 (16-lane vectors on AVX-512) against the float64 oracle with the same parameters and inputs."""
    unit = make_unit("dice", normalization, hidden=(80, 40), dim=36, training=training)
    oracle = make_unit("dice", normalization, hidden=(80, 40), dim=36, training=training)
    oracle.backend = "reference"
    ours = unit.to(torch.float32)
    ours.backend = "cpu"
    batch = make_batch("jagged", batch=200, max_len=20, dim=36, seed=21)
    f32 = Batch(*(None if t is None else t.float() for t in (batch.query, batch.keys, batch.values)),
                dict(batch.index)).fresh()
    weight = torch.randn(200, 36, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out, grads = _project(ours, f32, weight)
    ref_out, ref_grads = _project(oracle, clean(batch), weight)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-4, rtol=2e-4)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=5e-4, rtol=5e-4)


def _short_run(threads, activation):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        unit = make_unit(activation, "softmax", hidden=(80, 40), dim=19, dtype=torch.float32)
        unit.backend = "cpu"
        batch = make_batch("padded", batch=300, max_len=20, dim=19, dtype=torch.float32, seed=13).fresh()
        return run_unit(unit, batch)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("activation", ["dice", "sigmoid"])
def test_short_histories_bitwise_across_runs_and_thread_counts(activation):
    (out_a, grads_a), (out_b, grads_b), (out_c, grads_c) = (_short_run(t, activation) for t in (1, 1, 2))
    for out, grads in ((out_b, grads_b), (out_c, grads_c)):
        assert torch.equal(out_a, out)
        assert len(grads) == len(grads_a)
        assert all(torch.equal(a, b) for a, b in zip(grads_a, grads))


@pytest.mark.parametrize("activation", ["dice", "sigmoid"])
def test_gradcheck_odd_widths(activation):
    """float64 gradcheck with widths that leave vector tails in the per-user loops (D = 3, H = 9 x 3)."""
    assert gradcheck_attention(activation, True, "cpu", "cpu", hidden=(9, 3))


# The cpu kernels' layer 1 of a [B, D] query: split (z_0 = c_b + [k, k * q_b] [Kc; Pc]^T) below this mean history
# length, per-user effective weight above it (unset, the default: never split); "0" never splits, "1e9" always does.
SPLIT_ENV = "DIN_EXT_ATTENTION_SPLIT_BELOW"
FORMS = [pytest.param("0", id="weff"), pytest.param("1e9", id="split")]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("activation", ["dice", "sigmoid"])
@pytest.mark.parametrize("dim, hidden, layout", [(1, (1,), "padded"), (17, (19, 5), "jagged"),
                                                 (64, (80, 40), "padded")], ids=["D1", "D17", "D64"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_both_layer1_forms_match_reference(monkeypatch, form, activation, dim, hidden, layout, training):
    """Each form, forced at every history length (long rows too), against the oracle: output, every gradient and
    the running statistics; Dice training runs the stored kernels here (the batch fits their budget)."""
    monkeypatch.setenv(SPLIT_ENV, form)
    unit = make_unit(activation, "softmax", hidden=hidden, dim=dim, training=training, score_scale=0.8)
    batch = make_batch(layout, batch=len(SHORT_LENGTHS), max_len=max(SHORT_LENGTHS), dim=dim,
                       lengths=SHORT_LENGTHS, value_dim=5, seed=dim + 1)
    assert_matches_reference(unit, batch, "cpu")


@pytest.mark.parametrize("form", FORMS)
def test_both_layer1_forms_recompute_match_reference(monkeypatch, form):
    """Training Dice on the recomputing kernels (no stored activations) with each form."""
    monkeypatch.setenv(SPLIT_ENV, form)
    monkeypatch.setenv("DIN_EXT_ATTENTION_STORE_MB", "0")
    unit = make_unit("dice", "none", hidden=(21, 6), dim=9)
    batch = make_batch("jagged", batch=len(SHORT_LENGTHS), max_len=max(SHORT_LENGTHS), dim=9,
                       lengths=SHORT_LENGTHS, seed=4)
    assert_matches_reference(unit, batch, "cpu")


@pytest.mark.parametrize("form", FORMS)
def test_both_layer1_forms_bitwise_across_runs_and_thread_counts(monkeypatch, form):
    monkeypatch.setenv(SPLIT_ENV, form)
    (out_a, grads_a), (out_b, grads_b), (out_c, grads_c) = (_short_run(t, "dice") for t in (1, 1, 2))
    for out, grads in ((out_b, grads_b), (out_c, grads_c)):
        assert torch.equal(out_a, out)
        assert all(torch.equal(a, b) for a, b in zip(grads_a, grads))


def _eval_and_train_outputs(lengths):
    """Eval and training outputs (float32, Dice) of a batch of the given lengths."""
    unit = make_unit("dice", "none", hidden=(80, 40), dim=36, dtype=torch.float32)
    unit.backend = "cpu"
    batch = make_batch("padded", batch=len(lengths), max_len=max(lengths), dim=36, dtype=torch.float32,
                       lengths=lengths, seed=6)
    with torch.no_grad():
        return [unit.train(training)(batch.query, batch.keys, **batch.index) for training in (False, True)]


def test_default_keeps_the_per_user_form(monkeypatch):
    """Unset, even a mean of 2 behaviours per user runs the per-user form (the bits of "0", not of "1e9")."""
    monkeypatch.delenv(SPLIT_ENV, raising=False)
    default = _eval_and_train_outputs([2] * 64)
    forced = {}
    for env in ("0", "1e9"):
        monkeypatch.setenv(SPLIT_ENV, env)
        forced[env] = _eval_and_train_outputs([2] * 64)
    assert all(torch.equal(a, b) for a, b in zip(default, forced["0"]))
    assert not any(torch.equal(a, b) for a, b in zip(default, forced["1e9"]))


def test_layer1_form_follows_the_threshold(monkeypatch):
    """The threshold is compared with the call's mean history length: at a mean of ~10 a threshold of 11 splits and
    one of 10 does not (float32 rounding tells the forms apart), and both forms agree to rounding."""
    outs = {}
    for below in ("0", "10", "11", "1e9"):
        monkeypatch.setenv(SPLIT_ENV, below)
        unit = make_unit("sigmoid", "none", hidden=(80, 40), dim=36, dtype=torch.float32, training=False)
        unit.backend = "cpu"
        batch = make_batch("padded", batch=64, max_len=20, dim=36, dtype=torch.float32, lengths=[10] * 64, seed=3)
        with torch.no_grad():
            outs[below] = unit(batch.query, batch.keys, **batch.index)
    assert torch.equal(outs["0"], outs["10"]) and torch.equal(outs["11"], outs["1e9"])
    assert not torch.equal(outs["0"], outs["1e9"])
    torch.testing.assert_close(outs["0"], outs["1e9"], atol=1e-5, rtol=1e-5)
