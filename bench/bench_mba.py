"""Benchmark of MBA regularization (DIN paper section 5.1): one training step of an embedding table as it grows.

A step is forward (lookup of a fixed batch of ids [4096, 50]), a fixed linear loss, backward and an SGD step on the
table. Variants, side by side on the same ids:
  mba-cpu        din_ext.MBAEmbedding(sparse=True, backend="cpu"): regularization of the step's distinct ids only.
  mba-reference  the same module on the pure-PyTorch reference backend (dense O(V D) work per step).
  full-l2        full-table L2 as FuxiCTR does it (BaseModel.regularization_loss: lambda / p * ||W||_p^p, p = 2,
                 added to the loss; DeepCTR-Torch's get_regularization_loss adds sum(l2 * W^2), the same up to a
                 factor 2): a dense nn.Embedding, dense gradient, SGD step over the whole table.
  sparse-floor   nn.Embedding(sparse=True) without any regularization: the cost floor of a sparse step.

    python bench/bench_mba.py                                  # V = 1e4 .. 1e7, D = 32, float32
    python bench/bench_mba.py --rows 10000 100000 --out bench/results/mba_cpu.md

Times: median, interquartile range and min of single steps (perf_counter; at least --repeats steps and --seconds),
after one warm-up step, the variants' steps interleaved; a full-table step at V = 1e7 takes seconds, too long for
torch.utils.benchmark's blocks. "same" ids are drawn once in [0, 1e4) (Zipf-like), so every table size sees identical
ids; --ids spread maps them to id * 7919 mod V, spread over the table (a cache miss per distinct row). Timings are
reported, never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch

import din_ext
from common import git_commit, machine_description

VARIANTS = ("mba-cpu", "mba-reference", "full-l2", "sparse-floor")


def make_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """[batch, length] ids in [0, 1e4), Zipf-like (a few hot ids, a long tail), as behaviour logs are."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(batch, length, generator=g, dtype=torch.float64)
    return (10_000 ** u - 1).long().clamp_max(9_999)


def build(variant: str, num_rows: int, dim: int, reg_lambda: float, frequencies: torch.Tensor):
    """(step function, objects to keep alive) of one variant."""
    if variant.startswith("mba"):
        emb = din_ext.MBAEmbedding(num_rows, dim, frequencies, reg_lambda, sparse=True,
                                   backend="cpu" if variant == "mba-cpu" else "reference")
        return emb, torch.optim.SGD(emb.parameters(), lr=0.01), None
    emb = torch.nn.Embedding(num_rows, dim, sparse=variant == "sparse-floor")
    reg = (lambda: (reg_lambda / 2) * torch.norm(emb.weight, 2) ** 2) if variant == "full-l2" else None
    return emb, torch.optim.SGD(emb.parameters(), lr=0.01), reg


def measure_all(cases, grad, args) -> dict:
    """Timing per case {(variant, V): (ids, frequencies)}. The cases' steps are interleaved round by round, so that
    a change in the load of a shared machine hits them all alike."""
    steps = {}
    for (variant, num_rows), (ids, frequencies) in cases.items():
        emb, opt, reg = build(variant, num_rows, args.dim, args.reg_lambda, frequencies)

        def step(emb=emb, opt=opt, reg=reg, ids=ids):
            opt.zero_grad(set_to_none=True)
            loss = (emb(ids) * grad).sum()
            if reg is not None:
                loss = loss + reg()
            loss.backward()
            opt.step()

        step()  # warm-up (first-touch of the gradient buffers)
        steps[variant, num_rows] = step
    times = {c: [] for c in cases}
    spent = {c: 0.0 for c in cases}
    while any(len(t) < args.repeats or spent[v] < args.seconds for v, t in times.items()):
        for variant, step in steps.items():
            # The slow variants stop at --repeats steps; the fast ones also fill --seconds.
            if len(times[variant]) >= args.repeats and spent[variant] >= args.seconds:
                continue
            start = time.perf_counter()
            step()
            times[variant].append(time.perf_counter() - start)
            spent[variant] += times[variant][-1]
    del steps
    gc.collect()
    return {v: Timing(t) for v, t in times.items()}


@dataclass
class Timing:
    times: list

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def iqr(self) -> float:
        q = statistics.quantiles(self.times, n=4)
        return q[2] - q[0]


def case_inputs(base_ids: torch.Tensor, num_rows: int, mode: str):
    """(ids, frequencies) of a table of num_rows rows: frequencies as if counted over a 100-step epoch."""
    counts = din_ext.count_frequencies(base_ids, 10_000) * 100
    if mode == "same":
        return base_ids, torch.cat([counts, torch.zeros(num_rows - 10_000, dtype=torch.long)])
    spread = torch.arange(10_000) * 7919 % num_rows
    return base_ids * 7919 % num_rows, torch.zeros(num_rows, dtype=torch.long).index_put_((spread,), counts,
                                                                                            accumulate=True)


def header(args) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        "# MBA regularization benchmark (cpu)", "",
        f"- machine: {machine_description(torch.device('cpu'))}",
        f"- torch {torch.__version__}, din_ext {din_ext.__version__}, Python {platform.python_version()}, float32",
        f"- date {now}, commit {git_commit()}",
        f"- command: `python bench/bench_mba.py {' '.join(sys.argv[1:])}`",
        f"- step: ids [{args.batch}, {args.length}], D = {args.dim}, lambda = {args.reg_lambda}, forward + fixed "
        "linear loss + backward + SGD step", ""])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10**4, 10**5, 10**6, 10**7])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--reg-lambda", type=float, default=1e-3)
    parser.add_argument("--ids", nargs="+", default=["same"], choices=["same", "spread"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum seconds of steps per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="minimum steps per measurement")
    parser.add_argument("--flat", action="store_true", help="also time the sparse variants at every V interleaved")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base_ids = make_ids(args.batch, args.length)
    grad = torch.randn(args.batch, args.length, args.dim, generator=torch.Generator().manual_seed(1))
    lines = [header(args),
             f"{torch.unique(base_ids).numel()} distinct ids per step. 'x floor': time / sparse-floor time at the "
             "same V; 'x V=first': time / the same variant's time at the smallest V; 'full-l2 / this': speed-up "
             "over full-table L2.", "",
             "| ids | V | variant | median ms | IQR ms | min ms | steps | x floor | x V=first | full-l2 / this |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for mode in args.ids:
        first = {}
        for num_rows in args.rows:
            inputs = case_inputs(base_ids, num_rows, mode)
            times = {v: m for (v, _), m in measure_all({(v, num_rows): inputs for v in args.variants}, grad,
                                                          args).items()}
            for v, m in times.items():
                first.setdefault(v, m.median)
                floor = times["sparse-floor"].median if "sparse-floor" in times else float("nan")
                full = times["full-l2"].median if "full-l2" in times else float("nan")
                line = (f"| {mode} | {num_rows:.0e} | {v} | {m.median * 1e3:.2f} | {m.iqr * 1e3:.2f} | "
                        f"{m.min * 1e3:.2f} | {len(m.times)} | "
                        f"{m.median / floor:.2f} | {m.median / first[v]:.2f} | {full / m.median:.1f} |")
                lines.append(line)
                print(line, flush=True)
    if args.flat:
        # The sparse variants at every V in the same rounds: their growth with V, free of drifts in the load.
        lines += ["", "Flatness, every V interleaved in the same rounds (same ids): time / the variant's time at the "
                  "smallest V.", "", "| variant | V | median ms | IQR ms | min ms | steps | x V=first (median) | "
                  "x V=first (min) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        print("\n".join(lines[-5:]), flush=True)
        cases = {(v, n): case_inputs(base_ids, n, "same") for v in ("mba-cpu", "sparse-floor") for n in args.rows}
        times = measure_all(cases, grad, args)
        for (v, n), m in times.items():
            base = times[v, args.rows[0]]
            line = (f"| {v} | {n:.0e} | {m.median * 1e3:.2f} | {m.iqr * 1e3:.2f} | {m.min * 1e3:.2f} | "
                    f"{len(m.times)} | {m.median / base.median:.2f} | {m.min / base.min:.2f} |")
            lines.append(line)
            print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
