#!/usr/bin/env bash
# One command for a GPU session (sized for <= 8 minutes on one H100/H200):
#   1. install fastrlhf (editable, no deps: the GPU image has torch/triton/transformers/peft) and the
#      optional peers from ./.whl if present (see benchmarks/fetch_wheels.sh; the machine has no network),
#   2. run the kernel correctness tests natively on the GPU (not under the Triton interpreter),
#   3. run the full benchmark suite with a time budget, then the report (CSV, README tables, plots).
# Outputs go to benchmarks/results/ and, when $OUT is set (device tool), are copied there too.
#   device run: carry [".whl"], command: bash benchmarks/gpu_run.sh, timeout_s 560
# Afterwards, on the dev machine: cp <files_at>/*.csv benchmarks/results/ && python -m benchmarks.report
# (regenerates results/README.md, the plots and the README's bench section from every CSV), commit.
# Env: BENCH_MINUTES (default 5) caps the suite; TEST_MINUTES (default 2) caps the tests;
#      BENCH_DEVICE (default cuda), BENCH_RESULTS (default benchmarks/results), BENCH_ARGS (extra
#      arguments, e.g. "--only gae,token_logprobs") exist to smoke-test this script on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUTDIR=${OUT:-}
log() { echo "[gpu_run $(date +%H:%M:%S)] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if ls .whl/*.whl >/dev/null 2>&1; then
  log "installing peer wheels from .whl/"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
log "installing fastrlhf (editable, no deps)"
if ! $PY -m pip install -q --no-deps --no-build-isolation -e .; then
  # No usable setuptools there: lay the package out by hand (kernels/ installs as fastrlhf.kernels).
  log "editable install failed; using a copied package tree"
  rm -rf /tmp/frsrc && mkdir -p /tmp/frsrc && cp -r fastrlhf /tmp/frsrc/ && cp -r kernels /tmp/frsrc/fastrlhf/kernels
  export PYTHONPATH=/tmp/frsrc:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
$PY - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for m in ("fastrlhf.kernels", "liger_kernel", "trl.trainer.utils", "matplotlib"):
    try:
        importlib.import_module(m); print("ok  ", m)
    except Exception as e:
        print("MISSING", m, type(e).__name__, e)
PY

log "kernel correctness tests on the GPU (native Triton, not the interpreter)"
# Only the kernel files: the trainer/CLI tests are CPU tests. pytest-xdist (in the GPU image) spreads
# the Triton JIT compiles over the host cores; no -x, so one failure does not hide the others.
KERNEL_TESTS="tests/test_logprobs.py tests/test_ppo.py tests/test_advantages.py tests/test_preference.py"
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
timeout "$(awk "BEGIN{print int(60*${TEST_MINUTES:-2})}")" \
  $PY -m pytest $KERNEL_TESTS -q -p no:cacheprovider $XDIST --maxfail=40 -rfE 2>&1 \
    | tee /tmp/gpu_tests.log | tail -40
log "tests exit: ${PIPESTATUS[0]} (124 = cut by TEST_MINUTES)"

log "benchmark suite"
RESULTS=${BENCH_RESULTS:-benchmarks/results}
$PY -m benchmarks --device "${BENCH_DEVICE:-cuda}" --max-minutes "${BENCH_MINUTES:-5}" --results-dir "$RESULTS" \
  ${BENCH_ARGS:-} 2>&1 | tee /tmp/gpu_bench.log | grep -v "^  "
log "suite exit: ${PIPESTATUS[0]}"

if [ -n "$OUTDIR" ]; then
  # The device tool returns at most 8 files, 2 folders deep: CSV + results README + logs + a tarball of plots.
  cp "$RESULTS"/*.csv "$RESULTS"/README.md "$OUTDIR"/ 2>/dev/null
  cp /tmp/gpu_tests.log /tmp/gpu_bench.log "$OUTDIR"/ 2>/dev/null
  tar czf "$OUTDIR"/plots.tgz -C "$RESULTS" $(cd "$RESULTS" && ls *.png 2>/dev/null) 2>/dev/null
  ls -la "$OUTDIR"
fi
log "done"
