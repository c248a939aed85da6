"""Config files of din-ext train: the keys come from the parser, flags override the file, a run records its resolved
options and a config file reproduces a flag-driven run exactly; bad files are one-line errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from din_ext import config
from din_ext.cli import _train_parser, main

TINY = ["--synthetic-users", "60", "--batch-size", "64", "--embed-dim", "8", "--attention-hidden", "16,8",
        "--tower-hidden", "32,16", "--no-progress", "--seed", "1", "--threads", "1"]
TIMINGS = ("samples_per_second", "train_samples_per_second", "train_seconds")  # the only run-to-run differences


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def without_timings(metrics):
    drop = lambda d: {k: v for k, v in d.items() if k not in TIMINGS}  # noqa: E731
    return {**drop(metrics), "history": [drop(h) for h in metrics["history"]]}


def test_printed_defaults_are_the_parsers_options(capsys):
    code, out, _ = run(capsys, "config", "--format", "json")
    assert code == 0
    defaults = json.loads(out)
    assert list(defaults) == list(config.options(_train_parser()))  # every option, in the parser's order
    for key in ("config", "print_config", "help"):
        assert key not in defaults
    # unset options show what a run resolves them to
    assert defaults["data"] == "synthetic" and defaults["seed"] == 0 and defaults["batch_size"] == 256
    assert defaults["lr"] == 0.001 and defaults["attention_hidden"] == [80, 40] and defaults["threads"] is None


def test_flags_override_a_json_file(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"epochs": 1, "embed-dim": 8, "tower_hidden": "64,32", "lr": "1e-2",
                                "activation": "prelu", "no_progress": True}))
    code, out, _ = run(capsys, "train", "--config", path, "--embed-dim", "4", "--print-config")
    assert code == 0
    lines = set(out.splitlines())
    assert {"epochs: 1", "embed_dim: 4", "tower_hidden: [64, 32]", "lr: 0.01", 'activation: "prelu"',
            "no_progress: true"} <= lines, out


def test_printed_config_reads_back_as_the_same_options(tmp_path, capsys):
    """din-ext config's JSON, given back as --config, resolves to itself (nothing is lost or retyped)."""
    code, out, _ = run(capsys, "config", "--format", "json")
    (tmp_path / "defaults.json").write_text(out)
    parsed = config.load(str(tmp_path / "defaults.json"), _train_parser())
    assert parsed["attention_hidden"] == (80, 40) and parsed["lr"] == 0.001
    code, again, _ = run(capsys, "train", "--config", tmp_path / "defaults.json", "--print-config")
    yaml_lines = [line for line in again.splitlines() if not line.startswith("#")]
    assert code == 0 and len(yaml_lines) == len(json.loads(out))


def test_the_config_file_reproduces_a_flag_driven_run_exactly(tmp_path, capsys):
    pytest.importorskip("yaml")
    flags, again = tmp_path / "flags", tmp_path / "again"
    assert main(["train", *TINY, "--epochs", "2", "--lr", "0.003", "--out", str(flags)]) == 0
    recorded = (flags / "config.yaml").read_text()
    assert "lr: 0.003" in recorded and f'out: "{flags}"' in recorded
    code, _, err = run(capsys, "train", "--config", flags / "config.yaml", "--out", again)
    assert code == 0, err
    first, second = (json.loads((d / "metrics.json").read_text()) for d in (flags, again))
    assert without_timings(first) == without_timings(second)
    for name in ("best.pt", "last.pt"):
        a, b = (torch.load(d / name, weights_only=True) for d in (flags, again))
        assert a["epoch"] == b["epoch"] == 2 or name == "best.pt"
        for key in a["state_dict"]:
            assert torch.equal(a["state_dict"][key], b["state_dict"][key]), (name, key)
    # the second run's record differs only in its folder
    assert (again / "config.yaml").read_text() == recorded.replace(str(flags), str(again))


def test_yaml_values_as_argparse_converts_flags(tmp_path):
    yaml = pytest.importorskip("yaml")
    path = tmp_path / "run.yaml"
    # PyYAML reads 1e-3 as a string: it is converted as the flag's text would be
    path.write_text("lr: 1e-3\nbatch-size: 32\nattention_hidden: [36, 12]\ntower_hidden: 50\nsynthetic_users: null\n")
    values = config.load(str(path), _train_parser())
    assert values == {"lr": 0.001, "batch_size": 32, "attention_hidden": (36, 12), "tower_hidden": (50,),
                      "synthetic_users": None}
    # what dump writes, PyYAML reads back to the same values (floats keep a dot and a signed exponent)
    options = {"lr": 1e-05, "mba_lambda": 2.5e-07, "embed_dim": 8, "path": 'a "quoted" path', "tower_hidden": (8,)}
    text = config.dump(options, _train_parser())
    assert config.convert(yaml.safe_load(text), _train_parser(), "dumped") == options


@pytest.mark.parametrize("name,text,message", [
    ("run.json", '{"epoch": 3}', "run.json: unknown key 'epoch' (did you mean 'epochs'?)"),
    ("run.json", '{"epochs": 2.5}', "run.json: key 'epochs': expected an integer, got 2.5"),
    ("run.json", '{"epochs": true}', "run.json: key 'epochs': expected an integer, got True"),
    ("run.json", '{"epochs": "two"}', "run.json: key 'epochs': expected an integer, got 'two'"),
    ("run.json", '{"activation": "tanh"}', "run.json: key 'activation': expected one of"),
    ("run.json", '{"tower_hidden": [0, 4]}', "run.json: key 'tower_hidden': expected positive widths"),
    ("run.json", '{"no_progress": "yes"}', "run.json: key 'no_progress': expected true or false"),
    ("run.json", '{"epochs": null}', "run.json: key 'epochs': null is not a value of this option"),
    ("run.json", '{"path": 3}', "run.json: key 'path': expected a string, got 3"),
    ("run.json", '[1, 2]', "run.json: expected a mapping of option keys to values, got list"),
    ("run.json", '{\n"epochs": 1,\n}', "run.json, line 3: not JSON"),
    ("run.toml", 'epochs = 1', "run.toml: a config file's name ends in .yaml, .yml, .json"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    code, out, err = run(capsys, "train", "--config", path, "--out", tmp_path / "run")
    assert code == 2 and not out and err.count("\n") == 1, err
    assert message in err and str(path) in err, err
    assert not (tmp_path / "run").exists()  # nothing ran


def test_bad_yaml_names_the_line(tmp_path, capsys):
    pytest.importorskip("yaml")
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 1\nlr: [0.1\n")
    code, _, err = run(capsys, "train", "--config", path)
    assert code == 2 and err.count("\n") == 1 and f"{path}, line 3: not YAML" in err, err


def test_missing_config_file_and_missing_pyyaml(tmp_path, capsys, monkeypatch):
    code, _, err = run(capsys, "train", "--config", tmp_path / "absent.json")
    assert code == 2 and "absent.json: cannot read it" in err
    (tmp_path / "run.yaml").write_text("epochs: 1\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    code, _, err = run(capsys, "train", "--config", tmp_path / "run.yaml")
    assert code == 2 and err.count("\n") == 1 and 'pip install "din_ext[config]"' in err and ".json" in err, err
