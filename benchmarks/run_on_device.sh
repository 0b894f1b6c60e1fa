#!/usr/bin/env bash
# One call on a lent GPU machine (see DEVELOPERS.md), ordered so that a timeout late in the run
# still leaves the evidence of the stages before it; logs, JSON and a one-line-per-stage
# summary under $OUT. Prepare here first (wheels the device lacks; it has CuPy, NumPy, pytest,
# hypothesis, PyTorch and JAX):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl array-api-compat
# and call the device tool with carry [".whl"] and `bash benchmarks/run_on_device.sh`.
#
# Stage limits add up to 9.5 minutes (570 s). Measured without a GPU: NVRTC compiles all 189
# kernel variants (27 modules, the largest 5 s) in 56 s on one core of the 2-core development
# VM, so stage a, cold caches, should take about a minute on the device's CPU; later stages
# reuse the compiled modules (CuPy's disk cache).
set -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
LOG=$OUT/log
SUMMARY=$OUT/summary
: >"$SUMMARY"
failed=0

stage() {  # stage NAME LIMIT_SECONDS COMMAND...: SIGINT at the limit, so pytest still reports
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "=== stage $name: $*" | tee -a "$LOG"
    timeout -s INT -k 20 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && failed=1
    echo "stage $name: exit $rc after $(($(date +%s) - start)) s (limit $limit s)" |
        tee -a "$SUMMARY"
}

PYTEST=(python3 -m pytest -m gpu -q -p no:cacheprovider -rfE --tb=short --durations=15
        -W ignore::DeprecationWarning tests/test_gpu.py)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
stage a 120 python3 benchmarks/device_checks.py variants   # every variant, compiled once
stage b 30 python3 benchmarks/device_checks.py ftz          # flush-to-zero, subnormals
stage c 120 env GPULOSS_REQUIRE_GPU=1 "${PYTEST[@]}" -k "not fuzz"
stage d 30 python3 benchmarks/device_checks.py torch        # requires grad, side stream
if SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer \
        2>/dev/null | head -1) && [ -n "$SANITIZER" ]; then
    stage e-racecheck 20 "$SANITIZER" --tool racecheck --error-exitcode 9 \
        python3 benchmarks/device_checks.py one_each
    stage e-memcheck 20 "$SANITIZER" --tool memcheck --error-exitcode 9 \
        python3 benchmarks/device_checks.py one_each
else
    echo "stage e: compute-sanitizer not on this machine; skipped" | tee -a "$SUMMARY"
fi
stage f 100 python3 benchmarks/gpu.py --out "$OUT" --quick
stage h 90 python3 benchmarks/linear.py --device cuda --rounds 3 --out "$OUT"  # issue 27
stage g 40 env GPULOSS_REQUIRE_GPU=1 GPULOSS_GPU_FUZZ_EXAMPLES="${GPULOSS_GPU_FUZZ_EXAMPLES:-200}" \
    "${PYTEST[@]}" -k fuzz
echo "--- summary" | tee -a "$LOG"
cat "$SUMMARY" | tee -a "$LOG"
exit $failed
