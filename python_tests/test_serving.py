"""Serving DIN: whole-model torch.compile (train and eval), torch.export with dynamic batch, history total and
candidates, the AOTInductor package, din_ext.serving.DINPredictor and ``din-ext export`` / ``predict``; every path
against the eager model on real batches with empty histories, L=1 and OOV ids."""

from __future__ import annotations

import copy

import pytest
import torch

import din_ext
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
