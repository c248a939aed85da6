"""`python -m din_ext`: the self-check table of every built backend against the reference."""

from __future__ import annotations

import subprocess
import sys

import torch

import din_ext
from din_ext.selfcheck import CASES, check_backend
from conftest import requires_cpp


def test_self_check_runs_and_passes():
    result = subprocess.run([sys.executable, "-m", "din_ext", "selfcheck"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "available backends: " + ", ".join(din_ext.available_backends()) in result.stdout
    for backend in din_ext.available_backends()[1:]:
        assert result.stdout.count(f"\n{backend:<8} ") == len(CASES)
    assert "FAIL" not in result.stdout


@requires_cpp
def test_self_check_detects_a_wrong_backend(monkeypatch):
    """The check can fail: a backend that is off by a little is reported."""
    import din_ext.ops.attention as attention

    real = attention.local_activation_attention

    def skewed(*args, **kwargs):
        out, stats = real(*args, **kwargs)
        return (out * (1 + 1e-6) if kwargs["backend"] == "cpu" else out), stats

    monkeypatch.setattr("din_ext.modules.ops.local_activation_attention", skewed)
    rows = check_backend("cpu", torch.device("cpu"))
    assert not any(ok for *_, ok in rows)
