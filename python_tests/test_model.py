"""din_ext.DIN (and BaseModel): forward against a hand-written oracle, backward, checkpoints, backends, bad input;
the synthetic generator it trains on by default."""

from __future__ import annotations

import copy

import pytest
import torch

import din_ext
from din_ext.data.core import Interactions, Schema, iterate_batches
from din_ext.data.synthetic import SyntheticConfig, generate
from din_ext.model import DIN, load_checkpoint, save_checkpoint
from conftest import requires_cpp

TINY = SyntheticConfig(num_users=40, num_items=60, num_categories=6, brands_per_category=2, max_history=12,
                       impressions_per_user=6)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes run fastest on one thread (and do not stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return generate(TINY, seed=3)


def first_batch(data: Interactions, size: int = 64) -> Interactions:
    return next(iter(iterate_batches(data, size)))


def with_empty_rows(batch: Interactions, rows=(0, 3)) -> Interactions:
    """The same impressions with the histories of ``rows`` removed (zero-length rows)."""
    keep = torch.ones(len(batch), dtype=torch.bool)
    keep[list(rows)] = False
    lengths = batch.hist_lengths * keep
    offsets = torch.zeros(len(batch) + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=offsets[1:])
    owner = torch.repeat_interleave(torch.arange(len(batch)), batch.hist_lengths)
    hist = {k: v[keep[owner]] for k, v in batch.hist.items()}
    return Interactions(batch.user_id, batch.user, batch.item, offsets, hist, batch.labels, batch.dense, batch.time)


def oracle_forward(model: DIN, batch: Interactions) -> torch.Tensor:
    """DIN's eval-mode forward written out per user with plain tensor ops (Dice with running statistics)."""
    def dice(x, act):
        p = torch.sigmoid((x - act.running_mean) / torch.sqrt(act.running_var + act.eps))
        return p * x + (1 - p) * act.alpha * x

    schema = model.schema
    emb = {f: model.embeddings[f].weight for f in model.embeddings}
    rows = []
    for b in range(len(batch)):
        lo, hi = int(batch.hist_offsets[b]), int(batch.hist_offsets[b + 1])
        user = [emb[f][batch.user[f][b]] for f in schema.user_fields]
        item = [emb[f][batch.item[f][b]] for f in schema.item_fields]
        q = torch.cat([emb[f][batch.item[f][b]] for f in schema.history_fields])
        keys = torch.cat([emb[f][batch.hist[f][lo:hi]] for f in schema.history_fields], dim=1)
        interest = torch.zeros_like(q)
        for k in keys:
            if model.pooling == "sum":
                interest = interest + k
                continue
            x = torch.cat([q, k, q - k, q * k])
            for linear, act in zip(model.attention.linears, model.attention.activations):
                x = dice(linear(x), act)
            interest = interest + model.attention.out(x) * k
        x = torch.cat(user + item + [interest] + ([batch.dense[b]] if model.use_dense else []))
        for linear, act in zip(model.tower, model.tower_activations):
            x = dice(linear(x), act)
        rows.append(model.heads(x))
    return torch.stack(rows)


def perturb_running_stats(model: DIN) -> None:
    """Non-trivial Dice running statistics and alphas, so the eval-mode oracle tests them."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, din_ext.Dice):
                module.running_mean.copy_(torch.randn(module.num_features, generator=g) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=g) + 0.5)
                module.alpha.copy_(torch.rand(module.num_features, generator=g))


@pytest.mark.parametrize("pooling", ["attention", "sum"])
def test_forward_matches_oracle_with_empty_histories(tiny, pooling):
    train, _, schema = tiny
    torch.manual_seed(0)
    model = DIN(schema, embed_dim=6, attention_hidden=(7, 5), tower_hidden=(9, 4), pooling=pooling,
                embedding_std=0.5, backend="reference").double().eval()
    perturb_running_stats(model)
    batch = with_empty_rows(first_batch(train, 13))
    batch.dense = batch.dense.double()
    assert int(batch.hist_lengths[0]) == 0 and int(batch.hist_lengths.max()) > 1
    torch.testing.assert_close(model(batch), oracle_forward(model, batch), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pooling", ["attention", "sum"])
def test_empty_history_gives_zero_interest(tiny, pooling):
    train, _, schema = tiny
    model = DIN(schema, embed_dim=4, pooling=pooling, embedding_std=1.0)
    batch = with_empty_rows(first_batch(train, 8), rows=(1, 2, 7))
    query = torch.randn(8, model.interest_dim)
    keys = torch.randn(int(batch.hist_offsets[-1]), model.interest_dim)
    interest = model.pool(query, keys, batch.hist_offsets)
    assert interest.shape == (8, model.interest_dim)
    lengths = batch.hist_lengths
    assert torch.all(interest[lengths == 0] == 0) and bool((lengths[[1, 2, 7]] == 0).all())
    assert (lengths > 0).any() and torch.all(interest[lengths > 0] != 0)


@pytest.mark.parametrize("pooling", ["attention", "sum"])
def test_training_step_reaches_every_parameter(tiny, pooling):
    train, _, schema = tiny
    torch.manual_seed(1)
    model = DIN(schema, embed_dim=8, pooling=pooling)
    batch = with_empty_rows(first_batch(train, 32))
    logits = model(batch)
    assert logits.shape == (32, 1) and torch.isfinite(logits).all()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels["click"][:, None]).backward()
    for name, p in model.named_parameters():
        if name.endswith("alpha"):  # Dice alpha starts at 0: its gradient is the negative part, usually nonzero
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for field, table in model.embeddings.items():
        assert torch.all(table.weight.grad[0] == 0), f"padding row of {field} got a gradient"
    if pooling == "attention":
        assert model.attention.activations[0].num_batches_tracked == 1  # Dice running stats updated


def test_multi_task_heads():
    train, _, schema = generate(SyntheticConfig(**{**TINY.__dict__, "conversion": True, "dense": False}), seed=1)
    assert schema.tasks == ("click", "conversion") and schema.dense_dim == 0
    model = DIN(schema, embed_dim=4)
    batch = first_batch(train, 40)
    logits = model(batch)
    assert logits.shape == (40, 2)
    grads = []
    for task in range(2):
        model.zero_grad()
        logits = model(batch)
        logits[:, task].sum().backward()
        grads.append(model.heads.weight.grad.clone())
    assert grads[0][1].abs().sum() == 0 and grads[0][0].abs().sum() > 0  # each head only sees its own loss
    assert grads[1][0].abs().sum() == 0 and grads[1][1].abs().sum() > 0


def test_per_field_embedding_widths(tiny):
    train, _, schema = tiny
    dims = {"gender": 2, "age": 3, "item": 8, "category": 4, "brand": 5}
    model = DIN(schema, embed_dim=dims, tower_hidden=(10,))
    assert model.interest_dim == 17
    assert model.attention.linears[0].in_features == 4 * 17
    assert model.tower[0].in_features == sum(dims.values()) + 17 + schema.dense_dim
    assert model(first_batch(train, 5)).shape == (5, 1)
    with pytest.raises(ValueError, match="no width for fields"):
        DIN(schema, embed_dim={"item": 8})


def test_checkpoint_round_trip_weights_only(tiny, tmp_path):
    train, _, schema = tiny
    torch.manual_seed(2)
    model = DIN(schema, embed_dim=8, activation="dice")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for batch in list(iterate_batches(train, 32, shuffle=True))[:3]:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch)[:, 0], batch.labels["click"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model.checkpoint(optimizer, epoch=3, note="x"))
    checkpoint = load_checkpoint(path)  # torch.load(weights_only=True)
    assert checkpoint["epoch"] == 3 and checkpoint["note"] == "x"
    restored = DIN.from_checkpoint(path)
    assert restored.config == model.config and "backend" not in restored.config
    assert DIN.from_checkpoint(checkpoint, backend="reference").attention.backend == "reference"
    batch = first_batch(train, 50)
    model.eval(), restored.eval()
    assert torch.equal(model(batch), restored(batch))
    assert torch.equal(restored.attention.activations[0].running_var, model.attention.activations[0].running_var)
    optimizer2 = torch.optim.Adam(restored.parameters(), lr=1e-2)
    optimizer2.load_state_dict(checkpoint["optimizer"])
    assert optimizer2.state_dict()["state"][0]["step"] == 3
    with pytest.raises(ValueError, match="not a din_ext DIN checkpoint"):
        torch.save({"state_dict": {}}, tmp_path / "other.pt")
        load_checkpoint(tmp_path / "other.pt")


def test_tower_dropout(tiny, tmp_path):
    """dropout drops tower activations in training only (eval is the dropout-free model's forward, bitwise), it
    travels in the config, and 0 (the default) leaves the config and the modules as they were."""
    train, _, schema = tiny
    batch = first_batch(train, 50)
    torch.manual_seed(5)
    plain = DIN(schema, embed_dim=8, tower_hidden=(16, 8))
    torch.manual_seed(5)
    model = DIN(schema, embed_dim=8, tower_hidden=(16, 8), dropout=0.5)
    assert "dropout" not in plain.config and plain.tower_dropout is None and model.config["dropout"] == 0.5
    model.load_state_dict(plain.state_dict())  # dropout has no state
    plain.eval(), model.eval()
    assert torch.equal(model(batch), plain(batch))
    model.train(), plain.train()
    torch.manual_seed(0)
    dropped = model(batch)
    torch.manual_seed(0)
    assert not torch.equal(dropped, plain(batch)) and torch.isfinite(dropped).all()
    save_checkpoint(tmp_path / "m.pt", model.checkpoint())
    assert DIN.from_checkpoint(tmp_path / "m.pt").tower_dropout.p == 0.5
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout must be in"):
            DIN(schema, dropout=bad)


@requires_cpp
@pytest.mark.parametrize("pooling", ["attention", "sum"])
def test_reference_and_cpu_backends_agree(tiny, pooling):
    train, _, schema = tiny
    torch.manual_seed(4)
    cpu = DIN(schema, embed_dim=6, attention_hidden=(9, 5), tower_hidden=(11, 7), pooling=pooling,
              embedding_std=0.3, backend="cpu").double()
    ref = copy.deepcopy(cpu)
    ref.backend = "reference"
    assert all(m.backend == "reference" for m in ref.modules() if isinstance(m, din_ext.Dice))
    batch = with_empty_rows(first_batch(train, 24))
    batch.dense = batch.dense.double()
    outs = []
    for model in (cpu, ref):
        logits = model(batch)
        grads = torch.autograd.grad(logits.square().sum(), list(model.parameters()))
        outs.append((logits, grads))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-10, atol=1e-12)
    for (name, _), g_cpu, g_ref in zip(cpu.named_parameters(), outs[0][1], outs[1][1]):
        torch.testing.assert_close(g_cpu, g_ref, rtol=1e-9, atol=1e-11, msg=name)
    for a, b in zip(cpu.buffers(), ref.buffers()):  # Dice running statistics updated alike
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bad_batches_name_the_column(tiny):
    train, _, schema = tiny
    model = DIN(schema, embed_dim=4)
    batch = first_batch(train, 6)
    missing = copy.copy(batch)
    missing.item = {k: v for k, v in batch.item.items() if k != "brand"}
    with pytest.raises(ValueError, match=r"batch.item has no column 'brand'"):
        model(missing)
    out_of_range = copy.copy(batch)
    out_of_range.hist = {**batch.hist, "category": batch.hist["category"].clone()}
    out_of_range.hist["category"][0] = schema.item_fields["category"]
    with pytest.raises(ValueError, match=r"batch.hist\['category'\] has ids outside"):
        model(out_of_range)
    wrong_dtype = copy.copy(batch)
    wrong_dtype.user = {**batch.user, "age": batch.user["age"].int()}
    with pytest.raises(ValueError, match=r"batch.user\['age'\] must be int64"):
        model(wrong_dtype)
    no_dense = copy.copy(batch)
    no_dense.dense = None
    with pytest.raises(ValueError, match="batch.dense must be float"):
        model(no_dense)
    with pytest.raises(ValueError, match="empty"):
        model(batch.take(torch.zeros(0, dtype=torch.long)))
    with pytest.raises(TypeError, match="Interactions"):
        model({"item": batch.item})


def test_bad_constructor_arguments(tiny):
    schema = tiny[2]
    with pytest.raises(ValueError, match="pooling"):
        DIN(schema, pooling="max")
    with pytest.raises(ValueError, match="activation"):
        DIN(schema, activation="tanh")
    with pytest.raises(ValueError, match="hidden widths"):
        DIN(schema, tower_hidden=(0,))
    with pytest.raises(ValueError, match="embed_dim"):
        DIN(schema, embed_dim=0)
    with pytest.raises(ValueError, match="history_fields is empty"):
        DIN(Schema(user_fields={"u": 3}, item_fields={"i": 5}, history_fields=()))
    with pytest.raises(TypeError, match="Schema"):
        DIN({"item_fields": {}})
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="mba_lambda must be finite and >= 0"):
            DIN(schema, mba_lambda=bad)


def test_mba_tables(tiny):
    train, _, schema = tiny
    if not hasattr(din_ext, "MBAEmbedding"):
        with pytest.raises(RuntimeError, match="MBAEmbedding"):
            DIN(schema, embed_dim=4, mba_lambda=0.1)
        return
    model = DIN(schema, embed_dim=4, mba_lambda=0.1)
    assert all(isinstance(t, din_ext.MBAEmbedding) for t in model.embeddings.values())
    batch = first_batch(train, 16)
    model(batch).sum().backward()
    assert model.embeddings["item"].weight.grad is not None
    restored = DIN.from_config(model.config)
    restored.load_state_dict(model.state_dict())
    model.eval(), restored.eval()
    assert torch.equal(model(batch), restored(batch))


def test_synthetic_is_seeded_split_by_time_and_valid():
    a_train, a_test, schema = generate(TINY, seed=7)
    b_train, b_test, _ = generate(TINY, seed=7)
    c_train, _, _ = generate(TINY, seed=8)
    assert torch.equal(a_train.hist["item"], b_train.hist["item"]) and torch.equal(a_test.labels["click"],
                                                                                   b_test.labels["click"])
    assert not torch.equal(a_train.item["item"][:50], c_train.item["item"][:50])
    assert a_train.time.max() < a_test.time.min()
    assert abs(len(a_test) / (len(a_train) + len(a_test)) - TINY.test_fraction) < 0.02
    a_train.validate(schema), a_test.validate(schema)
    assert schema.history_fields == ("item", "category", "brand") and schema.dense_dim == 2
    assert int(schema.frequencies["item"].sum()) == len(a_train) + int(a_train.hist_offsets[-1])
    assert int(a_train.hist_lengths.min()) == 0  # impressions before the first behaviour exist


def test_synthetic_clicks_follow_related_history():
    train, _, _ = generate(SyntheticConfig(num_users=600), seed=0)
    owner = torch.repeat_interleave(torch.arange(len(train)), train.hist_lengths)
    same = torch.bincount(owner, weights=(train.hist["category"] == train.item["category"][owner]).double(),
                          minlength=len(train))
    click = train.labels["click"].double()
    low, high = click[same == 0].mean(), click[same >= 3].mean()
    assert high > low + 0.25, (low, high)  # the candidate-related part of the history drives clicks
