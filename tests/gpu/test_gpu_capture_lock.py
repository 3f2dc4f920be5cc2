"""CUDA-graph captures beside a thread that pins host memory (vpmoe.model.graphed.CAPTURE_LOCK).

On the H200 (torch 2.11) a second thread pinning host memory broke every capture in both capture
modes (bench/capture_threads.py, 2026-12-02 19:30). The trainer's prefetch thread pins under
`CAPTURE_LOCK` and `GraphedTrainStep` captures holding it; this runs the same pattern in a fresh
process (a broken capture can leave the CUDA context unusable) and checks every capture replays
to the eager result.
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_captures_beside_a_pinning_thread_under_the_lock():
    out = subprocess.run([sys.executable, str(ROOT / "bench/capture_threads.py"), "--child", "locked",
                          "--captures", "20"], capture_output=True, text=True, timeout=240, cwd=ROOT)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"child exited {out.returncode}: {out.stderr[-800:]}"
    row = json.loads(lines[-1])
    print("capture lock:", row)
    assert row["error"] == "" and row["captures_ok"] == 20, row
    assert row["pinned_meanwhile"] > 1, "the pinning thread never ran beside the captures: the test tested nothing"
    assert row["replay_matches_eager"], row
