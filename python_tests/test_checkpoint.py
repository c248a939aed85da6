"""Checkpoints that cannot be used: every broken file fails with one exception type naming the path and the problem,
through the library (load_checkpoint, DIN.from_checkpoint) and through the command line (evaluate, predict, resume)."""

from __future__ import annotations

import json
import os
import zipfile

import pytest
import torch

from din_ext.cli import main
from din_ext.data.synthetic import SyntheticConfig, generate
from din_ext.model import DIN, CheckpointError, load_checkpoint, save_checkpoint


class RunsCode:
    """A pickled object whose unpickling would call os.system: must be refused (weights_only=True)."""

    def __reduce__(self):
        return (os.system, ("echo this must never run",))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A real checkpoint of a tiny DIN (path, dict)."""
    schema = generate(SyntheticConfig(num_users=20, num_items=30, num_categories=6), seed=0)[2]
    state = DIN(schema, embed_dim=4, attention_hidden=(8,), tower_hidden=(8,)).checkpoint(epoch=1)
    path = tmp_path_factory.mktemp("good") / "good.pt"
    save_checkpoint(path, state)
    return path, state


def _write_bad(kind: str, path, good) -> None:
    good_path, state = good
    if kind == "text":
        path.write_text("epoch 1: auc 0.71\nthis is a log, not a checkpoint\n")
    elif kind == "json":
        path.write_text(json.dumps({"format": 1, "config": {}, "state_dict": {}}))
    elif kind == "random":
        path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = good_path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "directory":
        path.mkdir()
    elif kind == "code":
        torch.save({**state, "payload": RunsCode()}, path)
    elif kind == "not-a-dict":
        torch.save([1, 2, 3], path)
    elif kind in ("state_dict", "config"):
        torch.save({k: v for k, v in state.items() if k != kind}, path)
    elif kind == "schema":
        torch.save({**state, "config": {k: v for k, v in state["config"].items() if k != "schema"}}, path)
    elif kind == "bad-schema":
        config = dict(state["config"], schema={"user_fields": {"user": 3}})
        torch.save({**state, "config": config}, path)
    elif kind == "wrong-weights":
        torch.save({**state, "state_dict": {"heads.weight": torch.zeros(3, 3)}}, path)
    elif kind == "format":
        torch.save({**state, "format": 99}, path)
    elif kind == "no-format":
        torch.save({k: v for k, v in state.items() if k != "format"}, path)
    else:
        raise AssertionError(kind)


BAD = ["text", "json", "random", "empty", "truncated", "directory", "code", "not-a-dict", "state_dict", "config",
       "schema", "bad-schema", "wrong-weights", "format", "no-format"]
PROBLEM = {  # a word of the message that says what is wrong
    "text": "not a checkpoint", "json": "not a checkpoint", "random": "not a checkpoint", "empty": "empty",
    "truncated": "truncated or corrupt", "directory": "directory", "code": "could run code",
    "not-a-dict": "not a dict", "state_dict": "'state_dict'", "config": "'config'", "schema": "'schema'",
    "bad-schema": "schema", "wrong-weights": "weights", "format": "format 99", "no-format": "format",
}


def _check_message(message: str, path) -> None:
    assert str(path) in message, message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message, message
    assert "\n" not in message.strip(), message


@pytest.mark.parametrize("kind", BAD)
def test_library_refuses_broken_checkpoints(kind, good, tmp_path):
    path = tmp_path / f"{kind}.pt"
    _write_bad(kind, path, good)
    loads = [lambda: DIN.from_checkpoint(path), lambda: DIN.from_checkpoint(str(path))]
    if kind not in ("bad-schema", "wrong-weights"):  # a readable file of the right format: from_checkpoint finds it
        loads.append(lambda: load_checkpoint(path))
    for load in loads:
        with pytest.raises(CheckpointError) as info:
            load()
        assert isinstance(info.value, ValueError)
        _check_message(str(info.value), path)
        assert PROBLEM[kind] in str(info.value), str(info.value)


def test_code_running_pickle_never_runs(good, tmp_path, capfd):
    path = tmp_path / "code.pt"
    _write_bad("code", path, good)
    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(path)
    assert "must never run" not in capfd.readouterr().out


def test_checkpoint_dict_without_a_path_is_named(good):
    _, state = good
    with pytest.raises(CheckpointError, match=r"checkpoint: .*lacks 'state_dict'"):
        DIN.from_checkpoint({k: v for k, v in state.items() if k != "state_dict"})


def test_good_checkpoint_still_loads(good):
    path, state = good
    assert DIN.from_checkpoint(path).config == DIN.from_config(state["config"]).config


@pytest.mark.parametrize("kind", ["text", "random", "empty", "truncated", "code", "config", "format"])
@pytest.mark.parametrize("command", ["evaluate", "predict", "resume"])
def test_cli_reports_broken_checkpoints_in_one_line(kind, command, good, tmp_path, capsys):
    if command == "resume":
        out = tmp_path / "run"
        out.mkdir()
        path = out / "last.pt"
        _write_bad(kind, path, good)
        before = path.read_bytes()
        argv = ["train", "--resume", "--out", str(out), "--epochs", "3", "--no-progress"]
    else:
        path = tmp_path / "bad.pt"
        _write_bad(kind, path, good)
        argv = [command, "--checkpoint", str(path)] + (["--output", str(tmp_path / "p.csv")]
                                                       if command == "predict" else [])
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    _check_message(err, path)
    if command == "resume":
        assert path.read_bytes() == before  # the failed run left the checkpoint as it was
        assert not (out / "metrics.json").exists()


def test_zip_that_is_not_a_torch_archive(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="not a checkpoint") as info:
        load_checkpoint(path)
    _check_message(str(info.value), path)
