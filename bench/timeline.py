"""Where a multi-stream GPU step waits: its kernels on a timeline, per CUDA stream, from one profiled run.

    from bench.timeline import stream_timeline, summary_lines
    spans = stream_timeline(graph.replay)      # [(start_us, end_us, stream, kernel name), ...]
    print("\n".join(summary_lines(spans)))

Why: the optimizer step spreads its pieces over three streams (`FastMuonAdamW`); the bytes of its
bandwidth-bound kernels need ~13-16 ms of the 20-layer step's ~24 on an H100 (an estimate from their
byte counts), so the question is which stretches run one stream alone, or none, and which kernels
they are. `summary_lines` gives the
step's span, each stream's busy time, the time no stream is busy, and the time exactly one stream is
busy broken down by that kernel's name (the serial part: where reordering or splitting could help).
Kernel names are cut at the first '(' and at 60 characters, so a kernel's launches group together.
Used by `bench/optim_step.py --timeline`; tests/test_bench_timeline.py checks the summary on made-up
timelines (no GPU).
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from itertools import pairwise


def stream_timeline(fn) -> list[tuple[float, float, int, str]]:
    """fn() run once under torch.profiler (CUDA kernels only): its kernels as (start us, end us,
    stream, name), sorted by start; graph replays included (CUPTI records their kernels)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    spans = []
    for e in events:
        if e.get("cat") == "kernel":
            start = float(e["ts"])
            stream = int(e.get("args", {}).get("stream", e.get("tid", 0)))
            spans.append((start, start + float(e.get("dur", 0)), stream, e["name"].split("(")[0][:60]))
    return sorted(spans)


def summary_lines(spans: list[tuple[float, float, int, str]], top: int = 12) -> list[str]:
    """The timeline's span, per-stream busy time, idle time, and the one-stream-busy time by kernel."""
    if not spans:
        return ["# timeline: no kernels recorded"]
    t0, t1 = min(s[0] for s in spans), max(s[1] for s in spans)
    busy = defaultdict(float)
    for start, end, stream, _ in spans:
        busy[stream] += end - start
    # sweep the starts and ends: between two consecutive points, which kernels run
    points = sorted({p for s in spans for p in s[:2]})
    idle = 0.0
    alone = defaultdict(float)
    running: list[tuple[float, float, int, str]] = []
    i = 0
    for left, right in pairwise(points):
        while i < len(spans) and spans[i][0] <= left:
            running.append(spans[i])
            i += 1
        running = [s for s in running if s[1] > left]
        streams = {s[2] for s in running}
        if not streams:
            idle += right - left
        elif len(streams) == 1:
            alone[running[0][3]] += right - left
    lines = [(f"# timeline: {len(spans)} kernels over {(t1 - t0) / 1e3:.3f} ms; no stream busy {idle / 1e3:.3f} ms; "
              f"one stream alone {sum(alone.values()) / 1e3:.3f} ms")]
    lines += [f"#   stream {s}: busy {b / 1e3:.3f} ms, {sum(1 for x in spans if x[2] == s)} kernels"
              for s, b in sorted(busy.items(), key=lambda kv: -kv[1])]
    lines += [f"#   alone {us / 1e3:8.3f} ms  {name}" for name, us in sorted(alone.items(), key=lambda kv: -kv[1])[:top]]
    return lines
