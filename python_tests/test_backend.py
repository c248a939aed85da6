"""Backend selection: available_backends, use_backend, DIN_EXT_BACKEND, backend=, and the errors that say why."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

import din_ext
from din_ext import _backend, _ext
from conftest import requires_cpp


def test_available_backends():
    names = din_ext.available_backends()
    assert names[0] == "reference"
    assert ("cpu" in names) == _ext.has_cpp()
    assert din_ext.available_backends(torch.device("cpu")) == [n for n in names if n in ("reference", "cpu")]


@requires_cpp
def test_auto_picks_cpu_and_use_backend_overrides():
    cpu = torch.device("cpu")
    assert _backend.resolve("auto", cpu) == "cpu"
    with din_ext.use_backend("reference"):
        assert _backend.resolve("auto", cpu) == "reference"
        assert _backend.resolve("cpu", cpu) == "cpu"  # an explicit backend= wins over the context
        with din_ext.use_backend("cpu"):
            assert _backend.resolve("auto", cpu) == "cpu"
        assert _backend.resolve("auto", cpu) == "reference"
    assert _backend.resolve("auto", cpu) == "cpu"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        with din_ext.use_backend("fastest"):
            pass


def test_gpu_backends_refuse_cpu_tensors():
    with pytest.raises(RuntimeError, match="'cuda' runs on CUDA tensors"):
        _backend.resolve("cuda", torch.device("cpu"))
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="'triton' runs on CUDA tensors"):
            _backend.resolve("triton", torch.device("cpu"))


@requires_cpp
def test_cpu_backend_refuses_gpu_tensors():
    with pytest.raises(RuntimeError, match="'cpu' runs on CPU tensors"):
        _backend.resolve("cpu", torch.device("cuda"))


def test_missing_extension_says_how_to_build(monkeypatch, caplog):
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "CPP_ERROR", ImportError("not built"))
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        _backend.resolve("cpu", torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="din_ext"):
        assert _backend.resolve("auto", torch.device("cpu")) == "reference"
    assert "slow pure-PyTorch reference" in caplog.text  # the fallback is announced, never silent


def test_env_variable_sets_default():
    code = "import torch, din_ext; from din_ext import _backend; print(_backend.resolve('auto', torch.device('cpu')))"
    env = dict(os.environ, DIN_EXT_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["DIN_EXT_BACKEND"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "DIN_EXT_BACKEND must be one of" in bad.stderr


@requires_cpp
def test_module_backend_argument_is_used(monkeypatch):
    calls = []
    real = torch.ops.din_ext.local_activation_attention

    unit = din_ext.LocalActivationUnit(4, (5,), backend="reference")
    q, k, l = torch.randn(2, 4), torch.randn(2, 3, 4), torch.tensor([3, 1])
    monkeypatch.setattr(din_ext.reference, "local_activation_attention",
                        lambda *a, **kw: calls.append("reference") or (torch.zeros(2, 4), torch.zeros(2, 5)))
    unit(q, k, l)
    assert calls == ["reference"]
    unit.backend = "cpu"
    out = unit(q, k, l)
    assert calls == ["reference"] and out.shape == (2, 4) and real is torch.ops.din_ext.local_activation_attention
