"""The training step: sparse gradients of every embedding table, RowAdam against torch.optim.SparseAdam and Adam,
make_optimizer's split and its resumable state (old single-Adam states included), torch.compile of a sparse step,
and the background prefetch of _batches (order, errors, thread)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from conftest import requires_cpp
from test_model import first_batch, one_thread, tiny  # noqa: F401  (the tiny data and the one-thread fixture)

import din_ext
from din_ext import training
from din_ext.data.core import Interactions, iterate_batches
from din_ext.model import DIN, SharedEmbedding
from din_ext.training import RowAdam, make_optimizer, train_step


def model_of(schema, seed=0, **options) -> DIN:
    torch.manual_seed(seed)
    return DIN(schema, embed_dim=6, attention_hidden=(8, 4), tower_hidden=(8,), **options)


# -- RowAdam ---------------------------------------------------------------------------------------------------------


def random_sparse_grad(shape, rows, generator, coalesced: bool) -> torch.Tensor:
    """A sparse COO gradient over ``rows`` random rows of a (V, D) table; uncoalesced: every row given twice."""
    index = torch.randperm(shape[0], generator=generator)[:rows]
    values = torch.randn(rows, shape[1], generator=generator, dtype=torch.float64)
    if not coalesced:
        index, values = torch.cat([index, index]), torch.cat([values, 0.5 * values])
    grad = torch.sparse_coo_tensor(index[None], values, shape, check_invariants=True)
    return grad.coalesce() if coalesced else grad


KERNELS = [pytest.param("fused", marks=requires_cpp), "foreach"]


def assert_sparse_adams(ours, theirs, kernel) -> None:
    """RowAdam's tensor ``ours`` is SparseAdam's ``theirs``: the same bits from foreach, to a few ulps from fused
    (its square root is correctly rounded, torch's vectorized one within an ulp)."""
    if kernel == "foreach":
        assert torch.equal(ours, theirs)
    else:
        tolerance = 1e-13 if ours.dtype == torch.float64 else 1e-6
        torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance)


@pytest.fixture
def row_adam_kernel(request, monkeypatch):
    """RowAdam made to run the step ``request.param`` ("fused" or "foreach") whatever its tensors."""
    monkeypatch.setattr(RowAdam, "kernel", staticmethod(lambda tensors: request.param))
    return request.param


@pytest.mark.parametrize("row_adam_kernel", KERNELS, indirect=True)
@pytest.mark.parametrize("maximize", [False, True])
def test_row_adam_is_sparse_adam(maximize, row_adam_kernel):
    """torch.optim.SparseAdam's results over several steps (float64; foreach bit for bit, fused to an ulp of the
    square root), rows absent from a step unmoved, coalesced or not, two tables in one group; and each loads the
    other's state_dict."""
    g = torch.Generator().manual_seed(0)
    shapes = [(37, 5), (11, 3)]
    ours = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    theirs = [p.clone() for p in ours]
    opt_ours = RowAdam(ours, lr=0.05, betas=(0.8, 0.95), eps=1e-6, maximize=maximize)
    opt_theirs = torch.optim.SparseAdam(theirs, lr=0.05, betas=(0.8, 0.95), eps=1e-6, maximize=maximize)
    for step in range(6):
        for p, q, shape in zip(ours, theirs, shapes):
            grad = random_sparse_grad(shape, rows=4, generator=g, coalesced=step % 2 == 0)
            p.grad, q.grad = grad, grad.clone()
        before = [p.clone() for p in ours]
        opt_ours.step()
        opt_theirs.step()
        for p, q, old in zip(ours, theirs, before):
            assert_sparse_adams(p, q, row_adam_kernel)
            moved = (p != old).any(1)
            assert torch.equal(moved, torch.zeros_like(moved).index_fill_(0, p.grad.coalesce()._indices()[0], True))
    twin = [p.clone() for p in ours]
    loaded = RowAdam(twin, lr=0.05, betas=(0.8, 0.95), eps=1e-6, maximize=maximize)
    loaded.load_state_dict(opt_theirs.state_dict())
    for p, q in zip(twin, ours):
        p.grad = q.grad = random_sparse_grad(q.shape, rows=4, generator=g, coalesced=True)
    loaded.step()
    opt_ours.step()
    for p, q in zip(twin, ours):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_row_adam_is_sparse_adam_on_any_thread_count(dtype):
    """The fused step gives SparseAdam's weights and moments (to the ulps of the square root; foreach bit for bit)
    over several steps of a table with more step rows than one task holds, and the same bits on 1 and 2 threads."""
    g = torch.Generator().manual_seed(3)
    shape, rows = (5000, 13), 1500
    start = torch.randn(shape, generator=g, dtype=dtype)
    grads = [random_sparse_grad(shape, rows, g, coalesced=True).to(dtype) for _ in range(4)]
    results = []
    for kind, threads in (("sparse_adam", 1), ("foreach", 1), ("fused", 1), ("fused", 2)):
        p = start.clone()
        if kind == "sparse_adam":
            opt = torch.optim.SparseAdam([p], lr=0.01, betas=(0.7, 0.9), eps=1e-5)
        else:
            opt = RowAdam([p], lr=0.01, betas=(0.7, 0.9), eps=1e-5)
            opt.kernel = lambda tensors, kind=kind: kind
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for grad in grads:
                p.grad = grad.clone()
                opt.step()
        finally:
            torch.set_num_threads(before)
        results.append((p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]))
    assert results[2][0]._version == len(grads)  # bumped once a step, as by in-place torch ops
    for kind, result in (("foreach", results[1]), ("fused", results[2])):
        for a, b in zip(result, results[0]):
            assert_sparse_adams(a, b, kind)
    assert all(torch.equal(a, b) for a, b in zip(results[3], results[2]))  # 2 threads
    assert not torch.equal(results[0][0], start)


@requires_cpp
def test_fused_row_adam_op_rejects_bad_rows():
    """The op names what is wrong before it writes anything: unsorted, repeated or out-of-range rows, and rows of
    the wrong width."""
    p, m, v = torch.zeros(6, 2), torch.zeros(6, 2), torch.zeros(6, 2)

    def step(index, values):
        torch.ops.din_ext._row_adam_([p], [m], [v], [index], [values], [0.1], 0.9, 0.999, 1e-8, False)

    for index in ([2, 1], [1, 1], [0, 6]):
        with pytest.raises(RuntimeError, match=r"indices\[0\] must be strictly ascending rows in \[0, 6\)"):
            step(torch.tensor(index), torch.ones(2, 2))
    with pytest.raises(RuntimeError, match=r"values\[0\] must be \[2, 2\]"):
        step(torch.tensor([0, 1]), torch.ones(2, 3))
    assert not p.any() and not m.any() and not v.any()


def test_row_adam_says_which_kernel_it_runs(caplog):
    """kernel: "fused" for contiguous cpu tensors with the extension built, else "foreach", which a step logs once."""
    p = torch.zeros(8, 4)
    assert RowAdam.kernel([p]) == ("fused" if din_ext._ext.has_cpp() else "foreach")
    strided = torch.zeros(4, 8).t()
    assert RowAdam.kernel([p, strided]) == "foreach"
    opt = RowAdam([strided], lr=0.1)
    with caplog.at_level("INFO", logger="din_ext"):
        for _ in range(2):
            grad = torch.sparse_coo_tensor(torch.tensor([[1, 5]]), torch.ones(2, 4), (8, 4), check_invariants=True)
            strided.grad = grad.coalesce()
            opt.step()
    assert [r.message for r in caplog.records].count(
        "RowAdam: parameters on cpu: the foreach step (gathers, torch foreach ops, scatters); the fused one-pass step "
        "needs contiguous cpu tensors and the extension") == 1
    assert strided[[1, 5]].ne(0).all() and strided[[0, 2, 3, 4, 6, 7]].eq(0).all()


def test_row_adam_refuses_dense_gradients_and_bad_options():
    p = torch.zeros(4, 2, requires_grad=True)
    p.grad = torch.ones(4, 2)
    with pytest.raises(RuntimeError, match="RowAdam needs sparse gradients"):
        RowAdam([p]).step()
    for bad in ({"lr": 0.0}, {"eps": -1.0}, {"betas": (0.9, 1.0)}):
        with pytest.raises(ValueError, match="RowAdam needs lr > 0"):
            RowAdam([p], **bad)


# -- sparse tables ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mba_lambda", [0.0, 0.5])
def test_sparse_gradients_equal_dense_ones(tiny, mba_lambda):
    """sparse_gradients: every table's gradient is coalesced sparse, one row per distinct non-padding id, equal to
    the dense gradient; the state_dict is the same either way."""
    train, _, schema = tiny
    dense = model_of(schema, mba_lambda=mba_lambda)
    dense.sparse_gradients = False
    sparse = copy.deepcopy(dense)
    sparse.sparse_gradients = True
    assert sparse.sparse_gradients and not dense.sparse_gradients
    batch = first_batch(train)
    for model in (dense, sparse):
        model(batch).square().sum().backward()
    for name, table in sparse.embeddings.items():
        grad, want = table.weight.grad, dense.embeddings[name].weight.grad
        assert grad.is_sparse and grad.is_coalesced() and not want.is_sparse, name
        ids = torch.cat([batch.user[name]] if name in batch.user else
                        [batch.item[name]] + ([batch.hist[name]] if name in batch.hist else []))
        assert torch.equal(grad._indices()[0], torch.unique(ids[ids != 0])), name
        torch.testing.assert_close(grad.to_dense(), want, rtol=1e-5, atol=1e-7, msg=name)
    assert list(sparse.state_dict()) == list(dense.state_dict())


class _ZerosInBackward(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten.zeros calls below autograd (the engine's zeros for outputs that got no gradient)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten.zeros.default
        return func(*args, **(kwargs or {}))


@requires_cpp
def test_backward_makes_no_zero_gradients_for_the_ops_other_outputs(tiny):
    """The C++ autograds of the attention, Dice and MBA ops leave the gradients of their outputs without one (batch
    statistics, the MBA grouping) undefined, where the engine made a zero tensor for each of them every step; a
    backward through the statistics alone still gives no gradient."""
    train, _, schema = tiny
    model = model_of(schema)
    make_optimizer(model, 1e-3)
    loss = training.batch_loss(model, first_batch(train))
    with _ZerosInBackward() as mode:
        loss.backward()
    assert mode.count == 0
    x = torch.randn(6, 4, requires_grad=True)
    _, mean, _ = din_ext.ops.dice(x, torch.zeros(4), torch.zeros(4), torch.ones(4), backend="cpu")
    assert mean.grad_fn is None and x.grad is None


def test_shared_embedding_sparse_without_gradient_is_a_plain_lookup():
    table = SharedEmbedding(9, 3, padding_idx=0, sparse=True)
    ids = torch.tensor([[1, 0], [8, 8]])
    with torch.no_grad():
        (out,) = table(ids)
    torch.testing.assert_close(out, torch.nn.functional.embedding(ids, table.weight))
    assert "unit_frequencies" not in table.state_dict() and table.unit_frequencies is not None
    table.eval()  # eval mode: the plain lookup, and nothing extra for torch.export to carry
    assert table.unit_frequencies is None
    table.train()
    assert table.unit_frequencies is not None
    table.sparse = False
    assert table.unit_frequencies is None


def test_make_optimizer_steps_only_the_batch_rows(tiny):
    """make_optimizer's steps are SparseAdam's on the tables and Adam's on the rest (a twin stepped by those two);
    table rows absent from the batch and their moments stay exactly; sparse=False gives one dense Adam."""
    train, _, schema = tiny
    model = model_of(schema)
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    opt = make_optimizer(model, 1e-2)
    twin.sparse_gradients = True
    tables = [t.weight for t in twin.embeddings.values()]
    rest = [p for p in twin.parameters() if all(p is not t for t in tables)]
    oracle = [torch.optim.SparseAdam(tables, lr=1e-2), torch.optim.Adam(rest, lr=1e-2)]
    for batch in list(iterate_batches(train, 32, shuffle=True))[:3]:
        train_step(model, opt, batch)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(twin(batch), batch.labels["click"][:, None])
        for o in oracle:
            o.zero_grad()
        loss.backward()
        for o in oracle:
            o.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):  # float32: fused RowAdam's square root
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    batch = first_batch(train, 32)
    model, start = copy.deepcopy(start), copy.deepcopy(start)
    opt = make_optimizer(model, 1e-2)
    train_step(model, opt, batch)
    item = model.embeddings["item"].weight
    used = torch.zeros(item.shape[0], dtype=torch.bool)
    used[torch.cat([batch.item["item"], batch.hist["item"]])] = True
    used[0] = False
    assert torch.equal(item[~used], start.embeddings["item"].weight[~used])
    assert (item[used] != start.embeddings["item"].weight[used]).any(1).all()
    assert not opt.optimizers[0].state[item]["exp_avg"][~used].any()
    dense = make_optimizer(model, 1e-2, sparse=False)
    assert isinstance(dense, torch.optim.Adam) and not model.sparse_gradients


def test_make_optimizer_step_keeps_hooks_and_profiler_ranges(tiny):
    """make_optimizer's step skips torch.optim's per-call wrapper only where it would do nothing: with a step hook
    (on a part or global) the hook runs, and under the profiler each part's "Optimizer.step#" range is there; the
    steps give the same parameters either way, bit for bit."""
    train, _, schema = tiny
    batch = first_batch(train, 32)
    models = [model_of(schema) for _ in range(3)]
    opts = [make_optimizer(m, 1e-2) for m in models]
    calls = []
    opts[1].optimizers[1].register_step_post_hook(lambda opt, args, kwargs: calls.append("adam"))
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: calls.append("global"))
    try:
        train_step(models[1], opts[1], batch)
    finally:
        handle.remove()
    assert calls == ["global", "global", "adam"]
    train_step(models[0], opts[0], batch)
    with torch.profiler.profile() as prof:
        train_step(models[2], opts[2], batch)
    names = {event.name for event in prof.events()}
    assert {"Optimizer.step#RowAdam.step", "Optimizer.step#Adam.step"} <= names
    for p, q, r in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q) and torch.equal(p, r)


def test_make_optimizer_fused_adam_step_is_torch_adams(tiny, monkeypatch):
    """make_optimizer's step of the dense part (its own calls of torch's fused Adam ops, skipping the step's Python)
    runs from the second step on and gives torch.optim.Adam's parameters and state bit for bit over several steps,
    a parameter without a gradient left alone; a group it does not cover (amsgrad) goes through torch's step."""
    train, _, schema = tiny
    batches = [first_batch(train, 32)] + list(iterate_batches(train, 32))[1:4]
    models = [model_of(schema) for _ in range(2)]
    opts = [make_optimizer(m, 1e-2) for m in models]
    opts[1].optimizers[1].register_step_post_hook(lambda *args: None)  # torch's step, wrapper and all
    ran = []
    fast = training._fused_adam_step
    monkeypatch.setattr(training, "_fused_adam_step", lambda opt: ran.append(fast(opt)) or ran[-1])
    for model in models:
        model.heads.bias.requires_grad_(False)
    for batch in batches:
        for model, opt in zip(models, opts):
            train_step(model, opt, batch)
    # a batch: model 0's RowAdam and Adam (its first step torch's), model 1's RowAdam (its Adam is hooked)
    assert ran == [False] * 3 + [False, True, False] * (len(batches) - 1)
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)
    adams = [opt.optimizers[1] for opt in opts]
    for p, q in zip(*(a.param_groups[0]["params"] for a in adams)):
        assert all(torch.equal(a, b) for a, b in zip(adams[0].state[p].values(), adams[1].state[q].values()))
    assert not adams[0].state[models[0].heads.bias]
    amsgrad = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], fused=True, amsgrad=True)
    amsgrad.param_groups[0]["params"][0].grad = torch.ones(3)
    amsgrad.step()
    assert not training._fused_adam_step(amsgrad)


def test_optimizer_state_resumes_and_splits_a_single_adam_state(tiny, tmp_path):
    """make_optimizer's state survives a weights-only save and load; the state of one Adam over every parameter
    (dense gradients, or din_ext before row-wise optimizers) loads into it with each parameter's moments."""
    train, _, schema = tiny
    batches = list(iterate_batches(train, 32))[:3]
    dense_model = model_of(schema)
    dense_opt = make_optimizer(dense_model, 1e-2, sparse=False)
    for batch in batches[:2]:
        train_step(dense_model, dense_opt, batch)
    path = tmp_path / "opt.pt"
    torch.save(dense_opt.state_dict(), path)
    model = copy.deepcopy(dense_model)
    opt = make_optimizer(model, 1e-2)
    opt.load_state_dict(torch.load(path, weights_only=True))
    for p, q in zip(model.parameters(), dense_model.parameters()):
        part = next(o for o in opt.optimizers if p in o.state)
        assert int(part.state[p]["step"]) == 2
        torch.testing.assert_close(part.state[p]["exp_avg_sq"], dense_opt.state[q]["exp_avg_sq"])
    torch.save(opt.state_dict(), path)
    again = copy.deepcopy(model)
    again_opt = make_optimizer(again, 1e-2)
    again_opt.load_state_dict(torch.load(path, weights_only=True))
    for m, o in ((model, opt), (again, again_opt)):
        train_step(m, o, batches[2])
    for p, q in zip(model.parameters(), again.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not match this model's optimizers"):
        opt.load_state_dict({"optimizers": [dense_opt.state_dict()]})


@requires_cpp
def test_compile_fullgraph_sparse_step(tiny):
    """torch.compile(fullgraph=True) of a model with sparse tables: the same logits and gradients as eager."""
    train, _, schema = tiny
    eager = model_of(schema)
    eager.sparse_gradients = True
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True)
    batch = first_batch(train, 24)
    out_e, out_c = eager(batch), compiled(batch)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    out_e.square().sum().backward()
    out_c.square().sum().backward()
    for (name, p), q in zip(eager.named_parameters(), twin.parameters()):
        assert q.grad.is_sparse == p.grad.is_sparse, name
        torch.testing.assert_close(q.grad.to_dense(), p.grad.to_dense(), rtol=1e-4, atol=1e-6, msg=name)


# -- prefetch --------------------------------------------------------------------------------------------------------


class Source:
    """A batch source whose batches are built in whatever thread iterates them, failing after ``fail_after``."""

    def __init__(self, data, fail_after=None):
        self.data, self.fail_after, self.threads = data, fail_after, set()

    def __len__(self):
        return len(self.data)

    def batches(self, batch_size, *, shuffle=False, seed=0):
        for k, batch in enumerate(iterate_batches(self.data, batch_size, shuffle=shuffle, seed=seed)):
            self.threads.add(threading.get_ident())
            if k == self.fail_after:
                raise ValueError("shard-3.parquet, row 17: hist_offsets are not increasing")
            yield batch


def test_batches_prefetch_in_order_in_another_thread(tiny):
    train, _, _ = tiny
    source = Source(train)
    for data in (train, source):
        got = list(training._batches(data, 50, shuffle=True, seed=4))
        want = list(iterate_batches(train, 50, shuffle=True, seed=4))
        assert len(got) == len(want) > 2
        for a, b in zip(got, want):
            assert torch.equal(a.user_id, b.user_id) and torch.equal(a.hist["item"], b.hist["item"])
    assert source.threads and threading.get_ident() not in source.threads


def test_batches_prefetch_only_with_a_core_to_spare(tiny, monkeypatch):
    """In-memory Interactions are prefetched only when torch's threads leave a core free (else built inline, in
    the consumer's thread, in the same order); a batch source is always read ahead."""
    train, _, _ = tiny
    source = Source(train)
    cores = 4
    monkeypatch.setattr(training.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    threads = torch.get_num_threads()
    try:
        for count, ahead in ((cores, False), (cores - 1, True)):
            torch.set_num_threads(count)
            assert training.prefetches(train) is ahead and training.prefetches(source) is True
            built = []
            real_take = Interactions.take
            monkeypatch.setattr(Interactions, "take",
                                lambda self, index: built.append(threading.get_ident()) or real_take(self, index))
            got = list(training._batches(train, 50, shuffle=True, seed=4))
            monkeypatch.setattr(Interactions, "take", real_take)
            want = list(iterate_batches(train, 50, shuffle=True, seed=4))
            assert [b.user_id.tolist() for b in got] == [b.user_id.tolist() for b in want]
            assert built and (threading.get_ident() in built) is not ahead
    finally:
        torch.set_num_threads(threads)


def test_batches_prefetch_reraises_the_data_error(tiny):
    train, _, _ = tiny
    batches = training._batches(Source(train, fail_after=2), 50)
    assert len([next(batches), next(batches)]) == 2
    with pytest.raises(ValueError, match=r"^shard-3.parquet, row 17: hist_offsets are not increasing$"):
        next(batches)
    with pytest.raises(training.TrainingError, match="must be Interactions or have a batches"):
        training._batches(object(), 50)


def test_fit_trains_with_row_wise_steps(tiny, tmp_path):
    """fit with the default optimizer: sparse tables, a finite loss, and last.pt resumes to a second epoch."""
    train, test, schema = tiny
    model = model_of(schema)
    result = training.fit(model, train, test, epochs=1, out=tmp_path, batch_size=32, lr=1e-2, log=lambda _: None)
    assert model.sparse_gradients and result["train_loss"] > 0
    checkpoint = din_ext.model.load_checkpoint(tmp_path / "last.pt")
    resumed = DIN.from_checkpoint(checkpoint)
    again = training.fit(resumed, train, test, epochs=2, out=tmp_path, resume_from=checkpoint, log=lambda _: None)
    assert [h["epoch"] for h in again["history"]] == [1, 2] and resumed.sparse_gradients
