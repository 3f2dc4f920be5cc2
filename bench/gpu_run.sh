#!/usr/bin/env bash
# One GPU-machine command: fast-path tests, the peer baseline, then our train-step benchmark, in
# the same run so ratios compare like with like. The peer script is carried in .carry/ (it lives
# in ../shared, which does not travel). Usage: bash bench/gpu_run.sh [cases] [steps]
set -uo pipefail
cases=${1:-a,b,c}
steps=${2:-6}
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -x tests/gpu 2>&1 | tee "$out/gpu_tests.log" | tail -15
fi
: > "$out/peer.jsonl"
if [ "${SKIP_PEER:-0}" != 1 ]; then
  for b in 2 8; do
    case "$cases" in *a*|*b*) python3 .carry/peer_hf_afmoe.py --layers 20 --batch $b --seq 2048 --impl grouped_mm 2>&1 | grep '^{' | tee -a "$out/peer.jsonl";; esac
  done
fi
python3 bench/train_step.py --cases "$cases" --steps "$steps" --peer "$out/peer.jsonl" --record 2>&1 | tee "$out/train_step.log" | grep -v Warning | tail -40
cp bench/RESULTS.md "$out/RESULTS.md"
