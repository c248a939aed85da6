#!/usr/bin/env bash
# GPU suite, in ONE call on a lent GPU machine (at most 10 minutes): build din_ext there against the machine's torch,
# run the whole test suite on CUDA, run the GPU benchmark (eager reference, torch.compile(reference), every built
# GPU backend), and write bench/results/<device>.md (device, versions, date, commit, test summary, benchmark table).
#
#   DIN_EXT_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_suite.sh      # on the device machine
#
# Every phase is time-boxed against GPU_SUITE_SECONDS (default 560, inside the 600 s limit of one device call): the
# tests get what the build leaves minus the benchmark's reserve, and the benchmark skips the shapes it has no time
# for and says so in its table. Logs and the results file are also copied to $OUT (the folder the device tool brings
# back) when it is set. GPU_SUITE_DRY_RUN=1 checks the script's own logic on a machine without a GPU: no build, a
# few tests, the benchmark's CPU smoke run.
set -uo pipefail
cd "$(dirname "$0")/.."

TOTAL=${GPU_SUITE_SECONDS:-560}
BENCH_RESERVE=${GPU_SUITE_BENCH_SECONDS:-200}  # seconds kept for the benchmark
DRY=${GPU_SUITE_DRY_RUN:-0}
PY=${PYTHON:-python3}
START=$(date +%s)
left() { echo $((TOTAL - ($(date +%s) - START))); }
LOGS=${OUT:-$(mktemp -d)}
mkdir -p "$LOGS" bench/results
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if [ -z "${DIN_EXT_COMMIT:-}" ]; then
  DIN_EXT_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
fi
export DIN_EXT_COMMIT

echo "== GPU suite: commit $DIN_EXT_COMMIT, budget ${TOTAL}s, logs in $LOGS"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
$PY -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not installed"

# 1. Build against this machine's torch (nothing built elsewhere is used).
build_status="skipped (dry run)"
if [ "$DRY" != 1 ]; then
  budget=$(($(left) - BENCH_RESERVE - 120))
  echo "== build (at most ${budget}s)"
  if timeout "$budget" $PY -m pip install -q --no-build-isolation --no-deps -e . > "$LOGS/build.log" 2>&1; then
    build_status="ok in $(($(date +%s) - START))s"
  else
    build_status="FAILED (see build.log)"
    tail -30 "$LOGS/build.log"
  fi
fi
echo "build: $build_status"
$PY -c "import din_ext; print('backends on cuda:', din_ext.available_backends(__import__('torch').device('cuda'))
        if __import__('torch').cuda.is_available() else din_ext.available_backends())"

# 2. The whole test suite on CUDA (conftest adds every GPU backend); one autotuning config keeps compile time down.
tests_budget=$(($(left) - BENCH_RESERVE))
[ "$tests_budget" -lt 30 ] && tests_budget=30
parallel=()
if $PY -c "import xdist" 2>/dev/null && [ "$DRY" != 1 ]; then parallel=(-n 8); fi
selection=()
[ "$DRY" = 1 ] && selection=(-k "test_available_backends or test_unknown_backend_name")
echo "== tests (at most ${tests_budget}s) ${parallel[*]}"
DIN_EXT_TRITON_AUTOTUNE=0 timeout "$tests_budget" $PY -m pytest python_tests -q -rfE "${parallel[@]}" "${selection[@]}" \
  > "$LOGS/tests.log" 2>&1
tests_rc=$?
tests_summary=$(grep -E "^(=+ )?[0-9]+ (passed|failed|error)|(passed|failed|error).* in [0-9.]+s" "$LOGS/tests.log" | tail -1)
[ "$tests_rc" = 124 ] && tests_summary="TIMED OUT after ${tests_budget}s; last lines: $(tail -3 "$LOGS/tests.log" | tr '\n' ' ')"
[ -z "$tests_summary" ] && tests_summary="exit code $tests_rc (see tests.log)"
echo "tests: $tests_summary"
grep -E "^(FAILED|ERROR)" "$LOGS/tests.log" | head -40

# 3. Benchmark with whatever time is left, then the results file.
bench_budget=$(($(left) - 40))
[ "$bench_budget" -lt 20 ] && bench_budget=20
if [ "$DRY" = 1 ]; then
  device=dry-run
  bench_args=(--quick --out "$LOGS/bench.md")
else
  device=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
  bench_args=(--device cuda --dtype bfloat16 --seconds 0.3 --reps 3 --budget "$((bench_budget - 60))"
              --out "$LOGS/bench.md")
fi
# One Triton config per kernel unless asked (autotuning compiles every config of every new shape: minutes).
export DIN_EXT_TRITON_AUTOTUNE=${DIN_EXT_TRITON_AUTOTUNE:-0}
echo "== benchmark (at most ${bench_budget}s, DIN_EXT_TRITON_AUTOTUNE=$DIN_EXT_TRITON_AUTOTUNE): ${bench_args[*]}"
timeout "$bench_budget" $PY bench/bench_attention.py "${bench_args[@]}" > "$LOGS/bench.log" 2>&1
bench_rc=$?
[ "$bench_rc" = 124 ] && echo "benchmark stopped at its time limit: the table holds the rows it finished"
dice_budget=$(($(left) - 15))
if [ "$DRY" != 1 ] && [ "$dice_budget" -gt 15 ]; then
  [ "$dice_budget" -gt 60 ] && dice_budget=60
  echo "== Dice benchmark (at most ${dice_budget}s)"
  timeout "$dice_budget" $PY bench/bench_dice.py --device cuda --dtype bfloat16 --rows 65536 --seconds 0.3 \
    > "$LOGS/bench_dice.log" 2>&1 || echo "Dice benchmark: exit $? (see bench_dice.log)"
fi
result="bench/results/${device}.md"
[ "$DRY" = 1 ] && result="$LOGS/${device}.md"
{
  if [ -s "$LOGS/bench.md" ]; then
    cat "$LOGS/bench.md"
  else
    echo "# DIN attention benchmark (cuda)"
    echo
    echo "- commit $DIN_EXT_COMMIT, $(date -u '+%Y-%m-%d %H:%M UTC'); the benchmark did not finish (exit $bench_rc);"
    echo "  the rows it printed:"
    echo
    grep "^|" "$LOGS/bench.log"
  fi
  echo
  echo "## GPU suite ($(date -u '+%Y-%m-%d %H:%M UTC'), commit $DIN_EXT_COMMIT)"
  echo
  echo "- build: $build_status"
  echo "- tests (\`DIN_EXT_TRITON_AUTOTUNE=0 pytest python_tests\`, CUDA): $tests_summary"
  echo "- benchmark: exit $bench_rc; \`DIN_EXT_TRITON_AUTOTUNE=$DIN_EXT_TRITON_AUTOTUNE python bench/bench_attention.py ${bench_args[*]}\`"
  if [ -s "$LOGS/bench_dice.log" ]; then
    echo
    echo "## Dice op (\`python bench/bench_dice.py --device cuda --dtype bfloat16 --rows 65536\`)"
    echo
    echo '```'
    cat "$LOGS/bench_dice.log"
    echo '```'
  fi
} > "$result"
[ -n "${OUT:-}" ] && cp "$result" "$OUT/" 2>/dev/null
echo "== wrote $result after $(($(date +%s) - START))s"
grep "^|" "$result" | tail -25
