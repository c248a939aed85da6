"""Shared fixtures: which (backend, device) pairs to test, and random DIN inputs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import pytest
import torch

import din_ext


def backends_under_test() -> List[Tuple[str, str]]:
    """(backend, device) pairs this machine can run; the reference is the oracle, not a subject."""
    pairs = []
    if "cpu" in din_ext.available_backends(torch.device("cpu")):
        pairs.append(("cpu", "cpu"))
    if torch.cuda.is_available():
        pairs += [(b, "cuda") for b in din_ext.available_backends(torch.device("cuda")) if b != "reference"]
    elif os.environ.get("TRITON_INTERPRET") == "1" and din_ext._backend.has_triton():
        pairs.append(("triton", "cpu"))
    return pairs


BACKENDS = backends_under_test()
requires_cpp = pytest.mark.skipif(not din_ext._ext.has_cpp(), reason="din_ext._C was not built")

# The triton backend's own tests: on a GPU, or on the CPU under TRITON_INTERPRET=1 (CI: ``pytest -k triton``).
ON_GPU = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if ON_GPU else "cpu"
requires_triton = pytest.mark.skipif(
    not din_ext._backend.has_triton() or not (ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton and a GPU, or TRITON_INTERPRET=1 on the CPU")
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (the interpreter covers fp32/fp64 correctness)")


def pytest_report_header(config):
    return f"din_ext backends under test: {BACKENDS or 'none (C++ extension not built)'}"


@pytest.fixture(params=BACKENDS or [pytest.param(None, marks=pytest.mark.skip(reason="no compiled backend built"))],
                ids=lambda p: f"{p[0]}-{p[1]}" if p else "none")
def backend(request) -> Tuple[str, str]:
    return request.param


@dataclass
class Batch:
    query: torch.Tensor
    keys: torch.Tensor
    values: Optional[torch.Tensor]
    index: Dict[str, object]  # {"lengths": ...} or {"offsets": ..., "max_len": ...}

    def leaves(self) -> Tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.query, self.keys, self.values) if t is not None)

    def fresh(self) -> "Batch":
        """A copy whose float tensors are new leaves that require grad."""
        def leaf(t):
            return None if t is None else t.detach().clone().requires_grad_()
        return Batch(leaf(self.query), leaf(self.keys), leaf(self.values), dict(self.index))


def make_batch(
    layout: str,
    batch: int = 5,
    max_len: int = 113,
    dim: int = 24,
    value_dim: Optional[int] = None,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    seed: int = 0,
    lengths: Optional[List[int]] = None,
    garbage: float = float("nan"),
    index_dtype: torch.dtype = torch.int64,
) -> Batch:
    """Random DIN inputs: row 1 is empty, row 0 full; padded positions and jagged storage past offsets[-1] hold
    ``garbage`` (NaN by default), which a correct kernel never reads."""
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = torch.randint(0, max_len + 1, (batch,), generator=g)
        lengths[0] = max_len
        if batch > 1:
            lengths[1] = 0
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    query = torch.randn(batch, dim, generator=g, dtype=dtype)
    width = value_dim or dim
    if layout == "padded":
        keys = torch.randn(batch, max_len, dim, generator=g, dtype=dtype)
        values = torch.randn(batch, max_len, width, generator=g, dtype=dtype) if value_dim else None
        pad = torch.arange(max_len)[None, :] >= lengths[:, None]
        keys[pad] = garbage
        if values is not None:
            values[pad] = garbage
        index = {"lengths": lengths.to(index_dtype).to(device)}
    else:
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        rows = int(offsets[-1]) + 3  # storage past offsets[-1]
        keys = torch.randn(rows, dim, generator=g, dtype=dtype)
        values = torch.randn(rows, width, generator=g, dtype=dtype) if value_dim else None
        keys[int(offsets[-1]):] = garbage
        if values is not None:
            values[int(offsets[-1]):] = garbage
        index = {"offsets": offsets.to(index_dtype).to(device), "max_len": max_len}
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return Batch(to(query), to(keys), to(values), index)


def clean(batch: Batch) -> Batch:
    """The same batch with the garbage (padding, storage past the end) replaced by zeros, for the reference."""
    def zero(t):
        return None if t is None else torch.nan_to_num(t.detach(), nan=0.0)
    return Batch(zero(batch.query), zero(batch.keys), zero(batch.values), dict(batch.index)).fresh()


def unit_params(unit: torch.nn.Module) -> List[torch.Tensor]:
    return [p for p in unit.parameters() if p.requires_grad]


def run_unit(unit, batch: Batch, seed: int = 0):
    """Forward, then backward of a fixed random projection of the output; returns (out, grads of inputs+params)."""
    out = unit(batch.query, batch.keys, values=batch.values, **batch.index)
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)
    inputs = list(batch.leaves()) + unit_params(unit)
    grads = torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)
    return out, [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
