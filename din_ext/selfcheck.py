"""The self-check (``din-ext selfcheck``): every built backend against din_ext.reference on a few small cases.

float64, B=7, L=13, D=12, hidden (16, 8), a zero-length row and jagged storage past the last offset; each case
compares the output and every gradient (inputs and parameters) of a LocalActivationUnit.
"""

from __future__ import annotations

import copy
import time
from typing import Callable, List, Tuple

import torch

import din_ext
from din_ext import _ext

CASES = [  # (activation, normalization, layout, training)
    ("dice", "none", "padded", True),
    ("dice", "softmax", "jagged", False),
    ("prelu", "none", "jagged", True),
    ("sigmoid", "softmax", "padded", True),
    ("relu", "none", "padded", False),
]


def _inputs(layout: str, device: torch.device, generator: torch.Generator):
    batch, max_len, dim = 7, 13, 12
    lengths = torch.randint(0, max_len + 1, (batch,), generator=generator)
    lengths[0] = 0
    query = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    if layout == "padded":
        keys = torch.randn(batch, max_len, dim, generator=generator, dtype=torch.float64)
        extra = {"lengths": lengths.to(device)}
    else:
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        keys = torch.randn(int(offsets[-1]) + 3, dim, generator=generator, dtype=torch.float64)  # storage past end
        extra = {"offsets": offsets.to(device)}
    return query.to(device), keys.to(device), extra


def check_backend(backend: str, device: torch.device) -> List[Tuple[str, float, float, bool]]:
    """Runs every case on ``backend``; returns (case, max output error, max gradient error, ok) per case."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for activation, normalization, layout, training in CASES:
        torch.manual_seed(1)
        unit = din_ext.LocalActivationUnit(12, (16, 8), activation=activation, normalization=normalization)
        unit = unit.double().to(device).train(training)
        oracle = copy.deepcopy(unit)
        unit.backend, oracle.backend = backend, "reference"
        query, keys, extra = _inputs(layout, device, generator)
        results = []
        for module in (unit, oracle):
            q = query.clone().requires_grad_()
            k = keys.clone().requires_grad_()
            out = module(q, k, **extra)
            grads = torch.autograd.grad(out.square().sum(), [q, k, *module.parameters()])
            results.append((out, grads))
        (out, grads), (ref_out, ref_grads) = results
        out_err = (out - ref_out).abs().max().item()
        grad_err = max((g - r).abs().max().item() for g, r in zip(grads, ref_grads))
        ok = out_err <= 1e-10 and grad_err <= 1e-9
        name = f"{activation}/{normalization}/{layout}/{'train' if training else 'eval'}"
        rows.append((name, out_err, grad_err, ok))
    return rows


def self_check(write: Callable[[str], None]) -> int:
    """Writes the table of every built backend against the reference, a line per ``write`` call; 1 if any fails."""
    write(f"din_ext {din_ext.__version__}  torch {torch.__version__}  "
          f"C++ extension: {'built' if _ext.has_cpp() else 'not built (' + str(_ext.CPP_ERROR) + ')'}")
    write(f"available backends: {', '.join(din_ext.available_backends())}")
    write("")
    header = f"{'backend':<8} {'device':<6} {'case':<28} {'max |out err|':>14} {'max |grad err|':>15} {'ms':>7}  result"
    write(header)
    write("-" * len(header))
    failures = 0
    for backend in din_ext.available_backends():
        if backend == "reference":
            continue
        device = torch.device("cpu" if backend == "cpu" else "cuda")
        start = time.perf_counter()
        rows = check_backend(backend, device)
        ms = (time.perf_counter() - start) * 1e3 / len(rows)
        for name, out_err, grad_err, ok in rows:
            failures += not ok
            write(f"{backend:<8} {device.type:<6} {name:<28} {out_err:>14.2e} {grad_err:>15.2e} {ms:>7.1f}  "
                  f"{'ok' if ok else 'FAIL'}")
    if len(din_ext.available_backends()) == 1:
        write("(only the reference is available: nothing to check)")
    write("")
    write("float64, B=7, L=13, D=12, hidden (16, 8), a zero-length row; errors against din_ext.reference")
    return 1 if failures else 0
