#!/usr/bin/env bash
# GPU suite for a lent H200, in two calls of the device tool that each write their own results:
#   stage 1: build din_ext there (against the machine's torch, MAX_JOBS=16, sm_90) + the GPU correctness tests
#            (the cuda and triton backends' conformance, gradcheck, opcheck, torch.compile/export) -> <device>_tests.md
#   stage 2: the benchmarks (bench_attention.py --device cuda --budget; its variant rows: the fused Triton backward
#            and the CUDA tensor cores at L = 200; then bench_dice.py)                                   -> <device>.md
# Each stage is time-boxed to GPU_SUITE_SECONDS (default 210 s, inside the 4 minutes the issue gives a stage); `all`
# runs both in one call, each on its own clock.
#
# ---- What a GPU session runs (copy these; the device tool: /work/.library/device/README.md) -----------------------
# Device time: 15 minutes in all, every start (60-120 s, a bare machine) included; a machine goes back 30 s after a
# call, so a second call usually finds a fresh machine unless it is issued at once. Expected times: stage 1 <= 210 s
# (build ~90-150 s on 16 cores, the tests the rest), stage 2 <= 210 s (the main benchmark up to ~130 s, its two
# variant runs <= 40 s, the Dice benchmark <= 30 s, less a build if it must make one), transfers ~10-20 s a call.
#   Plan A (one start for both stages; the default): call 1 runs stage 1 then stage 2, each on its own 210 s clock,
#     each writing its own results:
#       run(command="DIN_EXT_COMMIT=<sha> bash bench/gpu_suite.sh all", timeout_s=460, carry=[])
#     then fix what failed and re-run only that stage (a fresh machine: stage 2 alone builds first, or unpacks
#     .gpu_build/din_ext_build.tar.gz, below, if the sources did not change):
#       run(command="DIN_EXT_COMMIT=<sha> bash bench/gpu_suite.sh 1", timeout_s=250, carry=[])          # or
#       run(command="DIN_EXT_COMMIT=<sha> bash bench/gpu_suite.sh 2", timeout_s=250, carry=[".gpu_build"])
#     then give_back(). Total: 90 + 430 + 15 + 90 + 220 + 15 = ~860 s of the 900.
#   Plan B (two calls): the same two commands, stage 1 then stage 2 (timeout_s=250 each). Before call 2, copy the
#     build stage 1 sent back into the tree: `mkdir -p .gpu_build && cp <files_at>/din_ext_build.tar.gz .gpu_build/`
#     (once: `echo /.gpu_build/ >> .git/info/exclude`) and carry it: if the machine is still warm, stage 2 reuses the
#     build there (build/gpu_suite/stamp: ignored build outputs persist between calls on a warm machine); if it is
#     fresh, it unpacks the carried build when its stamp (a hash of csrc/, setup.py, torch's version and the CUDA
#     architectures) matches, and rebuilds otherwise. Total with a fresh start each: 3 x (90 + 225) = ~945 s: too
#     much for a re-run as well, so prefer plan A unless call 2 follows at once.
# Files back ($OUT, at most 8; <device> is NVIDIA_H200): stage 1: <device>_tests.md (build + test summary),
#   build.log, tests.log, din_ext_build.tar.gz; stage 2: <device>.md (the benchmark table + the suite's summary),
#   bench.log, bench_dice.log, build.log (only if it built; in plan A's first call stage 1's is the one). Copy
#   <device>_tests.md and <device>.md from files_at into bench/results/ here (the machine keeps nothing).
# -------------------------------------------------------------------------------------------------------------------
#
# GPU_SUITE_DRY_RUN=1 checks the script's logic on a machine without a GPU: the build is faked (GPU_SUITE_BUILD_CMD,
# default `true` then), a few CPU tests run, the benchmark is its CPU smoke run; the stamp logic runs for real.
# Results of a dry run go to $OUT (or a temporary folder), never to bench/results/.
# Other knobs: GPU_SUITE_SECONDS, GPU_SUITE_BENCH_RESERVE, GPU_SUITE_VARIANT_SECONDS, GPU_SUITE_STATE
# (build/gpu_suite), GPU_SUITE_CARRIED (.gpu_build), GPU_SUITE_WORKERS (pytest-xdist workers, default 12), PYTHON,
# GPU_SUITE_SKIP_BENCH=1 (stage 2 without the benchmarks: python_tests/test_gpu_suite.py's dry runs).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

STAGE=${1:-all}
case "$STAGE" in 1|2|all) ;; *) echo "usage: bash bench/gpu_suite.sh 1|2|all" >&2; exit 2 ;; esac
TOTAL=${GPU_SUITE_SECONDS:-210}  # seconds per stage
DRY=${GPU_SUITE_DRY_RUN:-0}
PY=${PYTHON:-python3}
STATE=${GPU_SUITE_STATE:-build/gpu_suite}
CARRIED=${GPU_SUITE_CARRIED:-.gpu_build}
START=$(date +%s)
left() { echo $((TOTAL - ($(date +%s) - START))); }
mkdir -p "$STATE/logs" bench/results
LOGS="$STATE/logs"
OUTDIR=${OUT:-}
[ -z "$OUTDIR" ] && [ "$DRY" = 1 ] && OUTDIR=$(mktemp -d)
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # din_ext from this tree, whatever pip's state
# din_ext.kernels is kernels/ (setup.py's package_dir); the link lets the tree import it with no install at all (a
# carried build on a fresh machine). The link is git-ignored here, so it does not travel; a dry run leaves the tree
# as it is.
[ "${GPU_SUITE_DRY_RUN:-0}" = 1 ] || [ -e din_ext/kernels ] || ln -s ../kernels din_ext/kernels
export MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export DIN_EXT_TRITON_AUTOTUNE=${DIN_EXT_TRITON_AUTOTUNE:-0}  # one config per kernel: autotuning compiles minutes
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
if [ -z "${DIN_EXT_COMMIT:-}" ]; then
  DIN_EXT_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
fi
export DIN_EXT_COMMIT
now() { date -u '+%Y-%m-%d %H:%M UTC'; }
to_out() { [ -n "$OUTDIR" ] && for f in "$@"; do [ -f "$f" ] && cp "$f" "$OUTDIR/"; done; return 0; }

echo "== GPU suite stage $STAGE: commit $DIN_EXT_COMMIT, budget ${TOTAL}s, state in $STATE," \
  "results to ${OUTDIR:-bench/results}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
# One interpreter start for the versions (torch's import takes seconds): line 1 for the results, line 2 for the build's
# stamp, line 3 the device's name.
info=$($PY -c "
import sys, torch
try:
    import triton; tri = 'triton ' + triton.__version__
except ImportError:
    tri = 'triton: not installed'
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', gpu, ',', tri)
print(torch.__version__, torch.version.cuda)
print((gpu or 'no-gpu').replace(' ', '_'))")
versions=$(sed -n 1p <<< "$info" | sed 's/ ,/,/')
torch_version=$(sed -n 2p <<< "$info")
device=$(sed -n 3p <<< "$info")
[ "$DRY" = 1 ] && device=dry-run
echo "$versions"
publish() {  # $1: a results file in $STATE -> bench/results/$2 (not in a dry run) and $OUT/$2
  [ "$DRY" != 1 ] && cp "$1" "bench/results/$2"
  [ -n "$OUTDIR" ] && cp "$1" "$OUTDIR/$2"
  if [ "$DRY" = 1 ]; then echo "== wrote $OUTDIR/$2 (a dry run writes nothing to bench/results/)"
  else echo "== wrote bench/results/$2${OUTDIR:+ and $OUTDIR/$2}"; fi
}

# ---- the build, and whether the one on this machine is current -----------------------------------------------------
# The stamp: the sources that go into din_ext._C, torch's version and the CUDA architectures.
stamp() {
  { find csrc setup.py -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name '*.py' \) \
      -print0 | sort -z | xargs -0 sha256sum
    echo "$torch_version"
    echo "$TORCH_CUDA_ARCH_LIST"; } | sha256sum | cut -c1-16
}
build_ok() {  # the stamp matches and the extension imports
  [ -f "$STATE/stamp" ] && [ "$(cat "$STATE/stamp")" = "$(stamp)" ] &&
    (cd /tmp && $PY -c "import din_ext, sys; sys.exit(0 if din_ext._ext.has_cpp() else 1)" 2>/dev/null)
}
pack_build() {  # stamp + din_ext/_C*.so, for a later fresh machine (stage 2 unpacks it)
  [ -n "$OUTDIR" ] && [ -f "$STATE/stamp" ] || return 0
  local tmp
  tmp=$(mktemp -d)
  mkdir -p "$tmp/din_ext" && cp "$STATE/stamp" "$tmp/stamp" && cp din_ext/_C*.so "$tmp/din_ext/" 2>/dev/null
  # Without its debug sections: the build's .so carries them (the CPU-only one here: 30 MB, 1.1 MB stripped), and
  # the device tool returns no file over 16 MiB. The dynamic symbols stay, so the stripped copy loads the same.
  strip --strip-debug "$tmp"/din_ext/_C*.so 2>/dev/null || echo "(strip failed: the build is packed with its debug info)"
  tar -czf "$OUTDIR/din_ext_build.tar.gz" -C "$tmp" . && rm -rf "$tmp"
  local size
  size=$(stat -c %s "$OUTDIR/din_ext_build.tar.gz" 2>/dev/null || echo 0)
  [ "$size" -gt $((16 * 1024 * 1024)) ] && echo "din_ext_build.tar.gz is $size bytes: over the 16 MiB the device tool returns"
  return 0
}
build_status=""
do_build() {  # $1: seconds at most
  local t0 cmd
  t0=$(date +%s)
  if [ "$DRY" = 1 ]; then cmd=${GPU_SUITE_BUILD_CMD:-true}; else
    cmd=${GPU_SUITE_BUILD_CMD:-"$PY -m pip install -q --no-build-isolation --no-deps -e ."}; fi
  echo "== build (at most ${1}s): $cmd"
  rm -f "$STATE/stamp"
  if timeout "$1" bash -c "$cmd" > "$LOGS/build.log" 2>&1; then
    build_status="built in $(($(date +%s) - t0))s"
    stamp > "$STATE/stamp"
  else
    build_status="FAILED after $(($(date +%s) - t0))s (see build.log)"
    tail -30 "$LOGS/build.log"
  fi
  to_out "$LOGS/build.log"
}
ensure_build() {  # stage 2: reuse the warm machine's build, else a carried one, else build
  if build_ok; then
    build_status="reused stage 1's build on this machine (stamp $(cat "$STATE/stamp"))"
    return
  fi
  if [ -f "$CARRIED/din_ext_build.tar.gz" ]; then
    local tmp
    tmp=$(mktemp -d)
    tar -xzf "$CARRIED/din_ext_build.tar.gz" -C "$tmp"
    if [ "$(cat "$tmp/stamp" 2>/dev/null)" = "$(stamp)" ]; then
      for so in "$tmp"/din_ext/_C*.so; do  # a new file, then a rename: never overwrite a loaded library in place
        cp "$so" "din_ext/.$(basename "$so").tmp" && mv -f "din_ext/.$(basename "$so").tmp" "din_ext/$(basename "$so")"
      done
      cp "$tmp/stamp" "$STATE/stamp"
      if build_ok; then
        build_status="unpacked the carried build $CARRIED/din_ext_build.tar.gz (stamp $(cat "$STATE/stamp"))"
        return
      fi
    fi
    echo "the carried build does not match these sources or this torch: rebuilding"
  fi
  local budget=$(($(left) - 60))
  [ "$budget" -lt 30 ] && budget=30
  do_build "$budget"
  build_status="no current build on this machine: $build_status"
}

# ---- stage 1: build + correctness tests ------------------------------------------------------------------------------
stage1() {
  do_build $(($(left) - 60))
  pack_build
  echo "build: $build_status"
  $PY -c "import torch, din_ext; print('backends on cuda:', din_ext.available_backends(torch.device('cuda'))
          if torch.cuda.is_available() else din_ext.available_backends())"
  # The GPU backends' tests: conformance against the reference (test_attention, test_attention_multi, test_dice,
  # test_mba: cuda and triton parametrizations), the cuda/triton files (gradcheck, opcheck, torch.compile,
  # torch.export, determinism, low precision, the Triton launch configs per D, split = fused backward), backend
  # resolution. The cpu backend's parametrizations are left to CI.
  local files=(test_attention_cuda.py test_attention_triton.py test_attention_multi_triton.py test_attention.py
               test_attention_multi.py test_dice_cuda.py test_dice_triton.py test_dice.py test_mba_triton.py
               test_mba.py test_backend.py)
  local selection=(-k "not cpu-cpu")
  local parallel=()
  [ "$DRY" = 1 ] && { files=(test_backend.py); selection=(-k "test_available_backends or test_unknown_backend_name"); }
  if [ "$DRY" != 1 ] && $PY -c "import xdist" 2>/dev/null; then parallel=(-n "${GPU_SUITE_WORKERS:-12}"); fi
  local budget=$(($(left) - 15))
  [ "$budget" -lt 20 ] && budget=20
  echo "== tests (at most ${budget}s) ${parallel[*]}: ${files[*]} ${selection[*]}"
  # SIGINT first: pytest stops and still prints its summary of what ran.
  timeout -s INT -k 10 "$budget" $PY -m pytest "${files[@]/#/python_tests/}" -q -rfE --durations=10 "${parallel[@]}" \
    "${selection[@]}" -p no:cacheprovider > "$LOGS/tests.log" 2>&1
  local rc=$?
  tests_summary=$(grep -E "(passed|failed|error|skipped|deselected).* in [0-9.]+s" "$LOGS/tests.log" | tail -1)
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && tests_summary="STOPPED at the ${budget}s limit (exit $rc): $tests_summary"
  [ -z "$tests_summary" ] && tests_summary="exit code $rc (see tests.log)"
  echo "tests: $tests_summary"
  grep -E "^(FAILED|ERROR)" "$LOGS/tests.log" | head -40
  {
    echo "# GPU suite stage 1: build and correctness tests ($device)"
    echo
    echo "- $(now), commit $DIN_EXT_COMMIT; $versions"
    echo "- build (\`MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST pip install -e .\`): $build_status"
    echo "- tests (\`DIN_EXT_TRITON_AUTOTUNE=0 pytest ${files[*]} ${selection[*]} ${parallel[*]}\`): $tests_summary"
    echo "- stage 1 took $(($(date +%s) - START))s of its ${TOTAL}s"
    if grep -qE "^(FAILED|ERROR)" "$LOGS/tests.log"; then
      echo; echo '```'; grep -E "^(FAILED|ERROR)" "$LOGS/tests.log" | head -60; echo '```'
    fi
    echo; echo "Slowest tests:"; echo; echo '```'
    sed -n '/slowest .*durations/,/^$/p' "$LOGS/tests.log" | head -14; echo '```'
  } > "$STATE/stage1.md"
  publish "$STATE/stage1.md" "${device}_tests.md"
  to_out "$LOGS/tests.log"
}

# ---- stage 2: benchmarks ---------------------------------------------------------------------------------------------
stage2() {
  if [ "$STAGE" = all ]; then build_status="stage 1's build (same call)"; else ensure_build; fi
  echo "build: $build_status"
  local reserve=${GPU_SUITE_BENCH_RESERVE:-30}  # seconds kept for the Dice benchmark and the results file
  local variant_seconds=${GPU_SUITE_VARIANT_SECONDS:-40}  # the two variant runs below, together
  local budget=$(($(left) - reserve - variant_seconds - 10))
  [ "$budget" -lt 20 ] && budget=20
  local bench_args
  if [ "$DRY" = 1 ]; then
    bench_args=(--quick --out "$LOGS/bench.md")
  else
    # --budget: no new shape starts after it; the margin is the longest shape (4 implementations, 3 modes).
    bench_args=(--device cuda --dtype bfloat16 --seconds 0.3 --reps 3 --budget "$((budget * 3 / 4))"
                --out "$LOGS/bench.md")
  fi
  rm -f "$LOGS/bench.md" "$LOGS/bench_dice.log"
  if [ "${GPU_SUITE_SKIP_BENCH:-0}" = 1 ]; then bench_args=(--skipped-by GPU_SUITE_SKIP_BENCH=1); fi
  echo "== benchmark (at most ${budget}s, DIN_EXT_TRITON_AUTOTUNE=$DIN_EXT_TRITON_AUTOTUNE): ${bench_args[*]}"
  local rc=0
  if [ "${GPU_SUITE_SKIP_BENCH:-0}" = 1 ]; then echo "(skipped)" > "$LOGS/bench.log"; else
    timeout -k 5 "$budget" $PY bench/bench_attention.py "${bench_args[@]}" > "$LOGS/bench.log" 2>&1
    rc=$?
  fi
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "benchmark stopped at its time limit: the table holds the rows it finished"
  # Variants of two backends, against the main table's rows of the same shapes (L = 200, D = 32 and 64): the Triton
  # backward as one fused kernel instead of the split one (DIN_EXT_TRITON_SPLIT_BACKWARD=0; it compiles one more
  # kernel per D), and the CUDA tensor-core path (DIN_EXT_CUDA_TENSOR_CORES=1) instead of FMA. A dry run proves the
  # plumbing with the eager row of the CPU smoke run.
  local variants=("DIN_EXT_TRITON_SPLIT_BACKWARD=0 triton" "DIN_EXT_CUDA_TENSOR_CORES=1 cuda")
  local variant_args=(--device cuda --dtype bfloat16 --seconds 0.3 --reps 3 --lengths 200 --modes train-fwd train)
  [ "$DRY" = 1 ] && variant_args=(--quick)
  rm -f "$LOGS"/variant_*
  if [ "${GPU_SUITE_SKIP_BENCH:-0}" != 1 ]; then
    local i=0 setting impl vrc
    for variant in "${variants[@]}"; do
      setting=${variant% *}
      impl=${variant#* }
      [ "$DRY" = 1 ] && impl=eager
      i=$((i + 1))
      echo "== variant $setting (at most $((variant_seconds / 2))s): --impls $impl ${variant_args[*]}"
      env "$setting" timeout -k 5 $((variant_seconds / 2)) $PY bench/bench_attention.py --impls "$impl" \
        "${variant_args[@]}" --out "$LOGS/variant_$i.md" > "$LOGS/variant_$i.log" 2>&1
      vrc=$?
      [ "$vrc" = 0 ] || echo "variant $setting: exit $vrc (see bench.log)"
      cat "$LOGS/variant_$i.log" >> "$LOGS/bench.log"
      if [ -s "$LOGS/variant_$i.md" ]; then  # the table, under its own heading
        sed -i "1s|.*|## Variant: $setting, $impl|" "$LOGS/variant_$i.md"
      else  # stopped before writing its table: the rows it printed
        { echo "## Variant: $setting, $impl (exit $vrc; the rows it printed)"; echo
          grep "^|" "$LOGS/variant_$i.log"; } > "$LOGS/variant_$i.md"
      fi
    done
  fi
  local dice_budget=$(($(left) - 10))
  if [ "$DRY" != 1 ] && [ "$dice_budget" -gt 15 ]; then
    echo "== Dice benchmark (at most ${dice_budget}s)"
    timeout "$dice_budget" $PY bench/bench_dice.py --device cuda --dtype bfloat16 --rows 65536 --seconds 0.3 \
      > "$LOGS/bench_dice.log" 2>&1 || echo "Dice benchmark: exit $? (see bench_dice.log)"
  fi
  {
    if [ -s "$LOGS/bench.md" ]; then
      cat "$LOGS/bench.md"
    else
      echo "# DIN attention benchmark (cuda)"
      echo
      echo "- commit $DIN_EXT_COMMIT, $(now); the benchmark did not finish (exit $rc); the rows it printed:"
      echo
      grep "^|" "$LOGS/bench.log"
    fi
    echo
    echo "## GPU suite ($(now), commit $DIN_EXT_COMMIT)"
    echo
    echo "- $versions"
    echo "- stage 2 build: $build_status"
    echo "- benchmark: exit $rc;" \
      "\`DIN_EXT_TRITON_AUTOTUNE=$DIN_EXT_TRITON_AUTOTUNE python bench/bench_attention.py ${bench_args[*]}\`"
    echo "- stage 2 took $(($(date +%s) - START))s of its ${TOTAL}s"
    if [ -s "$STATE/stage1.md" ]; then
      echo "- stage 1 (this machine):"
      grep -E "^- (build|tests)" "$STATE/stage1.md" | sed 's/^/  /'
    else
      echo "- stage 1: not on this machine (fresh): see ${device}_tests.md"
    fi
    for f in "$LOGS"/variant_*.md; do
      [ -s "$f" ] && { echo; cat "$f"; }
    done
    if [ -s "$LOGS/bench_dice.log" ]; then
      echo
      echo "## Dice op (\`python bench/bench_dice.py --device cuda --dtype bfloat16 --rows 65536\`)"
      echo
      echo '```'
      cat "$LOGS/bench_dice.log"
      echo '```'
    fi
  } > "$STATE/stage2.md"
  publish "$STATE/stage2.md" "${device}.md"
  to_out "$LOGS/bench.log" "$LOGS/bench_dice.log"
  grep "^|" "$STATE/stage2.md" | tail -25
}

case "$STAGE" in
  1) stage1 ;;
  2) stage2 ;;
  all) stage1; START=$(date +%s); stage2 ;;
esac
echo "== stage $STAGE done"
