"""The cpu kernels' builds below this processor's widest: DIN_EXT_CPU_ISA caps the instruction set they dispatch to
(csrc/cpu/kernels.cpp), so the AVX2 and baseline builds, which an AVX-512 machine never picks by itself, run the
cpu conformance tests (forward and every gradient against din_ext.reference, gradcheck, zero-length rows, L=1,
determinism) in a process of their own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import requires_cpp

HERE = os.path.dirname(os.path.abspath(__file__))
# The files whose cpu tests run every kernel that has an AVX2 or AVX-512 build: attention (one and many candidates,
# both layer-1 forms, stored and recomputed backward), Dice, MBA and the training step's row-wise optimizer.
CONFORMANCE = ["test_attention.py", "test_attention_cpu_short.py", "test_attention_multi.py", "test_dice.py",
               "test_mba.py", "test_training_step.py"]


def _run(isa: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DIN_EXT_CPU_ISA": isa, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], env=env, cwd=HERE, capture_output=True, text=True, timeout=900)


@requires_cpp
def test_the_cap_is_what_runs():
    native = torch.ops.din_ext._cpu_isa()
    assert native in ("avx512", "avx2", "base")
    order = ["base", "avx2", "avx512"]
    for isa in order:
        done = _run(isa, "-c", "import din_ext, torch; print(torch.ops.din_ext._cpu_isa())")
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == order[min(order.index(isa), order.index(native))]
    done = _run("sse", "-c", "import din_ext, torch; torch.ops.din_ext._cpu_isa()")
    assert done.returncode != 0 and "DIN_EXT_CPU_ISA must be one of auto, avx512, avx2, base; got 'sse'" in done.stderr


@requires_cpp
@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_capped_builds_pass_the_cpu_conformance_tests(isa):
    native = torch.ops.din_ext._cpu_isa()
    if ["base", "avx2", "avx512"].index(native) <= ["base", "avx2", "avx512"].index(isa):
        pytest.skip(f"this processor's widest build is {native}: the main run already tests it")
    done = _run(isa, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "not triton and not cuda",
                *CONFORMANCE)
    assert done.returncode == 0, done.stdout[-4000:]
    assert " passed" in done.stdout.splitlines()[-1]
