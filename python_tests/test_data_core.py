"""The common data form: jagged gathers, truncation, concatenation, batching and schema validation."""

import pytest
import torch

from din_ext.data import Interactions, Schema, concat, iterate_batches


def _data(rows=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 9, (rows,), generator=g)
    lengths[0] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    total = int(offsets[-1])
    schema = Schema({"age": 7}, {"item": 50, "cate": 6}, ("item", "cate"), dense_dim=2, tasks=("click", "buy"))
    data = Interactions(
        user_id=torch.arange(rows) // 3,
        user={"age": torch.randint(0, 7, (rows,), generator=g)},
        item={"item": torch.randint(0, 50, (rows,), generator=g), "cate": torch.randint(0, 6, (rows,), generator=g)},
        hist_offsets=offsets,
        hist={"item": torch.randint(0, 50, (total,), generator=g), "cate": torch.randint(0, 6, (total,), generator=g)},
        labels={"click": torch.randint(0, 2, (rows,), generator=g).float(),
                "buy": torch.randint(0, 2, (rows,), generator=g).float()},
        dense=torch.randn(rows, 2, generator=g),
        time=torch.arange(rows),
    )
    return data.validate(schema), schema


def _history(data, row):
    lo, hi = int(data.hist_offsets[row]), int(data.hist_offsets[row + 1])
    return data.hist["item"][lo:hi].tolist(), data.hist["cate"][lo:hi].tolist()


def test_take_gathers_rows_and_histories():
    data, schema = _data()
    index = torch.tensor([5, 0, 36, 5, 12])
    part = data.take(index).validate(schema)
    assert part.hist_offsets[0] == 0 and len(part) == 5
    for new, old in enumerate(index.tolist()):
        assert _history(part, new) == _history(data, old)
        assert part.item["item"][new] == data.item["item"][old]
        assert torch.equal(part.dense[new], data.dense[old])
        assert part.labels["buy"][new] == data.labels["buy"][old]


def test_truncate_history_keeps_most_recent():
    data, schema = _data()
    short = data.truncate_history(3).validate(schema)
    for row in range(len(data)):
        items, cates = _history(data, row)
        assert _history(short, row) == (items[-3:], cates[-3:])


def test_concat_is_inverse_of_split():
    data, schema = _data()
    parts = [data.take(torch.arange(0, 10)), data.take(torch.arange(10, 10)), data.take(torch.arange(10, 37))]
    whole = concat(parts).validate(schema)
    for row in range(len(data)):
        assert _history(whole, row) == _history(data, row)
    assert torch.equal(whole.user_id, data.user_id)


@pytest.mark.parametrize("shuffle,bucket", [(False, False), (True, False), (True, True), (False, True)])
def test_iterate_batches_covers_every_row_once(shuffle, bucket):
    data, schema = _data(rows=301)
    seen = []
    for batch in iterate_batches(data, 16, shuffle=shuffle, bucket=bucket, seed=3):
        batch.validate(schema)
        assert 0 < len(batch) <= 16
        seen += batch.time.tolist()
        if bucket:  # sorted by history length within the batch
            lengths = batch.hist_lengths
            assert bool((lengths[1:] >= lengths[:-1]).all())
    assert sorted(seen) == list(range(301))
    if not shuffle and not bucket:
        assert seen == list(range(301))


def test_bucketing_reduces_padding():
    data, _ = _data(rows=1024)
    def waste(bucket):
        return sum(int(b.hist_lengths.max()) * len(b) - int(b.hist_lengths.sum())
                   for b in iterate_batches(data, 32, shuffle=True, bucket=bucket, seed=1))
    assert waste(True) < waste(False) / 2


def test_drop_last_and_bad_batch_size():
    data, _ = _data(rows=37)
    assert [len(b) for b in iterate_batches(data, 16, drop_last=True)] == [16, 16]
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_batches(data, 0))


def test_validate_names_the_bad_column():
    data, schema = _data()
    bad = data.take(torch.arange(len(data)))
    bad.item["cate"][3] = 6
    with pytest.raises(ValueError, match=r"item\['cate'\]"):
        bad.validate(schema)
    bad = data.take(torch.arange(len(data)))
    bad.hist_offsets[2] = bad.hist_offsets[1] - 1
    with pytest.raises(ValueError, match="hist_offsets"):
        bad.validate(schema)
    with pytest.raises(ValueError, match="history_fields"):
        Schema({}, {"item": 3}, ("shop",))
    bad = data.take(torch.arange(len(data)))
    del bad.labels["buy"]
    with pytest.raises(ValueError, match="labels"):
        bad.validate(schema)
