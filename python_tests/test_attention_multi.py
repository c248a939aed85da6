"""Multi-candidate attention (query [B, C, D]): conformance with the single-candidate reference on the history tiled C
times, forward and every gradient; the layer, the compiled op and DIN's ranking."""

from __future__ import annotations

import copy
import itertools
import zlib

import pytest
import torch

import din_ext
from conftest import BACKENDS, clean, make_batch, requires_cpp
from test_attention import ACTIVATIONS, make_unit, opcheck_compiled_op

# The subjects: the reference's own 3-D support and every backend this machine runs (cpu; triton under
# TRITON_INTERPRET=1 or on a GPU; cuda on a GPU), all of whose kernels take a 3-D query.
MULTI_BACKENDS = [("reference", "cpu")] + BACKENDS
CASES = [
    pytest.param(act, norm, layout, training, id=f"{act}-{norm}-{layout}-{'train' if training else 'eval'}")
    for act, norm, layout, training in itertools.product(ACTIVATIONS, ["none", "softmax"], ["padded", "jagged"],
                                                         [True, False])
]


@pytest.fixture(params=MULTI_BACKENDS, ids=lambda p: f"{p[0]}-{p[1]}")
def multi_backend(request):
    return request.param


def candidates(batch, count, seed=0):
    """A query [B, C, D] for the batch's users (the batch's own query is candidate 0)."""
    g = torch.Generator().manual_seed(seed + 1)
    rest = torch.randn(batch.query.shape[0], count - 1, batch.query.shape[1], generator=g, dtype=batch.query.dtype)
    return torch.cat([batch.query.detach()[:, None], rest.to(batch.query.device)], dim=1)


def tile(keys, values, index, count):
    """The history of every user repeated for each of its C candidates (differentiably), as the single-candidate
    path must see it: returns (keys, values, index) for B * C rows."""
    if "lengths" in index:
        rep = lambda t: None if t is None else t.repeat_interleave(count, dim=0)  # noqa: E731
        return rep(keys), rep(values), {"lengths": index["lengths"].repeat_interleave(count)}
    offsets = index["offsets"].long()
    rows = torch.cat([torch.arange(int(s), int(e)).repeat(count) for s, e in zip(offsets[:-1], offsets[1:])])
    rows = rows.to(keys.device)
    lengths = (offsets[1:] - offsets[:-1]).repeat_interleave(count)
    tiled = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(index["offsets"].dtype)
    take = lambda t: None if t is None else t[rows]  # noqa: E731
    return take(keys), take(values), {"offsets": tiled, "max_len": index.get("max_len")}


def run(unit, query, keys, values, index, tiled=False, seed=0):
    """Forward on query [B, C, D] (or on the tiled history with B * C single-candidate rows), then backward of a
    fixed projection; returns (out [B, C, Dv], grads of query, keys, values and the parameters)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (query, keys, values)]
    query, keys, values = leaves
    batch, count, dim = query.shape
    if tiled:
        k, v, idx = tile(keys, values, index, count)
        out = unit(query.reshape(batch * count, dim), k, values=v, **idx).view(batch, count, -1)
    else:
        out = unit(query, keys, values=values, **index)
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)
    inputs = [t for t in leaves if t is not None] + [p for p in unit.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)
    return out, [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


def assert_matches_tiled(unit, batch, count, backend, seed=0, atol=1e-10, rtol=1e-9):
    """The layer with query [B, C, D] on `backend` against the float64 reference on the tiled history (outputs,
    every gradient, the running statistics)."""
    oracle = copy.deepcopy(unit)
    oracle.backend = "reference"
    unit.backend = backend
    ref_batch = clean(batch)
    query = candidates(batch, count, seed)
    subject = ref_batch if backend == "reference" else batch  # the reference reads padding (it masks after)
    out, grads = run(unit, query, subject.keys, subject.values, subject.index)
    ref_out, ref_grads = run(oracle, torch.nan_to_num(query, nan=0.0), ref_batch.keys, ref_batch.values,
                             ref_batch.index, tiled=True)
    assert out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    names = ["query", "keys", "values"][:len(grads) - len(list(unit.parameters()))] + [
        n for n, _ in unit.named_parameters()]
    for name, g, r in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, r, atol=atol, rtol=rtol, msg=lambda m: f"grad of {name}: {m}")
    for (name, ours_buf), (_, ref_buf) in zip(unit.named_buffers(), oracle.named_buffers()):
        torch.testing.assert_close(ours_buf, ref_buf, atol=atol, rtol=rtol, msg=lambda m: f"buffer {name}: {m}")
    return out, grads


@pytest.mark.parametrize("activation, normalization, layout, training", CASES)
def test_matches_tiled_reference(multi_backend, activation, normalization, layout, training):
    name, device = multi_backend
    unit = make_unit(activation, normalization, device=device, training=training, score_scale=0.37)
    seed = zlib.crc32(f"multi{activation}{normalization}{layout}".encode())
    batch = make_batch(layout, batch=5, max_len=37, device=device, seed=seed)
    out, _ = assert_matches_tiled(unit, batch, 3, name, seed=seed)
    assert out.shape == (5, 3, 24)


@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_separate_values_odd_candidates(multi_backend, layout):
    name, device = multi_backend
    unit = make_unit("dice", "softmax", device=device)
    batch = make_batch(layout, batch=4, max_len=70, value_dim=17, device=device, seed=5)  # 70: two key tiles
    out, _ = assert_matches_tiled(unit, batch, 7, name)
    assert out.shape == (4, 7, 17)


@pytest.mark.parametrize("count", [1, 2, 7, 40])
def test_candidate_counts_and_length_one(multi_backend, count):
    """L = 1 (pair tiles of many candidates), C = 1 and odd C; C = 40 with L = 1 spans several pair tiles."""
    name, device = multi_backend
    unit = make_unit("prelu", "none", hidden=(9, 5), device=device)
    batch = make_batch("jagged", batch=4, max_len=1, device=device, lengths=[1, 0, 1, 1])
    assert_matches_tiled(unit, batch, count, name)


def test_zero_length_histories_give_exact_zeros(multi_backend):
    name, device = multi_backend
    for training in (True, False):
        unit = make_unit("dice", "softmax", device=device, training=training)
        unit.backend = name
        batch = make_batch("jagged", batch=3, max_len=6, device=device, lengths=[0, 4, 0])
        source = clean(batch) if name == "reference" else batch
        out, grads = run(unit, candidates(batch, 5), source.keys, None, source.index)
        assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
        assert not out.isnan().any() and not any(g.isnan().any() for g in grads)
        empty = make_batch("padded", batch=2, max_len=3, device=device, lengths=[0, 0])
        source = clean(empty) if name == "reference" else empty
        out, grads = run(unit, candidates(empty, 4), source.keys, None, source.index)
        assert torch.equal(out, torch.zeros_like(out))
        assert all(not g.isnan().any() for g in grads)


def test_hidden_depths(multi_backend):
    name, device = multi_backend
    for hidden in [(), (33, 9, 5)]:
        unit = make_unit("sigmoid", "softmax", hidden=hidden, dim=10, device=device)
        assert_matches_tiled(unit, make_batch("jagged", batch=4, max_len=9, dim=10, device=device), 3, name)


@requires_cpp
@pytest.mark.parametrize("activation, normalization, training",
                         [("dice", "softmax", True), ("dice", "none", False), ("prelu", "softmax", False),
                          ("relu", "none", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_one_candidate_is_bitwise_the_2d_path(activation, normalization, training, dtype):
    unit = make_unit(activation, normalization, dtype=dtype, training=training)
    batch = make_batch("jagged", batch=6, max_len=80, dtype=dtype, garbage=0.0, seed=11)
    weights = [l.weight.detach() for l in unit.linears] + [unit.out.weight.detach()]
    biases = [l.bias.detach() for l in unit.linears] + [unit.out.bias.detach()]
    params = unit.act_params()
    params = params.detach() if params is not None else batch.query.new_empty(0, sum(w.shape[0] for w in weights[:-1]))
    offsets = batch.index["offsets"]
    config = (activation, normalization, 0.7, training, 1e-8)
    op = torch.ops.din_ext

    def both(query):
        out, stats = op.local_activation_attention(query, batch.keys, None, offsets[:-1], offsets.diff(), 80,
                                                   weights, biases, params, *config)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
        grads = op.local_activation_attention_backward(grad, query, batch.keys, None, offsets[:-1], offsets.diff(),
                                                       80, weights, biases, params, stats, *config)
        return out, stats, grads

    out2, stats2, grads2 = both(batch.query)
    out3, stats3, grads3 = both(batch.query[:, None])
    assert out3.shape == (6, 1, 24) and grads3[0].shape == (6, 1, 24)
    assert torch.equal(out3[:, 0], out2) and torch.equal(stats3, stats2)
    assert torch.equal(grads3[0][:, 0], grads2[0])
    for a, b in zip(grads3[1:], grads2[1:]):
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            assert torch.equal(x, y)


@requires_cpp
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_cpu_single_candidate_op_on_tiled_history_equals_multi(normalization):
    """The din_ext single-candidate op on the tiled history and the multi-candidate op agree (float64)."""
    unit = make_unit("dice", normalization, training=True)
    unit.backend = "cpu"
    batch = make_batch("padded", batch=4, max_len=50, garbage=0.0, seed=2)
    query = candidates(batch, 6)
    out, grads = run(copy.deepcopy(unit), query, batch.keys, None, batch.index)
    ref_out, ref_grads = run(copy.deepcopy(unit), query, batch.keys, None, batch.index, tiled=True)
    torch.testing.assert_close(out, ref_out, atol=1e-11, rtol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-11, rtol=1e-10)


@requires_cpp
def test_cpu_deterministic_across_thread_counts():
    unit = make_unit("dice", "softmax", dtype=torch.float32, training=True)
    unit.backend = "cpu"
    batch = make_batch("jagged", batch=9, max_len=90, dtype=torch.float32, garbage=0.0, seed=4)
    query = candidates(batch, 70)  # two forward candidate groups
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.append(run(copy.deepcopy(unit), query, batch.keys, None, batch.index))
    finally:
        torch.set_num_threads(threads)
    for out, grads in results[1:]:
        assert torch.equal(out, results[0][0])
        assert all(torch.equal(g, r) for g, r in zip(grads, results[0][1]))


@pytest.fixture
def set_threads():
    """torch.set_num_threads, with the thread count restored after the test."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


# One user with C candidates at 2 threads: the cpu forward cuts the candidates into a work item per thread. L = 1
# runs the pair-tile (split layer 1) path, L = 50 and 500 the per-candidate effective-weight path (500: 8 key tiles).
@requires_cpp
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("length", [1, 50, 500])
@pytest.mark.parametrize("count", [2, 7, 10])
def test_cpu_one_user_split_over_threads(set_threads, count, length, training):
    set_threads(2)
    unit = make_unit("dice", "softmax", training=training, score_scale=0.37)
    batch = make_batch("jagged", batch=1, max_len=length, seed=count + length)
    out, _ = assert_matches_tiled(unit, batch, count, "cpu")
    assert out.shape == (1, count, 24)


@requires_cpp
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("count", [2, 7])
def test_cpu_split_zero_length_histories(set_threads, count, training):
    set_threads(2)
    for lengths in ([0], [0, 0], [0, 50], [1, 0]):
        unit = make_unit("dice", "none", training=training)
        batch = make_batch("padded", batch=len(lengths), max_len=50, lengths=lengths, seed=len(lengths))
        out, _ = assert_matches_tiled(unit, batch, count, "cpu")
        for row, length in enumerate(lengths):
            if length == 0:
                assert torch.equal(out[row], torch.zeros_like(out[row]))


@requires_cpp
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("length", [1, 9, 50, 500])
def test_cpu_split_is_bitwise_independent_of_threads(set_threads, length, training):
    """float32 outputs and gradients bitwise the same at 1 and 2 threads (2: one work item per thread) and run to
    run; in eval a candidate's output is bitwise the same whatever other candidates share the call."""
    unit = make_unit("dice", "softmax", dtype=torch.float32, training=training)
    unit.backend = "cpu"
    batch = make_batch("jagged", batch=1, max_len=length, dtype=torch.float32, garbage=0.0, seed=length)
    query = candidates(batch, 10)
    results = []
    for n in (1, 2, 2, 1):
        set_threads(n)
        results.append(run(copy.deepcopy(unit), query, batch.keys, None, batch.index))
    for out, grads in results[1:]:
        assert torch.equal(out, results[0][0])
        assert all(torch.equal(g, r) for g, r in zip(grads, results[0][1]))
    if not training:
        for n in (1, 2):
            set_threads(n)
            with torch.no_grad():
                part = unit(query[:, 3:6], batch.keys, **batch.index)
            assert torch.equal(part, results[0][0][:, 3:6])


@requires_cpp
@pytest.mark.parametrize("activation, normalization, training",
                         [("dice", "softmax", True), ("dice", "none", False), ("prelu", "none", True)])
def test_gradcheck_cpu(activation, normalization, training):
    unit = make_unit(activation, normalization, hidden=(5, 3), dim=4, training=training)
    batch = make_batch("jagged", batch=3, max_len=4, dim=4, value_dim=3, garbage=0.0, lengths=[4, 0, 2])
    weights = [l.weight.detach().clone().requires_grad_() for l in unit.linears] + [
        unit.out.weight.detach().clone().requires_grad_()]
    biases = [l.bias.detach().clone().requires_grad_() for l in unit.linears] + [
        unit.out.bias.detach().clone().requires_grad_()]
    params = unit.act_params().detach().clone().requires_grad_()
    query = candidates(batch, 3).requires_grad_()
    n = len(weights)

    def fn(query, keys, values, *rest):
        out, _ = din_ext.ops.local_activation_attention(
            query, keys, list(rest[:n]), list(rest[n:2 * n]), rest[2 * n], values=values, activation=activation,
            normalization=normalization, training=training, backend="cpu", **batch.index)
        return out

    inputs = (query, batch.keys.requires_grad_(), batch.values.requires_grad_(), *weights, *biases, params)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@requires_cpp
@pytest.mark.parametrize("training", [True, False])
def test_opcheck_3d_query(training):
    unit = make_unit("dice", "softmax", hidden=(6, 4), dim=5, training=training)
    batch = make_batch("jagged", batch=4, max_len=5, dim=5, garbage=0.0)
    offsets = batch.index["offsets"]
    weights = [p.detach().clone().requires_grad_() for p in [*[l.weight for l in unit.linears], unit.out.weight]]
    biases = [p.detach().clone().requires_grad_() for p in [*[l.bias for l in unit.linears], unit.out.bias]]
    params = unit.act_params().detach().clone().requires_grad_()
    args = (candidates(batch, 3).requires_grad_(), batch.keys.requires_grad_(), None, offsets[:-1], offsets.diff(),
            5, weights, biases, params, "dice", "softmax", 0.5, training, 1e-8)
    assert opcheck_compiled_op(args).shape == (4, 3, 5)


@requires_cpp
def test_torch_compile_fullgraph_3d_query():
    unit = make_unit("dice", "softmax", hidden=(16, 8), dim=8, dtype=torch.float32)
    unit.backend = "cpu"
    reference = copy.deepcopy(unit)
    compiled = torch.compile(unit, fullgraph=True)
    for seed in range(2):
        batch = make_batch("jagged", batch=6, max_len=9, dim=8, dtype=torch.float32, garbage=0.0, seed=seed)
        query = candidates(batch, 4, seed)
        out, grads = run(compiled, query, batch.keys, None, batch.index)
        ref_out, ref_grads = run(reference, query, batch.keys, None, batch.index)
        assert out.shape == (6, 4, 8)
        torch.testing.assert_close(out, ref_out)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r)
    torch.testing.assert_close(unit.activations[0].running_mean, reference.activations[0].running_mean)


@requires_cpp
def test_torch_export_3d_query():
    unit = make_unit("dice", "none", hidden=(16, 8), dim=8, dtype=torch.float32, training=False)
    unit.backend = "cpu"
    batch = make_batch("padded", batch=6, max_len=9, dim=8, dtype=torch.float32, garbage=0.0)
    args = (candidates(batch, 5), batch.keys, batch.index["lengths"])
    exported = torch.export.export(unit, args)
    assert any("din_ext.local_activation_attention" in str(node.target) for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(*args), unit(*args))


def test_bad_candidate_query():
    unit = make_unit("dice", "none")
    batch = make_batch("padded", batch=2, max_len=3, garbage=0.0)
    with pytest.raises(ValueError, match=r"C = 0"):
        unit(batch.query[:, None][:, :0], batch.keys, batch.index["lengths"])
    with pytest.raises(ValueError, match=r"query must have shape \[B, D\] or \[B, C, D\]"):
        unit(batch.query[:, None, None], batch.keys, batch.index["lengths"])


# -- DIN ---------------------------------------------------------------------------------------------------------

from din_ext.data.core import Interactions, iterate_batches  # noqa: E402
from din_ext.data.synthetic import SyntheticConfig, generate  # noqa: E402
from din_ext.model import DIN  # noqa: E402

TINY = SyntheticConfig(num_users=30, num_items=60, num_categories=6, brands_per_category=2, max_history=12,
                       impressions_per_user=4)


def user_batch(rows=6, seed=3):
    """(a batch of `rows` users, row 1's history emptied; the schema)."""
    train, _, schema = generate(TINY, seed=seed)
    batch = next(iter(iterate_batches(train, rows)))
    owner = torch.repeat_interleave(torch.arange(rows), batch.hist_lengths)
    lengths = batch.hist_lengths.clone()
    lengths[1] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    hist = {k: v[owner != 1] for k, v in batch.hist.items()}
    return Interactions(batch.user_id, batch.user, batch.item, offsets, hist, batch.labels, batch.dense,
                        batch.time), schema


def with_candidates(batch, items):
    return Interactions(batch.user_id, batch.user, items, batch.hist_offsets, batch.hist, batch.labels, batch.dense,
                        batch.time)


def tiled_rows(batch, items, count):
    """Each user's row repeated for each of its `count` candidates (items [B, C] -> [B * C])."""
    index = torch.arange(len(batch)).repeat_interleave(count)
    tiled = batch.take(index)
    return with_candidates(tiled, {k: v.reshape(-1) for k, v in items.items()})


def random_items(schema, rows, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f: torch.randint(0, size, (rows, count), generator=g) for f, size in schema.item_fields.items()}


@pytest.mark.parametrize("backend_name", ["reference"] + (["cpu"] if din_ext._ext.has_cpp() else []))
@pytest.mark.parametrize("pooling", ["attention", "sum"])
def test_din_candidates_match_tiled_rows(backend_name, pooling):
    batch, schema = user_batch()
    torch.manual_seed(0)
    model = DIN(schema, embed_dim=8, attention_hidden=(12, 6), tower_hidden=(16, 8), pooling=pooling,
                backend=backend_name).double()
    model.train()  # Dice statistics over all pairs in the attention and over all S * C rows in the tower
    items = random_items(model.schema, len(batch), 5)
    tiled_model = copy.deepcopy(model)
    logits = model(with_candidates(batch, items))
    tiled = tiled_model(tiled_rows(batch, items, 5)).view(len(batch), 5, -1)
    assert logits.shape == (len(batch), 5, len(model.tasks))
    torch.testing.assert_close(logits, tiled, atol=1e-10, rtol=1e-9)
    logits.sum().backward()
    tiled.sum().backward()
    for (name, p), (_, q) in zip(model.named_parameters(), tiled_model.named_parameters()):
        if p.grad is not None or q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-10, rtol=1e-9, msg=lambda m: f"grad of {name}: {m}")
    for (name, a), (_, b) in zip(model.named_buffers(), tiled_model.named_buffers()):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=lambda m: f"buffer {name}: {m}")


@pytest.mark.parametrize("backend_name", ["reference"] + (["cpu"] if din_ext._ext.has_cpp() else []))
def test_rank_scores_candidate_lists_in_order(backend_name):
    batch, schema = user_batch()
    torch.manual_seed(1)
    model = DIN(schema, embed_dim=8, attention_hidden=(12, 6), tower_hidden=(16, 8), backend=backend_name)
    model.train()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, din_ext.Dice):
                module.running_mean.uniform_(-0.1, 0.1)
    counts = [3, 1, 5, 2, 4, 3]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(counts).cumsum(0)])
    g = torch.Generator().manual_seed(2)
    items = {f: torch.randint(1, size, (int(offsets[-1]),), generator=g) for f, size in model.schema.item_fields.items()}
    probs = model.rank(with_candidates(batch, items), candidate_offsets=offsets)
    assert model.training  # rank restores the mode
    assert probs.shape == (int(offsets[-1]), len(model.tasks))
    model.eval()
    index = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(counts))
    expected = torch.sigmoid(model(with_candidates(batch.take(index), items)))
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)
    # Same-length lists as [B, C]: probabilities [B, C, T] in candidate order.
    square = random_items(model.schema, len(batch), 4, seed=5)
    probs = model.rank(with_candidates(batch, square))
    expected = torch.sigmoid(model(tiled_rows(batch, square, 4))).view(len(batch), 4, -1)
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)


def test_rank_runs_every_module_in_eval_mode():
    """rank scores in eval mode even when the model is in eval mode but one of its modules is not."""
    batch, schema = user_batch()
    torch.manual_seed(1)
    model = DIN(schema, embed_dim=8, attention_hidden=(12, 6), tower_hidden=(16, 8)).eval()
    items = random_items(model.schema, len(batch), 4, seed=7)
    dice = next(m for m in model.tower_activations if isinstance(m, din_ext.Dice)).train()
    with torch.no_grad():
        dice.running_mean.uniform_(-0.5, 0.5)  # eval reads these; a training-mode Dice would not
    expected = torch.sigmoid(model.eval()(with_candidates(batch, items)))
    dice.train()
    torch.testing.assert_close(model.rank(with_candidates(batch, items)), expected)
    assert not model.training


def test_din_rejects_mixed_candidate_shapes():
    batch, schema = user_batch()
    model = DIN(schema, embed_dim=8, attention_hidden=(12, 6), tower_hidden=(16, 8))
    items = random_items(model.schema, len(batch), 3)
    first = next(iter(items))
    items[first] = items[first][:, 0]
    with pytest.raises(ValueError, match=r"every item column \[S, C\]"):
        model(with_candidates(batch, items))
