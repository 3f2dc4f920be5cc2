"""Does another thread's CUDA API call (pinning host memory) invalidate a CUDA-graph capture?

`vpmoe train` captures its step while the prefetch thread (vpmoe/train/prefetch.py) may pin the
next step's batches, which calls `cudaHostAlloc`. On 2026-12-02 a second capture after an
evaluation failed with `cudaErrorStreamCaptureInvalidated` (docs/performance.md). Each variant
captures and replays a chain of GEMMs `--captures` times in a fresh process while a second thread
pins new 4 MiB host buffers, and reports how many captures succeeded:
  global, thread_local   the capture mode, the thread pinning freely;
  none                   global mode, no pinning thread (the control);
  graphed                what `GraphedTrainStep` does (`vpmoe.model.graphed.CAPTURE_MODE`), the
                         thread pinning freely as the trainer's prefetch does.
  (19:41 run, bench/RESULTS.md: global failed at its first capture; thread_local and none
  replayed 50 of 50 correctly, and so did a variant since removed that held a lock around both
  the captures and the pins.)

    python bench/capture_threads.py --record        (GPU)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one_mode(variant: str, captures: int) -> dict:
    """Run in a child process: a failed capture may leave the context unusable."""
    import threading

    import torch

    from vpmoe.model.graphed import CAPTURE_MODE

    modes = {"global": "global", "thread_local": "thread_local", "none": "global", "graphed": CAPTURE_MODE}
    if variant not in modes:
        raise SystemExit(f"capture_threads: unknown variant {variant!r}; one of {', '.join(modes)}")
    mode = modes[variant]
    x = torch.randn(1024, 1024, device="cuda")
    stop, held = threading.Event(), []

    def pinner():  # every buffer kept: each pin is a fresh cudaHostAlloc, not a cached block
        while not stop.is_set() and len(held) < 400:
            held.append(torch.empty(4 << 20, dtype=torch.uint8).pin_memory())

    def chain():
        y = x
        for _ in range(300):
            y = torch.tanh((y @ x) * (1 / 32))  # stays O(1): a real value to compare
        return y

    # warm-up before any capture (cuBLAS creates its handle and workspace at the first GEMM, which a
    # capture forbids: without this every variant, the no-pin control too, failed at 19:40)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = chain()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    thread = threading.Thread(target=pinner, daemon=True)
    ok, error, same = 0, "", False
    if variant != "none":
        thread.start()
    try:
        for _ in range(captures):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode=mode):
                y = chain()
            graph.replay()
            ok += 1
        same = bool(ok) and bool(eager.abs().mean() > 0.1) and torch.allclose(y, eager, rtol=1e-4, atol=1e-5)
    except Exception as e:  # noqa: BLE001 - the failure is the measurement
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    stop.set()
    return {"variant": variant, "mode": mode, "captures_ok": ok, "captures": captures,
            "pinned_meanwhile": len(held), "replay_matches_eager": same, "error": error}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="global,thread_local,none,graphed")
    ap.add_argument("--captures", type=int, default=50)
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one_mode(a.child, a.captures)))
        return
    rows = []
    for variant in a.variants.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--captures", str(a.captures)],
                             capture_output=True, text=True, timeout=300)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        rows.append(json.loads(lines[-1]) if lines else
                    {"variant": variant, "error": f"child exited {out.returncode}: "
                                                       f"{(out.stderr.strip().splitlines() or [''])[-1][-200:]}"})
    from bench.results import append_results, markdown_table
    if a.record:
        append_results("capture_threads", "python bench/capture_threads.py " + " ".join(sys.argv[1:]), rows)
    else:
        print(markdown_table(rows))


if __name__ == "__main__":
    main()
