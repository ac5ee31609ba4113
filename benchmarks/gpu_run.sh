#!/usr/bin/env bash
# One call on a fresh GPU machine: facts, install, the whole test suite on CUDA, all benchmarks.
#
#   PYTHONUNBUFFERED=1 bash benchmarks/gpu_run.sh OUTDIR [--quick]
#
# Writes into OUTDIR: gpu_run.log (everything), env.txt, install.log, tests.log, the benchmark
# JSON / markdown / PNGs (<date>-<device>.*), one log per benchmark script and raw/ rows.
# Finishes inside ~9 minutes: each step is under `timeout`; the benchmarks (run_all.py: every
# script in its SCRIPTS, bench_varlen.py included) get what is left
# (at most BENCH_BUDGET_S), then the projector training-step benchmark (PROJ_TIMEOUT_S).
# Tunables: TEST_TIMEOUT_S (default 200), BENCH_BUDGET_S (default 230), PROJ_TIMEOUT_S (default
# 90), TOTAL_S (default 520).
set -u
OUT=${1:?usage: bash benchmarks/gpu_run.sh OUTDIR [--quick]}
shift
EXTRA=("$@")
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
START=$(date +%s)
TOTAL_S=${TOTAL_S:-520}
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-200}
BENCH_BUDGET_S=${BENCH_BUDGET_S:-230}
PROJ_TIMEOUT_S=${PROJ_TIMEOUT_S:-90}
exec > >(tee -a "$OUT/gpu_run.log") 2>&1
elapsed() { echo $(( $(date +%s) - START )); }
step() { echo; echo "=== [$(elapsed) s] $*"; }

step "device and versions"
nvidia-smi || true
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,power.limit --format=csv || true
{
  python - <<'PY'
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
      torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton missing", e)
for mod in ("xformers", "flash_attn", "matplotlib", "numpy", "pytest"):
    try:
        m = __import__(mod); print(mod, getattr(m, "__version__", "?"))
    except Exception as e:
        print(mod, "not installed:", type(e).__name__)
PY
  nvcc --version 2>/dev/null | tail -2 || echo "nvcc not on PATH"
  git rev-parse HEAD 2>/dev/null || echo "git sha: unknown"
} 2>&1 | tee "$OUT/env.txt"

step "install (no deps, preinstalled torch, CUDA extension for this GPU only)"
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
export MAX_JOBS=16 NVCC_THREADS=${NVCC_THREADS:-4} PARGO_CUDA_ARCHS=${ARCH:-90}
if timeout 240 python -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1; then
  echo "install ok"; tail -3 "$OUT/install.log"
else
  echo "install FAILED (rc=$?), using the checkout through PYTHONPATH; see install.log"
  tail -20 "$OUT/install.log"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
python -c "import pargo_kernels, os; print('pargo_kernels from', os.path.dirname(pargo_kernels.__file__)); \
import importlib.util as u; print('CUDA extension:', 'present' if u.find_spec('pargo_kernels._C') else 'absent')"

step "test suite on CUDA (timeout ${TEST_TIMEOUT_S} s)"
set -o pipefail
timeout "$TEST_TIMEOUT_S" python -m pytest tests -q -ra -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
TEST_RC=$?
set +o pipefail
echo "tests rc=$TEST_RC (124 = timeout)"

LEFT=$(( TOTAL_S - $(elapsed) - 40 - PROJ_TIMEOUT_S ))
BUDGET=$(( LEFT < BENCH_BUDGET_S ? LEFT : BENCH_BUDGET_S ))
if [ "$BUDGET" -lt 60 ]; then
  BUDGET=60
  EXTRA+=(--quick)
fi
step "benchmarks (budget ${BUDGET} s ${EXTRA[*]:-})"
timeout $(( BUDGET + 80 )) python benchmarks/run_all.py --out "$OUT" --budget-s "$BUDGET" "${EXTRA[@]}"
BENCH_RC=$?
echo "benchmarks rc=$BENCH_RC (124 = timeout)"

step "projector training step, kernels vs reference (timeout ${PROJ_TIMEOUT_S} s)"
timeout "$PROJ_TIMEOUT_S" python benchmarks/bench_projectors.py --out "$OUT" \
  --budget-s $(( PROJ_TIMEOUT_S - 25 )) 2>&1 | tee "$OUT/bench_projectors.log"

step "summary"
echo "tests: rc=$TEST_RC  $(tail -1 "$OUT/tests.log" 2>/dev/null)"
J=$(ls -t "$OUT"/*.json 2>/dev/null | head -1)
if [ -n "$J" ]; then
  python benchmarks/report.py "$J" --summary
else
  echo "no benchmark JSON written"
fi
echo "total $(elapsed) s; results in $OUT"
