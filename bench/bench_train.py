"""End-to-end DIN training throughput: din_ext.DIN against DeepCTR-Torch's DIN on the same synthetic click log.

    python bench/bench_train.py                    # -> bench/results/train_cpu.md
    python bench/bench_train.py --quick            # smoke run: a few small batches, nothing written
    python bench/bench_train.py --auc-epochs 4     # also: test AUC of row-wise (RowAdam) against dense Adam
    python bench/bench_train.py --profile --threads 1 --batch-size 256 1024   # only: where a step's time goes

Both models get the same data (din-ext's synthetic default, histories cut to the most recent --max-history
behaviours), the same fields and embedding width, local activation unit (80, 40) with Dice, tower (200, 80) with
Dice, Adam (lr 1e-3), batch size and batch order. A step is what a training loop does per batch: get the batch,
forward, loss, backward and optimizer step. din_ext's loop is fit's: ``make_optimizer`` (RowAdam on the embedding
tables, fused Adam on the rest) and batches gathered (a jagged ``Interactions.take``) by a background thread
(``din_ext.data.stream.prefetched``) where ``din_ext.training._batches`` would use one (``prefetches``: when torch's
threads leave a core free), else in the step, so a step includes any wait for its batch or its gathering;
DeepCTR-Torch's gathers rows of its padded input matrix in the step, as its own fit does. Reported:
samples/s of each timed step (after warm-up steps), median and interquartile range, and the step's FLOP floor.

Item vocabulary rows (--item-vocab V): the same data with the item ids spread over a table of V rows (a seeded
injection of the 3,000 items into [1, V)), so only the table size changes; "dense Adam" rows (--dense-adam) step
every parameter with one torch.optim.Adam on dense gradients, O(V) per step.

FLOP floor: the FLOPs of one step, counted from its batch (embedding gathers and their gradient, the attention in
din_ext's layer-1 split of docs/design.md section 1.1 with Dice, pooling, the tower with Dice and the head, each
matmul's backward twice its forward, and Adam's ~12 FLOPs per updated element over the dense parameters and the
table rows the step touched), divided by the machine's measured float32 matmul GFLOP/s (2048^2 torch.mm, per thread
count): no step can run faster at that rate, and the elementwise parts run below it.

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
import dataclasses
from typing import Callable, Dict, Iterator, List, Tuple

import torch

import din_ext
from din_ext.data.core import Interactions, Schema, iterate_batches
from din_ext.data.stream import prefetched
from din_ext.data.synthetic import SyntheticConfig, generate
from din_ext.training import PREFETCH, batch_loss, evaluate, format_metrics, make_optimizer, prefetches, train_step

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, git_commit, machine_description, write_table

ATTENTION, TOWER = (80, 40), (200, 80)
ADAM_FLOPS = 12  # per updated element: two moments, bias corrections, sqrt, divide, update


def import_deepctr():
    """DeepCTR-Torch, a benchmark-only dependency, or None. (Its import starts a PyPI version check in a thread.)"""
    try:
        import deepctr_torch
    except ImportError as exc:
        print(f"DeepCTR-Torch is not installed ({exc}): `pip install deepctr-torch` to compare with it; timing "
              f"din_ext only", flush=True)
        return None
    return deepctr_torch


def build_din(schema: Schema, args, backend: str) -> din_ext.DIN:
    torch.manual_seed(0)
    return din_ext.DIN(schema, embed_dim=args.embed_dim, attention_hidden=ATTENTION, tower_hidden=TOWER,
                       activation="dice", backend=backend)


def din_ext_step(schema: Schema, train: Interactions, args, backend: str, sparse: bool = True):
    """fit's step: make_optimizer (row-wise unless ``sparse`` is False), and batches built ahead by a thread where
    fit's would be (din_ext.training.prefetches)."""
    model = build_din(schema, args, backend)
    optimizer = make_optimizer(model, 1e-3, sparse=sparse)
    model.train()

    def step(batch: Interactions) -> None:
        train_step(model, optimizer, batch)

    step.model, step.optimizer = model, optimizer

    def inputs(batches):  # as fit's _batches: a prefetch thread only where it gets a core of its own
        built = (train.take(index) for index in batches)
        return prefetched(lambda: built, PREFETCH) if prefetches(train) else built

    step.inputs = inputs
    step.parameters = sum(p.numel() for p in model.parameters())
    step.dense_parameters = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embeddings."))
    return step


def spread_items(train: Interactions, schema: Schema, vocab: int, seed: int = 0) -> Tuple[Interactions, Schema]:
    """The same data with item ids mapped into a table of ``vocab`` rows by a seeded injection (row 0 stays 0)."""
    size = schema.item_fields["item"]
    if vocab < size:
        raise SystemExit(f"--item-vocab {vocab} is below the data's {size} item rows")
    rows = torch.cat([torch.zeros(1, dtype=torch.long),
                      torch.randperm(vocab - 1, generator=torch.Generator().manual_seed(seed))[:size - 1] + 1])
    item = {**train.item, "item": rows[train.item["item"]]}
    hist = {**train.hist, "item": rows[train.hist["item"]]}
    spread = dataclasses.replace(train, item=item, hist=hist)
    return spread, dataclasses.replace(schema, item_fields={**schema.item_fields, "item": vocab}, frequencies={},
                                       vocabularies={})


def step_flops(schema: Schema, batch: Interactions, args, dense_parameters: int) -> float:
    """The FLOPs of one training step of din_ext.DIN on ``batch`` (the module docstring's count)."""
    rows, behaviours = len(batch), int(batch.hist_offsets[-1])
    dim = args.embed_dim
    fields = len(schema.user_fields) + len(schema.item_fields)
    interest = dim * len(schema.history_fields)
    h1, h2 = ATTENTION
    dice = 10  # per element, forward: mean, variance, normalize, sigmoid, mix
    # attention, forward: per behaviour Weff_b k (layer 1), layer 2, score, Dice on both, the weighted sum;
    # per row c_b and Weff_b
    per_behaviour = 2 * interest * h1 + 2 * h1 * h2 + 2 * h2 + dice * (h1 + h2) + 2 * interest
    attention = behaviours * per_behaviour + rows * 4 * interest * h1
    widths = (fields * dim + interest + schema.dense_dim, *TOWER, 1)
    tower = rows * sum(2 * a * b for a, b in zip(widths[:-1], widths[1:])) + rows * dice * sum(TOWER)
    gathered = (rows * fields + behaviours * len(schema.history_fields)) * dim  # copied forward, summed backward
    touched = sum(torch.unique(ids).numel() for ids in (*batch.user.values(), *[
        torch.cat([batch.item[f]] + ([batch.hist[f]] if f in batch.hist else [])) for f in schema.item_fields]))
    optimizer = ADAM_FLOPS * (dense_parameters + touched * dim)
    return 3 * (attention + tower) + 2 * gathered + optimizer


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

    step.inputs = iter
    step.parameters = sum(p.numel() for p in model.parameters())
    return step


def measure(step: Callable, batches: List[torch.Tensor], warmup: int) -> Tuple[List[float], List[float]]:
    """(samples/s, process CPU seconds) of each step after the first ``warmup`` ones; a step's time includes getting
    its input from ``step.inputs(batches)`` (a wait for din_ext's prefetch thread, DeepCTR-Torch's row gather)."""
    speeds, cpu = [], []
    inputs: Iterator = step.inputs(batches)
    for i, index in enumerate(batches):
        start, start_cpu = time.perf_counter(), time.process_time()
        step(next(inputs))
        if i >= warmup:
            speeds.append(index.numel() / (time.perf_counter() - start))
            cpu.append(time.process_time() - start_cpu)
    return speeds, cpu


def matmul_rate(threads: int, n: int = 1024) -> Tuple[float, float]:
    """float32 torch.mm GFLOP/s on (n, n) matrices: (by wall time, by process CPU time per thread)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    walls, cpus = [], []
    for _ in range(10):
        start, start_cpu = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        walls.append(time.perf_counter() - start)
        cpus.append((time.process_time() - start_cpu) / threads)
    return 2 * n ** 3 / statistics.median(walls) / 1e9, 2 * n ** 3 / statistics.median(cpus) / 1e9


def auc_comparison(args) -> str:
    """Test AUC / GAUC per epoch of din_ext.DIN trained with make_optimizer's row-wise step and with dense Adam, from
    the same initialization and batches (fit's loop: epoch e shuffled with seed e; synthetic default)."""
    torch.set_num_threads(1)  # the metrics do not depend on it; one thread is the steadiest on a shared machine
    train, test, schema = generate(SyntheticConfig(num_users=args.users), seed=0)
    train, test = train.truncate_history(args.max_history), test.truncate_history(args.max_history)
    results = {}
    for name, sparse in (("RowAdam (tables) + Adam", True), ("dense Adam", False)):
        model = build_din(schema, args, "auto")
        optimizer = make_optimizer(model, 1e-3, sparse=sparse)
        history = []
        for epoch in range(args.auc_epochs):
            model.train()
            start = time.perf_counter()
            for batch in iterate_batches(train, 256, shuffle=True, seed=epoch):
                train_step(model, optimizer, batch)
            speed = len(train) / (time.perf_counter() - start)
            history.append({**evaluate(model, test), "speed": speed})
            print(f"{name}: epoch {epoch + 1} {format_metrics(history[-1])}  {speed:,.0f} samples/s", flush=True)
        results[name] = history
    lines = ["| epoch | " + " | ".join(f"{n} AUC / GAUC" for n in results) + " |",
             "|---:|" + "---:|" * len(results)]
    for e in range(args.auc_epochs):
        lines.append(f"| {e + 1} | " + " | ".join(f"{h[e]['auc']:.4f} / {h[e]['gauc']:.4f}"
                                                 for h in results.values()) + " |")
    speeds = ", ".join(f"{n} {statistics.mean(h['speed'] for h in hist):,.0f}" for n, hist in results.items())
    return (f"\n## Test AUC: row-wise against dense Adam\n\n`python bench/bench_train.py {' '.join(sys.argv[1:])}`: "
            f"din_ext.DIN on the synthetic default ({args.users} users, histories cut to {args.max_history}), "
            f"batch 256, lr 1e-3, the same initialization and batches, {torch.get_num_threads()} torch threads; test "
            f"metrics after each epoch (mean training samples/s: {speeds}).\n\n" + "\n".join(lines) + "\n")


# The phases of a profiled step: (phase, substrings of the names of top-level profiler events), first match wins.
PHASES = (
    ("embedding lookups + MBA, forward", ("din_ext::mba_embedding", "aten::embedding")),
    ("attention, forward", ("din_ext::local_activation_attention",)),
    ("tower MLP + Dice, forward", ("aten::linear", "aten::addmm", "din_ext::dice")),
    ("loss, forward and backward", ("binary_cross_entropy_with_logits", "BinaryCrossEntropyWithLogitsBackward")),
    ("embedding lookups + MBA, backward", ("MbaFunction", "mba_embedding_default")),
    ("attention, backward", ("AttentionFunction", "local_activation_attention_default")),
    ("tower MLP + Dice, backward", ("AddmmBackward", "TBackward", "MmBackward", "din_ext_dice_default")),
    ("optimizer step (RowAdam + Adam)", ("Optimizer.step#",)),
    ("optimizer zero_grad", ("Optimizer.zero_grad#",)),
    ("backward glue (AccumulateGrad, cat/split/view backward)", ("autograd::engine::evaluate_function",)),
)


def profile_step(schema: Schema, train: Interactions, args, batch_size: int, steps: int = 20) -> str:
    """ms per step of each phase of din_ext's step (PHASES; torch.profiler with record_shapes, each top-level event's
    total time, against the step's wall time under the profiler), the rest of the forward's small ops, the time no
    event covers (Python, the profiler's own cost), and the batch collation that the prefetch thread takes off the
    step."""
    from torch.profiler import ProfilerActivity, profile

    step = din_ext_step(schema, train, args, "auto")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))
    batches = [train.take(order[i * batch_size:(i + 1) * batch_size]) for i in range(steps + 5)]
    for batch in batches[:5]:
        step(batch)
    coarse = dict.fromkeys(("forward + loss", "backward", "optimizer (zero_grad + step)"), 0.0)
    for batch in batches[5:]:  # train_step's phases, each timed by process CPU time
        ticks = [time.process_time()]
        loss = batch_loss(step.model, batch)
        ticks.append(time.process_time())
        loss.backward()
        ticks.append(time.process_time())
        step.optimizer.step()
        step.optimizer.zero_grad(set_to_none=True)
        ticks.append(time.process_time())
        for key, t0, t1 in zip(coarse, ticks, ticks[1:]):
            coarse[key] += (t1 - t0) / steps * 1e3
    plain = sum(coarse.values())
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()  # wall time, as the events are timed
        for batch in batches[5:]:
            step(batch)
        profiled = (time.perf_counter() - start) / steps * 1e3
    phases = dict.fromkeys([name for name, _ in PHASES] + ["other forward ops (cats, checks, Dice running stats)"],
                           0.0)
    for event in prof.events():
        if event.cpu_parent is not None:
            continue
        phase = next((name for name, keys in PHASES if any(k in event.name for k in keys)),
                     "other forward ops (cats, checks, Dice running stats)")
        phases[phase] += event.cpu_time_total / 1e3 / steps
    start = time.process_time()
    for i in range(steps):
        train.take(order[i * batch_size:(i + 1) * batch_size])
    take = (time.process_time() - start) / steps * 1e3
    phases["not in any event (Python, the profiler)"] = profiled - sum(phases.values())
    # The events are timed by the wall clock, which a busy machine inflates: shares of the profiled step, scaled to
    # the unprofiled step's CPU time.
    lines = [f"| {name} | {ms:.2f} | {100 * ms / profiled:.0f}% | {plain * ms / profiled:.2f} |"
             for name, ms in phases.items()]
    split = ", ".join(f"{name} {ms:.2f}" for name, ms in coarse.items())
    return (f"\n### Batch {batch_size}, {torch.get_num_threads()} thread(s): {plain:.2f} CPU ms a step ({split}); "
            f"{profiled:.2f} wall ms under the profiler; collating a batch (Interactions.take, on the prefetch "
            f"thread): {take:.2f} CPU ms\n\n| phase | profiled wall ms / step | share | CPU ms / step (share x "
            f"{plain:.2f}) |\n|---|---:|---:|---:|\n" + "\n".join(lines) + "\n")


def vocab_name(vocab: int) -> str:
    return f"{vocab:.0e}".replace("e+0", "e") if vocab >= 10_000 else str(vocab)


def run(args) -> str:
    config = SyntheticConfig(num_users=args.users)
    train, _, schema = generate(config, seed=0)
    train = train.truncate_history(args.max_history)
    mean_len = float(train.hist_lengths.float().mean())
    deepctr_torch = import_deepctr()
    threads = args.threads or [torch.get_num_threads()]
    spread = {v: spread_items(train, schema, v) for v in args.item_vocab}
    header = (f"# DIN end-to-end training throughput (cpu)\n\n"
              f"- machine: {machine_description(torch.device('cpu'))}\n"
              f"- torch {torch.__version__}, din_ext {din_ext.__version__}, DeepCTR-Torch "
              f"{deepctr_torch.__version__ if deepctr_torch else 'not installed'}, Python {platform.python_version()}\n"
              f"- date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, commit {git_commit()}\n"
              f"- command: `python bench/bench_train.py {' '.join(sys.argv[1:])}`\n"
              f"- data: din-ext's synthetic default ({args.users} users, {len(train):,} training impressions, "
              f"{schema.item_fields['item']:,} item rows), histories cut to the most recent {args.max_history} (mean "
              f"length {mean_len:.1f}); fields {list(schema.user_fields) + list(schema.item_fields)}, history fields "
              f"{list(schema.history_fields)}, {schema.dense_dim} dense; rows 'item V=...': the item ids spread over a "
              f"table of V rows\n"
              f"- model: embedding width {args.embed_dim}, attention {ATTENTION} Dice, tower {TOWER} Dice, one logit; "
              f"lr 1e-3 (din_ext: make_optimizer, RowAdam on the tables + fused Adam, unless 'dense Adam'; "
              f"DeepCTR-Torch: Adam); {args.warmup} warm-up steps, then {args.steps} timed steps (the same batches "
              f"for every model)\n")
    load = os.getloadavg()[0]
    header += (f"- load average before the run: {load:.1f} on {os.cpu_count()} cores (the machine is shared; a thread "
               f"count above the idle cores makes every OpenMP barrier wait for a descheduled thread, so compare models "
               f"within a row group)\n\n")
    table = ("| threads | batch | model | median samples/s | IQR samples/s | median step ms | CPU ms / thread "
             "| FLOP floor ms | x floor (wall / CPU) | vs DeepCTR-Torch (wall / CPU) |\n"
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n")
    print(header + table, end="", flush=True)
    lines, notes = [], []
    for thread_count in threads:
        torch.set_num_threads(thread_count)
        gflops, cpu_gflops = matmul_rate(thread_count)
        notes.append(f"- {thread_count} thread(s): float32 matmul (1024^2 torch.mm) {gflops:,.1f} GFLOP/s by wall time, "
                     f"{cpu_gflops:,.1f} by CPU time per thread (the floor's rate: the steadier one on a busy machine)")
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
            optimizers = [("", True)] + ([(", dense Adam", False)] if args.dense_adam else [])
            for suffix, sparse in optimizers:
                if not sparse:
                    subjects[f"din_ext.DIN{suffix}"] = lambda: din_ext_step(schema, train, args, "auto", False)
                for vocab, (data, vocab_schema) in spread.items():
                    subjects[f"din_ext.DIN, item V={vocab_name(vocab)}{suffix}"] = (
                        lambda d=data, s=vocab_schema, sp=sparse: din_ext_step(s, d, args, "auto", sp))
            if deepctr_torch is not None:
                subjects["DeepCTR-Torch DIN"] = lambda: deepctr_step(schema, train, args)
            rows = []
            for name, build in subjects.items():
                step = build()
                speeds, cpu = measure(step, batches, args.warmup)
                med = statistics.median(speeds)
                q = statistics.quantiles(speeds, n=4, method="inclusive") if len(speeds) > 1 else [med] * 3
                cpu_ms = statistics.median(cpu) / thread_count * 1e3
                floor = None
                if hasattr(step, "dense_parameters"):
                    flops = statistics.mean(step_flops(schema, train.take(index), args, step.dense_parameters)
                                            for index in batches[args.warmup:])
                    floor = flops / (cpu_gflops * 1e9) * 1e3
                rows.append((name, med, q, batch_size / med * 1e3, cpu_ms, floor))
                print(f"| {thread_count} | {batch_size} | {name} | {med:,.0f} | {q[0]:,.0f} - {q[2]:,.0f} | "
                      f"{batch_size / med * 1e3:.2f} | {cpu_ms:.2f} | {'-' if floor is None else f'{floor:.2f}'} | | |",
                      flush=True)
            reference = {r[0]: r[3:5] for r in rows}.get("DeepCTR-Torch DIN")
            lines += [f"| {thread_count} | {batch_size} | {name} | {med:,.0f} | {q[0]:,.0f} - {q[2]:,.0f} | "
                      f"{ms:.2f} | {cpu_ms:.2f} | {'-' if floor is None else f'{floor:.2f}'} | "
                      f"{'-' if floor is None else f'{ms / floor:.1f}x / {cpu_ms / floor:.1f}x'} | "
                      f"{f'{reference[0] / ms:.2f}x / {reference[1] / cpu_ms:.2f}x' if reference else '-'} |"
                      for name, med, q, ms, cpu_ms, floor in rows]
            step_ms = {r[0]: r[3:5] for r in rows}
            vocabs = [f"din_ext.DIN, item V={vocab_name(v)}" for v in args.item_vocab]
            if len(vocabs) > 1:
                big, small = step_ms[vocabs[-1]], step_ms[vocabs[0]]
                notes.append(f"- {thread_count} thread(s), batch {batch_size}: step at V={vocab_name(max(spread))} / "
                             f"at V={vocab_name(min(spread))}: {big[0] / small[0]:.2f} (wall), "
                             f"{big[1] / small[1]:.2f} (CPU)")
    return header + table + "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


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
    parser.add_argument("--item-vocab", type=int, nargs="*", default=[10_000, 1_000_000],
                        help="item table sizes to add rows for (the items spread over the table)")
    parser.add_argument("--dense-adam", action="store_true", help="add rows stepped by dense Adam (O(V) a step)")
    parser.add_argument("--auc-epochs", type=int, default=0,
                        help="also train row-wise and dense Adam this many epochs and report their test AUC")
    parser.add_argument("--profile", action="store_true",
                        help="only profile din_ext's step (phases, CPU ms) at each --threads and --batch-size")
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 users, 3 steps, nothing written")
    parser.add_argument("--out", help="markdown output (default bench/results/train_cpu.md; none with --quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.users, args.warmup, args.steps, args.batch_size = 300, 1, 2, [64]
    if args.profile:
        train, _, schema = generate(SyntheticConfig(num_users=args.users), seed=0)
        train = train.truncate_history(args.max_history)
        text = f"## Where a step's time goes\n\n`python bench/bench_train.py {' '.join(sys.argv[1:])}`\n"
        for thread_count in args.threads or [torch.get_num_threads()]:
            torch.set_num_threads(thread_count)
            for batch_size in args.batch_size:
                text += profile_step(schema, train, args, batch_size)
        print(text)
        write_table(text, args.out)
        return
    text = run(args)
    if args.auc_epochs:
        text += auc_comparison(args)
    write_table(text, args.out or (None if args.quick else os.path.join(ROOT, "bench", "results", "train_cpu.md")))


if __name__ == "__main__":
    main()
