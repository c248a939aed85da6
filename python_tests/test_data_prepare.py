"""din-ext prepare + the stream against the in-memory loaders: the same impressions, histories, labels, vocabularies."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("polars", reason="din_ext[data] (polars) is not installed")

from din_ext import cli  # noqa: E402
from din_ext.data import Interactions, concat, load_amazon, load_recbole, load_taobao, write_sample  # noqa: E402
from din_ext.data.prepare import parse_memory, prepare, require_polars  # noqa: E402
from din_ext.data.prepare_core import NegativeSampler  # noqa: E402
from din_ext.data.stream import load_prepared, open_prepared, prefetched  # noqa: E402


def same(a: Interactions, b: Interactions) -> None:
    for key in ("user_id", "hist_offsets", "dense", "time"):
        x, y = getattr(a, key), getattr(b, key)
        assert (x is None) == (y is None), key
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), key
    for key in ("user", "item", "hist", "labels"):
        x, y = getattr(a, key), getattr(b, key)
        assert list(x) == list(y), key
        for f in x:
            assert x[f].dtype == y[f].dtype and torch.equal(x[f], y[f]), (key, f)


def same_schema(a, b) -> None:
    for key in ("user_fields", "item_fields", "history_fields", "dense_dim", "tasks"):
        assert getattr(a, key) == getattr(b, key), key
        if isinstance(getattr(a, key), dict):
            assert list(getattr(a, key)) == list(getattr(b, key)), key  # field order: the model's layout
    assert list(a.frequencies) == list(b.frequencies)
    for f in a.frequencies:
        assert torch.equal(a.frequencies[f], b.frequencies[f]), f
    assert a.vocabularies == b.vocabularies


def rows(data: Interactions) -> list:
    """Every impression as a tuple of all its values, history included, sorted: a multiset of rows."""
    lengths = data.hist_lengths.tolist()
    hist = {f: torch.split(v[:int(data.hist_offsets[-1])], lengths) for f, v in data.hist.items()}
    out = []
    for i in range(len(data)):
        out.append((int(data.user_id[i]), int(data.time[i]), *(int(v[i]) for v in data.user.values()),
                    *(int(v[i]) for v in data.item.values()), *(float(v[i]) for v in data.labels.values()),
                    *([] if data.dense is None else data.dense[i].tolist()),
                    *(tuple(h[i].tolist()) for h in hist.values())))
    return sorted(out)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return write_sample("taobao", tmp_path_factory.mktemp("taobao"), seed=3, users=150)


OPTIONS = [{}, {"max_history": 7, "btags": ("pv", "buy")}, {"max_history": None, "behavior_rows": 2000},
           {"test_start": 1494028800 + 6 * 86400, "price": False, "pid": False}]


@pytest.mark.parametrize("options", OPTIONS, ids=["defaults", "history-btags", "all-history-rows", "split-fields"])
@pytest.mark.parametrize("shard_rows", [None, 500])
def test_taobao_prepared_equals_the_loader(raw, tmp_path, options, shard_rows):
    expected_train, expected_test, expected_schema = load_taobao(raw, **options)
    info = prepare("taobao", raw, tmp_path / "prep", shard_rows=shard_rows, log=lambda _: None, **options)
    assert (len(info["shards"]) > 3) == (shard_rows is not None)
    train, test, schema = load_prepared(tmp_path / "prep")
    same_schema(expected_schema, schema)
    same(expected_train, train)
    same(expected_test, test)
    assert info["rows"]["train"] == len(train) and info["rows"]["test"] == len(test)
    # each user's behaviours once: no more stored rows than the (kept) log has
    assert info["rows"]["sequences"] <= int(train.hist_offsets[-1]) + int(test.hist_offsets[-1])


@pytest.mark.parametrize("seed", [0, 1])
def test_the_sampler_drawing_piece_by_piece_is_sample_negatives(seed):
    from din_ext.data.build import sample_negatives

    rng = np.random.default_rng(seed)
    pair_users, pair_items = rng.integers(0, 40, 800), rng.integers(0, 60, 800)  # dense: many first draws hit
    users = np.sort(rng.integers(0, 40, 5000))
    pool = np.unique(rng.integers(0, 60, 50))
    expected = sample_negatives(users, pool, pair_users, pair_items, np.random.default_rng(seed + 10))
    sampler, out, done = NegativeSampler(pool, seed + 10), [], 0
    for size in (1, 0, 999, 2500, 1500):  # pieces of the sequence, in order, as buckets draw them
        drawn = sampler.draw(size)
        bad = sampler.forbidden(users[done:done + size], drawn, pair_users, pair_items)
        sampler.reject(done + np.flatnonzero(bad), users[done:done + size][bad])
        out.append(drawn)
        done += size
    out = np.concatenate(out)
    fixed = sampler.resolve(lambda wanted: (pair_users[np.isin(pair_users, wanted)],
                                            pair_items[np.isin(pair_users, wanted)]))
    assert len(fixed) > 100
    out[list(fixed)] = list(fixed.values())
    assert np.array_equal(out, expected)


def drawn_again(monkeypatch) -> list:
    """The number of negatives each preparation had to draw again (their first draw hit an item of their user)."""
    counts, resolve = [], NegativeSampler.resolve

    def counted(self, pairs_of):
        fixed = resolve(self, pairs_of)
        counts.append(len(fixed))
        return fixed

    monkeypatch.setattr(NegativeSampler, "resolve", counted)
    return counts


def prepared_equals_loaded(loader, raw, out, options, shard_rows) -> dict:
    expected_train, expected_test, expected_schema = loader(raw, **options)
    info = prepare(loader.__name__.removeprefix("load_"), raw, out, shard_rows=shard_rows, log=lambda _: None,
                   **options)
    train, test, schema = load_prepared(out)
    same_schema(expected_schema, schema)
    same(expected_train, train)
    same(expected_test, test)
    assert info["rows"]["train"] == len(train) and info["rows"]["test"] == len(test)
    return info


# negatives: the preparers draw them in the loaders' order from the same seeded Generator, so equality is exact
@pytest.mark.parametrize("options", [{}, {"max_history": 3, "seed": 5, "user_feature": False},
                                     {"max_history": None}], ids=["defaults", "history-seed-nouser", "all-history"])
@pytest.mark.parametrize("shard_rows", [None, 200])
def test_amazon_prepared_equals_the_loader(tmp_path_factory, tmp_path, monkeypatch, options, shard_rows):
    raw = write_sample("amazon", tmp_path_factory.mktemp("amazon"), seed=3, users=150, compress=True)
    again = drawn_again(monkeypatch)
    info = prepared_equals_loaded(load_amazon, raw, tmp_path / "prep", options, shard_rows)
    assert (len(info["shards"]) > 3) == (shard_rows is not None)
    assert again and again[0] > 0  # the later rounds of the sampling ran, and agree


RECBOLE = [{}, {"label": "implicit", "negatives": 2, "seed": 4},
           {"split_by": "leave_last_out", "history": "all", "max_history": 5},
           {"label": "implicit", "split_by": "leave_last_out", "time_field": "none", "max_history": None,
            "user_feature": False, "item_features": ["release_year", "class"], "user_features": ["age", "gender"]}]


@pytest.mark.parametrize("options", RECBOLE, ids=["rating-time", "implicit-2", "last-out-all", "implicit-no-time"])
def test_recbole_prepared_equals_the_loader(tmp_path_factory, tmp_path, monkeypatch, options):
    raw = write_sample("recbole", tmp_path_factory.mktemp("raw") / "ml", seed=3, users=120)
    again = drawn_again(monkeypatch)
    info = prepared_equals_loaded(load_recbole, raw, tmp_path / "prep", options, 300)
    assert len(info["shards"]) > 3
    if options.get("label") == "implicit":
        assert again and again[0] > 0


def test_malformed_amazon_and_recbole_files_name_the_file(tmp_path):
    amazon = write_sample("amazon", tmp_path / "amazon", seed=1, users=20)
    with open(amazon / "reviews_Electronics_5.json", "a") as f:
        f.write("{'reviewerID': 'A1', 'asin': 'B1', 'unixReviewTime': 5}\n")
    with pytest.raises(ValueError, match="reviews_Electronics_5.json"):
        prepare("amazon", amazon, tmp_path / "p1", log=lambda _: None)
    (amazon / "reviews_Electronics_5.json").write_text('{"reviewerID": "A1", "asin": "B1", "unixReviewTime": 5}\n'
                                                       '{"reviewerID": "A1", "unixReviewTime": 6}\n')
    with pytest.raises(ValueError, match=r"reviews_Electronics_5.json, line 2: missing field 'asin'"):
        prepare("amazon", amazon, tmp_path / "p2", log=lambda _: None)
    recbole = write_sample("recbole", tmp_path / "ml", seed=1, users=20)
    with open(recbole / "ml.inter", "a") as f:
        f.write("7\t3\t\t880000000\n")
    with pytest.raises(ValueError, match=r"ml.inter, line \d+: column 'rating': missing or not a number"):
        prepare("recbole", recbole, tmp_path / "p3", log=lambda _: None)
    with pytest.raises(ValueError, match="split_by must be"):
        prepare("recbole", recbole, tmp_path / "p4", split_by="random", log=lambda _: None)


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "p"
    prepare("taobao", raw, out, shard_rows=600, log=lambda _: None)
    return out


def test_stream_yields_the_loaders_rows_shuffled_across_shards_and_seeded(raw, prepared):
    expected_train, expected_test, _ = load_taobao(raw)
    train, test, _ = open_prepared(prepared, shuffle_shards=2, prefetch=3)
    assert len(train) == len(expected_train) and len(test) == len(expected_test)
    plain = list(train.batches(64))
    assert all(len(b) == 64 for b in plain[:-1]) and 0 < len(plain[-1]) <= 64
    assert rows(concat(plain)) == rows(expected_train)
    assert rows(concat(test.batches(100))) == rows(expected_test)
    shuffled = list(train.batches(64, shuffle=True, seed=4))
    assert rows(concat(shuffled)) == rows(expected_train)
    assert not torch.equal(concat(shuffled).time, concat(plain).time)
    again = concat(train.batches(64, shuffle=True, seed=4))
    same(concat(shuffled), again)
    other = concat(train.batches(64, shuffle=True, seed=5))
    assert not torch.equal(other.time, again.time)
    for batch in shuffled[:3]:  # a shuffled batch mixes the users of several shards
        assert len(set((batch.user_id % len(json.loads((prepared / "schema.json").read_text())["shards"]))
                       .tolist())) > 1


def test_stream_cuts_histories(raw, prepared):
    expected_train, _, _ = load_taobao(raw)
    train, _, _ = open_prepared(prepared, max_history=3, prefetch=0)
    assert rows(concat(train.batches(50))) == rows(expected_train.truncate_history(3))


@pytest.mark.parametrize("world", [2, 3, 7])
@pytest.mark.parametrize("drop_last", [False, True])
def test_each_rank_streams_its_slice_of_every_global_batch(prepared, world, drop_last):
    whole = list(open_prepared(prepared, prefetch=0)[0].batches(40 * world, shuffle=True, seed=7,
                                                                 drop_last=drop_last))
    splits = [open_prepared(prepared, rank=r, world_size=world)[0] for r in range(world)]
    ranks = [list(s.batches(40, shuffle=True, seed=7, drop_last=drop_last)) for s in splits]
    assert {len(r) for r in ranks} == {len(whole)}  # every rank takes as many steps (DDP would hang otherwise)
    for step, batch in enumerate(whole):
        parts = [r[step] for r in ranks]
        assert len({len(p) for p in parts}) == 1  # equal batch sizes at each step
        glued = concat(parts)
        if step < len(whole) - 1 or len(batch) == 40 * world:
            same(batch, glued)  # the ranks' slices, in rank order, are the global batch: disjoint, same order
        else:  # the last, short global batch: padded to a multiple of world_size with its own first rows
            assert len(glued) == -(-len(batch) // world) * world
            same(batch, glued.take(torch.arange(len(batch))))
            same(batch.take(torch.arange(len(glued) - len(batch))), glued.take(torch.arange(len(batch), len(glued))))
    if not drop_last:
        assert [sum(len(b) for b in r) for r in ranks] == [len(s) for s in splits]
    with pytest.raises(ValueError, match="rank"):
        open_prepared(prepared, rank=world, world_size=world)


def test_the_first_batch_reads_one_window_of_shards(prepared, monkeypatch):
    from din_ext.data import stream

    reads, read = [], stream._Block.read.__func__

    def counted(cls, *args, **kwargs):
        reads.append(args[0])
        return read(cls, *args, **kwargs)

    monkeypatch.setattr(stream._Block, "read", classmethod(counted))
    train, _, _ = open_prepared(prepared, shuffle_shards=2, prefetch=0)
    assert not reads  # opening reads schema.json and the vocabularies only
    next(iter(train.batches(16, shuffle=True)))
    assert len(reads) == 2 < len(json.loads((prepared / "schema.json").read_text())["shards"])


def test_prefetch_runs_ahead_and_reraises():
    def produce():
        yield 1
        yield 2
        raise RuntimeError("bad shard")

    items = prefetched(produce, 2)
    assert next(items) == 1 and next(items) == 2
    with pytest.raises(RuntimeError, match="bad shard"):
        next(items)
    early = prefetched(lambda: iter(range(10 ** 6)), 4)
    assert next(early) == 0
    early.close()  # stops the thread


def test_cli_prepare_train_evaluate_predict(raw, tmp_path, capsys):
    out = tmp_path / "prep"
    assert cli.main(["prepare", "--data", "taobao", "--path", str(raw), "--out", str(out), "--shard-rows",
                     "800"]) == 0
    assert "din-ext train --data prepared" in capsys.readouterr().out
    run = tmp_path / "run"
    common = ["--threads", "1"]
    assert cli.main(["train", "--data", "prepared", "--path", str(out), "--epochs", "1", "--embed-dim", "4",
                     "--no-progress", "--out", str(run), *common]) == 0
    final = json.loads((run / "metrics.json").read_text())
    _, expected_test, _ = load_taobao(raw)
    assert final["rows"] == len(expected_test) and 0 <= final["auc"] <= 1
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", str(run / "last.pt"), *common]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == len(expected_test)
    assert cli.main(["predict", "--checkpoint", str(run / "last.pt"), "--output", str(tmp_path / "p.csv"),
                     *common]) == 0
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert len(lines) == len(expected_test) + 1 and lines[0] == "row,user_id,p_click,click"
    assert cli.main(["prepare", "--data", "taobao", "--path", str(raw), "--out", str(out)]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    assert cli.main(["prepare", "--data", "amazon", "--path", str(raw), "--out", str(tmp_path / "x")]) == 2
    assert "amazon reviews" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["amazon", "recbole"])
def test_cli_prepares_amazon_and_recbole(tmp_path, capsys, name):
    raw = write_sample(name, tmp_path / "ml", seed=2, users=30)
    out = tmp_path / "prep"
    assert cli.main(["prepare", "--data", name, "--path", str(raw), "--out", str(out), "--max-history", "4"]) == 0
    assert "din-ext train --data prepared" in capsys.readouterr().out
    expected_train, _, _ = (load_amazon if name == "amazon" else load_recbole)(raw, max_history=4)
    same(expected_train, load_prepared(out)[0])


def test_memory_sizes_and_the_missing_extra(monkeypatch):
    assert parse_memory("2G") == 2 << 30 and parse_memory("1500MiB") == 1500 << 20 and parse_memory(10 ** 9) == 10 ** 9
    for bad in ("lots", "10M", -1):
        with pytest.raises(ValueError, match="memory_limit"):
            parse_memory(bad)
    monkeypatch.setitem(sys.modules, "polars", None)
    with pytest.raises(ImportError, match=r"din_ext\[data\]"):
        require_polars()


def test_malformed_raw_files_name_the_file(raw, tmp_path):
    bad = write_sample("taobao", tmp_path / "bad", seed=1, users=20)
    with open(bad / "raw_sample.csv", "a") as f:
        f.write("7,1494100000,3,430548_1007,0,2\n")
    with pytest.raises(ValueError, match=r"raw_sample.csv, line \d+: column 'clk'"):
        prepare("taobao", bad, tmp_path / "p1", log=lambda _: None)
    with open(bad / "behavior_log.csv", "a") as f:
        f.write("7,notatime,pv,3,4\n")
    (bad / "raw_sample.csv").write_text("user,time_stamp,adgroup_id,pid,nonclk,clk\n7,1494100000,3,p,1,0\n"
                                        "7,1494600000,3,p,1,0\n")
    with pytest.raises(ValueError, match="behavior_log.csv"):
        prepare("taobao", bad, tmp_path / "p2", log=lambda _: None)
    assert not np.any([p.name == "_scratch" for p in (tmp_path / "p2").iterdir()])


def test_more_buckets_than_users_leaves_no_empty_shard(tmp_path):
    raw = write_sample("taobao", tmp_path / "raw", seed=2, users=12)
    info = prepare("taobao", raw, tmp_path / "prep", shard_rows=5, log=lambda _: None)
    assert len(info["shards"]) <= 12 and all(s["train"] + s["test"] for s in info["shards"])
    expected_train, expected_test, expected_schema = load_taobao(raw)
    train, test, schema = load_prepared(tmp_path / "prep")
    same_schema(expected_schema, schema), same(expected_train, train), same(expected_test, test)
