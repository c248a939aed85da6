"""MBA embedding (DIN paper section 5.1): every backend against din_ext.reference.mba_embedding, the sparse gradient's
structure, optimizers, validation, opcheck and reproducibility. The triton backend runs these conformance tests too
(ids with "triton"; CI: TRITON_INTERPRET=1 pytest python_tests -k triton); its own tests are in test_mba_triton.py."""

from __future__ import annotations

import os

import pytest
import torch

import din_ext
from din_ext import _backend
from conftest import requires_cpp


def mba_backends():
    """(backend, device) pairs to test; the reference backend is tested too (the oracle is reference.mba_embedding)."""
    pairs = [("reference", "cpu")]
    if din_ext._ext.has_cpp():
        pairs.append(("cpu", "cpu"))
    if torch.cuda.is_available():
        pairs += [(b, "cuda") for b in ("cuda", "triton")
                  if b != "cuda" or _backend.has_cuda_kernel("mba_embedding")]
    elif os.environ.get("TRITON_INTERPRET") == "1" and _backend.has_triton("mba_embedding"):
        pairs.append(("triton", "cpu"))
    return pairs


@pytest.fixture(params=mba_backends(), ids=lambda p: f"{p[0]}-{p[1]}")
def backend(request):
    return request.param


def make_table(num_rows, dim, dtype=torch.float64, device="cpu", seed=0, max_count=4):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_rows, dim, generator=g, dtype=torch.float64).to(device, dtype)
    frequencies = torch.randint(0, max_count + 1, (num_rows,), generator=g)  # zeros: unseen ids, counted as 1
    return weight, frequencies.to(device)


def random_ids(shape, num_rows, seed, device="cpu", dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_rows, shape, generator=g).to(device, dtype)


# name -> (V, D, list of id tensors (or a single tensor), padding_idx)
def cases(device):
    V = 37
    several = [random_ids((7,), V, 1), random_ids((5, 11), V, 2, dtype=torch.int32), torch.tensor(3),
               torch.zeros(0, 3, dtype=torch.long)]
    several[0][:3] = several[1][0, :3].long()  # ids shared across tensors
    edges = random_ids((4, 9), V, 3)
    edges[0, :3], edges[1, :2] = 0, V - 1
    padded = random_ids((6, 10), V, 4)
    padded[:, 7:] = 5
    return {
        "repeats": (V, 5, random_ids((6, 30), 9, 0), None),  # ids < 9: many repeats
        "edges": (V, 24, edges, None),
        "padding": (V, 13, padded, 5),
        "padding-negative": (V, 13, torch.where(padded == 5, V - 1, padded), -1),
        "padding-only": (V, 3, torch.full((4, 2), 7), 7),
        "several": (V, 6, several, 2),
        "empty": (V, 4, torch.zeros(0, dtype=torch.long), None),
        "empty-several": (V, 4, [torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, dtype=torch.int32)], None),
        "one-row": (1, 5, torch.zeros(3, 4, dtype=torch.long), None),
    }


CASES = list(cases("cpu"))


def as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def upstream(outs, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype) for o in outs]


def run_ours(weight, ids, frequencies, reg_lambda, padding_idx, sparse, name):
    w = weight.detach().clone().requires_grad_()
    outs, reg = din_ext.ops.mba_embedding(w, ids, frequencies, reg_lambda, padding_idx=padding_idx, sparse=sparse,
                                          backend=name)
    loss = sum((o * g).sum() for o, g in zip(as_list(outs), upstream(as_list(outs))))
    loss.backward()
    return outs, reg, w.grad


def run_reference(weight, ids, frequencies, reg_lambda, padding_idx):
    w = weight.detach().clone().requires_grad_()
    outs, reg = din_ext.reference.mba_embedding(w, ids, frequencies, reg_lambda, padding_idx)
    loss = sum((o * g).sum() for o, g in zip(as_list(outs), upstream(as_list(outs)))) + reg
    loss.backward()
    return outs, reg, w.grad


def distinct(ids, padding_idx, num_rows):
    flat = torch.cat([i.reshape(-1).long().cpu() for i in as_list(ids)])
    unique = torch.unique(flat)
    if padding_idx is not None:
        unique = unique[unique != padding_idx % num_rows]
    return unique


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(backend, case, sparse):
    name, device = backend
    V, D, ids, padding_idx = cases(device)[case]
    ids = [i.to(device) for i in ids] if isinstance(ids, list) else ids.to(device)
    weight, frequencies = make_table(V, D, device=device)
    freq = frequencies.double()
    outs, reg, grad = run_ours(weight, ids, freq, 0.37, padding_idx, sparse, name)
    ref_outs, ref_reg, ref_grad = run_reference(weight, ids, freq, 0.37, padding_idx)
    assert type(outs) is type(ref_outs)
    for o, r in zip(as_list(outs), as_list(ref_outs)):
        assert o.shape == r.shape and torch.equal(o, r)
    assert reg.dtype == torch.float64 and not reg.requires_grad
    torch.testing.assert_close(reg, ref_reg.detach(), atol=1e-12, rtol=1e-12)
    assert grad.is_sparse == sparse
    torch.testing.assert_close(grad.to_dense(), ref_grad, atol=1e-12, rtol=1e-12)
    # Rows outside the step's distinct ids, and the padding row, get exactly nothing.
    untouched = torch.ones(V, dtype=torch.bool)
    untouched[distinct(ids, padding_idx, V)] = False
    assert torch.equal(grad.to_dense().cpu()[untouched], torch.zeros_like(ref_grad.cpu()[untouched]))


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_without_regularization_the_gradient_is_the_lookups_sum(dtype, sparse):
    """reg_lambda = 0 (DIN's plain tables with sparse gradients): R is exactly 0 and each distinct id's gradient row
    is the sum of its lookups' rows in position order, bit for bit, whatever the table holds (a row of inf or nan
    weights included: the skipped term is 0 * w)."""
    V, D = 37, 5
    weight, frequencies = make_table(V, D, dtype=dtype)
    weight[7], weight[9] = float("inf"), float("nan")
    ids = [random_ids((40,), V, 5), random_ids((3, 11), V, 6)]
    ids[0][:4] = torch.tensor([7, 9, 0, 7])
    outs, reg, grad = run_ours(weight, ids, frequencies, 0.0, 0, sparse, "cpu")
    assert reg.item() == 0.0
    flat_ids = torch.cat([i.reshape(-1) for i in ids])
    rows = torch.cat([g.reshape(-1, D) for g in upstream(as_list(outs))])
    expected = torch.zeros(V, D, dtype=dtype).index_add_(0, flat_ids, rows)
    expected[0] = 0
    assert torch.equal(grad.to_dense(), expected)


@pytest.mark.parametrize("case", ["padding", "several", "edges", "empty", "padding-only"])
def test_sparse_grad_structure(backend, case):
    """A coalesced COO gradient with exactly one row per distinct non-padding id, ascending."""
    name, device = backend
    if name == "reference":
        pytest.skip("the reference backend's sparse gradient is F.embedding's (uncoalesced) plus the regularization")
    V, D, ids, padding_idx = cases(device)[case]
    ids = [i.to(device) for i in ids] if isinstance(ids, list) else ids.to(device)
    weight, frequencies = make_table(V, D, device=device)
    _, _, grad = run_ours(weight, ids, frequencies, 0.5, padding_idx, True, name)
    assert grad.layout == torch.sparse_coo and grad.is_coalesced()
    assert grad.shape == (V, D) and grad.dtype == weight.dtype
    expected = distinct(ids, padding_idx, V)
    assert torch.equal(grad.indices().cpu(), expected[None])
    assert grad.values().shape == (expected.numel(), D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_low_precision(backend, dtype):
    """flash-attention's rule: |ours - ref64| <= 2 |torch same dtype - ref64| + atol."""
    name, device = backend
    V, D = 211, 33
    weight64, frequencies = make_table(V, D, device=device, max_count=50)
    weight = weight64.to(dtype)
    ids = [random_ids((40, 25), V, 11, device), random_ids((40,), V, 12, device)]
    outs, reg, grad = run_ours(weight, ids, frequencies, 0.8, 3, True, name)
    ref_outs, ref_reg, ref_grad = run_reference(weight.double(), ids, frequencies, 0.8, 3)
    same_outs, same_reg, same_grad = run_reference(weight, ids, frequencies, 0.8, 3)
    for o, r in zip(outs, ref_outs):
        assert torch.equal(o.double(), r)
    assert reg.dtype == torch.float32
    assert abs(reg.double() - ref_reg) <= 2 * abs(same_reg.double() - ref_reg) + 1e-5 * ref_reg
    err = (grad.to_dense().double() - ref_grad).abs().max()
    same_err = (same_grad.double() - ref_grad).abs().max()
    assert err <= 2 * same_err + 1e-5, (float(err), float(same_err))


def test_bad_inputs(backend):
    name, device = backend
    weight, frequencies = make_table(10, 3, device=device)
    ok = torch.tensor([1, 2], device=device)

    def call(ids, freq=frequencies, **kw):
        return din_ext.ops.mba_embedding(weight, ids, freq, 0.1, backend=name, **kw)

    with pytest.raises(ValueError, match=r"ids\[1\] must be in \[0, 10\).*got 10"):
        call([ok, torch.tensor([3, 10], device=device)])
    with pytest.raises(ValueError, match=r"ids must be in \[0, 10\).*got -1"):
        call(torch.tensor([[0, -1]], device=device))
    with pytest.raises(TypeError, match=r"ids\[0\] must be int32 or int64, got torch.float32"):
        call([torch.tensor([1.0], device=device)])
    with pytest.raises(TypeError, match="ids must be a torch.Tensor or a list/tuple of them, got int"):
        call(1)
    with pytest.raises(TypeError, match=r"ids\[1\] must be a torch.Tensor, got int"):
        call([ok, 1])
    with pytest.raises(ValueError, match=r"frequencies must be a float32, float64 or int64 tensor of shape \[10\]"):
        call(ok, frequencies[:9])
    with pytest.raises(ValueError, match=r"frequencies must be a float32, float64 or int64 tensor"):
        call(ok, frequencies.half())
    with pytest.raises(ValueError, match=r"padding_idx must be in \[-10, 10\)"):
        call(ok, padding_idx=10)
    with pytest.raises(ValueError, match="reg_lambda must be >= 0"):
        din_ext.ops.mba_embedding(weight, ok, frequencies, -1.0, backend=name)
    with pytest.raises(ValueError, match="ids must be a tensor or a non-empty list"):
        call([])
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        din_ext.ops.mba_embedding(weight.long(), ok, frequencies, 0.1, backend=name)


@requires_cpp
def test_op_checks_ids_itself():
    """The C++ op validates too, for callers of torch.ops.din_ext.mba_embedding that skip the Python checks."""
    weight, frequencies = make_table(10, 3)
    with pytest.raises(RuntimeError, match=r"ids must be in \[0, 10\) \(rows of weight\), got 12 at position 2"):
        torch.ops.din_ext.mba_embedding(weight, torch.tensor([1, 2, 12]), frequencies, 0.1, -1, True)
    with pytest.raises(RuntimeError, match=r"ids must be int32 or int64"):
        torch.ops.din_ext.mba_embedding(weight, torch.tensor([1.0]), frequencies, 0.1, -1, True)
    with pytest.raises(RuntimeError, match=r"frequencies must have shape \[10\]"):
        torch.ops.din_ext.mba_embedding(weight, torch.tensor([1]), frequencies[:3], 0.1, -1, True)
    with pytest.raises(RuntimeError, match=r"padding_idx must be -1 \(none\) or in \[0, 10\)"):
        torch.ops.din_ext.mba_embedding(weight, torch.tensor([1]), frequencies, 0.1, 10, True)


# --- the module and optimizers -------------------------------------------------------------------------------------

def module_pair(backend_name, device, V=23, D=6, padding_idx=0, sparse=True, reg_lambda=0.3):
    torch.manual_seed(0)
    frequencies = torch.randint(0, 6, (V,))
    emb = din_ext.MBAEmbedding(V, D, frequencies, reg_lambda, padding_idx=padding_idx, sparse=sparse,
                               backend=backend_name, dtype=torch.float64).to(device)
    dense = torch.nn.Parameter(emb.weight.detach().clone())
    return emb, dense


def batches(device, V=23, steps=3):
    """Per step: (candidate ids [4], history ids [4, 5]) with padding (0) in the histories."""
    out = []
    for s in range(steps):
        hist = random_ids((4, 5), V, 100 + s, device)
        hist[:, 3:] = 0
        out.append((random_ids((4,), V, 200 + s, device), hist))
    return out


def step_loss(outs, seed):
    return sum((o.pow(2) * g).sum() for o, g in zip(outs, upstream(outs, seed)))


def reference_step_grad(dense, ids, emb, seed):
    outs, reg = din_ext.reference.mba_embedding(dense, list(ids), emb.frequencies, emb.reg_lambda, emb.padding_idx)
    grad, = torch.autograd.grad(step_loss(outs, seed) + reg, dense)
    return grad


@pytest.mark.parametrize("optimizer", ["SGD", "Adagrad", "SparseAdam"])
def test_optimizer_steps_match_dense_reference(backend, optimizer):
    name, device = backend
    emb, dense = module_pair(name, device)
    lr = 0.1
    opt = {"SGD": lambda p: torch.optim.SGD(p, lr=lr), "Adagrad": lambda p: torch.optim.Adagrad(p, lr=lr),
           "SparseAdam": lambda p: torch.optim.SparseAdam(p, lr=lr)}[optimizer]([emb.weight])
    state_m, state_v = torch.zeros_like(dense), torch.zeros_like(dense)
    adagrad_sum = torch.zeros_like(dense)
    for step, ids in enumerate(batches(device), start=1):
        opt.zero_grad()
        outs = emb(*ids)
        step_loss(outs, step).backward()
        opt.step()
        grad = reference_step_grad(dense, ids, emb, step)
        with torch.no_grad():  # the optimizers' update rules on the dense reference gradient
            if optimizer == "SGD":
                dense -= lr * grad
            elif optimizer == "Adagrad":
                adagrad_sum += grad * grad
                dense -= lr * grad / (adagrad_sum.sqrt() + 1e-10)
            else:  # SparseAdam: only the rows in the step's gradient move (lazy Adam)
                rows = distinct(ids, emb.padding_idx, dense.shape[0]).to(device)
                b1, b2, eps = 0.9, 0.999, 1e-8
                state_m[rows] = b1 * state_m[rows] + (1 - b1) * grad[rows]
                state_v[rows] = b2 * state_v[rows] + (1 - b2) * grad[rows] ** 2
                step_size = lr * (1 - b2 ** step) ** 0.5 / (1 - b1 ** step)
                dense[rows] -= step_size * state_m[rows] / (state_v[rows].sqrt() + eps)
        torch.testing.assert_close(emb.weight.detach(), dense.detach(), atol=1e-10, rtol=1e-10)
    assert torch.equal(emb.weight[0], torch.zeros_like(emb.weight[0]))  # the padding row never moved


def test_module(backend):
    name, device = backend
    emb, dense = module_pair(name, device, sparse=False)
    cand, hist = batches(device, steps=1)[0]
    out_c, out_h = emb(cand, hist)
    assert out_c.shape == (4, 6) and out_h.shape == (4, 5, 6)
    assert torch.equal(out_h, dense.detach()[hist])
    _, ref_reg = din_ext.reference.mba_embedding(dense, [cand, hist], emb.frequencies, emb.reg_lambda, 0)
    torch.testing.assert_close(emb.last_regularization, ref_reg.detach())
    (out_c.sum() + out_h.sum()).backward()
    assert emb.weight.grad.layout == torch.strided
    assert torch.equal(emb.weight.grad[0], torch.zeros_like(emb.weight.grad[0]))
    # One id tensor -> one tensor out; eval / no-grad lookups are plain (validated) and record no regularization.
    assert isinstance(emb(cand), torch.Tensor)
    emb.eval()
    assert torch.equal(emb(hist), dense.detach()[hist]) and emb.last_regularization is None
    with pytest.raises(ValueError, match=r"ids\[1\] must be in \[0, 23\)"):
        emb(cand, hist + 100)
    with torch.no_grad():
        emb.train()
        emb(cand)
        assert emb.last_regularization is None


def test_module_frequencies_and_casts():
    ids = [torch.tensor([[1, 2, 2], [4, 4, 4]]), torch.tensor([2, 9])]
    counts = din_ext.count_frequencies(ids, 10)
    assert counts.dtype == torch.long
    assert counts.tolist() == [0, 1, 3, 0, 3, 0, 0, 0, 0, 1]
    assert torch.equal(din_ext.MBAEmbedding.count_frequencies(ids[0], 10), torch.bincount(ids[0].reshape(-1), None, 10))
    with pytest.raises(ValueError, match=r"ids\[1\] must be in \[0, 5\)"):
        din_ext.count_frequencies(ids, 5)
    emb = din_ext.MBAEmbedding(10, 3, counts, 0.1, padding_idx=-1)
    assert emb.padding_idx == 9 and torch.equal(emb.weight[9], torch.zeros(3))
    assert emb.frequencies.min() == 1 and emb.frequencies.dtype == torch.long  # unseen ids count as 1
    emb.to(torch.bfloat16)
    assert emb.weight.dtype == torch.bfloat16 and emb.frequencies.dtype == torch.long
    f = din_ext.MBAEmbedding(10, 3, counts.double() / 2, 0.1).to(torch.float16).frequencies
    assert f.dtype == torch.float64 and f.tolist() == torch.clamp(counts.double() / 2, min=1).tolist()
    with pytest.raises(ValueError, match=r"frequencies must have shape \[10\]"):
        din_ext.MBAEmbedding(10, 3, counts[:4], 0.1)
    with pytest.raises(ValueError, match="frequencies must be finite"):
        din_ext.MBAEmbedding(10, 3, torch.full((10,), float("nan")), 0.1)


# --- op-level checks -------------------------------------------------------------------------------------------------

def op_args(device="cpu", dtype=torch.float64, sparse=False):
    weight, frequencies = make_table(19, 7, dtype=dtype, device=device)
    ids = random_ids((50,), 19, 5, device)
    ids[:4] = 3
    return (weight.requires_grad_(), ids, frequencies.double(), 0.25, 3, sparse)


@requires_cpp
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_opcheck_cpu(sparse):
    args = op_args(sparse=sparse)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor") if sparse else None
    torch.library.opcheck(torch.ops.din_ext.mba_embedding.default, args, test_utils=tests or
                          ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
    out, reg, unique_ids, offsets, order = torch.ops.din_ext.mba_embedding(*args)
    grad_out = torch.randn(out.shape, dtype=out.dtype)
    torch.library.opcheck(torch.ops.din_ext.mba_embedding_backward.default,
                          (grad_out, args[0].detach(), args[2], unique_ids, offsets, order, 0.25))


@requires_cpp
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_compile_cpu(sparse):
    """torch.compile(fullgraph=True) through the op, its fake kernel (data-dependent sizes) and its autograd."""
    weight, frequencies = make_table(20, 4)
    ids = [random_ids((5,), 20, 1), random_ids((5, 3), 20, 2)]

    def fn(w, a, b):
        (x, y), reg = din_ext.ops.mba_embedding(w, [a, b], frequencies, 0.1, padding_idx=2, sparse=sparse,
                                                backend="cpu")
        return (x.sum(-1)[:, None] * y.sum(-1)).sum(), reg

    results = []
    for f in (torch.compile(fn, fullgraph=True), fn):
        w = weight.clone().requires_grad_()
        loss, reg = f(w, *ids)
        loss.backward()
        results.append((loss, reg, w.grad.to_dense()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@requires_cpp
def test_export_cpu():
    torch.manual_seed(0)
    emb = din_ext.MBAEmbedding(20, 4, torch.randint(0, 3, (20,)), 0.1, padding_idx=2, backend="cpu")

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = emb

        def forward(self, a, b):
            x, y = self.emb(a, b)
            return x.sum(-1)[:, None] * y.sum(-1)

    ids = (random_ids((5,), 20, 1), random_ids((5, 3), 20, 2))
    program = torch.export.export(Model(), ids)
    torch.testing.assert_close(program.module()(*ids), Model()(*ids))


@requires_cpp
def test_gradcheck_cpu():
    """The data gradient (reg_lambda = 0, where the gradient is exactly the outputs') by finite differences."""
    weight, ids, frequencies, _, _, _ = op_args()
    weight = weight.detach().requires_grad_()
    # No padding_idx: like nn.Embedding's, the padding row's lookups do not propagate a gradient by design.
    torch.autograd.gradcheck(lambda w: din_ext.ops.mba_embedding(w, ids, frequencies, 0.0, sparse=False,
                                                                 backend="cpu")[0], (weight,))


@requires_cpp
def test_thread_count_reproducible():
    """Bitwise identical for 1 and 2 threads; 1.2M ids, so that the grouping passes run in parallel too."""
    V, D = 300_000, 3
    weight, frequencies = make_table(V, D, dtype=torch.float32, max_count=1000)
    ids = [random_ids((900_000,), 5000, 1), random_ids((300_000,), V, 2)]  # hot ids repeated ~180 times
    g = torch.randn(1_200_000, D, generator=torch.Generator().manual_seed(0))

    def run():
        w = weight.clone().requires_grad_()
        outs, reg = din_ext.ops.mba_embedding(w, ids, frequencies.float(), 0.01, padding_idx=7, backend="cpu")
        torch.cat(outs).mul(g).sum().backward()
        return reg, w.grad.coalesce()

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        reg1, grad1 = run()
        torch.set_num_threads(2)
        reg2, grad2 = run()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(reg1, reg2)
    assert torch.equal(grad1.indices(), grad2.indices()) and torch.equal(grad1.values(), grad2.values())
    ref = torch.zeros(V, D).index_add_(0, torch.cat(ids), g)[grad1.indices()[0]]
    torch.testing.assert_close(grad1.values(), ref + 0.01 * weight[grad1.indices()[0]] /
                               frequencies.float().clamp_min(1)[grad1.indices()[0], None], atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the choice for GPU tensors on a machine without a GPU")
def test_backend_choice_for_gpu_tensors_without_cuda_kernels():
    """backend="auto" for CUDA tensors takes the triton kernel when the cuda one is missing; explicit names stay."""
    cuda = torch.device("cuda")
    assert _backend.resolve("reference", cuda, "mba_embedding") == "reference"
    assert _backend.resolve("auto", cuda, "mba_embedding") == ("triton" if _backend.has_triton("mba_embedding")
                                                               else "reference")
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        _backend.resolve("cuda", cuda, "mba_embedding")
