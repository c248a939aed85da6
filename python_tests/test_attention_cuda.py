"""cuda-backend specifics the conformance suite (test_attention.py, test_dice.py, parametrized over backends) does
not reach: histories spanning several chunks and many accumulating blocks, bitwise determinism, float64 gradcheck
and opcheck on the GPU, half/bfloat16 against the float64 reference, and device errors. Skipped without a GPU or
without the compiled cuda kernels; the index math of these paths is tested on the CPU in test_attention_cuda_plan.py."""

from __future__ import annotations

import copy

import pytest
import torch

import din_ext
from conftest import make_batch, run_unit
from test_attention import assert_matches_reference, gradcheck_attention, make_unit

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and din_ext._backend.has_cuda_kernel("local_activation_attention")),
    reason="needs a GPU and din_ext built with its CUDA kernels")


@pytest.mark.parametrize("normalization", ["none", "softmax"])
@pytest.mark.parametrize("training", [True, False])
def test_long_histories_span_chunks(normalization, training):
    """Rows of 1, 255, 256, 257, 700 and 1500 behaviours: several 256-row chunks per user, combined in order."""
    unit = make_unit("dice", normalization, hidden=(16, 8), dim=12, device="cuda", training=training,
                     score_scale=0.05)
    batch = make_batch("jagged", batch=7, max_len=1500, dim=12, device="cuda", seed=21,
                       lengths=[1500, 0, 255, 256, 257, 700, 1])
    assert_matches_reference(unit, batch, "cuda", atol=1e-9, rtol=1e-8)


def test_more_items_than_blocks():
    """600 users x 2 chunks = 1200 work items > 512 accumulating blocks: blocks take several items."""
    unit = make_unit("prelu", "softmax", hidden=(9,), dim=6, device="cuda")
    lengths = [(37 * b) % 400 for b in range(600)]
    batch = make_batch("padded", batch=600, max_len=400, dim=6, device="cuda", seed=3, lengths=lengths)
    assert_matches_reference(unit, batch, "cuda")


@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_bitwise_deterministic_long_rows(normalization):
    results = []
    for _ in range(3):
        unit = make_unit("dice", normalization, dtype=torch.float32, device="cuda")
        unit.backend = "cuda"
        batch = make_batch("jagged", batch=40, max_len=900, dtype=torch.float32, device="cuda", seed=4).fresh()
        results.append(run_unit(unit, batch))
    (out_a, grads_a) = results[0]
    for out_b, grads_b in results[1:]:
        assert torch.equal(out_a, out_b)
        assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_low_precision(dtype, normalization):
    """|cuda - ref_fp64| <= 2 |reference in dtype - ref_fp64| + atol, output and every gradient."""
    unit = make_unit("dice", normalization, dtype=dtype, device="cuda", training=True, score_scale=0.2)
    same = copy.deepcopy(unit)
    exact = copy.deepcopy(unit).double()
    unit.backend, same.backend, exact.backend = "cuda", "reference", "reference"
    batch = make_batch("padded", batch=6, max_len=77, dtype=dtype, device="cuda", seed=9, garbage=0.0)
    wide = make_batch("padded", batch=6, max_len=77, dtype=torch.float64, device="cuda", seed=9, garbage=0.0)
    wide.query, wide.keys = batch.query.double(), batch.keys.double()
    out, grads = run_unit(unit, batch.fresh())
    same_out, same_grads = run_unit(same, batch.fresh())
    ref_out, ref_grads = run_unit(exact, wide.fresh())
    for a, s, ref in zip((out, *grads), (same_out, *same_grads), (ref_out, *ref_grads)):
        err = (a.double() - ref).abs().max().item()
        bound = 2 * (s.double() - ref).abs().max().item() + 1e-3 * ref.abs().max().item()
        assert err <= bound, (err, bound)


# Rounding of one tensor-core operand: bf16 keeps 8 mantissa bits, fp16 and TF32 11.
TENSOR_CORE_UNIT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -11}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("training", [True, False])
def test_tensor_cores_switch(monkeypatch, dtype, training):
    """DIN_EXT_CUDA_TENSOR_CORES=1 runs the forward tiles' layer products on mma.sync (bf16 / fp16 inputs, TF32 for
    float32 with torch's TF32 switch on): output and every gradient within a few operand roundings of the float64
    reference, on widths and row counts that are not multiples of the 16 x 8 x 16 instruction tile. (First run on a
    GPU pending: this is the check that decides whether the switch may become the default.)"""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("tensor-core path needs sm_80 or newer")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", dtype == torch.float32)
    unit = make_unit("dice", "softmax", hidden=(20, 12), dim=13, dtype=dtype, device="cuda", training=training,
                     score_scale=0.2)
    exact = copy.deepcopy(unit).double()
    unit.backend, exact.backend = "cuda", "reference"
    batch = make_batch("jagged", batch=5, max_len=45, dim=13, dtype=dtype, device="cuda", seed=17,
                       lengths=[45, 0, 1, 17, 33], garbage=0.0)
    wide = make_batch("jagged", batch=5, max_len=45, dim=13, dtype=torch.float64, device="cuda", seed=17,
                      lengths=[45, 0, 1, 17, 33], garbage=0.0)
    wide.query, wide.keys = batch.query.double(), batch.keys.double()
    ref_out, ref_grads = run_unit(exact, wide.fresh())
    fma_out, fma_grads = run_unit(unit, batch.fresh())
    monkeypatch.setenv("DIN_EXT_CUDA_TENSOR_CORES", "1")
    out, grads = run_unit(unit, batch.fresh())
    assert not torch.equal(out, fma_out) or dtype == torch.float64  # the switch changed the arithmetic
    for a, f, ref in zip((out, *grads), (fma_out, *fma_grads), (ref_out, *ref_grads)):
        err = (a.double() - ref).abs().max().item()
        bound = 4 * (f.double() - ref).abs().max().item() + 16 * TENSOR_CORE_UNIT[dtype] * ref.abs().max().item()
        assert err <= bound, (err, bound)


@pytest.mark.parametrize("activation", ["dice", "sigmoid", "prelu", "relu"])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(activation, training):
    assert gradcheck_attention(activation, training, "cuda", "cuda")


@pytest.mark.parametrize("training", [True, False])
def test_opcheck(training):
    unit = make_unit("dice", "softmax", hidden=(6, 4), dim=5, training=training, device="cuda")
    batch = make_batch("jagged", batch=4, max_len=5, dim=5, value_dim=3, garbage=0.0, device="cuda")
    offsets = batch.index["offsets"]
    weights = [p.detach().clone() for p in [*[l.weight for l in unit.linears], unit.out.weight]]
    biases = [p.detach().clone() for p in [*[l.bias for l in unit.linears], unit.out.bias]]
    args = (batch.query, batch.keys, batch.values, offsets[:-1], offsets.diff(), 5, weights, biases,
            unit.act_params().detach().clone(), "dice", "softmax", 0.5, training, 1e-8)
    torch.library.opcheck(torch.ops.din_ext.local_activation_attention.default, args)


def test_unknown_max_len():
    """Jagged input without max_len: the op reads the longest row itself."""
    unit = make_unit("sigmoid", "softmax", device="cuda")
    batch = make_batch("jagged", batch=5, max_len=300, device="cuda", seed=2)
    batch.index.pop("max_len")
    assert_matches_reference(unit, batch, "cuda")


def test_mixed_devices_are_refused():
    unit = make_unit("relu", "none", device="cuda")
    batch = make_batch("padded", batch=3, max_len=4, device="cuda", garbage=0.0)
    weights = [l.weight.detach() for l in unit.linears] + [unit.out.weight.detach()]
    biases = [l.bias.detach() for l in unit.linears] + [unit.out.bias.detach()]
    keys = batch.keys.reshape(12, -1)
    starts = torch.arange(3, device="cuda") * 4
    lengths = batch.index["lengths"].long()
    empty = batch.query.new_empty(0, 120)
    with pytest.raises(RuntimeError, match="keys must be on"):
        torch.ops.din_ext.local_activation_attention(batch.query, keys.cpu(), None, starts, lengths, 4, weights,
                                                     biases, empty, "relu", "none", 1.0, False, 1e-8)
    with pytest.raises(RuntimeError, match="weights must be on"):
        torch.ops.din_ext.local_activation_attention(batch.query, keys, None, starts, lengths, 4,
                                                     [weights[0].cpu(), *weights[1:]], biases, empty, "relu", "none",
                                                     1.0, False, 1e-8)
