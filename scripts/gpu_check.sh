#!/usr/bin/env bash
# The one command for a lent GPU machine (no network; its own python3 with torch):
#   bash scripts/gpu_check.sh OUTDIR
# Builds from source against that machine's torch for sm_90a with all cores, runs the tests
# (CUDA ones included), compute-sanitizer memcheck and racecheck over a small CUDA subset, and
# the quick benchmark; logs, JUnit XML and benchmark JSON/PNG go to OUTDIR. Each step has its
# own time limit so the whole run stays under 9 minutes; a summary table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: scripts/gpu_check.sh OUTDIR}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export TORCH_EXT_EXPECT_CUDA_BUILD=1
# Small CUDA cases only: the sanitizers slow kernels down 10-100x.
SANITIZER_TESTS=(tests/test_silu_and_mul.py tests/test_conv.py tests/test_weight_only.py tests/test_w8a8.py tests/test_fp8.py
                 tests/test_moe_route.py tests/test_fused_moe.py tests/test_block_sparse_attention.py tests/test_moba.py -m cuda)
SANITIZER_K="(matches_reference and not 14336 and not 4096) or named_layers or odd_shapes or strided or one_hot or bitwise or cuda_matches_cpu or skewed or graph_capture or (forward and not 4097)"

declare -a SUMMARY
step() {  # step NAME LIMIT_SECONDS COMMAND...  (output to OUT/NAME.log)
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local status=ok
  [ $rc -eq 124 ] && status="TIMEOUT(${limit}s)" || { [ $rc -ne 0 ] && status="FAIL(rc=$rc)"; }
  SUMMARY+=("$(printf '%-12s %-14s %5ss  %s' "$name" "$status" $((SECONDS - start)) "$OUT/$name.log")")
  return $rc
}

{ nvidia-smi; "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } \
  >"$OUT/machine.txt" 2>&1
step build 240 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . &&
  step info 60 "$PY" -m torch_ext info &&
  {
    step tests 180 "$PY" -m pytest -q -rs tests --junitxml="$OUT/junit.xml"
    step memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 1 --target-processes all \
      "$PY" -m pytest -q -p no:cacheprovider "${SANITIZER_TESTS[@]}" -k "$SANITIZER_K"
    step racecheck 120 compute-sanitizer --tool racecheck --error-exitcode 1 --target-processes all \
      "$PY" -m pytest -q -p no:cacheprovider "${SANITIZER_TESTS[@]}" -k "($SANITIZER_K) and (float32 or nchw)"
    step bench 180 "$PY" -m torch_ext bench --quick --out "$OUT/bench"
  }
# Keep the tail of each failing log visible in the reply.
for log in "$OUT"/*.log; do
  if grep -qE "FAILED|Error|error:|ERROR SUMMARY: [1-9]" "$log"; then echo "== tail of $log"; tail -25 "$log"; fi
done
echo
tail -40 "$OUT/bench.log" 2>/dev/null
echo
echo "step         status         time   log"
printf '%s\n' "${SUMMARY[@]}"
