"""din-ext tune: Optuna trials in their own run directories, parallel workers, the best trial, a killed search resumed
(a tiny synthetic config, a few trials)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from din_ext.cli import main

TINY = ["--synthetic-users", "40", "--epochs", "1", "--batch-size", "64", "--threads", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def trial_values(out):
    return {t["trial"]: t for t in json.loads((out / "best.json").read_text())["trials"]}


def test_trials_run_in_parallel_and_a_killed_search_resumes(tmp_path, capsys):
    optuna = pytest.importorskip("optuna")
    yaml = pytest.importorskip("yaml")
    out = tmp_path / "tune"
    assert main(["tune", *TINY, "--trials", "2", "--jobs", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "best.json").read_text())
    assert len(summary["trials"]) == 2 and "best trial" in printed
    assert summary["best_value"] == max(t["gauc"] for t in summary["trials"])
    for trial in summary["trials"]:  # each trial trained into its own folder, with the options it drew
        run_dir = out / f"trial-{trial['trial']:04d}"
        assert trial["out"] == str(run_dir)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["gauc"] == trial["gauc"]
        recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert recorded["lr"] == trial["params"]["lr"] and recorded["embed_dim"] == trial["params"]["embed_dim"]
        assert recorded["mba_lambda"] == trial["params"].get("mba_lambda", 0.0)

    # a search killed while trial 2 ran leaves it RUNNING in the study: the next search runs it again, same options
    study = optuna.load_study(study_name="din-ext-tune", storage=f"sqlite:///{out}/study.db")
    killed = study.ask()
    killed_lr = killed.suggest_float("lr", 1e-4, 1e-2, log=True)
    assert main(["tune", *TINY, "--trials", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 trial(s) done, 1 to go (1 killed one(s) run again first)" in printed, printed
    trials = optuna.load_study(study_name="din-ext-tune", storage=f"sqlite:///{out}/study.db").get_trials()
    states = [t.state.name for t in trials]
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"], states
    assert trials[2].user_attrs["killed"] and trials[3].user_attrs["rerun_of"] == 2
    assert trials[3].params["lr"] == killed_lr
    assert len(trial_values(out)) == 3
    # asking for no more trials than are done trains nothing and reports the same best
    assert main(["tune", *TINY, "--trials", "3", "--out", str(out)]) == 0
    assert "0 to go" in capsys.readouterr().out and len(trial_values(out)) == 3


def test_tune_without_optuna_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    code = main(["tune", *TINY, "--trials", "1", "--out", str(tmp_path / "tune")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and 'pip install "din_ext[tune]"' in err, err


@pytest.mark.parametrize("argv,message", [(["--trials", "0"], "--trials must be positive"),
                                         (["--trials", "2", "--jobs", "0"], "--jobs must be positive"),
                                         (["--trials", "2", "--resume"], "--resume does not apply to tune")])
def test_bad_tune_arguments(tmp_path, capsys, argv, message):
    code = main(["tune", *TINY, *argv, "--out", str(tmp_path / "tune")])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
