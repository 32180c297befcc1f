#!/usr/bin/env bash
# Creates (first time) or reuses the Python environment, then builds torch_ext into it.
#
# The venv lives OUTSIDE the clone (a CUDA build of torch is ~5.6 GB), at $TORCH_EXT_VENV,
# default ~/.cache/torch_ext/venv, so every clone and every CI run reuses it. Prints the
# path of its python as the last line of stdout: PY=$(bash scripts/setup_env.sh | tail -1)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${TORCH_EXT_VENV:-$HOME/.cache/torch_ext/venv}"
PY="$VENV/bin/python"

if [ ! -x "$PY" ] || ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: creating $VENV (torch is several GB: a few minutes the first time)" >&2
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip >&2
  "$PY" -m pip install -q torch torchvision >&2
fi
# Cheap when everything is present already.
"$PY" -m pip install -q -r scripts/requirements-dev.txt >&2

echo "setup: building torch_ext (incremental; build/ keeps the objects)" >&2
"$PY" -m pip install -q --no-build-isolation --no-deps -e . >&2
echo "$PY"
