"""CMakeLists.txt builds the ops as a standalone libtorch library that torch.ops.load_library can load.

``built`` is the session's one build of CMakeLists.txt (minutes on 2 cores), shared with test_serve_cpp."""

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


def _missing_tool():
    """Why CMakeLists.txt cannot be built here (cmake or a C++ compiler missing), or None."""
    if shutil.which("cmake") is None:
        return "cmake is not installed"
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "c++", "g++", "clang++")):
        return "no C++ compiler (c++, g++, clang++ or $CXX) is installed"
    return None


_MISSING = _missing_tool()
requires_cmake = pytest.mark.skipif(_MISSING is not None, reason=str(_MISSING))
_BUILDS = {}


def _run(command, env):
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
    if done.returncode:
        pytest.fail(f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-4000:]}")


def built(tmp_path_factory):
    """The build folder of every CMakeLists.txt target (libdin_ext_ops.so, din_ext_serve), built once a session."""
    if "build" not in _BUILDS:
        build = tmp_path_factory.mktemp("cmake-build")
        env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=os.environ.get("MAX_JOBS", str(os.cpu_count() or 2)))
        _run(["cmake", "-S", ROOT, "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
              "-DCMAKE_BUILD_TYPE=Release"], env)
        _run(["cmake", "--build", str(build)], env)
        _BUILDS["build"] = build
    return _BUILDS["build"]


@pytest.mark.slow
@requires_cmake
def test_cmake_library_builds_loads_and_runs(tmp_path_factory, tmp_path):
    library = built(tmp_path_factory) / "libdin_ext_ops.so"
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
