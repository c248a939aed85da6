"""The ``din-ext`` command: train, evaluate and compare DIN on a click log, predict with a checkpoint, self-check.

    din-ext train [--data synthetic|amazon|taobao|recbole|prepared] [--path P] [--model din|base] [--epochs N] ...
    din-ext train --nproc 2 [--sync-dice] ...  # DDP on 2 local processes (torchrun --nproc-per-node 2 -m din_ext train)
    din-ext prepare --data taobao|amazon|recbole --path RAW --out DIR [--memory-limit 2G]  # shards train streams
    din-ext evaluate --checkpoint DIR/best.pt [--data ...]
    din-ext predict --checkpoint DIR/best.pt [--data ...] --output preds.csv   # or a .pt2/.onnx export
    din-ext export --checkpoint DIR/best.pt --format pt2|onnx --out din.pt2|din.onnx
    din-ext compare [--epochs N] ...           # BaseModel and DIN on the same data, with RelaImpr
    din-ext config > run.yaml                  # train's defaults as a config file; din-ext train --config run.yaml
    din-ext tune --trials N [--jobs J] ...     # Optuna search of the learning rate, widths and MBA lambda
    din-ext explain --checkpoint DIR/best.pt --user U [--candidate ITEM]   # one user's attention weights
    din-ext selfcheck                          # every built backend against the reference

Argument parsing and the command handlers only: each handler turns its flags into calls of din_ext.training (and of
the data loaders, din_ext.data.LOADERS) and their errors into one line naming the flags.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import json
import math
import os
import subprocess
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

import din_ext.data as datasets
from din_ext import _backend, _validate, config, distributed, metrics, plots, training
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
                   normalization=args.normalization, mba_lambda=args.mba_lambda, dropout=args.dropout)
    except (ValueError, TypeError, RuntimeError, MemoryError) as exc:  # e.g. a width too large to allocate
        raise UsageError(f"the model options: {_validate.first_line(exc)}") from None


def _say(text: str) -> None:
    print(text, flush=True)


def train(args: argparse.Namespace, data=None, out=None, log=None,
          world: Optional[distributed.World] = None) -> Dict[str, Any]:
    """Trains per ``args`` (see ``din-ext train --help``); returns the final metrics (also in OUT/metrics.json).

    OUT also gets config.yaml (the resolved options: ``din-ext train --config OUT/config.yaml`` runs it again) and,
    with matplotlib installed, curves.png. log: called with each progress line (default: print). world: the
    processes of a distributed run (default one process); rank 0 alone writes OUT's files."""
    out = out or args.out
    last_path = os.path.join(out, "last.pt")
    world = world or distributed.World()
    with _flags(resume_from=f"--resume: {last_path}"):
        final = _train(args, data, out, last_path, log or _say, world)
    if world.is_main:
        _write_curves(final, out, log or _say)
    return final


def _write_curves(final: Dict[str, Any], out: str, log) -> None:
    """OUT/curves.png from the run's history, or a line saying why there is none."""
    if not plots.available():
        log(f"no curves.png: matplotlib is not installed ({plots.INSTALL})")
        return
    name = "DIN" if final["model"] == "din" else "BaseModel"
    plots.training_curves(final["history"], os.path.join(out, "curves.png"), title=f"{name}: {out}")


@functools.lru_cache(maxsize=None)
def _train_parser() -> argparse.ArgumentParser:
    """din-ext train's parser: its options are the keys of a run's config file."""
    return config.command_parser(build_parser(), "train")


def resolved_options(args: argparse.Namespace, spec: Optional[Dict[str, Any]] = None,
                     fit: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The train options of ``args`` (config-file keys) with what a run resolves in place of each unset one: the
    data options of ``spec`` (default: ``data_spec(args)``), batch size and learning rate of ``fit`` (default:
    training.TRAIN_DEFAULTS)."""
    values = {key: getattr(args, key) for key in config.options(_train_parser()) if hasattr(args, key)}
    values.update(spec or data_spec(args))
    for key, default in training.TRAIN_DEFAULTS.items():
        if values.get(key) is None:
            values[key] = (fit or {}).get(key, default)
    return values


def _train(args: argparse.Namespace, data, out: str, last_path: str, log,
           world: distributed.World) -> Dict[str, Any]:
    device = distributed.process_device(training.resolve_device(args.device))
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
    checked = training.check_fit_arguments(**fit_arguments)  # before the data is loaded, which may take long
    spec = data_spec(args, None if checkpoint is None else checkpoint["data"])
    if checkpoint is not None and spec != checkpoint["data"]:
        raise UsageError(f"--resume: the data options {spec} differ from the checkpoint's {checkpoint['data']}")
    record = resolved_options(args, spec, checked)
    record.update(out=out, threads=torch.get_num_threads())
    if world.is_main:
        with open(os.path.join(out, "config.yaml"), "w") as f:
            f.write(config.dump(record, _train_parser(), header="the options of this run: din-ext train --config "
                                                                "config.yaml runs it again"))
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
                        data_options=spec, data_name=spec["data"], progress=not args.no_progress, log=log,
                        world=world)


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
    if hasattr(args, "batch_size"):  # explain has none: it scores one user
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
    if args.print_config:
        print(config.dump(resolved_options(args), _train_parser()), end="")
        return 0
    if args.nproc is not None:
        return _launch(args)
    if not args.dist_timeout > 0:
        raise UsageError(f"--dist-timeout must be positive seconds, got {args.dist_timeout}")
    if args.sync_dice and not distributed.launched():
        raise UsageError("--sync-dice applies to a distributed run (--nproc N, or under torchrun)")
    if args.sync_dice and args.sharding:
        raise UsageError("--sync-dice applies to DDP training; --sharding keeps per-rank Dice statistics")
    world = distributed.init(args.dist_timeout, "sync" if args.sync_dice else "rank",
                             training.resolve_device(args.device))
    try:
        final = train(args, world=world)
    finally:
        world.close()
    if not world.is_main:
        return 0
    name = "DIN" if final["model"] == "din" else "BaseModel"
    print(f"{name} final (epoch {final['epoch']}): {training.format_metrics(final)}  "
          f"eval {final['samples_per_second']:,.0f} samples/s; checkpoints and metrics.json in {args.out}")
    return 0


def _launch(args: argparse.Namespace) -> int:
    """din-ext train --nproc N: the same command on N local processes under torchrun (a failed process ends the
    others); its exit status."""
    processes = training.check_positive("nproc", args.nproc)
    argv, rest = list(args.argv), []
    while argv:
        item = argv.pop(0)
        if item == "--nproc":
            argv.pop(0)
        elif not item.startswith("--nproc="):
            rest.append(item)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "din_ext", *rest]
    return subprocess.call(command)


def cmd_evaluate(args: argparse.Namespace) -> int:
    model, checkpoint, device = _load_model(args)
    data = _split(args, model, checkpoint)
    result = training.evaluate(model, data, args.batch_size, device)
    print(json.dumps(result, indent=2))
    return 0


def _check_output(path: str, option: str = "--output", what: str = "a CSV file") -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder):
        raise UsageError(f"{option} {path!r}: " + (f"is a folder; name {what}" if os.path.isdir(path)
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


EXPORTS = {"pt2": ".pt2", "onnx": ".onnx"}  # din-ext export's formats and their file endings


def cmd_predict(args: argparse.Namespace) -> int:
    """predict through din_ext.serving.DINPredictor: a checkpoint (.pt, eager on --device with --backend), an
    AOTInductor package (.pt2) or an ONNX file (.onnx), both from din-ext export, on the CPU."""
    from din_ext.serving import DINPredictor

    _check_output(args.output)
    if not os.path.exists(args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint!r} does not exist")
    training.check_positive("batch_size", args.batch_size)
    exported = args.checkpoint.endswith(tuple(EXPORTS.values()))
    if exported and args.device not in ("auto", "cpu"):
        raise UsageError(f"--device {args.device}: a {os.path.splitext(args.checkpoint)[1]} export runs on the cpu")
    device = training.resolve_device(args.device)
    _check_backend(args.backend, device)
    try:
        predictor = DINPredictor.load(args.checkpoint, backend=args.backend, threads=torch.get_num_threads(),
                                      device=None if exported else device)
    except (ValueError, RuntimeError, ImportError) as exc:
        raise UsageError(f"--checkpoint {args.checkpoint}: {_validate.first_line(exc)}") from None
    spec = data_spec(args, predictor.data)
    train_set, test_set, schema = load_data(spec)
    training.check_fits(predictor, schema, f"the {spec['data']} data")
    data = train_set if args.split == "train" else test_set
    batches = datasets.iterate_batches(data, args.batch_size) if isinstance(data, Interactions) else \
        data.batches(args.batch_size, shuffle=False)
    probabilities, user_id, labels = predictor.predict_batches(batches)
    _write_predictions(args.output, predictor.tasks, probabilities, user_id, labels)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """din-ext export: a checkpoint as an AOTInductor package (.pt2) or an ONNX file (.onnx) for the CPU."""
    ending = EXPORTS[args.format]
    if not args.out.endswith(ending):
        raise UsageError(f"--out {args.out!r}: a {args.format} file's name ends in {ending}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise UsageError(f"--out {args.out!r}: its folder does not exist")
    checkpoint = _read_checkpoint(args.checkpoint, "--checkpoint")
    model = _model_of(checkpoint, f"--checkpoint {args.checkpoint}")
    if args.format == "onnx":
        from din_ext.onnx_export import export_onnx as write
    else:
        from din_ext.export import export_package as write
    try:
        write(model, args.out, data=checkpoint.get("data"))
    except ImportError as exc:  # the onnx extra is not installed
        raise UsageError(f"--format {args.format}: {_validate.first_line(exc)}") from None
    note = "" if model.schema.vocabularies else " (the checkpoint has no vocabularies: row-id requests only)"
    print(f"wrote {args.out}{note}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    if distributed.launched():
        raise UsageError("compare runs in one process; run din-ext train under torchrun (or with --nproc)")
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


def _with_config(parser: argparse.ArgumentParser, argv: Optional[List[str]], args: argparse.Namespace
                 ) -> argparse.Namespace:
    """``argv`` parsed again with the values of ``--config`` as the command's defaults: flags override them."""
    command = config.command_parser(parser, args.command)
    try:
        command.set_defaults(**config.load(args.config, command))
    except config.ConfigError as exc:
        raise UsageError(f"--config {exc}") from None
    return parser.parse_args(argv)


def cmd_config(args: argparse.Namespace) -> int:
    defaults = _train_parser().parse_args([])
    print(config.dump(resolved_options(defaults), _train_parser(), fmt=args.format,
                      header="din-ext train's defaults: din-ext train --config FILE (flags override the file)"
                      if args.format == "yaml" else None), end="")
    return 0


@functools.lru_cache(maxsize=1)
def _data_of(spec: Tuple[Tuple[str, Any], ...]):
    """load_data of a spec, once per process (the trials of a tuning worker share it)."""
    return load_data(dict(spec))


def tune_trial(options: Dict[str, Any], out: str) -> Dict[str, Any]:
    """One tuning trial: din-ext train with ``options`` (config-file keys) into ``out``; its final metrics."""
    values = config.convert(options, _train_parser(), f"the options of trial {out}")
    args = _train_parser().parse_args([])
    for key, value in values.items():
        setattr(args, key, value)
    torch.set_num_threads(args.threads)
    name = os.path.basename(out)
    with _flags():
        return train(args, data=_data_of(tuple(data_spec(args).items())), out=out,
                     log=lambda line: _say(f"[{name}] {line}"))


def cmd_tune(args: argparse.Namespace) -> int:
    from din_ext import tune

    training.check_positive("trials", args.trials)
    training.check_positive("jobs", args.jobs)
    base = resolved_options(args)
    if base["resume"]:
        raise UsageError("--resume does not apply to tune: run the same tune command again to resume its study")
    try:
        tune.require_optuna()
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    searched = [name for name in tune.SPACE if name in base]
    missing = [name for name in tune.SPACE if name not in base]
    if missing:
        _say(f"not searched: {', '.join(missing)} (din-ext train has no such option)")
    # each worker's trials take an equal share of the threads (one at least), unless --threads says
    base["threads"] = args.threads or max(1, training.default_threads() // args.jobs)
    base["no_progress"] = True
    load_data(data_spec(args))  # a bad data option fails here, once, not in every trial
    try:
        summary = tune.search(tune_trial, trials=args.trials, out=args.out, base=base, jobs=args.jobs,
                              metric=args.metric, study_name=args.study, seed=data_spec(args)["seed"],
                              searched=searched, catch=(training.TrainingDiverged,), log=_say)
    except RuntimeError as exc:  # failed workers, or no finished trial: the study keeps what was done
        raise training.TrainingError(str(exc)) from None
    print(tune.format_report(summary))
    print(f"the best trial's options: {summary['best_out']}/config.yaml; every trial in {args.out}/best.json")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from din_ext import explain

    training.check_positive("top", args.top)
    path = args.plot or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                     f"attention-user{args.user}.png")
    if plots.available():
        _check_output(path, "--plot", "a PNG file")
    model, checkpoint, _ = _load_model(args)
    data = _split(args, model, checkpoint)
    try:
        result = explain.explain_user(model, data, args.user, args.candidate)
    except ValueError as exc:
        raise UsageError(f"--user {args.user}{f' --candidate {args.candidate}' if args.candidate else ''}: "
                         f"{exc}") from None
    print(explain.format_explanation(result, args.top))
    if not plots.available():
        print(f"no picture: matplotlib is not installed ({plots.INSTALL})")
        return 0
    print(f"wrote {explain.plot_explanation(result, path, args.top)}")
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
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="dropout after each tower layer's activation in training (default: 0, none)")
    parser.add_argument("--out", default="din-ext-run", help="checkpoints (last.pt, best.pt) and metrics.json")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt up to --epochs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _runtime_options(parser)
    parser.add_argument("--config", default=None,
                        help="a .yaml/.yml (din_ext[config]) or .json file of these options, keys as the flags' "
                             "names with _ (din-ext config prints them); flags given here override it")


def _distributed_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=None,
                        help="train with DistributedDataParallel on N local processes (runs torchrun --standalone "
                             "--nproc-per-node N -m din_ext train ...); --batch-size stays the global batch")
    parser.add_argument("--sync-dice", action="store_true",
                        help="distributed: Dice statistics over the global batch (as SyncBatchNorm; the composite "
                             "path, slower than the fused kernels) instead of per process")
    parser.add_argument("--dist-timeout", type=float, default=distributed.DEFAULT_TIMEOUT,
                        help=f"distributed: seconds a collective waits for the other processes before the run "
                             f"fails (default {distributed.DEFAULT_TIMEOUT:g})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="din-ext", description="Train and evaluate DIN (din_ext) on click logs.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("train", help="train DIN (or BaseModel) and evaluate every epoch")
    _train_options(p, with_model=True)
    _distributed_options(p)
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved options (defaults, --config, flags) as a config file; train nothing")
    p.add_argument("--sharding", choices=("rowwise", "tablewise"), default=None,
                   help="TorchRec-sharded tables, one process per rank under torchrun (din_ext[torchrec]); the tables "
                        "step with FBGEMM's fused Adam at --lr on CUDA, Adagrad at lr 0.01 on the CPU")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("compare", help="train BaseModel and DIN on the same data; report RelaImpr")
    _train_options(p, with_model=False)
    p.set_defaults(func=cmd_compare, out="din-ext-compare")
    for name, func, help_text in (("evaluate", cmd_evaluate, "auc, gauc, logloss of a checkpoint"),
                                  ("predict", cmd_predict, ("write the click probabilities of a checkpoint (.pt) or "
                                                            "an export (.pt2, .onnx) to CSV"))):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--checkpoint", required=True, help="a .pt written by din-ext train (best.pt or last.pt)"
                       + ("; or a .pt2/.onnx written by din-ext export" if name == "predict" else ""))
        _data_options(p, evaluation=True)
        p.add_argument("--split", choices=("test", "train"), default="test")
        p.add_argument("--batch-size", type=int, default=4096)
        if name == "predict":
            p.add_argument("--output", required=True, help="CSV: row, user_id, p_<task>..., <task> labels")
        _runtime_options(p)
        p.set_defaults(func=func)
    p = sub.add_parser("prepare", help="turn raw click logs into parquet shards that train streams "
                                       "(memory-bounded; needs din_ext[data])")
    p.add_argument("--data", required=True,
                   help="raw format: taobao, amazon or recbole (other options: the loader's defaults)")
    p.add_argument("--path", required=True, help="folder of the raw files (amazon: or the reviews file; recbole: "
                                                 "or the .inter file)")
    p.add_argument("--out", required=True, help="new folder for schema.json, vocab/ and shards/")
    p.add_argument("--memory-limit", default="2G", help="peak memory to stay within, e.g. 2G, 1500M (default 2G)")
    p.add_argument("--max-history", type=int, default=50,
                   help="most recent behaviours per impression, 0 keeps all (default 50; the vocabularies count them)")
    p.add_argument("--shard-rows", type=int, default=None,
                   help="at most about that many behaviour rows (reviews, interactions) per shard (default: what "
                        "the memory limit allows, at most 4M)")
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("export", help="a checkpoint as an AOTInductor package (.pt2) or an ONNX file (.onnx, "
                                      "standard ops; needs din_ext[onnx]) for serving")
    p.add_argument("--checkpoint", required=True, help="a .pt written by din-ext train")
    p.add_argument("--format", choices=tuple(EXPORTS), default="pt2")
    p.add_argument("--out", required=True, help="the file to write (NAME.pt2 or NAME.onnx)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("selfcheck", aliases=["check"], help="check every built backend against the reference")
    p.set_defaults(func=cmd_selfcheck)
    p = sub.add_parser("config", help="print din-ext train's defaults as a config file (din-ext train --config)")
    p.add_argument("--format", choices=("yaml", "json"), default="yaml")
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("tune", help="search the learning rate, widths and MBA lambda with Optuna (din_ext[tune])")
    _train_options(p, with_model=True)
    p.add_argument("--trials", type=int, required=True, help="trials in all (a resumed search counts its done ones)")
    p.add_argument("--jobs", type=int, default=1, help="trials run in parallel, one process each (default 1)")
    p.add_argument("--metric", choices=("gauc", "auc"), default="gauc", help="the final test metric to maximize")
    p.add_argument("--study", default="din-ext-tune", help="the study's name in OUT/study.db")
    p.set_defaults(func=cmd_tune, out="din-ext-tune")
    p = sub.add_parser("explain", help="one user's behaviours ranked by attention weight for a candidate (printed "
                                       "and plotted)")
    p.add_argument("--checkpoint", required=True, help="a .pt written by din-ext train (best.pt or last.pt)")
    _data_options(p, evaluation=True)
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--user", required=True, help="the user's id (the data's user_id); their latest impression's "
                                                 "history is explained")
    p.add_argument("--candidate", default=None, help="raw id of the candidate's first item field (default: the "
                                                     "impression's own candidate)")
    p.add_argument("--top", type=int, default=20, help="behaviours printed and plotted (default 20)")
    p.add_argument("--plot", default=None, help="the picture to write (default: attention-user<U>.png next to the "
                                                "checkpoint; needs din_ext[plots])")
    _runtime_options(p)
    p.set_defaults(func=cmd_explain)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for train --nproc, which runs it again
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with _flags():
            if getattr(args, "config", None):
                args = _with_config(parser, argv, args)
            if getattr(args, "threads", None) is not None:
                torch.set_num_threads(training.check_positive("threads", args.threads))
            elif hasattr(args, "threads"):
                torch.set_num_threads(training.default_threads())
            return args.func(args)
    except (UsageError, training.TrainingError) as exc:  # TrainingDiverged among them: exit status 1
        print(f"din-ext {args.command}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", UsageError.exit_code)
