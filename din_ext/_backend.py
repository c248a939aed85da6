"""Backend selection: an explicit ``backend=`` argument, then ``use_backend(...)``, then ``DIN_EXT_BACKEND``."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, List, Optional

import torch

from din_ext import _ext

logger = logging.getLogger("din_ext")

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")

_stack: List[str] = []
_warned: set = set()


def _check_name(name: str, what: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name


_ENV_DEFAULT = _check_name(os.environ.get("DIN_EXT_BACKEND", "auto").strip() or "auto", "DIN_EXT_BACKEND")


def has_triton() -> bool:
    """Whether din_ext's Triton kernels are importable (triton installed and the kernels shipped)."""
    try:
        from din_ext.kernels import attention as _kernels  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends(device: Optional[torch.device] = None) -> List[str]:
    """The backends built into this install that can run on ``device`` (default: any device present)."""
    devices = [torch.device(device)] if device is not None else [torch.device("cpu")] + (
        [torch.device("cuda")] if torch.cuda.is_available() else []
    )
    names = ["reference"]
    if _ext.has_cpp() and any(d.type == "cpu" for d in devices):
        names.append("cpu")
    if _ext.has_cuda_kernels() and any(d.type == "cuda" for d in devices):
        names.append("cuda")
    if has_triton() and any(d.type == "cuda" for d in devices):
        names.append("triton")
    return names


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: din_ext ops and layers whose backend is "auto" use ``name`` inside the block."""
    _stack.append(_check_name(name, "backend"))
    try:
        yield
    finally:
        _stack.pop()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def requested(backend: str) -> str:
    """The backend asked for: ``backend`` itself, or for "auto" the ``use_backend(...)`` / DIN_EXT_BACKEND default
    (which may be "auto" again)."""
    name = _check_name(backend, "backend")
    if name == "auto":
        name = _stack[-1] if _stack else _ENV_DEFAULT
    return name


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend that runs for tensors on ``device``; raises if the one asked for cannot."""
    name = requested(backend)
    if name == "auto":
        if device.type == "cpu":
            if _ext.has_cpp():
                return "cpu"
            _warn_once("cpu", f"din_ext: no compiled cpu backend ({_ext.CPP_ERROR}); running the slow pure-PyTorch "
                              f"reference instead. To get the fused kernels, {_ext.BUILD_HINT}.")
            return "reference"
        if device.type == "cuda":
            if has_triton():
                return "triton"
            if _ext.has_cuda_kernels():
                return "cuda"
            _warn_once("cuda", "din_ext: neither the cuda nor the triton backend is available; running the slow "
                               "pure-PyTorch reference on the GPU. Install triton, or build din_ext against a CUDA "
                               "build of torch with nvcc on PATH (or FORCE_CUDA=1).")
            return "reference"
        _warn_once(device.type, f"din_ext: no fused backend for device type {device.type!r}; using the reference")
        return "reference"
    if name == "cpu":
        _ext.require_cpp("cpu")
        if device.type != "cpu":
            raise RuntimeError(f"din_ext backend 'cpu' runs on CPU tensors, got tensors on {device}; use "
                               f"backend='auto', 'cuda' or 'triton' for GPU tensors")
    elif name == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f"din_ext backend 'cuda' runs on CUDA tensors, got tensors on {device}")
        if not _ext.has_cuda_kernels():
            raise RuntimeError("din_ext backend 'cuda' was not built: build din_ext against a CUDA build of torch "
                               "with nvcc on PATH (or set FORCE_CUDA=1), e.g. `pip install --no-build-isolation .`")
    elif name == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"din_ext backend 'triton' runs on CUDA tensors (or on the CPU with "
                               f"TRITON_INTERPRET=1), got tensors on {device}")
        if not has_triton():
            raise RuntimeError("din_ext backend 'triton' is not available: `pip install triton`")
    return name
