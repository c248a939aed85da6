"""The ``din-ext`` command: train, evaluate and compare DIN on a click log, predict with a checkpoint, self-check.

    din-ext train [--data synthetic|amazon|taobao|recbole|prepared] [--path P] [--model din|base] [--epochs N] ...
    din-ext prepare --data taobao --path RAW --out DIR [--memory-limit 2G]   # parquet shards that train streams
    din-ext evaluate --checkpoint DIR/best.pt [--data ...]
    din-ext predict --checkpoint DIR/best.pt [--data ...] --output preds.csv
    din-ext compare [--epochs N] ...           # BaseModel and DIN on the same data, with RelaImpr
    din-ext selfcheck                          # every built backend against the reference

Argument parsing and the command handlers only: each handler turns its flags into calls of din_ext.training (and of
the data loaders, din_ext.data.LOADERS) and their errors into one line naming the flags.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

import din_ext.data as datasets
from din_ext import _backend, _validate, metrics, training
from din_ext.contract import ACTIVATIONS, NORMALIZATIONS
from din_ext.data import LOADERS, Interactions, Schema
from din_ext.data.loaders import SOURCES
from din_ext.model import DIN, CheckpointError, load_checkpoint
from din_ext.selfcheck import self_check

DEFAULTS = {"data": "synthetic", "path": None, "seed": 0, "max_history": 50, "synthetic_users": None,
            "synthetic_conversion": False}


class UsageError(Exception):
    """A bad argument or input: reported as one line, without a traceback."""

    exit_code = 2


@contextlib.contextmanager
def _flags(**flags: str) -> Iterator[None]:
    """Rewords an ArgumentError of the library to name the flag of its argument (``flags``: argument -> flag text;
    by default --the-argument)."""
    try:
        yield
    except training.ArgumentError as exc:
        flag, text = flags.get(exc.argument, "--" + exc.argument.replace("_", "-")), str(exc)
        raise UsageError(flag + (text[len(exc.argument):] if text.startswith(exc.argument) else f": {text}")) from None


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


def _loader_arguments(spec: Dict[str, Any]) -> Tuple[Optional[str], Dict[str, Any]]:
    """(path, options) of the loader of ``spec["data"]``: the --synthetic-* flags are the synthetic loader's options,
    the other loaders read --path."""
    name, path = spec["data"], spec["path"]
    if name == "synthetic":
        if path:
            raise UsageError("--path is not used with --data synthetic (the data is generated from --seed)")
        return None, {"seed": int(spec["seed"]), "users": spec["synthetic_users"],
                      "conversion": bool(spec["synthetic_conversion"])}
    if spec["synthetic_users"] or spec["synthetic_conversion"]:
        raise UsageError("--synthetic-* options only apply to --data synthetic")
    if not path:
        raise UsageError(f"--data {name} needs --path (the folder or file holding the {name} data)")
    if not os.path.exists(path):
        raise UsageError(f"--path {path!r} does not exist")
    return path, {}


def load_data(spec: Dict[str, Any]) -> Tuple[Interactions, Interactions, Schema]:
    """(train, test, schema) of a data spec; histories are cut to the most recent ``max_history`` behaviours.

    A streamed source (``--data prepared``) gives batch sources instead of ``Interactions``: nothing but its schema
    is read here."""
    name = spec["data"]
    if spec["max_history"] < 0:
        raise UsageError(f"--max-history must be >= 0 (0 keeps every behaviour), got {spec['max_history']}")
    if spec["synthetic_users"] is not None and spec["synthetic_users"] < 1:
        raise UsageError(f"--synthetic-users must be positive, got {spec['synthetic_users']}")
    if name not in LOADERS and name not in SOURCES:
        raise UsageError(f"--data must be one of {', '.join((*LOADERS, *SOURCES))}, got {name!r}")
    path, options = _loader_arguments(spec)
    if name in SOURCES:
        try:
            train, test, schema = SOURCES[name](path, max_history=spec["max_history"] or None, **options)
        except (ValueError, OSError, ImportError) as exc:
            raise UsageError(f"--data {name} --path {path}: {exc}") from exc
        if len(train) == 0 or len(test) == 0:
            raise UsageError(f"the {name} data has an empty split (train {len(train)}, test {len(test)} rows)")
        return train, test, schema
    try:  # datasets.load_dataset looked up at each call, so that a replacement of it (tests do) applies
        train, test, schema = datasets.load_dataset(name, path, **options)
    except (ValueError, OSError) as exc:  # malformed or missing files: the loaders name the file and line
        raise UsageError(f"--data {name}{f' --path {path}' if path else ''}: {exc}") from exc
    if len(train) == 0 or len(test) == 0:
        raise UsageError(f"the {name} data has an empty split (train {len(train)}, test {len(test)} rows)")
    if spec["max_history"]:
        train, test = train.truncate_history(spec["max_history"]), test.truncate_history(spec["max_history"])
    return train, test, schema


# -- command handlers -----------------------------------------------------------------------------------------------


def _check_backend(backend: str, device: torch.device) -> None:
    try:
        _backend.resolve(backend, device)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"--backend {backend}: {exc}") from exc


def _read_checkpoint(path: str, option: str) -> Dict[str, Any]:
    try:
        return load_checkpoint(path)
    except CheckpointError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _model_of(checkpoint: Dict[str, Any], where: str) -> DIN:
    """DIN.from_checkpoint, its CheckpointError as a one-line UsageError prefixed by ``where`` (option and path)."""
    try:
        return DIN.from_checkpoint(checkpoint)
    except CheckpointError as exc:
        raise UsageError(f"{where}: {exc}") from None


def _widths(text: str) -> Tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths such as 200,80, got {text!r}") from None
    if not widths or any(w <= 0 for w in widths):
        raise argparse.ArgumentTypeError(f"expected positive widths such as 200,80, got {text!r}")
    return widths


def _new_model(args: argparse.Namespace, schema: Schema, model_class=DIN) -> DIN:
    """The DIN (or ``model_class``, a subclass) of the model flags; the flags DIN would refuse are named as flags."""
    training.check_positive("embed_dim", args.embed_dim)
    if not (math.isfinite(args.mba_lambda) and args.mba_lambda >= 0):
        raise UsageError(f"--mba-lambda must be finite and >= 0, got {args.mba_lambda}")
    try:
        return model_class(schema, embed_dim=args.embed_dim, attention_hidden=args.attention_hidden,
                   tower_hidden=args.tower_hidden, activation=args.activation, pooling=training.POOLING[args.model],
                   normalization=args.normalization, mba_lambda=args.mba_lambda)
    except (ValueError, TypeError, RuntimeError, MemoryError) as exc:  # e.g. a width too large to allocate
        raise UsageError(f"the model options: {_validate.first_line(exc)}") from None


def _say(text: str) -> None:
    print(text, flush=True)


def train(args: argparse.Namespace, data=None, out=None) -> Dict[str, Any]:
    """Trains per ``args`` (see ``din-ext train --help``); returns the final metrics (also in OUT/metrics.json)."""
    out = out or args.out
    last_path = os.path.join(out, "last.pt")
    with _flags(resume_from=f"--resume: {last_path}"):
        return _train(args, data, out, last_path)


def _train(args: argparse.Namespace, data, out: str, last_path: str) -> Dict[str, Any]:
    device = training.resolve_device(args.device)
    _check_backend(args.backend, device)
    checkpoint = None
    if args.resume and getattr(args, "sharding", None):
        raise UsageError("--resume does not work with --sharding (din_ext.sharding writes no optimizer state)")
    if args.resume:
        if not os.path.exists(last_path):
            raise UsageError(f"--resume: no checkpoint {last_path} to resume from")
        checkpoint = _read_checkpoint(last_path, "--resume")
    fit_arguments = {"epochs": args.epochs, "out": out, "batch_size": args.batch_size, "lr": args.lr,
                     "eval_batch_size": args.eval_batch_size, "resume_from": checkpoint}
    training.check_fit_arguments(**fit_arguments)  # before the data is loaded, which may take long
    spec = data_spec(args, None if checkpoint is None else checkpoint["data"])
    if checkpoint is not None and spec != checkpoint["data"]:
        raise UsageError(f"--resume: the data options {spec} differ from the checkpoint's {checkpoint['data']}")
    train_set, test_set, schema = data if data is not None else load_data(spec)

    torch.manual_seed(spec["seed"])  # the initialization of a new model
    if checkpoint is not None:
        model = _model_of(checkpoint, f"--resume: {last_path}")
        training.check_fits(model, schema, "--resume: the data")
    elif getattr(args, "sharding", None):
        return _train_sharded(args, schema, train_set, test_set, fit_arguments, spec, device)
    else:
        model = _new_model(args, schema)
    model.backend = args.backend
    return training.fit(model, train_set, test_set, **fit_arguments, device=device, seed=spec["seed"],
                        data_options=spec, data_name=spec["data"], progress=not args.no_progress, log=_say)


def _train_sharded(args, schema, train_set, test_set, fit_arguments, spec, device) -> Dict[str, Any]:
    """--sharding: din_ext.sharding.run in this torchrun process (one per rank)."""
    try:
        from din_ext import sharding
        model = _new_model(args, schema, sharding.ShardedDIN)
    except ImportError as exc:
        raise UsageError(f"--sharding: {_validate.first_line(exc)}") from None
    model.backend = args.backend
    options = {**training.TRAIN_DEFAULTS, **{k: fit_arguments[k] for k in ("batch_size", "lr")
                                             if fit_arguments[k] is not None}}
    try:
        return sharding.run(model, args.sharding, train_set, test_set, device=device, epochs=args.epochs,
                            eval_batch_size=args.eval_batch_size, out=fit_arguments["out"], seed=spec["seed"],
                            checkpoint_extra={"data": spec, "options": options}, log=_say, **options)
    except RuntimeError as exc:
        raise UsageError(f"--sharding: {_validate.first_line(exc)}") from None


def _load_model(args: argparse.Namespace) -> Tuple[DIN, Dict[str, Any], torch.device]:
    if not os.path.exists(args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint!r} does not exist")
    checkpoint = _read_checkpoint(args.checkpoint, "--checkpoint")
    device = training.resolve_device(args.device)
    _check_backend(args.backend, device)
    training.check_positive("batch_size", args.batch_size)
    model = _model_of(checkpoint, f"--checkpoint {args.checkpoint}")
    model.backend = args.backend
    return model.to(device), checkpoint, device


def _split(args: argparse.Namespace, model: DIN, checkpoint: Dict[str, Any]) -> Interactions:
    spec = data_spec(args, checkpoint["data"])
    train_set, test_set, schema = load_data(spec)
    training.check_fits(model, schema, f"the {spec['data']} data")
    return train_set if args.split == "train" else test_set


def cmd_train(args: argparse.Namespace) -> int:
    final = train(args)
    name = "DIN" if final["model"] == "din" else "BaseModel"
    print(f"{name} final (epoch {final['epoch']}): {training.format_metrics(final)}  "
          f"eval {final['samples_per_second']:,.0f} samples/s; checkpoints and metrics.json in {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    model, checkpoint, device = _load_model(args)
    data = _split(args, model, checkpoint)
    result = training.evaluate(model, data, args.batch_size, device)
    print(json.dumps(result, indent=2))
    return 0


def _check_output(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder):
        raise UsageError(f"--output {path!r}: " + ("is a folder; name a CSV file" if os.path.isdir(path)
                                                   else f"the folder {folder} does not exist"))


def _write_predictions(path: str, tasks, probabilities: torch.Tensor, user_id: torch.Tensor,
                       labels: Dict[str, torch.Tensor]) -> None:
    """The predictions CSV: row, user_id, p_<task>..., <task> labels."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "user_id", *(f"p_{t}" for t in tasks), *tasks])
        columns = [labels[t].tolist() for t in tasks]
        for row, (user, p) in enumerate(zip(user_id.tolist(), probabilities.tolist())):
            writer.writerow([row, user, *(f"{x:.6f}" for x in p), *(int(col[row]) for col in columns)])
    print(f"wrote {len(user_id):,} predictions to {path}")


def cmd_predict(args: argparse.Namespace) -> int:
    _check_output(args.output)
    model, checkpoint, device = _load_model(args)
    data = _split(args, model, checkpoint)
    probabilities, user_id, labels, _ = training.predict_rows(model, data, args.batch_size, device)
    _write_predictions(args.output, model.tasks, probabilities, user_id, labels)
    return 0


def cmd_predict_any(args: argparse.Namespace) -> int:
    """predict for a checkpoint (.pt) or, through din_ext.serving.DINPredictor, a .pt2 package."""
    if not args.checkpoint.endswith(".pt2"):
        return cmd_predict(args)
    from din_ext.serving import DINPredictor

    _check_output(args.output)
    if not os.path.exists(args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint!r} does not exist")
    training.check_positive("batch_size", args.batch_size)
    try:
        predictor = DINPredictor.load(args.checkpoint)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"--checkpoint {args.checkpoint}: {_validate.first_line(exc)}") from None
    spec = data_spec(args, predictor.data)
    train_set, test_set, schema = load_data(spec)
    want = (predictor.schema.user_fields, predictor.schema.item_fields, predictor.schema.history_fields)
    if (schema.user_fields, schema.item_fields, schema.history_fields) != want:
        raise UsageError(f"the {spec['data']} data does not fit the package's fields and table sizes {want}")
    data = train_set if args.split == "train" else test_set
    _write_predictions(args.output, predictor.tasks, predictor.predict_interactions(data, args.batch_size),
                       data.user_id, data.labels)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """din-ext export: a checkpoint as an AOTInductor package (.pt2) for the CPU."""
    from din_ext.export import export_package

    if not args.out.endswith(".pt2"):
        raise UsageError(f"--out {args.out!r}: a pt2 package's name ends in .pt2")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise UsageError(f"--out {args.out!r}: its folder does not exist")
    checkpoint = _read_checkpoint(args.checkpoint, "--checkpoint")
    model = _model_of(checkpoint, f"--checkpoint {args.checkpoint}")
    export_package(model, args.out, data=checkpoint.get("data"))
    note = "" if model.schema.vocabularies else " (the checkpoint has no vocabularies: row-id requests only)"
    print(f"wrote {args.out}{note}")
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


def cmd_prepare(args: argparse.Namespace) -> int:
    from din_ext.data.prepare import PREPARERS, prepare

    if args.data not in PREPARERS:
        raise UsageError(f"--data {args.data}: prepare supports {', '.join(PREPARERS)}")
    if not os.path.exists(args.path):
        raise UsageError(f"--path {args.path!r} does not exist")
    options = {"memory_limit": args.memory_limit, "max_history": args.max_history or None}
    if args.shard_rows is not None:
        options["shard_rows"] = training.check_positive("shard_rows", args.shard_rows)
    try:
        schema = prepare(args.data, args.path, args.out, log=_say, **options)
    except (ValueError, OSError, ImportError) as exc:
        raise UsageError(f"--data {args.data} --path {args.path}: {exc}") from exc
    print(f"prepared {schema['rows']['train']:,} train / {schema['rows']['test']:,} test impressions in "
          f"{len(schema['shards'])} shard(s): train with  din-ext train --data prepared --path {args.out}")
    return 0


def cmd_selfcheck(args: argparse.Namespace) -> int:
    return self_check(_say)


# -- arguments ----------------------------------------------------------------------------------------------------


def _data_options(parser: argparse.ArgumentParser, evaluation: bool) -> None:
    default = "the checkpoint's" if evaluation else "{}"
    parser.add_argument("--data", choices=(*LOADERS, *SOURCES), default=None,
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
        parser.add_argument("--model", choices=sorted(training.POOLING), default="din",
                            help="din (attention pooling) or base (the paper's BaseModel: sum pooling)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs in all, counting resumed ones (default: 2)")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch size (default: 256)")
    parser.add_argument("--eval-batch-size", type=int, default=4096, help="default: 4096")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: 0.001)")
    parser.add_argument("--embed-dim", type=int, default=16, help="embedding width of every field")
    parser.add_argument("--attention-hidden", type=_widths, default=(80, 40), help="local activation unit (80,40)")
    parser.add_argument("--tower-hidden", type=_widths, default=(200, 80), help="MLP tower (200,80)")
    parser.add_argument("--activation", choices=ACTIVATIONS, default="dice")
    parser.add_argument("--normalization", choices=NORMALIZATIONS, default="none",
                        help="attention weights: none (the paper) or softmax")
    parser.add_argument("--mba-lambda", type=float, default=0.0,
                        help="MBA regularization strength lambda (DIN paper 5.1): embedding tables become "
                             "din_ext.MBAEmbedding, trained with SparseAdam")
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
    p.add_argument("--sharding", choices=("rowwise", "tablewise"), default=None,
                   help="TorchRec-sharded tables, one process per rank under torchrun (din_ext[torchrec]); the tables "
                        "step with FBGEMM's fused Adam at --lr on CUDA, Adagrad at lr 0.01 on the CPU")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("compare", help="train BaseModel and DIN on the same data; report RelaImpr")
    _train_options(p, with_model=False)
    p.set_defaults(func=cmd_compare, out="din-ext-compare")
    for name, func, help_text in (("evaluate", cmd_evaluate, "auc, gauc, logloss of a checkpoint"),
                                  ("predict", cmd_predict_any, "write a checkpoint's (.pt or .pt2) click "
                                                               "probabilities to CSV")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--checkpoint", required=True, help="a .pt written by din-ext train (best.pt or last.pt)")
        _data_options(p, evaluation=True)
        p.add_argument("--split", choices=("test", "train"), default="test")
        p.add_argument("--batch-size", type=int, default=4096)
        if name == "predict":
            p.add_argument("--output", required=True, help="CSV: row, user_id, p_<task>..., <task> labels")
        _runtime_options(p)
        p.set_defaults(func=func)
    p = sub.add_parser("prepare", help="turn raw click logs into parquet shards that train streams "
                                       "(memory-bounded; needs din_ext[data])")
    p.add_argument("--data", required=True, help="raw format: taobao")
    p.add_argument("--path", required=True, help="folder of the raw files")
    p.add_argument("--out", required=True, help="new folder for schema.json, vocab/ and shards/")
    p.add_argument("--memory-limit", default="2G", help="peak memory to stay within, e.g. 2G, 1500M (default 2G)")
    p.add_argument("--max-history", type=int, default=50,
                   help="most recent behaviours per impression, 0 keeps all (default 50; the vocabularies count them)")
    p.add_argument("--shard-rows", type=int, default=None,
                   help="at most about that many behaviour rows per shard (default: what the memory limit allows, "
                        "at most 4M)")
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("export", help="a checkpoint as an AOTInductor package (.pt2) for serving")
    p.add_argument("--checkpoint", required=True, help="a .pt written by din-ext train")
    p.add_argument("--format", choices=("pt2",), default="pt2")
    p.add_argument("--out", required=True, help="the package to write (NAME.pt2)")
    p.set_defaults(func=cmd_export)
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
        with _flags():
            if getattr(args, "threads", None) is not None:
                torch.set_num_threads(training.check_positive("threads", args.threads))
            elif hasattr(args, "threads"):
                torch.set_num_threads(training.default_threads())
            return args.func(args)
    except (UsageError, training.TrainingError) as exc:  # TrainingDiverged among them: exit status 1
        print(f"din-ext {args.command}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", UsageError.exit_code)
