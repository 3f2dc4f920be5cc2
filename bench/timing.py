"""GPU timing for the benchmarks: CUDA-event medians, eager or replayed from a CUDA graph."""
from __future__ import annotations

import statistics
import time

import torch


def cuda_time(fn, warmup=2, iters=5) -> float:
    """Median seconds of fn() timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def host_time(fn, iters=3) -> float:
    """Median seconds the host spends in fn() (launching, not waiting: the GPU drains after each
    call). Against `cuda_time`: host-bound where the two are close."""
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times)


def graph_time(fn, iters=10) -> tuple[float, str]:
    """GPU seconds of fn() replayed from a CUDA graph (eager timing if capture fails)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return cuda_time(g.replay, warmup=2, iters=iters), "graph"
    except Exception as e:  # noqa: BLE001
        print(f"# graph capture failed ({e!r:.200}); eager timing", flush=True)
        torch.cuda.synchronize()
        return cuda_time(fn, warmup=1, iters=iters), "eager"
