"""A train-step benchmark case's side measurements (bench/train_step.py): the optimizer's
Newton-Schulz chunk sweep, the profile's top kernels and kernel families, the optimizer-overlap
probe, the two-rows probe, and the release of a case's graphs between them. `tr` is bench/train_step.py's `Trainer`."""
from __future__ import annotations

import gc
import json
import re
from pathlib import Path

import torch

from bench.timing import cuda_time, graph_time
from vpmoe.train.profiling import (
    FAMILIES,
    is_range_annotation,
    kernel_families,
    kernel_table,
)


def release_graphs(tr) -> None:
    """Drop the captured graphs and their memory pool (gradients live there), or the eager
    variant's gradients."""
    if tr.graphed is not None:
        tr.graphed.release()  # gradients, sync and cache included
        return
    for p in tr.model.parameters():
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def opt_sweep(tr, chunks=(32, 64, 128, 256)) -> list[dict]:
    rows = []
    for p in tr.model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    for c in chunks:
        tr.fopt.ns_chunk = c
        eager = cuda_time(tr.fopt.step, warmup=1, iters=3)
        graphed, how = graph_time(lambda: tr.fopt.step(refresh_lr=False), iters=5)
        packed = any(tr.fopt._packs(p.view(-1, *p.shape[-2:])) for p in tr.model.parameters() if p.ndim == 3)
        rows.append({"ns_chunk": c, "packed": packed, "eager_ms": eager * 1e3, "graphed_ms": graphed * 1e3,
                     "timing": how})
        print(json.dumps(rows[-1]), flush=True)
    tr.opt.zero_grad(set_to_none=True)
    return rows


_CAST = re.compile(r"^triton_poi_fused__to_copy(_clone)?_\d+$")


def is_dtype_cast(kernel: str) -> bool:
    """Whether a kernel only converts dtypes: an Inductor kernel that fuses nothing but `_to_copy`
    (and `clone`), or aten's direct copy (an eager `.to`). Casts fused into other work (a norm that
    ends in bf16) are not counted: an upper bound on what a persistent bf16 weight copy could remove."""
    return bool(_CAST.match(kernel)) or "direct_copy_kernel" in kernel


_COPY = re.compile(r"memcpy|Memcpy")
_ATEN = dict(FAMILIES)["aten eager"]


def kernel_sources(events, pattern: re.Pattern, rows: int = 20) -> list[str]:
    """Which CPU ops launched the kernels whose names match `pattern`, and with what input shapes:
    the kernel table names only the kernel. `events` are the profiler's FunctionEvents
    (`prof.events()`, recorded with shapes); each CPU op carries the kernels it launched (eager
    runs only: a graph replay records no CPU ops). Rows: total ms, launches, op, shapes, then the
    op's parents (innermost first)."""
    totals: dict[tuple, list[float]] = {}
    for e in events:
        us = sum(k.duration for k in getattr(e, "kernels", ()) if pattern.search(k.name))
        if not us:
            continue
        parents, p = [], e.cpu_parent
        while p is not None and len(parents) < 4:
            parents.append(p.name)
            p = p.cpu_parent
        key = (e.name, str(getattr(e, "input_shapes", "")), " < ".join(parents))
        acc = totals.setdefault(key, [0.0, 0])
        acc[0] += us
        acc[1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:rows]
    return [f"{us / 1e3:8.3f} ms {n:5d}x  {name} {shapes}  <  {parents}" for (name, shapes, parents), (us, n) in ranked]


def copy_sources(events, rows: int = 20) -> list[str]:
    """`kernel_sources` of the device copies (`Memcpy DtoD`, graph `memcpy128` nodes)."""
    return kernel_sources(events, _COPY, rows)


def profile(tr, micro: list[dict], out_dir: str, tag: str) -> None:
    """Top kernels by GPU time over two steps (and over one optimizer step) -> stdout + files; for a
    graphed step, also the update graph's timeline as the step runs it (bench/timeline.py: the time
    one stream alone is busy, by kernel; its clipping norm reads the kernels' sums of squares)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    def top(fn, label, rows=28):
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            fn()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages()
                  if e.device_type == torch.autograd.DeviceType.CUDA and not is_range_annotation(e.key)]
        total = sum(e.self_device_time_total for e in events)
        events.sort(key=lambda e: -e.self_device_time_total)
        path = Path(out_dir) / f"profile_{tag}_{label}.txt"
        full_names = "\n".join(f"{e.self_device_time_total / 1e3:9.2f} ms {e.count:6d}x {e.key}" for e in events[:40])
        path.write_text(prof.key_averages().table(sort_by="self_device_time_total", row_limit=80,
                                                   max_name_column_width=160)
                        + "\n\nfull kernel names (templates: tile shapes, operand layouts):\n" + full_names + "\n")
        kernels = [(e.key, e.count, e.self_device_time_total) for e in events]
        Path(out_dir, f"profile_{tag}_{label}_kernels.tsv").write_text(kernel_table(kernels))
        print(f"# profile {tag} {label}: GPU busy {total / 1e3:.1f} ms, {sum(e.count for e in events)} kernels", flush=True)
        families = kernel_families(kernels)
        print(f"# profile {tag} {label}: kernels by family (launches, time, mean per launch)", flush=True)
        for line in families:
            print(f"#  {line}", flush=True)
        casts = [e for e in events if is_dtype_cast(e.key)]
        print(f"# profile {tag} {label}: dtype casts alone {sum(e.self_device_time_total for e in casts) / 1e3:.2f} ms "
              f"in {sum(e.count for e in casts)} launches", flush=True)
        for e in events[:rows]:
            print(f"#  {e.self_device_time_total / 1e3:8.2f} ms {e.count:6d}x  {e.key[:110]}", flush=True)
        # torch's own kernels (outside Inductor's) by the op that launched them: on 2026-12-04 this
        # named the head's eager passes over [V, d] (the loss gradient's scale, the bf16 weight copy)
        eager = kernel_sources(prof.events(), _ATEN, rows=12)
        if eager:
            print(f"# profile {tag} {label}: torch's own kernels by the op that launched them", flush=True)
            for line in eager:
                print(f"#  {line[:300]}", flush=True)
        copies = copy_sources(prof.events())
        print(f"# profile {tag} {label}: device copies by the op that launched them (graph replays show the replay)", flush=True)
        for line in copies[:12]:
            print(f"#  {line[:300]}", flush=True)
        with path.open("a") as f:
            f.write("\ndevice copies by launching op (ms, launches, op, input shapes, parents):\n" + "\n".join(copies) + "\n")
            f.write("\ntorch's own kernels by launching op (ms, launches, op, input shapes, parents):\n"
                    + "\n".join(eager) + "\n")
            f.write("\nkernels by family:\n" + "\n".join(families) + "\n")

    top(lambda: [tr.step(micro) for _ in range(2)], "2steps")
    if tr.graphed is not None and tr.graphed.graphs is not None:  # (first, rest, update) after a step
        from bench.timeline import stream_timeline, summary_lines
        for line in summary_lines(stream_timeline(tr.graphed.graphs[2].replay), top=16):
            print(f"# profile {tag} update graph: {line}", flush=True)
    release_graphs(tr)  # the optimizer alone, with gradients of its own: the step's graphs' memory back first
    try:
        for p in tr.model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        top(tr.fopt.step, "optimizer", rows=14)
    except torch.OutOfMemoryError:  # a run that fills the GPU (e.g. partial checkpointing on an H200)
        print("# profile: no memory left for the optimizer-alone profile (bench/optim_step.py has it)", flush=True)
    tr.opt.zero_grad(set_to_none=True)


def overlap_probe(tr, make_trainer, micro: list[dict], iters: int = 8) -> dict:
    """The most that overlapping the optimizer with the next step's forward + backward could give
    (docs/performance.md, What remains 8): an update graph replayed on a side stream while the
    first micro-batch's graph replays, with no dependency between them, against each alone and the
    two in a row. The update is a second, identical model's (its own parameters, gradients and
    graph pool), so nothing races: sharing one model, the update changed the router's weights
    between a block's forward and its recomputation in backward, and the grouped GEMM's group
    sizes went negative (device assert, 19:30 run). An upper bound only: the real scheme makes each
    block's forward wait for its own update."""
    g = tr.graphed
    if g is None or g.graphs is None or len(micro) != 1:  # one micro-batch: graph 1 is the whole forward + backward
        return {"probe": "graphed cases of one micro-batch only"}
    return _with_captured_trainers(
        make_trainer, [micro], lambda others: _probe(g.graphs[0], others[0].graphed.graphs[2], iters),
        {"probe": "out of memory for the second model"})


def _with_captured_trainers(make_trainer, micros: list[list[dict]], measure, out_of_memory: dict) -> dict:
    """One more trainer per entry of `micros`, each stepped on it until its graphs are captured
    (eager warm-up steps, then the capture), then `measure(trainers)`; `out_of_memory` is the row
    instead if they do not fit beside the case's own model. Their graphs and memory are released
    after, whatever happened."""
    made = []
    try:
        for micro in micros:
            made.append(make_trainer())
            for _ in range(made[-1].graphed.warmup + 1):
                made[-1].step(micro)
        return measure(made)
    except torch.OutOfMemoryError:  # reported in the row, which keeps the case's own figures
        return out_of_memory
    finally:
        for other in made:
            release_graphs(other)
        made.clear()
        gc.collect()  # Trainer <-> graphed-step cycles
        torch.cuda.empty_cache()


def _in_turn_and_side_by_side(first, second, iters: int) -> tuple[float, float]:
    """Milliseconds for two graphs replayed one after the other, then side by side (the second on
    a side stream, no dependency between them)."""
    side = torch.cuda.Stream()

    def serial():
        first.replay()
        second.replay()

    def concurrent():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            second.replay()
        first.replay()
        torch.cuda.current_stream().wait_stream(side)

    return cuda_time(serial, iters=iters) * 1e3, cuda_time(concurrent, iters=iters) * 1e3


def _probe(first, upd, iters: int) -> dict:
    row = {"probe_first_ms": cuda_time(first.replay, iters=iters) * 1e3,
           "probe_update_ms": cuda_time(upd.replay, iters=iters) * 1e3}
    row["probe_serial_ms"], row["probe_concurrent_ms"] = _in_turn_and_side_by_side(first, upd, iters)
    return row


def rows_probe(tr, make_trainer, micro: list[dict], halves: list[dict], iters: int = 8) -> dict:
    """The most that running a step's rows as two independent halves on two CUDA streams could
    give the forward + backward (docs/performance.md, What remains 8: at (a) the body is many small
    kernels that leave SMs idle). Two more models (their own parameters, gradients and graph pools:
    nothing races) each capture one half of the rows; their first-micro-batch graphs are replayed
    one after the other and side by side, against the case's own graph over all the rows. An upper
    bound only: the real scheme shares one set of weights, so the two halves' weight gradients must
    be summed (or accumulated in turn), which this probe does not pay for. `halves`: `micro`'s one
    micro-batch split in two as bench/train_step.py splits micro-batches."""
    g = tr.graphed
    if g is None or g.graphs is None or len(micro) != 1 or len(halves) != 2:
        return {"rows_probe": "graphed cases of one micro-batch with an even row count only"}
    return _with_captured_trainers(
        make_trainer, [[half] for half in halves],
        lambda others: _rows(g.graphs[0], others[0].graphed.graphs[0], others[1].graphed.graphs[0], iters),
        {"rows_probe": "out of memory for the two half models"})


def _rows(whole, first, second, iters: int) -> dict:
    row = {"rows_whole_ms": cuda_time(whole.replay, iters=iters) * 1e3,
           "rows_half_ms": cuda_time(first.replay, iters=iters) * 1e3}
    row["rows_serial_ms"], row["rows_concurrent_ms"] = _in_turn_and_side_by_side(first, second, iters)
    return row
