#!/usr/bin/env bash
# README command 1: install, then run the main job on the embedded default (tiny, CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec vpmoe demo "$@"
