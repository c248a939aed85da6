"""Benchmark of Dice on DIN's output tower: din_ext.Dice in training mode, forward and forward+backward, each
backend side by side on the same input x [rows, features].

    python bench/bench_dice.py                               # x [4096, 200] and [4096, 80] float32
    python bench/bench_dice.py --features 200 --threads 1
    python bench/bench_dice.py --device cuda --dtype bfloat16 # reference and every GPU backend (triton, cuda)

Times are the median and interquartile range of torch.utils.benchmark.Timer.blocked_autorange (which synchronizes
CUDA).
"""

from __future__ import annotations

import argparse

import torch
import torch.utils.benchmark as benchmark

import din_ext


def measure(stmt: str, env: dict, threads: int, seconds: float) -> benchmark.Measurement:
    return benchmark.Timer(stmt, globals=env, num_threads=threads).blocked_autorange(min_run_time=seconds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--features", type=int, nargs="+", default=[200, 80])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", nargs="+", help="default: every backend built for the device")
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum seconds per measurement")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    backends = args.backends or din_ext.available_backends(device)
    print(f"torch {torch.__version__}, {device}, {args.threads} threads, x [{args.rows}, H] {args.dtype}, training")
    print(f"{'H':>5} {'backend':>10} {'forward ms (IQR)':>20} {'fwd+bwd ms (IQR)':>20}")
    for features in args.features:
        torch.manual_seed(0)
        x = torch.randn(args.rows, features, dtype=dtype, device=device)
        x_grad = x.clone().requires_grad_()
        for backend in backends:
            dice = din_ext.Dice(features).to(device=device, dtype=dtype).train()
            dice.backend = backend
            env = {"dice": dice, "x": x, "x_grad": x_grad}
            fwd = measure("dice(x)", env, args.threads, args.seconds)
            both = measure("dice(x_grad).sum().backward()", env, args.threads, args.seconds)
            cells = [f"{m.median * 1e3:9.3f} ({m.iqr * 1e3:6.3f})" for m in (fwd, both)]
            print(f"{features:>5} {backend:>10} {cells[0]:>20} {cells[1]:>20}")


if __name__ == "__main__":
    main()
