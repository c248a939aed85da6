"""Helpers shared by every benchmark in bench/: timing, peak memory, the machine's measured ceilings, the
machine/commit lines and output of the results tables, and the tables as pictures (``plot_table``)."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable, device, min_reps: int, min_seconds: float) -> List[float]:
    """Wall times (ms) of repeated calls after two warm-up calls."""
    if device.type == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(fn, warmup=25, rep=max(100, int(min_seconds * 1000)), return_mode="all")
        return list(ms)
    for _ in range(2):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_seconds and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def peak_memory(fn: Callable, device) -> float:
    """Peak bytes allocated by torch during one call, above what was allocated before it (MB)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each allocation (+bytes) and free (-bytes) is charged to the innermost op running it ("self"), or to a
    # "[memory]" event outside any op; replayed in time order they give the allocated-bytes curve.
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def matmul_gflops(device, dtype=torch.float32, n=2048) -> float:
    n = 8192 if device.type == "cuda" else n
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = statistics.median(time_fn(lambda: torch.mm(a, b), device, 5, 1.0))
    return 2 * n**3 / (ms * 1e-3) / 1e9


def copy_gbs(device) -> float:
    """Measured copy bandwidth: bytes read plus bytes written per second of a large tensor copy (GB/s)."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 25)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = statistics.median(time_fn(lambda: dst.copy_(src), device, 5, 1.0))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def machine_description(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads)"


def git_commit() -> str:
    """The checkout's commit, or DIN_EXT_COMMIT where there is no git (a copied tree on a GPU machine)."""
    if os.environ.get("DIN_EXT_COMMIT"):
        return os.environ["DIN_EXT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def write_table(text: str, out: Optional[str]) -> None:
    """Writes a results table to ``out`` (nothing for None) and says where."""
    if out:
        with open(out, "w") as f:
            f.write(text)
        print(f"\nwrote {out}")


def table_rows(text: str) -> List[Dict[str, str]]:
    """The rows of the first markdown table in ``text`` as header -> cell text (rows of another width, such as a
    "skipped" note, are left out)."""
    lines = [line.strip() for line in text.splitlines()]
    start = next((i for i, line in enumerate(lines[:-1]) if line.startswith("|") and lines[i + 1].startswith("|---")),
                 None)
    if start is None:
        return []
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    header, rows = cells(lines[start]), []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        row = cells(line)
        if len(row) == len(header):
            rows.append(dict(zip(header, row)))
    return rows


def plot_table(text: str, out: str, *, x: Callable[[Dict[str, str]], float], y: str, series: str,
               panel: Callable[[Dict[str, str]], str], xlabel: str, ylabel: str, title: str = "",
               logx: bool = False, logy: bool = False) -> None:
    """A results table (markdown ``text``) as line charts in ``out`` (PNG, needs matplotlib: din_ext[plots]): one
    chart per ``panel(row)``, one line per value of the column ``series``, points (``x(row)``, column ``y``). Rows
    whose ``y`` is not a number (OOM, "-") are left out."""
    from din_ext.plots import line_panels

    panels: Dict[str, Dict[str, list]] = {}
    for row in table_rows(text):
        try:
            value = float(row[y])
        except ValueError:
            continue
        panels.setdefault(panel(row), {}).setdefault(row[series], []).append((x(row), value))
    line_panels(panels, out, xlabel=xlabel, ylabel=ylabel, title=title, logx=logx, logy=logy)
    print(f"wrote {out}")
