#!/usr/bin/env bash
# Prepare .carry/ on this (CPU) machine for a GPU-machine run of bench/gpu_run.sh, which lacks the
# tokenizer packages and ../shared: the peer script, the git sha, the GPU tests' dataset
# (syn192, built by `vpmoe data build`) and its teacher cache (a tiny random Qwen3 scored by
# `vpmoe teacher score`), and the SYNTH sample at 2048 tokens (bench/trainer_run.py). Then: run
# `bash bench/gpu_run.sh ...` on the device with carry [".carry"].
# .carry/ must be listed in .git/info/exclude. Idempotent; reuses what is already there.
# `bash bench/gpu_carry.sh FOLDER`: also keep the compile caches a call brought back (FOLDER holds its
# $OUT files compile_cache.tgz.N), replacing that GPU kind's archive .carry/compile_cache/<kind>.tgz.
set -euo pipefail
back=${1:+$(cd "$1" && pwd)}
cd "$(dirname "$0")/.."
if [ -n "$back" ]; then
  parts=("$back"/compile_cache.tgz.[0-9])
  [ -e "${parts[0]}" ] || { echo "gpu_carry: no compile_cache.tgz.N in $back (the call packed none)" >&2; exit 1; }
  # they stay packed here (~23 MB against ~185 MB unpacked; the carry limit is 64 MiB): gpu_run.sh unpacks
  mkdir -p .carry/compile_cache
  joined=.carry/compile_cache/joining.tmp
  cat "${parts[@]}" > "$joined"
  kind=$(tar -tzf "$joined" | awk -F/ 'NR == 1 {print $1}') || kind=""  # awk reads it all: no SIGPIPE
  [ -n "$kind" ] || { rm -f "$joined"; echo "gpu_carry: the archive in $back is unreadable or lists no GPU kind folder" >&2; exit 1; }
  mv "$joined" ".carry/compile_cache/$kind.tgz"
  echo "compile cache for $kind: $(du -sm ".carry/compile_cache/$kind.tgz" | cut -f1) MB packed"
fi
mkdir -p .carry
cp ../shared/bench/peer_hf_afmoe.py .carry/
sha=$(git rev-parse --short=12 HEAD)
[ -n "$(git status --porcelain --untracked-files=no)" ] && sha="$sha+dirty"
echo "$sha" > .carry/GIT_SHA
PYTHONPATH=$PWD python3 - <<'PY'
from pathlib import Path
from tests.test_train_helpers import build_tiny_teacher_cache, vpmoe, write_synthetic_parquet
carry = Path(".carry")
if not (carry / "syn192" / "manifest.json").exists():
    parquet = write_synthetic_parquet(carry / "syn.parquet")
    vpmoe("data", "build", "--input", str(parquet), "--out", str(carry / "syn192"), "--seq-len", "192",
          "--valid-fraction", "0.1", "--quiet")
if not (carry / "syn192_kd" / "cache" / "manifest.json").exists():
    build_tiny_teacher_cache(carry / "syn192", carry / "syn192_kd")
# the real SYNTH sample packed at the model's 2048 tokens, for bench/trainer_run.py (`vpmoe train` timed)
if not (carry / "synth2048" / "manifest.json").exists():
    vpmoe("data", "build", "--input", "../shared/data/synth_sample/synth_train.parquet", "--out",
          str(carry / "synth2048"), "--seq-len", "2048", "--valid-fraction", "0.1", "--quiet")
PY
rm -rf .carry/syn192_kd/teacher  # only the cache travels (the teacher is 50 MB)
carried=$(du -sm .carry | cut -f1)  # the repo and .carry travel together, 64 MiB at most
[ "$carried" -le 56 ] || echo "gpu_carry: .carry is ${carried} MB; drop .carry/compile_cache/<kind>.tgz archives to fit 64 MiB" >&2
du -sh .carry
echo "carry ready: $(cat .carry/GIT_SHA)"
