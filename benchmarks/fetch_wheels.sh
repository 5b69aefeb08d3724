#!/usr/bin/env bash
# Download here (PyPI) the wheels benchmarks/gpu_run.sh installs on the GPU machine, which has no network.
#
#   bash benchmarks/fetch_wheels.sh            -> .whl/ : liger-kernel 0.8.5, trl 1.16.0 and what trl imports that
#                                                 the GPU image lacks (datasets, dill, multiprocess); pure Python,
#                                                 about 4 MiB. Carried by the measuring call: carry [".whl"].
#   bash benchmarks/fetch_wheels.sh --cutedsl  -> also nvidia-cutlass-dsl 4.8.1 for CUDA 13, which Liger's CuTe
#                                                 sm_90 head needs. Its compiler-library wheel (libs-cu13) is 88 MiB,
#                                                 more than the 64 MiB one device call may carry, so it is cut in
#                                                 two halves: .cutedsl-a/ (one half; a first, short call stages it in
#                                                 /tmp of the machine) and .cutedsl-b/ (the other half, the small
#                                                 cutlass wheels and SHA256SUMS; carried by the measuring call).
#                                                 Without it the Liger head rows time Liger's torch loop and say so.
#
# All three folders are ignored by git (.gitignore). Sizes are printed at the end: the measuring call carries
# the repository (~2 MiB) + .whl + .cutedsl-b, which must stay under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
download() {  # dir, requirement...
  local dir=$1; shift
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d "$dir" "$@"
}

download .whl "liger-kernel==0.8.5" "trl==1.16.0" "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19"

if [ "${1:-}" = "--cutedsl" ]; then
  CUTLASS=4.8.1
  rm -rf .cutedsl-a .cutedsl-b /tmp/fetch-cutedsl && mkdir -p .cutedsl-a .cutedsl-b /tmp/fetch-cutedsl
  download .cutedsl-b "nvidia-cutlass-dsl==$CUTLASS" "nvidia-cutlass-dsl-libs-base==$CUTLASS" \
    "nvidia-cutlass-dsl-libs-core==$CUTLASS"
  download /tmp/fetch-cutedsl "nvidia-cutlass-dsl-libs-cu13==$CUTLASS"
  big=$(ls /tmp/fetch-cutedsl/nvidia_cutlass_dsl_libs_cu13-*.whl)
  name=$(basename "$big")
  (cd /tmp/fetch-cutedsl && sha256sum "$name") > .cutedsl-b/SHA256SUMS
  half=$(( ($(stat -c %s "$big") + 1) / 2 ))
  split -b "$half" -d -a 1 "$big" "/tmp/fetch-cutedsl/$name.part-"
  mv "/tmp/fetch-cutedsl/$name.part-0" .cutedsl-a/
  mv "/tmp/fetch-cutedsl/$name.part-1" .cutedsl-b/
  rm -rf /tmp/fetch-cutedsl
fi

du_mib() { du -sb "$@" 2>/dev/null | awk '{s += $1} END {printf "%.1f MiB", s / 1048576}'; }
ls -la .whl .cutedsl-a .cutedsl-b 2>/dev/null || true
echo "repository (tracked files): $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | awk '{printf "%.1f MiB", $1 / 1048576}')"
echo ".whl: $(du_mib .whl)"
[ -d .cutedsl-b ] && echo ".cutedsl-a (staging call): $(du_mib .cutedsl-a); .cutedsl-b (measuring call): $(du_mib .cutedsl-b)"
exit 0
