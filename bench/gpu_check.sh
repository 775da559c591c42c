#!/usr/bin/env bash
# The one-call check for the GPU machine: environment, build, GPU tests, the GPU tests' small subset
# under compute-sanitizer (memcheck, racecheck) with backend "cuda", the GPU benchmark table (every
# live GPU backend: "triton", "cuda"), the recorded results of the automatic backend choice and the
# kernel-launch count of one tome_merge call. Everything goes under ${OUT:-bench/results/gpu}.
#
#   bash bench/gpu_check.sh                          # all steps; may not fit one 10-minute call, so:
#   bash bench/gpu_check.sh --skip-table --skip-record --skip-profile        # call 1: build, tests, sanitizer
#   bash bench/gpu_check.sh --skip-build --skip-tests --skip-sanitizer       # call 2: table, record, profile
#   bash bench/gpu_check.sh --skip-build --skip-tests --quick
#
# Options:  --skip-build  --skip-tests  --skip-sanitizer  --skip-table  --skip-record  --skip-profile
#           --quick (passed to run_table.py and record_dispatch.py)
#           --model  also the whole-model benchmark (bench/bench_model.py); it needs most of a call:
#                    bash bench/gpu_check.sh --skip-build --skip-tests --skip-sanitizer --skip-table \
#                      --skip-record --skip-profile --model
# Environment (all optional):
#   PYTEST_GPU_ARGS      pytest arguments of the GPU test run      (default: tests -q -m gpu -x)
#   PYTEST_TRITON_ARGS   pytest arguments of the Triton test run   (default: tests -q -k triton)
#   TRITON_TEST_BACKENDS FPET_TEST_BACKENDS of the Triton test run (default: triton)
#   SANITIZER            compute-sanitizer binary (default: $CUDA_HOME/bin/compute-sanitizer, else PATH)
#   SANITIZER_TESTS      pytest arguments under the sanitizer (default: tests/test_gpu.py -q -x -k sanitizer)
#   SANITIZER_BACKENDS   FPET_TEST_BACKENDS under the sanitizer (default: cuda)
#   RACECHECK_ARGS       extra racecheck options (default: --kernel-name kns=body_kernel, the fpet CUDA kernels)
#   RECORD_ARGS          extra arguments for bench/record_dispatch.py
#   TABLE_ARGS           extra arguments for bench/run_table.py (after the script's own; they win)
#   PROFILE_ARGS         extra arguments for bench/profile_launches.py
#   TOTAL_BUDGET         seconds for the whole script (default 570); each step also has a cap
#
# Output files: env.txt, build.log, tests.log (+ junit xml), table.md (the markdown table),
# table.log (progress), results_gpu.csv (same columns as bench/results/results.csv),
# sanitizer.log, tuning/<gpu>.json + record.log (the recorded results: copy the json to
# fpet_kernels/tuning/ and commit it to ship the automatic choice), profile.md, launches.json,
# trace_tome_merge_<provider>.json, summary.txt.
# A failing step does not stop the script (set -u, no -e); the exit status is 1 if any step failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$(pwd)

SKIP_BUILD=0 SKIP_TESTS=0 SKIP_SANITIZER=0 SKIP_TABLE=0 SKIP_RECORD=0 SKIP_PROFILE=0 MODEL=0 QUICK=()
for arg in "$@"; do
  case "$arg" in
    --skip-build) SKIP_BUILD=1 ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --skip-sanitizer) SKIP_SANITIZER=1 ;;
    --skip-table) SKIP_TABLE=1 ;;
    --skip-record) SKIP_RECORD=1 ;;
    --skip-profile) SKIP_PROFILE=1 ;;
    --quick) QUICK=(--quick) ;;
    --model) MODEL=1 ;;
    -h|--help) sed -n '2,37p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown option: $arg (see --help)" >&2; exit 2 ;;
  esac
done

OUT_DIR="${OUT:-bench/results/gpu}"
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
PYTEST_GPU_ARGS="${PYTEST_GPU_ARGS:-tests -q -m gpu -x}"
PYTEST_TRITON_ARGS="${PYTEST_TRITON_ARGS:-tests -q -k triton}"
TRITON_TEST_BACKENDS="${TRITON_TEST_BACKENDS:-triton}"
TABLE_ARGS="${TABLE_ARGS:-}"
PROFILE_ARGS="${PROFILE_ARGS:-}"
SANITIZER_TESTS="${SANITIZER_TESTS:-tests/test_gpu.py -q -x -k sanitizer -p no:cacheprovider}"
SANITIZER_BACKENDS="${SANITIZER_BACKENDS:-cuda}"
RACECHECK_ARGS="${RACECHECK_ARGS---kernel-name kns=body_kernel}"
RECORD_ARGS="${RECORD_ARGS:-}"
TOTAL_BUDGET="${TOTAL_BUDGET:-570}"
DEADLINE=$((SECONDS + TOTAL_BUDGET))
FAILED=()

# The Triton kernels must run on the GPU, never in the CPU interpreter.
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

note() { echo "$*" | tee -a "$SUMMARY"; }

# step_timeout CAP RESERVE: seconds this step may run, leaving RESERVE seconds for the later steps.
step_timeout() {
  local left=$((DEADLINE - SECONDS - $2))
  echo $(( $1 < left ? $1 : left ))
}

# run_step NAME CAP RESERVE LOG CMD...: run CMD with a timeout, output appended to LOG, status recorded.
run_step() {
  local name=$1 cap=$2 reserve=$3 log=$4
  shift 4
  local t
  t=$(step_timeout "$cap" "$reserve")
  if (( t < 15 )); then
    note "SKIP  $name: no time left (TOTAL_BUDGET=$TOTAL_BUDGET)"
    FAILED+=("$name (no time)")
    return 0
  fi
  local t0=$SECONDS rc
  echo "== $name (timeout ${t}s): $*" >> "$log"
  timeout --kill-after=15 "$t" "$@" >> "$log" 2>&1
  rc=$?
  local dt=$((SECONDS - t0))
  if (( rc == 0 )); then
    note "OK    $name (${dt}s)"
  elif [[ "$name" == tests* ]] && (( rc == 5 )); then
    note "WARN  $name: no tests selected (pytest rc 5, ${dt}s)"
  elif (( rc == 124 || rc == 137 )); then
    note "FAIL  $name: timed out after ${t}s (rc $rc), see $(basename "$log")"
    FAILED+=("$name")
  else
    note "FAIL  $name: rc $rc (${dt}s), see $(basename "$log")"
    FAILED+=("$name")
  fi
  return 0
}

# ---------------------------------------------------------------- environment
{
  echo "# $(date -Is) $(hostname) $ROOT @ $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  git status --short 2>/dev/null | head -30
  nvidia-smi 2>&1 || echo "nvidia-smi failed"
  python - <<'EOF' 2>&1
import platform, sys
print("python", sys.version.split()[0], platform.platform())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
except Exception as exc:
    print("torch import failed:", exc)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton import failed:", exc)
for mod in ("pytest", "pytest_benchmark", "ninja", "setuptools"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as exc:
        print(mod, "missing:", exc)
EOF
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

# ---------------------------------------------------------------- build (the C++/CUDA extension)
if (( SKIP_BUILD )); then
  note "SKIP  build (--skip-build)"
else
  : > "$OUT_DIR/build.log"
  run_step build 300 300 "$OUT_DIR/build.log" \
    python -m pip install --no-build-isolation --no-deps --disable-pip-version-check -e .
  tail -n 5 "$OUT_DIR/build.log"
fi
python -c "import fpet_kernels as fk, json; print('fpet_kernels.backends():', json.dumps(fk.backends()))" \
  2>&1 | tee -a "$OUT_DIR/env.txt" "$SUMMARY"

# ---------------------------------------------------------------- tests
if (( SKIP_TESTS )); then
  note "SKIP  tests (--skip-tests)"
else
  : > "$OUT_DIR/tests.log"
  eval "gpu_args=($PYTEST_GPU_ARGS)"
  eval "triton_args=($PYTEST_TRITON_ARGS)"
  run_step "tests (gpu): pytest $PYTEST_GPU_ARGS" 150 270 "$OUT_DIR/tests.log" \
    python -m pytest ${gpu_args[@]+"${gpu_args[@]}"} --junitxml="$OUT_DIR/tests_gpu.xml"
  run_step "tests (triton): FPET_TEST_BACKENDS=$TRITON_TEST_BACKENDS pytest $PYTEST_TRITON_ARGS" 150 270 \
    "$OUT_DIR/tests.log" \
    env FPET_TEST_BACKENDS="$TRITON_TEST_BACKENDS" python -m pytest ${triton_args[@]+"${triton_args[@]}"} \
    --junitxml="$OUT_DIR/tests_triton.xml"
  grep -E "^(FAILED|ERROR)|passed|failed|error" "$OUT_DIR/tests.log" | tail -n 25
fi

# ---------------------------------------------------------------- compute-sanitizer (backend "cuda")
if (( SKIP_SANITIZER )); then
  note "SKIP  sanitizer (--skip-sanitizer)"
else
  SAN="${SANITIZER:-${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer}"
  [[ -x "$SAN" ]] || SAN=$(command -v compute-sanitizer || true)
  : > "$OUT_DIR/sanitizer.log"
  if [[ -z "$SAN" || ! -x "$SAN" ]]; then
    note "FAIL  sanitizer: compute-sanitizer not found (set SANITIZER or CUDA_HOME)"
    FAILED+=("sanitizer (not found)")
  else
    eval "san_args=($SANITIZER_TESTS)"
    eval "race_extra=($RACECHECK_ARGS)"
    # No caching allocator: memcheck then sees every tensor's own bounds, not the allocator's blocks.
    run_step "sanitizer memcheck: FPET_TEST_BACKENDS=$SANITIZER_BACKENDS pytest $SANITIZER_TESTS" 180 200 \
      "$OUT_DIR/sanitizer.log" env FPET_TEST_BACKENDS="$SANITIZER_BACKENDS" PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SAN" --tool memcheck --error-exitcode 1 --print-limit 20 \
      python -m pytest ${san_args[@]+"${san_args[@]}"}
    run_step "sanitizer racecheck: FPET_TEST_BACKENDS=$SANITIZER_BACKENDS pytest $SANITIZER_TESTS" 180 120 \
      "$OUT_DIR/sanitizer.log" env FPET_TEST_BACKENDS="$SANITIZER_BACKENDS" \
      "$SAN" --tool racecheck --error-exitcode 1 --print-limit 20 \
      ${race_extra[@]+"${race_extra[@]}"} python -m pytest ${san_args[@]+"${san_args[@]}"}
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed|error" "$OUT_DIR/sanitizer.log" | tail -n 10
  fi
fi

# ---------------------------------------------------------------- benchmark table
if (( SKIP_TABLE )); then
  note "SKIP  table (--skip-table)"
else
  t=$(step_timeout 280 60)
  # run_table.py stops starting measurements 40 s before its timeout and caps the compile time, so
  # that it still prints its table and writes the CSV; TABLE_ARGS come last and override these.
  max_s=$(( t > 80 ? t - 40 : 40 ))
  budget=$(( max_s / 2 < 120 ? max_s / 2 : 120 ))
  eval "table_extra=($TABLE_ARGS)"
  : > "$OUT_DIR/table.log"
  run_step table 280 60 "$OUT_DIR/table.log" \
    bash -c 'out=$1; shift; exec python bench/run_table.py "$@" > "$out/table.md"' _ "$OUT_DIR" \
    --csv "$OUT_DIR/results_gpu.csv" --max-seconds "$max_s" --compile-budget "$budget" \
    ${QUICK[@]+"${QUICK[@]}"} ${table_extra[@]+"${table_extra[@]}"}
fi

# ---------------------------------------------------------------- recorded results for the automatic choice
if (( SKIP_RECORD )); then
  note "SKIP  record (--skip-record)"
else
  t=$(step_timeout 240 60)
  eval "record_extra=($RECORD_ARGS)"
  : > "$OUT_DIR/record.log"
  run_step "record (dispatch results into $OUT_DIR/tuning)" 240 60 "$OUT_DIR/record.log" \
    python bench/record_dispatch.py --out "$OUT_DIR/tuning" --max-seconds $(( t > 60 ? t - 30 : 30 )) \
    ${QUICK[@]+"${QUICK[@]}"} ${record_extra[@]+"${record_extra[@]}"}
  tail -n 12 "$OUT_DIR/record.log"
fi

# ---------------------------------------------------------------- kernel launches of one tome_merge call
if (( SKIP_PROFILE )); then
  note "SKIP  profile (--skip-profile)"
else
  eval "profile_extra=($PROFILE_ARGS)"
  : > "$OUT_DIR/profile.log"
  run_step "profile (one kernel launch per tome_merge)" 90 0 "$OUT_DIR/profile.log" \
    bash -c 'out=$1; shift; exec python bench/profile_launches.py "$@" > "$out/profile.md"' _ "$OUT_DIR" \
    --out "$OUT_DIR" ${profile_extra[@]+"${profile_extra[@]}"}
fi

# ---------------------------------------------------------------- whole-model benchmark (issue: model layer)
if (( MODEL )); then
  t=$(step_timeout 540 0)
  : > "$OUT_DIR/model.log"
  run_step "model benchmark" 540 0 "$OUT_DIR/model.log" \
    bash -c 'out=$1; shift; exec python bench/bench_model.py "$@" > "$out/model.md"' _ "$OUT_DIR" \
    --keep-going --max-seconds $(( t > 80 ? t - 40 : 40 )) --out "$OUT_DIR" ${QUICK[@]+"${QUICK[@]}"}
fi

# ---------------------------------------------------------------- report
[[ -s "$OUT_DIR/table.md" ]] && { echo; cat "$OUT_DIR/table.md"; }
[[ -s "$OUT_DIR/profile.md" ]] && { echo; cat "$OUT_DIR/profile.md"; }
[[ -s "$OUT_DIR/model.md" ]] && { echo; cat "$OUT_DIR/model.md"; }
echo
echo "== summary ($SECONDS s, files in $OUT_DIR)"
cat "$SUMMARY"
if (( ${#FAILED[@]} )); then
  echo "FAILED steps: ${FAILED[*]}" | tee -a "$SUMMARY"
  exit 1
fi
echo "all steps passed" | tee -a "$SUMMARY"
exit 0
