#!/usr/bin/env bash
# bench/gpu_check.sh: the whole GPU check in ONE call of at most 9 minutes on a fresh GPU machine
# (16 cores, no package registry: nothing is downloaded or installed from an index).
#
#   OUT=/some/dir bash bench/gpu_check.sh     # results in $OUT (default: bench/results/gpu)
#   bash bench/gpu_check.sh --dry-run         # or FPET_GPU_CHECK_DRY=1: the script's logic on a CPU
#                                             # machine; GPU-only steps print a SKIP line
#   bash bench/gpu_check.sh --list            # the phases, their caps and estimates
#   bash bench/gpu_check.sh --only build,correctness     # some phases (comma list; also --skip ...)
#   bash bench/gpu_check.sh --cap sanitizer=120          # another timeout for a phase (repeatable)
#
# Phases, in priority order (each prints its wall time; a failing or timed-out phase does not stop
# the later ones; exit status 1 if a required phase failed or timed out; the optional sanitizer
# timing out is a WARN line, not a failure). Budget for an H200 machine (16 cores, fresh: empty
# Triton cache). "cap" is the phase's timeout; a phase also never runs into the time the later
# phases need at least ("min"), so the whole script ends by TOTAL_BUDGET (default 530 s).
# Every op is checked and timed: the merges (ToMe, FPET, PYRA, unmerge, merge_wavg) on both GPU
# backends, X-PEFT's xpeft_adapter and PaFi's masked_weight_grad on Triton (they have no CUDA C++
# kernel: the "cuda" tests check that an explicit backend="cuda" says so and that the automatic
# choice runs Triton). The versions (GPU, torch, Triton, CUDA, driver) head every table.
#
# | # | phase       | cap s | min s | estimate s | basis of the estimate (details: docs/gpu_check.md)                   |
# |---|-------------|------:|------:|-----------:|-----------------------------------------------------------------------|
# | 0 | env         |     - |     - |          3 | nvidia-smi, versions                                                  |
# | 1 | build       |   240 |    40 |     60-150 | ninja, MAX_JOBS=16: all ~10 files at once, the slowest bounds it.     |
# |   |             |       |       |            | Measured CPU time (user+sys) per file, nvcc 13.0 for sm_90 only:      |
# |   |             |       |       |            | merge_wavg.cu 66 s, tome_merge.cu 70 s, fpet_merge.cu 75 s (staged    |
# |   |             |       |       |            | matching: 105 s, 104 s on a loaded machine); C++ files <= 85 s wall   |
# |   |             |       |       |            | on 2 shared cores. One arch (TORCH_CUDA_ARCH_LIST from the device).   |
# | 2 | correctness |   150 |    40 |      20-50 | tests/kernels/test_gpu.py: the "triton" part (~85 Triton variants x   |
# |   |             |       |       |            | 0.5-6 s CPU of JIT, pytest-xdist -n 6) runs in the BACKGROUND from    |
# |   |             |       |       |            | the start of the build (it needs no _C): 60-120 s hidden behind nvcc; |
# |   |             |       |       |            | after the build the "cuda" part (no JIT; one torch.compile test)      |
# | 3 | vit         |    60 |    20 |      15-35 | patched tiny ViT on GPU vs the CPU reference, 3 methods x 2 backends  |
# | 4 | ops_table   |    90 |    30 |      40-65 | 8 cases x B{1,256} x f16 x {reference, triton, cuda, floor}: 64 rows  |
# |   |             |       |       |            | (the 2 PET ops' 6 "cuda" rows are notes) of ~0.1 s do_bench + new    |
# |   |             |       |       |            | Triton variants; 1 torch.compile row (~15 s)                          |
# | 5 | model_table |   110 |    40 |      50-80 | ViT-B/16 f16: 7 variants at B=256 (~10 ms/forward, 0.25 s rows) and 7 |
# |   |             |       |       |            | at B=1 graph replay; Triton JIT of the model's shapes ~20-40 s        |
# | 6 | record      |    80 |    30 |      35-60 | 14 op/mode cases x B{1,256} x f16 x live backends: 50 do_bench        |
# |   |             |       |       |            | medians; the file is rewritten after each one                         |
# | 7 | sanitizer   |    90 |     - |      60-90 | OPTIONAL, last: memcheck of test_gpu.py -k test_sanitizer, backend|
# |   |             |       |       |            | cuda; runs only if >= 75 s remain, else SKIP; a timeout is a WARN     |
# |   |             |       |       |            | (neither is a failure; memcheck errors are)                           |
# |   | total       |   530 |       |    225-455 | + sanitizer if time allows; 9 min = 540 s                             |
#
# Result files (at most 8, all directly in $OUT or one folder down):
#   summary.txt     environment and versions, each phase's status and wall time, the summary
#   build.log       the extension build
#   tests.log       pytest output of correctness, vit and sanitizer
#   ops_table.md    the op table (bench/run_table.py)      ops_table.csv  its rows
#   model_table.md  the whole-model table (bench/bench_model_gpu.py)
#   bench.log       progress of the table, model and record phases
#   tuning/<gpu>.json  the recorded dispatch results (bench/record_dispatch.py, rewritten after each
#                   cell: a timed-out record phase keeps what it measured): copy to
#                   fpet_kernels/tuning/ and commit to ship the automatic backend choice
#
# Environment (optional): OUT, PYTHON (default python3), TOTAL_BUDGET (530), MAX_JOBS (all cores),
# XDIST_WORKERS (12; 0 = no pytest-xdist), TABLE_ARGS / MODEL_ARGS / RECORD_ARGS (appended to the
# phase's command), SANITIZER (compute-sanitizer binary), FPET_GPU_CHECK_DRY=1 (= --dry-run).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$(pwd)

PHASES=(build correctness vit ops_table model_table record sanitizer)
declare -A CAP=([build]=240 [correctness]=150 [vit]=60 [ops_table]=90 [model_table]=110 [record]=80 [sanitizer]=90)
declare -A MIN=([build]=40 [correctness]=40 [vit]=20 [ops_table]=30 [model_table]=40 [record]=30 [sanitizer]=0)
declare -A EST=([build]="60-150" [correctness]="20-50 (+ triton part during the build)" [vit]="15-35" [ops_table]="40-65" [model_table]="50-80"
                [record]="35-60" [sanitizer]="60-90 (optional)")
OPTIONAL=(sanitizer)  # a timeout of these is a warning, not a failure
SANITIZER_NEEDS=75
TRITON_BG_CAP=240  # the correctness phase's "triton" part, started with the build
GPU_BUDGET=530   # seconds: the whole script on the GPU machine (9 min = 540 s, minus margin)

DRY="${FPET_GPU_CHECK_DRY:-0}"
[[ "$DRY" == "1" || "$DRY" == "true" || "$DRY" == "yes" ]] && DRY=1 || DRY=0
declare -A SKIP=()
ONLY=""
usage() { sed -n '2,13p' "${BASH_SOURCE[0]}"; }
declare -A CAP_SET=()
while (( $# )); do
  case "$1" in
    --dry-run) DRY=1 ;;
    --list)
      printf '%-3s %-12s %6s %6s  %s\n' "#" phase cap min estimate
      i=1; for p in "${PHASES[@]}"; do printf '%-3s %-12s %6s %6s  %s\n' "$i" "$p" "${CAP[$p]}" "${MIN[$p]}" "${EST[$p]}"; i=$((i+1)); done
      exit 0 ;;
    --only) ONLY=",$2,"; shift ;;
    --only=*) ONLY=",${1#--only=},"; ;;
    --skip) for p in ${2//,/ }; do SKIP[$p]=1; done; shift ;;
    --cap|--cap=*)
      if [[ "$1" == --cap ]]; then kv=${2:-}; shift; else kv=${1#--cap=}; fi
      [[ "$kv" =~ ^([a-z_]+)=([0-9]+)$ ]] || { echo "--cap takes PHASE=SECONDS, got '$kv'" >&2; exit 2; }
      CAP_SET[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]} ;;
    --skip-build) SKIP[build]=1 ;;
    --skip-tests) SKIP[correctness]=1; SKIP[vit]=1 ;;
    --skip-sanitizer) SKIP[sanitizer]=1 ;;
    --skip-table) SKIP[ops_table]=1 ;;
    --skip-model) SKIP[model_table]=1 ;;
    --skip-record) SKIP[record]=1 ;;
    --skip-profile|--quick|--model)  # options of the earlier script: its phases are sized to fit now
      echo "note: $1 is no longer needed (every phase fits one call; profile_launches.py runs on its own)" >&2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for p in "${!SKIP[@]}" "${!CAP_SET[@]}"; do
  [[ -n "${CAP[$p]+x}" ]] || { echo "unknown phase: $p (phases: ${PHASES[*]})" >&2; exit 2; }
done

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  for cand in python3 python; do command -v "$cand" >/dev/null 2>&1 && { PY=$cand; break; }; done
fi
[[ -n "$PY" ]] || { echo "no python3 on PATH (set PYTHON)" >&2; exit 2; }

OUT_DIR="${OUT:-bench/results/gpu}"
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || exit 2
SUMMARY="$OUT_DIR/summary.txt"
TESTS_LOG="$OUT_DIR/tests.log"
BENCH_LOG="$OUT_DIR/bench.log"
: > "$SUMMARY"; : > "$TESTS_LOG"; : > "$BENCH_LOG"
if (( DRY )); then
  # the dry run checks the logic, not the GPU budget: a busy CI machine gets generous timeouts
  TOTAL_BUDGET="${TOTAL_BUDGET:-3600}"
  for p in "${PHASES[@]}"; do CAP[$p]=600; MIN[$p]=0; done
  TRITON_BG_CAP=600
else
  TOTAL_BUDGET="${TOTAL_BUDGET:-$GPU_BUDGET}"
fi
for p in "${!CAP_SET[@]}"; do CAP[$p]=${CAP_SET[$p]}; done
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1
# the Triton kernels run on the GPU, never in the CPU interpreter; no FPET_BACKEND from the shell
unset TRITON_INTERPRET FPET_BACKEND
# the checkout's package (built in place) first, for every python started here
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

now() { [[ -n "${EPOCHREALTIME:-}" ]] && echo "${EPOCHREALTIME/,/.}" || date +%s.%N; }
T0=$(now)
elapsed() { awk -v a="$T0" -v b="$(now)" 'BEGIN { printf "%d", b - a }'; }
note() { echo "$*" | tee -a "$SUMMARY"; }
FAILED=()
WARNED=()
declare -A STATUS=() WALL=()
optional() { [[ " ${OPTIONAL[*]} " == *" $1 "* ]]; }

# seconds the later phases need at least (the ones that will run)
reserve_after() {
  local after=0 sum=0 p
  for p in "${PHASES[@]}"; do
    if (( after )) && wanted "$p"; then sum=$((sum + ${MIN[$p]})); fi
    [[ "$p" == "$1" ]] && after=1
  done
  echo "$sum"
}
wanted() { [[ -z "${SKIP[$1]+x}" ]] && { [[ -z "$ONLY" ]] || [[ "$ONLY" == *",$1,"* ]]; }; }

# run_phase NAME LOG CMD...: run CMD under a timeout (its cap, cut to leave the later phases their
# minimum), output appended to LOG (and, for short logs, echoed), status and wall time recorded.
run_phase() {
  local name=$1 log=$2; shift 2
  local left=$((TOTAL_BUDGET - $(elapsed) - $(reserve_after "$name")))
  local t=${CAP[$name]}
  (( left < t )) && t=$left
  if (( t < 10 && t < ${CAP[$name]} )); then
    note "SKIP  $name: no time left (TOTAL_BUDGET=${TOTAL_BUDGET}s, $(elapsed)s used)"
    STATUS[$name]=SKIP; FAILED+=("$name (no time)"); return 0
  fi
  echo "== [$name] timeout ${t}s: $*" | tee -a "$log"
  local t1 rc dt
  t1=$(now)
  timeout --kill-after=10 "$t" "$@" >> "$log" 2>&1
  rc=$?
  dt=$(awk -v a="$t1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
  WALL[$name]=$dt
  if (( rc == 0 )); then
    STATUS[$name]=OK; note "OK    $name  ${dt}s"
  elif (( rc == 124 || rc == 137 )) && optional "$name"; then
    STATUS[$name]=WARN; WARNED+=("$name (timeout)")
    note "WARN  $name: optional phase timed out after ${t}s (rc $rc)  ${dt}s, see $(basename "$log"); not a failure"
  elif (( rc == 124 || rc == 137 )); then
    STATUS[$name]=FAIL; FAILED+=("$name (timeout)"); note "FAIL  $name: timed out after ${t}s (rc $rc)  ${dt}s, see $(basename "$log")"
  else
    STATUS[$name]=FAIL; FAILED+=("$name"); note "FAIL  $name: rc $rc  ${dt}s, see $(basename "$log")"
  fi
  return 0
}
skip_phase() { STATUS[$1]=SKIP; note "SKIP  $1: $2"; }

# gpu_pytest ARGS...: tests/kernels/test_gpu.py on both GPU backends, the Triton JIT spread over cores:
# pytest-xdist (XDIST_WORKERS processes) when installed, else one pytest per backend in parallel.
XDIST=0
XDIST_WORKERS="${XDIST_WORKERS:-12}"
(( XDIST_WORKERS > 0 )) && "$PY" -c "import xdist" >/dev/null 2>&1 && XDIST=1
# GPU_TEST_BACKENDS (default "triton cuda") names the backends.
gpu_pytest() {
  local backends="${GPU_TEST_BACKENDS:-triton cuda}"
  if (( XDIST )); then
    FPET_TEST_BACKENDS="${backends// /,}" "$PY" -m pytest tests/kernels/test_gpu.py -q -ra -p no:cacheprovider \
      -n "$XDIST_WORKERS" "$@"
    return
  fi
  local tmp rc=0 pids=() b
  tmp=$(mktemp -d)
  for b in $backends; do
    FPET_TEST_BACKENDS=$b "$PY" -m pytest tests/kernels/test_gpu.py -q -ra -p no:cacheprovider "$@" > "$tmp/$b.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  for b in $backends; do echo "-- backend $b"; cat "$tmp/$b.log"; done
  rm -rf "$tmp"
  return $rc
}
export -f gpu_pytest
export PY XDIST XDIST_WORKERS

# ---------------------------------------------------------------- 0: environment
{
  echo "# gpu_check $(date -Is) $(hostname) $ROOT @ $(git rev-parse --short HEAD 2>/dev/null || echo '?')$( (( DRY )) && echo ' DRY RUN')"
  echo "# budget ${TOTAL_BUDGET}s, MAX_JOBS=$MAX_JOBS, python: $(command -v "$PY")"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader 2>&1
  else
    echo "nvidia-smi: not on PATH"
  fi
  "$PY" - <<'EOF' 2>&1
import platform, sys
print("python", sys.version.split()[0], platform.platform())
try:
    import torch
    cap = "{}.{}".format(*torch.cuda.get_device_capability()) if torch.cuda.is_available() else "-"
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "capability", cap,
          torch.cuda.get_device_name() if torch.cuda.is_available() else "")
except Exception as exc:
    print("torch import failed:", exc)
for mod in ("triton", "timm", "pytest", "xdist", "ninja", "setuptools"):
    try:
        m = __import__(mod)
        print(" ", mod, getattr(m, "__version__", "?"))
    except Exception as exc:
        print(" ", mod, "MISSING:", type(exc).__name__, exc)
EOF
} 2>&1 | tee -a "$SUMMARY"
# One line of versions (GPU, torch, Triton, CUDA, driver), printed beside every table and heading
# each table file.
VERSIONS=$("$PY" -c "import sys; sys.path.insert(0, 'bench'); from common import versions_line; print(versions_line('cuda'))" 2>/dev/null | tail -n 1)
[[ "$VERSIONS" == "# GPU "* ]] || VERSIONS="# versions: could not be read (bench/common.py versions_line failed)"
note "$VERSIONS"
export VERSIONS
GPU=0
if (( ! DRY )) && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then GPU=1; fi
if (( ! DRY && ! GPU )); then
  note "no CUDA device visible: every GPU phase will fail (use --dry-run on a CPU machine)"
fi

# ---------------------------------------------------------------- 2a: Triton tests, alongside the build
# The "triton" backend needs no compiled extension, and its tests' cost is Triton's JIT (CPU): they
# run in the background while nvcc builds (half the workers), the "cuda" tests after the build.
CORR_K="not test_vit_patched and not test_sanitizer"
BG_PID="" BG_DIR=""
if wanted correctness && wanted build && (( DRY || GPU )); then
  BG_DIR=$(mktemp -d)
  BG_T1=$(now)
  if (( DRY )); then
    bg_cmd=("$PY" -m pytest tests/kernels/test_gpu.py -q --collect-only -p no:cacheprovider -k "$CORR_K")
  else
    bg_cmd=(env GPU_TEST_BACKENDS=triton XDIST_WORKERS=$(( (XDIST_WORKERS + 1) / 2 )) bash -c 'gpu_pytest -k "$1"' _ "$CORR_K")
  fi
  echo "== [correctness/triton] in the background during the build, timeout ${TRITON_BG_CAP}s: ${bg_cmd[*]}" \
    | tee -a "$TESTS_LOG"
  ( timeout --kill-after=10 "$TRITON_BG_CAP" "${bg_cmd[@]}" > "$BG_DIR/log" 2>&1; echo $? > "$BG_DIR/rc" ) &
  BG_PID=$!
fi

# ---------------------------------------------------------------- 1: build (in place, one arch)
if ! wanted build; then skip_phase build "not selected"
elif (( DRY )); then
  skip_phase build "dry run (would run: TORCH_CUDA_ARCH_LIST=<device capability> MAX_JOBS=$MAX_JOBS FORCE_CUDA=1 $PY setup.py build_ext --inplace)"
  run_phase build "$OUT_DIR/build.log" "$PY" setup.py --name
else
  ARCH=$("$PY" -c "import torch; print('{}.{}'.format(*torch.cuda.get_device_capability()))" 2>/dev/null || echo "")
  : > "$OUT_DIR/build.log"
  if [[ -z "$ARCH" ]]; then
    note "FAIL  build: cannot read the device's compute capability"; STATUS[build]=FAIL; FAILED+=(build)
  else
    # setup.py build_ext --inplace needs no pip and no index (pip -e would work offline too with
    # --no-build-isolation --no-deps, but writes into site-packages); stale objects of another arch
    # would be linked, so build/ goes first.
    rm -rf build/temp.*
    run_phase build "$OUT_DIR/build.log" env TORCH_CUDA_ARCH_LIST="$ARCH" FORCE_CUDA=1 \
      "$PY" setup.py build_ext --inplace
    grep -E "error|warning: .*(spill|stack)" "$OUT_DIR/build.log" | head -n 20
    tail -n 3 "$OUT_DIR/build.log"
  fi
fi
# what the package sees after the build (does not initialise CUDA on import; backends() does)
"$PY" -c "import fpet_kernels as fk, json; b = fk.backends(); print('fk.backends() live:', json.dumps(b.get('live')))" \
  2>&1 | tail -n 3 | tee -a "$SUMMARY"
if (( ! DRY )) && [[ "${STATUS[build]:-}" == OK ]]; then
  if ! "$PY" -c "import fpet_kernels as fk, sys; sys.exit(0 if fk.backends()['live'].get('cuda') else 1)" 2>/dev/null; then
    note "FAIL  build: built, but the 'cuda' backend is not live (see build.log and fk.backends())"
    STATUS[build]=FAIL; FAILED+=("build (cuda not live)")
  fi
fi

# ---------------------------------------------------------------- 2: correctness of every op and gradient
if ! wanted correctness; then skip_phase correctness "not selected"
elif (( DRY )); then
  skip_phase correctness "dry run (needs a GPU); collecting tests/kernels/test_gpu.py instead"
  run_phase correctness "$TESTS_LOG" "$PY" -m pytest tests/kernels/test_gpu.py -q --collect-only -p no:cacheprovider \
    -k "$CORR_K"
else
  if [[ -n "$BG_PID" ]]; then
    run_phase correctness "$TESTS_LOG" env GPU_TEST_BACKENDS=cuda bash -c 'gpu_pytest -k "$1"' _ "$CORR_K"
  else
    run_phase correctness "$TESTS_LOG" bash -c 'gpu_pytest -k "$1"' _ "$CORR_K"
  fi
  grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$TESTS_LOG" | tail -n 15
fi
# the background Triton part: its result joins the correctness phase
if [[ -n "$BG_PID" ]]; then
  wait "$BG_PID"
  bg_rc=$(cat "$BG_DIR/rc" 2>/dev/null || echo 1)
  bg_dt=$(awk -v a="$BG_T1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
  { echo "== [correctness/triton] output (started with the build)"; cat "$BG_DIR/log"; } >> "$TESTS_LOG"
  grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$BG_DIR/log" | tail -n 15
  rm -rf "$BG_DIR"
  WALL[correctness]="${WALL[correctness]:-0}+${bg_dt}"
  if (( bg_rc == 0 )); then
    note "OK    correctness/triton (in the background since the build started)  ${bg_dt}s"
  else
    why="rc $bg_rc"; (( bg_rc == 124 || bg_rc == 137 )) && why="timed out after ${TRITON_BG_CAP}s"
    note "FAIL  correctness/triton: $why  ${bg_dt}s, see tests.log"
    STATUS[correctness]=FAIL; FAILED+=("correctness/triton")
  fi
fi

# ---------------------------------------------------------------- 3: patched tiny ViT on GPU vs the CPU reference
if ! wanted vit; then skip_phase vit "not selected"
elif (( DRY )); then
  skip_phase vit "dry run (needs a GPU); collecting the ViT tests instead"
  run_phase vit "$TESTS_LOG" "$PY" -m pytest tests/kernels/test_gpu.py -q --collect-only -k test_vit_patched -p no:cacheprovider
else
  run_phase vit "$TESTS_LOG" bash -c 'gpu_pytest -k test_vit_patched'
  grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$TESTS_LOG" | tail -n 5
fi

# ---------------------------------------------------------------- 4: op table, B=1 and B=256, float16
if ! wanted ops_table; then skip_phase ops_table "not selected"
elif (( DRY )); then
  skip_phase ops_table "dry run (needs a GPU); checking bench/run_table.py --help instead"
  run_phase ops_table "$BENCH_LOG" "$PY" bench/run_table.py --help
else
  left=$((TOTAL_BUDGET - $(elapsed) - $(reserve_after ops_table)))
  t=$(( left < ${CAP[ops_table]} ? left : ${CAP[ops_table]} ))
  eval "table_extra=(${TABLE_ARGS:-})"
  run_phase ops_table "$BENCH_LOG" bash -c 'out=$1; shift; echo "$VERSIONS" > "$out/ops_table.md"; exec "$@" >> "$out/ops_table.md"' _ "$OUT_DIR" \
    "$PY" bench/run_table.py --device cuda --dtypes float16 --batches 1 256 --quick \
    --providers reference reference+compile triton cuda floor --compile-batches 256 --compile-max 1 \
    --compile-budget 40 --max-seconds $(( t > 40 ? t - 15 : 25 )) --csv "$OUT_DIR/ops_table.csv" \
    ${table_extra[@]+"${table_extra[@]}"}
fi

# ---------------------------------------------------------------- 5: whole-model table
if ! wanted model_table; then skip_phase model_table "not selected"
elif (( DRY )); then
  note "DRY   model_table: the same code path on CPU (tiny ViT, reference backend, no CUDA graphs)"
  run_phase model_table "$BENCH_LOG" bash -c 'out=$1; shift; echo "$VERSIONS" > "$out/model_table.md"; exec "$@" >> "$out/model_table.md"' _ "$OUT_DIR" \
    "$PY" bench/bench_model_gpu.py --device cpu --tiny --reps 1 --eager-batches 2 --backends reference
else
  left=$((TOTAL_BUDGET - $(elapsed) - $(reserve_after model_table)))
  t=$(( left < ${CAP[model_table]} ? left : ${CAP[model_table]} ))
  eval "model_extra=(${MODEL_ARGS:-})"
  run_phase model_table "$BENCH_LOG" bash -c 'out=$1; shift; echo "$VERSIONS" > "$out/model_table.md"; exec "$@" >> "$out/model_table.md"' _ "$OUT_DIR" \
    "$PY" bench/bench_model_gpu.py --device cuda --dtype float16 --eager-batches 256 --graph-batches 1 \
    --max-seconds $(( t > 40 ? t - 20 : 20 )) ${model_extra[@]+"${model_extra[@]}"}
fi

# ---------------------------------------------------------------- 6: recorded dispatch results
if ! wanted record; then skip_phase record "not selected"
elif (( DRY )); then
  skip_phase record "dry run (needs a GPU); checking bench/record_dispatch.py --help instead"
  run_phase record "$BENCH_LOG" "$PY" bench/record_dispatch.py --help
else
  left=$((TOTAL_BUDGET - $(elapsed) - $(reserve_after record)))
  t=$(( left < ${CAP[record]} ? left : ${CAP[record]} ))
  eval "record_extra=(${RECORD_ARGS:-})"
  run_phase record "$BENCH_LOG" "$PY" bench/record_dispatch.py --quick --out "$OUT_DIR/tuning" \
    --max-seconds $(( t > 30 ? t - 15 : 15 )) ${record_extra[@]+"${record_extra[@]}"}
  rm -f "$OUT_DIR"/tuning/*.tmp  # a write cut off by the timeout (the complete file is kept)
  ls "$OUT_DIR"/tuning/*.json >/dev/null 2>&1 || note "      record: no dispatch file was written"
  echo "$VERSIONS"
  tail -n 17 "$BENCH_LOG"
fi

# ---------------------------------------------------------------- 7: compute-sanitizer memcheck (optional, last)
if ! wanted sanitizer; then skip_phase sanitizer "not selected"
elif (( DRY )); then
  note "DRY   sanitizer: the memcheck needs a GPU; collecting its tests instead (optional: a timeout warns)"
  run_phase sanitizer "$TESTS_LOG" "$PY" -m pytest tests/kernels/test_gpu.py -q --collect-only -p no:cacheprovider \
    -k test_sanitizer
else
  SAN="${SANITIZER:-}"
  [[ -z "$SAN" ]] && for c in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" "$(command -v compute-sanitizer 2>/dev/null)"; do
    [[ -n "$c" && -x "$c" ]] && { SAN=$c; break; }
  done
  left=$((TOTAL_BUDGET - $(elapsed)))
  if [[ -z "$SAN" ]]; then
    skip_phase sanitizer "compute-sanitizer not found (optional; set SANITIZER)"
  elif (( left < SANITIZER_NEEDS )); then
    skip_phase sanitizer "optional, ${left}s left < ${SANITIZER_NEEDS}s (the earlier phases come first)"
  else
    # no caching allocator: memcheck then sees each tensor's own bounds; backend "cuda" only (memcheck
    # of Triton's JIT kernels adds minutes); the small shapes of test_sanitizer_every_op_small
    run_phase sanitizer "$TESTS_LOG" env FPET_TEST_BACKENDS=cuda PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SAN" --tool memcheck --error-exitcode 1 --print-limit 20 \
      "$PY" -m pytest tests/kernels/test_gpu.py -q -x -p no:cacheprovider -k test_sanitizer
    grep -E "ERROR SUMMARY|[0-9]+ (passed|failed)" "$TESTS_LOG" | tail -n 4
  fi
fi

# ---------------------------------------------------------------- report
for f in ops_table.md model_table.md; do  # each file starts with the versions line
  [[ -s "$OUT_DIR/$f" ]] && { echo; cat "$OUT_DIR/$f"; }
done
nfiles=$(find "$OUT_DIR" -type f | wc -l)
if (( nfiles > 8 )); then
  note "FAIL  outputs: $nfiles files in $OUT_DIR (at most 8 come back):"; find "$OUT_DIR" -type f | sed 's/^/  /'
  FAILED+=("outputs ($nfiles files > 8)")
fi
echo | tee -a "$SUMMARY"
note "== summary: $(elapsed)s of ${TOTAL_BUDGET}s budget$( (( DRY )) && echo ' (DRY RUN: GPU steps skipped)'), files in $OUT_DIR"
note "$VERSIONS"
for p in "${PHASES[@]}"; do
  note "$(printf '%-12s %-5s %8s  (estimate %s s)' "$p" "${STATUS[$p]:-?}" "${WALL[$p]:+${WALL[$p]}s}" "${EST[$p]}")"
done
(( ${#WARNED[@]} )) && note "WARNINGS (optional, not failures): ${WARNED[*]}"
if (( ${#FAILED[@]} )); then
  note "FAILED: ${FAILED[*]}"
  exit 1
fi
note "all phases passed$( (( DRY )) && echo ' (dry run)')$( (( ${#WARNED[@]} )) && echo ' (with warnings)')"
exit 0
