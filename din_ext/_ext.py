"""Loads the compiled extension din_ext._C, whose import registers the C++ ops in torch.ops.din_ext (which kernels
it holds per op: din_ext._backend)."""

from __future__ import annotations

import logging

import torch  # noqa: F401  (loads libtorch before the extension that links it)

logger = logging.getLogger("din_ext")

try:
    from din_ext import _C  # noqa: F401  (registers torch.ops.din_ext.*)

    CPP_ERROR = None
except ImportError as exc:  # a Python-only install (DIN_EXT_SKIP_CPP=1) or a broken build
    _C = None
    CPP_ERROR = exc
    logger.debug("din_ext._C not loaded: %s", exc)

BUILD_HINT = (
    "reinstall din_ext with its C++ extension: `pip install --no-build-isolation .` from a checkout, with torch "
    "installed first and without DIN_EXT_SKIP_CPP=1"
)


def has_cpp() -> bool:
    """Whether the C++ ops (the cpu backend) were built and loaded."""
    return _C is not None


def require_cpp(backend: str) -> None:
    if not has_cpp():
        raise RuntimeError(f"din_ext backend {backend!r} needs the compiled extension din_ext._C, which failed to "
                           f"load ({CPP_ERROR}); {BUILD_HINT}")
