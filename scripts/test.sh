#!/usr/bin/env bash
# README command 2: install with test extras, then run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec python3 -m pytest -q "$@"
