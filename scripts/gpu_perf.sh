#!/usr/bin/env bash
# The second command for a lent GPU machine, after scripts/gpu_check.sh on the same warm machine
# (it reuses that build):
#   bash scripts/gpu_perf.sh /tmp/gp; tar czf $OUT/gpu_perf.tgz -C /tmp gp
# 1. targets: the cases that decide the open issues' GPU targets, ours and the baselines in one
#    run (weight-only 8192 x 8192 4-bit g128 fp16/bf16 M = 1, 16, 64, 4096; W8A8/fp8 at M = 1, 16,
#    4096; fused MoE Mixtral T = 1 and 4096; block-sparse attention dense and 10% at S = 4096 and 32K, with
#    compiled flex, forward and forward+backward; MoBA 64/top-8 and 16/top-32 at 32K; one token
#    through a 4-layer Llama-3-8B-shaped decoder, stock vs quantize_model).
#    W8A8 with the opt-in wgmma kernel (TORCH_EXT_WGMMA=1), then again on mma.sync, and the GMMA
#    instructions in SASS; the weight-only split-K sweep (scripts/wo_split_sweep.py).
# 2. profile: ncu's speed-of-light, launch, occupancy, memory and warp-stall sections of our
#    kernels, one call per quick case (bench --profile-once prints the order).
# Not measured yet as a whole; each step has its own limit, 585 s together at most.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: scripts/gpu_perf.sh OUTDIR}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
# One bench run per family, each with its own limit and JSON (a run killed at its limit writes none).
bench() {  # bench NAME LIMIT_SECONDS ARGS...
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$PY" -m torch_ext bench --device cuda "$@" --out "$OUT/$name" >"$OUT/$name.log" 2>&1
  echo "$name rc=$?"
}
# In priority order (a call cut at its limit keeps what came first); the limits sum to 585 s.
TORCH_EXT_WGMMA=1 bench quant 120 --op quant w8a8 --match "M=1 8192x8192" --match "M=16 8192x8192" --match "M=64 8192x8192" \
  --match "M=4096 8192x8192"
# Weight-only split-K: the planner's count against forced ones (TORCH_EXT_WO_SPLITS) at M = 1, 16, 64.
timeout 50 "$PY" scripts/wo_split_sweep.py --out "$OUT/wo_splits" >"$OUT/wo_splits.log" 2>&1
echo "wo_splits rc=$?"
# The same W8A8 cases on the mma.sync kernels, and the warpgroup MMAs in
# the build's SASS (IGMMA int8, QGMMA fp8): the A/B of csrc/quant/w8a8_wgmma.cu.
TORCH_EXT_WGMMA=0 timeout 45 "$PY" -m torch_ext bench --device cuda --op w8a8 --match "M=4096 8192x8192" \
  --out "$OUT/w8a8_mma_sync" >"$OUT/w8a8_mma_sync.log" 2>&1
echo "w8a8_mma_sync rc=$?"
cuobjdump -sass torch_ext/_C*.so 2>/dev/null | grep -oE "[HIQ]GMMA\.[A-Z0-9.]*" | sort | uniq -c >"$OUT/gmma_sass.txt"
bench attention 130 --op attention --match "S=4096 full 100%" --match "S=4096 full 10%" --match "S=32768 full" \
  --match "S=32768 block"
bench moe 90 --op moe --match "mixtral T=1 " --match "mixtral T=4096"
timeout 90 ncu --profile-from-start off --clock-control none --section SpeedOfLight --section LaunchStats \
  --section Occupancy --section MemoryWorkloadAnalysis --section WarpStateStats \
  "$PY" -m torch_ext bench --profile-once --quick --device cuda >"$OUT/profile.log" 2>&1
echo "profile rc=$?"
bench model 60 --op model
cat "$OUT/gmma_sass.txt"
cat "$OUT/wo_splits.log"
for name in quant w8a8_mma_sync attention moe model; do grep -v "^ \\|InputBuffer" "$OUT/$name.log" | tail -30; done
grep -E "^\\[|Duration|Memory Throughput|DRAM Throughput|Compute \\(SM\\) Throughput|Achieved Occupancy|Registers Per" \
  "$OUT/profile.log" | head -150
