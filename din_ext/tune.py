"""Hyper-parameter search of DIN training with Optuna (``pip install "din_ext[tune]"``, imported when a search runs).

    best = search(train_fn, trials=20, out="tune", jobs=2)   # train_fn(options, run_dir) -> final metrics

Each trial draws the options of ``SPACE`` (keys of ``din-ext train``'s config file: learning rate, embedding width,
attention and tower widths, dropout, MBA lambda), trains into its own run directory OUT/trial-NNNN through
``train_fn`` and scores the final test metric (``metric``, default gauc). The study lives in OUT/study.db (SQLite), so
a search that is killed and started again with the same OUT goes on from it: finished trials are kept, a trial that
was running when it died is run again with the same options, and trials are added up to ``trials`` in all. ``jobs``
worker processes (spawned: each builds its own model and seeds its own torch) share the study. The best trial goes to
OUT/best.json. One search per OUT at a time: a trial found running when a search starts is taken as a killed one.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

logger = logging.getLogger("din_ext")

INSTALL = 'pip install "din_ext[tune]"'
STUDY_FILE = "study.db"
BEST_FILE = "best.json"
# option -> (kind, choices or range): "log" a log-uniform float in [low, high], "float" a uniform one, "choice" one
# of the values (widths as their flag text), "log_or_zero" 0 (off) or a log-uniform float
SPACE: Dict[str, Tuple[str, Tuple[Any, ...]]] = {
    "lr": ("log", (1e-4, 1e-2)),
    "embed_dim": ("choice", (8, 16, 32)),
    "attention_hidden": ("choice", ("80,40", "64,32", "32,16")),
    "tower_hidden": ("choice", ("200,80", "256,128", "128,64", "64,32")),
    "dropout": ("float", (0.0, 0.5)),
    "mba_lambda": ("log_or_zero", (1e-4, 1e-1)),
}
TrainFn = Callable[[Dict[str, Any], str], Mapping[str, Any]]


def require_optuna():
    """The optuna module; ImportError with the install command when it is missing."""
    try:
        import optuna
    except ImportError:
        raise ImportError(f"din-ext tune needs Optuna: {INSTALL}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the search logs its own line per trial
    return optuna


def suggest(trial, names: Sequence[str]) -> Dict[str, Any]:
    """The options ``names`` (keys of SPACE) drawn for an Optuna ``trial``, as config-file values."""
    options = {}
    for name in names:
        kind, spec = SPACE[name]
        if kind == "log":
            options[name] = trial.suggest_float(name, *spec, log=True)
        elif kind == "float":
            options[name] = trial.suggest_float(name, *spec)
        elif kind == "choice":
            options[name] = trial.suggest_categorical(name, list(spec))
        else:  # log_or_zero: whether the option is on, then its value
            on = trial.suggest_categorical(f"{name}_on", [False, True])
            options[name] = trial.suggest_float(name, *spec, log=True) if on else 0.0
    return options


def _objective(train_fn: TrainFn, base: Mapping[str, Any], names: Sequence[str], out: str, metric: str,
               log: Callable[[str], None]):
    def objective(trial) -> float:
        options = {**base, **suggest(trial, names)}
        run_dir = os.path.join(out, f"trial-{trial.number:04d}")
        trial.set_user_attr("out", run_dir)
        final = train_fn(options, run_dir)
        for key in ("auc", "gauc", "logloss"):
            trial.set_user_attr(key, float(final[key]))
        value = float(final[metric])
        log(f"trial {trial.number}: {metric} {value:.4f} ({', '.join(f'{k}={_short(options[k])}' for k in names)})")
        return value  # NaN (an undefined metric) makes Optuna fail the trial
    return objective


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _optimize(train_fn: TrainFn, base: Mapping[str, Any], names: Sequence[str], out: str, metric: str,
              study_name: str, log: Callable[[str], None], trials: int, seed: int, catch: Tuple[type, ...]) -> None:
    """One worker: ``trials`` trials of the study in OUT/study.db."""
    optuna = require_optuna()
    study = optuna.load_study(study_name=study_name, storage=_storage(out),
                              sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(_objective(train_fn, base, names, out, metric, log), n_trials=trials, catch=catch)


def _storage(out: str) -> str:
    return "sqlite:///" + os.path.abspath(os.path.join(out, STUDY_FILE))


def _requeue_killed(study) -> int:
    """Fails the trials a killed search left running (marked "killed", so they do not count as finished) and
    enqueues their options again; returns how many. Optuna has no public call to fail another process's trial."""
    optuna = require_optuna()
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in running:
        study._storage.set_trial_user_attr(trial._trial_id, "killed", True)
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"rerun_of": trial.number})
    return len(running)


def search(train_fn: TrainFn, *, trials: int, out: str, base: Optional[Mapping[str, Any]] = None, jobs: int = 1,
           metric: str = "gauc", study_name: str = "din-ext-tune", seed: int = 0,
           searched: Optional[Sequence[str]] = None, catch: Tuple[type, ...] = (),
           log: Callable[[str], None] = logger.info) -> Dict[str, Any]:
    """Runs (or resumes) the study in ``out`` until it has ``trials`` finished trials; returns OUT/best.json's dict.

    train_fn(options, run_dir) -> final metrics (with ``metric``): trains with ``base`` updated by the drawn options
    into ``run_dir``; with jobs > 1 it must be picklable (a module-level function). searched: the SPACE keys to draw
    (default all); catch: exceptions of train_fn that fail one trial instead of the search (e.g. a diverged run);
    log: called with one line per trial (picklable with jobs > 1, e.g. print).
    """
    optuna = require_optuna()
    if trials < 1 or jobs < 1:
        raise ValueError(f"trials and jobs must be positive, got trials {trials}, jobs {jobs}")
    names = list(SPACE if searched is None else searched)
    unknown = [n for n in names if n not in SPACE]
    if unknown:
        raise ValueError(f"searched: {unknown} are not in the search space {list(SPACE)}")
    os.makedirs(out, exist_ok=True)
    study = optuna.create_study(study_name=study_name, storage=_storage(out), direction="maximize",
                                load_if_exists=True)
    rerun = _requeue_killed(study)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)
    done = len([t for t in study.get_trials(deepcopy=False, states=finished) if "killed" not in t.user_attrs])
    remaining = max(0, trials - done)
    if done or rerun:
        log(f"resuming the study in {out}: {done} trial(s) done, {remaining} to go"
            + (f" ({rerun} killed one(s) run again first)" if rerun else ""))
    shares = [remaining // jobs + (1 if i < remaining % jobs else 0) for i in range(jobs)]
    workers = [(share, seed + i) for i, share in enumerate(shares) if share]
    arguments = (train_fn, dict(base or {}), names, out, metric, study_name, log)
    if len(workers) == 1:
        _optimize(*arguments, *workers[0], catch)
    elif workers:
        context = multiprocessing.get_context("spawn")  # no forked torch threads or CUDA state
        processes = [context.Process(target=_optimize, args=(*arguments, share, worker_seed, catch))
                     for share, worker_seed in workers]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        failed = [p.exitcode for p in processes if p.exitcode]
        if failed:
            raise RuntimeError(f"{len(failed)} tuning worker(s) exited with status {failed}; the study in {out} "
                               f"keeps the finished trials: run the same command again to go on")
    return _report(study, out, metric)


def _report(study, out: str, metric: str) -> Dict[str, Any]:
    optuna = require_optuna()
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(f"no trial of the study in {out} finished with a finite {metric}")
    best = study.best_trial
    ranked: List[Dict[str, Any]] = sorted(
        ({"trial": t.number, metric: t.value, "params": t.params, "out": t.user_attrs.get("out")} for t in complete),
        key=lambda r: -r[metric])
    summary = {"metric": metric, "best_trial": best.number, "best_value": best.value, "best_params": best.params,
               "best_out": best.user_attrs.get("out"), "trials": ranked,
               "failed": len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)))}
    with open(os.path.join(out, BEST_FILE), "w") as f:
        json.dump(summary, f, indent=2, allow_nan=True)
    return summary


def format_report(summary: Mapping[str, Any], top: int = 10) -> str:
    """The best trials of ``search``'s summary as a table, best first."""
    metric = summary["metric"]
    lines = [f"best trial {summary['best_trial']}: {metric} {summary['best_value']:.4f} in {summary['best_out']}",
             f"{'trial':>5}  {metric:>7}  options"]
    for row in summary["trials"][:top]:
        value = row[metric]
        lines.append(f"{row['trial']:>5}  {value if math.isnan(value) else round(value, 4):>7}  "
                     + ", ".join(f"{k}={_short(v)}" for k, v in row["params"].items()))
    return "\n".join(lines)
