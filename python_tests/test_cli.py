"""The din-ext command: train, resume, evaluate, predict, compare and its argument errors, on a tiny synthetic log."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from din_ext.cli import main

# tiny shapes run fastest on one thread
TINY = ["--synthetic-users", "60", "--batch-size", "64", "--embed-dim", "8", "--attention-hidden", "16,8",
        "--tower-hidden", "32,16", "--no-progress", "--seed", "1", "--threads", "1"]


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch DIN run and a 2-epoch one, both from scratch."""
    root = tmp_path_factory.mktemp("cli")
    assert main(["train", *TINY, "--epochs", "1", "--out", str(root / "one")]) == 0
    assert main(["train", *TINY, "--epochs", "2", "--out", str(root / "two")]) == 0
    return root


def test_train_writes_metrics_and_checkpoints(trained):
    out = trained / "one"
    assert (out / "last.pt").exists() and (out / "best.pt").exists()
    result = json.loads((out / "metrics.json").read_text())
    for key in ("auc", "gauc", "logloss", "samples_per_second", "train_samples_per_second", "epoch", "history"):
        assert key in result, key
    assert result["model"] == "din" and result["epoch"] == 1 and len(result["history"]) == 1
    assert 0 < result["auc"] < 1 and 0 < result["gauc"] < 1 and 0 < result["logloss"] < 5
    assert result["samples_per_second"] > 0 and result["rows"] > 100


def test_resume_continues_exactly(trained, tmp_path, capsys):
    out = tmp_path / "resumed"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    code, stdout, _ = run(capsys, "train", "--epochs", "2", "--resume", "--out", str(out), "--no-progress",
                          "--threads", "1")
    assert code == 0 and "epoch 2/2" in stdout and "epoch 1/2" not in stdout
    resumed = json.loads((out / "metrics.json").read_text())
    straight = json.loads((trained / "two" / "metrics.json").read_text())
    assert resumed["epoch"] == 2 and len(resumed["history"]) == 2
    for key in ("auc", "gauc", "logloss", "train_loss"):  # data, shuffling, Adam and Dice state all restored
        assert resumed[key] == pytest.approx(straight[key], rel=1e-6, abs=1e-9), key
    code, stdout, _ = run(capsys, "train", "--epochs", "2", "--resume", "--out", str(out), "--no-progress")
    assert code == 0 and "nothing to do" in stdout
    code, _, err = run(capsys, "train", "--epochs", "3", "--resume", "--out", str(out), "--seed", "5")
    assert code == 2 and "differ from the checkpoint" in err


def test_evaluate_matches_training_metrics(trained, capsys):
    code, stdout, _ = run(capsys, "evaluate", "--checkpoint", str(trained / "one" / "last.pt"))
    assert code == 0
    result = json.loads(stdout)
    final = json.loads((trained / "one" / "metrics.json").read_text())
    for key in ("auc", "gauc", "logloss"):
        assert result[key] == pytest.approx(final[key], rel=1e-9), key
    code, stdout, _ = run(capsys, "evaluate", "--checkpoint", str(trained / "one" / "best.pt"), "--split", "train")
    assert code == 0 and json.loads(stdout)["rows"] > result["rows"]
    code, stdout, _ = run(capsys, "evaluate", "--checkpoint", str(trained / "one" / "best.pt"), "--max-history", "3")
    assert code == 0 and json.loads(stdout)["auc"] != result["auc"]  # shorter histories, another evaluation


def test_data_must_fit_the_checkpoint():
    import dataclasses

    from din_ext import training
    from din_ext.data.synthetic import SyntheticConfig, generate
    from din_ext.model import DIN

    schema = generate(SyntheticConfig(num_users=20, num_items=30, num_categories=6), seed=0)[2]
    model = DIN(dataclasses.replace(schema, tasks=("click", "conversion")), embed_dim=4)
    training.check_fits(model, dataclasses.replace(schema, tasks=("conversion", "click", "extra")), "data")
    with pytest.raises(training.TrainingError, match=r"no labels for the model's tasks \['conversion'\]"):
        training.check_fits(model, schema, "data")
    with pytest.raises(training.TrainingError, match="item_fields"):
        training.check_fits(model, dataclasses.replace(schema, item_fields={**schema.item_fields, "item": 99}), "data")
    with pytest.raises(training.TrainingError, match="dense_dim"):
        training.check_fits(model, dataclasses.replace(schema, dense_dim=0), "data")


def test_predict_writes_probabilities(trained, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    code, stdout, _ = run(capsys, "predict", "--checkpoint", str(trained / "two" / "last.pt"), "--output", str(out))
    assert code == 0 and "wrote" in stdout
    rows = list(csv.DictReader(out.open()))
    final = json.loads((trained / "two" / "metrics.json").read_text())
    assert len(rows) == final["rows"] and list(rows[0]) == ["row", "user_id", "p_click", "click"]
    probabilities = [float(r["p_click"]) for r in rows]
    assert all(0 < p < 1 for p in probabilities) and len(set(probabilities)) > 10
    from din_ext.metrics import auc
    assert auc([int(r["click"]) for r in rows], probabilities) == pytest.approx(final["auc"], abs=1e-4)


def test_compare_reports_rela_impr(tmp_path, capsys):
    code, stdout, _ = run(capsys, "compare", *TINY, "--epochs", "1", "--out", str(tmp_path))
    assert code == 0 and "RelaImpr" in stdout
    table = json.loads((tmp_path / "compare.json").read_text())
    base, din = table["gauc"]["base"], table["gauc"]["din"]
    assert table["gauc"]["rela_impr_percent"] == pytest.approx(((din - 0.5) / (base - 0.5) - 1) * 100)
    assert json.loads((tmp_path / "base" / "metrics.json").read_text())["model"] == "base"
    assert json.loads((tmp_path / "din" / "metrics.json").read_text())["model"] == "din"


def test_multi_task_training(tmp_path):
    assert main(["train", *TINY, "--synthetic-conversion", "--epochs", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert set(result["tasks"]) == {"click", "conversion"}
    assert result["auc"] == result["tasks"]["click"]["auc"] and not math.isnan(result["tasks"]["conversion"]["auc"])


@pytest.mark.parametrize("argv, message", [
    (["train", "--epochs", "0"], "--epochs must be positive"),
    (["train", "--lr", "-1"], "--lr must be positive"),
    (["train", "--data", "amazon"], "--data amazon needs --path"),
    (["train", "--data", "taobao", "--path", "/nonexistent/taobao"], "does not exist"),
    (["train", "--path", "/tmp"], "--path is not used with --data synthetic"),
    (["train", "--device", "cuda:0"] if not torch.cuda.is_available() else ["train", "--device", "nope"], "--device"),
    (["train", "--resume", "--out", "{tmp}/empty"], "no checkpoint"),
    (["train", "--threads", "0"], "--threads must be positive"),
    (["train", "--max-history", "-1"], "--max-history must be >= 0"),
    (["train", "--synthetic-users", "0"], "--synthetic-users must be positive"),
    (["evaluate", "--checkpoint", "{tmp}/missing.pt"], "does not exist"),
    (["evaluate", "--checkpoint", "{tmp}/junk.pt"], "junk.pt: not a checkpoint"),
])
def test_bad_arguments_fail_with_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    code, _, err = run(capsys, *(a.replace("{tmp}", str(tmp_path)) for a in argv))
    assert code == 2 and message in err and "Traceback" not in err, err


def test_argparse_rejects_unknown_choices(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--model", "dien"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--tower-hidden", "200,x"])
    assert "comma-separated widths" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    code, stdout, _ = run(capsys)
    assert code == 2 and "train" in stdout and "selfcheck" in stdout and "compare" in stdout


def test_default_threads_follow_idle_cores(monkeypatch):
    from din_ext import training

    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(training.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(training.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert training.default_threads() == 4  # an idle machine: every core, up to torch's count
    monkeypatch.setattr(training.os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert training.default_threads() == 1
    monkeypatch.setattr(training.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert training.default_threads() == 1  # never fewer than one


def test_real_data_goes_through_load_dataset(monkeypatch, tmp_path, capsys):
    """--data amazon|taobao|recbole call din_ext.data.load_dataset(name, path) -> (train, test, schema)."""
    import din_ext.data
    from din_ext.data.synthetic import SyntheticConfig, generate

    calls = []

    def fake_loader(name, path):
        calls.append((name, path))
        if name == "taobao":
            raise ValueError(f"{path}/raw_sample.csv line 3: expected 6 columns, got 2")
        return generate(SyntheticConfig(num_users=50, dense=False), seed=0)

    monkeypatch.setattr(din_ext.data, "load_dataset", fake_loader, raising=False)
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, "train", "--data", "recbole", "--path", str(tmp_path), "--epochs", "1",
                          "--out", str(out), "--threads", "1", "--embed-dim", "4", "--no-progress")
    assert code == 0 and calls == [("recbole", str(tmp_path))] and "DIN on recbole" in stdout
    assert json.loads((out / "metrics.json").read_text())["epoch"] == 1
    code, stdout, _ = run(capsys, "evaluate", "--checkpoint", str(out / "last.pt"))  # data spec from the checkpoint
    assert code == 0 and calls[-1] == ("recbole", str(tmp_path))
    code, _, err = run(capsys, "train", "--data", "taobao", "--path", str(tmp_path), "--out", str(out))
    assert code == 2 and "raw_sample.csv line 3" in err and "Traceback" not in err


def test_train_with_mba_tables_uses_sparse_steps_and_resumes(tmp_path, capsys):
    """--mba-lambda: MBAEmbedding tables stepped by SparseAdam (rows absent from a batch never move), R logged,
    and a resumed run continues exactly like an uninterrupted one."""
    import din_ext
    from din_ext.training import make_optimizer
    from din_ext.data import iterate_batches
    from din_ext.data.synthetic import SyntheticConfig, generate

    train_set, _, schema = generate(SyntheticConfig(num_users=60), seed=1)
    model = din_ext.DIN(schema, embed_dim=8, attention_hidden=(16, 8), tower_hidden=(32, 16), mba_lambda=0.5)
    optimizer = make_optimizer(model, 1e-2)
    table = model.embeddings["item"]
    assert isinstance(table, din_ext.MBAEmbedding) and table.sparse
    batch = next(iterate_batches(train_set, 32, shuffle=True, seed=0))
    before = table.weight.detach().clone()
    model(batch).sum().backward()
    assert table.weight.grad.is_sparse and model.regularization() > 0
    optimizer.step()
    used = torch.unique(torch.cat([batch.item["item"], batch.hist["item"]]))
    moved = (table.weight.detach() != before).any(1).nonzero().flatten()
    assert set(moved.tolist()) <= set(used.tolist()) - {0} and moved.numel() > 0

    out = tmp_path / "mba"
    argv = ["train", *TINY, "--mba-lambda", "0.5", "--out", str(out)]
    code, stdout, _ = run(capsys, *argv, "--epochs", "1")
    assert code == 0 and "MBA R" in stdout
    assert json.loads((out / "metrics.json").read_text())["train_mba_regularization"] > 0
    code, _, _ = run(capsys, "train", "--epochs", "2", "--resume", "--out", str(out), "--no-progress", "--threads", "1")
    assert code == 0
    resumed = json.loads((out / "metrics.json").read_text())
    straight = tmp_path / "straight"
    assert run(capsys, *[a if a != str(out) else str(straight) for a in argv], "--epochs", "2")[0] == 0
    expected = json.loads((straight / "metrics.json").read_text())
    for key in ("auc", "gauc", "logloss", "train_loss"):
        assert resumed[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("argv, message", [
    (["--embed-dim", "0"], "--embed-dim must be positive"),
    (["--mba-lambda", "-1"], "--mba-lambda must be finite and >= 0"),
    (["--mba-lambda", "nan"], "--mba-lambda must be finite and >= 0"),
    (["--mba-lambda", "inf"], "--mba-lambda must be finite and >= 0"),
    (["--lr", "inf"], "--lr must be positive and finite"),
    (["--lr", "nan"], "--lr must be positive and finite"),
    (["--attention-hidden", "100000000000000000000"], "the model options"),
])
def test_bad_model_options_fail_before_training(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", *TINY, "--epochs", "1", "--out", str(out), *argv)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "last.pt").exists()


def test_out_must_be_a_folder(tmp_path, capsys):
    path = tmp_path / "taken"
    path.write_text("a file the user keeps")
    code, _, err = run(capsys, "train", *TINY, "--epochs", "1", "--out", str(path))
    assert code == 2 and f"--out {str(path)!r} is a file" in err and "Traceback" not in err, err
    assert path.read_text() == "a file the user keeps"


def test_predict_output_folder_must_exist(trained, tmp_path, capsys):
    output = tmp_path / "missing" / "preds.csv"
    code, _, err = run(capsys, "predict", "--checkpoint", str(trained / "one" / "last.pt"), "--output", str(output))
    assert code == 2 and "--output" in err and "does not exist" in err and "Traceback" not in err, err
    code, _, err = run(capsys, "predict", "--checkpoint", str(trained / "one" / "last.pt"), "--output", str(tmp_path))
    assert code == 2 and "is a folder" in err, err


@pytest.mark.parametrize("damage", ["corrupt-gzip", "truncated-gzip", "not-utf8"])
def test_data_files_that_fail_to_decode_are_one_line(tmp_path, capsys, damage):
    from din_ext.data.samples import write_sample

    root = tmp_path / "amazon"
    write_sample("amazon", root)
    target = sorted(p for p in root.rglob("*") if p.is_file())[0]
    data = target.read_bytes()
    if damage == "corrupt-gzip":
        import gzip

        packed = gzip.compress(data)
        target = target.with_name(target.name + ".gz") if not target.name.endswith(".gz") else target
        for p in root.rglob("*"):
            if p.is_file() and p.name == target.name[:-3]:
                p.unlink()
        target.write_bytes(packed[:20] + bytes(b ^ 0x5A for b in packed[20:40]) + packed[40:])
    elif damage == "truncated-gzip":
        import gzip

        packed = gzip.compress(data)
        for p in root.rglob("*"):
            if p.is_file() and p == target:
                p.unlink()
        target = target.with_name(target.name + ".gz")
        target.write_bytes(packed[: len(packed) // 2])
    else:
        target.write_bytes(data[:30] + b"\xff\xfe" + data[30:])
    code, _, err = run(capsys, "train", "--data", "amazon", "--path", str(root), "--epochs", "1", "--no-progress",
                       "--out", str(tmp_path / "run"), "--threads", "1")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert target.name in err, err


def test_diverging_loss_stops_and_keeps_checkpoints(tmp_path, capsys, monkeypatch):
    """A loss that becomes NaN names the epoch and step, leaves the earlier checkpoints and writes no metrics.json."""
    from din_ext import training

    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    (out / "metrics.json").unlink()
    before = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt")}
    calls = {"n": 0}
    loss_fn = torch.nn.BCEWithLogitsLoss.forward

    def poisoned(self, logits, labels):
        calls["n"] += 1
        loss = loss_fn(self, logits, labels)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(torch.nn.BCEWithLogitsLoss, "forward", poisoned)
    code, _, err = run(capsys, "train", "--epochs", "2", "--resume", "--out", str(out), "--no-progress",
                       "--threads", "1")
    assert code == 1 and "epoch 2, step 3" in err and "nan" in err and "Traceback" not in err, err
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not (out / "metrics.json").exists()
    assert training.TrainingDiverged.exit_code == 1


def test_recorded_options_apply_only_to_their_data(trained, tmp_path, capsys, monkeypatch):
    """A checkpoint trained with --synthetic-users, evaluated on --data recbole: its synthetic options are not
    blamed (they were not passed, and were recorded for the synthetic data only)."""
    import din_ext.data
    from din_ext.data.synthetic import SyntheticConfig, generate

    monkeypatch.setattr(din_ext.data, "load_dataset",
                        lambda name, path: generate(SyntheticConfig(num_users=60), seed=1), raising=False)
    code, stdout, err = run(capsys, "evaluate", "--checkpoint", str(trained / "one" / "last.pt"), "--data", "recbole",
                            "--path", str(tmp_path))
    assert "--synthetic" not in err and code == 0, err
    assert json.loads(stdout)["rows"] > 0
