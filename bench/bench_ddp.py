"""DIN training throughput on 1 and 2 CPU processes (DistributedDataParallel over gloo), 1 torch thread each.

    python bench/bench_ddp.py --processes 1 2 --batch-size 256 1024 --steps 30 --warmup 5
    python bench/bench_ddp.py --quick                    # smoke run: 300 users, 3 steps, nothing written

Each configuration runs in fresh processes (torch.multiprocessing, gloo on 127.0.0.1): every process builds the
synthetic default data and the default DIN, then times ``steps`` training steps (din_ext.training.train_step on its
slice of each global batch of ``--batch-size`` rows, batch slicing included) after ``warmup`` ones, between two
barriers. samples/s = global rows / the slowest process's time. One process runs without DDP (the plain path);
"sync" is synchronized Dice (the composite path). Results go to bench/results/ddp_cpu.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import git_commit, machine_description, write_table  # noqa: E402
from din_ext import distributed, training  # noqa: E402
from din_ext.data.core import iterate_batches  # noqa: E402
from din_ext.data.synthetic import load_synthetic  # noqa: E402
from din_ext.model import DIN  # noqa: E402


def _worker(rank, size, port, args, dice, batch_size, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world = distributed.init(timeout=300, dice=dice) if size > 1 else distributed.World()
    try:
        train, _, schema = load_synthetic(seed=0, users=args.users)
        train = train.truncate_history(50)
        torch.manual_seed(0)
        model = DIN(schema)
        optimizer = training.make_optimizer(model, 1e-3)
        trainee = world.wrap(model)
        batches = iterate_batches(train, batch_size, shuffle=True, seed=0)
        seconds = 0.0
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                _barrier(size)
                start = time.perf_counter()
            batch = next(batches)
            part = world.shard(batch)
            training.train_step(trainee, optimizer, part, world=world, rows=len(batch))
        _barrier(size)
        seconds = time.perf_counter() - start
        if rank == 0:
            with open(out, "w") as f:
                f.write(str(seconds))
    finally:
        world.close()


def _barrier(size: int) -> None:
    if size > 1:
        torch.distributed.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args, processes: int, dice: str, batch_size: int) -> float:
    """samples/s of one configuration."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "seconds")
        mp.spawn(_worker, args=(processes, _free_port(), args, dice, batch_size, out), nprocs=processes, join=True)
        with open(out) as f:
            return args.steps * batch_size / float(f.read())


def run(args) -> str:
    rows = []
    for batch_size in args.batch_size:
        single = None
        for processes in args.processes:
            for dice in (["rank"] if processes == 1 else args.dice):
                speed = measure(args, processes, dice, batch_size)
                single = speed if processes == 1 else single
                ratio = f"{speed / single:.2f}x" if single else "-"
                mode = "one process, no DDP" if processes == 1 else f"DDP, Dice {dice}"
                rows.append(f"| {batch_size} | {processes} | {mode} | {speed:,.0f} | {ratio} |")
                print(rows[-1], flush=True)
    load = os.getloadavg()[0]
    command = " ".join(["python", "bench/bench_ddp.py", *sys.argv[1:]])
    return "\n".join([
        "# DIN training throughput on 1 and 2 CPU processes (DDP over gloo, 1 thread each)", "",
        f"- machine: {machine_description(torch.device('cpu'))}; 1-minute load average after the run {load:.1f}",
        f"- torch {torch.__version__}, Python {sys.version.split()[0]}",
        f"- date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {git_commit()}",
        f"- command: `{command}`",
        f"- data: synthetic default ({args.users} users), histories cut to 50; model: din_ext.DIN defaults (embedding "
        f"16, attention (80, 40) Dice, tower (200, 80) Dice), Adam 1e-3; {args.warmup} warm-up steps, then "
        f"{args.steps} timed; batch = the global batch (each of P processes takes batch / P rows)", "",
        "| global batch | processes | mode | samples/s | vs one process |",
        "|---:|---:|---|---:|---:|", *rows, ""])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[256, 1024], help="global batch sizes")
    parser.add_argument("--dice", nargs="+", choices=distributed.DICE_MODES, default=list(distributed.DICE_MODES),
                        help="Dice modes of the multi-process runs")
    parser.add_argument("--users", type=int, default=4000, help="synthetic users (the CLI's default: 4000)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 users, 3 steps, nothing written")
    parser.add_argument("--out", help="markdown output (default bench/results/ddp_cpu.md; none with --quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.users, args.steps, args.warmup, args.batch_size = 300, 3, 1, [64]
    table = run(args)
    if not args.quick:
        write_table(table, args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                     "ddp_cpu.md"))


if __name__ == "__main__":
    main()
