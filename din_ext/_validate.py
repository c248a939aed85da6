"""Input checks with messages that name the argument; they run before any kernel.

Checks of tensor *values* (lengths in range, offsets non-decreasing, ids in range) read the data, which on a GPU
means a synchronization: each reads all it needs at once (one synchronization per call), a caller that has validated
the values already passes ``checked=True`` to the ops, and they are skipped while torch.compile traces (the compiled
kernels check what they can).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

INDEX_DTYPES = (torch.int32, torch.int64)


def tracing() -> bool:
    return torch.compiler.is_compiling()


def tensor(x, name: str, dims: Optional[int] = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(x.shape)}")
    return x


def floating(x: torch.Tensor, name: str, like: Optional[torch.Tensor] = None, like_name: str = "query") -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if like is not None:
        if x.dtype != like.dtype:
            raise TypeError(f"{name} must have the dtype of {like_name} ({like.dtype}), got {x.dtype}")
        if x.device != like.device:
            raise ValueError(f"{name} must be on the device of {like_name} ({like.device}), got {x.device}")


def index(x, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    tensor(x, name)
    if x.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} must be on the device of query ({like.device}), got {x.device}")
    return x


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or the name of its type when the message is empty: the text of a
    one-line error built on top of it."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def positive_finite(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def lengths_in_range(lengths: torch.Tensor, max_len: int) -> None:
    if tracing() or lengths.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(lengths)).tolist()
    if lo < 0:
        raise ValueError(f"lengths must be >= 0, got a length of {lo}")
    if hi > max_len:
        raise ValueError(f"lengths must be <= L = {max_len} (keys.shape[1]), got a length of {hi}")


def offsets_summary(offsets: torch.Tensor, max_len: Optional[int] = None) -> List[torch.Tensor]:
    """The 0-d tensors that check_offsets reads: offsets[0], offsets[-1], the shortest row length and, with max_len,
    the longest (for a caller that reads them together with values of its own)."""
    steps = torch.diff(offsets)  # one op rather than two slices and a subtraction (DIN: every step)
    summary = [offsets[0], offsets[-1]]
    if steps.numel():
        summary.append(steps.min())
        if max_len is not None:
            summary.append(steps.max())
    return summary


def check_offsets(summary: Sequence[int], num_rows: Optional[int], max_len: Optional[int]) -> None:
    """Raises ValueError unless offsets_summary's values (read to the host) describe valid offsets: starting at 0,
    non-decreasing, offsets[-1] <= num_rows (None: not checked), rows no longer than max_len (None: no bound)."""
    first, last, *span = summary
    if first != 0:
        raise ValueError(f"offsets[0] must be 0, got {first}")
    if span and span[0] < 0:
        raise ValueError("offsets must be non-decreasing")
    if num_rows is not None and last > num_rows:
        raise ValueError(f"offsets[-1] = {last} exceeds the {num_rows} rows of keys")
    if max_len is not None and len(span) > 1 and span[1] > max_len:
        raise ValueError(f"max_len = {max_len} is smaller than the longest row ({span[1]})")


def offsets_valid(offsets: torch.Tensor, num_rows: int, max_len: Optional[int]) -> None:
    if tracing():
        return
    check_offsets(torch.stack(offsets_summary(offsets, max_len)).tolist(), num_rows, max_len)
