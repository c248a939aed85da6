"""Ranking benchmark (issue 14): score C candidates for each of B users against one history of L behaviours.

Workload: C in {1, 10, 100, 500}, B in {1, 16}, L in {50, 500}, D = 48, H = (80, 40), Dice, eval, float32, CPU.
Contenders, per request (one call scoring B x C candidates):
  (a) the eager reference on the history tiled C times (B * C single-candidate rows);
  (b) din_ext's single-candidate op on the tiled history;
  (c) din_ext's multi-candidate op (query [B, C, D], the history read once per user);
  (d) DIN.rank on [B, C] candidates, against DIN's forward on the same candidates as B * C tiled rows.
p50 and p99 latency at 1 and 2 threads, and the FLOP floor: valid pairs x FLOPs per pair / measured matmul GFLOP/s
at the same thread count (FLOPs per pair 2 (D H1 + H1 H2 + H2): layer 1 in its split form, design §1.1).

    PYTHONPATH=. python bench/bench_rank.py --out bench/results/rank_cpu.md

A/B of (c) against another checkout's build (e.g. main's), interleaved: each round runs one subprocess per build
(this checkout's din_ext, then ROOT's, the order alternating), each timing --reps calls of (c) at one thread:

    PYTHONPATH=. python bench/bench_rank.py --compare /work/main --shapes 1,100,50 --rounds 12 --reps 300
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import json
import statistics
import subprocess
import sys
import time

import torch

import din_ext
from common import git_commit, machine_description, matmul_gflops, write_table
from din_ext.data.core import Interactions, Schema
from din_ext.model import DIN

D, HIDDEN = 48, (80, 40)
FLOPS_PER_PAIR = 2 * (D * HIDDEN[0] + HIDDEN[0] * HIDDEN[1] + HIDDEN[1])
REFERENCE_MAX_PAIRS = 300_000  # (a) materializes [pairs, 4D] and more: skipped beyond
TILED_MAX_PAIRS = 1_000_000    # (b) and the tiled model forward copy the history C times: skipped beyond
RANK_SHAPE = (1, 100, 50)  # B, C, L of the targets: DIN.rank is broken down step by step there
SCHEMA = Schema(user_fields={"gender": 3, "age": 8}, item_fields={"item": 5001, "category": 101, "brand": 401},
                history_fields=("item", "category", "brand"))


def percentile(times, q):
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def make_inputs(batch, count, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, count, D, generator=g)
    keys = torch.randn(batch, length, D, generator=g)
    lengths = torch.full((batch,), length, dtype=torch.long)
    return query, keys, lengths


def make_unit():
    torch.manual_seed(0)
    unit = din_ext.LocalActivationUnit(D, HIDDEN, activation="dice").eval()
    with torch.no_grad():
        for act in unit.activations:
            act.alpha.uniform_(-0.5, 0.5)
            act.running_mean.uniform_(-0.3, 0.3)
            act.running_var.uniform_(0.5, 2.0)
    return unit


def unit_params(unit):
    """The weights, biases and activation parameters of a LocalActivationUnit, as the op takes them."""
    return ([lin.weight for lin in unit.linears] + [unit.out.weight],
            [lin.bias for lin in unit.linears] + [unit.out.bias], unit.act_params())


def user_batch(batch, count, length, seed=0):
    """B users with histories of L behaviours and [B, C] candidates, and the same as B * C tiled rows."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda size, shape: torch.randint(1, size, shape, generator=g)  # noqa: E731
    offsets = torch.arange(batch + 1, dtype=torch.long) * length
    users = Interactions(user_id=torch.arange(batch), user={f: ids(s, (batch,)) for f, s in SCHEMA.user_fields.items()},
                         item={f: ids(s, (batch, count)) for f, s in SCHEMA.item_fields.items()},
                         hist_offsets=offsets,
                         hist={f: ids(s, (batch * length,)) for f, s in SCHEMA.item_fields.items()},
                         labels={"click": torch.zeros(batch)})
    tiled = users.take(torch.arange(batch).repeat_interleave(count))
    tiled = Interactions(tiled.user_id, tiled.user, {f: v.reshape(-1) for f, v in users.item.items()},
                         tiled.hist_offsets, tiled.hist, {"click": torch.zeros(batch * count)})
    return users, tiled


def interleaved_times(fns, min_reps, min_seconds, max_rounds=200):
    """{name: (wall ms, cpu ms)} of repeated calls of every fn in fns, interleaved: each round calls each once, in
    an order shuffled per round, so that all see the same load on a shared machine (a contender timed after another
    would see another minute's load) and none always follows the same one (which sets what is left in the caches).
    Two warm-up rounds, then rounds until min_reps and until the contenders have had min_seconds each (at most
    max_rounds). cpu: process CPU time of the call, all threads together."""
    for _ in range(2):
        for fn in fns.values():
            fn()
    times = {name: ([], []) for name in fns}
    order, shuffle = list(fns.items()), random.Random(0).shuffle
    start = time.perf_counter()
    rounds = 0
    while rounds < min_reps or (time.perf_counter() - start < min_seconds * len(fns) and rounds < max_rounds):
        shuffle(order)
        for name, fn in order:
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name][0].append((time.perf_counter() - t0) * 1e3)
            times[name][1].append((time.process_time() - c0) * 1e3)
        rounds += 1
    return times


def bench_shape(unit, model, batch, count, length, threads, floor_gflops, min_reps, min_seconds):
    query, keys, lengths = make_inputs(batch, count, length)
    pairs = batch * count * length
    weights, biases, params = unit_params(unit)
    flat_query = query.reshape(batch * count, D)
    tiled_keys = keys.repeat_interleave(count, dim=0) if pairs <= TILED_MAX_PAIRS else None
    tiled_lengths = lengths.repeat_interleave(count)
    fns = {}
    if pairs <= REFERENCE_MAX_PAIRS:
        fns["a"] = lambda: din_ext.reference.local_activation_attention(
            flat_query, tiled_keys, weights, biases, params, lengths=tiled_lengths, activation="dice")
    if tiled_keys is not None:
        fns["b"] = lambda: din_ext.ops.local_activation_attention(
            flat_query, tiled_keys, weights, biases, params, lengths=tiled_lengths, activation="dice",
            backend="cpu")
    fns["c"] = lambda: din_ext.ops.local_activation_attention(
        query, keys, weights, biases, params, lengths=lengths, activation="dice", backend="cpu")
    users, tiled = user_batch(batch, count, length)
    fns["d"] = lambda: model.rank(users)
    if pairs <= TILED_MAX_PAIRS:
        fns["d_tiled"] = lambda: model(tiled)
    with torch.no_grad():
        times = interleaved_times(fns, min_reps, min_seconds)
    row = {name: (statistics.median(wall), percentile(wall, 99)) for name, (wall, _) in times.items()}
    row.update({f"{name}_cpu": statistics.median(times[name][1]) / threads for name in ("b", "c") if name in times})
    row["floor"] = pairs * FLOPS_PER_PAIR / (floor_gflops * 1e9) * 1e3
    return row


def rank_breakdown(model, batch, count, length, min_reps, min_seconds):
    """The steps of DIN.rank on B users x C candidates, each timed alone (p50 ms): [(step, ms)]. The attention and
    the tower run on inputs prepared once, as DIN.forward makes them."""
    users, tiled = user_batch(batch, count, length)
    schema = model.schema
    history = [f for f in schema.item_fields if f in schema.history_fields]

    def lookups():
        looked = {f: model.embeddings[f](users.item[f], *([users.hist[f]] if f in history else []), checked=True)
                  for f in schema.item_fields}
        profile = [model.embeddings[f](users.user[f], checked=True) for f in schema.user_fields]
        query = torch.cat([looked[f][0] for f in history], dim=-1)
        keys = torch.cat([looked[f][1] for f in history], dim=-1)
        return profile, [looked[f][0] for f in schema.item_fields], query, keys

    profile, items, query, keys = lookups()
    profile = [p[0] if isinstance(p, tuple) else p for p in profile]
    attention = model.attention
    offsets = users.hist_offsets
    weights, biases, params = unit_params(attention)
    eps = attention.activations[0].eps
    interest = attention(query, keys, offsets=offsets)
    x = torch.cat([u[:, None].expand(batch, count, u.shape[-1]) for u in profile] + items + [interest], dim=-1)
    x = x.reshape(batch * count, x.shape[-1])

    def tower():
        h = x
        for linear, activation in zip(model.tower, model.tower_activations):
            h = activation(linear(h))
        return model.heads(h)

    steps = [
        ("DIN.rank, the whole call", lambda: model.rank(users)),
        ("DIN forward on [B, C] candidates", lambda: model(users)),
        ("DIN forward on the B x C tiled rows", lambda: model(tiled)),
        ("check_batch (validation)", lambda: model.check_batch(users)),
        ("check_batch of the tiled rows", lambda: model.check_batch(tiled)),
        ("embedding lookups and concatenation", lookups),
        ("attention layer (LocalActivationUnit, jagged keys)", lambda: attention(query, keys, offsets=offsets)),
        ("attention op alone (torch.ops.din_ext, no validation)", lambda: torch.ops.din_ext.local_activation_attention(
            query, keys, None, offsets[:-1], offsets.diff(), length, weights, biases, params, attention.activation,
            attention.normalization, attention.score_scale, False, eps)),
        ("tower MLP and heads on B x C rows", tower),
    ]
    with torch.no_grad():
        times = interleaved_times(dict(steps), min_reps, min_seconds)
    return [(name, statistics.median(times[name][0])) for name, _ in steps]


def time_multi(batch, count, length, reps):
    """Median wall and CPU ms of reps calls of (c) at one thread, after 20 warm-up calls."""
    torch.set_num_threads(1)
    unit = make_unit()
    query, keys, lengths = make_inputs(batch, count, length)
    weights, biases, params = unit_params(unit)
    wall, cpu = [], []
    with torch.no_grad():
        for i in range(20 + reps):
            t0, c0 = time.perf_counter(), time.process_time()
            din_ext.ops.local_activation_attention(query, keys, weights, biases, params, lengths=lengths,
                                                   activation="dice", backend="cpu")
            if i >= 20:
                wall.append((time.perf_counter() - t0) * 1e3)
                cpu.append((time.process_time() - c0) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def compare(root, shapes, rounds, reps):
    """Markdown rows: per shape, the medians (min, max) over rounds of each build's median ms of (c), and the
    ratio this checkout / root."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    roots = {"this": here, "other": os.path.abspath(root)}
    lines = [f"| B, C, L | rounds x reps | {roots['other']} | this checkout | this / other |", "|---|---|---|---|---|"]
    for batch, count, length in shapes:
        medians = {name: [] for name in roots}
        for i in range(rounds):
            for name in (list(roots) if i % 2 == 0 else list(roots)[::-1]):
                env = dict(os.environ, PYTHONPATH=roots[name], OMP_NUM_THREADS="1")
                done = subprocess.run([sys.executable, os.path.abspath(__file__), "--time-multi",
                                       f"{batch},{count},{length},{reps}"], env=env, capture_output=True,
                                      text=True, check=True)
                medians[name].append(json.loads(done.stdout.strip().splitlines()[-1])[0])
        cell = lambda v: f"{statistics.median(v):.3f} ({min(v):.3f}, {max(v):.3f})"  # noqa: E731
        ratio = statistics.median(medians["this"]) / statistics.median(medians["other"])
        lines.append(f"| {batch}, {count}, {length} | {rounds} x {reps} | {cell(medians['other'])} | "
                     f"{cell(medians['this'])} | {ratio:.2f} |")
        print(lines[-1], flush=True)
    return lines


def fmt(cell):
    return "skipped" if cell is None else f"{cell[0]:.3f} / {cell[1]:.3f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results table here (markdown)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--min-reps", type=int, default=7)
    parser.add_argument("--min-seconds", type=float, default=0.25)
    parser.add_argument("--quick", action="store_true", help="C in {1, 100}, B = 1, L = 50 only")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="B,C,L",
                        help="only these shapes (e.g. --shapes 1,100,50 16,10,500); DIN.rank's step-by-step "
                             f"breakdown runs only when {','.join(map(str, RANK_SHAPE))} is among them")
    parser.add_argument("--compare", default=None, metavar="ROOT",
                        help="A/B (c) against the din_ext under ROOT (a checkout with its build), interleaved")
    parser.add_argument("--rounds", type=int, default=10, help="--compare: rounds (one run of each build a round)")
    parser.add_argument("--reps", type=int, default=300, help="--compare: timed calls a run")
    parser.add_argument("--time-multi", default=None, help=argparse.SUPPRESS)  # --compare's worker: B,C,L,reps
    args = parser.parse_args(argv)
    if not din_ext._ext.has_cpp():
        sys.exit("bench_rank needs the C++ extension (din_ext._C)")
    if args.time_multi:
        print(json.dumps(time_multi(*(int(x) for x in args.time_multi.split(",")))))
        return
    shapes = [(b, c, n) for n in (50, 500) for b in (1, 16) for c in (1, 10, 100, 500)]
    if args.quick:
        shapes = [(1, 1, 50), (1, 100, 50)]
    if args.shapes:
        shapes = [tuple(int(x) for x in shape.split(",")) for shape in args.shapes]
        if any(len(shape) != 3 for shape in shapes):
            parser.error("--shapes takes B,C,L triples")
    if args.compare:
        lines = compare(args.compare, shapes, args.rounds, args.reps)
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
        return
    unit = make_unit()
    torch.manual_seed(0)
    model = DIN(SCHEMA, embed_dim=16, attention_hidden=HIDDEN, tower_hidden=(200, 80), activation="dice",
                backend="cpu").eval()
    load = os.getloadavg()
    lines = [
        "# Ranking: C candidates per user against one history (bench/bench_rank.py)",
        "",
        f"- machine: {machine_description(torch.device('cpu'))}; load average at start {load[0]:.2f} / {load[1]:.2f} / "
        f"{load[2]:.2f} (1/5/15 min; the machine is shared, timings are noisy)",
        f"- torch {torch.__version__}, commit {git_commit()}, {datetime.date.today().isoformat()}",
        f"- D = {D}, H = {HIDDEN}, Dice, eval, float32; every history has L behaviours; FLOPs per pair "
        f"{FLOPS_PER_PAIR} (layer 1 split, design §1.1)",
        "- cells: p50 / p99 ms per request (one call scoring B x C candidates); (a) eager reference on the tiled "
        "history, (b) din_ext single-candidate op on the tiled history, (c) din_ext multi-candidate op, "
        "(d) DIN.rank on [B, C] candidates, (d') DIN forward on the B x C tiled rows; floor = pairs x FLOPs per pair "
        "/ matmul GFLOP/s at the thread count; (c) cpu/thread: p50 of its process CPU time / threads (ms; well "
        "below the wall time: the process waited for a core); (b)/(c) cpu: the same ratio of (b)'s and (c)'s (less "
        "sensitive to the load, but it counts threads spinning at a barrier); contenders are timed interleaved, "
        "round by round",
        f"- skipped: (a) beyond {REFERENCE_MAX_PAIRS} pairs, (b) and (d') beyond {TILED_MAX_PAIRS} pairs "
        "(the tiled history alone is pairs x D floats)",
        "",
    ]
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        gflops = matmul_gflops(torch.device("cpu"))
        lines += [f"## {threads} thread{'s' if threads > 1 else ''} (matmul {gflops:.1f} GFLOP/s)", "",
                  "| B | C | L | pairs | (a) ref tiled | (b) op tiled | (c) multi op | (c) cpu/thread | floor "
                  "| (c)/floor | (a)/(c) | (b)/(c) | (b)/(c) cpu | (d) rank | (d') forward tiled | (d')/(d) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for batch, count, length in shapes:
            row = bench_shape(unit, model, batch, count, length, threads, gflops, args.min_reps, args.min_seconds)
            c = row["c"][0]
            ratio = lambda key: f"{row[key][0] / c:.2f}" if key in row else "-"  # noqa: E731
            cpu_ratio = f"{row['b_cpu'] / row['c_cpu']:.2f}" if "b_cpu" in row else "-"
            d_ratio = f"{row['d_tiled'][0] / row['d'][0]:.2f}" if "d_tiled" in row else "-"
            lines.append(f"| {batch} | {count} | {length} | {batch * count * length} | {fmt(row.get('a'))} | "
                         f"{fmt(row.get('b'))} | {fmt(row['c'])} | {row['c_cpu']:.3f} | {row['floor']:.3f} | "
                         f"{c / row['floor']:.2f} | "
                         f"{ratio('a')} | {ratio('b')} | {cpu_ratio} | {fmt(row['d'])} | {fmt(row.get('d_tiled'))} | "
                         f"{d_ratio} |")
            print(lines[-1], flush=True)
        lines.append("")
        if RANK_SHAPE not in shapes:
            continue
        breakdown = rank_breakdown(model, *RANK_SHAPE, args.min_reps, args.min_seconds)
        title = f"DIN.rank step by step at B, C, L = {RANK_SHAPE}, {threads} thread{'s' if threads > 1 else ''}"
        lines += [f"{title} (each step alone, interleaved):", "", "| step | p50 ms |", "|---|---|"]
        lines += [f"| {name} | {ms:.3f} |" for name, ms in breakdown]
        lines.append("")
        print("\n".join(lines[-len(breakdown) - 1:]), flush=True)
    write_table("\n".join(lines) + "\n", args.out)
    if not args.out:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
