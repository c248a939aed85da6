"""PyTorch Lightning for DIN (the optional extra ``din_ext[lightning]``): a LightningModule and a LightningDataModule.

    import lightning.pytorch as pl
    from din_ext.lightning import DINDataModule, DINLightningModule

    train, test, schema = din_ext.data.load_dataset("synthetic")
    module = DINLightningModule(din_ext.DIN(schema, mba_lambda=0.01), lr=1e-3)
    data = DINDataModule(train, test, batch_size=256)
    pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2).fit(module, data)
    module.metrics   # auc, gauc, logloss of the last validation epoch, over the whole (gathered) test set

The semantics are din_ext.training.fit's under din_ext.distributed: ``batch_size`` is the global batch, every process
takes its slice of each; the sparse tables (MBA) stay out of DistributedDataParallel and are reduced with the union
of the global batch's ids; validation predicts whole batches round-robin and gathers them, so AUC and GAUC are one
process's. ``sync_dice=True`` synchronizes Dice's statistics (the composite path, slower than the fused kernels).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from din_ext import distributed, training
from din_ext.model import DIN

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package of the same API
    try:
        import pytorch_lightning as pl
    except ImportError as exc:
        raise ImportError("din_ext.lightning needs PyTorch Lightning 2: pip install 'din_ext[lightning]' "
                          "(the lightning package)") from exc


def _world(trainer, dice: str) -> distributed.World:
    """The processes of ``trainer``'s run: one, or its torch.distributed default group."""
    if trainer is None or trainer.world_size == 1 or not torch.distributed.is_initialized():
        return distributed.World()
    return distributed.ProcessGroupWorld(dice)


class _Batches(torch.utils.data.IterableDataset):
    """One epoch of din_ext batches for the process ``rank`` of ``size``, read when the DataLoader iterates.

    training: this process's slice of every global batch, as (slice, global rows), in the order seeded with
    ``seed * 1000 + epoch`` (fit's); otherwise the whole batches it owns (round-robin), unshuffled."""

    def __init__(self, module: "DINDataModule", data: training.Data, training_split: bool):
        self.module, self.data, self.training_split = module, data, training_split

    def __iter__(self):
        trainer = self.module.trainer
        rank, size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if not self.training_split:
            for index, batch in enumerate(training._batches(self.data, self.module.eval_batch_size)):
                if index % size == rank:
                    yield batch
            return
        epoch = trainer.current_epoch if trainer is not None else 0
        seed = self.module.seed * 1000 + epoch
        for batch in training._batches(self.data, self.module.batch_size, shuffle=True, seed=seed):
            part = distributed.shard_rows(batch, rank, size)
            if part is not None:
                yield part, len(batch)


def _as_is(item):
    return item


class DINDataModule(pl.LightningDataModule):
    """Train and validation batches of any din_ext data: in-memory ``Interactions`` (every din_ext loader's) or a
    batch source (``din_ext.data.stream.open_prepared``'s splits, anything with ``batches()``).

    batch_size: the global training batch (each process takes its slice); eval_batch_size: of validation; seed: of
    the per-epoch shuffle (epoch e: seed * 1000 + e, as din_ext.training.fit)."""

    def __init__(self, train: training.Data, test: training.Data, batch_size: int = 256,
                 eval_batch_size: int = 4096, seed: int = 0):
        super().__init__()
        self.train, self.test = train, test
        self.batch_size = training.check_positive("batch_size", batch_size)
        self.eval_batch_size = training.check_positive("eval_batch_size", eval_batch_size)
        self.seed = int(seed)

    def train_dataloader(self):
        # batch_size=None and no conversion: the dataset's items are the batches
        return torch.utils.data.DataLoader(_Batches(self, self.train, True), batch_size=None, collate_fn=_as_is)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(_Batches(self, self.test, False), batch_size=None, collate_fn=_as_is)


class DINLightningModule(pl.LightningModule):
    """DIN (or BaseModel) as a LightningModule, trained as din_ext.training.fit trains it.

    model: a DIN; lr: of the optimizers (din_ext.training.make_optimizer: row-wise Adam on the tables, Adam on the rest,
    stepped together: manual optimization); sync_dice: Dice statistics over the global batch under DDP (default:
    per process). After each validation epoch ``metrics`` holds auc, gauc, logloss (and "tasks") over the whole
    validation set, also logged as val_auc, val_gauc, val_logloss.
    """

    def __init__(self, model: DIN, lr: float = 1e-3, sync_dice: bool = False):
        super().__init__()
        if not isinstance(model, DIN):
            raise TypeError(f"model must be a din_ext.DIN, got {type(model).__name__}")
        self.model = model
        self.lr = training.check_positive("lr", lr, float)
        self.sync_dice = bool(sync_dice)
        self.automatic_optimization = False
        self.metrics: Optional[Dict[str, Any]] = None
        self._outputs: List[tuple] = []
        self._processes = distributed.World()
        # the embedding tables are reduced in training_step (an MBA table's union over the global batch), not by
        # DDP; every table is sparse, as make_optimizer (in configure_optimizers) makes them
        model.sparse_gradients = True
        distributed.check_tables(model)
        self._ddp_params_and_buffers_to_ignore = [f"model.{name}" for name in distributed.ignored_by_ddp(model)]

    def forward(self, batch):
        return self.model(batch)

    def setup(self, stage: str) -> None:
        self._processes = _world(self.trainer, "sync" if self.sync_dice else "rank")
        if self.sync_dice and self._processes.size > 1:
            distributed.convert_sync_dice(self.model, self._processes.stats_group)

    def on_fit_start(self) -> None:
        if self._processes.size > 1:
            self._processes.broadcast_tables(self.model)  # DDP broadcasts the other parameters

    def configure_optimizers(self):
        optimizer = training.make_optimizer(self.model, self.lr)
        return list(getattr(optimizer, "optimizers", [optimizer]))

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        if isinstance(batch, tuple):
            part, rows = batch
            return part.to(device), rows
        return batch.to(device)

    def training_step(self, batch, batch_idx):
        part, rows = batch
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        loss = training.batch_loss(self.model, part)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss * self._processes.share(len(part), rows))
        self._processes.reduce_gradients(self.model)
        for optimizer in optimizers:
            optimizer.step()
        self.log("train_loss", loss.detach(), prog_bar=True, batch_size=len(part))
        return loss.detach()

    def on_validation_epoch_start(self) -> None:
        self._processes.sync_buffers(self.model)  # rank 0's running statistics everywhere
        self._outputs = []

    def validation_step(self, batch, batch_idx):
        probabilities = torch.sigmoid(self.model(batch).float())
        labels = torch.stack([batch.labels[t] for t in self.model.tasks], 1).float()
        self._outputs.append((probabilities.cpu(), batch.user_id.cpu(), labels.cpu()))

    def on_validation_epoch_end(self) -> None:
        tasks = self.model.tasks
        probabilities, users, labels = (
            self._processes.gather_batches([o[k] for o in self._outputs], like)
            for k, like in enumerate((torch.zeros(0, len(tasks)), torch.zeros(0, dtype=torch.long),
                                      torch.zeros(0, len(tasks)))))
        self._outputs = []
        if not probabilities.shape[0]:
            return
        self.metrics = training.score(tasks, probabilities, users, {t: labels[:, k] for k, t in enumerate(tasks)})
        for key in ("auc", "gauc", "logloss"):  # every process has the same values: no reduction
            self.log(f"val_{key}", self.metrics[key])
