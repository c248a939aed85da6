"""The backend and capability layer: which backend runs an op (an explicit ``backend=`` argument, then
``use_backend(...)``, then ``DIN_EXT_BACKEND``), and which kernels this install has, per op."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from typing import Dict, Iterator, List, Optional

import torch

from din_ext import _ext

logger = logging.getLogger("din_ext")

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
# Every op: its name in torch.ops.din_ext (C++ schema, csrc/) and its Triton module under din_ext/kernels/.
OPS = {"local_activation_attention": "attention", "dice": "dice", "mba_embedding": "mba"}
DEFAULT_OP = "local_activation_attention"  # the op a resolve() without one is about (DIN's attention)

_stack: List[str] = []
_warned: set = set()
_triton_found: Dict[Optional[str], bool] = {}


def _check_name(name: str, what: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name


_ENV_DEFAULT = _check_name(os.environ.get("DIN_EXT_BACKEND", "auto").strip() or "auto", "DIN_EXT_BACKEND")


def has_triton(op: Optional[str] = None) -> bool:
    """Whether the Triton kernels of ``op`` import (triton installed, din_ext.kernels shipped); None: any op's."""
    if op not in _triton_found:  # a dict, not lru_cache: torch.compile traces it, and then reads the dict only
        try:
            importlib.import_module(f"din_ext.kernels.{OPS[op] if op else 'common'}")
            _triton_found[op] = True
        except ImportError:
            _triton_found[op] = False
    return _triton_found[op]


def has_cuda_kernel(op: Optional[str] = None) -> bool:
    """Whether din_ext._C was compiled with the CUDA kernel of ``op``; None: of any op (the cuda backend was built)."""
    if not _ext.has_cpp():
        return False
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(f"din_ext::{name}", "CUDA")
               for name in ([op] if op else OPS))


def available_backends(device: Optional[torch.device] = None, op: Optional[str] = None) -> List[str]:
    """The backends built into this install that can run ``op`` (default: any op) on ``device`` (default: any
    device present)."""
    devices = [torch.device(device)] if device is not None else [torch.device("cpu")] + (
        [torch.device("cuda")] if torch.cuda.is_available() else []
    )
    names = ["reference"]
    if _ext.has_cpp() and any(d.type == "cpu" for d in devices):
        names.append("cpu")
    if has_cuda_kernel(op) and any(d.type == "cuda" for d in devices):
        names.append("cuda")
    if has_triton(op) and any(d.type == "cuda" for d in devices):
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


def resolve(backend: str, device: torch.device, op: str = DEFAULT_OP) -> str:
    """The concrete backend that runs ``op`` (a key of OPS) for tensors on ``device``; raises if the one asked for
    cannot."""
    name = requested(backend)
    if name == "auto":
        if device.type == "cpu":
            if _ext.has_cpp():
                return "cpu"
            _warn_once("cpu", f"din_ext: no compiled cpu backend ({_ext.CPP_ERROR}); running the slow pure-PyTorch "
                              f"reference instead. To get the fused kernels, {_ext.BUILD_HINT}.")
            return "reference"
        if device.type == "cuda":
            if has_triton(op):
                return "triton"
            if has_cuda_kernel(op):
                return "cuda"
            if has_cuda_kernel():
                _warn_once(f"cuda-{op}", f"din_ext: the cuda backend was built without {op} and triton is not "
                                         f"installed; running the slow pure-PyTorch reference on the GPU")
            else:
                _warn_once("cuda", "din_ext: neither the cuda nor the triton backend is available; running the slow "
                                   "pure-PyTorch reference on the GPU. Install triton, or build din_ext against a "
                                   "CUDA build of torch with nvcc on PATH (or FORCE_CUDA=1).")
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
        if not has_cuda_kernel(op):
            if has_cuda_kernel():
                raise RuntimeError(f"din_ext backend 'cuda' was built without the {op} kernel; use "
                                   f"backend='triton' (pip install triton)")
            raise RuntimeError("din_ext backend 'cuda' was not built: build din_ext against a CUDA build of torch "
                               "with nvcc on PATH (or set FORCE_CUDA=1), e.g. `pip install --no-build-isolation .`")
    elif name == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"din_ext backend 'triton' runs on CUDA tensors (or on the CPU with "
                               f"TRITON_INTERPRET=1), got tensors on {device}")
        if not has_triton(op):
            raise RuntimeError("din_ext backend 'triton' is not available: `pip install triton`")
    return name
