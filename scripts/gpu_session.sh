#!/usr/bin/env bash
# The one command for a lent GPU machine (15 minutes of device time in all, start-up included,
# 600 s per command; at most 8 files come back):
#   bash scripts/gpu_session.sh $OUT      (run with timeout_s 600)
# Everything in priority order under one deadline (GPU_SECONDS, default 560 s after the start):
# build, the CUDA tests, the GPU targets' benchmarks (scripts/gpu_perf.sh targets), the ncu
# profile of the target kernels (what decides the next kernel changes), the version- and
# host-dependent tests (integrations, AMX), the sanitizers, the quick benchmark. The work happens in
# /tmp/gpu (scratch space beside the repo copy); after every step it is re-archived into
# $OUT/gpu.tgz, so a call cut short returns all that finished. $OUT/summary.txt has the status table.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${1:?usage: scripts/gpu_session.sh OUTDIR}"
export GPU_DEADLINE=$(( $(date +%s) + ${GPU_SECONDS:-560} ))
export OUT=/tmp/gpu GPU_ARCHIVE="$DEST/gpu.tgz" GPU_ARCHIVE_ROOT=/tmp/gpu
mkdir -p "$OUT" "$DEST"
summary() { { echo "check:"; cat "$OUT"/check/*.status; echo "perf:"; cat "$OUT"/perf/*.status; } 2>/dev/null | tee "$DEST/summary.txt"; }
# (gpu_check.sh fails only when the build does: then nothing else can run.)
bash scripts/gpu_check.sh "$OUT/check" build tests || { summary; exit 1; }
# The targets stop 100 s early so that the profile (90 s) always gets its turn.
GPU_DEADLINE=$(( GPU_DEADLINE - 100 )) bash scripts/gpu_perf.sh "$OUT/perf" targets
bash scripts/gpu_perf.sh "$OUT/perf" profile
bash scripts/gpu_check.sh "$OUT/check" tests_env sanitize bench
summary
