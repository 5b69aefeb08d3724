#!/usr/bin/env bash
# Download (on a machine with PyPI access) the wheels benchmarks/gpu_run.sh installs on a GPU machine
# that has no network: the optional peers (liger-kernel, trl) and what trl imports that the GPU image
# lacks (datasets and its dill/multiprocess). Pure-Python wheels, ~3 MiB in all, into .whl/ (ignored).
#   bash benchmarks/fetch_wheels.sh && <device run with carry=[".whl"]> bash benchmarks/gpu_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-python3}
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "liger-kernel==0.8.5" "trl==1.16.0" "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19"
ls -la .whl
