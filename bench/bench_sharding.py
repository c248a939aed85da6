"""TorchRec-sharded DIN (din_ext.sharding): each rank's memory and the training throughput, row-wise and table-wise.

Run one process per rank: ``torchrun --nproc-per-node 2 bench/bench_sharding.py [--item-rows N] [--out FILE]``.
The item table has ``--item-rows`` rows (the synthetic log uses the first few thousand; the rest only take memory),
so the table's size and each rank's resident memory show side by side. Times are measured, never asserted.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch
import torch.distributed as dist
from common import git_commit, machine_description, write_table

from din_ext import sharding
from din_ext.data.core import Schema, iterate_batches
from din_ext.data.synthetic import generate

MB = 2 ** 20


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run(plan: str, schema: Schema, train, args) -> dict:
    torch.manual_seed(0)
    before = _rss_mb()
    model = sharding.ShardedDIN(schema, embed_dim=args.embed_dim)
    dmp = sharding.shard(model, plan, table_optimizer=torch.optim.Adagrad, table_optimizer_kwargs={"lr": 0.01})
    item = sharding._table_states(dmp)["item"]
    rows = sum(s.metadata.shard_sizes[0] for s in item.local_shards())
    after_shard = _rss_mb()
    dense = torch.optim.Adam(sharding.dense_parameters(dmp), lr=1e-3)
    bce = torch.nn.BCEWithLogitsLoss()
    batches = [b for b in iterate_batches(train, args.batch_size, shuffle=True) if len(b) == args.batch_size]
    batches = (batches * (1 + (args.warmup + args.steps) // len(batches)))[:args.warmup + args.steps]
    times = []
    for k, batch in enumerate(batches):
        part, _ = sharding._my_rows(batch)
        dist.barrier()
        start = time.perf_counter()
        loss = bce(dmp(part)[:, 0], part.labels["click"])
        dense.zero_grad()
        loss.backward()
        dense.step()
        dist.barrier()
        if k >= args.warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    stats = torch.tensor([rows, before, after_shard, _rss_mb(), _peak_mb()], dtype=torch.float64)
    gathered = [torch.zeros_like(stats) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, stats)
    return {"plan": plan, "per_rank": [g.tolist() for g in gathered],
            "samples_per_second": args.batch_size / times[len(times) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--item-rows", type=int, default=8_000_000)
    parser.add_argument("--embed-dim", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1024, help="the global batch")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--plans", nargs="+", default=sorted(sharding.PLANS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    train, _, schema = generate(seed=0)
    train = train.truncate_history(50)
    items = dict(schema.item_fields, item=max(args.item_rows, schema.item_fields["item"]))
    schema = Schema(schema.user_fields, items, schema.history_fields, schema.dense_dim, schema.tasks)
    results = [_run(plan, schema, train, args) for plan in args.plans]
    if dist.get_rank() == 0:
        table_mb = items["item"] * args.embed_dim * 4 / MB
        lines = [f"# TorchRec-sharded DIN training (cpu, {dist.get_world_size()} gloo ranks, 1 thread each)",
                 "",
                 f"- machine: {machine_description(torch.device('cpu'))}",
                 (f"- torch {torch.__version__}, torchrec {__import__('torchrec').__version__}, date "
                  f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {git_commit()}"),
                 (f"- command: `torchrun --nproc-per-node {dist.get_world_size()} bench/bench_sharding.py "
                  f"{' '.join(sys.argv[1:])}`"),
                 (f"- data: din-ext's synthetic default ({len(train):,} training impressions, histories cut to 50); "
                  f"item table {items['item']:,} rows x {args.embed_dim} = {table_mb:,.0f} MB fp32 (Adagrad's state "
                  f"as much again), the other tables small; global batch {args.batch_size}, median of {args.steps} "
                  f"steps after {args.warmup}"),
                 "",
                 ("| plan | rank | item rows held | RSS before shard MB | after shard MB | after training MB | "
                  "peak RSS MB | samples/s (global) |"),
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for result in results:
            for rank, (rows, before, shard_mb, end_mb, peak) in enumerate(result["per_rank"]):
                lines.append(f"| {result['plan']} | {rank} | {int(rows):,} | {before:,.0f} | {shard_mb:,.0f} | "
                             f"{end_mb:,.0f} | {peak:,.0f} | {result['samples_per_second']:,.0f} |")
        text = "\n".join(lines) + "\n"
        print(text)
        write_table(text, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
