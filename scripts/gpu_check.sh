#!/usr/bin/env bash
# Correctness on a lent GPU machine (no network; its own python3 with torch). Usually run by
# scripts/gpu_session.sh; alone: bash scripts/gpu_check.sh OUTDIR [PHASE...]
# Phases (default all, in this order):
#   build     from source against that machine's torch, sm_90a, all cores
#   tests     the CUDA tests (-m cuda), over pytest-xdist workers of one thread each
#   tests_env the tests that depend on that machine's torch and transformers versions
#             (integrations, build) or on its CPU (AMX tiles, which the project VM lacks); the
#             CPU-only rest is CI's (a torch 2.11 venv reproduces it on the VM)
#   sanitize  compute-sanitizer memcheck and racecheck side by side over a small CUDA subset
#   bench     the quick CUDA benchmark
# Logs, JUnit XML and benchmark JSON/PNG go to OUTDIR; the summary table is printed last. Measured
# on an H200 (2026-11-26): build 55 s, tests 100 s (-n 14), sanitizers 40-130 s, bench 56 s; on an
# H100 the same day: build 71 s, the whole suite 150 s, memcheck 65 s beside racecheck 62 s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: scripts/gpu_check.sh OUTDIR [build tests tests_env sanitize bench]}"
shift
source scripts/gpu_lib.sh
gpu_phases build tests tests_env sanitize bench -- "$@"
mkdir -p "$OUT"
gpu_deadline_init 560
PY="${PYTHON:-python3}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export TORCH_EXT_EXPECT_CUDA_BUILD=1
export PYTHONUNBUFFERED=1
# Small CUDA cases only: the sanitizers slow kernels down 10-100x. (Not test_strided_operands:
# it reads kernel names through the profiler, and CUPTI does not run under the sanitizers.)
SANITIZER_TESTS=(tests/test_silu_and_mul.py tests/test_conv.py tests/test_weight_only.py tests/test_w8a8.py tests/test_fp8.py
                 tests/test_w8a8_hopper.py tests/test_moe_route.py tests/test_fused_moe.py tests/test_block_sparse_attention.py
                 tests/test_moba.py -m cuda)
SANITIZER_K="for_sanitizers or (matches_reference and not 14336 and not 4096) or named_layers or odd_shapes or (strided and not strided_operands) or one_hot or bitwise or cuda_matches_cpu or skewed or graph_capture or (forward and not 4097) or select_and_attention or select_large_head_dim or block_lists_equal_cpu or int8_linear_cuda or choice_sets or (hopper_backward and 128-64-128) or (gather_backward and D64 and b16) or (hopper_grouped_gemms and T100E8 and silu)"
# racecheck (slower still): fp32 / NCHW cases, plus one small case of each shared-memory kernel
# (attention, weight-only GEMM, MoBA, fused_moe in bf16 on mma.sync and wgmma: CUDA's fp32
# fused_moe is ATen).
RACECHECK_K="(($SANITIZER_K) and (float32 or nchw)) or for_sanitizers or (cuda_forward_backward and 64-64-16 and bfloat16) or (hopper_forward and 128-64-32 and bfloat16) or (hopper_backward and 128-64-128 and bfloat16) or (odd_shapes and 7-16-16) or (select_and_attention and bfloat16) or (gather_forward and bfloat16 and b16) or (gather_backward and D64 and b16 and bfloat16) or (select_large_head_dim and 256 and float32) or (forward_matches_reference and T5E4k2H33I17 and bfloat16) or (hopper_grouped_gemms and T100E8 and silu and bfloat16)"
PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
# A hung kernel must not eat the lease: every test gets a limit when pytest-timeout is there.
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 150)
# One OpenMP thread per worker: on the 16-core H200 machine, 8 workers of 16 threads beside the
# sanitizers got through 410 tests in 170 s; 14 one-thread workers alone ran all 936 in 98 s.
WORKERS=()
"$PY" -c "import xdist" 2>/dev/null && WORKERS=(-n "$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))")

ok=0
if has build; then
  { nvidia-smi; "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } \
    >"$OUT/machine.txt" 2>&1
  step build 220 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . &&
    step info 60 "$PY" -m torch_ext info || ok=1
fi
if [ $ok -eq 0 ]; then
  if has tests; then
    OMP_NUM_THREADS=1 step tests 150 "${PYTEST[@]}" "${WORKERS[@]}" -rfEs -m cuda tests --junitxml="$OUT/junit.xml"
  fi
  if has tests_env; then
    OMP_NUM_THREADS=1 step tests_env 90 "${PYTEST[@]}" "${WORKERS[@]}" -rfEs tests/test_hf_moe.py tests/test_hf_experts.py \
      tests/test_hf_attention.py tests/test_build.py tests/test_cli.py tests/test_amx.py \
      tests/test_block_sparse_attention.py::test_bf16_on_amx_tiles tests/test_moba.py::test_bf16_attention_on_amx_tiles \
      tests/test_fused_moe.py::test_bf16_panels_on_amx_tiles tests/test_fp8.py::test_cpu_kernel_on_amx_tiles --junitxml="$OUT/junit_env.xml"
  fi
  if has sanitize; then
    step memcheck 200 compute-sanitizer --tool memcheck --print-limit 20 --error-exitcode 1 --target-processes all \
      "${PYTEST[@]}" "${SANITIZER_TESTS[@]}" -k "$SANITIZER_K" &
    step racecheck 200 compute-sanitizer --tool racecheck --print-limit 20 --error-exitcode 1 --target-processes all \
      "${PYTEST[@]}" "${SANITIZER_TESTS[@]}" -k "$RACECHECK_K" &
    wait
  fi
  has bench && step bench 150 "$PY" -m torch_ext bench --quick --device cuda --out "$OUT/bench"
fi
# Keep the tail of each failing log visible in the reply.
for log in "$OUT"/*.log; do
  [ -e "$log" ] || continue
  if grep -qE "FAILED|Error|error:|ERROR SUMMARY: [1-9]" "$log"; then echo "== tail of $log"; tail -25 "$log"; fi
done
echo
echo "step           status         time   log"
cat "$OUT"/*.status 2>/dev/null
exit $ok
