"""din_ext.lightning: a 2-process pl.Trainer(accelerator="cpu", devices=2, strategy="ddp") run (needs lightning)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lightning")

from din_ext import training  # noqa: E402
from din_ext.data.synthetic import load_synthetic  # noqa: E402
from din_ext.model import DIN  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lightning's "ddp" strategy starts the other process by running this script again.
SCRIPT = """
import json, sys
import torch
import lightning.pytorch as pl
from din_ext.data.synthetic import load_synthetic
from din_ext.lightning import DINDataModule, DINLightningModule
from din_ext.model import DIN

torch.set_num_threads(1)
train, test, schema = load_synthetic(seed=0, users=80)
torch.manual_seed(0)
model = DIN(schema, embed_dim=4, attention_hidden=(8, 4), tower_hidden=(8, 4), mba_lambda=0.01)
module = DINLightningModule(model, lr=3e-3, sync_dice=sys.argv[2] == "sync")
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0)
trainer.fit(module, DINDataModule(train, test, batch_size=64, eval_batch_size=200))
state = {k: v.clone() for k, v in model.state_dict().items()}
torch.save({"state": state, "metrics": module.metrics}, f"{sys.argv[1]}/rank{trainer.global_rank}.pt")
"""


@pytest.mark.parametrize("dice", ["rank", "sync"])
def test_two_process_lightning_run(tmp_path, dice):
    """Both processes end with the same weights (the sparse MBA tables included), trained; the validation AUC,
    GAUC and logloss over the gathered test set equal one process's evaluation of those weights."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT", None)
    run = subprocess.run([sys.executable, str(script), str(tmp_path), dice], env=env, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, value in got[0]["state"].items():
        assert torch.equal(got[1]["state"][name], value), name
    _, test, schema = load_synthetic(seed=0, users=80)
    torch.manual_seed(0)
    model = DIN(schema, embed_dim=4, attention_hidden=(8, 4), tower_hidden=(8, 4), mba_lambda=0.01)
    untrained = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(got[0]["state"])
    assert not torch.equal(untrained["embeddings.item.weight"], got[0]["state"]["embeddings.item.weight"])
    expected = training.evaluate(model, test, 200)
    for rank in range(2):
        metrics = got[rank]["metrics"]
        assert metrics["rows"] == len(test)
        for key in ("auc", "gauc", "logloss"):
            assert metrics[key] == expected[key], (key, json.dumps({k: metrics[k] for k in ("auc", "gauc")}))


def test_module_checks_its_arguments():
    from din_ext.lightning import DINDataModule, DINLightningModule

    train, test, schema = load_synthetic(seed=0, users=20)
    with pytest.raises(TypeError, match="model must be a din_ext.DIN"):
        DINLightningModule(torch.nn.Linear(2, 2))
    with pytest.raises(training.ArgumentError, match="lr must be positive"):
        DINLightningModule(DIN(schema), lr=0)
    with pytest.raises(training.ArgumentError, match="batch_size must be positive"):
        DINDataModule(train, test, batch_size=0)
