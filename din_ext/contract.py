"""The op contract, written once: activation names and ids, normalizations, packed parameter rows, the Dice row order.

Every layer imports these facts from here (reference, modules, model, ops, kernels' launchers, CLI). The C++ code
keeps its own enum (csrc/common.h); python_tests check that the two agree. docs/design.md explains the layout.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

# Activation of the hidden layers of the local activation unit (and of DIN's tower), with the id the kernels use.
ACTIVATION_IDS: Dict[str, int] = {"dice": 0, "sigmoid": 1, "prelu": 2, "relu": 3}
ACTIVATIONS: Tuple[str, ...] = tuple(ACTIVATION_IDS)
NORMALIZATIONS: Tuple[str, ...] = ("none", "softmax")

# Rows of the packed activation parameters act_params [P, sum(H_i)], per activation.
DICE_ROWS: Tuple[str, ...] = ("alpha", "gamma", "beta", "running_mean", "running_var")
PRELU_ROWS: Tuple[str, ...] = ("slope",)
ACT_PARAM_ROWS: Dict[str, int] = {"dice": len(DICE_ROWS), "prelu": len(PRELU_ROWS), "sigmoid": 0, "relu": 0}
DICE_ALPHA, DICE_GAMMA, DICE_BETA, DICE_RUNNING_MEAN, DICE_RUNNING_VAR = range(len(DICE_ROWS))
(PRELU_SLOPE,) = range(len(PRELU_ROWS))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The ops' accumulation dtype for inputs of ``dtype``: float64 for float64, float32 otherwise. It is also the
    dtype of MBA's reg and of the triton attention's lse."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_activation(activation: str, name: str = "activation") -> str:
    """Raises ValueError naming the argument unless ``activation`` is one of ACTIVATIONS."""
    if activation not in ACTIVATION_IDS:
        raise ValueError(f"{name} must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


def check_normalization(normalization: str, name: str = "normalization") -> str:
    """Raises ValueError naming the argument unless ``normalization`` is one of NORMALIZATIONS."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"{name} must be one of {NORMALIZATIONS}, got {normalization!r}")
    return normalization
