"""The triton attention beyond the shared conformance tests: program-level paths (several users per backward program,
many tiles), op registration (opcheck, torch.compile, torch.export), limits, and on a GPU low precision, long
histories and bitwise determinism.

On the CPU these run under TRITON_INTERPRET=1 (CI: ``TRITON_INTERPRET=1 pytest -k triton``); the GPU-only tests are
marked and skipped elsewhere.
"""

from __future__ import annotations

import copy

import pytest
import torch

import din_ext
from conftest import ON_GPU, TRITON_DEVICE, clean, gpu_only, make_batch, requires_triton, run_unit
from test_attention import assert_matches_reference, gradcheck_attention, make_unit

DEVICE = TRITON_DEVICE
pytestmark = requires_triton


def op_args(training, with_values, activation="dice", normalization="softmax"):
    unit = make_unit(activation, normalization, hidden=(6, 4), dim=5, training=training, device=DEVICE)
    batch = make_batch("jagged", batch=4, max_len=5, dim=5, value_dim=3 if with_values else None, garbage=0.0,
                       device=DEVICE)
    offsets = batch.index["offsets"]
    leaf = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    weights = [leaf(p) for p in [*[lin.weight for lin in unit.linears], unit.out.weight]]
    biases = [leaf(p) for p in [*[lin.bias for lin in unit.linears], unit.out.bias]]
    params = unit.act_params()
    params = leaf(params) if params is not None else torch.zeros(0, 10, dtype=torch.float64, device=DEVICE)
    return (leaf(batch.query), leaf(batch.keys), None if batch.values is None else leaf(batch.values), offsets[:-1],
            offsets.diff(), 5, weights, biases, params, activation, normalization, 0.5, training, 1e-8)


@pytest.mark.parametrize("programs", [3, 1])
def test_triton_several_users_per_backward_program(monkeypatch, programs):
    """Fewer backward programs than users (on a GPU: B > NUM_BLOCKS), so each program owns several users, one of
    them long (many tiles) and some empty; NUM_BLOCKS is lowered to keep the interpreter fast."""
    from din_ext.kernels import attention

    monkeypatch.setattr(attention, "NUM_BLOCKS", programs)
    unit = make_unit("dice", "softmax", hidden=(7, 5), dim=6, device=DEVICE)
    lengths = [9, 0, 4, 150, 0, 7, 1, 12, 3, 0, 5]
    batch = make_batch("jagged", batch=len(lengths), max_len=150, dim=6, lengths=lengths, device=DEVICE, seed=12)
    assert_matches_reference(unit, batch, "triton")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("with_values", [True, False])
def test_triton_opcheck(training, with_values):
    args = op_args(training, with_values)
    torch.library.opcheck(torch.ops.din_ext.triton_local_activation_attention.default, args)
    out, stats, lse = torch.ops.din_ext.triton_local_activation_attention(*args)
    detached = tuple([t.detach() for t in a] if isinstance(a, list) else a.detach() if isinstance(a, torch.Tensor)
                     else a for a in args)
    grad_args = (torch.randn_like(out), *detached[:9], out.detach(), stats, lse, *detached[9:])
    torch.library.opcheck(torch.ops.din_ext.triton_local_activation_attention_backward.default, grad_args)


@pytest.mark.parametrize("activation, training", [("dice", True), ("dice", False), ("prelu", True)])
def test_triton_gradcheck(activation, training):
    """float64 finite differences through the triton op (every differentiable input, running statistics too)."""
    assert gradcheck_attention(activation, training, "triton", DEVICE, hidden=(4, 3), fast_mode=True)


def test_triton_compile_fullgraph_traces_through():
    """torch.compile(fullgraph=True) sees through the triton ops (aot_eager on the CPU; Inductor on a GPU below)."""
    unit = make_unit("dice", "softmax", hidden=(16, 8), dim=8, dtype=torch.float32, device=DEVICE)
    unit.backend = "triton"
    reference = copy.deepcopy(unit)
    reference.backend = "reference"
    compiled = torch.compile(unit, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    for seed in range(2):
        batch = make_batch("jagged", batch=6, max_len=9, dim=8, dtype=torch.float32, garbage=0.0, seed=seed,
                           device=DEVICE)
        out, grads = run_unit(compiled, batch.fresh())
        ref_out, ref_grads = run_unit(reference, batch.fresh())
        torch.testing.assert_close(out, ref_out, atol=2e-4, rtol=2e-4)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(unit.activations[0].running_mean, reference.activations[0].running_mean)


def test_triton_export():
    unit = make_unit("dice", "none", hidden=(16, 8), dim=8, dtype=torch.float32, training=False, device=DEVICE)
    unit.backend = "triton"
    batch = make_batch("padded", batch=6, max_len=9, dim=8, dtype=torch.float32, garbage=0.0, device=DEVICE)
    args = (batch.query, batch.keys, batch.index["lengths"])
    exported = torch.export.export(unit, args)
    targets = " ".join(str(node.target) for node in exported.graph.nodes)
    assert "triton_kernel_wrapper" in targets or "triton_local_activation_attention" in targets
    torch.testing.assert_close(exported.module()(*args), unit(*args))


def test_triton_rejects_deeper_mlp_than_supported():
    from din_ext.kernels.attention import MAX_HIDDEN

    unit = make_unit("relu", "none", hidden=(3,) * (MAX_HIDDEN + 1), dim=4, device=DEVICE)
    unit.backend = "triton"
    batch = make_batch("padded", batch=2, max_len=3, dim=4, garbage=0.0, device=DEVICE)
    with pytest.raises(ValueError, match="at most 4 hidden layers"):
        unit(batch.query, batch.keys, **batch.index)


def test_triton_four_hidden_layers():
    unit = make_unit("dice", "none", hidden=(9, 17, 5, 3), dim=4, device=DEVICE)
    assert_matches_reference(unit, make_batch("jagged", batch=5, max_len=20, dim=4, device=DEVICE, seed=6), "triton")


# ---------------------------------------------------------------------------------------------------------------
# GPU only


def _run_projected(unit, batch, seed=0):
    """Like conftest.run_unit, with the upstream projection drawn in float64 whatever the dtype, so that runs in
    different dtypes back-propagate the same gradient."""
    out = unit(batch.query, batch.keys, values=batch.values, **batch.index)
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    inputs = list(batch.leaves()) + [p for p in unit.parameters() if p.requires_grad]
    return out, list(torch.autograd.grad((out * weight).sum(), inputs))


def _errors(ours, same, exact):
    """max |ours - exact| and flash-attention's bound 2 max |same - exact| + a small absolute floor."""
    err = (ours.double() - exact).abs().max().item()
    bound = 2 * (same.double() - exact).abs().max().item() + 1e-5 * exact.abs().max().item()
    return err, bound


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("activation, normalization, training", [
    ("dice", "none", True), ("dice", "softmax", False), ("prelu", "softmax", True), ("sigmoid", "none", False)])
def test_triton_low_precision_flash_attention_rule(dtype, activation, normalization, training):
    """|triton - ref_fp64| <= 2 |reference in dtype - ref_fp64| (+ tiny floor), output and every gradient."""
    unit = make_unit(activation, normalization, hidden=(80, 40), dim=64, device="cuda", training=training,
                     dtype=torch.float64, score_scale=0.1)
    batch = make_batch("jagged", batch=64, max_len=300, dim=64, garbage=0.0, device="cuda", dtype=torch.float64,
                       seed=21)
    exact = copy.deepcopy(unit)
    exact.backend = "reference"
    low = copy.deepcopy(unit).to(dtype)
    same = copy.deepcopy(low)
    same.backend = "reference"
    low.backend = "triton"

    def cast(b):
        b = copy.copy(b)
        b.query, b.keys = b.query.to(dtype), b.keys.to(dtype)
        return b

    ref_out, ref_grads = _run_projected(exact, batch.fresh())
    out, grads = _run_projected(low, cast(batch).fresh())
    same_out, same_grads = _run_projected(same, cast(batch).fresh())
    for name, a, s, r in zip(["out", "query", "keys", *[n for n, _ in unit.named_parameters()]],
                             [out, *grads], [same_out, *same_grads], [ref_out, *ref_grads]):
        err, bound = _errors(a, s, r)
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


@gpu_only
@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_triton_long_histories(layout):
    """L = 10,000 (one user full, others random, one empty) in float32 against the float64 reference."""
    unit = make_unit("dice", "softmax", hidden=(80, 40), dim=32, device="cuda", training=True, dtype=torch.float64,
                     score_scale=0.05)
    batch = make_batch(layout, batch=6, max_len=10_000, dim=32, garbage=float("nan"), device="cuda",
                       dtype=torch.float64, seed=33)
    ours = copy.deepcopy(unit).float()
    ours.backend = "triton"
    oracle = copy.deepcopy(unit)
    oracle.backend = "reference"
    b32 = batch.fresh()
    b32.query, b32.keys = [t.detach().float().requires_grad_() for t in (b32.query, b32.keys)]
    out, grads = _run_projected(ours, b32)
    ref_out, ref_grads = _run_projected(oracle, clean(batch))
    scale = lambda r: 1e-3 * r.abs().max().item() + 1e-6  # noqa: E731
    torch.testing.assert_close(out.double(), ref_out, atol=scale(ref_out), rtol=1e-3)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(torch.nan_to_num(g).double(), r, atol=scale(r), rtol=1e-3)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_bitwise_deterministic(dtype):
    """Two runs on fresh modules and inputs give identical bits: output, every gradient, running statistics."""
    results = []
    for _ in range(2):
        unit = make_unit("dice", "softmax", hidden=(80, 40), dim=64, device="cuda", dtype=dtype)
        unit.backend = "triton"
        batch = make_batch("jagged", batch=700, max_len=400, dim=64, dtype=dtype, garbage=0.0, device="cuda",
                           seed=4)
        out, grads = _run_projected(unit, batch.fresh())
        results.append((out, grads, [b.clone() for b in unit.buffers()]))
    (out_a, grads_a, bufs_a), (out_b, grads_b, bufs_b) = results
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert all(torch.equal(a, b) for a, b in zip(bufs_a, bufs_b))


@gpu_only
def test_triton_auto_prefers_triton_on_cuda():
    assert din_ext._backend.resolve("auto", torch.device("cuda")) == "triton"


@pytest.mark.parametrize("dim", [16, 32, 48, 64, 96, 128])
def test_triton_layer1_column_blocks(dim):
    """The layer-1 parameter pass of a [B, D] query sums dKc and dPc in column blocks of LAYER1_COLUMNS when the
    padded D is wider (two blocks at D = 96 and 128), whole otherwise and for several candidates; at each D the
    gradients match the float64 reference, with a length-1 user and empty ones."""
    from din_ext.kernels import attention

    padded, columns = attention._pad(dim), attention.layer1_columns(dim, multi=False)
    assert padded % columns == 0 and columns <= attention.LAYER1_COLUMNS
    assert (padded // columns > 1) == (padded > attention.LAYER1_COLUMNS)
    assert attention.layer1_columns(dim, multi=True) == padded
    unit = make_unit("dice", "softmax", hidden=(7, 5), dim=dim, device=DEVICE)
    batch = make_batch("jagged", batch=5, max_len=9, dim=dim, lengths=[1, 0, 9, 3, 0], device=DEVICE, seed=dim)
    assert_matches_reference(unit, batch, "triton")


@pytest.mark.parametrize("dim", [24, 96])
def test_triton_split_backward_repeats_and_equals_fused(monkeypatch, dim):
    """The split gradient pass (input gradients, layer 1's in column blocks at D = 96, the others; at D = 96 the
    parameter passes read the input pass's Weff_b^T from a scratch) gives the same bits twice, and the fused
    kernel's (DIN_EXT_TRITON_SPLIT_BACKWARD=0) bits: the same products, the same order."""
    from din_ext.kernels import attention

    assert attention.weff_scratch(dim, False, -1, attention.GRADS_HIDDEN) == (attention._pad(dim) > 64)
    runs = []
    for split in ("1", "1", "0"):
        monkeypatch.setenv("DIN_EXT_TRITON_SPLIT_BACKWARD", split)
        unit = make_unit("dice", "softmax", hidden=(9, 6), dim=dim, device=DEVICE)
        unit.backend = "triton"
        batch = make_batch("jagged", batch=6, max_len=40, dim=dim, device=DEVICE, seed=5)
        out, grads = _run_projected(unit, batch.fresh())
        runs.append([out, *grads])
    assert len(runs[0]) >= 8
    for first, again, fused in zip(*runs):
        assert torch.isfinite(first).all()
        assert torch.equal(first, again)
        assert torch.equal(first, fused)


def test_triton_backward_kernels_and_autotuning_restores():
    """float32 without TF32 runs the backward's jit function under configs of its own (the parameter passes apart
    from the others), and every backward autotuner restores the buffers a pass read-modify-writes (PART's dKc and
    dPc rows, a multi-candidate query's GQ and DC): autotuning's timed runs would otherwise add to them again."""
    from din_ext.kernels import attention as A

    names = {(ieee, stop, int(grads)): A.backward_kernel_name(ieee, stop, grads)
             for ieee in (False, True) for stop in (-1, 0) for grads in (A.GRADS_ALL, *A.SPLIT_PASSES)}
    assert {name for (ieee, _, _), name in names.items() if not ieee} == {"_backward_kernel"}
    params, others = "_backward_fp32_params_kernel", "_backward_fp32_inputs_kernel"
    assert names[True, -1, int(A.GRADS_LAYER1)] == names[True, -1, int(A.GRADS_HIDDEN)] == params
    assert names[True, -1, int(A.GRADS_INPUTS)] == names[True, -1, int(A.GRADS_ALL)] == others
    assert names[True, 0, int(A.GRADS_ALL)] == others  # a Dice sums pass
    for name in set(names.values()):
        kernel = getattr(A, name)
        assert kernel.fn is A._backward_kernel.fn
        assert {"PART", "GQ", "DC"} <= set(kernel.restore_value)
