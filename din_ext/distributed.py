"""Training on several processes with torch.distributed: DistributedDataParallel (gloo on the CPU, NCCL on CUDA),
synchronized Dice statistics, and sparse embedding gradients (MBA included) reduced across the processes.

    torchrun --nproc-per-node 2 -m din_ext train --batch-size 512 ...     # or: din-ext train --nproc 2 ...

    world = din_ext.distributed.init(timeout=300, dice="sync")  # in each process torchrun started
    fit(model, train, test, epochs=2, out="run", world=world)    # rank 0 writes the checkpoints and metrics.json
    world.close()

A ``World`` is the processes of a run. ``World()`` is one process (every collective is the identity); ``init``
returns a ``ProcessGroupWorld``. Training under a world (``din_ext.training.fit``):

- every process reads the same global batches in the same seeded order and trains on its slice of each
  (``shard``): ``batch_size`` is the global batch, and each process's loss is weighted by its share of the rows, so
  the averaged gradient is the global batch's mean gradient;
- the dense parameters go through DistributedDataParallel; the embedding tables (``table_modules``: MBAEmbedding,
  nn.Embedding) are left out of it and reduced by ``reduce_gradients``, which all-gathers the rows of the sparse
  gradients (an MBA table's regularization then counts each distinct id of the GLOBAL batch once) and all-reduces
  the dense ones; a table's gradient may turn sparse after wrapping;
- Dice statistics are per process by default (as BatchNorm's under DDP); ``dice="sync"`` computes them over every
  valid row of the global batch with the exact gradient (as SyncBatchNorm), on the composite path (plain torch ops
  with all-reduced per-feature sums: slower than the fused kernels, which compute their statistics internally);
- evaluation predicts whole batches round-robin (``owns``) and gathers them in order (``gather_batches``), so every
  process computes the metrics of the whole test set, equal to one process's.

Collectives time out after ``timeout`` seconds: a process that fails (or dies) stops the others with an error.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import os
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from din_ext.contract import acc_dtype
from din_ext.data.core import Interactions
from din_ext.mba import MBAEmbedding
from din_ext.modules import Dice, LocalActivationUnit

logger = logging.getLogger("din_ext")

DEFAULT_TIMEOUT = 300.0  # seconds a collective waits for the other processes
DICE_MODES = ("rank", "sync")
COMPOSITE_NOTE = ("sync Dice runs the composite path (plain torch ops with all-reduced per-feature sums), slower "
                  "than the fused kernels")


def sparse_tables(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every module of ``model`` whose weight gets a sparse gradient: a truthy ``sparse``
    attribute and a ``weight`` parameter (MBAEmbedding, nn.Embedding(sparse=True), nn.EmbeddingBag(sparse=True))."""
    return [(name, m) for name, m in table_modules(model) if m.sparse is True]


def table_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every embedding table of ``model``, sparse or not: a boolean ``sparse`` attribute and a
    ``weight`` parameter (MBAEmbedding, nn.Embedding, nn.EmbeddingBag). DDP leaves them all out and
    ``reduce_gradients`` reduces them, so a table may turn sparse after wrapping (``make_optimizer`` does)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(getattr(m, "sparse", None), bool) and isinstance(getattr(m, "weight", None), nn.Parameter)]


def check_tables(model: nn.Module) -> None:
    """Raises ValueError for an MBA table with dense gradients: its union over the processes is not recoverable
    from them (build it with sparse=True, DIN's default)."""
    for name, m in model.named_modules():
        if isinstance(m, MBAEmbedding) and not m.sparse and m.reg_lambda:
            raise ValueError(f"{name}: an MBAEmbedding with sparse=False cannot be regularized over the global batch "
                             f"under DDP; build it with sparse=True")


def ignored_by_ddp(model: nn.Module) -> List[str]:
    """The names of ``model``'s parameters and buffers that DDP must leave alone: every embedding table's (reduced
    by ``reduce_gradients``; an MBA table's frequencies are constant)."""
    names = []
    for name, table in table_modules(model):
        prefix = f"{name}." if name else ""
        names += [prefix + n for n, _ in table.named_parameters(recurse=False)]
        names += [prefix + n for n in table._buffers]
    return names


def shard_rows(batch: Interactions, rank: int, size: int) -> Optional[Interactions]:
    """Process ``rank``'s rows of the global ``batch`` among ``size`` processes: a contiguous slice, disjoint from
    the others' (together they are the batch); None when the batch has fewer rows than there are processes."""
    rows = len(batch)
    if rows < size:
        return None
    if size == 1:
        return batch
    return batch.take(torch.arange(rank * rows // size, (rank + 1) * rows // size))


class World:
    """One process: rank 0 of 1. Every collective is the identity; ``ProcessGroupWorld`` is the distributed one."""

    rank, size = 0, 1

    @property
    def is_main(self) -> bool:
        """The process that writes the checkpoints, metrics.json and the log."""
        return self.rank == 0

    def shard(self, batch: Interactions) -> Optional[Interactions]:
        """This process's rows of the global ``batch`` (shard_rows)."""
        return shard_rows(batch, self.rank, self.size)

    def share(self, rows: int, total: int) -> float:
        """The weight of the mean loss of ``rows`` rows of a global batch of ``total``: with the average over the
        processes (DDP's), the gradient is the global batch's mean gradient."""
        return rows * self.size / total

    def owns(self, index: int) -> bool:
        """Whether this process predicts the evaluation batch ``index`` (round-robin)."""
        return index % self.size == self.rank

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train (``model`` itself in one process); ``model`` must be on its device."""
        return model

    def reduce_gradients(self, model: nn.Module) -> None:
        """After backward: the sparse tables' gradients summed over the processes (nothing in one process)."""

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (Dice running statistics) in every process, before evaluating or saving."""

    def sum(self, value: float) -> float:
        """``value`` summed over the processes."""
        return value

    def gather_batches(self, parts: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """The batches of every process in index order, given this process's (the ones it ``owns``, in order);
        ``like``: a tensor of their dtype and trailing shape, for a process without batches."""
        return torch.cat(list(parts)) if parts else like.new_zeros(0, *like.shape[1:])

    def close(self) -> None:
        """Ends the process group (nothing in one process)."""


class _SumAcrossRanks(torch.autograd.Function):
    """The sum of a tensor over the processes of ``group``; its gradient is the sum of the gradients (every process
    uses the sum)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return _SumAcrossRanks.apply(grad, ctx.group), None


def sync_dice(rows: torch.Tensor, alpha: torch.Tensor, gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor],
              eps: float, group) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training Dice over the valid rows of every process of ``group``, differentiable through the statistics.

    rows: (R, H), this process's valid rows; alpha, gamma, beta: (H,) (gamma, beta None unless affine).
    Returns (y (R, H), mean (H,), biased var (H,), count (0-d): the statistics over the rows of all processes,
    detached). Two all-reduces, of the per-feature sums (and the row count) then of the squared deviations from the
    global mean: the two-pass variance, as the fused kernels compute it.
    """
    features = rows.shape[1]
    sums = _SumAcrossRanks.apply(torch.cat([rows.sum(0), rows.new_full((1,), rows.shape[0])]), group)
    count = sums[features].detach()
    mean = sums[:features] / count.clamp_min(1)  # no rows anywhere: mean and var 0, as the reference's
    centered = rows - mean
    var = _SumAcrossRanks.apply((centered * centered).sum(0), group) / count.clamp_min(1)
    x_hat = centered / torch.sqrt(var + eps)
    if gamma is not None:
        x_hat = gamma * x_hat + beta
    p = torch.sigmoid(x_hat)
    return p * rows + (1 - p) * alpha * rows, mean.detach(), var.detach(), count


class SyncDice(Dice):
    """Dice whose training statistics span every valid row of the global batch (``convert_sync_dice`` makes it);
    in eval mode, and for the parameters and running statistics, it is Dice."""

    stats_group = None

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.training:
            return super().forward(x, mask)
        flat = x.reshape(-1, x.shape[-1])
        valid = None if mask is None else mask.reshape(-1)
        y, mean, var, count = sync_dice(flat if valid is None else flat[valid], self.alpha, self.weight, self.bias,
                                        self.eps, self.stats_group)
        self.update_running_stats(mean, var, count.long())
        if valid is not None:
            y = flat.new_zeros(flat.shape).index_put((valid,), y)
        return y.reshape(x.shape)


class SyncLocalActivationUnit(LocalActivationUnit):
    """The local activation unit whose Dice statistics span every valid (candidate, behaviour) pair of the global
    batch: in training with Dice it runs the composite path (the unit's math in plain torch over the valid pairs,
    each SyncDice all-reducing its sums); otherwise it is LocalActivationUnit (the fused op). The caller validates
    lengths/offsets (DIN.forward does)."""

    def forward(self, query, keys, lengths=None, offsets=None, values=None, max_len=None, *, checked=False):
        if not (self.training and self.activation == "dice" and len(self.activations)):
            return super().forward(query, keys, lengths, offsets, values, max_len, checked=checked)
        if lengths is not None:  # padded (B, L, D): the valid positions as jagged rows
            valid = torch.arange(keys.shape[1], device=keys.device)[None, :] < lengths[:, None]
            keys, values = keys[valid], None if values is None else values[valid]
            offsets = torch.nn.functional.pad(torch.cumsum(lengths.long(), 0), (1, 0))
        per_user = (offsets[1:] - offsets[:-1]).long()
        owner = torch.repeat_interleave(torch.arange(per_user.shape[0], device=keys.device), per_user)
        total = owner.shape[0]
        keys = keys[:total]
        values = keys if values is None else values[:total]
        q = query[:, None] if query.dim() == 2 else query  # (B, C, D)
        users, candidates = q.shape[:2]
        qq = q[owner]  # (total, C, D): each behaviour against each of its user's candidates
        kk = keys[:, None].expand_as(qq)
        h = torch.cat([qq, kk, qq - kk, qq * kk], dim=-1).reshape(total * candidates, -1)
        for linear, activation in zip(self.linears, self.activations):
            h = activation(linear(h))
        scores = self.out(h).reshape(total, candidates) * self.score_scale
        if self.normalization == "softmax":
            index = owner[:, None].expand(total, candidates)
            peak = scores.new_full((users, candidates), -torch.inf).scatter_reduce(0, index, scores.detach(),
                                                                                  "amax")
            exp = torch.exp(scores - peak[owner])
            scores = exp / exp.new_zeros(users, candidates).index_add(0, owner, exp)[owner]
        out = values.new_zeros(users, candidates, values.shape[1]).index_add(0, owner,
                                                                             scores[:, :, None] * values[:, None])
        return out[:, 0] if query.dim() == 2 else out


def convert_sync_dice(model: nn.Module, group=None) -> nn.Module:
    """Turns, in place, every Dice of ``model`` into a SyncDice and every LocalActivationUnit into a
    SyncLocalActivationUnit over the process group ``group`` (default: the whole world); parameters, buffers and
    the state_dict keys stay (the optimizer's references and the checkpoints are unchanged). Returns ``model``.
    Logs once that sync Dice runs the composite path, slower than the fused kernels."""
    converted = False
    for module in model.modules():
        if type(module) is Dice:
            module.__class__ = SyncDice
        elif type(module) is LocalActivationUnit:
            module.__class__ = SyncLocalActivationUnit
        else:
            continue
        converted = True
        if isinstance(module, SyncDice):
            module.stats_group = group
    if converted:
        logger.warning(COMPOSITE_NOTE)
    return model


class ProcessGroupWorld(World):
    """The processes of a torch.distributed process group (``init`` makes it).

    dice: "rank" (per-process Dice statistics, as BatchNorm under DDP) or "sync" (statistics over the global batch,
    on the composite path; a process group of its own carries them, with ``timeout`` seconds, default torch's).
    """

    def __init__(self, dice: str = "rank", group=None, timeout: Optional[float] = None):
        if dice not in DICE_MODES:
            raise ValueError(f"dice must be one of {DICE_MODES}, got {dice!r}")
        dist = torch.distributed
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.root = 0 if group is None else dist.get_global_rank(group, 0)  # rank 0 of the group, globally
        backend = dist.get_backend(group)
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.dice = dice
        # Dice's all-reduces run inside forward and backward, between DDP's bucket all-reduces: a group of their own
        # keeps the two streams of collectives apart.
        self.stats_group = None
        if dice == "sync":
            wait = None if timeout is None else datetime.timedelta(seconds=timeout)
            self.stats_group = dist.new_group(backend=backend, timeout=wait)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel over ``model``'s dense parameters (``model`` on its device); the embedding tables
        (``table_modules``) are broadcast from rank 0 here and reduced by reduce_gradients, whether their gradients
        are sparse or dense (``training.make_optimizer`` may come before or after). With dice="sync", converts the
        Dice layers first (convert_sync_dice)."""
        from torch.nn.parallel import DistributedDataParallel

        check_tables(model)
        if self.dice == "sync":
            convert_sync_dice(model, self.stats_group)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored_by_ddp(model))
        self.broadcast_tables(model)
        # No buffer broadcast at each forward: training uses batch statistics; sync_buffers aligns the running ones
        # when they are used (torch 2.13 renamed the option).
        options = inspect.signature(DistributedDataParallel).parameters
        quiet = "forward_sync_buffers" if "forward_sync_buffers" in options else "broadcast_buffers"
        return DistributedDataParallel(model, process_group=self.group, **{quiet: False})

    def broadcast_tables(self, model: nn.Module) -> None:
        """Rank 0's embedding tables in every process (DDP broadcasts the other parameters when it wraps)."""
        with torch.no_grad():
            for _, table in table_modules(model):
                self._broadcast(table.weight)

    def _broadcast(self, tensor: torch.Tensor) -> None:
        moved = tensor.data.to(self.device)
        torch.distributed.broadcast(moved, src=self.root, group=self.group)
        if moved is not tensor.data:
            tensor.data.copy_(moved)

    def sync_buffers(self, model: nn.Module) -> None:
        model = getattr(model, "module", model)
        constant = {id(b) for _, t in table_modules(model) for b in t.buffers(recurse=False)}
        with torch.no_grad():
            for buffer in model.buffers():
                if id(buffer) not in constant:
                    self._broadcast(buffer)

    def sum(self, value: float) -> float:
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total, group=self.group)
        return float(total)

    def _all_gather_rows(self, rows: torch.Tensor, counts: Sequence[int]) -> List[torch.Tensor]:
        """Every process's ``rows`` (its first dimension ``counts[rank]`` long), padded to the longest for the
        all-gather."""
        longest = max(counts)
        padded = rows.new_zeros(longest, *rows.shape[1:], device=self.device)
        padded[:rows.shape[0]] = rows
        gathered = [torch.empty_like(padded) for _ in range(self.size)]
        torch.distributed.all_gather(gathered, padded, group=self.group)
        return [part[:n] for part, n in zip(gathered, counts)]

    def _counts(self, values: Sequence[int]) -> torch.Tensor:
        """(size, len(values)) int64: every process's ``values``."""
        mine = torch.tensor(list(values), dtype=torch.long, device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.size)]
        torch.distributed.all_gather(gathered, mine, group=self.group)
        return torch.stack(gathered).cpu()

    def gather_batches(self, parts: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        mine = World.gather_batches(self, parts, like)
        owned = self._counts([len(parts)])[:, 0].tolist()  # batches per process
        if not max(owned):
            return mine
        sizes = self._counts([p.shape[0] for p in parts] + [0] * (max(owned) - len(parts)))  # rows per batch
        rows = self._all_gather_rows(mine, sizes.sum(1).tolist())
        pieces = [r.split(s[:n].tolist()) for r, s, n in zip(rows, sizes, owned)]
        return torch.cat([pieces[i % self.size][i // self.size].to(like.device) for i in range(sum(owned))])

    def reduce_gradients(self, model: nn.Module) -> None:
        """The embedding tables' gradients, summed over the processes and divided by their number (as DDP averages
        the other parameters'): a dense one all-reduced, a sparse one's rows all-gathered. An MBA table's
        regularization gradient ``reg_lambda * w_j / n_j``, in the gradient of every process whose slice holds id j,
        is counted once per distinct id of the global batch, and its ``last_regularization`` becomes the global
        batch's R."""
        model = getattr(model, "module", model)
        for _, table in table_modules(model):
            if not table.sparse:
                weight = table.weight
                if weight.grad is None:
                    weight.grad = torch.zeros_like(weight)
                torch.distributed.all_reduce(weight.grad, group=self.group)
                weight.grad /= self.size
        tables = sparse_tables(model)
        if not tables:
            return
        grads = []
        for _, table in tables:
            grad = table.weight.grad
            if grad is not None and not grad.is_sparse:
                raise RuntimeError(f"{type(table).__name__} has sparse=True but a dense gradient")
            grads.append(None if grad is None else grad.coalesce())
        counts = self._counts([0 if g is None else g._nnz() for g in grads])
        for (_, table), grad, count in zip(tables, grads, counts.t().tolist()):
            weight = table.weight
            ids = weight.new_zeros(0, dtype=torch.long) if grad is None else grad.indices()[0]
            rows = weight.new_zeros(0, *weight.shape[1:]) if grad is None else grad.values()
            all_ids = torch.cat(self._all_gather_rows(ids, count)).to(weight.device)
            all_rows = torch.cat(self._all_gather_rows(rows, count)).to(weight.device)
            unique, inverse, holders = torch.unique(all_ids, return_inverse=True, return_counts=True)
            summed = all_rows.new_zeros(unique.shape[0], *weight.shape[1:]).index_add_(0, inverse, all_rows)
            summed /= self.size
            if isinstance(table, MBAEmbedding):
                # each of the `holders` processes added reg_lambda * w_j / n_j; once in all is the global batch's
                kept = weight.detach()[unique]
                scale = table.reg_lambda / table.frequencies[unique].to(weight.dtype)
                summed += ((1 - holders.to(weight.dtype) / self.size) * scale)[:, None] * kept
                table.last_regularization = (0.5 * (scale * (kept * kept).sum(1)).sum()).to(acc_dtype(weight.dtype))
            weight.grad = torch.sparse_coo_tensor(unique[None], summed, weight.shape, is_coalesced=True,
                                                  check_invariants=False)

    def close(self) -> None:
        if self.stats_group is not None:
            torch.distributed.destroy_process_group(self.stats_group)
            self.stats_group = None
        if self.group is None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets WORLD_SIZE, RANK and
    MASTER_ADDR)."""
    return all(k in os.environ for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR"))


def init(timeout: float = DEFAULT_TIMEOUT, dice: str = "rank", device: Optional[torch.device] = None) -> World:
    """The world of this process: from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT) a
    ProcessGroupWorld, NCCL for a CUDA ``device`` (the process's GPU, cuda:LOCAL_RANK, becomes current) and gloo
    otherwise; without that environment ``World()``, one process. Collectives time out after ``timeout`` seconds.
    dice: "rank" or "sync" (ProcessGroupWorld)."""
    if not timeout > 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout}")
    if dice not in DICE_MODES:
        raise ValueError(f"dice must be one of {DICE_MODES}, got {dice!r}")
    if not launched():
        return World()
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return ProcessGroupWorld(dice, timeout=timeout)


def process_device(device: torch.device) -> torch.device:
    """The device of this process under torchrun: cuda:LOCAL_RANK for a CUDA ``device`` without an index."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


