#!/usr/bin/env bash
# The test job: set up (venv + build), then the whole test suite (and the transformers
# integrations once more under transformers 4.x). CI runs exactly this.
# CUDA tests skip without a GPU; the CUDA sources are still compiled (sm_80 and sm_90a here
# unless TORCH_CUDA_ARCH_LIST says otherwise), so a CUDA compile error fails this job.
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}"
PY=$(bash scripts/setup_env.sh | tail -1)
if command -v nvcc >/dev/null 2>&1 && [ -z "${TORCH_EXT_CPU_ONLY:-}" ] && "$PY" -c "import torch,sys; sys.exit(0 if torch.version.cuda else 1)"; then
  export TORCH_EXT_EXPECT_CUDA_BUILD=1   # tests/test_build.py then insists the CUDA kernels were built
fi
"$PY" -m torch_ext info
"$PY" -m pytest -q "$@"
# The integrations support both transformers lines: with no arguments (the whole job), their
# tests run again under transformers 4.x when its packages can be installed locally.
if [ $# -eq 0 ]; then
  if OVERLAY=$(bash scripts/setup_transformers4.sh "$PY"); then
    PYTHONPATH="$OVERLAY" "$PY" -m pytest -q -p no:cacheprovider tests/test_hf_moe.py tests/test_hf_experts.py \
      tests/test_hf_attention.py tests/test_moe_route.py
  else
    echo "tests: transformers 4.x could not be installed: its integration run is skipped" >&2
  fi
fi
