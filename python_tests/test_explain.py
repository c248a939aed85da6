"""din-ext explain and din_ext.explain: one user's behaviours ranked by the model's attention weights for a
candidate, with raw ids from the schema's vocabularies; its picture where matplotlib is installed."""

from __future__ import annotations

import pytest
import torch

from din_ext import explain, plots
from din_ext.cli import main
from din_ext.data.core import Interactions, Schema
from din_ext.model import DIN

VOCABULARIES = {"user": [None, "u1", "u2"], "item": [None, *(f"i{k}" for k in range(1, 9))],
                "cat": [None, "c1", "c2", "c3"]}
CAT = {1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 6: 3, 7: 1}  # item row -> category row; item 8 is in no impression


def schema():
    return Schema(user_fields={"user": 3}, item_fields={"item": 9, "cat": 4}, history_fields=("item", "cat"),
                  vocabularies={k: list(v) for k, v in VOCABULARIES.items()})


def interactions():
    """Two impressions of user 10 (the later one with 5 behaviours) and one of user 20 (no behaviour)."""
    items = torch.tensor([3, 6, 2])
    hist_item = torch.tensor([1, 2, 1, 5, 3, 4, 6, 7])
    return Interactions(
        user_id=torch.tensor([10, 10, 20]), user={"user": torch.tensor([1, 1, 2])},
        item={"item": items, "cat": torch.tensor([CAT[int(i)] for i in items])},
        hist_offsets=torch.tensor([0, 3, 8, 8]), hist={"item": hist_item,
                                                      "cat": torch.tensor([CAT[int(i)] for i in hist_item])},
        labels={"click": torch.tensor([1.0, 0.0, 1.0])}, time=torch.tensor([5, 9, 7]))


def model(normalization="none", pooling="attention"):
    torch.manual_seed(0)
    din = DIN(schema(), embed_dim=6, attention_hidden=(8, 4), tower_hidden=(8,), activation="dice",
              normalization=normalization, pooling=pooling)
    with torch.no_grad():
        for p in din.parameters():
            p.normal_(0, 0.5)
    return din


@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_weights_are_the_coefficients_of_the_pooled_interest(normalization):
    """sum_l w_l * k_l is the model's own interest vector, for each of several candidates."""
    din = model(normalization)  # in training mode: the weights are eval mode's (running Dice statistics)
    history = {"item": torch.tensor([1, 5, 3, 4, 6]), "cat": torch.tensor([1, 3, 2, 2, 3])}
    candidates = {"item": torch.tensor([6, 2, 7]), "cat": torch.tensor([3, 1, 1])}
    weights = explain.behaviour_weights(din, candidates, history)
    assert weights.shape == (3, 5) and din.training  # the mode is restored
    din.eval()
    keys = torch.cat([din.embeddings[f](history[f])[0] for f in ("item", "cat")], dim=-1)
    query = torch.cat([din.embeddings[f](candidates[f])[0] for f in ("item", "cat")], dim=-1)
    with torch.no_grad():
        pooled = din.pool(query[None], keys, torch.tensor([0, 5]))[0]
    torch.testing.assert_close(weights @ keys, pooled, rtol=1e-5, atol=1e-6)
    if normalization == "softmax":
        torch.testing.assert_close(weights.sum(1), torch.ones(3))


def test_explain_user_ranks_the_latest_history_with_raw_ids():
    din = model()
    data = interactions()
    result = explain.explain_user(din, data, user=10)  # the impression at time 9: 5 behaviours, candidate i6
    assert result["candidate"] == {"item": "i6", "cat": "c3"} and result["history_length"] == 5
    weights = [r["weight"] for r in result["rows"]]
    assert weights == sorted(weights, reverse=True) and [r["rank"] for r in result["rows"]] == [1, 2, 3, 4, 5]
    assert sorted(r["position"] for r in result["rows"]) == [0, 1, 2, 3, 4]
    assert {r["ids"]["item"] for r in result["rows"]} == {"i5", "i3", "i4", "i6", "i7"}
    expected = explain.behaviour_weights(din, {"item": torch.tensor([6]), "cat": torch.tensor([3])},
                                         {"item": data.hist["item"][3:], "cat": data.hist["cat"][3:]})[0]
    assert weights == sorted(expected.tolist(), reverse=True)
    # another candidate by its raw id: its category comes from the impression that shows it
    other = explain.explain_user(din, data, user="10", candidate="i2")
    assert other["candidate"] == {"item": "i2", "cat": "c1"}
    assert [r["weight"] for r in other["rows"]] != weights
    table = explain.format_explanation(other, top=2)
    assert "user 10, candidate item i2, cat c1: 5 behaviours" in table and len(table.splitlines()) == 4
    empty = explain.explain_user(din, data, user=20)
    assert empty["rows"] == [] and "no behaviours" in explain.format_explanation(empty)


@pytest.mark.parametrize("user,candidate,message", [
    (99, None, "user 99 has no impression"),
    ("abc", None, "user ids are integers"),
    (10, "i9", "'i9' is not in the vocabulary of 'item'"),
    (10, "i8", "no impression in the data shows item 'i8'"),
])
def test_explain_user_errors_name_what_is_missing(user, candidate, message):
    with pytest.raises(ValueError, match=message):
        explain.explain_user(model(), interactions(), user, candidate)


def test_a_base_model_has_no_attention_weights():
    with pytest.raises(ValueError, match="BaseModel"):
        explain.explain_user(model(pooling="sum"), interactions(), 10)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("explain") / "run"
    threads = torch.get_num_threads()
    assert main(["train", "--synthetic-users", "40", "--epochs", "1", "--batch-size", "64", "--embed-dim", "8",
                 "--attention-hidden", "8", "--tower-hidden", "16", "--no-progress", "--threads", "1",
                 "--out", str(out)]) == 0
    torch.set_num_threads(threads)
    return out / "best.pt"


def test_cli_prints_the_ranking_and_draws_it(checkpoint, tmp_path, capsys):
    capsys.readouterr()
    picture = tmp_path / "user3.png"
    assert main(["explain", "--checkpoint", str(checkpoint), "--user", "3", "--top", "4", "--threads", "1",
                 "--plot", str(picture)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("user 3, candidate item ") and lines[1].split() == ["rank", "position", "item",
                                                                                  "category", "brand", "weight"]
    weights = [float(line.split()[-1]) for line in lines[2:6]]
    assert weights == sorted(weights, reverse=True)
    if plots.available():
        assert lines[-1] == f"wrote {picture}" and picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib is not installed" in lines[-1] and not picture.exists()


@pytest.mark.parametrize("argv,message", [(["--user", "123456"], "--user 123456: user 123456 has no impression"),
                                         (["--user", "3", "--candidate", "999999"], "--candidate 999999: 999999 is "
                                                                                    "not a row of the table"),
                                         (["--user", "3", "--top", "0"], "--top must be positive"),
                                         (["--user", "3", "--plot", "/no/such/folder/x.png"], "does not exist")])
def test_cli_errors_are_one_line(checkpoint, capsys, argv, message):
    code = main(["explain", "--checkpoint", str(checkpoint), "--threads", "1", *argv])
    err = capsys.readouterr().err
    if "--plot" in argv and not plots.available():
        pytest.skip("without matplotlib no picture is written, so --plot is not checked")
    assert code == 2 and err.count("\n") == 1 and message in err, err
