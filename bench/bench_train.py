"""End-to-end DIN training throughput: din_ext.DIN against DeepCTR-Torch's DIN on the same synthetic click log.

    python bench/bench_train.py                    # -> bench/results/train_cpu.md
    python bench/bench_train.py --quick            # smoke run: a few small batches, nothing written

Both models get the same data (din-ext's synthetic default, histories cut to the most recent --max-history
behaviours), the same fields and embedding width, local activation unit (80, 40) with Dice, tower (200, 80) with
Dice, Adam (lr 1e-3), batch size and batch order. A step is what a training loop does per batch: gather the batch
from the training set (din_ext: a jagged ``Interactions.take``; DeepCTR-Torch: rows of its padded input matrix),
forward, loss, backward and optimizer step. Reported: samples/s of each timed step (after warm-up steps), median
and interquartile range.

DeepCTR-Torch (``pip install deepctr-torch``) is a benchmark-only dependency; without it only din_ext is timed.
Its DIN builds the tower's Dice for 3-D inputs, which fails on the tower's 2-D input, so the tower's activations
are replaced by DeepCTR-Torch's own Dice for 2-D inputs; its embedding L2 term is off (l2_reg_embedding=0) as
din_ext has none here. DeepCTR-Torch's input format pads every history to --max-history.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

import din_ext
from din_ext.data.core import Interactions, Schema
from din_ext.data.synthetic import SyntheticConfig, generate
from din_ext.training import make_optimizer, train_step

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, git_commit, machine_description, write_table



def import_deepctr():
    """DeepCTR-Torch, a benchmark-only dependency, or None. (Its import starts a PyPI version check in a thread.)"""
    try:
        import deepctr_torch
    except ImportError as exc:
        print(f"DeepCTR-Torch is not installed ({exc}): `pip install deepctr-torch` to compare with it; timing "
              f"din_ext only", flush=True)
        return None
    return deepctr_torch


def din_ext_step(schema: Schema, train: Interactions, args, backend: str) -> Callable[[torch.Tensor], None]:
    torch.manual_seed(0)
    model = din_ext.DIN(schema, embed_dim=args.embed_dim, attention_hidden=(80, 40), tower_hidden=(200, 80),
                        activation="dice", backend=backend)
    optimizer = make_optimizer(model, 1e-3)
    model.train()

    def step(index: torch.Tensor) -> None:
        train_step(model, optimizer, train.take(index))

    step.parameters = sum(p.numel() for p in model.parameters())
    return step


def deepctr_inputs(schema: Schema, train: Interactions, args):
    """DeepCTR-Torch's DIN and its input matrix: sparse ids, padded histories, history length and dense columns."""
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat
    from deepctr_torch.layers.activation import Dice as DeepCTRDice
    from deepctr_torch.models import DIN as DeepCTRDIN

    dim, max_len = args.embed_dim, args.max_history
    columns = [SparseFeat(f, n, embedding_dim=dim) for f, n in {**schema.user_fields, **schema.item_fields}.items()]
    columns += [DenseFeat(f"dense{i}", 1) for i in range(schema.dense_dim)]
    columns += [VarLenSparseFeat(SparseFeat(f"hist_{f}", schema.item_fields[f], embedding_dim=dim, embedding_name=f),
                                 maxlen=max_len, length_name="seq_length") for f in schema.history_fields]
    torch.manual_seed(0)
    model = DeepCTRDIN(columns, list(schema.history_fields), dnn_hidden_units=(200, 80), dnn_activation="dice",
                       att_hidden_size=(80, 40), att_activation="Dice", l2_reg_embedding=0.0, device="cpu")
    model.dnn.activation_layers = torch.nn.ModuleList(DeepCTRDice(h, dim=2) for h in (200, 80))

    rows = len(train)
    lengths = train.hist_lengths
    position = torch.arange(int(train.hist_offsets[-1])) - torch.repeat_interleave(train.hist_offsets[:-1], lengths)
    owner = torch.repeat_interleave(torch.arange(rows), lengths)
    x = torch.zeros(rows, max(span[1] for span in model.feature_index.values()))
    for name, (start, _end) in model.feature_index.items():
        if name in schema.user_fields:
            x[:, start] = train.user[name].float()
        elif name in schema.item_fields:
            x[:, start] = train.item[name].float()
        elif name.startswith("dense"):
            x[:, start] = train.dense[:, int(name[5:])]
        elif name == "seq_length":
            x[:, start] = lengths.float()
        else:  # hist_<field>: left-aligned, zero-padded to max_len
            x[owner, start + position] = train.hist[name[5:]].float()
    return model, x, train.labels["click"]


def deepctr_step(schema: Schema, train: Interactions, args) -> Callable[[torch.Tensor], None]:
    model, x_all, y_all = deepctr_inputs(schema, train, args)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    def step(index: torch.Tensor) -> None:
        x, y = x_all[index], y_all[index]
        y_pred = model(x).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy(y_pred, y) + model.get_regularization_loss() + model.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step.parameters = sum(p.numel() for p in model.parameters())
    return step


def measure(step: Callable[[torch.Tensor], None], batches: List[torch.Tensor], warmup: int) -> List[float]:
    """samples/s of each step after the first ``warmup`` ones."""
    speeds = []
    for i, index in enumerate(batches):
        start = time.perf_counter()
        step(index)
        if i >= warmup:
            speeds.append(index.numel() / (time.perf_counter() - start))
    return speeds


def run(args) -> str:
    config = SyntheticConfig(num_users=args.users)
    train, _, schema = generate(config, seed=0)
    train = train.truncate_history(args.max_history)
    mean_len = float(train.hist_lengths.float().mean())
    deepctr_torch = import_deepctr()
    threads = args.threads or [torch.get_num_threads()]
    header = (f"# DIN end-to-end training throughput (cpu)\n\n"
              f"- machine: {machine_description(torch.device('cpu'))}\n"
              f"- torch {torch.__version__}, din_ext {din_ext.__version__}, DeepCTR-Torch "
              f"{deepctr_torch.__version__ if deepctr_torch else 'not installed'}, Python {platform.python_version()}\n"
              f"- date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, commit {git_commit()}\n"
              f"- command: `python bench/bench_train.py {' '.join(sys.argv[1:])}`\n"
              f"- data: din-ext's synthetic default ({args.users} users, {len(train):,} training impressions), "
              f"histories cut to the most recent {args.max_history} (mean length {mean_len:.1f}); fields "
              f"{list(schema.user_fields) + list(schema.item_fields)}, history fields {list(schema.history_fields)}, "
              f"{schema.dense_dim} dense\n"
              f"- model: embedding width {args.embed_dim}, attention (80, 40) Dice, tower (200, 80) Dice, one "
              f"logit; Adam lr 1e-3; {args.warmup} warm-up steps, then {args.steps} timed steps (the same batches "
              f"for every model)\n\n")
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1) - 0.5:
        header += (f"The machine was busy with other jobs (load {load:.1f} on {os.cpu_count()} cores): a thread count "
                   f"above the idle cores makes every OpenMP barrier wait for a descheduled thread, so rows with more "
                   f"threads than idle cores measure the contention more than the code; compare models within a "
                   f"row group.\n\n")
    table = ("| threads | batch | model | parameters | median samples/s | IQR samples/s | mean samples/s "
             "| vs DeepCTR-Torch |\n|---:|---:|---|---:|---:|---:|---:|---:|\n")
    print(header + table, end="", flush=True)
    lines = []
    for thread_count in threads:
        torch.set_num_threads(thread_count)
        for batch_size in args.batch_size:
            g = torch.Generator().manual_seed(1)
            order = torch.randperm(len(train), generator=g)
            count = args.warmup + args.steps
            batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(count)]
            if batches[-1].numel() < batch_size:
                raise SystemExit(f"not enough training rows for {count} batches of {batch_size}; lower --steps")
            subjects: Dict[str, Callable[[], Callable]] = {
                f"din_ext.DIN (backend {b})": (lambda b=b: din_ext_step(schema, train, args, b))
                for b in args.backends}
            if deepctr_torch is not None:
                subjects["DeepCTR-Torch DIN"] = lambda: deepctr_step(schema, train, args)
            rows = []
            for name, build in subjects.items():
                step = build()
                speeds = measure(step, batches, args.warmup)
                med = statistics.median(speeds)
                q = statistics.quantiles(speeds, n=4, method="inclusive") if len(speeds) > 1 else [med] * 3
                mean = len(speeds) / sum(1 / s for s in speeds)  # total samples / total time
                rows.append((name, step.parameters, med, q, mean))
                print(f"| {thread_count} | {batch_size} | {name} | {step.parameters:,} | {med:,.0f} | "
                      f"{q[0]:,.0f} - {q[2]:,.0f} | {mean:,.0f} | |", flush=True)
            reference = dict((r[0], r[2]) for r in rows).get("DeepCTR-Torch DIN")
            lines += [f"| {thread_count} | {batch_size} | {name} | {params:,} | {med:,.0f} | {q[0]:,.0f} - "
                      f"{q[2]:,.0f} | {mean:,.0f} | {f'{med / reference:.2f}x' if reference else '-'} |"
                      for name, params, med, q, mean in rows]
    return header + table + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[256], help="one table row group each")
    parser.add_argument("--embed-dim", type=int, default=16)
    parser.add_argument("--max-history", type=int, default=50)
    parser.add_argument("--users", type=int, default=4000, help="synthetic users (the CLI's default: 4000)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, nargs="+", help="torch CPU thread counts to run (default: torch's)")
    parser.add_argument("--backends", nargs="+", default=["auto"], help="din_ext backends to time (auto)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 users, 3 steps, nothing written")
    parser.add_argument("--out", help="markdown output (default bench/results/train_cpu.md; none with --quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.users, args.warmup, args.steps, args.batch_size = 300, 1, 2, [64]
    text = run(args)
    write_table(text, args.out or (None if args.quick else os.path.join(ROOT, "bench", "results", "train_cpu.md")))


if __name__ == "__main__":
    main()
