#!/usr/bin/env bash
# One call on a lent GPU machine: everything that needs the GPU, most valuable evidence first,
# each step bounded in time, results written as they come, packed into at most 8 files.
#
#   PYTHONUNBUFFERED=1 GIT_SHA=<commit> bash benchmarks/gpu_run.sh OUTDIR [--quick] [--dry-run]
#
# Steps (benchmarks/gpu_plan.py counts what each compiles and predicts its seconds):
#   1. facts: nvidia-smi, versions, git sha, device copy bandwidth and bf16 matmul rate;
#   2. the CUDA extension, built for this GPU only, without pip
#      (PARGO_BUILD_CUDA=1 python3 setup.py build_ext --inplace): a failure is said at the top
#      of the summary, and the run goes on with Triton; meanwhile
#   3. the GPU test profile (tests/test_gpu_profile.py: every op x dtype x mask kind x pass,
#      compiled Triton against the float64 oracle) as parallel pytest processes, one per dtype
#      (benchmarks/gpu_steps.py), and once the extension is built its tests (the profile's
#      CUDA cases and the existing CUDA-extension test files);
#   4. the benchmarks (run_all.py: headline cases first), in what is left of the time budget;
#   5. the projector training step (bench_projectors.py);
#   6. summary.md (benchmarks/gpu_summary.py), then the pack.
# Every step runs under `timeout -s INT` (pytest and run_all print / merge what they have) with
# a kill after KILL_AFTER_S. OUTDIR ends with at most 8 files, none deeper than OUTDIR/a/b:
#   gpu_run.log (everything, written live), summary.md, tests.log, bench.md, build.log and
#   results.tgz (every log, JSON, markdown and plot of the run); the pack is refreshed after
#   every step and on any exit (signals included), so a run cut short still leaves them.
#
# --dry-run (or DRY_RUN=1): the same script on a CPU-only machine (no nvidia-smi, no CUDA):
# Triton under the interpreter, a few profile cases, the benchmarks' --smoke path; checks the
# script itself (tests/test_gpu_run.py runs it). The interpreter is `python3` unless PYTHON=.
# Knobs (seconds): TOTAL_S (530; dry 300), TEST_TIMEOUT_S (170, each Triton test process),
# TEST_WALL_S (260, the test step with the build), BUILD_TIMEOUT_S (240), BENCH_BUDGET_S (300),
# PROJ_TIMEOUT_S (75), KILL_AFTER_S (15); TEST_SELECT (a pytest -k expression ANDed with every
# test process's; dry: "pool-project-varlen"), TEST_PROCS (the test processes to run, of
# `gpu_steps.py --names`; default all), BENCH_ONLY (run_all --only; dry: band), BENCH_PHASES
# (run_all --phases; default all), WORK (the work folder; default a new one under /tmp).
set -u
OUT=${1:?usage: bash benchmarks/gpu_run.sh OUTDIR [--quick] [--dry-run]}
shift
QUICK=()
DRY_RUN=${DRY_RUN:-0}
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=(--quick) ;;
    --dry-run) DRY_RUN=1 ;;
    *) echo "unknown argument $arg" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
START=$(date +%s)
if [ "$DRY_RUN" = 1 ]; then
  TOTAL_S=${TOTAL_S:-300}; TEST_SELECT=${TEST_SELECT-pool-project-varlen}
  BENCH_ONLY=${BENCH_ONLY-band}; BENCH_BUDGET_S=${BENCH_BUDGET_S:-90}
else
  TOTAL_S=${TOTAL_S:-530}; TEST_SELECT=${TEST_SELECT-}; BENCH_ONLY=${BENCH_ONLY-}
  BENCH_BUDGET_S=${BENCH_BUDGET_S:-300}
fi
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-170}
TEST_WALL_S=${TEST_WALL_S:-260}
BUILD_TIMEOUT_S=${BUILD_TIMEOUT_S:-240}
PROJ_TIMEOUT_S=${PROJ_TIMEOUT_S:-75}
KILL_AFTER_S=${KILL_AFTER_S:-15}
PACK_RESERVE_S=20
W=${WORK:-$(mktemp -d /tmp/pargo-gpu-run.XXXXXX)}
mkdir -p "$W/tests" "$W/bench" "$W/proj"
[ "$DRY_RUN" = 1 ] && touch "$W/DRY_RUN"
export PYTHONUNBUFFERED=1 PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export GIT_SHA=${GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
exec > >(tee "$OUT/gpu_run.log") 2>&1
TEE_PID=$!

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( TOTAL_S - $(date +%s) + START )); }
step() { echo; echo "=== [$(elapsed) s] $*"; }
# record NAME RC SECONDS NOTE: one line per step for the summary
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >> "$W/steps.tsv"; }
# spawn SECONDS SIGNAL LOG CMD...: CMD under `timeout -s SIGNAL SECONDS` (pytest, run_all and
# bench_projectors report what they have on SIGINT), SIGKILL KILL_AFTER_S later, output appended
# to LOG, in the background (so a signal to this script is handled at once: on_signal passes it
# on to every registered timeout, which passes it to its command); its pid in SPAWNED
mkdir -p "$W/pids"
spawn() {
  local t=$1 sig=$2 log=$3
  shift 3
  [ "$t" -lt 1 ] && t=1
  timeout -s "$sig" -k "$KILL_AFTER_S" "$t" "$@" >> "$log" 2>&1 &
  SPAWNED=$!
  echo "$sig" > "$W/pids/$SPAWNED"
}
reap() {  # reap PID: wait for a spawned command; returns its exit status
  local rc
  while :; do
    wait "$1"; rc=$?
    kill -0 "$1" 2>/dev/null || break
  done
  rm -f "$W/pids/$1"
  return $rc
}
interrupted() { [ -e "$W/INTERRUPTED" ]; }
# pytest with Python's SIGINT handler set explicitly (a shell may start background commands
# with SIGINT ignored, which Python would keep), so `timeout -s INT` ends it with its summary
# printed; then os._exit (an interrupted torch can take long to tear down, past the kill)
PYTEST=("$PY" -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); import pytest; rc = int(pytest.main(sys.argv[1:])); sys.stdout.flush(); sys.stderr.flush(); os._exit(rc)')

pack() {  # the <= 8 files of OUTDIR; safe to call at any time, and again
  cp -f "$OUT/gpu_run.log" "$W/gpu_run.log" 2>/dev/null
  for f in "$W"/tests/*.log; do
    [ -e "$f" ] && { echo "===== ${f##*/}"; cat "$f"; echo; }
  done > "$OUT/tests.log.tmp" 2>/dev/null && mv -f "$OUT/tests.log.tmp" "$OUT/tests.log"
  [ -e "$W/build.log" ] && cp -f "$W/build.log" "$OUT/build.log"
  [ -e "$W/summary.md" ] && cp -f "$W/summary.md" "$OUT/summary.md"
  [ -e "$W/bench.md" ] && cp -f "$W/bench.md" "$OUT/bench.md"
  tar -czf "$OUT/results.tgz.tmp" -C "$W" --exclude=./pids . 2>/dev/null \
    && mv -f "$OUT/results.tgz.tmp" "$OUT/results.tgz"
  rm -f "$OUT/results.tgz.tmp" "$OUT/tests.log.tmp"
}
summarize() {
  timeout -s INT -k 10 60 "$PY" benchmarks/gpu_summary.py "$W" > "$W/summary.out" 2>&1 \
    || { echo "gpu_summary.py failed:"; cat "$W/summary.out"; \
         { echo "# GPU run summary (gpu_summary.py failed)"; echo; cat "$W/steps.tsv"; } > "$W/summary.md"; }
}
stop_spawned() {  # pass SIGINT (the build: SIGTERM) on to every running command, then wait
  local f n=0
  for f in "$W"/pids/*; do
    [ -e "$f" ] && kill -"$(cat "$f")" "${f##*/}" 2>/dev/null
  done
  while [ -n "$(ls "$W/pids")" ] && [ $n -lt 20 ]; do
    for f in "$W"/pids/*; do kill -0 "${f##*/}" 2>/dev/null || rm -f "$f"; done
    sleep 1; n=$((n + 1))
  done
  for f in "$W"/pids/*; do [ -e "$f" ] && kill -KILL "${f##*/}" 2>/dev/null && rm -f "$f"; done
}
BG_PIDS=()
FINISHED=0
finish() {  # the end of every run, whatever ended it
  [ "$FINISHED" = 1 ] && return
  FINISHED=1
  stop_spawned
  for pid in "${BG_PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  step "6. summary"
  summarize
  cat "$W/summary.md"
  pack
  echo "total $(elapsed) s; $OUT: $(ls "$OUT" | tr '\n' ' ')"
  exec >&- 2>&-
  wait "$TEE_PID" 2>/dev/null
}
on_signal() {
  trap '' INT TERM
  touch "$W/INTERRUPTED"
  echo "[gpu_run] $1 at $(elapsed) s: stopping, summarizing and packing what there is"
  record "interrupted" 130 "$(elapsed)" "$1"
  finish
  exit 130
}
trap finish EXIT
trap 'on_signal SIGINT' INT
trap 'on_signal SIGTERM' TERM

# ------------------------------------------------------------------------------------------
step "1. facts (dry run: $DRY_RUN)"
T0=$(date +%s)
{
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,power.limit --format=csv
  else
    echo "nvidia-smi: not found (no NVIDIA driver here)"
  fi
  echo "git $GIT_SHA"
  command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc: not on PATH"
  timeout -s INT -k 10 90 "$PY" - <<'PY'
import importlib, platform
import torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
for mod in ("triton", "numpy", "pytest", "xdist", "xformers", "flash_attn", "matplotlib"):
    try:
        print(mod, getattr(importlib.import_module(mod), "__version__", "?"))
    except Exception as e:
        print(mod, "not installed:", type(e).__name__)
if not torch.cuda.is_available():
    print("gpu none (CPU only: no copy bandwidth, no matmul rate)")
else:
    print("gpu", torch.cuda.get_device_name(0), "sm_%d%d" % torch.cuda.get_device_capability(0))
    def median_ms(fn, n=20):
        for _ in range(3):
            fn()
        times = []
        for _ in range(n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); b.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[n // 2]
    src = torch.randn(2**29, device="cuda").to(torch.bfloat16)  # 1 GiB, random (never zeros)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    print(f"copy {2 * src.numel() * 2 / ms / 1e6:.0f} GB/s (device-to-device, read + write, "
          f"1 GiB bf16, median of 20, CUDA events)")
    del src, dst
    a, b = (torch.randn(8192, 8192, device="cuda").to(torch.bfloat16) for _ in range(2))
    ms = median_ms(lambda: a @ b)
    print(f"matmul {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s (bf16 8192^3, median of 20)")
PY
} 2>&1 | tee "$W/env.txt"
record facts "${PIPESTATUS[0]}" $(( $(date +%s) - T0 ))
pack

# ------------------------------------------------------------------------------------------
step "2+3. CUDA extension build (this GPU only, no pip) || GPU test profile (Triton)"
if [ "$DRY_RUN" = 1 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  export TRITON_INTERPRET=1  # no CUDA: the Triton kernels run under the interpreter
else
  unset TRITON_INTERPRET
fi
TEST_START=$(date +%s)
TEST_DEADLINE=$(( TEST_START + TEST_WALL_S ))
[ $(( TEST_DEADLINE - START )) -gt $(( TOTAL_S - PACK_RESERVE_S )) ] && TEST_DEADLINE=$(( START + TOTAL_S - PACK_RESERVE_S ))
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
if [ -n "${TEST_PROCS:-}" ]; then
  read -r -a PROCS <<< "$TEST_PROCS"
else
  mapfile -t PROCS < <("$PY" benchmarks/gpu_steps.py --names)
fi
CUDA_PROC=cuda
pytest_proc() {  # pytest_proc NAME SECONDS: one test process of gpu_steps.py, its own log
  local name=$1 t=$2 args t0 rc i
  mapfile -t args < <("$PY" benchmarks/gpu_steps.py "$name")
  if [ -n "$TEST_SELECT" ]; then  # AND the selection into the process's -k
    for i in "${!args[@]}"; do
      [ "${args[$i]}" = "-k" ] && args[$((i + 1))]="(${args[$((i + 1))]}) and ($TEST_SELECT)"
    done
  fi
  t0=$(date +%s)
  echo "[tests:$name] pytest ${args[*]} (timeout $t s)"
  spawn "$t" INT "$W/tests/$name.log" "${PYTEST[@]}" -q -p no:cacheprovider \
    --junitxml="$W/tests/$name.xml" "${args[@]}"
  reap "$SPAWNED"; rc=$?
  record "tests:$name" "$rc" $(( $(date +%s) - t0 )) "$([ $rc = 124 ] && echo 'stopped at its time limit')"
  echo "[tests:$name] rc=$rc ($(( $(date +%s) - t0 )) s): $(tail -1 "$W/tests/$name.log")"
}
cuda_chain() {  # the build, then the CUDA-extension tests
  local t0 rc
  t0=$(date +%s)
  echo "[build] PARGO_BUILD_CUDA=1 PARGO_CUDA_ARCHS=${ARCH:-<setup.py default>} MAX_JOBS=16 $PY setup.py build_ext --inplace"
  spawn "$BUILD_TIMEOUT_S" TERM "$W/build.log" env PARGO_BUILD_CUDA=1 ${ARCH:+PARGO_CUDA_ARCHS=$ARCH} \
    MAX_JOBS=16 NVCC_THREADS="${NVCC_THREADS:-4}" "$PY" setup.py build_ext --inplace
  reap "$SPAWNED"; rc=$?
  if [ "$rc" = 0 ]; then
    "$PY" -c "import torch; from pargo_kernels import _cuda; why = _cuda.cuda_extension_reasons([torch.empty(0, device='cuda')]); print('[build] extension usable' if not why else '[build] built but not usable: ' + '; '.join(why)); raise SystemExit(bool(why))" >> "$W/build.log" 2>&1
    rc=$?
  fi
  record build "$rc" $(( $(date +%s) - t0 )) "$([ "$rc" = 0 ] && echo built || echo FAILED)"
  if [ "$rc" != 0 ]; then
    echo "[build] !!! CUDA EXTENSION BUILD FAILED (rc=$rc, $(( $(date +%s) - t0 )) s): $(grep -E 'pargo_kernels:|[Ee]rror' "$W/build.log" | tail -2 | tr '\n' ' ')"
    record "tests:$CUDA_PROC" - 0 "not run: the CUDA extension did not build"
    return
  fi
  echo "[build] ok ($(( $(date +%s) - t0 )) s)"
  if [[ " ${PROCS[*]} " == *" $CUDA_PROC "* ]] && ! interrupted; then
    pytest_proc "$CUDA_PROC" $(( TEST_DEADLINE - $(date +%s) ))
  fi
}
cuda_chain &
BG_PIDS+=($!)
for name in "${PROCS[@]}"; do
  [ "$name" = "$CUDA_PROC" ] && continue
  t=$(( TEST_DEADLINE - $(date +%s) ))
  [ "$t" -gt "$TEST_TIMEOUT_S" ] && t=$TEST_TIMEOUT_S
  pytest_proc "$name" "$t" &
  BG_PIDS+=($!)
done
for pid in "${BG_PIDS[@]}"; do wait "$pid"; done
BG_PIDS=()
echo "tests and build: $(( $(date +%s) - TEST_START )) s"
pack

# ------------------------------------------------------------------------------------------
BUDGET=$(( $(left) - PROJ_TIMEOUT_S - PACK_RESERVE_S - 25 ))
[ "$BUDGET" -gt "$BENCH_BUDGET_S" ] && BUDGET=$BENCH_BUDGET_S
BENCH_ARGS=(--out "$W/bench" --budget-s "$BUDGET" "${QUICK[@]}")
[ "$DRY_RUN" = 1 ] && BENCH_ARGS+=(--smoke)
[ -n "$BENCH_ONLY" ] && BENCH_ARGS+=(--only "$BENCH_ONLY")
[ -n "${BENCH_PHASES:-}" ] && BENCH_ARGS+=(--phases "$BENCH_PHASES")
step "4. benchmarks, headline cases first (budget $BUDGET s)"
if [ "$BUDGET" -ge 30 ]; then
  T0=$(date +%s)
  spawn $(( BUDGET + 20 )) INT "$W/bench/run_all.log" "$PY" benchmarks/run_all.py "${BENCH_ARGS[@]}"
  reap "$SPAWNED"; rc=$?
  tail -40 "$W/bench/run_all.log"
  record benchmarks "$rc" $(( $(date +%s) - T0 )) "budget $BUDGET s$([ $rc = 124 ] && echo ', stopped at its limit')"
else
  echo "benchmarks: not run, $BUDGET s left"
  record benchmarks - 0 "not run: $BUDGET s of budget left"
fi
pack

# ------------------------------------------------------------------------------------------
T=$(( $(left) - PACK_RESERVE_S ))
[ "$T" -gt "$PROJ_TIMEOUT_S" ] && T=$PROJ_TIMEOUT_S
step "5. projector training step, kernels vs reference (timeout $T s)"
if [ "$T" -ge 20 ]; then
  T0=$(date +%s)
  PROJ_ARGS=(--out "$W/proj" --budget-s $(( T - 15 )) "${QUICK[@]}")
  # dry run: the reference backend on the CPU (the interpreter's projector path has its own
  # test, tests/test_benchmarks_smoke.py)
  [ "$DRY_RUN" = 1 ] && PROJ_ARGS+=(--smoke --quick)
  spawn "$T" INT "$W/proj/bench_projectors.log" env ${TRITON_INTERPRET:+-u TRITON_INTERPRET} \
    "$PY" benchmarks/bench_projectors.py "${PROJ_ARGS[@]}"
  reap "$SPAWNED"; rc=$?
  tail -12 "$W/proj/bench_projectors.log"
  record projectors "$rc" $(( $(date +%s) - T0 ))
else
  record projectors - 0 "not run: $T s left"
fi
exit 0  # the EXIT trap summarizes and packs
