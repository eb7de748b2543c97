#!/usr/bin/env bash
# The one script a GPU session runs on the device machine, from the repository root:
#
#   bash benchmarks/gpu_session.sh        # $OUT (set by the device runner) receives two files
#
# Stages, in order of value, each under its own time limit and fail-soft (a failure or a
# timeout is recorded and the next stage runs):
#   install   pip install --no-build-isolation --no-deps -e .  (builds the CUDA extension if it can)
#   env       nvidia-smi, library versions, which profilers exist
#   smoke     python -m benchmarks.smoke: GB/s per op at 7B, the MCTP step at R = 11 (< 1 min)
#   numerics  the 7B bf16 generation tests: teacher-forced fused vs fp32 reference, graph == eager
#   check7b   python -m vita_kernels.check at 7B in bf16: every op, every impl, vs fp32 (the table)
#   gpu_rest  the other GPU-marked tests (tiny shapes on the device, the CUDA extension)
#   aot       ahead-of-time compile of every Triton kernel
#   bench     python -m benchmarks.run_all (BENCH_ARGS, default --quick) on what time is left
#   tests_rest the rest of the suite (not GPU-marked; tiny shapes on the device), if time is left
# The whole run stays under SESSION_BUDGET_S (default 520 s: one device call of at most 9 min,
# packing included). A stage's limit is min(its cap, time left - what later stages are owed).
#
# Exit status 0 only when every stage that ran passed. $OUT ends with exactly two files (the device returns at most 8, two folders deep):
#   $OUT/summary.txt          every stage's exit status and time, and the key numbers
#   $OUT/gpu-session.tar.gz   logs/<stage>.log, results/ (smoke.json, junit XML, run_all's
#                             results.json/.md/charts, auto_choice.json), summary.txt
#
# Environment: SESSION_BUDGET_S, SESSION_SKIP (comma-separated stages not to run, e.g.
# "install" on a rerun where the package is already installed), BENCH_ARGS (run_all arguments;
# default "--quick"; set it to " " for the full suite),
# VITA_KERNELS_CUDA_ARCHS (default 90: H100/H200 only, half the build),
# VITA_KERNELS_SKIP_CUDA_BUILD=1 to skip building the extension.
set -u -o pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$(mktemp -d /tmp/vita-gpu-session-out-XXXXXX)}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/vita-gpu-session-XXXXXX)
LOGS="$WORK/logs"
RESULTS="$WORK/results"
mkdir -p "$LOGS" "$RESULTS"
BUDGET=${SESSION_BUDGET_S:-520}
START=$(date +%s)
STAGES=()
FAILED=0
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # the working tree even if the install fails
unset VITA_KERNELS_FORCE_CUDA_BUILD  # build the extension if possible, never fail the install over it

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# stage NAME CAP_S OWED_S CMD...: run CMD for at most min(CAP_S, time left - OWED_S) seconds,
# its output into logs/NAME.log; the last lines are echoed so the console tail stays readable.
stage() {
  local name=$1 cap=$2 owed=$3
  shift 3
  if [[ ",${SESSION_SKIP:-}," == *",$name,"* ]]; then
    STAGES+=("$(printf '%-10s skipped (SESSION_SKIP)' "$name")")
    echo "== $name: skipped (SESSION_SKIP)"
    return
  fi
  local avail=$(( $(left) - owed ))
  local limit=$(( cap < avail ? cap : avail ))
  if (( limit < 15 )); then
    STAGES+=("$(printf '%-10s skipped (time budget spent)' "$name")")
    echo "== $name: skipped (time budget spent)"
    return
  fi
  echo "== $name (limit ${limit}s): $*"
  echo "== $name (limit ${limit}s): $*" > "$LOGS/$name.log"
  local t0 rc note=""
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >> "$LOGS/$name.log" 2>&1
  rc=$?
  if (( rc == 124 || rc == 137 )); then note=" (timed out)"; fi
  if (( rc != 0 )); then FAILED=$(( FAILED + 1 )); fi
  tail -n 8 "$LOGS/$name.log" | sed "s/^/   $name| /"
  STAGES+=("$(printf '%-10s rc=%-4s %4ss%s' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$note")")
}

# summary and archive, also when the script is interrupted
finish() {
  local summary="$WORK/summary.txt"
  {
    local commit dirty=""
    commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
    if git -C "$REPO" status --porcelain 2>/dev/null | grep -q .; then dirty=" (dirty)"; fi
    echo "GPU session $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $commit$dirty, $(( $(date +%s) - START ))s of ${BUDGET}s"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
    echo
    echo "stages ($FAILED failed or timed out):"
    printf '  %s\n' "${STAGES[@]}"
    if [[ -f "$RESULTS/smoke.json" ]]; then
      echo
      python - "$RESULTS/smoke.json" <<'PY' 2>/dev/null
import json, sys
r = json.load(open(sys.argv[1]))
s = r["mctp_step"]
print(f"smoke: copy {r['copy_bandwidth']['gbps']:.0f} GB/s; MCTP step R={s['rows']}: "
      f"{(s.get('us') or float('nan')):.1f} us, {(s.get('pct_copy_bw') or 0):.0f}% of its floor")
for o in r["ops"]:
    pct = o.get("pct_copy_bw")
    print(f"  {o['op']:15s} {o['case']:28s} " + (f"{o['gbps']:6.0f} GB/s {pct:5.1f}%" if pct else o.get("note", "")))
PY
    fi
    for name in numerics check7b gpu_rest tests_rest; do
      [[ -f "$LOGS/$name.log" ]] || continue
      echo
      echo "$name:"
      grep -E "^(7b|tiny) bf16 |^(FAILED|ERROR) |(passed|failed|skipped|errors?|deselected).* in [0-9.]+s|comparisons on|error:" "$LOGS/$name.log" | head -n 40 | sed 's/^/  /'
    done
    if [[ -f "$RESULTS/bench/results.md" ]]; then
      echo
      sed -n '/^### Targets/,/^$/p' "$RESULTS/bench/results.md"
    fi
  } > "$summary" 2>&1
  cp "$summary" "$OUT/summary.txt"
  tar -czf "$OUT/gpu-session.tar.gz" -C "$WORK" logs results summary.txt
  echo
  cat "$OUT/summary.txt"
  echo "archive: $OUT/gpu-session.tar.gz ($(du -h "$OUT/gpu-session.tar.gz" | cut -f1))"
}
trap finish EXIT

stage install 150 300 env VITA_KERNELS_CUDA_ARCHS="${VITA_KERNELS_CUDA_ARCHS:-90}" MAX_JOBS="$(nproc)" \
  python -m pip install --no-build-isolation --no-deps -e .
stage env 30 300 bash -c 'nvidia-smi; python - <<PY
import torch, triton, transformers
from vita_kernels.backend import cuda_extension
print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__,
      "| transformers", transformers.__version__)
print("device", torch.cuda.get_device_name(0), "| vita_kernels._C built:", cuda_extension() is not None)
PY
for tool in ncu compute-sanitizer cuobjdump nvcc; do
  printf "%s: " "$tool"; (command -v "$tool" >/dev/null && "$tool" --version 2>&1 | tail -n 1) || echo "not found"
done'
stage smoke 90 240 python -m benchmarks.smoke --json "$RESULTS/smoke.json" --time-budget-s 60
stage numerics 220 150 python -m pytest -q -rA -p no:cacheprovider --durations=10 -m gpu \
  --junitxml="$RESULTS/junit-numerics.xml" tests/test_teacher_forced.py tests/test_graphs.py
stage check7b 100 150 python -m vita_kernels.check --device cuda --dtype bf16 --shapes 7b
stage gpu_rest 60 150 python -m pytest -q -p no:cacheprovider -m "gpu or cuda_ext" --junitxml="$RESULTS/junit-gpu-rest.xml" \
  tests --deselect tests/test_teacher_forced.py --deselect tests/test_graphs.py --deselect tests/test_kernels.py::test_7b_bf16
stage aot 45 120 python -m vita_kernels.aot
# run_all stops starting torch.compile peers once its budget is spent, so its tables get written.
BENCH_LIMIT=$(( $(left) - 25 ))
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
stage bench "$BENCH_LIMIT" 25 python -m benchmarks.run_all --out "$RESULTS/bench" \
  --write-auto-choice "$RESULTS/auto_choice.json" --time-budget-s $(( BENCH_LIMIT > 90 ? BENCH_LIMIT - 45 : BENCH_LIMIT / 2 )) \
  ${BENCH_ARGS:---quick}
if (( $(left) > 60 )); then
  stage tests_rest 600 15 python -m pytest -q -p no:cacheprovider -m "not gpu and not cuda_ext" \
    --junitxml="$RESULTS/junit-rest.xml" tests benchmarks
fi
(( FAILED == 0 ))  # the exit status: non-zero when any stage failed (the EXIT trap still packs)
