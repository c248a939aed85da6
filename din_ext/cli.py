"""The ``din-ext`` command: train, evaluate and compare DIN on a click log, predict with a checkpoint, self-check.

    din-ext train [--data synthetic|amazon|taobao|recbole] [--path P] [--model din|base] [--epochs N] ...
    din-ext evaluate --checkpoint DIR/best.pt [--data ...]
    din-ext predict --checkpoint DIR/best.pt [--data ...] --output preds.csv
    din-ext compare [--epochs N] ...           # BaseModel and DIN on the same data, with RelaImpr
    din-ext selfcheck                          # every built backend against the reference
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from din_ext import _backend, metrics
from din_ext.embedding import MBAEmbedding
from din_ext.data.core import Interactions, Schema, iterate_batches
from din_ext.model import DIN, CheckpointError, load_checkpoint, save_checkpoint

logger = logging.getLogger("din_ext")

DATASETS = ("synthetic", "amazon", "taobao", "recbole")
RESUME_KEYS = ("optimizer", "epoch", "history", "best", "data", "options")
MODELS = {"din": "attention", "base": "sum"}
TRAIN_DEFAULTS = {"batch_size": 256, "lr": 1e-3}
DEFAULTS = {"data": "synthetic", "path": None, "seed": 0, "max_history": 50, "synthetic_users": None,
            "synthetic_conversion": False}


class UsageError(Exception):
    """A bad argument or input: reported as one line, without a traceback."""

    exit_code = 2


class TrainingDiverged(UsageError):
    """The loss or the predictions became NaN or infinite: the run stops, its earlier checkpoints kept."""

    exit_code = 1


# -- data ---------------------------------------------------------------------------------------------------------


def data_spec(args: argparse.Namespace, recorded: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The data options of ``args``; options left unset come from ``recorded`` (a checkpoint's), then defaults."""
    name = getattr(args, "data", None) or (recorded or {}).get("data") or DEFAULTS["data"]
    if recorded and recorded.get("data") != name:
        recorded = None  # options recorded for other data do not apply to this one
    spec = {}
    for key, default in DEFAULTS.items():
        value = getattr(args, key, None)
        spec[key] = value if value is not None and value is not False else (recorded or {}).get(key, default)
    return spec


def load_data(spec: Dict[str, Any]) -> Tuple[Interactions, Interactions, Schema]:
    """(train, test, schema) of a data spec; histories are cut to the most recent ``max_history`` behaviours."""
    name, path = spec["data"], spec["path"]
    if spec["max_history"] < 0:
        raise UsageError(f"--max-history must be >= 0 (0 keeps every behaviour), got {spec['max_history']}")
    if spec["synthetic_users"] is not None and spec["synthetic_users"] < 1:
        raise UsageError(f"--synthetic-users must be positive, got {spec['synthetic_users']}")
    if name not in DATASETS:
        raise UsageError(f"--data must be one of {', '.join(DATASETS)}, got {name!r}")
    if name == "synthetic":
        if path:
            raise UsageError("--path is not used with --data synthetic (the data is generated from --seed)")
        from din_ext.data.synthetic import SyntheticConfig, generate

        config = SyntheticConfig(conversion=bool(spec["synthetic_conversion"]))
        if spec["synthetic_users"] is not None:
            config.num_users = int(spec["synthetic_users"])
        train, test, schema = generate(config, seed=int(spec["seed"]))
    else:
        if spec["synthetic_users"] or spec["synthetic_conversion"]:
            raise UsageError("--synthetic-* options only apply to --data synthetic")
        if not path:
            raise UsageError(f"--data {name} needs --path (the folder or file holding the {name} data)")
        if not os.path.exists(path):
            raise UsageError(f"--path {path!r} does not exist")
        try:
            from din_ext.data import load_dataset
        except ImportError as exc:
            raise UsageError(f"--data {name} needs the real-data loaders (din_ext.data.load_dataset), which this "
                             f"install does not have: {exc}") from exc
        try:
            train, test, schema = load_dataset(name, path)
        except (ValueError, OSError) as exc:  # malformed or missing files: the loaders name the file and line
            raise UsageError(f"--data {name} --path {path}: {exc}") from exc
    if len(train) == 0 or len(test) == 0:
        raise UsageError(f"the {name} data has an empty split (train {len(train)}, test {len(test)} rows)")
    if spec["max_history"]:
        train, test = train.truncate_history(spec["max_history"]), test.truncate_history(spec["max_history"])
    return train, test, schema


# -- training and evaluation ----------------------------------------------------------------------------------------


class _Progress:
    """A tqdm bar over samples (on a terminal); nothing when tqdm is missing or the bar is off. The per-epoch lines
    are printed either way."""

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


def _labels(batch: Interactions, tasks: Iterable[str]) -> torch.Tensor:
    return torch.stack([batch.labels[t] for t in tasks], dim=1)


@torch.no_grad()
def predict(model: DIN, data: Interactions, batch_size: int, device: torch.device) -> Tuple[torch.Tensor, float]:
    """Click probabilities (S, T) of every row in order, and the rows per second of the pass."""
    model.eval()
    outputs = []
    start = time.perf_counter()
    for batch in iterate_batches(data, batch_size):
        outputs.append(torch.sigmoid(model(batch.to(device)).float()).cpu())
    seconds = time.perf_counter() - start
    return torch.cat(outputs), len(data) / max(seconds, 1e-9)


def evaluate(model: DIN, data: Interactions, batch_size: int, device: torch.device) -> Dict[str, Any]:
    """auc, gauc, logloss of the first task (and of every task under "tasks"), samples_per_second of the pass."""
    probabilities, speed = predict(model, data, batch_size, device)
    per_task = {}
    for column, task in enumerate(model.tasks):
        labels, p = data.labels[task], probabilities[:, column]
        per_task[task] = {"auc": _defined(metrics.auc, labels, p), "gauc": _defined(metrics.gauc, labels, p,
                                                                                      data.user_id),
                          "logloss": metrics.logloss(labels, p)}
    return {**per_task[model.tasks[0]], "samples_per_second": speed, "rows": len(data), "tasks": per_task}


def _defined(fn, *args) -> float:
    """The metric, or NaN where it is undefined (a single class)."""
    try:
        return fn(*args)
    except ValueError:
        return float("nan")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r} is not a device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: torch sees no CUDA device (torch {torch.__version__}); use --device cpu")
    return device


def _check_backend(backend: str, device: torch.device) -> None:
    try:
        _backend.resolve(backend, device)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"--backend {backend}: {exc}") from exc


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


def _positive(name: str, value, kind=int):
    if value is None or not value > 0 or not math.isfinite(value):
        raise UsageError(f"--{name} must be positive{' and finite' if kind is float else ''}, got {value}")
    return kind(value)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _check_model_options(args: argparse.Namespace) -> None:
    """The model flags that DIN would refuse, named as flags."""
    _positive("embed-dim", args.embed_dim)
    if not (math.isfinite(args.mba_lambda) and args.mba_lambda >= 0):
        raise UsageError(f"--mba-lambda must be finite and >= 0, got {args.mba_lambda}")


def _output_folder(out: str) -> None:
    """Creates the run folder ``out``; refuses a path that is a file."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out!r} is a file; it must be a folder (for last.pt, best.pt and metrics.json)")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out!r}: cannot create the folder ({exc.strerror or exc})") from None


def _read_checkpoint(path: str, option: str) -> Dict[str, Any]:
    try:
        return load_checkpoint(path)
    except CheckpointError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _widths(text: str) -> Tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths such as 200,80, got {text!r}") from None
    if not widths or any(w <= 0 for w in widths):
        raise argparse.ArgumentTypeError(f"expected positive widths such as 200,80, got {text!r}")
    return widths


class _Optimizers:
    """Several optimizers stepped together: SparseAdam for the MBA tables, Adam for the rest."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self) -> Dict[str, Any]:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        states = state.get("optimizers") if isinstance(state, dict) else None
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            raise ValueError("--resume: the checkpoint's optimizer state does not match this model's optimizers")
        for optimizer, part in zip(self.optimizers, states):
            optimizer.load_state_dict(part)


def make_optimizer(model: DIN, lr: float):
    """Adam; with MBA tables (sparse gradients: one row per distinct id of the step), SparseAdam for those tables
    so that a step touches only the rows the batch used, and Adam for every other parameter."""
    sparse = [p for m in model.modules() if isinstance(m, MBAEmbedding) and m.sparse
              for p in m.parameters(recurse=False)]
    if not sparse:
        return torch.optim.Adam(model.parameters(), lr=lr)
    ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in ids]
    return _Optimizers(torch.optim.SparseAdam(sparse, lr=lr), torch.optim.Adam(dense, lr=lr))


def train(args: argparse.Namespace, data=None, out=None) -> Dict[str, Any]:
    """Trains per ``args`` (see ``din-ext train --help``); returns the final metrics (also in OUT/metrics.json)."""
    epochs = _positive("epochs", args.epochs)
    device = _resolve_device(args.device)
    _check_backend(args.backend, device)
    out = out or args.out
    _output_folder(out)
    last_path, best_path = os.path.join(out, "last.pt"), os.path.join(out, "best.pt")

    checkpoint = None
    if args.resume:
        if not os.path.exists(last_path):
            raise UsageError(f"--resume: no checkpoint {last_path} to resume from")
        checkpoint = _read_checkpoint(last_path, "--resume")
        missing = [k for k in RESUME_KEYS if k not in checkpoint]
        if missing:
            raise UsageError(f"--resume: {last_path} lacks {', '.join(map(repr, missing))} (not written by din-ext "
                             f"train)")
        spec = data_spec(args, checkpoint["data"])
        if spec != checkpoint["data"]:
            raise UsageError(f"--resume: the data options {spec} differ from the checkpoint's {checkpoint['data']}")
    else:
        spec = data_spec(args)
    # optimization options: the command line's, else (on resume) the checkpoint's, else the defaults
    options = {key: getattr(args, key) for key in TRAIN_DEFAULTS}
    for key, default in TRAIN_DEFAULTS.items():
        if options[key] is None:
            options[key] = (checkpoint or {}).get("options", {}).get(key, default)
    batch_size = _positive("batch-size", options["batch_size"])
    lr = _positive("lr", options["lr"], float)
    eval_batch_size = _positive("eval-batch-size", args.eval_batch_size)
    train_set, test_set, schema = data if data is not None else load_data(spec)

    torch.manual_seed(spec["seed"])
    if checkpoint is not None:
        try:
            model = DIN.from_checkpoint(checkpoint)
        except CheckpointError as exc:
            raise UsageError(f"--resume: {last_path}: {exc}") from None
        _check_fits(model, schema, "--resume: the data")
    else:
        _check_model_options(args)
        try:
            model = DIN(schema, embed_dim=args.embed_dim, attention_hidden=args.attention_hidden,
                        tower_hidden=args.tower_hidden, activation=args.activation, pooling=MODELS[args.model],
                        normalization=args.normalization, mba_lambda=args.mba_lambda)
        except (ValueError, TypeError, RuntimeError, MemoryError) as exc:  # e.g. a width too large to allocate
            raise UsageError(f"the model options: {_first_line(exc)}") from None
    model.backend = args.backend
    model.to(device)
    optimizer = make_optimizer(model, lr)
    history: List[Dict[str, Any]] = []
    start_epoch, best = 0, -math.inf
    if checkpoint is not None:
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"--resume: {last_path}: its optimizer state does not fit the model ({exc})") from None
        start_epoch, history = checkpoint["epoch"], list(checkpoint["history"])
        best = checkpoint["best"]
        if start_epoch >= epochs:
            _say(args, f"{last_path} has already trained {start_epoch} epochs (--epochs {epochs}): nothing to do")
            return _finish(out, history[-1], history, model)

    name = "DIN" if model.pooling == "attention" else "BaseModel"
    _say(args, f"{name} on {spec['data']}: {len(train_set):,} train / {len(test_set):,} test impressions, "
               f"{sum(p.numel() for p in model.parameters()):,} parameters, device {device}, backend "
               f"{_backend.resolve(args.backend, device)}, torch threads {torch.get_num_threads()}")
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for epoch in range(start_epoch, epochs):
        model.train()
        progress = _Progress(len(train_set), f"epoch {epoch + 1}/{epochs}", not args.no_progress)
        total_loss, total_reg, seen, tick = 0.0, 0.0, 0, time.perf_counter()
        for step, batch in enumerate(iterate_batches(train_set, batch_size, shuffle=True,
                                                     seed=spec["seed"] * 1000 + epoch)):
            batch = batch.to(device)
            loss = loss_fn(model(batch), _labels(batch, model.tasks).to(device)) * len(model.tasks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            if not math.isfinite(value):
                progress.close()
                raise TrainingDiverged(_diverged(f"epoch {epoch + 1}, step {step + 1}: the training loss is {value}",
                                                 epoch, last_path, best_path))
            reg = model.regularization()
            total_reg += 0.0 if reg is None else float(reg) * len(batch)
            total_loss += value * len(batch)
            seen += len(batch)
            progress.update(len(batch), value)
        progress.close()
        train_seconds = time.perf_counter() - tick
        result = evaluate(model, test_set, eval_batch_size, device)
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
        state = model.checkpoint(optimizer, epoch + 1, data=spec, options=options, history=history, best=best)
        save_checkpoint(last_path, state)
        if is_best:
            save_checkpoint(best_path, state)
        reg_text = f" (+ MBA R {result['train_mba_regularization']:.4f})" if model.mba_lambda else ""
        _say(args, f"epoch {epoch + 1}/{epochs}  train loss {result['train_loss']:.4f}{reg_text}  "
                   f"{seen / train_seconds:,.0f} samples/s  |  test {_format(result)}{'  (best)' if is_best else ''}")
    return _finish(out, history[-1], history, model)


def _diverged(what: str, epoch: int, last_path: str, best_path: str) -> str:
    kept = (f"{last_path} and {best_path} still hold epoch {epoch} and the best one" if epoch else
            "no checkpoint was written")
    return f"{what}; stopped ({kept}; no metrics.json written). Try a smaller --lr"


def _format(result: Dict[str, Any]) -> str:
    return f"auc {result['auc']:.4f}  gauc {result['gauc']:.4f}  logloss {result['logloss']:.4f}"


def _finish(out: str, final: Dict[str, Any], history: List[Dict[str, Any]], model: DIN) -> Dict[str, Any]:
    summary = {**final, "model": "din" if model.pooling == "attention" else "base", "history": history}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2, allow_nan=True)
    return summary


def _say(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, flush=True)


def _load_model(args: argparse.Namespace) -> Tuple[DIN, Dict[str, Any], torch.device]:
    if not os.path.exists(args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint!r} does not exist")
    checkpoint = _read_checkpoint(args.checkpoint, "--checkpoint")
    device = _resolve_device(args.device)
    _check_backend(args.backend, device)
    _positive("batch-size", args.batch_size)
    try:
        model = DIN.from_checkpoint(checkpoint)
    except CheckpointError as exc:
        raise UsageError(f"--checkpoint {args.checkpoint}: {exc}") from None
    model.backend = args.backend
    return model.to(device), checkpoint, device


def _check_fits(model: DIN, schema: Schema, what: str) -> None:
    """Raises UsageError unless data of ``schema`` has every field, table size, dense width and task of ``model``."""
    ours = model.schema
    for key in ("user_fields", "item_fields", "history_fields", "dense_dim"):
        if getattr(schema, key) != getattr(ours, key):
            raise UsageError(f"{what} has {key} {getattr(schema, key)}, the checkpoint's model "
                             f"{getattr(ours, key)}; use the data (and options) it was trained on")
    missing = [t for t in ours.tasks if t not in schema.tasks]
    if missing:
        raise UsageError(f"{what} has no labels for the model's tasks {missing}")


def _split(args: argparse.Namespace, model: DIN, checkpoint: Dict[str, Any]) -> Interactions:
    spec = data_spec(args, checkpoint["data"])
    train_set, test_set, schema = load_data(spec)
    _check_fits(model, schema, f"the {spec['data']} data")
    return train_set if args.split == "train" else test_set


def cmd_train(args: argparse.Namespace) -> int:
    final = train(args)
    name = "DIN" if final["model"] == "din" else "BaseModel"
    print(f"{name} final (epoch {final['epoch']}): {_format(final)}  "
          f"eval {final['samples_per_second']:,.0f} samples/s; checkpoints and metrics.json in {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    model, checkpoint, device = _load_model(args)
    data = _split(args, model, checkpoint)
    result = evaluate(model, data, args.batch_size, device)
    print(json.dumps(result, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    folder = os.path.dirname(os.path.abspath(args.output))
    if os.path.isdir(args.output) or not os.path.isdir(folder):
        raise UsageError(f"--output {args.output!r}: " + ("is a folder; name a CSV file" if os.path.isdir(args.output)
                                                           else f"the folder {folder} does not exist"))
    model, checkpoint, device = _load_model(args)
    data = _split(args, model, checkpoint)
    probabilities, _ = predict(model, data, args.batch_size, device)
    with open(args.output, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "user_id", *(f"p_{t}" for t in model.tasks), *model.tasks])
        labels = [data.labels[t].tolist() for t in model.tasks]
        for row, (user, p) in enumerate(zip(data.user_id.tolist(), probabilities.tolist())):
            writer.writerow([row, user, *(f"{x:.6f}" for x in p), *(int(col[row]) for col in labels)])
    print(f"wrote {len(data):,} predictions to {args.output}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    spec = data_spec(args)
    data = load_data(spec)
    results = {}
    for model in ("base", "din"):
        args.model = model
        results[model] = train(args, data=data, out=os.path.join(args.out, model))
    base, din = results["base"], results["din"]
    table = {key: {"base": base[key], "din": din[key], "rela_impr_percent": metrics.rela_impr(din[key], base[key])}
             for key in ("auc", "gauc")}
    table["logloss"] = {"base": base["logloss"], "din": din["logloss"]}
    table["train_samples_per_second"] = {m: results[m]["train_samples_per_second"] for m in results}
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump(table, f, indent=2)
    print(f"\n{'':10}{'BaseModel':>11}{'DIN':>9}{'RelaImpr':>11}")
    for key in ("auc", "gauc"):
        row = table[key]
        print(f"{key:10}{row['base']:>11.4f}{row['din']:>9.4f}{row['rela_impr_percent']:>+10.2f}%")
    print(f"{'logloss':10}{base['logloss']:>11.4f}{din['logloss']:>9.4f}")
    return 0


def cmd_selfcheck(args: argparse.Namespace) -> int:
    from din_ext.__main__ import self_check

    return self_check()


# -- arguments ----------------------------------------------------------------------------------------------------


def _data_options(parser: argparse.ArgumentParser, evaluation: bool) -> None:
    default = "the checkpoint's" if evaluation else "{}"
    parser.add_argument("--data", choices=DATASETS, default=None,
                        help=f"dataset (default: {default.format('synthetic')})")
    parser.add_argument("--path", default=None, help="folder or file of the amazon/taobao/recbole data")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"seed of the synthetic data, of the initialization and of the shuffling (default: "
                             f"{default.format(0)})")
    parser.add_argument("--max-history", type=int, default=None,
                        help=f"keep the most recent N behaviours per impression, 0 keeps all (default: "
                             f"{default.format(50)})")
    parser.add_argument("--synthetic-users", type=int, default=None,
                        help=f"users in the synthetic data (default: {default.format(4000)})")
    parser.add_argument("--synthetic-conversion", action="store_true",
                        help="synthetic data with a second task, conversion (one head per task)")


def _runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--backend", default="auto", choices=_backend.BACKENDS, help="din_ext kernels (auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's, fewer when the machine is busy)")


def _train_options(parser: argparse.ArgumentParser, with_model: bool) -> None:
    _data_options(parser, evaluation=False)
    if with_model:
        parser.add_argument("--model", choices=sorted(MODELS), default="din",
                            help="din (attention pooling) or base (the paper's BaseModel: sum pooling)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs in all, counting resumed ones (default: 2)")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch size (default: 256)")
    parser.add_argument("--eval-batch-size", type=int, default=4096, help="default: 4096")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: 0.001)")
    parser.add_argument("--embed-dim", type=int, default=16, help="embedding width of every field")
    parser.add_argument("--attention-hidden", type=_widths, default=(80, 40), help="local activation unit (80,40)")
    parser.add_argument("--tower-hidden", type=_widths, default=(200, 80), help="MLP tower (200,80)")
    parser.add_argument("--activation", choices=("dice", "prelu", "relu", "sigmoid"), default="dice")
    parser.add_argument("--normalization", choices=("none", "softmax"), default="none",
                        help="attention weights: none (the paper) or softmax")
    parser.add_argument("--mba-lambda", type=float, default=0.0,
                        help="MBA regularization strength lambda (DIN paper 5.1): embedding tables become din_ext.MBAEmbedding, trained with SparseAdam")
    parser.add_argument("--out", default="din-ext-run", help="checkpoints (last.pt, best.pt) and metrics.json")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt up to --epochs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _runtime_options(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="din-ext", description="Train and evaluate DIN (din_ext) on click logs.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("train", help="train DIN (or BaseModel) and evaluate every epoch")
    _train_options(p, with_model=True)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("compare", help="train BaseModel and DIN on the same data; report RelaImpr")
    _train_options(p, with_model=False)
    p.set_defaults(func=cmd_compare, out="din-ext-compare")
    for name, func, help_text in (("evaluate", cmd_evaluate, "auc, gauc, logloss of a checkpoint"),
                                  ("predict", cmd_predict, "write a checkpoint's click probabilities to CSV")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--checkpoint", required=True, help="a .pt written by din-ext train (best.pt or last.pt)")
        _data_options(p, evaluation=True)
        p.add_argument("--split", choices=("test", "train"), default="test")
        p.add_argument("--batch-size", type=int, default=4096)
        if name == "predict":
            p.add_argument("--output", required=True, help="CSV: row, user_id, p_<task>..., <task> labels")
        _runtime_options(p)
        p.set_defaults(func=func)
    p = sub.add_parser("selfcheck", aliases=["check"], help="check every built backend against the reference")
    p.set_defaults(func=cmd_selfcheck)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if getattr(args, "threads", None) is not None:
            torch.set_num_threads(_positive("threads", args.threads))
        elif hasattr(args, "threads"):
            torch.set_num_threads(default_threads())
        return args.func(args)
    except UsageError as exc:
        print(f"din-ext {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
