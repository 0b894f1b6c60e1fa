#!/usr/bin/env bash
# One call on a lent GPU machine (see DEVELOPERS.md): the GPU tests, then the GPU benchmark,
# logs and JSON under $OUT. Prepare here first:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl array-api-compat
# and call the device tool with carry [".whl"] and this script as the command.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/log"
GPULOSS_REQUIRE_GPU=1 timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider \
    -W ignore::DeprecationWarning tests/test_gpu.py 2>&1 | tee -a "$OUT/log"
tests_rc=$?
timeout 240 python3 benchmarks/gpu.py --out "$OUT" --quick 2>&1 | tee -a "$OUT/log"
exit $tests_rc
