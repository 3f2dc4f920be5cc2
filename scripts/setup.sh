#!/usr/bin/env bash
# Install vpmoe and what it needs into the current Python (idempotent, quiet when already done).
# torch first: a plain `pip install torch` may pull a multi-GB CUDA build; the pinned CPU release is
# what this project's CPU machines carry. A machine that already has torch (a GPU box) keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".${extras:+[$extras]}"
