"""Serving DIN: whole-model torch.compile (train and eval), torch.export with dynamic batch, history total and
candidates, the AOTInductor package, din_ext.serving.DINPredictor and ``din-ext export`` / ``predict``; every path
against the eager model on real batches with empty histories, L=1 and OOV ids."""

from __future__ import annotations

import copy

import pytest
import torch

from din_ext.data.core import Interactions, iterate_batches
from din_ext.model import DIN, schema_from_dict, schema_to_dict
from conftest import requires_cpp

# The tiny synthetic data and the one-thread fixture of the model tests.
from test_model import TINY, one_thread, tiny  # noqa: E402,F401


def edge_batch(data: Interactions, size: int = 24) -> Interactions:
    """A real batch whose rows 0 and 3 have empty histories, row 1 one behaviour, row 2 OOV ids (row 0) in every
    column (candidate, history, profile)."""
    batch = next(iter(iterate_batches(data, size)))
    lengths = batch.hist_lengths.clone()
    lengths[[0, 3]] = 0
    lengths[1] = min(1, int(lengths[1]))
    keep = torch.arange(batch.hist_offsets[-1]) < (batch.hist_offsets[:-1] + lengths).repeat_interleave(
        batch.hist_lengths)
    offsets = torch.zeros_like(batch.hist_offsets)
    torch.cumsum(lengths, 0, out=offsets[1:])
    hist = {k: v[keep].clone() for k, v in batch.hist.items()}
    user = {k: v.clone() for k, v in batch.user.items()}
    item = {k: v.clone() for k, v in batch.item.items()}
    for col in (*user.values(), *item.values()):
        col[2] = 0
    for col in hist.values():
        col[offsets[2]:offsets[3]] = 0
    return Interactions(batch.user_id, user, item, offsets, hist, batch.labels, batch.dense, batch.time)


def multi_candidate(batch: Interactions, count: int = 5) -> Interactions:
    """The batch with ``count`` candidates per row (item columns (S, C)): the row's own and others', OOV among them."""
    rows = len(batch)
    pick = (torch.arange(rows)[:, None] + torch.arange(count)[None, :] * 7) % rows
    item = {k: v[pick] for k, v in batch.item.items()}
    for col in item.values():
        col[1, -1] = 0
    return Interactions(batch.user_id, batch.user, item, batch.hist_offsets, batch.hist, batch.labels, batch.dense,
                        batch.time)


def small_model(schema, seed=0, **options) -> DIN:
    torch.manual_seed(seed)
    model = DIN(schema, embed_dim=8, attention_hidden=(16, 8), tower_hidden=(16,), **options)
    for table in model.embeddings.values():  # larger embeddings than the init, so the attention matters
        with torch.no_grad():
            table.weight[1:].normal_(0, 0.5)
    return model


def warm_statistics(model: DIN, data: Interactions) -> DIN:
    """A few training forwards, so the Dice running statistics are not the initial ones."""
    with torch.no_grad():
        for batch in list(iterate_batches(data, 64))[:3]:
            model.train()(batch)
    return model.eval()


# -- 1. whole-model torch.compile -------------------------------------------------------------------------------


@requires_cpp
@pytest.mark.parametrize("candidates", [None, 5])
def test_compile_fullgraph_eval(tiny, candidates):
    train, _, schema = tiny
    model = warm_statistics(small_model(schema), train)
    batch = edge_batch(train)
    if candidates:
        batch = multi_candidate(batch, candidates)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(batch), model(batch), rtol=1e-5, atol=1e-5)


@requires_cpp
@pytest.mark.parametrize("candidates", [None, 3])
def test_compile_fullgraph_train(tiny, candidates):
    """Training mode: logits, every gradient and the Dice running statistics as eager's."""
    train, _, schema = tiny
    eager = small_model(schema).train()
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True)
    batch = edge_batch(train)
    if candidates:
        batch = multi_candidate(batch, candidates)
    out_e, out_c = eager(batch), compiled(batch)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    out_e.square().sum().backward()
    out_c.square().sum().backward()
    for (name, p), q in zip(eager.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, b), c in zip(eager.named_buffers(), twin.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=name)


def test_schema_vocabularies_roundtrip_weights_only(tmp_path, tiny):
    _, _, schema = tiny
    schema = copy.deepcopy(schema)
    schema.vocabularies = {"item": [None, *range(100, 100 + schema.item_fields["item"] - 1)]}
    first_user = next(iter(schema.user_fields))
    schema.vocabularies[first_user] = [None, *(f"u{i}" for i in range(1, schema.user_fields[first_user]))]
    path = tmp_path / "s.pt"
    torch.save(schema_to_dict(schema), path)
    back = schema_from_dict(torch.load(path, weights_only=True))
    assert back.vocabularies == schema.vocabularies
    old = schema_to_dict(schema)
    del old["vocabularies"]  # a checkpoint from before vocabularies
    assert schema_from_dict(old).vocabularies == {}
    with pytest.raises(ValueError, match="vocabularies"):
        type(schema)(schema.user_fields, schema.item_fields, schema.history_fields, vocabularies={"item": [None]})


# -- 2. torch.export --------------------------------------------------------------------------------------------


def serving_columns(batch: Interactions, schema) -> tuple:
    """An Interactions batch as the five tensors of din_ext.export.ServingDIN (items (S, C, I))."""
    items = torch.stack([batch.item[f] for f in schema.item_fields], -1)
    return (torch.stack([batch.user[f] for f in schema.user_fields], -1), items if items.dim() == 3 else items[:, None],
            batch.hist_offsets, torch.stack([batch.hist[f] for f in schema.history_fields], -1), batch.dense)


def eager_probabilities(model: DIN, batch: Interactions) -> torch.Tensor:
    with torch.no_grad():
        p = torch.sigmoid(model.eval()(batch))
    return p if p.dim() == 3 else p[:, None]


def edge_batches(data: Interactions):
    """The edge batch with 1 and 5 candidates, and one user with one candidate and an empty history."""
    batch = edge_batch(data)
    lonely = batch.take(torch.tensor([0]))
    return [batch, multi_candidate(batch, 5), lonely]


@requires_cpp
def test_export_dynamic_matches_eager(tiny):
    from din_ext.export import export

    train, _, schema = tiny
    model = warm_statistics(small_model(schema), train)
    program = export(model)
    assert any("din_ext.local_activation_attention" in str(n.target) for n in program.graph.nodes)
    for batch in edge_batches(train):
        torch.testing.assert_close(program.module()(*serving_columns(batch, schema)), eager_probabilities(model, batch),
                                   rtol=1e-5, atol=1e-5)


# -- 3, 4. the package, the predictor, din-ext export / predict ---------------------------------------------------

SPEC = {"data": "synthetic", "path": None, "seed": 0, "max_history": 50, "synthetic_users": None,
        "synthetic_conversion": False}


def with_vocabularies(schema):
    """The schema with vocabularies: item ids 1000 + row (ints), every other field 'f<row>' (strings)."""
    schema = copy.deepcopy(schema)
    fields = {**schema.user_fields, **schema.item_fields}
    schema.vocabularies = {f: [None, *((1000 + r) if f == "item" else f"{f}{r}" for r in range(1, n))]
                           for f, n in fields.items()}
    return schema


def exported_by_cli(data, folder, fmt: str):
    """(model, checkpoint path, export path): a warmed model with vocabularies saved as best.pt in ``folder`` and
    exported by ``din-ext export --format fmt``."""
    from din_ext import cli

    train, _, schema = data
    model = warm_statistics(small_model(with_vocabularies(schema)), train)
    checkpoint, path = str(folder / "best.pt"), str(folder / f"model.{fmt}")
    torch.save(model.checkpoint(data=SPEC), checkpoint)
    assert cli.main(["export", "--checkpoint", checkpoint, "--format", fmt, "--out", path]) == 0
    return model, checkpoint, path


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    """(model, checkpoint path, package path): the package written by ``din-ext export`` (the one AOTInductor
    compile of this module)."""
    return exported_by_cli(tiny, tmp_path_factory.mktemp("serve"), "pt2")


@requires_cpp
def test_package_loads_and_matches_eager(served, tiny):
    model, _, package = served
    runner = torch._inductor.aoti_load_package(package)
    for batch in edge_batches(tiny[0]):
        torch.testing.assert_close(runner(*serving_columns(batch, model.schema)), eager_probabilities(model, batch),
                                   rtol=1e-5, atol=1e-5)


def raw_requests(batch: Interactions, schema, candidates: int = 1):
    """The batch's rows as requests with raw ids (per schema.vocabularies), with ``candidates`` candidates each."""
    vocab = schema.vocabularies
    requests = []
    for b in range(len(batch)):
        lo, hi = batch.hist_offsets[b].item(), batch.hist_offsets[b + 1].item()
        pick = [(b + 7 * c) % len(batch) for c in range(candidates)]
        requests.append({"user": {f: vocab[f][batch.user[f][b].item()] for f in schema.user_fields},
                         "history": {f: [vocab[f][r] for r in batch.hist[f][lo:hi].tolist()]
                                     for f in schema.history_fields},
                         "candidates": {f: [vocab[f][batch.item[f][p].item()] for p in pick]
                                        for f in schema.item_fields},
                         "dense": batch.dense[b].tolist()})
    return requests


@requires_cpp
@pytest.mark.parametrize("kind", ["pt", "pt2"])
def test_predictor_matches_eager(served, tiny, kind):
    from din_ext.serving import DINPredictor

    model, checkpoint, package = served
    predictor = DINPredictor.load(checkpoint if kind == "pt" else package)
    batch = edge_batch(tiny[0])
    requests = raw_requests(batch, model.schema, candidates=3)
    requests[4]["candidates"]["item"][1] = 987654321  # unseen: OOV, as row 0
    requests[5]["history"]["item"] = [None] * len(requests[5]["history"]["item"])  # None: OOV
    expected = eager_probabilities(model, multi_candidate_of(batch, 3, oov=((4, 1),), oov_history=5))
    got = predictor.predict(requests)
    for b, result in enumerate(got):
        for k, task in enumerate(model.tasks):
            torch.testing.assert_close(torch.tensor(result[task]), expected[b, :, k], rtol=1e-5, atol=1e-5)
    ragged = predictor.predict([requests[0], {**requests[1], "candidates": {
        f: v[:1] for f, v in requests[1]["candidates"].items()}}])  # lists of different lengths
    assert [len(r[model.tasks[0]]) for r in ragged] == [3, 1]
    torch.testing.assert_close(torch.tensor(ragged[1][model.tasks[0]]), expected[1, :1, 0], rtol=1e-5, atol=1e-5)


def multi_candidate_of(batch: Interactions, count: int, oov=(), oov_history=None) -> Interactions:
    """raw_requests' candidates as item columns (S, C), with the candidates ``oov`` (row, c) of field 'item' and
    the history of row ``oov_history`` (field 'item') at row 0."""
    pick = torch.tensor([[(b + 7 * c) % len(batch) for c in range(count)] for b in range(len(batch))])
    item = {k: v[pick].clone() for k, v in batch.item.items()}
    for b, c in oov:
        item["item"][b, c] = 0
    hist = {k: v.clone() for k, v in batch.hist.items()}
    if oov_history is not None:
        hist["item"][batch.hist_offsets[oov_history]:batch.hist_offsets[oov_history + 1]] = 0
    return Interactions(batch.user_id, batch.user, item, batch.hist_offsets, hist, batch.labels, batch.dense,
                        batch.time)


@requires_cpp
def test_predictor_rejects_malformed_requests(served, tiny):
    from din_ext.serving import DINPredictor

    model, checkpoint, _ = served
    predictor = DINPredictor.load(checkpoint)
    good = raw_requests(edge_batch(tiny[0]), model.schema)[5]
    user_field = next(iter(model.schema.user_fields))
    cases = [({**good, "candidates": {**good["candidates"], "item": []}}, "candidates"),
             ({**good, "history": {"item": good["history"]["item"]}}, "history"),
             ({**good, "user": {}}, user_field),
             ({**good, "dense": [1.0]}, "dense"),
             ({**good, "candidates": {**good["candidates"], "item": ["1001"]}}, "item"),
             ({**good, "extra": 1}, "extra")]
    for request, field in cases:
        with pytest.raises(ValueError, match=field):
            predictor.predict([request])


@requires_cpp
def test_predictor_without_vocabularies_says_reexport(tiny, tmp_path):
    from din_ext.serving import DINPredictor

    train, _, schema = tiny
    model = small_model(schema)
    path = str(tmp_path / "old.pt")
    torch.save(model.checkpoint(), path)
    predictor = DINPredictor.load(path)
    batch = edge_batch(train)
    request = {"user": {f: 1 for f in schema.user_fields}, "history": {f: [1] for f in schema.history_fields},
               "candidates": {f: [1] for f in schema.item_fields}, "dense": batch.dense[0].tolist()}
    with pytest.raises(ValueError, match="re-export from a checkpoint that has them"):
        predictor.predict([request])
    torch.testing.assert_close(predictor.predict_rows(*serving_columns(batch, schema)),  # row ids still work
                               eager_probabilities(model, batch), rtol=1e-5, atol=1e-5)


@requires_cpp
@pytest.mark.parametrize("kind", ["pt", "pt2"])
def test_predictor_threads(served, tiny, kind):
    from concurrent.futures import ThreadPoolExecutor
    from din_ext.serving import DINPredictor

    model, checkpoint, package = served
    predictor = DINPredictor.load(checkpoint if kind == "pt" else package)
    requests = raw_requests(edge_batch(tiny[0]), model.schema, candidates=2)
    alone = [predictor.predict(requests[i:i + 3]) for i in range(0, 18, 3)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda i: predictor.predict(requests[i:i + 3]), [i for i in range(0, 18, 3)] * 3))
    assert together == alone * 3


@requires_cpp
def test_cli_predict_pt_and_pt2_agree(served, tiny, tmp_path, monkeypatch, capsys):
    import csv
    import din_ext.data
    from din_ext import cli

    _, checkpoint, package = served
    train, test, schema = tiny
    monkeypatch.setattr(din_ext.data, "load_dataset", lambda name, path, **options: (train, test, schema),
                        raising=False)
    tables = []
    for name, source in (("pt", checkpoint), ("pt2", package)):
        out = str(tmp_path / f"{name}.csv")
        assert cli.main(["predict", "--checkpoint", source, "--output", out, "--threads", "1"]) == 0
        with open(out) as f:
            tables.append(list(csv.reader(f)))
    pt, pt2 = tables
    assert len(pt) == len(test) + 1 and pt[0] == pt2[0]
    for a, b in zip(pt[1:], pt2[1:]):
        assert a[:2] == b[:2] and a[-1] == b[-1] and abs(float(a[2]) - float(b[2])) <= 1e-5


@pytest.mark.parametrize("name", ["amazon", "taobao", "recbole"])
def test_every_loader_puts_its_vocabularies_in_the_checkpoint(name, tmp_path):
    """Each loader's fitted vocabularies (raw id -> row, OOV -> 0) travel in the checkpoint (weights_only), and a
    predictor maps a request's raw ids through them to the rows the loader encoded."""
    from din_ext.data import load_dataset
    from din_ext.data.samples import write_sample
    from din_ext.model import save_checkpoint
    from din_ext.serving import DINPredictor

    train, _, schema = load_dataset(name, write_sample(name, tmp_path / name))
    sizes = {**schema.user_fields, **schema.item_fields}
    assert set(schema.vocabularies) == set(sizes)
    for field, vocabulary in schema.vocabularies.items():
        assert len(vocabulary) == sizes[field] and vocabulary[0] is None, field
        assert len(set(vocabulary[1:])) == len(vocabulary) - 1, field  # one row per raw id
    torch.manual_seed(0)
    model = DIN(schema, embed_dim=4, attention_hidden=(8,), tower_hidden=(8,)).eval()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model.checkpoint())
    predictor = DINPredictor.load(str(path))
    assert predictor.schema.vocabularies == schema.vocabularies
    row = 0
    lo, hi = int(train.hist_offsets[row]), int(train.hist_offsets[row + 1])
    raw = lambda field, rows: [schema.vocabularies[field][r] for r in rows]  # noqa: E731
    request = {"user": {f: raw(f, [int(train.user[f][row])])[0] for f in schema.user_fields},
               "history": {f: raw(f, train.hist[f][lo:hi].tolist()) for f in schema.history_fields},
               "candidates": {f: raw(f, [int(train.item[f][row])]) for f in schema.item_fields}}
    if model.use_dense:
        request["dense"] = train.dense[row].tolist()
    with torch.no_grad():
        expected = torch.sigmoid(model(train.take(torch.tensor([row]))))[0]
    got = predictor.predict([request])[0]
    for t, task in enumerate(schema.tasks):
        assert got[task] == pytest.approx([float(expected[t])], abs=1e-6)
