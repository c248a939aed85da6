"""Input checks with messages that name the argument; they run before any kernel.

Checks of tensor *values* (lengths in range, offsets non-decreasing, ids in range) read the data, which on a GPU
means a synchronization; they are skipped while torch.compile traces (the compiled kernels check what they can).
"""

from __future__ import annotations

import math
from typing import Optional

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


def positive_finite(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def lengths_in_range(lengths: torch.Tensor, max_len: int) -> None:
    if tracing() or lengths.numel() == 0:
        return
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 0:
        raise ValueError(f"lengths must be >= 0, got a length of {lo}")
    if hi > max_len:
        raise ValueError(f"lengths must be <= L = {max_len} (keys.shape[1]), got a length of {hi}")


def offsets_valid(offsets: torch.Tensor, num_rows: int, max_len: Optional[int]) -> None:
    if tracing():
        return
    if int(offsets[0]) != 0:
        raise ValueError(f"offsets[0] must be 0, got {int(offsets[0])}")
    steps = offsets[1:] - offsets[:-1]
    if steps.numel() and int(steps.min()) < 0:
        raise ValueError("offsets must be non-decreasing")
    if int(offsets[-1]) > num_rows:
        raise ValueError(f"offsets[-1] = {int(offsets[-1])} exceeds the {num_rows} rows of keys")
    if max_len is not None and steps.numel() and int(steps.max()) > max_len:
        raise ValueError(f"max_len = {max_len} is smaller than the longest row ({int(steps.max())})")
