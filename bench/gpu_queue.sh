#!/usr/bin/env bash
# The open items of docs/performance.md's "Next on a GPU" list as device calls, so a session that gets
# a GPU spends it on measuring, not on writing the calls. One call per argument; each call's steps run
# in order while the call has time for them (a step that does not fit is named and skipped), and
# gpu_run.sh writes $OUT/RESULTS.md and the test log as each part ends, so a call cut by its limit still
# brings back what ran. First `bash bench/gpu_carry.sh` here, then the device tool with carry [".carry"]:
#   bash bench/gpu_queue.sh tests    GPU tests of the code no GPU has run yet (a whole call: cold compiles)
#   bash bench/gpu_queue.sh a        (a) with the peer and a profile of the step (bf16 optimizer state)
#   bash bench/gpu_queue.sh b        (b) with the loss's 4096-row chunks against 2048, interleaved
#   bash bench/gpu_queue.sh rest     the rest of the graphed-step GPU tests (trainer graphs, reduce)
# Afterwards: the sections after the last one in bench/RESULTS.md, copied with a hand note; the
# compile cache parts by `bash bench/gpu_carry.sh <files folder>`. CALL_BUDGET: the call's seconds.
set -uo pipefail
budget=${CALL_BUDGET:-580}
t0=$(date +%s)
left() { echo $(( budget - ($(date +%s) - t0) )); }
# step SECONDS_NEEDED DESCRIPTION CASES STEPS ENV=VALUE... : one gpu_run.sh run, if the call has the time
step() {
  local need=$1 what=$2 cases=$3 steps=$4
  shift 4
  if [ "$(left)" -lt "$need" ]; then
    echo "# skipped, needs ${need}s and $(left)s are left: $what"
    return
  fi
  echo "# ==== $what (at +$(( $(date +%s) - t0 ))s)"
  env "$@" bash bench/gpu_run.sh "$cases" "$steps"
  n=$(( n + 1 ))  # each run's whole test log kept (gpu_run.sh writes one name)
  [ -f "${OUT:-/tmp/out}/gpu_tests.log" ] && mv "${OUT:-/tmp/out}/gpu_tests.log" "${OUT:-/tmp/out}/gpu_tests.$n.log"
}
n=0
case "${1:-}" in
  tests)
    # the prologue's layout tag (af0cd16), Flex after its move to flex.py (9fccfa7) with the expansion,
    # the dense copies' test that failed once (2026-12-08 00:05; its harness prints each step now)
    step 120 "prologue and Flex tests" a 8 SKIP_PEER=1 SKIP_BENCH=1 TEST_TIMEOUT=200 \
      TESTS="tests/gpu/test_gpu_tpa_prologue.py tests/gpu/test_gpu_fast_paths.py" TEST_K="tpa_prologue or flex_attention"
    step 150 "dense copies against casting" a 8 SKIP_PEER=1 SKIP_BENCH=1 TEST_TIMEOUT=$(( $(left) > 320 ? 300 : $(left) - 20 )) \
      TESTS=tests/gpu/test_gpu_graphed.py TEST_K=dense_copies
    # the FastBody cases compile whole small models (cut by the call's limit on 2026-12-08 00:40)
    step 120 "FastBody against the reference" a 8 SKIP_PEER=1 SKIP_BENCH=1 TEST_TIMEOUT=$(( $(left) - 20 )) \
      TESTS=tests/gpu/test_gpu_fast_paths.py TEST_K=fast_body ;;
  a)
    # (a) at today's defaults: the ratio, the breakdown and the profile's top kernels (the update graph
    # at bf16 state has no profile yet); the generated code comes back in the compile cache parts
    # (the peer takes ~1-2 minutes before the benchmark: its timeout leaves the cache packing time)
    step 300 "(a) with the peer, breakdown and profile" a 8 SKIP_TESTS=1 PROFILE=1 BENCH_TIMEOUT=$(( $(left) - 150 )) ;;
  b)
    step 240 "(b) at the 2 GiB chunk budget (4096 rows)" b 6 SKIP_TESTS=1 SKIP_PEER=1 BREAKDOWN=none
    step 150 "(b) at 2048-row chunks" b 6 SKIP_TESTS=1 SKIP_PEER=1 BREAKDOWN=none LOSS_CHUNK=2048
    step 100 "(b) at the 2 GiB chunk budget again" b 6 SKIP_TESTS=1 SKIP_PEER=1 BREAKDOWN=none ;;
  rest)
    step 300 "graphed-step tests at today's defaults" a 8 SKIP_PEER=1 SKIP_BENCH=1 TEST_TIMEOUT=$(( $(left) - 20 )) \
      TESTS=tests/gpu/test_gpu_graphed.py TEST_K="weight_copies or trainer_cuda_graphs or reduce" ;;
  *)
    echo "usage: bash bench/gpu_queue.sh tests|a|b|rest" >&2
    exit 2 ;;
esac
echo "# queue '${1}' done at +$(( $(date +%s) - t0 ))s"
