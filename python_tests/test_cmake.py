"""CMakeLists.txt builds the ops as a standalone libtorch library that torch.ops.load_library can load."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import din_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh interpreter: din_ext._C registers the same ops, so the library must be loaded without it.
SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.ops.load_library(sys.argv[1])
    inputs = torch.load(sys.argv[2])
    out, stats = torch.ops.din_ext.local_activation_attention(*inputs)
    torch.save(out, sys.argv[3])
""")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_library_builds_loads_and_runs(tmp_path):
    build = tmp_path / "build"
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=os.environ.get("MAX_JOBS", str(os.cpu_count() or 2)))
    subprocess.run(["cmake", "-S", ROOT, "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                    "-DCMAKE_BUILD_TYPE=Release"], check=True, capture_output=True, env=env)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True, env=env)
    library = build / "libdin_ext_ops.so"
    assert library.exists()

    torch.manual_seed(0)
    unit = din_ext.LocalActivationUnit(6, (8, 4), activation="sigmoid", normalization="softmax")
    query, keys = torch.randn(3, 6), torch.randn(9, 6)
    offsets = torch.tensor([0, 4, 4, 9])
    inputs = (query, keys, None, offsets[:-1], offsets.diff(), -1,
              [l.weight.detach() for l in unit.linears] + [unit.out.weight.detach()],
              [l.bias.detach() for l in unit.linears] + [unit.out.bias.detach()],
              torch.zeros(0, 12), "sigmoid", "softmax", 1.0, False, 1e-8)
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "run.py").write_text(SCRIPT)
    subprocess.run([sys.executable, str(tmp_path / "run.py"), str(library), str(tmp_path / "inputs.pt"),
                    str(tmp_path / "out.pt")], check=True, cwd=tmp_path)
    expected, _ = din_ext.reference.local_activation_attention(
        query, keys, inputs[6], inputs[7], inputs[8], offsets=offsets, activation="sigmoid", normalization="softmax")
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected)
