#!/usr/bin/env bash
# The one command for a lent GPU machine (no network; its own python3 with torch):
#   bash scripts/gpu_check.sh /tmp/gc; tar czf $OUT/gpu_check.tgz -C /tmp gc
# (the device tool brings back at most 8 files: fetch the folder as one archive).
# Builds from source against that machine's torch for sm_90a with all cores; runs the whole test
# suite (CUDA tests included) spread over pytest-xdist workers of one thread each; then, side by
# side, compute-sanitizer memcheck and racecheck over a small CUDA subset; then, alone on the GPU,
# the quick CUDA benchmark (scripts/gpu_perf.sh, a second call on the same warm machine, measures
# the issues' GPU targets and profiles our kernels). Logs, JUnit XML and benchmark JSON/PNG go to OUTDIR; a summary table
# is printed last. Measured on an H200 (2026-11-26): build 55 s, tests 100 s (-n 14), sanitizers
# 40-130 s, bench 56 s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: scripts/gpu_check.sh OUTDIR}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export TORCH_EXT_EXPECT_CUDA_BUILD=1
export PYTHONUNBUFFERED=1
# Small CUDA cases only: the sanitizers slow kernels down 10-100x.
SANITIZER_TESTS=(tests/test_silu_and_mul.py tests/test_conv.py tests/test_weight_only.py tests/test_w8a8.py tests/test_fp8.py
                 tests/test_w8a8_hopper.py tests/test_moe_route.py tests/test_fused_moe.py tests/test_block_sparse_attention.py
                 tests/test_moba.py -m cuda)
SANITIZER_K="for_sanitizers or (matches_reference and not 14336 and not 4096) or named_layers or odd_shapes or strided or one_hot or bitwise or cuda_matches_cpu or skewed or graph_capture or (forward and not 4097)"
PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
# A hung kernel must not eat the lease: every test gets a limit when pytest-timeout is there.
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 150)
# One OpenMP thread per worker: on the 16-core H200 machine, 8 workers of 16 threads beside the
# sanitizers got through 410 tests in 170 s; 14 one-thread workers alone ran all 936 in 98 s.
WORKERS=()
"$PY" -c "import xdist" 2>/dev/null && WORKERS=(-n "$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))")

step() {  # step NAME LIMIT_SECONDS COMMAND...  (output to OUT/NAME.log, status line to OUT/NAME.status)
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local status=ok
  [ $rc -eq 124 ] && status="TIMEOUT(${limit}s)" || { [ $rc -ne 0 ] && status="FAIL(rc=$rc)"; }
  printf '%-12s %-14s %5ss  %s\n' "$name" "$status" $((SECONDS - start)) "$OUT/$name.log" >"$OUT/$name.status"
  return $rc
}

{ nvidia-smi; "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } \
  >"$OUT/machine.txt" 2>&1
if step build 220 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . &&
   step info 60 "$PY" -m torch_ext info; then
  OMP_NUM_THREADS=1 step tests 200 "${PYTEST[@]}" "${WORKERS[@]}" -rfEs tests --junitxml="$OUT/junit.xml"
  step memcheck 200 compute-sanitizer --tool memcheck --print-limit 20 --error-exitcode 1 --target-processes all \
    "${PYTEST[@]}" "${SANITIZER_TESTS[@]}" -k "$SANITIZER_K" &
  step racecheck 200 compute-sanitizer --tool racecheck --print-limit 20 --error-exitcode 1 --target-processes all \
    "${PYTEST[@]}" "${SANITIZER_TESTS[@]}" -k "(($SANITIZER_K) and (float32 or nchw)) or for_sanitizers" &
  wait
  step bench 150 "$PY" -m torch_ext bench --quick --device cuda --out "$OUT/bench"
fi
# Keep the tail of each failing log visible in the reply.
for log in "$OUT"/*.log; do
  if grep -qE "FAILED|Error|error:|ERROR SUMMARY: [1-9]" "$log"; then echo "== tail of $log"; tail -25 "$log"; fi
done
echo
tail -40 "$OUT/bench.log" 2>/dev/null
echo
echo "step         status         time   log"
cat "$OUT"/*.status
