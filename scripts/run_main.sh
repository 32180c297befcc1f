#!/usr/bin/env bash
# The main job: set up (venv + build), then the quick benchmark on every device present.
# Results (JSON per run, PNG per op family) go to ${1:-bench_results}.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh | tail -1)
"$PY" -m torch_ext info
exec "$PY" -m torch_ext bench --quick --out "${1:-bench_results}"
