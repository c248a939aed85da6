"""Helpers shared by din_ext's Triton kernels: @triton.jit device functions and the interpreter switch."""

from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """Whether Triton runs its kernels as Python (TRITON_INTERPRET=1, the CPU test mode)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def sigmoid(x):
    """Logistic function without overflow: exp of a non-positive argument only."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0, e) / (1.0 + e)
