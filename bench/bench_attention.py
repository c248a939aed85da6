"""Benchmark of DIN local-activation attention: eager reference, torch.compile(reference) and each din_ext backend,
side by side in one run, on the same inputs.

    python bench/bench_attention.py                   # the full CPU table -> bench/results/cpu.md
    python bench/bench_attention.py --quick           # a smoke run (tiny shapes, one repetition)
    python bench/bench_attention.py --device cuda --dtype bfloat16 --budget 240   # GPU table, time-boxed

Per shape, activation and mode (eval forward; on a GPU also the training forward, the training backward and the
training forward+backward; on the CPU eval and training forward+backward) it reports the median time and its spread
(interquartile range), speed ratios against eager and compile, achieved GFLOP/s against the machine's measured
matmul rate in the benchmark's dtype, achieved GB/s against the measured copy bandwidth, and the peak memory
allocated during one call (CPU: torch's allocator, traced with the profiler; GPU: torch.cuda.max_memory_allocated).

On the CPU, training Dice also runs as "cpu-recompute": the cpu backend with its stored-activation mode off
(DIN_EXT_ATTENTION_STORE_MB=0), next to "cpu", which stores each pair's pre-activations where they fit its budget
(short histories) and recomputes them otherwise; their peak MB columns are the two modes' memory. "cpu-split" is
the cpu backend with layer 1 always in the split form (DIN_EXT_ATTENTION_SPLIT_BELOW=1e9), next to "cpu", which
keeps the per-user effective weight unless that variable is set (it splits calls whose mean history length is below
it).

FLOPs count only valid behaviours and the textbook work per behaviour: 2 * (4D * H1 + H1 * H2 + H2) for the MLP plus
2 * Dv for pooling; training counts 3x the forward (the backward 2x). Bytes are the fewest a fused kernel must move:
the valid keys once (eval and training forward), the keys read and their gradient written (backward), both
(forward+backward). The backward row is derived: forward+backward minus training forward. With --budget, shapes that
no longer fit the time left are listed as skipped; an implementation that runs out of memory is listed as OOM.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Dict, List

import torch

import din_ext
from common import (ROOT, copy_gbs, git_commit, machine_description, matmul_gflops, peak_memory, plot_table, time_fn,
                    write_table)



@dataclass
class Shape:
    batch: int
    max_len: int
    dim: int
    hidden: tuple = (80, 40)

    def __str__(self):
        return f"B={self.batch} L={self.max_len} D={self.dim} H={'x'.join(map(str, self.hidden))}"


def full_shapes() -> List[Shape]:
    return [Shape(1024, L, D) for D in (32, 64) for L in (20, 50, 200, 1000)]


def quick_shapes() -> List[Shape]:
    return [Shape(16, 9, 8, (6, 4))]


def gpu_shapes() -> List[Shape]:
    """The issue's grid, most informative first (L = 1000 carries the targets) so a time-boxed run keeps them."""
    grid = [Shape(B, L, D) for B in (256, 2048) for D in (32, 64, 128) for L in (100, 1000, 10000)]
    return sorted(grid, key=lambda s: ({1000: 0, 100: 1, 10000: 2}[s.max_len], {64: 0, 32: 1, 128: 2}[s.dim],
                                       -s.batch))


def make_inputs(shape: Shape, device, dtype, seed=0, min_len=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, shape.max_len + 1, (shape.batch,), generator=g)
    query = torch.randn(shape.batch, shape.dim, generator=g, dtype=dtype)
    keys = torch.randn(shape.batch, shape.max_len, shape.dim, generator=g, dtype=dtype)
    return query.to(device), keys.to(device), lengths.to(device)


def flops_per_behaviour(shape: Shape) -> int:
    widths = [4 * shape.dim, *shape.hidden, 1]
    return 2 * sum(a * b for a, b in zip(widths[:-1], widths[1:])) + 2 * shape.dim


# ---------------------------------------------------------------------------------------------------------------
# Timing and memory


# ---------------------------------------------------------------------------------------------------------------
# Implementations


def make_unit(shape: Shape, activation: str, backend: str, device, dtype, training: bool):
    torch.manual_seed(0)
    unit = din_ext.LocalActivationUnit(shape.dim, shape.hidden, activation=activation, backend=backend)
    return unit.to(device=device, dtype=dtype).train(training)


CPU_RECOMPUTE = "cpu-recompute"
STORE_BUDGET_ENV = "DIN_EXT_ATTENTION_STORE_MB"
CPU_SPLIT = "cpu-split"
SPLIT_ENV = "DIN_EXT_ATTENTION_SPLIT_BELOW"


def implementations(device) -> List[str]:
    names = ["eager", "compile"]
    names += [b for b in din_ext.available_backends(device) if b != "reference"]
    return names + ([CPU_RECOMPUTE, CPU_SPLIT] if "cpu" in names else [])


def with_env(call, name: str, value: str):
    """``call`` with the environment variable ``name`` set to ``value`` (the cpu backend reads it per call)."""
    def wrapped():
        before = os.environ.get(name)
        os.environ[name] = value
        try:
            return call()
        finally:
            if before is None:
                del os.environ[name]
            else:
                os.environ[name] = before
    return wrapped


MODES = {"eval": "eval fwd", "train-fwd": "train fwd", "train-bwd": "train bwd", "train": "train fwd+bwd"}


def build_call(impl: str, shape: Shape, activation: str, device, dtype, mode: str, inputs):
    """The timed call of one mode: "eval" (no grad), "train-fwd" (training forward, graph recorded), "train"
    (training forward and backward)."""
    if impl == CPU_RECOMPUTE:  # the stored-activation mode off
        return with_env(build_call("cpu", shape, activation, device, dtype, mode, inputs), STORE_BUDGET_ENV, "0")
    if impl == CPU_SPLIT:  # layer 1 always split
        return with_env(build_call("cpu", shape, activation, device, dtype, mode, inputs), SPLIT_ENV, "1e9")
    backend = "reference" if impl in ("eager", "compile") else impl
    unit = make_unit(shape, activation, backend, device, dtype, mode != "eval")
    if impl == "compile":
        unit = torch.compile(unit)
    query, keys, lengths = inputs
    if mode == "eval":
        def call():
            with torch.no_grad():
                return unit(query, keys, lengths)
        return call
    q = query.clone().requires_grad_()
    k = keys.clone().requires_grad_()
    params = [p for p in unit.parameters() if p.requires_grad]
    if mode == "train-fwd":
        return lambda: unit(q, k, lengths)

    def call():
        out = unit(q, k, lengths)
        return torch.autograd.grad(out.sum(), [q, k, *params])
    return call


def min_bytes(shape: Shape, valid: int, dtype, mode: str) -> int:
    keys = valid * shape.dim * torch.tensor([], dtype=dtype).element_size()
    return {"eval": keys, "train-fwd": keys, "train-bwd": 2 * keys, "train": 3 * keys}[mode]


# ---------------------------------------------------------------------------------------------------------------


def run(args) -> str:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = quick_shapes() if args.quick else (gpu_shapes() if device.type == "cuda" else full_shapes())
    if args.lengths:
        shapes = [s for s in shapes if s.max_len in args.lengths]
    impls = args.impls or implementations(device)
    modes = args.modes or (["eval", "train-fwd", "train"] if device.type == "cuda" else ["eval", "train"])
    activations = args.activations or (["dice"] if device.type == "cuda" else ["sigmoid", "dice"])
    reps, seconds = (1, 0.0) if args.quick else (args.reps, args.seconds)
    start = time.perf_counter()
    ceiling = matmul_gflops(device, dtype)
    bandwidth = copy_gbs(device)
    versions = f"torch {torch.__version__}, din_ext {din_ext.__version__}, Python {platform.python_version()}"
    if device.type == "cuda":
        import triton

        versions += f", triton {triton.__version__}, CUDA {torch.version.cuda}"
        tuning = "on" if os.environ.get("DIN_EXT_TRITON_AUTOTUNE", "1") != "0" else "off (one config per kernel)"
        versions += f", triton autotuning {tuning}"
    header = (f"# DIN attention benchmark ({device.type})\n\n"
              f"- machine: {machine_description(device)}\n"
              f"- {versions}, dtype {args.dtype}\n"
              f"- date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, commit {git_commit()}\n"
              f"- measured {args.dtype} matmul ceiling: {ceiling:.0f} GFLOP/s (torch.mm); measured copy bandwidth: "
              f"{bandwidth:.0f} GB/s (read + write)\n"
              f"- command: `python bench/bench_attention.py {' '.join(sys.argv[1:])}`\n\n"
              "Times are medians over repetitions (spread = interquartile range). 'x eager' and 'x compile' are "
              "speed-ups (higher is better). GFLOP/s counts textbook FLOPs of valid behaviours only; GB/s the "
              "fewest bytes a fused kernel moves (see the script's docstring). 'train bwd' = 'train fwd+bwd' - "
              "'train fwd'. Lengths are uniform in [1, L] on the GPU, [0, L] on the CPU.\n")
    rows = []
    table_head = ("| shape | act | mode | impl | median ms | spread ms | x eager | x compile | GFLOP/s | % matmul "
                  "| GB/s | % copy | peak MB |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(header)
    print(table_head, flush=True)

    def emit(row):
        rows.append(row)
        print(row, flush=True)

    for index, shape in enumerate(shapes):
        if args.budget and time.perf_counter() - start > args.budget:
            skipped = ", ".join(str(s) for s in shapes[index:])
            emit(f"| skipped: out of the {args.budget:.0f} s budget | | | | | | | | | | | | |\n\n"
                 f"Not measured (time budget): {skipped}")
            break
        inputs = make_inputs(shape, device, dtype, min_len=1 if device.type == "cuda" else 0)
        valid = int(inputs[2].sum())
        for activation in activations:
            timed = {}  # (impl, mode) -> median ms
            for mode in modes + (["train-bwd"] if "train" in modes and "train-fwd" in modes else []):
                label = MODES[mode]
                factor = {"eval": 1, "train-fwd": 1, "train-bwd": 2, "train": 3}[mode]
                flops = flops_per_behaviour(shape) * valid * factor
                nbytes = min_bytes(shape, valid, dtype, mode)
                results: Dict[str, float] = {}
                for impl in impls:
                    if impl == CPU_RECOMPUTE and (mode != "train" or activation != "dice"):
                        continue  # the stored mode is for training Dice only
                    lead = f"| {shape} | {activation} | {label} | {impl} |"
                    if mode == "train-bwd":
                        if (impl, "train") not in timed or (impl, "train-fwd") not in timed:
                            continue
                        med = timed[impl, "train"] - timed[impl, "train-fwd"]
                        spread, mem = "-", "-"
                    else:
                        try:
                            call = build_call(impl, shape, activation, device, dtype, mode, inputs)
                            times = time_fn(call, device, reps, seconds)
                            mem = f"{peak_memory(call, device):.1f}"
                        except torch.OutOfMemoryError:
                            del call
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                            emit(lead + " OOM | | | | | | | | |")
                            continue
                        del call
                        med = statistics.median(times)
                        q = statistics.quantiles(times, n=4) if len(times) >= 2 else [med, med, med]
                        spread = f"{q[2] - q[0]:.2f}"
                        timed[impl, mode] = med
                    results[impl] = med
                    gflops = flops / (med * 1e-3) / 1e9 if med > 0 else float("nan")
                    gbs = nbytes / (med * 1e-3) / 1e9 if med > 0 else float("nan")
                    vs = lambda base: f"{results[base] / med:.2f}" if base in results else "-"  # noqa: E731
                    emit(f"{lead} {med:.2f} | {spread} | {vs('eager')} | {vs('compile')} | {gflops:.1f} | "
                         f"{100 * gflops / ceiling:.1f} | {gbs:.1f} | {100 * gbs / bandwidth:.1f} | {mem} |")
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return header + "\n" + table_head + "\n" + "\n".join(rows) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, one repetition")
    parser.add_argument("--activations", nargs="+", help="default: dice on a GPU, sigmoid and dice on the CPU")
    parser.add_argument("--modes", nargs="+", choices=["eval", "train-fwd", "train"],
                        help="default: eval, train-fwd, train on a GPU (train-bwd is derived); eval, train on the CPU")
    parser.add_argument("--budget", type=float, default=0.0,
                        help="seconds; shapes started after this are skipped (and listed as such)")
    parser.add_argument("--impls", nargs="+", help="subset of eager, compile and the din_ext backends")
    parser.add_argument("--lengths", nargs="+", type=int, help="only the shapes with these L (default: all)")
    parser.add_argument("--reps", type=int, default=5, help="minimum repetitions per measurement")
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum seconds per measurement")
    parser.add_argument("--out", help="markdown output (default bench/results/<device>.md; none with --quick)")
    parser.add_argument("--plot", help="also draw the table: time against history length per implementation, one "
                                       "chart per width, activation and mode (PNG; needs din_ext[plots])")
    parser.add_argument("--from-table", help="draw --plot from this results table instead of measuring")
    args = parser.parse_args(argv)
    if args.from_table:
        with open(args.from_table) as f:
            plot(f.read(), args.plot or os.path.splitext(args.from_table)[0] + ".png")
        return
    table = run(args)
    name = "cpu" if args.device == "cpu" else torch.cuda.get_device_name().replace(" ", "_")
    write_table(table, args.out or (None if args.quick else os.path.join(ROOT, "bench", "results", f"{name}.md")))
    if args.plot:
        plot(table, args.plot)


def plot(table: str, out: str) -> None:
    """The attention table as time against history length L per implementation."""
    shape = lambda row: dict(part.split("=") for part in row["shape"].split())  # noqa: E731
    plot_table(table, out, x=lambda row: int(shape(row)["L"]), y="median ms", series="impl",
               panel=lambda row: f"D={shape(row)['D']} B={shape(row)['B']}, {row['act']}, {row['mode']}",
               xlabel="history length L", ylabel="median ms (lower is faster)", logx=True, logy=True,
               title=table.splitlines()[0].lstrip("# "))


if __name__ == "__main__":
    main()
