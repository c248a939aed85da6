"""DIN with its embedding tables sharded by TorchRec (the optional extra ``din_ext[torchrec]``).

``ShardedDIN`` is ``din_ext.DIN`` whose tables form one TorchRec ``EmbeddingCollection``, built on the meta device so
that no process ever holds a whole table; ``shard`` hands it to TorchRec's ``DistributedModelParallel`` with a
row-wise or table-wise plan from TorchRec's planner: each table's rows live on the ranks the plan names (updated by
FBGEMM's fused optimizer in the backward), the dense part (attention, tower, heads) is replicated under DDP. A step
is ONE lookup of every table (one all-to-all); then DIN's own forward runs on the looked-up embeddings.

Equal to ``DIN`` on the same global batch (tested): row 0 (padding/OOV) is filtered out of the lookup and gives zero
embeddings and no gradient, as DIN's ``padding_idx=0``; TorchRec divides the tables' gradients by the world size,
as DDP averages the dense ones, so with every rank's loss the mean over its equal slice of the global batch, both
are the global batch's gradients. Dice's batch statistics are per rank, as under DDP (and DDP broadcasts rank 0's
running statistics).

MBA (``mba_lambda > 0``) is exact as docs/design.md states it for the GLOBAL batch: the distinct non-padding ids of
every rank's slice are all-gathered per table, their union U is split among the ranks, each rank looks its share up
in the same lookup as its data ids and adds ``mba_lambda / 2 * sum ||w_j||^2 / n_j`` (times the world size, which
TorchRec's gradient division undoes) to the backward of the logits, not to their value. So each j in U gets
``mba_lambda * w_j / n_j`` once, inside the one fused-optimizer update of row j. FBGEMM's optimizer weight decay is
not used for it: that decays every batch row once per rank that looked it up, without 1/n_j. The frequencies n_j
are the schema's tensors, which every rank holds (8 bytes a row), not sharded.

Launch one process per rank (``torchrun --nproc-per-node N``) after ``torch.distributed.init_process_group``, or
call ``train`` there. TorchRec 1.9.2 needs torch 2.14 and fbgemm-gpu (CUDA) or fbgemm-gpu-cpu 1.9.0.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import re
import time
from datetime import timedelta
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from din_ext import _validate
from din_ext.data.core import OOV, Interactions, iterate_batches
from din_ext.model import DIN

logger = logging.getLogger("din_ext")

# --sharding name -> TorchRec's ShardingType value
PLANS = {"rowwise": "row_wise", "tablewise": "table_wise"}


def _torchrec():
    """The torchrec module, or an ImportError that says how to get it (fbgemm's failed library load included)."""
    try:
        import torchrec
        import torchrec.distributed  # loads fbgemm_gpu's operators
    except (ImportError, OSError) as exc:
        raise ImportError("din_ext.sharding needs TorchRec: pip install 'din_ext[torchrec]' (torchrec 1.9.2 with "
                          "torch 2.14 and fbgemm-gpu-cpu 1.9.0, or fbgemm-gpu on CUDA); it failed with: "
                          f"{_validate.first_line(exc)}") from None
    return torchrec


def table_name(index: int, field: str) -> str:
    """TorchRec's name of field ``field``'s table: ``t<index>_<field>`` with non-word characters as ``_``.

    Never the bare field: the collection keeps its tables in an nn.ModuleDict, where a table named ``items`` (or
    ``keys``, ``values``, ...) would shadow a method, and a ``.`` is not allowed.
    """
    return f"t{index}_{re.sub(r'[^0-9A-Za-z_]', '_', field)}"


class _AddGradient(torch.autograd.Function):
    """Identity on ``output``; its backward also sends gradient 1 into the scalar ``extra`` (the MBA term)."""

    @staticmethod
    def forward(ctx, output, extra):
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones((), dtype=grad.dtype, device=grad.device)


class _Looked(nn.Module):
    """Stands in for a DIN table in ``ShardedDIN.embeddings``: returns the embeddings that ShardedDIN.forward's one
    EmbeddingCollection lookup gave the field, in the order DIN's forward asks for them. No parameters."""

    def __init__(self):
        super().__init__()
        self.pending: Optional[Tuple[torch.Tensor, ...]] = None
        self.last_regularization: Optional[torch.Tensor] = None  # this rank's share of the field's MBA term

    def forward(self, *ids: torch.Tensor, checked: bool = False) -> Tuple[torch.Tensor, ...]:
        if self.pending is None or len(self.pending) != len(ids):
            raise RuntimeError("a ShardedDIN table is looked up only inside ShardedDIN.forward")
        out, self.pending = self.pending, None
        return out


class ShardedDIN(DIN):
    """``din_ext.DIN`` whose tables are one TorchRec EmbeddingCollection (``self.tables``) on the meta device.

    Same arguments as DIN. ``regularization()`` is this rank's share of the step's MBA term (the shares sum to R).
    Table ``table_name(i, field)`` holds field i of ``[*user_fields, *item_fields]``; its
    rows are initialised N(0, embedding_std) by TorchRec when the shards are allocated (``shard``). Row 0 is never
    read (forward gives zeros for id 0), so its stored value does not matter. Run it through ``shard``;
    unsharded, it cannot run (its tables have no storage).
    """

    def __init__(self, schema, **kwargs: Any):
        super().__init__(schema, **kwargs)
        torchrec = _torchrec()
        fields = [*schema.user_fields, *schema.item_fields]
        self.table_names = {f: table_name(i, f) for i, f in enumerate(fields)}
        self.table_sizes = sizes = {**schema.user_fields, **schema.item_fields}
        configs = [torchrec.EmbeddingConfig(
            name=self.table_names[f], embedding_dim=self.dims[f], num_embeddings=sizes[f],
            feature_names=[f"{self.table_names[f]}.{part}" for part in self._parts(f)],
            init_fn=functools.partial(nn.init.normal_, mean=0.0, std=self.embedding_std)) for f in fields]
        self.tables = torchrec.EmbeddingCollection(tables=configs, device=torch.device("meta"))
        # The MBA frequencies n_j: the schema's own tensors, not buffers, which DDP would broadcast at every step.
        self._frequencies = {self.table_names[f]: schema.frequencies[f] for f in fields} if self.mba_lambda else {}
        self._checked_total: Optional[int] = None

    def _parts(self, field: str) -> Tuple[str, ...]:
        """The KJT features of ``field``'s table: the field's column, the history's, MBA's share of the union."""
        return (("query",) + (("hist",) if field in self.schema.history_fields else ())
                + (("mba",) if self.mba_lambda else ()))

    def make_embedding(self, field: str, num_embeddings: int, embedding_dim: int) -> nn.Module:
        """A parameter-free stand-in for the table of ``field`` (the rows are in ``self.tables``)."""
        if num_embeddings < 1:
            raise ValueError(f"field {field!r}: table size must be >= 1 (row 0 is padding/OOV), got {num_embeddings}")
        if self.mba_lambda:
            if field not in self.schema.frequencies:
                raise ValueError(f"mba_lambda > 0 needs schema.frequencies[{field!r}] (training counts per row)")
            counts = self.schema.frequencies[field]
            _validate.tensor(counts, f"schema.frequencies[{field!r}]", dims=1)
            if counts.shape[0] != num_embeddings:
                raise ValueError(f"schema.frequencies[{field!r}] must have shape [{num_embeddings}], got "
                                 f"{tuple(counts.shape)}")
        return _Looked()

    def _check_batch(self, batch: Interactions) -> Optional[int]:
        # forward has checked the batch before the lookup; DIN.forward's own call gets that result
        if self._checked_total is not None:
            return self._checked_total
        return super()._check_batch(batch)

    def forward(self, batch: Interactions) -> torch.Tensor:
        """DIN.forward (logits (S, T) or (S, C, T)) on this rank's rows, all tables looked up in one call."""
        if _validate.tracing():
            raise RuntimeError("ShardedDIN does not trace (torch.compile/torch.export): export the gathered DIN "
                               "(to_din)")
        total = super()._check_batch(batch)  # ids outside a table would be clamped by FBGEMM without an error
        regularization = self._lookup_all(batch, total)
        self._checked_total = total
        try:
            logits = super().forward(batch)
        finally:
            self._checked_total = None
        return logits if regularization is None else _AddGradient.apply(logits, regularization)

    # -- the lookup -------------------------------------------------------------------------------------------------

    def _columns(self, batch: Interactions, total: int) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """feature -> (ids (n,), lengths (S,)) of this rank's batch, before the MBA share and the padding filter."""
        rows = len(batch)
        ones = torch.ones(rows, dtype=torch.long, device=batch.hist_offsets.device)
        columns = {}
        for field in self.table_names:
            name = self.table_names[field]
            if field in self.schema.user_fields:
                columns[f"{name}.query"] = (batch.user[field], ones)
                continue
            item = batch.item[field]
            columns[f"{name}.query"] = (item.reshape(-1), ones * (item.shape[1] if item.dim() == 2 else 1))
            if field in self.schema.history_fields:
                columns[f"{name}.hist"] = (batch.hist[field][:total], batch.hist_lengths)
        return columns

    def _mba_shares(self, columns, rows: int) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """feature -> (ids, lengths) of this rank's share of each table's global union of distinct non-padding ids:
        the union's every ``world``-th id, from this rank's position on, all in row 0 (the other rows empty)."""
        local = {}
        for field, name in self.table_names.items():
            ids = torch.cat([columns[f"{name}.{part}"][0] for part in self._parts(field) if part != "mba"])
            local[name] = torch.unique(ids[ids != OOV])
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        offsets, start = {}, 0
        for field, name in self.table_names.items():  # one id space for all tables: one all_gather serves them all
            offsets[name], start = start, start + self.table_sizes[field]
        mine = torch.cat([local[name] + offsets[name] for name in local])
        union = torch.unique(torch.cat(_all_gather_variable(mine))) if world > 1 else mine
        share = union[rank::world]
        shares = {}
        for field, name in self.table_names.items():
            ids = share[(share >= offsets[name]) & (share < offsets[name] + self.table_sizes[field])] - offsets[name]
            lengths = torch.zeros(rows, dtype=torch.long, device=ids.device)
            lengths[0] = ids.numel()
            shares[f"{name}.mba"] = (ids, lengths)
        return shares

    def _lookup_all(self, batch: Interactions, total: int) -> Optional[torch.Tensor]:
        """Looks every table up once (a KeyedJaggedTensor of all features) and gives each stand-in its embeddings;
        returns the MBA term to backpropagate (None without MBA, or in eval / no-grad)."""
        torchrec = _torchrec()
        rows = len(batch)
        columns = self._columns(batch, total)
        regularize = bool(self.mba_lambda) and self.training and torch.is_grad_enabled()
        if self.mba_lambda:  # every rank has the same features, so eval looks up an empty MBA share
            empty = (batch.hist_offsets.new_zeros(0), batch.hist_offsets.new_zeros(rows))
            columns.update(self._mba_shares(columns, rows) if regularize else
                           {f"{n}.mba": empty for n in self.table_names.values()})
        keys, values, lengths, kept = [], [], [], {}
        for key, (ids, per_row) in columns.items():
            keep = ids != OOV
            within = torch.zeros(ids.numel() + 1, dtype=torch.long, device=ids.device)
            torch.cumsum(keep, 0, out=within[1:])
            ends = torch.cumsum(per_row, 0)
            keys.append(key)
            values.append(ids[keep])
            lengths.append(within[ends] - within[ends - per_row])
            kept[key] = keep
        features = torchrec.KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
        looked = self.tables(features)
        embedded = {}
        for key, keep in kept.items():
            part = looked[key].values()
            full = part.new_zeros(keep.shape[0], part.shape[-1])
            embedded[key] = full.index_put((keep,), part)  # id 0 stays zero and sends no gradient to row 0
        regularization = []
        for field, name in self.table_names.items():
            table = self.embeddings[field]
            query = embedded[f"{name}.query"]
            item = batch.user.get(field, batch.item.get(field))
            query = query.view(*item.shape, query.shape[-1])
            table.pending = (query, embedded[f"{name}.hist"]) if field in self.schema.history_fields else (query,)
            table.last_regularization = None
            if regularize:
                share = embedded[f"{name}.mba"]
                ids = columns[f"{name}.mba"][0]
                if self._frequencies[name].device != ids.device:
                    self._frequencies[name] = self._frequencies[name].to(ids.device)
                n = self._frequencies[name][ids].clamp_min(1).to(share.dtype)  # below 1 counts as 1, as MBAEmbedding
                value = 0.5 * self.mba_lambda * (share.pow(2).sum(-1) / n).sum()
                table.last_regularization = value.detach()
                regularization.append(value)
        if not regularization:
            return None
        # TorchRec divides every lookup's gradient by the world size (as DDP averages); R's must arrive whole.
        scale = _gradient_division(self.tables)
        return torch.stack(regularization).sum() * scale


def _gradient_division(tables: nn.Module) -> int:
    """The factor TorchRec divides the gradients of a sharded collection's lookups by (1 when not sharded)."""
    from torchrec.distributed.comm_ops import get_gradient_division
    from torchrec.distributed.embedding import ShardedEmbeddingCollection

    if isinstance(tables, ShardedEmbeddingCollection) and get_gradient_division() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_gather_variable(tensor: torch.Tensor) -> Sequence[torch.Tensor]:
    """Every rank's 1-D ``tensor`` (of any length), in rank order."""
    world = dist.get_world_size()
    count = torch.tensor([tensor.numel()], dtype=torch.long, device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = tensor.new_zeros(max(counts))
    padded[:tensor.numel()] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return [g[:c] for g, c in zip(gathered, counts)]


# -- sharding and the weights -----------------------------------------------------------------------------------------


def shard(model: ShardedDIN, plan: Any = "rowwise", *, table_optimizer: type = torch.optim.SGD,
          table_optimizer_kwargs: Optional[Mapping[str, Any]] = None, topology: Any = None,
          device: Optional[torch.device] = None):
    """``model`` as a TorchRec ``DistributedModelParallel``: the tables sharded, the dense part under DDP.

    Collective: every rank calls it, after ``torch.distributed.init_process_group`` (gloo on the CPU, NCCL on CUDA).
    plan: "rowwise" or "tablewise" (TorchRec's planner places every table with that sharding type and the fused
    kernel) or a ``torchrec.distributed.types.ShardingPlan`` of your own. table_optimizer(_kwargs): the tables'
    optimizer, fused into the backward by FBGEMM (default SGD with lr 0.01; torch.optim.SGD, Adagrad or
    torchrec.optim.RowWiseAdagrad, and on CUDA also Adam); the dense parameters (``dense_parameters``) take any
    optimizer of yours.
    topology: a ``torchrec.distributed.planner.Topology`` (its per-rank memory bounds what a rank may hold);
    default: every rank of the world on ``device``. device: default cuda:<local rank> under NCCL, else cpu.
    """
    _torchrec()
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    if not isinstance(model, ShardedDIN):
        raise TypeError(f"model must be a din_ext.sharding.ShardedDIN, got {type(model).__name__}")
    if not dist.is_initialized():
        raise RuntimeError("shard needs torch.distributed: call init_process_group first (e.g. under torchrun)")
    if isinstance(plan, str) and plan not in PLANS:
        raise ValueError(f"plan must be one of {sorted(PLANS)} or a torchrec ShardingPlan, got {plan!r}")
    if device is None:
        nccl = dist.get_backend() == "nccl"
        device = torch.device(f"cuda:{torch.cuda.current_device()}" if nccl else "cpu")
    device = torch.device(device)
    from torchrec.optim import RowWiseAdagrad

    if device.type == "cpu" and table_optimizer not in (torch.optim.SGD, torch.optim.Adagrad, RowWiseAdagrad):
        raise ValueError(f"table_optimizer {getattr(table_optimizer, '__name__', table_optimizer)} has no FBGEMM CPU "
                         "kernel: use torch.optim.SGD, torch.optim.Adagrad or torchrec.optim.RowWiseAdagrad")
    kwargs = dict(table_optimizer_kwargs or {"lr": 0.01})
    apply_optimizer_in_backward(table_optimizer, model.tables.parameters(), kwargs)
    sharder = EmbeddingCollectionSharder()
    if isinstance(plan, str):
        constraints = {name: ParameterConstraints(sharding_types=[PLANS[plan]],
                                                  compute_kernels=[EmbeddingComputeKernel.FUSED.value])
                       for name in model.table_names.values()}
        if topology is None:
            topology = Topology(world_size=dist.get_world_size(), compute_device=device.type)
        planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
        plan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
    return DistributedModelParallel(model, device=device, plan=plan, sharders=[sharder])


def dense_parameters(sharded) -> list:
    """The parameters of a ``shard`` result that the fused table optimizer does not update (the dense part)."""
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    return [p for _, p in in_backward_optimizer_filter(sharded.named_parameters())]


def _table_states(sharded) -> Dict[str, Any]:
    """field -> the ShardedTensor of its table in ``sharded``'s state_dict (views of the fused weights)."""
    module = sharded.module
    state = module.state_dict()
    return {field: state[f"tables.embeddings.{name}.weight"] for field, name in module.table_names.items()}


@torch.no_grad()
def load_din(sharded, din: DIN) -> None:
    """Copies an unsharded DIN's weights into a ``shard`` result: every rank its shards of each table and the
    dense part. Collective in effect (every rank calls it with the same DIN); the DIN must have the same config."""
    module = sharded.module
    if din.config != module.config:
        raise ValueError("din's config differs from the sharded model's (ShardedDIN.from_config(din.config))")
    source = din.state_dict()
    for field, table in _table_states(sharded).items():
        weight = source[f"embeddings.{field}.weight"]
        for piece in table.local_shards():
            (r, c), (h, w) = piece.metadata.shard_offsets, piece.metadata.shard_sizes
            piece.tensor.copy_(weight[r:r + h, c:c + w])
    for key, value in module.state_dict().items():
        if not key.startswith("tables."):
            value.copy_(source[key])


@torch.no_grad()
def to_din(sharded, dst: int = 0) -> Optional[DIN]:
    """The unsharded DIN of a ``shard`` result on rank ``dst`` (None on the others), e.g. for din_ext.save_checkpoint,
    evaluation or export. Collective; rank ``dst`` must hold every table whole."""
    module = sharded.module
    din = DIN.from_config(module.config) if dist.get_rank() == dst else None
    target = din.state_dict() if din is not None else {}
    for field, table in _table_states(sharded).items():
        out = target.get(f"embeddings.{field}.weight")
        table.gather(dst=dst, out=out)
        if out is not None:
            out[OOV].zero_()  # never read by ShardedDIN; DIN's padding row is zero
    if din is not None:
        for key, value in module.state_dict().items():
            if not key.startswith("tables."):
                target[key].copy_(value)
    return din


# -- training ---------------------------------------------------------------------------------------------------------


def _my_rows(batch: Interactions) -> Tuple[Interactions, torch.Tensor]:
    """This rank's slice of a global batch (the ranks take disjoint, consecutive slices of near-equal size) and the
    mask of its real rows: a batch of fewer rows than ranks is padded with copies of its row 0, so that every rank
    looks up (the lookup is collective), and the copies are masked out."""
    rows, world = len(batch), dist.get_world_size()
    index = torch.cat([torch.arange(rows), torch.zeros(max(world - rows, 0), dtype=torch.long)])
    position = torch.arange(index.numel()).tensor_split(world)[dist.get_rank()]
    return batch.take(index[position]), position < rows


@torch.no_grad()
def _broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's dense buffers (Dice's running statistics) to every rank. DDP broadcasts them before a training
    forward only, and a rank's own forward then updates them with its rows; evaluation and to_din use rank 0's."""
    for name, buffer in module.named_buffers():
        if not name.startswith("tables."):
            dist.broadcast(buffer, 0)


@torch.no_grad()
def evaluate(sharded, data: Interactions, batch_size: int = 4096) -> Dict[str, Any]:
    """auc, gauc, logloss of the first task (every task's under "tasks"), samples_per_second and rows, over the WHOLE of ``data``,
    as din_ext.training.evaluate gives in one process: each rank predicts its slice of every batch, and the
    predictions are all-gathered, with rank 0's Dice running statistics on every rank (as to_din's DIN has them).
    Collective; every rank gets the result."""
    from din_ext import metrics
    from din_ext.training import _defined, check_positive

    batch_size = check_positive("batch_size", batch_size)
    module = sharded.module
    _broadcast_buffers(module)
    was_training = module.training
    sharded.eval()
    local_p, local_users, local_labels = [], [], []
    start = time.perf_counter()
    try:
        for batch in iterate_batches(data, batch_size):
            part, real = _my_rows(batch)
            local_p.append(torch.sigmoid(sharded(part).float())[real])
            local_users.append(part.user_id[real])
            local_labels.append(torch.stack([part.labels[t] for t in module.tasks], 1)[real])
    finally:
        sharded.train(was_training)
    seconds = time.perf_counter() - start
    tasks = len(module.tasks)
    p = torch.cat(_all_gather_variable(torch.cat(local_p).reshape(-1))).view(-1, tasks)
    labels = torch.cat(_all_gather_variable(torch.cat(local_labels).reshape(-1))).view(-1, tasks)
    users = torch.cat(_all_gather_variable(torch.cat(local_users)))
    per_task = {task: {"auc": _defined(metrics.auc, labels[:, k], p[:, k]),
                       "gauc": _defined(metrics.gauc, labels[:, k], p[:, k], users),
                       "logloss": metrics.logloss(labels[:, k], p[:, k])} for k, task in enumerate(module.tasks)}
    return {**per_task[module.tasks[0]], "samples_per_second": p.shape[0] / max(seconds, 1e-9), "rows": p.shape[0],
            "tasks": per_task}


def fit(sharded, train: Interactions, test: Optional[Interactions] = None, *, epochs: int, batch_size: int,
        lr: float = 1e-3, dense_optimizer: Optional[torch.optim.Optimizer] = None, seed: int = 0,
        eval_batch_size: int = 4096, out: Optional[str] = None, gather: bool = True,
        checkpoint_extra: Optional[Mapping[str, Any]] = None, log: Optional[Callable[[str], None]] = None
        ) -> Dict[str, Any]:
    """Trains a ``shard`` result for ``epochs`` epochs on global batches of ``batch_size`` rows; returns the last
    epoch's metrics (on ``test``, if given) with the history. Collective: every rank calls it with the same data.

    Epoch e visits the rows in the order seeded with ``seed * 1000 + e`` (as din_ext.training.fit), every rank
    the same; each rank trains on its slice of every global batch (a global batch of fewer rows than ranks is
    skipped). The loss is the sum over tasks of each task's mean binary cross-entropy on the rank's rows. The tables
    step with the fused optimizer given to ``shard``; the dense part with ``dense_optimizer`` (default Adam, lr).
    out: rank 0 writes OUT/metrics.json and, with ``gather`` (rank 0 must hold every table whole), OUT/last.pt, a
    din_ext DIN checkpoint of the gathered model (with ``checkpoint_extra``'s keys; ``din-ext evaluate/predict``
    need "data", the data options) that din_ext.DIN.from_checkpoint reads.
    """
    from din_ext.model import save_checkpoint
    from din_ext.training import check_positive

    epochs, batch_size = check_positive("epochs", epochs), check_positive("batch_size", batch_size)
    log = log or logger.info
    module = sharded.module
    optimizer = dense_optimizer or torch.optim.Adam(dense_parameters(sharded), lr=lr)
    bce = nn.BCEWithLogitsLoss()
    history = []
    for epoch in range(epochs):
        sharded.train()
        start, seen, total = time.perf_counter(), 0, torch.zeros(())
        for batch in iterate_batches(train, batch_size, shuffle=True, seed=seed * 1000 + epoch):
            if len(batch) < dist.get_world_size():
                continue
            part, _ = _my_rows(batch)
            logits = sharded(part)
            loss = sum(bce(logits[:, k], part.labels[t]) for k, t in enumerate(module.tasks))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            seen += len(batch)
        speed = seen / max(time.perf_counter() - start, 1e-9)
        result = {"epoch": epoch + 1, "train_samples_per_second": speed}
        if test is not None:
            result.update(evaluate(sharded, test, eval_batch_size))
        history.append(result)
        shown = "  ".join(f"{k} {result[k]:.4f}" for k in ("auc", "gauc", "logloss") if k in result)
        if dist.get_rank() == 0:
            log(f"epoch {epoch + 1}/{epochs}: {shown}  train {speed:,.0f} samples/s ({dist.get_world_size()} ranks)")
    final = {**history[-1], "model": "din" if module.pooling == "attention" else "base", "history": history}
    if out is not None:
        din = to_din(sharded) if gather else None
        if dist.get_rank() == 0:
            os.makedirs(out, exist_ok=True)
            if din is not None:
                save_checkpoint(os.path.join(out, "last.pt"), din.checkpoint(epoch=epochs, **dict(checkpoint_extra or {})))
            with open(os.path.join(out, "metrics.json"), "w") as f:
                json.dump(final, f, indent=2, allow_nan=True)
    return final


def run(model: ShardedDIN, plan: str, train: Interactions, test: Optional[Interactions] = None, *,
        device: Optional[torch.device] = None, timeout: timedelta = timedelta(minutes=10),
        table_optimizer: Optional[type] = None, table_lr: Optional[float] = None, **fit_arguments: Any
        ) -> Dict[str, Any]:
    """``fit`` of ``model`` sharded with ``plan``, in a process that torchrun started (``din-ext train
    --sharding``): joins the process group of torchrun's environment (gloo on the CPU, NCCL on CUDA; collectives
    time out after ``timeout``) unless one exists, then shard and fit.

    The tables' fused optimizer: by default Adam at fit's lr on CUDA (FBGEMM's Adam steps only the rows of the
    step, like the SparseAdam of one-process MBA tables), and Adagrad at lr 0.01 on the CPU, where FBGEMM has no
    Adam (its CPU kernels: SGD, Adagrad, row-wise Adagrad); table_optimizer/table_lr choose another.
    """
    owned = not dist.is_initialized()
    if owned:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError("sharded training runs one process per rank under torchrun, e.g. torchrun "
                               "--nproc-per-node 2 -m din_ext train --sharding rowwise ...")
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    try:
        lr = fit_arguments.setdefault("lr", 1e-3)
        on_cuda = dist.get_backend() == "nccl"
        table_optimizer = table_optimizer or (torch.optim.Adam if on_cuda else torch.optim.Adagrad)
        table_lr = table_lr or (lr if table_optimizer is torch.optim.Adam else 0.01)
        sharded = shard(model, plan, table_optimizer=table_optimizer, table_optimizer_kwargs={"lr": table_lr},
                        device=device)
        final = fit(sharded, train, test, **fit_arguments)
        del sharded
        if owned:
            dist.barrier()  # no rank tears its group down while another still talks to it
        return final
    finally:
        if owned:
            close_group()


def close_group() -> None:
    """Destroys this process's default group (all ranks call it): TorchRec's modules and the fused optimizer hold
    it, so they go first (gc), and the group's gloo threads are joined here rather than at interpreter exit, where
    a process that left its group alive can abort ("terminate called without an active exception")."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
