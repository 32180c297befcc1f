#!/usr/bin/env bash
# Performance on a lent GPU machine. Usually run by scripts/gpu_session.sh after the build and
# tests; alone: bash scripts/gpu_perf.sh OUTDIR [targets] [profile] (builds first when torch_ext
# is not importable, e.g. on a fresh machine).
# targets: the cases that decide the open issues' GPU targets, ours and the baselines in one run,
#   in priority order: weight-only 8192 x 8192 4-bit g128 fp16/bf16 M = 1, 16, 64, 4096 and
#   W8A8/fp8 at M = 1, 16, 64, 4096 (the wgmma kernel at large M), quantize_per_token on 4096 x
#   14336 (issue 5's bandwidth target), dequantize_weight; weight-only M = 64 on the opt-in
#   wgmma batch GEMM (TORCH_EXT_WO_WGMMA=1); W8A8 M = 4096 on the copy-engine variant
#   (TORCH_EXT_WGMMA_TMA=1); block-sparse attention forward dense (64- and
#   128-row query blocks, against SDPA's default and its flash backend) and 10% at S = 4096, 10%
#   at 32K (with compiled flex), MoBA at 4K and 32K, then the same on the Hopper wgmma forward
#   (TORCH_EXT_ATTENTION_WGMMA=1) and forward + backward at 32K with the Hopper backward too
#   (TORCH_EXT_ATTENTION_WGMMA_BWD=1); MoBA forward + backward with the key-block-major backward
#   (TORCH_EXT_MOBA_GATHER_BACKWARD=1) against the union lists'; fused MoE Mixtral T = 1, 64 and 4096 and
#   moe_route, T = 64 and 4096 again with the Hopper grouped GEMMs (TORCH_EXT_MOE_WGMMA=1), T = 4096
#   with their copy-engine variant (TORCH_EXT_MOE_WGMMA_TMA=1); fused_moe
#   fused vs grouped by token count (scripts/moe_grouped_sweep.py); the weight-only split-K sweep
#   (scripts/wo_split_sweep.py); one token through Llama-3-8B-shaped layers as CUDA graphs, stock
#   vs quantize_model; the GMMA instructions in the SASS. (The H100 run of 2026-11-26,
#   docs/perf/gpu-h100.md, measured the rest: 32K dense, W8A8 on mma.sync, the host-bound eager
#   Llama decode.)
# profile: ncu on the target cases' kernels only (weight-only decode GEMM and its reduction, the
#   W8A8 wgmma GEMM, the MoE decode chain and the Hopper grouped GEMMs at T = 64, the attention
#   forward, MoBA's key-block-major forward and merge at S = 4096 / block 16): speed of light,
#   occupancy, memory, and the warp-stall metrics as raw values (--page raw), one call per case.
# Every bench prints each case as it is measured and rewrites OUTDIR/NAME/bench-partial.json, so
# a step stopped at its limit keeps the cases it finished.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: scripts/gpu_perf.sh OUTDIR [targets] [profile]}"
shift
source scripts/gpu_lib.sh
gpu_phases targets profile -- "$@"
mkdir -p "$OUT"
gpu_deadline_init 560
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import torch_ext._C" 2>/dev/null; then
  bash scripts/gpu_check.sh "$OUT/check" build || exit 1
fi

bench() {  # bench NAME LIMIT_SECONDS ARGS...
  local name=$1 limit=$2; shift 2
  step "$name" "$limit" "$PY" -m torch_ext bench --device cuda "$@" --out "$OUT/$name"
}

if has targets; then
  # In priority order (a step that cannot start before the deadline is skipped): the kernels
  # changed since the last GPU run first.
  bench quant 120 --op quant w8a8 --match "M=1 8192x8192" --match "M=16 8192x8192" \
    --match "M=64 8192x8192" --match "M=4096 8192x8192" --match "T=4096 K=14336" --match "8192x8192 int4 g128 -> bf16"
  # The weight-only batch GEMM on wgmma (opt-in until it has run: test_linear_hopper_batch), at
  # M = 64 (16 < M <= 256 take that GEMM; larger M dequantize + cuBLAS).
  step quant_wgmma 40 env TORCH_EXT_WO_WGMMA=1 "$PY" -m torch_ext bench --device cuda --op quant \
    --match "M=64 8192x8192 int4" --out "$OUT/quant_wgmma"
  # W8A8 at M = 4096 on the copy-engine variant (2-CTA clusters, B multicast; opt-in until it has
  # run: test_tma_kernel_equals_ring_kernel in the check step) beside the cp.async kernel's rows in
  # quant above (int8 1008 TOPS on 2026-11-26: L2-bound or not is what this answers).
  step w8a8_tma 40 env TORCH_EXT_WGMMA_TMA=1 "$PY" -m torch_ext bench --device cuda --op w8a8 \
    --match "M=4096 8192x8192" --out "$OUT/w8a8_tma"
  # fused_moe's prefill with its GEMMs on Hopper wgmma (opt-in until it has run:
  # test_hopper_grouped_gemms in the check step) instead of torch._grouped_mm (issue 6: >= 1.3x
  # over sort + _grouped_mm at T = 4096), against eager and sort + _grouped_mm.
  step moe_wgmma 60 env TORCH_EXT_MOE_WGMMA=1 TORCH_EXT_MOE_GROUPED_FORWARD=0 "$PY" -m torch_ext bench --device cuda \
    --op fused_moe --match "mixtral T=64 " --match "mixtral T=4096" --out "$OUT/moe_wgmma"
  # The same GEMMs with B by the copy engine, shared by 2-CTA clusters within an expert
  # (TORCH_EXT_MOE_WGMMA_TMA=1, opt-in until it has run: test_hopper_tma_gemms_equal_ring).
  step moe_wgmma_tma 50 env TORCH_EXT_MOE_WGMMA=1 TORCH_EXT_MOE_WGMMA_TMA=1 TORCH_EXT_MOE_GROUPED_FORWARD=0 "$PY" -m \
    torch_ext bench --device cuda --op fused_moe --match "mixtral T=4096" --out "$OUT/moe_wgmma_tma"
  bench attention 90 --op attention --match "S=4096 full 100%" --match "S=4096 full 10%" \
    --match "S=32768 full 10%" --match "S=4096 block" --match "S=32768 block"
  # The same forward cases on the Hopper wgmma forward (opt-in until it has run: its tests are in
  # the check step, test_hopper_forward).
  step attention_wgmma 60 env TORCH_EXT_ATTENTION_WGMMA=1 "$PY" -m torch_ext bench --device cuda --op attention \
    --match "S=4096 full 100%" --match "S=32768 full 10%" --match "S=4096 block 16" --out "$OUT/attention_wgmma"
  # Forward + backward at 32K with both products of every kernel on wgmma (the backward opt-in
  # until it has run: test_hopper_backward in the check step), beside the default backward's rows
  # above (10%) and docs/perf/gpu-h100.md (100%: 324.7 ms, SDPA 103.0).
  step attention_wgmma_bwd 80 env TORCH_EXT_ATTENTION_WGMMA=1 TORCH_EXT_ATTENTION_WGMMA_BWD=1 "$PY" -m torch_ext bench \
    --device cuda --op "block_sparse_attention fwd+bwd" --match "S=32768 full" --out "$OUT/attention_wgmma_bwd"
  # MoBA forward + backward with the key-block-major backward (opt-in until it has run:
  # test_cuda_gather_backward in the check step) against the union lists' backward, same process.
  step moba_gather_bwd 70 env TORCH_EXT_MOBA_GATHER_BACKWARD=1 "$PY" -m torch_ext bench --device cuda \
    --op "moba_attention fwd+bwd" --match "S=4096" --match "S=32768" --out "$OUT/moba_gather_bwd"
  bench moe 90 --op moe --match "mixtral T=1 " --match "mixtral T=64 " --match "mixtral T=4096" \
    --match "moe_route"
  # fused_moe's forward by token count: fused kernel (mma.sync and wgmma GEMMs) against
  # torch._grouped_mm (where auto switches).
  PYTHONPATH=. step moe_grouped 90 "$PY" scripts/moe_grouped_sweep.py --tokens 1 16 64 256 512 4096 \
    --out "$OUT/moe_grouped"
  # Weight-only split-K: the planner's count against forced ones (TORCH_EXT_WO_SPLITS) at M = 1, 16, 64.
  PYTHONPATH=. step wo_splits 50 "$PY" scripts/wo_split_sweep.py --out "$OUT/wo_splits"
  # Four Llama-3-8B-shaped layers, one token, stock vs quantize_model, both as CUDA graph replays.
  bench model 60 --op model --match "CUDA graphs"
  # The warpgroup MMAs in the build's SASS (IGMMA int8, QGMMA fp8).
  cuobjdump -sass torch_ext/_C*.so 2>/dev/null | grep -oE "[HIQ]GMMA\.[A-Z0-9.]*" | sort | uniq -c >"$OUT/gmma_sass.txt"
fi
if has profile; then
  # (fused_moe at T = 64 with its GEMMs on wgmma: TORCH_EXT_MOE_WGMMA=1.)
  step profile 90 env TORCH_EXT_MOE_WGMMA=1 TORCH_EXT_MOE_GROUPED_FORWARD=0 ncu --profile-from-start off --clock-control none \
    -k "regex:linear_kernel|split_reduce|wgmma_mm|decode_gemm|plan_|grouped_wgmma|fwd_kernel|fwd_wgmma|gather_attention|merge_kernel" \
    --section SpeedOfLight --section Occupancy --section MemoryWorkloadAnalysis --section WarpStateStats --page raw \
    "$PY" -m torch_ext bench --profile-once --device cuda --op quant w8a8 moe attention \
    --match "M=1 8192x8192 int4 g128 bf16" --match "M=4096 8192x8192 -> bf16" --match "M=4096 8192x8192 e4m3" \
    --match "mixtral T=1 E=8 k=2 H=4096 I=14336 uniform" --match "mixtral T=64 E=8 k=2 H=4096 I=14336 uniform" \
    --match "S=4096 full 100%" --match "S=4096 block 16"
fi
cat "$OUT/gmma_sass.txt" 2>/dev/null
for name in quant quant_wgmma w8a8_tma wo_splits moe_grouped moe moe_wgmma moe_wgmma_tma attention attention_wgmma model; do
  [ -e "$OUT/$name.log" ] && grep -E "^  |rc=|error" "$OUT/$name.log" | head -40
done
# The kernel lines and, per kernel, duration, throughputs, occupancy and the main stall reasons.
[ -e "$OUT/profile.log" ] && grep -E "^\[|^  [a-zA-Z_]|gpu__time_duration.sum|dram__throughput.avg.pct_of_peak|sm__throughput.avg.pct_of_peak|sm__warps_active.avg.pct_of_peak|launch__registers_per_thread|issue_stalled_(long_scoreboard|short_scoreboard|barrier|wait|mio_throttle|math_pipe|lg_throttle|not_selected|no_instruction)" \
  "$OUT/profile.log" | head -200
echo "step           status         time   log"
cat "$OUT"/*.status 2>/dev/null
