"""Training, evaluation and prediction of a DIN: the library under the ``din-ext`` command (and the benchmarks).

    model = DIN(schema)                                   # torch.manual_seed(seed) first: a seeded initialization
    metrics = fit(model, train, test, epochs=2, out="run", log=print)
    checkpoint = load_checkpoint("run/last.pt")           # later: resume up to 4 epochs, exactly as a 4-epoch run
    metrics = fit(DIN.from_checkpoint(checkpoint), train, test, epochs=4, out="run", resume_from=checkpoint)
    probabilities, rows_per_second = predict(model, test)
    train, test, schema = open_prepared("prepared/")      # or any data with batches(): fit streams it
    metrics = fit(DIN(schema), train, test, epochs=1, out="run")

Bad input raises TrainingError (a ValueError); ArgumentError names the argument at fault, TrainingDiverged stops a run
whose loss is no longer finite.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple, Union

import torch
import torch.optim.optimizer as optim_module

from din_ext import _backend, _ext, metrics
from din_ext.distributed import World
from din_ext.data.core import Interactions, Schema, iterate_batches
from din_ext.data.stream import prefetched
from din_ext.model import DIN, save_checkpoint

logger = logging.getLogger("din_ext")

# model name -> the pooling of DIN's history: "base" is the paper's BaseModel
POOLING = {"din": "attention", "base": "sum"}
# optimization options recorded in each checkpoint; a resumed run defaults to the checkpoint's
TRAIN_DEFAULTS = {"batch_size": 256, "lr": 1e-3}
# what a checkpoint needs beyond a model to resume: the keys fit writes
RESUME_KEYS = ("optimizer", "epoch", "history", "best", "data", "options")

_BCE = torch.nn.BCEWithLogitsLoss()


class TrainingError(ValueError):
    """Bad input to fit, evaluate or predict, or a run that cannot go on; the message is one line."""


class ArgumentError(TrainingError):
    """A bad argument; the message starts with the argument's name, ``argument`` (the CLI swaps in its flag)."""

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument


class TrainingDiverged(TrainingError):
    """The loss or the predictions became NaN or infinite: the run stops, its earlier checkpoints kept."""

    exit_code = 1  # the input was valid; the run failed (the din-ext command exits 2 for other errors)


def check_positive(name: str, value, kind=int):
    """``kind(value)``; raises ArgumentError unless ``value`` is positive (and finite)."""
    if value is None or not value > 0 or not math.isfinite(value):
        raise ArgumentError(name, f"{name} must be positive{' and finite' if kind is float else ''}, got {value}")
    return kind(value)


def resolve_device(name: Union[str, torch.device, None]) -> torch.device:
    """The device named ``name``; "auto" or None: cuda if torch sees one, else cpu."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ArgumentError("device", f"device {name!r} is not a device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("device", f"device {name}: torch sees no CUDA device (torch {torch.__version__}); "
                                      f"use the cpu device (--device cpu)")
    return device


def default_threads() -> int:
    """torch's thread count, cut to the cores left idle by the rest of the machine (1-minute load average).

    Every din_ext kernel and most torch ops end in an OpenMP barrier; on a busy machine a thread that is not scheduled
    stalls the others at each one, so fewer threads than cores run faster there.
    """
    threads = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return threads
    return max(1, min(threads, round((os.cpu_count() or threads) - load)))


def check_fits(model: DIN, schema: Schema, what: str) -> None:
    """Raises TrainingError unless data of ``schema`` has every field, table size, dense width and task of ``model``."""
    ours = model.schema
    for key in ("user_fields", "item_fields", "history_fields", "dense_dim"):
        if getattr(schema, key) != getattr(ours, key):
            raise TrainingError(f"{what} has {key} {getattr(schema, key)}, the checkpoint's model "
                                f"{getattr(ours, key)}; use the data (and options) it was trained on")
    missing = [t for t in ours.tasks if t not in schema.tasks]
    if missing:
        raise TrainingError(f"{what} has no labels for the model's tasks {missing}")


def check_resumable(checkpoint: Mapping[str, Any]) -> None:
    """Raises ArgumentError("resume_from") unless ``checkpoint`` holds what fit needs to resume (RESUME_KEYS)."""
    missing = [k for k in RESUME_KEYS if k not in checkpoint]
    if missing:
        raise ArgumentError("resume_from", f"resume_from lacks {', '.join(map(repr, missing))} (not written by "
                                           f"din_ext.training.fit or din-ext train)")


# -- optimizers -----------------------------------------------------------------------------------------------------


class RowAdam(torch.optim.Optimizer):
    """Adam over the rows of sparse gradients (lazy Adam: torch.optim.SparseAdam's update and state): a step reads
    and writes only the rows in the gradient, O(rows x D) whatever the table size.

    params: tensors whose ``.grad`` is sparse COO over dimension 0 (DIN's tables with ``sparse_gradients``, or
    ``din_ext.MBAEmbedding``); an uncoalesced gradient is coalesced first. For the rows j of the gradient g, with t
    the parameter's step count: ``m_j = b1 m_j + (1 - b1) g_j``, ``v_j = b2 v_j + (1 - b2) g_j^2``,
    ``w_j -= lr sqrt(1 - b2^t) / (1 - b1^t) * m_j / (sqrt(v_j) + eps)``; other rows and their moments stay.
    The state (step, exp_avg, exp_avg_sq per parameter) is SparseAdam's, so either loads the other's state_dict.

    How a group's step runs (``RowAdam.kernel``): "fused" where its parameters and moments are contiguous cpu tensors
    and the extension is built: the C++ op din_ext::_row_adam_ updates each row and its moments in one pass, every
    table at once; else (CUDA, or no extension) "foreach", logged once: the rows of every table are gathered,
    updated with torch foreach ops and scattered back. Both run SparseAdam's operations in its order: on the cpu,
    foreach gives SparseAdam's results bit for bit, fused agrees to an ulp (its square root is correctly rounded,
    torch's vectorized one within an ulp). SparseAdam runs the same operations through sparse tensors (sparse_mask,
    sparse adds), ~1.7x slower than foreach on DIN's tables (docs/design.md, training).
    """

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 maximize: bool = False):
        if not (lr > 0 and eps > 0 and all(0 <= b < 1 for b in betas)):
            raise ValueError(f"RowAdam needs lr > 0, eps > 0 and betas in [0, 1), got lr {lr}, eps {eps}, betas "
                             f"{betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "maximize": maximize})
        self._logged_foreach = False

    @staticmethod
    def kernel(tensors: Sequence[torch.Tensor]) -> str:
        """The step that updates ``tensors`` (parameters and moments) together: "fused" or "foreach" (see the
        class)."""
        # is_cpu: t.device builds a torch.device a call (15 tensors a DIN step)
        fused = _ext.has_cpp() and all(t.is_cpu and t.is_contiguous() for t in tensors)
        return "fused" if fused else "foreach"

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (beta1, beta2), eps, lr = group["betas"], group["eps"], group["lr"]
            params, rows, grads, step_sizes, avgs, avg_sqs = [], [], [], [], [], []
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if not grad.is_sparse:
                    raise RuntimeError("RowAdam needs sparse gradients (DIN: model.sparse_gradients = True); use "
                                       "torch.optim.Adam for dense ones")
                state = self.state[p]  # one lookup a parameter: a tensor key hashes in Python
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                t = state["step"] = state["step"] + 1
                if not grad.is_coalesced():
                    grad = grad.coalesce()
                params.append(p)
                rows.append(grad._indices()[0])
                grads.append(grad._values())
                avgs.append(state["exp_avg"])
                avg_sqs.append(state["exp_avg_sq"])
                step_sizes.append(lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t))
            if not params:
                continue
            if self.kernel(params + avgs + avg_sqs) == "fused":
                torch.ops.din_ext._row_adam_(params, avgs, avg_sqs, rows, grads, step_sizes, beta1, beta2, eps,
                                             group["maximize"])
                # The op writes through data pointers: bump the version counters as in-place torch ops do, so that
                # autograd refuses a graph that saved a table before the step.
                torch.autograd.graph.increment_version(params + avgs + avg_sqs)
                continue
            if not self._logged_foreach:
                logger.info(f"RowAdam: parameters on {params[0].device}: the foreach step (gathers, torch foreach "
                            f"ops, scatters); the fused one-pass step needs contiguous cpu tensors and the extension")
                self._logged_foreach = True
            if group["maximize"]:
                grads = [-g for g in grads]
            _foreach_row_adam(params, avgs, avg_sqs, rows, grads, step_sizes, beta1, beta2, eps)
        return loss


def _foreach_row_adam(params, avgs, avg_sqs, rows, grads, step_sizes, beta1: float, beta2: float, eps: float) -> None:
    """RowAdam's update of rows ``rows`` of ``params`` and their moments with gradient rows ``grads``: SparseAdam's
    operations in its order, through gathers, foreach ops and scatters."""
    m_rows = [m.index_select(0, index) for m, index in zip(avgs, rows)]
    v_rows = [v.index_select(0, index) for v, index in zip(avg_sqs, rows)]
    m_steps = torch._foreach_sub(grads, m_rows)
    torch._foreach_mul_(m_steps, 1 - beta1)
    v_steps = torch._foreach_mul(grads, grads)
    torch._foreach_sub_(v_steps, v_rows)
    torch._foreach_mul_(v_steps, 1 - beta2)
    torch._foreach_add_(m_rows, m_steps)
    torch._foreach_add_(v_rows, v_steps)
    for m, v, index, m_new, v_new in zip(avgs, avg_sqs, rows, m_rows, v_rows):
        m.index_copy_(0, index, m_new)
        v.index_copy_(0, index, v_new)
    torch._foreach_sqrt_(v_rows)
    torch._foreach_add_(v_rows, eps)
    torch._foreach_div_(m_rows, v_rows)  # the update direction m / (sqrt(v) + eps)
    torch._foreach_mul_(m_rows, [-size for size in step_sizes])
    for p, index, update in zip(params, rows, m_rows):
        # gather, add, scatter: the rows are distinct, and index_add_ is several times slower
        p.index_copy_(0, index, p.index_select(0, index).add_(update))


def _unwrapped_step(optimizer: torch.optim.Optimizer) -> Callable[[torch.optim.Optimizer], Any]:
    """The step function of ``optimizer``'s class without torch.optim's per-call wrapper, where that wrapper would
    do nothing but open its profiler range (no profiler running, no step hooks on the optimizer or global), else the
    wrapped step: the wrapper's range and hook loops took ~0.15 ms of a B=256 DIN step on the cpu."""
    step = type(optimizer).step
    original = getattr(step, "__wrapped__", None)
    if (original is None or not getattr(step, "hooked", False) or torch._C._autograd._profiler_enabled()
            or optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
            or getattr(optim_module, "_global_optimizer_pre_hooks", True)
            or getattr(optim_module, "_global_optimizer_post_hooks", True)):
        return step
    return original


def _fused_adam_step(optimizer: torch.optim.Optimizer) -> bool:
    """torch.optim.Adam(fused=True)'s step on cpu parameters through the same two calls (torch._foreach_add_ of 1 to
    the step counts, then torch._fused_adam_ over the parameters that have a gradient, in the group's order), without
    its per-call Python (grad mode, the group's checks, the device and dtype grouping: ~40 us of a B=256 DIN step).
    Returns False, having done nothing, unless every group is fused, plain Adam (no amsgrad, capturable,
    differentiable, decoupled weight decay, tensor hyperparameters or grad scaler) over cpu parameters of one dtype
    with dense gradients and state: torch's step handles the rest (and a first step's state)."""
    if (type(optimizer) is not torch.optim.Adam or getattr(optimizer, "grad_scale", None) is not None
            or getattr(optimizer, "found_inf", None) is not None):
        return False
    calls = []
    for group in optimizer.param_groups:
        # .get: a torch without one of these options has none of its effects either
        options = ("amsgrad", "capturable", "differentiable", "decoupled_weight_decay")
        if (not group.get("fused") or any(group.get(k) for k in options)
                or any(isinstance(group[k], torch.Tensor) for k in ("lr", "eps"))
                or any(isinstance(b, torch.Tensor) for b in group["betas"])):
            return False
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        dtype = params[0].dtype
        states = [optimizer.state.get(p) for p in params]
        if not all(state and p.is_cpu and p.dtype == dtype and not p.grad.is_sparse
                   for p, state in zip(params, states)):
            return False
        calls.append((group, params, states))
    with torch.no_grad():
        for group, params, states in calls:
            steps = [state["step"] for state in states]
            # A list of one 1 tensor rather than the scalar 1: on the cpu foreach adds tensor by tensor, and each
            # scalar add first copies the scalar into a tensor (~30 us of a DIN step's 16 counts). Same sums.
            torch._foreach_add_(steps, [steps[0].new_ones(())] * len(steps))
            torch._fused_adam_(params, [p.grad for p in params], [state["exp_avg"] for state in states],
                               [state["exp_avg_sq"] for state in states], [], steps, amsgrad=False, lr=group["lr"],
                               beta1=group["betas"][0], beta2=group["betas"][1], weight_decay=group["weight_decay"],
                               eps=group["eps"], maximize=group["maximize"], grad_scale=None, found_inf=None)
    return True


class _Optimizers:
    """Several optimizers stepped together, each over its part of ``params`` (the model's parameters in order):
    RowAdam for the embedding tables, Adam for the rest."""

    def __init__(self, params: List[torch.nn.Parameter], *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers
        self.params = params

    def zero_grad(self, set_to_none: bool = True) -> None:
        if set_to_none:
            # What each optimizer's zero_grad(set_to_none=True) does to its part of params, without their
            # profiler ranges and loops over the groups: every step calls it.
            for p in self.params:
                p.grad = None
            return
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            step = _unwrapped_step(optimizer)
            # Where the wrapper would do nothing, a fused Adam also skips the Python of its step.
            if step is type(optimizer).step or not _fused_adam_step(optimizer):
                step(optimizer)

    def state_dict(self) -> Dict[str, Any]:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Loads a state_dict of these optimizers, or of one Adam over all of ``params`` (what make_optimizer gave for
        dense gradients, and din_ext before row-wise optimizers): its moments go to the part that owns each
        parameter."""
        if isinstance(state, dict) and "param_groups" in state:
            state = self._split(state)
        states = state.get("optimizers") if isinstance(state, dict) else None
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            raise ValueError("the checkpoint's optimizer state does not match this model's optimizers")
        for optimizer, part in zip(self.optimizers, states):
            optimizer.load_state_dict(part)

    def _split(self, whole: Dict[str, Any]) -> Dict[str, Any]:
        positions = [i for group in whole["param_groups"] for i in group["params"]]
        if len(positions) != len(self.params):
            raise ValueError(f"the checkpoint's optimizer state has {len(positions)} parameters, the model "
                             f"{len(self.params)}")
        index = {id(p): position for p, position in zip(self.params, positions)}
        parts = []
        for optimizer in self.optimizers:
            part = optimizer.state_dict()  # this optimizer's own hyperparameters, the checkpoint's moments
            owned = [index[id(p)] for group in optimizer.param_groups for p in group["params"]]
            part["state"] = {k: self._converted(whole["state"][position], optimizer)
                             for k, position in enumerate(owned) if position in whole["state"]}
            parts.append(part)
        return {"optimizers": parts}

    @staticmethod
    def _converted(entry: Dict[str, Any], optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
        """One parameter's Adam state for ``optimizer`` (RowAdam counts steps in an int, Adam in a tensor)."""
        if isinstance(optimizer, RowAdam):
            return {**entry, "step": int(entry["step"])}
        return dict(entry)


def make_optimizer(model: DIN, lr: float, sparse: bool = True):
    """The optimizer of ``fit``: Adam-like, stepped with ``.zero_grad()``, ``.step()``, ``.state_dict()``.

    sparse (the default): sets ``model.sparse_gradients`` (every embedding table's gradient holds one row per
    distinct id of the step) and returns RowAdam over the tables and Adam (fused where torch has it) over every
    other parameter, so a step costs O(batch ids x D) however large the tables. sparse=False: dense gradients and one
    Adam over every parameter, O(table size) per step (the baseline of docs/design.md's training section).
    """
    model.sparse_gradients = sparse
    params = list(model.parameters())
    fused = {"fused": True} if all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) else {}
    if not sparse:
        return torch.optim.Adam(params, lr=lr, **fused)
    tables = {id(p) for table in model.embeddings.values() for p in table.parameters()}
    return _Optimizers(params, RowAdam([p for p in params if id(p) in tables], lr=lr),
                       torch.optim.Adam([p for p in params if id(p) not in tables], lr=lr, **fused))


# -- evaluation -----------------------------------------------------------------------------------------------------


class BatchSource(Protocol):
    """Data that fit, evaluate and predict stream instead of in-memory ``Interactions``: a factory of each epoch's
    batches (``din_ext.data.stream.PreparedSplit`` is one). ``len()``: the rows one pass yields."""

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterable[Interactions]: ...


Data = Union[Interactions, BatchSource]


PREFETCH = 2  # batches built ahead of the step by _batches' background thread


def prefetches(data: Data) -> bool:
    """Whether ``_batches`` builds the batches of ``data`` in a background thread: always for a batch source (its
    reads overlap the steps); for in-memory Interactions only when torch's threads leave a core to that thread.
    Their collation is cheap (about 0.6 ms of CPU at B=256), and a thread that competes with torch's for the cores
    stalls every OpenMP barrier of the step: on 2 cores with 2 torch threads, a B=256 step of the synthetic default
    took 13.9 ms with its batches prefetched and 8.1 ms with them built beforehand (bench/results/train_cpu.md)."""
    if not isinstance(data, Interactions):
        return True
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return torch.get_num_threads() < cores


def _batches(data: Data, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterable[Interactions]:
    """The batches of one pass over ``data``, in its order. Where ``prefetches(data)``, they are built (gathered and
    collated) by a background thread up to PREFETCH ahead of the consumer, so that a step never waits for its batch;
    an error of the data re-raises in the consumer's thread, its type and message unchanged. Otherwise they are built
    in the consumer's thread as it asks for them."""
    if isinstance(data, Interactions):
        if not prefetches(data):
            return iterate_batches(data, batch_size, shuffle=shuffle, seed=seed)
        return prefetched(lambda: iterate_batches(data, batch_size, shuffle=shuffle, seed=seed), PREFETCH)
    if not callable(getattr(data, "batches", None)):
        raise TrainingError(f"data must be Interactions or have a batches() method, got {type(data).__name__}")
    return prefetched(lambda: iter(data.batches(batch_size, shuffle=shuffle, seed=seed)), PREFETCH)


def _labels(batch: Interactions, tasks) -> torch.Tensor:
    """The labels (S, T) of ``tasks``, in their order: one task's is a view of its column (no stack a step)."""
    if len(tasks) == 1:
        return batch.labels[tasks[0]].unsqueeze(1)
    return torch.stack([batch.labels[t] for t in tasks], dim=1)


def _model_device(model: DIN) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict_rows(model: DIN, data: Data, batch_size: int = 4096, device: Optional[torch.device] = None,
                 world: Optional[World] = None) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor], float]:
    """(probabilities (S, T), user_id (S,), labels task -> (S,), rows per second) of every row, in the data's order.

    device: where the batches go (default: the model's). A batch source is read once, unshuffled, so the user ids
    and labels come from its batches. world (din_ext.distributed): each process predicts the batches it owns (with
    rank 0's running statistics), and every process gets all the rows, each predicted in the same batch as in one
    process.
    """
    batch_size = check_positive("batch_size", batch_size)
    device = _model_device(model) if device is None else device
    world = world or World()
    world.sync_buffers(model)
    model.eval()
    outputs, users, labels = [], [], {t: [] for t in model.tasks}
    start = time.perf_counter()
    for index, batch in enumerate(_batches(data, batch_size)):
        if world.owns(index):
            outputs.append(torch.sigmoid(model(batch.to(device)).float()).cpu())
        if not isinstance(data, Interactions):
            users.append(batch.user_id)
            for t in labels:
                labels[t].append(batch.labels[t])
    probabilities = world.gather_batches(outputs, torch.zeros(0, len(model.tasks)))
    seconds = time.perf_counter() - start
    if isinstance(data, Interactions):
        return probabilities, data.user_id, {t: data.labels[t] for t in model.tasks}, len(data) / max(seconds, 1e-9)
    return (probabilities, torch.cat(users), {t: torch.cat(v) for t, v in labels.items()},
            probabilities.shape[0] / max(seconds, 1e-9))


def predict(model: DIN, data: Data, batch_size: int = 4096,
            device: Optional[torch.device] = None) -> Tuple[torch.Tensor, float]:
    """Click probabilities (S, T) of every row in order, and the rows per second of the pass.

    device: where the batches go (default: the model's).
    """
    probabilities, _, _, speed = predict_rows(model, data, batch_size, device)
    return probabilities, speed


def evaluate(model: DIN, data: Data, batch_size: int = 4096, device: Optional[torch.device] = None,
             world: Optional[World] = None) -> Dict[str, Any]:
    """auc, gauc, logloss of the first task (and of every task under "tasks"), samples_per_second of the pass.

    world: the processes share the prediction (predict_rows) and each computes the metrics of all the rows."""
    probabilities, user_id, all_labels, speed = predict_rows(model, data, batch_size, device, world)
    return {**score(model.tasks, probabilities, user_id, all_labels), "samples_per_second": speed}


def score(tasks: Sequence[str], probabilities: torch.Tensor, user_id: torch.Tensor,
          labels: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """auc, gauc, logloss of the first task (and of every task under "tasks") and the rows, of probabilities
    (S, T), one column per task, with user_id (S,) and labels task -> (S,)."""
    per_task = {}
    for column, task in enumerate(tasks):
        truth, p = labels[task], probabilities[:, column]
        per_task[task] = {"auc": _defined(metrics.auc, truth, p), "gauc": _defined(metrics.gauc, truth, p, user_id),
                          "logloss": metrics.logloss(truth, p)}
    return {**per_task[tasks[0]], "rows": probabilities.shape[0], "tasks": per_task}


def _defined(fn, *args) -> float:
    """The metric, or NaN where it is undefined (a single class)."""
    try:
        return fn(*args)
    except ValueError:
        return float("nan")


def format_metrics(result: Mapping[str, Any]) -> str:
    """``auc A  gauc G  logloss L`` of an evaluate() result."""
    return f"auc {result['auc']:.4f}  gauc {result['gauc']:.4f}  logloss {result['logloss']:.4f}"


# -- training -------------------------------------------------------------------------------------------------------


class _Progress:
    """A tqdm bar over samples (on a terminal); nothing when tqdm is missing or the bar is off. The per-epoch lines
    are logged either way."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                logger.info("tqdm is not installed: no progress bar")
            else:
                # disable=None: no bar when stderr is not a terminal (logs, CI)
                self.bar = tqdm(total=total, desc=desc, unit="sample", unit_scale=True, leave=False,
                                dynamic_ncols=True, disable=None)

    def update(self, n: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def batch_loss(model: DIN, batch: Interactions, loss_fn: torch.nn.Module = _BCE) -> torch.Tensor:
    """The training loss of ``batch``: the sum over the tasks of the mean binary cross-entropy of each. ``model``: a
    DIN or a wrapper of one with ``.module`` (DistributedDataParallel)."""
    tasks = getattr(model, "module", model).tasks
    logits = model(batch)
    loss = loss_fn(logits, _labels(batch, tasks).to(logits.dtype))
    return loss * len(tasks) if len(tasks) > 1 else loss  # no autograd node for a factor of 1


def train_step(model: DIN, optimizer, batch: Interactions, loss_fn: torch.nn.Module = _BCE, *,
               world: Optional[World] = None, rows: Optional[int] = None) -> torch.Tensor:
    """One optimizer step on ``batch`` (on the model's device); returns the loss (batch_loss), a 0-d tensor not yet
    read back.

    world (din_ext.distributed): the processes of the run; ``model`` is then ``world.wrap(din)`` and ``batch`` this
    process's slice of a global batch of ``rows`` rows, whose loss is weighted by its share so that the gradient is
    the global batch's.
    """
    world = world or World()
    loss = batch_loss(model, batch, loss_fn)
    optimizer.zero_grad(set_to_none=True)
    share = world.share(len(batch), rows or len(batch))
    (loss * share if share != 1 else loss).backward()
    world.reduce_gradients(model)
    optimizer.step()
    return loss


def fit(model: DIN, train: Data, test: Data, *, epochs: int, out: Union[str, os.PathLike],
        batch_size: Optional[int] = None, lr: Optional[float] = None, eval_batch_size: int = 4096,
        device: Union[str, torch.device, None] = None, seed: int = 0,
        resume_from: Optional[Mapping[str, Any]] = None, data_options: Optional[Mapping[str, Any]] = None,
        data_name: Optional[str] = None, progress: bool = False, log: Optional[Callable[[str], None]] = None,
        world: Optional[World] = None) -> Dict[str, Any]:
    """Trains ``model`` on ``train`` up to ``epochs`` epochs, evaluating on ``test`` after each; returns the final
    metrics with the history (also written to OUT/metrics.json).

    train, test: in-memory ``Interactions``, or batch sources (``BatchSource``, e.g. the streamed splits of
    ``din_ext.data.stream.open_prepared``), whose ``batches(batch_size, shuffle=True, seed=...)`` is called once
    per epoch.

    After each epoch OUT/last.pt holds the run (model, optimizer, epoch, history, best score, options) and OUT/best.pt
    the epoch of the best test gauc (auc where gauc is undefined). Epoch e visits the rows in an order seeded with
    ``seed * 1000 + e``; seeding the model's initialization is the caller's (torch.manual_seed before building it).
    batch_size, lr: default to resume_from's, else TRAIN_DEFAULTS. resume_from: a checkpoint fit wrote
    (load_checkpoint(OUT/last.pt)) whose model ``model`` is (DIN.from_checkpoint): training goes on from its epoch,
    exactly as a run that had not stopped. data_options: recorded in each checkpoint under "data" (the command line
    records the options that made train and test, to check them on resume). data_name: names the data in the log.
    progress: a tqdm bar per epoch. log: called with one line per epoch (default: the din_ext logger).
    world: the processes of a distributed run (``din_ext.distributed.init``; default one process): each trains on
    its slice of every global batch of ``batch_size`` rows (a global batch of fewer rows than processes is skipped,
    with a warning) under DistributedDataParallel, the test set is predicted in shares and gathered, and only rank 0
    writes OUT and logs; every process returns the same metrics.
    Raises ArgumentError for a bad argument, TrainingDiverged when the loss or the test predictions stop being
    finite (the checkpoints of the earlier epochs stay; no metrics.json is written).
    """
    world = world or World()
    log = (log or logger.info) if world.is_main else _quiet
    device = resolve_device(device)
    checked = check_fit_arguments(epochs=epochs, out=out, batch_size=batch_size, lr=lr,
                                  eval_batch_size=eval_batch_size, resume_from=resume_from)
    epochs, out, eval_batch_size = checked["epochs"], checked["out"], checked["eval_batch_size"]
    options = {"batch_size": checked["batch_size"], "lr": checked["lr"]}
    batch_size, lr = options["batch_size"], options["lr"]
    last_path, best_path = os.path.join(out, "last.pt"), os.path.join(out, "best.pt")

    model.to(device)
    optimizer = make_optimizer(model, lr)
    trainee = world.wrap(model)
    history: List[Dict[str, Any]] = []
    start_epoch, best = 0, -math.inf
    if resume_from is not None:
        try:
            optimizer.load_state_dict(resume_from["optimizer"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ArgumentError("resume_from", f"resume_from: its optimizer state does not fit the model "
                                               f"({exc})") from None
        start_epoch, history = resume_from["epoch"], list(resume_from["history"])
        best = resume_from["best"]
        if start_epoch >= epochs:
            log(f"the checkpoint has already trained {start_epoch} epochs (epochs {epochs}): nothing to do")
            return _finish(out, history[-1], history, model, world)

    name = "DIN" if model.pooling == "attention" else "BaseModel"
    log(f"{name}{f' on {data_name}' if data_name else ''}: {len(train):,} train / {len(test):,} test impressions, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, device {device}, backend "
        f"{_backend.resolve(model.backend, device)}, torch threads {torch.get_num_threads()} (batches "
        f"{'prefetched by a thread' if prefetches(train) else 'built inline: the torch threads use every core'})"
        f"{f', {world.size} processes' if world.size > 1 else ''}")
    for epoch in range(start_epoch, epochs):
        trainee.train()
        bar = _Progress(len(train), f"epoch {epoch + 1}/{epochs}", progress and world.is_main)
        total_loss, total_reg, seen, tick = 0.0, 0.0, 0, time.perf_counter()
        for step, batch in enumerate(_batches(train, batch_size, shuffle=True, seed=seed * 1000 + epoch)):
            part = world.shard(batch)
            if part is None:
                logger.warning(f"epoch {epoch + 1}, step {step + 1}: a global batch of {len(batch)} rows, fewer than "
                               f"the {world.size} processes: skipped")
                continue
            value = train_step(trainee, optimizer, part.to(device), world=world, rows=len(batch)).item()
            if not math.isfinite(value):
                bar.close()
                raise TrainingDiverged(_diverged(f"epoch {epoch + 1}, step {step + 1}: the training loss is {value}",
                                                 epoch, last_path, best_path))
            reg = model.regularization()
            total_reg += 0.0 if reg is None else float(reg) * len(batch)
            total_loss += value * len(part)
            seen += len(batch)
            bar.update(len(batch), value)
        bar.close()
        if not seen:
            raise TrainingError(f"epoch {epoch + 1}: the training data yielded no batches")
        total_loss = world.sum(total_loss)
        train_seconds = time.perf_counter() - tick
        result = evaluate(model, test, eval_batch_size, device, world)
        if not math.isfinite(result["logloss"]):
            raise TrainingDiverged(_diverged(f"epoch {epoch + 1}: the test predictions are not finite (logloss "
                                             f"{result['logloss']})", epoch, last_path, best_path))
        result.update(epoch=epoch + 1, train_loss=total_loss / seen, train_samples_per_second=seen / train_seconds,
                      train_seconds=train_seconds)
        if model.mba_lambda:
            result.update(train_mba_regularization=total_reg / seen)
        history.append(result)
        score = result["gauc"] if not math.isnan(result["gauc"]) else result["auc"]
        is_best = score > best
        best = max(best, score)
        if world.is_main:
            state = model.checkpoint(optimizer, epoch + 1, data=None if data_options is None else dict(data_options),
                                     options=options, history=history, best=best)
            save_checkpoint(last_path, state)
            if is_best:
                save_checkpoint(best_path, state)
        reg_text = f" (+ MBA R {result['train_mba_regularization']:.4f})" if model.mba_lambda else ""
        log(f"epoch {epoch + 1}/{epochs}  train loss {result['train_loss']:.4f}{reg_text}  "
            f"{seen / train_seconds:,.0f} samples/s  |  test {format_metrics(result)}{'  (best)' if is_best else ''}")
    return _finish(out, history[-1], history, model, world)


def check_fit_arguments(*, epochs: int, out: Union[str, os.PathLike], batch_size: Optional[int] = None,
                        lr: Optional[float] = None, eval_batch_size: int = 4096,
                        resume_from: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """fit's arguments checked and resolved (batch_size and lr defaulted), the folder ``out`` created: what fit does
    before it trains, for a caller that wants to fail before it loads the data. Raises ArgumentError."""
    epochs = check_positive("epochs", epochs)
    out = os.fspath(out)
    _output_folder(out)
    if resume_from is not None:
        check_resumable(resume_from)
    options = {"batch_size": batch_size, "lr": lr}
    for key, default in TRAIN_DEFAULTS.items():  # the caller's, else (on resume) the checkpoint's, else the defaults
        if options[key] is None:
            options[key] = (resume_from or {}).get("options", {}).get(key, default)
    return {"epochs": epochs, "out": out, "batch_size": check_positive("batch_size", options["batch_size"]),
            "lr": check_positive("lr", options["lr"], float),
            "eval_batch_size": check_positive("eval_batch_size", eval_batch_size)}


def _output_folder(out: str) -> None:
    """Creates the run folder ``out``; refuses a path that is a file."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ArgumentError("out", f"out {out!r} is a file; it must be a folder (for last.pt, best.pt and "
                                   f"metrics.json)")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ArgumentError("out", f"out {out!r}: cannot create the folder ({exc.strerror or exc})") from None


def _diverged(what: str, epoch: int, last_path: str, best_path: str) -> str:
    kept = (f"{last_path} and {best_path} still hold epoch {epoch} and the best one" if epoch else
            "no checkpoint was written")
    return f"{what}; stopped ({kept}; no metrics.json written). Try a smaller learning rate (--lr)"


def _finish(out: str, final: Dict[str, Any], history: List[Dict[str, Any]], model: DIN, world: World
            ) -> Dict[str, Any]:
    summary = {**final, "model": "din" if model.pooling == POOLING["din"] else "base", "history": history}
    if world.is_main:
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(summary, f, indent=2, allow_nan=True)
    return summary


def _quiet(line: str) -> None:
    """The log of the processes but rank 0."""
