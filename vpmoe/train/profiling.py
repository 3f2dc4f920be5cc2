"""Where a train step's time goes: `train.profile_steps` profiles a few steady steps of `vpmoe train`.

Writes `<run_dir>/profile/` (`rank<r>_` prefixed when there are several ranks):
- `summary.txt`: the profiled steps; host time per step (launch to launch); the device timeline's
  span per step, busy time (the union of kernel and copy intervals: overlapping streams counted
  once) and idle time; the longest idle gaps with the kernels on each side; kernels by family.
- `kernels.tsv`: every kernel by name (family, launches, total us, us each), most launches first.
Design choices:
- Plain `torch.profiler`, started and stopped by the trainer around whole steps: the device is
  synchronized at both ends, so the window holds exactly those steps' work. `vpmoe train` reads each
  step's figures one step late; the synchronize at the end costs the window's last step that overlap.
- The window is the `profile_steps` steps after the first ten on a GPU (compilation, autotuning,
  CUDA-graph capture: a graph is never captured under the profiler that way, except after an
  evaluation inside the window released the graphs, which has not been tried) or straight away on
  the CPU; a run that ends first gets fewer steps, or none (said at the start): one knob.
- Families by kernel name (first match wins): what bench/train_step.py's `--profile` prints too.
- On a CPU run there are no device kernels: the summary says so and times the host ops instead.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch

# kernel families by name, first match wins: where a step's launches go (docs/performance.md: the
# (a) body is bound by its kernels' count, not their bytes or FLOPs)
FAMILIES = [
    ("collective", re.compile(r"^nccl|^gloo:")),  # NCCL kernels; gloo's ops in a CPU run's host table
    ("copy / memset", re.compile(r"Memcpy|memcpy|Memset|direct_copy_kernel")),
    ("flex attention", re.compile(r"flex_attention")),
    ("inductor pointwise", re.compile(r"^triton_poi_")),
    ("inductor reduction", re.compile(r"^triton_(red|per)_")),
    ("inductor other", re.compile(r"^triton_")),
    ("grouped GEMM", re.compile(r"GroupProblemShape")),
    ("GEMM", re.compile(r"nvjet|gemm|cutlass|xmma|cublas", re.IGNORECASE)),
    ("project Triton", re.compile(r"^_\w+_kernel$")),
    ("sort / scan", re.compile(r"cub::|radix|[Ss]ort|[Ss]can")),
    ("aten eager", re.compile(r"at::native::")),
]
WARM_UP = 10  # steps left to compilation, autotuning and graph capture on a GPU before a profile starts


def is_range_annotation(name: str) -> bool:
    """Inductor's `## Call CompiledFxGraph <hash> ##` rows: a compiled graph's span on the device
    timeline (eager calls only), not a kernel; counted, they doubled an eager step's busy time."""
    return name.startswith("## ")


def kernel_family(kernel: str) -> str:
    return next((name for name, pattern in FAMILIES if pattern.search(kernel)), "other")


def kernel_families(kernels) -> list[str]:
    """(name, launches, device us) per kernel -> one line per family, most launches first:
    launches, total ms, mean us per launch."""
    totals: dict[str, list[float]] = {}
    for name, count, us in kernels:
        if is_range_annotation(name):
            continue
        acc = totals.setdefault(kernel_family(name), [0, 0.0])
        acc[0] += count
        acc[1] += us
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
    return [f"{family:<20} {n:6d}x {us / 1e3:8.2f} ms {us / max(n, 1):7.1f} us each" for family, (n, us) in ranked]


def kernel_table(kernels) -> str:
    """(name, launches, device us) per kernel -> every kernel as a TSV, most launches first (the
    small ones the top-by-time lists leave out): family, launches, total us, us each, name."""
    rows = sorted((k for k in kernels if not is_range_annotation(k[0])), key=lambda k: (-k[1], -k[2]))
    lines = ["family\tlaunches\ttotal_us\tus_each\tkernel"]
    lines += [f"{kernel_family(name)}\t{n}\t{us:.1f}\t{us / max(n, 1):.2f}\t{name}" for name, n, us in rows]
    return "\n".join(lines) + "\n"


def timeline(intervals: list[tuple[float, float, str]], min_gap: float = 20.0):
    """(start, end, name) intervals (us, any order, overlapping allowed) -> (span, busy, gaps): the
    first start to the last end, the length of their union, and every hole in the union longer
    than `min_gap` as (length, start, end, name before, name after), longest first. The name
    before a hole is the interval that ended last before it."""
    if not intervals:
        return 0.0, 0.0, []
    items = sorted(intervals)
    busy, gaps = 0.0, []
    run_start, run_end, last_name = items[0][0], items[0][1], items[0][2]
    for start, end, name in items[1:]:
        if start > run_end:
            busy += run_end - run_start
            if start - run_end > min_gap:
                gaps.append((start - run_end, run_end, start, last_name, name))
            run_start, run_end, last_name = start, end, name
        elif end >= run_end:
            run_end, last_name = end, name
    busy += run_end - run_start
    return run_end - items[0][0], busy, sorted(gaps, reverse=True)


def profile_window(steps_wanted: int, start_step: int, total_steps: int, warm_up: int) -> tuple[int, int] | None:
    """(first, last) step numbers (1-based, inclusive) to profile, or None: the `steps_wanted` steps
    after the first `warm_up` and after the step this run starts from (a resumed run), cut at the
    run's end."""
    first = max(warm_up, start_step) + 1
    if steps_wanted <= 0 or first > total_steps:
        return None
    return first, min(first + steps_wanted - 1, total_steps)


class StepProfiler:
    """`before(step)` before step `step` is launched, `after(step)` once it is; writes the report
    when the window's last step is done. Inactive (two integer compares per step) outside it."""

    def __init__(self, out_dir: str | Path, window: tuple[int, int] | None, device: torch.device,
                 prefix: str = ""):
        self.out_dir, self.window, self.device, self.prefix = Path(out_dir), window, device, prefix
        self.prof = None
        self.starts: list[float] = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before(self, step: int) -> None:
        if self.window is None or not self.window[0] <= step <= self.window[1]:
            return
        if step == self.window[0]:
            from torch.profiler import ProfilerActivity, profile

            self._sync()  # the window holds only its own steps' work
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=activities)
            self.prof.start()
        self.starts.append(time.perf_counter())

    def after(self, step: int) -> Path | None:
        """The summary's path once the window's last step is done (and written), else None."""
        if self.prof is None or step != self.window[1]:
            return None
        self._sync()
        self.starts.append(time.perf_counter())
        prof, self.prof = self.prof, None
        prof.stop()
        return self._write(prof)

    def close(self) -> None:
        """A run that stops inside the window (a signal, an error) stops the profiler unwritten."""
        if self.prof is not None:
            prof, self.prof = self.prof, None
            prof.stop()

    def _write(self, prof) -> Path:
        first, last = self.window
        n = last - first + 1
        on_device = self.device.type == "cuda"
        kind = torch.autograd.DeviceType.CUDA if on_device else torch.autograd.DeviceType.CPU
        events = [e for e in prof.events() if e.device_type == kind and not is_range_annotation(e.name)]
        if not on_device:  # host ops nest: only the outermost ones, so no time is counted twice
            events = [e for e in events if e.cpu_parent is None]
        span, busy, gaps = timeline([(e.time_range.start, e.time_range.end, e.name) for e in events])
        totals: dict[str, list[float]] = {}
        for e in events:
            acc = totals.setdefault(e.name, [0, 0.0])
            acc[0] += 1
            acc[1] += e.time_range.end - e.time_range.start
        kernels = [(name, int(c), us) for name, (c, us) in totals.items()]
        host_ms = [1e3 * (b - a) for a, b in zip(self.starts, self.starts[1:])]
        what = "device kernels and copies" if on_device else "host ops (a CPU run: no device kernels)"
        lines = [f"profiled steps {first}-{last} ({n}) on {self.device}: {what}",
                 "host time per step, launch to launch (ms): " + ", ".join(f"{t:.2f}" for t in host_ms),
                 (f"timeline: span {span / 1e3:.2f} ms ({span / 1e3 / n:.2f} per step), busy {busy / 1e3:.2f} ms "
                  f"({busy / 1e3 / n:.2f} per step), idle {(span - busy) / 1e3:.2f} ms; {len(events)} intervals"),
                 f"idle gaps over 20 us: {len(gaps)}, {sum(g[0] for g in gaps) / 1e3:.2f} ms in all; the longest:"]
        lines += [f"  {g[0]:9.1f} us  after {g[3][:70]!r}  before {g[4][:70]!r}" for g in gaps[:20]]
        lines += ["by family (launches, total, mean):"] + [f"  {line}" for line in kernel_families(kernels)]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        summary = self.out_dir / f"{self.prefix}summary.txt"
        for path, text in ((self.out_dir / f"{self.prefix}kernels.tsv", kernel_table(kernels)),
                           (summary, "\n".join(lines) + "\n")):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
        return summary
