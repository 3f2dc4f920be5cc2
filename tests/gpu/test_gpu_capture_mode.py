"""CUDA-graph captures beside a thread that pins host memory, in `GraphedTrainStep`'s capture mode.

The trainer's prefetch thread pins host memory while a step may be capturing. On the H200 (torch
2.11) that broke a default "global"-mode capture at once; `GraphedTrainStep` captures in
`vpmoe.model.graphed.CAPTURE_MODE` ("thread_local") and under `CAPTURE_LOCK`, which the prefetch
thread's pins (`pin_outside_capture`) wait for. This runs captures arranged so beside a pinning
thread, in a fresh process (a broken capture can leave the CUDA context unusable), and checks
every replay equals the eager result. (The lock's waiting is tested on the CPU in
tests/test_train_prefetch.py.)
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_captures_beside_a_pinning_thread():
    out = subprocess.run([sys.executable, str(ROOT / "bench/capture_threads.py"), "--child", "graphed",
                          "--captures", "20"], capture_output=True, text=True, timeout=240, cwd=ROOT)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"child exited {out.returncode}: {out.stderr[-800:]}"
    row = json.loads(lines[-1])
    print("captures beside a pinning thread:", row)
    assert row["error"] == "" and row["captures_ok"] == 20, row
    assert row["pinned_meanwhile"] > 1, "the pinning thread never ran beside the captures: the test tested nothing"
    assert row["eager_mean_abs"] > 0.1, f"the chain decayed to ~0, so the comparison would test nothing: {row}"
    assert row["replays_matching"] == 20 and row["replay_matches_eager"], row
