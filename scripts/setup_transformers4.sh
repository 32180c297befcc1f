#!/usr/bin/env bash
# The transformers 4.x line for the integration tests: transformers 4.57 and the versions of
# its dependencies that differ from the 5.x venv's, installed (first time) into an overlay
# directory outside the clone, ~/.cache/torch_ext/transformers4 (or $TORCH_EXT_TF4_OVERLAY),
# which PYTHONPATH puts in front of the venv. Usage: OVERLAY=$(bash scripts/setup_transformers4.sh PY)
# Exits non-zero (and the caller skips the 4.x run) when the packages cannot be installed.
set -euo pipefail
PY="$1"
OVERLAY="${TORCH_EXT_TF4_OVERLAY:-$HOME/.cache/torch_ext/transformers4}"
if ! PYTHONPATH="$OVERLAY" "$PY" -c "import transformers, sys; sys.exit(0 if transformers.__version__.startswith('4.') else 1)" \
    >/dev/null 2>&1; then
  echo "setup: installing transformers 4.57 into $OVERLAY" >&2
  "$PY" -m pip install -q --target "$OVERLAY" --no-deps "transformers==4.57.6" "tokenizers>=0.22,<=0.23.0" \
    "huggingface_hub<1.0" requests urllib3 idna charset_normalizer certifi >&2
fi
PYTHONPATH="$OVERLAY" "$PY" -c "import transformers; assert transformers.__version__.startswith('4.')" >&2
echo "$OVERLAY"
