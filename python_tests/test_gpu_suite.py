"""The GPU suite's stage logic (bench/gpu_suite.sh, dry run: no GPU, a faked build) and the static report's
occupancy arithmetic (bench/static_report.py), on the CPU.

Stage 2 must reuse stage 1's build on a warm machine (its stamp matches), unpack a carried build on a fresh one, and
rebuild when there is neither or the carried one is stale; each stage writes its own results to $OUT.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import static_report as S  # noqa: E402


# A stand-in for python3: the suite's logic is bash; its python calls (versions, the extension's import check, the
# tests) answer at once here. The real dry run (GPU_SUITE_DRY_RUN=1 bash bench/gpu_suite.sh 1, then 2) runs them.
FAKE_PYTHON = """#!/usr/bin/env bash
case "$*" in
  "-m pytest"*) echo "2 passed in 0.01s" ;;
  *"print('python'"*) printf 'python 3 torch 0.0 cuda None gpu None , triton 0\\n0.0 None\\nno-gpu\\n' ;;
  *has_cpp*) exit 0 ;;
  *available_backends*) echo "backends: ['reference']" ;;
  *) echo "unexpected python call: $*" >&2; exit 1 ;;
esac
"""


def suite(stage, tmp_path, state, out, carried=None):
    """Run one dry-run stage; the faked build appends a line to builds.txt. Returns the script's output."""
    os.makedirs(out, exist_ok=True)
    python = tmp_path / "python"
    if not python.exists():
        python.write_text(FAKE_PYTHON)
        python.chmod(0o755)
    env = dict(os.environ, GPU_SUITE_DRY_RUN="1", GPU_SUITE_SKIP_BENCH="1", PYTHON=str(python), OUT=str(out),
               GPU_SUITE_STATE=str(state), GPU_SUITE_CARRIED=str(carried or tmp_path / "nothing"),
               GPU_SUITE_BUILD_CMD=f"echo built >> {tmp_path / 'builds.txt'}", DIN_EXT_COMMIT="test")
    result = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_suite.sh"), stage], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def builds(tmp_path):
    path = tmp_path / "builds.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("sha256sum") is None, reason="needs bash, coreutils")
def test_stages_reuse_carry_or_rebuild(tmp_path):
    warm = tmp_path / "warm"
    log = suite("1", tmp_path, warm, tmp_path / "out1")
    assert builds(tmp_path) == 1
    assert sorted(os.listdir(tmp_path / "out1")) == ["build.log", "din_ext_build.tar.gz", "dry-run_tests.md",
                                                     "tests.log"], log
    summary = (tmp_path / "out1" / "dry-run_tests.md").read_text()
    assert "2 passed" in summary and "built in" in summary, summary
    with tarfile.open(tmp_path / "out1" / "din_ext_build.tar.gz") as tar:
        assert "./stamp" in tar.getnames()

    # Stage 2 on the warm machine: no rebuild, stage 1's summary carried into the results.
    log = suite("2", tmp_path, warm, tmp_path / "out2")
    assert builds(tmp_path) == 1, log
    result = (tmp_path / "out2" / "dry-run.md").read_text()
    assert "reused stage 1's build" in result and "stage 1 (this machine)" in result, result
    assert "build.log" not in os.listdir(tmp_path / "out2")

    # A fresh machine with stage 1's build carried: unpacked, not rebuilt.
    carried = tmp_path / "carried"
    carried.mkdir()
    shutil.copy(tmp_path / "out1" / "din_ext_build.tar.gz", carried)
    log = suite("2", tmp_path, tmp_path / "fresh1", tmp_path / "out3", carried)
    assert builds(tmp_path) == 1, log
    assert "unpacked the carried build" in (tmp_path / "out3" / "dry-run.md").read_text()

    # A fresh machine with nothing carried, or a stale carried build: rebuilt.
    suite("2", tmp_path, tmp_path / "fresh2", tmp_path / "out4")
    assert builds(tmp_path) == 2
    stale = tmp_path / "stale"
    (stale / "content").mkdir(parents=True)
    (stale / "content" / "stamp").write_text("0000000000000000\n")
    with tarfile.open(stale / "din_ext_build.tar.gz", "w:gz") as tar:
        tar.add(stale / "content" / "stamp", arcname="./stamp")
    log = suite("2", tmp_path, tmp_path / "fresh3", tmp_path / "out5", stale)
    assert builds(tmp_path) == 3 and "does not match" in log, log
    assert "no current build on this machine" in (tmp_path / "out5" / "dry-run.md").read_text()


def test_occupancy_sm90():
    # 256 threads, 64 registers: 2048 registers a warp, 8 warps a sub-partition, 32 warps: 4 blocks, 50%.
    occ = S.occupancy(256, 64, 0)
    assert (occ.blocks, occ.limiter, occ.warps) == (4, "regs", 32)
    # 255 registers: 8192 a warp (granularity 256), 2 warps a sub-partition: one 8-warp block.
    assert S.occupancy(256, 255, 0).blocks == 1
    # 32 registers, 128 threads: thread-limited at 16 blocks (2048 threads), 100%.
    occ = S.occupancy(128, 32, 0)
    assert (occ.blocks, occ.fraction) == (16, 1.0)
    # Shared memory: 80960 B + 1 KB reserved, rounded to 128 B, twice in 228 KB; more than 227 KB cannot launch.
    assert (S.occupancy(256, 32, 80960).blocks, S.occupancy(256, 32, 80960).limiter) == (2, "smem")
    assert S.occupancy(256, 32, 227 * 1024 + 1).blocks == 0
    # Small blocks: at most 32 per SM.
    assert S.occupancy(32, 16, 0).blocks == 32


def test_ptxas_log_and_names():
    log = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    296 bytes stack frame, 80 bytes spill stores, 152 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 1024 bytes smem, 296 bytes cumulative stack size
"""
    (entry,) = S.parse_ptxas(log)
    assert (entry.regs, entry.stack, entry.spill_stores, entry.spill_loads, entry.smem, entry.barriers) == (
        64, 296, 80, 152, 1024, 1)
    assert entry.spills
    name = ("void din_ext::cuda::(anonymous namespace)::pool_kernel<c10::BFloat16, float, false>"
            "(din_ext::cuda::(anonymous namespace)::Net<float>, long)")
    assert S.short_name(name) == ("pool_kernel", "pool_kernel<bf16,fp32,F>")
    assert S.short_name("void din_ext::cuda::sum_rows_kernel<double>(double const*, long)") == (
        "sum_rows_kernel", "sum_rows_kernel<fp64>")
