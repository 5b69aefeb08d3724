#!/usr/bin/env bash
# A GPU session's measurements in priority order, sized for ~7.5 minutes of one 15-minute device allowance.
# Each phase has its own time cap and writes its file before the next one starts, so a run cut short still
# returns what it measured:
#
#   phase  what                                                              cap    expected  file (under RUN_DIR)
#   setup  nvidia-smi, install the carried wheels and fastrlhf, versions     -      ~20 s     gpu_run.log (all output)
#   a      native tests of every kernel changed since the last GPU run,      120 s  ~60-90 s  a-tests.log,
#          then the small losses' host and GPU time per call (real launches)                  a-host-overhead.csv
#   b      e2e PPO + DPO steps (4 providers), with and without checkpointing 140 s  ~100-140  b-e2e/<device>.csv
#   c      the device's GEMM/copy ceilings, then the headline rows vs the    210 s  ~150-210  c-headline/<device>.csv
#          strongest peers only, fwd+bwd (compiles: Liger, torch.compile)
#   d      every other case and provider, until the overall budget is spent  rest   ~0-90 s   d-rest/<device>.csv
# (expected = estimates from the 2026-11-26 H200 logs and the CPU dry run, not measurements)
#
# The caps share one overall budget (GPU_RUN_SECONDS, default 450 = 7.5 min): a phase gets min(its cap, what is
# left), (d) gets what is left. Inside a benchmark phase python stops starting new cases at the cap minus a grace
# period ("skipped: time budget" rows) and `timeout` kills it at the cap; the CSV is rewritten after every case.
# RUN_DIR is $OUT on the device tool (at most 8 files come back: these are 6), else $BENCH_RUN_DIR
# (default /tmp/gpu_run). Nothing in the checkout is written.
#
# Device tool, after `bash benchmarks/fetch_wheels.sh` here (add --cutedsl for Liger's CuTe head, see there):
#   [only with --cutedsl] run(command="bash benchmarks/gpu_run.sh --stage-cutedsl", carry=[".cutedsl-a"], timeout_s=60)
#   run(command="bash benchmarks/gpu_run.sh", carry=[".whl", ".cutedsl-b"], timeout_s=540)
# then here:
#   python -m benchmarks.report --merge <files_at>/b-e2e <files_at>/c-headline <files_at>/d-rest --update-readme
#
# CPU dry run (small shapes, the same phases and files): BENCH_DEVICE=cpu bash benchmarks/gpu_run.sh
# Env: PHASES (default abcd), GPU_RUN_SECONDS (450), CAP_A / CAP_B / CAP_C (120 / 140 / 210 s), BENCH_DEVICE (cuda),
#      BENCH_RUN_DIR, PYTHON (python3), BENCH_QUICK (1 on CPU: the --quick shapes), PYTEST_WORKERS (8 on CUDA).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEVICE=${BENCH_DEVICE:-cuda}
STAGE=/tmp/cutedsl-stage

if [ "${1:-}" = "--stage-cutedsl" ]; then
  # The first of two calls: keep one half of the cutlass compiler wheel on the (warm) machine for the second.
  mkdir -p "$STAGE" && cp .cutedsl-a/* "$STAGE"/ && ls -la "$STAGE"
  exit $?
fi

RUN_DIR=${OUT:-${BENCH_RUN_DIR:-/tmp/gpu_run}}
mkdir -p "$RUN_DIR"
exec > >(tee -a "$RUN_DIR/gpu_run.log") 2>&1
TOTAL=${GPU_RUN_SECONDS:-450}
PHASES=${PHASES:-abcd}
T0=$SECONDS
QUICK=""
[ "$DEVICE" = "cpu" ] && [ "${BENCH_QUICK:-1}" = "1" ] && QUICK="--quick"
SUMMARY=()
log() { echo "[gpu_run $(date +%H:%M:%S) +$((SECONDS - T0))s] $*"; }
left() { echo $(( TOTAL - (SECONDS - T0) )); }

# ----------------------------------------------------------------------------- setup
log "device=$DEVICE run_dir=$RUN_DIR budget=${TOTAL}s phases=$PHASES"
if [ "$DEVICE" != "cpu" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
  SITE=/tmp/site
  if ls .whl/*.whl >/dev/null 2>&1; then
    log "installing the peer wheels from .whl/"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  fi
  if ls .cutedsl-b/*.part-1 >/dev/null 2>&1; then
    part=$(basename "$(ls .cutedsl-b/*.part-1)")
    whl=${part%.part-1}
    if [ -f "$STAGE/$whl.part-0" ]; then
      mkdir -p /tmp/cutedsl && cat "$STAGE/$whl.part-0" ".cutedsl-b/$part" > "/tmp/cutedsl/$whl"
      if (sums=$PWD/.cutedsl-b/SHA256SUMS && cd /tmp/cutedsl && sha256sum -c "$sums"); then
        log "installing nvidia-cutlass-dsl (Liger's CuTe head)"
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "/tmp/cutedsl/$whl" .cutedsl-b/*.whl \
          && export PYTHONPATH=$SITE/nvidia_cutlass_dsl/dsl_packages:$SITE${PYTHONPATH:+:$PYTHONPATH}
      else
        log "nvidia-cutlass-dsl: checksum mismatch after reassembly; Liger's head rows will record its fallback"
      fi
    else
      log "nvidia-cutlass-dsl: $STAGE/$whl.part-0 not staged (run --stage-cutedsl first); Liger's head rows will record its fallback"
    fi
  fi
  log "installing fastrlhf (editable, no deps)"
  if ! $PY -m pip install -q --no-deps --no-build-isolation -e .; then
    # No usable setuptools there: lay the package out by hand (kernels/ installs as fastrlhf.kernels).
    log "editable install failed; using a copied package tree"
    rm -rf /tmp/frsrc && mkdir -p /tmp/frsrc && cp -r fastrlhf /tmp/frsrc/ && cp -r kernels /tmp/frsrc/fastrlhf/kernels
    export PYTHONPATH=/tmp/frsrc:$PWD${PYTHONPATH:+:$PYTHONPATH} BENCH_ALLOW_OTHER_FASTRLHF=1
  fi
fi
$PY - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for m in ("fastrlhf.kernels", "liger_kernel", "trl.kernels", "cutlass",
          "liger_kernel.ops.cutedsl.ops.fused_scaled_cross_entropy_sm90"):
    try:
        mod = importlib.import_module(m)
        print("ok     ", m, getattr(mod, "__version__", ""))
    except Exception as e:
        print("MISSING", m, type(e).__name__, str(e)[:120])
PY

# ----------------------------------------------------------------------------- phases

rows_of() {  # csv -> "N ok, N skipped, N other"
  [ -f "$1" ] || { echo "no file"; return; }
  $PY - "$1" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
ok = sum(r["status"] == "ok" for r in rows)
skipped = sum(r["status"].startswith("skipped") for r in rows)
print(f"{len(rows)} rows: {ok} ok, {skipped} skipped (time budget), {len(rows) - ok - skipped} other")
PY
}

# run_phase LETTER CAP_SECONDS FILE COMMAND...: run COMMAND under min(CAP, budget left) seconds.
# "{MINUTES}" in COMMAND becomes the cap minus a grace period (when python stops starting cases).
run_phase() {
  local name=$1 want=$2 file=$3; shift 3
  if [[ $PHASES != *$name* ]]; then
    SUMMARY+=("$name  not selected (PHASES=$PHASES)")
    return
  fi
  local cap=$(( want < $(left) ? want : $(left) ))
  if (( cap < 15 )); then
    SUMMARY+=("$name  skipped: ${cap}s of the budget left")
    log "phase $name skipped: ${cap}s of the budget left"
    return
  fi
  local grace=$(( cap / 6 > 15 ? cap / 6 : 15 ))
  local minutes
  minutes=$(awk "BEGIN {printf \"%.2f\", ($cap - $grace) / 60}")
  local args=()
  for a in "$@"; do args+=("${a//\{MINUTES\}/$minutes}"); done
  log "phase $name: cap ${cap}s -> $file"
  local t=$SECONDS
  timeout -k 10 "$cap" "${args[@]}"
  local rc=$?
  local took=$((SECONDS - t))
  local what="exit $rc"
  (( rc == 124 || rc == 137 )) && what="CUT at the ${cap}s cap (exit $rc)"
  log "phase $name: $what after ${took}s"
  local detail
  if [[ $file == *.csv ]]; then detail=$(rows_of "$RUN_DIR/$file"); else detail=$(grep -E "passed|failed|error" "$RUN_DIR/$file" | tail -1); fi
  SUMMARY+=("$name  $what, ${took}s of cap ${cap}s -> $file: ${detail:-no result line}")
}

KERNEL_TESTS="tests/test_fused_head.py tests/test_logprobs.py tests/test_ppo.py tests/test_preference.py
  tests/test_advantages.py tests/test_double_backward.py tests/test_small_kernels.py tests/test_policy_logits.py"
XDIST=""
if [ "$DEVICE" != "cpu" ] && $PY -c "import xdist" 2>/dev/null; then XDIST="-n ${PYTEST_WORKERS:-8}"; fi
pytest_phase() {
  # no -x: one failure must not hide the others. Its output goes to a-tests.log and gpu_run.log.
  # shellcheck disable=SC2086
  $PY -m pytest $KERNEL_TESTS -q -p no:cacheprovider $XDIST --maxfail=40 -rfE 2>&1 | tee "$RUN_DIR/a-tests.log"
  local rc=${PIPESTATUS[0]}
  # The small losses at B x T = 64 x 1024: host time per call with real launches, GPU time per call.
  local device=cuda
  [ "$DEVICE" = "cpu" ] && device=cpu
  $PY -m benchmarks.host_overhead --device "$device" --reps 200 --csv "$RUN_DIR/a-host-overhead.csv" || rc=1
  return "$rc"
}
export -f pytest_phase 2>/dev/null
export PY KERNEL_TESTS XDIST RUN_DIR DEVICE

bench() {  # results subfolder, extra arguments
  local dir=$1; shift
  echo $PY -m benchmarks --device "$DEVICE" $QUICK --results-dir "$RUN_DIR/$dir" --no-report --max-minutes "{MINUTES}" "$@"
}

SLUG=$($PY -c "from benchmarks.device import detect; print(detect('$DEVICE').slug)")
run_phase a "${CAP_A:-120}" a-tests.log bash -c pytest_phase
# shellcheck disable=SC2046
run_phase b "${CAP_B:-140}" "b-e2e/$SLUG.csv" $(bench b-e2e --only e2e)
# shellcheck disable=SC2046
run_phase c "${CAP_C:-210}" "c-headline/$SLUG.csv" $(bench c-headline --headline)
# shellcheck disable=SC2046
run_phase d "$(left)" "d-rest/$SLUG.csv" $(bench d-rest --skip-headline --exclude e2e)

# ----------------------------------------------------------------------------- summary (the last lines)
log "headline rows (fastrlhf vs the best peer measured):"
[ -f "$RUN_DIR/c-headline/$SLUG.csv" ] && $PY -m benchmarks.report --results-dir "$RUN_DIR/c-headline" --print-only \
  | sed -n '/^| kernel/,/^$/p'
log "done in $((SECONDS - T0))s of the ${TOTAL}s budget"
printf '  %s\n' "${SUMMARY[@]}"
ls -la "$RUN_DIR" "$RUN_DIR"/*/ 2>/dev/null | grep -v "^total"
sleep 1  # let tee write the last lines into gpu_run.log
