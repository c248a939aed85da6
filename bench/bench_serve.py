"""Serving DIN on the CPU: the eager model (din_ext's fused CPU kernels, and the textbook reference backend), the
torch.compile'd model, the AOTInductor package and the ONNX file on onnxruntime (both from din-ext export), side by
side in one run, on the same serving tensors (din_ext.export.ServingDIN's five inputs).

    python bench/bench_serve.py                      # -> bench/results/serve_cpu.md
    python bench/bench_serve.py --quick              # smoke run: one thread, few repetitions, nothing written

Workloads (the synthetic default's schema and trained-size model: embed 16, attention (80, 40), tower (200, 80),
Dice): per-request latency of one user with C in {1, 100} candidates and a history of 50 behaviours (p50, p99 over
repeated calls), and throughput of batches of 256 one-candidate requests drawn from the synthetic test split
(their real histories: 7,510 behaviours in all, about 29 a request). Each at 1 and 2 threads (torch's for the
torch contenders, onnxruntime's intra-op threads for its session). onnxruntime needs the extra din_ext[onnx];
without it, the header says it was not measured.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import tempfile

import torch

import din_ext  # noqa: F401  (registers the din_ext ops the package calls)
from common import ROOT, git_commit, machine_description, time_fn, write_table
from din_ext.data import iterate_batches
from din_ext.data.synthetic import SyntheticConfig, generate
from din_ext.export import ServingDIN, export_package, load_package
from din_ext.model import DIN

EAGER, REFERENCE, ONNXRUNTIME = "eager", "eager textbook reference", "onnxruntime (CPU provider)"


def percentile(times, q):
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def one_user(schema, candidates: int, length: int, seed: int = 0):
    """ServingDIN inputs of one user with ``candidates`` candidates and a history of ``length`` behaviours."""
    g = torch.Generator().manual_seed(seed)
    sizes = lambda fields: torch.tensor([schema.item_fields.get(f, schema.user_fields.get(f)) for f in fields])  # noqa: E731

    def rows(shape, fields):
        return (torch.rand(*shape, len(fields), generator=g) * (sizes(fields) - 1)).long() + 1

    user = rows((1,), list(schema.user_fields))
    items = rows((1, candidates), list(schema.item_fields))
    hist = rows((length,), list(schema.history_fields))
    offsets = torch.tensor([0, length])
    dense = torch.rand(1, schema.dense_dim, generator=g)
    return user, items, offsets, hist, dense


def batch_inputs(batch, schema):
    """ServingDIN inputs of an Interactions batch (one candidate per row)."""
    user = torch.stack([batch.user[f] for f in schema.user_fields], 1)
    items = torch.stack([batch.item[f] for f in schema.item_fields], 1)[:, None, :]
    total = int(batch.hist_offsets[-1])
    hist = torch.stack([batch.hist[f][:total] for f in schema.history_fields], 1)
    return user, items, batch.hist_offsets, hist, batch.dense.float()


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--reps", type=int, default=50, help="minimum calls per measurement")
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum seconds per measurement")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.threads, args.reps, args.seconds = "1", 5, 0.1
    train, test, schema = generate(SyntheticConfig(), seed=0)
    torch.manual_seed(0)
    model = DIN(schema, embed_dim=16, attention_hidden=(80, 40), tower_hidden=(200, 80), activation="dice").eval()
    serving = ServingDIN(model)
    textbook = copy.deepcopy(model)
    textbook.backend = "reference"
    compiled = torch.compile(serving, dynamic=False)
    folder = tempfile.mkdtemp()
    package = os.path.join(folder, "din.pt2")
    export_package(model, package)
    runner, _ = load_package(package)
    onnx_file, onnx_missing = os.path.join(folder, "din.onnx"), None
    try:
        from din_ext.onnx_export import export_onnx, load_onnx

        export_onnx(model, onnx_file)
    except ImportError as exc:
        onnx_missing = str(exc)
    contenders = {EAGER: serving, REFERENCE: ServingDIN(textbook), "torch.compile": compiled,
                  "pt2 (AOTInductor)": lambda *x: runner(*x), ONNXRUNTIME: None}  # a session per thread count
    workloads = [(f"latency, 1 user, C={c}, L=50", one_user(schema, c, 50), 1) for c in (1, 100)]
    batch = next(iter(iterate_batches(test, 256)))
    workloads.append(("throughput, batch of 256 requests (C=1, real histories)", batch_inputs(batch, schema), 256))
    cpu = torch.device("cpu")
    load = os.getloadavg()
    lines = ["# Serving DIN on the CPU (bench/bench_serve.py)", "",
             f"- machine: {machine_description(cpu)}; load average at start {load[0]:.2f} / {load[1]:.2f} (the "
             f"machine is shared and noisy: compare within a row group, read the 1-thread rows first)",
             f"- torch {torch.__version__}, onnxruntime {_version('onnxruntime')}, commit {git_commit()}, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- command: `python bench/bench_serve.py {' '.join(sys.argv[1:])}`",
             "- model: synthetic default schema, embed 16, attention (80, 40) Dice, tower (200, 80) Dice, eval, "
             "float32; every contender gets the same five serving tensors; eager = din_ext's fused CPU kernels "
             "(backend auto), eager textbook reference = the same model on the reference backend (padded "
             "[q, k, q-k, q*k] MLP); onnxruntime runs the file of din-ext export --format onnx (standard ops: "
             "the attention in segment form)" + (f"; onnxruntime: not measured ({onnx_missing})" if onnx_missing
                                                 else ""), "",
             "| threads | workload | contender | p50 ms | p99 ms | requests/s | vs eager (p50) | vs reference (p50) |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        if not onnx_missing:
            session, _ = load_onnx(onnx_file, threads=threads)
            contenders[ONNXRUNTIME] = session
        for name, inputs, requests in workloads:
            measured = {}  # contender -> (p50, p99)
            for contender, fn in contenders.items():
                if fn is not None:
                    with torch.no_grad():
                        times = time_fn(lambda: fn(*inputs), cpu, args.reps, args.seconds)
                    measured[contender] = statistics.median(times), percentile(times, 99)
            for contender, (p50, p99) in measured.items():
                lines.append(f"| {threads} | {name} | {contender} | {p50:.3f} | {p99:.3f} | "
                             f"{requests / (p50 / 1e3):,.0f} | {measured[EAGER][0] / p50:.2f}x | "
                             f"{measured[REFERENCE][0] / p50:.2f}x |")
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    write_table(text, args.out or (None if args.quick else os.path.join(ROOT, "bench", "results", "serve_cpu.md")))


if __name__ == "__main__":
    main()
