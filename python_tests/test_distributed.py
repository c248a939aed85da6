"""din_ext.distributed: 2-process DDP training on the CPU (gloo) against 1-process training.

Sync-Dice training is compared in float64: in float32 the two runs (fused kernels in one process, the composite path
with all-reduced sums in two) drift apart by rounding alone, about 1e-5 relative after 40 steps.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from din_ext import distributed, training
from din_ext.data.core import iterate_batches
from din_ext.data.synthetic import load_synthetic
from din_ext.model import DIN, load_checkpoint
from din_ext.modules import LocalActivationUnit

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment(rank: int, size: int, port: int) -> dict:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(size), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def _spawn(worker, *args, processes: int = 2) -> None:
    """Runs worker(rank, size, port, *args) in ``processes`` fresh processes; re-raises the first failure."""
    mp.spawn(worker, args=(processes, _free_port(), *args), nprocs=processes, join=True)


def _data(users: int = 150):
    return load_synthetic(seed=0, users=users)


def _model(schema, dtype=torch.float64, **options) -> DIN:
    torch.manual_seed(0)
    options = {"embed_dim": 4, "attention_hidden": (8, 4), "tower_hidden": (8, 4), **options}
    return DIN(schema, **options).to(dtype)


class Streamed:
    """A batch source (not Interactions) over in-memory data: fit and evaluate read its user ids and labels from
    the batches."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def batches(self, batch_size, *, shuffle=False, seed=0):
        return iterate_batches(self.data, batch_size, shuffle=shuffle, seed=seed)


# -- workers (top level: torch.multiprocessing pickles them by name) ----------------------------------------------

FIT = {"epochs": 2, "batch_size": 25, "lr": 3e-3, "eval_batch_size": 300}  # 113 steps an epoch, odd slices
RANK_FIT = {"epochs": 2, "batch_size": 64, "lr": 3e-3, "eval_batch_size": 300}


def _sync_worker(rank, size, port, out):
    """Synchronized Dice: a 2-epoch fit with MBA tables, then one step of each _sparse_cases model."""
    os.environ.update(_environment(rank, size, port))
    torch.set_num_threads(1)
    world = distributed.init(timeout=60, dice="sync")
    try:
        train, test, schema = _data()
        model = _model(schema, mba_lambda=0.05)
        result = training.fit(model, train, test, out=os.path.join(out, "ddp"), world=world, **FIT)
        saved = {"state": model.state_dict(), "result": result}
        for name, model, batch in _sparse_cases():
            part = world.shard(batch)
            wrapped = world.wrap(model)
            if name == "sparse_after_wrap":
                model.sparse_gradients = True  # as make_optimizer after world.wrap
            loss = _loss(wrapped, model, part) * world.share(len(part), len(batch))
            loss.backward()
            world.reduce_gradients(wrapped)
            saved[name] = {"grads": {k: p.grad for k, p in model.named_parameters()},
                           "reg": model.regularization() if isinstance(model, DIN) else None,
                           "ids": part.item["item"].tolist() + part.hist["item"].tolist()}
        torch.save(saved, os.path.join(out, f"rank{rank}.pt"))
    finally:
        world.close()


def _rank_worker(rank, size, port, out):
    """Per-process Dice: a 2-epoch fit; a 1-epoch fit resumed to 2 epochs; an evaluation of a batch source."""
    os.environ.update(_environment(rank, size, port))
    torch.set_num_threads(1)
    world = distributed.init(timeout=60)
    try:
        train, test, schema = _data(users=100)
        model = _model(schema, torch.float32)
        result = training.fit(model, train, test, out=os.path.join(out, "full"), world=world, **RANK_FIT)
        streamed = training.evaluate(model, Streamed(test), 256, world=world)  # 3 batches over 2 processes
        training.fit(_model(schema, torch.float32), train, test, out=os.path.join(out, "part"), world=world,
                     **{**RANK_FIT, "epochs": 1})
        torch.distributed.barrier()  # rank 0 has written part/last.pt
        checkpoint = load_checkpoint(os.path.join(out, "part", "last.pt"))
        resumed = DIN.from_checkpoint(checkpoint)
        again = training.fit(resumed, train, test, out=os.path.join(out, "part"), world=world,
                             resume_from=checkpoint, **RANK_FIT)
        torch.save({"state": model.state_dict(), "result": result, "streamed": streamed,
                    "resumed": resumed.state_dict(), "again": again}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        world.close()


class _SparseModel(nn.Module):
    """nn.Embedding(sparse=True) and a linear head: the generic sparse-gradient path."""

    def __init__(self, rows):
        super().__init__()
        self.table = nn.Embedding(rows, 3, sparse=True).double()
        self.head = nn.Linear(3, 1).double()
        self.tasks = ("click",)

    def forward(self, batch):
        return self.head(self.table(batch.item["item"]))


def _sparse_cases():
    train, _, schema = _data(users=60)
    batch = next(iterate_batches(train, 41, shuffle=True, seed=3))
    torch.manual_seed(1)
    sparse = _SparseModel(schema.item_fields["item"])
    return [("mba", _model(schema, mba_lambda=0.5).train(), batch), ("embedding", sparse, batch),
            ("dense", _model(schema).train(), batch), ("sparse_after_wrap", _model(schema).train(), batch)]


def _loss(model, din, batch):
    labels = torch.stack([batch.labels[t] for t in din.tasks], 1).double()
    return nn.functional.binary_cross_entropy_with_logits(model(batch), labels)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


@pytest.fixture(scope="module")
def synced(tmp_path_factory):
    """The files of one _sync_worker run (rank0.pt, rank1.pt, ddp/), and the folder."""
    out = tmp_path_factory.mktemp("sync")
    _spawn(_sync_worker, str(out))
    return out, [torch.load(out / f"rank{r}.pt") for r in range(2)]


# -- tests --------------------------------------------------------------------------------------------------------


def test_sync_dice_training_equals_one_process(tmp_path, synced):
    """2 processes with synchronized Dice (attention and tower) and MBA tables train the same weights as one
    process on the same global batches (226 steps, float64), and report the same metrics."""
    out, got = synced
    train, test, schema = _data()
    model = _model(schema, mba_lambda=0.05)
    expected = training.fit(model, train, test, out=tmp_path / "one", **FIT)
    for name, value in model.state_dict().items():
        for rank in range(2):
            other = got[rank]["state"][name]
            if value.is_floating_point():
                assert _relative(other, value) < 1e-5, (name, rank)
            else:
                assert torch.equal(other, value), name
    for rank in range(2):
        result = got[rank]["result"]
        assert result["rows"] == len(test)
        for key in ("auc", "gauc"):
            assert result[key] == expected[key], key
        for key in ("logloss", "train_loss", "train_mba_regularization"):
            assert result[key] == pytest.approx(expected[key], rel=1e-9, abs=0), key
    # rank 0 wrote the run folder, with the trained model
    assert os.path.exists(out / "ddp" / "metrics.json") and os.path.exists(out / "ddp" / "best.pt")
    written = torch.load(out / "ddp" / "last.pt")["state_dict"]
    assert all(torch.equal(written[k], v) for k, v in got[0]["state"].items())


def test_mba_union_and_sparse_gradients_exact(synced):
    """The reduced sparse gradients of 2 processes equal one process's on the whole global batch: MBA regularizes
    each distinct id of the global batch once (ids shared by the slices included), a plain nn.Embedding's sparse
    gradient is summed, DIN's dense tables (left out of DDP) are all-reduced, and tables turned sparse after
    world.wrap (make_optimizer after wrapping) are reduced as sparse ones."""
    _, got = synced
    shared = set(got[0]["mba"]["ids"]) & set(got[1]["mba"]["ids"]) - {0}
    assert shared, "the slices must share ids for the union to matter"
    for name, model, batch in _sparse_cases():
        if name == "sparse_after_wrap":
            model.sparse_gradients = True
        _loss(model, model, batch).backward()
        for key, p in model.named_parameters():
            want = p.grad.to_dense() if p.grad.is_sparse else p.grad
            for rank in range(2):
                grad = got[rank][name]["grads"][key]
                assert grad.is_sparse == p.grad.is_sparse, key
                grad = grad.to_dense() if grad.is_sparse else grad
                assert torch.allclose(grad, want, rtol=1e-10, atol=1e-15), (name, key, rank)
        if name == "mba":
            for rank in range(2):
                assert float(got[rank]["mba"]["reg"]) == pytest.approx(float(model.regularization()), rel=1e-12)


def test_rank_mode_trains_evaluates_and_resumes(tmp_path):
    """Per-process Dice statistics: the processes end with identical weights and running statistics (rank 0's);
    the sharded, gathered evaluation equals one process's evaluation of those weights bit for bit (in-memory and
    streamed data); a run resumed from rank 0's checkpoint ends where the uninterrupted one does."""
    _spawn(_rank_worker, str(tmp_path))
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, value in got[0]["state"].items():
        assert torch.equal(got[1]["state"][name], value), name
        for rank in range(2):
            assert torch.equal(got[rank]["resumed"][name], value), (name, rank)
    _, test, schema = _data(users=100)
    model = _model(schema, torch.float32)
    model.load_state_dict(got[0]["state"])
    expected = training.evaluate(model, test, RANK_FIT["eval_batch_size"])
    streamed = training.evaluate(model, Streamed(test), 256)
    for rank in range(2):
        result = got[rank]["result"]
        for key in ("auc", "gauc", "logloss", "rows"):
            assert result[key] == expected[key], key
            assert got[rank]["streamed"][key] == streamed[key], key
            assert got[rank]["again"][key] == result[key], key
    assert got[0]["result"]["auc"] != training.evaluate(_model(schema, torch.float32), test)["auc"]  # it trained


def test_sync_composite_path_equals_fused_op():
    """The composite path of SyncLocalActivationUnit (a process group of one: the all-reduces are identities)
    equals the fused op: outputs, input and parameter gradients and running statistics; both normalizations, one
    and three candidates per row, an empty history and storage past the last offset."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                         world_size=1)
    try:
        generator = torch.Generator().manual_seed(5)
        lengths = torch.tensor([3, 0, 5, 1])
        offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
        for normalization in ("none", "softmax"):
            unit = LocalActivationUnit(6, (7, 5), normalization=normalization).double().train()
            sync = LocalActivationUnit(6, (7, 5), normalization=normalization).double().train()
            sync.load_state_dict(unit.state_dict())
            distributed.convert_sync_dice(sync)
            assert isinstance(sync, distributed.SyncLocalActivationUnit)
            for query in (torch.randn(4, 6, generator=generator, dtype=torch.float64),
                          torch.randn(4, 3, 6, generator=generator, dtype=torch.float64)):
                keys = torch.randn(11, 6, generator=generator, dtype=torch.float64)  # 2 rows past the last offset
                results = []
                for layer in (unit, sync):
                    q, k = query.clone().requires_grad_(), keys.clone().requires_grad_()
                    out = layer(q, k, offsets=offsets)
                    out.pow(2).sum().backward()
                    results.append([out, q.grad, k.grad, *[p.grad.clone() for p in layer.parameters()],
                                    *[b.clone() for b in layer.buffers()]])
                    layer.zero_grad()
                for a, b in zip(*results):
                    assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), normalization
    finally:
        torch.distributed.destroy_process_group()


_STALLING = """
import os, sys, time
import torch
from din_ext import distributed, training
from din_ext.data.core import iterate_batches
from din_ext.data.synthetic import load_synthetic
from din_ext.model import DIN

class Stalling:
    def __init__(self, data):
        self.data = data
    def __len__(self):
        return len(self.data)
    def batches(self, batch_size, *, shuffle=False, seed=0):
        for step, batch in enumerate(iterate_batches(self.data, batch_size, shuffle=shuffle, seed=seed)):
            if step == 5 and os.environ["RANK"] == "1":
                open(sys.argv[2], "w").close()
                time.sleep(3600)  # the test kills this process now
            yield batch

world = distributed.init(timeout=float(sys.argv[3]))
train, test, schema = load_synthetic(seed=0, users=60)
training.fit(DIN(schema, embed_dim=4, attention_hidden=(4,), tower_hidden=(4,)), Stalling(train), test, epochs=1,
             out=sys.argv[1], batch_size=16, world=world)
"""


def test_killed_rank_ends_the_job_with_an_error(tmp_path):
    """Rank 1 is killed (SIGKILL) in the middle of an epoch: rank 0 stops with an error, within the timeout."""
    script, marker, timeout = tmp_path / "stalling.py", tmp_path / "stalled", 20
    script.write_text(_STALLING)
    port = _free_port()
    processes = []
    for rank in range(2):
        env = {**os.environ, **_environment(rank, 2, port), "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / "out"), str(marker),
                                           str(timeout)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert time.monotonic() < deadline and processes[1].poll() is None, processes[1].communicate()[1]
            time.sleep(0.1)
        processes[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, err = processes[0].communicate(timeout=timeout + 30)
        elapsed = time.monotonic() - killed
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert processes[0].returncode != 0
    assert elapsed < timeout + 10, elapsed
    assert "Error" in err, err[-2000:]


def test_cli_nproc_trains(tmp_path):
    """din-ext train --nproc 2 runs the command under torchrun; rank 0 alone logs and writes the run folder."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "din_ext", "train", "--nproc", "2", "--synthetic-users", "60", "--embed-dim",
               "4", "--attention-hidden", "4", "--tower-hidden", "4", "--batch-size", "64", "--no-progress",
               "--sync-dice", "--dist-timeout", "60", "--epochs", "1", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes" in run.stdout and run.stdout.count("epoch 1/1") == 1
    assert [h["epoch"] for h in torch.load(out / "last.pt")["history"]] == [1]


def test_cli_distributed_flags_are_checked(capsys):
    from din_ext import cli

    assert cli.main(["train", "--nproc", "0"]) == 2
    assert "--nproc must be positive" in capsys.readouterr().err
    assert cli.main(["train", "--sync-dice", "--epochs", "1"]) == 2
    assert "--sync-dice applies to a distributed run" in capsys.readouterr().err


def test_one_process_world_is_the_identity():
    train, _, schema = _data(users=30)
    batch = next(iterate_batches(train, 7))
    world = distributed.World()
    assert world.shard(batch) is batch and world.share(7, 7) == 1.0 and world.owns(3)
    model = _model(schema)
    assert world.wrap(model) is model
    parts = [torch.ones(2, 1), torch.zeros(1, 1)]
    assert torch.equal(world.gather_batches(parts, parts[0]), torch.tensor([[1.0], [1.0], [0.0]]))
    with pytest.raises(ValueError, match="dice must be one of"):
        distributed.init(dice="global")
    with pytest.raises(ValueError, match="timeout must be positive"):
        distributed.init(timeout=0)
