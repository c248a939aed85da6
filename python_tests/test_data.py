"""Data: vocabularies, readers, the Amazon / Taobao / RecBole loaders on hand-checked fixtures, batching."""

from __future__ import annotations

import gzip
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from din_ext.data import (LOADERS, Interactions, Schema, Vocabulary, count_frequencies, iterate_batches,
                          load_amazon, load_dataset, load_recbole, load_taobao, register_loader)
from din_ext.data.amazon import read_categories
from din_ext.data.build import histories_before, jagged, sample_negatives
from din_ext.data.readers import read_columns
from din_ext.data.samples import write_sample
from din_ext.data.vocab import intern_strings

T0 = 1494028800  # 2017-05-06 00:00 UTC
DAY = 86400


def write(path: Path, text: str, compress: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(str(path) + ".gz", "wt", encoding="utf-8") as f:
            f.write(text)
        return Path(str(path) + ".gz")
    path.write_text(text, encoding="utf-8")
    return path


def check(actual: torch.Tensor, expected) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert torch.equal(actual, expected), f"{actual.tolist()} != {expected.tolist()}"


def hist_rows(data: Interactions, field: str):
    """Each row's history of ``field`` as a Python list."""
    off = data.hist_offsets.tolist()
    values = data.hist[field].tolist()
    return [values[off[i]:off[i + 1]] for i in range(len(data))]


# ----------------------------------------------------------------------------------------------- vocabulary


def test_vocabulary_maps_sorted_training_ids_and_sends_the_rest_to_oov():
    vocab = Vocabulary.build(np.array(["b", "a", "c", "a"]), ["c", ""], missing="")
    assert len(vocab) == 4
    check(vocab.encode(np.array(["a", "b", "c", "zz", ""])), [1, 2, 3, 0, 0])
    assert vocab.decode(torch.tensor([0, 3, 1])).tolist() == [None, "c", "a"]
    assert "b" in vocab and "q" not in vocab
    ints = Vocabulary.build(torch.tensor([30, -1, 10, 20, 10]), missing=-1)
    check(ints.encode(torch.tensor([[10, 20], [30, 40]])), [[1, 2], [3, 0]])
    check(ints.encode([-1, 5, 31]), [0, 0, 0])
    sparse = Vocabulary.build(np.array([10 ** 12, 5, -7, 5]))   # ids too large for a row table, and negative
    check(sparse.encode(np.array([5, 10 ** 12, -7, 6, 10 ** 13])), [2, 3, 1, 0, 0])
    check(ints.encode(np.arange(-2, 60, dtype=np.int32))[[1, 12, 22, 32, 33, 61]], [0, 1, 2, 3, 0, 0])
    codes, names = intern_strings(["b", "a", "b", "c"])
    assert codes.tolist() == [1, 0, 1, 2] and names.tolist() == ["a", "b", "c"]
    assert len(Vocabulary.build([], missing=-1)) == 1
    check(Vocabulary.build(np.zeros(0, np.int64)).encode([1, 2]), [0, 0])
    with pytest.raises(TypeError, match="strings"):
        ints.encode(np.array(["10"]))
    with pytest.raises(ValueError, match="sorted and unique"):
        Vocabulary(np.array([2, 1]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        ints.decode([4])


def test_count_frequencies_counts_impressions_and_histories_at_least_one():
    schema = Schema(user_fields={"u": 3}, item_fields={"item": 5, "shop": 3}, history_fields=("item",))
    data = Interactions(
        user_id=torch.tensor([0, 1, 1]), user={"u": torch.tensor([1, 1, 0])},
        item={"item": torch.tensor([1, 2, 2]), "shop": torch.tensor([1, 1, 1])},
        hist_offsets=torch.tensor([0, 2, 2, 5]), hist={"item": torch.tensor([1, 3, 1, 0, 2])},
        labels={"click": torch.tensor([1.0, 0.0, 1.0])}).validate(schema)
    freq = count_frequencies(data, schema)
    check(freq["u"], [1, 2, 1])          # row 0 occurs once (a missing user value)
    check(freq["item"], [1, 3, 3, 1, 1])  # candidates 1, 2, 2 + history 1, 3, 1, 0, 2; row 4 unseen -> 1
    check(freq["shop"], [1, 3, 1])        # row 0 never occurs -> 1
    assert freq["item"].dtype == torch.long


# ------------------------------------------------------------------------------------------ building blocks


def test_histories_before_takes_strictly_earlier_events_most_recent_last():
    ev_user = np.array([1, 0, 1, 1, 0])
    ev_time = np.array([30, 5, 10, 30, 50])
    order, offsets, index = histories_before(ev_user, ev_time, np.array([1, 1, 0, 2]), np.array([30, 31, 50, 9]),
                                             max_history=2)
    rows = [order[index[offsets[i]:offsets[i + 1]]].tolist() for i in range(4)]
    assert rows == [[2], [0, 3], [1], []]  # ties in time keep file order; at most 2, the most recent
    offsets, index = jagged(np.array([5, 0, 2]), np.array([2, 0, 3]))
    assert offsets.tolist() == [0, 2, 2, 5] and index.tolist() == [5, 6, 2, 3, 4]


def test_sample_negatives_avoids_the_users_items_and_is_seeded():
    users = np.repeat(np.arange(3), 50)
    seen_u, seen_i = np.array([0, 0, 1, 2, 2]), np.array([0, 1, 2, 3, 0])
    pool = np.arange(4)
    neg = sample_negatives(users, pool, seen_u, seen_i, np.random.default_rng(3))
    allowed = {0: {2, 3}, 1: {0, 1, 3}, 2: {1, 2}}
    assert all(int(i) in allowed[int(u)] for u, i in zip(users, neg))
    assert set(neg[users == 1].tolist()) == {0, 1, 3}
    assert np.array_equal(neg, sample_negatives(users, pool, seen_u, seen_i, np.random.default_rng(3)))
    with pytest.raises(ValueError, match="every item"):
        sample_negatives(np.array([0]), np.array([0, 1]), seen_u, seen_i, np.random.default_rng(0))


def test_read_table_kinds_chunks_and_errors_name_file_and_line(tmp_path):
    rows = "".join(f"{i},{i * 10},x{i},{'' if i % 3 == 0 else i},{i / 2}\n" for i in range(1, 400))
    path = write(tmp_path / "t.csv", "a,b,name,maybe ,f\n" + rows)
    whole = read_columns(path, {"a": "int", "name": "str", "maybe": "id", "f": "float"})
    small = read_columns(path, {"a": "int", "name": "str", "maybe": "id", "f": "float"}, chunk_bytes=64)
    for key in whole:
        assert np.array_equal(whole[key], small[key])
    assert whole["a"].tolist()[:4] == [1, 2, 3, 4] and whole["name"][2] == "x3"
    assert whole["maybe"].tolist()[:4] == [1, 2, -1, 4] and whole["f"][3] == 2.0
    assert read_columns(path, {"a": "int"}, limit=5)["a"].tolist() == [1, 2, 3, 4, 5]
    broken = rows.splitlines(keepends=True)
    for bad_line, message in (("7,70,x7,7\n", r"line 301: expected 5 columns, found 4"),
                              ("7,70,x7,7,1,2\n", r"line 301: expected 5 columns, found 6"),
                              ("7,7o,x7,7,1\n", r"line 301: column 'b': cannot parse '7o' as an integer"),
                              ("7,70,x7,q,1\n", r"line 301: column 'maybe': cannot parse 'q'"),
                              ("7,70,x7,7,1.5e\n", r"line 301: column 'f': cannot parse '1.5e' as a number")):
        text = "a,b,name,maybe,f\n" + "".join(broken[:299]) + bad_line + "".join(broken[300:])
        bad = write(tmp_path / "bad.csv", text)
        with pytest.raises(ValueError, match=str(bad).replace(".", r"\.") + ", " + message):
            read_columns(bad, {"a": "int", "b": "int", "maybe": "id", "f": "float"}, chunk_bytes=256)
    cancelling = write(tmp_path / "two.csv", "a,b,name,maybe,f\n" + "".join(broken[:9]) + "1,2,x,4\n1,2,x,4,5,6\n")
    with pytest.raises(ValueError, match=r"two\.csv, line 11: expected 5 columns, found 4"):  # not hidden by line 12
        read_columns(cancelling, {"a": "int"})
    with pytest.raises(ValueError, match=r"t\.csv, line 1: header .* lacks the column\(s\) \['zz'\]"):
        read_columns(path, {"zz": "int"})


# --------------------------------------------------------------------------------------------------- amazon

REVIEWS = """\
{"reviewerID": "u1", "asin": "a", "unixReviewTime": 10, "overall": 5.0, "reviewText": "fine"}
{"reviewerID": "u1", "asin": "b", "unixReviewTime": 20}
{"reviewerID": "u2", "asin": "c", "unixReviewTime": 5}
{"reviewerID": "u1", "asin": "c", "unixReviewTime": 15}
{"unixReviewTime": 7, "asin": "a", "reviewerID": "u2"}
{"reviewerID": "u2", "asin": "d", "unixReviewTime": 9}
{"reviewerID": "u3", "asin": "e", "unixReviewTime": 1}

{"reviewerID": "u3", "asin": "f", "unixReviewTime": 2}
{"reviewerID": "u3", "asin": "g", "unixReviewTime": 3}
"""
META = """\
{'asin': 'a', 'title': "Kid's camera", 'categories': [['Electronics', 'Cameras']]}
{'asin': 'b', 'categories': [['Electronics', 'Camera & Photo'], ['Electronics', 'TV']]}
{"asin": "c", "categories": [["Electronics", "Cameras"]]}
{'asin': 'zz', 'categories': [['Electronics', 'Other']]}
"""


def test_amazon_histories_negatives_split_and_oov(tmp_path):
    write(tmp_path / "reviews_Electronics_5.json", REVIEWS)
    write(tmp_path / "meta_Electronics.json", META)
    train, test, schema = load_amazon(tmp_path, seed=7)
    # training vocabularies: items a, c, e, f (sorted) -> 1..4; only 'Cameras' has a category among them
    assert schema.user_fields == {"user": 4} and schema.item_fields == {"item": 5, "cate": 2}
    assert schema.history_fields == ("item", "cate") and schema.tasks == ("click",)
    check(train.user_id, [0, 0, 1, 1, 2, 2])
    check(train.user["user"], [1, 1, 2, 2, 3, 3])
    check(train.labels["click"], [1, 0, 1, 0, 1, 0])
    check(train.time, [15, 15, 7, 7, 2, 2])
    assert hist_rows(train, "item") == [[1], [1], [2], [2], [3], [3]]      # u1: a; u2: c; u3: e
    assert hist_rows(train, "cate") == [[1], [1], [1], [1], [0], [0]]
    positives, negatives = train.item["item"][0::2], train.item["item"][1::2]
    check(positives, [2, 1, 4])                                         # c, a, f
    assert negatives[0] in (3, 4) and negatives[1] in (3, 4) and negatives[2] in (1, 2)  # never the user's items
    check(train.item["cate"], [1 if i in (1, 2) else 0 for i in train.item["item"].tolist()])
    # test: every user's last review; candidates b, d, g were never in training -> OOV
    check(test.user_id, [0, 0, 1, 1, 2, 2])
    check(test.labels["click"], [1, 0, 1, 0, 1, 0])
    check(test.item["item"][0::2], [0, 0, 0])
    check(test.time, [20, 20, 9, 9, 3, 3])
    assert hist_rows(test, "item") == [[1, 2], [1, 2], [2, 1], [2, 1], [3, 4], [3, 4]]
    expected_item = torch.bincount(torch.cat([train.item["item"], train.hist["item"]]), minlength=5).clamp(min=1)
    check(schema.frequencies["item"], expected_item)
    assert int(schema.frequencies["item"][1:].sum()) == 12 and int(schema.frequencies["item"][0]) == 1
    check(schema.frequencies["cate"], [5, 7])  # row 0: e, f twice as candidates... (3) + twice in history (2)
    check(schema.frequencies["user"], [1, 2, 2, 2])
    again = load_amazon(tmp_path, seed=7)[0]
    check(again.item["item"], train.item["item"])
    short = load_amazon(tmp_path, seed=7, max_history=1, user_feature=False)[1]
    assert hist_rows(short, "item")[0::2] == [[2], [1], [4]]
    assert load_amazon(tmp_path, user_feature=False)[2].user_fields == {}


def test_amazon_categories_last_of_the_last_path(tmp_path):
    meta = write(tmp_path / "m.json", META + '{"asin": "q", "category": ["Electronics", "Audio"], "x": 1}\n'
                 "{'asin': 'r', 'categories': []}\n{'asin': 's', 'categories': [['Home', 'Lamps']], 'b': [1, 2]]}\n")
    assert read_categories(meta, {"a", "b", "c", "q", "r", "zz"}) == {"a": "Cameras", "b": "TV", "c": "Cameras",
                                                                       "q": "Audio", "zz": "Other"}
    assert read_categories(meta, {"s"}) == {"s": "Lamps"}  # only asin and categories of a used line are parsed
    with pytest.raises(ValueError, match=r"m\.json, line 7: not a JSON object"):
        read_categories(meta, {"s"}, strict=True)
    assert read_categories(meta, {"a", "b", "q"}, strict=True) == {"a": "Cameras", "b": "TV", "q": "Audio"}


def test_amazon_reads_gzip_python_literals_and_other_names(tmp_path):
    write(tmp_path / "plain" / "reviews_Electronics_5.json", REVIEWS)
    write(tmp_path / "plain" / "meta_Electronics.json", META)
    write(tmp_path / "gz" / "reviews_Electronics_5.json", REVIEWS, compress=True)
    write(tmp_path / "gz" / "meta_Electronics.json", META, compress=True)
    write(tmp_path / "named" / "my_reviews.jsonl", REVIEWS.replace('"', "'"))  # Python literals for reviews too
    write(tmp_path / "named" / "items.json", META)
    reference = load_amazon(tmp_path / "plain")
    for other in (load_amazon(tmp_path / "gz"),
                  load_amazon(tmp_path / "named", reviews_file="my_reviews.jsonl", meta_file="items.json"),
                  load_amazon(tmp_path / "named" / "my_reviews.jsonl", meta_file=tmp_path / "named" / "items.json")):
        for a, b in zip(reference[:2], other[:2]):
            for name in ("item", "cate"):
                check(b.item[name], a.item[name])
                check(b.hist[name], a.hist[name])
            check(b.hist_offsets, a.hist_offsets)
        assert other[2].item_fields == reference[2].item_fields


def test_amazon_malformed_lines_name_file_and_line(tmp_path):
    meta = write(tmp_path / "meta_Electronics.json", META)
    reviews = tmp_path / "reviews_Electronics_5.json"
    lines = REVIEWS.splitlines(keepends=True)
    write(reviews, "".join(lines[:2]) + '{"reviewerID": "u2", "asin": "c",\n' + "".join(lines[3:]))
    with pytest.raises(ValueError, match=r"reviews_Electronics_5\.json, line 3: not a JSON object"):
        load_amazon(tmp_path)
    write(reviews, "".join(lines[:3]) + '{"reviewerID": "u1", "asin": "c"}\n' + "".join(lines[4:]))
    with pytest.raises(ValueError, match=r"line 4: missing field 'unixReviewTime'"):
        load_amazon(tmp_path)
    write(reviews, "".join(lines[:4]) + '{"reviewerID": "u2", "asin": "a", "unixReviewTime": "soon"}\n'
          + "".join(lines[5:]))
    with pytest.raises(ValueError, match=r"line 5: unixReviewTime 'soon' is not an integer"):
        load_amazon(tmp_path)
    write(reviews, REVIEWS)
    write(meta, META + "{'asin': 'e', 'categories': [[\n")
    with pytest.raises(ValueError, match=r"meta_Electronics\.json, line 5: not a JSON object"):
        load_amazon(tmp_path)
    write(meta, META + "__import__('os').system('false')\n")  # never evaluated
    with pytest.raises(ValueError, match=r"line 5: not a JSON object or Python dict literal"):
        load_amazon(tmp_path)
    write(meta, META + "[1, 2]\n")
    with pytest.raises(ValueError, match=r"line 5: expected an object, found list"):
        load_amazon(tmp_path)
    with pytest.raises(FileNotFoundError, match="amazon meta"):
        load_amazon(tmp_path, meta_file="nope.json")


# --------------------------------------------------------------------------------------------------- taobao


def write_taobao(root: Path, behaviors: str = None) -> Path:
    write(root / "ad_feature.csv", "adgroup_id,cate_id,campaign_id,customer,brand,price\n"
          "10,100,7,70,500,10.0\n11,101,8,71,NULL,0\n12,100,7,72,501,99.5\n")
    write(root / "user_profile.csv", "userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,"
          "shopping_level,occupation,new_user_class_level \n1,5,2,1,3,,3,0,2\n2,6,2,2,4,1,2,1,\n")
    write(root / "behavior_log.csv", behaviors or "user,time_stamp,btag,cate,brand\n"
          f"1,{T0 + 50},pv,100,500\n1,{T0 + 10},cart,101,502\n1,{T0 + 100},pv,102,503\n2,{T0 + 5},pv,100,501\n"
          f"1,{T0 + DAY + 5},buy,100,500\n9,{T0 + 1},pv,100,500\n")
    write(root / "raw_sample.csv", "user,time_stamp,adgroup_id,pid,nonclk,clk\n"
          f"1,{T0 + 100},10,430548_1007,1,0\n1,{T0 + 200},11,430539_1007,0,1\n2,{T0 + 300},12,430548_1007,1,0\n"
          f"3,{T0 + 400},10,430548_1007,0,1\n1,{T0 + DAY + 10},12,430548_1007,1,0\n"
          f"2,{T0 + DAY + 20},13,430539_1007,0,1\n3,{T0 + DAY + 30},11,430548_1007,1,0\n")
    return root


def test_taobao_histories_profiles_split_and_oov(tmp_path):
    train, test, schema = load_taobao(write_taobao(tmp_path))
    assert schema.history_fields == ("cate", "brand") and schema.dense_dim == 1
    assert schema.item_fields == {"adgroup": 4, "cate": 4, "brand": 5, "campaign": 3, "customer": 4, "pid": 3}
    assert schema.user_fields["cms_segid"] == 3 and schema.user_fields["pvalue_level"] == 2
    # the cut is 00:00 UTC of the last impression day: 4 training and 3 test impressions
    check(train.time, [T0 + 100, T0 + 200, T0 + 300, T0 + 400])
    check(train.user_id, [1, 1, 2, 3])
    check(train.labels["click"], [0, 1, 0, 1])
    check(train.item["adgroup"], [1, 2, 3, 1])
    check(train.item["cate"], [1, 2, 1, 1])
    check(train.item["brand"], [1, 0, 2, 1])      # ad 11's brand is NULL
    check(train.item["campaign"], [1, 2, 1, 1])
    check(train.item["customer"], [1, 2, 3, 1])
    check(train.item["pid"], [2, 1, 2, 2])
    # history: behaviours strictly before the impression (the one at T0 + 100 is not before row 0)
    assert hist_rows(train, "cate") == [[2, 1], [2, 1, 3], [1], []]
    assert hist_rows(train, "brand") == [[3, 1], [3, 1, 4], [2], []]
    check(train.user["cms_segid"], [1, 1, 2, 0])  # user 3 has no profile
    check(train.user["pvalue_level"], [0, 0, 1, 0])  # user 1's is empty
    check(train.user["new_user_class_level"], [1, 1, 0, 0])
    assert torch.allclose(train.dense[:, 0], torch.tensor([math.log1p(10), 0.0, math.log1p(99.5), math.log1p(10)]))
    check(test.user_id, [1, 2, 3])
    check(test.item["adgroup"], [3, 0, 2])         # ad 13 is in no file: OOV everywhere
    check(test.item["cate"], [1, 0, 2])
    check(test.item["brand"], [2, 0, 0])
    check(test.labels["click"], [0, 1, 0])
    assert hist_rows(test, "cate") == [[2, 1, 3, 1], [1], []]
    check(test.user["cms_segid"], [1, 2, 0])
    check(schema.frequencies["cate"], [1, 6, 3, 1])
    check(schema.frequencies["brand"], [1, 4, 2, 2, 1])
    check(schema.frequencies["cms_segid"], [1, 2, 1])
    assert torch.allclose(test.dense[:, 0], torch.tensor([math.log1p(99.5), 0.0, 0.0]))


def test_taobao_options(tmp_path):
    root = write_taobao(tmp_path)
    crlf = write_taobao(tmp_path / "crlf")
    for name in ("raw_sample.csv", "user_profile.csv", "behavior_log.csv", "ad_feature.csv"):
        (crlf / name).write_bytes((root / name).read_bytes().replace(b"\n", b"\r\n"))
    for a, b in zip(load_taobao(root), load_taobao(crlf)):  # Windows line ends read the same
        if isinstance(a, Schema):
            assert a.user_fields == b.user_fields and a.item_fields == b.item_fields
        else:
            for column in ("user", "item", "hist"):
                assert all(torch.equal(getattr(a, column)[k], getattr(b, column)[k]) for k in getattr(a, column))
    with pytest.raises(ValueError, match="taobao: a path to the data is required"):
        load_dataset("taobao")
    train, test, _ = load_taobao(root, btags=["pv"])
    check(train.hist_lengths, [1, 2, 1, 0])
    check(test.hist_lengths, [2, 1, 0])          # the 'buy' after the cut is filtered out
    train, test, _ = load_taobao(root, max_history=1)
    assert hist_rows(train, "cate") == [[1], [3], [1], []]   # the most recent behaviour
    train, test, schema = load_taobao(root, test_start=T0 + 250, price=False, pid=False)
    assert len(train) == 2 and len(test) == 5 and train.dense is None and "pid" not in schema.item_fields
    train, _, _ = load_taobao(root, behavior_rows=2)
    check(train.hist_lengths, [2, 2, 0, 0])
    with pytest.raises(ValueError, match="both must be non-empty"):
        load_taobao(root, test_start=T0)
    with pytest.raises(ValueError, match="btags"):
        load_taobao(root, btags=["click"])


def test_taobao_malformed_rows_name_file_and_line(tmp_path):
    root = write_taobao(tmp_path, "user,time_stamp,btag,cate,brand\n1,5,pv,100,500\n1,6,pv,100\n")
    with pytest.raises(ValueError, match=r"behavior_log\.csv, line 3: expected 5 columns, found 4"):
        load_taobao(root)
    write_taobao(tmp_path, "user,time_stamp,btag,cate,brand\n1,5,pv,100,500\n1,six,pv,100,1\n")
    with pytest.raises(ValueError, match=r"behavior_log\.csv, line 3: column 'time_stamp': cannot parse 'six'"):
        load_taobao(root)
    write_taobao(tmp_path, "user,time,btag,cate,brand\n")
    with pytest.raises(ValueError, match=r"behavior_log\.csv, line 1: header .* lacks the column\(s\) "
                                         r"\['time_stamp'\]"):
        load_taobao(root)
    write_taobao(tmp_path)
    sample = (root / "raw_sample.csv").read_text().splitlines(keepends=True)
    write(root / "raw_sample.csv", "".join(sample[:3]) + sample[3].replace(",1,0\n", ",1,2\n") + "".join(sample[4:]))
    with pytest.raises(ValueError, match=r"raw_sample\.csv, line 4: column 'clk': invalid value 2"):
        load_taobao(root)
    (root / "raw_sample.csv").unlink()
    with pytest.raises(FileNotFoundError, match="taobao impressions"):
        load_taobao(root)


# -------------------------------------------------------------------------------------------------- recbole

INTER = """\
user_id:token\titem_id:token\trating:float\ttimestamp:float
u1\ti1\t5\t100
u1\ti2\t2\t200
u1\ti3\t4\t300
u2\ti1\t3\t150
u2\ti3\t5\t250
u2\ti4\t4\t400
u1\ti4\t1\t500
u3\ti2\t5\t450
"""
ITEM = """\
item_id:token\ttitle:token_seq\tclass:token_seq
i1\tToy Story\tAnimation Comedy
i2\tHeat\tAction Thriller
i3\tBig\tComedy
i4\tAlien\tHorror Sci-Fi
i9\tX\tDrama
"""
USER = "user_id:token\tage:float\tgender:token\nu1\t25\tF\nu2\t40\tM\nu3\t33\t\n"


def write_recbole(root: Path) -> Path:
    write(root / "ds" / "ds.inter", INTER)
    write(root / "ds" / "ds.item", ITEM)
    write(root / "ds" / "ds.user", USER)
    return root / "ds"


def test_recbole_labels_histories_side_features_and_time_split(tmp_path):
    train, test, schema = load_recbole(write_recbole(tmp_path), float_buckets=2)
    assert schema.user_fields == {"user_id": 3, "age": 3, "gender": 3}
    assert schema.item_fields == {"item_id": 5, "class": 5} and schema.history_fields == ("item_id", "class")
    # the 80% time quantile is t = 450: the last two interactions are the test set
    check(train.time, [100, 200, 300, 150, 250, 400])
    check(train.user_id, [0, 0, 0, 1, 1, 1])
    check(train.labels["click"], [1, 0, 1, 0, 1, 1])          # rating >= 4
    check(train.item["item_id"], [1, 2, 3, 1, 3, 4])
    check(train.item["class"], [2, 1, 3, 2, 3, 4])            # Action 1, Animation 2, Comedy 3, Horror 4
    assert hist_rows(train, "item_id") == [[], [1], [1], [], [], [3]]  # earlier clicks only
    assert hist_rows(train, "class") == [[], [2], [2], [], [], [3]]
    check(train.user["user_id"], [1, 1, 1, 2, 2, 2])
    check(train.user["age"], [1, 1, 1, 2, 2, 2])               # buckets split at the median age 33
    check(train.user["gender"], [1, 1, 1, 2, 2, 2])
    check(test.time, [500, 450])
    check(test.user_id, [0, 2])
    check(test.labels["click"], [0, 1])
    check(test.item["item_id"], [4, 2])
    check(test.item["class"], [4, 1])
    assert hist_rows(test, "item_id") == [[1, 3], []]
    check(test.user["user_id"], [1, 0])                        # u3 never appears in training
    check(test.user["age"], [1, 2])
    check(test.user["gender"], [1, 0])                         # empty gender
    check(schema.frequencies["item_id"], [1, 4, 1, 3, 1])
    check(schema.frequencies["class"], [1, 1, 4, 3, 1])
    check(schema.frequencies["user_id"], [1, 3, 3])


def test_recbole_leave_last_out_history_all_and_thresholds(tmp_path):
    root = write_recbole(tmp_path)
    train, test, _ = load_recbole(root, split_by="leave_last_out", history="all", threshold=3,
                                  item_features=[], user_features=["gender"], user_feature=False)
    check(train.time, [100, 200, 300, 150, 250])
    check(test.time, [400, 500, 450])
    check(train.labels["click"], [1, 0, 1, 1, 1])
    assert hist_rows(test, "item_id") == [[1, 3], [1, 2, 3], []]   # every earlier interaction
    check(test.item["item_id"], [0, 0, 2])                        # i4 is only in the test set
    assert set(train.user) == {"gender"} and set(train.item) == {"item_id"}
    _, test, _ = load_recbole(root, split_by="leave_last_out", max_history=1)
    assert hist_rows(test, "item_id") == [[3], [3], []]
    with pytest.raises(ValueError, match="split must be"):
        load_recbole(root, split_by="random")
    with pytest.raises(ValueError, match="test_fraction"):
        load_recbole(root, test_fraction=1.0)
    with pytest.raises(ValueError, match=r"ds\.user, line 1: header lacks the requested column\(s\) \['zip'\]"):
        load_recbole(root, user_features=["zip"])


def test_recbole_implicit_negatives(tmp_path):
    write(tmp_path / "imp" / "imp.inter",
          "user_id:token\titem_id:token\ttimestamp:float\na\tx\t1\na\ty\t2\nb\tz\t3\nb\tw\t4\nc\tx\t5\nc\tv\t6\n")
    train, test, schema = load_recbole(tmp_path / "imp", split_by="leave_last_out")  # no rating: implicit
    # training items x, z -> rows 1, 2; the only negative each user can get is forced
    assert schema.item_fields == {"item_id": 3} and schema.user_fields == {"user_id": 4}
    check(train.item["item_id"], [1, 2, 2, 1, 1, 2])
    check(train.labels["click"], [1, 0, 1, 0, 1, 0])
    check(train.hist_lengths, [0, 0, 0, 0, 0, 0])
    check(test.item["item_id"], [0, 2, 0, 1, 0, 2])
    check(test.labels["click"], [1, 0, 1, 0, 1, 0])
    assert hist_rows(test, "item_id") == [[1], [1], [2], [2], [1], [1]]
    check(test.time, [2, 2, 4, 4, 6, 6])
    train3, _, _ = load_recbole(tmp_path / "imp" / "imp.inter", split_by="leave_last_out", negatives=3)
    check(train3.labels["click"], [1, 0, 0, 0] * 3)
    with pytest.raises(ValueError, match="rating column"):
        load_recbole(tmp_path / "imp", label="rating")


def test_recbole_malformed_files_name_file_and_line(tmp_path):
    root = write_recbole(tmp_path)
    lines = INTER.splitlines(keepends=True)
    write(root / "ds.inter", "".join(lines[:3]) + "u1\ti3\t4\n" + "".join(lines[4:]))
    with pytest.raises(ValueError, match=r"ds\.inter, line 4: expected 4 columns, found 3"):
        load_recbole(root)
    write(root / "ds.inter", "".join(lines[:5]) + "u2\ti3\tfive\t250\n" + "".join(lines[6:]))
    with pytest.raises(ValueError, match=r"ds\.inter, line 6: column 'rating': cannot parse 'five' as a number"):
        load_recbole(root)
    write(root / "ds.inter", "user_id\titem_id\n" + "".join(lines[1:]))
    with pytest.raises(ValueError, match=r"ds\.inter, line 1: header token 'user_id' is not 'name:type'"):
        load_recbole(root)
    write(root / "ds.inter", "user:token\titem_id:token\n")
    with pytest.raises(ValueError, match=r"ds\.inter, line 1: header lacks the column 'user_id'"):
        load_recbole(root)
    write(root / "ds.inter", INTER)
    write(root / "ds.user", "user_id:token\tage:float\tgender:token\nu1\t25\tF\nu2\tforty\tM\n")
    with pytest.raises(ValueError, match=r"ds\.user, line 3: column 'age': cannot parse 'forty' as a number"):
        load_recbole(root)
    with pytest.raises(FileNotFoundError, match="recbole"):
        load_recbole(tmp_path / "nothing-here")
    crlf = tmp_path / "crlf" / "crlf"
    for suffix in (".inter", ".item", ".user"):
        write(crlf.with_suffix(suffix), {".inter": INTER, ".item": ITEM, ".user": USER}[suffix].replace("\n", "\r\n"))
    assert load_recbole(crlf.parent, float_buckets=2)[2].user_fields == {"user_id": 3, "age": 3, "gender": 3}


def ml100k_from_wheel(tmp_path):
    """The ml-100k atomic files from a locally downloaded recbole wheel, or None."""
    candidates = [os.environ.get("DIN_EXT_RECBOLE_WHEEL", "")]
    for folder in ("/tmp/recbole", os.path.expanduser("~/.cache/din_ext"), "/opt/wheels"):
        candidates += sorted(str(p) for p in Path(folder).glob("recbole-*.whl")) if Path(folder).is_dir() else []
    for wheel in filter(None, candidates):
        if Path(wheel).is_file():
            with zipfile.ZipFile(wheel) as z:
                members = [m for m in z.namelist() if "dataset_example/ml-100k/" in m and not m.endswith("/")]
                z.extractall(tmp_path, members)
            return tmp_path / "recbole" / "dataset_example" / "ml-100k"
    return None


def test_recbole_real_ml100k_from_the_wheel(tmp_path):
    root = ml100k_from_wheel(tmp_path)
    if root is None:
        pytest.skip("no recbole wheel on local disk (pip download recbole==1.2.1 --no-deps -d /tmp/recbole)")
    train, test, schema = load_recbole(root)
    assert len(train) + len(test) == 100000
    assert 0.15 < len(test) / 100000 < 0.25
    assert schema.item_fields["item_id"] > 1500 and schema.item_fields["class"] == 20
    assert set(schema.user_fields) == {"user_id", "age", "gender", "occupation", "zip_code"}
    assert int(train.time.max()) <= int(test.time.min())
    assert 0.5 < float(train.labels["click"].mean()) < 0.6     # 55% of MovieLens ratings are >= 4
    assert int(train.hist_lengths.max()) == 100 and float(train.hist_lengths.float().mean()) > 20
    for name, counts in schema.frequencies.items():
        assert counts.shape == (schema.item_fields.get(name) or schema.user_fields[name],) and int(counts.min()) >= 1


# ------------------------------------------------------------------------------------- samples and dispatch


@pytest.mark.parametrize("name", ["amazon", "taobao", "recbole"])
def test_samples_load_through_load_dataset(tmp_path, name):
    directory = write_sample(name, tmp_path / name, seed=3, users=60)
    train, test, schema = load_dataset(name, directory)
    train.validate(schema), test.validate(schema)
    assert len(train) > 200 and len(test) > 20
    assert 0.05 < float(train.labels["click"].mean()) < 0.7
    assert float(train.hist_lengths.float().mean()) > 1
    again = load_dataset(name, write_sample(name, tmp_path / f"{name}-2", seed=3, users=60))[0]
    check(again.item[schema.history_fields[0]], train.item[schema.history_fields[0]])


def test_amazon_sample_gzip_and_dispatch_registry(tmp_path):
    plain = load_dataset("amazon", write_sample("amazon", tmp_path / "a", seed=1, users=30))
    packed = load_dataset("amazon", write_sample("amazon", tmp_path / "b", seed=1, users=30, compress=True))
    check(packed[0].hist["item"], plain[0].hist["item"])
    assert sorted(LOADERS) == ["amazon", "recbole", "synthetic", "taobao"]
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        load_dataset("nope", tmp_path)
    with pytest.raises(ValueError, match="already registered"):
        register_loader("amazon", load_amazon)
    register_loader("mine", lambda path, **o: plain)
    try:
        assert load_dataset("mine", None) is plain
    finally:
        del LOADERS["mine"]
    with pytest.raises(ValueError, match="no sample writer"):
        write_sample("nope", tmp_path)


# ------------------------------------------------------------------------------------------------- batching


def test_iterate_batches_buckets_and_gathers_each_row_once(tmp_path):
    train, _, schema = load_dataset("taobao", write_sample("taobao", tmp_path, seed=5, users=20))
    rows = len(train)
    marked = Interactions(torch.arange(rows), train.user, train.item, train.hist_offsets, train.hist, train.labels,
                          train.dense, train.time)  # user_id = row number, to trace rows through batches
    expected = hist_rows(train, "cate")
    seen, spreads, plain_spreads = [], [], []
    for batch in iterate_batches(marked, 16, shuffle=True, bucket=True, seed=1):
        batch.validate(schema)
        ids = batch.user_id.tolist()
        seen += ids
        assert hist_rows(batch, "cate") == [expected[i] for i in ids]   # take() gathers the right histories
        check(batch.labels["click"], train.labels["click"][batch.user_id])
        spreads.append(int(batch.hist_lengths.max() - batch.hist_lengths.min()))
    assert sorted(seen) == list(range(rows))
    for batch in iterate_batches(marked, 16, shuffle=True, seed=1):
        plain_spreads.append(int(batch.hist_lengths.max() - batch.hist_lengths.min()))
    assert sum(spreads) * 4 < sum(plain_spreads)   # bucketing groups similar lengths
    kept = list(iterate_batches(marked, 16, drop_last=True))
    assert all(len(b) == 16 for b in kept) and len(kept) == rows // 16
