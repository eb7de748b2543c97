#!/usr/bin/env bash
# The one script a GPU session runs on the device machine, from the repository root:
#
#   bash benchmarks/gpu_session.sh            # $OUT (set by the device runner) receives everything
#
# 1 install (builds the CUDA extension where it can), 2 versions and nvidia-smi, 3 the kernel
# check at 7B shapes in bf16, 4 the GPU-marked tests, 5 AOT compilation, 6 the benchmarks into
# $OUT/results, 7 the whole test suite. Fail-soft: each step runs whatever happened before it,
# under its own time limit; the exit code of every step is summarised at the end (and in
# $OUT/summary.txt). The whole script stays under SESSION_BUDGET_S (default 560 s, inside the
# device's 10-minute limit per command): steps before the benchmarks leave them BENCH_RESERVE_S
# (default 300 s), and the whole test suite, which repeats the GPU tests, runs last on what is left.
#
# Environment: SESSION_BUDGET_S, BENCH_RESERVE_S, BENCH_ARGS (extra run_all arguments, e.g.
# "--quick" or "--skip ops"), VITA_KERNELS_CUDA_ARCHS (default 90: H100/H200 only, half the build).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d /tmp/vita-gpu-session-XXXXXX)}
LOGS="$OUT/logs"
mkdir -p "$LOGS"
BUDGET=${SESSION_BUDGET_S:-560}
RESERVE=${BENCH_RESERVE_S:-300}
START=$(date +%s)
SUMMARY=()
export PYTHONUNBUFFERED=1
unset VITA_KERNELS_FORCE_CUDA_BUILD  # build the extension if possible, never fail the install over it

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME CAP_S RESERVE_S CMD...: run CMD for at most min(CAP_S, time left - RESERVE_S) seconds.
step() {
  local name=$1 cap=$2 reserve=$3
  shift 3
  local avail=$(( $(left) - reserve ))
  local limit=$(( cap < avail ? cap : avail ))
  if (( limit < 15 )); then
    SUMMARY+=("$(printf '%-10s skipped: the time budget is spent' "$name")")
    echo "== $name: skipped (time budget)"
    return
  fi
  echo "== $name (limit ${limit}s): $*" | tee "$LOGS/$name.log"
  local t0
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]} note=""
  if (( rc == 124 || rc == 137 )); then note=" (timed out)"; fi
  SUMMARY+=("$(printf '%-10s rc=%-4s %4ss%s' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$note")")
}

step install 240 "$RESERVE" env VITA_KERNELS_CUDA_ARCHS="${VITA_KERNELS_CUDA_ARCHS:-90}" MAX_JOBS="$(nproc)" \
  python -m pip install --no-build-isolation --no-deps -e .
step versions 30 "$RESERVE" bash -c 'nvidia-smi; python - <<PY
import torch, triton, transformers
from vita_kernels.backend import cuda_extension
print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__,
      "| transformers", transformers.__version__)
print("device", torch.cuda.get_device_name(0), "| vita_kernels._C built:", cuda_extension() is not None)
PY'
step check 120 "$RESERVE" python -m vita_kernels.check --device cuda --dtype bf16 --shapes 7b
step pytest_gpu 150 "$RESERVE" python -m pytest -x -q -p no:cacheprovider -m "gpu or cuda_ext" tests
step aot 60 "$RESERVE" python -m vita_kernels.aot
BENCH_LIMIT=$(( $(left) - 20 ))
# run_all stops starting torch.compile peers a minute before its limit, so its tables get written.
BENCH_BUDGET=$(( BENCH_LIMIT > 120 ? BENCH_LIMIT - 60 : BENCH_LIMIT / 2 ))
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
step bench "$BENCH_LIMIT" 20 python -m benchmarks.run_all --out "$OUT/results" \
  --write-auto-choice "$OUT/results/auto_choice.json" --time-budget-s "$BENCH_BUDGET" ${BENCH_ARGS:-}
step pytest_all 600 10 python -m pytest -q -p no:cacheprovider tests

{
  echo
  echo "== summary ($(( $(date +%s) - START ))s of ${BUDGET}s; logs in $LOGS, results in $OUT/results)"
  printf '%s\n' "${SUMMARY[@]}"
} | tee "$OUT/summary.txt"
if [[ -f "$OUT/results/results.md" ]]; then
  sed -n '/^### Targets/,/^$/p' "$OUT/results/results.md"
fi
