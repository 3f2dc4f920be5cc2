#!/usr/bin/env bash
# One GPU-machine command: fast-path tests, the peer baseline, then our train-step benchmark, in
# the same run so ratios compare like with like. The peer script is carried in .carry/ (it lives
# in ../shared, which does not travel), and so are the git sha (.git may not travel) and the GPU
# tests' dataset and teacher cache: `bash bench/gpu_carry.sh` here first, then carry [".carry"].
# Usage: bash bench/gpu_run.sh [cases] [steps]
# Env: SKIP_TESTS=1, TESTS_AFTER=1 (tests after the benchmark), SKIP_PEER=1, SKIP_BENCH=1 (tests only), PEER_STEPS=12 (the peer's steps; its median moved ~45% between runs at 6), BREAKDOWN=a,b (cases with the component breakdown), OPT_SWEEP=1,
#      KD_BENCH=1 (also bench/kd_loss.py), KD_K=64 (train steps as offline-KD steps, top-64 targets), AC=1 (activation checkpointing), AC_BLOCKS=N (checkpoint the first N blocks only), MOMENTUM=float32 (the Muon momentum's stored dtype, optim.muon_momentum_dtype; default bf16), MOMENTS=float32 (the embedding's and head's AdamW moments, optim.adamw_moments_dtype; default bf16), MICRO=N (micro-batches per step, every case), LAYERS=N (every case at N layers: (d) at 40 fits an H100), PROFILE=1 (top kernels), TRAINER_RUN=1 (bench/trainer_run.py: `vpmoe train` timed; TRAINER_STEPS, TRAINER_ARGS), SCALING=1 (bench/scaling.py on every GPU of the machine; SCALING_GPUS=1,8, SCALING_ARGS="--check --modes fsdp,ep --set ..."), ATTN_BENCH=1 (bench/attention.py; ATTN_VARIANTS, ATTN_TOKENS, ATTN_KINDS, ATTN_FLEX: its --flex-options), MOE_BENCH=1 (bench/moe.py; MOE_TOKENS), SAVED_BENCH=1 (bench/saved_activations.py; SAVED_ROWS), GEMM_BENCH=1 (bench/expert_gemms.py; GEMM_SKEWS="0 1.5"), WGRAD_BENCH=1 (bench/wgrad.py; WGRAD_SKEWS="0 1", WGRAD_TOKENS=4096, WGRAD_ARGS="--outs bfloat16 --orders busiest --sq"), SORT_BENCH=1 (bench/routing_sort.py), EXPERT_MUON_BENCH=1 (bench/expert_muon.py; EXPERT_MUON_ARGS="--top 12"), OPTIM_BENCH=gram:256,gram:256:float32:stream=1 (bench/optim_step.py --methods; OPTIM_LAYERS, OPTIM_ARGS="--timeline --top 12"), GEN_BENCH=1 (bench/generate.py; GEN_LAYERS, GEN_ROWS, GEN_ARGS="--prompt 4096 --new 256 --paths grouped,captured"), DECODE_KERNELS=1 (bench/decode_kernels.py at GEN_LAYERS), MOE=fused (the train step with moe_fused; MOE=grouped_mm_wgrad: the grouped path with grouped-GEMM weight gradients, FUSED_WGRAD off), ROUTING=balanced (router biases balanced before timing), INDUCTOR=combo_kernels=True (torch._inductor.config settings for the train step, comma list), GRAD_SQ=off (the clipping norm reads the expert and embedding gradients whole, graphed.GRAD_SQ off), EMBED_ROWS=off (the embedding's dense [V, d] gradient instead of its rows, graphed.EMBED_ROWS off), LOW_GRADS=off|always (graphed.LOW_GRADS: fp32 expert gradients on the masters, or bf16 ones at every micro-batch count), LOSS_CHUNK=4096 (the fused loss's rows per chunk; default: the trainer's choice, a 2 GiB budget without checkpointing, else 1 GiB), MASK_TABLES=dense (Flex block tables by create_block_mask, flex.TABLES_FROM_RUNS off), WGRAD_ORDER=expert (the weight-gradient kernel's experts in id order, kernels.WGRAD_BUSIEST_FIRST off), ROUTE_KERNEL=off (the router's selection and statistics as torch work for Inductor, route_fused.ROUTE_KERNEL off), DENSE_COPIES=off (each block casts its own dense weights, dense_linear.DENSE_COPIES off), EXPAND_KV=off|local|global (Flex's k/v copied out to every query head where its backward has few programs, flex.EXPAND_KV: off, or one layer kind only), WEIGHT_COPIES=on|off (bf16 expert weights written by the update, graphed.WEIGHT_COPIES; default auto: where memory is plainly spare), FLEX_LOCAL=bwd_BLOCK_M1=32,... (Flex kernel_options for the windowed layers in the train step; `default`: torch's tiles), FLEX_GLOBAL (the same for the global layers), OPT=ns_pack=4,streams=3 (FastMuonAdamW keyword arguments in the train step), EXPERT_KERNELS=cols=32,mwarps=32,mstages=3,utiles=16,uwarps=16 (the experts' streaming Muon kernels' tiles and warps in the train step), PROBE=1 (the optimizer overlapped with the next forward + backward: an upper bound), ROWS_PROBE=1 (the rows as two halves on two streams: an upper bound), SAVES=lean (FastBody's LEAN_SAVES, train.lean_saves, instead of the partitioner's default: train step and saved_activations), RECORD=0, NS_CHUNK=256, TESTS=tests/gpu (pytest paths), TEST_K (pytest -k expression), COMPILE_CACHE=0 (no carried compile caches).
set -uo pipefail
cases=${1:-a,b,c}
steps=${2:-8}
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
[ -f .carry/GIT_SHA ] && export VPMOE_GIT_SHA=$(cat .carry/GIT_SHA)
# the GPU tests' dataset and teacher cache, prepared by bench/gpu_carry.sh (no tokenizer packages there)
[ -d .carry/syn192 ] && export VPMOE_GPU_DATA=${VPMOE_GPU_DATA:-$PWD/.carry/syn192}
[ -d .carry/syn192_kd/cache ] && export VPMOE_GPU_KD_CACHE=${VPMOE_GPU_KD_CACHE:-$PWD/.carry/syn192_kd/cache}
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (liger-kernel for bench/kd_loss.py)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
# sections go straight into $OUT/RESULTS.md as each benchmark case finishes, so a run cut short by
# the device's time limit still brings back what it measured (copy new sections into bench/RESULTS.md)
[ -f "$out/RESULTS.md" ] || cp bench/RESULTS.md "$out/RESULTS.md"  # a second run in one call appends
export VPMOE_RESULTS="$out/RESULTS.md"
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# Compile caches carried between calls, one archive per GPU kind: Inductor's (graphs, generated
# kernels, their autotuning) and Triton's (the project's kernels, with TRITON_CACHE_AUTOTUNING their
# tuning too). They travel packed (.carry/compile_cache/<GPU kind>.tgz, ~23 MB against ~185 MB
# unpacked: the carry limit is 64 MiB) and are unpacked here into a fixed path, the same on every
# machine. The end of this script packs them into $OUT as compile_cache.tgz.N; `bash
# bench/gpu_carry.sh FOLDER` joins those into .carry/ for the next call. COMPILE_CACHE=0: the
# machine's own default caches, nothing packed.
cache_root=/tmp/vpmoe_compile_cache
gpu_kind=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '_')
if [ "${COMPILE_CACHE:-1}" = 1 ]; then
  export TORCHINDUCTOR_CACHE_DIR=$cache_root/$gpu_kind/inductor TRITON_CACHE_DIR=$cache_root/$gpu_kind/triton
  export TRITON_CACHE_AUTOTUNING=1 VPMOE_COMPILE_CACHE=cold
  if [ -d "$cache_root/$gpu_kind" ]; then  # a warm machine's earlier call left them (the carried ones and more)
    VPMOE_COMPILE_CACHE=kept
    echo "# compile cache kept from an earlier call on this machine: $(du -sm "$cache_root/$gpu_kind" | cut -f1) MB"
  elif [ -f ".carry/compile_cache/$gpu_kind.tgz" ]; then
    mkdir -p "$cache_root" && tar -C "$cache_root" -xzf ".carry/compile_cache/$gpu_kind.tgz"
    VPMOE_COMPILE_CACHE=carried
    echo "# compile cache carried: $(du -sm "$cache_root/$gpu_kind" | cut -f1) MB for $gpu_kind"
  fi
fi
python3 -c "from bench.results import host_cpu; import os; print('host', host_cpu(), 'x%d' % os.cpu_count())"  # the eager peer is host-bound
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
run_tests() {
  # -v: each test's PASSED/FAILED is in the log as it ends, so a run cut by the timeout still names them
  # the tests compile with the machine's own caches: the carried ones stay the benchmarks' (smaller)
  timeout "${TEST_TIMEOUT:-480}" env -u TORCHINDUCTOR_CACHE_DIR -u TRITON_CACHE_DIR -u TRITON_CACHE_AUTOTUNING python3 -m pytest -v -s -p no:cacheprovider ${TESTS:-tests/gpu} ${TEST_K:+-k "$TEST_K"} 2>&1 \
    | tee "$out/gpu_tests.log" | grep -e '::' -e 'rel err' -e 'max err' -e passed -e failed -e PASSED -e FAILED -e Error -e '^E ' \
    | cut -c1-600 | tail -40
  echo "# tests done at +$(( $(date +%s) - t0 ))s"
}
[ "${SKIP_TESTS:-0}" != 1 ] && [ "${TESTS_AFTER:-0}" != 1 ] && run_tests
# SKIP_PEER=1 keeps the peer readings an earlier run of this call wrote (its ratios stay same-call)
[ -f "$out/peer.jsonl" ] || : > "$out/peer.jsonl"
if [ "${SKIP_PEER:-0}" != 1 ]; then
  : > "$out/peer.jsonl"
  letters=",$(echo "$cases" | tr ',' '\n' | cut -d: -f1 | paste -sd,),"  # "d:graphed" holds an a, not case a
  for spec in a:2 b:8; do
    case "$letters" in *,${spec%%:*},*)
      timeout 240 python3 .carry/peer_hf_afmoe.py --layers 20 --batch ${spec##*:} --seq 2048 --impl grouped_mm --steps ${PEER_STEPS:-12} 2>&1 \
        | grep '^{' | tee -a "$out/peer.jsonl" | cut -c1-300;;
    esac
  done
  echo "# peer done at +$(( $(date +%s) - t0 ))s"
fi
opt=""
[ "${OPT_SWEEP:-0}" = 1 ] && opt="--opt-sweep"
[ "${PROFILE:-0}" = 1 ] && opt="$opt --profile $out"
[ "${RECORD:-1}" = 1 ] && opt="$opt --record"
[ -n "${MOMENTS:-}" ] && opt="$opt --adamw-moments $MOMENTS"
[ -n "${KD_K:-}" ] && opt="$opt --kd $KD_K"
[ "${AC:-0}" = 1 ] && opt="$opt --ac"
[ -n "${AC_BLOCKS:-}" ] && opt="$opt --ac $AC_BLOCKS"
[ -n "${MOMENTUM:-}" ] && opt="$opt --momentum-dtype $MOMENTUM"
[ -n "${MICRO:-}" ] && opt="$opt --micro $MICRO"
[ -n "${LAYERS:-}" ] && opt="$opt --layers $LAYERS"
[ -n "${MOE:-}" ] && opt="$opt --moe $MOE"
[ -n "${ROUTING:-}" ] && opt="$opt --routing $ROUTING"
[ -n "${SAVES:-}" ] && opt="$opt --saves $SAVES"
[ -n "${INDUCTOR:-}" ] && opt="$opt --inductor $INDUCTOR"
[ -n "${GRAD_SQ:-}" ] && opt="$opt --grad-sq $GRAD_SQ"
[ -n "${MASK_TABLES:-}" ] && opt="$opt --mask-tables $MASK_TABLES"
[ -n "${WGRAD_ORDER:-}" ] && opt="$opt --wgrad-order $WGRAD_ORDER"
[ -n "${ROUTE_KERNEL:-}" ] && opt="$opt --route-kernel $ROUTE_KERNEL"
[ -n "${DENSE_COPIES:-}" ] && opt="$opt --dense-copies $DENSE_COPIES"
[ -n "${EXPAND_KV:-}" ] && opt="$opt --expand-kv $EXPAND_KV"
[ -n "${WEIGHT_COPIES:-}" ] && opt="$opt --weight-copies $WEIGHT_COPIES"
[ -n "${EMBED_ROWS:-}" ] && opt="$opt --embed-rows $EMBED_ROWS"
[ -n "${LOW_GRADS:-}" ] && opt="$opt --low-grads $LOW_GRADS"
[ -n "${LOSS_CHUNK:-}" ] && opt="$opt --loss-chunk $LOSS_CHUNK"
[ -n "${FLEX_LOCAL:-}" ] && opt="$opt --flex-local $FLEX_LOCAL"
[ -n "${FLEX_GLOBAL:-}" ] && opt="$opt --flex-global $FLEX_GLOBAL"
[ -n "${OPT:-}" ] && opt="$opt --opt $OPT"
[ -n "${EXPERT_KERNELS:-}" ] && opt="$opt --expert-kernels $EXPERT_KERNELS"
[ "${PROBE:-0}" = 1 ] && opt="$opt --overlap-probe"
[ "${ROWS_PROBE:-0}" = 1 ] && opt="$opt --rows-probe"
[ "${SKIP_BENCH:-0}" != 1 ] && timeout "${BENCH_TIMEOUT:-480}" python3 bench/train_step.py --cases "$cases" --steps "$steps" --peer "$out/peer.jsonl" \
  --breakdown "${BREAKDOWN:-a}" --ns-chunk "${NS_CHUNK:-256}" $opt 2>&1 | tee "$out/train_step.log" \
  | grep -v -i -e warn -e '^ ' | cut -c1-1500 | tail -${BENCH_TAIL:-40}
echo "# train_step done at +$(( $(date +%s) - t0 ))s"
if [ "${TRAINER_RUN:-0}" = 1 ]; then  # `vpmoe train` itself, timed (one-GPU stage-1 recipe unless told)
  timeout "${TRAINER_TIMEOUT:-480}" python3 bench/trainer_run.py --data .carry/synth2048 --steps "${TRAINER_STEPS:-12}" \
    --record ${TRAINER_ARGS:-} 2>&1 | tee "$out/trainer_run.log" | grep -v -i warn | tail -12
  echo "# trainer_run done at +$(( $(date +%s) - t0 ))s"
fi
if [ "${SCALING:-0}" = 1 ]; then  # multi-GPU machines: bench/scaling.py (weak scaling, FSDP2 and EP, --check)
  n=$(nvidia-smi -L | wc -l)
  timeout "${SCALING_TIMEOUT:-570}" python3 bench/scaling.py --data .carry/synth2048 --gpus "${SCALING_GPUS:-1,$n}" \
    --record ${SCALING_ARGS:-} 2>&1 | tee "$out/scaling.log" | grep -v -e '^  .* | ' -e '^# ' | tail -30
  echo "# scaling done at +$(( $(date +%s) - t0 ))s"
fi
if [ "${ATTN_BENCH:-0}" = 1 ]; then  # the attention sub-block alone, per prologue variant, with its top kernels
  timeout "${ATTN_TIMEOUT:-300}" python3 bench/attention.py --variants "${ATTN_VARIANTS:-fused-prologue,torch-prologue}" \
    --tokens "${ATTN_TOKENS:-8192}" --kinds "${ATTN_KINDS:-local,global}" --flex-options "${ATTN_FLEX:-auto}" --record 2>&1 | tee "$out/attention.log" | grep -v -i warn | tail -40
  echo "# attention done at +$(( $(date +%s) - t0 ))s"
fi
if [ "${MOE_BENCH:-0}" = 1 ]; then  # one MoE layer's routed part alone, grouped vs fused, with top kernels
  timeout "${MOE_TIMEOUT:-300}" python3 bench/moe.py --tokens "${MOE_TOKENS:-65536,8192}" --record 2>&1 \
    | tee "$out/moe.log" | grep -v -i warn | tail -60
  echo "# moe done at +$(( $(date +%s) - t0 ))s"
fi
if [ "${SAVED_BENCH:-0}" = 1 ]; then  # what one compiled block keeps for backward (the checkpointing budget)
  timeout "${SAVED_TIMEOUT:-200}" python3 bench/saved_activations.py --rows "${SAVED_ROWS:-32}" --saves "${SAVES:-default}" --record 2>&1 \
    | tee "$out/saved_activations.log" | grep '^# [lg]'
  echo "# saved_activations done at +$(( $(date +%s) - t0 ))s"
fi
if [ "${WGRAD_BENCH:-0}" = 1 ]; then  # the experts' weight-gradient kernel alone, per tiling configuration
  for sk in ${WGRAD_SKEWS:-0 1}; do  # routing skews (bench/moe_sweep.routed_case)
    timeout "${WGRAD_TIMEOUT:-150}" python3 bench/wgrad.py --tokens "${WGRAD_TOKENS:-4096}" --skew "$sk" ${WGRAD_ARGS:-} --record 2>&1 \
      | tee -a "$out/wgrad.log" | grep -v -i warn | tail -14
  done
  echo "# wgrad done at +$(( $(date +%s) - t0 ))s"
fi
if [ "${GEMM_BENCH:-0}" = 1 ]; then  # the six expert grouped GEMMs alone, with and without the bias columns
  for sk in ${GEMM_SKEWS:-0}; do  # routing skews (bench/moe_sweep.routed_case)
    timeout "${GEMM_TIMEOUT:-120}" python3 bench/expert_gemms.py --skew "$sk" --record 2>&1 | tee -a "$out/expert_gemms.log" \
      | grep -v -i warn | tail -16
  done
  echo "# expert_gemms done at +$(( $(date +%s) - t0 ))s"
fi
if [ "${SORT_BENCH:-0}" = 1 ]; then  # the routing's sort by expert: int64 vs narrow keys, and the whole Routing
  timeout "${SORT_TIMEOUT:-150}" python3 bench/routing_sort.py --record 2>&1 | tee "$out/routing_sort.log" \
    | grep -v -i warn | tail -8
  echo "# routing_sort done at +$(( $(date +%s) - t0 ))s"
fi
if [ "${GEN_BENCH:-0}" = 1 ]; then  # sampling through the KV cache: the experts' loop against grouped GEMMs
  timeout "${GEN_TIMEOUT:-300}" python3 bench/generate.py --layers "${GEN_LAYERS:-20}" --rows "${GEN_ROWS:-1,16,64}" ${GEN_ARGS:-} --record 2>&1 \
    | tee "$out/generate.log" | grep -v -i warn | tail -8
  echo "# generate done at +$(( $(date +%s) - t0 ))s"
fi
if [ "${DECODE_KERNELS:-0}" = 1 ]; then  # CUDA kernels per decode step, by source (what a captured step replays)
  timeout "${GEN_TIMEOUT:-300}" python3 bench/decode_kernels.py --layers "${GEN_LAYERS:-20}" --record 2>&1 \
    | tee "$out/decode_kernels.log" | grep -v -i warn | tail -16
  echo "# decode_kernels done at +$(( $(date +%s) - t0 ))s"
fi
if [ "${EXPERT_MUON_BENCH:-0}" = 1 ]; then  # one expert tensor's Muon step: streaming kernels per config vs torch
  timeout "${EXPERT_MUON_TIMEOUT:-200}" python3 bench/expert_muon.py --record ${EXPERT_MUON_ARGS:-} 2>&1 | tee "$out/expert_muon.log" \
    | grep -v -i warn | tail -${EXPERT_MUON_TAIL:-16}
  echo "# expert_muon done at +$(( $(date +%s) - t0 ))s"
fi
if [ "${OPTIM_BENCH:-}" != "" ]; then  # the optimizer step alone (bench/optim_step.py --methods $OPTIM_BENCH)
  timeout "${OPTIM_TIMEOUT:-300}" python3 bench/optim_step.py --layers "${OPTIM_LAYERS:-20}" --methods "$OPTIM_BENCH" \
    ${OPTIM_ARGS:-} --record 2>&1 | tee "$out/optim_step.log" | grep -v -i warn | tail -40
  echo "# optim_step done at +$(( $(date +%s) - t0 ))s"
fi
if [ "${KD_BENCH:-0}" = 1 ]; then
  timeout "${KD_TIMEOUT:-240}" python3 bench/kd_loss.py 2>&1 | tee "$out/kd_loss.log" | grep -v -i warn | tail -25
  echo "# kd_loss done at +$(( $(date +%s) - t0 ))s"
fi
[ "${SKIP_TESTS:-0}" != 1 ] && [ "${TESTS_AFTER:-0}" = 1 ] && run_tests
[ -s "$out/peer.jsonl" ] || rm -f "$out/peer.jsonl"  # the device returns at most 8 files per call
if [ "${COMPILE_CACHE:-1}" = 1 ] && [ -d "$cache_root/$gpu_kind" ]; then
  # parts of <= 15 MiB (16 MiB a file comes back); only where the call's other files leave room (8 files, 64 MiB)
  tar -C "$cache_root" -czf /tmp/compile_cache.tgz "$gpu_kind"
  mb=$(( $(stat -c %s /tmp/compile_cache.tgz) / 1048576 + 1 ))
  # Triton's cache records absolute paths of the sources it compiled: the caches hit only where the
  # repository's root is the same path on the next machine (/work/main on every call so far)
  echo "# compile cache: $(du -sm "$cache_root/$gpu_kind" | cut -f1) MB raw, ${mb} MB packed, root $PWD"
  parts=$(( (mb + 14) / 15 ))
  old=$(find "$out" -maxdepth 1 -name 'compile_cache.tgz.*' | wc -l)  # an earlier run of this call packed them
  if [ $(( $(find "$out" -type f | wc -l) - old + parts )) -le 8 ] && [ "$mb" -le 45 ]; then
    rm -f "$out"/compile_cache.tgz.*  # this run's archive holds all of theirs and more
    split -b 15M -d -a 1 /tmp/compile_cache.tgz "$out/compile_cache.tgz."
    echo "# compile cache packed: ${mb} MB in $parts part(s); here: bash bench/gpu_carry.sh <the call's files folder>"
  else
    echo "# compile cache not packed: ${mb} MB compressed, or too many files in \$OUT already"
  fi
  rm -f /tmp/compile_cache.tgz
fi
true
