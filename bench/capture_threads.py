"""Does another thread's CUDA API call (pinning host memory) invalidate a CUDA-graph capture?

`vpmoe train` captures its step while the prefetch thread (vpmoe/train/prefetch.py) may pin the
next step's batches, which calls `cudaHostAlloc`. On 2026-12-02 a second capture after an
evaluation failed with `cudaErrorStreamCaptureInvalidated` (docs/performance.md). Each variant
captures and replays a chain of GEMMs `--captures` times in a fresh process while a second thread
pins new 4 MiB host buffers, and reports how many captures succeeded and how many replays equal
the eager result:
  global, thread_local   the capture mode, the thread pinning freely;
  none                   global mode, no pinning thread (the control);
  graphed                what `vpmoe train` does: `GraphedTrainStep`'s mode (`CAPTURE_MODE`), each
                         capture under `CAPTURE_LOCK`, the thread pinning through
                         `pin_outside_capture` as the trainer's prefetch does.
  (bench/RESULTS.md: global failed at its first capture every time; thread_local replayed every
  capture exactly beside a free pinning thread in all but one of ~25 processes, 2026-12-02/03;
  that one, inside the GPU test suite, compared only its last replay and is unexplained.)

    python bench/capture_threads.py --record        (GPU)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one_mode(variant: str, captures: int, scale: float) -> dict:
    """Run in a child process: a failed capture may leave the context unusable."""
    import threading
    from contextlib import nullcontext

    import torch

    from vpmoe.model.graphed import CAPTURE_LOCK, CAPTURE_MODE, pin_outside_capture

    modes = {"global": "global", "thread_local": "thread_local", "none": "global", "graphed": CAPTURE_MODE}
    if variant not in modes:
        raise SystemExit(f"capture_threads: unknown variant {variant!r}; one of {', '.join(modes)}")
    mode = modes[variant]
    trainer_like = variant == "graphed"  # captures under CAPTURE_LOCK, pins through pin_outside_capture
    x = torch.randn(1024, 1024, device="cuda")
    bias = torch.randn(1024, device="cuda")
    stop, held = threading.Event(), []

    def pinner():  # every buffer kept: each pin is a fresh cudaHostAlloc, not a cached block
        while not stop.is_set() and len(held) < 400:
            buf = torch.empty(4 << 20, dtype=torch.uint8)
            held.append(pin_outside_capture([{"b": buf}]) if trainer_like else buf.pin_memory())

    def chain():
        # at scale 1/96 the step contracts (x's spectral norm is ~2 sqrt(1024) = 64), so a rounding
        # difference between the eager and the captured GEMMs would shrink over the 300 steps, not
        # grow as it could at 1/32 (the first version; measured differences are 0 at both scales)
        y = x
        for _ in range(300):
            y = torch.tanh((y @ x) * scale + bias)  # stays O(1): a real value to compare
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
    ok, error, same, diff, size, matching = 0, "", False, float("nan"), float("nan"), 0
    if variant != "none":
        thread.start()
    try:
        size = float(eager.abs().mean())  # a chain that decayed to ~0 would compare nothing
        diff = 0.0
        for _ in range(captures):  # every replay compared: a wrong one is counted, not overwritten
            graph = torch.cuda.CUDAGraph()
            with CAPTURE_LOCK if trainer_like else nullcontext():
                with torch.cuda.graph(graph, capture_error_mode=mode):
                    y = chain()
            graph.replay()
            ok += 1
            d = float((y - eager).abs().max() / eager.abs().max())
            diff, matching = max(diff, d), matching + (d < 1e-4)
        same = matching == captures and size > 0.1
    except Exception as e:  # noqa: BLE001 - the failure is the measurement
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    stop.set()
    return {"variant": variant, "mode": mode, "captures_ok": ok, "captures": captures,
            "pinned_meanwhile": len(held), "replays_matching": matching,
            "replay_matches_eager": same, "max_rel_diff": diff,
            "eager_mean_abs": size, "scale": scale, "error": error}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="global,thread_local,none,graphed")
    ap.add_argument("--captures", type=int, default=50)
    ap.add_argument("--scale", type=float, default=1 / 96, help="the chain's GEMM scale (1/32: the first, chaotic version)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one_mode(a.child, a.captures, a.scale)))
        return
    rows = []
    for variant in a.variants.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--captures", str(a.captures),
                              "--scale", str(a.scale)],
                             capture_output=True, text=True, timeout=300)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        rows.append(json.loads(lines[-1]) if lines else
                    {"variant": variant, "error": f"child exited {out.returncode}: "
                                                       f"{(out.stderr.strip().splitlines() or [''])[-1][-200:]}"})
    from bench.results import report
    report("capture_threads", rows, a.record)


if __name__ == "__main__":
    main()
